//! Server and client TLS with rustls: TLS 1.3 only, the study CA as the only trust anchor, the
//! CA's CRL honoured, and certificate, key, CA and CRL files watched and reloaded without a
//! restart.
//!
//! How a client certificate is checked: the handshake accepts a connection with any
//! certificate *whose private key the client proves it holds* (the TLS 1.3 CertificateVerify
//! signature is always checked), or with none. Right after the handshake the presented chain
//! is verified against the study CA, its validity period and the CRL with webpki, and the
//! identity is read from it. Every RPC on a connection whose certificate is missing or failed
//! that check is answered UNAUTHENTICATED with the reason, and logged with the method and the
//! identity the certificate claimed — something a handshake alert cannot do. Each request
//! also re-checks expiry and the current CRL, so revoking a certificate cuts off connections
//! that were open before the revocation.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use chrono::Utc;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::identity::{Identity, Role};
use crate::{AuthError, files};

/// The files a TLS party is configured with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsPaths {
    /// The study CA certificate (PEM).
    pub ca: PathBuf,
    /// This party's certificate (PEM; leaf first).
    pub cert: PathBuf,
    /// This party's private key (PEM, mode 0600).
    pub key: PathBuf,
    /// The study CA's revocation list (PEM), if any.
    pub crl: Option<PathBuf>,
}

