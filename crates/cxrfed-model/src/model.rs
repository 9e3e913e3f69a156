//! Architectures, the model card, and loading/saving models (safetensors or TorchScript).

use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

use crate::{LabelMap, ModelError};

/// Backbone architectures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    /// Five strided conv layers with batch norm; for CPU nodes and CI.
    Tiny,
    /// tch::vision ResNet-18 (grayscale repeated to three channels).
    Resnet18,
    /// tch::vision DenseNet-121 (needs 224 x 224 input).
    Densenet121,
    /// TorchXRayVision's DenseNet-121 (`xrv.models.DenseNet`, one channel), imported.
    TxrvDensenet121,
    /// TorchXRayVision's ResNet-50 (`xrv.models.ResNet`, one channel), imported.
    TxrvResnet50,
}

impl Arch {
    pub fn parse(text: &str) -> Option<Arch> {
        match text.to_ascii_lowercase().replace(['-', '_'], "").as_str() {
            "tiny" => Some(Arch::Tiny),
            "resnet18" => Some(Arch::Resnet18),
            "densenet121" => Some(Arch::Densenet121),
            "txrvdensenet121" => Some(Arch::TxrvDensenet121),
            "txrvresnet50" => Some(Arch::TxrvResnet50),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Arch::Tiny => "tiny",
            Arch::Resnet18 => "resnet18",
            Arch::Densenet121 => "densenet121",
            Arch::TxrvDensenet121 => "txrv-densenet121",
            Arch::TxrvResnet50 => "txrv-resnet50",
        }
    }

    /// The input size the architecture is built for by default.
    pub fn default_input_size(self) -> u32 {
        match self {
            Arch::Tiny => 224,
            Arch::Resnet18 | Arch::Densenet121 | Arch::TxrvDensenet121 => 224,
            Arch::TxrvResnet50 => 512,
        }
    }
}

pub use cxrfed_fl::card::{InputSpec, ModelCard, ModelFormat};

/// The preprocessing that produces a model's input (size, aspect handling, normalisation).
/// The aspect is checked when a card is loaded, so an unknown one cannot reach here.
pub fn preprocess_options(input: &InputSpec) -> cxrfed_imaging::PreprocessOptions {
    cxrfed_imaging::PreprocessOptions {
        size: input.size,
        aspect: input.aspect.parse().unwrap_or_default(),
        mean: input.mean,
        std: input.std,
        pipeline: input.pipeline.parse().unwrap_or_default(),
    }
}

/// `dir/card.json`, with its label map, input aspect and input pipeline checked.
pub fn load_card(dir: &Path) -> Result<ModelCard, ModelError> {
    let card = ModelCard::load(dir).map_err(|e| ModelError::Load(e.to_string()))?;
    card.input
        .aspect
        .parse::<cxrfed_imaging::Aspect>()
        .map_err(|e| ModelError::Load(format!("{}: input: {e}", dir.display())))?;
    card.input
        .pipeline
        .parse::<cxrfed_imaging::Pipeline>()
        .map_err(|e| ModelError::Load(format!("{}: input: {e}", dir.display())))?;
    Ok(card)
}

pub fn sha256_file(path: &Path) -> Result<String, ModelError> {
    let bytes =
        std::fs::read(path).map_err(|e| ModelError::Load(format!("{}: {e}", path.display())))?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

/// Parses `auto`, `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(text: &str) -> Result<Device, ModelError> {
    match text.trim().to_ascii_lowercase().as_str() {
        "auto" | "" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" | "gpu" => {
            if tch::Cuda::is_available() {
                Ok(Device::Cuda(0))
            } else {
                Err(ModelError::Device(
                    "CUDA requested but not available (is libtorch_cuda linked and a GPU visible?)"
                        .into(),
                ))
            }
        }
        other => match other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(n) if tch::Cuda::is_available() && (n as i64) < tch::Cuda::device_count() => {
                Ok(Device::Cuda(n))
            }
            Some(n) => Err(ModelError::Device(format!(
                "cuda:{n} is not available ({} CUDA devices)",
                tch::Cuda::device_count()
            ))),
            None => Err(ModelError::Device(format!(
                "unknown device {other:?} (auto, cpu, cuda, cuda:N)"
            ))),
        },
    }
}

pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(n) => format!("cuda:{n}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// A cxrfed network: shared backbone, one linear head per label-map head; the forward pass
/// returns the concatenated logits `[N, label_map.width()]`.
#[derive(Debug)]
pub struct Net {
    backbone: Box<dyn ModuleT + Send>,
    heads: Vec<nn::Linear>,
    arch: Arch,
}

fn conv_bn(p: nn::Path, c_in: i64, c_out: i64, k: i64, stride: i64) -> nn::SequentialT {
    let conv = nn::conv2d(
        &p / "conv",
        c_in,
        c_out,
        k,
        nn::ConvConfig {
            stride,
            padding: k / 2,
            bias: false,
            ..Default::default()
        },
    );
    nn::seq_t()
        .add(conv)
        .add(nn::batch_norm2d(&p / "bn", c_out, Default::default()))
        .add_fn(|x| x.relu())
}

/// Number of backbone features of the tiny net: global average (96) plus a 4x4 spatial grid
/// (96 x 16), because the ratio and zones need to know where things are.
const TINY_CHANNELS: i64 = 96;
const TINY_FEATURES: i64 = TINY_CHANNELS * 17;
const TRUNK: i64 = 256;

impl Net {
    pub fn new(root: &nn::Path, arch: Arch, label_map: &LabelMap) -> Net {
        let features = &(root / "backbone");
        let (backbone, width): (Box<dyn ModuleT + Send>, i64) = match arch {
            Arch::Tiny => {
                let seq = nn::seq_t()
                    .add(conv_bn(features / "c1", 1, 16, 5, 2))
                    .add(conv_bn(features / "c2", 16, 32, 3, 2))
                    .add(conv_bn(features / "c3", 32, 48, 3, 2))
                    .add(conv_bn(features / "c4", 48, 64, 3, 2))
                    .add(conv_bn(features / "c5", 64, TINY_CHANNELS, 3, 2))
                    .add_fn(|x| {
                        let global = x.adaptive_avg_pool2d([1, 1]).flatten(1, -1);
                        let grid = x.adaptive_avg_pool2d([4, 4]).flatten(1, -1);
                        Tensor::cat(&[global, grid], 1)
                    })
                    .add(nn::linear(
                        features / "trunk",
                        TINY_FEATURES,
                        TRUNK,
                        Default::default(),
                    ))
                    .add_fn(|x| x.relu())
                    .add_fn_t(|x, train| x.dropout(0.1, train));
                (Box::new(seq), TRUNK)
            }
            Arch::Resnet18 => {
                let net = tch::vision::resnet::resnet18_no_final_layer(&(features / "resnet"));
                let seq = nn::seq_t()
                    .add_fn(|x| x.expand([-1, 3, -1, -1], false))
                    .add(net);
                (Box::new(seq), 512)
            }
            Arch::Densenet121 => {
                // tch's DenseNet ends in a classifier; it serves as a 512-wide projection.
                let net = tch::vision::densenet::densenet121(&(features / "densenet"), 512);
                let seq = nn::seq_t()
                    .add_fn(|x| x.expand([-1, 3, -1, -1], false))
                    .add(net)
                    .add_fn(|x| x.relu());
                (Box::new(seq), 512)
            }
            // TXRV's variable names sit directly under `backbone.` (see `txrv`).
            Arch::TxrvDensenet121 => (
                Box::new(crate::txrv::densenet121(features)),
                crate::txrv::DENSENET_FEATURES,
            ),
            Arch::TxrvResnet50 => (
                Box::new(crate::txrv::resnet50(features)),
                crate::txrv::RESNET_FEATURES,
            ),
        };
        let heads = label_map
            .heads
            .iter()
            .map(|head| {
                nn::linear(
                    root / "heads" / head.name.as_str(),
                    width,
                    head.width() as i64,
                    Default::default(),
                )
            })
            .collect();
        Net {
            backbone,
            heads,
            arch,
        }
    }

    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// `[N, 1, H, W]` normalised input to `[N, width]` logits.
    pub fn forward(&self, xs: &Tensor, train: bool) -> Tensor {
        let features = self.backbone.forward_t(xs, train);
        let outputs: Vec<Tensor> = self.heads.iter().map(|h| features.apply(h)).collect();
        Tensor::cat(&outputs, 1)
    }
}

/// A loaded model: either a cxrfed architecture with its variables, or a TorchScript module.
#[derive(Debug)]
pub enum Backend {
    Native { vs: nn::VarStore, net: Net },
    Script { module: tch::CModule },
}

#[derive(Debug)]
pub struct Model {
    pub card: ModelCard,
    pub backend: Backend,
    pub device: Device,
}

impl Model {
    /// A fresh, randomly initialised cxrfed model.
    pub fn new(
        arch: Arch,
        label_map: LabelMap,
        input: InputSpec,
        device: Device,
        model_id: &str,
    ) -> Result<Model, ModelError> {
        label_map.validate().map_err(ModelError::Load)?;
        if arch == Arch::Densenet121 && input.size != 224 {
            return Err(ModelError::Load("densenet121 needs input size 224".into()));
        }
        let vs = nn::VarStore::new(device);
        let net = Net::new(&vs.root(), arch, &label_map);
        Ok(Model {
            card: ModelCard {
                model_id: model_id.to_string(),
                format: ModelFormat::Safetensors,
                architecture: arch.as_str().into(),
                input,
                label_map,
                weights: "model.safetensors".into(),
                weights_sha256: String::new(),
                intended_use: String::new(),
                training: serde_json::Value::Null,
                metrics: serde_json::Value::Null,
                created_at: String::new(),
            },
            backend: Backend::Native { vs, net },
            device,
        })
    }

    /// Loads a model directory (`card.json` plus weights), checks the weights' sha256, and
    /// runs one forward pass to check the outputs match the label map.
    pub fn load(dir: &Path, device: Device) -> Result<Model, ModelError> {
        let card = load_card(dir)?;
        let weights = card.weights_path(dir);
        let sha = sha256_file(&weights)?;
        if !card.weights_sha256.is_empty() && card.weights_sha256 != sha {
            return Err(ModelError::Load(format!(
                "{}: sha256 {sha} does not match the model card ({})",
                weights.display(),
                card.weights_sha256
            )));
        }
        let backend = match card.format {
            ModelFormat::Safetensors => {
                let arch = Arch::parse(&card.architecture).ok_or_else(|| {
                    ModelError::Load(format!("unknown architecture {:?}", card.architecture))
                })?;
                let mut vs = nn::VarStore::new(device);
                let net = Net::new(&vs.root(), arch, &card.label_map);
                vs.load(&weights).map_err(|e| {
                    ModelError::Load(format!(
                        "{}: {e} (do the weights match architecture {} and the label map?)",
                        weights.display(),
                        arch.as_str()
                    ))
                })?;
                Backend::Native { vs, net }
            }
            ModelFormat::Torchscript => {
                let mut module = tch::CModule::load_on_device(&weights, device)
                    .map_err(|e| ModelError::Load(format!("{}: {e}", weights.display())))?;
                module.set_eval();
                Backend::Script { module }
            }
        };
        let mut card = card;
        card.weights_sha256 = sha;
        let model = Model {
            card,
            backend,
            device,
        };
        model.check_outputs()?;
        Ok(model)
    }

    /// One forward pass on zeros: the output must be `[2, label_map.width()]`.
    fn check_outputs(&self) -> Result<(), ModelError> {
        let size = i64::from(self.card.input.size);
        let xs = Tensor::zeros([2, 1, size, size], (Kind::Float, self.device));
        let out = self.try_forward(&xs)?;
        let expected = [2, self.card.label_map.width() as i64];
        if out.size() != expected {
            return Err(ModelError::Load(format!(
                "model outputs shape {:?} for a batch of 2 but its label map needs {:?} ({} heads)",
                out.size(),
                expected,
                self.card.label_map.heads.len()
            )));
        }
        Ok(())
    }

    /// Inference forward pass (eval mode, no grad).
    pub fn try_forward(&self, xs: &Tensor) -> Result<Tensor, ModelError> {
        tch::no_grad(|| match &self.backend {
            Backend::Native { net, .. } => Ok(net.forward(xs, false)),
            Backend::Script { module } => module
                .forward_ts(&[xs])
                .map_err(|e| ModelError::Inference(e.to_string())),
        })
    }

    /// Saves weights as safetensors plus the card (with the weights' sha256).
    pub fn save(&mut self, dir: &Path) -> Result<(), ModelError> {
        let Backend::Native { vs, .. } = &self.backend else {
            return Err(ModelError::Save(
                "TorchScript models are saved by their own tooling".into(),
            ));
        };
        std::fs::create_dir_all(dir).map_err(|e| ModelError::Save(e.to_string()))?;
        let weights = self.card.weights_path(dir);
        vs.save(&weights)
            .map_err(|e| ModelError::Save(e.to_string()))?;
        self.card.weights_sha256 = sha256_file(&weights)?;
        self.card
            .save(dir)
            .map_err(|e| ModelError::Save(e.to_string()))
    }

    pub fn native(&self) -> Option<(&nn::VarStore, &Net)> {
        match &self.backend {
            Backend::Native { vs, net } => Some((vs, net)),
            Backend::Script { .. } => None,
        }
    }
}
