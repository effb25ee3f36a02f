//! Source rewrites that make regorus evaluate as OPA does where it does not.
//!
//! In both of regorus's modes (so in the text the interpreter, `nexusctl policy test`
//! and the RVM all load):
//! - `not E` where `E` calls a function or an operator other than `==` (`startswith`,
//!   `in`, `!=`, `>`, arithmetic) or indexes with a ref: OPA evaluates the refs and
//!   calls in `E`'s arguments before the negation, so an undefined argument (a missing
//!   input field) fails the body; regorus negates the undefined call, so the body
//!   succeeds (`allow if not startswith(input.path, "/admin")` allows a request without
//!   a path: a fail-open). The arguments are evaluated first here too, in a guard
//!   `[__nexus_nN, ...] := [arg, ...]` just before the `not`.
//! - `V in C` used as a value (not a statement): OPA makes it undefined when `V` or `C`
//!   is, regorus false; it becomes a call of nexus's `__nexus_member(V, C)` (undefined
//!   on an undefined argument, as every call). `K, V in C` anywhere becomes
//!   `__nexus_member_kv(K, V, C)`: the RVM ignores `K`.
//!
//! - `count(E)` where `E` is not a collection by its form (a comprehension, a
//!   collection literal, or a partial set or object rule of the module) becomes
//!   `__nexus_count(E)`: OPA counts a string's runes, regorus its UTF-16 units (an emoji
//!   counts 2). Calls on a collection stay regorus's `count`, so a policy that counts
//!   only collections (the reference one) makes no host call for it. Not in a bundle that
//!   replaces `count` (`with count as ...`): see [`counts_runes`].
//!
//! Only in the interpreter's text: `some x in E` over a value that is not a collection
//! is undefined in OPA (and in the RVM) but an error in regorus's interpreter; `E`
//! becomes `__nexus_iter(E)` (the collection itself, or an empty array).
//!
//! Only in the RVM's text (regorus 0.14's RVM does not check that the value bound by
//! `x := E` is defined: the body goes on with an undefined `x`, and whatever does not
//! read `x` as a condition still succeeds; a comprehension whose head reads a missing
//! field keeps an undefined element, so `count([a.id | some a in xs])` counts it):
//! - `x := E` becomes `[x] := [E]`: an array holding an undefined element is undefined,
//!   and destructuring an undefined value fails the body, exactly as OPA's `x := E` does;
//! - a comprehension `[H | body]` gets the guard `; [__nexus_gN] := [H]` at the end of its
//!   body (object comprehensions guard key and value), so an undefined head skips the
//!   element as OPA does.
//!
//! Every edit stays on the line it is made on (copied text is written on one line), so
//! line numbers in errors and coverage stay right; columns after an edit move. A term
//! that cannot be copied onto one line safely (it holds a comment or a raw string) is
//! not rewritten; a comprehension head of that kind is reported by `routing`.

use regorus::unstable::{AssignOp, BoolOp, Expr, Literal, Module as Ast, Query, Rule, RuleHead};

/// One module's rewritten text, and what was done to it.
#[derive(Clone, Debug, Default)]
pub struct Rewritten {
    /// The text to load.
    pub text: String,
    /// `:=` assignments guarded (RVM).
    pub assignments: usize,
    /// Comprehension heads guarded (RVM).
    pub comprehensions: usize,
    /// Negations whose arguments are evaluated first.
    pub negations: usize,
    /// Memberships used as values, made calls.
    pub memberships: usize,
    /// `some x in E` made tolerant of a non-collection (interpreter).
    pub iterations: usize,
    /// `count` calls on what may be a string, made nexus's (runes, as OPA).
    pub counts: usize,
    /// Partial-object values moved into their bodies.
    pub partial_objects: usize,
    /// Comprehension heads that could not be guarded (line of each).
    pub unguarded: Vec<u32>,
}

/// An insertion at a byte offset, replacing `delete` bytes there. At one offset, edits
/// apply by `order` (an opening brace first, a closing one last), then as made.
struct Edit {
    at: usize,
    delete: usize,
    text: String,
    order: i8,
}

fn insert(at: u32, text: impl Into<String>) -> Edit {
    Edit {
        at: at as usize,
        delete: 0,
        text: text.into(),
        order: 0,
    }
}

