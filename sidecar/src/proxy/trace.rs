//! One OpenTelemetry span per proxied request, and the W3C trace context carried on.
//!
//! The layer continues the caller's trace (`traceparent`/`tracestate`), starts this
//! hop's span (inbound: kind Server; outbound: kind Client) and rewrites `traceparent`
//! on the forwarded request to that span, so the next hop's span is its child: plugin →
//! its sidecar → data API's sidecar → data API is one trace. The span ends, and the
//! request metrics are recorded, when the response body ends (or is dropped), so its
//! duration covers the streamed body.
//!
//! It uses the OTel API directly rather than `tracing` + `tracing-opentelemetry`: one
//! owned SDK span per request, attributes only when it is sampled, no subscriber
//! registry lookups or field visitors on the request path, and no loop between the
//! exporter's own `tracing` events and the spans.
//!
//! Layers inside this one say what they decided through [`TraceFacts`], which this
//! layer puts in the request extensions: see its doc for who fills what.
//!
//! Without `[telemetry] otlp_endpoint` the layer is not in the stack at all, and a
//! caller's `traceparent` passes through untouched like any other header.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{
    Span as _, SpanBuilder, SpanContext, SpanKind, Status, TraceFlags, Tracer as _,
};
use opentelemetry::{KeyValue, StringValue, Value};

use super::ProxyBody;
use super::observe::{EndObserver, ObservedBody};
use crate::metrics::Direction;
use crate::telemetry::Telemetry;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Longest attribute value taken from the request (path, authority); longer ones are
/// cut at a character boundary.
const MAX_ATTRIBUTE_BYTES: usize = 1024;

/// What the layers inside the trace layer learned about a request, for its span
/// (`nexus.*` attributes) and the policy metrics. Found in the request extensions as
/// `Arc<TraceFacts>` (see [`TraceFacts::get`]) only when tracing is on; each fact is set
/// once, the first value wins.
///
/// Who fills what:
/// - the policy layer ([`super::authorize::PolicyLayer`]): [`TraceFacts::set_decision`]
///   (result as counted in `nexus_policy_decisions_total`, decision id, revision,
///   evaluation time) on every decision, including `no_policy`, and
///   [`TraceFacts::set_clause`] / [`TraceFacts::set_execution_id`] when the input has
///   them;
/// - the audit layer: [`TraceFacts::set_request_sha256`] once the request body is read,
///   and [`TraceFacts::set_response_sha256`] *before* its response body yields its end
///   (the span ends right after);
/// - whichever layer knows a low-cardinality route template: [`TraceFacts::set_route`]
///   (the span is then named `"{method} {route}"`).
#[derive(Debug, Default)]
pub struct TraceFacts {
    clause: OnceLock<String>,
    execution_id: OnceLock<String>,
    decision: OnceLock<&'static str>,
    decision_id: OnceLock<String>,
    policy_revision: OnceLock<String>,
    policy_evaluation: OnceLock<Duration>,
    request_sha256: OnceLock<String>,
    response_sha256: OnceLock<String>,
    route: OnceLock<String>,
}

impl TraceFacts {
    /// The facts of the request these extensions belong to, when tracing is on.
    pub fn get(extensions: &http::Extensions) -> Option<&TraceFacts> {
        extensions.get::<Arc<TraceFacts>>().map(|facts| &**facts)
    }

    /// The clause the request touches.
    pub fn set_clause(&self, clause: &str) {
        let _ = self.clause.set(clause.to_owned());
    }

    /// The execution the request runs under.
    pub fn set_execution_id(&self, id: &str) {
        let _ = self.execution_id.set(id.to_owned());
    }

    /// The policy decision: `result` as counted (`allow`, `deny`, `error`,
    /// `dry_run_deny`, `no_policy`), its id, the policy revision (empty if none) and the
    /// evaluation time (`None` if nothing was evaluated).
    pub fn set_decision(
        &self,
        result: &'static str,
        decision_id: &str,
        revision: &str,
        evaluation: Option<Duration>,
    ) {
        let _ = self.decision.set(result);
        let _ = self.decision_id.set(decision_id.to_owned());
        if !revision.is_empty() {
            let _ = self.policy_revision.set(revision.to_owned());
        }
        if let Some(evaluation) = evaluation {
            let _ = self.policy_evaluation.set(evaluation);
        }
    }

