//! End-to-end security of a node: the real binary serving mutual TLS, clients with and without
//! the right certificates (the CLI, tonic, Python grpcio), revocation and rotation through the
//! `cxrfed certs` commands while the node runs, and the start-up refusals.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use cxrfed_auth::Role;
use cxrfed_auth::pki;
use cxrfed_e2e::{NodeProcess, TestPki, cxrfed, free_port, text, venv_python};
use cxrfed_proto::v1 as pb;
use cxrfed_proto::v1::node_service_client::NodeServiceClient;
use prost::Message;
use tonic::Code;

fn node_log(node: &NodeProcess) -> String {
    std::fs::read_to_string(node.data_dir.join("logs").join("node.log")).unwrap_or_default()
}

/// Polls `condition` for up to 20 s (the node reloads its TLS files every 200 ms in tests).
async fn eventually(what: &str, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if condition().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what} did not happen within 20 s");
}

#[tokio::test(flavor = "multi_thread")]
async fn roles_are_enforced_and_every_denial_is_logged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProcess::start(dir.path(), &["--model", "none", "--site", "site-a"]);
    let researcher = node.pki.identity(Role::Researcher, "rita", None);
    let other_admin = node.pki.identity(Role::Admin, "olga", Some("site-b"));

    // The site admin may list records.
    let out = node.cli(&["records"]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // A researcher may not, and the error names the role needed.
    let profile = researcher.join(pki::PROFILE);
    let out = cxrfed(&[
        "records",
        "--node",
        &node.url(),
        "--profile",
        profile.to_str().expect("path"),
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("PermissionDenied"), "{err}");
    assert!(err.contains("requires role admin of site site-a"), "{err}");

    // Nor may the admin of another site, on any node RPC.
    let mut c = NodeServiceClient::new(node.channel_as(&other_admin).await);
    let status = c
        .status(pb::StatusRequest {})
        .await
        .expect_err("other site's admin");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let status = c
        .get_record(pb::GetRecordRequest {
            record_id: uuid_like(),
        })
        .await
        .expect_err("other site's admin");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    // Every denial is in the log with the identity and the method (the log is written by a
    // background thread: wait for it).
    let logged = |needles: &'static [&'static str]| {
        let node = &node;
        async move || {
            node_log(node)
                .lines()
                .any(|l| needles.iter().all(|n| l.contains(n)))
        }
    };
    eventually(
        "the researcher's denial in the log",
        logged(&[
            "PERMISSION_DENIED",
            "cxrfed://e2e/researcher/-/rita",
            "/cxrfed.v1.NodeService/ListRecords",
        ]),
    )
    .await;
    eventually(
        "the other admin's denial in the log",
        logged(&[
            "PERMISSION_DENIED",
            "cxrfed://e2e/admin/site-b/olga",
            "/cxrfed.v1.NodeService/Status",
        ]),
    )
    .await;
    // Served requests carry the identity in their span.
    let out = node.cli(&["records"]);
    assert!(out.status.success());
    eventually(
        "served requests naming the caller",
        logged(&["request finished", "cxrfed://e2e/admin/site-a/admin-site-a"]),
    )
    .await;
}

fn uuid_like() -> String {
    "0190c6b2-1f5e-7a31-9a44-0c3f1e2d4b5a".into()
}

