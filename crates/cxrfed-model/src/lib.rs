//! The extraction model, and the only crate that links libtorch (tch).
//!
//! * [`labelmap`]: the heads a model has, as data (a label map).
//! * [`model`]: architectures (tiny CNN, ResNet-18, DenseNet-121) with one shared backbone and
//!   one head per field, safetensors weights with a [`ModelCard`], and TorchScript models
//!   checked against their label map at load time.
//! * [`worker`]: the inference worker thread with a bounded queue and dynamic batching.
//! * [`predict`]: activations, schema-v1 findings and the derived fields.
//! * [`train`]: datasets, training (Adam + augmentation), metrics.
//! * [`calibrate`]: per-site operating points of binary heads from the site's labelled images.
//! * [`txrv`]: TorchXRayVision's architectures and the import of its checkpoints.
//! * [`federated`]: one site's round: weights from bytes, local training of the chosen
//!   layers, the (clipped) weights delta.
//!
//! This crate must not depend on gRPC (tonic) or storage (sled).
//!
//! Architecture invariant: cxrfed-model is the only library crate that links libtorch; it
//! depends on neither tonic nor sled, and takes its federated contract (cards, label maps,
//! specs, the f32 codec) from cxrfed-fl.

pub mod bundled;
pub mod calibrate;
pub mod federated;
pub mod model;
pub mod predict;
pub mod train;
pub mod txrv;
pub mod worker;

/// The label map lives in the federated-learning contract (`cxrfed-fl`), shared with the
/// coordinator; re-exported here for the model code that reads it.
pub use cxrfed_fl::labelmap;
pub use cxrfed_fl::labelmap::{Head, HeadKind, LabelMap};
pub use model::{
    Arch, InputSpec, Model, ModelCard, ModelFormat, device_name, load_card, parse_device,
    preprocess_options,
};
pub use predict::{HeadOutput, Prediction};
pub use train::{Dataset, Metrics, TrainConfig};
pub use worker::{Incoming, InferenceHandle, StatsSnapshot, WorkerConfig};

#[derive(Debug, Clone, thiserror::Error)]
pub enum ModelError {
    #[error("cannot load model: {0}")]
    Load(String),
    #[error("cannot save model: {0}")]
    Save(String),
    #[error("device: {0}")]
    Device(String),
    #[error("inference failed: {0}")]
    Inference(String),
    #[error("inference queue is full ({capacity} waiting); retry in {retry_after_ms} ms")]
    QueueFull {
        capacity: usize,
        retry_after_ms: u64,
    },
    #[error("training data: {0}")]
    Data(String),
    #[error("training failed: {0}")]
    Train(String),
}

/// Whether this build of libtorch can use CUDA (libtorch_cuda linked and a GPU visible).
pub fn cuda_available() -> bool {
    tch::Cuda::is_available()
}

/// Seeds libtorch's random number generator (weight initialisation, dropout, augmentation noise).
pub fn manual_seed(seed: u64) {
    tch::manual_seed(seed as i64);
}

/// Number of intra-op threads libtorch uses.
pub fn torch_threads() -> i32 {
    tch::get_num_threads()
}

/// Pure forward throughput of `model` at batch size `batch`: images per second of each of
/// `repeats` timed runs over `images` images (after two warm-up batches). Waits for the device
/// after every batch, so CUDA timings are honest.
pub fn forward_throughput(
    model: &Model,
    batch: usize,
    repeats: usize,
    images: usize,
) -> Result<Vec<f64>, ModelError> {
    let size = i64::from(model.card.input.size);
    let xs = tch::Tensor::randn(
        [batch as i64, 1, size, size],
        (tch::Kind::Float, model.device),
    );
    let batches = images.div_ceil(batch).max(1);
    for _ in 0..2 {
        let _ = std::hint::black_box(model.try_forward(&xs)?);
    }
    let mut rates = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let start = std::time::Instant::now();
        for _ in 0..batches {
            let y = model.try_forward(&xs)?;
            std::hint::black_box(y.double_value(&[0, 0]));
        }
        rates.push((batches * batch) as f64 / start.elapsed().as_secs_f64());
    }
    Ok(rates)
}

/// The logits of the reference input (`linspace(-1, 1)` over one image), for checking that two
/// implementations run the same network.
pub fn reference_logits(model: &Model) -> Result<Vec<f32>, ModelError> {
    let size = i64::from(model.card.input.size);
    let x = tch::Tensor::linspace(-1.0, 1.0, size * size, (tch::Kind::Float, model.device))
        .view([1, 1, size, size]);
    let y = model
        .try_forward(&x)?
        .to_device(tch::Device::Cpu)
        .view([-1]);
    Vec::<f32>::try_from(y).map_err(|e| ModelError::Inference(e.to_string()))
}
