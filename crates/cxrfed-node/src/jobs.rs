//! Ingest jobs: a folder already on the node's disk (a PACS export) extracted inside the node,
//! in the background, with progress the admin can query (`IngestJobs`, `node status`).
//! Images go through the same path as `Extract` (decode permits, inference queue, store,
//! columns); `decode_workers` files are in flight at once.

use std::path::PathBuf;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::error::NodeError;
use crate::ingest::{FileOutcome, Job};
use crate::state::Node;

/// Starts an ingest job of `folder` (an absolute path on the node's disk).
pub fn start(state: Arc<Node>, folder: PathBuf, force: bool) -> Result<Arc<Job>, NodeError> {
    if !folder.is_absolute() || !folder.is_dir() {
        return Err(NodeError::InvalidRequest(
            "the folder must be an absolute path to a directory on the node's disk".into(),
        ));
    }
    if state
        .jobs()
        .all()
        .iter()
        .any(|j| j.is_running() && j.folder == folder)
    {
        return Err(NodeError::InvalidRequest(
            "an ingest job of this folder is already running".into(),
        ));
    }
    let job = Arc::new(Job::new(folder.clone()));
    state.jobs().add(job.clone());
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
            files = running.files_done(),
            "ingest job finished"
        );
        running.finish(label);
    });
    Ok(job)
}

async fn run(state: &Arc<Node>, job: &Arc<Job>, force: bool) -> Result<(), NodeError> {
    let folder = job.folder.clone();
    let files = tokio::task::spawn_blocking(move || cxrfed_imaging::sniff::files_under(&folder))
        .await
        .map_err(|e| NodeError::Internal(format!("folder walk: {e}")))?;
    job.set_total(files.len() as u64);
    let permits = Arc::new(tokio::sync::Semaphore::new(
        state.config().decode_workers.max(1) * 2,
    ));
    let mut tasks = tokio::task::JoinSet::new();
    for path in files {
        if state.shutdown().is_cancelled() {
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
            job.record(match outcome {
                Ok(true) => FileOutcome::Ingested,
                Ok(false) => FileOutcome::AlreadyPresent,
                Err(kind) => FileOutcome::Rejected(kind),
            });
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// Ok(created) or Err(reason kind).
async fn ingest_one(
    state: &Node,
    path: &std::path::Path,
    force: bool,
    job_id: &str,
) -> Result<bool, String> {
    let limit = state.config().max_file_bytes;
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
