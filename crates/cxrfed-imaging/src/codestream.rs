//! What an encapsulated frame's own codestream says about its size, read before decoding.
//!
//! The decoders allocate from the codestream, not from the DICOM header: a JPEG whose SOF
//! claims 65535×65535 asks jpeg-decoder for gigabytes (its buffer limit is unbounded and
//! dicom-pixeldata gives no way to set it), a J2K SIZ marker does the same for OpenJPEG, and an
//! RLE header's segment count and PackBits runs decide what dicom-pixeldata's RLE reader
//! buffers (it expands a whole segment before truncating it). So the first fragment of the
//! frame is parsed here — JPEG SOF (ITU T.81 B.2.2, also JPEG-LS SOF55), J2K SIZ (ITU T.800
//! A.5.1), RLE header and segments (PS3.5 G) — and must agree with the checked header.
//! Only marker headers are read (tens of bytes), except for RLE, whose runs are counted, not
//! expanded.

use crate::{ImagingError, Limits};

/// The header's geometry, already checked against the limits.
#[derive(Debug, Clone, Copy)]
pub struct Expected {
    pub rows: u32,
    pub columns: u32,
    pub samples_per_pixel: u32,
    pub bits_allocated: u32,
}

/// Most tiles accepted in a J2K codestream (OpenJPEG keeps a structure per tile).
pub const MAX_J2K_TILES: u64 = 4096;

/// Checks the codestream of `fragment` (the frame's first fragment) for `ts_uid`.
pub fn check(
    ts_uid: &str,
    fragment: &[u8],
    expected: &Expected,
    limits: &Limits,
) -> Result<(), ImagingError> {
    match ts_uid {
        "1.2.840.10008.1.2.4.50"
        | "1.2.840.10008.1.2.4.51"
        | "1.2.840.10008.1.2.4.57"
        | "1.2.840.10008.1.2.4.70"
        | "1.2.840.10008.1.2.4.80"
        | "1.2.840.10008.1.2.4.81" => {
            let frame = jpeg_frame(fragment)?;
            agree(
                "JPEG",
                (frame.height, frame.width, frame.components),
                expected,
                limits,
            )?;
            if frame.precision > 16 {
                return Err(ImagingError::Unsupported(format!(
                    "JPEG sample precision {}",
                    frame.precision
                )));
            }
            Ok(())
        }
        "1.2.840.10008.1.2.4.90" | "1.2.840.10008.1.2.4.91" => {
            let siz = j2k_siz(fragment)?;
            agree(
                "JPEG 2000",
                (siz.height, siz.width, siz.components),
                expected,
                limits,
            )?;
            if siz.tiles > MAX_J2K_TILES {
                return Err(ImagingError::ResourceLimit(format!(
                    "the JPEG 2000 codestream has {} tiles, above the limit of {MAX_J2K_TILES}",
                    siz.tiles
                )));
            }
            if siz.max_depth > 16 {
                return Err(ImagingError::Unsupported(format!(
                    "JPEG 2000 component depth {}",
                    siz.max_depth
                )));
            }
            Ok(())
        }
        "1.2.840.10008.1.2.5" => rle(fragment, expected),
        _ => Ok(()),
    }
}

fn agree(
    codec: &str,
    (height, width, components): (u64, u64, u64),
    expected: &Expected,
    limits: &Limits,
) -> Result<(), ImagingError> {
    if height > u64::from(limits.max_rows) || width > u64::from(limits.max_columns) {
        return Err(ImagingError::ResourceLimit(format!(
            "the {codec} codestream claims {height}x{width} pixels, above the limit of {}x{} (the header says {}x{})",
            limits.max_rows, limits.max_columns, expected.rows, expected.columns
        )));
    }
    if height != u64::from(expected.rows) || width != u64::from(expected.columns) {
        return Err(ImagingError::Corrupt(format!(
            "the {codec} codestream is {height}x{width} pixels, the header says {}x{}",
            expected.rows, expected.columns
        )));
    }
    if components != u64::from(expected.samples_per_pixel) {
        return Err(ImagingError::Corrupt(format!(
            "the {codec} codestream has {components} components, the header says {} samples per pixel",
            expected.samples_per_pixel
        )));
    }
    Ok(())
}

#[derive(Debug, PartialEq)]
struct JpegFrame {
    precision: u8,
    height: u64,
    width: u64,
    components: u64,
}

fn be16(data: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(data.get(at..at + 2)?.try_into().ok()?))
}

fn be32(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(data.get(at..at + 4)?.try_into().ok()?))
}

fn le32(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?))
}

fn truncated(codec: &str) -> ImagingError {
    ImagingError::Corrupt(format!("the {codec} codestream header is truncated"))
}

