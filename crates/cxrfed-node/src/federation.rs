//! The node's link to the study coordinator. Hospital firewalls rarely accept inbound
//! connections, so the node dials out: one long-lived bidirectional stream, authenticated with
//! the node certificate, over which the coordinator sends tasks. The coordinator's certificate
//! must chain to the study CA, match the URL's host, say role `coordinator`, not be revoked by
//! the study's CRL, and be the pinned identity when `coordinator_identity` is set. The node keeps serving its
//! local users whether or not the link is up.
//!
//! - Heartbeats every `heartbeat_secs` (from the coordinator's Welcome) carry the model id and
//!   the record count as the site publishes it (`publish_record_count`: none by default).
//! - A dropped link is redialled with exponential backoff (1 s doubling to 60 s) and jitter
//!   (`backon`).
//! - A task's result that could not be sent is kept and sent after the next NodeHello; a task
//!   the coordinator sends again after a reconnect is answered from the kept result, never
//!   charged twice (the ledger also charges a signed request's nonce once).
//!
//! A task is a researcher's signed query. The node verifies the researcher's certificate
//! against the study CA (chain, revocation, expiry, role researcher, same study), the signature
//! over the exact intent bytes, the intent's study, site list and validity window, then releases
//! with its own DP mechanism, charging the researcher's own account in its ledger. Nothing but
//! that release (raw noisy values) or an error goes back.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cxrfed_auth::{ClientCredentials, Role};
use cxrfed_proto::Label;
use cxrfed_proto::v1 as pb;
use cxrfed_proto::v1::coordinator_service_client::CoordinatorServiceClient;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::NodeError;
use crate::state::Node;

/// How long a task's result is kept for a coordinator that asks again.
const KEEP_RESULTS: Duration = Duration::from_secs(3600);

#[derive(Debug, Default)]
struct Results {
    /// Every result of the last hour, by task id.
    done: HashMap<String, (Instant, pb::TaskResult)>,
    /// Results not yet delivered (the link was down when they were ready).
    unsent: Vec<pb::TaskResult>,
}

/// Starts the link in the background; it ends when `shutdown` fires.
pub fn spawn(
    state: Arc<Node>,
    url: String,
    credentials: ClientCredentials,
    check: cxrfed_auth::ServerCheck,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        let results = Arc::new(Mutex::new(Results::default()));
        let mut delays = reconnect_backoff();
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let started = Instant::now();
            match session(&state, &url, &credentials, &check, &shutdown, &results).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(coordinator = url.as_str(), error = %e, "coordinator link down; retrying");
                    state.set_link(&url, false, e.to_string());
                }
            }
            // A session that lasted resets the backoff.
            if started.elapsed() > Duration::from_secs(30) {
                delays = reconnect_backoff();
            }
            let delay = delays.next().unwrap_or(Duration::from_secs(60));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    });
}

/// Redial delays: 1 s doubling to 60 s, with jitter, without end.
fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_secs(1))
        .with_max_delay(Duration::from_secs(60))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// One connection: hello, then heartbeats out and tasks in until either side ends it.
