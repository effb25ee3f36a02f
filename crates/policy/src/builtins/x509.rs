//! crypto.x509.parse_certificates and crypto.x509.parse_and_verify_certificates: the
//! certificates as OPA returns them, i.e. Go's `x509.Certificate` marshalled to JSON
//! (field names, integer enums, base64 byte slices, null for empty lists) plus OPA's
//! `URIStrings`. Parsing with `x509-parser`; chain verification with rustls-webpki (the
//! first certificate is the root, the last the leaf, as OPA takes them; server-auth
//! usage, as Go's default `VerifyOptions`).

use std::collections::BTreeMap;

use anyhow::{Result, anyhow, bail};
use regorus::Value;
use x509_parser::certificate::X509Certificate;
use x509_parser::num_bigint::BigUint;
use x509_parser::x509::X509Name;

use super::encoding::{base64_encode, base64_std, pem_decode};
use super::string_arg;

/// A minimal DER reader: (tag, content, rest).
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The elements of a constructed value.
fn children(mut content: &[u8]) -> Vec<(u8, &[u8])> {
    let mut out = Vec::new();
    while let Some((tag, c, rest)) = tlv(content) {
        out.push((tag, c));
        content = rest;
    }
    out
}

/// An OBJECT IDENTIFIER's content as its arcs.
fn oid_arcs(content: &[u8]) -> Vec<u64> {
    let mut arcs = Vec::new();
    let mut v: u64 = 0;
    for (i, b) in content.iter().enumerate() {
        v = (v << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            if arcs.is_empty() {
                let first = if v < 40 {
                    0
                } else if v < 80 {
                    1
                } else {
                    2
                };
                arcs.push(first);
                arcs.push(v - 40 * first);
            } else {
                arcs.push(v);
            }
            v = 0;
        } else if i + 1 == content.len() {
            break;
        }
    }
    arcs
}

fn oid_value(arcs: &[u64]) -> Value {
    Value::from(arcs.iter().map(|a| Value::from(*a)).collect::<Vec<_>>())
}

fn oid_string(arcs: &[u64]) -> String {
    arcs.iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(".")
}

fn strings(items: Vec<String>) -> Value {
    if items.is_empty() {
        Value::Null
    } else {
        Value::from(items.into_iter().map(Value::from).collect::<Vec<_>>())
    }
}

fn bytes_or_null(b: Option<&[u8]>) -> Value {
    b.map_or(Value::Null, |b| Value::from(base64_encode(b)))
}

fn big(bytes: &[u8]) -> Value {
    let decimal = BigUint::from_bytes_be(bytes).to_string();
    Value::from_numeric_string(&decimal).unwrap_or(Value::Null)
}

/// Go's `pkix.Name` from an RDN sequence.
fn name(n: &X509Name<'_>) -> Value {
    let mut names = Vec::new();
    let mut typed: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut common_name = String::new();
    let mut serial = String::new();
    for rdn in n.iter() {
        for atv in rdn.iter() {
            let oid = atv.attr_type().to_id_string();
            let arcs: Vec<u64> = oid.split('.').filter_map(|a| a.parse().ok()).collect();
            let Ok(value) = atv.attr_value().as_str() else {
                continue;
            };
            names.push(super::object([
                ("Type", oid_value(&arcs)),
                ("Value", Value::from(value)),
            ]));
            let field = match oid.as_str() {
                "2.5.4.3" => {
                    common_name = value.to_string();
                    continue;
                }
                "2.5.4.5" => {
                    serial = value.to_string();
                    continue;
                }
                "2.5.4.6" => "Country",
                "2.5.4.7" => "Locality",
                "2.5.4.8" => "Province",
                "2.5.4.9" => "StreetAddress",
                "2.5.4.10" => "Organization",
                "2.5.4.11" => "OrganizationalUnit",
                "2.5.4.17" => "PostalCode",
                _ => continue,
            };
            typed.entry(field).or_default().push(value.to_string());
        }
    }
    let list = |f: &str| strings(typed.get(f).cloned().unwrap_or_default());
    super::object([
        ("Country", list("Country")),
        ("Organization", list("Organization")),
        ("OrganizationalUnit", list("OrganizationalUnit")),
        ("Locality", list("Locality")),
        ("Province", list("Province")),
        ("StreetAddress", list("StreetAddress")),
        ("PostalCode", list("PostalCode")),
        ("SerialNumber", Value::from(serial)),
        ("CommonName", Value::from(common_name)),
        (
            "Names",
            if names.is_empty() {
                Value::Null
            } else {
                Value::from(names)
            },
        ),
        ("ExtraNames", Value::Null),
    ])
}

