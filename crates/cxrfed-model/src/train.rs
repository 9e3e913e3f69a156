//! Training and evaluation over a dataset abstraction.
//!
//! A [`Dataset`] is preprocessed inputs plus per-head targets, any of which may be missing
//! (masked out of the loss). It comes from a phantom folder with its labels file
//! ([`Dataset::from_labels_folder`]) or from any source that builds [`Sample`]s — records plus
//! annotations from a node's store, in federated training. [`fit`] is the step federated
//! rounds call on every site.

use std::path::Path;

use cxrfed_imaging::{Limits, PreprocessOptions, SiteSecret};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::Value;
use tch::nn::OptimizerConfig;
use tch::{Kind, Reduction, Tensor, nn};

use crate::labelmap::{HeadKind, LabelMap};
use crate::predict::{HeadOutput, Prediction, activate};
use crate::{Model, ModelError};

/// The target of one head for one image.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    Class(usize),
    Binary(bool),
    Multi(Vec<bool>),
    Value(f64),
}

#[derive(Debug, Clone)]
pub struct Sample {
    /// Normalised `size x size` input, row-major.
    pub input: Vec<f32>,
    /// One entry per label-map head; `None` when unlabelled.
    pub targets: Vec<Option<Target>>,
    pub name: String,
}

#[derive(Debug, Clone)]
pub struct Dataset {
    pub size: u32,
    pub label_map: LabelMap,
    pub samples: Vec<Sample>,
}

/// Reads one head's target from a labels-file value; `Null`/absent means unlabelled.
pub fn parse_target(kind: &HeadKind, value: &Value) -> Result<Option<Target>, String> {
    if value.is_null() {
        return Ok(None);
    }
    Ok(Some(match kind {
        HeadKind::Categorical { categories } => {
            let text = value
                .as_str()
                .ok_or_else(|| format!("expected a category, got {value}"))?;
            Target::Class(
                categories
                    .iter()
                    .position(|c| c == text)
                    .ok_or_else(|| format!("unknown category {text:?}"))?,
            )
        }
        HeadKind::Binary => Target::Binary(match value {
            Value::Bool(b) => *b,
            Value::String(s) if s == "true" => true,
            Value::String(s) if s == "false" => false,
            _ => return Err(format!("expected a boolean, got {value}")),
        }),
        HeadKind::MultiLabel { labels } => {
            let items = value
                .as_array()
                .ok_or_else(|| format!("expected a list, got {value}"))?;
            let names: Vec<&str> = items.iter().filter_map(Value::as_str).collect();
            if let Some(unknown) = names.iter().find(|n| !labels.iter().any(|l| l == *n)) {
                return Err(format!("unknown label {unknown:?}"));
            }
            Target::Multi(labels.iter().map(|l| names.contains(&l.as_str())).collect())
        }
        HeadKind::Regression { .. } => Target::Value(
            value
                .as_f64()
                .ok_or_else(|| format!("expected a number, got {value}"))?,
        ),
    }))
}

