//! `cxrfed-node model train|eval|info` (reached as `cxrfed model ...`): local model work that
//! needs libtorch, so it lives in the binary that links it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use cxrfed_model::{Arch, Dataset, InputSpec, LabelMap, Model, TrainConfig};
use sha2::Digest;

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Train a model on a labelled folder (e.g. from `cxrfed phantom`).
    Train(TrainArgs),
    /// Evaluate a model on a labelled folder: per-field accuracy, macro-F1, AUROC, MAE.
    Eval(EvalArgs),
    /// Print a model's card and check it loads.
    Info(InfoArgs),
    /// Import a published model into a cxrfed model directory (fine-tunable safetensors, a
    /// card with its exact preprocessing and label map): `--torchxrayvision FILE`.
    Import(ImportArgs),
    /// Fit per-site operating points of the binary heads on this site's labelled images
    /// (Youden's J, a sensitivity, or the site's prevalence), report sensitivity and
    /// specificity with 95% intervals, and with --out write the site's calibrated copy.
    Calibrate(CalibrateArgs),
}

#[derive(Debug, Args)]
pub struct CalibrateArgs {
    /// Model directory [default: the bundled model].
    #[arg(long)]
    model: Option<PathBuf>,
    /// This site's labelled images (images and labels.json).
    #[arg(long)]
    data: PathBuf,
    /// youden, prevalence, or sensitivity=S.
    #[arg(long, default_value = "youden")]
    target: String,
    /// Binary heads to calibrate, comma-separated [default: every trained binary head].
    #[arg(long, value_delimiter = ',')]
    fields: Vec<String>,
    /// Write the calibrated model (same weights, the fitted operating points in its card)
    /// to this new directory; without it, only report.
    #[arg(long)]
    out: Option<PathBuf>,
    /// A name for the site, recorded with the calibration in the card.
    #[arg(long, default_value = "")]
    site: String,
    #[arg(long, value_enum, default_value = "table")]
    format: OutputFormat,
    #[arg(long, default_value = "auto")]
    device: String,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// A TorchXRayVision checkpoint as TXRV publishes it (a `torch.save`d model or a state
    /// dict: densenet121-res224-*, resnet50-res512-all).
    #[arg(long)]
    torchxrayvision: PathBuf,
    /// The model directory to create (must not exist).
    #[arg(long)]
    out: PathBuf,
    /// TXRV weights name (e.g. densenet121-res224-all): its targets, operating points and
    /// resolution from TXRV's table [default: looked up by the file's name].
    #[arg(long)]
    weights: Option<String>,
    /// Model id for the card [default: txrv-WEIGHTS or txrv-FILE].
    #[arg(long)]
    model_id: Option<String>,
    /// A JSON array of finding rules to use instead of the default reading of TXRV's
    /// pathologies as schema-v1 findings (docs/models.md).
    #[arg(long)]
    findings: Option<PathBuf>,
    /// The Python that runs the converter; it needs torch, safetensors and torchxrayvision.
    #[arg(long, env = "CXRFED_PYTHON", default_value = "python3")]
    python: String,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Folder with images and labels.json.
    #[arg(long)]
    data: PathBuf,
    /// Architecture: tiny (CPU), resnet18, densenet121.
    #[arg(long, default_value = "tiny")]
    arch: String,
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    /// Share of the data held out for validation.
    #[arg(long, default_value_t = 0.15)]
    validation: f64,
    /// Model input size in pixels.
    #[arg(long)]
    input_size: Option<u32>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Turn augmentation off.
    #[arg(long)]
    no_augment: bool,
    /// Model id written to the card.
    #[arg(long, default_value = "cxrfed-custom")]
    model_id: String,
    /// Output model directory.
    #[arg(long)]
    out: PathBuf,
    /// Device: auto, cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Fine-tune: start from this model directory's weights (same architecture and label map)
    /// instead of a random initialisation.
    #[arg(long)]
    init: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Model directory (card.json + weights) [default: the bundled model].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Folder with images and labels.json.
    #[arg(long)]
    data: PathBuf,
    #[arg(long, value_enum, default_value = "table")]
    format: OutputFormat,
    #[arg(long, default_value = "auto")]
    device: String,
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Model directory [default: the bundled model].
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// The bundled model, unpacked into the user's cache directory.
pub fn bundled_model_dir() -> anyhow::Result<PathBuf> {
    let cache = dirs::cache_dir().unwrap_or_else(std::env::temp_dir);
    Ok(cxrfed_model::bundled::install(
        &cache.join("cxrfed").join("models"),
    )?)
}

fn load_data(
    dir: &std::path::Path,
    label_map: &LabelMap,
    input: &InputSpec,
) -> anyhow::Result<Dataset> {
    let options = cxrfed_model::preprocess_options(input);
    let started = std::time::Instant::now();
    let data = Dataset::from_labels_folder(dir, label_map, &options, &["dicom"], cores())?;
    eprintln!(
        "loaded {} images from {} in {:.1}s",
        data.len(),
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(data)
}

pub fn run(command: ModelCommand) -> anyhow::Result<ExitCode> {
    match command {
        ModelCommand::Train(args) => train(args),
        ModelCommand::Eval(args) => eval(args),
        ModelCommand::Info(args) => {
            let dir = match args.model {
                Some(dir) => dir,
                None => bundled_model_dir()?,
            };
            let model = Model::load(&dir, cxrfed_model::parse_device(&args.device)?)?;
            println!("{}", serde_json::to_string_pretty(&model.card)?);
            eprintln!("cuda available: {}", cxrfed_model::cuda_available());
            Ok(ExitCode::SUCCESS)
        }
        ModelCommand::Import(args) => import(args),
        ModelCommand::Calibrate(args) => calibrate(args),
    }
}

fn calibrate(args: CalibrateArgs) -> anyhow::Result<ExitCode> {
    use cxrfed_model::calibrate::{self, Target};
    let target: Target = args.target.parse().map_err(anyhow::Error::msg)?;
    if let Some(out) = &args.out {
        ensure_new(out)?;
    }
    let dir = match &args.model {
        Some(dir) => dir.clone(),
        None => bundled_model_dir()?,
    };
    let model = Model::load(&dir, cxrfed_model::parse_device(&args.device)?)?;
    let data = load_data(&args.data, &model.card.label_map, &model.card.input)?;
    let fields = calibrate::calibrate(&model, &data, &args.fields, target)?;
    match args.format {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&fields)?),
        OutputFormat::Table => {
            println!(
                "{:<24} {:>6} {:>10} {:>22} {:>34}",
                "field",
                "images",
                "prevalence",
                "current: t  positive",
                "fitted: t  positive  sens  spec"
            );
            for f in &fields {
                let fitted = f.fitted.as_ref().map_or("one class only".to_string(), |a| {
                    format!(
                        "{:.4} {:>8.3} {:.2} [{:.2}-{:.2}] {:.2} [{:.2}-{:.2}]",
                        a.threshold,
                        a.predicted_positive_rate,
                        a.sensitivity.value,
                        a.sensitivity.low,
                        a.sensitivity.high,
                        a.specificity.value,
                        a.specificity.low,
                        a.specificity.high
                    )
                });
                println!(
                    "{:<24} {:>6} {:>10.3} {:>11.4} {:>9.3}  {fitted}",
                    f.field,
                    f.images,
                    f.prevalence,
                    f.current.threshold,
                    f.current.predicted_positive_rate
                );
            }
        }
    }
    let Some(out) = &args.out else {
        return Ok(ExitCode::SUCCESS);
    };
    let mut card = model.card.clone();
    for f in &fields {
        if let (Some(fitted), Some(head)) = (
            &f.fitted,
            card.label_map.heads.iter_mut().find(|h| h.name == f.field),
        ) {
            head.operating_point = Some(fitted.threshold as f32);
        }
    }
    if !card.training.is_object() {
        card.training = serde_json::json!({});
    }
    card.training["calibration"] = serde_json::json!({
        "site": args.site,
        "target": target,
        "data": args.data.file_name().map(|n| n.to_string_lossy().into_owned()),
        "at": chrono::Utc::now().to_rfc3339(),
        "fields": fields,
    });
    new_model_dir(out, "calibrated", |staging| {
        std::fs::copy(model.card.weights_path(&dir), card.weights_path(staging))?;
        Ok(card.save(staging)?)
    })?;
    eprintln!("calibrated model written to {}", out.display());
    Ok(ExitCode::SUCCESS)
}

