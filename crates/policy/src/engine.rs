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

use regorus::rvm::vm::{ExecutionMode, ExecutionState, SuspendReason};
use regorus::rvm::{Program, RegoVM};
use regorus::utils::limits::ExecutionTimerConfig;
use regorus::{CompiledPolicy, Engine, Value};
use smallvec::SmallVec;

use crate::bundle::Bundle;
use crate::cache::{DecisionCache, KeyPlan, Looked};
use crate::error::PolicyError;
use crate::routing::RouteReason;
use crate::verify::{Verification, VerifyOptions};

/// How a revision is evaluated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EvalMode {
    /// regorus's RVM (compiled bytecode); the default.
    #[default]
    Compiled,
    /// regorus's tree-walking interpreter.
    Interpreted,
    /// nexus's own evaluator (`native`), with the RVM for the inputs it hands on: never
    /// asked for, chosen for a compiled revision whose decision rule it takes and whose
    /// answers matched the interpreter's.
    Native,
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
    /// Values (strings, arrays, objects...) one evaluation by nexus's own evaluator may
    /// make; it keeps them to its end, so an evaluation that would make more (a loop
    /// making a value per iteration) is handed to the RVM. Default 4096.
    pub max_made_values: usize,
    /// Engine mode.
    pub mode: EvalMode,
    /// In compiled mode, serve with nexus's own evaluator when the decision rule is
    /// within what it takes and it agrees with the interpreter (on by default).
    pub native: bool,
}

impl Default for PolicyOptions {
    fn default() -> Self {
        Self {
            decision_rule: "data.nexus.authz.decision".into(),
            eval_timeout: Duration::from_millis(250),
            max_instructions: 1_000_000,
            max_made_values: crate::native::MAX_MADE,
            mode: EvalMode::Compiled,
            native: true,
        }
    }
}

/// The outcome of one evaluation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request may pass.
    pub allow: bool,
    /// Reasons from the policy, or why the sidecar denied without one. Shared: a
    /// decision answered from the cache, and the request's record of it, hold the same
    /// reasons rather than copies.
    pub reasons: Arc<[String]>,
    /// Set when evaluation failed (error, timeout, limit, undefined): always a deny.
    pub error: Option<String>,
}

impl Decision {
    fn deny_because(error: String) -> Self {
        Self {
            allow: false,
            reasons: Arc::from([error.clone()]),
            error: Some(error),
        }
    }
}

/// Which mode a revision's decision rule runs in, and why: inspectable by operators
/// (`nexusctl policy check`) and by tools.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModeReport {
    /// The mode asked for (configuration).
    pub requested: EvalMode,
    /// The mode the rule actually runs in.
    pub mode: EvalMode,
    /// Constructs that keep the rule off the RVM (each with file:line and the rule
    /// holding it); only rules the decision rule depends on count.
    pub routed: Vec<RouteReason>,
    /// The RVM could not compile the policy (its message); the interpreter serves.
    pub rvm_error: Option<String>,
    /// `x := E` assignments rewritten so the RVM fails on an undefined `E` (`rewrite`).
    pub guarded_assignments: usize,
    /// Comprehension heads guarded against undefined elements (`rewrite`).
    pub guarded_comprehensions: usize,
    /// Negations whose arguments are evaluated first, as OPA does (`rewrite`).
    pub guarded_negations: usize,
    /// Builtins the RVM calls back into nexus for (nexus's own and its replacements).
    pub host_builtins: Vec<String>,
    /// The RVM checked against the interpreter before serving (None: not checked).
    pub verification: Option<Verification>,
    /// Why the rule is not evaluated by nexus's own evaluator (the construct and its
    /// line, or its disagreement with the interpreter); None when it is, or when it was
    /// not tried (interpreted mode, or `native` off).
    pub native_refused: Option<String>,
    /// nexus's own evaluator (with the RVM for what it hands on) checked against the
    /// interpreter before serving.
    pub native_verification: Option<Verification>,
}

impl ModeReport {
    /// One line: the mode and, when it is not the one asked for, why.
    pub fn summary(&self) -> String {
        let mode = format!("{:?}", self.mode).to_lowercase();
        if self.mode == EvalMode::Native {
            let checked = self.native_verification.as_ref().map_or_else(String::new, |v| {
                format!(
                    "checked against the interpreter on {} input(s): {} from tests, {} generated, {} recent{}; ",
                    v.checked,
                    v.from_tests,
                    v.generated,
                    v.sampled,
                    if v.budget_exhausted {
                        "; time budget reached"
                    } else {
                        ""
                    }
                )
            });
            return format!(
                "native ({checked}nexus's evaluator, with regorus's RVM for the inputs it hands on)"
            );
        }
        if self.mode == self.requested {
            match (&self.verification, self.mode) {
                (Some(v), EvalMode::Compiled) => format!(
                    "{mode} (checked against the interpreter on {} input(s): {} from tests, {} generated, {} recent{})",
                    v.checked,
                    v.from_tests,
                    v.generated,
                    v.sampled,
                    if v.budget_exhausted {
                        "; time budget reached"
                    } else {
                        ""
                    }
                ),
                _ => mode,
            }
        } else if let Some(d) = self
            .verification
            .as_ref()
            .and_then(|v| v.disagreement.as_ref())
        {
            format!(
                "{mode}: the compiled program disagreed with the interpreter on {} {}: compiled {}, interpreted {}",
                d.source, d.input, d.compiled, d.interpreted
            )
        } else if let Some(e) = &self.rvm_error {
            format!("{mode}: the RVM cannot compile this policy: {e}")
        } else {
            let why: Vec<String> = self.routed.iter().map(ToString::to_string).collect();
            format!("{mode}: {}", why.join("; "))
        }
    }
}

/// The part of `summary` saying why the rule is not native, if it was tried.
impl ModeReport {
    /// Why nexus's own evaluator does not serve the rule, when it was tried.
    pub fn native_summary(&self) -> Option<String> {
        self.native_refused
            .as_ref()
            .map(|why| format!("not native: {why}"))
    }
}

/// The RVM side of a revision.
struct Rvm {
    compiled: CompiledPolicy,
    program: Arc<Program>,
    /// The program calls nexus builtins (HostAwait): it runs suspendable.
    host: bool,
}

