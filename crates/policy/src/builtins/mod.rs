//! Builtins OPA has and regorus 0.14 lacks, added to every engine nexus creates through
//! regorus's extension mechanism (the interpreter looks extensions up by their full
//! dotted path before its own builtins). regorus's RVM does not call extensions, so a
//! revision whose modules call one is evaluated by the interpreter (`Policy::compile`).
//!
//! Each builtin follows OPA 1.20's Go implementation (checked case by case against OPA
//! in `tests/opa/differential`). An error (a malformed token, a bad key, a wrong
//! argument type) makes the call undefined, as OPA does by default (without
//! `--strict-builtin-errors`) and as regorus does for its own builtins.

mod crypto;
mod encoding;
mod fixes;
mod go;
mod jwt;
mod keys;
mod net;
mod sprintf;
mod x509;
pub mod yaml;

use std::collections::BTreeSet;

use anyhow::{Result, bail};
use regorus::{Engine, Value};

use crate::bundle::Bundle;
use crate::error::PolicyError;

/// A builtin nexus adds: its dotted name, its arity and its implementation.
struct Builtin {
    name: &'static str,
    nargs: u8,
    f: fn(&[Value]) -> Result<Value>,
}

const BUILTINS: &[Builtin] = &[
    Builtin {
        name: "crypto.md5",
        nargs: 1,
        f: crypto::md5,
    },
    Builtin {
        name: "crypto.sha1",
        nargs: 1,
        f: crypto::sha1,
    },
    Builtin {
        name: "crypto.sha256",
        nargs: 1,
        f: crypto::sha256,
    },
    Builtin {
        name: "crypto.hmac.md5",
        nargs: 2,
        f: crypto::hmac_md5,
    },
    Builtin {
        name: "crypto.hmac.sha1",
        nargs: 2,
        f: crypto::hmac_sha1,
    },
    Builtin {
        name: "crypto.hmac.sha256",
        nargs: 2,
        f: crypto::hmac_sha256,
    },
    Builtin {
        name: "crypto.hmac.sha512",
        nargs: 2,
        f: crypto::hmac_sha512,
    },
    Builtin {
        name: "crypto.hmac.equal",
        nargs: 2,
        f: crypto::hmac_equal,
    },
    Builtin {
        name: "crypto.x509.parse_certificates",
        nargs: 1,
        f: x509::parse_certificates,
    },
    Builtin {
        name: "crypto.x509.parse_and_verify_certificates",
        nargs: 1,
        f: x509::parse_and_verify_certificates,
    },
    Builtin {
        name: "io.jwt.decode",
        nargs: 1,
        f: jwt::decode,
    },
    Builtin {
        name: "io.jwt.decode_verify",
        nargs: 2,
        f: jwt::decode_verify,
    },
    Builtin {
        name: "io.jwt.verify_hs256",
        nargs: 2,
        f: jwt::verify_hs256,
    },
    Builtin {
        name: "io.jwt.verify_hs384",
        nargs: 2,
        f: jwt::verify_hs384,
    },
    Builtin {
        name: "io.jwt.verify_hs512",
        nargs: 2,
        f: jwt::verify_hs512,
    },
    Builtin {
        name: "io.jwt.verify_rs256",
        nargs: 2,
        f: jwt::verify_rs256,
    },
    Builtin {
        name: "io.jwt.verify_rs384",
        nargs: 2,
        f: jwt::verify_rs384,
    },
    Builtin {
        name: "io.jwt.verify_rs512",
        nargs: 2,
        f: jwt::verify_rs512,
    },
    Builtin {
        name: "io.jwt.verify_ps256",
        nargs: 2,
        f: jwt::verify_ps256,
    },
    Builtin {
        name: "io.jwt.verify_ps384",
        nargs: 2,
        f: jwt::verify_ps384,
    },
    Builtin {
        name: "io.jwt.verify_ps512",
        nargs: 2,
        f: jwt::verify_ps512,
    },
    Builtin {
        name: "io.jwt.verify_es256",
        nargs: 2,
        f: jwt::verify_es256,
    },
    Builtin {
        name: "io.jwt.verify_es384",
        nargs: 2,
        f: jwt::verify_es384,
    },
    Builtin {
        name: "io.jwt.verify_es512",
        nargs: 2,
        f: jwt::verify_es512,
    },
    Builtin {
        name: "io.jwt.verify_eddsa",
        nargs: 2,
        f: jwt::verify_eddsa,
    },
    Builtin {
        name: "net.cidr_intersects",
        nargs: 2,
        f: net::cidr_intersects,
    },
    Builtin {
        name: "net.cidr_contains_matches",
        nargs: 2,
        f: net::cidr_contains_matches,
    },
    Builtin {
        name: "net.cidr_contains",
        nargs: 2,
        f: net::cidr_contains,
    },
    Builtin {
        name: "net.cidr_merge",
        nargs: 1,
        f: net::cidr_merge,
    },
    // Replacements of regorus builtins that differ from OPA, and OPA builtins regorus
    // lacks (`fixes`).
    Builtin {
        name: "regex.template_match",
        nargs: 4,
        f: fixes::template_match,
    },
    Builtin {
        name: "sprintf",
        nargs: 2,
        f: sprintf::sprintf,
    },
    Builtin {
        name: "time.parse_rfc3339_ns",
        nargs: 1,
        f: fixes::parse_rfc3339_ns,
    },
    Builtin {
        name: "json.unmarshal",
        nargs: 1,
        f: fixes::json_unmarshal,
    },
    Builtin {
        name: "to_number",
        nargs: 1,
        f: fixes::to_number,
    },
    Builtin {
        name: "upper",
        nargs: 1,
        f: fixes::upper,
    },
    Builtin {
        name: "lower",
        nargs: 1,
        f: fixes::lower,
    },
    Builtin {
        name: "urlquery.decode",
        nargs: 1,
        f: fixes::urlquery_decode,
    },
    Builtin {
        name: "array.flatten",
        nargs: 1,
        f: fixes::array_flatten,
    },
    // Go's standard library, as OPA inherits it (`go`).
    Builtin {
        name: "json.marshal",
        nargs: 1,
        f: go::json_marshal,
    },
    Builtin {
        name: "json.marshal_with_options",
        nargs: 2,
        f: go::json_marshal_with_options,
    },
    Builtin {
        name: "glob.quote_meta",
        nargs: 1,
        f: go::glob_quote_meta,
    },
    Builtin {
        name: "time.parse_duration_ns",
        nargs: 1,
        f: go::parse_duration_ns,
    },
    Builtin {
        name: "time.add_date",
        nargs: 4,
        f: go::add_date,
    },
    // YAML 1.1, as go-yaml v2 reads it (`yaml`).
    Builtin {
        name: "yaml.unmarshal",
        nargs: 1,
        f: yaml_unmarshal,
    },
    Builtin {
        name: "yaml.is_valid",
        nargs: 1,
        f: yaml_is_valid,
    },
    // Helpers of `rewrite` (names no OPA policy uses).
    Builtin {
        name: "__nexus_member",
        nargs: 2,
        f: fixes::member,
    },
    Builtin {
        name: "__nexus_member_kv",
        nargs: 3,
        f: fixes::member_kv,
    },
    Builtin {
        name: "__nexus_iter",
        nargs: 1,
        f: fixes::iter,
    },
    Builtin {
        name: "__nexus_count",
        nargs: 1,
        f: go::count,
    },
];

