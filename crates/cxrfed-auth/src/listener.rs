//! The accept loop of a TLS server: TCP accept, TLS 1.3 handshake (concurrently, with a
//! deadline), verification of the client's certificate, and one [`PeerStream`] per connection
//! for tonic's `serve_with_incoming`. Each stream carries a [`PeerInfo`] that tonic puts into
//! every request's extensions, where [`crate::authz::AuthLayer`] reads it.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::identity::Identity;
use crate::tls::{Rejection, ReloadingTls};

/// A client gets this long to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
        match &mut self.get_mut().io {
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

/// Accepts connections on `listener` until `shutdown`, yielding handshaken streams.
pub fn incoming(
    listener: TcpListener,
    transport: ServerTransport,
    shutdown: CancellationToken,
) -> ReceiverStream<io::Result<PeerStream>> {
    let (tx, rx) = tokio::sync::mpsc::channel(128);
    tokio::spawn(async move {
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
                    },
                    ServerTransport::Tls(tls) => match handshake(&tls, tcp, remote).await {
                        Some(stream) => stream,
                        None => return,
                    },
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
    Some(PeerStream {
        io: Io::Tls(Box::new(stream)),
        info: PeerInfo {
            remote: Some(remote),
            auth: Arc::new(auth),
        },
    })
}
