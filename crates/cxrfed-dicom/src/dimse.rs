//! DIMSE command sets (PS3.7 §9.3, Annex E): always implicit VR little endian, led by their
//! group length. Only what cxrfed speaks: C-ECHO and C-STORE, as SCP (the node's receiver)
//! and as SCU (`cxrfed export --send`).

use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

/// DIMSE status codes (PS3.4 Annex B, PS3.7 Annex C).
pub mod status {
    pub const SUCCESS: u16 = 0x0000;
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;
    pub const PROCESSING_FAILURE: u16 = 0x0110;
    pub const SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
    pub const UNRECOGNIZED_OPERATION: u16 = 0x0211;

    /// Success, or a warning (0001, Bxxx): the instance was stored.
    pub fn is_stored(code: u16) -> bool {
        code == SUCCESS || code == 0x0001 || (code & 0xF000) == 0xB000
    }
}

pub const C_STORE_RQ: u16 = 0x0001;
pub const C_STORE_RSP: u16 = 0x8001;
pub const C_FIND_RQ: u16 = 0x0020;
pub const C_MOVE_RQ: u16 = 0x0021;
pub const C_ECHO_RQ: u16 = 0x0030;
pub const C_ECHO_RSP: u16 = 0x8030;
/// Command Data Set Type (0000,0800): no data set follows.
pub const NO_DATA_SET: u16 = 0x0101;
/// Command Data Set Type for a command followed by a data set (any value but 0101).
const DATA_SET_FOLLOWS: u16 = 0x0000;

/// The fields of a command set that cxrfed reads.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Command {
    pub field: u16,
    pub message_id: u16,
    pub message_id_responded_to: u16,
    pub sop_class: String,
    pub sop_instance: String,
    pub data_set_follows: bool,
    pub status: Option<u16>,
    pub error_comment: String,
    /// C-MOVE responses: sub-operations remaining, completed, failed, with warnings.
    pub remaining: Option<u16>,
    pub completed: Option<u16>,
    pub failed: Option<u16>,
    pub warnings: Option<u16>,
}

fn implicit_le() -> dicom_encoding::TransferSyntax {
    dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN.erased()
}

/// Reads a command set.
pub fn parse(bytes: &[u8]) -> Result<Command, String> {
    let object = InMemDicomObject::read_dataset_with_ts(bytes, &implicit_le())
        .map_err(|e| format!("unreadable command set: {e}"))?;
    let uint = |tag: Tag| -> Option<u16> { object.element(tag).ok()?.uint16().ok() };
    let text = |tag: Tag| -> String {
        object
            .element(tag)
            .ok()
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
            .unwrap_or_default()
    };
    Ok(Command {
        field: uint(tags::COMMAND_FIELD).ok_or("the command set has no Command Field")?,
        message_id: uint(tags::MESSAGE_ID).unwrap_or(0),
        message_id_responded_to: uint(tags::MESSAGE_ID_BEING_RESPONDED_TO).unwrap_or(0),
        sop_class: text(tags::AFFECTED_SOP_CLASS_UID),
        sop_instance: text(tags::AFFECTED_SOP_INSTANCE_UID),
        data_set_follows: uint(tags::COMMAND_DATA_SET_TYPE).is_some_and(|t| t != NO_DATA_SET),
        status: uint(tags::STATUS),
        error_comment: text(tags::ERROR_COMMENT),
        remaining: uint(tags::NUMBER_OF_REMAINING_SUBOPERATIONS),
        completed: uint(tags::NUMBER_OF_COMPLETED_SUBOPERATIONS),
        failed: uint(tags::NUMBER_OF_FAILED_SUBOPERATIONS),
        warnings: uint(tags::NUMBER_OF_WARNING_SUBOPERATIONS),
    })
}

fn even_uid(uid: &str) -> String {
    let mut uid = uid.to_string();
    if uid.len() % 2 == 1 {
        uid.push('\0');
    }
    uid
}

/// Encodes `elements` as a command set, with its Command Group Length (0000,0000) first.
fn encode(elements: Vec<DataElement<InMemDicomObject>>) -> Vec<u8> {
    let body = InMemDicomObject::from_element_iter(elements);
    let mut encoded = Vec::new();
    body.write_dataset_with_ts(&mut encoded, &implicit_le())
        .expect("writing a command set to memory cannot fail");
    let mut out = Vec::with_capacity(encoded.len() + 12);
    out.extend_from_slice(&[0, 0, 0, 0, 4, 0, 0, 0]);
    out.extend_from_slice(&(encoded.len() as u32).to_le_bytes());
    out.extend_from_slice(&encoded);
    out
}

fn uid(tag: Tag, value: &str) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::UI, PrimitiveValue::from(even_uid(value)))
}

fn us(tag: Tag, value: u16) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::US, PrimitiveValue::from(value))
}

