//! One site's part of a federated round: build the global model from its card and weights
//! (safetensors bytes, as they arrive over the link), train it on the site's own samples with
//! the library training step ([`crate::train::fit_with`]), and return the weights delta of the
//! trainable part — optionally clipped to an L2 norm for DP-FedAvg.
//!
//! Which part trains is the job's choice: the heads only, the last backbone block plus the
//! heads, or everything. Frozen variables (batch-norm statistics included) are put back to
//! the global values after training, so a delta never touches them.

use std::collections::BTreeMap;

use cxrfed_fl::Weights;
use tch::{Device, Kind, Tensor};

use crate::model::Backend;
use crate::train::{Dataset, FitOptions, TrainConfig, fit_with};
use crate::{Arch, Model, ModelCard, ModelError};

pub use cxrfed_fl::spec::{LocalSpec, Trainable};

/// What one site's round produced.
#[derive(Debug, Clone)]
pub struct LocalUpdate {
    /// The delta of the trainable variables (safetensors, f32).
    pub delta: Vec<u8>,
    pub samples: usize,
    pub train_loss: f64,
    pub seconds: f64,
    /// L2 norm of the delta before clipping.
    pub norm: f64,
    pub clipped: bool,
}

/// Backbone prefixes of each architecture's last block.
fn last_block(arch: Arch) -> &'static [&'static str] {
    match arch {
        Arch::Tiny => &["backbone.c5.", "backbone.trunk."],
        Arch::Resnet18 => &["backbone.resnet.layer4."],
        Arch::Densenet121 => &[
            "backbone.densenet.features.denseblock4.",
            "backbone.densenet.features.norm5.",
            "backbone.densenet.classifier.",
        ],
        Arch::TxrvDensenet121 => crate::txrv::DENSENET_LAST_BLOCK,
        Arch::TxrvResnet50 => crate::txrv::RESNET_LAST_BLOCK,
    }
}

/// Whether variable `name` trains under `spec`.
pub fn trains(name: &str, arch: Arch, spec: &LocalSpec) -> bool {
    let head_selected = |rest: &str| {
        spec.heads.is_empty()
            || spec.heads.iter().any(|h| {
                rest.strip_prefix(h.as_str())
                    .is_some_and(|r| r.starts_with('.'))
            })
    };
    if let Some(rest) = name.strip_prefix("heads.") {
        return head_selected(rest);
    }
    match spec.trainable {
        Trainable::Heads => false,
        Trainable::LastBlock => last_block(arch).iter().any(|p| name.starts_with(p)),
        Trainable::All => true,
    }
}

fn to_vec(t: &Tensor) -> Result<Vec<f32>, ModelError> {
    Vec::<f32>::try_from(t.to_kind(Kind::Float).to_device(Device::Cpu).flatten(0, -1))
        .map_err(|e| ModelError::Train(e.to_string()))
}

/// Named f32 tensors as safetensors bytes (the one codec, `cxrfed_fl::tensor`).
pub fn encode(tensors: Weights) -> Result<Vec<u8>, ModelError> {
    cxrfed_fl::tensor::encode(&tensors).map_err(|e| ModelError::Save(e.to_string()))
}

impl Model {
    /// A native model from its card and safetensors bytes (the global weights of a round).
    pub fn from_bytes(
        card: ModelCard,
        weights: &[u8],
        device: Device,
    ) -> Result<Model, ModelError> {
        let arch = Arch::parse(&card.architecture).ok_or_else(|| {
            ModelError::Load(format!("unknown architecture {:?}", card.architecture))
        })?;
        let mut model = Model::new(
            arch,
            card.label_map.clone(),
            card.input.clone(),
            device,
            &card.model_id,
        )?;
        model.card = card;
        model.load_bytes(weights)?;
        Ok(model)
    }

    /// Overwrites every variable from safetensors bytes; each must be present with its shape.
    pub fn load_bytes(&mut self, weights: &[u8]) -> Result<(), ModelError> {
        let Backend::Native { vs, .. } = &self.backend else {
            return Err(ModelError::Load(
                "TorchScript models have no named weights".into(),
            ));
        };
        let file = cxrfed_fl::tensor::decode(weights)
            .map_err(|e| ModelError::Load(format!("weights: {e}")))?;
        let mut variables = vs.variables();
        let mut names: Vec<&String> = variables.keys().collect();
        names.sort();
        let missing: Vec<&&String> = names
            .iter()
            .filter(|n| !file.contains_key(n.as_str()))
            .take(3)
            .collect();
        if !missing.is_empty() {
            return Err(ModelError::Load(format!(
                "the weights lack {missing:?} (do they match the architecture and label map?)"
            )));
        }
        tch::no_grad(|| {
            for (name, var) in variables.iter_mut() {
                let Some(tensor) = file.get(name) else {
                    return Err(ModelError::Load(format!("{name}: missing")));
                };
                let shape: Vec<i64> = tensor.shape.iter().map(|d| *d as i64).collect();
                if shape != var.size() {
                    return Err(ModelError::Load(format!(
                        "{name}: f32 {shape:?} where the model has f32 {:?}",
                        var.size()
                    )));
                }
                var.copy_(
                    &Tensor::from_slice(&tensor.data)
                        .view(shape.as_slice())
                        .to_device(var.device()),
                );
            }
            Ok(())
        })
    }

