//! OPA compatibility: finds, in a policy's Rego, the constructs on which nexus's engine
//! (regorus) and OPA are known to decide differently (each one measured by the
//! differential harness, `tests/opa/differential`, and listed in
//! `docs/opa-compatibility.md`), so `nexusctl policy check` can say so at the line
//! instead of a request being decided otherwise in production. Also: which revisions
//! must run on regorus's interpreter rather than its RVM, and evaluating one rule the
//! way the sidecar does (for tools comparing nexus with OPA).
//!
//! The checks read regorus's own AST (`regorus::unstable`, pinned by Cargo.lock), so
//! they see exactly what the engine parses.

use std::collections::BTreeSet;
use std::time::Duration;

use regorus::Value;
use regorus::unstable::{Expr, Literal, Module as Ast, Parser, Query, Rule, RuleHead, Source};

use crate::bundle::Bundle;
use crate::engine::{EvalMode, Policy, PolicyOptions};
use crate::error::{Location, PolicyError};

/// Parses a module (None when it does not parse: compiling reports that).
pub(crate) fn parse(path: &str, text: &str) -> Option<Ast> {
    let source = Source::from_contents(path.to_string(), text.to_string()).ok()?;
    let mut parser = Parser::new(&source).ok()?;
    // As the engine parses: Rego v1 (`if` and `contains` are keywords).
    parser.enable_rego_v1().ok()?;
    parser.parse().ok()
}

/// The dotted name of a call's function (`io.jwt.decode`), if it is a plain ref.
pub(crate) fn dotted(expr: &Expr) -> Option<String> {
    match expr {
        Expr::Var { value, .. } => value.as_string().ok().map(|s| s.to_string()),
        Expr::RefDot { refr, field, .. } => {
            let head = dotted(refr)?;
            Some(format!("{head}.{}", field.1.as_string().ok()?))
        }
        _ => None,
    }
}

/// Calls `f` on every expression of `module`, outermost first.
fn each_expr(module: &Ast, f: &mut dyn FnMut(&Expr)) {
    for rule in &module.policy {
        match rule.as_ref() {
            Rule::Spec { head, bodies, .. } => {
                match head {
                    RuleHead::Compr { refr, assign, .. } => {
                        walk(refr, f);
                        if let Some(a) = assign {
                            walk(&a.value, f);
                        }
                    }
                    RuleHead::Set { refr, key, .. } => {
                        walk(refr, f);
                        if let Some(k) = key {
                            walk(k, f);
                        }
                    }
                    RuleHead::Func {
                        refr, args, assign, ..
                    } => {
                        walk(refr, f);
                        for a in args {
                            walk(a, f);
                        }
                        if let Some(a) = assign {
                            walk(&a.value, f);
                        }
                    }
                }
                for body in bodies {
                    if let Some(a) = &body.assign {
                        walk(&a.value, f);
                    }
                    walk_query(&body.query, f);
                }
            }
            Rule::Default {
                refr, args, value, ..
            } => {
                walk(refr, f);
                for a in args {
                    walk(a, f);
                }
                walk(value, f);
            }
        }
    }
}

