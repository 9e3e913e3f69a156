//! The node's path for a file: sniff -> decode (structure walk, codestream checks, pixel
//! decoding) -> de-identify -> hash -> preprocess. Not contained: a panic is a finding.
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
    }
});
