//! The OPA differential harness: every case under `tests/opa/differential/cases/`
//! (a policy, data, an input and a query) is evaluated in-process by nexus, on the two
//! paths a policy takes in nexus, and by OPA 1.20 (`tests/opa/differential/run.py`,
//! through PyPI `opa-golib-python-bindings`); the results must agree, or the case must be
//! listed in `tests/opa/differential/known_differences.yaml` with the reason (and a
//! listed case that agrees again fails the run, so the list stays honest).
//!
//! The two nexus paths:
//! - `sidecar`: the mode `Policy::compile` chooses (the RVM, or the interpreter when the
//!   revision calls a nexus builtin) with the sidecar's evaluation setup, returning the
//!   query's value (`nexus_policy::compat::evaluate_rule`).
//! - `test`: `engine_for(bundle, true)` + `eval_rule`, what `nexusctl policy test` runs.
//!
//! The case format is described in `tests/opa/differential/README.md`. Needs the OPA
//! bindings (`scripts/install-test-deps.sh`); without them this test fails, never skips.
//! `NEXUS_DIFF_OUT=FILE` keeps the nexus results (JSON lines) for `run.py --nexus FILE`;
//! `NEXUS_DIFF_ONLY=PREFIX` runs only the cases whose name starts with PREFIX.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nexus_policy::compat::{RuleOutcome, evaluate_rule};
use nexus_policy::{Bundle, Module, Value, engine_for};
use nexus_tests::repo_root;
use serde_json::{Value as Json, json};

/// The least number of cases the corpus must hold.
const MIN_CASES: usize = 300;

/// One expanded case.
struct Case {
    name: String,
    file: String,
    modules: Vec<(String, String)>,
    data: Json,
    input: Option<Json>,
    query: String,
    /// Evaluated in a child process: regorus aborts the process on it (a stack
    /// overflow cannot be caught), and that abort is the result.
    isolate: bool,
}

