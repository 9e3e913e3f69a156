//! Conversions between `cxrfed.v1` messages and `cxrfed-schema` domain types.

use chrono::{DateTime, Utc};
use cxrfed_schema as schema;
use cxrfed_schema::Category;
use thiserror::Error;

use crate::v1 as pb;

/// A wire message that does not describe a valid domain value.
#[derive(Debug, Error)]
#[error("invalid {field}: {reason}")]
pub struct ConversionError {
    pub field: &'static str,
    pub reason: String,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConversionError {
    ConversionError {
        field,
        reason: reason.into(),
    }
}

pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// Converts a wire timestamp to UTC.
pub fn from_timestamp(t: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).ok()?)
}

impl From<schema::View> for pb::View {
    fn from(v: schema::View) -> Self {
        match v {
            schema::View::Pa => pb::View::Pa,
            schema::View::Ap => pb::View::Ap,
            schema::View::Ll => pb::View::Ll,
            schema::View::Unknown => pb::View::Unknown,
        }
    }
}

impl From<pb::View> for schema::View {
    fn from(v: pb::View) -> Self {
        match v {
            pb::View::Pa => schema::View::Pa,
            pb::View::Ap => schema::View::Ap,
            pb::View::Ll => schema::View::Ll,
            pb::View::Unknown | pb::View::Unspecified => schema::View::Unknown,
        }
    }
}

fn sex_to_pb(s: schema::Sex) -> pb::Sex {
    match s {
        schema::Sex::Female => pb::Sex::Female,
        schema::Sex::Male => pb::Sex::Male,
        schema::Sex::Other => pb::Sex::Other,
        schema::Sex::Unknown => pb::Sex::Unspecified,
    }
}

fn sex_from_pb(s: pb::Sex) -> schema::Sex {
    match s {
        pb::Sex::Female => schema::Sex::Female,
        pb::Sex::Male => schema::Sex::Male,
        pb::Sex::Other => schema::Sex::Other,
        pb::Sex::Unspecified => schema::Sex::Unknown,
    }
}

fn format_to_pb(f: Option<schema::ImageFormat>) -> pb::ImageFormat {
    match f {
        Some(schema::ImageFormat::Dicom) => pb::ImageFormat::Dicom,
        Some(schema::ImageFormat::Jpeg) => pb::ImageFormat::Jpeg,
        Some(schema::ImageFormat::Png) => pb::ImageFormat::Png,
        None => pb::ImageFormat::Unspecified,
    }
}

fn format_from_pb(f: pb::ImageFormat) -> Option<schema::ImageFormat> {
    match f {
        pb::ImageFormat::Dicom => Some(schema::ImageFormat::Dicom),
        pb::ImageFormat::Jpeg => Some(schema::ImageFormat::Jpeg),
        pb::ImageFormat::Png => Some(schema::ImageFormat::Png),
        pb::ImageFormat::Unspecified => None,
    }
}

fn cat_to_pb<T: Category>(v: &Option<schema::Scored<T>>) -> Option<pb::CategoricalFinding> {
    v.map(|s| pb::CategoricalFinding {
        value: s.value.as_str().to_string(),
        probability: s.probability,
    })
}

fn cat_from_pb<T: Category>(
    field: &'static str,
    v: Option<pb::CategoricalFinding>,
) -> Result<Option<schema::Scored<T>>, ConversionError> {
    v.map(|c| {
        let value = T::parse(&c.value)
            .ok_or_else(|| invalid(field, format!("unknown category {:?}", c.value)))?;
        Ok(schema::Scored {
            value,
            probability: probability(field, c.probability)?,
        })
    })
    .transpose()
}

fn probability(field: &'static str, p: f32) -> Result<f32, ConversionError> {
    if (0.0..=1.0).contains(&p) {
        Ok(p)
    } else {
        Err(invalid(field, format!("probability {p} is outside [0, 1]")))
    }
}

fn bool_to_pb(v: &Option<schema::Scored<bool>>) -> Option<pb::BooleanFinding> {
    v.map(|s| pb::BooleanFinding {
        value: s.value,
        probability: s.probability,
    })
}

