//! A federated DP query: the researcher's signed intent checked (signed with the caller's own
//! certificate, then the one rule set of `cxrfed_server::intent`), a task to every site over
//! its link, answers collected until the deadline, the sites' raw noisy releases pooled, and
//! the query recorded on the coordinator's audit chain whether it succeeds or not.
//!
//! The coordinator never holds a record or an exact aggregate: a task is a signed query and a
//! result is a DP release or an error.

use std::time::Duration;

use chrono::Utc;
use cxrfed_auth::Identity;
use cxrfed_proto::Label;
use cxrfed_proto::v1 as pb;
use cxrfed_proto::v1::SiteQueryStatus as Status;
use cxrfed_server::intent::IntentError;
use cxrfed_stats::pool::{self, Part};
use cxrfed_store::{AuditEvent, CoordinatorStore};
use sha2::{Digest, Sha256};

use crate::error::{CoordinatorError, Result};
use crate::links::Links;

struct Outcome {
    site: String,
    result: Status,
    reason: String,
    release: Option<pb::DpStatsResponse>,
}

fn site_outcome(o: &Outcome) -> pb::SiteOutcome {
    let budget = o.release.as_ref().and_then(|r| r.budget.clone());
    pb::SiteOutcome {
        site: o.site.clone(),
        answered: o.result == Status::Answered,
        status: o.result.into(),
        reason: o.reason.clone(),
        epsilon: o.release.as_ref().map_or(0.0, |r| r.epsilon),
        delta: o.release.as_ref().map_or(0.0, |r| r.delta),
        epsilon_remaining: budget.map_or(0.0, |b| b.epsilon_remaining),
        audit_seq: o.release.as_ref().map_or(0, |r| r.audit_seq),
    }
}

fn part_of(site: &str, r: &pb::DpStatsResponse) -> Part {
    Part {
        site: site.to_string(),
        mechanism: cxrfed_server::intent::mechanism_of(r.noise()),
        label_columns: r.label_columns.clone(),
        value_columns: r.value_columns.clone(),
        rows: r
            .rows
            .iter()
            .map(|row| {
                (
                    row.labels.clone(),
                    row.values.iter().map(|v| v.value.unwrap_or(0.0)).collect(),
                )
            })
            .collect(),
        scales: r.value_scales.clone(),
    }
}

/// What a query needs of the coordinator.
#[derive(Debug)]
pub struct Federation<'a> {
    pub store: &'a CoordinatorStore,
    pub links: &'a Links,
    pub study: &'a str,
    pub default_timeout_ms: u32,
    pub suppress_below: u64,
}

