//! A running node's state, and the one way to build it: [`Node::builder`] opens nothing
//! itself but takes the configuration, the open store and the pipeline, then indexes the store
//! into the statistics columns ("columns follow the store": the index is always rebuilt from
//! the store, and every stored change updates both). The server and the benchmarks build a
//! node the same way. Nothing here is process-wide: two nodes in one process share nothing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::time::Instant;

use chrono::{DateTime, Utc};
use cxrfed_proto::v1 as pb;
use cxrfed_schema::custom::FieldDefinition;
use cxrfed_schema::lexicon::Lexicon;
use cxrfed_stats::Columns;
use cxrfed_store::{Inserted, RecordStore, StoreError};
use parking_lot::{Mutex, RwLock};

use crate::columns::SharedColumns;
use tokio_util::sync::CancellationToken;
use tracing::Span;

use crate::config::NodeConfig;
use crate::error::NodeError;
use crate::ingest::Jobs;
use crate::pipeline::Pipeline;
use crate::privacy::DpSettings;

/// Shared state of one running node.
#[derive(Debug)]
pub struct Node {
    config: NodeConfig,
    store: RecordStore,
    pipeline: Pipeline,
    started_at: DateTime<Utc>,
    started: Instant,
    in_flight: AtomicU32,
    shutdown: CancellationToken,
    columns: SharedColumns,
    study: String,
    dp: DpSettings,
    tls: Option<Arc<cxrfed_auth::ReloadingTls>>,
    lexicon: Lexicon,
    jobs: Jobs,
    custom_fields: RwLock<BTreeMap<String, FieldDefinition>>,
    /// The last back-fill's progress, for `Status`.
    backfill: Mutex<Option<pb::BackfillStatus>>,
    /// The coordinator link's state and last error, for `Status`.
    link: Mutex<Option<pb::CoordinatorLink>>,
    /// One federated round at a time: training takes the node's cores.
    training_turn: tokio::sync::Mutex<()>,
    /// Secure aggregation: rounds waiting for their key set, by task id.
    mask_waiters:
        Mutex<std::collections::HashMap<String, tokio::sync::oneshot::Sender<pb::MaskPeers>>>,
    /// The DICOM receiver's counters (reported once it runs).
    receiver: Arc<crate::receiver::ReceiverStats>,
}

/// Builds a [`Node`]; see [`Node::builder`].
#[derive(Debug)]
pub struct NodeBuilder {
    config: NodeConfig,
    store: RecordStore,
    pipeline: Pipeline,
    dp: DpSettings,
    study: String,
    tls: Option<Arc<cxrfed_auth::ReloadingTls>>,
    lexicon: Option<Lexicon>,
    shutdown: CancellationToken,
    columns: Option<Columns>,
}

impl NodeBuilder {
    /// The study the node serves (from its certificate).
    pub fn study(mut self, study: impl Into<String>) -> Self {
        self.study = study.into();
        self
    }

    /// The node's TLS material (None under --insecure-dev): it verifies the certificates of
    /// researchers who sign federated queries.
    pub fn tls(mut self, tls: Option<Arc<cxrfed_auth::ReloadingTls>>) -> Self {
        self.tls = tls;
        self
    }

    /// The question lexicon for `Ask` [default: the bundled one].
    pub fn lexicon(mut self, lexicon: Lexicon) -> Self {
        self.lexicon = Some(lexicon);
        self
    }

    pub fn shutdown(mut self, shutdown: CancellationToken) -> Self {
        self.shutdown = shutdown;
        self
    }

    /// Statistics columns built by the caller instead of from the store. Only for benchmarks
    /// that measure releases over synthetic records they never store.
    pub fn synthetic_columns(mut self, columns: Columns) -> Self {
        self.columns = Some(columns);
        self
    }

    /// Indexes the store (a blocking scan: call from a blocking thread at start-up) and builds
    /// the node.
    pub fn build(self) -> Result<Node, NodeError> {
        let started = Instant::now();
        let fields = self.store.custom_fields()?;
        let columns = match self.columns {
            Some(columns) => columns,
            None => index(&self.store, &fields)?,
        };
        tracing::info!(
            records = columns.len(),
            elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
            "columnar statistics index built"
        );
        let lexicon = match self.lexicon {
            Some(lexicon) => lexicon,
            None => Lexicon::bundled().map_err(|e| NodeError::Internal(format!("lexicon: {e}")))?,
        };
        Ok(Node {
            config: self.config,
            store: self.store,
            pipeline: self.pipeline,
            started_at: Utc::now(),
            started: Instant::now(),
            in_flight: AtomicU32::new(0),
            shutdown: self.shutdown,
            columns: SharedColumns::new(columns),
            study: self.study,
            dp: self.dp,
            tls: self.tls,
            lexicon,
            jobs: Jobs::default(),
            custom_fields: RwLock::new(fields.into_iter().map(|f| (f.name.clone(), f)).collect()),
            backfill: Mutex::new(None),
            link: Mutex::new(None),
            training_turn: tokio::sync::Mutex::new(()),
            mask_waiters: Mutex::default(),
            receiver: Arc::default(),
        })
    }
}