fn yaml_unmarshal(args: &[Value]) -> Result<Value> {
    yaml::to_value(string_arg(args, 0)?)
}

fn yaml_is_valid(args: &[Value]) -> Result<Value> {
    Ok(Value::from(yaml::to_json(string_arg(args, 0)?).is_ok()))
}

/// The names of the builtins nexus adds to regorus.
pub fn names() -> impl Iterator<Item = &'static str> {
    BUILTINS.iter().map(|b| b.name)
}

/// Registers every nexus builtin on `engine`.
pub fn register(engine: &mut Engine) -> Result<(), PolicyError> {
    for b in BUILTINS {
        let (name, f) = (b.name, b.f);
        engine
            .add_extension(
                name.to_string(),
                b.nargs,
                Box::new(move |args: Vec<Value>| match f(&args) {
                    Ok(v) => Ok(v),
                    Err(e) => {
                        tracing::debug!(builtin = name, error = %e, "builtin error: the call is undefined");
                        Ok(Value::Undefined)
                    }
                }),
            )
            .map_err(|e| PolicyError::RegoUnlocated(format!("registering {name}: {e:#}")))?;
    }
    Ok(())
}

/// The builtins the RVM calls back into nexus for, with their arity: every nexus
/// builtin (regorus's RVM calls no extension, but it suspends on a registered
/// host-await name and nexus answers).
pub(crate) fn host_calls() -> impl Iterator<Item = (&'static str, usize)> {
    BUILTINS.iter().map(|b| (b.name, usize::from(b.nargs)))
}