    /// Hex SHA-256 of the request body.
    pub fn set_request_sha256(&self, hex: &str) {
        let _ = self.request_sha256.set(hex.to_owned());
    }

    /// Hex SHA-256 of the response body.
    pub fn set_response_sha256(&self, hex: &str) {
        let _ = self.response_sha256.set(hex.to_owned());
    }

    /// A low-cardinality route template, e.g. `/clauses/{clause}/rainfall`.
    pub fn set_route(&self, route: &str) {
        let _ = self.route.set(route.to_owned());
    }
}

/// Fixed per connection: which side, which span kind, who is on the other end.
#[derive(Debug)]
struct Site {
    direction: Direction,
    kind: SpanKind,
    /// The peer's SPIFFE ID: inbound, the authenticated caller; outbound, the
    /// upstream's expected ID.
    peer: StringValue,
    /// Outbound: the upstream (`server.address`, `server.port`) and `https://host:port`
    /// for `url.full`. Inbound: taken from each request's authority.
    upstream: Option<(StringValue, i64, String)>,
}

/// Traces each request (see the module doc).
#[derive(Clone, Debug)]
pub struct TraceLayer {
    telemetry: Telemetry,
    site: Arc<Site>,
}

impl TraceLayer {
    /// Inbound: Server spans for requests from the authenticated `peer`.
    pub fn inbound(telemetry: &Telemetry, direction: Direction, peer: Arc<str>) -> Self {
        Self {
            telemetry: telemetry.clone(),
            site: Arc::new(Site {
                direction,
                kind: SpanKind::Server,
                peer: StringValue::from(peer),
                upstream: None,
            }),
        }
    }

    /// Outbound: Client spans for requests to `upstream`, which must present
    /// `expected_id`.
    pub fn outbound(
        telemetry: &Telemetry,
        direction: Direction,
        upstream: &http::uri::Authority,
        expected_id: Arc<str>,
    ) -> Self {
        let port = upstream.port_u16().map_or(443, i64::from);
        Self {
            telemetry: telemetry.clone(),
            site: Arc::new(Site {
                direction,
                kind: SpanKind::Client,
                peer: StringValue::from(expected_id),
                upstream: Some((
                    StringValue::from(upstream.host().to_owned()),
                    port,
                    format!("https://{upstream}"),
                )),
            }),
        }
    }
}

step_layer!(TraceLayer => Trace);

impl<S, B> tower::Service<Request<B>> for Trace<S>
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
        let start = Instant::now();
        let telemetry = &self.layer.telemetry;
        let site = &self.layer.site;
        let parent = telemetry
            .propagator()
            .extract_with_context(&opentelemetry::Context::new(), &Headers(req.headers()));
        let method = method_name(req.method());
        let mut span = telemetry.tracer().build_with_context(
            SpanBuilder::from_name(method).with_kind(site.kind.clone()),
            &parent,
        );
        if span.is_recording() {
            span.set_attributes(request_attributes(&req, method, site));
        }
        // A span from a shut-down provider has no valid context: then the caller's
        // trace context goes on as it came.
        if span.span_context().is_valid() {
            inject(req.headers_mut(), span.span_context());
        }
        let facts = Arc::new(TraceFacts::default());
        req.extensions_mut().insert(facts.clone());
        let mut in_flight = InFlight {
            telemetry: telemetry.clone(),
            span,
            facts,
            start,
            direction: site.direction,
            server: site.kind == SpanKind::Server,
            method,
            status: None,
            error: None,
        };
        let future = self.inner.call(req);
        Box::pin(async move {
            let response = match future.await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            in_flight.status = Some(response.status());
            Ok(response.map(|body| ObservedBody::boxed(body, in_flight)))
        })
    }
}

