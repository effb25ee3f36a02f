//! Loading a policy revision off the serving path, under time and memory limits, in a
//! child process that can be abandoned.
//!
//! Loading, testing and compiling a folder runs regorus on text anyone with write access
//! to the folder controls, and a single builtin call (`numbers.range` over a huge span) or
//! a test that loops for hours cannot be interrupted inside the process. So the binary
//! that serves re-executes itself ([`CHILD_ARG`]) to check a revision: the child sets its
//! own address-space and CPU limits (`setrlimit`), asks the kernel to kill it if the
//! parent dies (`PR_SET_PDEATHSIG`), loads the folder, runs its tests one by one, compiles
//! each rule and evaluates it once on an empty input, and reports each step on stdout as
//! a JSON line. The parent kills it at the wall-clock limit. A revision that does not
//! finish is refused with the file, the rule and the limit it hit ([`PolicyError::Limit`]),
//! and the parent keeps serving its last good revision; nothing of the child's work is
//! kept, so an abandoned check leaves no thread or memory behind.
//!
//! The parent then loads the same folder itself, and uses it only if the revision id (a
//! hash of every file) is the one the child checked: an edit between the two is a new
//! revision, checked on the next round.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::bundle::Bundle;
use crate::engine::{EvalMode, Policy, PolicyOptions};
use crate::error::PolicyError;

/// The first argument that turns a Nexus binary into a policy checker (its `main` calls
/// [`child_main`] before anything else when it sees it).
pub const CHILD_ARG: &str = "__nexus-policy-check";

/// What a child checks.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckRequest {
    /// The policy folder.
    pub dir: PathBuf,
    /// Rules that must compile and evaluate (the decision rule, a shadow rule).
    pub rules: Vec<String>,
    /// Run the folder's `*_test.rego`.
    pub run_tests: bool,
    /// `true`: regorus's interpreter; `false`: its compiled mode (RVM).
    pub interpreted: bool,
    /// Wall-clock limit of the one evaluation of each rule (as on the request path).
    pub eval_timeout_ms: u64,
    /// Instruction limit of that evaluation.
    pub max_instructions: usize,
    /// Bytes of address space the child may use.
    pub max_memory: u64,
    /// Seconds of CPU the child may use (a backstop to the parent's wall-clock kill).
    pub max_cpu_secs: u64,
    /// The parent's pid: the child exits if it was re-parented before it could ask to be
    /// killed with its parent.
    pub parent: u32,
}

/// The limits a check runs under.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Wall clock, from spawn to the last line.
    pub timeout: Duration,
    /// Address space of the child, bytes.
    pub max_memory: u64,
}

/// One line a child writes.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
enum Step {
    /// Reading the folder.
    Load,
    /// Running one test.
    Test { rule: String, file: String },
    /// Compiling one rule.
    Compile { rule: String },
    /// Evaluating one rule once on an empty input.
    Evaluate { rule: String },
    /// Done: the revision passed.
    Passed { revision: String, tests: usize },
    /// Done: the revision is refused (a normal policy error, with its location).
    Refused {
        message: String,
        file: Option<String>,
        line: Option<u32>,
        col: Option<u32>,
    },
}

/// How the binary re-executes itself; set once by its `main`.
#[derive(Clone, Debug)]
pub struct Checker {
    /// The executable (normally `std::env::current_exe()`).
    pub exe: PathBuf,
}

static CHECKER: OnceLock<Checker> = OnceLock::new();

/// Set once the process is stopping: a check killed then says so.
static STOPPING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The checkers running now, so a stopping process can abandon them at once.
static RUNNING: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

