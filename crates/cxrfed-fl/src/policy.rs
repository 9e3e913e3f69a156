//! A site's training policy: what its admin allows the federation to do with the site's
//! records. A node checks every signed job against it before it trains or evaluates; a refusal
//! names the rule, so the study admin sees which site said no and why, never a count.
//!
//! The defaults refuse everything (`enabled = false`): a site trains only once its admin has
//! opted in. The floors are the site's: a job may ask for more privacy (more noise, a smaller
//! clip, larger batches), never less.

use serde::{Deserialize, Serialize};

use crate::spec::{JobSpec, Trainable};

/// The site's rules for federated training (TOML in the node config, or `cxrfed node
/// training-policy set`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SitePolicy {
    /// Take part in training and evaluation at all.
    pub enabled: bool,
    /// Study-admin identities (URIs `cxrfed://STUDY/study-admin/-/NAME`, or NAMEs) whose
    /// orders this site obeys; empty: any study admin of the study.
    pub study_admins: Vec<String>,
    /// Base models a job may start from, by registry version or weights sha256; empty: any.
    pub base_models: Vec<String>,
    /// Layers a job may train.
    pub trainable: Vec<Trainable>,
    /// The smallest local batch (small batches let a gradient reconstruct inputs).
    pub min_batch_size: u32,
    /// The fewest local optimiser steps per round (one step on few records is a gradient).
    pub min_local_steps: u32,
    /// The largest clipping norm a job may use; 0: clipping not required.
    pub max_clip_norm: f64,
    /// The smallest noise multiplier a job may use (0: noiseless updates allowed).
    pub min_noise_multiplier: f64,
    /// Secure aggregation required (the coordinator never sees this site's update alone).
    pub require_secure_aggregation: bool,
    /// The most rounds one job may ask for.
    pub max_rounds_per_job: u32,
    /// The most new jobs this site joins in 24 hours.
    pub max_jobs_per_day: u32,
    /// Evaluation-only tasks (a job's closing evaluation) allowed.
    pub allow_evaluation_only: bool,
    /// Below this many held-out records (as the site's noisy count says), the site reports
    /// no metrics.
    pub min_held_out: u32,
    /// The largest metrics ε per round a job may ask this site to spend.
    pub max_metrics_epsilon: f64,
}

impl Default for SitePolicy {
    fn default() -> Self {
        SitePolicy {
            enabled: false,
            study_admins: Vec::new(),
            base_models: Vec::new(),
            trainable: vec![Trainable::Heads, Trainable::LastBlock],
            min_batch_size: 8,
            min_local_steps: 10,
            max_clip_norm: 0.0,
            min_noise_multiplier: 0.0,
            require_secure_aggregation: false,
            max_rounds_per_job: 50,
            max_jobs_per_day: 10,
            allow_evaluation_only: true,
            min_held_out: 20,
            max_metrics_epsilon: 1.0,
        }
    }
}

/// A refusal under the site policy: the rule (a `SitePolicy` key) and a message for the
/// study admin.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("site policy {rule}: {message}")]
pub struct Refusal {
    pub rule: &'static str,
    pub message: String,
}

fn refuse(rule: &'static str, message: impl Into<String>) -> Result<(), Refusal> {
    Err(Refusal {
        rule,
        message: message.into(),
    })
}

/// What a task asks beyond the signed job.
#[derive(Debug, Clone, Copy)]
pub struct TaskContext<'a> {
    /// The signer's identity URI.
    pub signer: &'a str,
    /// The base model of the order (version and weights sha256).
    pub base_version: &'a str,
    pub base_sha256: &'a str,
    pub evaluate_only: bool,
    /// A job this site has not yet taken part in, and how many it joined in the last 24 h.
    pub new_job: bool,
    pub jobs_last_day: u32,
}

impl SitePolicy {
    /// Parses and checks a policy file.
    pub fn parse(text: &str) -> Result<SitePolicy, String> {
        let policy: SitePolicy =
            toml::from_str(text).map_err(|e| format!("training policy: {e}"))?;
        policy.validate()?;
        Ok(policy)
    }

