//! Mutual TLS and authorization against a real tonic server on a loopback port: real
//! certificates from the study CA, real handshakes, real CRLs, live reloads.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use cxrfed_auth::pki::{self, IssueRequest, StudyCa};
use cxrfed_auth::{
    AuthError, AuthLayer, ClientCredentials, Policy, ReloadingTls, Role, Rule, ServerTransport,
    TlsPaths,
};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

struct Pki {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Pki {
    fn new(study: &str) -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        pki::init_ca(&root.join("ca"), study, 30).expect("init CA");
        Pki { _dir: dir, root }
    }

    fn ca(&self) -> StudyCa {
        StudyCa::open(&self.root.join("ca")).expect("open CA")
    }

    fn ca_pem(&self) -> PathBuf {
        self.root.join("ca").join(pki::CA_CERT)
    }

    fn issue_with(&self, request: IssueRequest, dir: &str) -> PathBuf {
        let out = self.root.join(dir);
        self.ca().issue(&request, &out).expect("issue");
        out
    }

    fn issue(&self, role: Role, name: &str, site: Option<&str>) -> PathBuf {
        self.issue_with(IssueRequest::new(role, name, site, 30), name)
    }

    fn client(&self, dir: &Path) -> ClientCredentials {
        ClientCredentials {
            ca: self.ca_pem(),
            cert: Some(dir.join(pki::CERT)),
            key: Some(dir.join(pki::KEY)),
        }
    }

    fn server_paths(&self, dir: &Path) -> TlsPaths {
        TlsPaths {
            ca: self.ca_pem(),
            cert: dir.join(pki::CERT),
            key: dir.join(pki::KEY),
            crl: Some(self.root.join("ca").join(pki::CA_CRL)),
        }
    }
}

