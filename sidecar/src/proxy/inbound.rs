//! Inbound: terminate mTLS, authenticate the peer's SPIFFE ID (in the handshake, against
//! the allow list), then forward to the local app on loopback.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use nexus_identity::{AllowList, handshake_failure_reason, spiffe_id_of};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::authorize::Parties;
use super::forward::{Forward, VersionPolicy};
use super::layers::Peer;
use super::stack::{Listener, Proxy, Site};
use super::trace::TraceLayer;
use crate::config::{AppProtocol, Config};

/// The direction, in metrics, records and spans.
pub const DIRECTION: &str = "inbound";

/// The inbound proxy of one sidecar.
pub struct Inbound {
    proxy: Proxy,
    acceptor: TlsAcceptor,
    forward: Forward<HttpConnector>,
    handshake_timeout: Duration,
}

impl Inbound {
    /// Builds the inbound proxy over `proxy`; `config.inbound` must be set.
    pub fn new(config: &Config, proxy: Proxy) -> anyhow::Result<Self> {
        let inbound = config
            .inbound
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("no [inbound] section"))?;
        let allowed = AllowList::parse(&inbound.allowed_ids)?;
        let tls = nexus_identity::tls::server_config(
            proxy.steps().store.clone(),
            allowed,
            config.tls_versions(),
            vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        )?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.limits.connect_timeout));
        connector.set_nodelay(true);
        let versions = match inbound.app_protocol {
            AppProtocol::Auto => VersionPolicy::Preserve,
            AppProtocol::Http1 => VersionPolicy::Http1,
            AppProtocol::Http2 => VersionPolicy::Http2,
        };
        let forward = Forward::new(
            &config.limits,
            (connector.clone(), connector),
            http::uri::Scheme::HTTP,
            inbound.app.parse()?,
            versions,
        );
        Ok(Self {
            proxy,
            acceptor: TlsAcceptor::from(Arc::new(tls)),
            forward,
            handshake_timeout: config.tls.handshake_timeout,
        })
    }
}

impl Listener for Inbound {
    fn proxy(&self) -> &Proxy {
        &self.proxy
    }

    async fn connection(self: Arc<Self>, stream: TcpStream, drain: nexus_serve::Watch) {
        let metrics = &self.proxy.steps().metrics;
        let watch = self.proxy.steps().watch.as_ref();
        let tls = match tokio::time::timeout(self.handshake_timeout, self.acceptor.accept(stream))
            .await
        {
            Ok(Ok(tls)) => tls,
            Ok(Err(error)) => {
                let reason = handshake_failure_reason(&error);
                if let Some(watch) = watch {
                    watch.auth_failure(None, reason);
                }
                tracing::debug!(%error, reason, "inbound handshake failed");
                metrics.handshake_failure(DIRECTION, reason);
                return;
            }
            Err(_) => {
                metrics.handshake_failure(DIRECTION, "timeout");
                return;
            }
        };
        let leaf = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first());
        // The identity the handshake verified is good until its certificate's not-after:
        // the connection ends then (a peer whose agent stopped renewing gets no requests
        // through on an expired SVID).
        let peer_not_after = leaf.and_then(|leaf| nexus_identity::not_after_of(leaf).ok());
        let Some(peer) = leaf.and_then(|leaf| {
            let spiffe_id = spiffe_id_of(leaf).ok()?;
            let digest = ring::digest::digest(&ring::digest::SHA256, leaf);
            let cert_hash = data_encoding::HEXLOWER.encode(digest.as_ref());
            Some(Peer {
                spiffe_id: spiffe_id.into(),
                cert_hash: cert_hash.into(),
            })
        }) else {
            // The verifier already required an SVID; this is unreachable in practice.
            metrics.handshake_failure(DIRECTION, "no_spiffe_id");
            return;
        };
        if self.proxy.steps().enforcement.is_revoked(&peer.spiffe_id) {
            // Refused before any request: its connection closes now.
            metrics.handshake_failure(DIRECTION, "revoked");
            return;
        }
        let site = Site {
            parties: Parties {
                direction: DIRECTION,
                source: peer.spiffe_id.clone(),
                destination: self.proxy.me(),
            },
            trace: self
                .proxy
                .steps()
                .telemetry
                .as_ref()
                .map(|t| TraceLayer::inbound(t, DIRECTION, peer.spiffe_id.clone())),
            caller: Some(peer),
            observed: nexus_anomaly::Observed::Peer,
        };
        self.proxy
            .serve(tls, site, self.forward.clone(), peer_not_after, drain)
            .await;
    }
}
