//! Request-target normalization, run before policy evaluation. The policy sees exactly
//! the path that is forwarded upstream, so a target the policy would deny cannot be
//! smuggled past it by spelling it differently (`..`, `%2e%2e`, `%2F`, `//`, `;`,
//! overlong UTF-8, backslashes, control characters). Anything whose meaning differs
//! between servers is refused rather than guessed at; everything else is rewritten into
//! one canonical spelling. The user-facing rules, with examples, are in
//! `policies/PATHS.md`; keep the two in step.

use std::collections::BTreeMap;
use std::fmt;

use http::header::HOST;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, Uri, Version};

/// Bounds on what one request target may cost to normalize and evaluate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NormalizeLimits {
    /// Longest path accepted, in bytes, both as received and once normalized.
    pub max_path_bytes: usize,
    /// Most query parameters accepted (`a=1&a=2` counts two).
    pub max_query_params: usize,
}

impl Default for NormalizeLimits {
    fn default() -> Self {
        Self {
            max_path_bytes: 8192,
            max_query_params: 256,
        }
    }
}

/// A request target in its one canonical spelling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Normalized {
    /// The normalized path: what the policy sees and what is forwarded. Starts with `/`.
    pub path: String,
    /// `path` split on `/`, empty segments dropped, each percent-decoded (`/` -> `[]`).
    pub segments: Vec<String>,
    /// The form-decoded query parameters, each key's values in request order.
    pub query: BTreeMap<String, Vec<String>>,
    /// The query as received (without `?`), forwarded unchanged.
    pub raw_query: Option<String>,
    /// `path` and `raw_query` as one forwardable target, built (and so proven valid) by
    /// [`normalize`]; the public fields are for reading.
    forward: PathAndQuery,
}

impl Normalized {
    /// `path` + `?` + `raw_query`: the target to put on the forwarded request's URI.
    #[must_use]
    pub fn path_and_query(&self) -> PathAndQuery {
        self.forward.clone()
    }
}

/// Which part of the request target an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The path, before `?`.
    Path,
    /// The query, after `?`.
    Query,
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Part::Path => "path",
            Part::Query => "query",
        })
    }
}

/// Why a request target was refused. Every variant is the client's fault: the proxy
/// answers 400 and never forwards the request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NormalizeError {
    /// `*` (server-wide OPTIONS), authority-form (CONNECT), or a scheme other than http(s):
    /// there is no path for a policy to check.
    #[error(
        "unsupported request target ({form}): only origin-form (/path?query) and http(s) absolute-form targets are proxied"
    )]
    UnsupportedTarget {
        /// Which form was received.
        form: &'static str,
    },
    /// An HTTP/1.1 request without a Host header (RFC 9112 section 3.2 requires one).
    #[error("HTTP/1.1 request without a Host header")]
    MissingHost,
    /// More than one Host header, or a Host or target authority that is not `host[:port]`.
    #[error("invalid Host: {detail}")]
    InvalidHost {
        /// What is wrong with it.
        detail: &'static str,
    },
    /// The authority in the target (absolute-form, or HTTP/2 `:authority`) names another
    /// host or port than the Host header.
    #[error(
        "the request target names {target:?} but the Host header says {host:?}; they must agree"
    )]
    HostMismatch {
        /// The authority from the request target.
        target: String,
        /// The Host header's value.
        host: String,
    },
    /// The path does not start with `/` (e.g. a target of only `?query`).
    #[error("the request path must start with '/'")]
    PathNotAbsolute,
    /// The path is longer than the configured limit.
    #[error("the request path is {len} bytes, more than the limit of {max}")]
    PathTooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The query has more parameters than the configured limit.
    #[error("the query has more than {max} parameters")]
    TooManyQueryParams {
        /// The limit.
        max: usize,
    },
    /// A NUL, raw or as `%00`: C-string handling upstream would truncate there.
    #[error("NUL character (raw or %00) in the {part}")]
    Nul {
        /// Where it was.
        part: Part,
    },
    /// A control character, raw or percent-encoded (`%0D%0A` header injection, `%09`...).
    #[error("control character U+{code:04X} (raw or percent-encoded) in the {part}")]
    ControlCharacter {
        /// Where it was.
        part: Part,
        /// Its code point.
        code: u32,
    },
    /// A backslash, raw or `%5C`: some servers treat it as a path separator.
    #[error("backslash (raw or %5C) in the path: some servers read it as '/'")]
    Backslash,
    /// `%2F`: some servers decode it into a separator, others keep it inside a segment.
    #[error("encoded slash %2F in the path: servers disagree on whether it separates segments")]
    EncodedSlash,
    /// `;` in the path (raw or `%3B`) or raw in the query: servers disagree on whether it
    /// starts matrix parameters / separates query parameters.
    #[error(
        "';' in the {part}: servers disagree on what it separates; percent-encode it in the query"
    )]
    Semicolon {
        /// Where it was.
        part: Part,
    },
    /// `#`: a fragment never belongs in a request target.
    #[error("fragment '#' in the request target")]
    Fragment,
    /// `%` not followed by two hex digits.
    #[error("malformed percent-encoding in the {part}: '%' must be followed by two hex digits")]
    MalformedPercentEncoding {
        /// Where it was.
        part: Part,
    },
    /// The percent-decoded bytes are not UTF-8, e.g. the overlong `%C0%AE` for `.`.
    #[error("the percent-decoded {part} is not valid UTF-8 (overlong or truncated sequence)")]
    InvalidUtf8 {
        /// Where it was.
        part: Part,
    },
    /// `%25` followed by two hex digits (`%252e`): a server that decodes twice would see a
    /// different path than the policy did.
    #[error("double percent-encoding (%25 followed by two hex digits) in the path")]
    DoubleEncoding,
}