fn bool_from_pb(
    field: &'static str,
    v: Option<pb::BooleanFinding>,
) -> Result<Option<schema::Scored<bool>>, ConversionError> {
    v.map(|b| {
        Ok(schema::Scored {
            value: b.value,
            probability: probability(field, b.probability)?,
        })
    })
    .transpose()
}

fn findings_to_pb(f: &schema::Findings) -> pb::Findings {
    pb::Findings {
        image_quality: cat_to_pb(&f.image_quality),
        analysis_confidence: cat_to_pb(&f.analysis_confidence),
        thorax: Some(pb::Thorax {
            rib_fracture: bool_to_pb(&f.thorax.rib_fracture),
            clavicle_symmetry: cat_to_pb(&f.thorax.clavicle_symmetry),
            spine_alignment: cat_to_pb(&f.thorax.spine_alignment),
        }),
        lungs: Some(pb::Lungs {
            opacity_distribution: f.lungs.opacity_distribution.as_ref().map(|z| {
                pb::ZoneSetFinding {
                    zones: z
                        .zones
                        .iter()
                        .map(|s| s.value.as_str().to_string())
                        .collect(),
                    probabilities: z.zones.iter().map(|s| s.probability).collect(),
                }
            }),
            opacity_severity: cat_to_pb(&f.lungs.opacity_severity),
            vascular_pattern: cat_to_pb(&f.lungs.vascular_pattern),
            interstitial_markings: cat_to_pb(&f.lungs.interstitial_markings),
            hyperlucency: bool_to_pb(&f.lungs.hyperlucency),
        }),
        mediastinum: Some(pb::Mediastinum {
            cardiac_contour: cat_to_pb(&f.mediastinum.cardiac_contour),
            cardiothoracic_ratio: f
                .mediastinum
                .cardiothoracic_ratio
                .map(|m| pb::NumericFinding {
                    value: m.value,
                    confidence: m.confidence,
                }),
            aortic_knob: cat_to_pb(&f.mediastinum.aortic_knob),
            hilar_size: cat_to_pb(&f.mediastinum.hilar_size),
        }),
        diaphragm: Some(pb::Diaphragm {
            position: cat_to_pb(&f.diaphragm.position),
            contour: cat_to_pb(&f.diaphragm.contour),
            costophrenic_angle: cat_to_pb(&f.diaphragm.costophrenic_angle),
        }),
    }
}

impl TryFrom<pb::Findings> for schema::Findings {
    type Error = ConversionError;

    fn try_from(f: pb::Findings) -> Result<Self, ConversionError> {
        let thorax = f.thorax.unwrap_or_default();
        let lungs = f.lungs.unwrap_or_default();
        let mediastinum = f.mediastinum.unwrap_or_default();
        let diaphragm = f.diaphragm.unwrap_or_default();
        let opacity_distribution = lungs
            .opacity_distribution
            .map(|z| {
                if z.zones.len() != z.probabilities.len() {
                    return Err(invalid(
                        "opacity_distribution",
                        "zones and probabilities differ in length",
                    ));
                }
                let zones = z
                    .zones
                    .iter()
                    .zip(&z.probabilities)
                    .map(|(name, p)| {
                        let value = schema::LungZone::parse(name).ok_or_else(|| {
                            invalid("opacity_distribution", format!("unknown zone {name:?}"))
                        })?;
                        Ok(schema::Scored {
                            value,
                            probability: probability("opacity_distribution", *p)?,
                        })
                    })
                    .collect::<Result<_, ConversionError>>()?;
                Ok(schema::ZoneSet { zones })
            })
            .transpose()?;
        Ok(schema::Findings {
            image_quality: cat_from_pb("image_quality", f.image_quality)?,
            analysis_confidence: cat_from_pb("analysis_confidence", f.analysis_confidence)?,
            thorax: schema::Thorax {
                rib_fracture: bool_from_pb("rib_fracture", thorax.rib_fracture)?,
                clavicle_symmetry: cat_from_pb("clavicle_symmetry", thorax.clavicle_symmetry)?,
                spine_alignment: cat_from_pb("spine_alignment", thorax.spine_alignment)?,
            },
            lungs: schema::Lungs {
                opacity_distribution,
                opacity_severity: cat_from_pb("opacity_severity", lungs.opacity_severity)?,
                vascular_pattern: cat_from_pb("vascular_pattern", lungs.vascular_pattern)?,
                interstitial_markings: cat_from_pb(
                    "interstitial_markings",
                    lungs.interstitial_markings,
                )?,
                hyperlucency: bool_from_pb("hyperlucency", lungs.hyperlucency)?,
            },
            mediastinum: schema::Mediastinum {
                cardiac_contour: cat_from_pb("cardiac_contour", mediastinum.cardiac_contour)?,
                cardiothoracic_ratio: mediastinum
                    .cardiothoracic_ratio
                    .map(|n| {
                        if n.value.is_finite() {
                            Ok(schema::Measured {
                                value: n.value,
                                confidence: probability("cardiothoracic_ratio", n.confidence)?,
                            })
                        } else {
                            Err(invalid("cardiothoracic_ratio", "not a finite number"))
                        }
                    })
                    .transpose()?,
                aortic_knob: cat_from_pb("aortic_knob", mediastinum.aortic_knob)?,
                hilar_size: cat_from_pb("hilar_size", mediastinum.hilar_size)?,
            },
            diaphragm: schema::Diaphragm {
                position: cat_from_pb("diaphragm.position", diaphragm.position)?,
                contour: cat_from_pb("diaphragm.contour", diaphragm.contour)?,
                costophrenic_angle: cat_from_pb(
                    "costophrenic_angle",
                    diaphragm.costophrenic_angle,
                )?,
            },
        })
    }
}

