//! Trustworthy federated training end to end: a coordinator and three nodes as real processes
//! with mutual TLS. Only the study admin orders; each site obeys its own policy and charges
//! every round to its training account; researchers see pooled noisy metrics only; sites mask
//! their updates so the coordinator never holds one in the clear.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cxrfed_auth::Role;
use cxrfed_e2e::{CoordinatorProcess, NodeProcess, TestPki, cxrfed, free_port, text};
use cxrfed_proto::v1 as pb;
use cxrfed_proto::v1::coordinator_service_client::CoordinatorServiceClient;
use tonic::transport::Channel;

const SITES: [(&str, &str); 3] = [
    ("site-a", "university"),
    ("site-b", "community"),
    ("site-c", "icu"),
];
const PER_SITE: u32 = 90;

struct Study {
    _dir: tempfile::TempDir,
    root: PathBuf,
    pki: TestPki,
    coordinator: CoordinatorProcess,
    nodes: Vec<NodeProcess>,
    admin: PathBuf,
    /// Per site: (image sha256, cardiomegaly) of every labelled image.
    labels: Vec<Vec<(String, bool)>>,
}

/// Whether the node holds an image out for evaluation (its rule: the first byte of the hash
/// below 52).
fn held_out(sha: &str) -> bool {
    u8::from_str_radix(&sha[..2], 16).is_ok_and(|b| b < 52)
}

