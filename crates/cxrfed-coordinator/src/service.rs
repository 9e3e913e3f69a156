//! `cxrfed.v1.CoordinatorService`: the nodes' links, federated DP queries, the site registry
//! and the coordinator's audit chain.
//!
//! The coordinator relays a researcher's signed query to the sites over their links and pools
//! the raw noisy values they release. It never holds a record or an exact aggregate: the link
//! protocol has no message that could carry one (a task is a signed query, a result is a DP
//! release or an error), and the node enforces that the coordinator role reaches none of its
//! exact or admin RPCs.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{SecondsFormat, Utc};
use cxrfed_auth::Identity;
use cxrfed_proto::v1 as pb;
use cxrfed_proto::v1::coordinator_service_server::CoordinatorService;
use cxrfed_stats::dp::Mechanism;
use cxrfed_stats::pool::{self, Part};
use cxrfed_store::{AuditEvent, CoordinatorStore, SiteRecord};
use prost::Message;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::config::CoordinatorConfig;

pub(crate) type Outbound = mpsc::Sender<Result<pb::CoordinatorMessage, Status>>;

/// One node's live link.
#[derive(Debug)]
struct Link {
    id: u64,
    tx: Outbound,
}

/// A task sent and not yet answered.
#[derive(Debug)]
struct Pending {
    site: String,
    task: pb::Task,
    reply: oneshot::Sender<pb::TaskResult>,
}

/// The coordinator's shared state.
#[derive(Debug)]
pub struct CoordinatorState {
    pub config: CoordinatorConfig,
    pub store: CoordinatorStore,
    pub study: String,
    pub started: Instant,
    links: Mutex<HashMap<String, Link>>,
    pending: Mutex<HashMap<String, Pending>>,
    next_link: AtomicU64,
    /// Federated training: update uploads, rounds waiting for reports, running jobs.
    pub training: crate::training::Training,
}

impl CoordinatorState {
    pub fn new(config: CoordinatorConfig, store: CoordinatorStore, study: String) -> Self {
        CoordinatorState {
            config,
            store,
            study,
            started: Instant::now(),
            links: Mutex::default(),
            pending: Mutex::default(),
            next_link: AtomicU64::new(1),
            training: Default::default(),
        }
    }

    /// The sites connected now, with their links.
    pub(crate) fn connected_links(&self) -> Vec<(String, Outbound)> {
        self.connected().into_iter().collect()
    }

    fn connected(&self) -> HashMap<String, Outbound> {
        self.links
            .lock()
            .map(|l| l.iter().map(|(s, l)| (s.clone(), l.tx.clone())).collect())
            .unwrap_or_default()
    }
}

#[derive(Debug, Clone)]
pub struct CoordinatorApi {
    state: Arc<CoordinatorState>,
}

impl CoordinatorApi {
    pub fn new(state: Arc<CoordinatorState>) -> Self {
        CoordinatorApi { state }
    }
}

fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn identity_of<T>(request: &Request<T>) -> Result<Identity, Status> {
    request
        .extensions()
        .get::<Identity>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no verified identity"))
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn update_site(state: &CoordinatorState, site: &str, edit: impl FnOnce(&mut SiteRecord)) {
    let mut record = state
        .store
        .sites()
        .ok()
        .and_then(|all| all.into_iter().find(|s| s.site == site))
        .unwrap_or_else(|| SiteRecord {
            site: site.to_string(),
            ..Default::default()
        });
    edit(&mut record);
    if let Err(e) = state.store.upsert_site(&record).await {
        tracing::error!(site, error = %e, "cannot record the site");
    }
}

/// Reads one node's messages until its stream ends.
async fn read_link(
    state: Arc<CoordinatorState>,
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
                let since = now();
                update_site(&state, &site, |r| {
                    r.identity = identity.clone();
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
                // Resume: tasks of queries still waiting for this site go out again.
                let resend: Vec<pb::Task> = state
                    .pending
                    .lock()
                    .map(|p| {
                        p.values()
                            .filter(|p| p.site == site)
                            .map(|p| p.task.clone())
                            .collect()
                    })
                    .unwrap_or_default();
                let tx = state
                    .links
                    .lock()
                    .ok()
                    .and_then(|l| l.get(&site).map(|l| l.tx.clone()));
                // A site that does not run the promoted model gets it.
                if let (Some(tx), Ok(Some(promoted))) =
                    (tx.clone(), crate::training::promoted(&state))
                    && promoted.version != hello.model_id
                {
                    tracing::info!(
                        site,
                        version = promoted.version.as_str(),
                        "sending the promoted model"
                    );
                    if let Err(e) = crate::training::rollout_to(&state, tx, &promoted) {
                        tracing::error!(site, error = %e, "cannot send the promoted model");
                    }
                }
                if let Some(tx) = tx {
                    for task in resend {
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
            }
            Some(pb::node_message::Kind::Heartbeat(beat)) => {
                let seen = now();
                update_site(&state, &site, |r| {
                    r.last_seen = seen;
                    r.record_count = beat.record_count;
                    if !beat.model_id.is_empty() {
                        r.model_id = beat.model_id.clone();
                    }
                })
                .await;
            }
            Some(pb::node_message::Kind::Result(result)) => {
                let pending = state
                    .pending
                    .lock()
                    .ok()
                    .and_then(|mut p| p.remove(&result.task_id));
                match pending {
                    Some(p) if p.site == site => {
                        let _ = p.reply.send(result);
                    }
                    Some(p) => {
                        tracing::warn!(
                            site,
                            task_site = p.site.as_str(),
                            "a site answered another site's task; ignored"
                        );
                        if let Ok(mut all) = state.pending.lock() {
                            all.insert(result.task_id.clone(), p);
                        }
                    }
                    None => tracing::debug!(
                        site,
                        task_id = result.task_id.as_str(),
                        "result of a finished query"
                    ),
                }
            }
            Some(pb::node_message::Kind::Update(chunk)) => {
                let spool = state.config.data_dir.join("spool");
                state.training.on_chunk(&spool, &site, chunk);
            }
            Some(pb::node_message::Kind::TrainReport(report)) => {
                state.training.on_report(&site, report);
            }
            Some(pb::node_message::Kind::RolloutReport(report)) => {
                if report.ok {
                    tracing::info!(
                        site,
                        version = report.version.as_str(),
                        backfill_records = report.backfill_records,
                        "site switched to the promoted model"
                    );
                    update_site(&state, &site, |r| r.model_id = report.version.clone()).await;
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
    update_site(&state, &site, |r| r.last_seen = seen).await;
    if let Ok(mut links) = state.links.lock()
        && links.get(&site).is_some_and(|l| l.id == link_id)
    {
        links.remove(&site);
    }
    tracing::info!(site, "site disconnected");
}

type LinkStream = Pin<Box<dyn Stream<Item = Result<pb::CoordinatorMessage, Status>> + Send>>;

/// What happened at one site during a query.
struct Outcome {
    site: String,
    status: &'static str,
    reason: String,
    release: Option<pb::DpStatsResponse>,
}

fn site_outcome(o: &Outcome) -> pb::SiteOutcome {
    let budget = o.release.as_ref().and_then(|r| r.budget.clone());
    pb::SiteOutcome {
        site: o.site.clone(),
        answered: o.status == "answered",
        status: o.status.to_string(),
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
        mechanism: if r.mechanism.contains("gaussian") {
            Mechanism::Gaussian
        } else {
            Mechanism::Laplace
        },
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

impl CoordinatorApi {
    /// Verifies the researcher's signed intent: signed by the caller's own certificate, for
    /// this study, not expired.
    fn check_intent(
        &self,
        caller: &Identity,
        signed: &pb::SignedQuery,
    ) -> Result<pb::QueryIntent, Status> {
        let fingerprint = hex(&Sha256::digest(&signed.certificate));
        if fingerprint != caller.fingerprint {
            return Err(Status::permission_denied(
                "the query must be signed with the caller's own certificate",
            ));
        }
        cxrfed_auth::signing::verify(&signed.certificate, &signed.intent, &signed.signature)
            .map_err(|e| Status::permission_denied(e.to_string()))?;
        let intent = pb::QueryIntent::decode(signed.intent.as_slice()).map_err(|e| {
            Status::invalid_argument(format!("the signed intent is unreadable: {e}"))
        })?;
        if intent.study != self.state.study {
            return Err(Status::invalid_argument(format!(
                "the query is for study {:?}; this coordinator serves {:?}",
                intent.study, self.state.study
            )));
        }
        if Utc::now().timestamp() > intent.expires_at_unix {
            return Err(Status::invalid_argument("the signed query has expired"));
        }
        if !(intent.epsilon.is_finite() && intent.epsilon > 0.0) {
            return Err(Status::invalid_argument(
                "epsilon must be a positive number",
            ));
        }
        let query = cxrfed_stats::query::parse(&intent.query)
            .map_err(|e| Status::invalid_argument(format!("query: {e}")))?;
        if matches!(query.statistic, cxrfed_stats::query::Statistic::Summary(_)) {
            return Err(Status::invalid_argument(
                "summary has no DP release; use mean or sum",
            ));
        }
        Ok(intent)
    }
}

#[tonic::async_trait]
impl CoordinatorService for CoordinatorApi {
    type LinkStream = LinkStream;

    async fn link(
        &self,
        request: Request<Streaming<pb::NodeMessage>>,
    ) -> Result<Response<Self::LinkStream>, Status> {
        let identity = identity_of(&request)?;
        let site = identity
            .site
            .clone()
            .ok_or_else(|| Status::permission_denied("a node certificate names its site"))?;
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        tx.send(Ok(pb::CoordinatorMessage {
            kind: Some(pb::coordinator_message::Kind::Welcome(pb::Welcome {
                heartbeat_secs: self.state.config.heartbeat_secs,
            })),
        }))
        .await
        .map_err(internal)?;
        let id = self.state.next_link.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut links) = self.state.links.lock()
            && links.insert(site.clone(), Link { id, tx }).is_some()
        {
            tracing::info!(site, "site reconnected; its previous link is replaced");
        }
        tokio::spawn(read_link(
            self.state.clone(),
            site,
            identity.uri(),
            id,
            inbound,
        ));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn query(
        &self,
        request: Request<pb::FederatedQueryRequest>,
    ) -> Result<Response<pb::FederatedQueryResponse>, Status> {
        let caller = identity_of(&request)?;
        let request = request.into_inner();
        let signed = request
            .signed
            .ok_or_else(|| Status::invalid_argument("the query is not signed"))?;
        let intent = self.check_intent(&caller, &signed)?;
        let query_id = uuid::Uuid::now_v7().to_string();
        let timeout_ms = match request.timeout_ms {
            0 => self.state.config.query_timeout_ms,
            t => t.min(600_000),
        };
        let min_sites = request.min_sites.max(1);
        let connected = self.state.connected();
        let targets: Vec<String> = if intent.sites.is_empty() {
            // Every site of the registry: those not connected are reported as such.
            let mut all: Vec<String> = connected.keys().cloned().collect();
            all.extend(
                self.state
                    .store
                    .sites()
                    .map_err(internal)?
                    .into_iter()
                    .map(|s| s.site),
            );
            all.sort();
            all.dedup();
            all
        } else {
            intent.sites.clone()
        };
        tracing::info!(
            query_id = query_id.as_str(),
            researcher = %caller,
            sites = targets.len(),
            epsilon = intent.epsilon,
            "federated query"
        );
        let mut waiting = Vec::new();
        let mut outcomes = Vec::new();
        for site in &targets {
            let Some(tx) = connected.get(site) else {
                outcomes.push(Outcome {
                    site: site.clone(),
                    status: "not_connected",
                    reason: "the site is not connected to the coordinator".into(),
                    release: None,
                });
                continue;
            };
            let task = pb::Task {
                task_id: format!("{query_id}/{site}"),
                query: Some(signed.clone()),
            };
            let (reply, rx) = oneshot::channel();
            if let Ok(mut pending) = self.state.pending.lock() {
                pending.insert(
                    task.task_id.clone(),
                    Pending {
                        site: site.clone(),
                        task: task.clone(),
                        reply,
                    },
                );
            }
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
                        status: "answered",
                        reason: String::new(),
                        release: Some(release),
                    },
                    Some(pb::task_result::Outcome::Error(e)) => Outcome {
                        site,
                        status: match e.code.as_str() {
                            "budget_exhausted" => "budget_exhausted",
                            "invalid" => "invalid",
                            "internal" => "failed",
                            _ => "refused",
                        },
                        reason: e.message,
                        release: None,
                    },
                    None => Outcome {
                        site,
                        status: "failed",
                        reason: "an empty result".into(),
                        release: None,
                    },
                },
                _ => {
                    let connected = self
                        .state
                        .links
                        .lock()
                        .map(|l| l.contains_key(&site))
                        .unwrap_or(false);
                    Outcome {
                        status: if connected { "timeout" } else { "disconnected" },
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
            if let Ok(mut pending) = self.state.pending.lock() {
                pending.remove(&task_id);
            }
            outcomes.push(outcome);
        }
        outcomes.sort_by(|a, b| a.site.cmp(&b.site));
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
                o.status = "mismatch";
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
            .map(|o| format!("{} {}", o.site, o.status))
            .collect::<Vec<_>>()
            .join(", ");
        if answered < min_sites {
            let detail = outcomes
                .iter()
                .filter(|o| o.status != "answered")
                .map(|o| format!("{} {} ({})", o.site, o.status, o.reason))
                .collect::<Vec<_>>()
                .join("; ");
            self.state
                .store
                .audit(AuditEvent {
                    identity: caller.uri(),
                    role: caller.role.as_str().into(),
                    method: "Query (failed)".into(),
                    query: format!("{canonical} [{summary}]"),
                    epsilon: intent.epsilon,
                    delta: intent.delta,
                    digest: String::new(),
                    via: String::new(),
                })
                .await
                .map_err(internal)?;
            return Err(Status::unavailable(format!(
                "{answered} of {} sites answered; at least {min_sites} needed. {detail}",
                outcomes.len()
            )));
        }
        let suppress_below = self.state.config.suppress_below;
        // A mean is clamped to its field's declared bounds, as each site clamps its values.
        let bounds = cxrfed_stats::query::parse(&intent.query)
            .ok()
            .and_then(|q| match q.statistic {
                cxrfed_stats::query::Statistic::Mean(f) => cxrfed_schema::flat::field(&f.value),
                _ => None,
            })
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
        let digest = hex(&Sha256::digest(
            serde_json::to_vec(&serde_json::json!({
                "rows": pooled.rows, "sites": summary,
            }))
            .unwrap_or_default(),
        ));
        let entry = self
            .state
            .store
            .audit(AuditEvent {
                identity: caller.uri(),
                role: caller.role.as_str().into(),
                method: "Query".into(),
                query: format!("{canonical} [{summary}]"),
                epsilon: intent.epsilon,
                delta: intent.delta,
                digest,
                via: String::new(),
            })
            .await
            .map_err(internal)?;
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
        Ok(Response::new(pb::FederatedQueryResponse {
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
        }))
    }

    async fn sites(
        &self,
        _request: Request<pb::SitesRequest>,
    ) -> Result<Response<pb::SitesResponse>, Status> {
        let connected = self.state.connected();
        let sites = self
            .state
            .store
            .sites()
            .map_err(internal)?
            .into_iter()
            .map(|s| pb::SiteInfo {
                connected: connected.contains_key(&s.site),
                site: s.site,
                identity: s.identity,
                last_seen: s.last_seen,
                version: s.version,
                model_id: s.model_id,
                record_count: s.record_count,
                connected_since: s.connected_since,
            })
            .collect();
        Ok(Response::new(pb::SitesResponse { sites }))
    }

    async fn coordinator_audit(
        &self,
        request: Request<pb::AuditLogRequest>,
    ) -> Result<Response<pb::AuditLogResponse>, Status> {
        let since = cxrfed_store::audit::parse_since(&request.into_inner().since)
            .map_err(Status::invalid_argument)?;
        let entries = self.state.store.audit_entries(since).map_err(internal)?;
        let head = self.state.store.verify_audit().map_err(internal)?.head;
        Ok(Response::new(pb::AuditLogResponse {
            entries: entries.into_iter().map(pb::AuditEntry::from).collect(),
            head,
        }))
    }

    async fn verify_coordinator_audit(
        &self,
        _request: Request<pb::VerifyAuditRequest>,
    ) -> Result<Response<pb::VerifyAuditResponse>, Status> {
        let report = self.state.store.verify_audit().map_err(internal)?;
        Ok(Response::new(pb::VerifyAuditResponse::from(report)))
    }

    async fn start_job(
        &self,
        request: Request<pb::StartJobRequest>,
    ) -> Result<Response<pb::JobInfo>, Status> {
        let caller = identity_of(&request)?;
        let spec = crate::training::JobSpec::parse(&request.into_inner().spec_toml)
            .map_err(Status::invalid_argument)?;
        let job = crate::training::start(&self.state, spec, caller.uri())
            .await
            .map_err(Status::failed_precondition)?;
        self.audit_action(
            &caller,
            "StartJob",
            serde_json::to_string(&job.spec).unwrap_or_default(),
            job.job_id.clone(),
        )
        .await;
        tracing::info!(job_id = job.job_id.as_str(), by = %caller, "training job started");
        Ok(Response::new(pb::JobInfo::from(&job)))
    }

    async fn list_jobs(
        &self,
        _request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let jobs = crate::training::jobs(&self.state).map_err(internal)?;
        Ok(Response::new(pb::ListJobsResponse {
            jobs: jobs.iter().map(pb::JobInfo::from).collect(),
        }))
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::JobInfo>, Status> {
        let id = request.into_inner().job_id;
        let job = crate::training::job(&self.state, &id)
            .map_err(internal)?
            .ok_or_else(|| Status::not_found(format!("no job {id:?}")))?;
        Ok(Response::new(pb::JobInfo::from(&job)))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::JobInfo>, Status> {
        let id = request.into_inner().job_id;
        if crate::training::job(&self.state, &id)
            .map_err(internal)?
            .is_none()
        {
            return Err(Status::not_found(format!("no job {id:?}")));
        }
        let job = crate::training::cancel(&self.state, &id)
            .await
            .map_err(Status::failed_precondition)?;
        Ok(Response::new(pb::JobInfo::from(&job)))
    }

    async fn list_models(
        &self,
        _request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let models = crate::training::models(&self.state).map_err(internal)?;
        Ok(Response::new(pb::ListModelsResponse {
            models: models.iter().map(|m| self.model_info(m)).collect(),
        }))
    }

    async fn get_model(
        &self,
        request: Request<pb::GetModelRequest>,
    ) -> Result<Response<pb::ModelVersion>, Status> {
        let version = request.into_inner().version;
        let model = crate::training::model(&self.state, &version)
            .map_err(internal)?
            .ok_or_else(|| Status::not_found(format!("no model version {version:?}")))?;
        Ok(Response::new(self.model_info(&model)))
    }

    async fn promote_model(
        &self,
        request: Request<pb::PromoteModelRequest>,
    ) -> Result<Response<pb::PromoteModelResponse>, Status> {
        let caller = identity_of(&request)?;
        let version = request.into_inner().version;
        if crate::training::model(&self.state, &version)
            .map_err(internal)?
            .is_none()
        {
            return Err(Status::not_found(format!("no model version {version:?}")));
        }
        let (doc, sent_to) = crate::training::promote(&self.state, &version)
            .await
            .map_err(Status::failed_precondition)?;
        self.audit_action(&caller, "PromoteModel", version.clone(), doc.sha256.clone())
            .await;
        Ok(Response::new(pb::PromoteModelResponse {
            model: Some(self.model_info(&doc)),
            sent_to,
        }))
    }

    async fn import_model(
        &self,
        request: Request<Streaming<pb::ImportModelChunk>>,
    ) -> Result<Response<pb::ModelVersion>, Status> {
        let caller = identity_of(&request)?;
        let (version, card, weights) = Self::read_import(&mut request.into_inner()).await?;
        if crate::training::model(&self.state, &version)
            .map_err(internal)?
            .is_some()
        {
            return Err(Status::already_exists(format!(
                "version {version} is already in the registry"
            )));
        }
        let doc = crate::training::import(&self.state, &version, &card, &weights)
            .await
            .map_err(Status::invalid_argument)?;
        self.audit_action(&caller, "ImportModel", version.clone(), doc.sha256.clone())
            .await;
        tracing::info!(version = version.as_str(), by = %caller, bytes = weights.len(), "model imported");
        Ok(Response::new(self.model_info(&doc)))
    }
}

impl CoordinatorApi {
    /// Records a study admin's action (a job, a promotion, an import) on the coordinator's
    /// audit chain; a failure to record is logged, the action stands.
    async fn audit_action(&self, caller: &Identity, method: &str, query: String, digest: String) {
        let entry = self
            .state
            .store
            .audit(AuditEvent {
                identity: caller.uri(),
                role: caller.role.as_str().to_string(),
                method: method.to_string(),
                query,
                epsilon: 0.0,
                delta: 0.0,
                digest,
                via: String::new(),
            })
            .await;
        if let Err(e) = entry {
            tracing::error!(method, error = %e, "cannot append to the audit chain");
        }
    }

    /// Reads an `ImportModel` stream: the version and card, then the weights.
    async fn read_import(
        stream: &mut Streaming<pb::ImportModelChunk>,
    ) -> Result<(String, String, Vec<u8>), Status> {
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("an empty import"))?;
        let mut weights = first.data;
        while let Some(chunk) = stream.message().await? {
            if weights.len() + chunk.data.len() > crate::training::MAX_MODEL_BYTES {
                return Err(Status::invalid_argument("the model is larger than 2 GiB"));
            }
            weights.extend_from_slice(&chunk.data);
        }
        Ok((first.version, first.card_json, weights))
    }

    /// A registry entry with the sites that run it now.
    fn model_info(&self, doc: &crate::training::ModelDoc) -> pb::ModelVersion {
        let mut info = pb::ModelVersion::from(doc);
        info.running_at = self
            .state
            .store
            .sites()
            .unwrap_or_default()
            .into_iter()
            .filter(|s| s.model_id == doc.version)
            .map(|s| s.site)
            .collect();
        info
    }
}
