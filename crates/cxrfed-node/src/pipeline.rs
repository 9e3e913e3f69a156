//! The extraction pipeline: bytes -> decode + de-identify + hash + preprocess (blocking pool)
//! -> batched inference (the model's worker thread) -> record.
//!
//! Decoding is CPU-heavy, so it runs on the blocking pool, at most `decode_workers` images at
//! a time (each holds one full-resolution image in memory). The model input is handed to the
//! inference worker, which batches concurrent requests; a full inference queue fails the
//! request with RESOURCE_EXHAUSTED instead of queueing without bound. Without a model a record
//! carries no findings and `model_id` "none" — never made-up values.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cxrfed_imaging::{Decoded, ImagingError, Limits, MemoryBudget, PreprocessOptions, SiteSecret};
use cxrfed_model::InferenceHandle;
use cxrfed_schema::{NO_MODEL, Record, SCHEMA_VERSION};
use tokio::sync::Semaphore;

use crate::config::NodeConfig;
use crate::error::NodeError;

/// What the pipeline derives from one image before it is stored.
#[derive(Debug)]
pub struct Extraction {
    pub record: Record,
    /// The model input, de-normalised to 8 bits (`size`, `size²` bytes), kept by the node
    /// for federated training and back-fill. None for an image the model must not read (not a
    /// chest radiograph), so a back-fill never reads it either.
    pub input: Option<cxrfed_store::KeptInput>,
}

