//! `cxrfed-node`: the binary a hospital runs. It serves the node (`serve`) and does the local
//! model work that needs libtorch (`model train|eval|info`). Users reach both through the
//! `cxrfed` CLI (`cxrfed node serve`, `cxrfed model train`), which executes this binary.
//!
//! Architecture invariant: this is the only binary besides `cxrfed-bench` that links libtorch.
//!
//! cxrfed is a research tool, not a diagnostic device.

#![forbid(unsafe_code)]

mod model;
mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc keeps freed pages for reuse: every image allocates several full-resolution
/// buffers, which glibc would map and page-fault afresh each time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "cxrfed-node",
    version,
    about = "The cxrfed node: extraction, records and DP statistics at the hospital (research use only, not a diagnostic device)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start the node's gRPC server.
    Serve(Box<serve::ServeArgs>),
    /// Train, evaluate and inspect extraction models.
    Model {
        #[command(subcommand)]
        command: model::ModelCommand,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::serve(*args),
        Command::Model { command } => model::run(command),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