impl NormalizeError {
    /// A short, stable label for metrics.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            NormalizeError::UnsupportedTarget { .. } => "unsupported_target",
            NormalizeError::MissingHost => "missing_host",
            NormalizeError::InvalidHost { .. } => "invalid_host",
            NormalizeError::HostMismatch { .. } => "host_mismatch",
            NormalizeError::PathNotAbsolute => "path_not_absolute",
            NormalizeError::PathTooLong { .. } => "path_too_long",
            NormalizeError::TooManyQueryParams { .. } => "too_many_query_params",
            NormalizeError::Nul { .. } => "nul",
            NormalizeError::ControlCharacter { .. } => "control_character",
            NormalizeError::Backslash => "backslash",
            NormalizeError::EncodedSlash => "encoded_slash",
            NormalizeError::Semicolon { .. } => "semicolon",
            NormalizeError::Fragment => "fragment",
            NormalizeError::MalformedPercentEncoding { .. } => "malformed_percent_encoding",
            NormalizeError::InvalidUtf8 { .. } => "invalid_utf8",
            NormalizeError::DoubleEncoding => "double_encoding",
        }
    }
}

/// The longest target the `http` crate accepts; a normalized path can outgrow the
/// received one (raw `{` becomes `%7B`), so the forwarded target is held to it too.
const HTTP_MAX_TARGET: usize = u16::MAX as usize - 1;

/// Normalizes a request's target. Pure: the caller evaluates policy on the result and
/// forwards [`Normalized::path_and_query`], or answers 400 with the error.
///
/// # Errors
///
/// A [`NormalizeError`] for every target whose meaning servers disagree on, or that
/// breaks the limits; see `policies/PATHS.md` for the list.
pub fn normalize(
    req_uri: &Uri,
    headers: &HeaderMap,
    version: Version,
    limits: &NormalizeLimits,
) -> Result<Normalized, NormalizeError> {
    let (raw_path, raw_query) = target_parts(req_uri, headers, version)?;
    let path = normalize_path(raw_path, limits.max_path_bytes)?;
    let segments = path
        .split('/')
        .filter(|segment| !segment.is_empty())
        .map(decode_segment)
        .collect::<Result<Vec<_>, _>>()?;
    let query = match raw_query {
        Some(raw) => parse_query(raw, limits.max_query_params)?,
        None => BTreeMap::new(),
    };

    let mut target = String::with_capacity(path.len() + raw_query.map_or(0, |q| q.len() + 1));
    target.push_str(&path);
    if let Some(raw) = raw_query {
        target.push('?');
        target.push_str(raw);
    }
    let len = target.len();
    // Cannot fail but by length: the path is pchars and %XX, the query came from a Uri.
    let forward = PathAndQuery::try_from(target).map_err(|_| NormalizeError::PathTooLong {
        len,
        max: limits.max_path_bytes.min(HTTP_MAX_TARGET),
    })?;

    Ok(Normalized {
        path,
        segments,
        query,
        raw_query: raw_query.map(str::to_owned),
        forward,
    })
}

/// Checks the target's form and its authority against Host; returns path and query.
fn target_parts<'u>(
    uri: &'u Uri,
    headers: &HeaderMap,
    version: Version,
) -> Result<(&'u str, Option<&'u str>), NormalizeError> {
    let host = host_header(headers)?;
    if uri.path() == "*" {
        return Err(NormalizeError::UnsupportedTarget {
            form: "asterisk-form '*'",
        });
    }
    match (uri.scheme(), uri.authority()) {
        (None, Some(_)) => Err(NormalizeError::UnsupportedTarget {
            form: "authority-form (CONNECT)",
        }),
        (None, None) => {
            if host.is_none() && version == Version::HTTP_11 {
                return Err(NormalizeError::MissingHost);
            }
            // `path()` reads "/" for a target of only "?query"; look at what was sent.
            let sent = uri.path_and_query().map_or("", PathAndQuery::as_str);
            if !sent.starts_with('/') {
                return Err(NormalizeError::PathNotAbsolute);
            }
            Ok((uri.path(), uri.query()))
        }
        (Some(scheme), authority) => {
            let default_port = default_port(scheme)?;
            let Some(authority) = authority else {
                return Err(NormalizeError::UnsupportedTarget {
                    form: "scheme without authority",
                });
            };
            if authority.as_str().contains('@') {
                return Err(NormalizeError::InvalidHost {
                    detail: "the request target's authority carries userinfo",
                });
            }
            match host {
                Some(host) => same_authority(authority, host, default_port)?,
                None if version == Version::HTTP_11 => return Err(NormalizeError::MissingHost),
                // HTTP/2 (only :authority) and HTTP/1.0: the target names the host alone.
                None => {}
            }
            let path = uri.path();
            if !path.starts_with('/') {
                return Err(NormalizeError::PathNotAbsolute);
            }
            Ok((path, uri.query()))
        }
    }
}

