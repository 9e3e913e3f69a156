//! What a federated job asks: the job file a study admin submits ([`JobSpec`]) and the local
//! settings every site receives for a round ([`LocalSpec`]), both typed serde documents that
//! coordinator and node exchange as JSON.

use serde::{Deserialize, Serialize};

use crate::aggregate::Algorithm;
use crate::labelmap::{Head, HeadKind};

/// The model every registry starts with: the bundled tiny model trained on phantoms.
pub const BUNDLED_VERSION: &str = "tiny-phantom-v1";

/// Which variables a round trains.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    Default,
    strum::Display,
    strum::EnumString,
    strum::IntoStaticStr,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case", ascii_case_insensitive)]
pub enum Trainable {
    /// The heads only (all of them, or those named in the job).
    #[default]
    #[serde(alias = "heads_only")]
    #[strum(to_string = "heads", serialize = "heads_only")]
    Heads,
    /// The last backbone block and the heads.
    #[serde(alias = "last-block")]
    #[strum(to_string = "last_block", serialize = "last-block")]
    LastBlock,
    /// Every variable.
    All,
}

/// The local training settings of a round, as the coordinator sends them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LocalSpec {
    /// Heads trained; empty: every head.
    pub heads: Vec<String>,
    pub trainable: Trainable,
    pub epochs: usize,
    /// Optimiser steps per round (0: whole epochs).
    pub max_steps: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    /// FedProx's proximal weight (0: plain local training).
    pub prox_mu: f64,
    /// L2 norm the delta is clipped to (0: no clipping).
    pub clip: f64,
    /// Standard deviation of the Gaussian noise the site adds to its clipped delta (its share
    /// of the job's noise; 0: none).
    pub noise_std: f64,
    pub augment: bool,
    pub seed: u64,
}

impl Default for LocalSpec {
    fn default() -> Self {
        LocalSpec {
            heads: Vec::new(),
            trainable: Trainable::Heads,
            epochs: 1,
            max_steps: 0,
            batch_size: 16,
            learning_rate: 1e-3,
            prox_mu: 0.0,
            clip: 0.0,
            noise_std: 0.0,
            augment: false,
            seed: 1,
        }
    }
}

impl LocalSpec {
    /// The JSON a train task carries.
    pub fn to_json(&self) -> String {
        // A struct of plain fields always serialises.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(text: &str) -> Result<LocalSpec, String> {
        serde_json::from_str(text).map_err(|e| format!("the round's local settings: {e}"))
    }
}

/// The kind of a new head, as the node defines the field: bool, categorical or numeric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NewHeadKind {
    #[serde(alias = "bool")]
    Binary,
    Categorical,
    #[serde(alias = "numeric")]
    Regression,
}

/// A head for a custom field: binary, categorical (with `categories`) or regression (with
/// `min` and `max`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewHead {
    pub name: String,
    pub kind: NewHeadKind,
    #[serde(default)]
    pub categories: Vec<String>,
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
}

impl NewHead {
    /// The label-map head this adds.
    pub fn head(&self) -> Result<Head, String> {
        if !cxrfed_schema::custom::valid_name(&self.name) {
            return Err(format!("new head {:?}: a snake_case field name", self.name));
        }
        let kind = match self.kind {
            NewHeadKind::Binary => HeadKind::Binary,
            NewHeadKind::Categorical if self.categories.len() >= 2 => HeadKind::Categorical {
                categories: self.categories.clone(),
            },
            NewHeadKind::Categorical => {
                return Err(format!(
                    "new head {:?}: categorical needs at least 2 categories",
                    self.name
                ));
            }
            NewHeadKind::Regression => match (self.min, self.max) {
                (Some(min), Some(max)) if min.is_finite() && max.is_finite() && min < max => {
                    HeadKind::Regression { min, max }
                }
                _ => {
                    return Err(format!(
                        "new head {:?}: regression needs min < max",
                        self.name
                    ));
                }
            },
        };
        Ok(Head::new(&self.name, kind))
    }
}

