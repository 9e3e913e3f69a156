//! TorchXRayVision models in a node: checkpoints made by the `torchxrayvision` package from
//! PyPI (random weights, saved as TXRV publishes its files) go through `cxrfed model import
//! --torchxrayvision`, a node serves the imported model, and every pathology probability it
//! records for a real radiograph (RG1, DICOM) and pictures of it (PNG, JPEG) is compared with
//! TXRV's own pipeline on the same file (tests/helpers/txrv_reference.py).

use std::path::{Path, PathBuf};

use cxrfed_e2e::{NodeProcess, cxrfed_bin, pydicom_data_dir, run_python, text, venv_python};
use cxrfed_fl::labelmap::txrv_field;

const HELPER: &str = "tests/helpers/txrv_reference.py";
/// The agreement the issue asks for; the node reaches about 1e-6 (see the printed figures).
const TOLERANCE: f64 = 1e-4;

fn rg1() -> PathBuf {
    pydicom_data_dir().join("RG1_UNCI.dcm")
}

fn s(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn import(checkpoint: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    std::process::Command::new(cxrfed_bin())
        .args([
            "model",
            "import",
            "--torchxrayvision",
            s(checkpoint),
            "--out",
            s(out),
        ])
        .args(extra)
        .env("CXRFED_PYTHON", venv_python())
        .output()
        .expect("run cxrfed model import")
}

type Reference = serde_json::Map<String, serde_json::Value>;

/// The node's record of `file`, and the largest difference from TXRV's probabilities.
fn compare(node: &NodeProcess, file: &Path, reference: &Reference) -> (serde_json::Value, f64) {
    let out = node.cli(&["extract", s(file)]);
    assert!(
        out.status.success(),
        "extract {}: {}",
        file.display(),
        text(&out.stderr)
    );
    let record: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).expect("record");
    let expected = reference[s(file)]
        .as_object()
        .expect("reference probabilities");
    assert_eq!(expected.len(), 18, "TXRV's 18 pathologies");
    let mut worst = 0.0f64;
    for (target, p) in expected {
        let field = txrv_field(target);
        let got: f64 = record["model_fields"][&field]
            .as_str()
            .unwrap_or_else(|| panic!("{field} missing from {}", record["model_fields"]))
            .parse()
            .expect("a probability");
        let want = p.as_f64().expect("number");
        let diff = (got - want).abs();
        assert!(
            diff <= TOLERANCE,
            "{}: {target}: node {got} vs TXRV {want}",
            file.display()
        );
        worst = worst.max(diff);
    }
    (record, worst)
}

fn probability(record: &serde_json::Value, field: &str) -> f64 {
    record["model_fields"][field]
        .as_str()
        .expect("field")
        .parse()
        .expect("number")
}

