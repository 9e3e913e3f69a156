//! TorchXRayVision's architectures, built natively so an imported checkpoint fine-tunes like
//! the bundled model: `xrv.models.DenseNet` (DenseNet-121, one input channel, adaptive
//! average pool, `densenet121-res224-*`) and `xrv.models.ResNet` (torchvision's ResNet-50 with
//! a one-channel `conv1`, `resnet50-res512-all`).
//!
//! Variable names are TXRV's own under `backbone.` (`backbone.features.denseblock1.…`,
//! `backbone.layer1.0.conv1.weight`), so `scripts/txrv-convert.py` copies tensors by name;
//! TXRV's single classifier (`classifier` / `fc`, 18 outputs) becomes one width-1 head per
//! pathology (`heads.txrv_effusion.weight` is row 7 of the classifier), which gives the same
//! logits and lets a federated job train the heads it names. The layers are written here
//! rather than taken from `tch::vision` because tch's versions take three input channels and
//! end in a fixed 7 x 7 pool.

use tch::nn;
use tch::{Tensor, nn::Path};

fn conv(p: Path, c_in: i64, c_out: i64, k: i64, stride: i64, padding: i64) -> nn::Conv2D {
    nn::conv2d(
        p,
        c_in,
        c_out,
        k,
        nn::ConvConfig {
            stride,
            padding,
            bias: false,
            ..Default::default()
        },
    )
}

fn bn(p: Path, c: i64) -> nn::BatchNorm {
    nn::batch_norm2d(p, c, Default::default())
}

/// Feature width of [`densenet121`].
pub const DENSENET_FEATURES: i64 = 1024;
/// Feature width of [`resnet50`].
pub const RESNET_FEATURES: i64 = 2048;

/// `xrv.models.DenseNet` up to `features2`: `[N, 1, H, W]` → `[N, 1024]` (ReLU, adaptive
/// average pool), for any input size.
pub fn densenet121(p: &Path) -> nn::SequentialT {
    let (growth, bn_size, init) = (32, 4, 64);
    let f = p / "features";
    let mut seq = nn::seq_t()
        .add(conv(&f / "conv0", 1, init, 7, 2, 3))
        .add(bn(&f / "norm0", init))
        .add_fn(|x| x.relu().max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false));
    let mut width = init;
    let blocks = [6, 12, 24, 16];
    for (i, &layers) in blocks.iter().enumerate() {
        let block = &f / format!("denseblock{}", i + 1);
        for j in 0..layers {
            let l = &block / format!("denselayer{}", j + 1);
            let c_in = width + j * growth;
            let norm1 = bn(&l / "norm1", c_in);
            let conv1 = conv(&l / "conv1", c_in, bn_size * growth, 1, 1, 0);
            let norm2 = bn(&l / "norm2", bn_size * growth);
            let conv2 = conv(&l / "conv2", bn_size * growth, growth, 3, 1, 1);
            seq = seq.add(nn::func_t(move |x, train| {
                let y = x
                    .apply_t(&norm1, train)
                    .relu()
                    .apply(&conv1)
                    .apply_t(&norm2, train)
                    .relu()
                    .apply(&conv2);
                Tensor::cat(&[x, &y], 1)
            }));
        }
        width += layers * growth;
        if i + 1 < blocks.len() {
            let t = &f / format!("transition{}", i + 1);
            seq = seq
                .add(bn(&t / "norm", width))
                .add_fn(|x| x.relu())
                .add(conv(&t / "conv", width, width / 2, 1, 1, 0))
                // Not `avg_pool2d_default`: tch passes divisor_override = 1 there, a sum.
                .add_fn(|x| x.avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None::<i64>));
            width /= 2;
        }
    }
    seq.add(bn(&f / "norm5", width))
        .add_fn(|x| x.relu().adaptive_avg_pool2d([1, 1]).flatten(1, -1))
}

fn bottleneck(p: Path, c_in: i64, planes: i64, stride: i64) -> nn::FuncT<'static> {
    let out = planes * 4;
    let conv1 = conv(&p / "conv1", c_in, planes, 1, 1, 0);
    let bn1 = bn(&p / "bn1", planes);
    let conv2 = conv(&p / "conv2", planes, planes, 3, stride, 1);
    let bn2 = bn(&p / "bn2", planes);
    let conv3 = conv(&p / "conv3", planes, out, 1, 1, 0);
    let bn3 = bn(&p / "bn3", out);
    let downsample = (stride != 1 || c_in != out).then(|| {
        let d = &p / "downsample";
        (conv(&d / "0", c_in, out, 1, stride, 0), bn(&d / "1", out))
    });
    nn::func_t(move |x, train| {
        let y = x
            .apply(&conv1)
            .apply_t(&bn1, train)
            .relu()
            .apply(&conv2)
            .apply_t(&bn2, train)
            .relu()
            .apply(&conv3)
            .apply_t(&bn3, train);
        let identity = match &downsample {
            Some((c, b)) => x.apply(c).apply_t(b, train),
            None => x.shallow_clone(),
        };
        (identity + y).relu()
    })
}

/// torchvision's ResNet-50 with TXRV's one-channel `conv1`, without `fc`: `[N, 1, H, W]` →
/// `[N, 2048]`.
pub fn resnet50(p: &Path) -> nn::SequentialT {
    let mut seq = nn::seq_t()
        .add(conv(p / "conv1", 1, 64, 7, 2, 3))
        .add(bn(p / "bn1", 64))
        .add_fn(|x| x.relu().max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false));
    let mut c_in = 64;
    for (i, (planes, blocks, stride)) in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]
        .into_iter()
        .enumerate()
    {
        let layer = p / format!("layer{}", i + 1);
        for b in 0..blocks {
            let s = if b == 0 { stride } else { 1 };
            seq = seq.add(bottleneck(&layer / b.to_string(), c_in, planes, s));
            c_in = planes * 4;
        }
    }
    seq.add_fn(|x| x.adaptive_avg_pool2d([1, 1]).flatten(1, -1))
}

