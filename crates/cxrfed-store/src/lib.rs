//! sled persistence for cxrfed records.
//!
//! Layout (one sled database per node data directory):
//!
//! | tree | key | value |
//! | --- | --- | --- |
//! | `records` | record_id (UUID v7 text, so key order is creation order) | CBOR envelope `{schema_version, record}` |
//! | `records_by_image` | image_sha256 (hex) | record_id |
//! | `meta` | `schema_version` | u32 big-endian: the newest schema that wrote this store |
//! | `meta` | `audit_head` | JSON `{seq, hash}` of the last audit entry |
//! | `custom_fields` | field name | JSON `FieldDefinition` (latest version) |
//! | `annotations` | image_sha256 `\0` field | JSON `Annotation` (latest per image and field) |
//! | `privacy_ledger` | identity URI | JSON account: budget and spent ε (1e-9 units) and δ (1e-18 units) |
//! | `audit` | sequence number (u64 big-endian) | JSON [`audit::AuditEntry`], hash-chained |
//! | `signed_nonces` | nonce of a signed federated request (or `order:FP:NONCE:rR:aA`, a round attempt of a signed training order) | time it was charged (charged once) |
//! | `model_history` | record_id | CBOR list of the record's earlier model outputs ([`ModelOutput`], newest last, at most [`HISTORY_DEPTH`]) |
//! | `settings` | name (`training_policy`) | the site admin's setting (JSON), audited when set |
//!
//! A record and its index entry are written in one sled transaction, so a record is either
//! fully present (and findable by hash) or absent, even if the process dies mid-write.
//! Writes are flushed before they are acknowledged.
//!
//! This crate must not depend on gRPC (tonic) or LibTorch (tch).
//!
//! Architecture invariant: cxrfed-store depends on neither tonic nor tch.

#![forbid(unsafe_code)]

pub mod audit;
pub mod coordinator;
pub mod history;
pub mod ledger;

pub use audit::{AuditEntry, AuditEvent, AuditReport, BrokenLink};
pub use coordinator::{CoordinatorStore, Doc, SiteRecord};
pub use history::{HISTORY_DEPTH, ModelOutput};
pub use ledger::{Account, Budget, Limit};

use std::path::Path;

use cxrfed_schema::{Record, SCHEMA_VERSION};
use serde::{Deserialize, Serialize};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use thiserror::Error;

const RECORDS: &str = "records";
const BY_IMAGE: &str = "records_by_image";
const META: &str = "meta";
const FIELDS: &str = "custom_fields";
const ANNOTATIONS: &str = "annotations";
const SCHEMA_KEY: &str = "schema_version";

#[derive(Debug, Error)]
pub enum StoreError {
    #[error(
        "the store at {path} is in use by another process (is a node already running on this data directory?)"
    )]
    Locked { path: String },
    #[error(
        "the store was written by schema version {found}; this build supports up to {supported}. Upgrade cxrfed before opening it"
    )]
    NewerSchema { found: u32, supported: u32 },
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    #[error("record {record_id} could not be decoded: {message}")]
    Corrupt { record_id: String, message: String },
    #[error("record could not be encoded: {0}")]
    Encode(String),
    #[error(
        "privacy budget exhausted for {identity}: this release needs epsilon {requested_epsilon} (delta {requested_delta}) but {remaining_epsilon} (delta {remaining_delta}) remains; nothing was released"
    )]
    BudgetExhausted {
        identity: String,
        requested_epsilon: f64,
        remaining_epsilon: f64,
        requested_delta: f64,
        remaining_delta: f64,
    },
    #[error("signed request {nonce} was already charged here; a signed request is answered once")]
    Replay { nonce: String },
}

/// Opens a sled database, naming a lock held by another process.
pub(crate) fn open_db(path: &Path) -> Result<sled::Db> {
    sled::Config::new().path(path).open().map_err(|e| match e {
        sled::Error::Io(ref io)
            if io.kind() == std::io::ErrorKind::WouldBlock || io.to_string().contains("lock") =>
        {
            StoreError::Locked {
                path: path.display().to_string(),
            }
        }
        other => StoreError::Sled(other),
    })
}

