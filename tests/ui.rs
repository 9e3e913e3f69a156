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
    CoordinatorProcess, NodeProcess, TestPki, cxrfed_bin, free_port, pydicom_data_dir, text,
    venv_python, workspace_root, write_phantoms,
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
    let out = node.cli(&["ingest", phantoms.to_str().expect("path")]);
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
    let out = cxrfed_e2e::cxrfed(&[
        "node",
        "budget",
        "set",
        "--data-dir",
        node.data_dir_str(),
        "--identity",
        "rita",
        "--epsilon",
        "3",
        "--profile",
        &node.profile(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
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
    let coordinator = CoordinatorProcess::start(&root.join("coordinator"), &pki);
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
        let node = NodeProcess::start_in(
            &root.join(site),
            free_port(),
            pki.clone(),
            &["--site", site, "--coordinator", &coordinator.url()],
        );
        for args in [
            vec!["ingest", images.to_str().expect("path")],
            vec!["field", "define", "cardiomegaly", "--type", "bool"],
            vec!["annotate", "import", labels.to_str().expect("path")],
        ] {
            let out = node.cli(&args);
            assert!(out.status.success(), "{}", text(&out.stderr));
        }
        node.training_policy(&[
            "enabled=true",
            "min_batch_size=2",
            "min_local_steps=1",
            "min_held_out=1",
            "max_metrics_epsilon=10",
        ]);
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
    drop(nodes);
}
