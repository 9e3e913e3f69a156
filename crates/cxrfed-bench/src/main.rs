//! `cxrfed-bench`: the Rust side of the imaging benchmark. Runs the node's per-image path —
//! read the file, decode, de-identify, hash the pixels, preprocess to the model input — and
//! prints JSON for `bench/imaging.py`, which runs the Python peers side by side and writes the
//! table. Timing lives here, never in tests.
//!
//! Architecture invariant: cxrfed-bench is never a dependency of anything; it links the node
//! and the model crate.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand};
use cxrfed_imaging::{Limits, PreprocessOptions, SiteSecret};

/// mimalloc keeps freed pages for reuse: every image allocates several full-resolution
/// buffers, which glibc would map and page-fault afresh each time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(about = "Imaging benchmark driver (use bench/imaging.py to compare with Python peers)")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// The model inputs of a phantom folder exactly as a node keeps them (decode, de-identify,
    /// preprocess to 224 x 224, 8-bit): `inputs.u8` (N x 224 x 224) and `index.json` (file
    /// names in order), for peers that must train on the same data.
    Inputs {
        #[arg(long)]
        folder: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Single-image latency on one thread.
    Latency {
        #[arg(long)]
        file: PathBuf,
        #[arg(long, default_value_t = 30)]
        iterations: usize,
        /// Write the model input of the last iteration here (raw little-endian f32, 224x224).
        #[arg(long)]
        dump: Option<PathBuf>,
    },
    /// Throughput with one worker thread per core.
    Throughput {
        #[arg(long)]
        file: PathBuf,
        #[arg(long, default_value_t = 40)]
        images: usize,
        #[arg(long, default_value_t = 2)]
        workers: usize,
    },
    /// Save a randomly initialised model of an architecture (weights for the model benchmark).
    ModelInit {
        #[arg(long)]
        arch: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 224)]
        input_size: u32,
    },
    /// Pure forward throughput of a model at one batch size (eval mode, no grad).
    Forward {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        batch: usize,
        /// Timed repeats; the median is reported.
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        /// Images per repeat (rounded up to whole batches).
        #[arg(long, default_value_t = 64)]
        images: usize,
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Write the logits for the reference input (linspace -1..1) here as JSON.
        #[arg(long)]
        reference: Option<PathBuf>,
    },
    /// End-to-end extraction throughput of a running node under concurrent clients
    /// (upload + decode + infer + store; `force` so every upload is processed).
    Node {
        #[arg(long)]
        url: String,
        /// DICOM files to upload, round-robin.
        #[arg(long, num_args = 1..)]
        files: Vec<PathBuf>,
        #[arg(long, default_value_t = 128)]
        images: usize,
        #[arg(long, default_value_t = 32)]
        clients: usize,
        /// Client profile for an https:// node (mutual TLS).
        #[arg(long)]
        profile: Option<PathBuf>,
    },
    /// The ceiling `node` is measured against: the node's own extraction pipeline (decode,
    /// de-identify, hash, preprocess on the blocking pool, batched inference), in process, with
    /// the node's worker settings and `concurrency` requests in flight, on files already in
    /// memory. No transport, no store: what the node could do if upload and storage were free.
    Limit {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, num_args = 1..)]
        files: Vec<PathBuf>,
        #[arg(long, default_value_t = 128)]
        images: usize,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        #[arg(long, default_value_t = 32)]
        max_batch: usize,
        #[arg(long, default_value_t = 50)]
        max_wait_ms: u64,
        /// The node's decode workers (default: the node's, one per core).
        #[arg(long)]
        decode_workers: Option<usize>,
        /// The node's `j2k_reduced_decode` (lossy, all or off).
        #[arg(long, default_value = "lossy")]
        j2k_reduced_decode: String,
    },
    /// Exact statistics over synthetic records held in the node's columnar form: builds
    /// `records` records (deterministic), writes them as CSV for pandas when `--csv` is given,
    /// and times the query (parse + bind + one pass) `repeats` times.
    Stats {
        #[arg(long, default_value_t = 1_000_000)]
        records: usize,
        #[arg(long)]
        query: String,
        #[arg(long, default_value_t = 20)]
        repeats: usize,
        #[arg(long)]
        csv: Option<PathBuf>,
        /// Also time the DP release of the same query at this epsilon (discrete Laplace, no
        /// suppression) and measure its error against the exact counts of the bounded data.
        #[arg(long)]
        dp_epsilon: Option<f64>,
        /// Records per patient in the DP release (k).
        #[arg(long, default_value_t = 1)]
        dp_k: u32,
    },
    /// Federated query latency against the number of sites (in-process coordinator and
    /// sites on loopback, mutual TLS, signed queries), and the pooled error against a central
    /// release of the same query.
    Federation {
        /// Site counts to measure, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "3,10,30")]
        sites: Vec<usize>,
        #[arg(long, default_value_t = 20_000)]
        records: usize,
        #[arg(long, default_value_t = 20)]
        queries: usize,
        #[arg(long, default_value_t = 1.0)]
        epsilon: f64,
    },
    /// Connection set-up cost: `count` sequential fresh connections, each with one Status call
    /// (TCP + TLS 1.3 handshake with client certificate + HTTP/2 + first RPC).
    Connect {
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 50)]
        count: usize,
        #[arg(long)]
        profile: Option<PathBuf>,
    },
}

