//! Differentially private statistics at the node: what a release costs, who pays for it, and
//! what the audit chain records.
//!
//! A release is planned and computed on a blocking thread (opendp measurements are not `Send`)
//! from the columnar index, then charged to the caller's ledger account together with its audit
//! entry in one store transaction. Only when that commits is the release returned: an exhausted
//! budget releases nothing, and concurrent releases can never spend more than the budget.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use cxrfed_auth::{Identity, Role};
use cxrfed_proto::v1 as pb;
use cxrfed_stats::dp::{self, DpError, DpParams, DpRelease, Mechanism, Unlinked};
use cxrfed_store::{Account, AuditEntry, AuditEvent, Budget, Limit, RecordStore, StoreError};
use sha2::{Digest, Sha256};

use crate::columns::SharedColumns;
use crate::config::NodeConfig;
use crate::error::NodeError;

/// The site's DP settings.
#[derive(Debug, Clone)]
pub struct DpSettings {
    pub contributions: u32,
    pub suppress_below: u64,
    /// The budget of an identity the admin never set one for.
    pub default_budget: Budget,
    /// The training account's budget until the admin sets one.
    pub training_budget: Budget,
    pub unlinked: Unlinked,
    /// Keys the per-query row selection (derived from the site secret).
    pub selection_secret: [u8; 32],
    /// Release slots by identity ([`MAX_RELEASES_PER_IDENTITY`] each).
    pub in_flight: Arc<Mutex<HashMap<String, Arc<Semaphore>>>>,
}

/// Releases one identity may have computing at once; more wait for a slot.
pub const MAX_RELEASES_PER_IDENTITY: usize = 2;
/// How long one release may compute before it is abandoned with DEADLINE_EXCEEDED (nothing
/// released, nothing charged).
pub const RELEASE_DEADLINE: Duration = Duration::from_secs(30);

/// Waits (up to [`RELEASE_DEADLINE`]) for one of `identity`'s [`MAX_RELEASES_PER_IDENTITY`]
/// release slots; the permit is held until the computation ends (not when the caller gives
/// up on it). A researcher's parallel calls run two at a time; a flood waits, then gets
/// RESOURCE_EXHAUSTED.
async fn take_slot(
    in_flight: &Mutex<HashMap<String, Arc<Semaphore>>>,
    identity: &str,
) -> Result<OwnedSemaphorePermit, NodeError> {
    let slots = in_flight
        .lock()
        .entry(identity.to_string())
        .or_insert_with(|| Arc::new(Semaphore::new(MAX_RELEASES_PER_IDENTITY)))
        .clone();
    match tokio::time::timeout(RELEASE_DEADLINE, slots.acquire_owned()).await {
        Ok(Ok(permit)) => Ok(permit),
        _ => Err(NodeError::Busy(format!(
            "{identity} kept {MAX_RELEASES_PER_IDENTITY} DP releases computing for {} s; retry later",
            RELEASE_DEADLINE.as_secs()
        ))),
    }
}

impl DpSettings {
    pub fn from_config(config: &NodeConfig, selection_secret: [u8; 32]) -> DpSettings {
        DpSettings {
            contributions: config.dp_contributions,
            suppress_below: config.dp_suppress_below,
            default_budget: Budget {
                epsilon: config.dp_default_epsilon,
                delta: config.dp_default_delta,
            },
            training_budget: Budget {
                epsilon: config.dp_training_epsilon,
                delta: config.dp_training_delta,
            },
            unlinked: config.dp_unlinked_mode().unwrap_or_default(),
            selection_secret,
            in_flight: Arc::default(),
        }
    }
}

/// The privacy account every training round of `study` is charged to (`--identity training`
/// in `cxrfed node budget set`).
pub fn training_account(study: &str) -> String {
    format!("training:{study}")
}

/// Whether `identity` is the admin of `site` (whose releases are recorded, not limited).
pub fn is_site_admin(identity: &Identity, site: &str) -> bool {
    identity.role == Role::Admin && identity.site.as_deref() == Some(site)
}

/// How `identity`'s releases are limited.
pub fn limit_for(identity: &Identity, site: &str, settings: &DpSettings) -> Limit {
    if is_site_admin(identity, site) {
        Limit::Unlimited
    } else {
        Limit::Budget(settings.default_budget)
    }
}

