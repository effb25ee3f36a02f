//! Identity from the SPIFFE Workload API through the `spiffe` crate's `X509Source`.
//!
//! The source connects (retrying while the agent is away), syncs, and then pushes every
//! rotation; each update is converted to rustls types and published as a whole.

use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use spiffe::X509Source;

use crate::{Bundles, IdentityStore, Svid};

/// Normalizes a socket setting: a bare path becomes `unix://PATH`.
pub fn endpoint_url(socket: &str) -> String {
    if socket.contains("://") || socket.starts_with("unix:") {
        socket.to_string()
    } else {
        format!("unix://{socket}")
    }
}

/// Runs forever: keeps `store` in sync with the Workload API at `endpoint` (or
/// `SPIFFE_ENDPOINT_SOCKET` when `None`).
pub async fn run(endpoint: Option<String>, store: Arc<IdentityStore>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut builder = X509Source::builder();
        if let Some(endpoint) = &endpoint {
            builder = builder.endpoint(endpoint_url(endpoint));
        }
        match builder.build().await {
            Ok(source) => {
                backoff = Duration::from_millis(100);
                publish(&source, &store);
                let mut updates = source.updated();
                while updates.changed().await.is_ok() {
                    publish(&source, &store);
                }
                tracing::warn!("Workload API source closed; reconnecting");
                source.shutdown().await;
            }
            Err(error) => {
                tracing::warn!(%error, ?endpoint, "cannot get an SVID from the Workload API; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

fn publish(source: &X509Source, store: &IdentityStore) {
    let (svid, bundle_set) = match (source.svid(), source.bundle_set()) {
        (Ok(svid), Ok(bundles)) => (svid, bundles),
        (Err(error), _) | (_, Err(error)) => {
            tracing::warn!(%error, "Workload API update without a usable SVID; keeping the current one");
            return;
        }
    };
    let chain = svid
        .cert_chain()
        .iter()
        .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        svid.private_key().as_bytes().to_vec(),
    ));
    let bundles = Bundles(
        bundle_set
            .iter()
            .map(|(domain, bundle)| {
                let certs = bundle
                    .authorities()
                    .iter()
                    .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
                    .collect();
                (domain.to_string(), certs)
            })
            .collect(),
    );
    if let Err(error) = store.publish(Svid { chain, key }, &bundles) {
        tracing::error!(%error, "refused an SVID from the Workload API; keeping the current one");
    }
}
