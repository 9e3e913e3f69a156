//! Synthetic chest X-ray phantoms with exact ground truth for every schema-v1 finding.
//!
//! No labelled chest X-ray data can be downloaded where cxrfed is built, so the project makes
//! its own: [`Generator`] draws a chest (rib cage, clavicles, spine, lungs, heart, aortic knob,
//! hila, diaphragm domes, costophrenic angles) with each finding drawn the way it looks on film
//! (the table is in [`render`]), applies the acquisition faults that set image quality, maps
//! the result through a site's detector (contrast curve, bit depth, MONOCHROME1/2, resolution)
//! and writes a real DICOM file with realistic headers — patient identifiers included, because
//! de-identification must strip them.
//!
//! Everything is deterministic from `(seed, site, index)`: the same call gives byte-identical
//! files on every machine.
//!
//! This crate must not depend on gRPC (tonic) or storage (sled).
//!
//! Architecture invariant: cxrfed-phantom depends on neither tonic, sled nor tch: it only
//! writes files.

pub mod codec;
mod dicom;
mod j2k;
pub mod profile;
pub mod render;
pub mod sheet;
mod truth;

use std::io::Write;
use std::path::{Path, PathBuf};

use cxrfed_schema::{
    AorticKnob, CardiacContour, ClavicleSymmetry, CostophrenicAngle, DiaphragmContour,
    DiaphragmPosition, HilarSize, ImageQuality, InterstitialMarkings, LungZone, Severity,
    SpineAlignment, VascularPattern,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, StandardNormal};
use serde::Serialize;
use sha2::{Digest, Sha256};

pub use profile::{Encoding, PROFILES, SiteProfile, profile, profile_names};
pub use render::{DensityMap, Faults};
pub use truth::{LABEL_FIELDS, Truth};

#[derive(Debug, thiserror::Error)]
pub enum PhantomError {
    #[error("unknown site profile {0:?} (known: {1})")]
    UnknownProfile(String, String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("cannot encode pixel data: {0}")]
    Encode(String),
    #[error("cannot write DICOM: {0}")]
    Dicom(String),
    #[error("cannot write labels: {0}")]
    Labels(String),
    #[error("cannot write image: {0}")]
    Image(#[from] image::ImageError),
}

/// De-identifiable patient and study facts written into the header.
#[derive(Debug, Clone, PartialEq)]
pub struct PatientHeader {
    pub patient_id: String,
    pub patient_name: String,
    pub birth_date: chrono::NaiveDate,
    pub sex: &'static str,
    pub age: u32,
    pub accession: String,
    pub study_date: chrono::NaiveDate,
    pub view: &'static str,
}

/// One generated phantom: truth, header facts and the stored pixel samples.
#[derive(Debug, Clone)]
pub struct Phantom {
    pub index: u64,
    pub site: &'static SiteProfile,
    pub truth: Truth,
    pub faults: Faults,
    pub header: PatientHeader,
    pub rows: usize,
    pub columns: usize,
    pub bits_stored: u16,
    pub monochrome1: bool,
    pub encoding: Encoding,
    /// Stored values (MONOCHROME1 already inverted), row-major.
    pub samples: Vec<u16>,
    /// Seed-derived UID root for the study/series/instance.
    pub uid_root: String,
}

impl Phantom {
    /// The hash the node computes for the decoded DICOM pixels (see
    /// `cxrfed_imaging::Decoded::pixel_sha256`).
    pub fn image_sha256(&self) -> String {
        pixel_hash(b"u16", self.rows, self.columns, |hasher| {
            for chunk in self.samples.chunks(8192) {
                let bytes: Vec<u8> = chunk.iter().flat_map(|s| s.to_le_bytes()).collect();
                hasher.update(&bytes);
            }
        })
    }

