//! In-memory `Store` with etcd's semantics: a global revision, per-key `mod_revision`
//! and `create_revision`, atomic guarded transactions, TTL leases and prefix watches
//! that replay from a revision. The embedded default, and a fast twin of etcd in tests.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::ports::store::{
    first_after, Compare, Kv, Op, Store, StoreError, Txn, TxnResult, WatchEvent, WatchReceiver,
};

/// How many events are kept so a watch can start from an older revision.
const HISTORY: usize = 100_000;

#[derive(Debug, Clone)]
struct Entry {
    value: Vec<u8>,
    mod_revision: i64,
    create_revision: i64,
    lease: Option<i64>,
}

type WatchSender = mpsc::Sender<Result<Vec<WatchEvent>, StoreError>>;

#[derive(Default)]
struct Inner {
    data: BTreeMap<String, Entry>,
    revision: i64,
    leases: HashMap<i64, Instant>,
    lease_ttls: HashMap<i64, Duration>,
    next_lease: i64,
    history: VecDeque<(i64, WatchEvent)>,
    watchers: Vec<(String, WatchSender)>,
}

/// The in-memory store.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    unavailable: AtomicBool,
}

impl MemoryStore {
    /// An empty store at revision 1.
    pub fn new() -> Self {
        let store = Self::default();
        if let Ok(mut inner) = store.inner.lock() {
            inner.revision = 1;
        }
        store
    }

    /// Simulates an outage: while set, every call fails with `Unavailable` and open
    /// watches are broken.
    pub fn set_unavailable(&self, down: bool) {
        self.unavailable.store(down, Ordering::SeqCst);
        if down {
            if let Ok(mut inner) = self.inner.lock() {
                for (_, tx) in inner.watchers.drain(..) {
                    let _ = tx.try_send(Err(StoreError::Unavailable("store is down".into())));
                }
            }
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>, StoreError> {
        if self.unavailable.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("store is down".into()));
        }
        let mut inner = self
            .inner
            .lock()
            .map_err(|_| StoreError::Other("memory store lock poisoned".into()))?;
        inner.expire_leases();
        Ok(inner)
    }
}

impl Inner {
    fn kv(key: &str, e: &Entry) -> Kv {
        Kv {
            key: key.to_owned(),
            value: e.value.clone(),
            mod_revision: e.mod_revision,
            create_revision: e.create_revision,
        }
    }

    fn expire_leases(&mut self) {
        let now = Instant::now();
        let expired: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(id, _)| *id)
            .collect();
        if expired.is_empty() {
            return;
        }
        let keys: Vec<String> = self
            .data
            .iter()
            .filter(|(_, e)| e.lease.is_some_and(|l| expired.contains(&l)))
            .map(|(k, _)| k.clone())
            .collect();
        for id in expired {
            self.leases.remove(&id);
            self.lease_ttls.remove(&id);
        }
        if keys.is_empty() {
            return;
        }
        self.revision += 1;
        let rev = self.revision;
        let events = keys
            .into_iter()
            .map(|key| {
                self.data.remove(&key);
                WatchEvent::Delete {
                    key,
                    mod_revision: rev,
                }
            })
            .collect();
        self.publish(rev, events);
    }

    fn holds(&self, c: &Compare) -> bool {
        match c {
            Compare::ModRevision(k, rev) => {
                self.data.get(k).map(|e| e.mod_revision).unwrap_or(0) == *rev
            }
            Compare::CreateRevision(k, rev) => {
                self.data.get(k).map(|e| e.create_revision).unwrap_or(0) == *rev
            }
        }
    }

    fn publish(&mut self, rev: i64, events: Vec<WatchEvent>) {
        for ev in &events {
            self.history.push_back((rev, ev.clone()));
        }
        while self.history.len() > HISTORY {
            self.history.pop_front();
        }
        self.watchers.retain(|(prefix, tx)| {
            let batch: Vec<WatchEvent> = events
                .iter()
                .filter(|e| event_key(e).starts_with(prefix.as_str()))
                .cloned()
                .collect();
            if batch.is_empty() {
                return !tx.is_closed();
            }
            tx.try_send(Ok(batch)).is_ok()
        });
    }
}