#[test]
fn an_imported_txrv_densenet_gives_txrvs_probabilities_on_a_dicom_and_a_png() {
    let dir = tempfile::tempdir().expect("tempdir");
    let png = dir.path().join("rg1.png");
    let jpeg = dir.path().join("rg1.jpg");
    let checkpoint = dir.path().join("densenet121-random.pt");
    run_python(HELPER, &["png", s(&rg1()), s(&png)]);
    run_python(HELPER, &["png", s(&rg1()), s(&jpeg)]);
    run_python(
        HELPER,
        &[
            "densenet",
            s(&checkpoint),
            "7",
            "--op-threshs",
            "--",
            s(&rg1()),
            s(&png),
        ],
    );

    // Refusals first: not a checkpoint, and a destination that exists.
    let junk = dir.path().join("junk.pt");
    std::fs::write(&junk, b"not a checkpoint").expect("write");
    let out = import(&junk, &dir.path().join("junk-model"), &[]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("not a torch checkpoint"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        !dir.path().join("junk-model").exists(),
        "no half-written model directory"
    );
    let out = import(&checkpoint, dir.path(), &[]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("exists"),
        "{}",
        text(&out.stderr)
    );

    let model = dir.path().join("model");
    let out = import(&checkpoint, &model, &["--model-id", "txrv-test"]);
    assert!(
        out.status.success(),
        "import: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let card: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model.join("card.json")).expect("card"))
            .expect("json");
    assert_eq!(card["architecture"], "txrv-densenet121");
    assert_eq!(card["input"]["pipeline"], "torchxrayvision");
    assert_eq!(card["input"]["size"], 224);
    assert_eq!(card["input"]["aspect"], "center-crop");
    let heads = card["label_map"]["heads"].as_array().expect("heads");
    assert_eq!(heads.len(), 18);
    assert_eq!(heads[0]["name"], "txrv_atelectasis");
    assert!((heads[0]["operating_point"].as_f64().expect("op") - 0.2).abs() < 1e-6);
    assert_eq!(heads[13]["name"], "txrv_hernia");
    assert_eq!(heads[13]["untrained"], true, "TXRV's NaN operating point");
    assert_eq!(card["training"]["source"], "torchxrayvision");
    let rules: Vec<&str> = card["label_map"]["findings"]
        .as_array()
        .expect("rules")
        .iter()
        .map(|r| r["finding"].as_str().expect("finding"))
        .collect();
    assert_eq!(
        rules,
        [
            "cardiac_contour",
            "costophrenic_angle",
            "rib_fracture",
            "hyperlucency",
            "opacity_severity"
        ]
    );

    let reference: Reference = serde_json::from_str(&run_python(
        HELPER,
        &[
            "predict",
            "densenet",
            s(&checkpoint),
            s(&rg1()),
            s(&png),
            s(&jpeg),
        ],
    ))
    .expect("reference JSON");

    let node = NodeProcess::start(&dir.path().join("node"), &["--model", s(&model)]);
    let (dicom, worst_dicom) = compare(&node, &rg1(), &reference);
    let (picture, worst_png) = compare(&node, &png, &reference);
    // A JPEG goes through two decoders (the `image` crate's here, libjpeg-turbo's in
    // imageio): the pictures differ by a grey level here and there, the outputs by ~1e-5.
    let (_, worst_jpeg) = compare(&node, &jpeg, &reference);
    eprintln!(
        "largest difference from TXRV: DICOM {worst_dicom:.2e}, PNG {worst_png:.2e}, JPEG {worst_jpeg:.2e}"
    );
    assert_eq!(dicom["model_id"], "txrv-test");
    assert_eq!(
        probability(&dicom, "txrv_hernia"),
        0.5,
        "untrained reads 0.5 as in TXRV"
    );
    // The comparison sees a near miss: TXRV's other resize engine (cv2's area average, not
    // skimage's filtered bilinear) moves the probabilities by far more than the node is off.
    let near_miss: Reference = serde_json::from_str(&run_python(
        HELPER,
        &["predict", "--cv2", "densenet", s(&checkpoint), s(&rg1())],
    ))
    .expect("reference JSON");
    let moved = near_miss[s(&rg1())]
        .as_object()
        .expect("probabilities")
        .iter()
        .map(|(t, p)| (p.as_f64().expect("p") - probability(&dicom, &txrv_field(t))).abs())
        .fold(0.0f64, f64::max);
    eprintln!("the cv2 engine is {moved:.2e} away");
    assert!(
        moved > 5.0 * TOLERANCE,
        "a different resize moved the outputs by only {moved}"
    );

    // The pathologies read as schema-v1 findings, by the card's rules.
    for record in [&dicom, &picture] {
        let findings = &record["findings"];
        let cardiomegaly = probability(record, "txrv_cardiomegaly");
        let contour = findings["mediastinum"]["cardiac_contour"]["value"]
            .as_str()
            .expect("contour");
        assert_eq!(
            contour,
            if cardiomegaly >= 0.5 {
                "enlarged"
            } else {
                "normal"
            }
        );
        let fracture = probability(record, "txrv_fracture");
        assert_eq!(findings["thorax"]["rib_fracture"]["value"], fracture >= 0.5);
        let opacity = ["txrv_lung_opacity", "txrv_consolidation", "txrv_pneumonia"]
            .iter()
            .map(|f| probability(record, f))
            .fold(0.0f64, f64::max);
        let severity = findings["lungs"]["opacity_severity"]["value"]
            .as_str()
            .expect("severity");
        let expected = match opacity {
            p if p >= 0.9 => "severe",
            p if p >= 0.75 => "moderate",
            p if p >= 0.5 => "mild",
            _ => "none",
        };
        assert_eq!(severity, expected, "evidence {opacity}");
        assert!(
            findings["mediastinum"]["cardiothoracic_ratio"].is_null(),
            "TXRV measures no ratio"
        );
    }
}

#[test]
fn an_imported_txrv_resnet50_gives_txrvs_probabilities_at_512() {
    let dir = tempfile::tempdir().expect("tempdir");
    let checkpoint = dir.path().join("resnet50-random.pt");
    run_python(HELPER, &["resnet", s(&checkpoint), "11", "--", s(&rg1())]);
    let model = dir.path().join("model");
    let out = import(&checkpoint, &model, &[]);
    assert!(out.status.success(), "import: {}", text(&out.stderr));
    let card: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model.join("card.json")).expect("card"))
            .expect("json");
    assert_eq!(card["architecture"], "txrv-resnet50");
    assert_eq!(card["input"]["size"], 512);
    assert_eq!(card["model_id"], "txrv-resnet50-random");
    let reference: Reference = serde_json::from_str(&run_python(
        HELPER,
        &["predict", "resnet", s(&checkpoint), s(&rg1())],
    ))
    .expect("reference JSON");
    let node = NodeProcess::start(&dir.path().join("node"), &["--model", s(&model)]);
    let (_, worst) = compare(&node, &rg1(), &reference);
    eprintln!("largest difference from TXRV (ResNet-50, 512): {worst:.2e}");
}

