//! The label map: which heads a model has, in which order its output columns come, and what
//! each column means. It is data, so researcher-defined fields can add heads without code.

use cxrfed_schema::{
    AorticKnob, CardiacContour, Category, ClavicleSymmetry, CostophrenicAngle, DiaphragmContour,
    DiaphragmPosition, HilarSize, ImageQuality, InterstitialMarkings, LungZone, Severity,
    SpineAlignment, VascularPattern,
};
use serde::{Deserialize, Serialize};

/// What a head predicts and how its logits are read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum HeadKind {
    /// Softmax over the categories.
    Categorical { categories: Vec<String> },
    /// One sigmoid.
    Binary,
    /// One sigmoid per label (a set of labels, e.g. lung zones).
    MultiLabel { labels: Vec<String> },
    /// A sigmoid scaled to `[min, max]`.
    Regression { min: f64, max: f64 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Head {
    /// The field name (a schema-v1 field or a custom field).
    pub name: String,
    #[serde(flatten)]
    pub kind: HeadKind,
    /// A binary head's operating point: the sigmoid output at which the finding is called.
    /// Outputs are rescaled piecewise-linearly so that it reads 0.5 (TorchXRayVision's
    /// `op_norm`: `p / 2t` below `t`, `1 - (1 - p) / (2 (1 - t))` above).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operating_point: Option<f32>,
    /// The publisher gave this output no operating point because the model was never trained
    /// on it (TXRV's NaN thresholds): it reads 0.5, as in TXRV, and no finding is read from it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub untrained: bool,
    /// The record's `model_fields` keep this binary head's probability (as text, six
    /// decimals) instead of `true`/`false` — an imported model's pathologies.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub probability: bool,
}

impl Head {
    pub fn new(name: &str, kind: HeadKind) -> Head {
        Head {
            name: name.into(),
            kind,
            operating_point: None,
            untrained: false,
            probability: false,
        }
    }

    /// A binary head's output after its operating point (see [`Head::operating_point`]).
    pub fn calibrate(&self, p: f32) -> f32 {
        if self.untrained {
            return 0.5;
        }
        match self.operating_point {
            Some(t) if t > 0.0 && t < 1.0 => {
                if p < t {
                    p / (2.0 * t)
                } else {
                    1.0 - (1.0 - p) / (2.0 * (1.0 - t))
                }
            }
            _ => p,
        }
    }

    /// Number of output columns.
    pub fn width(&self) -> usize {
        match &self.kind {
            HeadKind::Categorical { categories } => categories.len(),
            HeadKind::Binary | HeadKind::Regression { .. } => 1,
            HeadKind::MultiLabel { labels } => labels.len(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LabelMap {
    pub heads: Vec<Head>,
    /// Schema-v1 findings read from heads that are not schema fields (an imported model's
    /// pathologies); a rule fills its finding only where the map has no head of that name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub findings: Vec<FindingRule>,
}

/// One schema-v1 finding read from binary heads: the evidence is the largest (calibrated)
/// probability of `from` (untrained heads left out); the finding takes the value of the
/// highest cut the evidence reaches, with the evidence as its probability, else `otherwise`
/// with one minus the evidence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FindingRule {
    /// A categorical or binary schema-v1 finding (`cardiac_contour`, `rib_fracture`, …).
    pub finding: String,
    pub from: Vec<String>,
    /// Ascending; values are the finding's categories (`true` for a binary finding).
    pub cuts: Vec<Cut>,
    pub otherwise: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cut {
    pub at: f32,
    pub value: String,
}

impl FindingRule {
    pub fn new(finding: &str, from: &[&str], cuts: &[(f32, &str)], otherwise: &str) -> Self {
        FindingRule {
            finding: finding.into(),
            from: from.iter().map(|s| s.to_string()).collect(),
            cuts: cuts
                .iter()
                .map(|(at, value)| Cut {
                    at: *at,
                    value: value.to_string(),
                })
                .collect(),
            otherwise: otherwise.into(),
        }
    }

    /// The value and its probability for this evidence.
    pub fn read(&self, evidence: f32) -> (&str, f32) {
        match self.cuts.iter().rev().find(|c| evidence >= c.at) {
            Some(cut) => (&cut.value, evidence),
            None => (&self.otherwise, 1.0 - evidence),
        }
    }
}

impl LabelMap {
    /// Total output width: the sum of the head widths.
    pub fn width(&self) -> usize {
        self.heads.iter().map(Head::width).sum()
    }

    /// `(offset, width)` of every head's columns.
    pub fn spans(&self) -> Vec<(usize, usize)> {
        let mut offset = 0;
        self.heads
            .iter()
            .map(|head| {
                let span = (offset, head.width());
                offset += span.1;
                span
            })
            .collect()
    }

    pub fn head(&self, name: &str) -> Option<(usize, &Head)> {
        self.heads.iter().enumerate().find(|(_, h)| h.name == name)
    }

    /// Checks names are unique and every head has at least one column (two categories).
    pub fn validate(&self) -> Result<(), String> {
        if self.heads.is_empty() {
            return Err("label map has no heads".into());
        }
        for (i, head) in self.heads.iter().enumerate() {
            if head.name.trim().is_empty() {
                return Err(format!("head {i} has no name"));
            }
            if self.heads[..i].iter().any(|h| h.name == head.name) {
                return Err(format!("head {:?} appears twice", head.name));
            }
            match &head.kind {
                HeadKind::Categorical { categories } if categories.len() < 2 => {
                    return Err(format!(
                        "head {:?} needs at least two categories",
                        head.name
                    ));
                }
                HeadKind::MultiLabel { labels } if labels.is_empty() => {
                    return Err(format!("head {:?} has no labels", head.name));
                }
                HeadKind::Regression { min, max }
                    if min.partial_cmp(max) != Some(std::cmp::Ordering::Less) =>
                {
                    return Err(format!("head {:?} has bounds [{min}, {max}]", head.name));
                }
                _ => {}
            }
            if let Some(t) = head.operating_point
                && !(t > 0.0 && t < 1.0 && matches!(head.kind, HeadKind::Binary))
            {
                return Err(format!(
                    "head {:?}: an operating point must be in (0, 1) on a binary head, not {t}",
                    head.name
                ));
            }
        }
        let schema = LabelMap::schema_v1();
        for rule in &self.findings {
            let what = format!("finding rule for {:?}", rule.finding);
            let values: Vec<String> = match schema.head(&rule.finding).map(|(_, h)| &h.kind) {
                Some(HeadKind::Categorical { categories }) => categories.clone(),
                Some(HeadKind::Binary) => vec!["true".into(), "false".into()],
                _ => {
                    return Err(format!(
                        "{what}: not a categorical or binary schema-v1 finding"
                    ));
                }
            };
            if rule.from.is_empty() || rule.cuts.is_empty() {
                return Err(format!("{what}: needs heads to read and at least one cut"));
            }
            for name in &rule.from {
                if !matches!(self.head(name), Some((_, h)) if h.kind == HeadKind::Binary) {
                    return Err(format!("{what}: {name:?} is not a binary head of this map"));
                }
            }
            for value in rule.cuts.iter().map(|c| &c.value).chain([&rule.otherwise]) {
                if !values.contains(value) {
                    return Err(format!(
                        "{what}: {value:?} is not one of {}",
                        values.join(", ")
                    ));
                }
            }
            if !rule.cuts.windows(2).all(|w| w[0].at < w[1].at)
                || rule.cuts.iter().any(|c| !(c.at > 0.0 && c.at <= 1.0))
            {
                return Err(format!("{what}: cuts must ascend within (0, 1]"));
            }
        }
        Ok(())
    }

    /// The heads of schema v1 (every finding except the derived `analysis_confidence`).
    pub fn schema_v1() -> LabelMap {
        fn cat<T: Category>(name: &str, all: &[T]) -> Head {
            Head::new(
                name,
                HeadKind::Categorical {
                    categories: all.iter().map(|c| c.as_str().to_string()).collect(),
                },
            )
        }
        let binary = |name: &str| Head::new(name, HeadKind::Binary);
        let (min, max) = cxrfed_schema::CARDIOTHORACIC_RATIO_BOUNDS;
        LabelMap {
            heads: vec![
                cat("image_quality", ImageQuality::ALL),
                binary("rib_fracture"),
                cat("clavicle_symmetry", ClavicleSymmetry::ALL),
                cat("spine_alignment", SpineAlignment::ALL),
                Head::new(
                    "opacity_distribution",
                    HeadKind::MultiLabel {
                        labels: LungZone::ALL
                            .iter()
                            .map(|z| z.as_str().to_string())
                            .collect(),
                    },
                ),
                cat("opacity_severity", Severity::ALL),
                cat("vascular_pattern", VascularPattern::ALL),
                cat("interstitial_markings", InterstitialMarkings::ALL),
                binary("hyperlucency"),
                cat("cardiac_contour", CardiacContour::ALL),
                Head::new("cardiothoracic_ratio", HeadKind::Regression { min, max }),
                cat("aortic_knob", AorticKnob::ALL),
                cat("hilar_size", HilarSize::ALL),
                cat("diaphragm_position", DiaphragmPosition::ALL),
                cat("diaphragm_contour", DiaphragmContour::ALL),
                cat("costophrenic_angle", CostophrenicAngle::ALL),
            ],
            findings: Vec::new(),
        }
    }
}

/// The model field of a TorchXRayVision pathology: `Lung Opacity` → `txrv_lung_opacity`,
/// `Pleural_Thickening` → `txrv_pleural_thickening`.
pub fn txrv_field(pathology: &str) -> String {
    let mut out = String::from("txrv_");
    for c in pathology.trim().chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('_') {
            out.push('_');
        }
    }
    out.trim_end_matches('_').to_string()
}

impl LabelMap {
    /// The label map of an imported TorchXRayVision model: one binary head per target in the
    /// checkpoint's output order (`threshold` is the published operating point; `Some(None)`
    /// marks an output TXRV gives NaN, i.e. untrained), probabilities kept in
    /// `model_fields`, and the default reading of the pathologies as schema-v1 findings
    /// ([`LabelMap::txrv_findings`]) for the targets present.
    pub fn torchxrayvision(targets: &[String], thresholds: Option<&[Option<f32>]>) -> LabelMap {
        let heads: Vec<Head> = targets
            .iter()
            .enumerate()
            .map(|(i, target)| {
                let mut head = Head::new(&txrv_field(target), HeadKind::Binary);
                head.probability = true;
                if let Some(thresholds) = thresholds {
                    match thresholds.get(i).copied().flatten() {
                        Some(t) => head.operating_point = Some(t),
                        None => head.untrained = true,
                    }
                }
                head
            })
            .collect();
        let mut map = LabelMap {
            heads,
            findings: Vec::new(),
        };
        map.findings = LabelMap::txrv_findings()
            .into_iter()
            .filter_map(|mut rule| {
                rule.from.retain(|name| map.head(name).is_some());
                (!rule.from.is_empty()).then_some(rule)
            })
            .collect();
        map
    }

    /// How TXRV's pathologies read as schema-v1 findings (documented in docs/models.md;
    /// a card may replace them):
    ///
    /// | finding | from | value |
    /// |---|---|---|
    /// | `cardiac_contour` | Cardiomegaly | `enlarged` at ≥ 0.5, else `normal` |
    /// | `costophrenic_angle` | Effusion | `blunted_both` at ≥ 0.5 (TXRV gives no side), else `normal` |
    /// | `rib_fracture` | Fracture | `true` at ≥ 0.5 |
    /// | `hyperlucency` | Emphysema | `true` at ≥ 0.5 |
    /// | `opacity_severity` | max of Lung Opacity, Consolidation, Pneumonia | `mild` ≥ 0.5, `moderate` ≥ 0.75, `severe` ≥ 0.9, else `none` |
    ///
    /// Probabilities are after the operating point, so 0.5 is the publisher's threshold.
    /// The severity cuts grade the model's certainty, not the radiological extent: a
    /// heuristic, stated as such.
    pub fn txrv_findings() -> Vec<FindingRule> {
        vec![
            FindingRule::new(
                "cardiac_contour",
                &["txrv_cardiomegaly"],
                &[(0.5, "enlarged")],
                "normal",
            ),
            FindingRule::new(
                "costophrenic_angle",
                &["txrv_effusion"],
                &[(0.5, "blunted_both")],
                "normal",
            ),
            FindingRule::new(
                "rib_fracture",
                &["txrv_fracture"],
                &[(0.5, "true")],
                "false",
            ),
            FindingRule::new(
                "hyperlucency",
                &["txrv_emphysema"],
                &[(0.5, "true")],
                "false",
            ),
            FindingRule::new(
                "opacity_severity",
                &["txrv_lung_opacity", "txrv_consolidation", "txrv_pneumonia"],
                &[(0.5, "mild"), (0.75, "moderate"), (0.9, "severe")],
                "none",
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_v1_map_is_valid_and_round_trips() {
        let map = LabelMap::schema_v1();
        map.validate().expect("valid");
        assert_eq!(map.width(), 42);
        let json = serde_json::to_string(&map).expect("json");
        let back: LabelMap = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, map);
        assert!(json.contains(r#""kind":"categorical""#), "{json}");
    }

    #[test]
    fn the_txrv_map_reads_findings_from_its_pathologies() {
        let targets: Vec<String> = [
            "Atelectasis",
            "Effusion",
            "Lung Opacity",
            "Pleural_Thickening",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let map =
            LabelMap::torchxrayvision(&targets, Some(&[Some(0.1), None, Some(0.2), Some(0.3)]));
        map.validate().expect("valid");
        assert_eq!(map.heads[3].name, "txrv_pleural_thickening");
        assert!(map.heads[1].untrained);
        assert_eq!(map.heads[0].calibrate(0.1), 0.5);
        assert!((map.heads[0].calibrate(0.05) - 0.25).abs() < 1e-6);
        assert!((map.heads[0].calibrate(0.55) - 0.75).abs() < 1e-6);
        assert_eq!(map.heads[1].calibrate(0.9), 0.5);
        // Only the rules whose heads exist, with the heads that exist.
        let findings: Vec<&str> = map.findings.iter().map(|r| r.finding.as_str()).collect();
        assert_eq!(findings, ["costophrenic_angle", "opacity_severity"]);
        assert_eq!(map.findings[1].from, ["txrv_lung_opacity"]);
        assert_eq!(map.findings[1].read(0.8), ("moderate", 0.8));
        assert_eq!(map.findings[1].read(0.3).0, "none");
        let json = serde_json::to_string(&map).expect("json");
        assert_eq!(serde_json::from_str::<LabelMap>(&json).expect("parse"), map);
    }

    #[test]
    fn bad_finding_rules_are_refused() {
        let targets = vec!["Effusion".to_string()];
        let mut map = LabelMap::torchxrayvision(&targets, None);
        map.findings[0].cuts[0].value = "blunted_sideways".into();
        assert!(
            map.validate()
                .expect_err("value")
                .contains("blunted_sideways")
        );
        let mut map = LabelMap::torchxrayvision(&targets, None);
        map.findings[0].finding = "cardiothoracic_ratio".into();
        assert!(map.validate().is_err());
        let mut map = LabelMap::torchxrayvision(&targets, None);
        map.findings[0].from = vec!["txrv_nothing".into()];
        assert!(map.validate().expect_err("from").contains("txrv_nothing"));
        let mut map = LabelMap::torchxrayvision(&targets, None);
        map.heads[0].operating_point = Some(1.5);
        assert!(map.validate().is_err());
    }

    #[test]
    fn duplicate_heads_are_refused() {
        let mut map = LabelMap::schema_v1();
        map.heads.push(map.heads[0].clone());
        assert!(map.validate().expect_err("dup").contains("twice"));
    }
}
