//! Shared helpers for the end-to-end suites: the project's virtualenv (pydicom and its test
//! data), the real `cxrfed` binary, and a node process on a loopback port.

#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cxrfed_auth::pki::{self, IssueRequest, StudyCa};
use cxrfed_auth::{ClientCredentials, Role};

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
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

/// Runs a repository Python script (an SDK driver under tests/helpers, an example) with the
/// virtualenv's Python, without the caller's CXRFED_PROFILE; asserts it succeeded and returns
/// its standard output.
pub fn run_python(script: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(venv_python())
        .arg(workspace_root().join(script))
        .args(args)
        .env_remove("CXRFED_PROFILE")
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "{script}: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
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
    let out = Command::new(venv_python())
        .args(["-c", code])
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// The real `cxrfed` binary, built by `cargo build` (the Makefile builds it before the suites).
pub fn cxrfed_bin() -> PathBuf {
    if let Ok(path) = std::env::var("CXRFED_BIN") {
        return PathBuf::from(path);
    }
    // target/debug/deps/<test binary> -> target/debug/cxrfed
    let exe = std::env::current_exe().expect("current exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("cxrfed");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p cxrfed` first (`make test` does)",
        bin.display()
    );
    bin
}

/// Runs `cxrfed ARGS...` to completion.
pub fn cxrfed(args: &[&str]) -> std::process::Output {
    Command::new(cxrfed_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run cxrfed")
}

/// Lossy UTF-8 of a process's output, for assertions and messages.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Every file below `dir`, concatenated, for byte searches over sled files and logs.
pub fn all_bytes(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                out.extend(bytes);
            }
        }
    }
    out
}

/// Whether `needle` occurs in `haystack`, ASCII case-insensitively.
pub fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

/// `cxrfed phantom --out DIR --count N --seed S --max-size PX`: phantoms with their labels.
pub fn write_phantoms(dir: &Path, count: u32, seed: u32, max_size: u32) {
    let out = cxrfed(&[
        "phantom",
        "--out",
        dir.to_str().expect("utf-8 path"),
        "--count",
        &count.to_string(),
        "--seed",
        &seed.to_string(),
        "--max-size",
        &max_size.to_string(),
    ]);
    assert!(out.status.success(), "phantom: {}", text(&out.stderr));
}

/// A free loopback port (bound then released; good enough for tests on one machine).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A study CA with certificates issued on demand, as a test harness (and the demo) uses one:
/// `ROOT/ca` holds the CA, `ROOT/NAME` each issued identity (cert.pem, key.pem, profile.toml).
#[derive(Debug, Clone)]
pub struct TestPki {
    pub root: PathBuf,
}

impl TestPki {
    /// Opens the CA under `root`, creating it (study `e2e`) the first time.
    pub fn at(root: &Path) -> TestPki {
        if !root.join("ca").join(pki::CA_CERT).exists() {
            pki::init_ca(&root.join("ca"), "e2e", 30).expect("init CA");
        }
        TestPki {
            root: root.to_path_buf(),
        }
    }

    pub fn ca(&self) -> StudyCa {
        StudyCa::open(&self.root.join("ca")).expect("open CA")
    }

    pub fn ca_pem(&self) -> PathBuf {
        self.root.join("ca").join(pki::CA_CERT)
    }

    pub fn crl(&self) -> PathBuf {
        self.root.join("ca").join(pki::CA_CRL)
    }

    /// The directory of identity `name` (issued once; reused afterwards).
    pub fn identity(&self, role: Role, name: &str, site: Option<&str>) -> PathBuf {
        let dir = self.root.join(name);
        if !dir.join(pki::CERT).exists() {
            self.ca()
                .issue(&IssueRequest::new(role, name, site, 30), &dir)
                .expect("issue certificate");
        }
        dir
    }

    pub fn credentials(&self, dir: &Path) -> ClientCredentials {
        ClientCredentials {
            ca: self.ca_pem(),
            cert: Some(dir.join(pki::CERT)),
            key: Some(dir.join(pki::KEY)),
        }
    }
}

