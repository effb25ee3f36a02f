//! The development certificate authority: loads a CA certificate and key from PEM (or
//! generates a fresh one) and mints X.509-SVIDs the way SPIRE shapes them: an ECDSA P-256
//! leaf whose only URI SAN is the SPIFFE ID, `CA:FALSE`, digitalSignature +
//! keyEncipherment, serverAuth + clientAuth, a random serial. Never for production: the
//! keys it uses are committed to the repository.

use std::fmt;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

/// How far back a minted SVID's `not_before` lies, so that a peer whose clock runs a little
/// behind still accepts a freshly minted certificate.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(60);

/// The organisation every development certificate carries, so that one found in the wild
/// says what it is.
const DEV_ORGANIZATION: &str = "Nexus development (never production)";

/// Why the development CA could not be loaded or could not issue a certificate.
#[derive(Debug, thiserror::Error)]
pub enum DevCaError {
    /// The SPIFFE ID to mint an SVID for is malformed or names a trust domain, not a workload.
    #[error(
        "invalid SPIFFE ID {id:?}: {reason}; expected spiffe://TRUST-DOMAIN/PATH, \
         e.g. spiffe://nexus.local/ns/plugins/sa/flood-model"
    )]
    InvalidSpiffeId {
        /// The rejected ID.
        id: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The CA certificate PEM holds no readable certificate.
    #[error("CA certificate: {0}; expected a PEM file with a CERTIFICATE block")]
    CaCert(String),
    /// The CA key PEM holds no readable private key.
    #[error("CA key: {0}; expected a PEM file with a (PKCS#8) PRIVATE KEY block")]
    CaKey(String),
    /// The CA key is not the key of the CA certificate.
    #[error(
        "the CA key does not belong to the CA certificate (their public keys differ): \
         pass the key file that was generated together with the certificate"
    )]
    KeyMismatch,
    /// The requested validity window is empty or out of range.
    #[error("invalid validity: {0}")]
    Validity(String),
    /// rcgen could not build or sign the certificate.
    #[error("could not issue the certificate: {0}")]
    Issue(#[from] rcgen::Error),
    /// Writing a file of the development PKI failed.
    #[error("could not write {}: {source}", path.display())]
    Write {
        /// The file (or directory) that could not be written.
        path: std::path::PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// A development CA: a signing certificate (with its chain, if any) and its key.
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    /// The signing certificate first, then the rest of its chain up to the trust anchor.
    chain: Vec<CertificateDer<'static>>,
    cert_pem: String,
    subject: String,
}

/// A freshly minted X.509-SVID and its private key.
#[derive(Clone)]
pub struct MintedSvid {
    /// The leaf certificate, DER.
    pub cert_der: Vec<u8>,
    /// The leaf's private key, PKCS#8 DER.
    pub key_pkcs8_der: Vec<u8>,
    /// The leaf certificate, PEM.
    pub cert_pem: String,
    /// The leaf's private key, PKCS#8 PEM.
    pub key_pem: String,
    /// The end of the leaf's validity.
    pub not_after: OffsetDateTime,
}

impl fmt::Debug for MintedSvid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MintedSvid")
            .field("cert_der", &format_args!("<{} bytes>", self.cert_der.len()))
            .field("key", &"...")
            .field("not_after", &self.not_after)
            .finish()
    }
}

impl fmt::Debug for DevCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevCa")
            .field("subject", &self.subject)
            .field("chain_len", &self.chain.len())
            .field("key", &"...")
            .finish()
    }
}

