//! Records for the statistics tests.
#![allow(dead_code)]

use cxrfed_schema::*;

#[derive(Debug, Clone)]
pub struct Spec {
    pub quality: Option<usize>,
    pub confidence: usize,
    pub age: Option<usize>,
    pub view: usize,
    pub month: u32,
    pub ctr: Option<f64>,
    pub patient: u8,
}

pub const VIEWS: [View; 3] = [View::Pa, View::Ap, View::Ll];

pub fn record(i: usize, s: &Spec) -> Record {
    let findings = Findings {
        image_quality: s.quality.map(|q| Scored {
            value: ImageQuality::ALL[q],
            probability: 0.8,
        }),
        analysis_confidence: Some(Scored {
            value: AnalysisConfidence::ALL[s.confidence],
            probability: 0.7,
        }),
        mediastinum: Mediastinum {
            cardiothoracic_ratio: s.ctr.map(|value| Measured {
                value,
                confidence: 0.9,
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    Record {
        record_id: format!("r{i}"),
        image_sha256: format!("{i:064x}"),
        schema_version: 1,
        model_id: "test".into(),
        model_sha256: String::new(),
        created_at: chrono::DateTime::from_timestamp(1_700_000_000, 0).expect("time"),
        processing_ms: 1.0,
        request_id: String::new(),
        source: Source {
            modality: "DX".into(),
            rows: 256,
            columns: 256,
            ..Default::default()
        },
        patient: Patient {
            pseudonym: format!("p{}", s.patient),
            age_group: s
                .age
                .map(|a| flat::AGE_GROUPS[a].to_string())
                .unwrap_or_default(),
            sex: Sex::Female,
        },
        acquisition: Acquisition {
            month: format!("2020-{:02}", s.month),
            view: VIEWS[s.view],
        },
        findings: Some(findings),
        processing_notes: Vec::new(),
        questions: Vec::new(),
        annotations: Vec::new(),
        custom_fields: Default::default(),
        model_fields: Default::default(),
    }
}
