//! The privacy ledger: per identity (the client certificate's URI, which names the study), the
//! budget the site admin granted and what its releases have spent.
//!
//! Amounts are kept as integers (ε in units of 1e-9, δ in units of 1e-18): a charge is rounded
//! up and a budget down, and sums never drift. A charge, the check against the budget and the
//! audit entry of the release are one sled transaction, so concurrent releases can never spend
//! more than the budget, and no release is charged without its audit entry (or the reverse).

use chrono::{SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use sled::Transactional;
use sled::transaction::ConflictableTransactionError;

use crate::audit::{AuditEntry, AuditEvent, append_in};
use crate::{RecordStore, Result, StoreError};

pub(crate) const LEDGER: &str = "privacy_ledger";
const EPSILON_UNITS: f64 = 1e9;
const DELTA_UNITS: f64 = 1e18;
/// Slack below one unit, so that values like 0.1 that are not exact in binary do not round up.
const SLACK: f64 = 1e-3;

fn charge_units(amount: f64, per_unit: f64) -> u64 {
    (amount * per_unit - SLACK).ceil().max(0.0) as u64
}

fn budget_units(amount: f64, per_unit: f64) -> u64 {
    (amount * per_unit + SLACK).floor().max(0.0) as u64
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    identity: String,
    budget_epsilon: u64,
    budget_delta: u64,
    spent_epsilon: u64,
    spent_delta: u64,
    releases: u64,
    updated_at: String,
}

impl Stored {
    fn new(identity: &str, default: Budget) -> Stored {
        Stored {
            identity: identity.to_string(),
            budget_epsilon: budget_units(default.epsilon, EPSILON_UNITS),
            budget_delta: budget_units(default.delta, DELTA_UNITS),
            spent_epsilon: 0,
            spent_delta: 0,
            releases: 0,
            updated_at: String::new(),
        }
    }

    fn account(&self, unlimited: bool) -> Account {
        Account {
            identity: self.identity.clone(),
            epsilon_budget: self.budget_epsilon as f64 / EPSILON_UNITS,
            delta_budget: self.budget_delta as f64 / DELTA_UNITS,
            epsilon_spent: self.spent_epsilon as f64 / EPSILON_UNITS,
            delta_spent: self.spent_delta as f64 / DELTA_UNITS,
            epsilon_remaining: self.budget_epsilon.saturating_sub(self.spent_epsilon) as f64
                / EPSILON_UNITS,
            delta_remaining: self.budget_delta.saturating_sub(self.spent_delta) as f64
                / DELTA_UNITS,
            releases: self.releases,
            unlimited,
            updated_at: self.updated_at.clone(),
        }
    }
}

/// An (ε, δ) budget.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Budget {
    pub epsilon: f64,
    pub delta: f64,
}

/// How a charge is limited.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Limit {
    /// By the identity's budget; `Budget` is what an identity the admin never set starts with.
    Budget(Budget),
    /// Recorded but not limited (the site admin, who may see exact results anyway).
    Unlimited,
}

/// An identity's privacy account.
#[derive(Debug, Clone, PartialEq)]
pub struct Account {
    pub identity: String,
    pub epsilon_budget: f64,
    pub delta_budget: f64,
    pub epsilon_spent: f64,
    pub delta_spent: f64,
    pub epsilon_remaining: f64,
    pub delta_remaining: f64,
    pub releases: u64,
    pub unlimited: bool,
    /// RFC 3339 of the last change; empty for an account never written.
    pub updated_at: String,
}

fn read(
    tree: &sled::transaction::TransactionalTree,
    identity: &str,
    default: Budget,
) -> std::result::Result<Stored, ConflictableTransactionError<StoreError>> {
    match tree.get(identity.as_bytes())? {
        Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            ConflictableTransactionError::Abort(StoreError::Corrupt {
                record_id: format!("ledger account {identity}"),
                message: e.to_string(),
            })
        }),
        None => Ok(Stored::new(identity, default)),
    }
}