mod bench_federation;

/// A deterministic synthetic record: skewed categorical findings, ages, views, months.
fn synthetic_record(i: usize) -> cxrfed_schema::Record {
    use cxrfed_schema::*;
    let mut state = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut next = |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    };
    let quality = ImageQuality::ALL[[0, 0, 1, 1, 1, 2, 2, 3][next(8) as usize]];
    let confidence = AnalysisConfidence::ALL[[0, 0, 0, 1, 1, 2, 3][next(7) as usize]];
    let findings = Findings {
        image_quality: Some(Scored {
            value: quality,
            probability: 0.8,
        }),
        analysis_confidence: Some(Scored {
            value: confidence,
            probability: 0.7,
        }),
        mediastinum: Mediastinum {
            cardiothoracic_ratio: Some(Measured {
                value: 0.35 + next(30) as f64 / 100.0,
                confidence: 0.9,
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    Record {
        record_id: format!("{i}"),
        image_sha256: format!("{i:064x}"),
        schema_version: 1,
        model_id: "bench".into(),
        model_sha256: String::new(),
        created_at: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default(),
        processing_ms: 1.0,
        request_id: String::new(),
        source: Source {
            modality: "DX".into(),
            rows: 2048,
            columns: 2048,
            ..Default::default()
        },
        patient: Patient {
            pseudonym: format!("p{}", next(400_000)),
            age_group: flat::AGE_GROUPS[2 + next(8) as usize].to_string(),
            sex: if next(2) == 0 { Sex::Female } else { Sex::Male },
        },
        acquisition: Acquisition {
            month: format!("{}-{:02}", 2018 + next(6), 1 + next(12)),
            view: [View::Pa, View::Pa, View::Ap, View::Ll][next(4) as usize],
        },
        findings: Some(findings),
        processing_notes: Vec::new(),
        questions: Vec::new(),
        annotations: Vec::new(),
        custom_fields: Default::default(),
        model_fields: Default::default(),
    }
}

/// DP release timings and errors over `repeats` releases: p50/p99 latency (plan + bounding +
/// opendp measurement + post-processing), and per cell the error against the exact count of the
/// bounded rows, next to what the discrete Laplace distribution predicts (mean |X| =
/// 2q / (1 - q^2), q = exp(-1/scale); relative error = |X| / true count, averaged over cells).
fn dp_bench(
    columns: &cxrfed_stats::Columns,
    query: &str,
    repeats: usize,
    epsilon: f64,
    k: u32,
) -> anyhow::Result<serde_json::Value> {
    use cxrfed_stats::dp;
    let params = dp::DpParams {
        epsilon,
        delta: 0.0,
        mechanism: dp::Mechanism::Laplace,
        contributions: k,
        suppress_below: 0,
        unlinked: dp::Unlinked::Exclude,
        selection_secret: [42; 32],
        raw: false,
    };
    let plan = dp::plan(columns, cxrfed_stats::query::parse(query)?, &params)?;
    let truth = plan.noiseless(columns)?;
    let mut millis = Vec::new();
    let (mut abs_errors, mut rel_errors, mut within) = (Vec::new(), Vec::new(), 0usize);
    let mut scale = 0.0;
    let mut bound = 0.0;
    for _ in 0..repeats {
        let t = Instant::now();
        let release = dp::release(columns, cxrfed_stats::query::parse(query)?, &params)?;
        millis.push(t.elapsed().as_secs_f64() * 1000.0);
        scale = release.noise_scale;
        for (noisy_row, true_row) in release.rows.iter().zip(&truth.rows) {
            for (noisy, exact) in noisy_row.values.iter().zip(&true_row.values) {
                // Empty cells are clamped at 0, which shrinks their error: leave them out.
                let (Some(n), Some(x)) = (noisy.value, exact.value.filter(|&x| x > 0.0)) else {
                    continue;
                };
                bound = noisy.error_bound;
                let error = (n - x).abs();
                abs_errors.push(error);
                within += usize::from(error < noisy.error_bound);
                rel_errors.push(error / x);
            }
        }
    }
    millis.sort_by(f64::total_cmp);
    // Theory: |X| for discrete Laplace of scale b has mean 2q / (1 - q^2), q = exp(-1/b).
    let q = (-1.0 / scale).exp();
    let theory_abs = 2.0 * q / (1.0 - q * q);
    let true_counts: Vec<f64> = truth
        .rows
        .iter()
        .flat_map(|r| r.values.iter().filter_map(|v| v.value))
        .filter(|&x| x > 0.0)
        .collect();
    let theory_rel: Vec<f64> = true_counts.iter().map(|x| theory_abs / x).collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    Ok(serde_json::json!({
        "epsilon": epsilon, "k": k, "noise_scale": scale, "error_bound_95": bound,
        "p50_ms": percentile(&millis, 50.0), "p99_ms": percentile(&millis, 99.0),
        "cells": true_counts.len(), "bounded_rows": plan.bounded_rows(columns).len(),
        "mean_abs_error": mean(&abs_errors), "theory_mean_abs_error": theory_abs,
        "mean_rel_error": mean(&rel_errors), "theory_mean_rel_error": mean(&theory_rel),
        "smallest_cell": true_counts.iter().copied().fold(f64::INFINITY, f64::min),
        "within_bound": within as f64 / abs_errors.len().max(1) as f64,
    }))
}

fn stats_bench(
    records: usize,
    query: &str,
    repeats: usize,
    csv: Option<PathBuf>,
    dp: Option<(f64, u32)>,
) -> anyhow::Result<serde_json::Value> {
    let started = Instant::now();
    let mut columns = cxrfed_stats::Columns::new();
    let mut writer = csv.map(csv::Writer::from_path).transpose()?;
    if let Some(w) = writer.as_mut() {
        w.write_record([
            "image_quality",
            "analysis_confidence",
            "age_group",
            "view",
            "month",
            "cardiothoracic_ratio",
            "patient_pseudonym",
            "image_sha256",
        ])?;
    }
    for i in 0..records {
        let record = synthetic_record(i);
        columns.upsert(&record);
        if let Some(w) = writer.as_mut() {
            let f = record.findings.as_ref();
            w.write_record([
                f.and_then(|f| f.image_quality)
                    .map(|s| s.value.as_str())
                    .unwrap_or(""),
                f.and_then(|f| f.analysis_confidence)
                    .map(|s| s.value.as_str())
                    .unwrap_or(""),
                record.patient.age_group.as_str(),
                record.acquisition.view.as_str(),
                record.acquisition.month.as_str(),
                &f.and_then(|f| f.mediastinum.cardiothoracic_ratio)
                    .map(|m| (m.value as f32).to_string())
                    .unwrap_or_default(),
                record.patient.pseudonym.as_str(),
                record.image_sha256.as_str(),
            ])?;
        }
    }
    if let Some(mut w) = writer {
        w.flush()?;
    }
    let build_s = started.elapsed().as_secs_f64();
    let mut millis = Vec::new();
    let mut table = None;
    for _ in 0..repeats {
        let t = Instant::now();
        table = Some(cxrfed_stats::exact(&columns, query)?);
        millis.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    millis.sort_by(f64::total_cmp);
    let dp = dp
        .map(|(epsilon, k)| dp_bench(&columns, query, repeats, epsilon, k))
        .transpose()?;
    Ok(serde_json::json!({
        "records": records, "build_s": build_s, "p50_ms": percentile(&millis, 50.0),
        "p99_ms": percentile(&millis, 99.0), "cohort": table.map(|t| t.cohort_size),
        "dp": dp,
    }))
}

fn credentials(profile: Option<&Path>) -> anyhow::Result<Option<cxrfed_auth::ClientCredentials>> {
    let Some(path) = profile else {
        return Ok(None);
    };
    let profile = cxrfed_auth::client::Profile::load(path)?;
    Ok(cxrfed_auth::client::credentials(
        Some(&profile),
        None,
        None,
        None,
    ))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

async fn connect_bench(
    url: String,
    count: usize,
    profile: Option<PathBuf>,
) -> anyhow::Result<serde_json::Value> {
    let credentials = credentials(profile.as_deref())?;
    let mut millis = Vec::with_capacity(count);
    for _ in 0..count {
        let start = Instant::now();
        let channel = cxrfed_auth::client::connect(&url, credentials.as_ref()).await?;
        cxrfed_proto::v1::node_service_client::NodeServiceClient::new(channel)
            .status(cxrfed_proto::v1::StatusRequest {})
            .await?;
        millis.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    millis.sort_by(f64::total_cmp);
    Ok(serde_json::json!({
        "count": count, "p50_ms": percentile(&millis, 50.0), "p99_ms": percentile(&millis, 99.0),
    }))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn forward_bench(
    model: &std::path::Path,
    batch: usize,
    repeats: usize,
    images: usize,
    device: &str,
    reference: Option<PathBuf>,
) -> anyhow::Result<serde_json::Value> {
    let device = cxrfed_model::parse_device(device)?;
    let model = cxrfed_model::Model::load(model, device)?;
    if let Some(path) = reference {
        std::fs::write(
            path,
            serde_json::to_vec(&cxrfed_model::reference_logits(&model)?)?,
        )?;
    }
    let rates = cxrfed_model::forward_throughput(&model, batch, repeats, images)?;
    Ok(serde_json::json!({
        "images_per_s": median(rates.clone()), "samples": rates, "batch": batch,
        "threads": cxrfed_model::torch_threads(), "device": cxrfed_model::device_name(device),
    }))
}

/// Every client has its own connection (its own TLS session), as separate users would.
async fn node_bench(
    url: String,
    files: Vec<PathBuf>,
    images: usize,
    clients: usize,
    profile: Option<PathBuf>,
) -> anyhow::Result<serde_json::Value> {
    use cxrfed_proto::v1 as pb;
    let payloads: Vec<Vec<u8>> = files.iter().map(std::fs::read).collect::<Result<_, _>>()?;
    anyhow::ensure!(!payloads.is_empty(), "no files");
    let credentials = credentials(profile.as_deref())?;
    let mut connections = Vec::with_capacity(clients);
    for _ in 0..clients {
        let channel = cxrfed_auth::client::connect(&url, credentials.as_ref()).await?;
        connections.push(
            cxrfed_proto::v1::node_service_client::NodeServiceClient::new(channel)
                .max_decoding_message_size(64 * 1024 * 1024),
        );
    }
    let client = connections[0].clone();
    // Every upload is slices of one buffer per file, built before the clock starts: a request
    // copies nothing on the client, so the client's share of the 2 cores is the transport's.
    let messages: Vec<Vec<pb::ExtractRequest>> = payloads
        .into_iter()
        .map(|bytes| cxrfed_proto::upload(bytes.into(), "bench.dcm", true, 1024 * 1024))
        .collect();
    // Warm-up: one image per file.
    for upload in &messages {
        client
            .clone()
            .extract(tokio_stream::iter(upload.clone()))
            .await?;
    }
    let next = std::sync::Arc::new(AtomicUsize::new(0));
    let messages = std::sync::Arc::new(messages);
    let start = Instant::now();
    let cpu_start = cpu_seconds();
    let mut tasks = Vec::new();
    for mut client in connections {
        let (next, messages) = (next.clone(), messages.clone());
        tasks.push(tokio::spawn(async move {
            let mut refused = 0usize;
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= images {
                    break;
                }
                let msgs = messages[i % messages.len()].clone();
                let sent = Instant::now();
                match client.extract(tokio_stream::iter(msgs)).await {
                    Ok(_) => latencies.push(sent.elapsed().as_secs_f64() * 1000.0),
                    Err(status) => {
                        anyhow::ensure!(
                            status.code() == tonic::Code::ResourceExhausted,
                            "{status}"
                        );
                        refused += 1;
                    }
                }
            }
            Ok::<(usize, Vec<f64>), anyhow::Error>((refused, latencies))
        }));
    }
    let mut refused = 0;
    let mut latencies = Vec::new();
    for t in tasks {
        let (r, l) = t.await??;
        refused += r;
        latencies.extend(l);
    }
    let seconds = start.elapsed().as_secs_f64();
    // The client shares the machine with the node: its CPU over the timed window says how much
    // of the cores the node did not have.
    let client_cpu = cpu_seconds() - cpu_start;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    latencies.sort_by(f64::total_cmp);
    Ok(serde_json::json!({
        "images_per_s": (images - refused) as f64 / seconds, "seconds": seconds, "refused": refused,
        "clients": clients, "images": images,
        "client_cpu_s": client_cpu, "client_share": client_cpu / (seconds * cores),
        "p50_ms": percentile(&latencies, 50.0), "p99_ms": percentile(&latencies, 99.0),
    }))
}

/// Settings of [`Mode::Limit`].
struct LimitRun {
    model: PathBuf,
    files: Vec<PathBuf>,
    images: usize,
    concurrency: usize,
    config: cxrfed_node::NodeConfig,
}

async fn limit_bench(run: LimitRun) -> anyhow::Result<serde_json::Value> {
    use std::sync::Arc;
    let config = run.config;
    let model = cxrfed_model::Model::load(&run.model, cxrfed_model::parse_device("cpu")?)?;
    let handle =
        cxrfed_model::InferenceHandle::spawn(model, cxrfed_node::models::worker_config(&config))?;
    let pipeline = Arc::new(cxrfed_node::pipeline::Pipeline::new(
        &config,
        SiteSecret::from_bytes([42; 32]),
        Some(handle.clone()),
    ));
    let files: Vec<tonic::codegen::Bytes> = run
        .files
        .iter()
        .map(|f| std::fs::read(f).map(Into::into))
        .collect::<Result<_, _>>()?;
    anyhow::ensure!(!files.is_empty(), "no files");
    // Warm-up: one image per file.
    for bytes in &files {
        pipeline.extract(bytes.clone(), String::new()).await?;
    }
    let before = handle.stats();
    let next = Arc::new(AtomicUsize::new(0));
    let files = Arc::new(files);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..run.concurrency {
        let (next, files, pipeline) = (next.clone(), files.clone(), pipeline.clone());
        let images = run.images;
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= images {
                    return Ok::<(), cxrfed_node::NodeError>(());
                }
                pipeline
                    .extract(files[i % files.len()].clone(), String::new())
                    .await?;
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    let seconds = start.elapsed().as_secs_f64();
    let after = handle.stats();
    let batches = after.batches - before.batches;
    Ok(serde_json::json!({
        "images_per_s": run.images as f64 / seconds, "seconds": seconds, "images": run.images,
        "concurrency": run.concurrency, "decode_workers": config.decode_workers,
        "mean_batch": (after.images - before.images) as f64 / batches.max(1) as f64,
        "threads": cxrfed_model::torch_threads(),
    }))
}

fn process(path: &Path, secret: &SiteSecret) -> anyhow::Result<ndarray::Array2<f32>> {
    let bytes = std::fs::read(path)?;
    let decoded = cxrfed_imaging::decode_contained(&bytes, &Limits::default(), secret)?;
    drop(bytes);
    let hash = decoded.pixel_sha256();
    std::hint::black_box(hash);
    Ok(cxrfed_imaging::preprocess(
        &decoded,
        &PreprocessOptions::default(),
    ))
}

/// CPU seconds (user + system) this process has used so far, from /proc/self/stat (whose times
/// are in USER_HZ, 100 per second on Linux whatever the kernel's tick).
fn cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
            let rest = s.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let ticks =
                fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
            Some(ticks / 100.0)
        })
        .unwrap_or(f64::NAN)
}

/// Peak resident set size of this process in MiB (VmHWM).
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn main() -> anyhow::Result<()> {
    let secret = SiteSecret::from_bytes([42; 32]);
    let baseline = peak_rss_mib();
    match Cli::parse().mode {
        Mode::Inputs { folder, out } => {
            let spec = cxrfed_model::InputSpec::default();
            let options = cxrfed_model::preprocess_options(&spec);
            let data = cxrfed_model::Dataset::from_labels_folder(
                &folder,
                &cxrfed_model::LabelMap::schema_v1(),
                &options,
                &["dicom"],
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            )?;
            std::fs::create_dir_all(&out)?;
            let mut bytes = Vec::with_capacity(data.len() * (options.size as usize).pow(2));
            let side = options.size as usize;
            for sample in &data.samples {
                let input = ndarray::Array2::from_shape_vec((side, side), sample.input.clone())?;
                bytes.extend(cxrfed_node::pipeline::quantise(&input, &options).1);
            }
            std::fs::write(out.join("inputs.u8"), bytes)?;
            let names: Vec<&str> = data.samples.iter().map(|s| s.name.as_str()).collect();
            std::fs::write(
                out.join("index.json"),
                serde_json::to_vec(&serde_json::json!({"size": options.size, "files": names}))?,
            )?;
            println!(
                "{}",
                serde_json::json!({"images": data.len(), "size": options.size})
            );
        }
        Mode::ModelInit {
            arch,
            out,
            input_size,
        } => {
            let arch = cxrfed_model::Arch::parse(&arch).context("architecture")?;
            cxrfed_model::manual_seed(0);
            let input = cxrfed_model::InputSpec {
                size: input_size,
                ..Default::default()
            };
            let mut model = cxrfed_model::Model::new(
                arch,
                cxrfed_model::LabelMap::schema_v1(),
                input,
                cxrfed_model::parse_device("cpu")?,
                &format!("bench-{}", arch.as_str()),
            )?;
            model.card.intended_use = "benchmark weights (random initialisation)".into();
            model.save(&out)?;
        }
        Mode::Forward {
            model,
            batch,
            repeats,
            images,
            device,
            reference,
        } => {
            println!(
                "{}",
                forward_bench(&model, batch, repeats, images, &device, reference)?
            );
        }
        Mode::Stats {
            records,
            query,
            repeats,
            csv,
            dp_epsilon,
            dp_k,
        } => {
            let dp = dp_epsilon.map(|e| (e, dp_k));
            println!("{}", stats_bench(records, &query, repeats, csv, dp)?);
        }
        Mode::Federation {
            sites,
            records,
            queries,
            epsilon,
        } => {
            // Enough workers that 30 sites' sled calls never starve the coordinator.
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(8)
                .enable_all()
                .build()?;
            println!(
                "{}",
                runtime.block_on(bench_federation::run(&sites, records, queries, epsilon))?
            );
        }
        Mode::Connect {
            url,
            count,
            profile,
        } => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            println!("{}", runtime.block_on(connect_bench(url, count, profile))?);
        }
        Mode::Node {
            url,
            files,
            images,
            clients,
            profile,
        } => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            println!(
                "{}",
                runtime.block_on(node_bench(url, files, images, clients, profile))?
            );
        }
        Mode::Limit {
            model,
            files,
            images,
            concurrency,
            max_batch,
            max_wait_ms,
            decode_workers,
            j2k_reduced_decode,
        } => {
            let defaults = cxrfed_node::NodeConfig::default();
            let config = cxrfed_node::NodeConfig {
                max_batch,
                max_wait_ms,
                inference_queue: 512,
                j2k_reduced_decode,
                decode_workers: decode_workers.unwrap_or(defaults.decode_workers),
                ..defaults
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let run = LimitRun {
                model,
                files,
                images,
                concurrency,
                config,
            };
            println!("{}", runtime.block_on(limit_bench(run))?);
        }
        Mode::Latency {
            file,
            iterations,
            dump,
        } => {
            process(&file, &secret).context("warm-up")?;
            let mut times = Vec::with_capacity(iterations);
            let mut last = None;
            for _ in 0..iterations {
                let start = Instant::now();
                let out = process(&file, &secret)?;
                times.push(start.elapsed().as_secs_f64() * 1000.0);
                last = Some(out);
            }
            if let (Some(path), Some(out)) = (dump, last) {
                let bytes: Vec<u8> = out.iter().flat_map(|v| v.to_le_bytes()).collect();
                std::fs::write(path, bytes)?;
            }
            times.sort_by(f64::total_cmp);
            let q = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize];
            println!(
                "{}",
                serde_json::json!({
                    "median_ms": q(0.5), "p10_ms": q(0.1), "p90_ms": q(0.9),
                    "peak_rss_mib": peak_rss_mib(), "baseline_rss_mib": baseline,
                })
            );
        }
        Mode::Throughput {
            file,
            images,
            workers,
        } => {
            process(&file, &secret).context("warm-up")?;
            let next = AtomicUsize::new(0);
            let start = Instant::now();
            std::thread::scope(|scope| {
                for _ in 0..workers {
                    scope.spawn(|| {
                        while next.fetch_add(1, Ordering::Relaxed) < images {
                            process(&file, &secret).expect("the warm-up decoded this file");
                        }
                    });
                }
            });
            let seconds = start.elapsed().as_secs_f64();
            println!(
                "{}",
                serde_json::json!({
                    "images_per_s": images as f64 / seconds, "seconds": seconds,
                    "peak_rss_mib": peak_rss_mib(), "baseline_rss_mib": baseline,
                })
            );
        }
    }
    Ok(())
}
