//! Federation end to end: a coordinator and three nodes as real processes on loopback with
//! mutual TLS, nodes dialling out, researchers' signed queries pooled from per-site DP releases,
//! budgets per site, a killed node, a forged request, and the coordinator role against every
//! node RPC.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cxrfed_auth::Role;
use cxrfed_auth::pki;
use cxrfed_e2e::{CoordinatorProcess, NodeProcess, TestPki, cxrfed, free_port, run_python, text};
use cxrfed_proto::v1 as pb;
use cxrfed_proto::v1::coordinator_service_client::CoordinatorServiceClient;
use cxrfed_proto::v1::node_service_client::NodeServiceClient;

const SITES: [(&str, &str, u32); 3] = [
    ("site-a", "university", 14),
    ("site-b", "community", 12),
    ("site-c", "icu", 10),
];

struct Federation {
    _dir: tempfile::TempDir,
    root: PathBuf,
    pki: TestPki,
    coordinator: CoordinatorProcess,
    nodes: Vec<NodeProcess>,
    ports: Vec<u16>,
    researcher: PathBuf,
}

fn phantoms(dir: &Path, profile: &str, count: u32, seed: u32) {
    let out = cxrfed(&[
        "phantom",
        "--out",
        dir.to_str().expect("path"),
        "--count",
        &count.to_string(),
        "--seed",
        &seed.to_string(),
        "--max-size",
        "128",
        "--site",
        profile,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

fn start_node(root: &Path, pki: &TestPki, site: &str, port: u16, coordinator: &str) -> NodeProcess {
    NodeProcess::start_in(
        &root.join(site),
        port,
        pki.clone(),
        &[
            "--model",
            "none",
            "--site",
            site,
            "--coordinator",
            coordinator,
        ],
    )
}

async fn connected_sites(f: &Federation) -> Vec<String> {
    let channel = cxrfed_auth::client::connect(
        &f.coordinator.url(),
        Some(&f.pki.credentials(&f.researcher)),
    )
    .await
    .expect("connect");
    CoordinatorServiceClient::new(channel)
        .sites(pb::SitesRequest {})
        .await
        .expect("sites")
        .into_inner()
        .sites
        .into_iter()
        .filter(|s| s.connected)
        .map(|s| s.site)
        .collect()
}

async fn wait_connected(f: &Federation, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let sites = connected_sites(f).await;
        if sites.len() >= n {
            return;
        }
        assert!(Instant::now() < deadline, "only {sites:?} connected");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Three sites (different phantom profiles), each with a budget of `budget` for researcher
/// rita, linked to one coordinator.
async fn federation(budget: &str) -> Federation {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_path_buf();
    let pki = TestPki::at(&root.join("pki"));
    let coordinator = CoordinatorProcess::start(&root.join("coordinator"), &pki);
    let researcher = pki.identity(Role::Researcher, "rita", None);
    let mut nodes = Vec::new();
    let mut ports = Vec::new();
    for (i, (site, profile, count)) in SITES.iter().enumerate() {
        let images = root.join(format!("phantoms-{site}"));
        phantoms(&images, profile, *count, 40 + i as u32);
        let port = free_port();
        let node = start_node(&root, &pki, site, port, &coordinator.url());
        let out = node.cli(&["ingest", images.to_str().expect("path")]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let admin = node.profile();
        let out = cxrfed(&[
            "node",
            "budget",
            "set",
            "--data-dir",
            node.data_dir_str(),
            "--identity",
            "rita",
            "--epsilon",
            budget,
            "--profile",
            &admin,
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        nodes.push(node);
        ports.push(port);
    }
    let f = Federation {
        _dir: dir,
        root,
        pki,
        coordinator,
        nodes,
        ports,
        researcher,
    };
    wait_connected(&f, 3).await;
    f
}

/// `cxrfed query ... --format json` as rita; the parsed answer, or the error text.
fn query(f: &Federation, args: &[&str]) -> Result<serde_json::Value, String> {
    let (url, profile) = (
        f.coordinator.url(),
        f.researcher
            .join(pki::PROFILE)
            .to_str()
            .expect("path")
            .to_string(),
    );
    let mut all = vec!["query"];
    all.extend_from_slice(args);
    all.extend([
        "--coordinator",
        &url,
        "--profile",
        &profile,
        "--format",
        "json",
    ]);
    let out = cxrfed(&all);
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).expect("json"))
    } else {
        Err(text(&out.stderr))
    }
}

fn exact_count(node: &NodeProcess) -> f64 {
    let out = node.cli(&["stats", "count", "--format", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    table["rows"][0][0].as_f64().expect("count")
}

fn status_of<'a>(answer: &'a serde_json::Value, site: &str) -> &'a serde_json::Value {
    answer["sites"]
        .as_array()
        .expect("sites")
        .iter()
        .find(|s| s["site"] == site)
        .unwrap_or_else(|| panic!("{site} missing from {answer}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_federated_count_is_the_sum_of_the_sites_within_its_bound() {
    let f = federation("1000").await;
    let truth: f64 = f.nodes.iter().map(exact_count).sum();
    assert_eq!(truth, 36.0);
    // Enough releases that the variance check below is a wide band in standard errors (the
    // sum of three discrete Laplace noises has excess kurtosis 2, so the sample variance of
    // 30 draws has a relative standard error of about 37%: a 2× band failed about once in a
    // few hundred runs; at 120 it is about 18%, and the band is 5.5 of them above).
    let runs = 120;
    let (mut within, mut errors) = (0, Vec::new());
    let mut bound = 0.0;
    for _ in 0..runs {
        let answer = query(&f, &["count", "--epsilon", "0.5", "--min-sites", "3"]).expect("query");
        assert_eq!(answer["answered"], 3);
        let cell = &answer["rows"][0]["values"][0];
        bound = cell["error_bound"].as_f64().expect("bound");
        let value = cell["value"].as_f64().expect("not suppressed");
        let error = value - truth;
        errors.push(error);
        within += usize::from(error.abs() < bound);
        for (site, ..) in SITES {
            assert_eq!(status_of(&answer, site)["epsilon"], 0.5);
        }
    }
    // Three discrete Laplace noises of scale k / epsilon = 2: the stated bound is the 95%
    // quantile of their sum.
    let expected =
        cxrfed_stats::pool::pooled_bound(&[(cxrfed_stats::dp::Mechanism::Laplace, 2.0); 3], 0.95);
    assert_eq!(bound, expected);
    assert!(
        within >= runs * 8 / 10,
        "{within} of {runs} within ±{bound}: {errors:?}"
    );
    // The noise actually added has the variance of that sum (3 × 2q/(1-q)^2, q = e^-1/2),
    // within a wide band for 120 samples.
    let q = (-0.5f64).exp();
    let theory = 3.0 * 2.0 * q / (1.0 - q).powi(2);
    let variance = errors.iter().map(|e| e * e).sum::<f64>() / runs as f64;
    assert!(
        variance > theory * 0.4 && variance < theory * 2.0,
        "noise variance {variance:.1}, theory {theory:.1}"
    );

    // The Python SDK signs and asks the same way.
    let out = run_python(
        "tests/helpers/federated_sdk.py",
        &[
            "--coordinator",
            &f.coordinator.url(),
            "--profile",
            f.researcher.join(pki::PROFILE).to_str().expect("path"),
        ],
    );
    let seen: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(seen["study"], "e2e");
    assert_eq!(seen["connected"], 3);
    assert_eq!(seen["answered"], 3);
    assert_eq!(seen["charged"], serde_json::json!([0.5, 0.5, 0.5]));
    assert_eq!(seen["count_bound"], expected);
    assert!((seen["count"].as_f64().expect("count") - truth).abs() < 4.0 * expected);
    assert_eq!(
        seen["crosstab_index"],
        serde_json::json!(["PA", "AP", "LL", "unknown", "(missing)"])
    );
    assert_eq!(seen["summary_refused"], "INVALID_ARGUMENT");

    // Each node recorded the federated release for rita, relayed by the coordinator.
    let admin = f.nodes[0].profile();
    let out = cxrfed(&[
        "node",
        "audit",
        "show",
        "--json",
        "--data-dir",
        f.nodes[0].data_dir_str(),
        "--profile",
        &admin,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    let entry: serde_json::Value = serde_json::from_str(
        shown
            .lines()
            .find(|l| l.contains("FederatedQuery"))
            .expect("a federated entry"),
    )
    .expect("json");
    assert_eq!(entry["identity"], "cxrfed://e2e/researcher/-/rita");
    assert!(
        shown.contains(&format!("coordinator {}", f.coordinator.url())),
        "{shown}"
    );
    // The coordinator keeps its own chain of queries and answers.
    let coordinator_admin = f
        .pki
        .identity(Role::Admin, "study-admin", Some("coordination"));
    let channel = cxrfed_auth::client::connect(
        &f.coordinator.url(),
        Some(&f.pki.credentials(&coordinator_admin)),
    )
    .await
    .expect("connect");
    let mut c = CoordinatorServiceClient::new(channel);
    let log = c
        .coordinator_audit(pb::AuditLogRequest::default())
        .await
        .expect("audit")
        .into_inner();
    assert_eq!(
        log.entries.len(),
        runs + 2,
        "the CLI's queries and the SDK's two"
    );
    assert!(log.entries[0].query.contains("site-a answered"));
    let verified = c
        .verify_coordinator_audit(pb::VerifyAuditRequest {})
        .await
        .expect("verify")
        .into_inner();
    assert!(verified.ok, "{}", verified.reason);
}

#[tokio::test(flavor = "multi_thread")]
async fn budgets_are_per_site_and_a_killed_node_is_reported_then_reconnects() {
    let mut f = federation("1").await;
    // site-c has only 0.4 left for rita: it refuses a 0.5 query, the others answer.
    let admin_c = f.nodes[2].profile();
    let out = cxrfed(&[
        "node",
        "budget",
        "set",
        "--data-dir",
        f.nodes[2].data_dir_str(),
        "--identity",
        "rita",
        "--epsilon",
        "0.4",
        "--profile",
        &admin_c,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let answer = query(
        &f,
        &["histogram view", "--epsilon", "0.5", "--min-sites", "2"],
    )
    .expect("two sites suffice");
    assert_eq!(answer["answered"], 2);
    let c = status_of(&answer, "site-c");
    assert_eq!(c["status"], "budget_exhausted", "{c}");
    assert!(
        c["reason"]
            .as_str()
            .expect("reason")
            .contains("needs epsilon 0.5"),
        "{c}"
    );
    assert_eq!(status_of(&answer, "site-a")["epsilon_remaining"], 0.5);

    // site-b is killed: a query that needs all three sites fails clearly, naming it; one that
    // needs two completes with the others and says why site-b is missing.
    f.nodes[1].kill();
    let err = query(
        &f,
        &[
            "count",
            "--epsilon",
            "0.1",
            "--min-sites",
            "3",
            "--timeout",
            "3",
        ],
    )
    .expect_err("site-b is down");
    assert!(
        err.contains("Unavailable") && err.contains("2 of 3 sites answered"),
        "{err}"
    );
    assert!(err.contains("site-b"), "{err}");
    let answer = query(
        &f,
        &[
            "count",
            "--epsilon",
            "0.1",
            "--min-sites",
            "2",
            "--timeout",
            "3",
        ],
    )
    .expect("two sites are enough");
    assert_eq!(answer["answered"], 2);
    let b = status_of(&answer, "site-b");
    assert!(
        ["disconnected", "not_connected", "timeout"]
            .contains(&b["status"].as_str().expect("status")),
        "{b}"
    );

    // Restarted, site-b dials in again and is back in the registry.
    let node_b = start_node(&f.root, &f.pki, "site-b", f.ports[1], &f.coordinator.url());
    f.nodes[1] = node_b;
    wait_connected(&f, 3).await;
    let answer = query(
        &f,
        &["count", "--epsilon", "0.1", "--sites", "site-a,site-b"],
    )
    .expect("both answer");
    assert_eq!(answer["answered"], 2);
}

/// A stand-in coordinator that hands a node prepared tasks and collects the results: what a
/// compromised coordinator could try.
mod rogue {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::sync::mpsc;

    #[derive(Clone)]
    pub struct Rogue {
        /// Where to send tasks once a node has linked.
        pub outbound: Arc<Mutex<Option<mpsc::UnboundedSender<pb::CoordinatorMessage>>>>,
        pub results: mpsc::UnboundedSender<pb::TaskResult>,
        /// Every other message the node sends (training and rollout reports, keys, chunks).
        pub others: Option<mpsc::UnboundedSender<pb::node_message::Kind>>,
    }

    type Stream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::CoordinatorMessage, tonic::Status>> + Send>,
    >;

    #[tonic::async_trait]
    impl pb::coordinator_service_server::CoordinatorService for Rogue {
        type LinkStream = Stream;

        async fn link(
            &self,
            request: tonic::Request<tonic::Streaming<pb::NodeMessage>>,
        ) -> Result<tonic::Response<Stream>, tonic::Status> {
            let mut inbound = request.into_inner();
            let results = self.results.clone();
            let others = self.others.clone();
            tokio::spawn(async move {
                while let Ok(Some(m)) = inbound.message().await {
                    match m.kind {
                        Some(pb::node_message::Kind::Result(r)) => {
                            let _ = results.send(r);
                        }
                        Some(other) => {
                            if let Some(tx) = &others {
                                let _ = tx.send(other);
                            }
                        }
                        None => {}
                    }
                }
            });
            let (tx, rx) = mpsc::unbounded_channel();
            *self.outbound.lock().expect("outbound") = Some(tx);
            let stream = tokio_stream::StreamExt::map(
                tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
                Ok,
            );
            Ok(tonic::Response::new(Box::pin(stream)))
        }

        async fn query(
            &self,
            _: tonic::Request<pb::FederatedQueryRequest>,
        ) -> Result<tonic::Response<pb::FederatedQueryResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("rogue"))
        }

        async fn sites(
            &self,
            _: tonic::Request<pb::SitesRequest>,
        ) -> Result<tonic::Response<pb::SitesResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("rogue"))
        }

        async fn coordinator_audit(
            &self,
            _: tonic::Request<pb::AuditLogRequest>,
        ) -> Result<tonic::Response<pb::AuditLogResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("rogue"))
        }

        async fn verify_coordinator_audit(
            &self,
            _: tonic::Request<pb::VerifyAuditRequest>,
        ) -> Result<tonic::Response<pb::VerifyAuditResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("rogue"))
        }

        async fn start_job(
            &self,
            _: tonic::Request<pb::StartJobRequest>,
        ) -> Result<tonic::Response<pb::JobInfo>, tonic::Status> {
            Err(tonic::Status::unimplemented("rogue"))
        }

        async fn list_jobs(
            &self,
            _: tonic::Request<pb::ListJobsRequest>,
        ) -> Result<tonic::Response<pb::ListJobsResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("rogue"))
        }

        async fn get_job(
            &self,
            _: tonic::Request<pb::GetJobRequest>,
        ) -> Result<tonic::Response<pb::JobInfo>, tonic::Status> {
            Err(tonic::Status::unimplemented("rogue"))
        }

        async fn cancel_job(
            &self,
            _: tonic::Request<pb::GetJobRequest>,
        ) -> Result<tonic::Response<pb::JobInfo>, tonic::Status> {
            Err(tonic::Status::unimplemented("rogue"))
        }

        async fn list_models(
            &self,
            _: tonic::Request<pb::ListModelsRequest>,
        ) -> Result<tonic::Response<pb::ListModelsResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("rogue"))
        }

        async fn get_model(
            &self,
            _: tonic::Request<pb::GetModelRequest>,
        ) -> Result<tonic::Response<pb::ModelVersion>, tonic::Status> {
            Err(tonic::Status::unimplemented("rogue"))
        }

        async fn promote_model(
            &self,
            _: tonic::Request<pb::PromoteModelRequest>,
        ) -> Result<tonic::Response<pb::PromoteModelResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("rogue"))
        }

        async fn import_model(
            &self,
            _: tonic::Request<tonic::Streaming<pb::ImportModelChunk>>,
        ) -> Result<tonic::Response<pb::ModelVersion>, tonic::Status> {
            Err(tonic::Status::unimplemented("rogue"))
        }
    }
}

