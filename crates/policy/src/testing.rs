//! OPA-style policy tests: every rule named `test_*` in a `*_test.rego` module is
//! evaluated; it passes when it is `true`, fails when it is false, undefined or an
//! error (as `opa test` does). Coverage comes from regorus's coverage report.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use regorus::Value;

use crate::bundle::Bundle;
use crate::engine::engine_for;
use crate::error::PolicyError;

/// One test's outcome.
#[derive(Clone, Debug)]
pub struct TestResult {
    /// `data.<package>.<rule>`.
    pub name: String,
    /// The test file.
    pub file: String,
    /// Passed?
    pub passed: bool,
    /// Why it failed.
    pub failure: Option<String>,
    /// How long it took.
    pub duration: Duration,
}

/// Coverage of one module.
#[derive(Clone, Debug)]
pub struct FileCoverage {
    /// The module.
    pub file: String,
    /// Lines evaluated.
    pub covered: BTreeSet<u32>,
    /// Lines not evaluated.
    pub not_covered: BTreeSet<u32>,
}

impl FileCoverage {
    /// Covered share in percent (100 when nothing is coverable).
    pub fn percent(&self) -> f64 {
        let total = self.covered.len() + self.not_covered.len();
        if total == 0 {
            100.0
        } else {
            100.0 * self.covered.len() as f64 / total as f64
        }
    }
}

/// All tests of a bundle.
#[derive(Clone, Debug, Default)]
pub struct TestReport {
    /// Per test.
    pub results: Vec<TestResult>,
    /// Per non-test module, when asked for.
    pub coverage: Vec<FileCoverage>,
}

impl TestReport {
    /// Failed tests.
    pub fn failed(&self) -> impl Iterator<Item = &TestResult> {
        self.results.iter().filter(|r| !r.passed)
    }

    /// Refuses the revision if any test failed.
    pub fn into_result(self) -> Result<Self, PolicyError> {
        let failed: Vec<&str> = self.failed().map(|r| r.name.as_str()).collect();
        if failed.is_empty() {
            Ok(self)
        } else {
            Err(PolicyError::TestsFailed {
                failed: failed.len(),
                names: failed.join(", "),
            })
        }
    }
}

/// `(package, rule)` names of the `test_` rules of a module, from its text: a rule head
/// starts a line (as `opa fmt` writes it) with `test_name`.
pub(crate) fn test_rules(text: &str) -> Option<(String, Vec<String>)> {
    let mut package = None;
    let mut rules = Vec::new();
    for line in text.lines() {
        let trimmed = line.trim_start();
        if package.is_none()
            && let Some(rest) = trimmed.strip_prefix("package ")
        {
            package = Some(
                rest.split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string(),
            );
            continue;
        }
        if line.starts_with("test_") {
            let name: String = line
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !rules.contains(&name) {
                rules.push(name);
            }
        }
    }
    package.map(|p| (p, rules))
}

/// Runs every test of `bundle`; `filter` keeps tests whose name contains it.
pub fn run_tests(
    bundle: &Bundle,
    coverage: bool,
    filter: Option<&str>,
) -> Result<TestReport, PolicyError> {
    run_tests_observed(bundle, coverage, filter, &mut |_, _| {})
}

/// [`run_tests`], calling `starting(rule, file)` before each test (the isolated checker
/// reports which test was running when a limit stopped it).
pub fn run_tests_observed(
    bundle: &Bundle,
    coverage: bool,
    filter: Option<&str>,
    starting: &mut dyn FnMut(&str, &str),
) -> Result<TestReport, PolicyError> {
    let mut engine = engine_for(bundle, true)?;
    engine.set_enable_coverage(coverage);
    let mut report = TestReport::default();
    for module in &bundle.tests {
        let Some((package, rules)) = test_rules(&module.text) else {
            continue;
        };
        for rule in rules {
            let name = format!("data.{package}.{rule}");
            if filter.is_some_and(|f| !name.contains(f)) {
                continue;
            }
            starting(&name, &module.path);
            let start = Instant::now();
            // A regorus panic fails this test, not the run (nor the sidecar's reload).
            let outcome = crate::panics::catch(|| {
                engine
                    .eval_rule(name.clone())
                    .map_err(|e| PolicyError::from_regorus(&e).to_string())
            });
            let (passed, failure) = match outcome {
                Ok(Value::Bool(true)) => (true, None),
                Ok(Value::Undefined) => (
                    false,
                    Some("undefined (a condition in the test did not hold)".into()),
                ),
                Ok(other) => (
                    false,
                    Some(format!(
                        "evaluated to {}",
                        other.to_json_str().unwrap_or_default()
                    )),
                ),
                Err(e) => (false, Some(e)),
            };
            report.results.push(TestResult {
                name,
                file: module.path.clone(),
                passed,
                failure,
                duration: start.elapsed(),
            });
        }
    }
    if coverage && let Ok(cov) = engine.get_coverage_report() {
        report.coverage = cov
            .files
            .into_iter()
            .filter(|f| !f.path.ends_with("_test.rego"))
            .map(|f| FileCoverage {
                file: f.path,
                covered: f.covered,
                not_covered: f.not_covered,
            })
            .collect();
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::Module;

    fn bundle() -> Bundle {
        Bundle::from_modules(
            vec![
                Module {
                    path: "authz.rego".into(),
                    text: "package nexus.authz\n\nallow if input.user == \"alice\"\n".into(),
                },
                Module {
                    path: "authz_test.rego".into(),
                    text: "package nexus.authz_test\nimport data.nexus.authz\n\ntest_alice if authz.allow with input as {\"user\": \"alice\"}\n\ntest_bob_fails if authz.allow with input as {\"user\": \"bob\"}\n".into(),
                },
            ],
            Value::new_object(),
        )
    }

    #[test]
    fn runs_tests_and_reports_failures() {
        let report = run_tests(&bundle(), true, None).unwrap();
        assert_eq!(report.results.len(), 2);
        assert!(report.results[0].passed);
        assert!(!report.results[1].passed);
        assert!(
            report.results[1]
                .failure
                .as_deref()
                .unwrap()
                .contains("undefined")
        );
        assert!(report.clone().into_result().is_err());
        assert_eq!(report.coverage.len(), 1);
        assert!(report.coverage[0].percent() > 0.0);
    }

    #[test]
    fn filter_selects_tests() {
        let report = run_tests(&bundle(), false, Some("alice")).unwrap();
        assert_eq!(report.results.len(), 1);
        assert!(report.into_result().is_ok());
    }
}
