//! The documents of the training engine as the coordinator's store keeps them: jobs with
//! their round log, and registry entries. Their JSON keeps the first generation's field names
//! and state spellings, so stores written before the typed states still read.

use std::collections::BTreeMap;

use cxrfed_fl::{JobSpec, JobState, ModelCard, RoundState, SiteStatus};
use cxrfed_store::Doc;
use serde::{Deserialize, Serialize};

use crate::error::{CoordinatorError, Result};

/// One site in one round.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SiteDoc {
    pub site: String,
    pub status: SiteStatus,
    pub reason: String,
    pub samples: u64,
    pub eval_samples: u64,
    pub train_loss: f64,
    pub train_seconds: f64,
    pub metrics: BTreeMap<String, f64>,
    pub update_bytes: u64,
    pub update_sha256: String,
    /// The site policy rule (or order check) under which the site refused the task.
    #[serde(default)]
    pub refused_rule: String,
    /// Privacy loss the site says it charged its training account for this attempt.
    #[serde(default)]
    pub epsilon_charged: f64,
    /// The aggregation weight used (capped at the job's max_site_weight).
    #[serde(default)]
    pub weight: f64,
}

/// One attempt of a round in the round log.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundDoc {
    pub round: u32,
    pub attempt: u32,
    pub state: RoundState,
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
    pub state: JobState,
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
    /// The study admin's signed order, forwarded unchanged with every task.
    #[serde(default)]
    pub order: SignedOrderDoc,
}

/// A signed order as the store keeps it (hex of the exact bytes).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SignedOrderDoc {
    pub order: String,
    pub signature: String,
    pub certificate: String,
}

impl SignedOrderDoc {
    pub fn of(signed: &cxrfed_proto::v1::SignedOrder) -> SignedOrderDoc {
        SignedOrderDoc {
            order: hex::encode(&signed.order),
            signature: hex::encode(&signed.signature),
            certificate: hex::encode(&signed.certificate),
        }
    }

    /// The signed order as sent (empty for a first-generation job, which no node obeys).
    pub fn signed(&self) -> cxrfed_proto::v1::SignedOrder {
        let bytes = |h: &str| hex::decode(h).unwrap_or_default();
        cxrfed_proto::v1::SignedOrder {
            order: bytes(&self.order),
            signature: bytes(&self.signature),
            certificate: bytes(&self.certificate),
        }
    }
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
    /// How the version was made: an algorithm (`fedavg`, ...), `imported`, `new heads (...)`.
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
    pub card: ModelCard,
    /// When the study admin promoted it (RFC 3339), empty if never.
    pub promoted_at: String,
    /// The signed order of its last promotion (sent with every rollout of it).
    pub promotion: SignedOrderDoc,
}

impl ModelDoc {
    pub fn heads(&self) -> Vec<String> {
        self.card.heads()
    }
}

/// A document as the store writes it.
pub(crate) type Entry = (Doc, String, serde_json::Value);

fn entry(kind: Doc, key: &str, doc: &impl Serialize) -> Result<Entry> {
    let value = serde_json::to_value(doc).map_err(CoordinatorError::internal)?;
    Ok((kind, key.to_string(), value))
}

impl JobDoc {
    pub(crate) fn entry(&self) -> Result<Entry> {
        entry(Doc::Job, &self.job_id, self)
    }
}

impl ModelDoc {
    pub(crate) fn entry(&self) -> Result<Entry> {
        entry(Doc::Model, &self.version, self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_first_generation_round_log_still_reads() {
        let old = serde_json::json!({
            "job_id": "job-1", "spec": {}, "state": "running", "reason": "",
            "created_at": "", "created_by": "", "completed_rounds": 1,
            "base_model": "b", "latest_model": "b", "dp_epsilon": 0.0, "adam_sha256": "",
            "round_log": [{
                "round": 1, "attempt": 1, "state": "interrupted", "reason": "",
                "sites": [{"site": "a", "status": "dropped", "reason": "", "samples": 0,
                           "eval_samples": 0, "train_loss": 0.0, "train_seconds": 0.0,
                           "metrics": {}, "update_bytes": 0, "update_sha256": ""}],
                "model_version": "", "pooled_metrics": {}, "seconds": 0.0,
                "bytes_down": 0, "bytes_up": 0, "started_at": ""
            }]
        });
        let job: JobDoc = serde_json::from_value(old).expect("reads");
        assert_eq!(job.state, JobState::Running);
        assert_eq!(job.round_log[0].state, RoundState::Interrupted);
        assert_eq!(job.round_log[0].sites[0].status, SiteStatus::Dropped);
    }
}
