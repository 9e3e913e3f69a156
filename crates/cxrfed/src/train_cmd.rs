//! Federated fine-tuning from the study admin's seat: `cxrfed job start|list|status|cancel`
//! and the model registry, `cxrfed registry list|show|import|promote`. The first generation's
//! spellings (`train`, `jobs`, `models`) still work, hidden, for one version.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use cxrfed_proto::Label;
use cxrfed_proto::v1 as pb;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::client::{Credentials, status_error};
use crate::coordinator_cmd::client;
use crate::stats_cmd::print_table;

#[derive(Debug, Args)]
pub struct Target {
    /// Coordinator URL [default: https://127.0.0.1:50061].
    #[arg(long, env = "CXRFED_COORDINATOR")]
    coordinator: Option<String>,
    #[command(flatten)]
    credentials: Credentials,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    target: Target,
    /// The job file (TOML): base, heads, trainable, algorithm, rounds, local_epochs,
    /// batch_size, learning_rate, sites or min_sites, round_deadline_secs, clip,
    /// noise_multiplier.
    #[arg(long)]
    job: PathBuf,
    /// Return once the job is accepted instead of following it to the end.
    #[arg(long)]
    detach: bool,
    /// Hours the signed order stays valid: sites refuse its rounds after that [max 720].
    #[arg(long, default_value_t = 168)]
    valid_hours: u64,
}

#[derive(Debug, Args)]
pub struct JobsArgs {
    #[command(flatten)]
    target: Target,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Launch a federated fine-tuning job from a job file (study admin) and follow its rounds.
    Start(TrainArgs),
    /// The coordinator's training jobs.
    List(JobsArgs),
    /// A job's round log: per round, per site, per field; --follow shows live progress.
    Status(JobStatusArgs),
    /// Cancel a running job (nothing more is committed).
    Cancel(JobIdArgs),
}

#[derive(Debug, Args)]
pub struct JobStatusArgs {
    job_id: String,
    #[command(flatten)]
    target: Target,
    /// Live progress bars until the job ends.
    #[arg(long)]
    follow: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct JobIdArgs {
    job_id: String,
    #[command(flatten)]
    target: Target,
}

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Every model version in the registry, with its lineage.
    List(JobsArgs),
    /// One version: lineage, sites and samples, DP parameters, metrics, sha256.
    Show(ModelShowArgs),
    /// Promote a version under a signed order: every node verifies it, receives the model
    /// over its link, switches its inference to it and re-extracts its records, keeping each
    /// record's previous findings (study admin). Promoting an earlier version again rolls the
    /// study back: sites restore that model's findings from their history.
    Promote(ModelShowArgs),
    /// Add a model directory (card.json + safetensors weights, e.g. from `cxrfed model train`)
    /// to the registry, so jobs can start from it (study admin).
    Import(ModelImportArgs),
}

#[derive(Debug, Args)]
pub struct ModelImportArgs {
    /// The model directory.
    dir: PathBuf,
    /// The registry version [default: the card's model_id].
    #[arg(long)]
    version: Option<String>,
    #[command(flatten)]
    target: Target,
}

#[derive(Debug, Args)]
pub struct ModelShowArgs {
    version: String,
    #[command(flatten)]
    target: Target,
    #[arg(long)]
    json: bool,
}

/// The study admin's key and certificate, and the study they are of.
fn study_signer(target: &Target) -> anyhow::Result<(cxrfed_auth::signing::Signer, String)> {
    study_signer_of(&target.credentials)
}

/// The study admin's signer from these credentials (the console signs with it too).
pub(crate) fn study_signer_of(
    credentials: &crate::client::Credentials,
) -> anyhow::Result<(cxrfed_auth::signing::Signer, String)> {
    let signer = credentials.signer()?;
    let me = cxrfed_auth::Identity::from_cert_der(signer.certificate())?;
    if me.role != cxrfed_auth::Role::StudyAdmin {
        anyhow::bail!(
            "orders are signed by a study admin; {} is a {} certificate (issue one with `cxrfed certs issue --role study-admin`)",
            me.uri(),
            me.role
        );
    }
    Ok((signer, me.study))
}