impl Dataset {
    /// Loads a folder written by `cxrfed phantom` (or any folder with a `labels.json` of the same
    /// shape): decodes every listed file through the node's own imaging path and preprocesses
    /// it to the model input. `formats` filters rows by format ("dicom", "png", "jpeg").
    pub fn from_labels_folder(
        dir: &Path,
        label_map: &LabelMap,
        options: &PreprocessOptions,
        formats: &[&str],
        threads: usize,
    ) -> Result<Dataset, ModelError> {
        let path = dir.join("labels.json");
        let bytes = std::fs::read(&path)
            .map_err(|e| ModelError::Data(format!("{}: {e}", path.display())))?;
        let document: Value = serde_json::from_slice(&bytes)
            .map_err(|e| ModelError::Data(format!("{}: {e}", path.display())))?;
        let rows: Vec<&Value> = document["images"]
            .as_array()
            .ok_or_else(|| ModelError::Data(format!("{}: no \"images\" list", path.display())))?
            .iter()
            .filter(|row| {
                formats.is_empty() || formats.contains(&row["format"].as_str().unwrap_or("dicom"))
            })
            .collect();
        if rows.is_empty() {
            return Err(ModelError::Data(format!(
                "{}: no images to load",
                path.display()
            )));
        }
        let secret = SiteSecret::from_bytes([0; 32]);
        let limits = Limits::default();
        let threads = threads.max(1);
        let results: Vec<Result<Vec<(usize, Sample)>, ModelError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|worker| {
                    let rows = &rows;
                    let secret = &secret;
                    scope.spawn(move || {
                        let mut out = Vec::new();
                        for index in (worker..rows.len()).step_by(threads) {
                            let row = rows[index];
                            let file = row["file"].as_str().unwrap_or_default();
                            let bytes = std::fs::read(dir.join(file))
                                .map_err(|e| ModelError::Data(format!("{file}: {e}")))?;
                            let decoded = cxrfed_imaging::decode(&bytes, &limits, secret)
                                .map_err(|e| ModelError::Data(format!("{file}: {e}")))?;
                            let input = cxrfed_imaging::preprocess(&decoded, options);
                            let mut targets = Vec::with_capacity(label_map.heads.len());
                            for head in &label_map.heads {
                                let value = row["labels"].get(&head.name).unwrap_or(&Value::Null);
                                targets.push(parse_target(&head.kind, value).map_err(|e| {
                                    ModelError::Data(format!("{file}: {}: {e}", head.name))
                                })?);
                            }
                            out.push((
                                index,
                                Sample {
                                    input: input.into_raw_vec_and_offset().0,
                                    targets,
                                    name: file.to_string(),
                                },
                            ));
                        }
                        Ok(out)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(ModelError::Data("a loader thread panicked".into()))
                    })
                })
                .collect()
        });
        let mut indexed = Vec::new();
        for result in results {
            indexed.extend(result?);
        }
        indexed.sort_by_key(|(i, _)| *i);
        Ok(Dataset {
            size: options.size,
            label_map: label_map.clone(),
            samples: indexed.into_iter().map(|(_, s)| s).collect(),
        })
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Splits off a deterministic validation share.
    pub fn split(self, validation: f64, seed: u64) -> (Dataset, Dataset) {
        let mut order: Vec<usize> = (0..self.samples.len()).collect();
        order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
        let n_val = ((self.samples.len() as f64) * validation).round() as usize;
        let mut slots: Vec<Option<Sample>> = self.samples.into_iter().map(Some).collect();
        let mut take = |ids: &[usize]| -> Vec<Sample> {
            ids.iter().filter_map(|&i| slots[i].take()).collect()
        };
        let val = take(&order[..n_val]);
        let train = take(&order[n_val..]);
        (
            Dataset {
                size: self.size,
                label_map: self.label_map.clone(),
                samples: train,
            },
            Dataset {
                size: self.size,
                label_map: self.label_map,
                samples: val,
            },
        )
    }

    pub(crate) fn batch_tensor(&self, ids: &[usize], device: tch::Device) -> Tensor {
        let s = i64::from(self.size);
        let mut data = Vec::with_capacity(ids.len() * (s * s) as usize);
        for &i in ids {
            data.extend_from_slice(&self.samples[i].input);
        }
        Tensor::from_slice(&data)
            .view([ids.len() as i64, 1, s, s])
            .to_device(device)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub augment: bool,
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 10,
            batch_size: 32,
            learning_rate: 2e-3,
            weight_decay: 1e-4,
            augment: true,
            seed: 1,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct EpochReport {
    pub epoch: usize,
    pub train_loss: f64,
    pub seconds: f64,
    pub validation: Option<Metrics>,
}

/// Augmentation on a normalised batch: small rotation, gamma and contrast jitter, light noise.
fn augment(xs: &Tensor, rng: &mut impl Rng, mean: f64, std: f64) -> Tensor {
    let n = xs.size()[0];
    let device = xs.device();
    let angles: Vec<f32> = (0..n)
        .map(|_| {
            if rng.random_bool(0.5) {
                rng.random_range(-0.07f32..0.07)
            } else {
                0.0
            }
        })
        .collect();
    let theta: Vec<f32> = angles
        .iter()
        .flat_map(|a| [a.cos(), -a.sin(), 0.0, a.sin(), a.cos(), 0.0])
        .collect();
    let theta = Tensor::from_slice(&theta).view([n, 2, 3]).to_device(device);
    let grid = Tensor::affine_grid_generator(&theta, xs.size(), false);
    let mut x01 = (xs * std + mean).clamp(0.0, 1.0);
    // padding mode 1 = border, so rotation does not invent black corners.
    x01 = x01.grid_sampler(&grid, 0, 1, false);
    // Wide enough to cover other sites' detector curves (gamma 0.75 to 1.45).
    let gamma: Vec<f32> = (0..n).map(|_| rng.random_range(0.7f32..1.4)).collect();
    let contrast: Vec<f32> = (0..n).map(|_| rng.random_range(0.9f32..1.1)).collect();
    let gamma = Tensor::from_slice(&gamma)
        .view([n, 1, 1, 1])
        .to_device(device);
    let contrast = Tensor::from_slice(&contrast)
        .view([n, 1, 1, 1])
        .to_device(device);
    x01 = (x01.clamp(1e-4, 1.0).pow(&gamma) - 0.5) * contrast + 0.5;
    let noise = x01.randn_like() * rng.random_range(0.0..0.002);
    ((x01 + noise).clamp(0.0, 1.0) - mean) / std
}

/// Masked multi-head loss of a batch.
fn loss(label_map: &LabelMap, logits: &Tensor, samples: &[&Sample]) -> Tensor {
    let device = logits.device();
    let mut total = Tensor::zeros([], (Kind::Float, device));
    for (h, (head, (offset, width))) in label_map.heads.iter().zip(label_map.spans()).enumerate() {
        let rows: Vec<i64> = samples
            .iter()
            .enumerate()
            .filter(|(_, s)| s.targets[h].is_some())
            .map(|(i, _)| i as i64)
            .collect();
        if rows.is_empty() {
            continue;
        }
        let index = Tensor::from_slice(&rows).to_device(device);
        let part = logits
            .narrow(1, offset as i64, width as i64)
            .index_select(0, &index);
        let targets = rows
            .iter()
            .map(|&i| samples[i as usize].targets[h].as_ref());
        let term = match &head.kind {
            HeadKind::Categorical { .. } => {
                let classes: Vec<i64> = targets
                    .map(|t| match t {
                        Some(Target::Class(c)) => *c as i64,
                        _ => 0,
                    })
                    .collect();
                part.cross_entropy_for_logits(&Tensor::from_slice(&classes).to_device(device))
            }
            HeadKind::Binary => {
                let y: Vec<f32> = targets
                    .map(|t| matches!(t, Some(Target::Binary(true))) as u8 as f32)
                    .collect();
                part.view([-1]).binary_cross_entropy_with_logits::<Tensor>(
                    &Tensor::from_slice(&y).to_device(device),
                    None,
                    None,
                    Reduction::Mean,
                )
            }
            HeadKind::MultiLabel { .. } => {
                let y: Vec<f32> = targets
                    .flat_map(|t| match t {
                        Some(Target::Multi(v)) => {
                            v.iter().map(|b| *b as u8 as f32).collect::<Vec<_>>()
                        }
                        _ => vec![0.0; width],
                    })
                    .collect();
                part.binary_cross_entropy_with_logits::<Tensor>(
                    &Tensor::from_slice(&y)
                        .view([-1, width as i64])
                        .to_device(device),
                    None,
                    None,
                    Reduction::Mean,
                )
            }
            HeadKind::Regression { min, max } => {
                let y: Vec<f32> = targets
                    .map(|t| match t {
                        Some(Target::Value(v)) => {
                            (((v - min) / (max - min)).clamp(0.0, 1.0)) as f32
                        }
                        _ => 0.5,
                    })
                    .collect();
                // Squared error on the [0, 1] scale, weighted so a 0.01 ratio error matters.
                let diff = part.view([-1]).sigmoid() - Tensor::from_slice(&y).to_device(device);
                (diff.square().mean(Kind::Float)) * 50.0
            }
        };
        total += term;
    }
    total
}

/// What federated rounds add to the training step.
#[derive(Default)]
pub struct FitOptions<'a> {
    /// Added to every batch loss (FedProx's proximal term).
    pub penalty: Option<&'a dyn Fn() -> Tensor>,
    /// Stop after this many optimiser steps (0: no cap).
    pub max_steps: usize,
    /// Keep the learning rate constant (no drop for the last 30% of epochs).
    pub constant_lr: bool,
}

