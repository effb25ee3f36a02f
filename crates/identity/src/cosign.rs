//! Cosign-compatible image signatures, verified offline with a publisher's public key.
//!
//! The signed bytes are cosign's "simple signing" payload for a container image — what
//! `cosign generate IMAGE@DIGEST` prints and what `cosign sign --key` signs and stores
//! beside the image:
//!
//! ```json
//! {"critical":{"identity":{"docker-reference":"REPO"},"image":{"docker-manifest-digest":"sha256:…"},"type":"cosign container image signature"},"optional":null}
//! ```
//!
//! The signature is what `cosign sign-blob --key cosign.key payload.json` prints: the
//! base64 of an ASN.1 DER ECDSA P-256 signature over SHA-256 of the payload bytes. The
//! public key is the PEM `PUBLIC KEY` (SubjectPublicKeyInfo) that `cosign generate-key-pair`
//! writes to `cosign.pub` (and `openssl ec -pubout` for a key made with openssl).
//! Verification is ring's `ECDSA_P256_SHA256_ASN1`; a payload is accepted only when it is
//! a cosign image payload for exactly the expected digest (a signature over another
//! digest, replayed, is refused).
#![deny(clippy::unwrap_used)]

use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair,
    UnparsedPublicKey,
};

/// The `critical.type` of a cosign image signature payload.
pub const PAYLOAD_TYPE: &str = "cosign container image signature";

/// The SubjectPublicKeyInfo DER prefix of an uncompressed P-256 point (id-ecPublicKey,
/// prime256v1, BIT STRING of 66 bytes).
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// Why a key, digest, payload or signature is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CosignError {
    /// The public key is not a PEM `PUBLIC KEY` holding an ECDSA P-256 key.
    #[error(
        "not an ECDSA P-256 public key in PEM (`-----BEGIN PUBLIC KEY-----`, as cosign.pub): {0}"
    )]
    Key(String),
    /// The private key cannot be used for signing.
    #[error("not an ECDSA P-256 PKCS#8 private key in PEM (`-----BEGIN PRIVATE KEY-----`): {0}")]
    PrivateKey(String),
    /// The image digest is not `sha256:` and 64 lowercase hex digits.
    #[error("image digest `{0}` must be `sha256:` followed by 64 lowercase hex digits")]
    Digest(String),
    /// The signature is not base64 of a DER signature.
    #[error("the signature is not base64 (as `cosign sign-blob` prints it): {0}")]
    Encoding(String),
    /// The payload is not a cosign image signature payload.
    #[error("the signed payload is not a cosign image signature payload: {0}")]
    Payload(String),
    /// The payload names another image digest than the one being registered.
    #[error("the signature is over image {signed}, not {expected}: a signature for another digest")]
    OtherDigest {
        /// The digest the payload names.
        signed: String,
        /// The digest it was presented for.
        expected: String,
    },
    /// The signature does not verify with the key.
    #[error("the signature does not verify with publisher key {0}")]
    BadSignature(String),
}

/// A publisher's public key (ECDSA P-256).
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    point: Vec<u8>,
    fingerprint: String,
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublicKey")
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

/// `sha256:` and the hex SHA-256 of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!(
        "sha256:{}",
        data_encoding::HEXLOWER.encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
    )
}

impl PublicKey {
    /// Parses the first PEM `PUBLIC KEY` block of `pem`.
    pub fn from_pem(pem: &[u8]) -> Result<Self, CosignError> {
        for block in x509_parser::pem::Pem::iter_from_buffer(pem) {
            let block = block.map_err(|e| CosignError::Key(e.to_string()))?;
            if block.label == "PUBLIC KEY" {
                return Self::from_spki_der(&block.contents);
            }
        }
        Err(CosignError::Key("no `PUBLIC KEY` PEM block".into()))
    }