/// An imported TXRV model is a federated model like the bundled one: two sites serve it
/// (their kept inputs are then in TXRV's preprocessing), the registry takes it, a heads-only
/// round fine-tunes its cardiomegaly head on each site's labels, and the promoted result
/// serves at both sites — the trained head moved, every other pathology reads exactly as
/// before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imported_txrv_model_fine_tunes_in_a_federated_round_and_is_promoted() {
    use cxrfed_auth::Role;
    use cxrfed_e2e::{CoordinatorProcess, TestPki, cxrfed, free_port};
    use cxrfed_proto::v1 as pb;
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let checkpoint = root.join("densenet121-random.pt");
    run_python(HELPER, &["densenet", s(&checkpoint), "5", "--", s(&rg1())]);
    let model = root.join("txrv-model");
    let out = import(&checkpoint, &model, &["--model-id", "txrv-base"]);
    assert!(out.status.success(), "import: {}", text(&out.stderr));

    let pki = TestPki::at(&root.join("pki"));
    let coordinator = CoordinatorProcess::start(&root.join("coordinator"), &pki);
    let url = coordinator.url();
    let admin = pki.identity(Role::StudyAdmin, "sam", None);
    let mut nodes = Vec::new();
    for (i, (site, profile)) in [("site-a", "university"), ("site-b", "community")]
        .into_iter()
        .enumerate()
    {
        let images = root.join(format!("phantoms-{site}"));
        let (csv, _) = cxrfed_e2e::labelled_phantoms(&images, profile, 10, 90 + i as u32, 256);
        let labels = std::fs::read_to_string(&csv).expect("csv").replacen(
            "image_sha256,cardiomegaly",
            "image_sha256,txrv_cardiomegaly",
            1,
        );
        std::fs::write(&csv, labels).expect("csv");
        let node = NodeProcess::start_in(
            &root.join(site),
            free_port(),
            pki.clone(),
            &["--model", s(&model), "--site", site, "--coordinator", &url],
        );
        for args in [
            vec!["ingest", s(&images)],
            vec![
                "field",
                "define",
                "txrv_cardiomegaly",
                "--type",
                "bool",
                "--description",
                "CTR above 0.5",
            ],
            vec!["annotate", "import", s(&csv)],
        ] {
            let out = node.cli(&args);
            assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        }
        node.allow_phantom_training();
        node.training_budget(500.0, 0.5);
        nodes.push(node);
    }
    cxrfed_e2e::wait_sites_connected(&url, &pki, &admin, 2).await;
    let before = extract_now(&nodes[0], &rg1());

    let (ca, cert, key) = (
        pki.ca_pem(),
        admin.join(cxrfed_auth::pki::CERT),
        admin.join(cxrfed_auth::pki::KEY),
    );
    let common = [
        "--coordinator",
        &url,
        "--ca",
        s(&ca),
        "--cert",
        s(&cert),
        "--key",
        s(&key),
    ];
    let mut args = vec!["registry", "import", s(&model), "--version", "txrv-base"];
    args.extend(common);
    let out = cxrfed(&args);
    assert!(
        out.status.success(),
        "registry import: {}",
        text(&out.stderr)
    );
    let job = cxrfed_e2e::start_signed_job(
        &url,
        &pki,
        &admin,
        "base = \"txrv-base\"\nheads = [\"txrv_cardiomegaly\"]\ntrainable = \"heads\"\nrounds = 1\nlocal_steps = 2\nbatch_size = 2\nlearning_rate = 0.05\nmin_sites = 2\nround_deadline_secs = 600\n",
    )
    .await;
    let done = cxrfed_e2e::wait_job(&url, &pki, &admin, &job.job_id, |j| {
        j.state() != pb::JobState::Running
    })
    .await;
    assert_eq!(done.state(), pb::JobState::Completed, "{}", done.reason);
    let round = done
        .round_log
        .iter()
        .find(|r| r.state() == pb::RoundState::Completed)
        .expect("a completed round");
    let reported: Vec<&pb::SiteRound> = round
        .sites
        .iter()
        .filter(|s| s.status() == pb::SiteRoundStatus::Reported)
        .collect();
    assert_eq!(reported.len(), 2, "{round:?}");
    // Heads only: one head's 1024 weights and bias, not DenseNet-121's 28 MB.
    assert!(
        reported.iter().all(|s| s.update_bytes < 16 << 10),
        "{reported:?}"
    );

    let version = done.latest_model.clone();
    let mut args = vec!["registry", "promote", version.as_str(), "--json"];
    args.extend(common);
    let out = cxrfed(&args);
    assert!(out.status.success(), "promote: {}", text(&out.stderr));
    let deadline = Instant::now() + Duration::from_secs(180);
    for node in &nodes {
        loop {
            let status =
                cxrfed_proto::v1::node_service_client::NodeServiceClient::new(node.channel().await)
                    .status(pb::StatusRequest {})
                    .await
                    .expect("status")
                    .into_inner();
            if status.model_id == version {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} still runs {}",
                node.url(),
                status.model_id
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    let after = extract_now(&nodes[0], &rg1());
    assert_eq!(after["model_id"], version.as_str());
    let fields = |r: &serde_json::Value| r["model_fields"].as_object().expect("fields").clone();
    let (b, a) = (fields(&before), fields(&after));
    assert_eq!(b.len(), 18);
    for (field, value) in &b {
        if field == "txrv_cardiomegaly" {
            assert_ne!(&a[field], value, "the trained head moved");
        } else {
            assert_eq!(&a[field], value, "{field}: untouched by a heads-only round");
        }
    }
}

/// The record `node` makes of `file` now (forced: the image may be stored already).
fn extract_now(node: &NodeProcess, file: &Path) -> serde_json::Value {
    let out = node.cli(&["extract", "--force", s(file)]);
    assert!(out.status.success(), "extract: {}", text(&out.stderr));
    serde_json::from_str(text(&out.stdout).trim()).expect("record")
}
