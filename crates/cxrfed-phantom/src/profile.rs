//! Site profiles: what makes one hospital's images and patients differ from another's.
//!
//! Federated experiments need non-IID sites, so each profile varies the scanner (contrast curve,
//! noise, resolution, bit depth, photometric interpretation, transfer syntax, window tags), the
//! case mix (label prevalence, quality distribution) and the population (age, sex, PA/AP mix).

/// How pixel data is encoded in the DICOM file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    ExplicitLittle,
    ImplicitLittle,
    RleLossless,
    /// JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14, SV1).
    JpegLossless,
    /// JPEG 2000 Image Compression (Lossless Only), reversible 5/3 wavelet.
    Jpeg2000Lossless,
}

impl Encoding {
    pub fn transfer_syntax_uid(self) -> &'static str {
        match self {
            Encoding::ExplicitLittle => "1.2.840.10008.1.2.1",
            Encoding::ImplicitLittle => "1.2.840.10008.1.2",
            Encoding::RleLossless => "1.2.840.10008.1.2.5",
            Encoding::JpegLossless => "1.2.840.10008.1.2.4.70",
            Encoding::Jpeg2000Lossless => "1.2.840.10008.1.2.4.90",
        }
    }

    /// Parses the names `explicit`, `implicit`, `rle`, `jpeg-lossless`, `j2k`.
    pub fn parse(text: &str) -> Option<Encoding> {
        match text.to_ascii_lowercase().as_str() {
            "explicit" | "explicit-le" => Some(Encoding::ExplicitLittle),
            "implicit" | "implicit-le" => Some(Encoding::ImplicitLittle),
            "rle" => Some(Encoding::RleLossless),
            "jpeg-lossless" | "jpegll" => Some(Encoding::JpegLossless),
            "j2k" | "jpeg2000" => Some(Encoding::Jpeg2000Lossless),
            _ => None,
        }
    }

    pub fn is_encapsulated(self) -> bool {
        !matches!(self, Encoding::ExplicitLittle | Encoding::ImplicitLittle)
    }
}

/// Probabilities of the categories of one finding, in schema order.
pub type Mix = &'static [f64];

/// One site: scanner, case mix and population.
#[derive(Debug, Clone, Copy)]
pub struct SiteProfile {
    pub name: &'static str,
    pub description: &'static str,
    pub institution: &'static str,
    pub manufacturer: &'static str,
    pub model_name: &'static str,
    /// DICOM Modality: "CR" or "DX".
    pub modality: &'static str,
    /// Range of the image width in pixels; rows follow from the aspect ratio.
    pub columns: (u32, u32),
    /// Rows / columns.
    pub aspect: (f64, f64),
    /// Choices of BitsStored (BitsAllocated is 16).
    pub bits_stored: &'static [u16],
    pub monochrome1: bool,
    /// Transfer syntaxes, chosen uniformly per image.
    pub encodings: &'static [Encoding],
    /// Whether files carry WindowCenter/WindowWidth (otherwise readers fall back to a
    /// percentile window).
    pub window_tags: bool,
    /// Contrast curve: detector response `v = d^gamma` after the exposure latitude.
    pub gamma: f64,
    /// Detector latitude in density units: `(low, high)` map to the extremes of the range.
    pub latitude: (f64, f64),
    /// Multiplier of the quality-dependent structured noise (close to 1: quality must stay the
    /// dominant cause of noise).
    pub noise: f64,
    /// Fine per-pixel detector noise, in fractions of the range.
    pub pixel_noise: f64,
    /// Share of AP (portable) films; the rest are PA.
    pub ap_share: f64,
    pub female_share: f64,
    /// Age mean and standard deviation in years (clamped to 18..=95).
    pub age: (f64, f64),
    /// Share of films that are a second film of an earlier patient (follow-up).
    pub repeat_share: f64,
    /// excellent, good, fair, poor.
    pub quality: Mix,
    pub rib_fracture: f64,
    pub clavicle_asymmetry: f64,
    pub scoliosis: f64,
    /// none, mild, moderate, severe.
    pub opacity: Mix,
    /// normal, increased, decreased.
    pub vascular: Mix,
    pub interstitial: f64,
    pub hyperlucency: f64,
    /// normal, enlarged, indistinct.
    pub cardiac: Mix,
    pub aortic_prominent: f64,
    pub hilar_enlarged: f64,
    /// elevated, normal, depressed (hyperlucent lungs are always depressed).
    pub diaphragm: Mix,
    pub diaphragm_irregular: f64,
    /// normal, blunted_left, blunted_right, blunted_both.
    pub costophrenic: Mix,
}