async fn study() -> Study {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_path_buf();
    let pki = TestPki::at(&root.join("pki"));
    let coordinator = CoordinatorProcess::start(&root.join("coordinator"), &pki);
    let admin = pki.identity(Role::StudyAdmin, "sam", None);
    let mut nodes = Vec::new();
    let mut labels = Vec::new();
    for (i, (site, profile)) in SITES.iter().enumerate() {
        let images = root.join(format!("phantoms-{site}"));
        let (csv, site_labels) =
            cxrfed_e2e::labelled_phantoms(&images, profile, PER_SITE, 300 + i as u32, 96);
        let publish = if i == 0 { "exact" } else { "none" };
        let node = NodeProcess::start_in(
            &root.join(site),
            free_port(),
            pki.clone(),
            &[
                "--site",
                site,
                "--coordinator",
                &coordinator.url(),
                "--publish-record-count",
                publish,
            ],
        );
        let out = node.cli(&["ingest", images.to_str().expect("path")]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let out = node.cli(&["field", "define", "cardiomegaly", "--type", "bool"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let out = node.cli(&["annotate", "import", csv.to_str().expect("path")]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        nodes.push(node);
        labels.push(site_labels);
    }
    // Sites a and b opt in with privacy floors; site-c keeps the default (no training).
    for node in &nodes[..2] {
        let shown = node.training_policy(&[
            "enabled=true",
            "min_batch_size=4",
            "min_local_steps=2",
            "min_held_out=5",
            "max_clip_norm=1.0",
            "min_noise_multiplier=0.5",
        ]);
        assert!(shown.contains("enabled = true"), "{shown}");
        node.training_budget(100.0, 0.01);
    }
    let s = Study {
        _dir: dir,
        root,
        pki,
        coordinator,
        nodes,
        admin,
        labels,
    };
    wait_connected(&s, 3).await;
    s
}

async fn client_as(s: &Study, identity: &Path) -> CoordinatorServiceClient<Channel> {
    cxrfed_e2e::coordinator_client(&s.coordinator.url(), &s.pki, identity).await
}

async fn wait_connected(s: &Study, n: usize) {
    cxrfed_e2e::wait_sites_connected(&s.coordinator.url(), &s.pki, &s.admin, n).await;
}

async fn base_sha(s: &Study) -> String {
    cxrfed_e2e::base_sha(&s.coordinator.url(), &s.pki, &s.admin, "").await
}

async fn start(s: &Study, spec: &str) -> pb::JobInfo {
    cxrfed_e2e::start_signed_job(&s.coordinator.url(), &s.pki, &s.admin, spec).await
}

async fn finished(s: &Study, id: &str, who: &Path) -> pb::JobInfo {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let job = client_as(s, who)
            .await
            .get_job(pb::GetJobRequest {
                job_id: id.to_string(),
            })
            .await
            .expect("job")
            .into_inner();
        if job.state() != pb::JobState::Running {
            return job;
        }
        assert!(Instant::now() < deadline, "job {id} never finished");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A site's training account: (ε spent, releases).
fn training_account(node: &NodeProcess) -> (f64, u64) {
    training_account_if_any(node).expect("a training account")
}

fn training_account_if_any(node: &NodeProcess) -> Option<(f64, u64)> {
    let out = cxrfed(&[
        "node",
        "budget",
        "list",
        "--json",
        "--data-dir",
        node.data_dir_str(),
        "--profile",
        &node.profile(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let accounts: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let account = accounts
        .as_array()
        .expect("accounts")
        .iter()
        .find(|a| a["identity"] == "training:e2e")?;
    Some((
        account["epsilon_spent"].as_f64().expect("spent"),
        account["releases"].as_u64().expect("releases"),
    ))
}

fn site<'a>(round: &'a pb::RoundInfo, name: &str) -> &'a pb::SiteRound {
    round
        .sites
        .iter()
        .find(|s| s.site == name)
        .unwrap_or_else(|| panic!("no {name} in {round:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_signed_orders_within_each_sites_policy_train_and_only_noisy_numbers_leave() {
    let s = study().await;

    // A site's admin orders nothing at the coordinator: jobs, imports and promotions are the
    // study admin's.
    let site_admin = s.nodes[0].admin.clone();
    let mut as_site_admin = client_as(&s, &site_admin).await;
    let own_order = cxrfed_e2e::signed_job(&site_admin, "e2e", "rounds = 1", &base_sha(&s).await);
    let status = as_site_admin
        .start_job(pb::StartJobRequest {
            spec_toml: String::new(),
            order: Some(own_order),
        })
        .await
        .expect_err("a site admin starts no job");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("study-admin"),
        "{}",
        status.message()
    );
    let status = as_site_admin
        .promote_model(pb::PromoteModelRequest {
            version: "tiny-phantom-v1".into(),
            order: None,
        })
        .await
        .expect_err("a site admin promotes nothing");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("study-admin"),
        "{}",
        status.message()
    );
    let status = as_site_admin
        .import_model(tokio_stream::iter(vec![pb::ImportModelChunk {
            version: "x".into(),
            card_json: "{}".into(),
            data: Vec::new(),
        }]))
        .await
        .expect_err("a site admin imports nothing");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("study-admin"),
        "{}",
        status.message()
    );
    // An order altered after signing is refused by the coordinator too.
    let mut tampered = cxrfed_e2e::signed_job(&s.admin, "e2e", "rounds = 1", &base_sha(&s).await);
    let at = tampered.order.len() / 2;
    tampered.order[at] ^= 0x20;
    let status = client_as(&s, &s.admin)
        .await
        .start_job(pb::StartJobRequest {
            spec_toml: String::new(),
            order: Some(tampered),
        })
        .await
        .expect_err("tampered");
    assert!(
        matches!(
            status.code(),
            tonic::Code::PermissionDenied | tonic::Code::InvalidArgument
        ),
        "{status:?}"
    );

    // A new head for cardiomegaly under DP-FedAvg with secure aggregation: site-c (training
    // off) refuses naming the rule; with min_sites 2 the rounds complete without it.
    let job = start(
        &s,
        r#"
        new_heads = [{ name = "cardiomegaly", kind = "binary" }]
        rounds = 2
        local_steps = 5
        batch_size = 8
        learning_rate = 0.02
        clip = 0.5
        noise_multiplier = 1.0
        dp_delta = 1e-5
        metrics_epsilon = 0.5
        min_sites = 2
        round_deadline_secs = 180
        "#,
    )
    .await;
    let done = finished(&s, &job.job_id, &s.admin).await;
    assert_eq!(done.state(), pb::JobState::Completed, "{}", done.reason);
    let completed: Vec<&pb::RoundInfo> = done
        .round_log
        .iter()
        .filter(|r| r.state() == pb::RoundState::Completed)
        .collect();
    assert_eq!(completed.len(), 2, "{done:?}");
    for round in &completed {
        let c = site(round, "site-c");
        assert_eq!(c.status(), pb::SiteRoundStatus::Failed, "{c:?}");
        assert_eq!(c.refused_rule, "enabled", "{c:?}");
        for name in ["site-a", "site-b"] {
            let entry = site(round, name);
            assert_eq!(entry.status(), pb::SiteRoundStatus::Reported, "{entry:?}");
            assert_eq!(entry.train_loss, 0.0, "no exact loss leaves a site");
            assert!(entry.epsilon_charged > 0.5, "{entry:?}");
        }
    }

    // The researcher's view: no per-site row, count or sample number; pooled noisy metrics.
    let rita = s.pki.identity(Role::Researcher, "rita", None);
    // Sites publish no record count unless they choose to; site-a publishes its exact count,
    // which only the study admin sees.
    let counts = |sites: Vec<pb::SiteInfo>| -> BTreeMap<String, u64> {
        sites
            .into_iter()
            .map(|s| (s.site, s.record_count))
            .collect()
    };
    let as_researcher = counts(
        client_as(&s, &rita)
            .await
            .sites(pb::SitesRequest {})
            .await
            .expect("sites")
            .into_inner()
            .sites,
    );
    assert!(as_researcher.values().all(|c| *c == 0), "{as_researcher:?}");
    let as_study_admin = counts(
        client_as(&s, &s.admin)
            .await
            .sites(pb::SitesRequest {})
            .await
            .expect("sites")
            .into_inner()
            .sites,
    );
    let site_a_records =
        cxrfed_proto::v1::node_service_client::NodeServiceClient::new(s.nodes[0].channel().await)
            .status(pb::StatusRequest {})
            .await
            .expect("status")
            .into_inner()
            .record_count;
    assert_eq!(as_study_admin["site-a"], site_a_records);
    assert_eq!(as_study_admin["site-b"], 0, "site-b publishes no count");
    let seen = finished(&s, &job.job_id, &rita).await;
    assert!(
        seen.round_log.iter().all(|r| r.sites.is_empty()),
        "{seen:?}"
    );
    let first = seen
        .round_log
        .iter()
        .find(|r| r.round == 1 && r.state() == pb::RoundState::Completed)
        .expect("round 1");
    let visible_accuracy = first.pooled_metrics["cardiomegaly.accuracy"];
    let visible_n = first.pooled_metrics["cardiomegaly.n"];
    // Round 1 evaluates the zero head: p = 0.5 everywhere, every record called positive, so
    // its exact accuracy is the exact share of positive labels among the held-out records of
    // the sites that reported metrics. What the researcher sees is a noisy release of it.
    let reporting: Vec<usize> = ["site-a", "site-b"]
        .iter()
        .enumerate()
        .filter(|(_, name)| {
            let row = site(
                done.round_log
                    .iter()
                    .find(|r| r.round == 1 && r.state() == pb::RoundState::Completed)
                    .expect("round 1"),
                name,
            );
            row.metrics.contains_key("cardiomegaly.total")
        })
        .map(|(i, _)| i)
        .collect();
    assert!(!reporting.is_empty(), "no site reported metrics");
    let (mut positives, mut total) = (0usize, 0usize);
    for i in &reporting {
        for (sha, positive) in &s.labels[*i] {
            if held_out(sha) {
                total += 1;
                positives += usize::from(*positive);
            }
        }
    }
    let exact_share = positives as f64 / total as f64;
    eprintln!(
        "round 1: exact share {exact_share:.6} of {total} held-out; researcher sees {visible_accuracy:.6} of {visible_n}"
    );
    assert!(
        visible_n != total as f64 || (visible_accuracy - exact_share).abs() > 1e-9,
        "the researcher sees the exact figures"
    );
    // Noise of scale 2/0.5 per count: the release is near the truth, not at it.
    assert!(
        (visible_n - total as f64).abs() < 80.0,
        "{visible_n} vs {total}"
    );

    // Every charge is on the sites' training accounts, round by round: the ε each site
    // reported is what its ledger spent (two rounds and the closing evaluation).
    for (i, name) in ["site-a", "site-b"].iter().enumerate() {
        let reported: f64 = done
            .round_log
            .iter()
            .flat_map(|r| r.sites.iter().filter(|x| x.site == *name))
            .map(|x| x.epsilon_charged)
            .sum();
        let (spent, releases) = training_account(&s.nodes[i]);
        assert!(
            (spent - reported).abs() < 1e-6,
            "{name}: ledger {spent}, reported {reported}"
        );
        assert_eq!(releases, 3, "{name}: two rounds and the evaluation");
        // The updates' share composes to the job's ε (zCDP, opendp) plus the metrics'.
        let expected =
            cxrfed_stats::dp::gaussian_rounds_epsilon(1.0, 2, 1e-5).expect("epsilon") + 3.0 * 0.5;
        assert!(
            (spent - expected).abs() < 1e-6,
            "{name}: {spent} vs {expected}"
        );
    }
    // Site-c, which refused, charged nothing.
    assert!(training_account_if_any(&s.nodes[2]).is_none_or(|(spent, _)| spent == 0.0));

    // Secure aggregation: every update the coordinator received is a masked u64 encoding,
    // never the f32 delta.
    let kept = s.root.join("coordinator").join("spool").join("kept");
    let files: Vec<PathBuf> = std::fs::read_dir(&kept)
        .expect("kept updates")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(files.len(), 4, "two sites, two rounds: {files:?}");
    for file in &files {
        let bytes = std::fs::read(file).expect("update");
        assert!(
            cxrfed_fl::tensor::decode(&bytes).is_err(),
            "{} holds a plain update",
            file.display()
        );
        let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("len")) as usize;
        let header = String::from_utf8_lossy(&bytes[8..8 + header_len]);
        assert!(header.contains("\"U64\""), "{header}");
        // Masked coordinates are uniform mod 2^64: as fixed point they are huge.
        let values: Vec<i64> = bytes[8 + header_len..]
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let large = values.iter().filter(|v| v.unsigned_abs() > 1 << 40).count();
        assert!(
            large * 10 > values.len() * 9,
            "{large} of {} large",
            values.len()
        );
    }

    // A job below a site's floors is refused by that site, naming the rule: clip 2 is above
    // the sites' max_clip_norm of 1. Without enough sites the job fails.
    let job = start(
        &s,
        "new_heads = [{ name = \"cardiomegaly\", kind = \"binary\" }]\nrounds = 1\nlocal_steps = 5\nbatch_size = 8\nclip = 2.0\nnoise_multiplier = 1.0\nmin_sites = 2\nattempts = 1\nround_deadline_secs = 60\n",
    )
    .await;
    let failed = finished(&s, &job.job_id, &s.admin).await;
    assert_eq!(failed.state(), pb::JobState::Failed);
    let round = &failed.round_log[0];
    for name in ["site-a", "site-b"] {
        assert_eq!(site(round, name).refused_rule, "max_clip_norm", "{round:?}");
    }
    // A small batch breaks the batch floor.
    let job = start(
        &s,
        "new_heads = [{ name = \"cardiomegaly\", kind = \"binary\" }]\nrounds = 1\nlocal_steps = 5\nbatch_size = 2\nclip = 0.5\nnoise_multiplier = 1.0\nmin_sites = 2\nattempts = 1\nround_deadline_secs = 60\n",
    )
    .await;
    let failed = finished(&s, &job.job_id, &s.admin).await;
    assert_eq!(
        site(&failed.round_log[0], "site-a").refused_rule,
        "min_batch_size"
    );

    // An exhausted training account refuses the next round: site-b keeps a sliver of budget;
    // site-a alone completes a plain (unmasked, locally noised) round with min_sites 1.
    let (spent_b, _) = training_account(&s.nodes[1]);
    s.nodes[1].training_budget(spent_b + 0.1, 0.01);
    let (spent_a, _) = training_account(&s.nodes[0]);
    let job = start(
        &s,
        "new_heads = [{ name = \"cardiomegaly\", kind = \"binary\" }]\nrounds = 1\nlocal_steps = 5\nbatch_size = 8\nclip = 0.5\nnoise_multiplier = 1.0\nmetrics_epsilon = 0.5\nmin_sites = 1\nsecure_aggregation = false\nround_deadline_secs = 120\n",
    )
    .await;
    let done = finished(&s, &job.job_id, &s.admin).await;
    assert_eq!(done.state(), pb::JobState::Completed, "{}", done.reason);
    let round = done
        .round_log
        .iter()
        .find(|r| r.state() == pb::RoundState::Completed)
        .expect("round");
    assert_eq!(
        site(round, "site-b").refused_rule,
        "training-budget",
        "{round:?}"
    );
    assert_eq!(
        site(round, "site-a").status(),
        pb::SiteRoundStatus::Reported
    );
    assert_eq!(
        training_account(&s.nodes[1]).0,
        spent_b,
        "a refused round charges nothing"
    );
    assert!(training_account(&s.nodes[0]).0 > spent_a);
    // Per-site rows name no count in their reasons.
    let all: BTreeMap<String, String> = done
        .round_log
        .iter()
        .flat_map(|r| r.sites.iter().map(|x| (x.site.clone(), x.reason.clone())))
        .collect();
    assert!(
        all.values().all(|r| !r.chars().any(|c| c.is_ascii_digit())),
        "{all:?}"
    );
}
