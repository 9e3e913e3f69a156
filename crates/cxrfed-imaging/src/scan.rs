//! A header-only walk over a DICOM file before dicom-object parses it.
//!
//! dicom-parser allocates (and zero-fills) each element's *declared* length before it reads
//! the value, so a few hundred bytes declaring a 4 GiB element cost 4 GiB of memory; a
//! Deflated Explicit VR Little Endian data set inflates without bound (deflate reaches ~1000:1);
//! and sequences nest as deep as the file says, recursing in the parser. None of this is
//! configurable in dicom-rs 0.10, so this module walks the element headers with dicom-parser's
//! own [`StatefulDecoder`] (no values are read, only skipped) and refuses, before anything is
//! allocated:
//!
//! * an element, item or fragment whose declared length runs past the end of the file (for a
//!   deflated data set, past the end of what it inflates to),
//! * a deflated data set that inflates beyond the cap (it is inflated once, counting, first),
//! * sequences nested deeper than [`MAX_DEPTH`],
//! * more than [`MAX_ELEMENTS`] elements and items.
//!
//! It also returns the transfer syntax and where the data set starts.

use std::cell::Cell;
use std::io::Read;
use std::rc::Rc;

use dicom_core::header::{HasLength, Header, Length};
use dicom_core::{Tag, VR};
use dicom_encoding::TransferSyntaxIndex;
use dicom_parser::stateful::decode::{StatefulDecode, StatefulDecoder};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use crate::ImagingError;

/// Deepest nesting of sequences (and their items) accepted; real chest X-rays nest 3–4 deep.
pub const MAX_DEPTH: usize = 16;
/// Most elements and items in one file. An empty element is 8 bytes on disk but a few hundred
/// in dicom-object's tree, so a file of nothing else is a memory bomb (found by fuzzing: 37 KB
/// deflated took 2.3 GB); real radiographs carry hundreds to a few thousand.
pub const MAX_ELEMENTS: u64 = 100_000;

const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
const DEFLATED: &str = "1.2.840.10008.1.2.1.99";
const ITEM: Tag = Tag(0xFFFE, 0xE000);
const ITEM_END: Tag = Tag(0xFFFE, 0xE00D);
const SEQUENCE_END: Tag = Tag(0xFFFE, 0xE0DD);
const PIXEL_DATA: Tag = Tag(0x7FE0, 0x0010);
const TRANSFER_SYNTAX: Tag = Tag(0x0002, 0x0010);
const GROUP_LENGTH: Tag = Tag(0x0002, 0x0000);

/// What the walk learned.
#[derive(Debug)]
pub struct Layout {
    pub transfer_syntax: String,
}

