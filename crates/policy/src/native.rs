//! nexus's own evaluator for the Rego most decision policies are written in (issue 15:
//! a decision in about a microsecond where regorus's RVM takes ten).
//!
//! It evaluates the text regorus's interpreter evaluates (the modules after `rewrite`'s
//! interpreter rewrites), with the interpreter's semantics: the same values, the same
//! comparisons (regorus's `Value` order), the same builtins (regorus's own functions and
//! nexus's extensions are called, not reimplemented), undefined where the interpreter
//! is undefined. It is not trusted on that claim alone:
//! - what it cannot evaluate exactly as the interpreter does is refused when the
//!   revision is compiled (`compile` names the construct and its line), and the
//!   revision is served as before (RVM or interpreter);
//! - what it meets only at run time and does not model (a conflict between two values
//!   of a complete rule, a head that is undefined, iteration over a non-collection, a
//!   builtin's resource limit, the step budget) makes it give up on that one input
//!   (`Bail`): the RVM, or the interpreter, evaluates it instead;
//! - before a revision serves natively, its answers are compared with the
//!   interpreter's on the same inputs the RVM is checked on (`verify`); a disagreement
//!   keeps the revision off this evaluator.
//!
//! What it takes: complete rules (with `else` chains and `default`), partial set rules
//! (`contains`), `some x in` / `some k, v in` over collections, `not`, `:=` (also the
//! `[a, b] := [x, y]` form the rewrites write), comparisons, `in` as a statement, refs
//! into `input`, base `data` and rules (bare names in the package, `data.pkg.rule`
//! anywhere), array/set/object literals, array and set comprehensions, and calls of
//! deterministic builtins. Everything else (functions, partial objects, `with`,
//! `every`, arithmetic, unification with `=`, imports other than `rego.v1` and
//! `future.keywords`, non-deterministic builtins) keeps the revision where it was.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use regorus::Value;
use regorus::unstable::{
    AssignOp, BoolOp, Expr, Literal, Module as Ast, Query, Ref, Rule, RuleHead, Span,
};
use smallvec::SmallVec;

use crate::compat::{dotted, location, parse};

/// Why a revision is not evaluated natively: the construct and where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// `file:line:col`.
    pub location: String,
    /// What it is.
    pub construct: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.location, self.construct)
    }
}

fn refuse(span: &Span, construct: impl Into<String>) -> Refusal {
    Refusal {
        location: location(span).to_string(),
        construct: construct.into(),
    }
}

/// Why one evaluation was handed to the other engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Bail {
    /// Two different values for one complete rule (the interpreter raises an error).
    Conflict,
    /// A rule head or comprehension head without a value.
    UndefinedHead,
    /// A value the construct is not modelled for (iteration over a scalar, ...).
    Unmodelled,
    /// A builtin reported a resource limit.
    Limit,
    /// More steps than the budget.
    Budget,
    /// Past the evaluation's deadline: not handed on, a deny (`evaluate_value`).
    Timeout,
    /// A rule reached itself.
    Recursion,
}

type RuleId = usize;

/// Who a call goes to.
#[derive(Debug)]
enum Callee {
    /// regorus's builtin, with the call's span and parameter expressions it takes.
    Regorus {
        f: regorus::unstable::BuiltinFcn,
        span: Span,
        params: Vec<Ref<Expr>>,
    },
    /// A nexus extension (the interpreter looks these up first).
    Nexus(&'static str),
    /// `__nexus_member(v, c)`.
    Member,
    /// `__nexus_iter(c)`.
    Iter,
    /// A type test (`is_string`, ...), answered here as regorus answers it.
    IsType(fn(&Value) -> bool),
    /// `concat` of an array or set of strings here; anything else goes to regorus's.
    Concat(Box<Callee>),
    /// `count` of an array, set or object here (its length, as regorus's); anything
    /// else goes to regorus's.
    Count(Box<Callee>),
    /// `sort` of an array or set here (regorus's order); anything else goes to
    /// regorus's.
    Sort(Box<Callee>),
}

#[derive(Debug)]
enum E {
    Const(Value),
    Input,
    /// `input.a.b` (static steps), looked up once per evaluation.
    InputPath(usize, Vec<Value>),
    /// `data.a.b` (static steps): the value the revision's data has there, resolved
    /// once per data revision (`DataIndex`, slot) instead of walked per evaluation.
    Data(usize, Vec<Value>),
    Local(usize),
    Rule(RuleId),
    Index(Box<E>, Box<E>),
    /// `data.path[key]`, looked up in the revision's hash index of that object when it
    /// has one (`DataIndex`).
    DataIndex(usize, Box<E>, Box<E>),
    Array(Vec<E>),
    Set(Vec<E>),
    Object(Vec<(E, E)>),
    /// An object literal whose keys are distinct constants: a copy of `shape` (those
    /// keys, sorted, in regorus's compact form) with each value set in place, so that no
    /// map is built and converted per evaluation.
    Record(Value, Vec<(Value, E)>),
    ArrayCompr(Box<E>, Vec<Stmt>),
    SetCompr(Box<E>, Vec<Stmt>),
    Call(Callee, Vec<E>),
    Cmp(BoolOp, Box<E>, Box<E>),
    /// `v in c` (a statement).
    Member(Box<E>, Box<E>),
}

#[derive(Debug)]
enum Stmt {
    Expr(E),
    Not(E),
    Assign(Vec<Option<usize>>, Vec<E>),
    SomeIn {
        key: Option<usize>,
        value: Option<usize>,
        collection: E,
    },
}

#[derive(Debug)]
struct Branch {
    /// The head's value for this branch (`None`: `true`; the member for a partial set).
    value: Option<E>,
    stmts: Vec<Stmt>,
    slots: usize,
}

#[derive(Debug)]
enum Kind {
    Complete,
    PartialSet,
}

#[derive(Debug)]
struct CompiledRule {
    kind: Kind,
    /// Each definition is a chain of branches (`else`).
    defs: Vec<Vec<Branch>>,
    default: Option<E>,
}

/// A revision compiled for the native evaluator.
#[derive(Debug)]
pub(crate) struct Program {
    rules: Vec<CompiledRule>,
    entry: RuleId,
    max_steps: usize,
    /// Values one evaluation may make (`Cx::own`); `PolicyOptions::max_made_values`.
    max_made: usize,
    /// The base data paths the rules index with a key (`data.nexus.bindings[x]`).
    indexed: Vec<Vec<Value>>,
    /// The distinct static input paths the rules read (`E::InputPath`'s slots).
    input_paths: Vec<Vec<Value>>,
    /// The distinct static base data paths the rules read (`E::Data`'s slots).
    data_paths: Vec<Vec<Value>>,
    /// Whether the entry rule's decision can be read straight off its branches
    /// (`Program::decide_until`): one definition (an `else` chain) whose bodies have one
    /// solution at most (no `some ... in` of their own), so that no two values of it are
    /// ever compared and the first solution is the rule's value.
    direct: bool,
}

/// Objects of the data with at least this many entries, all keyed by strings, get a
/// hash index: a lookup hashes the key once instead of comparing it with a dozen keys
/// (SPIFFE IDs share a long prefix).
const INDEX_FROM: usize = 32;

/// What a program reads of one data revision, found once (`Program::index`): hash
/// indexes of the objects at its indexed data paths, and the values at its static data
/// paths. A default (empty) one makes the evaluator walk the data instead.
#[derive(Debug, Default)]
pub(crate) struct DataIndex {
    maps: Vec<Option<HashMap<regorus::Rc<str>, Value, foldhash::fast::RandomState>>>,
    values: Vec<Value>,
}

/// One definition of a rule in the source.
struct Source<'a> {
    rule: &'a Rule,
    package: String,
}

struct Compiler<'a> {
    /// `data.pkg.name` → definitions.
    sources: BTreeMap<String, Vec<Source<'a>>>,
    ids: HashMap<String, RuleId>,
    rules: Vec<Option<CompiledRule>>,
    queue: Vec<(RuleId, String)>,
    indexed: Vec<Vec<Value>>,
    input_paths: Vec<Vec<Value>>,
    data_paths: Vec<Vec<Value>>,
}

/// Locals of one branch while it is compiled.
#[derive(Default)]
struct Scope {
    names: Vec<(String, usize)>,
    slots: usize,
}

impl Scope {
    fn get(&self, name: &str) -> Option<usize> {
        self.names
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, s)| *s)
    }

    fn declare(&mut self, name: &str) -> usize {
        let slot = self.slots;
        self.slots += 1;
        self.names.push((name.to_string(), slot));
        slot
    }
}

/// Builtins never called here: those whose value is not a function of their arguments
/// (the clock, randomness, the network: `cache::NON_DETERMINISTIC`), and those that
/// read the interpreter's own state.
fn impure(name: &str) -> bool {
    const INTERPRETER_STATE: &[&str] = &[
        "rego.metadata.chain",
        "rego.metadata.rule",
        "rego.parse_module",
    ];
    crate::cache::NON_DETERMINISTIC.contains(&name)
        || INTERPRETER_STATE.contains(&name)
        || regorus::unstable::must_cache(name).is_some()
}

fn var_name(e: &Expr) -> Option<&str> {
    match e {
        Expr::Var { value, .. } => value.as_string().ok().map(|s| s.as_ref()),
        _ => None,
    }
}

fn package_path(ast: &Ast) -> Option<String> {
    let p = dotted(&ast.package.refr)?;
    Some(if p.starts_with("data.") {
        p
    } else {
        format!("data.{p}")
    })
}