    /// An 8-bit display rendering (window over the full range, MONOCHROME1 inverted back).
    pub fn display_u8(&self) -> image::GrayImage {
        let max = f32::from(((1u32 << self.bits_stored) - 1) as u16);
        let pixels = self
            .samples
            .iter()
            .map(|&s| {
                let value = f32::from(s) / max;
                let value = if self.monochrome1 { 1.0 - value } else { value };
                (value * 255.0).round().clamp(0.0, 255.0) as u8
            })
            .collect();
        image::GrayImage::from_raw(self.columns as u32, self.rows as u32, pixels)
            .expect("buffer matches dimensions")
    }

    /// The DICOM Part 10 file.
    pub fn to_dicom(&self) -> Result<Vec<u8>, PhantomError> {
        dicom::write(self)
    }
}

/// The pixel hash of cxrfed-imaging, for samples fed by `feed`.
fn pixel_hash(kind: &[u8], rows: usize, columns: usize, feed: impl FnOnce(&mut Sha256)) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"cxrfed-pixels-v1\0");
    hasher.update(kind);
    hasher.update((rows as u64).to_le_bytes());
    hasher.update((columns as u64).to_le_bytes());
    feed(&mut hasher);
    hex::encode(hasher.finalize())
}

/// The hash the node computes for an 8-bit grayscale PNG/JPEG variant.
pub fn gray8_sha256(image: &image::GrayImage) -> String {
    pixel_hash(
        b"u8",
        image.height() as usize,
        image.width() as usize,
        |h| h.update(image.as_raw()),
    )
}

/// Draws phantoms for one site (or a mix) from a seed.
#[derive(Debug, Clone)]
pub struct Generator {
    seed: u64,
    sites: Vec<&'static SiteProfile>,
    /// Caps the detector width (keeps the aspect ratio); for quick experiments and tests.
    max_columns: Option<u32>,
    /// Overrides the profiles' transfer syntaxes.
    encoding: Option<Encoding>,
}

impl Generator {
    /// `site = None` mixes all profiles (image `i` comes from profile `i mod n`).
    pub fn new(seed: u64, site: Option<&str>) -> Result<Generator, PhantomError> {
        let sites = match site {
            None => PROFILES.iter().collect(),
            Some(name) => {
                let mut sites = Vec::new();
                for part in name.split(',') {
                    sites.push(profile(part.trim()).ok_or_else(|| {
                        PhantomError::UnknownProfile(part.to_string(), profile_names().join(", "))
                    })?);
                }
                sites
            }
        };
        Ok(Generator {
            seed,
            sites,
            max_columns: None,
            encoding: None,
        })
    }

    pub fn with_max_columns(mut self, max_columns: Option<u32>) -> Self {
        self.max_columns = max_columns;
        self
    }

    /// Writes every image with `encoding` instead of the profile's transfer syntaxes.
    pub fn with_encoding(mut self, encoding: Option<Encoding>) -> Self {
        self.encoding = encoding;
        self
    }

