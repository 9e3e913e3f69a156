//! The transfer syntaxes the node decodes. Everything else is refused by name before any pixel
//! decoding is attempted.

/// (UID, name) of every supported transfer syntax.
pub const SUPPORTED: &[(&str, &str)] = &[
    ("1.2.840.10008.1.2", "Implicit VR Little Endian"),
    ("1.2.840.10008.1.2.1", "Explicit VR Little Endian"),
    (
        "1.2.840.10008.1.2.1.99",
        "Deflated Explicit VR Little Endian",
    ),
    ("1.2.840.10008.1.2.2", "Explicit VR Big Endian"),
    ("1.2.840.10008.1.2.5", "RLE Lossless"),
    ("1.2.840.10008.1.2.4.50", "JPEG Baseline (Process 1)"),
    ("1.2.840.10008.1.2.4.51", "JPEG Extended (Process 2 & 4)"),
    (
        "1.2.840.10008.1.2.4.57",
        "JPEG Lossless, Non-Hierarchical (Process 14)",
    ),
    (
        "1.2.840.10008.1.2.4.70",
        "JPEG Lossless, Non-Hierarchical, First-Order Prediction",
    ),
    (
        "1.2.840.10008.1.2.4.90",
        "JPEG 2000 Image Compression (Lossless Only)",
    ),
    ("1.2.840.10008.1.2.4.91", "JPEG 2000 Image Compression"),
];

/// Well-known syntaxes we refuse, for a readable error message.
const KNOWN_UNSUPPORTED: &[(&str, &str)] = &[
    (
        "1.2.840.10008.1.2.4.80",
        "JPEG-LS Lossless Image Compression",
    ),
    (
        "1.2.840.10008.1.2.4.81",
        "JPEG-LS Lossy (Near-Lossless) Image Compression",
    ),
    (
        "1.2.840.10008.1.2.4.201",
        "High-Throughput JPEG 2000 (Lossless Only)",
    ),
    (
        "1.2.840.10008.1.2.4.202",
        "High-Throughput JPEG 2000 with RPCL Options (Lossless Only)",
    ),
    ("1.2.840.10008.1.2.4.203", "High-Throughput JPEG 2000"),
    ("1.2.840.10008.1.2.4.100", "MPEG2 Main Profile / Main Level"),
    (
        "1.2.840.10008.1.2.4.102",
        "MPEG-4 AVC/H.264 High Profile / Level 4.1",
    ),
    ("1.2.840.10008.1.2.4.110", "JPEG XL Lossless"),
    ("1.2.840.10008.1.2.4.112", "JPEG XL"),
];

/// Returns the display name of a supported syntax, or `None`.
pub fn supported_name(uid: &str) -> Option<&'static str> {
    SUPPORTED
        .iter()
        .find(|(u, _)| *u == uid)
        .map(|(_, name)| *name)
}

/// A human-readable name for any transfer syntax UID.
pub fn name_of(uid: &str) -> String {
    SUPPORTED
        .iter()
        .chain(KNOWN_UNSUPPORTED)
        .find(|(u, _)| *u == uid)
        .map(|(_, name)| (*name).to_string())
        .or_else(|| {
            use dicom_encoding::TransferSyntaxIndex;
            dicom_transfer_syntax_registry::TransferSyntaxRegistry
                .get(uid)
                .map(|ts| ts.name().to_string())
        })
        .unwrap_or_else(|| "unknown transfer syntax".to_string())
}

/// Whether the syntax stores pixels uncompressed (native encoding, possibly deflated as a whole).
pub fn is_native(uid: &str) -> bool {
    matches!(
        uid,
        "1.2.840.10008.1.2"
            | "1.2.840.10008.1.2.1"
            | "1.2.840.10008.1.2.1.99"
            | "1.2.840.10008.1.2.2"
    )
}

/// Whether the syntax stores lossy-compressed pixels.
pub fn is_lossy(uid: &str) -> bool {
    matches!(
        uid,
        "1.2.840.10008.1.2.4.50" | "1.2.840.10008.1.2.4.51" | "1.2.840.10008.1.2.4.91"
    )
}