/// Walks `bytes` (a Part 10 stream starting at `DICM`); see the module docs.
/// `inflate_cap` bounds the bytes a deflated data set may inflate to.
pub fn check(bytes: &[u8], inflate_cap: u64) -> Result<Layout, ImagingError> {
    if bytes.len() < 4 || &bytes[..4] != b"DICM" {
        return Err(ImagingError::MalformedDicom("no DICM prefix".into()));
    }
    let explicit = TransferSyntaxRegistry
        .get(EXPLICIT_LE)
        .expect("Explicit VR Little Endian is always registered");
    // The meta group, read as dicom-object reads it (so that both agree on where the data set
    // starts; found by fuzzing): explicit VR little endian, File Meta Information Group Length
    // first, then elements until that many bytes are consumed.
    let mut meta = StatefulDecoder::new_with_ts(&bytes[4..], explicit, 4).map_err(malformed)?;
    let group_length = meta.decode_header().map_err(malformed)?;
    if group_length.tag() != GROUP_LENGTH || group_length.length().get() != Some(4) {
        return Err(ImagingError::MalformedDicom(
            "the file meta group does not start with its group length (0002,0000)".into(),
        ));
    }
    let group_bytes = u64::from(
        meta.read_value(&group_length)
            .map_err(malformed)?
            .to_int::<u32>()
            .map_err(malformed)?,
    );
    let start = meta.position();
    let mut transfer_syntax = None;
    while meta.position() - start < group_bytes {
        let header = meta.decode_header().map_err(malformed)?;
        let len = defined(header.length(), header.tag())?;
        let at = meta.position();
        if at + u64::from(len) > bytes.len() as u64 {
            return Err(past_end(header.tag(), len, bytes.len() as u64 - at));
        }
        if header.tag() == TRANSFER_SYNTAX {
            let value = meta.read_value(&header).map_err(malformed)?;
            transfer_syntax = Some(value.to_str().trim_end_matches(['\0', ' ']).to_string());
        } else {
            meta.skip_bytes(len).map_err(malformed)?;
        }
    }
    let end = meta.position() as usize;
    let transfer_syntax = transfer_syntax.ok_or_else(|| {
        ImagingError::MalformedDicom("the file meta group has no Transfer Syntax UID".into())
    })?;
    let Some(ts) = TransferSyntaxRegistry.get(&transfer_syntax) else {
        // Refused by name later, with the syntax's name.
        return Ok(Layout { transfer_syntax });
    };
    let body = &bytes[end..];
    if transfer_syntax == DEFLATED {
        // First how long the data set really is once inflated (capped), then the same walk as
        // for any file: a declared length must fit in what is actually there (found by
        // fuzzing: against the cap alone, a few KB could still make dicom-parser zero-fill
        // tens of MB per element).
        let hit = Rc::new(Cell::new(false));
        let mut counter = Capped {
            inner: flate2::read::DeflateDecoder::new(body),
            left: inflate_cap,
            hit: hit.clone(),
        };
        let inflated = std::io::copy(&mut counter, &mut std::io::sink());
        if hit.get() {
            return Err(ImagingError::ResourceLimit(format!(
                "the deflated data set inflates beyond {inflate_cap} bytes"
            )));
        }
        let inflated = inflated.map_err(|e| {
            ImagingError::MalformedDicom(format!("the deflated data set is corrupt: {e}"))
        })?;
        // The deflated data set is read as explicit VR little endian once inflated.
        walk(flate2::read::DeflateDecoder::new(body), explicit, inflated)?;
    } else {
        walk(body, ts, body.len() as u64)?;
    }
    Ok(Layout { transfer_syntax })
}

/// Open sequences and items, innermost last.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Open {
    Sequence(Option<u64>),
    Item(Option<u64>),
    /// Encapsulated pixel data: items are fragments whose bytes are skipped, not parsed.
    Fragments,
}

fn walk<R: Read>(
    reader: R,
    ts: &dicom_encoding::TransferSyntax,
    total: u64,
) -> Result<(), ImagingError> {
    let ts_for_reading = if ts.uid() == DEFLATED {
        TransferSyntaxRegistry.get(EXPLICIT_LE).expect("registered")
    } else {
        ts
    };
    let mut decoder = StatefulDecoder::new_with_ts(reader, ts_for_reading, 0).map_err(malformed)?;
    let mut open: Vec<Open> = Vec::new();
    let mut elements = 0u64;
    loop {
        let at = decoder.position();
        // Defined-length sequences and items close by position, without delimiters.
        while let Some(Open::Sequence(Some(end)) | Open::Item(Some(end))) = open.last().copied() {
            if at < end {
                break;
            }
            if at > end {
                return Err(ImagingError::MalformedDicom(
                    "an element runs past the end of its sequence item".into(),
                ));
            }
            open.pop();
        }
        if at >= total {
            break;
        }
        let header = decoder.decode_header().map_err(malformed)?;
        elements += 1;
        if elements > MAX_ELEMENTS {
            return Err(ImagingError::ResourceLimit(format!(
                "the file holds more than {MAX_ELEMENTS} elements and items"
            )));
        }
        let tag = header.tag();
        let at = decoder.position();
        let room = total.saturating_sub(at);
        let end_of = |len: Length| len.get().map(|l| at + u64::from(l));
        match tag {
            ITEM_END => match open.pop() {
                Some(Open::Item(None)) => {}
                _ => return Err(structure("an item delimiter outside an item")),
            },
            SEQUENCE_END => match open.pop() {
                Some(Open::Sequence(None) | Open::Fragments) => {}
                _ => return Err(structure("a sequence delimiter outside a sequence")),
            },
            ITEM => match open.last() {
                Some(Open::Fragments) => {
                    let len = defined(header.length(), tag)?;
                    if u64::from(len) > room {
                        return Err(past_end(tag, len, room));
                    }
                    decoder.skip_bytes(len).map_err(malformed)?;
                }
                Some(Open::Sequence(_)) => {
                    check_room(header.length(), tag, room)?;
                    push(&mut open, Open::Item(end_of(header.length())))?;
                }
                _ => return Err(structure("an item outside a sequence")),
            },
            _ if header.length().is_undefined() && tag == PIXEL_DATA => {
                push(&mut open, Open::Fragments)?
            }
            _ if header.vr() == VR::SQ || header.length().is_undefined() => {
                check_room(header.length(), tag, room)?;
                push(&mut open, Open::Sequence(end_of(header.length())))?;
            }
            _ => {
                let len = defined(header.length(), tag)?;
                if u64::from(len) > room {
                    return Err(past_end(tag, len, room));
                }
                whole_values(header.vr(), len, tag)?;
                decoder.skip_bytes(len).map_err(malformed)?;
            }
        }
    }
    if !open.is_empty() {
        return Err(ImagingError::MalformedDicom(
            "the file ends inside a sequence (truncated)".into(),
        ));
    }
    Ok(())
}

