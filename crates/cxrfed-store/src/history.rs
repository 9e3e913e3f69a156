//! What a promotion may need to undo, and the site admin's settings.
//!
//! - **Model history.** Replacing a record's model output (a back-fill after a promotion, a
//!   re-extraction) keeps the previous output in `model_history`, in the same transaction, so
//!   a bad promotion can be rolled back to the exact findings the previous model gave, without
//!   running it again.
//! - **Settings** (`settings`): the site's training policy, set by its admin; each change is
//!   audited in the same transaction.
//! - **Orders** (`signed_nonces` with the `order:` prefix): the round attempts of signed
//!   training orders this site charged, counted for the policy's jobs-per-day rule and for the
//!   privacy accountant's release count.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use cxrfed_schema::{Findings, Record};
use serde::{Deserialize, Serialize};
use sled::Transactional;
use sled::transaction::ConflictableTransactionError;

use crate::audit::{AuditEntry, AuditEvent, append_in};
use crate::{RecordStore, Result, StoreError};

pub(crate) const HISTORY: &str = "model_history";
pub(crate) const SETTINGS: &str = "settings";
/// Earlier outputs kept per record.
pub const HISTORY_DEPTH: usize = 4;

/// One model's output for a record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelOutput {
    pub model_id: String,
    pub model_sha256: String,
    pub findings: Option<Findings>,
    pub model_fields: BTreeMap<String, String>,
    /// When a later output replaced it (RFC 3339; empty for the current one).
    pub replaced_at: String,
}

impl ModelOutput {
    fn of(record: &Record, now: &str) -> ModelOutput {
        ModelOutput {
            model_id: record.model_id.clone(),
            model_sha256: record.model_sha256.clone(),
            findings: record.findings.clone(),
            model_fields: record.model_fields.clone(),
            replaced_at: now.to_string(),
        }
    }
}

fn abort(e: StoreError) -> ConflictableTransactionError<StoreError> {
    ConflictableTransactionError::Abort(e)
}

fn encode_history(list: &[ModelOutput]) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    ciborium::into_writer(list, &mut bytes).map_err(|e| StoreError::Encode(e.to_string()))?;
    Ok(bytes)
}

fn decode_history(record_id: &str, bytes: &[u8]) -> Result<Vec<ModelOutput>> {
    ciborium::from_reader(bytes).map_err(|e| StoreError::Corrupt {
        record_id: format!("history of {record_id}"),
        message: e.to_string(),
    })
}

impl RecordStore {
    /// Replaces a record's model output with `output`, keeping the one it replaces in the
    /// record's history (unless it is the same model's). `None` when the record does not
    /// exist. Durable when this returns.
    pub async fn replace_model_output(
        &self,
        record_id: &str,
        output: &ModelOutput,
    ) -> Result<Option<Record>> {
        let now = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
        let outcome = (&self.records, &self.history)
            .transaction(|(records, history)| {
                let Some(bytes) = records.get(record_id.as_bytes())? else {
                    return Ok(None);
                };
                let mut record = Self::decode(record_id.as_bytes(), &bytes).map_err(abort)?;
                if !record.model_sha256.is_empty() && record.model_sha256 != output.model_sha256 {
                    let mut list = match history.get(record_id.as_bytes())? {
                        Some(b) => decode_history(record_id, &b).map_err(abort)?,
                        None => Vec::new(),
                    };
                    list.retain(|o| o.model_sha256 != record.model_sha256);
                    list.push(ModelOutput::of(&record, &now));
                    let excess = list.len().saturating_sub(HISTORY_DEPTH);
                    list.drain(..excess);
                    history.insert(record_id.as_bytes(), encode_history(&list).map_err(abort)?)?;
                }
                record.findings = output.findings.clone();
                record.model_fields = output.model_fields.clone();
                record.model_id = output.model_id.clone();
                record.model_sha256 = output.model_sha256.clone();
                let value = Self::encode(&record).map_err(abort)?;
                records.insert(record_id.as_bytes(), value.as_slice())?;
                Ok(Some(record))
            })
            .map_err(crate::transaction_error)?;
        if outcome.is_some() {
            self.flush().await?;
        }
        Ok(outcome)
    }

    /// A record's earlier model outputs, oldest first.
    pub fn model_history(&self, record_id: &str) -> Result<Vec<ModelOutput>> {
        match self.history.get(record_id.as_bytes())? {
            Some(bytes) => decode_history(record_id, &bytes),
            None => Ok(Vec::new()),
        }
    }

    /// The site admin's setting `name`, if set.
    pub fn setting(&self, name: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.settings.get(name.as_bytes())?.map(|v| v.to_vec()))
    }

    /// Sets `name` to `value` and appends `event` to the audit chain, atomically. Durable when
    /// this returns.
    pub async fn set_setting(
        &self,
        name: &str,
        value: &[u8],
        event: AuditEvent,
    ) -> Result<AuditEntry> {
        let now = Utc::now();
        let entry = (&self.settings, &self.audit, &self.meta)
            .transaction(|(settings, audit, meta)| {
                settings.insert(name.as_bytes(), value)?;
                append_in(audit, meta, &event, now)
            })
            .map_err(crate::transaction_error)?;
        self.flush().await?;
        Ok(entry)
    }

    /// The charged keys starting with `prefix` (`order:FP:NONCE:` counts one order's
    /// releases).
    pub fn charges_with_prefix(&self, prefix: &str) -> Result<usize> {
        Ok(self.nonces.scan_prefix(prefix.as_bytes()).count())
    }

    /// Removes the charged nonces older than `before` (past the longest validity of anything
    /// signed, a replay of them is refused as expired anyway); returns how many went.
    pub fn prune_nonces(&self, before: DateTime<Utc>) -> Result<usize> {
        let mut pruned = 0;
        for item in self.nonces.iter() {
            let (key, value) = item?;
            let at = DateTime::parse_from_rfc3339(&String::from_utf8_lossy(&value))
                .map(|t| t.with_timezone(&Utc));
            // An unreadable time is kept: never forget a nonce by accident.
            if let Ok(at) = at
                && at < before
            {
                self.nonces.remove(key)?;
                pruned += 1;
            }
        }
        if pruned > 0 {
            self.nonces.flush()?;
        }
        Ok(pruned)
    }

    /// The distinct signed training orders this site first charged at or after `since`.
    pub fn orders_since(&self, since: DateTime<Utc>) -> Result<usize> {
        let mut first: BTreeMap<String, DateTime<Utc>> = BTreeMap::new();
        for item in self.nonces.scan_prefix(b"order:") {
            let (key, value) = item?;
            let key = String::from_utf8_lossy(&key).into_owned();
            // order:FINGERPRINT:NONCE:rR:aA
            let order: String = key.splitn(4, ':').take(3).collect::<Vec<_>>().join(":");
            let at = DateTime::parse_from_rfc3339(&String::from_utf8_lossy(&value))
                .map(|t| t.with_timezone(&Utc))
                .unwrap_or(DateTime::<Utc>::MIN_UTC);
            first
                .entry(order)
                .and_modify(|t| *t = (*t).min(at))
                .or_insert(at);
        }
        Ok(first.values().filter(|t| **t >= since).count())
    }
}
