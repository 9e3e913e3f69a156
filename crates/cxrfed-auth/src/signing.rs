//! Signed requests: a researcher signs a federated query with the private key of their
//! certificate, so that a site charges that researcher's budget only for questions the
//! researcher asked — not for anything a coordinator makes up.
//!
//! Signatures are ECDSA P-256 with SHA-256 in ASN.1 DER (the keys `cxrfed certs issue` makes),
//! computed and verified with ring. Verifying a signature proves possession of the key of the
//! certificate; whether the certificate itself is valid (chain to the study CA, revocation,
//! expiry, role) is the verifier's `ServerMaterial::verify_client` and `still_valid`.

use std::path::Path;

use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, UnparsedPublicKey,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::AuthError;

/// A private key that signs requests, with the certificate it belongs to.
pub struct Signer {
    key: EcdsaKeyPair,
    certificate: Vec<u8>,
    rng: SystemRandom,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(..)")
    }
}

impl Signer {
    /// Loads `cert` (PEM, the first certificate is the signer's) and `key` (PEM PKCS#8,
    /// refused when readable by others).
    pub fn load(cert: &Path, key: &Path) -> Result<Signer, AuthError> {
        let cert_pem = std::fs::read(cert).map_err(|e| AuthError::io(cert, e))?;
        let certificate = CertificateDer::pem_slice_iter(&cert_pem)
            .next()
            .ok_or_else(|| AuthError::Invalid(format!("{} holds no certificate", cert.display())))?
            .map_err(|e| AuthError::Invalid(format!("{}: {e}", cert.display())))?
            .to_vec();
        let key_pem = crate::files::read_private_key_pem(key)?;
        let der = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| AuthError::Invalid(format!("{}: {e}", key.display())))?;
        let PrivateKeyDer::Pkcs8(pkcs8) = der else {
            return Err(AuthError::Invalid(format!(
                "{} is not a PKCS#8 key (as `cxrfed certs issue` writes)",
                key.display()
            )));
        };
        let rng = SystemRandom::new();
        let pair = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_ASN1_SIGNING,
            pkcs8.secret_pkcs8_der(),
            &rng,
        )
        .map_err(|e| {
            AuthError::Invalid(format!("{} is not an ECDSA P-256 key: {e}", key.display()))
        })?;
        Signer::check_pair(&pair, &certificate, key)?;
        Ok(Signer {
            key: pair,
            certificate,
            rng,
        })
    }

    fn check_pair(pair: &EcdsaKeyPair, certificate: &[u8], key: &Path) -> Result<(), AuthError> {
        use ring::signature::KeyPair;
        let (_, parsed) = x509_parser::parse_x509_certificate(certificate)
            .map_err(|e| AuthError::Invalid(format!("certificate: {e}")))?;
        if parsed.public_key().subject_public_key.data.as_ref() != pair.public_key().as_ref() {
            return Err(AuthError::Invalid(format!(
                "{} is not the key of the certificate",
                key.display()
            )));
        }
        Ok(())
    }

    /// The signer's certificate (DER).
    pub fn certificate(&self) -> &[u8] {
        &self.certificate
    }

    /// Signs `payload`.
    pub fn sign(&self, payload: &[u8]) -> Result<Vec<u8>, AuthError> {
        self.key
            .sign(&self.rng, payload)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| AuthError::Invalid("signing failed".into()))
    }
}

/// Checks that `signature` over `payload` was made with the key of `certificate` (DER).
pub fn verify(certificate: &[u8], payload: &[u8], signature: &[u8]) -> Result<(), AuthError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate)
        .map_err(|e| AuthError::Invalid(format!("the signer's certificate is unreadable: {e}")))?;
    UnparsedPublicKey::new(
        &ECDSA_P256_SHA256_ASN1,
        parsed.public_key().subject_public_key.data.as_ref(),
    )
    .verify(payload, signature)
    .map_err(|_| {
        AuthError::Invalid("the signature does not match the request and certificate".into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Role;
    use crate::pki::{self, IssueRequest};

    #[test]
    fn signatures_verify_only_for_the_signed_bytes_and_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        pki::init_ca(&dir.path().join("ca"), "s", 30).expect("ca");
        let ca = pki::StudyCa::open(&dir.path().join("ca")).expect("open");
        for name in ["rita", "mallory"] {
            ca.issue(
                &IssueRequest::new(Role::Researcher, name, None, 30),
                &dir.path().join(name),
            )
            .expect("issue");
        }
        let load = |name: &str| {
            Signer::load(
                &dir.path().join(name).join(pki::CERT),
                &dir.path().join(name).join(pki::KEY),
            )
            .expect("signer")
        };
        let (rita, mallory) = (load("rita"), load("mallory"));
        let signature = rita.sign(b"count, epsilon 1").expect("sign");
        verify(rita.certificate(), b"count, epsilon 1", &signature).expect("valid");
        assert!(verify(rita.certificate(), b"count, epsilon 9", &signature).is_err());
        assert!(verify(mallory.certificate(), b"count, epsilon 1", &signature).is_err());
        let forged = mallory.sign(b"count, epsilon 1").expect("sign");
        assert!(verify(rita.certificate(), b"count, epsilon 1", &forged).is_err());
    }
}