/// A request between its head and the end of its response body. Dropping it ends the
/// span and records the metrics, however the request ended.
struct InFlight {
    telemetry: Telemetry,
    span: opentelemetry_sdk::trace::Span,
    facts: Arc<TraceFacts>,
    start: Instant,
    direction: Direction,
    server: bool,
    method: &'static str,
    status: Option<StatusCode>,
    /// Set when the exchange failed below HTTP (`canceled`, `response_body`,
    /// `response_body_aborted`).
    error: Option<&'static str>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let elapsed = self.start.elapsed().as_secs_f64();
        let instruments = self.telemetry.instruments();
        let facts = &*self.facts;
        let direction = KeyValue::new("nexus.direction", self.direction);
        let error = match self.status {
            None => Some(self.error.unwrap_or("canceled")),
            Some(_) => self.error,
        };
        if let Some(status) = self.status {
            let labels = [
                direction.clone(),
                KeyValue::new("http.request.method", self.method),
                KeyValue::new("http.response.status_code", i64::from(status.as_u16())),
            ];
            instruments.requests.add(1, &labels);
            instruments.request_duration.record(elapsed, &labels);
        }
        if let Some(result) = facts.decision.get() {
            instruments.decisions.add(
                1,
                &[direction.clone(), KeyValue::new("nexus.decision", *result)],
            );
        }
        if let Some(evaluation) = facts.policy_evaluation.get() {
            instruments
                .evaluation
                .record(evaluation.as_secs_f64(), std::slice::from_ref(&direction));
        }
        if !self.span.is_recording() {
            return;
        }
        let mut attributes = Vec::with_capacity(10);
        let failed_status = self.status.filter(|status| {
            status.is_server_error() || (!self.server && status.is_client_error())
        });
        if let Some(status) = self.status {
            attributes.push(KeyValue::new(
                "http.response.status_code",
                i64::from(status.as_u16()),
            ));
        }
        match (error, failed_status) {
            (Some(kind), _) => {
                attributes.push(KeyValue::new("error.type", kind));
                self.span.set_status(Status::error(kind));
            }
            (None, Some(status)) => {
                attributes.push(KeyValue::new(
                    "error.type",
                    Value::from(status.as_u16().to_string()),
                ));
                self.span.set_status(Status::error(""));
            }
            (None, None) => {}
        }
        for (key, value) in [
            ("nexus.clause", facts.clause.get()),
            ("nexus.execution_id", facts.execution_id.get()),
            ("nexus.decision_id", facts.decision_id.get()),
            ("nexus.policy_revision", facts.policy_revision.get()),
            ("nexus.request.sha256", facts.request_sha256.get()),
            ("nexus.response.sha256", facts.response_sha256.get()),
        ] {
            if let Some(value) = value {
                attributes.push(KeyValue::new(key, value.clone()));
            }
        }
        if let Some(result) = facts.decision.get() {
            attributes.push(KeyValue::new("nexus.decision", *result));
        }
        if let Some(route) = facts.route.get() {
            attributes.push(KeyValue::new("http.route", route.clone()));
            self.span.update_name(format!("{} {route}", self.method));
        }
        self.span.set_attributes(attributes);
        self.span.end();
    }
}

/// The response body ends the request's span: at its end, or on an error or an early
/// drop (marked `response_body` / `response_body_aborted`).
impl EndObserver for InFlight {
    fn error(&mut self) {
        self.error = Some("response_body");
    }

    fn end(mut self, complete: bool) {
        if !complete && self.error.is_none() {
            self.error = Some("response_body_aborted");
        }
    }
}

/// The request's attributes (OTel HTTP semantic conventions plus `nexus.*`).
fn request_attributes<B>(req: &Request<B>, method: &'static str, site: &Site) -> Vec<KeyValue> {
    let path = bounded(req.uri().path());
    let mut attributes = Vec::with_capacity(12);
    attributes.push(KeyValue::new("http.request.method", method));
    if method == OTHER_METHOD {
        attributes.push(KeyValue::new(
            "http.request.method_original",
            bounded(req.method().as_str()),
        ));
    }
    attributes.push(KeyValue::new("url.scheme", "https"));
    let version = protocol_version(req.version());
    if !version.is_empty() {
        attributes.push(KeyValue::new("network.protocol.name", "http"));
        attributes.push(KeyValue::new("network.protocol.version", version));
    }
    match &site.upstream {
        Some((host, port, base)) => {
            attributes.push(KeyValue::new("server.address", host.clone()));
            attributes.push(KeyValue::new("server.port", *port));
            attributes.push(KeyValue::new("url.full", format!("{base}{path}")));
        }
        None => {
            let authority = req.uri().authority().cloned().or_else(|| {
                req.headers()
                    .get(http::header::HOST)
                    .and_then(|host| host.to_str().ok())
                    .and_then(|host| host.parse::<http::uri::Authority>().ok())
            });
            if let Some(authority) = authority {
                attributes.push(KeyValue::new("server.address", bounded(authority.host())));
                if let Some(port) = authority.port_u16() {
                    attributes.push(KeyValue::new("server.port", i64::from(port)));
                }
            }
        }
    }
    attributes.push(KeyValue::new("url.path", path));
    attributes.push(KeyValue::new("nexus.direction", site.direction));
    attributes.push(KeyValue::new("nexus.peer.spiffe_id", site.peer.clone()));
    attributes
}

