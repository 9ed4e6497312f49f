//! The asynchronous operations' life cycle around the shared context
//! ([`crate::actors::ops_types`]): storing a submission (intent SUBMITTING with the
//! idempotency record, in one transaction) before anything touches Kubernetes, and
//! withdrawing it when Kubernetes refuses; the leadership hook that starts the intent
//! manager on the leader; and the converger that keeps every shadow deployable's
//! Kubernetes minimum replicas equal to its recorded `min_pod_count`, correcting drift
//! it reads back from the cluster.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use actix::prelude::*;
use futures::StreamExt;
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::actors::leader::on_leadership;
use crate::actors::ops_types::{note_drift, Stop, Sweep};
pub use crate::actors::ops_types::{
    ActError, ConvergeReport, Drift, IntentWriteError, ManagerHandle, OpsCtx,
};
use crate::actors::outbox::IntentManager;
use crate::actors::shadow::ShadowKey;
use crate::domain::intent::{IntentStatus, WatchIntent};
use crate::keys;
use crate::ports::kube::{min_replicas_hold, KubeError, ScaleTarget};
use crate::ports::store::{Compare, Op, StoreError, Txn};

/// Deployables a drift check reads from the view at a time (it yields in between).
const DRIFT_PAGE: usize = 512;

/// At most this many deployables are converged under one fenced effect write: changes
/// that piled up while the converger was busy cost one etcd write per batch, not one
/// per deployable.
const CONVERGE_BATCH: usize = 64;

/// Min-replica patches of one batch in flight at once.
const CONVERGE_CONCURRENCY: usize = 16;

/// A deployable to converge: its key and the (objects, minimum) it should have.
type Want = (ShadowKey, (ScaleTarget, u32));

/// The converger reads the cluster back (to find drift) on every this-many-th sweep;
/// the sweeps in between only re-apply recorded changes.
pub const DRIFT_CHECK_EVERY: u64 = 15;

/// Most keys one read of the intents list asks for, and fewest (a page of an
/// environment's intents skips the other environments' keys, so a read asks for a few
/// more than the page still lacks).
const INTENT_READ_MAX: usize = 1_000;
const INTENT_READ_MIN: usize = 64;
/// Most reads behind one page of the intents list: a page costs at most this many
/// bounded range reads, whatever the number of intents stored.
const INTENT_PAGE_READS: usize = 16;

/// One page of an environment's intents, in request id order.
#[derive(Debug, Default)]
pub struct IntentPage {
    /// The intents of the page.
    pub items: Vec<WatchIntent>,
    /// The request id the page ended at, when more intents may follow it: the last
    /// intent served, or the last key read when the read budget ran out first (then the
    /// page holds fewer than asked for).
    pub more_after: Option<String>,
}

/// An idempotency record to write with a submission or its withdrawal.
#[derive(Debug, Clone)]
pub struct IdemWrite<'a> {
    /// `/idempotency/{scope}/{key}`.
    pub key: &'a str,
    /// The record (see [`crate::idempotency::IdemRequest::record`]).
    pub record: Vec<u8>,
    /// The TTL lease it hangs on.
    pub lease: i64,
}

impl OpsCtx {
    /// Stores a SUBMITTING intent together with its idempotency record, in one
    /// transaction that requires both keys to be absent. `Ok(Some(revision))` when
    /// stored; `Ok(None)` when either key exists (the same request was stored first,
    /// here or on another replica).
    pub async fn store_submission(
        &self,
        intent: &WatchIntent,
        idem: Option<IdemWrite<'_>>,
    ) -> Result<Option<i64>, StoreError> {
        let key = keys::watch_intent(&intent.request_id);
        let value = serde_json::to_vec(intent)
            .map_err(|e| StoreError::Other(format!("cannot encode intent: {e}")))?;
        let mut txn = Txn {
            compares: vec![Compare::ModRevision(key.clone(), 0)],
            success: vec![Op::Put {
                key,
                value,
                lease: None,
            }],
            failure_gets: Vec::new(),
        };
        if let Some(i) = idem {
            txn.compares.push(Compare::ModRevision(i.key.to_owned(), 0));
            txn.success.push(Op::Put {
                key: i.key.to_owned(),
                value: i.record,
                lease: Some(i.lease),
            });
        }
        let r = self.store.txn(txn).await?;
        if !r.succeeded {
            return Ok(None);
        }
        self.intents
            .note(&intent.request_id, intent.clone(), r.revision);
        Ok(Some(r.revision))
    }

