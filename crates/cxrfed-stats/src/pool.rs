//! Pooling DP releases from several sites: the coordinator's half of a federated query.
//!
//! Each site releases raw noisy values (no clamping, no suppression) over the same public
//! layout. Pooled counts and sums are the sums of the sites' values; their noise is the sum of
//! the sites' independent noises, whose distribution is computed exactly by convolving the
//! sites' discrete Laplace (or discrete Gaussian) probability mass functions, so the stated
//! bound is the one the added noise actually has. A pooled mean is Σ noisy sums / Σ noisy
//! counts, its bound combining the two pooled components at half the miss probability each.
//! Clamping and suppression are applied to the pooled values (post-processing).

use crate::dp::{DpRow, DpValue, Mechanism};

/// One site's raw release.
#[derive(Debug, Clone)]
pub struct Part {
    pub site: String,
    pub mechanism: Mechanism,
    pub label_columns: Vec<String>,
    pub value_columns: Vec<String>,
    pub rows: Vec<(Vec<String>, Vec<f64>)>,
    /// Noise scale per value column.
    pub scales: Vec<f64>,
}

/// The pooled result.
#[derive(Debug, Clone, PartialEq)]
pub struct Pooled {
    pub label_columns: Vec<String>,
    pub value_columns: Vec<String>,
    pub rows: Vec<DpRow>,
}

/// Largest support (points) the exact convolution handles; beyond, a normal approximation.
const MAX_SUPPORT: usize = 400_000;

fn pmf(mechanism: Mechanism, scale: f64) -> Vec<f64> {
    // Truncated where the tail is below 1e-12.
    let half = match mechanism {
        Mechanism::Laplace => (scale * 28.0).ceil() as usize + 1,
        Mechanism::Gaussian => (scale * 7.5).ceil() as usize + 1,
    };
    let weight = |x: f64| match mechanism {
        Mechanism::Laplace => (-x.abs() / scale).exp(),
        Mechanism::Gaussian => (-(x * x) / (2.0 * scale * scale)).exp(),
    };
    let mut p: Vec<f64> = (0..=2 * half)
        .map(|i| weight(i as f64 - half as f64))
        .collect();
    let total: f64 = p.iter().sum();
    p.iter_mut().for_each(|v| *v /= total);
    p
}

fn variance(mechanism: Mechanism, scale: f64) -> f64 {
    match mechanism {
        Mechanism::Laplace => {
            let q = (-1.0 / scale).exp();
            2.0 * q / (1.0 - q).powi(2)
        }
        Mechanism::Gaussian => scale * scale,
    }
}

/// The smallest `a` with P(|Σ noise| ≥ a) ≤ 1 − `confidence` for the sum of independent
/// integer noises of the given mechanisms and scales (in units of one count).
pub fn pooled_bound(noises: &[(Mechanism, f64)], confidence: f64) -> f64 {
    let support: usize = noises.iter().map(|&(m, s)| pmf_len(m, s)).sum();
    if noises.is_empty() {
        return 0.0;
    }
    if support > MAX_SUPPORT {
        // Many or wide noises: their sum is close to normal.
        let sd = noises
            .iter()
            .map(|&(m, s)| variance(m, s))
            .sum::<f64>()
            .sqrt();
        return normal_quantile(0.5 + confidence / 2.0) * sd;
    }
    let mut dist = vec![1.0];
    for &(m, s) in noises {
        dist = convolve(&dist, &pmf(m, s));
    }
    let center = (dist.len() - 1) / 2;
    // P(|S| < a) for a = 1, 2, ...: mass within (-a, a).
    let mut inside = dist[center];
    let mut a = 1usize;
    while inside < confidence && a <= center {
        inside += dist[center - a] + dist[center + a];
        a += 1;
    }
    a as f64
}

fn pmf_len(mechanism: Mechanism, scale: f64) -> usize {
    match mechanism {
        Mechanism::Laplace => 2 * ((scale * 28.0).ceil() as usize + 1) + 1,
        Mechanism::Gaussian => 2 * ((scale * 7.5).ceil() as usize + 1) + 1,
    }
}

fn convolve(a: &[f64], b: &[f64]) -> Vec<f64> {
    let mut out = vec![0.0; a.len() + b.len() - 1];
    for (i, &x) in a.iter().enumerate() {
        if x < 1e-300 {
            continue;
        }
        for (j, &y) in b.iter().enumerate() {
            out[i + j] += x * y;
        }
    }
    out
}

/// The standard normal quantile.
fn normal_quantile(p: f64) -> f64 {
    use statrs::distribution::{InverseCDF, Normal};
    Normal::new(0.0, 1.0)
        .map(|n| n.inverse_cdf(p))
        .unwrap_or(1.96)
}

/// Whether two parts have the same layout (labels of every row, value columns).
pub fn same_layout(a: &Part, b: &Part) -> bool {
    a.label_columns == b.label_columns
        && a.value_columns == b.value_columns
        && a.rows.len() == b.rows.len()
        && a.rows
            .iter()
            .zip(&b.rows)
            .all(|(x, y)| x.0 == y.0 && x.1.len() == y.1.len())
}

