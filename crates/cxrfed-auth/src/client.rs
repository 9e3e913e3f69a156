//! Client side: profiles (a TOML file naming the CA, certificate and key) and connecting to a
//! cxrfed server over mutual TLS.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tonic::transport::{Channel, Endpoint};

use crate::tls::{ClientCredentials, ServerCheck};
use crate::{AuthError, Role};

/// A client profile file (`certs issue` writes one next to each certificate). Relative paths
/// are relative to the profile's directory.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Default node URL for node commands.
    pub node: Option<String>,
    /// Default coordinator URL for study commands.
    pub coordinator: Option<String>,
}

impl Profile {
    pub fn load(path: &Path) -> Result<Profile, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|e| AuthError::io(path, e))?;
        let mut profile: Profile = toml::from_str(&text)
            .map_err(|e| AuthError::Invalid(format!("profile {}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for field in [&mut profile.ca, &mut profile.cert, &mut profile.key] {
            if let Some(p) = field.as_mut()
                && p.is_relative()
            {
                *p = base.join(&*p);
            }
        }
        Ok(profile)
    }
}

/// Flags and profile merged: explicit flags win over the profile's entries.
pub fn credentials(
    profile: Option<&Profile>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
) -> Option<ClientCredentials> {
    let from = |field: fn(&Profile) -> Option<PathBuf>| profile.and_then(field);
    let ca = ca.or_else(|| from(|p| p.ca.clone()))?;
    Some(ClientCredentials {
        ca,
        cert: cert.or_else(|| from(|p| p.cert.clone())),
        key: key.or_else(|| from(|p| p.key.clone())),
    })
}

/// Connects to `url`: `https://` with mutual TLS (the default), `http://` only for a server
/// started with `--insecure-dev`.
pub async fn connect(
    url: &str,
    credentials: Option<&ClientCredentials>,
) -> Result<Channel, AuthError> {
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| AuthError::Invalid(format!("invalid URL {url:?}: {e}")))?
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true);
    let endpoint = match endpoint.uri().scheme_str() {
        Some("https") => {
            let credentials = credentials.ok_or_else(|| {
                AuthError::Invalid(format!(
                    "{url} uses TLS: give the study CA and your certificate with --ca/--cert/--key or --profile (CXRFED_PROFILE)"
                ))
            })?;
            endpoint
                .tls_config(credentials.tonic_config()?)
                .map_err(|e| AuthError::Invalid(format!("TLS configuration: {e}")))?
        }
        Some("http") => endpoint,
        _ => {
            return Err(AuthError::Invalid(format!(
                "URL {url:?} must start with https:// (or http:// for an --insecure-dev server)"
            )));
        }
    };
    endpoint.connect().await.map_err(|e| {
        let mut message = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        let hint = if url.starts_with("http://") {
            " (a node without --insecure-dev speaks TLS only: use https://)"
        } else {
            ""
        };
        AuthError::Connect {
            url: url.to_string(),
            message: format!("{message}{hint}"),
        }
    })
}

/// [`connect`] to a server of `role`: over https the server's certificate must also say that
/// role (a node's certificate for a node, a coordinator's for the coordinator) and must not be
/// revoked by the CRL kept next to the study CA (`crl.pem`) when there is one. Plaintext
/// (`--insecure-dev`) URLs connect as [`connect`] does.
pub async fn connect_to(
    url: &str,
    credentials: Option<&ClientCredentials>,
    role: Role,
) -> Result<Channel, AuthError> {
    match credentials {
        Some(credentials) if url.starts_with("https://") => {
            let crl = credentials
                .ca
                .parent()
                .map(|dir| dir.join("crl.pem"))
                .filter(|path| path.exists());
            let check = ServerCheck {
                role: Some(role),
                pin: None,
                crl,
            };
            connect_checked(url, credentials, &check).await
        }
        _ => connect(url, credentials).await,
    }
}

/// Connects to `https://HOST:PORT` with mutual TLS and a server certificate checked beyond its
/// chain and host name (`check`: the role it must say, an optional pinned identity, the
/// study's CRL). tonic's TLS has no such hook, so the TLS handshake is made here (tokio-rustls
/// with [`ClientCredentials::checked_rustls_config`]) and tonic speaks HTTP/2 over it.
pub async fn connect_checked(
    url: &str,
    credentials: &ClientCredentials,
    check: &ServerCheck,
) -> Result<Channel, AuthError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| AuthError::Invalid(format!("invalid URL {url:?}: {e}")))?;
    if uri.scheme_str() != Some("https") {
        return Err(AuthError::Invalid(format!(
            "{url}: a checked connection is https://HOST:PORT"
        )));
    }
    let host = uri
        .host()
        .ok_or_else(|| AuthError::Invalid(format!("{url} names no host")))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(443);
    let server_name = rustls::pki_types::ServerName::try_from(host.clone())
        .map_err(|e| AuthError::Invalid(format!("{url}: {e}")))?;
    let config = credentials.checked_rustls_config(check)?;
    let connector = tower::service_fn(move |_: http::Uri| {
        let (config, host, server_name) = (config.clone(), host.clone(), server_name.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(server_name, tcp)
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    // The scheme tonic sees is http: the TLS is the connector's.
    let endpoint = Endpoint::from_shared(format!(
        "http://{}",
        uri.authority().map_or("", |a| a.as_str())
    ))
    .map_err(|e| AuthError::Invalid(format!("invalid URL {url:?}: {e}")))?
    .connect_timeout(Duration::from_secs(10));
    endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|e| {
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                message.push_str(": ");
                message.push_str(&s.to_string());
                source = s.source();
            }
            AuthError::Connect {
                url: url.to_string(),
                message,
            }
        })
}
