//! Differentially private release of cohort statistics, built from `opendp` measurements.
//!
//! One release goes through four steps:
//!
//! 1. **Bind** the query exactly as the exact statistics do: the same fields, filters and
//!    validation ([`crate::exact::bind`]).
//! 2. **Bound contributions.** The privacy unit is the patient. Among the rows that pass the
//!    filters, each patient pseudonym keeps at most `k` rows: the `k` with the smallest
//!    SHA-256(selection key ‖ image hash), where the selection key is derived from the site's
//!    secret and the canonical query text. The same query always selects the same rows, so
//!    repeating it cannot average the selection away. Rows without a pseudonym (images that
//!    carried no PatientID) are left out by default ([`Unlinked`]).
//! 3. **Measure.** An opendp transformation (count by categories, count by key, or clamp and
//!    sum) chained with a noise mechanism (discrete Laplace under pure ε; discrete Gaussian
//!    under zCDP converted to (ε, δ); discrete Laplace with a threshold for categories that are
//!    not public). With one patient's rows bounded to `k`, adding or removing a patient moves
//!    the bounded data by at most `k` in the symmetric distance, so the privacy map evaluated
//!    at `d_in = k` is the (ε, δ) charged. The noise scale is the smallest for which that map
//!    stays within the requested ε, found with opendp's binary search.
//! 4. **Post-process.** Negative counts become 0, counts below the site's suppression
//!    threshold are withheld, and every value carries a 95% error bound from opendp's accuracy
//!    helpers.
//!
//! A mean is a noisy sum over a noisy count of the same bounded rows, each with half of ε (and
//! of δ), clamped to the field's bounds; its error bound combines the two components' bounds at
//! 97.5% each (a union bound), so it covers the mean with at least 95% probability.
//!
//! opendp measurements are not `Send`: callers run [`plan`] and [`Plan::release`] on one thread
//! (a node does it on a blocking thread).

use std::collections::HashMap;

use opendp::accuracy::{discrete_gaussian_scale_to_accuracy, discrete_laplacian_scale_to_accuracy};
use opendp::combinators::{make_approximate, make_chain_mt, make_fix_delta, make_zCDP_to_approxDP};
use opendp::core::Measurement;
use opendp::domains::{AtomDomain, VectorDomain};
use opendp::error::Fallible;
use opendp::measurements::{make_gaussian, make_laplace, make_laplace_threshold};
use opendp::measures::{Approximate, MaxDivergence, ZeroConcentratedDivergence};
use opendp::metrics::{L1Distance, L2Distance, SymmetricDistance};
use opendp::transformations::{make_clamp, make_count_by, make_count_by_categories, make_sum};
use opendp::utilities::search::binary_search;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::columns::{ColumnData, Columns};
use crate::exact::{self, MISSING};
use crate::query::{Normalize, Query, QueryError, Statistic};

/// Confidence level of the error bounds.
pub const CONFIDENCE: f64 = 0.95;
/// Sums are computed in fixed point: numeric values are rounded to units of 1/FIXED_POINT.
const FIXED_POINT: f64 = 10_000.0;
/// The most cells a public-category release may have.
const MAX_CELLS: usize = 1 << 20;

/// The noise mechanism.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub enum Mechanism {
    /// Discrete Laplace under pure ε-DP (δ = 0).
    #[default]
    Laplace,
    /// Discrete Gaussian under zero-concentrated DP, converted to (ε, δ) at the requested δ.
    Gaussian,
}

impl Mechanism {
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Laplace => "laplace",
            Mechanism::Gaussian => "gaussian",
        }
    }
}

/// What to do with rows whose patient is unknown (no pseudonym).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Unlinked {
    /// Leave them out of every DP release: their privacy unit cannot be bounded.
    #[default]
    Exclude,
    /// Treat each such image as its own patient (only where one image per patient is known).
    PerImage,
}

/// The parameters of one release.
#[derive(Debug, Clone)]
pub struct DpParams {
    /// The ε the caller asks to spend (the charged ε is opendp's map, at most this).
    pub epsilon: f64,
    /// δ: the target for the Gaussian mechanism and for thresholded releases; 0 otherwise.
    pub delta: f64,
    pub mechanism: Mechanism,
    /// Rows a patient may contribute (k).
    pub contributions: u32,
    /// Noisy counts below this are withheld.
    pub suppress_below: u64,
    pub unlinked: Unlinked,
    /// Site secret keying the per-query row selection.
    pub selection_secret: [u8; 32],
    /// Release the raw noisy values (no clamping, no suppression; a mean as its noisy sum and
    /// count) for a coordinator to pool. Still differentially private: clamping and
    /// suppression are post-processing.
    pub raw: bool,
}

/// Why a release could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DpError {
    #[error(transparent)]
    Query(#[from] QueryError),
    /// The request is valid text but cannot be released privately as asked.
    #[error("{0}")]
    Unsupported(String),
    #[error("opendp: {0}")]
    OpenDp(String),
}

fn opendp_error(e: opendp::error::Error) -> DpError {
    DpError::OpenDp(match e.message {
        Some(m) => format!("{}: {m}", e.variant),
        None => e.variant.to_string(),
    })
}

