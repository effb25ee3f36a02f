//! The policy input document of DESIGN.md, built once per request from what the
//! sidecar has verified: the peer's SPIFFE ID from the handshake, the normalized path
//! (exactly what will be forwarded), the clause, and the execution the request is under.

use std::collections::BTreeMap;

use http::HeaderMap;
use nexus_policy::Value;
use time::OffsetDateTime;

use super::runtime::{Execution, Loaded};
use crate::config::PolicyConfig;
use crate::proxy::normalize::Normalized;

/// The header a plugin may use to name the execution it works under.
pub const EXECUTION_HEADER: &str = "x-nexus-execution";

/// What the proxy knows about a request.
#[derive(Debug)]
pub struct RequestFacts<'a> {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// Who sends the request (inbound: the authenticated peer; outbound: this workload).
    pub source: &'a str,
    /// Who receives it (inbound: this workload; outbound: the expected upstream).
    pub destination: &'a str,
    /// HTTP method.
    pub method: &'a str,
    /// The normalized target.
    pub target: &'a Normalized,
    /// Request headers (only the configured ones are copied).
    pub headers: &'a HeaderMap,
    /// Declared body size, or -1 when the body streams without a declared length.
    pub body_size: i64,
}

/// The clause named by the path: the segment after `after` (default `clauses`).
pub fn clause_of<'a>(segments: &'a [String], after: &str) -> Option<&'a str> {
    let at = segments.iter().position(|s| s == after)?;
    segments.get(at + 1).map(String::as_str)
}

/// A field of the input document (DESIGN.md): bit `self as u32` of a [`Needs`] mask,
/// and the index of its name in [`FIELDS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Direction,
    Source,
    SourceId,
    Destination,
    DestinationId,
    Request,
    Method,
    Path,
    Segments,
    Query,
    Headers,
    BodySize,
    Clause,
    Execution,
    ExecutionId,
    ExecutionPlugin,
    ExecutionClause,
    ExecutionNotAfter,
    ExecutionNotAfterNs,
    Time,
    TimeNs,
}

impl Field {
    /// Whether a key can hold the field and `write_key` writes it: a string, a number
    /// or null (not an object or a list), and not the request's time (`time`, `time_ns`
    /// are unique per request: the cache plan refuses a rule that reads them as values,
    /// so no key holds them).
    fn keyable(self) -> bool {
        !matches!(
            self,
            Field::Source
                | Field::Destination
                | Field::Request
                | Field::Segments
                | Field::Query
                | Field::Headers
                | Field::Execution
                | Field::Time
                | Field::TimeNs
        )
    }
}

/// Each [`Field`], in its order (`every_field_is_named_at_its_bit`), with the object it
/// is in and its name.
const FIELDS: [(Field, &[&str], &str); 21] = [
    (Field::Direction, &[], "direction"),
    (Field::Source, &[], "source"),
    (Field::SourceId, &["source"], "spiffe_id"),
    (Field::Destination, &[], "destination"),
    (Field::DestinationId, &["destination"], "spiffe_id"),
    (Field::Request, &[], "request"),
    (Field::Method, &["request"], "method"),
    (Field::Path, &["request"], "path"),
    (Field::Segments, &["request"], "segments"),
    (Field::Query, &["request"], "query"),
    (Field::Headers, &["request"], "headers"),
    (Field::BodySize, &["request"], "body_size"),
    (Field::Clause, &[], "clause"),
    (Field::Execution, &[], "execution"),
    (Field::ExecutionId, &["execution"], "id"),
    (Field::ExecutionPlugin, &["execution"], "plugin"),
    (Field::ExecutionClause, &["execution"], "clause"),
    (Field::ExecutionNotAfter, &["execution"], "not_after"),
    (Field::ExecutionNotAfterNs, &["execution"], "not_after_ns"),
    (Field::Time, &[], "time"),
    (Field::TimeNs, &[], "time_ns"),
];

/// The names of [`FIELDS`] as regorus strings, made once: a key is a reference count,
/// not an allocation, per request.
fn key(field: Field) -> Value {
    static KEYS: std::sync::LazyLock<Vec<Value>> = std::sync::LazyLock::new(|| {
        FIELDS
            .iter()
            .map(|(_, _, name)| Value::from(*name))
            .collect()
    });
    KEYS[field as usize].clone()
}

/// The objects of the document, each made from its [`Shape`] in [`Needs`].
#[derive(Clone, Copy)]
enum Shape {
    Root,
    Source,
    Destination,
    Request,
    Execution,
}