fn write(
    tree: &sled::transaction::TransactionalTree,
    stored: &Stored,
) -> std::result::Result<(), ConflictableTransactionError<StoreError>> {
    let bytes = serde_json::to_vec(stored)
        .map_err(|e| ConflictableTransactionError::Abort(StoreError::Encode(e.to_string())))?;
    tree.insert(stored.identity.as_bytes(), bytes)?;
    Ok(())
}

impl RecordStore {
    /// Charges (ε, δ) to `identity` and appends `event` to the audit chain, atomically: either
    /// the budget covers it and both are durable when this returns, or nothing is written and
    /// [`StoreError::BudgetExhausted`] says what was asked and what remains. A `nonce` (of a
    /// signed request) is charged once: a second charge with it is [`StoreError::Replay`].
    pub async fn charge(
        &self,
        identity: &str,
        epsilon: f64,
        delta: f64,
        limit: Limit,
        event: AuditEvent,
        nonce: Option<&str>,
    ) -> Result<(Account, AuditEntry)> {
        let now = Utc::now();
        let (epsilon_units, delta_units) = (
            charge_units(epsilon, EPSILON_UNITS),
            charge_units(delta, DELTA_UNITS),
        );
        let default = match limit {
            Limit::Budget(b) => b,
            Limit::Unlimited => Budget::default(),
        };
        let outcome = (&self.ledger, &self.audit, &self.meta, &self.nonces)
            .transaction(|(ledger, audit, meta, nonces)| {
                if let Some(nonce) = nonce {
                    if nonces.get(nonce.as_bytes())?.is_some() {
                        return Err(ConflictableTransactionError::Abort(StoreError::Replay {
                            nonce: nonce.to_string(),
                        }));
                    }
                    nonces.insert(
                        nonce.as_bytes(),
                        now.to_rfc3339_opts(SecondsFormat::Millis, true).as_bytes(),
                    )?;
                }
                let mut stored = read(ledger, identity, default)?;
                let remaining_epsilon = stored.budget_epsilon.saturating_sub(stored.spent_epsilon);
                let remaining_delta = stored.budget_delta.saturating_sub(stored.spent_delta);
                if matches!(limit, Limit::Budget(_))
                    && (epsilon_units > remaining_epsilon || delta_units > remaining_delta)
                {
                    return Err(ConflictableTransactionError::Abort(
                        StoreError::BudgetExhausted {
                            identity: identity.to_string(),
                            requested_epsilon: epsilon,
                            remaining_epsilon: remaining_epsilon as f64 / EPSILON_UNITS,
                            requested_delta: delta,
                            remaining_delta: remaining_delta as f64 / DELTA_UNITS,
                        },
                    ));
                }
                stored.spent_epsilon = stored.spent_epsilon.saturating_add(epsilon_units);
                stored.spent_delta = stored.spent_delta.saturating_add(delta_units);
                stored.releases += 1;
                stored.updated_at = now.to_rfc3339_opts(SecondsFormat::Millis, true);
                write(ledger, &stored)?;
                let mut event = event.clone();
                event.epsilon = epsilon_units as f64 / EPSILON_UNITS;
                event.delta = delta_units as f64 / DELTA_UNITS;
                let entry = append_in(audit, meta, &event, now)?;
                Ok((stored.account(matches!(limit, Limit::Unlimited)), entry))
            })
            .map_err(crate::transaction_error)?;
        self.flush().await?;
        Ok(outcome)
    }