pub const PROFILES: &[SiteProfile] = &[
    SiteProfile {
        name: "university",
        description: "university hospital, DR, mostly PA, 12-bit, JPEG 2000 lossless and explicit LE",
        institution: "Phantom University Hospital",
        manufacturer: "PhantomRay",
        model_name: "DR-4000",
        modality: "DX",
        columns: (2048, 2500),
        aspect: (1.0, 1.2),
        bits_stored: &[12],
        monochrome1: false,
        encodings: &[Encoding::Jpeg2000Lossless, Encoding::ExplicitLittle],
        window_tags: true,
        gamma: 1.0,
        latitude: (0.0, 1.0),
        noise: 1.0,
        pixel_noise: 0.004,
        ap_share: 0.15,
        female_share: 0.5,
        age: (58.0, 16.0),
        repeat_share: 0.15,
        quality: &[0.35, 0.35, 0.2, 0.1],
        rib_fracture: 0.2,
        clavicle_asymmetry: 0.25,
        scoliosis: 0.2,
        opacity: &[0.4, 0.2, 0.2, 0.2],
        vascular: &[0.5, 0.25, 0.25],
        interstitial: 0.3,
        hyperlucency: 0.2,
        cardiac: &[0.45, 0.35, 0.2],
        aortic_prominent: 0.3,
        hilar_enlarged: 0.3,
        diaphragm: &[0.25, 0.5, 0.25],
        diaphragm_irregular: 0.25,
        costophrenic: &[0.4, 0.2, 0.2, 0.2],
    },
    SiteProfile {
        name: "community",
        description: "community clinic, older CR plates, MONOCHROME1, 10-bit, implicit LE, no window tags, flat contrast",
        institution: "Phantom Community Clinic",
        manufacturer: "PhantomCR",
        model_name: "CR-75",
        modality: "CR",
        columns: (1024, 1400),
        aspect: (1.15, 1.3),
        bits_stored: &[10],
        monochrome1: true,
        encodings: &[Encoding::ImplicitLittle],
        window_tags: false,
        gamma: 1.45,
        latitude: (-0.15, 1.1),
        noise: 1.1,
        pixel_noise: 0.008,
        ap_share: 0.05,
        female_share: 0.55,
        age: (46.0, 17.0),
        repeat_share: 0.1,
        quality: &[0.2, 0.4, 0.25, 0.15],
        rib_fracture: 0.15,
        clavicle_asymmetry: 0.3,
        scoliosis: 0.25,
        opacity: &[0.55, 0.2, 0.15, 0.1],
        vascular: &[0.6, 0.2, 0.2],
        interstitial: 0.25,
        hyperlucency: 0.15,
        cardiac: &[0.6, 0.25, 0.15],
        aortic_prominent: 0.25,
        hilar_enlarged: 0.2,
        diaphragm: &[0.2, 0.6, 0.2],
        diaphragm_irregular: 0.2,
        costophrenic: &[0.55, 0.15, 0.15, 0.15],
    },
    SiteProfile {
        name: "icu",
        description: "intensive care, portable AP films, 14-bit, RLE lossless, sicker patients, poorer quality",
        institution: "Phantom ICU Center",
        manufacturer: "PhantomMobile",
        model_name: "MX-2",
        modality: "DX",
        columns: (1536, 2000),
        aspect: (0.95, 1.1),
        bits_stored: &[14],
        monochrome1: false,
        encodings: &[Encoding::RleLossless],
        window_tags: true,
        gamma: 0.85,
        latitude: (0.05, 1.05),
        noise: 1.0,
        pixel_noise: 0.006,
        ap_share: 0.9,
        female_share: 0.42,
        age: (68.0, 13.0),
        repeat_share: 0.3,
        quality: &[0.1, 0.25, 0.35, 0.3],
        rib_fracture: 0.25,
        clavicle_asymmetry: 0.35,
        scoliosis: 0.2,
        opacity: &[0.2, 0.2, 0.3, 0.3],
        vascular: &[0.35, 0.45, 0.2],
        interstitial: 0.35,
        hyperlucency: 0.15,
        cardiac: &[0.3, 0.45, 0.25],
        aortic_prominent: 0.35,
        hilar_enlarged: 0.35,
        diaphragm: &[0.4, 0.4, 0.2],
        diaphragm_irregular: 0.3,
        costophrenic: &[0.25, 0.2, 0.2, 0.35],
    },
    SiteProfile {
        name: "screening",
        description: "screening center, high-resolution DR, 16-bit, JPEG lossless, steep contrast",
        institution: "Phantom Screening Center",
        manufacturer: "PhantomRay",
        model_name: "DR-9000",
        modality: "DX",
        columns: (2500, 3000),
        aspect: (1.0, 1.1),
        bits_stored: &[16],
        monochrome1: false,
        encodings: &[Encoding::JpegLossless],
        window_tags: true,
        gamma: 0.75,
        latitude: (-0.05, 0.95),
        noise: 0.9,
        pixel_noise: 0.003,
        ap_share: 0.05,
        female_share: 0.6,
        age: (52.0, 12.0),
        repeat_share: 0.05,
        quality: &[0.4, 0.3, 0.2, 0.1],
        rib_fracture: 0.15,
        clavicle_asymmetry: 0.2,
        scoliosis: 0.2,
        opacity: &[0.5, 0.2, 0.15, 0.15],
        vascular: &[0.55, 0.25, 0.2],
        interstitial: 0.25,
        hyperlucency: 0.2,
        cardiac: &[0.55, 0.3, 0.15],
        aortic_prominent: 0.25,
        hilar_enlarged: 0.25,
        diaphragm: &[0.25, 0.5, 0.25],
        diaphragm_irregular: 0.2,
        costophrenic: &[0.45, 0.2, 0.2, 0.15],
    },
];

/// Looks a profile up by name.
pub fn profile(name: &str) -> Option<&'static SiteProfile> {
    PROFILES.iter().find(|p| p.name.eq_ignore_ascii_case(name))
}

/// The profile names, for `--help` and error messages.
pub fn profile_names() -> Vec<&'static str> {
    PROFILES.iter().map(|p| p.name).collect()
}