fn opening(at: u32, text: impl Into<String>) -> Edit {
    Edit {
        order: -1,
        ..insert(at, text)
    }
}

fn closing(at: u32, text: impl Into<String>) -> Edit {
    Edit {
        order: 1,
        ..insert(at, text)
    }
}

/// The first and last byte of an expression, its subexpressions included (a ref's own
/// span starts at its last `.`, a call's at its `(`, a string's inside its quotes, a
/// collection's may leave out its brackets).
fn extent_of(text: &str, e: &Expr) -> (u32, u32) {
    let bytes = text.as_bytes();
    let mut start = u32::MAX;
    let mut end = 0;
    let mut visit = |x: &Expr| {
        let (mut s, mut t) = (x.span().start, x.span().end);
        if matches!(x, Expr::String { .. } | Expr::RawString { .. }) {
            if s > 0 && matches!(bytes.get(s as usize - 1), Some(b'"' | b'`')) {
                s -= 1;
            }
            if matches!(bytes.get(t as usize), Some(b'"' | b'`')) {
                t += 1;
            }
        }
        start = start.min(s);
        end = end.max(t);
    };
    visit(e);
    crate::compat::walk(e, &mut visit);
    balance(text, start, end)
}

/// `start..end` widened to the brackets it leaves open or closed.
fn balance(text: &str, start: u32, end: u32) -> (u32, u32) {
    let bytes = text.as_bytes();
    let (mut s, mut e) = (start as usize, (end as usize).min(bytes.len()));
    let depth = |s: usize, e: usize| {
        let mut d = 0i32;
        let mut quote: Option<u8> = None;
        let mut i = s;
        while i < e {
            let c = bytes[i];
            match quote {
                Some(q) => {
                    if c == b'\\' && q == b'"' {
                        i += 1;
                    } else if c == q {
                        quote = None;
                    }
                }
                None => match c {
                    b'"' | b'`' => quote = Some(c),
                    b'(' | b'[' | b'{' => d += 1,
                    b')' | b']' | b'}' => d -= 1,
                    _ => {}
                },
            }
            i += 1;
        }
        d
    };
    let mut d = depth(s, e);
    while d > 0 {
        let Some(off) = bytes[e..].iter().position(|c| !c.is_ascii_whitespace()) else {
            break;
        };
        if matches!(bytes[e + off], b')' | b']' | b'}') {
            e += off + 1;
            d -= 1;
        } else {
            break;
        }
    }
    while d < 0 {
        let Some(pos) = bytes[..s].iter().rposition(|c| !c.is_ascii_whitespace()) else {
            break;
        };
        if matches!(bytes[pos], b'(' | b'[' | b'{') {
            s = pos;
            d += 1;
        } else {
            break;
        }
    }
    (s as u32, e as u32)
}

