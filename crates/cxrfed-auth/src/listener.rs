//! The accept loop of a TLS server: TCP accept, TLS 1.3 handshake (concurrently, with a
//! deadline), verification of the client's certificate, and one [`PeerStream`] per connection
//! for tonic's `serve_with_incoming`. Each stream carries a [`PeerInfo`] that tonic puts into
//! every request's extensions, where [`crate::authz::AuthLayer`] reads it.
//!
//! Nothing here trusts a peer before its handshake: concurrent handshakes and open
//! connections are capped, per peer address and in total ([`ConnectionLimits`]). When the
//! handshake slots are full, the *oldest* pending handshake is cancelled to admit the new one,
//! so idle half-open connections cannot lock real clients out (a real client's handshake takes
//! milliseconds, an idle one waits for its deadline). Beyond the connection caps a new
//! connection is closed at once. A connection whose certificate was rejected gets
//! UNAUTHENTICATED on its RPCs and is closed [`REJECTED_LINGER`] after its handshake.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use std::future::Future;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::identity::Identity;
use crate::tls::{Rejection, ReloadingTls};

/// A client gets this long to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a connection with a rejected certificate stays open: long enough to carry the
/// UNAUTHENTICATED answers to its first RPCs, then it is closed.
pub const REJECTED_LINGER: Duration = Duration::from_secs(2);

/// Caps on what unauthenticated and authenticated peers may hold open.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Handshakes in progress at once, in total.
    pub max_handshakes: usize,
    /// Handshakes in progress at once from one IP address.
    pub max_handshakes_per_peer: usize,
    /// Open (handshaken) connections, in total.
    pub max_connections: usize,
    /// Open connections from one IP address.
    pub max_connections_per_peer: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_handshakes: 256,
            max_handshakes_per_peer: 64,
            max_connections: 1024,
            max_connections_per_peer: 256,
        }
    }
}

/// The accept loop's book of pending handshakes and open connections.
#[derive(Debug, Default)]
struct Book {
    next: u64,
    /// Pending handshakes by admission order: (peer, cancel).
    pending: BTreeMap<u64, (IpAddr, CancellationToken)>,
    pending_by_peer: HashMap<IpAddr, usize>,
    open: usize,
    open_by_peer: HashMap<IpAddr, usize>,
}

#[derive(Debug)]
struct Gate {
    limits: ConnectionLimits,
    book: parking_lot::Mutex<Book>,
}

fn decrement(map: &mut HashMap<IpAddr, usize>, ip: IpAddr) {
    if let Some(n) = map.get_mut(&ip) {
        *n -= 1;
        if *n == 0 {
            map.remove(&ip);
        }
    }
}

impl Gate {
    /// Admits a new connection's handshake, evicting the oldest pending one (of this peer when
    /// the per-peer cap is reached, else of anyone) to make room. `None`: the connection caps
    /// are reached; close it.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Pending> {
        let mut book = self.book.lock();
        if book.open >= self.limits.max_connections
            || book.open_by_peer.get(&ip).copied().unwrap_or(0)
                >= self.limits.max_connections_per_peer
        {
            return None;
        }
        let per_peer_full = book.pending_by_peer.get(&ip).copied().unwrap_or(0)
            >= self.limits.max_handshakes_per_peer;
        if per_peer_full || book.pending.len() >= self.limits.max_handshakes {
            let victim = book
                .pending
                .iter()
                .find(|(_, (peer, _))| !per_peer_full || *peer == ip)
                .map(|(id, _)| *id);
            if let Some(id) = victim
                && let Some((peer, cancel)) = book.pending.remove(&id)
            {
                cancel.cancel();
                decrement(&mut book.pending_by_peer, peer);
            }
        }
        let id = book.next;
        book.next += 1;
        let cancel = CancellationToken::new();
        book.pending.insert(id, (ip, cancel.clone()));
        *book.pending_by_peer.entry(ip).or_default() += 1;
        Some(Pending {
            gate: self.clone(),
            id,
            ip,
            cancel,
        })
    }
}

