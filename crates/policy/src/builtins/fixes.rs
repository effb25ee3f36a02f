//! Builtins regorus 0.14 has but evaluates differently from OPA 1.20 (or panics on),
//! replaced by nexus's own implementations of OPA's behaviour, and OPA builtins regorus
//! lacks entirely. Registered like every nexus builtin: an interpreter extension (which
//! regorus looks up before its own builtin of the same name) and an RVM host call.
//!
//! - `regex.template_match`: regorus slices the subject by the template's literal
//!   prefix and panics when the subject is shorter; OPA builds one anchored regex from
//!   the template and matches it.
//! - `urlquery.decode`: regorus decodes as a form (and drops a decoded `&`); OPA is Go's
//!   `url.QueryUnescape`: `+` is a space, `%XX` a byte, an invalid escape an error.
//! - `array.flatten`: missing in regorus; OPA flattens one level.

use anyhow::{Result, bail};
use regorus::Value;

use super::string_arg;

/// Calls regorus's own builtin `name` (after a check nexus makes first).
pub(super) fn delegate(name: &str, args: &[Value]) -> Result<Value> {
    use regorus::unstable::{BUILTINS, Expr, Ref, Source, Span};
    let Some((f, _)) = BUILTINS.get(name) else {
        bail!("no regorus builtin {name}");
    };
    let source = Source::from_contents(name.to_string(), String::new())?;
    let span = Span {
        source,
        line: 1,
        col: 1,
        start: 0,
        end: 0,
    };
    let params: Vec<Ref<Expr>> = args
        .iter()
        .map(|_| {
            Ref::new(Expr::Null {
                span: span.clone(),
                value: Value::Null,
                eidx: 0,
            })
        })
        .collect();
    f(&span, &params, args, false)
}

/// `time.parse_rfc3339_ns(t)`: Go's `time.Parse(time.RFC3339, t)` accepts only `T` and
/// `Z` in upper case, no space for `T`, seconds up to 59 (chrono, under regorus, accepts
/// all three, so a timestamp OPA refuses would be a time in nexus); a valid one is
/// parsed by regorus.
pub(super) fn parse_rfc3339_ns(args: &[Value]) -> Result<Value> {
    let t = string_arg(args, 0)?;
    let b = t.as_bytes();
    let digits = |r: std::ops::Range<usize>| {
        b.get(r.clone())
            .is_some_and(|d| d.iter().all(u8::is_ascii_digit))
    };
    let num =
        |r: std::ops::Range<usize>| t.get(r).and_then(|d| d.parse::<u32>().ok()).unwrap_or(99);
    let shape = b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19);
    if !shape || num(11..13) > 23 || num(14..16) > 59 || num(17..19) > 59 {
        bail!("parsing time {t:?} as RFC 3339: cannot parse");
    }
    let mut i = 19;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            bail!("parsing time {t:?} as RFC 3339: cannot parse");
        }
    }
    let zone_ok = match &b[i..] {
        [b'Z'] => true,
        [sign, h1, h2, b':', m1, m2]
            if (*sign == b'+' || *sign == b'-')
                && [h1, h2, m1, m2].iter().all(|d| d.is_ascii_digit()) =>
        {
            num(i + 1..i + 3) < 24 && num(i + 4..i + 6) < 60
        }
        _ => false,
    };
    if !zone_ok {
        bail!("parsing time {t:?} as RFC 3339: cannot parse");
    }
    delegate("time.parse_rfc3339_ns", args)
}

/// `json.unmarshal(s)`: Go's decoder turns a lone UTF-16 surrogate escape (`"\ud800"`)
/// into U+FFFD; serde_json (under regorus) refuses the document. Lone surrogates are
/// replaced in the text first, then regorus decodes it.
pub(super) fn json_unmarshal(args: &[Value]) -> Result<Value> {
    let text = string_arg(args, 0)?;
    if !text.contains("\\u") {
        return delegate("json.unmarshal", args);
    }
    let is_hex = |s: &str| s.len() == 4 && s.bytes().all(|b| b.is_ascii_hexdigit());
    let unit = |s: &str| u16::from_str_radix(s, 16).ok();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let b = text.as_bytes();
    while i < b.len() {
        if b[i] == b'\\'
            && b.get(i + 1) == Some(&b'u')
            && text.get(i + 2..i + 6).is_some_and(is_hex)
        {
            let u = unit(&text[i + 2..i + 6]).unwrap_or(0);
            let high = (0xd800..0xdc00).contains(&u);
            let low = (0xdc00..0xe000).contains(&u);
            let next_low = text.get(i + 6..i + 8) == Some("\\u")
                && text.get(i + 8..i + 12).is_some_and(|h| {
                    is_hex(h) && unit(h).is_some_and(|n| (0xdc00..0xe000).contains(&n))
                });
            if low || (high && !next_low) {
                out.push_str("\\ufffd");
                i += 6;
                continue;
            }
            let len = if high { 12 } else { 6 };
            out.push_str(&text[i..i + len]);
            i += len;
            continue;
        }
        if b[i] == b'\\' && i + 1 < b.len() {
            // Any other escape, kept whole (so `\\u` is not read as an escape).
            let c = text[i + 1..].chars().next().map_or(1, char::len_utf8);
            out.push_str(&text[i..i + 1 + c]);
            i += 1 + c;
            continue;
        }
        let c = text[i..].chars().next().map_or(1, char::len_utf8);
        out.push_str(&text[i..i + c]);
        i += c;
    }
    delegate("json.unmarshal", &[Value::from(out)])
}

