//! Recognises the container format from the first bytes, never from the file name.

use crate::ImagingError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// DICOM Part 10 with the 128-byte preamble and "DICM".
    Dicom,
    /// DICOM Part 10 whose preamble was stripped (starts directly with "DICM").
    DicomNoPreamble,
    Jpeg,
    Png,
}

const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

/// Sniffs the format of `bytes`.
pub fn sniff(bytes: &[u8]) -> Result<Format, ImagingError> {
    if bytes.is_empty() {
        return Err(ImagingError::Empty);
    }
    if bytes.len() >= 132 && &bytes[128..132] == b"DICM" {
        return Ok(Format::Dicom);
    }
    // Part 10 streams whose 128-byte preamble was stripped start directly with "DICM".
    if bytes.starts_with(b"DICM") {
        return Ok(Format::DicomNoPreamble);
    }
    if bytes.starts_with(PNG_SIGNATURE) {
        return Ok(Format::Png);
    }
    if bytes.len() >= 3 && bytes[..3] == [0xFF, 0xD8, 0xFF] {
        return Ok(Format::Jpeg);
    }
    let magic = hex::encode(&bytes[..bytes.len().min(8)]);
    Err(ImagingError::UnrecognizedFormat { magic })
}

/// Every regular file below `folder` (recursively, symlinks not followed), sorted: the order
/// both ingest paths (this job and `cxrfed ingest`) take a folder in.
pub fn files_under(folder: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<std::path::PathBuf> = walkdir::WalkDir::new(folder)
        .follow_links(false)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .map(|e| e.into_path())
        .collect();
    files.sort();
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_by_content() {
        let mut dicom = vec![0u8; 132];
        dicom[128..].copy_from_slice(b"DICM");
        assert_eq!(sniff(&dicom).expect("dicom"), Format::Dicom);
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\nrest").expect("png"), Format::Png);
        assert_eq!(
            sniff(&[0xFF, 0xD8, 0xFF, 0xE0]).expect("jpeg"),
            Format::Jpeg
        );
        assert!(matches!(sniff(b""), Err(ImagingError::Empty)));
        assert!(matches!(
            sniff(b"hello world"),
            Err(ImagingError::UnrecognizedFormat { .. })
        ));
    }
}
