//! The node's pages: status, records, upload, ask, fields and labelling, exact statistics,
//! DP statistics, export, privacy budgets and the audit chain. Each handler makes the RPC the
//! CLI would and renders the answer; a refusal is the node's, shown as it came.

use std::collections::BTreeMap;

use axum::Router;
use axum::body::Body;
use axum::extract::{Extension, Multipart, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use cxrfed_proto::v1 as pb;
use cxrfed_proto::v1::node_service_client::NodeServiceClient;
use maud::{Markup, PreEscaped, html};
use serde::Deserialize;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use super::page::{self, frame, grpc_error, local_error, table};
use super::security::Csrf;
use super::{Backend, Shared, Ui};

/// The largest upload the console accepts in one request (the node applies its own
/// `max_file_bytes` per file on top).
pub const MAX_UPLOAD_BYTES: u64 = 512 * 1024 * 1024;
const CHUNK_BYTES: usize = 1024 * 1024;

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/", get(status_page))
        .route("/status/live", get(status_live))
        .route("/records", get(records_page))
        .route("/records/{id}", get(record_page))
        .route("/records/{id}/input.png", get(record_input))
        .route("/records/{id}/ask", post(ask))
        .route("/upload", get(upload_page).post(upload))
        .route("/fields", get(fields_page).post(define_field))
        .route("/label", get(label_page).post(label))
        .route("/stats", get(stats_page))
        .route("/dp", get(dp_page).post(dp_release))
        .route("/export", get(export_page))
        .route("/export/download", get(export_download))
        .route("/privacy", get(privacy_page))
        .route("/privacy/budget", post(set_budget))
        .route("/audit", get(audit_page))
        .route("/audit/verify", post(verify_audit))
}

fn node(ui: &Ui) -> NodeServiceClient<Channel> {
    match &ui.backend {
        Backend::Node(c) => c.clone(),
        Backend::Coordinator(_) => unreachable!("node routes are mounted for a node only"),
    }
}

fn ts(t: &Option<prost_types::Timestamp>) -> String {
    t.as_ref()
        .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
        .map_or(String::new(), |t| {
            t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
        })
}

fn view_name(view: i32) -> &'static str {
    match pb::View::try_from(view).unwrap_or(pb::View::Unspecified) {
        pb::View::Pa => "PA",
        pb::View::Ap => "AP",
        pb::View::Ll => "LL",
        pb::View::Unknown => "unknown",
        pb::View::Unspecified => "",
    }
}

// ---- status ----

async fn status_page(
    State(ui): State<Shared>,
    Extension(csrf): Extension<Csrf>,
    headers: HeaderMap,
) -> Response {
    if matches!(
        ui.role(),
        Some(cxrfed_auth::Role::Researcher | cxrfed_auth::Role::Coordinator)
    ) {
        return axum::response::Redirect::to("/dp").into_response();
    }
    match status_fragment(&ui).await {
        Ok(body) => frame(&ui, &csrf, "/", "Node status", body),
        Err(s) => grpc_error(&ui, &csrf, &headers, "/", "Node status", &s),
    }
}

async fn status_live(State(ui): State<Shared>) -> Response {
    match status_fragment(&ui).await {
        Ok(body) => Html(body.into_string()).into_response(),
        Err(s) => fragment_error(&s),
    }
}

async fn status_fragment(ui: &Ui) -> Result<Markup, tonic::Status> {
    let s = node(ui).status(pb::StatusRequest {}).await?.into_inner();
    let model = s.model.clone().unwrap_or_default();
    let running = s.ingest_jobs.iter().any(|j| j.state == "running");
    Ok(html! {
        div id="status" hx-get="/status/live" hx-trigger="every 2s" hx-swap="outerHTML" {
            dl class="facts" {
                dt { "Site" } dd { (s.site) }
                dt { "Version" } dd { (s.version) }
                dt { "Records" } dd data-testid="record-count" { (s.record_count) }
                dt { "Model" } dd { (s.model_id) }
                dt { "Architecture" } dd { (model.architecture) " · input " (model.input_size) "²" }
                dt { "Device" } dd { (model.device) }
                dt { "Inference" } dd { (model.images) " images in " (model.batches) " batches · mean forward " (format!("{:.1}", model.mean_forward_ms)) " ms · batch ≤ " (model.max_batch) }
                dt { "Requests in flight" } dd { (s.in_flight) }
                dt { "Store" } dd { (format!("{:.1} MiB", s.store_size_bytes as f64 / 1048576.0)) }
                dt { "Uptime" } dd { (s.uptime_seconds) " s" }
                @if let Some(link) = &s.coordinator_link {
                    dt { "Coordinator" }
                    dd { (link.url) " · " @if link.connected { "connected" } @else { "not connected: " (link.last_error) } }
                }
                @if let Some(d) = &s.dicom_receiver {
                    dt { "DICOM receiver" }
                    dd { (d.ae_title) " on " (d.listen) @if d.tls { " (TLS)" } " · " (d.instances_stored) " stored, " (d.instances_duplicate) " duplicates" }
                }
                @if let Some(b) = &s.backfill {
                    dt { "Back-fill" }
                    dd { (b.model_id) ": " (b.state) " · " (b.done) " / " (b.total) }
                }
            }
            h2 { "Ingest jobs" }
            @if s.ingest_jobs.is_empty() {
                p { "No ingest or pull job in this run of the node." }
            } @else {
                (table(
                    "Ingest jobs (live)",
                    &["job", "source", "state", "done", "ingested", "already present", "rejected", "files/s"].map(String::from),
                    &s.ingest_jobs.iter().map(|j| vec![
                        j.job_id.clone(),
                        if j.source.is_empty() { j.folder.clone() } else { j.source.clone() },
                        j.state.clone(),
                        format!("{} / {}", j.files_done, j.files_total),
                        j.ingested.to_string(),
                        j.already_present.to_string(),
                        j.rejected.to_string(),
                        format!("{:.1}", j.files_per_second),
                    ]).collect::<Vec<_>>(),
                ))
                @for j in &s.ingest_jobs {
                    @if j.files_total > 0 {
                        label { "Job " (j.job_id) " " progress max=(j.files_total) value=(j.files_done) { (j.files_done) } }
                    }
                }
            }
            @if running { p class="muted" { "Refreshing every 2 s." } }
        }
    })
}