/// The privacy cost of a release, from opendp's privacy map.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Cost {
    pub epsilon: f64,
    pub delta: f64,
}

/// One released number: `None` when withheld (below the suppression threshold).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DpValue {
    pub value: Option<f64>,
    /// The true value lies within ± this of the released one with 95% probability (before
    /// clamping and suppression).
    pub error_bound: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DpRow {
    pub labels: Vec<String>,
    pub values: Vec<DpValue>,
}

/// A differentially private result with everything needed to read it honestly.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DpRelease {
    pub statistic: String,
    /// The canonical query text.
    pub query: String,
    pub label_columns: Vec<String>,
    pub value_columns: Vec<String>,
    pub rows: Vec<DpRow>,
    pub cost: Cost,
    /// e.g. "discrete laplace" or "discrete laplace, threshold 41".
    pub mechanism: String,
    /// The noise scale of the released values, in their units (the sum's for a mean).
    pub noise_scale: f64,
    pub confidence: f64,
    pub contributions: u32,
    pub suppress_below: u64,
    /// The threshold of a thresholded release (categories that are not public).
    pub threshold: Option<u64>,
    /// The noise scale of each value column, in its units.
    pub value_scales: Vec<f64>,
    /// Whether the values are raw (see [`DpParams::raw`]).
    pub raw: bool,
    /// How to read the release (how a mean was built, what was clamped).
    pub notes: Vec<String>,
}

impl DpRelease {
    /// SHA-256 over the released values and parameters (hex): what the audit log records.
    pub fn digest(&self) -> String {
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        hex(&Sha256::digest(&bytes))
    }
}

fn hex(bytes: &[u8]) -> String {
    ::hex::encode(bytes)
}

type CellsMeasurement = Measurement<
    VectorDomain<AtomDomain<u32>>,
    SymmetricDistance,
    Approximate<MaxDivergence>,
    Vec<i64>,
>;
type KeyedMeasurement = Measurement<
    VectorDomain<AtomDomain<u64>>,
    SymmetricDistance,
    Approximate<MaxDivergence>,
    HashMap<u64, i64>,
>;
type SumMeasurement =
    Measurement<VectorDomain<AtomDomain<i64>>, SymmetricDistance, Approximate<MaxDivergence>, i64>;

/// Noisy counts of `cells` categories (indices `0..cells`).
fn cells_measurement(
    cells: u32,
    mechanism: Mechanism,
    scale: f64,
    delta: f64,
) -> Fallible<CellsMeasurement> {
    let domain = VectorDomain::new(AtomDomain::<u32>::default());
    let categories: Vec<u32> = (0..cells).collect();
    match mechanism {
        Mechanism::Laplace => {
            let count = make_count_by_categories::<L1Distance<i64>, u32, i64>(
                domain,
                SymmetricDistance,
                categories,
                false,
            )?;
            let noise = make_laplace::<_, _, MaxDivergence>(
                count.output_domain.clone(),
                count.output_metric.clone(),
                scale,
                None,
            )?;
            make_approximate(make_chain_mt(&noise, &count)?)
        }
        Mechanism::Gaussian => {
            let count = make_count_by_categories::<L2Distance<i64>, u32, i64>(
                domain,
                SymmetricDistance,
                categories,
                false,
            )?;
            let noise = make_gaussian::<_, _, ZeroConcentratedDivergence>(
                count.output_domain.clone(),
                count.output_metric.clone(),
                scale,
                None,
            )?;
            make_fix_delta(
                &make_zCDP_to_approxDP(make_chain_mt(&noise, &count)?)?,
                delta,
            )
        }
    }
}

/// Noisy counts per key, released only above `threshold` (keys are data, not public).
fn keyed_measurement(scale: f64, threshold: i64) -> Fallible<KeyedMeasurement> {
    let count = make_count_by::<u64, i64>(
        VectorDomain::new(AtomDomain::<u64>::default()),
        SymmetricDistance,
    )?;
    let noise = make_laplace_threshold::<_, _, Approximate<MaxDivergence>>(
        count.output_domain.clone(),
        count.output_metric.clone(),
        scale,
        threshold,
        None,
    )?;
    make_chain_mt(&noise, &count)
}

/// A noisy sum of fixed-point values clamped to `bounds`.
fn sum_measurement(
    bounds: (i64, i64),
    mechanism: Mechanism,
    scale: f64,
    delta: f64,
) -> Fallible<SumMeasurement> {
    let clamp = make_clamp(
        VectorDomain::new(AtomDomain::<i64>::default()),
        SymmetricDistance,
        bounds,
    )?;
    let sum = (clamp
        >> make_sum(
            VectorDomain::new(AtomDomain::new_closed(bounds)?),
            SymmetricDistance,
        )?)?;
    match mechanism {
        Mechanism::Laplace => {
            let noise = make_laplace::<_, _, MaxDivergence>(
                sum.output_domain.clone(),
                sum.output_metric.clone(),
                scale,
                None,
            )?;
            make_approximate(make_chain_mt(&noise, &sum)?)
        }
        Mechanism::Gaussian => {
            let noise = make_gaussian::<_, _, ZeroConcentratedDivergence>(
                sum.output_domain.clone(),
                sum.output_metric.clone(),
                scale,
                None,
            )?;
            make_fix_delta(&make_zCDP_to_approxDP(make_chain_mt(&noise, &sum)?)?, delta)
        }
    }
}

