//! A decision cache that is sound by construction (docs/policy-cache.md).
//!
//! A decision is a function of the input, the data and (through comparisons) the time.
//! The cache keys an entry on exactly what the decision can read:
//! - the values of the input paths the revision's modules refer to, found statically
//!   from the parsed policy (`input.request.path` → the value at `request.path`; a ref
//!   with a computed index, `input.request.segments[i]`, keys the whole
//!   `request.segments`);
//! - the revision (policy and data): every policy or data change makes a new
//!   [`Policy`](crate::Policy) with a new generation, and an entry of another
//!   generation is never served;
//! - the time, only when the policy compares `input.time_ns` directly with a value
//!   stored in the data or the input (`ex.not_after_ns > input.time_ns` with
//!   `ex := data.nexus.executions[...]`): then the decision cannot change before the
//!   earliest such stored number at or after the request's time, and the entry expires
//!   there.
//!
//! A revision the cache cannot key this way (it reads `input` whole, walks it, calls a
//! non-deterministic builtin, uses time in another form, or puts `with input` in a
//! module) is evaluated uncached, and the reason is kept for logs and metrics. Entries
//! are bounded in count and bytes; errors are never cached.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use regorus::Value;
use regorus::unstable::{AssignOp, BoolOp, Expr, Literal, Module as Ast, Query, Rule, RuleHead};

use crate::bundle::Bundle;
use crate::compat::{dotted, location, parse};
use crate::engine::Decision;

/// The input field holding the request's time in unix nanoseconds.
pub const TIME_NS: &str = "time_ns";

/// Builtins whose answer is not a function of their arguments: a policy calling one is
/// never cached. (Time is handled through `input.time_ns`, see the module docs.)
pub(crate) const NON_DETERMINISTIC: &[&str] = &[
    "time.now_ns",
    "rand.intn",
    "uuid.rfc4122",
    "http.send",
    "net.lookup_ip_addr",
    "opa.runtime",
    "io.jwt.decode_verify",
    "crypto.x509.parse_and_verify_certificates",
    "crypto.x509.parse_and_verify_certificates_with_options",
    "trace",
    "print",
];

/// The largest per-thread scratch buffer (a cache key, a joined string) kept for the
/// next decision: one grown past it by a long input is freed, so that a few large
/// requests do not hold memory in every worker thread.
pub(crate) const KEEP_BUFFER: usize = 4096;

/// How a revision's decisions are keyed (computed once per compile).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyPlan {
    /// Input paths whose values form the key (`paths`); private, so that they stay
    /// the ones `shared` was worked out for.
    paths: Vec<Vec<Value>>,
    /// Whether the decision compares `input.time_ns` with stored values (entries
    /// expire at the next such value) rather than not reading the time at all.
    pub time_bounded: bool,
    /// For each path, how many first steps it shares with the path before it (the
    /// key walk starts from there).
    shared: Vec<usize>,
}

impl KeyPlan {
    /// The input paths whose values form the key (no path is a prefix of another).
    pub fn paths(&self) -> &[Vec<Value>] {
        &self.paths
    }

    /// The plan for `paths` (sorted, none a prefix of another).
    pub fn new(paths: Vec<Vec<Value>>, time_bounded: bool) -> Self {
        let shared = std::iter::once(0)
            .chain(
                paths
                    .windows(2)
                    .map(|w| w[0].iter().zip(&w[1]).take_while(|(a, b)| a == b).count()),
            )
            .take(paths.len())
            .collect();
        Self {
            paths,
            time_bounded,
            shared,
        }
    }

    /// The key paths as `input.a.b` text (for logs and `nexusctl policy check`).
    pub fn describe(&self) -> Vec<String> {
        self.paths
            .iter()
            .map(|p| {
                let mut s = String::from("input");
                for step in p {
                    match step.as_string() {
                        Ok(f) => {
                            s.push('.');
                            s.push_str(f);
                        }
                        Err(_) => {
                            s.push_str(&format!("[{}]", step.to_json_str().unwrap_or_default()))
                        }
                    }
                }
                s
            })
            .collect()
    }
}

/// Where a statically found reason to not cache is.
fn at(span: &regorus::unstable::Span, why: &str) -> String {
    format!("{}: {why}", location(span))
}

/// Analyses `bundle`'s modules (every module, not only those the rule reaches: a
/// superset is sound): the key plan, or why the revision cannot be cached.
pub fn plan(bundle: &Bundle) -> Result<KeyPlan, String> {
    let mut asts = Vec::new();
    for m in &bundle.modules {
        match parse(&m.path, &m.text) {
            Some(ast) => asts.push(ast),
            None => return Err(format!("{} does not parse", m.path)),
        }
    }
    let packages: Vec<Vec<String>> = asts
        .iter()
        .filter_map(|a| dotted(&a.package.refr))
        .map(|p| p.split('.').skip(1).map(String::from).collect())
        .collect();
    let mut scan = Scan {
        paths: Vec::new(),
        time_bounded: false,
        packages,
    };
    for ast in &asts {
        scan.module(ast)?;
    }
    // Keep only the shortest of paths that are prefixes of each other: the shorter
    // one's value holds the longer one's.
    let mut paths = scan.paths;
    paths.sort();
    paths.dedup();
    let mut kept: Vec<Vec<Value>> = Vec::new();
    for p in paths {
        if !kept.iter().any(|k| p.starts_with(k)) {
            kept.push(p);
        }
    }
    Ok(KeyPlan::new(kept, scan.time_bounded))
}

struct Scan {
    paths: Vec<Vec<Value>>,
    time_bounded: bool,
    /// Package paths under `data` (rules, whose values are computed, not stored).
    packages: Vec<Vec<String>>,
}

/// Local variables assigned `v := <ref rooted at data or input>` in one query.
type Stored<'a> = HashMap<String, &'a Expr>;

impl Scan {
    fn module(&mut self, ast: &Ast) -> Result<(), String> {
        for import in &ast.imports {
            if dotted(&import.refr).is_some_and(|d| d == "input" || d.starts_with("input.")) {
                match input_path(&import.refr) {
                    Some((path, true)) if !path.is_empty() => self.key(path, &import.span)?,
                    _ => return Err(at(&import.span, "imports `input` whole")),
                }
            }
        }
        for rule in &ast.policy {
            match rule.as_ref() {
                Rule::Spec { head, bodies, .. } => {
                    match head {
                        RuleHead::Compr { refr, assign, .. } => {
                            self.expr(refr, &Stored::new())?;
                            if let Some(a) = assign {
                                self.expr(&a.value, &Stored::new())?;
                            }
                        }
                        RuleHead::Set { refr, key, .. } => {
                            self.expr(refr, &Stored::new())?;
                            if let Some(k) = key {
                                self.expr(k, &Stored::new())?;
                            }
                        }
                        RuleHead::Func {
                            refr, args, assign, ..
                        } => {
                            self.expr(refr, &Stored::new())?;
                            for a in args {
                                self.expr(a, &Stored::new())?;
                            }
                            if let Some(a) = assign {
                                self.expr(&a.value, &Stored::new())?;
                            }
                        }
                    }
                    for body in bodies {
                        if let Some(a) = &body.assign {
                            self.expr(&a.value, &Stored::new())?;
                        }
                        self.query(&body.query)?;
                    }
                }
                Rule::Default {
                    refr, args, value, ..
                } => {
                    self.expr(refr, &Stored::new())?;
                    for a in args {
                        self.expr(a, &Stored::new())?;
                    }
                    self.expr(value, &Stored::new())?;
                }
            }
        }
        Ok(())
    }

