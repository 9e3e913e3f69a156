//! Hostile input and hostile peers against the real node binary on loopback: decompression
//! bombs, query cost, connection floods, burned-in annotation and very old ages.

use std::time::Duration;

use cxrfed_auth::Role;
use cxrfed_e2e::{NodeProcess, cxrfed, text, write_phantoms};
use cxrfed_phantom::{Encoding, Generator};
use cxrfed_proto::v1 as pb;
use cxrfed_proto::v1::node_service_client::NodeServiceClient;
use tokio::io::AsyncReadExt;
use tonic::Code;
use tonic::transport::Channel;

fn upload(bytes: &[u8], filename: &str) -> Vec<pb::ExtractRequest> {
    cxrfed_proto::upload(bytes.to_vec().into(), filename, false, 256 * 1024)
}

async fn extract(
    client: &mut NodeServiceClient<Channel>,
    bytes: &[u8],
) -> Result<pb::Record, tonic::Status> {
    client
        .extract(tokio_stream::iter(upload(bytes, "upload.dcm")))
        .await
        .map(|r| r.into_inner().record.expect("record"))
}

fn phantom(encoding: Encoding, index: u64) -> Vec<u8> {
    Generator::new(11, None)
        .expect("generator")
        .with_encoding(Some(encoding))
        .with_max_columns(Some(512))
        .generate(index)
        .to_dicom()
        .expect("phantom")
}

fn find(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("marker present")
}

/// Header as generated, JPEG SOF3 claiming 65535×65535.
fn jpeg_bomb() -> Vec<u8> {
    let mut bytes = phantom(Encoding::JpegLossless, 0);
    let soi = find(&bytes, &[0xFF, 0xD8, 0xFF]);
    let sof = soi + find(&bytes[soi..], &[0xFF, 0xC3]);
    bytes[sof + 5..sof + 9].copy_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF]);
    bytes
}

/// A J2K codestream whose SIZ claims 60000×60000.
fn j2k_lying_siz() -> Vec<u8> {
    let mut bytes = phantom(Encoding::Jpeg2000Lossless, 1);
    let siz = find(&bytes, &[0xFF, 0x4F, 0xFF, 0x51]) + 2;
    bytes[siz + 6..siz + 10].copy_from_slice(&60000u32.to_be_bytes());
    bytes[siz + 10..siz + 14].copy_from_slice(&60000u32.to_be_bytes());
    bytes
}

/// An RLE frame whose first segment is PackBits runs that expand 64-fold.
fn rle_oversized_segments() -> Vec<u8> {
    let mut bytes = phantom(Encoding::RleLossless, 2);
    // Pixel Data, then the (empty or not) offset table item, then the fragment item.
    let pixel = find(&bytes, &[0xE0, 0x7F, 0x10, 0x00]);
    let bot = pixel + find(&bytes[pixel..], &[0xFE, 0xFF, 0x00, 0xE0]);
    let bot_len = u32::from_le_bytes(bytes[bot + 4..bot + 8].try_into().expect("4")) as usize;
    let item = bot + 8 + bot_len;
    assert_eq!(&bytes[item..item + 4], &[0xFE, 0xFF, 0x00, 0xE0]);
    let fragment = item + 8;
    let offset = |k: usize| {
        u32::from_le_bytes(
            bytes[fragment + 4 + 4 * k..fragment + 8 + 4 * k]
                .try_into()
                .expect("4"),
        ) as usize
    };
    let (start, end) = (fragment + offset(0), fragment + offset(1));
    for pair in bytes[start..end].chunks_exact_mut(2) {
        pair.copy_from_slice(&[0x81, 0x00]);
    }
    bytes
}

