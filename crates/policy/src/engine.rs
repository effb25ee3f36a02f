//! One compiled policy revision and its per-request evaluation.
//!
//! The revision is compiled once (regorus `CompiledPolicy`, then an RVM program for the
//! decision rule). Evaluation takes `&self`: each call runs on a fresh VM that shares the
//! program and data by `Arc`, so the request path holds no lock. Runtime data (open
//! executions, revocations) is swapped without recompiling. Undefined, a malformed
//! result, an error, a timeout or the instruction limit all give a deny.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use regorus::rvm::{Program, RegoVM};
use regorus::utils::limits::ExecutionTimerConfig;
use regorus::{CompiledPolicy, Engine, Value};

use crate::bundle::Bundle;
use crate::error::PolicyError;

/// How a revision is evaluated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EvalMode {
    /// regorus's RVM (compiled bytecode); the default.
    #[default]
    Compiled,
    /// regorus's tree-walking interpreter.
    Interpreted,
}

/// Limits and the rule to evaluate.
#[derive(Clone, Debug)]
pub struct PolicyOptions {
    /// The decision rule, e.g. `data.nexus.authz.decision`.
    pub decision_rule: String,
    /// Wall-clock limit of one evaluation.
    pub eval_timeout: Duration,
    /// Instruction limit of one evaluation (compiled mode).
    pub max_instructions: usize,
    /// Engine mode.
    pub mode: EvalMode,
}

impl Default for PolicyOptions {
    fn default() -> Self {
        Self {
            decision_rule: "data.nexus.authz.decision".into(),
            eval_timeout: Duration::from_millis(250),
            max_instructions: 1_000_000,
            mode: EvalMode::Compiled,
        }
    }
}

/// The outcome of one evaluation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request may pass.
    pub allow: bool,
    /// Reasons from the policy, or why the sidecar denied without one.
    pub reasons: Vec<String>,
    /// Set when evaluation failed (error, timeout, limit, undefined): always a deny.
    pub error: Option<String>,
}

impl Decision {
    fn deny_because(error: String) -> Self {
        Self {
            allow: false,
            reasons: vec![error.clone()],
            error: Some(error),
        }
    }
}

/// A compiled revision, ready to evaluate.
pub struct Policy {
    revision: String,
    options: PolicyOptions,
    compiled: CompiledPolicy,
    program: Option<Arc<Program>>,
    bundle_data: Value,
    data: Value,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("revision", &self.revision)
            .field("rule", &self.options.decision_rule)
            .finish()
    }
}

/// A fresh engine holding `bundle`'s modules (and, if `with_tests`, its tests) and data.
pub fn engine_for(bundle: &Bundle, with_tests: bool) -> Result<Engine, PolicyError> {
    engine_with_data(bundle, with_tests, &bundle.data)
}

fn engine_with_data(
    bundle: &Bundle,
    with_tests: bool,
    data: &Value,
) -> Result<Engine, PolicyError> {
    let mut engine = Engine::new();
    // Every engine sees nexus's builtins (io.jwt.*, crypto.*, net.cidr_*): evaluation,
    // `nexusctl policy test` and `eval` alike.
    crate::builtins::register(&mut engine)?;
    let modules = bundle.modules.iter().chain(if with_tests {
        bundle.tests.iter()
    } else {
        [].iter()
    });
    for module in modules {
        engine
            .add_policy(module.path.clone(), module.text.clone())
            .map_err(|e| PolicyError::from_regorus(&e))?;
    }
    engine
        .add_data(data.clone())
        .map_err(|e| PolicyError::Data {
            file: bundle.root.display().to_string(),
            message: format!("{e:#}"),
        })?;
    Ok(engine)
}

