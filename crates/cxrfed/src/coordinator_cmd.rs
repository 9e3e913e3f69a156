//! `cxrfed coordinator serve | status | stop | sites` and `cxrfed query` (a federated DP
//! query, signed with the researcher's key).

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use cxrfed_coordinator::CoordinatorConfig;
use cxrfed_proto::v1 as pb;
use cxrfed_proto::v1::coordinator_service_client::CoordinatorServiceClient;
use serde::Serialize;

use crate::client::{Credentials, status_error};
use crate::node_cmd::{PidFile, alive, detach_process, last_lines, read_pid_at, stop_process};
use crate::stats_cmd::print_table;

const DEFAULT_COORDINATOR: &str = "https://127.0.0.1:50061";

#[derive(Debug, Subcommand)]
pub enum CoordinatorCommand {
    /// Start the coordinator's gRPC server (mutual TLS, coordinator certificate).
    Serve(Box<ServeArgs>),
    /// Whether the coordinator of a data directory runs, and its last log lines.
    Status(DataDirArgs),
    /// Stop the coordinator of a data directory gracefully.
    Stop(DataDirArgs),
    /// The registry of sites: identity, connected, last seen, version, model, records.
    Sites(SitesArgs),
}

#[derive(Debug, Args, Serialize)]
pub struct ServeArgs {
    /// TOML configuration file (keys as in CoordinatorConfig).
    #[arg(long, env = "CXRFED_CONFIG")]
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

#[derive(Debug, Args)]
pub struct DataDirArgs {
    #[arg(long, env = "CXRFED_COORDINATOR_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SitesArgs {
    /// Coordinator URL [default: https://127.0.0.1:50061].
    #[arg(long, env = "CXRFED_COORDINATOR")]
    coordinator: Option<String>,
    #[command(flatten)]
    credentials: Credentials,
    #[arg(long)]
    json: bool,
}

fn pid_path(data_dir: &Path) -> PathBuf {
    data_dir.join("coordinator.pid")
}

pub fn run(command: CoordinatorCommand) -> anyhow::Result<ExitCode> {
    match command {
        CoordinatorCommand::Serve(args) => serve(*args),
        CoordinatorCommand::Status(args) => status(args),
        CoordinatorCommand::Stop(args) => {
            let dir = args
                .data_dir
                .unwrap_or_else(cxrfed_coordinator::config::default_data_dir);
            stop_process(&dir, &pid_path(&dir), "coordinator", 30)
        }
        CoordinatorCommand::Sites(args) => crate::client::run(sites(args)),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let config = CoordinatorConfig::load(args.config.as_deref(), &args)?;
    if let Some(running) = read_pid_at(&config.pid_path()).filter(|p| alive(p.pid)) {
        bail!(
            "a coordinator is already running on {} (pid {}, listening on {})",
            config.data_dir.display(),
            running.pid,
            running.listen
        );
    }
    if args.detach {
        return detach_process(&config.data_dir, &config.pid_path(), "coordinator");
    }
    let _guard =
        crate::logging::init_server(&config.log_dir(), "coordinator.log", &config.log_level)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let mut config = config;
        config.listen = listener.local_addr()?;
        std::fs::create_dir_all(&config.data_dir)?;
        let pid = PidFile {
            pid: std::process::id(),
            listen: config.listen,
            started_at: chrono::Utc::now().to_rfc3339(),
            tls: true,
        };
        let path = config.pid_path();
        std::fs::write(&path, serde_json::to_vec(&pid)?)?;
        let shutdown = crate::node_cmd::shutdown_on_signals();
        let result = cxrfed_coordinator::serve(config, listener, shutdown).await;
        if read_pid_at(&path).is_some_and(|p| p.pid == std::process::id()) {
            let _ = std::fs::remove_file(&path);
        }
        result.map_err(anyhow::Error::from)
    })?;
    Ok(ExitCode::SUCCESS)
}

