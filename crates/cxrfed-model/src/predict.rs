//! From logits to head outputs, and from head outputs to schema-v1 findings with the derived
//! fields.
//!
//! Derived fields (documented rules, not model heads):
//!
//! * `analysis_confidence` is a property of the model's reading, not of the image: the
//!   *margin* `m` is the mean, over the categorical and binary heads other than
//!   `image_quality` (and untrained ones), of how far the chosen value's probability is above
//!   chance, `(p - 1/k) / (1 - 1/k)` for `k` values (0 at chance, 1 when certain). Then
//!   `insufficient` below 0.25, `low` below 0.5, `medium` below 0.75, otherwise `high`; its
//!   probability is `m`. (The first generation read it off `image_quality`, which made the
//!   quality-by-confidence crosstab diagonal by construction.)
//! * `cardiac_contour` agrees with the ratio: unless the head reads `indistinct`, the value is
//!   `enlarged` when the predicted ratio is >= 0.5 and `normal` below, with the head's
//!   probability for that value.
//! * `cardiothoracic_ratio` confidence: the cardiac head's probability mass on the side of 0.5
//!   the ratio falls (`enlarged` above, `normal` + `indistinct` below).
//! * `opacity_distribution` lists the zones with probability >= 0.5, and is empty when the
//!   severity read is `none`.
//! * A binary head's probability is after its operating point, if it has one; the label
//!   map's finding rules then fill the findings no head of their own name gave (an imported
//!   TorchXRayVision model's pathologies read as schema-v1 findings).

use cxrfed_schema::{
    AnalysisConfidence, CardiacContour, Category, Diaphragm, Findings, ImageQuality, LungZone,
    Lungs, Measured, Mediastinum, Scored, Thorax, ZoneSet,
};
use serde::Serialize;
use tch::Tensor;

use crate::labelmap::{HeadKind, LabelMap};

/// One head's activated output.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum HeadOutput {
    /// Softmax probabilities in category order.
    Categorical(Vec<f32>),
    /// Sigmoid probability of `true`.
    Binary(f32),
    /// Sigmoid probability per label.
    MultiLabel(Vec<f32>),
    /// The value in the head's bounds.
    Regression(f64),
}

/// All head outputs of one image, in label-map order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    pub outputs: Vec<HeadOutput>,
}

/// Activates a `[N, width]` logits tensor into one [`Prediction`] per row.
pub fn activate(label_map: &LabelMap, logits: &Tensor) -> Vec<Prediction> {
    let logits = logits.to_kind(tch::Kind::Float).to_device(tch::Device::Cpu);
    let rows = logits.size()[0] as usize;
    let mut columns: Vec<Vec<Vec<f32>>> = Vec::with_capacity(label_map.heads.len());
    for (head, (offset, width)) in label_map.heads.iter().zip(label_map.spans()) {
        let slice = logits.narrow(1, offset as i64, width as i64);
        let activated = match head.kind {
            HeadKind::Categorical { .. } => slice.softmax(1, tch::Kind::Float),
            _ => slice.sigmoid(),
        };
        let flat: Vec<f32> =
            Vec::<f32>::try_from(activated.contiguous().view([-1])).unwrap_or_default();
        columns.push(flat.chunks(width).map(<[f32]>::to_vec).collect());
    }
    (0..rows)
        .map(|row| Prediction {
            outputs: label_map
                .heads
                .iter()
                .zip(&columns)
                .map(|(head, column)| {
                    let values = column.get(row).cloned().unwrap_or_default();
                    match &head.kind {
                        HeadKind::Categorical { .. } => HeadOutput::Categorical(values),
                        HeadKind::Binary => HeadOutput::Binary(
                            head.calibrate(values.first().copied().unwrap_or(0.0)),
                        ),
                        HeadKind::MultiLabel { .. } => HeadOutput::MultiLabel(values),
                        HeadKind::Regression { min, max } => {
                            let s = f64::from(values.first().copied().unwrap_or(0.5));
                            HeadOutput::Regression(min + (max - min) * s)
                        }
                    }
                })
                .collect(),
        })
        .collect()
}

fn argmax(p: &[f32]) -> (usize, f32) {
    p.iter().copied().enumerate().fold(
        (0, f32::MIN),
        |best, (i, v)| if v > best.1 { (i, v) } else { best },
    )
}

