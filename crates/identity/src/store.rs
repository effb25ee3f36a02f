//! The workload's current identity, published atomically.
//!
//! A new SVID is checked before it is published (the key matches the certificate, the
//! certificate carries the SPIFFE ID it claims and chains to its own trust domain's
//! bundle), as linkerd2-proxy's credential store does. Readers on the handshake path
//! load an `Arc` without locking.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwapOption;
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, TrustAnchor};
use tokio::sync::watch;

use crate::verify::{self, spiffe_id_of};

/// An X.509-SVID as a source delivers it.
pub struct Svid {
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
}

impl fmt::Debug for Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Svid")
            .field("chain_len", &self.chain.len())
            .field("key", &"...")
            .finish()
    }
}

/// Trust bundles by trust domain name (`nexus.local`), each a list of CA certificates.
#[derive(Clone, Debug, Default)]
pub struct Bundles(pub HashMap<String, Vec<CertificateDer<'static>>>);

/// Why a new identity was refused; the previous one (if any) keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The SVID has no certificates.
    #[error("the SVID has an empty certificate chain")]
    EmptyChain,
    /// The private key could not be loaded or does not match the certificate.
    #[error("the SVID's private key is unusable or does not match its certificate: {0}")]
    Key(rustls::Error),
    /// The leaf does not carry exactly one SPIFFE ID URI SAN.
    #[error("the SVID's certificate has no valid SPIFFE ID: {0}")]
    NoSpiffeId(String),
    /// No bundle for the SVID's own trust domain.
    #[error("no trust bundle for the SVID's own trust domain `{0}`")]
    NoOwnBundle(String),
    /// A bundle certificate is not a usable trust anchor.
    #[error("trust bundle for `{domain}` holds a certificate that is not a usable CA: {reason}")]
    BadBundle {
        /// Trust domain of the bundle.
        domain: String,
        /// What webpki reported.
        reason: String,
    },
    /// The SVID does not chain to its own bundle (or is expired).
    #[error("the SVID does not verify against its own trust bundle: {0}")]
    Untrusted(String),
}

/// One published identity: SVID converted for rustls, plus the trust anchors by domain.
pub struct Identity {
    spiffe_id: String,
    trust_domain: String,
    certified_key: Arc<CertifiedKey>,
    anchors: HashMap<String, Vec<TrustAnchor<'static>>>,
    not_after: i64,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("spiffe_id", &self.spiffe_id)
            .field("not_after", &self.not_after)
            .field("trust_domains", &self.anchors.keys().collect::<Vec<_>>())
            .field("key", &"...")
            .finish()
    }
}

impl Identity {
    /// Builds and checks an identity. `provider` loads the key.
    pub fn build(
        svid: Svid,
        bundles: &Bundles,
        provider: &CryptoProvider,
    ) -> Result<Self, IdentityError> {
        let leaf = svid.chain.first().ok_or(IdentityError::EmptyChain)?.clone();
        let spiffe_id =
            spiffe_id_of(&leaf).map_err(|e| IdentityError::NoSpiffeId(e.to_string()))?;
        let trust_domain = trust_domain_of(&spiffe_id).to_string();
        let not_after = not_after_of(&leaf).map_err(IdentityError::NoSpiffeId)?;
        let certified_key = CertifiedKey::from_der(svid.chain.clone(), svid.key, provider)
            .map_err(IdentityError::Key)?;

        let mut anchors = HashMap::with_capacity(bundles.0.len());
        for (domain, certs) in &bundles.0 {
            let mut list = Vec::with_capacity(certs.len());
            for cert in certs {
                let anchor = webpki::anchor_from_trusted_cert(cert).map_err(|e| {
                    IdentityError::BadBundle {
                        domain: domain.clone(),
                        reason: e.to_string(),
                    }
                })?;
                list.push(anchor.to_owned());
            }
            anchors.insert(domain.clone(), list);
        }
        let own = anchors
            .get(&trust_domain)
            .filter(|a| !a.is_empty())
            .ok_or_else(|| IdentityError::NoOwnBundle(trust_domain.clone()))?;
        verify::verify_chain(
            &leaf,
            svid.chain.get(1..).unwrap_or_default(),
            own,
            crate::clock::unix_time(),
            webpki::KeyUsage::client_auth(),
            provider,
        )
        .map_err(|e| IdentityError::Untrusted(e.to_string()))?;

        Ok(Self {
            spiffe_id,
            trust_domain,
            certified_key: Arc::new(certified_key),
            anchors,
            not_after,
        })
    }