/// Compiles `rule` (`data.pkg.name`) of `texts` (path, interpreter text) for the native
/// evaluator, or says what keeps it out.
pub(crate) fn compile(
    texts: &[(String, String)],
    rule: &str,
    max_steps: usize,
) -> Result<Program, Refusal> {
    let mut asts = Vec::new();
    for (path, text) in texts {
        let ast = parse(path, text).ok_or_else(|| Refusal {
            location: path.clone(),
            construct: "a module the parser refuses".into(),
        })?;
        asts.push(ast);
    }
    let mut sources: BTreeMap<String, Vec<Source<'_>>> = BTreeMap::new();
    for ast in &asts {
        for import in &ast.imports {
            let name = dotted(&import.refr).unwrap_or_default();
            if !(name == "rego.v1" || name.starts_with("future.keywords")) {
                return Err(refuse(&import.span, format!("`import {name}`")));
            }
        }
        let package = package_path(ast)
            .ok_or_else(|| refuse(&ast.package.span, "a package path with brackets"))?;
        for rule in &ast.policy {
            let Some((name, _)) = crate::compat::rule_name(rule) else {
                return Err(refuse(rule.span(), "a rule head that is not a name"));
            };
            sources
                .entry(format!("{package}.{name}"))
                .or_default()
                .push(Source {
                    rule,
                    package: package.clone(),
                });
        }
    }
    let mut compiler = Compiler {
        sources,
        ids: HashMap::new(),
        rules: Vec::new(),
        queue: Vec::new(),
        indexed: Vec::new(),
        input_paths: Vec::new(),
        data_paths: Vec::new(),
    };
    let entry = compiler.rule_id(rule).ok_or_else(|| Refusal {
        location: String::new(),
        construct: format!("no rule {rule}"),
    })?;
    while let Some((id, path)) = compiler.queue.pop() {
        let compiled = compiler.compile_rule(&path)?;
        compiler.rules[id] = Some(compiled);
    }
    let rules = compiler
        .rules
        .into_iter()
        .map(|r| {
            r.ok_or_else(|| Refusal {
                location: String::new(),
                construct: "a rule left uncompiled".into(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let rules = inline_aliases(rules, entry);
    let direct = rules.get(entry).is_some_and(|rule| {
        matches!(rule.kind, Kind::Complete)
            && rule.defs.len() == 1
            && rule.defs[0].iter().all(|branch| {
                !branch
                    .stmts
                    .iter()
                    .any(|s| matches!(s, Stmt::SomeIn { .. }))
            })
    });
    Ok(Program {
        rules,
        entry,
        max_steps,
        max_made: MAX_MADE,
        indexed: compiler.indexed,
        input_paths: compiler.input_paths,
        data_paths: compiler.data_paths,
        direct,
    })
}

impl<'a> Compiler<'a> {
    fn rule_id(&mut self, path: &str) -> Option<RuleId> {
        if let Some(id) = self.ids.get(path) {
            return Some(*id);
        }
        if !self.sources.contains_key(path) {
            return None;
        }
        let id = self.rules.len();
        self.rules.push(None);
        self.ids.insert(path.to_string(), id);
        self.queue.push((id, path.to_string()));
        Some(id)
    }

    /// Whether some rule lives under `prefix.` (a virtual document the evaluator does
    /// not assemble).
    fn rules_under(&self, prefix: &str) -> bool {
        let dotted = format!("{prefix}.");
        self.sources
            .range(dotted.clone()..)
            .next()
            .is_some_and(|(k, _)| k.starts_with(&dotted))
    }

    fn compile_rule(&mut self, path: &str) -> Result<CompiledRule, Refusal> {
        let defs: Vec<(&'a Rule, String)> = self.sources[path]
            .iter()
            .map(|s| (s.rule, s.package.clone()))
            .collect();
        let mut kind = None;
        let mut out_defs = Vec::new();
        let mut default = None;
        for (rule, package) in defs {
            match rule {
                Rule::Default {
                    span, args, value, ..
                } => {
                    if !args.is_empty() {
                        return Err(refuse(span, "a default function"));
                    }
                    let mut scope = Scope::default();
                    default = Some(self.expr(value, &package, &mut scope)?);
                }
                Rule::Spec { span, head, bodies } => {
                    let (this, refr, value) = match head {
                        RuleHead::Compr { refr, assign, .. } => {
                            if let Some(a) = assign
                                && a.op != AssignOp::ColEq
                                && a.op != AssignOp::Eq
                            {
                                return Err(refuse(span, "an assignment operator"));
                            }
                            (Kind::Complete, refr, assign.as_ref().map(|a| &a.value))
                        }
                        RuleHead::Set { refr, key, .. } => match key {
                            Some(k) => (Kind::PartialSet, refr, Some(k)),
                            None => return Err(refuse(span, "a set rule without a member")),
                        },
                        RuleHead::Func { .. } => return Err(refuse(span, "a function")),
                    };
                    if var_name(refr).is_none() {
                        return Err(refuse(
                            span,
                            "a rule whose head is a ref (a partial object or a nested name)",
                        ));
                    }
                    match (&kind, &this) {
                        (None, _) => kind = Some(this),
                        (Some(Kind::Complete), Kind::Complete)
                        | (Some(Kind::PartialSet), Kind::PartialSet) => {}
                        _ => {
                            return Err(refuse(
                                span,
                                "complete and partial definitions of one rule",
                            ));
                        }
                    }
                    let mut chain = Vec::new();
                    for (i, body) in bodies.iter().enumerate() {
                        let value = if i == 0 {
                            value
                        } else {
                            body.assign.as_ref().map(|a| &a.value)
                        };
                        let mut scope = Scope::default();
                        let stmts = self.query(&body.query, &package, &mut scope)?;
                        let value = match value {
                            Some(v) => Some(self.expr(v, &package, &mut scope)?),
                            None => None,
                        };
                        chain.push(Branch {
                            value,
                            stmts,
                            slots: scope.slots,
                        });
                    }
                    if chain.is_empty() {
                        // `x := 1` without a body.
                        let mut scope = Scope::default();
                        let value = match value {
                            Some(v) => Some(self.expr(v, &package, &mut scope)?),
                            None => None,
                        };
                        chain.push(Branch {
                            value,
                            stmts: Vec::new(),
                            slots: scope.slots,
                        });
                    }
                    out_defs.push(chain);
                }
            }
        }
        let kind = kind.unwrap_or(Kind::Complete);
        if matches!(kind, Kind::PartialSet) && default.is_some() {
            return Err(Refusal {
                location: String::new(),
                construct: format!("a default for the set rule {path}"),
            });
        }
        Ok(CompiledRule {
            kind,
            defs: out_defs,
            default,
        })
    }

    fn query(&mut self, q: &Query, package: &str, scope: &mut Scope) -> Result<Vec<Stmt>, Refusal> {
        let mut out = Vec::new();
        for stmt in &q.stmts {
            if !stmt.with_mods.is_empty() {
                return Err(refuse(&stmt.span, "`with`"));
            }
            out.push(match &stmt.literal {
                Literal::Expr { expr, span } => match expr.as_ref() {
                    Expr::AssignExpr { op, lhs, rhs, .. } => {
                        if *op != AssignOp::ColEq {
                            return Err(refuse(span, "unification (`=`)"));
                        }
                        // The value first: `x := x` reads an outer `x`.
                        match (lhs.as_ref(), rhs.as_ref()) {
                            (Expr::Var { .. }, _) => {
                                let value = self.expr(rhs, package, scope)?;
                                let slot = self.bind(lhs, scope)?;
                                Stmt::Assign(vec![slot], vec![value])
                            }
                            (
                                Expr::Array { items: names, .. },
                                Expr::Array { items: values, .. },
                            ) if names.len() == values.len() => {
                                let values = values
                                    .iter()
                                    .map(|v| self.expr(v, package, scope))
                                    .collect::<Result<Vec<_>, _>>()?;
                                let slots = names
                                    .iter()
                                    .map(|n| self.bind(n, scope))
                                    .collect::<Result<Vec<_>, _>>()?;
                                Stmt::Assign(slots, values)
                            }
                            _ => return Err(refuse(span, "a destructuring assignment")),
                        }
                    }
                    _ => Stmt::Expr(self.condition(expr, package, scope)?),
                },
                Literal::NotExpr { expr, .. } => Stmt::Not(self.condition(expr, package, scope)?),
                Literal::SomeIn {
                    key,
                    value,
                    collection,
                    span,
                } => {
                    let collection = self.expr(collection, package, scope)?;
                    let key = match key {
                        Some(k) => self.bind(k, scope)?,
                        None => None,
                    };
                    if var_name(value).is_none() {
                        return Err(refuse(span, "`some` with a pattern"));
                    }
                    let value = self.bind(value, scope)?;
                    Stmt::SomeIn {
                        key,
                        value,
                        collection,
                    }
                }
                Literal::SomeVars { span, .. } => {
                    return Err(refuse(span, "`some x` without `in`"));
                }
                Literal::Every { span, .. } => return Err(refuse(span, "`every`")),
            });
        }
        Ok(out)
    }

    /// An expression standing as a statement (or negated): `v in c` is a membership
    /// test there (as a value it is refused: the rewrites make it a call).
    fn condition(&mut self, e: &Expr, package: &str, scope: &mut Scope) -> Result<E, Refusal> {
        match e {
            Expr::Membership {
                key: None,
                value,
                collection,
                ..
            } => Ok(E::Member(
                Box::new(self.expr(value, package, scope)?),
                Box::new(self.expr(collection, package, scope)?),
            )),
            _ => self.expr(e, package, scope),
        }
    }

    /// A new local (`None` for `_`).
    fn bind(&mut self, e: &Expr, scope: &mut Scope) -> Result<Option<usize>, Refusal> {
        let Some(name) = var_name(e) else {
            return Err(refuse(e.span(), "a pattern where a name is bound"));
        };
        if name == "_" {
            return Ok(None);
        }
        if name == "input" || name == "data" || scope.get(name).is_some() {
            return Err(refuse(e.span(), format!("`{name}` bound again")));
        }
        Ok(Some(scope.declare(name)))
    }

    fn expr(&mut self, e: &Expr, package: &str, scope: &mut Scope) -> Result<E, Refusal> {
        Ok(match e {
            Expr::String { value, .. }
            | Expr::RawString { value, .. }
            | Expr::Number { value, .. }
            | Expr::Bool { value, .. }
            | Expr::Null { value, .. } => E::Const(value.clone()),
            Expr::Var { .. } | Expr::RefDot { .. } | Expr::RefBrack { .. } => {
                self.reference(e, package, scope)?
            }
            Expr::Array { items, .. } => {
                let items = self.exprs(items, package, scope)?;
                fold(E::Array(items))
            }
            Expr::Set { items, .. } => {
                let items = self.exprs(items, package, scope)?;
                fold(E::Set(items))
            }
            Expr::Object { fields, .. } => {
                let mut out = Vec::new();
                for (_, k, v) in fields {
                    out.push((self.expr(k, package, scope)?, self.expr(v, package, scope)?));
                }
                fold(E::Object(out))
            }
            Expr::ArrayCompr { term, query, .. } | Expr::SetCompr { term, query, .. } => {
                // The comprehension's locals live after the enclosing ones and go out of
                // scope after it.
                let names = scope.names.len();
                let stmts = self.query(query, package, scope)?;
                let head = self.expr(term, package, scope)?;
                scope.names.truncate(names);
                if matches!(e, Expr::ArrayCompr { .. }) {
                    E::ArrayCompr(Box::new(head), stmts)
                } else {
                    E::SetCompr(Box::new(head), stmts)
                }
            }
            Expr::Call {
                span, fcn, params, ..
            } => {
                let Some(name) = dotted(fcn) else {
                    return Err(refuse(span, "a call of a computed function"));
                };
                let local = format!("{package}.{name}");
                if self.sources.contains_key(&local)
                    || (name.starts_with("data.") && self.sources.contains_key(&name))
                {
                    return Err(refuse(span, format!("a call of the function `{name}`")));
                }
                let callee = match name.as_str() {
                    "__nexus_member" => Callee::Member,
                    "__nexus_iter" => Callee::Iter,
                    n if crate::builtins::names().any(|b| b == n) => {
                        let nexus = crate::builtins::names().find(|b| *b == n);
                        match nexus {
                            Some(b) => Callee::Nexus(b),
                            None => return Err(refuse(span, format!("`{name}`"))),
                        }
                    }
                    n if type_test(n).is_some() && params.len() == 1 => {
                        Callee::IsType(type_test(n).unwrap_or(|_| false))
                    }
                    n => {
                        if impure(n) {
                            return Err(refuse(
                                span,
                                format!("`{name}`, whose value is not its arguments'"),
                            ));
                        }
                        let Some(f) = regorus::unstable::BUILTINS.get(n) else {
                            return Err(refuse(span, format!("`{name}`, no builtin")));
                        };
                        if usize::from(f.1) != params.len() {
                            return Err(refuse(span, format!("`{name}` with an output argument")));
                        }
                        let regorus = Callee::Regorus {
                            f: *f,
                            span: span.clone(),
                            params: params.clone(),
                        };
                        match n {
                            "concat" => Callee::Concat(Box::new(regorus)),
                            "count" => Callee::Count(Box::new(regorus)),
                            "sort" => Callee::Sort(Box::new(regorus)),
                            _ => regorus,
                        }
                    }
                };
                E::Call(callee, self.exprs(params, package, scope)?)
            }
            Expr::BoolExpr { op, lhs, rhs, .. } => E::Cmp(
                op.clone(),
                Box::new(self.expr(lhs, package, scope)?),
                Box::new(self.expr(rhs, package, scope)?),
            ),
            Expr::Membership { span, .. } => {
                return Err(refuse(span, "`in` used as a value"));
            }
            other => return Err(refuse(other.span(), "an operator or form it does not take")),
        })
    }

    fn exprs(
        &mut self,
        items: &[Ref<Expr>],
        package: &str,
        scope: &mut Scope,
    ) -> Result<Vec<E>, Refusal> {
        items.iter().map(|i| self.expr(i, package, scope)).collect()
    }

    /// A var or a ref: a local, `input`, base data, or a rule and what follows it.
    fn reference(&mut self, e: &Expr, package: &str, scope: &mut Scope) -> Result<E, Refusal> {
        // Unroll `root.a[b].c` into the root and its steps.
        let mut steps: Vec<&Expr> = Vec::new();
        let mut fields: Vec<Option<Value>> = Vec::new();
        let mut root = e;
        loop {
            match root {
                Expr::RefDot { refr, field, .. } => {
                    fields.push(Some(field.1.clone()));
                    steps.push(root);
                    root = refr;
                }
                Expr::RefBrack { refr, index, .. } => {
                    fields.push(match index.as_ref() {
                        Expr::String { value, .. } | Expr::RawString { value, .. } => {
                            Some(value.clone())
                        }
                        _ => None,
                    });
                    steps.push(root);
                    root = refr;
                }
                _ => break,
            }
        }
        steps.reverse();
        fields.reverse();
        let Some(name) = var_name(root) else {
            return Err(refuse(e.span(), "a ref into a computed value"));
        };
        let (mut out, skip) = if name == "_" {
            return Err(refuse(root.span(), "`_` (iteration by a free variable)"));
        } else if let Some(slot) = scope.get(name) {
            (E::Local(slot), 0)
        } else if name == "input" {
            let taken = fields.iter().take_while(|f| f.is_some()).count();
            if taken == 0 {
                (E::Input, 0)
            } else {
                let path: Vec<Value> = fields[..taken].iter().flatten().cloned().collect();
                let slot = slot_of(&mut self.input_paths, &path);
                (E::InputPath(slot, path), taken)
            }
        } else if name == "data" {
            let mut path = "data".to_string();
            let mut taken = 0;
            let mut found = None;
            for f in &fields {
                let Some(Ok(s)) = f.as_ref().map(|v| v.as_string()) else {
                    break;
                };
                path.push('.');
                path.push_str(s);
                taken += 1;
                if let Some(id) = self.rule_id(&path) {
                    found = Some(id);
                    break;
                }
            }
            match found {
                Some(id) => (E::Rule(id), taken),
                None => {
                    if path == "data" || self.rules_under(&path) || self.sources.contains_key(&path)
                    {
                        return Err(refuse(e.span(), "a ref to a document holding rules"));
                    }
                    let values: Vec<Value> = fields[..taken]
                        .iter()
                        .map(|f| f.clone().unwrap_or(Value::Undefined))
                        .collect();
                    let slot = slot_of(&mut self.data_paths, &values);
                    (E::Data(slot, values), taken)
                }
            }
        } else if let Some(id) = self.rule_id(&format!("{package}.{name}")) {
            (E::Rule(id), 0)
        } else {
            return Err(refuse(root.span(), format!("the unbound name `{name}`")));
        };
        for step in &steps[skip..] {
            let index = match step {
                Expr::RefDot { field, .. } => E::Const(field.1.clone()),
                Expr::RefBrack { index, .. } => self.expr(index, package, scope)?,
                _ => unreachable!("only ref steps are collected"),
            };
            out = match out {
                E::Data(at, path) => {
                    let slot = slot_of(&mut self.indexed, &path);
                    E::DataIndex(slot, Box::new(E::Data(at, path)), Box::new(index))
                }
                other => E::Index(Box::new(other), Box::new(index)),
            };
        }
        Ok(out)
    }
}

/// What a rule is when it only names a value (`plugin := input.source.spiffe_id`: one
/// definition, no body, no `else`, no default, a value read without evaluating
/// anything): that value's expression, which a reference to the rule can read directly.
/// The rule's value is the expression's, undefined when it is, so the two are the same.
fn alias(rule: &CompiledRule) -> Option<E> {
    let (Kind::Complete, [chain], None) = (&rule.kind, rule.defs.as_slice(), &rule.default) else {
        return None;
    };
    let [branch] = chain.as_slice() else {
        return None;
    };
    if !branch.stmts.is_empty() {
        return None;
    }
    alias_copy(branch.value.as_ref()?)
}

/// Replaces each reference to an alias rule (`alias`) by the value it names: no memo,
/// no copy of the value per reference. The decision rule is left as it is.
fn inline_aliases(mut rules: Vec<CompiledRule>, entry: RuleId) -> Vec<CompiledRule> {
    let aliases: Vec<Option<E>> = rules
        .iter()
        .enumerate()
        .map(|(id, r)| if id == entry { None } else { alias(r) })
        .collect();
    if aliases.iter().all(Option::is_none) {
        return rules;
    }
    let named = |e: &E| match e {
        E::Rule(id) => aliases
            .get(*id)
            .and_then(|a| a.as_ref())
            .and_then(alias_copy),
        _ => None,
    };
    for rule in &mut rules {
        for chain in &mut rule.defs {
            for branch in chain {
                if let Some(v) = &mut branch.value {
                    rewrite(v, &named);
                }
                for stmt in &mut branch.stmts {
                    rewrite_stmt(stmt, &named);
                }
            }
        }
        if let Some(d) = &mut rule.default {
            rewrite(d, &named);
        }
    }
    rules
}

/// A copy of an alias's expression (`alias` makes only these kinds).
fn alias_copy(e: &E) -> Option<E> {
    match e {
        E::Const(v) => Some(E::Const(v.clone())),
        E::InputPath(slot, path) => Some(E::InputPath(*slot, path.clone())),
        E::Data(slot, path) => Some(E::Data(*slot, path.clone())),
        _ => None,
    }
}

/// Replaces, in `e` and everything under it, each expression `f` gives a replacement for.
fn rewrite(e: &mut E, f: &dyn Fn(&E) -> Option<E>) {
    if let Some(new) = f(e) {
        *e = new;
        return;
    }
    match e {
        E::Const(_) | E::Input | E::InputPath(..) | E::Data(..) | E::Local(_) | E::Rule(_) => {}
        E::Index(a, b) | E::DataIndex(_, a, b) | E::Cmp(_, a, b) | E::Member(a, b) => {
            rewrite(a, f);
            rewrite(b, f);
        }
        E::Array(items) | E::Set(items) | E::Call(_, items) => {
            for i in items {
                rewrite(i, f);
            }
        }
        E::Object(fields) => {
            for (k, v) in fields {
                rewrite(k, f);
                rewrite(v, f);
            }
        }
        E::Record(_, fields) => {
            for (_, v) in fields {
                rewrite(v, f);
            }
        }
        E::ArrayCompr(head, stmts) | E::SetCompr(head, stmts) => {
            rewrite(head, f);
            for s in stmts {
                rewrite_stmt(s, f);
            }
        }
    }
}

fn rewrite_stmt(s: &mut Stmt, f: &dyn Fn(&E) -> Option<E>) {
    match s {
        Stmt::Expr(e) | Stmt::Not(e) => rewrite(e, f),
        Stmt::Assign(_, values) => {
            for v in values {
                rewrite(v, f);
            }
        }
        Stmt::SomeIn { collection, .. } => rewrite(collection, f),
    }
}

/// The index of `path` in `paths`, added at the end when it is not there.
fn slot_of(paths: &mut Vec<Vec<Value>>, path: &[Value]) -> usize {
    match paths.iter().position(|p| p.as_slice() == path) {
        Some(i) => i,
        None => {
            paths.push(path.to_vec());
            paths.len() - 1
        }
    }
}

/// A literal collection of constants is one constant.
fn fold(e: E) -> E {
    let konst = |e: &E| matches!(e, E::Const(v) if *v != Value::Undefined);
    match e {
        E::Array(items) if items.iter().all(konst) => E::Const(Value::from(
            items
                .into_iter()
                .filter_map(|i| match i {
                    E::Const(v) => Some(v),
                    _ => None,
                })
                .collect::<Vec<_>>(),
        )),
        E::Set(items) if items.iter().all(konst) => E::Const(Value::from(
            items
                .into_iter()
                .filter_map(|i| match i {
                    E::Const(v) => Some(v),
                    _ => None,
                })
                .collect::<BTreeSet<_>>(),
        )),
        E::Object(fields) if fields.iter().all(|(k, v)| konst(k) && konst(v)) => {
            E::Const(Value::from(
                fields
                    .into_iter()
                    .filter_map(|(k, v)| match (k, v) {
                        (E::Const(k), E::Const(v)) => Some((k, v)),
                        _ => None,
                    })
                    .collect::<BTreeMap<_, _>>(),
            ))
        }
        E::Object(fields)
            if fields.iter().all(|(k, _)| konst(k))
                && fields
                    .iter()
                    .filter_map(|(k, _)| match k {
                        E::Const(k) => Some(k),
                        _ => None,
                    })
                    .collect::<BTreeSet<_>>()
                    .len()
                    == fields.len() =>
        {
            let fields: Vec<(Value, E)> = fields
                .into_iter()
                .filter_map(|(k, v)| match k {
                    E::Const(k) => Some((k, v)),
                    _ => None,
                })
                .collect();
            let shape = fields
                .iter()
                .map(|(k, _)| (k.clone(), Value::Null))
                .collect::<BTreeMap<_, _>>();
            E::Record(Value::from(shape), fields)
        }
        other => other,
    }
}

#[derive(Clone, Copy)]
enum Memo<'a> {
    Pending,
    Running,
    Done(V<'a>),
}

/// A value met while evaluating: borrowed from the program, the input or the data (most
/// values: no reference count touched), or made here and kept in the evaluation's arena
/// (`Cx::own`). A reference either way, so that a node's result (`Result<V, Bail>`) is
/// two words, returned in registers rather than moved through memory.
#[derive(Clone, Copy, Debug)]
struct V<'a>(&'a Value);

static UNDEFINED: Value = Value::Undefined;
static TRUE: Value = Value::Bool(true);
static FALSE: Value = Value::Bool(false);

impl<'a> V<'a> {
    const UNDEFINED: V<'static> = V(&UNDEFINED);

    fn get(&self) -> &'a Value {
        self.0
    }

    fn owned(self) -> Value {
        self.0.clone()
    }

    fn is_undefined(&self) -> bool {
        matches!(self.0, Value::Undefined)
    }

    fn bool(b: bool) -> V<'static> {
        V(if b { &TRUE } else { &FALSE })
    }

    /// `self[key]`.
    fn index(self, key: &Value) -> V<'a> {
        V(crate::cache::field(self.0, key))
    }
}

/// One evaluation's state.
struct Cx<'a> {
    input: &'a Value,
    data: &'a Value,
    index: &'a DataIndex,
    /// The values this evaluation makes (dropped with it).
    arena: &'a typed_arena::Arena<Value>,
    // On the stack up to `INLINE` of each: an evaluation of a small policy allocates
    // nothing for its own state but its arena.
    memo: SmallVec<[Memo<'a>; INLINE]>,
    /// Values at the static input paths, once read.
    inputs: SmallVec<[Option<&'a Value>; INLINE]>,
    locals: SmallVec<[V<'a>; INLINE]>,
    steps: usize,
    /// Values made and kept in `arena`, and how many may be.
    made: usize,
    max_made: usize,
    /// The clock is read every `CLOCK_EVERY` steps against this.
    deadline: Option<std::time::Instant>,
}

thread_local! {
    /// Where `concat` joins its strings (reused; a nested use would find it empty). A
    /// buffer grown past `crate::cache::KEEP_BUFFER` by a long input is not kept.
    static JOIN_BUFFER: std::cell::Cell<String> = const { std::cell::Cell::new(String::new()) };
}

/// How many rules, input paths and locals an evaluation keeps on the stack.
const INLINE: usize = 16;

/// Values one evaluation may make, unless set (`Program::set_max_made`).
pub(crate) const MAX_MADE: usize = 4096;

/// Values an evaluation's arena has room for before it grows (the reference policy's
/// decision makes about ten).
const ARENA: usize = 16;

impl<'a> Cx<'a> {
    /// `v`, kept for the rest of the evaluation: at most `Program::max_made` values
    /// (an evaluation that would make more is handed to the RVM, which frees what a
    /// loop's iteration made at the next).
    fn own(&mut self, v: Value) -> Result<V<'a>, Bail> {
        Ok(match v {
            Value::Undefined => V::UNDEFINED,
            Value::Bool(b) => V::bool(b),
            v => {
                self.made += 1;
                if self.made > self.max_made {
                    return Err(Bail::Limit);
                }
                V(self.arena.alloc(v))
            }
        })
    }
}

/// Steps between two readings of the clock.
const CLOCK_EVERY: usize = 256;

/// How a solution of a body is taken: `Ok(true)` to stop looking for more.
type Found<'f, 'a> = dyn FnMut(&'a Program, &mut Cx<'a>) -> Result<bool, Bail> + 'f;

fn undefined_or_false(v: &Value) -> bool {
    matches!(v, Value::Undefined | Value::Bool(false))
}

impl Program {
    /// The decision rule's value for `input` over `data` (`Value::Undefined` when it has
    /// none), or why the other engine must answer.
    #[cfg(test)]
    pub(crate) fn eval(
        &self,
        input: &Value,
        data: &Value,
        index: &DataIndex,
    ) -> Result<Value, Bail> {
        self.eval_until(input, data, index, None, &[])
    }

    /// `eval`, failing with `Bail::Timeout` past `deadline`. `known` are values the
    /// caller has already looked up in `input`, each with the slot of its path
    /// (`input_slot`), so that they are not looked up again.
    pub(crate) fn eval_until<'a>(
        &'a self,
        input: &'a Value,
        data: &'a Value,
        index: &'a DataIndex,
        deadline: Option<std::time::Instant>,
        known: &[(usize, &'a Value)],
    ) -> Result<Value, Bail> {
        let arena = typed_arena::Arena::with_capacity(ARENA);
        let mut cx = self.context(&arena, input, data, index, deadline, known);
        Ok(self.rule(&mut cx, self.entry)?.owned())
    }

    /// `eval_until`'s answer read as a decision (what `engine::decision_from` makes of
    /// the rule's value). Where the rule's chosen branch is an object literal
    /// (`{"allow": true, "reasons": [r]}`), the decision is read off its fields: no
    /// object and no reasons array are made, only the decision's reasons. Any other
    /// rule, branch or value is evaluated as `eval_until` does and read by
    /// `decision_from`.
    pub(crate) fn decide_until<'a>(
        &'a self,
        input: &'a Value,
        data: &'a Value,
        index: &'a DataIndex,
        deadline: Option<std::time::Instant>,
        known: &[(usize, &'a Value)],
    ) -> Result<crate::engine::Decision, Bail> {
        let arena = typed_arena::Arena::with_capacity(ARENA);
        let mut cx = self.context(&arena, input, data, index, deadline, known);
        if !self.direct {
            return Ok(crate::engine::decision_from(
                self.rule(&mut cx, self.entry)?.get(),
            ));
        }
        let rule = &self.rules[self.entry];
        // As `rule` does: the rule reached again while it runs is a recursion.
        cx.memo[self.entry] = Memo::Running;
        for branch in &rule.defs[0] {
            // A head `{...}` is compiled as the body's last statement assigning the
            // object to a local, the branch's value: the body runs without it, and the
            // object's decision is read off its fields. An undefined object fails the
            // body then (as the assignment does), where an undefined value is the
            // chain's.
            let (stmts, assigned) = match (&branch.value, branch.stmts.split_last()) {
                (Some(E::Local(local)), Some((Stmt::Assign(slots, values), before)))
                    if matches!(slots.as_slice(), [Some(s)] if s == local)
                        && matches!(values.as_slice(), [E::Record(Value::Object(_), _)]) =>
                {
                    (before, values.first())
                }
                _ => (branch.stmts.as_slice(), None),
            };
            let mut decided = None;
            // One solution at most (`direct`): the first is the branch's value.
            self.branch_over(&mut cx, branch, stmts, &mut |p, cx, base| {
                decided = match (assigned, &branch.value) {
                    (Some(E::Record(Value::Object(shape), fields)), _) => {
                        match p.record_decision(cx, base, shape, fields)? {
                            Some(decision) => Some(Some(decision)),
                            None => return Ok(false),
                        }
                    }
                    (_, Some(E::Record(Value::Object(shape), fields))) => {
                        Some(p.record_decision(cx, base, shape, fields)?)
                    }
                    (_, Some(e)) => {
                        let v = p.expr(cx, base, e)?;
                        Some((!v.is_undefined()).then(|| crate::engine::decision_from(v.get())))
                    }
                    (_, None) => Some(Some(crate::engine::decision_from(&TRUE))),
                };
                Ok(true)
            })?;
            match decided {
                Some(Some(decision)) => return Ok(decision),
                // The branch held with an undefined value: the chain's value is
                // undefined (`complete_def`), and the default is the rule's.
                Some(None) => break,
                None => {}
            }
        }
        let value = match &rule.default {
            Some(d) => {
                let base = cx.locals.len();
                self.expr(&mut cx, base, d)?
            }
            None => V::UNDEFINED,
        };
        Ok(crate::engine::decision_from(value.get()))
    }

    /// The decision an object literal's value gives (`decision_from` of it), or None
    /// when the object is undefined. A boolean `allow` and the reasons are read off the
    /// fields' values, a `reasons` array literal's items without the array; the object
    /// itself is made only when `allow` is not a boolean (the decision's error shows
    /// it).
    fn record_decision<'a>(
        &'a self,
        cx: &mut Cx<'a>,
        base: usize,
        shape: &'a regorus::value::Object,
        fields: &'a [(Value, E)],
    ) -> Result<Option<crate::engine::Decision>, Bail> {
        let named = |name: &str| {
            fields
                .iter()
                .position(|(k, _)| matches!(k, Value::String(k) if k.as_ref() == name))
        };
        let (allow_at, reasons_at) = (named("allow"), named("reasons"));
        let mut values: SmallVec<[V<'a>; 2]> = SmallVec::new();
        let mut reasons: Option<SmallVec<[V<'a>; 8]>> = None;
        for (at, (_, e)) in fields.iter().enumerate() {
            // An undefined field (or array item) makes the object undefined, as
            // `E::Record` and `E::Array` do.
            if Some(at) == reasons_at
                && let E::Array(items) = e
            {
                match self.defined(cx, base, items)? {
                    Some(items) => reasons = Some(items),
                    None => return Ok(None),
                }
                values.push(V::UNDEFINED);
                continue;
            }
            let v = self.expr(cx, base, e)?;
            if v.is_undefined() {
                return Ok(None);
            }
            values.push(v);
        }
        if let Some(at) = allow_at
            && let Value::Bool(allow) = values[at].get()
        {
            let reasons = match (reasons, reasons_at) {
                (Some(items), _) => items
                    .iter()
                    .map(|v| crate::engine::reason_text(v.get()))
                    .collect(),
                (None, Some(at)) => crate::engine::reasons_from(values[at].get()),
                (None, None) => crate::engine::reasons_from(&Value::Undefined),
            };
            return Ok(Some(crate::engine::Decision {
                allow: *allow,
                reasons,
                error: None,
            }));
        }
        let mut object = shape.clone();
        for (at, ((k, _), v)) in fields.iter().zip(values).enumerate() {
            let v = match &reasons {
                Some(items) if Some(at) == reasons_at => {
                    Value::from(items.iter().map(|v| v.owned()).collect::<Vec<_>>())
                }
                _ => v.owned(),
            };
            match object.get_mut(k) {
                Some(slot) => *slot = v,
                None => return Err(Bail::Unmodelled),
            }
        }
        Ok(Some(crate::engine::decision_from(&Value::Object(
            regorus::Rc::new(object),
        ))))
    }

    /// A fresh evaluation's state, with `known` input values in their slots.
    fn context<'a>(
        &'a self,
        arena: &'a typed_arena::Arena<Value>,
        input: &'a Value,
        data: &'a Value,
        index: &'a DataIndex,
        deadline: Option<std::time::Instant>,
        known: &[(usize, &'a Value)],
    ) -> Cx<'a> {
        let mut inputs: SmallVec<[Option<&'a Value>; INLINE]> =
            smallvec::smallvec![None; self.input_paths.len()];
        for &(slot, v) in known {
            if let Some(s) = inputs.get_mut(slot) {
                *s = Some(v);
            }
        }
        Cx {
            input,
            data,
            index,
            arena,
            memo: smallvec::smallvec![Memo::Pending; self.rules.len()],
            inputs,
            locals: SmallVec::new(),
            steps: 0,
            made: 0,
            max_made: self.max_made,
            deadline,
        }
    }

    /// How many values one evaluation may make and keep to its end (strings, arrays,
    /// objects, sets, numbers); past it the input is handed to the RVM.
    pub(crate) fn set_max_made(&mut self, max: usize) {
        self.max_made = max;
    }

    /// The slot of the static input path `path` (steps after `input`), if the rules
    /// read it.
    pub(crate) fn input_slot(&self, path: &[Value]) -> Option<usize> {
        self.input_paths.iter().position(|p| p.as_slice() == path)
    }

    /// Hash indexes of the large objects this program looks keys up in, in `data`.
    pub(crate) fn index(&self, data: &Value) -> DataIndex {
        let at = |path: &[Value]| {
            let mut v = data;
            for step in path {
                v = crate::cache::field(v, step);
            }
            v.clone()
        };
        DataIndex {
            values: self.data_paths.iter().map(|p| at(p)).collect(),
            maps: self
                .indexed
                .iter()
                .map(|path| {
                    let mut v = data;
                    for step in path {
                        v = &v[step];
                    }
                    let Value::Object(fields) = v else {
                        return None;
                    };
                    if fields.len() < INDEX_FROM {
                        return None;
                    }
                    // foldhash, not SipHash: the keys are the data's (the gateway's
                    // and the operator's), so no request can choose them to collide;
                    // a request only looks one up, at a fifth of SipHash's cost for a
                    // SPIFFE ID. Seeded per index all the same.
                    let mut map = HashMap::with_capacity_and_hasher(
                        fields.len(),
                        foldhash::fast::RandomState::default(),
                    );
                    for (k, v) in fields.iter() {
                        let Value::String(k) = k else {
                            return None;
                        };
                        map.insert(k.clone(), v.clone());
                    }
                    Some(map)
                })
                .collect(),
        }
    }

    fn step(&self, cx: &mut Cx<'_>) -> Result<(), Bail> {
        cx.steps += 1;
        if cx.steps > self.max_steps {
            return Err(Bail::Budget);
        }
        if cx.steps.is_multiple_of(CLOCK_EVERY)
            && let Some(deadline) = cx.deadline
            && std::time::Instant::now() > deadline
        {
            return Err(Bail::Timeout);
        }
        Ok(())
    }

    fn rule<'a>(&'a self, cx: &mut Cx<'a>, id: RuleId) -> Result<V<'a>, Bail> {
        match cx.memo[id] {
            Memo::Done(v) => return Ok(v),
            Memo::Running => return Err(Bail::Recursion),
            Memo::Pending => {}
        }
        cx.memo[id] = Memo::Running;
        let rule = &self.rules[id];
        let value = match rule.kind {
            Kind::Complete => {
                let mut result = V::UNDEFINED;
                for chain in &rule.defs {
                    let v = self.complete_def(cx, chain)?;
                    if v.is_undefined() {
                        continue;
                    }
                    if !result.is_undefined() && result.get() != v.get() {
                        return Err(Bail::Conflict);
                    }
                    result = v;
                }
                if result.is_undefined()
                    && let Some(d) = &rule.default
                {
                    result = self.expr(cx, cx.locals.len(), d)?;
                }
                result
            }
            Kind::PartialSet => {
                let mut members = BTreeSet::new();
                for chain in &rule.defs {
                    for branch in chain {
                        self.branch(cx, branch, &mut |p, cx, base| {
                            let v = match &branch.value {
                                Some(e) => p.expr(cx, base, e)?.owned(),
                                None => Value::Bool(true),
                            };
                            // A member without a value adds nothing (regorus, as OPA).
                            if !matches!(v, Value::Undefined) {
                                members.insert(v);
                            }
                            Ok(false)
                        })?;
                    }
                }
                cx.own(Value::from(members))?
            }
        };
        cx.memo[id] = Memo::Done(value);
        Ok(value)
    }

    /// One definition of a complete rule: the first branch whose body holds gives the
    /// value (undefined if its value is), as regorus does.
    fn complete_def<'a>(&'a self, cx: &mut Cx<'a>, chain: &'a [Branch]) -> Result<V<'a>, Bail> {
        for branch in chain {
            let mut held = false;
            let mut found = V::UNDEFINED;
            self.branch(cx, branch, &mut |p, cx, base| {
                let v = match &branch.value {
                    Some(e) => p.expr(cx, base, e)?,
                    None => V::bool(true),
                };
                if held && v.get() != found.get() {
                    return Err(Bail::Conflict);
                }
                held = true;
                found = v;
                Ok(false)
            })?;
            if held {
                return Ok(found);
            }
        }
        Ok(V::UNDEFINED)
    }

    /// Runs a branch's body in a fresh frame of locals; `found` sees each solution with
    /// the frame's base.
    fn branch<'a>(
        &'a self,
        cx: &mut Cx<'a>,
        branch: &'a Branch,
        found: &mut dyn FnMut(&'a Program, &mut Cx<'a>, usize) -> Result<bool, Bail>,
    ) -> Result<(), Bail> {
        self.branch_over(cx, branch, &branch.stmts, found)
    }

    /// `branch` with `stmts` (the branch's, or the first of them) as its body.
    fn branch_over<'a>(
        &'a self,
        cx: &mut Cx<'a>,
        branch: &'a Branch,
        stmts: &'a [Stmt],
        found: &mut dyn FnMut(&'a Program, &mut Cx<'a>, usize) -> Result<bool, Bail>,
    ) -> Result<(), Bail> {
        let base = cx.locals.len();
        for _ in 0..branch.slots {
            cx.locals.push(V::UNDEFINED);
        }
        let result = self.body(cx, base, stmts, &mut |p, cx| found(p, cx, base));
        cx.locals.truncate(base);
        result.map(|_| ())
    }

    /// Runs `stmts` from the first in the frame at `base`; `Ok(true)` when `found` asked
    /// to stop.
    fn body<'a>(
        &'a self,
        cx: &mut Cx<'a>,
        base: usize,
        mut stmts: &'a [Stmt],
        found: &mut Found<'_, 'a>,
    ) -> Result<bool, Bail> {
        // A loop over the statements that bind at most one way; an iteration runs the
        // statements after it once per element.
        loop {
            let Some((first, rest)) = stmts.split_first() else {
                return found(self, cx);
            };
            self.step(cx)?;
            match first {
                Stmt::Expr(e) => {
                    if !self.holds(cx, base, e)? {
                        return Ok(false);
                    }
                }
                Stmt::Not(e) => {
                    if self.holds(cx, base, e)? {
                        return Ok(false);
                    }
                }
                Stmt::Assign(slots, values) => {
                    if let ([slot], [value]) = (slots.as_slice(), values.as_slice()) {
                        let v = self.expr(cx, base, value)?;
                        if v.is_undefined() {
                            return Ok(false);
                        }
                        if let Some(s) = slot {
                            cx.locals[base + s] = v;
                        }
                    } else {
                        let Some(got) = self.defined(cx, base, values)? else {
                            return Ok(false);
                        };
                        for (slot, v) in slots.iter().zip(got) {
                            if let Some(s) = slot {
                                cx.locals[base + s] = v;
                            }
                        }
                    }
                }
                Stmt::SomeIn {
                    key,
                    value,
                    collection,
                } => return self.some_in(cx, base, key, value, collection, rest, found),
            }
            stmts = rest;
        }
    }

    /// `some key, value in collection`, then `rest` for each element (`body`'s).
    #[allow(clippy::too_many_arguments)]
    fn some_in<'a>(
        &'a self,
        cx: &mut Cx<'a>,
        base: usize,
        key: &'a Option<usize>,
        value: &'a Option<usize>,
        collection: &'a E,
        rest: &'a [Stmt],
        found: &mut Found<'_, 'a>,
    ) -> Result<bool, Bail> {
        // A set literal's items (`__nexus_iter` of a set is the set) are iterated where
        // they are, in the set's order and once each (as the set made of them would
        // be), without making the set.
        let literal = match collection {
            E::Call(Callee::Iter, params) => match params.as_slice() {
                [E::Set(items)] => Some(items),
                _ => None,
            },
            E::Set(items) => Some(items),
            _ => None,
        };
        let items = match literal {
            Some(items) => match self.defined(cx, base, items)? {
                Some(mut items) => {
                    items.sort_by(|a, b| a.get().cmp(b.get()));
                    items.dedup_by(|a, b| a.get().cmp(b.get()).is_eq());
                    Some(items)
                }
                // An undefined item makes the set undefined: no element.
                None => return Ok(false),
            },
            _ => None,
        };
        let c = match items {
            Some(_) => V::UNDEFINED,
            None => self.expr(cx, base, collection)?,
        };
        let mut each = |cx: &mut Cx<'a>, k: V<'a>, v: V<'a>| -> Result<bool, Bail> {
            self.step(cx)?;
            if let Some(s) = key {
                cx.locals[base + s] = k;
            }
            if let Some(s) = value {
                cx.locals[base + s] = v;
            }
            self.body(cx, base, rest, found)
        };
        if let Some(items) = items {
            for v in items {
                if each(cx, v, v)? {
                    return Ok(true);
                }
            }
            return Ok(false);
        }
        // The collection lends its elements (it is borrowed, or in the arena).
        match c.get() {
            Value::Undefined => {}
            Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    // An index is made only for a loop that binds it.
                    let k = if key.is_some() {
                        cx.own(Value::from(i))?
                    } else {
                        V::UNDEFINED
                    };
                    if each(cx, k, V(v))? {
                        return Ok(true);
                    }
                }
            }
            Value::Set(items) => {
                for v in items.iter() {
                    if each(cx, V(v), V(v))? {
                        return Ok(true);
                    }
                }
            }
            Value::Object(fields) => {
                for (k, v) in fields.iter() {
                    if each(cx, V(k), V(v))? {
                        return Ok(true);
                    }
                }
            }
            _ => return Err(Bail::Unmodelled),
        }
        Ok(false)
    }

    /// The values of a literal collection's items; None when one is undefined (and so
    /// is the collection).
    fn values<'a>(
        &'a self,
        cx: &mut Cx<'a>,
        base: usize,
        items: &'a [E],
    ) -> Result<Option<Vec<Value>>, Bail> {
        Ok(self
            .defined(cx, base, items)?
            .map(|items| items.into_iter().map(V::owned).collect()))
    }

    /// The values of `items`, evaluated in order; None as soon as one is undefined (and
    /// so is the collection, or the call, they are the items or arguments of).
    fn defined<'a>(
        &'a self,
        cx: &mut Cx<'a>,
        base: usize,
        items: &'a [E],
    ) -> Result<Option<SmallVec<[V<'a>; 8]>>, Bail> {
        let mut out = SmallVec::with_capacity(items.len());
        for i in items {
            let v = self.expr(cx, base, i)?;
            if v.is_undefined() {
                return Ok(None);
            }
            out.push(v);
        }
        Ok(Some(out))
    }

    /// Whether `e` is defined and not `false` (a statement holds): `expr`'s value
    /// tested, without making the value where the test needs none (a comparison, a
    /// membership, a type test, a rule already evaluated).
    fn holds<'a>(&'a self, cx: &mut Cx<'a>, base: usize, e: &'a E) -> Result<bool, Bail> {
        Ok(match e {
            E::Cmp(op, lhs, rhs) => self.compare(cx, base, op, lhs, rhs)? == Some(true),
            E::Member(v, c) => self.member_of(cx, base, v, c)? == Some(true),
            E::Call(Callee::IsType(test), params) => match params.as_slice() {
                [p] => {
                    let v = self.expr(cx, base, p)?;
                    !v.is_undefined() && test(v.get())
                }
                _ => return Err(Bail::Unmodelled),
            },
            E::Rule(id) => match &cx.memo[*id] {
                Memo::Done(v) => !undefined_or_false(v.get()),
                _ => !undefined_or_false(self.rule(cx, *id)?.get()),
            },
            _ => !undefined_or_false(self.expr(cx, base, e)?.get()),
        })
    }

    /// The values of a comprehension's head, one per solution of its body, in order.
    fn comprehension<'a>(
        &'a self,
        cx: &mut Cx<'a>,
        base: usize,
        head: &'a E,
        stmts: &'a [Stmt],
    ) -> Result<Vec<Value>, Bail> {
        let mut items = Vec::new();
        self.body(cx, base, stmts, &mut |p, cx| {
            let v = p.expr(cx, base, head)?;
            if v.is_undefined() {
                return Err(Bail::UndefinedHead);
            }
            items.push(v.owned());
            Ok(false)
        })?;
        Ok(items)
    }

    /// `lhs op rhs`; None (undefined) when either side is.
    fn compare<'a>(
        &'a self,
        cx: &mut Cx<'a>,
        base: usize,
        op: &BoolOp,
        lhs: &'a E,
        rhs: &'a E,
    ) -> Result<Option<bool>, Bail> {
        let l = self.expr(cx, base, lhs)?;
        let r = self.expr(cx, base, rhs)?;
        let (l, r) = (l.get(), r.get());
        if matches!(l, Value::Undefined) || matches!(r, Value::Undefined) {
            return Ok(None);
        }
        Ok(Some(match op {
            BoolOp::Eq => l == r,
            BoolOp::Ne => l != r,
            BoolOp::Lt => l < r,
            BoolOp::Le => l <= r,
            BoolOp::Gt => l > r,
            BoolOp::Ge => l >= r,
        }))
    }

    /// `v in c` (a statement); None (undefined) when either side is.
    fn member_of<'a>(
        &'a self,
        cx: &mut Cx<'a>,
        base: usize,
        v: &'a E,
        c: &'a E,
    ) -> Result<Option<bool>, Bail> {
        let v = self.expr(cx, base, v)?;
        let c = self.expr(cx, base, c)?;
        if v.is_undefined() || c.is_undefined() {
            return Ok(None);
        }
        Ok(Some(member(v.get(), c.get())?))
    }

    /// The value of `e`: the nodes most met (a constant, a local, an input or data
    /// value already looked up, a rule already evaluated) answered where `expr` is
    /// called, the others by `expr_node`.
    #[inline(always)]
    fn expr<'a>(&'a self, cx: &mut Cx<'a>, base: usize, e: &'a E) -> Result<V<'a>, Bail> {
        match e {
            E::Const(v) => Ok(V(v)),
            E::Local(slot) => Ok(cx.locals[base + slot]),
            E::InputPath(slot, _) => match cx.inputs[*slot] {
                Some(v) => Ok(V(v)),
                None => self.expr_node(cx, base, e),
            },
            E::Rule(id) => match cx.memo[*id] {
                Memo::Done(v) => Ok(v),
                _ => self.expr_node(cx, base, e),
            },
            _ => self.expr_node(cx, base, e),
        }
    }

    fn expr_node<'a>(&'a self, cx: &mut Cx<'a>, base: usize, e: &'a E) -> Result<V<'a>, Bail> {
        Ok(match e {
            E::Const(v) => V(v),
            E::Input => V(cx.input),
            E::InputPath(slot, path) => {
                if let Some(v) = cx.inputs[*slot] {
                    return Ok(V(v));
                }
                let mut v = cx.input;
                for step in path {
                    v = crate::cache::field(v, step);
                }
                cx.inputs[*slot] = Some(v);
                V(v)
            }
            E::Data(slot, path) => {
                let index: &'a DataIndex = cx.index;
                if let Some(v) = index.values.get(*slot) {
                    return Ok(V(v));
                }
                let mut v = cx.data;
                for step in path {
                    v = crate::cache::field(v, step);
                }
                V(v)
            }
            E::Local(slot) => cx.locals[base + slot],
            E::Rule(id) => self.rule(cx, *id)?,
            E::Index(of, index) => {
                let index = self.expr(cx, base, index)?;
                if index.is_undefined() {
                    return Ok(V::UNDEFINED);
                }
                self.expr(cx, base, of)?.index(index.get())
            }
            E::DataIndex(slot, of, index) => {
                let key = self.expr(cx, base, index)?;
                let index: &'a DataIndex = cx.index;
                match (key.get(), index.maps.get(*slot)) {
                    (Value::Undefined, _) => V::UNDEFINED,
                    (Value::String(k), Some(Some(map))) => {
                        map.get(k.as_ref()).map_or(V::UNDEFINED, V)
                    }
                    (k, _) => self.expr(cx, base, of)?.index(k),
                }
            }
            E::Array(items) => match self.values(cx, base, items)? {
                Some(values) => cx.own(Value::from(values))?,
                None => V::UNDEFINED,
            },
            E::Set(items) => match self.values(cx, base, items)? {
                Some(values) => cx.own(Value::from(values.into_iter().collect::<BTreeSet<_>>()))?,
                None => V::UNDEFINED,
            },
            E::Object(fields) => {
                let mut out = BTreeMap::new();
                for (k, v) in fields {
                    let k = self.expr(cx, base, k)?;
                    let v = self.expr(cx, base, v)?;
                    if k.is_undefined() || v.is_undefined() {
                        return Ok(V::UNDEFINED);
                    }
                    out.insert(k.owned(), v.owned());
                }
                cx.own(Value::from(out))?
            }
            E::Record(shape, fields) => {
                let Value::Object(shape) = shape else {
                    return Err(Bail::Unmodelled);
                };
                let mut object = regorus::value::Object::clone(shape);
                for (k, v) in fields {
                    let v = self.expr(cx, base, v)?;
                    if v.is_undefined() {
                        return Ok(V::UNDEFINED);
                    }
                    match object.get_mut(k) {
                        Some(slot) => *slot = v.owned(),
                        None => return Err(Bail::Unmodelled),
                    }
                }
                cx.own(Value::Object(regorus::Rc::new(object)))?
            }
            E::Call(Callee::Concat(regorus), params)
                if matches!(params.as_slice(), [_, E::Array(_)]) =>
            {
                // `concat(d, [a, b, ...])`: the strings joined as they are evaluated,
                // with no array made for the call; anything but strings goes the
                // general way, with the values already evaluated.
                let [d, E::Array(items)] = params.as_slice() else {
                    return Err(Bail::Unmodelled);
                };
                let d = self.expr(cx, base, d)?;
                if d.is_undefined() {
                    return Ok(V::UNDEFINED);
                }
                let Some(values) = self.defined(cx, base, items)? else {
                    return Ok(V::UNDEFINED);
                };
                if let Value::String(sep) = d.get()
                    && values.iter().all(|v| matches!(v.get(), Value::String(_)))
                {
                    // Joined in this thread's buffer, then copied once into the value.
                    let mut out = JOIN_BUFFER.take();
                    out.clear();
                    for (i, v) in values.iter().enumerate() {
                        if let Value::String(s) = v.get() {
                            if i > 0 {
                                out.push_str(sep);
                            }
                            out.push_str(s);
                        }
                    }
                    let joined = Value::String(out.as_str().into());
                    if out.capacity() <= crate::cache::KEEP_BUFFER {
                        JOIN_BUFFER.set(out);
                    }
                    return cx.own(joined);
                }
                let array = Value::from(values.into_iter().map(V::owned).collect::<Vec<_>>());
                cx.own(call(regorus, &[d, V(&array)])?)?
            }
            E::ArrayCompr(head, stmts) | E::SetCompr(head, stmts) => {
                let items = self.comprehension(cx, base, head, stmts)?;
                cx.own(if matches!(e, E::ArrayCompr(..)) {
                    Value::from(items)
                } else {
                    Value::from(items.into_iter().collect::<BTreeSet<_>>())
                })?
            }
            E::Call(Callee::IsType(test), params) => match params.as_slice() {
                [p] => {
                    let v = self.expr(cx, base, p)?;
                    if v.is_undefined() {
                        return Ok(V::UNDEFINED);
                    }
                    cx.own(Value::Bool(test(v.get())))?
                }
                _ => return Err(Bail::Unmodelled),
            },
            // `sort([x | ...])`: the comprehension's items sorted where they are made.
            E::Call(Callee::Sort(_), params)
                if matches!(params.as_slice(), [E::ArrayCompr(..)]) =>
            {
                let [E::ArrayCompr(head, stmts)] = params.as_slice() else {
                    return Err(Bail::Unmodelled);
                };
                let mut items = self.comprehension(cx, base, head, stmts)?;
                items.sort();
                cx.own(Value::from(items))?
            }
            // One-argument calls answered here without an argument vector: the
            // argument is evaluated (undefined makes the call undefined, as `defined`
            // does), then given as it is, borrowed when it is.
            E::Call(callee @ (Callee::Iter | Callee::Count(_) | Callee::Sort(_)), params)
                if params.len() == 1 =>
            {
                let c = self.expr(cx, base, &params[0])?;
                if c.is_undefined() {
                    return Ok(V::UNDEFINED);
                }
                match (callee, c.get()) {
                    // `__nexus_iter(c)`: c itself when a collection, else an empty array.
                    (Callee::Iter, Value::Array(_) | Value::Set(_) | Value::Object(_)) => c,
                    (Callee::Iter, _) => cx.own(Value::new_array())?,
                    (Callee::Count(_), Value::Array(items)) => cx.own(Value::from(items.len()))?,
                    (Callee::Count(_), Value::Set(items)) => cx.own(Value::from(items.len()))?,
                    (Callee::Count(_), Value::Object(fields)) => {
                        cx.own(Value::from(fields.len()))?
                    }
                    (Callee::Sort(_), Value::Array(items)) => {
                        let mut sorted: Vec<Value> = items.iter().cloned().collect();
                        sorted.sort();
                        cx.own(Value::from(sorted))?
                    }
                    // A set iterates in regorus's order already.
                    (Callee::Sort(_), Value::Set(items)) => {
                        cx.own(Value::from(items.iter().cloned().collect::<Vec<_>>()))?
                    }
                    (Callee::Count(regorus) | Callee::Sort(regorus), _) => {
                        cx.own(call(regorus, &[c])?)?
                    }
                    _ => return Err(Bail::Unmodelled),
                }
            }
            E::Call(callee, params) => match self.defined(cx, base, params)? {
                Some(args) => cx.own(call(callee, &args)?)?,
                None => V::UNDEFINED,
            },
            E::Cmp(op, lhs, rhs) => self
                .compare(cx, base, op, lhs, rhs)?
                .map_or(V::UNDEFINED, V::bool),
            E::Member(v, c) => self
                .member_of(cx, base, v, c)?
                .map_or(V::UNDEFINED, V::bool),
        })
    }
}

