//! Bytes to a grayscale image plus its display pipeline.
//!
//! The decoded image keeps the *stored* sample values of the first frame (masked to BitsStored
//! and sign-extended), so that the pixel hash does not depend on header rewrites and the
//! modality and VOI transforms are applied exactly once, through a lookup table, while the
//! preprocessing pass reads each full-resolution sample once.

use std::io::Cursor;
use std::panic::{AssertUnwindSafe, catch_unwind};

use cxrfed_schema::{Acquisition, ImageFormat, Patient, Source};
use dicom_dictionary_std::tags;
use dicom_object::{DefaultDicomObject, OpenFileOptions, file::ReadPreamble};
use dicom_pixeldata::{PixelDecoder, VoiLutFunction, WindowLevel, WindowLevelTransform};
use ndarray::Array2;
use sha2::{Digest, Sha256};

use crate::attr;
use crate::budget::{MemoryBudget, Reservation};
use crate::deidentify::{self, BurnedInPolicy, SiteSecret};
use crate::sniff::{Format, sniff};
use crate::{ImagingError, codestream, scan, syntax};

/// Resource limits checked before any large allocation.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_rows: u32,
    pub max_columns: u32,
    pub max_file_bytes: u64,
    /// Which images that may show identifying text in their pixels are refused.
    pub burned_in: BurnedInPolicy,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_rows: 8192,
            max_columns: 8192,
            max_file_bytes: 256 * 1024 * 1024,
            burned_in: BurnedInPolicy::Refuse,
        }
    }
}

impl Limits {
    fn check_dimensions(&self, rows: u64, columns: u64) -> Result<(), ImagingError> {
        if rows > u64::from(self.max_rows) || columns > u64::from(self.max_columns) {
            return Err(ImagingError::DimensionsTooLarge {
                rows,
                columns,
                max_rows: self.max_rows,
                max_columns: self.max_columns,
            });
        }
        if rows == 0 || columns == 0 {
            return Err(ImagingError::Unsupported(format!(
                "empty image ({rows}x{columns})"
            )));
        }
        Ok(())
    }
}

/// Grayscale stored sample values of one frame, row-major.
#[derive(Debug, Clone, PartialEq)]
pub enum Samples {
    U8(Array2<u8>),
    U16(Array2<u16>),
    I16(Array2<i16>),
}

impl Samples {
    /// (rows, columns)
    pub fn dim(&self) -> (usize, usize) {
        match self {
            Samples::U8(a) => a.dim(),
            Samples::U16(a) => a.dim(),
            Samples::I16(a) => a.dim(),
        }
    }
}

/// A LUT table from a Modality or VOI LUT Sequence: input values from `first_mapped` on map
/// to successive entries; inputs outside the table clamp to its first or last entry.
#[derive(Debug, Clone, PartialEq)]
pub struct VoiTable {
    pub first_mapped: i32,
    pub bits: u8,
    pub data: Vec<u16>,
}

impl VoiTable {
    pub fn lookup(&self, x: f64) -> f64 {
        let index =
            (x.round() as i64 - i64::from(self.first_mapped)).clamp(0, self.data.len() as i64 - 1);
        f64::from(self.data[index as usize])
    }
}

/// The modality LUT: stored values to modality units (PS3.3 C.11.1).
#[derive(Debug, Clone, PartialEq)]
pub enum Modality {
    /// Rescale Slope and Intercept (identity when absent).
    Rescale { slope: f64, intercept: f64 },
    /// The first item of the Modality LUT Sequence.
    Table(VoiTable),
}

impl Modality {
    #[inline]
    pub fn apply(&self, stored: f64) -> f64 {
        match self {
            Modality::Rescale { slope, intercept } => slope * stored + intercept,
            Modality::Table(table) => table.lookup(stored),
        }
    }
}

/// How rescaled (modality) values become display values.
#[derive(Debug, Clone, PartialEq)]
pub enum Voi {
    /// Window centre/width with the file's VOI LUT Function (LINEAR by default).
    Window {
        center: f64,
        width: f64,
        function: VoiLutFunction,
    },
    /// The first table of the VOI LUT Sequence.
    Table(VoiTable),
    /// No VOI in the file: a robust window from the 0.5th to the 99.5th percentile of the
    /// rescaled values, computed from the image itself.
    Percentile,
    /// Already-rendered 8/16-bit pictures (JPEG/PNG): the full sample range.
    FullRange,
}

/// One decoded image with everything needed to display it, and the de-identified facts.
#[derive(Debug, Clone)]
pub struct Decoded {
    pub samples: Samples,
    pub bits_stored: u16,
    pub modality: Modality,
    pub voi: Voi,
    /// MONOCHROME1: the lowest value is white, so display values are inverted.
    pub invert: bool,
    pub source: Source,
    pub patient: Patient,
    pub acquisition: Acquisition,
    pub notes: Vec<String>,
    /// Set when `samples` are not the full-resolution pixels (a reduced decode): the image's
    /// identity, then a hash of its codestream, which [`Decoded::pixel_sha256`] returns.
    pub identity: Option<String>,
}

/// What a decode for the model may skip. A JPEG 2000 frame is decoded with as many resolution
/// levels discarded as keep its shorter side at least `min_side` (the model input); the
/// identity of such a decode is the SHA-256 of its codestream, because the full-resolution
/// pixels are never made. Lossy JPEG 2000 is reduced whenever `min_side` is set (its pixels
/// never matched another syntax's copy anyway); lossless JPEG 2000 only with `lossless`, since
/// it then no longer de-duplicates against an uncompressed copy of the same image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reduction {
    /// Shorter side the decoded samples must keep; 0 decodes at full resolution.
    pub min_side: u32,
    /// Also reduce JPEG 2000 lossless frames.
    pub lossless: bool,
}

/// Display value in [0, 1] for every possible stored sample value (256 or 65536 entries).
#[derive(Debug, Clone)]
pub struct DisplayLut {
    table: Vec<f32>,
}

