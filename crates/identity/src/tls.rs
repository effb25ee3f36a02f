//! rustls configurations that read the [`IdentityStore`] on every handshake.
//!
//! Inbound: the server presents the current SVID and requires a client SVID that chains
//! to the bundle of the client's trust domain and whose ID is on the allow list.
//! Outbound: the client presents the current SVID and accepts only an upstream whose
//! SPIFFE ID matches what the config expects; the TLS server name is ignored.

use std::sync::Arc;

use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::clock::EnforcedTime;
use crate::verify::{SpiffeVerifyError, verify_peer};
use crate::{AllowList, IdentityStore};

/// TLS protocol versions to offer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsVersions {
    /// TLS 1.3 only (the default).
    #[default]
    Tls13Only,
    /// TLS 1.3 and 1.2.
    Tls12And13,
}

impl TlsVersions {
    fn list(self) -> &'static [&'static rustls::SupportedProtocolVersion] {
        static TLS13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
        static BOTH: &[&rustls::SupportedProtocolVersion] =
            &[&rustls::version::TLS13, &rustls::version::TLS12];
        match self {
            Self::Tls13Only => TLS13,
            Self::Tls12And13 => BOTH,
        }
    }
}

/// The inbound server config: mTLS required, peers filtered by `allowed`.
pub fn server_config(
    store: Arc<IdentityStore>,
    allowed: AllowList,
    versions: TlsVersions,
    alpn: Vec<Vec<u8>>,
) -> Result<ServerConfig, rustls::Error> {
    let provider = store.provider().clone();
    let verifier = Arc::new(SpiffeClientVerifier {
        store: store.clone(),
        allowed,
    });
    // Certificates are checked at the enforced time (crate::clock): a wall clock stepped
    // back does not make an expired peer certificate valid again.
    let mut config = ServerConfig::builder_with_details(provider, Arc::new(EnforcedTime))
        .with_protocol_versions(versions.list())?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(StoreResolver(store)));
    config.alpn_protocols = alpn;
    // No resumption: a resumed session skips the client-certificate check, so a peer
    // removed from the allow list, or whose SVID expired, would keep getting in.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// The outbound client config: presents the SVID, expects the upstream's SPIFFE ID.
pub fn client_config(
    store: Arc<IdentityStore>,
    expected: AllowList,
    versions: TlsVersions,
    alpn: Vec<Vec<u8>>,
) -> Result<ClientConfig, rustls::Error> {
    let provider = store.provider().clone();
    let verifier = Arc::new(SpiffeServerVerifier {
        store: store.clone(),
        expected,
    });
    let mut config = ClientConfig::builder_with_details(provider, Arc::new(EnforcedTime))
        .with_protocol_versions(versions.list())?
        .dangerous() // replaces WebPKI name checks with SPIFFE ID checks, not a weakening
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(StoreResolver(store)));
    config.alpn_protocols = alpn;
    // Every connection verifies the upstream's current SVID (see server_config).
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

#[derive(Debug)]
struct StoreResolver(Arc<IdentityStore>);

impl StoreResolver {
    fn key(&self) -> Option<Arc<CertifiedKey>> {
        self.0
            .current()
            .map(|identity| identity.certified_key().clone())
    }
}

impl ResolvesServerCert for StoreResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.key()
    }
}

impl ResolvesClientCert for StoreResolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.key()
    }

    fn has_certs(&self) -> bool {
        self.0.is_ready()
    }
}

/// The handshake-signature methods both verifiers share: checked with the store's
/// crypto provider, as rustls's own WebPKI verifiers do.
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            let algs = &self.store.provider().signature_verification_algorithms;
            rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            let algs = &self.store.provider().signature_verification_algorithms;
            rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.store
                .provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

#[derive(Debug)]
struct SpiffeClientVerifier {
    store: Arc<IdentityStore>,
    allowed: AllowList,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let peer = verify_peer(
            &self.store,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        if !self.allowed.allows(&peer) {
            return Err(SpiffeVerifyError::NotAllowed(peer).into_rustls());
        }
        Ok(ClientCertVerified::assertion())
    }

    handshake_signatures!();
}

#[derive(Debug)]
struct SpiffeServerVerifier {
    store: Arc<IdentityStore>,
    expected: AllowList,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let peer = verify_peer(
            &self.store,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        if !self.expected.allows(&peer) {
            return Err(SpiffeVerifyError::Mismatch {
                expected: self.expected.describe(),
                presented: peer,
            }
            .into_rustls());
        }
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures!();
}

/// A gRPC channel over mTLS to `address` (`host:port`): presents the store's SVID and
/// accepts only a server whose SPIFFE ID `expected` allows (the TLS name is not used).
/// The sidecar's control stream and nexusctl's admin calls both connect with it.
pub async fn grpc_channel(
    store: Arc<IdentityStore>,
    expected: AllowList,
    address: &str,
    connect_timeout: std::time::Duration,
) -> Result<tonic::transport::Channel, String> {
    let tls = Arc::new(
        client_config(
            store,
            expected,
            TlsVersions::Tls13Only,
            vec![b"h2".to_vec()],
        )
        .map_err(|e| e.to_string())?,
    );
    let address = address.to_string();
    let connector = tower::service_fn(move |_uri: http::Uri| {
        let tls = tls.clone();
        let address = address.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(&address).await?;
            let _ = tcp.set_nodelay(true);
            let name = ServerName::try_from("nexus-gateway")
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    let endpoint = tonic::transport::Endpoint::from_static("http://nexus-gateway")
        .connect_timeout(connect_timeout);
    let connect = endpoint.connect_with_connector(connector);
    match tokio::time::timeout(connect_timeout, connect).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(e)) => Err(error_chain(&e)),
        Err(_) => Err(format!("timed out after {connect_timeout:?}")),
    }
}

fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let text = e.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = e.source();
    }
    out
}
