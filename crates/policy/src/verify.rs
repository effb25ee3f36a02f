//! The compiled mode is never trusted blindly: before a revision serves, its RVM program
//! is run beside regorus's interpreter on
//! - the inputs of the revision's own tests (every `with input as ...` of the
//!   `*_test.rego` modules, captured while the tests run), and variations of them (one
//!   field removed or changed);
//! - inputs generated from the policy itself: the input fields its rules read, filled
//!   with the literals they are compared with, the keys of the data they index, and
//!   values of every JSON type (missing included);
//! - a bounded sample of recently seen inputs, when the caller has some;
//!
//! and the two answers must be equal (undefined is not false; undefined and an error
//! are both no value, a deny). On
//! the first disagreement the revision's decision rule is evaluated by the interpreter
//! instead, and the disagreeing input is kept in the report (`nexusctl policy check`
//! prints it). The check is bounded by a number of inputs and a time budget.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use regorus::Value;
use regorus::unstable::{Expr, Module as Ast};

use crate::bundle::Bundle;
use crate::compat::{dotted, parse, ref_root, walk};

/// Bounds and extra inputs of the check.
#[derive(Clone, Debug)]
pub struct VerifyOptions {
    /// Check at all (on by default; off only for tools that compare engines themselves).
    pub enabled: bool,
    /// Inputs generated from the policy (besides the tests' inputs and the sample).
    pub generated_inputs: usize,
    /// Wall-clock budget of the whole check; inputs not reached are not checked.
    pub time_budget: Duration,
    /// Recently seen inputs (e.g. sampled by the sidecar), checked first.
    pub sample: Vec<Value>,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        Self {
            enabled: true,
            generated_inputs: 200,
            time_budget: Duration::from_secs(2),
            sample: Vec::new(),
        }
    }
}

/// Where a checked input came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputSource {
    /// A `with input as` of the revision's tests.
    Test,
    /// A variation of a test's input.
    TestVariation,
    /// Generated from the policy's input references.
    Generated,
    /// The caller's sample of recent inputs.
    Sample,
}

impl std::fmt::Display for InputSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Test => "a test's input",
            Self::TestVariation => "a variation of a test's input",
            Self::Generated => "a generated input",
            Self::Sample => "a recent input",
        })
    }
}

/// An input on which the RVM and the interpreter answered differently.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disagreement {
    /// Where the input came from.
    pub source: InputSource,
    /// The input (JSON).
    pub input: String,
    /// The RVM's answer.
    pub compiled: String,
    /// The interpreter's answer.
    pub interpreted: String,
}

/// What the check did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verification {
    /// Inputs checked in all.
    pub checked: usize,
    /// Of which from the tests (and their variations).
    pub from_tests: usize,
    /// Of which generated.
    pub generated: usize,
    /// Of which from the sample.
    pub sampled: usize,
    /// The first disagreement, if any.
    pub disagreement: Option<Disagreement>,
    /// Whether the time budget ran out before every input was checked.
    pub budget_exhausted: bool,
}

/// An evaluation's answer as compared: a value, undefined, or an error.
pub(crate) fn show(result: &Result<Value, String>) -> String {
    match result {
        Ok(Value::Undefined) => "undefined".into(),
        Ok(v) => v.to_json_str().map_or_else(
            |_| format!("{v:?}"),
            |s| s.split_whitespace().collect::<Vec<_>>().join(" "),
        ),
        Err(e) => format!("error: {}", e.lines().last().unwrap_or_default()),
    }
}

/// Equal answers. Undefined and an error count as the same answer (no value: a deny
/// either way); regorus's interpreter raises errors where OPA and the RVM say
/// undefined (`some x in` over a number), which is no reason to leave the RVM.
fn same(a: &Result<Value, String>, b: &Result<Value, String>) -> bool {
    let value = |r: &Result<Value, String>| match r {
        Ok(Value::Undefined) | Err(_) => None,
        Ok(v) => Some(v.clone()),
    };
    value(a) == value(b)
}