// ---- records ----

#[derive(Deserialize, Default)]
struct RecordFilter {
    #[serde(default)]
    view: String,
    #[serde(default)]
    modality: String,
    #[serde(default)]
    from: String,
    #[serde(default)]
    to: String,
    #[serde(default)]
    page: String,
}

async fn list_page(
    ui: &Ui,
    filter: &RecordFilter,
    page_size: u32,
) -> Result<(Vec<pb::Record>, String), tonic::Status> {
    let view = match filter.view.as_str() {
        "" => pb::View::Unspecified,
        v => cxrfed_schema::View::parse(v)
            .map(pb::View::from)
            .ok_or_else(|| tonic::Status::invalid_argument(format!("unknown view {v:?}")))?,
    };
    let mut stream = node(ui)
        .list_records(pb::ListRecordsRequest {
            page_size,
            page_token: filter.page.clone(),
            view: view as i32,
            modality: filter.modality.clone(),
            month_from: filter.from.clone(),
            month_to: filter.to.clone(),
        })
        .await?
        .into_inner();
    let mut records = Vec::new();
    let mut next = String::new();
    while let Some(item) = stream.message().await? {
        match item.item {
            Some(pb::list_records_response::Item::Record(r)) => records.push(r),
            Some(pb::list_records_response::Item::PageEnd(end)) => next = end.next_page_token,
            None => {}
        }
    }
    Ok((records, next))
}

fn headline(record: &pb::Record) -> String {
    cxrfed_schema::Record::try_from(record.clone())
        .ok()
        .map(|r| {
            ["image_quality", "cardiac_contour", "costophrenic_angle"]
                .iter()
                .filter_map(|name| cxrfed_schema::flat::field(name))
                .map(|f| format!("{}: {}", f.name, (f.get)(&r).to_text()))
                .collect::<Vec<_>>()
                .join(" · ")
        })
        .unwrap_or_default()
}

async fn records_page(
    State(ui): State<Shared>,
    Extension(csrf): Extension<Csrf>,
    headers: HeaderMap,
    Query(filter): Query<RecordFilter>,
) -> Response {
    let (records, next) = match list_page(&ui, &filter, 50).await {
        Ok(x) => x,
        Err(s) => return grpc_error(&ui, &csrf, &headers, "/records", "Records", &s),
    };
    let next_href = format!(
        "/records?{}",
        query_string(&[
            ("view", &filter.view),
            ("modality", &filter.modality),
            ("from", &filter.from),
            ("to", &filter.to),
            ("page", &next),
        ])
    );
    let body = html! {
        form method="get" action="/records" class="filters" {
            label { "View " select name="view" {
                @for v in ["", "PA", "AP", "LL", "unknown"] {
                    option value=(v) selected[filter.view == v] { @if v.is_empty() { "any" } @else { (v) } }
                }
            } }
            label { "Modality " input name="modality" value=(filter.modality) size="4"; }
            label { "From month " input name="from" value=(filter.from) placeholder="YYYY-MM" size="8"; }
            label { "To month " input name="to" value=(filter.to) placeholder="YYYY-MM" size="8"; }
            button type="submit" { "Filter" }
        }
        @if records.is_empty() {
            p { "No records match." }
        } @else {
            div class="table-wrap" tabindex="0" role="region" aria-label="Records" {
                table {
                    caption { "Records, oldest first" }
                    thead { tr { th scope="col" { "record" } th scope="col" { "created" } th scope="col" { "modality" } th scope="col" { "view" } th scope="col" { "month" } th scope="col" { "age" } th scope="col" { "findings" } } }
                    tbody {
                        @for r in &records {
                            tr {
                                td { a href={ "/records/" (r.record_id) } { (r.record_id) } }
                                td { (ts(&r.created_at)) }
                                td { (r.source.as_ref().map_or("", |s| s.modality.as_str())) }
                                td { (view_name(r.acquisition.as_ref().map_or(0, |a| a.view))) }
                                td { (r.acquisition.as_ref().map_or("", |a| a.month.as_str())) }
                                td { (r.patient.as_ref().map_or("", |p| p.age_group.as_str())) }
                                td { (headline(r)) }
                            }
                        }
                    }
                }
            }
            @if !next.is_empty() { p { a href=(next_href) { "Next page" } } }
        }
    };
    frame(&ui, &csrf, "/records", "Records", body)
}

/// A query string from pairs (form encoding).
fn query_string(pairs: &[(&str, &str)]) -> String {
    serde_urlencoded::to_string(pairs).unwrap_or_default()
}

fn findings_table(record: &pb::Record) -> Markup {
    let Ok(r) = cxrfed_schema::Record::try_from(record.clone()) else {
        return page::error_box(
            "Unreadable record",
            "the node sent a record this console cannot read",
        );
    };
    if r.findings.is_none() {
        return html! { p { "No findings: no model has read this image yet." } };
    }
    html! {
        div class="table-wrap" tabindex="0" role="region" aria-label="Findings" {
            table data-testid="findings" {
                caption { "Findings (model " (r.model_id) ")" }
                thead { tr { th scope="col" { "field" } th scope="col" { "value" } th scope="col" { "probability" } } }
                tbody {
                    @for f in cxrfed_schema::flat::FIELDS.iter().filter(|f| f.probability.is_some()) {
                        tr {
                            th scope="row" { (f.name) }
                            td { (match (f.get)(&r) { cxrfed_schema::flat::Cell::Number(x) => format!("{x:.3}"), cell => cell.to_text() }) }
                            td { (f.probability.and_then(|p| p(&r)).map_or(String::new(), |p| format!("{p:.3}"))) }
                        }
                    }
                }
            }
        }
    }
}