pub async fn train(args: TrainArgs) -> anyhow::Result<ExitCode> {
    let spec_toml = std::fs::read_to_string(&args.job)
        .with_context(|| format!("reading {}", args.job.display()))?;
    let (signer, study) = study_signer(&args.target)?;
    let mut c = client(args.target.coordinator.as_deref(), &args.target.credentials).await?;
    let job = start_job(&mut c, &signer, &study, &spec_toml, args.valid_hours).await?;
    eprintln!(
        "job {} started: {} rounds of {} from {}",
        job.job_id,
        job.rounds,
        job.algorithm().label(),
        job.base_model
    );
    if args.detach {
        println!("{}", job.job_id);
        return Ok(ExitCode::SUCCESS);
    }
    follow(&mut c, &job.job_id).await
}

type Client = cxrfed_proto::v1::coordinator_service_client::CoordinatorServiceClient<
    tonic::transport::Channel,
>;

/// Parses a job file, signs it as a JOB order over the base model's weights as the registry
/// lists them (valid `valid_hours`, at most 720), and starts it.
pub(crate) async fn start_job(
    c: &mut Client,
    signer: &cxrfed_auth::signing::Signer,
    study: &str,
    spec_toml: &str,
    valid_hours: u64,
) -> anyhow::Result<pb::JobInfo> {
    let spec = cxrfed_fl::JobSpec::parse(spec_toml).map_err(|e| anyhow::anyhow!(e))?;
    let base = c
        .get_model(pb::GetModelRequest {
            version: spec.base.clone(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let order = cxrfed_server::order::job(
        study,
        &spec,
        &base.sha256,
        Duration::from_secs(valid_hours.min(720) * 3600),
    )?;
    Ok(c.start_job(pb::StartJobRequest {
        spec_toml: String::new(),
        order: Some(cxrfed_server::order::sign(signer, &order)?),
    })
    .await
    .map_err(status_error)?
    .into_inner())
}

/// Signs a PROMOTE order for `version` (its sha256 as the registry lists it, valid 7 days)
/// and sends it.
pub(crate) async fn promote(
    c: &mut Client,
    signer: &cxrfed_auth::signing::Signer,
    study: &str,
    version: &str,
) -> anyhow::Result<pb::PromoteModelResponse> {
    let model = c
        .get_model(pb::GetModelRequest {
            version: version.to_string(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let order = cxrfed_server::order::promotion(
        study,
        &model.version,
        &model.sha256,
        Duration::from_secs(7 * 86_400),
    )?;
    Ok(c.promote_model(pb::PromoteModelRequest {
        version: model.version.clone(),
        order: Some(cxrfed_server::order::sign(signer, &order)?),
    })
    .await
    .map_err(status_error)?
    .into_inner())
}

async fn get(c: &mut Client, job_id: &str) -> anyhow::Result<pb::JobInfo> {
    Ok(c.get_job(pb::GetJobRequest {
        job_id: job_id.to_string(),
    })
    .await
    .map_err(status_error)?
    .into_inner())
}

/// Live progress (a bar for the rounds, a line per site) until the job ends, then the
/// summary.
async fn follow(c: &mut Client, job_id: &str) -> anyhow::Result<ExitCode> {
    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let rounds = bars.add(ProgressBar::new(0).with_style(style));
    rounds.set_prefix("rounds");
    let mut sites: BTreeMap<String, ProgressBar> = BTreeMap::new();
    let job = loop {
        let job = get(c, job_id).await?;
        rounds.set_length(u64::from(job.rounds));
        rounds.set_position(u64::from(job.completed_rounds));
        rounds.set_message(format!("{} ({})", job.state().label(), job.latest_model));
        if let Some(last) = job.round_log.last() {
            for s in &last.sites {
                let bar = sites.entry(s.site.clone()).or_insert_with(|| {
                    let bar = bars.add(ProgressBar::new_spinner());
                    bar.set_prefix(s.site.clone());
                    bar.set_style(
                        ProgressStyle::with_template("{prefix:>12} {spinner} {msg}")
                            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                    );
                    bar
                });
                bar.set_message(format!(
                    "round {} attempt {}: {}{}",
                    last.round,
                    last.attempt,
                    s.status().label(),
                    if s.samples > 0 {
                        format!(" (noisy samples {}, ε {:.3})", s.samples, s.epsilon_charged)
                    } else {
                        String::new()
                    }
                ));
                bar.tick();
            }
        }
        if job.state() != pb::JobState::Running {
            break job;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    rounds.finish();
    for bar in sites.values() {
        bar.finish();
    }
    print_summary(&job)?;
    Ok(if job.state() == pb::JobState::Completed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The metric columns shown: the main one per head (accuracy, or mae for regressions).
fn headline_metrics(job: &pb::JobInfo) -> Vec<String> {
    let mut keys: Vec<String> = job
        .round_log
        .iter()
        .flat_map(|r| r.pooled_metrics.keys().cloned())
        .filter(|k| k.ends_with(".accuracy") || k.ends_with(".mae"))
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

fn print_summary(job: &pb::JobInfo) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "job {}: {} — {} of {} rounds, {} from {} to {}{}",
        job.job_id,
        job.state,
        job.completed_rounds,
        job.rounds,
        job.algorithm,
        job.base_model,
        job.latest_model,
        if job.reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", job.reason)
        }
    )?;
    if job.dp_epsilon > 0.0 {
        writeln!(
            out,
            "DP-FedAvg: site-level epsilon {:.3} at delta {:e}",
            job.dp_epsilon, job.dp_delta
        )?;
    }
    let metrics = headline_metrics(job);
    let mut header: Vec<String> = [
        "round",
        "state",
        "site",
        "status",
        "samples",
        "held out",
        "ε charged",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    header.extend(metrics.iter().cloned());
    let fmt = |v: Option<&f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.3}"));
    let mut body = Vec::new();
    for r in &job.round_log {
        let round = if r.state() == pb::RoundState::Evaluation {
            "final".to_string()
        } else {
            format!("{}.{}", r.round, r.attempt)
        };
        let mut pooled = vec![
            round.clone(),
            r.state().label(),
            "(pooled)".into(),
            format!("{:.1}s", r.seconds),
            r.sites.iter().map(|s| s.samples).sum::<u64>().to_string(),
            r.sites
                .iter()
                .map(|s| s.eval_samples)
                .sum::<u64>()
                .to_string(),
            "-".into(),
        ];
        pooled.extend(metrics.iter().map(|m| fmt(r.pooled_metrics.get(m))));
        body.push(pooled);
        for s in &r.sites {
            let mut row = vec![
                String::new(),
                String::new(),
                s.site.clone(),
                if s.reason.is_empty() {
                    s.status().label()
                } else {
                    format!("{}: {}", s.status().label(), s.reason)
                },
                s.samples.to_string(),
                s.eval_samples.to_string(),
                if s.epsilon_charged > 0.0 {
                    format!("{:.3}", s.epsilon_charged)
                } else {
                    "-".into()
                },
            ];
            // A site reports noisy counts: "correct/total" under each pooled accuracy.
            row.extend(metrics.iter().map(|m| {
                let head = m.strip_suffix(".accuracy").unwrap_or(m);
                match (
                    s.metrics.get(&format!("{head}.correct")),
                    s.metrics.get(&format!("{head}.total")),
                ) {
                    (Some(c), Some(t)) => format!("{c:.0}/{t:.0}"),
                    _ => fmt(s.metrics.get(m)),
                }
            }));
            body.push(row);
        }
    }
    writeln!(
        out,
        "held-out metrics of the model entering each round (final: the last model), pooled from the sites' noisy counts (DP releases; samples are noisy too):"
    )?;
    print_table(&mut out, &header, &body)?;
    Ok(())
}

pub async fn jobs(args: JobsArgs) -> anyhow::Result<ExitCode> {
    let mut c = client(args.target.coordinator.as_deref(), &args.target.credentials).await?;
    let jobs = c
        .list_jobs(pb::ListJobsRequest {})
        .await
        .map_err(status_error)?
        .into_inner()
        .jobs;
    let mut out = std::io::stdout().lock();
    if args.json {
        let doc: Vec<serde_json::Value> = jobs
            .iter()
            .map(|j| {
                serde_json::json!({
                    "job_id": j.job_id, "state": j.state().label(), "reason": j.reason,
                    "rounds": j.rounds, "completed_rounds": j.completed_rounds,
                    "algorithm": j.algorithm().label(), "base_model": j.base_model,
                    "latest_model": j.latest_model, "created_at": j.created_at,
                    "created_by": j.created_by, "dp_epsilon": j.dp_epsilon,
                })
            })
            .collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let header: Vec<String> = [
        "job",
        "state",
        "rounds",
        "algorithm",
        "base",
        "latest",
        "created",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let body: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                j.job_id.clone(),
                j.state().label(),
                format!("{}/{}", j.completed_rounds, j.rounds),
                j.algorithm().label(),
                j.base_model.clone(),
                j.latest_model.clone(),
                j.created_at.clone(),
            ]
        })
        .collect();
    print_table(&mut out, &header, &body)?;
    Ok(ExitCode::SUCCESS)
}

pub async fn job(command: JobCommand) -> anyhow::Result<ExitCode> {
    match command {
        JobCommand::Start(args) => train(args).await,
        JobCommand::List(args) => jobs(args).await,
        JobCommand::Status(args) => {
            let mut c =
                client(args.target.coordinator.as_deref(), &args.target.credentials).await?;
            if args.follow {
                return follow(&mut c, &args.job_id).await;
            }
            let job = get(&mut c, &args.job_id).await?;
            if args.json {
                let spec: serde_json::Value =
                    serde_json::from_str(&job.spec_json).unwrap_or_default();
                let rounds: Vec<serde_json::Value> = job
                    .round_log
                    .iter()
                    .map(|r| {
                        serde_json::json!({
                            "round": r.round, "attempt": r.attempt, "state": r.state().label(),
                            "reason": r.reason, "model_version": r.model_version,
                            "pooled_metrics": r.pooled_metrics, "seconds": r.seconds,
                            "bytes_down": r.bytes_down, "bytes_up": r.bytes_up,
                            "sites": r.sites.iter().map(|s| serde_json::json!({
                                "site": s.site, "status": s.status().label(), "reason": s.reason,
                                "samples": s.samples, "eval_samples": s.eval_samples,
                                "train_seconds": s.train_seconds,
                                "metrics": s.metrics, "update_bytes": s.update_bytes,
                                "refused_rule": s.refused_rule,
                                "epsilon_charged": s.epsilon_charged,
                            })).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                let doc = serde_json::json!({
                    "job_id": job.job_id, "state": job.state().label(), "reason": job.reason,
                    "rounds": job.rounds, "completed_rounds": job.completed_rounds,
                    "algorithm": job.algorithm().label(), "base_model": job.base_model,
                    "latest_model": job.latest_model, "dp_epsilon": job.dp_epsilon,
                    "dp_delta": job.dp_delta, "spec": spec, "round_log": rounds,
                });
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                print_summary(&job)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        JobCommand::Cancel(args) => {
            let mut c =
                client(args.target.coordinator.as_deref(), &args.target.credentials).await?;
            let job = c
                .cancel_job(pb::GetJobRequest {
                    job_id: args.job_id,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("job {}: {}", job.job_id, job.state);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn model_json(m: &pb::ModelVersion) -> serde_json::Value {
    serde_json::json!({
        "version": m.version, "parent": m.parent, "job_id": m.job_id, "round": m.round,
        "sha256": m.sha256, "algorithm": m.algorithm, "sites": m.sites, "samples": m.samples,
        "metrics": m.metrics, "dp_epsilon": m.dp_epsilon, "dp_delta": m.dp_delta,
        "created_at": m.created_at, "size_bytes": m.size_bytes, "model_id": m.model_id,
        "heads": m.heads, "promoted_at": m.promoted_at, "running_at": m.running_at,
    })
}

pub async fn models(command: ModelsCommand) -> anyhow::Result<ExitCode> {
    match command {
        ModelsCommand::List(args) => {
            let mut c =
                client(args.target.coordinator.as_deref(), &args.target.credentials).await?;
            let models = c
                .list_models(pb::ListModelsRequest {})
                .await
                .map_err(status_error)?
                .into_inner()
                .models;
            let mut out = std::io::stdout().lock();
            if args.json {
                let doc: Vec<_> = models.iter().map(model_json).collect();
                writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
                return Ok(ExitCode::SUCCESS);
            }
            let header: Vec<String> = [
                "version",
                "parent",
                "job",
                "round",
                "algorithm",
                "sites",
                "samples",
                "sha256",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let body: Vec<Vec<String>> = models
                .iter()
                .map(|m| {
                    vec![
                        m.version.clone(),
                        m.parent.clone(),
                        m.job_id.clone(),
                        m.round.to_string(),
                        m.algorithm.clone(),
                        m.sites.join(","),
                        m.samples.iter().sum::<u64>().to_string(),
                        m.sha256.get(..16).unwrap_or_default().to_string(),
                        m.promoted_at.clone(),
                        m.running_at.join(","),
                    ]
                })
                .collect();
            print_table(&mut out, &header, &body)?;
            Ok(ExitCode::SUCCESS)
        }
        ModelsCommand::Show(args) => {
            let mut c =
                client(args.target.coordinator.as_deref(), &args.target.credentials).await?;
            let m = c
                .get_model(pb::GetModelRequest {
                    version: args.version,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("{}", serde_json::to_string_pretty(&model_json(&m))?);
            Ok(ExitCode::SUCCESS)
        }
        ModelsCommand::Import(args) => {
            let card_path = args.dir.join("card.json");
            let card_json = std::fs::read_to_string(&card_path)
                .with_context(|| format!("reading {}", card_path.display()))?;
            let card: serde_json::Value = serde_json::from_str(&card_json)
                .with_context(|| format!("{} is not JSON", card_path.display()))?;
            let weights_path = args
                .dir
                .join(card["weights"].as_str().unwrap_or("model.safetensors"));
            let weights = std::fs::read(&weights_path)
                .with_context(|| format!("reading {}", weights_path.display()))?;
            let version = args
                .version
                .unwrap_or_else(|| card["model_id"].as_str().unwrap_or_default().to_string());
            let mut messages = vec![pb::ImportModelChunk {
                version,
                card_json,
                data: Vec::new(),
            }];
            for piece in weights.chunks(cxrfed_proto::CHUNK_BYTES) {
                messages.push(pb::ImportModelChunk {
                    data: piece.to_vec(),
                    ..Default::default()
                });
            }
            let mut c =
                client(args.target.coordinator.as_deref(), &args.target.credentials).await?;
            let m = c
                .import_model(tokio_stream::iter(messages))
                .await
                .map_err(status_error)?
                .into_inner();
            println!(
                "{} imported ({} bytes, sha256 {}, heads {})",
                m.version,
                m.size_bytes,
                m.sha256,
                m.heads.join(", ")
            );
            Ok(ExitCode::SUCCESS)
        }
        ModelsCommand::Promote(args) => {
            let (signer, study) = study_signer(&args.target)?;
            let mut c =
                client(args.target.coordinator.as_deref(), &args.target.credentials).await?;
            let promoted = promote(&mut c, &signer, &study, &args.version).await?;
            let m = promoted.model.unwrap_or_default();
            if args.json {
                let mut doc = model_json(&m);
                doc["sent_to"] = serde_json::json!(promoted.sent_to);
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                println!(
                    "{} promoted (sha256 {}); sent to {} connected site(s): {}. Sites switch when it is installed and re-extract their records in the background; sites connecting later receive it then.",
                    m.version,
                    m.sha256,
                    promoted.sent_to.len(),
                    promoted.sent_to.join(", ")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
