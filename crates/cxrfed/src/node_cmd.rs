//! `cxrfed node status | stop | ingest | pull` (`cxrfed node serve` runs the `cxrfed-node` binary).
//! They read the node's PID file and talk to it over gRPC; none links node code.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use cxrfed_server::process::{self, last_lines};
use cxrfed_server::{Layout, ServerKind};

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Node data directory [default: the embedded default, see `node serve --help`].
    #[arg(long, env = "CXRFED_NODE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Credentials for the Status RPC (an admin certificate of the node's site).
    #[command(flatten)]
    credentials: crate::client::Credentials,
}

#[derive(Debug, Args)]
pub struct NodeIngestArgs {
    /// A folder on this machine's disk, ingested by the node itself (walked recursively).
    folder: PathBuf,
    /// Node data directory [default: the embedded default].
    #[arg(long, env = "CXRFED_NODE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Re-extract images the node already has.
    #[arg(long)]
    force: bool,
    /// Start the job and return (follow it with `cxrfed node status`).
    #[arg(long)]
    no_wait: bool,
    /// Credentials (the site admin).
    #[command(flatten)]
    credentials: crate::client::Credentials,
}

#[derive(Debug, Args)]
pub struct NodePullArgs {
    /// The PACS to query and retrieve from: AE@HOST:PORT. It must know the node's AE title
    /// and DICOM address (it sends the images there), and be on the node's dicom_allow.
    #[arg(long, value_name = "AE@HOST:PORT")]
    pacs: String,
    /// Query keys: StudyDate (YYYYMMDD or a range), Modality, BodyPartExamined, e.g.
    /// 'Modality=CR StudyDate=20240101-20241231 BodyPartExamined=CHEST'.
    #[arg(long, default_value = "")]
    query: String,
    /// At most this many instances.
    #[arg(long)]
    limit: Option<u64>,
    /// At most this many instances per second (default 5), so a clinical PACS is not flooded.
    #[arg(long)]
    rate: Option<f64>,
    /// The AE title the node calls the PACS as [default: the node's own, dicom_ae].
    #[arg(long, value_name = "AE")]
    calling_ae: Option<String>,
    /// Node data directory [default: the embedded default].
    #[arg(long, env = "CXRFED_NODE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Start the job and return (follow it with `cxrfed node status`).
    #[arg(long)]
    no_wait: bool,
    /// Credentials (the site admin).
    #[command(flatten)]
    credentials: crate::client::Credentials,
}

#[derive(Debug, Args)]
pub struct StopArgs {
    /// Node data directory [default: the embedded default].
    #[arg(long, env = "CXRFED_NODE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Seconds to wait for a graceful stop before the node is killed.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
}

fn layout(data_dir: Option<PathBuf>) -> Layout {
    ServerKind::Node.layout(data_dir.unwrap_or_else(|| ServerKind::Node.default_data_dir()))
}

/// The URL of the node running on `data_dir`, if one runs.
pub fn running_node_url(data_dir: &Path) -> Option<String> {
    process::running(&ServerKind::Node.layout(data_dir)).map(|p| p.local_url())
}

/// The local URL of the node running on a data directory, or why there is none.
fn local_url(data_dir: Option<PathBuf>) -> anyhow::Result<String> {
    let layout = layout(data_dir);
    match process::running(&layout) {
        Some(pid) => Ok(pid.local_url()),
        None => bail!(
            "no node is running on {}; start one with `cxrfed node serve`",
            layout.data_dir().display()
        ),
    }
}

