//! `cxrfed-bench federation`: federated query latency against the number of sites, and the
//! pooled error against a central release.
//!
//! Everything runs in this process on loopback with mutual TLS: the real coordinator
//! (`cxrfed_coordinator::serve`), and per site a real node state (sled ledger and audit chain,
//! columnar index of synthetic records, the site's DP settings) running the node's real link
//! (`cxrfed_node::federation`) — only the node's own gRPC server for local users is left out,
//! as federated queries never touch it. A researcher signs each query; every site verifies it
//! and charges its ledger.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cxrfed_auth::Role;
use cxrfed_auth::pki::{self, IssueRequest, StudyCa};
use cxrfed_proto::v1 as pb;
use cxrfed_proto::v1::coordinator_service_client::CoordinatorServiceClient;
use tokio_util::sync::CancellationToken;

use crate::{percentile, synthetic_record};

const QUERY: &str = "crosstab image_quality, analysis_confidence";

fn issue(
    ca: &StudyCa,
    root: &Path,
    role: Role,
    name: &str,
    site: Option<&str>,
) -> anyhow::Result<std::path::PathBuf> {
    let dir = root.join(name);
    ca.issue(&IssueRequest::new(role, name, site, 30), &dir)?;
    Ok(dir)
}

fn paths(root: &Path, dir: &Path) -> cxrfed_auth::TlsPaths {
    cxrfed_auth::TlsPaths {
        ca: root.join("ca").join(pki::CA_CERT),
        cert: dir.join(pki::CERT),
        key: dir.join(pki::KEY),
        crl: Some(root.join("ca").join(pki::CA_CRL)),
    }
}

/// A site: its node state (no local gRPC server), linked to the coordinator by `link`.
struct Site {
    state: Arc<cxrfed_node::Node>,
    credentials: cxrfed_auth::ClientCredentials,
    columns: cxrfed_stats::Columns,
    selection: [u8; 32],
}

impl Site {
    fn link(&self, coordinator: &str, shutdown: &CancellationToken) {
        cxrfed_node::federation::spawn(
            self.state.clone(),
            coordinator.to_string(),
            self.credentials.clone(),
            cxrfed_auth::ServerCheck {
                role: Some(cxrfed_auth::Role::Coordinator),
                ..Default::default()
            },
            shutdown.clone(),
        );
    }
}

fn make_site(
    root: &Path,
    ca: &StudyCa,
    index: usize,
    records: usize,
    shutdown: &CancellationToken,
) -> anyhow::Result<Site> {
    let site = format!("site-{index:02}");
    let dir = issue(
        ca,
        root,
        Role::Node,
        &format!("node-{index:02}"),
        Some(&site),
    )?;
    let mut config = cxrfed_node::NodeConfig {
        data_dir: root.join(&site),
        site: site.clone(),
        model: "none".into(),
        ..Default::default()
    };
    config.ca = Some(root.join("ca").join(pki::CA_CERT));
    config.cert = Some(dir.join(pki::CERT));
    config.key = Some(dir.join(pki::KEY));
    std::fs::create_dir_all(&config.data_dir)?;
    let store = cxrfed_store::RecordStore::open(&config.store_dir())?;
    let secret = cxrfed_imaging::SiteSecret::from_bytes([index as u8; 32]);
    let mut columns = cxrfed_stats::Columns::new();
    for i in 0..records {
        let mut record = synthetic_record(index * 10_000_000 + i);
        record.patient.pseudonym = format!("{site}/{}", record.patient.pseudonym);
        columns.upsert(&record);
    }
    let tls = cxrfed_auth::ReloadingTls::load(paths(root, &dir), &[Role::Node])?;
    let selection = secret.derive("dp-row-selection");
    let mut dp = cxrfed_node::privacy::DpSettings::from_config(&config, selection);
    dp.default_budget = cxrfed_store::Budget {
        epsilon: 1e9,
        delta: 0.0,
    };
    let pipeline = cxrfed_node::pipeline::Pipeline::new(&config, secret, None);
    let state = Arc::new(
        cxrfed_node::Node::builder(config, store, pipeline, dp)
            .study("bench")
            .tls(Some(tls))
            .shutdown(shutdown.clone())
            // The records are synthetic and never stored: the index is built from them.
            .synthetic_columns(columns.clone())
            .build()?,
    );
    let credentials = cxrfed_auth::ClientCredentials {
        ca: root.join("ca").join(pki::CA_CERT),
        cert: Some(dir.join(pki::CERT)),
        key: Some(dir.join(pki::KEY)),
    };
    Ok(Site {
        state,
        credentials,
        columns,
        selection,
    })
}

