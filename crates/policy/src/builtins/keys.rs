//! Verification keys for the JWT builtins, as OPA reads them: a PEM certificate or
//! public key, or a JWK / JWK set (JSON), and signature verification per JWS algorithm
//! with ring (P-521, which ring lacks, with RustCrypto `p521`).

use anyhow::{Result, anyhow, bail};
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey as X509Key;
use x509_parser::x509::SubjectPublicKeyInfo;

use super::encoding::{base64_url, pem_decode};

/// Elliptic curves OPA's JWT builtins accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Curve {
    P256,
    P384,
    P521,
}

/// A public key.
#[derive(Clone, Debug)]
pub(super) enum PublicKey {
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    Ec {
        curve: Curve,
        point: Vec<u8>,
    },
    Ed25519(Vec<u8>),
    /// A JWK of a type no verification accepts (e.g. `oct`).
    Other,
}

/// A key with the `alg` and `kid` a JWK set gives it.
#[derive(Clone, Debug)]
pub(super) struct VerificationKey {
    pub key: PublicKey,
    pub alg: String,
    pub kid: String,
}

const ALGORITHMS: &[&str] = &[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "HS256",
    "HS384", "HS512", "EdDSA",
];

/// Keys from a PEM certificate or public key, or from a JWK or JWK set.
pub(super) fn keys_from(text: &str) -> Result<Vec<VerificationKey>> {
    if let Some((block, rest)) = pem_decode(text) {
        if !rest.is_empty() {
            bail!("extra data after a PEM certificate block");
        }
        let key = match block.kind.as_str() {
            "CERTIFICATE" => {
                let (_, cert) = x509_parser::parse_x509_certificate(&block.der)
                    .map_err(|e| anyhow!("failed to parse a PEM certificate: {e}"))?;
                from_spki(cert.public_key())?
            }
            "PUBLIC KEY" => {
                let (_, spki) = SubjectPublicKeyInfo::from_der(&block.der)
                    .map_err(|e| anyhow!("failed to parse a PEM public key: {e}"))?;
                from_spki(&spki)?
            }
            _ => bail!("failed to extract a Key from the PEM certificate"),
        };
        return Ok(vec![VerificationKey {
            key,
            alg: String::new(),
            kid: String::new(),
        }]);
    }
    let json: serde_json::Value =
        serde_json::from_str(text).map_err(|e| anyhow!("failed to parse a JWK key (set): {e}"))?;
    let list = match json.get("keys") {
        Some(serde_json::Value::Array(keys)) => keys.clone(),
        Some(_) => bail!("failed to parse a JWK key (set): keys must be an array"),
        None => vec![json],
    };
    let mut out = Vec::new();
    for jwk in &list {
        let alg = jwk
            .get("alg")
            .and_then(|a| a.as_str())
            .unwrap_or_default()
            .to_string();
        if !alg.is_empty() && !ALGORITHMS.contains(&alg.as_str()) {
            continue;
        }
        out.push(VerificationKey {
            key: from_jwk(jwk)?,
            alg,
            kid: jwk
                .get("kid")
                .and_then(|k| k.as_str())
                .unwrap_or_default()
                .to_string(),
        });
    }
    Ok(out)
}

fn b64_member(jwk: &serde_json::Value, name: &str) -> Result<Vec<u8>> {
    let s = jwk
        .get(name)
        .and_then(|v| v.as_str())
        .ok_or_else(|| anyhow!("failed to parse a JWK key (set): missing {name}"))?;
    base64_url(s)
}

fn from_jwk(jwk: &serde_json::Value) -> Result<PublicKey> {
    let kty = jwk.get("kty").and_then(|k| k.as_str()).unwrap_or_default();
    Ok(match kty {
        "RSA" => PublicKey::Rsa {
            n: unsigned(&b64_member(jwk, "n")?),
            e: unsigned(&b64_member(jwk, "e")?),
        },
        "EC" => {
            let curve = match jwk.get("crv").and_then(|c| c.as_str()) {
                Some("P-256") => Curve::P256,
                Some("P-384") => Curve::P384,
                Some("P-521") => Curve::P521,
                other => bail!("failed to parse a JWK key (set): unsupported curve {other:?}"),
            };
            let size = match curve {
                Curve::P256 => 32,
                Curve::P384 => 48,
                Curve::P521 => 66,
            };
            let mut point = vec![4u8];
            for member in ["x", "y"] {
                let c = b64_member(jwk, member)?;
                if c.len() > size {
                    bail!("failed to parse a JWK key (set): invalid {member}");
                }
                point.extend(std::iter::repeat_n(0, size - c.len()));
                point.extend(c);
            }
            PublicKey::Ec { curve, point }
        }
        "OKP" => match jwk.get("crv").and_then(|c| c.as_str()) {
            Some("Ed25519") => PublicKey::Ed25519(b64_member(jwk, "x")?),
            other => bail!("failed to parse a JWK key (set): unsupported curve {other:?}"),
        },
        "oct" => PublicKey::Other,
        other => bail!("failed to parse a JWK key (set): invalid key type {other:?}"),
    })
}