impl DevCa {
    /// Loads a CA from PEM text. `cert_pem` holds the signing certificate, optionally
    /// followed by its chain; the last certificate is the trust anchor that goes into the
    /// trust bundle, the ones before it are sent as intermediates after each leaf.
    /// Text outside the PEM markers (such as the development warning line) is ignored.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, DevCaError> {
        let chain = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| DevCaError::CaCert(format!("unreadable PEM: {e}")))?;
        let Some(signer) = chain.first() else {
            return Err(DevCaError::CaCert("no certificate found".into()));
        };
        let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
            .map_err(|e| DevCaError::CaKey(format!("unreadable PEM: {e}")))?
            .ok_or_else(|| DevCaError::CaKey("no private key found".into()))?;
        let key = KeyPair::try_from(&key)
            .map_err(|e| DevCaError::CaKey(format!("unsupported key: {e}")))?;

        let (_, parsed) = x509_parser::parse_x509_certificate(signer)
            .map_err(|e| DevCaError::CaCert(format!("not a valid X.509 certificate: {e}")))?;
        if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(DevCaError::KeyMismatch);
        }
        let subject = parsed.subject().to_string();
        let issuer = Issuer::from_ca_cert_der(signer, key)
            .map_err(|e| DevCaError::CaCert(format!("not usable as an issuer: {e}")))?;
        Ok(Self {
            issuer,
            chain,
            cert_pem: cert_pem.to_owned(),
            subject,
        })
    }

    /// Generates a new self-signed development root CA (ECDSA P-256) for `trust_domain`,
    /// valid from `not_before` to `not_after`. Its subject CN is `common_name`: give each
    /// CA its own, or a leaf of a foreign CA is reported as a bad signature instead of an
    /// unknown issuer.
    pub fn generate(
        trust_domain: &str,
        common_name: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Self, DevCaError> {
        check_window(not_before, not_after)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(common_name);
        params.subject_alt_names =
            vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial()?);
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            issuer: Issuer::new(params, key),
            chain: vec![cert.der().clone()],
            cert_pem: cert.pem(),
            subject: format!("CN={common_name}, O={DEV_ORGANIZATION}"),
        })
    }

    /// The signing certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        // `from_pem` and `generate` both guarantee at least one certificate.
        &self.chain[0]
    }

    /// The CA certificate PEM: as generated, or exactly the text it was loaded from.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's private key, PKCS#8 PEM. Development keys only: this is how `certs-dev/`
    /// is written.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// The certificates sent after each leaf: the signing certificate and the chain above
    /// it, without the trust anchor. Empty when the CA is a self-signed root.
    pub fn intermediates(&self) -> &[CertificateDer<'static>] {
        &self.chain[..self.chain.len().saturating_sub(1)]
    }

    /// The trust anchor(s) a verifier needs: the last certificate of the chain.
    pub fn bundle(&self) -> &[CertificateDer<'static>] {
        &self.chain[self.chain.len().saturating_sub(1)..]
    }

    /// The CA's subject name, for logs.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// The embedded `nexus.local` development CA (`certs-dev/nexus.local/`), so that
    /// development tooling needs no files on disk.
    pub fn embedded() -> Result<Self, DevCaError> {
        Self::from_pem(super::EMBEDDED_CA_CERT_PEM, super::EMBEDDED_CA_KEY_PEM)
    }

    /// Mints an X.509-SVID for `spiffe_id` valid from one clock-skew allowance ago until
    /// `ttl` from now.
    pub fn mint_svid(&self, spiffe_id: &str, ttl: Duration) -> Result<MintedSvid, DevCaError> {
        self.mint_svid_with_dns_names(spiffe_id, &[], ttl)
    }

    /// Like [`mint_svid`](Self::mint_svid), with DNS SANs as well, for peers that verify
    /// a hostname (curl, browsers) rather than a SPIFFE ID.
    pub fn mint_svid_with_dns_names(
        &self,
        spiffe_id: &str,
        dns_names: &[String],
        ttl: Duration,
    ) -> Result<MintedSvid, DevCaError> {
        if ttl.is_zero() {
            return Err(DevCaError::Validity("ttl must be longer than zero".into()));
        }
        let now = OffsetDateTime::now_utc();
        let ttl = time::Duration::try_from(ttl)
            .map_err(|_| DevCaError::Validity(format!("ttl {ttl:?} is out of range")))?;
        let not_after = now
            .checked_add(ttl)
            .ok_or_else(|| DevCaError::Validity(format!("ttl {ttl} is out of range")))?;
        let skew = time::Duration::try_from(CLOCK_SKEW_ALLOWANCE)
            .map_err(|_| DevCaError::Validity("clock skew allowance out of range".into()))?;
        self.mint(spiffe_id, dns_names, now - skew, not_after)
    }

    /// Mints an X.509-SVID for `spiffe_id` with an explicit validity window (used for the
    /// expired and not-yet-valid fixtures).
    pub fn mint_svid_between(
        &self,
        spiffe_id: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<MintedSvid, DevCaError> {
        self.mint(spiffe_id, &[], not_before, not_after)
    }

    fn mint(
        &self,
        spiffe_id: &str,
        dns_names: &[String],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<MintedSvid, DevCaError> {
        check_window(not_before, not_after)?;
        let workload_name = validate_workload_id(spiffe_id)?;
        let serial = random_serial()?;
        let serial_hex = data_encoding::HEXLOWER.encode(&serial.to_bytes()[..4]);

        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(&format!("{workload_name} {serial_hex}"));
        params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into()?)];
        for name in dns_names {
            params
                .subject_alt_names
                .push(SanType::DnsName(name.as_str().try_into()?));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.serial_number = Some(serial);
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before;
        params.not_after = not_after;

        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(MintedSvid {
            cert_der: cert.der().to_vec(),
            key_pkcs8_der: key.serialize_der(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            not_after,
        })
    }
}

/// Checks that `id` is a SPIFFE ID naming a workload (not just a trust domain) and
/// returns its last path segment, which names the certificate's subject.
fn validate_workload_id(id: &str) -> Result<&str, DevCaError> {
    let invalid = |reason: String| DevCaError::InvalidSpiffeId {
        id: id.to_owned(),
        reason,
    };
    let parsed = spiffe::SpiffeId::new(id).map_err(|e| invalid(e.to_string()))?;
    if parsed.path().is_empty() {
        return Err(invalid(
            "it names a trust domain, an SVID needs a workload path".into(),
        ));
    }
    Ok(id.rsplit('/').next().unwrap_or(id))
}

fn check_window(not_before: OffsetDateTime, not_after: OffsetDateTime) -> Result<(), DevCaError> {
    if not_after <= not_before {
        return Err(DevCaError::Validity(format!(
            "not_after {not_after} is not after not_before {not_before}"
        )));
    }
    Ok(())
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, DEV_ORGANIZATION);
    name.push(DnType::CommonName, common_name);
    name
}

