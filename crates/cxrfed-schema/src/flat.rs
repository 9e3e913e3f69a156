//! The flattened view of a record: one named column per fact, as statistics, cohort filters and
//! exports see it. Nested findings become `image_quality`, `cardiothoracic_ratio`,
//! `opacity_right_upper`, ...; a categorical finding's probability is a separate column
//! (`image_quality_probability`) in exports.
//!
//! The categories of schema fields are listed here: they are public, part of the schema.

use std::borrow::Cow;

use crate::findings::*;
use crate::{Record, Scored};

/// What kind of values a column holds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FieldKind {
    /// One of a fixed, public list of categories.
    Categorical(&'static [&'static str]),
    /// true / false.
    Bool,
    /// A number within the schema's declared bounds.
    Numeric { min: f64, max: f64 },
    /// "YYYY-MM", ordered.
    Month,
    /// Free text from the image header (modality); categories are whatever occurs.
    Text,
}

impl FieldKind {
    pub fn is_numeric(self) -> bool {
        matches!(self, FieldKind::Numeric { .. })
    }

    /// The category values, when the kind has a public list of them.
    pub fn categories(self) -> Option<&'static [&'static str]> {
        match self {
            FieldKind::Categorical(values) => Some(values),
            FieldKind::Bool => Some(&["false", "true"]),
            _ => None,
        }
    }
}

/// One value of one column of one record.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell<'a> {
    Missing,
    Text(Cow<'a, str>),
    Bool(bool),
    Number(f64),
}

impl Cell<'_> {
    /// The text form used in tables and exports ("" for missing).
    pub fn to_text(&self) -> String {
        match self {
            Cell::Missing => String::new(),
            Cell::Text(t) => t.to_string(),
            Cell::Bool(b) => b.to_string(),
            Cell::Number(n) => n.to_string(),
        }
    }
}

/// A column of the flattened record.
#[derive(Debug)]
pub struct FlatField {
    pub name: &'static str,
    pub kind: FieldKind,
    pub description: &'static str,
    pub get: fn(&Record) -> Cell<'_>,
    /// The model's probability (or confidence) for the value, for findings.
    pub probability: Option<fn(&Record) -> Option<f32>>,
}

pub const AGE_GROUPS: &[&str] = &[
    "0-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "70-79", "80-89", "90+",
];

fn scored<T: Category>(value: Option<&Scored<T>>) -> Cell<'static> {
    value.map_or(Cell::Missing, |s| {
        Cell::Text(Cow::Borrowed(s.value.as_str()))
    })
}

fn scored_bool(value: Option<&Scored<bool>>) -> Cell<'static> {
    value.map_or(Cell::Missing, |s| Cell::Bool(s.value))
}

fn zone(record: &Record, zone: LungZone) -> Cell<'static> {
    match record
        .findings
        .as_ref()
        .and_then(|f| f.lungs.opacity_distribution.as_ref())
    {
        None => Cell::Missing,
        Some(set) => Cell::Bool(set.zones.iter().any(|z| z.value == zone)),
    }
}

fn zone_probability(record: &Record, zone: LungZone) -> Option<f32> {
    record
        .findings
        .as_ref()
        .and_then(|f| f.lungs.opacity_distribution.as_ref())
        .map(|set| {
            set.zones
                .iter()
                .find(|z| z.value == zone)
                .map_or(0.0, |z| z.probability)
        })
}

macro_rules! finding {
    ($name:literal, $ty:ty, $desc:literal, |$f:ident| $path:expr) => {
        FlatField {
            name: $name,
            kind: FieldKind::Categorical(<$ty>::NAMES),
            description: $desc,
            get: |r| scored(r.findings.as_ref().and_then(|$f| $path.as_ref())),
            probability: Some(|r| {
                r.findings
                    .as_ref()
                    .and_then(|$f| $path.as_ref())
                    .map(|s| s.probability)
            }),
        }
    };
}

macro_rules! finding_bool {
    ($name:literal, $desc:literal, |$f:ident| $path:expr) => {
        FlatField {
            name: $name,
            kind: FieldKind::Bool,
            description: $desc,
            get: |r| scored_bool(r.findings.as_ref().and_then(|$f| $path.as_ref())),
            probability: Some(|r| {
                r.findings
                    .as_ref()
                    .and_then(|$f| $path.as_ref())
                    .map(|s| s.probability)
            }),
        }
    };
}

macro_rules! zone_field {
    ($name:literal, $zone:expr) => {
        FlatField {
            name: $name,
            kind: FieldKind::Bool,
            description: "opacity present in this lung zone",
            get: |r| zone(r, $zone),
            probability: Some(|r| zone_probability(r, $zone)),
        }
    };
}

