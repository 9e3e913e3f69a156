//! De-identification following DICOM PS3.15 Annex E (Basic Application Level Confidentiality
//! Profile), built as an allow-list.
//!
//! The node never keeps the DICOM header. From it, this module derives only:
//!
//! | kept | from | Annex E option that allows it |
//! | --- | --- | --- |
//! | age band (10 years) | PatientAge, else PatientBirthDate with StudyDate (then Acquisition/Series/ContentDate) | Retain Patient Characteristics (coarsened) |
//! | sex | PatientSex | Retain Patient Characteristics |
//! | acquisition month | AcquisitionDate, else StudyDate, SeriesDate, ContentDate | Retain Longitudinal Temporal Information with Modified Dates (coarsened to the month) |
//! | view position, modality | ViewPosition, Modality | not listed in Table E.1-1 (kept by the Basic Profile) |
//! | body part, manufacturer | BodyPartExamined, Manufacturer, mapped onto an allow-list of normalised values ([`BODY_PARTS`], [`MANUFACTURERS`]); free text becomes "OTHER" / "other" | Clean Descriptors (no free text kept) |
//! | pseudonym | HMAC-SHA256(PatientID) under the per-site secret | replacement of PatientID by a consistent keyed hash |
//!
//! Every attribute of Table E.1-1 (PatientName, PatientID, PatientBirthDate, AccessionNumber,
//! InstitutionName, StudyInstanceUID, dates and times, physicians, device serial numbers,
//! free-text comments, ...) is therefore absent from the record by construction: nothing else
//! is read into it. The birth date is used only to compute the age band and then dropped.
//! Ages of 90 and over are one band, "90+" (HIPAA Safe Harbor).
//!
//! Pixel data can carry identifiers too: Burned In Annotation (0028,0301) and Recognizable
//! Visual Features (0028,0302) are read, and [`burned_in_refusal`] decides, under the site's
//! [`BurnedInPolicy`], which images are refused before anything of them is kept.

/// What the node does with images that may show identifying text in their pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BurnedInPolicy {
    /// Refuse Burned In Annotation YES and Recognizable Visual Features YES, and images that
    /// do not say (attribute absent) when they are secondary captures or document-like
    /// (Secondary Capture SOP classes, modality OT/SC/DOC, or a Conversion Type): screenshots
    /// and scanned films are where burned-in text lives.
    #[default]
    Refuse,
    /// Refuse only an explicit YES.
    RefuseYes,
    /// Keep everything (the site has its own pixel scrubbing upstream); a note is recorded.
    Accept,
}

impl std::str::FromStr for BurnedInPolicy {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim() {
            "refuse" => Ok(BurnedInPolicy::Refuse),
            "refuse-yes" => Ok(BurnedInPolicy::RefuseYes),
            "accept" => Ok(BurnedInPolicy::Accept),
            other => Err(format!(
                "burned_in_annotation {other:?} must be refuse, refuse-yes or accept"
            )),
        }
    }
}

/// Why an image is refused under `policy`, or `None` to keep it.
pub fn burned_in_refusal(obj: &DefaultDicomObject, policy: BurnedInPolicy) -> Option<String> {
    let flag = |tag| match text(obj, tag).trim().to_ascii_uppercase().as_str() {
        "YES" => Some(true),
        "NO" => Some(false),
        _ => None,
    };
    let burned_in = flag(tags::BURNED_IN_ANNOTATION);
    let recognizable = flag(tags::RECOGNIZABLE_VISUAL_FEATURES);
    if policy == BurnedInPolicy::Accept {
        return None;
    }
    if burned_in == Some(true) {
        return Some(
            "Burned In Annotation (0028,0301) is YES: the pixels carry identifying text".into(),
        );
    }
    if recognizable == Some(true) {
        return Some(
            "Recognizable Visual Features (0028,0302) is YES: the pixels may identify the patient"
                .into(),
        );
    }
    if policy == BurnedInPolicy::Refuse && burned_in.is_none() {
        let sop_class = text(obj, tags::SOP_CLASS_UID);
        let modality = text(obj, tags::MODALITY).trim().to_ascii_uppercase();
        let document_like = sop_class.starts_with("1.2.840.10008.5.1.4.1.1.7")
            || matches!(modality.as_str(), "OT" | "SC" | "DOC")
            || !text(obj, tags::CONVERSION_TYPE).trim().is_empty();
        if document_like {
            return Some(
                "a secondary capture or document-like image without Burned In Annotation (0028,0301): it may carry identifying text (burned_in_annotation = refuse-yes accepts it)".into(),
            );
        }
    }
    None
}

