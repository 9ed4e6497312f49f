//! A read-only, watch-fed copy of the JSON records under one prefix (instances), with
//! an optional index kept equal to it record by record (the scheduler's pending queue).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use dashmap::DashMap;
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tracing::warn;

use crate::actors::follow::{Follower, Loader};
use crate::keys;
use crate::ports::store::{Kv, WatchEvent};

/// Something derived from a mirror's records, updated one record at a time.
pub trait MirrorIndex<T>: Send + Sync {
    /// Makes the index agree with record `id` as `read` returns it now (`None`:
    /// absent). Implementations call `read` while holding their own lock, so the last of
    /// two concurrent resyncs of a record leaves the index equal to the mirror.
    fn resync(&self, id: &str, read: &dyn Fn() -> Option<T>);
}

/// Records by id with their `mod_revision`.
pub struct Mirror<T> {
    prefix: &'static str,
    items: DashMap<String, (T, i64)>,
    loaded: AtomicBool,
    changed: Arc<Notify>,
    index: OnceLock<Arc<dyn MirrorIndex<T>>>,
}

impl<T: DeserializeOwned + Clone + Send + Sync + 'static> Mirror<T> {
    /// An empty mirror of `prefix`.
    pub fn new(prefix: &'static str) -> Self {
        Self {
            prefix,
            items: DashMap::new(),
            loaded: AtomicBool::new(false),
            changed: Arc::new(Notify::new()),
            index: OnceLock::new(),
        }
    }

    /// Installs the index kept equal to this mirror (once; a second one is ignored) and
    /// fills it with the records already here.
    pub fn set_index(&self, index: Arc<dyn MirrorIndex<T>>) {
        if self.index.set(index).is_err() {
            return;
        }
        let ids: Vec<String> = self.items.iter().map(|e| e.key().clone()).collect();
        for id in ids {
            self.resync(&id);
        }
    }

    fn resync(&self, id: &str) {
        if let Some(ix) = self.index.get() {
            ix.resync(id, &|| self.items.get(id).map(|e| e.value().0.clone()));
        }
    }

    /// One record.
    pub fn get(&self, id: &str) -> Option<(T, i64)> {
        self.items.get(id).map(|e| e.value().clone())
    }

    /// Every record.
    pub fn all(&self) -> Vec<(T, i64)> {
        self.items.iter().map(|e| e.value().clone()).collect()
    }

    /// At most `limit` records kept by `keep` whose ids sort after `after`, in id
    /// order, and whether more follow. Walks every record (the mirror is unordered);
    /// clones only the page.
    pub fn page(
        &self,
        after: Option<&str>,
        limit: usize,
        keep: impl Fn(&T) -> bool,
    ) -> (Vec<(String, T)>, bool) {
        let mut ids: Vec<String> = self
            .items
            .iter()
            .filter(|e| after.is_none_or(|a| e.key().as_str() > a) && keep(&e.value().0))
            .map(|e| e.key().clone())
            .collect();
        ids.sort_unstable();
        let more = ids.len() > limit;
        ids.truncate(limit);
        let page = ids
            .into_iter()
            .filter_map(|id| {
                let v = self.items.get(&id).map(|e| e.value().0.clone())?;
                Some((id, v))
            })
            .collect();
        (page, more)
    }

    /// The records `keep` selects (only those are copied).
    pub fn select(&self, keep: impl Fn(&T) -> bool) -> Vec<(T, i64)> {
        self.items
            .iter()
            .filter(|e| keep(&e.value().0))
            .map(|e| e.value().clone())
            .collect()
    }

    /// Notified after every change (one permit is kept if nobody waits).
    pub fn changes(&self) -> Arc<Notify> {
        self.changed.clone()
    }

    /// Whether the first listing was loaded.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::SeqCst)
    }

    /// Records a value this replica just wrote (the watch will confirm it).
    pub fn note(&self, id: &str, value: T, revision: i64) {
        {
            let mut entry = self
                .items
                .entry(id.to_owned())
                .or_insert((value.clone(), revision));
            if entry.1 <= revision {
                *entry = (value, revision);
            }
        }
        self.resync(id);
    }

    fn put(&self, kv: &Kv) {
        if let Some(id) = keys::child(self.prefix, &kv.key) {
            match serde_json::from_slice::<T>(&kv.value) {
                Ok(v) => self.note(id, v, kv.mod_revision),
                Err(e) => warn!(key = %kv.key, error = %e, "skipping undecodable record"),
            }
        }
        // After the record (and its index) changed: a waiter woken now sees it.
        self.changed.notify_one();
    }
}

impl<T: DeserializeOwned + Clone + Send + Sync + 'static> Mirror<T> {
    /// One page of a listing: each record in; notes its id.
    fn take_page(&self, kvs: &[Kv], ids: &mut HashSet<String>) {
        for kv in kvs {
            if let Some(id) = keys::child(self.prefix, &kv.key) {
                ids.insert(id.to_owned());
            }
            self.put(kv);
        }
    }

    /// The listing is complete: what it did not have is gone.
    fn finish_listing(&self, ids: &HashSet<String>) {
        let gone: Vec<String> = self
            .items
            .iter()
            .filter(|e| !ids.contains(e.key()))
            .map(|e| e.key().clone())
            .collect();
        for id in gone {
            self.items.remove(&id);
            self.resync(&id);
        }
        self.loaded.store(true, Ordering::SeqCst);
    }
}

/// A listing taken in page by page.
struct Taking<T: DeserializeOwned + Clone + Send + Sync + 'static> {
    mirror: Arc<Mirror<T>>,
    ids: HashSet<String>,
}

impl<T: DeserializeOwned + Clone + Send + Sync + 'static> Loader for Taking<T> {
    fn page(&mut self, kvs: Vec<Kv>) {
        self.mirror.take_page(&kvs, &mut self.ids);
    }
    fn finish(self: Box<Self>, _revision: i64) {
        self.mirror.finish_listing(&self.ids);
    }
}

impl<T: DeserializeOwned + Clone + Send + Sync + 'static> Follower for Mirror<T> {
    fn prefix(&self) -> &'static str {
        self.prefix
    }

    fn load(&self, kvs: Vec<Kv>, _revision: i64) {
        let mut ids = HashSet::with_capacity(kvs.len());
        self.take_page(&kvs, &mut ids);
        self.finish_listing(&ids);
    }

    fn loader(self: Arc<Self>) -> Box<dyn Loader> {
        Box::new(Taking {
            mirror: self,
            ids: HashSet::new(),
        })
    }

    fn apply(&self, ev: WatchEvent) {
        match ev {
            WatchEvent::Put(kv) => self.put(&kv),
            WatchEvent::Delete { key, .. } => {
                if let Some(id) = keys::child(self.prefix, &key) {
                    self.items.remove(id);
                    self.resync(id);
                }
            }
        }
    }
}
