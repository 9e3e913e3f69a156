//! `cxrfed node serve | status | stop`.

use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use cxrfed_node::NodeConfig;
use cxrfed_node::config::{default_data_dir, log_dir, pid_path};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Args, Serialize)]
pub struct ServeArgs {
    /// TOML configuration file (keys as in NodeConfig: data_dir, listen, site, max_file_bytes, ...).
    #[arg(long, env = "CXRFED_CONFIG")]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Data directory (store, site secret, logs, PID file) [default: ~/.local/share/cxrfed/node].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir: Option<PathBuf>,
    /// Listen address [default: 127.0.0.1:50051].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<SocketAddr>,
    /// Site name [default: local].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    site: Option<String>,
    /// Largest accepted upload in bytes [default: 268435456].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_file_bytes: Option<u64>,
    /// Largest accepted image rows [default: 8192].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_rows: Option<u32>,
    /// Largest accepted image columns [default: 8192].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_columns: Option<u32>,
    /// Model input size in pixels [default: 224].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    input_size: Option<u32>,
    /// Aspect handling for the model input: pad or center-crop [default: pad].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    aspect: Option<String>,
    /// Images decoded concurrently [default: number of CPUs].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    decode_workers: Option<usize>,
    /// Seconds in-flight requests get after SIGTERM [default: 20].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    grace_period_secs: Option<u64>,
    /// Log filter, e.g. info or debug [default: info].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    log_level: Option<String>,
    /// Model directory (card.json + weights), "bundled" (the phantom-trained tiny model built
    /// into the binary) or "none" [default: bundled].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<String>,
    /// Inference device: auto (CUDA when available), cpu, cuda, cuda:N [default: auto].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<String>,
    /// Largest inference batch [default: 16].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_batch: Option<usize>,
    /// Longest wait for an inference batch to fill, ms [default: 5].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_wait_ms: Option<u64>,
    /// Requests that may wait for inference before RESOURCE_EXHAUSTED [default: 64].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    inference_queue: Option<usize>,
    /// The study CA certificate client certificates must chain to (PEM).
    #[arg(long, env = "CXRFED_CA")]
    #[serde(skip_serializing_if = "Option::is_none")]
    ca: Option<PathBuf>,
    /// The node's certificate (PEM, role node; `cxrfed certs issue --role node`).
    #[arg(long, env = "CXRFED_CERT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    cert: Option<PathBuf>,
    /// The node's private key (PEM; refused unless mode 0600 or stricter).
    #[arg(long, env = "CXRFED_KEY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<PathBuf>,
    /// The study CA's revocation list [default: crl.pem next to --ca, when present].
    #[arg(long, env = "CXRFED_CRL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    crl: Option<PathBuf>,
    /// Plaintext gRPC without client authentication, every caller treated as the site admin.
    /// Development only; refused on a non-loopback address.
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    insecure_dev: bool,
    /// How often certificate, key, CA and CRL files are checked for changes, ms [default: 2000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_reload_ms: Option<u64>,
    /// Records one patient may contribute to a DP release (k) [default: 1].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    dp_contributions: Option<u32>,
    /// Noisy DP counts below this are withheld [default: 10].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    dp_suppress_below: Option<u64>,
    /// Epsilon budget of identities the admin has not set one for [default: 0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    dp_default_epsilon: Option<f64>,
    /// The study coordinator to dial out to (https://HOST:PORT) for federated queries.
    #[arg(long, env = "CXRFED_COORDINATOR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    coordinator: Option<String>,
    /// Start in the background and return once the node accepts connections.
    #[arg(long)]
    #[serde(skip)]
    detach: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Node data directory [default: the embedded default, see `node serve --help`].
    #[arg(long, env = "CXRFED_DATA_DIR")]
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
    #[arg(long, env = "CXRFED_DATA_DIR")]
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
pub struct StopArgs {
    /// Node data directory [default: the embedded default].
    #[arg(long, env = "CXRFED_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Seconds to wait for a graceful stop before the node is killed.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
}

/// Written next to the store while a node runs.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct PidFile {
    pub(crate) pid: u32,
    pub(crate) listen: SocketAddr,
    pub(crate) started_at: String,
    /// Whether the node speaks TLS (false only under --insecure-dev).
    #[serde(default = "default_true")]
    pub(crate) tls: bool,
}

fn default_true() -> bool {
    true
}

fn read_pid_file(data_dir: &Path) -> Option<PidFile> {
    read_pid_at(&pid_path(data_dir))
}