/// Runs the check: `compiled` and `interpreted` evaluate the decision rule for an input.
pub(crate) fn run(
    inputs: Vec<(InputSource, Value)>,
    budget: Duration,
    compiled: &dyn Fn(Value) -> Result<Value, String>,
    interpreted: &dyn Fn(Value) -> Result<Value, String>,
) -> Verification {
    let started = Instant::now();
    let mut out = Verification::default();
    for (source, input) in inputs {
        if started.elapsed() > budget {
            out.budget_exhausted = true;
            break;
        }
        let c = compiled(input.clone());
        let i = interpreted(input.clone());
        out.checked += 1;
        match source {
            InputSource::Test | InputSource::TestVariation => out.from_tests += 1,
            InputSource::Generated => out.generated += 1,
            InputSource::Sample => out.sampled += 1,
        }
        if !same(&c, &i) {
            out.disagreement = Some(Disagreement {
                source,
                input: input.to_json_str().map_or_else(
                    |_| format!("{input:?}"),
                    |s| s.split_whitespace().collect::<Vec<_>>().join(" "),
                ),
                compiled: show(&c),
                interpreted: show(&i),
            });
            break;
        }
    }
    out
}

/// The name of the extension that records a test's input.
const CAPTURE: &str = "__nexus_capture_input";

