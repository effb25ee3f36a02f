//! Conformance with OPA: every decision policy in `policies/` is evaluated over
//! generated inputs by nexus (`nexusctl policy eval`, regorus) and by OPA 1.20 (its Go
//! library, through PyPI `opa-golib-python-bindings`), and every decision must match.
//! The comparison itself is `tests/opa/conformance.py`; a mismatch prints its input and
//! both decisions.
//!
//! Needs `cargo build --workspace --bins` first and the OPA bindings from
//! `tests/requirements.txt` (`scripts/test.sh` does both; CI installs them). Without the
//! bindings this test fails: it never skips.

use std::process::Command;
use std::time::Instant;

use nexus_tests::{bin, repo_root};

#[test]
fn every_decision_policy_matches_opa() {
    let probe = Command::new("python3")
        .args(["-c", "import opa_bindings"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3: {e}"));
    assert!(
        probe.status.success(),
        "the OPA bindings (python module `opa_bindings`) are not importable: run \
         scripts/install-test-deps.sh (it installs opa-golib-python-bindings from \
         tests/requirements.txt with --ignore-requires-python)\n{}",
        String::from_utf8_lossy(&probe.stderr)
    );

    let root = repo_root();
    let started = Instant::now();
    let out = Command::new("python3")
        .arg(root.join("tests/opa/conformance.py"))
        .arg("--nexusctl")
        .arg(bin("nexusctl"))
        .arg("--policies")
        .arg(root.join("policies"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run tests/opa/conformance.py: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    println!("conformance run took {:?}", started.elapsed());
    assert!(
        out.status.success(),
        "nexus and OPA disagree, or the run failed (exit {:?}): see the MISMATCH lines in \
         the output above",
        out.status.code()
    );
    assert!(
        stdout.lines().any(|l| l.contains(" passed, 0 failed")),
        "no summary line in the conformance output:\n{stdout}"
    );
}

#[test]
fn the_revocation_policy_matches_opa() {
    let root = repo_root();
    let out = Command::new("python3")
        .arg(root.join("tests/opa/revocation_conformance.py"))
        .arg("--nexusctl")
        .arg(bin("nexusctl"))
        .arg("--policies")
        .arg(root.join("policies"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run tests/opa/revocation_conformance.py: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "nexus and OPA disagree on the revocation policy (see MISMATCH above)"
    );
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
}
