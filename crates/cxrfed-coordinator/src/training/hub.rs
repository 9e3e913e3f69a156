//! Where a round meets the links: update chunks spooled to disk as they arrive, reports routed
//! to the round waiting for their task id, and the cancellation tokens of running jobs. A
//! chunk or report nobody waits for (a late one, another attempt's) is dropped here.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

use cxrfed_fl::Assembly;
use cxrfed_proto::v1 as pb;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The largest update a site may send (bytes).
pub const MAX_UPDATE_BYTES: u64 = 2 << 30;

/// What a site sends a waiting round: its report, or (secure aggregation) its round key.
#[derive(Debug, Clone)]
pub enum Inbound {
    Report(pb::TrainReport),
    Key(pb::MaskKey),
}

/// A message with the site that sent it, for the round that waits for it.
pub type Report = (String, Inbound);

/// The spool file of an update; `None` when it could not be created (the assembly is then
/// broken with the reason, and nothing is written).
#[derive(Debug)]
pub struct SpoolFile(Option<std::fs::File>);

impl From<std::fs::File> for SpoolFile {
    fn from(file: std::fs::File) -> Self {
        SpoolFile(Some(file))
    }
}

impl Write for SpoolFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &mut self.0 {
            Some(file) => file.write(buf),
            None => Err(std::io::Error::other("no spool file")),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.0 {
            Some(file) => file.flush(),
            None => Ok(()),
        }
    }
}

/// One site's update arriving in chunks, spooled to a file.
#[derive(Debug)]
pub struct Upload {
    pub path: PathBuf,
    pub transfer: Assembly<SpoolFile>,
}

