//! The cxrfed study coordinator: nodes enrol over an outbound link (`Link`), researchers ask
//! federated differentially private questions (`Query`), and the coordinator pools the sites'
//! DP releases. It keeps a registry of sites and its own hash-chained audit log; it never sees
//! a record or an exact aggregate.

#![forbid(unsafe_code)]

pub mod config;
mod server;
pub mod service;

pub use config::CoordinatorConfig;
pub use server::{COORDINATOR_RULES, ServeError, coordinator_policy, serve};
