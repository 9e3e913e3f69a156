//! `cxrfed`: the command line. A client of nodes and the coordinator; `cxrfed node serve`,
//! `cxrfed coordinator serve` and `cxrfed model ...` run the sibling `cxrfed-node` and
//! `cxrfed-coordinator` binaries (git-style), so this one starts fast and small.
//!
//! Architecture invariant: this binary never depends on tch or torch-sys (CI checks it with
//! `cargo tree`), nor on the node's or the coordinator's crates.
//!
//! cxrfed is a research tool, not a diagnostic device.

#![forbid(unsafe_code)]

mod certs_cmd;
mod client;
mod coordinator_cmd;
mod exec;
mod fields_cmd;
mod ingest_cmd;
mod node_cmd;
mod phantom_cmd;
mod plot;
mod privacy_cmd;
mod sr_export;
mod stats_cmd;
mod train_cmd;
mod ui;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    /// Run and manage the study coordinator (federated queries across nodes).
    Coordinator {
        #[command(subcommand)]
        command: coordinator_cmd::CoordinatorCommand,
    },
    /// A federated, differentially private query through the coordinator: every site charges
    /// your budget there, the coordinator pools the noisy answers.
    Query(coordinator_cmd::QueryArgs),
    /// The web console: a local web server for a node (site admin, or a researcher's DP
    /// statistics) or the coordinator (sites, federated queries, jobs, registry), with your
    /// certificate. Prints a one-time login URL; loopback only unless given TLS.
    Ui(ui::UiArgs),
    /// Federated fine-tuning jobs on the coordinator: start (study admin), list, status
    /// (round log, live with --follow), cancel.
    Job {
        #[command(subcommand)]
        command: train_cmd::JobCommand,
    },
    /// The coordinator's model registry: every global model version with its lineage; import
    /// and promote (study admin). `cxrfed model` is local model work.
    #[command(alias = "models")]
    Registry {
        #[command(subcommand)]
        command: train_cmd::ModelsCommand,
    },
    /// Old spelling of `cxrfed job start` (kept for one version).
    #[command(hide = true)]
    Train(train_cmd::TrainArgs),
    /// Old spelling of `cxrfed job list` (kept for one version).
    #[command(hide = true)]
    Jobs(train_cmd::JobsArgs),
    /// Run and manage a node (the service a hospital runs).
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Extract records from image files (DICOM, JPEG, PNG) through a running node; prints one
    /// JSON record per line.
    Extract(client::ExtractArgs),
    /// Ingest a folder (recursively; DICOM, JPEG, PNG recognised by content) through a node,
    /// with progress, a summary and a report of rejects; reruns resume.
    Ingest(ingest_cmd::IngestArgs),
    /// Ask a question about a record in English or Chinese; the answer (the model's value for
    /// the field the question maps to) is appended to the record. Exit code 3: not understood.
    Ask(client::AskArgs),
    /// List a node's stored records as JSON lines.
    Records(client::RecordsArgs),
    /// Generate synthetic chest X-ray phantoms with exact ground truth (DICOM + labels).
    Phantom(phantom_cmd::PhantomArgs),
    /// Cohort statistics from a node: count, histogram, crosstab, summary, sum, mean. Exact for
    /// the site admin; with --dp, differentially private (researchers), charged to your budget.
    Stats(stats_cmd::StatsArgs),
    /// Your own privacy budget at a node: granted, spent, remaining.
    Budget(privacy_cmd::BudgetArgs),
    /// Export a node's records (site admin): flattened as CSV, JSON lines or Parquet, or as
    /// DICOM SR documents (TID 1500), optionally sent to a research PACS.
    Export(stats_cmd::ExportArgs),
    /// Custom fields: define (a new version when redefined), list.
    Field {
        #[command(subcommand)]
        command: fields_cmd::FieldCommand,
    },
    /// Human labels: set one, or import a CSV (the phantom labels.csv works as is).
    Annotate {
        #[command(subcommand)]
        command: fields_cmd::AnnotateCommand,
    },
    /// Print the JSON Schema of a record (schema/record.schema.json).
    Schema,
    /// Study CA and certificates: init, issue, inspect, revoke.
    Certs {
        #[command(subcommand)]
        command: certs_cmd::CertsCommand,
    },
    /// Train, evaluate and inspect extraction models (train, eval, info); runs the
    /// `cxrfed-node` binary, which links libtorch (`cxrfed model --help` for its commands).
    Model(exec::PassThrough),
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Start the node's gRPC server; runs the `cxrfed-node` binary (`cxrfed node serve
    /// --help` for its flags).
    Serve(exec::PassThrough),
    /// Show whether the node of a data directory runs: PID, address, uptime, records, last log lines.
    Status(node_cmd::StatusArgs),
    /// Ingest a folder on this machine's disk inside the running node (a background job);
    /// shows progress until it finishes.
    Ingest(node_cmd::NodeIngestArgs),
    /// Pull studies from a PACS into the running node (C-FIND, then C-MOVE of each new
    /// instance to the node's DICOM receiver; a background job, resumable, rate-limited).
    Pull(node_cmd::NodePullArgs),
    /// Stop the node of a data directory gracefully (SIGTERM, drain, flush; forced after a grace period).
    Stop(node_cmd::StopArgs),
    /// Privacy budgets per identity (site admin, through the running node).
    Budget {
        #[command(subcommand)]
        command: privacy_cmd::BudgetCommand,
    },
    /// The audit chain: verify it, or show it (through the running node, or from the store of
    /// a stopped one).
    Audit {
        #[command(subcommand)]
        command: privacy_cmd::AuditCommand,
    },
    /// The site's federated training policy: whether and on what terms this site trains for
    /// the study (site admin, audited). Off until set.
    TrainingPolicy {
        #[command(subcommand)]
        command: privacy_cmd::TrainingPolicyCommand,
    },
    /// Roll the node back to the model that ran before the promoted one, restoring every
    /// record's earlier findings (site admin, audited).
    Rollback(privacy_cmd::LocalNode),
}

