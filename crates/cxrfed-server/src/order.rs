//! Signed orders: what a study admin's client builds and signs (a training job, a promotion),
//! and the one rule set the coordinator and every node verify it against. The coordinator
//! forwards the signed bytes unchanged with every task; a node verifies them before it trains,
//! evaluates or installs anything, so a coordinator can neither invent nor alter an order, and
//! cannot replay one: a node charges each round attempt of an order once, by its nonce.

use std::time::Duration;

use cxrfed_fl::JobSpec;
use cxrfed_proto::v1 as pb;
use prost::Message;
use sha2::{Digest, Sha256};

use crate::intent::{MIN_NONCE_LEN, SKEW_SECS};

/// The longest validity window an order may ask for (a site does not honour a job for ever).
pub const MAX_VALIDITY_SECS: i64 = 30 * 86_400;

fn fresh(
    study: &str,
    kind: pb::OrderKind,
    valid_for: Duration,
) -> Result<pb::Order, cxrfed_auth::AuthError> {
    let mut nonce = [0u8; 16];
    getrandom::fill(&mut nonce)
        .map_err(|e| cxrfed_auth::AuthError::Invalid(format!("random: {e}")))?;
    let now = chrono::Utc::now().timestamp();
    Ok(pb::Order {
        study: study.to_string(),
        kind: kind.into(),
        nonce: hex::encode(nonce),
        issued_at_unix: now,
        expires_at_unix: now + valid_for.as_secs().min(MAX_VALIDITY_SECS as u64) as i64,
        ..Default::default()
    })
}

/// An order to run `spec` from the base model whose weights have `base_sha256`, at the sites
/// the spec names (every site when it names none).
pub fn job(
    study: &str,
    spec: &JobSpec,
    base_sha256: &str,
    valid_for: Duration,
) -> Result<pb::Order, cxrfed_auth::AuthError> {
    let mut order = fresh(study, pb::OrderKind::Job, valid_for)?;
    order.spec_json = serde_json::to_string(spec)
        .map_err(|e| cxrfed_auth::AuthError::Invalid(format!("job spec: {e}")))?;
    order.model_version = spec.base.clone();
    order.model_sha256 = base_sha256.to_string();
    order.sites = spec.sites.clone();
    Ok(order)
}

/// An order to install `version` (weights `sha256`) at every site.
pub fn promotion(
    study: &str,
    version: &str,
    sha256: &str,
    valid_for: Duration,
) -> Result<pb::Order, cxrfed_auth::AuthError> {
    let mut order = fresh(study, pb::OrderKind::Promote, valid_for)?;
    order.model_version = version.to_string();
    order.model_sha256 = sha256.to_string();
    Ok(order)
}

/// The order's bytes signed with the study admin's key, with their certificate.
pub fn sign(
    signer: &cxrfed_auth::signing::Signer,
    order: &pb::Order,
) -> Result<pb::SignedOrder, cxrfed_auth::AuthError> {
    let bytes = order.encode_to_vec();
    Ok(pb::SignedOrder {
        signature: signer.sign(&bytes)?,
        order: bytes,
        certificate: signer.certificate().to_vec(),
    })
}

/// What the verifier checks an order against.
#[derive(Debug, Clone)]
pub struct Expect<'a> {
    pub study: &'a str,
    /// The site verifying (a node): an order naming sites must name it. `None` at the
    /// coordinator.
    pub site: Option<&'a str>,
    pub kind: pb::OrderKind,
    pub now_unix: i64,
}

/// Why an order is not honoured; `rule()` is the stable name a refusal reports.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OrderError {
    #[error("the task carries no signed order")]
    Unsigned,
    #[error("the order's signature: {0}")]
    Signature(String),
    #[error("the signed order is unreadable: {0}")]
    Unreadable(String),
    #[error("the order is for study {got:?}; this server serves {serves:?}")]
    Study { got: String, serves: String },
    #[error("the order is a {got} order; a {want} order is needed")]
    Kind { got: String, want: String },
    #[error("the order has expired or is not yet valid")]
    Expired,
    #[error("the order asks for more than {MAX_VALIDITY_SECS} s of validity")]
    TooLong,
    #[error("the study admin did not order site {0}")]
    SiteNotOrdered(String),
    #[error("the order has no nonce")]
    NoNonce,
    #[error("the order's job: {0}")]
    Spec(String),
    #[error("the order names no model sha256")]
    NoModel,
}