impl TlsPaths {
    /// The paths of a configuration: `None` unless ca, cert and key are all given; the CRL
    /// defaults to `crl.pem` next to the CA certificate when that file exists.
    pub fn configured(
        ca: Option<&PathBuf>,
        cert: Option<&PathBuf>,
        key: Option<&PathBuf>,
        crl: Option<&PathBuf>,
    ) -> Option<TlsPaths> {
        let (ca, cert, key) = (ca?, cert?, key?);
        let crl = crl.cloned().or_else(|| {
            let beside = ca.parent()?.join(crate::pki::CA_CRL);
            beside.exists().then_some(beside)
        });
        Some(TlsPaths {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
            crl,
        })
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server configuration for DICOM TLS (PS3.15 Annex B, the BCP 195 profiles): the server's
/// own certificate chain and key, TLS 1.2 or 1.3, and no client certificate. DICOM peers (a
/// hospital's PACS, a router) hold no study certificate: they are admitted by AE title and
/// address, and TLS protects the images in transit and proves the node to them. The gRPC
/// listeners stay TLS 1.3 with mutual authentication.
fn dicom_config(
    chain: Vec<CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(Arc::new(config))
}

/// Everything a server needs for one version of its TLS files.
#[derive(Debug)]
pub struct ServerMaterial {
    pub config: Arc<rustls::ServerConfig>,
    /// The same certificate for DICOM TLS (TLS 1.2/1.3, no client certificate): the node's
    /// DICOM receiver takes it per association, so it follows reloads like the gRPC port.
    pub dicom: Arc<rustls::ServerConfig>,
    /// The server's own identity (from its certificate).
    pub own: Identity,
    strict: Arc<dyn ClientCertVerifier>,
    revoked: HashSet<String>,
    digest: [u8; 32],
}

/// Why a client's certificate was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: String,
    /// The identity the rejected certificate claims (unverified; for logs only).
    pub claimed: Option<String>,
    pub fingerprint: Option<String>,
}

impl ServerMaterial {
    /// Loads and cross-checks the files: the key matches the certificate, the certificate
    /// chains to the CA, is valid now, is not revoked, and carries one of `roles`.
    pub fn load(paths: &TlsPaths, roles: &[Role]) -> Result<ServerMaterial, AuthError> {
        let files = read_files(paths)?;
        let roots = read_roots(&paths.ca, &files.ca)?;
        let ca_certs = read_chain(&paths.ca, &files.ca)?;
        let chain = read_chain(&paths.cert, &files.cert)?;
        let key = read_key(&paths.key, &files.key)?;
        let crls: Vec<CertificateRevocationListDer<'static>> = match &files.crl {
            Some(bytes) => CertificateRevocationListDer::pem_slice_iter(bytes)
                .collect::<Result<_, _>>()
                .map_err(|e| pem_error(paths.crl.as_deref(), e))?,
            None => Vec::new(),
        };
        let revoked = revoked_serials(&ca_certs, &crls, paths.crl.as_deref())?;
        let mut builder =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots.clone()), provider());
        if !crls.is_empty() {
            builder = builder.with_crls(crls).only_check_end_entity_revocation();
        }
        let strict = builder
            .build()
            .map_err(|e| AuthError::Invalid(format!("client verifier: {e}")))?;

        let leaf = chain.first().ok_or_else(|| {
            AuthError::Invalid(format!("{}: no certificate", paths.cert.display()))
        })?;
        let own = Identity::from_cert_der(leaf)
            .map_err(|e| AuthError::Invalid(format!("{}: {e}", paths.cert.display())))?;
        if !roles.contains(&own.role) {
            return Err(AuthError::Invalid(format!(
                "{} is a {} certificate; this server needs a {} certificate",
                paths.cert.display(),
                own.role,
                roles
                    .iter()
                    .map(|r| r.as_str())
                    .collect::<Vec<_>>()
                    .join(" or ")
            )));
        }
        strict
            .verify_client_cert(leaf, &chain[1..], UnixTime::now())
            .map_err(|e| {
                AuthError::Invalid(format!(
                    "{} is not usable with CA {}: {}",
                    paths.cert.display(),
                    paths.ca.display(),
                    describe(&e)
                ))
            })?;

        let deferred = Arc::new(DeferredClientVerifier {
            strict: strict.clone(),
        });
        let pair_error = |e: rustls::Error| {
            AuthError::Invalid(format!(
                "{} and {} do not form a usable pair: {e}",
                paths.cert.display(),
                paths.key.display()
            ))
        };
        let dicom = dicom_config(chain.clone(), key.clone_key()).map_err(pair_error)?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| AuthError::Invalid(format!("TLS: {e}")))?
            .with_client_cert_verifier(deferred)
            .with_single_cert(chain, key)
            .map_err(|e| {
                AuthError::Invalid(format!(
                    "{} and {} do not form a usable pair: {e}",
                    paths.cert.display(),
                    paths.key.display()
                ))
            })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(ServerMaterial {
            config: Arc::new(config),
            dicom,
            own,
            strict,
            revoked,
            digest: files.digest,
        })
    }

    /// Verifies a client's certificate chain as presented in the handshake.
    pub fn verify_client(&self, chain: &[CertificateDer<'_>]) -> Result<Identity, Rejection> {
        let Some(leaf) = chain.first() else {
            return Err(Rejection {
                reason: "no client certificate was presented (pass --cert/--key or --profile)"
                    .into(),
                claimed: None,
                fingerprint: None,
            });
        };
        let claimed = Identity::from_cert_der(leaf).ok();
        let reject = |reason: String| Rejection {
            reason,
            claimed: claimed.as_ref().map(Identity::uri),
            fingerprint: Some(crate::identity::fingerprint(leaf)),
        };
        self.strict
            .verify_client_cert(leaf, &chain[1..], UnixTime::now())
            .map_err(|e| reject(describe(&e)))?;
        let identity = Identity::from_cert_der(leaf).map_err(|e| reject(e.to_string()))?;
        if identity.study != self.own.study {
            return Err(reject(format!(
                "the certificate is for study {:?}; this server belongs to study {:?}",
                identity.study, self.own.study
            )));
        }
        Ok(identity)
    }

    /// A certificate carried inside a signed message (a query intent, an order, a round key)
    /// rather than presented in a handshake: its chain to the study CA, the current revocation
    /// list and clock, and the role it must say. The error says which check failed.
    pub fn verify_signer(&self, der: &[u8], role: Role) -> Result<Identity, String> {
        let identity = self
            .verify_client(&[CertificateDer::from(der.to_vec())])
            .map_err(|r| format!("the signer's certificate: {}", r.reason))?;
        self.still_valid(&identity)?;
        if identity.role != role {
            return Err(format!("{} is not a {role} certificate", identity.uri()));
        }
        Ok(identity)
    }

    /// Checks an identity verified earlier on a long-lived connection against the current
    /// revocation list and the clock.
    pub fn still_valid(&self, identity: &Identity) -> Result<(), String> {
        if self.revoked.contains(&identity.serial) {
            return Err(format!(
                "certificate {} (serial {}) has been revoked",
                identity.uri(),
                identity.serial
            ));
        }
        if Utc::now() > identity.not_after {
            return Err(format!(
                "certificate {} expired at {}",
                identity.uri(),
                identity.not_after.to_rfc3339()
            ));
        }
        Ok(())
    }

    pub fn revoked_count(&self) -> usize {
        self.revoked.len()
    }
}