impl DisplayLut {
    /// Display value of a stored sample, indexed by its 8 or 16 bit pattern.
    #[inline]
    pub fn get(&self, index: usize) -> f32 {
        self.table[index]
    }
}

/// Sample types that index a [`DisplayLut`].
pub trait Sample: Copy + Send + Sync + 'static {
    fn lut_index(self) -> usize;
    fn value(self) -> f64;
}

impl Sample for u8 {
    #[inline]
    fn lut_index(self) -> usize {
        self as usize
    }
    fn value(self) -> f64 {
        f64::from(self)
    }
}

impl Sample for u16 {
    #[inline]
    fn lut_index(self) -> usize {
        self as usize
    }
    fn value(self) -> f64 {
        f64::from(self)
    }
}

impl Sample for i16 {
    #[inline]
    fn lut_index(self) -> usize {
        // The two's complement bit pattern: every i16 has its own slot in a 65536 table.
        usize::from(self as u16)
    }
    fn value(self) -> f64 {
        f64::from(self)
    }
}

impl Decoded {
    /// The modality LUT output, as pydicom's `apply_rescale` (apply_modality_lut) gives it.
    pub fn modality_values(&self) -> Array2<f64> {
        fn apply<T: Sample>(samples: &Array2<T>, modality: &Modality) -> Array2<f64> {
            samples.mapv(|v| modality.apply(v.value()))
        }
        match &self.samples {
            Samples::U8(a) => apply(a, &self.modality),
            Samples::U16(a) => apply(a, &self.modality),
            Samples::I16(a) => apply(a, &self.modality),
        }
    }

    /// SHA-256 (hex) over the decoded stored samples of the frame, with its shape and sample
    /// type, so that equal pixels give equal hashes whatever the container or header says.
    ///
    /// For a reduced decode ([`Reduction`]) it is the codestream's identity instead.
    pub fn pixel_sha256(&self) -> String {
        if let Some(identity) = &self.identity {
            return identity.clone();
        }
        let mut hasher = Sha256::new();
        let (rows, cols) = self.samples.dim();
        let kind: &[u8] = match self.samples {
            Samples::U8(_) => b"u8",
            Samples::U16(_) => b"u16",
            Samples::I16(_) => b"i16",
        };
        hasher.update(b"cxrfed-pixels-v1\0");
        hasher.update(kind);
        hasher.update((rows as u64).to_le_bytes());
        hasher.update((cols as u64).to_le_bytes());
        // The samples are hashed as little-endian bytes. On little-endian machines that is their
        // memory layout, hashed in place (one pass at SHA-NI speed, no copy).
        let contiguous: Option<&[u8]> = if cfg!(target_endian = "little") {
            match &self.samples {
                Samples::U8(a) => a.as_slice(),
                Samples::U16(a) => a.as_slice().map(bytemuck::cast_slice),
                Samples::I16(a) => a.as_slice().map(bytemuck::cast_slice),
            }
        } else {
            None
        };
        match contiguous {
            Some(bytes) => hasher.update(bytes),
            None => {
                let mut buf = Vec::with_capacity(16 * 1024);
                let mut feed = |values: &mut dyn Iterator<Item = [u8; 2]>| {
                    buf.clear();
                    buf.extend(values.flatten());
                    hasher.update(&buf);
                };
                match &self.samples {
                    Samples::U8(a) => {
                        for row in a.rows() {
                            hasher.update(row.iter().copied().collect::<Vec<u8>>());
                        }
                    }
                    Samples::U16(a) => {
                        for row in a.rows() {
                            feed(&mut row.iter().map(|v| v.to_le_bytes()));
                        }
                    }
                    Samples::I16(a) => {
                        for row in a.rows() {
                            feed(&mut row.iter().map(|v| v.to_le_bytes()));
                        }
                    }
                }
            }
        }
        hex::encode(hasher.finalize())
    }

    /// Builds the stored-value -> display-value table (modality LUT, VOI, MONOCHROME1).
    pub fn display_lut(&self) -> DisplayLut {
        let modality = &self.modality;
        let size = match self.samples {
            Samples::U8(_) => 256,
            _ => 65536,
        };
        // The stored value that sits at each table slot.
        let stored = |index: usize| -> f64 {
            match self.samples {
                Samples::I16(_) => f64::from(index as u16 as i16),
                _ => index as f64,
            }
        };
        let voi: Box<dyn Fn(f64) -> f64> = match &self.voi {
            Voi::Window {
                center,
                width,
                function,
            } => {
                let transform = WindowLevelTransform::new(
                    *function,
                    WindowLevel {
                        center: *center,
                        width: *width,
                    },
                );
                Box::new(move |x| transform.apply(x, 1.0))
            }
            Voi::Table(table) => {
                let max = ((1u32 << table.bits.clamp(1, 16)) - 1) as f64;
                let table = table.clone();
                Box::new(move |x| table.lookup(x) / max)
            }
            Voi::Percentile => {
                let (lo, hi) = self.percentile_window(0.005, 0.995);
                let (lo, hi) = (modality.apply(lo), modality.apply(hi));
                let (lo, hi) = if lo <= hi { (lo, hi) } else { (hi, lo) };
                let span = (hi - lo).max(f64::EPSILON);
                Box::new(move |x| ((x - lo) / span).clamp(0.0, 1.0))
            }
            Voi::FullRange => {
                let max = ((1u32 << self.bits_stored.clamp(1, 16)) - 1) as f64;
                Box::new(move |x| (x / max).clamp(0.0, 1.0))
            }
        };
        let invert = self.invert;
        let table = (0..size)
            .map(|index| {
                let y = voi(modality.apply(stored(index))).clamp(0.0, 1.0);
                (if invert { 1.0 - y } else { y }) as f32
            })
            .collect();
        DisplayLut { table }
    }

