//! `cxrfed.v1.NodeService`, the node's gRPC layer: each handler takes the request apart
//! (`Rpc::of`), runs the domain call inside `Rpc::observe` (span, request id, in-flight count,
//! one log line) and converts the answer. The domain (extraction, statistics and DP releases,
//! ingest jobs, exports) lives below it; nothing below imports this module.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use chrono::{DateTime, Utc};
use cxrfed_proto::v1 as pb;
use cxrfed_proto::v1::node_service_server::NodeService;
use cxrfed_store::RecordFilter;
use tokio_stream::Stream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, Span, field};

use crate::error::NodeError;
use crate::privacy::{budget_account, dp_response};
use crate::state::Node;

/// Upload chunks above this size are refused by the transport (the client sends 1 MiB).
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024 + 64 * 1024;
const DEFAULT_PAGE_SIZE: u32 = 100;
const MAX_PAGE_SIZE: u32 = 1000;

/// The gRPC face of the node.
#[derive(Debug, Clone)]
pub struct NodeApi {
    state: Arc<Node>,
}

impl NodeApi {
    pub fn new(state: Arc<Node>) -> Self {
        NodeApi { state }
    }
}

/// The request id from `x-request-id` when it is a sane token, else a new UUID.
pub fn request_id(metadata: &MetadataMap) -> String {
    metadata
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 128
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// Who called: the connection's address and the verified identity.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    pub remote: Option<std::net::SocketAddr>,
    pub identity: Option<String>,
    /// The verified identity (set by the authorization layer).
    pub who: Option<cxrfed_auth::Identity>,
}

impl Caller {
    pub fn of<T>(request: &Request<T>) -> Caller {
        let extensions = request.extensions();
        Caller {
            remote: extensions
                .get::<cxrfed_auth::PeerInfo>()
                .and_then(|p| p.remote)
                .or_else(|| request.remote_addr()),
            identity: extensions
                .get::<cxrfed_auth::Identity>()
                .map(cxrfed_auth::Identity::uri),
            who: extensions.get::<cxrfed_auth::Identity>().cloned(),
        }
    }
}

/// Decrements the in-flight counter however the request ends.
struct InFlight<'a>(&'a AtomicU32);

