//! The model card (`card.json` beside the weights): what a model is, what input it takes and
//! what its outputs mean. Node, coordinator and model crate read and write it through these
//! types only; nothing builds its JSON by hand.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::labelmap::LabelMap;

#[derive(Debug, thiserror::Error)]
pub enum CardError {
    #[error("{path}: {message}")]
    Read { path: String, message: String },
    #[error("model card: {0}")]
    Invalid(String),
    #[error("cannot write the model card: {0}")]
    Write(String),
}

/// How the weights are stored.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    Serialize,
    Deserialize,
    strum::Display,
    strum::EnumString,
)]
#[serde(rename_all = "lowercase")]
#[strum(serialize_all = "lowercase")]
pub enum ModelFormat {
    /// A cxrfed architecture's variables (fine-tunable, federated).
    #[default]
    Safetensors,
    /// A TorchScript module (bring your own; inference only, never accepted from a peer).
    Torchscript,
}

/// Input contract of a model: what the node's preprocessing must produce.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputSpec {
    pub size: u32,
    pub channels: u32,
    /// "pad" or "center-crop" (also "crop"), as in `cxrfed_imaging::Aspect`.
    pub aspect: String,
    pub mean: f32,
    pub std: f32,
    /// The preprocessing the model was trained with: empty (or "cxrfed") for cxrfed's own,
    /// "torchxrayvision" for TXRV's, reproduced exactly (`cxrfed_imaging::txrv_input`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pipeline: String,
}

impl Default for InputSpec {
    fn default() -> Self {
        InputSpec {
            size: 224,
            channels: 1,
            aspect: "pad".into(),
            mean: 0.5,
            std: 0.25,
            pipeline: Default::default(),
        }
    }
}

/// The model card. (`Default` is an empty placeholder, not a valid card: `parse` refuses an
/// empty label map.)
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    pub model_id: String,
    pub format: ModelFormat,
    /// The architecture for safetensors models; free text for TorchScript.
    pub architecture: String,
    pub input: InputSpec,
    pub label_map: LabelMap,
    /// Weights file name inside the model directory.
    pub weights: String,
    pub weights_sha256: String,
    #[serde(default)]
    pub intended_use: String,
    #[serde(default)]
    pub training: serde_json::Value,
    #[serde(default)]
    pub metrics: serde_json::Value,
    #[serde(default)]
    pub created_at: String,
}

impl ModelCard {
    /// A card from its JSON, with its label map checked.
    pub fn parse(bytes: &[u8]) -> Result<ModelCard, CardError> {
        let card: ModelCard =
            serde_json::from_slice(bytes).map_err(|e| CardError::Invalid(e.to_string()))?;
        card.label_map.validate().map_err(CardError::Invalid)?;
        Ok(card)
    }

    /// `dir/card.json`.
    pub fn load(dir: &Path) -> Result<ModelCard, CardError> {
        let path = dir.join("card.json");
        let bytes = std::fs::read(&path).map_err(|e| CardError::Read {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        ModelCard::parse(&bytes).map_err(|e| CardError::Read {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    /// The card as JSON (pretty, as written to `card.json`).
    pub fn to_json(&self) -> Result<Vec<u8>, CardError> {
        serde_json::to_vec_pretty(self).map_err(|e| CardError::Write(e.to_string()))
    }

    /// Writes `dir/card.json`.
    pub fn save(&self, dir: &Path) -> Result<(), CardError> {
        std::fs::write(dir.join("card.json"), self.to_json()?)
            .map_err(|e| CardError::Write(e.to_string()))
    }

    pub fn weights_path(&self, dir: &Path) -> PathBuf {
        dir.join(&self.weights)
    }

    /// The names of the model's heads, in output order.
    pub fn heads(&self) -> Vec<String> {
        self.label_map
            .heads
            .iter()
            .map(|h| h.name.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bundled_card_parses_and_round_trips() {
        let bytes = include_bytes!("../../../models/tiny-phantom-v1/card.json");
        let card = ModelCard::parse(bytes).expect("bundled card");
        assert_eq!(card.format, ModelFormat::Safetensors);
        assert!(!card.heads().is_empty());
        let again = ModelCard::parse(&card.to_json().expect("json")).expect("again");
        assert_eq!(again, card);
    }

    #[test]
    fn unknown_formats_and_bad_label_maps_are_refused() {
        let bytes = include_bytes!("../../../models/tiny-phantom-v1/card.json");
        let mut value: serde_json::Value = serde_json::from_slice(bytes).expect("json");
        value["format"] = "pickle".into();
        let err = ModelCard::parse(value.to_string().as_bytes()).expect_err("format");
        assert!(err.to_string().contains("pickle"), "{err}");
        let mut value: serde_json::Value = serde_json::from_slice(bytes).expect("json");
        value["label_map"]["heads"] = serde_json::json!([]);
        assert!(ModelCard::parse(value.to_string().as_bytes()).is_err());
    }
}
