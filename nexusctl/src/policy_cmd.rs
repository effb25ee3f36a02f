//! `nexusctl policy test|eval|check`: author and test policies like OPA, with the same
//! engine the sidecar embeds.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use nexus_policy::{Bundle, EvalMode, Policy, PolicyOptions, Value};

/// `nexusctl policy ...`
#[derive(clap::Subcommand, Debug)]
pub enum PolicyCommand {
    /// Run the `test_*` rules of every `*_test.rego` (exit 1 if any fails).
    Test(TestArgs),
    /// Evaluate the decision rule for an input (or a JSON-lines file of inputs).
    Eval(EvalArgs),
    /// Compile a policy folder and report errors with file:line:col (exit 1 on error),
    /// and warn where nexus would decide otherwise than OPA (`--strict`: exit 1 too).
    Check(CheckArgs),
}

/// `nexusctl policy test`
#[derive(clap::Args, Debug)]
pub struct TestArgs {
    /// Policy folder.
    #[arg(default_value = "policies")]
    pub dir: PathBuf,
    /// Report line coverage of the non-test modules.
    #[arg(long)]
    pub coverage: bool,
    /// Only tests whose full name contains this.
    #[arg(long)]
    pub run: Option<String>,
    /// Print every test, not only failures.
    #[arg(long, short)]
    pub verbose: bool,
}

/// `nexusctl policy eval`
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// Policy folder.
    #[arg(long, default_value = "policies")]
    pub dir: PathBuf,
    /// Input document (JSON file, `-` for stdin).
    #[arg(long, conflicts_with = "inputs")]
    pub input: Option<PathBuf>,
    /// JSON lines, one input per line; prints one decision per line.
    #[arg(long)]
    pub inputs: Option<PathBuf>,
    /// Extra data (JSON or YAML) merged over the folder's data, like the sidecar's
    /// runtime data: e.g. {"nexus": {"executions": {...}, "revoked": {...}}}.
    #[arg(long)]
    pub data: Vec<PathBuf>,
    /// The decision rule.
    #[arg(long, default_value = "data.nexus.authz.decision")]
    pub rule: String,
    /// Also print every rule of the decision's package, to see why.
    #[arg(long)]
    pub explain: bool,
    /// The engine mode: `auto` is the sidecar's default (nexus's own evaluator when it
    /// takes the rule and agrees with the interpreter, else the RVM unless the rule needs
    /// the interpreter or the RVM disagreed with it), `rvm` keeps nexus's evaluator off,
    /// `interpreted` forces the interpreter.
    #[arg(long, value_enum, default_value_t = ModeArg::Auto)]
    pub mode: ModeArg,
    /// Print the rule's value itself (`{"value": ...}`, `{"undefined": true}` or
    /// `{"error": ...}`) instead of an allow/deny decision: for rules that are not
    /// decisions, and for comparing with `opa eval`.
    #[arg(long)]
    pub value: bool,
}

/// `--mode`
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModeArg {
    /// As the sidecar decides.
    Auto,
    /// regorus's RVM only (nexus's own evaluator off).
    Rvm,
    /// regorus's interpreter.
    Interpreted,
}

/// `nexusctl policy check`
#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// Policy folder.
    #[arg(default_value = "policies")]
    pub dir: PathBuf,
    /// The decision rule that must exist.
    #[arg(long, default_value = "data.nexus.authz.decision")]
    pub rule: String,
    /// Treat OPA-compatibility warnings as errors (exit 1), for CI.
    #[arg(long)]
    pub strict: bool,
}

/// Runs a policy subcommand.
pub fn run(command: PolicyCommand) -> anyhow::Result<()> {
    match command {
        PolicyCommand::Test(args) => test(args),
        PolicyCommand::Eval(args) => eval(args),
        PolicyCommand::Check(args) => check(args),
    }
}

fn load(dir: &Path) -> anyhow::Result<Bundle> {
    Bundle::load(dir).map_err(|e| anyhow::anyhow!("{e}"))
}

