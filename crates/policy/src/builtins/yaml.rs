//! YAML as OPA reads it, for `yaml.unmarshal`, `yaml.is_valid` and the policy folder's
//! YAML data files: OPA reads YAML through sigs.k8s.io/yaml, whose parser is go-yaml v2,
//! which resolves plain scalars by YAML 1.1's rules. So `yes`, `on` and `y` are `true`,
//! `no`, `off` and `n` are `false`, `0777` is 511 and `1_000` is 1000, where a YAML 1.2
//! reader (regorus's) keeps them as strings: a data file saying `strict: yes`, or an
//! input unmarshalled by the policy, would otherwise compare differently than under OPA.
//!
//! The events come from granit-parser (a YAML 1.2 parser that reports each scalar's
//! style and tag); the resolution of plain scalars, merge keys (`<<`), aliases, tags and
//! the conversion of keys to strings are written here after go-yaml v2's `resolve` and
//! `decode` and sigs.k8s.io/yaml's conversion to JSON, and checked against OPA in
//! `tests/opa/differential/cases/encoding.yaml`. Only the first document is read (as
//! OPA does); an empty text is `null`.
//!
//! Aliases are expanded (a value per use), so a small text can name a huge value
//! ("billion laughs"): expansion stops with an error past [`MAX_ALIASED_VALUES`] values.

use std::borrow::Cow;
use std::collections::HashMap;

use anyhow::{Result, anyhow, bail};
use granit_parser::{Event, Options, Parser, ScalarStyle, Tag};
use serde_json::{Map, Number, Value as Json};

/// Values that aliases may add to a document, in all (each use of an anchor adds the
/// anchored value's size). Past it the YAML is refused: a text of a few hundred bytes
/// can otherwise expand to gigabytes, and `yaml.unmarshal` may read what a plugin sent.
pub(crate) const MAX_ALIASED_VALUES: usize = 100_000;

/// The first document of `text` as OPA reads it (`yaml.unmarshal`, `opa eval -d`), as a
/// Rego value.
pub fn to_value(text: &str) -> Result<regorus::Value> {
    Ok(serde_json::from_value(to_json(text)?)?)
}

/// The first document of `text` as OPA's `yaml.unmarshal` returns it.
pub(crate) fn to_json(text: &str) -> Result<Json> {
    // Comments are not data (kube's YAML reader turns their events on in this build).
    let mut options = Options::default();
    options.emit_comments = false;
    let mut reader = Reader {
        parser: Parser::new_from_str_with_options(text, options),
        anchors: HashMap::new(),
        aliased: 0,
    };
    loop {
        match reader.next()? {
            Some(Event::StreamStart | Event::DocumentStart(..)) => {}
            Some(Event::StreamEnd | Event::DocumentEnd) | None => return Ok(Json::Null),
            Some(event) => {
                let value = reader.node(event)?;
                // The rest of the document must parse too (go-yaml reads the whole first
                // document); later documents are not read.
                reader.next()?;
                return Ok(value);
            }
        }
    }
}

/// A value and how many values it holds (itself included), for the alias budget.
struct Sized {
    value: Json,
    size: usize,
}

struct Reader<'a> {
    parser: Parser<'a, granit_parser::StrInput<'a>>,
    /// Anchored values so far (an anchor named again replaces the earlier one).
    anchors: HashMap<usize, (Json, usize, Kind)>,
    aliased: usize,
}

/// What kind of node an anchor names (a merge key takes only mappings).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Scalar,
    Sequence,
    Mapping,
}

/// A mapping key before its conversion to a string.
enum Key {
    Value(Json),
    /// The plain scalar `<<`: merge the value's mapping(s) in.
    Merge,
}