/// A server's TLS material that follows its files.
#[derive(Debug)]
pub struct ReloadingTls {
    paths: TlsPaths,
    roles: Vec<Role>,
    current: ArcSwap<ServerMaterial>,
    /// Digest of the last set of files that failed to load (logged once, not every poll).
    last_failure: parking_lot::Mutex<Option<[u8; 32]>>,
}

impl ReloadingTls {
    pub fn load(paths: TlsPaths, roles: &[Role]) -> Result<Arc<ReloadingTls>, AuthError> {
        let material = ServerMaterial::load(&paths, roles)?;
        Ok(Arc::new(ReloadingTls {
            paths,
            roles: roles.to_vec(),
            current: ArcSwap::from_pointee(material),
            last_failure: parking_lot::Mutex::new(None),
        }))
    }

    pub fn current(&self) -> Arc<ServerMaterial> {
        self.current.load_full()
    }

    pub fn paths(&self) -> &TlsPaths {
        &self.paths
    }

    /// Reloads when any of the files changed. A set of files that does not load (a
    /// certificate replaced before its key, a truncated CRL) leaves the running material in
    /// place and is retried on the next call.
    pub fn reload_if_changed(&self) -> Result<bool, AuthError> {
        let digest = read_files(&self.paths)?.digest;
        if digest == self.current.load().digest {
            return Ok(false);
        }
        match ServerMaterial::load(&self.paths, &self.roles) {
            Ok(material) => {
                tracing::info!(
                    identity = %material.own,
                    cert_fingerprint = material.own.fingerprint.as_str(),
                    not_after = %material.own.not_after.to_rfc3339(),
                    revoked = material.revoked.len(),
                    "TLS certificate, key, CA or CRL changed: reloaded"
                );
                self.current.store(Arc::new(material));
                *self.last_failure.lock() = None;
                Ok(true)
            }
            Err(e) => {
                let mut last = self.last_failure.lock();
                if *last != Some(digest) {
                    tracing::warn!(error = %e, "TLS files changed but do not load; still serving the previous certificate");
                    *last = Some(digest);
                }
                Err(e)
            }
        }
    }

    /// Polls the files every `interval` until `shutdown`. Polling (not inotify) also follows
    /// the symlink swaps that Kubernetes secrets and certbot use.
    pub fn spawn_watcher(
        self: &Arc<Self>,
        interval: Duration,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = ticker.tick() => {}
                }
                let me = this.clone();
                // File reads and signature checks: off the async workers.
                let _ = tokio::task::spawn_blocking(move || me.reload_if_changed()).await;
            }
        })
    }
}

/// Accepts any client certificate chain at the handshake (or none) but always checks the
/// holder's CertificateVerify signature; the chain itself is judged right after the handshake
/// by [`ServerMaterial::verify_client`].
#[derive(Debug)]
struct DeferredClientVerifier {
    strict: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for DeferredClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.strict.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.strict.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.strict.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.strict.supported_verify_schemes()
    }
}

