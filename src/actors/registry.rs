//! The registry: finds or spawns the actor of a shadow deployable (on the HTTP worker
//! thread whose request started it, else over a few arbiters), hydrates the view at
//! start-up and keeps it fresh from one store watch on the prefix.
//!
//! Supervision: a panic inside `decide` is caught and the actor's `Supervisor` restarts
//! it; any other panic in a handler ends the actor's task and closes its mailbox. The
//! registry never hands out a closed address: a lookup that finds one starts a fresh
//! actor in its place, which reloads the record from the store. Every send has a
//! deadline (`ACTOR_SEND_TIMEOUT_MS`), so a stuck actor costs a 503, not a hung request.
//!
//! Lifetime: actors exist for records that exist. A lookup of an unknown record spawns
//! nothing, and a deleted record's actor is removed (on the watch's delete event, or
//! when a relisting no longer has the record); dropping its last address stops it.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use actix::prelude::*;
use chrono::{DateTime, Utc};
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use rand::Rng;
use tracing::{warn, Span};

use crate::actors::follow::{Follower, Loader};
use crate::actors::shadow::{
    decode, publish, render, replay_if_stored, Cell, Deps, ExecError, Execute, Observe,
    ShadowActor, ShadowKey, REAPED,
};
use crate::actors::stats::{ActorInfo, ActorStats};
use crate::actors::view::{Filter, Page};
use crate::domain::shadow::{ShadowCommand, ShadowDeployable, ShadowOutcome};
use crate::idempotency::{IdemRequest, Reply};
use crate::keys;
use crate::ports::kube::ScaleTarget;
use crate::ports::store::{Compare, Kv, StoreError, WatchEvent};

/// How many candidates one procure by pool tries before answering FAILED: bounds the
/// work of one request when the view lags far behind (many of its FREE ones are held).
pub const MAX_POOL_TRIES: usize = 32;

/// Whether a reply is a FAILED (held by another run) answer.
fn is_failed(reply: &Reply) -> bool {
    serde_json::from_str::<serde_json::Value>(&reply.body).is_ok_and(|v| v["status"] == "FAILED")
}