pub(crate) fn walk_query(query: &Query, f: &mut dyn FnMut(&Expr)) {
    for stmt in &query.stmts {
        match &stmt.literal {
            Literal::SomeVars { .. } => {}
            Literal::SomeIn {
                key,
                value,
                collection,
                ..
            } => {
                if let Some(k) = key {
                    walk(k, f);
                }
                walk(value, f);
                walk(collection, f);
            }
            Literal::Expr { expr, .. } | Literal::NotExpr { expr, .. } => walk(expr, f),
            Literal::Every { domain, query, .. } => {
                walk(domain, f);
                walk_query(query, f);
            }
        }
        for w in &stmt.with_mods {
            walk(&w.refr, f);
            walk(&w.r#as, f);
        }
    }
}

pub(crate) fn walk(expr: &Expr, f: &mut dyn FnMut(&Expr)) {
    f(expr);
    match expr {
        Expr::String { .. }
        | Expr::RawString { .. }
        | Expr::Number { .. }
        | Expr::Bool { .. }
        | Expr::Null { .. }
        | Expr::Var { .. } => {}
        Expr::Array { items, .. } | Expr::Set { items, .. } => {
            for i in items {
                walk(i, f);
            }
        }
        Expr::Object { fields, .. } => {
            for (_, k, v) in fields {
                walk(k, f);
                walk(v, f);
            }
        }
        Expr::ArrayCompr { term, query, .. } | Expr::SetCompr { term, query, .. } => {
            walk(term, f);
            walk_query(query, f);
        }
        Expr::ObjectCompr {
            key, value, query, ..
        } => {
            walk(key, f);
            walk(value, f);
            walk_query(query, f);
        }
        Expr::Call { fcn, params, .. } => {
            walk(fcn, f);
            for p in params {
                walk(p, f);
            }
        }
        Expr::UnaryExpr { expr, .. } => walk(expr, f),
        Expr::RefDot { refr, .. } => walk(refr, f),
        Expr::RefBrack { refr, index, .. } => {
            walk(refr, f);
            walk(index, f);
        }
        Expr::BinExpr { lhs, rhs, .. }
        | Expr::BoolExpr { lhs, rhs, .. }
        | Expr::ArithExpr { lhs, rhs, .. }
        | Expr::AssignExpr { lhs, rhs, .. } => {
            walk(lhs, f);
            walk(rhs, f);
        }
        Expr::Membership {
            key,
            value,
            collection,
            ..
        } => {
            if let Some(k) = key {
                walk(k, f);
            }
            walk(value, f);
            walk(collection, f);
        }
    }
}

/// The dotted names of every function `text` calls.
pub fn called_functions(path: &str, text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    if let Some(module) = parse(path, text) {
        each_expr(&module, &mut |e| {
            if let Expr::Call { fcn, .. } = e
                && let Some(name) = dotted(fcn)
            {
                out.insert(name);
            }
        });
    }
    out
}

/// How one rule evaluated.
#[derive(Clone, Debug, PartialEq)]
pub enum RuleOutcome {
    /// A value.
    Value(Value),
    /// Undefined.
    Undefined,
    /// An evaluation error (its message).
    Error(String),
}

/// Evaluates `rule` for `input` the way the sidecar evaluates its decision rule (the
/// mode `Policy::compile` chooses, the same VM or interpreter setup), returning the
/// rule's value itself rather than a decision: what tools comparing nexus with OPA need.
pub fn evaluate_rule(
    bundle: &Bundle,
    rule: &str,
    input: Value,
    timeout: Duration,
) -> Result<(EvalMode, RuleOutcome), PolicyError> {
    evaluate_rule_in(bundle, rule, input, timeout, EvalMode::Compiled)
}

/// `evaluate_rule` with a requested mode (`Interpreted` forces the interpreter).
pub fn evaluate_rule_in(
    bundle: &Bundle,
    rule: &str,
    input: Value,
    timeout: Duration,
    mode: EvalMode,
) -> Result<(EvalMode, RuleOutcome), PolicyError> {
    let options = PolicyOptions {
        decision_rule: rule.to_string(),
        eval_timeout: timeout,
        mode,
        ..PolicyOptions::default()
    };
    let policy = Policy::compile(bundle, &Value::new_object(), options)?;
    let outcome = match policy.evaluate_value(input) {
        Ok(Value::Undefined) => RuleOutcome::Undefined,
        Ok(v) => RuleOutcome::Value(v),
        Err(e) => RuleOutcome::Error(e),
    };
    Ok((policy.mode(), outcome))
}

/// Builtins whose answer differs from OPA's on some values (each a listed difference of
/// `tests/opa/differential/known_differences.yaml`): flagged at every call, since the
/// values are known only when evaluating.
const DIFFERING_BUILTINS: &[(&str, &str, &str)] = &[
    (
        "time.format",
        "write a zone abbreviation (EST) for a MST layout",
        "writes the numeric offset (-05:00); compare times as numbers",
    ),
    (
        "json.marshal",
        "keep a number's spelling (1e3)",
        "writes the number's value (1000); compare parsed values, not text",
    ),
];

/// What to write instead of a builtin nexus does not have.
fn instead(name: &str) -> &'static str {
    match name {
        "strings.render_template" => "build the string with sprintf or concat",
        "regex.globs_match" => {
            "compare the patterns with glob.match or regex.match on known values"
        }
        "json.match_schema" | "json.verify_schema" => {
            "check the fields with is_string/is_number and comparisons"
        }
        "http.send" | "net.lookup_ip_addr" | "providers.aws.sign_req" => {
            "push what the policy needs as data (nexus policies make no network calls)"
        }
        "io.jwt.encode_sign" | "io.jwt.encode_sign_raw" => {
            "sign tokens outside the policy; io.jwt.decode_verify checks them"
        }
        "rego.metadata.rule" | "rego.metadata.chain" | "rego.parse_module" => {
            "put the values in data or in the rule itself"
        }
        _ if name.starts_with("graphql.") => {
            "validate GraphQL outside the policy and pass the result in the input"
        }
        _ => "parse the material outside the policy, or use crypto.x509.parse_certificates",
    }
}

/// Whether a finding is a difference to know about or a certain failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Evaluates, but not as OPA would (an error with `--strict`).
    Warning,
    /// Fails or crashes in nexus whatever OPA does: always an error.
    Error,
}

/// One construct that nexus evaluates differently from OPA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// Where.
    pub location: Location,
    /// Warning or error.
    pub severity: Severity,
    /// The construct, as written.
    pub construct: String,
    /// What OPA does.
    pub opa: String,
    /// What nexus does.
    pub nexus: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let severity = match self.severity {
            Severity::Warning => "warning",
            Severity::Error => "error",
        };
        write!(
            f,
            "{}: {severity}: {}: OPA would {}; nexus {}",
            self.location, self.construct, self.opa, self.nexus
        )
    }
}