fn member(v: &Value, c: &Value) -> Result<bool, Bail> {
    Ok(match c {
        Value::Array(items) => items.iter().any(|x| x == v),
        Value::Set(items) => items.contains(v),
        Value::Object(fields) => fields.values().any(|x| x == v),
        _ => return Err(Bail::Unmodelled),
    })
}

/// regorus's type tests (`builtins/types.rs`), by name.
fn type_test(name: &str) -> Option<fn(&Value) -> bool> {
    Some(match name {
        "is_string" => |v| matches!(v, Value::String(_)),
        "is_array" => |v| matches!(v, Value::Array(_)),
        "is_object" => |v| matches!(v, Value::Object(_)),
        "is_set" => |v| matches!(v, Value::Set(_)),
        "is_number" => |v| matches!(v, Value::Number(_)),
        "is_boolean" => |v| matches!(v, Value::Bool(_)),
        "is_null" => |v| matches!(v, Value::Null),
        _ => return None,
    })
}

/// `concat(d, c)` as regorus computes it (the strings of `c` in order, joined by `d`)
/// when `d` is a string and `c` an array or set of strings; None otherwise.
fn concat(d: &Value, c: &Value) -> Option<Value> {
    let Value::String(d) = d else {
        return None;
    };
    let mut out = String::new();
    let mut push = |i: usize, v: &Value| match v {
        Value::String(s) => {
            if i > 0 {
                out.push_str(d);
            }
            out.push_str(s);
            true
        }
        _ => false,
    };
    let all = match c {
        Value::Array(items) => items.iter().enumerate().all(|(i, v)| push(i, v)),
        Value::Set(items) => items.iter().enumerate().all(|(i, v)| push(i, v)),
        _ => false,
    };
    all.then(|| Value::String(out.into()))
}