impl std::fmt::Debug for FitOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FitOptions")
            .field("penalty", &self.penalty.is_some())
            .field("max_steps", &self.max_steps)
            .field("constant_lr", &self.constant_lr)
            .finish()
    }
}

/// Trains `model` on `train` for `config.epochs` epochs with Adam (the learning rate drops
/// 5x for the last 30% of epochs), reporting validation metrics after every epoch.
pub fn fit(
    model: &mut Model,
    train: &Dataset,
    validation: Option<&Dataset>,
    config: &TrainConfig,
    on_epoch: &mut dyn FnMut(&EpochReport),
) -> Result<Vec<EpochReport>, ModelError> {
    fit_with(
        model,
        train,
        validation,
        config,
        &FitOptions::default(),
        on_epoch,
    )
}

/// [`fit`] with the options of a federated round. Variables that do not require grad (frozen
/// layers) are left alone by the optimiser.
pub fn fit_with(
    model: &mut Model,
    train: &Dataset,
    validation: Option<&Dataset>,
    config: &TrainConfig,
    options: &FitOptions<'_>,
    on_epoch: &mut dyn FnMut(&EpochReport),
) -> Result<Vec<EpochReport>, ModelError> {
    if train.is_empty() {
        return Err(ModelError::Data("the training set is empty".into()));
    }
    if train.size != model.card.input.size {
        return Err(ModelError::Data(format!(
            "dataset input size {} differs from the model's {}",
            train.size, model.card.input.size
        )));
    }
    let label_map = model.card.label_map.clone();
    let (mean, std) = (
        f64::from(model.card.input.mean),
        f64::from(model.card.input.std),
    );
    let device = model.device;
    let crate::model::Backend::Native { vs, net } = &model.backend else {
        return Err(ModelError::Train(
            "TorchScript models cannot be trained here; fine-tune a cxrfed architecture".into(),
        ));
    };
    let mut optimizer = nn::Adam {
        wd: config.weight_decay,
        ..Default::default()
    }
    .build(vs, config.learning_rate)
    .map_err(|e| ModelError::Train(e.to_string()))?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(config.seed);
    let mut reports = Vec::new();
    let mut steps = 0usize;
    for epoch in 1..=config.epochs {
        let started = std::time::Instant::now();
        if !options.constant_lr && epoch as f64 > config.epochs as f64 * 0.7 {
            optimizer.set_lr(config.learning_rate * 0.2);
        }
        let mut order: Vec<usize> = (0..train.len()).collect();
        order.shuffle(&mut rng);
        let mut total = 0.0;
        let mut batches = 0;
        for ids in order.chunks(config.batch_size.max(2)) {
            if ids.len() < 2 {
                continue; // batch norm needs two samples
            }
            let mut xs = train.batch_tensor(ids, device);
            if config.augment {
                xs = augment(&xs, &mut rng, mean, std);
            }
            let logits = net.forward(&xs, true);
            let samples: Vec<&Sample> = ids.iter().map(|&i| &train.samples[i]).collect();
            let mut batch_loss = loss(&label_map, &logits, &samples);
            total += batch_loss.double_value(&[]);
            if let Some(penalty) = options.penalty {
                batch_loss += penalty();
            }
            optimizer.backward_step(&batch_loss);
            batches += 1;
            steps += 1;
            if options.max_steps > 0 && steps >= options.max_steps {
                break;
            }
        }
        let validation = match validation {
            Some(val) if !val.is_empty() => Some(evaluate_model(model, val)?),
            _ => None,
        };
        let report = EpochReport {
            epoch,
            train_loss: total / f64::from(batches.max(1)),
            seconds: started.elapsed().as_secs_f64(),
            validation,
        };
        on_epoch(&report);
        reports.push(report);
        if options.max_steps > 0 && steps >= options.max_steps {
            break;
        }
    }
    Ok(reports)
}

