//! Custom fields a study defines (beyond schema v1) and human annotations: labels with
//! provenance, for custom fields and as corrections of schema findings. Annotations are kept
//! apart from model outputs — they are what federated training learns from.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::flat::{self, FieldKind};

/// The type of a custom field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum CustomKind {
    Bool,
    Categorical { values: Vec<String> },
    Numeric { min: f64, max: f64 },
}

/// A custom field definition; redefining a name makes a new version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct FieldDefinition {
    pub name: String,
    pub kind: CustomKind,
    pub description: String,
    /// Phrases (any language) that `Ask` maps to this field.
    #[serde(default)]
    pub synonyms: Vec<String>,
    pub version: u32,
    pub defined_at: DateTime<Utc>,
    /// The identity that defined it.
    pub defined_by: String,
}

/// A human label for one field of one image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Annotation {
    /// The image (annotations follow the image through re-extractions).
    pub image_sha256: String,
    pub field: String,
    /// The value as text: a category, "true"/"false", or a number.
    pub value: String,
    pub annotator: String,
    pub annotated_at: DateTime<Utc>,
    /// Always "annotation".
    pub source: String,
}

/// A field name: snake_case, a-z, 0-9 and `_`, 1-64 characters, starting with a letter.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_lowercase()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

impl FieldDefinition {
    /// Checks the name (snake_case, not a schema column or a reserved suffix) and the type.
    pub fn validate(&self) -> Result<(), String> {
        if !valid_name(&self.name) {
            return Err(format!(
                "field name {:?} must be snake_case: a-z, 0-9, _ (1-64 characters, starting with a letter)",
                self.name
            ));
        }
        if flat::field(&self.name).is_some()
            || self.name.ends_with("_annotated")
            || self.name.ends_with("_probability")
        {
            return Err(format!(
                "{:?} is a schema column (or looks like one); choose another name",
                self.name
            ));
        }
        match &self.kind {
            CustomKind::Bool => {}
            CustomKind::Categorical { values } => {
                if values.is_empty() || values.len() > 64 {
                    return Err("a categorical field needs 1 to 64 values".into());
                }
                for v in values {
                    if v.is_empty() || v.len() > 64 || v.contains(['"', '\'', ',', '=']) {
                        return Err(format!(
                            "category {v:?} must be 1-64 characters without quotes, commas or ="
                        ));
                    }
                }
                let mut sorted = values.clone();
                sorted.sort();
                sorted.dedup();
                if sorted.len() != values.len() {
                    return Err("categories must be distinct".into());
                }
            }
            CustomKind::Numeric { min, max } => {
                if !(min.is_finite() && max.is_finite() && min < max) {
                    return Err(format!(
                        "numeric bounds {min}..{max} must be finite with min < max"
                    ));
                }
            }
        }
        if self.description.len() > 1000 || self.synonyms.len() > 64 {
            return Err("description up to 1000 bytes, up to 64 synonyms".into());
        }
        Ok(())
    }

    /// The canonical text of `value` for this field, or why it is not a value of it.
    pub fn check_value(&self, value: &str) -> Result<String, String> {
        check(&self.kind_as_flat(), value, &self.name)
    }

    fn kind_as_flat(&self) -> Kind<'_> {
        match &self.kind {
            CustomKind::Bool => Kind::Bool,
            CustomKind::Categorical { values } => {
                Kind::Categories(values.iter().map(String::as_str).collect())
            }
            CustomKind::Numeric { min, max } => Kind::Numeric(*min, *max),
        }
    }
}

enum Kind<'a> {
    Bool,
    Categories(Vec<&'a str>),
    Numeric(f64, f64),
}

fn check(kind: &Kind<'_>, value: &str, field: &str) -> Result<String, String> {
    let value = value.trim();
    match kind {
        Kind::Bool => match value.to_ascii_lowercase().as_str() {
            "true" | "yes" | "1" => Ok("true".into()),
            "false" | "no" | "0" => Ok("false".into()),
            _ => Err(format!("{field} is true or false, not {value:?}")),
        },
        Kind::Categories(values) => values
            .iter()
            .find(|v| **v == value)
            .map(|v| v.to_string())
            .ok_or_else(|| {
                format!(
                    "{value:?} is not a value of {field}; one of: {}",
                    values.join(", ")
                )
            }),
        Kind::Numeric(min, max) => match value.parse::<f64>() {
            Ok(x) if x.is_finite() && x >= *min && x <= *max => Ok(x.to_string()),
            _ => Err(format!(
                "{field} is a number in {min}..={max}, not {value:?}"
            )),
        },
    }
}

/// Schema findings a human may annotate (corrections of the model), with the canonical text
/// of `value`.
pub fn check_schema_value(field: &str, value: &str) -> Result<String, String> {
    let Some(f) = flat::field(field) else {
        return Err(format!("unknown field {field:?}"));
    };
    if f.probability.is_none() {
        return Err(format!(
            "{field} comes from the image header and is not annotated"
        ));
    }
    match f.kind {
        FieldKind::Bool => check(&Kind::Bool, value, field),
        FieldKind::Categorical(values) => check(&Kind::Categories(values.to_vec()), value, field),
        FieldKind::Numeric { min, max } => check(&Kind::Numeric(min, max), value, field),
        FieldKind::Month | FieldKind::Text => Err(format!("{field} is not annotated")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(name: &str, kind: CustomKind) -> FieldDefinition {
        FieldDefinition {
            name: name.into(),
            kind,
            description: String::new(),
            synonyms: Vec::new(),
            version: 1,
            defined_at: Utc::now(),
            defined_by: "test".into(),
        }
    }

    #[test]
    fn definitions_and_values_are_checked() {
        assert!(def("pneumothorax", CustomKind::Bool).validate().is_ok());
        assert!(def("image_quality", CustomKind::Bool).validate().is_err());
        assert!(def("Bad Name", CustomKind::Bool).validate().is_err());
        let tube = def(
            "ett_position",
            CustomKind::Categorical {
                values: vec!["ok".into(), "low".into(), "high".into()],
            },
        );
        assert_eq!(tube.check_value("low").as_deref(), Ok("low"));
        assert!(tube.check_value("deep").is_err());
        let size = def(
            "nodule_mm",
            CustomKind::Numeric {
                min: 0.0,
                max: 50.0,
            },
        );
        assert_eq!(size.check_value("12.5").as_deref(), Ok("12.5"));
        assert!(size.check_value("80").is_err());
        assert_eq!(
            check_schema_value("hyperlucency", "yes").as_deref(),
            Ok("true")
        );
        assert!(check_schema_value("image_quality", "superb").is_err());
        assert!(check_schema_value("view", "PA").is_err());
    }
}
