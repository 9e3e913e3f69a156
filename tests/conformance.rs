//! Decode conformance against pydicom: for every DICOM file in pydicom's test data and the
//! pydicom-data package, cxrfed's decoded first frame after the modality LUT must equal
//! pydicom's `pixel_array` with its rescale applied — exactly for lossless transfer syntaxes,
//! within a stated tolerance for lossy ones. Files in syntaxes cxrfed does not decode must be
//! refused with the "unsupported transfer syntax" error, never decoded wrongly or panicking.

use std::collections::BTreeMap;
use std::process::Command;

use cxrfed_e2e::{venv_python, workspace_root};
use cxrfed_imaging::{ImagingError, Limits, SiteSecret, decode_contained, syntax};

/// Lossy syntaxes: two different decoders (dicom-rs vs pylibjpeg) may round the inverse
/// transform differently. We accept a mean absolute difference up to 0.5% of the sample range
/// and a maximum difference up to 3% of it.
const LOSSY_MEAN_FRACTION: f64 = 0.005;
const LOSSY_MAX_FRACTION: f64 = 0.03;
/// Colour images are reduced to luma by both sides with the same rounded formula; decoder
/// rounding of YCbCr -> RGB may still move a channel by one unit.
const COLOUR_MAX_DIFF: f64 = 2.0;

/// Files where dicom-rs and pydicom knowingly disagree. Each must still end in a clear error or
/// a decode, never a panic; none is a chest radiograph encoding a site would send.
const KNOWN_DEVIATIONS: &[(&str, &str)] = &[
    (
        "SC_jpeg_no_color_transform.dcm",
        "RGB JPEG whose APP14 marker says 'no colour transform'; jpeg-decoder converts from YCbCr anyway",
    ),
    (
        "SC_rgb_jpeg.dcm",
        "dicom-object cannot parse the data set (encapsulated colour JPEG); refused as malformed",
    ),
];