/// The end of a statement, its `with`s and a closing quote included.
fn stmt_end(text: &str, stmt: &regorus::unstable::LiteralStmt) -> u32 {
    let mut end = stmt.span.end;
    match &stmt.literal {
        Literal::Expr { expr, .. } | Literal::NotExpr { expr, .. } => {
            end = end.max(extent_of(text, expr).1);
        }
        Literal::SomeIn { collection, .. } => end = end.max(extent_of(text, collection).1),
        _ => {}
    }
    for w in &stmt.with_mods {
        end = end.max(w.span.end).max(extent_of(text, &w.r#as).1);
    }
    end
}

/// The source text of `e`, on one line, or None when that is not safe.
fn term_text(source: &str, e: &Expr) -> Option<String> {
    let (start, end) = extent_of(source, e);
    one_line(source.get(start as usize..end as usize)?)
}

/// Whether `e` is a ref rooted in a name (not a call result).
fn is_ref(e: &Expr) -> bool {
    match e {
        Expr::RefDot { refr, .. } => is_ref(refr) || matches!(refr.as_ref(), Expr::Var { .. }),
        Expr::RefBrack { refr, .. } => is_ref(refr) || matches!(refr.as_ref(), Expr::Var { .. }),
        _ => false,
    }
}

/// Whether `e` mentions the wildcard `_` (a guard would iterate over it).
fn has_wildcard(e: &Expr) -> bool {
    let mut found = false;
    crate::compat::walk(e, &mut |x| {
        if let Expr::Var { value, .. } = x
            && value.as_string().is_ok_and(|v| v.as_ref() == "_")
        {
            found = true;
        }
    });
    found
}

/// The terms OPA evaluates before negating `e`: refs and calls among the arguments of
/// calls and operators (not `==`), and refs used as indexes.
fn hoisted<'a>(e: &'a Expr, top: bool, out: &mut Vec<&'a Expr>) {
    let operand = |x: &'a Expr, out: &mut Vec<&'a Expr>| {
        if is_ref(x) {
            out.push(x);
            index_refs(x, out);
        } else if matches!(
            x,
            Expr::Call { .. } | Expr::ArithExpr { .. } | Expr::BinExpr { .. }
        ) {
            out.push(x);
        } else {
            hoisted(x, false, out);
        }
    };
    match e {
        Expr::Call { params, .. } => {
            for p in params {
                operand(p, out);
            }
        }
        Expr::BoolExpr { op, lhs, rhs, .. } => {
            if matches!(op, BoolOp::Eq) && top {
                for side in [lhs, rhs] {
                    if is_ref(side) {
                        index_refs(side, out);
                    } else {
                        hoisted(side, false, out);
                    }
                }
            } else {
                operand(lhs, out);
                operand(rhs, out);
            }
        }
        Expr::ArithExpr { lhs, rhs, .. } | Expr::BinExpr { lhs, rhs, .. } => {
            operand(lhs, out);
            operand(rhs, out);
        }
        Expr::Membership {
            key,
            value,
            collection,
            ..
        } => {
            if let Some(k) = key {
                operand(k, out);
            }
            operand(value, out);
            operand(collection, out);
        }
        Expr::Array { items, .. } | Expr::Set { items, .. } => {
            for i in items {
                operand(i, out);
            }
        }
        Expr::Object { fields, .. } => {
            for (_, k, v) in fields {
                operand(k, out);
                operand(v, out);
            }
        }
        Expr::RefDot { .. } | Expr::RefBrack { .. } => index_refs(e, out),
        _ => {}
    }
}

/// Refs used as an index of `e` (`input.m` in `data.s[input.m]`).
fn index_refs<'a>(e: &'a Expr, out: &mut Vec<&'a Expr>) {
    match e {
        Expr::RefBrack { refr, index, .. } => {
            if is_ref(index) {
                out.push(index);
            }
            index_refs(refr, out);
        }
        Expr::RefDot { refr, .. } => index_refs(refr, out),
        _ => {}
    }
}

/// Which rewrites to make.
#[derive(Clone, Copy)]
struct Targets {
    rvm: bool,
    /// Make `count` of what may be a string nexus's (see [`counts_runes`]).
    count: bool,
}

/// Whether `count` calls of `bundle` may become `__nexus_count`: not when a module or a
/// test replaces `count` with `with count as ...` (the replacement names regorus's
/// `count`, so a renamed call would escape it and the test would fail).
pub fn counts_runes(bundle: &crate::Bundle) -> bool {
    !bundle.modules.iter().chain(&bundle.tests).any(|m| {
        let words: Vec<&str> = m.text.split_whitespace().collect();
        words.windows(3).any(|w| w == ["with", "count", "as"])
    })
}

/// Rewrites `text` (parsed as `ast`) for the RVM; `count`: see [`counts_runes`].
pub fn for_rvm(text: &str, ast: &Ast, count: bool) -> Rewritten {
    rewrite(text, ast, Targets { rvm: true, count })
}

/// Rewrites `text` (parsed as `ast`) for the interpreter.
pub fn for_interpreter(text: &str, ast: &Ast, count: bool) -> Rewritten {
    rewrite(text, ast, Targets { rvm: false, count })
}

/// The text a module is loaded with by the interpreter (`for_interpreter`), or the text
/// itself when it does not parse (loading reports that).
pub fn interpreter_text(path: &str, text: &str, count: bool) -> String {
    match crate::compat::parse(path, text) {
        Some(ast) => for_interpreter(text, &ast, count).text,
        None => text.to_string(),
    }
}

