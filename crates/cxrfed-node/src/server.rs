//! Starts the node's gRPC server on a listener and runs it until the shutdown token fires.

use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::time::{Duration, Instant};

use cxrfed_proto::v1::node_service_server::NodeServiceServer;
use cxrfed_store::RecordStore;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
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
}

/// Loads the configured model onto its device and starts the inference worker.
pub fn load_model(
    config: &NodeConfig,
) -> Result<Option<cxrfed_model::InferenceHandle>, ServeError> {
    let dir = match config.model.trim() {
        "none" => return Ok(None),
        "bundled" => cxrfed_model::bundled::install(&config.data_dir.join("models"))?,
        path => std::path::PathBuf::from(path),
    };
    let device = cxrfed_model::parse_device(&config.device)?;
    let model = cxrfed_model::Model::load(&dir, device)?;
    tracing::info!(
        model_id = model.card.model_id.as_str(),
        model_sha256 = model.card.weights_sha256.as_str(),
        architecture = model.card.architecture.as_str(),
        device = cxrfed_model::device_name(device).as_str(),
        input_size = model.card.input.size,
        "model loaded"
    );
    let handle = cxrfed_model::InferenceHandle::spawn(
        model,
        cxrfed_model::WorkerConfig {
            max_batch: config.max_batch,
            max_wait: Duration::from_millis(config.max_wait_ms),
            queue_capacity: config.inference_queue,
        },
    )?;
    Ok(Some(handle))
}

/// Opens the node's data directory and store, then serves `cxrfed.v1.NodeService`, gRPC
/// health and server reflection on `listener` until `shutdown` is cancelled.
///
/// On shutdown, health turns NOT_SERVING, new connections are refused, in-flight requests
/// get `grace_period_secs` to finish, and the store is flushed before this returns.
pub async fn serve(
    config: NodeConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| ServeError::DataDir {
        path: config.data_dir.display().to_string(),
        source,
    })?;
    let secret = secret::load_or_create(&config.secret_path())?;
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
    let state = Arc::new(NodeState {
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
        records = state.store.count(),
        "node serving (research use only, not a diagnostic device)"
    );

    let node = NodeServiceServer::new(NodeApi::new(state.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(node)
        .serve_with_incoming_shutdown(
            TcpListenerStream::new(listener),
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
