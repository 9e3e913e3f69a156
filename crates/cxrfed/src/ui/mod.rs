//! `cxrfed ui`: the web console. A local web server that is a gRPC client of one node or the
//! coordinator, with the user's own certificate, exactly like the CLI: every permission and
//! every DP rule is the server's, unchanged. The console only renders what the server returns
//! (a researcher's request for exact statistics reaches the node and is refused there).
//!
//! The browser side (the Jupyter convention): loopback by default; the printed URL carries a
//! random one-time token that is exchanged for a session cookie (HttpOnly, SameSite=Strict);
//! every state-changing request needs the session's CSRF token in a header and a same-origin
//! Origin; every response carries a strict Content-Security-Policy (scripts and styles from
//! the binary only). A non-loopback listen address needs TLS for the browser side.
//!
//! Pages are server-rendered HTML (maud) with htmx for partial updates; htmx, the style sheet
//! and the small script are embedded in the binary (no CDN at run time).

mod coordinator;
mod node;
mod page;
mod security;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use clap::Args;
use cxrfed_auth::Role;

use crate::client::Credentials;

#[derive(Debug, Args)]
pub struct UiArgs {
    /// The node to manage (its site admin) or query (a researcher) [default: the profile's
    /// node].
    #[arg(long, env = "CXRFED_NODE", conflicts_with = "coordinator")]
    node: Option<String>,
    /// The coordinator: sites, federated queries (researcher), jobs, registry and promotion
    /// (study admin).
    #[arg(long, env = "CXRFED_COORDINATOR")]
    coordinator: Option<String>,
    #[command(flatten)]
    credentials: Credentials,
    /// Where the console listens. Loopback by default; any other address needs --tls-cert and
    /// --tls-key (the browser side is then HTTPS).
    #[arg(long, default_value = "127.0.0.1:8765")]
    listen: SocketAddr,
    /// Certificate chain (PEM) for the browser side.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) for the browser side.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

/// What the console talks to.
#[derive(Clone)]
pub(crate) enum Backend {
    Node(cxrfed_proto::v1::node_service_client::NodeServiceClient<tonic::transport::Channel>),
    Coordinator(
        cxrfed_proto::v1::coordinator_service_client::CoordinatorServiceClient<
            tonic::transport::Channel,
        >,
    ),
}

pub(crate) struct Ui {
    pub backend: Backend,
    /// The URL the console talks to (shown in the header).
    pub target: String,
    /// The user's identity, from their certificate (None against an --insecure-dev node).
    pub me: Option<cxrfed_auth::Identity>,
    pub credentials: Credentials,
    pub security: security::Sessions,
}

impl Ui {
    pub fn role(&self) -> Option<Role> {
        self.me.as_ref().map(|m| m.role)
    }
}

pub(crate) type Shared = Arc<Ui>;

pub async fn run(args: UiArgs) -> anyhow::Result<ExitCode> {
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(security::tls_acceptor(cert, key)?),
        _ => None,
    };
    if !args.listen.ip().is_loopback() && tls.is_none() {
        bail!(
            "--listen {} is not a loopback address: the browser side then needs TLS (give \
             --tls-cert and --tls-key), or listen on 127.0.0.1",
            args.listen
        );
    }
    let me = args
        .credentials
        .signer()
        .ok()
        .and_then(|s| cxrfed_auth::Identity::from_cert_der(s.certificate()).ok());
    let profile_coordinator = args
        .credentials
        .profile
        .as_deref()
        .map(cxrfed_auth::client::Profile::load)
        .transpose()?
        .and_then(|p| p.coordinator);
    let coordinator = args.coordinator.clone().or_else(|| {
        // A study admin's profile names the coordinator; use it when no node was asked for.
        args.node.is_none().then_some(profile_coordinator).flatten()
    });
    let (backend, target) = match coordinator {
        Some(url) => {
            let c = crate::coordinator_cmd::client(Some(&url), &args.credentials).await?;
            (Backend::Coordinator(c), url)
        }
        None => {
            let c = args
                .credentials
                .connect_node(args.node.as_deref())
                .await?
                .max_decoding_message_size(16 * 1024 * 1024);
            let url = args
                .node
                .clone()
                .unwrap_or_else(|| "the profile's node".into());
            (Backend::Node(c), url)
        }
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let (sessions, token) = security::Sessions::new(tls.is_some());
    let ui = Arc::new(Ui {
        backend,
        target,
        me,
        credentials: args.credentials.clone(),
        security: sessions,
    });
    let app = router(ui.clone());
    let scheme = if tls.is_some() { "https" } else { "http" };
    let host = if addr.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        addr.ip().to_string()
    };
    let who = ui
        .me
        .as_ref()
        .map_or("no certificate (insecure dev)".to_string(), |m| m.uri());
    eprintln!(
        "cxrfed ui: the console for {} as {who} (research use only). Open this URL once; it \
         is a one-time login (Ctrl-C to stop):",
        ui.target
    );
    // stdout carries the URL alone, for scripts.
    println!("{scheme}://{host}:{}/login?token={token}", addr.port());
    use std::io::Write;
    std::io::stdout().flush()?;
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    match tls {
        Some(acceptor) => {
            axum::serve(security::TlsListener::new(listener, acceptor), app)
                .with_graceful_shutdown(shutdown)
                .await?
        }
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await?
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn router(ui: Shared) -> Router {
    let pages = match ui.backend {
        Backend::Node(_) => node::routes(),
        Backend::Coordinator(_) => coordinator::routes(),
    };
    // Everything but the login and the static files needs a session, unknown paths too (so
    // nothing about the console is learnt without one).
    let protected = pages
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            ui.clone(),
            security::require_session,
        ));
    Router::new()
        .route("/login", get(security::login))
        .route("/static/{file}", get(asset))
        .merge(protected)
        .layer(axum::middleware::from_fn(security::headers))
        .layer(axum::extract::DefaultBodyLimit::max(
            node::MAX_UPLOAD_BYTES as usize,
        ))
        .with_state(ui)
}

static HTMX: &str = include_str!("../../ui/assets/htmx.min.js");
static CONSOLE_JS: &str = include_str!("../../ui/assets/console.js");
static CONSOLE_CSS: &str = include_str!("../../ui/assets/console.css");

async fn asset(axum::extract::Path(file): axum::extract::Path<String>) -> Response {
    let (body, kind) = match file.as_str() {
        "htmx.min.js" => (HTMX, "text/javascript; charset=utf-8"),
        "console.js" => (CONSOLE_JS, "text/javascript; charset=utf-8"),
        "console.css" => (CONSOLE_CSS, "text/css; charset=utf-8"),
        _ => return (StatusCode::NOT_FOUND, "no such file").into_response(),
    };
    let mut response = body.into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    response
}

async fn not_found(State(ui): State<Shared>) -> Response {
    page::error_page(
        &ui,
        StatusCode::NOT_FOUND,
        "Not found",
        "There is no such page.",
    )
}
