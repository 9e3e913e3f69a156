//! `cxrfed-coordinator`: the study coordinator's server (`serve`, reached as `cxrfed
//! coordinator serve`). It links no libtorch: aggregation works on raw f32 tensors.
//!
//! Architecture invariant: this binary never depends on tch or torch-sys (CI checks it with
//! `cargo tree`).

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use cxrfed_coordinator::CoordinatorConfig;
use cxrfed_server::process;
use serde::Serialize;

// The system allocator, not mimalloc (the node's choice for its per-image buffers): mimalloc
// commits a segment per thread heap, about 57 MB at idle here against the 64 MB budget, and
// keeps the round's large freed buffers; glibc returns them.

#[derive(Debug, Parser)]
#[command(
    name = "cxrfed-coordinator",
    version,
    about = "The cxrfed study coordinator: site registry, federated DP queries, federated training (research use only)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start the coordinator's gRPC server (mutual TLS, coordinator certificate).
    Serve(Box<ServeArgs>),
}

#[derive(Debug, Args, Serialize)]
pub struct ServeArgs {
    /// TOML configuration file (keys as in CoordinatorConfig).
    #[arg(long, env = "CXRFED_COORDINATOR_CONFIG")]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Data directory (registry, audit chain, logs, PID file)
    /// [default: ~/.local/share/cxrfed/coordinator].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir: Option<PathBuf>,
    /// Listen address [default: 127.0.0.1:50061].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<SocketAddr>,
    #[arg(long, env = "CXRFED_CA")]
    #[serde(skip_serializing_if = "Option::is_none")]
    ca: Option<PathBuf>,
    /// The coordinator's certificate (`cxrfed certs issue --role coordinator`).
    #[arg(long, env = "CXRFED_CERT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    cert: Option<PathBuf>,
    #[arg(long, env = "CXRFED_KEY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<PathBuf>,
    #[arg(long, env = "CXRFED_CRL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    crl: Option<PathBuf>,
    /// Pooled noisy counts below this are withheld [default: 10].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    suppress_below: Option<u64>,
    /// Serve /metrics (Prometheus text for operators) on this address, e.g. 127.0.0.1:9465.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Seconds between node heartbeats [default: 10].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    heartbeat_secs: Option<u32>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    log_level: Option<String>,
    /// Start in the background and return once the coordinator accepts connections.
    #[arg(long)]
    #[serde(skip)]
    detach: bool,
}

fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let config = CoordinatorConfig::load(args.config.as_deref(), &args)?;
    process::Launch {
        layout: config.layout(),
        listen: config.listen,
        log_level: config.log_level.clone(),
        tls: true,
        detach: args.detach,
    }
    .run(|listener, bound, shutdown| {
        let mut config = config;
        config.listen = bound;
        cxrfed_coordinator::serve(config, listener, shutdown)
    })
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Serve(args) => serve(*args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
