//! The coordinator's pages: sites and their links, federated DP queries (a researcher signs
//! them with their own key, here as in the CLI), jobs with live per-round charts, the
//! registry with its lineage graph, and promotion (a study admin signs the order).

use std::collections::BTreeMap;

use axum::Router;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use cxrfed_proto::Label;
use cxrfed_proto::v1 as pb;
use cxrfed_proto::v1::coordinator_service_client::CoordinatorServiceClient;
use maud::{Markup, PreEscaped, html};
use plotters::prelude::*;
use serde::Deserialize;
use tonic::transport::Channel;

use super::node::{DpForm, dp_result, fragment_error, mechanism_of, parse_number};
use super::page::{frame, grpc_error, local_error, table};
use super::security::Csrf;
use super::{Backend, Shared, Ui};

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/", get(sites_page))
        .route("/sites/live", get(sites_live))
        .route("/query", get(query_page).post(query))
        .route("/jobs", get(jobs_page).post(start_job))
        .route("/jobs/{id}", get(job_page))
        .route("/jobs/{id}/live", get(job_live))
        .route("/jobs/{id}/cancel", post(cancel_job))
        .route("/models", get(models_page))
        .route("/models/{version}/promote", post(promote))
}

fn coordinator(ui: &Ui) -> CoordinatorServiceClient<Channel> {
    match &ui.backend {
        Backend::Coordinator(c) => c.clone(),
        Backend::Node(_) => unreachable!("coordinator routes are mounted for a coordinator only"),
    }
}

// ---- sites ----

async fn sites_fragment(ui: &Ui) -> Result<Markup, tonic::Status> {
    let sites = coordinator(ui)
        .sites(pb::SitesRequest {})
        .await?
        .into_inner()
        .sites;
    Ok(html! {
        div id="sites" hx-get="/sites/live" hx-trigger="every 5s" hx-swap="outerHTML" {
            (table("Sites of the study (live)", &["site", "link", "last seen", "connected since", "version", "model", "records"].map(String::from),
                &sites.iter().map(|s| vec![
                    s.site.clone(),
                    if s.connected { "connected".into() } else { "not connected".into() },
                    s.last_seen.clone(), s.connected_since.clone(), s.version.clone(), s.model_id.clone(),
                    // 0: the site publishes no count, or this identity may not see it.
                    if s.record_count == 0 { "-".into() } else { s.record_count.to_string() },
                ]).collect::<Vec<_>>()))
        }
    })
}

async fn sites_page(
    State(ui): State<Shared>,
    Extension(csrf): Extension<Csrf>,
    headers: HeaderMap,
) -> Response {
    match sites_fragment(&ui).await {
        Ok(body) => frame(&ui, &csrf, "/", "Sites", body),
        Err(s) => grpc_error(&ui, &csrf, &headers, "/", "Sites", &s),
    }
}

async fn sites_live(State(ui): State<Shared>) -> Response {
    match sites_fragment(&ui).await {
        Ok(body) => Html(body.into_string()).into_response(),
        Err(s) => fragment_error(&s),
    }
}

// ---- federated query ----

async fn query_page(State(ui): State<Shared>, Extension(csrf): Extension<Csrf>) -> Response {
    let body = html! {
        p { "Each site answers with its own differentially private release, charged to your budget there; the coordinator pools the noisy answers. The query is signed with your key before it leaves this machine." }
        form hx-post="/query" hx-target="#query-result" class="stack" {
            label for="fq" { "Query (count, histogram, crosstab over public categories; sum, mean)" }
            textarea id="fq" name="query" rows="3" cols="70" spellcheck="false" { "histogram image_quality" }
            label { "ε each site charges " input name="epsilon" type="number" step="any" min="0" value="0.5" required; }
            label { "δ " input name="delta" type="number" step="any" min="0" value="0"; }
            label { "Mechanism " select name="mechanism" { option value="laplace" { "Laplace (pure ε)" } option value="gaussian" { "Gaussian (ε, δ)" } } }
            label { "Sites (comma-separated; empty: every connected site) " input name="sites" size="40"; }
            button type="submit" { "Sign and send" }
        }
        div id="query-result" aria-live="polite" {}
    };
    frame(&ui, &csrf, "/query", "Federated query", body)
}