fn yaml_to_json(path: &Path) -> Json {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let value = Value::from_yaml_str(&text)
        .unwrap_or_else(|e| panic!("{}: not valid YAML: {e:#}", path.display()));
    let json = value
        .to_json_str()
        .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
    serde_json::from_str(&json).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn text(v: &Json, what: &str, file: &str) -> String {
    v.as_str()
        .unwrap_or_else(|| panic!("{file}: {what} must be a string"))
        .to_string()
}

/// Modules of a case: `policy` (one module, `case.rego`), `modules` (path → text), or
/// `expr` (shorthand for `package t` / `x := EXPR`, queried as `data.t.x`).
fn modules_of(case: &Json, defaults: &Json, file: &str) -> Option<Vec<(String, String)>> {
    if let Some(expr) = case.get("expr") {
        let expr = text(expr, "expr", file);
        return Some(vec![(
            "case.rego".into(),
            format!("package t\n\nx := {expr}\n"),
        )]);
    }
    for source in [case, defaults] {
        if let Some(policy) = source.get("policy") {
            return Some(vec![("case.rego".into(), text(policy, "policy", file))]);
        }
        if let Some(Json::Object(mods)) = source.get("modules") {
            return Some(
                mods.iter()
                    .map(|(p, t)| (p.clone(), text(t, "a module", file)))
                    .collect(),
            );
        }
    }
    None
}

/// A data document from `fixtures/` (keys, certificates and tokens made by
/// `fixtures/generate.py`).
fn fixture_data(cases_dir: &Path, name: &str) -> Json {
    let path = cases_dir.join("../fixtures").join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn load_cases(dir: &Path) -> Vec<Case> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    let mut cases = Vec::new();
    let mut names = BTreeSet::new();
    for path in files {
        let file = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let doc = yaml_to_json(&path);
        let shown = format!("cases/{file}.yaml");
        let list = doc
            .get("cases")
            .and_then(Json::as_array)
            .unwrap_or_else(|| panic!("{shown}: no `cases` list"));
        for case in list {
            let name = format!(
                "{file}/{}",
                case.get("name")
                    .and_then(Json::as_str)
                    .unwrap_or_else(|| panic!("{shown}: a case has no name: {case}"))
            );
            assert!(names.insert(name.clone()), "{shown}: duplicate case {name}");
            let modules = modules_of(case, &doc, &shown)
                .unwrap_or_else(|| panic!("{shown}: {name} has no policy, modules or expr"));
            let data = match case
                .get("data_file")
                .or_else(|| doc.get("data_file"))
                .and_then(Json::as_str)
            {
                Some(fixture) => fixture_data(dir, fixture),
                None => case
                    .get("data")
                    .or_else(|| doc.get("data"))
                    .cloned()
                    .unwrap_or_else(|| json!({})),
            };
            let input = case.get("input").cloned();
            let query = case
                .get("query")
                .or_else(|| doc.get("query"))
                .and_then(Json::as_str)
                .unwrap_or("data.t.x")
                .to_string();
            let isolate = case.get("isolate").and_then(Json::as_bool).unwrap_or(false);
            cases.push(Case {
                name,
                file: shown.clone(),
                modules,
                data,
                input,
                query,
                isolate,
            });
        }
    }
    cases
}

fn to_value(json: &Json) -> Value {
    serde_json::from_value(json.clone()).unwrap_or_else(|e| panic!("{json}: {e}"))
}

fn bundle_of(case: &Case) -> Bundle {
    let modules: Vec<Module> = case
        .modules
        .iter()
        .map(|(path, text)| Module {
            path: path.clone(),
            text: text.clone(),
        })
        .collect();
    Bundle::from_modules(modules, to_value(&case.data))
}

fn outcome(status: &str, value: Option<String>, detail: Option<String>) -> Json {
    json!({"status": status, "value": value, "detail": detail})
}

/// The sidecar's path: the mode `Policy::compile` chooses (the RVM, or the interpreter
/// when the revision calls a nexus builtin) and the same evaluation setup, returning the
/// query's value (`compat::evaluate_rule`).
fn eval_sidecar(case: &Case) -> Json {
    let bundle = bundle_of(case);
    let input = case
        .input
        .as_ref()
        .map(to_value)
        .unwrap_or(Value::Undefined);
    // A loaded CI machine must not turn a slow case into a mismatch.
    match evaluate_rule(&bundle, &case.query, input, Duration::from_secs(10)) {
        Err(e) => outcome("compile_error", None, Some(e.to_string())),
        Ok((mode, result)) => {
            let mut out = match result {
                RuleOutcome::Value(v) => outcome("value", Some(exact_json(&v)), None),
                RuleOutcome::Undefined => outcome("undefined", None, None),
                RuleOutcome::Error(e) => outcome("error", None, Some(e)),
            };
            out["mode"] = json!(format!("{mode:?}").to_lowercase());
            out
        }
    }
}

/// JSON text of a value with numbers as regorus holds them (its serde serialization
/// goes through f64 for integers beyond 64 bits); sets as sorted arrays, as OPA writes
/// them.
fn exact_json(v: &Value) -> String {
    let join = |items: Vec<String>| items.join(",");
    match v {
        Value::Number(_) => v
            .as_number()
            .map(|n| n.format_decimal())
            .unwrap_or_else(|_| "null".into()),
        Value::Array(items) => format!("[{}]", join(items.iter().map(exact_json).collect())),
        Value::Set(items) => format!("[{}]", join(items.iter().map(exact_json).collect())),
        Value::Object(fields) => format!(
            "{{{}}}",
            join(
                fields
                    .iter()
                    .map(|(k, v)| {
                        let key = match k {
                            Value::String(s) => s.to_string(),
                            other => exact_json(other),
                        };
                        format!("{}:{}", Json::from(key), exact_json(v))
                    })
                    .collect()
            )
        ),
        other => other.to_json_str().unwrap_or_else(|_| "null".into()),
    }
}

/// The `nexusctl policy test` path: `engine_for` (tests included) and `eval_rule`.
fn eval_test_path(case: &Case) -> Json {
    let bundle = bundle_of(case);
    let mut engine = match engine_for(&bundle, true) {
        Ok(e) => e,
        Err(e) => return outcome("compile_error", None, Some(e.to_string())),
    };
    if let Some(input) = &case.input {
        engine.set_input(to_value(input));
    }
    match engine.eval_rule(case.query.clone()) {
        Ok(Value::Undefined) => outcome("undefined", None, None),
        Ok(v) => outcome("value", Some(exact_json(&v)), None),
        Err(e) => outcome("error", None, Some(format!("{e:#}"))),
    }
}

/// Evaluates an `isolate` case in a child (this test binary, running
/// `evaluate_one_isolated_case`); a child killed by a signal is a `crash`.
fn evaluate_isolated(case: &Case) -> Json {
    let exe = std::env::current_exe().expect("test binary path");
    let out = Command::new(exe)
        .args([
            "--exact",
            "evaluate_one_isolated_case",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_CASE, &case.name)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the harness child: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    if let Some(line) = stdout.lines().find_map(|l| l.strip_prefix("NEXUS-CASE ")) {
        return serde_json::from_str(line).unwrap_or_else(|e| panic!("child output {line}: {e}"));
    }
    let crash = outcome(
        "crash",
        None,
        Some(format!(
            "the process died ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .filter(|l| l.contains("overflow") || l.contains("fatal"))
                .collect::<Vec<_>>()
                .join("; ")
        )),
    );
    let mut line = evaluate_without(case);
    line["nexus"] = json!({"sidecar": crash.clone(), "test": crash});
    line
}

/// The environment variable naming the case a harness child evaluates.
const CHILD_CASE: &str = "NEXUS_DIFF_CHILD_CASE";

/// The child side of `evaluate_isolated`, which runs it (ignored otherwise: it evaluates
/// the one case `NEXUS_DIFF_CHILD_CASE` names, and fails without one).
#[test]
#[ignore = "the child side of evaluate_isolated, which runs it with NEXUS_DIFF_CHILD_CASE set"]
fn evaluate_one_isolated_case() {
    let name = std::env::var(CHILD_CASE).unwrap_or_else(|_| {
        panic!("{CHILD_CASE} names no case: this test is run by evaluate_isolated, not alone")
    });
    let root = repo_root().join("tests/opa/differential");
    let cases = load_cases(&root.join("cases"));
    let case = cases
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no case {name}"));
    let mut line = evaluate_without(case);
    line["nexus"] = json!({"sidecar": eval_sidecar(case), "test": eval_test_path(case)});
    println!("NEXUS-CASE {line}");
}

/// A result line without nexus outcomes.
fn evaluate_without(case: &Case) -> Json {
    let mut line = json!({
        "name": case.name,
        "file": case.file,
        "modules": case.modules,
        "data": case.data,
        "query": case.query,
    });
    if let Some(input) = &case.input {
        line["input"] = input.clone();
    }
    line
}

fn evaluate(case: &Case) -> Json {
    if case.isolate {
        return evaluate_isolated(case);
    }
    let sidecar = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| eval_sidecar(case)))
        .unwrap_or_else(|_| outcome("panic", None, None));
    let test = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| eval_test_path(case)))
        .unwrap_or_else(|_| outcome("panic", None, None));
    let mut line = evaluate_without(case);
    line["nexus"] = json!({"sidecar": sidecar, "test": test});
    line
}

