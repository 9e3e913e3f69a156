//! The one gRPC bootstrap of both servers: gRPC health (NOT_SERVING once shutdown begins),
//! server reflection v1 and v1alpha (grpcurl and older clients), the TLS watcher that swaps in
//! renewed certificates and CRLs, the authorization layer, a request id and a span per RPC,
//! and a graceful drain bounded by a grace period.

use std::sync::Arc;
use std::time::Duration;

use cxrfed_auth::{AuthLayer, Policy, ReloadingTls, ServerTransport};
use http::HeaderName;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic_health::ServingStatus;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnFailure, DefaultOnResponse, TraceLayer};
use tracing::Level;

use crate::layout::ServerKind;

/// The header that carries a request's id: set from the client's when it sent one, a fresh
/// UUID otherwise, and returned in the response.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("server reflection: {0}")]
    Reflection(String),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("server task failed: {0}")]
    Join(String),
}

/// One server's transport, policy and timings; `serve` runs it.
#[derive(Debug)]
pub struct GrpcServer {
    kind: ServerKind,
    policy: Policy,
    transport: ServerTransport,
    tls_reload: Duration,
    grace: Duration,
    keepalive: Option<Duration>,
    rpc_log_level: Level,
}

impl GrpcServer {
    pub fn new(kind: ServerKind, policy: Policy, transport: ServerTransport) -> GrpcServer {
        GrpcServer {
            kind,
            policy,
            transport,
            tls_reload: Duration::from_secs(2),
            grace: Duration::from_secs(20),
            keepalive: None,
            rpc_log_level: Level::DEBUG,
        }
    }

    /// How often certificate, key, CA and CRL files are checked for changes.
    pub fn tls_reload(mut self, every: Duration) -> GrpcServer {
        self.tls_reload = every;
        self
    }

    /// How long in-flight requests may run after shutdown begins.
    pub fn grace(mut self, grace: Duration) -> GrpcServer {
        self.grace = grace;
        self
    }

    /// HTTP/2 pings on quiet connections (long-lived streams such as the coordinator's links).
    pub fn http2_keepalive(mut self, every: Duration) -> GrpcServer {
        self.keepalive = Some(every);
        self
    }

    /// The level of the one line logged per finished RPC (method, status, latency, request
    /// id). The node's handlers log their own richer line, so it keeps the default DEBUG.
    pub fn rpc_log_level(mut self, level: Level) -> GrpcServer {
        self.rpc_log_level = level;
        self
    }

    /// The reloading TLS material, when the transport is mutual TLS.
    pub fn tls(&self) -> Option<Arc<ReloadingTls>> {
        match &self.transport {
            ServerTransport::Tls(tls) => Some(tls.clone()),
            ServerTransport::InsecureDev(_) => None,
        }
    }

    /// Serves `routes` (the server's own services, whose full gRPC names are `services`) with
    /// health and reflection on `listener` until `shutdown` fires; then health turns
    /// NOT_SERVING, new connections are refused and in-flight requests get the grace period.
    pub async fn serve(
        self,
        listener: TcpListener,
        routes: Routes,
        services: &[&str],
        shutdown: CancellationToken,
    ) -> Result<(), BootstrapError> {
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        for name in services {
            health_reporter
                .set_service_status(name, ServingStatus::Serving)
                .await;
        }
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(cxrfed_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| BootstrapError::Reflection(e.to_string()))?;
        let reflection_alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(cxrfed_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .map_err(|e| BootstrapError::Reflection(e.to_string()))?;
        let tls = self.tls();
        if let Some(tls) = &tls {
            tls.spawn_watcher(self.tls_reload, shutdown.clone());
        }
        let request_id = HeaderName::from_static(REQUEST_ID_HEADER);
        let trace = TraceLayer::new_for_grpc()
            .make_span_with(|request: &http::Request<_>| {
                let id = request
                    .headers()
                    .get(REQUEST_ID_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-");
                tracing::info_span!("rpc", method = request.uri().path(), request_id = id)
            })
            .on_request(())
            .on_response(DefaultOnResponse::new().level(self.rpc_log_level))
            .on_failure(DefaultOnFailure::new().level(self.rpc_log_level));
        let layers = tower::ServiceBuilder::new()
            .layer(SetRequestIdLayer::new(request_id.clone(), MakeRequestUuid))
            .layer(PropagateRequestIdLayer::new(request_id))
            .layer(trace)
            .layer(AuthLayer::new(self.policy, tls))
            .into_inner();
        let routes = routes
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_alpha);
        let server = tonic::transport::Server::builder()
            .http2_keepalive_interval(self.keepalive)
            .max_frame_size(MAX_FRAME_BYTES)
            .initial_stream_window_size(STREAM_WINDOW_BYTES)
            .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
            .layer(layers)
            .add_routes(routes)
            .serve_with_incoming_shutdown(
                cxrfed_auth::incoming(listener, self.transport, shutdown.clone()),
                shutdown.clone().cancelled_owned(),
            );
        let mut server = tokio::spawn(server);
        let kind = self.kind.name();
        let grace = self.grace;
        let result = tokio::select! {
            finished = &mut server => finished,
            () = shutdown.cancelled() => {
                for name in services {
                    health_reporter.set_service_status(name, ServingStatus::NotServing).await;
                }
                tracing::info!(server = kind, grace_secs = grace.as_secs(), "shutting down: draining in-flight requests");
                match tokio::time::timeout(grace, &mut server).await {
                    Ok(finished) => finished,
                    Err(_) => {
                        tracing::warn!(server = kind, "grace period elapsed; aborting the remaining requests");
                        server.abort();
                        Ok(Ok(()))
                    }
                }
            }
        };
        result.map_err(|e| BootstrapError::Join(e.to_string()))??;
        Ok(())
    }
}

/// HTTP/2 frames a client may send (hyper's default is 16 KiB): an upload's 1 MiB chunk
/// travels as one frame instead of 64, which cut the node's per-image transport work (about
/// +10% end to end on 12 MB files, docs/bench/model.md).
const MAX_FRAME_BYTES: u32 = 1 << 20;
/// Flow-control windows (hyper's default is 1 MiB each): a stream may have 4 MiB in flight and
/// a connection 8 MiB, so an upload does not stall on window updates; this also bounds what a
/// peer can make the server buffer per connection.
const STREAM_WINDOW_BYTES: u32 = 4 << 20;
const CONNECTION_WINDOW_BYTES: u32 = 8 << 20;
