//! Drawing a phantom: anatomy and findings as a density map, then the acquisition faults.
//!
//! Coordinates are normalised: `u` runs left to right across the image (image left is the
//! patient's right on a PA film), `v` top to bottom, both in [0, 1]. The map holds radiographic
//! density (bright = dense, as on a MONOCHROME2 film), about 0 for air outside the body and
//! about 1 for bone over soft tissue. It is drawn at a fixed working width and upsampled by the
//! writer, so a phantom's content does not depend on the detector resolution.
//!
//! How each finding is drawn:
//!
//! | finding | drawing |
//! | --- | --- |
//! | cardiothoracic_ratio | heart shadow width = ratio x inner thoracic width (lateral lung walls) |
//! | cardiac_contour | enlarged when the ratio is >= 0.5 (0.52-0.68 drawn, normal 0.36-0.48); indistinct: heart border blurred over 5% of the width with perihilar haze |
//! | aortic_knob | bulge left of the upper mediastinum, radius 0.028 (normal) or 0.05 (prominent) |
//! | hilar_size | hilar blobs radius 0.03 (normal) or 0.055 (enlarged) |
//! | diaphragm position | dome apex at v 0.68 (normal), 0.58 (elevated), 0.79 and flattened (depressed) |
//! | diaphragm contour | scalloped dome edge (irregular) instead of a smooth parabola |
//! | costophrenic_angle | a fluid meniscus rising along the lateral wall fills the angle on the blunted side(s) |
//! | opacity zones / severity | mottled blobs in each chosen zone (upper/middle/lower x right/left); size, density and extent grow with severity (mild: one zone, moderate: two, severe: three or four, confluent) |
//! | rib_fracture | one posterior rib interrupted by a gap with a step offset |
//! | interstitial_markings | reticular network over both lungs (prominent) or faint (normal) |
//! | hyperlucency | darker lungs and flat, depressed domes |
//! | vascular_pattern | number, length and density of vessels fanning from the hila |
//! | clavicle_symmetry | rotation: medial clavicle ends off-centre from the spine and one clavicle higher |
//! | spine_alignment | spine follows a lateral S/C curve (scoliotic) instead of a straight line |
//! | image_quality | structured noise and blur grow from excellent to poor; poor adds under-exposure or a collimator cutting off lung |

use cxrfed_schema::{
    AorticKnob, CardiacContour, ClavicleSymmetry, CostophrenicAngle, DiaphragmContour,
    DiaphragmPosition, HilarSize, ImageQuality, InterstitialMarkings, LungZone, Severity,
    SpineAlignment, VascularPattern,
};
use rand::Rng;
use rand_distr::{Distribution, Normal};

use crate::Truth;

/// Width of the working density map in pixels.
pub const WORK_WIDTH: usize = 512;

/// A density map at working resolution.
#[derive(Debug, Clone)]
pub struct DensityMap {
    pub width: usize,
    pub height: usize,
    pub data: Vec<f32>,
}

fn smooth01(x: f32) -> f32 {
    let x = x.clamp(0.0, 1.0);
    x * x * (3.0 - 2.0 * x)
}

/// Soft inside-ness of a signed distance `d` (positive inside) with an edge `width`.
fn soft(d: f32, width: f32) -> f32 {
    smooth01(0.5 + d / width)
}

/// Hash-based value noise in [0, 1] on a lattice of `scale` cells per unit.
fn value_noise(u: f32, v: f32, scale: f32, salt: u32) -> f32 {
    fn hash(x: i32, y: i32, salt: u32) -> f32 {
        let mut h = (x as u32).wrapping_mul(0x8da6_b343)
            ^ (y as u32).wrapping_mul(0xd816_3841)
            ^ salt.wrapping_mul(0xcb1a_b31f);
        h ^= h >> 13;
        h = h.wrapping_mul(0x5bd1_e995);
        h ^= h >> 15;
        (h & 0xffff) as f32 / 65535.0
    }
    let (x, y) = (u * scale, v * scale);
    let (x0, y0) = (x.floor(), y.floor());
    let (fx, fy) = (smooth01(x - x0), smooth01(y - y0));
    let (ix, iy) = (x0 as i32, y0 as i32);
    let a = hash(ix, iy, salt);
    let b = hash(ix + 1, iy, salt);
    let c = hash(ix, iy + 1, salt);
    let d = hash(ix + 1, iy + 1, salt);
    let top = a + (b - a) * fx;
    let bottom = c + (d - c) * fx;
    top + (bottom - top) * fy
}