/// Two passes: the structural rewrites (values moved into bodies, multi-value rules made
/// partial objects) first, then the term rewrites on the result, so a moved value gets
/// the same guards as the rest.
fn rewrite(text: &str, ast: &Ast, targets: Targets) -> Rewritten {
    let mut edits = Vec::new();
    let mut partial_objects = 0;
    for (i, rule) in ast.policy.iter().enumerate() {
        if let Some((start, end, head, _, suffix, function)) = multi_value_rewrite(rule, text)
            && let Rule::Spec { bodies, .. } = rule.as_ref()
            && let Some(append) = bodies
                .first()
                .and_then(|b| append_to_body(&b.query, text, &suffix))
        {
            edits.push(Edit {
                at: start as usize,
                delete: (end - start) as usize,
                text: head,
                order: 0,
            });
            edits.extend(append);
            edits.push(insert(text.len() as u32, function));
        } else if let Some(moved) = partial_object_value(rule, text, i, targets.rvm) {
            edits.extend(moved);
            partial_objects += 1;
        } else {
            edits.extend(else_values(rule, text, i, targets.rvm));
        }
    }
    if edits.is_empty() {
        return rewrite_terms(text, ast, targets);
    }
    let moved = apply(text, edits);
    match crate::compat::parse(&ast.package.span.source.file().clone(), &moved) {
        Some(moved_ast) => {
            let mut out = rewrite_terms(&moved, &moved_ast, targets);
            out.partial_objects = partial_objects;
            out
        }
        None => rewrite_terms(text, ast, targets),
    }
}

fn rewrite_terms(text: &str, ast: &Ast, targets: Targets) -> Rewritten {
    let mut edits: Vec<Edit> = Vec::new();
    let mut out = Rewritten::default();
    let mut guard_id = 0usize;
    let mut statement_exprs: Vec<*const Expr> = Vec::new();
    for_each_query(ast, &mut |q, head| {
        for stmt in &q.stmts {
            match &stmt.literal {
                Literal::Expr { expr, .. } => {
                    statement_exprs.push(expr.as_ref() as *const Expr);
                    if targets.rvm
                        && let Expr::AssignExpr {
                            op: AssignOp::ColEq,
                            lhs,
                            rhs,
                            ..
                        } = expr.as_ref()
                        && matches!(lhs.as_ref(), Expr::Var { .. })
                    {
                        let (ls, le) = extent_of(text, lhs);
                        let (rs, re) = extent_of(text, rhs);
                        edits.push(insert(ls, "["));
                        edits.push(insert(le, "]"));
                        edits.push(insert(rs, "["));
                        edits.push(insert(re, "]"));
                        out.assignments += 1;
                    }
                }
                Literal::NotExpr { expr, span } => {
                    statement_exprs.push(expr.as_ref() as *const Expr);
                    let mut terms = Vec::new();
                    hoisted(expr, true, &mut terms);
                    let texts: Option<Vec<String>> = terms
                        .iter()
                        .filter(|t| !has_wildcard(t))
                        .map(|t| term_text(text, t))
                        .collect();
                    if let Some(texts) = texts
                        && !texts.is_empty()
                    {
                        let vars: Vec<String> = texts
                            .iter()
                            .map(|_| {
                                guard_id += 1;
                                format!("__nexus_n{guard_id}")
                            })
                            .collect();
                        let guard = format!("[{}] := [{}]", vars.join(", "), texts.join(", "));
                        // A rule body of one literal without braces (`a if not f(x)`)
                        // gets braces, so the guard can stand before the `not`.
                        let end = stmt_end(text, stmt);
                        let before = text
                            .get(..span.start as usize)
                            .unwrap_or_default()
                            .trim_end();
                        if before.ends_with("if") || before.ends_with("else") {
                            edits.push(opening(span.start, format!("{{ {guard}; ")));
                            edits.push(closing(end, " }"));
                        } else {
                            edits.push(insert(span.start, format!("{guard}; ")));
                        }
                        out.negations += 1;
                    }
                }
                Literal::SomeIn { collection, .. } if !targets.rvm => {
                    let (cs, ce) = extent_of(text, collection);
                    edits.push(insert(cs, "__nexus_iter("));
                    edits.push(insert(ce, ")"));
                    out.iterations += 1;
                }
                _ => {}
            }
        }
        if targets.rvm
            && let Some(heads) = head
        {
            let texts: Option<Vec<String>> = heads.iter().map(|h| term_text(text, h)).collect();
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
                        .map(|s| stmt_end(text, s))
                        .max()
                        .unwrap_or(q.span.end);
                    edits.push(closing(
                        end,
                        format!("; [{}] := [{}]", vars.join(", "), texts.join(", ")),
                    ));
                    out.comprehensions += 1;
                }
                None => out.unguarded.push(q.span.line),
            }
        }
    });
    // Memberships used as values (not a statement, not negated: those fail alike).
    let mut members = Vec::new();
    for rule in &ast.policy {
        each_rule_expr(rule, &mut |e| {
            if let Expr::Membership {
                key,
                value,
                collection,
                ..
            } = e
                && (key.is_some() || !statement_exprs.contains(&(e as *const Expr)))
            {
                members.push((key.clone(), value.clone(), collection.clone()));
            }
        });
    }
    for (key, value, collection) in members {
        let first = key
            .as_ref()
            .map_or_else(|| extent_of(text, &value), |k| extent_of(text, k));
        let (vs, ve) = extent_of(text, &value);
        let (cs, ce) = extent_of(text, &collection);
        let between = text.get(ve as usize..cs as usize).unwrap_or_default();
        if between.trim() != "in" || vs < first.0 {
            continue;
        }
        let name = if key.is_some() {
            "__nexus_member_kv("
        } else {
            "__nexus_member("
        };
        edits.push(insert(first.0, name));
        edits.push(Edit {
            at: ve as usize,
            delete: between.len(),
            text: ", ".into(),
            order: 0,
        });
        edits.push(insert(ce, ")"));
        out.memberships += 1;
    }
    if targets.count {
        count_calls(text, ast, &mut edits, &mut out);
    }
    out.text = apply(text, edits);
    out
}