/// Predicts every sample of `data` in batches of 32 (eval mode, no grad).
pub fn predict_dataset(model: &Model, data: &Dataset) -> Result<Vec<Prediction>, ModelError> {
    let mut out = Vec::with_capacity(data.len());
    let ids: Vec<usize> = (0..data.len()).collect();
    for chunk in ids.chunks(32) {
        let xs = data.batch_tensor(chunk, model.device);
        out.extend(activate(&model.card.label_map, &model.try_forward(&xs)?));
    }
    Ok(out)
}

/// Evaluates a model on a labelled dataset.
pub fn evaluate_model(model: &Model, data: &Dataset) -> Result<Metrics, ModelError> {
    let predictions = predict_dataset(model, data)?;
    Ok(Metrics::compute(&model.card.label_map, data, &predictions))
}

/// Metrics of one head.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HeadMetrics {
    pub head: String,
    pub kind: String,
    pub n: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub macro_f1: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auroc: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mae: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rmse: Option<f64>,
    /// Category (or label) names for the confusion matrix rows (truth) and columns (predicted).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub confusion: Vec<Vec<u64>>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Metrics {
    pub n: usize,
    pub heads: Vec<HeadMetrics>,
}

impl Metrics {
    pub fn head(&self, name: &str) -> Option<&HeadMetrics> {
        self.heads.iter().find(|h| h.head == name)
    }