/// Body parts kept (DICOM CID 4031 defined terms a chest X-ray service meets); anything else
/// is "OTHER".
pub const BODY_PARTS: &[&str] = &[
    "CHEST",
    "ABDOMEN",
    "PELVIS",
    "SKULL",
    "HEAD",
    "NECK",
    "SPINE",
    "CSPINE",
    "TSPINE",
    "LSPINE",
    "SHOULDER",
    "CLAVICLE",
    "RIBS",
    "ARM",
    "ELBOW",
    "HAND",
    "HIP",
    "LEG",
    "KNEE",
    "ANKLE",
    "FOOT",
    "EXTREMITY",
    "WHOLEBODY",
    "BREAST",
];

/// Modalities that are not projection radiographs: a chest X-ray model has nothing to say
/// about them.
const NOT_RADIOGRAPHY: &[&str] = &[
    "CT", "MR", "US", "NM", "PT", "MG", "XA", "IO", "PX", "OP", "OPT", "SM", "ES", "ECG",
];

/// Why an image is not a chest radiograph the model may read, from its de-identified header:
/// a known body part other than the chest (`EXTREMITY`, `SKULL`, `RIBS`, …) or a modality
/// that is not projection radiography (CT, MR, US, mammography, …). None when the header says
/// chest, or says nothing (a picture, a missing or unrecognised body part): the model runs.
pub fn not_chest_reason(source: &cxrfed_schema::Source) -> Option<String> {
    let body = source.body_part.as_str();
    if !body.is_empty() && body != "CHEST" && BODY_PARTS.contains(&body) {
        return Some(format!(
            "not a chest radiograph (body part {body}): no chest findings"
        ));
    }
    let modality = source.modality.trim().to_ascii_uppercase();
    if NOT_RADIOGRAPHY.contains(&modality.as_str()) {
        return Some(format!(
            "not a chest radiograph (modality {modality}): no chest findings"
        ));
    }
    None
}

/// The normalised body part: upper case, letters only, synonyms mapped, else "OTHER".
pub fn normalize_body_part(raw: &str) -> String {
    let word: String = raw
        .chars()
        .filter(char::is_ascii_alphabetic)
        .map(|c| c.to_ascii_uppercase())
        .collect();
    let word = match word.as_str() {
        "" => return String::new(),
        "THORAX" | "LUNG" | "LUNGS" | "CHESTPA" | "CHESTAP" | "CHESTLAT" | "TORAX" | "THORAKS" => {
            "CHEST"
        }
        "RIB" => "RIBS",
        "CERVICALSPINE" => "CSPINE",
        "THORACICSPINE" => "TSPINE",
        "LUMBARSPINE" => "LSPINE",
        other => other,
    };
    if BODY_PARTS.contains(&word) {
        word.to_string()
    } else {
        "OTHER".to_string()
    }
}

/// Manufacturers kept, as (normalised name, lower-case markers any of which identifies it).
pub const MANUFACTURERS: &[(&str, &[&str])] = &[
    ("Agfa", &["agfa"]),
    ("Canon", &["canon", "toshiba"]),
    ("Carestream", &["carestream", "kodak"]),
    ("Fujifilm", &["fuji"]),
    (
        "GE",
        &["ge healthcare", "ge medical", "gems", "general electric"],
    ),
    ("Hologic", &["hologic"]),
    ("Konica Minolta", &["konica", "minolta"]),
    ("Philips", &["philips"]),
    ("Samsung", &["samsung"]),
    ("Shimadzu", &["shimadzu"]),
    ("Siemens", &["siemens"]),
    ("Varex", &["varex", "varian"]),
];

/// The normalised manufacturer, "other" for anything not in [`MANUFACTURERS`] (free text in
/// this attribute sometimes names a hospital or a department).
pub fn normalize_manufacturer(raw: &str) -> String {
    let lower = raw.trim().to_ascii_lowercase();
    if lower.is_empty() {
        return String::new();
    }
    let padded = format!(" {lower} ");
    MANUFACTURERS
        .iter()
        .find(|(_, markers)| markers.iter().any(|m| lower.contains(m)))
        .map(|(name, _)| (*name).to_string())
        .or_else(|| (padded.contains(" ge ") || lower == "ge").then(|| "GE".to_string()))
        .unwrap_or_else(|| "other".to_string())
}

