//! The privacy side of the CLI: printing DP releases (`cxrfed stats --dp`), the caller's own
//! budget (`cxrfed budget`), the site admin's ledger (`cxrfed node budget set|list`) and the
//! audit chain (`cxrfed node audit verify|show`).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use cxrfed_proto::v1 as pb;

use crate::client::{Credentials, status_error};
use crate::stats_cmd::print_table;

fn value_text(v: &pb::DpValue) -> String {
    match v.value {
        None => "suppressed".to_string(),
        Some(x) if x.fract() == 0.0 && x.abs() < 1e15 => {
            format!("{x:.0} ±{}", bound_text(v.error_bound))
        }
        Some(x) => format!("{x:.4} ±{}", bound_text(v.error_bound)),
    }
}

fn bound_text(b: f64) -> String {
    if b >= 100.0 {
        format!("{b:.0}")
    } else if b >= 1.0 {
        format!("{b:.1}")
    } else {
        format!("{b:.4}")
    }
}

fn value_json(v: &pb::DpValue) -> serde_json::Value {
    serde_json::json!({
        "value": v.value,
        "error_bound": v.error_bound,
        "suppressed": v.value.is_none(),
    })
}

/// DP rows as JSON (labels, and values with their bounds): a node's release and a pooled one.
pub(crate) fn dp_rows_json(rows: &[pb::DpRow]) -> Vec<serde_json::Value> {
    rows.iter()
        .map(|row| {
            serde_json::json!({
                "labels": row.labels,
                "values": row.values.iter().map(value_json).collect::<Vec<_>>(),
            })
        })
        .collect()
}

/// DP rows as CSV: the label columns, then each value column with its `_error_bound`.
pub(crate) fn write_dp_csv(
    out: impl Write,
    label_columns: &[String],
    value_columns: &[String],
    rows: &[pb::DpRow],
) -> anyhow::Result<()> {
    let mut w = csv::Writer::from_writer(out);
    let mut header = label_columns.to_vec();
    for c in value_columns {
        header.push(c.clone());
        header.push(format!("{c}_error_bound"));
    }
    w.write_record(&header)?;
    for row in rows {
        let mut cells = row.labels.clone();
        for v in &row.values {
            cells.push(v.value.map(|x| x.to_string()).unwrap_or_default());
            cells.push(v.error_bound.to_string());
        }
        w.write_record(&cells)?;
    }
    w.flush()?;
    Ok(())
}

/// DP rows as a plain table: values shown as "value ±bound" or "suppressed".
pub(crate) fn print_dp_table(
    out: &mut impl Write,
    label_columns: &[String],
    value_columns: &[String],
    rows: &[pb::DpRow],
) -> std::io::Result<()> {
    let header: Vec<String> = label_columns.iter().chain(value_columns).cloned().collect();
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            row.labels
                .iter()
                .cloned()
                .chain(row.values.iter().map(value_text))
                .collect()
        })
        .collect();
    print_table(out, &header, &body)
}

