//! The audit chain: an append-only, hash-chained log of every release of information from the
//! node (DP releases, exact queries, exports), every budget change and every annotation import.
//!
//! Entry `n` is stored under its sequence number (u64 big-endian) as JSON and carries the hash of
//! entry `n - 1`; its own hash is SHA-256 over its JSON with the `hash` field empty. The `meta`
//! tree keeps the head (last sequence number and hash), so removing entries from the end is
//! detected too. Appends run in a sled transaction with the head (and, for a DP release, with the
//! ledger charge), so the chain never forks under concurrent writers.
//!
//! The chain makes tampering evident to anyone who can read the store; it cannot stop someone
//! who rewrites the whole chain consistently. Printing the head hash (`cxrfed node audit show`)
//! and keeping it elsewhere anchors it.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sled::transaction::{ConflictableTransactionError, TransactionalTree};

use crate::{RecordStore, Result, StoreError};

pub(crate) const AUDIT: &str = "audit";
pub(crate) const HEAD_KEY: &str = "audit_head";
/// The `prev` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What a caller records; the store adds sequence number, time and chaining.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuditEvent {
    /// The caller's identity URI.
    pub identity: String,
    pub role: String,
    /// The RPC (or CLI action) that released or changed something.
    pub method: String,
    /// The query text (canonical), export filter, or a description of the change.
    pub query: String,
    pub epsilon: f64,
    pub delta: f64,
    /// SHA-256 (hex) of what was released; empty when nothing was.
    pub digest: String,
    /// Who relayed the request (a federated query's coordinator); empty for direct calls.
    pub via: String,
}

/// One entry of the chain, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: u64,
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    pub identity: String,
    pub role: String,
    pub method: String,
    pub query: String,
    pub epsilon: f64,
    pub delta: f64,
    pub digest: String,
    /// Who relayed the request (a federated query's coordinator). Absent from the JSON when
    /// empty, so entries written before the field existed hash as they did.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub via: String,
    /// Hash of the previous entry ([`GENESIS`] for the first).
    pub prev: String,
    /// SHA-256 of this entry's JSON with `hash` empty.
    pub hash: String,
}

impl AuditEntry {
    /// The hash this entry should carry.
    pub fn compute_hash(&self) -> String {
        let mut unhashed = self.clone();
        unhashed.hash.clear();
        let bytes = serde_json::to_vec(&unhashed).unwrap_or_default();
        hex(&Sha256::digest(&bytes))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Head {
    seq: u64,
    hash: String,
}

fn hex(bytes: &[u8]) -> String {
    ::hex::encode(bytes)
}

/// The outcome of [`RecordStore::verify_audit`].
#[derive(Debug, Clone, PartialEq)]
pub struct AuditReport {
    /// Entries checked.
    pub entries: u64,
    /// Hash of the last entry (GENESIS for an empty chain).
    pub head: String,
    /// The first broken link, if any.
    pub broken: Option<BrokenLink>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BrokenLink {
    /// The entry at which the chain stops verifying.
    pub seq: u64,
    pub reason: String,
}

fn encode_error(e: serde_json::Error) -> ConflictableTransactionError<StoreError> {
    ConflictableTransactionError::Abort(StoreError::Encode(e.to_string()))
}

/// Appends `event` inside a transaction over the audit tree and the meta tree.
pub(crate) fn append_in(
    audit: &TransactionalTree,
    meta: &TransactionalTree,
    event: &AuditEvent,
    now: DateTime<Utc>,
) -> std::result::Result<AuditEntry, ConflictableTransactionError<StoreError>> {
    let head = match meta.get(HEAD_KEY)? {
        Some(bytes) => serde_json::from_slice::<Head>(&bytes).map_err(|e| {
            ConflictableTransactionError::Abort(StoreError::Corrupt {
                record_id: "audit head".into(),
                message: e.to_string(),
            })
        })?,
        None => Head {
            seq: 0,
            hash: GENESIS.into(),
        },
    };
    let mut entry = AuditEntry {
        seq: head.seq + 1,
        time: now.to_rfc3339_opts(SecondsFormat::Millis, true),
        identity: event.identity.clone(),
        role: event.role.clone(),
        method: event.method.clone(),
        query: event.query.clone(),
        epsilon: event.epsilon,
        delta: event.delta,
        digest: event.digest.clone(),
        via: event.via.clone(),
        prev: head.hash,
        hash: String::new(),
    };
    entry.hash = entry.compute_hash();
    audit.insert(
        &entry.seq.to_be_bytes(),
        serde_json::to_vec(&entry).map_err(encode_error)?,
    )?;
    meta.insert(
        HEAD_KEY,
        serde_json::to_vec(&Head {
            seq: entry.seq,
            hash: entry.hash.clone(),
        })
        .map_err(encode_error)?,
    )?;
    Ok(entry)
}

/// A `since` bound for [`RecordStore::audit_entries`]: an RFC 3339 time or YYYY-MM-DD (midnight
/// UTC); empty is none. The error says what is accepted.
pub fn parse_since(text: &str) -> std::result::Result<Option<DateTime<Utc>>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(Some(t.with_timezone(&Utc)));
    }
    chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| Some(t.and_utc()))
        .ok_or_else(|| format!("since {text:?} must be an RFC 3339 time or YYYY-MM-DD"))
}

