//! The read side of the shadow deployables: every published record with its answer JSON
//! already serialized (made once per change by the actor that made the change, never per
//! read), ordered by name within each environment, with the `in_use` and `node_pool`
//! filters kept as indexes. A list page is a range walk of one ordered set followed by a
//! concatenation of ready-made JSON, so its cost follows the page, not the population.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::Bound;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::actors::shadow::ShadowKey;
use crate::domain::shadow::{Owner, ShadowDeployable, ShadowState};

/// The last persisted state an actor knows, as published for reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewEntry {
    /// The record.
    pub record: ShadowDeployable,
    /// Its `mod_revision`.
    pub mod_revision: i64,
    /// The record as one list entry answers it (see [`listed_json`]).
    pub json: Arc<str>,
}

impl ViewEntry {
    /// An entry, serializing the record's list JSON once.
    pub fn new(record: ShadowDeployable, mod_revision: i64) -> Self {
        let json = listed_json(&record);
        Self {
            record,
            mod_revision,
            json,
        }
    }
}

/// One shadow deployable as a list answers it; field order is the answer's.
#[derive(Serialize)]
struct Listed<'a> {
    name: &'a str,
    dns: &'a str,
    min_pod_count: u32,
    // Deprecated alias of `min_pod_count`, answered for one more release.
    pod_count: u32,
    in_use: bool,
    node_pool: &'a str,
    state: ShadowState,
    owner: Option<&'a Owner>,
    version: u64,
    #[serde(with = "crate::domain::time::option")]
    lease_expires_at: Option<DateTime<Utc>>,
    deployment: &'a str,
    hpa: &'a str,
}

/// The list JSON of `record` (an object; never fails for a valid record).
pub fn listed_json(r: &ShadowDeployable) -> Arc<str> {
    let listed = Listed {
        name: &r.name,
        dns: &r.dns,
        min_pod_count: r.min_pod_count,
        pod_count: r.min_pod_count,
        in_use: r.in_use(),
        node_pool: &r.node_pool,
        state: r.state,
        owner: r.owner.as_ref(),
        version: r.version,
        lease_expires_at: r.lease_expires_at,
        deployment: r.deployment_name(),
        hpa: r.hpa_name(),
    };
    // Serializing plain strings, numbers and a timestamp cannot fail; an empty object
    // keeps the answer valid JSON if it ever did.
    serde_json::to_string(&listed)
        .map(Arc::from)
        .unwrap_or_else(|_| Arc::from("{}"))
}

/// Which entries a list wants.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Filter<'a> {
    /// Only held (`true`) or only free (`false`) ones.
    pub in_use: Option<bool>,
    /// Only those of this node pool.
    pub node_pool: Option<&'a str>,
}

/// One page of a list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// The entries' JSON, in name order.
    pub items: Vec<Arc<str>>,
    /// The last name served when more entries follow (the next page starts after it).
    pub more_after: Option<String>,
}

/// Free and held names of one group (an environment, or one pool of it).
#[derive(Debug, Default)]
struct Split {
    free: BTreeSet<String>,
    held: BTreeSet<String>,
}

impl Split {
    fn side(&mut self, in_use: bool) -> &mut BTreeSet<String> {
        if in_use {
            &mut self.held
        } else {
            &mut self.free
        }
    }

    fn is_empty(&self) -> bool {
        self.free.is_empty() && self.held.is_empty()
    }
}

#[derive(Debug, Default)]
struct EnvView {
    entries: BTreeMap<String, ViewEntry>,
    all: Split,
    pools: HashMap<String, Split>,
    /// Names whose mapped Deployment/HPA or `min_pod_count` changed (or that appeared)
    /// since the min-replica converger last took them.
    scale_changed: HashSet<String>,
}

impl EnvView {
    fn unindex(&mut self, name: &str, e: &ViewEntry) {
        let in_use = e.record.in_use();
        self.all.side(in_use).remove(name);
        if let Some(p) = self.pools.get_mut(&e.record.node_pool) {
            p.side(in_use).remove(name);
            if p.is_empty() {
                self.pools.remove(&e.record.node_pool);
            }
        }
    }

    fn index(&mut self, name: &str, e: &ViewEntry) {
        let in_use = e.record.in_use();
        self.all.side(in_use).insert(name.to_owned());
        self.pools
            .entry(e.record.node_pool.clone())
            .or_default()
            .side(in_use)
            .insert(name.to_owned());
    }

    fn remove(&mut self, name: &str) -> Option<ViewEntry> {
        let old = self.entries.remove(name)?;
        self.unindex(name, &old);
        Some(old)
    }
}