impl<'a> InFlight<'a> {
    fn enter(counter: &'a AtomicU32) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        InFlight(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One admitted request: the method the authorization layer resolved, the request id and
/// the caller. Every handler starts with `Rpc::of` and runs inside `observe`.
struct Rpc {
    method: String,
    request_id: String,
    caller: Caller,
}

impl Rpc {
    /// The request's method, id and caller (the caller also returned for the handler's use).
    fn of<T>(request: &Request<T>) -> (Rpc, Caller) {
        let caller = Caller::of(request);
        let method = request
            .extensions()
            .get::<cxrfed_auth::RpcMethod>()
            .map_or_else(|| "unknown".to_string(), |m| m.as_str().to_string());
        let rpc = Rpc {
            method,
            request_id: request_id(request.metadata()),
            caller: caller.clone(),
        };
        (rpc, caller)
    }

    /// Runs the handler inside the request's span and writes the one log line per request:
    /// method, request id, image hash and record id when known, processing time and outcome.
    async fn observe<T, F>(
        self,
        state: &Node,
        handler: impl FnOnce(String) -> F,
    ) -> Result<Response<T>, Status>
    where
        F: Future<Output = Result<T, NodeError>>,
    {
        let Rpc {
            method,
            request_id,
            caller,
        } = self;
        let span = tracing::info_span!(
            "request",
            method = method.as_str(),
            request_id = %request_id,
            // The caller's address and the identity its certificate carries (set by the
            // authorization layer, which has already admitted it).
            peer = %caller.remote.map(|p| p.to_string()).unwrap_or_default(),
            identity = caller.identity.as_deref().unwrap_or("-"),
            image_sha256 = field::Empty,
            record_id = field::Empty,
        );
        let _guard = InFlight::enter(state.in_flight());
        let started = Instant::now();
        let result = handler(request_id.clone()).instrument(span.clone()).await;
        let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
        state.metrics().observe_rpc(
            &method,
            result.as_ref().map_or_else(|e| e.kind(), |_| "ok"),
            elapsed_ms / 1000.0,
        );
        span.in_scope(|| match &result {
            Ok(_) => tracing::info!(outcome = "ok", elapsed_ms, "request finished"),
            Err(e) => tracing::warn!(outcome = e.kind(), elapsed_ms, error = %e, "request failed"),
        });
        let mut response = result.map(Response::new).map_err(Status::from)?;
        if let Ok(value) = request_id.parse() {
            response.metadata_mut().insert("x-request-id", value);
        }
        Ok(response)
    }
}

impl NodeApi {
    async fn ask_inner(&self, request: pb::AskRequest) -> Result<pb::AskResponse, NodeError> {
        use cxrfed_schema::flat::Cell;
        use cxrfed_schema::lexicon::Interpretation;
        let id = request.record_id;
        uuid::Uuid::parse_str(&id)
            .map_err(|_| NodeError::InvalidRequest(format!("record_id {id:?} is not a UUID")))?;
        if request.question.trim().is_empty() || request.question.len() > 2000 {
            return Err(NodeError::InvalidRequest(
                "the question must be 1 to 2000 bytes".into(),
            ));
        }
        let record = self
            .state
            .store()
            .get(&id)?
            .ok_or_else(|| NodeError::NotFound(id.clone()))?;
        // Custom fields first: their synonyms are the study's own words.
        let lowered = request.question.to_lowercase();
        let custom = Some(self.state.custom_fields().read()).and_then(|fields| {
            fields
                .values()
                .flat_map(|f| {
                    std::iter::once(f.name.replace('_', " "))
                        .chain(f.synonyms.iter().map(|s| s.to_lowercase()))
                        .map(move |p| (f.clone(), p))
                })
                .filter(|(_, p)| !p.trim().is_empty() && lowered.contains(p.as_str()))
                .max_by_key(|(_, p)| p.chars().count())
        });
        if let Some((definition, phrase)) = custom {
            let mut count = 0u64;
            for a in self.state.store().annotations() {
                if a?.field == definition.name {
                    count += 1;
                }
            }
            let own = self
                .state
                .store()
                .annotations_of(&record.image_sha256)?
                .into_iter()
                .find(|a| a.field == definition.name);
            let answer = format!(
                "{} is a custom field: no model head fills it yet; {count} image(s) are annotated for it{}.",
                definition.name,
                own.as_ref()
                    .map(|a| format!(", this one as {} by {}", a.value, a.annotator))
                    .unwrap_or_default()
            );
            return Ok(pb::AskResponse {
                understood: true,
                field: definition.name.clone(),
                matched_phrase: phrase,
                value: own.map(|a| a.value).unwrap_or_default(),
                answer,
                ..Default::default()
            });
        }
        let (field, phrase, yes) = match self.state.lexicon().interpret(&request.question) {
            Interpretation::Unknown { suggestions } => {
                let listed = suggestions
                    .iter()
                    .map(|(f, p)| format!("{f} (\"{p}\")"))
                    .collect::<Vec<_>>()
                    .join(", ");
                tracing::info!(understood = false, "question not understood");
                return Ok(pb::AskResponse {
                    understood: false,
                    answer: format!(
                        "The question matches no known field, so nothing was added to the record. Closest fields: {listed}."
                    ),
                    suggestions: suggestions
                        .into_iter()
                        .map(|(field, phrase)| pb::AskSuggestion { field, phrase })
                        .collect(),
                    ..Default::default()
                });
            }
            Interpretation::Field { field, phrase, yes } => (field, phrase, yes),
        };
        let flat = cxrfed_schema::flat::field(&field)
            .ok_or_else(|| NodeError::Internal(format!("lexicon field {field} is not a column")))?;
        let (value, probability) = if record.findings.is_none() {
            (String::new(), 0.0)
        } else {
            let value = match (flat.get)(&record) {
                Cell::Number(x) => format!("{x:.3}"),
                cell => cell.to_text(),
            };
            (
                value,
                flat.probability.and_then(|p| p(&record)).unwrap_or(0.0),
            )
        };
        let yes_no = if yes.is_empty() {
            pb::YesNo::Unspecified
        } else if value.is_empty() {
            pb::YesNo::Unknown
        } else if yes.contains(&value) {
            pb::YesNo::Yes
        } else {
            pb::YesNo::No
        };
        let answer = if value.is_empty() {
            format!(
                "{field}: this record has no findings (it was stored without a model), so there is nothing to answer from."
            )
        } else {
            let verdict = match yes_no {
                pb::YesNo::Yes => ": yes",
                pb::YesNo::No => ": no",
                _ => "",
            };
            format!("{field} is {value} (probability {probability:.2}){verdict}.")
        };
        let updated = self
            .state
            .store()
            .append_question(
                &id,
                cxrfed_schema::QuestionAnswer {
                    field: field.clone(),
                    value: value.clone(),
                    probability,
                    source: "question".into(),
                    matched_phrase: phrase.clone(),
                    asked_at: chrono::Utc::now(),
                },
            )
            .await?
            .ok_or_else(|| NodeError::NotFound(id.clone()))?;
        tracing::info!(
            field = field.as_str(),
            record_id = id.as_str(),
            "question answered"
        );
        Ok(pb::AskResponse {
            understood: true,
            field,
            matched_phrase: phrase,
            value,
            probability,
            yes_values: yes,
            yes_no: yes_no as i32,
            answer,
            suggestions: Vec::new(),
            record: Some(pb::Record::from(&self.state.with_annotations(updated)?)),
        })
    }

    async fn receive_upload(
        &self,
        mut stream: Streaming<pb::ExtractRequest>,
    ) -> Result<(pb::ExtractHeader, Vec<u8>), NodeError> {
        let limit = self.state.pipeline().limits().max_file_bytes;
        let first = stream
            .message()
            .await
            .map_err(NodeError::Stream)?
            .ok_or_else(|| NodeError::InvalidRequest("empty upload: no message was sent".into()))?;
        let header = first.header.ok_or_else(|| {
            NodeError::InvalidRequest("the first ExtractRequest must carry `header`".into())
        })?;
        if header.size_hint > limit {
            return Err(NodeError::UploadTooLarge {
                size: header.size_hint,
                limit,
            });
        }
        let mut bytes = Vec::with_capacity(header.size_hint.min(limit) as usize);
        bytes.extend_from_slice(&first.chunk);
        while let Some(message) = stream.message().await.map_err(NodeError::Stream)? {
            if message.header.is_some() {
                return Err(NodeError::InvalidRequest(
                    "`header` may only be sent in the first ExtractRequest".into(),
                ));
            }
            let size = (bytes.len() + message.chunk.len()) as u64;
            if size > limit {
                return Err(NodeError::UploadTooLarge { size, limit });
            }
            bytes.extend_from_slice(&message.chunk);
        }
        Ok((header, bytes))
    }

    async fn extract_inner(
        &self,
        stream: Streaming<pb::ExtractRequest>,
        request_id: String,
    ) -> Result<pb::ExtractResponse, NodeError> {
        if self.state.shutdown().is_cancelled() {
            return Err(NodeError::ShuttingDown);
        }
        let (header, bytes) = self.receive_upload(stream).await?;
        tracing::debug!(bytes = bytes.len(), "upload received");
        let (record, created) = self
            .state
            .extract_and_store(bytes, &header.filename, header.force, request_id)
            .await?;
        tracing::info!(
            created,
            processing_ms = record.processing_ms,
            "record stored"
        );
        Ok(pb::ExtractResponse {
            record: Some(pb::Record::from(&record)),
            created,
        })
    }

    fn list_inner(
        &self,
        request: pb::ListRecordsRequest,
    ) -> Result<Vec<pb::ListRecordsResponse>, NodeError> {
        let page_size = match request.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n > MAX_PAGE_SIZE => {
                return Err(NodeError::InvalidRequest(format!(
                    "page_size {n} is above the maximum of {MAX_PAGE_SIZE}"
                )));
            }
            n => n,
        };
        let after = if request.page_token.is_empty() {
            None
        } else {
            uuid::Uuid::parse_str(&request.page_token).map_err(|_| {
                NodeError::InvalidRequest(
                    "page_token is not a token returned by ListRecords".into(),
                )
            })?;
            Some(request.page_token.as_str())
        };
        let month = |name: &str, value: &str| -> Result<Option<String>, NodeError> {
            if value.is_empty() {
                Ok(None)
            } else if cxrfed_schema::is_valid_month(value) {
                Ok(Some(value.to_string()))
            } else {
                Err(NodeError::InvalidRequest(format!(
                    "{name} {value:?} is not a month in YYYY-MM form"
                )))
            }
        };
        let filter = RecordFilter {
            view: match request.view() {
                pb::View::Unspecified => None,
                view => Some(view.into()),
            },
            modality: Some(request.modality.trim().to_string()).filter(|m| !m.is_empty()),
            month_from: month("month_from", &request.month_from)?,
            month_to: month("month_to", &request.month_to)?,
        };
        let (records, more) = self
            .state
            .store()
            .list(after, page_size as usize, &filter)?;
        let next_page_token = if more {
            records
                .last()
                .map(|r| r.record_id.clone())
                .unwrap_or_default()
        } else {
            String::new()
        };
        let returned = records.len() as u32;
        let mut out: Vec<_> = records
            .into_iter()
            .map(|r| {
                let r = self.state.with_annotations(r)?;
                Ok(pb::ListRecordsResponse {
                    item: Some(pb::list_records_response::Item::Record(pb::Record::from(
                        &r,
                    ))),
                })
            })
            .collect::<Result<_, NodeError>>()?;
        out.push(pb::ListRecordsResponse {
            item: Some(pb::list_records_response::Item::PageEnd(pb::PageEnd {
                next_page_token,
                returned,
            })),
        });
        Ok(out)
    }
}

type RecordStream = Pin<Box<dyn Stream<Item = Result<pb::ListRecordsResponse, Status>> + Send>>;
type ExportStream = Pin<Box<dyn Stream<Item = Result<pb::ExportChunk, Status>> + Send>>;

fn stats_cell(cell: cxrfed_stats::TableCell) -> pb::StatsCell {
    use cxrfed_stats::TableCell;
    use pb::stats_cell::Value;
    pb::StatsCell {
        value: match cell {
            TableCell::Text(t) => Some(Value::Text(t)),
            TableCell::Count(n) => Some(Value::Count(n)),
            TableCell::Number(x) => Some(Value::Number(x)),
            TableCell::Empty => None,
        },
    }
}

/// The record JSON Schema with this site's custom fields spelled out under `custom_fields`.
fn with_custom_fields(
    mut schema: serde_json::Value,
    custom: &[cxrfed_schema::custom::FieldDefinition],
) -> serde_json::Value {
    use cxrfed_schema::custom::CustomKind;
    let properties: serde_json::Map<String, serde_json::Value> = custom
        .iter()
        .map(|d| {
            let mut field = match &d.kind {
                CustomKind::Bool => serde_json::json!({"enum": ["true", "false", null]}),
                CustomKind::Categorical { values } => {
                    let mut values: Vec<serde_json::Value> = values
                        .iter()
                        .map(|v| serde_json::Value::from(v.as_str()))
                        .collect();
                    values.push(serde_json::Value::Null);
                    serde_json::json!({ "enum": values })
                }
                CustomKind::Numeric { min, max } => serde_json::json!({
                    "type": ["string", "null"],
                    "description": format!("a number in {min}..={max}, as text"),
                }),
            };
            if let Some(object) = field.as_object_mut() {
                object.insert(
                    "title".into(),
                    format!("{} (custom field v{})", d.name, d.version).into(),
                );
                if !d.description.is_empty() {
                    object
                        .entry("description")
                        .or_insert(d.description.clone().into());
                }
            }
            (d.name.clone(), field)
        })
        .collect();
    if custom.is_empty() {
        return schema;
    }
    if let Some(custom_fields) = schema
        .get_mut("properties")
        .and_then(|p| p.get_mut("custom_fields"))
        .and_then(|c| c.as_object_mut())
    {
        custom_fields.insert("properties".into(), serde_json::Value::Object(properties));
    }
    schema
}

fn query_error(e: cxrfed_stats::QueryError) -> NodeError {
    NodeError::InvalidRequest(format!("query: {e}"))
}

/// The query of a request: its text, or its structured form (exactly one).
fn request_query(
    text: &str,
    structured: Option<pb::StructuredQuery>,
) -> Result<cxrfed_stats::Query, NodeError> {
    match (text.trim().is_empty(), structured) {
        (false, None) => cxrfed_stats::query::parse(text).map_err(query_error),
        (true, Some(s)) => cxrfed_stats::query::structured(
            &s.statistic,
            &s.fields,
            &s.conditions
                .into_iter()
                .map(|c| (c.field, c.op, c.values))
                .collect::<Vec<_>>(),
            &s.by,
            &s.normalize,
        )
        .map_err(query_error),
        _ => Err(NodeError::InvalidRequest(
            "give exactly one of query and structured".into(),
        )),
    }
}

/// The verified identity of a request; the authorization layer always sets one.
fn caller_identity(peer: &Caller) -> Result<&cxrfed_auth::Identity, NodeError> {
    peer.who
        .as_ref()
        .ok_or_else(|| NodeError::Internal("the request carries no verified identity".into()))
}

#[tonic::async_trait]
impl NodeService for NodeApi {
    async fn extract(
        &self,
        request: Request<Streaming<pb::ExtractRequest>>,
    ) -> Result<Response<pb::ExtractResponse>, Status> {
        let (rpc, _) = Rpc::of(&request);
        let stream = request.into_inner();
        rpc.observe(&self.state, |rid| self.extract_inner(stream, rid))
            .await
    }

