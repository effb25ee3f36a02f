//! The two steps that decide whether a request may pass: normalize the target (400 on
//! an ambiguous one), then evaluate the policy on it (403 on a deny). What the policy
//! saw is what is forwarded: the normalize step rewrites the URI to the normalized path.

use std::ops::ControlFlow;
use std::sync::Arc;

use http::{HeaderValue, Request};
use http_body::Body;

use super::normalize::{NormalizeLimits, Normalized, normalize};
use super::outcome::{Decision, Exchange, Refusal, Verdict};
use super::{AnswerFuture, Next, Step};
use crate::metrics::{Direction, Metrics};
use crate::policy::input::{RequestFacts, document, resolve};
use crate::policy::{Loaded, PolicyRuntime};
use nexus_policy::{CachedDecision, EvalMode};

pub use super::outcome::DECISION_ID_HEADER;

/// Normalizes the request target (see policies/PATHS.md) and rewrites the URI to it;
/// refuses an ambiguous one ([`Refusal::Ambiguous`]).
#[derive(Clone, Debug)]
pub struct NormalizeLayer {
    limits: NormalizeLimits,
}

impl NormalizeLayer {
    /// A layer with the given limits.
    pub fn new(limits: NormalizeLimits) -> Self {
        Self { limits }
    }
}

impl<S: Next<B>, B> Step<S, B> for NormalizeLayer {
    type Body = B;

    fn call(&self, mut req: Request<B>, next: &mut S) -> AnswerFuture {
        let normalized = match normalize(req.uri(), req.headers(), req.version(), &self.limits) {
            Ok(normalized) => normalized,
            Err(error) => {
                let refusal = Refusal::Ambiguous(error);
                if let Some(exchange) = Exchange::of(req.extensions()) {
                    exchange.decide(Decision::without_policy(
                        Verdict::Malformed,
                        refusal.to_string(),
                    ));
                }
                return Box::pin(async move { Err(refusal) });
            }
        };
        let mut parts = req.uri().clone().into_parts();
        parts.path_and_query = Some(normalized.path_and_query());
        // Origin-form from here on: the forward step sets scheme and authority.
        parts.scheme = None;
        parts.authority = None;
        if let Ok(uri) = http::Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
        if let Some(exchange) = Exchange::of(req.extensions()) {
            exchange.set_path(&normalized.path);
        }
        req.extensions_mut().insert(Arc::new(normalized));
        Box::pin(next.call(req))
    }
}

/// Who is on each side, fixed per connection.
#[derive(Clone, Debug)]
pub struct Parties {
    /// `inbound` or `outbound`.
    pub direction: Direction,
    /// The source SPIFFE ID.
    pub source: Arc<str>,
    /// The destination SPIFFE ID.
    pub destination: Arc<str>,
}

/// Evaluates the policy; a deny is refused ([`Refusal::Denied`]: 403 with a decision id
/// and the reasons).
#[derive(Clone, Debug)]
pub struct PolicyLayer {
    runtime: Arc<PolicyRuntime>,
    metrics: Arc<Metrics>,
    parties: Parties,
}

impl PolicyLayer {
    /// A layer evaluating `runtime`'s current revision for `parties`.
    pub fn new(runtime: Arc<PolicyRuntime>, metrics: Arc<Metrics>, parties: Parties) -> Self {
        Self {
            runtime,
            metrics,
            parties,
        }
    }
}

/// Whether `plugin` is bound to `clause` in the policy data (`data.nexus.bindings`);
/// `None` when the data has no bindings for anyone.
fn bound(loaded: &Loaded, plugin: &str, clause: &str) -> Option<bool> {
    let bindings = &loaded.policy.data()["nexus"]["bindings"];
    if *bindings == nexus_policy::Value::Undefined {
        return None;
    }
    // A binding is a list of clauses, or an object whose `clauses` is that list (and
    // whose `budgets` the watch reads).
    // Type tests by pattern, not `as_array()`: regorus's `as_*` errors are anyhow errors,
    // which capture a backtrace when RUST_BACKTRACE is set (tens of µs per request).
    use nexus_policy::Value;
    let entry = &bindings[plugin];
    let list = match entry {
        Value::Array(_) => entry,
        _ => &entry["clauses"],
    };
    Some(match list {
        Value::Array(clauses) => clauses
            .iter()
            .any(|c| matches!(c, Value::String(s) if s.as_ref() == clause)),
        _ => false,
    })
}

