//! The node's DICOM receiver: a C-ECHO and C-STORE SCP (dicom-ul, async) that a PACS or a
//! DICOM router sends studies to, beside the gRPC server.
//!
//! * **Who may associate.** The called AE title must be the node's (`dicom_ae`); the calling
//!   AE title, and optionally its address, must be on `dicom_allow` (`AE`, `AE@IP`, or `*` for
//!   any). Anything else is rejected at association (A-ASSOCIATE-RJ, permanent, with the DICOM
//!   reason), never after data has been sent. Beyond `dicom_max_associations` concurrent
//!   associations a new one is rejected as transient ("local limit exceeded") so the sender
//!   retries later.
//! * **What is accepted.** Verification, CR, DX (for presentation and for processing) and
//!   secondary capture, each in every transfer syntax the node decodes (`syntax::SUPPORTED`);
//!   a presentation context proposing only other syntaxes is refused at negotiation
//!   ("transfer syntaxes not supported").
//! * **What happens to an instance.** Its data set is assembled in memory (never written to
//!   disk, never kept), framed as a Part 10 file with the presentation context's transfer
//!   syntax, and queued for the same pipeline as `Extract` (de-identify, hash, model, store).
//!   The C-STORE response is sent only when that is finished: Success (0000) once the record
//!   is durably stored or was already present; Refused: Out of Resources (A700) when the queue
//!   or the receive buffers are full (the sender retries); Cannot Understand (C000) for a file
//!   the node cannot read or does not support; Processing Failure (0110) otherwise — each
//!   with an Error Comment giving the reason. Memory is bounded by `dicom_queue` instances in
//!   processing and `dicom_buffer_bytes` of assembled data sets across associations.
//! * **What is logged.** Associations (calling AE, address, outcome), and per instance its
//!   outcome and record id — never a UID or any other attribute of the instance.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cxrfed_proto::v1 as pb;
use dicom_ul::association::Association;
use dicom_ul::association::server::AccessControl;
use dicom_ul::pdu::{
    AssociationRJ, AssociationRJResult, AssociationRJServiceProviderPresentationReason,
    AssociationRJServiceUserReason, AssociationRJSource, PDataValue, PDataValueType, Pdu,
    UserIdentity,
};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::error::NodeError;
use crate::state::Node;

/// The Verification SOP class (C-ECHO).
pub const VERIFICATION: &str = "1.2.840.10008.1.1";

/// The storage SOP classes the receiver accepts, with their names (for the conformance
/// statement, docs/dicom-conformance.md).
pub const STORAGE_CLASSES: &[(&str, &str)] = &[
    (
        "1.2.840.10008.5.1.4.1.1.1",
        "Computed Radiography Image Storage",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.1.1",
        "Digital X-Ray Image Storage - For Presentation",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.1.1.1",
        "Digital X-Ray Image Storage - For Processing",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.7",
        "Secondary Capture Image Storage",
    ),
];

use cxrfed_dicom::dimse::{self, C_ECHO_RQ, C_ECHO_RSP, C_STORE_RQ, C_STORE_RSP, status};

/// A command set is a few hundred bytes; more is not a command.
const MAX_COMMAND_BYTES: usize = 64 * 1024;
/// The largest P-DATA PDU accepted: 256 KiB with its 6-byte header (what dicom-ul calls a
/// large PDU; its constant is private). Fewer, larger PDUs per instance.
const MAX_PDU_LENGTH: u32 = 262_144 - 6;
/// An idle association is closed after this long without a PDU.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// One entry of `dicom_allow`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// `*`: any calling AE title from any address.
    Any,
    /// `AE` or `AE@IP`.
    Ae {
        title: String,
        address: Option<IpAddr>,
    },
}

impl std::str::FromStr for Caller {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s == "*" {
            return Ok(Caller::Any);
        }
        let (title, address) = match s.rsplit_once('@') {
            Some((title, ip)) => (
                title,
                Some(ip.parse::<IpAddr>().map_err(|_| {
                    format!("dicom_allow entry {s:?}: {ip:?} is not an IP address")
                })?),
            ),
            None => (s, None),
        };
        validate_ae_title(title).map_err(|e| format!("dicom_allow entry {s:?}: {e}"))?;
        Ok(Caller::Ae {
            title: title.to_string(),
            address,
        })
    }
}

