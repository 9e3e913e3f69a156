//! JPEG 2000 lossless (reversible 5/3 wavelet) encoding of one grayscale frame through
//! OpenJPEG, the same library dicom-rs decodes with. The `jpeg2k` crate only encodes from
//! images it decoded itself, so this is a thin FFI wrapper over `openjpeg-sys` with an
//! in-memory, seekable output stream.
#![allow(unsafe_code)]

use std::os::raw::c_void;

use openjpeg_sys as opj;

/// The output buffer with a cursor; OpenJPEG may skip and seek while writing.
struct Sink {
    buf: Vec<u8>,
    pos: usize,
}

unsafe extern "C" fn write_fn(data: *mut c_void, len: usize, user: *mut c_void) -> usize {
    // SAFETY: `user` is the `Sink` passed to opj_stream_set_user_data, alive for the stream's
    // lifetime; `data` points at `len` readable bytes owned by OpenJPEG for this call.
    let sink = unsafe { &mut *(user as *mut Sink) };
    let bytes = unsafe { std::slice::from_raw_parts(data as *const u8, len) };
    let end = sink.pos + len;
    if sink.buf.len() < end {
        sink.buf.resize(end, 0);
    }
    sink.buf[sink.pos..end].copy_from_slice(bytes);
    sink.pos = end;
    len
}

unsafe extern "C" fn skip_fn(offset: i64, user: *mut c_void) -> i64 {
    // SAFETY: as in write_fn.
    let sink = unsafe { &mut *(user as *mut Sink) };
    let target = sink.pos as i64 + offset;
    if target < 0 {
        return -1;
    }
    sink.pos = target as usize;
    if sink.buf.len() < sink.pos {
        sink.buf.resize(sink.pos, 0);
    }
    offset
}

unsafe extern "C" fn seek_fn(offset: i64, user: *mut c_void) -> i32 {
    // SAFETY: as in write_fn.
    let sink = unsafe { &mut *(user as *mut Sink) };
    if offset < 0 {
        return 0;
    }
    sink.pos = offset as usize;
    if sink.buf.len() < sink.pos {
        sink.buf.resize(sink.pos, 0);
    }
    1
}

/// Encodes unsigned samples of `precision` bits as a J2K codestream (no JP2 box), lossless.
pub fn encode_lossless(
    samples: &[u16],
    rows: usize,
    columns: usize,
    precision: u8,
) -> Result<Vec<u8>, String> {
    if samples.len() != rows * columns || rows == 0 || columns == 0 {
        return Err("sample count does not match rows x columns".into());
    }
    let mut param = opj::opj_image_cmptparm_t {
        dx: 1,
        dy: 1,
        w: columns as u32,
        h: rows as u32,
        x0: 0,
        y0: 0,
        prec: u32::from(precision),
        bpp: u32::from(precision),
        sgnd: 0,
    };
    let mut sink = Box::new(Sink {
        buf: Vec::with_capacity(samples.len()),
        pos: 0,
    });
    // SAFETY: every pointer below comes from OpenJPEG's own constructors, is checked for null,
    // and is destroyed exactly once before returning; the component buffer is written within
    // the w*h samples OpenJPEG allocated for it.
    unsafe {
        let image = opj::opj_image_create(1, &mut param, opj::COLOR_SPACE::OPJ_CLRSPC_GRAY);
        if image.is_null() {
            return Err("opj_image_create failed".into());
        }
        (*image).x0 = 0;
        (*image).y0 = 0;
        (*image).x1 = columns as u32;
        (*image).y1 = rows as u32;
        let comp = &mut *(*image).comps;
        let data = std::slice::from_raw_parts_mut(comp.data, samples.len());
        for (dst, &src) in data.iter_mut().zip(samples) {
            *dst = i32::from(src);
        }
        let codec = opj::opj_create_compress(opj::CODEC_FORMAT::OPJ_CODEC_J2K);
        if codec.is_null() {
            opj::opj_image_destroy(image);
            return Err("opj_create_compress failed".into());
        }
        let mut params: opj::opj_cparameters_t = std::mem::zeroed();
        opj::opj_set_default_encoder_parameters(&mut params);
        params.tcp_numlayers = 1;
        params.tcp_rates[0] = 0.0;
        params.cp_disto_alloc = 1;
        params.irreversible = 0;
        let smallest = rows.min(columns);
        let mut resolutions = 6;
        while resolutions > 1 && smallest < (1 << (resolutions - 1)) {
            resolutions -= 1;
        }
        params.numresolution = resolutions;
        let stream = opj::opj_stream_default_create(0);
        let mut ok = !stream.is_null() && opj::opj_setup_encoder(codec, &mut params, image) == 1;
        if ok {
            opj::opj_stream_set_write_function(stream, Some(write_fn));
            opj::opj_stream_set_skip_function(stream, Some(skip_fn));
            opj::opj_stream_set_seek_function(stream, Some(seek_fn));
            opj::opj_stream_set_user_data(stream, (&mut *sink) as *mut Sink as *mut c_void, None);
            ok = opj::opj_start_compress(codec, image, stream) == 1
                && opj::opj_encode(codec, stream) == 1
                && opj::opj_end_compress(codec, stream) == 1;
        }
        if !stream.is_null() {
            opj::opj_stream_destroy(stream);
        }
        opj::opj_destroy_codec(codec);
        opj::opj_image_destroy(image);
        if !ok {
            return Err("OpenJPEG failed to encode the frame".into());
        }
    }
    Ok(sink.buf)
}