/// A private element declaring 4 GiB in a file of a few kilobytes.
fn declared_length_bomb() -> Vec<u8> {
    use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
    let mut obj = dicom_object::OpenFileOptions::new()
        .read_preamble(dicom_object::file::ReadPreamble::Always)
        .from_reader(std::io::Cursor::new(phantom(Encoding::ExplicitLittle, 3)))
        .expect("phantom parses");
    obj.put(DataElement::new(
        Tag(0x0029, 0x1010),
        VR::OB,
        PrimitiveValue::from(b"ABCD".to_vec()),
    ));
    let mut bytes = Vec::new();
    obj.write_all(&mut bytes).expect("write");
    let at = find(&bytes, b"OB\0\0\x04\0\0\0ABCD");
    bytes[at + 4..at + 8].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    bytes
}

/// Deflated Explicit VR Little Endian whose data set inflates to 100 MiB of zeros.
fn deflate_bomb() -> Vec<u8> {
    use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
    let parsed = dicom_object::OpenFileOptions::new()
        .read_preamble(dicom_object::file::ReadPreamble::Always)
        .from_reader(std::io::Cursor::new(phantom(Encoding::ExplicitLittle, 4)))
        .expect("phantom parses");
    let mut obj = parsed.into_inner();
    obj.put(DataElement::new(
        Tag(0x0029, 0x1010),
        VR::OB,
        PrimitiveValue::from(vec![0u8; 100 << 20]),
    ));
    let file = obj
        .with_meta(
            dicom_object::FileMetaTableBuilder::new()
                .transfer_syntax("1.2.840.10008.1.2.1.99")
                .media_storage_sop_class_uid("1.2.840.10008.5.1.4.1.1.1")
                .media_storage_sop_instance_uid("2.25.4242"),
        )
        .expect("meta");
    let mut bytes = Vec::new();
    file.write_all(&mut bytes).expect("write");
    bytes
}

fn peak_rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM")
        * 1024
}

#[tokio::test(flavor = "multi_thread")]
async fn decompression_bombs_are_refused_before_decoding_and_memory_stays_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProcess::start(dir.path(), &["--max-file-bytes", "20000000"]);
    let mut c = NodeServiceClient::new(node.channel().await);

    let deflated = deflate_bomb();
    assert!(deflated.len() < 2 << 20, "{} bytes", deflated.len());
    let cases: Vec<(&str, Vec<u8>, Code, &str)> = vec![
        (
            "jpeg-sof",
            jpeg_bomb(),
            Code::ResourceExhausted,
            "65535x65535",
        ),
        (
            "j2k-siz",
            j2k_lying_siz(),
            Code::ResourceExhausted,
            "60000x60000",
        ),
        (
            "rle",
            rle_oversized_segments(),
            Code::ResourceExhausted,
            "expands beyond",
        ),
        (
            "length",
            declared_length_bomb(),
            Code::InvalidArgument,
            "declares 4294967280 bytes",
        ),
        ("deflate", deflated, Code::ResourceExhausted, "inflat"),
    ];
    for (name, bytes, code, needle) in &cases {
        let err = extract(&mut c, bytes).await.expect_err(name);
        println!("{name}: {:?} {}", err.code(), err.message());
        assert_eq!(err.code(), *code, "{name}: {}", err.message());
        assert!(err.message().contains(needle), "{name}: {}", err.message());
    }

    // Eight at once, twice over: every one refused, the node's peak memory stays bounded.
    let mut tasks = Vec::new();
    for i in 0..16 {
        let bytes = cases[i % 3].1.clone();
        let channel = node.channel().await;
        tasks.push(tokio::spawn(async move {
            let mut client = NodeServiceClient::new(channel);
            extract(&mut client, &bytes).await.map(|_| ())
        }));
    }
    for task in tasks {
        let err = task.await.expect("task").expect_err("bomb refused");
        assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    }
    let peak = peak_rss_bytes(node.child.id());
    println!("node peak RSS {} MiB", peak >> 20);
    assert!(peak < 1 << 30, "peak RSS {} MiB", peak >> 20);

    // The node keeps serving and stored nothing of the bombs.
    let status = c
        .status(pb::StatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.record_count, 0);
    let record = extract(&mut c, &phantom(Encoding::JpegLossless, 5))
        .await
        .expect("a valid image after the bombs");
    assert!(record.source.expect("source").columns <= 512);
}

