//! The model crate against real phantoms, real libtorch training, real TorchScript.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cxrfed_model::train::{TrainConfig, evaluate_model, fit};
use cxrfed_model::{
    Arch, Dataset, InferenceHandle, InputSpec, LabelMap, Model, ModelError, WorkerConfig,
};
use tch::Device;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

fn venv_python() -> PathBuf {
    workspace_root().join(".venv/bin/python")
}

fn phantoms(dir: &Path, count: u64, seed: u64, site: Option<&str>, max: Option<u32>) {
    let generator = cxrfed_phantom::Generator::new(seed, site)
        .expect("profile")
        .with_max_columns(max);
    cxrfed_phantom::write_folder(&generator, dir, count, Default::default(), 2, &|_| {})
        .expect("phantoms");
}

fn load(dir: &Path, input: &InputSpec) -> Dataset {
    let options = cxrfed_model::preprocess_options(input);
    Dataset::from_labels_folder(dir, &LabelMap::schema_v1(), &options, &["dicom"], 2)
        .expect("dataset")
}

/// A randomly initialised tiny model with `size x size` input.
fn tiny_model(size: u32, id: &str) -> Model {
    let input = InputSpec {
        size,
        ..InputSpec::default()
    };
    Model::new(Arch::Tiny, LabelMap::schema_v1(), input, Device::Cpu, id).expect("model")
}

#[test]
fn training_moves_validation_metrics_far_above_chance() {
    let dir = tempfile::tempdir().expect("tempdir");
    phantoms(dir.path(), 240, 21, Some("university,icu"), Some(256));
    tch::manual_seed(5);
    let mut model = tiny_model(128, "test");
    let (train, val) = load(dir.path(), &model.card.input).split(0.25, 3);
    let before = evaluate_model(&model, &val).expect("eval");
    let config = TrainConfig {
        epochs: 14,
        batch_size: 16,
        ..TrainConfig::default()
    };
    let reports = fit(&mut model, &train, Some(&val), &config, &mut |_| {}).expect("fit");
    let after = reports
        .last()
        .and_then(|r| r.validation.clone())
        .expect("validation");
    let f1 = |m: &cxrfed_model::Metrics, h: &str| m.head(h).and_then(|x| x.macro_f1).expect("f1");
    let mae = |m: &cxrfed_model::Metrics| {
        m.head("cardiothoracic_ratio")
            .and_then(|x| x.mae)
            .expect("mae")
    };
    eprintln!("before:\n{}\nafter:\n{}", before.table(), after.table());
    // Three balanced-ish classes: chance macro-F1 is about 0.33.
    assert!(f1(&after, "diaphragm_position") > 0.75, "{}", after.table());
    // Predicting the mean ratio gives an MAE around 0.07.
    assert!(mae(&after) < 0.045, "{}", after.table());
    assert!(reports.last().expect("report").train_loss < reports[0].train_loss * 0.8);

    // Saved and reloaded, the model predicts the same.
    let out = dir.path().join("model");
    model.save(&out).expect("save");
    let loaded = Model::load(&out, Device::Cpu).expect("load");
    let again = evaluate_model(&loaded, &val).expect("eval");
    assert_eq!(again, evaluate_model(&model, &val).expect("eval"));
    // A corrupted weights file is refused by its hash.
    let card = std::fs::read_to_string(out.join("card.json")).expect("card");
    std::fs::write(out.join("model.safetensors"), b"not weights").expect("write");
    let err = Model::load(&out, Device::Cpu).expect_err("tampered");
    assert!(
        err.to_string().contains("does not match the model card"),
        "{err} / {card:.0}"
    );
}