/// The object each [`Field`] is in.
fn shape_of(at: &[&str]) -> Shape {
    match at {
        ["source"] => Shape::Source,
        ["destination"] => Shape::Destination,
        ["request"] => Shape::Request,
        ["execution"] => Shape::Execution,
        _ => Shape::Root,
    }
}

/// The parts of the input document a revision's rules can read: the paths its decision
/// cache keys on (`nexus_policy::KeyPlan`, found statically from the compiled rules'
/// references to `input`, and the soundness the cache rests on), plus `time_ns`. A
/// revision the cache cannot key (it reads `input` whole, walks it, indexes it with a
/// variable...) needs the whole document. Fields nobody reads are not built: each is
/// allocations per request (the RFC 3339 time, the query and header maps, the segment
/// list), and leaving them out cannot change a decision that never reads them.
///
/// Worked out once per revision: one bit per [`Field`], and for each object of the
/// document a shape holding its wanted keys in regorus's sorted (frozen) form. A request
/// clones a shape and sets its values in place, which keeps that form: no map is built,
/// sorted and frozen per object per request (a third of the sidecar's added cost with a
/// policy, callgrind).
#[derive(Clone, Debug)]
pub struct Needs {
    mask: u32,
    shapes: std::sync::Arc<[Value; 5]>,
    /// For each path the enforced rule's decision cache keys on, in the plan's order,
    /// the scalar field of the document that path reads; None when some path reads
    /// anything else (an object, a list, a header, a segment) or the rule cannot be
    /// keyed. With it, a request's key is written from the request's facts
    /// (`write_key`) and a cache hit needs no document.
    key_fields: Option<std::sync::Arc<[Field]>>,
}

impl Needs {
    /// The whole document.
    pub fn all() -> Self {
        Self::with_mask((1 << FIELDS.len()) - 1)
    }

    fn with_mask(mask: u32) -> Self {
        let mut shapes: [BTreeMap<Value, Value>; 5] = Default::default();
        for (bit, (_, at, name)) in FIELDS.iter().enumerate() {
            if mask & (1 << bit) != 0 {
                shapes[shape_of(at) as usize].insert(Value::from(*name), Value::Null);
            }
        }
        Self {
            mask,
            shapes: std::sync::Arc::new(shapes.map(Value::from)),
            key_fields: None,
        }
    }

    /// The scalar fields `policy`'s decision cache keys on (`Needs::key_fields`).
    fn key_fields_of(policy: &nexus_policy::Policy) -> Option<std::sync::Arc<[Field]>> {
        let plan = policy.cache_plan().ok()?;
        plan.paths()
            .iter()
            .map(|path| {
                FIELDS.iter().find_map(|(field, at, name)| {
                    let scalar = field.keyable();
                    let same = path.len() == at.len() + 1
                        && path.iter().zip(at.iter().chain(std::iter::once(name))).all(
                            |(step, want)| step.as_string().is_ok_and(|s| s.as_ref() == *want),
                        );
                    (scalar && same).then_some(*field)
                })
            })
            .collect()
    }

    /// Whether a request's cache key can be written from its facts (`write_key`).
    pub fn key_from_facts(&self) -> bool {
        self.key_fields.is_some()
    }

    /// What `policy` and `shadow` (when set) can read, together.
    pub fn of(policy: &nexus_policy::Policy, shadow: Option<&nexus_policy::Policy>) -> Self {
        let mut paths = Vec::new();
        for p in std::iter::once(policy).chain(shadow) {
            let Ok(plan) = p.cache_plan() else {
                return Self::all();
            };
            for path in plan.paths() {
                // A step that is not a field name (an array index) needs everything
                // under the field before it.
                paths.push(
                    path.iter()
                        .map_while(|step| match step {
                            Value::String(name) => Some(name.to_string()),
                            _ => None,
                        })
                        .collect::<Vec<_>>(),
                );
            }
        }
        if paths.iter().any(Vec::is_empty) {
            return Self::all();
        }
        let key_fields = Self::key_fields_of(policy);
        paths.push(vec![nexus_policy::cache::TIME_NS.to_string()]);
        // A field is read when some read path runs through it, or it lies under one.
        let mut mask = 0;
        for (bit, (_, at, name)) in FIELDS.iter().enumerate() {
            let read = paths.iter().any(|read| {
                read.iter()
                    .zip(at.iter().copied().chain(std::iter::once(*name)))
                    .all(|(a, b)| a == b)
            });
            if read {
                mask |= 1 << bit;
            }
        }
        Self {
            key_fields,
            ..Self::with_mask(mask)
        }
    }

    fn wants(&self, field: Field) -> bool {
        self.mask & (1 << field as u32) != 0
    }
}