/// `to_number(x)`: Go's `strconv.ParseFloat` rejects surrounding spaces, which regorus
/// trims.
pub(super) fn to_number(args: &[Value]) -> Result<Value> {
    if let Some(Value::String(s)) = args.first()
        && s.trim() != s.as_ref()
    {
        bail!("invalid syntax: {s:?}");
    }
    delegate("to_number", args)
}

/// Go's `unicode.ToUpper`/`ToLower` map rune to rune: a character whose case mapping
/// is several characters (`ß` -> `SS`) stays as it is; Rust's string mapping expands it.
fn map_case(s: &str, upper: bool) -> String {
    s.chars()
        .map(|c| {
            let mut m: Vec<char> = if upper {
                c.to_uppercase().collect()
            } else {
                c.to_lowercase().collect()
            };
            if m.len() == 1 {
                m.pop().unwrap_or(c)
            } else {
                c
            }
        })
        .collect()
}

/// `upper(s)` as Go's `strings.ToUpper`.
pub(super) fn upper(args: &[Value]) -> Result<Value> {
    Ok(Value::from(map_case(string_arg(args, 0)?, true)))
}

/// `lower(s)` as Go's `strings.ToLower`.
pub(super) fn lower(args: &[Value]) -> Result<Value> {
    Ok(Value::from(map_case(string_arg(args, 0)?, false)))
}

/// The `(start, end)` byte spans of each delimited part of `template` (delimiters
/// included), counting nested delimiters as Go's `delimiterIndices` does.
fn delimiter_spans(template: &str, open: &str, close: &str) -> Result<Vec<(usize, usize)>> {
    if open.is_empty() || close.is_empty() {
        bail!("empty delimiter");
    }
    let mut level = 0i64;
    let mut start = 0usize;
    let mut spans = Vec::new();
    let mut i = 0usize;
    while i < template.len() {
        let rest = &template[i..];
        if rest.starts_with(open) {
            level += 1;
            if level == 1 {
                start = i;
            }
            i += open.len();
        } else if rest.starts_with(close) {
            level -= 1;
            if level == 0 {
                spans.push((start, i + close.len()));
            } else if level < 0 {
                bail!("unbalanced braces in {template:?}");
            }
            i += close.len();
        } else {
            i += rest.chars().next().map_or(1, char::len_utf8);
        }
    }
    if level != 0 {
        bail!("unbalanced braces in {template:?}");
    }
    Ok(spans)
}

/// `regex.template_match(template, value, delimiter_start, delimiter_end)`.
pub(super) fn template_match(args: &[Value]) -> Result<Value> {
    let template = string_arg(args, 0)?;
    let value = string_arg(args, 1)?;
    let open = string_arg(args, 2)?;
    let close = string_arg(args, 3)?;
    let spans = delimiter_spans(template, open, close)?;
    let mut pattern = String::from("^");
    let mut last = 0;
    for (start, end) in spans {
        pattern.push_str(&regex::escape(&template[last..start]));
        pattern.push('(');
        pattern.push_str(&template[start + open.len()..end - close.len()]);
        pattern.push(')');
        last = end;
    }
    pattern.push_str(&regex::escape(&template[last..]));
    pattern.push('$');
    let re = regex::Regex::new(&pattern)?;
    Ok(Value::from(re.is_match(value)))
}

/// `urlquery.decode(x)`: Go's `url.QueryUnescape`.
pub(super) fn urlquery_decode(args: &[Value]) -> Result<Value> {
    let s = string_arg(args, 0)?;
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let mut byte = [0u8; 1];
                let decoded = bytes.get(i + 1..i + 3).and_then(|hex| {
                    data_encoding::HEXLOWER_PERMISSIVE
                        .decode_mut(hex, &mut byte)
                        .ok()
                });
                match decoded.map(|_| byte[0]) {
                    Some(b) => out.push(b),
                    None => {
                        let shown: String = s[i..].chars().take(3).collect();
                        bail!("invalid URL escape {shown:?}");
                    }
                }
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    match String::from_utf8(out) {
        Ok(text) => Ok(Value::from(text)),
        Err(_) => bail!("the decoded bytes are not UTF-8"),
    }
}