/// Go's `url.URL` of a SAN URI, as `encoding/json` writes it.
fn url_value(uri: &str) -> Value {
    let (scheme, rest) = match uri.split_once(':') {
        Some((s, r))
            if !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) =>
        {
            (s.to_ascii_lowercase(), r)
        }
        _ => (String::new(), uri),
    };
    let (rest, fragment) = match rest.split_once('#') {
        Some((r, f)) => (r, f.to_string()),
        None => (rest, String::new()),
    };
    let (rest, raw_query, force_query) = match rest.split_once('?') {
        Some((r, q)) => (r, q.to_string(), q.is_empty()),
        None => (rest, String::new(), false),
    };
    let (mut opaque, mut host, mut path, mut user) =
        (String::new(), String::new(), String::new(), Value::Null);
    if let Some(after) = rest.strip_prefix("//") {
        let end = after.find('/').unwrap_or(after.len());
        let authority = &after[..end];
        path = after[end..].to_string();
        host = match authority.rsplit_once('@') {
            Some((_, h)) => {
                user = Value::new_object();
                h.to_string()
            }
            None => authority.to_string(),
        };
    } else if !scheme.is_empty() && !rest.starts_with('/') {
        opaque = rest.to_string();
    } else {
        path = rest.to_string();
    }
    super::object([
        ("Scheme", Value::from(scheme)),
        ("Opaque", Value::from(opaque)),
        ("User", user),
        ("Host", Value::from(host)),
        ("Path", Value::from(path)),
        ("RawPath", Value::from("")),
        ("OmitHost", Value::from(false)),
        ("ForceQuery", Value::from(force_query)),
        ("RawQuery", Value::from(raw_query)),
        ("Fragment", Value::from(fragment)),
        ("RawFragment", Value::from("")),
    ])
}

/// Go's `net.IP` text.
fn ip_text(b: &[u8]) -> String {
    match b.len() {
        4 => std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string(),
        16 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(b);
            let v6 = std::net::Ipv6Addr::from(a);
            v6.to_ipv4_mapped()
                .map_or_else(|| v6.to_string(), |v4| v4.to_string())
        }
        _ => format!("?{}", super::hex(b)),
    }
}

const EXT_KEY_USAGES: &[&str] = &[
    "2.5.29.37.0",
    "1.3.6.1.5.5.7.3.1",
    "1.3.6.1.5.5.7.3.2",
    "1.3.6.1.5.5.7.3.3",
    "1.3.6.1.5.5.7.3.4",
    "1.3.6.1.5.5.7.3.5",
    "1.3.6.1.5.5.7.3.6",
    "1.3.6.1.5.5.7.3.7",
    "1.3.6.1.5.5.7.3.8",
    "1.3.6.1.5.5.7.3.9",
    "1.3.6.1.4.1.311.10.3.3",
    "2.16.840.1.113730.4.1",
    "1.3.6.1.4.1.311.2.1.22",
    "1.3.6.1.4.1.311.61.1.1",
];

