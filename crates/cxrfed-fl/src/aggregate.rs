//! Federated aggregation on raw f32 tensors: the coordinator never links libtorch. Global
//! weights and site updates (weights deltas) travel as safetensors; the coordinator folds the
//! updates in one at a time as they complete, so its memory is the accumulator plus one update,
//! whatever the number of sites.
//!
//! - FedAvg: `w += Σ nᵢ δᵢ / Σ nᵢ` (weighted by each site's training samples).
//! - FedProx: the same server step; the proximal term `μ/2 ‖w − w_global‖²` is added to each
//!   site's local loss.
//! - FedAdam (Reddi et al. 2021): the weighted mean delta is a pseudo-gradient for a server
//!   Adam step, `m ← β₁m + (1−β₁)Δ`, `v ← β₂v + (1−β₂)Δ²`, `w += η m / (√v + τ)`. Batch-norm
//!   running statistics are not parameters: they take the plain mean delta.
//! - DP-FedAvg (McMahan et al. 2018): sites clip their delta to L2 norm C; the coordinator then
//!   weights every site equally and adds N(0, (σC)²) to each coordinate of the sum before
//!   dividing by the number of sites.

use std::collections::BTreeMap;

use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use crate::tensor::{CodecError, Tensor, Weights, decode, encode};

#[derive(Debug, thiserror::Error)]
pub enum AggregateError {
    #[error(transparent)]
    Format(#[from] CodecError),
    #[error("{0}")]
    Mismatch(String),
}

/// The server-side algorithm of a job (`fedavg`, `fedprox`, `fedadam` in job files).
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
    strum::IntoStaticStr,
    strum::VariantNames,
)]
#[serde(rename_all = "lowercase")]
#[strum(serialize_all = "lowercase", ascii_case_insensitive)]
pub enum Algorithm {
    #[default]
    #[serde(alias = "fed_avg", alias = "fed-avg")]
    FedAvg,
    #[serde(alias = "fed_prox", alias = "fed-prox")]
    FedProx,
    #[serde(alias = "fed_adam", alias = "fed-adam")]
    FedAdam,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// FedAdam's server optimiser settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ServerAdam {
    pub learning_rate: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub tau: f64,
}

impl Default for ServerAdam {
    fn default() -> Self {
        ServerAdam {
            learning_rate: 0.01,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        }
    }
}

/// The running weighted sum of the updates of one round.
#[derive(Debug)]
pub struct Aggregator {
    layout: BTreeMap<String, Vec<usize>>,
    sums: BTreeMap<String, Vec<f64>>,
    weights: BTreeMap<String, f64>,
    uniform: bool,
    /// Updates whose L2 norm exceeds this are refused (what the job's clipping and the sites'
    /// noise allow).
    max_norm: Option<f64>,
    sites: usize,
    samples: u64,
}

impl Aggregator {
    /// An empty round over the tensors of `global`. `uniform` weights every site equally
    /// (DP-FedAvg); otherwise sites are weighted by their sample counts.
    pub fn new(global: &Weights, uniform: bool) -> Aggregator {
        Aggregator::with_layout(
            global
                .iter()
                .map(|(n, t)| (n.clone(), t.shape.clone()))
                .collect(),
            uniform,
        )
    }

    /// An empty round over tensors of these shapes (`tensor::layout` of the global model's
    /// bytes), so the global model need not be decoded while updates arrive.
    pub fn with_layout(layout: BTreeMap<String, Vec<usize>>, uniform: bool) -> Aggregator {
        Aggregator {
            layout,
            sums: BTreeMap::new(),
            weights: BTreeMap::new(),
            uniform,
            max_norm: None,
            sites: 0,
            samples: 0,
        }
    }

    /// Refuses updates with an L2 norm above `max_norm` (when set).
    pub fn with_max_norm(mut self, max_norm: Option<f64>) -> Aggregator {
        self.max_norm = max_norm;
        self
    }

    /// Folds in one site's update (a safetensors delta over some of the global tensors).
    /// Nothing is added unless the whole update is valid.
    pub fn add(&mut self, update: &[u8], samples: u64) -> Result<(), AggregateError> {
        if samples == 0 {
            return Err(AggregateError::Mismatch(
                "an update trained on no samples".into(),
            ));
        }
        let delta = decode(update)?;
        if delta.is_empty() {
            return Err(AggregateError::Mismatch("an empty update".into()));
        }
        for (name, t) in &delta {
            match self.layout.get(name) {
                None => {
                    return Err(AggregateError::Mismatch(format!(
                        "the update has a tensor {name:?} the global model lacks"
                    )));
                }
                Some(shape) if *shape != t.shape => {
                    return Err(AggregateError::Mismatch(format!(
                        "{name}: shape {:?} differs from the global {:?}",
                        t.shape, shape
                    )));
                }
                _ => {}
            }
            if t.data.iter().any(|v| !v.is_finite()) {
                return Err(AggregateError::Mismatch(format!(
                    "{name}: the update holds NaN or infinite values"
                )));
            }
        }
        if let Some(max) = self.max_norm {
            let norm = crate::secagg::l2_norm(&delta);
            if norm > max {
                return Err(AggregateError::Mismatch(format!(
                    "the update's L2 norm {norm:.4} exceeds the {max:.4} the job's clipping allows"
                )));
            }
        }
        let w = if self.uniform { 1.0 } else { samples as f64 };
        for (name, t) in delta {
            let sum = self
                .sums
                .entry(name.clone())
                .or_insert_with(|| vec![0.0; t.data.len()]);
            for (s, v) in sum.iter_mut().zip(&t.data) {
                *s += w * f64::from(*v);
            }
            *self.weights.entry(name).or_default() += w;
        }
        self.sites += 1;
        self.samples += samples;
        Ok(())
    }

