//! Exact statistics against an independent computation over the records themselves.

use cxrfed_schema::*;
use cxrfed_stats::exact::MISSING;
use cxrfed_stats::{Columns, TableCell};
use proptest::prelude::*;

mod common;
use common::{Spec, record};

fn spec() -> impl Strategy<Value = Spec> {
    (
        proptest::option::weighted(0.9, 0usize..4),
        0usize..4,
        proptest::option::weighted(0.9, 4usize..9),
        0usize..3,
        1u32..13,
        proptest::option::weighted(0.8, 0.3f64..0.7),
        0u8..20,
    )
        .prop_map(
            |(quality, confidence, age, view, month, ctr, patient)| Spec {
                quality,
                confidence,
                age,
                view,
                month,
                ctr,
                patient,
            },
        )
}

fn count_of(table: &cxrfed_stats::Table, row_label: &str, column: &str) -> u64 {
    let col = table
        .columns
        .iter()
        .position(|c| c == column)
        .unwrap_or_else(|| panic!("column {column} in {:?}", table.columns));
    let row = table
        .rows
        .iter()
        .find(|r| r[0] == TableCell::Text(row_label.into()));
    match row.map(|r| &r[col]) {
        Some(TableCell::Count(n)) => *n,
        None => 0,
        other => panic!("not a count: {other:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn crosstab_counts_equal_a_direct_count(specs in proptest::collection::vec(spec(), 0..300)) {
        let records: Vec<Record> = specs.iter().enumerate().map(|(i, s)| record(i, s)).collect();
        let columns = Columns::from_records(&records);
        let table = cxrfed_stats::exact(
            &columns,
            r#"crosstab image_quality, analysis_confidence where age_group in ("60-69", "70-79") and month between 2020-03 and 2020-09"#,
        ).expect("query");
        let cohort: Vec<&Record> = records.iter().filter(|r| {
            matches!(r.patient.age_group.as_str(), "60-69" | "70-79")
                && r.acquisition.month.as_str() >= "2020-03"
                && r.acquisition.month.as_str() <= "2020-09"
        }).collect();
        prop_assert_eq!(table.cohort_size, cohort.len() as u64);
        for q in ImageQuality::ALL.iter().map(|q| Some(q.as_str())).chain([None]) {
            for c in AnalysisConfidence::ALL {
                let expected = cohort.iter().filter(|r| {
                    let f = r.findings.as_ref().expect("findings");
                    f.image_quality.map(|s| s.value.as_str()) == q
                        && f.analysis_confidence.map(|s| s.value) == Some(*c)
                }).count() as u64;
                let got = count_of(&table, q.unwrap_or(MISSING), &format!("analysis_confidence={}", c.as_str()));
                prop_assert_eq!(got, expected, "quality {:?} confidence {:?}", q, c);
            }
        }
    }

    #[test]
    fn summary_matches_a_direct_computation(specs in proptest::collection::vec(spec(), 1..200)) {
        let records: Vec<Record> = specs.iter().enumerate().map(|(i, s)| record(i, s)).collect();
        let columns = Columns::from_records(&records);
        let table = cxrfed_stats::exact(&columns, "summary cardiothoracic_ratio where view != LL by view").expect("query");
        for view in ["PA", "AP"] {
            let mut values: Vec<f64> = records.iter()
                .filter(|r| r.acquisition.view.as_str() == view)
                .filter_map(|r| r.findings.as_ref()?.mediastinum.cardiothoracic_ratio.map(|m| m.value as f32 as f64))
                .collect();
            values.sort_by(f64::total_cmp);
            let row = table.rows.iter().find(|r| r[0] == TableCell::Text(view.into())).expect("row");
            prop_assert_eq!(&row[1], &TableCell::Count(values.len() as u64));
            if !values.is_empty() {
                let mean = values.iter().sum::<f64>() / values.len() as f64;
                let TableCell::Number(got) = row[2] else { panic!("mean") };
                prop_assert!((got - mean).abs() < 1e-9);
                let TableCell::Number(min) = row[4] else { panic!("min") };
                prop_assert_eq!(min, values[0]);
            }
        }
        // Categories are public: LL is listed, with nobody in it.
        let ll = table.rows.iter().find(|r| r[0] == TableCell::Text("LL".into())).expect("LL row");
        prop_assert_eq!(&ll[1], &TableCell::Count(0));
    }
}

#[test]
fn normalization_and_replacement() {
    let specs = [(0usize, 0usize), (0, 1), (0, 1), (1, 2)];
    let mut records: Vec<Record> = specs
        .iter()
        .enumerate()
        .map(|(i, (q, c))| {
            record(
                i,
                &Spec {
                    quality: Some(*q),
                    confidence: *c,
                    age: Some(6),
                    view: 0,
                    month: 1,
                    ctr: Some(0.5),
                    patient: i as u8,
                },
            )
        })
        .collect();
    let mut columns = Columns::from_records(&records);
    let table = cxrfed_stats::exact(
        &columns,
        "crosstab image_quality, analysis_confidence normalize=row",
    )
    .expect("query");
    let excellent = &table.rows[0];
    assert_eq!(excellent[0], TableCell::Text("excellent".into()));
    let TableCell::Number(high) = excellent[1] else {
        panic!("share")
    };
    assert!((high - 1.0 / 3.0).abs() < 1e-12);
    // A forced re-extraction of image 0 replaces its row instead of adding one.
    records[0]
        .findings
        .as_mut()
        .expect("findings")
        .image_quality = Some(Scored {
        value: ImageQuality::Poor,
        probability: 0.9,
    });
    columns.upsert(&records[0]);
    assert_eq!(columns.len(), 4);
    let table = cxrfed_stats::exact(&columns, "histogram image_quality").expect("query");
    let poor = table
        .rows
        .iter()
        .find(|r| r[0] == TableCell::Text("poor".into()))
        .expect("poor");
    assert_eq!(poor[1], TableCell::Count(1));
}

#[test]
fn bad_fields_and_values_are_refused_with_their_position() {
    let columns = Columns::from_records(&[]);
    let e = cxrfed_stats::exact(&columns, "histogram image_qualty").expect_err("typo");
    assert_eq!(e.position, 10);
    assert!(e.message.contains("unknown field"), "{e}");
    let e = cxrfed_stats::exact(&columns, "count where image_quality = superb").expect_err("value");
    assert_eq!(e.position, 28);
    assert!(e.message.contains("excellent, good, fair, poor"), "{e}");
    let e = cxrfed_stats::exact(&columns, "summary image_quality").expect_err("not numeric");
    assert_eq!(e.position, 8);
    let e = cxrfed_stats::exact(&columns, "histogram cardiothoracic_ratio").expect_err("numeric");
    assert!(e.message.contains("summary"), "{e}");
    let e = cxrfed_stats::exact(&columns, "count where month >= 2020-1").expect_err("month");
    assert!(e.message.contains("YYYY-MM"), "{e}");
    let e = cxrfed_stats::exact(&columns, "count where view > PA").expect_err("range on category");
    assert!(e.message.contains("categorical"), "{e}");
}

/// A custom field is filled by the model (a head a federated job trained) where no human
/// labelled it; labels win; a column defined after the records still gets the model's values;
/// a back-fill that changes the model's value moves the count.
#[test]
fn custom_fields_take_labels_first_then_the_model() {
    let spec = Spec {
        quality: Some(0),
        confidence: 0,
        age: Some(5),
        view: 0,
        month: 3,
        ctr: Some(0.5),
        patient: 1,
    };
    let mut records: Vec<Record> = (0..6).map(|i| record(i, &spec)).collect();
    for (i, r) in records.iter_mut().enumerate() {
        r.model_fields
            .insert("cardiomegaly".into(), (i % 2 == 0).to_string());
    }
    let mut columns = Columns::from_records(&records);
    let definition = cxrfed_schema::custom::FieldDefinition {
        name: "cardiomegaly".into(),
        kind: cxrfed_schema::custom::CustomKind::Bool,
        description: String::new(),
        synonyms: Vec::new(),
        version: 1,
        defined_at: chrono::Utc::now(),
        defined_by: "test".into(),
    };
    columns.define_custom(&definition);
    let count = |columns: &Columns| {
        let table = cxrfed_stats::exact(columns, "count where cardiomegaly = true").expect("count");
        match &table.rows[0][0] {
            TableCell::Count(n) => *n,
            other => panic!("{other:?}"),
        }
    };
    // Rows 0, 2, 4 are true by the model.
    assert_eq!(count(&columns), 3);
    // A human says row 1 is true and row 0 is false: labels win.
    columns.annotate(&records[1].image_sha256, "cardiomegaly", "true");
    columns.annotate(&records[0].image_sha256, "cardiomegaly", "false");
    assert_eq!(count(&columns), 3);
    // A back-fill flips every model value; labelled rows keep their labels.
    for (i, r) in records.iter_mut().enumerate() {
        r.model_fields
            .insert("cardiomegaly".into(), (i % 2 == 1).to_string());
        columns.upsert(r);
    }
    // Model: rows 3, 5 true (1 is labelled true, 0 labelled false) -> 1, 3, 5.
    assert_eq!(count(&columns), 3);
    let table = cxrfed_stats::exact(&columns, "count where cardiomegaly = false").expect("count");
    assert_eq!(table.rows[0][0], TableCell::Count(3));
}

#[test]
fn large_tables_count_the_same_fused_and_split_over_threads() {
    // Enough rows that counting is split over threads (more than 2 × 65,536), with missing
    // values, coded and numeric filters, one, two and three tabulated fields.
    let records: Vec<Record> = (0..140_000usize)
        .map(|i| {
            record(
                i,
                &Spec {
                    quality: (i % 5 < 4).then_some(i % 4),
                    confidence: i % 4,
                    age: (i % 7 != 0).then_some(4 + i % 5),
                    view: i % 3,
                    month: 1 + (i % 12) as u32,
                    ctr: (i % 3 != 0).then_some(0.3 + (i % 40) as f64 / 100.0),
                    patient: (i % 20) as u8,
                },
            )
        })
        .collect();
    let columns = Columns::from_records(&records);
    for text in [
        r#"crosstab image_quality, analysis_confidence where age_group in ("60-69", "70-79")"#,
        "crosstab image_quality, analysis_confidence where cardiothoracic_ratio > 0.5",
        "crosstab view, image_quality, analysis_confidence where month between 2020-03 and 2020-09",
        "histogram analysis_confidence by view",
        "histogram image_quality",
    ] {
        let query = cxrfed_stats::query::parse(text).expect("query");
        let bound = cxrfed_stats::exact::bind(&columns, query).expect("bind");
        let fused = cxrfed_stats::exact::count_matching(&columns, &bound);
        let cohort = bound.cohort(&columns);
        let direct = cxrfed_stats::exact::count_cells(&columns, bound.tabulated(), &cohort);
        assert_eq!(fused, direct, "{text}");
        assert_eq!(fused.iter().sum::<u64>(), cohort.len() as u64, "{text}");
        assert!(!cohort.is_empty(), "{text}");
    }
}