/// A job file (`cxrfed job start --job job.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobSpec {
    /// A free-text name.
    pub name: String,
    /// The registry version the job starts from.
    pub base: String,
    /// Heads to train (empty: every head of the base model, or only the new heads when the
    /// job adds some).
    pub heads: Vec<String>,
    /// Heads the job adds for researcher-defined fields (initialised at zero).
    pub new_heads: Vec<NewHead>,
    pub trainable: Trainable,
    pub algorithm: Algorithm,
    /// FedProx's proximal weight.
    pub mu: f64,
    /// FedAdam's server learning rate.
    pub server_learning_rate: f64,
    pub rounds: u32,
    pub local_epochs: u32,
    /// Optimiser steps per round at each site (0: whole epochs).
    pub local_steps: u32,
    pub batch_size: u32,
    pub learning_rate: f64,
    /// Sites asked (empty: every connected site).
    pub sites: Vec<String>,
    pub min_sites: u32,
    pub round_deadline_secs: u64,
    /// Tries per round before the job fails.
    pub attempts: u32,
    /// DP-FedAvg: clip each site's update to this L2 norm (0: off)...
    pub clip: f64,
    /// ...and noise of std `noise_multiplier * clip` in the sum, added at the sites: each adds
    /// its share (`noise_multiplier * clip / sqrt(min_sites)` under secure aggregation, the
    /// whole of it otherwise).
    pub noise_multiplier: f64,
    pub dp_delta: f64,
    /// Sites mask their updates pairwise so the coordinator learns only the sum (needs
    /// min_sites >= 2).
    pub secure_aggregation: bool,
    /// Privacy loss of each round's reported metrics and sample counts (noisy counts), charged
    /// at every site on top of the update's.
    pub metrics_epsilon: f64,
    /// The largest aggregation weight a site's (noisy, self-reported) sample count can earn.
    pub max_site_weight: u64,
    pub augment: bool,
    pub seed: u64,
}

impl Default for JobSpec {
    fn default() -> Self {
        JobSpec {
            name: String::new(),
            base: BUNDLED_VERSION.into(),
            heads: Vec::new(),
            new_heads: Vec::new(),
            trainable: Trainable::Heads,
            algorithm: Algorithm::FedAvg,
            mu: 0.01,
            server_learning_rate: 0.01,
            rounds: 3,
            local_epochs: 1,
            local_steps: 0,
            batch_size: 16,
            learning_rate: 1e-3,
            sites: Vec::new(),
            // Secure aggregation needs two sites to hide one.
            min_sites: 2,
            round_deadline_secs: 600,
            attempts: 2,
            clip: 0.0,
            noise_multiplier: 0.0,
            dp_delta: 1e-5,
            secure_aggregation: true,
            metrics_epsilon: 0.5,
            max_site_weight: 1000,
            augment: false,
            seed: 1,
        }
    }
}

impl JobSpec {
    /// Parses and checks a job file.
    pub fn parse(text: &str) -> Result<JobSpec, String> {
        let spec: JobSpec = toml::from_str(text).map_err(|e| format!("job file: {e}"))?;
        spec.validate()?;
        Ok(spec)
    }

    /// The heads the sites train.
    pub fn trained_heads(&self) -> Vec<String> {
        let mut heads = self.heads.clone();
        if heads.is_empty() {
            heads = self.new_heads.iter().map(|h| h.name.clone()).collect();
        } else {
            for h in &self.new_heads {
                if !heads.contains(&h.name) {
                    heads.push(h.name.clone());
                }
            }
        }
        heads
    }

    /// Whether the job is DP-FedAvg (clipped, noised updates, weighted equally).
    pub fn differentially_private(&self) -> bool {
        self.noise_multiplier > 0.0
    }