impl Policy {
    /// Compiles `bundle` for `options.decision_rule`, with `runtime` data (e.g.
    /// `{"nexus": {"executions": ..., "revoked": ...}}`) merged over the bundle's.
    pub fn compile(
        bundle: &Bundle,
        runtime: &Value,
        options: PolicyOptions,
    ) -> Result<Self, PolicyError> {
        // Constructs that crash or always fail in the engine (recursive rules overflow
        // regorus's stack and abort the process) are refused before compiling.
        if let Some(fatal) = crate::compat::check(bundle)
            .into_iter()
            .find(|f| f.severity == crate::compat::Severity::Error)
        {
            return Err(PolicyError::Rego {
                message: format!("{}: {}", fatal.construct, fatal.nexus),
                location: fatal.location,
            });
        }
        let mut options = options;
        // regorus's RVM calls no extension (nexus builtins) and gets some constructs
        // wrong: such a revision is evaluated by the interpreter (logged once per
        // revision: a runtime-data update recompiles in the mode already chosen).
        if options.mode == EvalMode::Compiled {
            let reasons = crate::compat::interpreter_reasons(bundle);
            if !reasons.is_empty() {
                tracing::info!(
                    revision = %bundle.revision,
                    because = %reasons.join(", "),
                    "the policy uses what regorus's compiled mode (RVM) lacks or gets wrong; \
                     this revision is evaluated by the interpreter"
                );
                options.mode = EvalMode::Interpreted;
            }
        }
        // The interpreter evaluates with the data compiled in, so it needs the runtime
        // data now; the VM gets data per evaluation, so its program is data-independent.
        let data = with_runtime(&bundle.data, runtime);
        let mut engine = engine_with_data(bundle, false, &data)?;
        engine.set_execution_timer_config(timer(options.eval_timeout));
        let rule: regorus::Rc<str> = options.decision_rule.as_str().into();
        let compiled = engine.compile_with_entrypoint(&rule).map_err(|e| {
            let error = PolicyError::from_regorus(&e);
            match error {
                PolicyError::RegoUnlocated(message) => PolicyError::NoDecisionRule {
                    rule: options.decision_rule.clone(),
                    message,
                },
                other => other,
            }
        })?;
        let program = match options.mode {
            EvalMode::Compiled => Some(
                regorus::languages::rego::compiler::Compiler::compile_from_policy(
                    &compiled,
                    &[rule.as_ref()],
                )
                .map_err(|e| {
                    PolicyError::RegoUnlocated(format!("compiling {}: {e}", options.decision_rule))
                })?,
            ),
            EvalMode::Interpreted => None,
        };
        let mut policy = Self {
            revision: bundle.revision.clone(),
            options,
            compiled,
            program,
            bundle_data: bundle.data.clone(),
            data: bundle.data.clone(),
        };
        policy.set_runtime_data(runtime);
        Ok(policy)
    }

    /// The same revision with other runtime data, without recompiling (compiled mode).
    pub fn with_runtime_data(&self, bundle: &Bundle, runtime: &Value) -> Result<Self, PolicyError> {
        match self.options.mode {
            EvalMode::Compiled => {
                let mut next = Self {
                    revision: self.revision.clone(),
                    options: self.options.clone(),
                    compiled: self.compiled.clone(),
                    program: self.program.clone(),
                    bundle_data: self.bundle_data.clone(),
                    data: Value::Null,
                };
                next.set_runtime_data(runtime);
                Ok(next)
            }
            EvalMode::Interpreted => Self::compile(bundle, runtime, self.options.clone()),
        }
    }

    fn set_runtime_data(&mut self, runtime: &Value) {
        self.data = with_runtime(&self.bundle_data, runtime);
    }

    /// The revision id (a hash of the folder's files).
    pub fn revision(&self) -> &str {
        &self.revision
    }

    /// How this revision is evaluated: the requested mode, or the interpreter when the
    /// revision needs it (`compat::interpreter_reasons`).
    pub fn mode(&self) -> EvalMode {
        self.options.mode
    }

    /// The decision rule.
    pub fn rule(&self) -> &str {
        &self.options.decision_rule
    }

    /// The data document the policy sees.
    pub fn data(&self) -> &Value {
        &self.data
    }

    /// Evaluates the decision rule for `input`.
    pub fn evaluate(&self, input: Value) -> Decision {
        match self.evaluate_value(input) {
            Ok(value) => decision_from(&value),
            Err(error) => Decision::deny_because(error),
        }
    }

    /// Evaluates the decision rule for `input` and returns its value as is (for rules
    /// whose answer is not an allow/deny decision, such as the gateway's revocation
    /// policy). Errors, the time limit and the instruction limit are `Err`.
    pub fn evaluate_value(&self, input: Value) -> Result<Value, String> {
        let started = Instant::now();
        let result = match &self.program {
            Some(program) => {
                let mut vm = RegoVM::new_with_policy(self.compiled.clone());
                vm.load_program(program.clone());
                vm.set_max_instructions(self.options.max_instructions);
                vm.set_execution_timer_config(Some(timer(self.options.eval_timeout)));
                match vm.set_data(self.data.clone()) {
                    Ok(()) => {
                        vm.set_input(input);
                        vm.execute().map_err(|e| e.to_string())
                    }
                    Err(e) => Err(e.to_string()),
                }
            }
            None => {
                // A compiled policy's interpreter takes its time limit from regorus's
                // process-wide fallback; every policy of a sidecar shares eval_timeout.
                regorus::utils::limits::set_fallback_execution_timer_config(Some(timer(
                    self.options.eval_timeout,
                )));
                self.compiled
                    .eval_with_input(input)
                    .map_err(|e| format!("{e:#}"))
            }
        };
        // The VM and the interpreter check the clock between instructions; a single
        // builtin call (e.g. numbers.range over a huge span) cannot be interrupted, so
        // its result is refused here once it overran.
        let elapsed = started.elapsed();
        if elapsed > self.options.eval_timeout {
            return Err(format!(
                "policy evaluation failed: exceeded the time limit ({elapsed:?} > {:?})",
                self.options.eval_timeout
            ));
        }
        result.map_err(|error| format!("policy evaluation failed: {error}"))
    }

    /// Evaluates and measures.
    pub fn evaluate_timed(&self, input: Value) -> (Decision, Duration) {
        let start = Instant::now();
        let decision = self.evaluate(input);
        (decision, start.elapsed())
    }
}

