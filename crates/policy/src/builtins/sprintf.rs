//! `sprintf` as OPA evaluates it: Go's `fmt.Sprintf` over the arguments converted the
//! way OPA converts them (an integer is an `int64`, or a `*big.Int` beyond 64 bits, a
//! fraction a `float64`, a string a Go string, anything else the Rego text of the value
//! as a string). regorus formats `%s` of a number as the number (OPA: `%!s(int64=42)`),
//! `%d` of a negative number with two minus signs, and has no `%e`, `%g`, `%x`, widths or
//! flags; each answer here is checked against OPA 1.20 (`tests/opa/differential`).

use std::fmt::Write as _;

use anyhow::{Result, bail};
use regorus::Value;

/// An argument as Go's fmt sees it.
enum Arg {
    Int(i64),
    Big(String),
    Float(f64),
    Str(String),
}

impl Arg {
    fn of(v: &Value) -> Self {
        match v {
            Value::String(s) => Self::Str(s.to_string()),
            Value::Number(_) => {
                if let Ok(i) = v.as_i64() {
                    return Self::Int(i);
                }
                let text = v
                    .as_number()
                    .map(|n| n.format_decimal())
                    .unwrap_or_default();
                if !text.is_empty()
                    && text
                        .trim_start_matches('-')
                        .bytes()
                        .all(|b| b.is_ascii_digit())
                {
                    Self::Big(text)
                } else {
                    Self::Float(v.as_f64().unwrap_or(f64::NAN))
                }
            }
            other => Self::Str(rego_text(other)),
        }
    }

    fn type_name(&self) -> &'static str {
        match self {
            Self::Int(_) => "int64",
            Self::Big(_) => "*big.Int",
            Self::Float(_) => "float64",
            Self::Str(_) => "string",
        }
    }
}

