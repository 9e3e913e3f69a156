//! The cxrfed study coordinator: nodes enrol over an outbound link (`Link`), researchers ask
//! federated differentially private questions (`Query`), and the coordinator pools the sites'
//! DP releases. It keeps a registry of sites and its own hash-chained audit log; it never sees
//! a record or an exact aggregate. It also runs federated fine-tuning jobs (`training`) and
//! keeps the model registry; aggregation works on raw f32 tensors (`aggregate`), so this crate
//! never links libtorch.

#![forbid(unsafe_code)]

pub mod aggregate;
pub mod config;
mod server;
pub mod service;
pub mod training;

pub use config::CoordinatorConfig;
pub use server::{COORDINATOR_RULES, ServeError, coordinator_policy, serve};

/// What a researcher's client does before asking: build and sign a [`QueryIntent`].
pub mod intent {
    use std::time::Duration;

    use cxrfed_proto::v1 as pb;
    use prost::Message;

    /// An intent for `query` at `epsilon` per site in `study`, with a fresh 128-bit nonce,
    /// valid from now for `valid_for`; every site of the study unless `sites` is set after.
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
            nonce: nonce.iter().map(|b| format!("{b:02x}")).collect(),
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
}