    pub fn validate(&self) -> Result<(), String> {
        let non_negative = |v: f64| v.is_finite() && v >= 0.0;
        if !(non_negative(self.max_clip_norm)
            && non_negative(self.min_noise_multiplier)
            && non_negative(self.max_metrics_epsilon))
        {
            return Err(
                "max_clip_norm, min_noise_multiplier and max_metrics_epsilon must be >= 0".into(),
            );
        }
        Ok(())
    }

    /// The policy as TOML (what `training-policy show` prints and `set` reads).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    /// Whether the site obeys orders (a job, a promotion) signed by `signer`.
    pub fn check_signer(&self, signer: &str) -> Result<(), Refusal> {
        if !self.study_admins.is_empty()
            && !self
                .study_admins
                .iter()
                .any(|a| a == signer || signer.rsplit('/').next() == Some(a.as_str()))
        {
            return refuse(
                "study_admins",
                format!("{signer} is not a study admin this site obeys"),
            );
        }
        Ok(())
    }

    /// Whether the site obeys this job; the first rule it breaks, if any.
    pub fn check(&self, spec: &JobSpec, task: &TaskContext<'_>) -> Result<(), Refusal> {
        if !self.enabled {
            return refuse(
                "enabled",
                "this site does not take part in federated training",
            );
        }
        self.check_signer(task.signer)?;
        if !self.base_models.is_empty()
            && !self
                .base_models
                .iter()
                .any(|m| m == task.base_version || m.eq_ignore_ascii_case(task.base_sha256))
        {
            return refuse(
                "base_models",
                format!("base model {} is not allowed here", task.base_version),
            );
        }
        if task.evaluate_only {
            if !self.allow_evaluation_only {
                return refuse(
                    "allow_evaluation_only",
                    "evaluation-only tasks are not allowed",
                );
            }
        } else {
            if !self.trainable.contains(&spec.trainable) {
                return refuse(
                    "trainable",
                    format!("training {} is not allowed here", spec.trainable),
                );
            }
            if spec.batch_size < self.min_batch_size {
                return refuse(
                    "min_batch_size",
                    format!(
                        "batch size {} is below this site's {}",
                        spec.batch_size, self.min_batch_size
                    ),
                );
            }
            if spec.local_steps > 0 && spec.local_steps < self.min_local_steps {
                return refuse(
                    "min_local_steps",
                    format!(
                        "{} local steps are below this site's {}",
                        spec.local_steps, self.min_local_steps
                    ),
                );
            }
            if self.max_clip_norm > 0.0 && !(spec.clip > 0.0 && spec.clip <= self.max_clip_norm) {
                return refuse(
                    "max_clip_norm",
                    format!(
                        "updates must be clipped to at most {} (the job clips to {})",
                        self.max_clip_norm, spec.clip
                    ),
                );
            }
            if spec.noise_multiplier < self.min_noise_multiplier {
                return refuse(
                    "min_noise_multiplier",
                    format!(
                        "noise multiplier {} is below this site's {}",
                        spec.noise_multiplier, self.min_noise_multiplier
                    ),
                );
            }
            if self.require_secure_aggregation && !spec.secure_aggregation {
                return refuse(
                    "require_secure_aggregation",
                    "this site sends its update only under secure aggregation",
                );
            }
        }
        if spec.rounds > self.max_rounds_per_job {
            return refuse(
                "max_rounds_per_job",
                format!(
                    "{} rounds are more than this site's {}",
                    spec.rounds, self.max_rounds_per_job
                ),
            );
        }
        if spec.metrics_epsilon > self.max_metrics_epsilon {
            return refuse(
                "max_metrics_epsilon",
                format!(
                    "metrics epsilon {} per round is more than this site's {}",
                    spec.metrics_epsilon, self.max_metrics_epsilon
                ),
            );
        }
        if task.new_job && task.jobs_last_day >= self.max_jobs_per_day {
            return refuse(
                "max_jobs_per_day",
                format!(
                    "this site already joined {} jobs in the last 24 hours",
                    task.jobs_last_day
                ),
            );
        }
        Ok(())
    }

