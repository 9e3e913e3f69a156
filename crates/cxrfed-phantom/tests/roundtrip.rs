//! Every profile's DICOM files decode through cxrfed-imaging to exactly the samples and hash
//! the generator recorded, and de-identification strips the identifiers it wrote.

use cxrfed_imaging::{Limits, Samples, SiteSecret};
use cxrfed_phantom::{Encoding, Generator, PROFILES, Variants};

#[test]
fn every_profile_round_trips_through_the_decoder() {
    let secret = SiteSecret::from_bytes([7; 32]);
    for site in PROFILES {
        let generator = Generator::new(11, Some(site.name))
            .expect("profile")
            .with_max_columns(Some(300));
        for index in 0..2 {
            let phantom = generator.generate(index);
            let bytes = phantom.to_dicom().expect("write DICOM");
            let decoded = cxrfed_imaging::decode(&bytes, &Limits::default(), &secret)
                .unwrap_or_else(|e| panic!("{} #{index} ({:?}): {e}", site.name, phantom.encoding));
            assert_eq!(
                decoded.source.transfer_syntax_uid,
                phantom.encoding.transfer_syntax_uid()
            );
            assert_eq!(decoded.source.rows as usize, phantom.rows);
            match &decoded.samples {
                Samples::U16(a) => {
                    let got: Vec<u16> = a.iter().copied().collect();
                    assert!(
                        got == phantom.samples,
                        "{} {:?}: samples differ",
                        site.name,
                        phantom.encoding
                    );
                }
                other => panic!("unexpected sample type {:?}", other.dim()),
            }
            assert_eq!(decoded.pixel_sha256(), phantom.image_sha256());
            assert_eq!(decoded.acquisition.view.as_str(), phantom.header.view);
            assert!(!decoded.patient.pseudonym.is_empty());
            let json =
                serde_json::to_string(&(&decoded.source, &decoded.patient, &decoded.acquisition))
                    .expect("json");
            for identifier in [
                &phantom.header.patient_id,
                &phantom.header.patient_name,
                &phantom.header.accession,
            ] {
                assert!(!json.contains(identifier.as_str()), "{identifier} leaked");
            }
        }
    }
}

#[test]
fn all_encodings_are_exercised_by_the_profiles() {
    let mut seen = Vec::new();
    for site in PROFILES {
        seen.extend_from_slice(site.encodings);
    }
    for encoding in [
        Encoding::RleLossless,
        Encoding::JpegLossless,
        Encoding::Jpeg2000Lossless,
        Encoding::ExplicitLittle,
        Encoding::ImplicitLittle,
    ] {
        assert!(seen.contains(&encoding), "{encoding:?}");
    }
}

#[test]
fn folder_has_labels_for_every_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let generator = Generator::new(3, None)
        .expect("mix")
        .with_max_columns(Some(200));
    let summary = cxrfed_phantom::write_folder(
        &generator,
        dir.path(),
        8,
        Variants {
            png: true,
            jpeg: true,
        },
        2,
        &|_| {},
    )
    .expect("write folder");
    assert_eq!(summary.files, 24);
    let labels: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&summary.labels_json).expect("read")).expect("json");
    let images = labels["images"].as_array().expect("images");
    assert_eq!(images.len(), 24);
    let secret = SiteSecret::from_bytes([1; 32]);
    for row in images {
        let file = row["file"].as_str().expect("file");
        let bytes = std::fs::read(dir.path().join(file)).expect("file exists");
        let decoded = cxrfed_imaging::decode(&bytes, &Limits::default(), &secret).expect("decodes");
        assert_eq!(
            decoded.pixel_sha256(),
            row["image_sha256"].as_str().expect("hash"),
            "{file}"
        );
        assert_eq!(
            row["labels"].as_object().expect("labels").len(),
            cxrfed_phantom::LABEL_FIELDS.len()
        );
    }
    let csv = std::fs::read_to_string(&summary.labels_csv).expect("csv");
    assert_eq!(csv.lines().count(), 25);
    // Same seed, same bytes.
    let again = tempfile::tempdir().expect("tempdir");
    cxrfed_phantom::write_folder(&generator, again.path(), 8, Variants::default(), 1, &|_| {})
        .expect("write");
    let a = std::fs::read(dir.path().join("university-00000.dcm")).expect("a");
    let b = std::fs::read(again.path().join("university-00000.dcm")).expect("b");
    assert_eq!(a, b);
}

#[test]
fn contact_sheet_renders() {
    let sheet = cxrfed_phantom::sheet::contact_sheet(1).expect("sheet");
    assert!(sheet.width() > 1000 && sheet.height() > 1000);
    if let Ok(path) = std::env::var("CXRFED_WRITE_SHEET") {
        sheet.save(path).expect("save sheet");
    }
}