/// Go's `x509.SignatureAlgorithm` of the certificate's signature.
fn signature_algorithm(oid: &str, params: &[u8]) -> u64 {
    let pss_hash = || {
        let has = |arcs: &[u8]| params.windows(arcs.len()).any(|w| w == arcs);
        if has(&[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01]) {
            13
        } else if has(&[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02]) {
            14
        } else if has(&[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03]) {
            15
        } else {
            0
        }
    };
    match oid {
        "1.2.840.113549.1.1.2" => 1,
        "1.2.840.113549.1.1.4" => 2,
        "1.2.840.113549.1.1.5" => 3,
        "1.2.840.113549.1.1.11" => 4,
        "1.2.840.113549.1.1.12" => 5,
        "1.2.840.113549.1.1.13" => 6,
        "1.2.840.10040.4.3" => 7,
        "2.16.840.1.101.3.4.3.2" => 8,
        "1.2.840.10045.4.1" => 9,
        "1.2.840.10045.4.3.2" => 10,
        "1.2.840.10045.4.3.3" => 11,
        "1.2.840.10045.4.3.4" => 12,
        "1.2.840.113549.1.1.10" => pss_hash(),
        "1.3.101.112" => 16,
        _ => 0,
    }
}

/// Go's `PublicKeyAlgorithm` and `PublicKey` of a certificate.
fn public_key(cert: &X509Certificate<'_>) -> (u64, Value) {
    let spki = cert.public_key();
    match spki.algorithm.algorithm.to_id_string().as_str() {
        "1.2.840.113549.1.1.1" => match spki.parsed() {
            Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => (
                1,
                super::object([("N", big(rsa.modulus)), ("E", big(rsa.exponent))]),
            ),
            _ => (1, Value::Null),
        },
        "1.2.840.10040.4.1" => (2, Value::Null),
        "1.2.840.10045.2.1" => {
            let point = spki.subject_public_key.data.as_ref();
            if point.first() == Some(&4) && point.len() % 2 == 1 {
                let half = point.len() / 2;
                (
                    3,
                    super::object([
                        ("Curve", Value::new_object()),
                        ("X", big(&point[1..=half])),
                        ("Y", big(&point[half + 1..])),
                    ]),
                )
            } else {
                (3, Value::Null)
            }
        }
        "1.3.101.112" => (
            4,
            Value::from(base64_encode(spki.subject_public_key.data.as_ref())),
        ),
        _ => (0, Value::Null),
    }
}

fn time_text(t: &x509_parser::time::ASN1Time) -> Value {
    let dt = t.to_datetime();
    dt.format(&time::format_description::well_known::Rfc3339)
        .map_or(Value::Null, Value::from)
}

/// A certificate's raw TBS, issuer, subject and SPKI.
type RawParts<'a> = (&'a [u8], &'a [u8], &'a [u8], &'a [u8]);

/// The raw TBS, issuer, subject and SPKI of a certificate's DER (in Go's order).
fn raw_parts(der: &[u8]) -> Option<RawParts<'_>> {
    let (_, cert, _) = tlv(der)?;
    let tbs = *raw_children(cert).first()?;
    let (_, tbs_content, _) = tlv(tbs)?;
    let fields = raw_children(tbs_content);
    // [0] version is optional.
    let skip = usize::from(fields.first().is_some_and(|f| f[0] == 0xa0));
    let issuer = *fields.get(skip + 2)?;
    let subject = *fields.get(skip + 4)?;
    let spki = *fields.get(skip + 5)?;
    Some((tbs, issuer, subject, spki))
}

/// The elements of a constructed value, each with its tag and length.
fn raw_children(mut content: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while let Some((_, _, rest)) = tlv(content) {
        out.push(&content[..content.len() - rest.len()]);
        content = rest;
    }
    out
}