/// Backbone variables of the last block, for `Trainable::LastBlock`.
pub const DENSENET_LAST_BLOCK: &[&str] =
    &["backbone.features.denseblock4.", "backbone.features.norm5."];
pub const RESNET_LAST_BLOCK: &[&str] = &["backbone.layer4."];

/// What `scripts/txrv-convert.py` writes beside the tensors (`txrv.json`).
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct Converted {
    /// `txrv-densenet121` or `txrv-resnet50`.
    pub architecture: String,
    /// The classifier's name in the checkpoint: `classifier` (DenseNet) or `fc` (ResNet).
    pub head: String,
    /// TXRV's target names, in output order.
    pub targets: Vec<String>,
    /// Published operating points (null where TXRV has NaN); absent for a model without.
    pub op_threshs: Option<Vec<Option<f32>>>,
    pub input_resolution: u32,
    /// The TXRV weights name (`densenet121-res224-all`), when known.
    pub weights: Option<String>,
    pub checkpoint_sha256: String,
    pub torchxrayvision_version: String,
    pub torch_version: String,
}

/// The card and cxrfed-named weights of a converted TXRV checkpoint: backbone tensors under
/// `backbone.`, the classifier split into one width-1 head per target, TXRV's preprocessing
/// (`pipeline` "torchxrayvision", centre crop, the checkpoint's resolution) and label map
/// ([`LabelMap::torchxrayvision`], or `findings` in place of the default rules).
pub fn card_and_weights(
    meta: &Converted,
    mut tensors: cxrfed_fl::Weights,
    model_id: &str,
    findings: Option<Vec<cxrfed_fl::labelmap::FindingRule>>,
) -> Result<(crate::ModelCard, cxrfed_fl::Weights), crate::ModelError> {
    use crate::ModelError;
    let arch = crate::Arch::parse(&meta.architecture)
        .filter(|a| matches!(a, crate::Arch::TxrvDensenet121 | crate::Arch::TxrvResnet50))
        .ok_or_else(|| {
            ModelError::Load(format!("not a TXRV architecture: {:?}", meta.architecture))
        })?;
    let mut label_map = crate::LabelMap::torchxrayvision(&meta.targets, meta.op_threshs.as_deref());
    if let Some(rules) = findings {
        label_map.findings = rules;
    }
    label_map.validate().map_err(ModelError::Load)?;
    let weight = tensors
        .remove(&format!("{}.weight", meta.head))
        .ok_or_else(|| ModelError::Load(format!("no {}.weight in the checkpoint", meta.head)))?;
    let bias = tensors
        .remove(&format!("{}.bias", meta.head))
        .ok_or_else(|| ModelError::Load(format!("no {}.bias in the checkpoint", meta.head)))?;
    let (outputs, width) = match weight.shape[..] {
        [o, w] if o == meta.targets.len() && bias.data.len() == o => (o, w),
        _ => {
            return Err(ModelError::Load(format!(
                "classifier of shape {:?} for {} targets",
                weight.shape,
                meta.targets.len()
            )));
        }
    };
    let mut out = cxrfed_fl::Weights::new();
    for (name, tensor) in tensors {
        out.insert(format!("backbone.{name}"), tensor);
    }
    for (i, head) in label_map.heads.iter().enumerate().take(outputs) {
        out.insert(
            format!("heads.{}.weight", head.name),
            cxrfed_fl::Tensor {
                shape: vec![1, width],
                data: weight.data[i * width..(i + 1) * width].to_vec(),
            },
        );
        out.insert(
            format!("heads.{}.bias", head.name),
            cxrfed_fl::Tensor {
                shape: vec![1],
                data: vec![bias.data[i]],
            },
        );
    }
    let card = crate::ModelCard {
        model_id: model_id.to_string(),
        format: crate::ModelFormat::Safetensors,
        architecture: arch.as_str().into(),
        input: crate::InputSpec {
            size: meta.input_resolution,
            channels: 1,
            aspect: "center-crop".into(),
            mean: 0.5,
            std: 1.0 / 2048.0,
            pipeline: "torchxrayvision".into(),
        },
        label_map,
        weights: "model.safetensors".into(),
        weights_sha256: String::new(),
        intended_use: "TorchXRayVision pathology classifier imported with `cxrfed model import \
            --torchxrayvision`; outputs are TXRV's 18 (or fewer) pathology probabilities, read \
            as schema-v1 findings by the label map's rules. Validate at your site (and \
            calibrate its operating points) before research use."
            .into(),
        training: serde_json::json!({
            "source": "torchxrayvision",
            "weights": meta.weights,
            "checkpoint_sha256": meta.checkpoint_sha256,
            "torchxrayvision_version": meta.torchxrayvision_version,
            "torch_version": meta.torch_version,
            "preprocessing": "read_xray_dcm (stored values, MONOCHROME1 flipped, (2 v / (2^bits - 1) - 1) * 1024) \
                or normalize(img, 255) for 8-bit pictures; XRayCenterCrop(); XRayResizer(size) (skimage resize, \
                mode constant, anti-aliased); sigmoid, then op_norm with the operating points",
        }),
        metrics: serde_json::Value::Null,
        created_at: chrono::Utc::now().to_rfc3339(),
    };
    Ok((card, out))
}
