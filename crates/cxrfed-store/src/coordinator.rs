//! The coordinator's store: the registry of sites and its own audit chain of federated
//! queries and answers. It never holds records or exact aggregates: only site facts (identity,
//! version, model id, record count, times) and, on the audit chain, the queries, who asked,
//! which sites answered and digests of the pooled DP results.
//!
//! | tree | key | value |
//! | --- | --- | --- |
//! | `sites` | site name | JSON [`SiteRecord`] |
//! | `audit` | sequence number (u64 big-endian) | JSON [`AuditEntry`], hash-chained |
//! | `meta` | `audit_head` | JSON `{seq, hash}` |
//! | `jobs` | job id | JSON training job with its round log |
//! | `models` | model version | JSON registry entry (lineage); the weights are files named by
//! sha256 under the data directory's `models/` |

use std::path::Path;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use sled::Transactional;

use crate::audit::{self, AuditEntry, AuditEvent, AuditReport};
use crate::{GroupCommit, Result, StoreError};

/// What the coordinator knows of a site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct SiteRecord {
    pub site: String,
    /// The node certificate's identity URI.
    pub identity: String,
    /// RFC 3339.
    pub last_seen: String,
    pub connected_since: String,
    pub version: String,
    pub model_id: String,
    pub record_count: u64,
}

#[derive(Debug, Clone)]
pub struct CoordinatorStore {
    db: sled::Db,
    sites: sled::Tree,
    audit: sled::Tree,
    meta: sled::Tree,
    jobs: sled::Tree,
    models: sled::Tree,
    commits: std::sync::Arc<GroupCommit>,
}

/// The coordinator's JSON documents about training.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Doc {
    /// Training jobs and their round logs.
    Job,
    /// Model registry entries.
    Model,
}

impl CoordinatorStore {
    pub fn open(path: &Path) -> Result<CoordinatorStore> {
        let db = crate::open_db(path)?;
        Ok(CoordinatorStore {
            sites: db.open_tree("sites")?,
            audit: db.open_tree(audit::AUDIT)?,
            meta: db.open_tree("meta")?,
            jobs: db.open_tree("jobs")?,
            models: db.open_tree("models")?,
            commits: Default::default(),
            db,
        })
    }

    pub async fn flush(&self) -> Result<()> {
        self.commits.flush(&self.db).await
    }

    /// Records what a site said about itself (durable when this returns).
    pub async fn upsert_site(&self, site: &SiteRecord) -> Result<()> {
        let bytes = serde_json::to_vec(site).map_err(|e| StoreError::Encode(e.to_string()))?;
        self.sites.insert(site.site.as_bytes(), bytes)?;
        self.flush().await
    }

    /// Every site ever registered, by name.
    pub fn sites(&self) -> Result<Vec<SiteRecord>> {
        self.sites
            .iter()
            .map(|item| {
                let (key, value) = item?;
                serde_json::from_slice(&value).map_err(|e| StoreError::Corrupt {
                    record_id: format!("site {}", String::from_utf8_lossy(&key)),
                    message: e.to_string(),
                })
            })
            .collect()
    }

    fn tree(&self, doc: Doc) -> &sled::Tree {
        match doc {
            Doc::Job => &self.jobs,
            Doc::Model => &self.models,
        }
    }

    /// Writes several documents in one transaction: all or none survive a crash (a round's new
    /// model version and the job that now points at it).
    pub async fn put_docs(&self, docs: &[(Doc, String, serde_json::Value)]) -> Result<()> {
        let encoded: Vec<(Doc, &String, Vec<u8>)> = docs
            .iter()
            .map(|(d, k, v)| {
                serde_json::to_vec(v)
                    .map(|b| (*d, k, b))
                    .map_err(|e| StoreError::Encode(e.to_string()))
            })
            .collect::<Result<_>>()?;
        (&self.jobs, &self.models)
            .transaction(|(jobs, models)| {
                for (doc, key, bytes) in &encoded {
                    let tree = match doc {
                        Doc::Job => jobs,
                        Doc::Model => models,
                    };
                    tree.insert(key.as_bytes(), bytes.as_slice())?;
                }
                Ok::<(), sled::transaction::ConflictableTransactionError<StoreError>>(())
            })
            .map_err(|e| match e {
                sled::transaction::TransactionError::Abort(e) => e,
                sled::transaction::TransactionError::Storage(e) => StoreError::Sled(e),
            })?;
        self.flush().await
    }

    pub fn doc(&self, doc: Doc, key: &str) -> Result<Option<serde_json::Value>> {
        self.tree(doc)
            .get(key.as_bytes())?
            .map(|bytes| {
                serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                    record_id: format!("{doc:?} {key}"),
                    message: e.to_string(),
                })
            })
            .transpose()
    }

    /// Every document of a kind, by key.
    pub fn docs(&self, doc: Doc) -> Result<Vec<serde_json::Value>> {
        self.tree(doc)
            .iter()
            .map(|item| {
                let (key, value) = item?;
                serde_json::from_slice(&value).map_err(|e| StoreError::Corrupt {
                    record_id: format!("{doc:?} {}", String::from_utf8_lossy(&key)),
                    message: e.to_string(),
                })
            })
            .collect()
    }

    /// Appends to the coordinator's audit chain (durable when this returns).
    pub async fn audit(&self, event: AuditEvent) -> Result<AuditEntry> {
        let entry = audit::append(&self.audit, &self.meta, &event)?;
        self.flush().await?;
        Ok(entry)
    }

    pub fn audit_entries(&self, since: Option<DateTime<Utc>>) -> Result<Vec<AuditEntry>> {
        audit::entries_of(&self.audit, since)
    }

    pub fn verify_audit(&self) -> Result<AuditReport> {
        audit::verify_chain(&self.audit, &self.meta)
    }
}
