//! io.jwt.decode, io.jwt.decode_verify and io.jwt.verify_*: JWS compact tokens, as
//! OPA's `topdown/tokens.go` decodes and checks them (the same header, constraint and
//! claim rules, the same key selection by `kid` and `alg`).

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Result, anyhow, bail};
use regorus::Value;
use ring::hmac;

use super::encoding::base64_url;
use super::keys::{VerificationKey, keys_from, verify};
use super::{hex, string_arg};

/// A token split into its three base64url parts.
struct Token<'a> {
    header: &'a str,
    payload: &'a str,
    signature: &'a str,
}

fn split(token: &str) -> Result<Token<'_>> {
    if !token.contains('.') {
        bail!("encoded JWT had no period separators");
    }
    let parts: Vec<&str> = token.split('.').collect();
    match parts.as_slice() {
        [header, payload, signature] => Ok(Token {
            header,
            payload,
            signature,
        }),
        _ => bail!("encoded JWT must have 3 sections, found {}", parts.len()),
    }
}

/// A JSON object from text (Go's json.Unmarshal: the last duplicate key wins).
fn json_object(bytes: &[u8]) -> Result<Value> {
    let text = std::str::from_utf8(bytes).map_err(|e| anyhow!("invalid JSON: {e}"))?;
    let value = Value::from_json_str(text).map_err(|e| anyhow!("invalid JSON: {e}"))?;
    if value.as_object().is_err() {
        bail!("decoded JSON type was not an Object");
    }
    Ok(value)
}

fn decode_header(token: &Token<'_>) -> Result<Value> {
    let bytes =
        base64_url(token.header).map_err(|e| anyhow!("JWT header had invalid encoding: {e}"))?;
    let header = json_object(&bytes).map_err(|e| anyhow!("bad JWT header: {e}"))?;
    if header["enc"] != Value::Undefined {
        bail!("JWT is a JWE object, which is not supported");
    }
    Ok(header)
}

fn decode_payload(token: &Token<'_>) -> Result<Vec<u8>> {
    base64_url(token.payload).map_err(|e| anyhow!("JWT payload had invalid encoding: {e}"))
}

fn decode_signature(token: &Token<'_>) -> Result<Vec<u8>> {
    base64_url(token.signature)
}

fn str_field<'a>(obj: &'a Value, name: &str) -> Option<&'a str> {
    match &obj[name] {
        Value::String(s) => Some(s.as_ref()),
        _ => None,
    }
}

/// io.jwt.decode(token): [header, payload, signature as hex].
pub(super) fn decode(args: &[Value]) -> Result<Value> {
    decode_str(string_arg(args, 0)?)
}

fn decode_str(text: &str) -> Result<Value> {
    let token = split(text)?;
    let header = decode_header(&token)?;
    let payload = decode_payload(&token)?;
    if str_field(&header, "cty") == Some("JWT") {
        // A nested token; jwt.io quotes it, so quotes are trimmed first.
        let inner = String::from_utf8_lossy(&payload);
        return decode_str(inner.trim_matches(['"', '\'']));
    }
    let payload = json_object(&payload)?;
    let signature = base64_url(token.signature)
        .map_err(|e| anyhow!("JWT signature had invalid encoding: {e}"))?;
    Ok(Value::from(vec![
        header,
        payload,
        Value::from(hex(&signature)),
    ]))
}

/// The verify_* family with an asymmetric key: `alg` fixes the algorithm whatever the
/// token's header says; a JWK set is searched by `kid` first, then every key whose
/// `alg` is unset or matches the header's.
fn verify_with_keys(args: &[Value], alg: &str) -> Result<Value> {
    let text = string_arg(args, 0)?;
    let token = split(text)?;
    let keys = keys_from(string_arg(args, 1)?)?;
    let signature = decode_signature(&token)?;
    let header = decode_header(&token)?;
    check_header_types(&header)?;
    let message = format!("{}.{}", token.header, token.payload);
    let header_alg = str_field(&header, "alg").unwrap_or_default();
    let kid = str_field(&header, "kid").unwrap_or_default();
    let check = |key: &VerificationKey| verify(&key.key, alg, message.as_bytes(), &signature);
    if !kid.is_empty()
        && let Some(key) = keys.iter().find(|k| k.kid == kid)
    {
        return Ok(Value::from(check(key)));
    }
    let valid = keys
        .iter()
        .filter(|k| k.alg.is_empty() || k.alg == header_alg)
        .any(check);
    Ok(Value::from(valid))
}

fn verify_hmac(args: &[Value], alg: hmac::Algorithm) -> Result<Value> {
    let text = string_arg(args, 0)?;
    let secret = string_arg(args, 1)?;
    let token = split(text)?;
    let key = hmac::Key::new(alg, secret.as_bytes());
    let message = format!("{}.{}", token.header, token.payload);
    let signature = decode_signature(&token)?;
    Ok(Value::from(
        hmac::verify(&key, message.as_bytes(), &signature).is_ok(),
    ))
}

