//! `/metrics` for a server's operators: Prometheus text (OpenMetrics) on its own plain-HTTP
//! listener, loopback unless the configuration says otherwise. Shared by node and coordinator.
//!
//! What goes here is operational only: latencies, queue depths, batch sizes, refusals by
//! reason, DP releases and epsilon by identity *class* (role), link and round state. Never an
//! identity, a record id, a cohort count or anything derived from records or labels.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodOutcome {
    pub method: String,
    /// "ok" or the error's kind (invalid_request, permission_denied, budget_exhausted, ...).
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Stage {
    pub stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityClass {
    /// The caller's role (researcher, coordinator, admin), never who.
    pub class: String,
}

fn latency() -> Histogram {
    // 0.5 ms .. ~33 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 17))
}

/// The event metrics a server records as things happen. Values mirrored from state (queue
/// depths, link state) are added at scrape time by the server's `snapshot` callback.
pub struct Metrics {
    registry: Registry,
    pub rpc_seconds: Family<MethodOutcome, Histogram, fn() -> Histogram>,
    pub stage_seconds: Family<Stage, Histogram, fn() -> Histogram>,
    pub refusals: Family<Reason, Counter>,
    pub dp_releases: Family<IdentityClass, Counter>,
    pub dp_epsilon: Family<IdentityClass, Counter<f64, AtomicU64>>,
    pub round_seconds: Histogram,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("cxrfed");
        let rpc_seconds = Family::new_with_constructor(latency as fn() -> Histogram);
        let stage_seconds = Family::new_with_constructor(latency as fn() -> Histogram);
        let refusals = Family::default();
        let dp_releases = Family::default();
        let dp_epsilon = Family::default();
        let round_seconds = Histogram::new(exponential_buckets(0.5, 2.0, 14));
        registry.register(
            "rpc_seconds",
            "gRPC request latency by method and outcome",
            rpc_seconds.clone(),
        );
        registry.register(
            "stage_seconds",
            "Time per extraction stage (permit_wait, decode, preprocess, inference, store)",
            stage_seconds.clone(),
        );
        registry.register(
            "refusals",
            "Requests refused or failed, by reason",
            refusals.clone(),
        );
        registry.register(
            "dp_releases",
            "Differentially private releases, by the caller's role",
            dp_releases.clone(),
        );
        registry.register(
            "dp_epsilon_spent",
            "Epsilon charged by DP releases, by the caller's role",
            dp_epsilon.clone(),
        );
        registry.register(
            "round_seconds",
            "Federated round durations (coordinator)",
            round_seconds.clone(),
        );
        Metrics {
            registry,
            rpc_seconds,
            stage_seconds,
            refusals,
            dp_releases,
            dp_epsilon,
            round_seconds,
        }
    }

    pub fn observe_rpc(&self, method: &str, outcome: &str, seconds: f64) {
        self.rpc_seconds
            .get_or_create(&MethodOutcome {
                method: method.to_string(),
                outcome: outcome.to_string(),
            })
            .observe(seconds);
        if outcome != "ok" {
            self.refusals
                .get_or_create(&Reason {
                    reason: outcome.to_string(),
                })
                .inc();
        }
    }

    pub fn observe_stage(&self, stage: &str, seconds: f64) {
        self.stage_seconds
            .get_or_create(&Stage {
                stage: stage.to_string(),
            })
            .observe(seconds);
    }

    pub fn dp_release(&self, class: &str, epsilon: f64) {
        let class = IdentityClass {
            class: class.to_string(),
        };
        self.dp_releases.get_or_create(&class).inc();
        self.dp_epsilon.get_or_create(&class).inc_by(epsilon);
    }

    /// The text exposition: these metrics, then what `snapshot` adds to a scratch registry
    /// (values read from state at scrape time).
    pub fn render(&self, snapshot: &dyn Fn(&mut Registry)) -> String {
        let mut scratch = Registry::with_prefix("cxrfed");
        snapshot(&mut scratch);
        let mut out = String::new();
        let mut more = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err()
            || prometheus_client::encoding::text::encode(&mut more, &scratch).is_err()
        {
            return "# encoding failed\n# EOF\n".into();
        }
        // Both end with the OpenMetrics terminator; keep one.
        let out = out
            .trim_end()
            .strip_suffix("# EOF")
            .unwrap_or(&out)
            .to_string();
        out + &more
    }
}

/// A gauge holding `value`, registered into a scrape-time registry.
pub fn gauge(registry: &mut Registry, name: &str, help: &str, value: f64) {
    let g = prometheus_client::metrics::gauge::Gauge::<f64, AtomicU64>::default();
    g.set(value);
    registry.register(name, help, g);
}

/// A counter holding `value` (a monotone count kept elsewhere), for a scrape-time registry.
pub fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let c = Counter::<u64>::default();
    c.inc_by(value);
    registry.register(name, help, c);
}

/// Binds `address` and serves `GET /metrics` there in the background until `shutdown`.
pub async fn spawn(
    address: SocketAddr,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    tracing::info!(listen = %address, "serving /metrics");
    tokio::spawn(serve(listener, render, shutdown));
    Ok(())
}

/// Serves `GET /metrics` on `listener` until `shutdown`: `render` produces the text.
pub async fn serve(
    listener: tokio::net::TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use axum::http::header;
    use axum::response::IntoResponse;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let render = render.clone();
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    render(),
                )
                    .into_response()
            }
        }),
    );
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
}

/// Refuses a non-loopback metrics address unless the configuration allows it explicitly.
pub fn check_listen(addr: &SocketAddr, public: bool) -> Result<(), String> {
    if addr.ip().is_loopback() || public {
        Ok(())
    } else {
        Err(format!(
            "metrics_listen {addr} is not a loopback address: /metrics is plain HTTP without \
             authentication; set metrics_public = true to serve it there (behind your own \
             firewall or proxy)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_has_events_and_snapshot_values_and_one_terminator() {
        let m = Metrics::new();
        m.observe_rpc("Extract", "ok", 0.01);
        m.observe_rpc("Stats", "permission_denied", 0.001);
        m.dp_release("researcher", 0.5);
        m.observe_stage("decode", 0.02);
        let text = m.render(&|r| gauge(r, "in_flight", "Requests in flight", 3.0));
        assert!(text.contains("cxrfed_rpc_seconds_count{method=\"Extract\",outcome=\"ok\"} 1"));
        assert!(text.contains("cxrfed_refusals_total{reason=\"permission_denied\"} 1"));
        assert!(text.contains("cxrfed_dp_epsilon_spent_total{class=\"researcher\"} 0.5"));
        assert!(text.contains("cxrfed_in_flight 3"));
        assert_eq!(text.matches("# EOF").count(), 1, "{text}");
        assert!(text.trim_end().ends_with("# EOF"));
        assert!(check_listen(&"127.0.0.1:9464".parse().expect("address"), false).is_ok());
        assert!(check_listen(&"0.0.0.0:9464".parse().expect("address"), false).is_err());
    }
}
