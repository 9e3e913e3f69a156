//! The extraction pipeline: bytes -> decode + de-identify + hash -> model input -> record.
//!
//! Decoding is CPU-heavy, so it runs on the blocking pool, at most `decode_workers` images at
//! a time (each holds one full-resolution image in memory). The model that fills findings
//! arrives with `cxrfed-model`; until then a record carries no findings and `model_id`
//! "none" — never made-up values.

use std::sync::Arc;
use std::time::Instant;

use cxrfed_imaging::{Decoded, ImagingError, Limits, PreprocessOptions, SiteSecret};
use cxrfed_schema::{NO_MODEL, Record, SCHEMA_VERSION};
use tokio::sync::Semaphore;

use crate::config::NodeConfig;

/// What the pipeline derives from one image before it is stored.
#[derive(Debug)]
pub struct Extraction {
    pub record: Record,
}

#[derive(Debug)]
pub struct Pipeline {
    limits: Limits,
    preprocess: PreprocessOptions,
    secret: SiteSecret,
    permits: Arc<Semaphore>,
}

impl Pipeline {
    pub fn new(config: &NodeConfig, secret: SiteSecret) -> Self {
        Pipeline {
            limits: Limits {
                max_rows: config.max_rows,
                max_columns: config.max_columns,
                max_file_bytes: config.max_file_bytes,
            },
            preprocess: PreprocessOptions {
                size: config.input_size,
                aspect: config.aspect.parse().unwrap_or_default(),
                ..PreprocessOptions::default()
            },
            secret,
            permits: Arc::new(Semaphore::new(config.decode_workers)),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Decodes, de-identifies, hashes and preprocesses `bytes` on the blocking pool and builds
    /// the record (not yet stored).
    pub async fn extract(
        &self,
        bytes: Vec<u8>,
        request_id: String,
    ) -> Result<Extraction, ImagingError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let limits = self.limits;
        let options = self.preprocess;
        let secret = self.secret.clone();
        let started = Instant::now();
        let task = tokio::task::spawn_blocking(move || {
            let decoded = cxrfed_imaging::decode_contained(&bytes, &limits, &secret)?;
            drop(bytes);
            let hash = decoded.pixel_sha256();
            // The model input; the inference worker of cxrfed-model consumes it. Building it
            // here keeps the measured processing time honest about the full path.
            let input =
                cxrfed_imaging::contain(|| Ok(cxrfed_imaging::preprocess(&decoded, &options)))?;
            debug_assert_eq!(input.dim(), (options.size as usize, options.size as usize));
            Ok::<(Decoded, String), ImagingError>((decoded, hash))
        });
        let (decoded, image_sha256) = task.await.map_err(|_| ImagingError::DecoderPanic)??;
        let processing_ms = started.elapsed().as_secs_f64() * 1000.0;
        let record = Record {
            record_id: uuid::Uuid::now_v7().to_string(),
            image_sha256,
            schema_version: SCHEMA_VERSION,
            model_id: NO_MODEL.to_string(),
            created_at: chrono::Utc::now(),
            processing_ms,
            request_id,
            source: decoded.source,
            patient: decoded.patient,
            acquisition: decoded.acquisition,
            findings: None,
            processing_notes: decoded.notes,
        };
        Ok(Extraction { record })
    }
}
