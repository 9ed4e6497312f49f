//! Tracing set-up and the Prometheus metrics every layer records into.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

use crate::config::{LogFormat, TracesSettings};
use crate::otel;

/// Installs the global tracing subscriber: logs filtered by `RUST_LOG` (default
/// `info`), and, with `traces`, the OpenTelemetry layer with its own filter (see
/// [`crate::otel`]). The returned guard must be shut down to flush the last spans.
/// Without traces the subscriber is exactly the logs one, with a global filter.
pub fn init_tracing(
    format: LogFormat,
    traces: Option<&TracesSettings>,
) -> Result<Option<otel::Guard>, String> {
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let Some(settings) = traces else {
        let _ = tracing_subscriber::registry()
            .with(filter)
            .with(logs_layer(format))
            .try_init();
        return Ok(None);
    };
    let (layer, guard) = otel::layer(settings)?;
    // Each layer has its own filter: the OTel layer sees its spans whatever RUST_LOG says.
    let _ = tracing_subscriber::registry()
        .with(logs_layer(format).with_filter(filter))
        .with(layer.with_filter(otel::filter()))
        .try_init();
    Ok(Some(guard))
}

/// The log output layer for `format`.
fn logs_layer<S>(format: LogFormat) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    match format {
        LogFormat::Json => fmt::layer()
            .with_target(false)
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
        LogFormat::Text => fmt::layer().with_target(false).boxed(),
    }
}

