//! Reduced-resolution JPEG 2000 decoding: the model needs a 224 px input, and a J2K codestream
//! is wavelet-coded, so its lowest resolution levels already hold the image at 1/2, 1/4, 1/8…
//! of its size. OpenJPEG's reduce factor (`cp_reduce`) decodes only those levels: the
//! code-blocks of the discarded high-resolution subbands — most of the coded bits — are never
//! entropy-decoded. dicom-pixeldata always decodes at full resolution and has no such option,
//! so this is a thin FFI wrapper over `openjpeg-sys` (the library dicom-rs itself links) with
//! an in-memory input stream.
//!
//! Only the grayscale, single-frame case is handled here; anything else, and any failure, is
//! the caller's cue to decode at full resolution through dicom-pixeldata.
#![allow(unsafe_code)]

use std::os::raw::c_void;

use openjpeg_sys as opj;

/// A reduced decode: `factor` resolution levels were discarded, so `rows x columns` is the
/// full image divided by `2^factor` (rounded up).
#[derive(Debug)]
pub struct Reduced {
    pub rows: usize,
    pub columns: usize,
    pub factor: u32,
    /// The component's samples as OpenJPEG gives them (signed if the codestream says so).
    pub samples: Vec<i32>,
}

/// The input codestream with a cursor.
struct Source<'a> {
    data: &'a [u8],
    pos: usize,
}

unsafe extern "C" fn read_fn(buffer: *mut c_void, len: usize, user: *mut c_void) -> usize {
    // SAFETY: `user` is the `Source` passed to opj_stream_set_user_data, alive for the stream's
    // lifetime; `buffer` points at `len` writable bytes owned by OpenJPEG for this call.
    let source = unsafe { &mut *(user as *mut Source<'_>) };
    let left = source.data.len() - source.pos;
    if left == 0 {
        return usize::MAX; // OpenJPEG's end-of-stream value ((OPJ_SIZE_T)-1).
    }
    let n = len.min(left);
    let out = unsafe { std::slice::from_raw_parts_mut(buffer as *mut u8, n) };
    out.copy_from_slice(&source.data[source.pos..source.pos + n]);
    source.pos += n;
    n
}

unsafe extern "C" fn skip_fn(offset: i64, user: *mut c_void) -> i64 {
    // SAFETY: as in read_fn.
    let source = unsafe { &mut *(user as *mut Source<'_>) };
    let target = (source.pos as i64).saturating_add(offset);
    if target < 0 {
        return -1;
    }
    let target = (target as usize).min(source.data.len());
    let moved = target as i64 - source.pos as i64;
    source.pos = target;
    moved
}

unsafe extern "C" fn seek_fn(offset: i64, user: *mut c_void) -> i32 {
    // SAFETY: as in read_fn.
    let source = unsafe { &mut *(user as *mut Source<'_>) };
    if offset < 0 || offset as u64 > source.data.len() as u64 {
        return 0;
    }
    source.pos = offset as usize;
    1
}

/// The codec a frame needs: a raw codestream (SOC marker) or a JP2 file.
fn codec_format(data: &[u8]) -> Option<opj::CODEC_FORMAT> {
    if data.starts_with(&[0xFF, 0x4F, 0xFF, 0x51]) {
        Some(opj::CODEC_FORMAT::OPJ_CODEC_J2K)
    } else if data.starts_with(&[0, 0, 0, 0x0C, 0x6A, 0x50, 0x20, 0x20]) {
        Some(opj::CODEC_FORMAT::OPJ_CODEC_JP2)
    } else {
        None
    }
}

/// Decodes component 0 of `data` with `factor` resolution levels discarded, on as many
/// OpenJPEG threads as the full decode (jpeg2k) uses: one per CPU where OpenJPEG has thread
/// support. `None` when OpenJPEG refuses (the caller decodes in full instead).
pub fn decode_reduced(data: &[u8], factor: u32) -> Option<Reduced> {
    let format = codec_format(data)?;
    let mut source = Box::new(Source { data, pos: 0 });
    // SAFETY: every pointer below comes from OpenJPEG's own constructors, is checked for null,
    // and is destroyed exactly once before returning; the component's buffer is read within
    // the w*h samples OpenJPEG allocated for it, after a successful decode.
    unsafe {
        let codec = opj::opj_create_decompress(format);
        if codec.is_null() {
            return None;
        }
        let mut params: opj::opj_dparameters_t = std::mem::zeroed();
        opj::opj_set_default_decoder_parameters(&mut params);
        params.cp_reduce = factor;
        let stream = opj::opj_stream_create(1 << 16, 1);
        let mut image: *mut opj::opj_image_t = std::ptr::null_mut();
        let mut ok = !stream.is_null() && opj::opj_setup_decoder(codec, &mut params) == 1;
        if ok {
            if opj::opj_has_thread_support() == 1 {
                opj::opj_codec_set_threads(codec, opj::opj_get_num_cpus());
            }
            opj::opj_stream_set_read_function(stream, Some(read_fn));
            opj::opj_stream_set_skip_function(stream, Some(skip_fn));
            opj::opj_stream_set_seek_function(stream, Some(seek_fn));
            opj::opj_stream_set_user_data(
                stream,
                (&mut *source) as *mut Source<'_> as *mut c_void,
                None,
            );
            opj::opj_stream_set_user_data_length(stream, data.len() as u64);
            ok = opj::opj_read_header(stream, codec, &mut image) == 1
                && !image.is_null()
                && opj::opj_decode(codec, stream, image) == 1
                && opj::opj_end_decompress(codec, stream) == 1;
        }
        let mut out = None;
        if ok && (*image).numcomps >= 1 && !(*image).comps.is_null() {
            let comp = &*(*image).comps;
            let (w, h) = (comp.w as usize, comp.h as usize);
            if comp.factor == factor && !comp.data.is_null() && w > 0 && h > 0 {
                out = Some(Reduced {
                    rows: h,
                    columns: w,
                    factor,
                    samples: std::slice::from_raw_parts(comp.data, w * h).to_vec(),
                });
            }
        }
        if !image.is_null() {
            opj::opj_image_destroy(image);
        }
        if !stream.is_null() {
            opj::opj_stream_destroy(stream);
        }
        opj::opj_destroy_codec(codec);
        out
    }
}

/// The largest reduce factor that keeps the shorter side at least `min_side`, within the
/// codestream's decomposition levels.
pub fn factor_for(rows: u32, columns: u32, min_side: u32, levels: u8) -> u32 {
    let shorter = rows.min(columns);
    let mut factor = 0;
    while factor < u32::from(levels) && shorter.div_ceil(1 << (factor + 1)) >= min_side.max(1) {
        factor += 1;
    }
    factor
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_factor_keeps_the_model_input_covered() {
        assert_eq!(factor_for(2500, 2048, 224, 5), 3); // 313 x 256
        assert_eq!(factor_for(2500, 2048, 224, 2), 2); // the codestream's levels bound it
        assert_eq!(factor_for(448, 448, 224, 5), 1);
        assert_eq!(factor_for(447, 600, 224, 5), 1); // 224 x 300, rounded up
        assert_eq!(factor_for(446, 600, 224, 5), 0);
        assert_eq!(factor_for(100, 100, 224, 5), 0);
    }

    #[test]
    fn garbage_is_refused_without_a_decode() {
        assert!(decode_reduced(b"not a codestream", 1).is_none());
        // A SOC + SIZ prefix with nothing after it: OpenJPEG fails, nothing is returned.
        assert!(decode_reduced(&[0xFF, 0x4F, 0xFF, 0x51, 0, 41], 1).is_none());
    }
}
