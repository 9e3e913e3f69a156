//! The cxrfed study coordinator: nodes enrol over an outbound link, researchers ask federated
//! differentially private questions, and the coordinator pools the sites' DP releases. It
//! keeps a registry of sites and its own hash-chained audit log; it never sees a record or an
//! exact aggregate. It also runs federated fine-tuning jobs and keeps the model registry.
//!
//! Layers, top to bottom (no module imports one above it):
//! - `grpc` — the tonic service: convert, call the domain, convert back.
//! - `state` — the composition root (`Coordinator`), seen only by `grpc` and `server`.
//! - domain: `session` (one node's link), `query` (federated DP queries), `training` (jobs,
//!   rounds, registry, rollout).
//! - `links` (live links, pending tasks), then the store (`cxrfed-store`).
//!
//! Architecture invariant: cxrfed-coordinator never depends on tch or torch-sys; aggregation
//! works on raw f32 tensors (`cxrfed-fl`).

#![forbid(unsafe_code)]

pub mod config;
mod error;
mod grpc;
mod links;
mod query;
mod server;
mod session;
mod state;
pub mod training;

pub use config::CoordinatorConfig;
pub use error::CoordinatorError;
pub use server::{COORDINATOR_RULES, ServeError, coordinator_policy, serve};