/// 16 random bytes, positive and with the top bits fixed so the encoded length is stable.
fn random_serial() -> Result<SerialNumber, DevCaError> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| DevCaError::Issue(rcgen::Error::RingUnspecified))?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::UnixTime;
    use x509_parser::extensions::GeneralName;

    const ID: &str = "spiffe://nexus.local/ns/plugins/sa/flood-model";

    fn test_ca(cn: &str) -> DevCa {
        let now = OffsetDateTime::now_utc();
        DevCa::generate(
            "nexus.local",
            cn,
            now - time::Duration::days(1),
            now + time::Duration::days(1),
        )
        .unwrap()
    }

    fn verify(ca: &DevCa, leaf: &[u8]) -> Result<(), webpki::Error> {
        let anchors = vec![
            webpki::anchor_from_trusted_cert(ca.cert_der())
                .unwrap()
                .to_owned(),
        ];
        let leaf = CertificateDer::from(leaf);
        let ee = webpki::EndEntityCert::try_from(&leaf).unwrap();
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &[],
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map(|_| ())
    }

    #[test]
    fn minted_leaf_has_exactly_the_spiffe_id_and_chains_to_the_ca() {
        let ca = test_ca("Test CA one");
        let svid = ca.mint_svid(ID, Duration::from_secs(600)).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&svid.cert_der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        let uris: Vec<_> = san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect();
        assert_eq!(uris, [ID]);
        assert!(!cert.is_ca());
        let bc = cert.basic_constraints().unwrap().unwrap();
        assert!(!bc.value.ca);
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && ku.key_encipherment() && !ku.key_cert_sign());
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        verify(&ca, &svid.cert_der).unwrap();
        // The key really is the leaf's key.
        let key = KeyPair::try_from(svid.key_pkcs8_der.as_slice()).unwrap();
        assert_eq!(
            cert.public_key().raw,
            key.subject_public_key_info().as_slice()
        );
    }

    #[test]
    fn ttl_is_respected() {
        let ca = test_ca("Test CA ttl");
        let before = OffsetDateTime::now_utc();
        let svid = ca.mint_svid(ID, Duration::from_secs(90)).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&svid.cert_der).unwrap();
        let nb = cert.validity().not_before.to_datetime();
        let na = cert.validity().not_after.to_datetime();
        // ASN.1 times have one-second resolution.
        let slack = time::Duration::seconds(2);
        assert!(
            (na - (before + time::Duration::seconds(90))).abs() <= slack,
            "{na}"
        );
        assert!(
            (nb - (before - time::Duration::seconds(60))).abs() <= slack,
            "{nb}"
        );
        assert!((svid.not_after - na).abs() <= slack);
    }

    #[test]
    fn each_mint_has_a_new_serial_and_key() {
        let ca = test_ca("Test CA serial");
        let a = ca.mint_svid(ID, Duration::from_secs(60)).unwrap();
        let b = ca.mint_svid(ID, Duration::from_secs(60)).unwrap();
        let serial = |der: &[u8]| {
            x509_parser::parse_x509_certificate(der)
                .unwrap()
                .1
                .raw_serial()
                .to_vec()
        };
        assert_ne!(serial(&a.cert_der), serial(&b.cert_der));
        assert_ne!(a.key_pkcs8_der, b.key_pkcs8_der);
    }

    #[test]
    fn a_foreign_ca_is_an_unknown_issuer_not_a_bad_signature() {
        let ours = test_ca("Test CA ours");
        let rogue = test_ca("Test CA rogue");
        let svid = rogue.mint_svid(ID, Duration::from_secs(60)).unwrap();
        assert!(matches!(
            verify(&ours, &svid.cert_der),
            Err(webpki::Error::UnknownIssuer)
        ));
    }

    #[test]
    fn round_trips_through_pem_and_rejects_a_foreign_key() {
        let ca = test_ca("Test CA pem");
        let with_header = format!("# a comment line\n{}", ca.cert_pem());
        let loaded = DevCa::from_pem(&with_header, &ca.key_pem()).unwrap();
        let svid = loaded.mint_svid(ID, Duration::from_secs(60)).unwrap();
        verify(&ca, &svid.cert_der).unwrap();
        assert!(loaded.intermediates().is_empty());
        assert_eq!(loaded.bundle(), [ca.cert_der().clone()]);

        let other = test_ca("Test CA other");
        assert!(matches!(
            DevCa::from_pem(ca.cert_pem(), &other.key_pem()),
            Err(DevCaError::KeyMismatch)
        ));
        assert!(matches!(
            DevCa::from_pem("", &ca.key_pem()),
            Err(DevCaError::CaCert(_))
        ));
        assert!(matches!(
            DevCa::from_pem(ca.cert_pem(), ""),
            Err(DevCaError::CaKey(_))
        ));
    }

    #[test]
    fn rejects_ids_that_are_not_workload_spiffe_ids() {
        let ca = test_ca("Test CA ids");
        for bad in [
            "spiffe://nexus.local",
            "https://nexus.local/x",
            "spiffe://nexus.local/a//b",
            "spiffe://nexus.local/bad path",
            "",
        ] {
            assert!(
                matches!(
                    ca.mint_svid(bad, Duration::from_secs(60)),
                    Err(DevCaError::InvalidSpiffeId { .. })
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            ca.mint_svid(ID, Duration::ZERO),
            Err(DevCaError::Validity(_))
        ));
    }
}
