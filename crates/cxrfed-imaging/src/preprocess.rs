//! From a decoded image to the model input: display LUT, anti-aliased resize, pad or crop,
//! normalisation.
//!
//! The resize is separable and reads every full-resolution sample exactly once: each source
//! row is mapped through the display LUT and reduced horizontally into a narrow buffer
//! (`rows x size`), which is then reduced vertically. No full-resolution floating point copy
//! of the image is ever made.
//!
//! Downscaling uses area averaging (each output pixel is the coverage-weighted mean of the
//! source pixels under it, like OpenCV's `INTER_AREA`), which is what anti-aliasing needs for
//! the 5-15x reductions typical of chest X-rays. Upscaling (rare: images smaller than the
//! model input) uses linear interpolation.
//!
//! Aspect handling: [`Aspect::Pad`] (default) keeps the whole image, scales its longer side
//! to `size` and pads the shorter side symmetrically with black (display value 0), so that no
//! anatomy (costophrenic angles, apices) is cut off. [`Aspect::CenterCrop`] crops the central
//! square first, which fills the input but may lose the lung periphery on wide images.

use ndarray::{Array2, ArrayView2, s};

use crate::decode::{Decoded, DisplayLut, Sample, Samples};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Aspect {
    #[default]
    Pad,
    CenterCrop,
}

impl std::str::FromStr for Aspect {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "pad" => Ok(Aspect::Pad),
            "center-crop" | "crop" => Ok(Aspect::CenterCrop),
            other => Err(format!(
                "unknown aspect mode {other:?} (pad or center-crop)"
            )),
        }
    }
}

/// Which preprocessing a model was trained with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pipeline {
    /// cxrfed's own: display LUT (modality, VOI, MONOCHROME1), area resize, pad or crop,
    /// `(x - mean) / std`.
    #[default]
    Cxrfed,
    /// TorchXRayVision's, operation for operation (see [`txrv_input`]); `aspect`, `mean` and
    /// `std` are TXRV's own (centre crop; the input is `(u - 0.5) * 2048` with `u` the stored
    /// value over `2^bits - 1`, which is what `mean` 0.5 and `std` 1/2048 say for the kept
    /// 8-bit input).
    Torchxrayvision,
}