async fn query(State(ui): State<Shared>, axum::Form(form): axum::Form<DpForm>) -> Response {
    let (epsilon, delta) = match (
        parse_number(&form.epsilon, "ε"),
        parse_number(&form.delta, "δ"),
    ) {
        (Ok(e), Ok(d)) => (e, d),
        (Err(m), _) | (_, Err(m)) => {
            return local_error(StatusCode::BAD_REQUEST, "Not a number", &m);
        }
    };
    let signed = ui.credentials.signer().and_then(|signer| {
        let me = cxrfed_auth::Identity::from_cert_der(signer.certificate())?;
        crate::coordinator_cmd::sign_query(
            &signer,
            &me.study,
            &crate::coordinator_cmd::QuerySpec {
                query: form.query.clone(),
                epsilon,
                delta,
                mechanism: mechanism_of(&form.mechanism),
                sites: form
                    .sites
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect(),
                timeout_secs: 30,
            },
        )
    });
    let signed = match signed {
        Ok(s) => s,
        Err(e) => {
            return local_error(
                StatusCode::BAD_REQUEST,
                "The query cannot be signed",
                &format!("{e:#}"),
            );
        }
    };
    let r = match coordinator(&ui)
        .query(pb::FederatedQueryRequest {
            signed: Some(signed),
            min_sites: 1,
            timeout_ms: 30_000,
        })
        .await
    {
        Ok(r) => r.into_inner(),
        Err(s) => return fragment_error(&s),
    };
    let body = html! {
        p data-testid="federated-result" { (r.statistic) " pooled from " (r.answered) " site(s); values within ± the bound with probability " (r.confidence) "; counts below " (r.suppress_below) " withheld. Audit entry " (r.audit_seq) "." }
        @for note in &r.notes { p class="muted" { (note) } }
        (dp_result("Pooled release", &r.query, &r.label_columns, &r.value_columns, &r.rows))
        (table("Sites", &["site", "status", "ε charged", "reason"].map(String::from),
            &r.sites.iter().map(|s| vec![
                s.site.clone(), s.status().label(), format!("{:.4}", s.epsilon), s.reason.clone(),
            ]).collect::<Vec<_>>()))
    };
    Html(body.into_string()).into_response()
}

// ---- jobs ----

const EXAMPLE_JOB: &str = r#"# A federated fine-tuning job (cxrfed-fl JobSpec; `base` defaults to the bundled model).
# The console signs it as a JOB order with your study-admin key; every site checks it
# against its own training policy before it trains.
name = "heads fine-tune"
trainable = "heads"
algorithm = "fedavg"
rounds = 2
min_sites = 2
"#;

async fn jobs_page(
    State(ui): State<Shared>,
    Extension(csrf): Extension<Csrf>,
    headers: HeaderMap,
) -> Response {
    let jobs = match coordinator(&ui).list_jobs(pb::ListJobsRequest {}).await {
        Ok(r) => r.into_inner().jobs,
        Err(s) => return grpc_error(&ui, &csrf, &headers, "/jobs", "Jobs", &s),
    };
    let body = html! {
        @if jobs.is_empty() { p { "No jobs yet." } } @else {
            div class="table-wrap" tabindex="0" role="region" aria-label="Jobs" {
                table {
                    caption { "Jobs" }
                    thead { tr { th scope="col" { "job" } th scope="col" { "state" } th scope="col" { "rounds" } th scope="col" { "algorithm" } th scope="col" { "base" } th scope="col" { "latest model" } th scope="col" { "created" } } }
                    tbody {
                        @for j in &jobs {
                            tr {
                                td { a href={ "/jobs/" (j.job_id) } { (j.job_id) } }
                                td { (j.state().label()) }
                                td { (j.completed_rounds) " / " (j.rounds) }
                                td { (j.algorithm().label()) }
                                td { (j.base_model) }
                                td { (j.latest_model) }
                                td { (j.created_at) }
                            }
                        }
                    }
                }
            }
        }
        h2 { "Start a job" }
        form hx-post="/jobs" hx-target="#start-result" class="stack" {
            label for="spec" { "Job file (TOML)" }
            textarea id="spec" name="spec" rows="10" cols="70" spellcheck="false" { (EXAMPLE_JOB) }
            label { "Order valid for (hours, ≤ 720) " input name="valid_hours" type="number" min="1" max="720" value="24"; }
            button type="submit" { "Sign and start" }
        }
        div id="start-result" aria-live="polite" {}
    };
    frame(&ui, &csrf, "/jobs", "Jobs", body)
}