    async fn get_record(
        &self,
        request: Request<pb::GetRecordRequest>,
    ) -> Result<Response<pb::Record>, Status> {
        let (rpc, _) = Rpc::of(&request);
        let id = request.into_inner().record_id;
        rpc.observe(&self.state, |_| async {
            uuid::Uuid::parse_str(&id).map_err(|_| {
                NodeError::InvalidRequest(format!("record_id {id:?} is not a UUID"))
            })?;
            Span::current().record("record_id", id.as_str());
            let store = self.state.store().clone();
            let lookup = id.clone();
            let record = tokio::task::spawn_blocking(move || store.get(&lookup))
                .await
                .map_err(|_| NodeError::InvalidRequest("lookup was cancelled".into()))??
                .ok_or_else(|| NodeError::NotFound(id.clone()))?;
            Span::current().record("image_sha256", record.image_sha256.as_str());
            let record = self.state.with_annotations(record)?;
            Ok(pb::Record::from(&record))
        })
        .await
    }

    async fn get_record_input(
        &self,
        request: Request<pb::GetRecordRequest>,
    ) -> Result<Response<pb::RecordInput>, Status> {
        let (rpc, _) = Rpc::of(&request);
        let id = request.into_inner().record_id;
        rpc.observe(&self.state, |_| async {
            uuid::Uuid::parse_str(&id).map_err(|_| {
                NodeError::InvalidRequest(format!("record_id {id:?} is not a UUID"))
            })?;
            Span::current().record("record_id", id.as_str());
            let store = self.state.store().clone();
            let lookup = id.clone();
            let input = tokio::task::spawn_blocking(move || {
                let record = store
                    .get(&lookup)?
                    .ok_or_else(|| NodeError::NotFound(lookup.clone()))?;
                store
                    .input(&record.image_sha256)?
                    .and_then(|kept| {
                        cxrfed_imaging::input_png(kept.size, &kept.pixels)
                            .map(|png| (kept.size, png))
                    })
                    .ok_or_else(|| NodeError::NotFound(format!("{lookup}'s model input")))
            })
            .await
            .map_err(|_| NodeError::InvalidRequest("lookup was cancelled".into()))??;
            Ok(pb::RecordInput {
                size: input.0,
                png: input.1,
            })
        })
        .await
    }

