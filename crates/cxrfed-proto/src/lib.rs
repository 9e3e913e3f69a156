//! The cxrfed gRPC contract (`cxrfed.v1`): generated tonic/prost code, the descriptor set for
//! server reflection, and conversions between wire messages and the domain types of
//! `cxrfed-schema`.
//!
//! Incoming messages are validated once, here, with `TryFrom<pb::X>`; a failed conversion is a
//! [`ConversionError`] that services turn into `InvalidArgument`. This crate holds no business
//! logic and must not depend on storage, LibTorch or the node.

#![forbid(unsafe_code)]

/// Generated code for package `cxrfed.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_debug_implementations, clippy::unwrap_used)]
    tonic::include_proto!("cxrfed.v1");
}

/// Encoded `FileDescriptorSet` of every cxrfed proto file, for tonic-reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("cxrfed_descriptor");

mod convert;

pub use convert::{ConversionError, custom_kind, timestamp};

/// The largest piece of a weights transfer on a link (1 MiB): no message comes near gRPC's
/// 4 MiB default limit, whatever the model size.
pub const CHUNK_BYTES: usize = 1 << 20;