/// Distance from a point to a segment.
fn segment_distance(p: (f32, f32), a: (f32, f32), b: (f32, f32)) -> (f32, f32) {
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let len2 = dx * dx + dy * dy;
    let t = if len2 > 0.0 {
        (((p.0 - a.0) * dx + (p.1 - a.1) * dy) / len2).clamp(0.0, 1.0)
    } else {
        0.0
    };
    let (qx, qy) = (a.0 + t * dx - p.0, a.1 + t * dy - p.1);
    ((qx * qx + qy * qy).sqrt(), t)
}

#[derive(Debug, Clone)]
struct Vessel {
    a: (f32, f32),
    b: (f32, f32),
    width: f32,
    bbox: (f32, f32, f32, f32),
}

#[derive(Debug, Clone)]
struct Blob {
    u: f32,
    v: f32,
    radius: f32,
    amplitude: f32,
}

/// The geometry of one phantom, derived from its truth and a little anatomical variation.
#[derive(Debug, Clone)]
struct Scene {
    aspect: f32,
    cx: f32,
    spine_shift: f32,
    half_thorax: f32,
    apex: f32,
    dome: [f32; 2],
    dome_curvature: f32,
    dome_scallop: f32,
    scallop_phase: f32,
    heart_center: (f32, f32),
    heart_axes: (f32, f32),
    heart_edge: f32,
    heart_haze: f32,
    knob_radius: f32,
    hilum_radius: f32,
    air: f32,
    scoliosis: f32,
    clavicle_rotation: f32,
    clavicle_drop: [f32; 2],
    fracture: Option<(usize, usize, f32)>,
    fluid: [f32; 2],
    blobs: Vec<Blob>,
    reticular: f32,
    vessels: Vec<Vessel>,
    vessel_density: f32,
    ap: bool,
    salt: u32,
}

/// Side index 0 is the image left (patient right), 1 the image right (patient left).
const SIDES: [f32; 2] = [-1.0, 1.0];