    type ListRecordsStream = RecordStream;

    async fn list_records(
        &self,
        request: Request<pb::ListRecordsRequest>,
    ) -> Result<Response<Self::ListRecordsStream>, Status> {
        let (rpc, _) = Rpc::of(&request);
        let request = request.into_inner();
        rpc.observe(&self.state, |_| async {
            let api = self.clone();
            let items = tokio::task::spawn_blocking(move || api.list_inner(request))
                .await
                .map_err(|_| NodeError::InvalidRequest("listing was cancelled".into()))??;
            let stream: RecordStream = Box::pin(tokio_stream::iter(items.into_iter().map(Ok)));
            Ok(stream)
        })
        .await
    }

    async fn stats(
        &self,
        request: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        let (rpc, peer) = Rpc::of(&request);
        let request = request.into_inner();
        rpc.observe(&self.state, |_| async {
            let query = request_query(&request.query, request.structured)?;
            let canonical = query.canonical();
            let state = self.state.clone();
            let response = tokio::task::spawn_blocking(move || {
                let columns = state.columns().snapshot();
                let table = cxrfed_stats::exact_query(&columns, query).map_err(query_error)?;
                tracing::info!(
                    statistic = table.statistic.as_str(),
                    cohort = table.cohort_size,
                    "exact statistics released to the site admin"
                );
                let digest = crate::privacy::digest_of(&table);
                Ok::<_, NodeError>((
                    digest,
                    pb::StatsResponse {
                        statistic: table.statistic,
                        columns: table.columns,
                        rows: table
                            .rows
                            .into_iter()
                            .map(|row| pb::StatsRow {
                                cells: row.into_iter().map(stats_cell).collect(),
                            })
                            .collect(),
                        cohort_size: table.cohort_size,
                        record_count: columns.len() as u64,
                    },
                ))
            })
            .await
            .map_err(|e| NodeError::Internal(format!("statistics task: {e}")))?;
            let (digest, response) = response?;
            self.state
                .store()
                .audit(crate::privacy::event(
                    peer.who.as_ref(),
                    "Stats",
                    canonical,
                    digest,
                ))
                .await?;
            Ok(response)
        })
        .await
    }