/// Unwraps a sled transaction error into ours.
pub(crate) fn transaction_error(e: TransactionError<StoreError>) -> StoreError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => StoreError::Sled(e),
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// What is written for each record: the schema version travels with the record.
#[derive(Serialize, Deserialize)]
struct Envelope {
    schema_version: u32,
    record: Record,
}

/// The outcome of [`RecordStore::insert`].
#[derive(Debug, Clone, PartialEq)]
pub enum Inserted {
    /// The record was written.
    Created(Record),
    /// A record for the same image already existed and was returned unchanged.
    Existing(Record),
}

/// Filters for [`RecordStore::list`]; every field is optional and they combine with AND.
#[derive(Debug, Clone, Default)]
pub struct RecordFilter {
    pub view: Option<cxrfed_schema::View>,
    pub modality: Option<String>,
    /// Inclusive "YYYY-MM" bounds on the acquisition month.
    pub month_from: Option<String>,
    pub month_to: Option<String>,
}

impl RecordFilter {
    pub fn matches(&self, record: &Record) -> bool {
        self.view.is_none_or(|v| record.acquisition.view == v)
            && self
                .modality
                .as_ref()
                .is_none_or(|m| record.source.modality.eq_ignore_ascii_case(m))
            && self.month_from.as_ref().is_none_or(|from| {
                !record.acquisition.month.is_empty()
                    && record.acquisition.month.as_str() >= from.as_str()
            })
            && self.month_to.as_ref().is_none_or(|to| {
                !record.acquisition.month.is_empty()
                    && record.acquisition.month.as_str() <= to.as_str()
            })
    }
}

/// A kept model input: `size x size` 8-bit pixels and the preprocessing that made them
/// (`cxrfed_imaging::PreprocessOptions::signature`, e.g. `cxrfed/pad/224`), so a model with
/// another preprocessing never trains on it or back-fills from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptInput {
    pub size: u32,
    pub pixels: Vec<u8>,
    pub preprocessing: String,
}

impl KeptInput {
    /// Whether a model whose preprocessing signature is `wanted` may read this input. An input
    /// of the first generation (no signature) was made by cxrfed's own pipeline at its size.
    pub fn suits(&self, wanted: &str) -> bool {
        if self.preprocessing.is_empty() {
            return wanted.starts_with("cxrfed/") && wanted.ends_with(&format!("/{}", self.size));
        }
        self.preprocessing == wanted
    }
}

/// The node's record store.
#[derive(Debug, Clone)]
pub struct RecordStore {
    db: sled::Db,
    records: sled::Tree,
    by_image: sled::Tree,
    /// Custom field definitions: name → JSON `FieldDefinition` (latest version).
    fields: sled::Tree,
    /// Human labels: `image_sha256 \0 field` → JSON `Annotation` (latest per image and field).
    annotations: sled::Tree,
    /// Privacy accounts by identity ([`ledger`]).
    ledger: sled::Tree,
    /// The audit chain ([`audit`]).
    audit: sled::Tree,
    meta: sled::Tree,
    /// Nonces of signed (federated) requests already charged: nonce → time.
    nonces: sled::Tree,
    /// The model input of every image (de-identified, downsampled, 8-bit): `image_sha256` →
    /// `size (u32 BE) ‖ size² bytes`. Federated training and back-fill read it; it never
    /// leaves the node.
    inputs: sled::Tree,
    /// Earlier model outputs of each record ([`history`]).
    history: sled::Tree,
    /// The site admin's settings ([`history`]).
    settings: sled::Tree,
    /// Instances pulled from a PACS, by the site's keyed reference to their SOP Instance UID
    /// (never the UID itself) → when.
    pulled: sled::Tree,
    commits: std::sync::Arc<GroupCommit>,
}

/// Group commit: one flush at a time, and a write already covered by a flush that started
/// after it does not flush again.
///
/// sled runs `flush_async` on its small IO thread pool. Many concurrent flushes can occupy
/// every pool thread while the buffer write they all wait for needs a pool thread too: the
/// node deadlocked that way under 32 concurrent extractions. Serialising flushes removes the
/// deadlock, and coalescing keeps one flush per burst instead of one per record.
#[derive(Debug, Default)]
pub(crate) struct GroupCommit {
    /// Tickets handed to writes, in order.
    written: std::sync::atomic::AtomicU64,
    /// The highest ticket known to be on disk; the lock is held while flushing.
    durable: tokio::sync::Mutex<u64>,
}