fn signed(
    signer_dir: &Path,
    cert_dir: &Path,
    study: &str,
    epsilon: f64,
    tamper: bool,
) -> pb::SignedQuery {
    use prost::Message;
    let signer =
        cxrfed_auth::signing::Signer::load(&signer_dir.join(pki::CERT), &signer_dir.join(pki::KEY))
            .expect("signer");
    let now = chrono::Utc::now().timestamp();
    let intent = pb::QueryIntent {
        study: study.into(),
        query: "count".into(),
        epsilon,
        delta: 0.0,
        mechanism: pb::Mechanism::Unspecified.into(),
        sites: Vec::new(),
        nonce: "00112233445566778899aabbccddeeff".into(),
        issued_at_unix: now,
        expires_at_unix: now + 600,
    };
    let signature = signer.sign(&intent.encode_to_vec()).expect("sign");
    let mut bytes = intent.encode_to_vec();
    if tamper {
        // The coordinator raises epsilon after the researcher signed.
        bytes = pb::QueryIntent {
            epsilon: 50.0,
            ..intent
        }
        .encode_to_vec();
    }
    let certificate = std::fs::read(cert_dir.join(pki::CERT)).expect("cert");
    let der = rustls_pemfile_der(&certificate);
    pb::SignedQuery {
        intent: bytes,
        signature,
        certificate: der,
    }
}