/// OPA 1.20 builtins that nexus has neither from regorus nor from `builtins` (measured:
/// a call fails to compile in the RVM and errors in the interpreter).
const MISSING_BUILTINS: &[&str] = &[
    "crypto.parse_private_keys",
    "crypto.x509.parse_and_verify_certificates_with_options",
    "crypto.x509.parse_certificate_request",
    "crypto.x509.parse_keypair",
    "crypto.x509.parse_rsa_private_key",
    "graphql.is_valid",
    "graphql.parse",
    "graphql.parse_and_verify",
    "graphql.parse_query",
    "graphql.parse_schema",
    "graphql.schema_is_valid",
    "http.send",
    "io.jwt.encode_sign",
    "io.jwt.encode_sign_raw",
    "json.match_schema",
    "json.verify_schema",
    "net.lookup_ip_addr",
    "providers.aws.sign_req",
    "regex.globs_match",
    "rego.metadata.chain",
    "rego.metadata.rule",
    "rego.parse_module",
    "strings.render_template",
];

/// The constructs of `bundle` that put a rule depending on them on regorus's
/// interpreter rather than its RVM (`routing`), as text.
pub fn interpreter_reasons(bundle: &Bundle) -> Vec<String> {
    crate::routing::all_reasons(bundle)
        .iter()
        .map(ToString::to_string)
        .collect()
}

/// Calls `f` on every query (rule bodies, comprehensions, `every` bodies).
fn each_query(module: &Ast, f: &mut dyn FnMut(&Query)) {
    fn in_query(q: &Query, f: &mut dyn FnMut(&Query)) {
        f(q);
        for stmt in &q.stmts {
            if let Literal::Every { query, .. } = &stmt.literal {
                in_query(query, f);
            }
        }
    }
    for rule in &module.policy {
        if let Rule::Spec { bodies, .. } = rule.as_ref() {
            for body in bodies {
                in_query(&body.query, f);
            }
        }
    }
    let mut inner = Vec::new();
    each_expr(module, &mut |e| match e {
        Expr::ArrayCompr { query, .. }
        | Expr::SetCompr { query, .. }
        | Expr::ObjectCompr { query, .. } => inner.push(query.clone()),
        _ => {}
    });
    for q in inner {
        in_query(&q, f);
    }
}

pub(crate) fn location(span: &regorus::unstable::Span) -> Location {
    Location {
        file: span.source.file().to_string(),
        line: span.line,
        col: span.col,
    }
}

/// The root variable of a ref (`input` for `input.a.b[0]`).
pub(crate) fn ref_root(expr: &Expr) -> Option<&str> {
    match expr {
        Expr::Var { value, .. } => value.as_string().ok().map(|s| s.as_ref()),
        Expr::RefDot { refr, .. } | Expr::RefBrack { refr, .. } => ref_root(refr),
        _ => None,
    }
}

/// A ref's path when every part is static (`input.request["method"]`).
pub(crate) fn static_path(expr: &Expr) -> Option<String> {
    match expr {
        Expr::Var { value, .. } => Some(value.as_string().ok()?.to_string()),
        Expr::RefDot { refr, field, .. } => Some(format!(
            "{}.{}",
            static_path(refr)?,
            field.1.as_string().ok()?
        )),
        Expr::RefBrack { refr, index, .. } => match index.as_ref() {
            Expr::String { value, .. } | Expr::RawString { value, .. } => Some(format!(
                "{}.{}",
                static_path(refr)?,
                value.as_string().ok()?
            )),
            _ => None,
        },
        _ => None,
    }
}

fn snippet(span: &regorus::unstable::Span) -> String {
    shorten(span.text())
}

/// Where an expression starts (a ref's span starts at its last `.`).
pub(crate) fn leftmost(expr: &Expr) -> &regorus::unstable::Span {
    match expr {
        Expr::RefDot { refr, .. } | Expr::RefBrack { refr, .. } => leftmost(refr),
        _ => expr.span(),
    }
}

pub(crate) fn shorten(text: &str) -> String {
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if text.chars().count() > 60 {
        format!("{}...", text.chars().take(57).collect::<String>())
    } else {
        text
    }
}

/// Every construct of `bundle` (modules and tests) that nexus evaluates differently
/// from OPA, in file and line order.
pub fn check(bundle: &Bundle) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut asts = Vec::new();
    for (module, is_test) in bundle
        .modules
        .iter()
        .map(|m| (m, false))
        .chain(bundle.tests.iter().map(|m| (m, true)))
    {
        let Some(ast) = parse(&module.path, &module.text) else {
            continue;
        };
        let _ = is_test;
        check_module(&ast, &mut out);
        check_reserved_names(&ast, &mut out);
        asts.push(ast);
    }
    check_recursion(&asts, &mut out);
    check_ref_head_prefixes(&asts, &mut out);
    check_negated_conflicts(&asts, &mut out);
    out.sort_by(|a, b| {
        (&a.location.file, a.location.line, a.location.col).cmp(&(
            &b.location.file,
            b.location.line,
            b.location.col,
        ))
    });
    out.dedup();
    out
}

