//! The model registry and the job documents: weights as content-addressed files under
//! `models/` (written durably before any document names them), documents in the store's
//! `jobs` and `models` trees, written together in one transaction when they change together.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::{SecondsFormat, Utc};
use cxrfed_fl::{BUNDLED_VERSION, ModelCard, ModelFormat};
use cxrfed_store::{CoordinatorStore, Doc};
use sha2::{Digest, Sha256};

use super::docs::{Entry, JobDoc, ModelDoc};
use crate::error::{CoordinatorError, Result};

const BUNDLED_CARD: &[u8] = include_bytes!("../../../../models/tiny-phantom-v1/card.json");
const BUNDLED_WEIGHTS: &[u8] =
    include_bytes!("../../../../models/tiny-phantom-v1/model.safetensors");

/// The largest model the registry takes (bytes).
pub const MAX_MODEL_BYTES: usize = 2 << 30;

pub(crate) fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The registry's documents and weight files.
#[derive(Debug, Clone)]
pub struct Registry {
    store: CoordinatorStore,
    models_dir: PathBuf,
}

impl Registry {
    pub fn new(store: CoordinatorStore, models_dir: PathBuf) -> Registry {
        Registry { store, models_dir }
    }

    fn blob_path(&self, sha: &str) -> PathBuf {
        self.models_dir.join(format!("{sha}.safetensors"))
    }

    /// Writes a content-addressed weights file (durable, atomic); returns its sha256.
    pub fn put_blob(&self, bytes: &[u8]) -> Result<String> {
        let sha = hex::encode(Sha256::digest(bytes));
        let dir = &self.models_dir;
        let io = |path: &Path, e: std::io::Error| {
            CoordinatorError::Internal(format!("{}: {e}", path.display()))
        };
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let path = self.blob_path(&sha);
        if path.exists() {
            return Ok(sha);
        }
        let mut file = tempfile::NamedTempFile::new_in(dir).map_err(|e| io(dir, e))?;
        file.write_all(bytes)
            .and_then(|()| file.as_file().sync_all())
            .map_err(|e| io(file.path(), e))?;
        file.persist(&path).map_err(|e| io(&path, e.error))?;
        Ok(sha)
    }

    /// Reads a weights file and checks its sha256.
    pub fn get_blob(&self, sha: &str) -> Result<Vec<u8>> {
        let path = self.blob_path(sha);
        let bytes = std::fs::read(&path)
            .map_err(|e| CoordinatorError::Internal(format!("{}: {e}", path.display())))?;
        let found = hex::encode(Sha256::digest(&bytes));
        if found != sha {
            return Err(CoordinatorError::Internal(format!(
                "{}: sha256 {found} does not match its name",
                path.display()
            )));
        }
        Ok(bytes)
    }

    fn read_doc<T: serde::de::DeserializeOwned>(&self, kind: Doc, key: &str) -> Result<Option<T>> {
        self.store
            .doc(kind, key)?
            .map(|v| serde_json::from_value(v).map_err(CoordinatorError::internal))
            .transpose()
    }

    /// Every document of a kind, oldest first.
    fn read_docs<T: serde::de::DeserializeOwned>(
        &self,
        kind: Doc,
        created_at: impl Fn(&T) -> &str,
    ) -> Result<Vec<T>> {
        let mut all: Vec<T> = Vec::new();
        for value in self.store.docs(kind)? {
            match serde_json::from_value(value) {
                Ok(doc) => all.push(doc),
                Err(e) => tracing::error!(?kind, error = %e, "an unreadable document; skipped"),
            }
        }
        all.sort_by(|a, b| created_at(a).cmp(created_at(b)));
        Ok(all)
    }

    pub fn model(&self, version: &str) -> Result<Option<ModelDoc>> {
        self.read_doc(Doc::Model, version)
    }

    /// The model `version`, or NOT_FOUND.
    pub fn require_model(&self, version: &str) -> Result<ModelDoc> {
        self.model(version)?
            .ok_or_else(|| CoordinatorError::NotFound(format!("no model version {version:?}")))
    }

    pub fn models(&self) -> Result<Vec<ModelDoc>> {
        self.read_docs(Doc::Model, |m: &ModelDoc| m.created_at.as_str())
    }