impl Scene {
    fn new(truth: &Truth, aspect: f32, ap: bool, rng: &mut impl Rng) -> Scene {
        let mut jitter = |scale: f32| rng.random_range(-scale..=scale);
        let half_thorax = 0.37 + jitter(0.02);
        let cx = 0.5 + jitter(0.01);
        let dome_base = match truth.diaphragm_position {
            DiaphragmPosition::Normal => 0.68,
            DiaphragmPosition::Elevated => 0.585,
            DiaphragmPosition::Depressed => 0.79,
        } + jitter(0.012);
        // The right dome (image left) sits a little higher than the left.
        let dome = [dome_base - 0.012, dome_base + 0.008];
        let dome_curvature = if truth.diaphragm_position == DiaphragmPosition::Depressed {
            0.035
        } else {
            0.11 + jitter(0.01)
        };
        let ratio = truth.cardiothoracic_ratio as f32;
        let heart_width = ratio * 2.0 * half_thorax;
        let heart_center = (cx + 0.14 * heart_width, dome_base - 0.075);
        let indistinct = truth.cardiac_contour == CardiacContour::Indistinct;
        let (clavicle_rotation, clavicle_drop) = match truth.clavicle_symmetry {
            ClavicleSymmetry::Symmetric => (jitter(0.004), [jitter(0.004), jitter(0.004)]),
            ClavicleSymmetry::Asymmetric => {
                let sign = if jitter(1.0) < 0.0 { -1.0 } else { 1.0 };
                let drop = 0.04 + jitter(0.01);
                (
                    sign * (0.035 + jitter(0.008)),
                    if sign < 0.0 { [drop, 0.0] } else { [0.0, drop] },
                )
            }
        };
        let scoliosis = match truth.spine_alignment {
            SpineAlignment::Normal => jitter(0.003),
            SpineAlignment::Scoliotic => {
                let magnitude = 0.035 + jitter(0.01);
                if jitter(1.0) < 0.0 {
                    -magnitude
                } else {
                    magnitude
                }
            }
        };
        let fracture = truth.rib_fracture.then(|| {
            let side = usize::from(jitter(1.0) > 0.0);
            let rib = 3 + (jitter(1.0).abs() * 5.0) as usize;
            let t = 0.5 + jitter(0.2);
            (side, rib.min(8), t)
        });
        let fluid_height = |blunted: bool, j: f32| if blunted { 0.07 + j } else { 0.0 };
        let fluid = match truth.costophrenic_angle {
            CostophrenicAngle::Normal => [0.0, 0.0],
            CostophrenicAngle::BluntedRight => [fluid_height(true, jitter(0.015)), 0.0],
            CostophrenicAngle::BluntedLeft => [0.0, fluid_height(true, jitter(0.015))],
            CostophrenicAngle::BluntedBoth => [
                fluid_height(true, jitter(0.015)),
                fluid_height(true, jitter(0.015)),
            ],
        };
        let (blob_radius, blob_amplitude) = match truth.opacity_severity {
            Severity::None => (0.0, 0.0),
            Severity::Mild => (0.05, 0.18),
            Severity::Moderate => (0.065, 0.22),
            Severity::Severe => (0.085, 0.32),
        };
        let mut blobs = Vec::new();
        for zone in &truth.opacity_distribution {
            let (side, band) = zone_geometry(*zone);
            let bottom = dome[side] - 0.03;
            let (top, low) = match band {
                0 => (0.2, 0.33),
                1 => (0.37, 0.48),
                _ => (0.53, bottom.max(0.56)),
            };
            let count = if truth.opacity_severity == Severity::Severe {
                2
            } else {
                1
            };
            for _ in 0..count {
                blobs.push(Blob {
                    u: cx + SIDES[side] * half_thorax * (0.62 + jitter(0.15)),
                    v: top + (low - top) * (0.5 + jitter(0.4)),
                    radius: blob_radius * (1.0 + jitter(0.15)),
                    amplitude: blob_amplitude * (1.0 + jitter(0.1)),
                });
            }
        }
        let (vessel_count, vessel_reach, vessel_density) = match truth.vascular_pattern {
            VascularPattern::Normal => (7, 0.2, 0.065),
            VascularPattern::Increased => (13, 0.3, 0.11),
            VascularPattern::Decreased => (4, 0.1, 0.03),
        };
        let hilum_v = 0.45;
        let mut vessels = Vec::new();
        for side in SIDES {
            let hilum = (cx + side * 0.11, hilum_v);
            for k in 0..vessel_count {
                let angle = -1.1 + 2.3 * (k as f32 + 0.5) / vessel_count as f32 + jitter(0.12);
                let reach = vessel_reach * (0.75 + jitter(0.25));
                let mid = (
                    hilum.0 + side * angle.cos() * reach * 0.5,
                    hilum.1 + angle.sin() * reach * 0.5 * aspect.recip(),
                );
                let bend = angle + jitter(0.35);
                let end = (
                    mid.0 + side * bend.cos() * reach * 0.5,
                    mid.1 + bend.sin() * reach * 0.5 * aspect.recip(),
                );
                for (a, b, width) in [(hilum, mid, 0.0075), (mid, end, 0.0045)] {
                    let pad = width * 2.5;
                    vessels.push(Vessel {
                        a,
                        b,
                        width,
                        bbox: (
                            a.0.min(b.0) - pad,
                            a.1.min(b.1) - pad,
                            a.0.max(b.0) + pad,
                            a.1.max(b.1) + pad,
                        ),
                    });
                }
            }
        }
        Scene {
            aspect,
            cx,
            spine_shift: clavicle_rotation,
            half_thorax,
            apex: 0.13 + jitter(0.01),
            dome,
            dome_curvature,
            dome_scallop: if truth.diaphragm_contour == DiaphragmContour::Irregular {
                0.013
            } else {
                0.0
            },
            scallop_phase: jitter(3.0),
            heart_center,
            heart_axes: (heart_width / 2.0, 0.15 + jitter(0.01)),
            heart_edge: if indistinct { 0.05 } else { 0.006 },
            heart_haze: if indistinct { 0.1 } else { 0.0 },
            knob_radius: match truth.aortic_knob {
                AorticKnob::Normal => 0.028,
                AorticKnob::Prominent => 0.05,
            },
            hilum_radius: match truth.hilar_size {
                HilarSize::Normal => 0.03,
                HilarSize::Enlarged => 0.056,
            },
            air: if truth.hyperlucency { 0.4 } else { 0.27 },
            scoliosis,
            clavicle_rotation,
            clavicle_drop,
            fracture,
            fluid,
            blobs,
            reticular: match truth.interstitial_markings {
                InterstitialMarkings::Normal => 0.012,
                InterstitialMarkings::Prominent => 0.07,
            },
            vessels,
            vessel_density,
            ap,
            salt: rng.random(),
        }
    }

