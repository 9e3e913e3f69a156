//! Who a certificate says its holder is: study, role, site and name, carried in one SAN URI
//! `cxrfed://STUDY/ROLE/SITE/NAME` (`-` for "no site").

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use x509_parser::prelude::*;

use crate::AuthError;

/// URI scheme of the identity SAN.
pub const URI_SCHEME: &str = "cxrfed://";

/// The part a certificate holder plays in a study.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A hospital's node: serves its own site, dials out to the coordinator.
    Node,
    /// The study coordinator: federates queries and training rounds.
    Coordinator,
    /// A study researcher: differentially private statistics only.
    Researcher,
    /// A site administrator: everything on the node of their own site.
    Admin,
    /// The study's administrator: signs training jobs and promotions (orders every site
    /// verifies), imports models. Has no site and no power over any node's own data.
    #[serde(rename = "study-admin")]
    StudyAdmin,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Node,
        Role::Coordinator,
        Role::Researcher,
        Role::Admin,
        Role::StudyAdmin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Node => "node",
            Role::Coordinator => "coordinator",
            Role::Researcher => "researcher",
            Role::Admin => "admin",
            Role::StudyAdmin => "study-admin",
        }
    }

    /// Roles that run servers and therefore need a `serverAuth` certificate with host names.
    pub fn is_server(self) -> bool {
        matches!(self, Role::Node | Role::Coordinator)
    }

    /// Roles whose certificate must name a site.
    pub fn needs_site(self) -> bool {
        matches!(self, Role::Node | Role::Admin)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = AuthError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                AuthError::Invalid(format!(
                    "unknown role {s:?} (node, coordinator, researcher, admin or study-admin)"
                ))
            })
    }
}

/// A verified certificate holder. Built only from a certificate that chains to the study CA
/// (or, for `--insecure-dev`, synthesised by the server itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub study: String,
    pub role: Role,
    pub name: String,
    pub site: Option<String>,
    /// SHA-256 of the certificate's DER encoding, lowercase hex.
    pub fingerprint: String,
    /// Certificate serial number, lowercase hex.
    pub serial: String,
    pub not_before: DateTime<Utc>,
    pub not_after: DateTime<Utc>,
}

impl Identity {
    /// `cxrfed://STUDY/ROLE/SITE/NAME`.
    pub fn uri(&self) -> String {
        identity_uri(&self.study, self.role, self.site.as_deref(), &self.name)
    }

    /// Reads the identity SAN and the validity of a DER certificate. Does not verify the
    /// chain: callers do that first (see [`crate::tls`]).
    pub fn from_cert_der(der: &[u8]) -> Result<Identity, AuthError> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| AuthError::Invalid(format!("not an X.509 certificate: {e}")))?;
        let uri = identity_uri_of(&cert)?;
        let (study, role, site, name) = parse_uri(&uri)?;
        Ok(Identity {
            study,
            role,
            name,
            site,
            fingerprint: fingerprint(der),
            serial: hex::encode(cert.raw_serial()),
            not_before: asn1_time(cert.validity().not_before),
            not_after: asn1_time(cert.validity().not_after),
        })
    }

    /// The identity a server grants every caller under `--insecure-dev`: the admin of its
    /// own site. Never issued in a certificate.
    pub fn insecure_dev(site: &str) -> Identity {
        Identity {
            study: "insecure-dev".into(),
            role: Role::Admin,
            name: "insecure-dev".into(),
            site: Some(site.to_string()),
            fingerprint: String::new(),
            serial: String::new(),
            not_before: DateTime::<Utc>::MIN_UTC,
            not_after: DateTime::<Utc>::MAX_UTC,
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri())
    }
}

pub fn identity_uri(study: &str, role: Role, site: Option<&str>, name: &str) -> String {
    format!("{URI_SCHEME}{study}/{role}/{}/{name}", site.unwrap_or("-"))
}

/// Splits `cxrfed://STUDY/ROLE/SITE/NAME` into its parts, validating each.
pub fn parse_uri(uri: &str) -> Result<(String, Role, Option<String>, String), AuthError> {
    let rest = uri.strip_prefix(URI_SCHEME).ok_or_else(|| {
        AuthError::Invalid(format!(
            "identity URI {uri:?} does not start with {URI_SCHEME}"
        ))
    })?;
    let parts: Vec<&str> = rest.split('/').collect();
    let [study, role, site, name] = parts.as_slice() else {
        return Err(AuthError::Invalid(format!(
            "identity URI {uri:?} is not {URI_SCHEME}STUDY/ROLE/SITE/NAME"
        )));
    };
    validate_label("study", study)?;
    validate_label("name", name)?;
    let site = match *site {
        "-" => None,
        site => {
            validate_label("site", site)?;
            Some(site.to_string())
        }
    };
    Ok((study.to_string(), role.parse()?, site, name.to_string()))
}

/// Study, site and identity names: 1–64 characters of `A-Z a-z 0-9 . _ -`, not starting with
/// `-` or `.` (so that they stay safe in URIs, file names and log lines).
pub fn validate_label(kind: &str, value: &str) -> Result<(), AuthError> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && !value.starts_with(['-', '.'])
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(AuthError::Invalid(format!(
            "{kind} {value:?} must be 1-64 characters of A-Z a-z 0-9 . _ - (not starting with - or .)"
        )))
    }
}

/// SHA-256 of a DER certificate, lowercase hex.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

fn identity_uri_of(cert: &X509Certificate<'_>) -> Result<String, AuthError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| AuthError::Invalid(format!("unreadable subjectAltName: {e}")))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) if uri.starts_with(URI_SCHEME) => Some(*uri),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [uri] => Ok((*uri).to_string()),
        [] => Err(AuthError::Invalid(format!(
            "the certificate carries no {URI_SCHEME} identity (issue it with `cxrfed certs issue`)"
        ))),
        _ => Err(AuthError::Invalid(
            "the certificate carries more than one cxrfed identity".into(),
        )),
    }
}

fn asn1_time(t: ASN1Time) -> DateTime<Utc> {
    DateTime::from_timestamp(t.timestamp(), 0).unwrap_or(DateTime::<Utc>::MIN_UTC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_round_trips() {
        let uri = identity_uri("trial-7", Role::Admin, Some("site-a"), "alice");
        assert_eq!(uri, "cxrfed://trial-7/admin/site-a/alice");
        let (study, role, site, name) = parse_uri(&uri).expect("parse");
        assert_eq!(
            (study.as_str(), role, site.as_deref(), name.as_str()),
            ("trial-7", Role::Admin, Some("site-a"), "alice")
        );
        let (_, _, site, _) = parse_uri("cxrfed://trial-7/researcher/-/bob").expect("no site");
        assert_eq!(site, None);
    }

    #[test]
    fn bad_uris_and_labels_are_refused() {
        for bad in [
            "https://x/admin/a/b",
            "cxrfed://s/admin/a",
            "cxrfed://s/boss/a/b",
            "cxrfed://s/admin/a/b/c",
            "cxrfed://s/admin/../b",
            "cxrfed://s/admin/a/",
        ] {
            assert!(parse_uri(bad).is_err(), "{bad}");
        }
        assert!(validate_label("name", "alice smith").is_err());
        assert!(validate_label("name", &"a".repeat(65)).is_err());
        assert!(validate_label("name", "a.b_c-9").is_ok());
    }
}
