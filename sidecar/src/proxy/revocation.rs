//! Refuses requests from or to a revoked workload ([`Refusal::Revoked`], 403), and every
//! request once the gateway has been lost past `fail_closed_after` or enforcement is held
//! ([`Refusal::Unenforceable`], 503), before the policy runs. The
//! revoked set comes from the gateway's control stream; when this sidecar's own
//! workload is revoked, it stops forwarding for it in both directions.
//!
//! [`close_when_revoked`] ends an open connection as soon as its peer (or this
//! workload) is revoked.

use std::sync::Arc;

use http::Request;

use super::authorize::Parties;
use super::outcome::{Decision, Exchange, Refusal, Verdict};
use super::{AnswerFuture, Next, Step};
use crate::control::{Enforcement, Refused};

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct RevocationLayer {
    enforcement: Arc<Enforcement>,
    parties: Parties,
}

impl RevocationLayer {
    /// Checks `parties` against `enforcement` on every request.
    pub fn new(enforcement: Arc<Enforcement>, parties: Parties) -> Self {
        Self {
            enforcement,
            parties,
        }
    }
}

impl<S: Next<B>, B> Step<S, B> for RevocationLayer {
    type Body = B;

    fn call(&self, req: Request<B>, next: &mut S) -> AnswerFuture {
        let Some(refused) = self
            .enforcement
            .refusal(&self.parties.source, &self.parties.destination)
        else {
            return Box::pin(next.call(req));
        };
        let (verdict, refusal) = match refused {
            Refused::Revoked(reason) => (Verdict::Revoked, Refusal::Revoked { reason }),
            Refused::Unenforceable(reason) => {
                (Verdict::GatewayLost, Refusal::Unenforceable { reason })
            }
        };
        if let Some(exchange) = Exchange::of(req.extensions()) {
            exchange.decide(Decision::without_policy(verdict, refusal.to_string()));
        }
        Box::pin(async move { Err(refusal) })
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
