//! The decision cache never answers differently from an evaluation: over generated
//! inputs (identities, clauses, executions, methods, paths, headers, request times
//! around every stored time bound, in any order) and data revisions (executions closed,
//! workloads revoked), a decision taken through one shared cache equals the decision of
//! the same policy evaluated uncached. Bounded case counts and a fixed seed: seconds in
//! CI.

use std::path::Path;

use nexus_policy::{
    Bundle, CacheLimits, DecisionCache, EvalMode, Module, Policy, PolicyOptions, Value,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

const PLUGINS: [&str; 3] = [
    "spiffe://nexus.local/ns/plugins/sa/flood-model",
    "spiffe://nexus.local/ns/plugins/sa/quake-model",
    "spiffe://partner.example/ns/plugins/sa/partner-model",
];
const DEST: [&str; 2] = [
    "spiffe://nexus.local/ns/data/sa/hazard-api",
    "spiffe://nexus.local/ns/data/sa/other-api",
];
const CLAUSES: [&str; 3] = ["c-flood-17", "c-flood-18", "c-quake-3"];
/// Stored times (not_after_ns) and request times straddling them.
const ENDS: [i64; 3] = [1_000, 2_000, 3_000];
const TIMES: [i64; 9] = [0, 999, 1_000, 1_001, 1_999, 2_000, 2_500, 3_000, 9_999];

fn reference() -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies/nexus/authz/authz.rego"),
    )
    .expect("reference policy")
}

/// A policy reading more of the input: a computed index, headers walked with `some`,
/// and a time comparison with a value of the input itself.
const HEADERS_POLICY: &str = r#"package nexus.authz

import rego.v1

decision := {"allow": true, "reasons": ["ok"]} if {
	some i
	input.request.segments[i] == "clauses"
	input.request.segments[i + 1] in data.nexus.bindings[input.source.spiffe_id]
	some name, value in input.request.headers
	name == "x-grant"
	value == "yes"
	input.execution.not_after_ns > input.time_ns
} else := {"allow": false, "reasons": ["no"]}
"#;

/// A policy nexus's own evaluator takes, whose cache key is coarser than what it reads
/// (`input.request` whole, and `input.request.method` in it) and whose key paths come
/// in another order than the evaluator meets them: a miss hands the values it looked
/// up for the key to the evaluation, and each must land on its own input path.
const NATIVE_POLICY: &str = r#"package nexus.authz

import rego.v1

decision := {"allow": true, "reasons": [concat(" ", [input.request.method, input.clause, input.execution.id])]} if {
	input.source.spiffe_id != input.destination.spiffe_id
	input.request.method in {"GET", "HEAD"}
	count(input.request) > 3
	input.clause in data.nexus.bindings[input.source.spiffe_id]
	input.execution.not_after_ns > input.time_ns
} else := {"allow": false, "reasons": [input.destination.spiffe_id, input.request.path]}
"#;

fn bundle(text: &str) -> Bundle {
    Bundle::from_modules(
        vec![Module {
            path: "authz.rego".into(),
            text: text.into(),
        }],
        Value::from(serde_json::json!({"nexus": {
            "bindings": {PLUGINS[0]: ["c-flood-17", "c-flood-18"], PLUGINS[2]: ["c-flood-17"]},
            "allowed_methods": ["GET", "HEAD"],
            "public_paths": ["/healthz"],
        }})),
    )
}

/// Runtime data: executions `ex-i` (plugin, clause, end) and revoked workloads.
#[derive(Clone, Debug)]
struct Runtime {
    executions: Vec<(usize, usize, usize)>,
    revoked: Vec<usize>,
}

impl Runtime {
    fn value(&self) -> Value {
        let mut execs = serde_json::Map::new();
        for (i, (p, c, e)) in self.executions.iter().enumerate() {
            execs.insert(
                format!("ex-{i}"),
                serde_json::json!({"id": format!("ex-{i}"), "plugin": PLUGINS[*p], "clause": CLAUSES[*c], "not_after_ns": ENDS[*e]}),
            );
        }
        let revoked: serde_json::Map<String, serde_json::Value> = self
            .revoked
            .iter()
            .map(|p| {
                (
                    PLUGINS[*p].to_string(),
                    serde_json::json!({"reason": "test"}),
                )
            })
            .collect();
        Value::from(serde_json::json!({"nexus": {"executions": execs, "revoked": revoked}}))
    }
}

#[derive(Clone, Debug)]
struct Request {
    source: usize,
    dest: usize,
    method: &'static str,
    clause: Option<usize>,
    execution: Option<(usize, Option<usize>)>,
    tail: &'static str,
    header: Option<&'static str>,
    time: usize,
}

impl Request {
    fn input(&self) -> Value {
        let clause = self.clause.map(|c| CLAUSES[c]);
        let path = match clause {
            Some(c) => format!("/clauses/{c}/{}", self.tail),
            None => format!("/{}", self.tail),
        };
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        // The execution as the sidecar sends it: id only, or the whole record with a
        // (possibly different) end.
        let execution = match self.execution {
            None => serde_json::Value::Null,
            Some((id, None)) => serde_json::json!({"id": format!("ex-{id}")}),
            Some((id, Some(end))) => {
                serde_json::json!({"id": format!("ex-{id}"), "not_after_ns": ENDS[end]})
            }
        };
        let mut headers = serde_json::Map::new();
        if let Some(h) = self.header {
            headers.insert("x-grant".into(), h.into());
        }
        Value::from(serde_json::json!({
            "direction": "inbound",
            "source": {"spiffe_id": PLUGINS[self.source]},
            "destination": {"spiffe_id": DEST[self.dest]},
            "request": {"method": self.method, "path": path, "segments": segments, "query": {}, "headers": headers, "body_size": 0},
            "clause": clause,
            "execution": execution,
            "time": "ignored by the policies under test",
            "time_ns": TIMES[self.time],
        }))
    }
}

