//! Records as FHIR R4, following the HL7 mapping of a TID 1500 SR to FHIR (the "DICOM SR to
//! FHIR" implementation guide): the report is a `DiagnosticReport`, its measurement group an
//! `Observation` whose `hasMember` are one `Observation` per finding (qualitative evaluations
//! as `valueCodeableConcept`, the cardiothoracic ratio as `valueQuantity` in UCUM), the model a
//! `Device` every observation names, and the de-identified patient a `Patient` known only by
//! the site's pseudonym. The model's probability is a `component` of each finding.
//!
//! One export is one `Bundle` of type `collection`, written entry by entry ([`BundleWriter`])
//! so that memory does not grow with the number of records. Resource ids are UUIDs derived
//! like the SR's UIDs (from the record id), so the same record always maps to the same
//! resources.

use std::collections::HashSet;
use std::io::Write;

use cxrfed_schema::Record;
use cxrfed_schema::flat::{Cell, FIELDS, FieldKind};
use serde_json::{Value, json};

use crate::codes::{self, Code};
use crate::sr::{Uids, derived_bytes};

const SNOMED: &str = "http://snomed.info/sct";
const DCM: &str = "http://dicom.nema.org/resources/ontology/DCM";
const LOINC: &str = "http://loinc.org";
const UCUM: &str = "http://unitsofmeasure.org";
/// The private scheme 99CXRFED as a FHIR code system.
pub const CXRFED_SYSTEM: &str = "urn:cxrfed:codes:99CXRFED";
/// Where a patient pseudonym comes from: the site's keyed hash of its PatientID.
pub const PSEUDONYM_SYSTEM: &str = "urn:cxrfed:patient-pseudonym";

fn system(scheme: &str) -> &str {
    match scheme {
        "SCT" => SNOMED,
        "DCM" => DCM,
        "LN" => LOINC,
        "UCUM" => UCUM,
        _ => CXRFED_SYSTEM,
    }
}

fn coding(code: &Code) -> Value {
    json!({"system": system(code.scheme), "code": code.value, "display": code.meaning})
}

fn concept(code: &Code) -> Value {
    json!({"coding": [coding(code)], "text": code.meaning})
}

/// A UUID (text form) derived from `parts`, as the SR's UIDs are.
pub fn derived_uuid(parts: &[&str]) -> String {
    let b = derived_bytes(parts);
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        u16::from_be_bytes([b[4], b[5]]),
        u16::from_be_bytes([b[6], b[7]]),
        u16::from_be_bytes([b[8], b[9]]),
        u64::from_be_bytes([0, 0, b[10], b[11], b[12], b[13], b[14], b[15]]),
    )
}

fn entry(id: &str, resource: Value) -> Value {
    json!({"fullUrl": format!("urn:uuid:{id}"), "resource": resource})
}

fn reference(id: &str) -> Value {
    json!({"reference": format!("urn:uuid:{id}")})
}