    /// From SubjectPublicKeyInfo DER.
    pub fn from_spki_der(der: &[u8]) -> Result<Self, CosignError> {
        use x509_parser::prelude::FromDer;
        let (rest, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(der)
            .map_err(|e| CosignError::Key(e.to_string()))?;
        if !rest.is_empty() {
            return Err(CosignError::Key("trailing bytes after the key".into()));
        }
        if spki.algorithm.algorithm.to_id_string() != "1.2.840.10045.2.1" {
            return Err(CosignError::Key(format!(
                "algorithm {} is not id-ecPublicKey",
                spki.algorithm.algorithm.to_id_string()
            )));
        }
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .map(|o| o.to_id_string())
            .unwrap_or_default();
        if curve != "1.2.840.10045.3.1.7" {
            return Err(CosignError::Key(format!(
                "curve `{curve}` is not P-256 (prime256v1)"
            )));
        }
        let point = spki.subject_public_key.data.to_vec();
        if point.len() != 65 || point[0] != 4 {
            return Err(CosignError::Key(
                "the point is not an uncompressed P-256 point".into(),
            ));
        }
        Ok(Self {
            fingerprint: sha256_digest(der),
            point,
        })
    }

    /// `sha256:` of the key's SubjectPublicKeyInfo DER (what logs and `show` name it by).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The key as PEM (`PUBLIC KEY`).
    pub fn to_pem(&self) -> String {
        let mut der = P256_SPKI_PREFIX.to_vec();
        der.extend_from_slice(&self.point);
        pem("PUBLIC KEY", &der)
    }
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = data_encoding::BASE64.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Checks an OCI image digest's spelling (`sha256:` + 64 lowercase hex).
pub fn validate_digest(digest: &str) -> Result<(), CosignError> {
    let ok = digest.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    });
    if ok {
        Ok(())
    } else {
        Err(CosignError::Digest(digest.to_string()))
    }
}

/// Splits `REPO@sha256:…` into the repository and the digest. A tag-only reference
/// (`REPO:TAG`, no `@`) gives `None` for the digest.
pub fn split_image(image: &str) -> (&str, Option<&str>) {
    match image.rsplit_once('@') {
        Some((repo, digest)) => (repo, Some(digest)),
        None => (image, None),
    }
}

/// The payload `cosign generate REPO@DIGEST` prints (byte for byte, as cosign marshals it).
pub fn image_payload(repository: &str, digest: &str) -> String {
    serde_json::json!({
        "critical": {
            "identity": {"docker-reference": repository},
            "image": {"docker-manifest-digest": digest},
            "type": PAYLOAD_TYPE,
        },
        "optional": null,
    })
    .to_string()
}

/// What a verified payload says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedImage {
    /// `critical.identity.docker-reference` (the repository the signer named).
    pub repository: String,
    /// `critical.image.docker-manifest-digest`.
    pub digest: String,
}

/// Reads a payload without verifying it (to compare with what is being registered).
pub fn parse_payload(payload: &[u8]) -> Result<SignedImage, CosignError> {
    let value: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| CosignError::Payload(e.to_string()))?;
    let critical = value
        .get("critical")
        .ok_or_else(|| CosignError::Payload("no `critical` object".into()))?;
    let kind = critical.get("type").and_then(|v| v.as_str()).unwrap_or("");
    if kind != PAYLOAD_TYPE {
        return Err(CosignError::Payload(format!(
            "critical.type is `{kind}`, not `{PAYLOAD_TYPE}`"
        )));
    }
    let digest = critical
        .pointer("/image/docker-manifest-digest")
        .and_then(|v| v.as_str())
        .ok_or_else(|| CosignError::Payload("no critical.image.docker-manifest-digest".into()))?;
    validate_digest(digest)?;
    let repository = critical
        .pointer("/identity/docker-reference")
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_string();
    Ok(SignedImage {
        repository,
        digest: digest.to_string(),
    })
}

/// Verifies `signature_b64` (cosign sign-blob output) over `payload` with `key`, and that
/// the payload is a cosign image payload for `expected_digest`.
pub fn verify(
    key: &PublicKey,
    payload: &[u8],
    signature_b64: &str,
    expected_digest: &str,
) -> Result<SignedImage, CosignError> {
    validate_digest(expected_digest)?;
    let signature = decode_signature(signature_b64)?;
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &key.point)
        .verify(payload, &signature)
        .map_err(|_| CosignError::BadSignature(key.fingerprint.clone()))?;
    let signed = parse_payload(payload)?;
    if signed.digest != expected_digest {
        return Err(CosignError::OtherDigest {
            signed: signed.digest,
            expected: expected_digest.to_string(),
        });
    }
    Ok(signed)
}

fn decode_signature(signature_b64: &str) -> Result<Vec<u8>, CosignError> {
    let compact: String = signature_b64
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    if compact.is_empty() {
        return Err(CosignError::Encoding("empty signature".into()));
    }
    data_encoding::BASE64
        .decode(compact.as_bytes())
        .map_err(|e| CosignError::Encoding(e.to_string()))
}

/// A signing key (ECDSA P-256, PKCS#8): what `nexusctl plugin sign` and the local stack's
/// development publisher use. Production publishers sign with cosign itself.
pub struct SigningKey {
    pair: EcdsaKeyPair,
    pkcs8: Vec<u8>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(...)")
    }
}