    /// Height of the dome on `side` at horizontal position `u`.
    fn dome_at(&self, side: usize, u: f32) -> f32 {
        let center = self.cx + SIDES[side] * self.half_thorax * 0.5;
        let x = (u - center) / self.half_thorax;
        let scallop = self.dome_scallop * (u * 95.0 + self.scallop_phase).sin();
        // The lateral end dips into the costophrenic recess, an acute angle when normal.
        let from_wall = (self.half_thorax - (u - self.cx) * SIDES[side]).max(0.0);
        let recess = 0.035 * (1.0 - (from_wall / 0.07).min(1.0)).powi(2);
        self.dome[side] + self.dome_curvature * x * x + scallop + recess
    }

    fn density(&self, u: f32, v: f32) -> f32 {
        let side = usize::from(u >= self.cx);
        let s = SIDES[side];
        let lateral = (u - self.cx) * s;
        let edge = 0.004;

        // Body outline and shoulders.
        let body_half = 0.47 - 0.08 * smooth01((0.1 - v) / 0.1);
        let body = soft(body_half - (u - 0.5).abs(), 0.02);
        let mut d = 0.42 * body;

        // Lung field: apex, lateral wall, dome, mediastinum.
        let thorax_wall = self.half_thorax * (0.78 + 0.22 * smooth01((v - self.apex) / 0.3));
        let apex_center = self.cx + s * self.half_thorax * 0.5;
        let top = v - (self.apex + 4.0 * (u - apex_center).powi(2));
        let wall = thorax_wall - lateral;
        let dome = self.dome_at(side, u);
        let bottom = dome - v;
        let mediastinum_half = 0.062 + 0.01 * smooth01((v - 0.2) / 0.2);
        let medial = lateral - mediastinum_half;
        let lung = soft(top.min(wall).min(bottom).min(medial), edge);

        // Heart: an ellipse sitting on the diaphragm.
        let (hx, hy) = self.heart_center;
        let (ha, hb) = self.heart_axes;
        let r = (((u - hx) / ha).powi(2) + ((v - hy) / hb).powi(2)).sqrt();
        let heart = soft((1.0 - r) * ha.min(hb), self.heart_edge) * smooth01((v - 0.36) / 0.04);
        let haze = self.heart_haze * (-((r - 1.0).max(0.0) / 0.25).powi(2)).exp() * lung;

        // Pleural fluid in the costophrenic angle: a meniscus rising along the lateral wall,
        // filling the recess up to `fluid_height` above the dome at the wall.
        let fluid_height = self.fluid[side];
        let fluid = if fluid_height > 0.0 {
            let from_wall = (thorax_wall - lateral).max(0.0);
            let rise = (1.0 - (from_wall / 0.17).min(1.0)).powi(2);
            let level = dome - fluid_height * rise;
            soft(v - level, 0.005) * lung
        } else {
            0.0
        };

        let field = lung * (1.0 - heart) * (1.0 - fluid);
        d -= self.air * field;
        d += 0.06 * heart + haze;

        // Below the domes: abdomen.
        d += 0.06 * soft(v - dome, 0.01) * body;

        // Mediastinum and trachea.
        let mediastinum = soft(mediastinum_half + 0.004 - lateral.abs(), edge)
            * soft(v - 0.05, 0.02)
            * (1.0 - smooth01((v - hy + 0.05) / 0.05));
        d += 0.04 * mediastinum;
        let trachea = soft(0.013 - (u - self.cx - self.spine_shift).abs(), 0.004)
            * soft(v - 0.04, 0.01)
            * soft(0.3 - v, 0.02);
        d -= 0.1 * trachea;

        // Aortic knob.
        let knob = ((u - (self.cx + 0.068)).powi(2) + ((v - 0.31) * self.aspect).powi(2)).sqrt();
        d += 0.09 * soft(self.knob_radius - knob, 0.006) * (1.0 - heart);

        // Hila.
        let hilum_u = self.cx + s * 0.11;
        let hr = ((u - hilum_u).powi(2) + ((v - 0.45) * self.aspect).powi(2)).sqrt();
        let hilum_shape = 0.7 + 0.3 * value_noise(u, v, 40.0, self.salt ^ 7);
        d += 0.13 * soft(self.hilum_radius - hr, 0.01) * hilum_shape;

        // Vessels fanning from the hila.
        let mut vessel = 0.0f32;
        for vs in &self.vessels {
            if u < vs.bbox.0 || u > vs.bbox.2 || v < vs.bbox.1 || v > vs.bbox.3 {
                continue;
            }
            let (dist, _) = segment_distance((u, v), vs.a, vs.b);
            vessel = vessel.max(soft(vs.width - dist, vs.width));
        }
        d += self.vessel_density * vessel * lung;

        // Reticular interstitial network.
        let wu = u + 0.02 * value_noise(u, v, 9.0, self.salt ^ 11);
        let wv = v + 0.02 * value_noise(u, v, 9.0, self.salt ^ 13);
        let (a, b) = (
            (wu * 70.0 * std::f32::consts::PI).sin().abs(),
            (wv * 70.0 * std::f32::consts::PI).sin().abs(),
        );
        let net = (-(a.min(b) / 0.18).powi(2)).exp();
        d += self.reticular * net * field;

        // Opacities: mottled blobs, clipped to the lung.
        let mut opacity = 0.0f32;
        for blob in &self.blobs {
            let dist = ((u - blob.u).powi(2) + ((v - blob.v) * self.aspect).powi(2)).sqrt();
            if dist < blob.radius * 2.5 {
                let mottle = 0.75 + 0.25 * value_noise(u, v, 60.0, self.salt ^ 17);
                opacity += blob.amplitude * (-(dist / blob.radius).powi(2)).exp() * mottle;
            }
        }
        d += opacity.min(0.42) * lung * (1.0 - heart);

        // Spine, visible through the mediastinum and heart.
        let spine_u = self.cx
            + self.spine_shift
            + self.scoliosis * (std::f32::consts::PI * (v - 0.1) / 0.75).sin();
        let vertebra = 0.8 + 0.2 * (v * std::f32::consts::TAU / 0.045).cos();
        d += 0.16 * soft(0.032 - (u - spine_u).abs(), 0.006) * vertebra * soft(v - 0.03, 0.02);

        // Posterior ribs.
        d += self.ribs(u, v, side, lateral, thorax_wall);

        // Clavicles.
        let rise = if self.ap { -0.025 } else { 0.0 };
        let medial_end = (
            self.cx + self.spine_shift * 0.0 - self.clavicle_rotation + s * 0.035,
            0.19 + rise + self.clavicle_drop[side],
        );
        let lateral_end = (
            self.cx + s * 0.31,
            0.12 + rise + self.clavicle_drop[side] * 0.5,
        );
        let (dist, _) = segment_distance((u, v * 1.0), medial_end, lateral_end);
        d += 0.2 * soft(0.012 - dist, 0.004);

        d
    }