    /// Withdraws a submission Kubernetes refused: deletes the intent (if still at `rev`)
    /// and replaces the idempotency record with the refusal, so a retry gets the same
    /// answer. When the intent moved on meanwhile (the leader finished it), nothing is
    /// written.
    pub async fn withdraw_submission(
        &self,
        intent: &WatchIntent,
        rev: i64,
        idem: Option<IdemWrite<'_>>,
    ) -> Result<bool, StoreError> {
        let key = keys::watch_intent(&intent.request_id);
        let mut txn = Txn {
            compares: vec![Compare::ModRevision(key.clone(), rev)],
            success: vec![Op::Delete { key }],
            failure_gets: Vec::new(),
        };
        if let Some(i) = idem {
            txn.success.push(Op::Put {
                key: i.key.to_owned(),
                value: i.record,
                lease: Some(i.lease),
            });
        }
        Ok(self.store.txn(txn).await?.succeeded)
    }

    /// At most `limit` intents of `env` (only those in `status`, when given) whose
    /// request ids sort after `after`, in request id order. Reads the store a bounded
    /// range at a time from `after` on, a bounded number of times, so a
    /// page's cost does not grow with the number of intents stored.
    pub async fn page_intents(
        &self,
        env: &str,
        status: Option<IntentStatus>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<IntentPage, StoreError> {
        let mut from = after.map(keys::watch_intent);
        let mut items: Vec<WatchIntent> = Vec::new();
        for _ in 0..INTENT_PAGE_READS {
            // One more than the page needs tells whether more follow.
            let need = (limit + 1).saturating_sub(items.len());
            let ask = need.clamp(INTENT_READ_MIN, INTENT_READ_MAX);
            let (kvs, more) = self
                .store
                .list_after(keys::WATCH_INTENT_PREFIX, from.as_deref(), ask)
                .await?;
            for kv in &kvs {
                match serde_json::from_slice::<WatchIntent>(&kv.value) {
                    Ok(i) if i.env == env && status.is_none_or(|s| i.status == s) => {
                        items.push(i);
                    }
                    Ok(_) => {}
                    Err(e) => warn!(key = %kv.key, error = %e, "skipping undecodable intent"),
                }
            }
            if items.len() > limit {
                items.truncate(limit);
                let more_after = items.last().map(|i| i.request_id.clone());
                return Ok(IntentPage { items, more_after });
            }
            let last = kvs.last().map(|kv| kv.key.clone());
            match last {
                Some(last) if more => from = Some(last),
                _ => {
                    return Ok(IntentPage {
                        items,
                        more_after: None,
                    })
                }
            }
        }
        let more_after = from
            .as_deref()
            .and_then(|k| keys::child(keys::WATCH_INTENT_PREFIX, k))
            .map(str::to_owned);
        Ok(IntentPage { items, more_after })
    }

    fn start_leading(self: &Arc<Self>) {
        if let Ok(mut slot) = self.manager.lock() {
            if slot.is_none() {
                let addr = IntentManager::new(self.clone()).start();
                *slot = Some(ManagerHandle {
                    track: addr.clone().recipient(),
                    sweep: addr.clone().recipient(),
                    stop: addr.recipient(),
                });
            }
        }
        self.converge_now.notify_one();
    }

    /// Restarts the intent manager when it has died (a panic in an actix handler ends the
    /// actor for good) while this replica still leads; it reloads every intent from the
    /// store. Returns whether it restarted it.
    pub fn revive_if_dead(self: &Arc<Self>) -> bool {
        let dead = self
            .manager
            .lock()
            .ok()
            .is_some_and(|m| m.as_ref().is_some_and(|m| !m.stop.connected()));
        if !dead {
            return false;
        }
        warn!("the intent manager died; restarting it from the store");
        if let Ok(mut m) = self.manager.lock() {
            m.take();
        }
        self.metrics
            .decisions
            .with_label_values(&["intent_manager_restarted"])
            .inc();
        if self.fence.epoch().is_some() {
            self.start_leading();
        }
        true
    }

    /// Checks every `every` that the intent manager is alive ([`Self::revive_if_dead`]).
    pub async fn supervise(self: Arc<Self>, every: std::time::Duration) {
        crate::actors::leader::check_every(every, || {
            self.revive_if_dead();
        })
        .await;
    }

    /// Stops the intent manager and its watchers (leadership lost, or shutdown).
    pub fn stop_leading(&self) {
        if let Some(m) = self.manager.lock().ok().and_then(|mut m| m.take()) {
            m.stop.do_send(Stop);
        }
    }

    /// Follows election changes: leader-only work runs only while leading.
    pub async fn follow_leadership(self: Arc<Self>, changes: watch::Receiver<Option<i64>>) {
        let (a, b) = (self.clone(), self);
        on_leadership(changes, move || a.start_leading(), move || b.stop_leading()).await;
    }

    /// Tells the intent manager about every change of the intents mirror.
    pub async fn track_changes(self: Arc<Self>) {
        let notify = self.intents.changes();
        loop {
            notify.notified().await;
            if let Some(m) = self.manager() {
                m.sweep.do_send(Sweep);
            }
        }
    }

    /// Keeps Kubernetes minimum replicas equal to each shadow deployable's recorded
    /// `min_pod_count`, on the leader: right after a change made here (only that
    /// deployable), and in a sweep every `KUBE_CONVERGE_INTERVAL_MS`, which picks up
    /// changes made through other replicas (the view notes every changed count or
    /// target, so a sweep costs what changed, not the fleet), retries failed patches,
    /// and re-applies everything after a start-up or failover. Every [`DRIFT_CHECK_EVERY`]-th sweep
    /// reads each deployable back from the cluster and patches the ones that drifted
    /// (edited by someone else) or were missing; the result is kept for
    /// `GET /api/1.0/controller` and counted in `controller_decisions_total`
    /// (`min_replicas_drift`, `min_replicas_missing`).
    pub async fn converge_forever(self: Arc<Self>) {
        // What each deployable was last converged to: the mapped objects and the count.
        let mut applied: HashMap<ShadowKey, (ScaleTarget, u32)> = HashMap::new();
        // What the cluster lacked when last tried (NotFound). Each try costs a fenced
        // etcd write, so these are tried again when their record changes or at the next
        // drift check, not on every sweep: otherwise a fleet of records without objects
        // in the cluster turns every sweep into one etcd write per record.
        let mut missing: HashMap<ShadowKey, (ScaleTarget, u32)> = HashMap::new();
        // Not converged for another reason (a failed patch or cluster read): tried again
        // at the next sweep.
        let mut retry: HashSet<ShadowKey> = HashSet::new();
        let mut leading = false;
        // A full sweep ran under this leadership: wake-ups need only the changed ones.
        let mut swept = false;
        let mut sweeps: u64 = 0;
        let mut corrected: u64 = 0;
        loop {
            let woken = tokio::time::timeout(
                self.settings.converge_interval,
                self.converge_now.notified(),
            )
            .await
            .is_ok();
            if self.fence.epoch().is_none() {
                leading = false;
                // Not ours to converge: a new leadership starts with a full check.
                drop(self.shadows.take_scale_changes());
                continue;
            }
            if !self.shadows.is_hydrated() {
                // A sweep now would see a part of the fleet: the first one under a new
                // leadership must compare all of it with the cluster before patching.
                continue;
            }
            if !leading {
                // New leadership: re-apply everything once, and check the cluster.
                applied.clear();
                missing.clear();
                retry.clear();
                swept = false;
                leading = true;
                sweeps = 0;
                corrected = 0;
            }
            let dirty: Vec<ShadowKey> = self
                .dirty
                .lock()
                .map(|mut d| d.drain().collect())
                .unwrap_or_default();
            if woken && swept {
                // Changed records: tried even if missing from the cluster last time.
                let wants = self.wants(dirty, &applied, None);
                let failed = self
                    .converge_tracked(wants, &mut applied, &mut missing)
                    .await;
                retry.extend(failed);
                continue;
            }
            swept = true;
            let check = sweeps.is_multiple_of(DRIFT_CHECK_EVERY);
            sweeps += 1;
            if !check {
                // Only what changed since the last sweep, and what failed in it.
                let mut keys: HashSet<ShadowKey> =
                    self.shadows.take_scale_changes().into_iter().collect();
                keys.extend(retry.drain());
                let wants = self.wants(keys, &applied, Some(&missing));
                let failed = self
                    .converge_tracked(wants, &mut applied, &mut missing)
                    .await;
                retry.extend(failed);
                continue;
            }
            // The check reads every deployable now: what changed before it is covered.
            drop(self.shadows.take_scale_changes());
            retry.clear();
            let mut report = ConvergeReport {
                last_check_at: Some(self.clock.now()),
                ..ConvergeReport::default()
            };
            // In pieces, yielding between them: a fleet of 100,000 read in one go holds
            // this thread (and the view's writers) for a tenth of a second.
            let mut after: Option<ShadowKey> = None;
            'check: loop {
                let (targets, rest) = self
                    .shadows
                    .min_pod_counts_after(after.as_ref(), DRIFT_PAGE);
                report.checked += targets.len();
                for (key, target, want) in targets {
                    if self.fence.epoch().is_none() {
                        break 'check;
                    }
                    let next = (target, want);
                    let ns = self.settings.namespace(&key.env);
                    let entry = |observed: Option<i32>, error: Option<String>| Drift {
                        env: key.env.clone(),
                        name: key.name.clone(),
                        want,
                        observed,
                        error,
                    };
                    let wanted = i32::try_from(want).unwrap_or(i32::MAX);
                    match self.kube.observed_min_replicas(&ns, &next.0).await {
                        Ok(Some(have)) if min_replicas_hold(wanted, have) => {
                            report.in_sync += 1;
                            missing.remove(&key);
                            applied.insert(key, next);
                        }
                        Ok(Some(have)) => {
                            if applied.get(&key) == Some(&next) {
                                // We had converged it: someone changed the cluster since.
                                warn!(env = %key.env, name = %key.name, want, have, "min replicas drifted in the cluster; correcting");
                                self.metrics
                                    .decisions
                                    .with_label_values(&["min_replicas_drift"])
                                    .inc();
                            }
                            match self.converge_one(&key, &next.0, want).await {
                                Ok(()) => {
                                    corrected += 1;
                                    note_drift(
                                        &mut report.drifted_count,
                                        &mut report.drifted,
                                        entry(Some(have), None),
                                    );
                                    missing.remove(&key);
                                    applied.insert(key, next);
                                }
                                Err(e) => {
                                    note_drift(
                                        &mut report.failed_count,
                                        &mut report.failed,
                                        entry(Some(have), Some(e.to_string())),
                                    );
                                    applied.remove(&key);
                                    retry.insert(key);
                                }
                            }
                        }
                        Ok(None) => {
                            self.metrics
                                .decisions
                                .with_label_values(&["min_replicas_missing"])
                                .inc();
                            note_drift(
                                &mut report.missing_count,
                                &mut report.missing,
                                entry(None, None),
                            );
                            applied.remove(&key);
                            missing.insert(key, next);
                        }
                        Err(e) => {
                            note_drift(
                                &mut report.failed_count,
                                &mut report.failed,
                                entry(None, Some(e.to_string())),
                            );
                            if applied.get(&key) != Some(&next) && missing.get(&key) != Some(&next)
                            {
                                retry.insert(key);
                            }
                        }
                    }
                }
                match rest {
                    Some(k) => after = Some(k),
                    None => break,
                }
                tokio::task::yield_now().await;
            }
            report.drift_corrected_total = corrected;
            if let Ok(mut c) = self.convergence.lock() {
                *c = report;
            }
        }
    }