    type ExportStream = ExportStream;

    async fn export(
        &self,
        request: Request<pb::ExportRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        let (rpc, peer) = Rpc::of(&request);
        let request = request.into_inner();
        rpc.observe(&self.state, |_| async {
            let format = crate::export::Format::parse(&request.format).ok_or_else(|| {
                NodeError::InvalidRequest(format!(
                    "export format {:?} must be csv, jsonl, parquet or records",
                    request.format
                ))
            })?;
            let conditions =
                cxrfed_stats::query::parse_filter(&request.r#where).map_err(query_error)?;
            let images = {
                let columns = self.state.columns().snapshot();
                let bound = cxrfed_stats::exact::bind(
                    &columns,
                    cxrfed_stats::Query {
                        statistic: cxrfed_stats::query::Statistic::Count,
                        conditions,
                        by: None,
                        normalize: cxrfed_stats::query::Normalize::None,
                    },
                )
                .map_err(query_error)?;
                bound
                    .cohort(&columns)
                    .into_iter()
                    .map(|row| columns.images()[row].clone())
                    .collect::<std::collections::HashSet<String>>()
            };
            tracing::info!(records = images.len(), "export started");
            let mut exported: Vec<&String> = images.iter().collect();
            exported.sort();
            self.state
                .store()
                .audit(crate::privacy::event(
                    peer.who.as_ref(),
                    "Export",
                    format!(
                        "export {} where {} ({} records)",
                        format.name(),
                        request.r#where.trim(),
                        images.len()
                    ),
                    crate::privacy::digest_of(&exported),
                ))
                .await?;
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let store = self.state.store().clone();
            let custom: Vec<String> = self.state.custom_fields().read().keys().cloned().collect();
            tokio::task::spawn_blocking(move || {
                crate::export::produce(&store, &images, format, &custom, &tx);
            });
            let stream: ExportStream = Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx));
            Ok(stream)
        })
        .await
    }

    async fn ask(
        &self,
        request: Request<pb::AskRequest>,
    ) -> Result<Response<pb::AskResponse>, Status> {
        let (rpc, _) = Rpc::of(&request);
        let request = request.into_inner();
        rpc.observe(&self.state, |_| async { self.ask_inner(request).await })
            .await
    }

    async fn get_schema(
        &self,
        request: Request<pb::GetSchemaRequest>,
    ) -> Result<Response<pb::GetSchemaResponse>, Status> {
        use cxrfed_schema::flat::{FIELDS, FieldKind};
        let (rpc, _) = Rpc::of(&request);
        rpc.observe(&self.state, |_| async {
            let custom: Vec<cxrfed_schema::custom::FieldDefinition> = self
                .state
                .custom_fields()
                .read()
                .values()
                .cloned()
                .collect();
            let mut response = pb::GetSchemaResponse {
                schema_version: cxrfed_schema::SCHEMA_VERSION.to_string(),
                record_json_schema: serde_json::to_string_pretty(&with_custom_fields(
                    cxrfed_schema::record_json_schema(),
                    &custom,
                ))
                .map_err(|e| NodeError::Internal(e.to_string()))?,
                fields: FIELDS
                    .iter()
                    .map(|f| {
                        let (kind, min, max) = match f.kind {
                            FieldKind::Categorical(_) => ("categorical", 0.0, 0.0),
                            FieldKind::Bool => ("bool", 0.0, 0.0),
                            FieldKind::Numeric { min, max } => ("numeric", min, max),
                            FieldKind::Month => ("month", 0.0, 0.0),
                            FieldKind::Text => ("text", 0.0, 0.0),
                        };
                        pb::FieldInfo {
                            name: f.name.to_string(),
                            kind: kind.to_string(),
                            description: f.description.to_string(),
                            categories: f
                                .kind
                                .categories()
                                .unwrap_or(&[])
                                .iter()
                                .map(|c| c.to_string())
                                .collect(),
                            min,
                            max,
                            has_probability: f.probability.is_some(),
                        }
                    })
                    .collect(),
            };
            response.fields.extend(custom.iter().map(|d| {
                use cxrfed_schema::custom::CustomKind;
                let (kind, categories, min, max) = match &d.kind {
                    CustomKind::Bool => ("bool", vec!["false".into(), "true".into()], 0.0, 0.0),
                    CustomKind::Categorical { values } => ("categorical", values.clone(), 0.0, 0.0),
                    CustomKind::Numeric { min, max } => ("numeric", Vec::new(), *min, *max),
                };
                pb::FieldInfo {
                    name: d.name.clone(),
                    kind: kind.into(),
                    description: format!("custom field v{}: {}", d.version, d.description),
                    categories,
                    min,
                    max,
                    has_probability: false,
                }
            }));
            Ok(response)
        })
        .await
    }