    /// The workload's SPIFFE ID.
    pub fn spiffe_id(&self) -> &str {
        &self.spiffe_id
    }

    /// The workload's trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The chain and key rustls presents.
    pub fn certified_key(&self) -> &Arc<CertifiedKey> {
        &self.certified_key
    }

    /// Trust anchors for a trust domain, if its bundle is known.
    pub fn anchors(&self, trust_domain: &str) -> Option<&[TrustAnchor<'static>]> {
        self.anchors.get(trust_domain).map(Vec::as_slice)
    }

    /// The leaf's notAfter as unix seconds.
    pub fn not_after(&self) -> i64 {
        self.not_after
    }

    /// The leaf certificate in DER.
    pub fn leaf(&self) -> Option<&CertificateDer<'static>> {
        self.certified_key.cert.first()
    }
}

/// Holds the current identity; readers never block.
pub struct IdentityStore {
    current: ArcSwapOption<Identity>,
    provider: Arc<CryptoProvider>,
    updates: watch::Sender<u64>,
    rotations: AtomicU64,
}

impl fmt::Debug for IdentityStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityStore")
            .field("current", &self.current.load())
            .finish()
    }
}

impl IdentityStore {
    /// An empty store: no identity, so every handshake fails until a source publishes.
    pub fn new(provider: Arc<CryptoProvider>) -> Arc<Self> {
        Arc::new(Self {
            current: ArcSwapOption::empty(),
            provider,
            updates: watch::channel(0).0,
            rotations: AtomicU64::new(0),
        })
    }

    /// Validates and publishes a new SVID and bundle set. On error the previous identity
    /// keeps serving.
    pub fn publish(&self, svid: Svid, bundles: &Bundles) -> Result<Arc<Identity>, IdentityError> {
        let identity = Arc::new(Identity::build(svid, bundles, &self.provider)?);
        let previous = self.current.swap(Some(identity.clone()));
        if previous.is_some() {
            self.rotations.fetch_add(1, Ordering::Relaxed);
        }
        self.updates.send_modify(|revision| *revision += 1);
        tracing::info!(
            spiffe_id = identity.spiffe_id(),
            not_after = identity.not_after(),
            trust_domains = ?identity.anchors.keys().collect::<Vec<_>>(),
            "identity published"
        );
        Ok(identity)
    }

    /// The current identity, if one has been published.
    pub fn current(&self) -> Option<Arc<Identity>> {
        self.current.load_full()
    }

    /// True once an identity is present.
    pub fn is_ready(&self) -> bool {
        self.current.load().is_some()
    }

    /// Number of identities published after the first.
    pub fn rotations(&self) -> u64 {
        self.rotations.load(Ordering::Relaxed)
    }

    /// A receiver that changes whenever a new identity is published.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.updates.subscribe()
    }

    /// The crypto provider used for keys and signatures.
    pub fn provider(&self) -> &Arc<CryptoProvider> {
        &self.provider
    }
}

/// The trust domain part of a SPIFFE ID (`spiffe://td/path` -> `td`).
pub(crate) fn trust_domain_of(id: &str) -> &str {
    let rest = id.strip_prefix("spiffe://").unwrap_or(id);
    rest.split('/').next().unwrap_or(rest)
}

/// A certificate's not-after, Unix seconds.
pub fn not_after_of(cert: &CertificateDer<'_>) -> Result<i64, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).map_err(|e| e.to_string())?;
    Ok(parsed.validity().not_after.timestamp())
}
