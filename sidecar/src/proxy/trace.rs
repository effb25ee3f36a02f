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
//! What the steps inside this one decided (decision, clause, execution, body digests)
//! is read from the request's [`Exchange`] when the span ends.
//!
//! Without `[telemetry] otlp_endpoint` the layer is not in the stack at all, and a
//! caller's `traceparent` passes through untouched like any other header.

use std::sync::Arc;
use std::time::Instant;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Request, StatusCode, Version};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{
    Span as _, SpanBuilder, SpanContext, SpanKind, Status, TraceFlags, Tracer as _,
};
use opentelemetry::{KeyValue, StringValue, Value};

use super::observe::{EndObserver, ObservedBody};
use super::outcome::Exchange;
use super::{AnswerFuture, Next, Step};
use crate::metrics::Direction;
use crate::telemetry::Telemetry;

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Longest attribute value taken from the request (path, authority); longer ones are
/// cut at a character boundary.
const MAX_ATTRIBUTE_BYTES: usize = 1024;

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

impl<S: Next<B>, B> Step<S, B> for TraceLayer {
    type Body = B;

    fn call(&self, mut req: Request<B>, next: &mut S) -> AnswerFuture {
        let start = Instant::now();
        let telemetry = &self.telemetry;
        let site = &self.site;
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
        let exchange = Exchange::attach(req.extensions_mut());
        // A span from a shut-down provider has no valid context: then the caller's
        // trace context goes on as it came.
        if span.span_context().is_valid() {
            inject(req.headers_mut(), span.span_context());
            exchange.set_trace_id(span.span_context().trace_id().to_string());
        }
        let mut in_flight = InFlight {
            telemetry: telemetry.clone(),
            span,
            exchange,
            start,
            direction: site.direction,
            server: site.kind == SpanKind::Server,
            method,
            status: None,
            error: None,
        };
        let future = next.call(req);
        Box::pin(async move {
            match future.await {
                Ok(response) => {
                    in_flight.status = Some(response.status());
                    Ok(response.map(|body| ObservedBody::boxed(body, in_flight)))
                }
                // The rescue answers it at once: the span ends here.
                Err(refusal) => {
                    in_flight.status = Some(refusal.status());
                    drop(in_flight);
                    Err(refusal)
                }
            }
        })
    }
}

/// A request between its head and the end of its response body. Dropping it ends the
/// span and records the metrics, however the request ended.
struct InFlight {
    telemetry: Telemetry,
    span: opentelemetry_sdk::trace::Span,
    exchange: Arc<Exchange>,
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
        let decision = self.exchange.decision();
        let result = decision.and_then(|d| d.verdict.traced());
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
        if let Some(result) = result {
            instruments.decisions.add(
                1,
                &[direction.clone(), KeyValue::new("nexus.decision", result)],
            );
        }
        if let Some(evaluation) = decision.and_then(|d| d.evaluation) {
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
        // What was decided, when something was (a target refused before any decision
        // has none of these).
        let decided = decision.filter(|_| result.is_some());
        let digests = self.exchange.digests();
        for (key, value) in [
            ("nexus.clause", decided.and_then(|d| d.clause.as_deref())),
            (
                "nexus.execution_id",
                decided.and_then(|d| d.execution_id.as_deref()),
            ),
            ("nexus.decision_id", decided.map(|d| d.id.as_str())),
            (
                "nexus.policy_revision",
                decided
                    .map(|d| d.revision.as_str())
                    .filter(|revision| !revision.is_empty()),
            ),
            ("nexus.request.sha256", digests.map(|(request, _)| request)),
            (
                "nexus.response.sha256",
                digests.map(|(_, response)| response),
            ),
        ] {
            if let Some(value) = value {
                attributes.push(KeyValue::new(key, value.to_owned()));
            }
        }
        if let Some(result) = result {
            attributes.push(KeyValue::new("nexus.decision", result));
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
    crate::metrics::known_method(method).unwrap_or(OTHER_METHOD)
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
    use http::Response;
    use http_body::Frame;
    use http_body_util::BodyExt;
    use opentelemetry::trace::{SpanId, TraceId};
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::trace::{Sampler, SimpleSpanProcessor, SpanData, SpanExporter};
    use tower::{Layer as _, Service as _, ServiceExt as _};

    use super::*;
    use crate::proxy::outcome::{Decision, Refusal, Verdict};
    use crate::proxy::{ProxyBody, step};

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

    /// An upstream that records the headers it got, decides as the policy step will,
    /// and answers `status`.
    fn upstream(
        status: StatusCode,
        seen: Arc<Mutex<Option<HeaderMap>>>,
    ) -> impl tower::Service<
        Request<()>,
        Response = Response<ProxyBody>,
        Error = Refusal,
        Future = impl Send + 'static,
    > + Clone {
        tower::service_fn(move |req: Request<()>| {
            *seen.lock().unwrap() = Some(req.headers().clone());
            if let Some(exchange) = Exchange::of(req.extensions()) {
                exchange.decide(Decision {
                    verdict: Verdict::Allow,
                    id: "d-1".into(),
                    revision: "rev-7".into(),
                    evaluation: Some(std::time::Duration::from_micros(20)),
                    clause: Some("c-flood-17".into()),
                    execution_id: Some("ex-1".into()),
                    ..Decision::without_policy(Verdict::Allow, String::new())
                });
            }
            async move {
                Ok::<_, Refusal>(crate::proxy::json_response(
                    status,
                    Bytes::from_static(br#"{"ok":true}"#),
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
        let mut service = step(TraceLayer::inbound(
            &telemetry,
            "inbound",
            "spiffe://nexus.local/ns/plugins/sa/flood-model".into(),
        ))
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
        let mut service = step(TraceLayer::outbound(
            &telemetry,
            "outbound",
            &upstream_authority,
            "spiffe://nexus.local/ns/data/sa/hazard-api".into(),
        ))
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
        let mut service = step(TraceLayer::inbound(
            &telemetry,
            "inbound",
            "spiffe://x/y".into(),
        ))
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
        let mut service = step(TraceLayer::inbound(
            &telemetry,
            "inbound",
            "spiffe://x/y".into(),
        ))
        .layer(tower::service_fn(|_req: Request<()>| async {
            // One frame, then nothing more: the client goes away mid-body.
            let frames = futures::stream::iter([Ok::<_, hyper::Error>(Frame::data(
                Bytes::from_static(b"partial"),
            ))])
            .chain(futures::stream::pending());
            let body = http_body_util::StreamBody::new(frames);
            Ok::<_, Refusal>(Response::new(BodyExt::boxed(body)))
        }));
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