    /// The local steps a round at this site would take: checked where the job counts epochs.
    pub fn check_steps(&self, steps: usize) -> Result<(), Refusal> {
        if steps < self.min_local_steps as usize {
            return refuse(
                "min_local_steps",
                format!(
                    "the job's epochs give {steps} local steps here, below this site's {}",
                    self.min_local_steps
                ),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task() -> TaskContext<'static> {
        TaskContext {
            signer: "cxrfed://s/study-admin/-/sam",
            base_version: "tiny-phantom-v1",
            base_sha256: "ab",
            evaluate_only: false,
            new_job: true,
            jobs_last_day: 0,
        }
    }

    #[test]
    fn each_rule_refuses_by_name() {
        let spec = JobSpec::parse(
            "batch_size = 16\nlocal_steps = 20\nclip = 1.0\nnoise_multiplier = 1.0\n",
        )
        .expect("spec");
        let off = SitePolicy::default();
        assert_eq!(
            off.check(&spec, &task()).expect_err("refused").rule,
            "enabled"
        );
        let on = SitePolicy {
            enabled: true,
            ..SitePolicy::default()
        };
        on.check(&spec, &task()).expect("allowed");
        let cases: Vec<(SitePolicy, &str)> = vec![
            (
                SitePolicy {
                    study_admins: vec!["other".into()],
                    ..on.clone()
                },
                "study_admins",
            ),
            (
                SitePolicy {
                    base_models: vec!["v9".into()],
                    ..on.clone()
                },
                "base_models",
            ),
            (
                SitePolicy {
                    min_batch_size: 32,
                    ..on.clone()
                },
                "min_batch_size",
            ),
            (
                SitePolicy {
                    min_local_steps: 50,
                    ..on.clone()
                },
                "min_local_steps",
            ),
            (
                SitePolicy {
                    max_clip_norm: 0.5,
                    ..on.clone()
                },
                "max_clip_norm",
            ),
            (
                SitePolicy {
                    min_noise_multiplier: 2.0,
                    ..on.clone()
                },
                "min_noise_multiplier",
            ),
            (
                SitePolicy {
                    max_rounds_per_job: 1,
                    ..on.clone()
                },
                "max_rounds_per_job",
            ),
            (
                SitePolicy {
                    trainable: vec![Trainable::LastBlock],
                    ..on.clone()
                },
                "trainable",
            ),
            (
                SitePolicy {
                    max_metrics_epsilon: 0.1,
                    ..on.clone()
                },
                "max_metrics_epsilon",
            ),
        ];
        for (policy, rule) in cases {
            assert_eq!(
                policy.check(&spec, &task()).expect_err("refused").rule,
                rule
            );
        }
        // Allowed by name or by URI; a job asking more privacy than the floor is fine.
        let named = SitePolicy {
            study_admins: vec!["sam".into()],
            min_noise_multiplier: 0.5,
            max_clip_norm: 2.0,
            ..on.clone()
        };
        named.check(&spec, &task()).expect("allowed");
        let busy = TaskContext {
            jobs_last_day: 10,
            ..task()
        };
        assert_eq!(
            on.check(&spec, &busy).expect_err("refused").rule,
            "max_jobs_per_day"
        );
        let evaluation = TaskContext {
            evaluate_only: true,
            ..task()
        };
        let no_eval = SitePolicy {
            allow_evaluation_only: false,
            ..on.clone()
        };
        assert_eq!(
            no_eval.check(&spec, &evaluation).expect_err("refused").rule,
            "allow_evaluation_only"
        );
        // The policy reads back from its own TOML.
        assert_eq!(SitePolicy::parse(&named.to_toml()).expect("toml"), named);
        assert!(SitePolicy::parse("enabled = 1").is_err());
        assert!(SitePolicy::parse("no_such_rule = true").is_err());
    }
}