impl From<&schema::Record> for pb::Record {
    fn from(r: &schema::Record) -> Self {
        pb::Record {
            record_id: r.record_id.clone(),
            image_sha256: r.image_sha256.clone(),
            schema_version: r.schema_version.to_string(),
            model_id: r.model_id.clone(),
            model_sha256: r.model_sha256.clone(),
            created_at: Some(timestamp(r.created_at)),
            processing_ms: r.processing_ms,
            request_id: r.request_id.clone(),
            source: Some(pb::Source {
                format: format_to_pb(r.source.format) as i32,
                transfer_syntax_uid: r.source.transfer_syntax_uid.clone(),
                transfer_syntax_name: r.source.transfer_syntax_name.clone(),
                modality: r.source.modality.clone(),
                manufacturer: r.source.manufacturer.clone(),
                rows: r.source.rows,
                columns: r.source.columns,
                bits_stored: r.source.bits_stored,
                photometric_interpretation: r.source.photometric_interpretation.clone(),
                number_of_frames: r.source.number_of_frames,
                body_part: r.source.body_part.clone(),
            }),
            patient: Some(pb::Patient {
                pseudonym: r.patient.pseudonym.clone(),
                age_group: r.patient.age_group.clone(),
                sex: sex_to_pb(r.patient.sex) as i32,
            }),
            acquisition: Some(pb::Acquisition {
                month: r.acquisition.month.clone(),
                view: pb::View::from(r.acquisition.view) as i32,
            }),
            findings: r.findings.as_ref().map(findings_to_pb),
            processing_notes: r.processing_notes.clone(),
            questions: r
                .questions
                .iter()
                .map(|q| pb::QuestionAnswer {
                    field: q.field.clone(),
                    value: q.value.clone(),
                    probability: q.probability,
                    source: q.source.clone(),
                    matched_phrase: q.matched_phrase.clone(),
                    asked_at: Some(timestamp(q.asked_at)),
                })
                .collect(),
            annotations: r.annotations.iter().map(pb::Annotation::from).collect(),
            custom_fields: r
                .custom_fields
                .iter()
                .map(|(k, v)| (k.clone(), v.clone().unwrap_or_default()))
                .collect(),
            model_fields: r
                .model_fields
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }
}

impl TryFrom<pb::Record> for schema::Record {
    type Error = ConversionError;