impl<'a> Reader<'a> {
    fn next(&mut self) -> Result<Option<Event<'a>>> {
        loop {
            match self.parser.next_event() {
                None => return Ok(None),
                Some(Err(e)) => bail!("yaml: {e}"),
                Some(Ok((Event::Anchor(..), _))) => {}
                #[allow(unreachable_patterns)]
                Some(Ok((event, _))) => return Ok(Some(event)),
            }
        }
    }

    fn expect_node(&mut self) -> Result<Event<'a>> {
        self.next()?
            .ok_or_else(|| anyhow!("yaml: the document ends inside a collection"))
    }

    /// The value of the node `event` starts (reading the rest of it).
    fn node(&mut self, event: Event<'a>) -> Result<Json> {
        Ok(self.sized(event)?.value)
    }

    fn sized(&mut self, event: Event<'a>) -> Result<Sized> {
        let (sized, anchor, kind) = match event {
            Event::Scalar(text, style, anchor, tag) => (
                Sized {
                    value: value(scalar(&text, style, tag.as_deref())?)?,
                    size: 1,
                },
                anchor,
                Kind::Scalar,
            ),
            Event::SequenceStart(_, anchor, _) => {
                let mut items = Vec::new();
                let mut size = 1;
                loop {
                    match self.expect_node()? {
                        Event::SequenceEnd => break,
                        event => {
                            let item = self.sized(event)?;
                            size += item.size;
                            items.push(item.value);
                        }
                    }
                }
                (
                    Sized {
                        value: Json::Array(items),
                        size,
                    },
                    anchor,
                    Kind::Sequence,
                )
            }
            Event::MappingStart(_, anchor, _) => (self.mapping()?, anchor, Kind::Mapping),
            Event::Alias(id) => return self.alias(id).map(|(sized, _)| sized),
            Event::UnresolvedAlias(name) => bail!("yaml: unknown anchor '{name}' referenced"),
            _ => bail!("yaml: unexpected event in a document"),
        };
        if anchor != 0 {
            self.anchors
                .insert(anchor, (sized.value.clone(), sized.size, kind));
        }
        Ok(sized)
    }

    /// A use of an anchor: a copy of its value, counted against the budget.
    fn alias(&mut self, id: usize) -> Result<(Sized, Kind)> {
        let (value, size, kind) = self
            .anchors
            .get(&id)
            .ok_or_else(|| anyhow!("yaml: unknown anchor referenced"))?;
        self.aliased = self.aliased.saturating_add(*size);
        if self.aliased > MAX_ALIASED_VALUES {
            bail!(
                "yaml: document contains excessive aliasing (more than {MAX_ALIASED_VALUES} values through aliases)"
            );
        }
        Ok((
            Sized {
                value: value.clone(),
                size: *size,
            },
            *kind,
        ))
    }

    /// A mapping's entries in order, later keys replacing earlier ones, merge keys
    /// merging (go-yaml v2's `mapping` and `merge`).
    fn mapping(&mut self) -> Result<Sized> {
        let mut object = Map::new();
        let mut size = 1;
        loop {
            let key = match self.expect_node()? {
                Event::MappingEnd => break,
                Event::Scalar(text, ScalarStyle::Plain, _, None) if text == "<<" => Key::Merge,
                Event::Scalar(text, _, _, Some(tag)) if text == "<<" && is_core(&tag, "merge") => {
                    Key::Merge
                }
                // A float key JSON cannot hold is named as go-yaml writes it.
                Event::Scalar(text, style, 0, tag) => match scalar(&text, style, tag.as_deref())? {
                    Scalar::Json(key) => Key::Value(key),
                    Scalar::NonFinite(f) => Key::Value(Json::String(
                        if f.is_nan() {
                            ".nan"
                        } else if f > 0.0 {
                            ".inf"
                        } else {
                            "-.inf"
                        }
                        .to_owned(),
                    )),
                },
                event => Key::Value(self.sized(event)?.value),
            };
            let event = self.expect_node()?;
            match key {
                Key::Merge => {
                    for (k, v) in self.merged(event)? {
                        size += 1;
                        object.insert(k, v);
                    }
                }
                Key::Value(key) => {
                    let key = key_string(key)?;
                    let value = self.sized(event)?;
                    size += value.size;
                    object.insert(key, value.value);
                }
            }
        }
        Ok(Sized {
            value: Json::Object(object),
            size,
        })
    }

    /// The entries a merge key's value brings: a mapping, an alias of one, or a sequence
    /// of those (earlier ones take precedence).
    fn merged(&mut self, event: Event<'a>) -> Result<Vec<(String, Json)>> {
        const WANT_MAP: &str = "yaml: map merge requires map or sequence of maps as the value";
        let entries = |value: Json| match value {
            Json::Object(map) => Ok(map.into_iter().collect::<Vec<_>>()),
            _ => Err(anyhow!(WANT_MAP)),
        };
        match event {
            Event::MappingStart(..) => entries(self.sized(event)?.value),
            Event::Alias(id) => match self.alias(id)? {
                (sized, Kind::Mapping) => entries(sized.value),
                _ => bail!(WANT_MAP),
            },
            Event::SequenceStart(..) => {
                let mut parts = Vec::new();
                loop {
                    match self.expect_node()? {
                        Event::SequenceEnd => break,
                        event @ Event::MappingStart(..) => {
                            parts.push(entries(self.sized(event)?.value)?);
                        }
                        Event::Alias(id) => match self.alias(id)? {
                            (sized, Kind::Mapping) => parts.push(entries(sized.value)?),
                            _ => bail!(WANT_MAP),
                        },
                        _ => bail!(WANT_MAP),
                    }
                }
                // Applied last to first, so that the first one's entries stay.
                Ok(parts.into_iter().rev().flatten().collect())
            }
            _ => bail!(WANT_MAP),
        }
    }
}

