//! The coordinator's configuration: defaults, then a TOML file, then `CXRFED_COORDINATOR_*`
//! environment variables (the keys below; the study's TLS files also under their shared names
//! `CXRFED_CA`, `CXRFED_CERT`, `CXRFED_KEY`, `CXRFED_CRL`), then flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use cxrfed_server::layout::{Layout, SHARED_TLS_ENV_PREFIX, SHARED_TLS_KEYS, ServerKind};
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// Store (site registry, audit chain), PID file and logs.
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub log_level: String,
    /// The study CA (PEM) every node and researcher certificate must chain to.
    pub ca: Option<PathBuf>,
    /// The coordinator's certificate (role coordinator) and key (0600).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The study CA's revocation list; defaults to `crl.pem` next to `ca`.
    pub crl: Option<PathBuf>,
    pub tls_reload_ms: u64,
    /// Pooled noisy counts below this are withheld.
    pub suppress_below: u64,
    /// Seconds between a node's heartbeats.
    pub heartbeat_secs: u32,
    /// Default time to wait for sites, ms (a query may ask for less or more, up to 10 min).
    pub query_timeout_ms: u32,
    pub grace_period_secs: u64,
    /// Keep every site update as received under `spool/kept/` (an auditor checks that none
    /// arrived unmasked); off by default.
    pub keep_updates: bool,
    /// Address of `/metrics` (Prometheus text for operators), e.g. "127.0.0.1:9465". Unset:
    /// none. A non-loopback address needs `metrics_public = true`.
    pub metrics_listen: Option<SocketAddr>,
    pub metrics_public: bool,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            data_dir: default_data_dir(),
            listen: SocketAddr::from(([127, 0, 0, 1], 50061)),
            log_level: "info".into(),
            ca: None,
            cert: None,
            key: None,
            crl: None,
            tls_reload_ms: 2000,
            suppress_below: 10,
            heartbeat_secs: 10,
            query_timeout_ms: 30_000,
            grace_period_secs: 10,
            keep_updates: false,
            metrics_listen: None,
            metrics_public: false,
        }
    }
}

/// `$XDG_DATA_HOME/cxrfed/coordinator`, or `./.cxrfed/coordinator`.
pub fn default_data_dir() -> PathBuf {
    ServerKind::Coordinator.default_data_dir()
}

pub const KEYS: &[&str] = &[
    "data_dir",
    "listen",
    "log_level",
    "ca",
    "cert",
    "key",
    "crl",
    "tls_reload_ms",
    "suppress_below",
    "heartbeat_secs",
    "query_timeout_ms",
    "grace_period_secs",
    "keep_updates",
    "metrics_listen",
    "metrics_public",
];

#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

impl CoordinatorConfig {
    pub fn load(file: Option<&Path>, flags: impl Serialize) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(CoordinatorConfig::default()));
        if let Some(file) = file {
            if !file.exists() {
                return Err(ConfigError(format!(
                    "config file {} does not exist",
                    file.display()
                )));
            }
            figment = figment.merge(Toml::file(file));
        }
        let config: CoordinatorConfig = figment
            // A node's variables (CXRFED_NODE_*) never retarget a coordinator.
            .merge(Env::prefixed(SHARED_TLS_ENV_PREFIX).only(SHARED_TLS_KEYS))
            .merge(Env::prefixed(ServerKind::Coordinator.env_prefix()).only(KEYS))
            .merge(Serialized::defaults(flags))
            .extract()
            .map_err(|e| ConfigError(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(addr) = &self.metrics_listen {
            cxrfed_server::metrics::check_listen(addr, self.metrics_public).map_err(ConfigError)?;
        }
        if !(1..=3600).contains(&self.heartbeat_secs) {
            return Err(ConfigError("heartbeat_secs must be in 1..=3600".into()));
        }
        if !(100..=600_000).contains(&self.query_timeout_ms) {
            return Err(ConfigError(
                "query_timeout_ms must be in 100..=600000".into(),
            ));
        }
        self.tls_paths()?;
        Ok(())
    }

    pub fn tls_paths(&self) -> Result<cxrfed_auth::TlsPaths, ConfigError> {
        cxrfed_auth::TlsPaths::configured(
            self.ca.as_ref(),
            self.cert.as_ref(),
            self.key.as_ref(),
            self.crl.as_ref(),
        )
        .ok_or_else(|| {
            ConfigError(
                "the coordinator serves mutual TLS only: give --ca, --cert and --key (a \
                 coordinator certificate from `cxrfed certs issue --role coordinator`)"
                    .into(),
            )
        })
    }

    /// The files of the coordinator's data directory.
    pub fn layout(&self) -> Layout {
        ServerKind::Coordinator.layout(&self.data_dir)
    }

    pub fn store_dir(&self) -> PathBuf {
        self.layout().store_dir()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    // figment's Jail API fixes the closure's error type.
    #[allow(clippy::result_large_err)]
    fn only_the_coordinators_variables_configure_it() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("CXRFED_COORDINATOR_HEARTBEAT_SECS", "7");
            // A node's variables, and the old unprefixed names, change no coordinator.
            jail.set_env("CXRFED_NODE_DATA_DIR", "/elsewhere");
            jail.set_env("CXRFED_DATA_DIR", "/elsewhere");
            jail.set_env("CXRFED_SUPPRESS_BELOW", "99");
            // The study's TLS files keep their shared names.
            jail.set_env("CXRFED_CA", "/tls/ca.pem");
            jail.set_env("CXRFED_CERT", "/tls/cert.pem");
            jail.set_env("CXRFED_KEY", "/tls/key.pem");
            let flags: BTreeMap<&str, &str> = BTreeMap::new();
            let config = CoordinatorConfig::load(None, &flags).expect("load");
            assert_eq!(config.heartbeat_secs, 7);
            assert_eq!(config.data_dir, default_data_dir());
            assert_eq!(
                config.suppress_below,
                CoordinatorConfig::default().suppress_below
            );
            assert_eq!(config.ca, Some(PathBuf::from("/tls/ca.pem")));
            Ok(())
        });
    }
}
