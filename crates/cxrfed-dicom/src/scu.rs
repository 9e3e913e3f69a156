//! DICOM service users (dicom-ul, blocking; run them on a blocking thread):
//!
//! * [`store`] — C-STORE of files to a PACS over one association. Each file is proposed in its
//!   own transfer syntax; its data set is sent as stored (no re-encoding), fragmented to the
//!   PACS's maximum PDU length.
//! * [`QueryRetrieve`] — study root C-FIND and C-MOVE (`cxrfed node pull`).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::net::TcpStream;

use dicom_core::{Tag, VR};
use dicom_ul::ClientAssociationOptions;
use dicom_ul::association::ClientAssociation;
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
    association: &mut ClientAssociation<TcpStream>,
) -> Result<dimse::Command, String> {
    receive_message(association).map(|(command, _)| command)
}

/// The largest identifier accepted in a C-FIND response.
const MAX_IDENTIFIER_BYTES: usize = 1 << 20;

/// One DIMSE message from the peer: its command set and, when one follows, its data set.
fn receive_message(
    association: &mut ClientAssociation<TcpStream>,
) -> Result<(dimse::Command, Option<Vec<u8>>), String> {
    let mut command_bytes = Vec::new();
    let mut command: Option<dimse::Command> = None;
    let mut data = Vec::new();
    loop {
        match association
            .receive()
            .map_err(|e| format!("waiting for a response: {e}"))?
        {
            Pdu::PData { data: values } => {
                for value in values {
                    match (value.value_type, &command) {
                        (PDataValueType::Command, None) => {
                            command_bytes.extend_from_slice(&value.data);
                            if command_bytes.len() > 64 * 1024 {
                                return Err("a response command set larger than 64 KiB".into());
                            }
                            if value.is_last {
                                let parsed = dimse::parse(&command_bytes)?;
                                if !parsed.data_set_follows {
                                    return Ok((parsed, None));
                                }
                                command = Some(parsed);
                            }
                        }
                        (PDataValueType::Data, Some(_)) => {
                            data.extend_from_slice(&value.data);
                            if data.len() > MAX_IDENTIFIER_BYTES {
                                return Err("a response data set larger than 1 MiB".into());
                            }
                            if value.is_last {
                                let parsed = command.take().expect("matched Some");
                                return Ok((parsed, Some(data)));
                            }
                        }
                        _ => return Err("the peer's response fragments are out of order".into()),
                    }
                }
            }
            Pdu::AbortRQ { .. } => return Err("the peer aborted the association".into()),
            other => {
                return Err(format!(
                    "unexpected {} while waiting for a response",
                    other.short_description()
                ));
            }
        }
    }
}

/// Pending statuses of C-FIND and C-MOVE (FF00, FF01).
fn is_pending(status: Option<u16>) -> bool {
    matches!(status, Some(0xFF00) | Some(0xFF01))
}

/// Study Root Query/Retrieve Information Model – FIND and – MOVE.
pub const STUDY_ROOT_FIND: &str = "1.2.840.10008.5.1.4.1.2.2.1";
pub const STUDY_ROOT_MOVE: &str = "1.2.840.10008.5.1.4.1.2.2.2";
const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";

/// How a C-MOVE ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    pub status: u16,
    pub completed: u16,
    pub failed: u16,
    pub warnings: u16,
    pub comment: String,
}

/// A query/retrieve association (study root C-FIND and C-MOVE, implicit VR little endian).
pub struct QueryRetrieve {
    association: ClientAssociation<TcpStream>,
    find: u8,
    retrieve: u8,
    next_id: u16,
}

impl std::fmt::Debug for QueryRetrieve {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryRetrieve").finish_non_exhaustive()
    }
}

impl QueryRetrieve {
    pub fn connect(peer: &Peer, calling_ae: &str) -> Result<QueryRetrieve, String> {
        let association = ClientAssociationOptions::new()
            .calling_ae_title(calling_ae)
            .called_ae_title(peer.ae_title.as_str())
            .with_presentation_context(STUDY_ROOT_FIND, vec![IMPLICIT_VR_LE])
            .with_presentation_context(STUDY_ROOT_MOVE, vec![IMPLICIT_VR_LE])
            .read_timeout(Duration::from_secs(120))
            .write_timeout(Duration::from_secs(60))
            .connection_timeout(Duration::from_secs(15))
            .establish(peer.address.as_str())
            .map_err(|e| format!("association with {}@{}: {e}", peer.ae_title, peer.address))?;
        let context = |uid: &str| {
            association
                .presentation_contexts()
                .iter()
                .find(|pc| {
                    pc.reason == PresentationContextResultReason::Acceptance
                        && pc.abstract_syntax.trim_end_matches('\0') == uid
                })
                .map(|pc| pc.id)
        };
        let find = context(STUDY_ROOT_FIND).ok_or("the PACS does not accept study root C-FIND")?;
        let retrieve =
            context(STUDY_ROOT_MOVE).ok_or("the PACS does not accept study root C-MOVE")?;
        Ok(QueryRetrieve {
            association,
            find,
            retrieve,
            next_id: 1,
        })
    }

    fn send(&mut self, context: u8, command: Vec<u8>, identifier: Vec<u8>) -> Result<(), String> {
        for (value_type, data) in [
            (PDataValueType::Command, command),
            (PDataValueType::Data, identifier),
        ] {
            self.association
                .send(&Pdu::PData {
                    data: vec![PDataValue {
                        presentation_context_id: context,
                        value_type,
                        is_last: true,
                        data,
                    }],
                })
                .map_err(|e| format!("sending a request: {e}"))?;
        }
        Ok(())
    }

    fn message_id(&mut self) -> u16 {
        let id = self.next_id;
        self.next_id = self.next_id.checked_add(1).unwrap_or(1);
        id
    }

    /// C-FIND with `keys`; returns, per match, the text of each `wanted` tag.
    pub fn find(
        &mut self,
        keys: &[(Tag, VR, &str)],
        wanted: &[Tag],
    ) -> Result<Vec<Vec<String>>, String> {
        let id = self.message_id();
        self.send(
            self.find,
            dimse::find_request(id, STUDY_ROOT_FIND),
            dimse::identifier(keys),
        )?;
        let mut matches = Vec::new();
        loop {
            let (command, data) = receive_message(&mut self.association)?;
            if is_pending(command.status) {
                if let Some(data) = data {
                    matches.push(dimse::read_identifier(&data, wanted)?);
                }
                continue;
            }
            return match command.status {
                Some(dimse::status::SUCCESS) => Ok(matches),
                other => Err(format!(
                    "C-FIND failed: status {:04X}{}",
                    other.unwrap_or(0xFFFF),
                    if command.error_comment.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", command.error_comment)
                    }
                )),
            };
        }
    }

    /// C-MOVE of what `keys` select to the AE `destination`; waits for the final response.
    pub fn move_to(
        &mut self,
        keys: &[(Tag, VR, &str)],
        destination: &str,
    ) -> Result<Moved, String> {
        let id = self.message_id();
        self.send(
            self.retrieve,
            dimse::move_request(id, STUDY_ROOT_MOVE, destination),
            dimse::identifier(keys),
        )?;
        loop {
            let (command, _) = receive_message(&mut self.association)?;
            if is_pending(command.status) {
                continue;
            }
            return Ok(Moved {
                status: command.status.unwrap_or(0xFFFF),
                completed: command.completed.unwrap_or(0),
                failed: command.failed.unwrap_or(0),
                warnings: command.warnings.unwrap_or(0),
                comment: command.error_comment,
            });
        }
    }

    pub fn release(self) {
        let _ = self.association.release();
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