#[test]
fn decode_matches_pydicom() {
    let out = tempfile::tempdir().expect("tempdir");
    let helper = workspace_root().join("tests/helpers/pydicom_dump.py");
    let status = Command::new(venv_python())
        .arg(&helper)
        .arg(out.path())
        .status()
        .expect("run helper");
    assert!(status.success(), "pydicom helper failed");
    let manifest: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(out.path().join("manifest.json")).expect("manifest"))
            .expect("manifest json");

    let limits = Limits {
        max_rows: 16384,
        max_columns: 16384,
        max_file_bytes: 1 << 30,
        // Decoding is what this test compares; the burned-in policy has its own tests.
        burned_in: cxrfed_imaging::BurnedInPolicy::Accept,
    };
    let secret = SiteSecret::from_bytes([7; 32]);
    let mut passed = Vec::new();
    let mut refused = Vec::new();
    let mut failed = Vec::new();
    let mut by_syntax: BTreeMap<String, (usize, usize)> = BTreeMap::new();

    for entry in &manifest {
        let name = entry["name"].as_str().unwrap_or("?").to_string();
        let path = entry["path"].as_str().expect("path");
        let bytes = std::fs::read(path).expect("read test file");
        // Every file, whatever pydicom thinks of it, must not panic or hang our decoder.
        let result = decode_contained(&bytes, &limits, &secret);
        if matches!(result, Err(ImagingError::DecoderPanic)) {
            failed.push(format!("{name}: decoder panicked"));
            continue;
        }
        if entry["status"] != "ok" {
            continue;
        }
        let ts = entry["transfer_syntax"].as_str().unwrap_or("").to_string();
        let supported = syntax::supported_name(&ts).is_some();
        let tally = by_syntax
            .entry(format!("{ts} ({})", syntax::name_of(&ts)))
            .or_default();
        if let Some((_, why)) = KNOWN_DEVIATIONS.iter().find(|(file, _)| *file == name) {
            let outcome = match &result {
                Ok(_) => "decoded".to_string(),
                Err(e) => format!("refused: {e}"),
            };
            refused.push(format!("{name}: known deviation ({why}); {outcome}"));
            continue;
        }
        let decoded = match result {
            Ok(d) => d,
            Err(ImagingError::UnsupportedTransferSyntax { .. }) if !supported => {
                refused.push(format!(
                    "{name}: {}",
                    result.err().map(|e| e.to_string()).unwrap_or_default()
                ));
                continue;
            }
            // Encodings outside chest radiography (1- and 32-bit samples, chroma-subsampled
            // uncompressed colour, 12-bit lossy JPEG) are refused with a clear reason.
            Err(ImagingError::Unsupported(reason)) => {
                refused.push(format!("{name} [{ts}]: unsupported image: {reason}"));
                continue;
            }
            Err(e) => {
                failed.push(format!(
                    "{name} [{ts}]: pydicom decodes it, cxrfed failed: {e}"
                ));
                continue;
            }
        };
        if !supported {
            failed.push(format!(
                "{name}: decoded a syntax ({ts}) that cxrfed claims not to support"
            ));
            continue;
        }
        let shape: Vec<usize> = entry["shape"]
            .as_array()
            .expect("shape")
            .iter()
            .map(|v| v.as_u64().expect("dim") as usize)
            .collect();
        let expected: Vec<f64> =
            std::fs::read(out.path().join(entry["array"].as_str().expect("array")))
                .expect("array file")
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect();
        let ours = decoded.modality_values();
        if ours.dim() != (shape[0], shape[1]) {
            failed.push(format!(
                "{name}: shape {:?}, pydicom {:?}",
                ours.dim(),
                shape
            ));
            continue;
        }
        let diffs: Vec<f64> = ours
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .collect();
        let max = diffs.iter().copied().fold(0.0, f64::max);
        let mean = diffs.iter().sum::<f64>() / diffs.len().max(1) as f64;
        let colour = entry["samples_per_pixel"].as_u64() == Some(3);
        let bits = entry["bits_stored"].as_u64().unwrap_or(16).clamp(1, 16) as i32;
        let range = 2f64.powi(bits) - 1.0;
        let ok = if syntax::is_lossy(&ts) {
            mean <= LOSSY_MEAN_FRACTION * range && max <= LOSSY_MAX_FRACTION * range
        } else if colour {
            max <= COLOUR_MAX_DIFF
        } else {
            max <= 1e-6
        };
        if ok {
            tally.0 += 1;
            passed.push(format!("{name} [{ts}] max diff {max:.3}, mean {mean:.4}"));
        } else {
            tally.1 += 1;
            failed.push(format!(
                "{name} [{ts}] differs from pydicom: max {max:.3}, mean {mean:.4}"
            ));
        }
    }

    println!("== decode conformance against pydicom ==");
    println!("passed ({}):", passed.len());
    for line in &passed {
        println!("  ok       {line}");
    }
    println!("refused ({}):", refused.len());
    for line in &refused {
        println!("  refused  {line}");
    }
    println!("per transfer syntax (passed, failed):");
    for (ts, (ok, bad)) in &by_syntax {
        println!("  {ts}: {ok}, {bad}");
    }
    for line in &failed {
        println!("  FAILED   {line}");
    }
    assert!(
        failed.is_empty(),
        "{} files do not conform:\n{}",
        failed.len(),
        failed.join("\n")
    );
    assert!(
        passed.len() >= 100,
        "too few files compared ({}): is pydicom-data installed?",
        passed.len()
    );
    // RG1 (the chest radiograph) in every syntax it ships in must be among the passes.
    for rg1 in [
        "RG1_UNCI.dcm",
        "RG1_UNCR.dcm",
        "RG1_J2KI.dcm",
        "RG1_J2KR.dcm",
    ] {
        assert!(
            passed.iter().any(|p| p.starts_with(rg1)),
            "{rg1} did not pass"
        );
    }
    // JPEG-LS must be refused by name.
    assert!(
        refused.iter().any(|r| r.contains("JPEG-LS")),
        "no JPEG-LS file was refused"
    );
}

