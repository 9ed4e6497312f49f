//! Shared context of the asynchronous operations: the Kubernetes executor, the intents
//! mirror, the callback sender and policy; the leadership hook that starts the intent
//! manager on the leader; and the converger that keeps every shadow deployable's
//! Kubernetes minimum replicas equal to its recorded `min_pod_count`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use actix::prelude::*;
use tokio::sync::{watch, Notify};
use tracing::{debug, warn};

use crate::actors::leader::on_leadership;
use crate::actors::leader::Fence;
use crate::actors::mirror::Mirror;
use crate::actors::outbox::{IntentManager, Stop, Track};
use crate::actors::registry::Registry;
use crate::actors::shadow::ShadowKey;
use crate::clock::Clock;
use crate::config::OperationsSettings;
use crate::domain::callback::RetryPolicy;
use crate::domain::intent::WatchIntent;
use crate::idempotency::LeasePool;
use crate::keys;
use crate::ports::callback::CallbackSender;
use crate::ports::kube::{KubeError, KubeExecutor};
use crate::ports::store::{Compare, Op, Store, StoreError, Txn};
use crate::telemetry::Metrics;

/// Everything the operations actors share.
pub struct OpsCtx {
    /// Store.
    pub store: Arc<dyn Store>,
    /// Kubernetes.
    pub kube: Arc<dyn KubeExecutor>,
    /// Callback sender.
    pub sender: Arc<dyn CallbackSender>,
    /// Retry policy of callbacks.
    pub policy: RetryPolicy,
    /// Intents, watch-fed.
    pub intents: Arc<Mirror<WatchIntent>>,
    /// Leader fence.
    pub fence: Arc<Fence>,
    /// Settings.
    pub settings: OperationsSettings,
    /// Metrics.
    pub metrics: Metrics,
    /// Time source.
    pub clock: Clock,
    /// Shadow deployables (for convergence).
    pub shadows: Arc<Registry>,
    retention: LeasePool,
    manager: Mutex<Option<Addr<IntentManager>>>,
    converge_now: Notify,
    dirty: Mutex<HashSet<ShadowKey>>,
}

