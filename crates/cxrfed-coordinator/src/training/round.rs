//! One attempt of one round (or of the closing evaluation), in steps: choose the sites,
//! send them the task and the weights, collect and check their updates until the deadline,
//! then either record the failure or aggregate, write the new global model and commit it with
//! the round log.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cxrfed_fl::secagg::MaskedSum;
use cxrfed_fl::{
    AdamMoments, Aggregator, Algorithm, JobSpec, RoundState, ServerAdam, SiteStatus, Weights,
};
use cxrfed_proto::v1 as pb;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Trainer;
use super::docs::{JobDoc, ModelDoc, RoundDoc, SiteDoc};
use super::hub::{Inbound, Report, Upload};
use super::registry::now;
use super::rollout::stream_weights;
use crate::error::CoordinatorError;
use crate::links::Outbound;

/// Which attempt of which round.
#[derive(Debug, Clone, Copy)]
pub(super) struct Attempt {
    pub round: u32,
    pub number: u32,
    /// No retry follows a failure of this attempt.
    pub last: bool,
    /// The closing evaluation of the final model (no training, no new version).
    pub evaluation: bool,
}

/// Why an attempt did not complete.
#[derive(Debug)]
pub(super) enum RoundError {
    /// The job was cancelled: stop quietly.
    Cancelled,
    /// Too few sites, or too few usable updates: the reason goes into the round log and the
    /// attempt may be retried.
    Failed(String),
    /// The coordinator itself failed (store, weight files): the job stops.
    Coordinator(CoordinatorError),
}

impl From<CoordinatorError> for RoundError {
    fn from(e: CoordinatorError) -> Self {
        RoundError::Coordinator(e)
    }
}

impl From<cxrfed_fl::AggregateError> for RoundError {
    fn from(e: cxrfed_fl::AggregateError) -> Self {
        RoundError::Coordinator(e.into())
    }
}

impl From<cxrfed_fl::tensor::CodecError> for RoundError {
    fn from(e: cxrfed_fl::tensor::CodecError) -> Self {
        RoundError::Coordinator(e.into())
    }
}

/// The provenance a federated version's card records.
#[derive(Debug, Serialize)]
struct Provenance<'a> {
    federated: bool,
    job_id: &'a str,
    round: u32,
    parent: &'a str,
    algorithm: Algorithm,
    sites: &'a [String],
    samples: &'a [u64],
}

/// What the collection phase leaves behind.
struct Collected {
    accepted: HashSet<String>,
    bytes_up: u64,
}

fn task_id(job_id: &str, attempt: Attempt, site: &str) -> String {
    format!("{job_id}/r{}/a{}/{site}", attempt.round, attempt.number)
}

