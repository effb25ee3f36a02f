//! OpenTelemetry export: one span per proxied request (made by [`crate::proxy::trace`])
//! and four metrics, sent over OTLP/gRPC to `[telemetry] otlp_endpoint`.
//!
//! With no endpoint nothing here is built and the request path carries no trace layer.
//! With one, a slow or absent collector never holds a request: finished spans go into a
//! bounded queue that a background thread drains, and a span that does not fit is
//! dropped. Every span that does not reach the collector, dropped on a full queue or lost
//! in a failed export, is counted in the Prometheus registry
//! (`nexus_otel_spans_dropped_total{reason}`, `nexus_otel_export_failures_total{signal}`)
//! and logged (at most once per [`LOG_EVERY`] per kind): never silent.
//!
//! The SDK's batch processor drops on a full queue without telling anyone but its own
//! diagnostics, so the queue bound is kept here, in [`BoundedSpans`], which counts the
//! spans between `on_end` and the end of their export and refuses one past the bound;
//! the SDK's own queue has the same size and so never fills.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, MeterProvider as _};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider, Temporality};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, SpanData,
    SpanExporter, SpanProcessor,
};
use serde::Deserialize;

use crate::config::ConfigError;
use crate::metrics::Metrics;

/// A repeated export problem is logged at most this often (the counters count them all).
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// `[telemetry]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP/gRPC collector, `http://host:port` (e.g. `http://127.0.0.1:4317`). Absent:
    /// no spans, no OTel metrics, nothing on the request path. TLS to the collector is
    /// not built in: point it at a collector or agent on the node.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported resource. Default `nexus-sidecar`.
    pub service_name: String,
    /// Share of new traces sampled, 0.0 to 1.0; a request that arrives with a
    /// `traceparent` follows its caller's decision. Default 1.0.
    pub sample_ratio: f64,
    /// Finished spans waiting for export; past this, spans are dropped and counted.
    /// Default 2048.
    pub max_queue_size: usize,
    /// One export (with its retries) may take this long. Default 5s.
    #[serde(with = "humantime_serde")]
    pub export_timeout: Duration,
    /// Spans are sent at least this often (sooner when 512 are waiting). Default 5s.
    #[serde(with = "humantime_serde")]
    pub batch_delay: Duration,
    /// Metrics are sent this often. Default 10s.
    #[serde(with = "humantime_serde")]
    pub metrics_interval: Duration,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: "nexus-sidecar".into(),
            sample_ratio: 1.0,
            max_queue_size: 2048,
            export_timeout: Duration::from_secs(5),
            batch_delay: Duration::from_secs(5),
            metrics_interval: Duration::from_secs(10),
        }
    }
}

fn invalid(field: &str, problem: impl Into<String>, fix: &str) -> ConfigError {
    ConfigError::Invalid {
        field: format!("telemetry.{field}"),
        problem: problem.into(),
        fix: fix.into(),
    }
}

impl TelemetryConfig {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(endpoint) = &self.otlp_endpoint {
            let uri: http::Uri = endpoint.parse().map_err(|e| {
                invalid(
                    "otlp_endpoint",
                    format!("`{endpoint}`: {e}"),
                    "write it as http://host:port, e.g. http://127.0.0.1:4317",
                )
            })?;
            if uri.scheme() != Some(&http::uri::Scheme::HTTP) {
                return Err(invalid(
                    "otlp_endpoint",
                    format!("`{endpoint}` is not an http:// URL"),
                    "use http://host:port of a collector or agent on the node (TLS to the collector is not supported)",
                ));
            }
            if uri.port_u16().is_none() {
                return Err(invalid(
                    "otlp_endpoint",
                    format!("`{endpoint}` has no port"),
                    "add the OTLP/gRPC port, e.g. http://127.0.0.1:4317",
                ));
            }
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(invalid(
                "sample_ratio",
                format!("{} is not between 0.0 and 1.0", self.sample_ratio),
                "use 1.0 to sample every new trace, 0.1 for one in ten",
            ));
        }
        if self.max_queue_size == 0 {
            return Err(invalid(
                "max_queue_size",
                "must be at least 1",
                "use the default, 2048",
            ));
        }
        for (field, value, default) in [
            ("export_timeout", self.export_timeout, "5s"),
            ("batch_delay", self.batch_delay, "5s"),
            ("metrics_interval", self.metrics_interval, "10s"),
        ] {
            if value.is_zero() {
                return Err(invalid(
                    field,
                    "must be more than 0",
                    &format!("use the default, {default}"),
                ));
            }
        }
        Ok(())
    }
}