    pub fn job(&self, job_id: &str) -> Result<Option<JobDoc>> {
        self.read_doc(Doc::Job, job_id)
    }

    /// The job `job_id`, or NOT_FOUND.
    pub fn require_job(&self, job_id: &str) -> Result<JobDoc> {
        self.job(job_id)?
            .ok_or_else(|| CoordinatorError::NotFound(format!("no job {job_id:?}")))
    }

    pub fn jobs(&self) -> Result<Vec<JobDoc>> {
        self.read_docs(Doc::Job, |j: &JobDoc| j.created_at.as_str())
    }

    /// The version the study admin promoted last, if any.
    pub fn promoted(&self) -> Result<Option<ModelDoc>> {
        Ok(self
            .models()?
            .into_iter()
            .filter(|m| !m.promoted_at.is_empty())
            .max_by(|a, b| a.promoted_at.cmp(&b.promoted_at)))
    }

    /// Writes documents in one transaction (durable when this returns).
    pub(crate) async fn commit(&self, entries: &[Entry]) -> Result<()> {
        Ok(self.store.put_docs(entries).await?)
    }

    pub(crate) async fn save_job(&self, job: &JobDoc) -> Result<()> {
        self.commit(&[job.entry()?]).await
    }

    pub(crate) async fn save_model(&self, doc: &ModelDoc) -> Result<()> {
        self.commit(&[doc.entry()?]).await
    }

    /// Adds a model brought from elsewhere (a `cxrfed model train` output, another study's
    /// model) after checking that its card and weights belong together: every head of the
    /// label map has its linear layer, every tensor is f32.
    pub async fn import(&self, version: &str, card_json: &str, weights: &[u8]) -> Result<ModelDoc> {
        if !cxrfed_schema::valid_model_version(version) {
            return Err(CoordinatorError::InvalidArgument(format!(
                "version {version:?}: letters, digits, '-', '_' and '.' (not first), up to 128"
            )));
        }
        if self.model(version)?.is_some() {
            return Err(CoordinatorError::AlreadyExists(format!(
                "version {version} is already in the registry"
            )));
        }
        let mut card = ModelCard::parse(card_json.as_bytes()).map_err(CoordinatorError::invalid)?;
        if card.format != ModelFormat::Safetensors {
            return Err(CoordinatorError::InvalidArgument(
                "only safetensors models (a cxrfed architecture) can be trained federatedly".into(),
            ));
        }
        if card.architecture.trim().is_empty() || card.input.size == 0 {
            return Err(CoordinatorError::InvalidArgument(
                "the model card names no architecture or input size".into(),
            ));
        }
        let names: HashSet<String> = cxrfed_fl::tensor::f32_names(weights)
            .map_err(CoordinatorError::invalid)?
            .into_iter()
            .collect();
        if let Some(missing) = card
            .heads()
            .iter()
            .find(|h| !names.contains(&format!("heads.{h}.weight")))
        {
            return Err(CoordinatorError::InvalidArgument(format!(
                "the weights have no layer for head {missing:?} (do they match the card?)"
            )));
        }
        let sha = self.put_blob(weights)?;
        card.model_id = version.to_string();
        card.weights = "model.safetensors".into();
        card.weights_sha256 = sha.clone();
        let doc = ModelDoc {
            version: version.to_string(),
            sha256: sha,
            algorithm: "imported".into(),
            created_at: now(),
            size_bytes: weights.len() as u64,
            card,
            ..Default::default()
        };
        self.save_model(&doc).await?;
        Ok(doc)
    }

    /// Registers the bundled model as the first registry version (once).
    pub async fn ensure_bundled(&self) -> Result<()> {
        if self.model(BUNDLED_VERSION)?.is_some() {
            return Ok(());
        }
        let sha = self.put_blob(BUNDLED_WEIGHTS)?;
        let mut card = ModelCard::parse(BUNDLED_CARD)
            .map_err(|e| CoordinatorError::Internal(format!("bundled card: {e}")))?;
        card.model_id = BUNDLED_VERSION.into();
        let doc = ModelDoc {
            version: BUNDLED_VERSION.into(),
            sha256: sha,
            algorithm: "centralised (phantoms)".into(),
            created_at: now(),
            size_bytes: BUNDLED_WEIGHTS.len() as u64,
            card,
            ..Default::default()
        };
        self.save_model(&doc).await
    }
}
