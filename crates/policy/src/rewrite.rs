//! Source rewrites that make regorus's compiled mode (RVM) fail where OPA fails.
//!
//! regorus 0.14's RVM does not check that the value bound by `x := E` is defined: when
//! `E` is undefined (a missing input field, a failed builtin), the body goes on with an
//! undefined `x`, and whatever does not read `x` as a condition still succeeds
//! (`allow if { role := input.role; not role == "guest" }` allows a request without a
//! role: a fail-open). Likewise a comprehension whose head reads a missing field keeps an
//! undefined element (`count([a.id | some a in xs])` counts it).
//!
//! Both are closed here, in the text the RVM compiles (never in what the interpreter,
//! `nexusctl policy test` or error messages see), by forms the RVM does check:
//! - `x := E` becomes `[x] := [E]`: an array holding an undefined element is undefined,
//!   and destructuring an undefined value fails the body, exactly as OPA's `x := E` does;
//! - a comprehension `[H | body]` gets the guard `; [__nexus_gN] := [H]` at the end of its
//!   body (object comprehensions guard key and value), so an undefined head skips the
//!   element as OPA does.
//!
//! Every insertion stays on the line it starts on (a copied head is written on one line),
//! so line numbers in compile errors stay right. A head that cannot be copied onto one
//! line safely (it holds a comment or a raw string) is not rewritten; the module is then
//! reported as needing the interpreter (`routing`).

use regorus::unstable::{AssignOp, Expr, Literal, Module as Ast, Query, Rule, RuleHead};

/// One module's text for the RVM, and what was done to it.
#[derive(Clone, Debug, Default)]
pub struct Rewritten {
    /// The text the RVM compiles.
    pub text: String,
    /// `:=` assignments guarded.
    pub assignments: usize,
    /// Comprehension heads guarded.
    pub comprehensions: usize,
    /// Comprehension heads that could not be guarded (line of each).
    pub unguarded: Vec<u32>,
}

/// An insertion at a byte offset.
struct Edit {
    at: usize,
    text: String,
}

/// Rewrites `text` (parsed as `ast`) for the RVM.
pub fn for_rvm(text: &str, ast: &Ast) -> Rewritten {
    let mut edits = Vec::new();
    let mut out = Rewritten::default();
    let mut guard_id = 0usize;
    let visit_query = |q: &Query, edits: &mut Vec<Edit>, out: &mut Rewritten| {
        for stmt in &q.stmts {
            if let Literal::Expr { expr, .. } = &stmt.literal
                && let Expr::AssignExpr {
                    op: AssignOp::ColEq,
                    lhs,
                    rhs,
                    ..
                } = expr.as_ref()
                && matches!(lhs.as_ref(), Expr::Var { .. })
            {
                let (l, r) = (lhs.span(), rhs.span());
                edits.push(Edit {
                    at: l.start as usize,
                    text: "[".into(),
                });
                edits.push(Edit {
                    at: l.end as usize,
                    text: "]".into(),
                });
                edits.push(Edit {
                    at: r.start as usize,
                    text: "[".into(),
                });
                edits.push(Edit {
                    at: r.end as usize,
                    text: "]".into(),
                });
                out.assignments += 1;
            }
        }
    };
    for_each_query(ast, &mut |q, head| {
        visit_query(q, &mut edits, &mut out);
        if let Some(heads) = head {
            let texts: Option<Vec<String>> =
                heads.iter().map(|h| one_line(h.span().text())).collect();
            match texts {
                Some(texts) => {
                    let vars: Vec<String> = texts
                        .iter()
                        .map(|_| {
                            guard_id += 1;
                            format!("__nexus_g{guard_id}")
                        })
                        .collect();
                    // The query's own span takes in the closing bracket: insert after
                    // its last statement (and that statement's `with`s).
                    let end = q
                        .stmts
                        .iter()
                        .flat_map(|s| {
                            std::iter::once(s.span.end)
                                .chain(s.with_mods.iter().map(|w| w.span.end))
                        })
                        .max()
                        .unwrap_or(q.span.end);
                    edits.push(Edit {
                        at: end as usize,
                        text: format!("; [{}] := [{}]", vars.join(", "), texts.join(", ")),
                    });
                    out.comprehensions += 1;
                }
                None => out.unguarded.push(q.span.line),
            }
        }
    });
    // Apply from the end so earlier offsets stay valid; at one offset, keep the order in
    // which the edits were made (a `]` closing one span before a `[` opening the next).
    edits.sort_by_key(|e| e.at);
    let mut result = String::with_capacity(text.len() + edits.len() * 8);
    let mut last = 0;
    for edit in &edits {
        if edit.at < last || edit.at > text.len() || !text.is_char_boundary(edit.at) {
            continue;
        }
        result.push_str(&text[last..edit.at]);
        result.push_str(&edit.text);
        last = edit.at;
    }
    result.push_str(&text[last..]);
    out.text = result;
    out
}

