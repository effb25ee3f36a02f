//! The mTLS listener under tonic, accepting through `nexus_serve`: each connection's
//! handshake runs on its own task (with a timeout), at most `max_streams` connections at
//! once; the peer's SPIFFE ID,
//! read from its verified certificate, rides along as tonic connect info, so a handler
//! knows who calls from the certificate, never from the message.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use nexus_identity::spiffe_id_of;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

use crate::metrics::Metrics;

/// Who is on the other end of a connection.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// The SPIFFE ID in the client certificate.
    pub spiffe_id: String,
    /// The remote address.
    pub addr: SocketAddr,
}

/// A handshaken connection with its peer's identity.
pub struct PeerStream {
    inner: TlsStream<TcpStream>,
    info: PeerInfo,
    /// Dropped with the connection: frees its slot under `max_connections`.
    _slot: nexus_serve::Slot,
}

impl Connected for PeerStream {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts and handshakes connections until the drain starts (through
/// [`nexus_serve::accept_with_slot`], at most `max_connections` at once); yields them to tonic
/// through the returned channel, which ends with the drain, closing the listener. A
/// connection counts against the cap until tonic drops it.
pub fn incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    max_connections: usize,
    handshake_timeout: Duration,
    metrics: Arc<Metrics>,
    drain: nexus_serve::Watch,
) -> mpsc::Receiver<Result<PeerStream, std::io::Error>> {
    let (tx, rx) = mpsc::channel(128);
    let handle = move |tcp: TcpStream,
                       addr: SocketAddr,
                       watch: nexus_serve::Watch,
                       slot: nexus_serve::Slot| {
        let (acceptor, tx, metrics) = (acceptor.clone(), tx.clone(), metrics.clone());
        async move {
            // tonic's graceful shutdown holds the drain for the connections it serves.
            drop(watch);
            let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    let reason = nexus_identity::handshake_failure_reason(&error);
                    tracing::info!(%addr, %error, reason, "control connection refused in the TLS handshake");
                    metrics.stream_error("handshake");
                    return;
                }
                Err(_) => {
                    metrics.stream_error("handshake_timeout");
                    return;
                }
            };
            let Some(spiffe_id) = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|leaf| spiffe_id_of(leaf).ok())
            else {
                metrics.stream_error("no_spiffe_id");
                return;
            };
            let stream = PeerStream {
                inner: tls,
                info: PeerInfo { spiffe_id, addr },
                _slot: slot,
            };
            // The task ends here: the connection (and its slot) is tonic's now, and no
            // task waits beside each open stream (control_bench: about 9 KiB per
            // stream when one did). A send that fails (tonic has stopped taking
            // connections: the drain) drops the connection.
            let _ = tx.send(Ok(stream)).await;
        }
    };
    tokio::spawn(nexus_serve::accept_with_slot(
        listener,
        max_connections,
        drain,
        "control",
        handle,
    ));
    rx
}