/// An identity URI from what an admin types: a full `cxrfed://` URI (of this study),
/// `ROLE/SITE/NAME`, or a bare `NAME` (a researcher without a site).
pub fn resolve_identity(spec: &str, study: &str) -> Result<String, NodeError> {
    let spec = spec.trim();
    if spec == "training" || spec == training_account(study) {
        return Ok(training_account(study));
    }
    let invalid = |e: cxrfed_auth::AuthError| NodeError::InvalidRequest(e.to_string());
    if spec.starts_with("cxrfed://") {
        let (uri_study, role, site, name) =
            cxrfed_auth::identity::parse_uri(spec).map_err(invalid)?;
        if uri_study != study {
            return Err(NodeError::InvalidRequest(format!(
                "{spec} is of study {uri_study:?}; this node serves study {study:?}"
            )));
        }
        return Ok(cxrfed_auth::identity::identity_uri(
            study,
            role,
            site.as_deref(),
            &name,
        ));
    }
    let (role, site, name) = match spec.split('/').collect::<Vec<_>>().as_slice() {
        [name] => (Role::Researcher, None, *name),
        [role, site, name] => (
            role.parse::<Role>().map_err(invalid)?,
            Some(*site).filter(|s| *s != "-"),
            *name,
        ),
        _ => {
            return Err(NodeError::InvalidRequest(format!(
                "identity {spec:?} must be a cxrfed:// URI, ROLE/SITE/NAME or NAME"
            )));
        }
    };
    cxrfed_auth::identity::validate_label("name", name).map_err(invalid)?;
    if let Some(site) = site {
        cxrfed_auth::identity::validate_label("site", site).map_err(invalid)?;
    }
    Ok(cxrfed_auth::identity::identity_uri(study, role, site, name))
}

/// A DP statistics request, parsed.
#[derive(Debug, Clone)]
pub struct DpRequest {
    pub query: cxrfed_stats::Query,
    pub epsilon: f64,
    pub delta: f64,
    pub mechanism: Mechanism,
    /// Raw noisy values for a coordinator to pool (a federated task).
    pub raw: bool,
    /// The nonce of a signed request: charged once.
    pub nonce: Option<String>,
    /// Who relayed the request (the coordinator), for the audit chain.
    pub via: String,
}

impl DpRequest {
    /// A direct request (the `DpStats` RPC).
    pub fn direct(
        query: cxrfed_stats::Query,
        epsilon: f64,
        delta: f64,
        mechanism: Mechanism,
    ) -> DpRequest {
        DpRequest {
            query,
            epsilon,
            delta,
            mechanism,
            raw: false,
            nonce: None,
            via: String::new(),
        }
    }
}

/// A release that was charged and recorded.
#[derive(Debug, Clone)]
pub struct Released {
    pub release: DpRelease,
    /// The noise the release added.
    pub noise: Mechanism,
    pub account: Account,
    pub audit: AuditEntry,
}

fn dp_error(e: DpError) -> NodeError {
    match e {
        DpError::Query(q) => NodeError::InvalidRequest(format!("query: {q}")),
        DpError::Unsupported(m) => NodeError::InvalidRequest(m),
        DpError::OpenDp(m) => NodeError::Internal(format!("DP release: {m}")),
    }
}