    fn rng(&self, index: u64, stream: u64) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0x5eed_c0de_cafe_f00d);
        rng.set_stream(stream);
        rng.set_word_pos(u128::from(index) << 20);
        let mut child = ChaCha8Rng::from_rng(&mut rng);
        child.set_stream(index);
        child
    }

    pub fn site_of(&self, index: u64) -> &'static SiteProfile {
        self.sites[(index % self.sites.len() as u64) as usize]
    }

    /// Samples the truth of image `index` from its site's case mix.
    pub fn truth(&self, index: u64) -> Truth {
        sample_truth(self.site_of(index), &mut self.rng(index, 1))
    }

    /// Generates image `index`.
    pub fn generate(&self, index: u64) -> Phantom {
        let truth = self.truth(index);
        self.generate_with(index, truth)
    }

    /// Generates image `index` with a given truth (used by the contact sheet and tests).
    pub fn generate_with(&self, index: u64, truth: Truth) -> Phantom {
        let site = self.site_of(index);
        let mut rng = self.rng(index, 2);
        let header = self.header(site, index, &mut rng);
        let faults = Faults::sample(truth.image_quality, site.noise, &mut rng);
        let aspect = rng.random_range(site.aspect.0..=site.aspect.1) as f32;
        let map = render::render(&truth, aspect, header.view == "AP", &faults, &mut rng);
        let mut columns = rng.random_range(site.columns.0..=site.columns.1);
        if let Some(cap) = self.max_columns {
            columns = columns.min(cap.max(64));
        }
        let rows = (columns as f32 * aspect).round() as u32;
        let bits_stored = site.bits_stored[rng.random_range(0..site.bits_stored.len())];
        let profile_encoding = site.encodings[rng.random_range(0..site.encodings.len())];
        let encoding = self.encoding.unwrap_or(profile_encoding);
        let samples = detector(
            &map,
            rows as usize,
            columns as usize,
            site,
            bits_stored,
            &mut rng,
        );
        Phantom {
            index,
            site,
            truth,
            faults,
            header,
            rows: rows as usize,
            columns: columns as usize,
            bits_stored,
            monochrome1: site.monochrome1,
            encoding,
            samples,
            uid_root: format!(
                "2.25.{}",
                u128::from(self.seed) << 64 | u128::from(index) << 8
            ),
        }
    }

    fn header(&self, site: &SiteProfile, index: u64, rng: &mut ChaCha8Rng) -> PatientHeader {
        // Some films are follow-ups of an earlier patient of the same run.
        let patient = if index > 0 && rng.random_bool(site.repeat_share) {
            index - rng.random_range(1..=index.min(12))
        } else {
            index
        };
        let mut prng = self.rng(patient, 3);
        let age_normal = Normal::new(site.age.0, site.age.1).expect("valid age distribution");
        let age = age_normal.sample(&mut prng).round().clamp(18.0, 95.0) as u32;
        let sex = if prng.random_bool(site.female_share) {
            "F"
        } else {
            "M"
        };
        let study_date = chrono::NaiveDate::from_ymd_opt(2024, 1, 1).expect("valid date")
            + chrono::Days::new(rng.random_range(0..730));
        let birth_date =
            study_date - chrono::Days::new(u64::from(age) * 365 + prng.random_range(0..360));
        let view = if rng.random_bool(site.ap_share) {
            "AP"
        } else {
            "PA"
        };
        PatientHeader {
            patient_id: format!(
                "PH{}-{:08}",
                site.name.to_uppercase(),
                self.seed * 1_000_003 + patient
            ),
            patient_name: format!("PHANTOM^{}^{patient}", site.name.to_uppercase()),
            birth_date,
            sex,
            age,
            accession: format!(
                "ACC{:010}",
                self.seed.wrapping_mul(7919).wrapping_add(index) % 10_000_000_000
            ),
            study_date,
            view,
        }
    }
}

fn pick<T: Copy>(rng: &mut impl Rng, mix: &[f64], values: &[T]) -> T {
    debug_assert_eq!(mix.len(), values.len());
    let total: f64 = mix.iter().sum();
    let mut x = rng.random_range(0.0..total);
    for (p, value) in mix.iter().zip(values) {
        if x < *p {
            return *value;
        }
        x -= p;
    }
    values[values.len() - 1]
}

/// `yes` with probability `p`, otherwise `no`.
fn either<T>(rng: &mut impl Rng, p: f64, yes: T, no: T) -> T {
    if rng.random_bool(p) { yes } else { no }
}