    /// Stored values at the given quantiles, from a histogram of the samples.
    fn percentile_window(&self, low_q: f64, high_q: f64) -> (f64, f64) {
        fn quantiles<T: Sample>(
            samples: &Array2<T>,
            bins: usize,
            low_q: f64,
            high_q: f64,
            value_of: impl Fn(usize) -> f64,
        ) -> (f64, f64) {
            let mut histogram = vec![0u64; bins];
            for v in samples.iter() {
                histogram[v.lut_index()] += 1;
            }
            // Walk the bins in value order (signed samples wrap around in bit-pattern order).
            let mut order: Vec<usize> = (0..bins).collect();
            order.sort_by(|a, b| value_of(*a).total_cmp(&value_of(*b)));
            let total = samples.len() as f64;
            let (mut lo, mut hi) = (None, None);
            let mut seen = 0u64;
            for index in order {
                seen += histogram[index];
                let fraction = seen as f64 / total;
                if lo.is_none() && fraction > low_q {
                    lo = Some(value_of(index));
                }
                if hi.is_none() && fraction >= high_q {
                    hi = Some(value_of(index));
                    break;
                }
            }
            let lo = lo.unwrap_or(0.0);
            (lo, hi.unwrap_or(lo))
        }
        match &self.samples {
            Samples::U8(a) => quantiles(a, 256, low_q, high_q, |i| i as f64),
            Samples::U16(a) => quantiles(a, 65536, low_q, high_q, |i| i as f64),
            Samples::I16(a) => quantiles(a, 65536, low_q, high_q, |i| f64::from(i as u16 as i16)),
        }
    }
}

/// Decodes `bytes` (DICOM Part 10, JPEG or PNG), containing any panic inside a decoder.
///
/// A panic in third-party decoding code turns into [`ImagingError::DecoderPanic`] instead of
/// unwinding into the caller (and taking a server worker with it).
pub fn decode_contained(
    bytes: &[u8],
    limits: &Limits,
    secret: &SiteSecret,
) -> Result<Decoded, ImagingError> {
    contain(|| decode(bytes, limits, secret))
}

/// Runs `work`, turning a panic inside it into [`ImagingError::DecoderPanic`].
pub fn contain<T>(work: impl FnOnce() -> Result<T, ImagingError>) -> Result<T, ImagingError> {
    catch_unwind(AssertUnwindSafe(work)).unwrap_or(Err(ImagingError::DecoderPanic))
}

/// Decodes `bytes` (DICOM Part 10, JPEG or PNG); the format is sniffed from the content.
pub fn decode(bytes: &[u8], limits: &Limits, secret: &SiteSecret) -> Result<Decoded, ImagingError> {
    decode_within(bytes, limits, secret, None, Reduction::default()).map(|(decoded, _)| decoded)
}

/// [`decode_contained`] under a shared memory budget: the estimated peak is reserved from
/// `budget` once the header is checked and before any pixel is decoded; the reservation is
/// returned so that the caller holds it for as long as it keeps the full-resolution samples.
pub fn decode_reserving(
    bytes: &[u8],
    limits: &Limits,
    secret: &SiteSecret,
    budget: &MemoryBudget,
) -> Result<(Decoded, Option<Reservation>), ImagingError> {
    contain(|| decode_within(bytes, limits, secret, Some(budget), Reduction::default()))
}

/// [`decode_reserving`] for the model: where the codec allows it, only what `reduction` says
/// the model needs is decoded (see [`Reduction`]).
pub fn decode_for_model(
    bytes: &[u8],
    limits: &Limits,
    secret: &SiteSecret,
    budget: &MemoryBudget,
    reduction: Reduction,
) -> Result<(Decoded, Option<Reservation>), ImagingError> {
    contain(|| decode_within(bytes, limits, secret, Some(budget), reduction))
}

fn decode_within(
    bytes: &[u8],
    limits: &Limits,
    secret: &SiteSecret,
    budget: Option<&MemoryBudget>,
    reduction: Reduction,
) -> Result<(Decoded, Option<Reservation>), ImagingError> {
    if bytes.len() as u64 > limits.max_file_bytes {
        return Err(ImagingError::FileTooLarge {
            size: bytes.len() as u64,
            limit: limits.max_file_bytes,
        });
    }
    match sniff(bytes)? {
        Format::Dicom => decode_dicom(&bytes[128..], limits, secret, budget, reduction),
        Format::DicomNoPreamble => decode_dicom(bytes, limits, secret, budget, reduction),
        Format::Png => decode_raster(bytes, image::ImageFormat::Png, limits, budget),
        Format::Jpeg => decode_raster(bytes, image::ImageFormat::Jpeg, limits, budget),
    }
}

/// Peak bytes a decode of `pixels` samples of `bytes_per_pixel` holds at once, beside the file:
/// the codec's output, dicom-pixeldata's frame copy, the samples and preprocessing's
/// full-resolution intermediate.
fn decode_peak(file_bytes: usize, pixels: u64, bytes_per_pixel: u64) -> u64 {
    file_bytes as u64 + 4 * pixels * bytes_per_pixel.max(2)
}

fn reserve(
    budget: Option<&MemoryBudget>,
    bytes: u64,
    what: &str,
) -> Result<Option<Reservation>, ImagingError> {
    budget.map(|b| b.reserve(bytes, what)).transpose()
}

fn header_u32(
    obj: &DefaultDicomObject,
    tag: dicom_core::Tag,
    name: &str,
) -> Result<u32, ImagingError> {
    if obj.get(tag).is_none() {
        return Err(ImagingError::MalformedDicom(format!(
            "missing required attribute {name}"
        )));
    }
    attr::unsigned(obj, tag)
        .ok_or_else(|| ImagingError::MalformedDicom(format!("attribute {name} is not a number")))
}

fn header_u32_or(obj: &DefaultDicomObject, tag: dicom_core::Tag, default: u32) -> u32 {
    attr::unsigned(obj, tag).unwrap_or(default)
}

