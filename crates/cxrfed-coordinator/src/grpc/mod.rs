//! `cxrfed.v1.CoordinatorService`: each handler reads the caller and the request, calls the
//! domain (links and sessions, federated queries, the training engine and registry, the audit
//! chain), and converts the answer; errors are `CoordinatorError`s with one mapping to a
//! status. Every RPC gets a span and a request id from the server bootstrap.

mod convert;

use std::pin::Pin;
use std::sync::Arc;

use cxrfed_auth::{Identity, Role};
use cxrfed_proto::v1 as pb;
use cxrfed_proto::v1::coordinator_service_server::CoordinatorService;
use cxrfed_store::AuditEvent;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::error::CoordinatorError;
use crate::query::Federation;
use crate::session::Session;
use crate::state::Coordinator;
use crate::training::{MAX_MODEL_BYTES, ModelDoc};

type LinkStream = Pin<Box<dyn Stream<Item = Result<pb::CoordinatorMessage, Status>> + Send>>;

#[derive(Debug, Clone)]
pub struct CoordinatorApi {
    state: Arc<Coordinator>,
}

impl CoordinatorApi {
    pub fn new(state: Arc<Coordinator>) -> Self {
        CoordinatorApi { state }
    }

    fn federation(&self) -> Federation<'_> {
        Federation {
            store: self.state.store(),
            links: self.state.links(),
            study: self.state.study(),
            default_timeout_ms: self.state.config().query_timeout_ms,
            suppress_below: self.state.config().suppress_below,
        }
    }

    /// Records a study admin's action (a job, a promotion, an import) on the coordinator's
    /// audit chain; a failure to record is logged, the action stands.
    async fn audit_action(&self, caller: &Identity, method: &str, query: String, digest: String) {
        let entry = self
            .state
            .store()
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

    /// A registry entry with the sites that run it now.
    fn model_info(&self, doc: &ModelDoc) -> pb::ModelVersion {
        let mut info = pb::ModelVersion::from(doc);
        info.running_at = self
            .state
            .store()
            .sites()
            .unwrap_or_default()
            .into_iter()
            .filter(|s| s.model_id == doc.version)
            .map(|s| s.site)
            .collect();
        info
    }
}

/// A job as the caller may see it: whole for the study admin, redacted for everyone else.
fn job_view(caller: &Identity, job: &crate::training::JobDoc) -> pb::JobInfo {
    if caller.role == Role::StudyAdmin {
        pb::JobInfo::from(job)
    } else {
        convert::redacted(job)
    }
}

impl CoordinatorApi {
    /// A model version as the caller may see it: per-site sample counts for the study admin
    /// only.
    fn model_view(&self, caller: &Identity, doc: &ModelDoc) -> pb::ModelVersion {
        let mut info = self.model_info(doc);
        if caller.role != Role::StudyAdmin {
            info.samples.clear();
        }
        info
    }

    /// Checks a study admin's signed order at the coordinator: signed by the caller's own
    /// certificate (the one mutual TLS verified), for this study, of the kind asked, inside its
    /// validity window. Every node checks it again before acting on it.
    fn verify_order(
        &self,
        caller: &Identity,
        order: Option<&pb::SignedOrder>,
        kind: pb::OrderKind,
    ) -> Result<cxrfed_server::order::Verified, Status> {
        let expect = cxrfed_server::order::Expect {
            study: self.state.study(),
            site: None,
            kind,
            now_unix: chrono::Utc::now().timestamp(),
        };
        let verified = cxrfed_server::order::verify(order, &expect).map_err(|e| match e {
            cxrfed_server::order::OrderError::Unsigned
            | cxrfed_server::order::OrderError::Unreadable(_)
            | cxrfed_server::order::OrderError::Spec(_)
            | cxrfed_server::order::OrderError::NoModel
            | cxrfed_server::order::OrderError::NoNonce => Status::invalid_argument(e.to_string()),
            _ => Status::permission_denied(e.to_string()),
        })?;
        if verified.fingerprint != caller.fingerprint {
            return Err(Status::permission_denied(
                "the order is signed with another certificate than the caller's",
            ));
        }
        Ok(verified)
    }
}

fn identity_of<T>(request: &Request<T>) -> Result<Identity, Status> {
    request
        .extensions()
        .get::<Identity>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no verified identity"))
}

