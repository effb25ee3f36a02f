//! Outbound: the local app speaks plain HTTP to a loopback listener; the sidecar
//! originates mTLS with its SVID and accepts the upstream only if it presents the
//! expected SPIFFE ID. On a mismatch the handshake fails before any request byte is
//! sent, and the app gets a 502 saying so.

use std::sync::Arc;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use nexus_identity::AllowList;
use tokio::net::TcpStream;

use super::authorize::Parties;
use super::forward::{Forward, VersionPolicy};
use super::stack::{Listener, Proxy, Site};
use super::trace::TraceLayer;
use crate::config::{Config, OutboundConfig};

/// The direction, in metrics, records and spans.
pub const DIRECTION: &str = "outbound";

/// One outbound listener and its upstream.
pub struct Outbound {
    proxy: Proxy,
    forward: Forward<HttpsConnector<HttpConnector>>,
    expected_id: Arc<str>,
    trace: Option<TraceLayer>,
}

impl Outbound {
    /// Builds the proxy for `out` over `proxy`.
    pub fn new(config: &Config, out: &OutboundConfig, proxy: Proxy) -> anyhow::Result<Self> {
        let expected = AllowList::parse(&[&out.expected_id])?;
        let tls = nexus_identity::tls::client_config(
            proxy.steps().store.clone(),
            expected,
            config.tls_versions(),
            Vec::new(),
        )?;
        let mut tcp = HttpConnector::new();
        tcp.set_connect_timeout(Some(config.limits.connect_timeout));
        tcp.set_nodelay(true);
        tcp.enforce_http(false);
        let h1 = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls.clone())
            .https_only()
            .enable_http1()
            .wrap_connector(tcp.clone());
        let h2 = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http2()
            .wrap_connector(tcp);
        let upstream: http::uri::Authority = out.upstream.parse()?;
        let expected_id: Arc<str> = out.expected_id.as_str().into();
        let trace = proxy
            .steps()
            .telemetry
            .as_ref()
            .map(|t| TraceLayer::outbound(t, DIRECTION, &upstream, expected_id.clone()));
        let forward = Forward::new(
            &config.limits,
            (h1, h2),
            http::uri::Scheme::HTTPS,
            upstream,
            VersionPolicy::Preserve,
        );
        Ok(Self {
            proxy,
            forward,
            expected_id,
            trace,
        })
    }
}

impl Listener for Outbound {
    fn proxy(&self) -> &Proxy {
        &self.proxy
    }

    async fn connection(self: Arc<Self>, stream: TcpStream, drain: nexus_serve::Watch) {
        let site = Site {
            parties: Parties {
                direction: DIRECTION,
                source: self.proxy.me(),
                destination: self.expected_id.clone(),
            },
            caller: None,
            trace: self.trace.clone(),
            observed: nexus_anomaly::Observed::Own,
        };
        self.proxy
            .serve(stream, site, self.forward.clone(), None, drain)
            .await;
    }
}