fn decode_dicom(
    bytes: &[u8],
    limits: &Limits,
    secret: &SiteSecret,
    budget: Option<&MemoryBudget>,
    reduction: Reduction,
) -> Result<(Decoded, Option<Reservation>), ImagingError> {
    // Declared lengths, inflation and nesting are checked before dicom-object allocates any.
    let inflate_cap = limits.max_file_bytes.max(64 << 20);
    scan::check(bytes, inflate_cap)?;
    let mut obj = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Never)
        .from_reader(bytes)
        .map_err(|e| {
            ImagingError::MalformedDicom(format!("{} (truncated or corrupt file)", describe(&e)))
        })?;

    let ts_uid = obj
        .meta()
        .transfer_syntax()
        .trim_end_matches(['\0', ' '])
        .to_string();
    let Some(ts_name) = syntax::supported_name(&ts_uid) else {
        return Err(ImagingError::UnsupportedTransferSyntax {
            name: syntax::name_of(&ts_uid),
            uid: ts_uid,
        });
    };

    // Pixels that may show identifying text are refused before anything of them is decoded.
    if let Some(reason) = deidentify::burned_in_refusal(&obj, limits.burned_in) {
        return Err(ImagingError::Quarantined(reason));
    }

    // Everything about the geometry is checked on the header, before pixel data is decoded.
    let rows = header_u32(&obj, tags::ROWS, "Rows")?;
    let columns = header_u32(&obj, tags::COLUMNS, "Columns")?;
    limits.check_dimensions(u64::from(rows), u64::from(columns))?;
    let bits_allocated = header_u32(&obj, tags::BITS_ALLOCATED, "BitsAllocated")?;
    let bits_stored = header_u32_or(&obj, tags::BITS_STORED, bits_allocated);
    let samples_per_pixel = header_u32_or(&obj, tags::SAMPLES_PER_PIXEL, 1);
    let frames = header_u32_or(&obj, tags::NUMBER_OF_FRAMES, 1).max(1);
    if !matches!(bits_allocated, 8 | 16) {
        return Err(ImagingError::Unsupported(format!(
            "BitsAllocated {bits_allocated} (8 and 16 are supported)"
        )));
    }
    if bits_stored == 0 || bits_stored > bits_allocated {
        return Err(ImagingError::Unsupported(format!(
            "BitsStored {bits_stored} with BitsAllocated {bits_allocated}"
        )));
    }
    if !matches!(samples_per_pixel, 1 | 3) {
        return Err(ImagingError::Unsupported(format!(
            "SamplesPerPixel {samples_per_pixel}"
        )));
    }
    if obj.get(tags::PIXEL_DATA).is_none() {
        return Err(ImagingError::Unsupported(
            "the file has no Pixel Data".into(),
        ));
    }
    let signed = header_u32_or(&obj, tags::PIXEL_REPRESENTATION, 0) == 1;
    let photometric = attr::text(&obj, tags::PHOTOMETRIC_INTERPRETATION);
    let native = syntax::is_native(&ts_uid);
    if native && photometric == "YBR_FULL_422" {
        return Err(ImagingError::Unsupported(
            "uncompressed chroma-subsampled colour (YBR_FULL_422) pixel data".into(),
        ));
    }
    if ts_uid == "1.2.840.10008.1.2.4.51" && bits_stored > 8 {
        return Err(ImagingError::Unsupported(format!(
            "{bits_stored}-bit JPEG Extended (Process 4): only 8-bit JPEG Extended is decoded"
        )));
    }

    let header = PixelHeader {
        ts_uid,
        ts_name,
        rows,
        columns,
        bits_allocated,
        bits_stored,
        frames,
        signed,
        photometric,
    };
    let mut notes = Vec::new();
    if frames > 1 {
        notes.push(format!("multi-frame: first of {frames} frames used"));
    }

    let pixels_total = u64::from(rows) * u64::from(columns);
    let reservation = reserve(
        budget,
        decode_peak(
            bytes.len(),
            pixels_total,
            u64::from(samples_per_pixel) * u64::from(bits_allocated / 8),
        ),
        &format!("a {rows}x{columns} image"),
    )?;
    if !native {
        let fragment = first_fragment(&obj)?;
        codestream::check(
            &header.ts_uid,
            fragment,
            &codestream::Expected {
                rows,
                columns,
                samples_per_pixel,
                bits_allocated,
            },
            limits,
        )?;
    }

    let (mask, sign_shift) = stored_bits(bits_stored);
    if let Some(reduced) = decode_reduced(&obj, &header, samples_per_pixel, reduction)? {
        let (samples, identity, note) = reduced;
        notes.push(note);
        let mut decoded = finish_dicom(&obj, secret, &header, samples, notes, false);
        decoded.identity = Some(identity);
        return Ok((decoded, reservation));
    }
    let shape = (rows as usize, columns as usize);
    // Fast path: uncompressed 16-bit grayscale is already in memory as u16 samples. Taking the
    // buffer out of the parsed object (no copy) and masking it in place saves two full-image
    // copies through dicom-pixeldata.
    if native
        && samples_per_pixel == 1
        && bits_allocated == 16
        && let Some(element) = obj.take(tags::PIXEL_DATA)
    {
        if let Some(dicom_core::PrimitiveValue::U16(_)) = element.value().primitive() {
            let Some(dicom_core::PrimitiveValue::U16(values)) =
                element.into_value().into_primitive()
            else {
                unreachable!("checked to be a U16 primitive just above");
            };
            let mut values = values.into_vec();
            let pixels = shape.0 * shape.1;
            if values.len() < pixels {
                return Err(ImagingError::Corrupt(format!(
                    "pixel data holds {} samples, {pixels} expected",
                    values.len()
                )));
            }
            values.truncate(pixels);
            let samples = if signed {
                let mut values: Vec<i16> = bytemuck::allocation::cast_vec(values);
                for v in &mut values {
                    *v = (*v << sign_shift) >> sign_shift;
                }
                Samples::I16(Array2::from_shape_vec(shape, values).expect("length checked"))
            } else {
                for v in &mut values {
                    *v &= mask;
                }
                Samples::U16(Array2::from_shape_vec(shape, values).expect("length checked"))
            };
            return Ok((
                finish_dicom(&obj, secret, &header, samples, notes, false),
                reservation,
            ));
        }
        obj.put(element);
    }

    let pixel = obj
        .decode_pixel_data_frame(0)
        .map_err(|e| ImagingError::Corrupt(describe(&e)))?;
    if pixel.rows() != rows || pixel.columns() != columns {
        return Err(ImagingError::Corrupt(format!(
            "decoded {}x{} pixels, header says {rows}x{columns}",
            pixel.rows(),
            pixel.columns()
        )));
    }
    let data = pixel
        .frame_data(0)
        .map_err(|e| ImagingError::Corrupt(first_line(&e.to_string())))?;
    let pixels = rows as usize * columns as usize;
    let bytes_per_sample = bits_allocated as usize / 8;
    let spp = pixel.samples_per_pixel() as usize;
    let expected = pixels * bytes_per_sample * spp;
    if data.len() < expected {
        return Err(ImagingError::Corrupt(format!(
            "pixel data holds {} bytes, {expected} expected",
            data.len()
        )));
    }
    let decoded_photometric = pixel.photometric_interpretation().to_string();
    let planar = pixel.planar_configuration() != dicom_pixeldata::PlanarConfiguration::Standard;

    let samples = if spp == 1 {
        match (bits_allocated, signed) {
            (8, false) => Samples::U8(vec_to_array(
                shape,
                data[..pixels].iter().map(|v| v & mask as u8),
            )),
            (8, true) => Samples::I16(vec_to_array(
                shape,
                data[..pixels].iter().map(|v| i16::from(*v as i8)),
            )),
            (_, false) => Samples::U16(vec_to_array(
                shape,
                data[..pixels * 2]
                    .chunks_exact(2)
                    .map(|c| u16::from_ne_bytes([c[0], c[1]]) & mask),
            )),
            (_, true) => Samples::I16(vec_to_array(
                shape,
                // Sign-extend from BitsStored, discarding any bits above it (overlays, garbage).
                data[..pixels * 2].chunks_exact(2).map(|c| {
                    ((u16::from_ne_bytes([c[0], c[1]]) << sign_shift) as i16) >> sign_shift
                }),
            )),
        }
    } else {
        notes.push(format!(
            "colour ({decoded_photometric}) converted to grayscale"
        ));
        let luma_only = decoded_photometric.starts_with("YBR");
        color_to_gray(data, shape, bits_allocated, planar, luma_only)
    };

    Ok((
        finish_dicom(&obj, secret, &header, samples, notes, spp != 1),
        reservation,
    ))
}