/// An AE title: 1–16 characters of the default repertoire, no backslash, not all spaces.
pub fn validate_ae_title(title: &str) -> Result<(), String> {
    if title.trim().is_empty() || title.len() > 16 {
        return Err(format!("AE title {title:?} must have 1 to 16 characters"));
    }
    if !title
        .chars()
        .all(|c| c.is_ascii_graphic() && c != '\\' || c == ' ')
    {
        return Err(format!(
            "AE title {title:?} may hold only printable ASCII characters without backslash"
        ));
    }
    Ok(())
}

/// The receiver's settings, from the node's configuration.
#[derive(Debug, Clone)]
pub struct ReceiverSettings {
    pub ae_title: String,
    pub allow: Vec<Caller>,
    pub max_associations: usize,
    pub queue: usize,
    pub buffer_bytes: u64,
    pub max_instance_bytes: u64,
    /// DICOM TLS with the node's certificate, as currently loaded (it follows reloads).
    pub tls: Option<Arc<cxrfed_auth::ReloadingTls>>,
}

/// Counters for `node status` (the site admin's view; never an identifier).
#[derive(Debug, Default)]
pub struct ReceiverStats {
    listen: Mutex<String>,
    ae_title: Mutex<String>,
    tls: std::sync::atomic::AtomicBool,
    associations_active: AtomicU64,
    associations_total: AtomicU64,
    associations_rejected: Mutex<BTreeMap<String, u64>>,
    echoes: AtomicU64,
    received: AtomicU64,
    stored: AtomicU64,
    duplicates: AtomicU64,
    refused: Mutex<BTreeMap<String, u64>>,
}

impl ReceiverStats {
    fn reject(&self, reason: &str) {
        *self
            .associations_rejected
            .lock()
            .entry(reason.to_string())
            .or_default() += 1;
    }

    fn refuse(&self, reason: &str) {
        *self.refused.lock().entry(reason.to_string()).or_default() += 1;
    }

    /// The receiver's state for `Status`; `None` while no receiver was started.
    pub fn to_pb(&self) -> Option<pb::DicomReceiverStatus> {
        let listen = self.listen.lock().clone();
        if listen.is_empty() {
            return None;
        }
        Some(pb::DicomReceiverStatus {
            listen,
            ae_title: self.ae_title.lock().clone(),
            tls: self.tls.load(Ordering::SeqCst),
            associations_active: self.associations_active.load(Ordering::SeqCst),
            associations_total: self.associations_total.load(Ordering::SeqCst),
            associations_rejected: self
                .associations_rejected
                .lock()
                .clone()
                .into_iter()
                .collect(),
            echoes: self.echoes.load(Ordering::SeqCst),
            instances_received: self.received.load(Ordering::SeqCst),
            instances_stored: self.stored.load(Ordering::SeqCst),
            instances_duplicate: self.duplicates.load(Ordering::SeqCst),
            instances_refused: self.refused.lock().clone().into_iter().collect(),
        })
    }
}

/// The access check dicom-ul runs on the A-ASSOCIATE-RQ, for one peer address.
struct Access {
    allow: Vec<Caller>,
    peer: IpAddr,
}

impl AccessControl for Access {
    fn check_access(
        &self,
        this_ae_title: &str,
        calling_ae_title: &str,
        called_ae_title: &str,
        _user_identity: Option<&UserIdentity>,
    ) -> Result<(), AssociationRJServiceUserReason> {
        if called_ae_title.trim() != this_ae_title {
            return Err(AssociationRJServiceUserReason::CalledAETitleNotRecognized);
        }
        let calling = calling_ae_title.trim();
        let allowed = self.allow.iter().any(|caller| match caller {
            Caller::Any => true,
            Caller::Ae { title, address } => {
                title == calling && address.is_none_or(|a| a == self.peer)
            }
        });
        if allowed {
            Ok(())
        } else {
            Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized)
        }
    }
}

