//! The copy engine against real registries, judged by skopeo and the registries' access logs.

mod archive;
mod auth_and_faults;
mod bucket;
mod helpers;
mod kinds;
mod layout;
mod layout_import;
mod only_missing;
mod resume_and_cancel;