async fn session(
    state: &Arc<Node>,
    url: &str,
    credentials: &ClientCredentials,
    check: &cxrfed_auth::ServerCheck,
    shutdown: &CancellationToken,
    results: &Arc<Mutex<Results>>,
) -> Result<(), String> {
    let channel = cxrfed_auth::client::connect_checked(url, credentials, check)
        .await
        .map_err(|e| e.to_string())?;
    let mut client = CoordinatorServiceClient::new(channel);
    let (tx, rx) = mpsc::channel::<pb::NodeMessage>(64);
    let send = |kind| pb::NodeMessage { kind: Some(kind) };
    tx.send(send(pb::node_message::Kind::Hello(pb::NodeHello {
        version: env!("CARGO_PKG_VERSION").to_string(),
        model_id: state.pipeline().model().map_or_else(
            || cxrfed_schema::NO_MODEL.to_string(),
            |m| m.card().model_id.clone(),
        ),
        record_count: state.config().published_count(state.store().count() as u64),
    })))
    .await
    .map_err(|e| e.to_string())?;
    let unsent = std::mem::take(&mut results.lock().unsent);
    for result in unsent {
        tx.send(send(pb::node_message::Kind::Result(result)))
            .await
            .map_err(|e| e.to_string())?;
    }
    let mut inbound = client
        .link(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("{}: {}", s.code(), s.message()))?
        .into_inner();
    tracing::info!(coordinator = url, "connected to the coordinator");
    state.set_link(url, true, String::new());
    let mut heartbeat = tokio::time::interval(Duration::from_secs(10));
    heartbeat.tick().await;
    // The one transfer whose weights are arriving (task or rollout id): a node assembles one
    // model at a time, so a coordinator cannot make it buffer many; a newer announcement
    // replaces an unfinished one (the coordinator retries what it abandoned).
    let mut incoming: Option<(String, crate::training::Incoming)> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = heartbeat.tick() => {
                tx.send(send(pb::node_message::Kind::Heartbeat(pb::Heartbeat {
                    record_count: state.config().published_count(state.store().count() as u64),
                    model_id: state.pipeline().model().map_or_else(
                        || cxrfed_schema::NO_MODEL.to_string(),
                        |m| m.card().model_id.clone(),
                    ),
                })))
                .await
                .map_err(|e| e.to_string())?;
            }
            message = inbound.message() => {
                let message = message
                    .map_err(|s| format!("{}: {}", s.code(), s.message()))?
                    .ok_or("the coordinator closed the stream")?;
                match message.kind {
                    Some(pb::coordinator_message::Kind::Welcome(w)) => {
                        let secs = u64::from(w.heartbeat_secs.clamp(1, 3600));
                        heartbeat = tokio::time::interval(Duration::from_secs(secs));
                        heartbeat.tick().await;
                    }
                    Some(pb::coordinator_message::Kind::Task(task)) => {
                        let (state, tx, results, via) =
                            (state.clone(), tx.clone(), results.clone(), url.to_string());
                        tokio::spawn(async move {
                            let result = answer(&state, task, &via, &results).await;
                            if let Err(e) = tx.send(pb::NodeMessage {
                                kind: Some(pb::node_message::Kind::Result(result)),
                            })
                            .await
                            {
                                let pb::node_message::Kind::Result(result) = e.0.kind.unwrap_or(
                                    pb::node_message::Kind::Heartbeat(pb::Heartbeat::default()),
                                ) else {
                                    return;
                                };
                                results.lock().unsent.push(result);
                            }
                        });
                    }
                    Some(pb::coordinator_message::Kind::Train(task)) => {
                        tracing::info!(job_id = task.job_id.as_str(), round = task.round, bytes = task.weights_bytes, "training task received");
                        let id = task.task_id.clone();
                        replace_transfer(&mut incoming, id, crate::training::Incoming::new(crate::training::Purpose::Train(task)));
                    }
                    Some(pb::coordinator_message::Kind::Rollout(rollout)) => {
                        tracing::info!(version = rollout.version.as_str(), bytes = rollout.weights_bytes, "promoted model arriving");
                        let id = rollout.rollout_id.clone();
                        replace_transfer(&mut incoming, id, crate::training::Incoming::new(crate::training::Purpose::Rollout(rollout)));
                    }
                    Some(pb::coordinator_message::Kind::MaskPeers(peers)) => {
                        state.deliver_mask_peers(peers);
                    }
                    Some(pb::coordinator_message::Kind::Weights(chunk)) => {
                        let complete = match incoming.as_mut() {
                            Some((id, transfer)) if *id == chunk.task_id => transfer.push(&chunk),
                            _ => {
                                tracing::debug!(task_id = chunk.task_id.as_str(), "weights of a task not being received; ignored");
                                false
                            }
                        };
                        if complete && let Some((_, transfer)) = incoming.take() {
                            tokio::spawn(crate::training::complete(state.clone(), transfer, tx.clone()));
                        }
                    }
                    None => {}
                }
            }
        }
    }
}

