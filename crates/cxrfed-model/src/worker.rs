//! The inference worker: one thread owns the model; requests wait in a bounded queue and are
//! batched dynamically (up to `max_batch`, waiting at most `max_wait` for the batch to fill).
//! A full queue refuses at once with a retry hint instead of growing without bound.
//!
//! The wait is adaptive: a batch waits for more images only while some are on their way
//! (a caller holds an [`Incoming`] token from [`InferenceHandle::incoming`] while it decodes).
//! When nothing is coming — one file at a time, or the last of a burst — the batch runs at once
//! instead of idling for `max_wait`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use ndarray::Array2;
use tch::{Kind, Tensor};

use crate::predict::{Prediction, activate};
use crate::{Model, ModelCard, ModelError};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WorkerConfig {
    pub max_batch: usize,
    pub max_wait: Duration,
    pub queue_capacity: usize,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            max_batch: 16,
            max_wait: Duration::from_millis(5),
            queue_capacity: 64,
        }
    }
}

struct Job {
    input: Array2<f32>,
    reply: tokio::sync::oneshot::Sender<Result<Prediction, ModelError>>,
}

/// Counters of the worker, read by the node's status RPC and logs.
#[derive(Debug, Default)]
pub struct WorkerStats {
    pub images: AtomicU64,
    pub batches: AtomicU64,
    pub rejected: AtomicU64,
    pub queued: AtomicUsize,
    pub max_batch_seen: AtomicUsize,
    /// Total forward time in microseconds.
    pub forward_us: AtomicU64,
    /// Images announced by [`InferenceHandle::incoming`] and not yet queued.
    pub incoming: AtomicUsize,
    /// Batches that ran before `max_wait` and below `max_batch` because nothing more was on
    /// its way.
    pub unwaited: AtomicU64,
}

/// An image on its way to the worker (being decoded): while any is held, a batch may wait up
/// to `max_wait` for it. Dropped when the image is queued or its request fails.
#[derive(Debug)]
pub struct Incoming(Arc<WorkerStats>);

impl Drop for Incoming {
    fn drop(&mut self) {
        self.0.incoming.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A snapshot of [`WorkerStats`].
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StatsSnapshot {
    pub images: u64,
    pub batches: u64,
    pub rejected: u64,
    pub queued: usize,
    pub max_batch_seen: usize,
    pub mean_batch: f64,
    pub mean_forward_ms: f64,
    pub incoming: usize,
    pub unwaited: u64,
}

impl WorkerStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let images = self.images.load(Ordering::Relaxed);
        let batches = self.batches.load(Ordering::Relaxed);
        StatsSnapshot {
            images,
            batches,
            rejected: self.rejected.load(Ordering::Relaxed),
            queued: self.queued.load(Ordering::Relaxed),
            max_batch_seen: self.max_batch_seen.load(Ordering::Relaxed),
            mean_batch: if batches == 0 {
                0.0
            } else {
                images as f64 / batches as f64
            },
            mean_forward_ms: if batches == 0 {
                0.0
            } else {
                self.forward_us.load(Ordering::Relaxed) as f64 / batches as f64 / 1000.0
            },
            incoming: self.incoming.load(Ordering::Relaxed),
            unwaited: self.unwaited.load(Ordering::Relaxed),
        }
    }
}

/// A cheap, cloneable handle to the worker thread.
#[derive(Debug, Clone)]
pub struct InferenceHandle {
    tx: SyncSender<Job>,
    stats: Arc<WorkerStats>,
    card: Arc<ModelCard>,
    config: WorkerConfig,
    device: String,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("input", &self.input.dim())
            .finish()
    }
}