/// Decision ids drawn per `getrandom(2)` call and thread (16 bytes each).
const IDS_PER_DRAW: usize = 64;

/// A random 128-bit decision id, hex. The bytes come from the OS generator, drawn for
/// [`IDS_PER_DRAW`] ids at once per thread: one system call per request was about a
/// third of a microsecond here, and the ids need only be unique and unguessable, which
/// the OS's bytes are however many are taken at a time.
fn decision_id() -> String {
    use std::cell::RefCell;
    thread_local! {
        static POOL: RefCell<([u8; 16 * IDS_PER_DRAW], usize)> =
            const { RefCell::new(([0; 16 * IDS_PER_DRAW], 16 * IDS_PER_DRAW)) };
    }
    let bytes = POOL.with_borrow_mut(|(pool, used)| {
        if *used == pool.len() {
            if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), pool).is_err() {
                return None;
            }
            *used = 0;
        }
        // Each id's bytes are handed out once: `used` only moves forward until a refill.
        let mut id = [0u8; 16];
        id.copy_from_slice(&pool[*used..*used + 16]);
        *used += 16;
        Some(id)
    });
    let Some(bytes) = bytes else {
        return "unavailable".into();
    };
    // Hex by table: this runs on every request (no formatting machinery per byte).
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(32);
    for b in bytes {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out
}

impl<B: Body + Send + 'static, S: Next<B> + Clone + Send + 'static> Step<S, B> for PolicyLayer {
    type Body = B;

