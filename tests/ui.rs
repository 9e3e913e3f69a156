//! The web console (`cxrfed ui`) in a real browser: headless Chromium (Debian's, installed by
//! `make test`) driven through chromedriver by Selenium (tests/helpers/ui_browser.py), against
//! real nodes and a real coordinator on loopback with mutual TLS. The browser-side security
//! (token, cookie, CSRF, CSP, a forged cross-site POST) is checked with plain HTTP and the
//! browser; accessibility with axe-core. Screenshots land in target/ui-screenshots/.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use cxrfed_auth::Role;
use cxrfed_auth::pki;
use cxrfed_e2e::{
    CoordinatorProcess, NodeProcess, TestPki, cxrfed_bin, free_port, metric, pydicom_data_dir,
    scrape_metrics, text, venv_python, workspace_root, write_phantoms,
};

/// A running `cxrfed ui` and the login URL it printed.
struct Console {
    child: Child,
    url: String,
}

impl Console {
    fn start(args: &[&str]) -> Console {
        let mut child = Command::new(cxrfed_bin())
            .arg("ui")
            .args(args)
            .args(["--listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn cxrfed ui");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read the login URL");
        let url = line.trim().to_string();
        assert!(
            url.starts_with("http://127.0.0.1:") && url.contains("/login?token="),
            "cxrfed ui printed {url:?}"
        );
        Console { child, url }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn shots(name: &str) -> PathBuf {
    let dir = workspace_root().join("target/ui-screenshots").join(name);
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    dir
}

/// Runs a scenario of the browser driver; returns its findings (a JSON object).
fn browser(scenario: &str, config: serde_json::Value, work: &Path) -> serde_json::Value {
    let file = work.join(format!("{scenario}.json"));
    std::fs::write(&file, config.to_string()).expect("config");
    let script = workspace_root().join("tests/helpers/ui_browser.py");
    let out = Command::new(venv_python())
        .arg(&script)
        .arg(scenario)
        .arg(&file)
        .stdin(Stdio::null())
        .output()
        .expect("run the browser driver");
    let stdout = text(&out.stdout);
    eprintln!("{scenario}: {stdout}");
    assert!(
        out.status.success(),
        "{scenario} failed:\n{stdout}\n{}",
        text(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or("{}")).expect("findings JSON")
}

fn profile(dir: &Path) -> String {
    dir.join(pki::PROFILE)
        .to_str()
        .expect("utf-8 path")
        .to_string()
}

#[test]
fn a_site_admin_and_a_researcher_use_the_console_in_chromium() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProcess::start(&dir.path().join("node"), &[]);
    // A few phantoms so statistics have something to count, and labelling something to label.
    let phantoms = dir.path().join("phantoms");
    write_phantoms(&phantoms, 6, 31, 256);
    // As a node-side ingest job, which the status page lists with its progress.
    let out = cxrfed_e2e::cxrfed(&[
        "node",
        "ingest",
        phantoms.to_str().expect("path"),
        "--data-dir",
        node.data_dir_str(),
        "--profile",
        &node.profile(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // RG1 (a real adult PA chest CR, DICOM) and a PNG of a real radiograph.
    let rg1 = pydicom_data_dir().join("RG1_UNCI.dcm");
    let png = dir.path().join("radiograph.png");
    let out = Command::new(venv_python())
        .args([
            "-c",
            "import sys, numpy as np, pydicom; from PIL import Image\n\
             a = pydicom.dcmread(sys.argv[1]).pixel_array.astype(np.float64)\n\
             a = (255 * (a - a.min()) / max(1, a.max() - a.min())).astype(np.uint8)\n\
             Image.fromarray(a).resize((512, 512)).save(sys.argv[2])",
            rg1.to_str().expect("path"),
            png.to_str().expect("path"),
        ])
        .output()
        .expect("python");
    assert!(out.status.success(), "{}", text(&out.stderr));

    let admin = Console::start(&["--node", &node.url(), "--profile", &node.profile()]);
    let found = browser(
        "admin",
        serde_json::json!({
            "url": admin.url,
            "shots": shots("admin"),
            "uploads": [rg1, png],
        }),
        dir.path(),
    );
    assert_eq!(found["uploaded"].as_array().map(Vec::len), Some(2));
    assert!(
        found["answer"]
            .as_str()
            .is_some_and(|a| a.contains("costophrenic")),
        "{found}"
    );
    eprintln!(
        "wrong-token refusals, median ms (reported, not asserted): {}",
        found["wrong_token_median_ms"]
    );

    // A researcher with a budget at this node: DP statistics only.
    let researcher = node.pki.identity(Role::Researcher, "rita", None);
    node.set_budget("rita", "3");
    let console = Console::start(&["--node", &node.url(), "--profile", &profile(&researcher)]);
    let found = browser(
        "researcher",
        serde_json::json!({ "url": console.url, "shots": shots("researcher") }),
        dir.path(),
    );
    assert_ne!(found["budget_before"], found["budget_after"], "{found}");
}

#[test]
fn a_study_admin_starts_and_watches_a_federated_job_in_the_console() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let pki = TestPki::at(&root.join("pki"));
    // The operators' /metrics of the coordinator and of site-a are scraped at the end.
    let (coordinator_metrics, node_metrics) = (free_port(), free_port());
    let coordinator = CoordinatorProcess::start_with(
        &root.join("coordinator"),
        &pki,
        free_port(),
        &[
            "--metrics-listen",
            &format!("127.0.0.1:{coordinator_metrics}"),
        ],
    );
    let node_metrics_listen = format!("127.0.0.1:{node_metrics}");
    let mut nodes = Vec::new();
    for (i, (site, profile)) in [
        ("site-a", "university"),
        ("site-b", "community"),
        ("site-c", "icu"),
    ]
    .iter()
    .enumerate()
    {
        let images = root.join(format!("phantoms-{site}"));
        let (labels, _) = cxrfed_e2e::labelled_phantoms(&images, profile, 16, 90 + i as u32, 160);
        let url = coordinator.url();
        let mut args = vec!["--site", *site, "--coordinator", &url];
        if i == 0 {
            args.extend(["--metrics-listen", &node_metrics_listen]);
        }
        let node = NodeProcess::start_in(&root.join(site), free_port(), pki.clone(), &args);
        for args in [
            vec!["ingest", images.to_str().expect("path")],
            vec!["field", "define", "cardiomegaly", "--type", "bool"],
            vec!["annotate", "import", labels.to_str().expect("path")],
        ] {
            let out = node.cli(&args);
            assert!(out.status.success(), "{}", text(&out.stderr));
        }
        node.allow_phantom_training();
        node.training_budget(500.0, 0.5);
        nodes.push(node);
    }
    let admin = pki.identity(Role::StudyAdmin, "sam", None);
    let console = Console::start(&[
        "--coordinator",
        &coordinator.url(),
        "--profile",
        &profile(&admin),
    ]);
    let job = r#"name = "console head"
new_heads = [{ name = "cardiomegaly", kind = "binary" }]
trainable = "heads"
algorithm = "fedavg"
rounds = 2
local_epochs = 2
batch_size = 8
learning_rate = 0.02
min_sites = 3
round_deadline_secs = 300
metrics_epsilon = 10
"#;
    let found = browser(
        "study",
        serde_json::json!({ "url": console.url, "shots": shots("study"), "job": job }),
        root,
    );
    assert_eq!(found["job"]["state"], "completed", "{found}");
    drop(console);

    // A researcher with a budget at every site asks a federated question.
    let researcher = pki.identity(Role::Researcher, "rita", None);
    for node in &nodes {
        node.set_budget("rita", "3");
    }
    let console = Console::start(&[
        "--coordinator",
        &coordinator.url(),
        "--profile",
        &profile(&researcher),
    ]);
    let found = browser(
        "federated",
        serde_json::json!({ "url": console.url, "shots": shots("federated") }),
        root,
    );
    assert!(
        found["pooled"]
            .as_str()
            .is_some_and(|p| p.contains("3 site(s)")),
        "{found}"
    );

    // What the operators see: the coordinator's rounds, links and the query; site-a's stages,
    // inference and the federated release, by role. Never an identity.
    let (families, raw) = scrape_metrics(coordinator_metrics);
    let at_least = |name: &str, sample: &str, labels: &[(&str, &str)], floor: f64| {
        let value = metric(&families, name, sample, labels);
        assert!(
            value.is_some_and(|v| v >= floor),
            "{name} {labels:?}: {value:?}\n{raw}"
        );
    };
    at_least(
        "cxrfed_round_seconds",
        "cxrfed_round_seconds_count",
        &[],
        2.0,
    );
    at_least("cxrfed_sites_connected", "cxrfed_sites_connected", &[], 3.0);
    at_least(
        "cxrfed_rpc_seconds",
        "cxrfed_rpc_seconds_count",
        &[("method", "Query"), ("outcome", "ok")],
        1.0,
    );
    at_least(
        "cxrfed_dp_epsilon_spent",
        "cxrfed_dp_epsilon_spent_total",
        &[("class", "researcher")],
        0.5,
    );
    for name in ["cxrfed://", "rita", "sam"] {
        assert!(
            !raw.contains(name),
            "{name} in the coordinator's /metrics:\n{raw}"
        );
    }
    let (families, raw) = scrape_metrics(node_metrics);
    let at_least = |name: &str, sample: &str, labels: &[(&str, &str)], floor: f64| {
        let value = metric(&families, name, sample, labels);
        assert!(
            value.is_some_and(|v| v >= floor),
            "{name} {labels:?}: {value:?}\n{raw}"
        );
    };
    for stage in ["permit_wait", "decode", "preprocess", "inference", "store"] {
        at_least(
            "cxrfed_stage_seconds",
            "cxrfed_stage_seconds_count",
            &[("stage", stage)],
            16.0,
        );
    }
    at_least(
        "cxrfed_inference_images",
        "cxrfed_inference_images_total",
        &[],
        16.0,
    );
    at_least(
        "cxrfed_coordinator_link_up",
        "cxrfed_coordinator_link_up",
        &[],
        1.0,
    );
    at_least(
        "cxrfed_dp_releases",
        "cxrfed_dp_releases_total",
        &[("class", "researcher")],
        1.0,
    );
    at_least(
        "cxrfed_rpc_seconds",
        "cxrfed_rpc_seconds_count",
        &[("method", "Extract"), ("outcome", "ok")],
        16.0,
    );
    for name in ["cxrfed://", "rita", "admin-site-a"] {
        assert!(!raw.contains(name), "{name} in the node's /metrics:\n{raw}");
    }

    // The Grafana dashboard asks only for metrics the servers serve (the DICOM receiver's
    // appear only where it runs, refusals after the first).
    let (coordinator_families, _) = scrape_metrics(coordinator_metrics);
    let served: Vec<String> = families
        .as_object()
        .into_iter()
        .chain(coordinator_families.as_object())
        .flat_map(|f| f.keys().cloned())
        .collect();
    let dashboard =
        std::fs::read_to_string(workspace_root().join("deploy/grafana/cxrfed-dashboard.json"))
            .expect("dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard JSON");
    let mut asked = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("cxrfed_") {
                    asked.push(word.to_string());
                }
            }
        }
    }
    for name in asked {
        let family = ["_bucket", "_count", "_sum", "_total"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(&name);
        assert!(
            served.iter().any(|s| s == family)
                || family.starts_with("cxrfed_dicom_")
                || family == "cxrfed_refusals",
            "the dashboard asks for {name}, which no server serves ({served:?})"
        );
    }
}

#[test]
fn the_console_listens_beyond_loopback_only_with_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProcess::start(&dir.path().join("node"), &[]);
    // Without TLS for the browser side, a non-loopback address is refused at start-up.
    let out = cxrfed_e2e::cxrfed(&[
        "ui",
        "--node",
        &node.url(),
        "--profile",
        &node.profile(),
        "--listen",
        "0.0.0.0:0",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("needs TLS"),
        "{}",
        text(&out.stderr)
    );
    // With a certificate (here one of the study CA's), it serves HTTPS and the cookie is
    // Secure.
    let web = node.pki.identity(Role::Node, "console-web", Some("local"));
    let (cert, key) = (web.join(pki::CERT), web.join(pki::KEY));
    let mut child = Command::new(cxrfed_bin())
        .args(["ui", "--node", &node.url(), "--profile", &node.profile()])
        .args(["--listen", "0.0.0.0:0"])
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn cxrfed ui");
    let mut url = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut url)
        .expect("login URL");
    let console = Console {
        child,
        url: url.trim().to_string(),
    };
    assert!(console.url.starts_with("https://"), "{}", console.url);
    let out = Command::new(venv_python())
        .args([
            "-c",
            "import http.client, ssl, sys, urllib.parse\n\
             u = urllib.parse.urlsplit(sys.argv[1])\n\
             ctx = ssl.create_default_context(cafile=sys.argv[2]); ctx.check_hostname = False\n\
             c = http.client.HTTPSConnection(u.hostname, u.port, context=ctx)\n\
             c.request('GET', u.path + '?' + u.query); r = c.getresponse()\n\
             print(r.status, r.getheader('Set-Cookie'))",
            &console.url,
            node.pki.ca_pem().to_str().expect("path"),
        ])
        .output()
        .expect("python");
    let said = text(&out.stdout);
    assert!(out.status.success(), "{said}{}", text(&out.stderr));
    assert!(said.starts_with("303 "), "{said}");
    assert!(
        said.contains("HttpOnly") && said.contains("SameSite=Strict") && said.contains("Secure"),
        "{said}"
    );
}
