//! Identity from PEM files (certificate chain, key, bundles), for users without SPIRE.
//! The files are re-read when their contents change, so cert-manager or a Kubernetes
//! Secret update rotates the identity without a restart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

use crate::{Bundles, IdentityStore, Svid};

/// Paths of the static identity.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileSourceConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// PEM CA certificates of the workload's own trust domain.
    pub bundle: PathBuf,
    /// Federated trust domains: name -> PEM CA certificates.
    #[serde(default)]
    pub federated_bundles: BTreeMap<String, PathBuf>,
}

/// A file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FileSourceError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file holds no PEM item of the expected kind.
    #[error("{path} holds no {what} in PEM form")]
    Empty {
        /// The file.
        path: PathBuf,
        /// What was expected.
        what: &'static str,
    },
    /// The leaf has no SPIFFE ID, so the own trust domain is unknown.
    #[error("{path}: {source}")]
    NoSpiffeId {
        /// The certificate file.
        path: PathBuf,
        /// Why.
        source: crate::SpiffeVerifyError,
    },
}

fn read(path: &Path) -> Result<Vec<u8>, FileSourceError> {
    std::fs::read(path).map_err(|source| FileSourceError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, FileSourceError> {
    let bytes = read(path)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut bytes.as_slice())
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(FileSourceError::Empty {
            path: path.to_path_buf(),
            what,
        });
    }
    Ok(certs)
}

/// Reads all the files once.
pub fn load(config: &FileSourceConfig) -> Result<(Svid, Bundles), FileSourceError> {
    let chain = certs(&config.cert, "certificate")?;
    let key_bytes = read(&config.key)?;
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key_bytes.as_slice())
        .ok()
        .flatten()
        .ok_or_else(|| FileSourceError::Empty {
            path: config.key.clone(),
            what: "private key",
        })?;
    let own_id = chain
        .first()
        .map(crate::spiffe_id_of)
        .transpose()
        .map_err(|source| FileSourceError::NoSpiffeId {
            path: config.cert.clone(),
            source,
        })?
        .unwrap_or_default();
    let mut bundles = Bundles::default();
    bundles.0.insert(
        crate::store::trust_domain_of(&own_id).to_string(),
        certs(&config.bundle, "CA certificate")?,
    );
    for (domain, path) in &config.federated_bundles {
        bundles
            .0
            .insert(domain.clone(), certs(path, "CA certificate")?);
    }
    Ok((Svid { chain, key }, bundles))
}

fn fingerprint(config: &FileSourceConfig) -> Vec<Option<Vec<u8>>> {
    let mut paths = vec![&config.cert, &config.key, &config.bundle];
    paths.extend(config.federated_bundles.values());
    paths.into_iter().map(|p| std::fs::read(p).ok()).collect()
}

/// Publishes the files now, then re-reads them every `interval` and republishes when
/// they change. A broken update is logged and the last good identity keeps serving.
pub async fn run(config: FileSourceConfig, store: Arc<IdentityStore>, interval: Duration) {
    let mut last = None;
    loop {
        let current = fingerprint(&config);
        if last.as_ref() != Some(&current) {
            match load(&config) {
                Ok((svid, bundles)) => match store.publish(svid, &bundles) {
                    Ok(_) => last = Some(current),
                    Err(error) => {
                        tracing::error!(%error, cert = %config.cert.display(), "refused the identity files")
                    }
                },
                Err(error) => tracing::error!(%error, "cannot load the identity files"),
            }
        }
        tokio::time::sleep(interval).await;
    }
}