/// The exporter could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter refused its configuration.
    #[error("cannot build the OTLP exporter for telemetry.otlp_endpoint: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// The instruments the trace layer records into.
pub(crate) struct Instruments {
    /// `nexus.requests`: requests by direction, method and status.
    pub requests: Counter<u64>,
    /// `nexus.request.duration`: from the request head to the end of the response body.
    pub request_duration: Histogram<f64>,
    /// `nexus.policy.decisions`: decisions by direction and result.
    pub decisions: Counter<u64>,
    /// `nexus.policy.evaluation.duration`: time to evaluate the decision rule.
    pub evaluation: Histogram<f64>,
}

impl Instruments {
    fn new(meter: &opentelemetry::metrics::Meter) -> Self {
        Self {
        requests: meter
            .u64_counter("nexus.requests")
            .with_description("Requests proxied, by direction, method and response status")
            .with_unit("{request}")
            .build(),
        request_duration: meter
            .f64_histogram("nexus.request.duration")
            .with_description(
                "Time from the request head to the end of the response body, by direction, method and status",
            )
            .with_unit("s")
            .with_boundaries(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                5.0, 10.0, 30.0,
            ])
            .build(),
        decisions: meter
            .u64_counter("nexus.policy.decisions")
            .with_description("Policy decisions by direction and result")
            .with_unit("{decision}")
            .build(),
        evaluation: meter
            .f64_histogram("nexus.policy.evaluation.duration")
            .with_description("Time to evaluate the decision rule")
            .with_unit("s")
            .with_boundaries(vec![
                1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 1e-3, 1e-2, 5e-2, 0.25,
            ])
            .build(),
    }
    }
}

struct Inner {
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
    instruments: Instruments,
    tracer_provider: SdkTracerProvider,
    meter_provider: SdkMeterProvider,
    shutdown_timeout: Duration,
}

/// Export is on: the tracer, the instruments and the providers to flush at shutdown.
/// Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct Telemetry {
    inner: Arc<Inner>,
}

impl fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Telemetry")
    }
}

impl Telemetry {
    /// Builds the exporters when `config.otlp_endpoint` is set (`None` otherwise). Call
    /// it inside the tokio runtime: the gRPC channel's worker runs there. The collector
    /// is connected lazily, so an absent one is not an error here.
    pub fn init(
        config: &TelemetryConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Option<Self>, TelemetryError> {
        let Some(endpoint) = &config.otlp_endpoint else {
            return Ok(None);
        };
        let resource = Resource::builder()
            .with_service_name(config.service_name.clone())
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        let scope = opentelemetry::InstrumentationScope::builder("nexus-sidecar")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build();

        let spans = Arc::new(SpanAccounting::new(config.max_queue_size, metrics.clone()));
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .with_timeout(config.export_timeout)
            .build()?;
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(config.max_queue_size)
            .with_max_export_batch_size(config.max_queue_size.min(512))
            .with_scheduled_delay(config.batch_delay)
            .build();
        let processor = BatchSpanProcessor::builder(CountingSpans {
            inner: exporter,
            accounting: spans.clone(),
        })
        .with_batch_config(batch)
        .build();
        let tracer_provider = SdkTracerProvider::builder()
            .with_span_processor(BoundedSpans {
                inner: processor,
                accounting: spans,
            })
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                config.sample_ratio,
            ))))
            .with_resource(resource.clone())
            .build();
        let tracer = tracer_provider.tracer_with_scope(scope.clone());

        let metric_exporter = opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .with_timeout(config.export_timeout)
            .build()?;
        let reader = PeriodicReader::builder(CountingMetrics {
            inner: metric_exporter,
            metrics,
            log: Every::new(LOG_EVERY),
            failing: AtomicBool::new(false),
        })
        .with_interval(config.metrics_interval)
        .build();
        let meter_provider = SdkMeterProvider::builder()
            .with_reader(reader)
            .with_resource(resource)
            .build();
        let instruments = Instruments::new(&meter_provider.meter_with_scope(scope));
        tracing::info!(
            %endpoint,
            service_name = %config.service_name,
            sample_ratio = config.sample_ratio,
            max_queue_size = config.max_queue_size,
            "OpenTelemetry export on"
        );
        Ok(Some(Self {
            inner: Arc::new(Inner {
                tracer,
                propagator: TraceContextPropagator::new(),
                instruments,
                tracer_provider,
                meter_provider,
                shutdown_timeout: config.export_timeout,
            }),
        }))
    }

    /// Telemetry over any span processor and sampler, with metrics kept in memory: for
    /// unit tests of the trace layer.
    #[cfg(test)]
    pub(crate) fn with_processor(
        processor: impl SpanProcessor + 'static,
        sampler: Sampler,
    ) -> Self {
        let tracer_provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(sampler)
            .build();
        let meter_provider = SdkMeterProvider::builder().build();
        let instruments = Instruments::new(&meter_provider.meter("test"));
        Self {
            inner: Arc::new(Inner {
                tracer: tracer_provider.tracer("test"),
                propagator: TraceContextPropagator::new(),
                instruments,
                tracer_provider,
                meter_provider,
                shutdown_timeout: Duration::from_secs(1),
            }),
        }
    }

    pub(crate) fn tracer(&self) -> &SdkTracer {
        &self.inner.tracer
    }

    pub(crate) fn propagator(&self) -> &TraceContextPropagator {
        &self.inner.propagator
    }

    pub(crate) fn instruments(&self) -> &Instruments {
        &self.inner.instruments
    }

    /// Exports what is queued (spans, and a last metrics collection, side by side) and
    /// stops the exporters, waiting at most `export_timeout` plus a second. Spans ended
    /// after this are not exported.
    pub async fn shutdown(&self) {
        let timeout = self.inner.shutdown_timeout;
        let spans = {
            let provider = self.inner.tracer_provider.clone();
            off_runtime("spans", move || provider.shutdown_with_timeout(timeout))
        };
        let metrics = {
            let provider = self.inner.meter_provider.clone();
            off_runtime("metrics", move || provider.shutdown_with_timeout(timeout))
        };
        let bound = timeout + Duration::from_secs(1);
        match tokio::time::timeout(bound, async { tokio::join!(spans, metrics) }).await {
            Ok((Ok(()), Ok(()))) => tracing::debug!("telemetry flushed"),
            Ok((spans, metrics)) => tracing::warn!(
                spans = ?spans.err(),
                metrics = ?metrics.err(),
                "telemetry flush at shutdown incomplete"
            ),
            Err(_) => tracing::warn!(?bound, "telemetry flush at shutdown timed out"),
        }
    }
}