impl std::str::FromStr for Pipeline {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "" | "cxrfed" => Ok(Pipeline::Cxrfed),
            "torchxrayvision" | "txrv" => Ok(Pipeline::Torchxrayvision),
            other => Err(format!(
                "unknown input pipeline {other:?} (cxrfed or torchxrayvision)"
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PreprocessOptions {
    /// Output is `size x size`.
    pub size: u32,
    pub aspect: Aspect,
    /// Normalisation applied after the display LUT: `(x - mean) / std`.
    pub mean: f32,
    pub std: f32,
    pub pipeline: Pipeline,
}

impl Default for PreprocessOptions {
    fn default() -> Self {
        PreprocessOptions {
            size: 224,
            aspect: Aspect::Pad,
            mean: 0.5,
            std: 0.25,
            pipeline: Pipeline::Cxrfed,
        }
    }
}

impl PreprocessOptions {
    /// What a kept 8-bit input made with these options is: pipeline, aspect and size
    /// (`cxrfed/pad/224`, `torchxrayvision/center-crop/224`). Normalisation is not part of
    /// it: a kept input stores the display value, which any mean and std read back.
    pub fn signature(&self) -> String {
        let pipeline = match self.pipeline {
            Pipeline::Cxrfed => "cxrfed",
            Pipeline::Torchxrayvision => "torchxrayvision",
        };
        let aspect = match self.aspect {
            Aspect::Pad => "pad",
            Aspect::CenterCrop => "center-crop",
        };
        format!("{pipeline}/{aspect}/{}", self.size)
    }
}

/// One output pixel's source footprint along an axis: `start` and per-source-pixel weights.
#[derive(Debug, Clone)]
struct Footprint {
    start: usize,
    weights: Vec<f32>,
}

/// Weights that map `src_len` source pixels onto `dst_len` output pixels.
fn axis_weights(src_len: usize, dst_len: usize) -> Vec<Footprint> {
    let scale = src_len as f64 / dst_len as f64;
    (0..dst_len)
        .map(|i| {
            if scale >= 1.0 {
                // Area: output pixel i covers [i*scale, (i+1)*scale) in source coordinates.
                let lo = i as f64 * scale;
                let hi = (lo + scale).min(src_len as f64);
                let first = lo.floor() as usize;
                let last = (hi.ceil() as usize).min(src_len).max(first + 1);
                let weights = (first..last)
                    .map(|j| {
                        let overlap = (hi.min(j as f64 + 1.0) - lo.max(j as f64)).max(0.0);
                        (overlap / scale) as f32
                    })
                    .collect();
                Footprint {
                    start: first,
                    weights,
                }
            } else {
                // Linear interpolation between the two nearest source centres.
                let x = ((i as f64 + 0.5) * scale - 0.5).clamp(0.0, (src_len - 1) as f64);
                let first = x.floor() as usize;
                let fraction = (x - first as f64) as f32;
                if first + 1 < src_len {
                    Footprint {
                        start: first,
                        weights: vec![1.0 - fraction, fraction],
                    }
                } else {
                    Footprint {
                        start: first,
                        weights: vec![1.0],
                    }
                }
            }
        })
        .collect()
}

/// Resizes `region` (display values through `lut`) to `out_rows x out_cols`.
///
/// Vertical first: each output row accumulates its footprint of source rows, mapped through the
/// LUT, into one full-width buffer (a sequential multiply-add per source sample), and only that
/// buffer is reduced horizontally — once per output row rather than once per source row.
fn resize_region<T: Sample>(
    region: ArrayView2<'_, T>,
    lut: &DisplayLut,
    out_rows: usize,
    out_cols: usize,
) -> Array2<f32> {
    let (rows, cols) = region.dim();
    let horizontal = axis_weights(cols, out_cols);
    let vertical = axis_weights(rows, out_rows);
    let mut out = Array2::<f32>::zeros((out_rows, out_cols));
    let mut wide = vec![0f32; cols];
    for (mut dst_row, footprint) in out.rows_mut().into_iter().zip(&vertical) {
        wide.fill(0.0);
        for (k, &w) in footprint.weights.iter().enumerate() {
            let src_row = region.row(footprint.start + k);
            match src_row.as_slice() {
                Some(src) => {
                    for (acc, v) in wide.iter_mut().zip(src) {
                        *acc += w * lut.get(v.lut_index());
                    }
                }
                None => {
                    for (acc, v) in wide.iter_mut().zip(src_row.iter()) {
                        *acc += w * lut.get(v.lut_index());
                    }
                }
            }
        }
        for (out, footprint) in dst_row.iter_mut().zip(&horizontal) {
            let window = &wide[footprint.start..footprint.start + footprint.weights.len()];
            *out = window
                .iter()
                .zip(&footprint.weights)
                .map(|(v, w)| v * w)
                .sum();
        }
    }
    out
}

/// Places the resized image into the square model input and normalises it.
fn fit<T: Sample>(image: &Array2<T>, lut: &DisplayLut, options: &PreprocessOptions) -> Array2<f32> {
    let size = options.size.max(1) as usize;
    let (rows, cols) = image.dim();
    let normalise = |v: f32| (v - options.mean) / options.std;
    match options.aspect {
        Aspect::CenterCrop => {
            let side = rows.min(cols);
            let (r0, c0) = ((rows - side) / 2, (cols - side) / 2);
            let region = image.slice(s![r0..r0 + side, c0..c0 + side]);
            resize_region(region, lut, size, size).mapv_into(normalise)
        }
        Aspect::Pad => {
            let (out_rows, out_cols) = if rows >= cols {
                (
                    size,
                    ((cols * size) as f64 / rows as f64).round().max(1.0) as usize,
                )
            } else {
                (
                    ((rows * size) as f64 / cols as f64).round().max(1.0) as usize,
                    size,
                )
            };
            let resized = resize_region(image.view(), lut, out_rows, out_cols);
            let mut out = Array2::<f32>::from_elem((size, size), normalise(0.0));
            let (r0, c0) = ((size - out_rows) / 2, (size - out_cols) / 2);
            out.slice_mut(s![r0..r0 + out_rows, c0..c0 + out_cols])
                .assign(&resized.mapv_into(normalise));
            out
        }
    }
}

/// Maps a decoded image to the `size x size` normalised model input.
pub fn preprocess(decoded: &Decoded, options: &PreprocessOptions) -> Array2<f32> {
    if options.pipeline == Pipeline::Torchxrayvision {
        return txrv_input(decoded, options.size as usize);
    }
    let lut = decoded.display_lut();
    match &decoded.samples {
        Samples::U8(a) => fit(a, &lut, options),
        Samples::U16(a) => fit(a, &lut, options),
        Samples::I16(a) => fit(a, &lut, options),
    }
}

/// TorchXRayVision's model input, reproduced operation for operation so a file gives the
/// tensor that TXRV's own `read_xray_dcm` (or `skimage.io.imread` + `normalize(img, 255)`
/// for an 8-bit picture) + `XRayCenterCrop()` + `XRayResizer(size)` give:
///
/// 1. stored values (pydicom's `pixel_array`), MONOCHROME1 flipped as `2^bits - 1 - v`, then
///    `(2 * (v / (2^bits - 1)) - 1) * 1024` in f32 — no modality or VOI LUT, as in TXRV;
/// 2. the centre square, `start = n // 2 - side // 2` on each axis;
/// 3. skimage's `resize(img, (1, size, size), mode="constant", preserve_range=True)`: when
///    shrinking, `ndimage.gaussian_filter` with `σ = (f - 1) / 2` (`f = side / size`, radius
///    `int(4σ + 0.5)`, zeros outside, rows then columns, each pass rounded to f32), then the
///    order-1 `ndimage.zoom` with `grid_mode` (source coordinate `(o + 0.5) f - 0.5`, zeros
///    outside), rounded to f32 and clipped to the input's range.
///
/// The filter is evaluated only where the zoom samples it (two rows and two columns per
/// output pixel), which gives the same numbers as filtering the whole image. Sums are in f64
/// like scipy's; they may differ from it in the last bit of an f32 now and then.
pub fn txrv_input(decoded: &Decoded, size: usize) -> Array2<f32> {
    let bits = decoded.bits_stored.clamp(1, 32);
    let maxval = ((1u64 << bits) - 1) as f32;
    let invert = decoded.invert;
    let norm = move |v: f64| {
        let v = v as f32;
        let v = if invert { maxval - v } else { v };
        (2.0 * (v / maxval) - 1.0) * 1024.0
    };
    match &decoded.samples {
        Samples::U8(a) => txrv_resize(a.view(), |s| norm(s.value()), size),
        Samples::U16(a) => txrv_resize(a.view(), |s| norm(s.value()), size),
        Samples::I16(a) => txrv_resize(a.view(), |s| norm(s.value()), size),
    }
}

fn txrv_resize<T: Sample>(
    image: ArrayView2<'_, T>,
    norm: impl Fn(T) -> f32,
    size: usize,
) -> Array2<f32> {
    let (rows, cols) = image.dim();
    let side = rows.min(cols);
    let size = size.max(1);
    if side == 0 {
        return Array2::zeros((size, size));
    }
    let (r0, c0) = (rows / 2 - side / 2, cols / 2 - side / 2);
    // A view, normalised as it is read: no full-resolution f32 copy is made (the decode's
    // memory budget does not cover one).
    let crop = image.slice(s![r0..r0 + side, c0..c0 + side]);
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for v in crop.iter() {
        let v = norm(*v);
        lo = lo.min(v);
        hi = hi.max(v);
    }
    let zoom = side as f64 / size as f64;
    // Source index pairs and weights of the order-1 zoom along one axis (the same for both).
    let taps: Vec<(isize, f64)> = (0..size)
        .map(|o| {
            let cc = (o as f64 + 0.5) * zoom - 0.5;
            let start = cc.floor();
            (start as isize, cc - start)
        })
        .collect();
    let at = |v: &dyn Fn(usize) -> f64, i: isize| {
        if i < 0 || i as usize >= side {
            0.0
        } else {
            v(i as usize)
        }
    };
    let mut out = Array2::<f32>::zeros((size, size));
    if size < side {
        let sigma = (zoom - 1.0) / 2.0;
        let kernel = gaussian_kernel(sigma);
        // The rows and columns the zoom reads, each with its index in the filtered buffer.
        let mut needed: Vec<usize> = taps
            .iter()
            .flat_map(|&(i, _)| [i, i + 1])
            .filter(|&i| i >= 0 && (i as usize) < side)
            .map(|i| i as usize)
            .collect();
        needed.dedup();
        let mut slot = vec![usize::MAX; side];
        for (k, &i) in needed.iter().enumerate() {
            slot[i] = k;
        }
        // Pass 1, along rows (axis 1 of TXRV's (1, H, W) array): every column, needed rows.
        // Source rows are normalised once into a window of the 2r + 1 rows around the current
        // one (the needed rows ascend), and summed in scipy's order for a symmetric kernel:
        // centre, then each pair (i + l, i - l).
        let radius = kernel.len() - 1;
        let mut window: std::collections::VecDeque<Vec<f32>> = Default::default();
        let mut first = 0usize;
        let zeros = vec![0.0f32; side];
        let mut sum = vec![0.0f64; side];
        let mut vertical = Array2::<f32>::zeros((needed.len(), side));
        for (k, &r) in needed.iter().enumerate() {
            let (lo_row, hi_row) = (r.saturating_sub(radius), (r + radius).min(side - 1));
            while first < lo_row && !window.is_empty() {
                window.pop_front();
                first += 1;
            }
            if window.is_empty() {
                first = lo_row;
            }
            while first + window.len() <= hi_row {
                let i = first + window.len();
                window.push_back(crop.row(i).iter().map(|v| norm(*v)).collect());
            }
            let row = |i: isize| -> &[f32] {
                if i < 0 || i as usize >= side {
                    &zeros
                } else {
                    &window[i as usize - first]
                }
            };
            let r = r as isize;
            for (acc, x) in sum.iter_mut().zip(row(r)) {
                *acc = f64::from(*x) * kernel[0];
            }
            for (l, w) in kernel.iter().enumerate().skip(1) {
                let (a, b) = (row(r + l as isize), row(r - l as isize));
                for ((acc, x), y) in sum.iter_mut().zip(a).zip(b) {
                    *acc += (f64::from(*x) + f64::from(*y)) * w;
                }
            }
            for (out, acc) in vertical.row_mut(k).iter_mut().zip(&sum) {
                *out = *acc as f32;
            }
        }
        // Pass 2, along columns, at the needed rows and columns only.
        let mut filtered = Array2::<f32>::zeros((needed.len(), needed.len()));
        for k in 0..needed.len() {
            let row = |i: usize| f64::from(vertical[(k, i)]);
            for (m, &c) in needed.iter().enumerate() {
                let mut sum = at(&row, c as isize) * kernel[0];
                for (l, w) in kernel.iter().enumerate().skip(1) {
                    let l = l as isize;
                    sum += (at(&row, c as isize + l) + at(&row, c as isize - l)) * w;
                }
                filtered[(k, m)] = sum as f32;
            }
        }
        let value = |r: isize, c: isize| {
            if r < 0 || c < 0 || r as usize >= side || c as usize >= side {
                0.0
            } else {
                f64::from(filtered[(slot[r as usize], slot[c as usize])])
            }
        };
        zoom_into(&mut out, &taps, value);
    } else {
        let value = |r: isize, c: isize| {
            if r < 0 || c < 0 || r as usize >= side || c as usize >= side {
                0.0
            } else {
                f64::from(norm(crop[(r as usize, c as usize)]))
            }
        };
        zoom_into(&mut out, &taps, value);
    }
    // skimage's `_clip_warp_output`: the input's range, widened to the fill value 0 when the
    // output reaches it and the input does not.
    let (out_lo, out_hi) = out
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), v| {
            (a.min(*v), b.max(*v))
        });
    if !(lo <= 0.0 && 0.0 <= hi) && out_lo <= 0.0 && 0.0 <= out_hi {
        lo = lo.min(0.0);
        hi = hi.max(0.0);
    }
    out.mapv_inplace(|v| v.clamp(lo, hi));
    out
}

/// The order-1 zoom: each output pixel from its 2 x 2 source neighbours, in f64.
fn zoom_into(out: &mut Array2<f32>, taps: &[(isize, f64)], value: impl Fn(isize, isize) -> f64) {
    for (o_r, &(r, tr)) in taps.iter().enumerate() {
        for (o_c, &(c, tc)) in taps.iter().enumerate() {
            let sum = value(r, c) * (1.0 - tr) * (1.0 - tc)
                + value(r, c + 1) * (1.0 - tr) * tc
                + value(r + 1, c) * tr * (1.0 - tc)
                + value(r + 1, c + 1) * tr * tc;
            out[(o_r, o_c)] = sum as f32;
        }
    }
}

/// scipy's `_gaussian_kernel1d(sigma, 0, int(4 * sigma + 0.5))`, centre first (the kernel is
/// symmetric): `exp(-0.5 / σ² · x²)` normalised to sum 1.
fn gaussian_kernel(sigma: f64) -> Vec<f64> {
    let radius = (4.0 * sigma + 0.5) as usize;
    let scale = -0.5 / (sigma * sigma);
    let full: Vec<f64> = (-(radius as i64)..=radius as i64)
        .map(|x| (scale * (x * x) as f64).exp())
        .collect();
    let total: f64 = full.iter().sum();
    full[radius..].iter().map(|w| w / total).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::Voi;
    use cxrfed_schema::{Acquisition, Patient, Source};
    use proptest::prelude::*;

    fn decoded_u16(a: Array2<u16>) -> Decoded {
        Decoded {
            samples: Samples::U16(a),
            bits_stored: 16,
            modality: crate::decode::Modality::Rescale {
                slope: 1.0,
                intercept: 0.0,
            },
            voi: Voi::FullRange,
            invert: false,
            source: Source::default(),
            patient: Patient::default(),
            acquisition: Acquisition::default(),
            notes: vec![],
            identity: None,
        }
    }

    const IDENTITY: PreprocessOptions = PreprocessOptions {
        size: 4,
        aspect: Aspect::Pad,
        mean: 0.0,
        std: 1.0,
        pipeline: Pipeline::Cxrfed,
    };

    #[test]
    fn area_average_of_blocks() {
        // 8x8 made of 2x2 blocks of constant value: the 4x4 output is exactly the blocks.
        let a = Array2::from_shape_fn((8, 8), |(r, c)| ((r / 2) * 4 + c / 2) as u16 * 1000);
        let out = preprocess(&decoded_u16(a), &IDENTITY);
        for r in 0..4 {
            for c in 0..4 {
                let expected = ((r * 4 + c) * 1000) as f32 / 65535.0;
                assert!((out[(r, c)] - expected).abs() < 1e-5, "{r},{c}");
            }
        }
    }

    #[test]
    fn pad_keeps_aspect_and_centres() {
        // A 2:1 landscape image of white fills the middle half rows; the rest is black padding.
        let a = Array2::from_elem((50, 100), u16::MAX);
        let out = preprocess(&decoded_u16(a), &IDENTITY);
        assert_eq!(out.row(0).sum(), 0.0);
        assert_eq!(out.row(3).sum(), 0.0);
        assert!((out.row(1).sum() - 4.0).abs() < 1e-5);
        assert!((out.row(2).sum() - 4.0).abs() < 1e-5);
    }

    #[test]
    fn center_crop_fills_the_square() {
        let a = Array2::from_shape_fn(
            (50, 100),
            |(_, c)| if (25..75).contains(&c) { u16::MAX } else { 0 },
        );
        let options = PreprocessOptions {
            aspect: Aspect::CenterCrop,
            ..IDENTITY
        };
        let out = preprocess(&decoded_u16(a), &options);
        assert!(out.iter().all(|v| (*v - 1.0).abs() < 1e-5));
    }

    proptest! {
        /// Area weights along an axis are a partition of unity for every output pixel.
        #[test]
        fn weights_sum_to_one(src in 1usize..3000, dst in 1usize..300) {
            for footprint in axis_weights(src, dst) {
                let total: f32 = footprint.weights.iter().sum();
                prop_assert!((total - 1.0).abs() < 1e-4, "sum {total}");
                prop_assert!(footprint.start + footprint.weights.len() <= src);
            }
        }

        /// Resizing preserves the mean intensity (area averaging conserves mass) and the range.
        #[test]
        fn resize_preserves_mean_and_range(
            rows in 8usize..200, cols in 8usize..200, seed in any::<u64>(), size in 4u32..64,
        ) {
            let a = Array2::from_shape_fn((rows, cols), |(r, c)| {
                let x = (r as u64).wrapping_mul(31).wrapping_add(c as u64).wrapping_mul(seed | 1);
                (x % 4096) as u16
            });
            let options = PreprocessOptions { size, aspect: Aspect::CenterCrop, mean: 0.0, std: 1.0, pipeline: Pipeline::Cxrfed };
            let d = decoded_u16(a.clone());
            let out = preprocess(&d, &options);
            prop_assert_eq!(out.dim(), (size as usize, size as usize));
            prop_assert!(out.iter().all(|v| (0.0..=1.0 + 1e-5).contains(v)));
            let side = rows.min(cols);
            if side >= size as usize {
                let (r0, c0) = ((rows - side) / 2, (cols - side) / 2);
                let crop = a.slice(s![r0..r0 + side, c0..c0 + side]);
                let src_mean = crop.iter().map(|v| f64::from(*v) / 65535.0).sum::<f64>() / crop.len() as f64;
                let out_mean = out.iter().map(|v| f64::from(*v)).sum::<f64>() / out.len() as f64;
                prop_assert!((src_mean - out_mean).abs() < 1e-3, "{src_mean} vs {out_mean}");
            }
        }

        /// MONOCHROME1 output is exactly one minus the MONOCHROME2 output.
        #[test]
        fn inversion_mirrors(rows in 4usize..64, cols in 4usize..64, seed in any::<u32>()) {
            let a = Array2::from_shape_fn((rows, cols), |(r, c)| ((r * 131 + c * 7) as u32 ^ seed) as u16 & 0x0fff);
            let mut d = decoded_u16(a);
            d.bits_stored = 12;
            d.voi = Voi::Window { center: 2000.0, width: 3000.0, function: dicom_pixeldata::VoiLutFunction::Linear };
            let options = PreprocessOptions { size: 16, aspect: Aspect::CenterCrop, mean: 0.0, std: 1.0, pipeline: Pipeline::Cxrfed };
            let normal = preprocess(&d, &options);
            d.invert = true;
            let inverted = preprocess(&d, &options);
            for (x, y) in normal.iter().zip(inverted.iter()) {
                prop_assert!((x + y - 1.0).abs() < 1e-4);
            }
        }
    }
}

/// A square 8-bit model input (`size²` bytes, row-major) as a grayscale PNG, for people to
/// look at (the console's thumbnail). None when the length does not match the size.
pub fn input_png(size: u32, pixels: &[u8]) -> Option<Vec<u8>> {
    let image = image::GrayImage::from_raw(size, size, pixels.to_vec())?;
    let mut out = std::io::Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Png).ok()?;
    Some(out.into_inner())
}

#[cfg(test)]
mod input_png_tests {
    #[test]
    fn an_input_round_trips_through_png() {
        let pixels: Vec<u8> = (0..16u32 * 16).map(|i| (i % 251) as u8).collect();
        let png = super::input_png(16, &pixels).expect("encodes");
        let back = image::load_from_memory(&png).expect("decodes").to_luma8();
        assert_eq!(back.dimensions(), (16, 16));
        assert_eq!(back.into_raw(), pixels);
        assert!(super::input_png(16, &pixels[1..]).is_none());
    }
}