/// The mask of the `bits_stored` low bits of a 16-bit sample, and the shift that sign-extends
/// a value of that width.
fn stored_bits(bits_stored: u32) -> (u16, u32) {
    let mask = if bits_stored >= 16 {
        u16::MAX
    } else {
        (1u16 << bits_stored) - 1
    };
    (mask, 16 - bits_stored)
}

/// The reduced-resolution decode of a single-frame grayscale JPEG 2000 image, if `reduction`
/// asks for one and the codestream allows it: the samples (masked and sign-extended as a full
/// decode's), the codestream identity and a processing note. `Ok(None)`: decode in full.
fn decode_reduced(
    obj: &DefaultDicomObject,
    header: &PixelHeader,
    samples_per_pixel: u32,
    reduction: Reduction,
) -> Result<Option<(Samples, String, String)>, ImagingError> {
    let reducible = match header.ts_uid.as_str() {
        "1.2.840.10008.1.2.4.91" => true,
        "1.2.840.10008.1.2.4.90" => reduction.lossless,
        _ => false,
    };
    if !reducible || reduction.min_side == 0 || samples_per_pixel != 1 || header.frames != 1 {
        return Ok(None);
    }
    let Some(dicom_core::DicomValue::PixelSequence(sequence)) =
        obj.get(tags::PIXEL_DATA).map(|e| e.value())
    else {
        return Ok(None);
    };
    // A single frame is every fragment, in order.
    let fragments = sequence.fragments();
    let joined: Vec<u8>;
    let codestream: &[u8] = if fragments.len() == 1 {
        &fragments[0]
    } else {
        joined = fragments.iter().flat_map(|f| f.iter().copied()).collect();
        &joined
    };
    let Some(levels) = codestream::j2k_levels(codestream) else {
        return Ok(None);
    };
    let factor = crate::j2k::factor_for(header.rows, header.columns, reduction.min_side, levels);
    if factor == 0 {
        return Ok(None);
    }
    let Some(reduced) = crate::j2k::decode_reduced(codestream, factor) else {
        return Ok(None);
    };
    let expected = (
        header.rows.div_ceil(1 << factor) as usize,
        header.columns.div_ceil(1 << factor) as usize,
    );
    if (reduced.rows, reduced.columns) != expected {
        return Err(ImagingError::Corrupt(format!(
            "the JPEG 2000 codestream decodes to {}x{} at 1/{}, the header says {}x{}",
            reduced.rows,
            reduced.columns,
            1u32 << factor,
            header.rows,
            header.columns
        )));
    }
    let (mask, sign_shift) = stored_bits(header.bits_stored);
    let values = reduced.samples.iter();
    let samples = match (header.bits_allocated, header.signed) {
        (8, false) => Samples::U8(vec_to_array(
            expected,
            values.map(|v| *v as u8 & mask as u8),
        )),
        (_, false) => Samples::U16(vec_to_array(expected, values.map(|v| *v as u16 & mask))),
        (_, true) => Samples::I16(vec_to_array(
            expected,
            values.map(|v| ((*v as u16) << sign_shift) as i16 >> sign_shift),
        )),
    };
    let mut hasher = Sha256::new();
    hasher.update(b"cxrfed-j2k-codestream-v1\0");
    hasher.update(u64::from(header.rows).to_le_bytes());
    hasher.update(u64::from(header.columns).to_le_bytes());
    hasher.update(codestream);
    let identity = hex::encode(hasher.finalize());
    let note = format!(
        "JPEG 2000 decoded at 1/{} resolution ({}x{}) for the model; identity from the codestream",
        1u32 << factor,
        expected.0,
        expected.1
    );
    Ok(Some((samples, identity, note)))
}

