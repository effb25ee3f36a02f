//! What happened to one request, in one place.
//!
//! Every step below the [rescue](super::rescue) answers `Result<Response, Refusal>`: a
//! step that refuses returns a typed [`Refusal`], which travels up as an error, past the
//! observing steps (trace, audit, watch), to the rescue, the one place where refusals
//! become HTTP responses ([`Refusal::response`]). Alongside, the rescue puts one
//! [`Exchange`] in the request's extensions: the steps that decide write into it once
//! (the normalized path, the [`Decision`]), and the steps that observe read it (with the
//! request's [`Outcome`]) for the execution record, the span, the metrics and the
//! anomaly watch. Nothing is filled twice, and no outcome is a free-form string: each
//! consumer's vocabulary (the record's `decision`, the span's `nexus.decision`, a
//! metric's label) is a method here.
//!
//! *linkerd2-proxy: errors carry their own response mapping, applied once by
//! `ServerRescue` (`linkerd/app/inbound/src/http/server.rs`).*

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};

use super::normalize::NormalizeError;
use super::{ProxyBody, json_response};

/// The response header carrying the decision id, on allowed and denied responses.
pub const DECISION_ID_HEADER: &str = "x-nexus-decision-id";

/// What a shed response tells the client to wait before retrying, seconds.
pub const RETRY_AFTER_SECS: u64 = 1;

/// How a request ended, as the sidecar sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// Forwarded, and the other side's response passed back (whatever its status).
    Forwarded,
    /// Refused by policy (403).
    Denied,
    /// Refused before policy: the request target is ambiguous or malformed (400).
    Ambiguous,
    /// Refused: the peer or this workload is revoked (403).
    Revoked,
    /// Refused: the gateway's state cannot be enforced (lost past `fail_closed_after`,
    /// or an enforcement hold) (503).
    Unenforceable,
    /// Refused: no policy revision is loaded, or it could not be applied (503/500).
    NoPolicy,
    /// Refused: strict execution records cannot be written (503).
    Unrecorded,
    /// Shed: the listener's `max_in_flight` was reached (503, `retry-after`).
    Shed,
    /// No response head within `limits.request_timeout` (504).
    TimedOut,
    /// The upstream (or app) could not be reached, failed its identity check or did
    /// not answer in time (502/504).
    UpstreamFailed,
}

impl Outcome {
    /// Its name in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Forwarded => "forwarded",
            Outcome::Denied => "denied",
            Outcome::Ambiguous => "ambiguous",
            Outcome::Revoked => "revoked",
            Outcome::Unenforceable => "unenforceable",
            Outcome::NoPolicy => "no_policy",
            Outcome::Unrecorded => "unrecorded",
            Outcome::Shed => "shed",
            Outcome::TimedOut => "timed_out",
            Outcome::UpstreamFailed => "upstream_failed",
        }
    }

    /// The sidecar said no to the workload itself (policy or revocation): what the
    /// anomaly watch counts as a denial.
    pub fn is_denial(self) -> bool {
        matches!(self, Outcome::Denied | Outcome::Revoked)
    }
}

