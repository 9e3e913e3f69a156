//! One node's link session, as the coordinator sees it: the site's hello (registry update,
//! tasks resent, the promoted model if the site runs another), heartbeats, query results,
//! update chunks and reports for the training engine, rollout reports.

use std::sync::Arc;

use cxrfed_proto::v1 as pb;
use cxrfed_store::{CoordinatorStore, SiteRecord};
use tonic::Streaming;

use crate::links::{Links, Outbound};
use crate::training::{Trainer, now};

/// What a session needs of the coordinator.
#[derive(Debug, Clone)]
pub struct Session {
    pub store: CoordinatorStore,
    pub links: Arc<Links>,
    pub trainer: Arc<Trainer>,
}

impl Session {
    async fn update_site(&self, site: &str, edit: impl FnOnce(&mut SiteRecord)) {
        let mut record = self
            .store
            .sites()
            .ok()
            .and_then(|all| all.into_iter().find(|s| s.site == site))
            .unwrap_or_else(|| SiteRecord {
                site: site.to_string(),
                ..Default::default()
            });
        edit(&mut record);
        if let Err(e) = self.store.upsert_site(&record).await {
            tracing::error!(site, error = %e, "cannot record the site");
        }
    }

    async fn hello(&self, site: &str, identity: &str, hello: pb::NodeHello) {
        let since = now();
        self.update_site(site, |r| {
            r.identity = identity.to_string();
            r.version = hello.version.clone();
            r.model_id = hello.model_id.clone();
            r.record_count = hello.record_count;
            r.connected_since = since.clone();
            r.last_seen = since.clone();
        })
        .await;
        tracing::info!(
            site,
            version = hello.version.as_str(),
            records = hello.record_count,
            "site connected"
        );
        let Some(tx) = self.links.get(site) else {
            return;
        };
        // A site that does not run the promoted model gets it.
        if let Ok(Some(promoted)) = self.trainer.registry().promoted()
            && promoted.version != hello.model_id
        {
            tracing::info!(
                site,
                version = promoted.version.as_str(),
                "sending the promoted model"
            );
            if let Err(e) = self.trainer.rollout_to(tx.clone(), &promoted) {
                tracing::error!(site, error = %e, "cannot send the promoted model");
            }
        }
        // Resume: tasks of queries still waiting for this site go out again.
        resend(&tx, site, self.links.pending_for(site)).await;
    }

    /// Reads one node's messages until its stream ends, then marks the site disconnected.
    pub async fn run(
        self,
        site: String,
        identity: String,
        link_id: u64,
        mut inbound: Streaming<pb::NodeMessage>,
    ) {
        loop {
            let message = match inbound.message().await {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(status) => {
                    tracing::info!(site, error = %status.message(), "link ended");
                    break;
                }
            };
            match message.kind {
                Some(pb::node_message::Kind::Hello(hello)) => {
                    self.hello(&site, &identity, hello).await;
                }
                Some(pb::node_message::Kind::Heartbeat(beat)) => {
                    let seen = now();
                    self.update_site(&site, |r| {
                        r.last_seen = seen;
                        r.record_count = beat.record_count;
                        if !beat.model_id.is_empty() {
                            r.model_id = beat.model_id.clone();
                        }
                    })
                    .await;
                }
                Some(pb::node_message::Kind::Result(result)) => self.links.answer(&site, result),
                Some(pb::node_message::Kind::Update(chunk)) => {
                    self.trainer.hub().on_chunk(&site, chunk);
                }
                Some(pb::node_message::Kind::TrainReport(report)) => {
                    self.trainer.hub().on_report(&site, report);
                }
                Some(pb::node_message::Kind::MaskKey(key)) => {
                    self.trainer.hub().on_key(&site, key);
                }
                Some(pb::node_message::Kind::RolloutReport(report)) => {
                    if report.ok {
                        tracing::info!(
                            site,
                            version = report.version.as_str(),
                            backfill_records = report.backfill_records,
                            "site switched to the promoted model"
                        );
                        self.update_site(&site, |r| r.model_id = report.version.clone())
                            .await;
                    } else {
                        tracing::warn!(
                            site,
                            version = report.version.as_str(),
                            reason = report.reason.as_str(),
                            "site refused the promoted model"
                        );
                    }
                }
                None => {}
            }
        }
        let seen = now();
        self.update_site(&site, |r| r.last_seen = seen).await;
        self.links.detach(&site, link_id);
        tracing::info!(site, "site disconnected");
    }
}

async fn resend(tx: &Outbound, site: &str, tasks: Vec<pb::Task>) {
    for task in tasks {
        tracing::info!(
            site,
            task_id = task.task_id.as_str(),
            "task sent again after a reconnect"
        );
        let _ = tx
            .send(Ok(pb::CoordinatorMessage {
                kind: Some(pb::coordinator_message::Kind::Task(task)),
            }))
            .await;
    }
}
