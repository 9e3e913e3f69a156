//! A C-STORE SCU: DICOM files sent to a PACS over one association (dicom-ul, blocking; run it
//! on a blocking thread). Each file is proposed in its own transfer syntax; its data set is
//! sent as stored (no re-encoding), fragmented to the PACS's maximum PDU length.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dicom_ul::ClientAssociationOptions;
use dicom_ul::pdu::{PDataValue, PDataValueType, Pdu, PresentationContextResultReason};

use crate::dimse;

/// A PACS to send to: `AE@HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub ae_title: String,
    pub address: String,
}

impl std::str::FromStr for Peer {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ae, address) = s
            .split_once('@')
            .ok_or_else(|| format!("{s:?}: expected AE@HOST:PORT"))?;
        let ae = ae.trim();
        if ae.is_empty() || ae.len() > 16 || ae.contains('\\') {
            return Err(format!("{s:?}: the AE title must have 1 to 16 characters"));
        }
        let (host, port) = address
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?}: expected AE@HOST:PORT"))?;
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(format!("{s:?}: expected AE@HOST:PORT"));
        }
        Ok(Peer {
            ae_title: ae.to_string(),
            address: address.to_string(),
        })
    }
}

/// What the PACS answered for one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub file: PathBuf,
    /// The C-STORE response status, or `None` when the file was not sent (no accepted
    /// presentation context).
    pub status: Option<u16>,
    pub comment: String,
}

/// A Part 10 file split into its meta information and its data set bytes.
#[derive(Debug)]
pub struct Part10 {
    pub sop_class: String,
    pub sop_instance: String,
    pub transfer_syntax: String,
    pub data_set: Vec<u8>,
}

/// Reads a Part 10 file's meta group and keeps the data set bytes that follow it.
pub fn read_part10(path: &Path) -> Result<Part10, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if bytes.len() < 132 || &bytes[128..132] != b"DICM" {
        return Err(format!("{}: not a DICOM Part 10 file", path.display()));
    }
    let mut cursor = std::io::Cursor::new(&bytes[128..]);
    let meta = dicom_object::FileMetaTable::from_reader(&mut cursor)
        .map_err(|e| format!("{}: file meta information: {e}", path.display()))?;
    let start = 128 + cursor.position() as usize;
    let trim = |s: &str| s.trim_end_matches(['\0', ' ']).to_string();
    Ok(Part10 {
        sop_class: trim(&meta.media_storage_sop_class_uid),
        sop_instance: trim(&meta.media_storage_sop_instance_uid),
        transfer_syntax: trim(&meta.transfer_syntax),
        data_set: bytes[start..].to_vec(),
    })
}