/// All metrics of one service instance (its own registry, so tests can run several).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// HTTP requests by route pattern, method and status.
    pub http_requests: IntCounterVec,
    /// HTTP latency by route pattern.
    pub http_latency: HistogramVec,
    /// Entity transitions by kind, command and result.
    pub transitions: IntCounterVec,
    /// CAS transactions lost to another writer, by kind.
    pub cas_conflicts: IntCounterVec,
    /// Store calls by adapter and operation (the histogram count is the call count).
    pub store_latency: HistogramVec,
    /// Idempotent replays served, by result (`replayed`, `mismatch`, `in_flight`).
    pub idempotency: IntCounterVec,
    /// Live actors by kind.
    pub actors: IntGaugeVec,
    /// Controller decisions by action.
    pub decisions: IntCounterVec,
    /// Time from an unplaceable instance to the cloud launch call.
    pub scale_up_latency: HistogramVec,
    /// Time from a watch intent's condition holding to its callback being delivered.
    pub callback_latency: HistogramVec,
    /// Callback attempts by outcome.
    pub callbacks: IntCounterVec,
    /// Expired hold leases the leader released (`leases_reaped_total`).
    pub leases_reaped: IntCounter,
    /// Member transactions per etcd Txn sent by the group committer
    /// (`etcd_group_commit_batch_size`).
    pub group_commit_batch: Histogram,
    /// etcd Txn RPCs the group committer sent (`etcd_group_commit_txns_total`).
    pub group_commit_txns: IntCounter,
    /// Member transactions handed to the group committer
    /// (`etcd_group_commit_members_total`); Txn RPCs per transition is
    /// `etcd_group_commit_txns_total / etcd_group_commit_members_total`.
    pub group_commit_members: IntCounter,
    /// What became of members of a grouped Txn that did not simply apply, by outcome:
    /// `conflict` (its own compare failed; answered), `resubmitted` (its compares held
    /// but another member's did not), `solo` (retried alone after the grouped Txn was
    /// refused).
    pub group_commit_splits: IntCounterVec,
    /// Time from an instance's creation (PENDING) to its placement (SCHEDULED).
    pub schedule_latency: Histogram,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let buckets = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        ];
        let http_requests = IntCounterVec::new(
            Opts::new("http_requests_total", "HTTP requests by route and status"),
            &["route", "method", "status"],
        );
        let http_latency = HistogramVec::new(
            HistogramOpts::new("http_request_duration_seconds", "HTTP latency by route")
                .buckets(buckets.clone()),
            &["route"],
        );
        let transitions = IntCounterVec::new(
            Opts::new("entity_transitions_total", "Entity commands by result"),
            &["kind", "command", "result"],
        );
        let cas_conflicts = IntCounterVec::new(
            Opts::new(
                "cas_conflicts_total",
                "CAS transactions lost to another writer",
            ),
            &["kind"],
        );
        let store_latency = HistogramVec::new(
            HistogramOpts::new("store_call_duration_seconds", "Store call latency")
                .buckets(buckets),
            &["adapter", "op", "result"],
        );
        let idempotency = IntCounterVec::new(
            Opts::new("idempotency_outcomes_total", "Idempotency-key outcomes"),
            &["result"],
        );
        let actors = IntGaugeVec::new(Opts::new("actors_live", "Live actors by kind"), &["kind"]);
        let decisions = IntCounterVec::new(
            Opts::new(
                "controller_decisions_total",
                "Controller decisions by action",
            ),
            &["action"],
        );
        let scale_up_latency = HistogramVec::new(
            HistogramOpts::new(
                "scale_up_latency_seconds",
                "Time from an unplaceable instance to the cloud launch call",
            )
            .buckets(vec![0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0]),
            &["template"],
        );
        let callback_latency = HistogramVec::new(
            HistogramOpts::new(
                "callback_delivery_seconds",
                "Time from a condition holding to its callback being delivered",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
            ]),
            &[],
        );
        let callbacks = IntCounterVec::new(
            Opts::new("callback_attempts_total", "Callback attempts by outcome"),
            &["outcome"],
        );
        let leases_reaped = IntCounter::new(
            "leases_reaped_total",
            "Expired shadow deployable hold leases released by the leader",
        );
        let group_commit_batch = Histogram::with_opts(
            HistogramOpts::new(
                "etcd_group_commit_batch_size",
                "Member transactions per etcd Txn sent by the group committer",
            )
            .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
        );
        let group_commit_txns = IntCounter::new(
            "etcd_group_commit_txns_total",
            "etcd Txn RPCs sent by the group committer",
        );
        let group_commit_members = IntCounter::new(
            "etcd_group_commit_members_total",
            "Member transactions handed to the group committer",
        );
        let group_commit_splits = IntCounterVec::new(
            Opts::new(
                "etcd_group_commit_splits_total",
                "Members of a grouped Txn that did not simply apply, by outcome",
            ),
            &["outcome"],
        );
        let schedule_latency = Histogram::with_opts(
            HistogramOpts::new(
                "instance_schedule_latency_seconds",
                "Time from an instance's creation (PENDING) to its placement (SCHEDULED)",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ]),
        );
        // Metric construction only fails on invalid names, which are constants here.
        let metrics = Self {
            registry,
            http_requests: http_requests.unwrap_or_else(|e| panic!("metric: {e}")),
            http_latency: http_latency.unwrap_or_else(|e| panic!("metric: {e}")),
            transitions: transitions.unwrap_or_else(|e| panic!("metric: {e}")),
            cas_conflicts: cas_conflicts.unwrap_or_else(|e| panic!("metric: {e}")),
            store_latency: store_latency.unwrap_or_else(|e| panic!("metric: {e}")),
            idempotency: idempotency.unwrap_or_else(|e| panic!("metric: {e}")),
            actors: actors.unwrap_or_else(|e| panic!("metric: {e}")),
            decisions: decisions.unwrap_or_else(|e| panic!("metric: {e}")),
            scale_up_latency: scale_up_latency.unwrap_or_else(|e| panic!("metric: {e}")),
            callback_latency: callback_latency.unwrap_or_else(|e| panic!("metric: {e}")),
            callbacks: callbacks.unwrap_or_else(|e| panic!("metric: {e}")),
            leases_reaped: leases_reaped.unwrap_or_else(|e| panic!("metric: {e}")),
            group_commit_batch: group_commit_batch.unwrap_or_else(|e| panic!("metric: {e}")),
            group_commit_txns: group_commit_txns.unwrap_or_else(|e| panic!("metric: {e}")),
            group_commit_members: group_commit_members.unwrap_or_else(|e| panic!("metric: {e}")),
            group_commit_splits: group_commit_splits.unwrap_or_else(|e| panic!("metric: {e}")),
            schedule_latency: schedule_latency.unwrap_or_else(|e| panic!("metric: {e}")),
        };
        for c in [
            Box::new(metrics.http_requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(metrics.http_latency.clone()),
            Box::new(metrics.transitions.clone()),
            Box::new(metrics.cas_conflicts.clone()),
            Box::new(metrics.store_latency.clone()),
            Box::new(metrics.idempotency.clone()),
            Box::new(metrics.actors.clone()),
            Box::new(metrics.decisions.clone()),
            Box::new(metrics.scale_up_latency.clone()),
            Box::new(metrics.callback_latency.clone()),
            Box::new(metrics.callbacks.clone()),
            Box::new(metrics.leases_reaped.clone()),
            Box::new(metrics.group_commit_batch.clone()),
            Box::new(metrics.group_commit_txns.clone()),
            Box::new(metrics.group_commit_members.clone()),
            Box::new(metrics.group_commit_splits.clone()),
            Box::new(metrics.schedule_latency.clone()),
        ] {
            let _ = metrics.registry.register(c);
        }
        metrics
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Number of calls of `op` made to the `adapter` store so far (any result).
    pub fn store_calls(&self, adapter: &str, op: &str) -> u64 {
        ["ok", "error"]
            .iter()
            .filter_map(|r| {
                self.store_latency
                    .get_metric_with_label_values(&[adapter, op, r])
                    .ok()
            })
            .map(|h| h.get_sample_count())
            .sum()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