    /// The standard deviation of the noise each site adds: together the sites of a round
    /// (at least `min_sites`) add at least `noise_multiplier * clip`.
    pub fn site_noise_std(&self) -> f64 {
        let share = if self.secure_aggregation {
            f64::from(self.min_sites.max(1)).sqrt()
        } else {
            1.0
        };
        self.noise_multiplier * self.clip / share
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(1..=1000).contains(&self.rounds) {
            return Err("rounds must be 1 to 1000".into());
        }
        if self.local_epochs == 0 && self.local_steps == 0 {
            return Err("local_epochs or local_steps must be positive".into());
        }
        if !(2..=4096).contains(&self.batch_size) {
            return Err("batch_size must be 2 to 4096".into());
        }
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if !positive(self.learning_rate) || !positive(self.server_learning_rate) {
            return Err("learning rates must be positive".into());
        }
        if !(self.mu.is_finite() && self.mu >= 0.0) {
            return Err("mu must be >= 0".into());
        }
        if self.min_sites == 0 {
            return Err("min_sites must be at least 1".into());
        }
        if !self.sites.is_empty() && (self.min_sites as usize) > self.sites.len() {
            return Err(format!(
                "min_sites {} is more than the {} sites named",
                self.min_sites,
                self.sites.len()
            ));
        }
        if !(1..=86_400).contains(&self.round_deadline_secs) {
            return Err("round_deadline_secs must be 1 to 86400".into());
        }
        if !(1..=10).contains(&self.attempts) {
            return Err("attempts must be 1 to 10".into());
        }
        let non_negative = |v: f64| v.is_finite() && v >= 0.0;
        if !(non_negative(self.clip) && non_negative(self.noise_multiplier)) {
            return Err("clip and noise_multiplier must be >= 0".into());
        }
        if self.noise_multiplier > 0.0 && self.clip == 0.0 {
            return Err("noise needs clipping: set clip > 0 with noise_multiplier".into());
        }
        if self.noise_multiplier > 0.0 && !(self.dp_delta > 0.0 && self.dp_delta < 1.0) {
            return Err("dp_delta must be in (0, 1)".into());
        }
        if self.secure_aggregation && self.min_sites < 2 {
            return Err(
                "secure aggregation needs min_sites >= 2 (set secure_aggregation = false for a single site)"
                    .into(),
            );
        }
        if !(self.metrics_epsilon.is_finite() && self.metrics_epsilon > 0.0) {
            return Err("metrics_epsilon must be positive".into());
        }
        if self.max_site_weight == 0 {
            return Err("max_site_weight must be at least 1".into());
        }
        for (i, head) in self.new_heads.iter().enumerate() {
            head.head()?;
            if self.new_heads[..i].iter().any(|h| h.name == head.name) {
                return Err(format!("new head {:?} appears twice", head.name));
            }
        }
        Ok(())
    }

    /// The local settings every site receives.
    pub fn local(&self) -> LocalSpec {
        LocalSpec {
            heads: self.trained_heads(),
            trainable: self.trainable,
            // With a step budget, epochs only bound it (each has at least one step).
            epochs: if self.local_steps > 0 {
                self.local_steps
            } else {
                self.local_epochs
            } as usize,
            max_steps: self.local_steps as usize,
            batch_size: self.batch_size as usize,
            learning_rate: self.learning_rate,
            prox_mu: if self.algorithm == Algorithm::FedProx {
                self.mu
            } else {
                0.0
            },
            clip: self.clip,
            noise_std: self.site_noise_std(),
            augment: self.augment,
            seed: self.seed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_files_are_checked() {
        let spec = JobSpec::parse(
            "base = \"tiny-phantom-v1\"\nalgorithm = \"fedprox\"\nmu = 0.1\nrounds = 2\nmin_sites = 2\nsites = [\"a\", \"b\"]\n",
        )
        .expect("valid");
        assert_eq!(spec.algorithm, Algorithm::FedProx);
        assert_eq!(spec.local().prox_mu, 0.1);
        for bad in [
            "algorithm = \"fedsgd\"",
            "rounds = 0",
            "trainable = \"some\"",
            "min_sites = 3\nsites = [\"a\"]",
            "noise_multiplier = 1.0",
            "new_heads = [{ name = \"Bad Name\", kind = \"binary\" }]",
            "new_heads = [{ name = \"x\", kind = \"categorical\", categories = [\"a\"] }]",
            "new_heads = [{ name = \"x\", kind = \"histogram\" }]",
            "learning_rate = -1.0",
            "unknown_key = 1",
        ] {
            assert!(JobSpec::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn the_local_spec_crosses_as_typed_json() {
        let spec = JobSpec::parse(
            "trainable = \"last_block\"\nlocal_steps = 5\nnew_heads = [{ name = \"cardiomegaly\", kind = \"bool\" }]\n",
        )
        .expect("valid");
        let local = spec.local();
        assert_eq!(local.trainable, Trainable::LastBlock);
        assert_eq!((local.epochs, local.max_steps), (5, 5));
        assert_eq!(local.heads, vec!["cardiomegaly".to_string()]);
        assert_eq!(LocalSpec::from_json(&local.to_json()).expect("back"), local);
        assert!(LocalSpec::from_json("{\"trainable\": \"everything\"}").is_err());
        assert_eq!(
            spec.new_heads[0].head().expect("head").kind,
            HeadKind::Binary
        );
    }

    #[test]
    fn trainable_parses_its_spellings() {
        assert_eq!(
            "heads_only".parse::<Trainable>().expect("parse"),
            Trainable::Heads
        );
        assert_eq!(
            "last-block".parse::<Trainable>().expect("parse"),
            Trainable::LastBlock
        );
        assert_eq!(Trainable::LastBlock.to_string(), "last_block");
        assert!("some".parse::<Trainable>().is_err());
    }
}
