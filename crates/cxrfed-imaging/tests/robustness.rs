//! Damaged DICOM never panics the decoder: truncations and byte flips of a valid file end in
//! a decoded image or an `ImagingError`, never in `DecoderPanic` (a contained panic would still
//! mean a bug to fix).

use cxrfed_imaging::{ImagingError, Limits, SiteSecret, decode_contained};
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use proptest::prelude::*;

fn valid_dicom(transfer_syntax: &str) -> Vec<u8> {
    let pixels: Vec<u16> = (0..64u32 * 48)
        .map(|i| ((i * 37) & 0x0fff) as u16)
        .collect();
    let obj = InMemDicomObject::from_element_iter([
        DataElement::new(tags::SOP_CLASS_UID, VR::UI, "1.2.840.10008.5.1.4.1.1.1"),
        DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, "2.25.42"),
        DataElement::new(tags::PATIENT_ID, VR::LO, "ROBUST-1"),
        DataElement::new(tags::MODALITY, VR::CS, "CR"),
        DataElement::new(tags::SAMPLES_PER_PIXEL, VR::US, PrimitiveValue::from(1u16)),
        DataElement::new(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME1"),
        DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(48u16)),
        DataElement::new(tags::COLUMNS, VR::US, PrimitiveValue::from(64u16)),
        DataElement::new(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(16u16)),
        DataElement::new(tags::BITS_STORED, VR::US, PrimitiveValue::from(12u16)),
        DataElement::new(tags::HIGH_BIT, VR::US, PrimitiveValue::from(11u16)),
        DataElement::new(
            tags::PIXEL_REPRESENTATION,
            VR::US,
            PrimitiveValue::from(0u16),
        ),
        DataElement::new(tags::WINDOW_CENTER, VR::DS, "2048"),
        DataElement::new(tags::WINDOW_WIDTH, VR::DS, "4096"),
        DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::U16(pixels.into())),
    ]);
    let file = obj
        .with_meta(
            FileMetaTableBuilder::new()
                .transfer_syntax(transfer_syntax)
                .media_storage_sop_class_uid("1.2.840.10008.5.1.4.1.1.1")
                .media_storage_sop_instance_uid("2.25.42"),
        )
        .expect("meta");
    let mut out = Vec::new();
    file.write_all(&mut out).expect("write");
    out
}

fn check(bytes: &[u8]) -> Result<(), TestCaseError> {
    let limits = Limits {
        max_rows: 4096,
        max_columns: 4096,
        max_file_bytes: 1 << 20,
        ..Limits::default()
    };
    let result = decode_contained(bytes, &limits, &SiteSecret::from_bytes([3; 32]));
    prop_assert!(
        !matches!(result, Err(ImagingError::DecoderPanic)),
        "a decoder panicked"
    );
    Ok(())
}

#[test]
fn the_valid_files_decode() {
    for ts in [
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.2",
    ] {
        let bytes = valid_dicom(ts);
        let decoded =
            decode_contained(&bytes, &Limits::default(), &SiteSecret::from_bytes([3; 32]))
                .unwrap_or_else(|e| panic!("{ts}: {e}"));
        assert_eq!(decoded.samples.dim(), (48, 64));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn truncation_never_panics(cut in 0usize..8000, ts in 0usize..3) {
        let bytes = valid_dicom(["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"][ts]);
        check(&bytes[..cut.min(bytes.len())])?;
    }

    #[test]
    fn byte_flips_never_panic(
        flips in proptest::collection::vec((0usize..1200, any::<u8>()), 1..8),
        ts in 0usize..3,
    ) {
        // The first 1200 bytes hold the preamble, the file meta group and the whole header.
        let mut bytes = valid_dicom(["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"][ts]);
        for (at, value) in flips {
            if at < bytes.len() {
                bytes[at] = value;
            }
        }
        check(&bytes)?;
    }
}

/// Inputs the fuzzer found (`make fuzz`), kept so that each stays a clean error, never a panic.
#[test]
fn fuzz_findings_are_clean_errors() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-regressions");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("regressions folder") {
        let path = entry.expect("entry").path();
        let bytes = std::fs::read(&path).expect("read");
        let result = std::panic::catch_unwind(|| {
            cxrfed_imaging::decode(&bytes, &Limits::default(), &SiteSecret::from_bytes([3; 32]))
                .map(|_| ())
        });
        let outcome = result.unwrap_or_else(|_| panic!("{} panics the decoder", path.display()));
        if let Err(e) = outcome {
            assert!(
                !matches!(e, ImagingError::DecoderPanic),
                "{}",
                path.display()
            );
        }
        seen += 1;
    }
    assert!(seen > 0);
}
