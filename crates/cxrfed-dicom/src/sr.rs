//! A node's records as DICOM Structured Reports, for a research PACS and for viewers such as
//! OHIF: one Comprehensive SR per record following TID 1500 (Imaging Measurement Report), with
//! the image-level findings as a TID 1501 measurement group (qualitative evaluations as coded
//! concepts, the cardiothoracic ratio as a numeric measurement in UCUM units), the model as
//! the algorithm (TID 4019) and as the device observer (TID 1004).
//!
//! * **Codes.** SNOMED CT, DCM and UCUM where they exist; everything else in the private
//!   coding scheme `99CXRFED`, described in the SR's Coding Scheme Identification Sequence and
//!   in docs/sr-codes.md ([`codes`] is the table both come from).
//! * **Identity.** A record has no original UIDs (the node never keeps them). Every UID here
//!   is derived from the record id (a random UUID v7), never from anything in the image
//!   header: `2.25.` followed by a UUID v8 made from SHA-256 of a label and the record id
//!   (RFC 9562; PS3.5 B.2). The same record exported twice gets the same UIDs, so re-sending
//!   to a PACS replaces rather than duplicates; a record re-inferred by another model version
//!   gets a new SR instance in the same series.
//! * **Privacy.** Patient Name, Birth Date, Accession Number and dates stay empty (Type 2);
//!   Patient ID is the site's keyed pseudonym (empty when the file had no PatientID). The SR
//!   holds what the site admin's own exports hold, nothing more.

use crate::codes::{self, Code};
use cxrfed_schema::Record;
use cxrfed_schema::flat::{Cell, FIELDS, FieldKind};
use dicom_core::value::DataSetSequence;
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use sha2::{Digest, Sha256};

/// Why a record could not be written as an SR.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("record {0} has no findings (no model filled it): nothing to report")]
    NoFindings(String),
    #[error("writing the SR: {0}")]
    Write(String),
}

/// The UIDs of one record's SR and of the (de-identified, nominal) image it describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uids {
    pub study: String,
    pub image_series: String,
    pub image_instance: String,
    pub image_sop_class: &'static str,
    pub sr_series: String,
    pub sr_instance: String,
    /// The device observer: the model's weights.
    pub device: String,
}

/// The 16 bytes of a UUID v8 (RFC 9562 §5.8) from SHA-256 of `parts`.
pub(crate) fn derived_bytes(parts: &[&str]) -> [u8; 16] {
    let mut hash = Sha256::new();
    hash.update(b"cxrfed-uid-v1");
    for part in parts {
        hash.update([0u8]);
        hash.update(part.as_bytes());
    }
    let digest = hash.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    bytes[6] = (bytes[6] & 0x0f) | 0x80; // version 8
    bytes[8] = (bytes[8] & 0x3f) | 0x80; // RFC 9562 variant
    bytes
}

/// `2.25.` + a UUID v8 from SHA-256 of `parts` (DICOM PS3.5 B.2).
pub fn derived_uid(parts: &[&str]) -> String {
    format!("2.25.{}", u128::from_be_bytes(derived_bytes(parts)))
}

impl Uids {
    pub fn of(record: &Record) -> Uids {
        let id = record.record_id.as_str();
        let image_sop_class = match record.source.modality.as_str() {
            "CR" => uids::COMPUTED_RADIOGRAPHY_IMAGE_STORAGE,
            "DX" => uids::DIGITAL_X_RAY_IMAGE_STORAGE_FOR_PRESENTATION,
            _ => uids::SECONDARY_CAPTURE_IMAGE_STORAGE,
        };
        Uids {
            study: derived_uid(&["study", id]),
            image_series: derived_uid(&["image-series", id]),
            image_instance: derived_uid(&["image", id]),
            image_sop_class,
            sr_series: derived_uid(&["sr-series", id]),
            sr_instance: derived_uid(&["sr", id, &record.model_id, &record.model_sha256]),
            device: derived_uid(&["device", &record.model_id, &record.model_sha256]),
        }
    }
}