/// The inputs the revision's tests evaluate with (`with input as X`): the tests run on
/// the interpreter with each `X` wrapped in a call that records it.
pub(crate) fn test_inputs(bundle: &Bundle, data: &Value, limit: usize) -> Vec<Value> {
    let captured: Arc<Mutex<Vec<Value>>> = Arc::new(Mutex::new(Vec::new()));
    let mut engine = regorus::Engine::new();
    if crate::builtins::register(&mut engine).is_err() {
        return Vec::new();
    }
    let sink = captured.clone();
    let registered = engine.add_extension(
        CAPTURE.to_string(),
        1,
        Box::new(move |mut args: Vec<Value>| {
            let v = args.pop().unwrap_or(Value::Undefined);
            if let Ok(mut list) = sink.lock()
                && list.len() < 10_000
            {
                list.push(v.clone());
            }
            Ok(v)
        }),
    );
    if registered.is_err() {
        return Vec::new();
    }
    let count = crate::rewrite::counts_runes(bundle);
    for module in &bundle.modules {
        let text = crate::rewrite::interpreter_text(&module.path, &module.text, count);
        if engine.add_policy(module.path.clone(), text).is_err() {
            return Vec::new();
        }
    }
    let mut rules = Vec::new();
    for module in &bundle.tests {
        let Some(ast) = parse(&module.path, &module.text) else {
            continue;
        };
        let mut edits = Vec::new();
        crate::rewrite::for_each_query(&ast, &mut |q, _| {
            for stmt in &q.stmts {
                for w in &stmt.with_mods {
                    if dotted(&w.refr).as_deref() == Some("input") {
                        edits.push((w.r#as.span().start as usize, format!("{CAPTURE}(")));
                        edits.push((w.r#as.span().end as usize, ")".to_string()));
                    }
                }
            }
        });
        edits.sort_by_key(|e| e.0);
        let mut text = String::new();
        let mut last = 0;
        for (at, insert) in edits {
            if at < last || at > module.text.len() || !module.text.is_char_boundary(at) {
                continue;
            }
            text.push_str(&module.text[last..at]);
            text.push_str(&insert);
            last = at;
        }
        text.push_str(&module.text[last..]);
        if engine
            .add_policy(module.path.clone(), text.clone())
            .is_err()
        {
            continue;
        }
        if let Some((package, names)) = crate::testing::test_rules(&text) {
            rules.extend(names.into_iter().map(|n| format!("data.{package}.{n}")));
        }
    }
    if engine.add_data(data.clone()).is_err() {
        return Vec::new();
    }
    engine.set_execution_timer_config(regorus::utils::limits::ExecutionTimerConfig {
        limit: Duration::from_secs(1),
        check_interval: std::num::NonZeroU32::MIN,
    });
    for rule in rules {
        // A test that fails or panics here is reported by `nexusctl policy test` and by
        // the sidecar's reload; here only its inputs matter.
        let _ = crate::panics::catch(|| engine.eval_rule(rule.clone()).map_err(|e| e.to_string()));
        if captured.lock().map(|l| l.len()).unwrap_or(0) >= limit {
            break;
        }
    }
    let list = captured.lock().map(|l| l.clone()).unwrap_or_default();
    let mut seen = BTreeSet::new();
    list.into_iter()
        .filter(|v| *v != Value::Undefined && seen.insert(v.clone()))
        .take(limit)
        .collect()
}

/// A small deterministic generator (xorshift64*), seeded from the revision.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: &str) -> Self {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in seed.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        Self(h | 1)
    }
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub(crate) fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    pub(crate) fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// One step of an input path: a field, or any element of a collection.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Step {
    Field(String),
    Any,
}

/// The input paths a policy reads and the values worth trying at each.
#[derive(Debug, Default)]
pub(crate) struct InputShape {
    paths: BTreeMap<Vec<Step>, BTreeSet<Value>>,
    /// Every string literal of the policy and the keys of the data's objects: values
    /// that may reach the policy through a variable (`some r in input.roles;
    /// data.perms[r]`), tried anywhere and as array elements.
    pool: BTreeSet<Value>,
}

fn data_keys(v: &Value, depth: usize, out: &mut BTreeSet<Value>) {
    if depth == 0 || out.len() >= 64 {
        return;
    }
    if let Value::Object(m) = v {
        for (k, child) in m.iter().take(32) {
            out.insert(k.clone());
            data_keys(child, depth - 1, out);
        }
    }
}

/// The steps of `input.a.b[x]` (None when not rooted at input).
fn input_steps(expr: &Expr) -> Option<Vec<Step>> {
    match expr {
        Expr::Var { value, .. } => (value.as_string().ok()?.as_ref() == "input").then(Vec::new),
        Expr::RefDot { refr, field, .. } => {
            let mut s = input_steps(refr)?;
            s.push(Step::Field(field.1.as_string().ok()?.to_string()));
            Some(s)
        }
        Expr::RefBrack { refr, index, .. } => {
            let mut s = input_steps(refr)?;
            s.push(match literal(index) {
                Some(Value::String(k)) => Step::Field(k.to_string()),
                _ => Step::Any,
            });
            Some(s)
        }
        _ => None,
    }
}

/// A literal's value (scalars, and arrays/sets of scalars).
fn literal(expr: &Expr) -> Option<Value> {
    match expr {
        Expr::String { value, .. }
        | Expr::RawString { value, .. }
        | Expr::Bool { value, .. }
        | Expr::Number { value, .. } => Some(value.clone()),
        Expr::Null { .. } => Some(Value::Null),
        _ => None,
    }
}

fn literals_of(expr: &Expr) -> Vec<Value> {
    match expr {
        Expr::Array { items, .. } | Expr::Set { items, .. } => {
            items.iter().filter_map(|i| literal(i)).collect()
        }
        other => literal(other).into_iter().collect(),
    }
}

/// The value at a static data path (`data.nexus.bindings`).
fn data_at<'a>(data: &'a Value, path: &str) -> Option<&'a Value> {
    let mut v = data;
    for part in path.split('.').skip(1) {
        v = match v {
            Value::Object(m) => m.get(&Value::from(part))?,
            _ => return None,
        };
    }
    Some(v)
}

impl InputShape {
    /// Reads the decision modules of `bundle`.
    pub(crate) fn of(bundle: &Bundle, data: &Value) -> Self {
        let mut shape = Self::default();
        data_keys(data, 4, &mut shape.pool);
        let asts: Vec<Ast> = bundle
            .modules
            .iter()
            .filter_map(|m| parse(&m.path, &m.text))
            .collect();
        for ast in &asts {
            for rule in &ast.policy {
                let mut visit = |e: &Expr| shape.visit(e, data);
                match rule.as_ref() {
                    regorus::unstable::Rule::Spec { head, bodies, .. } => {
                        match head {
                            regorus::unstable::RuleHead::Compr { assign, .. }
                            | regorus::unstable::RuleHead::Func { assign, .. } => {
                                if let Some(a) = assign {
                                    walk(&a.value, &mut visit);
                                }
                            }
                            regorus::unstable::RuleHead::Set { key, .. } => {
                                if let Some(k) = key {
                                    walk(k, &mut visit);
                                }
                            }
                        }
                        for body in bodies {
                            if let Some(a) = &body.assign {
                                walk(&a.value, &mut visit);
                            }
                            crate::compat::walk_query(&body.query, &mut visit);
                        }
                    }
                    regorus::unstable::Rule::Default { value, .. } => walk(value, &mut visit),
                }
            }
        }
        shape
    }