impl Upload {
    /// Removes the spool file.
    pub fn discard(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[derive(Debug)]
pub struct Hub {
    spool_dir: PathBuf,
    /// Keep every received update under `spool/kept/` (config `keep_updates`: lets an auditor
    /// check that no site update arrived unmasked).
    keep_updates: bool,
    uploads: Mutex<HashMap<String, Upload>>,
    waiting: Mutex<HashMap<String, mpsc::UnboundedSender<Report>>>,
    running: Mutex<HashMap<String, CancellationToken>>,
}

impl Hub {
    pub fn new(spool_dir: PathBuf) -> Hub {
        Hub {
            spool_dir,
            keep_updates: false,
            uploads: Mutex::default(),
            waiting: Mutex::default(),
            running: Mutex::default(),
        }
    }

    /// A round waits for these task ids: their chunks are spooled, their reports sent to `tx`.
    pub fn expect(
        &self,
        task_ids: impl IntoIterator<Item = String>,
        tx: &mpsc::UnboundedSender<Report>,
    ) {
        let mut waiting = self.waiting.lock();
        for id in task_ids {
            waiting.insert(id, tx.clone());
        }
    }

    /// Keeps received updates for audit (see `keep_updates`).
    pub fn keeping_updates(mut self, keep: bool) -> Hub {
        self.keep_updates = keep;
        self
    }

    /// Copies a complete update's spool file under `spool/kept/` when updates are kept.
    pub fn keep(&self, upload_path: &std::path::Path, task_id: &str) {
        if !self.keep_updates {
            return;
        }
        let kept = self.spool_dir.join("kept");
        let name = task_id.replace('/', "_");
        if let Err(e) = std::fs::create_dir_all(&kept)
            .and_then(|()| std::fs::copy(upload_path, kept.join(format!("{name}.update"))))
        {
            tracing::warn!(error = %e, "cannot keep an update for audit");
        }
    }

    /// The round is over for these task ids: later chunks and reports are dropped, and
    /// uploads never collected are removed.
    pub fn forget(&self, task_ids: impl IntoIterator<Item = String>) {
        for id in task_ids {
            self.waiting.lock().remove(&id);
            if let Some(upload) = self.take_upload(&id) {
                upload.discard();
            }
        }
    }

    /// A chunk of a site's update (from its link).
    pub fn on_chunk(&self, site: &str, chunk: pb::Chunk) {
        if !self.waiting.lock().contains_key(&chunk.task_id) {
            tracing::debug!(
                site,
                task_id = chunk.task_id.as_str(),
                "a late update chunk; ignored"
            );
            return;
        }
        let mut uploads = self.uploads.lock();
        let upload = uploads.entry(chunk.task_id.clone()).or_insert_with(|| {
            let path = self.spool_dir.join(format!(
                "{}.part",
                hex::encode(Sha256::digest(chunk.task_id.as_bytes()))
            ));
            let created = std::fs::create_dir_all(&self.spool_dir)
                .and_then(|()| std::fs::File::create(&path));
            let (file, problem) = match created {
                Ok(f) => (Some(f), None),
                Err(e) => (None, Some(format!("cannot spool the update: {e}"))),
            };
            let mut transfer = Assembly::new(site, SpoolFile(file), None, MAX_UPDATE_BYTES);
            if let Some(problem) = problem {
                transfer.fail(problem);
            }
            Upload { path, transfer }
        });
        upload.transfer.push(site, chunk.offset, &chunk.data);
    }

    /// A site's report (from its link).
    pub fn on_report(&self, site: &str, report: pb::TrainReport) {
        let task_id = report.task_id.clone();
        self.route(site, &task_id, Inbound::Report(report));
    }

    /// A site's secure-aggregation key (from its link).
    pub fn on_key(&self, site: &str, key: pb::MaskKey) {
        let task_id = key.task_id.clone();
        self.route(site, &task_id, Inbound::Key(key));
    }

    fn route(&self, site: &str, task_id: &str, message: Inbound) {
        let tx = self.waiting.lock().get(task_id).cloned();
        match tx {
            Some(tx) => {
                let _ = tx.send((site.to_string(), message));
            }
            None => tracing::info!(
                site,
                task_id,
                "a message for a finished or unknown round; ignored"
            ),
        }
    }

    pub fn take_upload(&self, task_id: &str) -> Option<Upload> {
        self.uploads.lock().remove(task_id)
    }

    /// Registers a running job's cancellation token.
    pub fn started(&self, job_id: &str, token: CancellationToken) {
        self.running.lock().insert(job_id.to_string(), token);
    }

    pub fn finished(&self, job_id: &str) {
        self.running.lock().remove(job_id);
    }

    /// Cancels a running job's current round, if it runs here.
    pub fn cancel(&self, job_id: &str) {
        if let Some(token) = self.running.lock().get(job_id) {
            token.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn late_foreign_and_out_of_order_chunks_are_not_taken() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hub = Hub::new(dir.path().join("spool"));
        let chunk = |task: &str, offset: u64, data: &'static [u8]| pb::Chunk {
            task_id: task.into(),
            offset,
            data: prost::bytes::Bytes::from_static(data),
            last: false,
        };
        // No round waits for this task: a late update, dropped.
        hub.on_chunk("site-a", chunk("job/r1/a1/site-a", 0, b"abc"));
        assert!(hub.take_upload("job/r1/a1/site-a").is_none());
        let (tx, mut rx) = mpsc::unbounded_channel();
        hub.expect(
            [
                "job/r2/a1/site-a".to_string(),
                "job/r2/a1/site-b".to_string(),
            ],
            &tx,
        );
        hub.on_chunk("site-a", chunk("job/r2/a1/site-a", 0, b"abc"));
        hub.on_chunk("site-a", chunk("job/r2/a1/site-a", 3, b"def"));
        let upload = hub.take_upload("job/r2/a1/site-a").expect("upload");
        assert_eq!(
            (upload.transfer.len(), upload.transfer.problem()),
            (6, None)
        );
        assert_eq!(std::fs::read(&upload.path).expect("spool"), b"abcdef");
        // A gap, or another site writing into site-b's update, breaks that upload.
        hub.on_chunk("site-b", chunk("job/r2/a1/site-b", 5, b"x"));
        let broken = hub.take_upload("job/r2/a1/site-b").expect("upload");
        assert!(broken.transfer.problem().is_some());
        hub.on_chunk("site-b", chunk("job/r2/a1/site-b", 0, b"x"));
        hub.on_chunk("site-c", chunk("job/r2/a1/site-b", 1, b"y"));
        let foreign = hub.take_upload("job/r2/a1/site-b").expect("upload");
        assert!(foreign.transfer.problem().is_some());
        // Reports reach the waiting round; unknown ones do not.
        hub.on_report(
            "site-a",
            pb::TrainReport {
                task_id: "job/r2/a1/site-a".into(),
                ..Default::default()
            },
        );
        hub.on_report(
            "site-a",
            pb::TrainReport {
                task_id: "job/r9/a1/site-a".into(),
                ..Default::default()
            },
        );
        let (site, Inbound::Report(report)) = rx.try_recv().expect("routed") else {
            panic!("a report was routed as a key");
        };
        assert_eq!(
            (site.as_str(), report.task_id.as_str()),
            ("site-a", "job/r2/a1/site-a")
        );
        assert!(rx.try_recv().is_err());
        // After the round, its tasks take nothing more.
        hub.forget(["job/r2/a1/site-a".to_string()]);
        hub.on_chunk("site-a", chunk("job/r2/a1/site-a", 0, b"abc"));
        assert!(hub.take_upload("job/r2/a1/site-a").is_none());
    }
}
