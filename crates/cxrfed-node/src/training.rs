//! Federated training at the node: a site's part of a round.
//!
//! The coordinator sends a [`pb::TrainTask`] and then the global weights in chunks over the
//! link. Once the weights are complete and their sha256 matches, the node builds its local
//! datasets from its own annotations (human labels of schema findings and of custom fields)
//! and the model inputs it kept at extraction, evaluates the incoming global model on its
//! held-out records, trains the chosen layers with the library training step and streams the
//! weights delta back in chunks, then its report. Images, labels and metrics per record never
//! leave the node: only the delta, the sample counts and the held-out metrics do.
//!
//! The held-out split is fixed by the image hash (about 20% of annotated images), so it stays
//! the same across rounds and jobs.

use std::collections::BTreeMap;
use std::sync::Arc;

use cxrfed_fl::Assembly;
use cxrfed_model::federated::{LocalSpec, train_round};
use cxrfed_model::train::{Dataset, Sample, parse_target};
use cxrfed_model::{HeadKind, Model, ModelCard, ModelFormat};
use cxrfed_proto::v1 as pb;
use cxrfed_store::RecordStore;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::state::Node;

/// The largest global model a node accepts (bytes).
const MAX_WEIGHTS: u64 = 2 << 30;

pub use crate::models::ACTIVE_FILE;

/// What a weights transfer on the link is for.
#[derive(Debug)]
pub enum Purpose {
    /// A training round (or the closing evaluation).
    Train(pb::TrainTask),
    /// A promoted model to install.
    Rollout(pb::ModelRollout),
}

/// A transfer whose weights are arriving from the coordinator.
#[derive(Debug)]
pub struct Incoming {
    purpose: Purpose,
    weights: Assembly<Vec<u8>>,
}

impl Incoming {
    pub fn new(purpose: Purpose) -> Incoming {
        let announced = match &purpose {
            Purpose::Train(t) => t.weights_bytes,
            Purpose::Rollout(r) => r.weights_bytes,
        };
        // Reserve the announced size only when it is allowed (a hostile size reserves nothing).
        let capacity = if announced <= MAX_WEIGHTS {
            announced as usize
        } else {
            0
        };
        Incoming {
            purpose,
            weights: Assembly::new(
                COORDINATOR,
                Vec::with_capacity(capacity),
                Some(announced),
                MAX_WEIGHTS,
            ),
        }
    }

    /// Appends a chunk; true when the transfer is complete.
    pub fn push(&mut self, chunk: &pb::Chunk) -> bool {
        self.weights.push(COORDINATOR, chunk.offset, &chunk.data);
        chunk.last
    }
}

/// Chunks on the link come from the coordinator, the link's other end.
const COORDINATOR: &str = "coordinator";

/// Acts on a complete transfer: trains (or evaluates) and reports, or installs a model.
pub async fn complete(state: Arc<Node>, incoming: Incoming, tx: mpsc::Sender<pb::NodeMessage>) {
    let (weights, problem) = match incoming.weights.finish() {
        Ok((weights, _, _)) => (weights, None),
        Err(problem) => (Vec::new(), Some(problem)),
    };
    match incoming.purpose {
        Purpose::Train(task) => answer(state, task, weights, problem, tx).await,
        Purpose::Rollout(rollout) => install(state, rollout, weights, problem, tx).await,
    }
}

/// A labels-file value for an annotation's text.
fn value_of(kind: &HeadKind, text: &str) -> Value {
    match kind {
        HeadKind::Regression { .. } => text
            .parse::<f64>()
            .map_or_else(|_| Value::String(text.into()), Value::from),
        HeadKind::MultiLabel { .. } => Value::Array(
            text.split([',', ';', '|'])
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.into()))
                .collect(),
        ),
        _ => Value::String(text.into()),
    }
}

/// Whether an annotated image is held out for evaluation (about 20%, by its hash).
pub fn held_out(image_sha256: &str) -> bool {
    image_sha256
        .get(..2)
        .and_then(|h| u8::from_str_radix(h, 16).ok())
        .is_some_and(|b| b < 52)
}