fn in_list(n: usize) -> String {
    let values: Vec<String> = (0..n).map(|i| (i % 5000).to_string()).collect();
    format!("count where rows in ({})", values.join(","))
}

#[tokio::test(flavor = "multi_thread")]
async fn query_cost_is_capped_and_a_release_never_stalls_extraction() {
    let dir = tempfile::tempdir().expect("tempdir");
    let phantoms = dir.path().join("phantoms");
    write_phantoms(&phantoms, 12, 5, 128);
    let node = NodeProcess::start(&dir.path().join("node"), &["--model", "none"]);
    let out = node.cli(&["ingest", phantoms.to_str().expect("path")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let researcher = node.pki.identity(Role::Researcher, "quinn", None);
    node.set_budget("quinn", "10");
    let mut client = NodeServiceClient::new(node.channel_as(&researcher).await);
    let request = |query: String| pb::DpStatsRequest {
        query,
        structured: None,
        epsilon: 0.5,
        delta: 0.0,
        mechanism: pb::Mechanism::Unspecified.into(),
    };

    let err = client
        .dp_stats(request(in_list(200_000)))
        .await
        .expect_err("over the cap");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(err.message().contains("cap"), "{}", err.message());
    let err = client
        .dp_stats(request(in_list(cxrfed_stats::query::MAX_IN_LIST + 1)))
        .await
        .expect_err("one over the list cap");
    assert!(err.message().contains("MAX_IN_LIST"), "{}", err.message());
    let account = client
        .budget(pb::BudgetRequest {})
        .await
        .expect("budget")
        .into_inner();
    assert_eq!(account.releases, 0, "nothing charged: {account:?}");

    // At the cap, with an extraction running meanwhile: both complete.
    let mut admin = NodeServiceClient::new(node.channel().await);
    let image = phantom(Encoding::ExplicitLittle, 7);
    let at_cap = in_list(cxrfed_stats::query::MAX_IN_LIST);
    let (released, extracted) = tokio::join!(
        client.dp_stats(request(at_cap)),
        extract(&mut admin, &image)
    );
    let released = released.expect("at the cap").into_inner();
    assert!(released.epsilon > 0.0, "{released:?}");
    extracted.expect("extraction alongside the release");
    let account = client
        .budget(pb::BudgetRequest {})
        .await
        .expect("budget")
        .into_inner();
    assert_eq!(account.releases, 1, "{account:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_cannot_lock_out_an_authenticated_client_and_are_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProcess::start(dir.path(), &["--model", "none"]);
    let address = format!("127.0.0.1:{}", node.port);
    let mut idle = Vec::new();
    for _ in 0..2000 {
        idle.push(
            tokio::net::TcpStream::connect(&address)
                .await
                .expect("connect"),
        );
    }
    // While they sit there, a real client handshakes and extracts.
    let mut client = NodeServiceClient::new(node.channel().await);
    extract(&mut client, &phantom(Encoding::ExplicitLittle, 8))
        .await
        .expect("an authenticated Extract succeeds");
    // Every idle connection is closed by the node (evicted, or at its handshake deadline).
    for mut stream in idle {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(60), stream.read(&mut buf))
            .await
            .expect("the node closes an idle unauthenticated connection");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
    // A client without a certificate gets UNAUTHENTICATED (and its connection is closed
    // REJECTED_LINGER later).
    let anonymous = cxrfed_auth::ClientCredentials {
        ca: node.pki.ca_pem(),
        cert: None,
        key: None,
    };
    let channel = cxrfed_auth::client::connect(&node.url(), Some(&anonymous))
        .await
        .expect("connect without a certificate");
    let mut anonymous_client = NodeServiceClient::new(channel);
    let err = anonymous_client
        .status(pb::StatusRequest {})
        .await
        .expect_err("foreign certificate");
    assert!(
        matches!(err.code(), Code::Unauthenticated | Code::Unavailable),
        "{err:?}"
    );
    extract(&mut client, &phantom(Encoding::ExplicitLittle, 9))
        .await
        .expect("the node still serves");
}

fn with_header(
    bytes: Vec<u8>,
    change: impl FnOnce(&mut dicom_object::DefaultDicomObject),
) -> Vec<u8> {
    let mut obj = dicom_object::OpenFileOptions::new()
        .read_preamble(dicom_object::file::ReadPreamble::Always)
        .from_reader(std::io::Cursor::new(bytes))
        .expect("parses");
    change(&mut obj);
    let mut out = Vec::new();
    obj.write_all(&mut out).expect("write");
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn burned_in_annotation_is_quarantined_and_old_ages_are_one_band() {
    use dicom_core::{DataElement, VR};
    use dicom_dictionary_std::tags;
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProcess::start(dir.path(), &["--model", "none"]);
    let mut c = NodeServiceClient::new(node.channel().await);

    let burned = with_header(phantom(Encoding::ExplicitLittle, 10), |obj| {
        obj.put(DataElement::new(tags::BURNED_IN_ANNOTATION, VR::CS, "YES"));
    });
    let err = extract(&mut c, &burned).await.expect_err("burned in");
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(
        err.message().contains("Burned In Annotation"),
        "{}",
        err.message()
    );
    let secondary = with_header(phantom(Encoding::ExplicitLittle, 11), |obj| {
        obj.remove_element(tags::BURNED_IN_ANNOTATION);
        obj.put(DataElement::new(tags::MODALITY, VR::CS, "OT"));
    });
    let err = extract(&mut c, &secondary)
        .await
        .expect_err("secondary capture");
    assert!(
        err.message().contains("secondary capture"),
        "{}",
        err.message()
    );
    let status = c
        .status(pb::StatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.record_count, 0, "nothing stored");
    let audit = c
        .audit_log(pb::AuditLogRequest::default())
        .await
        .expect("audit")
        .into_inner();
    let quarantined: Vec<_> = audit
        .entries
        .iter()
        .filter(|e| e.method == "Quarantine")
        .collect();
    assert_eq!(quarantined.len(), 2, "{:?}", audit.entries);
    assert!(quarantined[0].query.contains("Burned In Annotation"));

    let old = with_header(phantom(Encoding::ExplicitLittle, 12), |obj| {
        obj.put(DataElement::new(tags::PATIENT_AGE, VR::AS, "093Y"));
        obj.put(DataElement::new(
            tags::MANUFACTURER,
            VR::LO,
            "St. Elsewhere Radiology 3",
        ));
    });
    let record = extract(&mut c, &old).await.expect("age 93");
    assert_eq!(record.patient.expect("patient").age_group, "90+");
    assert_eq!(record.source.expect("source").manufacturer, "other");
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_refuse_a_server_whose_certificate_has_the_wrong_role() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = cxrfed_e2e::TestPki::at(&dir.path().join("pki"));
    let coordinator = cxrfed_e2e::CoordinatorProcess::start(&dir.path().join("coordinator"), &pki);
    let node = NodeProcess::start_in(
        &dir.path().join("node"),
        cxrfed_e2e::free_port(),
        pki.clone(),
        &["--model", "none"],
    );
    let profile = node.profile();
    // Positive control: the node, as a node.
    let out = cxrfed(&["records", "--node", &node.url(), "--profile", &profile]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The coordinator answering where a node is expected.
    let out = cxrfed(&[
        "records",
        "--node",
        &coordinator.url(),
        "--profile",
        &profile,
    ]);
    assert!(!out.status.success());
    let said = text(&out.stderr);
    println!("as a node: {said}");
    assert!(said.contains("not a node"), "{said}");
    // A node answering where the coordinator is expected.
    let out = cxrfed(&[
        "coordinator",
        "sites",
        "--coordinator",
        &node.url(),
        "--profile",
        &profile,
    ]);
    assert!(!out.status.success());
    let said = text(&out.stderr);
    println!("as the coordinator: {said}");
    assert!(said.contains("not a coordinator"), "{said}");
}