fn questions_list(record: &pb::Record) -> Markup {
    html! {
        div id="answers" {
            h2 { "Questions" }
            @if record.questions.is_empty() {
                p { "No questions asked yet." }
            } @else {
                ol {
                    @for q in &record.questions {
                        li { (q.field) " = " strong { (q.value) } " (p " (format!("{:.3}", q.probability)) ") · matched " q { (q.matched_phrase) } " · " (ts(&q.asked_at)) }
                    }
                }
            }
        }
    }
}

async fn record_page(
    State(ui): State<Shared>,
    Extension(csrf): Extension<Csrf>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let record = match node(&ui)
        .get_record(pb::GetRecordRequest {
            record_id: id.clone(),
        })
        .await
    {
        Ok(r) => r.into_inner(),
        Err(s) => return grpc_error(&ui, &csrf, &headers, "/records", "Record", &s),
    };
    let source = record.source.clone().unwrap_or_default();
    let body = html! {
        div class="record" {
            figure class="input" {
                img src={ "/records/" (record.record_id) "/input.png" } alt="The model input (de-identified, preprocessed image)" width="224" height="224";
                figcaption { "Model input" }
            }
            dl class="facts" {
                dt { "Record" } dd { code { (record.record_id) } }
                dt { "Image SHA-256" } dd { code { (record.image_sha256) } }
                dt { "Created" } dd { (ts(&record.created_at)) }
                dt { "Source" } dd { (source.modality) " " (source.transfer_syntax_name) " · " (source.columns) "×" (source.rows) " · " (source.bits_stored) " bits" }
                dt { "Patient" } dd { (record.patient.as_ref().map_or("", |p| p.age_group.as_str())) " · pseudonym " code { (record.patient.as_ref().map_or("", |p| p.pseudonym.as_str())) } }
                dt { "Acquisition" } dd { (record.acquisition.as_ref().map_or("", |a| a.month.as_str())) " · " (view_name(record.acquisition.as_ref().map_or(0, |a| a.view))) }
                @for note in &record.processing_notes { dt { "Note" } dd { (note) } }
            }
        }
        (findings_table(&record))
        @if !record.custom_fields.is_empty() {
            (table("Custom fields", &["field".to_string(), "label".to_string()],
                &record.custom_fields.iter().map(|(k, v)| vec![k.clone(), v.clone()]).collect::<Vec<_>>()))
        }
        @if !record.annotations.is_empty() {
            (table("Labels", &["field", "value", "annotator", "when"].map(String::from),
                &record.annotations.iter().map(|a| vec![a.field.clone(), a.value.clone(), a.annotator.clone(), ts(&a.annotated_at)]).collect::<Vec<_>>()))
        }
        h2 { "Ask about this image" }
        form hx-post={ "/records/" (record.record_id) "/ask" } hx-target="#ask-result" hx-swap="innerHTML" {
            label for="question" { "Question (English or Chinese)" }
            input id="question" name="question" type="text" size="60" required placeholder="Is the left costophrenic angle blunted?";
            button type="submit" { "Ask" }
        }
        div id="ask-result" aria-live="polite" {
            (questions_list(&record))
        }
    };
    frame(&ui, &csrf, "/records", "Record", body)
}

async fn record_input(State(ui): State<Shared>, Path(id): Path<String>) -> Response {
    match node(&ui)
        .get_record_input(pb::GetRecordRequest { record_id: id })
        .await
    {
        Ok(input) => (
            [(header::CONTENT_TYPE, "image/png")],
            input.into_inner().png,
        )
            .into_response(),
        Err(s) => (page::http_status(s.code()), s.message().to_string()).into_response(),
    }
}

#[derive(Deserialize)]
struct AskForm {
    question: String,
}

async fn ask(
    State(ui): State<Shared>,
    Path(id): Path<String>,
    axum::Form(form): axum::Form<AskForm>,
) -> Response {
    let answer = match node(&ui)
        .ask(pb::AskRequest {
            record_id: id,
            question: form.question.clone(),
        })
        .await
    {
        Ok(a) => a.into_inner(),
        Err(s) => {
            return fragment_error(&s);
        }
    };
    let body = html! {
        @if answer.understood {
            p class="answer" data-testid="answer" { strong { (answer.field) } ": " (answer.answer) }
        } @else {
            div class="answer" data-testid="answer" role="status" {
                p { (answer.answer) }
                @if !answer.suggestions.is_empty() {
                    p { "Closest fields: " @for (i, s) in answer.suggestions.iter().enumerate() { @if i > 0 { ", " } (s.field) " (" q { (s.phrase) } ")" } }
                }
            }
        }
        @if let Some(record) = &answer.record { (questions_list(record)) }
    };
    Html(body.into_string()).into_response()
}

// ---- upload ----

async fn upload_page(State(ui): State<Shared>, Extension(csrf): Extension<Csrf>) -> Response {
    let body = html! {
        p { "DICOM Part 10, JPEG or PNG. Each file is de-identified and read at the node; only its record is kept." }
        form id="upload" hx-post="/upload" hx-encoding="multipart/form-data" hx-target="#upload-result" {
            // `force` comes first: the upload is read, and sent on, in form order.
            label { input name="force" type="checkbox" value="true"; " Re-extract images already stored" }
            div class="dropzone" id="dropzone" {
                label for="files" { "Choose files, or drop them here" }
                input id="files" name="files" type="file" multiple required;
            }
            button type="submit" { "Extract" }
        }
        div id="upload-result" aria-live="polite" {}
    };
    frame(&ui, &csrf, "/upload", "Upload", body)
}

