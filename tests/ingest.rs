//! End-to-end batch ingest: a phantom folder with corrupt and non-image files mixed in, through
//! the real binary and a real node; reruns resume; a node killed mid-ingest loses nothing and
//! stores nothing twice.

use std::time::{Duration, Instant};

use cxrfed_e2e::{NodeProcess, cxrfed, text, write_phantoms};

fn record_count(node: &NodeProcess) -> u64 {
    let out = node.cli(&["stats", "count", "--format", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    v["rows"][0][0].as_u64().expect("count")
}

#[test]
fn a_mixed_folder_is_ingested_with_rejects_reported_and_a_rerun_adds_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let folder = dir.path().join("export");
    write_phantoms(&folder.join("nested/deeper"), 10, 41, 320);
    // Corrupt and non-image files mixed in (labels.json and labels.csv are there already).
    let good = std::fs::read_dir(folder.join("nested/deeper"))
        .expect("dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "dcm"))
        .expect("a phantom");
    let bytes = std::fs::read(&good).expect("read");
    std::fs::write(folder.join("truncated.dcm"), &bytes[..400]).expect("write");
    std::fs::write(folder.join("notes.txt"), b"scanned 2020-01, see PACS").expect("write");
    std::fs::write(folder.join("empty.dcm"), b"").expect("write");

    let node = NodeProcess::start(&dir.path().join("node"), &["--model", "none"]);
    let report = dir.path().join("rejects.jsonl");
    let state = dir.path().join("state.jsonl");
    let ingest = |extra: &[&str]| {
        let mut args = vec![
            "ingest",
            folder.to_str().expect("path"),
            "--report",
            report.to_str().expect("path"),
            "--state",
            state.to_str().expect("path"),
        ];
        args.extend_from_slice(extra);
        let out = node.cli(&args);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let summary = ingest(&[]);
    assert!(
        summary.contains("ingested 10, already present 0"),
        "{summary}"
    );
    assert!(summary.contains("rejected 5"), "{summary}");
    assert!(summary.contains("rejected not_an_image: 4"), "{summary}");
    assert_eq!(record_count(&node), 10);
    let rejects: Vec<serde_json::Value> = std::fs::read_to_string(&report)
        .expect("report")
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(rejects.len(), 5);
    let truncated = rejects
        .iter()
        .find(|r| r["path"] == "truncated.dcm")
        .expect("truncated reported");
    assert_ne!(truncated["reason"], "not_an_image");
    assert!(!truncated["message"].as_str().expect("message").is_empty());

    // A rerun ingests nothing new.
    let summary = ingest(&[]);
    assert!(
        summary
            .contains("ingested 0, already present 0, skipped (unchanged since an earlier run) 10"),
        "{summary}"
    );
    // Without the state file the node's de-duplication still stores nothing twice.
    std::fs::remove_file(&state).expect("rm state");
    let summary = ingest(&[]);
    assert!(
        summary.contains("ingested 0, already present 10"),
        "{summary}"
    );
    assert_eq!(record_count(&node), 10);
}

#[test]
fn a_node_killed_mid_ingest_stores_every_image_exactly_once_after_a_rerun() {
    let dir = tempfile::tempdir().expect("tempdir");
    let folder = dir.path().join("export");
    write_phantoms(&folder, 40, 43, 320);
    let data = dir.path().join("node");
    let mut node = NodeProcess::start(&data, &["--model", "none"]);
    let state = dir.path().join("state.jsonl");
    let report = dir.path().join("rejects.jsonl");
    let args = |node: &NodeProcess| {
        vec![
            "ingest".to_string(),
            folder.to_str().expect("path").to_string(),
            "--concurrency".into(),
            "2".into(),
            "--state".into(),
            state.to_str().expect("path").to_string(),
            "--report".into(),
            report.to_str().expect("path").to_string(),
            "--node".into(),
            node.url(),
            "--profile".into(),
            node.profile(),
        ]
    };
    let mut ingest = std::process::Command::new(cxrfed_e2e::cxrfed_bin())
        .args(args(&node))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn ingest");
    // Kill the node once a few images are in.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let lines = std::fs::read_to_string(&state)
            .map(|s| s.lines().filter(|l| l.contains("\"ingested\"")).count())
            .unwrap_or(0);
        if lines >= 5 {
            break;
        }
        assert!(Instant::now() < deadline, "ingest made no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    node.kill();
    let status = ingest.wait().expect("ingest exits");
    assert!(
        status.success(),
        "the ingest reports failures as rejects and exits cleanly"
    );

    let node = NodeProcess::start(&data, &["--model", "none"]);
    let out = cxrfed(&args(&node).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let summary = text(&out.stdout);
    assert!(
        summary.contains("rejected 2 "),
        "labels.json and labels.csv only: {summary}"
    );
    // 40 phantoms, each stored once.
    assert_eq!(record_count(&node), 40, "{summary}");
    let out = node.cli(&["export", "--format", "csv"]);
    let csv = text(&out.stdout);
    let mut hashes: Vec<&str> = csv
        .lines()
        .skip(1)
        .filter_map(|l| l.split(',').nth(1))
        .collect();
    let total = hashes.len();
    hashes.sort_unstable();
    hashes.dedup();
    assert_eq!((total, hashes.len()), (40, 40));
}

#[test]
fn the_node_ingests_a_folder_on_its_own_disk_as_a_background_job() {
    let dir = tempfile::tempdir().expect("tempdir");
    let folder = dir.path().join("pacs-export");
    write_phantoms(&folder.join("a"), 6, 51, 320);
    std::fs::write(folder.join("README.txt"), b"export of 2020").expect("write");
    let data = dir.path().join("node");
    let node = NodeProcess::start(&data, &["--model", "none"]);
    let run = |extra: &[&str]| {
        let mut args = vec![
            "node",
            "ingest",
            folder.to_str().expect("path"),
            "--data-dir",
            data.to_str().expect("path"),
        ];
        args.extend_from_slice(extra);
        let profile = node.profile();
        args.extend(["--profile", profile.as_str()]);
        let out = cxrfed(&args);
        assert!(
            out.status.success(),
            "{}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    };
    let summary = run(&[]);
    assert!(
        summary.contains("done: 9/9 files, ingested 6, already present 0, rejected 3"),
        "{summary}"
    );
    assert!(summary.contains("rejected not_an_image: 3"), "{summary}");
    assert_eq!(record_count(&node), 6);
    let summary = run(&[]);
    assert!(
        summary.contains("ingested 0, already present 6"),
        "{summary}"
    );
    // `node status` lists the jobs.
    let out = cxrfed(&[
        "node",
        "status",
        "--data-dir",
        data.to_str().expect("path"),
        "--profile",
        &node.profile(),
    ]);
    let status = text(&out.stdout);
    assert_eq!(status.matches("  ingest job ").count(), 2, "{status}");
    // A relative or missing folder is refused.
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let refused = runtime.block_on(async {
        let mut client =
            cxrfed_proto::v1::node_service_client::NodeServiceClient::new(node.channel().await);
        client
            .start_ingest(cxrfed_proto::v1::StartIngestRequest {
                folder: "relative/path".into(),
                force: false,
            })
            .await
            .expect_err("relative path")
    });
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
}
