//! `cxrfed coordinator status | stop | sites` and `cxrfed query` (a federated DP query, signed
//! with the researcher's key); `cxrfed coordinator serve` runs the `cxrfed-coordinator` binary.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use clap::{Args, Subcommand};
use cxrfed_proto::Label;
use cxrfed_proto::v1 as pb;
use cxrfed_proto::v1::coordinator_service_client::CoordinatorServiceClient;
use cxrfed_server::process;
use cxrfed_server::{Layout, ServerKind};

use crate::client::{Credentials, status_error};
use crate::stats_cmd::print_table;

const DEFAULT_COORDINATOR: &str = "https://127.0.0.1:50061";

#[derive(Debug, Subcommand)]
pub enum CoordinatorCommand {
    /// Start the coordinator's gRPC server (mutual TLS, coordinator certificate); runs the
    /// `cxrfed-coordinator` binary (`cxrfed coordinator serve --help` for its flags).
    Serve(crate::exec::PassThrough),
    /// Whether the coordinator of a data directory runs, and its last log lines.
    Status(DataDirArgs),
    /// Stop the coordinator of a data directory gracefully.
    Stop(DataDirArgs),
    /// The registry of sites: identity, connected, last seen, version, model, records.
    Sites(SitesArgs),
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

fn layout(data_dir: Option<PathBuf>) -> Layout {
    ServerKind::Coordinator
        .layout(data_dir.unwrap_or_else(|| ServerKind::Coordinator.default_data_dir()))
}

pub fn run(command: CoordinatorCommand) -> anyhow::Result<ExitCode> {
    match command {
        CoordinatorCommand::Serve(args) => crate::exec::sibling(
            ServerKind::Coordinator.binary(),
            "cxrfed coordinator",
            &["serve"],
            args,
        ),
        CoordinatorCommand::Status(args) => status(args),
        CoordinatorCommand::Stop(args) => {
            process::stop(&layout(args.data_dir), Duration::from_secs(30))
        }
        CoordinatorCommand::Sites(args) => crate::client::run(sites(args)),
    }
}

fn status(args: DataDirArgs) -> anyhow::Result<ExitCode> {
    let layout = layout(args.data_dir);
    let dir = layout.data_dir();
    let logs = process::last_lines(&layout.log_file(), 5);
    match process::running(&layout) {
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
                // 0: the site publishes no count, or the caller may not see it.
                if s.record_count == 0 {
                    "-".to_string()
                } else {
                    s.record_count.to_string()
                },
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
    /// The noise each site adds.
    #[arg(long, value_enum, default_value_t = crate::stats_cmd::MechanismArg::Laplace)]
    mechanism: crate::stats_cmd::MechanismArg,
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

fn signed_query(
    signer: &cxrfed_auth::signing::Signer,
    study: &str,
    args: &QueryArgs,
) -> anyhow::Result<pb::SignedQuery> {
    sign_query(
        signer,
        study,
        &QuerySpec {
            query: args.query.clone(),
            epsilon: args.epsilon,
            delta: args.delta,
            mechanism: args.mechanism.into(),
            sites: args.sites.clone(),
            timeout_secs: args.timeout,
        },
    )
}

/// What a researcher asks of the study (the CLI's `query` flags, or the console's form).
pub(crate) struct QuerySpec {
    pub query: String,
    pub epsilon: f64,
    pub delta: f64,
    pub mechanism: pb::Mechanism,
    pub sites: Vec<String>,
    pub timeout_secs: u64,
}

/// Builds and signs the intent of a federated query (valid until the timeout has passed, plus
/// five minutes).
pub(crate) fn sign_query(
    signer: &cxrfed_auth::signing::Signer,
    study: &str,
    spec: &QuerySpec,
) -> anyhow::Result<pb::SignedQuery> {
    let valid_for = Duration::from_secs(spec.timeout_secs + 300);
    let intent = pb::QueryIntent {
        delta: spec.delta,
        mechanism: spec.mechanism.into(),
        sites: spec.sites.clone(),
        ..cxrfed_server::intent::new(study, &spec.query, spec.epsilon, valid_for)?
    };
    Ok(cxrfed_server::intent::sign(signer, &intent)?)
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
                    "site": s.site, "answered": s.answered, "status": s.status().label(),
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
                        s.status().label(),
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
