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
}

impl Head {
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
        }
        Ok(())
    }

    /// The heads of schema v1 (every finding except the derived `analysis_confidence`).
    pub fn schema_v1() -> LabelMap {
        fn cat<T: Category>(name: &str, all: &[T]) -> Head {
            Head {
                name: name.into(),
                kind: HeadKind::Categorical {
                    categories: all.iter().map(|c| c.as_str().to_string()).collect(),
                },
            }
        }
        let binary = |name: &str| Head {
            name: name.into(),
            kind: HeadKind::Binary,
        };
        let (min, max) = cxrfed_schema::CARDIOTHORACIC_RATIO_BOUNDS;
        LabelMap {
            heads: vec![
                cat("image_quality", ImageQuality::ALL),
                binary("rib_fracture"),
                cat("clavicle_symmetry", ClavicleSymmetry::ALL),
                cat("spine_alignment", SpineAlignment::ALL),
                Head {
                    name: "opacity_distribution".into(),
                    kind: HeadKind::MultiLabel {
                        labels: LungZone::ALL
                            .iter()
                            .map(|z| z.as_str().to_string())
                            .collect(),
                    },
                },
                cat("opacity_severity", Severity::ALL),
                cat("vascular_pattern", VascularPattern::ALL),
                cat("interstitial_markings", InterstitialMarkings::ALL),
                binary("hyperlucency"),
                cat("cardiac_contour", CardiacContour::ALL),
                Head {
                    name: "cardiothoracic_ratio".into(),
                    kind: HeadKind::Regression { min, max },
                },
                cat("aortic_knob", AorticKnob::ALL),
                cat("hilar_size", HilarSize::ALL),
                cat("diaphragm_position", DiaphragmPosition::ALL),
                cat("diaphragm_contour", DiaphragmContour::ALL),
                cat("costophrenic_angle", CostophrenicAngle::ALL),
            ],
        }
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
    fn duplicate_heads_are_refused() {
        let mut map = LabelMap::schema_v1();
        map.heads.push(map.heads[0].clone());
        assert!(map.validate().expect_err("dup").contains("twice"));
    }
}