/// The PID file at `path`, if readable.
pub(crate) fn read_pid_at(path: &Path) -> Option<PidFile> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// Whether `pid` is a live process (a zombie, exited but not yet reaped, is not).
pub(crate) fn alive(pid: u32) -> bool {
    let signalable = i32::try_from(pid).is_ok_and(|pid| kill(Pid::from_raw(pid), None).is_ok());
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false);
    signalable && !zombie
}

pub fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let config = NodeConfig::load(args.config.as_deref(), &args)?;
    if let Some(running) = read_pid_file(&config.data_dir).filter(|p| alive(p.pid)) {
        bail!(
            "a node is already running on {} (pid {}, listening on {}); stop it with `cxrfed node stop --data-dir {}`",
            config.data_dir.display(),
            running.pid,
            running.listen,
            config.data_dir.display()
        );
    }
    if args.detach {
        return detach_process(&config.data_dir, &config.pid_path(), "node");
    }
    let _guard = crate::logging::init_node(&config.log_dir(), &config.log_level)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run_node(config))?;
    Ok(ExitCode::SUCCESS)
}

async fn run_node(mut config: NodeConfig) -> anyhow::Result<()> {
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(listener) => listener,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => bail!(
            "port {} on {} is already in use (another cxrfed node?). Stop that process \
             (`cxrfed node status` / `cxrfed node stop --data-dir DIR`) or choose another port with --listen {}:PORT",
            config.listen.port(),
            config.listen.ip(),
            config.listen.ip()
        ),
        Err(e) => return Err(e).with_context(|| format!("cannot listen on {}", config.listen)),
    };
    // With port 0 the kernel picks the port: report the real one.
    config.listen = listener.local_addr()?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    let pid_file = PidFile {
        pid: std::process::id(),
        listen: config.listen,
        started_at: chrono::Utc::now().to_rfc3339(),
        tls: !config.insecure_dev,
    };
    let pid_path = config.pid_path();
    std::fs::write(&pid_path, serde_json::to_vec(&pid_file)?)
        .with_context(|| format!("cannot write {}", pid_path.display()))?;

    let shutdown = shutdown_on_signals();
    let result = cxrfed_node::serve(config, listener, shutdown).await;
    // Only remove our own PID file.
    if read_pid_file(pid_path.parent().unwrap_or(Path::new(".")))
        .is_some_and(|p| p.pid == std::process::id())
    {
        let _ = std::fs::remove_file(&pid_path);
    }
    result.map_err(Into::into)
}

/// A token cancelled by SIGTERM or SIGINT (call inside the runtime).
pub(crate) fn shutdown_on_signals() -> CancellationToken {
    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!(signal = "SIGTERM", "stop requested"),
            _ = int.recv() => tracing::info!(signal = "SIGINT", "stop requested"),
        }
        signals.cancel();
    });
    shutdown
}

/// Re-executes this `serve` command without `--detach` in a new session, with output to
/// `logs/serve.out`, and waits until it accepts connections (a node or the coordinator).
pub(crate) fn detach_process(
    data_dir: &Path,
    pid_path: &Path,
    what: &str,
) -> anyhow::Result<ExitCode> {
    use std::os::unix::process::CommandExt;
    let logs = log_dir(data_dir);
    std::fs::create_dir_all(&logs)?;
    let out_path = logs.join("serve.out");
    let out = std::fs::File::create(&out_path)?;
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--detach")
        .collect();
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args(&args)
        .env("CXRFED_DATA_DIR", data_dir)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start the {what} process"))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            let tail = last_lines(&out_path, 10).join("\n");
            bail!("the {what} exited during start-up ({status}):\n{tail}");
        }
        if let Some(pid) = read_pid_at(pid_path).filter(|p| p.pid == child.id())
            && std::net::TcpStream::connect_timeout(&pid.listen, Duration::from_millis(200)).is_ok()
        {
            println!(
                "{what} started: pid {}, listening on {}, data directory {}",
                pid.pid,
                pid.listen,
                data_dir.display()
            );
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "the {what} did not accept connections within 60 s; see {}",
        out_path.display()
    )
}