/// Read-side view shared by all actors of a registry (lists are served from it).
#[derive(Debug, Default)]
pub struct View {
    envs: RwLock<HashMap<String, EnvView>>,
}

/// Names in `set` after `after`, in order.
fn range_after<'a>(
    set: &'a BTreeSet<String>,
    after: Option<&str>,
) -> std::collections::btree_set::Range<'a, String> {
    match after {
        Some(a) => set.range::<str, _>((Bound::Excluded(a), Bound::Unbounded)),
        None => set.range::<str, _>(..),
    }
}

/// The ordered union of two ordered, disjoint name sequences.
fn merge<'a>(
    a: impl Iterator<Item = &'a String>,
    b: impl Iterator<Item = &'a String>,
) -> impl Iterator<Item = &'a String> {
    let mut a = a.peekable();
    let mut b = b.peekable();
    std::iter::from_fn(move || match (a.peek(), b.peek()) {
        (Some(x), Some(y)) if y < x => b.next(),
        (Some(_), _) => a.next(),
        (None, _) => b.next(),
    })
}

impl View {
    /// An empty view.
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> RwLockReadGuard<'_, HashMap<String, EnvView>> {
        // A panic while holding the lock leaves consistent maps (each change is applied
        // whole before anything can panic), so a poisoned lock is still usable.
        self.envs.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<String, EnvView>> {
        self.envs.write().unwrap_or_else(|e| e.into_inner())
    }

    /// One entry.
    pub fn get(&self, key: &ShadowKey) -> Option<ViewEntry> {
        self.read()
            .get(&key.env)
            .and_then(|e| e.entries.get(&key.name))
            .cloned()
    }

    /// `f` of one entry, under the read lock (no clone of the entry).
    pub fn with<T>(&self, key: &ShadowKey, f: impl FnOnce(&ViewEntry) -> T) -> Option<T> {
        self.read()
            .get(&key.env)
            .and_then(|e| e.entries.get(&key.name))
            .map(f)
    }

    /// Whether `key` is published.
    pub fn contains_key(&self, key: &ShadowKey) -> bool {
        self.read()
            .get(&key.env)
            .is_some_and(|e| e.entries.contains_key(&key.name))
    }

    /// Whether `key`'s entry is at `mod_revision` or later (nothing older than it
    /// would be published, see [`Self::insert`]).
    pub fn is_current(&self, key: &ShadowKey, mod_revision: i64) -> bool {
        self.with(key, |e| e.mod_revision >= mod_revision)
            .unwrap_or(false)
    }

    /// Publishes `entry` under `key`, replacing (and re-indexing) what was there, unless
    /// that is at the same or a later revision: whoever publishes (the actor after its
    /// write, the watch for a record no actor serves), the view only moves forward. A
    /// new entry, or one whose scale target or count changed, is noted for
    /// [`Self::take_scale_changes`].
    pub fn insert(&self, key: &ShadowKey, entry: ViewEntry) {
        let mut envs = self.write();
        let env = match envs.get_mut(&key.env) {
            Some(env) => env,
            None => envs.entry(key.env.clone()).or_default(),
        };
        let current = env.entries.get(&key.name);
        if current.is_some_and(|e| e.mod_revision >= entry.mod_revision) {
            return;
        }
        let (new, old) = (&entry.record, current.map(|e| &e.record));
        let scale_changed = old.is_none_or(|o| {
            o.min_pod_count != new.min_pod_count
                || o.deployment_name() != new.deployment_name()
                || o.hpa_name() != new.hpa_name()
        });
        // Re-indexed only when the indexed fields change (most changes do not move it).
        let moved = old.is_none_or(|o| o.in_use() != new.in_use() || o.node_pool != new.node_pool);
        if scale_changed && !env.scale_changed.contains(&key.name) {
            env.scale_changed.insert(key.name.clone());
        }
        if moved {
            env.remove(&key.name);
            env.index(&key.name, &entry);
            env.entries.insert(key.name.clone(), entry);
        } else if let Some(slot) = env.entries.get_mut(&key.name) {
            *slot = entry;
        }
    }

    /// The keys noted by [`Self::insert`] since the last call (each once, no order),
    /// forgetting them: what the min-replica converger must look at besides its own
    /// retries, without walking the whole view.
    pub fn take_scale_changes(&self) -> Vec<ShadowKey> {
        let mut envs = self.write();
        let mut out = Vec::new();
        for (env, v) in envs.iter_mut() {
            out.extend(
                v.scale_changed
                    .drain()
                    .map(|name| ShadowKey::new(env, &name)),
            );
        }
        out
    }