/// Sends `files` to `peer` as `calling_ae` on one association; returns each file's outcome.
/// An association that cannot be established is an error; a refused file is an outcome.
pub fn store(peer: &Peer, calling_ae: &str, files: &[PathBuf]) -> Result<Vec<Sent>, String> {
    let parts: Vec<Part10> = files
        .iter()
        .map(|f| read_part10(f))
        .collect::<Result<_, _>>()?;
    let mut contexts: BTreeMap<(String, String), ()> = BTreeMap::new();
    for part in &parts {
        contexts.insert((part.sop_class.clone(), part.transfer_syntax.clone()), ());
    }
    if contexts.len() > 128 {
        return Err("more than 128 presentation contexts in one association".into());
    }
    let mut options = ClientAssociationOptions::new()
        .calling_ae_title(calling_ae)
        .called_ae_title(peer.ae_title.as_str())
        .read_timeout(Duration::from_secs(60))
        .write_timeout(Duration::from_secs(60))
        .connection_timeout(Duration::from_secs(15));
    for (sop_class, ts) in contexts.keys() {
        options = options.with_presentation_context(sop_class.as_str(), vec![ts.as_str()]);
    }
    let mut association = options
        .establish(peer.address.as_str())
        .map_err(|e| format!("association with {}@{}: {e}", peer.ae_title, peer.address))?;
    let mut outcomes = Vec::with_capacity(files.len());
    let result = (|| {
        for (i, (file, part)) in files.iter().zip(&parts).enumerate() {
            let context = association
                .presentation_contexts()
                .iter()
                .find(|pc| {
                    pc.reason == PresentationContextResultReason::Acceptance
                        && pc.abstract_syntax.trim_end_matches('\0') == part.sop_class
                        && pc.transfer_syntax.trim_end_matches('\0') == part.transfer_syntax
                })
                .map(|pc| pc.id);
            let Some(context) = context else {
                outcomes.push(Sent {
                    file: file.clone(),
                    status: None,
                    comment: "no accepted presentation context".into(),
                });
                continue;
            };
            let message_id = (i % 0xFFFF) as u16 + 1;
            let command = dimse::store_request(message_id, &part.sop_class, &part.sop_instance);
            association
                .send(&Pdu::PData {
                    data: vec![PDataValue {
                        presentation_context_id: context,
                        value_type: PDataValueType::Command,
                        is_last: true,
                        data: command,
                    }],
                })
                .map_err(|e| format!("sending a C-STORE request: {e}"))?;
            {
                let mut writer = association.send_pdata(context);
                writer
                    .write_all(&part.data_set)
                    .map_err(|e| format!("sending a data set: {e}"))?;
                writer
                    .finish()
                    .map_err(|e| format!("sending a data set: {e}"))?;
            }
            let response = receive_command(&mut association)?;
            outcomes.push(Sent {
                file: file.clone(),
                status: response.status,
                comment: response.error_comment,
            });
        }
        Ok::<(), String>(())
    })();
    match result {
        Ok(()) => {
            let _ = association.release();
            Ok(outcomes)
        }
        Err(e) => {
            let _ = association.abort();
            Err(e)
        }
    }
}

fn receive_command(
    association: &mut dicom_ul::association::ClientAssociation<std::net::TcpStream>,
) -> Result<dimse::Command, String> {
    let mut bytes = Vec::new();
    loop {
        match association
            .receive()
            .map_err(|e| format!("waiting for the C-STORE response: {e}"))?
        {
            Pdu::PData { data } => {
                for value in data {
                    if value.value_type != PDataValueType::Command {
                        return Err("the peer sent a data set instead of a response".into());
                    }
                    bytes.extend_from_slice(&value.data);
                    if bytes.len() > 64 * 1024 {
                        return Err("the peer's response is larger than 64 KiB".into());
                    }
                    if value.is_last {
                        return dimse::parse(&bytes);
                    }
                }
            }
            Pdu::AbortRQ { .. } => return Err("the peer aborted the association".into()),
            other => {
                return Err(format!(
                    "unexpected {} while waiting for the C-STORE response",
                    other.short_description()
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse() {
        let peer: Peer = "RESEARCH@pacs.example:11112".parse().expect("peer");
        assert_eq!(peer.ae_title, "RESEARCH");
        assert_eq!(peer.address, "pacs.example:11112");
        assert!("pacs.example:11112".parse::<Peer>().is_err());
        assert!("A@host".parse::<Peer>().is_err());
        assert!("WAY-TOO-LONG-AE-TITLE@h:1".parse::<Peer>().is_err());
    }

    #[test]
    fn a_framed_data_set_reads_back_as_sent() {
        let dir = std::env::temp_dir().join(format!("cxrfed-scu-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("x.dcm");
        let data = vec![0x08, 0x00, 0x60, 0x00, 0x02, 0x00, 0x00, 0x00, b'C', b'R'];
        let file = dimse::part10(
            "1.2.840.10008.5.1.4.1.1.1",
            "2.25.7",
            "1.2.840.10008.1.2",
            &data,
        )
        .expect("framed");
        std::fs::write(&path, file).expect("write");
        let part = read_part10(&path).expect("read");
        assert_eq!(part.sop_instance, "2.25.7");
        assert_eq!(part.transfer_syntax, "1.2.840.10008.1.2");
        assert_eq!(part.data_set, data);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
