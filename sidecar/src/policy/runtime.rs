//! Loading, testing and hot-swapping policy revisions.
//!
//! A revision is the whole policy folder. The reload loop notices a change (file
//! names, sizes and modification times), loads and compiles the folder, runs its
//! `*_test.rego`, and only then publishes it; a broken revision is logged with
//! file:line:col and counted, and the last good one keeps serving. Runtime data (the
//! state file) changes swap data without recompiling.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use nexus_policy::{
    Bundle, CacheLimits, CachedDecision, DecisionCache, EvalMode, Policy, PolicyError,
    PolicyOptions, Value, VerifyOptions, isolate,
};
use serde::Deserialize;

use crate::config::{PolicyConfig, PolicyMode};
use crate::metrics::Metrics;

/// An execution event as the policy sees it (`data.nexus.executions[id]`).
#[derive(Clone, Debug, Deserialize, serde::Serialize, PartialEq, Eq)]
pub struct Execution {
    /// Execution id.
    #[serde(default)]
    pub id: String,
    /// The plugin workload it is open for.
    pub plugin: String,
    /// The clause.
    pub clause: String,
    /// RFC 3339 end of the grant.
    pub not_after: String,
    /// `not_after` in unix nanoseconds, parsed once at load.
    #[serde(skip)]
    pub ends_unix_nanos: i128,
    /// With a plugin registry (docs/registry.md): the plugin's UUID, the certified
    /// version the execution runs and its image digest (`sha256:…`); empty without.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub plugin_uid: String,
    /// See `plugin_uid`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub plugin_version: String,
    /// See `plugin_uid`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub image_digest: String,
}

/// A certified plugin version's binding, as a registry gateway pushes it
/// (docs/registry.md): the workload it runs as, its clauses and budgets.
#[derive(Clone, Debug, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegistryBinding {
    /// The SPIFFE ID its pods run as.
    pub spiffe_id: String,
    /// The clauses it may serve.
    pub clauses: Vec<String>,
    /// Its budgets object (`data.nexus.bindings[ID].budgets`), if it declares any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budgets: Option<serde_json::Value>,
    /// When it was certified (unix ms): of several versions of one workload that
    /// declare budgets, the latest certified one's apply.
    #[serde(default)]
    pub certified_unix_ms: u64,
}

/// Unix nanoseconds as the i64 a policy compares (saturating outside 1677-2262).
pub fn ns_i64(ns: i128) -> i64 {
    i64::try_from(ns).unwrap_or(if ns < 0 { i64::MIN } else { i64::MAX })
}

/// Runtime data: what the gateway will push; for now a local file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeData {
    /// The gateway revision this data is at (0: not from a gateway).
    #[serde(default)]
    pub revision: u64,
    /// Open executions by id.
    #[serde(default)]
    pub executions: HashMap<String, Execution>,
    /// Revoked workloads: SPIFFE ID -> details (reason, by, at).
    #[serde(default)]
    pub revoked: serde_json::Map<String, serde_json::Value>,
    /// Set when the gateway runs a plugin registry: its certified versions by
    /// `UID/VERSION`. `data.nexus.bindings` is then built from these alone and the
    /// policy folder's bindings are not used (docs/registry.md); absent: the folder's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<std::collections::BTreeMap<String, RegistryBinding>>,
}

impl RuntimeData {
    /// `data.nexus.bindings` built from the registry's certified versions (`None`
    /// without a registry): per workload the union of its versions' clauses (sorted), as
    /// a list, or as `{clauses, budgets}` when one of them declares budgets (the latest
    /// certified one's) — the two shapes the reference policy and the anomaly watch
    /// read.
    pub fn registry_bindings(&self) -> Option<serde_json::Value> {
        let registry = self.registry.as_ref()?;
        /// A workload's clauses, and the budgets of its latest certified version.
        type Union<'a> = (
            std::collections::BTreeSet<&'a str>,
            Option<(u64, &'a serde_json::Value)>,
        );
        let mut by_workload: std::collections::BTreeMap<&str, Union<'_>> =
            std::collections::BTreeMap::new();
        for binding in registry.values() {
            let entry = by_workload.entry(binding.spiffe_id.as_str()).or_default();
            entry.0.extend(binding.clauses.iter().map(String::as_str));
            if let Some(budgets) = &binding.budgets
                && entry
                    .1
                    .is_none_or(|(at, _)| binding.certified_unix_ms >= at)
            {
                entry.1 = Some((binding.certified_unix_ms, budgets));
            }
        }
        let bindings: serde_json::Map<String, serde_json::Value> = by_workload
            .into_iter()
            .map(|(id, (clauses, budgets))| {
                let clauses: Vec<&str> = clauses.into_iter().collect();
                let value = match budgets {
                    Some((_, budgets)) => {
                        serde_json::json!({"clauses": clauses, "budgets": budgets})
                    }
                    None => serde_json::json!(clauses),
                };
                (id.to_string(), value)
            })
            .collect();
        Some(serde_json::Value::Object(bindings))
    }