/// The smallest scale whose ε (from `epsilon_at`) is within `epsilon`.
fn calibrate(
    epsilon: f64,
    sensitivity: f64,
    mechanism: Mechanism,
    delta: f64,
    epsilon_at: impl Fn(f64) -> Fallible<f64>,
) -> Result<f64, DpError> {
    // A first guess: exact for Laplace, the classical (loose) bound for Gaussian.
    let guess = match mechanism {
        Mechanism::Laplace => sensitivity / epsilon,
        Mechanism::Gaussian => sensitivity * (2.0 * (1.25 / delta).ln()).sqrt() / epsilon,
    };
    let passes = |scale: &f64| epsilon_at(*scale).is_ok_and(|e| e <= epsilon);
    binary_search(passes, (guess / 256.0, guess * 256.0)).map_err(opendp_error)
}

fn accuracy(mechanism: Mechanism, scale: f64, alpha: f64) -> Result<f64, DpError> {
    match mechanism {
        Mechanism::Laplace => discrete_laplacian_scale_to_accuracy(scale, alpha),
        Mechanism::Gaussian => discrete_gaussian_scale_to_accuracy(scale, alpha),
    }
    .map_err(opendp_error)
}

/// What a plan releases.
#[derive(Debug, Clone)]
enum Shape {
    /// Counts over every combination of public categories of `tab` (none: one count).
    Cells { tab: Vec<usize>, cells: u32 },
    /// Counts over the combinations that occur, thresholded (some category is not public).
    Keyed { tab: Vec<usize>, threshold: i64 },
    /// A clamped sum (fixed point) of a numeric column.
    Sum { column: usize, bounds: (f64, f64) },
    /// Noisy sum over noisy count.
    Mean { column: usize, bounds: (f64, f64) },
}

/// A bound, calibrated release, ready to run. Not `Send` (it holds no opendp state, but runs
/// opendp when released).
#[derive(Debug)]
pub struct Plan {
    bound: exact::Bound,
    shape: Shape,
    params: DpParams,
    /// Scale of the count (cells, keyed, mean's count) or of the fixed-point sum.
    scale: f64,
    /// The mean's count scale.
    count_scale: f64,
    cost: Cost,
    selection_key: [u8; 32],
    canonical: String,
}

fn validate(params: &DpParams) -> Result<(), DpError> {
    if !(params.epsilon.is_finite() && params.epsilon > 0.0) {
        return Err(DpError::Unsupported(format!(
            "epsilon must be a positive number, got {}",
            params.epsilon
        )));
    }
    if !(params.delta.is_finite() && (0.0..1.0).contains(&params.delta)) {
        return Err(DpError::Unsupported(format!(
            "delta must be in [0, 1), got {}",
            params.delta
        )));
    }
    if params.mechanism == Mechanism::Gaussian && params.delta <= 0.0 {
        return Err(DpError::Unsupported(
            "the gaussian mechanism needs a delta > 0 (e.g. 1e-6)".into(),
        ));
    }
    if params.contributions == 0 {
        return Err(DpError::Unsupported(
            "contributions per patient (k) must be at least 1".into(),
        ));
    }
    Ok(())
}

fn numeric_bounds(columns: &Columns, column: usize) -> Result<(f64, f64), DpError> {
    match columns.columns()[column].kind {
        cxrfed_schema::flat::FieldKind::Numeric { min, max } if min.is_finite() && max >= min => {
            Ok((min, max))
        }
        _ => Err(DpError::Unsupported(format!(
            "{} has no declared bounds; a DP sum or mean needs them",
            columns.columns()[column].name
        ))),
    }
}

fn fixed_bounds(bounds: (f64, f64)) -> (i64, i64) {
    (
        (bounds.0 * FIXED_POINT).floor() as i64,
        (bounds.1 * FIXED_POINT).ceil() as i64,
    )
}

