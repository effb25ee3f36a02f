//! Builtins whose OPA behaviour is Go's standard library (or a Go package OPA uses),
//! where regorus 0.14 answers differently:
//!
//! - `json.marshal`, `json.marshal_with_options`: Go's `encoding/json` escapes `<`, `>`,
//!   `&`, U+2028 and U+2029 in strings (`\u003c`...); serde_json writes them as they are.
//! - `glob.quote_meta`: gobwas/glob's `QuoteMeta` escapes `* ? \ [ ] { }`; regorus only
//!   `*`.
//! - `time.parse_duration_ns`: Go's `time.ParseDuration` grammar with OPA's extra units
//!   `d` (24h), `w` (7d) and `y` (365d); regorus has no `d`, `w` or `y`.
//! - `count` of a string (through `__nexus_count`, see `rewrite`): Go counts runes,
//!   regorus UTF-16 units.
//! - `time.add_date`: Go's `Time.AddDate` normalizes an overflowing date (January 31 plus
//!   one month is March 3, or 2 in a leap year); regorus clamps to the month's last day.
//!
//! Each was found by the OPA differential harness (tests/opa/differential) and is
//! checked there against OPA 1.20.

use anyhow::{Result, bail};
use regorus::Value;

use super::{fixes::delegate, string_arg, type_name};

/// Go's `encoding/json` string escaping on top of serde_json's: the characters Go
/// writes as `\uXXXX` and serde_json as they are. They can only stand inside strings of
/// a JSON text (keys or values), so replacing them anywhere in it is exact.
fn go_json_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    out
}

/// A JSON text from regorus's builtin `name`, escaped as Go escapes it.
fn marshal_as_go(name: &str, args: &[Value]) -> Result<Value> {
    match delegate(name, args)? {
        Value::String(text) => Ok(Value::from(go_json_escapes(&text))),
        other => Ok(other),
    }
}

/// `json.marshal(x)`.
pub(super) fn json_marshal(args: &[Value]) -> Result<Value> {
    marshal_as_go("json.marshal", args)
}

/// `json.marshal_with_options(x, opts)`.
pub(super) fn json_marshal_with_options(args: &[Value]) -> Result<Value> {
    marshal_as_go("json.marshal_with_options", args)
}

/// `glob.quote_meta(s)`: gobwas/glob's `QuoteMeta`, a `\` before each of its special
/// characters (`,`, `!` and `-` are special only inside braces or brackets, and are
/// left alone).
pub(super) fn glob_quote_meta(args: &[Value]) -> Result<Value> {
    let s = string_arg(args, 0)?;
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if matches!(c, '*' | '?' | '\\' | '[' | ']' | '{' | '}') {
            out.push('\\');
        }
        out.push(c);
    }
    Ok(Value::from(out))
}

const NS_PER_HOUR: u64 = 3_600_000_000_000;

/// The units of a duration and their length in nanoseconds: Go's, then OPA's.
fn duration_unit(unit: &str) -> Option<u64> {
    Some(match unit {
        "ns" => 1,
        "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => NS_PER_HOUR,
        "d" => 24 * NS_PER_HOUR,
        "w" => 7 * 24 * NS_PER_HOUR,
        "y" => 365 * 24 * NS_PER_HOUR,
        _ => return None,
    })
}

