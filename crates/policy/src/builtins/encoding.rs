//! The byte encodings these builtins read, with Go's leniency: base64 that ignores
//! non-zero trailing bits (Go's decoders are not "strict"), base64url with or without
//! padding (OPA pads it, RFC 7515 appendix C), and PEM blocks as Go's `pem.Decode`
//! finds them.

use anyhow::{Result, anyhow};
use data_encoding::{Encoding, Specification};

fn lenient(symbols: &str) -> Result<Encoding> {
    let mut spec = Specification::new();
    spec.symbols.push_str(symbols);
    spec.padding = Some('=');
    spec.check_trailing_bits = false;
    spec.encoding()
        .map_err(|e| anyhow!("base64 specification: {e}"))
}

const STD: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const URL: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Go's `base64.StdEncoding.DecodeString` (padding required; CR and LF ignored).
pub(super) fn base64_std(s: &str) -> Result<Vec<u8>> {
    let cleaned: String = s.chars().filter(|c| *c != '\r' && *c != '\n').collect();
    lenient(STD)?
        .decode(cleaned.as_bytes())
        .map_err(|e| anyhow!("illegal base64 data: {e}"))
}

/// OPA's `base64url.decode`: pads an unpadded string, then Go's `URLEncoding`.
pub(super) fn base64_url(s: &str) -> Result<Vec<u8>> {
    let mut padded = s.to_string();
    if !s.ends_with('=') {
        match s.len() % 4 {
            0 => {}
            2 => padded.push_str("=="),
            3 => padded.push('='),
            _ => return Err(anyhow!("illegal base64url string: {s}")),
        }
    }
    lenient(URL)?
        .decode(padded.as_bytes())
        .map_err(|e| anyhow!("illegal base64url string: {e}"))
}

/// Standard base64 with padding, as Go's JSON encoding of `[]byte`.
pub(super) fn base64_encode(bytes: &[u8]) -> String {
    data_encoding::BASE64.encode(bytes)
}

/// One PEM block.
pub(super) struct Pem {
    pub kind: String,
    pub der: Vec<u8>,
}

/// Go's `pem.Decode`: the first block in `text` and what follows it (the rest of its
/// END line included), or None when there is no well-formed block.
pub(super) fn pem_decode(text: &str) -> Option<(Pem, &str)> {
    let mut search = text;
    loop {
        let start = search.find("-----BEGIN ")?;
        let after = &search[start + 11..];
        let close = after.find("-----")?;
        let kind = &after[..close];
        let header_line_end = &after[close + 5..];
        // The BEGIN line must end here.
        let Some(body) = header_line_end
            .strip_prefix("\r\n")
            .or_else(|| header_line_end.strip_prefix('\n'))
        else {
            search = &search[start + 11..];
            continue;
        };
        let end_marker = format!("-----END {kind}-----");
        let Some(end) = body.find(&end_marker) else {
            search = &search[start + 11..];
            continue;
        };
        let content = &body[..end];
        // Optional RFC 1421 headers end at the first empty line.
        let content = match content.find(":") {
            Some(colon) if !content[..colon].contains('\n') => content
                .find("\n\n")
                .map(|i| &content[i + 2..])
                .unwrap_or(content),
            _ => content,
        };
        let b64: String = content.chars().filter(|c| !c.is_whitespace()).collect();
        let Ok(der) = data_encoding::BASE64.decode(b64.as_bytes()) else {
            search = &search[start + 11..];
            continue;
        };
        let mut rest = &body[end + end_marker.len()..];
        // The rest of the END line (spaces and tabs, then a newline) is consumed.
        let trimmed = rest.trim_start_matches([' ', '\t']);
        if let Some(r) = trimmed
            .strip_prefix("\r\n")
            .or_else(|| trimmed.strip_prefix('\n'))
        {
            rest = r;
        } else if trimmed.is_empty() {
            rest = trimmed;
        } else {
            search = &search[start + 11..];
            continue;
        }
        return Some((
            Pem {
                kind: kind.to_string(),
                der,
            },
            rest,
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_with_and_without_padding() {
        assert_eq!(base64_url("YWI").unwrap(), b"ab");
        assert_eq!(base64_url("YWI=").unwrap(), b"ab");
        assert!(base64_url("YWJjZ").is_err());
    }

    #[test]
    fn pem_blocks_in_sequence() {
        let text =
            "-----BEGIN X-----\nAQI=\n-----END X-----\n-----BEGIN Y-----\nAw==\n-----END Y-----\n";
        let (a, rest) = pem_decode(text).unwrap();
        assert_eq!((a.kind.as_str(), a.der.as_slice()), ("X", &[1u8, 2][..]));
        let (b, rest) = pem_decode(rest).unwrap();
        assert_eq!((b.kind.as_str(), b.der.as_slice()), ("Y", &[3u8][..]));
        assert_eq!(rest, "");
    }
}