/// Why the sidecar answered a request itself. Each variant renders to exactly one
/// response ([`Refusal::response`]); the steps that refuse never build responses.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// `max_in_flight` requests are already in flight on the listener.
    #[error("shed: {max_in_flight} requests already in flight (limits.max_in_flight)")]
    Shed {
        /// The listener's limit.
        max_in_flight: usize,
    },
    /// No response head within the request timeout.
    #[error("no response within {timeout:?} (limits.request_timeout)")]
    TimedOut {
        /// `limits.request_timeout`.
        timeout: Duration,
    },
    /// The request target is ambiguous or malformed (see policies/PATHS.md).
    #[error("ambiguous or malformed request target: {0}")]
    Ambiguous(NormalizeError),
    /// The peer or this workload is revoked.
    #[error("{reason}")]
    Revoked {
        /// Which workload, in words.
        reason: String,
    },
    /// The gateway's state cannot be enforced.
    #[error("{reason}")]
    Unenforceable {
        /// Why, in words.
        reason: String,
    },
    /// No policy revision is loaded yet.
    #[error("no policy revision is loaded yet")]
    NoPolicy {
        /// The decision id.
        decision_id: String,
    },
    /// The policy step found no normalized target (a stack built without it).
    #[error("request was not normalized")]
    NotNormalized {
        /// The decision id.
        decision_id: String,
    },
    /// The policy denied the request.
    #[error("denied by policy ({decision_id})")]
    Denied {
        /// The decision id.
        decision_id: String,
        /// The policy's reasons.
        reasons: std::sync::Arc<[String]>,
        /// The policy revision that decided.
        revision: String,
    },
    /// Strict execution records cannot be written.
    #[error("audit records cannot be written")]
    Unrecorded,
    /// The forwarded target could not be built.
    #[error("bad request target: {detail}")]
    BadTarget {
        /// Why.
        detail: String,
    },
    /// The upstream's TLS identity was rejected.
    #[error("upstream identity rejected: {detail}")]
    UpstreamIdentity {
        /// The SPIFFE or TLS reason.
        detail: String,
    },
    /// Connecting to or hearing from the upstream timed out.
    #[error("upstream timed out: {detail}")]
    UpstreamTimedOut {
        /// The error chain.
        detail: String,
    },
    /// The upstream could not be reached.
    #[error("upstream unavailable: {detail}")]
    UpstreamUnavailable {
        /// The error chain.
        detail: String,
    },
}

impl Refusal {
    /// How the request ended.
    pub fn outcome(&self) -> Outcome {
        match self {
            Refusal::Shed { .. } => Outcome::Shed,
            Refusal::TimedOut { .. } => Outcome::TimedOut,
            Refusal::Ambiguous(_) => Outcome::Ambiguous,
            Refusal::Revoked { .. } => Outcome::Revoked,
            Refusal::Unenforceable { .. } => Outcome::Unenforceable,
            Refusal::NoPolicy { .. } | Refusal::NotNormalized { .. } => Outcome::NoPolicy,
            Refusal::Denied { .. } => Outcome::Denied,
            Refusal::Unrecorded => Outcome::Unrecorded,
            Refusal::BadTarget { .. }
            | Refusal::UpstreamIdentity { .. }
            | Refusal::UpstreamTimedOut { .. }
            | Refusal::UpstreamUnavailable { .. } => Outcome::UpstreamFailed,
        }
    }

    /// The status of its response.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::Ambiguous(_) | Refusal::BadTarget { .. } => StatusCode::BAD_REQUEST,
            Refusal::Revoked { .. } | Refusal::Denied { .. } => StatusCode::FORBIDDEN,
            Refusal::NotNormalized { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            Refusal::UpstreamIdentity { .. } | Refusal::UpstreamUnavailable { .. } => {
                StatusCode::BAD_GATEWAY
            }
            Refusal::TimedOut { .. } | Refusal::UpstreamTimedOut { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            Refusal::Shed { .. }
            | Refusal::Unenforceable { .. }
            | Refusal::NoPolicy { .. }
            | Refusal::Unrecorded => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The JSON document its response carries.
    fn document(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            Refusal::Shed { max_in_flight } => json!({
                "error": "overloaded",
                "reason": format!(
                    "{max_in_flight} requests are already in flight on this listener (limits.max_in_flight); retry after {RETRY_AFTER_SECS}s"
                ),
            }),
            Refusal::TimedOut { timeout } => json!({
                "error": "request_timeout",
                "reason": format!("no response within {timeout:?} (limits.request_timeout)"),
            }),
            Refusal::Ambiguous(error) => json!({
                "error": "ambiguous or malformed request target",
                "reason": error.reason(),
                "detail": error.to_string(),
            }),
            Refusal::Revoked { reason } | Refusal::Unenforceable { reason } => {
                json!({"allow": false, "reasons": [reason]})
            }
            Refusal::NoPolicy { decision_id } | Refusal::NotNormalized { decision_id } => {
                json!({"decision_id": decision_id, "allow": false, "reasons": [self.to_string()]})
            }
            Refusal::Denied {
                decision_id,
                reasons,
                revision,
            } => json!({
                "decision_id": decision_id,
                "allow": false,
                "reasons": reasons,
                "revision": revision,
            }),
            Refusal::Unrecorded => json!({"error": "audit records cannot be written"}),
            Refusal::BadTarget { detail } => {
                json!({"error": "bad request target", "detail": detail})
            }
            Refusal::UpstreamIdentity { detail } => {
                json!({"error": "upstream identity rejected", "detail": detail})
            }
            Refusal::UpstreamTimedOut { detail } => {
                json!({"error": "upstream timed out", "detail": detail})
            }
            Refusal::UpstreamUnavailable { detail } => {
                json!({"error": "upstream unavailable", "detail": detail})
            }
        }
    }

    /// The bytes of its response body: what the client receives, so what the execution
    /// record hashes and the watch counts. The same refusal always renders the same bytes.
    pub fn body(&self) -> Bytes {
        Bytes::from(self.document().to_string())
    }

    /// The response the client gets: status, JSON body and, where it applies, the
    /// decision id or `retry-after` header.
    pub fn response(&self) -> Response<ProxyBody> {
        let mut response = json_response(self.status(), self.body());
        let headers = response.headers_mut();
        match self {
            Refusal::Shed { .. } => {
                headers.insert(
                    http::header::RETRY_AFTER,
                    HeaderValue::from(RETRY_AFTER_SECS),
                );
            }
            Refusal::Denied { decision_id, .. } => {
                if let Ok(value) = HeaderValue::from_str(decision_id) {
                    headers.insert(DECISION_ID_HEADER, value);
                }
            }
            _ => {}
        }
        response
    }
}

/// The decision about a request, in the words each consumer uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Verdict {
    /// The policy allowed it.
    Allow,
    /// The policy denied it.
    Deny,
    /// The policy failed to decide (a deny).
    Error,
    /// The policy denied it in dry-run mode: forwarded anyway.
    DryRunDeny,
    /// No policy revision was loaded.
    NoPolicy,
    /// Refused before policy, its target ambiguous or malformed.
    Malformed,
    /// Refused before policy, a party revoked.
    Revoked,
    /// Refused before policy, the gateway's state not enforceable.
    GatewayLost,
}