/// The one Host header's value, if any. Two Host headers are refused outright
/// (RFC 9112 section 3.2): which one a server reads is a differential of its own.
fn host_header(headers: &HeaderMap) -> Result<Option<&str>, NormalizeError> {
    let mut values = headers.get_all(HOST).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(NormalizeError::InvalidHost {
            detail: "more than one Host header",
        });
    }
    value
        .to_str()
        .map(Some)
        .map_err(|_| NormalizeError::InvalidHost {
            detail: "the Host header is not visible ASCII",
        })
}

fn default_port(scheme: &Scheme) -> Result<u16, NormalizeError> {
    if *scheme == Scheme::HTTP {
        Ok(80)
    } else if *scheme == Scheme::HTTPS {
        Ok(443)
    } else {
        Err(NormalizeError::UnsupportedTarget {
            form: "absolute-form with a scheme other than http or https",
        })
    }
}

/// Host names compare case-insensitively, ports after defaulting (`a` = `a:80` for http).
fn same_authority(target: &Authority, host: &str, default_port: u16) -> Result<(), NormalizeError> {
    let mismatch = || NormalizeError::HostMismatch {
        target: target.as_str().to_owned(),
        host: host.to_owned(),
    };
    if host.is_empty() {
        return Err(mismatch());
    }
    if host.contains('@') {
        return Err(NormalizeError::InvalidHost {
            detail: "the Host header carries userinfo",
        });
    }
    let parsed: Authority = host.parse().map_err(|_| NormalizeError::InvalidHost {
        detail: "the Host header is not host[:port]",
    })?;
    let same_host = target.host().eq_ignore_ascii_case(parsed.host());
    let same_port =
        target.port_u16().unwrap_or(default_port) == parsed.port_u16().unwrap_or(default_port);
    if same_host && same_port {
        Ok(())
    } else {
        Err(mismatch())
    }
}

/// Refuses what servers disagree on, decodes unreserved characters, upper-cases the hex
/// of every other escape, percent-encodes raw characters that are not pchars, then
/// merges slashes and removes dot segments.
fn normalize_path(raw: &str, max: usize) -> Result<String, NormalizeError> {
    const PART: Part = Part::Path;
    if raw.len() > max {
        return Err(NormalizeError::PathTooLong {
            len: raw.len(),
            max,
        });
    }
    let bytes = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    // The path as the upstream will decode it, checked for UTF-8 and control characters:
    // the raw bytes themselves until the first escape (then a copy, decoded from there).
    let mut decoded: Option<Vec<u8>> = None;
    let mut i = 0;
    while let Some(&byte) = bytes.get(i) {
        if byte == b'%' {
            let value = percent_byte(bytes, i)
                .ok_or(NormalizeError::MalformedPercentEncoding { part: PART })?;
            match value {
                b'/' => return Err(NormalizeError::EncodedSlash),
                b'\\' => return Err(NormalizeError::Backslash),
                b';' => return Err(NormalizeError::Semicolon { part: PART }),
                _ => {}
            }
            decoded
                .get_or_insert_with(|| {
                    let mut copy = Vec::with_capacity(raw.len());
                    copy.extend_from_slice(&bytes[..i]);
                    copy
                })
                .push(value);
            i += 3;
            if is_unreserved(value) {
                out.push(char::from(value));
            } else {
                push_escape(&mut out, value);
            }
        } else {
            i += 1;
            match byte {
                b'\\' => return Err(NormalizeError::Backslash),
                b';' => return Err(NormalizeError::Semicolon { part: PART }),
                b'#' => return Err(NormalizeError::Fragment),
                _ => {}
            }
            if let Some(decoded) = &mut decoded {
                decoded.push(byte);
            }
            if is_unreserved(byte) || is_path_delimiter(byte) {
                out.push(char::from(byte));
            } else {
                // `"`, `{`, `|`, non-ASCII...: accepted by the parser, but the canonical
                // spelling is the escape, so `/caf%C3%A9` and `/café` are one path.
                push_escape(&mut out, byte);
            }
        }
    }
    check_decoded(decoded.as_deref().unwrap_or(bytes), PART)?;
    if has_double_encoding(&out) {
        return Err(NormalizeError::DoubleEncoding);
    }
    let path = remove_dot_segments(out);
    if path.len() > max {
        return Err(NormalizeError::PathTooLong {
            len: path.len(),
            max,
        });
    }
    Ok(path)
}

