//! A server process on its data directory: the PID file it writes while it runs, start in the
//! background (`--detach`), stop (SIGTERM, then SIGKILL), and the shutdown token the signals
//! cancel. The CLI's `node status|stop` and `coordinator status|stop` read the same files
//! without linking any server code.

use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::layout::Layout;

/// Written next to the store while a server runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PidFile {
    pub pid: u32,
    pub listen: SocketAddr,
    pub started_at: String,
    /// Whether the server speaks TLS (false only under --insecure-dev).
    #[serde(default = "default_true")]
    pub tls: bool,
}

fn default_true() -> bool {
    true
}

impl PidFile {
    /// How a client on this machine reaches the server of this PID file. A server listening
    /// on every interface is reached on loopback (its certificate always names 127.0.0.1).
    pub fn local_url(&self) -> String {
        let mut target = self.listen;
        if target.ip().is_unspecified() {
            target.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        format!("{}://{}", if self.tls { "https" } else { "http" }, target)
    }
}

/// The PID file at `path`, if readable.
pub fn read_pid_at(path: &Path) -> Option<PidFile> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// The PID file of a server that is running now.
pub fn running(layout: &Layout) -> Option<PidFile> {
    read_pid_at(&layout.pid_path()).filter(|p| alive(p.pid))
}

/// Whether `pid` is a live process (a zombie, exited but not yet reaped, is not).
pub fn alive(pid: u32) -> bool {
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

/// Refuses to start a second server on the same data directory.
pub fn refuse_if_running(layout: &Layout) -> anyhow::Result<()> {
    if let Some(running) = running(layout) {
        let what = layout.kind().name();
        bail!(
            "a {what} is already running on {} (pid {}, listening on {}); stop it with `cxrfed {what} stop --data-dir {}`",
            layout.data_dir().display(),
            running.pid,
            running.listen,
            layout.data_dir().display()
        );
    }
    Ok(())
}

/// The PID file of this process while it serves: written on creation, removed on drop (only
/// if it is still this process's own).
#[derive(Debug)]
pub struct PidGuard {
    path: std::path::PathBuf,
}

impl PidGuard {
    pub fn write(layout: &Layout, listen: SocketAddr, tls: bool) -> anyhow::Result<PidGuard> {
        std::fs::create_dir_all(layout.data_dir()).with_context(|| {
            format!(
                "cannot create data directory {}",
                layout.data_dir().display()
            )
        })?;
        let pid = PidFile {
            pid: std::process::id(),
            listen,
            started_at: chrono::Utc::now().to_rfc3339(),
            tls,
        };
        let path = layout.pid_path();
        std::fs::write(&path, serde_json::to_vec(&pid)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(PidGuard { path })
    }
}

impl Drop for PidGuard {
    fn drop(&mut self) {
        if read_pid_at(&self.path).is_some_and(|p| p.pid == std::process::id()) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A token cancelled by SIGTERM or SIGINT (call inside the runtime).
pub fn shutdown_on_signals() -> CancellationToken {
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

/// Re-executes this process's `serve` command without `--detach` in a new session, with
/// output to `logs/serve.out`, and waits until it accepts connections.
pub fn detach(layout: &Layout) -> anyhow::Result<ExitCode> {
    use std::os::unix::process::CommandExt;
    let what = layout.kind().name();
    let logs = layout.log_dir();
    std::fs::create_dir_all(&logs)?;
    let out_path = logs.join("serve.out");
    let out = std::fs::File::create(&out_path)?;
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--detach")
        .collect();
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args(&args)
        .env(layout.kind().data_dir_env(), layout.data_dir())
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
        if let Some(pid) = read_pid_at(&layout.pid_path()).filter(|p| p.pid == child.id())
            && std::net::TcpStream::connect_timeout(&pid.listen, Duration::from_millis(200)).is_ok()
        {
            println!(
                "{what} started: pid {}, listening on {}, data directory {}",
                pid.pid,
                pid.listen,
                layout.data_dir().display()
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

/// SIGTERM to the server of a data directory, SIGKILL after `timeout` seconds. Exit code 2
/// when it had to be killed.
pub fn stop(layout: &Layout, timeout: Duration) -> anyhow::Result<ExitCode> {
    let what = layout.kind().name();
    let path = layout.pid_path();
    let Some(pid_file) = read_pid_at(&path) else {
        println!(
            "{what}: not running (no PID file in {})",
            layout.data_dir().display()
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
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !alive(pid_file.pid) {
            std::fs::remove_file(&path).ok();
            println!("{what} stopped (pid {})", pid_file.pid);
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "{what} did not stop within {} s; killing pid {}",
        timeout.as_secs(),
        pid_file.pid
    );
    kill(pid, Signal::SIGKILL).ok();
    std::thread::sleep(Duration::from_millis(200));
    std::fs::remove_file(&path).ok();
    Ok(ExitCode::from(2))
}

/// The last `n` lines of a file, reading only its end.
pub fn last_lines(path: &Path, n: usize) -> Vec<String> {
    let Ok(mut file) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let lines: Vec<String> = BufReader::new(file).lines().map_while(Result::ok).collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

/// How a server process runs on its data directory.
#[derive(Debug, Clone)]
pub struct Launch {
    pub layout: Layout,
    pub listen: SocketAddr,
    pub log_level: String,
    /// Whether clients reach it over TLS (false only under --insecure-dev).
    pub tls: bool,
    /// Start in the background and return once it accepts connections.
    pub detach: bool,
}

impl Launch {
    /// Refuses a second server on the data directory, detaches when asked, else logs, binds
    /// (port 0: the kernel's choice, reported), writes the PID file, and serves
    /// `serve(listener, bound address, shutdown)` until SIGTERM or SIGINT.
    pub fn run<F, Fut, E>(self, serve: F) -> anyhow::Result<ExitCode>
    where
        F: FnOnce(tokio::net::TcpListener, SocketAddr, CancellationToken) -> Fut,
        Fut: std::future::Future<Output = Result<(), E>>,
        E: Into<anyhow::Error>,
    {
        refuse_if_running(&self.layout)?;
        if self.detach {
            return detach(&self.layout);
        }
        let _guard = crate::logging::init_server(&self.layout, &self.log_level)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let listener = bind(self.listen, &self.layout).await?;
            let bound = listener.local_addr()?;
            let _pid = PidGuard::write(&self.layout, bound, self.tls)?;
            let shutdown = shutdown_on_signals();
            serve(listener, bound, shutdown).await.map_err(Into::into)
        })?;
        Ok(ExitCode::SUCCESS)
    }
}

/// Binds the listen address with a message that names the way out when the port is taken.
pub async fn bind(listen: SocketAddr, layout: &Layout) -> anyhow::Result<tokio::net::TcpListener> {
    let what = layout.kind().name();
    match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => Ok(listener),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => bail!(
            "port {} on {} is already in use (another cxrfed {what}?). Stop that process \
             (`cxrfed {what} status` / `cxrfed {what} stop --data-dir DIR`) or choose another port with --listen {}:PORT",
            listen.port(),
            listen.ip(),
            listen.ip()
        ),
        Err(e) => Err(e).with_context(|| format!("cannot listen on {listen}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_guard_removes_only_its_own_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let layout = crate::ServerKind::Node.layout(dir.path());
        let listen: SocketAddr = "0.0.0.0:5000".parse().expect("addr");
        let guard = PidGuard::write(&layout, listen, true).expect("write");
        let pid = running(&layout).expect("this process runs");
        assert_eq!(pid.pid, std::process::id());
        assert_eq!(pid.local_url(), "https://127.0.0.1:5000");
        drop(guard);
        assert!(!layout.pid_path().exists());
        // Another process's file is left alone.
        std::fs::write(
            layout.pid_path(),
            br#"{"pid":1,"listen":"127.0.0.1:1","started_at":"x"}"#,
        )
        .expect("write");
        drop(PidGuard {
            path: layout.pid_path(),
        });
        assert!(layout.pid_path().exists());
    }
}
