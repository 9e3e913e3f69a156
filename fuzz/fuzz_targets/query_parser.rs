//! Query text as a researcher sends it: parse, then bind and compute it exactly on a small
//! set of records (the same binding a DP release plans on).
#![no_main]

use std::sync::OnceLock;

use cxrfed_schema::*;
use cxrfed_stats::Columns;
use libfuzzer_sys::fuzz_target;

fn record(i: usize) -> Record {
    Record {
        record_id: format!("r{i}"),
        image_sha256: format!("{i:064x}"),
        schema_version: SCHEMA_VERSION,
        model_id: "fuzz".into(),
        model_sha256: String::new(),
        created_at: chrono::DateTime::from_timestamp(1_700_000_000, 0).expect("time"),
        processing_ms: 1.0,
        request_id: String::new(),
        source: Source {
            modality: ["DX", "CR"][i % 2].into(),
            rows: 256 + i as u32,
            columns: 256,
            ..Default::default()
        },
        patient: Patient {
            pseudonym: format!("p{}", i / 3),
            age_group: flat::AGE_GROUPS[i % flat::AGE_GROUPS.len()].to_string(),
            sex: [Sex::Female, Sex::Male][i % 2],
        },
        acquisition: Acquisition {
            month: format!("2020-{:02}", 1 + i % 12),
            view: [View::Pa, View::Ap, View::Ll][i % 3],
        },
        findings: Some(Findings {
            image_quality: Some(Scored {
                value: ImageQuality::ALL[i % ImageQuality::ALL.len()],
                probability: 0.8,
            }),
            ..Default::default()
        }),
        processing_notes: Vec::new(),
        questions: Vec::new(),
        annotations: Vec::new(),
        custom_fields: Default::default(),
        model_fields: Default::default(),
    }
}

fn columns() -> &'static Columns {
    static COLUMNS: OnceLock<Columns> = OnceLock::new();
    COLUMNS.get_or_init(|| {
        let records: Vec<Record> = (0..40).map(record).collect();
        Columns::from_records(&records)
    })
}

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    if let Ok(query) = cxrfed_stats::query::parse(text) {
        let canonical = query.canonical();
        // The canonical text parses back to the same canonical text.
        let again = cxrfed_stats::query::parse(&canonical).expect("canonical text parses");
        assert_eq!(again.canonical(), canonical);
        let _ = cxrfed_stats::exact_query(columns(), query);
    }
    let _ = cxrfed_stats::query::parse_filter(text);
});
