//! Property tests of the policy input builder (a bounded number of cases;
//! `PROPTEST_CASES` raises it): over normalized targets, headers, callers and execution
//! ids, the document says exactly what the proxy verified and forwards:
//!
//! - `request.path`, `segments` and `query` are the normalized target's (what is
//!   forwarded), `clause` the segment after `clauses`;
//! - only the configured headers are copied;
//! - `execution` comes from the gateway's state, never from the request's claims: a named
//!   id yields that execution's own plugin, clause and expiry (for the policy to compare),
//!   an unknown id yields the id alone, and an unnamed one only an unexpired execution of
//!   this very plugin and clause;
//! - `time` is the evaluation time in RFC 3339 with milliseconds;
//! - the decision cache key written from a request's facts (`input::write_key`, which
//!   lets a cache hit skip the document) is byte for byte the key of its document, for
//!   every revision whose key reads only scalar fields, and no other revision gets one.

use std::sync::OnceLock;

use http::{HeaderMap, HeaderValue, Uri, Version};
use proptest::prelude::*;
use time::OffsetDateTime;

use super::input::{EXECUTION_HEADER, RequestFacts, build, document, resolve, write_key};
use super::runtime::Loaded;
use crate::config::PolicyConfig;
use crate::proxy::normalize::{NormalizeLimits, normalize};

/// Known executions: (id, plugin, clause, not_after); NOW is between the two times.
const EXECUTIONS: &[(&str, &str, &str, &str)] = &[
    ("ex-1", "spiffe://td/p", "c-1", "2026-11-26T10:00:00Z"),
    ("ex-2", "spiffe://td/p", "c-2", "2026-11-26T09:00:00Z"),
    ("ex-3", "spiffe://td/q", "c-1", "2026-11-26T10:00:00Z"),
];
const NOW: i64 = 1_795_683_921; // 2026-11-26T09:05:21Z

fn fixture() -> &'static (tempfile::TempDir, PolicyConfig, Loaded) {
    static FIXTURE: OnceLock<(tempfile::TempDir, PolicyConfig, Loaded)> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("p.rego"),
            // Reads `input` whole, so the sidecar builds every field (input::Needs).
            "package nexus.authz\n\ndecision := {\"allow\": true, \"reasons\": [], \"seen\": input}\n",
        )
        .expect("write policy");
        let executions: serde_json::Map<String, serde_json::Value> = EXECUTIONS
            .iter()
            .map(|(id, plugin, clause, not_after)| {
                (
                    (*id).to_string(),
                    serde_json::json!({"plugin": plugin, "clause": clause, "not_after": not_after}),
                )
            })
            .collect();
        let state = dir.path().join(".state.json");
        std::fs::write(
            &state,
            serde_json::json!({ "executions": executions }).to_string(),
        )
        .expect("write state");
        let config: PolicyConfig = toml::from_str(&format!(
            "dir = {:?}\nstate_file = {:?}\ninput_headers = [\"content-type\", \"x-nexus-execution\"]\n",
            dir.path().to_string_lossy(),
            state.to_string_lossy()
        ))
        .expect("config");
        let runtime =
            crate::policy::PolicyRuntime::new(config.clone(), crate::metrics::Metrics::new());
        let loaded = runtime.build().expect("the fixture policy loads");
        (dir, config, loaded)
    })
}