    /// What `keys` should have and do not yet (as far as `applied` knows; nor, when
    /// given, as `missing` last found it absent from the cluster).
    fn wants(
        &self,
        keys: impl IntoIterator<Item = ShadowKey>,
        applied: &HashMap<ShadowKey, (ScaleTarget, u32)>,
        missing: Option<&HashMap<ShadowKey, (ScaleTarget, u32)>>,
    ) -> Vec<Want> {
        keys.into_iter()
            .filter_map(|key| {
                let next = self.shadows.min_pod_count(&key)?;
                let done = applied.get(&key) == Some(&next)
                    || missing.is_some_and(|m| m.get(&key) == Some(&next));
                (!done).then_some((key, next))
            })
            .collect()
    }

    /// Converges `wants` in batches of [`CONVERGE_BATCH`], each under one fenced
    /// effect write and patched [`CONVERGE_CONCURRENCY`] at a time, and records each
    /// outcome (`applied`; `missing` when not in the cluster). Returns the keys to try
    /// again at the next sweep.
    async fn converge_tracked(
        &self,
        wants: Vec<Want>,
        applied: &mut HashMap<ShadowKey, (ScaleTarget, u32)>,
        missing: &mut HashMap<ShadowKey, (ScaleTarget, u32)>,
    ) -> Vec<ShadowKey> {
        let mut failed = Vec::new();
        let mut wants = wants.into_iter().peekable();
        while wants.peek().is_some() {
            let batch: Vec<Want> = wants.by_ref().take(CONVERGE_BATCH).collect();
            let subject = match batch.as_slice() {
                [(key, _)] => format!("{}/{}", key.env, key.name),
                [(key, _), ..] => format!("{}/{} and {} more", key.env, key.name, batch.len() - 1),
                [] => continue,
            };
            // Fenced like every leader-only side effect: a deposed leader patches nothing.
            if let Err(e) = self
                .fence
                .authorize(self.store.as_ref(), "kube_min_replicas", &subject)
                .await
            {
                debug!(deployables = %subject, error = %e, "min replicas not converged: not authorized");
                failed.extend(batch.into_iter().map(|(key, _)| key));
                failed.extend(wants.map(|(key, _)| key));
                return failed;
            }
            let outcomes: Vec<(Want, Result<(), KubeError>)> = futures::stream::iter(batch)
                .map(|(key, next)| async move {
                    // The permit holds while the lease certainly does (by this
                    // replica's clock): no patch once it may have lapsed.
                    let r = if self.fence.is_leading() {
                        self.patch_min_replicas(&key, &next.0, next.1).await
                    } else {
                        Err(KubeError::Unavailable("no longer the leader".into()))
                    };
                    ((key, next), r)
                })
                .buffer_unordered(CONVERGE_CONCURRENCY)
                .collect()
                .await;
            for ((key, next), r) in outcomes {
                match r {
                    Ok(()) => {
                        missing.remove(&key);
                        applied.insert(key, next);
                    }
                    Err(KubeError::NotFound(_)) => {
                        missing.insert(key, next);
                    }
                    Err(_) => failed.push(key),
                }
            }
        }
        failed
    }