/// Every column, in export order.
pub static FIELDS: &[FlatField] = &[
    FlatField {
        name: "view",
        kind: FieldKind::Categorical(&["PA", "AP", "LL", "unknown"]),
        description: "projection (ViewPosition)",
        get: |r| Cell::Text(Cow::Borrowed(r.acquisition.view.as_str())),
        probability: None,
    },
    FlatField {
        name: "sex",
        kind: FieldKind::Categorical(&["F", "M", "O", "unknown"]),
        description: "patient sex",
        get: |r| {
            Cell::Text(Cow::Borrowed(match r.patient.sex.as_str() {
                "" => "unknown",
                s => s,
            }))
        },
        probability: None,
    },
    FlatField {
        name: "age_group",
        kind: FieldKind::Categorical(AGE_GROUPS),
        description: "patient age in decades",
        get: |r| {
            if r.patient.age_group.is_empty() {
                Cell::Missing
            } else {
                Cell::Text(Cow::Borrowed(crate::normalized_age_group(
                    r.patient.age_group.as_str(),
                )))
            }
        },
        probability: None,
    },
    FlatField {
        name: "month",
        kind: FieldKind::Month,
        description: "acquisition month (YYYY-MM)",
        get: |r| {
            if r.acquisition.month.is_empty() {
                Cell::Missing
            } else {
                Cell::Text(Cow::Borrowed(r.acquisition.month.as_str()))
            }
        },
        probability: None,
    },
    FlatField {
        name: "modality",
        kind: FieldKind::Text,
        description: "DICOM modality (CR, DX, ...)",
        get: |r| {
            if r.source.modality.is_empty() {
                Cell::Missing
            } else {
                Cell::Text(Cow::Borrowed(r.source.modality.as_str()))
            }
        },
        probability: None,
    },
    FlatField {
        name: "format",
        kind: FieldKind::Categorical(&["dicom", "png", "jpeg"]),
        description: "file format",
        get: |r| {
            r.source
                .format
                .map_or(Cell::Missing, |f| Cell::Text(Cow::Borrowed(f.as_str())))
        },
        probability: None,
    },
    FlatField {
        name: "rows",
        kind: FieldKind::Numeric {
            min: 1.0,
            max: 65535.0,
        },
        description: "image rows (pixels)",
        get: |r| Cell::Number(f64::from(r.source.rows)),
        probability: None,
    },
    FlatField {
        name: "columns",
        kind: FieldKind::Numeric {
            min: 1.0,
            max: 65535.0,
        },
        description: "image columns (pixels)",
        get: |r| Cell::Number(f64::from(r.source.columns)),
        probability: None,
    },
    finding!(
        "image_quality",
        ImageQuality,
        "diagnostic image quality",
        |f| f.image_quality
    ),
    finding!(
        "analysis_confidence",
        AnalysisConfidence,
        "confidence of the analysis as a whole",
        |f| f.analysis_confidence
    ),
    finding_bool!("rib_fracture", "a rib fracture is visible", |f| f
        .thorax
        .rib_fracture),
    finding!(
        "clavicle_symmetry",
        ClavicleSymmetry,
        "clavicles symmetric about the spine (rotation)",
        |f| f.thorax.clavicle_symmetry
    ),
    finding!("spine_alignment", SpineAlignment, "spine alignment", |f| f
        .thorax
        .spine_alignment),
    zone_field!("opacity_right_upper", LungZone::RightUpper),
    zone_field!("opacity_right_middle", LungZone::RightMiddle),
    zone_field!("opacity_right_lower", LungZone::RightLower),
    zone_field!("opacity_left_upper", LungZone::LeftUpper),
    zone_field!("opacity_left_middle", LungZone::LeftMiddle),
    zone_field!("opacity_left_lower", LungZone::LeftLower),
    finding!(
        "opacity_severity",
        Severity,
        "severity of lung opacity",
        |f| f.lungs.opacity_severity
    ),
    finding!(
        "vascular_pattern",
        VascularPattern,
        "peripheral lung vascular markings",
        |f| f.lungs.vascular_pattern
    ),
    finding!(
        "interstitial_markings",
        InterstitialMarkings,
        "interstitial markings",
        |f| f.lungs.interstitial_markings
    ),
    finding_bool!("hyperlucency", "lung fields generally hyperlucent", |f| f
        .lungs
        .hyperlucency),
    finding!(
        "cardiac_contour",
        CardiacContour,
        "cardiac silhouette",
        |f| f.mediastinum.cardiac_contour
    ),
    FlatField {
        name: "cardiothoracic_ratio",
        kind: FieldKind::Numeric { min: 0.0, max: 1.0 },
        description: "cardiothoracic ratio",
        get: |r| {
            r.findings
                .as_ref()
                .and_then(|f| f.mediastinum.cardiothoracic_ratio.as_ref())
                .map_or(Cell::Missing, |m| Cell::Number(m.value))
        },
        probability: Some(|r| {
            r.findings
                .as_ref()
                .and_then(|f| f.mediastinum.cardiothoracic_ratio.as_ref())
                .map(|m| m.confidence)
        }),
    },
    finding!("aortic_knob", AorticKnob, "aortic knob", |f| f
        .mediastinum
        .aortic_knob),
    finding!("hilar_size", HilarSize, "hilar size", |f| f
        .mediastinum
        .hilar_size),
    finding!(
        "diaphragm_position",
        DiaphragmPosition,
        "position of the diaphragm domes",
        |f| f.diaphragm.position
    ),
    finding!(
        "diaphragm_contour",
        DiaphragmContour,
        "diaphragm contour",
        |f| f.diaphragm.contour
    ),
    finding!(
        "costophrenic_angle",
        CostophrenicAngle,
        "costophrenic angles (blunting)",
        |f| f.diaphragm.costophrenic_angle
    ),
];

/// The column called `name`.
pub fn field(name: &str) -> Option<&'static FlatField> {
    FIELDS.iter().find(|f| f.name == name)
}