/// Streams one multipart file to the node's Extract as it arrives, in chunks of at most
/// `CHUNK_BYTES`: the console holds one chunk per upload, not the file.
async fn extract_field(
    ui: &Ui,
    field: &mut axum::extract::multipart::Field<'_>,
    force: bool,
) -> Result<Result<pb::ExtractResponse, tonic::Status>, String> {
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::ExtractRequest>(4);
    let mut client = node(ui);
    let call = tokio::spawn(async move {
        client
            .extract(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    let header = pb::ExtractRequest {
        header: Some(pb::ExtractHeader {
            filename: field.file_name().unwrap_or("upload").to_string(),
            force,
            size_hint: 0,
        }),
        chunk: Default::default(),
    };
    let mut sent_any = tx.send(header).await.is_ok();
    let mut buffer = Vec::with_capacity(CHUNK_BYTES);
    let mut failure = None;
    loop {
        match field.chunk().await {
            Ok(Some(bytes)) => {
                buffer.extend_from_slice(&bytes);
                while buffer.len() >= CHUNK_BYTES {
                    let rest = buffer.split_off(CHUNK_BYTES);
                    let chunk = std::mem::replace(&mut buffer, rest);
                    // A send fails once the node has answered (a refusal): drain the rest.
                    sent_any &= tx
                        .send(pb::ExtractRequest {
                            header: None,
                            chunk: chunk.into(),
                        })
                        .await
                        .is_ok();
                }
            }
            Ok(None) => break,
            Err(e) => {
                failure = Some(e.body_text());
                break;
            }
        }
    }
    if failure.is_none() && !buffer.is_empty() && sent_any {
        let _ = tx
            .send(pb::ExtractRequest {
                header: None,
                chunk: buffer.into(),
            })
            .await;
    }
    if let Some(why) = failure {
        // Cancel the call: the node gets a broken stream and stores nothing.
        call.abort();
        return Err(why);
    }
    drop(tx);
    match call.await {
        Ok(outcome) => Ok(outcome.map(|r| r.into_inner())),
        Err(_) => Err("the upload was cancelled".into()),
    }
}

async fn upload(State(ui): State<Shared>, mut form: Multipart) -> Response {
    let mut rows = Vec::new();
    let mut force = false;
    loop {
        match form.next_field().await {
            Ok(Some(mut field)) => match field.name().unwrap_or("") {
                "force" => force = field.bytes().await.is_ok_and(|b| &b[..] == b"true"),
                "files" if field.file_name().is_some_and(|f| !f.is_empty()) => {
                    // The file name is the user's own (on their machine) and is shown back only
                    // to them; the node neither stores nor logs it.
                    let filename = field.file_name().unwrap_or("upload").to_string();
                    match extract_field(&ui, &mut field, force).await {
                        Ok(outcome) => rows.push((filename, outcome)),
                        Err(why) => {
                            return local_error(
                                StatusCode::BAD_REQUEST,
                                "The upload did not arrive whole",
                                &why,
                            );
                        }
                    }
                }
                _ => {}
            },
            Ok(None) => break,
            Err(e) => {
                return local_error(
                    StatusCode::BAD_REQUEST,
                    "The upload did not arrive whole",
                    &e.body_text(),
                );
            }
        }
    }
    if rows.is_empty() {
        return local_error(
            StatusCode::BAD_REQUEST,
            "No file",
            "choose at least one file",
        );
    }
    let body = html! {
        ul class="results" {
            @for (filename, outcome) in &rows {
                li {
                    (filename) ": "
                    @match outcome {
                        Ok(r) => {
                            @let record = r.record.clone().unwrap_or_default();
                            @if r.created { "new record " } @else { "already stored as " }
                            a href={ "/records/" (record.record_id) } data-testid="record-link" { (record.record_id) }
                            " · " (headline(&record))
                        }
                        Err(s) => { span class="refused" { (format!("{:?}", s.code())) ": " (s.message()) } }
                    }
                }
            }
        }
    };
    Html(body.into_string()).into_response()
}

// ---- fields and labelling ----

async fn fields_page(
    State(ui): State<Shared>,
    Extension(csrf): Extension<Csrf>,
    headers: HeaderMap,
) -> Response {
    let fields = match node(&ui).list_fields(pb::ListFieldsRequest {}).await {
        Ok(f) => f.into_inner().fields,
        Err(s) => return grpc_error(&ui, &csrf, &headers, "/fields", "Custom fields", &s),
    };
    let body = html! {
        @if fields.is_empty() { p { "No custom fields yet." } } @else {
            (table("Custom fields", &["name", "type", "values or bounds", "version", "description", "synonyms"].map(String::from),
                &fields.iter().map(|f| vec![
                    f.name.clone(), f.r#type.clone(),
                    if f.r#type == "numeric" { format!("{} – {}", f.min, f.max) } else { f.values.join(", ") },
                    f.version.to_string(), f.description.clone(), f.synonyms.join(", "),
                ]).collect::<Vec<_>>()))
        }
        h2 { "Define a field" }
        form hx-post="/fields" hx-target="#define-result" class="stack" {
            label { "Name " input name="name" required pattern="[a-z][a-z0-9_]*"; }
            label { "Type " select name="type" { option value="categorical" { "categorical" } option value="bool" { "bool" } option value="numeric" { "numeric" } } }
            label { "Values (categorical, comma-separated) " input name="values"; }
            label { "Minimum (numeric) " input name="min" type="number" step="any"; }
            label { "Maximum (numeric) " input name="max" type="number" step="any"; }
            label { "Description " input name="description" size="50"; }
            label { "Synonyms (comma-separated phrases for questions) " input name="synonyms" size="50"; }
            button type="submit" { "Define" }
        }
        div id="define-result" aria-live="polite" {}
    };
    frame(&ui, &csrf, "/fields", "Custom fields", body)
}

#[derive(Deserialize)]
struct FieldForm {
    name: String,
    r#type: String,
    #[serde(default)]
    values: String,
    #[serde(default)]
    min: String,
    #[serde(default)]
    max: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    synonyms: String,
}

fn list(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

async fn define_field(
    State(ui): State<Shared>,
    axum::Form(form): axum::Form<FieldForm>,
) -> Response {
    let number = |t: &str| t.trim().parse::<f64>().unwrap_or(0.0);
    let field = pb::FieldDefinition {
        name: form.name.trim().to_string(),
        r#type: form.r#type,
        values: list(&form.values),
        min: number(&form.min),
        max: number(&form.max),
        description: form.description,
        synonyms: list(&form.synonyms),
        ..Default::default()
    };
    match node(&ui)
        .define_field(pb::DefineFieldRequest { field: Some(field) })
        .await
    {
        Ok(f) => {
            let f = f.into_inner();
            Html(html! { p role="status" { "Defined " strong { (f.name) } " version " (f.version) ". " a href="/fields" { "Reload the list" } } }.into_string()).into_response()
        }
        Err(s) => fragment_error(&s),
    }
}

#[derive(Deserialize, Default)]
struct LabelQuery {
    #[serde(default)]
    field: String,
    #[serde(default)]
    page: String,
    #[serde(default)]
    skip: usize,
}

/// The values a labeller picks from: a custom field's, or a schema finding's categories.
async fn label_values(ui: &Ui, field: &str) -> Result<Option<Vec<String>>, tonic::Status> {
    if let Some(f) = cxrfed_schema::flat::field(field) {
        return Ok(f
            .kind
            .categories()
            .map(|c| c.iter().map(|s| s.to_string()).collect()));
    }
    let fields = node(ui)
        .list_fields(pb::ListFieldsRequest {})
        .await?
        .into_inner()
        .fields;
    Ok(fields.into_iter().find(|f| f.name == field).map(|f| {
        match f.r#type.as_str() {
            "bool" => vec!["true".into(), "false".into()],
            "categorical" => f.values,
            // Numeric: typed, not picked.
            _ => Vec::new(),
        }
    }))
}

fn is_labelled(record: &pb::Record, field: &str) -> bool {
    record.annotations.iter().any(|a| a.field == field)
        || record
            .custom_fields
            .get(field)
            .is_some_and(|v| !v.is_empty())
}

/// The next record without a label for `field` from (`page`, `skip`) on: the record, and
/// where the one after it starts. Walks at most 20 pages per request.
async fn next_unlabelled(
    ui: &Ui,
    field: &str,
    mut page: String,
    mut skip: usize,
) -> Result<Option<(pb::Record, String, usize)>, tonic::Status> {
    for _ in 0..20 {
        let filter = RecordFilter {
            page: page.clone(),
            ..Default::default()
        };
        let (records, next) = list_page(ui, &filter, 100).await?;
        if let Some((i, r)) = records
            .iter()
            .enumerate()
            .skip(skip)
            .find(|(_, r)| !is_labelled(r, field))
        {
            return Ok(Some((r.clone(), page, i + 1)));
        }
        if next.is_empty() {
            return Ok(None);
        }
        page = next;
        skip = 0;
    }
    Ok(None)
}

async fn labeller(ui: &Ui, q: &LabelQuery) -> Result<Markup, tonic::Status> {
    let Some(values) = label_values(ui, &q.field).await? else {
        return Ok(page::error_box(
            "Unknown field",
            &format!(
                "{:?} is neither a schema finding nor a custom field",
                q.field
            ),
        ));
    };
    let Some((record, page, skip)) = next_unlabelled(ui, &q.field, q.page.clone(), q.skip).await?
    else {
        return Ok(
            html! { div id="labeller" { p role="status" { "Every record has a label for " strong { (q.field) } "." } } },
        );
    };
    Ok(html! {
        div id="labeller" {
            figure class="input" {
                img src={ "/records/" (record.record_id) "/input.png" } alt="The image to label" width="320" height="320";
                figcaption { "Record " a href={ "/records/" (record.record_id) } { (record.record_id) } }
            }
            form hx-post="/label" hx-target="#labeller" hx-swap="outerHTML" class="labelling" {
                input type="hidden" name="record_id" value=(record.record_id);
                input type="hidden" name="field" value=(q.field);
                input type="hidden" name="page" value=(page);
                input type="hidden" name="skip" value=(skip);
                @if values.is_empty() {
                    label { (q.field) " " input name="value" type="number" step="any" required autofocus; }
                } @else {
                    fieldset {
                        legend { (q.field) " (keys 1–" (values.len().min(9)) ", Enter to save)" }
                        @for (i, v) in values.iter().enumerate() {
                            label class="choice" {
                                input type="radio" name="value" value=(v) required autofocus[i == 0] data-key=(i + 1);
                                " " @if i < 9 { kbd { (i + 1) } " " } (v)
                            }
                        }
                    }
                }
                button type="submit" { "Save and next" }
                " "
                a href={ "/label?" (query_string(&[("field", &q.field), ("page", &page), ("skip", &skip.to_string())])) } { "Skip" }
            }
        }
    })
}

async fn label_page(
    State(ui): State<Shared>,
    Extension(csrf): Extension<Csrf>,
    headers: HeaderMap,
    Query(q): Query<LabelQuery>,
) -> Response {
    let fields = match node(&ui).list_fields(pb::ListFieldsRequest {}).await {
        Ok(f) => f.into_inner().fields,
        Err(s) => return grpc_error(&ui, &csrf, &headers, "/label", "Label", &s),
    };
    let pick = html! {
        form method="get" action="/label" {
            label for="label-field" { "Field to label" }
            select id="label-field" name="field" {
                optgroup label="Custom fields" {
                    @for f in &fields { option value=(f.name) selected[q.field == f.name] { (f.name) } }
                }
                optgroup label="Schema findings (corrections)" {
                    @for f in cxrfed_schema::flat::FIELDS.iter().filter(|f| f.probability.is_some()) {
                        option value=(f.name) selected[q.field == f.name] { (f.name) }
                    }
                }
            }
            button type="submit" { "Start" }
        }
    };
    let body = if q.field.is_empty() {
        pick
    } else {
        match labeller(&ui, &q).await {
            Ok(view) => html! { (pick) (view) },
            Err(s) => return grpc_error(&ui, &csrf, &headers, "/label", "Label", &s),
        }
    };
    frame(&ui, &csrf, "/label", "Label", body)
}

#[derive(Deserialize)]
struct LabelForm {
    record_id: String,
    field: String,
    value: String,
    #[serde(default)]
    page: String,
    #[serde(default)]
    skip: usize,
}

async fn label(State(ui): State<Shared>, axum::Form(form): axum::Form<LabelForm>) -> Response {
    if let Err(s) = node(&ui)
        .annotate(pb::AnnotateRequest {
            record_id: form.record_id.clone(),
            field: form.field.clone(),
            value: form.value.clone(),
            ..Default::default()
        })
        .await
    {
        return fragment_error(&s);
    }
    let q = LabelQuery {
        field: form.field,
        page: form.page,
        skip: form.skip,
    };
    match labeller(&ui, &q).await {
        Ok(view) => Html(view.into_string()).into_response(),
        Err(s) => fragment_error(&s),
    }
}

// ---- statistics ----

#[derive(Deserialize, Default)]
struct StatsQuery {
    #[serde(default)]
    q: String,
}

async fn schema_fields(ui: &Ui) -> Vec<pb::FieldInfo> {
    node(ui)
        .get_schema(pb::GetSchemaRequest {})
        .await
        .map(|r| r.into_inner().fields)
        .unwrap_or_default()
}

fn field_list(fields: &[pb::FieldInfo]) -> Markup {
    html! {
        details class="fields" open {
            summary { "Fields (click to insert)" }
            ul {
                @for f in fields {
                    li {
                        button type="button" class="field" data-field=(f.name) aria-label={ "Insert " (f.name) " into the query" } { code { (f.name) } }
                        " " span class="muted" { (f.kind) @if !f.categories.is_empty() { ": " (f.categories.join(", ")) } }
                    }
                }
            }
        }
    }
}

fn chart(svg: anyhow::Result<String>, label: &str) -> Markup {
    match svg {
        Ok(svg) => {
            // The chart is an image for assistive technology, named by its query.
            let label = maud::html! { (label) }.into_string();
            let svg = svg.replacen(
                "<svg ",
                &format!("<svg role=\"img\" aria-label=\"chart: {label}\" "),
                1,
            );
            html! { figure id="chart" data-testid="chart" { (PreEscaped(svg)) } }
        }
        Err(e) => page::error_box("No chart", &format!("{e:#}")),
    }
}

fn stats_cell(cell: &pb::StatsCell) -> String {
    use pb::stats_cell::Value;
    match &cell.value {
        Some(Value::Text(t)) => t.clone(),
        Some(Value::Count(n)) => n.to_string(),
        Some(Value::Number(x)) => format!("{x:.4}"),
        None => String::new(),
    }
}

async fn stats_page(
    State(ui): State<Shared>,
    Extension(csrf): Extension<Csrf>,
    Query(q): Query<StatsQuery>,
) -> Response {
    let fields = schema_fields(&ui).await;
    let query = if q.q.trim().is_empty() {
        "crosstab image_quality, analysis_confidence".to_string()
    } else {
        q.q.clone()
    };
    let result = if q.q.trim().is_empty() {
        None
    } else {
        Some(
            node(&ui)
                .stats(pb::StatsRequest {
                    query: query.clone(),
                    structured: None,
                })
                .await,
        )
    };
    let mut code = StatusCode::OK;
    let body = html! {
        div class="editor" {
            form method="get" action="/stats" {
                label for="q" { "Query (exact; the site admin's own records)" }
                textarea id="q" name="q" rows="3" cols="70" spellcheck="false" { (query) }
                button type="submit" { "Run" }
            }
            (field_list(&fields))
        }
        @match &result {
            None => {}
            Some(Ok(r)) => {
                @let r = r.get_ref();
                p { (r.statistic) " over " (r.cohort_size) " of " (r.record_count) " records" }
                (table("Result", &r.columns, &r.rows.iter().map(|row| row.cells.iter().map(stats_cell).collect()).collect::<Vec<_>>()))
                (chart(crate::plot::bars(r, &query).and_then(|b| crate::plot::svg(&b, &query)), &query))
            }
            Some(Err(s)) => {
                ({ code = page::http_status(s.code()); page::status_markup(s) })
            }
        }
    };
    let mut response = frame(&ui, &csrf, "/stats", "Statistics", body);
    *response.status_mut() = code;
    response
}

// ---- DP statistics ----

fn budget_box(account: &Result<pb::BudgetAccount, tonic::Status>) -> Markup {
    html! {
        div id="budget" class="budget" {
            @match account {
                Ok(a) if a.unlimited => { p { "Your releases here are recorded, not limited (site admin)." } }
                Ok(a) => {
                    p data-testid="budget" { "Your budget at this node: ε " strong { (format!("{:.3}", a.epsilon_remaining)) } " of " (format!("{:.3}", a.epsilon_budget)) " remaining · δ " (format!("{:.2e}", a.delta_remaining)) " of " (format!("{:.2e}", a.delta_budget)) " · " (a.releases) " releases so far" }
                }
                Err(s) if s.code() == tonic::Code::PermissionDenied => { p { "Your releases here are the site admin's (recorded on the audit chain)." } }
                Err(s) => { (page::status_markup(s)) }
            }
        }
    }
}

async fn dp_page(State(ui): State<Shared>, Extension(csrf): Extension<Csrf>) -> Response {
    let account = node(&ui)
        .budget(pb::BudgetRequest {})
        .await
        .map(|r| r.into_inner());
    let fields = schema_fields(&ui).await;
    let body = html! {
        p { "Every release adds calibrated noise and is charged to your privacy budget at this node before anything is shown. Small counts are withheld." }
        (budget_box(&account))
        div class="editor" {
            form hx-post="/dp" hx-target="#dp-result" class="stack" {
                label for="dp-q" { "Query (count, histogram, crosstab, sum, mean)" }
                textarea id="dp-q" name="query" rows="3" cols="70" spellcheck="false" { "crosstab image_quality, analysis_confidence" }
                label { "ε to spend " input name="epsilon" type="number" step="any" min="0" value="0.5" required; }
                label { "δ " input name="delta" type="number" step="any" min="0" value="0"; }
                label { "Mechanism " select name="mechanism" { option value="laplace" { "Laplace (pure ε)" } option value="gaussian" { "Gaussian (ε, δ)" } } }
                button type="submit" { "Release" }
            }
            (field_list(&fields))
        }
        div id="dp-result" aria-live="polite" {}
    };
    frame(&ui, &csrf, "/dp", "Differentially private statistics", body)
}

#[derive(Deserialize)]
pub(crate) struct DpForm {
    pub query: String,
    pub epsilon: String,
    #[serde(default)]
    pub delta: String,
    #[serde(default)]
    pub mechanism: String,
    #[serde(default)]
    pub sites: String,
}

pub(crate) fn mechanism_of(text: &str) -> pb::Mechanism {
    match text {
        "gaussian" => pb::Mechanism::Gaussian,
        _ => pb::Mechanism::Laplace,
    }
}

pub(crate) fn parse_number(text: &str, what: &str) -> Result<f64, String> {
    let t = text.trim();
    if t.is_empty() {
        return Ok(0.0);
    }
    t.parse::<f64>()
        .ok()
        .filter(|x| x.is_finite())
        .ok_or_else(|| format!("{what} is not a number: {t:?}"))
}

/// DP rows as a table and bars (withheld cells are empty and drawn as 0).
pub(crate) fn dp_result(
    caption: &str,
    query: &str,
    label_columns: &[String],
    value_columns: &[String],
    rows: &[pb::DpRow],
) -> Markup {
    let columns: Vec<String> = label_columns
        .iter()
        .chain(value_columns.iter())
        .cloned()
        .collect();
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            r.labels
                .iter()
                .cloned()
                .chain(r.values.iter().map(|v| match v.value {
                    Some(x) => format!("{x:.1} ± {:.1}", v.error_bound),
                    None => "withheld".to_string(),
                }))
                .collect()
        })
        .collect();
    let bars = crate::plot::Bars {
        labels: rows.iter().map(|r| r.labels.join(" / ")).collect(),
        stacks: value_columns.to_vec(),
        values: rows
            .iter()
            .map(|r| {
                r.values
                    .iter()
                    .map(|v| v.value.unwrap_or(0.0).max(0.0))
                    .collect()
            })
            .collect(),
        x_title: label_columns.join(" / "),
        y_title: "noisy value".into(),
    };
    let drawable = !rows.is_empty() && !value_columns.is_empty();
    html! {
        (table(caption, &columns, &body))
        @if drawable { (chart(crate::plot::svg(&bars, query), query)) }
    }
}

async fn dp_release(State(ui): State<Shared>, axum::Form(form): axum::Form<DpForm>) -> Response {
    let (epsilon, delta) = match (
        parse_number(&form.epsilon, "ε"),
        parse_number(&form.delta, "δ"),
    ) {
        (Ok(e), Ok(d)) => (e, d),
        (Err(m), _) | (_, Err(m)) => {
            return local_error(StatusCode::BAD_REQUEST, "Not a number", &m);
        }
    };
    let r = match node(&ui)
        .dp_stats(pb::DpStatsRequest {
            query: form.query.clone(),
            structured: None,
            epsilon,
            delta,
            mechanism: mechanism_of(&form.mechanism) as i32,
        })
        .await
    {
        Ok(r) => r.into_inner(),
        Err(s) => {
            return fragment_error(&s);
        }
    };
    let account = r
        .budget
        .clone()
        .ok_or_else(|| tonic::Status::unknown("no account"));
    let body = html! {
        p data-testid="dp-release" { "Released " (r.statistic) " with " (r.mechanism) ": charged ε " (format!("{:.4}", r.epsilon)) @if r.delta > 0.0 { ", δ " (format!("{:.2e}", r.delta)) } "; values within ± the bound with probability " (r.confidence) "; counts below " (r.suppress_below) " withheld. Audit entry " (r.audit_seq) "." }
        @for note in &r.notes { p class="muted" { (note) } }
        (dp_result("DP release", &r.query, &r.label_columns, &r.value_columns, &r.rows))
        // The budget box, refreshed out of band.
        div hx-swap-oob="outerHTML:#budget" { (budget_box(&account)) }
    };
    Html(body.into_string()).into_response()
}

// ---- export ----

async fn export_page(State(ui): State<Shared>, Extension(csrf): Extension<Csrf>) -> Response {
    let body = html! {
        p { "Row-level records for the site's own analysis. They stay at the site: do not send them on." }
        form method="get" action="/export/download" class="stack" {
            label { "Format " select name="format" {
                option value="csv" { "CSV" } option value="jsonl" { "JSON lines" }
                option value="parquet" { "Parquet" } option value="records" { "Whole records (JSON lines)" }
            } }
            label { "Filter (optional) " input name="where" size="50" placeholder="view = PA and month >= 2020-01"; }
            button type="submit" { "Download" }
        }
    };
    frame(&ui, &csrf, "/export", "Export", body)
}

#[derive(Deserialize)]
struct ExportQuery {
    #[serde(default)]
    format: String,
    #[serde(default, rename = "where")]
    filter: String,
}

async fn export_download(
    State(ui): State<Shared>,
    Extension(csrf): Extension<Csrf>,
    headers: HeaderMap,
    Query(q): Query<ExportQuery>,
) -> Response {
    let format = if q.format.is_empty() {
        "csv".to_string()
    } else {
        q.format.clone()
    };
    let stream = match node(&ui)
        .export(pb::ExportRequest {
            format: format.clone(),
            r#where: q.filter.clone(),
        })
        .await
    {
        Ok(s) => s.into_inner(),
        Err(s) => return grpc_error(&ui, &csrf, &headers, "/export", "Export", &s),
    };
    let (extension, kind) = match format.as_str() {
        "jsonl" | "records" => ("jsonl", "application/x-ndjson"),
        "parquet" => ("parquet", "application/vnd.apache.parquet"),
        _ => ("csv", "text/csv; charset=utf-8"),
    };
    let body = Body::from_stream(stream.map(|chunk| chunk.map(|c| c.data)));
    let mut response = body.into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_str(&format!(
            "attachment; filename=\"cxrfed-export.{extension}\""
        ))
        .expect("ascii"),
    );
    response
}

