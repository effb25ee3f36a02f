//! `nexusctl policy test|check|eval` end to end: the real binary on the reference
//! policies and on broken copies of them in a temp dir, asserting on exit codes and on
//! what it prints.
//!
//! Needs `cargo build --workspace --bins` first (`scripts/test.sh` does it).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nexus_tests::{bin, repo_root, run_bounded, temp_dir};
use serde_json::{Value, json};

const FLOOD_ID: &str = "spiffe://nexus.local/ns/plugins/sa/flood-model";
const HAZARD_ID: &str = "spiffe://nexus.local/ns/data/sa/hazard-api";

/// What a run printed.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn nexusctl(args: &[&str]) -> Run {
    let program = bin("nexusctl");
    let out = run_bounded(60, &program.to_string_lossy(), args);
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn policies() -> PathBuf {
    repo_root().join("policies")
}

fn s(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// A copy of `policies/` in `dir`.
fn copy_policies(dir: &Path) -> PathBuf {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).expect("create folder");
        for entry in std::fs::read_dir(from).expect("read folder") {
            let entry = entry.expect("entry");
            let target = to.join(entry.file_name());
            if entry.file_type().expect("file type").is_dir() {
                copy(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), &target).expect("copy file");
            }
        }
    }
    let to = dir.join("policies");
    copy(&policies(), &to);
    to
}

/// The `test_` rules the reference test file defines (so the count stays current).
/// `test_` rules in one test file.
fn test_rules(rel: &str) -> usize {
    std::fs::read_to_string(policies().join(rel))
        .unwrap_or_else(|e| panic!("{rel}: {e}"))
        .lines()
        .filter(|l| l.starts_with("test_"))
        .count()
}

/// The authz tests (the ones `-v` lists under data.nexus.authz_test).
fn reference_test_count() -> usize {
    test_rules("nexus/authz/authz_test.rego")
}

/// Every test under policies/: authz and the gateway's revocation policy.
fn all_test_count() -> usize {
    reference_test_count() + test_rules("revocation/revocation_test.rego")
}

/// The "N passed, M failed" summary line.
fn summary(stdout: &str) -> (usize, usize) {
    let line = stdout
        .lines()
        .rfind(|l| l.contains(" passed, ") && l.ends_with(" failed"))
        .unwrap_or_else(|| panic!("no summary line in {stdout:?}"));
    let numbers: Vec<usize> = line
        .split(' ')
        .filter_map(|w| w.trim_end_matches(',').parse().ok())
        .collect();
    assert_eq!(numbers.len(), 2, "{line}");
    (numbers[0], numbers[1])
}

/// `file:LINE:COL` somewhere in `text` for a path ending in `file`.
fn has_file_line_col(text: &str, file: &str) -> bool {
    text.match_indices(file).any(|(i, _)| {
        let mut parts = text[i + file.len()..].splitn(3, ':');
        let digits = |p: Option<&str>| {
            p.is_some_and(|p| p.chars().next().is_some_and(|c| c.is_ascii_digit()))
        };
        parts.next() == Some("") && digits(parts.next()) && digits(parts.next())
    })
}

// --- test ------------------------------------------------------------------------------

