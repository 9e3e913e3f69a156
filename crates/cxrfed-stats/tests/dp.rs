//! DP release: contribution bounding, suppression and clamping, thresholded releases, sums and
//! means, and what the privacy map charges. The noise distribution itself is checked against a
//! real ledger in crates/cxrfed-node/tests/dp_mechanism.rs.

mod common;

use common::{Spec, record};
use cxrfed_schema::Record;
use cxrfed_stats::Columns;
use cxrfed_stats::dp::{self, DpParams, DpRelease, Mechanism, Unlinked};
use cxrfed_stats::query::parse;

fn spec() -> Spec {
    Spec {
        quality: Some(1),
        confidence: 0,
        age: Some(5),
        view: 0,
        month: 3,
        ctr: Some(0.5),
        patient: 0,
    }
}

/// `n` records of patient `patient`, numbered from `first`.
fn patient_records(first: usize, n: usize, patient: &str, s: &Spec) -> Vec<Record> {
    (first..first + n)
        .map(|i| {
            let mut r = record(i, s);
            r.patient.pseudonym = patient.to_string();
            r
        })
        .collect()
}

fn params(epsilon: f64, k: u32) -> DpParams {
    DpParams {
        epsilon,
        delta: 0.0,
        mechanism: Mechanism::Laplace,
        contributions: k,
        suppress_below: 0,
        unlinked: Unlinked::Exclude,
        selection_secret: [7; 32],
        raw: false,
    }
}

