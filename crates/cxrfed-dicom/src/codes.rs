//! The coded concepts of cxrfed's SRs. DCM (DICOM PS3.16), SNOMED CT (`SCT`) and UCUM codes
//! where they exist; the rest in the private scheme [`SCHEME`] (`99CXRFED`), whose table is
//! docs/sr-codes.md (a test keeps it in step with [`FINDINGS`] and [`VALUES`]).

/// A coded concept: (Code Value, Coding Scheme Designator, Code Meaning).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Code {
    pub value: &'static str,
    pub scheme: &'static str,
    pub meaning: &'static str,
}

const fn code(value: &'static str, scheme: &'static str, meaning: &'static str) -> Code {
    Code {
        value,
        scheme,
        meaning,
    }
}

/// The private coding scheme designator (private schemes start with "99", PS3.3 8.2).
pub const SCHEME: &str = "99CXRFED";
pub const SCHEME_NAME: &str = "cxrfed chest X-ray findings, schema v1";

pub const IMAGING_MEASUREMENT_REPORT: Code = code("126000", "DCM", "Imaging Measurement Report");
pub const LANGUAGE: Code = code("121049", "DCM", "Language of Content Item and Descendants");
pub const ENGLISH_US: Code = code("en-US", "RFC5646", "English (United States)");
pub const OBSERVER_TYPE: Code = code("121005", "DCM", "Observer Type");
pub const DEVICE: Code = code("121007", "DCM", "Device");
pub const DEVICE_OBSERVER_UID: Code = code("121012", "DCM", "Device Observer UID");
pub const DEVICE_OBSERVER_NAME: Code = code("121013", "DCM", "Device Observer Name");
pub const DEVICE_OBSERVER_MANUFACTURER: Code =
    code("121014", "DCM", "Device Observer Manufacturer");
pub const DEVICE_OBSERVER_MODEL_NAME: Code = code("121015", "DCM", "Device Observer Model Name");
pub const PROCEDURE_REPORTED: Code = code("121058", "DCM", "Procedure reported");
pub const THORAX: Code = code("51185008", "SCT", "Thoracic structure");
pub const CHEST_X_RAY: Code = code("399208008", "SCT", "Plain chest X-ray");
pub const IMAGE_LIBRARY: Code = code("111028", "DCM", "Image Library");
pub const IMAGE_LIBRARY_GROUP: Code = code("126200", "DCM", "Image Library Group");
pub const SOURCE: Code = code("260753009", "SCT", "Source");
pub const IMAGING_MEASUREMENTS: Code = code("126010", "DCM", "Imaging Measurements");
pub const MEASUREMENT_GROUP: Code = code("125007", "DCM", "Measurement Group");
pub const TRACKING_IDENTIFIER: Code = code("112039", "DCM", "Tracking Identifier");
pub const TRACKING_UNIQUE_IDENTIFIER: Code = code("112040", "DCM", "Tracking Unique Identifier");
pub const SOURCE_OF_MEASUREMENT: Code = code("121112", "DCM", "Source of Measurement");
pub const ALGORITHM_NAME: Code = code("111001", "DCM", "Algorithm Name");
pub const ALGORITHM_VERSION: Code = code("111003", "DCM", "Algorithm Version");
pub const ALGORITHM_PARAMETERS: Code = code("111002", "DCM", "Algorithm Parameters");
pub const YES: Code = code("373066001", "SCT", "Yes");
pub const NO: Code = code("373067005", "SCT", "No");
pub const UNIT_RATIO: Code = code("{ratio}", "UCUM", "ratio");
pub const UNIT_NONE: Code = code("1", "UCUM", "no units");
/// The model's probability (or confidence) for the value it is a property of.
pub const PROBABILITY: Code = code("CXR-PROB", SCHEME, "Model probability");

/// Concept names of the findings, by schema field.
pub const FINDINGS: &[(&str, Code)] = &[
    ("image_quality", code("CXR-IQ", SCHEME, "Image quality")),
    (
        "analysis_confidence",
        code("CXR-CONF", SCHEME, "Analysis confidence"),
    ),
    ("rib_fracture", code("CXR-RIBFX", SCHEME, "Rib fracture")),
    (
        "clavicle_symmetry",
        code("CXR-CLAV", SCHEME, "Clavicle symmetry"),
    ),
    (
        "spine_alignment",
        code("CXR-SPINE", SCHEME, "Spine alignment"),
    ),
    (
        "opacity_right_upper",
        code("CXR-OPAC-RU", SCHEME, "Opacity, right upper zone"),
    ),
    (
        "opacity_right_middle",
        code("CXR-OPAC-RM", SCHEME, "Opacity, right middle zone"),
    ),
    (
        "opacity_right_lower",
        code("CXR-OPAC-RL", SCHEME, "Opacity, right lower zone"),
    ),
    (
        "opacity_left_upper",
        code("CXR-OPAC-LU", SCHEME, "Opacity, left upper zone"),
    ),
    (
        "opacity_left_middle",
        code("CXR-OPAC-LM", SCHEME, "Opacity, left middle zone"),
    ),
    (
        "opacity_left_lower",
        code("CXR-OPAC-LL", SCHEME, "Opacity, left lower zone"),
    ),
    (
        "opacity_severity",
        code("CXR-OPAC-SEV", SCHEME, "Lung opacity severity"),
    ),
    (
        "vascular_pattern",
        code("CXR-VASC", SCHEME, "Pulmonary vascular pattern"),
    ),
    (
        "interstitial_markings",
        code("CXR-INTERST", SCHEME, "Interstitial markings"),
    ),
    ("hyperlucency", code("CXR-HYPERLUC", SCHEME, "Hyperlucency")),
    (
        "cardiac_contour",
        code("CXR-CARDIAC", SCHEME, "Cardiac silhouette"),
    ),
    (
        "cardiothoracic_ratio",
        code("CXR-CTR", SCHEME, "Cardiothoracic ratio"),
    ),
    ("aortic_knob", code("CXR-AORTA", SCHEME, "Aortic knob")),
    ("hilar_size", code("CXR-HILA", SCHEME, "Hilar size")),
    (
        "diaphragm_position",
        code("CXR-DIA-POS", SCHEME, "Diaphragm position"),
    ),
    (
        "diaphragm_contour",
        code("CXR-DIA-CONT", SCHEME, "Diaphragm contour"),
    ),
    (
        "costophrenic_angle",
        code("CXR-CPA", SCHEME, "Costophrenic angles"),
    ),
];

