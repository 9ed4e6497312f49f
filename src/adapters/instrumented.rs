//! A `Store` decorator that records every call's latency and result in the metrics,
//! so "store calls per procure" can be read off `/metrics`, and wraps each call in a
//! `debug` span (`etcd get`, `etcd txn`, ...), the store call's span in traces.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use tracing::{debug_span, Instrument, Span};

use crate::ports::store::{Kv, Store, StoreError, Txn, TxnResult, WatchReceiver};
use crate::telemetry::Metrics;

/// Wraps a store with metrics.
pub struct InstrumentedStore {
    inner: Arc<dyn Store>,
    metrics: Metrics,
}

impl InstrumentedStore {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Store>, metrics: Metrics) -> Self {
        Self { inner, metrics }
    }

    /// The span of one call: `<adapter> <op>` in traces, no allocation.
    fn span(&self, op: &'static str) -> Span {
        let adapter = self.inner.name();
        debug_span!(
            "store",
            otel.name = span_name(adapter, op),
            otel.kind = "client",
            db.system.name = adapter,
            db.operation.name = op,
        )
    }

    fn record<T>(&self, op: &str, start: Instant, r: &Result<T, StoreError>) {
        let result = if r.is_ok() { "ok" } else { "error" };
        self.metrics
            .store_latency
            .with_label_values(&[self.inner.name(), op, result])
            .observe(start.elapsed().as_secs_f64());
    }
}

#[async_trait]
impl Store for InstrumentedStore {
    async fn get(&self, key: &str) -> Result<Option<Kv>, StoreError> {
        let t = Instant::now();
        let r = self.inner.get(key).instrument(self.span("get")).await;
        self.record("get", t, &r);
        r
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<Kv>, i64), StoreError> {
        let t = Instant::now();
        let r = self.inner.list(prefix).instrument(self.span("list")).await;
        self.record("list", t, &r);
        r
    }

    async fn list_each(
        &self,
        prefix: &str,
        page: &mut (dyn FnMut(Vec<Kv>) + Send),
    ) -> Result<i64, StoreError> {
        let t = Instant::now();
        let r = self
            .inner
            .list_each(prefix, page)
            .instrument(self.span("list"))
            .await;
        self.record("list", t, &r);
        r
    }

    async fn list_after(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Kv>, bool), StoreError> {
        let t = Instant::now();
        let r = self
            .inner
            .list_after(prefix, after, limit)
            .instrument(self.span("list_page"))
            .await;
        self.record("list_page", t, &r);
        r
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError> {
        let t = Instant::now();
        let r = self.inner.txn(txn).instrument(self.span("txn")).await;
        self.record("txn", t, &r);
        r
    }

    async fn grant_lease(&self, ttl_seconds: i64) -> Result<i64, StoreError> {
        let t = Instant::now();
        let r = self
            .inner
            .grant_lease(ttl_seconds)
            .instrument(self.span("lease_grant"))
            .await;
        self.record("lease_grant", t, &r);
        r
    }

    async fn keep_alive(&self, lease: i64) -> Result<i64, StoreError> {
        let t = Instant::now();
        let r = self
            .inner
            .keep_alive(lease)
            .instrument(self.span("lease_keep_alive"))
            .await;
        self.record("lease_keep_alive", t, &r);
        r
    }

    async fn revoke_lease(&self, lease: i64) -> Result<(), StoreError> {
        let t = Instant::now();
        let r = self
            .inner
            .revoke_lease(lease)
            .instrument(self.span("lease_revoke"))
            .await;
        self.record("lease_revoke", t, &r);
        r
    }

    async fn watch(&self, prefix: &str, start_revision: i64) -> Result<WatchReceiver, StoreError> {
        let t = Instant::now();
        let r = self
            .inner
            .watch(prefix, start_revision)
            .instrument(self.span("watch"))
            .await;
        self.record("watch", t, &r);
        r
    }

    async fn health(&self) -> Result<(), StoreError> {
        let t = Instant::now();
        let r = self.inner.health().instrument(self.span("health")).await;
        self.record("health", t, &r);
        r
    }

    fn name(&self) -> &'static str {
        self.inner.name()
    }
}

/// `otel.name` of a store call: static strings for the etcd store's calls.
fn span_name(adapter: &str, op: &'static str) -> &'static str {
    if adapter != "etcd" {
        return op;
    }
    match op {
        "get" => "etcd get",
        "list" => "etcd list",
        "list_page" => "etcd list_page",
        "txn" => "etcd txn",
        "lease_grant" => "etcd lease_grant",
        "lease_keep_alive" => "etcd lease_keep_alive",
        "lease_revoke" => "etcd lease_revoke",
        "watch" => "etcd watch",
        "health" => "etcd health",
        other => other,
    }
}