fn test(args: TestArgs) -> anyhow::Result<()> {
    let bundle = load(&args.dir)?;
    let report = nexus_policy::testing::run_tests(&bundle, args.coverage, args.run.as_deref())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut out = std::io::stdout().lock();
    for result in &report.results {
        if !result.passed {
            writeln!(
                out,
                "FAIL {} ({})\n     {}",
                result.name,
                result.file,
                result.failure.as_deref().unwrap_or("")
            )?;
        } else if args.verbose {
            writeln!(out, "PASS {} ({:?})", result.name, result.duration)?;
        }
    }
    let failed = report.failed().count();
    let passed = report.results.len() - failed;
    if args.coverage {
        writeln!(out, "coverage:")?;
        for file in &report.coverage {
            let missing: Vec<String> = file.not_covered.iter().map(u32::to_string).collect();
            writeln!(
                out,
                "  {:6.1}%  {}{}",
                file.percent(),
                file.file,
                if missing.is_empty() {
                    String::new()
                } else {
                    format!("  (lines not covered: {})", missing.join(","))
                }
            )?;
        }
    }
    writeln!(out, "{passed} passed, {failed} failed")?;
    if report.results.is_empty() {
        bail!("no test_ rules found in {}", args.dir.display());
    }
    if failed > 0 {
        bail!("{failed} policy test(s) failed");
    }
    Ok(())
}

fn read_value(path: &Path) -> anyhow::Result<Value> {
    let text = if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin())?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?
    };
    let name = path.to_string_lossy();
    if name.ends_with(".yaml") || name.ends_with(".yml") {
        // YAML 1.1, as `opa eval -i`/`-d` read it.
        nexus_policy::builtins::yaml::to_value(&text)
            .map_err(|e| anyhow::anyhow!("{}: {e:#}", path.display()))
    } else {
        serde_json::from_str::<Value>(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }
}

/// One evaluation's output line: a decision, or (`--value`) the rule's value.
fn eval_line(policy: &Policy, input: Value, value: bool) -> serde_json::Value {
    if value {
        return match policy.evaluate_value(input) {
            Ok(Value::Undefined) => serde_json::json!({"undefined": true}),
            Ok(v) => match serde_json::to_value(&v) {
                Ok(json) => serde_json::json!({"value": json}),
                Err(e) => {
                    serde_json::json!({"error": format!("the value cannot be written as JSON: {e}")})
                }
            },
            Err(e) => serde_json::json!({"error": e}),
        };
    }
    let decision = policy.evaluate(input);
    serde_json::json!({"allow": decision.allow, "reasons": decision.reasons, "error": decision.error})
}

fn eval(args: EvalArgs) -> anyhow::Result<()> {
    let bundle = load(&args.dir)?;
    let mut runtime = Value::new_object();
    for file in &args.data {
        let value = read_value(file)?;
        runtime = merge_over(runtime, value);
    }
    let options = PolicyOptions {
        decision_rule: args.rule.clone(),
        mode: match args.mode {
            ModeArg::Auto | ModeArg::Rvm => EvalMode::Compiled,
            ModeArg::Interpreted => EvalMode::Interpreted,
        },
        native: matches!(args.mode, ModeArg::Auto),
        ..PolicyOptions::default()
    };
    let policy = Policy::compile(&bundle, &runtime, options).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut out = std::io::stdout().lock();
    if let Some(inputs) = &args.inputs {
        let file = std::fs::File::open(inputs)
            .with_context(|| format!("cannot read {}", inputs.display()))?;
        let mut failed = 0usize;
        let mut unreadable = 0usize;
        for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line.with_context(|| format!("{}:{}", inputs.display(), n + 1))?;
            if line.trim().is_empty() {
                continue;
            }
            // One bad line (not JSON, or an input that breaks the engine) is reported
            // with its line number; the batch goes on.
            let result = match serde_json::from_str::<Value>(&line) {
                Ok(input) => eval_line(&policy, input, args.value),
                Err(e) => {
                    unreadable += 1;
                    serde_json::json!({"allow": false, "error": format!("not a JSON input: {e}")})
                }
            };
            if let Some(error) = result.get("error").and_then(|e| e.as_str()) {
                failed += 1;
                eprintln!("{}:{}: {error}", inputs.display(), n + 1);
            }
            writeln!(out, "{result}")?;
        }
        if failed > 0 {
            eprintln!("{failed} input(s) gave an error (denied); see the lines above");
        }
        if unreadable > 0 {
            bail!(
                "{unreadable} line(s) of {} are not JSON inputs",
                inputs.display()
            );
        }
        return Ok(());
    }
    let input_path = args.input.clone().unwrap_or_else(|| PathBuf::from("-"));
    let input = read_value(&input_path)?;
    if args.value {
        writeln!(out, "{}", eval_line(&policy, input, true))?;
        return Ok(());
    }
    let decision = policy.evaluate(input.clone());
    let doc = serde_json::json!({
        "allow": decision.allow,
        "reasons": decision.reasons,
        "error": decision.error,
        "revision": policy.revision(),
        "mode": format!("{:?}", policy.mode()).to_lowercase(),
    });
    writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
    if args.explain {
        let package = args
            .rule
            .rsplit_once('.')
            .map(|(p, _)| p)
            .unwrap_or(&args.rule);
        let mut engine =
            nexus_policy::engine_for(&bundle, false).map_err(|e| anyhow::anyhow!("{e}"))?;
        engine
            .add_data(runtime)
            .map_err(|e| anyhow::anyhow!("{e:#}"))?;
        engine.set_input(input);
        let results = engine
            .eval_query(package.to_string(), false)
            .map_err(|e| anyhow::anyhow!("{e:#}"))?;
        writeln!(out, "\nexplain: every rule of {package} for this input")?;
        for result in results.result {
            for expr in result.expressions {
                writeln!(out, "{}", expr.value.to_json_str().unwrap_or_default())?;
            }
        }
    }
    Ok(())
}

