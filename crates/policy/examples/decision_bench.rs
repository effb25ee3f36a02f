//! Benchmark of one policy decision: the reference policy (policies/nexus/authz) with
//! 10,000 bindings and 1,000 open executions, asked for compiled (the default: nexus's
//! own evaluator where it takes the rule, else regorus's RVM), compiled with the RVM
//! only, and interpreted, on one thread and on every core; each row names the mode the
//! revision actually runs in (see docs/opa-compatibility.md, "Evaluation modes").
//! "evaluate" is the evaluation alone; "cold" a decision through the cache for a request
//! it has not seen (a new path), the cache (the sidecar's default bounds) first filled
//! with decisions asked for once, as a flood of unique requests leaves it: a full cache
//! keeps a miss only for a key asked for more often than the oldest entry's, so "cold"
//! misses are not kept, and "cold, kept" ones (each request asked for once before,
//! outside the clock) are, with an eviction (the row says the share kept); "cold, key
//! from the values" is a miss as the sidecar takes it for a revision nexus's own
//! evaluator decides: the key written from the request's values, looked up, and the
//! miss decided under it (`Policy::decide_parts`); "warm" is a decision cache hit (docs/policy-cache.md), with the key
//! made from the input document (`Policy::evaluate_cached`) or, as the sidecar looks a
//! hit up, written from the request's values without a document (`Policy::cached_parts`,
//! the values taken out of the document before the clock starts). Each input document is
//! made just before the clock starts, as the sidecar builds a request's input just
//! before deciding, and holds what the sidecar builds for the revision: the fields its
//! rules read (`BENCH_INPUT=full`: every field of DESIGN.md's document).
//! Run in release:
//!
//!     cargo run --release -p nexus-policy --example decision_bench [-- ITERATIONS]
//!
//! Prints µs per decision (p50, p99) and decisions per second (on one thread: of the
//! time spent deciding; on every core: of the run, with inputs made beforehand). `BENCH_MODE=compiled`
//! (or `interpreted`) and `BENCH_ONLY=warm` (or `cold`, `evaluate`) run one kind of row.

use std::path::Path;
use std::time::{Duration, Instant};

use nexus_policy::{
    Bundle, CacheLimits, DecisionCache, EvalMode, KeyPart, Module, Policy, PolicyOptions, Value,
};

const BINDINGS: usize = 10_000;
const EXECUTIONS: usize = 1_000;
/// 2030-01-01T00:00:00Z and 2026-11-26T09:41:07.123Z in unix nanoseconds.
const NOT_AFTER_NS: i64 = 1_893_456_000_000_000_000;
const TIME_NS: i64 = 1_795_686_067_123_000_000;

fn plugin(i: usize) -> String {
    format!("spiffe://nexus.local/ns/plugins/sa/model-{i}")
}

fn bundle(root: &Path) -> Bundle {
    let path = std::env::var("BENCH_POLICY")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| root.join("policies/nexus/authz/authz.rego"));
    let text = std::fs::read_to_string(path).expect("policy file");
    let mut bindings = serde_json::Map::new();
    for i in 0..BINDINGS {
        bindings.insert(
            plugin(i),
            serde_json::json!([format!("c-{i}"), format!("c-{}", i + 1)]),
        );
    }
    let data = serde_json::json!({"nexus": {"bindings": bindings, "allowed_methods": ["GET", "HEAD"], "public_paths": ["/healthz"]}});
    Bundle::from_modules(
        vec![Module {
            path: "authz.rego".into(),
            text,
        }],
        Value::from(data),
    )
}

fn runtime() -> Value {
    let mut executions = serde_json::Map::new();
    for i in 0..EXECUTIONS {
        let id = format!("ex-{i}");
        executions.insert(
            id.clone(),
            serde_json::json!({"id": id, "plugin": plugin(i * 10), "clause": format!("c-{}", i * 10), "not_after": "2030-01-01T00:00:00Z", "not_after_ns": NOT_AFTER_NS}),
        );
    }
    Value::from(serde_json::json!({"nexus": {"executions": executions, "revoked": {}}}))
}

fn input(n: usize) -> Value {
    input_at(n, None)
}

/// The paths of the input the revision reads (its cache plan's, and `time_ns`), set once
/// in `main`; None when the document is made whole (`BENCH_INPUT=full`, or a policy the
/// cache cannot key).
static READ: std::sync::OnceLock<Option<Vec<Vec<Value>>>> = std::sync::OnceLock::new();