/// A `cxrfed node serve` child process, serving mutual TLS with certificates of a per-test
/// study CA (kept in `DATA_DIR/pki`, so a restarted node keeps its identity).
#[derive(Debug)]
pub struct NodeProcess {
    pub child: Child,
    pub data_dir: PathBuf,
    pub port: u16,
    pub pki: TestPki,
    /// The admin of the node's site: what the tests call the node as.
    pub admin: PathBuf,
}

impl NodeProcess {
    /// Starts a node on a fresh loopback port and waits until it accepts connections.
    pub fn start(data_dir: &Path, extra: &[&str]) -> NodeProcess {
        Self::start_on(data_dir, free_port(), extra)
    }

    /// Starts a node expected to fail start-up; returns its stderr.
    pub fn start_failure(args: &[&str]) -> String {
        let mut child = Command::new(cxrfed_bin())
            .args(args)
            .env_remove("CXRFED_NODE_CONFIG")
            .env_remove("CXRFED_COORDINATOR_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run cxrfed");
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Ok(Some(status)) = child.try_wait() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("`cxrfed {}` started instead of refusing", args.join(" "));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(!status.success(), "start-up should fail");
        let mut err = String::new();
        if let Some(stderr) = child.stderr.take() {
            use std::io::Read;
            let _ = BufReader::new(stderr).read_to_string(&mut err);
        }
        err
    }

    pub fn start_on(data_dir: &Path, port: u16, extra: &[&str]) -> NodeProcess {
        Self::start_in(data_dir, port, TestPki::at(&data_dir.join("pki")), extra)
    }

    /// Starts a node with certificates of a shared study CA (a federation's sites).
    pub fn start_in(data_dir: &Path, port: u16, pki: TestPki, extra: &[&str]) -> NodeProcess {
        let listen = format!("127.0.0.1:{port}");
        let site = extra
            .iter()
            .position(|a| *a == "--site")
            .and_then(|i| extra.get(i + 1))
            .copied()
            .unwrap_or("local");
        let node = pki.identity(Role::Node, &format!("node-{site}"), Some(site));
        let admin = pki.identity(Role::Admin, &format!("admin-{site}"), Some(site));
        let (ca, crl) = (pki.ca_pem(), pki.crl());
        let (cert, key) = (node.join(pki::CERT), node.join(pki::KEY));
        let mut args = vec![
            "node",
            "serve",
            "--data-dir",
            data_dir.to_str().expect("utf-8 path"),
            "--listen",
            &listen,
            "--ca",
            ca.to_str().expect("utf-8 path"),
            "--crl",
            crl.to_str().expect("utf-8 path"),
            "--cert",
            cert.to_str().expect("utf-8 path"),
            "--key",
            key.to_str().expect("utf-8 path"),
            "--tls-reload-ms",
            "200",
        ];
        args.extend_from_slice(extra);
        let child = Command::new(cxrfed_bin())
            .args(&args)
            .env_remove("CXRFED_NODE_CONFIG")
            .env_remove("CXRFED_COORDINATOR_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn node");
        let mut node = NodeProcess {
            child,
            data_dir: data_dir.to_path_buf(),
            port,
            pki,
            admin,
        };
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
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The site admin's profile file, for `cxrfed ... --profile`.
    pub fn profile(&self) -> String {
        self.admin
            .join(pki::PROFILE)
            .to_str()
            .expect("utf-8 path")
            .to_string()
    }

    /// Runs a client command (`records`, `extract`, ...) against this node as the site admin:
    /// `cxrfed ARGS... --node URL --profile ADMIN_PROFILE`.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        let (url, profile) = (self.url(), self.profile());
        let mut all = args.to_vec();
        all.extend(["--node", &url, "--profile", &profile]);
        cxrfed(&all)
    }

    /// A mutual-TLS channel as the site admin.
    pub async fn channel(&self) -> tonic::transport::Channel {
        self.channel_as(&self.admin).await
    }

    /// A mutual-TLS channel as the identity in `dir` (see [`TestPki::identity`]).
    pub async fn channel_as(&self, dir: &Path) -> tonic::transport::Channel {
        cxrfed_auth::client::connect(&self.url(), Some(&self.pki.credentials(dir)))
            .await
            .expect("connect to node")
    }

    /// The site opts in to training on terms loose enough for phantom-sized datasets.
    pub fn allow_phantom_training(&self) -> String {
        self.training_policy(&[
            "enabled=true",
            "min_batch_size=2",
            "min_local_steps=1",
            "min_held_out=1",
            "max_metrics_epsilon=10",
        ])
    }