const OTHER_METHOD: &str = "_OTHER";

/// The method as the semantic conventions name it: the known ones, else `_OTHER`.
fn method_name(method: &http::Method) -> &'static str {
    match *method {
        http::Method::GET => "GET",
        http::Method::HEAD => "HEAD",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::PATCH => "PATCH",
        http::Method::DELETE => "DELETE",
        http::Method::OPTIONS => "OPTIONS",
        http::Method::CONNECT => "CONNECT",
        http::Method::TRACE => "TRACE",
        _ => OTHER_METHOD,
    }
}

fn protocol_version(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "0.9",
        Version::HTTP_10 => "1.0",
        Version::HTTP_11 => "1.1",
        Version::HTTP_2 => "2",
        Version::HTTP_3 => "3",
        _ => "",
    }
}

fn bounded(text: &str) -> String {
    if text.len() <= MAX_ATTRIBUTE_BYTES {
        return text.to_owned();
    }
    let mut end = MAX_ATTRIBUTE_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// Request headers as the propagator reads them.
struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

/// Writes `context` as the W3C `traceparent` (and `tracestate`, removed when empty),
/// replacing what the caller sent.
fn inject(headers: &mut HeaderMap, context: &SpanContext) {
    let traceparent = format!(
        "00-{}-{}-{:02x}",
        context.trace_id(),
        context.span_id(),
        (context.trace_flags() & TraceFlags::SAMPLED).to_u8()
    );
    if let Ok(value) = HeaderValue::from_str(&traceparent) {
        headers.insert(TRACEPARENT, value);
    }
    let state = context.trace_state().header();
    match HeaderValue::from_str(&state) {
        Ok(value) if !state.is_empty() => {
            headers.insert(TRACESTATE, value);
        }
        _ => {
            headers.remove(TRACESTATE);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use bytes::Bytes;
    use futures::StreamExt as _;
    use http_body::Frame;
    use http_body_util::BodyExt;
    use opentelemetry::trace::{SpanId, TraceId};
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::trace::{Sampler, SimpleSpanProcessor, SpanData, SpanExporter};
    use tower::{Layer as _, Service as _, ServiceExt as _};

    use super::*;

    /// Keeps every exported span.
    #[derive(Clone, Debug, Default)]
    struct Captured(Arc<Mutex<Vec<SpanData>>>);

    impl SpanExporter for Captured {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            self.0.lock().unwrap().extend(batch);
            Ok(())
        }
    }

    impl Captured {
        fn spans(&self) -> Vec<SpanData> {
            self.0.lock().unwrap().clone()
        }
    }

    fn telemetry(sampler: Sampler) -> (Telemetry, Captured) {
        let captured = Captured::default();
        let telemetry =
            Telemetry::with_processor(SimpleSpanProcessor::new(captured.clone()), sampler);
        (telemetry, captured)
    }

    fn attribute(span: &SpanData, key: &str) -> Option<Value> {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.clone())
    }

    /// An upstream that records the headers it got, fills the facts as the policy layer
    /// will, and answers `status`.
    fn upstream(
        status: StatusCode,
        seen: Arc<Mutex<Option<HeaderMap>>>,
    ) -> impl tower::Service<
        Request<()>,
        Response = Response<ProxyBody>,
        Error = Infallible,
        Future = impl Send + 'static,
    > + Clone {
        tower::service_fn(move |req: Request<()>| {
            *seen.lock().unwrap() = Some(req.headers().clone());
            if let Some(facts) = TraceFacts::get(req.extensions()) {
                facts.set_decision("allow", "d-1", "rev-7", Some(Duration::from_micros(20)));
                facts.set_clause("c-flood-17");
                facts.set_execution_id("ex-1");
            }
            async move {
                Ok::<_, Infallible>(crate::proxy::json_response(
                    status,
                    serde_json::json!({"ok": true}),
                ))
            }
        })
    }

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT: &str = "00f067aa0ba902b7";

    #[tokio::test]
    async fn continues_the_callers_trace_and_hands_its_own_span_on() {
        // The caller sampled: parent-based sampling follows it even when new traces are off.
        let (telemetry, captured) = telemetry(Sampler::ParentBased(Box::new(Sampler::AlwaysOff)));
        let seen = Arc::new(Mutex::new(None));
        let mut service = TraceLayer::inbound(
            &telemetry,
            "inbound",
            "spiffe://nexus.local/ns/plugins/sa/flood-model".into(),
        )
        .layer(upstream(StatusCode::OK, seen.clone()));
        let req = Request::builder()
            .uri("/clauses/c-flood-17/rainfall?from=x")
            .header("host", "localhost:8443")
            .header("traceparent", format!("00-{TRACE}-{PARENT}-01"))
            .header("tracestate", "vendor=abc")
            .body(())
            .unwrap();
        let response = service.ready().await.unwrap().call(req).await.unwrap();
        assert!(
            captured.spans().is_empty(),
            "the span ends with the response body, not its head"
        );
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], br#"{"ok":true}"#);

        let spans = captured.spans();
        assert_eq!(spans.len(), 1);
        let span = &spans[0];
        assert_eq!(
            span.span_context.trace_id(),
            TraceId::from_hex(TRACE).unwrap()
        );
        assert_eq!(span.parent_span_id, SpanId::from_hex(PARENT).unwrap());
        assert_eq!(span.span_kind, SpanKind::Server);
        assert_eq!(span.name, "GET");
        for (key, value) in [
            ("http.request.method", Value::from("GET")),
            ("url.path", Value::from("/clauses/c-flood-17/rainfall")),
            ("url.scheme", Value::from("https")),
            ("server.address", Value::from("localhost")),
            ("server.port", Value::from(8443)),
            ("network.protocol.version", Value::from("1.1")),
            ("http.response.status_code", Value::from(200)),
            ("nexus.direction", Value::from("inbound")),
            (
                "nexus.peer.spiffe_id",
                Value::from("spiffe://nexus.local/ns/plugins/sa/flood-model"),
            ),
            ("nexus.decision", Value::from("allow")),
            ("nexus.decision_id", Value::from("d-1")),
            ("nexus.policy_revision", Value::from("rev-7")),
            ("nexus.clause", Value::from("c-flood-17")),
            ("nexus.execution_id", Value::from("ex-1")),
        ] {
            assert_eq!(attribute(span, key), Some(value), "{key}");
        }
        assert_eq!(attribute(span, "error.type"), None);

        let headers = seen.lock().unwrap().clone().unwrap();
        let forwarded = headers["traceparent"].to_str().unwrap();
        assert_eq!(
            forwarded,
            format!("00-{TRACE}-{}-01", span.span_context.span_id())
        );
        assert_eq!(headers["tracestate"], "vendor=abc");
    }

    #[tokio::test]
    async fn a_new_trace_without_a_caller_and_errors_marked() {
        let (telemetry, captured) = telemetry(Sampler::AlwaysOn);
        let seen = Arc::new(Mutex::new(None));
        let upstream_authority: http::uri::Authority = "data.example:15006".parse().unwrap();
        let mut service = TraceLayer::outbound(
            &telemetry,
            "outbound",
            &upstream_authority,
            "spiffe://nexus.local/ns/data/sa/hazard-api".into(),
        )
        .layer(upstream(StatusCode::BAD_GATEWAY, seen.clone()));
        let req = Request::builder()
            .method("POST")
            .uri("/x")
            .header("tracestate", "stale=1")
            .body(())
            .unwrap();
        let response = service.ready().await.unwrap().call(req).await.unwrap();
        drop(response.into_body().collect().await.unwrap());
        let spans = captured.spans();
        let span = &spans[0];
        assert_eq!(span.parent_span_id, SpanId::INVALID);
        assert_eq!(span.span_kind, SpanKind::Client);
        assert_eq!(attribute(span, "error.type"), Some(Value::from("502")));
        assert!(matches!(span.status, Status::Error { .. }));
        assert_eq!(
            attribute(span, "url.full"),
            Some(Value::from("https://data.example:15006/x"))
        );
        assert_eq!(attribute(span, "server.port"), Some(Value::from(15006)));
        let headers = seen.lock().unwrap().clone().unwrap();
        let forwarded = headers["traceparent"].to_str().unwrap();
        assert_eq!(
            forwarded,
            format!(
                "00-{}-{}-01",
                span.span_context.trace_id(),
                span.span_context.span_id()
            )
        );
        assert!(
            headers.get("tracestate").is_none(),
            "an empty state is not sent"
        );
    }

    #[tokio::test]
    async fn an_unsampled_request_still_carries_the_trace_on() {
        let (telemetry, captured) = telemetry(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)));
        let seen = Arc::new(Mutex::new(None));
        let mut service = TraceLayer::inbound(&telemetry, "inbound", "spiffe://x/y".into())
            .layer(upstream(StatusCode::OK, seen.clone()));
        let req = Request::builder()
            .uri("/")
            .header("traceparent", format!("00-{TRACE}-{PARENT}-00"))
            .body(())
            .unwrap();
        let response = service.ready().await.unwrap().call(req).await.unwrap();
        drop(response.into_body().collect().await.unwrap());
        assert!(captured.spans().is_empty(), "not sampled, not exported");
        let headers = seen.lock().unwrap().clone().unwrap();
        let forwarded = headers["traceparent"].to_str().unwrap();
        assert!(
            forwarded.starts_with(&format!("00-{TRACE}-")),
            "{forwarded}"
        );
        assert!(forwarded.ends_with("-00"), "{forwarded}");
        assert!(!forwarded.contains(PARENT), "{forwarded}");
    }

    #[tokio::test]
    async fn a_dropped_body_ends_the_span_as_aborted() {
        let (telemetry, captured) = telemetry(Sampler::AlwaysOn);
        let mut service = TraceLayer::inbound(&telemetry, "inbound", "spiffe://x/y".into()).layer(
            tower::service_fn(|_req: Request<()>| async {
                // One frame, then nothing more: the client goes away mid-body.
                let frames = futures::stream::iter([Ok::<_, hyper::Error>(Frame::data(
                    Bytes::from_static(b"partial"),
                ))])
                .chain(futures::stream::pending());
                let body = http_body_util::StreamBody::new(frames);
                Ok::<_, Infallible>(Response::new(BodyExt::boxed(body)))
            }),
        );
        let response = service
            .ready()
            .await
            .unwrap()
            .call(Request::new(()))
            .await
            .unwrap();
        drop(response);
        let spans = captured.spans();
        assert_eq!(
            attribute(&spans[0], "error.type"),
            Some(Value::from("response_body_aborted"))
        );
    }

    #[test]
    fn injected_context_reads_back_with_the_propagator() {
        let context = SpanContext::new(
            TraceId::from_hex(TRACE).unwrap(),
            SpanId::from_hex(PARENT).unwrap(),
            TraceFlags::SAMPLED,
            true,
            "a=1,b=2".parse().unwrap(),
        );
        let mut headers = HeaderMap::new();
        inject(&mut headers, &context);
        let read = opentelemetry_sdk::propagation::TraceContextPropagator::new()
            .extract_with_context(&opentelemetry::Context::new(), &Headers(&headers));
        use opentelemetry::trace::TraceContextExt as _;
        assert_eq!(read.span().span_context(), &context);
    }

    #[test]
    fn long_values_are_cut_at_a_char_boundary() {
        let long = "é".repeat(MAX_ATTRIBUTE_BYTES);
        let cut = bounded(&long);
        assert!(cut.len() <= MAX_ATTRIBUTE_BYTES);
        assert!(cut.chars().all(|c| c == 'é'));
    }
}
