//! Differential privacy end to end: budgets set by the site admin through the CLI, DP releases
//! charged over mutual TLS, exhaustion, concurrency, restarts, the audit chain and its
//! verification, and a researcher who tries every RPC for something exact.

use std::path::Path;

use cxrfed_auth::Role;
use cxrfed_auth::pki;
use cxrfed_e2e::{NodeProcess, cxrfed, text, write_phantoms};
use cxrfed_proto::v1 as pb;
use cxrfed_proto::v1::node_service_client::NodeServiceClient;
use tonic::Code;

/// A node (no model: DP needs records, not findings) with `count` phantoms stored.
fn node_with_phantoms(dir: &Path, count: u32) -> NodeProcess {
    let phantoms = dir.join("phantoms");
    write_phantoms(&phantoms, count, 5, 128);
    let node = NodeProcess::start(&dir.join("node"), &["--model", "none", "--site", "site-a"]);
    let out = node.cli(&["ingest", phantoms.to_str().expect("path")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    node
}

fn profile_of(dir: &Path) -> String {
    dir.join(pki::PROFILE).to_str().expect("path").to_string()
}

fn dp_request(query: &str, epsilon: f64) -> pb::DpStatsRequest {
    pb::DpStatsRequest {
        query: query.into(),
        structured: None,
        epsilon,
        delta: 0.0,
        mechanism: pb::Mechanism::Unspecified.into(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn budgets_run_out_exactly_survive_restarts_and_are_listed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = node_with_phantoms(dir.path(), 12);
    let researcher = node.pki.identity(Role::Researcher, "rita", None);
    let mut client = NodeServiceClient::new(node.channel_as(&researcher).await);

    // No budget until the admin grants one.
    let status = client
        .dp_stats(dp_request("count", 0.25))
        .await
        .expect_err("no budget yet");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");

    node.set_budget("rita", "1.0");
    for i in 0..4 {
        let r = client
            .dp_stats(dp_request("histogram view", 0.25))
            .await
            .unwrap_or_else(|s| panic!("release {i}: {s:?}"))
            .into_inner();
        assert!(r.epsilon <= 0.25 && r.epsilon > 0.249);
        let budget = r.budget.expect("budget");
        assert!((budget.epsilon_remaining - (0.75 - 0.25 * i as f64)).abs() < 1e-9);
        // Every public category, each with a bound.
        assert_eq!(r.value_columns, ["count"]);
        assert_eq!(r.rows.len(), 5);
        assert!(r.rows.iter().all(|row| row.values[0].error_bound > 0.0));
    }
    // The fifth stops: requested vs remaining named, nothing released.
    let status = client
        .dp_stats(dp_request("histogram view", 0.25))
        .await
        .expect_err("exhausted");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("needs epsilon 0.25") && status.message().contains("but 0 "),
        "{}",
        status.message()
    );

    // The CLI shows the researcher's DP release and own budget; the admin lists everyone.
    node.set_budget("rita", "1.5");
    let url = node.url();
    let rita = profile_of(&researcher);
    let out = cxrfed(&[
        "stats",
        "--dp",
        "--epsilon",
        "0.5",
        "crosstab view, sex",
        "--node",
        &url,
        "--profile",
        &rita,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(shown.contains('±'), "{shown}");
    assert!(shown.contains("epsilon 0.5 (delta 0) charged"), "{shown}");
    assert!(shown.contains("epsilon 0 of 1.5 remaining"), "{shown}");

    // Restart: the ledger is where it was.
    node.kill();
    let node = NodeProcess::start(
        &dir.path().join("node"),
        &["--model", "none", "--site", "site-a"],
    );
    let mut client = NodeServiceClient::new(node.channel_as(&researcher).await);
    let account = client
        .budget(pb::BudgetRequest {})
        .await
        .expect("budget")
        .into_inner();
    assert_eq!(account.identity, "cxrfed://e2e/researcher/-/rita");
    assert_eq!(account.releases, 5);
    assert!((account.epsilon_spent - 1.5).abs() < 1e-9, "{account:?}");
    assert_eq!(account.epsilon_remaining, 0.0);
    let status = client
        .dp_stats(dp_request("count", 0.01))
        .await
        .expect_err("still exhausted");
    assert_eq!(status.code(), Code::ResourceExhausted);

    let admin = node.profile();
    let out = cxrfed(&[
        "node",
        "budget",
        "list",
        "--data-dir",
        node.data_dir_str(),
        "--profile",
        &admin,
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let accounts: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let rita = accounts
        .as_array()
        .expect("list")
        .iter()
        .find(|a| a["identity"] == "cxrfed://e2e/researcher/-/rita")
        .expect("rita listed");
    assert_eq!(rita["epsilon_budget"], 1.5);
    assert_eq!(rita["releases"], 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_concurrent_queries_never_overspend() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = node_with_phantoms(dir.path(), 8);
    let researcher = node.pki.identity(Role::Researcher, "carl", None);
    node.set_budget("carl", "1.0");
    let channel = node.channel_as(&researcher).await;
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let mut client = NodeServiceClient::new(channel.clone());
            tokio::spawn(async move { client.dp_stats(dp_request("count", 0.1)).await })
        })
        .collect();
    let (mut ok, mut exhausted) = (0, 0);
    for task in tasks {
        match task.await.expect("join") {
            Ok(_) => ok += 1,
            Err(s) if s.code() == Code::ResourceExhausted => exhausted += 1,
            Err(s) => panic!("unexpected {s:?}"),
        }
    }
    assert_eq!((ok, exhausted), (10, 40));
    let account = NodeServiceClient::new(channel)
        .budget(pb::BudgetRequest {})
        .await
        .expect("budget")
        .into_inner();
    assert!(account.epsilon_spent <= 1.0 + 1e-12, "{account:?}");
    assert_eq!(account.releases, 10);
}

fn audit(node_dir: &str, profile: Option<&str>, args: &[&str]) -> std::process::Output {
    let mut all = vec!["node", "audit"];
    all.extend_from_slice(args);
    all.extend(["--data-dir", node_dir]);
    if let Some(p) = profile {
        all.extend(["--profile", p]);
    }
    cxrfed(&all)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_audit_chain_records_every_release_and_names_a_rewritten_entry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = node_with_phantoms(dir.path(), 6);
    let researcher = node.pki.identity(Role::Researcher, "ada", None);
    node.set_budget("ada", "5");
    let mut client = NodeServiceClient::new(node.channel_as(&researcher).await);
    client
        .dp_stats(dp_request("count where view = PA", 0.5))
        .await
        .expect("dp");
    assert!(node.cli(&["stats", "count by sex"]).status.success());
    let export = dir.path().join("export.csv");
    assert!(
        node.cli(&["export", "--out", export.to_str().expect("path")])
            .status
            .success()
    );
    let listed = text(&node.cli(&["records", "--limit", "1"]).stdout);
    let record: serde_json::Value =
        serde_json::from_str(listed.lines().next().expect("a record")).expect("json");
    let record_id = record["record_id"].as_str().expect("id");
    let out = node.cli(&["annotate", "set", record_id, "image_quality", "good"]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // Through the running node: every kind of release is on the chain, which verifies.
    let admin = node.profile();
    let data_dir = node.data_dir_str().to_string();
    let out = audit(&data_dir, Some(&admin), &["show", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let entries: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    let methods: Vec<&str> = entries
        .iter()
        .map(|e| e["method"].as_str().expect("method"))
        .collect();
    assert_eq!(
        methods,
        ["SetBudget", "DpStats", "Stats", "Export", "Annotate"],
        "{entries:?}"
    );
    let dp = &entries[1];
    assert_eq!(dp["identity"], "cxrfed://e2e/researcher/-/ada");
    assert_eq!(dp["query"], "count where view = \"PA\"");
    assert!(dp["epsilon"].as_f64().expect("epsilon") > 0.49);
    assert_eq!(dp["digest"].as_str().expect("digest").len(), 64);
    let out = audit(&data_dir, Some(&admin), &["verify"]);
    assert!(out.status.success(), "{}", text(&out.stdout));
    assert!(
        text(&out.stdout).contains("verified: 5 entries"),
        "{}",
        text(&out.stdout)
    );

    // Stopped: verified straight from the store.
    let out = cxrfed(&["node", "stop", "--data-dir", &data_dir]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    node.wait_exit(std::time::Duration::from_secs(30));
    let out = audit(&data_dir, None, &["verify"]);
    assert!(out.status.success(), "{}", text(&out.stdout));

    // Someone lowers the epsilon of the DP release in the store itself.
    {
        let db = sled::open(Path::new(&data_dir).join("store")).expect("open store");
        let tree = db.open_tree("audit").expect("audit tree");
        let key = 2u64.to_be_bytes();
        let mut entry: serde_json::Value =
            serde_json::from_slice(&tree.get(key).expect("get").expect("entry 2")).expect("json");
        entry["epsilon"] = serde_json::json!(0.01);
        tree.insert(key, serde_json::to_vec(&entry).expect("json"))
            .expect("rewrite");
        db.flush().expect("flush");
    }
    let out = audit(&data_dir, None, &["verify"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let said = text(&out.stdout);
    assert!(said.contains("BROKEN at entry 2"), "{said}");
    assert!(said.contains("altered"), "{said}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_researcher_gets_nothing_exact_from_any_rpc() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = node_with_phantoms(dir.path(), 4);
    let researcher = node.pki.identity(Role::Researcher, "eve", None);
    let channel = node.channel_as(&researcher).await;
    let allowed = cxrfed_e2e::try_every_node_rpc(channel.clone()).await;
    assert_eq!(allowed, ["GetSchema", "DpStats", "Budget"]);
    let mut c = NodeServiceClient::new(channel.clone());

    // With a budget, what comes back is noisy with bounds, and carries no cohort size.
    node.set_budget("eve", "2");
    let r = c
        .dp_stats(dp_request("crosstab view, sex", 1.0))
        .await
        .expect("dp")
        .into_inner();
    assert!(
        r.rows
            .iter()
            .flat_map(|row| &row.values)
            .all(|v| v.error_bound > 0.0)
    );
    assert!(r.notes.iter().any(|n| n.contains("at most 1 record")));
    // Exact statistics stay closed even with a budget.
    let status = c
        .stats(pb::StatsRequest {
            query: "count".into(),
            structured: None,
        })
        .await
        .expect_err("exact");
    assert_eq!(status.code(), Code::PermissionDenied);

    // The other services: health says SERVING (no data); reflection describes the API only.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(
        serving.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}
