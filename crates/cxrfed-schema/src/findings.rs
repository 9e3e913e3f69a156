//! Findings of schema v1: each value carries the model's probability (or confidence).
//!
//! The categories are public knowledge (they are part of the schema), which later lets
//! differentially private histograms skip partition selection.

use serde::{Deserialize, Serialize};

/// A categorical schema value with a stable text form.
pub trait Category: Copy + Sized {
    fn as_str(self) -> &'static str;
    fn parse(text: &str) -> Option<Self>;
}

/// Declares a categorical finding as an enum with stable snake_case names.
macro_rules! categories {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
        pub enum $name {
            $(#[serde(rename = $text)] $variant),+
        }

        impl Category for $name {
            fn as_str(self) -> &'static str {
                $name::as_str(self)
            }
            fn parse(text: &str) -> Option<Self> {
                $name::parse(text)
            }
        }

        impl $name {
            /// Every category, in schema order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            /// The text of every category, in schema order.
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            pub fn parse(text: &str) -> Option<Self> {
                match text { $($text => Some($name::$variant),)+ _ => None }
            }
        }
    };
}

categories!(ImageQuality { Excellent => "excellent", Good => "good", Fair => "fair", Poor => "poor" });
categories!(AnalysisConfidence { High => "high", Medium => "medium", Low => "low", Insufficient => "insufficient" });
categories!(ClavicleSymmetry { Symmetric => "symmetric", Asymmetric => "asymmetric" });
categories!(SpineAlignment { Normal => "normal", Scoliotic => "scoliotic" });
categories!(Severity { None => "none", Mild => "mild", Moderate => "moderate", Severe => "severe" });
categories!(VascularPattern { Normal => "normal", Increased => "increased", Decreased => "decreased" });
categories!(InterstitialMarkings { Normal => "normal", Prominent => "prominent" });
categories!(CardiacContour { Normal => "normal", Enlarged => "enlarged", Indistinct => "indistinct" });
categories!(AorticKnob { Normal => "normal", Prominent => "prominent" });
categories!(HilarSize { Normal => "normal", Enlarged => "enlarged" });
categories!(DiaphragmPosition { Elevated => "elevated", Normal => "normal", Depressed => "depressed" });
categories!(DiaphragmContour { Smooth => "smooth", Irregular => "irregular" });
categories!(CostophrenicAngle {
    Normal => "normal",
    BluntedLeft => "blunted_left",
    BluntedRight => "blunted_right",
    BluntedBoth => "blunted_both",
});
categories!(
    /// Lung zones for the multi-label opacity distribution.
    LungZone {
        RightUpper => "right_upper",
        RightMiddle => "right_middle",
        RightLower => "right_lower",
        LeftUpper => "left_upper",
        LeftMiddle => "left_middle",
        LeftLower => "left_lower",
    }
);

/// A categorical value with the model's probability for it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Scored<T> {
    pub value: T,
    pub probability: f32,
}

/// A numeric value with the model's confidence in [0, 1].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Measured {
    pub value: f64,
    pub confidence: f32,
}

/// A set of lung zones, each with its probability.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ZoneSet {
    pub zones: Vec<Scored<LungZone>>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Findings {
    pub image_quality: Option<Scored<ImageQuality>>,
    pub analysis_confidence: Option<Scored<AnalysisConfidence>>,
    pub thorax: Thorax,
    pub lungs: Lungs,
    pub mediastinum: Mediastinum,
    pub diaphragm: Diaphragm,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Thorax {
    pub rib_fracture: Option<Scored<bool>>,
    pub clavicle_symmetry: Option<Scored<ClavicleSymmetry>>,
    pub spine_alignment: Option<Scored<SpineAlignment>>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Lungs {
    pub opacity_distribution: Option<ZoneSet>,
    pub opacity_severity: Option<Scored<Severity>>,
    pub vascular_pattern: Option<Scored<VascularPattern>>,
    pub interstitial_markings: Option<Scored<InterstitialMarkings>>,
    pub hyperlucency: Option<Scored<bool>>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Mediastinum {
    pub cardiac_contour: Option<Scored<CardiacContour>>,
    pub cardiothoracic_ratio: Option<Measured>,
    pub aortic_knob: Option<Scored<AorticKnob>>,
    pub hilar_size: Option<Scored<HilarSize>>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Diaphragm {
    pub position: Option<Scored<DiaphragmPosition>>,
    pub contour: Option<Scored<DiaphragmContour>>,
    pub costophrenic_angle: Option<Scored<CostophrenicAngle>>,
}

/// Declared bounds of the numeric schema fields; DP sums and means clamp to them.
pub const CARDIOTHORACIC_RATIO_BOUNDS: (f64, f64) = (0.3, 0.8);
/// Declared bounds of patient age in years.
pub const AGE_BOUNDS: (f64, f64) = (0.0, 110.0);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn categories_round_trip_through_text() {
        for angle in CostophrenicAngle::ALL {
            assert_eq!(CostophrenicAngle::parse(angle.as_str()), Some(*angle));
        }
        assert_eq!(Severity::parse("catastrophic"), None);
        let json = serde_json::to_string(&CostophrenicAngle::BluntedBoth).expect("serialize");
        assert_eq!(json, "\"blunted_both\"");
    }
}