/// What a client connects with: the study CA to check the server, and its own certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCredentials {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// What a client requires of a server's certificate beyond its chain and host name: its role
/// in the study, optionally one pinned identity, and that the study's CRL does not revoke it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerCheck {
    /// The role the server's certificate must say (e.g. `coordinator` for a node's link).
    pub role: Option<Role>,
    /// The one server identity accepted: its identity URI (`cxrfed://STUDY/ROLE/-/NAME`) or its
    /// certificate's SHA-256 fingerprint (hex).
    pub pin: Option<String>,
    /// The study CA's CRL (PEM); a revoked server certificate fails the handshake.
    pub crl: Option<PathBuf>,
}

/// rustls' WebPKI server verification (chain, host name, validity, CRL) and then the study's
/// own rules on the leaf: its role and, when pinned, its identity. rustls has no hook for
/// that, hence this small wrapper.
#[derive(Debug)]
struct StudyServerVerifier {
    webpki: Arc<rustls::client::WebPkiServerVerifier>,
    role: Option<Role>,
    pin: Option<String>,
}

impl rustls::client::danger::ServerCertVerifier for StudyServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let verified = self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let identity = Identity::from_cert_der(end_entity)
            .map_err(|e| rustls::Error::General(format!("the server's certificate: {e}")))?;
        if let Some(role) = self.role
            && identity.role != role
        {
            return Err(rustls::Error::General(format!(
                "the server's certificate is {} (role {}), not a {role}",
                identity.uri(),
                identity.role
            )));
        }
        if let Some(pin) = &self.pin
            && *pin != identity.uri()
            && !pin.eq_ignore_ascii_case(&identity.fingerprint)
        {
            return Err(rustls::Error::General(format!(
                "the server's certificate is {} (sha256 {}), not the pinned {pin}",
                identity.uri(),
                identity.fingerprint
            )));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

impl ClientCredentials {
    /// A rustls client configuration (TLS 1.3, ALPN h2, the client certificate when given)
    /// whose server verification adds `check` to the chain and host name.
    pub fn checked_rustls_config(
        &self,
        check: &ServerCheck,
    ) -> Result<Arc<rustls::ClientConfig>, AuthError> {
        let ca = std::fs::read(&self.ca).map_err(|e| AuthError::io(&self.ca, e))?;
        let roots = read_roots(&self.ca, &ca)?;
        let mut builder = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        );
        if let Some(path) = &check.crl {
            let bytes = std::fs::read(path).map_err(|e| AuthError::io(path, e))?;
            let crls: Vec<CertificateRevocationListDer<'static>> =
                CertificateRevocationListDer::pem_slice_iter(&bytes)
                    .collect::<Result<_, _>>()
                    .map_err(|e| pem_error(Some(path), e))?;
            builder = builder.with_crls(crls).only_check_end_entity_revocation();
        }
        let webpki = builder
            .build()
            .map_err(|e| AuthError::Invalid(format!("server verifier: {e}")))?;
        let verifier = Arc::new(StudyServerVerifier {
            webpki,
            role: check.role,
            pin: check.pin.clone(),
        });
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| AuthError::Invalid(format!("TLS: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let cert_pem = std::fs::read(cert).map_err(|e| AuthError::io(cert, e))?;
                let chain = read_chain(cert, &cert_pem)?;
                let key_pem = files::read_private_key_pem(key)?;
                let key = read_key(key, key_pem.as_bytes())?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| AuthError::Invalid(format!("client certificate: {e}")))?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => return Err(AuthError::Invalid("--cert and --key go together".into())),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// The tonic client TLS configuration (TLS through rustls; the server name checked
    /// against the URL's host).
    pub fn tonic_config(&self) -> Result<tonic::transport::ClientTlsConfig, AuthError> {
        let ca = std::fs::read(&self.ca).map_err(|e| AuthError::io(&self.ca, e))?;
        read_roots(&self.ca, &ca)?;
        let mut config = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca));
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let cert_pem = std::fs::read(cert).map_err(|e| AuthError::io(cert, e))?;
                read_chain(cert, &cert_pem)?;
                let key_pem = files::read_private_key_pem(key)?;
                read_key(key, key_pem.as_bytes())?;
                config = config.identity(tonic::transport::Identity::from_pem(cert_pem, key_pem));
            }
            (None, None) => {}
            _ => {
                return Err(AuthError::Invalid("--cert and --key go together".into()));
            }
        }
        Ok(config)
    }
}