/// The node's annotated records as (training, held-out) datasets for `card`'s heads, and how
/// many annotated images could not be used (no kept input, or another input size).
pub fn local_datasets(
    store: &RecordStore,
    card: &ModelCard,
) -> Result<(Dataset, Dataset, usize), String> {
    let label_map = &card.label_map;
    let mut by_image: BTreeMap<String, Vec<(usize, String)>> = BTreeMap::new();
    for annotation in store.annotations() {
        let annotation = annotation.map_err(|e| e.to_string())?;
        if let Some((h, _)) = label_map.head(&annotation.field) {
            by_image
                .entry(annotation.image_sha256)
                .or_default()
                .push((h, annotation.value));
        }
    }
    let (mean, std) = (card.input.mean, card.input.std);
    let mut train = Vec::new();
    let mut held = Vec::new();
    let mut skipped = 0;
    for (sha, labels) in by_image {
        let Some((size, pixels)) = store.input(&sha).map_err(|e| e.to_string())? else {
            skipped += 1;
            continue;
        };
        if size != card.input.size {
            skipped += 1;
            continue;
        }
        let mut targets = vec![None; label_map.heads.len()];
        for (h, text) in labels {
            let head = &label_map.heads[h];
            // A label the head cannot read (an old category) is left out, not guessed.
            if let Ok(target) = parse_target(&head.kind, &value_of(&head.kind, &text)) {
                targets[h] = target;
            }
        }
        if targets.iter().all(Option::is_none) {
            continue;
        }
        let sample = Sample {
            input: crate::pipeline::dequantise(&pixels, mean, std),
            targets,
            name: sha.clone(),
        };
        if held_out(&sha) {
            held.push(sample);
        } else {
            train.push(sample);
        }
    }
    let dataset = |samples| Dataset {
        size: card.input.size,
        label_map: label_map.clone(),
        samples,
    };
    Ok((dataset(train), dataset(held), skipped))
}

/// A model card from the coordinator: checked, and only a cxrfed architecture in safetensors.
/// A TorchScript card is refused: it would run code from the federation inside libtorch.
fn peer_card(json: &str) -> Result<ModelCard, String> {
    let card = ModelCard::parse(json.as_bytes()).map_err(|e| e.to_string())?;
    if card.format != ModelFormat::Safetensors {
        return Err(format!(
            "a {} model from the coordinator is refused: only safetensors weights of a cxrfed architecture are accepted",
            card.format
        ));
    }
    Ok(card)
}

fn failed(task: &pb::TrainTask, reason: String) -> pb::TrainReport {
    pb::TrainReport {
        task_id: task.task_id.clone(),
        job_id: task.job_id.clone(),
        round: task.round,
        ok: false,
        reason,
        ..Default::default()
    }
}

/// Evaluates and (unless evaluate-only) trains: the report and the delta.
fn execute(
    store: &RecordStore,
    device: &str,
    task: &pb::TrainTask,
    weights: &[u8],
) -> Result<(pb::TrainReport, Vec<u8>), String> {
    let started = std::time::Instant::now();
    let sha = hex::encode(Sha256::digest(weights));
    if sha != task.weights_sha256 {
        return Err(format!(
            "the global weights' sha256 is {sha}, the task says {}",
            task.weights_sha256
        ));
    }
    let card = peer_card(&task.card_json)?;
    let spec = LocalSpec::from_json(&task.spec_json)?;
    let device = cxrfed_model::parse_device(device).map_err(|e| e.to_string())?;
    let mut model = Model::from_bytes(card.clone(), weights, device).map_err(|e| e.to_string())?;
    let (train, held, skipped) = local_datasets(store, &card)?;
    let metrics = if held.is_empty() {
        BTreeMap::new()
    } else {
        cxrfed_model::train::evaluate_model(&model, &held)
            .map_err(|e| e.to_string())?
            .flat()
    };
    let mut report = pb::TrainReport {
        task_id: task.task_id.clone(),
        job_id: task.job_id.clone(),
        round: task.round,
        ok: true,
        eval_samples: held.len() as u64,
        metrics: metrics.into_iter().collect(),
        ..Default::default()
    };
    if task.evaluate_only {
        report.train_seconds = started.elapsed().as_secs_f64();
        return Ok((report, Vec::new()));
    }
    if train.len() < 2 {
        return Err(format!(
            "{} annotated record(s) with a kept model input for these heads; at least 2 are needed ({skipped} annotated image(s) had no usable input)",
            train.len()
        ));
    }
    cxrfed_model::manual_seed(spec.seed.wrapping_add(u64::from(task.round)));
    let update = train_round(&mut model, &train, &spec).map_err(|e| e.to_string())?;
    report.samples = update.samples as u64;
    report.train_loss = update.train_loss;
    report.train_seconds = started.elapsed().as_secs_f64();
    report.update_sha256 = hex::encode(Sha256::digest(&update.delta));
    report.update_bytes = update.delta.len() as u64;
    Ok((report, update.delta))
}

