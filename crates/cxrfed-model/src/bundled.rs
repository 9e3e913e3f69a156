//! The bundled model: the tiny architecture trained on synthetic phantoms only, compiled into
//! the binary so a node has a model with no download. Reproduce it with `make model` (see the
//! README); the card says what it was trained on and that it is not for clinical use.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::ModelError;

/// Name of the bundled model's directory under `models/` in the source tree.
pub const NAME: &str = "tiny-phantom-v1";
const CARD: &[u8] = include_bytes!("../../../models/tiny-phantom-v1/card.json");
const WEIGHTS: &[u8] = include_bytes!("../../../models/tiny-phantom-v1/model.safetensors");

/// sha256 of the bundled weights.
pub fn weights_sha256() -> String {
    hex::encode(Sha256::digest(WEIGHTS))
}

/// Writes the bundled model to `parent/tiny-phantom-v1` (unless an identical copy is there)
/// and returns that directory.
pub fn install(parent: &Path) -> Result<PathBuf, ModelError> {
    let dir = parent.join(NAME);
    let weights = dir.join("model.safetensors");
    let card = dir.join("card.json");
    let current = std::fs::read(&weights)
        .ok()
        .map(|b| hex::encode(Sha256::digest(b)));
    let card_current = std::fs::read(&card).ok();
    if current.as_deref() == Some(weights_sha256().as_str())
        && card_current.as_deref() == Some(CARD)
    {
        return Ok(dir);
    }
    std::fs::create_dir_all(&dir)
        .map_err(|e| ModelError::Save(format!("{}: {e}", dir.display())))?;
    for (path, bytes) in [(&weights, WEIGHTS), (&card, CARD)] {
        let written = tempfile::NamedTempFile::new_in(&dir).and_then(|mut file| {
            file.write_all(bytes)?;
            file.persist(path).map_err(|e| e.error)?;
            Ok(())
        });
        written.map_err(|e| ModelError::Save(format!("{}: {e}", path.display())))?;
    }
    Ok(dir)
}