    fn to_value(&self) -> Value {
        let executions: serde_json::Map<String, serde_json::Value> = self
            .executions
            .iter()
            .map(|(id, ex)| {
                let mut ex = ex.clone();
                ex.id = id.clone();
                let mut value = serde_json::to_value(&ex).unwrap_or_default();
                // The end in unix nanoseconds, parsed once here, so a policy compares
                // integers (`ex.not_after_ns > input.time_ns`) instead of parsing RFC
                // 3339 on every decision.
                if let Some(fields) = value.as_object_mut() {
                    fields.insert(
                        "not_after_ns".into(),
                        serde_json::json!(ns_i64(ex.ends_unix_nanos)),
                    );
                }
                (id.clone(), value)
            })
            .collect();
        let mut nexus = serde_json::json!({"executions": executions, "revoked": self.revoked});
        if let Some(bindings) = self.registry_bindings() {
            nexus["bindings"] = bindings;
        }
        Value::from(serde_json::json!({ "nexus": nexus }))
    }
}

/// `bundle` without `data.nexus.bindings`: with a registry, the gateway's bindings
/// replace the folder's whole, and the runtime data's overlay would otherwise merge
/// them key by key (a forged or stale file could add a workload or clause).
fn without_bindings(bundle: &Bundle) -> Bundle {
    let mut bundle = bundle.clone();
    if let Ok(top) = bundle.data.as_object_mut()
        && let Some(nexus) = top.get_mut(&Value::from("nexus"))
        && let Ok(nexus) = nexus.as_object_mut()
    {
        nexus.remove(&Value::from("bindings"));
    }
    bundle
}

/// A published revision with the data it was built with.
#[derive(Debug)]
pub struct Loaded {
    /// The enforced decision rule.
    pub policy: Policy,
    /// The shadow (dry-run) rule, if configured.
    pub shadow: Option<Policy>,
    /// Executions by plugin, then clause, latest `not_after` first, for resolving
    /// `input.execution` (nested so that a request looks them up without allocating).
    executions: HashMap<String, HashMap<String, Vec<Execution>>>,
    by_id: HashMap<String, Execution>,
    /// The folder as loaded, so a runtime-data change needs no reload or recompile.
    bundle: Bundle,
    /// Whether the bindings came from the gateway's registry (the folder's were left
    /// out of the compiled data): a change of source needs a recompile.
    registry: bool,
    /// The budgets the bindings declare (`data.nexus.bindings[ID].budgets`), read with
    /// the revision: a revision whose budgets cannot be read does not load.
    pub budgets: Arc<nexus_anomaly::Budgets>,
    /// The parts of the input document the revision's rules can read.
    pub needs: super::input::Needs,
}

impl Loaded {
    /// The execution a request belongs to: the one named by `x-nexus-execution`, or
    /// else the open one for (plugin, clause) that ends last.
    pub fn execution_for(
        &self,
        named: Option<&str>,
        plugin: &str,
        clause: Option<&str>,
        now_unix_nanos: i128,
    ) -> Option<&Execution> {
        if let Some(id) = named {
            return self.execution(id);
        }
        let clause = clause?;
        self.executions
            .get(plugin)?
            .get(clause)?
            .iter()
            .find(|ex| ex.ends_unix_nanos > now_unix_nanos)
    }
}

impl Loaded {
    /// The open execution `id`, if the gateway opened it.
    pub fn execution(&self, id: &str) -> Option<&Execution> {
        self.by_id.get(id)
    }
}

/// The sidecar's policy state, read lock-free on every request.
pub struct PolicyRuntime {
    config: PolicyConfig,
    current: ArcSwapOption<Loaded>,
    metrics: Arc<Metrics>,
    /// Set once the state file has been read: from then on its disappearance is an
    /// error (the last data, with its revocations, keeps serving), not "no data".
    state_seen: std::sync::atomic::AtomicBool,
    /// Runtime data pushed by the gateway's control stream; when set, the state file is
    /// written by the control client and not read here (no stale re-read can race a
    /// newer push).
    external: std::sync::Mutex<Option<RuntimeData>>,
    /// Decisions of the current revision (docs/policy-cache.md): keyed per revision,
    /// cleared when one is published.
    cache: DecisionCache,
    /// A few recent inputs (one request in `SAMPLE_EVERY`), on which the next
    /// revision's compiled program is checked against the interpreter.
    samples: std::sync::Mutex<std::collections::VecDeque<Value>>,
    seen: std::sync::atomic::AtomicU64,
    /// The revision enforced and how the last folder reload went, for the gateway
    /// (hello, then a heartbeat on each change).
    status: tokio::sync::watch::Sender<nexus_proto::control::PolicyStatus>,
    /// Set with connection workers (`offload_slow_decisions`): the places for decisions
    /// taken off the workers.
    offload: std::sync::OnceLock<Arc<tokio::sync::Semaphore>>,
}

/// One request in this many leaves its input in the verification sample.
const SAMPLE_EVERY: u64 = 64;