/// Reads an `ImportModel` stream: the version and card, then the weights (at most
/// `MAX_MODEL_BYTES`).
async fn read_import(
    stream: &mut Streaming<pb::ImportModelChunk>,
) -> Result<(String, String, Vec<u8>), Status> {
    let first = stream
        .message()
        .await?
        .ok_or_else(|| Status::invalid_argument("an empty import"))?;
    let mut weights = first.data;
    while let Some(chunk) = stream.message().await? {
        if weights.len() + chunk.data.len() > MAX_MODEL_BYTES {
            return Err(Status::invalid_argument("the model is larger than 2 GiB"));
        }
        weights.extend_from_slice(&chunk.data);
    }
    Ok((first.version, first.card_json, weights))
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
                heartbeat_secs: self.state.config().heartbeat_secs,
            })),
        }))
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        let id = self.state.links().attach(&site, tx);
        let session = Session {
            store: self.state.store().clone(),
            links: self.state.links().clone(),
            trainer: self.state.trainer().clone(),
        };
        tokio::spawn(session.run(site, identity.uri(), id, inbound));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn query(
        &self,
        request: Request<pb::FederatedQueryRequest>,
    ) -> Result<Response<pb::FederatedQueryResponse>, Status> {
        let caller = identity_of(&request)?;
        let started = std::time::Instant::now();
        let answer = self
            .federation()
            .query(&caller, request.into_inner())
            .await
            .map_err(Status::from);
        let outcome = match &answer {
            Ok(_) => "ok".to_string(),
            Err(status) => format!("{:?}", status.code()).to_lowercase(),
        };
        let metrics = self.state.metrics();
        metrics.observe_rpc("Query", &outcome, started.elapsed().as_secs_f64());
        if let Ok(a) = &answer {
            // What the researcher's query charged across the sites that answered.
            let epsilon: f64 = a.sites.iter().map(|s| s.epsilon).sum();
            metrics.dp_release(caller.role.as_str(), epsilon);
        }
        Ok(Response::new(answer?))
    }

    async fn sites(
        &self,
        request: Request<pb::SitesRequest>,
    ) -> Result<Response<pb::SitesResponse>, Status> {
        // Record counts (as each site publishes them) are for the study admin only.
        let counts = identity_of(&request)?.role == Role::StudyAdmin;
        let connected = self.state.links().connected();
        let sites = self
            .state
            .store()
            .sites()
            .map_err(CoordinatorError::from)?
            .into_iter()
            .map(|s| pb::SiteInfo {
                connected: connected.contains_key(&s.site),
                site: s.site,
                identity: s.identity,
                last_seen: s.last_seen,
                version: s.version,
                model_id: s.model_id,
                record_count: if counts { s.record_count } else { 0 },
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
        let store = self.state.store();
        let entries = store.audit_entries(since).map_err(CoordinatorError::from)?;
        let head = store.verify_audit().map_err(CoordinatorError::from)?.head;
        Ok(Response::new(pb::AuditLogResponse {
            entries: entries
                .into_iter()
                .map(cxrfed_server::audit::entry)
                .collect(),
            head,
        }))
    }

    async fn verify_coordinator_audit(
        &self,
        _request: Request<pb::VerifyAuditRequest>,
    ) -> Result<Response<pb::VerifyAuditResponse>, Status> {
        let report = self
            .state
            .store()
            .verify_audit()
            .map_err(CoordinatorError::from)?;
        Ok(Response::new(cxrfed_server::audit::verification(report)))
    }

    async fn start_job(
        &self,
        request: Request<pb::StartJobRequest>,
    ) -> Result<Response<pb::JobInfo>, Status> {
        let caller = identity_of(&request)?;
        let request = request.into_inner();
        if request.order.is_none() && !request.spec_toml.is_empty() {
            return Err(Status::failed_precondition(
                "a job must be a study admin's signed order (cxrfed job start signs it); an unsigned job file is refused",
            ));
        }
        let verified = self.verify_order(&caller, request.order.as_ref(), pb::OrderKind::Job)?;
        let order = request.order.unwrap_or_default();
        let job = self
            .state
            .trainer()
            .start(verified, &order, caller.uri())
            .await?;
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
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let caller = identity_of(&request)?;
        let jobs = self.state.trainer().registry().jobs()?;
        Ok(Response::new(pb::ListJobsResponse {
            jobs: jobs.iter().map(|j| job_view(&caller, j)).collect(),
        }))
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::JobInfo>, Status> {
        let caller = identity_of(&request)?;
        let job = self
            .state
            .trainer()
            .registry()
            .require_job(&request.into_inner().job_id)?;
        Ok(Response::new(job_view(&caller, &job)))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::JobInfo>, Status> {
        let job = self
            .state
            .trainer()
            .cancel(&request.into_inner().job_id)
            .await?;
        Ok(Response::new(pb::JobInfo::from(&job)))
    }

    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let caller = identity_of(&request)?;
        let models = self.state.trainer().registry().models()?;
        Ok(Response::new(pb::ListModelsResponse {
            models: models.iter().map(|m| self.model_view(&caller, m)).collect(),
        }))
    }

    async fn get_model(
        &self,
        request: Request<pb::GetModelRequest>,
    ) -> Result<Response<pb::ModelVersion>, Status> {
        let caller = identity_of(&request)?;
        let model = self
            .state
            .trainer()
            .registry()
            .require_model(&request.into_inner().version)?;
        Ok(Response::new(self.model_view(&caller, &model)))
    }

    async fn promote_model(
        &self,
        request: Request<pb::PromoteModelRequest>,
    ) -> Result<Response<pb::PromoteModelResponse>, Status> {
        let caller = identity_of(&request)?;
        let request = request.into_inner();
        let verified =
            self.verify_order(&caller, request.order.as_ref(), pb::OrderKind::Promote)?;
        if verified.order.model_version != request.version {
            return Err(Status::invalid_argument(format!(
                "the signed order promotes {:?}, the request names {:?}",
                verified.order.model_version, request.version
            )));
        }
        let order = request.order.unwrap_or_default();
        let (doc, sent_to) = self
            .state
            .trainer()
            .promote(&verified.order, &order)
            .await?;
        self.audit_action(&caller, "PromoteModel", request.version, doc.sha256.clone())
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
        let (version, card, weights) = read_import(&mut request.into_inner()).await?;
        let doc = self
            .state
            .trainer()
            .registry()
            .import(&version, &card, &weights)
            .await?;
        self.audit_action(&caller, "ImportModel", version.clone(), doc.sha256.clone())
            .await;
        tracing::info!(version = version.as_str(), by = %caller, bytes = weights.len(), "model imported");
        Ok(Response::new(self.model_info(&doc)))
    }
}
