//! Reading header attributes robustly, including elements written with VR UN (unknown), whose
//! value arrives as raw bytes: text VRs are decoded as text and US/UL as little-endian integers.

use dicom_core::{Tag, VR};
use dicom_object::DefaultDicomObject;

fn trim(text: &str) -> &str {
    text.trim_matches(|c: char| c.is_whitespace() || c == '\0')
}

/// The attribute's value as trimmed text ("" when absent or unreadable).
pub fn text(obj: &DefaultDicomObject, tag: Tag) -> String {
    let Some(element) = obj.get(tag) else {
        return String::new();
    };
    if element.vr() == VR::UN {
        return element
            .value()
            .to_bytes()
            .map(|bytes| trim(&String::from_utf8_lossy(&bytes)).to_string())
            .unwrap_or_default();
    }
    element
        .to_str()
        .map(|s| trim(&s).to_string())
        .unwrap_or_default()
}

/// The first numeric value (DS, IS, US, ... or UN holding text).
pub fn number(obj: &DefaultDicomObject, tag: Tag) -> Option<f64> {
    let element = obj.get(tag)?;
    if element.vr() == VR::UN {
        return text(obj, tag)
            .split('\\')
            .next()
            .and_then(|v| trim(v).parse().ok());
    }
    element
        .to_multi_float64()
        .ok()
        .and_then(|v| v.first().copied())
}

/// An unsigned integer attribute (US/UL/IS, or UN holding its little-endian binary form).
pub fn unsigned(obj: &DefaultDicomObject, tag: Tag) -> Option<u32> {
    let element = obj.get(tag)?;
    if element.vr() == VR::UN {
        let bytes = element.value().to_bytes().ok()?;
        return match bytes.len() {
            2 => Some(u32::from(u16::from_le_bytes([bytes[0], bytes[1]]))),
            4 => Some(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])),
            _ => trim(&String::from_utf8_lossy(&bytes)).parse().ok(),
        };
    }
    element.to_int::<u32>().ok()
}
