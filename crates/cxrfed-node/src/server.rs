//! Starts the node's gRPC server on a listener and runs it until the shutdown token fires.

use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::time::{Duration, Instant};

use cxrfed_auth::{AuthLayer, Identity, Policy, ReloadingTls, Role, Rule, ServerTransport};
use cxrfed_proto::v1::node_service_server::NodeServiceServer;
use cxrfed_store::RecordStore;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::NodeConfig;
use crate::pipeline::Pipeline;
use crate::secret;
use crate::service::{MAX_MESSAGE_BYTES, NodeApi, NodeState};

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
    #[error("server reflection: {0}")]
    Reflection(String),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
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
];

pub fn node_policy(site: &str) -> Policy {
    Policy::new(Some(site))
        .service("cxrfed.v1.NodeService", NODE_RULES)
        .with_health_and_reflection()
}

/// The inference worker settings of the node's configuration.
pub fn worker_config(config: &NodeConfig) -> cxrfed_model::WorkerConfig {
    cxrfed_model::WorkerConfig {
        max_batch: config.max_batch,
        max_wait: Duration::from_millis(config.max_wait_ms),
        queue_capacity: config.inference_queue,
    }
}

/// The directory of the model the study promoted to this node, if one was installed
/// (`models/ACTIVE` names it).
pub fn promoted_dir(config: &NodeConfig) -> Option<std::path::PathBuf> {
    let models = config.data_dir.join("models");
    let version = std::fs::read_to_string(models.join(crate::training::ACTIVE_FILE)).ok()?;
    let dir = models.join(version.trim());
    dir.join("card.json").exists().then_some(dir)
}

/// Loads the model onto its device and starts the inference worker: the model the study
/// promoted, once one was installed, else the configured one. `--model none` opts out of both.
pub fn load_model(
    config: &NodeConfig,
) -> Result<Option<cxrfed_model::InferenceHandle>, ServeError> {
    if config.model.trim() == "none" {
        return Ok(None);
    }
    let device = cxrfed_model::parse_device(&config.device)?;
    let promoted = promoted_dir(config).and_then(|dir| {
        cxrfed_model::Model::load(&dir, device)
            .map_err(|e| {
                tracing::error!(dir = %dir.display(), error = %e, "the promoted model does not load; using the configured one")
            })
            .ok()
    });
    let model = match promoted {
        Some(model) => model,
        None => {
            let dir = match config.model.trim() {
                "bundled" => cxrfed_model::bundled::install(&config.data_dir.join("models"))?,
                path => std::path::PathBuf::from(path),
            };
            cxrfed_model::Model::load(&dir, device)?
        }
    };
    tracing::info!(
        model_id = model.card.model_id.as_str(),
        model_sha256 = model.card.weights_sha256.as_str(),
        architecture = model.card.architecture.as_str(),
        device = cxrfed_model::device_name(device).as_str(),
        input_size = model.card.input.size,
        "model loaded"
    );
    let handle = cxrfed_model::InferenceHandle::spawn(model, worker_config(config))?;
    Ok(Some(handle))
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
    let model = tokio::task::spawn_blocking(move || load_model(&model_config))
        .await
        .map_err(|e| ServeError::Join(e.to_string()))??;
    let pipeline = Pipeline::new(&config, secret, model);
    let grace = Duration::from_secs(config.grace_period_secs);
    let index_store = store.clone();
    let (columns, custom_fields) = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let mut columns = cxrfed_stats::Columns::new();
        for record in index_store.iter() {
            columns.upsert(&record?);
        }
        let fields = index_store.custom_fields()?;
        for definition in &fields {
            columns.define_custom(definition);
        }
        for annotation in index_store.annotations() {
            let annotation = annotation?;
            let fits = match fields.iter().find(|f| f.name == annotation.field) {
                Some(definition) => definition.check_value(&annotation.value).is_ok(),
                None => cxrfed_schema::flat::field(&annotation.field).is_some(),
            };
            if fits {
                columns.annotate(
                    &annotation.image_sha256,
                    &annotation.field,
                    &annotation.value,
                );
            }
        }
        tracing::info!(
            records = columns.len(),
            elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
            "columnar statistics index built"
        );
        Ok::<_, cxrfed_store::StoreError>((columns, fields))
    })
    .await
    .map_err(|e| ServeError::Join(e.to_string()))??;
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
    let state = Arc::new(NodeState {
        tls: node_tls,
        jobs: Default::default(),
        custom_fields: std::sync::RwLock::new(
            custom_fields
                .into_iter()
                .map(|f| (f.name.clone(), f))
                .collect(),
        ),
        lexicon,
        columns: Arc::new(std::sync::RwLock::new(columns)),
        study,
        dp,
        config,
        store: store.clone(),
        pipeline,
        started_at: chrono::Utc::now(),
        started: Instant::now(),
        in_flight: AtomicU32::new(0),
        shutdown: shutdown.clone(),
    });

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<NodeServiceServer<NodeApi>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(cxrfed_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(cxrfed_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;

    let local = listener.local_addr().ok();
    tracing::info!(
        listen = ?local,
        site = %state.config.site,
        tls = !state.config.insecure_dev,
        records = state.store.count(),
        "node serving (research use only, not a diagnostic device)"
    );

    let tls = match &transport {
        ServerTransport::Tls(tls) => {
            tls.spawn_watcher(
                Duration::from_millis(state.config.tls_reload_ms),
                shutdown.clone(),
            );
            Some(tls.clone())
        }
        ServerTransport::InsecureDev(_) => None,
    };
    if let Some(url) = state.config.coordinator.clone() {
        let paths = state.config.tls_paths()?;
        let credentials = cxrfed_auth::ClientCredentials {
            ca: paths.ca,
            cert: Some(paths.cert),
            key: Some(paths.key),
        };
        crate::federation::spawn(state.clone(), url, credentials, shutdown.clone());
    }
    let auth = AuthLayer::new(node_policy(&state.config.site), tls);
    let node = NodeServiceServer::new(NodeApi::new(state.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let server = tonic::transport::Server::builder()
        .layer(auth)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(node)
        .serve_with_incoming_shutdown(
            cxrfed_auth::incoming(listener, transport, shutdown.clone()),
            shutdown.clone().cancelled_owned(),
        );
    let mut server = tokio::spawn(server);

    let result = tokio::select! {
        finished = &mut server => finished,
        () = shutdown.cancelled() => {
            health_reporter.set_not_serving::<NodeServiceServer<NodeApi>>().await;
            tracing::info!(grace_secs = grace.as_secs(), "shutting down: draining in-flight requests");
            match tokio::time::timeout(grace, &mut server).await {
                Ok(finished) => finished,
                Err(_) => {
                    tracing::warn!("grace period elapsed; aborting the remaining requests");
                    server.abort();
                    Ok(Ok(()))
                }
            }
        }
    };
    // Whatever happened to the server, acknowledged records are already durable; flush the
    // rest before returning.
    store.flush().await?;
    tracing::info!(records = store.count(), "store flushed; node stopped");
    result.map_err(|e| ServeError::Join(e.to_string()))??;
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
