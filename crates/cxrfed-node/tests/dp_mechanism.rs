//! The DP mechanism, statistically, through the node's real release path: a sled ledger that
//! charges every release, opendp noise, and a researcher identity with a large budget.
//!
//! Thousands of DP counts of a cohort whose bounded count is known are released; the empirical
//! noise must match the discrete Laplace distribution at the configured scale (k / epsilon):
//! its variance within a confidence band, and a chi-square goodness-of-fit test.

use cxrfed_node::columns::SharedColumns;

use chrono::Utc;
use cxrfed_auth::{Identity, Role};
use cxrfed_node::privacy::{self, DpRequest, DpSettings};
use cxrfed_schema::{Acquisition, NO_MODEL, Patient, Record, SCHEMA_VERSION, Source, View};
use cxrfed_stats::Columns;
use cxrfed_stats::dp::{Mechanism, Unlinked};
use cxrfed_store::{Budget, Limit, RecordStore};

fn record(i: usize, patient: &str) -> Record {
    Record {
        record_id: format!("r{i}"),
        image_sha256: format!("{i:064x}"),
        schema_version: SCHEMA_VERSION,
        model_id: NO_MODEL.to_string(),
        model_sha256: String::new(),
        created_at: Utc::now(),
        processing_ms: 1.0,
        request_id: String::new(),
        source: Source::default(),
        patient: Patient {
            pseudonym: patient.to_string(),
            ..Patient::default()
        },
        acquisition: Acquisition {
            month: "2021-05".into(),
            view: View::Pa,
        },
        findings: None,
        processing_notes: Vec::new(),
        questions: Vec::new(),
        annotations: Vec::new(),
        custom_fields: Default::default(),
        model_fields: Default::default(),
    }
}

fn researcher() -> Identity {
    Identity {
        study: "study".into(),
        role: Role::Researcher,
        name: "statistician".into(),
        site: None,
        fingerprint: String::new(),
        serial: String::new(),
        not_before: chrono::DateTime::<Utc>::MIN_UTC,
        not_after: chrono::DateTime::<Utc>::MAX_UTC,
    }
}

/// P(X = x) of the discrete Laplace distribution with scale `b`.
fn pmf(x: i64, b: f64) -> f64 {
    let q = (-1.0 / b).exp();
    (1.0 - q) / (1.0 + q) * q.powi(x.unsigned_abs() as i32)
}

/// Upper `1 - alpha` quantile of chi-square with `df` degrees of freedom (Wilson–Hilferty),
/// for alpha = 0.001 (z = 3.09).
fn chi_square_critical(df: f64) -> f64 {
    let z = 3.090_232;
    df * (1.0 - 2.0 / (9.0 * df) + z * (2.0 / (9.0 * df)).sqrt()).powi(3)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dp_count_noise_matches_the_configured_scale_for_k_1_and_3() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = RecordStore::open(dir.path()).expect("store");
    // 120 patients with 5 images each: the bounded count is 120 * min(5, k).
    let records: Vec<Record> = (0..600)
        .map(|i| record(i, &format!("p{}", i / 5)))
        .collect();
    let columns = SharedColumns::new(Columns::from_records(&records));
    let identity = researcher();
    let epsilon = 0.5;
    let releases = 2000;
    store
        .set_budget(
            &identity.uri(),
            Budget {
                epsilon: 1e6,
                delta: 0.0,
            },
            privacy::event(None, "SetBudget", "test budget".into(), String::new()),
        )
        .await
        .expect("budget");
    for k in [1u32, 3] {
        let settings = DpSettings {
            contributions: k,
            suppress_below: 0,
            default_budget: Budget::default(),
            training_budget: Budget::default(),
            unlinked: Unlinked::Exclude,
            selection_secret: [3; 32],
            in_flight: Default::default(),
        };
        let truth = 120.0 * f64::from(k);
        let mut noise: Vec<i64> = Vec::with_capacity(releases);
        let mut scale = 0.0;
        for _ in 0..releases {
            let released = privacy::release(
                &store,
                columns.clone(),
                &settings,
                &identity,
                Limit::Budget(Budget::default()),
                DpRequest::direct(
                    cxrfed_stats::query::parse("count where view = PA").expect("query"),
                    epsilon,
                    0.0,
                    Mechanism::Laplace,
                ),
                "DpStats",
            )
            .await
            .expect("release");
            scale = released.release.noise_scale;
            let value = released.release.rows[0].values[0]
                .value
                .expect("no threshold");
            noise.push((value - truth) as i64);
        }
        // The scale opendp calibrated is sensitivity / epsilon with sensitivity k.
        let expected_scale = f64::from(k) / epsilon;
        assert!(
            (scale - expected_scale).abs() < 1e-6 * expected_scale,
            "k={k}: scale {scale}, expected {expected_scale}"
        );
        let n = noise.len() as f64;
        let mean = noise.iter().sum::<i64>() as f64 / n;
        let variance = noise
            .iter()
            .map(|&x| (x as f64 - mean).powi(2))
            .sum::<f64>()
            / (n - 1.0);
        let q = (-1.0 / scale).exp();
        let theory = 2.0 * q / (1.0 - q).powi(2);
        // The sample variance of a Laplace-like variable has relative standard error about
        // sqrt((kurtosis - 1) / n) = sqrt(5 / n); allow five of them.
        let band = 5.0 * (5.0 / n).sqrt();
        assert!(
            (variance / theory - 1.0).abs() < band,
            "k={k}: variance {variance:.2}, theory {theory:.2} (band ±{:.0}%)",
            band * 100.0
        );
        assert!(
            mean.abs() < 5.0 * (theory / n).sqrt(),
            "k={k}: noise mean {mean:.3} is not centred"
        );
        // Chi-square goodness of fit: one bin per value with an expected count of at least 10,
        // the two tails pooled.
        let mut edge = 0i64;
        while n * pmf(edge + 1, scale) >= 10.0 {
            edge += 1;
        }
        let mut chi = 0.0;
        for x in -edge..=edge {
            let observed = noise.iter().filter(|&&v| v == x).count() as f64;
            let expected = n * pmf(x, scale);
            chi += (observed - expected).powi(2) / expected;
        }
        let inner: f64 = (-edge..=edge).map(|x| pmf(x, scale)).sum();
        for below in [true, false] {
            let observed = noise
                .iter()
                .filter(|&&v| if below { v < -edge } else { v > edge })
                .count() as f64;
            let expected = n * (1.0 - inner) / 2.0;
            chi += (observed - expected).powi(2) / expected;
        }
        let df = (2 * edge + 3 - 1) as f64;
        assert!(
            chi < chi_square_critical(df),
            "k={k}: chi-square {chi:.1} over {df} degrees of freedom exceeds {:.1}",
            chi_square_critical(df)
        );
    }
    // Every release was charged and recorded.
    let account = store
        .account(&identity.uri(), Limit::Budget(Budget::default()))
        .expect("account");
    assert_eq!(account.releases, 2 * releases as u64);
    assert!((account.epsilon_spent - 2.0 * releases as f64 * epsilon).abs() < 1e-6);
    let report = store.verify_audit().expect("verify");
    assert_eq!(report.entries, 1 + 2 * releases as u64);
    assert!(report.broken.is_none());
}
