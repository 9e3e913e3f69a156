//! The table of a node's ingest jobs and each job's live counters (`IngestJobs`, `node
//! status`); the jobs themselves run in `jobs`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use cxrfed_proto::v1 as pb;
use parking_lot::Mutex;

/// How one file of a job ended.
#[derive(Debug, Clone)]
pub enum FileOutcome {
    Ingested,
    AlreadyPresent,
    /// Refused, with the error kind.
    Rejected(String),
}

/// One job's live state.
#[derive(Debug)]
pub struct Job {
    pub id: String,
    pub folder: PathBuf,
    /// Where the images come from: "folder", or "pacs AE@HOST:PORT" for a pull.
    pub source: String,
    pub started_at: DateTime<Utc>,
    total: AtomicU64,
    done: AtomicU64,
    ingested: AtomicU64,
    present: AtomicU64,
    rejected: Mutex<BTreeMap<String, u64>>,
    finished: Mutex<Option<(DateTime<Utc>, String)>>,
}

impl Job {
    pub fn new(folder: PathBuf) -> Job {
        Job {
            id: uuid::Uuid::now_v7().to_string(),
            folder,
            source: "folder".into(),
            started_at: Utc::now(),
            total: AtomicU64::new(0),
            done: AtomicU64::new(0),
            ingested: AtomicU64::new(0),
            present: AtomicU64::new(0),
            rejected: Mutex::new(BTreeMap::new()),
            finished: Mutex::new(None),
        }
    }

    /// A job that pulls from the PACS `pacs` (`AE@HOST:PORT`).
    pub fn pull(pacs: &str) -> Job {
        Job {
            source: format!("pacs {pacs}"),
            ..Job::new(PathBuf::new())
        }
    }

    pub fn set_total(&self, files: u64) {
        self.total.store(files, Ordering::SeqCst);
    }

    pub fn record(&self, outcome: FileOutcome) {
        match outcome {
            FileOutcome::Ingested => self.ingested.fetch_add(1, Ordering::SeqCst),
            FileOutcome::AlreadyPresent => self.present.fetch_add(1, Ordering::SeqCst),
            FileOutcome::Rejected(kind) => {
                *self.rejected.lock().entry(kind).or_default() += 1;
                0
            }
        };
        self.done.fetch_add(1, Ordering::SeqCst);
    }

    pub fn files_done(&self) -> u64 {
        self.done.load(Ordering::SeqCst)
    }

    /// Marks the job finished: `done`, or `failed: REASON`.
    pub fn finish(&self, outcome: String) {
        *self.finished.lock() = Some((Utc::now(), outcome));
    }

    pub fn to_pb(&self) -> pb::IngestJob {
        let rejected = self.rejected.lock().clone();
        let finished = self.finished.lock().clone();
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
            source: self.source.clone(),
        }
    }

    pub fn is_running(&self) -> bool {
        self.finished.lock().is_none()
    }
}

/// Every job of this node's run.
#[derive(Debug, Default)]
pub struct Jobs {
    jobs: Mutex<Vec<Arc<Job>>>,
}

impl Jobs {
    pub fn all(&self) -> Vec<Arc<Job>> {
        self.jobs.lock().clone()
    }

    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        self.all().into_iter().find(|j| j.id == id)
    }

    pub fn add(&self, job: Arc<Job>) {
        self.jobs.lock().push(job);
    }
}