/// The shared part of every association's task.
struct Receiver {
    state: Arc<Node>,
    settings: ReceiverSettings,
    stats: Arc<ReceiverStats>,
    /// Associations at once.
    associations: Arc<Semaphore>,
    /// Instances between "fully received" and "response sent" (the bounded queue in front of
    /// the pipeline).
    queue: Arc<Semaphore>,
    /// KiB of assembled data sets across associations.
    buffers: Arc<Semaphore>,
}

/// Starts the receiver on `listener`; it runs until `shutdown` fires.
pub fn spawn(
    state: Arc<Node>,
    listener: TcpListener,
    settings: ReceiverSettings,
    shutdown: CancellationToken,
) {
    let stats = state.receiver_stats().clone();
    *stats.listen.lock() = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    *stats.ae_title.lock() = settings.ae_title.clone();
    stats.tls.store(settings.tls.is_some(), Ordering::SeqCst);
    tracing::info!(
        listen = stats.listen.lock().as_str(),
        ae_title = settings.ae_title.as_str(),
        tls = settings.tls.is_some(),
        allowed_callers = settings.allow.len(),
        "DICOM receiver (C-ECHO, C-STORE SCP) listening"
    );
    let receiver = Arc::new(Receiver {
        associations: Arc::new(Semaphore::new(settings.max_associations)),
        queue: Arc::new(Semaphore::new(settings.queue)),
        buffers: Arc::new(Semaphore::new(
            usize::try_from(settings.buffer_bytes / 1024)
                .unwrap_or(usize::MAX)
                .clamp(1, Semaphore::MAX_PERMITS),
        )),
        state,
        settings,
        stats,
    });
    tokio::spawn(async move {
        loop {
            let (socket, peer) = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "DICOM accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let receiver = receiver.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let Ok(permit) = receiver.associations.clone().try_acquire_owned() else {
                    receiver.stats.reject("too_many_associations");
                    tracing::warn!(peer = %peer, "DICOM association rejected: too many at once");
                    reject_transient(socket).await;
                    return;
                };
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    () = receiver.associate(socket, peer) => {}
                }
                drop(permit);
            });
        }
    });
}

/// Answers an A-ASSOCIATE-RQ with a transient rejection (local limit exceeded) without
/// negotiating: the request is read (so the peer sees the rejection, not a reset) and dropped.
async fn reject_transient(mut socket: TcpStream) {
    let mut request = vec![0u8; 16 * 1024];
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::io::AsyncReadExt::read(&mut socket, &mut request),
    )
    .await;
    let rejection = Pdu::AssociationRJ(AssociationRJ {
        result: AssociationRJResult::Transient,
        source: AssociationRJSource::ServiceProviderPresentation(
            AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
        ),
    });
    let mut bytes = Vec::new();
    if dicom_ul::pdu::write_pdu(&mut bytes, &rejection).is_ok() {
        let _ = socket.write_all(&bytes).await;
    }
    let _ = socket.shutdown().await;
}

/// A response command set to `request`.
fn response(field: u16, request: &Pending, code: u16, comment: Option<&str>) -> Vec<u8> {
    let command = dimse::Command {
        field: request.command_field,
        message_id: request.message_id,
        sop_class: request.sop_class.clone(),
        sop_instance: request.sop_instance.clone(),
        ..dimse::Command::default()
    };
    dimse::response(field, &command, code, comment)
}