/// A head's text on one line, or None when that is not safe (a comment or raw string).
fn one_line(text: &str) -> Option<String> {
    if text.contains('#') || text.contains('`') {
        return None;
    }
    Some(text.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// Calls `f` on every query of `module` (rule bodies, comprehension bodies, `every`
/// bodies), with a comprehension's head expressions.
pub(crate) fn for_each_query(module: &Ast, f: &mut dyn FnMut(&Query, Option<Vec<&Expr>>)) {
    for rule in &module.policy {
        for_each_query_in_rule(rule, f);
    }
}

/// `for_each_query` for one rule.
pub(crate) fn for_each_query_in_rule(rule: &Rule, f: &mut dyn FnMut(&Query, Option<Vec<&Expr>>)) {
    fn query(q: &Query, head: Option<Vec<&Expr>>, f: &mut dyn FnMut(&Query, Option<Vec<&Expr>>)) {
        f(q, head);
        for stmt in &q.stmts {
            match &stmt.literal {
                Literal::SomeVars { .. } => {}
                Literal::SomeIn {
                    key,
                    value,
                    collection,
                    ..
                } => {
                    if let Some(k) = key {
                        expr(k, f);
                    }
                    expr(value, f);
                    expr(collection, f);
                }
                Literal::Expr { expr: e, .. } | Literal::NotExpr { expr: e, .. } => expr(e, f),
                Literal::Every {
                    domain, query: q, ..
                } => {
                    expr(domain, f);
                    query(q, None, f);
                }
            }
            for w in &stmt.with_mods {
                expr(&w.refr, f);
                expr(&w.r#as, f);
            }
        }
    }
    fn expr(e: &Expr, f: &mut dyn FnMut(&Query, Option<Vec<&Expr>>)) {
        match e {
            Expr::ArrayCompr { term, query: q, .. } | Expr::SetCompr { term, query: q, .. } => {
                expr(term, f);
                query(q, Some(vec![term.as_ref()]), f);
            }
            Expr::ObjectCompr {
                key,
                value,
                query: q,
                ..
            } => {
                expr(key, f);
                expr(value, f);
                query(q, Some(vec![key.as_ref(), value.as_ref()]), f);
            }
            Expr::Array { items, .. } | Expr::Set { items, .. } => {
                for i in items {
                    expr(i, f);
                }
            }
            Expr::Object { fields, .. } => {
                for (_, k, v) in fields {
                    expr(k, f);
                    expr(v, f);
                }
            }
            Expr::Call { fcn, params, .. } => {
                expr(fcn, f);
                for p in params {
                    expr(p, f);
                }
            }
            Expr::UnaryExpr { expr: x, .. } => expr(x, f),
            Expr::RefDot { refr, .. } => expr(refr, f),
            Expr::RefBrack { refr, index, .. } => {
                expr(refr, f);
                expr(index, f);
            }
            Expr::BinExpr { lhs, rhs, .. }
            | Expr::BoolExpr { lhs, rhs, .. }
            | Expr::ArithExpr { lhs, rhs, .. }
            | Expr::AssignExpr { lhs, rhs, .. } => {
                expr(lhs, f);
                expr(rhs, f);
            }
            Expr::Membership {
                key,
                value,
                collection,
                ..
            } => {
                if let Some(k) = key {
                    expr(k, f);
                }
                expr(value, f);
                expr(collection, f);
            }
            _ => {}
        }
    }
    {
        match rule {
            Rule::Spec { head, bodies, .. } => {
                match head {
                    RuleHead::Compr { refr, assign, .. } => {
                        expr(refr, f);
                        if let Some(a) = assign {
                            expr(&a.value, f);
                        }
                    }
                    RuleHead::Set { refr, key, .. } => {
                        expr(refr, f);
                        if let Some(k) = key {
                            expr(k, f);
                        }
                    }
                    RuleHead::Func {
                        refr, args, assign, ..
                    } => {
                        expr(refr, f);
                        for a in args {
                            expr(a, f);
                        }
                        if let Some(a) = assign {
                            expr(&a.value, f);
                        }
                    }
                }
                for body in bodies {
                    if let Some(a) = &body.assign {
                        expr(&a.value, f);
                    }
                    query(&body.query, None, f);
                }
            }
            Rule::Default { value, .. } => expr(value, f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite(text: &str) -> String {
        let ast = crate::compat::parse("p.rego", text).unwrap();
        for_rvm(text, &ast).text
    }

    #[test]
    fn assignments_and_comprehension_heads_are_guarded_on_their_lines() {
        assert_eq!(
            rewrite("package t\n\nx if { r := input.r\n\tnot r == 1 }\n"),
            "package t\n\nx if { [r] := [input.r]\n\tnot r == 1 }\n"
        );
        assert_eq!(
            rewrite("package t\n\nd := {\"r\": [n | some n in numbers.range(1, 3); m := n * 2]}\n"),
            "package t\n\nd := {\"r\": [n | some n in numbers.range(1, 3); [m] := [n * 2]; [__nexus_g1] := [n]]}\n"
        );
        assert_eq!(
            rewrite("package t\n\nd := {a.id: a.x | some a in input.a}\n"),
            "package t\n\nd := {a.id: a.x | some a in input.a; [__nexus_g1, __nexus_g2] := [a.id, a.x]}\n"
        );
    }
}
