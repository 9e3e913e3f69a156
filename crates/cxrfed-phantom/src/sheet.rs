//! The contact sheet: one row per finding, one thumbnail per value, each drawn on the same
//! baseline chest with only that finding changed, for a person to look at.

use cxrfed_schema::{
    AorticKnob, CardiacContour, Category, ClavicleSymmetry, CostophrenicAngle, DiaphragmContour,
    DiaphragmPosition, HilarSize, ImageQuality, InterstitialMarkings, LungZone, Severity,
    SpineAlignment, VascularPattern,
};
use font8x8::UnicodeFonts;
use image::{GrayImage, Luma, imageops};

use crate::{Generator, PhantomError, Truth};

const THUMB: u32 = 176;
const CAPTION: u32 = 22;
const LABEL_WIDTH: u32 = 190;

/// The healthy, excellent-quality baseline every thumbnail starts from.
pub fn baseline() -> Truth {
    Truth {
        image_quality: ImageQuality::Excellent,
        rib_fracture: false,
        clavicle_symmetry: ClavicleSymmetry::Symmetric,
        spine_alignment: SpineAlignment::Normal,
        opacity_distribution: Vec::new(),
        opacity_severity: Severity::None,
        vascular_pattern: VascularPattern::Normal,
        interstitial_markings: InterstitialMarkings::Normal,
        hyperlucency: false,
        cardiac_contour: CardiacContour::Normal,
        cardiothoracic_ratio: 0.44,
        aortic_knob: AorticKnob::Normal,
        hilar_size: HilarSize::Normal,
        diaphragm_position: DiaphragmPosition::Normal,
        diaphragm_contour: DiaphragmContour::Smooth,
        costophrenic_angle: CostophrenicAngle::Normal,
    }
}

type Variant = (String, Truth);

fn variants_of<T: Category>(all: &[T], set: impl Fn(&mut Truth, T)) -> Vec<Variant> {
    all.iter()
        .map(|value| {
            let mut truth = baseline();
            set(&mut truth, *value);
            (value.as_str().to_string(), truth)
        })
        .collect()
}

fn boolean(set: impl Fn(&mut Truth, bool)) -> Vec<Variant> {
    [false, true]
        .into_iter()
        .map(|value| {
            let mut truth = baseline();
            set(&mut truth, value);
            (value.to_string(), truth)
        })
        .collect()
}

