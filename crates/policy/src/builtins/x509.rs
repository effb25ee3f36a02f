//! crypto.x509.parse_certificates and crypto.x509.parse_and_verify_certificates: the
//! certificates as OPA returns them, i.e. Go's `x509.Certificate` marshalled to JSON
//! (field names, integer enums, base64 byte slices, null for empty lists) plus OPA's
//! `URIStrings`. Parsing (certificates and their extensions) with `x509-parser` and its
//! `asn1-rs`; chain verification with rustls-webpki (the first certificate is the root,
//! the last the leaf, as OPA takes them; server-auth usage, as Go's default
//! `VerifyOptions`).

use std::collections::BTreeMap;

use anyhow::{Result, anyhow, bail};
use regorus::Value;
use x509_parser::asn1_rs::{Any, FromDer, Oid};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{DistributionPointName, GeneralName, ParsedExtension};
use x509_parser::num_bigint::BigUint;
use x509_parser::signature_algorithm::SignatureAlgorithm;
use x509_parser::x509::{AlgorithmIdentifier, X509Name};

use super::encoding::{base64_encode, base64_std, pem_decode};
use super::string_arg;

/// An OID as Go's `asn1.ObjectIdentifier` (its arcs).
fn oid_value(oid: &Oid<'_>) -> Value {
    let arcs = oid
        .iter()
        .map(|arcs| arcs.map(Value::from).collect::<Vec<_>>());
    Value::from(arcs.unwrap_or_default())
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
            let Ok(value) = atv.attr_value().as_str() else {
                continue;
            };
            names.push(super::object([
                ("Type", oid_value(atv.attr_type())),
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

/// The extensions Go's parser handles: critical ones besides these are listed in
/// `UnhandledCriticalExtensions`.
const HANDLED_EXTENSIONS: &[&str] = &[
    "2.5.29.14",
    "2.5.29.15",
    "2.5.29.17",
    "2.5.29.19",
    "2.5.29.30",
    "2.5.29.31",
    "2.5.29.32",
    "2.5.29.33",
    "2.5.29.35",
    "2.5.29.36",
    "2.5.29.37",
    "2.5.29.54",
    "1.3.6.1.5.5.7.1.1",
];

/// Go's `x509.SignatureAlgorithm` of the certificate's signature (RSASSA-PSS by the
/// hash its parameters name; SHA-1, their default, is not one Go lists).
fn signature_algorithm(alg: &AlgorithmIdentifier<'_>) -> u64 {
    match alg.algorithm.to_id_string().as_str() {
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
        "1.2.840.113549.1.1.10" => match SignatureAlgorithm::try_from(alg) {
            Ok(SignatureAlgorithm::RSASSA_PSS(params)) => {
                match params.hash_algorithm_oid().to_id_string().as_str() {
                    "2.16.840.1.101.3.4.2.1" => 13,
                    "2.16.840.1.101.3.4.2.2" => 14,
                    "2.16.840.1.101.3.4.2.3" => 15,
                    _ => 0,
                }
            }
            _ => 0,
        },
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
        extensions.push(super::object([
            ("Id", oid_value(&ext.oid)),
            ("Critical", Value::from(ext.critical)),
            ("Value", Value::from(base64_encode(ext.value))),
        ]));
        let id = ext.oid.to_id_string();
        if ext.critical && !HANDLED_EXTENSIONS.contains(&id.as_str()) {
            unhandled.push(oid_value(&ext.oid));
        }
        match ext.parsed_extension() {
            ParsedExtension::KeyUsage(usage) => key_usage = u64::from(usage.flags & 0x1ff),
            ParsedExtension::BasicConstraints(constraints) => {
                basic_valid = true;
                is_ca = constraints.ca;
                max_path_len = constraints.path_len_constraint.map_or(-1, i64::from);
            }
            ParsedExtension::SubjectAlternativeName(san) => {
                for name in &san.general_names {
                    match name {
                        GeneralName::RFC822Name(email) => emails.push(email.to_string()),
                        GeneralName::DNSName(dns_name) => dns.push(dns_name.to_string()),
                        GeneralName::URI(uri) => uris.push(uri.to_string()),
                        GeneralName::IPAddress(ip) => ips.push(ip_text(ip)),
                        _ => {}
                    }
                }
            }
            // x509-parser sorts the purposes into flags; Go keeps them in order, with
            // repeats, so they are read as the SEQUENCE OF OID they are.
            ParsedExtension::ExtendedKeyUsage(_) => {
                for oid in
                    <Vec<Oid<'_>>>::from_der(ext.value).map_or_else(|_| Vec::new(), |(_, v)| v)
                {
                    match EXT_KEY_USAGES.iter().position(|k| *k == oid.to_id_string()) {
                        Some(i) => eku.push(Value::from(i as u64)),
                        None => unknown_eku.push(oid_value(&oid)),
                    }
                }
            }
            ParsedExtension::SubjectKeyIdentifier(key_id) => ski = Some(key_id.0),
            ParsedExtension::AuthorityKeyIdentifier(authority) => {
                aki = authority.key_identifier.as_ref().map(|k| k.0);
            }
            ParsedExtension::CRLDistributionPoints(points) => {
                for point in points.iter() {
                    if let Some(DistributionPointName::FullName(names)) = &point.distribution_point
                    {
                        crl.extend(names.iter().filter_map(|n| match n {
                            GeneralName::URI(uri) => Some(uri.to_string()),
                            _ => None,
                        }));
                    }
                }
            }
            ParsedExtension::AuthorityInfoAccess(access) => {
                for desc in access.iter() {
                    let GeneralName::URI(location) = desc.access_location else {
                        continue;
                    };
                    match desc.access_method.to_id_string().as_str() {
                        "1.3.6.1.5.5.7.48.1" => ocsp.push(location.to_string()),
                        "1.3.6.1.5.5.7.48.2" => issuing.push(location.to_string()),
                        _ => {}
                    }
                }
            }
            ParsedExtension::CertificatePolicies(infos) => {
                for info in infos {
                    policy_ids.push(oid_value(&info.policy_id));
                    policies.push(info.policy_id.to_id_string());
                }
            }
            _ => {}
        }
    }
    let tbs = &cert.tbs_certificate;
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
        (
            "RawTBSCertificate",
            Value::from(base64_encode(tbs.as_ref())),
        ),
        (
            "RawSubjectPublicKeyInfo",
            Value::from(base64_encode(tbs.subject_pki.raw)),
        ),
        (
            "RawSubject",
            Value::from(base64_encode(tbs.subject.as_raw())),
        ),
        ("RawIssuer", Value::from(base64_encode(tbs.issuer.as_raw()))),
        (
            "Signature",
            Value::from(base64_encode(cert.signature_value.data.as_ref())),
        ),
        (
            "SignatureAlgorithm",
            Value::from(signature_algorithm(&cert.signature_algorithm)),
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
        ("SubjectKeyId", bytes_or_null(ski)),
        ("AuthorityKeyId", bytes_or_null(aki)),
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
        let (after, _) = Any::from_der(rest).map_err(|_| anyhow!("x509: malformed certificate"))?;
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
