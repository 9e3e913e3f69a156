//! Signed query intents: what a researcher's client builds and signs, and the one rule set the
//! coordinator and every node verify it against (the coordinator before fanning out, each node
//! again before it charges and releases: a node never trusts the coordinator's check).

use std::time::Duration;

use cxrfed_proto::v1 as pb;
use cxrfed_stats::dp::Mechanism;
use cxrfed_stats::query::{Query, Statistic};
use prost::Message;

/// Clock skew tolerated on a signed intent's issue time.
pub const SKEW_SECS: i64 = 300;
/// The shortest nonce accepted (16 hex digits = 64 bits; clients send 128).
pub const MIN_NONCE_LEN: usize = 16;

/// An intent for `query` at `epsilon` per site in `study`, with a fresh 128-bit nonce, valid
/// from now for `valid_for`; every site of the study unless `sites` is set after.
pub fn new(
    study: &str,
    query: &str,
    epsilon: f64,
    valid_for: Duration,
) -> Result<pb::QueryIntent, cxrfed_auth::AuthError> {
    let mut nonce = [0u8; 16];
    getrandom::fill(&mut nonce)
        .map_err(|e| cxrfed_auth::AuthError::Invalid(format!("random: {e}")))?;
    let now = chrono::Utc::now().timestamp();
    Ok(pb::QueryIntent {
        study: study.to_string(),
        query: query.to_string(),
        epsilon,
        delta: 0.0,
        mechanism: String::new(),
        sites: Vec::new(),
        nonce: hex::encode(nonce),
        issued_at_unix: now,
        expires_at_unix: now + valid_for.as_secs() as i64,
    })
}

/// The intent's bytes signed with the researcher's key, with their certificate.
pub fn sign(
    signer: &cxrfed_auth::signing::Signer,
    intent: &pb::QueryIntent,
) -> Result<pb::SignedQuery, cxrfed_auth::AuthError> {
    let bytes = intent.encode_to_vec();
    Ok(pb::SignedQuery {
        signature: signer.sign(&bytes)?,
        intent: bytes,
        certificate: signer.certificate().to_vec(),
    })
}

/// What the verifier checks an intent against.
#[derive(Debug, Clone)]
pub struct Expect<'a> {
    /// The study this server serves.
    pub study: &'a str,
    /// The site verifying (a node), which the intent must name when it names sites at all;
    /// `None` at the coordinator.
    pub site: Option<&'a str>,
    /// Now, in Unix seconds.
    pub now_unix: i64,
}

/// Why an intent is not honoured. `refused()` tells a policy refusal (the signer, the study,
/// the validity window, the sites) from a malformed request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum IntentError {
    #[error("the signature: {0}")]
    Signature(String),
    #[error("the signed intent is unreadable: {0}")]
    Unreadable(String),
    #[error("the query is for study {got:?}; this server serves {serves:?}")]
    Study { got: String, serves: String },
    #[error("the signed query has expired or is not yet valid")]
    Expired,
    #[error("the researcher did not ask site {0}")]
    SiteNotAsked(String),
    #[error("the signed query has no nonce")]
    NoNonce,
    #[error("epsilon must be a positive number")]
    Epsilon,
    #[error("mechanism {0:?} must be laplace or gaussian")]
    Mechanism(String),
    #[error("query: {0}")]
    Query(String),
    #[error("summary has no DP release; use mean or sum")]
    NoDpRelease,
}

impl IntentError {
    /// A refusal by policy, as opposed to a malformed request.
    pub fn refused(&self) -> bool {
        matches!(
            self,
            IntentError::Signature(_)
                | IntentError::Study { .. }
                | IntentError::Expired
                | IntentError::SiteNotAsked(_)
        )
    }
}

/// A verified intent with its parsed query and mechanism.
#[derive(Debug, Clone)]
pub struct Verified {
    pub intent: pb::QueryIntent,
    pub query: Query,
    pub mechanism: Mechanism,
}

/// Verifies the signature over the exact intent bytes (with the certificate the signed query
/// carries: the caller checks that certificate is the one it trusts), then the intent: study,
/// validity window with clock skew, the site list, nonce, epsilon, mechanism and query.
pub fn verify(signed: &pb::SignedQuery, expect: &Expect<'_>) -> Result<Verified, IntentError> {
    cxrfed_auth::signing::verify(&signed.certificate, &signed.intent, &signed.signature)
        .map_err(|e| IntentError::Signature(e.to_string()))?;
    let intent = pb::QueryIntent::decode(signed.intent.as_slice())
        .map_err(|e| IntentError::Unreadable(e.to_string()))?;
    if intent.study != expect.study {
        return Err(IntentError::Study {
            got: intent.study,
            serves: expect.study.to_string(),
        });
    }
    if expect.now_unix > intent.expires_at_unix
        || intent.issued_at_unix > expect.now_unix + SKEW_SECS
    {
        return Err(IntentError::Expired);
    }
    if let Some(site) = expect.site
        && !intent.sites.is_empty()
        && !intent.sites.iter().any(|s| s == site)
    {
        return Err(IntentError::SiteNotAsked(site.to_string()));
    }
    if intent.nonce.len() < MIN_NONCE_LEN {
        return Err(IntentError::NoNonce);
    }
    if !(intent.epsilon.is_finite() && intent.epsilon > 0.0) {
        return Err(IntentError::Epsilon);
    }
    let mechanism = Mechanism::parse(&intent.mechanism)
        .ok_or_else(|| IntentError::Mechanism(intent.mechanism.clone()))?;
    let query =
        cxrfed_stats::query::parse(&intent.query).map_err(|e| IntentError::Query(e.to_string()))?;
    if matches!(query.statistic, Statistic::Summary(_)) {
        return Err(IntentError::NoDpRelease);
    }
    Ok(Verified {
        intent,
        query,
        mechanism,
    })
}