// ---- privacy and audit ----

async fn privacy_page(
    State(ui): State<Shared>,
    Extension(csrf): Extension<Csrf>,
    headers: HeaderMap,
) -> Response {
    let accounts = match node(&ui).list_budgets(pb::ListBudgetsRequest {}).await {
        Ok(r) => r.into_inner().accounts,
        Err(s) => return grpc_error(&ui, &csrf, &headers, "/privacy", "Privacy budgets", &s),
    };
    let body = html! {
        (table("Privacy accounts", &["identity", "ε budget", "ε spent", "ε remaining", "δ budget", "δ spent", "releases", "updated"].map(String::from),
            &accounts.iter().map(|a| vec![
                a.identity.clone(),
                if a.unlimited { "unlimited".into() } else { format!("{:.3}", a.epsilon_budget) },
                format!("{:.3}", a.epsilon_spent),
                if a.unlimited { "-".into() } else { format!("{:.3}", a.epsilon_remaining) },
                format!("{:.2e}", a.delta_budget),
                format!("{:.2e}", a.delta_spent),
                a.releases.to_string(),
                a.updated_at.clone(),
            ]).collect::<Vec<_>>()))
        h2 { "Set a budget" }
        form hx-post="/privacy/budget" hx-target="#budget-result" class="stack" {
            label { "Identity (URI, ROLE/SITE/NAME or NAME) " input name="identity" required size="40"; }
            label { "Total ε " input name="epsilon" type="number" step="any" min="0" required; }
            label { "Total δ " input name="delta" type="number" step="any" min="0" value="0"; }
            button type="submit" { "Set" }
        }
        div id="budget-result" aria-live="polite" {}
    };
    frame(&ui, &csrf, "/privacy", "Privacy budgets", body)
}