#[tokio::test(flavor = "multi_thread")]
async fn python_grpcio_calls_the_node_with_certificates_and_is_refused_without() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProcess::start(dir.path(), &["--model", "none", "--site", "site-py"]);
    let target = format!("127.0.0.1:{}", node.port);
    let script = cxrfed_e2e::workspace_root().join("tests/helpers/grpcio_client.py");
    let ca = node.pki.ca_pem();
    let cert = node.admin.join(pki::CERT);
    let key = node.admin.join(pki::KEY);
    let run = |with_cert: bool| {
        let mut cmd = std::process::Command::new(venv_python());
        cmd.arg(&script)
            .args(["--target", &target, "--ca", ca.to_str().expect("path")]);
        if with_cert {
            cmd.args([
                "--cert",
                cert.to_str().expect("path"),
                "--key",
                key.to_str().expect("path"),
            ]);
        }
        let out = cmd.output().expect("run python");
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("JSON line")
    };

    let answer = run(true);
    assert_eq!(answer["ok"], true, "{answer}");
    let bytes = hex_decode(answer["response_hex"].as_str().expect("hex"));
    let status = pb::StatusResponse::decode(bytes.as_slice()).expect("StatusResponse");
    assert_eq!(status.site, "site-py");

    let answer = run(false);
    assert_eq!(answer["ok"], false, "{answer}");
    assert_eq!(answer["code"], "UNAUTHENTICATED", "{answer}");
}

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn revocation_and_rotation_through_the_cli_without_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProcess::start(dir.path(), &["--model", "none"]);
    let ca_dir = node.pki.root.join("ca");
    let bob = node.pki.identity(Role::Admin, "bob", Some("local"));
    let mut as_bob = NodeServiceClient::new(node.channel_as(&bob).await);
    as_bob
        .status(pb::StatusRequest {})
        .await
        .expect("bob before revocation");

    let out = cxrfed(&[
        "certs",
        "revoke",
        "--ca",
        ca_dir.to_str().expect("path"),
        bob.join(pki::CERT).to_str().expect("path"),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("cxrfed://e2e/admin/local/bob"));
    eventually("revocation on the open connection", async || {
        as_bob
            .status(pb::StatusRequest {})
            .await
            .is_err_and(|s| s.code() == Code::Unauthenticated && s.message().contains("revoked"))
    })
    .await;
    // The site admin is unaffected.
    let mut admin = NodeServiceClient::new(node.channel().await);
    admin.status(pb::StatusRequest {}).await.expect("admin");

    // Rotate the node's own certificate in place.
    let node_dir = node.pki.root.join("node-local");
    let before = pki::inspect(&node_dir.join(pki::CERT)).expect("inspect");
    let out = cxrfed(&[
        "certs",
        "issue",
        "--ca",
        ca_dir.to_str().expect("path"),
        "--role",
        "node",
        "--name",
        "node-local",
        "--site",
        "local",
        "--force",
        "--out",
        node_dir.to_str().expect("path"),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let after = pki::inspect(&node_dir.join(pki::CERT)).expect("inspect");
    assert_ne!(before.fingerprint_sha256, after.fingerprint_sha256);
    eventually("the node reloading its certificate", async || {
        node_log(&node).contains(&after.fingerprint_sha256)
    })
    .await;
    // Open and new connections keep working.
    admin
        .status(pb::StatusRequest {})
        .await
        .expect("open connection");
    let mut fresh = NodeServiceClient::new(node.channel().await);
    fresh
        .status(pb::StatusRequest {})
        .await
        .expect("new connection");
}

#[test]
fn a_plaintext_client_against_a_tls_node_fails_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProcess::start(dir.path(), &["--model", "none"]);
    let plain = format!("http://127.0.0.1:{}", node.port);
    let out = cxrfed(&["records", "--node", &plain]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("https://"), "the error says what to do: {err}");
    // An https client without any credentials is told what to pass.
    let out = cxrfed(&["records", "--node", &node.url()]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--profile"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn start_up_refusals() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let data = data.to_str().expect("path");
    let pki = TestPki::at(&dir.path().join("pki"));
    let node_dir = pki.identity(Role::Node, "node-local", Some("local"));
    let ca = pki.ca_pem();
    let cert = node_dir.join(pki::CERT);
    let key = node_dir.join(pki::KEY);
    let listen = format!("127.0.0.1:{}", free_port());
    let serve = |extra: &[&str]| {
        let mut args = vec!["node", "serve", "--data-dir", data, "--listen", &listen];
        args.extend_from_slice(extra);
        NodeProcess::start_failure(&args)
    };
    let tls = [
        "--ca",
        ca.to_str().expect("path"),
        "--cert",
        cert.to_str().expect("path"),
        "--key",
        key.to_str().expect("path"),
    ];

    // No TLS files and no --insecure-dev.
    let err = serve(&[]);
    assert!(err.contains("--ca, --cert and --key"), "{err}");

    // A private key others can read.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let err = serve(&tls);
    assert!(
        err.contains("readable by other users") && err.contains("chmod 600"),
        "{err}"
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");

    // A certificate that is not a node's.
    let admin = pki.identity(Role::Admin, "admin-local", Some("local"));
    let admin_cert = admin.join(pki::CERT);
    let admin_key = admin.join(pki::KEY);
    let err = serve(&[
        "--ca",
        ca.to_str().expect("path"),
        "--cert",
        admin_cert.to_str().expect("path"),
        "--key",
        admin_key.to_str().expect("path"),
    ]);
    assert!(err.contains("needs a node certificate"), "{err}");

    // A site that contradicts the certificate.
    let mut with_site = tls.to_vec();
    with_site.extend(["--site", "elsewhere"]);
    let err = serve(&with_site);
    assert!(err.contains("site"), "{err}");

    // --insecure-dev off loopback.
    let err = NodeProcess::start_failure(&[
        "node",
        "serve",
        "--data-dir",
        data,
        "--listen",
        "0.0.0.0:0",
        "--insecure-dev",
    ]);
    assert!(err.contains("non-loopback"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn insecure_dev_serves_plaintext_on_loopback_with_a_loud_warning() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mut child = std::process::Command::new(cxrfed_e2e::cxrfed_bin())
        .args([
            "node",
            "serve",
            "--data-dir",
            dir.path().to_str().expect("path"),
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--insecure-dev",
            "--model",
            "none",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let url = format!("http://127.0.0.1:{port}");
    let mut served = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline && served.is_none() {
        if let Ok(channel) = cxrfed_auth::client::connect(&url, None).await {
            served = NodeServiceClient::new(channel)
                .status(pb::StatusRequest {})
                .await
                .ok();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    let status = served.expect("plaintext Status on loopback").into_inner();
    assert_eq!(status.site, "local");
    let log = std::fs::read_to_string(dir.path().join("logs/node.log")).expect("log");
    assert!(log.contains("--insecure-dev: plaintext gRPC WITHOUT client authentication"));
}
