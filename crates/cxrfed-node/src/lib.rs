//! The cxrfed node: the gRPC services a hospital runs, and the extraction pipeline behind them.
//!
//! `serve` takes a listener and a shutdown token (the binary owns both), opens the data
//! directory (store, site secret), and serves `cxrfed.v1.NodeService` with gRPC health and
//! server reflection. Every request gets one span and one JSON log line with its request id,
//! image hash, processing time and outcome — never a patient identifier.
//!
//! Architecture invariant: cxrfed-node never depends on cxrfed-coordinator; inside it, no
//! module imports `grpc` (the top layer).

#![forbid(unsafe_code)]

pub mod columns;
pub mod config;
mod error;
pub mod export;
pub mod federation;
mod grpc;
pub mod ingest;
pub mod jobs;
mod metrics;
pub mod models;
pub mod orders;
pub mod pipeline;
pub mod privacy;
pub mod pull;
pub mod receiver;
pub mod secret;
mod server;
pub mod state;
pub mod training;

pub use config::NodeConfig;
pub use error::NodeError;
pub use server::{ServeError, serve};
pub use state::{Node, NodeBuilder};
