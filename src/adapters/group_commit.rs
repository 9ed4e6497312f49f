//! Group commit: a `Store` decorator that lets concurrent, independent transactions
//! share one etcd Txn. (Skeleton: forwards every call.)

use std::sync::Arc;

use async_trait::async_trait;

use crate::config::GroupCommitSettings;
use crate::ports::store::{Kv, Store, StoreError, Txn, TxnResult, WatchReceiver};
use crate::telemetry::Metrics;

/// Groups concurrent transactions into shared etcd Txns.
pub struct GroupCommitStore {
    inner: Arc<dyn Store>,
    metrics: Metrics,
}

impl GroupCommitStore {
    /// Wraps `inner`; `prefix_len` is the length of the key prefix the inner adapter adds.
    pub fn new(
        inner: Arc<dyn Store>,
        _settings: GroupCommitSettings,
        _prefix_len: usize,
        metrics: Metrics,
    ) -> Self {
        Self { inner, metrics }
    }
}

#[async_trait]
impl Store for GroupCommitStore {
    async fn get(&self, key: &str) -> Result<Option<Kv>, StoreError> {
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &str) -> Result<(Vec<Kv>, i64), StoreError> {
        self.inner.list(prefix).await
    }
    async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError> {
        self.metrics.group_commit_members.inc();
        self.metrics.group_commit_txns.inc();
        self.metrics.group_commit_batch.observe(1.0);
        self.inner.txn(txn).await
    }
    async fn grant_lease(&self, ttl_seconds: i64) -> Result<i64, StoreError> {
        self.inner.grant_lease(ttl_seconds).await
    }
    async fn keep_alive(&self, lease: i64) -> Result<i64, StoreError> {
        self.inner.keep_alive(lease).await
    }
    async fn revoke_lease(&self, lease: i64) -> Result<(), StoreError> {
        self.inner.revoke_lease(lease).await
    }
    async fn watch(&self, prefix: &str, start_revision: i64) -> Result<WatchReceiver, StoreError> {
        self.inner.watch(prefix, start_revision).await
    }
    async fn health(&self) -> Result<(), StoreError> {
        self.inner.health().await
    }
    fn name(&self) -> &'static str {
        self.inner.name()
    }
}
