//! Federated fine-tuning: jobs, rounds, the round log and the model registry.
//!
//! A job runs rounds. In each round the coordinator sends every participating site a
//! [`pb::TrainTask`] and the global weights in [`cxrfed_proto::CHUNK_BYTES`] chunks (slices of one shared
//! buffer) over its link; the site evaluates the incoming model on its held-out records, trains
//! on its own annotated records and streams back its update (a weights delta) in chunks, then
//! its report. Update chunks are spooled to disk as they arrive; an update is folded into the
//! round's [`Aggregator`] once complete and verified (size, sha256, shape), so memory is the
//! accumulator plus one update, whatever the number of sites.
//!
//! A round succeeds when at least `min_sites` updates arrived before the deadline; stragglers
//! are dropped. A failed round is retried (`attempts`), then the job fails with the reason.
//!
//! Crash safety: the job document (with its round log) and the registry live in the
//! coordinator's sled store; weights are content-addressed files under `models/`. A round's
//! new model version and the job's pointer to it are committed in one transaction after the
//! weights file is durable, so a coordinator killed mid-round resumes at that round with the
//! last committed global weights. Task ids carry the job, round, attempt and site: an update
//! for an earlier attempt, a late one, or a second one from the same site is recognised and
//! ignored.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{SecondsFormat, Utc};
use cxrfed_proto::v1 as pb;
use cxrfed_store::Doc;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::aggregate::{self, AdamMoments, Aggregator, Algorithm, ServerAdam};
use crate::service::{CoordinatorState, hex};

/// The model every registry starts with: the bundled tiny model trained on phantoms.
pub const BUNDLED_VERSION: &str = "tiny-phantom-v1";
const BUNDLED_CARD: &[u8] = include_bytes!("../../../models/tiny-phantom-v1/card.json");
const BUNDLED_WEIGHTS: &[u8] = include_bytes!("../../../models/tiny-phantom-v1/model.safetensors");

/// The largest update a site may send (bytes).
const MAX_UPDATE_BYTES: u64 = 2 << 30;

/// A job file (`cxrfed train --job job.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobSpec {
    /// A free-text name.
    pub name: String,
    /// The registry version the job starts from.
    pub base: String,
    /// Heads to train (empty: every head of the base model, or only the new heads when the
    /// job adds some).
    pub heads: Vec<String>,
    /// Heads the job adds for researcher-defined fields (initialised at random).
    pub new_heads: Vec<NewHead>,
    /// heads, last_block or all.
    pub trainable: String,
    /// fedavg, fedprox or fedadam.
    pub algorithm: String,
    /// FedProx's proximal weight.
    pub mu: f64,
    /// FedAdam's server learning rate.
    pub server_learning_rate: f64,
    pub rounds: u32,
    pub local_epochs: u32,
    /// Optimiser steps per round at each site (0: whole epochs).
    pub local_steps: u32,
    pub batch_size: u32,
    pub learning_rate: f64,
    /// Sites asked (empty: every connected site).
    pub sites: Vec<String>,
    pub min_sites: u32,
    pub round_deadline_secs: u64,
    /// Tries per round before the job fails.
    pub attempts: u32,
    /// DP-FedAvg: clip each site's update to this L2 norm (0: off)...
    pub clip: f64,
    /// ...and add Gaussian noise of std `noise_multiplier * clip` to the sum.
    pub noise_multiplier: f64,
    pub dp_delta: f64,
    pub augment: bool,
    pub seed: u64,
}

impl Default for JobSpec {
    fn default() -> Self {
        JobSpec {
            name: String::new(),
            base: BUNDLED_VERSION.into(),
            heads: Vec::new(),
            new_heads: Vec::new(),
            trainable: "heads".into(),
            algorithm: "fedavg".into(),
            mu: 0.01,
            server_learning_rate: 0.01,
            rounds: 3,
            local_epochs: 1,
            local_steps: 0,
            batch_size: 16,
            learning_rate: 1e-3,
            sites: Vec::new(),
            min_sites: 1,
            round_deadline_secs: 600,
            attempts: 2,
            clip: 0.0,
            noise_multiplier: 0.0,
            dp_delta: 1e-5,
            augment: false,
            seed: 1,
        }
    }
}

/// A head for a custom field: `kind` binary, categorical (with `categories`) or regression
/// (with `min` and `max`), as the node defines the field (bool, categorical, numeric).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewHead {
    pub name: String,
    pub kind: String,
    #[serde(default)]
    pub categories: Vec<String>,
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
}

impl NewHead {
    /// The label-map entry (as the model card writes heads) and its output width.
    fn label_map_entry(&self) -> Result<(serde_json::Value, usize), String> {
        if !cxrfed_schema::custom::valid_name(&self.name) {
            return Err(format!("new head {:?}: a snake_case field name", self.name));
        }
        match self.kind.as_str() {
            "binary" | "bool" => Ok((serde_json::json!({"name": self.name, "kind": "binary"}), 1)),
            "categorical" if self.categories.len() >= 2 => Ok((
                serde_json::json!({"name": self.name, "kind": "categorical", "categories": self.categories}),
                self.categories.len(),
            )),
            "regression" | "numeric" => match (self.min, self.max) {
                (Some(min), Some(max)) if min.is_finite() && max.is_finite() && min < max => Ok((
                    serde_json::json!({"name": self.name, "kind": "regression", "min": min, "max": max}),
                    1,
                )),
                _ => Err(format!(
                    "new head {:?}: regression needs min < max",
                    self.name
                )),
            },
            other => Err(format!(
                "new head {:?}: kind {other:?} (binary, categorical with >= 2 categories, regression with min and max)",
                self.name
            )),
        }
    }
}

impl JobSpec {
    /// The heads the sites train.
    fn trained_heads(&self) -> Vec<String> {
        let mut heads = self.heads.clone();
        if heads.is_empty() {
            heads = self.new_heads.iter().map(|h| h.name.clone()).collect();
        } else {
            for h in &self.new_heads {
                if !heads.contains(&h.name) {
                    heads.push(h.name.clone());
                }
            }
        }
        heads
    }

    /// Parses and checks a job file.
    pub fn parse(text: &str) -> Result<JobSpec, String> {
        let spec: JobSpec = toml::from_str(text).map_err(|e| format!("job file: {e}"))?;
        spec.validate()?;
        Ok(spec)
    }

    pub fn algorithm(&self) -> Algorithm {
        Algorithm::parse(&self.algorithm).unwrap_or(Algorithm::FedAvg)
    }