    /// Sets `identity`'s total budget (what it has spent stays spent) and audits the change.
    pub async fn set_budget(
        &self,
        identity: &str,
        budget: Budget,
        event: AuditEvent,
    ) -> Result<(Account, AuditEntry)> {
        let now = Utc::now();
        let outcome = (&self.ledger, &self.audit, &self.meta)
            .transaction(|(ledger, audit, meta)| {
                let mut stored = read(ledger, identity, budget)?;
                stored.budget_epsilon = budget_units(budget.epsilon, EPSILON_UNITS);
                stored.budget_delta = budget_units(budget.delta, DELTA_UNITS);
                stored.updated_at = now.to_rfc3339_opts(SecondsFormat::Millis, true);
                write(ledger, &stored)?;
                let entry = append_in(audit, meta, &event, now)?;
                Ok((stored.account(false), entry))
            })
            .map_err(crate::transaction_error)?;
        self.flush().await?;
        Ok(outcome)
    }

    /// `identity`'s account (with `limit`'s default budget if it has none yet).
    pub fn account(&self, identity: &str, limit: Limit) -> Result<Account> {
        let default = match limit {
            Limit::Budget(b) => b,
            Limit::Unlimited => Budget::default(),
        };
        let stored = match self.ledger.get(identity.as_bytes())? {
            Some(bytes) => {
                serde_json::from_slice::<Stored>(&bytes).map_err(|e| StoreError::Corrupt {
                    record_id: format!("ledger account {identity}"),
                    message: e.to_string(),
                })?
            }
            None => Stored::new(identity, default),
        };
        Ok(stored.account(matches!(limit, Limit::Unlimited)))
    }

    /// Every account the ledger holds, by identity.
    pub fn accounts(&self) -> Result<Vec<Account>> {
        self.ledger
            .iter()
            .map(|item| {
                let (key, value) = item?;
                serde_json::from_slice::<Stored>(&value)
                    .map(|s| s.account(false))
                    .map_err(|e| StoreError::Corrupt {
                        record_id: format!("ledger account {}", String::from_utf8_lossy(&key)),
                        message: e.to_string(),
                    })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_round_charges_up_and_budgets_down() {
        assert_eq!(charge_units(0.25, EPSILON_UNITS), 250_000_000);
        assert_eq!(charge_units(0.1, EPSILON_UNITS), 100_000_000);
        assert_eq!(charge_units(0.100_000_000_5, EPSILON_UNITS), 100_000_001);
        assert_eq!(budget_units(1.0, EPSILON_UNITS), 1_000_000_000);
        assert_eq!(budget_units(0.999_999_999_5, EPSILON_UNITS), 999_999_999);
        assert_eq!(charge_units(1e-6, DELTA_UNITS), 1_000_000_000_000);
        assert_eq!(charge_units(0.0, DELTA_UNITS), 0);
    }

    #[tokio::test]
    async fn old_nonces_are_pruned_and_recent_ones_still_refuse_a_replay() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = RecordStore::open(dir.path()).expect("store");
        let event = || AuditEvent {
            identity: "cxrfed://s/researcher/-/r".into(),
            role: "researcher".into(),
            method: "DpStats".into(),
            query: "count".into(),
            epsilon: 0.1,
            delta: 0.0,
            digest: String::new(),
            via: String::new(),
        };
        for nonce in ["old-nonce-000000", "new-nonce-000000"] {
            store
                .charge("r", 0.1, 0.0, Limit::Unlimited, event(), Some(nonce))
                .await
                .expect("charge");
        }
        // Age the first one as if it had been charged 40 days ago.
        let long_ago =
            (Utc::now() - chrono::Duration::days(40)).to_rfc3339_opts(SecondsFormat::Millis, true);
        store
            .nonces
            .insert("old-nonce-000000", long_ago.as_bytes())
            .expect("age");
        let pruned = store
            .prune_nonces(Utc::now() - chrono::Duration::days(31))
            .expect("prune");
        assert_eq!(pruned, 1);
        let replay = store
            .charge(
                "r",
                0.1,
                0.0,
                Limit::Unlimited,
                event(),
                Some("new-nonce-000000"),
            )
            .await
            .expect_err("a recent nonce still refuses");
        assert!(matches!(replay, StoreError::Replay { .. }));
    }
}