/// The command of one DIMSE message being received.
struct Pending {
    command_field: u16,
    message_id: u16,
    sop_class: String,
    sop_instance: String,
    presentation_context: u8,
    data: Vec<u8>,
    /// KiB reserved from the receive buffers for `data`.
    reserved: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Why the instance will be refused once its data set has arrived (too large, buffers
    /// full): the rest of it is read and dropped.
    refusal: Option<(u16, String)>,
}

impl Receiver {
    async fn associate(&self, socket: TcpStream, peer: SocketAddr) {
        let _ = socket.set_nodelay(true);
        let mut options = dicom_ul::ServerAssociationOptions::new()
            .ae_access_control(Access {
                allow: self.settings.allow.clone(),
                peer: peer.ip(),
            })
            .ae_title(self.settings.ae_title.clone())
            .max_pdu_length(MAX_PDU_LENGTH)
            .read_timeout(READ_TIMEOUT)
            .write_timeout(READ_TIMEOUT)
            .with_abstract_syntax(VERIFICATION);
        for (uid, _) in STORAGE_CLASSES {
            options = options.with_abstract_syntax(*uid);
        }
        for (uid, _) in cxrfed_imaging::syntax::SUPPORTED {
            options = options.with_transfer_syntax(*uid);
        }
        match &self.settings.tls {
            Some(tls) => {
                let options = options.tls_config(tls.current().dicom.clone());
                match options.establish_tls_async(socket).await {
                    Ok(association) => self.serve(association, peer).await,
                    Err(e) => self.rejected(&e, peer),
                }
            }
            None => match options.establish_async(socket).await {
                Ok(association) => self.serve(association, peer).await,
                Err(e) => self.rejected(&e, peer),
            },
        }
    }

    fn rejected(&self, error: &dicom_ul::association::Error, peer: SocketAddr) {
        use dicom_ul::association::Error;
        let reason = match error {
            Error::Rejected { association_rj, .. } => match &association_rj.source {
                AssociationRJSource::ServiceUser(
                    AssociationRJServiceUserReason::CallingAETitleNotRecognized,
                ) => "calling_ae_not_allowed",
                AssociationRJSource::ServiceUser(
                    AssociationRJServiceUserReason::CalledAETitleNotRecognized,
                ) => "called_ae_not_recognized",
                _ => "rejected",
            },
            // A port probe (a load balancer's health check, a scanner): nothing to count.
            Error::ConnectionClosed { .. } => {
                tracing::debug!(peer = %peer, "DICOM connection closed before an association request");
                return;
            }
            Error::TlsHandshake { source, .. }
                if source.kind() == std::io::ErrorKind::UnexpectedEof =>
            {
                tracing::debug!(peer = %peer, "DICOM TLS connection closed before a handshake");
                return;
            }
            Error::TlsHandshake { .. } => "tls_handshake_failed",
            Error::Timeout { .. } => "timeout",
            _ => "protocol_error",
        };
        self.stats.reject(reason);
        tracing::warn!(peer = %peer, reason, error = %error, "DICOM association refused");
    }

    async fn serve<S>(
        &self,
        mut association: dicom_ul::association::AsyncServerAssociation<S>,
        peer: SocketAddr,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let calling = association.peer_ae_title().trim().to_string();
        let accepted: Vec<String> = association
            .presentation_contexts()
            .iter()
            .filter(|pc| pc.reason == dicom_ul::pdu::PresentationContextResultReason::Acceptance)
            .map(|pc| pc.transfer_syntax.clone())
            .collect();
        self.stats.associations_total.fetch_add(1, Ordering::SeqCst);
        self.stats
            .associations_active
            .fetch_add(1, Ordering::SeqCst);
        tracing::info!(
            calling_ae = calling.as_str(),
            peer = %peer,
            accepted_contexts = accepted.len(),
            "DICOM association accepted"
        );
        let mut command: Vec<u8> = Vec::new();
        let mut pending: Option<Pending> = None;
        let (mut stored, mut refused) = (0u64, 0u64);
        let outcome = loop {
            let pdu = match association.receive().await {
                Ok(pdu) => pdu,
                Err(e) => break format!("ended: {e}"),
            };
            match pdu {
                Pdu::PData { data } => {
                    for value in data {
                        match self
                            .on_value(&mut association, value, &mut command, &mut pending)
                            .await
                        {
                            Ok(Some(true)) => stored += 1,
                            Ok(Some(false)) => refused += 1,
                            Ok(None) => {}
                            Err(reason) => {
                                tracing::warn!(
                                    calling_ae = calling.as_str(),
                                    reason = reason.as_str(),
                                    "DICOM association aborted"
                                );
                                self.stats
                                    .associations_active
                                    .fetch_sub(1, Ordering::SeqCst);
                                let _ = association.abort().await;
                                return;
                            }
                        }
                    }
                }
                Pdu::ReleaseRQ => {
                    let _ = association.send(&Pdu::ReleaseRP).await;
                    break "released".to_string();
                }
                Pdu::AbortRQ { .. } => break "aborted by the peer".to_string(),
                other => break format!("unexpected {}", other.short_description()),
            }
        };
        self.stats
            .associations_active
            .fetch_sub(1, Ordering::SeqCst);
        tracing::info!(
            calling_ae = calling.as_str(),
            stored,
            refused,
            outcome = outcome.as_str(),
            "DICOM association closed"
        );
    }