/// The frame header (SOFn) of a JPEG codestream, found by walking its marker segments.
fn jpeg_frame(data: &[u8]) -> Result<JpegFrame, ImagingError> {
    if data.get(..2) != Some(&[0xFF, 0xD8]) {
        return Err(ImagingError::Corrupt(
            "the frame does not start with a JPEG SOI marker".into(),
        ));
    }
    let mut at = 2;
    loop {
        if data.get(at) != Some(&0xFF) {
            return Err(truncated("JPEG"));
        }
        // Fill bytes before a marker (T.81 B.1.1.2).
        while data.get(at + 1) == Some(&0xFF) {
            at += 1;
        }
        let marker = *data.get(at + 1).ok_or_else(|| truncated("JPEG"))?;
        match marker {
            0x01 | 0xD0..=0xD7 => {
                at += 2;
                continue;
            }
            0xDA | 0xD9 => {
                return Err(ImagingError::Corrupt(
                    "the JPEG codestream has no frame header before its first scan".into(),
                ));
            }
            _ => {}
        }
        let len = usize::from(be16(data, at + 2).ok_or_else(|| truncated("JPEG"))?);
        let is_sof = matches!(marker, 0xC0..=0xCF if !matches!(marker, 0xC4 | 0xC8 | 0xCC))
            || marker == 0xF7;
        if is_sof {
            let precision = *data.get(at + 4).ok_or_else(|| truncated("JPEG"))?;
            let height = be16(data, at + 5).ok_or_else(|| truncated("JPEG"))?;
            let width = be16(data, at + 7).ok_or_else(|| truncated("JPEG"))?;
            let components = *data.get(at + 9).ok_or_else(|| truncated("JPEG"))?;
            if height == 0 {
                return Err(ImagingError::Unsupported(
                    "a JPEG frame whose height is set later by a DNL marker".into(),
                ));
            }
            return Ok(JpegFrame {
                precision,
                height: u64::from(height),
                width: u64::from(width),
                components: u64::from(components),
            });
        }
        if len < 2 {
            return Err(ImagingError::Corrupt(
                "a JPEG marker segment with a length below 2".into(),
            ));
        }
        at += 2 + len;
    }
}

#[derive(Debug, PartialEq)]
struct Siz {
    height: u64,
    width: u64,
    components: u64,
    tiles: u64,
    max_depth: u8,
}

/// The fewest wavelet decomposition levels the main header of a J2K codestream gives any
/// component (COD, and COC where one overrides it): the most resolution levels a reduced
/// decode may discard. `None` if the main header cannot be walked to its first tile-part.
pub fn j2k_levels(data: &[u8]) -> Option<u8> {
    let soc = data
        .windows(4)
        .position(|w| w == [0xFF, 0x4F, 0xFF, 0x51])?;
    let mut at = soc + 2;
    let mut levels: Option<u8> = None;
    // Marker segments of the main header, up to the first SOT (at most a few hundred).
    for _ in 0..1024 {
        let marker = be16(data, at)?;
        if marker == 0xFF90 {
            return levels;
        }
        let length = usize::from(be16(data, at + 2)?);
        if length < 2 {
            return None;
        }
        let segment = data.get(at + 4..at + 2 + length)?;
        match marker {
            // COD: Scod, progression, layers (2), MCT, then the number of levels.
            0xFF52 => {
                let cod = *segment.get(5)?;
                levels = Some(levels.map_or(cod, |l| l.min(cod)));
            }
            // COC: the component index (1 or 2 bytes by Csiz; one here), Scoc, then levels.
            0xFF53 => {
                let coc = *segment.get(2)?;
                levels = Some(levels.map_or(coc, |l| l.min(coc)));
            }
            _ => {}
        }
        at += 2 + length;
    }
    None
}

