//! `cxrfed export --format dicom-sr --out DIR [--send AE@HOST:PORT]`: the node streams whole
//! records (Export format "records", the site admin's exact data), and each becomes one
//! DICOM SR file in DIR (cxrfed-dicom's TID 1500 writer), named by its SOP Instance UID.
//! With --send, the files are then stored to a research PACS on one association.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use cxrfed_proto::v1 as pb;
use cxrfed_proto::v1::node_service_client::NodeServiceClient;
use tonic::transport::Channel;

use crate::client::status_error;

pub async fn export(
    mut client: NodeServiceClient<Channel>,
    filter: String,
    out: PathBuf,
    send: Option<cxrfed_dicom::scu::Peer>,
    calling_ae: String,
) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut stream = client
        .export(pb::ExportRequest {
            format: "records".into(),
            r#where: filter,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut pending: Vec<u8> = Vec::new();
    let mut written: Vec<PathBuf> = Vec::new();
    let mut without_findings = 0usize;
    let mut write_line = |line: &[u8]| -> anyhow::Result<()> {
        if line.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        let record: cxrfed_schema::Record =
            serde_json::from_slice(line).context("the node sent a record this CLI cannot read")?;
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
    };
    while let Some(chunk) = stream.message().await.map_err(status_error)? {
        pending.extend_from_slice(&chunk.data);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            write_line(&line)?;
        }
    }
    write_line(&pending)?;
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
