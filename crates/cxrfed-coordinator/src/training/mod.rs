//! Federated fine-tuning: jobs, rounds, the round log and the model registry.
//!
//! A job runs rounds. In each round the coordinator sends every participating site a
//! [`pb::TrainTask`] and the global weights in [`cxrfed_proto::CHUNK_BYTES`] chunks (slices of
//! one shared buffer) over its link; the site evaluates the incoming model on its held-out
//! records, trains on its own annotated records and streams back its update (a weights delta)
//! in chunks, then its report. Update chunks are spooled to disk as they arrive ([`hub`]); an
//! update is folded into the round's aggregator once complete and verified (size, sha256,
//! shape), so memory is the accumulator plus one update, whatever the number of sites.
//!
//! A round succeeds when at least `min_sites` updates arrived before the deadline; stragglers
//! are dropped. A failed round is retried (`attempts`), then the job fails with the reason.
//!
//! Crash safety: the job document (with its round log) and the registry live in the
//! coordinator's sled store ([`registry`]); weights are content-addressed files under
//! `models/`. A round's new model version and the job's pointer to it are committed in one
//! transaction after the weights file is durable, so a coordinator killed mid-round resumes at
//! that round with the last committed global weights. Task ids carry the job, round, attempt
//! and site: an update for an earlier attempt, a late one, or a second one from the same site
//! is recognised and ignored.
//!
//! Modules: `docs` (the stored documents), `registry` (documents and weight files, import,
//! the bundled model), `hub` (spooled uploads, routed reports, running jobs), `jobs` (the job
//! lifecycle), `round` (one attempt of a round), `rollout` (promotion and weights down a link).

mod docs;
pub mod hub;
mod jobs;
mod registry;
mod rollout;
mod round;

use std::sync::Arc;

pub use docs::{JobDoc, ModelDoc, RoundDoc, SiteDoc};
pub use hub::Hub;
pub(crate) use registry::now;
pub use registry::{MAX_MODEL_BYTES, Registry};
pub use round::pool_metrics;

use crate::links::Links;

/// The training engine: the registry, the hub where rounds meet the links, and the links.
#[derive(Debug)]
pub struct Trainer {
    registry: Registry,
    hub: Hub,
    links: Arc<Links>,
    /// Round durations and the other operator metrics (`/metrics`).
    metrics: Arc<cxrfed_server::metrics::Metrics>,
}

impl Trainer {
    pub fn new(registry: Registry, hub: Hub, links: Arc<Links>) -> Trainer {
        Trainer {
            registry,
            hub,
            links,
            metrics: Arc::default(),
        }
    }

    pub fn metrics(&self) -> &Arc<cxrfed_server::metrics::Metrics> {
        &self.metrics
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn hub(&self) -> &Hub {
        &self.hub
    }
}
