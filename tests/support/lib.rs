//! Shared helpers for the end-to-end suites: the project's virtualenv (pydicom and its test
//! data), the real `cxrfed` binary, and a node process on a loopback port.

#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// The project virtualenv's Python, which `make venv` (part of `make test`) creates.
pub fn venv_python() -> PathBuf {
    let python = workspace_root().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run the suite with `make test`, which creates the virtualenv (pydicom, pydicom-data)",
        python.display()
    );
    python
}

/// Directory of the pydicom-data package's files (RG1_*.dcm and friends).
pub fn pydicom_data_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        python_path("import data_store, os; print(os.path.join(os.path.dirname(data_store.__file__), 'data'))")
    })
    .clone()
}

/// Directory of pydicom's own test files.
pub fn pydicom_test_files_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        python_path("import pydicom, os; print(os.path.join(os.path.dirname(pydicom.__file__), 'data', 'test_files'))")
    })
    .clone()
}

fn python_path(code: &str) -> PathBuf {
    let out = Command::new(venv_python()).args(["-c", code]).output().expect("run python");
    assert!(out.status.success(), "python failed: {}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// The real `cxrfed` binary, built by `cargo build` (the Makefile builds it before the suites).
pub fn cxrfed_bin() -> PathBuf {
    if let Ok(path) = std::env::var("CXRFED_BIN") {
        return PathBuf::from(path);
    }
    // target/debug/deps/<test binary> -> target/debug/cxrfed
    let exe = std::env::current_exe().expect("current exe");
    let bin = exe.parent().and_then(Path::parent).expect("target dir").join("cxrfed");
    assert!(bin.exists(), "{} is missing: run `cargo build -p cxrfed` first (`make test` does)", bin.display());
    bin
}

/// Runs `cxrfed ARGS...` to completion.
pub fn cxrfed(args: &[&str]) -> std::process::Output {
    Command::new(cxrfed_bin()).args(args).stdin(Stdio::null()).output().expect("run cxrfed")
}

/// A free loopback port (bound then released; good enough for tests on one machine).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A `cxrfed node serve` child process.
#[derive(Debug)]
pub struct NodeProcess {
    pub child: Child,
    pub data_dir: PathBuf,
    pub port: u16,
}

impl NodeProcess {
    /// Starts a node on a fresh loopback port and waits until it accepts connections.
    pub fn start(data_dir: &Path, extra: &[&str]) -> NodeProcess {
        Self::start_on(data_dir, free_port(), extra)
    }

    pub fn start_on(data_dir: &Path, port: u16, extra: &[&str]) -> NodeProcess {
        let listen = format!("127.0.0.1:{port}");
        let mut args = vec!["node", "serve", "--data-dir", data_dir.to_str().expect("utf-8 path"), "--listen", &listen];
        args.extend_from_slice(extra);
        let child = Command::new(cxrfed_bin())
            .args(&args)
            .env_remove("CXRFED_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn node");
        let mut node = NodeProcess { child, data_dir: data_dir.to_path_buf(), port };
        node.wait_ready();
        node
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                let mut err = String::new();
                if let Some(stderr) = self.child.stderr.take() {
                    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                        err.push_str(&line);
                        err.push('\n');
                    }
                }
                panic!("node exited during start-up ({status}): {err}");
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("node did not start listening within 60 s");
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn data_dir_str(&self) -> &str {
        self.data_dir.to_str().expect("utf-8 path")
    }

    /// SIGKILL: no drain, no flush.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit (after `cxrfed node stop`, say).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
