//! Identity and access for cxrfed servers and clients: the study CA and role certificates
//! ([`pki`]), mutual TLS 1.3 with reloadable files ([`tls`], [`listener`]), identities read
//! from certificates ([`identity`]), role-based authorization on every RPC ([`authz`]) and
//! client profiles ([`client`]).
//!
//! Knows nothing of records, models or the store; the node and the coordinator both build on it.
//!
//! Architecture invariant: cxrfed-auth knows nothing of records, models or storage: it depends
//! on neither cxrfed-store, sled, cxrfed-model nor tch.

pub mod authz;
pub mod client;
pub mod files;
pub mod identity;
pub mod listener;
pub mod pki;
pub mod signing;
pub mod tls;

pub use authz::{AuthLayer, Policy, RpcMethod, Rule};
pub use identity::{Identity, Role};
pub use listener::{
    ConnectionLimits, PeerAuth, PeerInfo, ServerTransport, incoming, incoming_with,
};
pub use tls::{ClientCredentials, ReloadingTls, ServerCheck, TlsPaths};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "private key {path} is readable by other users (mode {mode:04o}); restrict it with `chmod 600 {path}`"
    )]
    KeyPermissions { path: String, mode: u32 },
    #[error("cannot connect to {url}: {message}")]
    Connect { url: String, message: String },
}

impl AuthError {
    pub fn io(path: &std::path::Path, source: std::io::Error) -> AuthError {
        AuthError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}