/// The first fragment of an encapsulated Pixel Data element (where frame 0's codestream
/// header is).
fn first_fragment(obj: &DefaultDicomObject) -> Result<&[u8], ImagingError> {
    let element = obj
        .get(tags::PIXEL_DATA)
        .ok_or_else(|| ImagingError::Unsupported("the file has no Pixel Data".into()))?;
    match element.value() {
        dicom_core::DicomValue::PixelSequence(sequence) => sequence
            .fragments()
            .iter()
            .find(|f| !f.is_empty())
            .map(|f| f.as_slice())
            .ok_or_else(|| {
                ImagingError::Corrupt("the encapsulated Pixel Data has no fragments".into())
            }),
        _ => Err(ImagingError::Corrupt(
            "a compressed transfer syntax with native (unencapsulated) Pixel Data".into(),
        )),
    }
}

/// What the header says about the pixels, read and checked before any pixel decoding.
#[derive(Debug)]
struct PixelHeader {
    ts_uid: String,
    ts_name: &'static str,
    rows: u32,
    columns: u32,
    bits_allocated: u32,
    bits_stored: u32,
    frames: u32,
    signed: bool,
    photometric: String,
}

/// Builds the [`Decoded`] image from grayscale samples and the header. Colour images were
/// reduced to luma already: they get no modality LUT, no VOI window and no inversion.
fn finish_dicom(
    obj: &DefaultDicomObject,
    secret: &SiteSecret,
    header: &PixelHeader,
    samples: Samples,
    mut notes: Vec<String>,
    colour: bool,
) -> Decoded {
    let (modality, voi, invert, bits) = if colour {
        (
            Modality::Rescale {
                slope: 1.0,
                intercept: 0.0,
            },
            Voi::FullRange,
            false,
            header.bits_allocated,
        )
    } else {
        (
            modality_lut(obj, header.signed),
            dicom_voi(obj, header.signed),
            header.photometric == "MONOCHROME1",
            header.bits_stored,
        )
    };
    let deid = deidentify::from_dicom(obj, secret);
    let source = Source {
        format: Some(ImageFormat::Dicom),
        transfer_syntax_uid: header.ts_uid.clone(),
        transfer_syntax_name: header.ts_name.to_string(),
        modality: deid.modality,
        manufacturer: deid.manufacturer,
        rows: header.rows,
        columns: header.columns,
        bits_stored: header.bits_stored,
        photometric_interpretation: header.photometric.clone(),
        number_of_frames: header.frames,
        body_part: deid.body_part,
    };
    if syntax::is_lossy(&header.ts_uid) {
        notes.push("lossy-compressed source".to_string());
    }
    Decoded {
        samples,
        bits_stored: bits as u16,
        modality,
        voi,
        invert,
        source,
        patient: deid.patient,
        acquisition: deid.acquisition,
        notes,
        identity: None,
    }
}

/// Rescale Slope/Intercept, or the first Modality LUT Sequence item when present.
fn modality_lut(obj: &DefaultDicomObject, signed: bool) -> Modality {
    match lut_table(obj, tags::MODALITY_LUT_SEQUENCE, signed) {
        Some(table) => Modality::Table(table),
        None => Modality::Rescale {
            slope: attr::number(obj, tags::RESCALE_SLOPE)
                .filter(|s| *s != 0.0)
                .unwrap_or(1.0),
            intercept: attr::number(obj, tags::RESCALE_INTERCEPT).unwrap_or(0.0),
        },
    }
}

/// The first item of a Modality or VOI LUT Sequence as a table (PS3.3 C.11.1.1, C.11.2.1.1).
fn lut_table(
    obj: &DefaultDicomObject,
    sequence: dicom_core::Tag,
    signed: bool,
) -> Option<VoiTable> {
    let item = obj.get(sequence)?.items()?.first()?;
    let descriptor: Vec<i32> = item
        .get(tags::LUT_DESCRIPTOR)?
        .value()
        .to_multi_int::<i32>()
        .ok()?;
    let data: Vec<u16> = item
        .get(tags::LUT_DATA)?
        .value()
        .to_multi_int::<u16>()
        .ok()?;
    let [_entries, first, bits] = descriptor[..] else {
        return None;
    };
    // The first mapped value is US or SS following Pixel Representation.
    let first_mapped = if signed {
        i32::from(first as u16 as i16)
    } else {
        first & 0xFFFF
    };
    (!data.is_empty()).then(|| VoiTable {
        first_mapped,
        bits: bits.clamp(1, 16) as u8,
        data,
    })
}

/// The VOI transform of a grayscale image: the first VOI LUT Sequence item, else the first
/// window, else a percentile window computed from the pixels.
fn dicom_voi(obj: &DefaultDicomObject, signed: bool) -> Voi {
    // PS3.3 C.11.2 leaves the choice to the implementation when both a VOI LUT Sequence and a
    // window are present; like pydicom and dicom-pixeldata we prefer the table.
    if let Some(table) = lut_table(obj, tags::VOILUT_SEQUENCE, signed) {
        return Voi::Table(table);
    }
    if let (Some(center), Some(width)) = (
        attr::number(obj, tags::WINDOW_CENTER),
        attr::number(obj, tags::WINDOW_WIDTH),
    ) && width > 0.0
        && center.is_finite()
        && width.is_finite()
    {
        let function = match attr::text(obj, tags::VOILUT_FUNCTION).as_str() {
            "SIGMOID" => VoiLutFunction::Sigmoid,
            "LINEAR_EXACT" => VoiLutFunction::LinearExact,
            _ => VoiLutFunction::Linear,
        };
        return Voi::Window {
            center,
            width,
            function,
        };
    }
    Voi::Percentile
}