/// Kills every running checker (a stopping process calls it: the checks waiting on them
/// then end with an error at once, instead of holding up the shutdown).
pub fn abandon_all() {
    STOPPING.store(true, std::sync::atomic::Ordering::SeqCst);
    let running = RUNNING.lock().unwrap_or_else(|p| p.into_inner()).clone();
    for pid in running {
        if let Ok(pid) = i32::try_from(pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Makes [`check`] run in child processes of `exe` from now on. The serving binaries
/// call it at start; without it (a library embedded in a test) checks run in-process,
/// unbounded.
pub fn install_checker(exe: PathBuf) {
    let _ = CHECKER.set(Checker { exe });
}

/// The installed checker, if any.
pub fn checker() -> Option<&'static Checker> {
    CHECKER.get()
}

/// What a passed check found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checked {
    /// The revision id of the folder as the child read it.
    pub revision: String,
    /// Tests run.
    pub tests: usize,
    /// How long the check took.
    pub took: Duration,
}

/// Checks `request.dir` in a child process of the installed checker under `limits`
/// (in-process and unbounded if none is installed). Blocking: call it off the async
/// workers.
pub fn check(request: &CheckRequest, limits: Limits) -> Result<Checked, PolicyError> {
    let started = Instant::now();
    let Some(checker) = checker() else {
        let mut sink = Vec::new();
        return run_checks(request, &mut sink).map(|(revision, tests)| Checked {
            revision,
            tests,
            took: started.elapsed(),
        });
    };
    let mut child = std::process::Command::new(&checker.exe)
        .arg(CHILD_ARG)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .env("NEXUS_LOG", "off")
        .spawn()
        .map_err(|e| PolicyError::Limit {
            dir: request.dir.display().to_string(),
            step: "starting the policy checker".into(),
            limit: String::new(),
            message: format!("cannot run {}: {e}", checker.exe.display()),
        })?;
    let pid = child.id();
    RUNNING.lock().unwrap_or_else(|p| p.into_inner()).push(pid);
    if let Some(mut stdin) = child.stdin.take() {
        // A child that died at once is reported from its exit below.
        let _ = serde_json::to_writer(&mut stdin, request);
        let _ = stdin.flush();
    }
    // The child's lines, read on a thread of their own so the wait below is bounded.
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<Step>();
    let reader = child.stdout.take().map(|stdout| {
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(step) = serde_json::from_str::<Step>(&line)
                    && lines_tx.send(step).is_err()
                {
                    break;
                }
            }
        })
    });
    let deadline = started + limits.timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    RUNNING
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|p| *p != pid);
    if let Some(reader) = reader {
        let _ = reader.join();
    }
    let steps: Vec<Step> = lines_rx.try_iter().collect();
    let dir = request.dir.display().to_string();
    let last = steps.last().cloned();
    let at = describe(&steps);
    match (status, last) {
        (_, Some(Step::Passed { revision, tests })) => Ok(Checked {
            revision,
            tests,
            took: started.elapsed(),
        }),
        (
            _,
            Some(Step::Refused {
                message,
                file,
                line,
                col,
            }),
        ) => Err(match (file, line, col) {
            (Some(file), Some(line), Some(col)) => PolicyError::Rego {
                location: crate::Location { file, line, col },
                message,
            },
            _ => PolicyError::RegoUnlocated(message),
        }),
        (None, _) => Err(PolicyError::Limit {
            dir,
            step: at,
            limit: format!(
                "the load time limit ({:?}; policy.load_timeout)",
                limits.timeout
            ),
            message: "did not finish: the revision is refused and the last good one keeps serving"
                .into(),
        }),
        (Some(status), _) => {
            use std::os::unix::process::ExitStatusExt;
            let limit = match status.signal() {
                Some(9) if STOPPING.load(std::sync::atomic::Ordering::SeqCst) => {
                    "the process stopping (abandoned)".into()
                }
                // An allocation past RLIMIT_AS aborts (SIGABRT); past RLIMIT_CPU the
                // kernel sends SIGXCPU, then SIGKILL.
                Some(6) => format!(
                    "the load memory limit ({} MiB; policy.load_max_memory)",
                    limits.max_memory / (1024 * 1024)
                ),
                Some(24) | Some(9) => format!(
                    "the load CPU limit ({} s; policy.load_timeout)",
                    request.max_cpu_secs
                ),
                Some(other) => format!("no limit known (signal {other})"),
                None => "no limit known (it exited without an answer)".into(),
            };
            Err(PolicyError::Limit {
                dir,
                step: at,
                limit,
                message: format!(
                    "the policy checker stopped ({status}): the revision is refused and the last good one keeps serving"
                ),
            })
        }
    }
}

/// "testing data.x.test_y (x_test.rego)" for the last step a child started.
fn describe(steps: &[Step]) -> String {
    match steps
        .iter()
        .rev()
        .find(|s| !matches!(s, Step::Passed { .. } | Step::Refused { .. }))
    {
        Some(Step::Load) => "loading the folder".into(),
        Some(Step::Test { rule, file }) => format!("running test {rule} ({file})"),
        Some(Step::Compile { rule }) => format!("compiling rule {rule}"),
        Some(Step::Evaluate { rule }) => format!("evaluating rule {rule} once"),
        _ => "starting".into(),
    }
}