/// A value's Rego text (OPA's `Value.String()`), for arguments that are not numbers or
/// strings.
fn rego_text(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(_) => v
            .as_number()
            .map(|n| n.format_decimal())
            .unwrap_or_default(),
        Value::String(s) => serde_json::to_string(s.as_ref()).unwrap_or_default(),
        Value::Array(items) => format!(
            "[{}]",
            items.iter().map(rego_text).collect::<Vec<_>>().join(", ")
        ),
        Value::Set(items) if items.is_empty() => "set()".into(),
        Value::Set(items) => format!(
            "{{{}}}",
            items.iter().map(rego_text).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(fields) => format!(
            "{{{}}}",
            fields
                .iter()
                .map(|(k, v)| format!("{}: {}", rego_text(k), rego_text(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Value::Undefined => String::new(),
    }
}

#[derive(Default, Clone, Copy)]
struct Spec {
    minus: bool,
    plus: bool,
    space: bool,
    zero: bool,
    sharp: bool,
    width: Option<usize>,
    precision: Option<usize>,
}

/// Go's `strconv.Quote` (`ascii`: `QuoteToASCII`).
fn quote(s: &str, ascii: bool) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\u{b}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if ascii && !c.is_ascii() => {
                if (c as u32) < 0x10000 {
                    let _ = write!(out, "\\u{:04x}", c as u32);
                } else {
                    let _ = write!(out, "\\U{:08x}", c as u32);
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Go's exponent form of `f` with `prec` digits after the point (None: shortest).
fn exp_form(f: f64, prec: Option<usize>, upper: bool) -> String {
    let s = match prec {
        Some(p) => format!("{f:.p$e}"),
        None => format!("{f:e}"),
    };
    let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let e = if upper { 'E' } else { 'e' };
    format!(
        "{mantissa}{e}{}{:02}",
        if exp < 0 { '-' } else { '+' },
        exp.abs()
    )
}

/// Go's `%g` (shortest when `prec` is None).
fn g_form(f: f64, prec: Option<usize>, upper: bool) -> String {
    if f == 0.0 {
        return if f.is_sign_negative() {
            "-0".into()
        } else {
            "0".into()
        };
    }
    let sci = match prec {
        Some(p) => format!("{f:.*e}", p.max(1) - 1),
        None => format!("{f:e}"),
    };
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits = mantissa.trim_start_matches('-').replace('.', "").len() as i32;
    let eprec = match prec {
        None => 6,
        Some(p) => {
            let p = p.max(1) as i32;
            if p > digits && digits > exp {
                digits
            } else {
                p
            }
        }
    };
    if exp < -4 || exp >= eprec {
        let m = mantissa.to_string();
        let m = if prec.is_some() && m.contains('.') {
            m.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            m
        };
        let e = if upper { 'E' } else { 'e' };
        format!("{m}{e}{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    } else {
        let decimals = (digits - 1 - exp).max(0) as usize;
        let s = format!("{f:.decimals$}");
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    }
}

fn radix(digits: &str, negative: bool, spec: &Spec, prefix: &str) -> String {
    let digits = match spec.precision {
        Some(p) if digits.len() < p => format!("{}{digits}", "0".repeat(p - digits.len())),
        _ => digits.to_string(),
    };
    let sign = if negative {
        "-"
    } else if spec.plus {
        "+"
    } else if spec.space {
        " "
    } else {
        ""
    };
    format!("{sign}{}{digits}", if spec.sharp { prefix } else { "" })
}

fn big_radix(decimal: &str, base: u32) -> String {
    // Repeated division of the decimal digits.
    let mut digits: Vec<u32> = decimal.bytes().map(|b| u32::from(b - b'0')).collect();
    let mut out = Vec::new();
    while !(digits.is_empty() || digits.iter().all(|d| *d == 0)) {
        let mut rem = 0;
        let mut next = Vec::with_capacity(digits.len());
        for d in digits {
            let cur = rem * 10 + d;
            let q = cur / base;
            rem = cur % base;
            if !next.is_empty() || q != 0 {
                next.push(q);
            }
        }
        out.push(std::char::from_digit(rem, base).unwrap_or('0'));
        digits = next;
    }
    if out.is_empty() {
        "0".into()
    } else {
        out.iter().rev().collect()
    }
}

/// One verb applied to one argument; None: a bad verb for this type.
fn format_one(verb: char, arg: &Arg, spec: &Spec) -> Option<String> {
    Some(match (arg, verb) {
        (Arg::Int(i), 'v' | 'd') => radix(&i.unsigned_abs().to_string(), *i < 0, spec, ""),
        (Arg::Int(i), 'b') => radix(&format!("{:b}", i.unsigned_abs()), *i < 0, spec, "0b"),
        (Arg::Int(i), 'o') => radix(&format!("{:o}", i.unsigned_abs()), *i < 0, spec, "0"),
        (Arg::Int(i), 'O') => radix(
            &format!("{:o}", i.unsigned_abs()),
            *i < 0,
            &Spec {
                sharp: true,
                ..*spec
            },
            "0o",
        ),
        (Arg::Int(i), 'x') => radix(&format!("{:x}", i.unsigned_abs()), *i < 0, spec, "0x"),
        (Arg::Int(i), 'X') => radix(&format!("{:X}", i.unsigned_abs()), *i < 0, spec, "0X"),
        (Arg::Int(i), 'c') => char::from_u32(u32::try_from(*i).ok()?)
            .unwrap_or('\u{fffd}')
            .to_string(),
        (Arg::Int(i), 'q') => {
            let c = char::from_u32(u32::try_from(*i).ok()?).unwrap_or('\u{fffd}');
            let q = quote(&c.to_string(), spec.plus);
            format!("'{}'", &q[1..q.len() - 1].replace("\\\"", "\""))
        }
        (Arg::Int(i), 'U') => format!("U+{:04X}", i),
        (Arg::Big(d), 'v' | 'd' | 's') => {
            let (neg, digits) = d
                .strip_prefix('-')
                .map_or((false, d.as_str()), |r| (true, r));
            radix(digits, neg, spec, "")
        }
        (Arg::Big(d), 'x' | 'X' | 'o' | 'b') => {
            let (neg, digits) = d
                .strip_prefix('-')
                .map_or((false, d.as_str()), |r| (true, r));
            let base = match verb {
                'x' | 'X' => 16,
                'o' => 8,
                _ => 2,
            };
            let r = big_radix(digits, base);
            let r = if verb == 'X' { r.to_uppercase() } else { r };
            radix(&r, neg, spec, "")
        }
        (Arg::Float(f), 'v' | 'g' | 'G') => sign(g_form(*f, spec.precision, verb == 'G'), spec),
        (Arg::Float(f), 'e' | 'E') => sign(
            exp_form(*f, Some(spec.precision.unwrap_or(6)), verb == 'E'),
            spec,
        ),
        (Arg::Float(f), 'f' | 'F') => sign(format!("{f:.*}", spec.precision.unwrap_or(6)), spec),
        (Arg::Str(s), 'v' | 's') if spec.sharp && verb == 'v' => quote(s, false),
        (Arg::Str(s), 'v' | 's') => match spec.precision {
            Some(p) => s.chars().take(p).collect(),
            None => s.clone(),
        },
        (Arg::Str(s), 'q') => quote(s, spec.plus),
        (Arg::Str(s), 'x') => data_encoding::HEXLOWER.encode(s.as_bytes()),
        (Arg::Str(s), 'X') => data_encoding::HEXUPPER.encode(s.as_bytes()),
        _ => return None,
    })
}

fn sign(s: String, spec: &Spec) -> String {
    if s.starts_with('-') {
        s
    } else if spec.plus {
        format!("+{s}")
    } else if spec.space {
        format!(" {s}")
    } else {
        s
    }
}

fn pad(s: String, spec: &Spec, numeric: bool) -> String {
    let Some(width) = spec.width else { return s };
    let len = s.chars().count();
    if len >= width {
        return s;
    }
    let fill = width - len;
    if spec.minus {
        format!("{s}{}", " ".repeat(fill))
    } else if spec.zero {
        // Zeros go after the sign.
        let (sign, rest) = if numeric && (s.starts_with('-') || s.starts_with('+')) {
            s.split_at(1)
        } else {
            ("", s.as_str())
        };
        format!("{sign}{}{rest}", "0".repeat(fill))
    } else {
        format!("{}{s}", " ".repeat(fill))
    }
}

/// `%v` of an argument for Go's error forms (`%!d(string=5)`, EXTRA).
fn plain(arg: &Arg, spec: &Spec) -> String {
    format_one('v', arg, spec).unwrap_or_default()
}

/// `sprintf(format, values)`.
pub(super) fn sprintf(args: &[Value]) -> Result<Value> {
    let format = super::string_arg(args, 0)?;
    let Some(Value::Array(values)) = args.get(1) else {
        bail!("operand 2 must be array");
    };
    let values: Vec<Arg> = values.iter().map(Arg::of).collect();
    let mut out = String::new();
    let mut next = 0usize;
    let mut reordered = false;
    let chars: Vec<char> = format.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c != '%' {
            out.push(c);
            i += 1;
            continue;
        }
        i += 1;
        let mut spec = Spec::default();
        while let Some(&f) = chars.get(i) {
            match f {
                '-' => spec.minus = true,
                '+' => spec.plus = true,
                ' ' => spec.space = true,
                '0' => spec.zero = !spec.minus,
                '#' => spec.sharp = true,
                _ => break,
            }
            i += 1;
        }
        let number = |i: &mut usize, next: &mut usize| -> Option<usize> {
            if chars.get(*i) == Some(&'*') {
                *i += 1;
                let v = values.get(*next);
                *next += 1;
                return match v {
                    Some(Arg::Int(n)) => usize::try_from(*n).ok(),
                    _ => None,
                };
            }
            let start = *i;
            while chars.get(*i).is_some_and(char::is_ascii_digit) {
                *i += 1;
            }
            (start != *i).then(|| {
                chars[start..*i]
                    .iter()
                    .collect::<String>()
                    .parse()
                    .unwrap_or(0)
            })
        };
        if chars.get(i) == Some(&'[') {
            let close = chars[i..].iter().position(|c| *c == ']').map(|p| p + i);
            if let Some(close) = close
                && let Ok(n) = chars[i + 1..close]
                    .iter()
                    .collect::<String>()
                    .parse::<usize>()
            {
                next = n.saturating_sub(1);
                reordered = true;
                i = close + 1;
            }
        }
        spec.width = number(&mut i, &mut next);
        if chars.get(i) == Some(&'.') {
            i += 1;
            spec.precision = Some(number(&mut i, &mut next).unwrap_or(0));
        }
        if chars.get(i) == Some(&'[') {
            let close = chars[i..].iter().position(|c| *c == ']').map(|p| p + i);
            if let Some(close) = close
                && let Ok(n) = chars[i + 1..close]
                    .iter()
                    .collect::<String>()
                    .parse::<usize>()
            {
                next = n.saturating_sub(1);
                reordered = true;
                i = close + 1;
            }
        }
        let Some(&verb) = chars.get(i) else {
            out.push_str("%!(NOVERB)");
            break;
        };
        i += 1;
        if verb == '%' {
            out.push('%');
            continue;
        }
        let Some(arg) = values.get(next) else {
            let _ = write!(out, "%!{verb}(MISSING)");
            continue;
        };
        next += 1;
        let numeric = matches!(arg, Arg::Int(_) | Arg::Big(_) | Arg::Float(_));
        match format_one(verb, arg, &spec) {
            Some(text) => out.push_str(&pad(text, &spec, numeric)),
            None => {
                let _ = write!(
                    out,
                    "%!{verb}({}={})",
                    arg.type_name(),
                    pad(plain(arg, &spec), &spec, numeric)
                );
            }
        }
    }
    if !reordered && next < values.len() {
        out.push_str("%!(EXTRA ");
        let extra: Vec<String> = values[next..]
            .iter()
            .map(|a| format!("{}={}", a.type_name(), plain(a, &Spec::default())))
            .collect();
        out.push_str(&extra.join(", "));
        out.push(')');
    }
    Ok(Value::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(format: &str, args: serde_json::Value) -> String {
        let v = sprintf(&[Value::from(format), Value::from(args)]).unwrap();
        v.as_string().unwrap().to_string()
    }

    /// Every expected string is OPA 1.20's answer.
    #[test]
    fn as_opa() {
        let cases: &[(&str, serde_json::Value, &str)] = &[
            ("%s", serde_json::json!([42]), "%!s(int64=42)"),
            ("%d", serde_json::json!([-5]), "-5"),
            ("%e", serde_json::json!([1.5]), "1.500000e+00"),
            ("%g", serde_json::json!([1234567.5]), "1.2345675e+06"),
            ("%v", serde_json::json!([1.5]), "1.5"),
            ("%v", serde_json::json!([0.0001]), "0.0001"),
            ("%v", serde_json::json!([0.00001]), "1e-05"),
            ("%f", serde_json::json!([1.5]), "1.500000"),
            ("%.3f", serde_json::json!([2]), "%!f(int64=002)"),
            ("%d", serde_json::json!([1.5]), "%!d(float64=1.5)"),
            ("%x", serde_json::json!([255]), "ff"),
            ("%X", serde_json::json!(["hi"]), "6869"),
            ("%o", serde_json::json!([8]), "10"),
            ("%b", serde_json::json!([5]), "101"),
            ("%q", serde_json::json!([65]), "'A'"),
            ("%c", serde_json::json!([65]), "A"),
            ("%5.1f|", serde_json::json!([3.125]), "  3.1|"),
            ("%-6d|", serde_json::json!([42]), "42    |"),
            ("%06d", serde_json::json!([-42]), "-00042"),
            ("%+d", serde_json::json!([5]), "+5"),
            ("% d", serde_json::json!([5]), " 5"),
            ("%t", serde_json::json!([true]), "%!t(string=true)"),
            ("%v", serde_json::json!([true]), "true"),
            ("%s", serde_json::json!([null]), "null"),
            (
                "%v",
                serde_json::json!([[1, "a", null]]),
                "[1, \"a\", null]",
            ),
            ("%s", serde_json::json!([{"a": 1}]), "{\"a\": 1}"),
            ("%d %d", serde_json::json!([1]), "1 %!d(MISSING)"),
            ("%d", serde_json::json!([1, 2]), "1%!(EXTRA int64=2)"),
            ("%z", serde_json::json!([1]), "%!z(int64=1)"),
            ("%.2s", serde_json::json!(["abcdef"]), "ab"),
            ("%10s|", serde_json::json!(["ab"]), "        ab|"),
            ("%#v", serde_json::json!(["ab"]), "\"ab\""),
            ("%#x", serde_json::json!([255]), "0xff"),
            ("%e", serde_json::json!([100]), "%!e(int64=100)"),
            ("%U", serde_json::json!([65]), "U+0041"),
            ("%08.3f", serde_json::json!([-3.5]), "-003.500"),
            ("%x", serde_json::json!([-255]), "-ff"),
            ("%q", serde_json::json!(["é\n"]), "\"é\\n\""),
            ("%+q", serde_json::json!(["é"]), "\"\\u00e9\""),
            ("%*d", serde_json::json!([5, 3]), "    3"),
            ("%[2]d %[1]d", serde_json::json!([1, 2]), "2 1"),
            ("%v%%", serde_json::json!([1]), "1%"),
            ("%.0f", serde_json::json!([2.5]), "2"),
            ("%.0f", serde_json::json!([3.5]), "4"),
            ("%g", serde_json::json!([0.000012345]), "1.2345e-05"),
            ("%E", serde_json::json!([123456.789]), "1.234568E+05"),
            ("%.3g", serde_json::json!([1234.5678]), "1.23e+03"),
            ("%v", serde_json::json!([-1.5e-7]), "-1.5e-07"),
            ("%5s|", serde_json::json!(["é"]), "    é|"),
            (
                "%s may %s",
                serde_json::json!([1, "read"]),
                "%!s(int64=1) may read",
            ),
        ];
        for (format, args, want) in cases {
            assert_eq!(f(format, args.clone()), *want, "{format} {args}");
        }
    }
}
