//! Per-site operating points: the threshold on a binary head's raw probability that suits one
//! hospital's images, fitted on that hospital's own labelled images. It is stored as the
//! head's `operating_point` in the site's copy of the card, so extraction rescales the head's
//! output (see `Head::calibrate`) and 0.5 then means "positive at this site". The labelled
//! images never leave the site: this runs where they are.
//!
//! Targets: Youden's J (sensitivity + specificity − 1, maximal), a chosen sensitivity (the
//! highest threshold that reaches it), or the site's prevalence (the threshold whose predicted
//! positive rate equals the labelled positive rate — what a prevalence estimate needs). Every
//! fit reports sensitivity and specificity at the threshold with Wilson 95% intervals.

use serde::Serialize;

use crate::labelmap::{HeadKind, LabelMap};
use crate::predict::{HeadOutput, activate};
use crate::train::{Dataset, Target as Label};
use crate::{Model, ModelError};

/// What an operating point is chosen for.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "target", content = "value")]
pub enum Target {
    Youden,
    Sensitivity(f64),
    Prevalence,
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text.split_once('=') {
            None if text == "youden" => Ok(Target::Youden),
            None if text == "prevalence" => Ok(Target::Prevalence),
            Some(("sensitivity", v)) => match v.parse::<f64>() {
                Ok(s) if s > 0.0 && s < 1.0 => Ok(Target::Sensitivity(s)),
                _ => Err(format!("sensitivity must be in (0, 1), not {v:?}")),
            },
            _ => Err(format!(
                "unknown target {text:?} (youden, prevalence or sensitivity=S)"
            )),
        }
    }
}

/// A rate with its Wilson 95% interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Rate {
    pub value: f64,
    pub low: f64,
    pub high: f64,
}

impl Rate {
    /// `k` of `n`, with the Wilson score interval (z = 1.96).
    pub fn wilson(k: usize, n: usize) -> Rate {
        if n == 0 {
            return Rate {
                value: f64::NAN,
                low: 0.0,
                high: 1.0,
            };
        }
        let (k, n, z) = (k as f64, n as f64, 1.959_963_985);
        let p = k / n;
        let centre = (p + z * z / (2.0 * n)) / (1.0 + z * z / n);
        let half = z / (1.0 + z * z / n) * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt();
        Rate {
            value: p,
            low: (centre - half).max(0.0),
            high: (centre + half).min(1.0),
        }
    }
}

/// How one binary head does at one threshold on labelled images.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AtThreshold {
    pub threshold: f64,
    pub sensitivity: Rate,
    pub specificity: Rate,
    pub predicted_positive_rate: f64,
}

/// One head's calibration at a site.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldCalibration {
    pub field: String,
    pub images: usize,
    pub positives: usize,
    pub prevalence: f64,
    /// At the card's current operating point (0.5 on the raw output when it has none).
    pub current: AtThreshold,
    /// At the fitted operating point (None when the labels hold one class only).
    pub fitted: Option<AtThreshold>,
}

/// Sensitivity, specificity and positive rate of "positive when p >= t".
pub fn at_threshold(scores: &[(f32, bool)], threshold: f64) -> AtThreshold {
    let (mut tp, mut fp, mut pos) = (0, 0, 0);
    for &(p, label) in scores {
        let called = f64::from(p) >= threshold;
        pos += usize::from(label);
        tp += usize::from(called && label);
        fp += usize::from(called && !label);
    }
    let neg = scores.len() - pos;
    AtThreshold {
        threshold,
        sensitivity: Rate::wilson(tp, pos),
        specificity: Rate::wilson(neg - fp, neg),
        predicted_positive_rate: (tp + fp) as f64 / scores.len().max(1) as f64,
    }
}

/// The operating point for `target` on `(raw probability, label)` pairs: a threshold halfway
/// between the score that is called positive last and the next one below it, in (0, 1). None
/// without both classes.
pub fn fit(scores: &[(f32, bool)], target: Target) -> Option<f64> {
    let pos = scores.iter().filter(|s| s.1).count();
    let neg = scores.len() - pos;
    if pos == 0 || neg == 0 {
        return None;
    }
    let mut sorted: Vec<(f32, bool)> = scores.to_vec();
    sorted.sort_by(|a, b| b.0.total_cmp(&a.0));
    // Candidate cut k: the first k scores (k = 1..n-1, at a change of score) are positive.
    let (mut tp, mut fp) = (0usize, 0usize);
    let mut best: Option<(f64, usize)> = None;
    for k in 1..sorted.len() {
        tp += usize::from(sorted[k - 1].1);
        fp += usize::from(!sorted[k - 1].1);
        if sorted[k].0 == sorted[k - 1].0 {
            continue;
        }
        let (sens, spec) = (tp as f64 / pos as f64, 1.0 - fp as f64 / neg as f64);
        let score = match target {
            Target::Youden => sens + spec - 1.0,
            // The highest threshold that reaches the sensitivity: the smallest k.
            Target::Sensitivity(s) if sens >= s => -(k as f64),
            Target::Sensitivity(_) => f64::NEG_INFINITY,
            Target::Prevalence => -((k as f64) - pos as f64).abs(),
        };
        if best.is_none_or(|(b, _)| score > b) {
            best = Some((score, k));
        }
    }
    let (score, k) = best?;
    if score == f64::NEG_INFINITY {
        return None;
    }
    let t = (f64::from(sorted[k - 1].0) + f64::from(sorted[k].0)) / 2.0;
    Some(t.clamp(1e-6, 1.0 - 1e-6))
}

