//! FedAvg over identical data at every site gives the same model as one site training alone
//! (up to floating point): a site's round is deterministic for its seed, and the coordinator's
//! sample-weighted mean of identical updates is that update.

use cxrfed_fl::aggregate::{self, AdamMoments, Aggregator, Algorithm, ServerAdam};
use cxrfed_fl::tensor;
use cxrfed_model::federated::{LocalSpec, Trainable, train_round};
use cxrfed_model::train::{Dataset, Sample, Target};
use cxrfed_model::{Arch, InputSpec, LabelMap, Model};
use tch::Device;

fn dataset(label_map: &LabelMap) -> Dataset {
    let (q, _) = label_map.head("image_quality").expect("head");
    let (f, _) = label_map.head("rib_fracture").expect("head");
    let samples = (0..12)
        .map(|i| {
            let mut targets = vec![None; label_map.heads.len()];
            targets[q] = Some(Target::Class(i % 4));
            targets[f] = Some(Target::Binary(i % 3 == 0));
            Sample {
                input: (0..32 * 32)
                    .map(|p| ((p * (i + 1)) % 17) as f32 / 17.0 - 0.5)
                    .collect(),
                targets,
                name: format!("s{i}"),
            }
        })
        .collect();
    Dataset {
        size: 32,
        label_map: label_map.clone(),
        samples,
    }
}

#[test]
fn fedavg_over_identical_sites_equals_one_site_alone() {
    cxrfed_model::manual_seed(11);
    let start = Model::new(
        Arch::Tiny,
        LabelMap::schema_v1(),
        InputSpec {
            size: 32,
            ..InputSpec::default()
        },
        Device::Cpu,
        "start",
    )
    .expect("model");
    let global = start.to_bytes().expect("bytes");
    let data = dataset(&start.card.label_map);
    let spec = LocalSpec {
        trainable: Trainable::All,
        epochs: 2,
        batch_size: 4,
        learning_rate: 1e-2,
        ..LocalSpec::default()
    };
    let round = || {
        let mut model = Model::from_bytes(start.card.clone(), &global, Device::Cpu).expect("load");
        cxrfed_model::manual_seed(5);
        let update = train_round(&mut model, &data, &spec).expect("round");
        (model.to_bytes().expect("bytes"), update)
    };

    let (alone, _) = round();
    let mut aggregator = Aggregator::new(&tensor::decode(&global).expect("decode"), false);
    for _ in 0..3 {
        let (_, update) = round();
        assert_eq!(update.samples, 12);
        aggregator
            .add(&update.delta, update.samples as u64)
            .expect("add");
    }
    let mean = aggregator.mean(0.0);
    let mut federated = tensor::decode(&global).expect("decode");
    aggregate::apply(
        &mut federated,
        &mean,
        Algorithm::FedAvg,
        &ServerAdam::default(),
        &mut AdamMoments::default(),
    )
    .expect("apply");

    let alone = tensor::decode(&alone).expect("decode");
    assert_eq!(alone.len(), federated.len());
    let mut changed = 0;
    for (name, t) in &alone {
        let g = &federated[name];
        let start_values = &tensor::decode(&global).expect("decode")[name].data;
        for ((a, b), s) in t.data.iter().zip(&g.data).zip(start_values) {
            assert!(
                (a - b).abs() <= 1e-5 * a.abs().max(1.0),
                "{name}: {a} vs {b}"
            );
            changed += usize::from(a != s);
        }
    }
    assert!(changed > 1000, "training changed only {changed} values");
}
