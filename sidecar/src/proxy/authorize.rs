//! The two steps that decide whether a request may pass: normalize the target (400 on
//! an ambiguous one), then evaluate the policy on it (403 on a deny). What the policy
//! saw is what is forwarded: the normalize step rewrites the URI to the normalized path.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use time::OffsetDateTime;

use super::audit::AuditFacts;
use super::normalize::{NormalizeLimits, Normalized, normalize};
use super::trace::TraceFacts;
use super::watch::WatchFacts;
use super::{ProxyBody, json_response};
use crate::metrics::{Direction, Metrics};
use crate::policy::input::{RequestFacts, build};
use crate::policy::{Loaded, PolicyRuntime};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The response header carrying the decision id, on allowed and denied responses.
pub const DECISION_ID_HEADER: &str = "x-nexus-decision-id";

/// Normalizes the request target (see policies/PATHS.md) and rewrites the URI to it.
#[derive(Clone, Debug)]
pub struct NormalizeLayer {
    limits: NormalizeLimits,
    metrics: Arc<Metrics>,
    direction: Direction,
}

impl NormalizeLayer {
    /// A layer with the given limits.
    pub fn new(limits: NormalizeLimits, metrics: Arc<Metrics>, direction: Direction) -> Self {
        Self {
            limits,
            metrics,
            direction,
        }
    }
}

step_layer!(NormalizeLayer => Normalize);

impl<S, B> tower::Service<Request<B>> for Normalize<S>
where
    S: tower::Service<Request<B>, Response = Response<ProxyBody>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<ProxyBody>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        match normalize(req.uri(), req.headers(), req.version(), &self.layer.limits) {
            Ok(normalized) => {
                let mut parts = req.uri().clone().into_parts();
                parts.path_and_query = Some(normalized.path_and_query());
                // Origin-form from here on: the forward step sets scheme and authority.
                parts.scheme = None;
                parts.authority = None;
                if let Ok(uri) = http::Uri::from_parts(parts) {
                    *req.uri_mut() = uri;
                }
                if let Some(audit) = AuditFacts::get(req.extensions()) {
                    audit.set_path(&normalized.path);
                }
                req.extensions_mut().insert(Arc::new(normalized));
                Box::pin(self.inner.call(req))
            }
            Err(error) => {
                self.layer
                    .metrics
                    .rejected_request(self.layer.direction, error.reason());
                tracing::debug!(%error, uri = %req.uri(), "request target refused");
                if let Some(audit) = AuditFacts::get(req.extensions()) {
                    audit.set_decision(
                        "deny",
                        "",
                        "",
                        &[format!("ambiguous or malformed request target: {error}")],
                    );
                }
                let response = json_response(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({"error": "ambiguous or malformed request target", "reason": error.reason(), "detail": error.to_string()}),
                );
                Box::pin(async move { Ok(response) })
            }
        }
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

/// Evaluates the policy; a deny answers 403 with a decision id and the reasons.
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

step_layer!(PolicyLayer => Authorize);

/// Whether `plugin` is bound to `clause` in the policy data (`data.nexus.bindings`);
/// `None` when the data has no bindings for anyone.
fn bound(loaded: &Loaded, plugin: &str, clause: &str) -> Option<bool> {
    let bindings = &loaded.policy.data()["nexus"]["bindings"];
    if *bindings == nexus_policy::Value::Undefined {
        return None;
    }
    // A binding is a list of clauses, or an object whose `clauses` is that list (and
    // whose `budgets` the watch reads).
    let entry = &bindings[plugin];
    let list = match entry.as_array() {
        Ok(_) => entry,
        Err(_) => &entry["clauses"],
    };
    Some(
        list.as_array()
            .map(|a| {
                a.iter()
                    .any(|c| c.as_string().map(|s| s.as_ref() == clause).unwrap_or(false))
            })
            .unwrap_or(false),
    )
}

fn decision_id() -> String {
    let mut bytes = [0u8; 16];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).is_err() {
        return "unavailable".into();
    }
    // Hex by table: this runs on every request (no formatting machinery per byte).
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(32);
    for b in bytes {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out
}