/// A head's name and its `(raw probability, label)` pairs.
type Scores = Vec<(String, Vec<(f32, bool)>)>;

/// Raw (uncalibrated) probabilities of every labelled binary head in `fields` (all binary
/// heads when empty), as `(field, [(p, label)])`.
fn scores(model: &Model, data: &Dataset, fields: &[String]) -> Result<Scores, ModelError> {
    let mut raw = model.card.label_map.clone();
    for head in &mut raw.heads {
        head.operating_point = None;
    }
    let wanted: Vec<usize> = raw
        .heads
        .iter()
        .enumerate()
        .filter(|(_, h)| h.kind == HeadKind::Binary && !h.untrained)
        .filter(|(_, h)| fields.is_empty() || fields.contains(&h.name))
        .map(|(i, _)| i)
        .collect();
    if let Some(missing) = fields
        .iter()
        .find(|f| !wanted.iter().any(|&i| &raw.heads[i].name == *f))
    {
        return Err(ModelError::Data(format!(
            "{missing:?} is not a trained binary head of this model"
        )));
    }
    let mut out: Scores = wanted
        .iter()
        .map(|&i| (raw.heads[i].name.clone(), Vec::new()))
        .collect();
    let ids: Vec<usize> = (0..data.len()).collect();
    for chunk in ids.chunks(32) {
        let xs = data.batch_tensor(chunk, model.device);
        let predictions = activate(&raw, &model.try_forward(&xs)?);
        for (prediction, &sample) in predictions.iter().zip(chunk) {
            for (slot, &head) in out.iter_mut().zip(&wanted) {
                if let (Some(HeadOutput::Binary(p)), Some(Some(Label::Binary(label)))) = (
                    prediction.outputs.get(head),
                    data.samples[sample].targets.get(head),
                ) {
                    slot.1.push((*p, *label));
                }
            }
        }
    }
    Ok(out)
}

/// Fits an operating point for each binary head in `fields` (every trained binary head when
/// empty) on the site's labelled `data`, and reports each at the card's current point and at
/// the fitted one.
pub fn calibrate(
    model: &Model,
    data: &Dataset,
    fields: &[String],
    target: Target,
) -> Result<Vec<FieldCalibration>, ModelError> {
    let map: &LabelMap = &model.card.label_map;
    Ok(scores(model, data, fields)?
        .into_iter()
        .filter(|(_, s)| !s.is_empty())
        .map(|(field, s)| {
            let current = map
                .head(&field)
                .and_then(|(_, h)| h.operating_point)
                .map_or(0.5, f64::from);
            let positives = s.iter().filter(|x| x.1).count();
            FieldCalibration {
                images: s.len(),
                positives,
                prevalence: positives as f64 / s.len() as f64,
                current: at_threshold(&s, current),
                fitted: fit(&s, target).map(|t| at_threshold(&s, t)),
                field,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_follow_the_target() {
        // Positives score 0.6..0.9, negatives 0.1..0.7: overlapping.
        let mut s: Vec<(f32, bool)> = (0..4).map(|i| (0.6 + 0.1 * i as f32, true)).collect();
        s.extend((0..7).map(|i| (0.1 + 0.1 * i as f32, false)));
        let youden = fit(&s, Target::Youden).expect("fit");
        let at = at_threshold(&s, youden);
        // The best J is 5/7: everything from 0.55 up called positive.
        let j = at.sensitivity.value + at.specificity.value - 1.0;
        assert!((j - 5.0 / 7.0).abs() < 1e-9, "{at:?}");
        let sens = fit(&s, Target::Sensitivity(0.99)).expect("fit");
        assert_eq!(at_threshold(&s, sens).sensitivity.value, 1.0);
        let prev = fit(&s, Target::Prevalence).expect("fit");
        assert!((at_threshold(&s, prev).predicted_positive_rate - 4.0 / 11.0).abs() < 1e-9);
        assert_eq!(
            fit(&[(0.3, true), (0.4, true)], Target::Youden),
            None,
            "one class"
        );
        assert!("sensitivity=1.5".parse::<Target>().is_err());
        assert_eq!(
            "sensitivity=0.9".parse::<Target>(),
            Ok(Target::Sensitivity(0.9))
        );
    }

    #[test]
    fn wilson_intervals_cover_the_rate() {
        let r = Rate::wilson(8, 10);
        assert!(
            r.low < 0.8 && 0.8 < r.high && r.low > 0.4 && r.high < 0.97,
            "{r:?}"
        );
        let r = Rate::wilson(0, 20);
        assert_eq!(r.low, 0.0);
        assert!(r.high > 0.1 && r.high < 0.2, "{r:?}");
    }
}
