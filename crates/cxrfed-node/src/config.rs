//! The node's one typed, validated configuration: defaults, then a TOML file, then
//! `CXRFED_NODE_*` environment variables (and the study's shared `CXRFED_CA`, `CXRFED_CERT`,
//! `CXRFED_KEY`, `CXRFED_CRL`), then command-line flags (flags win).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use cxrfed_server::layout::{Layout, SHARED_TLS_ENV_PREFIX, SHARED_TLS_KEYS, ServerKind};
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// Node settings. Every field has a default; see `cxrfed node serve --help`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Directory holding the store, the site secret, the PID file and the logs.
    pub data_dir: PathBuf,
    /// Address the gRPC server listens on.
    pub listen: SocketAddr,
    /// Site name reported by `Status`.
    pub site: String,
    /// Largest accepted upload, in bytes.
    pub max_file_bytes: u64,
    /// Largest accepted image dimensions (checked on the header, before decoding).
    pub max_rows: u32,
    pub max_columns: u32,
    /// Images whose pixels may show identifying text: "refuse" (Burned In Annotation or
    /// Recognizable Visual Features YES, and secondary captures / document-like images that do
    /// not say), "refuse-yes" (only an explicit YES) or "accept". Refusals are audited.
    pub burned_in_annotation: String,
    /// Model input side length in pixels.
    pub input_size: u32,
    /// "pad" or "center-crop".
    pub aspect: String,
    /// JPEG 2000 decoded at the lowest resolution that still covers the model input:
    /// "lossy" (lossy J2K only, the default), "all" (lossless too: several times faster, but a
    /// lossless J2K copy and an uncompressed copy of one image then become two records, since
    /// a reduced decode's identity is its codestream) or "off".
    pub j2k_reduced_decode: String,
    /// Images decoded at the same time (each holds one full-resolution image in memory).
    pub decode_workers: usize,
    /// Bytes all decodes together may hold at once (each reserves its estimated peak from
    /// the checked header before decoding; one that alone exceeds this is refused with
    /// RESOURCE_EXHAUSTED, others wait up to 30 s).
    pub decode_memory_bytes: u64,
    /// Seconds in-flight requests get to finish after SIGTERM before the node stops anyway.
    pub grace_period_secs: u64,
    /// tracing filter, e.g. "info" or "cxrfed_node=debug".
    pub log_level: String,
    /// Model directory (card.json + weights); "bundled" for the model built into the binary,
    /// "none" to store records without findings.
    pub model: String,
    /// Inference device: auto, cpu, cuda or cuda:N.
    pub device: String,
    /// Largest inference batch.
    pub max_batch: usize,
    /// Longest wait for a batch to fill, in milliseconds. A batch waits only while another
    /// image is being decoded for it; with nothing on its way it runs at once.
    pub max_wait_ms: u64,
    /// Requests that may wait for inference; beyond that, RESOURCE_EXHAUSTED.
    pub inference_queue: usize,
    /// The study CA certificate (PEM) client certificates must chain to.
    pub ca: Option<PathBuf>,
    /// The node's certificate (PEM, role node, issued by `cxrfed certs issue`).
    pub cert: Option<PathBuf>,
    /// The node's private key (PEM, mode 0600).
    pub key: Option<PathBuf>,
    /// The study CA's revocation list; defaults to `crl.pem` next to `ca` when present.
    pub crl: Option<PathBuf>,
    /// Plaintext gRPC without client authentication, loopback only, every caller treated as
    /// the site admin. For development on one machine; never with real data.
    pub insecure_dev: bool,
    /// How often the TLS files are checked for changes (rotation, revocation), in ms.
    pub tls_reload_ms: u64,
    /// The question lexicon for `Ask`: "bundled" (data/lexicon.toml, built in) or a TOML file.
    pub lexicon: String,
    /// Records one patient may contribute to a DP release (k).
    pub dp_contributions: u32,
    /// Noisy DP counts below this are withheld.
    pub dp_suppress_below: u64,
    /// The ε budget of an identity the site admin has not set one for (0: none until set).
    pub dp_default_epsilon: f64,
    /// The δ budget of an identity the site admin has not set one for.
    pub dp_default_delta: f64,
    /// Records without a patient pseudonym in DP releases: "exclude" (their privacy unit is
    /// unknown) or "per-image" (only where each image is known to be its own patient).
    pub dp_unlinked: String,
    /// The study coordinator's URL (https://HOST:PORT). When set, the node dials out to it with
    /// its node certificate and answers federated DP queries over that link.
    pub coordinator: Option<String>,
    /// Pin the coordinator: its identity URI (`cxrfed://STUDY/coordinator/-/NAME`) or its
    /// certificate's SHA-256 fingerprint. Unset: any coordinator certificate of the study.
    pub coordinator_identity: Option<String>,
    /// What the node tells the coordinator of its record count (hello, heartbeats, back-fill
    /// reports): "none" (the default: 0), "hundreds" (rounded down to a multiple of 100) or
    /// "exact". The study admin sees what the site publishes; researchers never see counts.
    pub publish_record_count: String,
    /// The site's federated training policy (a TOML file of `cxrfed_fl::SitePolicy`), applied
    /// and audited at start; `cxrfed node training-policy set` changes it at run time. Without
    /// either, the site takes part in no training.
    pub training_policy: Option<PathBuf>,
    /// Address of `/metrics` (Prometheus text for the site's operators), e.g.
    /// "127.0.0.1:9464". Unset: none. Plain HTTP without authentication: a non-loopback
    /// address needs `metrics_public = true`.
    pub metrics_listen: Option<SocketAddr>,
    /// Serve `/metrics` on a non-loopback `metrics_listen` (behind the site's own firewall).
    pub metrics_public: bool,
    /// Address of the DICOM receiver (C-ECHO and C-STORE SCP), e.g. "0.0.0.0:11112". Unset:
    /// no receiver.
    pub dicom_listen: Option<SocketAddr>,
    /// The receiver's AE title: associations must call it.
    pub dicom_ae: String,
    /// Calling AE titles allowed to associate: "AE", "AE@IP" (only from that address), or "*"
    /// (any). Required with `dicom_listen`.
    pub dicom_allow: Vec<String>,
    /// DICOM TLS on the receiver with the node's certificate (TLS 1.2/1.3, no client
    /// certificate: callers are admitted by AE title and address).
    pub dicom_tls: bool,
    /// Concurrent associations; beyond them a new one is rejected as transient.
    pub dicom_max_associations: usize,
    /// Received instances in processing at once; beyond them C-STORE answers A700 (out of
    /// resources) and the sender retries.
    pub dicom_queue: usize,
    /// Bytes of received data sets held in memory across associations.
    pub dicom_buffer_bytes: u64,
    /// The ε budget of the study's training account (every round's update and metrics are
    /// charged to it) until the site admin sets one.
    pub dp_training_epsilon: f64,
    /// The δ budget of the training account until the site admin sets one.
    pub dp_training_delta: f64,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            data_dir: default_data_dir(),
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            site: "local".to_string(),
            max_file_bytes: 256 * 1024 * 1024,
            max_rows: 8192,
            max_columns: 8192,
            burned_in_annotation: "refuse".to_string(),
            j2k_reduced_decode: "lossy".to_string(),
            input_size: 224,
            aspect: "pad".to_string(),
            decode_workers: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            decode_memory_bytes: 1 << 30,
            grace_period_secs: 20,
            // The JPEG 2000 codec logs every header at INFO.
            log_level: "info,jpeg2k=warn".to_string(),
            model: "bundled".to_string(),
            device: "auto".to_string(),
            max_batch: 16,
            max_wait_ms: 5,
            inference_queue: 64,
            ca: None,
            cert: None,
            key: None,
            crl: None,
            insecure_dev: false,
            tls_reload_ms: 2000,
            lexicon: "bundled".to_string(),
            dp_contributions: 1,
            dp_suppress_below: 10,
            dp_default_epsilon: 0.0,
            dp_default_delta: 0.0,
            dp_unlinked: "exclude".to_string(),
            coordinator: None,
            coordinator_identity: None,
            publish_record_count: "none".to_string(),
            training_policy: None,
            metrics_listen: None,
            metrics_public: false,
            dicom_listen: None,
            dicom_ae: "CXRFED".to_string(),
            dicom_allow: Vec::new(),
            dicom_tls: false,
            dicom_max_associations: 16,
            dicom_queue: 16,
            dicom_buffer_bytes: 512 << 20,
            dp_training_epsilon: 20.0,
            dp_training_delta: 1e-4,
        }
    }
}