impl Prediction {
    fn output<'a>(
        &'a self,
        label_map: &'a LabelMap,
        name: &str,
    ) -> Option<(&'a HeadOutput, &'a HeadKind)> {
        let (index, head) = label_map.head(name)?;
        Some((self.outputs.get(index)?, &head.kind))
    }

    /// The chosen category and its probability for a categorical head.
    pub fn category(&self, label_map: &LabelMap, name: &str) -> Option<(String, f32)> {
        match self.output(label_map, name)? {
            (HeadOutput::Categorical(p), HeadKind::Categorical { categories }) => {
                let (i, prob) = argmax(p);
                Some((categories.get(i)?.clone(), prob))
            }
            _ => None,
        }
    }

    fn scored<T: Category>(&self, label_map: &LabelMap, name: &str) -> Option<Scored<T>> {
        let (text, probability) = self.category(label_map, name)?;
        Some(Scored {
            value: T::parse(&text)?,
            probability,
        })
    }

    fn boolean(&self, label_map: &LabelMap, name: &str) -> Option<Scored<bool>> {
        match self.output(label_map, name)? {
            (HeadOutput::Binary(p), _) => Some(Scored {
                value: *p >= 0.5,
                probability: if *p >= 0.5 { *p } else { 1.0 - *p },
            }),
            _ => None,
        }
    }

    fn probabilities(&self, label_map: &LabelMap, name: &str) -> Option<Vec<(String, f32)>> {
        match self.output(label_map, name)? {
            (HeadOutput::Categorical(p), HeadKind::Categorical { categories }) => {
                Some(categories.iter().cloned().zip(p.iter().copied()).collect())
            }
            _ => None,
        }
    }

    /// Mean probability of the chosen value over categorical and binary heads.
    pub fn certainty(&self) -> f32 {
        let chosen: Vec<f32> = self
            .outputs
            .iter()
            .filter_map(|o| match o {
                HeadOutput::Categorical(p) => Some(argmax(p).1),
                HeadOutput::Binary(p) => Some(p.max(1.0 - p)),
                _ => None,
            })
            .collect();
        if chosen.is_empty() {
            0.0
        } else {
            chosen.iter().sum::<f32>() / chosen.len() as f32
        }
    }

    /// The reading's margin above chance (see the module docs): the mean over categorical and
    /// binary heads except `image_quality` and untrained ones of `(p - 1/k) / (1 - 1/k)`.
    pub fn margin(&self, label_map: &LabelMap) -> f32 {
        let margins: Vec<f32> = label_map
            .heads
            .iter()
            .zip(&self.outputs)
            .filter(|(head, _)| head.name != "image_quality" && !head.untrained)
            .filter_map(|(_, output)| {
                let (p, k) = match output {
                    HeadOutput::Categorical(p) => (argmax(p).1, p.len()),
                    HeadOutput::Binary(p) => (p.max(1.0 - p), 2),
                    _ => return None,
                };
                let chance = 1.0 / k.max(2) as f32;
                Some(((p - chance) / (1.0 - chance)).clamp(0.0, 1.0))
            })
            .collect();
        if margins.is_empty() {
            0.0
        } else {
            margins.iter().sum::<f32>() / margins.len() as f32
        }
    }

    /// Schema-v1 findings, with the derived fields. Heads the label map lacks stay `None`.
    /// The values of the heads that are not schema-v1 findings (heads trained for custom
    /// fields), as text: the category, "true"/"false", the number, or the labels above 0.5.
    pub fn custom_values(
        &self,
        label_map: &LabelMap,
    ) -> std::collections::BTreeMap<String, String> {
        let schema = LabelMap::schema_v1();
        label_map
            .heads
            .iter()
            .zip(&self.outputs)
            .filter(|(head, _)| schema.head(&head.name).is_none())
            .map(|(head, output)| {
                let value = match (&head.kind, output) {
                    (HeadKind::Categorical { categories }, HeadOutput::Categorical(p)) => p
                        .iter()
                        .enumerate()
                        .max_by(|a, b| a.1.total_cmp(b.1))
                        .and_then(|(i, _)| categories.get(i).cloned())
                        .unwrap_or_default(),
                    (_, HeadOutput::Binary(p)) if head.probability => format!("{p:.6}"),
                    (_, HeadOutput::Binary(p)) => (*p > 0.5).to_string(),
                    (_, HeadOutput::Regression(v)) => format!("{v:.4}"),
                    (HeadKind::MultiLabel { labels }, HeadOutput::MultiLabel(p)) => labels
                        .iter()
                        .zip(p)
                        .filter(|(_, p)| **p > 0.5)
                        .map(|(l, _)| l.as_str())
                        .collect::<Vec<_>>()
                        .join(","),
                    _ => String::new(),
                };
                (head.name.clone(), value)
            })
            .collect()
    }

    pub fn findings(&self, label_map: &LabelMap) -> Findings {
        let image_quality: Option<Scored<ImageQuality>> = self.scored(label_map, "image_quality");
        let certainty = self.certainty();
        let margin = self.margin(label_map);
        let confidence = match margin {
            m if m < 0.25 => AnalysisConfidence::Insufficient,
            m if m < 0.5 => AnalysisConfidence::Low,
            m if m < 0.75 => AnalysisConfidence::Medium,
            _ => AnalysisConfidence::High,
        };

        let ratio = match self.output(label_map, "cardiothoracic_ratio") {
            Some((HeadOutput::Regression(v), _)) => Some(*v),
            _ => None,
        };
        let cardiac = self.probabilities(label_map, "cardiac_contour");
        let prob_of = |name: &str| {
            cardiac
                .as_ref()
                .and_then(|c| c.iter().find(|(n, _)| n == name).map(|(_, p)| *p))
                .unwrap_or(0.0)
        };
        let head_contour: Option<Scored<CardiacContour>> =
            self.scored(label_map, "cardiac_contour");
        let cardiac_contour = match (head_contour, ratio) {
            (Some(s), _) if s.value == CardiacContour::Indistinct => Some(s),
            (Some(_), Some(r)) => {
                let value = if r >= 0.5 {
                    CardiacContour::Enlarged
                } else {
                    CardiacContour::Normal
                };
                Some(Scored {
                    value,
                    probability: prob_of(value.as_str()),
                })
            }
            (other, _) => other,
        };
        let cardiothoracic_ratio = ratio.map(|value| Measured {
            value,
            confidence: if cardiac.is_none() {
                certainty
            } else if value >= 0.5 {
                prob_of("enlarged")
            } else {
                prob_of("normal") + prob_of("indistinct")
            },
        });

        let severity = self.scored(label_map, "opacity_severity");
        let opacity_distribution = match self.output(label_map, "opacity_distribution") {
            Some((HeadOutput::MultiLabel(p), HeadKind::MultiLabel { labels })) => {
                let none = matches!(severity, Some(s) if s.value == cxrfed_schema::Severity::None);
                Some(ZoneSet {
                    zones: labels
                        .iter()
                        .zip(p)
                        .filter(|(_, p)| !none && **p >= 0.5)
                        .filter_map(|(label, p)| {
                            Some(Scored {
                                value: LungZone::parse(label)?,
                                probability: *p,
                            })
                        })
                        .collect(),
                })
            }
            _ => None,
        };

        let mut findings = Findings {
            image_quality,
            analysis_confidence: Some(Scored {
                value: confidence,
                probability: margin,
            }),
            thorax: Thorax {
                rib_fracture: self.boolean(label_map, "rib_fracture"),
                clavicle_symmetry: self.scored(label_map, "clavicle_symmetry"),
                spine_alignment: self.scored(label_map, "spine_alignment"),
            },
            lungs: Lungs {
                opacity_distribution,
                opacity_severity: severity,
                vascular_pattern: self.scored(label_map, "vascular_pattern"),
                interstitial_markings: self.scored(label_map, "interstitial_markings"),
                hyperlucency: self.boolean(label_map, "hyperlucency"),
            },
            mediastinum: Mediastinum {
                cardiac_contour,
                cardiothoracic_ratio,
                aortic_knob: self.scored(label_map, "aortic_knob"),
                hilar_size: self.scored(label_map, "hilar_size"),
            },
            diaphragm: Diaphragm {
                position: self.scored(label_map, "diaphragm_position"),
                contour: self.scored(label_map, "diaphragm_contour"),
                costophrenic_angle: self.scored(label_map, "costophrenic_angle"),
            },
        };
        self.apply_rules(label_map, &mut findings);
        findings
    }

    /// The label map's finding rules, for findings no head of their own name filled.
    fn apply_rules(&self, label_map: &LabelMap, findings: &mut Findings) {
        fn set<T: Category>(slot: &mut Option<Scored<T>>, value: &str, probability: f32) {
            if slot.is_none() {
                *slot = T::parse(value).map(|value| Scored { value, probability });
            }
        }
        for rule in &label_map.findings {
            let evidence = rule
                .from
                .iter()
                .filter_map(|name| match self.output(label_map, name) {
                    Some((HeadOutput::Binary(p), _))
                        if !label_map.head(name).is_some_and(|(_, h)| h.untrained) =>
                    {
                        Some(*p)
                    }
                    _ => None,
                })
                .reduce(f32::max);
            let Some(evidence) = evidence else { continue };
            let (value, p) = rule.read(evidence);
            let f = &mut *findings;
            match rule.finding.as_str() {
                "image_quality" => set(&mut f.image_quality, value, p),
                "rib_fracture" if f.thorax.rib_fracture.is_none() => {
                    f.thorax.rib_fracture = Some(Scored {
                        value: value == "true",
                        probability: p,
                    })
                }
                "hyperlucency" if f.lungs.hyperlucency.is_none() => {
                    f.lungs.hyperlucency = Some(Scored {
                        value: value == "true",
                        probability: p,
                    })
                }
                "clavicle_symmetry" => set(&mut f.thorax.clavicle_symmetry, value, p),
                "spine_alignment" => set(&mut f.thorax.spine_alignment, value, p),
                "opacity_severity" => set(&mut f.lungs.opacity_severity, value, p),
                "vascular_pattern" => set(&mut f.lungs.vascular_pattern, value, p),
                "interstitial_markings" => set(&mut f.lungs.interstitial_markings, value, p),
                "cardiac_contour" => set(&mut f.mediastinum.cardiac_contour, value, p),
                "aortic_knob" => set(&mut f.mediastinum.aortic_knob, value, p),
                "hilar_size" => set(&mut f.mediastinum.hilar_size, value, p),
                "diaphragm_position" => set(&mut f.diaphragm.position, value, p),
                "diaphragm_contour" => set(&mut f.diaphragm.contour, value, p),
                "costophrenic_angle" => set(&mut f.diaphragm.costophrenic_angle, value, p),
                // Validated at load: no other finding has a rule.
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A prediction with every schema-v1 head at `p` on its first value (the rest spread
    /// evenly), and image quality read as `quality`.
    fn prediction(map: &LabelMap, p: f32, quality: usize) -> Prediction {
        let outputs = map
            .heads
            .iter()
            .map(|head| match &head.kind {
                HeadKind::Categorical { categories } if head.name == "image_quality" => {
                    let mut v = vec![0.0; categories.len()];
                    v[quality] = 1.0;
                    HeadOutput::Categorical(v)
                }
                HeadKind::Categorical { categories } => {
                    let rest = (1.0 - p) / (categories.len() - 1) as f32;
                    let mut v = vec![rest; categories.len()];
                    v[0] = p;
                    HeadOutput::Categorical(v)
                }
                HeadKind::Binary => HeadOutput::Binary(p),
                HeadKind::MultiLabel { labels } => HeadOutput::MultiLabel(vec![0.0; labels.len()]),
                HeadKind::Regression { .. } => HeadOutput::Regression(0.45),
            })
            .collect();
        Prediction { outputs }
    }

    #[test]
    fn analysis_confidence_follows_the_reading_not_the_image_quality() {
        let map = LabelMap::schema_v1();
        let confidence = |p, quality| {
            prediction(&map, p, quality)
                .findings(&map)
                .analysis_confidence
                .expect("derived")
        };
        // A poor image read with certainty is still a confident reading, and an excellent
        // image read at chance is not.
        assert_eq!(confidence(0.99, 3).value, AnalysisConfidence::High);
        assert_eq!(confidence(0.5, 0).value, AnalysisConfidence::Insufficient);
        let medium = confidence(0.83, 1);
        assert_eq!(medium.value, AnalysisConfidence::Medium, "{medium:?}");
        assert!(medium.probability > 0.5 && medium.probability < 0.75);
    }
}