/// The object `shape` with the fields `needs` wants; each value is made only then.
fn wanted<const N: usize>(
    needs: &Needs,
    shape: Shape,
    fields: [(Field, &dyn Fn() -> Value); N],
) -> Value {
    let mut value = needs.shapes[shape as usize].clone();
    if let Value::Object(object) = &mut value {
        // The shape is shared, so this copies its (sorted) entries once; setting a key
        // the shape has replaces its value and keeps the object frozen.
        let object = std::sync::Arc::make_mut(object);
        for (field, make) in fields {
            if needs.wants(field) {
                object.insert(key(field), make());
            }
        }
    }
    value
}

fn optional(s: Option<&str>) -> Value {
    s.map_or(Value::Null, Value::from)
}

fn execution_value(needs: &Needs, ex: &Execution) -> Value {
    wanted(
        needs,
        Shape::Execution,
        [
            (Field::ExecutionId, &|| Value::from(ex.id.as_str())),
            (Field::ExecutionPlugin, &|| Value::from(ex.plugin.as_str())),
            (Field::ExecutionClause, &|| Value::from(ex.clause.as_str())),
            (Field::ExecutionNotAfter, &|| {
                Value::from(ex.not_after.as_str())
            }),
            (Field::ExecutionNotAfterNs, &|| {
                Value::from(super::runtime::ns_i64(ex.ends_unix_nanos))
            }),
        ],
    )
}

/// What a request's input is made from besides its facts: the clause its path names,
/// the execution it names or belongs to, and the time of the decision.
#[derive(Clone, Copy, Debug)]
pub struct Resolved<'a> {
    /// The segment after `clause_after_segment`.
    pub clause: Option<&'a str>,
    /// The id in `x-nexus-execution`, if sent.
    named: Option<&'a str>,
    /// The execution found for it (named, or the open one of this plugin and clause).
    execution: Option<&'a Execution>,
    now: OffsetDateTime,
}

impl Resolved<'_> {
    /// The execution id the records carry: the one found, or the one named.
    pub fn execution_id(&self) -> Option<String> {
        self.execution
            .map(|e| e.id.clone())
            .or(self.named.map(String::from))
    }

    /// `input.time_ns`.
    pub fn time_ns(&self) -> i64 {
        super::runtime::ns_i64(self.now.unix_timestamp_nanos())
    }
}

/// Finds the clause and execution of a request at `now`.
pub fn resolve<'a>(
    facts: &RequestFacts<'a>,
    config: &PolicyConfig,
    loaded: &'a Loaded,
    now: OffsetDateTime,
) -> Resolved<'a> {
    let clause = clause_of(&facts.target.segments, &config.clause_after_segment);
    let named = facts
        .headers
        .get(EXECUTION_HEADER)
        .and_then(|v| v.to_str().ok());
    let execution = loaded.execution_for(named, facts.source, clause, now.unix_timestamp_nanos());
    Resolved {
        clause,
        named,
        execution,
        now,
    }
}

/// Writes the decision cache key of the request's input document without making the
/// document: for each of `needs`' key fields (`Needs::key_from_facts`; false and
/// nothing written without them), the value the document has there, encoded as the
/// cache encodes that value. The same bytes as `nexus_policy::cache::key_of` on the
/// document (`input_props`: `the_key_from_facts_is_the_documents`), so a hit is the
/// decision the document would get.
pub fn write_key(
    facts: &RequestFacts<'_>,
    resolved: &Resolved<'_>,
    needs: &Needs,
    out: &mut Vec<u8>,
) -> bool {
    use nexus_policy::KeyPart::{Int, Null, Str, Undefined};
    use nexus_policy::cache::encode_part;
    let Some(fields) = &needs.key_fields else {
        return false;
    };
    // The document's `execution`: the execution found, `{"id": named}` for an unknown
    // named one, or null; a field of the last two but `id` is undefined.
    let ex = resolved.execution;
    for field in fields.iter() {
        let part = match field {
            Field::Direction => Str(facts.direction),
            Field::SourceId => Str(facts.source),
            Field::DestinationId => Str(facts.destination),
            Field::Method => Str(facts.method),
            Field::Path => Str(&facts.target.path),
            Field::BodySize => Int(facts.body_size),
            Field::Clause => resolved.clause.map_or(Null, Str),
            Field::ExecutionId => match (ex, resolved.named) {
                (Some(ex), _) => Str(&ex.id),
                (None, Some(id)) => Str(id),
                (None, None) => Undefined,
            },
            Field::ExecutionPlugin => ex.map_or(Undefined, |ex| Str(&ex.plugin)),
            Field::ExecutionClause => ex.map_or(Undefined, |ex| Str(&ex.clause)),
            Field::ExecutionNotAfter => ex.map_or(Undefined, |ex| Str(&ex.not_after)),
            Field::ExecutionNotAfterNs => ex.map_or(Undefined, |ex| {
                Int(super::runtime::ns_i64(ex.ends_unix_nanos))
            }),
            // Not key fields (`Field::keyable`): nothing is looked up.
            _ => return false,
        };
        encode_part(part, out);
    }
    true
}