/// Samples every finding from the site's prevalences, keeping the findings consistent
/// (hyperlucent lungs have depressed domes; zones exist exactly when severity is not none;
/// the ratio sits clearly on its side of 0.5).
pub fn sample_truth(site: &SiteProfile, rng: &mut impl Rng) -> Truth {
    let cardiac_contour = pick(rng, site.cardiac, CardiacContour::ALL);
    let cardiothoracic_ratio = match cardiac_contour {
        CardiacContour::Normal => rng.random_range(0.36..0.48),
        CardiacContour::Enlarged => rng.random_range(0.52..0.68),
        CardiacContour::Indistinct => rng.random_range(0.38..0.62),
    };
    let hyperlucency = rng.random_bool(site.hyperlucency);
    let diaphragm_position = if hyperlucency {
        DiaphragmPosition::Depressed
    } else {
        pick(rng, site.diaphragm, DiaphragmPosition::ALL)
    };
    let opacity_severity = pick(rng, site.opacity, Severity::ALL);
    let mut opacity_distribution = Vec::new();
    if opacity_severity != Severity::None {
        // Extent grows with severity: mild is focal, severe is multifocal and confluent.
        let count = match opacity_severity {
            Severity::Mild => 1,
            Severity::Moderate => 2,
            _ => rng.random_range(3..=4),
        };
        while opacity_distribution.len() < count {
            let zone = LungZone::ALL[rng.random_range(0..LungZone::ALL.len())];
            if !opacity_distribution.contains(&zone) {
                opacity_distribution.push(zone);
            }
        }
        opacity_distribution.sort_by_key(|z| LungZone::ALL.iter().position(|a| a == z));
    }
    Truth {
        image_quality: pick(rng, site.quality, ImageQuality::ALL),
        rib_fracture: rng.random_bool(site.rib_fracture),
        clavicle_symmetry: either(
            rng,
            site.clavicle_asymmetry,
            ClavicleSymmetry::Asymmetric,
            ClavicleSymmetry::Symmetric,
        ),
        spine_alignment: either(
            rng,
            site.scoliosis,
            SpineAlignment::Scoliotic,
            SpineAlignment::Normal,
        ),
        opacity_distribution,
        opacity_severity,
        vascular_pattern: pick(rng, site.vascular, VascularPattern::ALL),
        interstitial_markings: either(
            rng,
            site.interstitial,
            InterstitialMarkings::Prominent,
            InterstitialMarkings::Normal,
        ),
        hyperlucency,
        cardiac_contour,
        cardiothoracic_ratio,
        aortic_knob: either(
            rng,
            site.aortic_prominent,
            AorticKnob::Prominent,
            AorticKnob::Normal,
        ),
        hilar_size: either(
            rng,
            site.hilar_enlarged,
            HilarSize::Enlarged,
            HilarSize::Normal,
        ),
        diaphragm_position,
        diaphragm_contour: either(
            rng,
            site.diaphragm_irregular,
            DiaphragmContour::Irregular,
            DiaphragmContour::Smooth,
        ),
        costophrenic_angle: pick(rng, site.costophrenic, CostophrenicAngle::ALL),
    }
}

/// Maps the density map onto the detector: bilinear upsampling to `rows x columns`, the
/// site's latitude and contrast curve, fine detector noise, quantisation to `bits` and
/// MONOCHROME1 inversion.
fn detector(
    map: &DensityMap,
    rows: usize,
    columns: usize,
    site: &SiteProfile,
    bits: u16,
    rng: &mut ChaCha8Rng,
) -> Vec<u16> {
    let max = ((1u32 << bits) - 1) as f32;
    let (lo, hi) = (site.latitude.0 as f32, site.latitude.1 as f32);
    let gamma = site.gamma as f32;
    // Contrast curve as a table over the density range [-0.5, 1.5].
    const TABLE: usize = 4096;
    let curve: Vec<f32> = (0..TABLE)
        .map(|i| {
            let d = -0.5 + 2.0 * i as f32 / (TABLE - 1) as f32;
            ((d - lo) / (hi - lo)).clamp(0.0, 1.0).powf(gamma)
        })
        .collect();
    let noise = site.pixel_noise as f32;
    let sx = map.width as f32 / columns as f32;
    let sy = map.height as f32 / rows as f32;
    let mut out = Vec::with_capacity(rows * columns);
    for y in 0..rows {
        let fy = ((y as f32 + 0.5) * sy - 0.5).clamp(0.0, (map.height - 1) as f32);
        let y0 = fy.floor() as usize;
        let y1 = (y0 + 1).min(map.height - 1);
        let wy = fy - y0 as f32;
        let (r0, r1) = (&map.data[y0 * map.width..], &map.data[y1 * map.width..]);
        for x in 0..columns {
            let fx = ((x as f32 + 0.5) * sx - 0.5).clamp(0.0, (map.width - 1) as f32);
            let x0 = fx.floor() as usize;
            let x1 = (x0 + 1).min(map.width - 1);
            let wx = fx - x0 as f32;
            let top = r0[x0] + (r0[x1] - r0[x0]) * wx;
            let bottom = r1[x0] + (r1[x1] - r1[x0]) * wx;
            let d = top + (bottom - top) * wy;
            let index = (((d + 0.5) / 2.0) * (TABLE - 1) as f32).clamp(0.0, (TABLE - 1) as f32);
            let jitter: f32 = rng.sample(StandardNormal);
            let value = (curve[index as usize] + noise * jitter).clamp(0.0, 1.0);
            let stored = (value * max).round() as u16;
            out.push(if site.monochrome1 {
                max as u16 - stored
            } else {
                stored
            });
        }
    }
    out
}

