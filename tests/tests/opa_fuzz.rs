//! The differential fuzzer against OPA 1.20 (`tests/opa/fuzz/fuzz.py`), on a fixed seed
//! and a bounded time: generated Rego modules (partial sets and objects, ref heads,
//! comprehensions, `some ... in`, `every`, `with`, `not`, `else`, defaults, functions,
//! string/regex/glob/time/net/JSON/encoding/crypto builtins) and inputs, evaluated by
//! `nexusctl policy eval` in the default mode and with the interpreter forced, and by
//! OPA. The run must find no mismatch (so no fail-open) and print its case and mismatch
//! counts. Longer runs by hand: `python3 tests/opa/fuzz/fuzz.py --seed N --minutes M`.
//!
//! Needs `cargo build --workspace --bins` first and the OPA bindings
//! (`scripts/install-test-deps.sh`); without them this test fails, never skips.

use std::io::Write;
use std::process::Command;

use nexus_tests::{bin, repo_root};

/// The CI budget of the run (seconds): the fuzzer stops starting cases after it.
const SECONDS: &str = "60";

#[test]
fn the_fuzzer_finds_no_difference_from_opa_on_the_ci_seed() {
    let out = Command::new("python3")
        .arg(repo_root().join("tests/opa/fuzz/fuzz.py"))
        .arg("--nexusctl")
        .arg(bin("nexusctl"))
        .args(["--seed", "1", "--seconds", SECONDS])
        .output()
        .unwrap_or_else(|e| panic!("cannot run tests/opa/fuzz/fuzz.py: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("fuzz seed 1: "))
        .unwrap_or_else(|| panic!("no summary line in the fuzzer's output:\n{stdout}"));
    // The per-run figures belong in the CI log even when the test passes (libtest
    // captures `println!`, not a direct write to stderr).
    let _ = writeln!(std::io::stderr(), "opa_fuzz: {summary}");
    assert!(summary.contains(" 0 mismatches, 0 fail-open"), "{summary}");
    let cases: usize = summary
        .trim_start_matches("fuzz seed 1: ")
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(cases >= 50, "only {cases} cases ran: {summary}");
    assert!(
        out.status.success(),
        "the fuzzer failed (exit {:?})",
        out.status.code()
    );
}