/// A note on stderr when an old spelling is used.
fn renamed(old: &str, new: &str) {
    eprintln!("note: `{old}` is now `{new}`; the old spelling goes in the next version");
}

/// The command scheme is noun then verb. A bare noun is a client command against the node
/// (`--node URL`) or coordinator (`--coordinator URL`) you name: `records`, `stats`, `ingest`
/// (upload a folder from here), `budget` (your own), `job`, `registry`, `query`. `cxrfed node
/// ...` are the site admin's commands on the node of a local data directory (`--data-dir`):
/// `serve`, `status`, `stop`, `ingest` (a folder on the node's disk), `budget` (everyone's),
/// `audit`. `cxrfed model ...` is local model work (the cxrfed-node binary).
fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Node {
            command: NodeCommand::Serve(args),
        } => exec::sibling(
            cxrfed_server::ServerKind::Node.binary(),
            "cxrfed node",
            &["serve"],
            args,
        ),
        Command::Node {
            command: NodeCommand::Status(args),
        } => node_cmd::status(args),
        Command::Node {
            command: NodeCommand::Stop(args),
        } => node_cmd::stop(args),
        Command::Node {
            command: NodeCommand::Ingest(args),
        } => node_cmd::ingest(args),
        Command::Node {
            command: NodeCommand::Pull(args),
        } => node_cmd::pull(args),
        Command::Node {
            command: NodeCommand::Budget { command },
        } => client::run(privacy_cmd::node_budget(command)),
        Command::Node {
            command: NodeCommand::Audit { command },
        } => privacy_cmd::node_audit(command),
        Command::Node {
            command: NodeCommand::TrainingPolicy { command },
        } => client::run(privacy_cmd::node_training_policy(command)),
        Command::Node {
            command: NodeCommand::Rollback(node),
        } => client::run(privacy_cmd::node_rollback(node)),
        Command::Budget(args) => client::run(privacy_cmd::budget(args)),
        Command::Coordinator { command } => coordinator_cmd::run(command),
        Command::Query(args) => client::run(coordinator_cmd::query(args)),
        Command::Ui(args) => client::run(ui::run(args)),
        Command::Train(args) => {
            renamed("cxrfed train", "cxrfed job start");
            client::run(train_cmd::train(args))
        }
        Command::Jobs(args) => {
            renamed("cxrfed jobs", "cxrfed job list");
            client::run(train_cmd::jobs(args))
        }
        Command::Job { command } => client::run(train_cmd::job(command)),
        Command::Registry { command } => client::run(train_cmd::models(command)),
        Command::Extract(args) => client::run(client::extract(args)),
        Command::Records(args) => client::run(client::records(args)),
        Command::Ask(args) => client::run(client::ask(args)),
        Command::Ingest(args) => client::run(ingest_cmd::ingest(args)),
        Command::Phantom(args) => phantom_cmd::phantom(args),
        Command::Model(args) => exec::sibling(
            cxrfed_server::ServerKind::Node.binary(),
            "cxrfed",
            &["model"],
            args,
        ),
        Command::Certs { command } => certs_cmd::run(command),
        Command::Field { command } => client::run(fields_cmd::field(command)),
        Command::Annotate { command } => client::run(fields_cmd::annotate(command)),
        Command::Schema => serde_json::to_string_pretty(&cxrfed_schema::record_json_schema())
            .map(|text| {
                println!("{text}");
                ExitCode::SUCCESS
            })
            .map_err(Into::into),
        Command::Stats(args) => client::run(stats_cmd::stats(args)),
        Command::Export(args) => client::run(stats_cmd::export(args)),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
