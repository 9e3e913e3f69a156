//! Starts the coordinator's gRPC server on a listener and runs it until the shutdown token
//! fires.

use std::sync::Arc;
use std::time::Duration;

use cxrfed_auth::{AuthLayer, Policy, ReloadingTls, Role, Rule, ServerTransport};
use cxrfed_proto::v1::coordinator_service_server::CoordinatorServiceServer;
use cxrfed_store::CoordinatorStore;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::CoordinatorConfig;
use crate::service::{CoordinatorApi, CoordinatorState};

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
    #[error("TLS: {0}")]
    Tls(#[from] cxrfed_auth::AuthError),
    #[error("server reflection: {0}")]
    Reflection(String),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("server task failed: {0}")]
    Join(String),
}

/// Who may call what on the coordinator. Nodes hold links; researchers ask; everyone of the
/// study may see the registry; the audit chain is for admins.
pub const COORDINATOR_RULES: &[(&str, Rule)] = &[
    ("Link", Rule::Roles(&[Role::Node])),
    ("Query", Rule::Roles(&[Role::Researcher])),
    (
        "Sites",
        Rule::Roles(&[Role::Researcher, Role::Admin, Role::Node]),
    ),
    ("CoordinatorAudit", Rule::Roles(&[Role::Admin])),
    ("VerifyCoordinatorAudit", Rule::Roles(&[Role::Admin])),
    // Training jobs are the study admin's; the registry is visible to the study.
    ("StartJob", Rule::Roles(&[Role::Admin])),
    ("CancelJob", Rule::Roles(&[Role::Admin])),
    ("ListJobs", Rule::Roles(&[Role::Admin, Role::Researcher])),
    ("GetJob", Rule::Roles(&[Role::Admin, Role::Researcher])),
    (
        "ListModels",
        Rule::Roles(&[Role::Admin, Role::Researcher, Role::Node]),
    ),
    (
        "GetModel",
        Rule::Roles(&[Role::Admin, Role::Researcher, Role::Node]),
    ),
    ("PromoteModel", Rule::Roles(&[Role::Admin])),
    ("ImportModel", Rule::Roles(&[Role::Admin])),
];

pub fn coordinator_policy() -> Policy {
    Policy::new(None)
        .service("cxrfed.v1.CoordinatorService", COORDINATOR_RULES)
        .with_health_and_reflection()
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
    let state = Arc::new(CoordinatorState::new(
        config.clone(),
        store.clone(),
        study.clone(),
    ));
    crate::training::ensure_bundled(&state)
        .await
        .map_err(ServeError::Join)?;
    crate::training::resume_all(&state);
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<CoordinatorServiceServer<CoordinatorApi>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(cxrfed_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    tls.spawn_watcher(
        Duration::from_millis(config.tls_reload_ms),
        shutdown.clone(),
    );
    tracing::info!(
        listen = ?listener.local_addr().ok(),
        study = study.as_str(),
        identity = %tls.current().own,
        "coordinator serving (mutual TLS 1.3)"
    );
    let auth = AuthLayer::new(coordinator_policy(), Some(tls.clone()));
    let server = tonic::transport::Server::builder()
        // A link is quiet between heartbeats: keep it alive at the HTTP/2 level too.
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .layer(auth)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(CoordinatorServiceServer::new(CoordinatorApi::new(state)))
        .serve_with_incoming_shutdown(
            cxrfed_auth::incoming(listener, ServerTransport::Tls(tls), shutdown.clone()),
            shutdown.clone().cancelled_owned(),
        );
    let mut server = tokio::spawn(server);
    let grace = Duration::from_secs(config.grace_period_secs);
    let result = tokio::select! {
        finished = &mut server => finished,
        () = shutdown.cancelled() => {
            health_reporter.set_not_serving::<CoordinatorServiceServer<CoordinatorApi>>().await;
            match tokio::time::timeout(grace, &mut server).await {
                Ok(finished) => finished,
                Err(_) => {
                    server.abort();
                    Ok(Ok(()))
                }
            }
        }
    };
    store.flush().await?;
    tracing::info!("coordinator stopped");
    result.map_err(|e| ServeError::Join(e.to_string()))??;
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
