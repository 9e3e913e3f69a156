//! A job's life: checked and recorded (`start`), run round after round in the background
//! (`run`), resumed after a coordinator restart (`resume_all`), cancelled by the study admin.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use cxrfed_fl::{JobSpec, JobState, RoundState, Tensor};
use tokio_util::sync::CancellationToken;

use super::Trainer;
use super::docs::{JobDoc, ModelDoc};
use super::registry::now;
use super::round::{Attempt, RoundError};
use crate::error::{CoordinatorError, Result};

impl Trainer {
    /// Checks and records a new job from a study admin's verified order, then runs it in the
    /// background. The job id derives from the order's nonce, so one order makes one job.
    pub async fn start(
        self: &Arc<Self>,
        verified: cxrfed_server::order::Verified,
        signed: &cxrfed_proto::v1::SignedOrder,
        created_by: String,
    ) -> Result<JobDoc> {
        let spec: JobSpec = verified
            .spec
            .clone()
            .ok_or_else(|| CoordinatorError::InvalidArgument("the order carries no job".into()))?;
        spec.validate().map_err(CoordinatorError::InvalidArgument)?;
        let base = self.registry.model(&spec.base)?.ok_or_else(|| {
            CoordinatorError::FailedPrecondition(format!(
                "no model version {:?} in the registry (see `cxrfed registry list`)",
                spec.base
            ))
        })?;
        if base.sha256 != verified.order.model_sha256 {
            return Err(CoordinatorError::FailedPrecondition(format!(
                "the order names base weights {}, the registry's {} has {}",
                verified.order.model_sha256, base.version, base.sha256
            )));
        }
        let mut heads = base.heads();
        for new in &spec.new_heads {
            if heads.contains(&new.name) {
                return Err(CoordinatorError::FailedPrecondition(format!(
                    "the base model {} already has a head {:?}; train it with heads = [...]",
                    base.version, new.name
                )));
            }
        }
        heads.extend(spec.new_heads.iter().map(|h| h.name.clone()));
        if let Some(unknown) = spec.heads.iter().find(|h| !heads.contains(h)) {
            return Err(CoordinatorError::FailedPrecondition(format!(
                "the base model {} has no head {unknown:?} (it has {})",
                base.version,
                heads.join(", ")
            )));
        }
        let job_id = format!(
            "job-{}-{}",
            chrono::DateTime::<Utc>::from_timestamp(verified.order.issued_at_unix, 0)
                .unwrap_or_else(Utc::now)
                .format("%Y%m%d"),
            verified
                .order
                .nonce
                .chars()
                .filter(char::is_ascii_alphanumeric)
                .take(12)
                .collect::<String>()
        );
        if self.registry.job(&job_id)?.is_some() {
            return Err(CoordinatorError::AlreadyExists(format!(
                "job {job_id} was already started from this order"
            )));
        }
        let mut job = JobDoc {
            job_id: job_id.clone(),
            state: JobState::Running,
            created_at: now(),
            created_by,
            base_model: base.version.clone(),
            latest_model: base.version.clone(),
            spec,
            order: super::docs::SignedOrderDoc::of(signed),
            ..Default::default()
        };
        let mut docs = Vec::new();
        if !job.spec.new_heads.is_empty() {
            let start = self.with_new_heads(&base, &job)?;
            job.latest_model = start.version.clone();
            docs.push(start.entry()?);
        }
        docs.push(job.entry()?);
        self.registry.commit(&docs).await?;
        self.spawn(job_id);
        Ok(job)
    }