fn check_module(ast: &Ast, out: &mut Vec<Finding>) {
    each_query(ast, &mut |q| {
        for stmt in &q.stmts {
            for w in &stmt.with_mods {
                if let Some(name) = dotted(&w.refr)
                    && crate::builtins::names().any(|n| n == name)
                {
                    out.push(Finding {
                        location: location(&w.span),
                        severity: Severity::Warning,
                        construct: format!("`with {name} as ...`"),
                        opa: format!("replace {name} for this evaluation"),
                        nexus: format!(
                            "cannot replace a builtin it adds ({name}) and fails with `undefined rule`; \
                             wrap the call in a function of your own and replace that"
                        ),
                    });
                }
            }
        }
    });
    each_expr(ast, &mut |e| match e {
        Expr::ArithExpr {
            span, lhs, rhs, op, ..
        } => {
            // A line that starts with `-` (`x` newline `-1 < 0`): OPA starts a new
            // statement, regorus's parser continues the expression (`x - 1 < 0`).
            if matches!(op, regorus::unstable::ArithOp::Sub) {
                let text = span.source.contents();
                let lhs_end = {
                    let mut end = lhs.span().end;
                    walk(lhs, &mut |x| end = end.max(x.span().end));
                    end as usize
                };
                let op_at = text
                    .get(lhs_end..)
                    .and_then(|t| t.find('-'))
                    .map(|i| lhs_end + i);
                if let Some(op_at) = op_at
                    && text
                        .get(lhs_end..op_at)
                        .is_some_and(|gap| gap.contains('\n'))
                {
                    out.push(Finding {
                        location: location(leftmost(rhs)),
                        severity: Severity::Error,
                        construct: "a line that starts with `-`".into(),
                        opa: "start a new statement there".into(),
                        nexus: "continues the previous line's expression (a subtraction): refused at load; \
                                write `0 - n` or put the number on the right of the comparison"
                            .into(),
                    });
                }
            }
            let fractional = |x: &Expr| {
                matches!(x, Expr::Number { .. }) && x.span().text().contains(['.', 'e', 'E'])
            };
            if fractional(lhs) || fractional(rhs) {
                out.push(Finding {
                    location: location(span),
                    severity: Severity::Warning,
                    construct: format!("`{}`: arithmetic on a decimal fraction", snippet(span)),
                    opa: "compute in exact decimal (0.1 + 0.2 is 0.3)".into(),
                    nexus: "computes in binary floating point (0.1 + 0.2 is 0.30000000000000004); \
                            compare with a tolerance, or scale to integers"
                        .into(),
                });
            }
        }
        Expr::Call {
            span, fcn, params, ..
        } => {
            let Some(name) = dotted(fcn) else { return };
            if let Some((_, opa, nexus)) = DIFFERING_BUILTINS.iter().find(|(n, _, _)| *n == name) {
                out.push(Finding {
                    location: location(span),
                    severity: Severity::Warning,
                    construct: format!("`{name}`"),
                    opa: (*opa).into(),
                    nexus: (*nexus).into(),
                });
            }
            if MISSING_BUILTINS.contains(&name.as_str()) {
                out.push(Finding {
                    location: location(span),
                    severity: Severity::Error,
                    construct: format!("`{name}`"),
                    opa: "evaluate this builtin".into(),
                    nexus: format!(
                        "does not have this builtin: the policy is refused at load (rather than \
                         one rule silently failing); {}",
                        instead(&name)
                    ),
                });
            }
            if name == "sprintf"
                && let Some(Expr::String { value, .. } | Expr::RawString { value, .. }) =
                    params.first().map(|p| p.as_ref())
                && let Ok(format) = value.as_string()
                && let Some(verb) = unsupported_verb(format)
            {
                out.push(Finding {
                    location: location(span),
                    severity: Severity::Warning,
                    construct: format!("`{verb}` in a sprintf format"),
                    opa: "format it as Go's fmt does".into(),
                    nexus:
                        "formats it differently (widths, flags and %x/%o/%b/%e/%g are not Go's); \
                            build the string with format_int, concat or sprintf's %v/%s/%d"
                            .into(),
                });
            }
        }
        _ => {}
    });
}

/// The first sprintf verb nexus does not format as Go does: a width, precision or flag
/// other than `%.Nf`, or a verb other than v, s, d, q, f, t.
fn unsupported_verb(format: &str) -> Option<String> {
    let bytes = format.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            i += 1;
            continue;
        }
        let start = i;
        i += 1;
        if bytes.get(i) == Some(&b'%') {
            i += 1;
            continue;
        }
        while i < bytes.len() && b"+-# 0123456789.".contains(&bytes[i]) {
            i += 1;
        }
        let &verb = bytes.get(i)?;
        let spec = &format[start..=i];
        let flags = &format[start + 1..i];
        let ok = match verb {
            b'v' | b's' | b'd' | b'q' | b't' => flags.is_empty(),
            b'f' => {
                flags.is_empty()
                    || (flags.starts_with('.') && flags[1..].bytes().all(|b| b.is_ascii_digit()))
            }
            _ => false,
        };
        if !ok {
            return Some(spec.to_string());
        }
        i += 1;
    }
    None
}

