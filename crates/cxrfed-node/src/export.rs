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
    Parquet,
    /// Whole schema-v1 records as JSON lines (what `ListRecords` returns, with annotations):
    /// what the client builds DICOM SR and FHIR documents from.
    Records,
}

impl Format {
    pub fn parse(text: &str) -> Option<Format> {
        match text.trim().to_ascii_lowercase().as_str() {
            "" | "csv" => Some(Format::Csv),
            "jsonl" | "ndjson" | "json" => Some(Format::Jsonl),
            "parquet" => Some(Format::Parquet),
            "records" => Some(Format::Records),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Csv => "csv",
            Format::Jsonl => "jsonl",
            Format::Parquet => "parquet",
            Format::Records => "records",
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

/// Arrow types of the export columns, in header order.
fn arrow_types(custom: &[String]) -> Vec<arrow_schema::DataType> {
    use arrow_schema::DataType;
    use cxrfed_schema::flat::FieldKind;
    let mut types = vec![DataType::Utf8; 6];
    for field in FIELDS {
        types.push(match field.kind {
            FieldKind::Numeric { .. } => DataType::Float64,
            FieldKind::Bool => DataType::Boolean,
            _ => DataType::Utf8,
        });
        if field.probability.is_some() {
            types.push(DataType::Float64);
        }
    }
    types.extend(
        FIELDS
            .iter()
            .filter(|f| f.probability.is_some())
            .map(|_| DataType::Utf8),
    );
    types.extend(custom.iter().map(|_| DataType::Utf8));
    types
}

/// Hands the bytes a Parquet writer produces to the response stream in chunks.
struct ChunkSink<'a> {
    tx: &'a tokio::sync::mpsc::Sender<Result<pb::ExportChunk, Status>>,
    buffer: Vec<u8>,
}

impl std::io::Write for ChunkSink<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buffer.extend_from_slice(data);
        if self.buffer.len() >= CHUNK {
            let data = std::mem::take(&mut self.buffer);
            self.tx
                .blocking_send(Ok(pb::ExportChunk { data, records: 0 }))
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client gone"))?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

enum Builder {
    Text(arrow_array::builder::StringBuilder),
    Number(arrow_array::builder::Float64Builder),
    Flag(arrow_array::builder::BooleanBuilder),
}

impl Builder {
    fn new(kind: &arrow_schema::DataType) -> Builder {
        match kind {
            arrow_schema::DataType::Float64 => Builder::Number(Default::default()),
            arrow_schema::DataType::Boolean => Builder::Flag(Default::default()),
            _ => Builder::Text(Default::default()),
        }
    }

    fn push(&mut self, cell: &Cell<'_>) {
        match (self, cell) {
            (Builder::Text(b), Cell::Missing) => b.append_null(),
            (Builder::Text(b), cell) => b.append_value(cell.to_text()),
            (Builder::Number(b), Cell::Number(x)) => b.append_value(*x),
            (Builder::Number(b), _) => b.append_null(),
            (Builder::Flag(b), Cell::Bool(v)) => b.append_value(*v),
            (Builder::Flag(b), _) => b.append_null(),
        }
    }

    fn finish(&mut self) -> arrow_array::ArrayRef {
        match self {
            Builder::Text(b) => std::sync::Arc::new(b.finish()),
            Builder::Number(b) => std::sync::Arc::new(b.finish()),
            Builder::Flag(b) => std::sync::Arc::new(b.finish()),
        }
    }
}

const PARQUET_BATCH: usize = 4096;

fn produce_parquet(
    store: &RecordStore,
    images: &HashSet<String>,
    custom: &[String],
    tx: &tokio::sync::mpsc::Sender<Result<pb::ExportChunk, Status>>,
) -> Result<u64, String> {
    let names = header(custom);
    let types = arrow_types(custom);
    let schema = std::sync::Arc::new(arrow_schema::Schema::new(
        names
            .iter()
            .zip(&types)
            .map(|(n, t)| arrow_schema::Field::new(n, t.clone(), true))
            .collect::<Vec<_>>(),
    ));
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::SNAPPY)
        .set_max_row_group_row_count(Some(16 * 1024))
        .build();
    let sink = ChunkSink {
        tx,
        buffer: Vec::new(),
    };
    let mut writer = parquet::arrow::ArrowWriter::try_new(sink, schema.clone(), Some(props))
        .map_err(|e| e.to_string())?;
    let mut builders: Vec<Builder> = types.iter().map(Builder::new).collect();
    let mut pending = 0usize;
    let mut exported = 0u64;
    let flush = |builders: &mut Vec<Builder>,
                 writer: &mut parquet::arrow::ArrowWriter<ChunkSink<'_>>| {
        let columns: Vec<arrow_array::ArrayRef> =
            builders.iter_mut().map(Builder::finish).collect();
        let batch = arrow_array::RecordBatch::try_new(schema.clone(), columns)
            .map_err(|e| e.to_string())?;
        writer.write(&batch).map_err(|e| e.to_string())
    };
    for record in store.iter() {
        let record = record.map_err(|e| e.to_string())?;
        if !images.contains(&record.image_sha256) {
            continue;
        }
        let labels: std::collections::HashMap<String, String> = store
            .annotations_of(&record.image_sha256)
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|a| (a.field, a.value))
            .collect();
        for (builder, cell) in builders
            .iter_mut()
            .zip(row(&record, &labels, custom).iter())
        {
            builder.push(cell);
        }
        pending += 1;
        exported += 1;
        if pending == PARQUET_BATCH {
            flush(&mut builders, &mut writer)?;
            pending = 0;
        }
    }
    if pending > 0 {
        flush(&mut builders, &mut writer)?;
    }
    // Writes the footer and hands the sink back.
    let sink = writer.into_inner().map_err(|e| e.to_string())?;
    tx.blocking_send(Ok(pb::ExportChunk {
        data: sink.buffer,
        records: exported,
    }))
    .map_err(|_| "client gone".to_string())?;
    Ok(exported)
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
    if format == Format::Parquet {
        if let Err(e) = produce_parquet(store, images, custom, tx) {
            let _ = tx.blocking_send(Err(Status::internal(format!("parquet export: {e}"))));
        }
        return;
    }
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
        if format == Format::Records {
            let mut record = record;
            record.annotations = match store.annotations_of(&record.image_sha256) {
                Ok(list) => list,
                Err(e) => {
                    let _ = tx.blocking_send(Err(Status::internal(format!("store: {e}"))));
                    return;
                }
            };
            if serde_json::to_writer(&mut buffer, &record).is_err() {
                return;
            }
            buffer.push(b'\n');
            exported += 1;
            if buffer.len() >= CHUNK && !send(std::mem::take(&mut buffer), 0) {
                return;
            }
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
            Format::Parquet | Format::Records => return,
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