/// Whether `tag` is the YAML core schema's `!!<name>`.
fn is_core(tag: &Tag, name: &str) -> bool {
    tag.handle() == "tag:yaml.org,2002:" && tag.suffix() == name
}

/// A mapping key as sigs.k8s.io/yaml turns it into a JSON object's key.
fn key_string(key: Json) -> Result<String> {
    Ok(match key {
        Json::String(s) => s,
        Json::Bool(b) => b.to_string(),
        Json::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => i.to_string(),
            // Go formats a float key with 32-bit precision ('g', -1, 32).
            (None, Some(f)) if n.is_f64() => go_float32_key(f),
            _ => bail!("unsupported map key of type: uint64, key: {n}"),
        },
        Json::Null => bail!("unsupported map key of type: <nil>"),
        Json::Array(_) | Json::Object(_) => bail!("yaml: invalid map key"),
    })
}

/// `strconv.FormatFloat(f, 'g', -1, 32)` for the keys JSON can hold (finite floats).
fn go_float32_key(f: f64) -> String {
    #[allow(clippy::cast_possible_truncation)]
    let short = f as f32;
    if short.is_infinite() {
        return if short > 0.0 { ".inf" } else { "-.inf" }.to_owned();
    }
    // Go's 'g' with the shortest digits: exponent form below 1e-4 or from 1e21.
    let abs = short.abs();
    if abs != 0.0 && !(1e-4..1e21).contains(&abs) {
        let text = format!("{short:e}");
        // Rust writes 1e21 and 1.5e-7; Go writes 1e+21 and 1.5e-07.
        let (mantissa, exponent) = text.split_once('e').unwrap_or((&text, "0"));
        let (sign, digits) = match exponent.strip_prefix('-') {
            Some(digits) => ('-', digits),
            None => ('+', exponent),
        };
        return format!("{mantissa}e{sign}{digits:0>2}");
    }
    format!("{short}")
}

/// The value of a scalar (go-yaml v2's `resolve`, as `decode` calls it): a plain one
/// without a tag is resolved by its text; a quoted or block one is a string unless a
/// tag says otherwise; a tag outside the core schema leaves the text.
fn scalar(text: &str, style: ScalarStyle, tag: Option<&Tag>) -> Result<Scalar> {
    let wanted = match tag {
        None if style == ScalarStyle::Plain => "",
        None => "str",
        Some(tag) if tag.handle() == "tag:yaml.org,2002:" => match tag.suffix() {
            name @ ("str" | "bool" | "int" | "float" | "null" | "timestamp") => name,
            _ => "other",
        },
        // A local tag (`!custom`): the text.
        Some(_) => "other",
    };
    if matches!(wanted, "str" | "other") {
        return Ok(Scalar::Json(Json::String(text.to_owned())));
    }
    let (resolved, value) = resolve(text);
    Ok(match (wanted, resolved, value) {
        ("", _, value) | ("timestamp", Resolved::Timestamp, value) => value,
        (wanted, resolved, value) if wanted == resolved.name() => value,
        ("float", Resolved::Int, Scalar::Json(Json::Number(n))) => {
            float_scalar(n.as_f64().unwrap_or(f64::NAN))
        }
        (wanted, resolved, _) => bail!(
            "yaml: cannot decode !!{} `{text}` as a !!{wanted}",
            resolved.name()
        ),
    })
}