/// The embedded default data directory: `$XDG_DATA_HOME/cxrfed/node` (or the platform's
/// equivalent), falling back to `./.cxrfed/node`.
pub fn default_data_dir() -> PathBuf {
    ServerKind::Node.default_data_dir()
}

/// Every key of [`NodeConfig`], as accepted in TOML and as `CXRFED_NODE_<KEY>` variables.
pub const KEYS: &[&str] = &[
    "data_dir",
    "listen",
    "site",
    "max_file_bytes",
    "max_rows",
    "max_columns",
    "burned_in_annotation",
    "input_size",
    "aspect",
    "j2k_reduced_decode",
    "decode_workers",
    "decode_memory_bytes",
    "grace_period_secs",
    "log_level",
    "model",
    "device",
    "max_batch",
    "max_wait_ms",
    "inference_queue",
    "ca",
    "cert",
    "key",
    "crl",
    "insecure_dev",
    "tls_reload_ms",
    "lexicon",
    "dp_contributions",
    "dp_suppress_below",
    "dp_default_epsilon",
    "dp_default_delta",
    "dp_unlinked",
    "coordinator",
    "coordinator_identity",
    "publish_record_count",
    "training_policy",
    "metrics_listen",
    "metrics_public",
    "dicom_listen",
    "dicom_ae",
    "dicom_allow",
    "dicom_tls",
    "dicom_max_associations",
    "dicom_queue",
    "dicom_buffer_bytes",
    "dp_training_epsilon",
    "dp_training_delta",
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Invalid(String),
}