    async fn define_field(
        &self,
        request: Request<pb::DefineFieldRequest>,
    ) -> Result<Response<pb::FieldDefinition>, Status> {
        let (rpc, peer) = Rpc::of(&request);
        let field = request.into_inner().field.unwrap_or_default();
        rpc.observe(&self.state, |_| async {
            let kind = cxrfed_proto::custom_kind(&field)
                .map_err(|e| NodeError::InvalidRequest(e.to_string()))?;
            let definition = cxrfed_schema::custom::FieldDefinition {
                name: field.name.trim().to_string(),
                kind,
                description: field.description,
                synonyms: field.synonyms,
                version: 0,
                defined_at: chrono::Utc::now(),
                defined_by: peer.identity.clone().unwrap_or_default(),
            };
            definition.validate().map_err(NodeError::InvalidRequest)?;
            let stored = self.state.store().define_field(definition).await?;
            // A redefinition keeps the labels that still fit the new definition.
            let (store, definition) = (self.state.store().clone(), stored.clone());
            self.state
                .columns()
                .update(move |columns| {
                    columns.define_custom(&definition);
                    for annotation in store.annotations() {
                        let annotation = annotation?;
                        if annotation.field == definition.name
                            && definition.check_value(&annotation.value).is_ok()
                        {
                            columns.annotate(
                                &annotation.image_sha256,
                                &annotation.field,
                                &annotation.value,
                            );
                        }
                    }
                    Ok::<_, NodeError>(())
                })
                .await??;
            self.state
                .custom_fields()
                .write()
                .insert(stored.name.clone(), stored.clone());
            tracing::info!(
                field = stored.name.as_str(),
                version = stored.version,
                "custom field defined"
            );
            Ok(pb::FieldDefinition::from(&stored))
        })
        .await
    }

    async fn list_fields(
        &self,
        request: Request<pb::ListFieldsRequest>,
    ) -> Result<Response<pb::ListFieldsResponse>, Status> {
        let (rpc, _) = Rpc::of(&request);
        rpc.observe(&self.state, |_| async {
            Ok(pb::ListFieldsResponse {
                fields: self
                    .state
                    .store()
                    .custom_fields()?
                    .iter()
                    .map(pb::FieldDefinition::from)
                    .collect(),
            })
        })
        .await
    }

    async fn annotate(
        &self,
        request: Request<pb::AnnotateRequest>,
    ) -> Result<Response<pb::AnnotateResponse>, Status> {
        let (rpc, peer) = Rpc::of(&request);
        let request = request.into_inner();
        rpc.observe(&self.state, |_| async {
            let record = match (
                request.record_id.is_empty(),
                request.image_sha256.is_empty(),
            ) {
                (false, true) => {
                    uuid::Uuid::parse_str(&request.record_id).map_err(|_| {
                        NodeError::InvalidRequest(format!(
                            "record_id {:?} is not a UUID",
                            request.record_id
                        ))
                    })?;
                    self.state.store().get(&request.record_id)?
                }
                (true, false) => self.state.store().get_by_image(&request.image_sha256)?,
                _ => {
                    return Err(NodeError::InvalidRequest(
                        "give exactly one of record_id and image_sha256".into(),
                    ));
                }
            }
            .ok_or_else(|| {
                NodeError::NotFound(if request.record_id.is_empty() {
                    format!("for image {}", request.image_sha256)
                } else {
                    request.record_id.clone()
                })
            })?;
            let custom = self
                .state
                .custom_fields()
                .read()
                .get(&request.field)
                .cloned();
            let value = match custom {
                Some(definition) => definition.check_value(&request.value),
                None if cxrfed_schema::flat::field(&request.field).is_some() => {
                    cxrfed_schema::custom::check_schema_value(&request.field, &request.value)
                }
                None => Err(format!(
                    "unknown field {:?}: define it first (`cxrfed field define`)",
                    request.field
                )),
            }
            .map_err(NodeError::InvalidRequest)?;
            let annotator = match request.annotator.trim() {
                "" => peer.identity.clone().unwrap_or_default(),
                name if name.len() <= 128 => name.to_string(),
                _ => {
                    return Err(NodeError::InvalidRequest(
                        "annotator is at most 128 bytes".into(),
                    ));
                }
            };
            let annotation = cxrfed_schema::custom::Annotation {
                image_sha256: record.image_sha256.clone(),
                field: request.field.clone(),
                value,
                annotator,
                annotated_at: chrono::Utc::now(),
                source: "annotation".into(),
            };
            self.state.store().annotate(&annotation).await?;
            self.state
                .store()
                .audit(crate::privacy::event(
                    peer.who.as_ref(),
                    "Annotate",
                    format!(
                        "{} = {:?} on record {}",
                        annotation.field, annotation.value, record.record_id
                    ),
                    crate::privacy::digest_of(&annotation),
                ))
                .await?;
            let indexed = annotation.clone();
            self.state
                .columns()
                .update(move |c| c.annotate(&indexed.image_sha256, &indexed.field, &indexed.value))
                .await?;
            Span::current().record("record_id", record.record_id.as_str());
            Ok(pb::AnnotateResponse {
                annotation: Some(pb::Annotation::from(&annotation)),
                record_id: record.record_id,
            })
        })
        .await
    }

    async fn start_ingest(
        &self,
        request: Request<pb::StartIngestRequest>,
    ) -> Result<Response<pb::IngestJob>, Status> {
        let (rpc, _) = Rpc::of(&request);
        let request = request.into_inner();
        rpc.observe(&self.state, |_| async {
            if self.state.shutdown().is_cancelled() {
                return Err(NodeError::ShuttingDown);
            }
            let job = crate::jobs::start(
                self.state.clone(),
                std::path::PathBuf::from(request.folder),
                request.force,
            )?;
            Ok(job.to_pb())
        })
        .await
    }