fn rustls_pemfile_der(pem: &[u8]) -> Vec<u8> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem)
        .next()
        .expect("a certificate")
        .expect("pem")
        .to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_refuses_forged_and_replayed_requests_from_a_coordinator() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let pki = TestPki::at(&root.join("pki"));
    let rita = pki.identity(Role::Researcher, "rita", None);
    let mallory = pki.identity(Role::Researcher, "mallory", None);
    let tasks = vec![
        // Signed by mallory, presented with rita's certificate.
        pb::Task {
            task_id: "forged".into(),
            query: Some(signed(&mallory, &rita, "e2e", 0.5, false)),
        },
        // Signed by rita, epsilon changed afterwards.
        pb::Task {
            task_id: "tampered".into(),
            query: Some(signed(&rita, &rita, "e2e", 0.5, true)),
        },
        // Genuine, then the same signed request again under another task id.
        pb::Task {
            task_id: "genuine".into(),
            query: Some(signed(&rita, &rita, "e2e", 0.5, false)),
        },
    ];
    let mut replay = tasks[2].clone();
    replay.task_id = "replayed".into();
    let mut all = tasks;
    all.push(replay);
    let (results_tx, mut results_rx) = tokio::sync::mpsc::unbounded_channel();
    let outbound = std::sync::Arc::new(std::sync::Mutex::new(None));
    let rogue = rogue::Rogue {
        outbound: outbound.clone(),
        results: results_tx,
        others: None,
    };
    // The rogue serves with a genuine coordinator certificate of the study.
    let shutdown = tokio_util::sync::CancellationToken::new();
    let url = serve_rogue(&pki, rogue, shutdown.clone()).await;
    let phantom_dir = root.join("phantoms");
    phantoms(&phantom_dir, "university", 6, 3);
    let node = start_node(root, &pki, "site-a", free_port(), &url);
    let out = node.cli(&["ingest", phantom_dir.to_str().expect("path")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let admin = node.profile();
    let out = cxrfed(&[
        "node",
        "budget",
        "set",
        "--data-dir",
        node.data_dir_str(),
        "--identity",
        "rita",
        "--epsilon",
        "2",
        "--profile",
        &admin,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // Once the node has linked, the rogue hands it the prepared tasks.
    let deadline = Instant::now() + Duration::from_secs(60);
    let tx = loop {
        if let Some(tx) = outbound.lock().expect("outbound").clone() {
            break tx;
        }
        assert!(Instant::now() < deadline, "the node never linked");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for task in all {
        tx.send(pb::CoordinatorMessage {
            kind: Some(pb::coordinator_message::Kind::Task(task)),
        })
        .expect("send");
    }
    let mut got = std::collections::HashMap::new();
    while got.len() < 4 {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let r = tokio::time::timeout(remaining, results_rx.recv())
            .await
            .expect("the node answers every task")
            .expect("result");
        got.insert(r.task_id.clone(), r);
    }
    let error = |id: &str| match &got[id].outcome {
        Some(pb::task_result::Outcome::Error(e)) => (e.code(), e.message.clone()),
        other => panic!("{id}: expected a refusal, got {other:?}"),
    };
    let (code, message) = error("forged");
    assert_eq!(code, pb::TaskErrorCode::Refused, "{message}");
    assert!(message.contains("signature"), "{message}");
    let (code, message) = error("tampered");
    assert_eq!(code, pb::TaskErrorCode::Refused, "{message}");
    // The genuine request and its replay race for the nonce: exactly one is released.
    let released: Vec<&str> = ["genuine", "replayed"]
        .into_iter()
        .filter(|id| matches!(got[*id].outcome, Some(pb::task_result::Outcome::Release(_))))
        .collect();
    assert_eq!(released.len(), 1, "{got:?}");
    let other = if released[0] == "genuine" {
        "replayed"
    } else {
        "genuine"
    };
    let (code, message) = error(other);
    assert_eq!(code, pb::TaskErrorCode::Refused, "{message}");
    assert!(message.contains("already charged"), "{message}");
    // Only the genuine request was charged.
    let mut client = NodeServiceClient::new(node.channel_as(&rita).await);
    let account = client
        .budget(pb::BudgetRequest {})
        .await
        .expect("budget")
        .into_inner();
    assert_eq!(account.releases, 1);
    assert!((account.epsilon_spent - 0.5).abs() < 1e-9);
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_coordinator_role_gets_nothing_exact_from_a_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProcess::start(dir.path(), &["--model", "none", "--site", "site-a"]);
    let coordinator = node.pki.identity(Role::Coordinator, "coordinator", None);
    let channel = node.channel_as(&coordinator).await;
    let allowed = cxrfed_e2e::try_every_node_rpc(channel).await;
    assert_eq!(allowed, ["GetSchema", "DpStats", "Budget"]);
}

/// Serves a rogue coordinator (with a genuine coordinator certificate of the study) on a
/// loopback port; returns its URL.
async fn serve_rogue(
    pki: &TestPki,
    rogue: rogue::Rogue,
    shutdown: tokio_util::sync::CancellationToken,
) -> String {
    let me = pki.identity(Role::Coordinator, "rogue", None);
    serve_rogue_as(pki, rogue, shutdown, &me, Role::Coordinator).await
}

/// Serves a rogue coordinator with the certificate in `me` (of `role`).
async fn serve_rogue_as(
    pki: &TestPki,
    rogue: rogue::Rogue,
    shutdown: tokio_util::sync::CancellationToken,
    me: &Path,
    role: Role,
) -> String {
    let tls = cxrfed_auth::ReloadingTls::load(
        cxrfed_auth::TlsPaths {
            ca: pki.ca_pem(),
            cert: me.join(pki::CERT),
            key: me.join(pki::KEY),
            crl: None,
        },
        &[role],
    )
    .expect("tls");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::coordinator_service_server::CoordinatorServiceServer::new(rogue))
            .serve_with_incoming(cxrfed_auth::incoming(
                listener,
                cxrfed_auth::ServerTransport::Tls(tls),
                shutdown,
            )),
    );
    format!("https://127.0.0.1:{port}")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_obeys_only_a_study_admins_signed_orders_within_its_policy() {
    use prost::Message;
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let pki = TestPki::at(&root.join("pki"));
    let sam = pki.identity(Role::StudyAdmin, "sam", None);
    let (results_tx, _results) = tokio::sync::mpsc::unbounded_channel();
    let (others_tx, mut others) = tokio::sync::mpsc::unbounded_channel();
    let outbound = std::sync::Arc::new(std::sync::Mutex::new(None));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let url = serve_rogue(
        &pki,
        rogue::Rogue {
            outbound: outbound.clone(),
            results: results_tx,
            others: Some(others_tx),
        },
        shutdown.clone(),
    )
    .await;
    let phantom_dir = root.join("phantoms");
    phantoms(&phantom_dir, "university", 6, 5);
    let node = start_node(root, &pki, "site-a", free_port(), &url);
    let out = node.cli(&["ingest", phantom_dir.to_str().expect("path")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let deadline = Instant::now() + Duration::from_secs(60);
    let tx = loop {
        if let Some(tx) = outbound.lock().expect("outbound").clone() {
            break tx;
        }
        assert!(Instant::now() < deadline, "the node never linked");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // The bundled model, as a coordinator would send it for a job's closing evaluation.
    let models = cxrfed_e2e::workspace_root().join("models/tiny-phantom-v1");
    let weights = std::fs::read(models.join("model.safetensors")).expect("weights");
    let card_json = std::fs::read_to_string(models.join("card.json")).expect("card");
    let sha = hex_sha256(&weights);
    let spec = "rounds = 1\nmin_sites = 2\n";
    let genuine = cxrfed_e2e::signed_job(&sam, "e2e", spec, &sha);
    let mut tampered = genuine.clone();
    {
        // The coordinator swaps the job for one that trains everything, batch size 2.
        let mut order = pb::Order::decode(tampered.order.as_slice()).expect("order");
        order.spec_json = order
            .spec_json
            .replace("\"trainable\":\"heads\"", "\"trainable\":\"all\"")
            .replace("\"batch_size\":16", "\"batch_size\":2");
        tampered.order = order.encode_to_vec();
    }
    let by_site_admin = cxrfed_e2e::signed_job(&node.admin, "e2e", spec, &sha);
    // A task or rollout, then the bundled weights in chunks, as a coordinator sends them.
    let send_with_weights = |id: &str, head: pb::coordinator_message::Kind| {
        tx.send(pb::CoordinatorMessage { kind: Some(head) })
            .expect("send");
        for chunk in cxrfed_proto::chunks(id, prost::bytes::Bytes::from(weights.clone())) {
            tx.send(pb::CoordinatorMessage {
                kind: Some(pb::coordinator_message::Kind::Weights(chunk)),
            })
            .expect("send");
        }
    };
    let send_task = |id: &str, order: Option<pb::SignedOrder>, card: &str| {
        let task = pb::TrainTask {
            task_id: id.into(),
            job_id: "job-x".into(),
            round: 2,
            spec_json: String::new(),
            card_json: card.into(),
            weights_sha256: sha.clone(),
            weights_bytes: weights.len() as u64,
            evaluate_only: true,
            order,
            attempt: 1,
            secure_aggregation: false,
        };
        send_with_weights(id, pb::coordinator_message::Kind::Train(task));
    };
    // Unsigned, tampered, signed by a site admin: refused before anything runs.
    send_task("unsigned", None, &card_json);
    refused(&mut others, "signed-order").await;
    send_task("tampered", Some(tampered), &card_json);
    refused(&mut others, "order-signature").await;
    send_task("site-admin", Some(by_site_admin), &card_json);
    refused(&mut others, "order-signer").await;
    // Genuine, but this site has not opted in.
    send_task("off", Some(genuine.clone()), &card_json);
    refused(&mut others, "enabled").await;
    // Opted in: the genuine evaluation runs once; the same round again is a replay.
    node.training_policy(&["enabled=true", "min_held_out=1"]);
    send_task("genuine", Some(genuine.clone()), &card_json);
    let r = next_report(&mut others).await.expect("report");
    assert!(r.ok, "{r:?}");
    assert!(r.epsilon_charged > 0.0);
    send_task("again", Some(genuine.clone()), &card_json);
    refused(&mut others, "order-replay").await;
    // A TorchScript card is refused, whatever the order.
    let torchscript = card_json.replacen("\"safetensors\"", "\"torchscript\"", 1);
    assert_ne!(torchscript, card_json, "the card names its format");
    let genuine_round_2 = cxrfed_e2e::signed_job(&sam, "e2e", spec, &sha);
    send_task("torchscript", Some(genuine_round_2), &torchscript);
    refused(&mut others, "model-format").await;

    // Rollouts: unsigned, or a TorchScript card under a genuine promotion, are refused; the
    // node keeps its model.
    let send_rollout = |id: &str, order: Option<pb::SignedOrder>, card: &str| {
        send_with_weights(
            id,
            pb::coordinator_message::Kind::Rollout(pb::ModelRollout {
                rollout_id: id.into(),
                version: "v-evil".into(),
                card_json: card.into(),
                weights_sha256: sha.clone(),
                weights_bytes: weights.len() as u64,
                order,
            }),
        );
    };
    send_rollout("r-unsigned", None, &card_json);
    let r = next_report(&mut others)
        .await
        .expect_err("a rollout report");
    assert!(!r.ok && r.reason.contains("signed-order"), "{r:?}");
    let promotion = cxrfed_e2e::signed_promotion(&sam, "e2e", "v-evil", &sha);
    send_rollout("r-torchscript", Some(promotion), &torchscript);
    let r = next_report(&mut others)
        .await
        .expect_err("a rollout report");
    assert!(!r.ok && r.reason.contains("model-format"), "{r:?}");
    let status = NodeServiceClient::new(node.channel().await)
        .status(pb::StatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_ne!(status.model_id, "v-evil", "nothing was installed");
    shutdown.cancel();
}

fn hex_sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

type Others = tokio::sync::mpsc::UnboundedReceiver<pb::node_message::Kind>;

/// The node's next training report (Ok) or rollout report (Err).
async fn next_report(others: &mut Others) -> Result<pb::TrainReport, pb::RolloutReport> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, others.recv())
            .await
            .expect("a report")
            .expect("open")
        {
            pb::node_message::Kind::TrainReport(r) => return Ok(r),
            pb::node_message::Kind::RolloutReport(r) => return Err(r),
            _ => {}
        }
    }
}

/// The next training report, which must be a refusal under `rule`.
async fn refused(others: &mut Others, rule: &str) -> pb::TrainReport {
    let r = next_report(others).await.expect("a train report");
    assert!(!r.ok, "{r:?}");
    assert_eq!(r.refused_rule, rule, "{r:?}");
    r
}

/// A rogue that only records whether a node linked.
fn recording_rogue() -> (
    rogue::Rogue,
    std::sync::Arc<
        std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedSender<pb::CoordinatorMessage>>>,
    >,
) {
    let (results, _) = tokio::sync::mpsc::unbounded_channel();
    let outbound = std::sync::Arc::new(std::sync::Mutex::new(None));
    (
        rogue::Rogue {
            outbound: outbound.clone(),
            results,
            others: None,
        },
        outbound,
    )
}

/// Waits until the node's log holds `needle` (the node logs why its link failed).
async fn log_says(node: &NodeProcess, needle: &str) {
    let log = node.data_dir.join("logs").join("node.log");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(needle) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the node's log never said {needle:?}: {}",
            text.lines().rev().take(5).collect::<Vec<_>>().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_links_only_to_an_unrevoked_coordinator_certificate_it_may_trust() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let pki = TestPki::at(&root.join("pki"));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let start = |name: &str, url: &str, extra: &[&str]| {
        let mut args = vec!["--model", "none", "--site", name, "--coordinator", url];
        args.extend(extra);
        NodeProcess::start_in(&root.join(name), free_port(), pki.clone(), &args)
    };

    // A node certificate of the study presented as the coordinator.
    let impostor = pki.identity(Role::Node, "node-impostor", Some("site-z"));
    let (rogue, linked) = recording_rogue();
    let url = serve_rogue_as(&pki, rogue, shutdown.clone(), &impostor, Role::Node).await;
    let node = start("site-a", &url, &[]);
    log_says(&node, "not a coordinator").await;
    assert!(
        linked.lock().expect("lock").is_none(),
        "linked to a node certificate"
    );
    // `node status` says why too.
    let profile = node.profile();
    let out = cxrfed(&[
        "node",
        "status",
        "--data-dir",
        node.data_dir_str(),
        "--profile",
        &profile,
    ]);
    let shown = text(&out.stdout);
    assert!(
        shown.contains("NOT linked") && shown.contains("not a coordinator"),
        "{shown}"
    );
    drop(node);

    // A revoked coordinator certificate.
    let revoked = pki.identity(Role::Coordinator, "old-coordinator", None);
    let out = cxrfed(&[
        "certs",
        "revoke",
        "--ca",
        pki.root.join("ca").to_str().expect("path"),
        revoked.join(pki::CERT).to_str().expect("path"),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (rogue, linked) = recording_rogue();
    let url = serve_rogue_as(&pki, rogue, shutdown.clone(), &revoked, Role::Coordinator).await;
    let node = start("site-b", &url, &[]);
    log_says(&node, "Revoked").await;
    assert!(
        linked.lock().expect("lock").is_none(),
        "linked to a revoked certificate"
    );
    drop(node);

    // A genuine coordinator certificate, but not the one pinned; then the pinned one.
    let (rogue, linked) = recording_rogue();
    let url = serve_rogue(&pki, rogue, shutdown.clone()).await;
    let node = start(
        "site-c",
        &url,
        &[
            "--coordinator-identity",
            "cxrfed://e2e/coordinator/-/coordinator",
        ],
    );
    log_says(&node, "not the pinned").await;
    assert!(
        linked.lock().expect("lock").is_none(),
        "linked to an unpinned coordinator"
    );
    drop(node);
    let node = start(
        "site-d",
        &url,
        &["--coordinator-identity", "cxrfed://e2e/coordinator/-/rogue"],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while linked.lock().expect("lock").is_none() {
        assert!(
            Instant::now() < deadline,
            "the pinned coordinator never got a link"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(node);
    shutdown.cancel();
}
