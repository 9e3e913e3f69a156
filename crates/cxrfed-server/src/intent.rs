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
/// Longest validity window a signed query may ask for. It bounds how long a node must keep
/// the query's nonce to refuse a replay ([`NONCE_RETENTION_SECS`]).
pub const MAX_LIFETIME_SECS: i64 = 7 * 86_400;
/// How long a charged nonce (query or training-order attempt) is kept: past the longest
/// validity of anything signed, plus clock skew both ways, a replay is refused as expired.
pub const NONCE_RETENTION_SECS: i64 = if MAX_LIFETIME_SECS > crate::order::MAX_VALIDITY_SECS {
    MAX_LIFETIME_SECS
} else {
    crate::order::MAX_VALIDITY_SECS
} + 2 * SKEW_SECS;

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
        mechanism: pb::Mechanism::Unspecified.into(),
        sites: Vec::new(),
        nonce: hex::encode(nonce),
        issued_at_unix: now,
        expires_at_unix: now + valid_for.as_secs().min(MAX_LIFETIME_SECS as u64) as i64,
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

/// The release mechanism of a wire value (unspecified is the default, Laplace).
pub fn mechanism_of(wire: pb::Mechanism) -> Mechanism {
    match wire {
        pb::Mechanism::Gaussian => Mechanism::Gaussian,
        pb::Mechanism::Laplace | pb::Mechanism::Unspecified => Mechanism::Laplace,
    }
}

/// A release mechanism as the wire carries it.
pub fn wire_mechanism(mechanism: Mechanism) -> pb::Mechanism {
    match mechanism {
        Mechanism::Laplace => pb::Mechanism::Laplace,
        Mechanism::Gaussian => pb::Mechanism::Gaussian,
    }
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
    #[error("the signed query asks for more than {MAX_LIFETIME_SECS} s of validity")]
    TooLong,
    #[error("the signed query has no nonce")]
    NoNonce,
    #[error("epsilon must be a positive number")]
    Epsilon,
    #[error("mechanism {0} is not laplace or gaussian")]
    Mechanism(i32),
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
                | IntentError::TooLong
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
    if intent.expires_at_unix - intent.issued_at_unix > MAX_LIFETIME_SECS {
        return Err(IntentError::TooLong);
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
    let mechanism = pb::Mechanism::try_from(intent.mechanism)
        .map(mechanism_of)
        .map_err(|_| IntentError::Mechanism(intent.mechanism))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use cxrfed_auth::Role;
    use cxrfed_auth::pki::{self, IssueRequest, StudyCa};

    fn signer(dir: &std::path::Path) -> cxrfed_auth::signing::Signer {
        pki::init_ca(&dir.join("ca"), "study-x", 2).expect("ca");
        let ca = StudyCa::open(&dir.join("ca")).expect("open");
        let out = dir.join("rita");
        ca.issue(&IssueRequest::new(Role::Researcher, "rita", None, 2), &out)
            .expect("issue");
        cxrfed_auth::signing::Signer::load(&out.join(pki::CERT), &out.join(pki::KEY))
            .expect("signer")
    }

    fn expect(now: i64) -> Expect<'static> {
        Expect {
            study: "study-x",
            site: Some("site-a"),
            now_unix: now,
        }
    }

    #[test]
    fn one_rule_set_for_every_verifier() {
        let dir = tempfile::tempdir().expect("tempdir");
        let signer = signer(dir.path());
        let now = chrono::Utc::now().timestamp();
        let good = new("study-x", "count by view", 1.0, Duration::from_secs(60)).expect("intent");
        let signed = sign(&signer, &good).expect("sign");
        let verified = verify(&signed, &expect(now)).expect("valid");
        assert_eq!(verified.intent, good);
        assert_eq!(verified.mechanism, Mechanism::Laplace);

        let check = |intent: pb::QueryIntent| {
            verify(&sign(&signer, &intent).expect("sign"), &expect(now)).expect_err("refused")
        };
        let other_study = pb::QueryIntent {
            study: "study-y".into(),
            ..good.clone()
        };
        assert!(matches!(check(other_study), IntentError::Study { .. }));
        let expired = pb::QueryIntent {
            expires_at_unix: now - 1,
            ..good.clone()
        };
        assert_eq!(check(expired), IntentError::Expired);
        let from_the_future = pb::QueryIntent {
            issued_at_unix: now + SKEW_SECS + 60,
            ..good.clone()
        };
        assert_eq!(check(from_the_future), IntentError::Expired);
        let elsewhere = pb::QueryIntent {
            sites: vec!["site-b".into()],
            ..good.clone()
        };
        assert_eq!(check(elsewhere), IntentError::SiteNotAsked("site-a".into()));
        let short_nonce = pb::QueryIntent {
            nonce: "abc".into(),
            ..good.clone()
        };
        assert_eq!(check(short_nonce), IntentError::NoNonce);
        let mut forever = good.clone();
        forever.expires_at_unix = forever.issued_at_unix + MAX_LIFETIME_SECS + 1;
        assert_eq!(check(forever), IntentError::TooLong);
        let free = pb::QueryIntent {
            epsilon: 0.0,
            ..good.clone()
        };
        assert_eq!(check(free), IntentError::Epsilon);
        let mechanism = pb::QueryIntent {
            mechanism: 7,
            ..good.clone()
        };
        assert!(matches!(check(mechanism), IntentError::Mechanism(_)));
        let summary = pb::QueryIntent {
            query: "summary of cardiothoracic_ratio".into(),
            ..good.clone()
        };
        assert!(matches!(
            check(summary),
            IntentError::NoDpRelease | IntentError::Query(_)
        ));

        // Bytes changed after signing break the signature: a refusal, not a malformed request.
        let mut tampered = signed.clone();
        tampered.intent[3] ^= 1;
        let err = verify(&tampered, &expect(now)).expect_err("tampered");
        assert!(matches!(err, IntentError::Signature(_)) && err.refused());
        assert!(!IntentError::NoNonce.refused());
        // The coordinator names no site: any site list is fine there.
        let coordinator = Expect {
            site: None,
            ..expect(now)
        };
        let listed = pb::QueryIntent {
            sites: vec!["site-b".into()],
            ..good
        };
        verify(&sign(&signer, &listed).expect("sign"), &coordinator).expect("valid");
    }
}