impl std::fmt::Debug for PolicyRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyRuntime")
            .field("dir", &self.config.dir)
            .finish()
    }
}

/// What the watcher compares: the folder's files by name, size, modification and
/// change time (ctime moves on every write, even when a tool restores the mtime), and
/// the state file by content (it is small; a same-size rewrite within one clock tick
/// must not be missed).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Fingerprints {
    dir: Vec<(PathBuf, u64, Option<SystemTime>, i64, i64)>,
    state: Option<Vec<u8>>,
}

impl Fingerprints {
    fn take(dir: &Path, state_file: Option<&Path>) -> Self {
        let mut entries = Vec::new();
        walk(dir, &mut entries);
        entries.sort();
        let state = state_file.and_then(|p| std::fs::read(p).ok()).map(|bytes| {
            ring::digest::digest(&ring::digest::SHA256, &bytes)
                .as_ref()
                .to_vec()
        });
        Self {
            dir: entries,
            state,
        }
    }
}

fn walk(dir: &Path, out: &mut Vec<(PathBuf, u64, Option<SystemTime>, i64, i64)>) {
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

/// The budgets of the folder's bindings; a malformed one is a load error naming the
/// binding and the field (docs/anomaly.md).
fn budgets_of(bundle: &Bundle) -> Result<nexus_anomaly::Budgets, PolicyError> {
    let data = serde_json::to_value(&bundle.data).map_err(|e| PolicyError::Data {
        file: bundle.root.display().to_string(),
        message: format!("data cannot be read as JSON: {e}"),
    })?;
    let bindings = data
        .get("nexus")
        .and_then(|n| n.get("bindings"))
        .cloned()
        .unwrap_or(serde_json::Value::Null);
    nexus_anomaly::budget::from_bindings(&bindings).map_err(|e| PolicyError::Data {
        file: format!("{} (data.nexus.bindings)", bundle.root.display()),
        message: e.to_string(),
    })
}

impl PolicyRuntime {
    /// A runtime with nothing loaded yet (every request is denied until the first load).
    pub fn new(config: PolicyConfig, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            current: ArcSwapOption::empty(),
            metrics,
            state_seen: std::sync::atomic::AtomicBool::new(false),
            external: std::sync::Mutex::new(None),
            cache: DecisionCache::new(CacheLimits {
                max_entries: config.cache_max_entries,
                max_bytes: config.cache_max_bytes,
            }),
            samples: std::sync::Mutex::new(std::collections::VecDeque::new()),
            seen: std::sync::atomic::AtomicU64::new(0),
            status: tokio::sync::watch::channel(Default::default()).0,
            offload: std::sync::OnceLock::new(),
            config,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &PolicyConfig {
        &self.config
    }

    /// With connection workers (`limits.runtime = "workers"`): a decision of a revision
    /// that does not run natively (the RVM or the interpreter, which may take up to
    /// `policy.eval_timeout`) is taken on the blocking pool rather than on the worker
    /// serving the connection, at most `slots` at once (`policy.max_slow_decisions`); the
    /// others wait their turn without holding a worker. Native decisions take microseconds and
    /// stay on the worker.
    pub fn offload_slow_decisions(&self, slots: usize) {
        let _ = self
            .offload
            .set(Arc::new(tokio::sync::Semaphore::new(slots.max(1))));
    }

    /// The places for decisions taken off the workers, when they are.
    pub fn offload(&self) -> Option<Arc<tokio::sync::Semaphore>> {
        self.offload.get().cloned()
    }

    /// The decision cache.
    pub fn cache(&self) -> &DecisionCache {
        &self.cache
    }

    /// Evaluates `loaded`'s enforced rule for `input` through the decision cache, and
    /// keeps the input in the verification sample now and then.
    pub fn decide(&self, loaded: &Loaded, input: Value) -> CachedDecision {
        self.sample(&input);
        loaded.policy.evaluate_cached(&self.cache, input)
    }

    /// [`PolicyRuntime::decide`] when the decision is cached (a hit, answered at once);
    /// None when it must be evaluated.
    pub fn decide_if_cached(&self, loaded: &Loaded, input: &Value) -> Option<CachedDecision> {
        let hit = loaded.policy.cached(&self.cache, input)?;
        self.sample(input);
        Some(hit)
    }

    /// [`PolicyRuntime::decide_if_cached`] without the input document: the key is
    /// written from the request's facts (`input::write_key`), for a revision whose key
    /// reads only scalar fields. With `miss_here`, a miss is decided here too, on the
    /// document `document` makes, under the key already written (`Policy::decide_parts`:
    /// the key is written and looked up once); without it (a revision that may decide
    /// slowly, whose miss the caller takes off its worker) None on a miss. None also
    /// when the key cannot be written so, or the revision is not cached (the caller then
    /// builds the document and decides). `document` makes the input only for a miss
    /// decided here or when the verification sample takes this request's.
    pub fn decide_from_facts(
        &self,
        loaded: &Loaded,
        facts: &super::input::RequestFacts<'_>,
        resolved: &super::input::Resolved<'_>,
        miss_here: bool,
        document: impl FnOnce() -> Value,
    ) -> Option<CachedDecision> {
        if !loaded.needs.key_from_facts() {
            return None;
        }
        let write =
            |out: &mut Vec<u8>| super::input::write_key(facts, resolved, &loaded.needs, out);
        if miss_here {
            // A miss's document is the one the sample may take; a hit makes one only
            // for the sample.
            let mut document = Some(document);
            let decided =
                loaded
                    .policy
                    .decide_parts(&self.cache, resolved.time_ns(), write, || {
                        let input = document.take().map_or(Value::Undefined, |make| make());
                        self.sample(&input);
                        input
                    })?;
            if let Some(make) = document {
                self.sample_with(make);
            }
            return Some(decided);
        }
        let hit = loaded
            .policy
            .cached_parts(&self.cache, resolved.time_ns(), write)?;
        self.sample_with(document);
        Some(hit)
    }

    /// Keeps `input` in the verification sample now and then.
    fn sample(&self, input: &Value) {
        self.sample_with(|| input.clone());
    }

    /// Keeps the input `input` makes in the verification sample now and then (it is
    /// made only then).
    fn sample_with(&self, input: impl FnOnce() -> Value) {
        let n = self.seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if self.config.verify_sample > 0
            && n.is_multiple_of(SAMPLE_EVERY)
            && let Ok(mut samples) = self.samples.try_lock()
        {
            if samples.len() >= self.config.verify_sample {
                samples.pop_front();
            }
            samples.push_back(input());
        }
    }

    fn verify_options(&self) -> VerifyOptions {
        VerifyOptions {
            sample: self
                .samples
                .lock()
                .map(|s| s.iter().cloned().collect())
                .unwrap_or_default(),
            ..VerifyOptions::default()
        }
    }

    /// The current revision, if one loaded.
    pub fn current(&self) -> Option<Arc<Loaded>> {
        self.current.load_full()
    }

    fn options(&self, rule: &str) -> PolicyOptions {
        PolicyOptions {
            decision_rule: rule.to_string(),
            eval_timeout: self.config.eval_timeout,
            max_instructions: self.config.max_instructions,
            max_made_values: self.config.max_made_values,
            mode: match self.config.mode {
                PolicyMode::Compiled | PolicyMode::Rvm => EvalMode::Compiled,
                PolicyMode::Interpreted => EvalMode::Interpreted,
            },
            native: self.config.mode == PolicyMode::Compiled,
        }
    }

    /// Checks the folder in an isolated child under the load limits (its tests, the
    /// decision rule compiled and evaluated once: `nexus_policy::isolate`), then loads and
    /// compiles the same revision here with the state file; does not publish.
    pub fn build(&self) -> Result<Loaded, PolicyError> {
        let limits = isolate::Limits {
            timeout: self.config.load_timeout,
            max_memory: self.config.load_max_memory,
        };
        let request = isolate::request(
            &self.config.dir,
            vec![self.config.decision_rule.clone()],
            self.config.run_tests_on_reload,
            &self.options(&self.config.decision_rule),
            limits,
        );
        let checked = isolate::check(&request, limits)?;
        let bundle = Bundle::load(&self.config.dir)?;
        budgets_of(&bundle)?;
        if bundle.revision != checked.revision {
            // Edited between the check and this load: that edit is a new revision, checked
            // on the watcher's next round.
            return Err(PolicyError::Data {
                file: self.config.dir.display().to_string(),
                message: format!(
                    "changed while revision {} was being checked; checking the new one next",
                    checked.revision
                ),
            });
        }
        tracing::debug!(revision = %checked.revision, tests = checked.tests, took = ?checked.took, "policy revision checked");
        self.metrics.policy_check(checked.took);
        self.build_with(bundle, None)
    }

    /// Re-reads only the state file and swaps the runtime data into the current
    /// revision: no folder reload, no tests, and (compiled mode) no recompile, so a
    /// revocation applies as fast as the file is noticed.
    fn build_data(&self, current: &Loaded) -> Result<Loaded, PolicyError> {
        self.build_with(current.bundle.clone(), Some(current))
    }

    fn build_with(&self, bundle: Bundle, current: Option<&Loaded>) -> Result<Loaded, PolicyError> {
        let external = self
            .external
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut runtime = match external {
            Some(data) => data,
            None => self.read_state()?,
        };
        let state_file = self
            .config
            .state_file
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        for (id, ex) in &mut runtime.executions {
            ex.id = id.clone();
            let ends = time::OffsetDateTime::parse(
                &ex.not_after,
                &time::format_description::well_known::Rfc3339,
            )
            .map_err(|e| PolicyError::Data {
                file: state_file.clone(),
                message: format!(
                    "execution {id}: not_after `{}` is not RFC 3339: {e}",
                    ex.not_after
                ),
            })?
            .to_offset(time::UtcOffset::UTC);
            ex.ends_unix_nanos = ends.unix_timestamp_nanos();
            // One canonical spelling (UTC, `T`, `Z`): Go's RFC 3339 parser, and so OPA's
            // time.parse_rfc3339_ns, refuses spellings the `time` crate accepts
            // (lowercase t/z, a space for T, leap second 60), and policies must not
            // depend on which engine reads them.
            ex.not_after = ends
                .format(&time::format_description::well_known::Rfc3339)
                .map_err(|e| PolicyError::Data {
                    file: state_file.clone(),
                    message: format!("execution {id}: not_after cannot be written back: {e}"),
                })?;
        }
        let registry = runtime.registry_bindings();
        // Built on the revision in force only while the bindings' source is the same.
        let current = current.filter(|c| c.registry == registry.is_some());
        let budgets = match &registry {
            Some(bindings) => {
                Arc::new(nexus_anomaly::budget::from_bindings(bindings).map_err(|e| {
                    PolicyError::Data {
                        file: "the gateway's plugin registry (data.nexus.bindings)".into(),
                        message: e.to_string(),
                    }
                })?)
            }
            None => match current {
                Some(current) => current.budgets.clone(),
                None => Arc::new(budgets_of(&bundle)?),
            },
        };
        let compiled = if registry.is_some() {
            std::borrow::Cow::Owned(without_bindings(&bundle))
        } else {
            std::borrow::Cow::Borrowed(&bundle)
        };
        let value = runtime.to_value();
        let policy = match current {
            Some(current) => current.policy.with_runtime_data(&compiled, &value)?,
            None => Policy::compile_with(
                &compiled,
                &value,
                self.options(&self.config.decision_rule),
                &self.verify_options(),
            )?,
        };
        let shadow = match (
            &self.config.shadow_rule,
            current.and_then(|c| c.shadow.as_ref()),
        ) {
            (Some(_), Some(shadow)) => Some(shadow.with_runtime_data(&compiled, &value)?),
            (Some(rule), None) => match Policy::compile(&compiled, &value, self.options(rule)) {
                Ok(shadow) => Some(shadow),
                Err(error) => {
                    // The shadow rule is never enforced: a broken one must not keep the
                    // enforced revision from serving.
                    tracing::warn!(%error, rule, "shadow rule does not compile; evaluating without it");
                    None
                }
            },
            (None, _) => None,
        };
        let mut executions: HashMap<String, HashMap<String, Vec<Execution>>> = HashMap::new();
        let mut by_id = HashMap::new();
        for (id, ex) in runtime.executions {
            executions
                .entry(ex.plugin.clone())
                .or_default()
                .entry(ex.clause.clone())
                .or_default()
                .push(ex.clone());
            by_id.insert(id, ex);
        }
        for list in executions.values_mut().flat_map(HashMap::values_mut) {
            list.sort_by_key(|ex| std::cmp::Reverse(ex.ends_unix_nanos));
        }
        drop(compiled);
        let needs = super::input::Needs::of(&policy, shadow.as_ref());
        Ok(Loaded {
            needs,
            policy,
            shadow,
            executions,
            by_id,
            bundle,
            registry: registry.is_some(),
            budgets,
        })
    }

    fn read_state(&self) -> Result<RuntimeData, PolicyError> {
        let Some(path) = &self.config.state_file else {
            return Ok(RuntimeData::default());
        };
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    && !self.state_seen.load(std::sync::atomic::Ordering::Relaxed) =>
            {
                // Not written yet (e.g. before the first push): no executions, no
                // revocations.
                return Ok(RuntimeData::default());
            }
            Err(e) => {
                return Err(PolicyError::Read {
                    file: path.display().to_string(),
                    reason: e.to_string(),
                });
            }
        };
        self.state_seen
            .store(true, std::sync::atomic::Ordering::Relaxed);
        serde_json::from_str(&text).map_err(|e| PolicyError::Data {
            file: path.display().to_string(),
            message: format!("line {} column {}: {e}", e.line(), e.column()),
        })
    }

    /// Builds and publishes once; on error keeps the previous revision.
    pub fn reload(&self) -> Result<(), PolicyError> {
        let built = self.build();
        let result = self.publish(built);
        let now = crate::control::unix_ms();
        let revision = self
            .current()
            .map(|l| l.policy.revision().to_string())
            .unwrap_or_default();
        self.status.send_if_modified(|s| {
            let before = s.clone();
            match &result {
                Ok(()) => {
                    if s.revision != revision {
                        s.loaded_unix_ms = now;
                    }
                    s.reload_error.clear();
                }
                Err(error) => {
                    s.reload_error = error.to_string();
                    s.failed_unix_ms = now;
                }
            }
            s.revision = revision;
            *s != before
        });
        result
    }

    /// The policy status to report to the gateway; changes are published on it.
    pub fn status(&self) -> tokio::sync::watch::Receiver<nexus_proto::control::PolicyStatus> {
        self.status.subscribe()
    }

    /// Takes runtime data from the gateway from now on, without applying it yet (before
    /// the first load: the last snapshot kept on disk).
    pub fn use_external(&self, data: RuntimeData) {
        *self.external.lock().unwrap_or_else(|p| p.into_inner()) = Some(data);
    }

    /// Takes runtime data from the gateway from now on (see `external`) and applies it
    /// to the current revision. Without one (none loaded yet, or none passed its checks)
    /// the data waits for the first revision and this is an error: requests are refused
    /// meanwhile, and the caller must not count the data as applied.
    pub fn set_external(&self, data: RuntimeData) -> Result<(), PolicyError> {
        *self.external.lock().unwrap_or_else(|p| p.into_inner()) = Some(data);
        let Some(current) = self.current() else {
            return Err(PolicyError::RegoUnlocated(format!(
                "no policy revision of {} is loaded yet (see the policy errors in the log), so the gateway's data cannot be applied to one",
                self.config.dir.display()
            )));
        };
        self.publish(self.build_data(&current))
    }

    fn state_watched(&self) -> Option<&Path> {
        let external = self
            .external
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some();
        if external {
            None
        } else {
            self.config.state_file.as_deref()
        }
    }

    /// Applies a state-file change to the current revision (a full reload if none).
    pub fn reload_data(&self) -> Result<(), PolicyError> {
        match self.current() {
            Some(current) => self.publish(self.build_data(&current)),
            None => self.reload(),
        }
    }

    fn publish(&self, built: Result<Loaded, PolicyError>) -> Result<(), PolicyError> {
        match built {
            Ok(loaded) => {
                let revision = loaded.policy.revision().to_string();
                let cache_plan = loaded
                    .policy
                    .cache_plan()
                    .map(|p| p.describe())
                    .map_err(String::from);
                let previous = self.current.swap(Some(Arc::new(loaded)));
                // Entries of the previous policy or data can never be served again
                // (their generation is gone): free them now.
                self.cache.clear();
                self.metrics.policy_reload("ok");
                if previous.as_ref().map(|p| p.policy.revision()) != Some(revision.as_str()) {
                    tracing::info!(%revision, dir = %self.config.dir.display(), "policy revision loaded");
                    match cache_plan {
                        Ok(paths) if self.config.cache_max_entries > 0 => {
                            tracing::info!(%revision, key = ?paths, "decisions are cached, keyed on these input paths")
                        }
                        Ok(_) => {}
                        Err(why) => tracing::warn!(
                            %revision,
                            because = %why,
                            "decisions of this revision are not cached: the cache cannot key them soundly"
                        ),
                    }
                }
                Ok(())
            }
            Err(error) => {
                self.metrics.policy_reload("error");
                let serving = self.current().map(|l| l.policy.revision().to_string());
                tracing::error!(
                    %error,
                    location = error.location().map(|l| l.to_string()).unwrap_or_default(),
                    serving = serving.as_deref().unwrap_or("none: denying every request"),
                    "policy refused; the last good revision keeps serving"
                );
                Err(error)
            }
        }
    }

    /// The first load, before the sidecar listens; returns what the watcher starts from.
    pub fn load_initial(&self) -> Fingerprints {
        let before = Fingerprints::take(&self.config.dir, self.state_watched());
        let _ = self.reload();
        before
    }

    /// Watches the folder and the state file forever, from `last` (see `load_initial`).
    pub async fn watch(self: Arc<Self>, mut last: Fingerprints) {
        loop {
            tokio::time::sleep(self.config.reload_interval.max(Duration::from_millis(50))).await;
            let this = self.clone();
            let Ok(current) = tokio::task::spawn_blocking(move || {
                Fingerprints::take(&this.config.dir, this.state_watched())
            })
            .await
            else {
                continue;
            };
            if current == last {
                continue;
            }
            let folder_changed = current.dir != last.dir;
            let this = self.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if folder_changed {
                    this.reload()
                } else {
                    this.reload_data()
                }
            })
            .await;
            last = current;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, state: &Path) -> PolicyConfig {
        let toml = format!(
            "dir = {:?}\nstate_file = {:?}\n",
            dir.to_string_lossy(),
            state.to_string_lossy()
        );
        toml::from_str(&toml).unwrap()
    }

    /// `mode = "compiled"` (the default) serves a policy nexus's own evaluator takes with
    /// it; `mode = "rvm"` keeps it on the RVM; `mode = "interpreted"` on the interpreter.
    #[test]
    fn the_configured_mode_is_the_mode_served() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("p.rego"),
            "package nexus.authz

decision := {\"allow\": input.a == 1, \"reasons\": []}
",
        )
        .unwrap();
        let state = dir.path().join(".runtime.json");
        for (mode, served) in [
            ("", EvalMode::Native),
            ("mode = \"compiled\"\n", EvalMode::Native),
            ("mode = \"rvm\"\n", EvalMode::Compiled),
            ("mode = \"interpreted\"\n", EvalMode::Interpreted),
        ] {
            let toml = format!(
                "dir = {:?}\nstate_file = {:?}\n{mode}",
                dir.path().to_string_lossy(),
                state.to_string_lossy()
            );
            let runtime = PolicyRuntime::new(toml::from_str(&toml).unwrap(), Metrics::new());
            let loaded = runtime.build().unwrap();
            assert_eq!(loaded.policy.mode(), served, "{mode}");
            let allow = |a: i64| {
                loaded
                    .policy
                    .evaluate(nexus_policy::Value::from(serde_json::json!({ "a": a })))
                    .allow
            };
            assert!(allow(1) && !allow(2), "{mode}");
        }
    }

    /// A decision the cache holds is found from the request's facts, without its input
    /// document: the same decision, counted as a hit; a request that differs in a keyed
    /// field is not served it, and a lookup that finds nothing counts no miss (the
    /// evaluation that follows counts it).
    #[test]
    fn a_cached_decision_is_found_from_the_facts_without_the_document() {
        use super::super::input::{RequestFacts, document, resolve};
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("authz.rego"),
            include_str!("../../../policies/nexus/authz/authz.rego"),
        )
        .unwrap();
        let state = dir.path().join(".runtime.json");
        std::fs::write(
            &state,
            r#"{"executions": {"ex-1": {"plugin": "spiffe://td/p", "clause": "c-1", "not_after": "2026-11-26T10:00:00Z"}}}"#,
        )
        .unwrap();
        let config = config(dir.path(), &state);
        let runtime = PolicyRuntime::new(config.clone(), Metrics::new());
        let loaded = runtime.build().unwrap();
        assert!(loaded.needs.key_from_facts());
        let uri: http::Uri = "/clauses/c-1/rain".parse().unwrap();
        let mut host = http::HeaderMap::new();
        host.insert("host", "data".parse().unwrap());
        let target = crate::proxy::normalize::normalize(
            &uri,
            &host,
            http::Version::HTTP_11,
            &crate::proxy::normalize::NormalizeLimits::default(),
        )
        .unwrap();
        let headers = http::HeaderMap::new();
        let facts = |method| RequestFacts {
            direction: "inbound",
            source: "spiffe://td/p",
            destination: "spiffe://td/d",
            method,
            target: &target,
            headers: &headers,
            body_size: 0,
        };
        let now = time::macros::datetime!(2026-11-26 09:00 UTC);
        let lookup = |method| {
            let facts = facts(method);
            let resolved = resolve(&facts, &config, &loaded, now);
            runtime.decide_from_facts(&loaded, &facts, &resolved, false, || {
                document(&facts, &config, &loaded, &resolved)
            })
        };
        assert!(lookup("GET").is_none(), "an empty cache holds nothing");
        let get = facts("GET");
        let resolved = resolve(&get, &config, &loaded, now);
        let evaluated = runtime.decide(&loaded, document(&get, &config, &loaded, &resolved));
        assert!(!evaluated.cached);
        let hit = lookup("GET").expect("the decision is cached");
        assert!(hit.cached);
        assert_eq!(hit.decision, evaluated.decision);
        assert!(lookup("HEAD").is_none(), "another method is another key");
        let stats = runtime.cache().stats();
        assert_eq!((stats.hits, stats.misses), (1, 1));

        // A miss decided from the facts: the same decision as the document's evaluation
        // (the debug build checks the key written against the document's), looked up
        // and counted once, and kept for the next request.
        let decide_here = |method| {
            let facts = facts(method);
            let resolved = resolve(&facts, &config, &loaded, now);
            runtime
                .decide_from_facts(&loaded, &facts, &resolved, true, || {
                    document(&facts, &config, &loaded, &resolved)
                })
                .expect("the key is written from the facts")
        };
        let head = decide_here("HEAD");
        assert!(!head.cached);
        let evaluated = loaded.policy.evaluate(document(
            &facts("HEAD"),
            &config,
            &loaded,
            &resolve(&facts("HEAD"), &config, &loaded, now),
        ));
        assert_eq!(head.decision, evaluated);
        let post = decide_here("POST");
        assert!(!post.decision.allow, "{:?}", post.decision);
        let stats = runtime.cache().stats();
        assert_eq!((stats.hits, stats.misses), (1, 3));
        let again = decide_here("HEAD");
        assert!(again.cached);
        assert_eq!(again.decision, head.decision);
        assert_eq!(runtime.cache().stats().hits, 2);
        assert_eq!(lookup("POST").map(|d| d.decision), Some(post.decision));
    }

    #[test]
    fn executions_are_canonicalized_and_indexed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("p.rego"),
            "package nexus.authz\n\ndecision := {\"allow\": true, \"reasons\": []}\n",
        )
        .unwrap();
        let state = dir.path().join(".runtime.json");
        std::fs::write(
            &state,
            r#"{"executions": {"ex-1": {"plugin": "spiffe://td/p", "clause": "c1", "not_after": "2026-11-26t10:00:00+01:00"},
                               "ex-2": {"plugin": "spiffe://td/p", "clause": "c1", "not_after": "2026-11-26 12:00:00z"}}}"#,
        )
        .unwrap();
        let runtime = PolicyRuntime::new(config(dir.path(), &state), Metrics::new());
        let loaded = runtime.build().unwrap();
        let ex = &loaded.policy.data()["nexus"]["executions"]["ex-1"]["not_after"];
        assert_eq!(ex.as_string().unwrap().as_ref(), "2026-11-26T09:00:00Z");
        // The open execution that ends last wins when none is named.
        let at = time::macros::datetime!(2026-11-26 08:00 UTC).unix_timestamp_nanos();
        assert_eq!(
            loaded
                .execution_for(None, "spiffe://td/p", Some("c1"), at)
                .unwrap()
                .id,
            "ex-2"
        );
        let late = time::macros::datetime!(2026-11-26 13:00 UTC).unix_timestamp_nanos();
        assert!(
            loaded
                .execution_for(None, "spiffe://td/p", Some("c1"), late)
                .is_none()
        );
        assert_eq!(
            loaded
                .execution_for(Some("ex-1"), "x", None, late)
                .unwrap()
                .id,
            "ex-1"
        );
    }

    #[test]
    fn registry_bindings_replace_the_folders_and_carry_budgets() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("p.rego"),
            "package nexus.authz\n\ndecision := {\"allow\": true, \"reasons\": []}\n",
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("nexus")).unwrap();
        // The folder binds two workloads (one of them with budgets).
        std::fs::write(
            dir.path().join("nexus/bindings.yaml"),
            "bindings:\n  spiffe://td/p:\n    clauses: [c-1, c-9]\n    budgets: {requests_per_s: 1, egress_bytes: 1, distinct_clauses: 1, window: 1s}\n  spiffe://td/intruder: [c-1]\nallowed_methods: [GET]\n",
        )
        .unwrap();
        let state = dir.path().join(".runtime.json");
        let runtime = PolicyRuntime::new(config(dir.path(), &state), Metrics::new());
        runtime.reload().unwrap();
        let folder = runtime.current().unwrap();
        assert_eq!(
            folder.policy.data()["nexus"]["bindings"]["spiffe://td/intruder"],
            Value::from(serde_json::json!(["c-1"]))
        );
        assert_eq!(folder.budgets["spiffe://td/p"].requests_per_s, 1.0);
        // The gateway runs a registry: its bindings alone, the folder's other data kept.
        let mut data = RuntimeData {
            registry: Some(std::collections::BTreeMap::from([(
                "uid/1.0.0".to_string(),
                RegistryBinding {
                    spiffe_id: "spiffe://td/p".into(),
                    clauses: vec!["c-1".into()],
                    budgets: Some(
                        serde_json::json!({"requests_per_s": 7, "egress_bytes": 10, "distinct_clauses": 2, "window": "1s"}),
                    ),
                    certified_unix_ms: 1,
                },
            )])),
            ..RuntimeData::default()
        };
        runtime.set_external(data.clone()).unwrap();
        let loaded = runtime.current().unwrap();
        let bindings = &loaded.policy.data()["nexus"]["bindings"];
        assert_eq!(
            *bindings,
            Value::from(
                serde_json::json!({"spiffe://td/p": {"clauses": ["c-1"], "budgets": {"requests_per_s": 7, "egress_bytes": 10, "distinct_clauses": 2, "window": "1s"}}})
            )
        );
        assert_eq!(
            loaded.policy.data()["nexus"]["allowed_methods"],
            Value::from(serde_json::json!(["GET"]))
        );
        assert_eq!(loaded.budgets["spiffe://td/p"].requests_per_s, 7.0);
        assert!(!loaded.budgets.contains_key("spiffe://td/intruder"));
        // Nothing certified: nobody is bound, whatever the folder says.
        data.registry = Some(std::collections::BTreeMap::new());
        runtime.set_external(data).unwrap();
        assert_eq!(
            runtime.current().unwrap().policy.data()["nexus"]["bindings"],
            Value::from(serde_json::json!({}))
        );
        // Back to a gateway without a registry: the folder's bindings again.
        runtime.set_external(RuntimeData::default()).unwrap();
        assert_eq!(
            runtime.current().unwrap().policy.data()["nexus"]["bindings"]["spiffe://td/intruder"],
            Value::from(serde_json::json!(["c-1"]))
        );
    }

    #[test]
    fn a_bad_not_after_refuses_the_state_with_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("p.rego"),
            "package nexus.authz\n\ndecision := {\"allow\": true}\n",
        )
        .unwrap();
        let state = dir.path().join(".runtime.json");
        std::fs::write(
            &state,
            r#"{"executions": {"ex-1": {"plugin": "p", "clause": "c", "not_after": "tomorrow"}}}"#,
        )
        .unwrap();
        let runtime = PolicyRuntime::new(config(dir.path(), &state), Metrics::new());
        let err = runtime.build().unwrap_err().to_string();
        assert!(
            err.contains(".runtime.json") && err.contains("ex-1") && err.contains("tomorrow"),
            "{err}"
        );
    }
}