/// The bundle's data with the runtime data laid over it (runtime keys win).
fn with_runtime(bundle_data: &Value, runtime: &Value) -> Value {
    let mut data = bundle_data.clone();
    overlay(&mut data, runtime);
    data
}

fn timer(limit: Duration) -> ExecutionTimerConfig {
    ExecutionTimerConfig {
        limit,
        check_interval: NonZeroU32::new(64).unwrap_or(NonZeroU32::MIN),
    }
}

/// Replaces, key by key, `dst`'s values with `src`'s, descending into objects that both
/// have; unlike `merge`, a conflict means "runtime wins".
fn overlay(dst: &mut Value, src: &Value) {
    let Ok(src_map) = src.as_object() else { return };
    let Ok(dst_map) = dst.as_object_mut() else {
        return;
    };
    for (k, v) in src_map.iter() {
        match dst_map.get_mut(k) {
            Some(existing) if existing.as_object().is_ok() && v.as_object().is_ok() => {
                overlay(existing, v)
            }
            _ => {
                dst_map.insert(k.clone(), v.clone());
            }
        }
    }
}

/// Interprets the decision rule's value: `{"allow": bool, "reasons": [...]}`.
pub fn decision_from(value: &Value) -> Decision {
    if *value == Value::Undefined {
        return Decision::deny_because("policy decision is undefined".into());
    }
    let allow = match value["allow"].as_bool() {
        Ok(b) => *b,
        Err(_) => {
            return Decision::deny_because(format!(
                "policy decision has no boolean `allow`: {}",
                value.to_json_str().unwrap_or_default()
            ));
        }
    };
    let reasons = match &value["reasons"] {
        Value::Array(items) => items.iter().map(reason_text).collect(),
        Value::Set(items) => items.iter().map(reason_text).collect(),
        Value::Undefined | Value::Null => Vec::new(),
        other => vec![reason_text(other)],
    };
    Decision {
        allow,
        reasons,
        error: None,
    }
}

fn reason_text(v: &Value) -> String {
    match v.as_string() {
        Ok(s) => s.to_string(),
        Err(_) => v.to_json_str().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::Module;

    fn bundle() -> Bundle {
        Bundle::from_modules(
            vec![Module {
                path: "p.rego".into(),
                text: "package nexus.authz\n\ndefault allow := false\n\nallow if data.nexus.executions[input.id].open\n\ndecision := {\"allow\": allow, \"reasons\": [\"r\"]}\n".into(),
            }],
            Value::from(serde_json::json!({"nexus": {"bindings": {}}})),
        )
    }

    fn runtime(open: bool) -> Value {
        Value::from(serde_json::json!({"nexus": {"executions": {"ex-1": {"open": open}}}}))
    }

    #[test]
    fn both_modes_see_runtime_data_and_its_updates() {
        let bundle = bundle();
        let input = Value::from(serde_json::json!({"id": "ex-1"}));
        for mode in [EvalMode::Compiled, EvalMode::Interpreted] {
            let options = PolicyOptions {
                mode,
                ..PolicyOptions::default()
            };
            let policy = Policy::compile(&bundle, &runtime(true), options).unwrap();
            assert!(policy.evaluate(input.clone()).allow, "{mode:?}");
            let closed = policy.with_runtime_data(&bundle, &runtime(false)).unwrap();
            assert!(!closed.evaluate(input.clone()).allow, "{mode:?}");
        }
    }

    #[test]
    fn undefined_error_and_malformed_decisions_deny() {
        let bundle = Bundle::from_modules(
            vec![Module {
                path: "p.rego".into(),
                text: "package x\n\nundefined_rule if input.never\n\nbad := {\"allow\": \"yes\"}\n\nerr := {\"allow\": true, \"n\": 1 / input.zero}\n\nloop := {\"allow\": true, \"reasons\": [n | some n in numbers.range(1, 1000000); m := n * 2]}\n".into(),
            }],
            Value::new_object(),
        );
        for (rule, expected) in [
            ("data.x.undefined_rule", "undefined"),
            ("data.x.bad", "boolean"),
            // A builtin error: the RVM gives undefined (as OPA does without strict builtin
            // errors), the interpreter an error; both deny.
            ("data.x.err", "d"),
            ("data.x.loop", "failed"),
        ] {
            for mode in [EvalMode::Compiled, EvalMode::Interpreted] {
                let options = PolicyOptions {
                    decision_rule: rule.into(),
                    eval_timeout: Duration::from_millis(20),
                    mode,
                    ..PolicyOptions::default()
                };
                let policy = Policy::compile(&bundle, &Value::new_object(), options).unwrap();
                let start = Instant::now();
                let d = policy.evaluate(Value::from(serde_json::json!({"zero": 0})));
                assert!(!d.allow, "{rule} {mode:?}");
                assert!(
                    d.reasons[0].contains(expected),
                    "{rule} {mode:?}: {:?}",
                    d.reasons
                );
                assert!(
                    start.elapsed() < Duration::from_secs(2),
                    "{rule} {mode:?} took {:?}",
                    start.elapsed()
                );
            }
        }
    }
}