fn call(callee: &Callee, args: &[V<'_>]) -> Result<Value, Bail> {
    match callee {
        Callee::Concat(regorus) => {
            if let [d, c] = args
                && let Some(v) = concat(d.get(), c.get())
            {
                return Ok(v);
            }
            return call(regorus, args);
        }
        // `expr` answers these for collections; anything else is regorus's.
        Callee::Count(regorus) | Callee::Sort(regorus) => return call(regorus, args),
        _ => {}
    }
    let args: Vec<Value> = args.iter().map(|a| a.get().clone()).collect();
    let args = args.as_slice();
    match callee {
        Callee::IsType(test) => Ok(match args {
            [v] => Value::Bool(test(v)),
            _ => return Err(Bail::Unmodelled),
        }),
        // Handed to regorus's builtin above.
        Callee::Concat(_) | Callee::Count(_) | Callee::Sort(_) => Err(Bail::Unmodelled),
        Callee::Member => match args {
            [v, c] => Ok(Value::Bool(match c {
                Value::Array(items) => items.iter().any(|x| x == v),
                Value::Set(items) => items.contains(v),
                Value::Object(fields) => fields.values().any(|x| x == v),
                _ => false,
            })),
            _ => Err(Bail::Unmodelled),
        },
        Callee::Iter => Ok(match args.first() {
            Some(c @ (Value::Array(_) | Value::Set(_) | Value::Object(_))) => c.clone(),
            _ => Value::new_array(),
        }),
        Callee::Nexus(name) => Ok(crate::builtins::call(name, args)),
        Callee::Regorus { f, span, params } => match (f.0)(span, params, args, false) {
            Ok(v) => Ok(v),
            Err(e) if e.downcast_ref::<regorus::LimitError>().is_some() => Err(Bail::Limit),
            // Builtin errors are undefined (nexus's engines run without strict builtin
            // errors).
            Err(_) => Ok(Value::Undefined),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::{Bundle, Module};
    use proptest::prelude::*;
    use serde_json::json;

    fn texts(modules: &[(&str, &str)]) -> Vec<(String, String)> {
        modules
            .iter()
            .map(|(p, t)| (p.to_string(), crate::rewrite::interpreter_text(p, t, true)))
            .collect()
    }

    fn program(text: &str, rule: &str) -> Result<Program, Refusal> {
        compile(&texts(&[("p.rego", text)]), rule, 100_000)
    }

    /// What regorus's interpreter (as nexus sets it up) answers, shown as `verify` shows it.
    fn interpreted(modules: &[(&str, &str)], data: &Value, rule: &str, input: &Value) -> String {
        let bundle = Bundle::from_modules(
            modules
                .iter()
                .map(|(p, t)| Module {
                    path: p.to_string(),
                    text: t.to_string(),
                })
                .collect(),
            data.clone(),
        );
        let mut engine = crate::engine::engine_for(&bundle, false).unwrap();
        engine.set_input(input.clone());
        crate::verify::show(
            &engine
                .eval_rule(rule.to_string())
                .map_err(|e| e.to_string()),
        )
    }

    /// `rule` of `modules` evaluated here and by the interpreter on each input: the
    /// same answer, or (for the inputs in `bails`) a hand-over this evaluator says why.
    fn agree(
        modules: &[(&str, &str)],
        data: serde_json::Value,
        rule: &str,
        inputs: &[serde_json::Value],
    ) -> Vec<Option<Bail>> {
        let data = Value::from(data);
        let p = compile(&texts(modules), rule, 100_000).unwrap_or_else(|r| panic!("refused: {r}"));
        let index = p.index(&data);
        inputs
            .iter()
            .map(|input| {
                let input = Value::from(input.clone());
                let want = interpreted(modules, &data, rule, &input);
                let evaluated = p.eval(&input, &data, &index);
                // The decision read straight off the rule is its value's, or the same
                // hand-over.
                let decided = p.decide_until(&input, &data, &index, None, &[]);
                match (&evaluated, decided) {
                    (Ok(v), Ok(d)) => {
                        assert_eq!(d, crate::engine::decision_from(v), "{rule} on {input:?}")
                    }
                    (Err(a), Err(b)) => assert_eq!(*a, b, "{rule} on {input:?}"),
                    (e, d) => panic!("{rule} on {input:?}: evaluated {e:?}, decided {d:?}"),
                }
                match evaluated {
                    Ok(v) => {
                        assert_eq!(crate::verify::show(&Ok(v)), want, "{rule} on {input:?}");
                        None
                    }
                    Err(bail) => Some(bail),
                }
            })
            .collect()
    }

    /// Decision rules of every shape: the decision read straight off the rule
    /// (`decide_until`, checked inside `agree`) is the one its value gives, for allow
    /// and reasons of any type, missing fields, undefined fields and reason items, extra
    /// fields, else chains ending in a constant or a non-object, a default, a rule with
    /// no value, and rules it does not read directly (an iteration, two definitions).
    #[test]
    fn decisions_read_off_the_rule_are_its_values() {
        let texts = [
            "decision := {\"allow\": input.a, \"reasons\": input.r}",
            "decision := {\"allow\": input.a, \"reasons\": [input.r, \"b\"]}",
            "decision := {\"allow\": input.a}",
            "decision := {\"reasons\": input.r, \"allow\": input.a, \"extra\": 1}",
            "decision := {\"allow\": true, \"reasons\": [input.r, \"b\"]} if input.a == true else := {\"allow\": false, \"reasons\": {\"y\", input.r}} if input.a == false else := {\"allow\": false, \"reasons\": [\"none\"]} if input.r else := false",
            "decision if input.a",
            "default decision := {\"allow\": false}\ndecision := {\"allow\": input.a, \"reasons\": input.r} if input.a",
            "default decision := {\"allow\": false, \"reasons\": [\"default\"]}\ndecision := {\"allow\": true, \"reasons\": [input.missing]} if input.a else := {\"allow\": input.r} if input.r",
            "decision := {\"allow\": x, \"reasons\": [x]} if { some x in input.xs }",
            "decision := {\"allow\": true, \"reasons\": [\"one\"]} if input.a\ndecision := {\"allow\": true, \"reasons\": [\"one\"]} if input.r",
        ];
        let mut inputs = vec![json!({})];
        for a in [
            json!(true),
            json!(false),
            json!("yes"),
            json!(null),
            json!(1),
        ] {
            for r in [
                json!(["a", "b"]),
                json!([]),
                json!("one"),
                json!(null),
                json!(3),
                json!({"k": "v"}),
                json!([1, {"x": [true]}]),
            ] {
                inputs.push(json!({"a": a, "r": r, "xs": [a.clone(), true]}));
            }
            inputs.push(json!({"a": a}));
        }
        for text in texts {
            let module = format!("package t\n\n{text}\n");
            agree(
                &[("p.rego", &module)],
                json!({}),
                "data.t.decision",
                &inputs,
            );
        }
    }

    #[test]
    fn else_chains_defaults_and_conflicts_answer_as_the_interpreter() {
        let text = "package t\n\nr := input.a if input.x else := \"b\" if input.y else := \"c\"\n\ndefault d := \"none\"\n\nd := \"one\" if input.one\n\nd := \"two\" if input.two\n";
        let inputs = [
            json!({}),
            json!({"x": true, "a": 1}),
            json!({"x": true}),
            json!({"x": false, "y": true}),
            json!({"y": 0}),
            json!({"one": true}),
            json!({"two": true}),
            json!({"one": true, "two": 1}),
        ];
        for rule in ["data.t.r", "data.t.d"] {
            let bails = agree(&[("p.rego", text)], json!({}), rule, &inputs);
            // Two values for `d`: the interpreter raises a conflict; this evaluator hands
            // the input on rather than model the error.
            let conflicts: Vec<usize> = bails
                .iter()
                .enumerate()
                .filter_map(|(i, b)| b.map(|b| (i, b)))
                .map(|(i, b)| {
                    assert_eq!(b, Bail::Conflict);
                    i
                })
                .collect();
            assert_eq!(conflicts, if rule == "data.t.d" { vec![7] } else { vec![] });
        }
    }

    #[test]
    fn sets_iteration_comprehensions_and_negation_answer_as_the_interpreter() {
        let text = r#"package t

deny contains msg if {
	some k, v in input.m
	v > 3
	msg := concat(":", [k, "big"])
}

deny contains "no user" if not input.user

names := [n | some u in input.users; n := u.name]

uniq := {x | some x in input.xs}

allow if not startswith(input.p, "/admin")

reads if input.method in {"GET", "HEAD"}

writes if not input.method in {"GET", "HEAD"}

sized := count(deny) + 0 if false else := count(deny)

cmp if input.a < input.b

eq if input.n == 1

upper_name := upper(input.name)

digest := crypto.sha256(input.name)
"#;
        let inputs = [
            json!({}),
            json!({"m": {"a": 1, "b": 5, "c": "x"}, "user": "u"}),
            json!({"m": [9, 2, 4]}),
            json!({"m": "scalar"}),
            json!({"users": [{"name": "a"}, {"name": "b"}], "xs": [1, 1, "1", [1]]}),
            json!({"users": "nope", "xs": {"k": 2}}),
            json!({"p": "/x", "method": "GET"}),
            json!({"p": "/admin/x", "method": "POST"}),
            json!({"p": 7, "method": null}),
            json!({"a": 1, "b": "1"}),
            json!({"a": "b", "b": "a"}),
            json!({"a": null, "b": false}),
            json!({"n": 1.0}),
            json!({"n": 1}),
            json!({"n": "1"}),
            json!({"name": "Bob"}),
            json!({"name": 3}),
        ];
        for rule in [
            "data.t.deny",
            "data.t.names",
            "data.t.uniq",
            "data.t.allow",
            "data.t.reads",
            "data.t.writes",
            "data.t.cmp",
            "data.t.eq",
            "data.t.upper_name",
            "data.t.digest",
        ] {
            let bails = agree(&[("p.rego", text)], json!({}), rule, &inputs);
            // A comprehension head without a value (a user without a name) is handed on.
            let bailed = bails.iter().filter(|b| b.is_some()).count();
            assert_eq!(bailed, 0, "{rule}: {bails:?}");
        }
        // `sized` subtracts: arithmetic is refused.
        assert!(program(text, "data.t.sized").is_err());
    }

    /// The two forms evaluated without the general machinery: `concat` of an array
    /// literal (joined as its items are evaluated; a non-string item goes to regorus's
    /// `concat`, which is undefined then) and an object literal with constant keys
    /// (filled into a copy of its shape); a duplicated key keeps the general form.
    /// `count`, `sort` and the rewrites' `__nexus_iter` are answered here without an
    /// argument vector (stop 36): over collections of every kind and element type, and
    /// over what they do not take (handed to regorus's builtin), as the interpreter.
    #[test]
    fn counts_sorts_and_iterations_answer_as_the_interpreter() {
        let text = r#"package t

all_counts := [count(input.a), count(input.s), count(input.o)]

array_count := count(input.a)

set_count := count({x | some x in input.a})

object_count := count(input.o)

collection_count := count([x | some x in input.a])

sorted := sort(input.a)

sorted_set := sort({x | some x in input.a})

sorted_scalar := sort(input.o.k)

reasons contains r if {
	some r in input.a
	is_string(r)
}

sorted_reasons := sort([r | some r in reasons])

every_member contains [k, v] if some k, v in input.o

first_big if {
	some x in input.a
	x > 2
}
"#;
        let inputs = [
            json!({}),
            json!({"a": [3, 1, 2], "s": "héllo", "o": {"k": "v", "z": 1}}),
            json!({"a": ["b", "a", 1, null, true, [1], {"x": 1}, 1.5, "a"], "o": {}}),
            json!({"a": [], "o": {"k": [3, 1]}}),
            json!({"a": "scalar", "o": "scalar"}),
            json!({"a": {"x": 1, "y": 2}, "o": [1, 2]}),
            json!({"a": ["😀", "é", "e"], "o": {"k": {"a": 1}}}),
            json!({"a": null, "o": null}),
        ];
        for rule in [
            "data.t.all_counts",
            "data.t.array_count",
            "data.t.set_count",
            "data.t.object_count",
            "data.t.collection_count",
            "data.t.sorted",
            "data.t.sorted_set",
            "data.t.sorted_scalar",
            "data.t.sorted_reasons",
            "data.t.every_member",
            "data.t.first_big",
        ] {
            let bails = agree(&[("p.rego", text)], json!({}), rule, &inputs);
            assert!(bails.iter().all(Option::is_none), "{rule}: {bails:?}");
        }
    }

    #[test]
    fn joined_concats_and_constant_key_objects_answer_as_the_interpreter() {
        let text = r#"package t

joined := concat(", ", [input.a, "and", input.b])

bare := concat("", [input.a, input.b])

set_joined := concat("-", {input.a, "z"})

sep := concat(input.sep, [input.a, input.b])

record := {"allow": input.a == "x", "reasons": [input.b], "n": count([input.a])}

twice := {"k": 1, "k": input.a}

nested := {"outer": {"inner": input.a}, "list": [{"b": input.b}]}

members contains x if {
	some x in {input.b, input.a, input.b, 1, 1.0}
}

ordered := [x | some x in {input.b, input.a, "m"}]
"#;
        let inputs = [
            json!({}),
            json!({"a": "x", "b": "y"}),
            json!({"a": "x"}),
            json!({"b": "y"}),
            json!({"a": 1, "b": "y"}),
            json!({"a": "x", "b": ["y"]}),
            json!({"a": "", "b": "", "sep": ""}),
            json!({"a": "x", "b": "y", "sep": 3}),
            json!({"a": "x", "b": "y", "sep": "::"}),
            json!({"a": null, "b": true}),
            json!({"a": "é", "b": "ü", "sep": "ß"}),
        ];
        for rule in [
            "data.t.joined",
            "data.t.bare",
            "data.t.set_joined",
            "data.t.sep",
            "data.t.record",
            "data.t.twice",
            "data.t.nested",
            "data.t.members",
            "data.t.ordered",
        ] {
            let bails = agree(&[("p.rego", text)], json!({}), rule, &inputs);
            assert!(bails.iter().all(Option::is_none), "{rule}: {bails:?}");
        }
        // The shapes it chose: a joined concat, a record, and the general object for
        // the duplicated key.
        let p = program(text, "data.t.record").unwrap();
        let shown = format!("{:?}", p.rules);
        assert!(shown.contains("Record("), "{shown}");
        let p = program(text, "data.t.twice").unwrap();
        let shown = format!("{:?}", p.rules);
        assert!(
            shown.contains("Object(") && !shown.contains("Record("),
            "{shown}"
        );
    }

    #[test]
    fn data_and_rules_of_other_packages_answer_as_the_interpreter() {
        let main = "package t\n\nimport rego.v1\n\nallow if {\n\tdata.lib.ok\n\tdata.roles[input.u] == \"admin\"\n}\n\nrole := data.roles[input.u]\n";
        let lib = "package lib\n\nok if input.on == true\n";
        let mut roles = serde_json::Map::new();
        for i in 0..100 {
            roles.insert(
                format!("user-{i}"),
                json!(if i % 3 == 0 { "admin" } else { "dev" }),
            );
        }
        let inputs = [
            json!({}),
            json!({"u": "user-3", "on": true}),
            json!({"u": "user-4", "on": true}),
            json!({"u": "user-3", "on": "true"}),
            json!({"u": 3, "on": true}),
            json!({"u": "nobody", "on": true}),
        ];
        for rule in ["data.t.allow", "data.t.role", "data.lib.ok"] {
            let bails = agree(
                &[("p.rego", main), ("lib.rego", lib)],
                json!({"roles": roles}),
                rule,
                &inputs,
            );
            assert!(bails.iter().all(Option::is_none), "{rule}: {bails:?}");
        }
    }

    #[test]
    fn what_it_does_not_take_is_refused_at_its_line() {
        for (text, rule, why) in [
            (
                "package t\n\nf(x) := x\n\nr := f(1)\n",
                "data.t.r",
                "function",
            ),
            (
                "package t\n\nr if { input.a with input as {} }\n",
                "data.t.r",
                "`with`",
            ),
            (
                "package t\n\nr if { every x in input.a { x } }\n",
                "data.t.r",
                "`every`",
            ),
            ("package t\n\nr := input.a + 1\n", "data.t.r", "operator"),
            (
                "package t\n\nr if { x = input.a; x }\n",
                "data.t.r",
                "unification",
            ),
            (
                "package t\n\nr if { some x; input.a[x] }\n",
                "data.t.r",
                "`some x`",
            ),
            (
                "package t\n\nimport data.lib\n\nr := lib.x\n",
                "data.t.r",
                "import",
            ),
            ("package t\n\nr := data\n", "data.t.r", "holding rules"),
            ("package t\n\nr := data.t\n", "data.t.r", "holding rules"),
            ("package t\n\nr if input.xs[_]\n", "data.t.r", "`_`"),
            (
                "package t\n\no[k] := 1 if some k in input.ks\n\nr := o\n",
                "data.t.r",
                "head is a ref",
            ),
            (
                "package t\n\nr := time.now_ns()\n",
                "data.t.r",
                "not its arguments'",
            ),
        ] {
            let refused = program(text, rule)
                .err()
                .unwrap_or_else(|| panic!("{text} was taken"));
            assert!(refused.construct.contains(why), "{text}: {refused}");
            assert!(refused.location.starts_with("p.rego:"), "{text}: {refused}");
        }
    }

    #[test]
    fn a_rule_that_reaches_itself_and_a_long_loop_are_handed_on() {
        let p = program(
            "package t\n\nr if { some x in input.xs; some y in input.xs; x == y; false }\n",
            "data.t.r",
        )
        .unwrap();
        let xs: Vec<u32> = (0..1000).collect();
        let input = Value::from(json!({ "xs": xs }));
        let data = Value::new_object();
        assert_eq!(p.eval(&input, &data, &p.index(&data)), Err(Bail::Budget));
        // Past its deadline it stops between two steps, and says so (a deny, not a
        // hand-over: the time is spent).
        let past = std::time::Instant::now();
        assert_eq!(
            p.eval_until(&input, &data, &p.index(&data), Some(past), &[]),
            Err(Bail::Timeout)
        );
    }

    /// An evaluation keeps what it makes until it ends: one that would make more than
    /// its bound (a loop making a string per item of an input list) is handed on
    /// (`Bail::Limit`, to the RVM), rather than holding a value per iteration; under the
    /// bound it answers as the interpreter. Through the engine, the hand-over gives the
    /// interpreter's answer.
    #[test]
    fn an_evaluation_that_would_keep_too_many_values_is_handed_on() {
        let text = "package t\n\nimport rego.v1\n\nr := count([s | some x in input.xs; s := concat(\"-\", [x, x])])\n";
        let mut p = program(text, "data.t.r").unwrap();
        let data = Value::new_object();
        let xs = |n: usize| {
            Value::from(json!({ "xs": (0..n).map(|i| format!("x{i}")).collect::<Vec<_>>() }))
        };
        p.set_max_made(64);
        assert_eq!(p.eval(&xs(10), &data, &p.index(&data)), Ok(Value::from(10)));
        assert_eq!(p.eval(&xs(100), &data, &p.index(&data)), Err(Bail::Limit));
        agree(
            &[("p.rego", text)],
            json!({}),
            "data.t.r",
            &[json!({"xs": ["a", "b"]})],
        );
        let bundle = Bundle::from_modules(
            vec![Module {
                path: "p.rego".into(),
                text: text.into(),
            }],
            Value::new_object(),
        );
        let options = crate::PolicyOptions {
            decision_rule: "data.t.r".into(),
            max_made_values: 64,
            ..Default::default()
        };
        let policy = crate::Policy::compile(&bundle, &Value::new_object(), options).unwrap();
        assert_eq!(policy.mode(), crate::EvalMode::Native);
        assert_eq!(policy.evaluate_value(xs(100)), Ok(Value::from(100)));
    }

    /// The forms taken without evaluating a value: a rule that only names a value
    /// (read in place: `alias`), a data path (found once per data revision), and a
    /// statement tested without its value (`holds`): comparisons, memberships, type
    /// tests and rules, each also with undefined operands and under `not`.
    #[test]
    fn aliases_data_paths_and_tested_statements_answer_as_the_interpreter() {
        let text = r#"package t

import rego.v1

who := input.source.id

fixed := "k1"

methods := data.cfg.methods

default fallback := ["GET"]

fallback := data.cfg.missing

bound if who in data.cfg.bindings[fixed]

open if {
	ex := data.cfg.runs[input.run]
	ex.who == who
	ex.until > input.now
}

reads if input.method in methods

typed if is_string(who)

falsy if not data.cfg.off

decision := {"allow": true, "who": who} if {
	bound
	open
	reads
	typed
	falsy
	not fallback == []
} else := {"allow": false, "who": who}

# The decision rule itself only names a value: evaluated as a rule.
top := who
"#;
        let data = json!({"cfg": {
            "methods": ["GET", "HEAD"],
            "bindings": {"k1": ["a", "b"], "k2": ["c"]},
            "runs": {"r1": {"who": "a", "until": 10}, "r2": {"who": "c", "until": 10}},
            "off": false,
        }});
        let inputs = [
            json!({}),
            json!({"source": {"id": "a"}, "run": "r1", "now": 5, "method": "GET"}),
            json!({"source": {"id": "a"}, "run": "r1", "now": 10, "method": "GET"}),
            json!({"source": {"id": "a"}, "run": "r2", "now": 5, "method": "GET"}),
            json!({"source": {"id": "c"}, "run": "r2", "now": 5, "method": "GET"}),
            json!({"source": {"id": "a"}, "run": "r1", "now": 5, "method": "POST"}),
            json!({"source": {"id": 7}, "run": "r1", "now": 5, "method": "GET"}),
            json!({"source": {"id": "a"}, "run": "r1", "now": "5", "method": "GET"}),
            json!({"source": "a", "run": ["r1"], "now": null, "method": ["GET"]}),
        ];
        for rule in [
            "data.t.decision",
            "data.t.top",
            "data.t.bound",
            "data.t.open",
            "data.t.fallback",
            "data.t.falsy",
        ] {
            let bails = agree(&[("p.rego", text)], data.clone(), rule, &inputs);
            assert!(bails.iter().all(Option::is_none), "{rule}: {bails:?}");
        }
        // References to the aliases read the value in place; the decision rule stays a
        // rule.
        let p = program(text, "data.t.top").unwrap();
        let refs = format!("{:?}", p.rules);
        assert!(
            !refs.contains("Rule("),
            "an alias is still referenced: {refs}"
        );
        // The data paths are found in the revision's data once; another revision's
        // data gives its values, and without them the evaluator walks the data.
        let p = program(text, "data.t.decision").unwrap();
        let input = Value::from(inputs[1].clone());
        let allowed = Value::from(data.clone());
        let mut other = data.clone();
        other["cfg"]["methods"] = json!(["HEAD"]);
        let other = Value::from(other);
        let allow = |data: &Value, index: &DataIndex| {
            let v = p.eval(&input, data, index).unwrap();
            v["allow"].clone()
        };
        assert_eq!(allow(&allowed, &p.index(&allowed)), Value::Bool(true));
        assert_eq!(allow(&other, &p.index(&other)), Value::Bool(false));
        assert_eq!(allow(&allowed, &DataIndex::default()), Value::Bool(true));
        assert_eq!(allow(&other, &DataIndex::default()), Value::Bool(false));
    }

    #[test]
    fn large_objects_the_rules_index_are_hashed() {
        let p = program(
            "package t\n\nx := data.big[input.k]\n\ny := data.small[input.k]\n\nz if { x; y }\n",
            "data.t.z",
        )
        .unwrap();
        let mut big = serde_json::Map::new();
        for i in 0..100 {
            big.insert(format!("k{i}"), serde_json::json!(i));
        }
        let data = Value::from(serde_json::json!({"big": big, "small": {"k7": true}}));
        let index = p.index(&data);
        let at = |name: &str| {
            let i = p
                .indexed
                .iter()
                .position(|path| *path == [Value::from(name)]);
            &index.maps[i.unwrap()]
        };
        assert_eq!(index.maps.len(), 2);
        assert!(at("big").as_ref().is_some_and(|m| m.len() == 100));
        assert!(at("small").is_none());
        let input = Value::from(serde_json::json!({"k": "k7"}));
        assert_eq!(p.eval(&input, &data, &index), Ok(Value::Bool(true)));
        let input = Value::from(serde_json::json!({"k": "k8"}));
        assert_eq!(p.eval(&input, &data, &index), Ok(Value::Undefined));
    }

    const REFERENCE: &str = include_str!("../../../policies/nexus/authz/authz.rego");

    fn reference_data(
        bindings_as_objects: bool,
        revoked: &[&str],
        allowed: Option<Vec<&str>>,
    ) -> serde_json::Value {
        let mut bindings = serde_json::Map::new();
        for i in 0..40 {
            let clauses = json!([format!("c-{i}"), format!("c-{}", i + 1)]);
            bindings.insert(
                format!("spiffe://nexus.local/ns/plugins/sa/m-{i}"),
                if bindings_as_objects && i % 2 == 0 {
                    json!({"clauses": clauses})
                } else {
                    clauses
                },
            );
        }
        let mut executions = serde_json::Map::new();
        for i in 0..40 {
            executions.insert(
                format!("ex-{i}"),
                json!({"id": format!("ex-{i}"), "plugin": format!("spiffe://nexus.local/ns/plugins/sa/m-{i}"), "clause": format!("c-{i}"), "not_after_ns": 1_000 + i}),
            );
        }
        let revoked: serde_json::Map<String, serde_json::Value> = revoked
            .iter()
            .map(|r| (r.to_string(), json!({"reason": "test"})))
            .collect();
        let mut nexus = json!({"bindings": bindings, "executions": executions, "revoked": revoked, "public_paths": ["/healthz"]});
        if let Some(m) = allowed {
            nexus["allowed_methods"] = json!(m);
        }
        json!({ "nexus": nexus })
    }

    fn any_json() -> impl Strategy<Value = serde_json::Value> {
        prop_oneof![
            Just(json!(null)),
            Just(json!(true)),
            Just(json!(1)),
            Just(json!(1.5)),
            Just(json!("c-3")),
            Just(json!([])),
            Just(json!({})),
        ]
    }

    /// A field of the input: missing (None), a likely value, or any JSON value.
    fn field(likely: Vec<serde_json::Value>) -> impl Strategy<Value = Option<serde_json::Value>> {
        prop_oneof![
            1 => Just(None),
            6 => proptest::sample::select(likely).prop_map(Some),
            1 => any_json().prop_map(Some),
        ]
    }

    fn reference_input() -> impl Strategy<Value = serde_json::Value> {
        let ids = |n: std::ops::Range<u32>| -> Vec<serde_json::Value> {
            n.map(|i| json!(format!("spiffe://nexus.local/ns/plugins/sa/m-{i}")))
                .collect()
        };
        (
            field(ids(0..6)),
            field(vec![
                json!("spiffe://nexus.local/ns/data/sa/hazard-api"),
                json!("spiffe://nexus.local/ns/plugins/sa/m-1"),
            ]),
            field((0..6).map(|i| json!(format!("c-{i}"))).collect()),
            field(vec![
                json!("GET"),
                json!("HEAD"),
                json!("POST"),
                json!("DELETE"),
            ]),
            field(vec![
                json!("/healthz"),
                json!("/clauses/c-1/x"),
                json!("/other"),
            ]),
            field((0..6).map(|i| json!(format!("ex-{i}"))).collect()),
            field(vec![
                json!(999),
                json!(1_002),
                json!(1_005),
                json!(2_000),
                json!("1003"),
            ]),
        )
            .prop_map(|(src, dst, clause, method, path, ex, time)| {
                let mut input = serde_json::Map::new();
                let mut put = |k: &str, v: Option<serde_json::Value>| {
                    if let Some(v) = v {
                        input.insert(k.to_string(), v);
                    }
                };
                put("source", src.map(|s| json!({"spiffe_id": s})));
                put("destination", dst.map(|s| json!({"spiffe_id": s})));
                put("clause", clause);
                let mut request = serde_json::Map::new();
                if let Some(m) = method {
                    request.insert("method".into(), m);
                }
                if let Some(p) = path {
                    request.insert("path".into(), p);
                }
                put("request", Some(serde_json::Value::Object(request)));
                put("execution", ex.map(|e| json!({"id": e})));
                put("time_ns", time);
                serde_json::Value::Object(input)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// The reference policy, on inputs with missing and mistyped fields and on data
        /// with both shapes of binding, revocations and a method override: the same
        /// decision as the interpreter, and no hand-over (the reference policy is
        /// entirely within what this evaluator takes).
        #[test]
        fn the_reference_policy_decides_as_the_interpreter(
            input in reference_input(),
            objects in any::<bool>(),
            revoked in proptest::sample::subsequence(vec!["spiffe://nexus.local/ns/plugins/sa/m-1", "spiffe://nexus.local/ns/data/sa/hazard-api"], 0..=2),
            methods in proptest::option::of(Just(vec!["GET", "POST"])),
        ) {
            let data = Value::from(reference_data(objects, &revoked, methods));
            let modules = [("authz.rego", REFERENCE)];
            let p = compile(&texts(&modules), "data.nexus.authz.decision", 100_000).unwrap();
            let index = p.index(&data);
            let input = Value::from(input);
            let got = p.eval(&input, &data, &index);
            prop_assert!(got.is_ok(), "handed on: {got:?}");
            prop_assert!(p.direct, "the reference decision is read off its rule");
            let decided = p.decide_until(&input, &data, &index, None, &[]);
            prop_assert_eq!(
                decided,
                Ok(crate::engine::decision_from(got.as_ref().unwrap_or(&Value::Undefined)))
            );
            prop_assert_eq!(
                crate::verify::show(&got.map_err(|_| String::new())),
                interpreted(&modules, &data, "data.nexus.authz.decision", &input)
            );
        }
    }
}
