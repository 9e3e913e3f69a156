//! Starts the node's gRPC server on a listener and runs it until the shutdown token fires.

use std::sync::Arc;
use std::time::Duration;

use cxrfed_auth::{Identity, Policy, ReloadingTls, Role, Rule, ServerTransport};
use cxrfed_proto::v1::node_service_server::NodeServiceServer;
use cxrfed_server::{GrpcServer, ServerKind};
use cxrfed_store::RecordStore;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic::service::Routes;

use crate::config::NodeConfig;
use crate::grpc::{MAX_MESSAGE_BYTES, NodeApi};
use crate::pipeline::Pipeline;
use crate::secret;
use crate::state::Node;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Secret(#[from] secret::SecretError),
    #[error(transparent)]
    Store(#[from] cxrfed_store::StoreError),
    #[error(transparent)]
    Server(#[from] cxrfed_server::BootstrapError),
    #[error("server task failed: {0}")]
    Join(String),
    #[error(transparent)]
    Model(#[from] cxrfed_model::ModelError),
    #[error("TLS: {0}")]
    Tls(#[from] cxrfed_auth::AuthError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    Lexicon(String),
    #[error(transparent)]
    Node(#[from] crate::error::NodeError),
    #[error("DICOM receiver on {address}: {source}")]
    DicomListen {
        address: String,
        source: std::io::Error,
    },
    #[error("/metrics on {address}: {source}")]
    MetricsListen {
        address: String,
        source: std::io::Error,
    },
}

/// The DICOM receiver's settings from the (validated) configuration.
fn receiver_settings(
    config: &NodeConfig,
    tls: Option<&Arc<ReloadingTls>>,
) -> Result<crate::receiver::ReceiverSettings, ServeError> {
    let allow = config
        .dicom_allow
        .iter()
        .map(|entry| entry.parse())
        .collect::<Result<Vec<_>, String>>()
        .map_err(|e| ServeError::Config(crate::config::ConfigError::Invalid(e)))?;
    // The node's own reloading TLS material: the DICOM port serves its current certificate.
    let tls = if config.dicom_tls { tls.cloned() } else { None };
    Ok(crate::receiver::ReceiverSettings {
        ae_title: config.dicom_ae.clone(),
        allow,
        max_associations: config.dicom_max_associations,
        queue: config.dicom_queue,
        buffer_bytes: config.dicom_buffer_bytes,
        max_instance_bytes: config.max_file_bytes,
        tls,
    })
}

/// The node's transport: mutual TLS with its node certificate, or `--insecure-dev`. With TLS the
/// site is the one in the node's certificate; a configured site that differs is refused.
fn transport(config: &mut NodeConfig) -> Result<ServerTransport, ServeError> {
    if config.insecure_dev {
        tracing::warn!(
            listen = %config.listen,
            "!!! --insecure-dev: plaintext gRPC WITHOUT client authentication; every local \
             caller is treated as the admin of site {}. For development only, never with real \
             patient data. !!!",
            config.site
        );
        return Ok(ServerTransport::InsecureDev(Identity::insecure_dev(
            &config.site,
        )));
    }
    let paths = config.tls_paths()?;
    let tls = ReloadingTls::load(paths, &[Role::Node])?;
    let own = tls.current().own.clone();
    let cert_site = own.site.clone().unwrap_or_default();
    if config.site != cert_site {
        if config.site != NodeConfig::default().site {
            return Err(ServeError::Config(crate::config::ConfigError::Invalid(
                format!(
                    "the node certificate is for site {cert_site:?} but the configuration says site {:?}",
                    config.site
                ),
            )));
        }
        config.site = cert_site;
    }
    tracing::info!(
        identity = %own,
        cert_fingerprint = own.fingerprint.as_str(),
        not_after = %own.not_after.to_rfc3339(),
        crl = ?tls.paths().crl,
        revoked = tls.current().revoked_count(),
        "mutual TLS 1.3: client certificates must chain to the study CA"
    );
    Ok(ServerTransport::Tls(tls))
}

/// Who may call what on a node: every RPC of `cxrfed.v1.NodeService` names its rule here, and
/// the authorization layer refuses methods without one.
pub const NODE_RULES: &[(&str, Rule)] = &[
    // Records and images are the hospital's: its own admins only.
    ("Extract", Rule::SiteAdmin),
    ("GetRecord", Rule::SiteAdmin),
    ("GetRecordInput", Rule::SiteAdmin),
    ("ListRecords", Rule::SiteAdmin),
    ("Status", Rule::SiteAdmin),
    // Exact aggregates and row-level exports: the site admin only. Remote researchers get
    // differentially private statistics (DpStats).
    ("Stats", Rule::SiteAdmin),
    ("Export", Rule::SiteAdmin),
    ("Ask", Rule::SiteAdmin),
    // The schema is public: any identity of the study.
    ("GetSchema", Rule::AnyIdentity),
    ("DefineField", Rule::SiteAdmin),
    ("ListFields", Rule::SiteAdmin),
    ("Annotate", Rule::SiteAdmin),
    ("StartIngest", Rule::SiteAdmin),
    ("StartPull", Rule::SiteAdmin),
    ("IngestJobs", Rule::SiteAdmin),
    // Differentially private statistics, charged to the caller's own budget: researchers and
    // the coordinator (on a study's behalf); the site admin too.
    (
        "DpStats",
        Rule::Roles(&[Role::Researcher, Role::Coordinator]),
    ),
    (
        "Budget",
        Rule::Roles(&[Role::Researcher, Role::Coordinator]),
    ),
    // The ledger and the audit chain: the site admin only.
    ("SetBudget", Rule::SiteAdmin),
    ("ListBudgets", Rule::SiteAdmin),
    ("AuditLog", Rule::SiteAdmin),
    ("VerifyAudit", Rule::SiteAdmin),
    ("GetTrainingPolicy", Rule::SiteAdmin),
    ("SetTrainingPolicy", Rule::SiteAdmin),
    ("RollbackModel", Rule::SiteAdmin),
];

pub fn node_policy(site: &str) -> Policy {
    Policy::new(Some(site))
        .service("cxrfed.v1.NodeService", NODE_RULES)
        .with_health_and_reflection()
}

/// Opens the node's data directory and store, then serves `cxrfed.v1.NodeService`, gRPC
/// health and server reflection on `listener` until `shutdown` is cancelled.
///
/// On shutdown, health turns NOT_SERVING, new connections are refused, in-flight requests
/// get `grace_period_secs` to finish, and the store is flushed before this returns.
pub async fn serve(
    mut config: NodeConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| ServeError::DataDir {
        path: config.data_dir.display().to_string(),
        source,
    })?;
    let transport = transport(&mut config)?;
    let study = match &transport {
        ServerTransport::Tls(tls) => tls.current().own.study.clone(),
        ServerTransport::InsecureDev(identity) => identity.study.clone(),
    };
    let secret = secret::load_or_create(&config.secret_path())?;
    let dp = crate::privacy::DpSettings::from_config(&config, secret.derive("dp-row-selection"));
    let store_dir = config.store_dir();
    let store = tokio::task::spawn_blocking(move || RecordStore::open(&store_dir))
        .await
        .map_err(|e| ServeError::Join(e.to_string()))??;
    let model_config = config.clone();
    let model = tokio::task::spawn_blocking(move || crate::models::load(&model_config))
        .await
        .map_err(|e| ServeError::Join(e.to_string()))??;
    let pipeline = Pipeline::new(&config, secret, model);
    let grace = Duration::from_secs(config.grace_period_secs);
    let lexicon = match config.lexicon.trim() {
        "bundled" => cxrfed_schema::lexicon::Lexicon::bundled()
            .map_err(|e| ServeError::Lexicon(e.to_string()))?,
        path => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| ServeError::Lexicon(format!("lexicon {path}: {e}")))?;
            cxrfed_schema::lexicon::Lexicon::parse(&text)
                .map_err(|e| ServeError::Lexicon(format!("{path}: {e}")))?
        }
    };
    let node_tls = match &transport {
        ServerTransport::Tls(tls) => Some(tls.clone()),
        ServerTransport::InsecureDev(_) => None,
    };
    let builder = Node::builder(config, store.clone(), pipeline, dp)
        .study(study)
        .tls(node_tls)
        .lexicon(lexicon)
        .shutdown(shutdown.clone());
    let state = Arc::new(
        tokio::task::spawn_blocking(move || builder.build())
            .await
            .map_err(|e| ServeError::Join(e.to_string()))??,
    );

    // The site admin's training policy from the config file, applied (and audited) at start.
    crate::orders::apply_config_policy(&state).await?;

    // Replay hygiene: nonces older than anything signed can be valid are forgotten, at start
    // and hourly (a replay of them is refused as expired).
    {
        let (store, shutdown) = (store.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(3600));
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = every.tick() => {}
                }
                let before = chrono::Utc::now()
                    - chrono::Duration::seconds(cxrfed_server::intent::NONCE_RETENTION_SECS);
                let store = store.clone();
                match tokio::task::spawn_blocking(move || store.prune_nonces(before)).await {
                    Ok(Ok(0)) => {}
                    Ok(Ok(pruned)) => tracing::info!(pruned, "expired signed nonces pruned"),
                    Ok(Err(e)) => tracing::warn!(error = %e, "pruning signed nonces failed"),
                    Err(e) => tracing::warn!(error = %e, "pruning signed nonces failed"),
                }
            }
        });
    }

    if let Some(address) = state.config().metrics_listen {
        let node = state.clone();
        let render: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(move || {
            node.metrics()
                .render(&|r| crate::metrics::snapshot(&node, r))
        });
        cxrfed_server::metrics::spawn(address, render, shutdown.clone())
            .await
            .map_err(|source| ServeError::MetricsListen {
                address: address.to_string(),
                source,
            })?;
    }

    if let Some(address) = state.config().dicom_listen {
        let settings = receiver_settings(state.config(), state.tls())?;
        let dicom = TcpListener::bind(address)
            .await
            .map_err(|source| ServeError::DicomListen {
                address: address.to_string(),
                source,
            })?;
        if !address.ip().is_loopback() && settings.tls.is_none() {
            tracing::warn!(
                listen = %address,
                "the DICOM receiver is plaintext on a non-loopback address: keep it on the \
                 hospital's imaging network, or set dicom_tls"
            );
        }
        crate::receiver::spawn(state.clone(), dicom, settings, shutdown.clone());
    }

    let local = listener.local_addr().ok();
    tracing::info!(
        listen = ?local,
        site = %state.config().site,
        tls = !state.config().insecure_dev,
        records = state.store().count(),
        "node serving (research use only, not a diagnostic device)"
    );
    if let Some(url) = state.config().coordinator.clone() {
        let paths = state.config().tls_paths()?;
        let credentials = cxrfed_auth::ClientCredentials {
            ca: paths.ca,
            cert: Some(paths.cert),
            key: Some(paths.key),
        };
        // The coordinator must present a coordinator certificate of the study, not revoked,
        // and the one pinned in the config when one is.
        let check = cxrfed_auth::ServerCheck {
            role: Some(cxrfed_auth::Role::Coordinator),
            pin: state.config().coordinator_identity.clone(),
            crl: paths.crl,
        };
        crate::federation::spawn(state.clone(), url, credentials, check, shutdown.clone());
    }
    let node = NodeServiceServer::new(NodeApi::new(state.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let result = GrpcServer::new(
        ServerKind::Node,
        node_policy(&state.config().site),
        transport,
    )
    .tls_reload(Duration::from_millis(state.config().tls_reload_ms))
    .grace(grace)
    .serve(
        listener,
        Routes::new(node),
        &[<NodeServiceServer<NodeApi> as NamedService>::NAME],
        shutdown,
    )
    .await;
    // Whatever happened to the server, acknowledged records are already durable; flush the
    // rest before returning.
    store.flush().await?;
    tracing::info!(records = store.count(), "store flushed; node stopped");
    result?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn every_node_rpc_declares_who_may_call_it() {
        let set = prost_types::FileDescriptorSet::decode(cxrfed_proto::FILE_DESCRIPTOR_SET)
            .expect("descriptor set");
        let policy = node_policy("site-a");
        let mut methods = 0;
        for file in &set.file {
            // The coordinator's service has its own policy (cxrfed-coordinator).
            for service in file.service.iter().filter(|s| s.name() == "NodeService") {
                let full = format!("{}.{}", file.package(), service.name());
                for method in &service.method {
                    let path = format!("/{full}/{}", method.name());
                    assert!(policy.rule(&path).is_some(), "{path} has no rule");
                    methods += 1;
                }
            }
        }
        assert!(methods >= NODE_RULES.len());
    }
}
