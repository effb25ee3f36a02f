//! The caller-identity step: who called, told to the app.

use std::sync::Arc;

use http::Request;
use nexus_identity::IdentityStore;

use super::headers::{set_xfcc, strip_hop_by_hop};
use super::{AnswerFuture, Next, Step};

/// The peer as the TLS handshake authenticated it.
#[derive(Clone, Debug)]
pub struct Peer {
    /// Its SPIFFE ID.
    pub spiffe_id: Arc<str>,
    /// SHA-256 of its leaf certificate, hex.
    pub cert_hash: Arc<str>,
}

/// Strips hop-by-hop headers and, inbound, tells the app who called through
/// `x-forwarded-client-cert`, replacing whatever the client sent under that name.
#[derive(Clone, Debug)]
pub struct CallerIdentityLayer {
    store: Arc<IdentityStore>,
    peer: Option<Peer>,
}

impl CallerIdentityLayer {
    /// Inbound: sets XFCC for `peer`. Outbound (`peer = None`): removes any XFCC.
    pub fn new(store: Arc<IdentityStore>, peer: Option<Peer>) -> Self {
        Self { store, peer }
    }
}

impl<S: Next<B>, B> Step<S, B> for CallerIdentityLayer {
    type Body = B;

    fn call(&self, mut req: Request<B>, next: &mut S) -> AnswerFuture {
        let headers = req.headers_mut();
        strip_hop_by_hop(headers);
        headers.remove(super::headers::XFCC);
        if let (Some(peer), Some(me)) = (&self.peer, self.store.current()) {
            set_xfcc(headers, me.spiffe_id(), &peer.cert_hash, &peer.spiffe_id);
        }
        Box::pin(next.call(req))
    }
}
