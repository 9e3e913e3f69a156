//! Ground truth: the value of every schema-v1 finding that a phantom was drawn with.

use cxrfed_schema::{
    AorticKnob, CardiacContour, ClavicleSymmetry, CostophrenicAngle, DiaphragmContour,
    DiaphragmPosition, HilarSize, ImageQuality, InterstitialMarkings, LungZone, Severity,
    SpineAlignment, VascularPattern,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// The exact finding values of one phantom. `analysis_confidence` is not here: it describes the
/// model's reading, not the image, and is derived by the model crate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Truth {
    pub image_quality: ImageQuality,
    pub rib_fracture: bool,
    pub clavicle_symmetry: ClavicleSymmetry,
    pub spine_alignment: SpineAlignment,
    /// Zones with an opacity; empty exactly when `opacity_severity` is none.
    pub opacity_distribution: Vec<LungZone>,
    pub opacity_severity: Severity,
    pub vascular_pattern: VascularPattern,
    pub interstitial_markings: InterstitialMarkings,
    pub hyperlucency: bool,
    pub cardiac_contour: CardiacContour,
    /// Heart width / inner thoracic width, exactly as drawn.
    pub cardiothoracic_ratio: f64,
    pub aortic_knob: AorticKnob,
    pub hilar_size: HilarSize,
    pub diaphragm_position: DiaphragmPosition,
    pub diaphragm_contour: DiaphragmContour,
    pub costophrenic_angle: CostophrenicAngle,
}

/// The label names, in the order of the labels file columns (they are the model's head names).
pub const LABEL_FIELDS: &[&str] = &[
    "image_quality",
    "rib_fracture",
    "clavicle_symmetry",
    "spine_alignment",
    "opacity_distribution",
    "opacity_severity",
    "vascular_pattern",
    "interstitial_markings",
    "hyperlucency",
    "cardiac_contour",
    "cardiothoracic_ratio",
    "aortic_knob",
    "hilar_size",
    "diaphragm_position",
    "diaphragm_contour",
    "costophrenic_angle",
];

impl Truth {
    /// The labels as a JSON object keyed by [`LABEL_FIELDS`]: categories as their schema text,
    /// booleans as booleans, the ratio as a number, zones as a list of zone names.
    pub fn labels(&self) -> Map<String, Value> {
        let zones: Vec<&str> = self
            .opacity_distribution
            .iter()
            .map(|z| z.as_str())
            .collect();
        let value = json!({
            "image_quality": self.image_quality.as_str(),
            "rib_fracture": self.rib_fracture,
            "clavicle_symmetry": self.clavicle_symmetry.as_str(),
            "spine_alignment": self.spine_alignment.as_str(),
            "opacity_distribution": zones,
            "opacity_severity": self.opacity_severity.as_str(),
            "vascular_pattern": self.vascular_pattern.as_str(),
            "interstitial_markings": self.interstitial_markings.as_str(),
            "hyperlucency": self.hyperlucency,
            "cardiac_contour": self.cardiac_contour.as_str(),
            "cardiothoracic_ratio": (self.cardiothoracic_ratio * 10_000.0).round() / 10_000.0,
            "aortic_knob": self.aortic_knob.as_str(),
            "hilar_size": self.hilar_size.as_str(),
            "diaphragm_position": self.diaphragm_position.as_str(),
            "diaphragm_contour": self.diaphragm_contour.as_str(),
            "costophrenic_angle": self.costophrenic_angle.as_str(),
        });
        match value {
            Value::Object(map) => map,
            _ => unreachable!("json! of an object literal is an object"),
        }
    }

    /// One CSV cell per [`LABEL_FIELDS`] entry; zones joined with `|`.
    pub fn csv_cells(&self) -> Vec<String> {
        csv_cells(&self.labels())
    }
}

/// The CSV cells of a labels object, in [`LABEL_FIELDS`] order; zones joined with `|`.
pub(crate) fn csv_cells(labels: &Map<String, Value>) -> Vec<String> {
    LABEL_FIELDS
        .iter()
        .map(|field| match labels.get(*field).unwrap_or(&Value::Null) {
            Value::String(s) => s.clone(),
            Value::Array(items) => items
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join("|"),
            other => other.to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_cover_every_field_in_order() {
        let truth = Truth {
            image_quality: ImageQuality::Good,
            rib_fracture: true,
            clavicle_symmetry: ClavicleSymmetry::Symmetric,
            spine_alignment: SpineAlignment::Normal,
            opacity_distribution: vec![LungZone::RightLower, LungZone::LeftUpper],
            opacity_severity: Severity::Mild,
            vascular_pattern: VascularPattern::Normal,
            interstitial_markings: InterstitialMarkings::Normal,
            hyperlucency: false,
            cardiac_contour: CardiacContour::Enlarged,
            cardiothoracic_ratio: 0.5612345,
            aortic_knob: AorticKnob::Normal,
            hilar_size: HilarSize::Normal,
            diaphragm_position: DiaphragmPosition::Normal,
            diaphragm_contour: DiaphragmContour::Smooth,
            costophrenic_angle: CostophrenicAngle::BluntedLeft,
        };
        let labels = truth.labels();
        assert_eq!(labels.len(), LABEL_FIELDS.len());
        let cells = truth.csv_cells();
        assert_eq!(cells[1], "true");
        assert_eq!(cells[4], "right_lower|left_upper");
        assert_eq!(cells[10], "0.5612");
    }
}