    /// Handles one presentation data value. Returns `Some(stored?)` when a C-STORE was
    /// answered, `Err(reason)` for a protocol violation (the association is aborted).
    async fn on_value<S>(
        &self,
        association: &mut dicom_ul::association::AsyncServerAssociation<S>,
        value: PDataValue,
        command: &mut Vec<u8>,
        pending: &mut Option<Pending>,
    ) -> Result<Option<bool>, String>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        match value.value_type {
            PDataValueType::Command => {
                if pending.is_some() {
                    return Err("a command arrived before the previous data set ended".into());
                }
                if command.len() + value.data.len() > MAX_COMMAND_BYTES {
                    return Err("command set larger than 64 KiB".into());
                }
                command.extend_from_slice(&value.data);
                if !value.is_last {
                    return Ok(None);
                }
                let bytes = std::mem::take(command);
                let parsed = dimse::parse(&bytes)?;
                let dimse::Command {
                    field,
                    message_id,
                    sop_class,
                    sop_instance,
                    data_set_follows: data_follows,
                    ..
                } = parsed;
                let next = Pending {
                    command_field: field,
                    message_id,
                    sop_class,
                    sop_instance,
                    presentation_context: value.presentation_context_id,
                    data: Vec::new(),
                    reserved: None,
                    refusal: None,
                };
                match (field, data_follows) {
                    (C_ECHO_RQ, false) => {
                        self.stats.echoes.fetch_add(1, Ordering::SeqCst);
                        let response = response(C_ECHO_RSP, &next, status::SUCCESS, None);
                        send_command(association, next.presentation_context, &response).await?;
                        Ok(None)
                    }
                    (C_STORE_RQ, true) => {
                        *pending = Some(next);
                        Ok(None)
                    }
                    (_, true) => {
                        // Read (and drop) the data set, then answer that the operation is not
                        // supported.
                        let mut next = next;
                        next.refusal = Some((
                            status::UNRECOGNIZED_OPERATION,
                            "only C-ECHO and C-STORE are supported".into(),
                        ));
                        *pending = Some(next);
                        Ok(None)
                    }
                    (_, false) => {
                        let response = response(
                            field | 0x8000,
                            &next,
                            status::UNRECOGNIZED_OPERATION,
                            Some("only C-ECHO and C-STORE are supported"),
                        );
                        send_command(association, next.presentation_context, &response).await?;
                        Ok(None)
                    }
                }
            }
            PDataValueType::Data => {
                let Some(current) = pending.as_mut() else {
                    return Err("a data set arrived without a command".into());
                };
                if current.presentation_context != value.presentation_context_id {
                    return Err("a data set changed presentation context".into());
                }
                if current.refusal.is_none() {
                    self.buffer(current, &value.data);
                }
                if !value.is_last {
                    return Ok(None);
                }
                let current = pending.take().expect("checked above");
                let answered = self.finish(association, current).await?;
                Ok(Some(answered))
            }
        }
    }