    pub fn compute(label_map: &LabelMap, data: &Dataset, predictions: &[Prediction]) -> Metrics {
        let heads = label_map
            .heads
            .iter()
            .enumerate()
            .map(|(h, head)| {
                let pairs: Vec<(&Target, &HeadOutput)> = data
                    .samples
                    .iter()
                    .zip(predictions)
                    .filter_map(|(s, p)| Some((s.targets[h].as_ref()?, p.outputs.get(h)?)))
                    .collect();
                head_metrics(&head.name, &head.kind, &pairs)
            })
            .collect();
        Metrics {
            n: data.len(),
            heads,
        }
    }

    /// Flat `head.metric` values (accuracy, macro_f1, auroc, mae, n) for reports.
    pub fn flat(&self) -> std::collections::BTreeMap<String, f64> {
        let mut out = std::collections::BTreeMap::new();
        for h in &self.heads {
            if h.n == 0 {
                continue;
            }
            out.insert(format!("{}.n", h.head), h.n as f64);
            for (name, value) in [
                ("accuracy", h.accuracy),
                ("macro_f1", h.macro_f1),
                ("auroc", h.auroc),
                ("mae", h.mae),
            ] {
                if let Some(v) = value.filter(|v| v.is_finite()) {
                    out.insert(format!("{}.{name}", h.head), v);
                }
            }
        }
        out
    }

    /// A fixed-width text table, one row per head.
    pub fn table(&self) -> String {
        let fmt = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.3}"));
        let mut out = format!(
            "{:<24} {:>6} {:>9} {:>9} {:>7} {:>7}\n",
            "head", "n", "accuracy", "macro_f1", "auroc", "mae"
        );
        for h in &self.heads {
            out.push_str(&format!(
                "{:<24} {:>6} {:>9} {:>9} {:>7} {:>7}\n",
                h.head,
                h.n,
                fmt(h.accuracy),
                fmt(h.macro_f1),
                fmt(h.auroc),
                fmt(h.mae)
            ));
        }
        out
    }
}

fn macro_f1(confusion: &[Vec<u64>]) -> f64 {
    let k = confusion.len();
    let present: Vec<usize> = (0..k)
        .filter(|&c| confusion[c].iter().sum::<u64>() > 0 || (0..k).any(|r| confusion[r][c] > 0))
        .collect();
    if present.is_empty() {
        return 0.0;
    }
    present
        .iter()
        .map(|&c| {
            let tp = confusion[c][c] as f64;
            let fp: f64 = (0..k)
                .filter(|&r| r != c)
                .map(|r| confusion[r][c] as f64)
                .sum();
            let fn_: f64 = (0..k)
                .filter(|&p| p != c)
                .map(|p| confusion[c][p] as f64)
                .sum();
            if tp == 0.0 {
                0.0
            } else {
                2.0 * tp / (2.0 * tp + fp + fn_)
            }
        })
        .sum::<f64>()
        / present.len() as f64
}

/// Area under the ROC curve by the rank-sum statistic (ties count half).
pub fn auroc(scores: &[(f32, bool)]) -> Option<f64> {
    let positives = scores.iter().filter(|(_, y)| *y).count() as f64;
    let negatives = scores.len() as f64 - positives;
    if positives == 0.0 || negatives == 0.0 {
        return None;
    }
    let mut sorted: Vec<(f32, bool)> = scores.to_vec();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i;
        while j + 1 < sorted.len() && sorted[j + 1].0 == sorted[i].0 {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += rank * sorted[i..=j].iter().filter(|(_, y)| *y).count() as f64;
        i = j + 1;
    }
    Some((rank_sum - positives * (positives + 1.0) / 2.0) / (positives * negatives))
}