struct Files {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
    crl: Option<Vec<u8>>,
    digest: [u8; 32],
}

fn read_files(paths: &TlsPaths) -> Result<Files, AuthError> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| AuthError::io(p, e));
    files::check_private_mode(&paths.key)?;
    let ca = read(&paths.ca)?;
    let cert = read(&paths.cert)?;
    let key = read(&paths.key)?;
    let crl = paths.crl.as_deref().map(read).transpose()?;
    let mut hasher = Sha256::new();
    for part in [&ca, &cert, &key] {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    if let Some(crl) = &crl {
        hasher.update(crl);
    }
    Ok(Files {
        ca,
        cert,
        key,
        crl,
        digest: hasher.finalize().into(),
    })
}

fn pem_error(path: Option<&Path>, e: rustls::pki_types::pem::Error) -> AuthError {
    AuthError::Invalid(format!(
        "{}: not valid PEM: {e}",
        path.map(|p| p.display().to_string()).unwrap_or_default()
    ))
}

fn read_roots(path: &Path, pem: &[u8]) -> Result<rustls::RootCertStore, AuthError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| pem_error(Some(path), e))?;
        roots
            .add(cert)
            .map_err(|e| AuthError::Invalid(format!("{}: {e}", path.display())))?;
    }
    if roots.is_empty() {
        return Err(AuthError::Invalid(format!(
            "{} holds no CA certificate",
            path.display()
        )));
    }
    Ok(roots)
}

fn read_chain(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, AuthError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| pem_error(Some(path), e))?;
    if chain.is_empty() {
        return Err(AuthError::Invalid(format!(
            "{} holds no certificate",
            path.display()
        )));
    }
    Ok(chain)
}

fn read_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, AuthError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| pem_error(Some(path), e))
}

/// Serial numbers (hex) in CRLs signed by one of the CA certificates; a CRL that none of them
/// signed is refused.
fn revoked_serials(
    ca_certs: &[CertificateDer<'_>],
    crls: &[CertificateRevocationListDer<'_>],
    path: Option<&Path>,
) -> Result<HashSet<String>, AuthError> {
    let name = || path.map(|p| p.display().to_string()).unwrap_or_default();
    let mut serials = HashSet::new();
    for der in crls {
        let (_, crl) = x509_parser::parse_x509_crl(der)
            .map_err(|e| AuthError::Invalid(format!("{}: not a CRL: {e}", name())))?;
        let signed = ca_certs.iter().any(|ca| {
            x509_parser::parse_x509_certificate(ca)
                .is_ok_and(|(_, ca)| crl.verify_signature(ca.public_key()).is_ok())
        });
        if !signed {
            return Err(AuthError::Invalid(format!(
                "{}: the CRL is not signed by the study CA",
                name()
            )));
        }
        serials.extend(
            crl.iter_revoked_certificates()
                .map(|r| hex::encode(r.raw_serial())),
        );
    }
    Ok(serials)
}

/// A sentence for a certificate verification error.
fn describe(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "the certificate has expired".into()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "the certificate is not valid yet".into()
            }
            CertificateError::Revoked => "the certificate has been revoked".into(),
            CertificateError::UnknownIssuer => {
                "the certificate was not issued by this study's CA".into()
            }
            CertificateError::BadSignature => {
                "the certificate was not issued by this study's CA (its signature does not verify)"
                    .into()
            }
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "the certificate is not meant for TLS client authentication".into()
            }
            other => format!("invalid certificate: {other:?}"),
        },
        other => other.to_string(),
    }
}
