//! The coordinator's composition root: its configuration, store and study, the live links,
//! and the training engine. Only the gRPC layer and `serve` see it; the domain modules get
//! the parts they need.

use std::sync::Arc;

use cxrfed_store::CoordinatorStore;

use crate::config::CoordinatorConfig;
use crate::links::Links;
use crate::training::{Hub, Registry, Trainer};

#[derive(Debug)]
pub struct Coordinator {
    config: CoordinatorConfig,
    store: CoordinatorStore,
    study: String,
    links: Arc<Links>,
    trainer: Arc<Trainer>,
}

impl Coordinator {
    /// A coordinator over an open store, for `study`.
    pub fn new(config: CoordinatorConfig, store: CoordinatorStore, study: String) -> Coordinator {
        let layout = config.layout();
        let links = Arc::new(Links::default());
        let trainer = Arc::new(Trainer::new(
            Registry::new(store.clone(), layout.models_dir()),
            Hub::new(layout.data_dir().join("spool")).keeping_updates(config.keep_updates),
            links.clone(),
        ));
        Coordinator {
            config,
            store,
            study,
            links,
            trainer,
        }
    }

    pub fn config(&self) -> &CoordinatorConfig {
        &self.config
    }

    pub fn store(&self) -> &CoordinatorStore {
        &self.store
    }

    pub fn study(&self) -> &str {
        &self.study
    }

    pub fn links(&self) -> &Arc<Links> {
        &self.links
    }

    pub fn trainer(&self) -> &Arc<Trainer> {
        &self.trainer
    }

    /// The operators' metrics (`/metrics`).
    pub fn metrics(&self) -> &Arc<cxrfed_server::metrics::Metrics> {
        self.trainer.metrics()
    }
}