/// Why persisting an intent failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum IntentWriteError {
    /// Another writer changed it first.
    #[error("intent changed concurrently")]
    Conflict,
    /// Not the leader.
    #[error("not the leader")]
    Fenced,
    /// Store failure.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl OpsCtx {
    /// A context.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<dyn Store>,
        kube: Arc<dyn KubeExecutor>,
        sender: Arc<dyn CallbackSender>,
        intents: Arc<Mirror<WatchIntent>>,
        fence: Arc<Fence>,
        settings: OperationsSettings,
        metrics: Metrics,
        clock: Clock,
        shadows: Arc<Registry>,
    ) -> Arc<Self> {
        let policy = RetryPolicy {
            max_attempts: settings.callback_max_attempts,
            max_age: settings.callback_max_age,
            ..RetryPolicy::default()
        };
        let retention = LeasePool::new(settings.intent_retention);
        Arc::new(Self {
            store,
            kube,
            sender,
            policy,
            intents,
            fence,
            settings,
            metrics,
            clock,
            shadows,
            retention,
            manager: Mutex::new(None),
            converge_now: Notify::new(),
            dirty: Mutex::new(HashSet::new()),
        })
    }

    /// Replaces an intent with CAS (and the leader fence when `fenced`).
    pub async fn write_intent(
        &self,
        next: &WatchIntent,
        rev: i64,
        fenced: bool,
    ) -> Result<i64, IntentWriteError> {
        let key = keys::watch_intent(&next.request_id);
        // A finished intent (final, callback delivered or given up) is kept for
        // INTENT_RETENTION_SECONDS on a shared lease, then etcd removes it.
        let finished = !next.is_pending() && (next.delivery.delivered || next.delivery.gave_up);
        let lease = if finished {
            Some(self.retention.lease(self.store.as_ref()).await?)
        } else {
            None
        };
        let mut compares = vec![Compare::ModRevision(key.clone(), rev)];
        if fenced {
            compares.push(self.fence.compare().ok_or(IntentWriteError::Fenced)?);
        }
        let r = self
            .store
            .txn(Txn {
                compares,
                success: vec![Op::Put {
                    key: key.clone(),
                    value: serde_json::to_vec(next).unwrap_or_default(),
                    lease,
                }],
                failure_gets: vec![key],
            })
            .await
            .inspect_err(|e| {
                if *e == StoreError::LeaseNotFound {
                    self.retention.invalidate();
                }
            })?;
        if r.succeeded {
            self.intents
                .note(&next.request_id, next.clone(), r.revision);
            return Ok(r.revision);
        }
        let moved = r
            .fetched
            .first()
            .and_then(|k| k.as_ref())
            .map(|k| k.mod_revision)
            != Some(rev);
        if moved {
            Err(IntentWriteError::Conflict)
        } else {
            self.fence.lose();
            Err(IntentWriteError::Fenced)
        }
    }

    /// Asks the intent manager (if this replica leads) to look at `request_id` now.
    pub fn track(&self, request_id: &str) {
        if let Some(m) = self.manager.lock().ok().and_then(|m| m.clone()) {
            m.do_send(Track(request_id.to_owned()));
        }
    }

    /// Asks the converger to look at `key` now (the periodic sweep covers changes made
    /// through other replicas).
    pub fn converge_soon(&self, key: ShadowKey) {
        if let Ok(mut d) = self.dirty.lock() {
            d.insert(key);
        }
        self.converge_now.notify_one();
    }

    fn start_leading(self: &Arc<Self>) {
        if let Ok(mut slot) = self.manager.lock() {
            if slot.is_none() {
                *slot = Some(IntentManager::new(self.clone()).start());
            }
        }
        self.converge_now.notify_one();
    }

    /// Stops the intent manager and its watchers (leadership lost, or shutdown).
    pub fn stop_leading(&self) {
        if let Some(m) = self.manager.lock().ok().and_then(|mut m| m.take()) {
            m.do_send(Stop);
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
            if let Some(m) = self.manager.lock().ok().and_then(|m| m.clone()) {
                m.do_send(crate::actors::outbox::Sweep);
            }
        }
    }

    /// Keeps Kubernetes minimum replicas equal to each shadow deployable's recorded
    /// `min_pod_count`, on the leader: right after a change made here (only that
    /// deployable), and in a full sweep every `KUBE_CONVERGE_INTERVAL_MS`, which picks up
    /// changes made through other replicas, retries failed patches, and re-applies
    /// everything after a start-up or failover.
    pub async fn converge_forever(self: Arc<Self>) {
        let mut applied: HashMap<ShadowKey, u32> = HashMap::new();
        let mut leading = false;
        loop {
            let woken = tokio::time::timeout(
                self.settings.converge_interval,
                self.converge_now.notified(),
            )
            .await
            .is_ok();
            if self.fence.epoch().is_none() {
                leading = false;
                continue;
            }
            if !leading {
                // New leadership: re-apply everything once.
                applied.clear();
                leading = true;
            }
            let dirty: Vec<ShadowKey> = self
                .dirty
                .lock()
                .map(|mut d| d.drain().collect())
                .unwrap_or_default();
            let targets: Vec<(ShadowKey, u32)> = if woken && !applied.is_empty() {
                dirty
                    .into_iter()
                    .filter_map(|k| self.shadows.min_pod_count(&k).map(|m| (k, m)))
                    .collect()
            } else {
                self.shadows.min_pod_counts()
            };
            for (key, want) in targets {
                if applied.get(&key) == Some(&want) {
                    continue;
                }
                if self.converge_one(&key, want).await {
                    applied.insert(key, want);
                }
            }
        }
    }

    /// Patches one deployable; `true` when nothing is left to do for `want`.
    async fn converge_one(&self, key: &ShadowKey, want: u32) -> bool {
        let ns = self.settings.namespace(&key.env);
        let min = i32::try_from(want).unwrap_or(i32::MAX);
        // Fenced like every leader-only side effect: a deposed leader patches nothing.
        let subject = format!("{}/{}", key.env, key.name);
        if let Err(e) = self
            .fence
            .authorize(self.store.as_ref(), "kube_min_replicas", &subject)
            .await
        {
            debug!(env = %key.env, name = %key.name, error = %e, "min replicas not converged: not authorized");
            return false;
        }
        match self.kube.set_min_replicas(&ns, &key.name, min).await {
            Ok(()) => {
                debug!(env = %key.env, name = %key.name, min, "min replicas converged");
                self.metrics
                    .decisions
                    .with_label_values(&["converge_min_replicas"])
                    .inc();
                true
            }
            Err(KubeError::NotFound(m)) => {
                // Not in the cluster (yet): nothing to patch until it changes again.
                debug!(env = %key.env, name = %key.name, error = %m, "deployable not in the cluster");
                true
            }
            Err(e) => {
                warn!(env = %key.env, name = %key.name, error = %e, "cannot converge min replicas; will retry");
                self.metrics
                    .decisions
                    .with_label_values(&["converge_failed"])
                    .inc();
                false
            }
        }
    }
}
