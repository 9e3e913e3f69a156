//! `cxrfed export --format dicom-sr --out DIR [--send AE@HOST:PORT]`: the node streams whole
//! records (Export format "records", the site admin's exact data), and each becomes one
//! DICOM SR file in DIR (cxrfed-dicom's TID 1500 writer), named by its SOP Instance UID.
//! With --send, the files are then stored to a research PACS on one association.
//! `--format fhir` writes the same records as one FHIR R4 Bundle instead.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use cxrfed_proto::v1 as pb;
use cxrfed_proto::v1::node_service_client::NodeServiceClient;
use tonic::transport::Channel;

use crate::client::status_error;

/// Streams the records the filter selects (Export format "records") to `each`.
async fn for_each_record(
    client: &mut NodeServiceClient<Channel>,
    filter: String,
    mut each: impl FnMut(cxrfed_schema::Record) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut stream = client
        .export(pb::ExportRequest {
            format: "records".into(),
            r#where: filter,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut pending: Vec<u8> = Vec::new();
    let mut line = |line: &[u8]| -> anyhow::Result<()> {
        if line.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        let record =
            serde_json::from_slice(line).context("the node sent a record this CLI cannot read")?;
        each(record)
    };
    while let Some(chunk) = stream.message().await.map_err(status_error)? {
        pending.extend_from_slice(&chunk.data);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let complete: Vec<u8> = pending.drain(..=end).collect();
            line(&complete)?;
        }
    }
    line(&pending)
}

/// `--format fhir`: one FHIR R4 Bundle of the selected records, to `out` or stdout.
pub async fn export_fhir(
    mut client: NodeServiceClient<Channel>,
    filter: String,
    out: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let now = chrono::Utc::now();
    let id = cxrfed_dicom::fhir::derived_uuid(&["bundle", &filter, &now.to_rfc3339()]);
    let timestamp = now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let sink: Box<dyn std::io::Write> = match &out {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let mut bundle = cxrfed_dicom::fhir::BundleWriter::new(sink, &id, &timestamp)?;
    let (mut reports, mut without_findings) = (0usize, 0usize);
    for_each_record(&mut client, filter, |record| {
        if bundle.add(&record)? {
            reports += 1;
        } else {
            without_findings += 1;
        }
        Ok(())
    })
    .await?;
    bundle.finish()?;
    eprintln!(
        "exported {reports} records as a FHIR R4 Bundle{}",
        if without_findings > 0 {
            format!(" ({without_findings} records without findings skipped)")
        } else {
            String::new()
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// `--format dicom-sr`: one SR file per record in `out`, then optionally stored to `send`.
pub async fn export(
    mut client: NodeServiceClient<Channel>,
    filter: String,
    out: PathBuf,
    send: Option<cxrfed_dicom::scu::Peer>,
    calling_ae: String,
) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut written: Vec<PathBuf> = Vec::new();
    let mut without_findings = 0usize;
    for_each_record(&mut client, filter, |record| {
        match cxrfed_dicom::dicom_sr(&record) {
            Ok(bytes) => {
                let uids = cxrfed_dicom::Uids::of(&record);
                let path = out.join(format!("{}.dcm", uids.sr_instance));
                // Written next to its final name, then renamed: a reader never sees half a file.
                let partial = out.join(format!(".{}.partial", uids.sr_instance));
                std::fs::write(&partial, bytes)
                    .with_context(|| format!("cannot write {}", partial.display()))?;
                std::fs::rename(&partial, &path)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                written.push(path);
            }
            Err(cxrfed_dicom::ReportError::NoFindings(_)) => without_findings += 1,
            Err(e) => return Err(e.into()),
        }
        Ok(())
    })
    .await?;
    eprintln!(
        "wrote {} DICOM SR files to {}{}",
        written.len(),
        out.display(),
        if without_findings > 0 {
            format!(" ({without_findings} records without findings skipped)")
        } else {
            String::new()
        }
    );
    let Some(peer) = send else {
        return Ok(ExitCode::SUCCESS);
    };
    if written.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    let target = format!("{}@{}", peer.ae_title, peer.address);
    let outcomes =
        tokio::task::spawn_blocking(move || cxrfed_dicom::scu::store(&peer, &calling_ae, &written))
            .await
            .context("the C-STORE sender stopped")?
            .map_err(anyhow::Error::msg)?;
    let stored = outcomes
        .iter()
        .filter(|o| o.status.is_some_and(cxrfed_dicom::dimse::status::is_stored))
        .count();
    for o in outcomes
        .iter()
        .filter(|o| !o.status.is_some_and(cxrfed_dicom::dimse::status::is_stored))
    {
        eprintln!(
            "{}: not stored by {target}: {}{}",
            o.file.display(),
            o.status
                .map_or("not sent".to_string(), |s| format!("status {s:04X}")),
            if o.comment.is_empty() {
                String::new()
            } else {
                format!(" ({})", o.comment)
            }
        );
    }
    eprintln!("sent {stored} of {} to {target}", outcomes.len());
    Ok(if stored == outcomes.len() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