    fn query(&mut self, q: &Query) -> Result<(), String> {
        // `v := R` with R a ref into stored data or input: `v.x` is a stored value.
        let mut stored: Stored<'_> = HashMap::new();
        let mut assigned: HashMap<String, usize> = HashMap::new();
        for stmt in &q.stmts {
            if let Literal::Expr { expr, .. } = &stmt.literal
                && let Expr::AssignExpr { op, lhs, rhs, .. } = expr.as_ref()
                && let Expr::Var { value, .. } = lhs.as_ref()
                && let Ok(name) = value.as_string()
            {
                *assigned.entry(name.to_string()).or_default() += 1;
                if *op == AssignOp::ColEq && self.stored_ref(rhs, &Stored::new()) {
                    stored.insert(name.to_string(), rhs.as_ref());
                }
            }
        }
        stored.retain(|name, _| assigned.get(name) == Some(&1));
        for stmt in &q.stmts {
            if let Some(w) = stmt.with_mods.first() {
                return Err(at(
                    &w.span,
                    "`with` in a policy module (the cache cannot key what it replaces)",
                ));
            }
            match &stmt.literal {
                Literal::SomeVars { .. } => {}
                Literal::SomeIn {
                    key,
                    value,
                    collection,
                    ..
                } => {
                    if let Some(k) = key {
                        self.expr(k, &stored)?;
                    }
                    self.expr(value, &stored)?;
                    self.expr(collection, &stored)?;
                }
                Literal::Expr { expr, .. } | Literal::NotExpr { expr, .. } => {
                    self.expr(expr, &stored)?
                }
                Literal::Every { domain, query, .. } => {
                    self.expr(domain, &stored)?;
                    self.query(query)?;
                }
            }
        }
        Ok(())
    }

    fn key(&mut self, path: Vec<Value>, span: &regorus::unstable::Span) -> Result<(), String> {
        if path
            .first()
            .and_then(|s| s.as_string().ok())
            .is_some_and(|s| s.as_ref() == TIME_NS)
        {
            return Err(at(
                span,
                "reads input.time_ns other than in a comparison with a stored value (its value is unique per request)",
            ));
        }
        if path
            .first()
            .and_then(|s| s.as_string().ok())
            .is_some_and(|s| s.as_ref() == "time")
        {
            return Err(at(
                span,
                "reads input.time (unique per request; compare input.time_ns with a stored value instead)",
            ));
        }
        self.paths.push(path);
        Ok(())
    }

    /// Whether `e` is a ref to a value stored in the data (not a rule) or the input
    /// (not the time): `data.a.b[x]`, `input.execution.not_after_ns`, `v.f` with `v`
    /// such a ref.
    fn stored_ref(&self, e: &Expr, stored: &Stored<'_>) -> bool {
        let mut root = e;
        let mut steps = Vec::new();
        while let Expr::RefDot { refr, field, .. } = root {
            steps.push(field.1.as_string().ok().map(|s| s.to_string()));
            root = refr;
        }
        loop {
            match root {
                Expr::RefDot { refr, field, .. } => {
                    steps.push(field.1.as_string().ok().map(|s| s.to_string()));
                    root = refr;
                }
                Expr::RefBrack { refr, index, .. } => {
                    steps.push(match index.as_ref() {
                        Expr::String { value, .. } | Expr::RawString { value, .. } => {
                            value.as_string().ok().map(|s| s.to_string())
                        }
                        _ => None,
                    });
                    root = refr;
                }
                _ => break,
            }
        }
        steps.reverse();
        let Expr::Var { value, .. } = root else {
            return false;
        };
        let Ok(name) = value.as_string() else {
            return false;
        };
        match name.as_ref() {
            "data" => {
                // The static prefix must leave every package: under one, the value may
                // be a rule's (computed, possibly from the time).
                let prefix: Vec<&str> = steps.iter().map_while(|s| s.as_deref()).collect();
                !self.packages.iter().any(|p| {
                    let n = p.len().min(prefix.len());
                    p[..n]
                        .iter()
                        .map(String::as_str)
                        .eq(prefix[..n].iter().copied())
                        && (prefix.len() < p.len() || n == p.len())
                })
            }
            "input" => {
                !matches!(steps.first(), Some(Some(f)) if f == TIME_NS || f == "time")
                    && !steps.is_empty()
            }
            other => !steps.is_empty() && stored.contains_key(other),
        }
    }

    fn expr(&mut self, e: &Expr, stored: &Stored<'_>) -> Result<(), String> {
        match e {
            Expr::Var { value, span, .. } => {
                if value.as_string().is_ok_and(|s| s.as_ref() == "input") {
                    return Err(at(span, "reads `input` whole"));
                }
                Ok(())
            }
            Expr::RefDot { .. } | Expr::RefBrack { .. } => {
                if crate::compat::ref_root(e) == Some("input") {
                    let Some((path, _)) = input_path(e) else {
                        return Err(at(e.span(), "reads `input` in a form the cache cannot key"));
                    };
                    if path.is_empty() {
                        return Err(at(
                            e.span(),
                            "reads `input` whole (a computed key at its root)",
                        ));
                    }
                    self.key(path, e.span())?;
                }
                // Indexes may hold refs of their own.
                let mut cur = e;
                loop {
                    match cur {
                        Expr::RefDot { refr, .. } => cur = refr,
                        Expr::RefBrack { refr, index, .. } => {
                            self.expr(index, stored)?;
                            cur = refr;
                        }
                        _ => break,
                    }
                }
                if !matches!(cur, Expr::Var { .. }) {
                    self.expr(cur, stored)?;
                }
                Ok(())
            }
            Expr::BoolExpr {
                op, lhs, rhs, span, ..
            } => {
                let is_time = |x: &Expr| {
                    input_path(x).is_some_and(|(p, _)| {
                        p.first()
                            .and_then(|s| s.as_string().ok())
                            .is_some_and(|s| s.as_ref() == TIME_NS)
                    })
                };
                let ordered = matches!(
                    op,
                    BoolOp::Lt | BoolOp::Le | BoolOp::Gt | BoolOp::Ge | BoolOp::Eq | BoolOp::Ne
                );
                for (time, other) in [(lhs, rhs), (rhs, lhs)] {
                    if ordered && is_time(time) {
                        let exact =
                            input_path(time).is_some_and(|(p, complete)| complete && p.len() == 1);
                        if !exact || !self.stored_ref(other, stored) {
                            return Err(at(
                                span,
                                "compares input.time_ns with something other than a value stored in the data or the input",
                            ));
                        }
                        self.time_bounded = true;
                        return self.expr(other, stored);
                    }
                }
                self.expr(lhs, stored)?;
                self.expr(rhs, stored)
            }
            Expr::Call {
                fcn, params, span, ..
            } => {
                if let Some(name) = dotted(fcn) {
                    if NON_DETERMINISTIC.contains(&name.as_str()) {
                        return Err(at(
                            span,
                            &format!(
                                "calls {name}, whose answer is not a function of its arguments"
                            ),
                        ));
                    }
                    if name == "walk" {
                        return Err(at(span, "calls walk"));
                    }
                } else {
                    self.expr(fcn, stored)?;
                }
                for p in params {
                    self.expr(p, stored)?;
                }
                Ok(())
            }
            Expr::String { .. }
            | Expr::RawString { .. }
            | Expr::Number { .. }
            | Expr::Bool { .. }
            | Expr::Null { .. } => Ok(()),
            Expr::Array { items, .. } | Expr::Set { items, .. } => {
                items.iter().try_for_each(|i| self.expr(i, stored))
            }
            Expr::Object { fields, .. } => fields.iter().try_for_each(|(_, k, v)| {
                self.expr(k, stored)?;
                self.expr(v, stored)
            }),
            Expr::ArrayCompr { term, query, .. } | Expr::SetCompr { term, query, .. } => {
                self.expr(term, stored)?;
                self.query(query)
            }
            Expr::ObjectCompr {
                key, value, query, ..
            } => {
                self.expr(key, stored)?;
                self.expr(value, stored)?;
                self.query(query)
            }
            Expr::UnaryExpr { expr, .. } => self.expr(expr, stored),
            Expr::BinExpr { lhs, rhs, .. }
            | Expr::ArithExpr { lhs, rhs, .. }
            | Expr::AssignExpr { lhs, rhs, .. } => {
                self.expr(lhs, stored)?;
                self.expr(rhs, stored)
            }
            Expr::Membership {
                key,
                value,
                collection,
                ..
            } => {
                if let Some(k) = key {
                    self.expr(k, stored)?;
                }
                self.expr(value, stored)?;
                self.expr(collection, stored)
            }
        }
    }
}

