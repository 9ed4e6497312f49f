//! OpenTelemetry traces: the `tracing` layer that turns this crate's spans into OTel
//! spans and exports them over OTLP/HTTP (protobuf), and the W3C `traceparent`
//! propagation helpers the HTTP middleware and the callback sender use.
//!
//! Off unless `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is
//! set: then no layer is installed, no exporter or thread exists, [`enabled`] is false and
//! every helper here returns at once. The spans the code opens for traces (store calls,
//! actor decide/commit, Kubernetes, cloud and CML calls) are `debug` level, which the
//! default log filter does not enable, so with traces off they are disabled callsites
//! and cost next to nothing; the OTel layer has its own filter and sees them whatever
//! `RUST_LOG` says.
//!
//! When on: a batch span processor (its own thread, `OTEL_BSP_SCHEDULE_DELAY` between
//! exports) sends to the endpoint with a blocking reqwest client (no proxy); [`Guard`]
//! flushes and stops it on shutdown. Headers and the endpoint URL are never logged.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing::{Level, Metadata, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::Filter;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use crate::config::TracesSettings;

/// Whether the OTel layer is installed (set once, at start-up).
static ENABLED: AtomicBool = AtomicBool::new(false);

/// The W3C trace context header (and its key in a propagation carrier).
const TRACEPARENT: &str = "traceparent";

/// How long one export may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether traces are exported (the OTel layer is installed).
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Owns the tracer provider; [`Guard::shutdown`] exports what is still buffered.
pub struct Guard {
    provider: SdkTracerProvider,
}

impl Guard {
    /// Flushes every buffered span and stops the exporter. Blocks (up to the export
    /// timeout): call it outside the async runtime, or from a blocking task.
    pub fn shutdown(self) {
        let _ = self.provider.force_flush();
        if let Err(e) = self.provider.shutdown() {
            eprintln!("resource-plane: trace exporter shutdown: {e}");
        }
    }
}

/// Which spans and events go to OTel: this crate's spans from `debug` up and its events
/// from `info` up (events become span events), nothing from other crates (the
/// exporter's own HTTP client must not trace itself).
fn wanted(m: &Metadata<'_>) -> bool {
    let ours = m.target().starts_with("resource_plane");
    let level = if m.is_span() {
        Level::DEBUG
    } else {
        Level::INFO
    };
    ours && *m.level() <= level
}

/// The filter of the OTel layer (see [`wanted`]).
pub fn filter<S>() -> impl Filter<S> + Send + Sync + 'static {
    filter_fn(wanted)
}

/// Builds the exporter, the batch processor and the `tracing` layer for `settings`.
/// Marks traces enabled; nothing is started when this is not called.
pub fn layer<S>(settings: &TracesSettings) -> Result<(impl Layer<S>, Guard), String>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    // A blocking client runs its own runtime, which must not be built (or dropped) in an
    // async context: build it on a thread of its own.
    let client = std::thread::spawn(|| {
        reqwest::blocking::Client::builder()
            .no_proxy()
            .timeout(EXPORT_TIMEOUT)
            .build()
    })
    .join()
    .map_err(|_| "trace exporter http client: build panicked".to_owned())?
    .map_err(|e| format!("trace exporter http client: {e}"))?;
    let headers: HashMap<String, String> = settings
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), v.expose().to_owned()))
        .collect();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(settings.endpoint.expose())
        .with_timeout(EXPORT_TIMEOUT)
        .with_headers(headers)
        .build()
        // The error may quote the URL or a header: say only what to check.
        .map_err(|_| {
            "trace exporter could not be built: check the OTEL_EXPORTER_OTLP_* variables".to_owned()
        })?;
    let batch = BatchConfigBuilder::default()
        .with_scheduled_delay(settings.schedule_delay)
        .build();
    let processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(batch)
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(
            Resource::builder()
                .with_service_name(settings.service_name.clone())
                .build(),
        )
        .build();
    let tracer = provider.tracer(env!("CARGO_PKG_NAME"));
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_threads(false)
        .with_tracked_inactivity(false);
    ENABLED.store(true, Ordering::Relaxed);
    Ok((layer, Guard { provider }))
}

/// Reads `traceparent`/`tracestate` from an incoming request.
struct HeaderReader<'a>(&'a actix_web::http::header::HeaderMap);

impl Extractor for HeaderReader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Writes `traceparent`/`tracestate` into an outgoing request.
struct HeaderWriter<'a>(&'a mut reqwest::header::HeaderMap);

impl Injector for HeaderWriter<'_> {
    fn set(&mut self, key: &str, value: String) {
        let name = reqwest::header::HeaderName::from_bytes(key.as_bytes());
        let value = reqwest::header::HeaderValue::from_str(&value);
        if let (Ok(name), Ok(value)) = (name, value) {
            self.0.insert(name, value);
        }
    }
}

/// Makes `span` continue the trace of an incoming W3C `traceparent` header (a missing
/// or malformed one starts a new trace). No-op while traces are off.
pub fn continue_trace(span: &Span, headers: &actix_web::http::header::HeaderMap) {
    adopt_parent(span, &HeaderReader(headers));
}

/// Makes `span` a child of the span a stored W3C `traceparent` names (see
/// [`current_traceparent`]); a malformed one leaves `span` its own trace. Call it before
/// the span is first entered. No-op while traces are off.
///
/// A child, not a span link, even when the parent ended long ago or on another replica
/// (a callback retried after a failover): the parent is only ids, which the backend
/// joins whenever the spans arrive, and the callback is the request's outcome, so it
/// belongs in the request's tree.
pub fn continue_traceparent(span: &Span, traceparent: &str) {
    let carrier: HashMap<String, String> =
        HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
    adopt_parent(span, &carrier);
}

/// Sets the remote context `carrier` holds as `span`'s parent when it is valid.
fn adopt_parent(span: &Span, carrier: &dyn Extractor) {
    if !enabled() || span.is_disabled() {
        return;
    }
    let parent = TraceContextPropagator::new().extract(carrier);
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// The W3C `traceparent` naming the current span, to be stored with work that outlives
/// it (a watch intent, whose callback attempts continue the request's trace); `None`
/// while traces are off or outside any exported span.
pub fn current_traceparent() -> Option<String> {
    if !enabled() {
        return None;
    }
    let cx = Span::current().context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// Adds `traceparent` (and `tracestate`) naming the current span to an outgoing
/// request. No-op while traces are off.
pub fn inject_current(headers: &mut reqwest::header::HeaderMap) {
    if !enabled() {
        return;
    }
    let cx = Span::current().context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut HeaderWriter(headers));
    }
}

/// The current span, to be linked to later ([`link`]); `Span::none()` (nothing kept)
/// while traces are off.
#[inline]
pub fn current_for_link() -> Span {
    if enabled() {
        Span::current()
    } else {
        Span::none()
    }
}

/// Adds a span link from `span` to `to` (e.g. a grouped etcd Txn to each member's
/// call). No-op while traces are off or either span is disabled.
pub fn link(span: &Span, to: &Span) {
    if !enabled() || span.is_disabled() || to.is_disabled() {
        return;
    }
    let target = to.context().span().span_context().clone();
    if target.is_valid() {
        span.add_link(target);
    }
}

/// Names `span` in OTel as `name` (the `otel.name` field it must declare). No-op while
/// traces are off, so callers may build `name` lazily.
pub fn rename(span: &Span, name: impl FnOnce() -> String) {
    if enabled() && !span.is_disabled() {
        span.record("otel.name", name());
    }
}
