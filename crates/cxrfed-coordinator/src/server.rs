//! Starts the coordinator's gRPC server on a listener and runs it until the shutdown token
//! fires.

use std::sync::Arc;
use std::time::Duration;

use cxrfed_auth::{Policy, ReloadingTls, Role, Rule, ServerTransport};
use cxrfed_proto::v1::coordinator_service_server::CoordinatorServiceServer;
use cxrfed_server::{GrpcServer, ServerKind};
use cxrfed_store::CoordinatorStore;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic::service::Routes;

use crate::config::CoordinatorConfig;
use crate::grpc::CoordinatorApi;
use crate::state::Coordinator;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] cxrfed_store::StoreError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Coordinator(#[from] crate::error::CoordinatorError),
    #[error("TLS: {0}")]
    Tls(#[from] cxrfed_auth::AuthError),
    #[error(transparent)]
    Server(#[from] cxrfed_server::BootstrapError),
    #[error("server task failed: {0}")]
    Join(String),
    #[error("/metrics on {address}: {source}")]
    MetricsListen {
        address: String,
        source: std::io::Error,
    },
}

/// Who may call what on the coordinator. Nodes hold links; researchers ask; everyone of the
/// study may see the registry; the audit chain is for the study admin and the sites' admins.
/// Training jobs, imports and promotions are the study admin's alone: a site's `admin` rules
/// its own node, never the federation.
pub const COORDINATOR_RULES: &[(&str, Rule)] = &[
    ("Link", Rule::Roles(&[Role::Node])),
    ("Query", Rule::Roles(&[Role::Researcher])),
    (
        "Sites",
        Rule::Roles(&[Role::Researcher, Role::Admin, Role::StudyAdmin, Role::Node]),
    ),
    (
        "CoordinatorAudit",
        Rule::Roles(&[Role::StudyAdmin, Role::Admin]),
    ),
    (
        "VerifyCoordinatorAudit",
        Rule::Roles(&[Role::StudyAdmin, Role::Admin]),
    ),
    ("StartJob", Rule::Roles(&[Role::StudyAdmin])),
    ("CancelJob", Rule::Roles(&[Role::StudyAdmin])),
    // Everyone else sees a job redacted: pooled noisy metrics, no per-site rows.
    (
        "ListJobs",
        Rule::Roles(&[Role::StudyAdmin, Role::Admin, Role::Researcher]),
    ),
    (
        "GetJob",
        Rule::Roles(&[Role::StudyAdmin, Role::Admin, Role::Researcher]),
    ),
    (
        "ListModels",
        Rule::Roles(&[Role::StudyAdmin, Role::Admin, Role::Researcher, Role::Node]),
    ),
    (
        "GetModel",
        Rule::Roles(&[Role::StudyAdmin, Role::Admin, Role::Researcher, Role::Node]),
    ),
    ("PromoteModel", Rule::Roles(&[Role::StudyAdmin])),
    ("ImportModel", Rule::Roles(&[Role::StudyAdmin])),
];

pub fn coordinator_policy() -> Policy {
    Policy::new(None)
        .service("cxrfed.v1.CoordinatorService", COORDINATOR_RULES)
        .with_health_and_reflection()
}

/// The coordinator's `/metrics` values read at scrape time: links and jobs (no identities; a
/// site's name is the study's public roster).
fn snapshot(state: &Coordinator, r: &mut prometheus_client::registry::Registry) {
    use cxrfed_server::metrics::gauge;
    let connected = state.links().connected();
    gauge(
        r,
        "sites_connected",
        "Sites with a live link",
        connected.len() as f64,
    );
    let known = state.store().sites().map(|s| s.len()).unwrap_or(0);
    gauge(
        r,
        "sites_known",
        "Sites that have ever linked",
        known as f64,
    );
    let jobs = state.trainer().registry().jobs().unwrap_or_default();
    let running = jobs
        .iter()
        .filter(|j| j.state == cxrfed_fl::JobState::Running)
        .count();
    gauge(r, "jobs_running", "Federated jobs running", running as f64);
    gauge(r, "jobs", "Federated jobs, any state", jobs.len() as f64);
}

pub async fn serve(
    config: CoordinatorConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| ServeError::DataDir {
        path: config.data_dir.display().to_string(),
        source,
    })?;
    let tls = ReloadingTls::load(config.tls_paths()?, &[Role::Coordinator])?;
    let study = tls.current().own.study.clone();
    let store_dir = config.store_dir();
    let store = tokio::task::spawn_blocking(move || CoordinatorStore::open(&store_dir))
        .await
        .map_err(|e| ServeError::Join(e.to_string()))??;
    let state = Arc::new(Coordinator::new(
        config.clone(),
        store.clone(),
        study.clone(),
    ));
    state.trainer().registry().ensure_bundled().await?;
    state.trainer().resume_all();
    if let Some(address) = config.metrics_listen {
        let coordinator = state.clone();
        let render: Arc<dyn Fn() -> String + Send + Sync> =
            Arc::new(move || coordinator.metrics().render(&|r| snapshot(&coordinator, r)));
        cxrfed_server::metrics::spawn(address, render, shutdown.clone())
            .await
            .map_err(|source| ServeError::MetricsListen {
                address: address.to_string(),
                source,
            })?;
    }
    tracing::info!(
        listen = ?listener.local_addr().ok(),
        study = study.as_str(),
        identity = %tls.current().own,
        "coordinator serving (mutual TLS 1.3)"
    );
    let service = CoordinatorServiceServer::new(CoordinatorApi::new(state));
    let result = GrpcServer::new(
        ServerKind::Coordinator,
        coordinator_policy(),
        ServerTransport::Tls(tls),
    )
    .tls_reload(Duration::from_millis(config.tls_reload_ms))
    .grace(Duration::from_secs(config.grace_period_secs))
    // A link is quiet between heartbeats: keep it alive at the HTTP/2 level too.
    .http2_keepalive(Duration::from_secs(20))
    // The coordinator's handlers log no line of their own: one per RPC from the bootstrap.
    .rpc_log_level(tracing::Level::INFO)
    .serve(
        listener,
        Routes::new(service),
        &[<CoordinatorServiceServer<CoordinatorApi> as NamedService>::NAME],
        shutdown,
    )
    .await;
    store.flush().await?;
    tracing::info!("coordinator stopped");
    result?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn every_coordinator_rpc_declares_who_may_call_it() {
        let set = prost_types::FileDescriptorSet::decode(cxrfed_proto::FILE_DESCRIPTOR_SET)
            .expect("descriptor set");
        let policy = coordinator_policy();
        let mut methods = 0;
        for file in &set.file {
            for service in file
                .service
                .iter()
                .filter(|s| s.name() == "CoordinatorService")
            {
                for method in &service.method {
                    let path = format!("/{}.{}/{}", file.package(), service.name(), method.name());
                    assert!(policy.rule(&path).is_some(), "{path} has no rule");
                    methods += 1;
                }
            }
        }
        assert_eq!(methods, COORDINATOR_RULES.len());
    }
}
