//! What the operations actors share, in a module that imports none of them: the
//! context ([`OpsCtx`]: store, Kubernetes, callback sender, intents mirror, fence), the
//! intent write with CAS and fence, running a SUBMITTING intent's Kubernetes action,
//! and the messages between the intent manager and its watchers. `operations`,
//! `outbox` and `watcher` import this module, never each other in a circle.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use actix::prelude::*;
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::{Notify, Semaphore};

use crate::actors::leader::Fence;
use crate::actors::mirror::Mirror;
use crate::actors::registry::Registry;
use crate::actors::shadow::ShadowKey;
use crate::clock::Clock;
use crate::config::OperationsSettings;
use crate::domain::callback::RetryPolicy;
use crate::domain::intent::{submitted, WatchIntent};
use crate::idempotency::LeasePool;
use crate::keys;
use crate::ports::callback::CallbackSender;
use crate::ports::kube::{KubeAction, KubeError, KubeExecutor};
use crate::ports::store::{Compare, Op, Store, StoreError, Txn};
use crate::telemetry::Metrics;

/// Look at one intent now.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Track(pub String);

/// Look at every intent now.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Sweep;

/// A watcher ended.
#[derive(Message)]
#[rtype(result = "()")]
pub struct WatcherDone(pub String);

/// Stop (leadership lost).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Stop;

/// Stop watching without concluding (leadership lost).
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopWatching;

/// How to reach the running intent manager without naming its type.
#[derive(Clone)]
pub struct ManagerHandle {
    /// Look at one intent.
    pub track: Recipient<Track>,
    /// Look at every intent.
    pub sweep: Recipient<Sweep>,
    /// Stop it.
    pub stop: Recipient<Stop>,
}

/// One deployable whose minimum replicas are not (yet) what its record says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Drift {
    /// Environment.
    pub env: String,
    /// Deployable name.
    pub name: String,
    /// The recorded `min_pod_count`.
    pub want: u32,
    /// What the cluster had (none: not in the cluster).
    pub observed: Option<i32>,
    /// Why it could not be checked or corrected, if it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Entries each list of a [`ConvergeReport`] keeps (the counts cover all): the status
/// answer stays small with any fleet size.
pub const REPORT_SAMPLE: usize = 20;

/// Counts `d` and keeps it when the sample has room.
pub fn note_drift(count: &mut usize, sample: &mut Vec<Drift>, d: Drift) {
    *count += 1;
    if sample.len() < REPORT_SAMPLE {
        sample.push(d);
    }
}

/// The min-replica converger's last comparison with the cluster, as shown by
/// `GET /api/1.0/controller` under `min_replicas`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ConvergeReport {
    /// When the cluster was last read for every deployable (none: not yet, or not
    /// leading).
    #[serde(with = "crate::domain::time::option")]
    pub last_check_at: Option<DateTime<Utc>>,
    /// Deployables compared in that check.
    pub checked: usize,
    /// Of those, how many matched their record.
    pub in_sync: usize,
    /// How many were found drifted in that check (each was patched again).
    pub drifted_count: usize,
    /// The first [`REPORT_SAMPLE`] of them.
    pub drifted: Vec<Drift>,
    /// How many have no HPA/Deployment in the cluster (retried every check).
    pub missing_count: usize,
    /// The first [`REPORT_SAMPLE`] of them.
    pub missing: Vec<Drift>,
    /// How many could not be read or patched.
    pub failed_count: usize,
    /// The first [`REPORT_SAMPLE`] of them.
    pub failed: Vec<Drift>,
    /// Drift found and patched since this replica started leading.
    pub drift_corrected_total: u64,
}

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
    /// Permits for callback deliveries in flight (`CALLBACK_CONCURRENCY`).
    pub deliveries: Arc<Semaphore>,
    retention: LeasePool,
    pub(crate) manager: Mutex<Option<ManagerHandle>>,
    pub(crate) converge_now: Notify,
    pub(crate) dirty: Mutex<HashSet<ShadowKey>>,
    pub(crate) convergence: Mutex<ConvergeReport>,
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

