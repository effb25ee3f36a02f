//! Which evaluation mode a decision rule runs in, and why.
//!
//! regorus's compiled mode (RVM) is the default; some constructs it gets wrong or cannot
//! compile (each measured against the interpreter and OPA, see
//! `docs/opa-compatibility.md`). Those are found per rule in the parsed policy, and only
//! a decision rule that depends on such a rule (through its body, the rules it reads,
//! the functions it calls, transitively) runs on the interpreter; other decision rules
//! of the same folder (a shadow rule, the gateway's revocation rule) stay compiled.
//! What `rewrite` fixes in the RVM's text is not a reason here.

use std::collections::{BTreeMap, BTreeSet};

use regorus::unstable::{Expr, Module as Ast, Rule, RuleHead};

use crate::bundle::Bundle;
use crate::compat::{dotted, location, parse, walk};
use crate::error::Location;

/// One construct that keeps a rule off the RVM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteReason {
    /// Where the construct is.
    pub location: Location,
    /// The rule holding it (`data.pkg.name`).
    pub rule: String,
    /// What it is and what the RVM does with it.
    pub construct: String,
}

impl std::fmt::Display for RouteReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} ({})", self.location, self.construct, self.rule)
    }
}

/// A rule of the folder, as far as routing cares.
#[derive(Debug)]
struct RuleNode {
    /// Every rule key (`pkg.name`) or data path (`pkg.name.field`) it refers to.
    deps: BTreeSet<String>,
    /// Constructs the RVM cannot be trusted with.
    reasons: Vec<RouteReason>,
}

/// The package of a module (`nexus.authz`).
fn package_of(ast: &Ast) -> String {
    dotted(&ast.package.refr).unwrap_or_default()
}

/// The name a rule defines (the root of its head ref).
fn rule_root(rule: &Rule) -> Option<String> {
    crate::compat::rule_name(rule).map(|(name, _)| name)
}

/// Whether a head ref has a variable (not a string literal) in brackets.
fn has_variable_key(refr: &Expr) -> bool {
    match refr {
        Expr::RefBrack { refr, index, .. } => {
            !matches!(
                index.as_ref(),
                Expr::String { .. }
                    | Expr::RawString { .. }
                    | Expr::Number { .. }
                    | Expr::Bool { .. }
            ) || has_variable_key(refr)
        }
        Expr::RefDot { refr, .. } => has_variable_key(refr),
        _ => false,
    }
}