/// One certificate as Go's `x509.Certificate` in JSON, with OPA's `URIStrings`.
fn certificate(der: &[u8], cert: &X509Certificate<'_>) -> Value {
    let mut key_usage = 0u64;
    let (mut basic_valid, mut is_ca, mut max_path_len) = (false, false, 0i64);
    let (mut dns, mut emails, mut ips, mut uris) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut eku, mut unknown_eku) = (Vec::new(), Vec::new());
    let (mut ski, mut aki) = (None, None);
    let (mut crl, mut ocsp, mut issuing) = (Vec::new(), Vec::new(), Vec::new());
    let (mut policy_ids, mut policies) = (Vec::new(), Vec::new());
    let mut unhandled = Vec::new();
    let mut extensions = Vec::new();
    for ext in cert.extensions() {
        let id = ext.oid.to_id_string();
        let arcs: Vec<u64> = id.split('.').filter_map(|a| a.parse().ok()).collect();
        extensions.push(super::object([
            ("Id", oid_value(&arcs)),
            ("Critical", Value::from(ext.critical)),
            ("Value", Value::from(base64_encode(ext.value))),
        ]));
        let Some((tag, content, _)) = tlv(ext.value) else {
            continue;
        };
        match id.as_str() {
            "2.5.29.15" if tag == 0x03 && !content.is_empty() => {
                let bits = &content[1..];
                for i in 0..9 {
                    if bits.get(i / 8).is_some_and(|b| b >> (7 - i % 8) & 1 == 1) {
                        key_usage |= 1 << i;
                    }
                }
            }
            "2.5.29.19" => {
                basic_valid = true;
                max_path_len = -1;
                for (t, c) in children(content) {
                    match t {
                        0x01 => is_ca = c.first().is_some_and(|b| *b != 0),
                        0x02 => {
                            max_path_len = c.iter().fold(0i64, |acc, b| (acc << 8) | i64::from(*b))
                        }
                        _ => {}
                    }
                }
            }
            "2.5.29.17" => {
                for (t, c) in children(content) {
                    let text = || String::from_utf8_lossy(c).into_owned();
                    match t {
                        0x81 => emails.push(text()),
                        0x82 => dns.push(text()),
                        0x86 => uris.push(text()),
                        0x87 => ips.push(ip_text(c)),
                        _ => {}
                    }
                }
            }
            "2.5.29.37" => {
                for (_, c) in children(content) {
                    let arcs = oid_arcs(c);
                    match EXT_KEY_USAGES.iter().position(|k| *k == oid_string(&arcs)) {
                        Some(i) => eku.push(Value::from(i as u64)),
                        None => unknown_eku.push(oid_value(&arcs)),
                    }
                }
            }
            "2.5.29.14" if tag == 0x04 => ski = Some(content.to_vec()),
            "2.5.29.35" => {
                aki = children(content)
                    .into_iter()
                    .find(|(t, _)| *t == 0x80)
                    .map(|(_, c)| c.to_vec());
            }
            "2.5.29.31" => {
                for (_, dp) in children(content) {
                    for (t, name) in children(dp) {
                        if t != 0xa0 {
                            continue;
                        }
                        for (t, full) in children(name) {
                            if t == 0xa0 {
                                for (t, c) in children(full) {
                                    if t == 0x86 {
                                        crl.push(String::from_utf8_lossy(c).into_owned());
                                    }
                                }
                            }
                        }
                    }
                }
            }
            "1.3.6.1.5.5.7.1.1" => {
                for (_, ad) in children(content) {
                    let parts = children(ad);
                    if let [(0x06, method), (0x86, location)] = parts.as_slice() {
                        let loc = String::from_utf8_lossy(location).into_owned();
                        match oid_string(&oid_arcs(method)).as_str() {
                            "1.3.6.1.5.5.7.48.1" => ocsp.push(loc),
                            "1.3.6.1.5.5.7.48.2" => issuing.push(loc),
                            _ => {}
                        }
                    }
                }
            }
            "2.5.29.32" => {
                for (_, info) in children(content) {
                    if let Some((0x06, oid)) = children(info).first().copied() {
                        let arcs = oid_arcs(oid);
                        policy_ids.push(oid_value(&arcs));
                        policies.push(oid_string(&arcs));
                    }
                }
            }
            "2.5.29.30" | "2.5.29.36" | "2.5.29.54" | "2.5.29.33" => {}
            _ if ext.critical => unhandled.push(oid_value(&arcs)),
            _ => {}
        }
    }
    let (tbs, raw_issuer, raw_subject, raw_spki) = raw_parts(der).unwrap_or((&[], &[], &[], &[]));
    let sig_alg = &cert.signature_algorithm;
    let sig_params = sig_alg
        .parameters
        .as_ref()
        .map(|p| p.as_bytes())
        .unwrap_or_default();
    let (pk_alg, pk) = public_key(cert);
    let list = |v: Vec<Value>| {
        if v.is_empty() {
            Value::Null
        } else {
            Value::from(v)
        }
    };
    let uri_values: Vec<Value> = uris.iter().map(|u| url_value(u)).collect();
    super::object([
        ("Raw", Value::from(base64_encode(der))),
        ("RawTBSCertificate", Value::from(base64_encode(tbs))),
        (
            "RawSubjectPublicKeyInfo",
            Value::from(base64_encode(raw_spki)),
        ),
        ("RawSubject", Value::from(base64_encode(raw_subject))),
        ("RawIssuer", Value::from(base64_encode(raw_issuer))),
        (
            "Signature",
            Value::from(base64_encode(cert.signature_value.data.as_ref())),
        ),
        (
            "SignatureAlgorithm",
            Value::from(signature_algorithm(
                &sig_alg.algorithm.to_id_string(),
                sig_params,
            )),
        ),
        ("PublicKeyAlgorithm", Value::from(pk_alg)),
        ("PublicKey", pk),
        ("Version", Value::from(u64::from(cert.version().0) + 1)),
        (
            "SerialNumber",
            big(&cert.tbs_certificate.serial.to_bytes_be()),
        ),
        ("Issuer", name(cert.issuer())),
        ("Subject", name(cert.subject())),
        ("NotBefore", time_text(&cert.validity().not_before)),
        ("NotAfter", time_text(&cert.validity().not_after)),
        ("KeyUsage", Value::from(key_usage)),
        ("Extensions", list(extensions)),
        ("ExtraExtensions", Value::Null),
        ("UnhandledCriticalExtensions", list(unhandled)),
        ("ExtKeyUsage", list(eku)),
        ("UnknownExtKeyUsage", list(unknown_eku)),
        ("BasicConstraintsValid", Value::from(basic_valid)),
        ("IsCA", Value::from(is_ca)),
        ("MaxPathLen", Value::from(max_path_len)),
        (
            "MaxPathLenZero",
            Value::from(basic_valid && max_path_len == 0),
        ),
        ("SubjectKeyId", bytes_or_null(ski.as_deref())),
        ("AuthorityKeyId", bytes_or_null(aki.as_deref())),
        ("OCSPServer", strings(ocsp)),
        ("IssuingCertificateURL", strings(issuing)),
        ("DNSNames", strings(dns)),
        ("EmailAddresses", strings(emails)),
        ("IPAddresses", strings(ips)),
        ("URIs", list(uri_values)),
        ("PermittedDNSDomainsCritical", Value::from(false)),
        ("PermittedDNSDomains", Value::Null),
        ("ExcludedDNSDomains", Value::Null),
        ("PermittedIPRanges", Value::Null),
        ("ExcludedIPRanges", Value::Null),
        ("PermittedEmailAddresses", Value::Null),
        ("ExcludedEmailAddresses", Value::Null),
        ("PermittedURIDomains", Value::Null),
        ("ExcludedURIDomains", Value::Null),
        ("CRLDistributionPoints", strings(crl)),
        ("PolicyIdentifiers", list(policy_ids)),
        ("Policies", strings(policies)),
        ("InhibitAnyPolicy", Value::from(0u64)),
        ("InhibitAnyPolicyZero", Value::from(false)),
        ("InhibitPolicyMapping", Value::from(0u64)),
        ("InhibitPolicyMappingZero", Value::from(false)),
        ("RequireExplicitPolicy", Value::from(0u64)),
        ("RequireExplicitPolicyZero", Value::from(false)),
        ("PolicyMappings", Value::Null),
        ("URIStrings", strings(uris)),
    ])
}

