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
use cxrfed_model::federated::train_round;
use cxrfed_model::train::{Dataset, Sample, parse_target};
use cxrfed_model::{HeadKind, Model, ModelCard, ModelFormat};
use cxrfed_proto::v1 as pb;
use cxrfed_store::RecordStore;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::orders::{Ordered, Refusal};
use crate::state::Node;

/// The largest global model a node accepts (bytes).
const MAX_WEIGHTS: u64 = 2 << 30;

use crate::error::NodeError;
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
    let wanted = cxrfed_model::preprocess_options(&card.input).signature();
    let mut train = Vec::new();
    let mut held = Vec::new();
    let mut skipped = 0;
    for (sha, labels) in by_image {
        let Some(kept) = store.input(&sha).map_err(|e| e.to_string())? else {
            skipped += 1;
            continue;
        };
        // Made by another preprocessing (another size, aspect or pipeline): not this model's.
        if !kept.suits(&wanted) {
            skipped += 1;
            continue;
        }
        let pixels = kept.pixels;
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

fn refused_report(task: &pb::TrainTask, refusal: &Refusal) -> pb::TrainReport {
    pb::TrainReport {
        task_id: task.task_id.clone(),
        job_id: task.job_id.clone(),
        round: task.round,
        ok: false,
        reason: refusal.message.clone(),
        refused_rule: refusal.rule.clone(),
        ..Default::default()
    }
}

/// What a verified, checked and charged round produced: the report so far and, unless it was
/// an evaluation, the clipped and noised delta with the weight the site applies.
struct Trained {
    report: pb::TrainReport,
    update: Option<(cxrfed_fl::Weights, f64)>,
    spec: cxrfed_fl::JobSpec,
}

/// The heads a job's metrics are released for: the job's trained heads the card has.
fn released_heads(spec: &cxrfed_fl::JobSpec, card: &ModelCard) -> Vec<String> {
    let mut heads = spec.trained_heads();
    if heads.is_empty() {
        heads = card
            .label_map
            .heads
            .iter()
            .map(|h| h.name.clone())
            .collect();
    }
    heads.retain(|h| card.label_map.head(h).is_some());
    heads
}

/// Checks a round's weights against the order: the first round of a job starts from the
/// ordered base (its sha256; with new heads, every new head's tensors are zero).
fn check_weights(
    spec: &cxrfed_fl::JobSpec,
    order: &pb::Order,
    round: u32,
    weights: &[u8],
    sha: &str,
) -> Result<(), Refusal> {
    if round != 1 {
        return Ok(());
    }
    if spec.new_heads.is_empty() {
        if sha != order.model_sha256 {
            return Err(Refusal::new(
                "order-model",
                "the first round's weights are not the ordered base model",
            ));
        }
        return Ok(());
    }
    let decoded = cxrfed_fl::tensor::decode(weights)
        .map_err(|_| Refusal::new("order-model", "the weights are not f32 safetensors"))?;
    for head in &spec.new_heads {
        for part in ["weight", "bias"] {
            let zero = decoded
                .get(&format!("heads.{}.{part}", head.name))
                .is_some_and(|t| t.data.iter().all(|v| *v == 0.0));
            if !zero {
                return Err(Refusal::new(
                    "order-model",
                    format!("the new head {} does not start at zero", head.name),
                ));
            }
        }
    }
    Ok(())
}

/// Verifies, checks against the site policy, charges the training account, evaluates
/// (noisy counts) and, unless evaluate-only, trains, clips and noises. Runs on a blocking
/// thread; `runtime` runs the ledger's charge.
fn execute(
    state: &Node,
    task: &pb::TrainTask,
    weights: &[u8],
    ordered: &Ordered,
    runtime: &tokio::runtime::Handle,
) -> Result<Trained, Refusal> {
    let started = std::time::Instant::now();
    let internal = |e: String| {
        tracing::warn!(error = e.as_str(), "federated round: internal error");
        Refusal::new("internal", "the site could not run the task")
    };
    let sha = hex::encode(Sha256::digest(weights));
    if sha != task.weights_sha256 {
        return Err(Refusal::new(
            "transfer",
            "the global weights do not match their sha256",
        ));
    }
    let spec = ordered
        .verified
        .spec
        .clone()
        .ok_or_else(|| Refusal::new("order-spec", "the order carries no job"))?;
    let order = &ordered.verified.order;
    // Rounds and attempts the order covers: 1..=rounds, then the closing evaluation.
    let evaluation_round = spec.rounds + 1;
    let in_order = if task.evaluate_only {
        task.round == evaluation_round
    } else {
        (1..=spec.rounds).contains(&task.round)
    };
    if !in_order || task.attempt == 0 || task.attempt > spec.attempts.saturating_mul(10) {
        return Err(Refusal::new(
            "order-rounds",
            "the task's round or attempt is outside what the order covers",
        ));
    }
    let prefix = format!("order:{}:{}:", ordered.verified.fingerprint, order.nonce);
    let store = state.store();
    let (policy, _, _) = crate::orders::policy(state).map_err(|e| internal(e.to_string()))?;
    let charged = store
        .charges_with_prefix(&prefix)
        .map_err(|e| internal(e.to_string()))?;
    let jobs_last_day = store
        .orders_since(chrono::Utc::now() - chrono::Duration::hours(24))
        .map_err(|e| internal(e.to_string()))?;
    policy.check(
        &spec,
        &cxrfed_fl::policy::TaskContext {
            signer: &ordered.signer.uri(),
            base_version: &order.model_version,
            base_sha256: &order.model_sha256,
            evaluate_only: task.evaluate_only,
            new_job: charged == 0,
            jobs_last_day: jobs_last_day as u32,
        },
    )?;
    check_weights(&spec, order, task.round, weights, &sha)?;
    let card = peer_card(&task.card_json).map_err(|m| Refusal::new("model-format", m))?;
    let heads = released_heads(&spec, &card);
    if heads.is_empty() {
        return Err(Refusal::new(
            "order-spec",
            "the model has none of the job's heads",
        ));
    }
    // The local settings come from the signed job, not from the coordinator's copy.
    let local = spec.local();
    let device =
        cxrfed_model::parse_device(&state.config().device).map_err(|e| internal(e.to_string()))?;
    let model = Model::from_bytes(card.clone(), weights, device)
        .map_err(|_| Refusal::new("model-format", "the global model does not load"))?;
    let (train, held, _skipped) = local_datasets(store, &card).map_err(internal)?;

    // The charge: the update's increment of the job's composed ε (Gaussian, zCDP via
    // opendp's map), the job's δ on its first update, and the metrics' ε; once per round
    // attempt of this order (a replay is refused by the ledger).
    let evaluations = store
        .charges_with_prefix(&format!("{prefix}r{evaluation_round}:"))
        .map_err(|e| internal(e.to_string()))?;
    let updates_so_far = (charged - evaluations) as u32;
    let noised = spec.noise_multiplier > 0.0;
    let (update_epsilon, delta) = if task.evaluate_only || !noised {
        (0.0, 0.0)
    } else {
        let eps = cxrfed_stats::dp::gaussian_increment(
            spec.noise_multiplier,
            updates_so_far + 1,
            spec.dp_delta,
        )
        .map_err(|e| internal(e.to_string()))?;
        (
            eps,
            if updates_so_far == 0 {
                spec.dp_delta
            } else {
                0.0
            },
        )
    };
    let epsilon = update_epsilon + spec.metrics_epsilon;
    let what = if task.evaluate_only {
        "evaluation (noisy counts)".to_string()
    } else if noised {
        format!(
            "update (clip {}, noise multiplier {}) and noisy counts",
            spec.clip, spec.noise_multiplier
        )
    } else {
        "update WITHOUT DP noise (allowed by the site policy) and noisy counts".to_string()
    };
    let mut event = crate::privacy::event(
        Some(&ordered.signer),
        "TrainRound",
        format!(
            "job {} round {} attempt {}: {what}",
            task.job_id, task.round, task.attempt
        ),
        crate::privacy::digest_of(&order.nonce),
    );
    event.via = "coordinator".into();
    let account = crate::privacy::training_account(state.study());
    let key = ordered.verified.charge_key(task.round, task.attempt);
    runtime
        .block_on(store.charge(
            &account,
            epsilon,
            delta,
            cxrfed_store::Limit::Budget(state.dp().training_budget),
            event,
            Some(&key),
        ))
        .map_err(|e| match e {
            cxrfed_store::StoreError::Replay { .. } => Refusal::new(
                "order-replay",
                "this round of the order was already answered",
            ),
            cxrfed_store::StoreError::BudgetExhausted { .. } => Refusal::new(
                "training-budget",
                "the study's training budget at this site is exhausted",
            ),
            other => internal(other.to_string()),
        })?;

    // Held-out metrics as noisy counts: per released head its total and correct predictions,
    // and the training sample count; one record changes at most 2 per head.
    let metrics = if held.is_empty() {
        None
    } else {
        Some(
            cxrfed_model::train::evaluate_model(&model, &held)
                .map_err(|e| internal(e.to_string()))?,
        )
    };
    let mut exact: Vec<i64> = vec![train.len() as i64];
    for head in &heads {
        let m = metrics.as_ref().and_then(|m| m.head(head));
        let n = m.map_or(0, |m| m.n) as i64;
        let correct = m
            .and_then(|m| m.accuracy)
            .map_or(0, |a| (a * n as f64).round() as i64);
        exact.extend([n, correct]);
    }
    let sensitivity = (2 * heads.len()).max(1) as u32;
    let noisy = cxrfed_stats::dp::noisy_counts(&exact, sensitivity, spec.metrics_epsilon)
        .map_err(|e| internal(e.to_string()))?;
    let mut report = pb::TrainReport {
        task_id: task.task_id.clone(),
        job_id: task.job_id.clone(),
        round: task.round,
        ok: true,
        samples: noisy[0].max(0) as u64,
        eval_samples: noisy.get(1).copied().unwrap_or(0).max(0) as u64,
        epsilon_charged: epsilon,
        delta_charged: delta,
        ..Default::default()
    };
    if report.eval_samples >= u64::from(policy.min_held_out) {
        for (i, head) in heads.iter().enumerate() {
            let (total, correct) = (noisy[1 + 2 * i], noisy[2 + 2 * i]);
            report
                .metrics
                .insert(format!("{head}.total"), total.max(0) as f64);
            report
                .metrics
                .insert(format!("{head}.correct"), correct.max(0) as f64);
        }
    }
    drop(exact);
    if task.evaluate_only {
        report.train_seconds = started.elapsed().as_secs_f64();
        return Ok(Trained {
            report,
            update: None,
            spec,
        });
    }
    if train.len() < 2 {
        return Err(Refusal::new(
            "labelled-records",
            "too few labelled records with a kept model input for the job's heads",
        ));
    }
    let steps = if local.max_steps > 0 {
        local.max_steps
    } else {
        local.epochs * train.len().div_ceil(local.batch_size.max(1))
    };
    policy.check_steps(steps)?;
    let mut model = model;
    cxrfed_model::manual_seed(spec.seed.wrapping_add(u64::from(task.round)));
    let update = train_round(&mut model, &train, &local).map_err(|e| internal(e.to_string()))?;
    let mut delta_weights =
        cxrfed_fl::tensor::decode(&update.delta).map_err(|e| internal(e.to_string()))?;
    if local.noise_std > 0.0 {
        for tensor in delta_weights.values_mut() {
            let values: Vec<f64> = tensor.data.iter().map(|v| f64::from(*v)).collect();
            let noisy = cxrfed_stats::dp::gaussian_noise(&values, local.noise_std)
                .map_err(|e| internal(e.to_string()))?;
            tensor.data = noisy.into_iter().map(|v| v as f32).collect();
        }
    }
    let weight = if spec.differentially_private() {
        1.0
    } else {
        (report.samples as f64).clamp(1.0, spec.max_site_weight as f64)
    };
    report.weight = weight;
    report.train_seconds = started.elapsed().as_secs_f64();
    Ok(Trained {
        report,
        update: Some((delta_weights, weight)),
        spec,
    })
}

/// Runs a complete task and sends the update chunks, then the report, on `tx`. Any refusal
/// comes back as a report naming the rule; nothing is trained, evaluated or charged before
/// the order and the policy pass.
async fn answer(
    state: Arc<Node>,
    task: pb::TrainTask,
    weights: Vec<u8>,
    problem: Option<String>,
    tx: mpsc::Sender<pb::NodeMessage>,
) {
    let send = |kind| pb::NodeMessage { kind: Some(kind) };
    let report = match run(&state, &task, weights, problem, &tx).await {
        Ok(Some(report)) => report,
        // The link dropped while sending the update: nothing more to say.
        Ok(None) => return,
        Err(refusal) => {
            tracing::warn!(
                job_id = task.job_id.as_str(),
                round = task.round,
                rule = refusal.rule.as_str(),
                reason = refusal.message.as_str(),
                "federated task refused"
            );
            refused_report(&task, &refusal)
        }
    };
    let _ = tx
        .send(send(pb::node_message::Kind::TrainReport(report)))
        .await;
}

async fn run(
    state: &Arc<Node>,
    task: &pb::TrainTask,
    weights: Vec<u8>,
    problem: Option<String>,
    tx: &mpsc::Sender<pb::NodeMessage>,
) -> Result<Option<pb::TrainReport>, Refusal> {
    if let Some(problem) = problem {
        tracing::warn!(problem = problem.as_str(), "global weights transfer failed");
        return Err(Refusal::new(
            "transfer",
            "the global weights did not arrive whole",
        ));
    }
    let ordered = crate::orders::verify(state, task.order.as_ref(), pb::OrderKind::Job)?;
    let trained = {
        let _turn = state.training_turn().await;
        tracing::info!(
            job_id = task.job_id.as_str(),
            round = task.round,
            evaluate_only = task.evaluate_only,
            signer = %ordered.signer,
            "federated round: training"
        );
        let (st, t, o) = (state.clone(), task.clone(), ordered.clone());
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || execute(&st, &t, &weights, &o, &runtime))
            .await
            .unwrap_or_else(|_| Err(Refusal::new("internal", "the training thread panicked")))?
    };
    let Trained {
        mut report,
        update,
        spec,
    } = trained;
    let Some((delta, weight)) = update else {
        return Ok(Some(report));
    };
    let bytes = if task.secure_aggregation {
        if !spec.secure_aggregation {
            return Err(Refusal::new(
                "order-spec",
                "the coordinator asks for masking the order does not",
            ));
        }
        let masked = mask_update(state, task, &ordered, &spec, &delta, weight, tx).await?;
        report.masked = true;
        masked
    } else {
        if spec.secure_aggregation {
            return Err(Refusal::new(
                "order-spec",
                "the order asks for secure aggregation; the coordinator did not",
            ));
        }
        cxrfed_fl::tensor::encode(&delta)
            .map_err(|_| Refusal::new("internal", "the site could not encode its update"))?
    };
    report.update_sha256 = hex::encode(Sha256::digest(&bytes));
    report.update_bytes = bytes.len() as u64;
    let send = |kind| pb::NodeMessage { kind: Some(kind) };
    for chunk in cxrfed_proto::chunks(&task.task_id, prost::bytes::Bytes::from(bytes)) {
        if tx
            .send(send(pb::node_message::Kind::Update(chunk)))
            .await
            .is_err()
        {
            tracing::warn!(
                task_id = task.task_id.as_str(),
                "the link dropped while sending an update"
            );
            return Ok(None);
        }
    }
    tracing::info!(
        job_id = task.job_id.as_str(),
        round = task.round,
        masked = report.masked,
        epsilon = report.epsilon_charged,
        "federated round: update sent"
    );
    Ok(Some(report))
}