fn color_to_gray(
    data: &[u8],
    shape: (usize, usize),
    bits_allocated: u32,
    planar: bool,
    luma_only: bool,
) -> Samples {
    let n = shape.0 * shape.1;
    let sample = |channel: usize, i: usize| -> f32 {
        let index = if planar {
            channel * n + i
        } else {
            i * 3 + channel
        };
        if bits_allocated == 8 {
            f32::from(data[index])
        } else {
            f32::from(u16::from_ne_bytes([data[index * 2], data[index * 2 + 1]]))
        }
    };
    // ITU-R BT.601 luma; for YBR data the Y channel already is the luma.
    let gray = move |i: usize| -> f32 {
        if luma_only {
            sample(0, i)
        } else {
            0.299 * sample(0, i) + 0.587 * sample(1, i) + 0.114 * sample(2, i)
        }
    };
    if bits_allocated == 8 {
        Samples::U8(vec_to_array(
            shape,
            (0..n).map(|i| gray(i).round().clamp(0.0, 255.0) as u8),
        ))
    } else {
        Samples::U16(vec_to_array(
            shape,
            (0..n).map(|i| gray(i).round().clamp(0.0, 65535.0) as u16),
        ))
    }
}

fn vec_to_array<T>(shape: (usize, usize), values: impl Iterator<Item = T>) -> Array2<T> {
    let data: Vec<T> = values.collect();
    Array2::from_shape_vec(shape, data)
        .expect("the caller checked that the buffer matches the shape")
}

fn decode_raster(
    bytes: &[u8],
    format: image::ImageFormat,
    limits: &Limits,
    budget: Option<&MemoryBudget>,
) -> Result<(Decoded, Option<Reservation>), ImagingError> {
    let corrupt = |e: image::ImageError| match e {
        image::ImageError::Limits(l) => ImagingError::ResourceLimit(first_line(&l.to_string())),
        e => ImagingError::Corrupt(first_line(&e.to_string())),
    };
    let (width, height) = image::ImageReader::with_format(Cursor::new(bytes), format)
        .into_dimensions()
        .map_err(corrupt)?;
    limits.check_dimensions(u64::from(height), u64::from(width))?;
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    let mut image_limits = image::Limits::default();
    image_limits.max_image_width = Some(limits.max_columns);
    image_limits.max_image_height = Some(limits.max_rows);
    // The decoder's own allocations, at most an RGBA16 image of the checked size.
    let pixels = u64::from(width) * u64::from(height);
    image_limits.max_alloc = Some(pixels * 8 + (1 << 20));
    reader.limits(image_limits);
    let reservation = reserve(
        budget,
        decode_peak(bytes.len(), pixels, 8),
        &format!("a {height}x{width} image"),
    )?;
    let image = reader.decode().map_err(corrupt)?;
    let mut notes = Vec::new();
    let color = image.color();
    let shape = (height as usize, width as usize);
    let sixteen = color.bytes_per_pixel() / color.channel_count().max(1) >= 2;
    if color.has_color() {
        notes.push(format!("colour ({color:?}) converted to grayscale"));
    }
    let (samples, bits) = if sixteen {
        let gray = image.into_luma16();
        (
            Samples::U16(vec_to_array(shape, gray.into_raw().into_iter())),
            16,
        )
    } else {
        let gray = image.into_luma8();
        (
            Samples::U8(vec_to_array(shape, gray.into_raw().into_iter())),
            8,
        )
    };
    let (image_format, name) = match format {
        image::ImageFormat::Png => (ImageFormat::Png, "PNG"),
        _ => (ImageFormat::Jpeg, "JPEG"),
    };
    Ok((
        Decoded {
            samples,
            bits_stored: bits,
            modality: Modality::Rescale {
                slope: 1.0,
                intercept: 0.0,
            },
            voi: Voi::FullRange,
            invert: false,
            source: Source {
                format: Some(image_format),
                rows: height,
                columns: width,
                bits_stored: u32::from(bits),
                photometric_interpretation: if color.has_color() {
                    "RGB"
                } else {
                    "MONOCHROME2"
                }
                .to_string(),
                number_of_frames: 1,
                transfer_syntax_name: name.to_string(),
                ..Source::default()
            },
            patient: Patient::default(),
            acquisition: Acquisition::default(),
            notes,
            identity: None,
        },
        reservation,
    ))
}

/// One line from an error and its sources, saying "truncated" when the data ran out. Decoder
/// errors name tags and positions, never element values.
fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = Vec::new();
    let mut truncated = false;
    let mut current = Some(error);
    while let Some(e) = current {
        let text = first_line(&e.to_string());
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            truncated |= io.kind() == std::io::ErrorKind::UnexpectedEof;
        }
        truncated |= text.to_ascii_lowercase().contains("end of file");
        if !text.is_empty() && !parts.contains(&text) && parts.len() < 4 {
            parts.push(text);
        }
        current = e.source();
    }
    let detail = parts.join(": ");
    if truncated {
        format!("the file is truncated ({detail})")
    } else {
        detail
    }
}