/// The DER of every certificate in `text`: PEM (CERTIFICATE blocks only), base64 of
/// PEM, or base64 of concatenated DER, as OPA's `getX509CertsFromString`.
fn ders_from(text: &str) -> Result<Vec<Vec<u8>>> {
    let from_pem = |pem: &str| -> Result<Vec<u8>> {
        let mut rest = pem;
        let mut all = Vec::new();
        while !rest.is_empty() {
            let Some((block, r)) = pem_decode(rest) else {
                break;
            };
            if block.kind != "CERTIFICATE" {
                bail!("PEM block type is '{}', expected CERTIFICATE", block.kind);
            }
            all.extend(block.der);
            rest = r;
        }
        Ok(all)
    };
    let bytes = if text.starts_with("-----BEGIN") {
        from_pem(text)?
    } else {
        let raw = base64_std(text)?;
        if raw.starts_with(b"-----BEGIN") {
            from_pem(&String::from_utf8_lossy(&raw))?
        } else {
            raw
        }
    };
    // Concatenated DER certificates.
    let mut out = Vec::new();
    let mut rest = bytes.as_slice();
    while !rest.is_empty() {
        let (_, _, after) = tlv(rest).ok_or_else(|| anyhow!("x509: malformed certificate"))?;
        let len = rest.len() - after.len();
        out.push(rest[..len].to_vec());
        rest = after;
    }
    Ok(out)
}