impl NodeConfig {
    /// Loads the layered configuration. `file` is an optional TOML file; `flags` holds only the
    /// settings given on the command line (as a partial TOML-like map).
    pub fn load(file: Option<&Path>, flags: impl Serialize) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(NodeConfig::default()));
        if let Some(file) = file {
            if !file.exists() {
                return Err(ConfigError::Invalid(format!(
                    "config file {} does not exist",
                    file.display()
                )));
            }
            figment = figment.merge(Toml::file(file));
        }
        let config: NodeConfig = figment
            // The study's TLS files under their shared names, then the node's own prefix: a
            // variable exported for a coordinator (CXRFED_COORDINATOR_*) or a client command
            // (CXRFED_NODE, CXRFED_LOG, ...) never changes a node.
            .merge(Env::prefixed(SHARED_TLS_ENV_PREFIX).only(SHARED_TLS_KEYS))
            .merge(Env::prefixed(ServerKind::Node.env_prefix()).only(KEYS))
            .merge(Serialized::defaults(flags))
            .extract()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// The record count as this site publishes it to the coordinator (see
    /// `publish_record_count`).
    pub fn published_count(&self, count: u64) -> u64 {
        match self.publish_record_count.as_str() {
            "exact" => count,
            "hundreds" => count / 100 * 100,
            _ => 0,
        }
    }

    pub fn dp_unlinked_mode(&self) -> Option<cxrfed_stats::dp::Unlinked> {
        match self.dp_unlinked.trim() {
            "exclude" => Some(cxrfed_stats::dp::Unlinked::Exclude),
            "per-image" => Some(cxrfed_stats::dp::Unlinked::PerImage),
            _ => None,
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.max_file_bytes == 0 {
            return bad("max_file_bytes must be positive".into());
        }
        if self.max_rows == 0 || self.max_columns == 0 {
            return bad("max_rows and max_columns must be positive".into());
        }
        if !(16..=2048).contains(&self.input_size) {
            return bad(format!(
                "input_size {} is outside 16..=2048",
                self.input_size
            ));
        }
        if self.aspect.parse::<cxrfed_imaging::Aspect>().is_err() {
            return bad(format!(
                "aspect {:?} must be \"pad\" or \"center-crop\"",
                self.aspect
            ));
        }
        if let Err(e) = self
            .burned_in_annotation
            .parse::<cxrfed_imaging::BurnedInPolicy>()
        {
            return bad(e);
        }
        if !matches!(self.j2k_reduced_decode.as_str(), "lossy" | "all" | "off") {
            return bad(format!(
                "j2k_reduced_decode {:?} must be \"lossy\", \"all\" or \"off\"",
                self.j2k_reduced_decode
            ));
        }
        if self.decode_memory_bytes < 16 << 20 {
            return bad("decode_memory_bytes must be at least 16 MiB".into());
        }
        if self.decode_workers == 0 {
            return bad("decode_workers must be at least 1".into());
        }
        if !(1..=1024).contains(&self.max_batch) {
            return bad(format!("max_batch {} is outside 1..=1024", self.max_batch));
        }
        if self.inference_queue == 0 {
            return bad("inference_queue must be at least 1".into());
        }
        if self.max_wait_ms > 10_000 {
            return bad(format!("max_wait_ms {} is above 10000", self.max_wait_ms));
        }
        if self.model.trim().is_empty() {
            return bad("model must be a directory, \"bundled\" or \"none\"".into());
        }
        if let Err(e) = cxrfed_auth::identity::validate_label("site", &self.site) {
            return bad(e.to_string());
        }
        if !(1..=1000).contains(&self.dp_contributions) {
            return bad(format!(
                "dp_contributions {} is outside 1..=1000",
                self.dp_contributions
            ));
        }
        if !(self.dp_default_epsilon.is_finite() && self.dp_default_epsilon >= 0.0) {
            return bad("dp_default_epsilon must be a non-negative number".into());
        }
        let training_ok = self.dp_training_epsilon.is_finite()
            && self.dp_training_epsilon >= 0.0
            && self.dp_training_delta.is_finite()
            && (0.0..1.0).contains(&self.dp_training_delta);
        if !training_ok {
            return bad("dp_training_epsilon must be >= 0 and dp_training_delta in [0, 1)".into());
        }
        if !(self.dp_default_delta.is_finite() && (0.0..1.0).contains(&self.dp_default_delta)) {
            return bad("dp_default_delta must be in [0, 1)".into());
        }
        if !matches!(
            self.publish_record_count.as_str(),
            "none" | "hundreds" | "exact"
        ) {
            return bad(format!(
                "publish_record_count {:?} must be \"none\", \"hundreds\" or \"exact\"",
                self.publish_record_count
            ));
        }
        if self.dp_unlinked_mode().is_none() {
            return bad(format!(
                "dp_unlinked {:?} must be \"exclude\" or \"per-image\"",
                self.dp_unlinked
            ));
        }
        if let Some(addr) = &self.metrics_listen {
            cxrfed_server::metrics::check_listen(addr, self.metrics_public)
                .map_err(ConfigError::Invalid)?;
        }
        if self.dicom_listen.is_some() {
            crate::receiver::validate_ae_title(&self.dicom_ae)
                .map_err(|e| ConfigError::Invalid(format!("dicom_ae: {e}")))?;
            if self.dicom_allow.is_empty() {
                return bad(
                    "dicom_listen needs dicom_allow: the calling AE titles (AE or AE@IP) that may \
                     send, or \"*\" for any"
                        .into(),
                );
            }
            for entry in &self.dicom_allow {
                entry
                    .parse::<crate::receiver::Caller>()
                    .map_err(ConfigError::Invalid)?;
            }
            if self.dicom_max_associations == 0 || self.dicom_queue == 0 {
                return bad("dicom_max_associations and dicom_queue must be at least 1".into());
            }
            if self.dicom_buffer_bytes < self.max_file_bytes {
                // Otherwise an instance of allowed size could never fit and would be refused
                // as "retry later" for ever.
                return bad(format!(
                    "dicom_buffer_bytes ({}) must be at least max_file_bytes ({})",
                    self.dicom_buffer_bytes, self.max_file_bytes
                ));
            }
            if self.dicom_tls && self.insecure_dev {
                return bad(
                    "dicom_tls needs the node's certificate; not with --insecure-dev".into(),
                );
            }
        }
        if let Some(url) = &self.coordinator
            && !url.starts_with("https://")
        {
            return bad(format!(
                "coordinator {url:?} must be an https:// URL (the link is mutual TLS)"
            ));
        }
        if self.coordinator.is_some() && self.insecure_dev {
            return bad(
                "--coordinator needs mutual TLS; it cannot be used with --insecure-dev".into(),
            );
        }
        if !(100..=3_600_000).contains(&self.tls_reload_ms) {
            return bad(format!(
                "tls_reload_ms {} is outside 100..=3600000",
                self.tls_reload_ms
            ));
        }
        if self.insecure_dev {
            if !self.listen.ip().is_loopback() {
                return bad(format!(
                    "--insecure-dev serves plaintext without authentication and is refused on the \
                     non-loopback address {}; listen on 127.0.0.1 or use mTLS (--ca/--cert/--key)",
                    self.listen
                ));
            }
            if self.cert.is_some() || self.key.is_some() {
                return bad("--insecure-dev and --cert/--key exclude each other".into());
            }
        } else {
            self.tls_paths()?;
        }
        Ok(())
    }

    /// The TLS files (all of ca, cert and key are required unless `insecure_dev`).
    pub fn tls_paths(&self) -> Result<cxrfed_auth::TlsPaths, ConfigError> {
        cxrfed_auth::TlsPaths::configured(
            self.ca.as_ref(),
            self.cert.as_ref(),
            self.key.as_ref(),
            self.crl.as_ref(),
        )
        .ok_or_else(|| {
            ConfigError::Invalid(
                "the node serves mutual TLS only: give --ca, --cert and --key (or ca/cert/key in \
                 the config file, CXRFED_CA/CXRFED_CERT/CXRFED_KEY); `cxrfed certs --help` \
                 creates them. For a loopback-only development node without TLS, pass \
                 --insecure-dev"
                    .into(),
            )
        })
    }

    /// The files of the node's data directory.
    pub fn layout(&self) -> Layout {
        ServerKind::Node.layout(&self.data_dir)
    }

    pub fn store_dir(&self) -> PathBuf {
        self.layout().store_dir()
    }

    pub fn secret_path(&self) -> PathBuf {
        self.layout().secret_path()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn the_deployment_examples_parse() {
        let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/config");
        let config = NodeConfig::load(
            Some(&deploy.join("node.toml")),
            BTreeMap::<String, String>::new(),
        )
        .expect("deploy/config/node.toml");
        assert_eq!(config.publish_record_count, "none");
        assert_eq!(
            config.dicom_listen,
            Some("0.0.0.0:11112".parse().expect("address"))
        );
        assert!(config.dicom_tls);
        let policy = std::fs::read_to_string(deploy.join("training-policy.toml")).expect("policy");
        let policy =
            cxrfed_fl::SitePolicy::parse(&policy).expect("deploy/config/training-policy.toml");
        assert!(!policy.enabled, "the example opts in explicitly");
    }

    #[test]
    fn a_site_publishes_no_finer_record_count_than_it_chose() {
        let mut config = NodeConfig::default();
        assert_eq!(config.published_count(1234), 0, "none by default");
        config.publish_record_count = "hundreds".into();
        assert_eq!(config.published_count(1234), 1200);
        assert_eq!(config.published_count(99), 0);
        config.publish_record_count = "exact".into();
        assert_eq!(config.published_count(1234), 1234);
        config.publish_record_count = "some".into();
        assert!(config.validate().is_err());
    }

    #[test]
    // figment's Jail API fixes the closure's error type.
    #[allow(clippy::result_large_err)]
    fn flags_override_file_and_env() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("node.toml");
        std::fs::write(
            &file,
            "site = \"from-file\"\ninput_size = 256\nmax_rows = 100\ninsecure_dev = true\n",
        )
        .expect("write");
        figment::Jail::expect_with(|jail| {
            jail.set_env("CXRFED_NODE_INPUT_SIZE", "320");
            // Client-side variables share the prefix and are not node settings.
            jail.set_env("CXRFED_NODE", "http://127.0.0.1:1");
            jail.set_env("CXRFED_LOG", "debug");
            // A coordinator's variables and the old unprefixed names change no node.
            jail.set_env("CXRFED_COORDINATOR_DATA_DIR", "/elsewhere");
            jail.set_env("CXRFED_DATA_DIR", "/elsewhere");
            jail.set_env("CXRFED_MAX_COLUMNS", "7");
            let mut flags = BTreeMap::new();
            flags.insert("max_rows", 200);
            let config = NodeConfig::load(Some(&file), &flags).expect("load");
            assert_eq!(config.site, "from-file");
            assert_eq!(config.input_size, 320);
            assert_eq!(config.max_rows, 200);
            assert_eq!(config.data_dir, default_data_dir());
            assert_eq!(config.max_columns, NodeConfig::default().max_columns);
            Ok(())
        });
    }

    #[test]
    fn keys_name_every_field() {
        let value = serde_json::to_value(NodeConfig::default()).expect("serialize");
        let mut fields: Vec<&str> = value
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        let mut keys = KEYS.to_vec();
        fields.sort_unstable();
        keys.sort_unstable();
        assert_eq!(fields, keys);
    }

    #[test]
    fn invalid_values_are_refused_with_a_reason() {
        let mut flags = BTreeMap::new();
        flags.insert("aspect", "stretch");
        let err = NodeConfig::load(None, &flags).expect_err("invalid");
        assert!(err.to_string().contains("aspect"), "{err}");
    }

    #[test]
    fn metrics_stay_on_loopback_unless_made_public() {
        let mut config = NodeConfig {
            insecure_dev: true,
            metrics_listen: Some("0.0.0.0:9464".parse().expect("address")),
            ..NodeConfig::default()
        };
        let err = config.validate().expect_err("not loopback");
        assert!(err.to_string().contains("metrics_public"), "{err}");
        config.metrics_public = true;
        config.validate().expect("public on purpose");
        config.metrics_public = false;
        config.metrics_listen = Some("127.0.0.1:9464".parse().expect("address"));
        config.validate().expect("loopback");
    }

    #[test]
    fn the_dicom_receiver_needs_an_allow_list_and_valid_titles() {
        let mut config = NodeConfig {
            insecure_dev: true,
            dicom_listen: Some("127.0.0.1:11112".parse().expect("address")),
            ..NodeConfig::default()
        };
        let err = config.validate().expect_err("no allow-list");
        assert!(err.to_string().contains("dicom_allow"), "{err}");
        config.dicom_allow = vec!["PACS@10.0.0.5".into(), "*".into()];
        config.validate().expect("valid");
        config.dicom_allow = vec!["PACS@pacs.example".into()];
        let err = config.validate().expect_err("a host name, not an address");
        assert!(err.to_string().contains("not an IP address"), "{err}");
        config.dicom_allow = vec!["PACS".into()];
        config.dicom_ae = "A-TITLE-LONGER-THAN-16".into();
        assert!(config.validate().is_err());
        config.dicom_ae = "CXRFED".into();
        config.dicom_buffer_bytes = config.max_file_bytes - 1;
        let err = config.validate().expect_err("buffers below one file");
        assert!(err.to_string().contains("max_file_bytes"), "{err}");
        config.dicom_buffer_bytes = config.max_file_bytes;
        config.dicom_tls = true;
        let err = config.validate().expect_err("TLS without certificates");
        assert!(err.to_string().contains("insecure-dev"), "{err}");
    }

    #[test]
    fn tls_is_required_unless_insecure_dev_on_loopback() {
        let flags: BTreeMap<&str, &str> = BTreeMap::new();
        let err = NodeConfig::load(None, &flags).expect_err("no TLS files");
        assert!(err.to_string().contains("--insecure-dev"), "{err}");

        let mut flags = BTreeMap::new();
        flags.insert("insecure_dev", serde_json::json!(true));
        flags.insert("listen", serde_json::json!("0.0.0.0:50051"));
        let err = NodeConfig::load(None, &flags).expect_err("non-loopback");
        assert!(err.to_string().contains("non-loopback"), "{err}");

        flags.insert("listen", serde_json::json!("127.0.0.1:50051"));
        NodeConfig::load(None, &flags).expect("loopback dev node");
    }
}
