//! A `Store` decorator that records every call's latency and result in the metrics,
//! so "store calls per procure" can be read off `/metrics`.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;

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
        let r = self.inner.get(key).await;
        self.record("get", t, &r);
        r
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<Kv>, i64), StoreError> {
        let t = Instant::now();
        let r = self.inner.list(prefix).await;
        self.record("list", t, &r);
        r
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError> {
        let t = Instant::now();
        let r = self.inner.txn(txn).await;
        self.record("txn", t, &r);
        r
    }

    async fn grant_lease(&self, ttl_seconds: i64) -> Result<i64, StoreError> {
        let t = Instant::now();
        let r = self.inner.grant_lease(ttl_seconds).await;
        self.record("lease_grant", t, &r);
        r
    }

    async fn keep_alive(&self, lease: i64) -> Result<i64, StoreError> {
        let t = Instant::now();
        let r = self.inner.keep_alive(lease).await;
        self.record("lease_keep_alive", t, &r);
        r
    }

    async fn revoke_lease(&self, lease: i64) -> Result<(), StoreError> {
        let t = Instant::now();
        let r = self.inner.revoke_lease(lease).await;
        self.record("lease_revoke", t, &r);
        r
    }

    async fn watch(&self, prefix: &str, start_revision: i64) -> Result<WatchReceiver, StoreError> {
        let t = Instant::now();
        let r = self.inner.watch(prefix, start_revision).await;
        self.record("watch", t, &r);
        r
    }

    async fn health(&self) -> Result<(), StoreError> {
        let t = Instant::now();
        let r = self.inner.health().await;
        self.record("health", t, &r);
        r
    }

    fn name(&self) -> &'static str {
        self.inner.name()
    }
}