fn runtime() -> impl Strategy<Value = Runtime> {
    (
        prop::collection::vec((0..3usize, 0..3usize, 0..3usize), 0..5),
        prop::collection::vec(0..3usize, 0..2),
    )
        .prop_map(|(mut executions, revoked)| {
            // ex-0 (and ex-1) are for the bound pair most requests are generated
            // for, with a generated end: allows that expire.
            for (i, e) in executions.iter_mut().enumerate().take(2) {
                e.0 = 0;
                e.1 = i % 2;
            }
            Runtime {
                executions,
                revoked,
            }
        })
}

fn request() -> impl Strategy<Value = Request> {
    (
        (
            0..3usize,
            0..2usize,
            prop::sample::select(vec!["GET", "HEAD", "POST", "get"]),
        ),
        (
            prop::option::of(0..3usize),
            prop::option::of((0..5usize, prop::option::of(0..3usize))),
        ),
        (
            prop::sample::select(vec!["rainfall", "healthz", "", "x/y"]),
            prop::option::of(prop::sample::select(vec!["yes", "no"])),
            0..TIMES.len(),
        ),
    )
        .prop_map(
            |((source, dest, method), (clause, execution), (tail, header, time))| Request {
                source,
                dest,
                method,
                clause,
                execution,
                tail,
                header,
                time,
            },
        )
}

fn check(text: &str, mode: EvalMode, cases: u32) {
    let bundle = bundle(text);
    let base = Policy::compile(
        &bundle,
        &Runtime {
            executions: vec![],
            revoked: vec![],
        }
        .value(),
        PolicyOptions {
            mode,
            ..PolicyOptions::default()
        },
    )
    .expect("compiles");
    assert!(base.cache_plan().is_ok(), "{:?}", base.cache_plan());
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]),
    );
    let hits = std::sync::atomic::AtomicU64::new(0);
    runner
        .run(
            &(
                prop::collection::vec(runtime(), 1..3),
                prop::collection::vec((0..2usize, request()), 1..40),
                prop::collection::vec(0..TIMES.len(), 1..4),
            ),
            |(runtimes, requests, shifts)| {
                // Data revisions of one policy revision: each its own generation.
                let policies: Vec<Policy> = runtimes
                    .iter()
                    .map(|r| base.with_runtime_data(&bundle, &r.value()).expect("data"))
                    .collect();
                // A small cache, so evictions happen too.
                let cache = DecisionCache::new(CacheLimits {
                    max_entries: 16,
                    max_bytes: 64 * 1024,
                });
                // Every request again at other times (time may also step back), in
                // generated order: hits across time bounds and data revisions.
                let passes = std::iter::once(0).chain(shifts.iter().copied());
                for shift in passes {
                    for (which, req) in &requests {
                        let policy = &policies[which % policies.len()];
                        let mut req = req.clone();
                        req.time = (req.time + shift) % TIMES.len();
                        let input = req.input();
                        // The lookup alone (a hit answered where it is, a miss taken
                        // elsewhere) agrees with the lookup of `evaluate_cached`, and
                        // a miss found by it is not counted twice.
                        let misses = cache.stats().misses;
                        let looked_up = policy.cached(&cache, &input);
                        prop_assert_eq!(cache.stats().misses, misses);
                        let cached = policy.evaluate_cached(&cache, input.clone());
                        let fresh = policy.evaluate(input.clone());
                        prop_assert_eq!(looked_up.is_some(), cached.cached);
                        if let Some(hit) = &looked_up {
                            prop_assert!(hit.cached);
                            prop_assert_eq!(&hit.decision, &fresh);
                        }
                        prop_assert_eq!(
                            &cached.decision,
                            &fresh,
                            "input {} (cached: {})",
                            input.to_json_str().unwrap_or_default(),
                            cached.cached
                        );
                        if cached.cached {
                            hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                }
                Ok(())
            },
        )
        .unwrap_or_else(|e| panic!("cached and uncached decisions differ: {e}"));
    // The property must have been exercised on hits, not only on misses.
    assert!(hits.into_inner() > u64::from(cases), "too few cache hits");
}

#[test]
fn cached_decisions_equal_evaluated_ones_reference_policy() {
    check(&reference(), EvalMode::Compiled, 48);
}

#[test]
fn cached_decisions_equal_evaluated_ones_interpreted() {
    check(&reference(), EvalMode::Interpreted, 12);
}

#[test]
fn cached_decisions_equal_evaluated_ones_headers_and_computed_indexes() {
    check(HEADERS_POLICY, EvalMode::Compiled, 48);
}

#[test]
fn cached_decisions_equal_evaluated_ones_native_with_a_coarser_key() {
    let policy = Policy::compile(
        &bundle(NATIVE_POLICY),
        &Runtime {
            executions: vec![],
            revoked: vec![],
        }
        .value(),
        PolicyOptions::default(),
    )
    .expect("compiles");
    // The path under test: nexus's evaluator, with a key that holds `input.request`.
    assert!(
        policy.report().summary().starts_with("native"),
        "{}",
        policy.report().summary()
    );
    assert!(
        policy
            .cache_plan()
            .expect("cached")
            .describe()
            .contains(&"input.request".to_string()),
        "{:?}",
        policy.cache_plan()
    );
    check(NATIVE_POLICY, EvalMode::Compiled, 48);
}