/// Revisions keyed on different fields (over the fixture's executions), each with
/// whether its key reads only scalar fields.
fn keyed() -> &'static Vec<(tempfile::TempDir, PolicyConfig, Loaded, bool)> {
    static KEYED: OnceLock<Vec<(tempfile::TempDir, PolicyConfig, Loaded, bool)>> = OnceLock::new();
    KEYED.get_or_init(|| {
        let reference = include_str!("../../../policies/nexus/authz/authz.rego");
        // Every scalar field, the time compared (a bounded entry) and read as text.
        let scalars = "package nexus.authz\n\nimport rego.v1\n\ndecision := {\"allow\": input.time_ns < input.execution.not_after_ns, \"reasons\": [input.direction, input.source.spiffe_id, input.destination.spiffe_id, input.request.method, input.request.path, input.request.body_size, input.clause, input.execution.id, input.execution.plugin, input.execution.clause, input.execution.not_after]}\n";
        // No time compared (entries not bounded by it); a stored time read as a value.
        let time_value = "package nexus.authz\n\ndecision := {\"allow\": input.request.body_size < 10, \"reasons\": [input.execution.not_after_ns, input.direction]}\n";
        // An object, a header, a segment: the document is needed.
        let objects = [
            "package nexus.authz\n\ndecision := {\"allow\": true, \"reasons\": [input.source]}\n",
            "package nexus.authz\n\ndecision := {\"allow\": true, \"reasons\": [input.request.headers[\"content-type\"]]}\n",
            "package nexus.authz\n\ndecision := {\"allow\": true, \"reasons\": [input.request.segments[1]]}\n",
        ];
        let (_, base, _) = fixture();
        let mut out = Vec::new();
        for (text, scalar) in [(reference, true), (scalars, true), (time_value, true)]
            .into_iter()
            .chain(objects.map(|t| (t, false)))
        {
            let dir = tempfile::tempdir().expect("tempdir");
            std::fs::write(dir.path().join("p.rego"), text).expect("write policy");
            let config = PolicyConfig {
                dir: dir.path().to_path_buf(),
                ..base.clone()
            };
            let runtime =
                crate::policy::PolicyRuntime::new(config.clone(), crate::metrics::Metrics::new());
            let loaded = runtime.build().expect("a keyed fixture policy loads");
            assert!(
                loaded.policy.cache_plan().is_ok(),
                "{text}: {:?}",
                loaded.policy.cache_plan()
            );
            out.push((dir, config, loaded, scalar));
        }
        out
    })
}

fn segment() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "clauses", "c-1", "c-2", "c-3", "rain", "..", ".", "%2e%2e", "x%20y", "CLAUSES", "",
    ])
}

fn cases() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// An inbound request from `source` to the fixture's data workload.
fn inbound<'a>(
    source: &'a str,
    method: &'a str,
    target: &'a crate::proxy::normalize::Normalized,
    headers: &'a HeaderMap,
    body_size: i64,
) -> RequestFacts<'a> {
    RequestFacts {
        direction: "inbound",
        source,
        destination: "spiffe://td/d",
        method,
        target,
        headers,
        body_size,
    }
}

/// `target` as the proxy normalizes it (None: refused, as the proxy refuses it).
fn normalized(target: &str) -> Option<crate::proxy::normalize::Normalized> {
    let uri = target.parse::<Uri>().ok()?;
    let mut host = HeaderMap::new();
    host.insert(http::header::HOST, HeaderValue::from_static("data"));
    normalize(&uri, &host, Version::HTTP_11, &NormalizeLimits::default()).ok()
}