/// A reference to a prefix of a ref-head rule (`r` or `r.a` of `r.a.b := ...`): OPA
/// builds that document from the rules under it (`{"a": {}}` even when no body holds);
/// nexus evaluates rules, not documents, and has no value for it. A `not r` then
/// succeeds in nexus where it fails in OPA (a fail-open), so it is refused at load.
fn check_ref_head_prefixes(asts: &[Ast], out: &mut Vec<Finding>) {
    use std::collections::BTreeMap;
    let mut heads: BTreeMap<String, (BTreeSet<String>, BTreeSet<String>)> = BTreeMap::new();
    for ast in asts {
        let package = dotted(&ast.package.refr).unwrap_or_default();
        let entry = heads.entry(package).or_default();
        for rule in &ast.policy {
            let refr = match rule.as_ref() {
                Rule::Spec { head, .. } => match head {
                    RuleHead::Compr { refr, .. }
                    | RuleHead::Set { refr, .. }
                    | RuleHead::Func { refr, .. } => refr,
                },
                Rule::Default { refr, .. } => refr,
            };
            match static_path(refr) {
                Some(path) if path.contains('.') => {
                    entry.0.insert(path);
                }
                _ => {
                    let mut root = refr.as_ref();
                    while let Expr::RefDot { refr, .. } | Expr::RefBrack { refr, .. } = root {
                        root = refr;
                    }
                    if let Some(name) = dotted(root) {
                        entry.1.insert(name);
                    }
                }
            }
        }
    }
    for ast in asts {
        let package = dotted(&ast.package.refr).unwrap_or_default();
        let Some((paths, direct)) = heads.get(&package) else {
            continue;
        };
        if paths.is_empty() {
            continue;
        }
        let is_prefix = |p: &str| {
            !direct.contains(p)
                && !paths.contains(p)
                && paths
                    .iter()
                    .any(|full| full.strip_prefix(p).is_some_and(|r| r.starts_with('.')))
        };
        let mut inner: BTreeSet<*const Expr> = BTreeSet::new();
        each_expr(ast, &mut |e| {
            if let Expr::RefDot { refr, .. } | Expr::RefBrack { refr, .. } = e {
                inner.insert(refr.as_ref() as *const Expr);
            }
        });
        let data_prefix = format!("data.{package}.");
        each_expr(ast, &mut |e| {
            if inner.contains(&(e as *const Expr)) {
                return;
            }
            let Some(path) = static_path(e) else { return };
            let local = path.strip_prefix(&data_prefix).unwrap_or(&path);
            if is_prefix(local) {
                let full = paths
                    .iter()
                    .find(|f| f.strip_prefix(local).is_some_and(|r| r.starts_with('.')))
                    .cloned()
                    .unwrap_or_default();
                out.push(Finding {
                    location: location(leftmost(e)),
                    severity: Severity::Error,
                    construct: format!("`{path}` is a prefix of the ref-head rule `{full}`"),
                    opa: format!("build the document `{local}` from the rules under it (an object, even when no body holds)"),
                    nexus: format!(
                        "evaluates rules, not the documents they build, so it has no value for `{local}` \
                         (a `not {local}` would succeed where OPA fails): refused at load; refer to \
                         `{full}` itself, or define `{local}` as a rule"
                    ),
                });
            }
        });
    }
}

/// `not r` where `r` (a complete rule or a function) has several definitions that may
/// give different values: OPA raises a conflict error when two hold (a deny); the RVM
/// makes `r` undefined, so the `not` holds. Not decidable without the values: a warning
/// at the `not`.
fn check_negated_conflicts(asts: &[Ast], out: &mut Vec<Finding>) {
    use std::collections::BTreeMap;
    for ast in asts {
        let package = dotted(&ast.package.refr).unwrap_or_default();
        let mut values: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for other in asts
            .iter()
            .filter(|a| dotted(&a.package.refr).unwrap_or_default() == package)
        {
            for rule in &other.policy {
                let Rule::Spec { head, bodies, .. } = rule.as_ref() else {
                    continue;
                };
                let (refr, assign) = match head {
                    RuleHead::Compr { refr, assign, .. } | RuleHead::Func { refr, assign, .. } => {
                        (refr, assign)
                    }
                    RuleHead::Set { .. } => continue,
                };
                let Expr::Var { value, .. } = refr.as_ref() else {
                    continue;
                };
                let Ok(name) = value.as_string() else {
                    continue;
                };
                let entry = values.entry(name.to_string()).or_default();
                entry.insert(
                    assign
                        .as_ref()
                        .map_or_else(|| "true".to_string(), |a| a.value.span().text().to_string()),
                );
                for body in bodies.iter().skip(1) {
                    if let Some(a) = &body.assign {
                        entry.insert(a.value.span().text().to_string());
                    }
                }
                // Two definitions of one value still count once; mark a second one.
                entry.insert(format!("#definition {}", rule.span().start));
            }
        }
        let conflicting: BTreeSet<String> = values
            .into_iter()
            .filter(|(_, v)| {
                let defs = v.iter().filter(|x| x.starts_with("#definition")).count();
                let vals = v.iter().filter(|x| !x.starts_with("#definition")).count();
                defs > 1 && vals > 1
            })
            .map(|(k, _)| k)
            .collect();
        if conflicting.is_empty() {
            continue;
        }
        each_query(ast, &mut |q| {
            for stmt in &q.stmts {
                if let Literal::NotExpr { expr, span } = &stmt.literal {
                    let target = match expr.as_ref() {
                        Expr::Call { fcn, .. } => dotted(fcn),
                        other => dotted(other),
                    };
                    if let Some(name) = target.filter(|n| conflicting.contains(n)) {
                        out.push(Finding {
                            location: location(span),
                            severity: Severity::Warning,
                            construct: format!("`not {name}` of a rule whose definitions may give different values"),
                            opa: "raise a conflict error when two definitions hold (a deny)".into(),
                            nexus: format!(
                                "makes `{name}` undefined in its compiled mode, so the `not` holds; \
                                 make the definitions exclude each other (`else`)"
                            ),
                        });
                    }
                }
            }
        });
    }
}

