//! What every cxrfed server process shares, and what a client needs to find one: the gRPC
//! bootstrap (health, reflection, TLS reload, authorization, per-RPC request ids and spans,
//! graceful drain), the data-directory layout, PID files and signals, logging, and signed query
//! intents (built by researchers' clients, verified by the coordinator and every node with one
//! rule set).
//!
//! Architecture invariant: cxrfed-server never depends on tch (nor on cxrfed-node,
//! cxrfed-coordinator or cxrfed-model) and holds no business logic of either server; both
//! servers and the CLI depend on it, never the reverse.

#![forbid(unsafe_code)]

pub mod audit;
pub mod bootstrap;
pub mod intent;
pub mod layout;
pub mod logging;
pub mod metrics;
pub mod order;
pub mod process;

pub use bootstrap::{BootstrapError, GrpcServer};
pub use layout::{Layout, ServerKind};