fn count(release: &DpRelease) -> f64 {
    release.rows[0].values[0].value.expect("not suppressed")
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

#[test]
fn twenty_records_of_one_patient_move_a_count_by_at_most_k() {
    let base: Vec<Record> = (0..200)
        .flat_map(|p| patient_records(p * 10, 2, &format!("p{p}"), &spec()))
        .collect();
    let mut grown = base.clone();
    grown.extend(patient_records(10_000, 20, "heavy", &spec()));
    let (before, after) = (Columns::from_records(&base), Columns::from_records(&grown));
    for k in [1u32, 3] {
        let p = params(1.0, k);
        let rows = |c: &Columns| {
            dp::plan(c, parse("count").expect("query"), &p)
                .expect("plan")
                .bounded_rows(c)
                .len()
        };
        // Exactly: each existing patient keeps min(2, k) rows; the new one adds k.
        assert_eq!(rows(&before), 200 * (k.min(2) as usize));
        assert_eq!(rows(&after) - rows(&before), k as usize);
        // In expectation, through the noise.
        let n = 1500;
        let draws = |c: &Columns| -> Vec<f64> {
            (0..n)
                .map(|_| {
                    count(&dp::release(c, parse("count").expect("query"), &p).expect("release"))
                })
                .collect()
        };
        let (b, a) = (draws(&before), draws(&after));
        let scale = f64::from(k) / 1.0;
        let q = (-1.0 / scale).exp();
        let variance = 2.0 * q / (1.0 - q).powi(2);
        let se = (2.0 * variance / n as f64).sqrt();
        let shift = mean(&a) - mean(&b);
        assert!(
            (shift - f64::from(k)).abs() < 5.0 * se,
            "k={k}: expected shift {k}, measured {shift:.3} (se {se:.3})"
        );
    }
}

#[test]
fn selection_is_deterministic_per_query_and_keyed() {
    let records: Vec<Record> = (0..30)
        .flat_map(|p| patient_records(p * 10, 5, &format!("p{p}"), &spec()))
        .collect();
    let columns = Columns::from_records(&records);
    let p = params(1.0, 2);
    let rows = |text: &str, p: &DpParams| {
        dp::plan(&columns, parse(text).expect("query"), p)
            .expect("plan")
            .bounded_rows(&columns)
    };
    let a = rows("count where view = PA", &p);
    assert_eq!(a.len(), 60);
    assert_eq!(
        a,
        rows("COUNT   where view='PA'", &p),
        "same canonical query"
    );
    assert_ne!(
        a,
        rows("count where view != AP", &p),
        "another query selects anew"
    );
    let other_site = DpParams {
        selection_secret: [9; 32],
        ..p.clone()
    };
    assert_ne!(a, rows("count where view = PA", &other_site));
}

#[test]
fn small_cells_are_suppressed_and_negative_counts_clamped() {
    let records: Vec<Record> = (0..3)
        .flat_map(|p| patient_records(p * 10, 1, &format!("p{p}"), &spec()))
        .collect();
    let columns = Columns::from_records(&records);
    let mut suppressed = 0;
    for _ in 0..300 {
        let p = DpParams {
            suppress_below: 10,
            ..params(1.0, 1)
        };
        let r =
            dp::release(&columns, parse("histogram view").expect("query"), &p).expect("release");
        // Every public category is listed, whatever the data.
        let labels: Vec<&str> = r.rows.iter().map(|row| row.labels[0].as_str()).collect();
        assert_eq!(labels, ["PA", "AP", "LL", "unknown", "(missing)"]);
        for row in &r.rows {
            let v = &row.values[0];
            assert!(v.error_bound > 0.0);
            match v.value {
                None => suppressed += 1,
                Some(x) => assert!(x >= 10.0, "a released count below the threshold: {x}"),
            }
        }
    }
    // True counts are 3 and 0: almost everything is withheld.
    assert!(suppressed > 1400, "{suppressed} of 1500 suppressed");
    // Without a threshold, empty cells come out as 0 or more, never negative.
    let mut zeros = 0;
    for _ in 0..300 {
        let r = dp::release(
            &columns,
            parse("histogram view").expect("query"),
            &params(1.0, 1),
        )
        .expect("release");
        let ll = r.rows[2].values[0].value.expect("no threshold");
        assert!(ll >= 0.0);
        zeros += usize::from(ll == 0.0);
    }
    // P(noise <= 0) is above one half for a true count of 0.
    assert!(zeros > 120, "{zeros} of 300 clamped to 0");
}

#[test]
fn the_charge_is_the_privacy_map_at_k() {
    let records: Vec<Record> = (0..50)
        .flat_map(|p| patient_records(p * 10, 3, &format!("p{p}"), &spec()))
        .collect();
    let columns = Columns::from_records(&records);
    for (k, epsilon) in [(1u32, 0.5), (3, 0.5), (2, 1.25)] {
        let plan = dp::plan(
            &columns,
            parse("crosstab view, image_quality").expect("query"),
            &params(epsilon, k),
        )
        .expect("plan");
        let cost = plan.cost();
        assert!(cost.epsilon <= epsilon && cost.epsilon > epsilon * 0.999_999);
        assert_eq!(cost.delta, 0.0);
        let r = plan.release(&columns).expect("release");
        // Discrete Laplace: epsilon = k / scale.
        assert!((r.noise_scale - f64::from(k) / epsilon).abs() < 1e-6 * r.noise_scale);
        assert_eq!(r.value_columns.len(), 5, "{:?}", r.value_columns);
        assert_eq!(r.rows.len(), 5);
    }
    // The Gaussian mechanism charges (epsilon, delta) after the zCDP conversion.
    let p = DpParams {
        mechanism: Mechanism::Gaussian,
        delta: 1e-6,
        ..params(1.0, 1)
    };
    let cost = dp::plan(&columns, parse("count").expect("query"), &p)
        .expect("plan")
        .cost();
    assert!(cost.epsilon <= 1.0 && cost.epsilon > 0.99);
    assert!(cost.delta <= 1e-6 && cost.delta > 0.0);
}

#[test]
fn months_are_released_above_a_threshold() {
    let mut records = Vec::new();
    for p in 0..200usize {
        let s = Spec {
            month: if p < 150 { 1 } else { 2 },
            ..spec()
        };
        records.extend(patient_records(p * 10, 1, &format!("p{p}"), &s));
    }
    // A month with a single patient must not show up.
    let s = Spec { month: 9, ..spec() };
    records.extend(patient_records(99_999, 1, "rare", &s));
    let columns = Columns::from_records(&records);
    let missing_delta = dp::plan(
        &columns,
        parse("histogram month").expect("query"),
        &params(1.0, 1),
    )
    .expect_err("needs delta");
    assert!(
        missing_delta.to_string().contains("delta"),
        "{missing_delta}"
    );
    let p = DpParams {
        delta: 1e-6,
        suppress_below: 10,
        ..params(1.0, 1)
    };
    for _ in 0..50 {
        let r =
            dp::release(&columns, parse("histogram month").expect("query"), &p).expect("release");
        let threshold = r.threshold.expect("thresholded");
        assert!(threshold >= 10);
        assert!(r.cost.delta > 0.0 && r.cost.delta <= 1e-6);
        let months: Vec<&str> = r.rows.iter().map(|row| row.labels[0].as_str()).collect();
        assert_eq!(months, ["2020-01", "2020-02"]);
    }
}

#[test]
fn sums_and_means_are_clamped_and_bounded() {
    let mut records = Vec::new();
    for p in 0..400usize {
        let s = Spec {
            ctr: Some(if p % 2 == 0 { 0.4 } else { 0.6 }),
            ..spec()
        };
        records.extend(patient_records(p * 10, 2, &format!("p{p}"), &s));
    }
    let columns = Columns::from_records(&records);
    let mut covered = 0;
    let n = 200;
    for _ in 0..n {
        let r = dp::release(
            &columns,
            parse("mean cardiothoracic_ratio").expect("query"),
            &params(1.0, 1),
        )
        .expect("release");
        assert_eq!(r.value_columns, ["mean", "n"]);
        let m = &r.rows[0].values[0];
        let value = m.value.expect("released");
        assert!((0.0..=1.0).contains(&value));
        covered += usize::from((value - 0.5).abs() <= m.error_bound);
        assert!((r.cost.epsilon - 1.0).abs() < 1e-6, "{}", r.cost.epsilon);
    }
    assert!(covered as f64 >= 0.9 * n as f64, "{covered} of {n} covered");
    let r = dp::release(
        &columns,
        parse("sum cardiothoracic_ratio").expect("query"),
        &params(1.0, 1),
    )
    .expect("release");
    // 400 patients, one row each: 200 * 0.4 + 200 * 0.6.
    let sum = r.rows[0].values[0].value.expect("sum");
    assert!((sum - 200.0).abs() < 10.0 * r.noise_scale, "{sum}");
    let err = dp::plan(
        &columns,
        parse("summary cardiothoracic_ratio").expect("query"),
        &params(1.0, 1),
    )
    .expect_err("no DP summary");
    assert!(err.to_string().contains("mean"), "{err}");
}

#[test]
fn records_without_a_patient_are_left_out_unless_configured() {
    let records: Vec<Record> = (0..40)
        .flat_map(|p| patient_records(p * 10, 1, "", &spec()))
        .collect();
    let columns = Columns::from_records(&records);
    let rows = |unlinked| {
        let p = DpParams {
            unlinked,
            ..params(1.0, 1)
        };
        dp::plan(&columns, parse("count").expect("query"), &p)
            .expect("plan")
            .bounded_rows(&columns)
            .len()
    };
    assert_eq!(rows(Unlinked::Exclude), 0);
    assert_eq!(rows(Unlinked::PerImage), 40);
}

/// DP-FedAvg's accountant: opendp's map of `rounds` Gaussian releases at noise multiplier σ
/// (sensitivity 1). zCDP composes additively (ρ = rounds / 2σ²); the (ε, δ) conversion is at
/// most the classic ρ + 2√(ρ ln 1/δ) and more than ρ; more noise costs less, more rounds more.
#[test]
fn dp_fedavg_epsilon_follows_zcdp_composition() {
    let delta = 1e-5;
    for (sigma, rounds) in [(1.0, 1), (1.0, 10), (2.0, 10), (0.8, 50)] {
        let eps = cxrfed_stats::dp::gaussian_rounds_epsilon(sigma, rounds, delta).expect("eps");
        let rho = f64::from(rounds) / (2.0 * sigma * sigma);
        let classic = rho + 2.0 * (rho * (1.0 / delta).ln()).sqrt();
        assert!(
            eps > rho && eps <= classic * (1.0 + 1e-9),
            "σ {sigma}, T {rounds}: ε {eps}, ρ {rho}, classic {classic}"
        );
    }
    let e = |sigma, rounds| {
        cxrfed_stats::dp::gaussian_rounds_epsilon(sigma, rounds, delta).expect("eps")
    };
    assert!(e(2.0, 10) < e(1.0, 10));
    assert!(e(1.0, 20) > e(1.0, 10));
    // One round at σ is ten rounds at σ√10.
    assert!((e(1.0, 1) - e(10f64.sqrt(), 10)).abs() < 1e-9);
}
