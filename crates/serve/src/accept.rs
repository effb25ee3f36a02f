//! Accepting connections (at most `max_connections` at once per listener) and serving
//! HTTP on each with the configured head limits, until the drain starts.

use std::error::Error as StdError;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::{self, HttpServerConnExec};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::Semaphore;

use crate::Watch;

/// A listener to accept connections from: TCP, or a Unix socket (in-pod channels).
pub trait Listener: Send + 'static {
    /// An accepted connection.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The peer's address.
    type Addr: Send + 'static;

    /// The next connection.
    fn accept(&self) -> impl Future<Output = std::io::Result<(Self::Io, Self::Addr)>> + Send;
}

impl Listener for TcpListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&self) -> std::io::Result<(TcpStream, SocketAddr)> {
        let (stream, addr) = TcpListener::accept(self).await?;
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
        Ok((stream, addr))
    }
}

impl Listener for UnixListener {
    type Io = UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    fn accept(
        &self,
    ) -> impl Future<Output = std::io::Result<(UnixStream, tokio::net::unix::SocketAddr)>> + Send
    {
        UnixListener::accept(self)
    }
}

/// How many connections a listener serves at once when its configuration does not say.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// The per-connection limits every HTTP listener applies.
#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    /// A client must send its request head within this time (HTTP/1).
    pub header_read_timeout: Duration,
    /// Largest request head: HTTP/1 buffer, HTTP/2 header list.
    pub max_header_bytes: usize,
    /// HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
}

impl Default for ConnLimits {
    /// The sidecar's defaults: 10 s to send a request head, 16 KiB of head, 256 HTTP/2
    /// streams per connection.
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 16 * 1024,
            max_concurrent_streams: 256,
        }
    }
}

/// An HTTP/1.1 + HTTP/2 server builder with `limits`.
pub fn http_server(limits: &ConnLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(limits.max_concurrent_streams);
    builder
}

/// Accepts connections until the drain starts, at most `max_connections` at once (more
/// wait in the kernel's accept queue), handing each to `handle` on its own task with a
/// [`Watch`] that holds the drain open until the connection ends. The listener closes
/// when the drain starts: new connections are refused from then on.
pub async fn accept<L, F, Fut>(
    listener: L,
    max_connections: usize,
    drain: Watch,
    what: &'static str,
    mut handle: F,
) where
    L: Listener,
    F: FnMut(L::Io, L::Addr, Watch) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    accept_with_slot(
        listener,
        max_connections,
        drain,
        what,
        move |io, addr, watch, slot| {
            let task = handle(io, addr, watch);
            async move {
                task.await;
                drop(slot);
            }
        },
    )
    .await;
}

/// A connection's place under `max_connections`: the slot is free again once dropped.
pub type Slot = tokio::sync::OwnedSemaphorePermit;

/// [`accept`], with the connection's [`Slot`] handed to `handle`, for a listener whose
/// connections outlive the task that accepted them (tonic's, which takes connections
/// from a channel): the slot goes with the connection, and no task waits beside it.
pub async fn accept_with_slot<L, F, Fut>(
    listener: L,
    max_connections: usize,
    drain: Watch,
    what: &'static str,
    mut handle: F,
) where
    L: Listener,
    F: FnMut(L::Io, L::Addr, Watch, Slot) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    accept_into(
        listener,
        max_connections,
        drain,
        what,
        move |io, addr, watch, slot| {
            tokio::spawn(handle(io, addr, watch, slot));
        },
    )
    .await;
}

/// [`accept_with_slot`] for a `handle` that starts the connection itself (hands it to
/// another runtime, say): it is called on the accepting task, and nothing is spawned
/// here for the connection.
pub async fn accept_into<L, F>(
    listener: L,
    max_connections: usize,
    mut drain: Watch,
    what: &'static str,
    mut handle: F,
) where
    L: Listener,
    F: FnMut(L::Io, L::Addr, Watch, Slot),
{
    let slots = Arc::new(Semaphore::new(max_connections.max(1)));
    loop {
        let next = async {
            let permit = slots.clone().acquire_owned().await;
            (permit, listener.accept().await)
        };
        let (permit, accepted) = tokio::select! {
            biased;
            () = drain.signaled() => break,
            next = next => next,
        };
        let Ok(permit) = permit else { break };
        match accepted {
            Ok((stream, addr)) => handle(stream, addr, drain.clone(), permit),
            Err(error) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(%error, listener = what, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    tracing::info!(listener = what, "draining: no longer accepting connections");
}

/// Serves HTTP on one connection. When the drain starts, the connection shuts down
/// gracefully: HTTP/1 closes after the request in flight, HTTP/2 sends GOAWAY and
/// finishes the streams it already accepted.
pub async fn serve_connection<I, S, B>(
    server: &auto::Builder<TokioExecutor>,
    io: I,
    service: S,
    mut drain: Watch,
) -> Result<(), Box<dyn StdError + Send + Sync>>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>,
    S::Future: 'static,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    B: Body + 'static,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
    TokioExecutor: HttpServerConnExec<S::Future, B>,
{
    let conn = server.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => return result,
        () = drain.signaled() => {}
    }
    conn.as_mut().graceful_shutdown();
    conn.await
}