/// `v` with only the fields some read path runs through or lies under, as the sidecar
/// builds a request's document (`sidecar/src/policy/input.rs`, `Needs`): a field nobody
/// reads is not made. A path's steps after its first that is not a name (an index) keep
/// all of the field before it, as there.
fn trim(v: &Value, read: &[&[Value]]) -> Value {
    if read
        .iter()
        .any(|p| p.first().is_none_or(|s| s.as_string().is_err()))
    {
        return v.clone();
    }
    let Value::Object(fields) = v else {
        return v.clone();
    };
    let mut kept = std::collections::BTreeMap::new();
    for (k, child) in fields.iter() {
        let under: Vec<&[Value]> = read
            .iter()
            .filter(|p| p.first() == Some(k))
            .map(|p| &p[1..])
            .collect();
        if !under.is_empty() {
            kept.insert(k.clone(), trim(child, &under));
        }
    }
    Value::from(kept)
}

/// Input `n`, with `/r{unique}` at the end of its path when given: the decision cache
/// keys on the path, so every such input misses it (as a request crafted to miss would).
fn input_at(n: usize, unique: Option<usize>) -> Value {
    // Alternate allowed (bound + open execution) and denied (bound, no execution) requests.
    let i = (n * 7919) % EXECUTIONS;
    let allowed = n.is_multiple_of(2);
    let (clause, execution) = if allowed {
        (
            format!("c-{}", i * 10),
            serde_json::json!({"id": format!("ex-{i}"), "plugin": plugin(i * 10), "clause": format!("c-{}", i * 10), "not_after": "2030-01-01T00:00:00Z", "not_after_ns": NOT_AFTER_NS}),
        )
    } else {
        (format!("c-{}", i * 10 + 1), serde_json::Value::Null)
    };
    let whole = Value::from(serde_json::json!({
        "direction": "inbound",
        "source": {"spiffe_id": plugin(i * 10)},
        "destination": {"spiffe_id": "spiffe://nexus.local/ns/data/sa/hazard-api"},
        "request": {"method": "GET", "path": match unique { Some(u) => format!("/clauses/{clause}/rainfall/r{u}"), None => format!("/clauses/{clause}/rainfall") }, "segments": ["clauses", clause, "rainfall"], "query": {}, "headers": {}, "body_size": 0},
        "clause": clause,
        "execution": execution,
        "time": "2026-11-26T09:41:07.123Z",
        // A distinct time per input (as requests have), all before not_after.
        "time_ns": TIME_NS + n as i64,
    }));
    match READ.get() {
        Some(Some(read)) => trim(&whole, &read.iter().map(Vec::as_slice).collect::<Vec<_>>()),
        _ => whole,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

struct Run {
    /// Of the measured misses, the share kept in the cache.
    kept: f64,
    p50: Duration,
    p99: Duration,
    allow_p50: Duration,
    deny_p50: Duration,
    rate: f64,
}

/// How decisions are taken in a run.
#[derive(Clone, Copy, PartialEq)]
enum Through {
    /// `Policy::evaluate`: no cache.
    Evaluate,
    /// The cache, full, each input new to it (a path it has not seen: every call
    /// misses, and pays the key and the lookup on top of the evaluation; admission
    /// refuses to keep a key asked for once in a full cache, so no insert).
    Cold,
    /// As `Cold`, each input asked for once before (outside the clock), so that the
    /// measured miss is kept: the insert and an eviction on top.
    ColdKept,
    /// As `Cold`, the key written from the values at its paths and the miss decided
    /// under it (`Policy::decide_parts`: the sidecar's path for a revision nexus's own
    /// evaluator decides; the document, made before the clock, is handed over).
    ColdFacts,
    /// The cache, every input already in it.
    Warm,
    /// The cache, every input already in it, the key written from the values at its
    /// paths (the sidecar's lookup from a request's facts).
    WarmFacts,
}

impl Through {
    /// A run of misses (each input new to a full cache).
    fn is_cold(self) -> bool {
        matches!(self, Through::Cold | Through::ColdKept | Through::ColdFacts)
    }
}

/// A value at a key path, taken out of an input before the clock starts.
enum Part {
    Undefined,
    Null,
    Str(String),
    Int(i64),
}

/// What the sidecar knows of an input before it builds a document: `time_ns` and the
/// values at the cache plan's paths.
struct Facts {
    time_ns: i64,
    parts: Vec<Part>,
}

fn facts_of(policy: &Policy, input: &Value) -> Facts {
    let plan = policy.cache_plan().expect("a keyed policy");
    let at = |path: &[Value]| path.iter().fold(input.clone(), |v, step| v[step].clone());
    let parts = plan
        .paths()
        .iter()
        .map(|path| match at(path) {
            Value::Undefined => Part::Undefined,
            Value::Null => Part::Null,
            Value::String(s) => Part::Str(s.to_string()),
            Value::Number(n) => Part::Int(n.as_i64().expect("an integer")),
            other => panic!("not a scalar at a key path: {other}"),
        })
        .collect();
    let time_ns = input["time_ns"].as_i64().expect("time_ns");
    Facts { time_ns, parts }
}

/// Writes the key of `facts` as the sidecar writes a request's.
fn write_key(facts: &Facts, out: &mut Vec<u8>) -> bool {
    for part in &facts.parts {
        let part = match part {
            Part::Undefined => KeyPart::Undefined,
            Part::Null => KeyPart::Null,
            Part::Str(s) => KeyPart::Str(s),
            Part::Int(i) => KeyPart::Int(*i),
        };
        nexus_policy::cache::encode_part(part, out);
    }
    true
}

fn decide_from_facts(policy: &Policy, cache: &DecisionCache, facts: &Facts) -> bool {
    let d = policy
        .cached_parts(cache, facts.time_ns, |out| write_key(facts, out))
        .expect("a warm run missed the cache");
    d.decision.allow
}

/// A miss decided from the facts, on the document `v` (made before).
fn decide_miss_from_facts(policy: &Policy, cache: &DecisionCache, facts: &Facts, v: Value) -> bool {
    let d = policy
        .decide_parts(cache, facts.time_ns, |out| write_key(facts, out), || v)
        .expect("a keyed policy");
    assert!(!d.cached, "a cold run hit the cache");
    d.decision.allow
}

/// The sidecar's default bounds (10,000 decisions, 8 MiB): a cold run fills the cache
/// and then evicts, as a sidecar under a flood of new requests does.
fn limits() -> CacheLimits {
    CacheLimits::default()
}

/// Fills `cache` to its bounds with decisions asked for once (as a flood of unique
/// requests leaves it), so that cold runs measure a full cache.
fn prefill(policy: &Policy, cache: &DecisionCache, inputs: &[Value]) {
    for i in 0..2 * limits().max_entries {
        let _ = policy.evaluate_cached(cache, input_at(i % inputs.len(), Some(1_000_000_000 + i)));
    }
}

fn decide(policy: &Policy, cache: &DecisionCache, v: Value, through: Through) -> bool {
    match through {
        Through::Evaluate => policy.evaluate(v).allow,
        Through::ColdFacts => unreachable!("a miss from the facts: decide_miss_from_facts"),
        Through::Cold | Through::ColdKept => {
            let d = policy.evaluate_cached(cache, v);
            assert!(!d.cached, "a cold run hit the cache");
            d.decision.allow
        }
        Through::Warm | Through::WarmFacts => {
            let d = policy.evaluate_cached(cache, v);
            assert!(d.cached, "a warm run missed the cache");
            d.decision.allow
        }
    }
}

fn run(policy: &Policy, inputs: &[Value], iterations: usize, through: Through) -> Run {
    let cache = DecisionCache::new(limits());
    // Warm up (and fill the cache for the warm run).
    for v in inputs {
        let _ = policy.evaluate_cached(&cache, v.clone());
    }
    if through.is_cold() {
        prefill(policy, &cache, inputs);
    }
    let check = std::env::var_os("BENCH_POLICY").is_none();
    let facts: Vec<Facts> = if through == Through::WarmFacts {
        inputs.iter().map(|v| facts_of(policy, v)).collect()
    } else {
        Vec::new()
    };
    let mut samples = Vec::with_capacity(iterations);
    let mut allowed = Vec::with_capacity(iterations / 2);
    let mut denied = Vec::with_capacity(iterations / 2);
    let mut kept = 0usize;
    for n in 0..iterations {
        // Cold: an input no decision was cached for, made just before the clock starts
        // (as the sidecar builds a request's input just before deciding) and freed
        // after it stops.
        // Evaluate and warm: the same input as a kept one, also made just before the
        // clock starts (a document picked from a thousand made long before is walked
        // from memory the processor no longer holds close: about 0.13 µs more per hit).
        let v = match through {
            Through::Cold | Through::ColdKept | Through::ColdFacts => {
                input_at(n % inputs.len(), Some(n))
            }
            Through::Evaluate | Through::Warm => input(n % inputs.len()),
            Through::WarmFacts => Value::Undefined,
        };
        if through == Through::ColdKept {
            // Asked for once: refused (the doorkeeper takes it); when that first ask is
            // already kept (a doorkeeper false positive), the input is not measured.
            let refused = cache.stats().refused;
            let first = policy.evaluate_cached(&cache, v.clone());
            assert!(!first.cached, "a cold run hit the cache");
            if cache.stats().refused == refused {
                continue;
            }
        }
        let refused = cache.stats().refused;
        let keep = v.clone();
        let miss_facts = (through == Through::ColdFacts).then(|| facts_of(policy, &v));
        let t = Instant::now();
        let allow = if through == Through::WarmFacts {
            decide_from_facts(policy, &cache, &facts[n % inputs.len()])
        } else if let Some(f) = &miss_facts {
            decide_miss_from_facts(policy, &cache, f, v)
        } else {
            decide(policy, &cache, v, through)
        };
        let elapsed = t.elapsed();
        drop(keep);
        if cache.stats().refused == refused {
            kept += 1;
        }
        samples.push(elapsed);
        if allow {
            allowed.push(elapsed)
        } else {
            denied.push(elapsed)
        }
        if check {
            assert_eq!(
                allow,
                (n % inputs.len()).is_multiple_of(2),
                "unexpected decision for input {n}"
            );
        }
    }
    // Time spent deciding (making the inputs is not).
    let total: Duration = samples.iter().sum();
    samples.sort();
    allowed.sort();
    denied.sort();
    Run {
        kept: kept as f64 / samples.len() as f64,
        p50: percentile(&samples, 0.5),
        p99: percentile(&samples, 0.99),
        allow_p50: if allowed.is_empty() {
            Duration::ZERO
        } else {
            percentile(&allowed, 0.5)
        },
        deny_p50: if denied.is_empty() {
            Duration::ZERO
        } else {
            percentile(&denied, 0.5)
        },
        rate: samples.len() as f64 / total.as_secs_f64(),
    }
}

fn run_parallel(
    policy: &Policy,
    inputs: &[Value],
    iterations: usize,
    threads: usize,
    through: Through,
) -> f64 {
    let cache = DecisionCache::new(limits());
    for v in inputs {
        let _ = policy.evaluate_cached(&cache, v.clone());
    }
    let cache = &cache;
    let per_thread = iterations / threads;
    let cold = through.is_cold();
    if cold {
        prefill(policy, cache, inputs);
    }
    let unique: Vec<Value> = if cold {
        (0..per_thread * threads)
            .map(|n| input_at(n % inputs.len(), Some(n)))
            .collect()
    } else {
        Vec::new()
    };
    // Each asked for once, and measured only if that ask was refused (see `run`).
    let unique: Vec<Value> = if through == Through::ColdKept {
        unique
            .into_iter()
            .filter(|v| {
                let refused = cache.stats().refused;
                let _ = policy.evaluate_cached(cache, v.clone());
                cache.stats().refused > refused
            })
            .collect()
    } else {
        unique
    };
    let per_thread = if cold {
        unique.len() / threads
    } else {
        per_thread
    };
    let unique = &unique;
    let facts: Vec<Facts> = match through {
        Through::WarmFacts => inputs.iter().map(|v| facts_of(policy, v)).collect(),
        Through::ColdFacts => unique.iter().map(|v| facts_of(policy, v)).collect(),
        _ => Vec::new(),
    };
    let facts = &facts;
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                for n in 0..per_thread {
                    if through == Through::WarmFacts {
                        let _ = decide_from_facts(policy, cache, &facts[(n + t) % inputs.len()]);
                        continue;
                    }
                    let v = if cold {
                        unique[t * per_thread + n].clone()
                    } else {
                        inputs[(n + t) % inputs.len()].clone()
                    };
                    if through == Through::ColdFacts {
                        let f = &facts[t * per_thread + n];
                        let _ = decide_miss_from_facts(policy, cache, f, v);
                        continue;
                    }
                    let _ = decide(policy, cache, v, through);
                }
            });
        }
    });
    (per_thread * threads) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let iterations: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let bundle = bundle(&root);
    let runtime = runtime();
    // Each input document holds what the sidecar would build for this revision: the
    // fields its rules read (BENCH_INPUT=full: every field of DESIGN.md's document).
    let read = match Policy::compile(&bundle, &runtime, PolicyOptions::default()) {
        Ok(p) if std::env::var("BENCH_INPUT").as_deref() != Ok("full") => {
            p.cache_plan().ok().map(|plan| {
                let mut read = plan.paths().to_vec();
                read.push(vec![Value::from(nexus_policy::cache::TIME_NS)]);
                read
            })
        }
        _ => None,
    };
    eprintln!(
        "input document: {}",
        if read.is_some() {
            "the fields the revision reads (as the sidecar builds it)"
        } else {
            "every field"
        }
    );
    let _ = READ.set(read);
    let inputs: Vec<Value> = (0..1000).map(input).collect();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "reference policy, {BINDINGS} bindings, {EXECUTIONS} open executions, {iterations} decisions"
    );
    println!();
    println!(
        "| mode asked | mode run | decision | compile ms | p50 µs | p99 µs | p50 allowed µs | p50 denied µs | decisions/s (1 thread) | decisions/s ({threads} threads) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let only = std::env::var("BENCH_MODE").ok();
    for (name, mode, native) in [
        ("compiled (default)", EvalMode::Compiled, true),
        ("compiled, RVM only (native off)", EvalMode::Compiled, false),
        ("interpreted", EvalMode::Interpreted, false),
    ] {
        if only.as_deref().is_some_and(|m| !name.contains(m)) {
            continue;
        }
        let t = Instant::now();
        let options = PolicyOptions {
            mode,
            native,
            // Generous: the limit is not what is measured (and valgrind runs slowly).
            eval_timeout: Duration::from_secs(10),
            ..PolicyOptions::default()
        };
        let policy = Policy::compile(&bundle, &runtime, options).expect("compiles");
        let compile = t.elapsed();
        // The mode the revision actually runs in, and why when it is not the one asked.
        let ran = policy.report().summary();
        if let Some(why) = policy.report().native_summary() {
            eprintln!("{why}");
        }
        let ran = ran.split(" (checked").next().unwrap_or(&ran).to_string();
        match policy.cache_plan() {
            Ok(plan) => eprintln!("decision cache key: {}", plan.describe().join(", ")),
            Err(why) => eprintln!("decision cache off for this policy: {why}"),
        }
        // The cold rows last: their caches' churn leaves the heap scattered, and a hit
        // through a document made after them walks it 0.1-0.3 µs slower.
        for (label, through) in [
            ("evaluate (no cache)", Through::Evaluate),
            ("warm (cache hit)", Through::Warm),
            ("warm (cache hit, key from the values)", Through::WarmFacts),
            ("cold (cache miss)", Through::Cold),
            ("cold (cache miss, key from the values)", Through::ColdFacts),
            ("cold (cache miss, kept)", Through::ColdKept),
        ] {
            if through != Through::Evaluate && policy.cache_plan().is_err() {
                continue;
            }
            // BENCH_ONLY=warm (or cold, evaluate): one kind of row, e.g. under a profiler.
            if std::env::var("BENCH_ONLY").is_ok_and(|o| !label.starts_with(o.as_str())) {
                continue;
            }
            let n = if mode == EvalMode::Interpreted
                && !matches!(through, Through::Warm | Through::WarmFacts)
            {
                iterations / 5
            } else {
                iterations
            };
            // Kept misses replace the prefilled entries (asked for once); past the
            // cache's half they would meet entries asked for as often, and be refused.
            let n = if through == Through::ColdKept {
                n.min(limits().max_entries / 2)
            } else {
                n
            };
            let r = run(&policy, &inputs, n, through);
            let par = run_parallel(&policy, &inputs, n, threads, through);
            // A cold row says how many of its misses the full cache kept.
            let label = if through.is_cold() {
                format!("{label}; {:.0}% kept", r.kept * 100.0)
            } else {
                label.to_string()
            };
            println!(
                "| {name} | {ran} | {label} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} | {:.0} |",
                compile.as_secs_f64() * 1e3,
                r.p50.as_secs_f64() * 1e6,
                r.p99.as_secs_f64() * 1e6,
                r.allow_p50.as_secs_f64() * 1e6,
                r.deny_p50.as_secs_f64() * 1e6,
                r.rate,
                par
            );
        }
    }
}