/// Runs a complete task and sends the update chunks, then the report, on `tx`.
async fn answer(
    state: Arc<Node>,
    task: pb::TrainTask,
    weights: Vec<u8>,
    problem: Option<String>,
    tx: mpsc::Sender<pb::NodeMessage>,
) {
    let send = |kind| pb::NodeMessage { kind: Some(kind) };
    let outcome = match problem {
        Some(reason) => Err(reason),
        None => {
            let _turn = state.training_turn().await;
            tracing::info!(
                job_id = task.job_id.as_str(),
                round = task.round,
                evaluate_only = task.evaluate_only,
                "federated round: training"
            );
            let (state, task) = (state.clone(), task.clone());
            tokio::task::spawn_blocking(move || {
                execute(state.store(), &state.config().device, &task, &weights)
            })
            .await
            .unwrap_or_else(|_| Err("the training thread panicked".into()))
        }
    };
    let report = match outcome {
        Ok((report, delta)) => {
            let delta = prost::bytes::Bytes::from(delta);
            for chunk in cxrfed_proto::chunks(&task.task_id, delta) {
                if tx
                    .send(send(pb::node_message::Kind::Update(chunk)))
                    .await
                    .is_err()
                {
                    tracing::warn!(
                        task_id = task.task_id.as_str(),
                        "the link dropped while sending an update"
                    );
                    return;
                }
            }
            tracing::info!(
                job_id = task.job_id.as_str(),
                round = task.round,
                samples = report.samples,
                held_out = report.eval_samples,
                "federated round: update sent"
            );
            report
        }
        Err(reason) => {
            tracing::warn!(
                job_id = task.job_id.as_str(),
                round = task.round,
                reason = reason.as_str(),
                "federated round failed"
            );
            failed(&task, reason)
        }
    };
    let _ = tx
        .send(send(pb::node_message::Kind::TrainReport(report)))
        .await;
}

/// A safe directory name for a model version.
fn version_dir(version: &str) -> Result<String, String> {
    if cxrfed_schema::valid_model_version(version) {
        Ok(version.to_string())
    } else {
        Err(format!("model version {version:?} is not a safe name"))
    }
}

/// Writes a promoted model under `models/VERSION` (through a temporary directory and a
/// rename) and loads it, checking its sha256 and outputs.
fn prepare(state: &Node, rollout: &pb::ModelRollout, weights: &[u8]) -> Result<Model, String> {
    if state.config().model.trim() == "none" {
        return Err("this node runs without a model (--model none)".into());
    }
    let sha = hex::encode(Sha256::digest(weights));
    if sha != rollout.weights_sha256 {
        return Err(format!(
            "the weights' sha256 is {sha}, the rollout says {}",
            rollout.weights_sha256
        ));
    }
    let mut card = peer_card(&rollout.card_json)?;
    card.model_id = rollout.version.clone();
    card.weights = "model.safetensors".into();
    card.weights_sha256 = sha;
    let models = state.config().data_dir.join("models");
    let dir = models.join(version_dir(&rollout.version)?);
    let tmp = models.join(format!(".{}.incoming", version_dir(&rollout.version)?));
    let io = |e: std::io::Error| format!("{}: {e}", dir.display());
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io)?;
    std::fs::write(tmp.join("model.safetensors"), weights).map_err(io)?;
    card.save(&tmp).map_err(|e| e.to_string())?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(io)?;
    }
    std::fs::rename(&tmp, &dir).map_err(io)?;
    let device = cxrfed_model::parse_device(&state.config().device).map_err(|e| e.to_string())?;
    Model::load(&dir, device).map_err(|e| e.to_string())
}