impl SigningKey {
    /// A new random key.
    pub fn generate() -> Result<Self, CosignError> {
        let rng = SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
            .map_err(|e| CosignError::PrivateKey(e.to_string()))?;
        Self::from_pkcs8_der(doc.as_ref())
    }

    /// From PKCS#8 DER.
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, CosignError> {
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, der, &SystemRandom::new())
                .map_err(|e| CosignError::PrivateKey(e.to_string()))?;
        Ok(Self {
            pair,
            pkcs8: der.to_vec(),
        })
    }

    /// From the first PEM `PRIVATE KEY` block (PKCS#8; `openssl genpkey -algorithm EC
    /// -pkeyopt ec_paramgen_curve:P-256` writes one).
    pub fn from_pem(pem_text: &[u8]) -> Result<Self, CosignError> {
        for block in x509_parser::pem::Pem::iter_from_buffer(pem_text) {
            let block = block.map_err(|e| CosignError::PrivateKey(e.to_string()))?;
            if block.label == "PRIVATE KEY" {
                return Self::from_pkcs8_der(&block.contents);
            }
        }
        Err(CosignError::PrivateKey(
            "no `PRIVATE KEY` (PKCS#8) PEM block".into(),
        ))
    }

    /// The key as PKCS#8 PEM.
    pub fn to_pem(&self) -> String {
        pem("PRIVATE KEY", &self.pkcs8)
    }

    /// Its public key.
    pub fn public_key(&self) -> PublicKey {
        let mut der = P256_SPKI_PREFIX.to_vec();
        der.extend_from_slice(self.pair.public_key().as_ref());
        PublicKey {
            fingerprint: sha256_digest(&der),
            point: self.pair.public_key().as_ref().to_vec(),
        }
    }

    /// Signs `payload` as `cosign sign-blob` does: base64 of the DER signature.
    pub fn sign(&self, payload: &[u8]) -> Result<String, CosignError> {
        let signature = self
            .pair
            .sign(&SystemRandom::new(), payload)
            .map_err(|e| CosignError::PrivateKey(e.to_string()))?;
        Ok(data_encoding::BASE64.encode(signature.as_ref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const OTHER: &str = "sha256:1123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn sign_and_verify_round_trip_and_refusals() {
        let key = SigningKey::generate().unwrap();
        let public = PublicKey::from_pem(key.public_key().to_pem().as_bytes()).unwrap();
        assert_eq!(public, key.public_key());
        let payload = image_payload("registry.example/flood", DIGEST);
        let sig = key.sign(payload.as_bytes()).unwrap();
        let signed = verify(&public, payload.as_bytes(), &sig, DIGEST).unwrap();
        assert_eq!(signed.repository, "registry.example/flood");
        // A signature replayed for another digest.
        assert!(matches!(
            verify(&public, payload.as_bytes(), &sig, OTHER),
            Err(CosignError::OtherDigest { .. })
        ));
        // Another key.
        let stranger = SigningKey::generate().unwrap().public_key();
        assert!(matches!(
            verify(&stranger, payload.as_bytes(), &sig, DIGEST),
            Err(CosignError::BadSignature(_))
        ));
        // A payload edited after signing.
        let edited = image_payload("registry.example/flood", OTHER);
        assert!(matches!(
            verify(&public, edited.as_bytes(), &sig, OTHER),
            Err(CosignError::BadSignature(_))
        ));
        // A private key round-trips through PEM.
        let again = SigningKey::from_pem(key.to_pem().as_bytes()).unwrap();
        assert_eq!(again.public_key(), public);
    }

    #[test]
    fn malformed_inputs_are_named() {
        for bad in [
            "sha256:ABC",
            "sha256:0123",
            "md5:0123456789abcdef0123456789abcdef",
            "",
            "sha256:0123456789ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            assert!(validate_digest(bad).is_err(), "{bad}");
        }
        assert!(PublicKey::from_pem(b"not a key").is_err());
        let key = SigningKey::generate().unwrap().public_key();
        assert!(matches!(
            verify(&key, b"{}", "!!!", DIGEST),
            Err(CosignError::Encoding(_))
        ));
        assert!(matches!(
            parse_payload(br#"{"critical":{"type":"other"}}"#),
            Err(CosignError::Payload(_))
        ));
        assert_eq!(
            split_image("r.example/x@sha256:abc"),
            ("r.example/x", Some("sha256:abc"))
        );
        assert_eq!(split_image("r.example/x:1.0"), ("r.example/x:1.0", None));
    }
}