    async fn start_pull(
        &self,
        request: Request<pb::StartPullRequest>,
    ) -> Result<Response<pb::IngestJob>, Status> {
        let (rpc, _) = Rpc::of(&request);
        let request = request.into_inner();
        rpc.observe(&self.state, |_| async {
            if self.state.shutdown().is_cancelled() {
                return Err(NodeError::ShuttingDown);
            }
            let pacs = request
                .pacs
                .parse::<cxrfed_dicom::scu::Peer>()
                .map_err(NodeError::InvalidRequest)?;
            let query =
                crate::pull::PullQuery::parse(&request.query).map_err(NodeError::InvalidRequest)?;
            if !(request.rate.is_finite() && request.rate >= 0.0) {
                return Err(NodeError::InvalidRequest(
                    "rate must be a non-negative number of instances per second".into(),
                ));
            }
            let calling_ae = if request.calling_ae.is_empty() {
                self.state.config().dicom_ae.clone()
            } else {
                crate::receiver::validate_ae_title(&request.calling_ae)
                    .map_err(NodeError::InvalidRequest)?;
                request.calling_ae
            };
            let job = crate::pull::start(
                self.state.clone(),
                crate::pull::PullRequest {
                    pacs,
                    query,
                    limit: request.limit,
                    rate: request.rate,
                    calling_ae,
                },
            )?;
            Ok(job.to_pb())
        })
        .await
    }

    async fn ingest_jobs(
        &self,
        request: Request<pb::IngestJobsRequest>,
    ) -> Result<Response<pb::IngestJobsResponse>, Status> {
        let (rpc, _) = Rpc::of(&request);
        let id = request.into_inner().job_id;
        rpc.observe(&self.state, |_| async {
            let jobs = if id.is_empty() {
                self.state.jobs().all()
            } else {
                vec![
                    self.state
                        .jobs()
                        .get(&id)
                        .ok_or_else(|| NodeError::NotFound(format!("ingest job {id}")))?,
                ]
            };
            Ok(pb::IngestJobsResponse {
                jobs: jobs.iter().map(|j| j.to_pb()).collect(),
            })
        })
        .await
    }

    async fn dp_stats(
        &self,
        request: Request<pb::DpStatsRequest>,
    ) -> Result<Response<pb::DpStatsResponse>, Status> {
        let (rpc, peer) = Rpc::of(&request);
        let request = request.into_inner();
        rpc.observe(&self.state, |_| async {
            let identity = caller_identity(&peer)?;
            let query = request_query(&request.query, request.structured)?;
            let mechanism = pb::Mechanism::try_from(request.mechanism)
                .map(cxrfed_server::intent::mechanism_of)
                .map_err(|_| {
                    NodeError::InvalidRequest(format!(
                        "mechanism {:?} must be laplace or gaussian",
                        request.mechanism
                    ))
                })?;
            let state = &self.state;
            let limit = crate::privacy::limit_for(identity, &state.config().site, state.dp());
            let released = crate::privacy::release(
                state.store(),
                state.columns().clone(),
                state.dp(),
                identity,
                limit,
                crate::privacy::DpRequest::direct(query, request.epsilon, request.delta, mechanism),
                "DpStats",
            )
            .await?;
            state
                .metrics()
                .dp_release(identity.role.as_str(), released.release.cost.epsilon);
            Ok(dp_response(released))
        })
        .await
    }

    async fn budget(
        &self,
        request: Request<pb::BudgetRequest>,
    ) -> Result<Response<pb::BudgetAccount>, Status> {
        let (rpc, peer) = Rpc::of(&request);
        rpc.observe(&self.state, |_| async {
            let identity = caller_identity(&peer)?;
            let limit =
                crate::privacy::limit_for(identity, &self.state.config().site, self.state.dp());
            Ok(budget_account(
                self.state.store().account(&identity.uri(), limit)?,
            ))
        })
        .await
    }

    async fn set_budget(
        &self,
        request: Request<pb::SetBudgetRequest>,
    ) -> Result<Response<pb::BudgetAccount>, Status> {
        let (rpc, peer) = Rpc::of(&request);
        let request = request.into_inner();
        rpc.observe(&self.state, |_| async {
            let target = crate::privacy::resolve_identity(&request.identity, self.state.study())?;
            if !(request.epsilon.is_finite() && request.epsilon >= 0.0) {
                return Err(NodeError::InvalidRequest(format!(
                    "epsilon must be a non-negative number, got {}",
                    request.epsilon
                )));
            }
            if !(request.delta.is_finite() && (0.0..1.0).contains(&request.delta)) {
                return Err(NodeError::InvalidRequest(format!(
                    "delta must be in [0, 1), got {}",
                    request.delta
                )));
            }
            let (account, entry) = self
                .state
                .store()
                .set_budget(
                    &target,
                    cxrfed_store::Budget {
                        epsilon: request.epsilon,
                        delta: request.delta,
                    },
                    crate::privacy::event(
                        peer.who.as_ref(),
                        "SetBudget",
                        format!(
                            "budget of {target} set to epsilon {} delta {}",
                            request.epsilon, request.delta
                        ),
                        String::new(),
                    ),
                )
                .await?;
            tracing::info!(
                target_identity = target.as_str(),
                epsilon = request.epsilon,
                delta = request.delta,
                audit_seq = entry.seq,
                "privacy budget set"
            );
            Ok(budget_account(account))
        })
        .await
    }

    async fn list_budgets(
        &self,
        request: Request<pb::ListBudgetsRequest>,
    ) -> Result<Response<pb::ListBudgetsResponse>, Status> {
        let (rpc, _) = Rpc::of(&request);
        rpc.observe(&self.state, |_| async {
            let site_admin_prefix = format!(
                "cxrfed://{}/admin/{}/",
                self.state.study(),
                self.state.config().site
            );
            Ok(pb::ListBudgetsResponse {
                accounts: self
                    .state
                    .store()
                    .accounts()?
                    .into_iter()
                    .map(|mut a| {
                        a.unlimited = a.identity.starts_with(&site_admin_prefix);
                        budget_account(a)
                    })
                    .collect(),
            })
        })
        .await
    }