/// A response (C-ECHO-RSP, C-STORE-RSP, …) to `request` with `code`, and an Error Comment
/// (LO: at most 64 characters of the default repertoire) for a refusal.
pub fn response(field: u16, request: &Command, code: u16, comment: Option<&str>) -> Vec<u8> {
    let mut elements = vec![
        uid(tags::AFFECTED_SOP_CLASS_UID, &request.sop_class),
        us(tags::COMMAND_FIELD, field),
        us(tags::MESSAGE_ID_BEING_RESPONDED_TO, request.message_id),
        us(tags::COMMAND_DATA_SET_TYPE, NO_DATA_SET),
        us(tags::STATUS, code),
    ];
    if !request.sop_instance.is_empty() {
        elements.push(uid(tags::AFFECTED_SOP_INSTANCE_UID, &request.sop_instance));
    }
    if let Some(comment) = comment {
        let mut text: String = comment
            .chars()
            .filter(|c| c.is_ascii() && !c.is_ascii_control() && *c != '\\')
            .take(64)
            .collect();
        if text.len() % 2 == 1 {
            text.push(' ');
        }
        elements.push(DataElement::new(
            tags::ERROR_COMMENT,
            VR::LO,
            PrimitiveValue::from(text),
        ));
    }
    encode(elements)
}

/// A C-STORE-RQ (priority medium) for one instance; its data set follows.
pub fn store_request(message_id: u16, sop_class: &str, sop_instance: &str) -> Vec<u8> {
    encode(vec![
        uid(tags::AFFECTED_SOP_CLASS_UID, sop_class),
        us(tags::COMMAND_FIELD, C_STORE_RQ),
        us(tags::MESSAGE_ID, message_id),
        us(tags::PRIORITY, 0),
        us(tags::COMMAND_DATA_SET_TYPE, DATA_SET_FOLLOWS),
        uid(tags::AFFECTED_SOP_INSTANCE_UID, sop_instance),
    ])
}

/// A C-FIND-RQ (priority medium) on the information model `sop_class`; the identifier (the
/// query keys) follows as a data set.
pub fn find_request(message_id: u16, sop_class: &str) -> Vec<u8> {
    encode(vec![
        uid(tags::AFFECTED_SOP_CLASS_UID, sop_class),
        us(tags::COMMAND_FIELD, C_FIND_RQ),
        us(tags::MESSAGE_ID, message_id),
        us(tags::PRIORITY, 0),
        us(tags::COMMAND_DATA_SET_TYPE, DATA_SET_FOLLOWS),
    ])
}

/// A C-MOVE-RQ (priority medium) sending what the identifier selects to `destination`.
pub fn move_request(message_id: u16, sop_class: &str, destination: &str) -> Vec<u8> {
    let mut destination = destination.to_string();
    if destination.len() % 2 == 1 {
        destination.push(' ');
    }
    encode(vec![
        uid(tags::AFFECTED_SOP_CLASS_UID, sop_class),
        us(tags::COMMAND_FIELD, C_MOVE_RQ),
        us(tags::MESSAGE_ID, message_id),
        us(tags::PRIORITY, 0),
        us(tags::COMMAND_DATA_SET_TYPE, DATA_SET_FOLLOWS),
        DataElement::new(
            tags::MOVE_DESTINATION,
            VR::AE,
            PrimitiveValue::from(destination),
        ),
    ])
}

/// A query identifier (implicit VR little endian, as negotiated for queries): each
/// (keyword, value) pair, an empty value asking for the attribute to be returned.
pub fn identifier(keys: &[(Tag, VR, &str)]) -> Vec<u8> {
    let object = InMemDicomObject::from_element_iter(keys.iter().map(|(tag, vr, value)| {
        if value.is_empty() {
            DataElement::new(*tag, *vr, PrimitiveValue::Empty)
        } else {
            DataElement::new(*tag, *vr, PrimitiveValue::from(*value))
        }
    }));
    let mut bytes = Vec::new();
    object
        .write_dataset_with_ts(&mut bytes, &implicit_le())
        .expect("writing an identifier to memory cannot fail");
    bytes
}

/// Reads a response identifier (implicit VR little endian): the text of each tag asked for.
pub fn read_identifier(bytes: &[u8], wanted: &[Tag]) -> Result<Vec<String>, String> {
    let object = InMemDicomObject::read_dataset_with_ts(bytes, &implicit_le())
        .map_err(|e| format!("unreadable identifier: {e}"))?;
    Ok(wanted
        .iter()
        .map(|tag| {
            object
                .element(*tag)
                .ok()
                .and_then(|e| e.to_str().ok())
                .map(|s| s.trim_end_matches(['\0', ' ']).trim().to_string())
                .unwrap_or_default()
        })
        .collect())
}

