//! Decoding, de-identification, hashing and preprocessing of chest X-rays.
//!
//! The data flow is `sniff -> decode -> deidentify -> hash -> preprocess`:
//!
//! * [`sniff`] recognises DICOM Part 10, JPEG and PNG by content, never by file name.
//! * [`decode`] turns the bytes into a grayscale [`Decoded`] image (first frame, stored sample
//!   values) plus the display pipeline: modality LUT (rescale), VOI LUT (window or table from the
//!   file, otherwise a robust percentile window) and MONOCHROME1 inversion.
//! * [`deidentify`] derives the few facts the node keeps (age band, sex, view, body part,
//!   modality, manufacturer, acquisition month, keyed pseudonym) and nothing else.
//! * [`preprocess`] maps the image to the model input (area resize, pad or crop, normalise)
//!   in one pass over the full-resolution samples.
//!
//! This crate must not depend on gRPC (tonic), LibTorch (tch) or storage (sled). It never logs
//! or returns a patient identifier; errors carry no header values.
//!
//! Architecture invariant: cxrfed-imaging depends on neither tonic, sled nor tch.

// `unsafe_code` is denied workspace-wide; not `forbid` here because ndarray's `s!` macro
// expands to an `allow(unsafe_code)`, which `forbid` would reject.

mod attr;
pub mod budget;
pub mod codestream;
pub mod decode;
pub mod deidentify;
mod error;
pub mod j2k;
pub mod preprocess;
pub mod scan;
pub mod sniff;
pub mod syntax;

pub use budget::{MemoryBudget, Reservation};
pub use decode::{
    Decoded, DisplayLut, Limits, Modality, Reduction, Samples, Voi, VoiTable, contain, decode,
    decode_contained, decode_for_model, decode_reserving,
};
pub use deidentify::{BurnedInPolicy, Deidentified, SiteSecret};
pub use error::ImagingError;
pub use preprocess::{Aspect, Pipeline, PreprocessOptions, input_png, preprocess, txrv_input};
pub use sniff::{Format, sniff};