    /// Patches one deployable's minimum replicas to `want`, on the Deployment/HPA its
    /// record maps (`target`, from the registry: an unregistered name never gets here).
    async fn converge_one(
        &self,
        key: &ShadowKey,
        target: &ScaleTarget,
        want: u32,
    ) -> Result<(), KubeError> {
        // Fenced like every leader-only side effect: a deposed leader patches nothing.
        let subject = format!("{}/{}", key.env, key.name);
        if let Err(e) = self
            .fence
            .authorize(self.store.as_ref(), "kube_min_replicas", &subject)
            .await
        {
            debug!(env = %key.env, name = %key.name, error = %e, "min replicas not converged: not authorized");
            return Err(KubeError::Unavailable(format!("not authorized: {e}")));
        }
        self.patch_min_replicas(key, target, want).await
    }

    /// Sets one deployable's minimum replicas in the cluster; the caller holds a permit.
    async fn patch_min_replicas(
        &self,
        key: &ShadowKey,
        target: &ScaleTarget,
        want: u32,
    ) -> Result<(), KubeError> {
        let ns = self.settings.namespace(&key.env);
        let min = i32::try_from(want).unwrap_or(i32::MAX);
        match self.kube.set_min_replicas(&ns, target, min).await {
            Ok(()) => {
                debug!(env = %key.env, name = %key.name, deployment = %target.deployment, hpa = %target.hpa, min, "min replicas converged");
                self.metrics
                    .decisions
                    .with_label_values(&["converge_min_replicas"])
                    .inc();
                Ok(())
            }
            Err(e @ KubeError::NotFound(_)) => {
                // Not in the cluster (yet): the next drift check tries again.
                debug!(env = %key.env, name = %key.name, error = %e, "deployable not in the cluster");
                Err(e)
            }
            Err(e) => {
                warn!(env = %key.env, name = %key.name, error = %e, "cannot converge min replicas; will retry");
                self.metrics
                    .decisions
                    .with_label_values(&["converge_failed"])
                    .inc();
                Err(e)
            }
        }
    }
}