fn head_metrics(name: &str, kind: &HeadKind, pairs: &[(&Target, &HeadOutput)]) -> HeadMetrics {
    let mut m = HeadMetrics {
        head: name.to_string(),
        kind: String::new(),
        n: pairs.len(),
        accuracy: None,
        macro_f1: None,
        auroc: None,
        mae: None,
        rmse: None,
        classes: Vec::new(),
        confusion: Vec::new(),
    };
    match kind {
        HeadKind::Categorical { categories } => {
            m.kind = "categorical".into();
            let k = categories.len();
            let mut confusion = vec![vec![0u64; k]; k];
            for (t, o) in pairs {
                if let (Target::Class(c), HeadOutput::Categorical(p)) = (t, o) {
                    let predicted = p
                        .iter()
                        .enumerate()
                        .fold(
                            (0, f32::MIN),
                            |b, (i, v)| if *v > b.1 { (i, *v) } else { b },
                        )
                        .0;
                    confusion[*c][predicted] += 1;
                }
            }
            let correct: u64 = (0..k).map(|c| confusion[c][c]).sum();
            m.accuracy = Some(correct as f64 / pairs.len().max(1) as f64);
            m.macro_f1 = Some(macro_f1(&confusion));
            m.classes = categories.clone();
            m.confusion = confusion;
        }
        HeadKind::Binary => {
            m.kind = "binary".into();
            let mut confusion = vec![vec![0u64; 2]; 2];
            let mut scores = Vec::new();
            for (t, o) in pairs {
                if let (Target::Binary(y), HeadOutput::Binary(p)) = (t, o) {
                    confusion[usize::from(*y)][usize::from(*p >= 0.5)] += 1;
                    scores.push((*p, *y));
                }
            }
            m.accuracy =
                Some((confusion[0][0] + confusion[1][1]) as f64 / pairs.len().max(1) as f64);
            m.macro_f1 = Some(macro_f1(&confusion));
            m.auroc = auroc(&scores);
            m.classes = vec!["false".into(), "true".into()];
            m.confusion = confusion;
        }
        HeadKind::MultiLabel { labels } => {
            m.kind = "multi_label".into();
            let mut exact = 0;
            let mut per_label: Vec<Vec<(f32, bool)>> = vec![Vec::new(); labels.len()];
            let mut confusion = vec![vec![0u64; 2]; 2];
            for (t, o) in pairs {
                if let (Target::Multi(y), HeadOutput::MultiLabel(p)) = (t, o) {
                    let mut all = true;
                    for (l, (yy, pp)) in y.iter().zip(p).enumerate() {
                        per_label[l].push((*pp, *yy));
                        confusion[usize::from(*yy)][usize::from(*pp >= 0.5)] += 1;
                        all &= *yy == (*pp >= 0.5);
                    }
                    exact += usize::from(all);
                }
            }
            m.accuracy = Some(exact as f64 / pairs.len().max(1) as f64);
            let aurocs: Vec<f64> = per_label.iter().filter_map(|s| auroc(s)).collect();
            m.auroc =
                (!aurocs.is_empty()).then(|| aurocs.iter().sum::<f64>() / aurocs.len() as f64);
            m.macro_f1 = Some(macro_f1(&confusion));
            m.classes = vec!["absent".into(), "present".into()];
            m.confusion = confusion;
        }
        HeadKind::Regression { .. } => {
            m.kind = "regression".into();
            let errors: Vec<f64> = pairs
                .iter()
                .filter_map(|(t, o)| match (t, o) {
                    (Target::Value(y), HeadOutput::Regression(p)) => Some(p - y),
                    _ => None,
                })
                .collect();
            let n = errors.len().max(1) as f64;
            m.mae = Some(errors.iter().map(|e| e.abs()).sum::<f64>() / n);
            m.rmse = Some((errors.iter().map(|e| e * e).sum::<f64>() / n).sqrt());
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auroc_matches_hand_computation() {
        assert_eq!(auroc(&[(0.1, false), (0.9, true)]), Some(1.0));
        assert_eq!(auroc(&[(0.9, false), (0.1, true)]), Some(0.0));
        assert_eq!(auroc(&[(0.5, false), (0.5, true)]), Some(0.5));
        assert_eq!(auroc(&[(0.5, true)]), None);
    }

    #[test]
    fn macro_f1_of_a_perfect_and_a_confused_matrix() {
        assert!((macro_f1(&[vec![5, 0], vec![0, 5]]) - 1.0).abs() < 1e-12);
        // class 0: tp 1 fp 1 fn 1 -> 0.5; class 1: tp 1 fp 1 fn 1 -> 0.5
        assert!((macro_f1(&[vec![1, 1], vec![1, 1]]) - 0.5).abs() < 1e-12);
    }
}
