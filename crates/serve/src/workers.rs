//! Connection workers: threads that each run a single-threaded tokio runtime and serve
//! whole connections (thread per core: Envoy's worker threads, nginx's worker
//! processes, actix-server's workers).
//!
//! The accept loop stays where it was; each accepted connection is handed to the worker
//! serving the fewest connections, and everything it does from then on runs on that one
//! thread: its TLS, its HTTP server, its requests' steps and the upstream connections
//! they open (a pool per worker, see [`current`]). On a runtime whose threads share
//! their tasks, a request and its upstream connection are woken on different threads,
//! and each hand-off is a futex wake and a context switch.
//!
//! What it costs: a connection stays on its worker, so one request that holds the thread
//! (a slow policy) delays the other connections of that worker rather than being worked
//! around. The workers live as long as the process: a draining connection keeps running
//! after its listener has stopped.

use std::cell::Cell;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::TcpStream;

thread_local! {
    static CURRENT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The index of the connection worker this thread is, or None on any other thread.
/// Per-worker state (an upstream connection pool) is chosen by it.
pub fn current() -> Option<usize> {
    CURRENT.get()
}

/// A fixed set of connection workers.
#[derive(Debug)]
pub struct Workers {
    workers: Vec<Worker>,
    /// Where the search for the least busy worker starts (turns among equals).
    next: AtomicUsize,
}

#[derive(Debug)]
struct Worker {
    handle: tokio::runtime::Handle,
    /// Connections this worker is serving.
    connections: Arc<AtomicUsize>,
}

/// Gives a connection's place back when the connection ends (or its task is dropped).
struct Serving(Arc<AtomicUsize>);

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Workers {
    /// Starts `count` workers (at least one), on threads named `{name}-{i}`.
    pub fn start(count: usize, name: &str) -> std::io::Result<Self> {
        let mut workers = Vec::with_capacity(count.max(1));
        for i in 0..count.max(1) {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    CURRENT.set(Some(i));
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => runtime,
                        Err(error) => {
                            let _ = tx.send(Err(error));
                            return;
                        }
                    };
                    let _ = tx.send(Ok(runtime.handle().clone()));
                    // Runs the connections handed to it until the process ends.
                    runtime.block_on(std::future::pending::<()>());
                })?;
            let handle = rx.recv().map_err(|_| {
                std::io::Error::other(format!("connection worker {name}-{i} did not start"))
            })??;
            workers.push(Worker {
                handle,
                connections: Arc::new(AtomicUsize::new(0)),
            });
        }
        Ok(Self {
            workers,
            next: AtomicUsize::new(0),
        })
    }

    /// How many workers there are.
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// Always false: there is at least one worker.
    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Connections each worker is serving now.
    pub fn connections(&self) -> Vec<usize> {
        self.workers
            .iter()
            .map(|w| w.connections.load(Ordering::Relaxed))
            .collect()
    }

    /// Serves `stream` on the worker with the fewest connections (in turn among equals):
    /// the stream moves to that worker's runtime, and `serve` runs there with it.
    pub fn serve<F, Fut>(&self, stream: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let n = self.workers.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let worker = (0..n)
            .map(|i| &self.workers[(start + i) % n])
            .min_by_key(|w| w.connections.load(Ordering::Relaxed))
            .unwrap_or(&self.workers[0]);
        // The stream leaves this runtime's reactor and joins the worker's.
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(error) => {
                tracing::warn!(%error, "cannot hand a connection to a worker");
                return;
            }
        };
        worker.connections.fetch_add(1, Ordering::Relaxed);
        let serving = Serving(worker.connections.clone());
        worker.handle.spawn(async move {
            let _serving = serving;
            match TcpStream::from_std(stream) {
                Ok(stream) => serve(stream).await,
                Err(error) => tracing::warn!(%error, "a worker cannot take a connection"),
            }
        });
    }
}