/// The static prefix of an `input` ref (`input.a["b"][x].c` → `[a, b]`) and whether
/// it is the whole ref (no computed index cut it short). None: not rooted at `input`.
fn input_path(e: &Expr) -> Option<(Vec<Value>, bool)> {
    let mut chain = Vec::new();
    let mut cur = e;
    loop {
        match cur {
            Expr::RefDot { refr, field, .. } => {
                chain.push(Some(Value::from(field.1.as_string().ok()?.as_ref())));
                cur = refr;
            }
            Expr::RefBrack { refr, index, .. } => {
                chain.push(match index.as_ref() {
                    Expr::String { value, .. }
                    | Expr::RawString { value, .. }
                    | Expr::Number { value, .. }
                    | Expr::Bool { value, .. } => Some(value.clone()),
                    Expr::Null { .. } => Some(Value::Null),
                    _ => None,
                });
                cur = refr;
            }
            Expr::Var { value, .. } if value.as_string().ok()?.as_ref() == "input" => break,
            _ => return None,
        }
    }
    chain.reverse();
    let mut path = Vec::new();
    for step in chain {
        match step {
            Some(v) => path.push(v),
            None => return Some((path, false)),
        }
    }
    Some((path, true))
}

/// Bounds of a [`DecisionCache`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheLimits {
    /// Most entries kept (0: no cache).
    pub max_entries: usize,
    /// Most bytes kept (keys plus decisions, as counted by the cache).
    pub max_bytes: usize,
}

impl Default for CacheLimits {
    fn default() -> Self {
        Self {
            max_entries: 10_000,
            max_bytes: 8 * 1024 * 1024,
        }
    }
}

/// Counters and sizes of a cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Decisions answered from the cache.
    pub hits: u64,
    /// Cacheable decisions that were evaluated (not found, expired, other revision).
    pub misses: u64,
    /// Decisions evaluated without the cache (the revision cannot be keyed, or the
    /// input has no integer `time_ns` the revision needs).
    pub uncached: u64,
    /// Entries removed to stay within the bounds.
    pub evictions: u64,
    /// Misses not kept: the cache was full, and the entry that would have made room
    /// was asked for at least as often (admission by frequency, [`Frequency`]).
    pub refused: u64,
    /// Entries now.
    pub entries: u64,
    /// Bytes now.
    pub bytes: u64,
}

struct Entry {
    key: Box<[u8]>,
    generation: u64,
    /// The decision holds for request times in `[from_ns, expires_ns)`.
    from_ns: i128,
    expires_ns: i128,
    decision: Decision,
    bytes: usize,
}

/// The shards' maps are keyed by a key's hash already drawn from [`DecisionCache`]'s
/// seeded SipHash (unpredictable to whoever crafts requests): hashing it again would
/// only cost time.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed here; anything else is folded in, never lost.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[derive(Default)]
struct Shard {
    map: HashMap<u64, Entry, std::hash::BuildHasherDefault<Prehashed>>,
    order: VecDeque<u64>,
    bytes: usize,
    frequency: Frequency,
}

/// How often each key was asked for lately, approximately (TinyLFU, as Caffeine and
/// moka admit entries): a key's first ask sets two bits of a Bloom filter (the
/// doorkeeper); later asks count in a count-min sketch of saturating counters (four per
/// key; the smallest is the estimate). Every `AGE_EVERY` × the shard's entries asks,
/// the counters are halved and the doorkeeper emptied, so that what was popular long
/// ago fades. Positions are drawn from the key's seeded hash: whoever crafts requests
/// cannot choose where their keys count.
///
/// A full shard keeps a missed decision only if its key was asked for more often than
/// the key of the oldest entry, the one that would make room; otherwise that entry is
/// given another turn at the back of the queue and the miss is not kept. So a flood of
/// requests each made once (unique paths crafted to miss) neither pushes out decisions
/// that are asked for again nor counts in the sketch (the doorkeeper takes it), and once
/// the cache is full it costs no insert or eviction; a new key asked for twice is kept
/// over entries asked for once.
#[derive(Default)]
struct Frequency {
    counters: Box<[u8]>,
    doorkeeper: Box<[u64]>,
    /// Asks since the last halving.
    counted: usize,
    /// Asks between two halvings.
    age_every: usize,
}

/// Most entries asked for at least as often as a new key that one insert gives another
/// turn before the new key's decision is not kept.
const MOST_TURNS: usize = 8;
/// Largest count a sketch counter holds (4 bits' worth, as TinyLFU's).
const MOST_COUNTED: u8 = 15;
/// Halvings come after this many asks per entry the shard may hold.
const AGE_EVERY: usize = 10;
/// Most sketch counters (bytes) in one shard: 1 MiB, reached from 512k entries per
/// shard. The default 1,250 entries per shard take 4 KiB.
const MOST_COUNTERS: usize = 1 << 20;
/// Fewest sketch counters and doorkeeper bits in one shard (a small cache's sketch would
/// otherwise count every key in the same few counters).
const LEAST_COUNTERS: usize = 1024;
const LEAST_DOORKEEPER_BITS: usize = 8192;
/// Most doorkeeper bits in one shard: 1 MiB. The default takes 8 KiB (four bits per
/// ask between two halvings).
const MOST_DOORKEEPER_BITS: usize = 1 << 23;