/// Builds the input document; also returns the clause and execution id for records.
pub fn build(
    facts: &RequestFacts<'_>,
    config: &PolicyConfig,
    loaded: &Loaded,
    now: OffsetDateTime,
) -> (Value, Option<String>, Option<String>) {
    let resolved = resolve(facts, config, loaded, now);
    let input = document(facts, config, loaded, &resolved);
    (
        input,
        resolved.clause.map(String::from),
        resolved.execution_id(),
    )
}

/// The input document of a request (DESIGN.md), with the fields `loaded.needs` wants.
/// It is built as a regorus `Value` directly: it is made once per request, and going
/// through `serde_json` would allocate it twice.
pub fn document(
    facts: &RequestFacts<'_>,
    config: &PolicyConfig,
    loaded: &Loaded,
    resolved: &Resolved<'_>,
) -> Value {
    let segments = &facts.target.segments;
    let Resolved {
        clause,
        named,
        execution,
        now,
    } = *resolved;
    let needs = &loaded.needs;
    let execution_doc = || match (execution, named) {
        (Some(ex), _) => execution_value(needs, ex),
        // Named but unknown: the policy sees the id it cannot find.
        (None, Some(id)) => {
            Value::from(BTreeMap::from([(key(Field::ExecutionId), Value::from(id))]))
        }
        (None, None) => Value::Null,
    };
    let headers = || {
        let mut headers = BTreeMap::new();
        for name in &config.input_headers {
            if let Some(value) = facts
                .headers
                .get(name.as_str())
                .and_then(|v| v.to_str().ok())
            {
                headers.insert(Value::from(name.as_str()), Value::from(value));
            }
        }
        Value::from(headers)
    };
    let query = || {
        Value::from(
            facts
                .target
                .query
                .iter()
                .map(|(k, values)| {
                    let values: Vec<Value> =
                        values.iter().map(|v| Value::from(v.as_str())).collect();
                    (Value::from(k.as_str()), Value::from(values))
                })
                .collect::<BTreeMap<Value, Value>>(),
        )
    };
    let segments_value = || {
        Value::from(
            segments
                .iter()
                .map(|s| Value::from(s.as_str()))
                .collect::<Vec<_>>(),
        )
    };
    wanted(
        needs,
        Shape::Root,
        [
            (Field::Direction, &|| Value::from(facts.direction)),
            (Field::Source, &|| {
                wanted(
                    needs,
                    Shape::Source,
                    [(Field::SourceId, &|| Value::from(facts.source))],
                )
            }),
            (Field::Destination, &|| {
                wanted(
                    needs,
                    Shape::Destination,
                    [(Field::DestinationId, &|| Value::from(facts.destination))],
                )
            }),
            (Field::Request, &|| {
                wanted(
                    needs,
                    Shape::Request,
                    [
                        (Field::Method, &|| Value::from(facts.method)),
                        (Field::Path, &|| Value::from(facts.target.path.as_str())),
                        (Field::Segments, &segments_value),
                        (Field::Query, &query),
                        (Field::Headers, &headers),
                        (Field::BodySize, &|| Value::from(facts.body_size)),
                    ],
                )
            }),
            (Field::Clause, &|| optional(clause)),
            (Field::Execution, &execution_doc),
            (Field::Time, &|| Value::from(nexus_audit::rfc3339_ms(now))),
            (Field::TimeNs, &|| {
                Value::from(super::runtime::ns_i64(now.unix_timestamp_nanos()))
            }),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clause_is_the_segment_after() {
        let segs: Vec<String> = ["api", "clauses", "c-1", "rain"].map(String::from).to_vec();
        assert_eq!(clause_of(&segs, "clauses"), Some("c-1"));
        let segs: Vec<String> = ["clauses"].map(String::from).to_vec();
        assert_eq!(clause_of(&segs, "clauses"), None);
    }

    #[test]
    fn every_field_is_named_at_its_bit() {
        for (i, (field, _, name)) in FIELDS.iter().enumerate() {
            assert_eq!(*field as usize, i, "{name} is out of order in FIELDS");
            assert_eq!(key(*field), Value::from(*name));
        }
        assert_eq!(Needs::all().mask, (1 << 21) - 1);
    }

    #[test]
    fn time_format() {
        let t = OffsetDateTime::from_unix_timestamp_nanos(1_795_683_921_123_456_789).unwrap();
        assert_eq!(nexus_audit::rfc3339_ms(t), "2026-11-26T09:05:21.123Z");
    }

    #[test]
    fn the_document_is_the_one_of_design_md() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("p.rego"),
            // Reads `input` whole: the sidecar builds every field (Needs::all).
            "package nexus.authz\n\ndecision := {\"allow\": true, \"reasons\": [], \"seen\": input}\n",
        )
        .unwrap();
        let state = dir.path().join(".state.json");
        std::fs::write(
            &state,
            r#"{"executions": {"ex-1": {"plugin": "spiffe://td/p", "clause": "c-1", "not_after": "2026-11-26T10:00:00Z"}}}"#,
        )
        .unwrap();
        let config: PolicyConfig = toml::from_str(&format!(
            "dir = {:?}\nstate_file = {:?}\n",
            dir.path().to_string_lossy(),
            state.to_string_lossy()
        ))
        .unwrap();
        let runtime =
            crate::policy::PolicyRuntime::new(config.clone(), crate::metrics::Metrics::new());
        let loaded = runtime.build().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("content-type", "application/json".parse().unwrap());
        headers.insert("x-secret", "not copied".parse().unwrap());
        let uri: http::Uri = "/clauses/c-1/rain?from=2026&from=2027&x".parse().unwrap();
        let mut h1 = HeaderMap::new();
        h1.insert("host", "data".parse().unwrap());
        let target = crate::proxy::normalize::normalize(
            &uri,
            &h1,
            http::Version::HTTP_11,
            &crate::proxy::normalize::NormalizeLimits::default(),
        )
        .unwrap();
        let facts = RequestFacts {
            direction: "inbound",
            source: "spiffe://td/p",
            destination: "spiffe://td/d",
            method: "GET",
            target: &target,
            headers: &headers,
            body_size: 0,
        };
        let now = OffsetDateTime::from_unix_timestamp(1_795_683_921).unwrap();
        let (input, clause, execution) = build(&facts, &config, &loaded, now);
        let expected = serde_json::json!({
            "direction": "inbound",
            "source": {"spiffe_id": "spiffe://td/p"},
            "destination": {"spiffe_id": "spiffe://td/d"},
            "request": {
                "method": "GET",
                "path": "/clauses/c-1/rain",
                "segments": ["clauses", "c-1", "rain"],
                "query": {"from": ["2026", "2027"], "x": [""]},
                "headers": {"content-type": "application/json"},
                "body_size": 0,
            },
            "clause": "c-1",
            "execution": {"id": "ex-1", "plugin": "spiffe://td/p", "clause": "c-1", "not_after": "2026-11-26T10:00:00Z", "not_after_ns": 1_795_687_200_000_000_000_i64},
            "time": "2026-11-26T09:05:21.000Z",
            "time_ns": 1_795_683_921_000_000_000_i64,
        });
        assert_eq!(input, Value::from(expected));
        assert_eq!(clause.as_deref(), Some("c-1"));
        assert_eq!(execution.as_deref(), Some("ex-1"));

        // A revision that reads a few fields gets those (and time_ns) only, and decides
        // the same as on the whole document.
        std::fs::write(
            dir.path().join("p.rego"),
            "package nexus.authz\n\nimport rego.v1\n\ndefault decision := {\"allow\": false, \"reasons\": [\"no\"]}\n\ndecision := {\"allow\": true, \"reasons\": [input.execution.id]} if {\n\tinput.request.method == \"GET\"\n\tinput.request.query.from[1] == \"2027\"\n}\n",
        )
        .unwrap();
        let mut loaded = runtime.build().unwrap();
        let (input, _, _) = build(&facts, &config, &loaded, now);
        let expected = serde_json::json!({
            "request": {"method": "GET", "query": {"from": ["2026", "2027"], "x": [""]}},
            "execution": {"id": "ex-1"},
            "time_ns": 1_795_683_921_000_000_000_i64,
        });
        assert_eq!(input, Value::from(expected));
        let reduced = loaded.policy.evaluate(input);
        loaded.needs = Needs::all();
        let whole = loaded
            .policy
            .evaluate(build(&facts, &config, &loaded, now).0);
        assert_eq!(
            (reduced.allow, &reduced.reasons),
            (true, &std::sync::Arc::from(["ex-1".to_string()]))
        );
        assert_eq!(
            (whole.allow, &whole.reasons),
            (reduced.allow, &reduced.reasons)
        );
    }
}