/// Binds `query`, checks it can be released privately, and calibrates the noise to
/// `params.epsilon` (and δ) with opendp's privacy maps at `d_in = k`.
pub fn plan(columns: &Columns, query: Query, params: &DpParams) -> Result<Plan, DpError> {
    validate(params)?;
    if query.normalize != Normalize::None {
        return Err(DpError::Unsupported(
            "normalize is not offered on DP releases: divide the released counts (their error \
             bounds do not carry over to ratios)"
                .into(),
        ));
    }
    let canonical = query.canonical();
    let bound = exact::bind(columns, query)?;
    let k = params.contributions;
    let kf = f64::from(k);
    let (mechanism, delta) = (params.mechanism, params.delta);
    let tab: Vec<usize> = match &bound.query.statistic {
        Statistic::Count => bound.group_column().into_iter().collect(),
        Statistic::Histogram(_) | Statistic::Crosstab(_) => bound.tabulated().to_vec(),
        Statistic::Summary(f) => {
            return Err(DpError::Unsupported(format!(
                "summary (quantiles, min, max) has no DP release; use `mean {0}` or `sum {0}`",
                f.value
            )));
        }
        Statistic::Sum(_) | Statistic::Mean(_) => Vec::new(),
    };
    let (shape, scale, count_scale, cost) = match &bound.query.statistic {
        Statistic::Sum(f) | Statistic::Mean(f) => {
            if bound.group_column().is_some() {
                return Err(DpError::Unsupported(format!(
                    "a DP {} is released for the whole cohort; filter with `where` instead of `by`",
                    bound.query.statistic.name()
                )));
            }
            let column = bound
                .numeric_column()
                .ok_or_else(|| DpError::Unsupported(format!("{} is not numeric", f.value)))?;
            let bounds = numeric_bounds(columns, column)?;
            let fixed = fixed_bounds(bounds);
            let sensitivity = kf * fixed.0.unsigned_abs().max(fixed.1.unsigned_abs()) as f64;
            let mean = matches!(bound.query.statistic, Statistic::Mean(_));
            let (part_epsilon, part_delta) = if mean {
                (params.epsilon / 2.0, delta / 2.0)
            } else {
                (params.epsilon, delta)
            };
            let scale = calibrate(part_epsilon, sensitivity, mechanism, part_delta, |s| {
                Ok(sum_measurement(fixed, mechanism, s, part_delta)?.map(&k)?.0)
            })?;
            let sum_cost = sum_measurement(fixed, mechanism, scale, part_delta)
                .and_then(|m| m.map(&k))
                .map_err(opendp_error)?;
            if mean {
                let count_scale = calibrate(part_epsilon, kf, mechanism, part_delta, |s| {
                    Ok(cells_measurement(1, mechanism, s, part_delta)?.map(&k)?.0)
                })?;
                let count_cost = cells_measurement(1, mechanism, count_scale, part_delta)
                    .and_then(|m| m.map(&k))
                    .map_err(opendp_error)?;
                (
                    Shape::Mean { column, bounds },
                    scale,
                    count_scale,
                    Cost {
                        epsilon: sum_cost.0 + count_cost.0,
                        delta: sum_cost.1 + count_cost.1,
                    },
                )
            } else {
                (
                    Shape::Sum { column, bounds },
                    scale,
                    0.0,
                    Cost {
                        epsilon: sum_cost.0,
                        delta: sum_cost.1,
                    },
                )
            }
        }
        _ => {
            let public = tab.iter().all(|&c| match &columns.columns()[c].data {
                ColumnData::Coded { dict, .. } => dict.is_fixed(),
                ColumnData::Numeric(_) => false,
            });
            if public {
                let cells = tab
                    .iter()
                    .map(|&c| exact::dict_of(columns, c).0.width())
                    .try_fold(1usize, |acc, w| acc.checked_mul(w))
                    .filter(|&n| n <= MAX_CELLS)
                    .ok_or_else(|| {
                        DpError::Unsupported(format!(
                            "the release would have more than {MAX_CELLS} cells"
                        ))
                    })? as u32;
                let scale = calibrate(params.epsilon, kf, mechanism, delta, |s| {
                    Ok(cells_measurement(cells, mechanism, s, delta)?.map(&k)?.0)
                })?;
                let (epsilon, delta) = cells_measurement(cells, mechanism, scale, delta)
                    .and_then(|m| m.map(&k))
                    .map_err(opendp_error)?;
                (
                    Shape::Cells { tab, cells },
                    scale,
                    scale,
                    Cost { epsilon, delta },
                )
            } else {
                if mechanism == Mechanism::Gaussian {
                    return Err(DpError::Unsupported(
                        "categories that are not public (months, modalities, free text) are \
                         released with the thresholded laplace mechanism; drop --mechanism gaussian"
                            .into(),
                    ));
                }
                if delta <= 0.0 {
                    return Err(DpError::Unsupported(
                        "this release has categories that are not public (months, modalities, \
                         free text): it is thresholded and needs a delta > 0 (e.g. 1e-6)"
                            .into(),
                    ));
                }
                // ε depends on the scale only; δ on the threshold.
                let scale = calibrate(params.epsilon, kf, mechanism, delta, |s| {
                    Ok(keyed_measurement(s, i64::MAX / 4)?.map(&k)?.0)
                })?;
                let needed = binary_search(
                    |t: &i64| {
                        keyed_measurement(scale, *t)
                            .and_then(|m| m.map(&k))
                            .is_ok_and(|(e, d)| e <= params.epsilon && d <= delta)
                    },
                    (i64::from(k), i64::MAX / 4),
                )
                .map_err(opendp_error)?;
                let threshold = needed.max(params.suppress_below.min(i64::MAX as u64) as i64);
                let (epsilon, delta) = keyed_measurement(scale, threshold)
                    .and_then(|m| m.map(&k))
                    .map_err(opendp_error)?;
                (
                    Shape::Keyed { tab, threshold },
                    scale,
                    scale,
                    Cost { epsilon, delta },
                )
            }
        }
    };
    let selection_key = {
        let mut h = Sha256::new();
        h.update(b"cxrfed dp row selection v1\0");
        h.update(params.selection_secret);
        h.update(canonical.as_bytes());
        h.finalize().into()
    };
    Ok(Plan {
        bound,
        shape,
        params: params.clone(),
        scale,
        count_scale,
        cost,
        selection_key,
        canonical,
    })
}