/// Runs a blocking provider shutdown on a thread of its own and waits for it. A plain
/// thread, not `spawn_blocking`: one held by a collector that does not answer must not
/// hold the runtime's own shutdown past the caller's bound.
async fn off_runtime(
    what: &'static str,
    f: impl FnOnce() -> OTelSdkResult + Send + 'static,
) -> Result<(), String> {
    let (done, wait) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("nexus-otel-shutdown-{what}"))
        .spawn(move || {
            let _ = done.send(f());
        })
        .map_err(|e| format!("cannot start a thread: {e}"))?;
    match wait.await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => Err("the shutdown thread ended without an answer".into()),
    }
}

/// Lets an event through at most once per period.
struct Every {
    period_ms: u64,
    epoch: Instant,
    last_ms: AtomicU64,
}

impl Every {
    fn new(period: Duration) -> Self {
        Self {
            period_ms: u64::try_from(period.as_millis()).unwrap_or(u64::MAX),
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn ready(&self) -> bool {
        // Offset by one period, so the first event always passes.
        let now = u64::try_from(self.epoch.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(self.period_ms);
        let last = self.last_ms.load(Ordering::Relaxed);
        now.saturating_sub(last) >= self.period_ms
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

/// Spans between `on_end` and the end of their export, shared by [`BoundedSpans`] and
/// [`CountingSpans`].
struct SpanAccounting {
    pending: AtomicUsize,
    max: usize,
    dropped: AtomicU64,
    failed: AtomicU64,
    failing: AtomicBool,
    drop_log: Every,
    fail_log: Every,
    metrics: Arc<Metrics>,
}

impl SpanAccounting {
    fn new(max: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            pending: AtomicUsize::new(0),
            max,
            dropped: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            failing: AtomicBool::new(false),
            drop_log: Every::new(LOG_EVERY),
            fail_log: Every::new(LOG_EVERY),
            metrics,
        }
    }

    /// Takes a place in the queue, or counts the span as dropped.
    fn admit(&self) -> bool {
        if self.pending.fetch_add(1, Ordering::AcqRel) < self.max {
            return true;
        }
        self.pending.fetch_sub(1, Ordering::AcqRel);
        let total = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        self.metrics.otel_spans_dropped("queue_full", 1);
        if self.drop_log.ready() {
            tracing::warn!(
                dropped_total = total,
                max_queue_size = self.max,
                "span export queue full: dropping spans (the collector is slow or absent; see nexus_otel_spans_dropped_total)"
            );
        }
        false
    }

    /// An export of `n` spans ended.
    fn exported(&self, n: usize, result: &OTelSdkResult) {
        self.pending.fetch_sub(n, Ordering::AcqRel);
        let n64 = u64::try_from(n).unwrap_or(u64::MAX);
        match result {
            Ok(()) => {
                self.metrics.otel_spans_exported(n64);
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("span export to the collector recovered");
                }
            }
            Err(error) => {
                self.failing.store(true, Ordering::Relaxed);
                let total = self.failed.fetch_add(n64, Ordering::Relaxed) + n64;
                self.metrics.otel_export_failure("traces");
                self.metrics.otel_spans_dropped("export_failed", n64);
                if self.fail_log.ready() {
                    tracing::warn!(%error, spans = n, lost_total = total, "span export to the collector failed: spans lost");
                }
            }
        }
    }
}

/// The batch processor behind a bound that counts what it refuses.
#[derive(Debug)]
struct BoundedSpans {
    inner: BatchSpanProcessor,
    accounting: Arc<SpanAccounting>,
}

impl fmt::Debug for SpanAccounting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpanAccounting")
            .field("pending", &self.pending)
            .field("max", &self.max)
            .finish()
    }
}

impl SpanProcessor for BoundedSpans {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &opentelemetry::Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if self.accounting.admit() {
            self.inner.on_end(span);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The OTLP span exporter, counting what it delivered and what it lost.
#[derive(Debug)]
struct CountingSpans<E> {
    inner: E,
    accounting: Arc<SpanAccounting>,
}

impl<E: SpanExporter> SpanExporter for CountingSpans<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        let result = self.inner.export(batch).await;
        self.accounting.exported(n, &result);
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The OTLP metric exporter, counting failed exports. Metrics are cumulative, so a
/// failed export loses no count: the next one carries it.
struct CountingMetrics<E> {
    inner: E,
    metrics: Arc<Metrics>,
    log: Every,
    failing: AtomicBool,
}

impl<E: PushMetricExporter> PushMetricExporter for CountingMetrics<E> {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        let result = self.inner.export(metrics).await;
        match &result {
            Ok(()) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("metric export to the collector recovered");
                }
            }
            Err(error) => {
                self.failing.store(true, Ordering::Relaxed);
                self.metrics.otel_export_failure("metrics");
                if self.log.ready() {
                    tracing::warn!(%error, "metric export to the collector failed");
                }
            }
        }
        result
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn temporality(&self) -> Temporality {
        self.inner.temporality()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_bad_values_name_the_field() {
        let mut config = TelemetryConfig::default();
        config.validate().unwrap();
        config.otlp_endpoint = Some("http://127.0.0.1:4317".into());
        config.validate().unwrap();
        for (endpoint, expect) in [
            ("https://collector:4317", "not an http:// URL"),
            ("http://collector", "has no port"),
            ("collector:4317", "not an http:// URL"),
        ] {
            config.otlp_endpoint = Some(endpoint.into());
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains("telemetry.otlp_endpoint"), "{err}");
            assert!(err.contains(expect), "{endpoint}: {err}");
        }
        config.otlp_endpoint = None;
        config.sample_ratio = 1.5;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("telemetry.sample_ratio"), "{err}");
        config.sample_ratio = 0.5;
        config.max_queue_size = 0;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("telemetry.max_queue_size"), "{err}");
    }

    #[test]
    fn every_lets_the_first_through_then_waits() {
        let every = Every::new(Duration::from_secs(3600));
        assert!(every.ready());
        assert!(!every.ready());
        let often = Every::new(Duration::ZERO);
        assert!(often.ready());
        assert!(often.ready());
    }

    #[test]
    fn the_bound_refuses_and_counts_past_max() {
        let metrics = Metrics::new();
        let accounting = SpanAccounting::new(2, metrics.clone());
        assert!(accounting.admit());
        assert!(accounting.admit());
        assert!(!accounting.admit());
        assert!(!accounting.admit());
        accounting.exported(1, &Ok(()));
        assert!(accounting.admit());
        accounting.exported(
            2,
            &Err(opentelemetry_sdk::error::OTelSdkError::InternalFailure(
                "down".into(),
            )),
        );
        assert_eq!(accounting.pending.load(Ordering::Relaxed), 0);
        let text = metrics.encode();
        assert!(
            text.contains(r#"nexus_otel_spans_dropped_total{reason="queue_full"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"nexus_otel_spans_dropped_total{reason="export_failed"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"nexus_otel_export_failures_total{signal="traces"} 1"#),
            "{text}"
        );
        assert!(text.contains("nexus_otel_spans_exported_total 1"), "{text}");
    }
}
