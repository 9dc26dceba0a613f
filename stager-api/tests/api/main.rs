//! stager-api's integration tests: the app in-process, against a real PostgreSQL database of
//! its own and a real internal registry.

mod coordination;
mod diego;
mod fleet;
mod health;
mod helpers;
mod images;
mod maintenance;
mod metadata;
mod pin;
mod prune;
mod references;
mod referrers;
mod resume;
mod stage;
mod tls;
mod trust;
