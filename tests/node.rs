//! End-to-end tests of the node: the real `cxrfed` binary serving on a loopback port, talked to
//! through the generated gRPC client and through the CLI, with real files and a real sled store.

use std::time::Duration;

use cxrfed_e2e::{
    NodeProcess, TestDicom, all_bytes, contains, cxrfed, pydicom_data_dir, pydicom_test_files_dir,
    venv_python, write_phantoms,
};
use cxrfed_proto::v1 as pb;
use cxrfed_proto::v1::node_service_client::NodeServiceClient;
use tonic::Code;
use tonic::transport::Channel;

async fn client(node: &NodeProcess) -> NodeServiceClient<Channel> {
    NodeServiceClient::new(node.channel().await)
}

fn upload(bytes: &[u8], filename: &str, force: bool) -> Vec<pb::ExtractRequest> {
    cxrfed_proto::upload(bytes.to_vec().into(), filename, force, 256 * 1024)
}

async fn extract(
    client: &mut NodeServiceClient<Channel>,
    bytes: &[u8],
    filename: &str,
    force: bool,
) -> Result<pb::ExtractResponse, tonic::Status> {
    client
        .extract(tokio_stream::iter(upload(bytes, filename, force)))
        .await
        .map(tonic::Response::into_inner)
}

async fn status(client: &mut NodeServiceClient<Channel>) -> pb::StatusResponse {
    client
        .status(pb::StatusRequest {})
        .await
        .expect("status")
        .into_inner()
}

async fn list_all(
    client: &mut NodeServiceClient<Channel>,
    request: pb::ListRecordsRequest,
) -> Vec<pb::Record> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let mut stream = client
            .list_records(pb::ListRecordsRequest {
                page_token: token.clone(),
                ..request.clone()
            })
            .await
            .expect("list")
            .into_inner();
        token.clear();
        while let Some(item) = stream.message().await.expect("stream") {
            match item.item.expect("item") {
                pb::list_records_response::Item::Record(r) => out.push(r),
                pb::list_records_response::Item::PageEnd(end) => token = end.next_page_token,
            }
        }
        if token.is_empty() {
            return out;
        }
    }
}