#[derive(Deserialize)]
struct JobForm {
    spec: String,
    #[serde(default)]
    valid_hours: String,
}

async fn start_job(State(ui): State<Shared>, axum::Form(form): axum::Form<JobForm>) -> Response {
    let hours = form.valid_hours.trim().parse::<u64>().unwrap_or(24);
    let outcome = async {
        let (signer, study) = crate::train_cmd::study_signer_of(&ui.credentials)?;
        crate::train_cmd::start_job(&mut coordinator(&ui), &signer, &study, &form.spec, hours).await
    }
    .await;
    match outcome {
        Ok(job) => {
            let mut response = Html(
                html! { p role="status" { "Started " a href={ "/jobs/" (job.job_id) } { (job.job_id) } "." } }
                    .into_string(),
            )
            .into_response();
            // Go and watch it.
            if let Ok(v) = axum::http::HeaderValue::from_str(&format!("/jobs/{}", job.job_id)) {
                response.headers_mut().insert("hx-redirect", v);
            }
            response
        }
        Err(e) => local_error(
            StatusCode::BAD_REQUEST,
            "The job was not started",
            &format!("{e:#}"),
        ),
    }
}

/// Per-round charts: pooled metrics (lines), sites answered and dropped (bars), and round
/// duration (bars).
fn round_charts(job: &pb::JobInfo) -> anyhow::Result<String> {
    crate::plot::register_font()?;
    let rounds: Vec<&pb::RoundInfo> = job.round_log.iter().collect();
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (960, 720)).into_drawing_area();
        root.fill(&WHITE)?;
        let areas = root.split_evenly((3, 1));
        let n = rounds.len().max(1) as f64;
        // Pooled metrics, one line per metric.
        let mut series: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
        for (i, r) in rounds.iter().enumerate() {
            // Rates only; the pooled sample counts (`.n`) are in the table.
            for (k, v) in r.pooled_metrics.iter().filter(|(k, _)| !k.ends_with(".n")) {
                series.entry(k.as_str()).or_default().push((i as f64, *v));
            }
        }
        // Attempts are labelled by round ("2", "2 (retry 2)", "eval").
        let names: Vec<String> = rounds
            .iter()
            .map(|r| match (r.state(), r.attempt) {
                (pb::RoundState::Evaluation, _) => "eval".to_string(),
                (_, a) if a > 1 => format!("{} (attempt {a})", r.round),
                _ => r.round.to_string(),
            })
            .collect();
        let x_label = |x: &f64| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < names.len() {
                names[i as usize].clone()
            } else {
                String::new()
            }
        };
        let ticks = rounds.len().max(1);
        let top = series
            .values()
            .flatten()
            .map(|p| p.1)
            .fold(1.0f64, f64::max);
        let mut chart = ChartBuilder::on(&areas[0])
            .caption(
                "pooled metrics (noisy) by round attempt",
                ("sans-serif", 16),
            )
            .margin(8)
            .x_label_area_size(24)
            .y_label_area_size(48)
            .build_cartesian_2d(-0.5f64..(n - 0.5), 0f64..top * 1.05)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(ticks)
            .x_label_formatter(&x_label)
            .draw()?;
        for (j, (name, points)) in series.iter().enumerate() {
            let color = Palette99::pick(j).to_rgba();
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
                .label(name.to_string())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 12, y)], color));
        }
        if !series.is_empty() {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()?;
        }
        // Sites answered / dropped.
        let answered: Vec<(usize, usize, usize)> = rounds
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let ok = r
                    .sites
                    .iter()
                    .filter(|s| s.status() == pb::SiteRoundStatus::Reported)
                    .count();
                let dropped = r
                    .sites
                    .iter()
                    .filter(|s| {
                        matches!(
                            s.status(),
                            pb::SiteRoundStatus::Dropped | pb::SiteRoundStatus::Failed
                        )
                    })
                    .count();
                (i, ok, dropped)
            })
            .collect();
        let most = answered
            .iter()
            .map(|(_, a, d)| a + d)
            .max()
            .unwrap_or(1)
            .max(1);
        let mut chart = ChartBuilder::on(&areas[1])
            .caption(
                "sites reported (green) and dropped or failed (red)",
                ("sans-serif", 16),
            )
            .margin(8)
            .x_label_area_size(24)
            .y_label_area_size(48)
            .build_cartesian_2d(-0.5f64..(n - 0.5), 0f64..most as f64 + 0.5)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(ticks)
            .x_label_formatter(&x_label)
            .draw()?;
        chart.draw_series(answered.iter().map(|&(i, ok, _)| {
            Rectangle::new(
                [(i as f64 - 0.3, 0.0), (i as f64 + 0.3, ok as f64)],
                GREEN.mix(0.7).filled(),
            )
        }))?;
        chart.draw_series(answered.iter().map(|&(i, ok, dropped)| {
            Rectangle::new(
                [
                    (i as f64 - 0.3, ok as f64),
                    (i as f64 + 0.3, (ok + dropped) as f64),
                ],
                RED.mix(0.7).filled(),
            )
        }))?;
        // Duration.
        let longest = rounds.iter().map(|r| r.seconds).fold(1.0f64, f64::max);
        let mut chart = ChartBuilder::on(&areas[2])
            .caption("round duration (s)", ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(24)
            .y_label_area_size(48)
            .build_cartesian_2d(-0.5f64..(n - 0.5), 0f64..longest * 1.05)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(ticks)
            .x_label_formatter(&x_label)
            .draw()?;
        chart.draw_series(rounds.iter().enumerate().map(|(i, r)| {
            Rectangle::new(
                [(i as f64 - 0.3, 0.0), (i as f64 + 0.3, r.seconds)],
                BLUE.mix(0.6).filled(),
            )
        }))?;
        root.present()?;
    }
    Ok(out)
}

