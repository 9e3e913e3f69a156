//! The statistics columns, shared copy-on-write.
//!
//! A DP release or an exact query can take a while on a large site; it must not stall
//! extraction, annotation or field definitions, and they must not stall it. Readers take a
//! [`SharedColumns::snapshot`] (an `Arc`, the lock held for a pointer copy) and compute on it
//! without any lock. Writers run on the blocking pool ([`SharedColumns::update`]): the change
//! applies in place when no snapshot is out, and to a copy (`Arc::make_mut`) when one is, so a
//! running release keeps the columns it started with and never holds up a write.

use std::sync::Arc;

use cxrfed_stats::Columns;
use parking_lot::RwLock;

use crate::error::NodeError;

#[derive(Debug, Clone)]
pub struct SharedColumns {
    inner: Arc<RwLock<Arc<Columns>>>,
}

impl SharedColumns {
    pub fn new(columns: Columns) -> Self {
        SharedColumns {
            inner: Arc::new(RwLock::new(Arc::new(columns))),
        }
    }

    /// The columns as they are now; later writes do not change this snapshot.
    pub fn snapshot(&self) -> Arc<Columns> {
        self.inner.read().clone()
    }

    /// Applies `change` on the blocking pool (it may copy the columns), never on an async
    /// worker.
    pub async fn update<R: Send + 'static>(
        &self,
        change: impl FnOnce(&mut Columns) -> R + Send + 'static,
    ) -> Result<R, NodeError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || change(Arc::make_mut(&mut inner.write())))
            .await
            .map_err(|e| NodeError::Internal(format!("columns update: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_write_copies_only_while_a_snapshot_is_out() {
        let shared = SharedColumns::new(Columns::new());
        let first = Arc::as_ptr(&shared.snapshot());
        shared.update(|_| ()).await.expect("update");
        assert_eq!(
            first,
            Arc::as_ptr(&shared.snapshot()),
            "in place: no reader"
        );
        let held = shared.snapshot();
        shared.update(|_| ()).await.expect("update");
        assert!(
            !Arc::ptr_eq(&held, &shared.snapshot()),
            "copied: a reader holds one"
        );
    }
}