fn rg1(name: &str) -> Vec<u8> {
    std::fs::read(pydicom_data_dir().join(name)).expect("RG1 file from pydicom-data")
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_extract_status_stop_through_the_binary() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = NodeProcess::start(dir.path(), &[]);
    let file = pydicom_data_dir().join("RG1_UNCI.dcm");
    let out = node.cli(&["extract", file.to_str().expect("path")]);
    assert!(
        out.status.success(),
        "extract failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    assert_eq!(stdout.lines().count(), 1, "one JSON document per file");
    let record: serde_json::Value = serde_json::from_str(stdout.trim()).expect("record JSON");
    assert_eq!(record["patient"]["age_group"], "60-69");
    assert_eq!(record["patient"]["sex"], "F");
    assert_eq!(record["acquisition"]["view"], "PA");
    assert_eq!(record["acquisition"]["month"], "2004-08");
    assert_eq!(record["source"]["modality"], "CR");
    assert_eq!(record["source"]["format"], "dicom");
    assert_eq!(
        record["source"]["photometric_interpretation"],
        "MONOCHROME1"
    );
    // The bundled model fills every finding.
    assert_eq!(record["model_id"], "cxrfed-tiny-phantom-v1");
    assert_eq!(record["model_sha256"].as_str().expect("sha").len(), 64);
    let findings = &record["findings"];
    for path in [
        "/image_quality/value",
        "/analysis_confidence/value",
        "/thorax/rib_fracture/value",
        "/thorax/clavicle_symmetry/value",
        "/thorax/spine_alignment/value",
        "/lungs/opacity_distribution/zones",
        "/lungs/opacity_severity/value",
        "/lungs/vascular_pattern/value",
        "/lungs/interstitial_markings/value",
        "/lungs/hyperlucency/value",
        "/mediastinum/cardiac_contour/value",
        "/mediastinum/cardiothoracic_ratio/value",
        "/mediastinum/aortic_knob/value",
        "/mediastinum/hilar_size/value",
        "/diaphragm/position/value",
        "/diaphragm/contour/value",
        "/diaphragm/costophrenic_angle/value",
    ] {
        assert!(
            findings.pointer(path).is_some(),
            "{path} missing in {findings}"
        );
    }
    assert_eq!(record["image_sha256"].as_str().expect("hash").len(), 64);

    let out = node.cli(&["records"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);

    // Without credentials the local facts still show; the Status RPC needs the site admin.
    let out = cxrfed(&["node", "status", "--data-dir", node.data_dir_str()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("transport:      mutual TLS"), "{text}");
    assert!(text.contains("status RPC:     unavailable"), "{text}");
    let out = cxrfed(&[
        "node",
        "status",
        "--data-dir",
        node.data_dir_str(),
        "--profile",
        &node.profile(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("node: running"), "{text}");
    assert!(
        text.contains(&format!("pid:            {}", node.child.id())),
        "{text}"
    );
    assert!(text.contains("records:        1"), "{text}");
    assert!(text.contains("last log lines:"), "{text}");

    let out = cxrfed(&["node", "stop", "--data-dir", node.data_dir_str()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let exit = node
        .wait_exit(Duration::from_secs(30))
        .expect("node exits after stop");
    assert!(exit.success(), "graceful stop exits 0: {exit}");
    assert!(!dir.path().join("node.pid").exists(), "PID file cleaned up");
    let out = cxrfed(&["node", "status", "--data-dir", node.data_dir_str()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("not running"));
}

#[tokio::test(flavor = "multi_thread")]
async fn deidentification_leaves_no_identifier_in_records_logs_or_store() {
    // The identifiers RG1 carries, read with pydicom.
    let out = std::process::Command::new(venv_python())
        .arg("-c")
        .arg(
            "import pydicom, json, sys; ds = pydicom.dcmread(sys.argv[1]); \
             print(json.dumps([str(ds.get(k, '')) for k in \
             ['PatientName', 'PatientID', 'PatientBirthDate', 'AccessionNumber', 'InstitutionName']]))",
        )
        .arg(pydicom_data_dir().join("RG1_UNCI.dcm"))
        .output()
        .expect("python");
    let identifiers: Vec<String> = serde_json::from_slice(&out.stdout).expect("identifiers");
    let identifiers: Vec<String> = identifiers
        .into_iter()
        .filter(|s| s.trim().len() >= 3)
        .collect();
    assert!(
        identifiers.len() >= 4,
        "RG1 should carry name, ID, birth date, accession/institution: {identifiers:?}"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = NodeProcess::start(dir.path(), &[]);
    let mut c = client(&node).await;
    let a = extract(&mut c, &rg1("RG1_UNCI.dcm"), "RG1_UNCI.dcm", false)
        .await
        .expect("extract")
        .record
        .expect("record");
    let b = extract(&mut c, &rg1("RG1_UNCR.dcm"), "RG1_UNCR.dcm", false)
        .await
        .expect("extract")
        .record
        .expect("record");
    let patient = a.patient.clone().expect("patient");
    assert_eq!(patient.age_group, "60-69");
    assert_eq!(patient.sex(), pb::Sex::Female);
    assert_eq!(
        a.acquisition.clone().expect("acquisition").view(),
        pb::View::Pa
    );
    assert_eq!(a.source.clone().expect("source").modality, "CR");
    assert_eq!(patient.pseudonym.len(), 64);
    assert_eq!(
        patient.pseudonym,
        b.patient.clone().expect("patient").pseudonym,
        "stable within a site"
    );

    // A second site pseudonymises the same patient differently.
    let other_dir = tempfile::tempdir().expect("tempdir");
    let other = NodeProcess::start(other_dir.path(), &["--site", "other"]);
    let mut oc = client(&other).await;
    let c2 = extract(&mut oc, &rg1("RG1_UNCI.dcm"), "RG1_UNCI.dcm", false)
        .await
        .expect("extract")
        .record
        .expect("record");
    assert_ne!(
        c2.patient.expect("patient").pseudonym,
        patient.pseudonym,
        "differs between sites"
    );
    drop(other);

    let listed = list_all(&mut c, pb::ListRecordsRequest::default()).await;
    let cli_json = node.cli(&["records"]).stdout;
    let out = cxrfed(&["node", "stop", "--data-dir", node.data_dir_str()]);
    assert!(out.status.success());
    node.wait_exit(Duration::from_secs(30)).expect("stopped");

    let records_text = format!("{listed:?}");
    let stored = all_bytes(dir.path());
    for id in &identifiers {
        assert!(!records_text.contains(id.as_str()), "record carries {id:?}");
        assert!(!contains(&cli_json, id), "CLI output carries {id:?}");
        assert!(
            !contains(&stored, id),
            "data directory (sled files, logs) carries {id:?}"
        );
    }
    // The logs exist and carry hashes and record ids instead.
    let log = std::fs::read_to_string(dir.path().join("logs/node.log")).expect("node log");
    assert!(log.contains(&a.image_sha256) && log.contains(&a.record_id));
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_the_right_status_and_nothing_is_stored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProcess::start(dir.path(), &["--max-file-bytes", "20000000"]);
    let mut c = client(&node).await;

    let unci = rg1("RG1_UNCI.dcm");
    let jpeg_ls = std::fs::read(pydicom_test_files_dir().join("MR_small_jpeg_ls_lossless.dcm"))
        .expect("JPEG-LS file");
    let huge = TestDicom {
        rows: 4,
        columns: 4,
        claim_rows_columns: Some(100_000),
        ..TestDicom::default()
    }
    .to_bytes();
    let random: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let cases: Vec<(&str, Vec<u8>, Code, &str)> = vec![
        ("empty.dcm", Vec::new(), Code::InvalidArgument, "empty"),
        (
            "random.dcm",
            random,
            Code::InvalidArgument,
            "not a DICOM, JPEG or PNG",
        ),
        (
            "truncated.dcm",
            unci[..unci.len() / 2].to_vec(),
            Code::InvalidArgument,
            "",
        ),
        (
            "huge.dcm",
            huge,
            Code::ResourceExhausted,
            "100000x100000 exceed the limit of 8192x8192",
        ),
        (
            "jpegls.dcm",
            jpeg_ls,
            Code::Unimplemented,
            "unsupported transfer syntax 1.2.840.10008.1.2.4.80 (JPEG-LS Lossless Image Compression)",
        ),
        (
            "oversized.dcm",
            vec![0u8; 20_000_001],
            Code::ResourceExhausted,
            "exceeds the limit of 20000000 bytes",
        ),
    ];
    for (name, bytes, code, needle) in cases {
        let err = extract(&mut c, &bytes, name, false).await.expect_err(name);
        println!("{name}: {:?} {}", err.code(), err.message());
        assert_eq!(err.code(), code, "{name}: {}", err.message());
        assert!(
            err.message().contains(needle),
            "{name}: {:?} lacks {needle:?}",
            err.message()
        );
        assert!(!err.message().is_empty());
        assert!(
            err.metadata().get("x-cxrfed-error").is_some(),
            "{name}: machine-readable kind"
        );
        // The node stays up and stores nothing.
        assert_eq!(
            status(&mut c).await.record_count,
            0,
            "{name} stored something"
        );
    }

    // Without a size hint the limit is enforced while the chunks arrive.
    let mut messages = upload(&vec![0u8; 20_000_001], "no-hint.dcm", false);
    messages[0].header.as_mut().expect("header").size_hint = 0;
    let err = c
        .extract(tokio_stream::iter(messages))
        .await
        .expect_err("over the limit");
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    assert_eq!(status(&mut c).await.record_count, 0);

    // A stream without a header is an invalid request.
    let err = c
        .extract(tokio_stream::iter(vec![pb::ExtractRequest {
            header: None,
            chunk: vec![1, 2, 3].into(),
        }]))
        .await
        .expect_err("no header");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("header"));

    // A PNG named .dcm is recognised by its content, not its name.
    let mut png = Vec::new();
    image::GrayImage::from_fn(64, 48, |x, y| image::Luma([((x * 3 + y) % 256) as u8]))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .expect("png");
    let record = extract(&mut c, &png, "renamed.dcm", false)
        .await
        .expect("PNG accepted")
        .record
        .expect("record");
    let source = record.source.expect("source");
    assert_eq!(source.format(), pb::ImageFormat::Png);
    assert_eq!((source.rows, source.columns), (48, 64));
    assert!(
        record.processing_notes.iter().any(|n| n.contains(".dcm")),
        "{:?}",
        record.processing_notes
    );
    assert_eq!(status(&mut c).await.record_count, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_image_twice_yields_one_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProcess::start(dir.path(), &[]);
    let mut c = client(&node).await;
    let bytes = TestDicom::default().to_bytes();
    let first = extract(&mut c, &bytes, "a.dcm", false)
        .await
        .expect("first");
    assert!(first.created);
    // Same pixels with another header (a different patient ID and date) are the same image.
    let rewritten = TestDicom {
        patient_id: "SOMEONE-ELSE".into(),
        study_date: "20210101",
        ..TestDicom::default()
    };
    let second = extract(&mut c, &rewritten.to_bytes(), "b.dcm", false)
        .await
        .expect("second");
    assert!(!second.created);
    let (r1, r2) = (
        first.record.expect("record"),
        second.record.expect("record"),
    );
    assert_eq!(r1.record_id, r2.record_id);
    assert_eq!(status(&mut c).await.record_count, 1);
    let forced = extract(&mut c, &bytes, "a.dcm", true)
        .await
        .expect("forced");
    assert!(forced.created);
    assert_ne!(forced.record.expect("record").record_id, r1.record_id);
    assert_eq!(
        status(&mut c).await.record_count,
        1,
        "force replaces, never duplicates"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn records_survive_restart_and_a_sigkill_mid_burst_leaves_only_complete_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = NodeProcess::start(dir.path(), &[]);
    let mut c = client(&node).await;
    let first = extract(
        &mut c,
        &TestDicom {
            seed: 100,
            ..TestDicom::default()
        }
        .to_bytes(),
        "x.dcm",
        false,
    )
    .await
    .expect("extract");
    let out = cxrfed(&["node", "stop", "--data-dir", node.data_dir_str()]);
    assert!(out.status.success());
    node.wait_exit(Duration::from_secs(30)).expect("stopped");

    let mut node = NodeProcess::start(dir.path(), &[]);
    let mut c = client(&node).await;
    let listed = list_all(&mut c, pb::ListRecordsRequest::default()).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].record_id, first.record.expect("record").record_id);

    // A burst of concurrent extractions, killed with SIGKILL once some have been acknowledged.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for seed in 0..48u64 {
        let url = node.url();
        let credentials = node.pki.credentials(&node.admin);
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            let bytes = TestDicom {
                seed: 1000 + seed,
                rows: 768,
                columns: 768,
                ..TestDicom::default()
            }
            .to_bytes();
            let Ok(channel) = cxrfed_auth::client::connect(&url, Some(&credentials)).await else {
                return;
            };
            let mut c = NodeServiceClient::new(channel);
            if let Ok(response) = extract(&mut c, &bytes, "burst.dcm", false).await {
                let _ = tx.send(response.record.expect("record").record_id);
            }
        }));
    }
    drop(tx);
    let mut acknowledged = Vec::new();
    while acknowledged.len() < 6 {
        acknowledged.push(
            rx.recv()
                .await
                .expect("some extractions succeed before the kill"),
        );
    }
    node.kill();
    for task in tasks {
        let _ = task.await;
    }
    while let Ok(id) = rx.try_recv() {
        acknowledged.push(id);
    }
    assert!(
        acknowledged.len() < 48,
        "the kill should interrupt the burst"
    );

    // The store opens cleanly; every acknowledged record is there and complete.
    let node = NodeProcess::start(dir.path(), &[]);
    let mut c = client(&node).await;
    let listed = list_all(&mut c, pb::ListRecordsRequest::default()).await;
    for id in &acknowledged {
        let record = c
            .get_record(pb::GetRecordRequest {
                record_id: id.clone(),
            })
            .await
            .expect("acknowledged record survives SIGKILL")
            .into_inner();
        assert_eq!(record.image_sha256.len(), 64);
        assert!(
            record.source.is_some() && record.patient.is_some() && record.acquisition.is_some()
        );
    }
    assert!(
        listed.len() > acknowledged.len(),
        "the first record and the burst's acknowledged ones"
    );
    for record in &listed {
        cxrfed_schema_check(record);
    }
    assert_eq!(status(&mut c).await.record_count as usize, listed.len());
    // And it keeps working.
    extract(
        &mut c,
        &TestDicom {
            seed: 5000,
            ..TestDicom::default()
        }
        .to_bytes(),
        "after.dcm",
        false,
    )
    .await
    .expect("extract after recovery");
}

/// A listed record is complete: every part present and valid for the domain type.
fn cxrfed_schema_check(record: &pb::Record) {
    assert!(
        !record.record_id.is_empty() && record.image_sha256.len() == 64,
        "{record:?}"
    );
    assert_eq!(record.schema_version, "1");
    let source = record.source.as_ref().expect("source");
    assert!(source.rows > 0 && source.columns > 0);
    assert!(record.created_at.is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn list_records_pages_filters_and_validates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProcess::start(dir.path(), &[]);
    let mut c = client(&node).await;
    let images = [
        ("PA", "20200115"),
        ("AP", "20200220"),
        ("PA", "20200310"),
        ("LL", "20200405"),
        ("AP", "20210101"),
    ];
    for (i, (view, date)) in images.iter().enumerate() {
        let dicom = TestDicom {
            seed: 10 + i as u64,
            view,
            study_date: date,
            ..TestDicom::default()
        };
        extract(&mut c, &dicom.to_bytes(), "f.dcm", false)
            .await
            .expect("extract");
    }
    // Pagination: 2 + 2 + 1, in creation order.
    let mut stream = c
        .list_records(pb::ListRecordsRequest {
            page_size: 2,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    let mut page = Vec::new();
    let mut token = String::new();
    while let Some(item) = stream.message().await.expect("item") {
        match item.item.expect("item") {
            pb::list_records_response::Item::Record(r) => page.push(r),
            pb::list_records_response::Item::PageEnd(end) => {
                assert_eq!(end.returned, 2);
                token = end.next_page_token;
            }
        }
    }
    assert_eq!(page.len(), 2);
    assert!(!token.is_empty());
    let all = list_all(
        &mut c,
        pb::ListRecordsRequest {
            page_size: 2,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(all.len(), 5);
    assert!(
        all.windows(2).all(|w| w[0].record_id < w[1].record_id),
        "creation order"
    );

    let ap = list_all(
        &mut c,
        pb::ListRecordsRequest {
            view: pb::View::Ap as i32,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(ap.len(), 2);
    let q1 = list_all(
        &mut c,
        pb::ListRecordsRequest {
            month_from: "2020-02".into(),
            month_to: "2020-04".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(q1.len(), 3);
    let dx = list_all(
        &mut c,
        pb::ListRecordsRequest {
            modality: "dx".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(dx.len(), 5);

    let err = c
        .list_records(pb::ListRecordsRequest {
            month_from: "2020/02".into(),
            ..Default::default()
        })
        .await
        .expect_err("bad month");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("YYYY-MM"));
    let err = c
        .list_records(pb::ListRecordsRequest {
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await
        .expect_err("bad token");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c
        .list_records(pb::ListRecordsRequest {
            page_size: 5000,
            ..Default::default()
        })
        .await
        .expect_err("page too large");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c
        .get_record(pb::GetRecordRequest {
            record_id: "nope".into(),
        })
        .await
        .expect_err("bad id");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c
        .get_record(pb::GetRecordRequest {
            record_id: "01a1fb00-0000-7000-8000-000000000000".into(),
        })
        .await
        .expect_err("unknown id");
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread")]
async fn reflection_health_and_request_ids() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProcess::start(dir.path(), &[]);
    let channel = node.channel().await;
    let mut reflection = ServerReflectionClient::new(channel.clone());
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection")
        .into_inner();
    let response = responses
        .message()
        .await
        .expect("message")
        .expect("a response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "cxrfed.v1.NodeService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }

    let mut health = HealthClient::new(channel);
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "cxrfed.v1.NodeService".into(),
        })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(
        serving.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );

    let mut c = client(&node).await;
    let mut request = tonic::Request::new(pb::StatusRequest {});
    request
        .metadata_mut()
        .insert("x-request-id", "e2e-req-42".parse().expect("ascii"));
    let response = c.status(request).await.expect("status");
    assert_eq!(
        response
            .metadata()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("e2e-req-42")
    );
    let response = c.status(pb::StatusRequest {}).await.expect("status");
    assert!(
        response.metadata().get("x-request-id").is_some(),
        "a generated id is returned"
    );
    // The one log line per request carries the id (written by a background thread: poll).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let line = loop {
        let log = std::fs::read_to_string(dir.path().join("logs/node.log")).unwrap_or_default();
        if let Some(line) = log.lines().find(|l| l.contains("e2e-req-42")) {
            break line.to_string();
        }
        assert!(std::time::Instant::now() < deadline, "request not logged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let json: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
    assert!(json["timestamp"].is_string() && json["level"].is_string());
    assert_eq!(json["span"]["method"], "Status");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_busy_port_is_named_with_the_fix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProcess::start(dir.path(), &[]);
    let other = tempfile::tempdir().expect("tempdir");
    let listen = format!("127.0.0.1:{}", node.port);
    let out = cxrfed(&[
        "node",
        "serve",
        "--data-dir",
        other.path().to_str().expect("path"),
        "--listen",
        &listen,
        "--insecure-dev",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("port {}", node.port)) && err.contains("already in use"),
        "{err}"
    );
    assert!(err.contains("--listen"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_an_in_flight_extraction_then_exits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = NodeProcess::start(dir.path(), &[]);
    let mut c = client(&node).await;
    let bytes = TestDicom {
        seed: 77,
        rows: 512,
        columns: 512,
        ..TestDicom::default()
    }
    .to_bytes();
    let mut messages = upload(&bytes, "drain.dcm", false).into_iter();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(messages.next().expect("first chunk"))
        .await
        .expect("send");
    let mut uploader = c.clone();
    let call = tokio::spawn(async move {
        uploader
            .extract(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map(tonic::Response::into_inner)
    });
    // Wait until the node is processing the upload.
    for _ in 0..200 {
        if status(&mut c).await.in_flight >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(status(&mut c).await.in_flight, 1, "the upload is in flight");
    let pid = nix::unistd::Pid::from_raw(node.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        node.child.try_wait().expect("wait").is_none(),
        "still draining"
    );
    for message in messages {
        tx.send(message).await.expect("send rest");
    }
    drop(tx);
    let response = call
        .await
        .expect("task")
        .expect("the in-flight extraction completes");
    assert!(response.created);
    let exit = node
        .wait_exit(Duration::from_secs(30))
        .expect("exits after draining");
    assert!(exit.success(), "{exit}");

    let node = NodeProcess::start(dir.path(), &[]);
    let mut c = client(&node).await;
    let id = response.record.expect("record").record_id;
    c.get_record(pb::GetRecordRequest { record_id: id })
        .await
        .expect("drained record was stored");
}

/// Phantoms written by `cxrfed phantom`, extracted through the CLI: every record carries the
/// bundled model's findings, the node's image hash equals the labels file's, and no identifier
/// written into the headers comes back.
#[tokio::test(flavor = "multi_thread")]
async fn phantoms_extract_to_full_records_matching_their_labels() {
    let dir = tempfile::tempdir().expect("tempdir");
    let phantoms = dir.path().join("phantoms");
    write_phantoms(&phantoms, 8, 77, 512);
    let labels: serde_json::Value =
        serde_json::from_slice(&std::fs::read(phantoms.join("labels.json")).expect("labels"))
            .expect("json");
    let rows = labels["images"].as_array().expect("rows");
    assert_eq!(rows.len(), 8);

    // The CLI evaluates the bundled model on them (JSON: one entry per head with metrics).
    let out = cxrfed(&[
        "model",
        "eval",
        "--data",
        phantoms.to_str().expect("path"),
        "--format",
        "json",
        "--device",
        "cpu",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metrics: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metrics JSON");
    assert_eq!(metrics["n"], 8);
    assert_eq!(metrics["heads"].as_array().expect("heads").len(), 16);
    let out = cxrfed(&["model", "info"]);
    let card = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && card.contains("synthetic phantoms only"),
        "{card}"
    );

    let node = NodeProcess::start(&dir.path().join("node"), &[]);
    let mut args = vec![
        "extract".to_string(),
        "--node".into(),
        node.url(),
        "--profile".into(),
        node.profile(),
    ];
    args.extend(rows.iter().map(|r| {
        phantoms
            .join(r["file"].as_str().expect("file"))
            .display()
            .to_string()
    }));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = cxrfed(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    let records: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("record"))
        .collect();
    assert_eq!(records.len(), 8);
    for record in &records {
        assert_eq!(record["model_id"], "cxrfed-tiny-phantom-v1");
        let row = rows
            .iter()
            .find(|r| r["image_sha256"] == record["image_sha256"])
            .expect("the node's pixel hash matches the labels file");
        let ratio = record["findings"]["mediastinum"]["cardiothoracic_ratio"]["value"]
            .as_f64()
            .expect("ratio");
        assert!((0.3..=0.8).contains(&ratio), "{ratio}");
        assert_eq!(record["acquisition"]["view"], row["view"]);
        assert!(
            record["patient"]["pseudonym"]
                .as_str()
                .expect("pseudonym")
                .len()
                == 64
        );
        let text = record.to_string();
        for needle in [
            "PHANTOM^",
            "PHUNIVERSITY",
            "PHCOMMUNITY",
            "PHICU",
            "PHSCREENING",
            "ACC0",
        ] {
            assert!(!text.contains(needle), "{needle} leaked: {text}");
        }
    }
}

/// Concurrent extractions are batched by the inference worker (visible in Status), and a
/// flood beyond the inference queue gets RESOURCE_EXHAUSTED with a retry hint; the node
/// recovers afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_extractions_are_batched_and_a_flood_is_refused_then_recovered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProcess::start(
        dir.path(),
        &[
            "--max-batch",
            "8",
            "--max-wait-ms",
            "200",
            "--inference-queue",
            "64",
            "--decode-workers",
            "4",
        ],
    );
    let c = client(&node).await;
    let images: Vec<Vec<u8>> = (0..16)
        .map(|seed| {
            TestDicom {
                rows: 128,
                columns: 128,
                seed: 100 + seed,
                ..TestDicom::default()
            }
            .to_bytes()
        })
        .collect();
    let tasks: Vec<_> = images
        .iter()
        .cloned()
        .map(|bytes| {
            let mut c = c.clone();
            tokio::spawn(async move { extract(&mut c, &bytes, "x.dcm", false).await })
        })
        .collect();
    for t in tasks {
        t.await.expect("join").expect("extract");
    }
    let model = status(&mut c.clone()).await.model.expect("model status");
    assert_eq!(model.images, 16);
    assert!(model.max_batch_seen > 1 && model.batches < 16, "{model:?}");
    drop(node);

    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProcess::start(
        dir.path(),
        &[
            "--max-batch",
            "1",
            "--max-wait-ms",
            "0",
            "--inference-queue",
            "1",
            "--decode-workers",
            "8",
        ],
    );
    let c = client(&node).await;
    let tasks: Vec<_> = (0..48)
        .map(|seed| {
            let bytes = TestDicom {
                rows: 64,
                columns: 64,
                seed: 1000 + seed,
                ..TestDicom::default()
            }
            .to_bytes();
            let mut c = c.clone();
            tokio::spawn(async move { extract(&mut c, &bytes, "x.dcm", false).await })
        })
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        match tokio::time::timeout(Duration::from_secs(120), t)
            .await
            .expect("no hang")
            .expect("join")
        {
            Ok(_) => ok += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert_eq!(
                    status.metadata().get("x-cxrfed-error").expect("kind"),
                    "queue_full"
                );
                let hint: u64 = status
                    .metadata()
                    .get("retry-after-ms")
                    .expect("retry hint")
                    .to_str()
                    .expect("ascii")
                    .parse()
                    .expect("number");
                assert!(hint >= 50);
                refused += 1;
            }
        }
    }
    assert!(ok >= 1 && refused >= 1, "ok {ok} refused {refused}");
    let mut c2 = c.clone();
    let st = status(&mut c2).await;
    assert_eq!(st.record_count, ok as u64, "refused requests store nothing");
    assert_eq!(st.model.expect("model").rejected, refused as u64);
    // Recovered.
    let bytes = TestDicom {
        seed: 5000,
        ..TestDicom::default()
    }
    .to_bytes();
    extract(&mut c2, &bytes, "after.dcm", false)
        .await
        .expect("recovered");
}

/// Without a model records carry no findings; `force` re-extracts with the current model.
#[tokio::test(flavor = "multi_thread")]
async fn force_re_extracts_with_the_current_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bytes = TestDicom::default().to_bytes();
    let mut node = NodeProcess::start(dir.path(), &["--model", "none"]);
    let mut c = client(&node).await;
    let first = extract(&mut c, &bytes, "a.dcm", false)
        .await
        .expect("extract")
        .record
        .expect("record");
    assert_eq!(first.model_id, "none");
    assert!(first.findings.is_none() && first.model_sha256.is_empty());
    assert!(status(&mut c).await.model.is_none());
    let out = cxrfed(&["node", "stop", "--data-dir", node.data_dir_str()]);
    assert!(out.status.success());
    node.wait_exit(Duration::from_secs(30)).expect("stopped");

    let node = NodeProcess::start(dir.path(), &[]);
    let mut c = client(&node).await;
    let again = extract(&mut c, &bytes, "a.dcm", false)
        .await
        .expect("extract");
    assert!(!again.created);
    assert_eq!(
        again.record.expect("record").model_id,
        "none",
        "without force the stored record is kept"
    );
    let forced = extract(&mut c, &bytes, "a.dcm", true).await.expect("force");
    let record = forced.record.expect("record");
    assert_eq!(record.model_id, "cxrfed-tiny-phantom-v1");
    assert!(record.findings.is_some());
    assert_eq!(status(&mut c).await.record_count, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reduced_jpeg2000_decode_is_noted_and_re_ingest_stays_idempotent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("refused");
    let err = NodeProcess::start_failure(&[
        "node",
        "serve",
        "--data-dir",
        data.to_str().expect("path"),
        "--insecure-dev",
        "--j2k-reduced-decode",
        "sometimes",
    ]);
    assert!(err.contains("j2k_reduced_decode"), "{err}");

    let node = NodeProcess::start(dir.path(), &["--j2k-reduced-decode", "all"]);
    let mut c = client(&node).await;
    let j2k = rg1("RG1_J2KR.dcm");
    let first = extract(&mut c, &j2k, "rg1.dcm", false)
        .await
        .expect("extract");
    assert!(first.created);
    let record = first.record.expect("record");
    assert!(
        record
            .processing_notes
            .iter()
            .any(|n| n.contains("JPEG 2000 decoded at 1/8 resolution")),
        "{:?}",
        record.processing_notes
    );
    assert!(record.findings.is_some(), "the model still ran");
    // The same file again: the same codestream identity, nothing stored twice.
    let again = extract(&mut c, &j2k, "rg1-again.dcm", false)
        .await
        .expect("again");
    assert!(!again.created);
    assert_eq!(again.record.expect("record").record_id, record.record_id);
    // The documented trade-off of `all`: the uncompressed copy is a record of its own.
    let uncompressed = extract(&mut c, &rg1("RG1_UNCR.dcm"), "rg1-unc.dcm", false)
        .await
        .expect("uncompressed");
    assert!(uncompressed.created);
    assert_ne!(
        uncompressed.record.expect("record").image_sha256,
        record.image_sha256
    );
}

/// A radiograph of something other than the chest (RG3: a tibia, BodyPartExamined EXTREMITY)
/// gets a record without chest findings that says why; the model is not run on it, and no
/// model input is kept for a later back-fill to read.
#[test]
fn a_non_chest_radiograph_gets_no_chest_findings_and_says_why() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProcess::start(dir.path(), &[]);
    let out = node.cli(&[
        "extract",
        pydicom_data_dir()
            .join("RG3_UNCI.dcm")
            .to_str()
            .expect("path"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let record: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).expect("record");
    assert_eq!(record["source"]["body_part"], "EXTREMITY");
    assert!(record["findings"].is_null(), "{}", record["findings"]);
    assert_eq!(record["model_id"], "none");
    let notes = record["processing_notes"].to_string();
    assert!(
        notes.contains("not a chest radiograph (body part EXTREMITY)"),
        "{notes}"
    );
    // The chest next to it is read as before.
    let out = node.cli(&[
        "extract",
        pydicom_data_dir()
            .join("RG1_UNCI.dcm")
            .to_str()
            .expect("path"),
    ]);
    let chest: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).expect("record");
    assert!(!chest["findings"].is_null());
}

/// Per-site calibration on phantoms of two sites with different prevalences (ICU sicker than
/// a community hospital): the bundled model's rib-fracture head called at 0.5 predicts almost
/// no positives anywhere; an operating point fitted on each site's own labelled images (target:
/// the site's prevalence) brings the predicted positive rate on that site's *held-out* images
/// to within a few points of the true one.
#[test]
fn per_site_operating_points_bring_the_predicted_rate_to_each_sites_prevalence() {
    let dir = tempfile::tempdir().expect("tempdir");
    let phantoms = |name: &str, site: &str, seed: u32| {
        let path = dir.path().join(name);
        let out = cxrfed_e2e::cxrfed(&[
            "phantom",
            "--out",
            path.to_str().expect("path"),
            "--count",
            "250",
            "--seed",
            &seed.to_string(),
            "--site",
            site,
            "--max-size",
            "256",
        ]);
        assert!(
            out.status.success(),
            "phantom: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        path
    };
    let report = |model: Option<&std::path::Path>, data: &std::path::Path| -> serde_json::Value {
        let mut args = vec!["model", "calibrate", "--data", data.to_str().expect("path")];
        args.extend([
            "--fields",
            "rib_fracture",
            "--target",
            "prevalence",
            "--format",
            "json",
        ]);
        if let Some(m) = model {
            args.extend(["--model", m.to_str().expect("path")]);
        }
        let out = cxrfed_e2e::cxrfed(&args);
        assert!(
            out.status.success(),
            "calibrate: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let fields: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        fields[0].clone()
    };
    let mut prevalences = Vec::new();
    for (site, seeds) in [("community", (301, 302)), ("icu", (303, 304))] {
        let fit_on = phantoms(&format!("{site}-labelled"), site, seeds.0);
        let held_out = phantoms(&format!("{site}-held-out"), site, seeds.1);
        let model = dir.path().join(format!("model-{site}"));
        let out = cxrfed_e2e::cxrfed(&[
            "model",
            "calibrate",
            "--data",
            fit_on.to_str().expect("path"),
            "--fields",
            "rib_fracture",
            "--target",
            "prevalence",
            "--site",
            site,
            "--out",
            model.to_str().expect("path"),
        ]);
        assert!(
            out.status.success(),
            "calibrate: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let card: serde_json::Value =
            serde_json::from_slice(&std::fs::read(model.join("card.json")).expect("card"))
                .expect("json");
        assert_eq!(card["training"]["calibration"]["site"], site);
        let before = report(None, &held_out);
        let after = report(Some(&model), &held_out);
        let prevalence = after["prevalence"].as_f64().expect("prevalence");
        let rate = |r: &serde_json::Value| {
            r["current"]["predicted_positive_rate"]
                .as_f64()
                .expect("rate")
        };
        eprintln!(
            "{site}: prevalence {prevalence:.3}, predicted positive rate {:.3} at 0.5, {:.3} calibrated (threshold {})",
            rate(&before),
            rate(&after),
            after["current"]["threshold"]
        );
        assert!((rate(&after) - prevalence).abs() <= 0.06, "{site}: {after}");
        assert!((rate(&after) - prevalence).abs() < (rate(&before) - prevalence).abs());
        prevalences.push(prevalence);
    }
    assert!(
        prevalences[1] > prevalences[0] + 0.03,
        "the sites differ: {prevalences:?}"
    );
    // A head that is not binary cannot be calibrated.
    let out = cxrfed_e2e::cxrfed(&[
        "model",
        "calibrate",
        "--data",
        dir.path().join("icu-held-out").to_str().expect("path"),
        "--fields",
        "image_quality",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a trained binary head"));
}