/// A handshake slot; dropped (or turned into an [`OpenTicket`]) when the handshake ends.
#[derive(Debug)]
struct Pending {
    gate: Arc<Gate>,
    id: u64,
    ip: IpAddr,
    cancel: CancellationToken,
}

impl Pending {
    fn release(&self) {
        let mut book = self.gate.book.lock();
        if book.pending.remove(&self.id).is_some() {
            decrement(&mut book.pending_by_peer, self.ip);
        }
    }

    /// The handshake succeeded: count an open connection until the ticket drops.
    fn open(self) -> OpenTicket {
        self.release();
        let mut book = self.gate.book.lock();
        book.open += 1;
        *book.open_by_peer.entry(self.ip).or_default() += 1;
        OpenTicket {
            gate: self.gate.clone(),
            ip: self.ip,
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.release();
    }
}

/// One open connection in the book; released when the connection is dropped.
#[derive(Debug)]
struct OpenTicket {
    gate: Arc<Gate>,
    ip: IpAddr,
}

impl Drop for OpenTicket {
    fn drop(&mut self) {
        let mut book = self.gate.book.lock();
        book.open -= 1;
        decrement(&mut book.open_by_peer, self.ip);
    }
}

/// How a server talks to its clients.
#[derive(Debug, Clone)]
pub enum ServerTransport {
    /// Mutual TLS with the study CA (the default).
    Tls(Arc<ReloadingTls>),
    /// Plaintext on loopback, every caller treated as this identity (`--insecure-dev`).
    InsecureDev(Identity),
}

/// What the server knows about the other end of a connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote: Option<SocketAddr>,
    pub auth: Arc<PeerAuth>,
}

#[derive(Debug, Clone)]
pub enum PeerAuth {
    /// A certificate that chains to the study CA, valid at handshake time.
    Verified(Identity),
    /// No certificate, or one that failed verification: every RPC gets UNAUTHENTICATED.
    Rejected(Rejection),
    /// `--insecure-dev`: no TLS at all.
    InsecureDev(Identity),
}

/// One accepted connection.
#[derive(Debug)]
pub struct PeerStream {
    io: Io,
    info: PeerInfo,
    /// Counts the connection against the caps while it lives.
    _ticket: Option<OpenTicket>,
    /// A rejected peer's connection reads end-of-stream once this fires.
    close_at: Option<Pin<Box<tokio::time::Sleep>>>,
}

#[derive(Debug)]
enum Io {
    Tls(Box<TlsStream<TcpStream>>),
    Plain(TcpStream),
}