/// A scalar as a value: a float JSON cannot hold fails as sigs.k8s.io/yaml's
/// `json.Marshal` does.
fn value(scalar: Scalar) -> Result<Json> {
    match scalar {
        Scalar::Json(value) => Ok(value),
        Scalar::NonFinite(f) => bail!(
            "json: unsupported value: {}",
            if f.is_nan() {
                "NaN"
            } else if f > 0.0 {
                "+Inf"
            } else {
                "-Inf"
            }
        ),
    }
}

/// What a plain scalar's text resolved to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Resolved {
    Null,
    Bool,
    Int,
    Float,
    Str,
    Timestamp,
}

impl Resolved {
    fn name(self) -> &'static str {
        match self {
            Self::Null => "null",
            Self::Bool => "bool",
            Self::Int => "int",
            Self::Float => "float",
            Self::Str => "str",
            Self::Timestamp => "timestamp",
        }
    }
}

/// A resolved scalar: a JSON value, or a float JSON cannot hold (an error as a value,
/// a string as a key, as in sigs.k8s.io/yaml).
enum Scalar {
    Json(Json),
    NonFinite(f64),
}

fn float_scalar(f: f64) -> Scalar {
    Number::from_f64(f).map_or(Scalar::NonFinite(f), |n| Scalar::Json(Json::Number(n)))
}

/// go-yaml v2's resolution of a plain scalar's text.
fn resolve(text: &str) -> (Resolved, Scalar) {
    let fallback = || (Resolved::Str, Scalar::Json(Json::String(text.to_owned())));
    match text {
        "y" | "Y" | "yes" | "Yes" | "YES" | "true" | "True" | "TRUE" | "on" | "On" | "ON" => {
            return (Resolved::Bool, Scalar::Json(Json::Bool(true)));
        }
        "n" | "N" | "no" | "No" | "NO" | "false" | "False" | "FALSE" | "off" | "Off" | "OFF" => {
            return (Resolved::Bool, Scalar::Json(Json::Bool(false)));
        }
        "" | "~" | "null" | "Null" | "NULL" => return (Resolved::Null, Scalar::Json(Json::Null)),
        ".nan" | ".NaN" | ".NAN" => return (Resolved::Float, Scalar::NonFinite(f64::NAN)),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => {
            return (Resolved::Float, Scalar::NonFinite(f64::INFINITY));
        }
        "-.inf" | "-.Inf" | "-.INF" => {
            return (Resolved::Float, Scalar::NonFinite(f64::NEG_INFINITY));
        }
        _ => {}
    }
    match text.as_bytes()[0] {
        b'.' => match go_parse_float(text) {
            Some(f) => (Resolved::Float, float_scalar(f)),
            None => fallback(),
        },
        b'0'..=b'9' | b'+' | b'-' => {
            if is_timestamp(text) {
                return (
                    Resolved::Timestamp,
                    Scalar::Json(Json::String(text.to_owned())),
                );
            }
            let plain: Cow<'_, str> = if text.contains('_') {
                Cow::Owned(text.replace('_', ""))
            } else {
                Cow::Borrowed(text)
            };
            if let Some(i) = go_parse_int(&plain) {
                return (Resolved::Int, Scalar::Json(i));
            }
            if is_yaml_style_float(&plain)
                && let Some(f) = go_parse_float(&plain)
            {
                return (Resolved::Float, float_scalar(f));
            }
            if let Some(digits) = plain.strip_prefix("0b")
                && let Some(i) = parse_radix(digits, 2, false)
            {
                return (Resolved::Int, Scalar::Json(i));
            }
            if let Some(digits) = plain.strip_prefix("-0b")
                && let Some(i) = parse_radix(digits, 2, true)
            {
                return (Resolved::Int, Scalar::Json(i));
            }
            fallback()
        }
        _ => fallback(),
    }
}

/// Go's `strconv.ParseInt(s, 0, 64)`, then `ParseUint(s, 0, 64)`: a sign, then a base
/// prefix (`0x`, `0o`, `0b`, or `0` for octal) and digits.
fn go_parse_int(s: &str) -> Option<Json> {
    let (negative, rest) = match s.as_bytes().first()? {
        b'+' => (false, &s[1..]),
        b'-' => (true, &s[1..]),
        _ => (false, s),
    };
    let lower = rest.get(..2).map(str::to_ascii_lowercase);
    let (radix, digits) = match lower.as_deref() {
        Some("0x") => (16, &rest[2..]),
        Some("0o") => (8, &rest[2..]),
        Some("0b") => (2, &rest[2..]),
        _ if rest.len() > 1 && rest.starts_with('0') => (8, &rest[1..]),
        _ => (10, rest),
    };
    if s.starts_with('+') && radix == 10 && digits.is_empty() {
        return None;
    }
    parse_radix(digits, radix, negative)
}