/// `count(E)` → `__nexus_count(E)` unless `E` is a collection by its form (see the
/// module doc).
fn count_calls(text: &str, ast: &Ast, edits: &mut Vec<Edit>, out: &mut Rewritten) {
    // Partial set and object rules of this module: their value is a collection.
    let mut collections: Vec<&str> = Vec::new();
    for rule in &ast.policy {
        if let Rule::Spec { head, .. } = rule.as_ref() {
            let refr = match head {
                RuleHead::Set { refr, .. } => refr,
                RuleHead::Compr { refr, .. } => match refr.as_ref() {
                    Expr::RefBrack { refr, .. } => refr,
                    _ => continue,
                },
                RuleHead::Func { .. } => continue,
            };
            if let Expr::Var { span, .. } = refr.as_ref() {
                collections.push(span.text());
            }
        }
    }
    let mut calls = Vec::new();
    for rule in &ast.policy {
        each_rule_expr(rule, &mut |e| {
            if let Expr::Call { fcn, params, .. } = e
                && let Expr::Var { span, .. } = fcn.as_ref()
                && span.text() == "count"
                && let [arg] = params.as_slice()
            {
                let collection = match arg.as_ref() {
                    Expr::Array { .. }
                    | Expr::Set { .. }
                    | Expr::Object { .. }
                    | Expr::ArrayCompr { .. }
                    | Expr::SetCompr { .. }
                    | Expr::ObjectCompr { .. } => true,
                    Expr::Var { span, .. } => collections.contains(&span.text()),
                    _ => false,
                };
                if !collection {
                    calls.push(span.start);
                }
            }
        });
    }
    for at in calls {
        if text.get(at as usize..at as usize + 5) == Some("count") {
            edits.push(Edit {
                at: at as usize,
                delete: 5,
                text: "__nexus_count".into(),
                order: 0,
            });
            out.counts += 1;
        }
    }
}

/// Applies `edits` to `text`: in offset order, at one offset by `order` then as made;
/// an edit inside a span another one deleted is dropped.
fn apply(text: &str, mut edits: Vec<Edit>) -> String {
    edits.sort_by_key(|e| (e.at, e.order));
    let mut result = String::with_capacity(text.len() + edits.len() * 8);
    let mut last = 0;
    for edit in &edits {
        if edit.at < last || edit.at > text.len() || !text.is_char_boundary(edit.at) {
            continue;
        }
        result.push_str(&text[last..edit.at]);
        result.push_str(&edit.text);
        last = edit.at + edit.delete;
    }
    result.push_str(text.get(last..).unwrap_or_default());
    result
}