impl Frequency {
    fn new(entries: usize) -> Self {
        let entries = entries.max(16);
        let age_every = entries.saturating_mul(AGE_EVERY);
        let width = |n: usize, most: usize| n.checked_next_power_of_two().unwrap_or(most).min(most);
        Self {
            counters: vec![0; width(entries.saturating_mul(2).max(LEAST_COUNTERS), MOST_COUNTERS)]
                .into_boxed_slice(),
            doorkeeper: vec![
                0;
                width(
                    age_every.saturating_mul(4).max(LEAST_DOORKEEPER_BITS),
                    MOST_DOORKEEPER_BITS
                ) / 64
            ]
            .into_boxed_slice(),
            counted: 0,
            age_every,
        }
    }

    /// The four counters of `hash`.
    fn slots(&self, hash: u64) -> [usize; 4] {
        let mask = self.counters.len() - 1;
        let h = hash.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        [
            (h as usize) & mask,
            ((h >> 16) as usize) & mask,
            ((h >> 32) as usize) & mask,
            ((h >> 48) as usize) & mask,
        ]
    }

    /// The two doorkeeper bits of `hash` (word, mask).
    fn bits(&self, hash: u64) -> [(usize, u64); 2] {
        let mask = self.doorkeeper.len() * 64 - 1;
        let h = hash.rotate_left(23).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
        [h as usize & mask, (h >> 32) as usize & mask].map(|bit| (bit / 64, 1u64 << (bit % 64)))
    }

    fn admitted(&self, hash: u64) -> bool {
        self.bits(hash)
            .into_iter()
            .all(|(word, bit)| self.doorkeeper[word] & bit != 0)
    }

    /// One ask for `hash`.
    fn count(&mut self, hash: u64) {
        if self.counters.is_empty() {
            return;
        }
        if self.admitted(hash) {
            for i in self.slots(hash) {
                let c = &mut self.counters[i];
                *c = (*c + 1).min(MOST_COUNTED);
            }
        } else {
            for (word, bit) in self.bits(hash) {
                self.doorkeeper[word] |= bit;
            }
        }
        self.counted += 1;
        if self.counted >= self.age_every {
            self.counted = 0;
            for c in self.counters.iter_mut() {
                *c /= 2;
            }
            self.doorkeeper.fill(0);
        }
    }

    /// About how many times `hash` was asked for lately: the sketch's count, plus one
    /// when the doorkeeper holds it (0 when never asked).
    fn estimate(&self, hash: u64) -> u8 {
        if self.counters.is_empty() {
            return 0;
        }
        let counted = self
            .slots(hash)
            .into_iter()
            .map(|i| self.counters[i])
            .min()
            .unwrap_or(0);
        counted + u8::from(self.admitted(hash))
    }
}

const SHARDS: usize = 8;

/// What [`DecisionCache::get`] found.
#[derive(Debug)]
pub(crate) enum Looked {
    /// The decision kept for the key.
    Hit(Decision),
    /// Not kept: evaluate, then [`DecisionCache::insert`] the decision.
    Miss,
    /// Not kept, and a decision for this key would not be kept either (admission,
    /// [`Frequency`]): evaluate and keep nothing.
    Refused,
}

impl Looked {
    /// The decision, on a hit.
    pub(crate) fn hit(self) -> Option<Decision> {
        match self {
            Looked::Hit(decision) => Some(decision),
            Looked::Miss | Looked::Refused => None,
        }
    }
}

impl Shard {
    fn new(limits: CacheLimits) -> Self {
        Self {
            frequency: if limits.max_entries == 0 {
                Frequency::default()
            } else {
                Frequency::new((limits.max_entries / SHARDS).max(1))
            },
            ..Self::default()
        }
    }
}

/// A bounded decision cache shared by the request workers (sharded locks; each held
/// for a lookup or an insert only, never during an evaluation).
pub struct DecisionCache {
    shards: Vec<Mutex<Shard>>,
    limits: CacheLimits,
    hasher: std::collections::hash_map::RandomState,
    hits: AtomicU64,
    misses: AtomicU64,
    uncached: AtomicU64,
    evictions: AtomicU64,
    refused: AtomicU64,
    entries: AtomicUsize,
    bytes: AtomicUsize,
}

impl std::fmt::Debug for DecisionCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecisionCache")
            .field("limits", &self.limits)
            .finish()
    }
}

impl DecisionCache {
    /// An empty cache with these bounds.
    pub fn new(limits: CacheLimits) -> Self {
        Self {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(Shard::new(limits)))
                .collect(),
            limits,
            hasher: std::collections::hash_map::RandomState::new(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            uncached: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            entries: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
        }
    }

    /// The bounds.
    pub fn limits(&self) -> CacheLimits {
        self.limits
    }