/// Why running a SUBMITTING intent's action did not end with it PENDING.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ActError {
    /// Kubernetes refused the action; repeating it will not help.
    #[error("kubernetes refused the action: {0}")]
    Rejected(KubeError),
    /// Kubernetes could not be reached, or answered "later"; the action may or may not
    /// have happened, and repeating it (it is idempotent) may succeed.
    #[error("kubernetes unavailable: {0}")]
    Retryable(KubeError),
    /// The action ran, but the PENDING mark could not be written; running it again is
    /// harmless.
    #[error("action done but not recorded: {0}")]
    NotRecorded(IntentWriteError),
    /// The intent's stored action cannot be decoded.
    #[error("stored action is unreadable: {0}")]
    Corrupt(String),
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
        let deliveries = Arc::new(Semaphore::new(settings.callback_concurrency.max(1)));
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
            deliveries,
            retention,
            manager: Mutex::new(None),
            converge_now: Notify::new(),
            dirty: Mutex::new(HashSet::new()),
            convergence: Mutex::new(ConvergeReport::default()),
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
        let finished = next.is_final() && (next.delivery.delivered || next.delivery.gave_up);
        let lease = if finished {
            Some(self.retention.lease(self.store.as_ref()).await?)
        } else {
            None
        };
        let mut compares = vec![Compare::ModRevision(key.clone(), rev)];
        if fenced {
            compares.push(self.fence.compare().ok_or(IntentWriteError::Fenced)?);
        }
        let value = serde_json::to_vec(next)
            .map_err(|e| StoreError::Other(format!("cannot encode intent: {e}")))?;
        let r = self
            .store
            .txn(Txn {
                compares,
                success: vec![Op::Put {
                    key: key.clone(),
                    value,
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

    /// Runs a SUBMITTING intent's Kubernetes action (idempotent by request id: a second
    /// run changes nothing) and marks the intent PENDING with the action's baselines,
    /// with CAS on `rev` (and the fence when `fenced`). Ok also when another writer
    /// (the API replica that stored it, or the leader) marked it first.
    pub async fn act(&self, intent: &WatchIntent, rev: i64, fenced: bool) -> Result<(), ActError> {
        let raw = intent
            .submission
            .clone()
            .ok_or_else(|| ActError::Corrupt("no action stored".into()))?;
        let action: KubeAction =
            serde_json::from_value(raw).map_err(|e| ActError::Corrupt(e.to_string()))?;
        let baselines = match action.run(self.kube.as_ref()).await {
            Ok(b) => b,
            Err(e) if e.is_retryable() => return Err(ActError::Retryable(e)),
            Err(e) => return Err(ActError::Rejected(e)),
        };
        let Some(next) = submitted(intent, baselines) else {
            return Ok(());
        };
        match self.write_intent(&next, rev, fenced).await {
            Ok(_) => {
                self.track(&next.request_id);
                Ok(())
            }
            Err(IntentWriteError::Conflict) => Ok(()),
            Err(e) => Err(ActError::NotRecorded(e)),
        }
    }

    /// Asks the intent manager (if this replica leads) to look at `request_id` now.
    pub fn track(&self, request_id: &str) {
        if let Some(m) = self.manager() {
            m.track.do_send(Track(request_id.to_owned()));
        }
    }

    /// Asks the intent manager (if this replica leads) to look at every intent now.
    pub fn sweep(&self) {
        if let Some(m) = self.manager() {
            m.sweep.do_send(Sweep);
        }
    }

    pub(crate) fn manager(&self) -> Option<ManagerHandle> {
        self.manager.lock().ok().and_then(|m| m.clone())
    }

    /// Asks the converger to look at `key` now (the periodic sweep covers changes made
    /// through other replicas).
    pub fn converge_soon(&self, key: ShadowKey) {
        if let Ok(mut d) = self.dirty.lock() {
            d.insert(key);
        }
        self.converge_now.notify_one();
    }

    /// The converger's last comparison with the cluster.
    pub fn convergence(&self) -> ConvergeReport {
        self.convergence
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_keeps_a_bounded_sample_and_counts_everything() {
        let mut r = ConvergeReport::default();
        for i in 0..(REPORT_SAMPLE + 5) {
            note_drift(
                &mut r.missing_count,
                &mut r.missing,
                Drift {
                    env: "int".into(),
                    name: format!("d-{i}"),
                    want: 1,
                    observed: None,
                    error: None,
                },
            );
        }
        assert_eq!(r.missing_count, REPORT_SAMPLE + 5);
        assert_eq!(r.missing.len(), REPORT_SAMPLE);
        assert_eq!(r.missing.first().map(|d| d.name.as_str()), Some("d-0"));
    }
}
