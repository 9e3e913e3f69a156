//! The nodes' live links and the query tasks waiting on them. Knows nothing of queries or
//! training: a link is a sender of coordinator messages, a pending task is a reply slot.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use cxrfed_proto::v1 as pb;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

/// The sending half of one node's link.
pub type Outbound = mpsc::Sender<Result<pb::CoordinatorMessage, Status>>;

/// One node's live link.
#[derive(Debug)]
struct Link {
    id: u64,
    tx: Outbound,
}

/// A task sent and not yet answered.
#[derive(Debug)]
struct Pending {
    site: String,
    task: pb::Task,
    reply: oneshot::Sender<pb::TaskResult>,
}

/// Every live link (one per site) and every unanswered task.
#[derive(Debug)]
pub struct Links {
    links: Mutex<HashMap<String, Link>>,
    pending: Mutex<HashMap<String, Pending>>,
    next_link: AtomicU64,
}

impl Default for Links {
    fn default() -> Self {
        Links {
            links: Mutex::default(),
            pending: Mutex::default(),
            next_link: AtomicU64::new(1),
        }
    }
}

impl Links {
    /// Registers `site`'s new link (replacing an older one); returns its id for `detach`.
    pub fn attach(&self, site: &str, tx: Outbound) -> u64 {
        let id = self.next_link.fetch_add(1, Ordering::SeqCst);
        if self
            .links
            .lock()
            .insert(site.to_string(), Link { id, tx })
            .is_some()
        {
            tracing::info!(site, "site reconnected; its previous link is replaced");
        }
        id
    }

    /// Removes `site`'s link if it is still the one with `id` (a newer one stays).
    pub fn detach(&self, site: &str, id: u64) {
        let mut links = self.links.lock();
        if links.get(site).is_some_and(|l| l.id == id) {
            links.remove(site);
        }
    }

    /// The link of `site`, if connected.
    pub fn get(&self, site: &str) -> Option<Outbound> {
        self.links.lock().get(site).map(|l| l.tx.clone())
    }

    pub fn is_connected(&self, site: &str) -> bool {
        self.links.lock().contains_key(site)
    }

    /// The sites connected now, with their links.
    pub fn connected(&self) -> HashMap<String, Outbound> {
        self.links
            .lock()
            .iter()
            .map(|(s, l)| (s.clone(), l.tx.clone()))
            .collect()
    }

    /// The sites connected now, sorted by name.
    pub fn connected_sorted(&self) -> Vec<(String, Outbound)> {
        let mut all: Vec<_> = self.connected().into_iter().collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Remembers a task sent to `site` until it is answered or given up.
    pub fn wait_for(&self, site: &str, task: pb::Task) -> oneshot::Receiver<pb::TaskResult> {
        let (reply, rx) = oneshot::channel();
        self.pending.lock().insert(
            task.task_id.clone(),
            Pending {
                site: site.to_string(),
                task,
                reply,
            },
        );
        rx
    }

    /// Forgets a task (answered or timed out).
    pub fn forget(&self, task_id: &str) {
        self.pending.lock().remove(task_id);
    }

    /// The tasks still waiting for `site` (sent again when it reconnects).
    pub fn pending_for(&self, site: &str) -> Vec<pb::Task> {
        self.pending
            .lock()
            .values()
            .filter(|p| p.site == site)
            .map(|p| p.task.clone())
            .collect()
    }

    /// Routes a site's result to the query waiting for it. A result for another site's task is
    /// refused (and that task keeps waiting).
    pub fn answer(&self, site: &str, result: pb::TaskResult) {
        let mut pending = self.pending.lock();
        match pending.remove(&result.task_id) {
            Some(p) if p.site == site => {
                let _ = p.reply.send(result);
            }
            Some(p) => {
                tracing::warn!(
                    site,
                    task_site = p.site.as_str(),
                    "a site answered another site's task; ignored"
                );
                pending.insert(result.task_id.clone(), p);
            }
            None => tracing::debug!(
                site,
                task_id = result.task_id.as_str(),
                "result of a finished query"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn results_reach_only_the_site_asked() {
        let links = Links::default();
        let (tx, _rx) = mpsc::channel(1);
        let first = links.attach("a", tx.clone());
        let second = links.attach("a", tx);
        links.detach("a", first);
        assert!(links.is_connected("a"), "a newer link stays");
        let task = pb::Task {
            task_id: "q/a".into(),
            query: None,
        };
        let rx = links.wait_for("a", task);
        assert_eq!(links.pending_for("a").len(), 1);
        let result = pb::TaskResult {
            task_id: "q/a".into(),
            outcome: None,
        };
        links.answer("b", result.clone());
        assert_eq!(links.pending_for("a").len(), 1, "b cannot answer a's task");
        links.answer("a", result);
        assert_eq!(rx.await.expect("answered").task_id, "q/a");
        assert!(links.pending_for("a").is_empty());
        links.detach("a", second);
        assert!(!links.is_connected("a"));
    }
}
