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

use cxrfed_model::federated::{LocalSpec, train_round};
use cxrfed_model::train::{Dataset, Sample, parse_target};
use cxrfed_model::{HeadKind, Model, ModelCard};
use cxrfed_proto::CHUNK_BYTES;
use cxrfed_proto::v1 as pb;
use cxrfed_store::RecordStore;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::service::NodeState;

/// One round at a time: training takes the node's cores.
static TRAINING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The largest global model a node accepts (bytes).
const MAX_WEIGHTS: u64 = 2 << 30;

/// A task whose weights are arriving.
#[derive(Debug)]
pub struct Incoming {
    task: pb::TrainTask,
    weights: Vec<u8>,
    broken: Option<String>,
}

impl Incoming {
    pub fn new(task: pb::TrainTask) -> Incoming {
        let broken = (task.weights_bytes > MAX_WEIGHTS)
            .then(|| format!("the model is larger than {MAX_WEIGHTS} bytes"));
        let capacity = if broken.is_some() {
            0
        } else {
            task.weights_bytes as usize
        };
        Incoming {
            task,
            weights: Vec::with_capacity(capacity),
            broken,
        }
    }

    /// Appends a chunk; true when the transfer is complete.
    pub fn push(&mut self, chunk: &pb::Chunk) -> bool {
        if self.broken.is_none() {
            if chunk.offset != self.weights.len() as u64 {
                self.broken = Some(format!(
                    "weights chunk at offset {} where {} was expected",
                    chunk.offset,
                    self.weights.len()
                ));
            } else if self.weights.len() as u64 + chunk.data.len() as u64 > self.task.weights_bytes
            {
                self.broken = Some("more weights than announced".into());
            } else {
                self.weights.extend_from_slice(&chunk.data);
            }
        }
        chunk.last
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
            input: pixels
                .iter()
                .map(|p| (f32::from(*p) / 255.0 - mean) / std)
                .collect(),
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
    let sha = hex::encode(Sha256::digest(weights));
    if sha != task.weights_sha256 {
        return Err(format!(
            "the global weights' sha256 is {sha}, the task says {}",
            task.weights_sha256
        ));
    }
    let card: ModelCard =
        serde_json::from_str(&task.card_json).map_err(|e| format!("model card: {e}"))?;
    card.label_map.validate()?;
    let spec: LocalSpec =
        serde_json::from_str(&task.spec_json).map_err(|e| format!("training settings: {e}"))?;
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
    report.train_seconds = update.seconds;
    report.update_sha256 = hex::encode(Sha256::digest(&update.delta));
    report.update_bytes = update.delta.len() as u64;
    Ok((report, update.delta))
}

/// Runs a complete task and sends the update chunks, then the report, on `tx`.
pub async fn answer(state: Arc<NodeState>, incoming: Incoming, tx: mpsc::Sender<pb::NodeMessage>) {
    let task = incoming.task.clone();
    let send = |kind| pb::NodeMessage { kind: Some(kind) };
    let outcome = match incoming.broken {
        Some(reason) => Err(reason),
        None if incoming.weights.len() as u64 != task.weights_bytes => Err(format!(
            "{} weights bytes arrived of {}",
            incoming.weights.len(),
            task.weights_bytes
        )),
        None => {
            let _turn = TRAINING.lock().await;
            tracing::info!(
                job_id = task.job_id.as_str(),
                round = task.round,
                evaluate_only = task.evaluate_only,
                "federated round: training"
            );
            let (state, task, weights) = (state.clone(), task.clone(), incoming.weights);
            tokio::task::spawn_blocking(move || {
                execute(&state.store, &state.config.device, &task, &weights)
            })
            .await
            .unwrap_or_else(|_| Err("the training thread panicked".into()))
        }
    };
    let report = match outcome {
        Ok((report, delta)) => {
            let delta = prost::bytes::Bytes::from(delta);
            let mut offset = 0;
            while offset < delta.len() {
                let end = (offset + CHUNK_BYTES).min(delta.len());
                let chunk = pb::Chunk {
                    task_id: task.task_id.clone(),
                    offset: offset as u64,
                    data: delta.slice(offset..end),
                    last: end == delta.len(),
                };
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
                offset = end;
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