/// The name a rule defines (the root of its head's ref) and where it is written.
pub(crate) fn rule_name(rule: &Rule) -> Option<(String, regorus::unstable::Span)> {
    let refr = match rule {
        Rule::Spec { head, .. } => match head {
            RuleHead::Compr { refr, .. }
            | RuleHead::Set { refr, .. }
            | RuleHead::Func { refr, .. } => refr,
        },
        Rule::Default { refr, .. } => refr,
    };
    let mut root = refr.as_ref();
    while let Expr::RefDot { refr, .. } | Expr::RefBrack { refr, .. } = root {
        root = refr;
    }
    match root {
        Expr::Var { value, span, .. } => Some((value.as_string().ok()?.to_string(), span.clone())),
        _ => None,
    }
}

/// Rules named `__nexus_*`: the names of nexus's rewrites and helper builtins
/// (`rewrite`), which a policy's own rule would shadow or be shadowed by.
fn check_reserved_names(ast: &Ast, out: &mut Vec<Finding>) {
    for rule in &ast.policy {
        if let Some((name, span)) = rule_name(rule)
            && name.starts_with("__nexus_")
        {
            out.push(Finding {
                location: location(&span),
                severity: Severity::Error,
                construct: format!("a rule named `{name}`"),
                opa: "evaluate it".into(),
                nexus: "reserves names that start with `__nexus_` for its own rewrites and \
                        builtins: the policy is refused at load; rename the rule"
                    .into(),
            });
        }
    }
}