impl OrderError {
    /// The policy rule name a refusal reports (stable, for the job's site rows and tests).
    pub fn rule(&self) -> &'static str {
        match self {
            OrderError::Unsigned => "signed-order",
            OrderError::Signature(_) | OrderError::Unreadable(_) => "order-signature",
            OrderError::Study { .. } => "order-study",
            OrderError::Kind { .. } => "order-kind",
            OrderError::Expired | OrderError::TooLong => "order-validity",
            OrderError::SiteNotOrdered(_) => "order-sites",
            OrderError::NoNonce => "order-nonce",
            OrderError::Spec(_) | OrderError::NoModel => "order-spec",
        }
    }
}

/// A verified order: the order, its job (for a job order) and the signer's certificate
/// fingerprint (the caller verifies that certificate's chain and role).
#[derive(Debug, Clone)]
pub struct Verified {
    pub order: pb::Order,
    pub spec: Option<JobSpec>,
    pub fingerprint: String,
}

impl Verified {
    /// The key a site charges one round attempt of this order under (once, ever).
    pub fn charge_key(&self, round: u32, attempt: u32) -> String {
        format!(
            "order:{}:{}:r{round}:a{attempt}",
            self.fingerprint, self.order.nonce
        )
    }
}

fn label(kind: i32) -> String {
    pb::OrderKind::try_from(kind)
        .map(|k| {
            k.as_str_name()
                .trim_start_matches("ORDER_KIND_")
                .to_lowercase()
        })
        .unwrap_or_else(|_| format!("unknown ({kind})"))
}