    async fn audit_log(
        &self,
        request: Request<pb::AuditLogRequest>,
    ) -> Result<Response<pb::AuditLogResponse>, Status> {
        let (rpc, _) = Rpc::of(&request);
        let request = request.into_inner();
        rpc.observe(&self.state, |_| async {
            let since = cxrfed_store::audit::parse_since(&request.since)
                .map_err(NodeError::InvalidRequest)?;
            let store = self.state.store().clone();
            let (entries, head) = tokio::task::spawn_blocking(move || {
                Ok::<_, NodeError>((store.audit_entries(since)?, store.verify_audit()?.head))
            })
            .await
            .map_err(|e| NodeError::Internal(format!("audit task: {e}")))??;
            Ok(pb::AuditLogResponse {
                entries: entries
                    .into_iter()
                    .map(cxrfed_server::audit::entry)
                    .collect(),
                head,
            })
        })
        .await
    }

    async fn get_training_policy(
        &self,
        request: Request<pb::GetTrainingPolicyRequest>,
    ) -> Result<Response<pb::TrainingPolicy>, Status> {
        let (rpc, _) = Rpc::of(&request);
        rpc.observe(&self.state, |_| async {
            let (policy, updated_at, updated_by) = crate::orders::policy(&self.state)?;
            Ok(pb::TrainingPolicy {
                policy_toml: policy.to_toml(),
                updated_at,
                updated_by,
            })
        })
        .await
    }

    async fn set_training_policy(
        &self,
        request: Request<pb::TrainingPolicy>,
    ) -> Result<Response<pb::TrainingPolicy>, Status> {
        let (rpc, peer) = Rpc::of(&request);
        let request = request.into_inner();
        rpc.observe(&self.state, |_| async {
            let policy = cxrfed_fl::SitePolicy::parse(&request.policy_toml)
                .map_err(NodeError::InvalidRequest)?;
            crate::orders::set_policy(&self.state, policy, peer.who.as_ref(), "SetTrainingPolicy")
                .await?;
            let (policy, updated_at, updated_by) = crate::orders::policy(&self.state)?;
            tracing::info!(
                by = updated_by.as_str(),
                enabled = policy.enabled,
                "training policy set"
            );
            Ok(pb::TrainingPolicy {
                policy_toml: policy.to_toml(),
                updated_at,
                updated_by,
            })
        })
        .await
    }

    async fn rollback_model(
        &self,
        request: Request<pb::RollbackModelRequest>,
    ) -> Result<Response<pb::RollbackModelResponse>, Status> {
        let (rpc, peer) = Rpc::of(&request);
        rpc.observe(&self.state, |_| async {
            if self.state.pipeline().model().is_none() {
                return Err(NodeError::FailedPrecondition(
                    "this node runs without a model".into(),
                ));
            }
            let response = crate::training::rollback(&self.state).await?;
            self.state
                .store()
                .audit(crate::privacy::event(
                    peer.who.as_ref(),
                    "RollbackModel",
                    format!("{} -> {}", response.replaced, response.model_id),
                    String::new(),
                ))
                .await?;
            Ok(response)
        })
        .await
    }

    async fn verify_audit(
        &self,
        request: Request<pb::VerifyAuditRequest>,
    ) -> Result<Response<pb::VerifyAuditResponse>, Status> {
        let (rpc, _) = Rpc::of(&request);
        rpc.observe(&self.state, |_| async {
            let store = self.state.store().clone();
            let report = tokio::task::spawn_blocking(move || store.verify_audit())
                .await
                .map_err(|e| NodeError::Internal(format!("audit task: {e}")))??;
            Ok(cxrfed_server::audit::verification(report))
        })
        .await
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let (rpc, _) = Rpc::of(&request);
        rpc.observe(&self.state, |_| async {
            let state = &self.state;
            Ok(pb::StatusResponse {
                version: env!("CARGO_PKG_VERSION").to_string(),
                site: state.config().site.clone(),
                listen_address: state.config().listen.to_string(),
                started_at: Some(prost_timestamp(state.started_at())),
                uptime_seconds: state.uptime().as_secs(),
                record_count: state.store().count() as u64,
                schema_version: cxrfed_schema::SCHEMA_VERSION.to_string(),
                model_id: state.pipeline().model().map_or_else(
                    || cxrfed_schema::NO_MODEL.to_string(),
                    |m| m.card().model_id.clone(),
                ),
                model: state.pipeline().model().map(|m| {
                    let stats = m.stats();
                    let config = m.config();
                    pb::ModelStatus {
                        model_id: m.card().model_id.clone(),
                        model_sha256: m.card().weights_sha256.clone(),
                        architecture: m.card().architecture.clone(),
                        device: m.device().to_string(),
                        input_size: m.card().input.size,
                        max_batch: config.max_batch as u32,
                        max_wait_ms: config.max_wait.as_millis() as u32,
                        queue_capacity: config.queue_capacity as u32,
                        images: stats.images,
                        batches: stats.batches,
                        max_batch_seen: stats.max_batch_seen as u32,
                        mean_forward_ms: stats.mean_forward_ms,
                        rejected: stats.rejected,
                        queued: stats.queued as u32,
                    }
                }),
                store_size_bytes: state.store().size_on_disk(),
                coordinator_link: state.link(),
                dicom_receiver: state.receiver_stats().to_pb(),
                pid: std::process::id(),
                // This request itself is not counted.
                in_flight: state.in_flight().load(Ordering::SeqCst).saturating_sub(1),
                ingest_jobs: state.jobs().all().iter().map(|j| j.to_pb()).collect(),
                backfill: state.backfill_status(),
            })
        })
        .await
    }
}

fn prost_timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}