impl<S, B> tower::Service<Request<B>> for Authorize<S>
where
    S: tower::Service<Request<B>, Response = Response<ProxyBody>, Error = Infallible>,
    S::Future: Send + 'static,
    B: Body,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<ProxyBody>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let layer = &self.layer;
        let id = decision_id();
        let direction = layer.parties.direction;
        let Some(loaded) = layer.runtime.current() else {
            layer.metrics.decision(direction, "no_policy");
            if let Some(trace) = TraceFacts::get(req.extensions()) {
                trace.set_decision("no_policy", &id, "", None);
            }
            if let Some(audit) = AuditFacts::get(req.extensions()) {
                audit.set_decision(
                    "no_policy",
                    &id,
                    "",
                    &["no policy revision is loaded yet".to_owned()],
                );
            }
            let response = json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"decision_id": id, "allow": false, "reasons": ["no policy revision is loaded yet"]}),
            );
            return Box::pin(async move { Ok(response) });
        };
        let Some(target) = req.extensions().get::<Arc<Normalized>>().cloned() else {
            if let Some(audit) = AuditFacts::get(req.extensions()) {
                audit.set_decision("error", &id, "", &["request was not normalized".to_owned()]);
            }
            let response = json_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                serde_json::json!({"decision_id": id, "allow": false, "reasons": ["request was not normalized"]}),
            );
            return Box::pin(async move { Ok(response) });
        };
        let body_size = req
            .body()
            .size_hint()
            .exact()
            .and_then(|n| i64::try_from(n).ok())
            .unwrap_or(-1);
        let facts = RequestFacts {
            direction,
            source: &layer.parties.source,
            destination: &layer.parties.destination,
            method: req.method().as_str(),
            target: &target,
            headers: req.headers(),
            body_size,
        };
        let config = layer.runtime.config();
        let (input, clause, execution) = build(&facts, config, &loaded, OffsetDateTime::now_utc());
        let shadow_input = loaded.shadow.as_ref().map(|_| input.clone());
        let decided = layer.runtime.decide(&loaded, input);
        let (decision, elapsed, cached) = (decided.decision, decided.elapsed, decided.cached);
        layer.metrics.policy_evaluation(direction, elapsed);
        let result = match (decision.allow, decision.error.is_some(), config.dry_run) {
            (true, _, _) => "allow",
            (false, true, false) => "error",
            (false, false, false) => "deny",
            (false, _, true) => "dry_run_deny",
        };
        layer.metrics.decision(direction, result);
        if let Some(trace) = TraceFacts::get(req.extensions()) {
            trace.set_decision(result, &id, loaded.policy.revision(), Some(elapsed));
            if let Some(clause) = clause.as_deref() {
                trace.set_clause(clause);
            }
            if let Some(execution) = execution.as_deref() {
                trace.set_execution_id(execution);
            }
        }
        if let Some(audit) = AuditFacts::get(req.extensions()) {
            audit.set_decision(result, &id, loaded.policy.revision(), &decision.reasons);
            if cached {
                audit.set_cached();
            }
            if let Some(clause) = clause.as_deref() {
                audit.set_clause(clause);
            }
            if let Some(execution) = execution.as_deref() {
                audit.set_execution_id(execution);
                if let Some(ex) = loaded.execution(execution)
                    && !ex.plugin_uid.is_empty()
                {
                    audit.set_plugin(&ex.plugin_uid, &ex.plugin_version, &ex.image_digest);
                }
            }
        }
        if let Some(watch) = WatchFacts::get(req.extensions()) {
            watch.set_decision_id(&id);
            if let Some(clause) = clause.as_deref() {
                watch.set_clause(clause, bound(&loaded, &layer.parties.source, clause));
            }
        }
        if let (Some(shadow), Some(input)) = (&loaded.shadow, shadow_input) {
            let shadow_decision = shadow.evaluate(input);
            let shadow_result = if shadow_decision.allow {
                "shadow_allow"
            } else {
                "shadow_deny"
            };
            layer.metrics.decision(direction, shadow_result);
            if shadow_decision.allow != decision.allow {
                tracing::info!(decision_id = %id, rule = shadow.rule(), enforced = decision.allow, shadow = shadow_decision.allow, reasons = ?shadow_decision.reasons, "shadow policy disagrees");
            }
        }
        tracing::debug!(
            decision_id = %id,
            direction,
            source = %layer.parties.source,
            path = %target.path,
            clause = clause.as_deref().unwrap_or(""),
            execution = execution.as_deref().unwrap_or(""),
            allow = decision.allow,
            cached,
            reasons = ?decision.reasons,
            revision = loaded.policy.revision(),
            "policy decision"
        );
        let header = HeaderValue::from_str(&id).ok();
        if !decision.allow && !config.dry_run {
            let mut response = json_response(
                StatusCode::FORBIDDEN,
                serde_json::json!({
                    "decision_id": id,
                    "allow": false,
                    "reasons": decision.reasons,
                    "revision": loaded.policy.revision(),
                }),
            );
            if let Some(value) = header {
                response.headers_mut().insert(DECISION_ID_HEADER, value);
            }
            return Box::pin(async move { Ok(response) });
        }
        let future = self.inner.call(req);
        Box::pin(async move {
            let mut response = future.await?;
            if let Some(value) = header {
                response.headers_mut().insert(DECISION_ID_HEADER, value);
            }
            Ok(response)
        })
    }
}