    /// The job's starting model when it adds heads: the base weights plus a linear head per
    /// new field, and the base label map extended. A new head starts at zero, so its first
    /// predictions are uninformative (p = 0.5) and the improvement a job reports is the head's
    /// own (with the backbone frozen this is plain logistic or softmax regression on the
    /// backbone's features, for which a zero start is the usual one). Registered as version
    /// `JOB.r0`.
    fn with_new_heads(&self, base: &ModelDoc, job: &JobDoc) -> Result<ModelDoc> {
        let mut weights = cxrfed_fl::tensor::decode(&self.registry.get_blob(&base.sha256)?)?;
        let fan_in = weights
            .iter()
            .find(|(n, t)| n.starts_with("heads.") && n.ends_with(".weight") && t.shape.len() == 2)
            .map(|(_, t)| t.shape[1])
            .ok_or_else(|| {
                CoordinatorError::precondition(
                    "the base model has no linear head to size a new one by",
                )
            })?;
        let mut card = base.card.clone();
        for new in &job.spec.new_heads {
            let head = new.head().map_err(CoordinatorError::InvalidArgument)?;
            let width = head.width();
            card.label_map.heads.push(head);
            weights.insert(
                format!("heads.{}.weight", new.name),
                Tensor {
                    shape: vec![width, fan_in],
                    data: vec![0.0; width * fan_in],
                },
            );
            weights.insert(
                format!("heads.{}.bias", new.name),
                Tensor {
                    shape: vec![width],
                    data: vec![0.0; width],
                },
            );
        }
        let bytes = cxrfed_fl::tensor::encode(&weights)?;
        let sha = self.registry.put_blob(&bytes)?;
        let version = format!("{}.r0", job.job_id);
        card.model_id = version.clone();
        card.weights_sha256 = sha.clone();
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
    pub fn resume_all(self: &Arc<Self>) {
        match self.registry.jobs() {
            Ok(all) => {
                for job in all.into_iter().filter(|j| j.state == JobState::Running) {
                    tracing::info!(
                        job_id = job.job_id.as_str(),
                        completed_rounds = job.completed_rounds,
                        "resuming a training job"
                    );
                    self.spawn(job.job_id);
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read the training jobs"),
        }
    }

    fn spawn(self: &Arc<Self>, job_id: String) {
        let cancel = CancellationToken::new();
        self.hub.started(&job_id, cancel.clone());
        let trainer = self.clone();
        tokio::spawn(async move {
            if let Err(e) = trainer.run(&job_id, &cancel).await {
                tracing::error!(job_id = job_id.as_str(), error = %e, "training job stopped");
                if let Ok(Some(mut job)) = trainer.registry.job(&job_id)
                    && job.state == JobState::Running
                {
                    job.state = JobState::Failed;
                    job.reason = e.to_string();
                    let _ = trainer.registry.save_job(&job).await;
                }
            }
            trainer.hub.finished(&job_id);
        });
    }

    /// Cancels a running job: its current round stops, nothing more is committed.
    pub async fn cancel(&self, job_id: &str) -> Result<JobDoc> {
        let mut doc = self.registry.require_job(job_id)?;
        if doc.state != JobState::Running {
            return Err(CoordinatorError::FailedPrecondition(format!(
                "job {job_id} is {}, not running",
                doc.state
            )));
        }
        self.hub.cancel(job_id);
        doc.state = JobState::Cancelled;
        doc.reason = "cancelled by the study admin".into();
        self.registry.save_job(&doc).await?;
        Ok(doc)
    }

    /// The job, if it still runs (a cancellation or failure recorded elsewhere stops it).
    pub(super) fn still_running(&self, job_id: &str) -> Result<Option<JobDoc>> {
        let job = self.registry.require_job(job_id)?;
        Ok((job.state == JobState::Running).then_some(job))
    }

    /// Runs a job from its last completed round to the end, then the closing evaluation.
    async fn run(self: &Arc<Self>, job_id: &str, cancel: &CancellationToken) -> Result<()> {
        loop {
            let Some(mut job) = self.still_running(job_id)? else {
                return Ok(());
            };
            if cancel.is_cancelled() {
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
            for entry in job
                .round_log
                .iter_mut()
                .filter(|r| r.state == RoundState::Running)
            {
                entry.state = RoundState::Interrupted;
                entry.reason = "the coordinator stopped during this round".into();
                interrupted = true;
            }
            if interrupted {
                self.registry.save_job(&job).await?;
            }
            let prior = job.round_log.iter().filter(|r| r.round == round).count() as u32;
            let attempts = job.spec.attempts;
            let mut last_reason = String::new();
            let mut done = false;
            for number in prior + 1..=prior + attempts {
                if cancel.is_cancelled() {
                    return Ok(());
                }
                let attempt = Attempt {
                    round,
                    number,
                    last: number == prior + attempts,
                    evaluation,
                };
                match self.run_round(&mut job, attempt, cancel).await {
                    Ok(()) => {
                        done = true;
                        break;
                    }
                    Err(RoundError::Cancelled) => return Ok(()),
                    Err(RoundError::Coordinator(e)) => return Err(e),
                    Err(RoundError::Failed(reason)) => {
                        tracing::warn!(
                            job_id,
                            round,
                            attempt = number,
                            reason = reason.as_str(),
                            "round failed"
                        );
                        last_reason = reason;
                        // Give disconnected sites a moment to come back.
                        tokio::select! {
                            _ = cancel.cancelled() => return Ok(()),
                            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                        }
                        match self.still_running(job_id)? {
                            Some(fresh) => job = fresh,
                            None => return Ok(()),
                        }
                    }
                }
            }
            if !done {
                job.state = JobState::Failed;
                job.reason =
                    format!("round {round} failed {attempts} time(s); last: {last_reason}");
                self.registry.save_job(&job).await?;
                return Ok(());
            }
            if evaluation {
                if let Some(mut job) = self.still_running(job_id)? {
                    job.state = JobState::Completed;
                    self.registry.save_job(&job).await?;
                }
                tracing::info!(job_id, "training job completed");
                return Ok(());
            }
        }
    }
}