/// The per-query selection priority of an image: its content hash (already SHA-256 of the
/// pixels) mixed word by word with the query's seed through the splitmix64 finalizer. It depends only on the image and the query, so bounding stays a per-patient
/// transformation; the seed comes from the site secret and the canonical query, so the choice
/// is the same for the same query and cannot be predicted without the secret.
fn priority(image_sha256: &str, seed: u64) -> u64 {
    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    let bytes = image_sha256.as_bytes();
    let mut h = mix(seed);
    if bytes.len().is_multiple_of(16) && bytes.iter().all(u8::is_ascii_hexdigit) {
        for word in bytes.chunks(16) {
            let word = std::str::from_utf8(word)
                .ok()
                .and_then(|w| u64::from_str_radix(w, 16).ok())
                .unwrap_or(0);
            h = mix(h ^ word);
        }
    } else {
        // Not a hex hash (never from a node): fold the bytes.
        for &b in bytes {
            h = mix(h ^ u64::from(b));
        }
    }
    h
}

/// Keeps at most `k` rows per patient: all rows of a patient with at most `k`, else the `k`
/// with the smallest selection priority. Rows without a pseudonym follow `unlinked`.
pub fn bound_contributions(
    columns: &Columns,
    rows: &[usize],
    k: u32,
    selection_key: &[u8; 32],
    unlinked: Unlinked,
) -> Vec<usize> {
    let pseudonyms = columns.pseudonyms();
    let images = columns.images();
    let mut seed_bytes = [0u8; 8];
    seed_bytes.copy_from_slice(&selection_key[..8]);
    let seed = u64::from_le_bytes(seed_bytes);
    let most = rows.iter().map(|&r| pseudonyms[r]).max().unwrap_or(0) as usize;
    let mut per_patient = vec![0u32; most + 1];
    for &r in rows {
        let p = pseudonyms[r] as usize;
        per_patient[p] = per_patient[p].saturating_add(1);
    }
    let mut kept = Vec::with_capacity(rows.len());
    if k == 1 {
        // The one row of smallest priority per over-contributing patient, in one pass.
        const NONE: (u64, usize) = (u64::MAX, usize::MAX);
        let mut best = vec![NONE; most + 1];
        for &r in rows {
            let p = pseudonyms[r];
            if p == 0 {
                if unlinked == Unlinked::PerImage {
                    kept.push(r);
                }
            } else if per_patient[p as usize] <= 1 {
                kept.push(r);
            } else {
                let candidate = (priority(&images[r], seed), r);
                if candidate < best[p as usize] {
                    best[p as usize] = candidate;
                }
            }
        }
        kept.extend(best.into_iter().filter(|b| *b != NONE).map(|(_, r)| r));
    } else {
        let mut over: Vec<(u32, u64, usize)> = Vec::new();
        for &r in rows {
            let p = pseudonyms[r];
            if p == 0 {
                if unlinked == Unlinked::PerImage {
                    kept.push(r);
                }
            } else if per_patient[p as usize] <= k {
                kept.push(r);
            } else {
                over.push((p, priority(&images[r], seed), r));
            }
        }
        over.sort_unstable();
        let mut taken = 0u32;
        let mut current = 0u32;
        for (p, _, r) in over {
            if p != current {
                current = p;
                taken = 0;
            }
            if taken < k {
                kept.push(r);
                taken += 1;
            }
        }
    }
    kept.sort_unstable();
    kept
}

/// Row-major cell index of `row` over the codes of `tab`.
fn cell_index(columns: &Columns, tab: &[usize], row: usize) -> u64 {
    let mut index = 0u64;
    for &c in tab {
        let (dict, codes) = exact::dict_of(columns, c);
        index = index * dict.width() as u64 + u64::from(codes[row]);
    }
    index
}

/// The labels of a cell index.
fn cell_labels(columns: &Columns, tab: &[usize], mut index: u64) -> Vec<String> {
    let mut labels = vec![String::new(); tab.len()];
    for (i, &c) in tab.iter().enumerate().rev() {
        let dict = exact::dict_of(columns, c).0;
        let width = dict.width() as u64;
        let code = (index % width) as u16;
        index /= width;
        labels[i] = dict.name(code).unwrap_or(MISSING).to_string();
    }
    labels
}

impl Plan {
    /// The (ε, δ) this release costs, from opendp's privacy map at `d_in = k`.
    pub fn cost(&self) -> Cost {
        self.cost
    }

    pub fn canonical_query(&self) -> &str {
        &self.canonical
    }

    /// The rows this release reads: the cohort, with at most `k` rows per patient (and, for
    /// a sum or mean, only rows with a value).
    pub fn bounded_rows(&self, columns: &Columns) -> Vec<usize> {
        let mut cohort = self.bound.cohort(columns);
        if let Shape::Sum { column, .. } | Shape::Mean { column, .. } = self.shape
            && let ColumnData::Numeric(values) = &columns.columns()[column].data
        {
            cohort.retain(|&r| !values[r].is_nan());
        }
        bound_contributions(
            columns,
            &cohort,
            self.params.contributions,
            &self.selection_key,
            self.params.unlinked,
        )
    }

    fn count_value(&self, noisy: i64, bound: f64) -> DpValue {
        if self.params.raw {
            return DpValue {
                value: Some(noisy as f64),
                error_bound: bound,
            };
        }
        let clamped = noisy.max(0) as u64;
        DpValue {
            value: (clamped >= self.params.suppress_below).then_some(clamped as f64),
            error_bound: bound,
        }
    }

