//! The study CA: create it, issue role certificates, revoke them (a CRL signed by the CA), and
//! inspect certificates. ECDSA P-256 throughout.
//!
//! A CA directory holds `ca.pem` (the study CA certificate, shared with every party),
//! `ca.key` (its private key, 0600, never leaves the study office), `crl.pem` (the signed
//! revocation list servers load and reload) and `ca.json` (study name, CRL number, the
//! revoked certificates). An issued directory holds `cert.pem`, `key.pem` (0600), a copy of
//! `ca.pem` and `profile.toml`, which client commands accept as `--profile`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Duration, Utc};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use serde::{Deserialize, Serialize};
use x509_parser::prelude::*;

use crate::identity::{Identity, Role, fingerprint, identity_uri, validate_label};
use crate::{AuthError, files};

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
pub const CA_CRL: &str = "crl.pem";
pub const CA_STATE: &str = "ca.json";
pub const CERT: &str = "cert.pem";
pub const KEY: &str = "key.pem";
pub const PROFILE: &str = "profile.toml";

/// `ca.json`: what the CA remembers between commands.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaState {
    pub study: String,
    pub created_at: DateTime<Utc>,
    /// Incremented with every CRL the CA signs.
    pub crl_number: u64,
    pub revoked: Vec<RevokedEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedEntry {
    /// Serial number, lowercase hex.
    pub serial: String,
    /// The identity URI, when the certificate file was given.
    pub identity: Option<String>,
    pub fingerprint: Option<String>,
    pub revoked_at: DateTime<Utc>,
}

/// What `certs init` and `certs issue` wrote.
#[derive(Debug, Clone)]
pub struct Written {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub fingerprint: String,
    pub not_after: DateTime<Utc>,
}

/// Creates a study CA in `out` (which must not hold one already).
pub fn init_ca(out: &Path, study: &str, days: u32) -> Result<Written, AuthError> {
    validate_label("study", study)?;
    if days == 0 {
        return Err(AuthError::Invalid("--days must be at least 1".into()));
    }
    if out.join(CA_KEY).exists() || out.join(CA_CERT).exists() {
        return Err(AuthError::Invalid(format!(
            "{} already holds a CA; refusing to overwrite it",
            out.display()
        )));
    }
    files::create_private_dir(out)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(rcgen_error)?;
    let now = Utc::now();
    let not_after = now + Duration::days(i64::from(days));
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("cxrfed study CA {study}"));
    params
        .distinguished_name
        .push(DnType::OrganizationName, format!("cxrfed study {study}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = to_offset(now - Duration::minutes(5));
    params.not_after = to_offset(not_after);
    params.serial_number = Some(random_serial()?);
    let cert = params.self_signed(&key).map_err(rcgen_error)?;

    let state = CaState {
        study: study.to_string(),
        created_at: now,
        crl_number: 0,
        revoked: Vec::new(),
    };
    files::write_private(&out.join(CA_KEY), key.serialize_pem().as_bytes())?;
    files::write_public(&out.join(CA_CERT), cert.pem().as_bytes())?;
    let ca = StudyCa::open(out)?;
    ca.write_crl(state)?;
    Ok(Written {
        cert: out.join(CA_CERT),
        key: out.join(CA_KEY),
        fingerprint: fingerprint(cert.der()),
        not_after,
    })
}

/// A certificate to issue.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    pub role: Role,
    pub name: String,
    pub site: Option<String>,
    /// DNS names and IP addresses for server roles (node, coordinator); `localhost` and
    /// `127.0.0.1` are always included for them.
    pub hosts: Vec<String>,
    pub not_before: DateTime<Utc>,
    pub not_after: DateTime<Utc>,
    /// Replace an existing certificate and key in the output directory (rotation).
    pub force: bool,
}

impl IssueRequest {
    pub fn new(role: Role, name: &str, site: Option<&str>, days: u32) -> IssueRequest {
        let now = Utc::now();
        IssueRequest {
            role,
            name: name.to_string(),
            site: site.map(str::to_string),
            hosts: Vec::new(),
            not_before: now - Duration::minutes(5),
            not_after: now + Duration::days(i64::from(days)),
            force: false,
        }
    }
}

