//! crypto.md5/sha1/sha256 and crypto.hmac.*: hex digests of a string's UTF-8 bytes, as
//! OPA's Go implementation returns them. ring for SHA and HMAC-SHA (its SHA-1 is marked
//! legacy, which is what these builtins are for), RustCrypto `md-5` for MD5.

use anyhow::Result;
use md5::Digest;
use regorus::Value;
use ring::{digest, hmac};

use super::{hex, string_arg};

fn digest_of(alg: &'static digest::Algorithm, args: &[Value]) -> Result<Value> {
    let s = string_arg(args, 0)?;
    Ok(Value::from(hex(digest::digest(alg, s.as_bytes()).as_ref())))
}

pub(super) fn md5(args: &[Value]) -> Result<Value> {
    let s = string_arg(args, 0)?;
    Ok(Value::from(hex(&md5::Md5::digest(s.as_bytes()))))
}

pub(super) fn sha1(args: &[Value]) -> Result<Value> {
    digest_of(&digest::SHA1_FOR_LEGACY_USE_ONLY, args)
}

pub(super) fn sha256(args: &[Value]) -> Result<Value> {
    digest_of(&digest::SHA256, args)
}

fn hmac_of(alg: hmac::Algorithm, args: &[Value]) -> Result<Value> {
    let message = string_arg(args, 0)?;
    let key = string_arg(args, 1)?;
    let key = hmac::Key::new(alg, key.as_bytes());
    Ok(Value::from(hex(
        hmac::sign(&key, message.as_bytes()).as_ref()
    )))
}

pub(super) fn hmac_sha1(args: &[Value]) -> Result<Value> {
    hmac_of(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, args)
}

pub(super) fn hmac_sha256(args: &[Value]) -> Result<Value> {
    hmac_of(hmac::HMAC_SHA256, args)
}

pub(super) fn hmac_sha512(args: &[Value]) -> Result<Value> {
    hmac_of(hmac::HMAC_SHA512, args)
}

/// HMAC-MD5 (RFC 2104) over `md-5`: ring has no MD5.
pub(super) fn hmac_md5(args: &[Value]) -> Result<Value> {
    const BLOCK: usize = 64;
    let message = string_arg(args, 0)?;
    let key = string_arg(args, 1)?;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..16].copy_from_slice(&md5::Md5::digest(key.as_bytes()));
    } else {
        k[..key.len()].copy_from_slice(key.as_bytes());
    }
    let pad = |byte: u8| k.map(|b| b ^ byte);
    let mut inner = md5::Md5::new();
    inner.update(pad(0x36));
    inner.update(message.as_bytes());
    let mut outer = md5::Md5::new();
    outer.update(pad(0x5c));
    outer.update(inner.finalize());
    Ok(Value::from(hex(&outer.finalize())))
}

/// Constant-time comparison of two MACs (Go's `hmac.Equal`).
pub(super) fn hmac_equal(args: &[Value]) -> Result<Value> {
    let a = string_arg(args, 0)?.as_bytes();
    let b = string_arg(args, 1)?.as_bytes();
    let equal = a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0;
    Ok(Value::from(equal))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> Value {
        Value::from(v)
    }

    #[test]
    fn digests_match_known_vectors() {
        assert_eq!(
            md5(&[s("abc")]).unwrap(),
            s("900150983cd24fb0d6963f7d28e17f72")
        );
        assert_eq!(
            sha1(&[s("abc")]).unwrap(),
            s("a9993e364706816aba3e25717850c26c9cd0d89d")
        );
        // RFC 2202 test case 2.
        assert_eq!(
            hmac_md5(&[s("what do ya want for nothing?"), s("Jefe")]).unwrap(),
            s("750c783e6ab0b503eaa86e310a5db738")
        );
        assert_eq!(hmac_equal(&[s("ab"), s("ab")]).unwrap(), Value::from(true));
        assert_eq!(
            hmac_equal(&[s("ab"), s("abc")]).unwrap(),
            Value::from(false)
        );
    }
}