    pub fn validate(&self) -> Result<(), String> {
        if Algorithm::parse(&self.algorithm).is_none() {
            return Err(format!(
                "algorithm {:?}: fedavg, fedprox or fedadam",
                self.algorithm
            ));
        }
        if !["heads", "last_block", "all"].contains(&self.trainable.as_str()) {
            return Err(format!(
                "trainable {:?}: heads, last_block or all",
                self.trainable
            ));
        }
        if !(1..=1000).contains(&self.rounds) {
            return Err("rounds must be 1 to 1000".into());
        }
        if self.local_epochs == 0 && self.local_steps == 0 {
            return Err("local_epochs or local_steps must be positive".into());
        }
        if !(2..=4096).contains(&self.batch_size) {
            return Err("batch_size must be 2 to 4096".into());
        }
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if !positive(self.learning_rate) || !positive(self.server_learning_rate) {
            return Err("learning rates must be positive".into());
        }
        if !(self.mu.is_finite() && self.mu >= 0.0) {
            return Err("mu must be >= 0".into());
        }
        if self.min_sites == 0 {
            return Err("min_sites must be at least 1".into());
        }
        if !self.sites.is_empty() && (self.min_sites as usize) > self.sites.len() {
            return Err(format!(
                "min_sites {} is more than the {} sites named",
                self.min_sites,
                self.sites.len()
            ));
        }
        if !(1..=86_400).contains(&self.round_deadline_secs) {
            return Err("round_deadline_secs must be 1 to 86400".into());
        }
        if !(1..=10).contains(&self.attempts) {
            return Err("attempts must be 1 to 10".into());
        }
        let non_negative = |v: f64| v.is_finite() && v >= 0.0;
        if !(non_negative(self.clip) && non_negative(self.noise_multiplier)) {
            return Err("clip and noise_multiplier must be >= 0".into());
        }
        if self.noise_multiplier > 0.0 && self.clip == 0.0 {
            return Err("noise needs clipping: set clip > 0 with noise_multiplier".into());
        }
        if self.noise_multiplier > 0.0 && !(self.dp_delta > 0.0 && self.dp_delta < 1.0) {
            return Err("dp_delta must be in (0, 1)".into());
        }
        for (i, head) in self.new_heads.iter().enumerate() {
            head.label_map_entry()?;
            if self.new_heads[..i].iter().any(|h| h.name == head.name) {
                return Err(format!("new head {:?} appears twice", head.name));
            }
        }
        Ok(())
    }

    /// The local settings every site receives (the node's `LocalSpec`).
    fn local_json(&self) -> serde_json::Value {
        serde_json::json!({
            "heads": self.trained_heads(),
            "trainable": self.trainable,
            // With a step budget, epochs only bound it (each has at least one step).
            "epochs": if self.local_steps > 0 { self.local_steps } else { self.local_epochs },
            "max_steps": self.local_steps,
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "prox_mu": if self.algorithm() == Algorithm::FedProx { self.mu } else { 0.0 },
            "clip": self.clip,
            "augment": self.augment,
            "seed": self.seed,
        })
    }
}

/// One site in one round.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SiteDoc {
    pub site: String,
    pub status: String,
    pub reason: String,
    pub samples: u64,
    pub eval_samples: u64,
    pub train_loss: f64,
    pub train_seconds: f64,
    pub metrics: BTreeMap<String, f64>,
    pub update_bytes: u64,
    pub update_sha256: String,
}

/// One attempt of a round in the round log.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundDoc {
    pub round: u32,
    pub attempt: u32,
    pub state: String,
    pub reason: String,
    pub sites: Vec<SiteDoc>,
    pub model_version: String,
    pub pooled_metrics: BTreeMap<String, f64>,
    pub seconds: f64,
    pub bytes_down: u64,
    pub bytes_up: u64,
    pub started_at: String,
}

/// A job and its round log, as stored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobDoc {
    pub job_id: String,
    pub spec: JobSpec,
    pub state: String,
    pub reason: String,
    pub created_at: String,
    pub created_by: String,
    pub completed_rounds: u32,
    pub base_model: String,
    pub latest_model: String,
    pub round_log: Vec<RoundDoc>,
    pub dp_epsilon: f64,
    /// FedAdam's moments after the last completed round (a file under `models/`).
    pub adam_sha256: String,
}

/// A registry entry: a global model version and its lineage.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelDoc {
    pub version: String,
    pub parent: String,
    pub job_id: String,
    pub round: u32,
    pub sha256: String,
    pub algorithm: String,
    pub sites: Vec<String>,
    pub samples: Vec<u64>,
    /// Pooled held-out metrics of this version (measured by the next round or the closing
    /// evaluation).
    pub metrics: BTreeMap<String, f64>,
    pub dp_epsilon: f64,
    pub dp_delta: f64,
    pub created_at: String,
    pub size_bytes: u64,
    /// The model card (architecture, input, label map); its model_id is the version.
    pub card: serde_json::Value,
    /// When the study admin promoted it (RFC 3339), empty if never.
    pub promoted_at: String,
}

