//! One attempt of one round (or of the closing evaluation), in steps: choose the sites,
//! send them the task and the weights, collect and check their updates until the deadline,
//! then either record the failure or aggregate, write the new global model and commit it with
//! the round log.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cxrfed_fl::{
    AdamMoments, Aggregator, Algorithm, JobSpec, RoundState, ServerAdam, SiteStatus, Weights,
};
use cxrfed_proto::v1 as pb;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Trainer;
use super::docs::{JobDoc, ModelDoc, RoundDoc, SiteDoc};
use super::hub::{Report, Upload};
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

    /// Takes reports as they come until every site answered or the deadline passed: each
    /// report's update is checked and folded into `aggregator`.
    #[allow(clippy::too_many_arguments)]
    async fn collect(
        &self,
        job: &JobDoc,
        attempt: Attempt,
        log: &mut RoundDoc,
        mut reports: mpsc::UnboundedReceiver<Report>,
        aggregator: &mut Aggregator,
        deadline: tokio::time::Instant,
        cancel: &CancellationToken,
    ) -> Collected {
        let mut accepted: HashSet<String> = HashSet::new();
        let mut bytes_up = 0u64;
        let mut pending: HashSet<String> = log.sites.iter().map(|s| s.site.clone()).collect();
        while !pending.is_empty() {
            let next = tokio::select! {
                _ = cancel.cancelled() => None,
                r = tokio::time::timeout_at(deadline, reports.recv()) => r.ok().flatten(),
            };
            let Some((site, report)) = next else { break };
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
            entry.train_loss = report.train_loss;
            entry.train_seconds = report.train_seconds;
            entry.metrics = report.metrics.clone().into_iter().collect();
            entry.update_bytes = report.update_bytes;
            entry.update_sha256 = report.update_sha256.clone();
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
            match fold_update(upload, &report, aggregator) {
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
        Collected { accepted, bytes_up }
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
        let mut aggregator = Aggregator::with_layout(layout, spec.differentially_private());
        let collected = self
            .collect(
                job,
                attempt,
                &mut log,
                rx,
                &mut aggregator,
                deadline,
                cancel,
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
            aggregator,
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
        aggregator: Aggregator,
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
        let noise_std = spec.noise_multiplier * spec.clip;
        let mean = aggregator.mean(noise_std);
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
        };
        if let Some(sha) = adam_sha256 {
            job.adam_sha256 = sha;
        }
        Ok(doc)
    }
}

/// Checks a site's complete update against its report (size, sha256) and folds it into the
/// aggregator; returns its size. The spool file is removed either way.
fn fold_update(
    upload: Option<Upload>,
    report: &pb::TrainReport,
    aggregator: &mut Aggregator,
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
        aggregator
            .add(&bytes, report.samples)
            .map_err(|e| e.to_string())?;
        Ok(bytes.len() as u64)
    });
    let _ = std::fs::remove_file(&path);
    result
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

#[cfg(test)]
mod tests {
    use super::*;

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