fn emit(out: &mut dyn Write, step: &Step) {
    if let Ok(line) = serde_json::to_string(step) {
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

/// The checks, in order, reporting each step to `out`: load, tests, compile and one
/// evaluation per rule. Returns the revision id and the number of tests.
fn run_checks(request: &CheckRequest, out: &mut dyn Write) -> Result<(String, usize), PolicyError> {
    emit(out, &Step::Load);
    let bundle = Bundle::load(&request.dir)?;
    let mut tests = 0;
    if request.run_tests {
        let report =
            crate::testing::run_tests_observed(&bundle, false, None, &mut |rule, file| {
                emit(
                    out,
                    &Step::Test {
                        rule: rule.to_string(),
                        file: file.to_string(),
                    },
                );
            })?;
        tests = report.results.len();
        report.into_result()?;
    }
    for rule in &request.rules {
        emit(out, &Step::Compile { rule: rule.clone() });
        let policy = Policy::compile(
            &bundle,
            &regorus::Value::new_object(),
            PolicyOptions {
                decision_rule: rule.clone(),
                eval_timeout: Duration::from_millis(request.eval_timeout_ms.max(1)),
                max_instructions: request.max_instructions,
                // The check's one evaluation (an empty input) makes next to nothing.
                max_made_values: PolicyOptions::default().max_made_values,
                mode: if request.interpreted {
                    EvalMode::Interpreted
                } else {
                    EvalMode::Compiled
                },
                native: true,
            },
        )?;
        // One evaluation, as the first request would run it: a rule that never finishes
        // whatever the input shows up here and not on the request path.
        emit(out, &Step::Evaluate { rule: rule.clone() });
        let _ = policy.evaluate_value(regorus::Value::new_object());
    }
    Ok((bundle.revision, tests))
}

/// The child: reads a [`CheckRequest`] on stdin, limits itself, checks, writes steps on
/// stdout. Returns the exit code (0 whether the revision passed or not: the last line
/// says which; anything else is a crash).
pub fn child_main() -> std::process::ExitCode {
    let mut input = String::new();
    if std::io::Read::read_to_string(&mut std::io::stdin().lock(), &mut input).is_err() {
        return std::process::ExitCode::from(2);
    }
    let Ok(request) = serde_json::from_str::<CheckRequest>(&input) else {
        return std::process::ExitCode::from(2);
    };
    // Dies with the parent: a checker must never outlive the process that waits for it.
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    if std::os::unix::process::parent_id() != request.parent {
        return std::process::ExitCode::from(3);
    }
    use nix::sys::resource::{Resource, setrlimit};
    let _ = setrlimit(Resource::RLIMIT_AS, request.max_memory, request.max_memory);
    let _ = setrlimit(
        Resource::RLIMIT_CPU,
        request.max_cpu_secs,
        request.max_cpu_secs + 1,
    );
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let step = match run_checks(&request, &mut out) {
        Ok((revision, tests)) => Step::Passed { revision, tests },
        Err(error) => {
            let location = error.location().cloned();
            Step::Refused {
                message: match &location {
                    Some(_) => match &error {
                        PolicyError::Rego { message, .. } => message.clone(),
                        other => other.to_string(),
                    },
                    None => error.to_string(),
                },
                file: location.as_ref().map(|l| l.file.clone()),
                line: location.as_ref().map(|l| l.line),
                col: location.as_ref().map(|l| l.col),
            }
        }
    };
    emit(&mut out, &step);
    std::process::ExitCode::SUCCESS
}

/// What a folder watcher compares between rounds: every file's path, size, modification
/// and change time (ctime moves on every write, even when a tool restores the mtime).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fingerprint(Vec<(PathBuf, u64, Option<std::time::SystemTime>, i64, i64)>);

/// The fingerprint of `dir` now (an unreadable folder has an empty one).
pub fn fingerprint(dir: &Path) -> Fingerprint {
    fn walk(dir: &Path, out: &mut Vec<(PathBuf, u64, Option<std::time::SystemTime>, i64, i64)>) {
        use std::os::unix::fs::MetadataExt;
        let Ok(read) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in read.flatten() {
            let path = entry.path();
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                walk(&path, out);
            } else {
                out.push((
                    path,
                    meta.len(),
                    meta.modified().ok(),
                    meta.ctime(),
                    meta.ctime_nsec(),
                ));
            }
        }
    }
    let mut entries = Vec::new();
    walk(dir, &mut entries);
    entries.sort();
    Fingerprint(entries)
}

/// A request for `dir` with the limits of `limits`.
pub fn request(
    dir: &Path,
    rules: Vec<String>,
    run_tests: bool,
    options: &PolicyOptions,
    limits: Limits,
) -> CheckRequest {
    CheckRequest {
        dir: dir.to_path_buf(),
        rules,
        run_tests,
        interpreted: options.mode == EvalMode::Interpreted,
        eval_timeout_ms: u64::try_from(options.eval_timeout.as_millis()).unwrap_or(u64::MAX),
        max_instructions: options.max_instructions,
        max_memory: limits.max_memory,
        max_cpu_secs: limits.timeout.as_secs().max(1) + 1,
        parent: std::process::id(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_process_without_a_checker_reports_tests_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("p.rego"),
            "package x\n\nimport rego.v1\n\ndecision := {\"allow\": true}\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("p_test.rego"),
            "package x_test\n\nimport rego.v1\n\ntest_ok if data.x.decision.allow\n",
        )
        .unwrap();
        let limits = Limits {
            timeout: Duration::from_secs(10),
            max_memory: 1 << 30,
        };
        let req = request(
            dir.path(),
            vec!["data.x.decision".into()],
            true,
            &PolicyOptions::default(),
            limits,
        );
        let checked = check(&req, limits).unwrap();
        assert_eq!(checked.tests, 1);
        assert!(checked.revision.starts_with("sha256:"));
        let bad = CheckRequest {
            rules: vec!["data.x.nope".into()],
            ..req
        };
        assert!(check(&bad, limits).is_err());
    }

    #[test]
    fn the_last_step_is_named() {
        let steps = vec![
            Step::Load,
            Step::Test {
                rule: "data.x_test.test_spin".into(),
                file: "p_test.rego".into(),
            },
        ];
        assert_eq!(
            describe(&steps),
            "running test data.x_test.test_spin (p_test.rego)"
        );
    }
}