#[derive(Deserialize)]
struct BudgetForm {
    identity: String,
    epsilon: String,
    #[serde(default)]
    delta: String,
}

async fn set_budget(
    State(ui): State<Shared>,
    axum::Form(form): axum::Form<BudgetForm>,
) -> Response {
    let (epsilon, delta) = match (
        parse_number(&form.epsilon, "ε"),
        parse_number(&form.delta, "δ"),
    ) {
        (Ok(e), Ok(d)) => (e, d),
        (Err(m), _) | (_, Err(m)) => {
            return local_error(StatusCode::BAD_REQUEST, "Not a number", &m);
        }
    };
    match node(&ui)
        .set_budget(pb::SetBudgetRequest {
            identity: form.identity,
            epsilon,
            delta,
        })
        .await
    {
        Ok(a) => {
            let a = a.into_inner();
            Html(html! { p role="status" { (a.identity) ": ε " (a.epsilon_budget) ", δ " (a.delta_budget) " (audited). " a href="/privacy" { "Reload" } } }.into_string()).into_response()
        }
        Err(s) => fragment_error(&s),
    }
}

async fn audit_page(
    State(ui): State<Shared>,
    Extension(csrf): Extension<Csrf>,
    headers: HeaderMap,
) -> Response {
    let log = match node(&ui).audit_log(pb::AuditLogRequest::default()).await {
        Ok(r) => r.into_inner(),
        Err(s) => return grpc_error(&ui, &csrf, &headers, "/audit", "Audit chain", &s),
    };
    // The newest 500 entries, newest first.
    let shown: Vec<&pb::AuditEntry> = log.entries.iter().rev().take(500).collect();
    let mut by_method: BTreeMap<&str, usize> = BTreeMap::new();
    for e in &log.entries {
        *by_method.entry(e.method.as_str()).or_default() += 1;
    }
    let body = html! {
        p { (log.entries.len()) " entries · head " code { (log.head) } }
        button hx-post="/audit/verify" hx-target="#verify-result" { "Verify the whole chain" }
        div id="verify-result" aria-live="polite" {}
        (table("Entries by method", &["method".into(), "entries".into()], &by_method.iter().map(|(m, n)| vec![m.to_string(), n.to_string()]).collect::<Vec<_>>()))
        (table("Newest entries", &["seq", "time", "identity", "method", "query", "ε", "δ", "via"].map(String::from),
            &shown.iter().map(|e| vec![
                e.seq.to_string(), e.time.clone(), e.identity.clone(), e.method.clone(), e.query.clone(),
                if e.epsilon > 0.0 { format!("{:.4}", e.epsilon) } else { String::new() },
                if e.delta > 0.0 { format!("{:.2e}", e.delta) } else { String::new() },
                e.via.clone(),
            ]).collect::<Vec<_>>()))
    };
    frame(&ui, &csrf, "/audit", "Audit chain", body)
}

async fn verify_audit(State(ui): State<Shared>) -> Response {
    match node(&ui).verify_audit(pb::VerifyAuditRequest {}).await {
        Ok(v) => {
            let v = v.into_inner();
            Html(html! {
                @if v.ok {
                    p role="status" data-testid="verify" class="ok" { "The chain verifies: " (v.entries) " entries, head " code { (v.head) } "." }
                } @else {
                    div role="alert" data-testid="verify" class="error" { p { "Broken at entry " (v.broken_seq) ": " (v.reason) } }
                }
            }.into_string()).into_response()
        }
        Err(s) => fragment_error(&s),
    }
}

pub(crate) fn fragment_error(s: &tonic::Status) -> Response {
    (
        page::http_status(s.code()),
        Html(page::status_markup(s).into_string()),
    )
        .into_response()
}