/// Category values with a standard code; every other category is coded in [`SCHEME`] with
/// its schema text as the code value.
pub const VALUES: &[(&str, Code)] = &[
    ("normal", code("17621005", "SCT", "Normal")),
    ("mild", code("255604002", "SCT", "Mild")),
    ("moderate", code("6736007", "SCT", "Moderate")),
    ("severe", code("24484000", "SCT", "Severe")),
];

/// The concept name of a finding field.
pub fn finding(field: &str) -> Option<Code> {
    FINDINGS.iter().find(|(f, _)| *f == field).map(|(_, c)| *c)
}

/// The code of a category value.
pub fn value(text: &str) -> Code {
    if let Some((_, code)) = VALUES.iter().find(|(v, _)| *v == text) {
        return *code;
    }
    match cxrfed_schema::flat::FIELDS
        .iter()
        .filter_map(|f| f.kind.categories())
        .flatten()
        .find(|v| **v == text)
    {
        Some(category) => code(category, SCHEME, private_meaning(category)),
        None => code("CXR-UNKNOWN", SCHEME, "Unknown value"),
    }
}

/// The meaning of a private category code: its schema text in words.
fn private_meaning(category: &'static str) -> &'static str {
    match category {
        "excellent" => "Excellent",
        "good" => "Good",
        "fair" => "Fair",
        "poor" => "Poor",
        "high" => "High",
        "medium" => "Medium",
        "low" => "Low",
        "insufficient" => "Insufficient",
        "symmetric" => "Symmetric",
        "asymmetric" => "Asymmetric",
        "scoliotic" => "Scoliotic",
        "none" => "None",
        "increased" => "Increased",
        "decreased" => "Decreased",
        "prominent" => "Prominent",
        "enlarged" => "Enlarged",
        "indistinct" => "Indistinct",
        "elevated" => "Elevated",
        "depressed" => "Depressed",
        "smooth" => "Smooth",
        "irregular" => "Irregular",
        "blunted_left" => "Blunted, left",
        "blunted_right" => "Blunted, right",
        "blunted_both" => "Blunted, both sides",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cxrfed_schema::flat::{FIELDS, FieldKind};

    #[test]
    fn every_finding_and_category_has_a_code_that_fits_its_vr() {
        for field in FIELDS.iter().filter(|f| f.probability.is_some()) {
            let concept = finding(field.name).unwrap_or_else(|| panic!("{}", field.name));
            assert!(concept.value.len() <= 16, "{concept:?}: SH holds 16");
            if let FieldKind::Categorical(values) = field.kind {
                for v in values {
                    let c = value(v);
                    assert_ne!(c.value, "CXR-UNKNOWN", "{v}");
                    assert!(c.value.len() <= 16 && c.meaning.len() <= 64, "{c:?}");
                    assert_ne!(c.meaning, *v, "{v} has a meaning in words");
                }
            }
        }
    }

    /// docs/sr-codes.md lists every code: the table in the repository is this one.
    #[test]
    fn the_documented_table_is_current() {
        let doc = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/sr-codes.md"),
        )
        .expect("docs/sr-codes.md");
        let mut rows: Vec<String> = FINDINGS
            .iter()
            .map(|(field, c)| format!("| `{field}` | `{}` | {} |", c.value, c.meaning))
            .collect();
        for field in FIELDS.iter().filter(|f| f.probability.is_some()) {
            if let FieldKind::Categorical(values) = field.kind {
                for v in values {
                    let c = value(v);
                    let row = format!("| `{v}` | `{}` | `{}` | {} |", c.value, c.scheme, c.meaning);
                    if !rows.contains(&row) {
                        rows.push(row);
                    }
                }
            }
        }
        let missing: Vec<&String> = rows.iter().filter(|r| !doc.contains(r.as_str())).collect();
        assert!(
            missing.is_empty(),
            "docs/sr-codes.md lacks these rows:\n{}",
            missing
                .iter()
                .map(|r| r.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}