/// A binary value must hold whole values of its VR. dicom-parser reads `len / size` values
/// but counts `len` bytes as read, so a ragged length leaves its reader a few bytes behind its
/// own position: every element after it is then parsed from the wrong offset, past what this
/// walk checked (found by fuzzing: a 38 KB deflated file whose odd-length SS element made
/// dicom-parser read a 1.4 GB length and allocate it).
fn whole_values(vr: VR, len: u32, tag: Tag) -> Result<(), ImagingError> {
    let size = match vr {
        VR::US | VR::SS | VR::OW => 2,
        VR::UL | VR::SL | VR::FL | VR::OF | VR::OL | VR::AT => 4,
        VR::FD | VR::OD | VR::SV | VR::UV | VR::OV => 8,
        _ => 1,
    };
    if !len.is_multiple_of(size) {
        return Err(ImagingError::MalformedDicom(format!(
            "element {tag} ({vr:?}) has {len} bytes, not a whole number of {size}-byte values \
             (corrupt file)"
        )));
    }
    Ok(())
}

fn push(open: &mut Vec<Open>, next: Open) -> Result<(), ImagingError> {
    if open.len() >= MAX_DEPTH * 2 {
        return Err(ImagingError::Unsupported(format!(
            "sequences nested deeper than {MAX_DEPTH} levels"
        )));
    }
    open.push(next);
    Ok(())
}

fn check_room(len: Length, tag: Tag, room: u64) -> Result<(), ImagingError> {
    match len.get() {
        Some(len) if u64::from(len) > room => Err(past_end(tag, len, room)),
        _ => Ok(()),
    }
}

fn defined(len: Length, tag: Tag) -> Result<u32, ImagingError> {
    len.get().ok_or_else(|| {
        ImagingError::MalformedDicom(format!("element {tag} has an undefined length"))
    })
}

fn past_end(tag: Tag, len: u32, room: u64) -> ImagingError {
    ImagingError::MalformedDicom(format!(
        "element {tag} declares {len} bytes but only {room} remain (truncated or hostile file)"
    ))
}

fn structure(what: &str) -> ImagingError {
    ImagingError::MalformedDicom(format!("{what} (corrupt file)"))
}

fn malformed(e: impl std::fmt::Display) -> ImagingError {
    let text = e.to_string();
    ImagingError::MalformedDicom(format!(
        "{} (truncated or corrupt file)",
        text.lines().next().unwrap_or_default()
    ))
}

