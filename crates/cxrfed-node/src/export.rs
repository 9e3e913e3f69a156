//! Flattened exports (CSV, JSON lines) of the records that pass a filter, produced on a blocking
//! thread and streamed in ~64 KiB chunks: memory stays bounded whatever the store's size.

use std::collections::HashSet;

use cxrfed_proto::v1 as pb;
use cxrfed_schema::Record;
use cxrfed_schema::flat::{Cell, FIELDS};
use cxrfed_store::RecordStore;
use tonic::Status;

const CHUNK: usize = 64 * 1024;

/// Output format of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Csv,
    Jsonl,
}

impl Format {
    pub fn parse(text: &str) -> Option<Format> {
        match text.trim().to_ascii_lowercase().as_str() {
            "" | "csv" => Some(Format::Csv),
            "jsonl" | "ndjson" | "json" => Some(Format::Jsonl),
            _ => None,
        }
    }
}

/// Column names of an export, in order: record facts, every schema column (with its
/// probability), `<finding>_annotated` (human corrections), then the custom fields.
pub fn header(custom: &[String]) -> Vec<String> {
    let mut names: Vec<String> = [
        "record_id",
        "image_sha256",
        "created_at",
        "model_id",
        "model_sha256",
        "patient_pseudonym",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for field in FIELDS {
        names.push(field.name.to_string());
        if field.probability.is_some() {
            names.push(format!("{}_probability", field.name));
        }
    }
    for field in FIELDS.iter().filter(|f| f.probability.is_some()) {
        names.push(format!("{}_annotated", field.name));
    }
    names.extend(custom.iter().cloned());
    names
}

fn row<'a>(
    record: &'a Record,
    labels: &std::collections::HashMap<String, String>,
    custom: &[String],
) -> Vec<Cell<'a>> {
    let text = |s: &str| Cell::Text(s.to_string().into());
    let mut cells = vec![
        text(&record.record_id),
        text(&record.image_sha256),
        text(&record.created_at.to_rfc3339()),
        text(&record.model_id),
        text(&record.model_sha256),
        if record.patient.pseudonym.is_empty() {
            Cell::Missing
        } else {
            text(&record.patient.pseudonym)
        },
    ];
    for field in FIELDS {
        cells.push((field.get)(record));
        if let Some(probability) = field.probability {
            cells.push(probability(record).map_or(Cell::Missing, |p| Cell::Number(f64::from(p))));
        }
    }
    let label = |field: &str| {
        labels
            .get(field)
            .map_or(Cell::Missing, |v| Cell::Text(v.clone().into()))
    };
    for field in FIELDS.iter().filter(|f| f.probability.is_some()) {
        cells.push(label(field.name));
    }
    for name in custom {
        cells.push(label(name));
    }
    cells
}

fn json_value(cell: &Cell<'_>) -> serde_json::Value {
    match cell {
        Cell::Missing => serde_json::Value::Null,
        Cell::Text(t) => serde_json::Value::String(t.to_string()),
        Cell::Bool(b) => serde_json::Value::Bool(*b),
        Cell::Number(n) => serde_json::Number::from_f64(*n)
            .map_or(serde_json::Value::Null, serde_json::Value::Number),
    }
}

/// Writes the records whose image is in `images` to `tx` in chunks. Runs on a blocking thread;
/// stops early when the receiver goes away (the client cancelled).
pub fn produce(
    store: &RecordStore,
    images: &HashSet<String>,
    format: Format,
    custom: &[String],
    tx: &tokio::sync::mpsc::Sender<Result<pb::ExportChunk, Status>>,
) {
    let names = header(custom);
    let mut buffer: Vec<u8> = Vec::with_capacity(CHUNK * 2);
    let mut exported = 0u64;
    if format == Format::Csv {
        let mut w = csv::Writer::from_writer(&mut buffer);
        if w.write_record(&names).is_err() || w.flush().is_err() {
            return;
        }
    }
    let send = |data: Vec<u8>, records: u64| {
        tx.blocking_send(Ok(pb::ExportChunk { data, records }))
            .is_ok()
    };
    for record in store.iter() {
        let record = match record {
            Ok(record) => record,
            Err(e) => {
                let _ = tx.blocking_send(Err(Status::internal(format!("store: {e}"))));
                return;
            }
        };
        if !images.contains(&record.image_sha256) {
            continue;
        }
        let labels: std::collections::HashMap<String, String> =
            match store.annotations_of(&record.image_sha256) {
                Ok(list) => list.into_iter().map(|a| (a.field, a.value)).collect(),
                Err(e) => {
                    let _ = tx.blocking_send(Err(Status::internal(format!("store: {e}"))));
                    return;
                }
            };
        let cells = row(&record, &labels, custom);
        match format {
            Format::Csv => {
                let mut w = csv::Writer::from_writer(&mut buffer);
                let texts: Vec<String> = cells.iter().map(Cell::to_text).collect();
                if w.write_record(&texts).is_err() || w.flush().is_err() {
                    return;
                }
            }
            Format::Jsonl => {
                let object: serde_json::Map<String, serde_json::Value> = names
                    .iter()
                    .cloned()
                    .zip(cells.iter().map(json_value))
                    .collect();
                if serde_json::to_writer(&mut buffer, &object).is_err() {
                    return;
                }
                buffer.push(b'\n');
            }
        }
        exported += 1;
        if buffer.len() >= CHUNK && !send(std::mem::take(&mut buffer), 0) {
            return;
        }
    }
    let _ = send(buffer, exported);
}