#[test]
fn policy_test_passes_on_the_reference_policies() {
    let expected = reference_test_count();
    assert!(expected > 0);
    let run = nexusctl(&["policy", "test", &s(&policies())]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(summary(&run.stdout), (all_test_count(), 0), "{run:?}");
    assert!(!run.stdout.contains("FAIL"), "{run:?}");

    // -v lists every test by its full name.
    let run = nexusctl(&["policy", "test", "-v", &s(&policies())]);
    assert_eq!(run.code, 0, "{run:?}");
    let passed: Vec<&str> = run
        .stdout
        .lines()
        .filter(|l| l.starts_with("PASS data.nexus.authz_test.test_"))
        .collect();
    assert_eq!(passed.len(), expected, "{}", run.stdout);
    assert!(
        passed
            .iter()
            .any(|l| l.contains("test_unbound_clause_is_denied")),
        "{}",
        run.stdout
    );
}

#[test]
fn policy_test_coverage_reports_a_percentage_per_module() {
    let run = nexusctl(&["policy", "test", "--coverage", &s(&policies())]);
    assert_eq!(run.code, 0, "{run:?}");
    let line = run
        .stdout
        .lines()
        .find(|l| l.contains("nexus/authz/authz.rego"))
        .unwrap_or_else(|| panic!("no coverage line for authz.rego: {}", run.stdout));
    let percent: f64 = line
        .split_whitespace()
        .find_map(|w| w.strip_suffix('%')?.parse().ok())
        .unwrap_or_else(|| panic!("no percentage in {line:?}"));
    assert!(percent > 50.0 && percent <= 100.0, "{line}");
    assert!(
        !run.stdout.contains("authz_test.rego"),
        "tests are not covered modules: {}",
        run.stdout
    );
    assert_eq!(summary(&run.stdout).1, 0);

    // A rule no test reaches shows up as uncovered lines.
    let dir = temp_dir("nexusctl-coverage");
    let copy = copy_policies(dir.path());
    let rego = copy.join("nexus/authz/authz.rego");
    let mut text = std::fs::read_to_string(&rego).expect("authz.rego");
    text.push_str("\ngrant contains \"untested\" if {\n\tinput.request.path == \"/never\"\n}\n");
    std::fs::write(&rego, text).expect("write");
    let run = nexusctl(&["policy", "test", "--coverage", &s(&copy)]);
    assert_eq!(run.code, 0, "{run:?}");
    let line = run
        .stdout
        .lines()
        .find(|l| l.contains("authz.rego"))
        .unwrap_or_default()
        .to_string();
    assert!(line.contains("lines not covered:"), "{line}");
    let lower: f64 = line
        .split_whitespace()
        .find_map(|w| w.strip_suffix('%')?.parse().ok())
        .unwrap_or(100.0);
    assert!(lower < percent, "{line}");
}

#[test]
fn policy_test_fails_naming_the_failing_test() {
    let dir = temp_dir("nexusctl-failing");
    let copy = copy_policies(dir.path());
    // Only the authz policy: the gateway's revocation policy has tests of its own.
    std::fs::remove_dir_all(copy.join("revocation")).expect("remove revocation");
    let tests = copy.join("nexus/authz/authz_test.rego");
    let mut text = std::fs::read_to_string(&tests).expect("authz_test.rego");
    text.push_str(
        "\ntest_healthz_is_denied_to_everyone if {\n\td := authz.decision with input as req(\"GET\", \"/healthz\", null, null)\n\t\twith data.nexus.revoked as {}\n\td.allow == false\n}\n",
    );
    std::fs::write(&tests, text).expect("write");
    let run = nexusctl(&["policy", "test", &s(&copy)]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stdout
            .contains("FAIL data.nexus.authz_test.test_healthz_is_denied_to_everyone"),
        "{run:?}"
    );
    assert!(
        run.stdout.contains("authz_test.rego"),
        "names the file: {run:?}"
    );
    assert_eq!(summary(&run.stdout), (reference_test_count(), 1));
    assert!(run.stderr.contains("1 policy test(s) failed"), "{run:?}");

    // --run selects tests by name: without the failing one it passes.
    let run = nexusctl(&["policy", "test", "--run", "unbound_clause_is", &s(&copy)]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(summary(&run.stdout), (1, 0));

    // A folder without tests is an error, not a silent pass.
    std::fs::remove_file(&tests).expect("remove tests");
    let run = nexusctl(&["policy", "test", &s(&copy)]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("no test_ rules found"), "{run:?}");
}

// --- check -----------------------------------------------------------------------------

#[test]
fn policy_check_reports_file_line_col() {
    let run = nexusctl(&["policy", "check", &s(&policies())]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.contains("data.nexus.authz.decision compiles")
            && run.stdout.contains("revision sha256:"),
        "{run:?}"
    );

    let dir = temp_dir("nexusctl-check");
    let copy = copy_policies(dir.path());
    let rego = copy.join("nexus/authz/authz.rego");
    let original = std::fs::read_to_string(&rego).expect("authz.rego");

    // A write cut off mid-rule: just after the first line of the first rule body.
    let body = original.find(" if {\n").expect("a rule with a body") + " if {\n".len();
    let cut = body + original[body..].find('\n').expect("a line in the body") + 1;
    std::fs::write(&rego, &original[..cut]).expect("truncate");
    let run = nexusctl(&["policy", "check", &s(&copy)]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        has_file_line_col(&run.stderr, "nexus/authz/authz.rego"),
        "{run:?}"
    );

    // A syntax error on a known line: the line number is that line.
    let broken = original.replacen("plugin := input.source.spiffe_id", "plugin := := x", 1);
    let line = broken
        .lines()
        .position(|l| l.contains(":= := x"))
        .expect("the broken line")
        + 1;
    std::fs::write(&rego, &broken).expect("write");
    let run = nexusctl(&["policy", "check", &s(&copy)]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr
            .contains(&format!("nexus/authz/authz.rego:{line}:")),
        "expected line {line}: {run:?}"
    );

    // Tests must compile too.
    std::fs::write(&rego, &original).expect("restore");
    let tests = copy.join("nexus/authz/authz_test.rego");
    let mut text = std::fs::read_to_string(&tests).expect("tests");
    text.push_str("\ntest_broken if {\n");
    std::fs::write(&tests, text).expect("write");
    let run = nexusctl(&["policy", "check", &s(&copy)]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        has_file_line_col(&run.stderr, "nexus/authz/authz_test.rego"),
        "{run:?}"
    );

    // A decision rule the folder does not define.
    let run = nexusctl(&[
        "policy",
        "check",
        "--rule",
        "data.nexus.nope.decision",
        &s(&policies()),
    ]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("data.nexus.nope.decision"), "{run:?}");
}

// --- eval ------------------------------------------------------------------------------

fn input(method: &str, path: &str, clause: Option<&str>, execution: Option<&str>) -> Value {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    json!({
        "direction": "inbound",
        "source": {"spiffe_id": FLOOD_ID},
        "destination": {"spiffe_id": HAZARD_ID},
        "request": {"method": method, "path": path, "segments": segments, "query": {}, "headers": {}, "body_size": 0},
        "clause": clause,
        "execution": execution.map(|id| json!({"id": id})),
        "time": "2026-11-26T09:41:07.123Z",
        "time_ns": 1_795_686_067_123_000_000_i64,
    })
}

/// Runtime data with ex-1 open for c-flood-17, as the sidecar's state file gives it.
fn runtime_data(dir: &Path) -> PathBuf {
    let path = dir.join("runtime.json");
    let data = json!({"nexus": {
        "executions": {"ex-1": {"id": "ex-1", "plugin": FLOOD_ID, "clause": "c-flood-17", "not_after": "2099-01-01T00:00:00Z", "not_after_ns": 4_070_908_800_000_000_000_i64}},
        "revoked": {},
    }});
    std::fs::write(&path, data.to_string()).expect("runtime data");
    path
}

fn json_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"))
}

#[test]
fn policy_eval_prints_the_decision() {
    let dir = temp_dir("nexusctl-eval");
    let data = runtime_data(dir.path());
    let write = |name: &str, value: &Value| {
        let path = dir.path().join(name);
        std::fs::write(&path, value.to_string()).expect("input");
        path
    };
    let eval = |input: &Path| {
        nexusctl(&[
            "policy",
            "eval",
            "--dir",
            &s(&policies()),
            "--data",
            &s(&data),
            "--input",
            &s(input),
        ])
    };

    let allowed = write(
        "allowed.json",
        &input(
            "GET",
            "/clauses/c-flood-17/rainfall",
            Some("c-flood-17"),
            Some("ex-1"),
        ),
    );
    let run = eval(&allowed);
    assert_eq!(run.code, 0, "{run:?}");
    let doc = json_of(&run.stdout);
    assert_eq!(doc["allow"], true, "{doc}");
    assert_eq!(
        doc["reasons"],
        json!([format!(
            "{FLOOD_ID} may read clause c-flood-17 under execution ex-1"
        )])
    );
    assert!(
        doc["revision"]
            .as_str()
            .is_some_and(|r| r.starts_with("sha256:"))
    );
    assert_eq!(doc["error"], Value::Null);

    let unbound = write(
        "unbound.json",
        &input("GET", "/clauses/c-quake-3/x", Some("c-quake-3"), None),
    );
    let run = eval(&unbound);
    assert_eq!(run.code, 0, "{run:?}");
    let doc = json_of(&run.stdout);
    assert_eq!(doc["allow"], false, "{doc}");
    assert_eq!(
        doc["reasons"],
        json!([format!("{FLOOD_ID} is not bound to clause c-quake-3")])
    );

    // Without the runtime data, no execution is open.
    let run = nexusctl(&[
        "policy",
        "eval",
        "--dir",
        &s(&policies()),
        "--input",
        &s(&allowed),
    ]);
    let doc = json_of(&run.stdout);
    assert_eq!(doc["allow"], false, "{doc}");
    assert_eq!(
        doc["reasons"],
        json!([format!(
            "no open execution of clause c-flood-17 for {FLOOD_ID}"
        )])
    );

    // The input from stdin.
    let mut child = Command::new(bin("nexusctl"))
        .args(["policy", "eval", "--dir", &s(&policies()), "--input", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nexusctl");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input("GET", "/healthz", None, None).to_string().as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("nexusctl");
    assert!(out.status.success(), "{out:?}");
    let doc = json_of(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(doc["allow"], true, "{doc}");
    assert_eq!(doc["reasons"], json!(["public path /healthz"]));

    // A rule that is not there.
    let run = nexusctl(&[
        "policy",
        "eval",
        "--dir",
        &s(&policies()),
        "--rule",
        "data.nexus.nope.decision",
        "--input",
        &s(&allowed),
    ]);
    assert_ne!(run.code, 0, "{run:?}");
    assert!(run.stderr.contains("data.nexus.nope.decision"), "{run:?}");
}

#[test]
fn policy_eval_inputs_prints_one_line_per_input() {
    let dir = temp_dir("nexusctl-eval-lines");
    let data = runtime_data(dir.path());
    let cases = [
        (
            input(
                "GET",
                "/clauses/c-flood-17/rainfall",
                Some("c-flood-17"),
                Some("ex-1"),
            ),
            true,
        ),
        (
            input(
                "DELETE",
                "/clauses/c-flood-17/rainfall",
                Some("c-flood-17"),
                Some("ex-1"),
            ),
            false,
        ),
        (
            input("GET", "/clauses/c-flood-18/x", Some("c-flood-18"), None),
            false,
        ),
        (input("GET", "/healthz", None, None), true),
        (input("GET", "/admin", None, None), false),
    ];
    let mut lines: Vec<String> = cases.iter().map(|(i, _)| i.to_string()).collect();
    lines.insert(2, String::new()); // blank lines are skipped
    let file = dir.path().join("inputs.jsonl");
    std::fs::write(&file, lines.join("\n") + "\n").expect("inputs");
    let run = nexusctl(&[
        "policy",
        "eval",
        "--dir",
        &s(&policies()),
        "--data",
        &s(&data),
        "--inputs",
        &s(&file),
    ]);
    assert_eq!(run.code, 0, "{run:?}");
    let out: Vec<Value> = run.stdout.lines().map(json_of).collect();
    assert_eq!(out.len(), cases.len(), "{}", run.stdout);
    for ((input, allow), decision) in cases.iter().zip(&out) {
        assert_eq!(decision["allow"], *allow, "{input} -> {decision}");
        assert!(
            decision["reasons"]
                .as_array()
                .is_some_and(|r| !r.is_empty()),
            "{decision}"
        );
    }
    assert_eq!(
        out[1]["reasons"],
        json!(["method DELETE is not allowed on clause data"])
    );
    assert_eq!(out[4]["reasons"], json!(["no rule allows this request"]));

    // A line that is not JSON is named by file and line; the lines after it are still
    // evaluated, and the run exits non-zero.
    std::fs::write(&file, format!("{}\n{{oops\n{}\n", lines[0], lines[1])).expect("inputs");
    let run = nexusctl(&[
        "policy",
        "eval",
        "--dir",
        &s(&policies()),
        "--inputs",
        &s(&file),
    ]);
    assert_ne!(run.code, 0, "{run:?}");
    assert!(
        run.stderr.contains("inputs.jsonl:2: not a JSON input"),
        "{run:?}"
    );
    assert_eq!(run.stdout.lines().count(), 3, "{run:?}");
    assert!(
        run.stdout
            .lines()
            .nth(2)
            .is_some_and(|l| l.contains("DELETE")),
        "{run:?}"
    );
}

#[test]
fn policy_eval_explain_prints_every_rule_of_the_package() {
    let dir = temp_dir("nexusctl-explain");
    let data = runtime_data(dir.path());
    let file = dir.path().join("input.json");
    std::fs::write(
        &file,
        input(
            "DELETE",
            "/clauses/c-flood-17/rainfall",
            Some("c-flood-17"),
            Some("ex-1"),
        )
        .to_string(),
    )
    .expect("input");
    let run = nexusctl(&[
        "policy",
        "eval",
        "--dir",
        &s(&policies()),
        "--data",
        &s(&data),
        "--input",
        &s(&file),
        "--explain",
    ]);
    assert_eq!(run.code, 0, "{run:?}");
    let (decision, explain) = run
        .stdout
        .split_once("\nexplain: every rule of data.nexus.authz for this input\n")
        .unwrap_or_else(|| panic!("no explain header: {}", run.stdout));
    assert_eq!(json_of(decision)["allow"], false);
    let rules = json_of(explain);
    for rule in [
        "decision",
        "deny",
        "bound",
        "execution_open",
        "read_methods",
        "plugin",
    ] {
        assert!(rules.get(rule).is_some(), "no {rule} in {rules}");
    }
    // Why: bound and under an open execution, but the method is not a read.
    assert_eq!(rules["bound"], true);
    assert_eq!(rules["execution_open"], true);
    assert_eq!(
        rules["deny"],
        json!(["method DELETE is not allowed on clause data"])
    );
    assert_eq!(rules["decision"]["allow"], false);
    assert_eq!(rules["decision"]["reasons"], rules["deny"]);
}

/// Attack: requests crafted to reach the constructs on which regorus allowed where OPA
/// denies (each measured before this fix: the old engine printed `"allow": true`).
/// `nexusctl policy eval` (the sidecar's `Policy`, default mode) must deny each, and
/// still allow the request the policy means to allow.
#[test]
fn fail_open_constructs_deny_as_opa_does() {
    let dir = temp_dir("nexusctl-fail-open");
    let cases: &[(&str, &str, Value, Value)] = &[
        // `x := <missing>` then a negation: the RVM went on with an undefined `x`.
        (
            "role := input.role\n\tnot role == \"guest\"",
            "assign-then-not",
            json!({}),
            json!({"role": "dev"}),
        ),
        // A negated call on a missing field: OPA evaluates the argument first.
        (
            "not startswith(input.path, \"/admin\")",
            "not-call",
            json!({}),
            json!({"path": "/docs"}),
        ),
        // A comprehension head reading a missing field kept an undefined element.
        (
            "count([u.admin | some u in input.users]) == count(input.users)",
            "comprehension-head",
            json!({"users": [{"admin": true}, {"id": 2}]}),
            json!({"users": [{"admin": true}]}),
        ),
        // `k, v in c`: the RVM ignored the index.
        (
            "0, \"admin\" in input.roles",
            "key-value-membership",
            json!({"roles": ["dev", "admin"]}),
            json!({"roles": ["admin"]}),
        ),
        // A multi-value rule with a variable key: one flat set in the RVM, so
        // `grants.admin` was undefined and its negation held.
        (
            "not grants.admin",
            "multi-value-ref-head",
            json!({"roles": ["admin"]}),
            json!({"roles": ["dev"]}),
        ),
    ];
    for (body, name, attack, good) in cases {
        let policy = dir.path().join(name);
        std::fs::create_dir_all(&policy).expect("policy dir");
        std::fs::write(
            policy.join("p.rego"),
            format!(
                "package t\n\ngrants[r] contains p if {{\n\tsome r in input.roles\n\tsome p in [\"read\"]\n}}\n\ndefault allow := false\n\nallow if {{\n\t{body}\n}}\n\ndecision := {{\"allow\": allow, \"reasons\": []}}\n"
            ),
        )
        .expect("policy");
        let inputs = policy.join("inputs.jsonl");
        std::fs::write(&inputs, format!("{attack}\n{good}\n")).expect("inputs");
        let run = nexusctl(&[
            "policy",
            "eval",
            "--dir",
            &s(&policy),
            "--rule",
            "data.t.decision",
            "--inputs",
            &s(&inputs),
        ]);
        assert_eq!(run.code, 0, "{name}: {run:?}");
        let out: Vec<Value> = run
            .stdout
            .lines()
            .map(|l| serde_json::from_str(l).expect("a decision line"))
            .collect();
        assert_eq!(
            out[0]["allow"],
            json!(false),
            "{name}: the attack is allowed: {run:?}"
        );
        assert_eq!(
            out[1]["allow"],
            json!(true),
            "{name}: the good request is denied: {run:?}"
        );
        // And the rule runs compiled or native (the fix is not "always the interpreter").
        let check = nexusctl(&["policy", "check", &s(&policy), "--rule", "data.t.decision"]);
        assert!(
            check.stdout.contains("mode: compiled") || check.stdout.contains("mode: native"),
            "{name}: {check:?}"
        );
    }
}

/// YAML data means what it means to OPA (`strict: yes` is `true`: a YAML 1.2 reader saw
/// the string "yes", so `== true` failed and a deny OPA made did not happen), and YAML a
/// plugin sends to a policy that unmarshals it cannot blow the evaluator up: a
/// "billion laughs" document (10^9 values through aliases) is undefined, at once.
#[test]
fn yaml_is_read_as_opa_reads_it_and_an_alias_bomb_is_refused() {
    let dir = temp_dir("nexusctl-yaml");
    let root = dir.path().join("p");
    std::fs::create_dir_all(root.join("cfg")).expect("create folder");
    std::fs::write(root.join("cfg/data.yaml"), "strict: yes\nlabel: \"on\"\n").expect("write");
    std::fs::write(
        root.join("t.rego"),
        "package t\n\nstrict := data.cfg.strict == true\n\nlabel := data.cfg.label\n\nbomb := yaml.unmarshal(input.bomb)\n",
    )
    .expect("write");
    let mut bomb = String::from("l0: &l0 [1,1,1,1,1,1,1,1,1,1]\n");
    for level in 1..9 {
        let uses = vec![format!("*l{}", level - 1); 10].join(",");
        bomb.push_str(&format!("l{level}: &l{level} [{uses}]\n"));
    }
    let input = dir.path().join("input.json");
    std::fs::write(&input, json!({"bomb": bomb}).to_string()).expect("write");
    let eval = |rule: &str| {
        let run = nexusctl(&[
            "policy",
            "eval",
            "--dir",
            &s(&root),
            "--rule",
            rule,
            "--value",
            "--input",
            &s(&input),
        ]);
        assert_eq!(run.code, 0, "{run:?}");
        json_of(&run.stdout)
    };
    assert_eq!(eval("data.t.strict"), json!({"value": true}));
    assert_eq!(eval("data.t.label"), json!({"value": "on"}));
    assert_eq!(eval("data.t.bomb"), json!({"undefined": true}));
}

/// The reference policy is decided by nexus's own evaluator (`auto`, the sidecar's
/// default), by the RVM (`--mode rvm`) and by the interpreter, with the same answer each
/// time; a policy with a function is not taken, and `policy check` names the line.
#[test]
fn the_native_evaluator_decides_the_reference_policy_and_names_what_it_refuses() {
    let dir = temp_dir("nexusctl-native");
    let policies = copy_policies(dir.path());
    let input = dir.path().join("input.json");
    std::fs::write(
        &input,
        json!({
            "direction": "inbound",
            "source": {"spiffe_id": "spiffe://nexus.local/ns/plugins/sa/flood-model"},
            "destination": {"spiffe_id": "spiffe://nexus.local/ns/data/sa/hazard-api"},
            "request": {"method": "DELETE", "path": "/clauses/c-flood-17/x", "segments": [], "query": {}, "headers": {}, "body_size": 0},
            "clause": "c-flood-17",
            "execution": null,
            "time": "2026-11-26T09:41:07.123Z",
            "time_ns": 1795686067123000000i64,
        })
        .to_string(),
    )
    .expect("write input");
    let mut answers = Vec::new();
    for (mode, served) in [
        ("auto", "native"),
        ("rvm", "compiled"),
        ("interpreted", "interpreted"),
    ] {
        let run = nexusctl(&[
            "policy",
            "eval",
            "--dir",
            &s(&policies.join("nexus")),
            "--mode",
            mode,
            "--input",
            &s(&input),
        ]);
        assert_eq!(run.code, 0, "{mode}: {run:?}");
        let out = json_of(&run.stdout);
        assert_eq!(out["mode"], json!(served), "{mode}: {run:?}");
        assert_eq!(out["allow"], json!(false), "{mode}: {run:?}");
        answers.push(out["reasons"].clone());
    }
    assert!(
        answers.windows(2).all(|w| w[0] == w[1]),
        "the modes disagree: {answers:?}"
    );
    assert!(
        answers[0]
            .to_string()
            .contains("method DELETE is not allowed on clause data"),
        "{answers:?}"
    );

    let check = nexusctl(&["policy", "check", &s(&policies.join("nexus"))]);
    assert_eq!(check.code, 0, "{check:?}");
    assert!(
        check
            .stdout
            .contains("mode: native (checked against the interpreter on"),
        "{check:?}"
    );

    let own = dir.path().join("own");
    std::fs::create_dir_all(&own).expect("create folder");
    std::fs::write(
        own.join("t.rego"),
        "package t\n\nimport rego.v1\n\nis_get(r) if r.method == \"GET\"\n\ndecision := {\"allow\": is_get(input.request), \"reasons\": []}\n",
    )
    .expect("write policy");
    let check = nexusctl(&["policy", "check", &s(&own), "--rule", "data.t.decision"]);
    assert_eq!(check.code, 0, "{check:?}");
    assert!(check.stdout.contains("mode: compiled"), "{check:?}");
    assert!(
        check.stdout.contains("not native: ")
            && check.stdout.contains("t.rego:7:")
            && check.stdout.contains("a call of the function `is_get`"),
        "{check:?}"
    );
}
