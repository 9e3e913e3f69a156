use thiserror::Error;

/// Why an image could not be read. Messages never contain header values or patient data.
#[derive(Debug, Error)]
pub enum ImagingError {
    #[error("the file is empty")]
    Empty,
    #[error("the file is {size} bytes, above the limit of {limit} bytes")]
    FileTooLarge { size: u64, limit: u64 },
    #[error("not a DICOM, JPEG or PNG file (content starts with {magic})")]
    UnrecognizedFormat { magic: String },
    #[error("malformed DICOM: {0}")]
    MalformedDicom(String),
    #[error("unsupported transfer syntax {uid} ({name})")]
    UnsupportedTransferSyntax { uid: String, name: String },
    #[error("image dimensions {rows}x{columns} exceed the limit of {max_rows}x{max_columns}")]
    DimensionsTooLarge {
        rows: u64,
        columns: u64,
        max_rows: u32,
        max_columns: u32,
    },
    #[error("unsupported image: {0}")]
    Unsupported(String),
    #[error("corrupt or truncated pixel data: {0}")]
    Corrupt(String),
    /// Refused under the site's de-identification policy (e.g. burned-in annotation).
    #[error("quarantined: {0}; nothing was stored")]
    Quarantined(String),
    /// Decoding would need more memory than the limits allow (a decompression bomb, an
    /// image above the decode budget): retrying the same file cannot succeed.
    #[error("refused to decode: {0}")]
    ResourceLimit(String),
    /// The decode memory budget stayed taken by other decodes: the same file may succeed
    /// later.
    #[error("refused to decode now: {0}")]
    DecodeBudgetBusy(String),
    #[error("the decoder panicked on this image; it was refused and nothing was stored")]
    DecoderPanic,
}

impl ImagingError {
    /// Whether the same input may succeed later (the node was busy), as opposed to an input
    /// that will always be refused.
    pub fn is_transient(&self) -> bool {
        matches!(self, ImagingError::DecodeBudgetBusy(_))
    }

    /// A stable, machine-readable kind for logs, metrics and API error details.
    pub fn kind(&self) -> &'static str {
        match self {
            ImagingError::Empty => "empty",
            ImagingError::FileTooLarge { .. } => "file_too_large",
            ImagingError::UnrecognizedFormat { .. } => "unrecognized_format",
            ImagingError::MalformedDicom(_) => "malformed_dicom",
            ImagingError::UnsupportedTransferSyntax { .. } => "unsupported_transfer_syntax",
            ImagingError::DimensionsTooLarge { .. } => "dimensions_too_large",
            ImagingError::Unsupported(_) => "unsupported_image",
            ImagingError::Corrupt(_) => "corrupt_pixel_data",
            ImagingError::ResourceLimit(_) => "resource_limit",
            ImagingError::DecodeBudgetBusy(_) => "decode_budget_busy",
            ImagingError::Quarantined(_) => "quarantined",
            ImagingError::DecoderPanic => "decoder_panic",
        }
    }
}
