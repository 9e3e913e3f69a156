//! Domain documents to wire messages (the only place that knows both).

use cxrfed_proto::v1 as pb;

use crate::training::{JobDoc, ModelDoc, RoundDoc, SiteDoc};

impl From<&SiteDoc> for pb::SiteRound {
    fn from(s: &SiteDoc) -> Self {
        pb::SiteRound {
            site: s.site.clone(),
            status: pb::SiteRoundStatus::from(s.status).into(),
            reason: s.reason.clone(),
            samples: s.samples,
            eval_samples: s.eval_samples,
            train_loss: s.train_loss,
            train_seconds: s.train_seconds,
            metrics: s.metrics.clone().into_iter().collect(),
            update_bytes: s.update_bytes,
            refused_rule: s.refused_rule.clone(),
            epsilon_charged: s.epsilon_charged,
        }
    }
}

/// A job as anyone but the study admin sees it: the pooled noisy metrics, the round states and
/// times, no per-site rows, no per-site counts, no failure reasons naming sites.
pub fn redacted(job: &JobDoc) -> pb::JobInfo {
    let mut info = pb::JobInfo::from(job);
    for round in &mut info.round_log {
        round.sites.clear();
        round.reason = match round.state() {
            pb::RoundState::Retried | pb::RoundState::Failed => {
                "too few sites reported".to_string()
            }
            _ => String::new(),
        };
    }
    if info.state() == pb::JobState::Failed {
        info.reason = "the job failed (the study admin sees why)".into();
    }
    info
}

impl From<&RoundDoc> for pb::RoundInfo {
    fn from(r: &RoundDoc) -> Self {
        pb::RoundInfo {
            round: r.round,
            attempt: r.attempt,
            state: pb::RoundState::from(r.state).into(),
            reason: r.reason.clone(),
            sites: r.sites.iter().map(pb::SiteRound::from).collect(),
            model_version: r.model_version.clone(),
            pooled_metrics: r.pooled_metrics.clone().into_iter().collect(),
            seconds: r.seconds,
            bytes_down: r.bytes_down,
            bytes_up: r.bytes_up,
            started_at: r.started_at.clone(),
        }
    }
}

impl From<&JobDoc> for pb::JobInfo {
    fn from(j: &JobDoc) -> Self {
        pb::JobInfo {
            job_id: j.job_id.clone(),
            state: pb::JobState::from(j.state).into(),
            reason: j.reason.clone(),
            rounds: j.spec.rounds,
            completed_rounds: j.completed_rounds,
            algorithm: pb::Algorithm::from(j.spec.algorithm).into(),
            base_model: j.base_model.clone(),
            latest_model: j.latest_model.clone(),
            round_log: j.round_log.iter().map(pb::RoundInfo::from).collect(),
            spec_json: serde_json::to_string(&j.spec).unwrap_or_default(),
            created_at: j.created_at.clone(),
            created_by: j.created_by.clone(),
            dp_epsilon: j.dp_epsilon,
            dp_delta: if j.spec.differentially_private() {
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
            model_id: m.card.model_id.clone(),
            heads: m.heads(),
            promoted_at: m.promoted_at.clone(),
            running_at: Vec::new(),
        }
    }
}