    /// Runs the measurement on the bounded rows and post-processes the result.
    pub fn release(&self, columns: &Columns) -> Result<DpRelease, DpError> {
        self.run(columns, false)
    }

    /// The exact counts of the bounded rows, laid out as [`Plan::release`] lays out the noisy
    /// ones (suppression applies alike): what the release estimates, for accuracy studies and benchmarks.
    /// Never for a remote caller. Count, histogram and crosstab over public categories only.
    pub fn noiseless(&self, columns: &Columns) -> Result<DpRelease, DpError> {
        if !matches!(self.shape, Shape::Cells { .. }) {
            return Err(DpError::Unsupported(
                "noiseless layouts exist for counts over public categories only".into(),
            ));
        }
        self.run(columns, true)
    }

    fn run(&self, columns: &Columns, noiseless: bool) -> Result<DpRelease, DpError> {
        let rows = self.bounded_rows(columns);
        let params = &self.params;
        let (k, mechanism, alpha) = (params.contributions, params.mechanism, 1.0 - CONFIDENCE);
        let names = |tab: &[usize]| -> Vec<String> {
            tab.iter()
                .map(|&c| columns.columns()[c].name.clone())
                .collect()
        };
        let mut notes = vec![format!(
            "each patient contributes at most {k} record(s); noisy counts below {} are withheld, negative ones shown as 0",
            params.suppress_below
        )];
        if params.unlinked == Unlinked::Exclude {
            notes.push("records without a patient pseudonym are not counted".into());
        }
        let mut release = DpRelease {
            statistic: self.bound.query.statistic.name().to_string(),
            query: self.canonical.clone(),
            label_columns: Vec::new(),
            value_columns: Vec::new(),
            rows: Vec::new(),
            cost: self.cost,
            mechanism: format!("discrete {}", mechanism.name()),
            noise_scale: self.scale,
            confidence: CONFIDENCE,
            contributions: k,
            suppress_below: params.suppress_below,
            threshold: None,
            value_scales: Vec::new(),
            raw: params.raw,
            notes: Vec::new(),
        };
        match &self.shape {
            Shape::Cells { tab, cells } => {
                let data: Vec<u32> = rows
                    .iter()
                    .map(|&r| cell_index(columns, tab, r) as u32)
                    .collect();
                let noisy = if noiseless {
                    let mut exact = vec![0i64; *cells as usize];
                    for &cell in &data {
                        exact[cell as usize] += 1;
                    }
                    exact
                } else {
                    cells_measurement(*cells, mechanism, self.scale, params.delta)
                        .and_then(|m| m.invoke(&data))
                        .map_err(opendp_error)?
                };
                let bound = accuracy(mechanism, self.scale, alpha)?;
                self.lay_out_cells(columns, tab, &noisy, bound, &mut release);
                release.label_columns = match tab.len() {
                    0 | 1 => names(tab),
                    n => names(&tab[..n - 1]),
                };
            }
            Shape::Keyed { .. } if params.raw => {
                return Err(DpError::Unsupported(
                    "a pooled release needs public categories; months, modalities and free text \
                     are released per site only"
                        .into(),
                ));
            }
            Shape::Keyed { tab, threshold } => {
                let data: Vec<u64> = rows.iter().map(|&r| cell_index(columns, tab, r)).collect();
                let noisy = keyed_measurement(self.scale, *threshold)
                    .and_then(|m| m.invoke(&data))
                    .map_err(opendp_error)?;
                let bound = accuracy(mechanism, self.scale, alpha)?;
                let mut released: Vec<(Vec<String>, i64)> = noisy
                    .into_iter()
                    .map(|(key, n)| (cell_labels(columns, tab, key), n))
                    .collect();
                released.sort();
                release.label_columns = names(tab);
                release.value_columns = vec!["count".into()];
                release.rows = released
                    .into_iter()
                    .map(|(labels, n)| DpRow {
                        labels,
                        values: vec![self.count_value(n, bound)],
                    })
                    .collect();
                release.threshold = Some(*threshold as u64);
                release.mechanism = format!("discrete laplace, threshold {threshold}");
                notes.push(format!(
                    "categories are not public: only combinations whose noisy count reaches {threshold} are released, others may exist"
                ));
            }
            Shape::Sum { column, bounds } | Shape::Mean { column, bounds } => {
                let ColumnData::Numeric(values) = &columns.columns()[*column].data else {
                    return Err(DpError::Unsupported("not a numeric column".into()));
                };
                let fixed = fixed_bounds(*bounds);
                let data: Vec<i64> = rows
                    .iter()
                    .map(|&r| (f64::from(values[r]) * FIXED_POINT).round() as i64)
                    .collect();
                let mean = matches!(self.shape, Shape::Mean { .. });
                let part_delta = if mean {
                    params.delta / 2.0
                } else {
                    params.delta
                };
                let noisy_sum = sum_measurement(fixed, mechanism, self.scale, part_delta)
                    .and_then(|m| m.invoke(&data))
                    .map_err(opendp_error)? as f64
                    / FIXED_POINT;
                release.noise_scale = self.scale / FIXED_POINT;
                let name = columns.columns()[*column].name.clone();
                notes.push(format!(
                    "values of {name} are clamped to its declared bounds [{}, {}] and summed in units of {}",
                    bounds.0,
                    bounds.1,
                    1.0 / FIXED_POINT
                ));
                if mean && params.raw {
                    let noisy_count = cells_measurement(1, mechanism, self.count_scale, part_delta)
                        .and_then(|m| m.invoke(&vec![0u32; rows.len()]))
                        .map_err(opendp_error)?[0];
                    release.value_columns = vec!["sum".into(), "n".into()];
                    release.value_scales = vec![self.scale / FIXED_POINT, self.count_scale];
                    release.rows = vec![DpRow {
                        labels: Vec::new(),
                        values: vec![
                            DpValue {
                                value: Some(noisy_sum),
                                error_bound: accuracy(mechanism, self.scale, alpha)? / FIXED_POINT,
                            },
                            DpValue {
                                value: Some(noisy_count as f64),
                                error_bound: accuracy(mechanism, self.count_scale, alpha)?,
                            },
                        ],
                    }];
                } else if !mean {
                    release.value_columns = vec!["sum".into()];
                    release.rows = vec![DpRow {
                        labels: Vec::new(),
                        values: vec![DpValue {
                            value: Some(noisy_sum),
                            error_bound: accuracy(mechanism, self.scale, alpha)? / FIXED_POINT,
                        }],
                    }];
                } else {
                    let noisy_count = cells_measurement(1, mechanism, self.count_scale, part_delta)
                        .and_then(|m| m.invoke(&vec![0u32; rows.len()]))
                        .map_err(opendp_error)?[0];
                    // Each component at 97.5%: both hold together with at least 95%.
                    let sum_bound = accuracy(mechanism, self.scale, alpha / 2.0)? / FIXED_POINT;
                    let count_bound = accuracy(mechanism, self.count_scale, alpha / 2.0)?;
                    let count = self
                        .count_value(noisy_count, accuracy(mechanism, self.count_scale, alpha)?);
                    let n = noisy_count.max(1) as f64;
                    let estimate = (noisy_sum / n).clamp(bounds.0, bounds.1);
                    let width = bounds.1 - bounds.0;
                    let mean_bound = if n - count_bound <= 0.0 {
                        width
                    } else {
                        [
                            (noisy_sum - sum_bound) / (n + count_bound),
                            (noisy_sum - sum_bound) / (n - count_bound),
                            (noisy_sum + sum_bound) / (n + count_bound),
                            (noisy_sum + sum_bound) / (n - count_bound),
                        ]
                        .into_iter()
                        .map(|m| (m.clamp(bounds.0, bounds.1) - estimate).abs())
                        .fold(0.0, f64::max)
                    };
                    release.value_columns = vec!["mean".into(), "n".into()];
                    release.rows = vec![DpRow {
                        labels: Vec::new(),
                        values: vec![
                            DpValue {
                                value: count.value.map(|_| estimate),
                                error_bound: mean_bound,
                            },
                            count,
                        ],
                    }];
                    notes.push(format!(
                        "mean = noisy sum / noisy count, each with half of epsilon (count noise scale {:.3}); its bound combines both at 97.5%",
                        self.count_scale
                    ));
                }
            }
        }
        if release.value_scales.is_empty() {
            let scale = match self.shape {
                Shape::Sum { .. } => self.scale / FIXED_POINT,
                _ => self.scale,
            };
            release.value_scales = vec![scale; release.value_columns.len()];
        }
        if params.raw {
            notes.push("raw noisy values for pooling: not clamped, not suppressed".to_string());
        }
        release.notes = notes;
        Ok(release)
    }