/// The statistics columns of a store: every record, every custom field, every annotation that
/// still fits its field's definition.
pub fn index(store: &RecordStore, fields: &[FieldDefinition]) -> Result<Columns, StoreError> {
    let mut columns = Columns::new();
    for record in store.iter() {
        columns.upsert(&record?);
    }
    for definition in fields {
        columns.define_custom(definition);
    }
    for annotation in store.annotations() {
        let annotation = annotation?;
        let fits = match fields.iter().find(|f| f.name == annotation.field) {
            Some(definition) => definition.check_value(&annotation.value).is_ok(),
            None => cxrfed_schema::flat::field(&annotation.field).is_some(),
        };
        if fits {
            columns.annotate(
                &annotation.image_sha256,
                &annotation.field,
                &annotation.value,
            );
        }
    }
    Ok(columns)
}

impl Node {
    /// A node over an open store with its pipeline and DP settings; see [`NodeBuilder`].
    pub fn builder(
        config: NodeConfig,
        store: RecordStore,
        pipeline: Pipeline,
        dp: DpSettings,
    ) -> NodeBuilder {
        NodeBuilder {
            config,
            store,
            pipeline,
            dp,
            study: String::new(),
            tls: None,
            lexicon: None,
            shutdown: CancellationToken::new(),
            columns: None,
        }
    }

    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    pub fn store(&self) -> &RecordStore {
        &self.store
    }

    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    pub fn started_at(&self) -> DateTime<Utc> {
        self.started_at
    }

    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    /// Requests being served now.
    /// The operators' metrics (`/metrics`).
    pub fn metrics(&self) -> &Arc<cxrfed_server::metrics::Metrics> {
        self.pipeline.metrics()
    }

    pub fn in_flight(&self) -> &AtomicU32 {
        &self.in_flight
    }

    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// The columnar form of the stored records, updated after every stored change.
    pub fn columns(&self) -> &SharedColumns {
        &self.columns
    }

    /// The study this node serves (from its certificate).
    pub fn study(&self) -> &str {
        &self.study
    }

    pub fn dp(&self) -> &DpSettings {
        &self.dp
    }

    pub fn tls(&self) -> Option<&Arc<cxrfed_auth::ReloadingTls>> {
        self.tls.as_ref()
    }

    pub fn lexicon(&self) -> &Lexicon {
        &self.lexicon
    }

    /// Ingest jobs started on this node (newest last).
    pub fn jobs(&self) -> &Jobs {
        &self.jobs
    }

    /// Custom field definitions (latest versions), by name.
    pub fn custom_fields(&self) -> &RwLock<BTreeMap<String, FieldDefinition>> {
        &self.custom_fields
    }

    pub fn backfill_status(&self) -> Option<pb::BackfillStatus> {
        self.backfill.lock().clone()
    }

    pub(crate) fn set_backfill(&self, status: pb::BackfillStatus) {
        *self.backfill.lock() = Some(status);
    }