    /// Counters and sizes now.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            uncached: self.uncached.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            entries: self.entries.load(Ordering::Relaxed) as u64,
            bytes: self.bytes.load(Ordering::Relaxed) as u64,
        }
    }

    pub(crate) fn count_uncached(&self) {
        self.uncached.fetch_add(1, Ordering::Relaxed);
    }

    /// The hash of `key` that [`DecisionCache::get`] and [`DecisionCache::insert`] take
    /// (computed once per decision, for both).
    pub(crate) fn hash(&self, key: &[u8]) -> u64 {
        let mut h = self.hasher.build_hasher();
        h.write(key);
        h.finish()
    }

    /// The shard of a hash, chosen by bits its map does not place entries by: a map
    /// places by the low bits and tags by the top seven ([`Prehashed`] hands the hash
    /// on as is), so a shard chosen by either would crowd its own map.
    fn shard(&self, hash: u64) -> &Mutex<Shard> {
        &self.shards[((hash >> 32) as usize) % SHARDS]
    }

    /// The decision for `key` (whose [`DecisionCache::hash`] is `hash`) in `generation`,
    /// if kept and not expired at `now_ns`. A hit is counted, and the key counted as
    /// asked for ([`Frequency`]); a miss only with `count_miss` (the sidecar looks a
    /// request up twice on a miss, once without the document: `Policy::evaluate_cached`
    /// counts it).
    ///
    /// A counted miss is also admitted or refused here, as [`DecisionCache::insert`]
    /// would do it after the evaluation: when the shard is full and the key of its
    /// oldest entry was asked for at least as often, that entry goes to the back and the
    /// answer is [`Looked::Refused`] (counted as refused), and the caller keeps nothing.
    /// A flood's miss then costs one lock, not two, and no work to store its decision.
    /// The byte bound, and keys whose entry is there but expired, are left to `insert`.
    pub(crate) fn get(
        &self,
        hash: u64,
        key: &[u8],
        generation: u64,
        now_ns: i128,
        count_miss: bool,
    ) -> Looked {
        let mut shard = self.shard(hash).lock().unwrap_or_else(|p| p.into_inner());
        let present = shard.map.get(&hash);
        let placed = present.is_some();
        let found = present
            .filter(|e| {
                *e.key == *key
                    && e.generation == generation
                    && e.from_ns <= now_ns
                    && now_ns < e.expires_ns
            })
            .map(|e| e.decision.clone());
        if let Some(decision) = found {
            shard.frequency.count(hash);
            drop(shard);
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Looked::Hit(decision);
        }
        if !count_miss {
            return Looked::Miss;
        }
        shard.frequency.count(hash);
        let full = shard.map.len() >= self.per_shard_entries();
        let refused = !placed
            && full
            && shard.order.front().is_some_and(|&oldest| {
                shard.frequency.estimate(oldest) >= shard.frequency.estimate(hash)
            });
        if refused {
            shard.order.rotate_left(1);
        }
        drop(shard);
        self.misses.fetch_add(1, Ordering::Relaxed);
        if refused {
            self.refused.fetch_add(1, Ordering::Relaxed);
            Looked::Refused
        } else {
            Looked::Miss
        }
    }

    /// Entries one shard holds at most.
    fn per_shard_entries(&self) -> usize {
        (self.limits.max_entries / SHARDS).max(1)
    }

    /// Keeps `decision` for `key` (whose [`DecisionCache::hash`] is `hash`) for request
    /// times in `valid` (`[from, until)`), evicting the oldest entries of the shard to
    /// stay within the bounds; a full shard keeps it only if `key` was asked for more
    /// often than the oldest entry's key (counted as refused otherwise: [`Frequency`]).
    pub(crate) fn insert(
        &self,
        hash: u64,
        key: &[u8],
        generation: u64,
        valid: (i128, i128),
        decision: &Decision,
    ) {
        let (from_ns, expires_ns) = valid;
        let per_shard_entries = self.per_shard_entries();
        let per_shard_bytes = self.limits.max_bytes / SHARDS;
        let bytes = key.len()
            + std::mem::size_of::<Entry>()
            + 16
            + decision.reasons.iter().map(|r| r.len() + 24).sum::<usize>();
        if self.limits.max_entries == 0 || bytes > per_shard_bytes {
            return;
        }
        let mut shard = self.shard(hash).lock().unwrap_or_else(|p| p.into_inner());
        let mut removed = 0usize;
        let mut freed = 0usize;
        let mut evicted = 0u64;
        let replaced = shard.map.remove(&hash).is_some_and(|old| {
            removed += 1;
            freed += old.bytes;
            true
        });
        // Admission (`Frequency`): room is made only from entries whose keys were asked
        // for less often than this one. The oldest entry is looked at first: asked for
        // at least as often, it goes to the back and the decision is not kept (one
        // comparison per miss of a flood). When more than one entry must go (the byte
        // bound), an entry asked for at least as often is also given another turn, up
        // to `MOST_TURNS` of them; then the decision is not kept. A key inserted again
        // (its entry expired, or of another generation) takes its old place's room.
        let asked = shard.frequency.estimate(hash);
        let mut turns = 0usize;
        let mut refused = false;
        while shard.map.len() + 1 > per_shard_entries
            || shard.bytes - freed + bytes > per_shard_bytes
        {
            let Some(&oldest) = shard.order.front() else {
                break;
            };
            if !replaced && shard.frequency.estimate(oldest) >= asked {
                shard.order.rotate_left(1);
                turns += 1;
                if evicted == 0 || turns >= MOST_TURNS {
                    refused = true;
                    break;
                }
                continue;
            }
            shard.order.pop_front();
            if let Some(old) = shard.map.remove(&oldest) {
                removed += 1;
                freed += old.bytes;
                evicted += 1;
            }
        }
        if refused {
            shard.bytes -= freed;
            drop(shard);
            self.entries.fetch_sub(removed, Ordering::Relaxed);
            self.bytes.fetch_sub(freed, Ordering::Relaxed);
            self.evictions.fetch_add(evicted, Ordering::Relaxed);
            self.refused.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // A key inserted again (its entry expired, or of another generation) moves to
        // the back. Only then is the queue scanned: a miss on a new key (the common
        // one, and the one a flood of unique requests makes) costs no scan of the shard.
        if replaced {
            shard.order.retain(|h| *h != hash);
        }
        shard.order.push_back(hash);
        shard.map.insert(
            hash,
            Entry {
                key: key.into(),
                generation,
                from_ns,
                expires_ns,
                decision: decision.clone(),
                bytes,
            },
        );
        shard.bytes = shard.bytes - freed + bytes;
        // The order queue may hold hashes of entries replaced in place: trim it.
        if shard.order.len() > 2 * per_shard_entries {
            let live: std::collections::HashSet<u64> = shard.map.keys().copied().collect();
            shard.order.retain(|h| live.contains(h));
        }
        drop(shard);
        self.entries.fetch_add(1, Ordering::Relaxed);
        self.entries.fetch_sub(removed, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.bytes.fetch_sub(freed, Ordering::Relaxed);
        self.evictions.fetch_add(evicted, Ordering::Relaxed);
    }

    /// Drops every entry (e.g. when a new revision is published: old entries could
    /// never be served again, they would only hold memory).
    pub fn clear(&self) {
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            let (n, b) = (shard.map.len(), shard.bytes);
            // How often keys were asked for stays: a new revision is asked the same.
            shard.map = HashMap::default();
            shard.order = VecDeque::new();
            shard.bytes = 0;
            drop(shard);
            self.entries.fetch_sub(n, Ordering::Relaxed);
            self.bytes.fetch_sub(b, Ordering::Relaxed);
        }
    }
}

/// Appends the key of `input` under `plan`: each path's value, encoded so that two
/// different values never give the same bytes; `value` is given the value at each of
/// the plan's paths, in order (a miss uses them again: the numbers that bound the
/// entry's life, the evaluation's inputs).
///
/// This is the whole cost of a cache hit besides the hash lookup, so it walks the input
/// once: the paths are sorted, and a path reuses the values its predecessor found along
/// their common prefix (`input.request.method` then `input.request.path` look up
/// `request` once); a field of a small object is found by comparing names for equality
/// (lengths first) rather than by the ordered binary search of `Value`'s index.
pub(crate) fn key_and_values<'a>(
    plan: &KeyPlan,
    input: &'a Value,
    out: &mut Vec<u8>,
    value: impl FnMut(&'a Value),
) {
    walk_key(plan, input, Some(out), value)
}

/// `key_and_values`, writing the key into `out` only when given (a caller that has
/// written it from the request's values wants only the values).
pub(crate) fn walk_key<'a>(
    plan: &KeyPlan,
    input: &'a Value,
    mut out: Option<&mut Vec<u8>>,
    mut value: impl FnMut(&'a Value),
) {
    const DEPTH: usize = 8;
    // `found[d]`: the value at depth `d` along the previous path (found[0] = input).
    let mut found: [&Value; DEPTH + 1] = [input; DEPTH + 1];
    // Whether `found` holds the previous path's values (not when it was too deep).
    let mut walked = false;
    for (i, path) in plan.paths.iter().enumerate() {
        if path.len() > DEPTH {
            let mut v = input;
            for step in path {
                v = field(v, step);
            }
            if let Some(out) = out.as_deref_mut() {
                encode(v, out);
            }
            value(v);
            walked = false;
            continue;
        }
        let shared = match plan.shared.get(i) {
            Some(&n) if walked => n,
            _ => 0,
        };
        for (d, step) in path.iter().enumerate().skip(shared) {
            found[d + 1] = field(found[d], step);
        }
        if let Some(out) = out.as_deref_mut() {
            encode(found[path.len()], out);
        }
        value(found[path.len()]);
        walked = true;
    }
}

/// The field `name` of `v` (`v[name]`), without making a key value when `v` is a small
/// object.
pub(crate) fn named_field<'a>(v: &'a Value, name: &str) -> &'a Value {
    named(v, name).unwrap_or_else(|| &v[name])
}

/// `input.time_ns`.
pub(crate) fn time_ns(input: &Value) -> &Value {
    named_field(input, TIME_NS)
}