/// Go's `time.ParseDuration` (go/src/time/format.go), with [`duration_unit`]'s units:
/// `[-+]?([0-9]*(\.[0-9]*)?[a-z]+)+`, or `0`; the same overflow checks, and fractions
/// through the same float arithmetic, so that every value and every refusal is Go's.
pub(crate) fn parse_go_duration(orig: &str) -> Result<i64> {
    const LIMIT: u64 = 1 << 63;
    let invalid = || anyhow::anyhow!("time: invalid duration {orig:?}");
    let mut s = orig.as_bytes();
    let mut neg = false;
    if let Some(&c) = s.first()
        && (c == b'-' || c == b'+')
    {
        neg = c == b'-';
        s = &s[1..];
    }
    if s == b"0" {
        return Ok(0);
    }
    if s.is_empty() {
        return Err(invalid());
    }
    let mut d: u64 = 0;
    while !s.is_empty() {
        if !(s[0] == b'.' || s[0].is_ascii_digit()) {
            return Err(invalid());
        }
        // [0-9]*
        let mut v: u64 = 0;
        let mut i = 0;
        while i < s.len() && s[i].is_ascii_digit() {
            if v > LIMIT / 10 {
                return Err(invalid());
            }
            v = v * 10 + u64::from(s[i] - b'0');
            if v > LIMIT {
                return Err(invalid());
            }
            i += 1;
        }
        let pre = i > 0;
        s = &s[i..];
        // (\.[0-9]*)?: a fraction stops gaining precision on overflow, never fails.
        let (mut f, mut scale, mut post) = (0u64, 1f64, false);
        if s.first() == Some(&b'.') {
            s = &s[1..];
            let mut i = 0;
            let mut overflow = false;
            while i < s.len() && s[i].is_ascii_digit() {
                if !overflow {
                    if f > (LIMIT - 1) / 10 {
                        overflow = true;
                    } else {
                        let y = f * 10 + u64::from(s[i] - b'0');
                        if y > LIMIT {
                            overflow = true;
                        } else {
                            f = y;
                            scale *= 10.0;
                        }
                    }
                }
                i += 1;
            }
            post = i > 0;
            s = &s[i..];
        }
        if !pre && !post {
            return Err(invalid());
        }
        // The unit: everything up to the next `.` or digit.
        let i = s
            .iter()
            .position(|&c| c == b'.' || c.is_ascii_digit())
            .unwrap_or(s.len());
        if i == 0 {
            bail!("time: missing unit in duration {orig:?}");
        }
        let unit_text = String::from_utf8_lossy(&s[..i]);
        let Some(unit) = duration_unit(&unit_text) else {
            bail!("time: unknown unit {unit_text:?} in duration {orig:?}");
        };
        s = &s[i..];
        if v > LIMIT / unit {
            return Err(invalid());
        }
        v *= unit;
        if f > 0 {
            // Go: float64 keeps fractions of hours nanosecond-accurate.
            #[allow(
                clippy::cast_precision_loss,
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss
            )]
            let part = (f as f64 * (unit as f64 / scale)) as u64;
            v = v.wrapping_add(part);
            if v > LIMIT {
                return Err(invalid());
            }
        }
        // Wrapping, as Go's uint64 arithmetic does (d and v are each at most 2^63).
        d = d.wrapping_add(v);
        if d > LIMIT {
            return Err(invalid());
        }
    }
    if neg {
        // d ≤ 2^63: its negation fits.
        return Ok((-i128::from(d)) as i64);
    }
    i64::try_from(d).map_err(|_| invalid())
}

/// `time.parse_duration_ns(d)`.
pub(super) fn parse_duration_ns(args: &[Value]) -> Result<Value> {
    Ok(Value::from(parse_go_duration(string_arg(args, 0)?)?))
}

/// Argument `i` as an integer (OPA: "operand N must be integer number").
fn int_arg(args: &[Value], i: usize) -> Result<i64> {
    match args.get(i) {
        Some(v @ Value::Number(_)) => v
            .as_i64()
            .map_err(|_| anyhow::anyhow!("operand {} must be integer number but got {v}", i + 1)),
        Some(other) => bail!(
            "operand {} must be number but got {}",
            i + 1,
            type_name(other)
        ),
        None => bail!("missing operand {}", i + 1),
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(y: i128, m: i128, d: i128) -> i128 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The proleptic Gregorian date of a day since 1970-01-01 (`civil_from_days`).
fn civil_from_days(z: i128) -> (i128, i128, i128) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i128::from(m <= 2), m, d)
}

/// Go's `time.Unix(0, ns).UTC().AddDate(years, months, days).UnixNano()`, refused
/// outside the nanoseconds an int64 holds (as OPA refuses it: "time outside of valid
/// range"). `Date` normalizes: the month wraps into the year, and a day past the
/// month's end runs into the next month.
pub(crate) fn go_add_date(ns: i64, years: i64, months: i64, days: i64) -> Result<i64> {
    const NS: i128 = 1_000_000_000;
    let ns = i128::from(ns);
    let (secs, nanos) = (ns.div_euclid(NS), ns.rem_euclid(NS));
    let (day, in_day) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(day);
    let month0 = (y + i128::from(years)) * 12 + (m - 1) + i128::from(months);
    let (y, m) = (month0.div_euclid(12), month0.rem_euclid(12) + 1);
    let day = days_from_civil(y, m, 1) + (d - 1) + i128::from(days);
    let out = (day * 86_400 + in_day) * NS + nanos;
    i64::try_from(out).map_err(|_| anyhow::anyhow!("time outside of valid range"))
}

/// `time.add_date(ns, years, months, days)`.
pub(super) fn add_date(args: &[Value]) -> Result<Value> {
    let ns = int_arg(args, 0)?;
    let (years, months, days) = (int_arg(args, 1)?, int_arg(args, 2)?, int_arg(args, 3)?);
    Ok(Value::from(go_add_date(ns, years, months, days)?))
}