fn parse_all(ders: &[Vec<u8>]) -> Result<Vec<Value>> {
    ders.iter()
        .map(|der| {
            let (_, cert) = x509_parser::parse_x509_certificate(der)
                .map_err(|e| anyhow!("x509: malformed certificate: {e}"))?;
            Ok(certificate(der, &cert))
        })
        .collect()
}

/// crypto.x509.parse_certificates(certs): every certificate, parsed.
pub(super) fn parse_certificates(args: &[Value]) -> Result<Value> {
    let ders = ders_from(string_arg(args, 0)?)?;
    Ok(Value::from(parse_all(&ders)?))
}

/// crypto.x509.parse_and_verify_certificates(certs): [true, chain] when the last
/// certificate verifies (for server auth, now) through the middle ones up to the first;
/// [false, []] otherwise. The chain is leaf first, as Go's `Verify` returns it.
pub(super) fn parse_and_verify_certificates(args: &[Value]) -> Result<Value> {
    let input = string_arg(args, 0)?;
    let invalid = || Value::from(vec![Value::from(false), Value::new_array()]);
    let Ok(ders) = ders_from(input) else {
        return Ok(invalid());
    };
    if parse_all(&ders).is_err() || ders.len() < 2 {
        return Ok(invalid());
    }
    match verify_chain(&ders) {
        Some(chain) => Ok(Value::from(vec![
            Value::from(true),
            Value::from(parse_all(&chain)?),
        ])),
        None => Ok(invalid()),
    }
}

fn verify_chain(ders: &[Vec<u8>]) -> Option<Vec<Vec<u8>>> {
    use rustls_pki_types::{CertificateDer, UnixTime};
    let root = CertificateDer::from(ders.first()?.as_slice());
    let anchor = webpki::anchor_from_trusted_cert(&root).ok()?.to_owned();
    let leaf_der = CertificateDer::from(ders.last()?.as_slice());
    let leaf = webpki::EndEntityCert::try_from(&leaf_der).ok()?;
    let intermediates: Vec<CertificateDer<'_>> = ders[1..ders.len() - 1]
        .iter()
        .map(|d| CertificateDer::from(d.as_slice()))
        .collect();
    let anchors = [anchor];
    let path = leaf
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &intermediates,
            UnixTime::now(),
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .ok()?;
    let mut chain = vec![ders.last()?.clone()];
    chain.extend(path.intermediate_certificates().map(|c| c.der().to_vec()));
    chain.push(ders.first()?.clone());
    Some(chain)
}
