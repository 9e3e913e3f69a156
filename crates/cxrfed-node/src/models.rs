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

/// The file under `models/` listing the models that ran before the active one (oldest first;
/// `configured` for the configured model), for `cxrfed node model rollback`.
pub const HISTORY_FILE: &str = "HISTORY";
/// What the history calls the configured model.
pub const CONFIGURED: &str = "configured";

/// The active promoted version, or [`CONFIGURED`].
pub fn active_version(config: &NodeConfig) -> String {
    std::fs::read_to_string(config.data_dir.join("models").join(ACTIVE_FILE))
        .map(|v| v.trim().to_string())
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| CONFIGURED.to_string())
}

fn history_path(config: &NodeConfig) -> std::path::PathBuf {
    config.data_dir.join("models").join(HISTORY_FILE)
}

/// The models that ran before the active one, oldest first.
pub fn history(config: &NodeConfig) -> Vec<String> {
    std::fs::read_to_string(history_path(config))
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// Writes the history (through a temporary file and a rename).
pub fn write_history(config: &NodeConfig, list: &[String]) -> std::io::Result<()> {
    let models = config.data_dir.join("models");
    std::fs::create_dir_all(&models)?;
    let mut file = tempfile::NamedTempFile::new_in(&models)?;
    std::io::Write::write_all(&mut file, list.join("\n").as_bytes())?;
    file.as_file().sync_all()?;
    file.persist(history_path(config)).map_err(|e| e.error)?;
    Ok(())
}

/// Makes `version` (or [`CONFIGURED`]) the model a restart loads.
pub fn set_active(config: &NodeConfig, version: &str) -> std::io::Result<()> {
    let models = config.data_dir.join("models");
    if version == CONFIGURED {
        return match std::fs::remove_file(models.join(ACTIVE_FILE)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
    }
    let mut file = tempfile::NamedTempFile::new_in(&models)?;
    std::io::Write::write_all(&mut file, version.as_bytes())?;
    file.as_file().sync_all()?;
    file.persist(models.join(ACTIVE_FILE))
        .map_err(|e| e.error)?;
    Ok(())
}

/// Loads `version` from `models/` (or the configured model) onto the node's device.
pub fn load_version(
    config: &NodeConfig,
    version: &str,
) -> Result<cxrfed_model::Model, cxrfed_model::ModelError> {
    let device = cxrfed_model::parse_device(&config.device)?;
    let dir = if version == CONFIGURED {
        match config.model.trim() {
            "bundled" => cxrfed_model::bundled::install(&config.data_dir.join("models"))?,
            path => std::path::PathBuf::from(path),
        }
    } else {
        config.data_dir.join("models").join(version)
    };
    cxrfed_model::Model::load(&dir, device)
}