impl InferenceHandle {
    /// Starts the worker thread, which takes ownership of `model`.
    pub fn spawn(model: Model, config: WorkerConfig) -> Result<InferenceHandle, ModelError> {
        let config = WorkerConfig {
            max_batch: config.max_batch.clamp(1, 1024),
            queue_capacity: config.queue_capacity.max(1),
            ..config
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(config.queue_capacity);
        let stats = Arc::new(WorkerStats::default());
        let card = Arc::new(model.card.clone());
        let device = crate::model::device_name(model.device);
        let worker_stats = Arc::clone(&stats);
        std::thread::Builder::new()
            .name("cxrfed-inference".into())
            .spawn(move || run(model, rx, config, &worker_stats))
            .map_err(|e| {
                ModelError::Inference(format!("cannot start the inference thread: {e}"))
            })?;
        Ok(InferenceHandle {
            tx,
            stats,
            card,
            config,
            device,
        })
    }

    pub fn card(&self) -> &ModelCard {
        &self.card
    }

    pub fn device(&self) -> &str {
        &self.device
    }

    pub fn config(&self) -> WorkerConfig {
        self.config
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Announces an image that will be queued soon (call before decoding it; drop the token
    /// when it is queued or fails), so that a batch waits for it rather than running without
    /// it.
    pub fn incoming(&self) -> Incoming {
        self.stats.incoming.fetch_add(1, Ordering::Relaxed);
        Incoming(Arc::clone(&self.stats))
    }

    /// Queues one preprocessed image (`size x size`, normalised) and waits for its prediction.
    /// A full queue fails at once with [`ModelError::QueueFull`].
    pub async fn infer(&self, input: Array2<f32>) -> Result<Prediction, ModelError> {
        let size = self.card.input.size as usize;
        if input.dim() != (size, size) {
            return Err(ModelError::Inference(format!(
                "input is {:?}, the model needs {size}x{size}",
                input.dim()
            )));
        }
        let (reply, rx) = tokio::sync::oneshot::channel();
        match self.tx.try_send(Job { input, reply }) {
            Ok(()) => {
                self.stats.queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Full(_)) => {
                self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                return Err(ModelError::QueueFull {
                    capacity: self.config.queue_capacity,
                    retry_after_ms: self.retry_hint_ms(),
                });
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(ModelError::Inference(
                    "the inference worker has stopped".into(),
                ));
            }
        }
        rx.await
            .map_err(|_| ModelError::Inference("the inference worker dropped the request".into()))?
    }

    /// Time to drain a full queue at the measured batch rate, at least 50 ms.
    fn retry_hint_ms(&self) -> u64 {
        let snapshot = self.stats.snapshot();
        let per_batch = snapshot.mean_forward_ms.max(1.0);
        let batches = self.config.queue_capacity.div_ceil(self.config.max_batch) as f64;
        (per_batch * batches).max(50.0).ceil() as u64
    }
}

/// How long the worker waits for an announced image before it looks again whether any is
/// still on its way.
const WAIT_STEP: Duration = Duration::from_millis(1);

fn run(model: Model, rx: Receiver<Job>, config: WorkerConfig, stats: &WorkerStats) {
    let size = model.card.input.size as i64;
    let label_map = model.card.label_map.clone();
    let mut batch: Vec<Job> = Vec::with_capacity(config.max_batch);
    while let Ok(first) = rx.recv() {
        batch.push(first);
        let deadline = Instant::now() + config.max_wait;
        while batch.len() < config.max_batch {
            // Whatever is already queued joins without waiting.
            if let Ok(job) = rx.try_recv() {
                batch.push(job);
                continue;
            }
            // Wait only for images on their way, and in short steps, so that a batch stops
            // waiting as soon as the last of them has arrived or failed.
            if stats.incoming.load(Ordering::Relaxed) == 0 {
                stats.unwaited.fetch_add(1, Ordering::Relaxed);
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            match rx.recv_timeout((deadline - now).min(WAIT_STEP)) {
                Ok(job) => batch.push(job),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        stats.queued.fetch_sub(batch.len(), Ordering::Relaxed);
        let n = batch.len();
        let started = Instant::now();
        let mut data = Vec::with_capacity(n * (size * size) as usize);
        for job in &batch {
            match job.input.as_slice() {
                Some(slice) => data.extend_from_slice(slice),
                None => data.extend(job.input.iter().copied()),
            }
        }
        let xs = Tensor::from_slice(&data)
            .view([n as i64, 1, size, size])
            .to_kind(Kind::Float)
            .to_device(model.device);
        let result = model
            .try_forward(&xs)
            .map(|logits| activate(&label_map, &logits));
        let elapsed = started.elapsed();
        stats
            .forward_us
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats.images.fetch_add(n as u64, Ordering::Relaxed);
        stats.max_batch_seen.fetch_max(n, Ordering::Relaxed);
        tracing::debug!(
            batch = n,
            forward_ms = elapsed.as_secs_f64() * 1000.0,
            "inference batch"
        );
        match result {
            Ok(predictions) => {
                for (job, prediction) in batch.drain(..).zip(predictions) {
                    let _ = job.reply.send(Ok(prediction));
                }
            }
            Err(error) => {
                for job in batch.drain(..) {
                    let _ = job.reply.send(Err(error.clone()));
                }
            }
        }
    }
}