    fn call(&self, req: Request<B>, next: &mut S) -> AnswerFuture {
        let exchange = Exchange::of(req.extensions()).cloned();
        let decide = |decision: Decision| {
            if let Some(exchange) = &exchange {
                exchange.decide(decision);
            }
        };
        let id = decision_id();
        let direction = self.parties.direction;
        // Refused before evaluating: the decision carries the refusal's reason.
        let refuse = |refusal: Refusal, verdict: Verdict| -> AnswerFuture {
            decide(Decision {
                id: id.clone(),
                ..Decision::without_policy(verdict, refusal.to_string())
            });
            Box::pin(async move { Err(refusal) })
        };
        let Some(loaded) = self.runtime.current() else {
            self.metrics.decision(direction, "no_policy");
            let decision_id = id.clone();
            return refuse(Refusal::NoPolicy { decision_id }, Verdict::NoPolicy);
        };
        let Some(target) = req.extensions().get::<Arc<Normalized>>().cloned() else {
            let decision_id = id.clone();
            return refuse(Refusal::NotNormalized { decision_id }, Verdict::Error);
        };
        let body_size = req
            .body()
            .size_hint()
            .exact()
            .and_then(|n| i64::try_from(n).ok())
            .unwrap_or(-1);
        let facts = RequestFacts {
            direction,
            source: &self.parties.source,
            destination: &self.parties.destination,
            method: req.method().as_str(),
            target: &target,
            headers: req.headers(),
            body_size,
        };
        let config = self.runtime.config();
        let resolved = resolve(&facts, config, &loaded, nexus_identity::clock::now());
        let clause = resolved.clause.map(String::from);
        let execution = resolved.execution_id();
        // A cached decision is found from the request's facts when the revision's key
        // reads only scalar fields: a hit (a plugin repeating its reads) builds no input
        // document. A shadow rule evaluates the document, so it is built then.
        let from_facts = loaded.shadow.is_none() && loaded.needs.key_from_facts();
        let slow = |policy: &nexus_policy::Policy| policy.mode() != EvalMode::Native;
        // A revision nexus's own evaluator decides (microseconds) decides a miss here
        // too, under the key written from the facts: the key is written and looked up
        // once. A slow one's miss is taken off the worker below.
        let miss_here = !slow(&loaded.policy);
        let decided = from_facts
            .then(|| {
                self.runtime
                    .decide_from_facts(&loaded, &facts, &resolved, miss_here, || {
                        document(&facts, config, &loaded, &resolved)
                    })
            })
            .flatten();
        // The decision (a hit, or a miss decided from the facts), or else the document
        // to decide on.
        let found = match decided {
            Some(decided) => ControlFlow::Break(decided),
            None => ControlFlow::Continue(document(&facts, config, &loaded, &resolved)),
        };
        let taken = Taken {
            exchange,
            id,
            loaded,
            target,
            clause,
            execution,
        };
        let input = match found {
            ControlFlow::Break(hit) => return self.conclude(taken, hit, None, req, next),
            ControlFlow::Continue(input) => input,
        };
        let shadow_input = taken.loaded.shadow.as_ref().map(|_| input.clone());
        let loaded = &taken.loaded;
        if (slow(&loaded.policy) || loaded.shadow.as_ref().is_some_and(slow))
            && let Some(slots) = self.runtime.offload()
        {
            // A hit is answered here, in microseconds (unless a slow shadow rule is to
            // be evaluated beside it, or the lookup from the facts above missed).
            if !from_facts
                && !loaded.shadow.as_ref().is_some_and(slow)
                && let Some(hit) = self.runtime.decide_if_cached(loaded, &input)
            {
                let shadow = shadow_decision(loaded, shadow_input);
                return self.conclude(taken, hit, shadow, req, next);
            }
            // A decision that may take long (the RVM or the interpreter, up to
            // policy.eval_timeout) runs off the connection worker, so that the other
            // connections of that worker go on meanwhile (`PolicyRuntime::offload`).
            let ready = next.clone();
            let mut next = std::mem::replace(next, ready);
            let this = self.clone();
            return Box::pin(async move {
                let started = std::time::Instant::now();
                let runtime = this.runtime.clone();
                let loaded = taken.loaded.clone();
                let taken_off = async move {
                    let permit = slots.acquire_owned().await.map_err(|e| e.to_string())?;
                    tokio::task::spawn_blocking(move || {
                        let _permit = permit;
                        let decided = runtime.decide(&loaded, input);
                        let shadow = shadow_decision(&loaded, shadow_input);
                        (decided, shadow)
                    })
                    .await
                    .map_err(|e| e.to_string())
                };
                let (decided, shadow) = taken_off.await.unwrap_or_else(|error| {
                    let error = format!("policy evaluation did not complete: {error}");
                    let decision = nexus_policy::Decision {
                        allow: false,
                        reasons: Arc::from([error.clone()]),
                        error: Some(error),
                    };
                    let elapsed = started.elapsed();
                    (
                        CachedDecision {
                            decision,
                            cached: false,
                            elapsed,
                        },
                        None,
                    )
                });
                this.conclude(taken, decided, shadow, req, &mut next).await
            });
        }
        let decided = self.runtime.decide(loaded, input);
        let shadow = shadow_decision(loaded, shadow_input);
        self.conclude(taken, decided, shadow, req, next)
    }
}

/// The shadow rule's decision on `input`, when there is one.
fn shadow_decision(
    loaded: &Loaded,
    input: Option<nexus_policy::Value>,
) -> Option<nexus_policy::Decision> {
    loaded
        .shadow
        .as_ref()
        .zip(input)
        .map(|(shadow, input)| shadow.evaluate(input))
}

/// What a request's decision is concluded with, once it is taken (on the connection's
/// worker, or off it).
struct Taken {
    exchange: Option<Arc<Exchange>>,
    id: String,
    loaded: Arc<Loaded>,
    target: Arc<Normalized>,
    clause: Option<String>,
    execution: Option<String>,
}