/// A compiled revision, ready to evaluate.
pub struct Policy {
    revision: String,
    options: PolicyOptions,
    /// The interpreter: an engine holding the modules and the data, cloned per
    /// evaluation (regorus's `CompiledPolicy` interpreter fails on `with`).
    interpreter: Engine,
    rvm: Option<Arc<Rvm>>,
    /// nexus's own evaluator, when it serves this revision (`native`).
    native: Option<Arc<crate::native::Program>>,
    /// Hash indexes of the data objects `native` looks keys up in (per data revision).
    native_index: Arc<crate::native::DataIndex>,
    /// For each path of the cache plan, `native`'s slot for the same input path: a miss
    /// hands the values it looked up for the key to the evaluation.
    native_slots: Arc<Vec<Option<usize>>>,
    bundle_data: Value,
    data: Value,
    report: Arc<ModeReport>,
    /// How decisions of this revision are keyed in a `DecisionCache`, or why they
    /// cannot be (`cache`).
    cache_plan: Arc<Result<KeyPlan, String>>,
    /// Unique per policy and data revision: a cache entry of another generation is
    /// never served.
    generation: u64,
    /// Every number in the data, sorted: when a time comparison may change its answer.
    time_bounds: Arc<Vec<i128>>,
}

/// A decision and whether it came from the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachedDecision {
    /// The decision.
    pub decision: Decision,
    /// Answered from the cache (no evaluation).
    pub cached: bool,
    /// Time taken, lookup included (and for a miss decided by
    /// [`Policy::decide_parts`], making its document; a kept miss's insert is not).
    pub elapsed: Duration,
}

thread_local! {
    /// Where `evaluate_cached` makes a decision's cache key (reused, never shared: a
    /// nested call would find it empty and make its own). A buffer grown past
    /// `KEEP_BUFFER` by a long input is not kept.
    static KEY_BUFFER: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Puts `key` back as this thread's key buffer, unless a long input grew it.
fn keep_key_buffer(key: Vec<u8>) {
    if key.capacity() <= crate::cache::KEEP_BUFFER {
        KEY_BUFFER.set(key);
    }
}

static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("revision", &self.revision)
            .field("rule", &self.options.decision_rule)
            .field("mode", &self.options.mode)
            .finish()
    }
}

/// The policy length limits nexus loads with: regorus's default refuses lines over
/// 1024 columns and files over 1 MiB, which OPA accepts; a policy folder's own file
/// limit (16 MiB, `bundle`) is the one that applies.
fn length_config() -> regorus::utils::limits::PolicyLengthConfig {
    use std::num::NonZeroUsize;
    regorus::utils::limits::PolicyLengthConfig {
        max_col: NonZeroU32::new(16 * 1024 * 1024).unwrap_or(NonZeroU32::MIN),
        max_file_bytes: NonZeroUsize::new(16 * 1024 * 1024).unwrap_or(NonZeroUsize::MIN),
        max_lines: NonZeroUsize::new(1_000_000).unwrap_or(NonZeroUsize::MIN),
    }
}

/// A fresh engine with nexus's builtins and length limits.
pub(crate) fn new_engine() -> Result<Engine, PolicyError> {
    let mut engine = Engine::new();
    engine.set_policy_length_config(length_config());
    // OPA's default (`opa eval`, the server, `opa test`): a builtin error makes the call
    // undefined; regorus's interpreter raises it by default (its RVM does not).
    engine.set_strict_builtin_errors(false);
    // Every engine sees nexus's builtins (io.jwt.*, crypto.*, net.cidr_*, and the
    // replacements of regorus builtins that differ from OPA): evaluation,
    // `nexusctl policy test` and `eval` alike.
    crate::builtins::register(&mut engine)?;
    Ok(engine)
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
    let mut engine = new_engine()?;
    let modules = bundle.modules.iter().chain(if with_tests {
        bundle.tests.iter()
    } else {
        [].iter()
    });
    let count = crate::rewrite::counts_runes(bundle);
    for module in modules {
        let text = crate::rewrite::interpreter_text(&module.path, &module.text, count);
        add_policy(&mut engine, &module.path, &text)?;
    }
    engine
        .add_data(data.clone())
        .map_err(|e| PolicyError::Data {
            file: bundle.root.display().to_string(),
            message: format!("{e:#}"),
        })?;
    Ok(engine)
}

/// Adds a module; a parser panic is an error at the file.
fn add_policy(engine: &mut Engine, path: &str, text: &str) -> Result<(), PolicyError> {
    crate::panics::catch_panic(|| engine.add_policy(path.to_string(), text.to_string()))
        .map_err(|panic| PolicyError::Internal {
            message: format!("{path}: {panic}"),
        })?
        .map(|_| ())
        .map_err(|e| PolicyError::from_regorus(&e))
}

impl Policy {
    /// Compiles `bundle` for `options.decision_rule`, with `runtime` data (e.g.
    /// `{"nexus": {"executions": ..., "revoked": ...}}`) merged over the bundle's. In
    /// compiled mode the RVM program is checked against the interpreter first
    /// (`VerifyOptions::default()`).
    pub fn compile(
        bundle: &Bundle,
        runtime: &Value,
        options: PolicyOptions,
    ) -> Result<Self, PolicyError> {
        Self::compile_with(bundle, runtime, options, &VerifyOptions::default())
    }

    /// `compile`, with the RVM-against-interpreter check bounded and fed by `verify`
    /// (e.g. a sample of recently seen inputs).
    pub fn compile_with(
        bundle: &Bundle,
        runtime: &Value,
        options: PolicyOptions,
        verify: &VerifyOptions,
    ) -> Result<Self, PolicyError> {
        crate::panics::catch_panic(|| Self::compile_inner(bundle, runtime, options, verify))
            .map_err(|message| PolicyError::Internal { message })?
    }