    fn add(&mut self, steps: Vec<Step>, values: impl IntoIterator<Item = Value>) {
        if steps.is_empty() || steps.len() > 8 {
            return;
        }
        let set = self.paths.entry(steps).or_default();
        for v in values {
            if set.len() < 32 {
                set.insert(v);
            }
        }
    }

    fn visit(&mut self, e: &Expr, data: &Value) {
        if let Expr::String { value, .. } = e
            && self.pool.len() < 128
        {
            self.pool.insert(value.clone());
        }
        if ref_root(e) == Some("input")
            && let Some(steps) = input_steps(e)
        {
            self.add(steps, []);
        }
        match e {
            Expr::BinExpr { lhs, rhs, .. }
            | Expr::BoolExpr { lhs, rhs, .. }
            | Expr::ArithExpr { lhs, rhs, .. }
            | Expr::AssignExpr { lhs, rhs, .. } => {
                for (a, b) in [(lhs, rhs), (rhs, lhs)] {
                    if let Some(steps) = input_steps(a) {
                        let values = literals_of(b);
                        self.add(steps, values);
                    }
                }
            }
            Expr::Membership {
                value, collection, ..
            } => {
                if let Some(steps) = input_steps(value) {
                    let mut values = literals_of(collection);
                    if let Some(path) = dotted(collection)
                        && let Some(v) = data_at(data, &path)
                    {
                        values.extend(members(v));
                    }
                    self.add(steps, values);
                }
                if let Some(mut steps) = input_steps(collection) {
                    steps.push(Step::Any);
                    self.add(steps, literals_of(value));
                }
            }
            Expr::Call { params, .. } => {
                let lits: Vec<Value> = params.iter().flat_map(|p| literals_of(p)).collect();
                for p in params {
                    if let Some(steps) = input_steps(p) {
                        let mut values = lits.clone();
                        for l in &lits {
                            if let Value::String(s) = l {
                                values.push(Value::from(format!("{s}x")));
                                values.push(Value::from(format!("x{s}")));
                            }
                        }
                        self.add(steps, values);
                    }
                }
            }
            Expr::RefBrack { refr, index, .. } => {
                if let Some(steps) = input_steps(index)
                    && let Some(path) = dotted(refr)
                    && path.starts_with("data.")
                    && let Some(v) = data_at(data, &path)
                {
                    let keys: Vec<Value> = match v {
                        Value::Object(m) => m.keys().take(16).cloned().collect(),
                        other => members(other),
                    };
                    self.add(steps, keys);
                }
            }
            _ => {}
        }
    }

    /// `n` inputs, each setting most of the paths read to a literal, a data key or a
    /// value of another type.
    pub(crate) fn generate(&self, rng: &mut Rng, n: usize) -> Vec<Value> {
        let generic = || {
            vec![
                Value::Null,
                Value::Bool(true),
                Value::Bool(false),
                Value::from(0u64),
                Value::from(1u64),
                Value::from(-1i64),
                Value::from(""),
                Value::from("x"),
                Value::new_array(),
                Value::new_object(),
            ]
        };
        let pool: Vec<Value> = self.pool.iter().cloned().collect();
        let paths: Vec<(&Vec<Step>, Vec<Value>)> = self
            .paths
            .iter()
            .map(|(p, v)| (p, v.iter().cloned().collect()))
            .collect();
        let mut out = Vec::new();
        if paths.is_empty() {
            return out;
        }
        for _ in 0..n {
            let mut input = Value::new_object();
            for (steps, values) in &paths {
                if rng.chance(15) {
                    continue;
                }
                let value = if !values.is_empty() && rng.chance(65) {
                    values[rng.below(values.len())].clone()
                } else if !pool.is_empty() && rng.chance(40) {
                    if rng.chance(50) {
                        pool[rng.below(pool.len())].clone()
                    } else {
                        let n = 1 + rng.below(3);
                        Value::from(
                            (0..n)
                                .map(|_| pool[rng.below(pool.len())].clone())
                                .collect::<Vec<_>>(),
                        )
                    }
                } else {
                    let g = generic();
                    g[rng.below(g.len())].clone()
                };
                set_path(&mut input, steps, value);
            }
            out.push(input);
        }
        out
    }
}