impl PolicyLayer {
    /// Counts, records and logs `decided` (and the shadow rule's `shadow`), then refuses
    /// the request or sends it on.
    fn conclude<B, S: Next<B>>(
        &self,
        taken: Taken,
        decided: CachedDecision,
        shadow: Option<nexus_policy::Decision>,
        req: Request<B>,
        next: &mut S,
    ) -> AnswerFuture {
        let Taken {
            exchange,
            id,
            loaded,
            target,
            clause,
            execution,
        } = taken;
        let decide = |decision: Decision| {
            if let Some(exchange) = &exchange {
                exchange.decide(decision);
            }
        };
        let direction = self.parties.direction;
        let config = self.runtime.config();
        let (decision, elapsed, cached) = (decided.decision, decided.elapsed, decided.cached);
        self.metrics.policy_evaluation(direction, elapsed);
        let verdict = match (decision.allow, decision.error.is_some(), config.dry_run) {
            (true, _, _) => Verdict::Allow,
            (false, true, false) => Verdict::Error,
            (false, false, false) => Verdict::Deny,
            (false, _, true) => Verdict::DryRunDeny,
        };
        self.metrics.decision(direction, verdict.record());
        let revision = loaded.policy.revision();
        decide(Decision {
            verdict,
            id: id.clone(),
            revision: revision.to_owned(),
            reasons: decision.reasons.clone(),
            evaluation: Some(elapsed),
            cached,
            bound: clause
                .as_deref()
                .and_then(|clause| bound(&loaded, &self.parties.source, clause)),
            clause: clause.clone(),
            execution_id: execution.clone(),
            plugin: execution
                .as_deref()
                .and_then(|execution| loaded.execution(execution))
                .filter(|ex| !ex.plugin_uid.is_empty())
                .map(|ex| {
                    [
                        ex.plugin_uid.clone(),
                        ex.plugin_version.clone(),
                        ex.image_digest.clone(),
                    ]
                }),
        });
        if let (Some(shadow), Some(shadow_decision)) = (&loaded.shadow, shadow) {
            let shadow_result = if shadow_decision.allow {
                "shadow_allow"
            } else {
                "shadow_deny"
            };
            self.metrics.decision(direction, shadow_result);
            if shadow_decision.allow != decision.allow {
                tracing::info!(decision_id = %id, rule = shadow.rule(), enforced = decision.allow, shadow = shadow_decision.allow, reasons = ?shadow_decision.reasons, "shadow policy disagrees");
            }
        }
        tracing::debug!(
            decision_id = %id,
            direction,
            source = %self.parties.source,
            path = %target.path,
            clause = clause.as_deref().unwrap_or(""),
            execution = execution.as_deref().unwrap_or(""),
            allow = decision.allow,
            cached,
            reasons = ?decision.reasons,
            revision,
            "policy decision"
        );
        if !decision.allow && !config.dry_run {
            let refusal = Refusal::Denied {
                decision_id: id,
                reasons: decision.reasons,
                revision: revision.to_owned(),
            };
            return Box::pin(async move { Err(refusal) });
        }
        let header = HeaderValue::from_str(&id).ok();
        let future = next.call(req);
        Box::pin(async move {
            let mut response = future.await?;
            if let Some(value) = header {
                response.headers_mut().insert(DECISION_ID_HEADER, value);
            }
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ids stay 128 random bits each across pool refills and threads: no id is handed
    /// out twice.
    #[test]
    fn decision_ids_are_distinct_hex_across_refills_and_threads() {
        let per_thread = IDS_PER_DRAW * 5 + 3;
        let threads: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(move || {
                    (0..per_thread).map(|_| decision_id()).collect::<Vec<_>>()
                })
            })
            .collect();
        let mut seen = std::collections::HashSet::new();
        for thread in threads {
            for id in thread.join().unwrap() {
                assert_eq!(id.len(), 32, "{id}");
                assert!(
                    id.bytes()
                        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
                    "{id}"
                );
                assert_ne!(id, "0".repeat(32));
                assert!(seen.insert(id.clone()), "{id} handed out twice");
            }
        }
        assert_eq!(seen.len(), 4 * per_thread);
    }
}
