//! Ingest jobs: a folder already on the node's disk (a PACS export) extracted inside the node,
//! in the background, with progress the admin can query (`IngestJobs`, `node status`).
//! Images go through the same path as `Extract` (decode permits, inference queue, store,
//! columns); `decode_workers` files are in flight at once.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use cxrfed_proto::v1 as pb;
use sha2::{Digest, Sha256};

use crate::error::NodeError;
use crate::service::NodeState;

/// One job's live state.
#[derive(Debug)]
pub struct Job {
    pub id: String,
    pub folder: PathBuf,
    pub started_at: DateTime<Utc>,
    total: AtomicU64,
    done: AtomicU64,
    ingested: AtomicU64,
    present: AtomicU64,
    rejected: Mutex<BTreeMap<String, u64>>,
    finished: Mutex<Option<(DateTime<Utc>, String)>>,
}

impl Job {
    pub fn to_pb(&self) -> pb::IngestJob {
        let rejected = self.rejected.lock().map(|r| r.clone()).unwrap_or_default();
        let finished = self.finished.lock().ok().and_then(|f| f.clone());
        let end = finished.as_ref().map_or_else(Utc::now, |(t, _)| *t);
        let seconds = (end - self.started_at).num_milliseconds().max(1) as f64 / 1000.0;
        let done = self.done.load(Ordering::SeqCst);
        pb::IngestJob {
            job_id: self.id.clone(),
            folder: self.folder.display().to_string(),
            state: match &finished {
                None => "running".into(),
                Some((_, outcome)) => outcome.clone(),
            },
            files_total: self.total.load(Ordering::SeqCst),
            files_done: done,
            ingested: self.ingested.load(Ordering::SeqCst),
            already_present: self.present.load(Ordering::SeqCst),
            rejected: rejected.values().sum(),
            rejected_by_reason: rejected.into_iter().collect(),
            started_at: Some(cxrfed_proto::timestamp(self.started_at)),
            finished_at: finished.map(|(t, _)| cxrfed_proto::timestamp(t)),
            files_per_second: done as f64 / seconds,
        }
    }

    pub fn is_running(&self) -> bool {
        self.finished.lock().map(|f| f.is_none()).unwrap_or(false)
    }
}

/// Every job of this node's run.
#[derive(Debug, Default)]
pub struct Jobs {
    jobs: Mutex<Vec<Arc<Job>>>,
}

impl Jobs {
    pub fn all(&self) -> Vec<Arc<Job>> {
        self.jobs.lock().map(|j| j.clone()).unwrap_or_default()
    }

    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        self.all().into_iter().find(|j| j.id == id)
    }
}

/// Starts an ingest job of `folder` (an absolute path on the node's disk).
pub fn start(state: Arc<NodeState>, folder: PathBuf, force: bool) -> Result<Arc<Job>, NodeError> {
    if !folder.is_absolute() || !folder.is_dir() {
        return Err(NodeError::InvalidRequest(
            "the folder must be an absolute path to a directory on the node's disk".into(),
        ));
    }
    if state
        .jobs
        .all()
        .iter()
        .any(|j| j.is_running() && j.folder == folder)
    {
        return Err(NodeError::InvalidRequest(
            "an ingest job of this folder is already running".into(),
        ));
    }
    let job = Arc::new(Job {
        id: uuid::Uuid::now_v7().to_string(),
        folder: folder.clone(),
        started_at: Utc::now(),
        total: AtomicU64::new(0),
        done: AtomicU64::new(0),
        ingested: AtomicU64::new(0),
        present: AtomicU64::new(0),
        rejected: Mutex::new(BTreeMap::new()),
        finished: Mutex::new(None),
    });
    if let Ok(mut jobs) = state.jobs.jobs.lock() {
        jobs.push(job.clone());
    }
    // Logs carry a hash of the folder path (PACS exports are often named after patients).
    let folder_hash = hex::encode(&Sha256::digest(folder.as_os_str().as_encoded_bytes())[..8]);
    tracing::info!(
        job_id = job.id.as_str(),
        folder_hash = folder_hash.as_str(),
        "ingest job started"
    );
    let running = job.clone();
    tokio::spawn(async move {
        let outcome = run(&state, &running, force).await;
        let label = match &outcome {
            Ok(()) => "done".to_string(),
            Err(e) => format!("failed: {e}"),
        };
        tracing::info!(
            job_id = running.id.as_str(),
            folder_hash = folder_hash.as_str(),
            outcome = label.as_str(),
            files = running.done.load(Ordering::SeqCst),
            "ingest job finished"
        );
        if let Ok(mut finished) = running.finished.lock() {
            *finished = Some((Utc::now(), label));
        }
    });
    Ok(job)
}

/// Every regular file below `folder` (recursively, symlinks not followed), sorted: the order
/// both ingest paths (this job and `cxrfed ingest`) take a folder in.
pub fn files_under(folder: &std::path::Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = walkdir::WalkDir::new(folder)
        .follow_links(false)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .map(|e| e.into_path())
        .collect();
    files.sort();
    files
}

async fn run(state: &Arc<NodeState>, job: &Arc<Job>, force: bool) -> Result<(), NodeError> {
    let folder = job.folder.clone();
    let files = tokio::task::spawn_blocking(move || files_under(&folder))
        .await
        .map_err(|e| NodeError::Internal(format!("folder walk: {e}")))?;
    job.total.store(files.len() as u64, Ordering::SeqCst);
    let permits = Arc::new(tokio::sync::Semaphore::new(
        state.config.decode_workers.max(1) * 2,
    ));
    let mut tasks = tokio::task::JoinSet::new();
    for path in files {
        if state.shutdown.is_cancelled() {
            return Err(NodeError::ShuttingDown);
        }
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| NodeError::Internal(e.to_string()))?;
        let (state, job) = (state.clone(), job.clone());
        tasks.spawn(async move {
            let outcome = ingest_one(&state, &path, force, &job.id).await;
            drop(permit);
            match outcome {
                Ok(true) => job.ingested.fetch_add(1, Ordering::SeqCst),
                Ok(false) => job.present.fetch_add(1, Ordering::SeqCst),
                Err(kind) => {
                    if let Ok(mut rejected) = job.rejected.lock() {
                        *rejected.entry(kind).or_default() += 1;
                    }
                    0
                }
            };
            job.done.fetch_add(1, Ordering::SeqCst);
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// Ok(created) or Err(reason kind).
async fn ingest_one(
    state: &NodeState,
    path: &std::path::Path,
    force: bool,
    job_id: &str,
) -> Result<bool, String> {
    let limit = state.config.max_file_bytes;
    let size = tokio::fs::metadata(path)
        .await
        .map_err(|_| "unreadable".to_string())?
        .len();
    if size > limit {
        return Err("file_too_large".into());
    }
    let bytes = tokio::fs::read(path)
        .await
        .map_err(|_| "unreadable".to_string())?;
    if cxrfed_imaging::sniff::sniff(&bytes).is_err() {
        return Err("not_an_image".into());
    }
    let filename = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    state
        .extract_and_store(bytes, &filename, force, format!("ingest-{job_id}"))
        .await
        .map(|(_, created)| created)
        .map_err(|e| e.kind().to_string())
}