fn analyze(bundle: &Bundle) -> BTreeMap<String, RuleNode> {
    let mut asts = Vec::new();
    for module in &bundle.modules {
        if let Some(ast) = parse(&module.path, &module.text) {
            asts.push((ast, module.text.as_str()));
        }
    }
    let mut local_names: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (ast, _) in &asts {
        let package = package_of(ast);
        for rule in &ast.policy {
            if let Some(name) = rule_root(rule) {
                local_names.entry(package.clone()).or_default().insert(name);
            }
        }
    }
    let mut nodes: BTreeMap<String, RuleNode> = BTreeMap::new();
    for (ast, text) in &asts {
        let package = package_of(ast);
        let local = local_names.get(&package).cloned().unwrap_or_default();
        // `import data.a.b` (as c): the alias names a data path.
        let mut aliases: BTreeMap<String, String> = BTreeMap::new();
        for import in &ast.imports {
            if let Some(path) = dotted(&import.refr)
                && let Some(rest) = path.strip_prefix("data.")
            {
                let alias = match &import.r#as {
                    Some(span) => span.text().to_string(),
                    None => rest.rsplit('.').next().unwrap_or(rest).to_string(),
                };
                aliases.insert(alias, rest.to_string());
            }
        }
        for rule in &ast.policy {
            let Some(name) = rule_root(rule) else {
                continue;
            };
            let key = format!("{package}.{name}");
            let rule_name = format!("data.{key}");
            let mut deps = BTreeSet::new();
            let reasons = std::cell::RefCell::new(Vec::new());
            let mut visit = |e: &Expr| {
                match e {
                    Expr::Var { value, .. } => {
                        if let Ok(v) = value.as_string() {
                            let v = v.as_ref();
                            if v == "data" {
                                deps.insert(String::new());
                            } else if let Some(path) = aliases.get(v) {
                                deps.insert(path.clone());
                            } else if local.contains(v) {
                                deps.insert(format!("{package}.{v}"));
                            }
                        }
                    }
                    Expr::ObjectCompr { span, .. } => reasons.borrow_mut().push(RouteReason {
                        location: location(span),
                        rule: rule_name.clone(),
                        construct: "object comprehension (the RVM keeps the last value for a key \
                                    generated twice; OPA and the interpreter raise a conflict)"
                            .into(),
                    }),
                    Expr::Call { fcn, span, .. } => {
                        if let Some(name @ ("print" | "walk")) = dotted(fcn).as_deref() {
                            reasons.borrow_mut().push(RouteReason {
                                location: location(span),
                                rule: rule_name.clone(),
                                construct: format!("calls {name} (the RVM cannot compile it)"),
                            });
                        }
                    }
                    _ => {}
                }
                if let Some(path) = dotted(e)
                    && let Some(rest) = path.strip_prefix("data.")
                {
                    deps.insert(rest.to_string());
                }
            };
            match rule.as_ref() {
                Rule::Spec { head, bodies, .. } => {
                    match head {
                        RuleHead::Compr { refr, assign, span } => {
                            walk(refr, &mut visit);
                            if let Some(a) = assign {
                                walk(&a.value, &mut visit);
                            }
                            if has_variable_key(refr) {
                                reasons.borrow_mut().push(RouteReason {
                                    location: location(span),
                                    rule: rule_name.clone(),
                                    construct: "partial object with a variable key (the RVM keeps \
                                                the last of two values for one key; OPA and the \
                                                interpreter raise a conflict)"
                                        .into(),
                                });
                            }
                        }
                        RuleHead::Set { refr, key, span } => {
                            walk(refr, &mut visit);
                            if let Some(k) = key {
                                walk(k, &mut visit);
                            }
                            if key.is_some()
                                && has_variable_key(refr)
                                && crate::rewrite::multi_value_rewrite(rule, text).is_none()
                            {
                                reasons.borrow_mut().push(RouteReason {
                                    location: location(span),
                                    rule: rule_name.clone(),
                                    construct: "multi-value rule with a variable in a ref head of \
                                                this shape (the RVM builds one flat set; \
                                                `name[key] contains value if { body }` is \
                                                rewritten instead)"
                                        .into(),
                                });
                            }
                        }
                        RuleHead::Func {
                            refr, args, assign, ..
                        } => {
                            walk(refr, &mut visit);
                            for a in args {
                                walk(a, &mut visit);
                            }
                            if let Some(a) = assign {
                                walk(&a.value, &mut visit);
                            }
                        }
                    }
                    for body in bodies {
                        if let Some(a) = &body.assign {
                            walk(&a.value, &mut visit);
                        }
                        crate::compat::walk_query(&body.query, &mut visit);
                    }
                    // The RVM does not take an `else` after a body that iterates
                    // (`some x in xs`, `xs[i]`) without a solution: the rule is
                    // undefined where OPA takes the `else`.
                    if bodies.iter().any(|b| b.is_else) {
                        for body in &bodies[..bodies.len().saturating_sub(1)] {
                            if iterates(&body.query) {
                                reasons.borrow_mut().push(RouteReason {
                                    location: location(&body.span),
                                    rule: rule_name.clone(),
                                    construct: "a body that iterates before an `else` (the RVM \
                                                does not take the `else` when the iteration \
                                                finds nothing)"
                                        .into(),
                                });
                                break;
                            }
                        }
                    }
                }
                Rule::Default {
                    args, value, span, ..
                } => {
                    walk(value, &mut visit);
                    if !args.is_empty() {
                        reasons.borrow_mut().push(RouteReason {
                            location: location(span),
                            rule: rule_name.clone(),
                            construct: "default function (the RVM makes its value undefined)"
                                .into(),
                        });
                    }
                }
            }
            crate::rewrite::for_each_query_in_rule(rule, &mut |q, head| {
                for stmt in &q.stmts {
                    if let Some(w) = stmt.with_mods.first() {
                        reasons.borrow_mut().push(RouteReason {
                            location: location(&w.span),
                            rule: rule_name.clone(),
                            construct: "`with` (the RVM cannot compile it)".into(),
                        });
                    }
                }
                if let Some(heads) = head
                    && heads.iter().any(|h| h.span().text().contains(['#', '`']))
                {
                    reasons.borrow_mut().push(RouteReason {
                        location: location(&q.span),
                        rule: rule_name.clone(),
                        construct: "comprehension head with a comment or raw string (cannot be \
                                    guarded against the RVM keeping undefined elements)"
                            .into(),
                    });
                }
            });
            let node = nodes.entry(key).or_insert_with(|| RuleNode {
                deps: BTreeSet::new(),
                reasons: Vec::new(),
            });
            node.deps.extend(deps);
            node.reasons.extend(reasons.into_inner());
        }
    }
    nodes
}

/// Whether a body iterates: `some`, or a ref indexed by a variable, outside
/// comprehensions.
fn iterates(q: &regorus::unstable::Query) -> bool {
    use regorus::unstable::Literal;
    let mut found = false;
    for stmt in &q.stmts {
        match &stmt.literal {
            Literal::SomeIn { .. } | Literal::SomeVars { .. } => found = true,
            Literal::Expr { expr, .. } | Literal::NotExpr { expr, .. } => {
                let mut check = |e: &Expr| {
                    if let Expr::RefBrack { index, .. } = e
                        && matches!(index.as_ref(), Expr::Var { .. })
                    {
                        found = true;
                    }
                };
                shallow_walk(expr, &mut check);
            }
            Literal::Every { .. } => {}
        }
    }
    found
}