/// Every finding with an example truth for each of its values.
pub fn rows() -> Vec<(&'static str, Vec<Variant>)> {
    vec![
        (
            "image_quality",
            variants_of(ImageQuality::ALL, |t, v| t.image_quality = v),
        ),
        (
            "cardiac_contour",
            variants_of(CardiacContour::ALL, |t, v| {
                t.cardiac_contour = v;
                t.cardiothoracic_ratio = if v == CardiacContour::Enlarged {
                    0.62
                } else {
                    0.44
                };
            }),
        ),
        (
            "cardiothoracic_ratio",
            [0.38, 0.46, 0.54, 0.66]
                .into_iter()
                .map(|ratio| {
                    let mut truth = baseline();
                    truth.cardiothoracic_ratio = ratio;
                    if ratio > 0.5 {
                        truth.cardiac_contour = CardiacContour::Enlarged;
                    }
                    (format!("{ratio:.2}"), truth)
                })
                .collect(),
        ),
        (
            "aortic_knob",
            variants_of(AorticKnob::ALL, |t, v| t.aortic_knob = v),
        ),
        (
            "hilar_size",
            variants_of(HilarSize::ALL, |t, v| t.hilar_size = v),
        ),
        (
            "diaphragm_position",
            variants_of(DiaphragmPosition::ALL, |t, v| t.diaphragm_position = v),
        ),
        (
            "diaphragm_contour",
            variants_of(DiaphragmContour::ALL, |t, v| t.diaphragm_contour = v),
        ),
        (
            "costophrenic_angle",
            variants_of(CostophrenicAngle::ALL, |t, v| t.costophrenic_angle = v),
        ),
        (
            "opacity_severity",
            variants_of(Severity::ALL, |t, v| {
                t.opacity_severity = v;
                if v != Severity::None {
                    t.opacity_distribution = vec![LungZone::RightLower, LungZone::LeftMiddle];
                }
            }),
        ),
        (
            "opacity_distribution",
            LungZone::ALL
                .iter()
                .map(|zone| {
                    let mut truth = baseline();
                    truth.opacity_severity = Severity::Moderate;
                    truth.opacity_distribution = vec![*zone];
                    (zone.as_str().to_string(), truth)
                })
                .collect(),
        ),
        (
            "vascular_pattern",
            variants_of(VascularPattern::ALL, |t, v| t.vascular_pattern = v),
        ),
        (
            "interstitial_markings",
            variants_of(InterstitialMarkings::ALL, |t, v| {
                t.interstitial_markings = v
            }),
        ),
        (
            "hyperlucency",
            boolean(|t, v| {
                t.hyperlucency = v;
                if v {
                    t.diaphragm_position = DiaphragmPosition::Depressed;
                }
            }),
        ),
        ("rib_fracture", boolean(|t, v| t.rib_fracture = v)),
        (
            "clavicle_symmetry",
            variants_of(ClavicleSymmetry::ALL, |t, v| t.clavicle_symmetry = v),
        ),
        (
            "spine_alignment",
            variants_of(SpineAlignment::ALL, |t, v| t.spine_alignment = v),
        ),
    ]
}

fn draw_text(canvas: &mut GrayImage, x: u32, y: u32, text: &str, scale: u32) {
    for (i, ch) in text.chars().enumerate() {
        let Some(glyph) = font8x8::BASIC_FONTS.get(ch) else {
            continue;
        };
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                if bits & (1 << col) != 0 {
                    for dy in 0..scale {
                        for dx in 0..scale {
                            let px = x + (i as u32 * 8 + col) * scale + dx;
                            let py = y + row as u32 * scale + dy;
                            if px < canvas.width() && py < canvas.height() {
                                canvas.put_pixel(px, py, Luma([255]));
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Renders the sheet: every finding value drawn on the baseline chest of `seed`.
pub fn contact_sheet(seed: u64) -> Result<GrayImage, PhantomError> {
    let generator = Generator::new(seed, Some("university"))?.with_max_columns(Some(THUMB));
    let rows = rows();
    let columns = rows.iter().map(|(_, v)| v.len()).max().unwrap_or(1) as u32;
    let cell_h = THUMB + THUMB / 5 + CAPTION;
    let header = 40;
    let width = LABEL_WIDTH + columns * (THUMB + 8);
    let height = header + rows.len() as u32 * (cell_h + 8);
    let mut canvas = GrayImage::from_pixel(width, height, Luma([24]));
    draw_text(
        &mut canvas,
        8,
        10,
        "cxrfed phantoms: one finding changed per thumbnail (synthetic, not patient data)",
        2,
    );
    for (r, (field, variants)) in rows.iter().enumerate() {
        let y = header + r as u32 * (cell_h + 8);
        draw_text(&mut canvas, 6, y + THUMB / 2, field, 1);
        for (c, (label, truth)) in variants.iter().enumerate() {
            let phantom = generator.generate_with(0, truth.clone());
            let display = phantom.display_u8();
            let thumb = imageops::resize(
                &display,
                THUMB,
                THUMB * display.height() / display.width(),
                imageops::FilterType::Triangle,
            );
            let x = LABEL_WIDTH + c as u32 * (THUMB + 8);
            imageops::replace(&mut canvas, &thumb, i64::from(x), i64::from(y));
            draw_text(&mut canvas, x, y + thumb.height() + 4, label, 1);
        }
    }
    Ok(canvas)
}