    /// Public cells: one row per code of a single dimension, or a contingency layout (the last
    /// dimension across) for several. Every public category is shown, with "(missing)" last.
    fn lay_out_cells(
        &self,
        columns: &Columns,
        tab: &[usize],
        noisy: &[i64],
        bound: f64,
        release: &mut DpRelease,
    ) {
        let codes_of = |c: usize| {
            let mut codes = exact::dict_of(columns, c).0.ordered_codes();
            codes.push(0);
            codes
        };
        let label = |c: usize, code: u16| {
            exact::dict_of(columns, c)
                .0
                .name(code)
                .unwrap_or(MISSING)
                .to_string()
        };
        let widths: Vec<usize> = tab
            .iter()
            .map(|&c| exact::dict_of(columns, c).0.width())
            .collect();
        let index = |key: &[u16]| {
            key.iter()
                .zip(&widths)
                .fold(0usize, |acc, (&k, &w)| acc * w + usize::from(k))
        };
        match tab {
            [] => {
                release.value_columns = vec!["count".into()];
                release.rows = vec![DpRow {
                    labels: Vec::new(),
                    values: vec![self.count_value(noisy[0], bound)],
                }];
            }
            [only] => {
                release.value_columns = vec!["count".into()];
                release.rows = codes_of(*only)
                    .into_iter()
                    .map(|code| DpRow {
                        labels: vec![label(*only, code)],
                        values: vec![self.count_value(noisy[usize::from(code)], bound)],
                    })
                    .collect();
            }
            [down @ .., across] => {
                let across_codes = codes_of(*across);
                release.value_columns = across_codes.iter().map(|&c| label(*across, c)).collect();
                let mut keys: Vec<Vec<u16>> = vec![Vec::new()];
                for &d in down {
                    keys = keys
                        .into_iter()
                        .flat_map(|prefix| {
                            codes_of(d).into_iter().map(move |c| {
                                let mut key = prefix.clone();
                                key.push(c);
                                key
                            })
                        })
                        .collect();
                }
                release.rows = keys
                    .into_iter()
                    .map(|key| DpRow {
                        labels: key
                            .iter()
                            .zip(down)
                            .map(|(&code, &d)| label(d, code))
                            .collect(),
                        values: across_codes
                            .iter()
                            .map(|&c| {
                                let mut full = key.clone();
                                full.push(c);
                                self.count_value(noisy[index(&full)], bound)
                            })
                            .collect(),
                    })
                    .collect();
            }
        }
    }
}