    fn try_from(r: pb::Record) -> Result<Self, ConversionError> {
        let source = r.source.unwrap_or_default();
        let patient = r.patient.unwrap_or_default();
        let acquisition = r.acquisition.unwrap_or_default();
        let schema_version = r.schema_version.parse().map_err(|_| {
            invalid(
                "schema_version",
                format!("{:?} is not a version number", r.schema_version),
            )
        })?;
        let created_at = r
            .created_at
            .as_ref()
            .and_then(from_timestamp)
            .ok_or_else(|| invalid("created_at", "missing or out of range"))?;
        if !acquisition.month.is_empty() && !schema::is_valid_month(&acquisition.month) {
            return Err(invalid(
                "acquisition.month",
                format!("{:?} is not YYYY-MM", acquisition.month),
            ));
        }
        Ok(schema::Record {
            record_id: r.record_id,
            image_sha256: r.image_sha256,
            schema_version,
            model_id: r.model_id,
            model_sha256: r.model_sha256,
            created_at,
            processing_ms: r.processing_ms,
            request_id: r.request_id,
            source: schema::Source {
                format: format_from_pb(source.format()),
                transfer_syntax_uid: source.transfer_syntax_uid,
                transfer_syntax_name: source.transfer_syntax_name,
                modality: source.modality,
                manufacturer: source.manufacturer,
                rows: source.rows,
                columns: source.columns,
                bits_stored: source.bits_stored,
                photometric_interpretation: source.photometric_interpretation,
                number_of_frames: source.number_of_frames,
                body_part: source.body_part,
            },
            patient: schema::Patient {
                sex: sex_from_pb(patient.sex()),
                pseudonym: patient.pseudonym,
                age_group: patient.age_group,
            },
            acquisition: schema::Acquisition {
                month: acquisition.month.clone(),
                view: schema::View::from(acquisition.view()),
            },
            findings: r.findings.map(schema::Findings::try_from).transpose()?,
            processing_notes: r.processing_notes,
            questions: r
                .questions
                .into_iter()
                .map(|q| {
                    Ok(schema::QuestionAnswer {
                        asked_at: q.asked_at.as_ref().and_then(from_timestamp).ok_or_else(
                            || invalid("questions.asked_at", "missing or out of range"),
                        )?,
                        field: q.field,
                        value: q.value,
                        probability: q.probability,
                        source: q.source,
                        matched_phrase: q.matched_phrase,
                    })
                })
                .collect::<Result<_, ConversionError>>()?,
            annotations: r
                .annotations
                .into_iter()
                .map(schema::custom::Annotation::try_from)
                .collect::<Result<_, _>>()?,
            custom_fields: r
                .custom_fields
                .into_iter()
                .map(|(k, v)| (k, Some(v).filter(|v| !v.is_empty())))
                .collect(),
            model_fields: r.model_fields.into_iter().collect(),
        })
    }
}

impl From<&schema::custom::Annotation> for pb::Annotation {
    fn from(a: &schema::custom::Annotation) -> Self {
        pb::Annotation {
            image_sha256: a.image_sha256.clone(),
            field: a.field.clone(),
            value: a.value.clone(),
            annotator: a.annotator.clone(),
            annotated_at: Some(timestamp(a.annotated_at)),
            source: a.source.clone(),
        }
    }
}

impl TryFrom<pb::Annotation> for schema::custom::Annotation {
    type Error = ConversionError;