fn signed(signer: &cxrfed_auth::signing::Signer, epsilon: f64) -> anyhow::Result<pb::SignedQuery> {
    let intent = cxrfed_server::intent::new("bench", QUERY, epsilon, Duration::from_secs(600))?;
    Ok(cxrfed_server::intent::sign(signer, &intent)?)
}

/// Flattened pooled values of a response (suppressed as 0: the bench sets no threshold).
fn values(rows: &[pb::DpRow]) -> Vec<f64> {
    rows.iter()
        .flat_map(|r| r.values.iter().map(|v| v.value.unwrap_or(0.0)))
        .collect()
}

pub async fn run(
    site_counts: &[usize],
    records: usize,
    queries: usize,
    epsilon: f64,
) -> anyhow::Result<serde_json::Value> {
    let mut results = Vec::new();
    for &n in site_counts {
        let root = tempfile::tempdir()?;
        let root = root.path();
        pki::init_ca(&root.join("ca"), "bench", 30)?;
        let ca = StudyCa::open(&root.join("ca"))?;
        let coordinator_dir = issue(&ca, root, Role::Coordinator, "coordinator", None)?;
        let researcher = issue(&ca, root, Role::Researcher, "rita", None)?;
        let shutdown = CancellationToken::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("https://127.0.0.1:{}", listener.local_addr()?.port());
        let mut config = cxrfed_coordinator::CoordinatorConfig {
            data_dir: root.join("coordinator-data"),
            suppress_below: 0,
            ..Default::default()
        };
        let p = paths(root, &coordinator_dir);
        config.ca = Some(p.ca);
        config.cert = Some(p.cert);
        config.key = Some(p.key);
        config.crl = p.crl;
        // Every site's store is opened (sled, blocking) before any link starts.
        let all = {
            let (root, shutdown) = (root.to_path_buf(), shutdown.clone());
            let ca = StudyCa::open(&root.join("ca"))?;
            tokio::task::spawn_blocking(move || {
                (0..n)
                    .map(|i| make_site(&root, &ca, i, records, &shutdown))
                    .collect::<anyhow::Result<Vec<Site>>>()
            })
            .await??
        };
        tokio::spawn(cxrfed_coordinator::serve(
            config,
            listener,
            shutdown.clone(),
        ));
        for site in &all {
            site.link(&url, &shutdown);
        }
        let credentials = cxrfed_auth::ClientCredentials {
            ca: root.join("ca").join(pki::CA_CERT),
            cert: Some(researcher.join(pki::CERT)),
            key: Some(researcher.join(pki::KEY)),
        };
        let mut client = CoordinatorServiceClient::new(
            cxrfed_auth::client::connect(&url, Some(&credentials)).await?,
        );
        // Wait until every site is linked.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let connected = client
                .sites(pb::SitesRequest {})
                .await?
                .into_inner()
                .sites
                .iter()
                .filter(|s| s.connected)
                .count();
            if connected == n {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "only {connected} of {n} sites linked"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let signer = cxrfed_auth::signing::Signer::load(
            &researcher.join(pki::CERT),
            &researcher.join(pki::KEY),
        )?;
        // The truth: exact counts of each site's bounded records (k = 1), summed.
        let params = cxrfed_stats::dp::DpParams {
            epsilon,
            delta: 0.0,
            mechanism: cxrfed_stats::dp::Mechanism::Laplace,
            contributions: 1,
            suppress_below: 0,
            unlinked: cxrfed_stats::dp::Unlinked::Exclude,
            selection_secret: [0; 32],
            raw: true,
        };
        let mut truth: Vec<f64> = Vec::new();
        // Each site selects its records with its own key: the truth uses the same keys.
        for site in &all {
            let columns = &site.columns;
            let site_params = cxrfed_stats::dp::DpParams {
                selection_secret: site.selection,
                ..params.clone()
            };
            let plan =
                cxrfed_stats::dp::plan(columns, cxrfed_stats::query::parse(QUERY)?, &site_params)?;
            let site: Vec<f64> = plan
                .noiseless(columns)?
                .rows
                .iter()
                .flat_map(|r| r.values.iter().map(|v| v.value.unwrap_or(0.0)))
                .collect();
            if truth.is_empty() {
                truth = site;
            } else {
                truth.iter_mut().zip(site).for_each(|(t, s)| *t += s);
            }
        }
        let mut millis = Vec::new();
        let mut pooled_errors = Vec::new();
        let mut bound = 0.0;
        for _ in 0..queries {
            let t = Instant::now();
            let r = client
                .query(pb::FederatedQueryRequest {
                    signed: Some(signed(&signer, epsilon)?),
                    min_sites: n as u32,
                    timeout_ms: 60_000,
                })
                .await?
                .into_inner();
            millis.push(t.elapsed().as_secs_f64() * 1000.0);
            anyhow::ensure!(r.answered as usize == n, "{} of {n} answered", r.answered);
            bound = r.rows[0].values[0].error_bound;
            pooled_errors.extend(
                values(&r.rows)
                    .iter()
                    .zip(&truth)
                    .map(|(v, t)| (v - t).abs()),
            );
        }
        // A central release of the same query over all sites' records pooled in one place.
        let mut central = cxrfed_stats::Columns::new();
        for i in 0..n {
            for j in 0..records {
                let mut record = synthetic_record(i * 10_000_000 + j);
                record.patient.pseudonym = format!("site-{i:02}/{}", record.patient.pseudonym);
                central.upsert(&record);
            }
        }
        let central_params = cxrfed_stats::dp::DpParams {
            raw: true,
            ..params.clone()
        };
        let plan = cxrfed_stats::dp::plan(
            &central,
            cxrfed_stats::query::parse(QUERY)?,
            &central_params,
        )?;
        let central_truth: Vec<f64> = plan
            .noiseless(&central)?
            .rows
            .iter()
            .flat_map(|r| r.values.iter().map(|v| v.value.unwrap_or(0.0)))
            .collect();
        let mut central_errors = Vec::new();
        let mut central_bound = 0.0;
        for _ in 0..queries {
            let release = plan.release(&central)?;
            central_bound = release.rows[0].values[0].error_bound;
            central_errors.extend(
                release
                    .rows
                    .iter()
                    .flat_map(|r| r.values.iter().map(|v| v.value.unwrap_or(0.0)))
                    .zip(&central_truth)
                    .map(|(v, t)| (v - t).abs()),
            );
        }
        shutdown.cancel();
        millis.sort_by(f64::total_cmp);
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let result = serde_json::json!({
            "sites": n, "records_per_site": records, "queries": queries, "epsilon": epsilon,
            "p50_ms": percentile(&millis, 50.0), "p99_ms": percentile(&millis, 99.0),
            "pooled_mean_abs_error": mean(&pooled_errors), "pooled_bound_95": bound,
            "central_mean_abs_error": mean(&central_errors), "central_bound_95": central_bound,
        });
        eprintln!("{result}");
        results.push(result);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(serde_json::json!({ "runs": results }))
}