/// The SIZ marker segment of a J2K codestream (raw, or inside a JP2 file's codestream box).
fn j2k_siz(data: &[u8]) -> Result<Siz, ImagingError> {
    let start = data
        .windows(4)
        .position(|w| w == [0xFF, 0x4F, 0xFF, 0x51])
        .ok_or_else(|| {
            ImagingError::Corrupt("no JPEG 2000 SOC and SIZ markers in the frame".into())
        })?;
    let s = start + 2;
    let t = || truncated("JPEG 2000");
    let lsiz = u64::from(be16(data, s + 2).ok_or_else(t)?);
    let xsiz = u64::from(be32(data, s + 6).ok_or_else(t)?);
    let ysiz = u64::from(be32(data, s + 10).ok_or_else(t)?);
    let xosiz = u64::from(be32(data, s + 14).ok_or_else(t)?);
    let yosiz = u64::from(be32(data, s + 18).ok_or_else(t)?);
    let xtsiz = u64::from(be32(data, s + 22).ok_or_else(t)?);
    let ytsiz = u64::from(be32(data, s + 26).ok_or_else(t)?);
    let xtosiz = u64::from(be32(data, s + 30).ok_or_else(t)?);
    let ytosiz = u64::from(be32(data, s + 34).ok_or_else(t)?);
    let csiz = u64::from(be16(data, s + 38).ok_or_else(t)?);
    if xosiz >= xsiz
        || yosiz >= ysiz
        || xtsiz == 0
        || ytsiz == 0
        || xtosiz > xosiz
        || ytosiz > yosiz
    {
        return Err(ImagingError::Corrupt(
            "the JPEG 2000 SIZ marker describes an empty or inconsistent image grid".into(),
        ));
    }
    if csiz == 0 || lsiz != 38 + 3 * csiz {
        return Err(ImagingError::Corrupt(format!(
            "the JPEG 2000 SIZ marker's length {lsiz} does not fit {csiz} components"
        )));
    }
    let mut max_depth = 0u8;
    for c in 0..csiz as usize {
        let at = s + 40 + 3 * c;
        let depth = (data.get(at).ok_or_else(t)? & 0x7F) + 1;
        let (dx, dy) = (
            *data.get(at + 1).ok_or_else(t)?,
            *data.get(at + 2).ok_or_else(t)?,
        );
        if dx == 0 || dy == 0 {
            return Err(ImagingError::Corrupt(
                "a JPEG 2000 component with a zero subsampling factor".into(),
            ));
        }
        max_depth = max_depth.max(depth);
    }
    let tiles = (xsiz - xtosiz).div_ceil(xtsiz) * (ysiz - ytosiz).div_ceil(ytsiz);
    Ok(Siz {
        height: ysiz - yosiz,
        width: xsiz - xosiz,
        components: csiz,
        tiles,
        max_depth,
    })
}

/// Checks an RLE Lossless frame: its header's segment count and offsets, and that no segment's
/// PackBits runs expand beyond one plane (rows × columns bytes) or fall short of it.
fn rle(fragment: &[u8], expected: &Expected) -> Result<(), ImagingError> {
    let t = || truncated("RLE");
    let segments = le32(fragment, 0).ok_or_else(t)?;
    let wanted = expected.samples_per_pixel * expected.bits_allocated / 8;
    if segments != wanted {
        return Err(ImagingError::Corrupt(format!(
            "the RLE header declares {segments} segments, {wanted} expected for {} samples of {} bits",
            expected.samples_per_pixel, expected.bits_allocated
        )));
    }
    if fragment.len() < 64 {
        return Err(t());
    }
    let mut offsets: Vec<usize> = (0..segments as usize)
        .map(|k| le32(fragment, 4 + 4 * k).map(|v| v as usize).ok_or_else(t))
        .collect::<Result<_, _>>()?;
    if offsets[0] != 64 || offsets.windows(2).any(|w| w[0] >= w[1]) {
        return Err(ImagingError::Corrupt(
            "the RLE segment offsets are not increasing from 64".into(),
        ));
    }
    offsets.push(fragment.len());
    if offsets[segments as usize - 1] >= fragment.len() {
        return Err(ImagingError::Corrupt(
            "an RLE segment offset points past the fragment".into(),
        ));
    }
    let plane = u64::from(expected.rows) * u64::from(expected.columns);
    // Encoders may pad a segment to an even length, and a last run may overshoot a little.
    let allowed = plane + 128;
    for (k, range) in offsets.windows(2).enumerate() {
        let expanded = packbits_len(&fragment[range[0]..range[1]], allowed);
        if expanded < plane {
            // dicom-pixeldata indexes past a short segment (found by fuzzing).
            return Err(ImagingError::Corrupt(format!(
                "RLE segment {} expands to {expanded} bytes, short of one {}x{} plane ({plane})",
                k + 1,
                expected.rows,
                expected.columns
            )));
        }
        if expanded > allowed {
            return Err(ImagingError::ResourceLimit(format!(
                "RLE segment {} expands beyond {plane} bytes, the size of one {}x{} plane",
                k + 1,
                expected.rows,
                expected.columns
            )));
        }
    }
    Ok(())
}