/// `cxrfed node ingest FOLDER`: an ingest job inside the running node of a data directory.
pub fn ingest(args: NodeIngestArgs) -> anyhow::Result<ExitCode> {
    use cxrfed_proto::v1 as pb;
    let url = local_url(args.data_dir.clone())?;
    let folder = std::fs::canonicalize(&args.folder)
        .with_context(|| format!("{} is not a folder", args.folder.display()))?;
    crate::client::run(async move {
        let mut client = args.credentials.connect_node(Some(&url)).await?;
        let job = client
            .start_ingest(pb::StartIngestRequest {
                folder: folder.display().to_string(),
                force: args.force,
            })
            .await
            .map_err(crate::client::status_error)?
            .into_inner();
        println!("ingest job {} started", job.job_id);
        if args.no_wait {
            return Ok(ExitCode::SUCCESS);
        }
        follow(&mut client, job, "files").await
    })
}

/// `cxrfed node pull --pacs AE@HOST:PORT`: a pull job inside the running node.
pub fn pull(args: NodePullArgs) -> anyhow::Result<ExitCode> {
    use cxrfed_proto::v1 as pb;
    let url = local_url(args.data_dir.clone())?;
    crate::client::run(async move {
        let mut client = args.credentials.connect_node(Some(&url)).await?;
        let job = client
            .start_pull(pb::StartPullRequest {
                pacs: args.pacs.clone(),
                query: args.query.clone(),
                limit: args.limit.unwrap_or(0),
                rate: args.rate.unwrap_or(0.0),
                calling_ae: args.calling_ae.clone().unwrap_or_default(),
            })
            .await
            .map_err(crate::client::status_error)?
            .into_inner();
        println!("pull job {} started from {}", job.job_id, args.pacs);
        if args.no_wait {
            return Ok(ExitCode::SUCCESS);
        }
        follow(&mut client, job, "instances").await
    })
}