/// `walk` without entering comprehensions (their iteration is their own).
fn shallow_walk(e: &Expr, f: &mut dyn FnMut(&Expr)) {
    f(e);
    match e {
        Expr::ArrayCompr { .. } | Expr::SetCompr { .. } | Expr::ObjectCompr { .. } => {}
        Expr::Array { items, .. } | Expr::Set { items, .. } => {
            items.iter().for_each(|i| shallow_walk(i, f))
        }
        Expr::Object { fields, .. } => fields.iter().for_each(|(_, k, v)| {
            shallow_walk(k, f);
            shallow_walk(v, f);
        }),
        Expr::Call { params, .. } => params.iter().for_each(|p| shallow_walk(p, f)),
        Expr::UnaryExpr { expr, .. } => shallow_walk(expr, f),
        Expr::RefDot { refr, .. } => shallow_walk(refr, f),
        Expr::RefBrack { refr, index, .. } => {
            shallow_walk(refr, f);
            shallow_walk(index, f);
        }
        Expr::BinExpr { lhs, rhs, .. }
        | Expr::BoolExpr { lhs, rhs, .. }
        | Expr::ArithExpr { lhs, rhs, .. }
        | Expr::AssignExpr { lhs, rhs, .. } => {
            shallow_walk(lhs, f);
            shallow_walk(rhs, f);
        }
        Expr::Membership {
            key,
            value,
            collection,
            ..
        } => {
            if let Some(k) = key {
                shallow_walk(k, f);
            }
            shallow_walk(value, f);
            shallow_walk(collection, f);
        }
        _ => {}
    }
}

/// Whether rule key `key` is named by the reference `path` (equal, or one is a prefix
/// of the other at a `.`).
fn refers(path: &str, key: &str) -> bool {
    path.is_empty()
        || path == key
        || key.strip_prefix(path).is_some_and(|r| r.starts_with('.'))
        || path
            .strip_prefix(key)
            .is_some_and(|r| r.starts_with('.') || r.starts_with('['))
}

/// Every construct of `bundle` that keeps a rule depending on it off the RVM.
pub fn all_reasons(bundle: &Bundle) -> Vec<RouteReason> {
    analyze(bundle)
        .into_values()
        .flat_map(|n| n.reasons)
        .collect()
}

/// The constructs that keep `rule` (`data.pkg.name`) off the RVM: those of every rule it
/// depends on, transitively. Empty: the RVM may evaluate it.
pub fn reasons_for(bundle: &Bundle, rule: &str) -> Vec<RouteReason> {
    let nodes = analyze(bundle);
    let entry = rule.strip_prefix("data.").unwrap_or(rule);
    let mut seen = BTreeSet::new();
    let mut stack: Vec<&String> = nodes.keys().filter(|k| refers(entry, k)).collect();
    let mut out = Vec::new();
    while let Some(key) = stack.pop() {
        if !seen.insert(key.clone()) {
            continue;
        }
        let Some(node) = nodes.get(key) else { continue };
        out.extend(node.reasons.iter().cloned());
        for dep in &node.deps {
            stack.extend(
                nodes
                    .keys()
                    .filter(|k| refers(dep, k) && !seen.contains(*k)),
            );
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::Module;
    use regorus::Value;

    fn bundle(text: &str) -> Bundle {
        Bundle::from_modules(
            vec![Module {
                path: "p.rego".into(),
                text: text.into(),
            }],
            Value::new_object(),
        )
    }

    #[test]
    fn only_rules_the_decision_depends_on_count() {
        let b = bundle(
            "package t\n\ngrants[u] contains p if { some u, ps in input.g; some p in ps }\n\nd := grants\n\ne := 1\n\nf := x if { x := 1, \"b\" in input.a }\n",
        );
        // `grants[u] contains p` is rewritten (`rewrite::multi_value_rewrite`): no reason.
        assert!(reasons_for(&b, "data.t.d").is_empty());
        assert!(reasons_for(&b, "data.t.e").is_empty());
        // `k, v in c` is rewritten into a call (`rewrite`): no reason either.
        assert!(reasons_for(&b, "data.t.f").is_empty());
    }

    #[test]
    fn dependencies_through_data_refs_imports_and_functions() {
        let b = Bundle::from_modules(
            vec![
                Module {
                    path: "a.rego".into(),
                    text: "package a\n\ndefault g(_) := 0\n\ng(x) := x\n".into(),
                },
                Module {
                    path: "b.rego".into(),
                    text:
                        "package b\n\nimport data.a\n\nx := a.g(1)\n\ny := data.a.g(2)\n\nz := 3\n"
                            .into(),
                },
            ],
            Value::new_object(),
        );
        assert_eq!(reasons_for(&b, "data.b.x").len(), 1);
        assert_eq!(reasons_for(&b, "data.b.y").len(), 1);
        assert!(reasons_for(&b, "data.b.z").is_empty());
    }
}