impl ModelDoc {
    pub fn heads(&self) -> Vec<String> {
        self.card["label_map"]["heads"]
            .as_array()
            .map(|h| {
                h.iter()
                    .filter_map(|h| h["name"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl From<&SiteDoc> for pb::SiteRound {
    fn from(s: &SiteDoc) -> Self {
        pb::SiteRound {
            site: s.site.clone(),
            status: s.status.clone(),
            reason: s.reason.clone(),
            samples: s.samples,
            eval_samples: s.eval_samples,
            train_loss: s.train_loss,
            train_seconds: s.train_seconds,
            metrics: s.metrics.clone().into_iter().collect(),
            update_bytes: s.update_bytes,
        }
    }
}

impl From<&JobDoc> for pb::JobInfo {
    fn from(j: &JobDoc) -> Self {
        pb::JobInfo {
            job_id: j.job_id.clone(),
            state: j.state.clone(),
            reason: j.reason.clone(),
            rounds: j.spec.rounds,
            completed_rounds: j.completed_rounds,
            algorithm: j.spec.algorithm().as_str().into(),
            base_model: j.base_model.clone(),
            latest_model: j.latest_model.clone(),
            round_log: j
                .round_log
                .iter()
                .map(|r| pb::RoundInfo {
                    round: r.round,
                    attempt: r.attempt,
                    state: r.state.clone(),
                    reason: r.reason.clone(),
                    sites: r.sites.iter().map(pb::SiteRound::from).collect(),
                    model_version: r.model_version.clone(),
                    pooled_metrics: r.pooled_metrics.clone().into_iter().collect(),
                    seconds: r.seconds,
                    bytes_down: r.bytes_down,
                    bytes_up: r.bytes_up,
                    started_at: r.started_at.clone(),
                })
                .collect(),
            spec_json: serde_json::to_string(&j.spec).unwrap_or_default(),
            created_at: j.created_at.clone(),
            created_by: j.created_by.clone(),
            dp_epsilon: j.dp_epsilon,
            dp_delta: if j.spec.noise_multiplier > 0.0 {
                j.spec.dp_delta
            } else {
                0.0
            },
        }
    }
}

impl From<&ModelDoc> for pb::ModelVersion {
    fn from(m: &ModelDoc) -> Self {
        pb::ModelVersion {
            version: m.version.clone(),
            parent: m.parent.clone(),
            job_id: m.job_id.clone(),
            round: m.round,
            sha256: m.sha256.clone(),
            algorithm: m.algorithm.clone(),
            sites: m.sites.clone(),
            samples: m.samples.clone(),
            metrics: m.metrics.clone().into_iter().collect(),
            dp_epsilon: m.dp_epsilon,
            dp_delta: m.dp_delta,
            created_at: m.created_at.clone(),
            size_bytes: m.size_bytes,
            model_id: m.card["model_id"].as_str().unwrap_or_default().into(),
            heads: m.heads(),
            promoted_at: m.promoted_at.clone(),
            running_at: Vec::new(),
        }
    }
}

fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// An update arriving in chunks, spooled to a file.
#[derive(Debug)]
struct Upload {
    site: String,
    path: PathBuf,
    file: Option<std::fs::File>,
    len: u64,
    hasher: Sha256,
    broken: Option<String>,
}

/// What the training engine shares with the links.
#[derive(Debug, Default)]
pub struct Training {
    uploads: Mutex<HashMap<String, Upload>>,
    /// Reports are routed to the round waiting for their task id.
    waiting: Mutex<HashMap<String, mpsc::UnboundedSender<(String, pb::TrainReport)>>>,
    /// Running jobs, to cancel them.
    running: Mutex<HashMap<String, CancellationToken>>,
}

impl Training {
    /// A chunk of a site's update (from its link).
    pub fn on_chunk(&self, dir: &Path, site: &str, chunk: pb::Chunk) {
        let expected = self
            .waiting
            .lock()
            .map(|w| w.contains_key(&chunk.task_id))
            .unwrap_or(false);
        if !expected {
            tracing::debug!(
                site,
                task_id = chunk.task_id.as_str(),
                "a late update chunk; ignored"
            );
            return;
        }
        let Ok(mut uploads) = self.uploads.lock() else {
            return;
        };
        let upload = uploads.entry(chunk.task_id.clone()).or_insert_with(|| {
            let path = dir.join(format!(
                "{}.part",
                hex(&Sha256::digest(chunk.task_id.as_bytes()))
            ));
            let (file, broken) = match std::fs::File::create(&path) {
                Ok(f) => (Some(f), None),
                Err(e) => (None, Some(format!("cannot spool the update: {e}"))),
            };
            Upload {
                site: site.to_string(),
                path,
                file,
                len: 0,
                hasher: Sha256::new(),
                broken,
            }
        });
        if upload.broken.is_some() {
            return;
        }
        if upload.site != site {
            upload.broken = Some(format!("{site} sent chunks of {}'s update", upload.site));
        } else if chunk.offset != upload.len {
            upload.broken = Some(format!(
                "chunk at offset {} where {} was expected",
                chunk.offset, upload.len
            ));
        } else if upload.len + chunk.data.len() as u64 > MAX_UPDATE_BYTES {
            upload.broken = Some("the update is larger than 2 GiB".into());
        } else if let Some(file) = upload.file.as_mut() {
            match file.write_all(&chunk.data) {
                Ok(()) => {
                    upload.hasher.update(&chunk.data);
                    upload.len += chunk.data.len() as u64;
                }
                Err(e) => upload.broken = Some(format!("cannot spool the update: {e}")),
            }
        }
    }

    /// A site's report (from its link).
    pub fn on_report(&self, site: &str, report: pb::TrainReport) {
        let tx = self
            .waiting
            .lock()
            .ok()
            .and_then(|w| w.get(&report.task_id).cloned());
        match tx {
            Some(tx) => {
                let _ = tx.send((site.to_string(), report));
            }
            None => tracing::info!(
                site,
                task_id = report.task_id.as_str(),
                "a report for a finished or unknown round; ignored"
            ),
        }
    }

    fn take_upload(&self, task_id: &str) -> Option<Upload> {
        self.uploads.lock().ok()?.remove(task_id)
    }
}

fn models_dir(state: &CoordinatorState) -> PathBuf {
    state.config.data_dir.join("models")
}

fn spool_dir(state: &CoordinatorState) -> PathBuf {
    state.config.data_dir.join("spool")
}

/// Writes a content-addressed weights file (durable, atomic); returns its sha256.
fn put_blob(state: &CoordinatorState, bytes: &[u8]) -> Result<String, String> {
    let sha = hex(&Sha256::digest(bytes));
    let dir = models_dir(state);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let path = dir.join(format!("{sha}.safetensors"));
    if path.exists() {
        return Ok(sha);
    }
    let tmp = dir.join(format!("{sha}.tmp"));
    let mut file = std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(sha)
}

/// Reads a weights file and checks its sha256.
pub fn get_blob(state: &CoordinatorState, sha: &str) -> Result<Vec<u8>, String> {
    let path = models_dir(state).join(format!("{sha}.safetensors"));
    let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let found = hex(&Sha256::digest(&bytes));
    if found != sha {
        return Err(format!(
            "{}: sha256 {found} does not match its name",
            path.display()
        ));
    }
    Ok(bytes)
}

fn read_doc<T: serde::de::DeserializeOwned>(
    state: &CoordinatorState,
    kind: Doc,
    key: &str,
) -> Result<Option<T>, String> {
    state
        .store
        .doc(kind, key)
        .map_err(|e| e.to_string())?
        .map(|v| serde_json::from_value(v).map_err(|e| e.to_string()))
        .transpose()
}

/// Every document of a kind, oldest first.
fn read_docs<T: serde::de::DeserializeOwned>(
    state: &CoordinatorState,
    kind: Doc,
    created_at: impl Fn(&T) -> &str,
) -> Result<Vec<T>, String> {
    let mut all: Vec<T> = state
        .store
        .docs(kind)
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter_map(|v| serde_json::from_value(v).ok())
        .collect();
    all.sort_by(|a, b| created_at(a).cmp(created_at(b)));
    Ok(all)
}

pub fn model(state: &CoordinatorState, version: &str) -> Result<Option<ModelDoc>, String> {
    read_doc(state, Doc::Model, version)
}

pub fn models(state: &CoordinatorState) -> Result<Vec<ModelDoc>, String> {
    read_docs(state, Doc::Model, |m: &ModelDoc| m.created_at.as_str())
}

pub fn job(state: &CoordinatorState, job_id: &str) -> Result<Option<JobDoc>, String> {
    read_doc(state, Doc::Job, job_id)
}

pub fn jobs(state: &CoordinatorState) -> Result<Vec<JobDoc>, String> {
    read_docs(state, Doc::Job, |j: &JobDoc| j.created_at.as_str())
}

/// A document as the store writes it.
type Entry = (Doc, String, serde_json::Value);

impl JobDoc {
    fn entry(&self) -> Result<Entry, String> {
        let value = serde_json::to_value(self).map_err(|e| e.to_string())?;
        Ok((Doc::Job, self.job_id.clone(), value))
    }
}

impl ModelDoc {
    fn entry(&self) -> Result<Entry, String> {
        let value = serde_json::to_value(self).map_err(|e| e.to_string())?;
        Ok((Doc::Model, self.version.clone(), value))
    }
}

/// Writes documents in one transaction (durable when this returns).
async fn commit(state: &CoordinatorState, entries: &[Entry]) -> Result<(), String> {
    state
        .store
        .put_docs(entries)
        .await
        .map_err(|e| e.to_string())
}

async fn save_job(state: &CoordinatorState, job: &JobDoc) -> Result<(), String> {
    commit(state, &[job.entry()?]).await
}

async fn save_model(state: &CoordinatorState, doc: &ModelDoc) -> Result<(), String> {
    commit(state, &[doc.entry()?]).await
}

/// The largest model the registry takes (bytes).
pub const MAX_MODEL_BYTES: usize = 2 << 30;

/// Adds a model brought from elsewhere (a `cxrfed model train` output, another study's
/// model) to the registry after checking that its card and weights belong together: every
/// head of the label map has its linear layer, every tensor is f32.
pub async fn import(
    state: &CoordinatorState,
    version: &str,
    card_json: &str,
    weights: &[u8],
) -> Result<ModelDoc, String> {
    if !cxrfed_schema::valid_model_version(version) {
        return Err(format!(
            "version {version:?}: letters, digits, '-', '_' and '.' (not first), up to 128"
        ));
    }
    if model(state, version)?.is_some() {
        return Err(format!("version {version} is already in the registry"));
    }
    let mut card: serde_json::Value =
        serde_json::from_str(card_json).map_err(|e| format!("model card: {e}"))?;
    if card["format"].as_str() != Some("safetensors") {
        return Err(
            "only safetensors models (a cxrfed architecture) can be trained federatedly".into(),
        );
    }
    if card["architecture"].as_str().is_none_or(str::is_empty)
        || card["input"]["size"].as_u64().is_none()
    {
        return Err("the model card names no architecture or input size".into());
    }
    let names: HashSet<String> = aggregate::f32_names(weights)
        .map_err(|e| e.to_string())?
        .into_iter()
        .collect();
    let doc = ModelDoc {
        version: version.to_string(),
        card: card.clone(),
        ..Default::default()
    };
    let heads = doc.heads();
    if heads.is_empty() {
        return Err("the model card's label map has no heads".into());
    }
    if let Some(missing) = heads
        .iter()
        .find(|h| !names.contains(&format!("heads.{h}.weight")))
    {
        return Err(format!(
            "the weights have no layer for head {missing:?} (do they match the card?)"
        ));
    }
    let sha = put_blob(state, weights)?;
    card["model_id"] = version.into();
    card["weights"] = "model.safetensors".into();
    card["weights_sha256"] = sha.clone().into();
    let doc = ModelDoc {
        version: version.to_string(),
        sha256: sha,
        algorithm: "imported".into(),
        created_at: now(),
        size_bytes: weights.len() as u64,
        card,
        ..Default::default()
    };
    save_model(state, &doc).await?;
    Ok(doc)
}

/// Registers the bundled model as the first registry version (once).
pub async fn ensure_bundled(state: &CoordinatorState) -> Result<(), String> {
    if model(state, BUNDLED_VERSION)?.is_some() {
        return Ok(());
    }
    let sha = put_blob(state, BUNDLED_WEIGHTS)?;
    let mut card: serde_json::Value =
        serde_json::from_slice(BUNDLED_CARD).map_err(|e| format!("bundled card: {e}"))?;
    card["model_id"] = BUNDLED_VERSION.into();
    let doc = ModelDoc {
        version: BUNDLED_VERSION.into(),
        sha256: sha,
        algorithm: "centralised (phantoms)".into(),
        created_at: now(),
        size_bytes: BUNDLED_WEIGHTS.len() as u64,
        card,
        ..Default::default()
    };
    save_model(state, &doc).await
}

/// Checks and records a new job, then runs it in the background.
pub async fn start(
    state: &Arc<CoordinatorState>,
    spec: JobSpec,
    created_by: String,
) -> Result<JobDoc, String> {
    spec.validate()?;
    let base = model(state, &spec.base)?.ok_or_else(|| {
        format!(
            "no model version {:?} in the registry (see `cxrfed models list`)",
            spec.base
        )
    })?;
    let mut heads = base.heads();
    for new in &spec.new_heads {
        if heads.contains(&new.name) {
            return Err(format!(
                "the base model {} already has a head {:?}; train it with heads = [...]",
                base.version, new.name
            ));
        }
    }
    heads.extend(spec.new_heads.iter().map(|h| h.name.clone()));
    if let Some(unknown) = spec.heads.iter().find(|h| !heads.contains(h)) {
        return Err(format!(
            "the base model {} has no head {unknown:?} (it has {})",
            base.version,
            heads.join(", ")
        ));
    }
    let job_id = format!(
        "job-{}-{}",
        Utc::now().format("%Y%m%d"),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut job = JobDoc {
        job_id: job_id.clone(),
        state: "running".into(),
        created_at: now(),
        created_by,
        base_model: base.version.clone(),
        latest_model: base.version.clone(),
        spec,
        ..Default::default()
    };
    let mut docs = Vec::new();
    if !job.spec.new_heads.is_empty() {
        let start = with_new_heads(state, &base, &job)?;
        job.latest_model = start.version.clone();
        docs.push(start.entry()?);
    }
    docs.push(job.entry()?);
    commit(state, &docs).await?;
    spawn(state.clone(), job_id);
    Ok(job)
}

/// The job's starting model when it adds heads: the base weights plus a linear head per new
/// field, and the base label map extended. A new head starts at zero, so its first predictions
/// are uninformative (p = 0.5) and the improvement a job reports is the head's own (with the
/// backbone frozen this is plain logistic or softmax regression on the backbone's features,
/// for which a zero start is the usual one). Registered as version `JOB.r0`.
fn with_new_heads(
    state: &CoordinatorState,
    base: &ModelDoc,
    job: &JobDoc,
) -> Result<ModelDoc, String> {
    let mut weights =
        aggregate::decode(&get_blob(state, &base.sha256)?).map_err(|e| e.to_string())?;
    let fan_in = weights
        .iter()
        .find(|(n, t)| n.starts_with("heads.") && n.ends_with(".weight") && t.shape.len() == 2)
        .map(|(_, t)| t.shape[1])
        .ok_or("the base model has no linear head to size a new one by")?;
    let mut card = base.card.clone();
    for head in &job.spec.new_heads {
        let (entry, width) = head.label_map_entry()?;
        card["label_map"]["heads"]
            .as_array_mut()
            .ok_or("the base card has no label map")?
            .push(entry);
        weights.insert(
            format!("heads.{}.weight", head.name),
            aggregate::Tensor {
                shape: vec![width, fan_in],
                data: vec![0.0; width * fan_in],
            },
        );
        weights.insert(
            format!("heads.{}.bias", head.name),
            aggregate::Tensor {
                shape: vec![width],
                data: vec![0.0; width],
            },
        );
    }
    let bytes = aggregate::encode(&weights).map_err(|e| e.to_string())?;
    let sha = put_blob(state, &bytes)?;
    let version = format!("{}.r0", job.job_id);
    card["model_id"] = version.clone().into();
    card["weights_sha256"] = sha.clone().into();
    Ok(ModelDoc {
        version,
        parent: base.version.clone(),
        job_id: job.job_id.clone(),
        round: 0,
        sha256: sha,
        algorithm: format!(
            "new heads ({})",
            job.spec
                .new_heads
                .iter()
                .map(|h| h.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        created_at: now(),
        size_bytes: bytes.len() as u64,
        card,
        ..Default::default()
    })
}

/// Resumes every job that was running when the coordinator stopped.
pub fn resume_all(state: &Arc<CoordinatorState>) {
    match jobs(state) {
        Ok(all) => {
            for job in all.into_iter().filter(|j| j.state == "running") {
                tracing::info!(
                    job_id = job.job_id.as_str(),
                    completed_rounds = job.completed_rounds,
                    "resuming a training job"
                );
                spawn(state.clone(), job.job_id);
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot read the training jobs"),
    }
}

fn spawn(state: Arc<CoordinatorState>, job_id: String) {
    let cancel = CancellationToken::new();
    if let Ok(mut running) = state.training.running.lock() {
        running.insert(job_id.clone(), cancel.clone());
    }
    tokio::spawn(async move {
        if let Err(e) = run(&state, &job_id, &cancel).await {
            tracing::error!(job_id = job_id.as_str(), error = %e, "training job stopped");
            if let Ok(Some(mut job)) = job(&state, &job_id)
                && job.state == "running"
            {
                job.state = "failed".into();
                job.reason = e;
                let _ = save_job(&state, &job).await;
            }
        }
        if let Ok(mut running) = state.training.running.lock() {
            running.remove(&job_id);
        }
    });
}

/// Cancels a running job: its current round stops, nothing more is committed.
pub async fn cancel(state: &CoordinatorState, job_id: &str) -> Result<JobDoc, String> {
    let mut doc = job(state, job_id)?.ok_or_else(|| format!("no job {job_id:?}"))?;
    if doc.state != "running" {
        return Err(format!("job {job_id} is {}, not running", doc.state));
    }
    if let Some(token) = state
        .training
        .running
        .lock()
        .ok()
        .and_then(|r| r.get(job_id).cloned())
    {
        token.cancel();
    }
    doc.state = "cancelled".into();
    doc.reason = "cancelled by the study admin".into();
    save_job(state, &doc).await?;
    Ok(doc)
}

/// Held-out-sample weighted mean of the sites' metrics (`head.metric`, weighted by the
/// `head.n` each site evaluated).
pub fn pool_metrics<'a>(sites: impl IntoIterator<Item = &'a SiteDoc>) -> BTreeMap<String, f64> {
    let mut sums: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for site in sites {
        for (key, value) in &site.metrics {
            let Some((head, metric)) = key.rsplit_once('.') else {
                continue;
            };
            if metric == "n" {
                continue;
            }
            let n = site
                .metrics
                .get(&format!("{head}.n"))
                .copied()
                .unwrap_or(1.0);
            let entry = sums.entry(key.clone()).or_default();
            entry.0 += n * value;
            entry.1 += n;
        }
    }
    sums.into_iter()
        .filter(|(_, (_, w))| *w > 0.0)
        .map(|(k, (s, w))| (k, s / w))
        .collect()
}

/// Sends a task (training or rollout) and then its weights in [`cxrfed_proto::CHUNK_BYTES`] chunks, slices of
/// one shared buffer. A closed link ends the transfer; the deadline deals with the rest.
async fn stream_weights(
    link: crate::service::Outbound,
    head: pb::coordinator_message::Kind,
    weights: prost::bytes::Bytes,
) {
    let task_id = match &head {
        pb::coordinator_message::Kind::Train(t) => t.task_id.clone(),
        pb::coordinator_message::Kind::Rollout(r) => r.rollout_id.clone(),
        _ => return,
    };
    let send = |kind| pb::CoordinatorMessage { kind: Some(kind) };
    if link.send(Ok(send(head))).await.is_err() {
        return;
    }
    for chunk in cxrfed_proto::chunks(&task_id, weights) {
        if link
            .send(Ok(send(pb::coordinator_message::Kind::Weights(chunk))))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// The version the study admin promoted last, if any.
pub fn promoted(state: &CoordinatorState) -> Result<Option<ModelDoc>, String> {
    Ok(models(state)?
        .into_iter()
        .filter(|m| !m.promoted_at.is_empty())
        .max_by(|a, b| a.promoted_at.cmp(&b.promoted_at)))
}

/// Sends a model to one site's link.
pub fn rollout_to(
    state: &CoordinatorState,
    link: crate::service::Outbound,
    doc: &ModelDoc,
) -> Result<(), String> {
    let weights = prost::bytes::Bytes::from(get_blob(state, &doc.sha256)?);
    let rollout = pb::ModelRollout {
        rollout_id: format!("rollout/{}/{}", doc.version, uuid::Uuid::new_v4().simple()),
        version: doc.version.clone(),
        card_json: serde_json::to_string(&doc.card).map_err(|e| e.to_string())?,
        weights_sha256: doc.sha256.clone(),
        weights_bytes: weights.len() as u64,
    };
    tokio::spawn(stream_weights(
        link,
        pb::coordinator_message::Kind::Rollout(rollout),
        weights,
    ));
    Ok(())
}

/// Promotes a version: recorded in the registry, then sent to every connected site (sites
/// that connect later get it on their hello).
pub async fn promote(
    state: &CoordinatorState,
    version: &str,
) -> Result<(ModelDoc, Vec<String>), String> {
    let mut doc = model(state, version)?.ok_or_else(|| format!("no model version {version:?}"))?;
    get_blob(state, &doc.sha256)?;
    doc.promoted_at = now();
    save_model(state, &doc).await?;
    let mut sent = Vec::new();
    for (site, link) in state.connected_links() {
        rollout_to(state, link, &doc)?;
        sent.push(site);
    }
    sent.sort();
    tracing::info!(version, sites = sent.len(), "model promoted");
    Ok((doc, sent))
}

/// Runs a job from its last completed round to the end, then the closing evaluation.
async fn run(
    state: &Arc<CoordinatorState>,
    job_id: &str,
    cancel: &CancellationToken,
) -> Result<(), String> {
    loop {
        let mut job = job(state, job_id)?.ok_or_else(|| format!("job {job_id} vanished"))?;
        if job.state != "running" || cancel.is_cancelled() {
            return Ok(());
        }
        let evaluation = job.completed_rounds >= job.spec.rounds;
        let round = if evaluation {
            job.spec.rounds + 1
        } else {
            job.completed_rounds + 1
        };
        // Attempts cut short by a coordinator restart stay in the log as interrupted; the
        // new ones are numbered after them, so their task ids differ.
        let mut interrupted = false;
        for entry in job.round_log.iter_mut().filter(|r| r.state == "running") {
            entry.state = "interrupted".into();
            entry.reason = "the coordinator stopped during this round".into();
            interrupted = true;
        }
        if interrupted {
            save_job(state, &job).await?;
        }
        let prior = job.round_log.iter().filter(|r| r.round == round).count() as u32;
        let attempts = job.spec.attempts;
        let mut last_reason = String::new();
        let mut done = false;
        for attempt in prior + 1..=prior + attempts {
            if cancel.is_cancelled() {
                return Ok(());
            }
            let last = attempt == prior + attempts;
            match run_round(state, &mut job, round, attempt, last, evaluation, cancel).await {
                Ok(()) => {
                    done = true;
                    break;
                }
                Err(reason) => {
                    tracing::warn!(
                        job_id,
                        round,
                        attempt,
                        reason = reason.as_str(),
                        "round failed"
                    );
                    last_reason = reason;
                    // Give disconnected sites a moment to come back.
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    }
                    job = self::job(state, job_id)?.ok_or("the job vanished")?;
                    if job.state != "running" {
                        return Ok(());
                    }
                }
            }
        }
        if !done {
            job.state = "failed".into();
            job.reason = format!("round {round} failed {attempts} time(s); last: {last_reason}");
            save_job(state, &job).await?;
            return Ok(());
        }
        if evaluation {
            let mut job = self::job(state, job_id)?.ok_or("the job vanished")?;
            if job.state == "running" {
                job.state = "completed".into();
                save_job(state, &job).await?;
            }
            tracing::info!(job_id, "training job completed");
            return Ok(());
        }
    }
}

/// One attempt of one round (or of the closing evaluation).
async fn run_round(
    state: &Arc<CoordinatorState>,
    job: &mut JobDoc,
    round: u32,
    attempt: u32,
    last_attempt: bool,
    evaluation: bool,
    cancel: &CancellationToken,
) -> Result<(), String> {
    let started = Instant::now();
    let spec = job.spec.clone();
    let global_doc = model(state, &job.latest_model)?
        .ok_or_else(|| format!("model version {} is missing", job.latest_model))?;
    let global_bytes = prost::bytes::Bytes::from(get_blob(state, &global_doc.sha256)?);
    let min_sites = spec.min_sites as usize;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(spec.round_deadline_secs);

    // The participating sites: those named (or all) that are connected; wait for enough of
    // them until the deadline.
    let sites: Vec<(String, crate::service::Outbound)> = loop {
        let connected = state.connected_links();
        let mut chosen: Vec<_> = connected
            .into_iter()
            .filter(|(s, _)| spec.sites.is_empty() || spec.sites.contains(s))
            .collect();
        chosen.sort_by(|a, b| a.0.cmp(&b.0));
        if chosen.len() >= min_sites {
            break chosen;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "{} site(s) connected, min_sites is {min_sites}",
                chosen.len()
            ));
        }
        tokio::select! {
            _ = cancel.cancelled() => return Err("cancelled".into()),
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    };

    let mut log = RoundDoc {
        round,
        attempt,
        state: if evaluation { "evaluation" } else { "running" }.into(),
        started_at: now(),
        sites: sites
            .iter()
            .map(|(s, _)| SiteDoc {
                site: s.clone(),
                status: "running".into(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    job.round_log.push(log.clone());
    save_job(state, job).await?;

    let spool = spool_dir(state);
    std::fs::create_dir_all(&spool).map_err(|e| format!("{}: {e}", spool.display()))?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let task_of = |site: &str| format!("{}/r{round}/a{attempt}/{site}", job.job_id);
    if let Ok(mut waiting) = state.training.waiting.lock() {
        for (site, _) in &sites {
            waiting.insert(task_of(site), tx.clone());
        }
    }
    drop(tx);
    let card_json = serde_json::to_string(&global_doc.card).map_err(|e| e.to_string())?;
    let local = spec.local_json().to_string();
    let mut bytes_down = 0u64;
    for (site, link) in &sites {
        let task = pb::TrainTask {
            task_id: task_of(site),
            job_id: job.job_id.clone(),
            round,
            spec_json: local.clone(),
            card_json: card_json.clone(),
            weights_sha256: global_doc.sha256.clone(),
            weights_bytes: global_bytes.len() as u64,
            evaluate_only: evaluation,
        };
        bytes_down += global_bytes.len() as u64;
        tokio::spawn(stream_weights(
            link.clone(),
            pb::coordinator_message::Kind::Train(task),
            global_bytes.clone(),
        ));
    }

    let mut global = if evaluation {
        aggregate::Weights::new()
    } else {
        aggregate::decode(&global_bytes).map_err(|e| e.to_string())?
    };
    let uniform = spec.noise_multiplier > 0.0;
    let mut aggregator = Aggregator::new(&global, uniform);
    let mut accepted: HashSet<String> = HashSet::new();
    let mut bytes_up = 0u64;
    let mut pending: HashSet<String> = sites.iter().map(|(s, _)| s.clone()).collect();
    while !pending.is_empty() {
        let next = tokio::select! {
            _ = cancel.cancelled() => None,
            r = tokio::time::timeout_at(deadline, rx.recv()) => r.ok().flatten(),
        };
        let Some((site, report)) = next else { break };
        let task_id = report.task_id.clone();
        let upload = state.training.take_upload(&task_id);
        let entry = log.sites.iter_mut().find(|s| s.site == site);
        let Some(entry) = entry else { continue };
        if !task_id.ends_with(&format!("/{site}")) || report.job_id != job.job_id {
            tracing::warn!(
                site,
                task_id = task_id.as_str(),
                "a report for another task; ignored"
            );
            continue;
        }
        if accepted.contains(&site) || !pending.contains(&site) {
            tracing::info!(site, "a duplicate update; ignored");
            continue;
        }
        pending.remove(&site);
        entry.samples = report.samples;
        entry.eval_samples = report.eval_samples;
        entry.train_loss = report.train_loss;
        entry.train_seconds = report.train_seconds;
        entry.metrics = report.metrics.clone().into_iter().collect();
        entry.update_bytes = report.update_bytes;
        entry.update_sha256 = report.update_sha256.clone();
        if !report.ok {
            entry.status = "failed".into();
            entry.reason = report.reason.clone();
            continue;
        }
        if evaluation {
            entry.status = "reported".into();
            accepted.insert(site.clone());
            continue;
        }
        let checked = match upload {
            None => Err("the report came without an update".to_string()),
            Some(u) => {
                let result = match (&u.broken, u.len == report.update_bytes) {
                    (Some(reason), _) => Err(reason.clone()),
                    (None, false) => Err(format!(
                        "{} update bytes arrived, the report says {}",
                        u.len, report.update_bytes
                    )),
                    (None, true) => {
                        let sha = hex(&u.hasher.clone().finalize());
                        if sha != report.update_sha256 {
                            Err(format!(
                                "the update's sha256 is {sha}, the report says {}",
                                report.update_sha256
                            ))
                        } else {
                            drop(u.file);
                            std::fs::read(&u.path)
                                .map_err(|e| format!("spooled update: {e}"))
                                .and_then(|bytes| {
                                    bytes_up += bytes.len() as u64;
                                    aggregator
                                        .add(&bytes, report.samples)
                                        .map_err(|e| e.to_string())
                                })
                        }
                    }
                };
                let _ = std::fs::remove_file(&u.path);
                result
            }
        };
        match checked {
            Ok(()) => {
                entry.status = "reported".into();
                accepted.insert(site.clone());
            }
            Err(reason) => {
                tracing::warn!(site, reason = reason.as_str(), "update rejected");
                entry.status = "failed".into();
                entry.reason = reason;
            }
        }
    }
    // Stragglers are dropped; their chunks, if any, are removed.
    if let Ok(mut waiting) = state.training.waiting.lock() {
        for (site, _) in &sites {
            waiting.remove(&task_of(site));
        }
    }
    for (site, _) in &sites {
        if let Some(u) = state.training.take_upload(&task_of(site)) {
            let _ = std::fs::remove_file(&u.path);
        }
    }
    for entry in log.sites.iter_mut().filter(|s| s.status == "running") {
        entry.status = "dropped".into();
        entry.reason = if cancel.is_cancelled() {
            "the job was cancelled".into()
        } else {
            format!(
                "no update before the {} s deadline",
                spec.round_deadline_secs
            )
        };
    }
    log.seconds = started.elapsed().as_secs_f64();
    log.bytes_down = bytes_down;
    log.bytes_up = bytes_up;
    log.pooled_metrics = pool_metrics(log.sites.iter().filter(|s| s.status == "reported"));
    let fresh = self::job(state, &job.job_id)?.ok_or("the job vanished")?;
    if fresh.state != "running" || cancel.is_cancelled() {
        return Err("cancelled".into());
    }
    let enough = accepted.len() >= min_sites;
    if !enough {
        log.state = if last_attempt { "failed" } else { "retried" }.into();
        let missing: Vec<String> = log
            .sites
            .iter()
            .filter(|s| s.status != "reported")
            .map(|s| format!("{} ({}: {})", s.site, s.status, s.reason))
            .collect();
        log.reason = format!(
            "{} of {} site(s) reported, min_sites is {min_sites}; {}",
            accepted.len(),
            sites.len(),
            missing.join("; ")
        );
        let reason = log.reason.clone();
        if let Some(last) = job.round_log.last_mut() {
            *last = log;
        }
        save_job(state, job).await?;
        return Err(reason);
    }

    // The metrics measured this round describe the incoming model.
    let mut parent = global_doc.clone();
    parent.metrics = log.pooled_metrics.clone();
    if evaluation {
        log.state = "evaluation".into();
        log.model_version = parent.version.clone();
        if let Some(last) = job.round_log.last_mut() {
            *last = log;
        }
        return commit(state, &[parent.entry()?, job.entry()?]).await;
    }

    let mut sites_used: Vec<String> = accepted.iter().cloned().collect();
    sites_used.sort();
    let samples: Vec<u64> = sites_used
        .iter()
        .filter_map(|s| log.sites.iter().find(|e| &e.site == s).map(|e| e.samples))
        .collect();
    let noise_std = spec.noise_multiplier * spec.clip;
    let mean = aggregator.mean(noise_std);
    let mut moments = if job.adam_sha256.is_empty() {
        AdamMoments::default()
    } else {
        AdamMoments::decode(&get_blob(state, &job.adam_sha256)?).map_err(|e| e.to_string())?
    };
    let adam = ServerAdam {
        learning_rate: spec.server_learning_rate,
        ..ServerAdam::default()
    };
    aggregate::apply(&mut global, &mean, spec.algorithm(), &adam, &mut moments)
        .map_err(|e| e.to_string())?;
    let new_bytes = aggregate::encode(&global).map_err(|e| e.to_string())?;
    let sha = put_blob(state, &new_bytes)?;
    if spec.algorithm() == Algorithm::FedAdam {
        job.adam_sha256 = put_blob(state, &moments.encode().map_err(|e| e.to_string())?)?;
    }
    let dp_epsilon = if spec.noise_multiplier > 0.0 {
        cxrfed_stats::dp::gaussian_rounds_epsilon(spec.noise_multiplier, round, spec.dp_delta)
            .map_err(|e| e.to_string())?
    } else {
        0.0
    };
    let version = format!("{}.r{round}", job.job_id);
    let mut card = global_doc.card.clone();
    card["model_id"] = version.clone().into();
    card["weights_sha256"] = sha.clone().into();
    card["training"] = serde_json::json!({
        "federated": true,
        "job_id": job.job_id,
        "round": round,
        "parent": global_doc.version,
        "algorithm": spec.algorithm().as_str(),
        "sites": sites_used,
        "samples": samples,
    });
    let doc = ModelDoc {
        version: version.clone(),
        parent: global_doc.version.clone(),
        job_id: job.job_id.clone(),
        round,
        sha256: sha,
        algorithm: spec.algorithm().as_str().into(),
        sites: sites_used,
        samples,
        metrics: BTreeMap::new(),
        dp_epsilon,
        dp_delta: if spec.noise_multiplier > 0.0 {
            spec.dp_delta
        } else {
            0.0
        },
        created_at: now(),
        size_bytes: new_bytes.len() as u64,
        card,
        promoted_at: String::new(),
    };
    log.state = "completed".into();
    log.model_version = version.clone();
    if let Some(last) = job.round_log.last_mut() {
        *last = log;
    }
    job.completed_rounds = round;
    job.latest_model = version.clone();
    job.dp_epsilon = dp_epsilon;
    commit(state, &[parent.entry()?, doc.entry()?, job.entry()?]).await?;
    tracing::info!(
        job_id = job.job_id.as_str(),
        round,
        version = version.as_str(),
        sites = accepted.len(),
        "round completed"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_files_are_checked() {
        let spec = JobSpec::parse(
            "base = \"tiny-phantom-v1\"\nalgorithm = \"fedprox\"\nmu = 0.1\nrounds = 2\nmin_sites = 2\nsites = [\"a\", \"b\"]\n",
        )
        .expect("valid");
        assert_eq!(spec.algorithm(), Algorithm::FedProx);
        assert_eq!(spec.local_json()["prox_mu"], 0.1);
        for bad in [
            "algorithm = \"fedsgd\"",
            "rounds = 0",
            "trainable = \"some\"",
            "min_sites = 3\nsites = [\"a\"]",
            "noise_multiplier = 1.0",
            "new_heads = [{ name = \"Bad Name\", kind = \"binary\" }]",
            "new_heads = [{ name = \"x\", kind = \"categorical\", categories = [\"a\"] }]",
            "learning_rate = -1.0",
            "unknown_key = 1",
        ] {
            assert!(JobSpec::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn late_foreign_and_out_of_order_chunks_are_not_taken() {
        let dir = std::env::temp_dir().join(format!("cxrfed-spool-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        let training = Training::default();
        let chunk = |task: &str, offset: u64, data: &'static [u8]| pb::Chunk {
            task_id: task.into(),
            offset,
            data: prost::bytes::Bytes::from_static(data),
            last: false,
        };
        // No round waits for this task: a late update, dropped.
        training.on_chunk(&dir, "site-a", chunk("job/r1/a1/site-a", 0, b"abc"));
        assert!(training.take_upload("job/r1/a1/site-a").is_none());
        let (tx, mut rx) = mpsc::unbounded_channel();
        if let Ok(mut w) = training.waiting.lock() {
            w.insert("job/r2/a1/site-a".into(), tx.clone());
            w.insert("job/r2/a1/site-b".into(), tx);
        }
        training.on_chunk(&dir, "site-a", chunk("job/r2/a1/site-a", 0, b"abc"));
        training.on_chunk(&dir, "site-a", chunk("job/r2/a1/site-a", 3, b"def"));
        let upload = training.take_upload("job/r2/a1/site-a").expect("upload");
        assert_eq!((upload.len, upload.broken.clone()), (6, None));
        assert_eq!(std::fs::read(&upload.path).expect("spool"), b"abcdef");
        // A gap, or another site writing into site-b's update, breaks that upload.
        training.on_chunk(&dir, "site-b", chunk("job/r2/a1/site-b", 5, b"x"));
        assert!(
            training
                .take_upload("job/r2/a1/site-b")
                .expect("upload")
                .broken
                .is_some()
        );
        training.on_chunk(&dir, "site-b", chunk("job/r2/a1/site-b", 0, b"x"));
        training.on_chunk(&dir, "site-c", chunk("job/r2/a1/site-b", 1, b"y"));
        assert!(
            training
                .take_upload("job/r2/a1/site-b")
                .expect("upload")
                .broken
                .is_some()
        );
        // Reports reach the waiting round; unknown ones do not.
        training.on_report(
            "site-a",
            pb::TrainReport {
                task_id: "job/r2/a1/site-a".into(),
                ..Default::default()
            },
        );
        training.on_report(
            "site-a",
            pb::TrainReport {
                task_id: "job/r9/a1/site-a".into(),
                ..Default::default()
            },
        );
        let (site, report) = rx.try_recv().expect("routed");
        assert_eq!(
            (site.as_str(), report.task_id.as_str()),
            ("site-a", "job/r2/a1/site-a")
        );
        assert!(rx.try_recv().is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn metrics_pool_by_evaluated_samples() {
        let site = |n: f64, acc: f64| SiteDoc {
            metrics: [("q.n".to_string(), n), ("q.accuracy".to_string(), acc)]
                .into_iter()
                .collect(),
            ..Default::default()
        };
        let pooled = pool_metrics(&[site(10.0, 0.5), site(30.0, 0.9)]);
        assert!((pooled["q.accuracy"] - 0.8).abs() < 1e-12);
        assert!(!pooled.contains_key("q.n"));
    }
}