/// `NAME[k] contains p if { body }` (a multi-value rule with a variable in its ref
/// head, one body): regorus's interpreter makes it undefined when no body holds (OPA:
/// `{}`) and its RVM builds one flat set. It becomes the partial object
/// `NAME[__nexus_k] := __nexus_mv_NAME(__nexus_k) if { body; __nexus_k := k }` with the
/// function `__nexus_mv_NAME(__nexus_k) := {p | body; k == __nexus_k}` added at the end
/// of the module, which both modes evaluate as OPA evaluates the original. Returns
/// (head start, head end, new head, body end, body suffix, function) or None when the
/// rule has another shape.
#[allow(clippy::type_complexity)]
pub(crate) fn multi_value_rewrite(
    rule: &Rule,
    text: &str,
) -> Option<(u32, u32, String, u32, String, String)> {
    let Rule::Spec {
        head:
            RuleHead::Set {
                refr,
                key: Some(member),
                span,
            },
        bodies,
        ..
    } = rule
    else {
        return None;
    };
    let Expr::RefBrack {
        refr: name, index, ..
    } = refr.as_ref()
    else {
        return None;
    };
    let Expr::Var { value, .. } = name.as_ref() else {
        return None;
    };
    let [body] = bodies.as_slice() else {
        return None;
    };
    if body.assign.is_some() {
        return None;
    }
    let name = value.as_string().ok()?.to_string();
    let key = term_text(text, index)?;
    let member = term_text(text, member)?;
    let q = &body.query;
    let first = q.stmts.first()?.span.start;
    let last = q.stmts.iter().map(|s| stmt_end(text, s)).max()?;
    let body_text = one_line(text.get(first as usize..last as usize)?)?;
    // Statements on one line need `;` between them.
    let body_text = if q.stmts.len() > 1 {
        let mut parts = Vec::new();
        for stmt in &q.stmts {
            let end = stmt_end(text, stmt);
            parts.push(one_line(text.get(stmt.span.start as usize..end as usize)?)?);
        }
        parts.join("; ")
    } else {
        body_text
    };
    let (start, _) = extent_of(text, refr);
    let end = span.end.max(extent_of(text, refr).1);
    let head_end = text
        .get(start as usize..)?
        .find(&member)
        .map(|i| start as usize + i + member.len())?;
    let new_head = format!("{name}[__nexus_k] := __nexus_mv_{name}(__nexus_k)");
    let function = format!(
        "\n__nexus_mv_{name}(__nexus_k) := {{{member} | {body_text}; {key} == __nexus_k}}\n"
    );
    Some((
        start,
        head_end as u32,
        new_head,
        last,
        format!("; __nexus_k := {key}"),
        function,
    ))
    .filter(|_| end as usize <= head_end)
}

/// Edits appending `suffix` (`; ...`) to the body `q`; a body of one literal without
/// braces (`if lit`) gets braces.
fn append_to_body(q: &Query, text: &str, suffix: &str) -> Option<Vec<Edit>> {
    let first = q.stmts.first()?.span.start;
    let last = q.stmts.iter().map(|s| stmt_end(text, s)).max()?;
    let before = text.get(..first as usize)?.trim_end();
    if before.ends_with("if") || before.ends_with("else") {
        Some(vec![
            opening(first, "{ "),
            closing(last, format!("{suffix} }}")),
        ])
    } else {
        Some(vec![closing(last, suffix.to_string())])
    }
}

/// `NAME[k] := V if { body }` (a partial object): when `V` is undefined for one key,
/// regorus's interpreter drops every key and its RVM keeps the key with an undefined
/// value; OPA leaves only that key out. `V` moves into the body as a guarded
/// assignment: `NAME[k] := __nexus_vN if { body; [__nexus_vN] := [V] }`.
fn partial_object_value(rule: &Rule, text: &str, id: usize, rvm: bool) -> Option<Vec<Edit>> {
    let Rule::Spec {
        head:
            RuleHead::Compr {
                refr,
                assign: Some(assign),
                ..
            },
        bodies,
        ..
    } = rule
    else {
        return None;
    };
    let Expr::RefBrack { index, .. } = refr.as_ref() else {
        return None;
    };
    if matches!(
        index.as_ref(),
        Expr::String { .. } | Expr::RawString { .. } | Expr::Number { .. } | Expr::Bool { .. }
    ) {
        return None;
    }
    let [body] = bodies.as_slice() else {
        return None;
    };
    if body.assign.is_some() || body.is_else {
        return None;
    }
    let value = term_text(text, &assign.value)?;
    let (vs, ve) = extent_of(text, &assign.value);
    let var = format!("__nexus_v{id}");
    let mut edits = vec![Edit {
        at: vs as usize,
        delete: (ve - vs) as usize,
        text: var.clone(),
        order: 0,
    }];
    // The RVM needs the guarded form; regorus's interpreter checks `:=` itself (and
    // does not count a destructuring as binding a head variable).
    let assign = if rvm {
        format!("; [{var}] := [{value}]")
    } else {
        format!("; {var} := {value}")
    };
    edits.extend(append_to_body(&body.query, text, &assign)?);
    Some(edits)
}