fn job_fragment(job: &pb::JobInfo) -> Markup {
    let running = job.state() == pb::JobState::Running;
    let charts = round_charts(job).map(|svg| {
        svg.replacen(
            "<svg ",
            "<svg role=\"img\" aria-label=\"per-round charts: pooled metrics, sites reported and dropped, round duration\" ",
            1,
        )
    });
    html! {
        div id="job" hx-get=[running.then(|| format!("/jobs/{}/live", job.job_id))] hx-trigger=[running.then_some("every 2s")] hx-swap="outerHTML" {
            dl class="facts" {
                dt { "State" } dd data-testid="job-state" { (job.state().label()) @if !job.reason.is_empty() { ": " (job.reason) } }
                dt { "Rounds" } dd data-testid="job-rounds" { (job.completed_rounds) " / " (job.rounds) }
                dt { "Algorithm" } dd { (job.algorithm().label()) }
                dt { "Base → latest" } dd { (job.base_model) " → " (job.latest_model) }
                @if job.dp_epsilon > 0.0 { dt { "DP-FedAvg" } dd { "ε " (format!("{:.3}", job.dp_epsilon)) " at δ " (format!("{:.1e}", job.dp_delta)) } }
                dt { "Created" } dd { (job.created_at) " by " (job.created_by) }
            }
            @if let Ok(svg) = charts { @if !job.round_log.is_empty() { figure data-testid="round-charts" { (PreEscaped(svg)) } } }
            div class="table-wrap" tabindex="0" role="region" aria-label="Round log" {
                table data-testid="rounds" {
                    caption { "Round log" }
                    thead { tr { th scope="col" { "round" } th scope="col" { "attempt" } th scope="col" { "state" } th scope="col" { "sites reported" } th scope="col" { "dropped or failed" } th scope="col" { "seconds" } th scope="col" { "model" } th scope="col" { "pooled metrics" } } }
                    tbody {
                        @for r in &job.round_log {
                            tr {
                                td { (r.round) } td { (r.attempt) } td { (r.state().label()) @if !r.reason.is_empty() { ": " (r.reason) } }
                                td { (r.sites.iter().filter(|s| s.status() == pb::SiteRoundStatus::Reported).count()) }
                                td { (r.sites.iter().filter(|s| matches!(s.status(), pb::SiteRoundStatus::Dropped | pb::SiteRoundStatus::Failed)).count()) }
                                td { (format!("{:.1}", r.seconds)) } td { (r.model_version) }
                                td { (r.pooled_metrics.iter().map(|(k, v)| format!("{k} {v:.3}")).collect::<Vec<_>>().join(", ")) }
                            }
                        }
                    }
                }
            }
            @if running {
                button hx-post={ "/jobs/" (job.job_id) "/cancel" } hx-target="#job" hx-swap="outerHTML" hx-confirm="Cancel this job?" { "Cancel the job" }
            }
        }
    }
}