    /// Unpublishes `key`.
    pub fn remove(&self, key: &ShadowKey) {
        if let Some(env) = self.write().get_mut(&key.env) {
            env.remove(&key.name);
        }
    }

    /// Unpublishes `key` if its entry is older than `revision`.
    pub fn remove_older(&self, key: &ShadowKey, revision: i64) {
        let mut envs = self.write();
        let Some(env) = envs.get_mut(&key.env) else {
            return;
        };
        if env
            .entries
            .get(&key.name)
            .is_some_and(|e| e.mod_revision < revision)
        {
            env.remove(&key.name);
        }
    }

    /// Calls `f` on every entry (no order), under the read lock: `f` must be quick.
    pub fn for_each(&self, mut f: impl FnMut(&ShadowKey, &ViewEntry)) {
        for (env, v) in self.read().iter() {
            for (name, e) in &v.entries {
                f(&ShadowKey::new(env, name), e);
            }
        }
    }

    /// Calls `f` on at most `limit` entries after `after`, in (environment, name) order,
    /// under the read lock; the last key visited when more may follow (the next call's
    /// `after`), `None` at the end. A walk over a large fleet in pieces, so neither the
    /// caller's thread nor the writers waiting for the lock stall for the whole of it.
    pub fn for_each_after(
        &self,
        after: Option<&ShadowKey>,
        limit: usize,
        mut f: impl FnMut(&ShadowKey, &ViewEntry),
    ) -> Option<ShadowKey> {
        let envs = self.read();
        let mut names: Vec<&String> = envs.keys().collect();
        names.sort();
        let mut left = limit.max(1);
        let mut last: Option<ShadowKey> = None;
        for env in names {
            let from = match after {
                Some(a) if a.env.as_str() > env.as_str() => continue,
                Some(a) if a.env == *env => Bound::Excluded(a.name.as_str()),
                _ => Bound::Unbounded,
            };
            let Some(v) = envs.get(env) else { continue };
            for (name, e) in v.entries.range::<str, _>((from, Bound::Unbounded)) {
                if left == 0 {
                    return last;
                }
                let key = ShadowKey::new(env, name);
                f(&key, e);
                last = Some(key);
                left -= 1;
            }
        }
        None
    }

