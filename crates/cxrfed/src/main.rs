//! `cxrfed`: the one binary. Runs a node, and talks to nodes as a client.
//!
//! cxrfed is a research tool, not a diagnostic device.

#![forbid(unsafe_code)]

mod client;
mod logging;
mod model_cmd;
mod node_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// mimalloc keeps freed pages for reuse: every image allocates several full-resolution
/// buffers, which glibc would map and page-fault afresh each time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "cxrfed",
    version,
    about = "Chest X-ray records kept at the hospital, federated research on top (research use only, not a diagnostic device)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run and manage a node (the service a hospital runs).
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Extract records from image files (DICOM, JPEG, PNG) through a running node; prints one
    /// JSON record per line.
    Extract(client::ExtractArgs),
    /// List a node's stored records as JSON lines.
    Records(client::RecordsArgs),
    /// Generate synthetic chest X-ray phantoms with exact ground truth (DICOM + labels).
    Phantom(model_cmd::PhantomArgs),
    /// Train, evaluate and inspect extraction models.
    Model {
        #[command(subcommand)]
        command: model_cmd::ModelCommand,
    },
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Start the node's gRPC server.
    Serve(Box<node_cmd::ServeArgs>),
    /// Show whether the node of a data directory runs: PID, address, uptime, records, last log lines.
    Status(DataDirArg),
    /// Stop the node of a data directory gracefully (SIGTERM, drain, flush; forced after a grace period).
    Stop(node_cmd::StopArgs),
}

#[derive(Debug, Args)]
struct DataDirArg {
    /// Node data directory [default: the embedded default, see `node serve --help`].
    #[arg(long, env = "CXRFED_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Node {
            command: NodeCommand::Serve(args),
        } => node_cmd::serve(*args),
        Command::Node {
            command: NodeCommand::Status(args),
        } => node_cmd::status(args.data_dir),
        Command::Node {
            command: NodeCommand::Stop(args),
        } => node_cmd::stop(args),
        Command::Extract(args) => client::run(client::extract(args)),
        Command::Records(args) => client::run(client::records(args)),
        Command::Phantom(args) => model_cmd::phantom(args),
        Command::Model { command } => model_cmd::run(command),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