    fn ribs(&self, u: f32, v: f32, side: usize, lateral: f32, wall: f32) -> f32 {
        let start = 0.035;
        let t = (lateral - start) / (wall + 0.01 - start);
        if !(0.0..=1.0).contains(&t) {
            return 0.0;
        }
        let mut bone = 0.0f32;
        for rib in 0..10 {
            let base = 0.17 + rib as f32 * 0.062;
            let mut centre = base - 0.028 * (std::f32::consts::PI * t * 0.9).sin() + 0.05 * t * t;
            if let Some((fside, frib, ft)) = self.fracture
                && fside == side
                && frib == rib
            {
                if (t - ft).abs() < 0.025 {
                    continue;
                }
                if t > ft {
                    centre += 0.009;
                }
            }
            let offset = (v - centre).abs();
            if offset < 0.02 {
                let thickness = 0.0085;
                let inside = soft(thickness - offset, 0.003);
                let cortex = (-((offset - thickness).abs() / 0.002).powi(2)).exp();
                bone = bone.max(0.07 * inside + 0.05 * cortex);
            }
        }
        let _ = u;
        bone
    }
}

fn zone_geometry(zone: LungZone) -> (usize, usize) {
    match zone {
        LungZone::RightUpper => (0, 0),
        LungZone::RightMiddle => (0, 1),
        LungZone::RightLower => (0, 2),
        LungZone::LeftUpper => (1, 0),
        LungZone::LeftMiddle => (1, 1),
        LungZone::LeftLower => (1, 2),
    }
}