/// Pools parts of the same layout (check with [`same_layout`] first). `statistic` is the
/// query's (count, histogram, crosstab, sum or mean); `bounds` are the declared bounds of a
/// mean's field, which the pooled mean and its interval are clamped to.
pub fn pool(
    statistic: &str,
    parts: &[Part],
    suppress_below: u64,
    confidence: f64,
    bounds: Option<(f64, f64)>,
) -> Pooled {
    let Some(first) = parts.first() else {
        return Pooled {
            label_columns: Vec::new(),
            value_columns: Vec::new(),
            rows: Vec::new(),
        };
    };
    let noises = |column: usize| -> Vec<(Mechanism, f64)> {
        parts
            .iter()
            .map(|p| (p.mechanism, p.scales.get(column).copied().unwrap_or(1.0)))
            .collect()
    };
    let total =
        |row: usize, column: usize| -> f64 { parts.iter().map(|p| p.rows[row].1[column]).sum() };
    let count_value = |n: f64, bound: f64| DpValue {
        value: {
            let n = n.max(0.0);
            (n >= suppress_below as f64).then_some(n)
        },
        error_bound: bound,
    };
    match statistic {
        "sum" => {
            // Sums are in value units; scale the bound from count units.
            let bound = pooled_bound_scaled(&noises(0), confidence);
            Pooled {
                label_columns: first.label_columns.clone(),
                value_columns: vec!["sum".into()],
                rows: vec![DpRow {
                    labels: Vec::new(),
                    values: vec![DpValue {
                        value: Some(total(0, 0)),
                        error_bound: bound,
                    }],
                }],
            }
        }
        "mean" => {
            let alpha = 1.0 - confidence;
            let (sum, n) = (total(0, 0), total(0, 1));
            let sum_bound = pooled_bound_scaled(&noises(0), 1.0 - alpha / 2.0);
            let count_bound = pooled_bound(&noises(1), 1.0 - alpha / 2.0);
            let count = count_value(n, pooled_bound(&noises(1), confidence));
            let denominator = n.max(1.0);
            let clamp = |m: f64| bounds.map_or(m, |(lo, hi)| m.clamp(lo, hi));
            let estimate = clamp(sum / denominator);
            let bound = if denominator - count_bound <= 0.0 {
                bounds.map_or(f64::INFINITY, |(lo, hi)| hi - lo)
            } else {
                [
                    (sum - sum_bound) / (denominator + count_bound),
                    (sum - sum_bound) / (denominator - count_bound),
                    (sum + sum_bound) / (denominator + count_bound),
                    (sum + sum_bound) / (denominator - count_bound),
                ]
                .into_iter()
                .map(|m| (clamp(m) - estimate).abs())
                .fold(0.0, f64::max)
            };
            Pooled {
                label_columns: Vec::new(),
                value_columns: vec!["mean".into(), "n".into()],
                rows: vec![DpRow {
                    labels: Vec::new(),
                    values: vec![
                        DpValue {
                            value: count.value.map(|_| estimate),
                            error_bound: bound,
                        },
                        count,
                    ],
                }],
            }
        }
        _ => {
            let bounds: Vec<f64> = (0..first.value_columns.len())
                .map(|c| pooled_bound(&noises(c), confidence))
                .collect();
            Pooled {
                label_columns: first.label_columns.clone(),
                value_columns: first.value_columns.clone(),
                rows: first
                    .rows
                    .iter()
                    .enumerate()
                    .map(|(r, (labels, values))| DpRow {
                        labels: labels.clone(),
                        values: (0..values.len())
                            .map(|c| count_value(total(r, c), bounds[c]))
                            .collect(),
                    })
                    .collect(),
            }
        }
    }
}

/// [`pooled_bound`] for noises on a scale other than one count (sums in value units): the
/// continuous analogue via the normal approximation of the summed variances, never smaller than
/// the largest single Laplace bound.
fn pooled_bound_scaled(noises: &[(Mechanism, f64)], confidence: f64) -> f64 {
    let sd = noises
        .iter()
        .map(|&(m, s)| match m {
            Mechanism::Laplace => 2.0 * s * s,
            Mechanism::Gaussian => s * s,
        })
        .sum::<f64>()
        .sqrt();
    let single = noises
        .iter()
        .map(|&(m, s)| match m {
            Mechanism::Laplace => -s * (1.0 - confidence).ln(),
            Mechanism::Gaussian => s * normal_quantile(0.5 + confidence / 2.0),
        })
        .fold(0.0, f64::max);
    (normal_quantile(0.5 + confidence / 2.0) * sd).max(single)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_site_matches_the_discrete_laplace_tail() {
        // P(|X| >= a) for discrete Laplace(b): 2 q^a / (1 + q), q = e^(-1/b).
        for b in [1.0f64, 2.0, 6.0] {
            let a = pooled_bound(&[(Mechanism::Laplace, b)], 0.95);
            let q = (-1.0 / b).exp();
            let tail = |a: f64| 2.0 * q.powf(a) / (1.0 + q);
            assert!(tail(a) <= 0.05 + 1e-9, "b={b} a={a}");
            assert!(tail(a - 1.0) > 0.05, "b={b}: {a} is not the smallest");
        }
    }

    #[test]
    fn pooled_bounds_grow_like_the_square_root_of_the_sites() {
        let one = pooled_bound(&[(Mechanism::Laplace, 2.0)], 0.95);
        let nine = pooled_bound(&[(Mechanism::Laplace, 2.0); 9], 0.95);
        assert!(nine > 2.0 * one && nine < 3.5 * one, "{one} {nine}");
        let normal = pooled_bound(&[(Mechanism::Laplace, 2.0); 400], 0.95);
        let sd = (400.0 * variance(Mechanism::Laplace, 2.0)).sqrt();
        assert!((normal / (1.96 * sd) - 1.0).abs() < 0.02);
    }
}