/// Installs a promoted model: verify, write, load, switch the inference worker (requests in
/// flight finish on the old model), remember it across restarts, report, then re-extract the
/// stored records with it in the background.
async fn install(
    state: Arc<Node>,
    rollout: pb::ModelRollout,
    weights: Vec<u8>,
    problem: Option<String>,
    tx: mpsc::Sender<pb::NodeMessage>,
) {
    let outcome = match problem {
        Some(reason) => Err(reason),
        None => {
            let (st, r) = (state.clone(), rollout.clone());
            tokio::task::spawn_blocking(move || prepare(&st, &r, &weights))
                .await
                .unwrap_or_else(|_| Err("the model loader panicked".into()))
        }
    };
    let outcome = outcome.and_then(|model| {
        cxrfed_model::InferenceHandle::spawn(model, crate::models::worker_config(state.config()))
            .map_err(|e| e.to_string())
    });
    let report = match outcome {
        Ok(handle) => {
            state.pipeline().switch_model(handle.clone());
            let models = state.config().data_dir.join("models");
            let written = tempfile::NamedTempFile::new_in(&models).and_then(|mut file| {
                std::io::Write::write_all(&mut file, rollout.version.as_bytes())?;
                file.as_file().sync_all()?;
                file.persist(models.join(ACTIVE_FILE))
                    .map_err(|e| e.error)?;
                Ok(())
            });
            if let Err(e) = written {
                tracing::error!(error = %e, "cannot record the promoted model; a restart would load the configured one");
            }
            let records = state.store().count() as u64;
            tracing::info!(
                version = rollout.version.as_str(),
                sha256 = handle.card().weights_sha256.as_str(),
                records,
                "promoted model installed; inference switched, back-fill starting"
            );
            tokio::spawn(backfill(state.clone(), handle));
            pb::RolloutReport {
                rollout_id: rollout.rollout_id.clone(),
                version: rollout.version.clone(),
                ok: true,
                reason: String::new(),
                backfill_records: records,
            }
        }
        Err(reason) => {
            tracing::warn!(
                version = rollout.version.as_str(),
                reason = reason.as_str(),
                "promoted model refused"
            );
            pb::RolloutReport {
                rollout_id: rollout.rollout_id.clone(),
                version: rollout.version.clone(),
                ok: false,
                reason,
                backfill_records: 0,
            }
        }
    };
    let _ = tx
        .send(pb::NodeMessage {
            kind: Some(pb::node_message::Kind::RolloutReport(report)),
        })
        .await;
}

/// Re-extracts every stored record from its kept model input with `model`: findings, model
/// fields (custom heads) and the model id are replaced, the columns follow. Stops when another
/// model has replaced this one meanwhile.
pub async fn backfill(state: Arc<Node>, model: cxrfed_model::InferenceHandle) {
    let card = model.card().clone();
    let (mean, std) = (card.input.mean, card.input.std);
    let size = card.input.size as usize;
    let st = state.clone();
    let ids: Vec<(String, String)> = tokio::task::spawn_blocking(move || {
        st.store()
            .iter()
            .filter_map(Result::ok)
            .map(|r| (r.record_id, r.image_sha256))
            .collect()
    })
    .await
    .unwrap_or_default();
    let (total, started) = (ids.len(), std::time::Instant::now());
    let (mut done, mut skipped, mut failed) = (0usize, 0usize, 0usize);
    let progress = |done: usize, skipped: usize, failed: usize, state: &str| pb::BackfillStatus {
        model_id: card.model_id.clone(),
        total: total as u64,
        done: done as u64,
        skipped: skipped as u64,
        failed: failed as u64,
        state: state.to_string(),
    };
    state.set_backfill(progress(0, 0, 0, "running"));
    for (i, (record_id, sha)) in ids.into_iter().enumerate() {
        if i % 16 == 0 {
            state.set_backfill(progress(done, skipped, failed, "running"));
        }
        if state
            .pipeline()
            .model()
            .is_none_or(|m| m.card().weights_sha256 != card.weights_sha256)
        {
            tracing::info!(
                version = card.model_id.as_str(),
                done,
                total,
                "back-fill stopped: another model replaced this one"
            );
            state.set_backfill(progress(done, skipped, failed, "stopped"));
            return;
        }
        let input = match state.store().input(&sha) {
            Ok(Some((s, pixels))) if s as usize == size => pixels,
            _ => {
                skipped += 1;
                continue;
            }
        };
        let array = ndarray::Array2::from_shape_vec(
            (size, size),
            crate::pipeline::dequantise(&input, mean, std),
        );
        let Ok(array) = array else {
            skipped += 1;
            continue;
        };
        let prediction = match model.infer(array).await {
            Ok(p) => p,
            Err(e) => {
                failed += 1;
                tracing::warn!(record_id = record_id.as_str(), error = %e, "back-fill: inference failed");
                continue;
            }
        };
        match state
            .store()
            .set_model_output(
                &record_id,
                Some(prediction.findings(&card.label_map)),
                prediction.custom_values(&card.label_map),
                &card.model_id,
                &card.weights_sha256,
            )
            .await
        {
            Ok(Some(record)) => {
                state.columns().write().upsert(&record);
                done += 1;
            }
            Ok(None) => skipped += 1,
            Err(e) => {
                failed += 1;
                tracing::warn!(record_id = record_id.as_str(), error = %e, "back-fill: cannot store");
            }
        }
        if done > 0 && done % 500 == 0 {
            tracing::info!(
                version = card.model_id.as_str(),
                done,
                total,
                "back-fill progress"
            );
        }
    }
    state.set_backfill(progress(done, skipped, failed, "finished"));
    tracing::info!(
        version = card.model_id.as_str(),
        done,
        skipped,
        failed,
        total,
        seconds = started.elapsed().as_secs_f64(),
        "back-fill finished"
    );
}