/// Verifies the signature over the exact order bytes (with the certificate the signed order
/// carries), then the order: study, kind, validity window with clock skew, the site list,
/// nonce, model and (for a job) the job itself.
pub fn verify(
    signed: Option<&pb::SignedOrder>,
    expect: &Expect<'_>,
) -> Result<Verified, OrderError> {
    let signed = signed.ok_or(OrderError::Unsigned)?;
    if signed.order.is_empty() {
        return Err(OrderError::Unsigned);
    }
    cxrfed_auth::signing::verify(&signed.certificate, &signed.order, &signed.signature)
        .map_err(|e| OrderError::Signature(e.to_string()))?;
    let order = pb::Order::decode(signed.order.as_slice())
        .map_err(|e| OrderError::Unreadable(e.to_string()))?;
    if order.study != expect.study {
        return Err(OrderError::Study {
            got: order.study,
            serves: expect.study.to_string(),
        });
    }
    if order.kind != i32::from(expect.kind) {
        return Err(OrderError::Kind {
            got: label(order.kind),
            want: label(expect.kind.into()),
        });
    }
    if expect.now_unix > order.expires_at_unix || order.issued_at_unix > expect.now_unix + SKEW_SECS
    {
        return Err(OrderError::Expired);
    }
    if order.expires_at_unix - order.issued_at_unix > MAX_VALIDITY_SECS {
        return Err(OrderError::TooLong);
    }
    if let Some(site) = expect.site
        && !order.sites.is_empty()
        && !order.sites.iter().any(|s| s == site)
    {
        return Err(OrderError::SiteNotOrdered(site.to_string()));
    }
    if order.nonce.len() < MIN_NONCE_LEN {
        return Err(OrderError::NoNonce);
    }
    if order.model_sha256.len() != 64 {
        return Err(OrderError::NoModel);
    }
    let spec = if expect.kind == pb::OrderKind::Job {
        let spec: JobSpec =
            serde_json::from_str(&order.spec_json).map_err(|e| OrderError::Spec(e.to_string()))?;
        spec.validate().map_err(OrderError::Spec)?;
        if spec.base != order.model_version || spec.sites != order.sites {
            return Err(OrderError::Spec(
                "the job's base and sites differ from the order's".into(),
            ));
        }
        Some(spec)
    } else {
        None
    };
    Ok(Verified {
        order,
        spec,
        fingerprint: hex::encode(Sha256::digest(&signed.certificate)),
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
        let out = dir.join("sam");
        ca.issue(&IssueRequest::new(Role::StudyAdmin, "sam", None, 2), &out)
            .expect("issue");
        cxrfed_auth::signing::Signer::load(&out.join(pki::CERT), &out.join(pki::KEY))
            .expect("signer")
    }

    fn expect(now: i64, kind: pb::OrderKind) -> Expect<'static> {
        Expect {
            study: "study-x",
            site: Some("site-a"),
            kind,
            now_unix: now,
        }
    }

    #[test]
    fn orders_verify_and_every_alteration_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let signer = signer(dir.path());
        let now = chrono::Utc::now().timestamp();
        let spec = JobSpec::parse("rounds = 2\n").expect("spec");
        let sha = "a".repeat(64);
        let good = job("study-x", &spec, &sha, Duration::from_secs(3600)).expect("order");
        let signed = sign(&signer, &good).expect("sign");
        let verified = verify(Some(&signed), &expect(now, pb::OrderKind::Job)).expect("valid");
        assert_eq!(verified.spec.as_ref(), Some(&spec));
        assert_eq!(verified.order, good);
        // Keys differ per round and attempt, and per order.
        assert_ne!(verified.charge_key(1, 1), verified.charge_key(1, 2));
        assert_ne!(verified.charge_key(1, 1), verified.charge_key(2, 1));

        let check = |order: pb::Order, kind| {
            verify(
                Some(&sign(&signer, &order).expect("sign")),
                &expect(now, kind),
            )
            .expect_err("refused")
        };
        assert_eq!(
            verify(None, &expect(now, pb::OrderKind::Job)).expect_err("refused"),
            OrderError::Unsigned
        );
        assert!(matches!(
            check(good.clone(), pb::OrderKind::Promote),
            OrderError::Kind { .. }
        ));
        let other = pb::Order {
            study: "study-y".into(),
            ..good.clone()
        };
        assert!(matches!(
            check(other, pb::OrderKind::Job),
            OrderError::Study { .. }
        ));
        let expired = pb::Order {
            expires_at_unix: now - 1,
            ..good.clone()
        };
        assert_eq!(check(expired, pb::OrderKind::Job), OrderError::Expired);
        let forever = pb::Order {
            expires_at_unix: now + MAX_VALIDITY_SECS + 3600,
            ..good.clone()
        };
        assert_eq!(check(forever, pb::OrderKind::Job), OrderError::TooLong);
        let elsewhere = pb::Order {
            sites: vec!["site-b".into()],
            ..good.clone()
        };
        assert!(matches!(
            check(elsewhere, pb::OrderKind::Job),
            OrderError::SiteNotOrdered(_) | OrderError::Spec(_)
        ));
        let no_nonce = pb::Order {
            nonce: String::new(),
            ..good.clone()
        };
        assert_eq!(check(no_nonce, pb::OrderKind::Job), OrderError::NoNonce);
        let bad_spec = pb::Order {
            spec_json: "{\"rounds\": 0}".into(),
            ..good.clone()
        };
        assert!(matches!(
            check(bad_spec, pb::OrderKind::Job),
            OrderError::Spec(_)
        ));

        // Bytes changed after signing break the signature.
        let mut tampered = signed.clone();
        let at = tampered.order.len() - 3;
        tampered.order[at] ^= 1;
        let err = verify(Some(&tampered), &expect(now, pb::OrderKind::Job)).expect_err("tampered");
        assert_eq!(err.rule(), "order-signature");

        let promote = promotion("study-x", "v2", &sha, Duration::from_secs(60)).expect("order");
        let signed = sign(&signer, &promote).expect("sign");
        let verified =
            verify(Some(&signed), &expect(now, pb::OrderKind::Promote)).expect("promotion");
        assert!(verified.spec.is_none());
        assert_eq!(verified.order.model_version, "v2");
    }
}