fn members(v: &Value) -> Vec<Value> {
    match v {
        Value::Array(a) => a.iter().take(16).cloned().collect(),
        Value::Set(s) => s.iter().take(16).cloned().collect(),
        Value::Object(m) => m.keys().take(16).cloned().collect(),
        other => vec![other.clone()],
    }
}

/// Sets `value` at `steps` in `doc`, creating objects (a field) and one-element arrays
/// (any element) on the way; a step through a scalar already set is skipped.
fn set_path(doc: &mut Value, steps: &[Step], value: Value) {
    let Some((first, rest)) = steps.split_first() else {
        *doc = value;
        return;
    };
    match first {
        Step::Field(k) => {
            if *doc == Value::Undefined || *doc == Value::Null {
                *doc = Value::new_object();
            }
            if let Ok(map) = doc.as_object_mut() {
                let key = Value::from(k.as_str());
                let child = map.get_or_insert_with(key, || Value::Undefined);
                if rest.is_empty() || matches!(child, Value::Undefined | Value::Object(_)) {
                    set_path(child, rest, value);
                }
                if *child == Value::Undefined {
                    map.remove(&Value::from(k.as_str()));
                }
            }
        }
        Step::Any => {
            if *doc == Value::Undefined {
                *doc = Value::new_array();
            }
            if let Ok(items) = doc.as_array_mut() {
                let mut child = Value::Undefined;
                set_path(&mut child, rest, value);
                if child != Value::Undefined {
                    items.push(child);
                }
            }
        }
    }
}

/// Variations of a test input: each leaf removed, or replaced by another value.
pub(crate) fn variations(input: &Value, rng: &mut Rng, n: usize) -> Vec<Value> {
    let mut leaves = Vec::new();
    collect_leaves(input, &mut Vec::new(), &mut leaves);
    let mut out = Vec::new();
    if leaves.is_empty() {
        return out;
    }
    let replacements = [
        Value::Undefined,
        Value::Null,
        Value::Bool(true),
        Value::Bool(false),
        Value::from(0u64),
        Value::from(""),
        Value::from("x"),
        Value::new_array(),
        Value::new_object(),
    ];
    for _ in 0..n {
        let path = &leaves[rng.below(leaves.len())];
        let with = replacements[rng.below(replacements.len())].clone();
        let mut copy = input.clone();
        replace_at(&mut copy, path, with);
        out.push(copy);
    }
    out
}