/// `array.flatten(arr)`: one level.
pub(super) fn array_flatten(args: &[Value]) -> Result<Value> {
    let Some(Value::Array(items)) = args.first() else {
        bail!("operand 1 must be array");
    };
    let mut out = Vec::new();
    for item in items.iter() {
        match item {
            Value::Array(inner) => out.extend(inner.iter().cloned()),
            other => out.push(other.clone()),
        }
    }
    Ok(Value::from(out))
}

/// `__nexus_member(v, c)` (`rewrite`: `v in c` used as a value): OPA's
/// `internal.member_2`, reached only with both operands defined.
pub(super) fn member(args: &[Value]) -> Result<Value> {
    let [v, c] = args else {
        bail!("two operands");
    };
    Ok(Value::from(match c {
        Value::Array(items) => items.iter().any(|x| x == v),
        Value::Set(items) => items.contains(v),
        Value::Object(fields) => fields.values().any(|x| x == v),
        _ => false,
    }))
}

/// `__nexus_member_kv(k, v, c)` (`rewrite`: `k, v in c` used as a value): OPA's
/// `internal.member_3`.
pub(super) fn member_kv(args: &[Value]) -> Result<Value> {
    let [k, v, c] = args else {
        bail!("three operands");
    };
    Ok(Value::from(match c {
        Value::Array(items) => k
            .as_u64()
            .ok()
            .and_then(|i| items.get(i as usize))
            .is_some_and(|x| x == v),
        Value::Object(fields) => fields.get(k).is_some_and(|x| x == v),
        Value::Set(items) => k == v && items.contains(v),
        _ => false,
    }))
}

/// `__nexus_iter(c)` (`rewrite`, interpreter only: `some x in c`): `c` when it is a
/// collection, else an empty array, so a non-collection is undefined as in OPA rather
/// than an error.
pub(super) fn iter(args: &[Value]) -> Result<Value> {
    Ok(match args.first() {
        Some(c @ (Value::Array(_) | Value::Set(_) | Value::Object(_))) => c.clone(),
        _ => Value::new_array(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tm(t: &str, v: &str) -> Result<Value> {
        template_match(&[
            Value::from(t),
            Value::from(v),
            Value::from("{"),
            Value::from("}"),
        ])
    }

    /// Each expected answer is OPA 1.20's.
    #[test]
    fn template_match_as_opa() {
        assert_eq!(tm("urn:foo:{.*}", "urn").unwrap(), Value::from(false));
        assert_eq!(
            tm("urn:foo:{.*}", "urn:foo:bar:baz").unwrap(),
            Value::from(true)
        );
        assert_eq!(
            tm("urn:foo.bar.com:{.*}", "urn:fooXbar.com:x").unwrap(),
            Value::from(false)
        );
        assert_eq!(
            tm("a{[0-9]+}b{[a-z]*}", "a12bxy").unwrap(),
            Value::from(true)
        );
        assert_eq!(tm("a{b|c}", "ac").unwrap(), Value::from(true));
        assert_eq!(tm("", "").unwrap(), Value::from(true));
        assert!(tm("{.*", "abc").is_err());
        assert!(tm("a{x}}", "ax}").is_err());
    }

    /// Expected answers are OPA 1.20's (`tests/opa/differential/cases/time.yaml`).
    #[test]
    fn rfc3339_as_go() {
        let p = |s: &str| parse_rfc3339_ns(&[Value::from(s)]);
        assert!(p("2026-01-01T10:00:00Z").is_ok());
        assert!(p("2026-06-30T23:59:59.5+02:00").is_ok());
        for bad in [
            "2026-01-01t10:00:00Z",
            "2026-01-01T10:00:00z",
            "2026-01-01 10:00:00Z",
            "2026-01-01T10:00:60Z",
            "2026-01-01T10:00:00",
            "yesterday",
        ] {
            assert!(p(bad).is_err(), "{bad}");
        }
        assert_eq!(to_number(&[Value::from("42")]).unwrap(), Value::from(42u64));
        assert!(to_number(&[Value::from(" 42")]).is_err());
        assert_eq!(
            upper(&[Value::from("straße")]).unwrap(),
            Value::from("STRAßE")
        );
    }

    #[test]
    fn urlquery_decode_as_go() {
        let d = |s: &str| urlquery_decode(&[Value::from(s)]);
        assert_eq!(d("a%26b&c").unwrap(), Value::from("a&b&c"));
        assert_eq!(d("a+b%20c").unwrap(), Value::from("a b c"));
        assert!(d("%zz").is_err());
        assert!(d("%2").is_err());
    }

    #[test]
    fn array_flatten_one_level() {
        let v = Value::from(serde_json::json!([1, [2, [3, [4]]], []]));
        assert_eq!(
            array_flatten(&[v]).unwrap(),
            Value::from(serde_json::json!([1, 2, [3, [4]]]))
        );
    }
}