/// A data element holding text; DICOM pads odd lengths itself.
fn text(tag: Tag, vr: VR, value: &str) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, vr, PrimitiveValue::from(value))
}

fn empty(tag: Tag, vr: VR) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, vr, PrimitiveValue::Empty)
}

fn sequence(tag: Tag, items: Vec<InMemDicomObject>) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::SQ, DataSetSequence::from(items))
}

fn code_item(code: &Code) -> InMemDicomObject {
    InMemDicomObject::from_element_iter([
        text(tags::CODE_VALUE, VR::SH, code.value),
        text(tags::CODING_SCHEME_DESIGNATOR, VR::SH, code.scheme),
        text(tags::CODE_MEANING, VR::LO, code.meaning),
    ])
}

fn code_sequence(tag: Tag, code: &Code) -> DataElement<InMemDicomObject> {
    sequence(tag, vec![code_item(code)])
}

/// One content item: relationship, value type, concept name, then its value elements and
/// children.
fn item(
    relationship: &str,
    value_type: &str,
    concept: &Code,
    value: Vec<DataElement<InMemDicomObject>>,
    children: Vec<InMemDicomObject>,
) -> InMemDicomObject {
    let mut object = InMemDicomObject::from_element_iter([
        text(tags::RELATIONSHIP_TYPE, VR::CS, relationship),
        text(tags::VALUE_TYPE, VR::CS, value_type),
        code_sequence(tags::CONCEPT_NAME_CODE_SEQUENCE, concept),
    ]);
    for element in value {
        object.put(element);
    }
    if !children.is_empty() {
        object.put(sequence(tags::CONTENT_SEQUENCE, children));
    }
    object
}

fn code_content(relationship: &str, concept: &Code, value: &Code) -> InMemDicomObject {
    item(
        relationship,
        "CODE",
        concept,
        vec![code_sequence(tags::CONCEPT_CODE_SEQUENCE, value)],
        Vec::new(),
    )
}

fn text_content(relationship: &str, concept: &Code, value: &str) -> InMemDicomObject {
    item(
        relationship,
        "TEXT",
        concept,
        vec![text(tags::TEXT_VALUE, VR::UT, value)],
        Vec::new(),
    )
}

fn uid_content(relationship: &str, concept: &Code, uid: &str) -> InMemDicomObject {
    item(
        relationship,
        "UIDREF",
        concept,
        vec![text(tags::UID, VR::UI, uid)],
        Vec::new(),
    )
}

fn num_content(
    relationship: &str,
    concept: &Code,
    value: f64,
    unit: &Code,
    children: Vec<InMemDicomObject>,
) -> InMemDicomObject {
    let measured = InMemDicomObject::from_element_iter([
        code_sequence(tags::MEASUREMENT_UNITS_CODE_SEQUENCE, unit),
        text(tags::NUMERIC_VALUE, VR::DS, &decimal_string(value)),
    ]);
    item(
        relationship,
        "NUM",
        concept,
        vec![sequence(tags::MEASURED_VALUE_SEQUENCE, vec![measured])],
        children,
    )
}

/// A DS value: at most 16 characters.
fn decimal_string(value: f64) -> String {
    let mut s = format!("{value:.6}");
    while s.contains('.') && (s.ends_with('0') || s.ends_with('.')) {
        s.pop();
    }
    s.truncate(16);
    s
}

fn container(
    relationship: &str,
    concept: &Code,
    children: Vec<InMemDicomObject>,
) -> InMemDicomObject {
    item(
        relationship,
        "CONTAINER",
        concept,
        vec![text(tags::CONTINUITY_OF_CONTENT, VR::CS, "SEPARATE")],
        children,
    )
}

fn image_content(relationship: &str, concept: &Code, uids: &Uids) -> InMemDicomObject {
    let reference = InMemDicomObject::from_element_iter([
        text(tags::REFERENCED_SOP_CLASS_UID, VR::UI, uids.image_sop_class),
        text(
            tags::REFERENCED_SOP_INSTANCE_UID,
            VR::UI,
            &uids.image_instance,
        ),
    ]);
    item(
        relationship,
        "IMAGE",
        concept,
        vec![sequence(tags::REFERENCED_SOP_SEQUENCE, vec![reference])],
        Vec::new(),
    )
}