impl Federation<'_> {
    /// Verifies the researcher's signed intent: signed by the caller's own certificate, then
    /// the rules every node applies again before it charges a budget.
    fn check_intent(
        &self,
        caller: &Identity,
        signed: &pb::SignedQuery,
    ) -> Result<cxrfed_server::intent::Verified> {
        let fingerprint = hex::encode(Sha256::digest(&signed.certificate));
        if fingerprint != caller.fingerprint {
            return Err(CoordinatorError::PermissionDenied(
                "the query must be signed with the caller's own certificate".into(),
            ));
        }
        let expect = cxrfed_server::intent::Expect {
            study: self.study,
            site: None,
            now_unix: Utc::now().timestamp(),
        };
        let verified = cxrfed_server::intent::verify(signed, &expect).map_err(|e| match e {
            IntentError::Signature(_) => CoordinatorError::PermissionDenied(e.to_string()),
            _ => CoordinatorError::InvalidArgument(e.to_string()),
        })?;
        Ok(verified)
    }

    /// The sites asked: those the intent names, else every site of the registry (those not
    /// connected are reported as such).
    fn targets(&self, intent: &pb::QueryIntent) -> Result<Vec<String>> {
        if !intent.sites.is_empty() {
            return Ok(intent.sites.clone());
        }
        let mut all: Vec<String> = self.links.connected().into_keys().collect();
        all.extend(self.store.sites()?.into_iter().map(|s| s.site));
        all.sort();
        all.dedup();
        Ok(all)
    }

    /// Sends the task to every connected target and waits for the answers until the deadline.
    async fn fan_out(
        &self,
        query_id: &str,
        signed: &pb::SignedQuery,
        targets: &[String],
        timeout_ms: u32,
    ) -> Vec<Outcome> {
        let connected = self.links.connected();
        let mut waiting = Vec::new();
        let mut outcomes = Vec::new();
        for site in targets {
            let Some(tx) = connected.get(site) else {
                outcomes.push(Outcome {
                    site: site.clone(),
                    result: Status::NotConnected,
                    reason: "the site is not connected to the coordinator".into(),
                    release: None,
                });
                continue;
            };
            let task = pb::Task {
                task_id: format!("{query_id}/{site}"),
                query: Some(signed.clone()),
            };
            let rx = self.links.wait_for(site, task.clone());
            // A failed send leaves the task pending: the site may reconnect in time.
            let _ = tx
                .send(Ok(pb::CoordinatorMessage {
                    kind: Some(pb::coordinator_message::Kind::Task(task.clone())),
                }))
                .await;
            waiting.push((site.clone(), task.task_id, rx));
        }
        let deadline = tokio::time::Instant::now() + Duration::from_millis(u64::from(timeout_ms));
        for (site, task_id, rx) in waiting {
            let outcome = match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(result)) => match result.outcome {
                    Some(pb::task_result::Outcome::Release(release)) => Outcome {
                        site,
                        result: Status::Answered,
                        reason: String::new(),
                        release: Some(release),
                    },
                    Some(pb::task_result::Outcome::Error(e)) => Outcome {
                        site,
                        result: match pb::TaskErrorCode::try_from(e.code)
                            .unwrap_or(pb::TaskErrorCode::Unspecified)
                        {
                            pb::TaskErrorCode::BudgetExhausted => Status::BudgetExhausted,
                            pb::TaskErrorCode::Invalid => Status::Invalid,
                            pb::TaskErrorCode::Internal => Status::Failed,
                            pb::TaskErrorCode::Refused | pb::TaskErrorCode::Unspecified => {
                                Status::Refused
                            }
                        },
                        reason: e.message,
                        release: None,
                    },
                    None => Outcome {
                        site,
                        result: Status::Failed,
                        reason: "an empty result".into(),
                        release: None,
                    },
                },
                _ => {
                    let connected = self.links.is_connected(&site);
                    Outcome {
                        result: if connected {
                            Status::Timeout
                        } else {
                            Status::Disconnected
                        },
                        reason: format!(
                            "no answer within {timeout_ms} ms{}",
                            if connected {
                                ""
                            } else {
                                "; the site's link is down"
                            }
                        ),
                        site,
                        release: None,
                    }
                }
            };
            self.links.forget(&task_id);
            outcomes.push(outcome);
        }
        outcomes.sort_by(|a, b| a.site.cmp(&b.site));
        outcomes
    }

    /// Runs a researcher's federated query end to end.
    pub async fn query(
        &self,
        caller: &Identity,
        request: pb::FederatedQueryRequest,
    ) -> Result<pb::FederatedQueryResponse> {
        let signed = request
            .signed
            .ok_or_else(|| CoordinatorError::InvalidArgument("the query is not signed".into()))?;
        let cxrfed_server::intent::Verified { intent, query, .. } =
            self.check_intent(caller, &signed)?;
        let query_id = uuid::Uuid::now_v7().to_string();
        let timeout_ms = match request.timeout_ms {
            0 => self.default_timeout_ms,
            t => t.min(600_000),
        };
        let min_sites = request.min_sites.max(1);
        let targets = self.targets(&intent)?;
        tracing::info!(
            query_id = query_id.as_str(),
            researcher = %caller,
            sites = targets.len(),
            epsilon = intent.epsilon,
            "federated query"
        );
        let mut outcomes = self.fan_out(&query_id, &signed, &targets, timeout_ms).await;
        // Pool the releases that share the first one's layout.
        let mut parts: Vec<Part> = Vec::new();
        let mut statistic = String::new();
        let mut canonical = intent.query.clone();
        for o in &mut outcomes {
            let Some(release) = &o.release else { continue };
            let part = part_of(&o.site, release);
            if let Some(first) = parts.first()
                && !pool::same_layout(first, &part)
            {
                o.result = Status::Mismatch;
                o.reason = "its categories differ from the other sites' (custom fields?)".into();
                continue;
            }
            statistic = release.statistic.clone();
            canonical = release.query.clone();
            parts.push(part);
        }
        let answered = parts.len() as u32;
        let summary = outcomes
            .iter()
            .map(|o| format!("{} {}", o.site, o.result.label()))
            .collect::<Vec<_>>()
            .join(", ");
        let audit = |method: &str, digest: String| AuditEvent {
            identity: caller.uri(),
            role: caller.role.as_str().into(),
            method: method.into(),
            query: format!("{canonical} [{summary}]"),
            epsilon: intent.epsilon,
            delta: intent.delta,
            digest,
            via: String::new(),
        };
        if answered < min_sites {
            let detail = outcomes
                .iter()
                .filter(|o| o.result != Status::Answered)
                .map(|o| format!("{} {} ({})", o.site, o.result.label(), o.reason))
                .collect::<Vec<_>>()
                .join("; ");
            self.store
                .audit(audit("Query (failed)", String::new()))
                .await?;
            return Err(CoordinatorError::Unavailable(format!(
                "{answered} of {} sites answered; at least {min_sites} needed. {detail}",
                outcomes.len()
            )));
        }
        let suppress_below = self.suppress_below;
        // A mean is clamped to its field's declared bounds, as each site clamps its values.
        // (The query was parsed once, by the intent check.)
        let bounds = match query.statistic {
            cxrfed_stats::query::Statistic::Mean(f) => cxrfed_schema::flat::field(&f.value),
            _ => None,
        }
        .and_then(|f| match f.kind {
            cxrfed_schema::flat::FieldKind::Numeric { min, max } => Some((min, max)),
            _ => None,
        });
        let pooled = pool::pool(
            &statistic,
            &parts,
            suppress_below,
            cxrfed_stats::dp::CONFIDENCE,
            bounds,
        );
        let rows: Vec<pb::DpRow> = pooled
            .rows
            .iter()
            .map(|row| pb::DpRow {
                labels: row.labels.clone(),
                values: row
                    .values
                    .iter()
                    .map(|v| pb::DpValue {
                        value: v.value,
                        error_bound: v.error_bound,
                    })
                    .collect(),
            })
            .collect();
        let digest = hex::encode(Sha256::digest(
            serde_json::to_vec(&serde_json::json!({
                "rows": pooled.rows, "sites": summary,
            }))
            .unwrap_or_default(),
        ));
        let entry = self.store.audit(audit("Query", digest)).await?;
        let notes = vec![
            format!(
                "pooled over {answered} site(s); each site charged your budget there (epsilon {} each) and added its own noise",
                intent.epsilon
            ),
            "± is the 95% bound of the sum of the sites' independent noises (exact convolution)"
                .into(),
            format!("pooled counts below {suppress_below} are withheld, negative ones shown as 0"),
        ];
        tracing::info!(
            query_id = query_id.as_str(),
            answered,
            sites = summary.as_str(),
            "federated query answered"
        );
        Ok(pb::FederatedQueryResponse {
            query_id,
            statistic,
            query: canonical,
            label_columns: pooled.label_columns,
            value_columns: pooled.value_columns,
            rows,
            confidence: cxrfed_stats::dp::CONFIDENCE,
            suppress_below,
            notes,
            sites: outcomes.iter().map(site_outcome).collect(),
            answered,
            audit_seq: entry.seq,
        })
    }
}