/// Calls nexus builtin `name`: its value, or undefined on an error (as OPA does without
/// strict builtin errors) or for an unknown name.
pub(crate) fn call(name: &str, args: &[Value]) -> Value {
    match BUILTINS.iter().find(|b| b.name == name) {
        Some(b) if args.len() == usize::from(b.nargs) => match (b.f)(args) {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!(builtin = name, error = %e, "builtin error: the call is undefined");
                Value::Undefined
            }
        },
        _ => Value::Undefined,
    }
}

/// The nexus builtins that `bundle`'s decision modules call (tests are not evaluated
/// by the sidecar). A module that does not parse calls none: compiling it reports that.
pub fn called_by(bundle: &Bundle) -> BTreeSet<&'static str> {
    let mut called = BTreeSet::new();
    for module in &bundle.modules {
        let functions = crate::compat::called_functions(&module.path, &module.text);
        called.extend(names().filter(|n| functions.contains(*n)));
    }
    called
}

/// Argument `i` as a string (OPA: "operand N must be string").
fn string_arg(args: &[Value], i: usize) -> Result<&str> {
    match args.get(i) {
        Some(Value::String(s)) => Ok(s.as_ref()),
        Some(other) => bail!(
            "operand {} must be string but got {}",
            i + 1,
            type_name(other)
        ),
        None => bail!("missing operand {}", i + 1),
    }
}

/// OPA's name of a value's type, for error messages.
fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Set(_) => "set",
        Value::Object(_) => "object",
        Value::Undefined => "undefined",
    }
}

/// Lowercase hex, as Go's `hex.EncodeToString`.
fn hex(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(bytes)
}

/// An object from string keys.
fn object<const N: usize>(fields: [(&str, Value); N]) -> Value {
    let mut obj = Value::new_object();
    if let Ok(map) = obj.as_object_mut() {
        for (k, v) in fields {
            map.insert(Value::from(k), v);
        }
    }
    obj
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_registers_once() {
        let mut engine = Engine::new();
        register(&mut engine).unwrap();
        let unique: BTreeSet<_> = names().collect();
        assert_eq!(unique.len(), BUILTINS.len());
    }

    #[test]
    fn errors_make_the_call_undefined() {
        let mut engine = Engine::new();
        register(&mut engine).unwrap();
        engine
            .add_policy(
                "t.rego".into(),
                "package t\n\nx := io.jwt.decode(input.t)\n\ny if not io.jwt.decode(input.t)\n"
                    .into(),
            )
            .unwrap();
        engine.set_input(Value::from(serde_json::json!({"t": "not-a-token"})));
        assert_eq!(
            engine.eval_rule("data.t.x".into()).unwrap(),
            Value::Undefined
        );
        assert_eq!(
            engine.eval_rule("data.t.y".into()).unwrap(),
            Value::Bool(true)
        );
    }
}