pub(super) fn verify_hs256(args: &[Value]) -> Result<Value> {
    verify_hmac(args, hmac::HMAC_SHA256)
}
pub(super) fn verify_hs384(args: &[Value]) -> Result<Value> {
    verify_hmac(args, hmac::HMAC_SHA384)
}
pub(super) fn verify_hs512(args: &[Value]) -> Result<Value> {
    verify_hmac(args, hmac::HMAC_SHA512)
}
pub(super) fn verify_rs256(args: &[Value]) -> Result<Value> {
    verify_with_keys(args, "RS256")
}
pub(super) fn verify_rs384(args: &[Value]) -> Result<Value> {
    verify_with_keys(args, "RS384")
}
pub(super) fn verify_rs512(args: &[Value]) -> Result<Value> {
    verify_with_keys(args, "RS512")
}
pub(super) fn verify_ps256(args: &[Value]) -> Result<Value> {
    verify_with_keys(args, "PS256")
}
pub(super) fn verify_ps384(args: &[Value]) -> Result<Value> {
    verify_with_keys(args, "PS384")
}
pub(super) fn verify_ps512(args: &[Value]) -> Result<Value> {
    verify_with_keys(args, "PS512")
}
pub(super) fn verify_es256(args: &[Value]) -> Result<Value> {
    verify_with_keys(args, "ES256")
}
pub(super) fn verify_es384(args: &[Value]) -> Result<Value> {
    verify_with_keys(args, "ES384")
}
pub(super) fn verify_es512(args: &[Value]) -> Result<Value> {
    verify_with_keys(args, "ES512")
}
pub(super) fn verify_eddsa(args: &[Value]) -> Result<Value> {
    verify_with_keys(args, "EdDSA")
}

/// The header parameters OPA types: alg, kid, typ, cty are strings; crit a non-empty
/// list of strings.
fn check_header_types(header: &Value) -> Result<()> {
    for name in ["alg", "kid", "typ", "cty"] {
        match &header[name] {
            Value::Undefined | Value::String(_) => {}
            _ => bail!("{name}: must be a string"),
        }
    }
    match &header["crit"] {
        Value::Undefined => Ok(()),
        Value::Array(items) if items.is_empty() => bail!("crit: must be a nonempty list"),
        Value::Array(_) => Ok(()),
        _ => bail!("crit: must be a list"),
    }
}

/// RFC 7515 4.1.1 and 4.1.11: alg is present, and every critical parameter is known.
fn header_valid(header: &Value) -> bool {
    if str_field(header, "alg").unwrap_or_default().is_empty() {
        return false;
    }
    let known = ["alg", "kid", "typ", "cty", "crit"];
    let Value::Array(crit) = &header["crit"] else {
        return true;
    };
    let Ok(fields) = header.as_object() else {
        return false;
    };
    !fields.keys().any(|k| {
        k.as_string().is_ok_and(|k| {
            !known.contains(&k.as_ref()) && crit.iter().any(|c| c == &Value::from(k.as_ref()))
        })
    })
}

/// io.jwt.decode_verify's constraints.
struct Constraints {
    keys: Option<Vec<VerificationKey>>,
    secret: String,
    alg: String,
    iss: String,
    aud: String,
    /// Nanoseconds since the epoch.
    time: f64,
}

fn constraints(value: &Value) -> Result<Constraints> {
    let Ok(obj) = value.as_object() else {
        bail!("operand 2 must be object");
    };
    let mut c = Constraints {
        keys: None,
        secret: String::new(),
        alg: String::new(),
        iss: String::new(),
        aud: String::new(),
        time: -1.0,
    };
    for (k, v) in obj.iter() {
        let name = k.as_string().map(|s| s.to_string()).unwrap_or_default();
        let string = |what: &str| match v {
            Value::String(s) => Ok(s.to_string()),
            _ => Err(anyhow!("{what} constraint: must be a string")),
        };
        match name.as_str() {
            "cert" => c.keys = Some(keys_from(&string("cert")?)?),
            "secret" => c.secret = string("secret")?,
            "alg" => c.alg = string("alg")?,
            "iss" => c.iss = string("iss")?,
            "aud" => c.aud = string("aud")?,
            "time" => c.time = time_constraint(v)?,
            other => bail!("unknown token validation constraint: {other}"),
        }
    }
    if c.time == -1.0 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|e| anyhow!("clock before 1970: {e}"))?;
        c.time = now.as_nanos() as f64;
    }
    let sources = usize::from(c.keys.is_some()) + usize::from(!c.secret.is_empty());
    if sources > 1 {
        bail!("duplicate key constraints");
    }
    if sources < 1 {
        bail!("no key constraint");
    }
    Ok(c)
}

/// A number as the nearest f64 (Go's `Number.Float64`); regorus's `as_f64` refuses
/// integers an f64 cannot hold exactly.
fn as_f64(v: &Value) -> Option<f64> {
    v.as_f64()
        .ok()
        .or_else(|| v.as_number().ok()?.format_decimal().parse().ok())
}