/// Entries of an audit tree in order, from `since` (inclusive) on.
pub(crate) fn entries_of(
    audit: &sled::Tree,
    since: Option<DateTime<Utc>>,
) -> Result<Vec<AuditEntry>> {
    let since = since.map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true));
    let mut out = Vec::new();
    for item in audit.iter() {
        let (key, value) = item?;
        let entry: AuditEntry =
            serde_json::from_slice(&value).map_err(|e| StoreError::Corrupt {
                record_id: format!("audit entry {}", seq_of(&key)),
                message: e.to_string(),
            })?;
        if since.as_ref().is_none_or(|s| entry.time >= *s) {
            out.push(entry);
        }
    }
    Ok(out)
}

/// Walks a whole chain: every entry must be readable, numbered in order, hash to what it says
/// and link to its predecessor, and the head must name the last entry.
pub(crate) fn verify_chain(audit: &sled::Tree, meta: &sled::Tree) -> Result<AuditReport> {
    let mut expected = 1u64;
    let mut prev = GENESIS.to_string();
    let broken = |seq: u64, reason: String, entries: u64, head: &str| AuditReport {
        entries,
        head: head.to_string(),
        broken: Some(BrokenLink { seq, reason }),
    };
    for item in audit.iter() {
        let (key, value) = item?;
        let checked = expected - 1;
        let key_seq = seq_of(&key);
        let entry: AuditEntry = match serde_json::from_slice(&value) {
            Ok(entry) => entry,
            Err(e) => {
                return Ok(broken(
                    key_seq,
                    format!("entry {key_seq} is not readable: {e}"),
                    checked,
                    &prev,
                ));
            }
        };
        if key_seq != expected || entry.seq != key_seq {
            return Ok(broken(
                expected,
                format!(
                    "entry {expected} is missing or renumbered (found entry {} stored as {key_seq})",
                    entry.seq
                ),
                checked,
                &prev,
            ));
        }
        if entry.compute_hash() != entry.hash {
            return Ok(broken(
                key_seq,
                format!("entry {key_seq} was altered: its contents do not match its hash"),
                checked,
                &prev,
            ));
        }
        if entry.prev != prev {
            return Ok(broken(
                key_seq,
                format!(
                    "entry {key_seq} does not link to entry {}: one of them was altered or replaced",
                    key_seq - 1
                ),
                checked,
                &prev,
            ));
        }
        prev = entry.hash;
        expected += 1;
    }
    let entries = expected - 1;
    let head = match meta.get(HEAD_KEY)? {
        Some(bytes) => serde_json::from_slice::<Head>(&bytes).ok(),
        None => None,
    };
    let head_ok = match &head {
        Some(h) => h.seq == entries && h.hash == prev,
        None => entries == 0,
    };
    if !head_ok {
        let recorded = head.map_or(0, |h| h.seq);
        return Ok(broken(
            entries + 1,
            format!(
                "the chain ends at entry {entries} but its head records entry {recorded}: entries were removed or the head was altered"
            ),
            entries,
            &prev,
        ));
    }
    Ok(AuditReport {
        entries,
        head: prev,
        broken: None,
    })
}

/// Appends `event` to the chain in `audit` (head in `meta`) in one transaction.
pub(crate) fn append(
    audit: &sled::Tree,
    meta: &sled::Tree,
    event: &AuditEvent,
) -> Result<AuditEntry> {
    use sled::Transactional;
    let now = Utc::now();
    (audit, meta)
        .transaction(|(audit, meta)| append_in(audit, meta, event, now))
        .map_err(crate::transaction_error)
}

impl RecordStore {
    /// Appends one entry to the audit chain. Durable when this returns.
    pub async fn audit(&self, event: AuditEvent) -> Result<AuditEntry> {
        let entry = append(&self.audit, &self.meta, &event)?;
        self.flush().await?;
        Ok(entry)
    }

    /// Entries in order, from `since` (inclusive) on.
    pub fn audit_entries(&self, since: Option<DateTime<Utc>>) -> Result<Vec<AuditEntry>> {
        entries_of(&self.audit, since)
    }

    /// Walks the whole chain (see [`verify_chain`]).
    pub fn verify_audit(&self) -> Result<AuditReport> {
        verify_chain(&self.audit, &self.meta)
    }
}

