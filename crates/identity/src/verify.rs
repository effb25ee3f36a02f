//! SPIFFE X.509-SVID verification: pick the bundle by the peer's trust domain, verify the
//! chain with webpki, then authorize the SPIFFE ID. DNS names play no part.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::{CertificateError, OtherError};
use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use x509_parser::extensions::GeneralName;

/// SPIFFE-specific reasons a peer certificate is refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SpiffeVerifyError {
    /// The certificate has no (or more than one) `spiffe://` URI SAN.
    #[error("peer certificate has no single SPIFFE ID URI SAN: {0}")]
    NoSpiffeId(String),
    /// No bundle is configured for the peer's trust domain.
    #[error("no trust bundle for the peer's trust domain `{0}`")]
    UnknownTrustDomain(String),
    /// This workload has no SVID yet, so it can verify nothing.
    #[error("this workload has no identity yet")]
    NoIdentity,
    /// Authenticated, but the SPIFFE ID is not allowed here.
    #[error("peer `{0}` is not allowed")]
    NotAllowed(String),
    /// Outbound: the upstream presented another SPIFFE ID than expected.
    #[error("upstream identity mismatch: expected {expected}, upstream presented {presented}")]
    Mismatch {
        /// What the config expects.
        expected: String,
        /// What the certificate carries.
        presented: String,
    },
}

impl SpiffeVerifyError {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoSpiffeId(_) => "no_spiffe_id",
            Self::UnknownTrustDomain(_) => "unknown_trust_domain",
            Self::NoIdentity => "no_identity",
            Self::NotAllowed(_) => "peer_not_allowed",
            Self::Mismatch { .. } => "spiffe_id_mismatch",
        }
    }

    pub(crate) fn into_rustls(self) -> rustls::Error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(self))))
    }
}

/// The single `spiffe://` URI SAN of a certificate.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<String, SpiffeVerifyError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| SpiffeVerifyError::NoSpiffeId(format!("unparseable certificate: {e}")))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| SpiffeVerifyError::NoSpiffeId(e.to_string()))?
        .ok_or_else(|| SpiffeVerifyError::NoSpiffeId("no subjectAltName".into()))?;
    let mut ids = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(*uri),
        _ => None,
    });
    match (ids.next(), ids.next()) {
        (Some(id), None) => {
            let parsed = spiffe::SpiffeId::new(id)
                .map_err(|e| SpiffeVerifyError::NoSpiffeId(e.to_string()))?;
            // The X509-SVID specification allows only the lower-case spelling; a
            // certificate with another one would compare unequal to every list entry.
            if parsed.to_string() != id {
                return Err(SpiffeVerifyError::NoSpiffeId(format!(
                    "`{}` is not in canonical form (scheme and trust domain must be lower case)",
                    id.escape_debug()
                )));
            }
            Ok(id.to_string())
        }
        (None, _) => Err(SpiffeVerifyError::NoSpiffeId("no spiffe:// URI SAN".into())),
        (Some(_), Some(_)) => Err(SpiffeVerifyError::NoSpiffeId(
            "more than one spiffe:// URI SAN".into(),
        )),
    }
}

/// Verifies a chain against `anchors` for `usage`, mapping webpki errors to rustls ones.
pub(crate) fn verify_chain(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    anchors: &[TrustAnchor<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
    provider: &CryptoProvider,
) -> Result<(), rustls::Error> {
    let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
    cert.verify_for_usage(
        provider.signature_verification_algorithms.all,
        anchors,
        intermediates,
        now,
        usage,
        None,
        None,
    )
    .map(|_| ())
    .map_err(pki_error)
}

#[allow(deprecated)] // webpki keeps the old variants for compatibility; map them too
fn pki_error(error: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let cert_error = match error {
        E::BadDer | E::BadDerTime | E::TrailingData(_) => CertificateError::BadEncoding,
        E::CertExpired { .. } | E::InvalidCertValidity => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey
        | E::UnsupportedSignatureAlgorithmForPublicKey
        | E::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => CertificateError::BadSignature,
        #[allow(deprecated)]
        E::RequiredEkuNotFound | E::RequiredEkuNotFoundContext(_) => {
            CertificateError::InvalidPurpose
        }
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(cert_error)
}

/// Full peer check shared by the inbound and outbound verifiers: returns the peer's ID.
pub(crate) fn verify_peer(
    store: &crate::IdentityStore,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<String, rustls::Error> {
    let identity = store
        .current()
        .ok_or_else(|| SpiffeVerifyError::NoIdentity.into_rustls())?;
    let peer_id = spiffe_id_of(end_entity).map_err(SpiffeVerifyError::into_rustls)?;
    let domain = crate::store::trust_domain_of(&peer_id);
    let anchors = identity
        .anchors(domain)
        .ok_or_else(|| SpiffeVerifyError::UnknownTrustDomain(domain.to_string()).into_rustls())?;
    verify_chain(
        end_entity,
        intermediates,
        anchors,
        now,
        usage,
        store.provider(),
    )?;
    Ok(peer_id)
}

/// A metrics label for a failed TLS handshake, from the error the handshake returned.
pub fn handshake_failure_reason(error: &std::io::Error) -> &'static str {
    use std::io::ErrorKind;
    let Some(tls) = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return match error.kind() {
            ErrorKind::TimedOut => "timeout",
            ErrorKind::UnexpectedEof => "eof",
            ErrorKind::ConnectionReset => "reset",
            _ => "io",
        };
    };
    tls_error_reason(tls)
}

fn tls_error_reason(error: &rustls::Error) -> &'static str {
    match error {
        rustls::Error::NoCertificatesPresented => "no_client_certificate",
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            CertificateError::UnknownIssuer => "unknown_issuer",
            CertificateError::BadSignature => "bad_signature",
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "invalid_purpose"
            }
            CertificateError::Other(OtherError(inner)) => inner
                .downcast_ref::<SpiffeVerifyError>()
                .map(SpiffeVerifyError::reason)
                .unwrap_or("invalid_certificate"),
            _ => "invalid_certificate",
        },
        rustls::Error::AlertReceived(_) => "alert_received",
        rustls::Error::PeerIncompatible(_) => "incompatible",
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            "protocol_error"
        }
        rustls::Error::General(msg) if msg.contains("no server certificate") => "no_identity",
        _ => "tls_error",
    }
}