    fn compile_inner(
        bundle: &Bundle,
        runtime: &Value,
        options: PolicyOptions,
        verify: &VerifyOptions,
    ) -> Result<Self, PolicyError> {
        // Constructs that crash or always fail in the engine (recursive rules overflow
        // regorus's stack and abort the process; builtins nexus does not have) are
        // refused before compiling, at their line.
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
        let mut report = ModeReport {
            requested: options.mode,
            mode: options.mode,
            ..ModeReport::default()
        };
        // The interpreter evaluates with the data compiled in, so it needs the runtime
        // data now; the VM gets data per evaluation, so its program is data-independent.
        let data = with_runtime(&bundle.data, runtime);
        let mut engine = engine_with_data(bundle, false, &data)?;
        engine.set_execution_timer_config(timer(options.eval_timeout));
        let rule: regorus::Rc<str> = options.decision_rule.as_str().into();
        // Compiling checks that the rule exists and the modules are consistent.
        engine.compile_with_entrypoint(&rule).map_err(|e| {
            let error = PolicyError::from_regorus(&e);
            match error {
                PolicyError::RegoUnlocated(message) => PolicyError::NoDecisionRule {
                    rule: options.decision_rule.clone(),
                    message,
                },
                other => other,
            }
        })?;
        let mut rvm = None;
        let mut native = None;
        if options.mode == EvalMode::Compiled {
            report.routed = crate::routing::reasons_for(bundle, &options.decision_rule);
            if report.routed.is_empty() {
                match build_rvm(bundle, &options.decision_rule, &mut report)? {
                    Ok(built) => rvm = Some(Arc::new(built)),
                    Err(message) => report.rvm_error = Some(message),
                }
            }
            let inputs = if rvm.is_some() && verify.enabled {
                crate::verify::inputs(bundle, &data, verify)
            } else {
                Vec::new()
            };
            let check_options = PolicyOptions {
                // A slow machine must not turn the check itself into a disagreement.
                eval_timeout: options.eval_timeout.max(Duration::from_secs(1)),
                ..options.clone()
            };
            // The interpreter's answers, kept per input: the RVM and nexus's own evaluator
            // are checked on the same inputs, and the interpreter is the slow side.
            let answers: std::sync::Mutex<
                std::collections::BTreeMap<Value, Result<Value, String>>,
            > = std::sync::Mutex::default();
            let interpreted = |input: Value| {
                let kept = answers
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .get(&input)
                    .cloned();
                kept.unwrap_or_else(|| {
                    let answer = eval_interpreter(&engine, input.clone(), &check_options);
                    answers
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .insert(input, answer.clone());
                    answer
                })
            };
            if let Some(built) = &rvm
                && verify.enabled
            {
                let inputs = inputs.clone();
                let verification = crate::verify::run(
                    inputs,
                    verify.time_budget,
                    &|input| eval_rvm(built, &data, input, &check_options),
                    &interpreted,
                );
                crate::metrics::count_verified(verification.disagreement.is_some());
                if let Some(d) = &verification.disagreement {
                    tracing::warn!(
                        revision = %bundle.revision,
                        rule = %options.decision_rule,
                        input = %d.input,
                        compiled = %d.compiled,
                        interpreted = %d.interpreted,
                        source = %d.source,
                        "regorus's compiled mode (RVM) disagrees with its interpreter on this \
                         revision; the rule is evaluated by the interpreter"
                    );
                    rvm = None;
                }
                report.verification = Some(verification);
            }
            if let Some(built) = &rvm
                && options.native
            {
                native = build_native(
                    bundle,
                    built,
                    &data,
                    &interpreted,
                    &check_options,
                    verify,
                    inputs,
                    &mut report,
                );
            }
            if rvm.is_none() {
                options.mode = EvalMode::Interpreted;
                report.mode = EvalMode::Interpreted;
                if !report.routed.is_empty() {
                    crate::metrics::count_routed();
                    tracing::info!(
                        revision = %bundle.revision,
                        rule = %options.decision_rule,
                        because = %report.summary(),
                        "the rule uses what regorus's compiled mode (RVM) gets wrong or lacks; \
                         it is evaluated by the interpreter"
                    );
                }
            }
        }
        let cache_plan = crate::cache::plan(bundle);
        let mut policy = Self {
            revision: bundle.revision.clone(),
            options,
            interpreter: engine,
            rvm,
            native_slots: Arc::new(native_slots(native.as_deref(), &cache_plan)),
            native,
            native_index: Arc::default(),
            bundle_data: bundle.data.clone(),
            data: bundle.data.clone(),
            report: Arc::new(report),
            cache_plan: Arc::new(cache_plan),
            generation: 0,
            time_bounds: Arc::default(),
        };
        policy.set_runtime_data(runtime);
        Ok(policy)
    }

    /// The same revision with other runtime data, without recompiling (compiled mode).
    pub fn with_runtime_data(&self, bundle: &Bundle, runtime: &Value) -> Result<Self, PolicyError> {
        match self.options.mode {
            // `Native` is only ever a served mode (`report`), with the RVM beside it.
            EvalMode::Compiled | EvalMode::Native => {
                let mut next = Self {
                    revision: self.revision.clone(),
                    options: self.options.clone(),
                    interpreter: self.interpreter.clone(),
                    rvm: self.rvm.clone(),
                    native: self.native.clone(),
                    native_index: Arc::default(),
                    native_slots: self.native_slots.clone(),
                    bundle_data: self.bundle_data.clone(),
                    data: Value::Null,
                    report: self.report.clone(),
                    cache_plan: self.cache_plan.clone(),
                    generation: 0,
                    time_bounds: Arc::default(),
                };
                next.set_runtime_data(runtime);
                Ok(next)
            }
            EvalMode::Interpreted => {
                // The mode was decided once for this revision; an update does not
                // re-run the check (nor move the rule back to the RVM).
                let options = PolicyOptions {
                    mode: EvalMode::Interpreted,
                    ..self.options.clone()
                };
                let mut next = Self::compile_with(
                    bundle,
                    runtime,
                    options,
                    &VerifyOptions {
                        enabled: false,
                        ..VerifyOptions::default()
                    },
                )?;
                next.report = self.report.clone();
                Ok(next)
            }
        }
    }

    fn set_runtime_data(&mut self, runtime: &Value) {
        self.data = with_runtime(&self.bundle_data, runtime);
        if let Some(native) = &self.native {
            self.native_index = Arc::new(native.index(&self.data));
        }
        self.generation = GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if self
            .cache_plan
            .as_ref()
            .as_ref()
            .is_ok_and(|p| p.time_bounded)
        {
            let mut bounds = Vec::new();
            crate::cache::numbers(&self.data, &mut bounds);
            bounds.sort_unstable();
            bounds.dedup();
            self.time_bounds = Arc::new(bounds);
        }
    }

