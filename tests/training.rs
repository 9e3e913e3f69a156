//! Federated fine-tuning end to end: a coordinator and three nodes as real processes on
//! loopback with mutual TLS. A researcher-defined field gets a new head trained by FedAvg on
//! non-IID phantom sites; the coordinator is SIGKILLed mid-job and resumes; a node killed
//! mid-round is dropped above `min_sites`; below it the job fails with the reason.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cxrfed_auth::Role;
use cxrfed_e2e::{CoordinatorProcess, NodeProcess, TestPki, cxrfed, free_port, text};
use cxrfed_proto::v1 as pb;
use cxrfed_proto::v1::coordinator_service_client::CoordinatorServiceClient;
use tonic::transport::Channel;

const SITES: [(&str, &str, u32); 3] = [
    ("site-a", "university", 36),
    ("site-b", "community", 30),
    ("site-c", "icu", 26),
];

struct Study {
    _dir: tempfile::TempDir,
    root: PathBuf,
    pki: TestPki,
    coordinator: CoordinatorProcess,
    nodes: Vec<NodeProcess>,
    admin: PathBuf,
}

fn phantoms(dir: &Path, profile: &str, count: u32, seed: u32) -> PathBuf {
    cxrfed_e2e::labelled_phantoms(dir, profile, count, seed, 160).0
}

fn start_node(root: &Path, pki: &TestPki, site: &str, port: u16, coordinator: &str) -> NodeProcess {
    NodeProcess::start_in(
        &root.join(site),
        port,
        pki.clone(),
        &["--site", site, "--coordinator", coordinator],
    )
}