fn status(args: DataDirArgs) -> anyhow::Result<ExitCode> {
    let dir = args
        .data_dir
        .unwrap_or_else(cxrfed_coordinator::config::default_data_dir);
    let logs = last_lines(&dir.join("logs").join("coordinator.log"), 5);
    match read_pid_at(&pid_path(&dir)).filter(|p| alive(p.pid)) {
        Some(pid) => {
            println!("coordinator: running");
            println!("  pid:            {}", pid.pid);
            println!("  listen:         {}", pid.listen);
            println!("  since:          {}", pid.started_at);
            println!("  data directory: {}", dir.display());
        }
        None => println!("coordinator: not running ({})", dir.display()),
    }
    if !logs.is_empty() {
        println!("last log lines:");
        for line in logs {
            println!("  {line}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn client(
    url: Option<&str>,
    credentials: &Credentials,
) -> anyhow::Result<CoordinatorServiceClient<tonic::transport::Channel>> {
    let url = url.unwrap_or(DEFAULT_COORDINATOR);
    Ok(
        CoordinatorServiceClient::new(credentials.channel(url).await?)
            .max_decoding_message_size(8 * 1024 * 1024),
    )
}

async fn sites(args: SitesArgs) -> anyhow::Result<ExitCode> {
    let mut c = client(args.coordinator.as_deref(), &args.credentials).await?;
    let sites = c
        .sites(pb::SitesRequest {})
        .await
        .map_err(status_error)?
        .into_inner()
        .sites;
    let mut out = std::io::stdout().lock();
    if args.json {
        let doc: Vec<serde_json::Value> = sites
            .iter()
            .map(|s| {
                serde_json::json!({
                    "site": s.site, "identity": s.identity, "connected": s.connected,
                    "last_seen": s.last_seen, "connected_since": s.connected_since,
                    "version": s.version, "model_id": s.model_id, "record_count": s.record_count,
                })
            })
            .collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let header: Vec<String> = [
        "site",
        "connected",
        "last seen",
        "version",
        "model",
        "records",
        "identity",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let body: Vec<Vec<String>> = sites
        .iter()
        .map(|s| {
            vec![
                s.site.clone(),
                if s.connected { "yes" } else { "no" }.to_string(),
                s.last_seen.clone(),
                s.version.clone(),
                s.model_id.clone(),
                s.record_count.to_string(),
                s.identity.clone(),
            ]
        })
        .collect();
    print_table(&mut out, &header, &body)?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct QueryArgs {
    /// The query (node query language: count, histogram, crosstab over public categories;
    /// sum, mean).
    query: String,
    /// Coordinator URL [default: https://127.0.0.1:50061].
    #[arg(long, env = "CXRFED_COORDINATOR")]
    coordinator: Option<String>,
    #[command(flatten)]
    credentials: Credentials,
    /// Privacy loss each site charges your budget there.
    #[arg(long)]
    epsilon: f64,
    #[arg(long, default_value_t = 0.0)]
    delta: f64,
    /// laplace or gaussian.
    #[arg(long, default_value = "laplace")]
    mechanism: String,
    /// Only these sites (comma-separated) [default: every connected site].
    #[arg(long, value_delimiter = ',')]
    sites: Vec<String>,
    /// Fail unless at least this many sites answer.
    #[arg(long, default_value_t = 1)]
    min_sites: u32,
    /// Seconds to wait for the sites.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// table, csv or json.
    #[arg(long, default_value = "table")]
    format: String,
    /// Also draw the pooled values as a PNG chart.
    #[arg(long)]
    plot: Option<PathBuf>,
}

/// Builds and signs the intent of a federated query (valid until the query's timeout has
/// passed, plus five minutes).
fn signed_query(
    signer: &cxrfed_auth::signing::Signer,
    study: &str,
    args: &QueryArgs,
) -> anyhow::Result<pb::SignedQuery> {
    let valid_for = Duration::from_secs(args.timeout + 300);
    let intent = pb::QueryIntent {
        delta: args.delta,
        mechanism: args.mechanism.clone(),
        sites: args.sites.clone(),
        ..cxrfed_coordinator::intent::new(study, &args.query, args.epsilon, valid_for)?
    };
    Ok(cxrfed_coordinator::intent::sign(signer, &intent)?)
}

pub async fn query(args: QueryArgs) -> anyhow::Result<ExitCode> {
    if !matches!(args.format.as_str(), "table" | "csv" | "json") {
        bail!("unknown format {:?} (table, csv or json)", args.format);
    }
    let signer = args.credentials.signer()?;
    let me = cxrfed_auth::Identity::from_cert_der(signer.certificate())?;
    let signed = signed_query(&signer, &me.study, &args)?;
    let mut c = client(args.coordinator.as_deref(), &args.credentials).await?;
    let r = c
        .query(pb::FederatedQueryRequest {
            signed: Some(signed),
            min_sites: args.min_sites,
            timeout_ms: (args.timeout * 1000).min(600_000) as u32,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if let Some(path) = &args.plot {
        // A crosstab's value columns are the categories of its last field: name them
        // `field=value` as the exact crosstab does.
        let across = cxrfed_stats::query::parse(&args.query)
            .ok()
            .and_then(|q| match q.statistic {
                cxrfed_stats::query::Statistic::Crosstab(fields) => {
                    fields.last().map(|f| f.value.clone())
                }
                _ => None,
            });
        let table = pb::StatsResponse {
            statistic: r.statistic.clone(),
            columns: r
                .label_columns
                .iter()
                .cloned()
                .chain(r.value_columns.iter().map(|c| match &across {
                    Some(field) => format!("{field}={c}"),
                    None => c.clone(),
                }))
                .collect(),
            rows: r
                .rows
                .iter()
                .map(|row| pb::StatsRow {
                    cells: row
                        .labels
                        .iter()
                        .map(|l| pb::StatsCell {
                            value: Some(pb::stats_cell::Value::Text(l.clone())),
                        })
                        .chain(row.values.iter().map(|v| pb::StatsCell {
                            value: Some(pb::stats_cell::Value::Count(
                                v.value.unwrap_or(0.0).round().max(0.0) as u64,
                            )),
                        }))
                        .collect(),
                })
                .collect(),
            cohort_size: 0,
            record_count: 0,
        };
        crate::plot::draw(&table, &args.query, path)?;
        eprintln!("chart written to {}", path.display());
    }
    let mut out = std::io::stdout().lock();
    match args.format.as_str() {
        "json" => {
            let doc = serde_json::json!({
                "query_id": r.query_id,
                "statistic": r.statistic,
                "query": r.query,
                "label_columns": r.label_columns,
                "value_columns": r.value_columns,
                "rows": crate::privacy_cmd::dp_rows_json(&r.rows),
                "confidence": r.confidence,
                "suppress_below": r.suppress_below,
                "answered": r.answered,
                "sites": r.sites.iter().map(|s| serde_json::json!({
                    "site": s.site, "answered": s.answered, "status": s.status,
                    "reason": s.reason, "epsilon": s.epsilon, "delta": s.delta,
                    "epsilon_remaining": s.epsilon_remaining, "audit_seq": s.audit_seq,
                })).collect::<Vec<_>>(),
                "notes": r.notes,
                "audit_seq": r.audit_seq,
            });
            writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
        }
        "csv" => {
            crate::privacy_cmd::write_dp_csv(out, &r.label_columns, &r.value_columns, &r.rows)?
        }
        _ => {
            crate::privacy_cmd::print_dp_table(
                &mut out,
                &r.label_columns,
                &r.value_columns,
                &r.rows,
            )?;
            writeln!(
                out,
                "federated, differentially private: {} of {} sites answered; ± is the {:.0}% error bound",
                r.answered,
                r.sites.len(),
                r.confidence * 100.0
            )?;
            for note in &r.notes {
                writeln!(out, "  {note}")?;
            }
            writeln!(out)?;
            let header: Vec<String> = ["site", "status", "epsilon charged", "remaining", "reason"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            let body: Vec<Vec<String>> = r
                .sites
                .iter()
                .map(|s| {
                    vec![
                        s.site.clone(),
                        s.status.clone(),
                        s.epsilon.to_string(),
                        if s.answered {
                            s.epsilon_remaining.to_string()
                        } else {
                            String::new()
                        },
                        s.reason.clone(),
                    ]
                })
                .collect();
            print_table(&mut out, &header, &body)?;
            writeln!(out, "coordinator audit entry #{}", r.audit_seq)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