/// Plans, computes, charges and records one DP release for `identity`.
pub async fn release(
    store: &RecordStore,
    columns: SharedColumns,
    settings: &DpSettings,
    identity: &Identity,
    limit: Limit,
    request: DpRequest,
    method: &str,
) -> Result<Released, NodeError> {
    let uri = identity.uri();
    let params = DpParams {
        epsilon: request.epsilon,
        delta: request.delta,
        mechanism: request.mechanism,
        contributions: settings.contributions,
        suppress_below: settings.suppress_below,
        unlinked: settings.unlinked,
        selection_secret: settings.selection_secret,
        raw: request.raw,
    };
    let (nonce, via) = (request.nonce.clone(), request.via.clone());
    let noise = request.mechanism;
    let precheck_store = store.clone();
    let precheck_uri = uri.clone();
    let slot = take_slot(&settings.in_flight, &uri).await?;
    let task = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let columns = columns.snapshot();
        let plan = dp::plan(&columns, request.query, &params).map_err(dp_error)?;
        let cost = plan.cost();
        // Fail fast without computing anything; the charge below is the authoritative check.
        if let Limit::Budget(_) = limit {
            let account = precheck_store.account(&precheck_uri, limit)?;
            if cost.epsilon > account.epsilon_remaining + 1e-9
                || cost.delta > account.delta_remaining + 1e-18
            {
                return Err(NodeError::Store(StoreError::BudgetExhausted {
                    identity: precheck_uri,
                    requested_epsilon: cost.epsilon,
                    remaining_epsilon: account.epsilon_remaining,
                    requested_delta: cost.delta,
                    remaining_delta: account.delta_remaining,
                }));
            }
        }
        plan.release(&columns).map_err(dp_error)
    });
    let release = tokio::time::timeout(RELEASE_DEADLINE, task)
        .await
        .map_err(|_| {
            NodeError::Deadline(format!(
                "the release did not finish within {} s; nothing was released or charged",
                RELEASE_DEADLINE.as_secs()
            ))
        })?
        .map_err(|e| NodeError::Internal(format!("DP task: {e}")))??;
    let event = AuditEvent {
        identity: uri.clone(),
        role: identity.role.as_str().to_string(),
        method: method.to_string(),
        query: release.query.clone(),
        epsilon: release.cost.epsilon,
        delta: release.cost.delta,
        digest: release.digest(),
        via,
    };
    let (account, audit) = store
        .charge(
            &uri,
            release.cost.epsilon,
            release.cost.delta,
            limit,
            event,
            nonce.as_deref(),
        )
        .await?;
    tracing::info!(
        statistic = release.statistic.as_str(),
        epsilon = release.cost.epsilon,
        delta = release.cost.delta,
        epsilon_remaining = account.epsilon_remaining,
        audit_seq = audit.seq,
        "DP statistics released"
    );
    Ok(Released {
        release,
        noise,
        account,
        audit,
    })
}

/// SHA-256 (hex) of any serializable value: the digest of what was released.
pub fn digest_of<T: serde::Serialize>(value: &T) -> String {
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    hex::encode(Sha256::digest(&bytes))
}

/// An audit event for a non-DP action by `identity`.
pub fn event(
    identity: Option<&Identity>,
    method: &str,
    query: String,
    digest: String,
) -> AuditEvent {
    AuditEvent {
        identity: identity.map(Identity::uri).unwrap_or_default(),
        role: identity
            .map(|i| i.role.as_str().to_string())
            .unwrap_or_default(),
        method: method.to_string(),
        query,
        epsilon: 0.0,
        delta: 0.0,
        digest,
        via: String::new(),
    }
}

/// A charged DP release as the proto message (the `DpStats` reply and a federated task's result).
pub fn dp_response(released: Released) -> pb::DpStatsResponse {
    let r = released.release;
    pb::DpStatsResponse {
        statistic: r.statistic,
        query: r.query,
        label_columns: r.label_columns,
        value_columns: r.value_columns,
        rows: r
            .rows
            .into_iter()
            .map(|row| pb::DpRow {
                labels: row.labels,
                values: row
                    .values
                    .into_iter()
                    .map(|v| pb::DpValue {
                        value: v.value,
                        error_bound: v.error_bound,
                    })
                    .collect(),
            })
            .collect(),
        epsilon: r.cost.epsilon,
        delta: r.cost.delta,
        mechanism: r.mechanism,
        noise: cxrfed_server::intent::wire_mechanism(released.noise).into(),
        noise_scale: r.noise_scale,
        confidence: r.confidence,
        contributions: r.contributions,
        suppress_below: r.suppress_below,
        threshold: r.threshold.unwrap_or(0),
        notes: r.notes,
        budget: Some(budget_account(released.account)),
        audit_seq: released.audit.seq,
        audit_hash: released.audit.hash,
        raw: r.raw,
        value_scales: r.value_scales,
    }
}

pub fn budget_account(account: cxrfed_store::Account) -> pb::BudgetAccount {
    pb::BudgetAccount {
        identity: account.identity,
        epsilon_budget: account.epsilon_budget,
        delta_budget: account.delta_budget,
        epsilon_spent: account.epsilon_spent,
        delta_spent: account.delta_spent,
        epsilon_remaining: account.epsilon_remaining,
        delta_remaining: account.delta_remaining,
        releases: account.releases,
        unlimited: account.unlimited,
        updated_at: account.updated_at,
    }
}