impl Verdict {
    /// The execution record's `decision`.
    pub fn record(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny | Verdict::Malformed => "deny",
            Verdict::Error => "error",
            Verdict::DryRunDeny => "dry_run_deny",
            Verdict::NoPolicy => "no_policy",
            Verdict::Revoked => "revoked",
            Verdict::GatewayLost => "gateway_lost",
        }
    }

    /// The span's `nexus.decision` and the OTel decision counter's label; a target refused
    /// before anything decided has none.
    pub fn traced(self) -> Option<&'static str> {
        match self {
            Verdict::Malformed => None,
            other => Some(other.record()),
        }
    }

    /// The policy was evaluated (its decision id can be cited in a signal).
    pub fn evaluated(self) -> bool {
        matches!(
            self,
            Verdict::Allow | Verdict::Deny | Verdict::Error | Verdict::DryRunDeny
        )
    }
}

/// A decision about a request: by the policy, or by a step that refused before it.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// What was decided.
    pub verdict: Verdict,
    /// The decision id (empty when no policy decided).
    pub id: String,
    /// The policy revision (empty if none).
    pub revision: String,
    /// Why (shared with the policy's decision, and its cached copy).
    pub reasons: std::sync::Arc<[String]>,
    /// How long the evaluation took (`None`: nothing was evaluated).
    pub evaluation: Option<Duration>,
    /// The decision came from the decision cache.
    pub cached: bool,
    /// The clause the request touches.
    pub clause: Option<String>,
    /// Whether the plugin is bound to `clause` (`None`: no bindings in the data).
    pub bound: Option<bool>,
    /// The execution the request runs under.
    pub execution_id: Option<String>,
    /// That execution's plugin UUID, version and image digest (with a registry).
    pub plugin: Option<[String; 3]>,
}

impl Decision {
    /// A decision with no policy behind it (`id`, `revision` empty).
    pub fn without_policy(verdict: Verdict, reason: String) -> Self {
        Self {
            verdict,
            id: String::new(),
            revision: String::new(),
            reasons: std::sync::Arc::from([reason]),
            evaluation: None,
            cached: false,
            clause: None,
            bound: None,
            execution_id: None,
            plugin: None,
        }
    }
}