#[test]
fn nexus_agrees_with_opa_on_the_differential_corpus() {
    let probe = Command::new("python3")
        .args(["-c", "import opa_bindings"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3: {e}"));
    assert!(
        probe.status.success(),
        "the OPA bindings (python module `opa_bindings`) are not importable: run \
         scripts/install-test-deps.sh\n{}",
        String::from_utf8_lossy(&probe.stderr)
    );

    let root = repo_root().join("tests/opa/differential");
    let mut cases = load_cases(&root.join("cases"));
    let only = std::env::var("NEXUS_DIFF_ONLY").ok();
    if let Some(prefix) = &only {
        cases.retain(|c| c.name.starts_with(prefix.as_str()));
    }
    assert!(
        only.is_some() || cases.len() >= MIN_CASES,
        "the corpus holds {} cases, fewer than {MIN_CASES}",
        cases.len()
    );
    let started = Instant::now();
    // regorus panics on some inputs; `evaluate` records each as a result. Their messages
    // go to this test's captured output (shown only if it fails), not silenced for the
    // whole process.
    let lines: Vec<String> = cases.iter().map(|c| evaluate(c).to_string()).collect();
    println!(
        "nexus evaluated {} cases in {:?}",
        cases.len(),
        started.elapsed()
    );

    let keep = std::env::var_os("NEXUS_DIFF_OUT").map(PathBuf::from);
    let dir = tempfile::tempdir().expect("temp dir");
    let out_path = keep.unwrap_or_else(|| dir.path().join("nexus.jsonl"));
    std::fs::write(&out_path, lines.join("\n") + "\n")
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", out_path.display()));

    let out = Command::new("python3")
        .arg(root.join("run.py"))
        .arg("--nexus")
        .arg(&out_path)
        .args(only.iter().flat_map(|o| ["--only", o.as_str()]))
        .output()
        .unwrap_or_else(|e| panic!("cannot run run.py: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "nexus and OPA disagree on a case not listed in known_differences.yaml, or a \
         listed case agrees again (exit {:?}): see MISMATCH / STALE above",
        out.status.code()
    );
}

/// `nexusctl policy check`: OPA-compatibility warnings at file:line, errors with
/// `--strict`; a recursive rule is an error always, reported before compiling (which
/// would overflow the stack).
#[test]
fn policy_check_reports_compatibility_findings() {
    let dir = tempfile::tempdir().expect("temp dir");
    let write = |text: &str| {
        std::fs::write(dir.path().join("authz.rego"), text).expect("write policy");
    };
    let check = |strict: bool| {
        let mut cmd = Command::new(nexus_tests::bin("nexusctl"));
        cmd.args(["policy", "check"]).arg(dir.path());
        cmd.args(["--rule", "data.t.decision"]);
        if strict {
            cmd.arg("--strict");
        }
        let out = cmd.output().expect("run nexusctl");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    write(
        "package t\n\ndefault allow := false\n\nallow if input.score * 1.5 > 3\n\ndecision := {\"allow\": allow}\n",
    );
    let (code, stderr) = check(false);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("authz.rego:5:")
            && stderr.contains("warning: `input.score * 1.5`: arithmetic on a decimal fraction"),
        "{stderr}"
    );
    let (code, stderr) = check(true);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("authz.rego:5:") && stderr.contains(": error: `input.score * 1.5`"),
        "{stderr}"
    );

    // A builtin whose answer still differs from OPA's is flagged at its call.
    write(
        "package t\n\nallow if time.format([input.t, \"UTC\", \"MST\"]) == \"UTC\"\n\ndecision := {\"allow\": allow}\n",
    );
    let (code, stderr) = check(true);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("authz.rego:3:") && stderr.contains("`time.format`"),
        "{stderr}"
    );

    // A builtin nexus does not have is refused at its line, with what to write instead.
    write(
        "package t\n\nx := strings.render_template(\"{{.a}}\", {\"a\": 1})\n\ndecision := {\"allow\": true}\n",
    );
    let (code, stderr) = check(false);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("authz.rego:3:")
            && stderr.contains("strings.render_template")
            && stderr.contains("sprintf or concat"),
        "{stderr}"
    );

    write("package t\n\na if b\n\nb if a\n\ndecision := {\"allow\": a}\n");
    let (code, stderr) = check(false);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("authz.rego:3:1: error: recursive rule data.t.a"),
        "{stderr}"
    );
}