/// The bytes a PackBits segment expands to, counting stops once past `stop`.
fn packbits_len(segment: &[u8], stop: u64) -> u64 {
    let (mut at, mut out) = (0usize, 0u64);
    while at < segment.len() && out <= stop {
        let header = segment[at] as i8;
        if header >= 0 {
            // A literal run cut short by the segment's end yields only what is there.
            let n = (header as usize + 1).min(segment.len() - at - 1);
            out += n as u64;
            at += 1 + n;
        } else if header != -128 {
            if at + 1 < segment.len() {
                out += (1 - i64::from(header)) as u64;
            }
            at += 2;
        } else {
            at += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expected(rows: u32, columns: u32) -> Expected {
        Expected {
            rows,
            columns,
            samples_per_pixel: 1,
            bits_allocated: 16,
        }
    }

    fn jpeg(height: u16, width: u16) -> Vec<u8> {
        let mut v = vec![
            0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x04, 0x00, 0x00, 0xFF, 0xFF, 0xC3, 0, 11, 16,
        ];
        v.extend(height.to_be_bytes());
        v.extend(width.to_be_bytes());
        v.extend([1, 1, 0x11, 0, 0xFF, 0xDA]);
        v
    }

    #[test]
    fn a_jpeg_sof_is_found_and_compared() {
        let limits = Limits::default();
        check(
            "1.2.840.10008.1.2.4.70",
            &jpeg(512, 512),
            &expected(512, 512),
            &limits,
        )
        .expect("agrees");
        let err = check(
            "1.2.840.10008.1.2.4.70",
            &jpeg(65535, 65535),
            &expected(512, 512),
            &limits,
        )
        .expect_err("bomb");
        assert!(matches!(err, ImagingError::ResourceLimit(_)), "{err}");
        assert!(err.to_string().contains("65535x65535"), "{err}");
        let err = check(
            "1.2.840.10008.1.2.4.70",
            &jpeg(500, 512),
            &expected(512, 512),
            &limits,
        )
        .expect_err("mismatch");
        assert!(matches!(err, ImagingError::Corrupt(_)), "{err}");
        let err = check(
            "1.2.840.10008.1.2.4.70",
            &jpeg(0, 512),
            &expected(512, 512),
            &limits,
        )
        .expect_err("DNL");
        assert!(matches!(err, ImagingError::Unsupported(_)), "{err}");
        for cut in 0..jpeg(512, 512).len() - 6 {
            let _ = check(
                "1.2.840.10008.1.2.4.50",
                &jpeg(512, 512)[..cut],
                &expected(512, 512),
                &limits,
            );
        }
    }

    fn siz(width: u32, height: u32, tile: u32) -> Vec<u8> {
        let mut v = vec![0xFF, 0x4F, 0xFF, 0x51, 0, 41, 0, 0];
        for x in [width, height, 0, 0, tile, tile, 0, 0] {
            v.extend(x.to_be_bytes());
        }
        v.extend([0, 1, 15, 1, 1]);
        v
    }

    #[test]
    fn a_j2k_siz_is_read_and_tiles_are_bounded() {
        let limits = Limits::default();
        let e = expected(256, 300);
        check("1.2.840.10008.1.2.4.90", &siz(300, 256, 300), &e, &limits).expect("agrees");
        let err = check(
            "1.2.840.10008.1.2.4.90",
            &siz(60000, 60000, 60000),
            &e,
            &limits,
        )
        .expect_err("lying SIZ");
        assert!(matches!(err, ImagingError::ResourceLimit(_)), "{err}");
        let err = check("1.2.840.10008.1.2.4.90", &siz(300, 256, 1), &e, &limits)
            .expect_err("tiny tiles");
        assert!(err.to_string().contains("tiles"), "{err}");
    }

    #[test]
    fn rle_headers_and_runs_are_bounded() {
        let e = Expected {
            rows: 4,
            columns: 4,
            samples_per_pixel: 1,
            bits_allocated: 8,
        };
        let mut good = vec![0u8; 64];
        good[0] = 1;
        good[4] = 64;
        good.extend([0xF1, 7]); // 16 bytes of 7
        check("1.2.840.10008.1.2.5", &good, &e, &Limits::default()).expect("fits");
        let mut short = good[..64].to_vec();
        short.extend([0xFD, 7]); // 4 bytes: short of the 16-byte plane
        let err = check("1.2.840.10008.1.2.5", &short, &e, &Limits::default()).expect_err("short");
        assert!(matches!(err, ImagingError::Corrupt(_)), "{err}");
        let mut bomb = good[..64].to_vec();
        for _ in 0..1000 {
            bomb.extend([0x81, 0]);
        }
        let err = check("1.2.840.10008.1.2.5", &bomb, &e, &Limits::default()).expect_err("bomb");
        assert!(matches!(err, ImagingError::ResourceLimit(_)), "{err}");
        let mut many = good.clone();
        many[0..4].copy_from_slice(&0x4000_0000u32.to_le_bytes());
        let err = check("1.2.840.10008.1.2.5", &many, &e, &Limits::default()).expect_err("count");
        assert!(err.to_string().contains("segments"), "{err}");
    }
}