fn torchscript_dir(width: usize, size: u32) -> (tempfile::TempDir, Vec<f32>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/helpers/make_torchscript.py");
    let output = std::process::Command::new(venv_python())
        .arg(&script)
        .arg(dir.path().join("model.pt"))
        .arg(width.to_string())
        .arg(size.to_string())
        .output()
        .expect("run python (make venv first)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let reference = String::from_utf8_lossy(&output.stdout)
        .trim()
        .split(',')
        .map(|v| v.parse().expect("float"))
        .collect();
    (dir, reference)
}

fn torchscript_card(dir: &Path, label_map: LabelMap, size: u32) {
    let card = cxrfed_model::ModelCard {
        model_id: "byo-torchscript".into(),
        format: cxrfed_model::ModelFormat::Torchscript,
        architecture: "python Tiny".into(),
        input: InputSpec {
            size,
            ..InputSpec::default()
        },
        label_map,
        weights: "model.pt".into(),
        weights_sha256: String::new(),
        intended_use: "test".into(),
        training: serde_json::Value::Null,
        metrics: serde_json::Value::Null,
        created_at: String::new(),
    };
    card.save(dir).expect("card");
}

#[test]
fn torchscript_model_loads_runs_and_matches_python() {
    let map = LabelMap::schema_v1();
    let (dir, reference) = torchscript_dir(map.width(), 64);
    torchscript_card(dir.path(), map.clone(), 64);
    let model = Model::load(dir.path(), Device::Cpu).expect("load TorchScript");
    let x = tch::Tensor::linspace(-1.0, 1.0, 64 * 64, (tch::Kind::Float, Device::Cpu))
        .view([1, 1, 64, 64]);
    let y: Vec<f32> =
        Vec::try_from(model.try_forward(&x).expect("forward").view([-1])).expect("vec");
    assert_eq!(y.len(), reference.len());
    for (a, b) in y.iter().zip(&reference) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
    let findings = cxrfed_model::predict::activate(&map, &model.try_forward(&x).expect("forward"))
        [0]
    .findings(&map);
    assert!(
        findings.image_quality.is_some() && findings.mediastinum.cardiothoracic_ratio.is_some()
    );
}

#[test]
fn torchscript_model_with_a_mismatched_label_map_is_refused_at_load() {
    let (dir, _) = torchscript_dir(10, 64);
    torchscript_card(dir.path(), LabelMap::schema_v1(), 64);
    let err = Model::load(dir.path(), Device::Cpu).expect_err("mismatch");
    let text = err.to_string();
    assert!(
        text.contains("[2, 10]") && text.contains("[2, 42]") && text.contains("label map"),
        "{text}"
    );
}

fn random_inputs(n: usize, size: usize) -> Vec<ndarray::Array2<f32>> {
    (0..n)
        .map(|i| {
            ndarray::Array2::from_shape_fn((size, size), |(y, x)| {
                ((i * 31 + y * 7 + x * 3) % 17) as f32 / 8.0 - 1.0
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_are_batched_and_match_one_by_one() {
    tch::manual_seed(1);
    let model = tiny_model(64, "batch");
    let inputs = random_inputs(24, 64);
    // Reference: one image at a time through the same weights.
    let one_by_one: Vec<_> = inputs
        .iter()
        .map(|a| {
            let x = tch::Tensor::from_slice(a.as_slice().expect("contiguous")).view([1, 1, 64, 64]);
            cxrfed_model::predict::activate(
                &model.card.label_map,
                &model.try_forward(&x).expect("forward"),
            )
            .remove(0)
        })
        .collect();
    let handle = InferenceHandle::spawn(
        model,
        WorkerConfig {
            max_batch: 8,
            max_wait: Duration::from_millis(200),
            queue_capacity: 64,
        },
    )
    .expect("spawn");
    // All 24 are announced as on their way (as the node does while it decodes them), so a
    // batch waits for them instead of running with whatever has arrived.
    let tasks: Vec<_> = inputs
        .into_iter()
        .map(|a| {
            let h = handle.clone();
            let incoming = h.incoming();
            tokio::spawn(async move {
                drop(incoming);
                h.infer(a).await
            })
        })
        .collect();
    let mut batched = Vec::new();
    for t in tasks {
        batched.push(t.await.expect("join").expect("infer"));
    }
    let stats = handle.stats();
    assert_eq!(stats.images, 24);
    assert!(stats.max_batch_seen > 1 && stats.batches < 24, "{stats:?}");
    for (a, b) in batched.iter().zip(&one_by_one) {
        for (x, y) in a.outputs.iter().zip(&b.outputs) {
            let (xs, ys) = (
                serde_json::to_value(x).expect("json"),
                serde_json::to_value(y).expect("json"),
            );
            let flat = |v: &serde_json::Value| -> Vec<f64> {
                match v {
                    serde_json::Value::Array(items) => {
                        items.iter().filter_map(|i| i.as_f64()).collect()
                    }
                    other => vec![other.as_f64().expect("number")],
                }
            };
            for (p, q) in flat(&xs).iter().zip(flat(&ys)) {
                assert!((p - q).abs() < 1e-4, "batched {p} vs single {q}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_waits_only_for_images_on_their_way() {
    let model = tiny_model(64, "adaptive");
    // A wait far beyond the test's patience: an image with nothing else on its way must not
    // sit out this wait, and one that is announced must be waited for.
    let handle = InferenceHandle::spawn(
        model,
        WorkerConfig {
            max_batch: 8,
            max_wait: Duration::from_secs(600),
            queue_capacity: 8,
        },
    )
    .expect("spawn");
    tokio::time::timeout(
        Duration::from_secs(60),
        handle.infer(random_inputs(1, 64).remove(0)),
    )
    .await
    .expect("a lone image runs without waiting for max_wait")
    .expect("infer");
    let stats = handle.stats();
    assert_eq!((stats.batches, stats.unwaited, stats.incoming), (1, 1, 0));

    // While an image is announced, a queued one waits for company: the second image finds the
    // first still queued (a worker that did not wait would have run the first alone).
    let announced = handle.incoming();
    let spawn_one = |h: InferenceHandle| {
        let a = random_inputs(1, 64).remove(0);
        tokio::spawn(async move { h.infer(a).await })
    };
    let queued = |n: usize| {
        let h = handle.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(60), async {
                while h.stats().queued < n {
                    tokio::task::yield_now().await;
                }
            })
            .await
            .expect("the images wait in the queue")
        }
    };
    let first = spawn_one(handle.clone());
    queued(1).await;
    let second = spawn_one(handle.clone());
    queued(2).await;
    drop(announced);
    for task in [first, second] {
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("answered once nothing more is on its way")
            .expect("join")
            .expect("infer");
    }
    let stats = handle.stats();
    assert_eq!(stats.images, 3);
    assert_eq!(
        stats.batches, 2,
        "the two images ran as one batch: {stats:?}"
    );

    // An announced image that fails before it is queued (its token dropped) ends the wait.
    let failed = handle.incoming();
    let lone = spawn_one(handle.clone());
    queued(1).await;
    drop(failed);
    tokio::time::timeout(Duration::from_secs(60), lone)
        .await
        .expect("the wait ends when the announced image fails")
        .expect("join")
        .expect("infer");
    assert_eq!(handle.stats().batches, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_beyond_the_queue_is_refused_and_the_worker_recovers() {
    let model = tiny_model(96, "flood");
    let handle = InferenceHandle::spawn(
        model,
        WorkerConfig {
            max_batch: 1,
            max_wait: Duration::from_millis(0),
            queue_capacity: 2,
        },
    )
    .expect("spawn");
    let tasks: Vec<_> = random_inputs(200, 96)
        .into_iter()
        .map(|a| {
            let h = handle.clone();
            tokio::spawn(async move { h.infer(a).await })
        })
        .collect();
    let (mut ok, mut full) = (0, 0);
    for t in tasks {
        match tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("no hang")
            .expect("join")
        {
            Ok(_) => ok += 1,
            Err(ModelError::QueueFull {
                capacity,
                retry_after_ms,
            }) => {
                assert_eq!(capacity, 2);
                assert!(retry_after_ms >= 50);
                full += 1;
            }
            Err(other) => panic!("unexpected {other}"),
        }
    }
    assert!(ok >= 1 && full >= 1, "ok {ok} full {full}");
    assert_eq!(handle.stats().rejected, full as u64);
    // Recovered: the next request goes through.
    handle
        .infer(random_inputs(1, 96).remove(0))
        .await
        .expect("recovered");
}

#[test]
fn bundled_model_meets_its_targets_on_a_held_out_site() {
    // Seed and site never used for training: the bundled model saw university, community and
    // icu phantoms of seed 1 (see models/README.md).
    let dir = tempfile::tempdir().expect("tempdir");
    phantoms(dir.path(), 240, 4242, Some("screening"), None);
    let model_dir = cxrfed_model::bundled::install(&dir.path().join("models")).expect("install");
    let model = Model::load(&model_dir, Device::Cpu).expect("bundled model loads");
    let data = load(dir.path(), &model.card.input);
    let metrics = evaluate_model(&model, &data).expect("eval");
    eprintln!("{}", metrics.table());
    for head in [
        "cardiac_contour",
        "costophrenic_angle",
        "diaphragm_position",
        "opacity_severity",
        "image_quality",
    ] {
        let f1 = metrics.head(head).and_then(|h| h.macro_f1).expect("f1");
        assert!(f1 >= 0.90, "{head} macro-F1 {f1:.3}\n{}", metrics.table());
    }
    let mae = metrics
        .head("cardiothoracic_ratio")
        .and_then(|h| h.mae)
        .expect("mae");
    assert!(mae <= 0.03, "ratio MAE {mae:.4}");
}
