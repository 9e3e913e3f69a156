//! What this site obeys: a study admin's signed order, checked here (never trusting the
//! coordinator's check), and the site admin's training policy.
//!
//! An order is honoured only when its signer's certificate chains to the study CA, is neither
//! revoked nor expired, says role `study-admin` of this study, signed the exact order bytes,
//! and the order is for this study, names this site (or every site), is inside its validity
//! window and of the kind the task needs. The policy then decides whether this site takes
//! part at all and on what terms; a refusal names the rule.

use cxrfed_auth::{Identity, Role};
use cxrfed_fl::SitePolicy;
use cxrfed_proto::v1 as pb;

use crate::error::NodeError;
use crate::state::Node;

/// The settings key of the training policy.
const POLICY_KEY: &str = "training_policy";

/// A refusal a site reports: the rule (an order check or a `SitePolicy` key) and a coarse
/// message (never a count).
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub rule: String,
    pub message: String,
}

impl Refusal {
    pub fn new(rule: &str, message: impl Into<String>) -> Refusal {
        Refusal {
            rule: rule.to_string(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "refused ({}): {}", self.rule, self.message)
    }
}

impl From<cxrfed_fl::policy::Refusal> for Refusal {
    fn from(r: cxrfed_fl::policy::Refusal) -> Self {
        Refusal::new(r.rule, r.message)
    }
}

impl From<cxrfed_server::order::OrderError> for Refusal {
    fn from(e: cxrfed_server::order::OrderError) -> Self {
        Refusal::new(e.rule(), e.to_string())
    }
}

/// A verified order and who signed it.
#[derive(Debug, Clone)]
pub struct Ordered {
    pub verified: cxrfed_server::order::Verified,
    pub signer: Identity,
}

/// Verifies a signed order of `kind` for this site (see the module docs).
pub fn verify(
    state: &Node,
    signed: Option<&pb::SignedOrder>,
    kind: pb::OrderKind,
) -> Result<Ordered, Refusal> {
    let signed = signed
        .filter(|s| !s.order.is_empty())
        .ok_or_else(|| Refusal::from(cxrfed_server::order::OrderError::Unsigned))?;
    let Some(tls) = state.tls() else {
        return Err(Refusal::new(
            "signed-order",
            "this node runs --insecure-dev and cannot verify a study admin's certificate",
        ));
    };
    let signer = tls
        .current()
        .verify_signer(&signed.certificate, Role::StudyAdmin)
        .map_err(|e| Refusal::new("order-signer", e))?;
    let expect = cxrfed_server::order::Expect {
        study: state.study(),
        site: Some(&state.config().site),
        kind,
        now_unix: chrono::Utc::now().timestamp(),
    };
    let verified = cxrfed_server::order::verify(Some(signed), &expect)?;
    Ok(Ordered { verified, signer })
}

/// The site's training policy in force: the one its admin set (or the config file applied at
/// start), else the defaults (no training).
pub fn policy(state: &Node) -> Result<(SitePolicy, String, String), NodeError> {
    match state.store().setting(POLICY_KEY)? {
        Some(bytes) => {
            let stored: StoredPolicy = serde_json::from_slice(&bytes)
                .map_err(|e| NodeError::Internal(format!("stored training policy: {e}")))?;
            Ok((stored.policy, stored.updated_at, stored.updated_by))
        }
        None => Ok((SitePolicy::default(), String::new(), String::new())),
    }
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct StoredPolicy {
    policy: SitePolicy,
    updated_at: String,
    updated_by: String,
}

/// Replaces the training policy and records who did it on the audit chain, atomically.
pub async fn set_policy(
    state: &Node,
    policy: SitePolicy,
    by: Option<&Identity>,
    via: &str,
) -> Result<(), NodeError> {
    policy.validate().map_err(NodeError::InvalidRequest)?;
    let updated_by = by.map_or_else(|| via.to_string(), Identity::uri);
    let stored = StoredPolicy {
        policy,
        updated_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        updated_by,
    };
    let bytes = serde_json::to_vec(&stored).map_err(|e| NodeError::Internal(e.to_string()))?;
    let mut event = crate::privacy::event(
        by,
        "SetTrainingPolicy",
        stored.policy.to_toml(),
        crate::privacy::digest_of(&stored.policy),
    );
    event.via = via.to_string();
    state.store().set_setting(POLICY_KEY, &bytes, event).await?;
    Ok(())
}

/// Applies the config file's policy at start (audited) when it differs from the one stored.
pub async fn apply_config_policy(state: &Node) -> Result<(), NodeError> {
    let Some(path) = state.config().training_policy.clone() else {
        return Ok(());
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| NodeError::InvalidRequest(format!("{}: {e}", path.display())))?;
    let policy = SitePolicy::parse(&text).map_err(NodeError::InvalidRequest)?;
    if policy != policy_of(state)? {
        set_policy(
            state,
            policy,
            None,
            &format!("config file {}", path.display()),
        )
        .await?;
        tracing::info!(file = %path.display(), "training policy applied from the config file");
    }
    Ok(())
}

fn policy_of(state: &Node) -> Result<SitePolicy, NodeError> {
    Ok(policy(state)?.0)
}
