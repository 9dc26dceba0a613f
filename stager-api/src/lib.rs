//! stager-api: the HTTP face of tailor.
//!
//! Transport only: routes parse requests into domain types from the `tailor` library, call it,
//! and render JSON. Every error leaves as `{code, message}` (see [`error`]), with a code from
//! `tailor::code::Code` that `specs/openapi.yaml` documents for the operation ([`contract`]).

pub mod auth;
pub mod config;
pub mod contract;
pub mod demo;
pub mod error;
pub mod routes;
pub mod startup;
pub mod state;
pub mod tls;