/// Digits in `radix` as an int64 (with the sign), else a uint64 (without one).
fn parse_radix(digits: &str, radix: u32, negative: bool) -> Option<Json> {
    if digits.is_empty() || !digits.bytes().all(|b| (b as char).is_digit(radix)) {
        return None;
    }
    let magnitude = u128::from_str_radix(digits, radix).ok()?;
    if negative {
        let value = i64::try_from(-i128::try_from(magnitude).ok()?).ok()?;
        Some(Json::from(value))
    } else if let Ok(value) = i64::try_from(magnitude) {
        Some(Json::from(value))
    } else {
        u64::try_from(magnitude).ok().map(Json::from)
    }
}

/// `^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$`, go-yaml's float shape.
fn is_yaml_style_float(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = usize::from(matches!(b.first(), Some(b'+' | b'-')));
    let digits = |i: &mut usize| {
        let start = *i;
        while b.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i - start
    };
    if b.get(i) == Some(&b'.') {
        i += 1;
        if digits(&mut i) == 0 {
            return false;
        }
    } else {
        if digits(&mut i) == 0 {
            return false;
        }
        if b.get(i) == Some(&b'.') {
            i += 1;
            digits(&mut i);
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == b.len()
}

/// Go's `strconv.ParseFloat(s, 64)` for the decimal forms go-yaml passes it (an out of
/// range value is an error in Go, so the text stays a string).
fn go_parse_float(s: &str) -> Option<f64> {
    if !is_yaml_style_float(s) {
        return None;
    }
    let f: f64 = s.parse().ok()?;
    f.is_finite().then_some(f)
}

/// Whether go-yaml v2 may read the text as a timestamp (it looks for `YYYY-` first, then
/// tries its layouts). Such a text is never a number, and sigs.k8s.io/yaml gives a
/// timestamp back as written, so the value is the text either way. The one difference:
/// an explicit `!!timestamp` on a text none of go-yaml's layouts match, which go-yaml
/// refuses and nexus keeps as the text.
fn is_timestamp(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() > 5 && b[..4].iter().all(u8::is_ascii_digit) && b[4] == b'-'
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn read(text: &str) -> Json {
        to_json(text).unwrap_or_else(|e| panic!("{text:?}: {e:#}"))
    }

    /// The values OPA 1.20 gives (tests/opa/differential/cases/encoding.yaml has more).
    #[test]
    fn comments_are_not_data() {
        assert_eq!(
            read("# head\na: 1 # one\n# between\nb:\n  # inside\n  - 2\n"),
            json!({"a": 1, "b": [2]})
        );
    }

    #[test]
    fn plain_scalars_resolve_as_yaml_1_1() {
        assert_eq!(
            read(
                "a: yes\nb: on\nc: y\nd: 0777\ne: 0o17\nf: 1_000\ng: 0x1F\nh: ~\nj: 1:20\nk: 2001-12-14\nl: Yes\nm: NO\no: 0b101\np: +12\nq: 1e3\nr: .5\ns: \"yes\"\nt: -0x1F\nu: 1_0.5\nv: 0.\nw: 190:20:30\n"
            ),
            json!({"a": true, "b": true, "c": true, "d": 511, "e": 15, "f": 1000, "g": 31,
                   "h": null, "j": "1:20", "k": "2001-12-14", "l": true, "m": false, "o": 5,
                   "p": 12, "q": 1000.0, "r": 0.5, "s": "yes", "t": -31, "u": 10.5, "v": 0.0,
                   "w": "190:20:30"})
        );
        assert_eq!(
            read(
                "a: _1\nb: 1e\nc: +\nd: 0xG\ne: 1.5.5\ng: 1e400\ni: 00\nk: -0\nx: 123456789012345678901234567890\nz: 18446744073709551615\n"
            ),
            json!({"a": "_1", "b": "1e", "c": "+", "d": "0xG", "e": "1.5.5", "g": "1e400",
                   "i": 0, "k": 0, "x": 1.2345678901234568e29, "z": 18446744073709551615u64})
        );
    }

    #[test]
    fn keys_become_strings_as_sigs_k8s_yaml_writes_them() {
        assert_eq!(
            read("1: a\n1.5: b\ntrue: c\n0x10: f\n1e3: g\n-0: h\nn: i\n.inf: j\n"),
            json!({"1": "a", "1.5": "b", "true": "c", "16": "f", "1000": "g", "0": "h",
                   "false": "i", ".inf": "j"})
        );
        assert_eq!(go_float32_key(1e21), "1e+21");
        assert_eq!(go_float32_key(1.5e-7), "1.5e-07");
        assert_eq!(go_float32_key(0.1), "0.1");
        for bad in ["~: a\n", "[1]: a\n", "18446744073709551615: a\n"] {
            assert!(to_json(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn anchors_merges_tags_and_documents() {
        assert_eq!(
            read(
                "base: &b {x: 1, v: 2}\nother: &o {z: 3}\nuse: *b\nm:\n  <<: *b\n  v: 5\nboth:\n  <<: [*o, *b, {z: 9}]\nlate:\n  x: 0\n  <<: {x: 1, w: 2}\n  w: 3\n"
            ),
            json!({"base": {"x": 1, "v": 2}, "other": {"z": 3}, "use": {"x": 1, "v": 2},
                   "m": {"x": 1, "v": 5}, "both": {"x": 1, "v": 2, "z": 3},
                   "late": {"x": 1, "w": 3}})
        );
        assert_eq!(
            read("a: !!str yes\nb: !!bool \"true\"\nc: !!int \"12\"\nd: !custom x\ne: !!float 3\n"),
            json!({"a": "yes", "b": true, "c": 12, "d": "x", "e": 3.0})
        );
        assert!(to_json("a: !!int yes\n").is_err());
        assert!(to_json("a: {<<: [1]}\n").is_err());
        assert_eq!(read("---\na: 1\n---\nb: 2\n"), json!({"a": 1}));
        assert_eq!(read(""), Json::Null);
        assert_eq!(read("yes"), json!(true));
        assert_eq!(read("a: 1\na: 2\n"), json!({"a": 2}));
        // A key `y` is `true` too; what follows a flow root is not read (as go-yaml).
        assert_eq!(read("y: 1\n"), json!({"true": 1}));
        assert_eq!(read("[1, 2]\nfoo: ]\n"), json!([1, 2]));
    }

    #[test]
    fn what_json_cannot_hold_and_broken_text_are_errors() {
        for bad in [
            "a: .inf\n",
            "a: [-.inf]\n",
            "a: .nan\n",
            "a: [\n",
            "a: *nope\n",
            "a: 1\n]\n",
        ] {
            assert!(to_json(bad).is_err(), "{bad:?}");
        }
    }

    /// A plugin's text cannot overflow the stack: the parser caps nesting (255 flow and
    /// 255 block levels), and the deepest document it accepts reads on a test thread's
    /// stack; deeper is an error.
    #[test]
    fn nesting_is_bounded() {
        let mut text = String::new();
        for depth in 0..250 {
            text.push_str(&" ".repeat(depth));
            text.push_str("k:\n");
        }
        text.push_str(&" ".repeat(250));
        text.push_str(&format!("{}{}\n", "[".repeat(250), "]".repeat(250)));
        assert!(to_json(&text).is_ok());
        let too_deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(to_json(&too_deep).is_err());
    }

    /// "Billion laughs": nine levels of ten aliases each would be 10^9 values.
    #[test]
    fn alias_expansion_is_bounded() {
        let mut text = String::from("l0: &l0 [1,1,1,1,1,1,1,1,1,1]\n");
        for level in 1..9 {
            let uses = vec![format!("*l{}", level - 1); 10].join(",");
            text.push_str(&format!("l{level}: &l{level} [{uses}]\n"));
        }
        let started = std::time::Instant::now();
        let error = to_json(&text).unwrap_err().to_string();
        assert!(error.contains("excessive aliasing"), "{error}");
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        // Below the bound, aliases expand.
        assert_eq!(
            read("a: &a [1, 2]\nb: [*a, *a]\n"),
            json!({"a": [1, 2], "b": [[1, 2], [1, 2]]})
        );
    }
}