    pub fn sites(&self) -> usize {
        self.sites
    }

    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// The mean delta. With `noise_std > 0` (DP-FedAvg, uniform weights) Gaussian noise of that
    /// standard deviation is added to every coordinate of the sum first.
    pub fn mean(self, noise_std: f64) -> Weights {
        let mut rng = rand::rngs::StdRng::from_os_rng();
        let normal = (noise_std > 0.0)
            .then(|| Normal::new(0.0, noise_std).ok())
            .flatten();
        self.sums
            .into_iter()
            .map(|(name, sum)| {
                let w = self.weights.get(&name).copied().unwrap_or(1.0);
                let data = sum
                    .into_iter()
                    .map(|s| {
                        let noise = normal.as_ref().map_or(0.0, |n| n.sample(&mut rng));
                        ((s + noise) / w) as f32
                    })
                    .collect();
                let shape = self.layout.get(&name).cloned().unwrap_or_default();
                (name, Tensor { shape, data })
            })
            .collect()
    }
}

fn is_running_stat(name: &str) -> bool {
    name.ends_with("running_mean") || name.ends_with("running_var")
}

/// FedAdam's moments, kept in the round log between rounds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AdamMoments {
    pub m: Weights,
    pub v: Weights,
}

impl AdamMoments {
    /// As one safetensors buffer (`m.NAME`, `v.NAME`).
    pub fn encode(&self) -> Result<Vec<u8>, AggregateError> {
        let mut all = Weights::new();
        for (prefix, part) in [("m.", &self.m), ("v.", &self.v)] {
            for (name, t) in part {
                all.insert(format!("{prefix}{name}"), t.clone());
            }
        }
        Ok(encode(&all)?)
    }

    pub fn decode(bytes: &[u8]) -> Result<AdamMoments, AggregateError> {
        let mut out = AdamMoments::default();
        for (name, t) in decode(bytes)? {
            if let Some(rest) = name.strip_prefix("m.") {
                out.m.insert(rest.to_string(), t);
            } else if let Some(rest) = name.strip_prefix("v.") {
                out.v.insert(rest.to_string(), t);
            }
        }
        Ok(out)
    }
}