    /// Every variable as safetensors bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, ModelError> {
        let Backend::Native { vs, .. } = &self.backend else {
            return Err(ModelError::Save(
                "TorchScript models have no named weights".into(),
            ));
        };
        let mut out = Weights::new();
        for (name, var) in vs.variables() {
            let shape = var.size().iter().map(|d| *d as usize).collect();
            out.insert(
                name,
                cxrfed_fl::Tensor {
                    shape,
                    data: to_vec(&var)?,
                },
            );
        }
        encode(out)
    }
}

/// Trains `model` (holding the global weights) on `train` as one site's round and returns the
/// delta of its trainable variables.
pub fn train_round(
    model: &mut Model,
    train: &Dataset,
    spec: &LocalSpec,
) -> Result<LocalUpdate, ModelError> {
    let started = std::time::Instant::now();
    let (arch, variables) = match &model.backend {
        Backend::Native { vs, net } => (net.arch(), vs.variables()),
        Backend::Script { .. } => {
            return Err(ModelError::Train(
                "TorchScript models cannot be trained here".into(),
            ));
        }
    };
    for head in &spec.heads {
        if model.card.label_map.head(head).is_none() {
            return Err(ModelError::Train(format!("the model has no head {head:?}")));
        }
    }
    let global: BTreeMap<String, Tensor> = variables
        .iter()
        .map(|(n, t)| (n.clone(), t.detach().copy()))
        .collect();
    let mut trained = Vec::new();
    for (name, var) in &variables {
        if trains(name, arch, spec) {
            trained.push(name.clone());
        } else if var.requires_grad() {
            let _ = var.set_requires_grad(false);
        }
    }
    trained.sort();
    if trained.is_empty() {
        return Err(ModelError::Train("nothing to train".into()));
    }
    let prox: Vec<(Tensor, Tensor)> = trained
        .iter()
        .filter(|n| variables[*n].requires_grad())
        .map(|n| (variables[n].shallow_clone(), global[n].shallow_clone()))
        .collect();
    let mu = spec.prox_mu;
    let device = model.device;
    let penalty = move || {
        let mut total = Tensor::zeros([], (Kind::Float, device));
        for (w, g) in &prox {
            total += (w - g).square().sum(Kind::Float);
        }
        total * (mu / 2.0)
    };
    let config = TrainConfig {
        epochs: spec.epochs.max(1),
        batch_size: spec.batch_size.max(2),
        learning_rate: spec.learning_rate,
        weight_decay: 0.0,
        augment: spec.augment,
        seed: spec.seed,
    };
    let options = FitOptions {
        penalty: (mu > 0.0).then_some(&penalty as &dyn Fn() -> Tensor),
        max_steps: spec.max_steps,
        constant_lr: true,
    };
    let reports = fit_with(model, train, None, &config, &options, &mut |_| {})?;
    let train_loss = reports.last().map_or(f64::NAN, |r| r.train_loss);
    // Frozen variables (and their batch-norm statistics) go back to the global values.
    tch::no_grad(|| {
        for (name, var) in &variables {
            if !trains(name, arch, spec) {
                let mut var = var.shallow_clone();
                var.copy_(&global[name]);
            }
        }
    });
    let mut delta = Weights::new();
    let mut norm2 = 0.0f64;
    for name in &trained {
        let data = to_vec(&(&variables[name] - &global[name]))?;
        norm2 += data.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>();
        let shape = variables[name].size().iter().map(|s| *s as usize).collect();
        delta.insert(name.clone(), cxrfed_fl::Tensor { shape, data });
    }
    let norm = norm2.sqrt();
    let clipped = spec.clip > 0.0 && norm > spec.clip;
    if clipped {
        let scale = (spec.clip / norm) as f32;
        for t in delta.values_mut() {
            for v in t.data.iter_mut() {
                *v *= scale;
            }
        }
    }
    if delta.values().flat_map(|t| &t.data).any(|v| !v.is_finite()) {
        return Err(ModelError::Train(
            "training diverged (NaN in the update)".into(),
        ));
    }
    Ok(LocalUpdate {
        delta: encode(delta)?,
        samples: train.len(),
        train_loss,
        seconds: started.elapsed().as_secs_f64(),
        norm,
        clipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::{Sample, Target};
    use crate::{InputSpec, LabelMap};
    use safetensors::tensor::SafeTensors;

    fn tiny() -> Model {
        crate::manual_seed(3);
        Model::new(
            Arch::Tiny,
            LabelMap::schema_v1(),
            InputSpec {
                size: 32,
                ..InputSpec::default()
            },
            Device::Cpu,
            "t",
        )
        .expect("model")
    }

    fn data(label_map: &LabelMap, n: usize) -> Dataset {
        let (h, _) = label_map.head("rib_fracture").expect("head");
        let samples = (0..n)
            .map(|i| {
                let mut targets = vec![None; label_map.heads.len()];
                targets[h] = Some(Target::Binary(i % 2 == 0));
                Sample {
                    input: (0..32 * 32)
                        .map(|p| {
                            if i % 2 == 0 {
                                (p % 7) as f32 / 7.0
                            } else {
                                0.0
                            }
                        })
                        .collect(),
                    targets,
                    name: format!("s{i}"),
                }
            })
            .collect();
        Dataset {
            size: 32,
            label_map: label_map.clone(),
            samples,
        }
    }

    #[test]
    fn weights_round_trip_through_bytes() {
        let a = tiny();
        let bytes = a.to_bytes().expect("bytes");
        crate::manual_seed(99);
        let b = Model::from_bytes(a.card.clone(), &bytes, Device::Cpu).expect("load");
        assert_eq!(b.to_bytes().expect("bytes"), bytes);
        assert!(Model::from_bytes(a.card.clone(), b"junk", Device::Cpu).is_err());
    }

    #[test]
    fn heads_only_touches_only_the_chosen_head() {
        let mut model = tiny();
        let before = model.to_bytes().expect("bytes");
        let spec = LocalSpec {
            heads: vec!["rib_fracture".into()],
            epochs: 2,
            learning_rate: 1e-2,
            ..LocalSpec::default()
        };
        let data = data(&model.card.label_map, 8);
        let update = train_round(&mut model, &data, &spec).expect("round");
        let file = SafeTensors::deserialize(&update.delta).expect("delta");
        let mut names: Vec<String> = file.names().into_iter().cloned().collect();
        names.sort();
        assert_eq!(
            names,
            vec!["heads.rib_fracture.bias", "heads.rib_fracture.weight"]
        );
        assert!(update.norm > 0.0);
        // Everything else is exactly the global value.
        let after = SafeTensors::deserialize(&model.to_bytes().expect("bytes"))
            .expect("after")
            .tensors()
            .into_iter()
            .map(|(n, v)| (n, v.data().to_vec()))
            .collect::<BTreeMap<_, _>>();
        let before = SafeTensors::deserialize(&before).expect("before");
        for (name, view) in before.tensors() {
            if !name.starts_with("heads.rib_fracture.") {
                assert_eq!(after[&name], view.data(), "{name} changed");
            }
        }
    }

    #[test]
    fn the_proximal_term_keeps_the_update_near_the_global_model() {
        let spec = |prox_mu| LocalSpec {
            trainable: Trainable::All,
            epochs: 3,
            learning_rate: 1e-2,
            prox_mu,
            ..LocalSpec::default()
        };
        let norm = |mu| {
            let mut model = tiny();
            let data = data(&model.card.label_map, 8);
            crate::manual_seed(4);
            train_round(&mut model, &data, &spec(mu))
                .expect("round")
                .norm
        };
        let (free, proximal) = (norm(0.0), norm(50.0));
        assert!(proximal < free, "FedProx delta {proximal} vs plain {free}");
    }

    #[test]
    fn last_block_and_clipping() {
        let spec = LocalSpec {
            trainable: Trainable::LastBlock,
            clip: 1e-3,
            learning_rate: 1e-2,
            ..LocalSpec::default()
        };
        assert!(trains("backbone.c5.conv.weight", Arch::Tiny, &spec));
        assert!(trains("backbone.trunk.weight", Arch::Tiny, &spec));
        assert!(!trains("backbone.c1.conv.weight", Arch::Tiny, &spec));
        let mut model = tiny();
        let data = data(&model.card.label_map, 8);
        let update = train_round(&mut model, &data, &spec).expect("round");
        assert!(update.clipped && update.norm > 1e-3);
        let file = SafeTensors::deserialize(&update.delta).expect("delta");
        let norm: f64 = file
            .tensors()
            .iter()
            .flat_map(|(_, v)| {
                v.data()
                    .chunks_exact(4)
                    .map(|b| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])).powi(2))
                    .collect::<Vec<_>>()
            })
            .sum::<f64>()
            .sqrt();
        assert!((norm - 1e-3).abs() < 1e-6, "clipped norm {norm}");
    }
}