/// `r := V if { A } else := W if { B }`: OPA takes an `else` when the branch before it
/// has no value, its body failing or its value undefined; regorus stops at the first
/// body that holds, so an undefined `V` makes the rule undefined. Each branch's value
/// moves into its body (guarded as in `partial_object_value`), so an undefined value
/// fails the body and the next branch is tried.
fn else_values(rule: &Rule, text: &str, id: usize, rvm: bool) -> Vec<Edit> {
    let Rule::Spec { head, bodies, .. } = rule else {
        return Vec::new();
    };
    let first = match head {
        RuleHead::Compr {
            assign: Some(a), ..
        }
        | RuleHead::Func {
            assign: Some(a), ..
        } => a,
        _ => return Vec::new(),
    };
    if !bodies.iter().any(|b| b.is_else) {
        return Vec::new();
    }
    let mut edits = Vec::new();
    for (i, body) in bodies.iter().enumerate() {
        let value = if i == 0 {
            Some(first)
        } else {
            body.assign.as_ref()
        };
        let Some(value) = value else { continue };
        if matches!(
            value.value.as_ref(),
            Expr::String { .. }
                | Expr::RawString { .. }
                | Expr::Number { .. }
                | Expr::Bool { .. }
                | Expr::Null { .. }
        ) {
            continue;
        }
        let Some(value_text) = term_text(text, &value.value) else {
            continue;
        };
        let var = format!("__nexus_e{id}_{i}");
        let assign = if rvm {
            format!("; [{var}] := [{value_text}]")
        } else {
            format!("; {var} := {value_text}")
        };
        let Some(append) = append_to_body(&body.query, text, &assign) else {
            continue;
        };
        let (vs, ve) = extent_of(text, &value.value);
        edits.push(Edit {
            at: vs as usize,
            delete: (ve - vs) as usize,
            text: var,
            order: 0,
        });
        edits.extend(append);
    }
    edits
}