/// One row of the labels file.
#[derive(Debug, Clone, Serialize)]
pub struct LabelRow {
    pub file: String,
    pub image_sha256: String,
    pub site: String,
    pub format: String,
    pub view: String,
    pub sex: String,
    pub age: u32,
    pub labels: serde_json::Map<String, serde_json::Value>,
}

/// What [`write_folder`] writes besides DICOM.
#[derive(Debug, Clone, Copy, Default)]
pub struct Variants {
    pub png: bool,
    pub jpeg: bool,
}

/// Summary of a written folder.
#[derive(Debug, Clone)]
pub struct FolderSummary {
    pub images: usize,
    pub files: usize,
    pub bytes: u64,
    pub labels_json: PathBuf,
    pub labels_csv: PathBuf,
}

/// Writes `count` phantoms (`DIR/<site>-<index>.dcm`, plus variants) and `labels.json` /
/// `labels.csv` with one row per written image file. Images are generated on `threads`
/// threads; the output does not depend on the thread count.
pub fn write_folder(
    generator: &Generator,
    out: &Path,
    count: u64,
    variants: Variants,
    threads: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<FolderSummary, PhantomError> {
    std::fs::create_dir_all(out)?;
    let threads = threads.max(1);
    let done = std::sync::atomic::AtomicU64::new(0);
    let results: Vec<Result<(Vec<LabelRow>, u64), PhantomError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|worker| {
                let done = &done;
                scope.spawn(move || {
                    let mut rows = Vec::new();
                    let mut bytes = 0u64;
                    for index in (worker as u64..count).step_by(threads) {
                        let phantom = generator.generate(index);
                        let (new_rows, written) = write_one(&phantom, out, variants)?;
                        rows.extend(new_rows);
                        bytes += written;
                        progress(done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1);
                    }
                    Ok((rows, bytes))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(PhantomError::Encode("generator thread panicked".into()))
                })
            })
            .collect()
    });
    let mut rows = Vec::new();
    let mut bytes = 0;
    for result in results {
        let (r, b) = result?;
        rows.extend(r);
        bytes += b;
    }
    rows.sort_by(|a, b| a.file.cmp(&b.file));
    let labels_json = out.join("labels.json");
    let labels_csv = out.join("labels.csv");
    let document = serde_json::json!({
        "generator": "cxrfed-phantom",
        "schema_version": cxrfed_schema::SCHEMA_VERSION,
        "seed": generator.seed,
        "sites": generator.sites.iter().map(|s| s.name).collect::<Vec<_>>(),
        "note": "synthetic phantoms with exact ground truth; not patient data",
        "images": rows,
    });
    write_atomic(
        &labels_json,
        &serde_json::to_vec_pretty(&document).map_err(|e| PhantomError::Labels(e.to_string()))?,
    )?;
    let mut csv_out = csv::Writer::from_writer(Vec::new());
    let mut header = vec![
        "file",
        "image_sha256",
        "site",
        "format",
        "view",
        "sex",
        "age",
    ];
    header.extend(LABEL_FIELDS);
    csv_out
        .write_record(&header)
        .map_err(|e| PhantomError::Labels(e.to_string()))?;
    for row in &rows {
        let mut record = vec![
            row.file.clone(),
            row.image_sha256.clone(),
            row.site.clone(),
            row.format.clone(),
            row.view.clone(),
            row.sex.clone(),
            row.age.to_string(),
        ];
        record.extend(truth::csv_cells(&row.labels));
        csv_out
            .write_record(&record)
            .map_err(|e| PhantomError::Labels(e.to_string()))?;
    }
    let csv_bytes = csv_out
        .into_inner()
        .map_err(|e| PhantomError::Labels(e.to_string()))?;
    write_atomic(&labels_csv, &csv_bytes)?;
    Ok(FolderSummary {
        images: count as usize,
        files: rows.len(),
        bytes,
        labels_json,
        labels_csv,
    })
}