fn event_key(e: &WatchEvent) -> &str {
    match e {
        WatchEvent::Put(kv) => &kv.key,
        WatchEvent::Delete { key, .. } => key,
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn get(&self, key: &str) -> Result<Option<Kv>, StoreError> {
        let inner = self.lock()?;
        Ok(inner.data.get(key).map(|e| Inner::kv(key, e)))
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<Kv>, i64), StoreError> {
        let inner = self.lock()?;
        let kvs = inner
            .data
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, e)| Inner::kv(k, e))
            .collect();
        Ok((kvs, inner.revision))
    }

    async fn list_after(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Kv>, bool), StoreError> {
        let inner = self.lock()?;
        let start = match after {
            Some(a) if a >= prefix => Bound::Excluded(a.to_owned()),
            _ => Bound::Included(prefix.to_owned()),
        };
        let kvs = inner
            .data
            .range((start, Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, e)| Inner::kv(k, e));
        Ok(first_after(kvs, after, limit))
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError> {
        let mut inner = self.lock()?;
        if !txn.compares.iter().all(|c| inner.holds(c)) {
            let fetched = txn
                .failure_gets
                .iter()
                .map(|k| inner.data.get(k).map(|e| Inner::kv(k, e)))
                .collect();
            return Ok(TxnResult {
                succeeded: false,
                revision: inner.revision,
                fetched,
            });
        }
        for op in &txn.success {
            if let Op::Put {
                lease: Some(id), ..
            } = op
            {
                if !inner.leases.contains_key(id) {
                    return Err(StoreError::LeaseNotFound);
                }
            }
        }
        if txn.success.is_empty() {
            return Ok(TxnResult {
                succeeded: true,
                revision: inner.revision,
                fetched: Vec::new(),
            });
        }
        inner.revision += 1;
        let rev = inner.revision;
        let mut events = Vec::with_capacity(txn.success.len());
        for op in txn.success {
            match op {
                Op::Put { key, value, lease } => {
                    let create_revision = inner
                        .data
                        .get(&key)
                        .map(|e| e.create_revision)
                        .unwrap_or(rev);
                    let entry = Entry {
                        value,
                        mod_revision: rev,
                        create_revision,
                        lease,
                    };
                    events.push(WatchEvent::Put(Inner::kv(&key, &entry)));
                    inner.data.insert(key, entry);
                }
                Op::Delete { key } => {
                    if inner.data.remove(&key).is_some() {
                        events.push(WatchEvent::Delete {
                            key,
                            mod_revision: rev,
                        });
                    }
                }
            }
        }
        inner.publish(rev, events);
        Ok(TxnResult {
            succeeded: true,
            revision: rev,
            fetched: Vec::new(),
        })
    }

    async fn grant_lease(&self, ttl_seconds: i64) -> Result<i64, StoreError> {
        let mut inner = self.lock()?;
        inner.next_lease += 1;
        let id = inner.next_lease;
        let ttl = Duration::from_secs(u64::try_from(ttl_seconds.max(1)).unwrap_or(1));
        inner.leases.insert(id, Instant::now() + ttl);
        inner.lease_ttls.insert(id, ttl);
        Ok(id)
    }

    async fn keep_alive(&self, lease: i64) -> Result<i64, StoreError> {
        let mut inner = self.lock()?;
        let Some(ttl) = inner.lease_ttls.get(&lease).copied() else {
            return Ok(0);
        };
        inner.leases.insert(lease, Instant::now() + ttl);
        Ok(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX))
    }

    async fn revoke_lease(&self, lease: i64) -> Result<(), StoreError> {
        let mut inner = self.lock()?;
        if let Some(at) = inner.leases.get_mut(&lease) {
            // Expire it now; the sweep deletes its keys with events.
            *at = Instant::now();
            inner.expire_leases();
        }
        Ok(())
    }

    async fn watch(&self, prefix: &str, start_revision: i64) -> Result<WatchReceiver, StoreError> {
        let mut inner = self.lock()?;
        let oldest = inner
            .history
            .front()
            .map(|(r, _)| *r)
            .unwrap_or(inner.revision + 1);
        if start_revision < oldest && start_revision <= inner.revision && !inner.history.is_empty()
        {
            return Err(StoreError::Compacted(start_revision));
        }
        let (tx, rx) = mpsc::channel(65_536);
        let backlog: Vec<WatchEvent> = inner
            .history
            .iter()
            .filter(|(r, e)| *r >= start_revision && event_key(e).starts_with(prefix))
            .map(|(_, e)| e.clone())
            .collect();
        if !backlog.is_empty() {
            let _ = tx.try_send(Ok(backlog));
        }
        inner.watchers.push((prefix.to_owned(), tx));
        Ok(rx)
    }

    async fn health(&self) -> Result<(), StoreError> {
        self.lock().map(|_| ())
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}