/// The last `n` lines of a file, reading only its end.
pub(crate) fn last_lines(path: &Path, n: usize) -> Vec<String> {
    let Ok(mut file) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let lines: Vec<String> = BufReader::new(file).lines().map_while(Result::ok).collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

/// How a client on this machine reaches the node of a PID file. A node listening on every
/// interface is reached on loopback (its certificate always names 127.0.0.1).
pub(crate) fn local_url(pid: &PidFile) -> String {
    let mut target = pid.listen;
    if target.ip().is_unspecified() {
        target.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    format!("{}://{}", if pid.tls { "https" } else { "http" }, target)
}

/// The URL of the node running on `data_dir`, if one runs.
pub fn running_node_url(data_dir: &Path) -> Option<String> {
    read_pid_file(data_dir)
        .filter(|p| alive(p.pid))
        .map(|p| local_url(&p))
}

/// `cxrfed node ingest FOLDER`: an ingest job inside the running node of a data directory.
pub fn ingest(args: NodeIngestArgs) -> anyhow::Result<ExitCode> {
    use cxrfed_proto::v1 as pb;
    let data_dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
    let Some(pid) = read_pid_file(&data_dir).filter(|p| alive(p.pid)) else {
        bail!(
            "no node is running on {}; start one with `cxrfed node serve`",
            data_dir.display()
        );
    };
    let folder = std::fs::canonicalize(&args.folder)
        .with_context(|| format!("{} is not a folder", args.folder.display()))?;
    let url = local_url(&pid);
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
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} files  {msg}")
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
                "{:.1} files/s, {} rejected",
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
    })
}

fn describe_job(job: &cxrfed_proto::v1::IngestJob) -> String {
    let mut text = format!(
        "job {} {}: {}/{} files, ingested {}, already present {}, rejected {} ({:.1} files/s)",
        job.job_id,
        job.state,
        job.files_done,
        job.files_total,
        job.ingested,
        job.already_present,
        job.rejected,
        job.files_per_second
    );
    for (reason, n) in &job.rejected_by_reason {
        text.push_str(&format!("\n    rejected {reason}: {n}"));
    }
    text
}

pub fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let data_dir = args.data_dir.unwrap_or_else(default_data_dir);
    let logs = last_lines(&log_dir(&data_dir).join("node.log"), 5);
    let Some(pid) = read_pid_file(&data_dir) else {
        println!("node: not running (no PID file in {})", data_dir.display());
        print_logs(&logs);
        return Ok(ExitCode::from(3));
    };
    if !alive(pid.pid) {
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
    // A node listening on every interface is reached on loopback (its certificate always
    // names 127.0.0.1).
    let mut target = pid.listen;
    if target.ip().is_unspecified() {
        target.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let url = format!("{}://{}", if pid.tls { "https" } else { "http" }, target);
    println!(
        "  transport:      {}",
        if pid.tls {
            "mutual TLS"
        } else {
            "PLAINTEXT (--insecure-dev)"
        }
    );
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
            for job in &s.ingest_jobs {
                println!("  ingest {}", describe_job(job));
            }
        }
        Err(e) => println!("  status RPC:     unavailable ({e:#})"),
    }
    print_logs(&logs);
    Ok(ExitCode::SUCCESS)
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
    let data_dir = args.data_dir.unwrap_or_else(default_data_dir);
    stop_process(&data_dir, &pid_path(&data_dir), "node", args.timeout)
}

/// SIGTERM to the process of a PID file, SIGKILL after `timeout` seconds.
pub(crate) fn stop_process(
    data_dir: &Path,
    path: &Path,
    what: &str,
    timeout: u64,
) -> anyhow::Result<ExitCode> {
    let path = path.to_path_buf();
    let Some(pid_file) = read_pid_at(&path) else {
        println!(
            "{what}: not running (no PID file in {})",
            data_dir.display()
        );
        return Ok(ExitCode::SUCCESS);
    };
    if !alive(pid_file.pid) {
        std::fs::remove_file(&path).ok();
        println!(
            "{what}: not running (removed stale PID file for pid {})",
            pid_file.pid
        );
        return Ok(ExitCode::SUCCESS);
    }
    let pid = Pid::from_raw(i32::try_from(pid_file.pid)?);
    kill(pid, Signal::SIGTERM).with_context(|| format!("cannot signal the {what}"))?;
    let deadline = Instant::now() + Duration::from_secs(timeout);
    while Instant::now() < deadline {
        if !alive(pid_file.pid) {
            std::fs::remove_file(&path).ok();
            println!("{what} stopped (pid {})", pid_file.pid);
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "{what} did not stop within {timeout} s; killing pid {}",
        pid_file.pid
    );
    kill(pid, Signal::SIGKILL).ok();
    std::thread::sleep(Duration::from_millis(200));
    std::fs::remove_file(&path).ok();
    Ok(ExitCode::from(2))
}