/// A DER INTEGER's magnitude without its sign-padding zeros (ring wants none).
fn unsigned(bytes: &[u8]) -> Vec<u8> {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    bytes[start..].to_vec()
}

/// The key of a SubjectPublicKeyInfo.
pub(super) fn from_spki(spki: &SubjectPublicKeyInfo<'_>) -> Result<PublicKey> {
    let oid = spki.algorithm.algorithm.to_id_string();
    match oid.as_str() {
        "1.2.840.113549.1.1.1" => match spki.parsed() {
            Ok(X509Key::RSA(rsa)) => Ok(PublicKey::Rsa {
                n: unsigned(rsa.modulus),
                e: unsigned(rsa.exponent),
            }),
            _ => bail!("invalid RSA public key"),
        },
        "1.2.840.10045.2.1" => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string());
            let curve = match curve.as_deref() {
                Some("1.2.840.10045.3.1.7") => Curve::P256,
                Some("1.3.132.0.34") => Curve::P384,
                Some("1.3.132.0.35") => Curve::P521,
                other => bail!("unsupported elliptic curve {other:?}"),
            };
            Ok(PublicKey::Ec {
                curve,
                point: spki.subject_public_key.data.to_vec(),
            })
        }
        "1.3.101.112" => Ok(PublicKey::Ed25519(spki.subject_public_key.data.to_vec())),
        other => bail!("unsupported public key algorithm {other}"),
    }
}

/// Verifies a JWS signature over `message` with `key` for the JWS algorithm `alg`;
/// false for a wrong signature, a key of another type or an unknown algorithm.
pub(super) fn verify(key: &PublicKey, alg: &str, message: &[u8], sig: &[u8]) -> bool {
    let rsa = |params: &'static signature::RsaParameters| match key {
        PublicKey::Rsa { n, e } => RsaPublicKeyComponents { n, e }
            .verify(params, message, sig)
            .is_ok(),
        _ => false,
    };
    let ec = |want: Curve, alg: &'static signature::EcdsaVerificationAlgorithm| match key {
        PublicKey::Ec { curve, point } if *curve == want => UnparsedPublicKey::new(alg, point)
            .verify(message, sig)
            .is_ok(),
        _ => false,
    };
    match alg {
        "RS256" => rsa(&signature::RSA_PKCS1_2048_8192_SHA256),
        "RS384" => rsa(&signature::RSA_PKCS1_2048_8192_SHA384),
        "RS512" => rsa(&signature::RSA_PKCS1_2048_8192_SHA512),
        "PS256" => rsa(&signature::RSA_PSS_2048_8192_SHA256),
        "PS384" => rsa(&signature::RSA_PSS_2048_8192_SHA384),
        "PS512" => rsa(&signature::RSA_PSS_2048_8192_SHA512),
        "ES256" => ec(Curve::P256, &signature::ECDSA_P256_SHA256_FIXED),
        "ES384" => ec(Curve::P384, &signature::ECDSA_P384_SHA384_FIXED),
        "ES512" => match key {
            PublicKey::Ec {
                curve: Curve::P521,
                point,
            } => verify_p521(point, message, sig),
            _ => false,
        },
        "EdDSA" => match key {
            PublicKey::Ed25519(k) => UnparsedPublicKey::new(&signature::ED25519, k)
                .verify(message, sig)
                .is_ok(),
            _ => false,
        },
        _ => false,
    }
}

/// ES512: ECDSA over P-521 with SHA-512, the signature as r || s.
fn verify_p521(point: &[u8], message: &[u8], sig: &[u8]) -> bool {
    use p521::ecdsa::signature::Verifier as _;
    let Ok(key) = p521::ecdsa::VerifyingKey::from_sec1_bytes(point) else {
        return false;
    };
    let Ok(sig) = p521::ecdsa::Signature::from_slice(sig) else {
        return false;
    };
    key.verify(message, &sig).is_ok()
}