    /// Appends a fragment to the data set being assembled, within the instance size limit and
    /// the shared receive buffers; past either, the instance is marked to be refused and its
    /// buffer freed.
    fn buffer(&self, current: &mut Pending, fragment: &[u8]) {
        let total = (current.data.len() + fragment.len()) as u64;
        if total > self.settings.max_instance_bytes {
            current.refusal = Some((
                status::CANNOT_UNDERSTAND,
                format!(
                    "instance larger than max_file_bytes ({})",
                    self.settings.max_instance_bytes
                ),
            ));
        } else {
            let needed_kib = total.div_ceil(1024) as u32;
            let held = current.reserved.as_ref().map_or(0, |p| p.num_permits()) as u32;
            if needed_kib > held {
                match self
                    .buffers
                    .clone()
                    .try_acquire_many_owned(needed_kib - held)
                {
                    Ok(more) => match current.reserved.as_mut() {
                        Some(permit) => permit.merge(more),
                        None => current.reserved = Some(more),
                    },
                    Err(_) => {
                        current.refusal = Some((
                            status::OUT_OF_RESOURCES,
                            "receive buffers full; retry later".into(),
                        ));
                    }
                }
            }
        }
        if current.refusal.is_some() {
            current.data = Vec::new();
            current.reserved = None;
        } else {
            current.data.extend_from_slice(fragment);
        }
    }

    /// Processes a fully received instance and sends its C-STORE response. Returns whether
    /// it was stored (or already present).
    async fn finish<S>(
        &self,
        association: &mut dicom_ul::association::AsyncServerAssociation<S>,
        mut current: Pending,
    ) -> Result<bool, String>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let context = current.presentation_context;
        let transfer_syntax = association
            .presentation_contexts()
            .iter()
            .find(|pc| {
                pc.id == context
                    && pc.reason == dicom_ul::pdu::PresentationContextResultReason::Acceptance
            })
            .map(|pc| pc.transfer_syntax.clone());
        if current.command_field == C_STORE_RQ {
            self.stats.received.fetch_add(1, Ordering::SeqCst);
        }
        let outcome: Result<(String, bool), (u16, String, &'static str)> =
            match (current.refusal.take(), transfer_syntax) {
                (Some((code, reason)), _) => Err((code, reason, refusal_kind(code))),
                (None, None) => Err((
                    status::SOP_CLASS_NOT_SUPPORTED,
                    "no accepted presentation context".into(),
                    "no_presentation_context",
                )),
                (None, Some(ts)) => {
                    let file = dimse::part10(
                        &current.sop_class,
                        &current.sop_instance,
                        &ts,
                        &current.data,
                    );
                    current.data = Vec::new();
                    match file {
                        Err(e) => Err((status::CANNOT_UNDERSTAND, e, "invalid")),
                        Ok(file) => match self.queue.clone().try_acquire_owned() {
                            Err(_) => Err((
                                status::OUT_OF_RESOURCES,
                                "the node's queue is full; retry later".into(),
                                "queue_full",
                            )),
                            Ok(slot) => {
                                // The assembled data set now lives in `file`; its buffer
                                // reservation is held until processing ends.
                                let reserved = current.reserved.take();
                                let result = self
                                    .state
                                    .extract_and_store(
                                        file,
                                        "",
                                        false,
                                        format!("dicom-{}", uuid::Uuid::now_v7()),
                                    )
                                    .await;
                                drop((slot, reserved));
                                match result {
                                    Ok((record, created)) => Ok((record.record_id, created)),
                                    Err(e) => {
                                        let (code, kind) = dimse_status(&e);
                                        Err((code, e.to_string(), kind))
                                    }
                                }
                            }
                        },
                    }
                }
            };
        let stored = outcome.is_ok();
        let (code, comment) = match &outcome {
            Ok((record_id, created)) => {
                if *created {
                    self.stats.stored.fetch_add(1, Ordering::SeqCst);
                } else {
                    self.stats.duplicates.fetch_add(1, Ordering::SeqCst);
                }
                tracing::info!(
                    record_id = record_id.as_str(),
                    created,
                    "DICOM instance stored"
                );
                (status::SUCCESS, None)
            }
            Err((code, reason, kind)) => {
                self.stats.refuse(kind);
                tracing::warn!(
                    status = format!("{code:04X}"),
                    kind = *kind,
                    reason = reason.as_str(),
                    "DICOM instance refused"
                );
                (*code, Some(reason.as_str()))
            }
        };
        let rsp_field = if current.command_field == C_STORE_RQ {
            C_STORE_RSP
        } else {
            current.command_field | 0x8000
        };
        let response = response(rsp_field, &current, code, comment);
        send_command(association, context, &response).await?;
        Ok(stored)
    }
}