/// The entries of one record: its Device and Patient the first time they are seen, one
/// Observation per finding, the measurement group's Observation, the DiagnosticReport.
/// A record without findings has no entries.
pub fn record_entries(record: &Record, seen: &mut HashSet<String>) -> Vec<Value> {
    let mut entries = Vec::new();
    if record.findings.is_none() {
        return entries;
    }
    let uids = Uids::of(record);
    let id = record.record_id.as_str();
    let issued = record
        .created_at
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);

    let device = derived_uuid(&["device", &record.model_id, &record.model_sha256]);
    if seen.insert(device.clone()) {
        entries.push(entry(
            &device,
            json!({
                "resourceType": "Device",
                "id": device,
                "identifier": [{"system": "urn:dicom:uid", "value": format!("urn:oid:{}", uids.device)}],
                "manufacturer": "cxrfed",
                "deviceName": [{"name": record.model_id, "type": "model-name"}],
                "version": [{"value": format!("sha256:{}", record.model_sha256)}],
            }),
        ));
    }
    let patient = (!record.patient.pseudonym.is_empty()).then(|| {
        let patient = derived_uuid(&["patient", &record.patient.pseudonym]);
        if seen.insert(patient.clone()) {
            let mut resource = json!({
                "resourceType": "Patient",
                "id": patient,
                "identifier": [{"system": PSEUDONYM_SYSTEM, "value": record.patient.pseudonym}],
            });
            let gender = match record.patient.sex.as_str() {
                "F" => Some("female"),
                "M" => Some("male"),
                "O" => Some("other"),
                _ => None,
            };
            if let Some(gender) = gender {
                resource["gender"] = json!(gender);
            }
            entries.push(entry(&patient, resource));
        }
        patient
    });

    let base = |code: &Code| {
        let mut observation = json!({
            "resourceType": "Observation",
            "status": "final",
            "category": [{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                "code": "imaging",
                "display": "Imaging",
            }]}],
            "code": concept(code),
            "issued": issued,
            "device": reference(&device),
            "bodySite": concept(&codes::THORAX),
        });
        if let Some(patient) = &patient {
            observation["subject"] = reference(patient);
        }
        observation
    };
    let mut members = Vec::new();
    for field in FIELDS.iter().filter(|f| f.probability.is_some()) {
        let Some(code) = codes::finding(field.name) else {
            continue;
        };
        let mut observation = base(&code);
        match ((field.get)(record), field.kind) {
            (Cell::Number(value), _) => {
                observation["valueQuantity"] = json!({
                    "value": value,
                    "unit": codes::UNIT_RATIO.meaning,
                    "system": UCUM,
                    "code": codes::UNIT_RATIO.value,
                });
            }
            (Cell::Bool(value), _) => {
                observation["valueCodeableConcept"] =
                    concept(if value { &codes::YES } else { &codes::NO });
            }
            (Cell::Text(value), FieldKind::Categorical(_)) => {
                observation["valueCodeableConcept"] = concept(&codes::value(&value));
            }
            _ => continue,
        }
        if let Some(p) = field.probability.and_then(|p| p(record)) {
            observation["component"] = json!([{
                "code": concept(&codes::PROBABILITY),
                "valueQuantity": {"value": f64::from(p), "system": UCUM, "code": "1", "unit": "no units"},
            }]);
        }
        let oid = derived_uuid(&["observation", id, field.name, &record.model_sha256]);
        observation["id"] = json!(oid);
        entries.push(entry(&oid, observation));
        members.push(reference(&oid));
    }
    let group_id = derived_uuid(&["measurement-group", id, &record.model_sha256]);
    let mut group = base(&codes::MEASUREMENT_GROUP);
    group["id"] = json!(group_id);
    group["identifier"] = json!([{"system": "urn:dicom:uid", "value": format!("urn:oid:{}", crate::derived_uid(&["tracking", id]))}]);
    group["hasMember"] = Value::Array(members);
    entries.push(entry(&group_id, group));

    let report_id = derived_uuid(&["report", id, &record.model_sha256]);
    let mut report = json!({
        "resourceType": "DiagnosticReport",
        "id": report_id,
        "identifier": [
            {"system": "urn:dicom:uid", "value": format!("urn:oid:{}", uids.sr_instance)},
            {"system": "urn:cxrfed:record-id", "value": id},
        ],
        "status": "final",
        "category": [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
            "code": "RAD",
            "display": "Radiology",
        }]}],
        "code": concept(&codes::IMAGING_MEASUREMENT_REPORT),
        "issued": issued,
        "performer": [reference(&device)],
        "result": [reference(&group_id)],
        "conclusion": "Research use only: findings of an automated model, not a diagnosis.",
    });
    if let Some(patient) = &patient {
        report["subject"] = reference(patient);
    }
    entries.push(entry(&report_id, report));
    entries
}

/// Writes one FHIR `Bundle` (type `collection`) entry by entry.
pub struct BundleWriter<W: Write> {
    out: W,
    entries: usize,
    seen: HashSet<String>,
}

impl<W: Write> std::fmt::Debug for BundleWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BundleWriter")
            .field("entries", &self.entries)
            .finish_non_exhaustive()
    }
}

impl<W: Write> BundleWriter<W> {
    /// Starts the bundle; `id` names it (derived from what was exported, e.g. the filter).
    pub fn new(mut out: W, id: &str, timestamp: &str) -> std::io::Result<Self> {
        write!(
            out,
            "{{\"resourceType\":\"Bundle\",\"id\":{},\"type\":\"collection\",\"timestamp\":{},\"entry\":[",
            json!(id),
            json!(timestamp)
        )?;
        Ok(BundleWriter {
            out,
            entries: 0,
            seen: HashSet::new(),
        })
    }

    /// Adds a record's entries; returns whether it had findings (and so entries).
    pub fn add(&mut self, record: &Record) -> std::io::Result<bool> {
        let entries = record_entries(record, &mut self.seen);
        for e in &entries {
            if self.entries > 0 {
                self.out.write_all(b",")?;
            }
            serde_json::to_writer(&mut self.out, e)?;
            self.entries += 1;
        }
        Ok(!entries.is_empty())
    }

    /// Closes the bundle and returns the writer.
    pub fn finish(mut self) -> std::io::Result<W> {
        self.out.write_all(b"]}\n")?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_uuids_are_rfc_9562_version_8() {
        let u = derived_uuid(&["report", "r1"]);
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "8", "{u}");
        assert!(matches!(&u[19..20], "8" | "9" | "a" | "b"), "{u}");
        assert_eq!(u, derived_uuid(&["report", "r1"]));
    }

    #[test]
    fn an_empty_bundle_is_valid_json() {
        let writer = BundleWriter::new(Vec::new(), "b", "2026-01-01T00:00:00Z").expect("start");
        let bytes = writer.finish().expect("finish");
        let value: Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(value["type"], "collection");
        assert_eq!(value["entry"], json!([]));
    }
}