/// `count(x)` where `x` may be a string (`rewrite` calls it for those only): Go counts
/// a string's runes (`utf8.RuneCountInString`), regorus its UTF-16 units.
pub(super) fn count(args: &[Value]) -> Result<Value> {
    Ok(Value::from(match args.first() {
        Some(Value::String(s)) => s.chars().count(),
        Some(Value::Array(a)) => a.len(),
        Some(Value::Set(s)) => s.len(),
        Some(Value::Object(o)) => o.len(),
        Some(other) => bail!(
            "operand 1 must be one of {{array, object, set, string}} but got {}",
            type_name(other)
        ),
        None => bail!("missing operand 1"),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_gos_with_days_weeks_and_years() {
        let ok = |s: &str| parse_go_duration(s).unwrap();
        // The values OPA 1.20 gives (tests/opa/differential/cases/time.yaml has more).
        assert_eq!(ok("2d"), 172_800_000_000_000);
        assert_eq!(ok("1w"), 604_800_000_000_000);
        assert_eq!(ok("1y"), 31_536_000_000_000_000);
        assert_eq!(ok("1h30m"), 5_400_000_000_000);
        assert_eq!(ok("+5s"), 5_000_000_000);
        assert_eq!(ok("-0"), 0);
        assert_eq!(ok("3\u{b5}s"), 3_000);
        assert_eq!(ok("3\u{3bc}s"), 3_000);
        assert_eq!(ok(".5d"), 43_200_000_000_000);
        assert_eq!(ok("1.d"), 86_400_000_000_000);
        assert_eq!(ok("1d.5h"), 88_200_000_000_000);
        assert_eq!(ok("-1.5d3h"), -140_400_000_000_000);
        assert_eq!(ok("0.0000000001s"), 0);
        assert_eq!(ok("1.0000000009s"), 1_000_000_000);
        assert_eq!(ok("106751d"), 9_223_286_400_000_000_000);
        assert_eq!(ok("2562047h47m16.854775807s"), i64::MAX);
        assert_eq!(ok("-9223372036854775808ns"), i64::MIN);
        for bad in [
            "",
            "1",
            "1dd",
            "1D",
            "1mo",
            ".s",
            "-.s",
            "+",
            "106752d",
            "2562047h47m16.854775808s",
            "9223372036854775808ns",
            "1s 2s",
        ] {
            assert!(parse_go_duration(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn add_date_normalizes_as_go() {
        let t = |text: &str| {
            time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
                .unwrap()
                .unix_timestamp_nanos() as i64
        };
        // Jan 31 + 1 month: Feb 31, i.e. March 3 (OPA 1.20: 1772496000000000000).
        assert_eq!(
            go_add_date(t("2026-01-31T00:00:00Z"), 0, 1, 0).unwrap(),
            1_772_496_000_000_000_000
        );
        // Feb 29 + 1 year: March 1.
        assert_eq!(
            go_add_date(t("2024-02-29T00:00:00Z"), 1, 0, 0).unwrap(),
            1_740_787_200_000_000_000
        );
        // Mar 31 - 1 month: Feb 31 = March 3.
        assert_eq!(
            go_add_date(t("2026-03-31T10:00:00Z"), 0, -1, 0).unwrap(),
            1_772_532_000_000_000_000
        );
        assert_eq!(
            go_add_date(1_795_700_467_123_456_789, 1, 14, 400).unwrap(),
            1_898_689_267_123_456_789
        );
        assert_eq!(
            go_add_date(1_795_700_467_123_456_789, 0, 0, -40_000).unwrap(),
            -1_660_299_532_876_543_211
        );
        assert_eq!(go_add_date(-1, 0, 0, 0).unwrap(), -1);
        assert_eq!(go_add_date(i64::MIN, 0, 0, 0).unwrap(), i64::MIN);
        assert_eq!(
            go_add_date(0, 0, 0, 106_751).unwrap(),
            9_223_286_400_000_000_000
        );
        assert_eq!(
            go_add_date(0, 292, 0, 0).unwrap(),
            9_214_646_400_000_000_000
        );
        assert_eq!(
            go_add_date(0, -292, 0, 0).unwrap(),
            -9_214_560_000_000_000_000
        );
        for (y, m, d) in [(0, 0, 106_752), (293, 0, 0), (-293, 0, 0), (i64::MAX, 0, 0)] {
            assert!(go_add_date(0, y, m, d).is_err(), "{y} {m} {d}");
        }
    }

    #[test]
    fn calendar_round_trips() {
        for day in (-1_000_000..1_000_000).step_by(997) {
            let (y, m, d) = civil_from_days(day);
            assert_eq!(days_from_civil(y, m, d), day);
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
    }

    #[test]
    fn json_text_is_escaped_as_go_does() {
        assert_eq!(
            go_json_escapes("{\"a<\":[\"&>\u{2028}\u{2029}é\"]}"),
            "{\"a\\u003c\":[\"\\u0026\\u003e\\u2028\\u2029é\"]}"
        );
        let marshal = |v: serde_json::Value| json_marshal(&[Value::from(v)]).unwrap();
        assert_eq!(
            marshal(serde_json::json!("é<&>")),
            Value::from("\"é\\u003c\\u0026\\u003e\"")
        );
    }

    #[test]
    fn quote_meta_escapes_globs_specials_only() {
        let q = |s: &str| glob_quote_meta(&[Value::from(s)]).unwrap();
        assert_eq!(q("*.nexus[1]"), Value::from("\\*.nexus\\[1\\]"));
        assert_eq!(
            q("a{b}c?d\\e!f-g,h"),
            Value::from("a\\{b\\}c\\?d\\\\e!f-g,h")
        );
        assert_eq!(q(""), Value::from(""));
    }
}