    /// Published entries of `env` in name order (clones: for tests and small tools).
    pub fn entries(&self, env: &str) -> Vec<ViewEntry> {
        self.read()
            .get(env)
            .map(|e| e.entries.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Names of `env`'s FREE deployables in `pool`, in name order; `None` when the pool
    /// has no deployable at all (free or held).
    pub fn free_in_pool(&self, env: &str, pool: &str) -> Option<Vec<String>> {
        self.read()
            .get(env)
            .and_then(|e| e.pools.get(pool))
            .map(|p| p.free.iter().cloned().collect())
    }

    /// At most `limit` entries of `env` matching `filter`, starting after the name
    /// `after`, read from the index that fits the filter.
    pub fn page(&self, env: &str, filter: Filter<'_>, after: Option<&str>, limit: usize) -> Page {
        let envs = self.read();
        let Some(v) = envs.get(env) else {
            return Page {
                items: Vec::new(),
                more_after: None,
            };
        };
        let empty = Split::default();
        let split = match filter.node_pool {
            Some(p) => v.pools.get(p).unwrap_or(&empty),
            None => &v.all,
        };
        let mut items = Vec::with_capacity(limit.min(1024));
        let mut last: Option<&String> = None;
        let mut more = false;
        let mut take = |e: &ViewEntry| -> bool {
            if items.len() == limit {
                more = true;
                return false;
            }
            items.push(e.json.clone());
            true
        };
        match (filter.in_use, filter.node_pool) {
            // No filter: walk the entries themselves (no second lookup per name).
            (None, None) => {
                let entries: Box<dyn Iterator<Item = (&String, &ViewEntry)>> = match after {
                    Some(a) => Box::new(
                        v.entries
                            .range::<str, _>((Bound::Excluded(a), Bound::Unbounded)),
                    ),
                    None => Box::new(v.entries.iter()),
                };
                for (name, e) in entries {
                    if !take(e) {
                        break;
                    }
                    last = Some(name);
                }
            }
            (in_use, _) => {
                let names: Box<dyn Iterator<Item = &String>> = match in_use {
                    Some(true) => Box::new(range_after(&split.held, after)),
                    Some(false) => Box::new(range_after(&split.free, after)),
                    None => Box::new(merge(
                        range_after(&split.free, after),
                        range_after(&split.held, after),
                    )),
                };
                for name in names {
                    if let Some(e) = v.entries.get(name) {
                        if !take(e) {
                            break;
                        }
                        last = Some(name);
                    }
                }
            }
        }
        Page {
            items,
            more_after: if more { last.cloned() } else { None },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::shadow::{decide, Change, Context, ShadowCommand};

    fn record(name: &str, pool: &str) -> ShadowDeployable {
        let d = decide(
            None,
            &ShadowCommand::Register {
                name: name.into(),
                node_pool: pool.into(),
                dns: format!("{name}.example"),
                deployment: None,
                hpa: Some("h".into()),
            },
            ctx(),
        );
        match d.map(|d| d.change) {
            Ok(Change::Put(r)) => r,
            other => panic!("register: {other:?}"),
        }
    }

    fn ctx() -> Context {
        Context {
            now: crate::clock::utc_now(),
            retry_delay: 300,
        }
    }

    fn expected(r: &ShadowDeployable) -> serde_json::Value {
        serde_json::json!({
            "name": r.name,
            "dns": r.dns,
            "min_pod_count": r.min_pod_count,
            "pod_count": r.min_pod_count,
            "in_use": r.state == ShadowState::Procured,
            "node_pool": r.node_pool,
            "state": r.state,
            "owner": r.owner,
            "version": r.version,
            "lease_expires_at": r.lease_expires_at.map(|t| crate::domain::time::format(&t)),
            "deployment": r.name,
            "hpa": "h",
        })
    }

    fn parsed(e: &ViewEntry) -> serde_json::Value {
        serde_json::from_str(&e.json).unwrap_or_default()
    }

    #[test]
    fn a_paged_walk_visits_every_entry_once_in_order_across_environments() {
        let view = View::new();
        let mut want = Vec::new();
        for env in ["prd", "int", "stg"] {
            for i in 0..7 {
                let name = format!("d{i}");
                view.insert(
                    &ShadowKey::new(env, &name),
                    ViewEntry::new(record(&name, "p"), 2),
                );
                want.push(ShadowKey::new(env, &name));
            }
        }
        want.sort_by(|a, b| (&a.env, &a.name).cmp(&(&b.env, &b.name)));
        for limit in [1, 3, 7, 20, 21, 100] {
            let (mut seen, mut after, mut pages) = (Vec::new(), None::<ShadowKey>, 0);
            loop {
                let mut page = 0;
                let next = view.for_each_after(after.as_ref(), limit, |k, e| {
                    assert_eq!(e.record.name, k.name);
                    seen.push(k.clone());
                    page += 1;
                });
                assert!(page <= limit, "a page holds at most {limit}");
                pages += 1;
                assert!(pages <= 21, "the walk ends");
                match next {
                    Some(k) => after = Some(k),
                    None => break,
                }
            }
            assert_eq!(seen, want, "limit {limit}");
        }
        assert_eq!(
            view.for_each_after(None, 0, |_, _| {}),
            Some(ShadowKey::new("int", "d0")),
            "a zero limit still moves on"
        );
    }

    #[test]
    fn an_older_revision_never_replaces_a_newer_entry() {
        let view = View::new();
        let key = ShadowKey::new("int", "d1");
        let (old, new) = (record("d1", "p"), record("d1", "q"));
        view.insert(&key, ViewEntry::new(new.clone(), 7));
        view.insert(&key, ViewEntry::new(old.clone(), 5));
        view.insert(&key, ViewEntry::new(old, 7));
        let e = view.get(&key).unwrap_or_else(|| panic!("published"));
        assert_eq!((e.mod_revision, e.record), (7, new));
        assert!(view.is_current(&key, 7) && view.is_current(&key, 6));
        assert!(!view.is_current(&key, 8) && !view.is_current(&ShadowKey::new("int", "x"), 1));
        assert_eq!(
            view.free_in_pool("int", "p"),
            None,
            "the older pool is not indexed"
        );
    }

    #[test]
    fn the_serialized_entry_is_the_record_as_listed_and_follows_a_change() {
        let free = record("d1", "p");
        let view = View::new();
        let key = ShadowKey::new("int", "d1");
        view.insert(&key, ViewEntry::new(free.clone(), 3));
        let e = view.get(&key).unwrap_or_else(|| panic!("published"));
        assert_eq!(parsed(&e), expected(&free));

        let held = match decide(
            Some(&free),
            &ShadowCommand::Procure {
                run_id: "r1".into(),
                plan: Some("plan".into()),
                lease_seconds: Some(60),
            },
            ctx(),
        )
        .map(|d| d.change)
        {
            Ok(Change::Put(r)) => r,
            other => panic!("procure: {other:?}"),
        };
        view.insert(&key, ViewEntry::new(held.clone(), 4));
        let e = view.get(&key).unwrap_or_else(|| panic!("published"));
        assert_eq!(parsed(&e), expected(&held));
        assert_ne!(parsed(&e), expected(&free));
        assert_eq!(parsed(&e)["owner"]["workflow_run_id"], "r1");
        assert!(parsed(&e)["lease_expires_at"].is_string());
    }

    #[test]
    fn scale_changes_name_new_entries_and_changed_counts_or_targets_once() {
        let view = View::new();
        let key = ShadowKey::new("int", "d1");
        let mut r = record("d1", "p");
        view.insert(&key, ViewEntry::new(r.clone(), 1));
        view.insert(&ShadowKey::new("prod", "d1"), ViewEntry::new(r.clone(), 1));
        let mut taken = view.take_scale_changes();
        taken.sort_by(|a, b| a.env.cmp(&b.env));
        assert_eq!(taken, [key.clone(), ShadowKey::new("prod", "d1")]);
        assert!(view.take_scale_changes().is_empty(), "taken once");

        // A hold and its release change neither the count nor the target.
        r.state = ShadowState::Procured;
        view.insert(&key, ViewEntry::new(r.clone(), 2));
        r.state = ShadowState::Free;
        view.insert(&key, ViewEntry::new(r.clone(), 3));
        assert!(view.take_scale_changes().is_empty());

        r.min_pod_count += 2;
        view.insert(&key, ViewEntry::new(r.clone(), 4));
        r.min_pod_count += 1;
        view.insert(&key, ViewEntry::new(r.clone(), 5));
        assert_eq!(
            view.take_scale_changes(),
            std::slice::from_ref(&key),
            "once per take"
        );

        r.hpa = Some("other".into());
        view.insert(&key, ViewEntry::new(r.clone(), 6));
        assert_eq!(view.take_scale_changes(), std::slice::from_ref(&key));
        let e = view.get(&key).unwrap_or_else(|| panic!("published"));
        assert_eq!((e.record, e.mod_revision), (r, 6), "the entry is replaced");
    }

    #[test]
    fn indexes_follow_every_change_and_pages_resume_after_the_last_name() {
        let view = View::new();
        for (i, pool) in ["a", "b", "a", "b", "a"].iter().enumerate() {
            let name = format!("d{i}");
            view.insert(
                &ShadowKey::new("int", &name),
                ViewEntry::new(record(&name, pool), 1),
            );
        }
        let names = |p: &Page| -> Vec<String> {
            p.items
                .iter()
                .map(|j| {
                    serde_json::from_str::<serde_json::Value>(j).unwrap_or_default()["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned()
                })
                .collect()
        };
        let a = Filter {
            in_use: None,
            node_pool: Some("a"),
        };
        let p = view.page("int", a, None, 2);
        assert_eq!(names(&p), ["d0", "d2"]);
        assert_eq!(p.more_after.as_deref(), Some("d2"));
        let p = view.page("int", a, Some("d2"), 2);
        assert_eq!((names(&p), p.more_after), (vec!["d4".to_owned()], None));
        assert_eq!(
            view.free_in_pool("int", "a"),
            Some(vec!["d0".into(), "d2".into(), "d4".into()])
        );

        // d2 moves to pool b and is held; d4 is deleted
        let mut moved = record("d2", "b");
        moved.state = ShadowState::Procured;
        view.insert(&ShadowKey::new("int", "d2"), ViewEntry::new(moved, 2));
        view.remove_older(&ShadowKey::new("int", "d4"), 1);
        assert!(view.contains_key(&ShadowKey::new("int", "d4")), "not older");
        view.remove_older(&ShadowKey::new("int", "d4"), 2);
        assert_eq!(view.free_in_pool("int", "a"), Some(vec!["d0".into()]));
        assert_eq!(
            view.free_in_pool("int", "b"),
            Some(vec!["d1".into(), "d3".into()])
        );
        let held = Filter {
            in_use: Some(true),
            node_pool: None,
        };
        assert_eq!(names(&view.page("int", held, None, 10)), ["d2"]);
        let b = Filter {
            in_use: None,
            node_pool: Some("b"),
        };
        assert_eq!(names(&view.page("int", b, None, 10)), ["d1", "d2", "d3"]);
        view.remove(&ShadowKey::new("int", "d0"));
        assert_eq!(
            view.free_in_pool("int", "a"),
            None,
            "an emptied pool is gone"
        );
        assert_eq!(view.page("int", Filter::default(), None, 10).items.len(), 3);
        assert!(view
            .page("other", Filter::default(), None, 10)
            .items
            .is_empty());
    }
}
