//! The DICOM that cxrfed writes itself, beside what dicom-rs reads and negotiates:
//!
//! * [`sr`] — a record as a Comprehensive SR following TID 1500, with [`codes`], the coded
//!   concepts it uses (standard where they exist, the private scheme `99CXRFED` otherwise).
//! * [`dimse`] — DIMSE command sets (C-ECHO, C-STORE requests and responses) and the Part 10
//!   framing of a received data set. dicom-ul 0.10 negotiates associations and moves PDUs but
//!   has no DIMSE layer, so the node's receiver and the CLI's sender build and read command
//!   sets here, with dicom-object doing the encoding.
//! * [`fhir`] — the same records as FHIR R4 (`DiagnosticReport`, `Observation`, `Device`,
//!   `Patient`) following the HL7 mapping of TID 1500 to FHIR.
//! * [`scu`] — a C-STORE SCU (`cxrfed export --send`): files to a PACS over one association.
//!
//! Architecture invariant: cxrfed-dicom depends on cxrfed-schema and dicom-rs only: no gRPC
//! (tonic), no LibTorch (tch), no storage (sled).

#![forbid(unsafe_code)]

pub mod codes;
pub mod dimse;
pub mod fhir;
pub mod scu;
pub mod sr;

pub use sr::{ReportError, Uids, derived_uid, dicom_sr};

/// cxrfed's Implementation Class UID (File Meta Information, association requests): a fixed
/// UUID-derived UID under 2.25.
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.255042373735117362917358305958421496813";
/// cxrfed's Implementation Version Name.
pub const IMPLEMENTATION_VERSION_NAME: &str = "CXRFED_01";