/// Calls `f` on every expression of a rule (heads, bodies, nested queries).
fn each_rule_expr(rule: &Rule, f: &mut dyn FnMut(&Expr)) {
    match rule {
        Rule::Spec { head, bodies, .. } => {
            match head {
                RuleHead::Compr { assign, .. } | RuleHead::Func { assign, .. } => {
                    if let Some(a) = assign {
                        crate::compat::walk(&a.value, f);
                    }
                }
                RuleHead::Set { key, .. } => {
                    if let Some(k) = key {
                        crate::compat::walk(k, f);
                    }
                }
            }
            for body in bodies {
                if let Some(a) = &body.assign {
                    crate::compat::walk(&a.value, f);
                }
                crate::compat::walk_query(&body.query, f);
            }
        }
        Rule::Default { value, .. } => crate::compat::walk(value, f),
    }
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
        for_rvm(text, &ast, true).text
    }

    fn interp(text: &str) -> String {
        interpreter_text("p.rego", text, true)
    }

    #[test]
    fn negated_calls_evaluate_their_arguments_first() {
        assert_eq!(
            interp("package t\n\na if not startswith(input.p, \"/admin\")\n"),
            "package t\n\na if { [__nexus_n1] := [input.p]; not startswith(input.p, \"/admin\") }\n"
        );
        assert_eq!(
            interp(
                "package t\n\na if {\n\tnot input.m in {\"x\"}\n\tnot input.n == 1\n\tnot data.s[input.k]\n}\n"
            ),
            "package t\n\na if {\n\t[__nexus_n1] := [input.m]; not input.m in {\"x\"}\n\tnot input.n == 1\n\t[__nexus_n2] := [input.k]; not data.s[input.k]\n}\n"
        );
    }

    #[test]
    fn membership_as_a_value_is_a_call_and_some_in_tolerates_non_collections() {
        assert_eq!(
            interp("package t\n\ng := input.m in {\"a\"}\n\nh if { some x in input.xs; x }\n"),
            "package t\n\ng := __nexus_member(input.m, {\"a\"})\n\nh if { some x in __nexus_iter(input.xs); x }\n"
        );
    }

    #[test]
    fn multi_value_rules_with_a_variable_key_become_partial_objects() {
        assert_eq!(
            interp(
                "package t\n\ng[u] contains p if {\n\tsome u, ps in input.g\n\tsome p in ps\n}\n"
            ),
            "package t\n\ng[__nexus_k] := __nexus_mv_g(__nexus_k) if {\n\tsome u, ps in __nexus_iter(input.g)\n\tsome p in __nexus_iter(ps); __nexus_k := u\n}\n\n__nexus_mv_g(__nexus_k) := {p | some u, ps in __nexus_iter(input.g); some p in __nexus_iter(ps); u == __nexus_k}\n"
        );
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
#[cfg(test)]
mod spans {
    #[test]
    fn a_statement_ending_in_a_string_keeps_its_quote() {
        let r = |t: &str| super::interpreter_text("p.rego", t, true);
        assert_eq!(
            r("package t\n\nr := input.a if {\n\t\"w\" != \"d\"\n} else := 1\n"),
            "package t\n\nr := __nexus_e0_0 if {\n\t\"w\" != \"d\"; __nexus_e0_0 := input.a\n} else := 1\n"
        );
    }

    #[test]
    fn an_undefined_value_takes_the_else_branch() {
        let r = |t: &str| super::interpreter_text("p.rego", t, true);
        assert_eq!(
            r(
                "package t\n\nr := input.a if {\n\tinput.x\n} else := input.b if {\n\tinput.y\n} else := \"none\"\n"
            ),
            "package t\n\nr := __nexus_e0_0 if {\n\tinput.x; __nexus_e0_0 := input.a\n} else := __nexus_e0_1 if {\n\tinput.y; __nexus_e0_1 := input.b\n} else := \"none\"\n"
        );
    }

    #[test]
    fn collections_and_strings_keep_their_delimiters() {
        let r = |t: &str| super::interpreter_text("p.rego", t, true);
        assert_eq!(
            r("package t\n\nx := {k: v | some k, v in {\"a\": 1, \"b\": 2}; v > 1}\n"),
            "package t\n\nx := {k: v | some k, v in __nexus_iter({\"a\": 1, \"b\": 2}); v > 1}\n"
        );
        assert_eq!(
            r("package t\n\nx := \"a\", 1 in {\"a\": 1}\n"),
            "package t\n\nx := __nexus_member_kv(\"a\", 1, {\"a\": 1})\n"
        );
        assert_eq!(
            r("package t\n\nx if { r := \"a\"; not startswith(input.p, \"/x\") }\n"),
            "package t\n\nx if { r := \"a\"; [__nexus_n1] := [input.p]; not startswith(input.p, \"/x\") }\n"
        );
    }

    #[test]
    fn count_of_what_may_be_a_string_is_nexuss() {
        let r = |t: &str| super::interpreter_text("p.rego", t, true);
        assert_eq!(
            r("package t\n\nx := count(input.s)\n\ny := count(f(1))\n\nf(a) := a\n"),
            "package t\n\nx := __nexus_count(input.s)\n\ny := __nexus_count(f(1))\n\nf(a) := a\n"
        );
        // Collections by their form keep regorus's count: no host call.
        let kept = "package t\n\ndeny contains \"a\" if input.x\n\nm[k] := 1 if some k in input.ks\n\nx := [count(deny), count(m), count([1]), count({1}), count({\"a\": 1}), count([y | some y in input.ys]), count({y | some y in input.ys}), count({y: 1 | some y in input.ys})]\n";
        assert!(!r(kept).contains("__nexus_count"), "{}", r(kept));
        assert_eq!(r(kept).matches("count(").count(), 8);
        // Inside a negation: the guard copies the operand as written (it only checks
        // that it is defined, which both counts agree on); the comparison is nexus's.
        assert_eq!(
            r("package t\n\nx if { not count(input.s) > 2 }\n"),
            "package t\n\nx if { [__nexus_n1] := [count(input.s)]; not __nexus_count(input.s) > 2 }\n"
        );
    }
}