/// Prints a DP release as a table (values with their ± bounds), CSV (value and bound columns)
/// or JSON.
pub fn print_release(r: &pb::DpStatsResponse, format: &str) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    let budget = r.budget.clone().unwrap_or_default();
    match format {
        "json" => {
            let doc = serde_json::json!({
                "statistic": r.statistic,
                "query": r.query,
                "label_columns": r.label_columns,
                "value_columns": r.value_columns,
                "rows": dp_rows_json(&r.rows),
                "epsilon": r.epsilon,
                "delta": r.delta,
                "mechanism": r.mechanism,
                "noise_scale": r.noise_scale,
                "confidence": r.confidence,
                "contributions": r.contributions,
                "suppress_below": r.suppress_below,
                "threshold": (r.threshold > 0).then_some(r.threshold),
                "notes": r.notes,
                "epsilon_remaining": budget.epsilon_remaining,
                "delta_remaining": budget.delta_remaining,
                "audit_seq": r.audit_seq,
                "audit_hash": r.audit_hash,
            });
            writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
        }
        "csv" => write_dp_csv(out, &r.label_columns, &r.value_columns, &r.rows)?,
        _ => {
            print_dp_table(&mut out, &r.label_columns, &r.value_columns, &r.rows)?;
            writeln!(
                out,
                "differentially private: epsilon {} (delta {}) charged, {}, noise scale {:.3}; ± is the {:.0}% error bound",
                r.epsilon,
                r.delta,
                r.mechanism,
                r.noise_scale,
                r.confidence * 100.0
            )?;
            for note in &r.notes {
                writeln!(out, "  {note}")?;
            }
            if budget.unlimited {
                writeln!(
                    out,
                    "budget: site admin (recorded, not limited); audit entry #{}",
                    r.audit_seq
                )?;
            } else {
                writeln!(
                    out,
                    "budget: epsilon {} of {} remaining (delta {} of {}); audit entry #{}",
                    budget.epsilon_remaining,
                    budget.epsilon_budget,
                    budget.delta_remaining,
                    budget.delta_budget,
                    r.audit_seq
                )?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn account_row(a: &pb::BudgetAccount) -> Vec<String> {
    let limit = |budget: f64| {
        if a.unlimited {
            "unlimited".to_string()
        } else {
            budget.to_string()
        }
    };
    vec![
        a.identity.clone(),
        limit(a.epsilon_budget),
        a.epsilon_spent.to_string(),
        limit(a.epsilon_remaining),
        limit(a.delta_budget),
        a.delta_spent.to_string(),
        a.releases.to_string(),
        a.updated_at.clone(),
    ]
}

fn print_accounts(accounts: &[pb::BudgetAccount], json: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        let doc: Vec<serde_json::Value> = accounts
            .iter()
            .map(|a| {
                serde_json::json!({
                    "identity": a.identity,
                    "epsilon_budget": a.epsilon_budget,
                    "epsilon_spent": a.epsilon_spent,
                    "epsilon_remaining": a.epsilon_remaining,
                    "delta_budget": a.delta_budget,
                    "delta_spent": a.delta_spent,
                    "delta_remaining": a.delta_remaining,
                    "releases": a.releases,
                    "unlimited": a.unlimited,
                    "updated_at": a.updated_at,
                })
            })
            .collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
        return Ok(());
    }
    let header: Vec<String> = [
        "identity",
        "epsilon budget",
        "spent",
        "remaining",
        "delta budget",
        "delta spent",
        "releases",
        "updated",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let body: Vec<Vec<String>> = accounts.iter().map(account_row).collect();
    print_table(&mut out, &header, &body)?;
    Ok(())
}

#[derive(Debug, Args)]
pub struct BudgetArgs {
    /// Node URL [default: the profile's node, else https://127.0.0.1:50051].
    #[arg(long, env = "CXRFED_NODE")]
    node: Option<String>,
    #[command(flatten)]
    credentials: Credentials,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `cxrfed budget`: the caller's own privacy account at a node.
pub async fn budget(args: BudgetArgs) -> anyhow::Result<ExitCode> {
    let mut client = args.credentials.connect_node(args.node.as_deref()).await?;
    let account = client
        .budget(pb::BudgetRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    print_accounts(&[account], args.json)?;
    Ok(ExitCode::SUCCESS)
}

/// Where a `cxrfed node ...` admin command finds its node.
#[derive(Debug, Args)]
pub struct LocalNode {
    /// Node data directory [default: the embedded default].
    #[arg(long, env = "CXRFED_NODE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Credentials (the site admin).
    #[command(flatten)]
    credentials: Credentials,
}

impl LocalNode {
    fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| cxrfed_server::ServerKind::Node.default_data_dir())
    }

    async fn connect(
        &self,
    ) -> anyhow::Result<pb::node_service_client::NodeServiceClient<tonic::transport::Channel>> {
        let Some(url) = crate::node_cmd::running_node_url(&self.data_dir()) else {
            bail!(
                "no node is running on {}; start it with `cxrfed node serve` (the ledger changes \
                 through the running node's admin RPC)",
                self.data_dir().display()
            );
        };
        self.credentials.connect_node(Some(&url)).await
    }
}

#[derive(Debug, Subcommand)]
pub enum BudgetCommand {
    /// Set an identity's total budget (what it has spent stays spent).
    Set {
        /// The identity: a cxrfed:// URI, ROLE/SITE/NAME, or a bare NAME (a researcher
        /// without a site), in the node's study.
        #[arg(long)]
        identity: String,
        #[arg(long)]
        epsilon: f64,
        #[arg(long, default_value_t = 0.0)]
        delta: f64,
        #[command(flatten)]
        node: LocalNode,
    },
    /// Every identity's budget, spent and remaining.
    List {
        #[command(flatten)]
        node: LocalNode,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `cxrfed node budget set|list`.
pub async fn node_budget(command: BudgetCommand) -> anyhow::Result<ExitCode> {
    match command {
        BudgetCommand::Set {
            identity,
            epsilon,
            delta,
            node,
        } => {
            let mut client = node.connect().await?;
            let account = client
                .set_budget(pb::SetBudgetRequest {
                    identity,
                    epsilon,
                    delta,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            print_accounts(&[account], false)?;
        }
        BudgetCommand::List { node, json } => {
            let mut client = node.connect().await?;
            let accounts = client
                .list_budgets(pb::ListBudgetsRequest {})
                .await
                .map_err(status_error)?
                .into_inner()
                .accounts;
            print_accounts(&accounts, json)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the whole audit chain; exit code 1 naming the first broken link.
    Verify {
        #[command(flatten)]
        node: LocalNode,
    },
    /// Print the audit chain (oldest first).
    Show {
        #[command(flatten)]
        node: LocalNode,
        /// Only entries from this time on (RFC 3339 or YYYY-MM-DD).
        #[arg(long)]
        since: Option<String>,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
}

/// Opens a stopped node's store directly (a running node holds its lock: ask it instead).
fn open_store(data_dir: &std::path::Path) -> anyhow::Result<cxrfed_store::RecordStore> {
    let store_dir = cxrfed_server::ServerKind::Node.layout(data_dir).store_dir();
    if !store_dir.exists() {
        bail!("{} holds no node store", data_dir.display());
    }
    Ok(cxrfed_store::RecordStore::open(&store_dir)?)
}

/// `cxrfed node audit verify|show`: through the running node's admin RPC, or straight from
/// the store of a stopped node.
pub fn node_audit(command: AuditCommand) -> anyhow::Result<ExitCode> {
    let node = match &command {
        AuditCommand::Verify { node } | AuditCommand::Show { node, .. } => node,
    };
    let data_dir = node.data_dir();
    let running = crate::node_cmd::running_node_url(&data_dir).is_some();
    match command {
        AuditCommand::Verify { node } => {
            let report = if running {
                crate::client::run(async move {
                    let mut client = node.connect().await?;
                    let r = client
                        .verify_audit(pb::VerifyAuditRequest {})
                        .await
                        .map_err(status_error)?
                        .into_inner();
                    print_verification(r.ok, r.entries, &r.head, r.broken_seq, &r.reason)
                })?
            } else {
                let report = open_store(&data_dir)?.verify_audit()?;
                let (seq, reason) = report.broken.map(|b| (b.seq, b.reason)).unwrap_or_default();
                print_verification(seq == 0, report.entries, &report.head, seq, &reason)?
            };
            Ok(report)
        }
        AuditCommand::Show { node, since, json } => {
            let (entries, head) = if running {
                crate::client::run(async move {
                    let mut client = node.connect().await?;
                    let r = client
                        .audit_log(pb::AuditLogRequest {
                            since: since.unwrap_or_default(),
                        })
                        .await
                        .map_err(status_error)?
                        .into_inner();
                    Ok((r.entries, r.head))
                })?
            } else {
                let since = cxrfed_store::audit::parse_since(since.as_deref().unwrap_or(""))
                    .map_err(|e| anyhow::anyhow!("--{e}"))?;
                let store = open_store(&data_dir)?;
                let entries = store.audit_entries(since)?;
                let head = store.verify_audit()?.head;
                (
                    entries
                        .into_iter()
                        .map(cxrfed_server::audit::entry)
                        .collect(),
                    head,
                )
            };
            print_entries(&entries, &head, json)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_verification(
    ok: bool,
    entries: u64,
    head: &str,
    broken_seq: u64,
    reason: &str,
) -> anyhow::Result<ExitCode> {
    if ok {
        println!("audit chain verified: {entries} entries, head {head}");
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "audit chain BROKEN at entry {broken_seq}: {reason} ({entries} entries before it verify)"
        );
        Ok(ExitCode::from(1))
    }
}

fn print_entries(entries: &[pb::AuditEntry], head: &str, json: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        for e in entries {
            writeln!(
                out,
                "{}",
                serde_json::json!({
                    "seq": e.seq, "time": e.time, "identity": e.identity, "role": e.role,
                    "method": e.method, "query": e.query, "epsilon": e.epsilon,
                    "delta": e.delta, "digest": e.digest, "prev": e.prev, "hash": e.hash,
                    "via": e.via,
                })
            )?;
        }
        return Ok(());
    }
    let header: Vec<String> = [
        "seq", "time", "identity", "method", "epsilon", "delta", "query", "hash",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let body: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            vec![
                e.seq.to_string(),
                e.time.clone(),
                e.identity.clone(),
                e.method.clone(),
                e.epsilon.to_string(),
                e.delta.to_string(),
                e.query.clone(),
                e.hash.chars().take(12).collect(),
            ]
        })
        .collect();
    print_table(&mut out, &header, &body)?;
    writeln!(out, "head {head}")?;
    Ok(())
}

#[derive(Debug, clap::Subcommand)]
pub enum TrainingPolicyCommand {
    /// The site's training policy in force (TOML), and who set it when.
    Show {
        #[command(flatten)]
        node: LocalNode,
    },
    /// Replace the policy: from a TOML file, and/or KEY=VALUE changes to the current one
    /// (e.g. `enabled=true min_noise_multiplier=1.0 'study_admins=["sam"]'`). Audited.
    Set {
        /// A policy file (TOML).
        #[arg(long)]
        file: Option<std::path::PathBuf>,
        /// KEY=VALUE (TOML values) applied on top.
        changes: Vec<String>,
        #[command(flatten)]
        node: LocalNode,
    },
}

/// `cxrfed node training-policy show|set`.
pub async fn node_training_policy(command: TrainingPolicyCommand) -> anyhow::Result<ExitCode> {
    let show = |p: &pb::TrainingPolicy| {
        if !p.updated_at.is_empty() {
            println!("# set {} by {}", p.updated_at, p.updated_by);
        }
        print!("{}", p.policy_toml);
    };
    match command {
        TrainingPolicyCommand::Show { node } => {
            let mut client = node.connect().await?;
            let policy = client
                .get_training_policy(pb::GetTrainingPolicyRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            show(&policy);
        }
        TrainingPolicyCommand::Set {
            file,
            changes,
            node,
        } => {
            let mut client = node.connect().await?;
            let base = match &file {
                Some(path) => std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?,
                None => {
                    client
                        .get_training_policy(pb::GetTrainingPolicyRequest {})
                        .await
                        .map_err(status_error)?
                        .into_inner()
                        .policy_toml
                }
            };
            let mut table: toml::Table = base.parse().context("the policy is not TOML")?;
            for change in &changes {
                let (key, value) = change
                    .split_once('=')
                    .with_context(|| format!("{change:?} is not KEY=VALUE"))?;
                let parsed: toml::Table = format!("v = {value}")
                    .parse()
                    .or_else(|_| format!("v = {:?}", value).parse())
                    .with_context(|| format!("{change:?}: not a TOML value"))?;
                let value = parsed.get("v").cloned().context("no value")?;
                table.insert(key.trim().to_string(), value);
            }
            let policy_toml = toml::to_string(&table)?;
            cxrfed_fl::SitePolicy::parse(&policy_toml).map_err(|e| anyhow::anyhow!(e))?;
            let policy = client
                .set_training_policy(pb::TrainingPolicy {
                    policy_toml,
                    ..Default::default()
                })
                .await
                .map_err(status_error)?
                .into_inner();
            show(&policy);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `cxrfed node rollback`: back to the model that ran before the current one.
pub async fn node_rollback(node: LocalNode) -> anyhow::Result<ExitCode> {
    let mut client = node.connect().await?;
    let r = client
        .rollback_model(pb::RollbackModelRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    println!(
        "rolled back from {} to {}: {} record(s) restored from history, {} to re-extract (in the background; see `cxrfed node status`)",
        r.replaced, r.model_id, r.restored, r.reextracted
    );
    Ok(ExitCode::SUCCESS)
}