async fn get_job(ui: &Ui, id: &str) -> Result<pb::JobInfo, tonic::Status> {
    Ok(coordinator(ui)
        .get_job(pb::GetJobRequest {
            job_id: id.to_string(),
        })
        .await?
        .into_inner())
}

async fn job_page(
    State(ui): State<Shared>,
    Extension(csrf): Extension<Csrf>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    match get_job(&ui, &id).await {
        Ok(job) => frame(
            &ui,
            &csrf,
            "/jobs",
            &format!("Job {}", job.job_id),
            job_fragment(&job),
        ),
        Err(s) => grpc_error(&ui, &csrf, &headers, "/jobs", "Job", &s),
    }
}

async fn job_live(State(ui): State<Shared>, Path(id): Path<String>) -> Response {
    match get_job(&ui, &id).await {
        Ok(job) => Html(job_fragment(&job).into_string()).into_response(),
        Err(s) => fragment_error(&s),
    }
}

async fn cancel_job(State(ui): State<Shared>, Path(id): Path<String>) -> Response {
    match coordinator(&ui)
        .cancel_job(pb::GetJobRequest { job_id: id })
        .await
    {
        Ok(job) => Html(job_fragment(job.get_ref()).into_string()).into_response(),
        Err(s) => fragment_error(&s),
    }
}

// ---- registry ----

