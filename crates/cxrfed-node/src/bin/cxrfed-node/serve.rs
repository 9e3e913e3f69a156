//! `cxrfed-node serve` (reached as `cxrfed node serve`): the node's gRPC server in the
//! foreground, or detached.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use cxrfed_node::NodeConfig;
use cxrfed_server::process;
use serde::Serialize;

#[derive(Debug, Args, Serialize)]
pub struct ServeArgs {
    /// TOML configuration file (keys as in NodeConfig: data_dir, listen, site, max_file_bytes, ...).
    #[arg(long, env = "CXRFED_NODE_CONFIG")]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Data directory (store, site secret, logs, PID file) [default: ~/.local/share/cxrfed/node].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir: Option<PathBuf>,
    /// Listen address [default: 127.0.0.1:50051].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<SocketAddr>,
    /// Site name [default: local].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    site: Option<String>,
    /// Largest accepted upload in bytes [default: 268435456].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_file_bytes: Option<u64>,
    /// Largest accepted image rows [default: 8192].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_rows: Option<u32>,
    /// Largest accepted image columns [default: 8192].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_columns: Option<u32>,
    /// Model input size in pixels [default: 224].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    input_size: Option<u32>,
    /// Aspect handling for the model input: pad or center-crop [default: pad].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    aspect: Option<String>,
    /// JPEG 2000 at the lowest resolution covering the model input: lossy, all or off
    /// [default: lossy]. `all` reduces lossless J2K too, whose identity is then its codestream
    /// (no de-duplication against an uncompressed copy).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    j2k_reduced_decode: Option<String>,
    /// Images decoded concurrently [default: number of CPUs].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    decode_workers: Option<usize>,
    /// Seconds in-flight requests get after SIGTERM [default: 20].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    grace_period_secs: Option<u64>,
    /// Log filter, e.g. info or debug [default: info].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    log_level: Option<String>,
    /// Model directory (card.json + weights), "bundled" (the phantom-trained tiny model built
    /// into the binary) or "none" [default: bundled].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<String>,
    /// Inference device: auto (CUDA when available), cpu, cuda, cuda:N [default: auto].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<String>,
    /// Largest inference batch [default: 16].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_batch: Option<usize>,
    /// Longest wait for an inference batch to fill, ms [default: 5].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_wait_ms: Option<u64>,
    /// Requests that may wait for inference before RESOURCE_EXHAUSTED [default: 64].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    inference_queue: Option<usize>,
    /// The study CA certificate client certificates must chain to (PEM).
    #[arg(long, env = "CXRFED_CA")]
    #[serde(skip_serializing_if = "Option::is_none")]
    ca: Option<PathBuf>,
    /// The node's certificate (PEM, role node; `cxrfed certs issue --role node`).
    #[arg(long, env = "CXRFED_CERT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    cert: Option<PathBuf>,
    /// The node's private key (PEM; refused unless mode 0600 or stricter).
    #[arg(long, env = "CXRFED_KEY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<PathBuf>,
    /// The study CA's revocation list [default: crl.pem next to --ca, when present].
    #[arg(long, env = "CXRFED_CRL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    crl: Option<PathBuf>,
    /// Plaintext gRPC without client authentication, every caller treated as the site admin.
    /// Development only; refused on a non-loopback address.
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    insecure_dev: bool,
    /// How often certificate, key, CA and CRL files are checked for changes, ms [default: 2000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_reload_ms: Option<u64>,
    /// Records one patient may contribute to a DP release (k) [default: 1].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    dp_contributions: Option<u32>,
    /// Noisy DP counts below this are withheld [default: 10].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    dp_suppress_below: Option<u64>,
    /// Epsilon budget of identities the admin has not set one for [default: 0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    dp_default_epsilon: Option<f64>,
    /// The study coordinator to dial out to (https://HOST:PORT) for federated queries.
    #[arg(long, env = "CXRFED_COORDINATOR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    coordinator: Option<String>,
    /// Accept only this coordinator: its identity URI or certificate SHA-256 fingerprint.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    coordinator_identity: Option<String>,
    /// What the coordinator is told of the record count: none, hundreds or exact
    /// [default: none].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    publish_record_count: Option<String>,
    /// Serve /metrics (Prometheus text for operators) on this address, e.g. 127.0.0.1:9464.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics_listen: Option<SocketAddr>,
    /// Run a DICOM receiver (C-ECHO, C-STORE SCP) on this address, e.g. 0.0.0.0:11112.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    dicom_listen: Option<SocketAddr>,
    /// The DICOM receiver's AE title [default: CXRFED].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    dicom_ae: Option<String>,
    /// A calling AE title allowed to send: AE, AE@IP or * (repeatable; required with
    /// --dicom-listen).
    #[arg(long = "dicom-allow")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    dicom_allow: Vec<String>,
    /// DICOM TLS on the receiver with the node's certificate.
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    dicom_tls: bool,
    /// Received DICOM instances in processing at once before A700 (out of resources)
    /// [default: 16].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    dicom_queue: Option<usize>,
    /// Start in the background and return once the node accepts connections.
    #[arg(long)]
    #[serde(skip)]
    detach: bool,
}

pub fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let config = NodeConfig::load(args.config.as_deref(), &args)?;
    process::Launch {
        layout: config.layout(),
        listen: config.listen,
        log_level: config.log_level.clone(),
        tls: !config.insecure_dev,
        detach: args.detach,
    }
    .run(|listener, bound, shutdown| {
        let mut config = config;
        config.listen = bound;
        cxrfed_node::serve(config, listener, shutdown)
    })
}