/// The node's reduced-resolution JPEG 2000 decode (`j2k_reduced_decode`): the samples are the
/// image at 1/2^f of its size (the shorter side still covering the 224 px model input), the
/// model input made from them is close to the full decode's, and the identity is the
/// codestream's — the same on every decode of the same file, and never the pixel hash.
#[test]
fn reduced_jpeg2000_decode_covers_the_model_input() {
    use cxrfed_imaging::{
        MemoryBudget, PreprocessOptions, Reduction, decode_for_model, preprocess,
    };
    let limits = Limits {
        burned_in: cxrfed_imaging::BurnedInPolicy::Accept,
        ..Limits::default()
    };
    let secret = SiteSecret::from_bytes([7; 32]);
    let budget = MemoryBudget::new(1 << 30, std::time::Duration::from_secs(5));
    let all = Reduction {
        min_side: 224,
        lossless: true,
    };
    let lossy_only = Reduction {
        min_side: 224,
        lossless: false,
    };
    let phantom = cxrfed_phantom::Generator::new(5, None)
        .expect("generator")
        .with_encoding(Some(cxrfed_phantom::Encoding::Jpeg2000Lossless))
        .with_max_columns(Some(1024))
        .generate(0)
        .to_dicom()
        .expect("phantom");
    let data = cxrfed_e2e::pydicom_data_dir();
    let files: Vec<(&str, Vec<u8>, bool)> = vec![
        (
            "RG1_J2KR",
            std::fs::read(data.join("RG1_J2KR.dcm")).expect("RG1_J2KR"),
            true,
        ),
        (
            "RG1_J2KI",
            std::fs::read(data.join("RG1_J2KI.dcm")).expect("RG1_J2KI"),
            false,
        ),
        ("phantom", phantom, true),
    ];
    let options = PreprocessOptions::default();
    for (name, bytes, lossless) in &files {
        let full = decode_contained(bytes, &limits, &secret).expect("full decode");
        let (reduced, _) =
            decode_for_model(bytes, &limits, &secret, &budget, all).expect("reduced");
        let (rows, cols) = full.samples.dim();
        let (r, c) = reduced.samples.dim();
        let factor = (rows as f64 / r as f64).log2().round() as u32;
        assert!(factor >= 1, "{name}: {rows}x{cols} was not reduced");
        assert_eq!(
            (r, c),
            (rows.div_ceil(1 << factor), cols.div_ceil(1 << factor)),
            "{name}"
        );
        assert!(
            r.min(c) >= 224,
            "{name}: {r}x{c} no longer covers the model input"
        );
        assert!(
            reduced
                .notes
                .iter()
                .any(|n| n.contains(&format!("1/{}", 1 << factor))),
            "{name}: {:?}",
            reduced.notes
        );
        // Identity: the codestream's, stable, and not the full decode's pixel hash.
        let identity = reduced.pixel_sha256();
        assert_eq!(reduced.identity.as_deref(), Some(identity.as_str()));
        assert_eq!(full.identity, None);
        assert_ne!(identity, full.pixel_sha256(), "{name}");
        let (again, _) = decode_for_model(bytes, &limits, &secret, &budget, all).expect("again");
        assert_eq!(
            again.pixel_sha256(),
            identity,
            "{name}: re-ingest is idempotent"
        );
        // The same facts (de-identified) as the full decode.
        assert_eq!(reduced.acquisition, full.acquisition, "{name}");
        assert_eq!(reduced.patient, full.patient, "{name}");
        // The model input: the wavelet's low band against the full image's area average.
        let a = preprocess(&full, &options);
        let b = preprocess(&reduced, &options);
        let mut diffs: Vec<f32> = a.iter().zip(b.iter()).map(|(x, y)| (x - y).abs()).collect();
        diffs.sort_by(f32::total_cmp);
        let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
        let p99 = diffs[diffs.len() * 99 / 100];
        let max = diffs[diffs.len() - 1];
        println!(
            "{name}: 1/{} decode, model input |diff| mean {mean:.4}, p99 {p99:.4}, max {max:.4} \
             (normalised units: display value / 0.25)",
            1 << factor
        );
        assert!(
            mean < 0.05 && p99 < 0.4,
            "{name}: mean {mean} p99 {p99} max {max}"
        );
        // By default (lossy only) a lossless frame keeps its full decode and pixel identity.
        let (kept, _) =
            decode_for_model(bytes, &limits, &secret, &budget, lossy_only).expect("default");
        assert_eq!(kept.identity.is_none(), *lossless, "{name}");
    }
    // Uncompressed files are never reduced.
    let uncompressed = std::fs::read(data.join("RG1_UNCR.dcm")).expect("RG1_UNCR");
    let (decoded, _) =
        decode_for_model(&uncompressed, &limits, &secret, &budget, all).expect("UNCR");
    assert_eq!(decoded.identity, None);
    assert_eq!(decoded.samples.dim(), (1955, 1841));
}