fn collect_leaves(v: &Value, path: &mut Vec<Value>, out: &mut Vec<Vec<Value>>) {
    if out.len() > 256 || path.len() > 8 {
        return;
    }
    match v {
        Value::Object(m) => {
            for (k, child) in m.iter() {
                path.push(k.clone());
                out.push(path.clone());
                collect_leaves(child, path, out);
                path.pop();
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                path.push(Value::from(i as u64));
                out.push(path.clone());
                collect_leaves(child, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

fn replace_at(doc: &mut Value, path: &[Value], with: Value) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    if rest.is_empty() {
        match doc {
            Value::Object(_) => {
                if let Ok(map) = doc.as_object_mut() {
                    if with == Value::Undefined {
                        map.remove(first);
                    } else {
                        map.insert(first.clone(), with);
                    }
                }
            }
            Value::Array(_) => {
                if let (Ok(items), Ok(i)) = (doc.as_array_mut(), first.as_u64()) {
                    let i = i as usize;
                    if i < items.len() {
                        if with == Value::Undefined {
                            let mut n = 0;
                            items.retain(|_| {
                                n += 1;
                                n - 1 != i
                            });
                        } else if let Some(slot) = items.get_mut(i) {
                            *slot = with;
                        }
                    }
                }
            }
            _ => {}
        }
        return;
    }
    match doc {
        Value::Object(_) => {
            if let Ok(map) = doc.as_object_mut()
                && let Some(child) = map.get_mut(first)
            {
                replace_at(child, rest, with);
            }
        }
        Value::Array(_) => {
            if let (Ok(items), Ok(i)) = (doc.as_array_mut(), first.as_u64())
                && let Some(child) = items.get_mut(i as usize)
            {
                replace_at(child, rest, with);
            }
        }
        _ => {}
    }
}

/// Every input to check, in order: the sample, the tests' inputs, their variations,
/// then generated ones.
pub(crate) fn inputs(
    bundle: &Bundle,
    data: &Value,
    options: &VerifyOptions,
) -> Vec<(InputSource, Value)> {
    let mut rng = Rng::new(&bundle.revision);
    let mut out: Vec<(InputSource, Value)> = options
        .sample
        .iter()
        .take(1_000)
        .map(|v| (InputSource::Sample, v.clone()))
        .collect();
    let tests = test_inputs(bundle, data, 200);
    let mut varied = Vec::new();
    for t in &tests {
        varied.extend(variations(t, &mut rng, 4));
    }
    out.extend(tests.into_iter().map(|v| (InputSource::Test, v)));
    out.extend(varied.into_iter().map(|v| (InputSource::TestVariation, v)));
    let shape = InputShape::of(bundle, data);
    out.push((InputSource::Generated, Value::new_object()));
    out.extend(
        shape
            .generate(&mut rng, options.generated_inputs)
            .into_iter()
            .map(|v| (InputSource::Generated, v)),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::Module;

    #[test]
    fn the_first_disagreement_stops_the_check_and_is_reported() {
        let inputs = vec![
            (InputSource::Test, Value::from(1u64)),
            (InputSource::Generated, Value::from(2u64)),
            (InputSource::Generated, Value::from(3u64)),
        ];
        let v = run(
            inputs,
            Duration::from_secs(5),
            &|i| {
                Ok(if i == Value::from(2u64) {
                    Value::Bool(true)
                } else {
                    Value::Undefined
                })
            },
            &|i| {
                if i == Value::from(1u64) {
                    Err("boom".into())
                } else {
                    Ok(Value::Undefined)
                }
            },
        );
        // Undefined and an error are the same answer (no value); true is not.
        assert_eq!(v.checked, 2);
        let d = v.disagreement.unwrap();
        assert_eq!(
            (d.source, d.compiled.as_str(), d.interpreted.as_str()),
            (InputSource::Generated, "true", "undefined")
        );
    }

    #[test]
    fn test_inputs_are_captured() {
        let b = Bundle::from_modules(
            vec![
                Module {
                    path: "p.rego".into(),
                    text: "package p\n\nallow if input.user == \"alice\"\n".into(),
                },
                Module {
                    path: "p_test.rego".into(),
                    text: "package p_test\n\nimport data.p\n\ntest_a if p.allow with input as {\"user\": \"alice\"}\n\ntest_b if { i := {\"user\": \"bob\"}; not p.allow with input as i }\n".into(),
                },
            ],
            Value::new_object(),
        );
        let got = test_inputs(&b, &Value::new_object(), 10);
        assert_eq!(got.len(), 2, "{got:?}");
    }

    #[test]
    fn generated_inputs_use_the_policy_literals_and_data_keys() {
        let b = Bundle::from_modules(
            vec![Module {
                path: "p.rego".into(),
                text: "package p\n\nallow if { input.role == \"admin\"; data.users[input.user]; startswith(input.path, \"/api/\") }\n".into(),
            }],
            Value::new_object(),
        );
        let data = Value::from(serde_json::json!({"users": {"u1": true}}));
        let shape = InputShape::of(&b, &data);
        let inputs = shape.generate(&mut Rng::new("x"), 100);
        let has = |path: &str, v: &str| {
            inputs.iter().any(|i| {
                i[path]
                    .as_string()
                    .map(|s| s.as_ref() == v)
                    .unwrap_or(false)
            })
        };
        assert!(has("role", "admin"));
        assert!(has("user", "u1"));
        assert!(has("path", "/api/"));
    }
}
