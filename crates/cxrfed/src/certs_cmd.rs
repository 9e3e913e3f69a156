//! `cxrfed certs init | issue | inspect | revoke`: the study CA and role certificates.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use cxrfed_auth::Role;
use cxrfed_auth::pki::{self, IssueRequest, StudyCa};

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create a study CA (ca.pem, ca.key 0600, crl.pem, ca.json) in a new directory.
    Init(InitArgs),
    /// Issue a certificate and key for one role, with identity and site embedded.
    Issue(IssueArgs),
    /// Print a certificate's subject, role, identity, site, validity and fingerprint.
    Inspect(InspectArgs),
    /// Revoke a certificate: add it to the CA's signed CRL, which running servers reload.
    Revoke(RevokeArgs),
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Directory for the CA (created; must not hold a CA already).
    #[arg(long)]
    out: PathBuf,
    /// Study name, e.g. pneumo-2027 (A-Z a-z 0-9 . _ -).
    #[arg(long)]
    study: String,
    /// Validity of the CA certificate in days.
    #[arg(long, default_value_t = 3650)]
    days: u32,
}

#[derive(Debug, Args)]
pub struct IssueArgs {
    /// The study CA directory (from `certs init`).
    #[arg(long)]
    ca: PathBuf,
    /// node, coordinator, researcher or admin.
    #[arg(long)]
    role: Role,
    /// Identity name (person or machine), e.g. alice or node-a.
    #[arg(long)]
    name: String,
    /// Site (hospital); required for node and admin certificates.
    #[arg(long)]
    site: Option<String>,
    /// Validity in days.
    #[arg(long, default_value_t = 397)]
    days: u32,
    /// Extra DNS name or IP address the server is reached by (node and coordinator; repeatable;
    /// localhost and 127.0.0.1 are always included).
    #[arg(long = "host")]
    hosts: Vec<String>,
    /// Start of validity (RFC 3339) instead of now.
    #[arg(long)]
    not_before: Option<DateTime<Utc>>,
    /// End of validity (RFC 3339) instead of now + --days.
    #[arg(long)]
    not_after: Option<DateTime<Utc>>,
    /// Replace the certificate and key already in --out (rotation; servers pick it up live).
    #[arg(long)]
    force: bool,
    /// Output directory: cert.pem, key.pem (0600), ca.pem, profile.toml.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A PEM certificate.
    file: PathBuf,
    /// Output format: text or json.
    #[arg(long, default_value = "text")]
    format: String,
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The study CA directory.
    #[arg(long)]
    ca: PathBuf,
    /// The certificate to revoke (PEM).
    #[arg(required_unless_present = "serial", conflicts_with = "serial")]
    file: Option<PathBuf>,
    /// Revoke by serial number (hex, as `certs inspect` prints it) when the file is lost.
    #[arg(long)]
    serial: Option<String>,
}

pub fn run(command: CertsCommand) -> anyhow::Result<ExitCode> {
    match command {
        CertsCommand::Init(args) => {
            let written = pki::init_ca(&args.out, &args.study, args.days)?;
            println!(
                "study CA for {} created in {}",
                args.study,
                args.out.display()
            );
            println!(
                "  certificate: {} (share with every party)",
                written.cert.display()
            );
            println!(
                "  private key: {} (0600; keep offline, it signs every identity)",
                written.key.display()
            );
            println!("  CRL:         {}", args.out.join(pki::CA_CRL).display());
            println!("  fingerprint: {}", written.fingerprint);
            println!("  valid until: {}", written.not_after.to_rfc3339());
        }
        CertsCommand::Issue(args) => {
            let ca = StudyCa::open(&args.ca)
                .with_context(|| format!("cannot open the study CA in {}", args.ca.display()))?;
            let mut request =
                IssueRequest::new(args.role, &args.name, args.site.as_deref(), args.days);
            request.hosts = args.hosts;
            request.force = args.force;
            if let Some(t) = args.not_before {
                request.not_before = t;
            }
            if let Some(t) = args.not_after {
                request.not_after = t;
            }
            if args.days == 0 && args.not_after.is_none() {
                bail!("--days must be at least 1");
            }
            let written = ca.issue(&request, &args.out)?;
            let info = pki::inspect(&written.cert)?;
            println!(
                "issued {} in {}",
                info.identity.as_deref().unwrap_or("?"),
                args.out.display()
            );
            println!("  certificate: {}", written.cert.display());
            println!("  private key: {} (0600)", written.key.display());
            println!("  profile:     {}", args.out.join(pki::PROFILE).display());
            println!("  serial:      {}", info.serial);
            println!("  fingerprint: {}", written.fingerprint);
            println!("  valid until: {}", written.not_after.to_rfc3339());
            if info.expired {
                eprintln!("warning: this certificate is already expired");
            }
        }
        CertsCommand::Inspect(args) => {
            let info = pki::inspect(&args.file)?;
            match args.format.as_str() {
                "json" => println!("{}", serde_json::to_string_pretty(&info)?),
                "text" => print_info(&info),
                other => bail!("unknown format {other:?} (text or json)"),
            }
        }
        CertsCommand::Revoke(args) => {
            let ca = StudyCa::open(&args.ca)
                .with_context(|| format!("cannot open the study CA in {}", args.ca.display()))?;
            let entry = match (&args.file, &args.serial) {
                (Some(file), _) => ca.revoke_file(file)?,
                (None, Some(serial)) => ca.revoke_serial(serial)?,
                (None, None) => bail!("give the certificate file or --serial"),
            };
            println!(
                "revoked serial {}{} at {}",
                entry.serial,
                entry
                    .identity
                    .as_deref()
                    .map(|i| format!(" ({i})"))
                    .unwrap_or_default(),
                entry.revoked_at.to_rfc3339()
            );
            println!(
                "  CRL re-signed: {} — servers configured with it reload it within their tls_reload_ms",
                args.ca.join(pki::CA_CRL).display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_info(info: &pki::CertInfo) {
    println!("subject:      {}", info.subject);
    println!("issuer:       {}", info.issuer);
    if info.is_ca {
        println!("kind:         certificate authority");
    }
    if let Some(identity) = &info.identity {
        println!("identity:     {identity}");
    }
    if let Some(study) = &info.study {
        println!("study:        {study}");
    }
    if let Some(role) = info.role {
        println!("role:         {role}");
    }
    if let Some(name) = &info.name {
        println!("name:         {name}");
    }
    println!("site:         {}", info.site.as_deref().unwrap_or("-"));
    if !info.hosts.is_empty() {
        println!("hosts:        {}", info.hosts.join(", "));
    }
    println!("serial:       {}", info.serial);
    println!("valid from:   {}", info.not_before.to_rfc3339());
    println!(
        "valid until:  {}{}",
        info.not_after.to_rfc3339(),
        if info.expired { " (EXPIRED)" } else { "" }
    );
    println!("fingerprint:  SHA256:{}", info.fingerprint_sha256);
}