thread_local! {
    static REQUEST_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks the calling thread (an HTTP worker, an actix arbiter) as one that takes
/// requests: the actors it starts run on it, not on one of the registry's arbiters.
/// Lookups from anywhere else (the leader's reaper, the converger) start them there.
pub fn serve_actors_here() {
    REQUEST_THREAD.with(|r| r.set(true));
}

/// Kind label of shadow deployable actors.
pub const SHADOW_KIND: &str = "shadow-deployable";

/// A live actor.
#[derive(Clone)]
pub struct Handle {
    key: ShadowKey,
    addr: Addr<ShadowActor>,
    stats: Arc<ActorStats>,
}

/// Finds, spawns and feeds shadow deployable actors.
pub struct Registry {
    deps: Arc<Deps>,
    actors: DashMap<ShadowKey, Handle>,
    arbiters: Vec<ArbiterHandle>,
    owned: Mutex<Vec<Arbiter>>,
    next: AtomicUsize,
    hydrated: AtomicBool,
}

impl Registry {
    /// A registry whose actors run on `threads` arbiters. Must be called inside an
    /// actix `System`.
    pub fn new(deps: Arc<Deps>, threads: usize) -> Arc<Self> {
        let owned: Vec<Arbiter> = (0..threads.max(1)).map(|_| Arbiter::new()).collect();
        let arbiters = owned.iter().map(|a| a.handle()).collect();
        Arc::new(Self {
            deps,
            actors: DashMap::new(),
            arbiters,
            owned: Mutex::new(owned),
            next: AtomicUsize::new(0),
            hydrated: AtomicBool::new(false),
        })
    }

    /// Shared dependencies (store, metrics, view).
    pub fn deps(&self) -> &Arc<Deps> {
        &self.deps
    }

    /// Whether the actors were loaded from the store at least once.
    pub fn is_hydrated(&self) -> bool {
        self.hydrated.load(Ordering::SeqCst)
    }

    fn start(&self, key: ShadowKey, cell: Cell, stats: Arc<ActorStats>) -> Addr<ShadowActor> {
        let deps = self.deps.clone();
        if REQUEST_THREAD.with(|r| r.get()) {
            return Supervisor::start(move |_| ShadowActor::new(key, cell, deps, stats));
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.arbiters.len();
        Supervisor::start_in_arbiter(&self.arbiters[i], move |_| {
            ShadowActor::new(key, cell, deps, stats)
        })
    }

    /// The actor of `key`, started when there is none or when the one registered has
    /// died (its mailbox closed): a dead address is never kept. It starts from the newer
    /// of `cell` and the view's entry, read under the registry's lock of `key`, which
    /// [`Self::route`] also takes: no change the watch published can be missed.
    fn spawn(&self, key: ShadowKey, cell: Cell) -> Handle {
        let entry = self.actors.entry(key.clone());
        if let Entry::Occupied(e) = &entry {
            if e.get().addr.connected() {
                return e.get().clone();
            }
        }
        let published = self.deps.view.get(&key).filter(|v| match &cell {
            Cell::Known { mod_revision, .. } => v.mod_revision >= *mod_revision,
            Cell::Unknown => true,
        });
        let cell = match published {
            Some(v) => Cell::Known {
                record: Some(v.record),
                mod_revision: v.mod_revision,
            },
            None => cell,
        };
        match entry {
            Entry::Occupied(mut e) => {
                let stats = e.get().stats.clone();
                stats.replaced();
                warn!(env = %key.env, name = %key.name, "shadow actor died; starting a fresh one");
                let addr = self.start(key.clone(), cell, stats.clone());
                let h = Handle { key, addr, stats };
                e.insert(h.clone());
                h
            }
            Entry::Vacant(e) => {
                let stats = Arc::new(ActorStats::default());
                let addr = self.start(key.clone(), cell, stats.clone());
                self.deps
                    .metrics
                    .actors
                    .with_label_values(&[SHADOW_KIND])
                    .inc();
                e.insert(Handle { key, addr, stats }).clone()
            }
        }
    }

    /// The registered actor of `key` if it is alive.
    fn live(&self, key: &ShadowKey) -> Option<Handle> {
        self.actors
            .get(key)
            .filter(|h| h.addr.connected())
            .map(|h| h.clone())
    }

    fn drop_if_same(&self, handle: &Handle) {
        let removed = self
            .actors
            .remove_if(&handle.key, |_, h| h.addr == handle.addr)
            .is_some();
        if removed {
            self.deps
                .metrics
                .actors
                .with_label_values(&[SHADOW_KIND])
                .dec();
        }
    }

    /// Removes the actor of a record deleted at `revision`, unless the record was
    /// created again since (the view holds a later revision). The actor stops once the
    /// requests still holding its address are answered.
    fn retire(&self, key: &ShadowKey, revision: i64) {
        self.send_observe(key, None, revision);
        let recreated = self
            .deps
            .view
            .get(key)
            .is_some_and(|v| v.mod_revision > revision);
        if !recreated {
            // A dead actor cannot unpublish its record: do it here.
            self.deps.view.remove_older(key, revision);
            self.deps.resync_hold(key);
            if self.actors.remove(key).is_some() {
                self.deps
                    .metrics
                    .actors
                    .with_label_values(&[SHADOW_KIND])
                    .dec();
            }
        }
    }

    /// The actor for `key` if the record exists (read from the store when this replica
    /// has no live actor for it); `None` spawns nothing.
    pub async fn find(&self, key: &ShadowKey) -> Result<Option<Handle>, ExecError> {
        if let Some(h) = self.live(key) {
            return Ok(Some(h));
        }
        if self.deps.view.contains_key(key) {
            // Activated from its published entry (see `spawn`).
            return Ok(Some(self.spawn(key.clone(), Cell::Unknown)));
        }
        let kv = self
            .deps
            .store
            .get(&keys::shadow(&key.env, &key.name))
            .await?;
        let Some(kv) = kv else {
            // A dead actor of a record that is gone has nothing left to serve.
            self.actors.remove_if(key, |_, h| !h.addr.connected());
            return Ok(None);
        };
        let (record, mod_revision) = decode(Some(&kv))?;
        Ok(Some(self.spawn(
            key.clone(),
            Cell::Known {
                record,
                mod_revision,
            },
        )))
    }

    /// The actor for `key`, spawned unloaded if needed (it reads the store first).
    pub fn find_or_spawn(&self, key: &ShadowKey) -> Handle {
        if let Some(h) = self.live(key) {
            return h;
        }
        self.spawn(key.clone(), Cell::Unknown)
    }

    /// Sends a command to an actor and waits for its answer, at most the send deadline.
    pub async fn execute(
        &self,
        handle: &Handle,
        cmd: ShadowCommand,
        idem: Option<IdemRequest>,
    ) -> Result<Reply, ExecError> {
        self.send(handle, cmd, idem, None, false).await
    }

    /// PROCUREs a FREE deployable of `pool` in `env` for `cmd` (a PROCURE): tries the
    /// pool's FREE ones as this replica's view has them, starting at a random one so
    /// replicas and workflows rarely collide, moving to the next when one is lost (held
    /// meanwhile, here or on another replica: its actor decides on the store's record).
    /// The answer is PROCURED with the name, or FAILED with the retry delay when none
    /// could be had (after at most [`MAX_POOL_TRIES`] candidates). A request whose
    /// idempotency key already has a stored reply gets that reply, whichever
    /// deployable it names. `Ok(None)`: the pool has no deployable at all here.
    pub async fn procure_from_pool(
        &self,
        env: &str,
        pool: &str,
        cmd: ShadowCommand,
        idem: Option<IdemRequest>,
    ) -> Result<Option<Reply>, ExecError> {
        let known = self.deps.view.free_in_pool(env, pool);
        if let Some(mut names) = known.clone() {
            if !names.is_empty() {
                let start = rand::thread_rng().gen_range(0..names.len());
                names.rotate_left(start);
            }
            for name in names.iter().take(MAX_POOL_TRIES) {
                let Some(handle) = self.find(&ShadowKey::new(env, name)).await? else {
                    continue;
                };
                match self
                    .send(&handle, cmd.clone(), idem.clone(), None, true)
                    .await
                {
                    Ok(reply) if reply.replayed || !is_failed(&reply) => return Ok(Some(reply)),
                    // Held by another run, or too contended: the next one may be free.
                    Ok(_) | Err(ExecError::Contention) => continue,
                    Err(e) => return Err(e),
                }
            }
        }
        if let Some(reply) = replay_if_stored(self.deps.store.as_ref(), idem.as_ref()).await? {
            return Ok(Some(reply));
        }
        Ok(known.map(|_| {
            render(
                &ShadowOutcome::Failed {
                    delay: self.deps.retry_delay,
                },
                "",
                false,
            )
        }))
    }

    /// The leader's reaper: releases `key`'s hold if its lease has expired, through the
    /// deployable's own actor (so it is serialized with RENEW and the other commands)
    /// with a CAS that is also conditional on the leader key (`fence`). `Ok(true)` when
    /// it released it, `Ok(false)` when there was nothing to release (renewed or
    /// released meanwhile, here or on another replica, or the record is gone).
    pub async fn reap(&self, key: &ShadowKey, fence: Compare) -> Result<bool, ExecError> {
        let Some(handle) = self.find(key).await? else {
            return Ok(false);
        };
        let reply = self
            .send(&handle, ShadowCommand::Reap, None, Some(fence), false)
            .await?;
        let status = serde_json::from_str::<serde_json::Value>(&reply.body)
            .ok()
            .and_then(|v| v["status"].as_str().map(str::to_owned));
        Ok(status.as_deref() == Some(REAPED))
    }

    /// Leased holds whose lease expired before `now`, as this replica's view has them:
    /// candidates for [`Self::reap`], which decides again on the current record.
    /// They come from the hold index (by lease expiry), not a walk of every record.
    pub fn expired_holds(&self, now: DateTime<Utc>) -> Vec<ShadowKey> {
        self.deps
            .holds
            .lock()
            .map(|h| h.expired(now))
            .unwrap_or_default()
    }

    async fn send(
        &self,
        handle: &Handle,
        cmd: ShadowCommand,
        idem: Option<IdemRequest>,
        fence: Option<Compare>,
        answer_name: bool,
    ) -> Result<Reply, ExecError> {
        handle.stats.enqueued();
        let sent = tokio::time::timeout(
            self.deps.send_timeout,
            handle.addr.send(Execute {
                cmd,
                idem,
                span: Span::current(),
                fence,
                answer_name,
            }),
        )
        .await;
        // An actor left without a record (its record deleted, or a registration that
        // failed) serves nothing: drop it now rather than wait for the watch.
        if !self.deps.view.contains_key(&handle.key) {
            self.drop_if_same(handle);
        }
        match sent {
            Ok(Ok(r)) => r,
            // Died before or while handling it; the next lookup replaces it.
            Ok(Err(_)) => {
                handle.stats.dequeued();
                Err(ExecError::Mailbox)
            }
            // Still queued or running: it is dequeued when the actor gets to it.
            Err(_) => {
                warn!(
                    timeout_ms = self.deps.send_timeout.as_millis() as u64,
                    "shadow actor did not answer within the send deadline"
                );
                Err(ExecError::Busy)
            }
        }
    }

    /// Loads every record, spawning or refreshing actors; returns the store revision.
    pub async fn hydrate(&self) -> Result<i64, StoreError> {
        let (kvs, revision) = self.deps.store.list(keys::SHADOW_PREFIX).await?;
        self.load_listing(kvs, revision);
        Ok(revision)
    }

    fn load_listing(&self, kvs: Vec<Kv>, revision: i64) {
        let mut seen = HashSet::with_capacity(kvs.len());
        self.take_page(kvs, &mut seen);
        self.finish_listing(&seen, revision);
    }

    /// One page of a listing: each record to its actor or the view; notes its key.
    fn take_page(&self, kvs: Vec<Kv>, seen: &mut HashSet<ShadowKey>) {
        for kv in kvs {
            let Some((env, name)) = keys::parse_shadow(&kv.key) else {
                continue;
            };
            let key = ShadowKey::new(env, name);
            seen.insert(key.clone());
            self.route(key, kv);
        }
    }

    /// The listing taken at `revision` is complete: what it did not have is gone.
    fn finish_listing(&self, seen: &HashSet<ShadowKey>, revision: i64) {
        // Gone meanwhile: published entries (most have no actor) and live actors alike.
        let mut gone: Vec<ShadowKey> = self
            .actors
            .iter()
            .map(|e| e.key().clone())
            .filter(|k| !seen.contains(k))
            .collect();
        let mut unseen = Vec::new();
        self.deps.view.for_each(|k, _| {
            if !seen.contains(k) {
                unseen.push(k.clone());
            }
        });
        // (Not under the view's lock: `route` takes the registry's, then the view's.)
        gone.extend(unseen.into_iter().filter(|k| !self.actors.contains_key(k)));
        for key in gone {
            self.retire(&key, revision);
        }
        self.hydrated.store(true, Ordering::SeqCst);
    }

    fn send_observe(&self, key: &ShadowKey, kv: Option<Kv>, rev: i64) {
        if let Some(h) = self.actors.get(key) {
            h.stats.enqueued();
            h.addr.do_send(Observe {
                kv,
                mod_revision: rev,
            });
        }
    }

    /// A change the watch (or a listing) saw: to the live actor of `key` if there is
    /// one, else straight to the view. Actors start on their first command, not here
    /// (see [`Self::spawn`]), so a record nobody touches costs its view entry only.
    fn route(&self, key: ShadowKey, kv: Kv) {
        // Held while publishing, so a `spawn` of `key` starts from this change or later.
        let entry = self.actors.entry(key);
        if let Entry::Occupied(e) = &entry {
            if e.get().addr.connected() {
                if self.deps.view.is_current(e.key(), kv.mod_revision) {
                    return;
                }
                let h = e.get();
                h.stats.enqueued();
                h.addr.do_send(Observe {
                    mod_revision: kv.mod_revision,
                    kv: Some(kv),
                });
                return;
            }
        }
        if self.deps.view.is_current(entry.key(), kv.mod_revision) {
            return;
        }
        match decode(Some(&kv)) {
            Ok((record, mod_revision)) => publish(
                &self.deps,
                entry.key(),
                &Cell::Known {
                    record,
                    mod_revision,
                },
            ),
            Err(e) => warn!(key = %kv.key, error = %e, "skipping undecodable record"),
        }
    }

    /// Every record's `min_pod_count` with the Deployment/HPA its registration maps
    /// (unordered; cheap enough to sweep often). Only registered records are listed, so
    /// nothing else is ever scaled.
    pub fn min_pod_counts(&self) -> Vec<(ShadowKey, ScaleTarget, u32)> {
        self.min_pod_counts_after(None, usize::MAX).0
    }

    /// [`Self::min_pod_counts`] in pieces: at most `limit` after `after`, in (environment,
    /// name) order, and where to go on from (`None`: that was the last piece).
    pub fn min_pod_counts_after(
        &self,
        after: Option<&ShadowKey>,
        limit: usize,
    ) -> (Vec<(ShadowKey, ScaleTarget, u32)>, Option<ShadowKey>) {
        let mut out = Vec::new();
        let next = self.deps.view.for_each_after(after, limit, |k, e| {
            out.push((k.clone(), scale_target(&e.record), e.record.min_pod_count));
        });
        (out, next)
    }

    /// The records whose `min_pod_count` or mapped Deployment/HPA changed (or that
    /// appeared) since the last call (see [`crate::actors::view::View::take_scale_changes`]).
    pub fn take_scale_changes(&self) -> Vec<ShadowKey> {
        self.deps.view.take_scale_changes()
    }

    /// One record's mapped Deployment/HPA and `min_pod_count` (none: not registered).
    pub fn min_pod_count(&self, key: &ShadowKey) -> Option<(ScaleTarget, u32)> {
        self.deps
            .view
            .with(key, |e| (scale_target(&e.record), e.record.min_pod_count))
    }

    /// At most `limit` published records of `env` matching `filter`, after the name
    /// `after`, in name order, as ready-made JSON.
    pub fn page(&self, env: &str, filter: Filter<'_>, after: Option<&str>, limit: usize) -> Page {
        self.deps.view.page(env, filter, after, limit)
    }

    /// Introspection of every shadow deployable's actor, sorted by id: each published
    /// record's (running or not yet started, see `active`) and any running one whose
    /// record is not published (still loading).
    pub fn actors(&self) -> Vec<ActorInfo> {
        // Read the view first, then the registry: never one under the other's lock
        // (`route` takes the registry's, then the view's).
        let mut published = Vec::new();
        self.deps
            .view
            .for_each(|k, e| published.push((k.clone(), Some(described(e)))));
        let mut out: Vec<ActorInfo> = published
            .into_iter()
            .map(|(key, record)| {
                let h = self.live(&key);
                info(&key, record, h.as_ref())
            })
            .collect();
        let unpublished: Vec<(ShadowKey, Handle)> = self
            .actors
            .iter()
            .filter(|e| e.value().addr.connected())
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect();
        for (key, h) in unpublished {
            if !self.deps.view.contains_key(&key) {
                out.push(info(&key, None, Some(&h)));
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Introspection of one shadow deployable's actor (running or not yet started).
    pub fn actor(&self, key: &ShadowKey) -> Option<ActorInfo> {
        let record = self.deps.view.with(key, described);
        let h = self.live(key);
        (record.is_some() || h.is_some()).then(|| info(key, record, h.as_ref()))
    }
}

/// What introspection shows of a published record: state, version, `mod_revision`.
fn described(e: &crate::actors::view::ViewEntry) -> (String, u64, i64) {
    let state = serde_json::to_value(e.record.state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    (state, e.record.version, e.mod_revision)
}

fn info(key: &ShadowKey, record: Option<(String, u64, i64)>, h: Option<&Handle>) -> ActorInfo {
    let (state, version, mod_revision) = match record {
        Some((state, version, rev)) => (state, Some(version), Some(rev)),
        None => ("UNKNOWN".into(), None, None),
    };
    ActorInfo {
        kind: SHADOW_KIND,
        id: format!("{}/{}", key.env, key.name),
        state,
        version,
        mod_revision,
        active: h.is_some(),
        mailbox_depth: h.map_or(0, |h| h.stats.mailbox_depth()),
        restarts: h.map_or(0, |h| h.stats.restarts()),
        last_transition_at: h.and_then(|h| h.stats.last_transition()),
    }
}

/// A listing taken in page by page: each page is routed as it arrives.
struct Hydration {
    registry: Arc<Registry>,
    seen: HashSet<ShadowKey>,
}

impl Loader for Hydration {
    fn page(&mut self, kvs: Vec<Kv>) {
        self.registry.take_page(kvs, &mut self.seen);
    }
    fn finish(self: Box<Self>, revision: i64) {
        self.registry.finish_listing(&self.seen, revision);
    }
}

impl Follower for Registry {
    fn prefix(&self) -> &'static str {
        keys::SHADOW_PREFIX
    }

    fn load(&self, kvs: Vec<Kv>, revision: i64) {
        self.load_listing(kvs, revision);
    }

    fn loader(self: Arc<Self>) -> Box<dyn Loader> {
        Box::new(Hydration {
            registry: self,
            seen: HashSet::new(),
        })
    }

    fn apply(&self, ev: WatchEvent) {
        match ev {
            WatchEvent::Put(kv) => {
                if let Some((env, name)) = keys::parse_shadow(&kv.key) {
                    self.route(ShadowKey::new(env, name), kv);
                }
            }
            WatchEvent::Delete { key, mod_revision } => {
                if let Some((env, name)) = keys::parse_shadow(&key) {
                    self.retire(&ShadowKey::new(env, name), mod_revision);
                }
            }
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Ok(owned) = self.owned.lock() {
            for a in owned.iter() {
                a.stop();
            }
        }
    }
}

/// The Kubernetes objects a record's minimum pod count acts on.
fn scale_target(r: &ShadowDeployable) -> ScaleTarget {
    ScaleTarget {
        deployment: r.deployment_name().to_owned(),
        hpa: r.hpa_name().to_owned(),
    }
}