/// One request's facts, shared by every step through the request's extensions (as
/// `Arc<Exchange>`, put there by the rescue). Each fact is written once; the first
/// write wins.
#[derive(Debug, Default)]
pub struct Exchange {
    path: OnceLock<String>,
    decision: OnceLock<Decision>,
    outcome: OnceLock<Outcome>,
    digests: OnceLock<(String, String)>,
    trace_id: OnceLock<String>,
}

impl Exchange {
    /// The exchange of the request these extensions belong to.
    pub fn of(extensions: &http::Extensions) -> Option<&Arc<Exchange>> {
        extensions.get::<Arc<Exchange>>()
    }

    /// The exchange of the request these extensions belong to, put there first if it
    /// has none yet.
    pub fn attach(extensions: &mut http::Extensions) -> Arc<Exchange> {
        extensions
            .get_or_insert_with(|| Arc::new(Exchange::default()))
            .clone()
    }

    /// Records the normalized path (what the policy saw and what is forwarded).
    pub fn set_path(&self, path: &str) {
        let _ = self.path.set(path.to_owned());
    }

    /// The normalized path, once the target passed normalization.
    pub fn path(&self) -> Option<&str> {
        self.path.get().map(String::as_str)
    }

    /// Records the decision.
    pub fn decide(&self, decision: Decision) {
        let _ = self.decision.set(decision);
    }

    /// The decision, if anything decided.
    pub fn decision(&self) -> Option<&Decision> {
        self.decision.get()
    }

    /// Settles how the request ended from what the steps below answered: the first
    /// observer to see the answer settles it, the others read the same value.
    pub fn settle<T>(&self, answer: &Result<T, Refusal>) -> Outcome {
        *self.outcome.get_or_init(|| match answer {
            Ok(_) => Outcome::Forwarded,
            Err(refusal) => refusal.outcome(),
        })
    }

    /// How the request ended, once settled.
    pub fn outcome(&self) -> Option<Outcome> {
        self.outcome.get().copied()
    }

    /// Records the trace this request's span belongs to (the trace step).
    pub fn set_trace_id(&self, trace_id: String) {
        let _ = self.trace_id.set(trace_id);
    }

    /// The trace id, when the request is traced.
    pub fn trace_id(&self) -> Option<&str> {
        self.trace_id.get().map(String::as_str)
    }

    /// Records the hex SHA-256 of the request and response bodies (the audit step).
    pub fn set_digests(&self, request: &str, response: &str) {
        let _ = self.digests.set((request.to_owned(), response.to_owned()));
    }

    /// The hex SHA-256 of the request and response bodies, once the record is made.
    pub fn digests(&self) -> Option<(&str, &str)> {
        self.digests
            .get()
            .map(|(request, response)| (request.as_str(), response.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    #[tokio::test]
    async fn a_refusal_renders_the_bytes_it_reports() {
        let refusals = [
            Refusal::Shed { max_in_flight: 3 },
            Refusal::Denied {
                decision_id: "d-1".into(),
                reasons: std::sync::Arc::from(["no".to_string()]),
                revision: "r".into(),
            },
            Refusal::Ambiguous(NormalizeError::Backslash),
            Refusal::Revoked {
                reason: "workload x is revoked".into(),
            },
        ];
        for refusal in refusals {
            let response = refusal.response();
            assert_eq!(response.status(), refusal.status());
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, refusal.body(), "{refusal:?}");
        }
        let denied = Refusal::Denied {
            decision_id: "d-1".into(),
            reasons: std::sync::Arc::from([]),
            revision: String::new(),
        }
        .response();
        assert_eq!(denied.headers()[DECISION_ID_HEADER], "d-1");
        let shed = Refusal::Shed { max_in_flight: 1 }.response();
        assert_eq!(shed.headers()[http::header::RETRY_AFTER], "1");
    }

    #[test]
    fn the_first_answer_settles_the_outcome() {
        let exchange = Exchange::default();
        let refused: Result<(), Refusal> = Err(Refusal::Unrecorded);
        assert_eq!(exchange.settle(&refused), Outcome::Unrecorded);
        assert_eq!(exchange.settle(&Ok::<(), Refusal>(())), Outcome::Unrecorded);
        assert_eq!(exchange.outcome(), Some(Outcome::Unrecorded));
    }
}