fn write_one(
    phantom: &Phantom,
    out: &Path,
    variants: Variants,
) -> Result<(Vec<LabelRow>, u64), PhantomError> {
    let stem = format!("{}-{:05}", phantom.site.name, phantom.index);
    let labels = phantom.truth.labels();
    let row = |file: String, hash: String, format: &str| LabelRow {
        file,
        image_sha256: hash,
        site: phantom.site.name.to_string(),
        format: format.to_string(),
        view: phantom.header.view.to_string(),
        sex: phantom.header.sex.to_string(),
        age: phantom.header.age,
        labels: labels.clone(),
    };
    let dicom = phantom.to_dicom()?;
    let mut bytes = dicom.len() as u64;
    write_atomic(&out.join(format!("{stem}.dcm")), &dicom)?;
    let mut rows = vec![row(format!("{stem}.dcm"), phantom.image_sha256(), "dicom")];
    if variants.png || variants.jpeg {
        let display = phantom.display_u8();
        if variants.png {
            let path = out.join(format!("{stem}.png"));
            display.save_with_format(&path, image::ImageFormat::Png)?;
            bytes += std::fs::metadata(&path)?.len();
            rows.push(row(format!("{stem}.png"), gray8_sha256(&display), "png"));
        }
        if variants.jpeg {
            let path = out.join(format!("{stem}.jpg"));
            let mut buf = Vec::new();
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, 95)
                .encode_image(&display)?;
            write_atomic(&path, &buf)?;
            bytes += buf.len() as u64;
            // A JPEG decodes to slightly different pixels than it was made from: hash the decode.
            let decoded = image::load_from_memory(&buf)?.to_luma8();
            rows.push(row(format!("{stem}.jpg"), gray8_sha256(&decoded), "jpeg"));
        }
    }
    Ok((rows, bytes))
}

/// Writes through a temporary file and a rename, so a crash never leaves a half file.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), PhantomError> {
    let mut file = tempfile::NamedTempFile::new_in(path.parent().unwrap_or(Path::new(".")))?;
    file.write_all(bytes)?;
    file.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_deterministic() {
        let generator = Generator::new(7, Some("community"))
            .expect("profile")
            .with_max_columns(Some(256));
        let a = generator.generate(3);
        let b = generator.generate(3);
        assert_eq!(a.samples, b.samples);
        assert_eq!(a.truth, b.truth);
        assert_eq!(a.header, b.header);
        let c = generator.generate(4);
        assert_ne!(a.samples, c.samples);
    }

    #[test]
    fn truth_is_consistent() {
        let generator = Generator::new(1, None).expect("profiles");
        for index in 0..400 {
            let truth = generator.truth(index);
            assert_eq!(
                truth.opacity_distribution.is_empty(),
                truth.opacity_severity == Severity::None
            );
            if truth.hyperlucency {
                assert_eq!(truth.diaphragm_position, DiaphragmPosition::Depressed);
            }
            match truth.cardiac_contour {
                CardiacContour::Normal => assert!(truth.cardiothoracic_ratio < 0.5),
                CardiacContour::Enlarged => assert!(truth.cardiothoracic_ratio > 0.5),
                CardiacContour::Indistinct => {}
            }
        }
    }

    #[test]
    fn unknown_profile_is_named() {
        let err = Generator::new(1, Some("mars")).expect_err("unknown");
        assert!(err.to_string().contains("university"), "{err}");
    }
}