/// TXRV's preprocessing (`Pipeline::Torchxrayvision`) gives the tensor TorchXRayVision's own
/// `load_image` + `XRayCenterCrop` + `XRayResizer` give, on a real MONOCHROME1 radiograph
/// (RG1, 15 bits), a 16-bit phantom, an odd-sized one, one barely larger than the input (a
/// three-tap filter), one smaller than it (upsampled:
/// no anti-aliasing, zeros beyond the edge), an 8-bit PNG, at 224 and 512.
#[test]
fn torchxrayvision_preprocessing_matches_txrv() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut files = vec![cxrfed_e2e::pydicom_data_dir().join("RG1_UNCI.dcm")];
    for (i, columns) in [(0u64, 1024u32), (1, 777), (2, 160), (3, 300)] {
        let bytes = cxrfed_phantom::Generator::new(9, None)
            .expect("generator")
            .with_max_columns(Some(columns))
            .generate(i)
            .to_dicom()
            .expect("phantom");
        let path = dir.path().join(format!("phantom-{i}.dcm"));
        std::fs::write(&path, bytes).expect("write");
        files.push(path);
    }
    let png = dir.path().join("rg1.png");
    let helper = "tests/helpers/txrv_reference.py";
    let arg = |p: &std::path::Path| p.to_str().expect("utf-8").to_string();
    cxrfed_e2e::run_python(helper, &["png", &arg(&files[0]), &arg(&png)]);
    files.push(png);
    let limits = Limits {
        burned_in: cxrfed_imaging::BurnedInPolicy::Accept,
        ..Limits::default()
    };
    let secret = SiteSecret::from_bytes([7; 32]);
    for size in [224usize, 512] {
        let out = dir.path().join(format!("txrv-{size}"));
        std::fs::create_dir_all(&out).expect("dir");
        let mut args = vec!["tensor".to_string(), size.to_string(), arg(&out)];
        args.extend(files.iter().map(|f| arg(f)));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cxrfed_e2e::run_python(helper, &args);
        for (i, file) in files.iter().enumerate() {
            let bytes = std::fs::read(file).expect("read");
            let decoded = decode_contained(&bytes, &limits, &secret).expect("decode");
            let ours = cxrfed_imaging::txrv_input(&decoded, size);
            let theirs: Vec<f32> = std::fs::read(out.join(format!("{i}.f32")))
                .expect("reference")
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            assert_eq!(theirs.len(), size * size);
            let worst = ours
                .iter()
                .zip(&theirs)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            eprintln!(
                "{} at {size}: largest difference {worst:.2e} (of 2048)",
                file.display()
            );
            let (lo, hi) = ours
                .iter()
                .fold((f32::MAX, f32::MIN), |(a, b), v| (a.min(*v), b.max(*v)));
            assert!(
                hi - lo > 100.0,
                "{}: a flat input proves nothing",
                file.display()
            );
            // Bit-identical on this machine (2026-12); the bound leaves room for a numpy whose
            // exp or sum rounds differently in the last bit, far below one 8-bit grey level (8).
            assert!(worst <= 1e-3, "{} at {size}: {worst}", file.display());
        }
    }
}