/// The decoded bytes must be UTF-8 (this is what refuses overlong forms such as
/// `%C0%AE`) and free of control characters, C1 included.
fn check_decoded(decoded: &[u8], part: Part) -> Result<(), NormalizeError> {
    let text = std::str::from_utf8(decoded).map_err(|_| NormalizeError::InvalidUtf8 { part })?;
    match text.chars().find(|c| c.is_control()) {
        Some('\0') => Err(NormalizeError::Nul { part }),
        Some(c) => Err(NormalizeError::ControlCharacter {
            part,
            code: u32::from(c),
        }),
        None => Ok(()),
    }
}

/// RFC 3986 section 5.2.4 on a path whose empty segments are dropped as well: `//`
/// merges, `.` goes, `..` drops the segment before it and stops at the root. A path
/// that ended in a segment (`/a`) or in a separator/dot segment (`/a/`, `/a/.`,
/// `/a/b/..`) keeps that shape.
pub(crate) fn remove_dot_segments(path: String) -> String {
    // Already in that form (most paths): kept as it is, not built again.
    if is_merged(&path) {
        path
    } else {
        merge_dot_segments(&path)
    }
}

/// Whether `path` is what `merge_dot_segments` makes of it: it starts with `/`, and
/// has no `.` or `..` segment and no empty segment but the last.
fn is_merged(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    let mut segments = rest.split('/').peekable();
    while let Some(segment) = segments.next() {
        if matches!(segment, "." | "..") || (segment.is_empty() && segments.peek().is_some()) {
            return false;
        }
    }
    true
}