/// A reader that stops with an error after `left` bytes and says so through `hit`.
struct Capped<R> {
    inner: R,
    left: u64,
    hit: Rc<Cell<bool>>,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            // One byte more tells a stream that ends exactly at the cap from one that goes on.
            let mut probe = [0u8; 1];
            if self.inner.read(&mut probe)? == 0 {
                return Ok(0);
            }
            self.hit.set(true);
            return Err(std::io::Error::other("inflation cap reached"));
        }
        let want = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..want])?;
        self.left -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_core::{DataElement, PrimitiveValue};
    use dicom_dictionary_std::tags;
    use dicom_object::{FileMetaTableBuilder, InMemDicomObject};

    fn file(ts: &str, extra: Vec<DataElement<InMemDicomObject>>) -> Vec<u8> {
        let mut obj = InMemDicomObject::from_element_iter([
            DataElement::new(tags::SOP_CLASS_UID, VR::UI, "1.2.840.10008.5.1.4.1.1.1.1"),
            DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, "2.25.1"),
            DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(2u16)),
        ]);
        for e in extra {
            obj.put(e);
        }
        let file = obj
            .with_meta(
                FileMetaTableBuilder::new()
                    .transfer_syntax(ts)
                    .media_storage_sop_class_uid("1.2.840.10008.5.1.4.1.1.1.1")
                    .media_storage_sop_instance_uid("2.25.1"),
            )
            .expect("meta");
        let mut out = Vec::new();
        file.write_all(&mut out).expect("write");
        out[128..].to_vec()
    }

    fn private_ob(bytes: &[u8]) -> DataElement<InMemDicomObject> {
        DataElement::new(
            Tag(0x0029, 0x1010),
            VR::OB,
            PrimitiveValue::from(bytes.to_vec()),
        )
    }

    #[test]
    fn a_valid_file_passes_and_names_its_syntax() {
        let bytes = file(EXPLICIT_LE, vec![private_ob(b"ABCD")]);
        assert_eq!(
            check(&bytes, 1 << 20).expect("ok").transfer_syntax,
            EXPLICIT_LE
        );
        let bytes = file("1.2.840.10008.1.2", vec![private_ob(b"ABCD")]);
        check(&bytes, 1 << 20).expect("implicit ok");
    }

    #[test]
    fn a_declared_length_past_the_end_is_refused_before_allocation() {
        let mut bytes = file(EXPLICIT_LE, vec![private_ob(b"ABCD")]);
        let at = bytes
            .windows(8)
            .position(|w| w == b"OB\0\0\x04\0\0\0")
            .expect("OB header");
        bytes[at + 4..at + 8].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
        let err = check(&bytes, 1 << 20).expect_err("hostile");
        assert!(
            err.to_string().contains("declares 4294967280 bytes"),
            "{err}"
        );
    }

    #[test]
    fn a_binary_value_of_ragged_length_is_refused() {
        let ss = DataElement::new(
            Tag(0x0029, 0x1011),
            VR::SS,
            PrimitiveValue::I16([1i16, 2].into_iter().collect()),
        );
        let mut bytes = file(EXPLICIT_LE, vec![ss]);
        check(&bytes, 1 << 20).expect("whole values pass");
        let at = bytes
            .windows(4)
            .position(|w| w == b"SS\x04\0")
            .expect("SS header");
        bytes[at + 2] = 3;
        let err = check(&bytes, 1 << 20).expect_err("ragged");
        assert!(
            err.to_string()
                .contains("not a whole number of 2-byte values"),
            "{err}"
        );
    }

    #[test]
    fn a_deflate_bomb_is_stopped_at_the_cap() {
        let zeros = vec![0u8; 4 << 20];
        let bytes = file(DEFLATED, vec![private_ob(&zeros)]);
        assert!(bytes.len() < 64 << 10, "compresses well: {}", bytes.len());
        let err = check(&bytes, 1 << 20).expect_err("bomb");
        assert!(matches!(err, ImagingError::ResourceLimit(_)), "{err}");
        check(&bytes, 8 << 20).expect("within a larger cap");
    }

    #[test]
    fn a_file_of_empty_elements_is_refused() {
        let mut bytes = file(EXPLICIT_LE, vec![]);
        // (0029,xxxx) LO with length 0, over and over: 8 bytes each.
        for element in 0..=u16::try_from(MAX_ELEMENTS / 2).expect("fits") {
            for group in [0x0029u16, 0x0031] {
                bytes.extend(group.to_le_bytes());
                bytes.extend(element.max(0x1000).to_le_bytes());
                bytes.extend(b"LO\0\0");
            }
        }
        let err = check(&bytes, 1 << 20).expect_err("element bomb");
        assert!(err.to_string().contains("elements"), "{err}");
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut item = InMemDicomObject::new_empty();
        for _ in 0..40 {
            let seq = DataElement::new(
                Tag(0x0040, 0xA730),
                VR::SQ,
                dicom_core::value::DataSetSequence::from(vec![item]),
            );
            item = InMemDicomObject::from_element_iter([seq]);
        }
        let outer = item.take(Tag(0x0040, 0xA730)).expect("seq");
        let bytes = file(EXPLICIT_LE, vec![outer]);
        let err = check(&bytes, 1 << 20).expect_err("deep");
        assert!(err.to_string().contains("nested deeper"), "{err}");
    }
}