/// An opened study CA (certificate and signing key).
#[derive(Debug)]
pub struct StudyCa {
    dir: PathBuf,
    cert_pem: String,
    key: KeyPair,
    pub study: String,
}

impl StudyCa {
    pub fn open(dir: &Path) -> Result<StudyCa, AuthError> {
        let cert_pem = files::read_to_string(&dir.join(CA_CERT))?;
        let key_pem = files::read_private_key_pem(&dir.join(CA_KEY))?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| AuthError::Invalid(format!("{}: {e}", dir.join(CA_KEY).display())))?;
        let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
            .map_err(|e| AuthError::Invalid(format!("{}: {e}", dir.join(CA_CERT).display())))?;
        let ca = pem
            .parse_x509()
            .map_err(|e| AuthError::Invalid(format!("{}: {e}", dir.join(CA_CERT).display())))?;
        let study = ca
            .subject()
            .iter_organization()
            .next()
            .and_then(|o| o.as_str().ok())
            .and_then(|o| o.strip_prefix("cxrfed study "))
            .map(str::to_string)
            .ok_or_else(|| {
                AuthError::Invalid(format!(
                    "{} is not a cxrfed study CA (made by `cxrfed certs init`)",
                    dir.join(CA_CERT).display()
                ))
            })?;
        Ok(StudyCa {
            dir: dir.to_path_buf(),
            cert_pem,
            key,
            study,
        })
    }

    fn issuer(&self) -> Result<Issuer<'static, &KeyPair>, AuthError> {
        Issuer::from_ca_cert_pem(&self.cert_pem, &self.key).map_err(rcgen_error)
    }

    pub fn state(&self) -> Result<CaState, AuthError> {
        let path = self.dir.join(CA_STATE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| AuthError::Invalid(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(CaState {
                study: self.study.clone(),
                created_at: Utc::now(),
                crl_number: 0,
                revoked: Vec::new(),
            }),
            Err(e) => Err(AuthError::io(&path, e)),
        }
    }

    /// Issues a certificate and key into `out`, with a copy of the CA certificate and a client
    /// profile next to them.
    pub fn issue(&self, request: &IssueRequest, out: &Path) -> Result<Written, AuthError> {
        validate_label("name", &request.name)?;
        if let Some(site) = &request.site {
            validate_label("site", site)?;
        }
        if request.role.needs_site() && request.site.is_none() {
            return Err(AuthError::Invalid(format!(
                "a {} certificate needs --site",
                request.role
            )));
        }
        if request.not_after <= request.not_before {
            return Err(AuthError::Invalid(
                "the certificate would expire before it becomes valid".into(),
            ));
        }
        if !request.force && (out.join(KEY).exists() || out.join(CERT).exists()) {
            return Err(AuthError::Invalid(format!(
                "{} already holds a certificate; pass --force to replace it (rotation)",
                out.display()
            )));
        }
        files::create_private_dir(out)?;
        let uri = identity_uri(
            &self.study,
            request.role,
            request.site.as_deref(),
            &request.name,
        );
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, request.name.as_str());
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, request.role.as_str());
        params.distinguished_name.push(
            DnType::OrganizationName,
            format!("cxrfed study {}", self.study),
        );
        params.subject_alt_names.push(SanType::URI(
            uri.as_str()
                .try_into()
                .map_err(|e| AuthError::Invalid(format!("identity URI {uri}: {e}")))?,
        ));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if request.role.is_server() {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
            let mut hosts = vec!["localhost".to_string(), "127.0.0.1".to_string()];
            for host in &request.hosts {
                if !hosts.contains(host) {
                    hosts.push(host.clone());
                }
            }
            for host in hosts {
                params.subject_alt_names.push(host_san(&host)?);
            }
        } else if !request.hosts.is_empty() {
            return Err(AuthError::Invalid(format!(
                "--host applies to node and coordinator certificates, not {}",
                request.role
            )));
        }
        params.use_authority_key_identifier_extension = true;
        params.not_before = to_offset(request.not_before);
        params.not_after = to_offset(request.not_after);
        params.serial_number = Some(random_serial()?);
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(rcgen_error)?;
        let cert = params
            .signed_by(&key, &self.issuer()?)
            .map_err(rcgen_error)?;

        // Key first: a watcher that sees the new certificate with the old key refuses the pair
        // and keeps serving the old one until both are in place.
        files::write_private(&out.join(KEY), key.serialize_pem().as_bytes())?;
        files::write_public(&out.join(CERT), cert.pem().as_bytes())?;
        files::write_public(&out.join(CA_CERT), self.cert_pem.as_bytes())?;
        let profile = format!(
            "# cxrfed client profile for {uri}\n\
             # Use with `--profile {}` or CXRFED_PROFILE. Paths are relative to this file.\n\
             ca = \"{CA_CERT}\"\ncert = \"{CERT}\"\nkey = \"{KEY}\"\n",
            out.join(PROFILE).display()
        );
        files::write_public(&out.join(PROFILE), profile.as_bytes())?;
        Ok(Written {
            cert: out.join(CERT),
            key: out.join(KEY),
            fingerprint: fingerprint(cert.der()),
            not_after: request.not_after,
        })
    }

    /// Revokes a certificate issued by this CA and re-signs `crl.pem`. Running servers pick the
    /// new list up on their next reload. Revoking twice is a no-op.
    pub fn revoke_file(&self, cert_file: &Path) -> Result<RevokedEntry, AuthError> {
        let pem = files::read_to_string(cert_file)?;
        let der = first_pem_der(&pem, cert_file)?;
        let (_, cert) = X509Certificate::from_der(&der)
            .map_err(|e| AuthError::Invalid(format!("{}: {e}", cert_file.display())))?;
        let (_, ca_der) = x509_parser::pem::parse_x509_pem(self.cert_pem.as_bytes())
            .map_err(|e| AuthError::Invalid(format!("CA certificate: {e}")))?;
        let ca = ca_der
            .parse_x509()
            .map_err(|e| AuthError::Invalid(format!("CA certificate: {e}")))?;
        cert.verify_signature(Some(ca.public_key())).map_err(|_| {
            AuthError::Invalid(format!(
                "{} was not issued by the study CA of {}",
                cert_file.display(),
                self.study
            ))
        })?;
        let identity = Identity::from_cert_der(&der).ok().map(|i| i.uri());
        self.revoke(RevokedEntry {
            serial: hex::encode(cert.raw_serial()),
            identity,
            fingerprint: Some(fingerprint(&der)),
            revoked_at: Utc::now(),
        })
    }

    /// Revokes by serial number (hex), for a certificate whose file is lost.
    pub fn revoke_serial(&self, serial_hex: &str) -> Result<RevokedEntry, AuthError> {
        let serial = serial_hex
            .trim()
            .trim_start_matches("0x")
            .to_ascii_lowercase();
        if serial.is_empty() || hex::decode(&serial).is_err() {
            return Err(AuthError::Invalid(format!(
                "serial {serial_hex:?} is not hexadecimal"
            )));
        }
        self.revoke(RevokedEntry {
            serial,
            identity: None,
            fingerprint: None,
            revoked_at: Utc::now(),
        })
    }

    fn revoke(&self, entry: RevokedEntry) -> Result<RevokedEntry, AuthError> {
        let mut state = self.state()?;
        if let Some(existing) = state.revoked.iter().find(|r| r.serial == entry.serial) {
            return Ok(existing.clone());
        }
        state.revoked.push(entry.clone());
        self.write_crl(state)?;
        Ok(entry)
    }

    /// Signs a fresh CRL from `state` and writes it and `ca.json` (each atomically).
    fn write_crl(&self, mut state: CaState) -> Result<(), AuthError> {
        state.crl_number += 1;
        let now = Utc::now();
        let revoked_certs = state
            .revoked
            .iter()
            .map(|r| {
                Ok(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(
                        &hex::decode(&r.serial)
                            .map_err(|e| AuthError::Invalid(format!("serial {}: {e}", r.serial)))?,
                    ),
                    revocation_time: to_offset(r.revoked_at),
                    reason_code: Some(RevocationReason::Unspecified),
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, AuthError>>()?;
        let crl = CertificateRevocationListParams {
            this_update: to_offset(now - Duration::minutes(5)),
            next_update: to_offset(now + Duration::days(365)),
            crl_number: SerialNumber::from(state.crl_number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&self.issuer()?)
        .map_err(rcgen_error)?;
        let pem = crl.pem().map_err(rcgen_error)?;
        files::write_public(
            &self.dir.join(CA_STATE),
            &serde_json::to_vec_pretty(&state).map_err(|e| AuthError::Invalid(e.to_string()))?,
        )?;
        files::write_public(&self.dir.join(CA_CRL), pem.as_bytes())
    }
}

/// What `certs inspect` prints.
#[derive(Debug, Clone, Serialize)]
pub struct CertInfo {
    pub subject: String,
    pub issuer: String,
    pub is_ca: bool,
    pub identity: Option<String>,
    pub study: Option<String>,
    pub role: Option<Role>,
    pub name: Option<String>,
    pub site: Option<String>,
    pub hosts: Vec<String>,
    pub serial: String,
    pub not_before: DateTime<Utc>,
    pub not_after: DateTime<Utc>,
    pub expired: bool,
    pub fingerprint_sha256: String,
}

pub fn inspect(path: &Path) -> Result<CertInfo, AuthError> {
    let pem = files::read_to_string(path)?;
    let der = first_pem_der(&pem, path)?;
    let (_, cert) = X509Certificate::from_der(&der)
        .map_err(|e| AuthError::Invalid(format!("{}: {e}", path.display())))?;
    let identity = Identity::from_cert_der(&der).ok();
    let hosts = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some((*d).to_string()),
                    GeneralName::IPAddress(ip) => ip_from_bytes(ip).map(|ip| ip.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let not_before = DateTime::from_timestamp(cert.validity().not_before.timestamp(), 0)
        .unwrap_or(DateTime::<Utc>::MIN_UTC);
    let not_after = DateTime::from_timestamp(cert.validity().not_after.timestamp(), 0)
        .unwrap_or(DateTime::<Utc>::MIN_UTC);
    Ok(CertInfo {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        is_ca: cert.is_ca(),
        identity: identity.as_ref().map(Identity::uri),
        study: identity.as_ref().map(|i| i.study.clone()),
        role: identity.as_ref().map(|i| i.role),
        name: identity.as_ref().map(|i| i.name.clone()),
        site: identity.as_ref().and_then(|i| i.site.clone()),
        hosts,
        serial: hex::encode(cert.raw_serial()),
        not_before,
        not_after,
        expired: Utc::now() > not_after,
        fingerprint_sha256: fingerprint(&der),
    })
}

fn first_pem_der(pem: &str, path: &Path) -> Result<Vec<u8>, AuthError> {
    let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|_| AuthError::Invalid(format!("{} is not a PEM certificate", path.display())))?;
    if parsed.label != "CERTIFICATE" {
        return Err(AuthError::Invalid(format!(
            "{} holds a {}, not a CERTIFICATE",
            path.display(),
            parsed.label
        )));
    }
    Ok(parsed.contents)
}

fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

fn host_san(host: &str) -> Result<SanType, AuthError> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let valid = !host.is_empty()
        && host.len() <= 253
        && host
            .split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    if !valid {
        return Err(AuthError::Invalid(format!(
            "--host {host:?} is neither an IP address nor a DNS name"
        )));
    }
    Ok(SanType::DnsName(host.try_into().map_err(|e| {
        AuthError::Invalid(format!("--host {host:?}: {e}"))
    })?))
}

/// A positive 128-bit random serial.
fn random_serial() -> Result<SerialNumber, AuthError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| AuthError::Invalid(format!("no randomness: {e}")))?;
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

fn to_offset(t: DateTime<Utc>) -> ::time::OffsetDateTime {
    ::time::OffsetDateTime::from_unix_timestamp(t.timestamp())
        .unwrap_or(::time::OffsetDateTime::UNIX_EPOCH)
}

fn rcgen_error(e: rcgen::Error) -> AuthError {
    AuthError::Invalid(format!("certificate: {e}"))
}