fn get<'a>(doc: &'a serde_json::Value, path: &str) -> &'a serde_json::Value {
    doc.pointer(path).unwrap_or(&serde_json::Value::Null)
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn the_input_says_what_was_verified_and_forwarded(
        segments in prop::collection::vec(segment(), 0..6),
        query in prop::sample::select(vec!["", "?from=1&from=2", "?a", "?x=%20&y=+"]),
        source in prop::sample::select(vec!["spiffe://td/p", "spiffe://td/q", "spiffe://td/r"]),
        named in prop::option::of(prop::sample::select(vec!["ex-1", "ex-2", "ex-3", "ex-404", ""])),
        content_type in prop::option::of(Just("application/json")),
        secret in prop::option::of(Just("do not copy")),
    ) {
        let (_, config, loaded) = fixture();
        let target = format!("/{}{query}", segments.join("/"));
        let Some(normalized) = normalized(&target) else { return Ok(()) };
        let mut headers = HeaderMap::new();
        if let Some(v) = content_type {
            headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static(v));
        }
        if let Some(v) = secret {
            headers.insert("x-secret", HeaderValue::from_static(v));
        }
        if let Some(id) = named {
            headers.insert(EXECUTION_HEADER, HeaderValue::from_static(id));
        }
        let facts = inbound(source, "GET", &normalized, &headers, 0);
        let now = OffsetDateTime::from_unix_timestamp(NOW).expect("time");
        let (input, clause, execution) = build(&facts, config, loaded, now);
        let doc: serde_json::Value =
            serde_json::from_str(&input.to_json_str().expect("the input is JSON")).expect("JSON");

        prop_assert_eq!(get(&doc, "/request/path"), &serde_json::json!(normalized.path));
        prop_assert_eq!(get(&doc, "/request/segments"), &serde_json::json!(normalized.segments));
        prop_assert_eq!(get(&doc, "/request/query"), &serde_json::json!(normalized.query));
        prop_assert_eq!(get(&doc, "/source/spiffe_id"), &serde_json::json!(source));
        let expected_clause = normalized
            .segments
            .iter()
            .position(|s| s == "clauses")
            .and_then(|at| normalized.segments.get(at + 1));
        prop_assert_eq!(clause.as_ref(), expected_clause);
        prop_assert_eq!(get(&doc, "/clause"), &serde_json::json!(expected_clause));
        let copied = get(&doc, "/request/headers").as_object().cloned().unwrap_or_default();
        prop_assert!(copied.keys().all(|k| config.input_headers.contains(k)), "{copied:?}");
        prop_assert!(!copied.contains_key("x-secret"));
        prop_assert_eq!(get(&doc, "/time"), &serde_json::json!("2026-11-26T09:05:21.000Z"));

        let ex = get(&doc, "/execution");
        match named {
            Some(id) => {
                prop_assert_eq!(get(ex, "/id"), &serde_json::json!(id));
                match EXECUTIONS.iter().find(|e| e.0 == id) {
                    Some((_, plugin, clause, not_after)) => {
                        prop_assert_eq!(get(ex, "/plugin"), &serde_json::json!(plugin));
                        prop_assert_eq!(get(ex, "/clause"), &serde_json::json!(clause));
                        prop_assert_eq!(get(ex, "/not_after"), &serde_json::json!(not_after));
                    }
                    None => prop_assert_eq!(ex.as_object().map(|o| o.len()), Some(1), "{}", ex),
                }
            }
            None => {
                if ex.is_null() {
                    prop_assert!(execution.is_none());
                } else {
                    prop_assert_eq!(get(ex, "/plugin"), &serde_json::json!(source));
                    prop_assert_eq!(get(ex, "/clause"), &serde_json::json!(expected_clause));
                    prop_assert_eq!(get(ex, "/not_after"), &serde_json::json!("2026-11-26T10:00:00Z"));
                    prop_assert_eq!(execution.as_deref(), get(ex, "/id").as_str());
                }
                // An unexpired execution of this plugin and clause is found.
                let open = EXECUTIONS.iter().any(|(_, p, c, n)| {
                    *p == source && Some(&c.to_string()) == expected_clause && n.starts_with("2026-11-26T10")
                });
                prop_assert_eq!(open, !ex.is_null());
            }
        }
    }

    #[test]
    fn the_key_from_facts_is_the_documents(
        clause in prop::option::of(prop::sample::select(vec!["c-1", "c-2", "c-3", ""])),
        tail in prop::sample::select(vec!["", "/rain", "/a%20b"]),
        method in prop::sample::select(vec!["GET", "HEAD", "POST"]),
        source in prop::sample::select(vec!["spiffe://td/p", "spiffe://td/q", "spiffe://td/r"]),
        named in prop::option::of(prop::sample::select(vec!["ex-1", "ex-2", "ex-3", "ex-404", ""])),
        body_size in prop::sample::select(vec![-1_i64, 0, 7, i64::MAX]),
        at in 0_i64..7200,
    ) {
        let target = match clause {
            Some(c) => format!("/clauses/{c}{tail}"),
            None => format!("/data{tail}"),
        };
        let Some(normalized) = normalized(&target) else { return Ok(()) };
        let mut headers = HeaderMap::new();
        headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        if let Some(id) = named {
            headers.insert(EXECUTION_HEADER, HeaderValue::from_static(id));
        }
        let facts = inbound(source, method, &normalized, &headers, body_size);
        // Around the fixture's expiries (an execution open at one time, closed later).
        let now = OffsetDateTime::from_unix_timestamp(NOW - 3600 + at).expect("time");
        for (_, config, loaded, scalar) in keyed() {
            prop_assert_eq!(loaded.needs.key_from_facts(), *scalar);
            let resolved = resolve(&facts, config, loaded, now);
            let mut written = Vec::new();
            let wrote = write_key(&facts, &resolved, &loaded.needs, &mut written);
            prop_assert_eq!(wrote, *scalar);
            if !scalar {
                prop_assert!(written.is_empty());
                continue;
            }
            let plan = loaded.policy.cache_plan().expect("keyed");
            let input = document(&facts, config, loaded, &resolved);
            prop_assert_eq!(
                written,
                nexus_policy::cache::key_of(plan, &input),
                "{:?} on {}",
                plan.describe(),
                input.to_json_str().unwrap_or_default()
            );
        }
    }
}
