//! `cxrfed-bench`: the Rust side of the imaging benchmark. Runs the node's per-image path —
//! read the file, decode, de-identify, hash the pixels, preprocess to the model input — and
//! prints JSON for `bench/imaging.py`, which runs the Python peers side by side and writes the
//! table. Timing lives here, never in tests.

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
