//! The node's path for a file: sniff -> decode (structure walk, codestream checks, pixel
//! decoding) -> de-identify -> hash -> preprocess (cxrfed's and TorchXRayVision's). Not
//! contained: a panic is a finding. Then the node's decode for the model, which reduces
//! JPEG 2000 through OpenJPEG's reduce factor: it is contained, so a panic there shows as
//! `DecoderPanic`, also a finding.
#![no_main]

use cxrfed_imaging::{Limits, PreprocessOptions, SiteSecret};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    // Limits small enough that every accepted image decodes quickly under the fuzzer.
    let limits = Limits {
        max_rows: 512,
        max_columns: 512,
        max_file_bytes: 4 << 20,
        ..Limits::default()
    };
    let secret = SiteSecret::from_bytes([7; 32]);
    if let Ok(decoded) = cxrfed_imaging::decode(bytes, &limits, &secret) {
        let _ = decoded.pixel_sha256();
        let options = PreprocessOptions {
            size: 32,
            ..PreprocessOptions::default()
        };
        let input = cxrfed_imaging::preprocess(&decoded, &options);
        assert_eq!(input.dim(), (32, 32));
        assert!(input.iter().all(|v| v.is_finite()));
        // TorchXRayVision's preprocessing (an imported TXRV model's card): any decoded image,
        // any bit depth or sign, gives a finite input, whether the filter shrinks it (32) or
        // the zoom enlarges it (images under 64 px; the corpus has many).
        for size in [32, 64] {
            let txrv = cxrfed_imaging::txrv_input(&decoded, size);
            assert_eq!(txrv.dim(), (size, size));
            assert!(txrv.iter().all(|v| v.is_finite()));
        }
    }
    let budget = cxrfed_imaging::MemoryBudget::new(64 << 20, std::time::Duration::from_millis(1));
    let reduction = cxrfed_imaging::Reduction {
        min_side: 32,
        lossless: true,
    };
    match cxrfed_imaging::decode_for_model(bytes, &limits, &secret, &budget, reduction) {
        Ok((decoded, _)) => {
            assert_eq!(decoded.pixel_sha256().len(), 64);
            let (rows, columns) = decoded.samples.dim();
            assert!(rows >= 1 && columns >= 1);
        }
        Err(e) => assert!(
            !matches!(e, cxrfed_imaging::ImagingError::DecoderPanic),
            "a decoder panicked"
        ),
    }
});
