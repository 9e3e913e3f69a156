//! `cxrfed ingest DIR`: a whole folder (a PACS export) through a node. Walks the folder,
//! recognises images by content, streams them to the node with bounded concurrency (each file
//! read in chunks: memory stays bounded whatever the folder's size), shows progress, and
//! prints a summary and a JSON-lines report of the rejects.
//!
//! Resuming: every finished file is appended to a state file (path, size, modification time,
//! outcome). A rerun skips files that are in it unchanged; files that are not (the state file
//! lost, or an ingest killed mid-file) are sent again and the node's de-duplication by pixel
//! hash stores each image once.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Instant, UNIX_EPOCH};

use anyhow::Context;
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::client::{Credentials, Refused, extract_file};

#[derive(Debug, Args)]
pub struct IngestArgs {
    /// The folder to ingest (walked recursively).
    dir: PathBuf,
    /// Node URL [default: the profile's node, else https://127.0.0.1:50051].
    #[arg(long, env = "CXRFED_NODE")]
    node: Option<String>,
    #[command(flatten)]
    credentials: Credentials,
    /// Files in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// JSON-lines report of the rejected files [default: ./cxrfed-ingest-rejects.jsonl].
    #[arg(long, default_value = "cxrfed-ingest-rejects.jsonl")]
    report: PathBuf,
    /// Resume state [default: ./cxrfed-ingest-state.jsonl]; delete it to send everything again.
    #[arg(long, default_value = "cxrfed-ingest-state.jsonl")]
    state: PathBuf,
    /// Re-extract images the node already has (replacing their records).
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StateLine {
    path: String,
    size: u64,
    mtime_ns: u128,
    outcome: String,
    #[serde(default)]
    record_id: String,
}

#[derive(Debug, Serialize)]
struct RejectLine<'a> {
    path: &'a str,
    reason: &'a str,
    message: &'a str,
}

fn fingerprint(path: &Path) -> Option<(u64, u128)> {
    let meta = std::fs::metadata(path).ok()?;
    let mtime = meta
        .modified()
        .ok()?
        .duration_since(UNIX_EPOCH)
        .ok()?
        .as_nanos();
    Some((meta.len(), mtime))
}

