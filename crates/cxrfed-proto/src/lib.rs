//! The cxrfed gRPC contract (`cxrfed.v1`): generated tonic/prost code, the descriptor set for
//! server reflection, and conversions between wire messages and the domain types of
//! `cxrfed-schema`.
//!
//! Incoming messages are validated once, here, with `TryFrom<pb::X>`; a failed conversion is a
//! [`ConversionError`] that services turn into `InvalidArgument`. This crate holds no business
//! logic and must not depend on storage, LibTorch or the node.
//!
//! Architecture invariant: cxrfed-proto holds no business logic and no store types: generated
//! code, conversions and the wire enums' words; it depends on neither sled nor tch.

#![forbid(unsafe_code)]

/// Generated code for package `cxrfed.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_debug_implementations, clippy::unwrap_used)]
    tonic::include_proto!("cxrfed.v1");
}

/// Encoded `FileDescriptorSet` of every cxrfed proto file, for tonic-reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("cxrfed_descriptor");

mod convert;
pub mod labels;

pub use convert::{ConversionError, custom_kind, timestamp};
pub use labels::Label;

/// The largest piece of a weights transfer on a link (1 MiB): no message comes near gRPC's
/// 4 MiB default limit, whatever the model size.
pub const CHUNK_BYTES: usize = 1 << 20;

/// `data` as the chunks of one transfer on a link: slices of the same buffer (nothing is
/// copied) of at most [`CHUNK_BYTES`], in order, the last one marked.
pub fn chunks(task_id: &str, data: prost::bytes::Bytes) -> impl Iterator<Item = v1::Chunk> + '_ {
    (0..data.len()).step_by(CHUNK_BYTES).map(move |offset| {
        let end = (offset + CHUNK_BYTES).min(data.len());
        v1::Chunk {
            task_id: task_id.to_string(),
            offset: offset as u64,
            data: data.slice(offset..end),
            last: end == data.len(),
        }
    })
}

/// One file as the messages of an `Extract` upload: the header on the first, then slices of
/// `bytes` (nothing is copied) of at most `chunk` bytes. An empty file is one message.
pub fn upload(
    bytes: prost::bytes::Bytes,
    filename: &str,
    force: bool,
    chunk: usize,
) -> Vec<v1::ExtractRequest> {
    let chunk = chunk.max(1);
    let mut messages: Vec<v1::ExtractRequest> = (0..bytes.len())
        .step_by(chunk)
        .map(|offset| v1::ExtractRequest {
            header: None,
            chunk: bytes.slice(offset..(offset + chunk).min(bytes.len())),
        })
        .collect();
    if messages.is_empty() {
        messages.push(v1::ExtractRequest::default());
    }
    messages[0].header = Some(v1::ExtractHeader {
        filename: filename.into(),
        force,
        size_hint: bytes.len() as u64,
    });
    messages
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_upload_is_slices_of_the_file_in_order() {
        let file = prost::bytes::Bytes::from((0..=255u8).cycle().take(1000).collect::<Vec<_>>());
        let messages = super::upload(file.clone(), "a.dcm", true, 300);
        assert_eq!(messages.len(), 4);
        let header = messages[0].header.as_ref().expect("header first");
        assert_eq!((header.size_hint, header.force), (1000, true));
        assert!(messages[1..].iter().all(|m| m.header.is_none()));
        let joined: Vec<u8> = messages.iter().flat_map(|m| m.chunk.to_vec()).collect();
        assert_eq!(joined, file);
        assert_eq!(super::upload(Default::default(), "e", false, 300).len(), 1);
    }

    /// Found by fuzzing (proto_messages): a NodeMessage whose report has two metrics. With
    /// HashMap maps its re-encoding changed order from one encode to the next.
    #[test]
    fn messages_with_maps_encode_deterministically() {
        use prost::Message;
        let bytes = [42u8, 5, 83, 3, 10, 1, 96, 42, 5, 83, 3, 10, 1, 64];
        let message = super::v1::NodeMessage::decode(&bytes[..]).expect("decodes");
        let encoded = message.encode_to_vec();
        for _ in 0..16 {
            let again = super::v1::NodeMessage::decode(encoded.as_slice()).expect("decodes");
            assert_eq!(again.encode_to_vec(), encoded);
        }
    }

    #[test]
    fn chunks_cover_the_buffer_in_order() {
        let data = prost::bytes::Bytes::from(vec![7u8; 2 * super::CHUNK_BYTES + 5]);
        let parts: Vec<_> = super::chunks("t", data.clone()).collect();
        assert_eq!(parts.len(), 3);
        assert_eq!(
            parts.iter().map(|c| c.offset).collect::<Vec<_>>(),
            vec![0, super::CHUNK_BYTES as u64, 2 * super::CHUNK_BYTES as u64]
        );
        assert!(parts[2].last && !parts[0].last && !parts[1].last);
        assert_eq!(
            parts.iter().map(|c| c.data.len()).sum::<usize>(),
            data.len()
        );
    }
}