/// Refuses a model directory that exists (checked before any work is done).
fn ensure_new(out: &Path) -> anyhow::Result<()> {
    if out.exists() {
        bail!("{} exists; choose a new model directory", out.display());
    }
    Ok(())
}

/// A new model directory at `out`: `write` fills a staging directory beside it, the model
/// there must load (shapes and one forward pass), and only then is it renamed into place, so
/// a failure leaves no half-written model directory.
fn new_model_dir(
    out: &Path,
    what: &str,
    write: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<Model> {
    ensure_new(out)?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent)?;
    let staging = tempfile::Builder::new()
        .prefix(".cxrfed-model-")
        .tempdir_in(&parent)?;
    write(staging.path())?;
    let model = Model::load(staging.path(), cxrfed_model::parse_device("cpu")?)
        .with_context(|| format!("the {what} model does not load"))?;
    std::fs::rename(staging.keep(), out)?;
    Ok(model)
}

/// The converter, shipped inside the binary so an installed node needs no source tree.
const TXRV_CONVERTER: &str = include_str!("../../../../../scripts/txrv-convert.py");

fn import(args: ImportArgs) -> anyhow::Result<ExitCode> {
    use cxrfed_model::txrv;
    ensure_new(&args.out)?;
    let work = tempfile::tempdir().context("a temporary directory")?;
    let script = work.path().join("txrv-convert.py");
    std::fs::write(&script, TXRV_CONVERTER)?;
    let converted = work.path().join("converted");
    let mut command = std::process::Command::new(&args.python);
    command
        .arg(&script)
        .arg(&args.torchxrayvision)
        .arg(&converted);
    if let Some(weights) = &args.weights {
        command.arg("--weights").arg(weights);
    }
    let status = command.status().with_context(|| {
        format!(
            "running {} (give --python or CXRFED_PYTHON a Python with torch and torchxrayvision)",
            args.python
        )
    })?;
    if !status.success() {
        bail!(
            "the TorchXRayVision converter could not read {} ({status})",
            args.torchxrayvision.display()
        );
    }
    let meta: txrv::Converted =
        serde_json::from_slice(&std::fs::read(converted.join("txrv.json"))?)
            .context("the converter's txrv.json")?;
    let tensors = cxrfed_fl::tensor::decode(&std::fs::read(converted.join("txrv.safetensors"))?)?;
    let findings = match &args.findings {
        Some(path) => Some(
            serde_json::from_slice(&std::fs::read(path)?)
                .with_context(|| format!("{}: a JSON array of finding rules", path.display()))?,
        ),
        None => None,
    };
    let model_id = args.model_id.clone().unwrap_or_else(|| {
        let name = meta.weights.clone().unwrap_or_else(|| {
            args.torchxrayvision
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        format!("txrv-{name}")
    });
    let (mut card, weights) = txrv::card_and_weights(&meta, tensors, &model_id, findings)?;
    let model = new_model_dir(&args.out, "imported", |staging| {
        let bytes = cxrfed_fl::tensor::encode(&weights)?;
        std::fs::write(card.weights_path(staging), &bytes)?;
        card.weights_sha256 = hex::encode(sha2::Sha256::digest(&bytes));
        Ok(card.save(staging)?)
    })?;
    println!(
        "imported {} ({}, {} outputs, input {} px) into {}",
        model.card.model_id,
        model.card.architecture,
        model.card.label_map.heads.len(),
        model.card.input.size,
        args.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn train(args: TrainArgs) -> anyhow::Result<ExitCode> {
    let arch = Arch::parse(&args.arch).with_context(|| {
        format!(
            "unknown architecture {:?} (tiny, resnet18, densenet121)",
            args.arch
        )
    })?;
    if !(0.0..0.9).contains(&args.validation) {
        bail!("--validation must be in [0, 0.9)");
    }
    let device = cxrfed_model::parse_device(&args.device)?;
    let input = InputSpec {
        size: args.input_size.unwrap_or(arch.default_input_size()),
        ..InputSpec::default()
    };
    let label_map = LabelMap::schema_v1();
    let data = load_data(&args.data, &label_map, &input)?;
    let (train, validation) = data.split(args.validation, args.seed);
    cxrfed_model::manual_seed(args.seed);
    let mut model = match &args.init {
        None => Model::new(arch, label_map.clone(), input, device, &args.model_id)?,
        Some(dir) => {
            let model = Model::load(dir, device)?;
            if model.card.label_map != label_map {
                bail!(
                    "--init {} has a label map other than schema v1",
                    dir.display()
                );
            }
            if model.card.architecture != arch.as_str() || model.card.input != input {
                bail!(
                    "--init {} is a {} model with input {}px; --arch/--input-size ask for {} with {}px",
                    dir.display(),
                    model.card.architecture,
                    model.card.input.size,
                    arch.as_str(),
                    input.size
                );
            }
            let mut model = model;
            model.card.model_id = args.model_id.clone();
            model.card.weights = "model.safetensors".into();
            model
        }
    };
    let config = TrainConfig {
        epochs: args.epochs,
        batch_size: args.batch_size,
        learning_rate: args.lr,
        augment: !args.no_augment,
        seed: args.seed,
        ..TrainConfig::default()
    };
    eprintln!(
        "training {} on {} images ({} validation) on {} for {} epochs",
        arch.as_str(),
        train.len(),
        validation.len(),
        cxrfed_model::device_name(device),
        config.epochs
    );
    let reports = cxrfed_model::train::fit(
        &mut model,
        &train,
        Some(&validation),
        &config,
        &mut |r| {
            let summary = r.validation.as_ref().map(|m| {
            let f1 = |h: &str| m.head(h).and_then(|x| x.macro_f1).unwrap_or(f64::NAN);
            let mae = m.head("cardiothoracic_ratio").and_then(|x| x.mae).unwrap_or(f64::NAN);
            format!(
                "quality f1 {:.3} cardiac f1 {:.3} cp-angle f1 {:.3} diaphragm f1 {:.3} severity f1 {:.3} ctr mae {:.4}",
                f1("image_quality"),
                f1("cardiac_contour"),
                f1("costophrenic_angle"),
                f1("diaphragm_position"),
                f1("opacity_severity"),
                mae
            )
        });
            eprintln!(
                "epoch {:>3}  loss {:.4}  {:.0}s  {}",
                r.epoch,
                r.train_loss,
                r.seconds,
                summary.unwrap_or_default()
            );
        },
    )?;
    let last = reports.last().and_then(|r| r.validation.clone());
    let source: serde_json::Value = std::fs::read(args.data.join("labels.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let synthetic = source["generator"] == "cxrfed-phantom";
    model.card.training = serde_json::json!({
        "data": args.data.display().to_string(),
        "initialised_from": args.init.as_ref().map(|d| d.display().to_string()),
        "data_kind": if synthetic { "synthetic phantoms (cxrfed-phantom)" } else { "labelled images" },
        "phantom_sites": source["sites"],
        "phantom_seed": source["seed"],
        "images": train.len(),
        "validation_images": validation.len(),
        "config": config,
        "device": cxrfed_model::device_name(device),
        "epochs": reports.iter().map(|r| serde_json::json!({"epoch": r.epoch, "loss": r.train_loss, "seconds": r.seconds})).collect::<Vec<_>>(),
    });
    model.card.metrics = serde_json::json!({ "validation": last });
    model.card.created_at = chrono::Utc::now().to_rfc3339();
    model.card.intended_use = if synthetic {
        "Trained on synthetic phantoms only. Research use only; not a diagnostic device and not for clinical use.".into()
    } else {
        "Research use only; not a diagnostic device and not for clinical use.".into()
    };
    model.save(&args.out)?;
    println!("saved {} to {}", model.card.model_id, args.out.display());
    if let Some(metrics) = last {
        print!("{}", metrics.table());
    }
    Ok(ExitCode::SUCCESS)
}

fn eval(args: EvalArgs) -> anyhow::Result<ExitCode> {
    let dir = match args.model {
        Some(dir) => dir,
        None => bundled_model_dir()?,
    };
    let model = Model::load(&dir, cxrfed_model::parse_device(&args.device)?)?;
    let data = load_data(&args.data, &model.card.label_map, &model.card.input)?;
    let metrics = cxrfed_model::train::evaluate_model(&model, &data)?;
    match args.format {
        OutputFormat::Table => {
            println!(
                "model {} on {} ({} images)",
                model.card.model_id,
                args.data.display(),
                data.len()
            );
            print!("{}", metrics.table());
        }
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&metrics)?),
    }
    Ok(ExitCode::SUCCESS)
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