use chrono::{Datelike, NaiveDate};
use cxrfed_schema::{Acquisition, Patient, Sex, View, age_group};
use dicom_dictionary_std::tags;

use crate::attr::text;
use dicom_object::DefaultDicomObject;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The per-site secret keying the patient pseudonym. It never leaves the site.
#[derive(Clone)]
pub struct SiteSecret([u8; 32]);

impl std::fmt::Debug for SiteSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SiteSecret(..)")
    }
}

impl SiteSecret {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        SiteSecret(bytes)
    }

    /// A key for another purpose (e.g. "dp-row-selection"), derived so that it reveals nothing
    /// of the pseudonym key.
    pub fn derive(&self, purpose: &str) -> [u8; 32] {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0)
            .expect("HMAC-SHA256 accepts keys of any length");
        mac.update(b"cxrfed-derive-v1\0");
        mac.update(purpose.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// A keyed reference to `value` for `purpose` (HMAC-SHA256 under a key derived for that
    /// purpose), hex encoded: lets the node recognise a value it has seen (e.g. an instance
    /// already pulled from a PACS) without keeping the value.
    pub fn keyed(&self, purpose: &str, value: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.derive(purpose))
            .expect("HMAC-SHA256 accepts keys of any length");
        mac.update(value.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// HMAC-SHA256 of the patient ID, hex encoded; empty when there is no ID.
    pub fn pseudonym(&self, patient_id: &str) -> String {
        let id = patient_id.trim_matches(|c: char| c.is_whitespace() || c == '\0');
        if id.is_empty() {
            return String::new();
        }
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0)
            .expect("HMAC-SHA256 accepts keys of any length");
        mac.update(b"cxrfed-patient-v1\0");
        mac.update(id.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }
}

/// What the node keeps of a DICOM header.
#[derive(Debug, Clone, Default)]
pub struct Deidentified {
    pub patient: Patient,
    pub acquisition: Acquisition,
    pub modality: String,
    pub manufacturer: String,
    pub body_part: String,
}

/// Parses a DICOM DA value ("YYYYMMDD", also the old "YYYY.MM.DD").
pub fn parse_da(value: &str) -> Option<NaiveDate> {
    let digits: String = value.chars().filter(char::is_ascii_digit).collect();
    if digits.len() < 8 {
        return None;
    }
    NaiveDate::parse_from_str(&digits[..8], "%Y%m%d").ok()
}

/// Parses a DICOM AS value ("061Y", "006M", "003W", "010D") into whole years.
pub fn parse_as(value: &str) -> Option<u32> {
    let value = value.trim();
    if value.len() != 4 {
        return None;
    }
    let number: u32 = value[..3].parse().ok()?;
    match &value[3..] {
        "Y" => Some(number),
        "M" => Some(number / 12),
        "W" => Some(number / 52),
        "D" => Some(number / 365),
        _ => None,
    }
}

/// Whole years between `birth` and `on`, or `None` when `on` precedes `birth`.
pub fn age_on(birth: NaiveDate, on: NaiveDate) -> Option<u32> {
    let mut years = on.year() - birth.year();
    if (on.month(), on.day()) < (birth.month(), birth.day()) {
        years -= 1;
    }
    u32::try_from(years).ok()
}

/// Derives the kept facts from a DICOM header and drops everything else.
pub fn from_dicom(obj: &DefaultDicomObject, secret: &SiteSecret) -> Deidentified {
    let first_date =
        |order: [dicom_core::Tag; 4]| order.into_iter().find_map(|tag| parse_da(&text(obj, tag)));
    // Age is the patient's age at the study (PS3.3 Patient Study module); the month is that of
    // the acquisition itself when the file records it.
    let study_date = first_date([
        tags::STUDY_DATE,
        tags::ACQUISITION_DATE,
        tags::SERIES_DATE,
        tags::CONTENT_DATE,
    ]);
    let acquisition_date = first_date([
        tags::ACQUISITION_DATE,
        tags::STUDY_DATE,
        tags::SERIES_DATE,
        tags::CONTENT_DATE,
    ]);
    let age = parse_as(&text(obj, tags::PATIENT_AGE)).or_else(|| {
        let birth = parse_da(&text(obj, tags::PATIENT_BIRTH_DATE))?;
        age_on(birth, study_date?)
    });
    Deidentified {
        patient: Patient {
            pseudonym: secret.pseudonym(&text(obj, tags::PATIENT_ID)),
            age_group: age.map(age_group).unwrap_or_default(),
            sex: Sex::from_dicom(&text(obj, tags::PATIENT_SEX)),
        },
        acquisition: Acquisition {
            month: acquisition_date
                .map(|d| format!("{:04}-{:02}", d.year(), d.month()))
                .unwrap_or_default(),
            view: View::from_dicom(&text(obj, tags::VIEW_POSITION)),
        },
        modality: normalize_modality(&text(obj, tags::MODALITY)),
        manufacturer: normalize_manufacturer(&text(obj, tags::MANUFACTURER)),
        body_part: normalize_body_part(&text(obj, tags::BODY_PART_EXAMINED)),
    }
}

/// The modality as a defined term (2–4 upper-case letters), else "OT".
fn normalize_modality(raw: &str) -> String {
    let value = raw.trim().to_ascii_uppercase();
    if value.is_empty() {
        String::new()
    } else if (2..=4).contains(&value.len()) && value.chars().all(|c| c.is_ascii_uppercase()) {
        value
    } else {
        "OT".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_are_allow_listed() {
        assert_eq!(normalize_body_part("Chest"), "CHEST");
        let source = |body: &str, modality: &str| cxrfed_schema::Source {
            body_part: normalize_body_part(body),
            modality: modality.into(),
            ..Default::default()
        };
        assert_eq!(not_chest_reason(&source("Thorax", "CR")), None);
        assert_eq!(not_chest_reason(&source("", "")), None);
        assert_eq!(
            not_chest_reason(&source("portable chest", "DX")),
            None,
            "unrecognised: runs"
        );
        assert!(
            not_chest_reason(&source("EXTREMITY", "CR"))
                .expect("gated")
                .contains("EXTREMITY")
        );
        assert!(
            not_chest_reason(&source("", "CT"))
                .expect("gated")
                .contains("modality CT")
        );
        assert_eq!(normalize_body_part("THORAX"), "CHEST");
        assert_eq!(normalize_body_part("St. Mary's ward 3 chest"), "OTHER");
        assert_eq!(normalize_body_part(""), "");
        assert_eq!(normalize_manufacturer("SIEMENS"), "Siemens");
        assert_eq!(normalize_manufacturer("GE Healthcare"), "GE");
        assert_eq!(normalize_manufacturer("GE"), "GE");
        assert_eq!(normalize_manufacturer("KODAK"), "Carestream");
        assert_eq!(normalize_manufacturer("Dr. Smith's clinic"), "other");
        assert_eq!(normalize_modality("CR"), "CR");
        assert_eq!(normalize_modality("chest xray"), "OT");
    }

    #[test]
    fn ages() {
        assert_eq!(parse_as("061Y"), Some(61));
        assert_eq!(parse_as("018M"), Some(1));
        assert_eq!(parse_as("61"), None);
        let birth = parse_da("19400305").expect("date");
        assert_eq!(age_on(birth, parse_da("20040826").expect("date")), Some(64));
        assert_eq!(age_on(birth, parse_da("20040304").expect("date")), Some(63));
        assert_eq!(age_on(birth, parse_da("19300101").expect("date")), None);
        assert_eq!(parse_da("1940.03.05"), Some(birth));
        assert_eq!(parse_da("garbage"), None);
    }

    #[test]
    fn pseudonyms_are_keyed() {
        let a = SiteSecret::from_bytes([1; 32]);
        let b = SiteSecret::from_bytes([2; 32]);
        assert_eq!(a.pseudonym("9RG1"), a.pseudonym(" 9RG1 "));
        assert_ne!(a.pseudonym("9RG1"), b.pseudonym("9RG1"));
        assert_ne!(a.pseudonym("9RG1"), a.pseudonym("9RG2"));
        assert!(!a.pseudonym("9RG1").contains("9RG1"));
        assert_eq!(a.pseudonym(""), "");
    }
}