/// Whether the file starts like an image the node reads (DICOM, JPEG, PNG).
fn looks_like_image(path: &Path) -> bool {
    let mut head = [0u8; 132];
    let Ok(mut file) = std::fs::File::open(path) else {
        return false;
    };
    let mut n = 0;
    while n < head.len() {
        match file.read(&mut head[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    cxrfed_imaging::sniff::sniff(&head[..n]).is_ok()
}

fn load_state(path: &Path) -> HashMap<String, (u64, u128)> {
    let Ok(file) = std::fs::File::open(path) else {
        return HashMap::new();
    };
    std::io::BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .filter_map(|line| serde_json::from_str::<StateLine>(&line).ok())
        .filter(|s| s.outcome != "rejected")
        .map(|s| (s.path, (s.size, s.mtime_ns)))
        .collect()
}

#[derive(Debug, Default)]
struct Tally {
    ingested: u64,
    present: u64,
    skipped: u64,
    rejected: BTreeMap<String, u64>,
}

pub async fn ingest(args: IngestArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.concurrency >= 1, "--concurrency must be at least 1");
    anyhow::ensure!(args.dir.is_dir(), "{} is not a folder", args.dir.display());
    let client = args.credentials.connect_node(args.node.as_deref()).await?;

    let files = cxrfed_imaging::sniff::files_under(&args.dir);
    let done = load_state(&args.state);
    let mut state = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.state)
        .with_context(|| format!("cannot open the state file {}", args.state.display()))?;
    let mut report = std::io::BufWriter::new(
        std::fs::File::create(&args.report)
            .with_context(|| format!("cannot create the report {}", args.report.display()))?,
    );

    let bar = indicatif::ProgressBar::new(files.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} files  {per_sec}  ETA {eta}  {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let semaphore = Arc::new(tokio::sync::Semaphore::new(args.concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    let mut tally = Tally::default();

    let relative = |path: &Path| {
        path.strip_prefix(&args.dir)
            .unwrap_or(path)
            .display()
            .to_string()
    };
    type Outcome = (String, Option<(u64, u128)>, Result<(bool, String), Refused>);
    let mut record = |tally: &mut Tally, (rel, fp, outcome): Outcome| -> anyhow::Result<()> {
        let (size, mtime_ns) = fp.unwrap_or((0, 0));
        let line = match &outcome {
            Ok((created, record_id)) => {
                if *created {
                    tally.ingested += 1;
                } else {
                    tally.present += 1;
                }
                StateLine {
                    path: rel.clone(),
                    size,
                    mtime_ns,
                    outcome: if *created { "ingested" } else { "present" }.into(),
                    record_id: record_id.clone(),
                }
            }
            Err(refused) => {
                let reason = if refused.kind.is_empty() {
                    format!("{:?}", refused.code).to_lowercase()
                } else {
                    refused.kind.clone()
                };
                *tally.rejected.entry(reason.clone()).or_default() += 1;
                serde_json::to_writer(
                    &mut report,
                    &RejectLine {
                        path: &rel,
                        reason: &reason,
                        message: &refused.message,
                    },
                )?;
                report.write_all(b"\n")?;
                StateLine {
                    path: rel.clone(),
                    size,
                    mtime_ns,
                    outcome: "rejected".into(),
                    record_id: String::new(),
                }
            }
        };
        serde_json::to_writer(&mut state, &line)?;
        state.write_all(b"\n")?;
        Ok(())
    };

    for path in files {
        let rel = relative(&path);
        let fp = fingerprint(&path);
        if !args.force && fp.is_some() && done.get(&rel) == fp.as_ref() {
            tally.skipped += 1;
            bar.inc(1);
            continue;
        }
        if !looks_like_image(&path) {
            record(
                &mut tally,
                (
                    rel,
                    fp,
                    Err(Refused {
                        code: tonic::Code::InvalidArgument,
                        kind: "not_an_image".into(),
                        message: "not DICOM, JPEG or PNG by content; not sent".into(),
                    }),
                ),
            )?;
            bar.inc(1);
            bar.set_message(format!("{} rejected", tally.rejected.values().sum::<u64>()));
            continue;
        }
        let permit = semaphore.clone().acquire_owned().await?;
        let mut client = client.clone();
        let force = args.force;
        tasks.spawn(async move {
            let outcome = match extract_file(&mut client, &path, force).await {
                Ok(response) => Ok((
                    response.created,
                    response.record.map(|r| r.record_id).unwrap_or_default(),
                )),
                Err(e) => Err(match e.downcast::<Refused>() {
                    Ok(refused) => refused,
                    Err(e) => Refused {
                        code: tonic::Code::Unknown,
                        kind: "client".into(),
                        message: format!("{e:#}"),
                    },
                }),
            };
            drop(permit);
            (rel, fp, outcome)
        });
        // Collect what has finished so far (keeps the JoinSet small).
        while let Some(done) = tasks.try_join_next() {
            record(&mut tally, done?)?;
            bar.inc(1);
            bar.set_message(format!("{} rejected", tally.rejected.values().sum::<u64>()));
        }
    }
    while let Some(done) = tasks.join_next().await {
        record(&mut tally, done?)?;
        bar.inc(1);
        bar.set_message(format!("{} rejected", tally.rejected.values().sum::<u64>()));
    }
    bar.finish_and_clear();
    report.flush()?;
    let seconds = started.elapsed().as_secs_f64();
    let sent = tally.ingested + tally.present + tally.rejected.values().sum::<u64>();
    println!(
        "ingested {}, already present {}, skipped (unchanged since an earlier run) {}, rejected {} in {:.1} s ({:.1} files/s)",
        tally.ingested,
        tally.present,
        tally.skipped,
        tally.rejected.values().sum::<u64>(),
        seconds,
        sent as f64 / seconds.max(1e-9)
    );
    for (reason, n) in &tally.rejected {
        println!("  rejected {reason}: {n}");
    }
    if !tally.rejected.is_empty() {
        println!("rejects listed in {}", args.report.display());
    }
    Ok(ExitCode::SUCCESS)
}