fn refusal_kind(code: u16) -> &'static str {
    match code {
        status::OUT_OF_RESOURCES => "buffers_full",
        status::UNRECOGNIZED_OPERATION => "unsupported_operation",
        _ => "file_too_large",
    }
}

/// The DIMSE status for a pipeline error, and the refusal's kind for the counters. Out of
/// Resources (A700) tells the sender to retry, so it is kept for what may succeed later — a
/// full inference queue, a busy decode budget, a deadline, a shutdown; an input that will always
/// be refused (too large, a decompression bomb, malformed, unsupported, quarantined) gets
/// Cannot Understand (C000) so that it is not resent forever.
fn dimse_status(error: &NodeError) -> (u16, &'static str) {
    use cxrfed_imaging::ImagingError;
    use tonic::Code;
    let kind = error.kind();
    let code = match error {
        NodeError::Imaging(e) if e.is_transient() => status::OUT_OF_RESOURCES,
        NodeError::Imaging(ImagingError::DecoderPanic) => status::PROCESSING_FAILURE,
        NodeError::Imaging(_) | NodeError::UploadTooLarge { .. } => status::CANNOT_UNDERSTAND,
        _ => match error.code() {
            Code::ResourceExhausted | Code::Unavailable | Code::DeadlineExceeded => {
                status::OUT_OF_RESOURCES
            }
            Code::InvalidArgument | Code::Unimplemented => status::CANNOT_UNDERSTAND,
            _ => status::PROCESSING_FAILURE,
        },
    };
    (code, kind)
}

async fn send_command<S>(
    association: &mut dicom_ul::association::AsyncServerAssociation<S>,
    context: u8,
    command: &[u8],
) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    association
        .send(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: context,
                value_type: PDataValueType::Command,
                is_last: true,
                data: command.to_vec(),
            }],
        })
        .await
        .map_err(|e| format!("sending a response: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list_entries_parse() {
        assert_eq!("*".parse::<Caller>(), Ok(Caller::Any));
        assert_eq!(
            "PACS1".parse::<Caller>(),
            Ok(Caller::Ae {
                title: "PACS1".into(),
                address: None
            })
        );
        assert_eq!(
            "ROUTER@10.0.0.7".parse::<Caller>(),
            Ok(Caller::Ae {
                title: "ROUTER".into(),
                address: Some("10.0.0.7".parse().expect("test value"))
            })
        );
        assert!("A@not-an-ip".parse::<Caller>().is_err());
        assert!("WAY-TOO-LONG-AE-TITLE".parse::<Caller>().is_err());
        assert!("BACK\\SLASH".parse::<Caller>().is_err());
    }

    #[test]
    fn access_checks_called_and_calling_titles_and_address() {
        let access = Access {
            allow: vec![
                "PACS@127.0.0.1".parse().expect("test value"),
                "ROUTER".parse().expect("test value"),
            ],
            peer: "127.0.0.1".parse().expect("test value"),
        };
        assert!(
            access
                .check_access("CXRFED", "PACS", "CXRFED", None)
                .is_ok()
        );
        assert!(
            access
                .check_access("CXRFED", "ROUTER ", "CXRFED", None)
                .is_ok()
        );
        assert_eq!(
            access.check_access("CXRFED", "OTHER", "CXRFED", None),
            Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized)
        );
        assert_eq!(
            access.check_access("CXRFED", "PACS", "SOMEONE", None),
            Err(AssociationRJServiceUserReason::CalledAETitleNotRecognized)
        );
        let elsewhere = Access {
            peer: "10.1.2.3".parse().expect("test value"),
            ..access
        };
        assert!(
            elsewhere
                .check_access("CXRFED", "PACS", "CXRFED", None)
                .is_err()
        );
        assert!(
            elsewhere
                .check_access("CXRFED", "ROUTER", "CXRFED", None)
                .is_ok()
        );
    }
}