/// The lineage as a layered graph: each version one row below its parent, edges from parent
/// to child. Drawn directly as SVG elements (no graph-layout crate is needed for a tree).
fn lineage_svg(models: &[pb::ModelVersion]) -> Markup {
    let index: BTreeMap<&str, usize> = models
        .iter()
        .enumerate()
        .map(|(i, m)| (m.version.as_str(), i))
        .collect();
    let mut depth = vec![0usize; models.len()];
    for (i, m) in models.iter().enumerate() {
        let mut d = 0;
        let mut parent = m.parent.as_str();
        while let Some(&p) = index.get(parent) {
            d += 1;
            parent = models[p].parent.as_str();
            if d > models.len() {
                break;
            }
        }
        depth[i] = d;
    }
    let mut column = vec![0usize; models.len()];
    let mut per_depth: BTreeMap<usize, usize> = BTreeMap::new();
    for (i, d) in depth.iter().enumerate() {
        let c = per_depth.entry(*d).or_default();
        column[i] = *c;
        *c += 1;
    }
    let (w, h) = (220.0, 70.0);
    let width = per_depth.values().max().copied().unwrap_or(1) as f64 * w + 20.0;
    let height = (depth.iter().max().copied().unwrap_or(0) + 1) as f64 * h + 20.0;
    let at = |i: usize| (10.0 + column[i] as f64 * w, 10.0 + depth[i] as f64 * h);
    html! {
        svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="model lineage: each version below the version it was trained from" width=(width) height=(height) viewBox={ "0 0 " (width) " " (height) } data-testid="lineage" {
            @for (i, m) in models.iter().enumerate() {
                @if let Some(&p) = index.get(m.parent.as_str()) {
                    @let (x1, y1) = at(p);
                    @let (x2, y2) = at(i);
                    line x1=(x1 + 100.0) y1=(y1 + 44.0) x2=(x2 + 100.0) y2=(y2) stroke="#555" stroke-width="1.5" {}
                }
            }
            @for (i, m) in models.iter().enumerate() {
                @let (x, y) = at(i);
                g {
                    title { (m.version) " (" (m.algorithm) ")" }
                    rect x=(x) y=(y) width="200" height="44" rx="6" fill=(if m.promoted_at.is_empty() { "#eef2f7" } else { "#d8f0dc" }) stroke="#333" {}
                    text x=(x + 8.0) y=(y + 18.0) font-size="13" font-family="sans-serif" fill="#111" { (m.version) }
                    text x=(x + 8.0) y=(y + 36.0) font-size="11" font-family="sans-serif" fill="#333" { (m.algorithm) @if !m.promoted_at.is_empty() { " · promoted" } }
                }
            }
        }
    }
}

async fn models_page(
    State(ui): State<Shared>,
    Extension(csrf): Extension<Csrf>,
    headers: HeaderMap,
) -> Response {
    let models = match coordinator(&ui).list_models(pb::ListModelsRequest {}).await {
        Ok(r) => r.into_inner().models,
        Err(s) => return grpc_error(&ui, &csrf, &headers, "/models", "Registry", &s),
    };
    let body = html! {
        figure class="lineage" { (lineage_svg(&models)) figcaption { "Lineage (promoted versions in green)" } }
        div class="table-wrap" tabindex="0" role="region" aria-label="Model versions" {
            table {
                caption { "Model versions" }
                thead { tr { th scope="col" { "version" } th scope="col" { "parent" } th scope="col" { "made by" } th scope="col" { "job / round" } th scope="col" { "metrics" } th scope="col" { "running at" } th scope="col" { "promoted" } th scope="col" { "promote" } } }
                tbody {
                    @for m in &models {
                        tr {
                            td { code { (m.version) } } td { (m.parent) } td { (m.algorithm) }
                            td { (m.job_id) @if m.round > 0 { " / " (m.round) } }
                            td { (m.metrics.iter().map(|(k, v)| format!("{k} {v:.3}")).collect::<Vec<_>>().join(", ")) }
                            td { (m.running_at.join(", ")) }
                            td { (m.promoted_at) }
                            td {
                                button hx-post={ "/models/" (m.version) "/promote" } hx-target="#promote-result" hx-confirm={ "Sign a PROMOTE order for " (m.version) "? Every site installs it." } aria-label={ "Promote " (m.version) } { "Promote" }
                            }
                        }
                    }
                }
            }
        }
        div id="promote-result" aria-live="polite" {}
    };
    frame(&ui, &csrf, "/models", "Registry", body)
}

async fn promote(State(ui): State<Shared>, Path(version): Path<String>) -> Response {
    let outcome = async {
        let (signer, study) = crate::train_cmd::study_signer_of(&ui.credentials)?;
        crate::train_cmd::promote(&mut coordinator(&ui), &signer, &study, &version).await
    }
    .await;
    match outcome {
        Ok(p) => {
            let m = p.model.unwrap_or_default();
            Html(html! { p role="status" data-testid="promoted" { (m.version) " promoted; sent to " (p.sent_to.len()) " connected site(s): " (p.sent_to.join(", ")) "." } }.into_string()).into_response()
        }
        Err(e) => local_error(StatusCode::BAD_REQUEST, "Not promoted", &format!("{e:#}")),
    }
}
