//! Body wrappers for the steps that watch bytes go by: [`TappedBody`] shows every data
//! frame of a body to a [`Tap`] (the audit step hashes the request body, the watch
//! counts it); [`ObservedBody`] also tells an [`EndObserver`] once, when the response
//! body ends or is dropped before its end (the trace step ends its span there, the
//! watch reports the exchange).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use nexus_audit::BodyDigest;

use super::ProxyBody;

/// Sees each data frame of a body.
pub trait Tap {
    /// One data frame.
    fn data(&self, data: &Bytes);
}

impl Tap for Arc<Mutex<BodyDigest>> {
    fn data(&self, data: &Bytes) {
        self.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .update(data);
    }
}

impl Tap for Arc<AtomicU64> {
    fn data(&self, data: &Bytes) {
        self.fetch_add(data.len() as u64, Ordering::Relaxed);
    }
}

/// A body whose data frames `tap` sees as they stream.
pub struct TappedBody<B, T> {
    inner: B,
    tap: T,
}

impl<B, T> TappedBody<B, T> {
    /// Wraps `inner`.
    pub fn new(inner: B, tap: T) -> Self {
        Self { inner, tap }
    }
}

impl<B, T> Body for TappedBody<B, T>
where
    B: Body<Data = Bytes> + Unpin,
    T: Tap + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.tap.data(data);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Watches a response body to its end.
pub trait EndObserver: Send + Sync + Unpin + 'static {
    /// One data frame.
    fn data(&mut self, _data: &Bytes) {}
    /// The body failed (its end follows, not complete).
    fn error(&mut self) {}
    /// Called once: `complete` when the body reached its end, false when it failed or
    /// was dropped before (the client went away).
    fn end(self, complete: bool);
}

/// A response body that an [`EndObserver`] watches.
pub struct ObservedBody<O: EndObserver> {
    inner: ProxyBody,
    observer: Option<O>,
}

impl<O: EndObserver> ObservedBody<O> {
    /// Wraps `inner` and boxes the result as a [`ProxyBody`].
    pub fn boxed(inner: ProxyBody, observer: O) -> ProxyBody {
        Self {
            inner,
            observer: Some(observer),
        }
        .boxed()
    }
}

impl<O: EndObserver> Body for ObservedBody<O> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(observer)) = (frame.data_ref(), this.observer.as_mut()) {
                    observer.data(data);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(mut observer) = this.observer.take() {
                    observer.error();
                    observer.end(false);
                }
            }
            Poll::Ready(None) => {
                if let Some(observer) = this.observer.take() {
                    observer.end(true);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<O: EndObserver> Drop for ObservedBody<O> {
    fn drop(&mut self) {
        if let Some(observer) = self.observer.take() {
            // hyper stops polling once `is_end_stream` says so: that is a complete body.
            observer.end(self.inner.is_end_stream());
        }
    }
}