fn merge_over(base: Value, over: Value) -> Value {
    let mut base = base;
    if let (Ok(map), Ok(over_map)) = (base.as_object_mut(), over.as_object()) {
        for (k, v) in over_map.iter() {
            let merged = match map.get_mut(k) {
                Some(existing) if existing.as_object().is_ok() && v.as_object().is_ok() => {
                    merge_over(existing.clone(), v.clone())
                }
                _ => v.clone(),
            };
            map.insert(k.clone(), merged);
        }
    }
    base
}

fn check(args: CheckArgs) -> anyhow::Result<()> {
    let bundle = load(&args.dir)?;
    // Before compiling: some findings (a recursive rule) would crash the compiler.
    let findings = nexus_policy::compat::check(&bundle);
    let errors = findings
        .iter()
        .filter(|f| args.strict || f.severity == nexus_policy::compat::Severity::Error)
        .count();
    for finding in &findings {
        let line = finding.to_string();
        if args.strict {
            eprintln!("{}", line.replacen(": warning: ", ": error: ", 1));
        } else {
            eprintln!("{line}");
        }
    }
    if findings
        .iter()
        .any(|f| f.severity == nexus_policy::compat::Severity::Error)
    {
        bail!(
            "{errors} OPA-compatibility error(s) in {} (see above)",
            args.dir.display()
        );
    }
    // Tests must compile too, though they are not run here.
    nexus_policy::engine_for(&bundle, true).map_err(|e| anyhow::anyhow!("{e}"))?;
    let options = PolicyOptions {
        decision_rule: args.rule.clone(),
        ..PolicyOptions::default()
    };
    let policy = Policy::compile(&bundle, &Value::new_object(), options)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    crate::outln!(
        "{}: {} module(s), {} test module(s), decision rule {} compiles ({} mode); revision {}; \
         {} OPA-compatibility warning(s)",
        args.dir.display(),
        bundle.modules.len(),
        bundle.tests.len(),
        args.rule,
        format!("{:?}", policy.mode()).to_lowercase(),
        policy.revision(),
        findings.len()
    );
    // Which mode the rule runs in and why: the constructs that keep it off the RVM
    // (file:line), or the input on which the RVM disagreed with the interpreter.
    let report = policy.report();
    println!("mode: {}", report.summary());
    // Why nexus's own evaluator does not take the rule (a construct at its line, or a
    // disagreement with the interpreter), when it was tried.
    if let Some(why) = report.native_summary() {
        println!("  {why}");
    }
    for reason in &report.routed {
        println!("  interpreter because of {reason}");
    }
    if report.guarded_assignments + report.guarded_comprehensions > 0
        || !report.host_builtins.is_empty()
    {
        println!(
            "  compiled with {} `:=`, {} comprehension and {} negation guard(s){}",
            report.guarded_assignments,
            report.guarded_comprehensions,
            report.guarded_negations,
            if report.host_builtins.is_empty() {
                String::new()
            } else {
                format!(
                    "; nexus builtins called back: {}",
                    report.host_builtins.join(", ")
                )
            }
        );
    }
    // Whether the sidecar's decision cache can key this rule (docs/policy-cache.md).
    match policy.cache_plan() {
        Ok(plan) => println!(
            "cache: keyed on {}{}",
            plan.describe().join(", "),
            if plan.time_bounded {
                "; entries expire at the next stored time input.time_ns is compared with"
            } else {
                ""
            }
        ),
        Err(why) => println!("cache: off for this revision: {why}"),
    }
    if errors > 0 {
        bail!(
            "{errors} OPA-compatibility warning(s) in {} are errors with --strict",
            args.dir.display()
        );
    }
    Ok(())
}
