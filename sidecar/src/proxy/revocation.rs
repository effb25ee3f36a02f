//! Refuses requests from or to a revoked workload (403), and every request once the
//! gateway has been lost past `fail_closed_after` (503), before the policy runs. The
//! revoked set comes from the gateway's control stream; when this sidecar's own
//! workload is revoked, it stops forwarding for it in both directions.
//!
//! [`close_when_revoked`] ends an open connection as soon as its peer (or this
//! workload) is revoked.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response, StatusCode};

use super::authorize::Parties;
use super::{ProxyBody, audit::AuditFacts, json_response, trace::TraceFacts};
use crate::control::Enforcement;
use crate::metrics::Metrics;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct RevocationLayer {
    enforcement: Arc<Enforcement>,
    metrics: Arc<Metrics>,
    parties: Parties,
}

impl RevocationLayer {
    /// Checks `parties` against `enforcement` on every request.
    pub fn new(enforcement: Arc<Enforcement>, metrics: Arc<Metrics>, parties: Parties) -> Self {
        Self {
            enforcement,
            metrics,
            parties,
        }
    }
}

step_layer!(RevocationLayer => CheckRevocation);

impl<S, B> tower::Service<Request<B>> for CheckRevocation<S>
where
    S: tower::Service<Request<B>, Response = Response<ProxyBody>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<ProxyBody>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let layer = &self.layer;
        let Some(refusal) = layer
            .enforcement
            .refusal(&layer.parties.source, &layer.parties.destination)
        else {
            return Box::pin(self.inner.call(req));
        };
        layer.metrics.revocation_refusal(layer.parties.direction);
        let result = if refusal.status == 403 {
            "revoked"
        } else {
            "gateway_lost"
        };
        if let Some(trace) = TraceFacts::get(req.extensions()) {
            trace.set_decision(result, "", "", None);
        }
        if let Some(audit) = AuditFacts::get(req.extensions()) {
            audit.set_decision(result, "", "", std::slice::from_ref(&refusal.reason));
        }
        let status = StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::FORBIDDEN);
        let response = json_response(
            status,
            serde_json::json!({"allow": false, "reasons": [refusal.reason]}),
        );
        Box::pin(async move { Ok(response) })
    }
}

/// Resolves once `peer` or `me` becomes revoked while the connection is open. A
/// connection that starts revoked is left to the layer, which answers each request
/// with a 403 saying why.
pub async fn close_when_revoked(enforcement: Arc<Enforcement>, peer: Arc<str>, me: Arc<str>) {
    let mut changes = enforcement.changes();
    if enforcement.is_revoked(&peer) || enforcement.is_revoked(&me) {
        std::future::pending::<()>().await;
    }
    loop {
        if enforcement.is_revoked(&peer) || enforcement.is_revoked(&me) {
            return;
        }
        if changes.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