/// Acquisition faults that set image quality.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Faults {
    /// Structured noise standard deviation in density units.
    pub noise: f32,
    /// Gaussian blur sigma as a fraction of the width.
    pub blur: f32,
    /// Exposure gain (1 = correct; < 1 under-exposed, flattened contrast).
    pub exposure: f32,
    /// A collimator shutter covering this fraction of the image from one edge.
    pub collimation: Option<(Edge, f32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edge {
    Top,
    Left,
    Right,
}

impl Faults {
    pub fn sample(quality: ImageQuality, noise_scale: f64, rng: &mut impl Rng) -> Faults {
        let jitter = |rng: &mut dyn rand::RngCore, x: f32| x * rng.random_range(0.85..1.15);
        let scale = noise_scale as f32;
        let (noise, blur) = match quality {
            ImageQuality::Excellent => (0.006, 0.0),
            ImageQuality::Good => (0.03, 0.0022),
            ImageQuality::Fair => (0.06, 0.0042),
            ImageQuality::Poor => (0.11, 0.0065),
        };
        let mut faults = Faults {
            noise: jitter(rng, noise) * scale,
            blur: jitter(rng, blur),
            exposure: 1.0,
            collimation: None,
        };
        if quality == ImageQuality::Poor {
            if rng.random_bool(0.5) {
                faults.exposure = rng.random_range(0.55..0.7);
            } else {
                let edge = [Edge::Top, Edge::Left, Edge::Right][rng.random_range(0..3)];
                faults.collimation = Some((edge, rng.random_range(0.16..0.22)));
            }
        }
        faults
    }
}

/// Draws the density map of `truth` with `faults` applied.
pub fn render(
    truth: &Truth,
    aspect: f32,
    ap: bool,
    faults: &Faults,
    rng: &mut impl Rng,
) -> DensityMap {
    let scene = Scene::new(truth, aspect, ap, rng);
    let width = WORK_WIDTH;
    let height = (WORK_WIDTH as f32 * aspect).round() as usize;
    let mut data = Vec::with_capacity(width * height);
    for y in 0..height {
        let v = (y as f32 + 0.5) / height as f32;
        for x in 0..width {
            let u = (x as f32 + 0.5) / width as f32;
            data.push(scene.density(u, v));
        }
    }
    let mut map = DensityMap {
        width,
        height,
        data,
    };
    if faults.blur > 0.0 {
        gaussian_blur(&mut map, faults.blur * width as f32);
    }
    let mean = map.data.iter().sum::<f32>() / map.data.len() as f32;
    let normal = Normal::new(0.0f32, faults.noise.max(1e-6)).expect("positive sigma");
    for value in &mut map.data {
        let exposed = mean + (*value - mean) * faults.exposure;
        *value = exposed + normal.sample(rng);
    }
    if let Some((edge, fraction)) = faults.collimation {
        for y in 0..height {
            for x in 0..width {
                let inside = match edge {
                    Edge::Top => (y as f32) < fraction * height as f32,
                    Edge::Left => (x as f32) < fraction * width as f32,
                    Edge::Right => (x as f32) > (1.0 - fraction) * width as f32,
                };
                if inside {
                    // Unexposed detector behind the shutter reads as the brightest value.
                    map.data[y * width + x] = 1.05;
                }
            }
        }
    }
    map
}

/// Separable Gaussian blur with sigma in pixels.
fn gaussian_blur(map: &mut DensityMap, sigma: f32) {
    let radius = (sigma * 3.0).ceil() as isize;
    let kernel: Vec<f32> = (-radius..=radius)
        .map(|i| (-(i as f32).powi(2) / (2.0 * sigma * sigma)).exp())
        .collect();
    let total: f32 = kernel.iter().sum();
    let kernel: Vec<f32> = kernel.iter().map(|k| k / total).collect();
    let (w, h) = (map.width as isize, map.height as isize);
    let mut tmp = vec![0.0f32; map.data.len()];
    for y in 0..h {
        for x in 0..w {
            let mut acc = 0.0;
            for (k, weight) in kernel.iter().enumerate() {
                let xx = (x + k as isize - radius).clamp(0, w - 1);
                acc += weight * map.data[(y * w + xx) as usize];
            }
            tmp[(y * w + x) as usize] = acc;
        }
    }
    for y in 0..h {
        for x in 0..w {
            let mut acc = 0.0;
            for (k, weight) in kernel.iter().enumerate() {
                let yy = (y + k as isize - radius).clamp(0, h - 1);
                acc += weight * tmp[(yy * w + x) as usize];
            }
            map.data[(y * w + x) as usize] = acc;
        }
    }
}