/// Applies a round's mean delta to the global weights.
pub fn apply(
    global: &mut Weights,
    mean_delta: &Weights,
    algorithm: Algorithm,
    adam: &ServerAdam,
    moments: &mut AdamMoments,
) -> Result<(), AggregateError> {
    for (name, delta) in mean_delta {
        let target = global.get_mut(name).ok_or_else(|| {
            AggregateError::Mismatch(format!("the global model has no tensor {name:?}"))
        })?;
        if target.data.len() != delta.data.len() {
            return Err(AggregateError::Mismatch(format!("{name}: size differs")));
        }
        if algorithm != Algorithm::FedAdam || is_running_stat(name) {
            for (w, d) in target.data.iter_mut().zip(&delta.data) {
                *w += d;
            }
            continue;
        }
        let zeros = || Tensor {
            shape: delta.shape.clone(),
            data: vec![0.0; delta.data.len()],
        };
        let m = moments.m.entry(name.clone()).or_insert_with(zeros);
        let v = moments.v.entry(name.clone()).or_insert_with(zeros);
        let (b1, b2) = (adam.beta1 as f32, adam.beta2 as f32);
        for (((w, d), m), v) in target
            .data
            .iter_mut()
            .zip(&delta.data)
            .zip(m.data.iter_mut())
            .zip(v.data.iter_mut())
        {
            *m = b1 * *m + (1.0 - b1) * d;
            *v = b2 * *v + (1.0 - b2) * d * d;
            *w += (adam.learning_rate as f32) * *m / (v.sqrt() + adam.tau as f32);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(values: &[(&str, &[f32])]) -> Weights {
        values
            .iter()
            .map(|(n, v)| {
                (
                    n.to_string(),
                    Tensor {
                        shape: vec![v.len()],
                        data: v.to_vec(),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn safetensors_round_trip() {
        let w = weights(&[("a.weight", &[1.0, -2.5, 3.25]), ("b.bias", &[0.5])]);
        let bytes = encode(&w).expect("encode");
        assert_eq!(decode(&bytes).expect("decode"), w);
        assert!(decode(b"not safetensors").is_err());
    }

    #[test]
    fn algorithms_parse_from_job_files_and_print_as_written() {
        for (text, want) in [
            ("fedavg", Algorithm::FedAvg),
            ("FedProx", Algorithm::FedProx),
            ("fedadam", Algorithm::FedAdam),
        ] {
            assert_eq!(text.parse::<Algorithm>().expect("parse"), want);
        }
        assert!("fedsgd".parse::<Algorithm>().is_err());
        assert_eq!(Algorithm::FedProx.to_string(), "fedprox");
        assert_eq!(Algorithm::FedAdam.as_str(), "fedadam");
    }

    #[test]
    fn fedavg_weights_by_sample_count_exactly() {
        let global = weights(&[("x", &[0.0, 0.0]), ("y", &[10.0])]);
        let mut agg = Aggregator::new(&global, false);
        let a = encode(&weights(&[("x", &[1.0, 2.0]), ("y", &[4.0])])).expect("encode");
        let b = encode(&weights(&[("x", &[5.0, -2.0]), ("y", &[0.0])])).expect("encode");
        agg.add(&a, 1).expect("add a");
        agg.add(&b, 3).expect("add b");
        assert_eq!((agg.sites(), agg.samples()), (2, 4));
        let mean = agg.mean(0.0);
        // (1*1 + 3*5)/4 = 4, (1*2 + 3*-2)/4 = -1, (1*4 + 0)/4 = 1.
        assert_eq!(mean["x"].data, vec![4.0, -1.0]);
        assert_eq!(mean["y"].data, vec![1.0]);
        let mut g = global.clone();
        apply(
            &mut g,
            &mean,
            Algorithm::FedAvg,
            &ServerAdam::default(),
            &mut AdamMoments::default(),
        )
        .expect("apply");
        assert_eq!(g["x"].data, vec![4.0, -1.0]);
        assert_eq!(g["y"].data, vec![11.0]);
    }

    #[test]
    fn identical_updates_average_to_themselves() {
        let global = weights(&[("x", &[0.1, 0.2, 0.3])]);
        let update = weights(&[("x", &[0.013, -0.7, 1e-6])]);
        let bytes = encode(&update).expect("encode");
        let mut agg = Aggregator::new(&global, false);
        for n in [7, 19, 101] {
            agg.add(&bytes, n).expect("add");
        }
        let mean = agg.mean(0.0);
        for (got, want) in mean["x"].data.iter().zip(&update["x"].data) {
            assert!(
                (got - want).abs() <= 1e-7 * want.abs().max(1.0),
                "{got} vs {want}"
            );
        }
    }

    #[test]
    fn bad_updates_change_nothing() {
        let global = weights(&[("x", &[0.0, 0.0])]);
        let mut agg = Aggregator::new(&global, false);
        let wrong_shape = encode(&weights(&[("x", &[1.0])])).expect("encode");
        let unknown = encode(&weights(&[("z", &[1.0, 1.0])])).expect("encode");
        let nan = encode(&weights(&[("x", &[f32::NAN, 1.0])])).expect("encode");
        assert!(agg.add(&wrong_shape, 5).is_err());
        assert!(agg.add(&unknown, 5).is_err());
        assert!(agg.add(&nan, 5).is_err());
        assert!(agg.add(b"junk", 5).is_err());
        assert_eq!(agg.sites(), 0);
        assert!(agg.mean(0.0).is_empty());
    }

    #[test]
    fn fedadam_first_step_matches_the_formula() {
        let mut global = weights(&[("w", &[1.0, 1.0]), ("bn.running_mean", &[0.0])]);
        let delta = weights(&[("w", &[0.5, -0.25]), ("bn.running_mean", &[0.2])]);
        let adam = ServerAdam::default();
        let mut moments = AdamMoments::default();
        apply(&mut global, &delta, Algorithm::FedAdam, &adam, &mut moments).expect("apply");
        for (i, d) in [0.5f32, -0.25].iter().enumerate() {
            let m = 0.1 * d;
            let v = 0.01 * d * d;
            let want = 1.0 + 0.01 * m / (v.sqrt() + 1e-3);
            assert!((global["w"].data[i] - want).abs() < 1e-6);
        }
        // Running statistics take the plain mean.
        assert!((global["bn.running_mean"].data[0] - 0.2).abs() < 1e-7);
        let again = AdamMoments::decode(&moments.encode().expect("encode")).expect("decode");
        assert_eq!(again, moments);
    }

    #[test]
    fn dp_noise_has_the_configured_scale() {
        let global = weights(&[("x", &[0.0; 4000])]);
        let mut agg = Aggregator::new(&global, true);
        let zero = encode(&weights(&[("x", &[0.0; 4000])])).expect("encode");
        agg.add(&zero, 10).expect("add");
        agg.add(&zero, 1000).expect("add");
        // Uniform weights: noise of std 2 on the sum, divided by 2 sites -> std 1.
        let mean = agg.mean(2.0);
        let var = mean["x"]
            .data
            .iter()
            .map(|v| f64::from(*v).powi(2))
            .sum::<f64>()
            / 4000.0;
        assert!((0.85..1.15).contains(&var), "variance {var}");
    }
}
