//! End-to-end exact statistics and exports: phantoms through a real node, the CLI's numbers
//! checked against an independent computation (Python's standard library over the exported
//! CSV), parse errors with positions, and the admin-only rules.

use cxrfed_auth::Role;
use cxrfed_auth::pki;
use cxrfed_e2e::{
    NodeProcess, cxrfed, run_python, text, venv_python, workspace_root, write_phantoms,
};
use cxrfed_proto::v1 as pb;
use cxrfed_proto::v1::node_service_client::NodeServiceClient;
use tonic::Code;

#[tokio::test(flavor = "multi_thread")]
async fn stats_match_an_independent_computation_over_the_export() {
    let dir = tempfile::tempdir().expect("tempdir");
    let phantoms = dir.path().join("phantoms");
    write_phantoms(&phantoms, 16, 31, 384);
    let node = NodeProcess::start(&dir.path().join("node"), &[]);
    let mut files: Vec<String> = std::fs::read_dir(&phantoms)
        .expect("dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "dcm"))
        .map(|p| p.to_str().expect("path").to_string())
        .collect();
    files.sort();
    let mut args = vec!["extract"];
    args.extend(files.iter().map(String::as_str));
    let out = node.cli(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // The export, and the same numbers computed from it by Python's standard library.
    let csv_path = dir.path().join("export.csv");
    let out = node.cli(&[
        "export",
        "--format",
        "csv",
        "--out",
        csv_path.to_str().expect("path"),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("exported 16 records"),
        "{}",
        text(&out.stderr)
    );
    let py = std::process::Command::new(venv_python())
        .arg(workspace_root().join("tests/helpers/stats_from_csv.py"))
        .arg(&csv_path)
        .args([
            "--row",
            "image_quality",
            "--col",
            "analysis_confidence",
            "--where",
            "format=dicom",
            "--numeric",
            "cardiothoracic_ratio",
            "--by",
            "view",
        ])
        .output()
        .expect("python");
    assert!(py.status.success(), "{}", text(&py.stderr));
    let expected: serde_json::Value = serde_json::from_slice(&py.stdout).expect("json");
    assert_eq!(expected["total"], 16);

    let out = node.cli(&[
        "stats",
        "crosstab image_quality, analysis_confidence where format = dicom",
        "--format",
        "json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(table["cohort_size"], expected["cohort"]);
    let columns: Vec<String> = table["columns"]
        .as_array()
        .expect("columns")
        .iter()
        .map(|c| c.as_str().expect("name").to_string())
        .collect();
    let mut compared = 0;
    for row in table["rows"].as_array().expect("rows") {
        let quality = row[0].as_str().expect("label");
        for (j, name) in columns.iter().enumerate().skip(1) {
            let Some(confidence) = name.strip_prefix("analysis_confidence=") else {
                continue;
            };
            let want = expected["crosstab"][format!("{quality}|{confidence}")]
                .as_u64()
                .unwrap_or(0);
            assert_eq!(row[j].as_u64(), Some(want), "{quality} x {confidence}");
            compared += want;
        }
    }
    assert_eq!(compared, expected["cohort"].as_u64().expect("cohort"));

    let out = node.cli(&[
        "stats",
        "summary cardiothoracic_ratio by view",
        "--format",
        "json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    for (group, want) in expected["summary"].as_object().expect("summary") {
        let row = table["rows"]
            .as_array()
            .expect("rows")
            .iter()
            .find(|r| r[0] == *group)
            .unwrap_or_else(|| panic!("group {group}"));
        assert_eq!(row[1], want["n"]);
        for (col, key) in [(2, "mean"), (6, "median"), (4, "min"), (8, "max")] {
            let got = row[col].as_f64().expect("number");
            let want = want[key].as_f64().expect("number");
            // The export prints the f32 the columns hold; allow its rounding.
            assert!((got - want).abs() < 1e-6, "{group} {key}: {got} vs {want}");
        }
    }

    // The structured (proto) form gives the same table as the text.
    let mut c = NodeServiceClient::new(node.channel().await);
    let text_form = c
        .stats(pb::StatsRequest {
            query: r#"crosstab image_quality, analysis_confidence where format = dicom and view in (PA, AP) normalize=row"#.into(),
            structured: None,
        })
        .await
        .expect("text")
        .into_inner();
    let structured = c
        .stats(pb::StatsRequest {
            query: String::new(),
            structured: Some(pb::StructuredQuery {
                statistic: "crosstab".into(),
                fields: vec!["image_quality".into(), "analysis_confidence".into()],
                conditions: vec![
                    pb::StatsCondition {
                        field: "format".into(),
                        op: "=".into(),
                        values: vec!["dicom".into()],
                    },
                    pb::StatsCondition {
                        field: "view".into(),
                        op: "in".into(),
                        values: vec!["PA".into(), "AP".into()],
                    },
                ],
                by: String::new(),
                normalize: "row".into(),
            }),
        })
        .await
        .expect("structured")
        .into_inner();
    assert_eq!(text_form, structured);

    // The table format, for people, and the chart.
    let chart = dir.path().join("quality-vs-confidence.png");
    let out = node.cli(&[
        "stats",
        "crosstab image_quality, analysis_confidence normalize=row",
        "--plot",
        chart.to_str().expect("path"),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("exact, site admin only"));
    let png = image::open(&chart).expect("a PNG");
    assert_eq!((png.width(), png.height()), (960, 560));
    let histogram = dir.path().join("hist.png");
    let out = node.cli(&[
        "stats",
        "histogram costophrenic_angle",
        "--plot",
        histogram.to_str().expect("path"),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = node.cli(&[
        "stats",
        "summary cardiothoracic_ratio",
        "--plot",
        histogram.to_str().expect("path"),
    ]);
    assert!(!out.status.success() && text(&out.stderr).contains("crosstabs and histograms"));

    // Parquet: typed columns, the same rows (read back with the parquet crate's own reader).
    let parquet_path = dir.path().join("export.parquet");
    let out = node.cli(&[
        "export",
        "--format",
        "parquet",
        "--out",
        parquet_path.to_str().expect("path"),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    {
        use parquet::file::reader::FileReader;
        let reader = parquet::file::reader::SerializedFileReader::new(
            std::fs::File::open(&parquet_path).expect("parquet file"),
        )
        .expect("a parquet file");
        let meta = reader.metadata();
        assert_eq!(meta.file_metadata().num_rows(), 16);
        let schema = meta.file_metadata().schema_descr();
        let column = |name: &str| {
            (0..schema.num_columns())
                .map(|i| schema.column(i))
                .find(|c| c.name() == name)
                .unwrap_or_else(|| panic!("column {name}"))
        };
        assert_eq!(
            column("cardiothoracic_ratio").physical_type(),
            parquet::basic::Type::DOUBLE
        );
        assert_eq!(
            column("hyperlucency").physical_type(),
            parquet::basic::Type::BOOLEAN
        );
        assert_eq!(
            column("image_quality").physical_type(),
            parquet::basic::Type::BYTE_ARRAY
        );
    }

    // A filtered JSONL export agrees with the count.
    let out = node.cli(&["stats", "count where view = PA", "--format", "json"]);
    let count: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let out = node.cli(&["export", "--format", "jsonl", "--where", "view = PA"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines = text(&out.stdout).lines().count() as u64;
    assert_eq!(Some(lines), count["rows"][0][0].as_u64());
}

#[tokio::test(flavor = "multi_thread")]
async fn parse_errors_name_the_position_and_researchers_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProcess::start(dir.path(), &["--model", "none"]);
    let mut admin = NodeServiceClient::new(node.channel().await);
    let status = admin
        .stats(pb::StatsRequest {
            query: "crosstab image_quality analysis_confidence".into(),
            structured: None,
        })
        .await
        .expect_err("parse error");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("at 23: expected ','"),
        "{}",
        status.message()
    );
    let status = admin
        .export(pb::ExportRequest {
            format: "xlsx".into(),
            r#where: String::new(),
        })
        .await
        .expect_err("format");
    assert_eq!(status.code(), Code::InvalidArgument);
    // The CLI points at the token.
    let out = node.cli(&["stats", "count where view ~ PA"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("                 ^"),
        "{}",
        text(&out.stderr)
    );

    let researcher = node.pki.identity(Role::Researcher, "rita", None);
    let mut as_researcher = NodeServiceClient::new(node.channel_as(&researcher).await);
    let status = as_researcher
        .stats(pb::StatsRequest {
            query: "count".into(),
            structured: None,
        })
        .await
        .expect_err("researcher");
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = as_researcher
        .export(pb::ExportRequest::default())
        .await
        .expect_err("researcher");
    assert_eq!(status.code(), Code::PermissionDenied);
    // The schema is public: a researcher reads it, and it is the committed one.
    let schema = as_researcher
        .get_schema(pb::GetSchemaRequest {})
        .await
        .expect("schema")
        .into_inner();
    let committed = std::fs::read_to_string(workspace_root().join("schema/record.schema.json"))
        .expect("committed schema");
    let served: serde_json::Value = serde_json::from_str(&schema.record_json_schema).expect("json");
    let committed: serde_json::Value = serde_json::from_str(&committed).expect("json");
    assert_eq!(served, committed);
    let quality = schema
        .fields
        .iter()
        .find(|f| f.name == "image_quality")
        .expect("image_quality");
    assert_eq!(quality.categories, ["excellent", "good", "fair", "poor"]);
    assert!(quality.has_probability);
    let profile = researcher.join(pki::PROFILE);
    let out = cxrfed(&[
        "export",
        "--node",
        &node.url(),
        "--profile",
        profile.to_str().expect("path"),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("PermissionDenied"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn questions_in_english_and_chinese_map_to_fields_and_are_appended() {
    let dir = tempfile::tempdir().expect("tempdir");
    let phantoms = dir.path().join("phantoms");
    write_phantoms(&phantoms, 1, 7, 384);
    let file = std::fs::read_dir(&phantoms)
        .expect("dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "dcm"))
        .expect("phantom");
    let node = NodeProcess::start(&dir.path().join("node"), &[]);
    let out = node.cli(&["extract", file.to_str().expect("path")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let record: serde_json::Value = serde_json::from_slice(&out.stdout).expect("record");
    let id = record["record_id"].as_str().expect("id").to_string();

    let mut c = NodeServiceClient::new(node.channel().await);
    let cases = [
        (
            "Is the left costophrenic angle blunted?",
            "costophrenic_angle",
            &["blunted_left", "blunted_both"][..],
        ),
        ("肺野透亮度是否普遍增高?", "hyperlucency", &["true"][..]),
        (
            "外周肺血管纹理是否明显变细?",
            "vascular_pattern",
            &["decreased"][..],
        ),
        ("What is the image quality?", "image_quality", &[][..]),
    ];
    for (question, field, yes) in cases {
        let answer = c
            .ask(pb::AskRequest {
                record_id: id.clone(),
                question: question.into(),
            })
            .await
            .expect("ask")
            .into_inner();
        assert!(answer.understood, "{question}");
        assert_eq!(answer.field, field, "{question}");
        assert_eq!(answer.yes_values, yes, "{question}");
        assert!(!answer.value.is_empty(), "the model answered {question}");
        // The answer is the model's own value for that field, as stored in the record.
        let stored = match field {
            "costophrenic_angle" => &record["findings"]["diaphragm"]["costophrenic_angle"]["value"],
            "hyperlucency" => &record["findings"]["lungs"]["hyperlucency"]["value"],
            "vascular_pattern" => &record["findings"]["lungs"]["vascular_pattern"]["value"],
            _ => &record["findings"]["image_quality"]["value"],
        };
        let stored = match stored {
            serde_json::Value::Bool(b) => b.to_string(),
            v => v.as_str().expect("text").to_string(),
        };
        assert_eq!(answer.value, stored, "{question}");
        let expected = if yes.is_empty() {
            pb::YesNo::Unspecified
        } else if yes.contains(&stored.as_str()) {
            pb::YesNo::Yes
        } else {
            pb::YesNo::No
        };
        assert_eq!(answer.yes_no(), expected, "{question}");
    }
    let stored = c
        .get_record(pb::GetRecordRequest {
            record_id: id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(stored.questions.len(), 4);
    assert!(stored.questions.iter().all(|q| q.source == "question"));
    assert_eq!(stored.questions[1].field, "hyperlucency");

    // A question about nothing known: said so, with suggestions, and nothing is added.
    let out = node.cli(&["ask", &id, "Is the costophrenc angel sharp?", "--json"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(answer["understood"], false);
    assert_eq!(answer["suggestions"][0]["field"], "costophrenic_angle");
    let stored = c
        .get_record(pb::GetRecordRequest { record_id: id })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(
        stored.questions.len(),
        4,
        "nothing added for an unknown question"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_python_sdk_extracts_queries_and_exports_into_pandas() {
    let dir = tempfile::tempdir().expect("tempdir");
    let phantoms = dir.path().join("phantoms");
    write_phantoms(&phantoms, 6, 12, 384);
    let node = NodeProcess::start(&dir.path().join("node"), &[]);
    let (url, profile) = (node.url(), node.profile());
    let run = |script: &str, extra: &[&str]| {
        let mut args = vec!["--node", url.as_str(), "--profile", profile.as_str()];
        args.extend_from_slice(extra);
        run_python(script, &args)
    };
    // A researcher with a budget, for the DP part.
    let researcher = node.pki.identity(Role::Researcher, "pia", None);
    let admin = node.profile();
    let out = cxrfed(&[
        "node",
        "budget",
        "set",
        "--data-dir",
        node.data_dir_str(),
        "--identity",
        "pia",
        "--epsilon",
        "1",
        "--profile",
        &admin,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let researcher_profile = researcher.join(pki::PROFILE);
    let seen: serde_json::Value = serde_json::from_str(
        run(
            "tests/helpers/sdk_check.py",
            &[
                "--folder",
                phantoms.to_str().expect("path"),
                "--researcher-profile",
                researcher_profile.to_str().expect("path"),
            ],
        )
        .trim(),
    )
    .expect("json");
    let dp = &seen["dp"];
    assert_eq!(
        dp["columns"],
        serde_json::json!(["count", "count_error_bound"])
    );
    assert_eq!(
        dp["index"],
        serde_json::json!(["PA", "AP", "LL", "unknown", "(missing)"])
    );
    assert_eq!(dp["bounds_positive"], true);
    assert_eq!(dp["spent_before"], 0.0);
    assert!(dp["spent_after"].as_f64().expect("spent") > 0.49);
    assert_eq!(dp["exact_error"], "PERMISSION_DENIED");
    assert_eq!(
        seen["created"],
        serde_json::json!([true, true, true, true, true, true])
    );
    assert_eq!(seen["again_created"], false);
    assert_eq!(seen["records"], 6);
    assert_eq!(seen["answer_field"], "costophrenic_angle");
    assert_eq!(seen["crosstab_total"], 6);
    assert_eq!(
        seen["crosstab_index"],
        serde_json::json!(["excellent", "good", "fair", "poor"])
    );
    assert_eq!(seen["export_rows"], 6);
    assert_eq!(seen["pandas_crosstab_total"], 6);
    assert_eq!(seen["export_pa_rows"], seen["count_pa"]);
    assert_eq!(seen["export_columns"][0], "record_id");
    assert_eq!(seen["labelled"], "true");
    assert_eq!(seen["fields"], serde_json::json!(["pneumothorax"]));
    assert_eq!(seen["export_pneumothorax_true"], 1);
    assert_eq!(seen["parse_error"][0], "INVALID_ARGUMENT");
    assert_eq!(seen["parse_error"][1], "invalid_request");

    // The example reproduces the seed's analysis and writes the chart.
    let chart = dir.path().join("chart.png");
    let printed = run(
        "clients/python/examples/quality_vs_confidence.py",
        &["--out", chart.to_str().expect("path")],
    );
    assert!(
        printed.contains("pandas.crosstab over the export agrees"),
        "{printed}"
    );
    let png = std::fs::read(&chart).expect("chart");
    assert!(png.starts_with(b"\x89PNG"), "a PNG chart");
}

#[tokio::test(flavor = "multi_thread")]
async fn custom_fields_and_annotations_reach_records_statistics_and_exports() {
    let dir = tempfile::tempdir().expect("tempdir");
    let phantoms = dir.path().join("phantoms");
    write_phantoms(&phantoms, 8, 21, 384);
    let data = dir.path().join("node");
    let node = NodeProcess::start(&data, &[]);
    let state = dir.path().join("state.jsonl");
    let out = node.cli(&[
        "ingest",
        phantoms.to_str().expect("path"),
        "--state",
        state.to_str().expect("path"),
        "--report",
        dir.path().join("r.jsonl").to_str().expect("path"),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // Define, redefine (a new version), list.
    for _ in 0..2 {
        let out = node.cli(&[
            "field",
            "define",
            "pneumothorax",
            "--type",
            "bool",
            "--description",
            "visible pleural line",
            "--synonym",
            "气胸",
            "--synonym",
            "collapsed lung",
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let out = node.cli(&["field", "list"]);
    assert!(
        text(&out.stdout).contains("pneumothorax  v2  bool"),
        "{}",
        text(&out.stdout)
    );
    let out = node.cli(&["field", "define", "image_quality", "--type", "bool"]);
    assert!(!out.status.success() && text(&out.stderr).contains("schema column"));

    // The phantom labels file imports as is (schema findings become corrections).
    let out = node.cli(&[
        "annotate",
        "import",
        phantoms.join("labels.csv").to_str().expect("path"),
        "--annotator",
        "ground-truth",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("from 8 rows"),
        "{}",
        text(&out.stdout)
    );
    assert!(text(&out.stdout).contains("0 rows name images the node does not have"));

    // Label the custom field on five records.
    let mut c = NodeServiceClient::new(node.channel().await);
    let records = {
        let mut stream = c
            .list_records(pb::ListRecordsRequest::default())
            .await
            .expect("list")
            .into_inner();
        let mut out = Vec::new();
        while let Some(item) = stream.message().await.expect("page") {
            if let Some(pb::list_records_response::Item::Record(r)) = item.item {
                out.push(r);
            }
        }
        out
    };
    assert_eq!(records.len(), 8);
    for (i, record) in records.iter().take(5).enumerate() {
        let value = if i < 3 { "true" } else { "no" };
        let out = node.cli(&["annotate", "set", &record.record_id, "pneumothorax", value]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let status = c
        .annotate(pb::AnnotateRequest {
            record_id: records[0].record_id.clone(),
            field: "pneumothorax".into(),
            value: "maybe".into(),
            ..Default::default()
        })
        .await
        .expect_err("not a bool");
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = c
        .annotate(pb::AnnotateRequest {
            record_id: records[0].record_id.clone(),
            field: "tube_position".into(),
            value: "ok".into(),
            ..Default::default()
        })
        .await
        .expect_err("undefined field");
    assert!(
        status.message().contains("define it first"),
        "{}",
        status.message()
    );

    // Records carry the labels, apart from the findings.
    let first = c
        .get_record(pb::GetRecordRequest {
            record_id: records[0].record_id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    let pneumothorax = first
        .annotations
        .iter()
        .find(|a| a.field == "pneumothorax")
        .expect("label");
    assert_eq!(
        (pneumothorax.value.as_str(), pneumothorax.source.as_str()),
        ("true", "annotation")
    );
    assert!(
        first
            .annotations
            .iter()
            .any(|a| a.field == "image_quality" && a.annotator == "ground-truth")
    );

    // Statistics over the custom field and over model vs human labels.
    let histogram = |node: &NodeProcess| {
        let out = node.cli(&["stats", "histogram pneumothorax", "--format", "json"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("json")["rows"].clone()
    };
    let expected = serde_json::json!([["false", 2], ["true", 3], ["(missing)", 3]]);
    assert_eq!(histogram(&node), expected);
    let out = node.cli(&[
        "stats",
        "crosstab image_quality, image_quality_annotated",
        "--format",
        "json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(table["cohort_size"], 8);

    // The export has the custom field and the corrections as columns.
    let out = node.cli(&["export", "--format", "jsonl"]);
    let rows: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(
        rows.iter().filter(|r| r["pneumothorax"] == "true").count(),
        3
    );
    assert_eq!(
        rows.iter().filter(|r| r["pneumothorax"] == "false").count(),
        2
    );
    assert!(
        rows.iter()
            .all(|r| r["image_quality_annotated"].is_string())
    );

    // A question naming the custom field says how many labels exist.
    let answer = c
        .ask(pb::AskRequest {
            record_id: records[0].record_id.clone(),
            question: "这张片子有气胸吗?".into(),
        })
        .await
        .expect("ask")
        .into_inner();
    assert_eq!(answer.field, "pneumothorax");
    assert!(
        answer.answer.contains("5 image(s) are annotated"),
        "{}",
        answer.answer
    );
    assert_eq!(answer.value, "true");

    // After a restart the index is rebuilt with the labels.
    drop(c);
    let out = cxrfed(&["node", "stop", "--data-dir", data.to_str().expect("path")]);
    assert!(out.status.success());
    let mut node = node;
    node.wait_exit(std::time::Duration::from_secs(30))
        .expect("stopped");
    let node = NodeProcess::start(&data, &[]);
    assert_eq!(histogram(&node), expected);
}
