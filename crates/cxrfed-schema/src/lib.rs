//! The cxrfed finding schema (version 1) and the [`Record`] a node keeps for every image.
//!
//! This crate is the vocabulary the rest of the system shares: the record, its provenance and
//! de-identified patient/acquisition facts, and the findings with their categories and bounds.
//! It must not depend on gRPC (tonic), LibTorch (tch) or storage (sled): it is pure data.
//!
//! A record never holds a patient name, patient ID, birth date or accession number. It is a
//! research record, not a diagnosis.
//!
//! Architecture invariant: cxrfed-schema is pure data: it depends on no other cxrfed crate, nor
//! on tonic, sled or tch.

#![forbid(unsafe_code)]

pub mod custom;
mod findings;
pub mod flat;
pub mod lexicon;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use findings::*;

/// The schema version this build writes. Stores written by a newer version are refused.
pub const SCHEMA_VERSION: u32 = 1;

/// The model id recorded while no extraction model is installed.
pub const NO_MODEL: &str = "none";

/// A model version name (the registry's, and a node's directory for it): letters, digits,
/// `-`, `_` and `.`, up to 128 characters, not starting with a dot.
pub fn valid_model_version(version: &str) -> bool {
    !version.is_empty()
        && version.len() <= 128
        && !version.starts_with('.')
        && version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// One structured, de-identified record of one chest X-ray.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Record {
    /// Time-ordered UUID v7, canonical text form.
    pub record_id: String,
    /// SHA-256 (hex) of the decoded, de-identified pixel samples.
    pub image_sha256: String,
    pub schema_version: u32,
    /// The model that filled [`Record::findings`]; [`NO_MODEL`] when none did.
    pub model_id: String,
    /// SHA-256 (hex) of the model weights; empty when no model filled the findings.
    #[serde(default)]
    pub model_sha256: String,
    pub created_at: DateTime<Utc>,
    /// Decode + de-identify + preprocess (+ inference) time in milliseconds.
    pub processing_ms: f64,
    pub request_id: String,
    pub source: Source,
    pub patient: Patient,
    pub acquisition: Acquisition,
    /// `None` until a model fills it: never made-up values.
    #[serde(default)]
    pub findings: Option<Findings>,
    /// How the image was read, e.g. "multi-frame: first of 3 frames used".
    #[serde(default)]
    pub processing_notes: Vec<String>,
    /// Fields asked about with `Ask`, oldest first (source "question"). The question's free
    /// text is not kept (it could carry anything); the lexicon phrase that matched is.
    #[serde(default)]
    pub questions: Vec<QuestionAnswer>,
    /// Human labels for this image (custom fields, corrections of findings). Kept apart from
    /// the model's findings and from the stored record: filled in when the record is read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub annotations: Vec<custom::Annotation>,
    /// Every custom field the site defined, with this image's labelled value; `None` (null)
    /// while unknown. Filled in when the record is read, never stored.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub custom_fields: std::collections::BTreeMap<String, Option<String>>,
    /// Custom fields the model fills (heads a federated job trained for researcher-defined
    /// fields): field → value as text. Stored with the findings; a human label of the same
    /// field takes precedence in statistics.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub model_fields: std::collections::BTreeMap<String, String>,
}

/// One answered question, appended to a record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct QuestionAnswer {
    pub field: String,
    /// The model's value as text; empty when the record has no findings.
    pub value: String,
    pub probability: f32,
    /// Always "question".
    pub source: String,
    pub matched_phrase: String,
    pub asked_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Dicom,
    Jpeg,
    Png,
}

impl ImageFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Dicom => "dicom",
            ImageFormat::Jpeg => "jpeg",
            ImageFormat::Png => "png",
        }
    }
}

/// Technical facts about the source image (no identifiers).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Source {
    pub format: Option<ImageFormat>,
    pub transfer_syntax_uid: String,
    pub transfer_syntax_name: String,
    pub modality: String,
    pub manufacturer: String,
    pub rows: u32,
    pub columns: u32,
    pub bits_stored: u32,
    pub photometric_interpretation: String,
    pub number_of_frames: u32,
    pub body_part: String,
}

/// Patient sex with the DICOM codes as its text form ("F", "M", "O"), "unknown" when absent.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
pub enum Sex {
    #[serde(rename = "F")]
    Female,
    #[serde(rename = "M")]
    Male,
    #[serde(rename = "O")]
    Other,
    #[default]
    #[serde(rename = "unknown")]
    Unknown,
}

impl Sex {
    /// Maps DICOM PatientSex (`F`, `M`, `O`) to [`Sex`].
    pub fn from_dicom(code: &str) -> Self {
        match code.trim().to_ascii_uppercase().as_str() {
            "F" => Sex::Female,
            "M" => Sex::Male,
            "O" => Sex::Other,
            _ => Sex::Unknown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Sex::Female => "F",
            Sex::Male => "M",
            Sex::Other => "O",
            Sex::Unknown => "",
        }
    }
}

