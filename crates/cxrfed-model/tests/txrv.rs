//! An imported TorchXRayVision model in a site's round. Its own test binary: libtorch's random
//! generator is global, and the FedAvg determinism test beside it must not share it.

use cxrfed_fl::tensor;
use cxrfed_model::federated::{LocalSpec, Trainable, train_round};
use cxrfed_model::train::{Dataset, Sample, Target};
use cxrfed_model::{Arch, InputSpec, LabelMap, Model};
use tch::Device;

/// An imported TorchXRayVision DenseNet fine-tunes like the bundled model: a heads-only round
/// changes the heads it names and nothing else (its backbone, batch-norm statistics included,
/// and the other 16 pathologies stay as they were).
#[test]
fn a_txrv_densenet_trains_only_the_heads_a_round_names() {
    cxrfed_model::manual_seed(3);
    let targets: Vec<String> = [
        "Atelectasis",
        "Consolidation",
        "Infiltration",
        "Pneumothorax",
        "Edema",
        "Emphysema",
        "Fibrosis",
        "Effusion",
        "Pneumonia",
        "Pleural_Thickening",
        "Cardiomegaly",
        "Nodule",
        "Mass",
        "Hernia",
        "Lung Lesion",
        "Fracture",
        "Lung Opacity",
        "Enlarged Cardiomediastinum",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let label_map = LabelMap::torchxrayvision(&targets, None);
    let input = InputSpec {
        size: 64,
        aspect: "center-crop".into(),
        mean: 0.5,
        std: 1.0 / 2048.0,
        pipeline: "torchxrayvision".into(),
        ..InputSpec::default()
    };
    let start = Model::new(
        Arch::TxrvDensenet121,
        label_map.clone(),
        input,
        Device::Cpu,
        "txrv",
    )
    .expect("model");
    let global = start.to_bytes().expect("bytes");
    let (e, _) = label_map.head("txrv_effusion").expect("head");
    let (c, _) = label_map.head("txrv_cardiomegaly").expect("head");
    let samples = (0..8)
        .map(|i| {
            let mut targets = vec![None; label_map.heads.len()];
            targets[e] = Some(Target::Binary(i % 2 == 0));
            targets[c] = Some(Target::Binary(i % 3 == 0));
            Sample {
                input: (0..64 * 64)
                    .map(|p| (((p * (i + 1)) % 29) as f32 / 29.0 - 0.5) * 2048.0)
                    .collect(),
                targets,
                name: format!("s{i}"),
            }
        })
        .collect();
    let data = Dataset {
        size: 64,
        label_map: label_map.clone(),
        samples,
    };
    let spec = LocalSpec {
        trainable: Trainable::Heads,
        heads: vec!["txrv_effusion".into(), "txrv_cardiomegaly".into()],
        epochs: 1,
        batch_size: 4,
        learning_rate: 1e-2,
        ..LocalSpec::default()
    };
    let mut model = Model::from_bytes(start.card.clone(), &global, Device::Cpu).expect("load");
    let update = train_round(&mut model, &data, &spec).expect("round");
    assert_eq!(update.samples, 8);
    let delta = tensor::decode(&update.delta).expect("delta");
    let names: Vec<&str> = delta.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "heads.txrv_cardiomegaly.bias",
            "heads.txrv_cardiomegaly.weight",
            "heads.txrv_effusion.bias",
            "heads.txrv_effusion.weight"
        ]
    );
    assert!(
        delta.values().any(|t| t.data.iter().any(|v| *v != 0.0)),
        "the heads moved"
    );
    let before = tensor::decode(&global).expect("global");
    let after = tensor::decode(&model.to_bytes().expect("bytes")).expect("after");
    for (name, t) in &before {
        if !name.starts_with("heads.txrv_effusion.")
            && !name.starts_with("heads.txrv_cardiomegaly.")
        {
            assert_eq!(t.data, after[name].data, "{name} changed");
        }
    }
}