    /// How this revision's decisions are keyed in a cache (the input paths), or why
    /// they are evaluated uncached.
    pub fn cache_plan(&self) -> Result<&KeyPlan, &str> {
        match self.cache_plan.as_ref() {
            Ok(p) => Ok(p),
            Err(e) => Err(e.as_str()),
        }
    }

    /// Evaluates the decision rule for `input` through `cache` (see `cache`): a kept
    /// decision of this revision for the same values at the keyed input paths, not
    /// expired at `input.time_ns`, is returned as is; otherwise the rule is evaluated
    /// and its decision kept (errors never are). A revision that cannot be keyed, or an
    /// input without the integer `time_ns` the revision compares, is evaluated
    /// uncached.
    pub fn evaluate_cached(&self, cache: &DecisionCache, input: Value) -> CachedDecision {
        let started = Instant::now();
        let uncached = |input: Value| {
            cache.count_uncached();
            let decision = self.evaluate(input);
            CachedDecision {
                decision,
                cached: false,
                elapsed: started.elapsed(),
            }
        };
        let Ok(plan) = self.cache_plan.as_ref() else {
            return uncached(input);
        };
        if cache.limits().max_entries == 0 {
            return uncached(input);
        }
        let now = if plan.time_bounded {
            match crate::cache::time_ns(&input)
                .as_number()
                .ok()
                .and_then(|n| n.as_i64())
            {
                Some(t) => i128::from(t),
                None => return uncached(input),
            }
        } else {
            0
        };
        // The key is made in this thread's buffer: a hit allocates nothing, a miss
        // copies the key once into its entry.
        let mut key = KEY_BUFFER.take();
        key.clear();
        // The values at the key's paths, for a miss (none of them is looked up twice).
        let mut keyed: SmallVec<[&Value; 8]> = SmallVec::new();
        crate::cache::key_and_values(plan, &input, &mut key, |v| keyed.push(v));
        let hash = cache.hash(&key);
        let admitted = match cache.get(hash, &key, self.generation, now, true) {
            Looked::Hit(decision) => {
                keep_key_buffer(key);
                return CachedDecision {
                    decision,
                    cached: true,
                    elapsed: started.elapsed(),
                };
            }
            Looked::Miss => true,
            // Admission refused it: nothing is kept, its time bounds are not worked out.
            Looked::Refused => false,
        };
        self.decide_missed(cache, hash, key, admitted, now, &input, &keyed, started)
    }