/// Secure aggregation at the site: a fresh X25519 key for this attempt, signed with the node
/// key and sent; then the key set from the coordinator, each peer's key verified (study CA,
/// role node, its site, its signature), and the fixed-point update masked with every peer.
async fn mask_update(
    state: &Arc<Node>,
    task: &pb::TrainTask,
    ordered: &Ordered,
    spec: &cxrfed_fl::JobSpec,
    delta: &cxrfed_fl::Weights,
    weight: f64,
    tx: &mpsc::Sender<pb::NodeMessage>,
) -> Result<Vec<u8>, Refusal> {
    use cxrfed_fl::secagg;
    let internal = |m: &str| Refusal::new("secure-aggregation", m.to_string());
    let site = state.config().site.clone();
    let (Some(cert), Some(key)) = (&state.config().cert, &state.config().key) else {
        return Err(internal(
            "this node has no certificate to sign its round key",
        ));
    };
    let signer = cxrfed_auth::signing::Signer::load(cert, key)
        .map_err(|_| internal("the node key cannot sign"))?;
    let keys = secagg::KeyPair::generate().map_err(|_| internal("no randomness"))?;
    let statement = |site: &str, public: &[u8]| {
        secagg::key_statement(
            state.study(),
            &task.job_id,
            task.round,
            task.attempt,
            site,
            public,
        )
    };
    let mine = pb::MaskKey {
        task_id: task.task_id.clone(),
        site: site.clone(),
        public_key: keys.public().to_vec(),
        signature: signer
            .sign(&statement(&site, &keys.public()))
            .map_err(|_| internal("the node key cannot sign"))?,
        certificate: signer.certificate().to_vec(),
    };
    let peers_rx = state.await_mask_peers(&task.task_id);
    tx.send(pb::NodeMessage {
        kind: Some(pb::node_message::Kind::MaskKey(mine)),
    })
    .await
    .map_err(|_| internal("the link dropped before the key exchange"))?;
    let wait = std::time::Duration::from_secs(spec.round_deadline_secs);
    let peers = tokio::time::timeout(wait, peers_rx)
        .await
        .map_err(|_| {
            state.forget_mask_peers(&task.task_id);
            internal("no key set before the round deadline")
        })?
        .map_err(|_| internal("the key set never came"))?;
    let Some(tls) = state.tls() else {
        return Err(internal("this node cannot verify its peers' certificates"));
    };
    let material = tls.current();
    let mut verified = Vec::new();
    for peer in &peers.keys {
        let identity = material
            .verify_signer(&peer.certificate, cxrfed_auth::Role::Node)
            .map_err(|e| internal(&format!("a peer's key: {e}")))?;
        if identity.site.as_deref() != Some(&peer.site) {
            return Err(internal("a peer's key is not signed by that site's node"));
        }
        if !ordered.verified.order.sites.is_empty()
            && !ordered.verified.order.sites.contains(&peer.site)
        {
            return Err(internal("the key set holds a site the order does not name"));
        }
        cxrfed_auth::signing::verify(
            &peer.certificate,
            &statement(&peer.site, &peer.public_key),
            &peer.signature,
        )
        .map_err(|_| internal("a peer's key signature does not verify"))?;
        verified.push((peer.site.clone(), peer.public_key.clone()));
    }
    let sites: std::collections::BTreeSet<&str> =
        verified.iter().map(|(s, _)| s.as_str()).collect();
    if sites.len() != verified.len() {
        return Err(internal("the key set names a site twice"));
    }
    if !verified
        .iter()
        .any(|(s, k)| *s == site && k.as_slice() == keys.public())
    {
        return Err(internal("the key set does not hold this site's key"));
    }
    if verified.len() < (spec.min_sites as usize).max(2) {
        return Err(internal("the key set is smaller than min_sites"));
    }
    let context = format!(
        "{}/{}/{}/{}",
        state.study(),
        task.job_id,
        task.round,
        task.attempt
    );
    let mut encoded = secagg::encode(delta, weight)
        .map_err(|_| internal("the update does not fit the encoding"))?;
    secagg::mask(&mut encoded, &site, &keys, &verified, context.as_bytes())
        .map_err(|_| internal("masking failed"))?;
    secagg::to_bytes(&encoded).map_err(|_| internal("masking failed"))
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
fn prepare(
    state: &Node,
    rollout: &pb::ModelRollout,
    ordered: &Ordered,
    weights: &[u8],
) -> Result<Model, Refusal> {
    let order = &ordered.verified.order;
    let sha = hex::encode(Sha256::digest(weights));
    if sha != rollout.weights_sha256 {
        return Err(Refusal::new(
            "transfer",
            "the weights do not match their sha256",
        ));
    }
    if order.model_version != rollout.version || order.model_sha256 != sha {
        return Err(Refusal::new(
            "order-model",
            "the rollout is not the model the study admin promoted",
        ));
    }
    let (policy, _, _) = crate::orders::policy(state)
        .map_err(|_| Refusal::new("internal", "the site policy is unreadable"))?;
    policy.check_signer(&ordered.signer.uri())?;
    let mut card = peer_card(&rollout.card_json).map_err(|m| Refusal::new("model-format", m))?;
    if state.config().model.trim() == "none" {
        return Err(Refusal::new(
            "model-none",
            "this node runs without a model (--model none)",
        ));
    }
    card.model_id = rollout.version.clone();
    card.weights = "model.safetensors".into();
    card.weights_sha256 = sha;
    let io = |e: std::io::Error| {
        tracing::warn!(error = %e, "cannot write a promoted model");
        Refusal::new("internal", "the site could not write the model")
    };
    let version = version_dir(&rollout.version).map_err(|m| Refusal::new("model-format", m))?;
    let models = state.config().data_dir.join("models");
    let dir = models.join(&version);
    let tmp = models.join(format!(".{version}.incoming"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io)?;
    std::fs::write(tmp.join("model.safetensors"), weights).map_err(io)?;
    card.save(&tmp)
        .map_err(|_| Refusal::new("internal", "the site could not write the model card"))?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(io)?;
    }
    std::fs::rename(&tmp, &dir).map_err(io)?;
    let device = cxrfed_model::parse_device(&state.config().device)
        .map_err(|_| Refusal::new("internal", "no device"))?;
    Model::load(&dir, device).map_err(|_| Refusal::new("model-format", "the model does not load"))
}

/// Switches inference to `handle`, remembers it across restarts (the model it replaces goes
/// into `models/HISTORY` unless `rolling_back`), and back-fills in the background.
fn switch_to(
    state: &Arc<Node>,
    handle: cxrfed_model::InferenceHandle,
    version: &str,
    rolling_back: bool,
) {
    let config = state.config();
    let previous = crate::models::active_version(config);
    state.pipeline().switch_model(handle.clone());
    if !rolling_back && previous != version {
        let mut history = crate::models::history(config);
        history.retain(|v| v != version);
        history.push(previous);
        if let Err(e) = crate::models::write_history(config, &history) {
            tracing::error!(error = %e, "cannot record the model history; rollback will not find the previous model");
        }
    }
    if let Err(e) = crate::models::set_active(config, version) {
        tracing::error!(error = %e, "cannot record the active model; a restart would load the configured one");
    }
    tokio::spawn(backfill(state.clone(), handle));
}

/// Installs a promoted model: verify the signed promotion (signer, study, validity, the exact
/// version and sha256), write, load, switch the inference worker (requests in flight finish
/// on the old model), remember it across restarts, report, then re-extract the stored records
/// with it in the background (restoring a record's earlier output where that model made one).
async fn install(
    state: Arc<Node>,
    rollout: pb::ModelRollout,
    weights: Vec<u8>,
    problem: Option<String>,
    tx: mpsc::Sender<pb::NodeMessage>,
) {
    let outcome = match problem {
        Some(_) => Err(Refusal::new("transfer", "the weights did not arrive whole")),
        None => match crate::orders::verify(&state, rollout.order.as_ref(), pb::OrderKind::Promote)
        {
            Err(refusal) => Err(refusal),
            Ok(ordered) => {
                let (st, r) = (state.clone(), rollout.clone());
                tokio::task::spawn_blocking(move || prepare(&st, &r, &ordered, &weights))
                    .await
                    .unwrap_or_else(|_| Err(Refusal::new("internal", "the model loader panicked")))
            }
        },
    };
    let outcome = outcome.and_then(|model| {
        cxrfed_model::InferenceHandle::spawn(model, crate::models::worker_config(state.config()))
            .map_err(|_| Refusal::new("internal", "the inference worker did not start"))
    });
    let report = match outcome {
        Ok(handle) => {
            let records = state.store().count() as u64;
            let published = state.config().published_count(records);
            tracing::info!(
                version = rollout.version.as_str(),
                sha256 = handle.card().weights_sha256.as_str(),
                records,
                "promoted model installed; inference switched, back-fill starting"
            );
            switch_to(&state, handle, &rollout.version, false);
            pb::RolloutReport {
                rollout_id: rollout.rollout_id.clone(),
                version: rollout.version.clone(),
                ok: true,
                reason: String::new(),
                backfill_records: published,
            }
        }
        Err(refusal) => {
            tracing::warn!(
                version = rollout.version.as_str(),
                rule = refusal.rule.as_str(),
                reason = refusal.message.as_str(),
                "promoted model refused"
            );
            pb::RolloutReport {
                rollout_id: rollout.rollout_id.clone(),
                version: rollout.version.clone(),
                ok: false,
                reason: refusal.to_string(),
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

/// Rolls the node back to the model that ran before the current one (site admin): reload it,
/// switch, and restore every record's findings from its history (re-extracting only records
/// the restored model never saw).
pub async fn rollback(state: &Arc<Node>) -> Result<pb::RollbackModelResponse, NodeError> {
    let config = state.config();
    let mut history = crate::models::history(config);
    let Some(previous) = history.pop() else {
        return Err(NodeError::FailedPrecondition(
            "no earlier model to roll back to (this node has run one model)".into(),
        ));
    };
    let replaced = crate::models::active_version(config);
    let (cfg, version) = (config.clone(), previous.clone());
    let model = tokio::task::spawn_blocking(move || crate::models::load_version(&cfg, &version))
        .await
        .map_err(|_| NodeError::Internal("the model loader panicked".into()))?
        .map_err(|e| NodeError::FailedPrecondition(format!("model {previous}: {e}")))?;
    let handle = cxrfed_model::InferenceHandle::spawn(model, crate::models::worker_config(config))
        .map_err(|e| NodeError::Internal(e.to_string()))?;
    let sha = handle.card().weights_sha256.clone();
    let model_id = handle.card().model_id.clone();
    crate::models::write_history(config, &history)
        .map_err(|e| NodeError::Internal(format!("model history: {e}")))?;
    let st = state.clone();
    let restorable = tokio::task::spawn_blocking(move || {
        st.store()
            .iter()
            .filter_map(Result::ok)
            .filter(|r| {
                st.store()
                    .model_history(&r.record_id)
                    .is_ok_and(|h| h.iter().any(|o| o.model_sha256 == sha))
            })
            .count() as u64
    })
    .await
    .unwrap_or(0);
    let total = state.store().count() as u64;
    tracing::warn!(
        from = replaced.as_str(),
        to = previous.as_str(),
        restorable,
        "model rolled back by the site admin"
    );
    switch_to(state, handle, &previous, true);
    Ok(pb::RollbackModelResponse {
        model_id,
        replaced,
        restored: restorable,
        reextracted: total.saturating_sub(restorable),
    })
}

/// Re-extracts every stored record from its kept model input with `model`: findings, model
/// fields (custom heads) and the model id are replaced, the columns follow. Stops when another
/// model has replaced this one meanwhile.
pub async fn backfill(state: Arc<Node>, model: cxrfed_model::InferenceHandle) {
    let card = model.card().clone();
    let (mean, std) = (card.input.mean, card.input.std);
    let size = card.input.size as usize;
    let wanted = cxrfed_model::preprocess_options(&card.input).signature();
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
        // This model's own earlier output for the record (a rollback): restored as it was.
        let earlier = state.store().model_history(&record_id).ok().and_then(|h| {
            h.into_iter()
                .rev()
                .find(|o| o.model_sha256 == card.weights_sha256)
        });
        let output = match earlier {
            Some(output) => output,
            None => {
                // Only an input this model's preprocessing made: another one (the earlier
                // model's size, aspect or pipeline) would give it the wrong picture.
                let input = match state.store().input(&sha) {
                    Ok(Some(kept)) if kept.suits(&wanted) => kept.pixels,
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
                cxrfed_store::ModelOutput {
                    model_id: card.model_id.clone(),
                    model_sha256: card.weights_sha256.clone(),
                    findings: Some(prediction.findings(&card.label_map)),
                    model_fields: prediction.custom_values(&card.label_map),
                    replaced_at: String::new(),
                }
            }
        };
        match state
            .store()
            .replace_model_output(&record_id, &output)
            .await
        {
            Ok(Some(record)) => {
                if let Err(e) = state.columns().update(move |c| c.upsert(&record)).await {
                    // The store holds it; the columns are rebuilt from the store at start.
                    tracing::warn!(record_id = record_id.as_str(), error = %e, "back-fill: not indexed");
                }
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