/// Starts receiving `id`'s weights, dropping an unfinished transfer (logged).
fn replace_transfer(
    slot: &mut Option<(String, crate::training::Incoming)>,
    id: String,
    next: crate::training::Incoming,
) {
    if let Some((old, _)) = slot.replace((id, next)) {
        tracing::warn!(
            task_id = old.as_str(),
            "an unfinished weight transfer was replaced by a newer one (one at a time)"
        );
    }
}

/// The result of a task: from the kept results when the coordinator asks again, else freshly
/// verified, released and kept.
async fn answer(
    state: &Arc<Node>,
    task: pb::Task,
    via: &str,
    results: &Arc<Mutex<Results>>,
) -> pb::TaskResult {
    {
        let mut r = results.lock();
        r.done.retain(|_, (at, _)| at.elapsed() < KEEP_RESULTS);
        if let Some((_, result)) = r.done.get(&task.task_id) {
            return result.clone();
        }
    }
    let task_id = task.task_id.clone();
    let outcome = match execute(state, task, via).await {
        Ok(release) => pb::task_result::Outcome::Release(release),
        Err(e) => {
            let code = e.task_error_code();
            tracing::warn!(task_id = task_id.as_str(), code = code.label(), error = %e, "federated task not answered");
            pb::task_result::Outcome::Error(pb::TaskError {
                code: code.into(),
                message: e.to_string(),
            })
        }
    };
    let result = pb::TaskResult {
        task_id: task_id.clone(),
        outcome: Some(outcome),
    };
    results
        .lock()
        .done
        .insert(task_id, (Instant::now(), result.clone()));
    result
}

fn refused(reason: impl std::fmt::Display) -> NodeError {
    NodeError::Refused(reason.to_string())
}

/// Verifies a signed query and releases it for the researcher who signed it.
async fn execute(
    state: &Arc<Node>,
    task: pb::Task,
    via: &str,
) -> Result<pb::DpStatsResponse, NodeError> {
    let signed = task
        .query
        .ok_or_else(|| NodeError::InvalidRequest("the task carries no query".into()))?;
    let Some(tls) = &state.tls() else {
        return Err(refused(
            "this node runs --insecure-dev and cannot verify researchers' certificates",
        ));
    };
    let researcher = tls
        .current()
        .verify_signer(&signed.certificate, Role::Researcher)
        .map_err(refused)?;
    // The one rule set of the coordinator and every node (cxrfed-server::intent).
    let expect = cxrfed_server::intent::Expect {
        study: state.study(),
        site: Some(&state.config().site),
        now_unix: chrono::Utc::now().timestamp(),
    };
    let cxrfed_server::intent::Verified {
        intent,
        query,
        mechanism,
    } = cxrfed_server::intent::verify(&signed, &expect).map_err(|e| {
        if e.refused() {
            refused(format!("{e} (signer {})", researcher.uri()))
        } else {
            NodeError::InvalidRequest(e.to_string())
        }
    })?;
    let limit = cxrfed_store::Limit::Budget(state.dp().default_budget);
    let released = crate::privacy::release(
        state.store(),
        state.columns().clone(),
        state.dp(),
        &researcher,
        limit,
        crate::privacy::DpRequest {
            query,
            epsilon: intent.epsilon,
            delta: intent.delta,
            mechanism,
            raw: true,
            nonce: Some(format!("{}:{}", researcher.uri(), intent.nonce)),
            via: format!("coordinator {via}, task {}", task.task_id),
        },
        "FederatedQuery",
    )
    .await?;
    state
        .metrics()
        .dp_release(researcher.role.as_str(), released.release.cost.epsilon);
    Ok(crate::privacy::dp_response(released))
}