    /// A decision the cache did not hold (its counted lookup answered `admitted`, for
    /// `key` of `hash`): evaluated on `input`, whose values at the key's paths are
    /// `keyed`, and kept when admitted, for the request times it holds for.
    #[allow(clippy::too_many_arguments)]
    fn decide_missed(
        &self,
        cache: &DecisionCache,
        hash: u64,
        key: Vec<u8>,
        admitted: bool,
        now: i128,
        input: &Value,
        keyed: &[&Value],
        started: Instant,
    ) -> CachedDecision {
        let time_bounded = self
            .cache_plan
            .as_ref()
            .as_ref()
            .is_ok_and(|p| p.time_bounded);
        // The request times the decision holds for (`[from, until)`), when it may be kept.
        let valid = if !admitted {
            None
        } else if time_bounded {
            // The earliest stored number at or after now, in the data or in the keyed
            // input values: no comparison with the time changes its answer before it.
            let mut own: SmallVec<[i128; 8]> = SmallVec::new();
            for v in keyed {
                crate::cache::numbers(v, &mut own);
            }
            own.sort_unstable();
            let from = [
                crate::cache::prev_bound(&self.time_bounds, now),
                crate::cache::prev_bound(&own, now),
            ]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(i128::MIN);
            let until = [
                crate::cache::next_bound(&self.time_bounds, now),
                crate::cache::next_bound(&own, now),
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(i128::MAX);
            Some((from, until))
        } else {
            Some((i128::MIN, i128::MAX))
        };
        let known: SmallVec<[(usize, &Value); 8]> = self
            .native_slots
            .iter()
            .zip(keyed)
            .filter_map(|(slot, v)| Some(((*slot)?, *v)))
            .collect();
        let (decision, elapsed) = self.decide_from(input, &known, started);
        if let Some(valid) = valid
            && decision.error.is_none()
            && valid.0 <= now
            && now < valid.1
        {
            cache.insert(hash, &key, self.generation, valid, &decision);
        }
        keep_key_buffer(key);
        CachedDecision {
            decision,
            cached: false,
            elapsed,
        }
    }

    /// The decision for `input` if the cache holds it, without evaluating: a caller can
    /// answer a hit where it is and take a miss elsewhere (then through
    /// [`Policy::evaluate_cached`], which counts the miss). None also when the revision
    /// is not cached.
    pub fn cached(&self, cache: &DecisionCache, input: &Value) -> Option<CachedDecision> {
        let plan = self.cache_plan.as_ref().as_ref().ok()?;
        let time_ns = if plan.time_bounded {
            crate::cache::time_ns(input)
                .as_number()
                .ok()
                .and_then(|n| n.as_i64())?
        } else {
            0
        };
        self.cached_parts(cache, time_ns, |key| {
            crate::cache::key_and_values(plan, input, key, |_| {});
            true
        })
    }

    /// [`Policy::cached`] for a caller that has the values at the key's paths without
    /// an input document: `write` appends them, one [`crate::cache::encode_part`] per
    /// path of [`Policy::cache_plan`] in order, and returns false (nothing is looked
    /// up) when it cannot; `time_ns` is the input's. The key must be the one the
    /// document would give ([`crate::cache::key_of`]): a caller that writes other
    /// values gets other decisions' answers, so it is checked against the document.
    /// None when the revision is not cached, or the decision not found.
    pub fn cached_parts(
        &self,
        cache: &DecisionCache,
        time_ns: i64,
        write: impl FnOnce(&mut Vec<u8>) -> bool,
    ) -> Option<CachedDecision> {
        let started = Instant::now();
        let (_, now, key) = self.written_key(cache, time_ns, write)?;
        let found = cache
            .get(cache.hash(&key), &key, self.generation, now, false)
            .hit();
        keep_key_buffer(key);
        found.map(|decision| CachedDecision {
            decision,
            cached: true,
            elapsed: started.elapsed(),
        })
    }

    /// The revision's key plan, the request time a lookup compares (`time_ns`, or 0 for
    /// a revision that compares none) and the key `write` writes, in this thread's
    /// buffer (give it back with `keep_key_buffer`); None when the revision is not
    /// cached or `write` cannot.
    fn written_key(
        &self,
        cache: &DecisionCache,
        time_ns: i64,
        write: impl FnOnce(&mut Vec<u8>) -> bool,
    ) -> Option<(&KeyPlan, i128, Vec<u8>)> {
        let plan = self.cache_plan.as_ref().as_ref().ok()?;
        if cache.limits().max_entries == 0 {
            return None;
        }
        let now = if plan.time_bounded {
            i128::from(time_ns)
        } else {
            0
        };
        let mut key = KEY_BUFFER.take();
        key.clear();
        if !write(&mut key) {
            keep_key_buffer(key);
            return None;
        }
        Some((plan, now, key))
    }

    /// [`Policy::cached_parts`] that also decides a miss: the document `input` makes is
    /// evaluated and the decision kept under the key already written, so that a
    /// request's key is written, hashed and looked up once (the lookup is counted, as
    /// [`Policy::evaluate_cached`]'s). For a revision that decides in microseconds (the
    /// caller takes a slow one's miss off its worker through `evaluate_cached`). None
    /// when the revision is not cached or `write` cannot write the key; the caller then
    /// decides through `evaluate_cached`. The document's values at the key's paths must
    /// be the ones written, and its `time_ns` `time_ns` (checked in debug builds).
    /// `elapsed` of a miss includes making the document.
    pub fn decide_parts(
        &self,
        cache: &DecisionCache,
        time_ns: i64,
        write: impl FnOnce(&mut Vec<u8>) -> bool,
        input: impl FnOnce() -> Value,
    ) -> Option<CachedDecision> {
        let started = Instant::now();
        let (plan, now, key) = self.written_key(cache, time_ns, write)?;
        let hash = cache.hash(&key);
        let admitted = match cache.get(hash, &key, self.generation, now, true) {
            Looked::Hit(decision) => {
                keep_key_buffer(key);
                return Some(CachedDecision {
                    decision,
                    cached: true,
                    elapsed: started.elapsed(),
                });
            }
            Looked::Miss => true,
            Looked::Refused => false,
        };
        let input = input();
        let mut keyed: SmallVec<[&Value; 8]> = SmallVec::new();
        if cfg!(debug_assertions) {
            let mut written = Vec::new();
            crate::cache::walk_key(plan, &input, Some(&mut written), |v| keyed.push(v));
            assert_eq!(
                written, key,
                "the key written from the values is the document's"
            );
            if plan.time_bounded {
                assert_eq!(
                    crate::cache::time_ns(&input).as_i64().ok(),
                    Some(time_ns),
                    "the document's time_ns is the one given"
                );
            }
        } else {
            crate::cache::walk_key(plan, &input, None, |v| keyed.push(v));
        }
        Some(self.decide_missed(cache, hash, key, admitted, now, &input, &keyed, started))
    }

    /// The revision id (a hash of the folder's files).
    pub fn revision(&self) -> &str {
        &self.revision
    }

    /// How this revision is evaluated: the requested mode, or the interpreter when the
    /// rule needs it (see `report`).
    pub fn mode(&self) -> EvalMode {
        self.report.mode
    }

    /// Which mode the decision rule runs in and why, and what the RVM was checked on.
    pub fn report(&self) -> &ModeReport {
        &self.report
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
        self.decide_from(&input, &[], Instant::now()).0
    }

    /// Evaluates the decision rule for `input` and returns its value as is (for rules
    /// whose answer is not an allow/deny decision, such as the gateway's revocation
    /// policy). Errors, the time limit, the instruction limit and an engine panic are
    /// `Err`.
    pub fn evaluate_value(&self, input: Value) -> Result<Value, String> {
        let (native, data, index) = (self.native.as_deref(), &self.data, &self.native_index);
        let input = &input;
        self.answer(
            input,
            Instant::now(),
            native.map(|program| {
                move |deadline| program.eval_until(input, data, index, deadline, &[])
            }),
            |value| value,
        )
        .0
    }

    /// The decision for `input`, timed from `started`, and the time since `started`
    /// when it was made (read once, for the time limit and the caller); `known` are the
    /// values at input paths already looked up (`native`'s slot, value), for nexus's
    /// evaluator, which reads the decision straight off the rule
    /// (`native::Program::decide_until`). Errors deny.
    fn decide_from(
        &self,
        input: &Value,
        known: &[(usize, &Value)],
        started: Instant,
    ) -> (Decision, Duration) {
        let (data, index) = (&self.data, &self.native_index);
        let (result, elapsed) = self.answer(
            input,
            started,
            self.native.as_deref().map(|program| {
                move |deadline| program.decide_until(input, data, index, deadline, known)
            }),
            |value| decision_from(&value),
        );
        (result.unwrap_or_else(Decision::deny_because), elapsed)
    }

    /// What nexus's evaluator answers through `native` (given when this revision has
    /// it; it is handed its deadline), or when it hands the input on or is absent, the
    /// RVM's or the interpreter's value through `from_value`; past the time limit (the
    /// time since `started`, also returned), an error.
    fn answer<T>(
        &self,
        input: &Value,
        started: Instant,
        native: Option<impl FnOnce(Option<Instant>) -> Result<T, crate::native::Bail>>,
        from_value: impl FnOnce(Value) -> T,
    ) -> (Result<T, String>, Duration) {
        let native = native.map(|native| {
            let deadline = started.checked_add(self.options.eval_timeout);
            let outcome = eval_native(|| native(deadline));
            crate::metrics::count_native(matches!(outcome, Native::HandedOn));
            outcome
        });
        let result = match native {
            Some(Native::Value(value)) => Ok(value),
            Some(Native::Failed(error)) => Err(error),
            Some(Native::HandedOn) | None => match &self.rvm {
                // A value's copy shares its contents (reference counted).
                Some(rvm) => eval_rvm_reusing(
                    rvm,
                    self.generation,
                    &self.data,
                    input.clone(),
                    &self.options,
                ),
                None => eval_interpreter(&self.interpreter, input.clone(), &self.options),
            }
            .map(from_value),
        };
        // The VM and the interpreter check the clock between instructions; a single
        // builtin call (e.g. numbers.range over a huge span) cannot be interrupted, so
        // its result is refused here once it overran.
        let elapsed = started.elapsed();
        if elapsed > self.options.eval_timeout {
            return (
                Err(format!(
                    "policy evaluation failed: exceeded the time limit ({elapsed:?} > {:?})",
                    self.options.eval_timeout
                )),
                elapsed,
            );
        }
        (
            result.map_err(|error| format!("policy evaluation failed: {error}")),
            elapsed,
        )
    }

    /// Evaluates and measures.
    pub fn evaluate_timed(&self, input: Value) -> (Decision, Duration) {
        let start = Instant::now();
        let decision = self.evaluate(input);
        (decision, start.elapsed())
    }
}

/// What nexus's own evaluator made of one input.
enum Native<T> {
    /// Its answer (the rule's value, `Undefined` included, or the decision read off it).
    Value(T),
    /// Handed to the RVM (a value it does not model, its step budget, a panic).
    HandedOn,
    /// Past the time limit: an error, a deny (not handed on: the time is spent).
    Failed(String),
}

/// For each path of `plan`, `native`'s slot for the same input path.
fn native_slots(
    native: Option<&crate::native::Program>,
    plan: &Result<KeyPlan, String>,
) -> Vec<Option<usize>> {
    match (native, plan) {
        (Some(native), Ok(plan)) => plan.paths().iter().map(|p| native.input_slot(p)).collect(),
        _ => Vec::new(),
    }
}

/// One evaluation by nexus's own evaluator (`eval`, which fails past its deadline).
fn eval_native<T>(eval: impl FnOnce() -> Result<T, crate::native::Bail>) -> Native<T> {
    match crate::panics::catch(|| Ok(eval())) {
        Ok(Ok(value)) => Native::Value(value),
        Ok(Err(crate::native::Bail::Timeout)) => {
            Native::Failed("exceeded the time limit between two steps".into())
        }
        Ok(Err(bail)) => {
            tracing::trace!(?bail, "nexus's evaluator handed the input to the RVM");
            Native::HandedOn
        }
        Err(_) => Native::HandedOn,
    }
}

/// nexus's own evaluator for the decision rule, when it takes the rule and, with the RVM
/// for what it hands on, answers as the interpreter does on `inputs`; the report says
/// which, and why not.
#[allow(clippy::too_many_arguments)]
fn build_native(
    bundle: &Bundle,
    rvm: &Arc<Rvm>,
    data: &Value,
    interpreted: &dyn Fn(Value) -> Result<Value, String>,
    options: &PolicyOptions,
    verify: &VerifyOptions,
    inputs: Vec<(crate::verify::InputSource, Value)>,
    report: &mut ModeReport,
) -> Option<Arc<crate::native::Program>> {
    let count = crate::rewrite::counts_runes(bundle);
    let texts: Vec<(String, String)> = bundle
        .modules
        .iter()
        .map(|m| {
            (
                m.path.clone(),
                crate::rewrite::interpreter_text(&m.path, &m.text, count),
            )
        })
        .collect();
    let program = match crate::panics::catch(|| {
        Ok(crate::native::compile(
            &texts,
            &options.decision_rule,
            options.max_instructions,
        ))
    }) {
        Ok(Ok(mut program)) => {
            program.set_max_made(options.max_made_values);
            program
        }
        Ok(Err(refusal)) => {
            report.native_refused = Some(refusal.to_string());
            return None;
        }
        Err(panic) => {
            report.native_refused = Some(panic);
            return None;
        }
    };
    if !verify.enabled {
        report.mode = EvalMode::Native;
        return Some(Arc::new(program));
    }
    // `options` are the check's (a generous time limit); checked with the data's
    // index, as it serves.
    let check_options = options;
    let index = program.index(data);
    let served = |input: Value| {
        let deadline = Instant::now().checked_add(check_options.eval_timeout);
        match eval_native(|| program.eval_until(&input, data, &index, deadline, &[])) {
            // The decision the sidecar serves is read straight off the rule
            // (`decide_until`): it must be the one the rule's value gives, or the
            // revision is not served by this evaluator.
            Native::Value(v) => {
                match eval_native(|| program.decide_until(&input, data, &index, deadline, &[])) {
                    Native::Value(d) if d == decision_from(&v) => Ok(v),
                    Native::Failed(e) => Err(e),
                    other => Err(format!(
                        "the decision read off the rule ({}) is not its value's ({:?})",
                        match other {
                            Native::Value(d) => format!("{d:?}"),
                            _ => "handed on".into(),
                        },
                        decision_from(&v)
                    )),
                }
            }
            Native::Failed(e) => Err(e),
            Native::HandedOn => eval_rvm(rvm, data, input, check_options),
        }
    };
    let verification = crate::verify::run(inputs, verify.time_budget, &served, interpreted);
    crate::metrics::count_verified(verification.disagreement.is_some());
    if let Some(d) = &verification.disagreement {
        tracing::warn!(
            revision = %bundle.revision,
            rule = %options.decision_rule,
            input = %d.input,
            native = %d.compiled,
            interpreted = %d.interpreted,
            "nexus's evaluator disagrees with regorus's interpreter on this revision; \
             the rule is evaluated by the RVM"
        );
        report.native_refused = Some(format!(
            "it disagreed with the interpreter on {} {}: native {}, interpreted {}",
            d.source, d.input, d.compiled, d.interpreted
        ));
        report.native_verification = Some(verification);
        return None;
    }
    report.native_verification = Some(verification);
    report.mode = EvalMode::Native;
    Some(Arc::new(program))
}

/// Compiles the RVM program of `rule` from `bundle`'s modules rewritten for the RVM
/// (`rewrite`), with nexus's builtins as host calls. `Ok(Err(message))`: the RVM cannot
/// compile this policy (the interpreter serves); `Err`: the policy is wrong (an unknown
/// function), refused as OPA refuses it.
fn build_rvm(
    bundle: &Bundle,
    rule: &str,
    report: &mut ModeReport,
) -> Result<Result<Rvm, String>, PolicyError> {
    let mut engine = new_engine()?;
    let mut called = std::collections::BTreeSet::new();
    let count = crate::rewrite::counts_runes(bundle);
    for module in &bundle.modules {
        let text = match crate::compat::parse(&module.path, &module.text) {
            Some(ast) => {
                let rewritten = crate::rewrite::for_rvm(&module.text, &ast, count);
                report.guarded_assignments += rewritten.assignments;
                report.guarded_comprehensions += rewritten.comprehensions;
                report.guarded_negations += rewritten.negations;
                rewritten.text
            }
            None => module.text.clone(),
        };
        called.extend(crate::compat::called_functions(&module.path, &module.text));
        add_policy(&mut engine, &module.path, &text)?;
    }
    // Every nexus builtin is a host call (the rewrites may add calls the source does
    // not have); the program suspends only if it calls one.
    let host: Vec<(&'static str, usize)> = crate::builtins::host_calls().collect();
    report.host_builtins = host
        .iter()
        .filter(|(name, _)| called.contains(*name))
        .map(|(n, _)| (*n).to_string())
        .collect();
    let entry: regorus::Rc<str> = rule.into();
    let compiled = match engine.compile_with_entrypoint(&entry) {
        Ok(c) => c,
        Err(e) => return Ok(Err(format!("{e:#}"))),
    };
    match regorus::languages::rego::compiler::Compiler::compile_from_policy_with_host_await(
        &compiled,
        &[rule],
        &host,
    ) {
        Ok(program) => Ok(Ok(Rvm {
            compiled,
            host: program.has_host_await(),
            program,
        })),
        Err(e) => {
            let text = format!("{e:#}");
            if text.contains("Unknown function") {
                // OPA refuses an unknown function at compile time; so does nexus, at
                // its line.
                Err(PolicyError::from_regorus(&anyhow::anyhow!("{text}")))
            } else {
                Ok(Err(text.lines().last().unwrap_or_default().to_string()))
            }
        }
    }
}

/// A VM kept per worker thread for one program and one data revision: the program,
/// the data (and regorus's check of the data against the rule tree) are set once, and
/// each evaluation only sets the input and runs (`execute` resets the VM's execution
/// state first: registers, rule cache, memoized values).
struct ThreadVm {
    program: *const Rvm,
    generation: u64,
    vm: RegoVM,
}

thread_local! {
    static THREAD_VM: std::cell::RefCell<Option<ThreadVm>> = const { std::cell::RefCell::new(None) };
}

/// `eval_rvm` on this thread's VM when it was set up for `rvm` and `generation`
/// (else on a new one, then kept). A VM whose evaluation failed or panicked is
/// dropped, never reused.
fn eval_rvm_reusing(
    rvm: &Arc<Rvm>,
    generation: u64,
    data: &Value,
    input: Value,
    options: &PolicyOptions,
) -> Result<Value, String> {
    let kept = THREAD_VM.with(|cell| cell.borrow_mut().take());
    let mut vm = match kept {
        // The pointer is compared only while `rvm` is alive (borrowed here); the
        // generation tells revisions apart even if an address is reused.
        Some(t) if std::ptr::eq(t.program, Arc::as_ptr(rvm)) && t.generation == generation => t.vm,
        _ => new_vm(rvm, data, options)?,
    };
    let result = run_vm(&mut vm, rvm, input);
    if result.is_ok() {
        THREAD_VM.with(|cell| {
            *cell.borrow_mut() = Some(ThreadVm {
                program: Arc::as_ptr(rvm),
                generation,
                vm,
            })
        });
    }
    result
}

fn new_vm(rvm: &Rvm, data: &Value, options: &PolicyOptions) -> Result<RegoVM, String> {
    crate::panics::catch(|| {
        let mut vm = RegoVM::new_with_policy(rvm.compiled.clone());
        vm.load_program(rvm.program.clone());
        vm.set_max_instructions(options.max_instructions);
        vm.set_execution_timer_config(Some(timer(options.eval_timeout)));
        vm.set_data(data.clone()).map_err(|e| e.to_string())?;
        if rvm.host {
            vm.set_execution_mode(ExecutionMode::Suspendable);
        }
        Ok(vm)
    })
}

/// One evaluation on the RVM; a host call (a nexus builtin) is answered by nexus.
fn eval_rvm(
    rvm: &Rvm,
    data: &Value,
    input: Value,
    options: &PolicyOptions,
) -> Result<Value, String> {
    let mut vm = new_vm(rvm, data, options)?;
    run_vm(&mut vm, rvm, input)
}

fn run_vm(vm: &mut RegoVM, rvm: &Rvm, input: Value) -> Result<Value, String> {
    crate::panics::catch(|| {
        vm.set_input(input);
        if !rvm.host {
            return vm.execute().map_err(|e| e.to_string());
        }
        let mut step = vm.execute();
        loop {
            step.map_err(|e| e.to_string())?;
            let (name, args) = match vm.execution_state() {
                ExecutionState::Completed { result } => return Ok(result.clone()),
                ExecutionState::Error { error } => return Err(error.to_string()),
                ExecutionState::Suspended {
                    reason:
                        SuspendReason::HostAwait {
                            identifier,
                            argument,
                            ..
                        },
                    ..
                } => (identifier.clone(), argument.clone()),
                other => return Err(format!("the RVM stopped unexpectedly: {other:?}")),
            };
            let name = name.as_string().map(|s| s.to_string()).unwrap_or_default();
            let args = match args {
                Value::Array(items) => items.to_vec(),
                other => vec![other],
            };
            step = vm.resume(Some(crate::builtins::call(&name, &args)));
        }
    })
}

/// One evaluation on the interpreter (a clone of the revision's engine: the engine
/// holds per-evaluation state).
fn eval_interpreter(
    engine: &Engine,
    input: Value,
    options: &PolicyOptions,
) -> Result<Value, String> {
    crate::panics::catch(|| {
        let mut engine = engine.clone();
        engine.set_input(input);
        engine
            .eval_rule(options.decision_rule.clone())
            .map_err(|e| format!("{e:#}"))
    })
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
    let allow = match crate::cache::named_field(value, "allow").as_bool() {
        Ok(b) => *b,
        Err(_) => {
            return Decision::deny_because(format!(
                "policy decision has no boolean `allow`: {}",
                value.to_json_str().unwrap_or_default()
            ));
        }
    };
    Decision {
        allow,
        reasons: reasons_from(crate::cache::named_field(value, "reasons")),
        error: None,
    }
}

/// A decision's reasons from its `reasons` field: each item of an array or set as text,
/// none for a missing or null field, any other value as one reason.
pub(crate) fn reasons_from(reasons: &Value) -> Arc<[String]> {
    match reasons {
        Value::Array(items) => items.iter().map(reason_text).collect(),
        Value::Set(items) => items.iter().map(reason_text).collect(),
        Value::Undefined | Value::Null => Arc::from([]),
        other => Arc::from([reason_text(other)]),
    }
}

/// One reason: a string as it is, any other value as JSON.
pub(crate) fn reason_text(v: &Value) -> String {
    match v.as_string() {
        Ok(s) => String::from(&**s),
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

    /// `rule` of `text` in compiled mode, on the RVM alone (these tests are about what
    /// nexus does to the RVM; `native` has its own).
    fn compiled(text: &str, rule: &str) -> Policy {
        with_native(text, rule, false)
    }

    fn with_native(text: &str, rule: &str, native: bool) -> Policy {
        let b = Bundle::from_modules(
            vec![Module {
                path: "p.rego".into(),
                text: text.into(),
            }],
            Value::new_object(),
        );
        Policy::compile(
            &b,
            &Value::new_object(),
            PolicyOptions {
                decision_rule: rule.into(),
                native,
                ..PolicyOptions::default()
            },
        )
        .unwrap()
    }

    fn eval(p: &Policy, input: serde_json::Value) -> String {
        crate::verify::show(&p.evaluate_value(Value::from(input)))
    }

    /// The RVM bugs that turn undefined into true (each measured against OPA 1.20) give
    /// OPA's answer in the default mode.
    #[test]
    fn known_rvm_fail_opens_give_opas_answer() {
        // `x := <undefined>` does not fail the body in the RVM.
        let p = compiled(
            "package t\n\nallow if { r := input.role; not r == \"guest\" }\n",
            "data.t.allow",
        );
        assert_eq!(p.mode(), EvalMode::Compiled);
        assert_eq!(eval(&p, serde_json::json!({})), "undefined");
        assert_eq!(eval(&p, serde_json::json!({"role": "dev"})), "true");
        // A comprehension head reading a missing field keeps an undefined element.
        let p = compiled(
            "package t\n\nadmins := [u.admin | some u in input.users]\n\nany_admin if { count(admins) > 1 }\n",
            "data.t.any_admin",
        );
        assert_eq!(p.mode(), EvalMode::Compiled, "{}", p.report().summary());
        assert_eq!(
            eval(
                &p,
                serde_json::json!({"users": [{"admin": true}, {"id": 2}]})
            ),
            "undefined"
        );
        // `k, v in c` ignores the key in the RVM: rewritten into a nexus call.
        let p = compiled("package t\n\nx if { 1, \"b\" in input.a }\n", "data.t.x");
        assert_eq!(p.mode(), EvalMode::Compiled);
        assert_eq!(eval(&p, serde_json::json!({"a": ["b"]})), "undefined");
        // A multi-value rule with a variable in its ref head is one flat set in the RVM
        // (and undefined rather than {} in the interpreter when empty): rewritten into a
        // partial object, it stays compiled.
        let p = compiled(
            "package t\n\ngrants[u] contains p if { some u, ps in input.g; some p in ps }\n",
            "data.t.grants",
        );
        assert_eq!(p.mode(), EvalMode::Compiled, "{}", p.report().summary());
        assert_eq!(
            eval(&p, serde_json::json!({"g": {"alice": ["r"], "bob": ["w"]}})),
            r#"{ "alice": [ "r" ], "bob": [ "w" ] }"#
        );
        assert_eq!(eval(&p, serde_json::json!({"g": {}})), "{}");
        // `not startswith(input.p, ...)` with no `p`: OPA evaluates the argument first,
        // so the body fails.
        let p = compiled(
            "package t\n\nallow if not startswith(input.p, \"/admin\")\n",
            "data.t.allow",
        );
        assert_eq!(eval(&p, serde_json::json!({})), "undefined");
        assert_eq!(eval(&p, serde_json::json!({"p": "/x"})), "true");
    }

    #[test]
    fn nexus_builtins_run_in_the_compiled_mode() {
        let p = compiled("package t\n\nx := crypto.sha256(input.s)\n", "data.t.x");
        assert_eq!(p.mode(), EvalMode::Compiled);
        assert_eq!(p.report().host_builtins, vec!["crypto.sha256".to_string()]);
        assert_eq!(
            eval(&p, serde_json::json!({"s": "a"})),
            "\"ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb\""
        );
        assert_eq!(eval(&p, serde_json::json!({"s": 1})), "undefined");
    }

    #[test]
    fn a_conflict_the_rvm_misses_runs_on_the_interpreter() {
        // Two values for one key of a partial object: the RVM keeps the last, the
        // interpreter raises a conflict (as OPA does); the check sees it on the
        // generated inputs.
        let p = compiled(
            "package t\n\no[k] := 1 if k := input.k\n\no[k] := 2 if k := input.k\n",
            "data.t.o",
        );
        assert_eq!(p.mode(), EvalMode::Interpreted, "{:?}", p.report());
        let summary = p.report().summary();
        // The RVM would keep the last of the two values: the rule is routed to the
        // interpreter, which raises the conflict OPA raises.
        assert!(summary.contains("p.rego:3:1: partial object"), "{summary}");
        let conflict = eval(&p, serde_json::json!({"k": "a"}));
        assert!(conflict.starts_with("error"), "{conflict}");
    }

    #[test]
    fn template_match_with_a_short_subject_is_opas_false_not_a_panic() {
        for mode in [EvalMode::Compiled, EvalMode::Interpreted] {
            let b = Bundle::from_modules(
                vec![Module {
                    path: "p.rego".into(),
                    text: "package t\n\ndecision := {\"allow\": true} if regex.template_match(\"urn:foo:{.*}\", input.s, \"{\", \"}\")\n".into(),
                }],
                Value::new_object(),
            );
            let p = Policy::compile(
                &b,
                &Value::new_object(),
                PolicyOptions {
                    decision_rule: "data.t.decision".into(),
                    mode,
                    ..PolicyOptions::default()
                },
            )
            .unwrap();
            let d = p.evaluate(Value::from(serde_json::json!({"s": "urn"})));
            assert!(!d.allow, "{mode:?}");
            assert_eq!(
                d.reasons,
                vec!["policy decision is undefined".to_string()].into(),
                "{mode:?}"
            );
            assert!(
                p.evaluate(Value::from(serde_json::json!({"s": "urn:foo:bar"})))
                    .allow
            );
        }
    }
}