/// Keeps error messages to one line: decoder errors sometimes carry backtraces.
fn first_line(text: &str) -> String {
    text.lines()
        .next()
        .unwrap_or("")
        .chars()
        .take(300)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoded(samples: Samples, voi: Voi, invert: bool, bits: u16) -> Decoded {
        Decoded {
            samples,
            bits_stored: bits,
            modality: Modality::Rescale {
                slope: 1.0,
                intercept: 0.0,
            },
            voi,
            invert,
            source: Source::default(),
            patient: Patient::default(),
            acquisition: Acquisition::default(),
            notes: vec![],
            identity: None,
        }
    }

    fn encode(image: image::DynamicImage, format: image::ImageFormat) -> Vec<u8> {
        let mut out = Vec::new();
        image
            .write_to(&mut Cursor::new(&mut out), format)
            .expect("encode");
        out
    }

    #[test]
    fn png_16_bit_gray_keeps_its_depth() {
        let img = image::ImageBuffer::<image::Luma<u16>, _>::from_fn(40, 30, |x, y| {
            image::Luma([(x * 1000 + y) as u16])
        });
        let bytes = encode(
            image::DynamicImage::ImageLuma16(img),
            image::ImageFormat::Png,
        );
        let d = decode(&bytes, &Limits::default(), &SiteSecret::from_bytes([0; 32])).expect("png");
        assert_eq!(d.source.format, Some(ImageFormat::Png));
        assert_eq!(
            (d.source.rows, d.source.columns, d.source.bits_stored),
            (30, 40, 16)
        );
        let Samples::U16(a) = &d.samples else {
            panic!("16-bit samples expected")
        };
        assert_eq!(a[(2, 3)], 3002);
        assert!(d.notes.is_empty());
    }

    #[test]
    fn rgb_jpeg_becomes_gray_with_a_note() {
        let img = image::RgbImage::from_fn(32, 16, |x, _| image::Rgb([200, (x * 8) as u8, 10]));
        let bytes = encode(
            image::DynamicImage::ImageRgb8(img),
            image::ImageFormat::Jpeg,
        );
        let d = decode(&bytes, &Limits::default(), &SiteSecret::from_bytes([0; 32])).expect("jpeg");
        assert_eq!(d.source.format, Some(ImageFormat::Jpeg));
        assert!(matches!(d.samples, Samples::U8(_)));
        assert!(
            d.notes.iter().any(|n| n.contains("grayscale")),
            "{:?}",
            d.notes
        );
    }

    #[test]
    fn raster_dimensions_are_checked_on_the_header() {
        let img = image::GrayImage::from_pixel(120, 80, image::Luma([9]));
        let bytes = encode(
            image::DynamicImage::ImageLuma8(img),
            image::ImageFormat::Png,
        );
        let limits = Limits {
            max_rows: 64,
            max_columns: 64,
            ..Limits::default()
        };
        let err = decode(&bytes, &limits, &SiteSecret::from_bytes([0; 32])).expect_err("too large");
        assert!(
            matches!(
                err,
                ImagingError::DimensionsTooLarge {
                    rows: 80,
                    columns: 120,
                    ..
                }
            ),
            "{err}"
        );
        let err = decode(
            &bytes[..bytes.len() / 2],
            &Limits::default(),
            &SiteSecret::from_bytes([0; 32]),
        )
        .expect_err("truncated");
        assert!(matches!(err, ImagingError::Corrupt(_)), "{err}");
    }

    #[test]
    fn a_panic_becomes_an_error() {
        let result: Result<(), _> = contain(|| panic!("a decoder bug"));
        assert!(matches!(result, Err(ImagingError::DecoderPanic)));
        assert_eq!(contain(|| Ok(7)).expect("no panic"), 7);
    }

    proptest::proptest! {
        /// Every VOI function maps rescaled values monotonically into [0, 1].
        #[test]
        fn windows_are_monotonic(center in -2000.0f64..6000.0, width in 1.0f64..8000.0, f in 0usize..3) {
            let function = [VoiLutFunction::Linear, VoiLutFunction::LinearExact, VoiLutFunction::Sigmoid][f];
            let a = Array2::from_shape_vec((1, 1), vec![0u16]).expect("shape");
            let lut = decoded(Samples::U16(a), Voi::Window { center, width, function }, false, 16).display_lut();
            let mut previous = 0.0f32;
            for v in (0..65536usize).step_by(97) {
                let y = lut.get(v);
                proptest::prop_assert!((0.0..=1.0).contains(&y));
                proptest::prop_assert!(y + 1e-6 >= previous, "not monotonic at {v}");
                previous = y;
            }
        }
    }

    #[test]
    fn monochrome1_inverts_display_values() {
        let a = Array2::from_shape_vec((1, 3), vec![0u16, 2048, 4095]).expect("shape");
        let mono2 = decoded(Samples::U16(a.clone()), Voi::FullRange, false, 12).display_lut();
        let mono1 = decoded(Samples::U16(a), Voi::FullRange, true, 12).display_lut();
        assert_eq!(mono2.get(0), 0.0);
        assert_eq!(mono2.get(4095), 1.0);
        assert_eq!(mono1.get(0), 1.0);
        assert_eq!(mono1.get(4095), 0.0);
        for v in [0usize, 100, 2048, 4095] {
            assert!((mono1.get(v) + mono2.get(v) - 1.0).abs() < 1e-6);
        }
    }

    #[test]
    fn linear_window_follows_ps3_3() {
        // Centre 2048, width 1024: below 1535.5 is black, above 2559.5 white, linear between.
        let a = Array2::from_shape_vec((1, 1), vec![0u16]).expect("shape");
        let voi = Voi::Window {
            center: 2048.0,
            width: 1024.0,
            function: VoiLutFunction::Linear,
        };
        let lut = decoded(Samples::U16(a), voi, false, 12).display_lut();
        assert_eq!(lut.get(1000), 0.0);
        assert_eq!(lut.get(3000), 1.0);
        assert!((lut.get(2048) - 0.5).abs() < 0.01);
        assert!(lut.get(1800) < lut.get(2200));
    }

    #[test]
    fn signed_samples_use_their_twos_complement_slot() {
        let a = Array2::from_shape_vec((1, 2), vec![-1000i16, 1000]).expect("shape");
        let d = decoded(Samples::I16(a), Voi::Percentile, false, 12);
        let lut = d.display_lut();
        assert_eq!(lut.get((-1000i16).lut_index()), 0.0);
        assert_eq!(lut.get(1000i16.lut_index()), 1.0);
    }

    #[test]
    fn percentile_window_ignores_outliers() {
        let mut values = vec![1000u16; 10_000];
        values[0] = 0;
        values[1] = 65535;
        for (i, v) in values.iter_mut().enumerate().skip(2) {
            *v = 1000 + (i % 1000) as u16;
        }
        let a = Array2::from_shape_vec((100, 100), values).expect("shape");
        let lut = decoded(Samples::U16(a), Voi::Percentile, false, 16).display_lut();
        assert_eq!(lut.get(0), 0.0);
        assert_eq!(lut.get(65535), 1.0);
        // The window spans roughly 1005..1995, not 0..65535.
        assert!(
            lut.get(1500) > 0.4 && lut.get(1500) < 0.6,
            "{}",
            lut.get(1500)
        );
    }
}