/// Rules that depend on themselves: OPA refuses them at compile time (recursion
/// error); regorus recurses until the process's stack overflows, which aborts it.
fn check_recursion(asts: &[Ast], out: &mut Vec<Finding>) {
    use std::collections::BTreeMap;
    // "pkg.rule" -> (where, the "pkg.rule"s it refers to)
    let mut graph: BTreeMap<String, (Location, BTreeSet<String>)> = BTreeMap::new();
    let package_of = |ast: &Ast| dotted(&ast.package.refr).unwrap_or_default();
    let mut names_by_package: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for ast in asts {
        let package = package_of(ast);
        for rule in &ast.policy {
            if let Some((name, _)) = rule_name(rule) {
                names_by_package
                    .entry(package.clone())
                    .or_default()
                    .insert(name);
            }
        }
    }
    for ast in asts {
        let package = package_of(ast);
        let local = names_by_package.get(&package).cloned().unwrap_or_default();
        for rule in &ast.policy {
            let Some((name, span)) = rule_name(rule) else {
                continue;
            };
            // A function's parameters are local variables, even when one has the name
            // of a rule of the package (`f(x) := ...` beside a rule `x`).
            let mut params = BTreeSet::new();
            if let Rule::Spec {
                head: RuleHead::Func { args, .. },
                ..
            } = rule.as_ref()
            {
                for arg in args {
                    walk(arg, &mut |e: &Expr| {
                        if let Expr::Var { value, .. } = e
                            && let Ok(v) = value.as_string()
                        {
                            params.insert(v.to_string());
                        }
                    });
                }
            }
            let mut deps = BTreeSet::new();
            let mut visit = |e: &Expr| {
                if let Expr::Var { value, .. } = e
                    && let Ok(v) = value.as_string()
                    && local.contains(v.as_ref())
                    && !params.contains(v.as_ref())
                {
                    deps.insert(format!("{package}.{v}"));
                }
                if let Some(path) = dotted(e)
                    && let Some(rest) = path.strip_prefix("data.")
                {
                    deps.insert(rest.to_string());
                }
            };
            // The head names the rule itself: only its values and bodies refer.
            match rule.as_ref() {
                Rule::Spec { head, bodies, .. } => {
                    match head {
                        RuleHead::Compr { assign, .. } | RuleHead::Func { assign, .. } => {
                            if let Some(a) = assign {
                                walk(&a.value, &mut visit);
                            }
                        }
                        RuleHead::Set { key, .. } => {
                            if let Some(k) = key {
                                walk(k, &mut visit);
                            }
                        }
                    }
                    for body in bodies {
                        if let Some(a) = &body.assign {
                            walk(&a.value, &mut visit);
                        }
                        walk_query(&body.query, &mut visit);
                    }
                }
                Rule::Default { value, .. } => walk(value, &mut visit),
            }
            let key = format!("{package}.{name}");
            let entry = graph
                .entry(key)
                .or_insert_with(|| (location(&span), BTreeSet::new()));
            entry.1.extend(deps);
        }
    }
    // A rule's own head names it (and its `else` bodies repeat it): only a path back
    // to itself through another rule, or a call of itself, is recursion. Function
    // calls and ref reads both appear as deps, so a rule "depends on itself" only
    // when its body refers to its own name.
    for (key, (loc, _)) in &graph {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<(String, Vec<String>)> = graph[key]
            .1
            .iter()
            .filter(|d| graph.contains_key(*d))
            .map(|d| (d.clone(), vec![key.clone(), d.clone()]))
            .collect();
        while let Some((node, path)) = stack.pop() {
            if node == *key {
                out.push(Finding {
                    location: loc.clone(),
                    severity: Severity::Error,
                    construct: format!("recursive rule data.{key} ({})", path.iter().map(|p| format!("data.{p}")).collect::<Vec<_>>().join(" -> ")),
                    opa: "refuse it at compile time (rego_recursion_error)".into(),
                    nexus: "recurses until the stack overflows, which aborts the process (the sidecar, \
                            `nexusctl policy test`): refused at load; write the rule without recursion"
                        .into(),
                });
                break;
            }
            if !seen.insert(node.clone()) {
                continue;
            }
            if let Some((_, deps)) = graph.get(&node) {
                for d in deps.iter().filter(|d| graph.contains_key(*d)) {
                    let mut p = path.clone();
                    p.push(d.clone());
                    stack.push((d.clone(), p));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::Module;

    fn bundle(modules: &[(&str, &str)]) -> Bundle {
        Bundle::from_modules(
            modules
                .iter()
                .map(|(p, t)| Module {
                    path: (*p).into(),
                    text: (*t).into(),
                })
                .collect(),
            Value::new_object(),
        )
    }

    fn findings(text: &str) -> Vec<String> {
        check(&bundle(&[("p.rego", text)]))
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn float_arithmetic_sprintf_and_missing_builtins() {
        let f = findings(
            "package t\n\na := input.n * 1.1\n\nb := input.n * 2\n\nc := sprintf(\"%5s %v %.2f\", [1, 2, 3])\n\nd := sprintf(\"%s %d\", [1, 2])\n\ne := strings.render_template(\"{{.a}}\", {})\n",
        );
        assert_eq!(f.len(), 3, "{f:?}");
        assert!(
            f[0].contains("p.rego:3:") && f[0].contains("decimal fraction"),
            "{f:?}"
        );
        assert!(
            f[1].contains("p.rego:7:") && f[1].contains("`%5s`"),
            "{f:?}"
        );
        assert!(
            f[2].contains("p.rego:11:") && f[2].contains(": error: `strings.render_template`"),
            "{f:?}"
        );
    }

    /// `with count as ...` names regorus's `count`: a bundle that uses it keeps every
    /// `count` call regorus's, so the replacement still reaches them all.
    #[test]
    fn a_test_that_replaces_count_still_replaces_it() {
        let policy = (
            "p.rego",
            "package t\n\nimport rego.v1\n\nn := count(input.s)\n",
        );
        let test = (
            "p_test.rego",
            "package t_test\n\nimport rego.v1\n\nimport data.t\n\nmock(_) := 42\n\ntest_mocked if t.n == 42 with count as mock with input as {\"s\": \"ab\"}\n\ntest_real if t.n == 2 with input as {\"s\": \"ab\"}\n",
        );
        let mocked = bundle(&[policy, test]);
        assert!(!crate::rewrite::counts_runes(&mocked));
        let report = crate::testing::run_tests(&mocked, false, None).unwrap();
        assert_eq!(report.results.len(), 2);
        assert_eq!(report.failed().count(), 0, "{:?}", report.results);
        // Without the replacement, a string's runes are counted.
        let plain = bundle(&[
            (
                "p.rego",
                "package t\n\nimport rego.v1\n\nn := count(input.s)\n",
            ),
            (
                "p_test.rego",
                "package t_test\n\nimport rego.v1\n\nimport data.t\n\ntest_runes if t.n == 2 with input as {\"s\": \"a\u{1F600}\"}\n",
            ),
        ]);
        assert!(crate::rewrite::counts_runes(&plain));
        let report = crate::testing::run_tests(&plain, false, None).unwrap();
        assert_eq!(report.failed().count(), 0, "{:?}", report.results);
    }

    #[test]
    fn rules_named_like_nexuss_rewrites_are_refused() {
        let f = findings(
            "package t\n\nx := count(input.s)\n\n__nexus_count(s) := 0\n\n__nexus_g1 contains 1\n",
        );
        assert_eq!(f.len(), 2, "{f:?}");
        assert!(
            f[0].contains("p.rego:5:") && f[0].contains(": error: a rule named `__nexus_count`"),
            "{f:?}"
        );
        assert!(
            f[1].contains("p.rego:7:") && f[1].contains("`__nexus_g1`"),
            "{f:?}"
        );
    }

    #[test]
    fn with_on_a_nexus_builtin_warns() {
        let f = findings(
            "package t\n\nc := io.jwt.decode(input.t)\n\ntest_c if c with io.jwt.decode as [{}, {}, \"\"]\n",
        );
        assert!(
            f.iter()
                .any(|l| l.contains("p.rego:5:") && l.contains("`with io.jwt.decode as ...`")),
            "{f:?}"
        );
    }

    #[test]
    fn an_undefined_assignment_before_a_negation_fails_the_body_in_compiled_mode() {
        let text = "package t\nimport rego.v1\ncfg := {\"a\": {\"obs\": [\"peer\"]}}\n\
                    allow if {\n\tobs := cfg[input.kind].obs\n\tnot input.o in obs\n}\n\
                    decision := {\"allow\": true, \"reasons\": []} if allow\n";
        let b = bundle(&[("t.rego", text)]);
        // The RVM's text guards `obs := ...` (`rewrite`): it stays compiled, and right;
        // nexus's own evaluator (the default) is right too.
        for (native, mode) in [(false, EvalMode::Compiled), (true, EvalMode::Native)] {
            let policy = crate::Policy::compile(
                &b,
                &crate::Value::new_object(),
                crate::PolicyOptions {
                    decision_rule: "data.t.decision".into(),
                    native,
                    ..crate::PolicyOptions::default()
                },
            )
            .unwrap();
            assert_eq!(policy.mode(), mode, "{:?}", policy.report());
            let input = crate::Value::from(serde_json::json!({"kind": "zzz", "o": "peer"}));
            assert!(!policy.evaluate(input).allow);
            let input = crate::Value::from(serde_json::json!({"kind": "a", "o": "self"}));
            assert!(policy.evaluate(input).allow);
        }
    }

    #[test]
    fn negating_a_rule_that_may_conflict_warns() {
        let f = findings(
            "package t\n\nr := 1 if input.a\n\nr := 2 if input.b\n\nx if not r\n\ns if input.a\n\ns if input.b\n\ny if not s\n",
        );
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(
            f[0].starts_with("p.rego:7:") && f[0].contains("`not r`"),
            "{f:?}"
        );
    }

    #[test]
    fn a_line_starting_with_minus_is_refused_and_a_subtraction_is_not() {
        let f = findings("package t\n\nr := 1\n\nx if {\n\tr\n\t-2 < 5\n}\n\ny := 3 - 1\n");
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(
            f[0].starts_with("p.rego:7:") && f[0].contains("error: a line that starts with `-`"),
            "{f:?}"
        );
    }

    #[test]
    fn recursion_is_an_error_and_ordinary_references_are_not() {
        let f = findings("package t\n\na if b\n\nb if a\n");
        assert_eq!(f.len(), 2, "{f:?}");
        assert!(
            f[0].starts_with("p.rego:3:1: error: recursive rule data.t.a"),
            "{f:?}"
        );
        let ok = findings(
            "package t\n\ndefault allow := false\n\nallow if not deny\n\ndeny if input.x\n\nreasons contains \"r\" if deny\n\nf(x) := y if { y := x }\n\nz := f(1)\n",
        );
        assert!(ok.is_empty(), "{ok:?}");
    }

    #[test]
    fn the_reference_policies_have_no_findings() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
        let b = Bundle::load(&root).unwrap();
        let f: Vec<String> = check(&b).iter().map(ToString::to_string).collect();
        assert!(f.is_empty(), "{f:?}");
    }

    #[test]
    fn default_functions_and_print_choose_the_interpreter_and_nexus_builtins_do_not() {
        let options = |rule: &str| PolicyOptions {
            decision_rule: rule.into(),
            ..PolicyOptions::default()
        };
        for (text, interpreted) in [
            ("package t\n\nx := crypto.sha256(\"a\")\n", false),
            ("package t\n\ndefault f(_) := 1\n\nx := f(2)\n", true),
            ("package t\n\nx if { print(\"a\"); true }\n", true),
            ("package t\n\nx := upper(\"a\")\n", false),
        ] {
            let b = bundle(&[("p.rego", text)]);
            let policy = Policy::compile(&b, &Value::new_object(), options("data.t.x")).unwrap();
            // What stays off the interpreter is served by nexus's own evaluator.
            let want = if interpreted {
                EvalMode::Interpreted
            } else {
                EvalMode::Native
            };
            assert_eq!(policy.mode(), want, "{text}: {}", policy.report().summary());
        }
        // The default function's value, which the RVM would make undefined.
        let b = bundle(&[("p.rego", "package t\n\ndefault f(_) := 1\n\nx := f(2)\n")]);
        let (_, outcome) =
            evaluate_rule(&b, "data.t.x", Value::Undefined, Duration::from_secs(5)).unwrap();
        assert_eq!(outcome, RuleOutcome::Value(Value::from(1u64)));
    }

    #[test]
    fn an_unknown_builtin_fails_the_compiled_mode_at_load_with_its_line() {
        let b = bundle(&[("p.rego", "package t\n\nx := graphql.parse(\"q\", \"s\")\n")]);
        let options = PolicyOptions {
            decision_rule: "data.t.x".into(),
            ..PolicyOptions::default()
        };
        let err = Policy::compile(&b, &Value::new_object(), options)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("p.rego:3:") && err.contains("graphql.parse"),
            "{err}"
        );
    }
}