/// De-identified patient facts.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Patient {
    /// HMAC-SHA256 (hex) of PatientID under the site secret; empty when no PatientID.
    pub pseudonym: String,
    /// Ten-year band ("60-69"), "90+" for every age from 90; empty when unknown.
    pub age_group: String,
    pub sex: Sex,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum View {
    Pa,
    Ap,
    Ll,
    #[default]
    Unknown,
}

impl View {
    /// Maps DICOM ViewPosition (PA, AP, LL, LATERAL, RL...) to [`View`].
    pub fn from_dicom(code: &str) -> Self {
        match code.trim().to_ascii_uppercase().as_str() {
            "PA" => View::Pa,
            "AP" => View::Ap,
            "LL" | "LATERAL" | "LAT" | "RL" => View::Ll,
            _ => View::Unknown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            View::Pa => "PA",
            View::Ap => "AP",
            View::Ll => "LL",
            View::Unknown => "unknown",
        }
    }

    /// Parses the text form used by CLI filters ("PA", "ap", "unknown").
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim().to_ascii_uppercase().as_str() {
            "PA" => Some(View::Pa),
            "AP" => Some(View::Ap),
            "LL" => Some(View::Ll),
            "UNKNOWN" => Some(View::Unknown),
            _ => None,
        }
    }
}

/// Acquisition facts, coarsened.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Acquisition {
    /// "YYYY-MM", or empty when the file has no usable date.
    pub month: String,
    pub view: View,
}

/// Builds the ten-year age band for an age in whole years: 0-9, 10-19, ..., 80-89, and "90+"
/// for every age of 90 or more (HIPAA Safe Harbor, 45 CFR 164.514(b)(2)(i)(C): ages over 89
/// are aggregated into one category, since very old ages are rare enough to identify).
pub fn age_group(years: u32) -> String {
    if years >= 90 {
        "90+".to_string()
    } else {
        let lo = years / 10 * 10;
        format!("{lo}-{}", lo + 9)
    }
}

/// The band a stored age group belongs to now: first-generation records kept "90-99",
/// "100-109" and "110+", which read as "90+".
pub fn normalized_age_group(band: &str) -> &str {
    match band {
        "90-99" | "100-109" | "110+" => "90+",
        other => other,
    }
}

/// Validates a "YYYY-MM" month string.
pub fn is_valid_month(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.len() == 7
        && bytes[4] == b'-'
        && bytes[..4].iter().all(u8::is_ascii_digit)
        && bytes[5..].iter().all(u8::is_ascii_digit)
        && matches!(text[5..].parse::<u32>(), Ok(1..=12))
}

/// The JSON Schema (draft 2020-12) of a [`Record`] as the node returns and exports it.
/// Committed as `schema/record.schema.json`; a test keeps the two equal.
pub fn record_json_schema() -> serde_json::Value {
    let mut schema = serde_json::to_value(schemars::schema_for!(Record)).unwrap_or_default();
    if let Some(object) = schema.as_object_mut() {
        object.insert(
            "$id".into(),
            serde_json::Value::String(format!(
                "https://cxrfed.invalid/schema/record-v{SCHEMA_VERSION}.json"
            )),
        );
        object.insert(
            "description".into(),
            serde_json::Value::String(format!(
                "One structured, de-identified record of one chest X-ray (cxrfed schema v{SCHEMA_VERSION}). Research use only, not a diagnosis."
            )),
        );
    }
    schema
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_json_schema_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../schema/record.schema.json");
        let generated = serde_json::to_string_pretty(&record_json_schema()).expect("json") + "\n";
        if std::env::var_os("CXRFED_UPDATE_SCHEMA").is_some() {
            std::fs::write(&path, &generated).expect("write schema");
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "schema/record.schema.json is stale: regenerate with `CXRFED_UPDATE_SCHEMA=1 cargo test -p cxrfed-schema`"
        );
    }

    #[test]
    fn age_bands() {
        assert_eq!(age_group(0), "0-9");
        assert_eq!(age_group(61), "60-69");
        assert_eq!(age_group(69), "60-69");
        assert_eq!(age_group(70), "70-79");
        assert_eq!(age_group(89), "80-89");
        assert_eq!(age_group(90), "90+");
        assert_eq!(age_group(93), "90+");
        assert_eq!(age_group(115), "90+");
        assert_eq!(normalized_age_group("100-109"), "90+");
        assert_eq!(normalized_age_group("60-69"), "60-69");
    }

    #[test]
    fn months() {
        assert!(is_valid_month("2024-01"));
        assert!(!is_valid_month("2024-13"));
        assert!(!is_valid_month("2024/01"));
        assert!(!is_valid_month("24-01"));
    }

    #[test]
    fn view_and_sex_codes() {
        assert_eq!(View::from_dicom("PA "), View::Pa);
        assert_eq!(View::from_dicom("LATERAL"), View::Ll);
        assert_eq!(View::from_dicom(""), View::Unknown);
        assert_eq!(Sex::from_dicom("F"), Sex::Female);
        assert_eq!(Sex::from_dicom("x"), Sex::Unknown);
    }
}