/// One `flush_async` at a time in the whole process. sled's IO thread pool and its
/// transaction lock are process-wide: with several stores in one process (a coordinator and
/// sites in a benchmark, tests) concurrent flushes of different stores exhausted the pool while
/// transactions blocked the runtime's workers — a deadlock. A node or coordinator process has
/// one store, for which this costs nothing.
static FLUSH_GATE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

impl GroupCommit {
    pub(crate) async fn flush(&self, db: &sled::Db) -> Result<()> {
        use std::sync::atomic::Ordering;
        let ticket = self.written.fetch_add(1, Ordering::SeqCst) + 1;
        let mut durable = self.durable.lock().await;
        if *durable >= ticket {
            return Ok(());
        }
        // Everything written up to here is covered by this flush.
        let covered = self.written.load(Ordering::SeqCst);
        let _gate = FLUSH_GATE.lock().await;
        db.flush_async().await?;
        *durable = covered;
        Ok(())
    }
}

impl RecordStore {
    /// Opens (or creates) the store in `path`, refusing stores written by a newer schema.
    pub fn open(path: &Path) -> Result<Self> {
        let db = open_db(path)?;
        let meta = db.open_tree(META)?;
        match meta.get(SCHEMA_KEY)? {
            Some(bytes) => {
                let found = u32::from_be_bytes(bytes.as_ref().try_into().map_err(|_| {
                    StoreError::Corrupt {
                        record_id: "meta".into(),
                        message: "schema_version is not 4 bytes".into(),
                    }
                })?);
                if found > SCHEMA_VERSION {
                    return Err(StoreError::NewerSchema {
                        found,
                        supported: SCHEMA_VERSION,
                    });
                }
            }
            None => {
                meta.insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes())?;
                db.flush()?;
            }
        }
        Ok(RecordStore {
            records: db.open_tree(RECORDS)?,
            by_image: db.open_tree(BY_IMAGE)?,
            fields: db.open_tree(FIELDS)?,
            annotations: db.open_tree(ANNOTATIONS)?,
            ledger: db.open_tree(ledger::LEDGER)?,
            audit: db.open_tree(audit::AUDIT)?,
            nonces: db.open_tree("signed_nonces")?,
            inputs: db.open_tree("model_inputs")?,
            history: db.open_tree(history::HISTORY)?,
            settings: db.open_tree(history::SETTINGS)?,
            pulled: db.open_tree("pulled_instances")?,
            meta,
            commits: Default::default(),
            db,
        })
    }

    pub(crate) fn encode(record: &Record) -> Result<Vec<u8>> {
        let mut bytes = Vec::with_capacity(1024);
        ciborium::into_writer(
            &Envelope {
                schema_version: record.schema_version,
                record: record.clone(),
            },
            &mut bytes,
        )
        .map_err(|e| StoreError::Encode(e.to_string()))?;
        Ok(bytes)
    }

    pub(crate) fn decode(record_id: &[u8], bytes: &[u8]) -> Result<Record> {
        let envelope: Envelope = ciborium::from_reader(bytes).map_err(|e| StoreError::Corrupt {
            record_id: String::from_utf8_lossy(record_id).into_owned(),
            message: e.to_string(),
        })?;
        if envelope.schema_version > SCHEMA_VERSION {
            return Err(StoreError::NewerSchema {
                found: envelope.schema_version,
                supported: SCHEMA_VERSION,
            });
        }
        Ok(envelope.record)
    }

    /// Stores `record` unless a record of the same image exists (then that one is returned),
    /// or replaces it when `force` is set. Durable when this returns.
    pub async fn insert(&self, record: Record, force: bool) -> Result<Inserted> {
        let value = Self::encode(&record)?;
        let outcome = (&self.records, &self.by_image).transaction(|(records, by_image)| {
            let hash = record.image_sha256.as_bytes();
            if let Some(existing_id) = by_image.get(hash)? {
                if !force {
                    let bytes = records.get(&existing_id)?.ok_or_else(|| {
                        ConflictableTransactionError::Abort(StoreError::Corrupt {
                            record_id: String::from_utf8_lossy(&existing_id).into_owned(),
                            message: "the image index points at a missing record".into(),
                        })
                    })?;
                    let existing = Self::decode(&existing_id, &bytes)
                        .map_err(ConflictableTransactionError::Abort)?;
                    return Ok(Inserted::Existing(existing));
                }
                records.remove(existing_id)?;
            }
            records.insert(record.record_id.as_bytes(), value.as_slice())?;
            by_image.insert(hash, record.record_id.as_bytes())?;
            Ok(Inserted::Created(record.clone()))
        });
        let outcome = outcome.map_err(|e| match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => StoreError::Sled(e),
        })?;
        if matches!(outcome, Inserted::Created(_)) {
            self.flush().await?;
        }
        Ok(outcome)
    }

    /// Keeps the model input of an image (8-bit, `size x size`) with the preprocessing that
    /// made it, replacing an earlier one. Made durable by the record insert that follows it.
    pub fn put_input(&self, image_sha256: &str, input: &KeptInput) -> Result<()> {
        let size = input.size as usize;
        if input.pixels.len() != size * size {
            return Err(StoreError::Encode(format!(
                "a {size}x{size} input needs {} bytes, got {}",
                size * size,
                input.pixels.len()
            )));
        }
        // size (u32, big endian) | pixels | preprocessing (UTF-8; absent in the first
        // generation's values).
        let mut value = Vec::with_capacity(4 + input.pixels.len() + input.preprocessing.len());
        value.extend_from_slice(&input.size.to_be_bytes());
        value.extend_from_slice(&input.pixels);
        value.extend_from_slice(input.preprocessing.as_bytes());
        self.inputs.insert(image_sha256.as_bytes(), value)?;
        Ok(())
    }

    /// Whether the instance with this keyed reference was pulled and stored before.
    pub fn is_pulled(&self, reference: &str) -> Result<bool> {
        Ok(self.pulled.contains_key(reference.as_bytes())?)
    }

    /// Notes that the instance with this keyed reference was pulled and stored. Not flushed
    /// on its own: a mark lost in a crash makes a rerun retrieve the instance again, which the
    /// image-hash de-duplication then stores nothing for.
    pub fn mark_pulled(&self, reference: &str) -> Result<()> {
        self.pulled.insert(
            reference.as_bytes(),
            chrono::Utc::now().to_rfc3339().as_bytes(),
        )?;
        Ok(())
    }

    /// The kept model input of an image (its preprocessing is empty for one kept by the first
    /// generation, which knew only cxrfed's own).
    pub fn input(&self, image_sha256: &str) -> Result<Option<KeptInput>> {
        let Some(value) = self.inputs.get(image_sha256.as_bytes())? else {
            return Ok(None);
        };
        let corrupt = || StoreError::Corrupt {
            record_id: format!("input {image_sha256}"),
            message: "truncated model input".into(),
        };
        let size = u32::from_be_bytes(
            value
                .get(..4)
                .ok_or_else(corrupt)?
                .try_into()
                .map_err(|_| corrupt())?,
        );
        let end = 4 + (size as usize) * (size as usize);
        let pixels = value.get(4..end).ok_or_else(corrupt)?.to_vec();
        let preprocessing = std::str::from_utf8(&value[end..])
            .map_err(|_| corrupt())?
            .to_string();
        Ok(Some(KeptInput {
            size,
            pixels,
            preprocessing,
        }))
    }

    /// Stores a custom field definition as the next version of its name; returns it as stored.
    pub async fn define_field(
        &self,
        definition: cxrfed_schema::custom::FieldDefinition,
    ) -> Result<cxrfed_schema::custom::FieldDefinition> {
        let stored = self.fields.transaction(|fields| {
            let previous = fields.get(definition.name.as_bytes())?.and_then(|b| {
                serde_json::from_slice::<cxrfed_schema::custom::FieldDefinition>(&b).ok()
            });
            let mut definition = definition.clone();
            definition.version = previous.map_or(1, |p| p.version + 1);
            let bytes = serde_json::to_vec(&definition).map_err(|e| {
                ConflictableTransactionError::Abort(StoreError::Encode(e.to_string()))
            })?;
            fields.insert(definition.name.as_bytes(), bytes)?;
            Ok(definition)
        });
        let stored = stored.map_err(|e| match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => StoreError::Sled(e),
        })?;
        self.flush().await?;
        Ok(stored)
    }

    /// Every custom field definition (latest versions), by name.
    pub fn custom_fields(&self) -> Result<Vec<cxrfed_schema::custom::FieldDefinition>> {
        self.fields
            .iter()
            .map(|item| {
                let (key, value) = item?;
                serde_json::from_slice(&value).map_err(|e| StoreError::Corrupt {
                    record_id: format!("field {}", String::from_utf8_lossy(&key)),
                    message: e.to_string(),
                })
            })
            .collect()
    }

    fn annotation_key(image_sha256: &str, field: &str) -> Vec<u8> {
        let mut key = image_sha256.as_bytes().to_vec();
        key.push(0);
        key.extend_from_slice(field.as_bytes());
        key
    }

    /// Stores a human label (replacing an earlier one for the same image and field). Durable
    /// when this returns.
    pub async fn annotate(&self, annotation: &cxrfed_schema::custom::Annotation) -> Result<()> {
        let bytes =
            serde_json::to_vec(annotation).map_err(|e| StoreError::Encode(e.to_string()))?;
        self.annotations.insert(
            Self::annotation_key(&annotation.image_sha256, &annotation.field),
            bytes,
        )?;
        self.flush().await
    }

    /// The labels of one image.
    pub fn annotations_of(
        &self,
        image_sha256: &str,
    ) -> Result<Vec<cxrfed_schema::custom::Annotation>> {
        let mut prefix = image_sha256.as_bytes().to_vec();
        prefix.push(0);
        self.annotations
            .scan_prefix(prefix)
            .map(|item| Self::decode_annotation(item?))
            .collect()
    }

    /// Every label.
    pub fn annotations(
        &self,
    ) -> impl Iterator<Item = Result<cxrfed_schema::custom::Annotation>> + '_ {
        self.annotations
            .iter()
            .map(|item| Self::decode_annotation(item?))
    }

    fn decode_annotation(
        (key, value): (sled::IVec, sled::IVec),
    ) -> Result<cxrfed_schema::custom::Annotation> {
        serde_json::from_slice(&value).map_err(|e| StoreError::Corrupt {
            record_id: format!("annotation {}", String::from_utf8_lossy(&key)),
            message: e.to_string(),
        })
    }

    /// Appends an answered question to a stored record (read-modify-write in one transaction, so
    /// concurrent questions are all kept). `None` when the record does not exist. Durable when
    /// this returns.
    pub async fn append_question(
        &self,
        record_id: &str,
        answer: cxrfed_schema::QuestionAnswer,
    ) -> Result<Option<Record>> {
        self.update(record_id, |record| record.questions.push(answer.clone()))
            .await
    }

    /// Replaces what a model filled in (findings, model fields, model id and weights hash),
    /// as a back-fill with a new model does; questions and everything read from the image stay.
    /// `None` when the record does not exist. Durable when this returns.
    pub async fn set_model_output(
        &self,
        record_id: &str,
        findings: Option<cxrfed_schema::Findings>,
        model_fields: std::collections::BTreeMap<String, String>,
        model_id: &str,
        model_sha256: &str,
    ) -> Result<Option<Record>> {
        let output = ModelOutput {
            model_id: model_id.to_string(),
            model_sha256: model_sha256.to_string(),
            findings,
            model_fields,
            replaced_at: String::new(),
        };
        self.replace_model_output(record_id, &output).await
    }

    /// Read-modify-write of one record in a transaction (retried on conflict, so `edit` may
    /// run more than once).
    async fn update(&self, record_id: &str, edit: impl Fn(&mut Record)) -> Result<Option<Record>> {
        let outcome = self.records.transaction(|records| {
            let Some(bytes) = records.get(record_id.as_bytes())? else {
                return Ok(None);
            };
            let mut record = Self::decode(record_id.as_bytes(), &bytes)
                .map_err(ConflictableTransactionError::Abort)?;
            edit(&mut record);
            let value = Self::encode(&record).map_err(ConflictableTransactionError::Abort)?;
            records.insert(record_id.as_bytes(), value.as_slice())?;
            Ok(Some(record))
        });
        let outcome = outcome.map_err(|e| match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => StoreError::Sled(e),
        })?;
        if outcome.is_some() {
            self.flush().await?;
        }
        Ok(outcome)
    }

    pub fn get(&self, record_id: &str) -> Result<Option<Record>> {
        self.records
            .get(record_id.as_bytes())?
            .map(|bytes| Self::decode(record_id.as_bytes(), &bytes))
            .transpose()
    }

    pub fn get_by_image(&self, image_sha256: &str) -> Result<Option<Record>> {
        match self.by_image.get(image_sha256.as_bytes())? {
            Some(id) => self.get(&String::from_utf8_lossy(&id)),
            None => Ok(None),
        }
    }

    /// Up to `limit` records after `after` (exclusive) in creation order that pass `filter`,
    /// and whether more records remain to be scanned.
    pub fn list(
        &self,
        after: Option<&str>,
        limit: usize,
        filter: &RecordFilter,
    ) -> Result<(Vec<Record>, bool)> {
        let range = match after {
            Some(after) => {
                let mut start = after.as_bytes().to_vec();
                start.push(0);
                self.records.range(start..)
            }
            None => self.records.iter(),
        };
        let mut out = Vec::new();
        for item in range {
            let (key, value) = item?;
            let record = Self::decode(&key, &value)?;
            if filter.matches(&record) {
                if out.len() == limit {
                    return Ok((out, true));
                }
                out.push(record);
            }
        }
        Ok((out, false))
    }

    pub fn count(&self) -> usize {
        self.records.len()
    }

    /// Every record, in creation order (for building indexes and exports).
    pub fn iter(&self) -> impl Iterator<Item = Result<Record>> + '_ {
        self.records.iter().map(|item| {
            let (key, value) = item?;
            Self::decode(&key, &value)
        })
    }

    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    /// Makes every write made before this call durable (see [`GroupCommit`]).
    pub async fn flush(&self) -> Result<()> {
        self.commits.flush(&self.db).await
    }

    /// Checks every record decodes and the image index is consistent; returns the count.
    pub fn verify(&self) -> Result<usize> {
        let mut n = 0;
        for item in self.records.iter() {
            let (key, value) = item?;
            let record = Self::decode(&key, &value)?;
            match self.by_image.get(record.image_sha256.as_bytes())? {
                Some(id) if id.as_ref() == key.as_ref() => {}
                _ => {
                    return Err(StoreError::Corrupt {
                        record_id: record.record_id,
                        message: "not reachable from the image index".into(),
                    });
                }
            }
            n += 1;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cxrfed_schema::{Acquisition, NO_MODEL, Patient, Source, View};

    fn record(id: &str, hash: &str, view: View, month: &str) -> Record {
        Record {
            record_id: id.to_string(),
            image_sha256: hash.to_string(),
            schema_version: SCHEMA_VERSION,
            model_id: NO_MODEL.to_string(),
            model_sha256: String::new(),
            created_at: chrono::Utc::now(),
            processing_ms: 1.0,
            request_id: "r".into(),
            source: Source {
                modality: "CR".into(),
                ..Source::default()
            },
            patient: Patient::default(),
            acquisition: Acquisition {
                month: month.to_string(),
                view,
            },
            findings: None,
            processing_notes: vec![],
            questions: Vec::new(),
            annotations: Vec::new(),
            custom_fields: Default::default(),
            model_fields: Default::default(),
        }
    }

    /// A kept input reads back with its preprocessing; one of the first generation (no
    /// signature) reads as cxrfed's own pipeline at its size; a model with another
    /// preprocessing may not read either.
    #[test]
    fn kept_inputs_carry_their_preprocessing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = RecordStore::open(dir.path()).expect("open");
        let kept = KeptInput {
            size: 4,
            pixels: (0..16).collect(),
            preprocessing: "torchxrayvision/center-crop/4".into(),
        };
        store.put_input("a", &kept).expect("put");
        let back = store.input("a").expect("read").expect("kept");
        assert_eq!(back, kept);
        assert!(back.suits("torchxrayvision/center-crop/4"));
        assert!(!back.suits("cxrfed/pad/4"));
        // The first generation's value: size and pixels only.
        let mut legacy = 4u32.to_be_bytes().to_vec();
        legacy.extend(0..16u8);
        store.inputs.insert("b", legacy).expect("insert");
        let old = store.input("b").expect("read").expect("kept");
        assert_eq!(old.preprocessing, "");
        assert!(old.suits("cxrfed/pad/4") && old.suits("cxrfed/center-crop/4"));
        assert!(!old.suits("cxrfed/pad/224") && !old.suits("torchxrayvision/center-crop/4"));
        assert!(
            store
                .put_input("c", &KeptInput { size: 5, ..kept })
                .is_err(),
            "size mismatch"
        );
        store
            .inputs
            .insert("d", vec![0, 0, 0, 9, 1])
            .expect("insert");
        assert!(store.input("d").is_err(), "truncated");
    }

    /// Hundreds of concurrent durable inserts complete (no flush pile-up on sled's IO pool) and
    /// all survive a reopen.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_inserts_all_complete_and_persist() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = RecordStore::open(dir.path()).expect("open");
        let tasks: Vec<_> = (0..300)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    let r = record(&format!("{i:04}"), &format!("hash{i}"), View::Pa, "2004-08");
                    store.insert(r, false).await
                })
            })
            .collect();
        for task in tasks {
            tokio::time::timeout(std::time::Duration::from_secs(120), task)
                .await
                .expect("insert completes")
                .expect("join")
                .expect("insert");
        }
        drop(store);
        let store = RecordStore::open(dir.path()).expect("reopen");
        assert_eq!(store.count(), 300);
    }

    #[tokio::test]
    async fn same_image_is_stored_once_unless_forced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = RecordStore::open(dir.path()).expect("open");
        let a = record("01", "h1", View::Pa, "2004-08");
        assert!(matches!(
            store.insert(a.clone(), false).await.expect("insert"),
            Inserted::Created(_)
        ));
        let again = record("02", "h1", View::Pa, "2004-08");
        assert_eq!(
            store.insert(again.clone(), false).await.expect("insert"),
            Inserted::Existing(a)
        );
        assert_eq!(store.count(), 1);
        assert!(matches!(
            store.insert(again.clone(), true).await.expect("insert"),
            Inserted::Created(_)
        ));
        assert_eq!(store.count(), 1);
        assert_eq!(store.get_by_image("h1").expect("get"), Some(again));
        assert_eq!(store.verify().expect("verify"), 1);
    }

    #[tokio::test]
    async fn list_pages_and_filters() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = RecordStore::open(dir.path()).expect("open");
        for i in 0..10 {
            let view = if i % 2 == 0 { View::Pa } else { View::Ap };
            let r = record(
                &format!("{i:02}"),
                &format!("h{i}"),
                view,
                &format!("2020-{:02}", i + 1),
            );
            store.insert(r, false).await.expect("insert");
        }
        let (page, more) = store.list(None, 3, &RecordFilter::default()).expect("list");
        assert_eq!(
            page.iter()
                .map(|r| r.record_id.as_str())
                .collect::<Vec<_>>(),
            ["00", "01", "02"]
        );
        assert!(more);
        let (page, _) = store
            .list(Some("02"), 3, &RecordFilter::default())
            .expect("list");
        assert_eq!(page[0].record_id, "03");
        let filter = RecordFilter {
            view: Some(View::Pa),
            month_from: Some("2020-03".into()),
            month_to: Some("2020-07".into()),
            ..RecordFilter::default()
        };
        let (page, more) = store.list(None, 100, &filter).expect("list");
        assert_eq!(
            page.iter()
                .map(|r| r.record_id.as_str())
                .collect::<Vec<_>>(),
            ["02", "04", "06"]
        );
        assert!(!more);
    }

    #[tokio::test]
    async fn refuses_a_store_from_a_newer_schema() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let db = sled::open(dir.path()).expect("sled");
            db.open_tree(META)
                .expect("meta")
                .insert(SCHEMA_KEY, &(SCHEMA_VERSION + 1).to_be_bytes())
                .expect("insert");
            db.flush().expect("flush");
        }
        let err = RecordStore::open(dir.path()).expect_err("must refuse");
        assert!(matches!(err, StoreError::NewerSchema { .. }), "{err}");
        assert!(err.to_string().contains("Upgrade cxrfed"));
    }

    #[tokio::test]
    async fn records_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = RecordStore::open(dir.path()).expect("open");
            store
                .insert(record("01", "h1", View::Pa, ""), false)
                .await
                .expect("insert");
        }
        let store = RecordStore::open(dir.path()).expect("reopen");
        assert_eq!(store.count(), 1);
        assert_eq!(store.verify().expect("verify"), 1);
    }
}
