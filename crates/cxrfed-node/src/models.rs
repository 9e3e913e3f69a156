//! The node's model: the configured one or the one the study promoted (`models/ACTIVE`),
//! loaded onto its device behind an inference worker.

use std::time::Duration;

use crate::config::NodeConfig;

/// The file under `models/` naming the promoted model the node runs.
pub const ACTIVE_FILE: &str = "ACTIVE";

/// The inference worker settings of the node's configuration.
pub fn worker_config(config: &NodeConfig) -> cxrfed_model::WorkerConfig {
    cxrfed_model::WorkerConfig {
        max_batch: config.max_batch,
        max_wait: Duration::from_millis(config.max_wait_ms),
        queue_capacity: config.inference_queue,
    }
}

/// The directory of the model the study promoted to this node, if one was installed
/// (`models/ACTIVE` names it).
pub fn promoted_dir(config: &NodeConfig) -> Option<std::path::PathBuf> {
    let models = config.data_dir.join("models");
    let version = std::fs::read_to_string(models.join(ACTIVE_FILE)).ok()?;
    let dir = models.join(version.trim());
    dir.join("card.json").exists().then_some(dir)
}

/// Loads the model onto its device and starts the inference worker: the model the study
/// promoted, once one was installed, else the configured one. `--model none` opts out of both.
pub fn load(
    config: &NodeConfig,
) -> Result<Option<cxrfed_model::InferenceHandle>, cxrfed_model::ModelError> {
    if config.model.trim() == "none" {
        return Ok(None);
    }
    let device = cxrfed_model::parse_device(&config.device)?;
    let promoted = promoted_dir(config).and_then(|dir| {
        cxrfed_model::Model::load(&dir, device)
            .map_err(|e| {
                tracing::error!(dir = %dir.display(), error = %e, "the promoted model does not load; using the configured one")
            })
            .ok()
    });
    let model = match promoted {
        Some(model) => model,
        None => {
            let dir = match config.model.trim() {
                "bundled" => cxrfed_model::bundled::install(&config.data_dir.join("models"))?,
                path => std::path::PathBuf::from(path),
            };
            cxrfed_model::Model::load(&dir, device)?
        }
    };
    tracing::info!(
        model_id = model.card.model_id.as_str(),
        model_sha256 = model.card.weights_sha256.as_str(),
        architecture = model.card.architecture.as_str(),
        device = cxrfed_model::device_name(device).as_str(),
        input_size = model.card.input.size,
        "model loaded"
    );
    let handle = cxrfed_model::InferenceHandle::spawn(model, worker_config(config))?;
    Ok(Some(handle))
}