    /// Sets the site's training policy through `cxrfed node training-policy set KEY=VALUE...`
    /// (as its site admin) and returns what the CLI printed.
    pub fn training_policy(&self, changes: &[&str]) -> String {
        let profile = self.profile();
        let mut args = vec![
            "node",
            "training-policy",
            "set",
            "--data-dir",
            self.data_dir_str(),
            "--profile",
            &profile,
        ];
        args.extend(changes);
        let out = cxrfed(&args);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    }

    /// Sets the training account's budget at this site (`--identity training`).
    pub fn training_budget(&self, epsilon: f64, delta: f64) {
        self.budget("training", &epsilon.to_string(), Some(&delta.to_string()));
    }

    /// `cxrfed node budget set` as the site admin: `identity`'s total epsilon at this node.
    pub fn set_budget(&self, identity: &str, epsilon: &str) {
        self.budget(identity, epsilon, None);
    }

    /// `cxrfed node budget set` as the site admin, with a total delta when given.
    fn budget(&self, identity: &str, epsilon: &str, delta: Option<&str>) {
        let profile = self.profile();
        let mut args = vec![
            "node",
            "budget",
            "set",
            "--data-dir",
            self.data_dir_str(),
            "--identity",
            identity,
            "--epsilon",
            epsilon,
            "--profile",
            &profile,
        ];
        if let Some(delta) = delta {
            args.extend(["--delta", delta]);
        }
        let out = cxrfed(&args);
        assert!(out.status.success(), "{}", text(&out.stderr));
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

/// Calls every method of `cxrfed.v1.NodeService` (from the compiled descriptor) on `channel`
/// and returns the ones that were not PERMISSION_DENIED. DpStats must come back noisy or
/// RESOURCE_EXHAUSTED; a method this function does not know fails the test.
pub async fn try_every_node_rpc(channel: tonic::transport::Channel) -> Vec<String> {
    use cxrfed_proto::v1 as pb;
    use prost::Message;
    use tonic::Code;
    let set = prost_types::FileDescriptorSet::decode(cxrfed_proto::FILE_DESCRIPTOR_SET)
        .expect("descriptor set");
    let methods: Vec<String> = set
        .file
        .iter()
        .flat_map(|f| f.service.iter())
        .filter(|s| s.name() == "NodeService")
        .flat_map(|s| s.method.iter().map(|m| m.name().to_string()))
        .collect();
    let mut c = pb::node_service_client::NodeServiceClient::new(channel);
    let record_id = "0190c6b2-1f5e-7a31-9a44-0c3f1e2d4b5a".to_string();
    let denied = |r: Result<(), tonic::Status>| match r {
        Err(s) if s.code() == Code::PermissionDenied => true,
        Err(s) => panic!("expected PERMISSION_DENIED, got {s:?}"),
        Ok(()) => false,
    };
    let mut allowed = Vec::new();
    for method in methods {
        let refused = match method.as_str() {
            "Extract" => denied(
                c.extract(tokio_stream::iter(vec![pb::ExtractRequest::default()]))
                    .await
                    .map(drop),
            ),
            "GetRecord" => denied(
                c.get_record(pb::GetRecordRequest {
                    record_id: record_id.clone(),
                })
                .await
                .map(drop),
            ),
            "GetRecordInput" => denied(
                c.get_record_input(pb::GetRecordRequest {
                    record_id: record_id.clone(),
                })
                .await
                .map(drop),
            ),
            "ListRecords" => denied(
                c.list_records(pb::ListRecordsRequest::default())
                    .await
                    .map(drop),
            ),
            "Status" => denied(c.status(pb::StatusRequest {}).await.map(drop)),
            "Stats" => denied(
                c.stats(pb::StatsRequest {
                    query: "count".into(),
                    structured: None,
                })
                .await
                .map(drop),
            ),
            "Export" => denied(c.export(pb::ExportRequest::default()).await.map(drop)),
            "Ask" => denied(
                c.ask(pb::AskRequest {
                    record_id: record_id.clone(),
                    question: "Is the image quality good?".into(),
                })
                .await
                .map(drop),
            ),
            "DefineField" => denied(
                c.define_field(pb::DefineFieldRequest::default())
                    .await
                    .map(drop),
            ),
            "ListFields" => denied(c.list_fields(pb::ListFieldsRequest {}).await.map(drop)),
            "Annotate" => denied(c.annotate(pb::AnnotateRequest::default()).await.map(drop)),
            "StartIngest" => denied(
                c.start_ingest(pb::StartIngestRequest::default())
                    .await
                    .map(drop),
            ),
            "StartPull" => denied(
                c.start_pull(pb::StartPullRequest::default())
                    .await
                    .map(drop),
            ),
            "IngestJobs" => denied(
                c.ingest_jobs(pb::IngestJobsRequest::default())
                    .await
                    .map(drop),
            ),
            "SetBudget" => denied(
                c.set_budget(pb::SetBudgetRequest {
                    identity: "eve".into(),
                    epsilon: 100.0,
                    delta: 0.0,
                })
                .await
                .map(drop),
            ),
            "ListBudgets" => denied(c.list_budgets(pb::ListBudgetsRequest {}).await.map(drop)),
            "AuditLog" => denied(c.audit_log(pb::AuditLogRequest::default()).await.map(drop)),
            "VerifyAudit" => denied(c.verify_audit(pb::VerifyAuditRequest {}).await.map(drop)),
            "GetTrainingPolicy" => denied(
                c.get_training_policy(pb::GetTrainingPolicyRequest {})
                    .await
                    .map(drop),
            ),
            "SetTrainingPolicy" => denied(
                c.set_training_policy(pb::TrainingPolicy {
                    policy_toml: "enabled = true".into(),
                    ..Default::default()
                })
                .await
                .map(drop),
            ),
            "RollbackModel" => denied(
                c.rollback_model(pb::RollbackModelRequest {})
                    .await
                    .map(drop),
            ),
            // Public: the schema (field names and public categories), no data.
            "GetSchema" => {
                let schema = c
                    .get_schema(pb::GetSchemaRequest {})
                    .await
                    .expect("schema")
                    .into_inner();
                assert!(!schema.fields.is_empty());
                false
            }
            // The caller's own account: no data.
            "Budget" => {
                c.budget(pb::BudgetRequest {}).await.expect("own budget");
                false
            }
            // Only noisy answers within a budget; none is granted to the caller here.
            "DpStats" => {
                let status = c
                    .dp_stats(pb::DpStatsRequest {
                        query: "count".into(),
                        structured: None,
                        epsilon: 1.0,
                        delta: 0.0,
                        mechanism: pb::Mechanism::Unspecified.into(),
                    })
                    .await
                    .expect_err("no budget");
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                false
            }
            other => panic!("NodeService.{other} is not covered by this test: add it"),
        };
        if !refused {
            allowed.push(method);
        }
    }
    allowed
}

/// A `cxrfed coordinator serve` child process with a coordinator certificate of `pki`.
#[derive(Debug)]
pub struct CoordinatorProcess {
    pub child: Child,
    pub port: u16,
    pub data_dir: PathBuf,
}

impl CoordinatorProcess {
    pub fn start(data_dir: &Path, pki: &TestPki) -> CoordinatorProcess {
        Self::start_on(data_dir, pki, free_port())
    }

    /// Starts (or restarts) a coordinator on a chosen port.
    pub fn start_on(data_dir: &Path, pki: &TestPki, port: u16) -> CoordinatorProcess {
        Self::start_with(data_dir, pki, port, &[])
    }

    /// Starts a coordinator with extra `coordinator serve` flags.
    pub fn start_with(
        data_dir: &Path,
        pki: &TestPki,
        port: u16,
        extra: &[&str],
    ) -> CoordinatorProcess {
        let me = pki.identity(Role::Coordinator, "coordinator", None);
        let listen = format!("127.0.0.1:{port}");
        let (ca, crl) = (pki.ca_pem(), pki.crl());
        let (cert, key) = (me.join(pki::CERT), me.join(pki::KEY));
        let child = Command::new(cxrfed_bin())
            .args([
                "coordinator",
                "serve",
                "--data-dir",
                data_dir.to_str().expect("utf-8 path"),
                "--listen",
                &listen,
                "--ca",
                ca.to_str().expect("utf-8 path"),
                "--crl",
                crl.to_str().expect("utf-8 path"),
                "--cert",
                cert.to_str().expect("utf-8 path"),
                "--key",
                key.to_str().expect("utf-8 path"),
                "--heartbeat-secs",
                "1",
            ])
            .args(extra)
            .env_remove("CXRFED_NODE_CONFIG")
            .env_remove("CXRFED_COORDINATOR_CONFIG")
            // Received site updates are kept under spool/kept/ so tests can inspect them.
            .env("CXRFED_COORDINATOR_KEEP_UPDATES", "true")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn coordinator");
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the coordinator did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        CoordinatorProcess {
            child,
            port,
            data_dir: data_dir.to_path_buf(),
        }
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: no shutdown, no flush.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A synthetic DICOM file, written with dicom-object, for tests that need images with chosen
/// headers (views, dates, absurd dimensions).
#[derive(Debug, Clone)]
pub struct TestDicom {
    pub rows: u32,
    pub columns: u32,
    /// Pixel samples (16-bit unsigned, 12 bits stored); generated from `seed` when empty.
    pub seed: u64,
    pub view: &'static str,
    pub study_date: &'static str,
    pub patient_id: String,
    /// Write Rows/Columns as UL so that values above 65535 can be claimed.
    pub claim_rows_columns: Option<u32>,
}

impl Default for TestDicom {
    fn default() -> Self {
        TestDicom {
            rows: 256,
            columns: 256,
            seed: 1,
            view: "PA",
            study_date: "20200115",
            patient_id: "TEST-PATIENT-0001".into(),
            claim_rows_columns: None,
        }
    }
}

impl TestDicom {
    pub fn to_bytes(&self) -> Vec<u8> {
        use dicom_core::{DataElement, PrimitiveValue, VR, dicom_value};
        use dicom_dictionary_std::tags;
        use dicom_object::{FileMetaTableBuilder, InMemDicomObject};

        let n = (self.rows * self.columns) as usize;
        let mut state = self
            .seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let pixels: Vec<u16> = (0..n)
            .map(|i| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let smooth = ((i as u32 % self.columns) * 4095 / self.columns.max(1)) as u16;
                (smooth / 2 + (state >> 53) as u16 % 2048) & 0x0fff
            })
            .collect();
        let sop_instance = format!("2.25.{}", 1000 + self.seed);
        let mut obj = InMemDicomObject::from_element_iter([
            DataElement::new(tags::SOP_CLASS_UID, VR::UI, "1.2.840.10008.5.1.4.1.1.1"),
            DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, sop_instance.as_str()),
            DataElement::new(tags::PATIENT_NAME, VR::PN, "Doe^Jane^Test"),
            DataElement::new(tags::PATIENT_ID, VR::LO, self.patient_id.as_str()),
            DataElement::new(tags::PATIENT_BIRTH_DATE, VR::DA, "19580412"),
            DataElement::new(tags::PATIENT_SEX, VR::CS, "M"),
            DataElement::new(tags::ACCESSION_NUMBER, VR::SH, "ACC-998877"),
            DataElement::new(tags::INSTITUTION_NAME, VR::LO, "Test General Hospital"),
            DataElement::new(tags::STUDY_DATE, VR::DA, self.study_date),
            DataElement::new(tags::MODALITY, VR::CS, "DX"),
            DataElement::new(tags::VIEW_POSITION, VR::CS, self.view),
            DataElement::new(tags::BODY_PART_EXAMINED, VR::CS, "CHEST"),
            DataElement::new(tags::SAMPLES_PER_PIXEL, VR::US, PrimitiveValue::from(1u16)),
            DataElement::new(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2"),
            DataElement::new(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(16u16)),
            DataElement::new(tags::BITS_STORED, VR::US, PrimitiveValue::from(12u16)),
            DataElement::new(tags::HIGH_BIT, VR::US, PrimitiveValue::from(11u16)),
            DataElement::new(
                tags::PIXEL_REPRESENTATION,
                VR::US,
                PrimitiveValue::from(0u16),
            ),
            DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::U16(pixels.into())),
        ]);
        match self.claim_rows_columns {
            Some(claim) => {
                obj.put(DataElement::new(
                    tags::ROWS,
                    VR::UL,
                    dicom_value!(U32, [claim]),
                ));
                obj.put(DataElement::new(
                    tags::COLUMNS,
                    VR::UL,
                    dicom_value!(U32, [claim]),
                ));
            }
            None => {
                obj.put(DataElement::new(
                    tags::ROWS,
                    VR::US,
                    PrimitiveValue::from(self.rows as u16),
                ));
                obj.put(DataElement::new(
                    tags::COLUMNS,
                    VR::US,
                    PrimitiveValue::from(self.columns as u16),
                ));
            }
        }
        let file = obj
            .with_meta(
                FileMetaTableBuilder::new()
                    .transfer_syntax("1.2.840.10008.1.2.1")
                    .media_storage_sop_class_uid("1.2.840.10008.5.1.4.1.1.1")
                    .media_storage_sop_instance_uid(sop_instance.as_str()),
            )
            .expect("valid file meta");
        let mut out = Vec::new();
        file.write_all(&mut out).expect("write DICOM");
        out
    }
}

/// The signer (key and certificate) of the identity in `dir`.
pub fn signer(dir: &Path) -> cxrfed_auth::signing::Signer {
    cxrfed_auth::signing::Signer::load(&dir.join(pki::CERT), &dir.join(pki::KEY)).expect("signer")
}

/// A study admin's signed order for the job file `spec_toml`, from base weights `base_sha256`.
pub fn signed_job(
    admin: &Path,
    study: &str,
    spec_toml: &str,
    base_sha256: &str,
) -> cxrfed_proto::v1::SignedOrder {
    let spec = cxrfed_fl::JobSpec::parse(spec_toml).expect("job file");
    let order = cxrfed_server::order::job(study, &spec, base_sha256, Duration::from_secs(3600))
        .expect("order");
    cxrfed_server::order::sign(&signer(admin), &order).expect("sign")
}

/// A study admin's signed promotion of `version` (weights `sha256`).
pub fn signed_promotion(
    admin: &Path,
    study: &str,
    version: &str,
    sha256: &str,
) -> cxrfed_proto::v1::SignedOrder {
    let order = cxrfed_server::order::promotion(study, version, sha256, Duration::from_secs(3600))
        .expect("order");
    cxrfed_server::order::sign(&signer(admin), &order).expect("sign")
}

/// Phantoms for one site (at most `max_size` pixels a side), and a CSV labelling the custom
/// field `cardiomegaly` (cardiothoracic ratio above 0.5) by image hash; returns the CSV's path
/// and the labels (image sha256, positive).
pub fn labelled_phantoms(
    dir: &Path,
    profile: &str,
    count: u32,
    seed: u32,
    max_size: u32,
) -> (PathBuf, Vec<(String, bool)>) {
    let out = cxrfed(&[
        "phantom",
        "--out",
        dir.to_str().expect("path"),
        "--count",
        &count.to_string(),
        "--seed",
        &seed.to_string(),
        "--max-size",
        &max_size.to_string(),
        "--site",
        profile,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut reader = csv::Reader::from_path(dir.join("labels.csv")).expect("labels.csv");
    let header = reader.headers().expect("header").clone();
    let col = |name: &str| header.iter().position(|h| h == name).expect(name);
    let (sha, ratio) = (col("image_sha256"), col("cardiothoracic_ratio"));
    let mut csv = String::from("image_sha256,cardiomegaly\n");
    let mut labels = Vec::new();
    for row in reader.records() {
        let row = row.expect("row");
        let r: f64 = row[ratio].parse().expect("ratio");
        csv.push_str(&format!("{},{}\n", &row[sha], r > 0.5));
        labels.push((row[sha].to_string(), r > 0.5));
    }
    let path = dir.join("cardiomegaly.csv");
    std::fs::write(&path, csv).expect("write csv");
    (path, labels)
}

/// `/metrics` of a server on a loopback port, parsed by Python's prometheus_client (the
/// OpenMetrics parser Prometheus' own client library ships): `{family: {type, samples:
/// [[name, labels, value]]}}`, and the raw text.
pub fn scrape_metrics(port: u16) -> (serde_json::Value, String) {
    let script = "import json, sys, urllib.request\n\
        from prometheus_client.openmetrics.parser import text_string_to_metric_families\n\
        r = urllib.request.urlopen(f'http://127.0.0.1:{sys.argv[1]}/metrics', timeout=30)\n\
        assert r.headers['Content-Type'].startswith('application/openmetrics-text'), r.headers['Content-Type']\n\
        text = r.read().decode()\n\
        out = {f.name: {'type': f.type, 'samples': [[s.name, s.labels, s.value] for s in f.samples]}\n\
               for f in text_string_to_metric_families(text)}\n\
        print(json.dumps({'families': out, 'text': text}))";
    let out = Command::new(venv_python())
        .args(["-c", script, &port.to_string()])
        .output()
        .expect("python");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    (
        doc["families"].clone(),
        doc["text"].as_str().unwrap_or_default().to_string(),
    )
}

/// The value of the first sample of `family` named `sample` whose labels include `labels`.
pub fn metric(
    families: &serde_json::Value,
    family: &str,
    sample: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    families[family]["samples"]
        .as_array()?
        .iter()
        .find_map(|s| {
            let matches =
                s[0] == sample && labels.iter().all(|(k, v)| s[1][*k].as_str() == Some(*v));
            matches.then(|| s[2].as_f64()).flatten()
        })
}

/// A coordinator client as the identity in `dir`, retrying while the coordinator starts.
pub async fn coordinator_client(
    url: &str,
    pki: &TestPki,
    dir: &Path,
) -> cxrfed_proto::v1::coordinator_service_client::CoordinatorServiceClient<tonic::transport::Channel>
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match cxrfed_auth::client::connect(url, Some(&pki.credentials(dir))).await {
            Ok(channel) => {
                return cxrfed_proto::v1::coordinator_service_client::CoordinatorServiceClient::new(
                    channel,
                );
            }
            Err(e) => assert!(Instant::now() < deadline, "connect: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until at least `n` sites are connected to the coordinator at `url`.
pub async fn wait_sites_connected(url: &str, pki: &TestPki, dir: &Path, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let connected = coordinator_client(url, pki, dir)
            .await
            .sites(cxrfed_proto::v1::SitesRequest {})
            .await
            .map(|r| r.into_inner().sites.iter().filter(|s| s.connected).count())
            .unwrap_or(0);
        if connected >= n {
            return;
        }
        assert!(Instant::now() < deadline, "fewer than {n} sites connected");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The registry's weights sha256 of the base model the job file `spec` names (what
/// `cxrfed job start` signs).
pub async fn base_sha(url: &str, pki: &TestPki, admin: &Path, spec: &str) -> String {
    let base = cxrfed_fl::JobSpec::parse(spec).expect("job file").base;
    coordinator_client(url, pki, admin)
        .await
        .get_model(cxrfed_proto::v1::GetModelRequest { version: base })
        .await
        .expect("base model")
        .into_inner()
        .sha256
}

/// Polls job `id` as the study admin in `admin` until `done` holds (at most 15 minutes).
pub async fn wait_job(
    url: &str,
    pki: &TestPki,
    admin: &Path,
    id: &str,
    done: impl Fn(&cxrfed_proto::v1::JobInfo) -> bool,
) -> cxrfed_proto::v1::JobInfo {
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let job = coordinator_client(url, pki, admin)
            .await
            .get_job(cxrfed_proto::v1::GetJobRequest {
                job_id: id.to_string(),
            })
            .await
            .expect("get job")
            .into_inner();
        if done(&job) {
            return job;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} stuck: {:?} round {} of {}",
            job.state(),
            job.completed_rounds,
            job.rounds
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Starts the job file `spec` as the study admin in `admin`, its order signed as `cxrfed job
/// start` signs it.
pub async fn start_signed_job(
    url: &str,
    pki: &TestPki,
    admin: &Path,
    spec: &str,
) -> cxrfed_proto::v1::JobInfo {
    let order = signed_job(admin, "e2e", spec, &base_sha(url, pki, admin, spec).await);
    coordinator_client(url, pki, admin)
        .await
        .start_job(cxrfed_proto::v1::StartJobRequest {
            spec_toml: String::new(),
            order: Some(order),
        })
        .await
        .expect("start job")
        .into_inner()
}
