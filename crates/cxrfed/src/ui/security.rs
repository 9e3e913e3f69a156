//! The browser side's security: the one-time login token, session cookies, CSRF, the
//! Content-Security-Policy and the other response headers, and TLS for a non-loopback listen
//! address.
//!
//! Secrets are compared as SHA-256 digests with `subtle`'s constant-time equality, so neither
//! a token's length nor a matching prefix changes how long a refusal takes.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::Shared;

pub const COOKIE: &str = "cxrfed_session";
pub const CSRF_HEADER: &str = "x-csrf-token";
/// A session not used for this long is forgotten.
const IDLE: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at most (a one-time token makes one; the cap bounds a bug's damage).
const MAX_SESSIONS: usize = 64;

/// Every page's policy: scripts, styles, images and requests from this origin only; no
/// framing, no plugins, forms post here only.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the operating system's random source");
    hex::encode(bytes)
}

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

pub struct Session {
    pub csrf: String,
    last_used: Instant,
}

pub struct Sessions {
    /// The login token's digest until it is used.
    token: Mutex<Option<[u8; 32]>>,
    /// Keyed by the cookie's digest.
    sessions: Mutex<HashMap<[u8; 32], Session>>,
    secure_cookie: bool,
}

impl Sessions {
    /// The sessions and the one-time login token to print.
    pub fn new(secure_cookie: bool) -> (Sessions, String) {
        let token = random_hex();
        (
            Sessions {
                token: Mutex::new(Some(digest(&token))),
                sessions: Mutex::new(HashMap::new()),
                secure_cookie,
            },
            token,
        )
    }

    /// Spends the login token: a new session (cookie value, CSRF token) if `presented` is it.
    fn exchange(&self, presented: &str) -> Option<String> {
        let presented = digest(presented);
        let mut token = self.token.lock().expect("token lock");
        let stored = (*token)?;
        if !bool::from(stored.ct_eq(&presented)) {
            return None;
        }
        *token = None;
        let cookie = random_hex();
        let mut sessions = self.sessions.lock().expect("sessions lock");
        sessions.retain(|_, s| s.last_used.elapsed() < IDLE);
        if sessions.len() >= MAX_SESSIONS {
            return None;
        }
        sessions.insert(
            digest(&cookie),
            Session {
                csrf: random_hex(),
                last_used: Instant::now(),
            },
        );
        Some(cookie)
    }

    /// The CSRF token of the session this cookie opens, touching it.
    fn csrf_of(&self, cookie: &str) -> Option<String> {
        let key = digest(cookie);
        let mut sessions = self.sessions.lock().expect("sessions lock");
        // Constant time over every stored key: a lookup by hash would be too, but this keeps
        // the comparison explicit.
        let found = sessions
            .iter()
            .find(|(k, _)| bool::from(k.ct_eq(&key)))
            .map(|(k, _)| *k)?;
        let session = sessions.get_mut(&found)?;
        if session.last_used.elapsed() >= IDLE {
            sessions.remove(&found);
            return None;
        }
        session.last_used = Instant::now();
        Some(session.csrf.clone())
    }
}

/// The session's CSRF token, put into request extensions by `require_session` for pages to
/// embed.
#[derive(Clone)]
pub struct Csrf(pub String);

#[derive(serde::Deserialize)]
pub struct LoginQuery {
    token: Option<String>,
}

/// `GET /login?token=T`: a right token becomes a session cookie and a redirect to the console
/// (dropping the token from the address bar); anything else is 401 and the token stays unused.
pub async fn login(State(ui): State<Shared>, Query(q): Query<LoginQuery>) -> Response {
    let Some(cookie) = q.token.as_deref().and_then(|t| ui.security.exchange(t)) else {
        return unauthorized();
    };
    let mut attributes = format!("{COOKIE}={cookie}; Path=/; HttpOnly; SameSite=Strict");
    if ui.security.secure_cookie {
        attributes.push_str("; Secure");
    }
    let mut response = Redirect::to("/").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&attributes).expect("cookie header"),
    );
    response
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "401: not logged in. Open the URL that `cxrfed ui` printed (its token works once); \
         restart `cxrfed ui` for a new one.\n",
    )
        .into_response()
}

fn forbidden(why: &str) -> Response {
    (
        StatusCode::FORBIDDEN,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("403: {why}\n"),
    )
        .into_response()
}

fn cookie_value(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_string())
}

/// Whether a state-changing request comes from this origin: `Origin` (or, without it,
/// `Sec-Fetch-Site`) must not name another site.
fn same_origin(headers: &HeaderMap) -> bool {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    if let Some(origin) = headers.get(header::ORIGIN) {
        let Some(host) = host else { return false };
        let origin = origin.to_str().unwrap_or("");
        let authority = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        return authority == Some(host);
    }
    match headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        Some(site) => site == "same-origin" || site == "none",
        None => true,
    }
}

/// Every console page: a live session; and for anything but GET/HEAD, the session's CSRF
/// token in `X-CSRF-Token` and a same-origin request.
pub async fn require_session(
    State(ui): State<Shared>,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(csrf) = cookie_value(request.headers()).and_then(|c| ui.security.csrf_of(&c)) else {
        return unauthorized();
    };
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        if !same_origin(request.headers()) {
            return forbidden("a cross-site request is refused");
        }
        let presented = request
            .headers()
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !bool::from(digest(presented).ct_eq(&digest(&csrf))) {
            return forbidden("missing or wrong CSRF token (reload the page)");
        }
    }
    request.extensions_mut().insert(Csrf(csrf));
    next.run(request).await
}

/// Headers on every response.
pub async fn headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // The login URL carries the token: never send it on.
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        "cross-origin-resource-policy",
        HeaderValue::from_static("same-origin"),
    );
    // Pages show patient-derived data: no caching anywhere.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// A rustls server for the browser side from a PEM chain and key.
pub fn tls_acceptor(cert: &Path, key: &Path) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading the key {}", key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// TLS connections for `axum::serve`: handshakes run in their own tasks (10 s each at most) so
/// a slow client does not hold up the others; finished ones queue here.
pub struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(
        tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        std::net::SocketAddr,
    )>,
    local: std::net::SocketAddr,
}

impl TlsListener {
    pub fn new(listener: tokio::net::TcpListener, acceptor: tokio_rustls::TlsAcceptor) -> Self {
        let local = listener.local_addr().expect("bound listener");
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let Ok((tcp, peer)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let handshake =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await;
                    if let Ok(Ok(stream)) = handshake {
                        let _ = tx.send((stream, peer)).await;
                    }
                });
            }
        });
        TlsListener { ready, local }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(connection) => connection,
            // The accept task never ends while the listener lives.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_login_token_works_once_and_only_itself() {
        let (sessions, token) = Sessions::new(false);
        assert!(sessions.exchange("").is_none());
        assert!(sessions.exchange(&token[..63]).is_none());
        let mut near = token.clone();
        near.replace_range(63.., if token.ends_with('0') { "1" } else { "0" });
        assert!(sessions.exchange(&near).is_none());
        let cookie = sessions.exchange(&token).expect("the right token");
        assert!(sessions.exchange(&token).is_none(), "one time only");
        let csrf = sessions.csrf_of(&cookie).expect("a live session");
        assert_eq!(csrf.len(), 64);
        assert!(sessions.csrf_of("not-a-session").is_none());
    }

    #[test]
    fn cross_site_requests_are_recognised() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8765"));
        assert!(same_origin(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8765"),
        );
        assert!(same_origin(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        assert!(!same_origin(&h));
        h.remove(header::ORIGIN);
        h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(!same_origin(&h));
    }
}