/// TID 4019 Algorithm Identification: the model, its weights' digest as version and
/// parameter.
fn algorithm(record: &Record) -> Vec<InMemDicomObject> {
    let sha = record.model_sha256.as_str();
    vec![
        text_content("HAS CONCEPT MOD", &codes::ALGORITHM_NAME, &record.model_id),
        text_content(
            "HAS CONCEPT MOD",
            &codes::ALGORITHM_VERSION,
            &format!("sha256:{}", &sha[..sha.len().min(12)]),
        ),
        text_content(
            "HAS CONCEPT MOD",
            &codes::ALGORITHM_PARAMETERS,
            &format!("weights sha256={sha}"),
        ),
    ]
}

/// The qualitative evaluations and measurements of a record's findings: one content item
/// per finding that has a value, each with the model's probability as a property.
fn evaluations(record: &Record) -> Vec<InMemDicomObject> {
    let mut out = Vec::new();
    for field in FIELDS.iter().filter(|f| f.probability.is_some()) {
        let Some(concept) = codes::finding(field.name) else {
            continue;
        };
        let probability = field.probability.and_then(|p| p(record));
        let property = |p: f32| {
            num_content(
                "HAS PROPERTIES",
                &codes::PROBABILITY,
                f64::from(p),
                &codes::UNIT_NONE,
                Vec::new(),
            )
        };
        match ((field.get)(record), field.kind) {
            (Cell::Number(value), _) => {
                let mut item =
                    num_content("CONTAINS", &concept, value, &codes::UNIT_RATIO, Vec::new());
                if let Some(p) = probability {
                    item.put(sequence(tags::CONTENT_SEQUENCE, vec![property(p)]));
                }
                out.push(item);
            }
            (Cell::Bool(value), _) => {
                let value = if value { codes::YES } else { codes::NO };
                out.push(with_property(
                    code_content("CONTAINS", &concept, &value),
                    probability.map(property),
                ));
            }
            (Cell::Text(value), FieldKind::Categorical(_)) => {
                let value = codes::value(&value);
                out.push(with_property(
                    code_content("CONTAINS", &concept, &value),
                    probability.map(property),
                ));
            }
            _ => {}
        }
    }
    out
}

fn with_property(
    mut item: InMemDicomObject,
    property: Option<InMemDicomObject>,
) -> InMemDicomObject {
    if let Some(property) = property {
        item.put(sequence(tags::CONTENT_SEQUENCE, vec![property]));
    }
    item
}