/// A health service behind the auth layer. `Check` is for the site admin of site-a only;
/// `Watch` also admits researchers.
struct Server {
    url: String,
    tls: Arc<ReloadingTls>,
    stop: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn start(pki: &Pki) -> Server {
    start_with(pki, cxrfed_auth::ConnectionLimits::default()).await
}

async fn start_with(pki: &Pki, limits: cxrfed_auth::ConnectionLimits) -> Server {
    let node = pki.issue(Role::Node, "node-a", Some("site-a"));
    let tls = ReloadingTls::load(pki.server_paths(&node), &[Role::Node]).expect("load TLS");
    let policy = Policy::new(Some("site-a")).service(
        "grpc.health.v1.Health",
        &[
            ("Check", Rule::SiteAdmin),
            ("Watch", Rule::Roles(&[Role::Researcher])),
        ],
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!(
        "https://127.0.0.1:{}",
        listener.local_addr().expect("addr").port()
    );
    let stop = CancellationToken::new();
    let (_, health) = tonic_health::server::health_reporter();
    let incoming = cxrfed_auth::incoming_with(
        listener,
        ServerTransport::Tls(tls.clone()),
        stop.clone(),
        limits,
    );
    let server = tonic::transport::Server::builder()
        .layer(AuthLayer::new(policy, Some(tls.clone())))
        .add_service(health)
        .serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned());
    tokio::spawn(server);
    Server { url, tls, stop }
}

async fn check(url: &str, credentials: Option<&ClientCredentials>) -> Result<(), tonic::Status> {
    let channel = cxrfed_auth::client::connect(url, credentials)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    check_on(&channel).await
}

async fn check_on(channel: &tonic::transport::Channel) -> Result<(), tonic::Status> {
    HealthClient::new(channel.clone())
        .check(HealthCheckRequest::default())
        .await
        .map(|_| ())
}

fn assert_code(result: Result<(), tonic::Status>, code: Code, needle: &str) {
    let status = result.expect_err("must be refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "{:?} should mention {needle:?}",
        status.message()
    );
}

#[tokio::test]
async fn the_site_admin_is_served() {
    let pki = Pki::new("trial");
    let server = start(&pki).await;
    let admin = pki.issue(Role::Admin, "alice", Some("site-a"));
    check(&server.url, Some(&pki.client(&admin)))
        .await
        .expect("site admin");
}

#[tokio::test]
async fn no_certificate_is_unauthenticated() {
    let pki = Pki::new("trial");
    let server = start(&pki).await;
    let anonymous = ClientCredentials {
        ca: pki.ca_pem(),
        cert: None,
        key: None,
    };
    assert_code(
        check(&server.url, Some(&anonymous)).await,
        Code::Unauthenticated,
        "no client certificate",
    );
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_unauthenticated() {
    let pki = Pki::new("trial");
    let server = start(&pki).await;
    let other = Pki::new("trial");
    let stranger = other.issue(Role::Admin, "mallory", Some("site-a"));
    // The stranger trusts the real CA (so the server checks out) but presents a certificate of
    // a CA with the same study name.
    let credentials = ClientCredentials {
        ca: pki.ca_pem(),
        ..other.client(&stranger)
    };
    assert_code(
        check(&server.url, Some(&credentials)).await,
        Code::Unauthenticated,
        "not issued by this study's CA",
    );
}

#[tokio::test]
async fn an_expired_certificate_is_unauthenticated() {
    let pki = Pki::new("trial");
    let server = start(&pki).await;
    let mut request = IssueRequest::new(Role::Admin, "old-alice", Some("site-a"), 1);
    request.not_before = Utc::now() - chrono::Duration::days(10);
    request.not_after = Utc::now() - chrono::Duration::days(1);
    let expired = pki.issue_with(request, "old-alice");
    assert_code(
        check(&server.url, Some(&pki.client(&expired))).await,
        Code::Unauthenticated,
        "expired",
    );
}

#[tokio::test]
async fn revocation_applies_to_open_connections_without_restart() {
    let pki = Pki::new("trial");
    let server = start(&pki).await;
    let admin = pki.issue(Role::Admin, "alice", Some("site-a"));
    let channel = cxrfed_auth::client::connect(&server.url, Some(&pki.client(&admin)))
        .await
        .expect("connect");
    check_on(&channel).await.expect("before revocation");

    let entry = pki
        .ca()
        .revoke_file(&admin.join(pki::CERT))
        .expect("revoke");
    assert_eq!(
        entry.identity.as_deref(),
        Some("cxrfed://trial/admin/site-a/alice")
    );
    assert!(
        server.tls.reload_if_changed().expect("reload"),
        "CRL change seen"
    );
    assert_code(check_on(&channel).await, Code::Unauthenticated, "revoked");
    assert_code(
        check(&server.url, Some(&pki.client(&admin))).await,
        Code::Unauthenticated,
        "revoked",
    );
    // Others are unaffected.
    let bob = pki.issue(Role::Admin, "bob", Some("site-a"));
    check(&server.url, Some(&pki.client(&bob)))
        .await
        .expect("other admin");
}

#[tokio::test]
async fn the_watcher_picks_up_a_rotated_server_certificate() {
    let pki = Pki::new("trial");
    let server = start(&pki).await;
    let watcher_stop = CancellationToken::new();
    server
        .tls
        .spawn_watcher(Duration::from_millis(100), watcher_stop.clone());
    let admin = pki.issue(Role::Admin, "alice", Some("site-a"));
    let channel = cxrfed_auth::client::connect(&server.url, Some(&pki.client(&admin)))
        .await
        .expect("connect");
    check_on(&channel).await.expect("before rotation");
    let before = server.tls.current().own.fingerprint.clone();
    assert_eq!(served_fingerprint(&pki, &server.url, &admin).await, before);

    let mut renewal = IssueRequest::new(Role::Node, "node-a", Some("site-a"), 60);
    renewal.force = true;
    pki.issue_with(renewal, "node-a");
    let mut waited = 0;
    while server.tls.current().own.fingerprint == before {
        assert!(waited < 200, "the watcher never reloaded the certificate");
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += 1;
    }
    let after = server.tls.current().own.fingerprint.clone();
    assert_eq!(served_fingerprint(&pki, &server.url, &admin).await, after);
    // The connection opened before the rotation keeps working, and new ones too.
    check_on(&channel)
        .await
        .expect("old connection after rotation");
    check(&server.url, Some(&pki.client(&admin)))
        .await
        .expect("new connection after rotation");
    watcher_stop.cancel();
}

/// The fingerprint of the certificate the server presents in a fresh handshake.
async fn served_fingerprint(pki: &Pki, url: &str, client: &Path) -> String {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(pki.ca_pem()).expect("ca") {
        roots.add(cert.expect("ca cert")).expect("add root");
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(client.join(pki::CERT))
        .expect("cert")
        .collect::<Result<_, _>>()
        .expect("chain");
    let key = PrivateKeyDer::from_pem_file(client.join(pki::KEY)).expect("key");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("versions")
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .expect("client auth");
    let addr = url.trim_start_matches("https://");
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("tcp");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1").expect("name"), tcp)
        .await
        .expect("handshake");
    let leaf = &tls.get_ref().1.peer_certificates().expect("server cert")[0];
    cxrfed_auth::identity::fingerprint(leaf)
}

#[tokio::test]
async fn a_half_rotated_pair_keeps_the_old_certificate() {
    let pki = Pki::new("trial");
    let node = pki.issue(Role::Node, "node-x", Some("site-a"));
    let tls = ReloadingTls::load(pki.server_paths(&node), &[Role::Node]).expect("load");
    let before = tls.current().own.fingerprint.clone();
    // A new certificate lands before its key.
    let elsewhere = pki.issue(Role::Node, "node-y", Some("site-a"));
    std::fs::copy(elsewhere.join(pki::CERT), node.join(pki::CERT)).expect("copy cert");
    let err = tls.reload_if_changed().expect_err("mismatched pair");
    assert!(err.to_string().contains("usable pair"), "{err}");
    assert_eq!(tls.current().own.fingerprint, before, "old material kept");
    // The key follows: now it loads.
    std::fs::copy(elsewhere.join(pki::KEY), node.join(pki::KEY)).expect("copy key");
    assert!(tls.reload_if_changed().expect("complete pair"));
    assert_eq!(tls.current().own.name, "node-y");
}

#[tokio::test]
async fn roles_and_sites_are_enforced_with_the_role_named() {
    let pki = Pki::new("trial");
    let server = start(&pki).await;
    let researcher = pki.issue(Role::Researcher, "rita", None);
    assert_code(
        check(&server.url, Some(&pki.client(&researcher))).await,
        Code::PermissionDenied,
        "requires role admin of site site-a",
    );
    let other_admin = pki.issue(Role::Admin, "olga", Some("site-b"));
    assert_code(
        check(&server.url, Some(&pki.client(&other_admin))).await,
        Code::PermissionDenied,
        "admin of site site-a",
    );
    // Watch admits researchers: the request passes authorization (and starts streaming).
    let channel = cxrfed_auth::client::connect(&server.url, Some(&pki.client(&researcher)))
        .await
        .expect("connect");
    HealthClient::new(channel)
        .watch(HealthCheckRequest::default())
        .await
        .expect("researcher may watch");
}

#[tokio::test]
async fn a_plaintext_client_fails_cleanly() {
    let pki = Pki::new("trial");
    let server = start(&pki).await;
    let plain = server.url.replace("https://", "http://");
    let result = tokio::time::timeout(Duration::from_secs(30), check(&plain, None))
        .await
        .expect("no hang");
    assert!(result.is_err(), "plaintext must not be served");
    // And an https client without credentials is told what to pass.
    let err = cxrfed_auth::client::connect(&server.url, None)
        .await
        .expect_err("no credentials");
    assert!(err.to_string().contains("--profile"), "{err}");
}

#[test]
fn a_key_readable_by_others_is_refused() {
    let pki = Pki::new("trial");
    let node = pki.issue(Role::Node, "node-a", Some("site-a"));
    let key = node.join(pki::KEY);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let err = ReloadingTls::load(pki.server_paths(&node), &[Role::Node]).expect_err("0644 key");
    assert!(
        matches!(err, AuthError::KeyPermissions { mode: 0o644, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("chmod 600"), "{err}");
}

#[test]
fn a_server_needs_a_server_role_and_a_valid_certificate() {
    let pki = Pki::new("trial");
    let admin = pki.issue(Role::Admin, "alice", Some("site-a"));
    let err = ReloadingTls::load(pki.server_paths(&admin), &[Role::Node]).expect_err("admin cert");
    assert!(
        err.to_string().contains("needs a node certificate"),
        "{err}"
    );
}

#[test]
fn certificates_carry_role_identity_and_site() {
    let pki = Pki::new("trial");
    let mut request = IssueRequest::new(Role::Node, "node-a", Some("site-a"), 30);
    request.hosts = vec!["node-a.hospital.example".into(), "10.1.2.3".into()];
    let dir = pki.issue_with(request, "node-a");
    let info = pki::inspect(&dir.join(pki::CERT)).expect("inspect");
    assert_eq!(
        info.identity.as_deref(),
        Some("cxrfed://trial/node/site-a/node-a")
    );
    assert_eq!(info.role, Some(Role::Node));
    assert_eq!(info.site.as_deref(), Some("site-a"));
    assert!(
        info.hosts.contains(&"10.1.2.3".to_string()),
        "{:?}",
        info.hosts
    );
    assert!(info.hosts.contains(&"node-a.hospital.example".to_string()));
    assert_eq!(info.fingerprint_sha256.len(), 64);
    let mode = std::fs::metadata(dir.join(pki::KEY))
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // A second issue into the same directory needs --force.
    let again = pki.ca().issue(
        &IssueRequest::new(Role::Node, "node-a", Some("site-a"), 30),
        &dir,
    );
    assert!(again.is_err());
    // An admin without a site is refused.
    let err = pki
        .ca()
        .issue(
            &IssueRequest::new(Role::Admin, "x", None, 30),
            &pki.root.join("x"),
        )
        .expect_err("admin without site");
    assert!(err.to_string().contains("--site"), "{err}");
}

/// Reads until the server closes the connection; `None` if it is still open after `wait`.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    wait: Duration,
) -> Option<()> {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    tokio::time::timeout(wait, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
}

#[tokio::test]
async fn a_connection_with_a_rejected_certificate_is_closed_after_its_answers() {
    use rustls::pki_types::ServerName;
    use rustls::pki_types::pem::PemObject;
    let pki = Pki::new("trial");
    let server = start(&pki).await;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(pki.ca_pem()).expect("ca") {
        roots.add(cert.expect("ca cert")).expect("add root");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(server.url.trim_start_matches("https://"))
        .await
        .expect("tcp");
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1").expect("name"), tcp)
        .await
        .expect("the handshake itself succeeds");
    // Without the close, an h2 server keeps an idle connection open indefinitely.
    assert!(
        closed_within(&mut tls, cxrfed_auth::listener::REJECTED_LINGER * 10)
            .await
            .is_some(),
        "the server kept a rejected connection open"
    );
}

#[tokio::test]
async fn pending_handshakes_are_capped_by_evicting_the_oldest_and_connections_are_capped() {
    let pki = Pki::new("trial");
    let limits = cxrfed_auth::ConnectionLimits {
        max_handshakes: 8,
        max_handshakes_per_peer: 2,
        max_connections: 2,
        max_connections_per_peer: 2,
    };
    let server = start_with(&pki, limits).await;
    let addr = server.url.trim_start_matches("https://").to_string();
    let mut first = tokio::net::TcpStream::connect(&addr).await.expect("tcp");
    let mut second = tokio::net::TcpStream::connect(&addr).await.expect("tcp");
    let _third = tokio::net::TcpStream::connect(&addr).await.expect("tcp");
    // The third evicts the oldest pending handshake long before its 10 s deadline.
    assert!(
        closed_within(&mut first, Duration::from_secs(5))
            .await
            .is_some(),
        "the oldest idle connection was not evicted"
    );
    assert!(
        closed_within(&mut second, Duration::from_millis(300))
            .await
            .is_none(),
        "a newer pending handshake was evicted too"
    );
    drop(second);
    drop(_third);

    // Two authenticated connections are the cap; a third client is turned away.
    let admin = pki.issue(Role::Admin, "alice", Some("site-a"));
    let a = cxrfed_auth::client::connect(&server.url, Some(&pki.client(&admin)))
        .await
        .expect("first");
    check_on(&a).await.expect("served");
    let b = cxrfed_auth::client::connect(&server.url, Some(&pki.client(&admin)))
        .await
        .expect("second");
    check_on(&b).await.expect("served");
    let third = check(&server.url, Some(&pki.client(&admin))).await;
    assert!(third.is_err(), "a connection beyond the cap was served");
    drop(a);
    // Once one closes, a new client is served again.
    let mut served = false;
    for _ in 0..50 {
        if check(&server.url, Some(&pki.client(&admin))).await.is_ok() {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served, "no room after a connection closed");
    drop(b);
}
