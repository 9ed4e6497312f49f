//! The `Store` port: a small, etcd-shaped key-value API with revisions, multi-key
//! compare-and-swap transactions, leases and prefix watches.
//!
//! Keys are relative to the adapter's prefix (`ETCD_PREFIX`); adapters add and strip it.

use async_trait::async_trait;
use tokio::sync::mpsc;

/// A key with its value and revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    /// Key, without the adapter prefix.
    pub key: String,
    /// Raw value.
    pub value: Vec<u8>,
    /// Revision of the last write to this key.
    pub mod_revision: i64,
    /// Revision at which the key was created.
    pub create_revision: i64,
}

/// A guard of a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Compare {
    /// The key's `mod_revision` equals this (0 means the key is absent).
    ModRevision(String, i64),
    /// The key's `create_revision` equals this (fencing on an election key).
    CreateRevision(String, i64),
}

/// A write inside a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Put `value` at `key`, bound to `lease` when given.
    Put {
        /// Key.
        key: String,
        /// Value.
        value: Vec<u8>,
        /// Lease id to attach.
        lease: Option<i64>,
    },
    /// Delete `key`.
    Delete {
        /// Key.
        key: String,
    },
}

/// One atomic transaction: if every compare holds, apply `success`; otherwise read
/// `failure_gets` (so a lost CAS costs no extra round trip to learn the new state).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    /// Guards.
    pub compares: Vec<Compare>,
    /// Writes applied when every guard holds.
    pub success: Vec<Op>,
    /// Keys read when a guard fails.
    pub failure_gets: Vec<String>,
}

/// The outcome of a [`Txn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnResult {
    /// Whether the guards held and the writes were applied.
    pub succeeded: bool,
    /// Store revision after the transaction.
    pub revision: i64,
    /// On failure: the current value of each of `failure_gets`, in order.
    pub fetched: Vec<Option<Kv>>,
}

/// A change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// A key was created or updated.
    Put(Kv),
    /// A key was deleted (or its lease expired).
    Delete {
        /// Key.
        key: String,
        /// Revision of the deletion.
        mod_revision: i64,
    },
}

/// A live watch: batches of events in revision order. The channel closes when the
/// watch breaks; the error tells why.
pub type WatchReceiver = mpsc::Receiver<Result<Vec<WatchEvent>, StoreError>>;

/// Store failures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached (or timed out); the caller may retry later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A watch asked for a revision that was compacted away.
    #[error("revision {0} was compacted")]
    Compacted(i64),
    /// The lease used by a write no longer exists.
    #[error("lease not found")]
    LeaseNotFound,
    /// Anything else the store reported.
    #[error("store error: {0}")]
    Other(String),
}

/// Key-value store with CAS transactions (etcd, or the in-memory equivalent).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Reads one key.
    async fn get(&self, key: &str) -> Result<Option<Kv>, StoreError>;
    /// Reads every key under `prefix`, with the store revision of the read.
    async fn list(&self, prefix: &str) -> Result<(Vec<Kv>, i64), StoreError>;
    /// [`Self::list`] handed over page by page as the pages arrive (every page read at
    /// the same revision, which is returned), so a caller can work on one page while
    /// the next is read. Default: the whole listing as one page. A page handed over
    /// before an error is a part of a consistent snapshot, never the whole of it.
    async fn list_each(
        &self,
        prefix: &str,
        page: &mut (dyn FnMut(Vec<Kv>) + Send),
    ) -> Result<i64, StoreError> {
        let (kvs, revision) = self.list(prefix).await?;
        page(kvs);
        Ok(revision)
    }
    /// Reads at most `limit` keys under `prefix` that sort after `after` (a full key;
    /// `None`: from the start), in key order, and whether more keys follow them. A page
    /// costs one bounded read. No default: a decorator that forgot to forward it would
    /// silently turn every page into a read of the whole prefix.
    async fn list_after(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Kv>, bool), StoreError>;
    /// Runs one atomic transaction.
    async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError>;
    /// Grants a lease of `ttl_seconds`; returns its id.
    async fn grant_lease(&self, ttl_seconds: i64) -> Result<i64, StoreError>;
    /// Refreshes a lease once; returns its remaining TTL in seconds (0 or less: the
    /// lease is gone).
    async fn keep_alive(&self, lease: i64) -> Result<i64, StoreError>;
    /// Revokes a lease, deleting every key attached to it.
    async fn revoke_lease(&self, lease: i64) -> Result<(), StoreError>;
    /// Watches `prefix` from `start_revision` (inclusive).
    async fn watch(&self, prefix: &str, start_revision: i64) -> Result<WatchReceiver, StoreError>;
    /// Cheap liveness check of the store.
    async fn health(&self) -> Result<(), StoreError>;
    /// Adapter name for logs and metrics.
    fn name(&self) -> &'static str;
}

/// At most `limit` of `kvs` (in key order) whose keys sort after `after`, and whether
/// more follow them.
pub fn first_after(
    kvs: impl IntoIterator<Item = Kv>,
    after: Option<&str>,
    limit: usize,
) -> (Vec<Kv>, bool) {
    let mut page: Vec<Kv> = kvs
        .into_iter()
        .filter(|kv| after.is_none_or(|a| kv.key.as_str() > a))
        .take(limit.saturating_add(1))
        .collect();
    let more = page.len() > limit;
    page.truncate(limit);
    (page, more)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kvs(keys: &[&str]) -> Vec<Kv> {
        keys.iter()
            .map(|k| Kv {
                key: (*k).to_owned(),
                value: Vec::new(),
                mod_revision: 1,
                create_revision: 1,
            })
            .collect()
    }

    fn keys(page: (Vec<Kv>, bool)) -> (Vec<String>, bool) {
        (page.0.into_iter().map(|kv| kv.key).collect(), page.1)
    }

    #[test]
    fn first_after_starts_past_the_key_and_says_whether_more_follow() {
        let all = || kvs(&["/a/1", "/a/2", "/a/3"]);
        let owned = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            keys(first_after(all(), None, 2)),
            (owned(&["/a/1", "/a/2"]), true)
        );
        assert_eq!(
            keys(first_after(all(), None, 3)),
            (owned(&["/a/1", "/a/2", "/a/3"]), false)
        );
        assert_eq!(
            keys(first_after(all(), Some("/a/1"), 5)),
            (owned(&["/a/2", "/a/3"]), false)
        );
        assert_eq!(
            keys(first_after(all(), Some("/a/1x"), 1)),
            (owned(&["/a/2"]), true)
        );
        assert_eq!(keys(first_after(all(), Some("/a/3"), 1)), (vec![], false));
        assert_eq!(keys(first_after(all(), None, 0)), (vec![], true));
    }
}