/// The record as a Comprehensive SR (TID 1500), a DICOM Part 10 file in explicit VR little
/// endian.
pub fn dicom_sr(record: &Record) -> Result<Vec<u8>, ReportError> {
    if record.findings.is_none() {
        return Err(ReportError::NoFindings(record.record_id.clone()));
    }
    let uids = Uids::of(record);

    let observer = vec![
        code_content("HAS OBS CONTEXT", &codes::OBSERVER_TYPE, &codes::DEVICE),
        uid_content("HAS OBS CONTEXT", &codes::DEVICE_OBSERVER_UID, &uids.device),
        text_content(
            "HAS OBS CONTEXT",
            &codes::DEVICE_OBSERVER_NAME,
            "cxrfed node",
        ),
        text_content(
            "HAS OBS CONTEXT",
            &codes::DEVICE_OBSERVER_MANUFACTURER,
            "cxrfed",
        ),
        text_content(
            "HAS OBS CONTEXT",
            &codes::DEVICE_OBSERVER_MODEL_NAME,
            &record.model_id,
        ),
    ];
    let library = container(
        "CONTAINS",
        &codes::IMAGE_LIBRARY,
        vec![container(
            "CONTAINS",
            &codes::IMAGE_LIBRARY_GROUP,
            vec![image_content("CONTAINS", &codes::SOURCE, &uids)],
        )],
    );
    let mut group = vec![
        text_content(
            "HAS OBS CONTEXT",
            &codes::TRACKING_IDENTIFIER,
            &record.record_id,
        ),
        uid_content(
            "HAS OBS CONTEXT",
            &codes::TRACKING_UNIQUE_IDENTIFIER,
            &derived_uid(&["tracking", &record.record_id]),
        ),
    ];
    group.extend(algorithm(record));
    group.extend(evaluations(record));
    group.push(image_content(
        "CONTAINS",
        &codes::SOURCE_OF_MEASUREMENT,
        &uids,
    ));
    let measurements = container(
        "CONTAINS",
        &codes::IMAGING_MEASUREMENTS,
        vec![container("CONTAINS", &codes::MEASUREMENT_GROUP, group)],
    );

    let mut content = vec![code_content(
        "HAS CONCEPT MOD",
        &codes::LANGUAGE,
        &codes::ENGLISH_US,
    )];
    content.extend(observer);
    content.push(code_content(
        "HAS CONCEPT MOD",
        &codes::PROCEDURE_REPORTED,
        &codes::CHEST_X_RAY,
    ));
    content.push(library);
    content.push(measurements);

    let created = record.created_at;
    let date = created.format("%Y%m%d").to_string();
    let time = created.format("%H%M%S").to_string();
    let evidence = InMemDicomObject::from_element_iter([
        text(tags::STUDY_INSTANCE_UID, VR::UI, &uids.study),
        sequence(
            tags::REFERENCED_SERIES_SEQUENCE,
            vec![InMemDicomObject::from_element_iter([
                text(tags::SERIES_INSTANCE_UID, VR::UI, &uids.image_series),
                sequence(
                    tags::REFERENCED_SOP_SEQUENCE,
                    vec![InMemDicomObject::from_element_iter([
                        text(tags::REFERENCED_SOP_CLASS_UID, VR::UI, uids.image_sop_class),
                        text(
                            tags::REFERENCED_SOP_INSTANCE_UID,
                            VR::UI,
                            &uids.image_instance,
                        ),
                    ])],
                ),
            ])],
        ),
    ]);
    let scheme = InMemDicomObject::from_element_iter([
        text(tags::CODING_SCHEME_DESIGNATOR, VR::SH, codes::SCHEME),
        text(tags::CODING_SCHEME_NAME, VR::ST, codes::SCHEME_NAME),
        text(
            tags::CODING_SCHEME_RESPONSIBLE_ORGANIZATION,
            VR::ST,
            "the cxrfed project (docs/sr-codes.md)",
        ),
        text(tags::CODING_SCHEME_VERSION, VR::SH, "1"),
    ]);
    let sex = match record.patient.sex.as_str() {
        "" => String::new(),
        s => s.to_string(),
    };
    let elements = vec![
        text(tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 192"),
        text(tags::INSTANCE_CREATION_DATE, VR::DA, &date),
        text(tags::INSTANCE_CREATION_TIME, VR::TM, &time),
        text(tags::SOP_CLASS_UID, VR::UI, uids::COMPREHENSIVE_SR_STORAGE),
        text(tags::SOP_INSTANCE_UID, VR::UI, &uids.sr_instance),
        empty(tags::STUDY_DATE, VR::DA),
        empty(tags::STUDY_TIME, VR::TM),
        empty(tags::ACCESSION_NUMBER, VR::SH),
        text(tags::MODALITY, VR::CS, "SR"),
        text(tags::MANUFACTURER, VR::LO, "cxrfed"),
        empty(tags::REFERRING_PHYSICIAN_NAME, VR::PN),
        sequence(tags::CODING_SCHEME_IDENTIFICATION_SEQUENCE, vec![scheme]),
        text(
            tags::SERIES_DESCRIPTION,
            VR::LO,
            "cxrfed findings (research use only)",
        ),
        sequence(
            tags::REFERENCED_PERFORMED_PROCEDURE_STEP_SEQUENCE,
            Vec::new(),
        ),
        empty(tags::PATIENT_NAME, VR::PN),
        text(tags::PATIENT_ID, VR::LO, &record.patient.pseudonym),
        empty(tags::PATIENT_BIRTH_DATE, VR::DA),
        text(tags::PATIENT_SEX, VR::CS, &sex),
        text(tags::SOFTWARE_VERSIONS, VR::LO, env!("CARGO_PKG_VERSION")),
        text(tags::STUDY_INSTANCE_UID, VR::UI, &uids.study),
        text(tags::SERIES_INSTANCE_UID, VR::UI, &uids.sr_series),
        empty(tags::STUDY_ID, VR::SH),
        text(tags::SERIES_NUMBER, VR::IS, "9001"),
        text(tags::INSTANCE_NUMBER, VR::IS, "1"),
        text(tags::VALUE_TYPE, VR::CS, "CONTAINER"),
        code_sequence(
            tags::CONCEPT_NAME_CODE_SEQUENCE,
            &codes::IMAGING_MEASUREMENT_REPORT,
        ),
        text(tags::CONTINUITY_OF_CONTENT, VR::CS, "SEPARATE"),
        sequence(
            tags::CONTENT_TEMPLATE_SEQUENCE,
            vec![InMemDicomObject::from_element_iter([
                text(tags::MAPPING_RESOURCE, VR::CS, "DCMR"),
                text(tags::TEMPLATE_IDENTIFIER, VR::CS, "1500"),
            ])],
        ),
        text(tags::CONTENT_DATE, VR::DA, &date),
        text(tags::CONTENT_TIME, VR::TM, &time),
        sequence(
            tags::CURRENT_REQUESTED_PROCEDURE_EVIDENCE_SEQUENCE,
            vec![evidence],
        ),
        sequence(tags::PERFORMED_PROCEDURE_CODE_SEQUENCE, Vec::new()),
        text(tags::COMPLETION_FLAG, VR::CS, "COMPLETE"),
        text(tags::VERIFICATION_FLAG, VR::CS, "UNVERIFIED"),
        sequence(tags::CONTENT_SEQUENCE, content),
    ];
    let object = InMemDicomObject::from_element_iter(elements);
    let meta = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(uids::COMPREHENSIVE_SR_STORAGE)
        .media_storage_sop_instance_uid(&uids.sr_instance)
        .transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN)
        .implementation_class_uid(crate::IMPLEMENTATION_CLASS_UID)
        .implementation_version_name(crate::IMPLEMENTATION_VERSION_NAME)
        .build()
        .map_err(|e| ReportError::Write(e.to_string()))?;
    let file = object.with_exact_meta(meta);
    let mut bytes = Vec::new();
    file.write_all(&mut bytes)
        .map_err(|e| ReportError::Write(e.to_string()))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_uids_are_valid_stable_and_distinct() {
        let a = derived_uid(&["study", "0190a0b1-0000-7000-8000-000000000001"]);
        assert_eq!(
            a,
            derived_uid(&["study", "0190a0b1-0000-7000-8000-000000000001"])
        );
        assert_ne!(
            a,
            derived_uid(&["image", "0190a0b1-0000-7000-8000-000000000001"])
        );
        assert!(a.starts_with("2.25.") && a.len() <= 64, "{a}");
        assert!(a[5..].chars().all(|c| c.is_ascii_digit()) && !a[5..].starts_with('0'));
        // Parts are separated: ("ab", "c") is not ("a", "bc").
        assert_ne!(derived_uid(&["ab", "c"]), derived_uid(&["a", "bc"]));
    }

    #[test]
    fn decimal_strings_fit_ds() {
        assert_eq!(decimal_string(0.5), "0.5");
        assert_eq!(decimal_string(0.123456789), "0.123457");
        assert_eq!(decimal_string(1.0), "1");
        assert!(decimal_string(123456789.123456).len() <= 16);
    }
}