async fn study() -> Study {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_path_buf();
    let pki = TestPki::at(&root.join("pki"));
    let coordinator = CoordinatorProcess::start(&root.join("coordinator"), &pki);
    let admin = pki.identity(Role::StudyAdmin, "sam", None);
    let mut nodes = Vec::new();
    for (i, (site, profile, count)) in SITES.iter().enumerate() {
        let images = root.join(format!("phantoms-{site}"));
        let labels = phantoms(&images, profile, *count, 70 + i as u32);
        let node = start_node(&root, &pki, site, free_port(), &coordinator.url());
        let out = node.cli(&["ingest", images.to_str().expect("path")]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let out = node.cli(&[
            "field",
            "define",
            "cardiomegaly",
            "--type",
            "bool",
            "--description",
            "cardiothoracic ratio above 0.5",
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let out = node.cli(&["annotate", "import", labels.to_str().expect("path")]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(
            text(&out.stdout).contains(&format!("imported {count} labels")),
            "{}",
            text(&out.stdout)
        );
        // Each site opts in, on terms loose enough for phantom-sized datasets, and gives the
        // study's training account a budget.
        node.allow_phantom_training();
        node.training_budget(500.0, 0.5);
        nodes.push(node);
    }
    let s = Study {
        _dir: dir,
        root,
        pki,
        coordinator,
        nodes,
        admin,
    };
    wait_connected(&s, 3).await;
    s
}

/// Some DICOM file of a phantom folder.
fn first_dicom(dir: &Path) -> PathBuf {
    walk(dir)
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "dcm"))
        .expect("a DICOM phantom")
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

async fn client(s: &Study) -> CoordinatorServiceClient<Channel> {
    cxrfed_e2e::coordinator_client(&s.coordinator.url(), &s.pki, &s.admin).await
}

async fn wait_connected(s: &Study, n: usize) {
    cxrfed_e2e::wait_sites_connected(&s.coordinator.url(), &s.pki, &s.admin, n).await;
}

async fn base_sha(s: &Study, spec: &str) -> String {
    cxrfed_e2e::base_sha(&s.coordinator.url(), &s.pki, &s.admin, spec).await
}

async fn start_job(s: &Study, spec: &str) -> pb::JobInfo {
    cxrfed_e2e::start_signed_job(&s.coordinator.url(), &s.pki, &s.admin, spec).await
}

/// Polls the job until `done` holds.
async fn wait_job(s: &Study, id: &str, done: impl Fn(&pb::JobInfo) -> bool) -> pb::JobInfo {
    cxrfed_e2e::wait_job(&s.coordinator.url(), &s.pki, &s.admin, id, done).await
}

fn pooled(round: &pb::RoundInfo, key: &str) -> f64 {
    *round
        .pooled_metrics
        .get(key)
        .unwrap_or_else(|| panic!("no {key} in {:?}", round.pooled_metrics))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_rounds_train_a_new_head_and_survive_failures() {
    let mut s = study().await;

    // An unsigned job file is refused; a signed job naming a head the base lacks is refused
    // before anything runs.
    let status = client(&s)
        .await
        .start_job(pb::StartJobRequest {
            spec_toml: "rounds = 1".into(),
            order: None,
        })
        .await
        .expect_err("unsigned");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    let bad_head = "heads = [\"no_such_head\"]";
    let status = client(&s)
        .await
        .start_job(pb::StartJobRequest {
            spec_toml: String::new(),
            order: Some(cxrfed_e2e::signed_job(
                &s.admin,
                "e2e",
                bad_head,
                &base_sha(&s, bad_head).await,
            )),
        })
        .await
        .expect_err("unknown head");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");

    // A new head for the custom field, FedAvg over three non-IID sites.
    let job = start_job(
        &s,
        r#"
        name = "cardiomegaly head"
        new_heads = [{ name = "cardiomegaly", kind = "binary" }]
        trainable = "heads"
        algorithm = "fedavg"
        rounds = 3
        local_epochs = 4
        batch_size = 8
        learning_rate = 0.02
        min_sites = 3
        round_deadline_secs = 300
        metrics_epsilon = 10
        "#,
    )
    .await;
    assert_eq!(job.state(), pb::JobState::Running);
    let id = job.job_id.clone();

    // The coordinator is SIGKILLed once the first round is committed, and restarted on the
    // same port and data directory; the job resumes at round 2.
    let after_one = wait_job(&s, &id, |j| {
        j.completed_rounds >= 1 || j.state() != pb::JobState::Running
    })
    .await;
    assert_eq!(
        after_one.state(),
        pb::JobState::Running,
        "{}",
        after_one.reason
    );
    let port = s.coordinator.port;
    s.coordinator.kill();
    s.coordinator = CoordinatorProcess::start_on(&s.root.join("coordinator"), &s.pki, port);
    wait_connected(&s, 3).await;
    let done = wait_job(&s, &id, |j| j.state() != pb::JobState::Running).await;
    assert_eq!(done.state(), pb::JobState::Completed, "{}", done.reason);
    assert_eq!(done.completed_rounds, 3);

    // Every round completed exactly once, each with all three sites; a round cut by the
    // restart shows as interrupted (and its redo as a later attempt), never as a second
    // completion.
    let completed: Vec<&pb::RoundInfo> = done
        .round_log
        .iter()
        .filter(|r| r.state() == pb::RoundState::Completed)
        .collect();
    assert_eq!(
        completed.iter().map(|r| r.round).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    for r in &done.round_log {
        assert!(
            [
                pb::RoundState::Completed,
                pb::RoundState::Interrupted,
                pb::RoundState::Evaluation
            ]
            .contains(&r.state()),
            "round {} attempt {}: {:?}",
            r.round,
            r.attempt,
            r.state()
        );
    }
    for r in &completed {
        assert_eq!(
            r.sites
                .iter()
                .filter(|s| s.status() == pb::SiteRoundStatus::Reported)
                .count(),
            3
        );
        assert!(
            r.sites
                .iter()
                .all(|s| s.update_bytes > 0 && s.epsilon_charged > 0.0)
        );
        assert!(r.bytes_down > 0 && r.bytes_up > 0);
    }
    let evaluation = done
        .round_log
        .iter()
        .find(|r| r.state() == pb::RoundState::Evaluation)
        .expect("closing evaluation");

    // The starting head is zero (p = 0.5 everywhere, every record called positive); the
    // trained one is more accurate on the sites' held-out records (pooled noisy counts).
    let before = pooled(completed[0], "cardiomegaly.accuracy");
    let after = pooled(evaluation, "cardiomegaly.accuracy");
    let held_out: u64 = evaluation.sites.iter().map(|s| s.eval_samples).sum();
    for r in &done.round_log {
        eprintln!(
            "round {}.{} {:?}: pooled {:?}; losses {:?}",
            r.round,
            r.attempt,
            r.state(),
            r.pooled_metrics,
            r.sites
                .iter()
                .map(|s| (s.site.as_str(), s.samples, s.train_loss))
                .collect::<Vec<_>>()
        );
    }
    assert!(held_out >= 10, "{held_out} held-out records");
    assert!(after > before, "accuracy {before} -> {after}");
    assert!(after >= 0.7, "accuracy {before} -> {after}");

    // The registry holds the lineage r0 (new head) -> r1 -> r2 -> r3, with sites and samples.
    let models: BTreeMap<String, pb::ModelVersion> = client(&s)
        .await
        .list_models(pb::ListModelsRequest {})
        .await
        .expect("models")
        .into_inner()
        .models
        .into_iter()
        .map(|m| (m.version.clone(), m))
        .collect();
    let r0 = &models[&format!("{id}.r0")];
    assert_eq!(r0.parent, "tiny-phantom-v1");
    assert!(r0.heads.contains(&"cardiomegaly".to_string()));
    for round in 1..=3 {
        let m = &models[&format!("{id}.r{round}")];
        assert_eq!(m.parent, format!("{id}.r{}", round - 1));
        assert_eq!(m.sites, vec!["site-a", "site-b", "site-c"]);
        assert_eq!(m.samples.len(), 3);
        assert_eq!(m.sha256.len(), 64);
        assert_eq!(m.algorithm, "fedavg");
    }
    assert!(
        models[&format!("{id}.r3")]
            .metrics
            .contains_key("cardiomegaly.accuracy")
    );
    assert_eq!(done.latest_model, format!("{id}.r3"));

    // The CLI shows the job and the registry.
    let ca = s.pki.ca_pem();
    let profile = ["--ca", ca.to_str().expect("path")];
    let cert = s.admin.join(cxrfed_auth::pki::CERT);
    let key = s.admin.join(cxrfed_auth::pki::KEY);
    let url = s.coordinator.url();
    let common = [
        "--coordinator",
        &url,
        profile[0],
        profile[1],
        "--cert",
        cert.to_str().expect("path"),
        "--key",
        key.to_str().expect("path"),
    ];
    let mut args = vec!["job", "status", id.as_str()];
    args.extend(common.iter().copied());
    let out = cxrfed(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(
        shown.contains("completed") && shown.contains("cardiomegaly.accuracy"),
        "{shown}"
    );
    let mut args = vec!["registry", "list"];
    args.extend(common.iter().copied());
    let out = cxrfed(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&format!("{id}.r3")));
    // The first generation's spellings still work for one version (`models` for `registry`,
    // `jobs` for `job list`), the latter with a note.
    for old in [vec!["models", "list"], vec!["jobs"]] {
        let mut args = old.clone();
        args.extend(common.iter().copied());
        let out = cxrfed(&args);
        assert!(out.status.success(), "{old:?}: {}", text(&out.stderr));
        assert!(
            text(&out.stdout).contains(&id),
            "{old:?}: {}",
            text(&out.stdout)
        );
    }

    // The Python SDK reads the registry, the jobs and a round log into pandas.
    let admin_profile = s.admin.join(cxrfed_auth::pki::PROFILE);
    let out = cxrfed_e2e::run_python(
        "tests/helpers/training_sdk.py",
        &[
            "--coordinator",
            &url,
            "--profile",
            admin_profile.to_str().expect("path"),
            "--job",
            &id,
        ],
    );
    let seen: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(seen["job_state"], "completed");
    assert_eq!(seen["completed_rounds"], serde_json::json!([1, 2, 3]));
    assert_eq!(seen["sites_per_round"], 3);
    assert_eq!(seen["parent_of_last"], format!("{id}.r2"));
    assert!(
        seen["final_accuracy"].as_f64().expect("accuracy") > 0.5,
        "{seen}"
    );

    // Promotion: every node receives r3 over its link, switches inference to it while
    // extraction requests keep coming (none fails), and back-fills its records, so the custom
    // field is filled by the model everywhere.
    let version = format!("{id}.r3");
    let busy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let probe_file = first_dicom(&s.root.join("phantoms-site-a"));
    let extractor = {
        let (busy, url, profile) = (busy.clone(), s.nodes[0].url(), s.nodes[0].profile());
        let file = probe_file.to_str().expect("path").to_string();
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0, Vec::new());
            while busy.load(std::sync::atomic::Ordering::SeqCst) || ok == 0 {
                let out = cxrfed(&[
                    "extract",
                    &file,
                    "--force",
                    "--node",
                    &url,
                    "--profile",
                    &profile,
                ]);
                if out.status.success() {
                    ok += 1;
                } else {
                    failed.push(text(&out.stderr));
                }
            }
            (ok, failed)
        })
    };
    // Site-b's findings before the promotion, to compare after a rollback.
    let before_promotion = findings_of(&s.nodes[1]);
    // A site admin cannot promote (nor start jobs or import): that is the study admin's.
    let site_admin = s.nodes[0].profile();
    let out = cxrfed(&[
        "registry",
        "promote",
        version.as_str(),
        "--coordinator",
        &url,
        "--profile",
        &site_admin,
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("study admin"),
        "{}",
        text(&out.stderr)
    );
    let mut args = vec!["registry", "promote", version.as_str(), "--json"];
    args.extend(common.iter().copied());
    let out = cxrfed(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let promoted: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        promoted["sent_to"],
        serde_json::json!(["site-a", "site-b", "site-c"])
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let m = client(&s)
            .await
            .get_model(pb::GetModelRequest {
                version: version.clone(),
            })
            .await
            .expect("model")
            .into_inner();
        if m.running_at.len() == 3 {
            assert!(!m.promoted_at.is_empty());
            break;
        }
        assert!(Instant::now() < deadline, "running at {:?}", m.running_at);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    busy.store(false, std::sync::atomic::Ordering::SeqCst);
    let (extracted, failed) = extractor.join().expect("extractor");
    assert!(
        failed.is_empty(),
        "{} of {} extractions failed during the switch: {:?}",
        failed.len(),
        extracted + failed.len(),
        failed.first()
    );
    // The back-fill gives every stored record the new model's values, cardiomegaly included.
    for node in &s.nodes {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let out = node.cli(&["records", "--limit", "1000"]);
            assert!(out.status.success(), "{}", text(&out.stderr));
            let records: Vec<serde_json::Value> = text(&out.stdout)
                .lines()
                .map(|l| serde_json::from_str(l).expect("record"))
                .collect();
            let filled = records
                .iter()
                .filter(|r| {
                    r["model_id"] == version.as_str()
                        && r["model_fields"]["cardiomegaly"].is_string()
                })
                .count();
            if filled == records.len() && !records.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{filled} of {} records back-filled",
                records.len()
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    // The node reports the back-fill's progress. Site-b: at site-a the forced extractions
    // above replace records while its back-fill runs (a replaced record counts as skipped).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = cxrfed_proto::v1::node_service_client::NodeServiceClient::new(
            s.nodes[1].channel().await,
        )
        .status(pb::StatusRequest {})
        .await
        .expect("status")
        .into_inner();
        let backfill = status.backfill.expect("a back-fill ran");
        assert_eq!(backfill.model_id, version);
        assert_eq!(status.model_id, version);
        if backfill.state == "finished" {
            assert_eq!(backfill.done, backfill.total, "{backfill:?}");
            assert_eq!(backfill.failed, 0);
            break;
        }
        assert!(Instant::now() < deadline, "{backfill:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // New images at site-b are extracted by the promoted model: unlabelled, their cardiomegaly
    // comes from it; the site's exact statistics count labels first, then the model's values.
    let extra = s.root.join("phantoms-extra");
    phantoms(&extra, "community", 12, 99);
    let out = s.nodes[1].cli(&["ingest", extra.to_str().expect("path")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = s.nodes[1].cli(&["records", "--limit", "1000"]);
    let records: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("record"))
        .collect();
    let value_of = |r: &serde_json::Value| {
        r["custom_fields"]["cardiomegaly"]
            .as_str()
            .or(r["model_fields"]["cardiomegaly"].as_str())
            .map(str::to_string)
    };
    let unlabelled = records
        .iter()
        .filter(|r| r["custom_fields"]["cardiomegaly"].is_null())
        .count();
    assert_eq!(unlabelled, 12, "the new images carry no label");
    let expected_true = records
        .iter()
        .filter(|r| value_of(r).as_deref() == Some("true"))
        .count();
    let out = s.nodes[1].cli(&[
        "stats",
        "count where cardiomegaly = true",
        "--format",
        "json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(table["rows"][0][0].as_f64(), Some(expected_true as f64));
    // And a study researcher asks the federation about the model-filled field, with DP.
    let rita = s.pki.identity(Role::Researcher, "rita", None);
    for node in &s.nodes {
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
            &node.profile(),
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let out = cxrfed(&[
        "query",
        "histogram cardiomegaly",
        "--epsilon",
        "1",
        "--min-sites",
        "3",
        "--coordinator",
        &url,
        "--ca",
        ca.to_str().expect("path"),
        "--cert",
        rita.join(cxrfed_auth::pki::CERT).to_str().expect("path"),
        "--key",
        rita.join(cxrfed_auth::pki::KEY).to_str().expect("path"),
        "--format",
        "json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(answer["answered"], 3, "{answer}");
    let labels: Vec<String> = answer["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r["labels"][0].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(
        labels.contains(&"true".to_string()) && labels.contains(&"false".to_string()),
        "{answer}"
    );

    // A node killed mid-round: with min_sites 2 the round completes without it.
    let job = start_job(
        &s,
        &format!(
            "base = \"{id}.r3\"\nheads = [\"cardiomegaly\"]\nrounds = 1\nlocal_steps = 300\nbatch_size = 4\nmin_sites = 2\nround_deadline_secs = 40\nattempts = 1\n"
        ),
    )
    .await;
    wait_job(&s, &job.job_id, |j| {
        j.round_log.first().is_some_and(|r| !r.sites.is_empty())
    })
    .await;
    // 300 local steps take each site seconds: site-c dies while training.
    tokio::time::sleep(Duration::from_millis(700)).await;
    s.nodes[2].kill();
    let done = wait_job(&s, &job.job_id, |j| j.state() != pb::JobState::Running).await;
    assert_eq!(done.state(), pb::JobState::Completed, "{}", done.reason);
    let round = done
        .round_log
        .iter()
        .find(|r| r.state() == pb::RoundState::Completed)
        .expect("round");
    let c = round
        .sites
        .iter()
        .find(|s| s.site == "site-c")
        .expect("site-c");
    assert_eq!(c.status(), pb::SiteRoundStatus::Dropped, "{c:?}");
    assert!(
        c.reason.contains("round key") || c.reason.contains("deadline"),
        "{}",
        c.reason
    );
    assert_eq!(
        round
            .sites
            .iter()
            .filter(|s| s.status() == pb::SiteRoundStatus::Reported)
            .count(),
        2
    );

    // Below min_sites the job fails with the reason.
    let job = start_job(
        &s,
        &format!(
            "base = \"{id}.r3\"\nrounds = 1\nmin_sites = 3\nround_deadline_secs = 3\nattempts = 1\n"
        ),
    )
    .await;
    let failed = wait_job(&s, &job.job_id, |j| j.state() != pb::JobState::Running).await;
    assert_eq!(failed.state(), pb::JobState::Failed);
    assert!(
        failed.reason.contains("min_sites is 3"),
        "{}",
        failed.reason
    );

    // The killed node restarts: it comes back with the promoted model it had installed (kept
    // across the restart) and joins the next job's rounds.
    let port = free_port();
    let url_c = s.coordinator.url();
    s.nodes[2] = start_node(&s.root, &s.pki, "site-c", port, &url_c);
    wait_connected(&s, 3).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let sites = client(&s)
            .await
            .sites(pb::SitesRequest {})
            .await
            .expect("sites")
            .into_inner()
            .sites;
        let c = sites.iter().find(|x| x.site == "site-c").expect("site-c");
        if c.connected && c.model_id == version {
            break;
        }
        assert!(Instant::now() < deadline, "site-c runs {:?}", c.model_id);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // DP-FedAvg: sites clip their deltas, the coordinator weights them equally and adds
    // Gaussian noise; the job and every version report the accountant's epsilon.
    let job = start_job(
        &s,
        &format!(
            "base = \"{id}.r3\"\nheads = [\"cardiomegaly\"]\nrounds = 2\nlocal_epochs = 1\nclip = 0.5\nnoise_multiplier = 1.0\ndp_delta = 1e-5\nmin_sites = 3\nround_deadline_secs = 120\n"
        ),
    )
    .await;
    let done = wait_job(&s, &job.job_id, |j| j.state() != pb::JobState::Running).await;
    assert_eq!(done.state(), pb::JobState::Completed, "{}", done.reason);
    let expected = cxrfed_stats::dp::gaussian_rounds_epsilon(1.0, 2, 1e-5).expect("epsilon");
    assert!(
        (done.dp_epsilon - expected).abs() < 1e-9,
        "{} vs {expected}",
        done.dp_epsilon
    );
    assert_eq!(done.dp_delta, 1e-5);
    for round in done
        .round_log
        .iter()
        .filter(|r| r.state() == pb::RoundState::Completed)
    {
        assert_eq!(
            round
                .sites
                .iter()
                .filter(|x| x.status() == pb::SiteRoundStatus::Reported)
                .count(),
            3
        );
    }
    let last = client(&s)
        .await
        .get_model(pb::GetModelRequest {
            version: done.latest_model.clone(),
        })
        .await
        .expect("model")
        .into_inner();
    assert!((last.dp_epsilon - expected).abs() < 1e-9);

    // A model larger than gRPC's 4 MiB message limit: DenseNet-121 (about 28 MB of weights)
    // is imported into the registry in chunks, streamed to the sites in 1 MiB chunks, trained
    // one step and aggregated, with the coordinator's memory a small multiple of the model.
    // What is measured is the growth over the resident size before the import (the
    // coordinator's own baseline, without libtorch, is in docs/bench/footprint.md).
    let before = rss_bytes(s.coordinator.child.id(), "VmRSS:");
    let dense = s.root.join("densenet");
    let out = std::process::Command::new(cxrfed_e2e::cxrfed_bin().with_file_name("cxrfed-bench"))
        .args([
            "model-init",
            "--arch",
            "densenet121",
            "--out",
            dense.to_str().expect("path"),
        ])
        .output()
        .expect("cxrfed-bench");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let size = std::fs::metadata(dense.join("model.safetensors"))
        .expect("weights")
        .len();
    assert!(size > 4 << 20, "{size} bytes");
    let mut args = vec![
        "registry",
        "import",
        dense.to_str().expect("path"),
        "--version",
        "densenet-test",
    ];
    args.extend(common.iter().copied());
    let out = cxrfed(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The same version twice, or a card whose heads the weights lack, is refused.
    let out = cxrfed(&args);
    assert!(
        text(&out.stderr).contains("already"),
        "{}",
        text(&out.stderr)
    );
    let job = start_job(
        &s,
        "base = \"densenet-test\"\nnew_heads = [{ name = \"cardiomegaly\", kind = \"binary\" }]\nrounds = 1\nlocal_steps = 1\nbatch_size = 2\nmin_sites = 2\nround_deadline_secs = 600\n",
    )
    .await;
    let done = wait_job(&s, &job.job_id, |j| j.state() != pb::JobState::Running).await;
    assert_eq!(done.state(), pb::JobState::Completed, "{}", done.reason);
    let round = done
        .round_log
        .iter()
        .find(|r| r.state() == pb::RoundState::Completed)
        .expect("round");
    let reported: Vec<&pb::SiteRound> = round
        .sites
        .iter()
        .filter(|s| s.status() == pb::SiteRoundStatus::Reported)
        .collect();
    assert_eq!(reported.len(), 3, "{round:?}");
    assert!(
        round.bytes_down >= 3 * size,
        "{} bytes down",
        round.bytes_down
    );
    // Heads only: the update is the new head's 512 weights and bias, not the model.
    assert!(
        reported.iter().all(|s| s.update_bytes < 8 << 10),
        "{reported:?}"
    );
    let peak = rss_bytes(s.coordinator.child.id(), "VmHWM:");
    let growth = peak.saturating_sub(before);
    eprintln!(
        "coordinator: {before} bytes resident before, peak {peak}: growth {growth} for a {size}-byte model"
    );
    assert!(
        growth < 8 * size,
        "the coordinator grew by {growth} bytes for a {size}-byte model"
    );

    // A bad promotion is rolled back with one command: site-b returns to the model it ran
    // before, and every record that existed then gets exactly its earlier findings back.
    let out = cxrfed(&[
        "node",
        "rollback",
        "--data-dir",
        s.nodes[1].data_dir_str(),
        "--profile",
        &s.nodes[1].profile(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(&format!("from {version}")),
        "{}",
        text(&out.stdout)
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let now = findings_of(&s.nodes[1]);
        let restored = before_promotion
            .iter()
            .filter(|(id, earlier)| now.get(*id) == Some(earlier))
            .count();
        if restored == before_promotion.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{restored} of {} records restored",
            before_promotion.len()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Nothing left to roll back to.
    let out = cxrfed(&[
        "node",
        "rollback",
        "--data-dir",
        s.nodes[1].data_dir_str(),
        "--profile",
        &s.nodes[1].profile(),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no earlier model"),
        "{}",
        text(&out.stderr)
    );
}

/// Every record's findings and model at a node, by record id.
fn findings_of(node: &NodeProcess) -> BTreeMap<String, (serde_json::Value, String)> {
    let out = node.cli(&["records", "--limit", "1000"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("record"))
        .map(|r| {
            (
                r["record_id"].as_str().unwrap_or_default().to_string(),
                (
                    r["findings"].clone(),
                    r["model_id"].as_str().unwrap_or_default().to_string(),
                ),
            )
        })
        .collect()
}

/// A memory figure of a process from /proc (VmRSS: now, VmHWM: peak), in bytes.
fn rss_bytes(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("memory figure")
        * 1024
}