fn seq_of(key: &[u8]) -> u64 {
    key.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{Budget, Limit};

    fn event(i: u32) -> AuditEvent {
        AuditEvent {
            identity: "cxrfed://s/researcher/-/alice".into(),
            role: "researcher".into(),
            method: "DpStats".into(),
            query: format!("count where view = \"PA\" -- {i}"),
            epsilon: 0.1,
            delta: 0.0,
            digest: "ab".repeat(32),
            via: String::new(),
        }
    }

    async fn store_with(n: u32) -> (tempfile::TempDir, RecordStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = RecordStore::open(dir.path()).expect("open");
        for i in 0..n {
            store.audit(event(i)).await.expect("append");
        }
        (dir, store)
    }

    fn rewrite(store: &RecordStore, seq: u64, edit: impl FnOnce(&mut AuditEntry)) {
        let bytes = store
            .audit
            .get(seq.to_be_bytes())
            .expect("get")
            .expect("present");
        let mut entry: AuditEntry = serde_json::from_slice(&bytes).expect("json");
        edit(&mut entry);
        store
            .audit
            .insert(seq.to_be_bytes(), serde_json::to_vec(&entry).expect("json"))
            .expect("insert");
    }

    #[tokio::test]
    async fn an_untouched_chain_verifies_and_links() {
        let (_dir, store) = store_with(5).await;
        let report = store.verify_audit().expect("verify");
        assert_eq!(report.entries, 5);
        assert_eq!(report.broken, None);
        let entries = store.audit_entries(None).expect("entries");
        assert_eq!(entries[0].prev, GENESIS);
        for pair in entries.windows(2) {
            assert_eq!(pair[1].prev, pair[0].hash);
            assert_eq!(pair[1].seq, pair[0].seq + 1);
        }
        assert_eq!(report.head, entries[4].hash);
    }

    #[tokio::test]
    async fn an_altered_entry_is_named() {
        let (_dir, store) = store_with(5).await;
        rewrite(&store, 3, |e| e.epsilon = 0.0);
        let broken = store
            .verify_audit()
            .expect("verify")
            .broken
            .expect("broken");
        assert_eq!(broken.seq, 3, "{}", broken.reason);
        assert!(broken.reason.contains("altered"), "{}", broken.reason);
    }

    #[tokio::test]
    async fn a_rehashed_entry_breaks_the_next_link() {
        let (_dir, store) = store_with(5).await;
        rewrite(&store, 2, |e| {
            e.query = "count".into();
            e.hash = e.compute_hash();
        });
        let broken = store
            .verify_audit()
            .expect("verify")
            .broken
            .expect("broken");
        assert_eq!(broken.seq, 3, "{}", broken.reason);
        assert!(broken.reason.contains("entry 2"), "{}", broken.reason);
    }

    #[tokio::test]
    async fn removed_entries_are_detected() {
        let (_dir, store) = store_with(5).await;
        store.audit.remove(5u64.to_be_bytes()).expect("remove");
        let broken = store
            .verify_audit()
            .expect("verify")
            .broken
            .expect("broken");
        assert!(broken.reason.contains("removed"), "{}", broken.reason);
        let (_dir, store) = store_with(5).await;
        store.audit.remove(2u64.to_be_bytes()).expect("remove");
        let broken = store
            .verify_audit()
            .expect("verify")
            .broken
            .expect("broken");
        assert_eq!(broken.seq, 2, "{}", broken.reason);
    }

    #[tokio::test]
    async fn charges_and_budget_changes_are_chained_with_the_ledger() {
        let (_dir, store) = store_with(1).await;
        let alice = "cxrfed://s/researcher/-/alice";
        store
            .set_budget(
                alice,
                Budget {
                    epsilon: 0.3,
                    delta: 0.0,
                },
                event(9),
            )
            .await
            .expect("set");
        let limit = Limit::Budget(Budget::default());
        for _ in 0..3 {
            store
                .charge(alice, 0.1, 0.0, limit, event(1), None)
                .await
                .expect("within budget");
        }
        let err = store
            .charge(alice, 0.1, 0.0, limit, event(1), None)
            .await
            .expect_err("exhausted");
        assert!(
            matches!(err, StoreError::BudgetExhausted { remaining_epsilon, .. } if remaining_epsilon == 0.0),
            "{err}"
        );
        let account = store.account(alice, limit).expect("account");
        assert_eq!(account.releases, 3);
        assert!((account.epsilon_spent - 0.3).abs() < 1e-12);
        let report = store.verify_audit().expect("verify");
        assert_eq!((report.entries, report.broken), (5, None));
    }

    #[tokio::test]
    async fn concurrent_charges_never_overspend() {
        let (_dir, store) = store_with(0).await;
        let bob = "cxrfed://s/researcher/-/bob";
        let limit = Limit::Budget(Budget {
            epsilon: 1.0,
            delta: 0.0,
        });
        let tasks: Vec<_> = (0..50)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(
                    async move { store.charge(bob, 0.07, 0.0, limit, event(i), None).await },
                )
            })
            .collect();
        let mut ok = 0;
        for t in tasks {
            match t.await.expect("join") {
                Ok(_) => ok += 1,
                Err(StoreError::BudgetExhausted { .. }) => {}
                Err(e) => panic!("{e}"),
            }
        }
        // floor(1.0 / 0.07) = 14
        assert_eq!(ok, 14);
        let account = store.account(bob, limit).expect("account");
        assert!(account.epsilon_spent <= 1.0);
        assert_eq!(store.verify_audit().expect("verify").entries, 14);
    }
}