impl Trainer {
    /// The participating sites: those named (or all) that are connected; waits for enough of
    /// them until the deadline.
    async fn participants(
        &self,
        spec: &JobSpec,
        deadline: tokio::time::Instant,
        cancel: &CancellationToken,
    ) -> Result<Vec<(String, Outbound)>, RoundError> {
        let min_sites = spec.min_sites as usize;
        loop {
            let chosen: Vec<_> = self
                .links
                .connected_sorted()
                .into_iter()
                .filter(|(s, _)| spec.sites.is_empty() || spec.sites.contains(s))
                .collect();
            if chosen.len() >= min_sites {
                return Ok(chosen);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(RoundError::Failed(format!(
                    "{} site(s) connected, min_sites is {min_sites}",
                    chosen.len()
                )));
            }
            tokio::select! {
                _ = cancel.cancelled() => return Err(RoundError::Cancelled),
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    /// Sends every site its task and the global weights; returns the bytes sent.
    fn send_tasks(
        &self,
        job: &JobDoc,
        attempt: Attempt,
        sites: &[(String, Outbound)],
        global: &ModelDoc,
        weights: &prost::bytes::Bytes,
    ) -> Result<u64, RoundError> {
        let card_json = serde_json::to_string(&global.card).map_err(CoordinatorError::internal)?;
        let local = job.spec.local().to_json();
        let mut bytes_down = 0u64;
        for (site, link) in sites {
            let task = pb::TrainTask {
                task_id: task_id(&job.job_id, attempt, site),
                job_id: job.job_id.clone(),
                round: attempt.round,
                spec_json: local.clone(),
                card_json: card_json.clone(),
                weights_sha256: global.sha256.clone(),
                weights_bytes: weights.len() as u64,
                evaluate_only: attempt.evaluation,
                order: Some(job.order.signed()),
                attempt: attempt.number,
                secure_aggregation: job.spec.secure_aggregation && !attempt.evaluation,
            };
            bytes_down += weights.len() as u64;
            tokio::spawn(stream_weights(
                link.clone(),
                pb::coordinator_message::Kind::Train(task),
                weights.clone(),
            ));
        }
        Ok(bytes_down)
    }

    /// Takes reports (and, under secure aggregation, round keys) as they come until every
    /// site answered or the deadline passed: each report's update is checked and folded into
    /// `sum`.
    ///
    /// Secure aggregation: once every site still in the round has sent its signed key (or
    /// half the deadline has passed with at least `min_sites` keys), the key set goes to each
    /// of its sites; the masked updates cancel only if every site of the set reports, so one
    /// missing ends the attempt (it is retried with fresh keys; nothing is unmasked).
    #[allow(clippy::too_many_arguments)]
    async fn collect(
        &self,
        job: &JobDoc,
        attempt: Attempt,
        log: &mut RoundDoc,
        mut reports: mpsc::UnboundedReceiver<Report>,
        sum: &mut RoundSum,
        sites: &[(String, Outbound)],
        deadline: tokio::time::Instant,
        cancel: &CancellationToken,
    ) -> Collected {
        let spec = &job.spec;
        let secure = matches!(sum, RoundSum::Masked(_));
        let mut accepted: HashSet<String> = HashSet::new();
        let mut bytes_up = 0u64;
        let mut pending: HashSet<String> = log.sites.iter().map(|s| s.site.clone()).collect();
        let mut keys: BTreeMap<String, pb::MaskKey> = BTreeMap::new();
        let mut key_set: Option<Vec<String>> = None;
        let started = tokio::time::Instant::now();
        let key_deadline = started + (deadline - started) / 2;
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        while !pending.is_empty() {
            // Secure aggregation, checked after every message and tick: send the key set as
            // soon as every site still in the attempt has sent its key (or half the deadline
            // has passed with enough keys); once it is out, a site of the set gone ends the
            // attempt (the masked sum cannot complete).
            if secure {
                match &key_set {
                    None => {
                        let awaited = pending
                            .iter()
                            .filter(|s| !keys.contains_key(*s) && self.links.is_connected(s))
                            .count();
                        let ready = awaited == 0 || tokio::time::Instant::now() >= key_deadline;
                        if ready && keys.len() >= (spec.min_sites as usize).max(2) {
                            key_set =
                                Some(self.send_key_set(job, attempt, sites, &keys, log).await);
                            pending.retain(|s| keys.contains_key(s));
                        }
                    }
                    Some(set) => {
                        if let Some(gone) = set
                            .iter()
                            .find(|s| pending.contains(*s) && !self.links.is_connected(s))
                        {
                            tracing::warn!(
                                site = gone.as_str(),
                                "a site of the key set disconnected; the attempt cannot unmask"
                            );
                            break;
                        }
                    }
                }
            }
            let next = tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep_until(deadline) => break,
                _ = tick.tick() => None,
                r = reports.recv() => match r {
                    Some(r) => Some(r),
                    None => break,
                },
            };
            let Some((site, message)) = next else {
                continue;
            };
            let report = match message {
                Inbound::Key(key) => {
                    if secure
                        && key_set.is_none()
                        && key.site == site
                        && key.task_id == task_id(&job.job_id, attempt, &site)
                        && pending.contains(&site)
                    {
                        keys.insert(site, key);
                    } else {
                        tracing::info!(site, "a round key out of turn; ignored");
                    }
                    continue;
                }
                Inbound::Report(report) => report,
            };
            let upload = self.hub.take_upload(&report.task_id);
            let Some(entry) = log.sites.iter_mut().find(|s| s.site == site) else {
                continue;
            };
            if report.task_id != task_id(&job.job_id, attempt, &site) || report.job_id != job.job_id
            {
                tracing::warn!(
                    site,
                    task_id = report.task_id.as_str(),
                    "a report for another task; ignored"
                );
                continue;
            }
            if accepted.contains(&site) || !pending.remove(&site) {
                tracing::info!(site, "a duplicate update; ignored");
                continue;
            }
            entry.samples = report.samples;
            entry.eval_samples = report.eval_samples;
            entry.train_seconds = report.train_seconds;
            entry.metrics = report.metrics.clone().into_iter().collect();
            entry.update_bytes = report.update_bytes;
            entry.update_sha256 = report.update_sha256.clone();
            entry.refused_rule = report.refused_rule.clone();
            entry.epsilon_charged = report.epsilon_charged;
            if !report.ok {
                entry.status = SiteStatus::Failed;
                entry.reason = report.reason.clone();
                continue;
            }
            if attempt.evaluation {
                entry.status = SiteStatus::Reported;
                accepted.insert(site);
                continue;
            }
            if let Some(path) = upload.as_ref().map(|u| u.path.clone()) {
                self.hub.keep(&path, &report.task_id);
            }
            let folded = match sum {
                RoundSum::Masked(masked) => {
                    if !report.masked || !key_set.as_ref().is_some_and(|k| k.contains(&site)) {
                        Err("an unmasked update under secure aggregation".to_string())
                    } else {
                        let weight = site_weight(spec, &report);
                        entry.weight = weight;
                        fold_with(upload, &report, |bytes| {
                            masked.add(bytes, weight).map_err(|e| e.to_string())
                        })
                    }
                }
                RoundSum::Plain(aggregator) => {
                    if report.masked {
                        Err("a masked update without secure aggregation".to_string())
                    } else {
                        let weight = site_weight(spec, &report);
                        entry.weight = weight;
                        fold_with(upload, &report, |bytes| {
                            aggregator
                                .add(bytes, weight.round().max(1.0) as u64)
                                .map_err(|e| e.to_string())
                        })
                    }
                }
            };
            match folded {
                Ok(bytes) => {
                    bytes_up += bytes;
                    entry.status = SiteStatus::Reported;
                    accepted.insert(site);
                }
                Err(reason) => {
                    tracing::warn!(site, reason = reason.as_str(), "update rejected");
                    entry.status = SiteStatus::Failed;
                    entry.reason = reason;
                }
            }
        }
        if secure && !attempt.evaluation {
            let complete = key_set
                .as_ref()
                .is_some_and(|set| set.iter().all(|s| accepted.contains(s)));
            if !complete {
                for entry in log
                    .sites
                    .iter_mut()
                    .filter(|s| s.status == SiteStatus::Reported)
                {
                    entry.status = SiteStatus::Failed;
                    entry.reason =
                        "the masked sum is incomplete (a site of the key set did not report); discarded unopened".into();
                }
                accepted.clear();
            }
        }
        Collected { accepted, bytes_up }
    }

    /// Sends the key set to each site in it; sites without a key are dropped from the
    /// attempt. Returns the set's sites.
    async fn send_key_set(
        &self,
        job: &JobDoc,
        attempt: Attempt,
        sites: &[(String, Outbound)],
        keys: &BTreeMap<String, pb::MaskKey>,
        log: &mut RoundDoc,
    ) -> Vec<String> {
        let all: Vec<pb::MaskKey> = keys.values().cloned().collect();
        for (site, link) in sites.iter().filter(|(s, _)| keys.contains_key(s)) {
            let message = pb::CoordinatorMessage {
                kind: Some(pb::coordinator_message::Kind::MaskPeers(pb::MaskPeers {
                    task_id: task_id(&job.job_id, attempt, site),
                    keys: all.clone(),
                })),
            };
            // Behind at most a few queued messages: the sites' weights went down before they
            // trained.
            let sent = tokio::time::timeout(Duration::from_secs(10), link.send(Ok(message))).await;
            if !matches!(sent, Ok(Ok(()))) {
                tracing::warn!(site, "cannot send the key set");
            }
        }
        for entry in log.sites.iter_mut().filter(|s| !keys.contains_key(&s.site)) {
            if entry.status == SiteStatus::Running {
                entry.status = SiteStatus::Dropped;
                entry.reason = "no round key before the key set was sent".into();
            }
        }
        tracing::info!(
            job_id = job.job_id.as_str(),
            round = attempt.round,
            sites = keys.len(),
            "secure aggregation: key set sent"
        );
        keys.keys().cloned().collect()
    }

    /// One attempt of one round (or of the closing evaluation).
    pub(super) async fn run_round(
        self: &Arc<Self>,
        job: &mut JobDoc,
        attempt: Attempt,
        cancel: &CancellationToken,
    ) -> Result<(), RoundError> {
        let started = Instant::now();
        let spec = job.spec.clone();
        let global_doc = self.registry.model(&job.latest_model)?.ok_or_else(|| {
            CoordinatorError::Internal(format!("model version {} is missing", job.latest_model))
        })?;
        let global_bytes = prost::bytes::Bytes::from(self.registry.get_blob(&global_doc.sha256)?);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(spec.round_deadline_secs);
        let sites = self.participants(&spec, deadline, cancel).await?;

        let mut log = RoundDoc {
            round: attempt.round,
            attempt: attempt.number,
            state: if attempt.evaluation {
                RoundState::Evaluation
            } else {
                RoundState::Running
            },
            started_at: now(),
            sites: sites
                .iter()
                .map(|(s, _)| SiteDoc {
                    site: s.clone(),
                    status: SiteStatus::Running,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        job.round_log.push(log.clone());
        self.registry.save_job(job).await?;

        let task_ids: Vec<String> = sites
            .iter()
            .map(|(s, _)| task_id(&job.job_id, attempt, s))
            .collect();
        let (tx, rx) = mpsc::unbounded_channel();
        self.hub.expect(task_ids.iter().cloned(), &tx);
        drop(tx);
        let bytes_down = self.send_tasks(job, attempt, &sites, &global_doc, &global_bytes)?;
        // Only the shapes while updates arrive; the values are decoded once the round is in.
        let layout = if attempt.evaluation {
            BTreeMap::new()
        } else {
            cxrfed_fl::tensor::layout(&global_bytes)?
        };
        let mut sum = if spec.secure_aggregation && !attempt.evaluation {
            RoundSum::Masked(MaskedSum::new(layout))
        } else {
            // Updates whose norm exceeds what clipping and the sites' noise allow are refused.
            let max_norm = (spec.clip > 0.0).then(|| {
                let params: usize = layout.values().map(|s| s.iter().product::<usize>()).sum();
                spec.clip + spec.site_noise_std() * ((params as f64).sqrt() + 6.0)
            });
            RoundSum::Plain(
                Aggregator::with_layout(layout, spec.differentially_private())
                    .with_max_norm(max_norm),
            )
        };
        let collected = self
            .collect(
                job, attempt, &mut log, rx, &mut sum, &sites, deadline, cancel,
            )
            .await;
        // Stragglers are dropped; their chunks, if any, are removed.
        self.hub.forget(task_ids);
        for entry in log
            .sites
            .iter_mut()
            .filter(|s| s.status == SiteStatus::Running)
        {
            entry.status = SiteStatus::Dropped;
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
        self.metrics.round_seconds.observe(log.seconds);
        log.bytes_down = bytes_down;
        log.bytes_up = collected.bytes_up;
        log.pooled_metrics = pool_metrics(
            log.sites
                .iter()
                .filter(|s| s.status == SiteStatus::Reported),
        );
        if cancel.is_cancelled() || self.still_running(&job.job_id)?.is_none() {
            return Err(RoundError::Cancelled);
        }
        let min_sites = spec.min_sites as usize;
        if collected.accepted.len() < min_sites {
            return Err(self
                .record_failure(job, log, attempt, &collected, sites.len())
                .await);
        }

        // The metrics measured this round describe the incoming model.
        let mut parent = global_doc.clone();
        parent.metrics = log.pooled_metrics.clone();
        if attempt.evaluation {
            log.state = RoundState::Evaluation;
            log.model_version = parent.version.clone();
            if let Some(last) = job.round_log.last_mut() {
                *last = log;
            }
            self.registry
                .commit(&[parent.entry()?, job.entry()?])
                .await?;
            return Ok(());
        }
        // The global model decoded, its bytes dropped: one copy of the model in memory, then
        // the new version's bytes.
        let mut global = cxrfed_fl::tensor::decode(&global_bytes)?;
        drop(global_bytes);
        let doc = self.next_version(
            job,
            &global_doc,
            &mut global,
            sum,
            &collected,
            &log,
            attempt,
        )?;
        log.state = RoundState::Completed;
        log.model_version = doc.version.clone();
        if let Some(last) = job.round_log.last_mut() {
            *last = log;
        }
        job.completed_rounds = attempt.round;
        job.latest_model = doc.version.clone();
        job.dp_epsilon = doc.dp_epsilon;
        self.registry
            .commit(&[parent.entry()?, doc.entry()?, job.entry()?])
            .await?;
        tracing::info!(
            job_id = job.job_id.as_str(),
            round = attempt.round,
            version = doc.version.as_str(),
            sites = collected.accepted.len(),
            "round completed"
        );
        Ok(())
    }

    /// Records an attempt with too few updates (`retried`, or `failed` when it was the last);
    /// returns the failure.
    async fn record_failure(
        &self,
        job: &mut JobDoc,
        mut log: RoundDoc,
        attempt: Attempt,
        collected: &Collected,
        asked: usize,
    ) -> RoundError {
        log.state = if attempt.last {
            RoundState::Failed
        } else {
            RoundState::Retried
        };
        let missing: Vec<String> = log
            .sites
            .iter()
            .filter(|s| s.status != SiteStatus::Reported)
            .map(|s| format!("{} ({}: {})", s.site, s.status, s.reason))
            .collect();
        log.reason = format!(
            "{} of {asked} site(s) reported, min_sites is {}; {}",
            collected.accepted.len(),
            job.spec.min_sites,
            missing.join("; ")
        );
        let reason = log.reason.clone();
        if let Some(last) = job.round_log.last_mut() {
            *last = log;
        }
        if let Err(e) = self.registry.save_job(job).await {
            return RoundError::Coordinator(e);
        }
        RoundError::Failed(reason)
    }

    /// Aggregates the round's updates into the next global model: the server step of the
    /// job's algorithm (with DP noise), the weights file, and its registry entry.
    #[allow(clippy::too_many_arguments)]
    fn next_version(
        &self,
        job: &mut JobDoc,
        global_doc: &ModelDoc,
        global: &mut Weights,
        sum: RoundSum,
        collected: &Collected,
        log: &RoundDoc,
        attempt: Attempt,
    ) -> Result<ModelDoc, RoundError> {
        let spec = &job.spec;
        let round = attempt.round;
        let mut sites_used: Vec<String> = collected.accepted.iter().cloned().collect();
        sites_used.sort();
        let samples: Vec<u64> = sites_used
            .iter()
            .filter_map(|s| log.sites.iter().find(|e| &e.site == s).map(|e| e.samples))
            .collect();
        // The noise was added at the sites; the coordinator adds none.
        let mean = match sum {
            RoundSum::Plain(aggregator) => aggregator.mean(0.0),
            RoundSum::Masked(masked) => masked.mean(),
        };
        let mut moments = if job.adam_sha256.is_empty() {
            AdamMoments::default()
        } else {
            AdamMoments::decode(&self.registry.get_blob(&job.adam_sha256)?)?
        };
        let adam = ServerAdam {
            learning_rate: spec.server_learning_rate,
            ..ServerAdam::default()
        };
        cxrfed_fl::aggregate::apply(global, &mean, spec.algorithm, &adam, &mut moments)?;
        let new_bytes = cxrfed_fl::tensor::encode(global)?;
        let sha = self.registry.put_blob(&new_bytes)?;
        let adam_sha256 = if spec.algorithm == Algorithm::FedAdam {
            Some(self.registry.put_blob(&moments.encode()?)?)
        } else {
            None
        };
        let dp_epsilon = if spec.differentially_private() {
            cxrfed_stats::dp::gaussian_rounds_epsilon(spec.noise_multiplier, round, spec.dp_delta)
                .map_err(CoordinatorError::internal)?
        } else {
            0.0
        };
        let version = format!("{}.r{round}", job.job_id);
        let mut card = global_doc.card.clone();
        card.model_id = version.clone();
        card.weights_sha256 = sha.clone();
        card.training = serde_json::to_value(Provenance {
            federated: true,
            job_id: &job.job_id,
            round,
            parent: &global_doc.version,
            algorithm: spec.algorithm,
            sites: &sites_used,
            samples: &samples,
        })
        .map_err(CoordinatorError::internal)?;
        let doc = ModelDoc {
            version,
            parent: global_doc.version.clone(),
            job_id: job.job_id.clone(),
            round,
            sha256: sha,
            algorithm: spec.algorithm.to_string(),
            sites: sites_used,
            samples,
            metrics: BTreeMap::new(),
            dp_epsilon,
            dp_delta: if spec.differentially_private() {
                spec.dp_delta
            } else {
                0.0
            },
            created_at: now(),
            size_bytes: new_bytes.len() as u64,
            card,
            promoted_at: String::new(),
            promotion: Default::default(),
        };
        if let Some(sha) = adam_sha256 {
            job.adam_sha256 = sha;
        }
        Ok(doc)
    }
}

/// A round's running sum of updates.
pub(super) enum RoundSum {
    /// Plain updates, weighted by capped sample counts (or equally under DP), norm-checked.
    Plain(Aggregator),
    /// Masked fixed-point updates (secure aggregation).
    Masked(MaskedSum),
}

/// The aggregation weight of a site's update: equal under DP; otherwise its (noisy,
/// self-reported) weight, capped at the job's `max_site_weight`, so that no site's claim
/// dominates.
fn site_weight(spec: &JobSpec, report: &pb::TrainReport) -> f64 {
    if spec.differentially_private() {
        return 1.0;
    }
    let claimed = if report.weight > 0.0 {
        report.weight
    } else {
        report.samples as f64
    };
    claimed.clamp(1.0, spec.max_site_weight as f64)
}

/// Checks a site's complete update against its report (size, sha256) and folds it with
/// `fold`; returns its size. The spool file is removed either way.
fn fold_with(
    upload: Option<Upload>,
    report: &pb::TrainReport,
    fold: impl FnOnce(&[u8]) -> Result<(), String>,
) -> Result<u64, String> {
    let Some(upload) = upload else {
        return Err("the report came without an update".into());
    };
    let path = upload.path.clone();
    let result = upload.transfer.finish().and_then(|(file, len, sha)| {
        drop(file);
        if len != report.update_bytes {
            return Err(format!(
                "{len} update bytes arrived, the report says {}",
                report.update_bytes
            ));
        }
        if sha != report.update_sha256 {
            return Err(format!(
                "the update's sha256 is {sha}, the report says {}",
                report.update_sha256
            ));
        }
        let bytes = std::fs::read(&path).map_err(|e| format!("spooled update: {e}"))?;
        fold(&bytes)?;
        Ok(bytes.len() as u64)
    });
    let _ = std::fs::remove_file(&path);
    result
}

/// Pooled metrics from the sites' noisy counts: per head, the sum of the noisy held-out
/// totals (`HEAD.n`) and the accuracy Σ noisy correct / Σ noisy total (`HEAD.accuracy`,
/// clamped to [0, 1]). Nothing exact enters; the pool is post-processing of DP releases.
pub fn pool_metrics<'a>(sites: impl IntoIterator<Item = &'a SiteDoc>) -> BTreeMap<String, f64> {
    let mut sums: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for site in sites {
        for (key, value) in &site.metrics {
            if let Some(head) = key.strip_suffix(".total") {
                sums.entry(head.to_string()).or_default().1 += value;
            } else if let Some(head) = key.strip_suffix(".correct") {
                sums.entry(head.to_string()).or_default().0 += value;
            }
        }
    }
    let mut out = BTreeMap::new();
    for (head, (correct, total)) in sums {
        if total >= 1.0 {
            out.insert(format!("{head}.n"), total);
            out.insert(
                format!("{head}.accuracy"),
                (correct / total).clamp(0.0, 1.0),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_pool_by_evaluated_samples() {
        let site = |total: f64, correct: f64| SiteDoc {
            metrics: [
                ("q.total".to_string(), total),
                ("q.correct".to_string(), correct),
            ]
            .into_iter()
            .collect(),
            ..Default::default()
        };
        let pooled = pool_metrics(&[site(10.0, 5.0), site(30.0, 27.0)]);
        assert!((pooled["q.accuracy"] - 0.8).abs() < 1e-12);
        assert_eq!(pooled["q.n"], 40.0);
        // Noise can push a count past its total: the pool stays a proportion.
        let odd = pool_metrics(&[site(3.0, 5.0)]);
        assert_eq!(odd["q.accuracy"], 1.0);
    }

    /// The deltas the three sites of `masked_round` send (already clipped and noised).
    const DELTAS: [[f32; 2]; 3] = [[0.25, -0.5], [0.125, 0.75], [-0.0625, 0.3]];

    /// One secure-aggregation attempt through `Trainer::collect` with three linked sites that
    /// all send their round keys; the first `reporting` of them then send their masked
    /// updates (real X25519 keys and masks).
    async fn masked_round(reporting: usize) -> (Collected, RoundDoc, RoundSum) {
        use cxrfed_fl::secagg;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = cxrfed_store::CoordinatorStore::open(&dir.path().join("db")).expect("store");
        let links = Arc::new(crate::links::Links::default());
        let trainer = Trainer::new(
            super::super::registry::Registry::new(store, dir.path().join("models")),
            super::super::hub::Hub::new(dir.path().join("spool")),
            links.clone(),
        );
        let names = ["site-a", "site-b", "site-c"];
        let mut inboxes = Vec::new();
        for site in names {
            let (tx, rx) = mpsc::channel(16);
            links.attach(site, tx);
            inboxes.push(rx);
        }
        let job = JobDoc {
            job_id: "job-t".into(),
            spec: JobSpec {
                min_sites: 2,
                secure_aggregation: true,
                ..JobSpec::default()
            },
            ..Default::default()
        };
        let attempt = Attempt {
            round: 1,
            number: 1,
            last: false,
            evaluation: false,
        };
        let mut log = RoundDoc {
            sites: names
                .iter()
                .map(|s| SiteDoc {
                    site: s.to_string(),
                    status: SiteStatus::Running,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let ids: Vec<String> = names.iter().map(|s| task_id("job-t", attempt, s)).collect();
        let (tx, rx) = mpsc::unbounded_channel();
        trainer.hub.expect(ids.clone(), &tx);
        drop(tx);
        let layout: BTreeMap<String, Vec<usize>> = [("heads.x.weight".to_string(), vec![2])]
            .into_iter()
            .collect();
        let mut sum = RoundSum::Masked(MaskedSum::new(layout));
        let sites = links.connected_sorted();
        let keys: Vec<secagg::KeyPair> = names
            .iter()
            .map(|_| secagg::KeyPair::generate().expect("key"))
            .collect();
        for ((site, key), id) in names.iter().zip(&keys).zip(&ids) {
            trainer.hub.on_key(
                site,
                pb::MaskKey {
                    task_id: id.clone(),
                    site: site.to_string(),
                    public_key: key.public().to_vec(),
                    ..Default::default()
                },
            );
        }
        let hub = &trainer.hub;
        let sites_and_keys: Vec<(String, Vec<u8>)> = names
            .iter()
            .zip(&keys)
            .map(|(s, k)| (s.to_string(), k.public().to_vec()))
            .collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
        let cancel = CancellationToken::new();
        let sites_a_b = async {
            // Every site of the set gets the key set; a and b answer, c does not.
            for inbox in inboxes.iter_mut() {
                let message = inbox.recv().await.expect("key set").expect("ok");
                assert!(matches!(
                    message.kind,
                    Some(pb::coordinator_message::Kind::MaskPeers(ref p)) if p.keys.len() == 3
                ));
            }
            for i in 0..reporting {
                let update = Weights::from([(
                    "heads.x.weight".to_string(),
                    cxrfed_fl::Tensor {
                        shape: vec![2],
                        data: DELTAS[i].to_vec(),
                    },
                )]);
                let mut encoded = secagg::encode(&update, 1.0).expect("encode");
                secagg::mask(&mut encoded, names[i], &keys[i], &sites_and_keys, b"ctx")
                    .expect("mask");
                let bytes = secagg::to_bytes(&encoded).expect("bytes");
                for chunk in cxrfed_proto::chunks(&ids[i], prost::bytes::Bytes::from(bytes.clone()))
                {
                    hub.on_chunk(names[i], chunk);
                }
                hub.on_report(
                    names[i],
                    pb::TrainReport {
                        task_id: ids[i].clone(),
                        job_id: "job-t".into(),
                        round: 1,
                        ok: true,
                        masked: true,
                        weight: 1.0,
                        update_bytes: bytes.len() as u64,
                        update_sha256: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes)),
                        ..Default::default()
                    },
                );
            }
        };
        let (collected, ()) = tokio::join!(
            trainer.collect(
                &job, attempt, &mut log, rx, &mut sum, &sites, deadline, &cancel
            ),
            sites_a_b
        );
        (collected, log, sum)
    }

    /// Site-c sends its key and then never its masked update: the attempt ends with nothing
    /// accepted — the partial sum is discarded unopened (a retry follows in the job loop), so
    /// neither a's nor b's update is ever exposed.
    #[tokio::test]
    async fn a_site_missing_after_the_key_exchange_leaves_the_sum_unopened() {
        let (collected, log, _) = masked_round(2).await;
        assert!(collected.accepted.is_empty(), "{:?}", collected.accepted);
        for entry in &log.sites[..2] {
            assert_eq!(entry.status, SiteStatus::Failed, "{entry:?}");
            assert!(entry.reason.contains("unopened"), "{}", entry.reason);
        }
        assert_eq!(log.sites[2].status, SiteStatus::Running, "c never reported");
    }

    /// All three report: the unmasked sum is the plain FedAvg of their updates to within the
    /// fixed-point resolution (2^-20).
    #[tokio::test]
    async fn the_masked_sum_is_the_plain_mean_within_fixed_point_error() {
        let (collected, _, sum) = masked_round(3).await;
        assert_eq!(collected.accepted.len(), 3);
        let RoundSum::Masked(masked) = sum else {
            panic!("a masked round");
        };
        let mean = masked.mean();
        for i in 0..2 {
            let plain: f64 = DELTAS.iter().map(|d| f64::from(d[i])).sum::<f64>() / 3.0;
            let got = f64::from(mean["heads.x.weight"].data[i]);
            assert!((got - plain).abs() < 1e-6, "{got} vs {plain}");
        }
    }

    #[test]
    fn a_self_reported_sample_count_cannot_buy_more_than_the_cap() {
        let spec = JobSpec {
            max_site_weight: 1000,
            secure_aggregation: false,
            ..JobSpec::default()
        };
        let liar = pb::TrainReport {
            samples: 1_000_000_000,
            weight: 1e9,
            ..Default::default()
        };
        let honest = pb::TrainReport {
            samples: 40,
            weight: 40.0,
            ..Default::default()
        };
        assert_eq!(site_weight(&spec, &liar), 1000.0);
        assert_eq!(site_weight(&spec, &honest), 40.0);
        // Folded into FedAvg, the liar's pull on the global model is bounded by its cap: the
        // mean moves at most 1000 / 1040 of the way to its update, not 1e9 / (1e9 + 40).
        let global = Weights::from([(
            "x".to_string(),
            cxrfed_fl::Tensor {
                shape: vec![1],
                data: vec![0.0],
            },
        )]);
        let update = |v: f32| {
            cxrfed_fl::tensor::encode(&Weights::from([(
                "x".to_string(),
                cxrfed_fl::Tensor {
                    shape: vec![1],
                    data: vec![v],
                },
            )]))
            .expect("encode")
        };
        let mut aggregator = Aggregator::new(&global, false);
        aggregator
            .add(&update(1.0), site_weight(&spec, &liar) as u64)
            .expect("liar");
        aggregator
            .add(&update(0.0), site_weight(&spec, &honest) as u64)
            .expect("honest");
        let mean = aggregator.mean(0.0)["x"].data[0];
        assert!((f64::from(mean) - 1000.0 / 1040.0).abs() < 1e-6, "{mean}");
        // Under DP every site weighs the same.
        let dp = JobSpec {
            clip: 1.0,
            noise_multiplier: 1.0,
            ..spec
        };
        assert_eq!(site_weight(&dp, &liar), 1.0);
    }

    #[test]
    fn updates_beyond_the_clip_are_refused() {
        let global = Weights::from([(
            "x".to_string(),
            cxrfed_fl::Tensor {
                shape: vec![2],
                data: vec![0.0, 0.0],
            },
        )]);
        let big = cxrfed_fl::tensor::encode(&Weights::from([(
            "x".to_string(),
            cxrfed_fl::Tensor {
                shape: vec![2],
                data: vec![3.0, 4.0],
            },
        )]))
        .expect("encode");
        let mut aggregator = Aggregator::new(&global, true).with_max_norm(Some(1.0));
        let err = aggregator.add(&big, 1).expect_err("norm 5 > 1");
        assert!(err.to_string().contains("L2 norm"), "{err}");
        assert_eq!(aggregator.sites(), 0);
    }

    #[test]
    fn an_update_must_match_its_report() {
        let dir = tempfile::tempdir().expect("tempdir");
        let global = Weights::from([(
            "x".to_string(),
            cxrfed_fl::Tensor {
                shape: vec![2],
                data: vec![0.0, 0.0],
            },
        )]);
        let bytes = cxrfed_fl::tensor::encode(&Weights::from([(
            "x".to_string(),
            cxrfed_fl::Tensor {
                shape: vec![2],
                data: vec![1.0, 2.0],
            },
        )]))
        .expect("encode");
        let upload = |data: &[u8]| {
            let path = dir.path().join("u.part");
            let file = std::fs::File::create(&path).expect("file");
            let mut transfer = cxrfed_fl::Assembly::new(
                "a",
                super::super::hub::SpoolFile::from(file),
                None,
                1 << 20,
            );
            transfer.push("a", 0, data);
            Some(Upload { path, transfer })
        };
        let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
        let report = pb::TrainReport {
            samples: 3,
            update_bytes: bytes.len() as u64,
            update_sha256: sha.clone(),
            ..Default::default()
        };
        let mut aggregator = Aggregator::new(&global, false);
        let fold_update = |upload, report: &pb::TrainReport, aggregator: &mut Aggregator| {
            fold_with(upload, report, |b| {
                aggregator.add(b, report.samples).map_err(|e| e.to_string())
            })
        };
        assert!(fold_update(None, &report, &mut aggregator).is_err());
        let wrong_sha = pb::TrainReport {
            update_sha256: "00".into(),
            ..report.clone()
        };
        let err = fold_update(upload(&bytes), &wrong_sha, &mut aggregator).expect_err("sha");
        assert!(err.contains("sha256"), "{err}");
        let short = fold_update(upload(&bytes[..10]), &report, &mut aggregator).expect_err("size");
        assert!(short.contains("bytes arrived"), "{short}");
        assert_eq!(aggregator.sites(), 0);
        assert_eq!(
            fold_update(upload(&bytes), &report, &mut aggregator).expect("folded"),
            bytes.len() as u64
        );
        assert_eq!(aggregator.sites(), 1);
    }
}