/// `v[step]`, with a linear equality scan for a string key in a small object.
pub(crate) fn field<'a>(v: &'a Value, step: &Value) -> &'a Value {
    if let Value::String(name) = step
        && let Some(found) = named(v, name)
    {
        return found;
    }
    &v[step]
}

/// The field `name` of `v` when `v` is a small object (at most 32 fields), found by
/// comparing names for equality, lengths and first bytes first (`Undefined` when it has no such
/// field); `None` when `v` is not a small object (the caller indexes).
fn named<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    static UNDEFINED: Value = Value::Undefined;
    let Value::Object(fields) = v else {
        return None;
    };
    if fields.len() > 32 {
        return None;
    }
    for (k, value) in fields.iter() {
        if let Value::String(k) = k {
            // Lengths and first bytes settle almost every mismatch without a call to
            // memcmp (`source`/`clause`, `request`/`time_ns` are the same length).
            if k.len() == name.len()
                && k.as_bytes().first() == name.as_bytes().first()
                && k.as_ref() == name
            {
                return Some(value);
            }
        }
    }
    Some(&UNDEFINED)
}

/// A value at one of a plan's key paths, given by a caller that has it without an
/// input document (`Policy::cached_parts`): the scalar forms an input field takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyPart<'a> {
    /// The path leads nowhere in the document.
    Undefined,
    /// JSON null.
    Null,
    /// A string.
    Str(&'a str),
    /// An integer.
    Int(i64),
}

/// Appends `part` as the key encodes the value it stands for (the same bytes as that
/// value's `Value` in an input document: `key_of`).
pub fn encode_part(part: KeyPart<'_>, out: &mut Vec<u8>) {
    match part {
        KeyPart::Undefined => out.push(b'u'),
        KeyPart::Null => out.push(b'n'),
        KeyPart::Str(s) => bytes(b's', s.as_bytes(), out),
        KeyPart::Int(i) => {
            out.push(b'i');
            out.extend_from_slice(&i.to_le_bytes());
        }
    }
}

/// The key of `input` under `plan`: what the cache keys a decision on (for callers that
/// make keys without the document, to check theirs against).
pub fn key_of(plan: &KeyPlan, input: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    key_and_values(plan, input, &mut out, |_| {});
    out
}

fn bytes(tag: u8, b: &[u8], out: &mut Vec<u8>) {
    out.push(tag);
    out.extend_from_slice(&(b.len() as u64).to_le_bytes());
    out.extend_from_slice(b);
}

fn encode(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Undefined => encode_part(KeyPart::Undefined, out),
        Value::Null => encode_part(KeyPart::Null, out),
        Value::Bool(b) => out.push(if *b { b't' } else { b'f' }),
        Value::Number(n) => match n.as_i64() {
            Some(i) => encode_part(KeyPart::Int(i), out),
            None => bytes(b'd', v.to_json_str().unwrap_or_default().as_bytes(), out),
        },
        Value::String(s) => encode_part(KeyPart::Str(s), out),
        Value::Array(items) => {
            bytes(b'a', &[], out);
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            items.iter().for_each(|i| encode(i, out));
        }
        Value::Set(items) => {
            bytes(b'S', &[], out);
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            items.iter().for_each(|i| encode(i, out));
        }
        Value::Object(fields) => {
            bytes(b'o', &[], out);
            out.extend_from_slice(&(fields.len() as u64).to_le_bytes());
            for (k, v) in fields.iter() {
                encode(k, out);
                encode(v, out);
            }
        }
    }
}

/// Every number stored in `v`, as the integer at or below it, sorted: the times at
/// which a comparison with `input.time_ns` may change its answer.
pub(crate) fn numbers(v: &Value, out: &mut impl Extend<i128>) {
    match v {
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                out.extend([i128::from(i)]);
            } else if let Some(f) = n.as_f64() {
                if f.is_finite() {
                    out.extend([f.floor() as i128]);
                } else {
                    // Cannot place it: expire at once (the caller takes the minimum).
                    out.extend([i128::MIN]);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| numbers(i, out)),
        Value::Set(items) => items.iter().for_each(|i| numbers(i, out)),
        Value::Object(fields) => fields.iter().for_each(|(k, v)| {
            numbers(k, out);
            numbers(v, out);
        }),
        _ => {}
    }
}

/// One past the latest stored number before `now` (None: none): with `next_bound`,
/// the request times around `now` at which every comparison of the time with a
/// stored number answers as it does at `now` (time may step back: clocks are set).
pub(crate) fn prev_bound(sorted: &[i128], now: i128) -> Option<i128> {
    let at = sorted.partition_point(|&n| n < now);
    at.checked_sub(1).and_then(|i| sorted.get(i)).map(|n| n + 1)
}