/// The received data set framed as a DICOM Part 10 file: preamble, "DICM", the File Meta
/// Information (from the command's SOP class and instance and the negotiated transfer
/// syntax), then the data set bytes exactly as received.
pub fn part10(
    sop_class: &str,
    sop_instance: &str,
    transfer_syntax: &str,
    data_set: &[u8],
) -> Result<Vec<u8>, String> {
    if sop_class.is_empty() || sop_instance.is_empty() {
        return Err("the C-STORE request names no SOP class or instance".into());
    }
    let meta = dicom_object::FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(sop_class)
        .media_storage_sop_instance_uid(sop_instance)
        .transfer_syntax(transfer_syntax)
        .implementation_class_uid(crate::IMPLEMENTATION_CLASS_UID)
        .implementation_version_name(crate::IMPLEMENTATION_VERSION_NAME)
        .build()
        .map_err(|e| format!("file meta information: {e}"))?;
    let mut file = Vec::with_capacity(data_set.len() + 512);
    file.extend_from_slice(&[0u8; 128]);
    file.extend_from_slice(b"DICM");
    meta.write(&mut file)
        .map_err(|e| format!("file meta information: {e}"))?;
    file.extend_from_slice(data_set);
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_carry_group_length_status_and_comment() {
        let request = Command {
            field: C_STORE_RQ,
            message_id: 7,
            sop_class: "1.2.840.10008.5.1.4.1.1.1".into(),
            sop_instance: "1.2.3".into(),
            data_set_follows: true,
            ..Command::default()
        };
        let bytes = response(
            C_STORE_RSP,
            &request,
            status::OUT_OF_RESOURCES,
            Some("queue full"),
        );
        let object =
            InMemDicomObject::read_dataset_with_ts(&bytes[..], &implicit_le()).expect("parse");
        let length = object
            .element(tags::COMMAND_GROUP_LENGTH)
            .expect("group length")
            .to_int::<u32>()
            .expect("u32");
        assert_eq!(length as usize, bytes.len() - 12);
        let parsed = parse(&bytes).expect("parse");
        assert_eq!(parsed.field, C_STORE_RSP);
        assert_eq!(parsed.message_id_responded_to, 7);
        assert_eq!(parsed.status, Some(0xA700));
        assert_eq!(parsed.error_comment, "queue full");
        assert_eq!(parsed.sop_instance, "1.2.3");
        assert!(!parsed.data_set_follows);
    }

    #[test]
    fn store_requests_announce_their_data_set() {
        let bytes = store_request(3, "1.2.840.10008.5.1.4.1.1.88.33", "2.25.1");
        let parsed = parse(&bytes).expect("parse");
        assert_eq!(parsed.field, C_STORE_RQ);
        assert_eq!(parsed.message_id, 3);
        assert!(parsed.data_set_follows);
        assert_eq!(parsed.sop_class, "1.2.840.10008.5.1.4.1.1.88.33");
        assert_eq!(parsed.sop_instance, "2.25.1");
        assert!(status::is_stored(0) && status::is_stored(0xB000) && !status::is_stored(0xA700));
    }

    #[test]
    fn query_identifiers_round_trip() {
        let bytes = identifier(&[
            (tags::QUERY_RETRIEVE_LEVEL, VR::CS, "STUDY"),
            (tags::STUDY_INSTANCE_UID, VR::UI, ""),
            (tags::STUDY_DATE, VR::DA, "20240101-20241231"),
        ]);
        let values = read_identifier(
            &bytes,
            &[
                tags::QUERY_RETRIEVE_LEVEL,
                tags::STUDY_INSTANCE_UID,
                tags::STUDY_DATE,
            ],
        )
        .expect("read");
        assert_eq!(values, ["STUDY", "", "20240101-20241231"]);
        let rq = parse(&move_request(9, "1.2.840.10008.5.1.4.1.2.2.2", "CXRFED")).expect("parse");
        assert_eq!(
            (rq.field, rq.message_id, rq.data_set_follows),
            (C_MOVE_RQ, 9, true)
        );
        assert_eq!(
            parse(&find_request(2, "1.2")).expect("parse").field,
            C_FIND_RQ
        );
    }

    #[test]
    fn part10_framing_is_read_back_with_its_transfer_syntax() {
        let data_set = {
            let object = InMemDicomObject::from_element_iter([DataElement::new(
                tags::MODALITY,
                VR::CS,
                PrimitiveValue::from("CR"),
            )]);
            let ts = dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN.erased();
            let mut bytes = Vec::new();
            object
                .write_dataset_with_ts(&mut bytes, &ts)
                .expect("write");
            bytes
        };
        let file = part10(
            "1.2.840.10008.5.1.4.1.1.1",
            "1.2.3.4",
            "1.2.840.10008.1.2.1",
            &data_set,
        )
        .expect("framed");
        let object = dicom_object::from_reader(&file[128..]).expect("read back");
        assert_eq!(object.meta().transfer_syntax(), "1.2.840.10008.1.2.1");
        assert_eq!(
            object
                .element(tags::MODALITY)
                .expect("modality")
                .to_str()
                .expect("text"),
            "CR"
        );
        assert!(part10("", "1.2", "1.2.840.10008.1.2.1", &data_set).is_err());
    }
}