impl tonic::transport::server::Connected for PeerStream {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(close_at) = this.close_at.as_mut()
            && close_at.as_mut().poll(cx).is_ready()
        {
            // End of stream: the server closes a rejected peer's connection.
            return Poll::Ready(Ok(()));
        }
        match &mut this.io {
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Tls(s) => s.is_write_vectored(),
            Io::Plain(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Accepts connections on `listener` until `shutdown`, yielding handshaken streams, under
/// the default [`ConnectionLimits`].
pub fn incoming(
    listener: TcpListener,
    transport: ServerTransport,
    shutdown: CancellationToken,
) -> ReceiverStream<io::Result<PeerStream>> {
    incoming_with(listener, transport, shutdown, ConnectionLimits::default())
}

/// [`incoming`] under `limits`.
pub fn incoming_with(
    listener: TcpListener,
    transport: ServerTransport,
    shutdown: CancellationToken,
    limits: ConnectionLimits,
) -> ReceiverStream<io::Result<PeerStream>> {
    let (tx, rx) = tokio::sync::mpsc::channel(128);
    let gate = Arc::new(Gate {
        limits,
        book: parking_lot::Mutex::default(),
    });
    tokio::spawn(async move {
        let mut refused_logged = std::time::Instant::now() - Duration::from_secs(60);
        loop {
            let (tcp, remote) = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Some(pending) = gate.admit(remote.ip()) else {
                // Dropping the socket closes it; one warning a minute, not one per connection.
                if refused_logged.elapsed() >= Duration::from_secs(60) {
                    refused_logged = std::time::Instant::now();
                    tracing::warn!(%remote, max_connections = limits.max_connections,
                        max_connections_per_peer = limits.max_connections_per_peer,
                        "connection limit reached; new connections are closed");
                }
                continue;
            };
            // gRPC is request/response: Nagle's algorithm only adds latency.
            let _ = tcp.set_nodelay(true);
            let tx = tx.clone();
            let transport = transport.clone();
            tokio::spawn(async move {
                let stream = match transport {
                    ServerTransport::InsecureDev(identity) => PeerStream {
                        io: Io::Plain(tcp),
                        info: PeerInfo {
                            remote: Some(remote),
                            auth: Arc::new(PeerAuth::InsecureDev(identity)),
                        },
                        _ticket: Some(pending.open()),
                        close_at: None,
                    },
                    ServerTransport::Tls(tls) => {
                        let cancel = pending.cancel.clone();
                        let shaken = tokio::select! {
                            () = cancel.cancelled() => {
                                tracing::debug!(%remote, "pending handshake evicted for a newer connection");
                                return;
                            }
                            shaken = handshake(&tls, tcp, remote) => shaken,
                        };
                        match shaken {
                            Some(mut stream) => {
                                stream._ticket = Some(pending.open());
                                stream
                            }
                            None => return,
                        }
                    }
                };
                let _ = tx.send(Ok(stream)).await;
            });
        }
    });
    ReceiverStream::new(rx)
}

async fn handshake(tls: &ReloadingTls, tcp: TcpStream, remote: SocketAddr) -> Option<PeerStream> {
    let material = tls.current();
    let acceptor = tokio_rustls::TlsAcceptor::from(material.config.clone());
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            // A TCP probe (load balancer, `node serve --detach` waiting for the port) that
            // closed without a ClientHello.
            tracing::debug!(%remote, "connection closed before the TLS handshake");
            return None;
        }
        Ok(Err(e)) => {
            let hint = if e.to_string().contains("InvalidContentType")
                || e.to_string().contains("corrupt message")
            {
                " (not TLS: a plaintext client? use https:// with --ca/--cert/--key)"
            } else {
                ""
            };
            tracing::warn!(%remote, error = %e, "TLS handshake failed{hint}");
            return None;
        }
        Err(_) => {
            tracing::warn!(%remote, timeout_s = HANDSHAKE_TIMEOUT.as_secs(), "TLS handshake timed out");
            return None;
        }
    };
    let chain = stream.get_ref().1.peer_certificates().unwrap_or(&[]);
    let auth = match material.verify_client(chain) {
        Ok(identity) => {
            tracing::debug!(%remote, identity = %identity, "client authenticated");
            PeerAuth::Verified(identity)
        }
        Err(rejection) => {
            tracing::warn!(
                %remote,
                reason = rejection.reason.as_str(),
                claimed_identity = rejection.claimed.as_deref().unwrap_or("-"),
                cert_fingerprint = rejection.fingerprint.as_deref().unwrap_or("-"),
                "client certificate rejected; every RPC on this connection gets UNAUTHENTICATED"
            );
            PeerAuth::Rejected(rejection)
        }
    };
    let close_at = matches!(auth, PeerAuth::Rejected(_))
        .then(|| Box::pin(tokio::time::sleep(REJECTED_LINGER)));
    Some(PeerStream {
        io: Io::Tls(Box::new(stream)),
        info: PeerInfo {
            remote: Some(remote),
            auth: Arc::new(auth),
        },
        _ticket: None,
        close_at,
    })
}
