//! The DICOM Part 10 file of a phantom: a DX/CR image with realistic headers.

use dicom_core::value::{PixelFragmentSequence, Value};
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};

use crate::{Encoding, Phantom, PhantomError, codec, j2k};

const DX_PRESENTATION: &str = "1.2.840.10008.5.1.4.1.1.1.1";
const CR_IMAGE: &str = "1.2.840.10008.5.1.4.1.1.1";

pub(crate) fn write(p: &Phantom) -> Result<Vec<u8>, PhantomError> {
    let site = p.site;
    let header = &p.header;
    let sop_class = if site.modality == "CR" {
        CR_IMAGE
    } else {
        DX_PRESENTATION
    };
    let study_uid = format!("{}.1", p.uid_root);
    let series_uid = format!("{}.2", p.uid_root);
    let sop_uid = format!("{}.3", p.uid_root);
    let date = header.study_date.format("%Y%m%d").to_string();
    let max = (1u32 << p.bits_stored) - 1;
    let text = |tag, vr, value: &str| DataElement::new(tag, vr, PrimitiveValue::from(value));
    let us = |tag, value: u16| DataElement::new(tag, VR::US, PrimitiveValue::from(value));
    let mut obj = InMemDicomObject::from_element_iter([
        text(tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 100"),
        text(tags::SOP_CLASS_UID, VR::UI, sop_class),
        text(tags::SOP_INSTANCE_UID, VR::UI, &sop_uid),
        text(tags::STUDY_DATE, VR::DA, &date),
        text(tags::SERIES_DATE, VR::DA, &date),
        text(tags::ACQUISITION_DATE, VR::DA, &date),
        text(tags::STUDY_TIME, VR::TM, "101500"),
        text(tags::ACCESSION_NUMBER, VR::SH, &header.accession),
        text(tags::MODALITY, VR::CS, site.modality),
        text(tags::MANUFACTURER, VR::LO, site.manufacturer),
        text(tags::INSTITUTION_NAME, VR::LO, site.institution),
        text(tags::REFERRING_PHYSICIAN_NAME, VR::PN, "REFERRER^PHANTOM"),
        text(tags::STATION_NAME, VR::SH, "XR-ROOM-2"),
        text(tags::STUDY_DESCRIPTION, VR::LO, "CHEST 1 VIEW"),
        text(tags::OPERATORS_NAME, VR::PN, "TECH^PHANTOM"),
        text(tags::MANUFACTURER_MODEL_NAME, VR::LO, site.model_name),
        text(tags::PATIENT_NAME, VR::PN, &header.patient_name),
        text(tags::PATIENT_ID, VR::LO, &header.patient_id),
        text(
            tags::PATIENT_BIRTH_DATE,
            VR::DA,
            &header.birth_date.format("%Y%m%d").to_string(),
        ),
        text(tags::PATIENT_SEX, VR::CS, header.sex),
        text(tags::PATIENT_AGE, VR::AS, &format!("{:03}Y", header.age)),
        text(tags::BODY_PART_EXAMINED, VR::CS, "CHEST"),
        text(tags::VIEW_POSITION, VR::CS, header.view),
        text(tags::STUDY_INSTANCE_UID, VR::UI, &study_uid),
        text(tags::SERIES_INSTANCE_UID, VR::UI, &series_uid),
        text(tags::STUDY_ID, VR::SH, "1"),
        text(tags::SERIES_NUMBER, VR::IS, "1"),
        text(tags::INSTANCE_NUMBER, VR::IS, "1"),
        text(tags::PATIENT_ORIENTATION, VR::CS, "L\\F"),
        us(tags::SAMPLES_PER_PIXEL, 1),
        text(
            tags::PHOTOMETRIC_INTERPRETATION,
            VR::CS,
            if p.monochrome1 {
                "MONOCHROME1"
            } else {
                "MONOCHROME2"
            },
        ),
        us(tags::ROWS, p.rows as u16),
        us(tags::COLUMNS, p.columns as u16),
        us(tags::BITS_ALLOCATED, 16),
        us(tags::BITS_STORED, p.bits_stored),
        us(tags::HIGH_BIT, p.bits_stored - 1),
        us(tags::PIXEL_REPRESENTATION, 0),
        text(
            tags::PRESENTATION_LUT_SHAPE,
            VR::CS,
            if p.monochrome1 { "INVERSE" } else { "IDENTITY" },
        ),
        text(tags::BURNED_IN_ANNOTATION, VR::CS, "NO"),
        text(tags::LOSSY_IMAGE_COMPRESSION, VR::CS, "00"),
    ]);
    if site.modality == "DX" {
        obj.put(text(
            tags::PRESENTATION_INTENT_TYPE,
            VR::CS,
            "FOR PRESENTATION",
        ));
        obj.put(text(tags::IMAGE_TYPE, VR::CS, "ORIGINAL\\PRIMARY"));
        obj.put(text(tags::RESCALE_INTERCEPT, VR::DS, "0"));
        obj.put(text(tags::RESCALE_SLOPE, VR::DS, "1"));
        obj.put(text(tags::RESCALE_TYPE, VR::LO, "US"));
    }
    if site.window_tags {
        obj.put(text(
            tags::WINDOW_CENTER,
            VR::DS,
            &format!("{}", max.div_ceil(2)),
        ));
        obj.put(text(tags::WINDOW_WIDTH, VR::DS, &format!("{}", max + 1)));
        obj.put(text(tags::VOILUT_FUNCTION, VR::CS, "LINEAR"));
    }
    let pixel_data = match p.encoding {
        Encoding::ExplicitLittle | Encoding::ImplicitLittle => DataElement::new(
            tags::PIXEL_DATA,
            VR::OW,
            PrimitiveValue::U16(p.samples.clone().into()),
        ),
        encapsulated => {
            let frame = match encapsulated {
                Encoding::RleLossless => codec::rle_encode_u16(&p.samples, p.columns),
                Encoding::JpegLossless => codec::jpeg_lossless_encode_u16(
                    &p.samples,
                    p.rows,
                    p.columns,
                    p.bits_stored as u8,
                ),
                Encoding::Jpeg2000Lossless => {
                    j2k::encode_lossless(&p.samples, p.rows, p.columns, p.bits_stored as u8)
                        .map_err(PhantomError::Encode)?
                }
                Encoding::ExplicitLittle | Encoding::ImplicitLittle => unreachable!(),
            };
            let mut frame = frame;
            if frame.len() % 2 == 1 {
                frame.push(0);
            }
            DataElement::new(
                tags::PIXEL_DATA,
                VR::OB,
                Value::PixelSequence(PixelFragmentSequence::new(Vec::<u32>::new(), vec![frame])),
            )
        }
    };
    obj.put(pixel_data);
    let file = obj
        .with_meta(
            FileMetaTableBuilder::new()
                .transfer_syntax(p.encoding.transfer_syntax_uid())
                .media_storage_sop_class_uid(sop_class)
                .media_storage_sop_instance_uid(sop_uid.as_str())
                .implementation_class_uid("2.25.302940129823901283019238")
                .implementation_version_name("CXRFED_PHANTOM"),
        )
        .map_err(|e| PhantomError::Dicom(e.to_string()))?;
    let mut out = Vec::with_capacity(p.samples.len() * 2 + 4096);
    file.write_all(&mut out)
        .map_err(|e| PhantomError::Dicom(e.to_string()))?;
    Ok(out)
}