    fn try_from(a: pb::Annotation) -> Result<Self, ConversionError> {
        Ok(schema::custom::Annotation {
            annotated_at: a
                .annotated_at
                .as_ref()
                .and_then(from_timestamp)
                .ok_or_else(|| invalid("annotations.annotated_at", "missing or out of range"))?,
            image_sha256: a.image_sha256,
            field: a.field,
            value: a.value,
            annotator: a.annotator,
            source: a.source,
        })
    }
}

impl From<&schema::custom::FieldDefinition> for pb::FieldDefinition {
    fn from(d: &schema::custom::FieldDefinition) -> Self {
        use schema::custom::CustomKind;
        let (kind, values, min, max) = match &d.kind {
            CustomKind::Bool => ("bool", Vec::new(), 0.0, 0.0),
            CustomKind::Categorical { values } => ("categorical", values.clone(), 0.0, 0.0),
            CustomKind::Numeric { min, max } => ("numeric", Vec::new(), *min, *max),
        };
        pb::FieldDefinition {
            name: d.name.clone(),
            r#type: kind.to_string(),
            values,
            min,
            max,
            description: d.description.clone(),
            synonyms: d.synonyms.clone(),
            version: d.version,
            defined_at: Some(timestamp(d.defined_at)),
            defined_by: d.defined_by.clone(),
        }
    }
}

/// The kind of a field definition from its proto form.
pub fn custom_kind(d: &pb::FieldDefinition) -> Result<schema::custom::CustomKind, ConversionError> {
    use schema::custom::CustomKind;
    match d.r#type.as_str() {
        "bool" => Ok(CustomKind::Bool),
        "categorical" => Ok(CustomKind::Categorical {
            values: d.values.clone(),
        }),
        "numeric" => Ok(CustomKind::Numeric {
            min: d.min,
            max: d.max,
        }),
        other => Err(invalid(
            "field.type",
            format!("{other:?} must be bool, categorical or numeric"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> schema::Record {
        schema::Record {
            record_id: "0190b3c2-0000-7000-8000-000000000000".into(),
            image_sha256: "ab".repeat(32),
            schema_version: schema::SCHEMA_VERSION,
            model_id: schema::NO_MODEL.into(),
            model_sha256: String::new(),
            created_at: DateTime::from_timestamp(1_700_000_000, 123_000_000).expect("time"),
            processing_ms: 12.5,
            request_id: "req".into(),
            source: schema::Source {
                format: Some(schema::ImageFormat::Dicom),
                modality: "CR".into(),
                rows: 10,
                columns: 20,
                ..schema::Source::default()
            },
            patient: schema::Patient {
                pseudonym: "p".into(),
                age_group: "60-69".into(),
                sex: schema::Sex::Female,
            },
            acquisition: schema::Acquisition {
                month: "2004-08".into(),
                view: schema::View::Pa,
            },
            findings: None,
            processing_notes: vec!["note".into()],
            questions: vec![schema::QuestionAnswer {
                field: "hyperlucency".into(),
                value: "false".into(),
                probability: 0.9,
                source: "question".into(),
                matched_phrase: "透亮度".into(),
                asked_at: chrono::DateTime::from_timestamp(1_700_000_000, 0).expect("time"),
            }],
            annotations: vec![schema::custom::Annotation {
                image_sha256: "ab".repeat(32),
                field: "pneumothorax".into(),
                value: "true".into(),
                annotator: "alice".into(),
                annotated_at: chrono::DateTime::from_timestamp(1_700_000_100, 0).expect("time"),
                source: "annotation".into(),
            }],
            custom_fields: [
                ("pneumothorax".to_string(), Some("true".to_string())),
                ("tube".to_string(), None),
            ]
            .into_iter()
            .collect(),
            model_fields: [("cardiomegaly".to_string(), "false".to_string())]
                .into_iter()
                .collect(),
        }
    }

    #[test]
    fn record_round_trips() {
        let record = sample();
        let back = schema::Record::try_from(pb::Record::from(&record)).expect("valid");
        assert_eq!(back, record);
    }

    #[test]
    fn findings_round_trip() {
        let mut record = sample();
        let mut findings = schema::Findings {
            image_quality: Some(schema::Scored {
                value: schema::ImageQuality::Good,
                probability: 0.9,
            }),
            ..schema::Findings::default()
        };
        findings.diaphragm.costophrenic_angle = Some(schema::Scored {
            value: schema::CostophrenicAngle::BluntedLeft,
            probability: 0.7,
        });
        findings.lungs.opacity_distribution = Some(schema::ZoneSet {
            zones: vec![schema::Scored {
                value: schema::LungZone::LeftLower,
                probability: 0.8,
            }],
        });
        findings.mediastinum.cardiothoracic_ratio = Some(schema::Measured {
            value: 0.55,
            confidence: 0.6,
        });
        record.findings = Some(findings);
        let back = schema::Record::try_from(pb::Record::from(&record)).expect("valid");
        assert_eq!(back, record);
    }

    #[test]
    fn rejects_bad_values_with_the_field_name() {
        let mut wire = pb::Record::from(&sample());
        wire.acquisition.as_mut().expect("set").month = "2004-13".into();
        let err = schema::Record::try_from(wire).expect_err("invalid month");
        assert_eq!(err.field, "acquisition.month");

        let mut wire = pb::Record::from(&sample());
        wire.findings = Some(pb::Findings {
            image_quality: Some(pb::CategoricalFinding {
                value: "superb".into(),
                probability: 0.5,
            }),
            ..Default::default()
        });
        let err = schema::Record::try_from(wire).expect_err("unknown category");
        assert!(err.to_string().contains("superb"));
    }
}