/// The 8-bit form of a normalised model input.
pub fn quantise(input: &ndarray::Array2<f32>, options: &PreprocessOptions) -> (u32, Vec<u8>) {
    let pixels = input
        .iter()
        .map(|v| ((v * options.std + options.mean).clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect();
    (input.nrows() as u32, pixels)
}

/// A kept 8-bit input normalised for a model with input `mean` and `std` (the inverse of
/// [`quantise`] up to rounding).
pub fn dequantise(pixels: &[u8], mean: f32, std: f32) -> Vec<f32> {
    pixels
        .iter()
        .map(|p| (f32::from(*p) / 255.0 - mean) / std)
        .collect()
}

/// The model a request uses and the preprocessing its card asks for; replaced as one when a
/// new model is rolled out.
#[derive(Debug)]
struct Active {
    model: Option<InferenceHandle>,
    preprocess: PreprocessOptions,
}

#[derive(Debug)]
pub struct Pipeline {
    limits: Limits,
    secret: SiteSecret,
    permits: Arc<Semaphore>,
    /// Bytes every decode together may hold (see `decode_memory_bytes`).
    memory: MemoryBudget,
    /// Swapped atomically by [`Pipeline::switch_model`]: a request takes the current model at
    /// its start and finishes on it, so a switch fails no in-flight request.
    active: arc_swap::ArcSwap<Active>,
    decode_workers: usize,
    /// `j2k_reduced_decode`: None when off, else whether lossless J2K is reduced too.
    reduce_lossless: Option<bool>,
    /// Stage timings and the other operator metrics (`/metrics`).
    metrics: Arc<cxrfed_server::metrics::Metrics>,
}

impl Pipeline {
    /// With a model, the model card's input contract (size, aspect, normalisation) replaces
    /// the configured size and aspect.
    /// The site's keyed reference to an original UID it must recognise but not keep.
    pub fn keyed_reference(&self, purpose: &str, value: &str) -> String {
        self.secret.keyed(purpose, value)
    }

    pub fn new(config: &NodeConfig, secret: SiteSecret, model: Option<InferenceHandle>) -> Self {
        let fallback = PreprocessOptions {
            size: config.input_size,
            aspect: config.aspect.parse().unwrap_or_default(),
            ..PreprocessOptions::default()
        };
        let preprocess = match &model {
            Some(handle) => cxrfed_model::preprocess_options(&handle.card().input),
            None => fallback,
        };
        Pipeline {
            limits: Limits {
                max_rows: config.max_rows,
                max_columns: config.max_columns,
                max_file_bytes: config.max_file_bytes,
                burned_in: config.burned_in_annotation.parse().unwrap_or_default(),
            },
            secret,
            permits: Arc::new(Semaphore::new(config.decode_workers)),
            memory: MemoryBudget::new(config.decode_memory_bytes, Duration::from_secs(30)),
            active: arc_swap::ArcSwap::from_pointee(Active { model, preprocess }),
            decode_workers: config.decode_workers,
            reduce_lossless: match config.j2k_reduced_decode.as_str() {
                "off" => None,
                "all" => Some(true),
                _ => Some(false),
            },
            metrics: Arc::default(),
        }
    }

    pub fn metrics(&self) -> &Arc<cxrfed_server::metrics::Metrics> {
        &self.metrics
    }

    /// Decode workers holding a slot now.
    pub fn decode_slots_busy(&self) -> usize {
        self.decode_workers
            .saturating_sub(self.permits.available_permits())
    }

    /// Switches to another model: requests already running finish on the model they started
    /// with (its worker thread ends when the last of them is done), new ones use this one.
    pub fn switch_model(&self, model: InferenceHandle) {
        let preprocess = cxrfed_model::preprocess_options(&model.card().input);
        self.active.store(Arc::new(Active {
            model: Some(model),
            preprocess,
        }));
    }

    /// The preprocessing the current model needs.
    pub fn preprocess_options(&self) -> PreprocessOptions {
        self.active.load().preprocess
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The current model (a cheap handle to its worker).
    pub fn model(&self) -> Option<InferenceHandle> {
        self.active.load().model.clone()
    }

    /// Decodes, de-identifies, hashes and preprocesses `bytes` on the blocking pool, infers the
    /// findings, and builds the record (not yet stored). `bytes` is any owned buffer: an
    /// upload's assembled file, or a shared one (the benchmark's `limit` mode).
    pub async fn extract<B: AsRef<[u8]> + Send + 'static>(
        &self,
        bytes: B,
        request_id: String,
    ) -> Result<Extraction, NodeError> {
        let started = Instant::now();
        let active = self.active.load_full();
        let metrics = self.metrics.clone();
        let ((decoded, image_sha256, input, kept), incoming) = {
            let _permit = self
                .permits
                .acquire()
                .await
                .expect("the semaphore is never closed");
            metrics.observe_stage("permit_wait", started.elapsed().as_secs_f64());
            // From here the image is on its way to the model: a batch may wait for it.
            let incoming = active.model.as_ref().map(InferenceHandle::incoming);
            let limits = self.limits;
            let options = active.preprocess;
            let reduction = cxrfed_imaging::Reduction {
                min_side: self.reduce_lossless.map_or(0, |_| options.size),
                lossless: self.reduce_lossless.unwrap_or(false),
            };
            let secret = self.secret.clone();
            let memory = self.memory.clone();
            let stages = metrics.clone();
            let task = tokio::task::spawn_blocking(move || {
                let decoding = Instant::now();
                let (mut decoded, reservation) = cxrfed_imaging::decode_for_model(
                    bytes.as_ref(),
                    &limits,
                    &secret,
                    &memory,
                    reduction,
                )?;
                drop(bytes);
                let hash = decoded.pixel_sha256();
                stages.observe_stage("decode", decoding.elapsed().as_secs_f64());
                let preprocessing = Instant::now();
                let input =
                    cxrfed_imaging::contain(|| Ok(cxrfed_imaging::preprocess(&decoded, &options)))?;
                stages.observe_stage("preprocess", preprocessing.elapsed().as_secs_f64());
                // The full-resolution samples are not needed past this point: free them (and
                // their share of the budget) before the request waits for inference.
                decoded.samples = cxrfed_imaging::Samples::U8(ndarray::Array2::zeros((0, 0)));
                drop(reservation);
                let kept = quantise(&input, &options);
                Ok::<(Decoded, String, ndarray::Array2<f32>, (u32, Vec<u8>)), ImagingError>((
                    decoded, hash, input, kept,
                ))
            });
            (
                task.await.map_err(|_| ImagingError::DecoderPanic)??,
                incoming,
            )
        };
        // Not a chest radiograph by its header: the record says so and the model stays out.
        let gate = cxrfed_imaging::deidentify::not_chest_reason(&decoded.source);
        let mut notes = decoded.notes;
        notes.extend(gate.clone());
        let (findings, model_fields, model_id, model_sha256) = match &active.model {
            Some(_) if gate.is_some() => {
                drop(incoming);
                (
                    None,
                    Default::default(),
                    NO_MODEL.to_string(),
                    String::new(),
                )
            }
            Some(handle) => {
                let inferring = Instant::now();
                // Queued by the first poll of `infer`, with no await in between.
                drop(incoming);
                let prediction = handle.infer(input).await?;
                metrics.observe_stage("inference", inferring.elapsed().as_secs_f64());
                let card = handle.card();
                (
                    Some(prediction.findings(&card.label_map)),
                    prediction.custom_values(&card.label_map),
                    card.model_id.clone(),
                    card.weights_sha256.clone(),
                )
            }
            None => (
                None,
                Default::default(),
                NO_MODEL.to_string(),
                String::new(),
            ),
        };
        let processing_ms = started.elapsed().as_secs_f64() * 1000.0;
        let record = Record {
            record_id: uuid::Uuid::now_v7().to_string(),
            image_sha256,
            schema_version: SCHEMA_VERSION,
            model_id,
            model_sha256,
            created_at: chrono::Utc::now(),
            processing_ms,
            request_id,
            source: decoded.source,
            patient: decoded.patient,
            acquisition: decoded.acquisition,
            findings,
            processing_notes: notes,
            questions: Vec::new(),
            annotations: Vec::new(),
            custom_fields: Default::default(),
            model_fields,
        };
        Ok(Extraction {
            record,
            input: gate.is_none().then(|| cxrfed_store::KeptInput {
                size: kept.0,
                pixels: kept.1,
                preprocessing: active.preprocess.signature(),
            }),
        })
    }
}