/// The earliest stored number at or after `now` (None: none, the entry never expires
/// by time). A non-finite number counts as `now` (no caching).
pub(crate) fn next_bound(sorted: &[i128], now: i128) -> Option<i128> {
    if sorted.first() == Some(&i128::MIN) {
        return Some(now);
    }
    let at = sorted.partition_point(|&n| n < now);
    sorted.get(at).copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::Module;

    /// A part is encoded as the value it stands for is in a document, and no two
    /// different parts (nor a part and another value) share bytes.
    #[test]
    fn parts_encode_as_the_values_they_stand_for() {
        let plan = KeyPlan::new(vec![vec![Value::from("v")]], false);
        let cases = [
            (KeyPart::Undefined, serde_json::json!({})),
            (KeyPart::Null, serde_json::json!({"v": null})),
            (KeyPart::Str(""), serde_json::json!({"v": ""})),
            (
                KeyPart::Str("spiffe://td/p"),
                serde_json::json!({"v": "spiffe://td/p"}),
            ),
            (KeyPart::Str("1"), serde_json::json!({"v": "1"})),
            (KeyPart::Int(1), serde_json::json!({"v": 1})),
            (KeyPart::Int(-1), serde_json::json!({"v": -1})),
            (KeyPart::Int(i64::MAX), serde_json::json!({"v": i64::MAX})),
        ];
        let mut seen = std::collections::HashSet::new();
        for (part, doc) in cases {
            let mut out = Vec::new();
            encode_part(part, &mut out);
            assert_eq!(out, key_of(&plan, &Value::from(doc)), "{part:?}");
            assert!(seen.insert(out), "{part:?} shares its bytes");
        }
        for other in [
            serde_json::json!({"v": true}),
            serde_json::json!({"v": [1]}),
        ] {
            assert!(!seen.contains(&key_of(&plan, &Value::from(other))));
        }
    }

    fn plan_of(text: &str) -> Result<KeyPlan, String> {
        plan(&Bundle::from_modules(
            vec![Module {
                path: "p.rego".into(),
                text: text.into(),
            }],
            Value::new_object(),
        ))
    }

    #[test]
    fn the_reference_policy_is_keyed_on_what_it_reads() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../policies/nexus/authz/authz.rego"
        ))
        .unwrap();
        let p = plan_of(&text).unwrap();
        assert!(p.time_bounded);
        let d = p.describe();
        for path in [
            "input.source.spiffe_id",
            "input.destination.spiffe_id",
            "input.clause",
            "input.execution.id",
            "input.request.method",
            "input.request.path",
        ] {
            assert!(d.contains(&path.to_string()), "{d:?}");
        }
        assert!(!d.iter().any(|p| p.contains("time")), "{d:?}");
    }

    #[test]
    fn unkeyable_policies_say_why() {
        for (text, why) in [
            ("package t\n\nx := input\n", "whole"),
            ("package t\n\nx if walk(input.a, _)\n", "walk"),
            ("package t\n\nx if input[k] == 1\n", "whole"),
            ("package t\n\nx if time.now_ns() > 1\n", "time.now_ns"),
            ("package t\n\nx if input.time == \"a\"\n", "input.time"),
            ("package t\n\nx if input.time_ns + 5 > data.d\n", "time_ns"),
            (
                "package t\n\nd := 5\n\nx if input.time_ns > data.t.d\n",
                "time_ns",
            ),
            (
                "package t\n\nx if { t := input.time_ns; t > 1 }\n",
                "time_ns",
            ),
            (
                "package t\n\nx if { e := count(input.a); e > input.time_ns }\n",
                "time_ns",
            ),
            (
                "package t\n\nx if input.time_ns > input.time_ns\n",
                "time_ns",
            ),
            ("package t\n\nimport input\n\nx if input.a\n", "input"),
        ] {
            let err = plan_of(text).unwrap_err();
            assert!(err.contains(why), "{text}: {err}");
            assert!(err.starts_with("p.rego:"), "{err}");
        }
    }

    #[test]
    fn computed_indexes_key_the_collection() {
        let p =
            plan_of("package t\n\nx if { some i; input.a.b[i] == input.c[\"d\"].e }\n").unwrap();
        assert_eq!(p.describe(), vec!["input.a.b", "input.c.d.e"]);
        assert!(!p.time_bounded);
    }

    #[test]
    fn keys_tell_values_apart() {
        let plan = KeyPlan::new(vec![vec![Value::from("a")], vec![Value::from("b")]], false);
        let key = |j: serde_json::Value| {
            let mut out = Vec::new();
            key_and_values(&plan, &Value::from(j), &mut out, |_| ());
            out
        };
        let cases = [
            serde_json::json!({}),
            serde_json::json!({"a": null}),
            serde_json::json!({"a": "x", "b": "y"}),
            serde_json::json!({"a": "xy", "b": ""}),
            serde_json::json!({"a": ["x"], "b": "y"}),
            serde_json::json!({"a": 1}),
            serde_json::json!({"a": "1"}),
            serde_json::json!({"a": 1.5}),
            serde_json::json!({"a": {"x": "y"}}),
        ];
        for (i, a) in cases.iter().enumerate() {
            for (j, b) in cases.iter().enumerate() {
                assert_eq!(key(a.clone()) == key(b.clone()), i == j, "{a} {b}");
            }
        }
    }

    /// Keys spread over the shards (each holds a share of the bound): 8,000 distinct
    /// decisions fit a 10,000-entry cache without an eviction, and each is found again.
    #[test]
    fn distinct_keys_fill_the_cache_before_any_is_evicted() {
        let cache = DecisionCache::new(CacheLimits::default());
        let d = Decision {
            allow: true,
            reasons: vec!["r".to_string()].into(),
            error: None,
        };
        for i in 0..8_000u32 {
            let key = format!("/clauses/c-{i}/rainfall").into_bytes();
            cache.insert(cache.hash(&key), &key, 1, (0, i128::MAX), &d);
        }
        let stats = cache.stats();
        assert_eq!((stats.entries, stats.evictions), (8_000, 0), "{stats:?}");
        for i in 0..8_000u32 {
            let key = format!("/clauses/c-{i}/rainfall").into_bytes();
            assert!(
                cache
                    .get(cache.hash(&key), &key, 1, 0, true)
                    .hit()
                    .is_some(),
                "{i}"
            );
        }
    }

    /// A miss as `Policy::evaluate_cached` takes it: a counted lookup, then the insert.
    fn ask(cache: &DecisionCache, key: &[u8], d: &Decision) -> bool {
        let hash = cache.hash(key);
        match cache.get(hash, key, 1, 0, true) {
            Looked::Hit(_) => true,
            Looked::Miss => {
                cache.insert(hash, key, 1, (0, i128::MAX), d);
                false
            }
            Looked::Refused => false,
        }
    }

    #[test]
    fn bounds_hold_under_unique_keys() {
        let cache = DecisionCache::new(CacheLimits {
            max_entries: 64,
            max_bytes: 16 * 1024,
        });
        let d = Decision {
            allow: true,
            reasons: vec!["r".repeat(100)].into(),
            error: None,
        };
        let within = |cache: &DecisionCache| {
            let s = cache.stats();
            assert!(s.entries <= 64 && s.bytes <= 16 * 1024, "{s:?}");
        };
        // Keys asked for once: the cache fills, then keeps no more (nothing evicted).
        for i in 0..10_000u32 {
            assert!(!ask(&cache, format!("key-{i}").as_bytes(), &d));
            within(&cache);
        }
        let s = cache.stats();
        assert!(s.entries > 0 && s.refused > 9_000, "{s:?}");
        // Keys asked for again are kept over them (16 of them: at most 8 per shard
        // in all but one case in 10^5 of the random seed), within the bounds.
        for i in 0..16u32 {
            let key = format!("again-{i}").into_bytes();
            assert!(!ask(&cache, &key, &d));
            // Kept within a few asks: a halving between two asks takes some away, and
            // the oldest entry may be an earlier one of these, asked about as often
            // (ties are refused).
            let kept = (0..8).any(|_| ask(&cache, &key, &d));
            assert!(kept, "again-{i} not kept: {:?}", cache.stats());
            within(&cache);
        }
        assert!(cache.stats().evictions >= 16, "{:?}", cache.stats());
        let hash = cache.hash(b"again-15");
        assert!(cache.get(hash, b"again-15", 1, 0, true).hit().is_some());
        assert!(
            cache.get(hash, b"again-15", 2, 0, true).hit().is_none(),
            "another generation"
        );
        assert!(
            cache
                .get(hash, b"again-15", 1, i128::MAX, true)
                .hit()
                .is_none(),
            "expired"
        );
        assert!(
            cache.get(hash, b"again-15", 1, -1, true).hit().is_none(),
            "before its interval"
        );
        cache.clear();
        assert_eq!(cache.stats().entries, 0);
        assert_eq!(cache.stats().bytes, 0);
    }

    /// A 64-entry cache (8 per shard) and a decision to keep in it.
    fn small_cache() -> (DecisionCache, Decision) {
        let cache = DecisionCache::new(CacheLimits {
            max_entries: 64,
            max_bytes: 1 << 20,
        });
        let d = Decision {
            allow: true,
            reasons: vec!["r".to_string()].into(),
            error: None,
        };
        (cache, d)
    }

    /// The attack admission is for: requests crafted to miss (each key asked for once)
    /// flood a full cache while 16 legitimate keys are asked for again now and then.
    /// Every legitimate key stays kept; flood keys only replace flood keys.
    #[test]
    fn a_flood_of_keys_asked_once_does_not_push_out_keys_asked_again() {
        let (cache, d) = small_cache();
        let legit: Vec<Vec<u8>> = (0..16).map(|i| format!("legit-{i}").into_bytes()).collect();
        for key in &legit {
            ask(&cache, key, &d);
            assert!(ask(&cache, key, &d), "kept while the cache had room");
        }
        for i in 0..20_000u32 {
            ask(&cache, format!("flood-{i}").as_bytes(), &d);
            if i % 200 == 199 {
                for key in &legit {
                    assert!(
                        ask(&cache, key, &d),
                        "{} pushed out after {i} flood keys: {:?}",
                        String::from_utf8_lossy(key),
                        cache.stats()
                    );
                }
            }
        }
        // Flood entries still make room for later flood keys once no one asks for them
        // (after a halving); never for a legitimate key (above).
        let s = cache.stats();
        assert!(s.refused > 18_000 && s.evictions < 2_000, "{s:?}");
    }

    /// A full shard's refusal is given at the lookup, before any evaluation: a key asked
    /// for once is refused there (and its decision never stored), a key asked for again
    /// is not, and a key whose own entry is there but expired is left to `insert`.
    #[test]
    fn a_full_cache_refuses_a_flood_at_the_lookup() {
        let (cache, d) = small_cache();
        // Fill every shard with keys asked for once (refused ones are asked again).
        let mut i = 0;
        while cache.stats().entries < 64 && i < 100_000 {
            ask(&cache, format!("fill-{i}").as_bytes(), &d);
            i += 1;
        }
        assert_eq!(cache.stats().entries, 64);
        let before = cache.stats().refused;
        let (mut refused, mut missed) = (0, 0);
        for i in 0..1_000 {
            let key = format!("flood-{i}");
            match cache.get(cache.hash(key.as_bytes()), key.as_bytes(), 1, 0, true) {
                Looked::Refused => refused += 1,
                Looked::Miss => missed += 1,
                Looked::Hit(_) => panic!("a key never stored was found"),
            }
        }
        // A doorkeeper false positive may let a few through, never most.
        assert!(refused >= 950, "{refused} refused, {missed} not");
        assert_eq!(cache.stats().refused - before, refused);
        assert_eq!(
            cache.stats().entries,
            64,
            "a refusal stored or evicted nothing"
        );
        // Asked for a second and third time, a key wins over entries asked for once.
        let looks: Vec<bool> = (0..3).map(|_| ask(&cache, b"again", &d)).collect();
        assert!(looks[2], "a key asked for three times is kept: {looks:?}");
        // Its entry expired (past `until`): the lookup misses but does not refuse, even
        // if the key is asked for less often than the shard's oldest.
        let key = b"expiring";
        let hash = cache.hash(key);
        for _ in 0..3 {
            if let Looked::Miss = cache.get(hash, key, 1, 0, true) {
                cache.insert(hash, key, 1, (0, 10), &d);
            }
        }
        assert!(cache.get(hash, key, 1, 5, true).hit().is_some());
        assert!(matches!(cache.get(hash, key, 1, 10, true), Looked::Miss));
    }

    /// What was popular long ago fades: once the legitimate keys are no longer asked
    /// for, keys asked for twice take their places.
    #[test]
    fn keys_no_longer_asked_for_make_room_in_the_end() {
        let (cache, d) = small_cache();
        for i in 0..64 {
            let key = format!("old-{i}").into_bytes();
            for _ in 0..10 {
                ask(&cache, &key, &d);
            }
        }
        for i in 0..5_000u32 {
            let key = format!("new-{i}").into_bytes();
            ask(&cache, &key, &d);
            ask(&cache, &key, &d);
        }
        let kept = (0..64)
            .filter(|i| {
                let key = format!("old-{i}").into_bytes();
                cache
                    .get(cache.hash(&key), &key, 1, 0, false)
                    .hit()
                    .is_some()
            })
            .count();
        assert_eq!(kept, 0, "{:?}", cache.stats());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// A field found by name (`named`'s scan) is the field indexing finds, for any object, key and name: empty, non-ASCII, equal
        /// lengths, shared first bytes, non-string keys beside string ones.
        #[test]
        fn named_fields_are_the_indexed_fields(
            keys in proptest::collection::vec("(|[a-c]{0,3}|[a-c]{1,2}é|\\PC{0,3})", 0..12),
            numbers in proptest::collection::vec(-3i64..3, 0..3),
            name in "(|[a-c]{0,3}|[a-c]{1,2}é|\\PC{0,3})",
        ) {
            let mut fields = std::collections::BTreeMap::new();
            for (i, k) in keys.iter().enumerate() {
                fields.insert(Value::String(k.as_str().into()), Value::from(i));
            }
            for n in &numbers {
                fields.insert(Value::from(*n), Value::from(-1));
            }
            let v = Value::from(fields);
            let by_index = &v[&Value::String(name.as_str().into())];
            proptest::prop_assert_eq!(named_field(&v, &name), by_index);
            proptest::prop_assert_eq!(field(&v, &Value::String(name.as_str().into())), by_index);
            if let Some(k) = keys.first() {
                proptest::prop_assert_eq!(named_field(&v, k), &v[k.as_str()]);
            }
        }

        /// Admission over any sequence of asks (keys from a small universe, each its own
        /// decision), with one hot key asked every fourth time: the bounds hold after
        /// every ask, a hit is always the decision kept for that very key, and the hot
        /// key, once kept, is never pushed out.
        #[test]
        fn admission_keeps_bounds_answers_and_the_hot_key(
            keys in proptest::collection::vec(0u16..400, 400..3000),
            max_bytes in 2048usize..65536,
        ) {
            let cache = DecisionCache::new(CacheLimits { max_entries: 64, max_bytes });
            let decision = |k: u16| Decision {
                allow: k.is_multiple_of(2),
                reasons: vec![format!("key-{k}")].into(),
                error: None,
            };
            let mut hot_kept = false;
            for (i, k) in keys.into_iter().enumerate() {
                let k = if i % 4 == 0 { 0 } else { k + 1 };
                let key = format!("key-{k}").into_bytes();
                let hash = cache.hash(&key);
                match cache.get(hash, &key, 1, 0, true) {
                    Looked::Hit(found) => {
                        proptest::prop_assert_eq!(found, decision(k));
                        if k == 0 {
                            hot_kept = true;
                        }
                    }
                    looked => {
                        proptest::prop_assert!(
                            !(k == 0 && hot_kept),
                            "the hot key was pushed out at ask {}: {:?}", i, cache.stats()
                        );
                        // As `Policy::evaluate_cached`: a refused miss keeps nothing.
                        if matches!(looked, Looked::Miss) {
                            cache.insert(hash, &key, 1, (0, i128::MAX), &decision(k));
                        }
                    }
                }
                let s = cache.stats();
                proptest::prop_assert!(s.entries <= 64 && s.bytes <= max_bytes as u64, "{:?}", s);
            }
            proptest::prop_assert!(hot_kept, "{:?}", cache.stats());
        }
    }

    #[test]
    fn next_bound_is_the_earliest_at_or_after_now() {
        let v = vec![1, 5, 9];
        assert_eq!(next_bound(&v, 0), Some(1));
        assert_eq!(next_bound(&v, 5), Some(5));
        assert_eq!(next_bound(&v, 6), Some(9));
        assert_eq!(next_bound(&v, 10), None);
        assert_eq!(prev_bound(&v, 0), None);
        assert_eq!(prev_bound(&v, 5), Some(2));
        assert_eq!(prev_bound(&v, 6), Some(6));
    }
}