    /// Waits for this node's turn to train (one federated round at a time).
    /// A round waits for its key set (secure aggregation).
    pub(crate) fn await_mask_peers(
        &self,
        task_id: &str,
    ) -> tokio::sync::oneshot::Receiver<pb::MaskPeers> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.mask_waiters.lock().insert(task_id.to_string(), tx);
        rx
    }

    pub(crate) fn forget_mask_peers(&self, task_id: &str) {
        self.mask_waiters.lock().remove(task_id);
    }

    /// The coordinator's key set for a waiting round; one for no waiting round is dropped.
    pub(crate) fn deliver_mask_peers(&self, peers: pb::MaskPeers) {
        match self.mask_waiters.lock().remove(&peers.task_id) {
            Some(tx) => {
                let _ = tx.send(peers);
            }
            None => tracing::debug!(
                task_id = peers.task_id.as_str(),
                "a key set for no waiting round; ignored"
            ),
        }
    }

    /// Records the coordinator link's state (`error` empty when connected).
    pub fn set_link(&self, url: &str, connected: bool, error: String) {
        let mut link = self.link.lock();
        let changed = link
            .as_ref()
            .is_none_or(|l| l.connected != connected || l.last_error != error);
        if changed {
            *link = Some(pb::CoordinatorLink {
                url: url.to_string(),
                connected,
                last_error: error,
                since: Some(prost_types::Timestamp {
                    seconds: Utc::now().timestamp(),
                    nanos: 0,
                }),
            });
        }
    }

    pub fn receiver_stats(&self) -> &Arc<crate::receiver::ReceiverStats> {
        &self.receiver
    }

    pub fn link(&self) -> Option<pb::CoordinatorLink> {
        self.link.lock().clone()
    }

    pub(crate) async fn training_turn(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.training_turn.lock().await
    }

    /// Decodes, runs the model and stores one image (the path of `Extract` and of ingest
    /// jobs). Returns the record and whether it was created.
    pub async fn extract_and_store(
        &self,
        bytes: Vec<u8>,
        filename: &str,
        force: bool,
        request_id: String,
    ) -> Result<(cxrfed_schema::Record, bool), NodeError> {
        let mut extraction = match self.pipeline.extract(bytes, request_id).await {
            Ok(extraction) => extraction,
            Err(NodeError::Imaging(cxrfed_imaging::ImagingError::Quarantined(reason))) => {
                // A refusal under the de-identification policy is audited (no file name: PACS
                // exports often name files after the patient).
                let event = crate::privacy::event(
                    None,
                    "Quarantine",
                    format!("image refused: {reason}"),
                    String::new(),
                );
                if let Err(e) = self.store.audit(event).await {
                    tracing::warn!(error = %e, "cannot audit a quarantined image");
                }
                tracing::warn!(
                    reason = reason.as_str(),
                    "image quarantined; nothing stored"
                );
                return Err(NodeError::Imaging(
                    cxrfed_imaging::ImagingError::Quarantined(reason),
                ));
            }
            Err(e) => return Err(e),
        };
        if let Some(note) = extension_note(filename, extraction.record.source.format) {
            extraction.record.processing_notes.push(note);
        }
        let span = Span::current();
        span.record("image_sha256", extraction.record.image_sha256.as_str());
        let storing = std::time::Instant::now();
        if let Some(input) = &extraction.input {
            self.store
                .put_input(&extraction.record.image_sha256, input)?;
        }
        let inserted = self.store.insert(extraction.record, force).await?;
        self.metrics()
            .observe_stage("store", storing.elapsed().as_secs_f64());
        let (record, created) = match inserted {
            Inserted::Created(record) => {
                // The store is the source of truth; the columns follow it (and are rebuilt from
                // it at start-up, so a crash between the two loses nothing).
                let indexed = record.clone();
                self.columns.update(move |c| c.upsert(&indexed)).await?;
                (record, true)
            }
            Inserted::Existing(record) => (record, false),
        };
        span.record("record_id", record.record_id.as_str());
        Ok((record, created))
    }

    /// A stored record with its image's annotations attached.
    pub fn with_annotations(
        &self,
        mut record: cxrfed_schema::Record,
    ) -> Result<cxrfed_schema::Record, NodeError> {
        record.annotations = self.store.annotations_of(&record.image_sha256)?;
        let fields = self.custom_fields.read();
        record.custom_fields = fields
            .keys()
            .map(|name| {
                let value = record
                    .annotations
                    .iter()
                    .find(|a| &a.field == name)
                    .map(|a| a.value.clone());
                (name.clone(), value)
            })
            .collect();
        Ok(record)
    }
}

/// A note when the file name's extension disagrees with the sniffed content. Only the
/// extension is kept: file names from PACS exports often contain patient names.
fn extension_note(filename: &str, format: Option<cxrfed_schema::ImageFormat>) -> Option<String> {
    use cxrfed_schema::ImageFormat;
    let extension = std::path::Path::new(filename)
        .extension()?
        .to_str()?
        .to_ascii_lowercase();
    let claimed = match extension.as_str() {
        "dcm" | "dicom" | "dic" => ImageFormat::Dicom,
        "png" => ImageFormat::Png,
        "jpg" | "jpeg" => ImageFormat::Jpeg,
        _ => return None,
    };
    let actual = format?;
    (claimed != actual).then(|| {
        format!(
            "content is {}; the file name's extension (.{extension}) was ignored",
            actual.as_str().to_uppercase()
        )
    })
}