fn time_constraint(v: &Value) -> Result<f64> {
    let Value::Number(_) = v else {
        bail!("token time constraint: must be a number");
    };
    let t = as_f64(v).ok_or_else(|| anyhow!("token time constraint: unvalid float64"))?;
    if t < 0.0 {
        bail!("token time constraint: must not be negative");
    }
    Ok(t)
}

impl Constraints {
    fn verify(&self, kid: &str, alg: &str, message: &[u8], sig: &[u8]) -> bool {
        if let Some(keys) = &self.keys {
            if !kid.is_empty()
                && let Some(key) = keys.iter().find(|k| k.kid == kid)
            {
                return verify(&key.key, alg, message, sig);
            }
            return keys
                .iter()
                .filter(|k| k.alg.is_empty() || k.alg == alg)
                .any(|k| verify(&k.key, alg, message, sig));
        }
        let secret = self.secret.as_bytes();
        let hmac_alg = match alg {
            "HS256" => hmac::HMAC_SHA256,
            "HS384" => hmac::HMAC_SHA384,
            "HS512" => hmac::HMAC_SHA512,
            _ => return false,
        };
        hmac::verify(&hmac::Key::new(hmac_alg, secret), message, sig).is_ok()
    }

    fn valid_audience(&self, aud: &Value) -> bool {
        match aud {
            Value::String(s) => s.as_ref() == self.aud,
            Value::Array(items) => items
                .iter()
                .any(|i| matches!(i, Value::String(s) if s.as_ref() == self.aud)),
            _ => false,
        }
    }
}

/// io.jwt.decode_verify(token, constraints): [valid, header, payload]; [false, {}, {}]
/// when the signature or a claim does not hold; an error when the token or the
/// constraints are malformed.
pub(super) fn decode_verify(args: &[Value]) -> Result<Value> {
    let unverified = || {
        Value::from(vec![
            Value::from(false),
            Value::new_object(),
            Value::new_object(),
        ])
    };
    let mut text = string_arg(args, 0)?.to_string();
    let c = constraints(args.get(1).unwrap_or(&Value::Undefined))?;
    let (header, payload_bytes) = loop {
        let token = split(&text)?;
        let header = decode_header(&token)?;
        check_header_types(&header)?;
        if !header_valid(&header) {
            return Ok(unverified());
        }
        let alg = str_field(&header, "alg").unwrap_or_default();
        if !c.alg.is_empty() && c.alg != alg {
            return Ok(unverified());
        }
        let signature = decode_signature(&token)?;
        let message = format!("{}.{}", token.header, token.payload);
        let kid = str_field(&header, "kid").unwrap_or_default();
        if !c.verify(kid, alg, message.as_bytes(), &signature) {
            return Ok(unverified());
        }
        let payload = decode_payload(&token)?;
        if str_field(&header, "cty").is_some_and(|cty| cty.eq_ignore_ascii_case("JWT")) {
            text = String::from_utf8_lossy(&payload).into_owned();
            continue;
        }
        break (header, payload);
    };
    let payload = json_object(&payload_bytes)?;
    if !c.iss.is_empty() && str_field(&payload, "iss") != Some(c.iss.as_str()) {
        return Ok(unverified());
    }
    match &payload["aud"] {
        Value::Undefined if !c.aud.is_empty() => return Ok(unverified()),
        Value::Undefined => {}
        aud if !c.valid_audience(aud) => return Ok(unverified()),
        _ => {}
    }
    let now = c.time / 1_000_000_000.0;
    match &payload["exp"] {
        Value::Undefined => {}
        exp @ Value::Number(_) => {
            if as_f64(exp).is_some_and(|exp| now >= exp) {
                return Ok(unverified());
            }
        }
        _ => bail!("exp value must be a number"),
    }
    match &payload["nbf"] {
        Value::Undefined => {}
        nbf @ Value::Number(_) => {
            if as_f64(nbf).is_some_and(|nbf| now < nbf) {
                return Ok(unverified());
            }
        }
        _ => bail!("nbf value must be a number"),
    }
    Ok(Value::from(vec![Value::from(true), header, payload]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_verify_takes_a_nanosecond_time() {
        // {"alg":"HS256","typ":"JWT"}.{"sub":"a"} signed with "s".
        let token = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhIn0.ZdBpW3Cv1kSR5JYcBfmqsZsxHqF6dUlgJQ1vo1hg1fU";
        let c = Value::from_json_str(r#"{"secret": "s", "time": 1795700467000000000}"#).unwrap();
        let r = decode_verify(&[Value::from(token), c]).unwrap();
        assert_eq!(
            r[0],
            Value::from(false),
            "the test token's signature is not genuine"
        );
        let bad = Value::from_json_str(r#"{"secret": "s", "time": -1}"#).unwrap();
        assert!(decode_verify(&[Value::from(token), bad]).is_err());
    }
}