/// Plans and releases in one call (tests and benchmarks; a node charges between the two).
pub fn release(columns: &Columns, query: Query, params: &DpParams) -> Result<DpRelease, DpError> {
    plan(columns, query, params)?.release(columns)
}

/// DP-FedAvg's accountant: `rounds` Gaussian releases of a sum of site updates, each update
/// clipped to L2 norm C and the noise's standard deviation `noise_multiplier · C`. Returns the
/// site-level ε at `delta`, from opendp's privacy map: zCDP composes additively (ρ per round
/// is 1/(2σ²)), so `rounds` releases at σ are one release at σ/√rounds, converted to (ε, δ).
pub fn gaussian_rounds_epsilon(
    noise_multiplier: f64,
    rounds: u32,
    delta: f64,
) -> Result<f64, DpError> {
    let scale = noise_multiplier / f64::from(rounds.max(1)).sqrt();
    let noise = make_gaussian::<_, _, ZeroConcentratedDivergence>(
        VectorDomain::new(AtomDomain::<f64>::new_non_nan()),
        L2Distance::<f64>::default(),
        scale,
        None,
    )
    .map_err(opendp_error)?;
    let measurement = make_fix_delta(&make_zCDP_to_approxDP(noise).map_err(opendp_error)?, delta)
        .map_err(opendp_error)?;
    let (epsilon, _) = measurement.map(&1.0).map_err(opendp_error)?;
    Ok(epsilon)
}

/// A site's noisy counts for a training round's report (held-out totals and correct
/// predictions per head, training samples): opendp's discrete Laplace on the integer vector,
/// at `epsilon` for an L1 sensitivity of `sensitivity` (what one record can change in all of
/// them together). The privacy map is checked against `epsilon` before anything is sampled.
pub fn noisy_counts(counts: &[i64], sensitivity: u32, epsilon: f64) -> Result<Vec<i64>, DpError> {
    if !(epsilon.is_finite() && epsilon > 0.0) || sensitivity == 0 {
        return Err(DpError::Unsupported(
            "noisy counts need epsilon > 0 and a sensitivity".into(),
        ));
    }
    let scale = f64::from(sensitivity) / epsilon;
    let noise = make_laplace::<_, _, MaxDivergence>(
        VectorDomain::new(AtomDomain::<i64>::default()),
        L1Distance::<i64>::default(),
        scale,
        None,
    )
    .map_err(opendp_error)?;
    let spent = noise.map(&i64::from(sensitivity)).map_err(opendp_error)?;
    if spent > epsilon * (1.0 + 1e-9) {
        return Err(DpError::Unsupported(format!(
            "the count mechanism spends {spent}, more than {epsilon}"
        )));
    }
    noise.invoke(&counts.to_vec()).map_err(opendp_error)
}

/// Gaussian noise of standard deviation `std` on every coordinate of a site's clipped update
/// (opendp's sampler: exact, from the operating system's randomness).
pub fn gaussian_noise(values: &[f64], std: f64) -> Result<Vec<f64>, DpError> {
    if !(std.is_finite() && std > 0.0) {
        return Err(DpError::Unsupported("noise needs a positive std".into()));
    }
    let noise = make_gaussian::<_, _, ZeroConcentratedDivergence>(
        VectorDomain::new(AtomDomain::<f64>::new_non_nan()),
        L2Distance::<f64>::default(),
        std,
        None,
    )
    .map_err(opendp_error)?;
    noise.invoke(&values.to_vec()).map_err(opendp_error)
}

/// What the `releases`-th Gaussian release of one job adds to a site's privacy loss: the
/// job's ε after `releases` releases at `noise_multiplier` (zCDP composition, opendp's map, at
/// the job's δ) minus its ε after one fewer. Charged round by round, the sum over a job is the
/// job's composed ε exactly; across jobs the ledger composes additively.
pub fn gaussian_increment(
    noise_multiplier: f64,
    releases: u32,
    delta: f64,
) -> Result<f64, DpError> {
    let after = gaussian_rounds_epsilon(noise_multiplier, releases.max(1), delta)?;
    let before = if releases > 1 {
        gaussian_rounds_epsilon(noise_multiplier, releases - 1, delta)?
    } else {
        0.0
    };
    Ok((after - before).max(0.0))
}