/// Follows a job with a progress bar until it ends; prints its summary.
async fn follow(
    client: &mut cxrfed_proto::v1::node_service_client::NodeServiceClient<
        tonic::transport::Channel,
    >,
    job: cxrfed_proto::v1::IngestJob,
    unit: &str,
) -> anyhow::Result<ExitCode> {
    use cxrfed_proto::v1 as pb;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{bar:30}} {{pos}}/{{len}} {unit}  {{msg}}"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let jobs = client
            .ingest_jobs(pb::IngestJobsRequest {
                job_id: job.job_id.clone(),
            })
            .await
            .map_err(crate::client::status_error)?
            .into_inner()
            .jobs;
        let Some(now) = jobs.into_iter().next() else {
            bail!("the node lost job {}", job.job_id);
        };
        bar.set_length(now.files_total);
        bar.set_position(now.files_done);
        bar.set_message(format!(
            "{:.1} {unit}/s, {} rejected",
            now.files_per_second, now.rejected
        ));
        if now.state != "running" {
            bar.finish_and_clear();
            println!("{}", describe_job(&now));
            return Ok(if now.state == "done" {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
    }
}

fn describe_job(job: &cxrfed_proto::v1::IngestJob) -> String {
    let mut text = if job.source.starts_with("pacs ") {
        format!(
            "pull job {} from {} {}: {}/{} instances, retrieved {}, pulled before {}, failed {} ({:.1} instances/s)",
            job.job_id,
            job.source.trim_start_matches("pacs "),
            job.state,
            job.files_done,
            job.files_total,
            job.ingested,
            job.already_present,
            job.rejected,
            job.files_per_second
        )
    } else {
        format!(
            "job {} {}: {}/{} files, ingested {}, already present {}, rejected {} ({:.1} files/s)",
            job.job_id,
            job.state,
            job.files_done,
            job.files_total,
            job.ingested,
            job.already_present,
            job.rejected,
            job.files_per_second
        )
    };
    for (reason, n) in &job.rejected_by_reason {
        text.push_str(&format!("\n    rejected {reason}: {n}"));
    }
    text
}

pub fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let layout = layout(args.data_dir);
    let data_dir = layout.data_dir();
    let logs = last_lines(&layout.log_file(), 5);
    let Some(pid) = process::read_pid_at(&layout.pid_path()) else {
        println!("node: not running (no PID file in {})", data_dir.display());
        print_logs(&logs);
        return Ok(ExitCode::from(3));
    };
    if !process::alive(pid.pid) {
        println!(
            "node: not running (stale PID file for pid {} in {})",
            pid.pid,
            data_dir.display()
        );
        print_logs(&logs);
        return Ok(ExitCode::from(3));
    }
    println!("node: running");
    println!("  pid:            {}", pid.pid);
    println!("  listen:         {}", pid.listen);
    println!("  data directory: {}", data_dir.display());
    println!(
        "  transport:      {}",
        if pid.tls {
            "mutual TLS"
        } else {
            "PLAINTEXT (--insecure-dev)"
        }
    );
    let url = pid.local_url();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match runtime.block_on(crate::client::node_status(&url, &args.credentials)) {
        Ok(s) => {
            println!("  site:           {}", s.site);
            println!("  version:        {}", s.version);
            println!(
                "  uptime:         {}",
                humanize(Duration::from_secs(s.uptime_seconds))
            );
            println!("  records:        {}", s.record_count);
            println!("  store size:     {} bytes", s.store_size_bytes);
            println!("  schema version: {}", s.schema_version);
            println!("  model:          {}", s.model_id);
            if let Some(m) = &s.model {
                println!(
                    "  inference:      {} on {}, {} images in {} batches (max {}), {} refused, {} queued",
                    m.architecture,
                    m.device,
                    m.images,
                    m.batches,
                    m.max_batch_seen,
                    m.rejected,
                    m.queued
                );
            }
            println!("  in flight:      {}", s.in_flight);
            if let Some(b) = &s.backfill {
                println!(
                    "  back-fill:      {} with {}: {} of {} records re-extracted ({} skipped: no kept input, {} failed)",
                    b.state, b.model_id, b.done, b.total, b.skipped, b.failed
                );
            }
            if let Some(link) = &s.coordinator_link {
                if link.connected {
                    println!("  coordinator:    linked to {}", link.url);
                } else {
                    println!(
                        "  coordinator:    NOT linked to {}: {}",
                        link.url, link.last_error
                    );
                }
            }
            if let Some(d) = &s.dicom_receiver {
                println!(
                    "  DICOM:          {} on {}{}: {} associations ({} active), {} echoes; \
                     {} instances received, {} stored, {} already present",
                    d.ae_title,
                    d.listen,
                    if d.tls { " (TLS)" } else { "" },
                    d.associations_total,
                    d.associations_active,
                    d.echoes,
                    d.instances_received,
                    d.instances_stored,
                    d.instances_duplicate
                );
                if !d.associations_rejected.is_empty() {
                    println!("  DICOM rejected: {}", counts(&d.associations_rejected));
                }
                if !d.instances_refused.is_empty() {
                    println!("  DICOM refused:  {}", counts(&d.instances_refused));
                }
            }
            for job in &s.ingest_jobs {
                if job.source.starts_with("pacs ") {
                    println!("  {}", describe_job(job));
                } else {
                    println!("  ingest {}", describe_job(job));
                }
            }
        }
        Err(e) => println!("  status RPC:     unavailable ({e:#})"),
    }
    print_logs(&logs);
    Ok(ExitCode::SUCCESS)
}

/// "reason: n, reason: n" in the map's order.
fn counts(map: &std::collections::BTreeMap<String, u64>) -> String {
    map.iter()
        .map(|(reason, n)| format!("{reason}: {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_logs(lines: &[String]) {
    if !lines.is_empty() {
        println!("last log lines:");
        for line in lines {
            println!("  {line}");
        }
    }
}

fn humanize(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}h {:02}m {:02}s", s / 3600, s / 60 % 60, s % 60)
}

pub fn stop(args: StopArgs) -> anyhow::Result<ExitCode> {
    process::stop(&layout(args.data_dir), Duration::from_secs(args.timeout))
}