/// `remove_dot_segments`, building the path anew.
pub(crate) fn merge_dot_segments(path: &str) -> String {
    let mut kept: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in path.split('/').skip(1) {
        match segment {
            "" | "." => trailing_slash = true,
            ".." => {
                kept.pop();
                trailing_slash = true;
            }
            segment => {
                kept.push(segment);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for segment in &kept {
        out.push('/');
        out.push_str(segment);
    }
    if out.is_empty() || trailing_slash {
        out.push('/');
    }
    out
}

/// `%25` followed by two hex digits in the normalized path (so `%25%32%65` counts too).
fn has_double_encoding(path: &str) -> bool {
    let bytes = path.as_bytes();
    path.match_indices("%25").any(|(i, _)| {
        matches!(
            (bytes.get(i + 3), bytes.get(i + 4)),
            (Some(a), Some(b)) if a.is_ascii_hexdigit() && b.is_ascii_hexdigit()
        )
    })
}

/// Decodes one segment of a normalized path. The path was validated, so this fails
/// only if a caller hands it something else.
fn decode_segment(segment: &str) -> Result<String, NormalizeError> {
    let bytes = segment.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&byte) = bytes.get(i) {
        if byte == b'%' {
            let value = percent_byte(bytes, i)
                .ok_or(NormalizeError::MalformedPercentEncoding { part: Part::Path })?;
            decoded.push(value);
            i += 3;
        } else {
            decoded.push(byte);
            i += 1;
        }
    }
    String::from_utf8(decoded).map_err(|_| NormalizeError::InvalidUtf8 { part: Part::Path })
}

/// Validates the raw query, then parses it as `application/x-www-form-urlencoded` (the
/// parser `axum` and `serde_urlencoded` use, so the data API reads the same parameters).
fn parse_query(
    raw: &str,
    max_params: usize,
) -> Result<BTreeMap<String, Vec<String>>, NormalizeError> {
    const PART: Part = Part::Query;
    let bytes = raw.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&byte) = bytes.get(i) {
        if byte == b'%' {
            let value = percent_byte(bytes, i)
                .ok_or(NormalizeError::MalformedPercentEncoding { part: PART })?;
            decoded.push(value);
            i += 3;
        } else {
            match byte {
                b';' => return Err(NormalizeError::Semicolon { part: PART }),
                b'#' => return Err(NormalizeError::Fragment),
                _ => {}
            }
            decoded.push(byte);
            i += 1;
        }
    }
    // Proven UTF-8 here, so form_urlencoded's lossy decoding below never substitutes.
    check_decoded(&decoded, PART)?;

    let mut query: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (count, (key, value)) in form_urlencoded::parse(bytes).enumerate() {
        if count >= max_params {
            return Err(NormalizeError::TooManyQueryParams { max: max_params });
        }
        query
            .entry(key.into_owned())
            .or_default()
            .push(value.into_owned());
    }
    Ok(query)
}

/// The byte encoded at `bytes[i..i + 3]` (`%XX`, either case), if it is well formed.
fn percent_byte(bytes: &[u8], i: usize) -> Option<u8> {
    let mut byte = [0u8; 1];
    data_encoding::HEXLOWER_PERMISSIVE
        .decode_mut(bytes.get(i + 1..i + 3)?, &mut byte)
        .ok()?;
    Some(byte[0])
}

/// Appends `%XX` with upper-case hex, the canonical spelling (RFC 3986 section 6.2.2.1).
fn push_escape(out: &mut String, byte: u8) {
    let mut hex = [0u8; 2];
    data_encoding::HEXUPPER.encode_mut(&[byte], &mut hex);
    out.push('%');
    out.extend(hex.map(char::from));
}

/// RFC 3986 unreserved: ALPHA / DIGIT / "-" / "." / "_" / "~".
fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

/// The pchars besides unreserved ones, and `/`: sub-delims (`;` is refused before this),
/// `:` and `@`. They stay raw; their escapes stay escapes (RFC 3986 section 6.2.2.2).
fn is_path_delimiter(byte: u8) -> bool {
    matches!(
        byte,
        b'/' | b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b'=' | b':' | b'@'
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    /// Expected outcome of one target: `Ok(normalized path)` or `Err(reason)`.
    type Expect = Result<&'static str, &'static str>;

    /// Origin-form targets, sent as HTTP/1.1 with `Host: api.local`.
    const CORPUS: &[(&str, Expect)] = &[
        // Plain paths.
        ("/", Ok("/")),
        (
            "/clauses/c-flood-17/rainfall",
            Ok("/clauses/c-flood-17/rainfall"),
        ),
        ("/a/b/", Ok("/a/b/")),
        ("/a?x=1", Ok("/a")),
        // Dot segments, literal and encoded, clamped at the root.
        ("/clauses/c-flood-17/../c-other/x", Ok("/clauses/c-other/x")),
        ("/clauses/%2e%2e/secret", Ok("/secret")),
        ("/./a", Ok("/a")),
        ("/../../etc/passwd", Ok("/etc/passwd")),
        ("/a/b/..", Ok("/a/")),
        ("/a/.", Ok("/a/")),
        ("/a/%2E/b", Ok("/a/b")),
        ("/..", Ok("/")),
        ("/%2e", Ok("/")),
        ("/a/%2e%2E/%2E", Ok("/")),
        ("/a/b/../../../c", Ok("/c")),
        ("/a/.../b", Ok("/a/.../b")),
        ("/a/.%2e./b", Ok("/a/.../b")),
        ("/a/..b/c", Ok("/a/..b/c")),
        // Repeated slashes.
        ("/clauses//c1", Ok("/clauses/c1")),
        ("///a////b//", Ok("/a/b/")),
        ("//..//a", Ok("/a")),
        // Case is preserved.
        ("/CLAUSES/c1", Ok("/CLAUSES/c1")),
        // Unreserved escapes decoded, the others kept with upper-case hex.
        ("/clauses/c%2Dflood-17/rain", Ok("/clauses/c-flood-17/rain")),
        ("/clauses/%63%31/x", Ok("/clauses/c1/x")),
        ("/%7Euser", Ok("/~user")),
        ("/a%5fb", Ok("/a_b")),
        ("/a%20b", Ok("/a%20b")),
        ("/a%3ab", Ok("/a%3Ab")),
        ("/a%40b", Ok("/a%40b")),
        ("/100%25", Ok("/100%25")),
        ("/a%25zz", Ok("/a%25zz")),
        ("/caf%c3%a9", Ok("/caf%C3%A9")),
        ("/caf%C3%A9", Ok("/caf%C3%A9")),
        // Raw characters the parser lets through but that are not pchars get escaped.
        ("/café", Ok("/caf%C3%A9")),
        ("/a\"b", Ok("/a%22b")),
        ("/a{b}", Ok("/a%7Bb%7D")),
        ("/a|b^c", Ok("/a%7Cb%5Ec")),
        ("/a[0]", Ok("/a%5B0%5D")),
        // Sub-delims, ':' and '@' stay raw.
        ("/a@b:c!$&'()*+,=", Ok("/a@b:c!$&'()*+,=")),
        // The http crate cuts the fragment off before the sidecar sees the target, so
        // neither the policy nor the upstream ever sees it (`fragment_is_refused_if_present`).
        ("/a#frag", Ok("/a")),
        // Encoded slash.
        ("/clauses/%2E%2E%2fsecret", Err("encoded_slash")),
        ("/a%2Fb", Err("encoded_slash")),
        // Matrix parameters.
        ("/clauses/c1;jsessionid=x/data", Err("semicolon")),
        ("/clauses/c1%3Bx", Err("semicolon")),
        ("/clauses/c1%3bx", Err("semicolon")),
        // Overlong and otherwise invalid UTF-8.
        ("/clauses/c1/%c0%ae%c0%ae/x", Err("invalid_utf8")),
        ("/clauses/c1/%e0%80%ae", Err("invalid_utf8")),
        ("/a%ff", Err("invalid_utf8")),
        ("/a%e2%82", Err("invalid_utf8")),
        ("/a%e2/%82%ac", Err("invalid_utf8")),
        // NUL and control characters.
        ("/a%00b", Err("nul")),
        ("/a%0d%0aSet-Cookie:x", Err("control_character")),
        ("/a%09b", Err("control_character")),
        ("/a%7fb", Err("control_character")),
        ("/a%c2%85b", Err("control_character")),
        // Backslash.
        ("/a\\b", Err("backslash")),
        ("/a%5cb", Err("backslash")),
        ("/a%5C..%5Cb", Err("backslash")),
        // Malformed escapes.
        ("/a/%", Err("malformed_percent_encoding")),
        ("/a/%4", Err("malformed_percent_encoding")),
        ("/a/%zz", Err("malformed_percent_encoding")),
        ("/a/%%32%65", Err("malformed_percent_encoding")),
        // Double encoding.
        ("/a/%252e%252e/b", Err("double_encoding")),
        ("/a/%25%32%65", Err("double_encoding")),
        // Target forms.
        ("*", Err("unsupported_target")),
        ("api.local:443", Err("unsupported_target")),
    ];

    fn host(value: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(HOST, HeaderValue::from_static(value));
        headers
    }

    fn run(target: &str, headers: &HeaderMap, version: Version) -> Result<Normalized, String> {
        let uri: Uri = target
            .parse()
            .map_err(|e| format!("{target:?} does not parse as a Uri: {e}"))?;
        normalize(&uri, headers, version, &NormalizeLimits::default())
            .map_err(|e| e.reason().to_owned())
    }

    fn check(target: &str, headers: &HeaderMap, version: Version, expect: Expect) {
        let got = run(target, headers, version);
        match (&got, expect) {
            (Ok(n), Ok(path)) => assert_eq!(n.path, path, "target {target:?}"),
            (Err(reason), Err(expected)) => assert_eq!(reason, expected, "target {target:?}"),
            _ => panic!("target {target:?}: got {got:?}, expected {expect:?}"),
        }
    }

    #[test]
    fn corpus() {
        assert!(CORPUS.len() >= 40);
        let headers = host("api.local");
        for &(target, expect) in CORPUS {
            check(target, &headers, Version::HTTP_11, expect);
        }
    }

    #[test]
    fn normalizing_is_idempotent() {
        let headers = host("api.local");
        for &(target, expect) in CORPUS {
            let Ok(path) = expect else { continue };
            let once = run(target, &headers, Version::HTTP_11).unwrap();
            let twice = run(path, &headers, Version::HTTP_11).unwrap();
            assert_eq!(
                twice.path, path,
                "normalizing {path:?} (from {target:?}) again"
            );
            assert_eq!(twice.segments, once.segments, "segments of {target:?}");
        }
    }

    #[test]
    fn absolute_form_must_match_host() {
        let cases: &[(&str, Option<&'static str>, Expect)] = &[
            (
                "http://api.local:8080/a/../b",
                Some("api.local:8080"),
                Ok("/b"),
            ),
            ("http://api.local/a", Some("API.Local"), Ok("/a")),
            ("http://api.local/a", Some("api.local:80"), Ok("/a")),
            ("http://api.local:80/a", Some("api.local"), Ok("/a")),
            ("https://api.local/a", Some("api.local:443"), Ok("/a")),
            ("http://api.local", Some("api.local"), Ok("/")),
            ("http://api.local?x=1", Some("api.local"), Ok("/")),
            (
                "http://api.local/a",
                Some("evil.local"),
                Err("host_mismatch"),
            ),
            (
                "http://api.local/a",
                Some("api.local:8080"),
                Err("host_mismatch"),
            ),
            (
                "https://api.local/a",
                Some("api.local:80"),
                Err("host_mismatch"),
            ),
            ("http://api.local/a", Some(""), Err("host_mismatch")),
            ("http://api.local/a", Some("a b"), Err("invalid_host")),
            (
                "http://api.local/a",
                Some("user@api.local"),
                Err("invalid_host"),
            ),
            (
                "http://user@api.local/a",
                Some("api.local"),
                Err("invalid_host"),
            ),
            ("http://api.local/a", None, Err("missing_host")),
            (
                "ftp://api.local/a",
                Some("api.local"),
                Err("unsupported_target"),
            ),
        ];
        for &(target, host_value, expect) in cases {
            let headers = host_value.map_or_else(HeaderMap::new, host);
            check(target, &headers, Version::HTTP_11, expect);
        }
    }

    #[test]
    fn http2_authority_must_match_host() {
        let uri = "https://api.local/clauses/c1";
        check(uri, &HeaderMap::new(), Version::HTTP_2, Ok("/clauses/c1"));
        check(uri, &host("api.local"), Version::HTTP_2, Ok("/clauses/c1"));
        check(
            uri,
            &host("evil.local"),
            Version::HTTP_2,
            Err("host_mismatch"),
        );
        check(
            "https://api.local:8443/a",
            &host("api.local"),
            Version::HTTP_2,
            Err("host_mismatch"),
        );
    }

    #[test]
    fn host_header_rules() {
        // HTTP/1.1 needs a Host; HTTP/1.0 and HTTP/2 do not.
        check(
            "/a",
            &HeaderMap::new(),
            Version::HTTP_11,
            Err("missing_host"),
        );
        check("/a", &HeaderMap::new(), Version::HTTP_10, Ok("/a"));
        check("/a", &HeaderMap::new(), Version::HTTP_2, Ok("/a"));
        check(
            "http://api.local/a",
            &HeaderMap::new(),
            Version::HTTP_10,
            Ok("/a"),
        );
        let mut two = host("api.local");
        two.append(HOST, HeaderValue::from_static("evil.local"));
        check("/a", &two, Version::HTTP_11, Err("invalid_host"));
        check(
            "http://api.local/a",
            &two,
            Version::HTTP_11,
            Err("invalid_host"),
        );
        let mut binary = HeaderMap::new();
        binary.insert(HOST, HeaderValue::from_bytes(b"api\xff.local").unwrap());
        check(
            "http://api.local/a",
            &binary,
            Version::HTTP_11,
            Err("invalid_host"),
        );
    }

    #[test]
    fn segments_are_decoded() {
        let headers = host("api.local");
        let n = run(
            "/clauses/c%2Dflood-17//a%20b/%25/caf%C3%A9/",
            &headers,
            Version::HTTP_11,
        )
        .unwrap();
        assert_eq!(n.path, "/clauses/c-flood-17/a%20b/%25/caf%C3%A9/");
        assert_eq!(n.segments, ["clauses", "c-flood-17", "a b", "%", "café"]);
        assert!(
            run("/", &headers, Version::HTTP_11)
                .unwrap()
                .segments
                .is_empty()
        );
        assert!(
            run("/..", &headers, Version::HTTP_11)
                .unwrap()
                .segments
                .is_empty()
        );
    }

    #[test]
    fn query_is_form_decoded_and_forwarded_raw() {
        let headers = host("api.local");
        let raw = "from=2026-01-01&flag&y=2&y=1&sp=a+b%20c&e=caf%C3%A9&s=%3B&k=%2F..%5C&=v&&";
        let n = run(&format!("/a/./b?{raw}"), &headers, Version::HTTP_11).unwrap();
        assert_eq!(n.raw_query.as_deref(), Some(raw));
        assert_eq!(n.path_and_query().as_str(), format!("/a/b?{raw}"));
        let q = |k: &str| n.query.get(k).cloned().unwrap_or_default();
        assert_eq!(q("from"), ["2026-01-01"]);
        assert_eq!(q("flag"), [""]);
        assert_eq!(q("y"), ["2", "1"]);
        assert_eq!(q("sp"), ["a b c"]);
        assert_eq!(q("e"), ["café"]);
        assert_eq!(q("s"), [";"]);
        assert_eq!(q("k"), ["/..\\"]);
        assert_eq!(q(""), ["v"]);
        assert_eq!(n.query.len(), 8);
    }

    #[test]
    fn query_without_parameters() {
        let headers = host("api.local");
        let none = run("/a", &headers, Version::HTTP_11).unwrap();
        assert_eq!(none.raw_query, None);
        assert_eq!(none.path_and_query().as_str(), "/a");
        let empty = run("/a?", &headers, Version::HTTP_11).unwrap();
        assert_eq!(empty.raw_query.as_deref(), Some(""));
        assert!(empty.query.is_empty());
        assert_eq!(empty.path_and_query().as_str(), "/a?");
    }

    #[test]
    fn query_errors() {
        let headers = host("api.local");
        for (target, reason) in [
            ("/a?x=%ff", "invalid_utf8"),
            ("/a?x=%c0%ae", "invalid_utf8"),
            ("/a?x=%00", "nul"),
            ("/a?x=%0d%0aSet-Cookie:y", "control_character"),
            ("/a?x=%zz", "malformed_percent_encoding"),
            ("/a?x=%", "malformed_percent_encoding"),
            ("/a?x=1;y=2", "semicolon"),
        ] {
            check(target, &headers, Version::HTTP_11, Err(reason));
        }
    }

    #[test]
    fn limits() {
        let headers = host("api.local");
        let limits = NormalizeLimits {
            max_path_bytes: 8,
            max_query_params: 2,
        };
        let go = |target: &str| {
            let uri: Uri = target.parse().unwrap();
            normalize(&uri, &headers, Version::HTTP_11, &limits).map(|n| n.path)
        };
        assert_eq!(go("/1234567").unwrap(), "/1234567");
        assert_eq!(
            go("/12345678").unwrap_err(),
            NormalizeError::PathTooLong { len: 9, max: 8 }
        );
        // Within the limit as received, over it once `{` is escaped.
        assert_eq!(go("/{{{").unwrap_err().reason(), "path_too_long");
        // Dot segments shrink a path, but the received length counts.
        assert_eq!(go("/a/b/../../c").unwrap_err().reason(), "path_too_long");
        assert_eq!(go("/a?x=1&y=2").unwrap(), "/a");
        assert_eq!(go("/a?x=1&x=2").unwrap(), "/a");
        assert_eq!(
            go("/a?x=1&y=2&z=3").unwrap_err(),
            NormalizeError::TooManyQueryParams { max: 2 }
        );
        assert_eq!(
            NormalizeLimits::default(),
            NormalizeLimits {
                max_path_bytes: 8192,
                max_query_params: 256
            }
        );
    }

    #[test]
    fn path_must_start_with_a_slash() {
        // Not parseable from text, but a `Uri` built from parts (as an HTTP/2 server
        // does from `:path`) can carry it.
        let mut parts = http::uri::Parts::default();
        parts.path_and_query = Some(PathAndQuery::from_static("?a=b"));
        let uri = Uri::from_parts(parts).unwrap();
        let got = normalize(
            &uri,
            &host("api.local"),
            Version::HTTP_11,
            &NormalizeLimits::default(),
        );
        assert_eq!(got, Err(NormalizeError::PathNotAbsolute));
    }

    #[test]
    fn fragment_is_refused_if_present() {
        // The http crate strips fragments today; if that changes, `#` is still refused.
        assert_eq!(normalize_path("/a#b", 100), Err(NormalizeError::Fragment));
        assert_eq!(parse_query("a=1#b", 10), Err(NormalizeError::Fragment));
    }

    /// What the HTTP parser refuses never reaches `normalize`; pin those assumptions.
    #[test]
    fn http_crate_assumptions() {
        for target in [
            "/a\r\nb", "/a b", "/a\0b", "/a\tb", "/a<b>", "/a`b", "/a\x7fb",
        ] {
            assert!(target.parse::<Uri>().is_err(), "{target:?} parsed");
        }
        let uri: Uri = "/a?b#c".parse().unwrap();
        assert_eq!(uri.path_and_query().unwrap().as_str(), "/a?b");
    }

    #[test]
    fn reasons_are_distinct_and_messages_clear() {
        let errors = [
            NormalizeError::UnsupportedTarget {
                form: "asterisk-form '*'",
            },
            NormalizeError::MissingHost,
            NormalizeError::InvalidHost { detail: "x" },
            NormalizeError::HostMismatch {
                target: "a".into(),
                host: "b".into(),
            },
            NormalizeError::PathNotAbsolute,
            NormalizeError::PathTooLong { len: 2, max: 1 },
            NormalizeError::TooManyQueryParams { max: 1 },
            NormalizeError::Nul { part: Part::Path },
            NormalizeError::ControlCharacter {
                part: Part::Query,
                code: 0x0D,
            },
            NormalizeError::Backslash,
            NormalizeError::EncodedSlash,
            NormalizeError::Semicolon { part: Part::Path },
            NormalizeError::Fragment,
            NormalizeError::MalformedPercentEncoding { part: Part::Path },
            NormalizeError::InvalidUtf8 { part: Part::Query },
            NormalizeError::DoubleEncoding,
        ];
        let reasons: std::collections::BTreeSet<_> =
            errors.iter().map(NormalizeError::reason).collect();
        assert_eq!(reasons.len(), errors.len());
        assert_eq!(
            errors[8].to_string(),
            "control character U+000D (raw or percent-encoded) in the query"
        );
    }

    /// Pseudo-random targets built from troublesome pieces: never a panic, and every
    /// accepted path is canonical and a fixed point.
    #[test]
    fn random_targets_are_canonical_fixed_points() {
        const PIECES: &[&str] = &[
            "/", "//", ".", "..", "%2e", "%2E", "a", "B", "%41", "%2f", "%5c", "\\", ";", "%3b",
            "%", "%4", "%c0", "%ae", "%c3%a9", "é", "%25", "2e", "%00", "%0a", "{", "\"", "~",
            "%7e", ":", "@", "+", "%20", "?", "&", "=",
        ];
        let headers = host("api.local");
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut accepted = 0;
        for _ in 0..20_000 {
            let mut target = String::from("/");
            for _ in 0..(next() % 12) {
                let index = usize::try_from(next() % PIECES.len() as u64).unwrap();
                target.push_str(PIECES[index]);
            }
            let Ok(uri) = target.parse::<Uri>() else {
                continue;
            };
            let Ok(n) = normalize(
                &uri,
                &headers,
                Version::HTTP_11,
                &NormalizeLimits::default(),
            ) else {
                continue;
            };
            accepted += 1;
            let path = n.path.as_str();
            assert!(path.starts_with('/'), "{target:?} -> {path:?}");
            assert!(!path.contains("//"), "{target:?} -> {path:?}");
            for dots in ["/./", "/../"] {
                assert!(!format!("{path}/").contains(dots), "{target:?} -> {path:?}");
            }
            let bytes = path.as_bytes();
            for (i, &b) in bytes.iter().enumerate() {
                if b == b'%' {
                    let hex = &bytes[i + 1..i + 3];
                    assert!(
                        hex.iter()
                            .all(|h| h.is_ascii_digit() || h.is_ascii_uppercase()),
                        "{target:?} -> {path:?}"
                    );
                    assert!(!is_unreserved(percent_byte(bytes, i).unwrap()));
                } else {
                    assert!(
                        is_unreserved(b) || is_path_delimiter(b),
                        "{target:?} -> {path:?}"
                    );
                }
            }
            let again = run(path, &headers, Version::HTTP_11).unwrap();
            assert_eq!(again.path, path, "{target:?}");
            assert_eq!(again.segments, n.segments, "{target:?}");
        }
        assert!(accepted > 1_000, "only {accepted} random targets accepted");
    }
}
