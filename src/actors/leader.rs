//! Leader election on an etcd lease (`/leader/controller`) and the fence every
//! leader-only write carries: the create revision of the leader key this replica won.
//! A leader whose keepalive fails steps down at once.
//!
//! Side effects outside etcd (cloud calls, Kubernetes patches, callbacks) cannot carry
//! the fence themselves, so they go through [`Fence::authorize`]: a fenced etcd write
//! that records the intent (`/leader-effects/{kind}`, the latest one of each kind, on
//! the leader lease, so the records neither accumulate nor outlive the leadership)
//! must succeed first. A deposed leader's write fails, so it never acts; and a leader
//! also stops believing it leads once its lease may have expired (the local deadline
//! of the last successful keepalive), so a process that was frozen past its TTL does not
//! act on what it thought before the freeze.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::keys;
use crate::ports::store::{Compare, Op, Store, StoreError, Txn, WatchEvent};

/// Whether this replica leads, and the epoch (leader key create revision) it won.
#[derive(Debug, Default)]
pub struct Fence {
    epoch: AtomicI64,
    lease: AtomicI64,
    /// Before this instant the leader lease certainly still exists in etcd (the time
    /// the last successful grant or keepalive was *sent*, plus the TTL it returned).
    deadline: Mutex<Option<Instant>>,
    leader: Mutex<Option<(String, DateTime<Utc>)>>,
    halted: AtomicBool,
}

/// Prefix of the records [`Fence::authorize`] writes (outside `/leader/controller`,
/// which the election watches as a prefix).
pub const EFFECTS_PREFIX: &str = "/leader-effects/";

/// Why a side effect may not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FenceError {
    /// This replica does not lead (or its lease may have expired).
    #[error("not the leader")]
    NotLeader,
    /// The fenced write was refused: another replica leads now.
    #[error("deposed: another replica leads")]
    Deposed,
    /// The store could not be asked; nothing may happen until it can.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Proof that the intent of one side effect was recorded by a fenced write under
/// `epoch`. Obtained only from [`Fence::authorize`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "a permit authorizes one side effect; act on it or drop the effect"]
pub struct Permit {
    /// The leadership epoch the intent was recorded under.
    pub epoch: i64,
    /// The etcd revision of the intent record.
    pub revision: i64,
}

#[derive(Serialize)]
struct EffectRecord<'a> {
    kind: &'a str,
    subject: &'a str,
    epoch: i64,
    #[serde(with = "crate::domain::time")]
    at: DateTime<Utc>,
}

impl Fence {
    /// The epoch while this replica leads: none once the lease may have expired, even
    /// if the election loop has not noticed yet (it was frozen, or etcd is slow).
    pub fn epoch(&self) -> Option<i64> {
        let e = self.epoch.load(Ordering::SeqCst);
        if e <= 0 {
            return None;
        }
        let expired = self
            .deadline
            .lock()
            .map(|d| d.is_some_and(|d| Instant::now() >= d))
            .unwrap_or(true);
        (!expired).then_some(e)
    }

    /// Whether this replica leads now (see [`Fence::epoch`]).
    pub fn is_leading(&self) -> bool {
        self.epoch().is_some()
    }

    /// The one gate in front of every side effect outside etcd: records the intent
    /// (`kind` on `subject`, e.g. `cloud_terminate` on an instance id) with a write
    /// fenced by the leader key and bound to the leader lease, and only if that write
    /// succeeded returns a permit. A refused write means another replica leads: this
    /// one forgets its leadership and must not act.
    pub async fn authorize(
        &self,
        store: &dyn Store,
        kind: &str,
        subject: &str,
    ) -> Result<Permit, FenceError> {
        let epoch = self.epoch().ok_or(FenceError::NotLeader)?;
        let lease = self.lease.load(Ordering::SeqCst);
        let record = EffectRecord {
            kind,
            subject,
            epoch,
            at: crate::clock::utc_now(),
        };
        let txn = Txn {
            compares: vec![Compare::CreateRevision(keys::LEADER.to_owned(), epoch)],
            success: vec![Op::Put {
                key: format!("{EFFECTS_PREFIX}{kind}"),
                value: serde_json::to_vec(&record).unwrap_or_default(),
                lease: (lease > 0).then_some(lease),
            }],
            failure_gets: Vec::new(),
        };
        let r = match store.txn(txn).await {
            Ok(r) => r,
            Err(StoreError::LeaseNotFound) => {
                self.lose_epoch(epoch);
                return Err(FenceError::Deposed);
            }
            Err(e) => return Err(e.into()),
        };
        if !r.succeeded {
            self.lose_epoch(epoch);
            warn!(kind, subject, epoch, "side effect refused: deposed");
            return Err(FenceError::Deposed);
        }
        // The write took time: act only if the lease is still certainly ours.
        if self.epoch() != Some(epoch) {
            return Err(FenceError::NotLeader);
        }
        debug!(
            kind,
            subject,
            epoch,
            revision = r.revision,
            "side effect authorized"
        );
        Ok(Permit {
            epoch,
            revision: r.revision,
        })
    }

    fn lose_epoch(&self, epoch: i64) {
        let _ = self
            .epoch
            .compare_exchange(epoch, 0, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// The guard to add to a leader-only transaction, or `None` when not leading.
    pub fn compare(&self) -> Option<Compare> {
        self.epoch()
            .map(|e| Compare::CreateRevision(keys::LEADER.to_owned(), e))
    }

    /// Forgets leadership (a fenced write failed or keepalive failed).
    pub fn lose(&self) {
        self.epoch.store(0, Ordering::SeqCst);
    }

    fn set(&self, epoch: i64, lease: i64, deadline: Instant) {
        self.extend(deadline);
        self.lease.store(lease, Ordering::SeqCst);
        self.epoch.store(epoch, Ordering::SeqCst);
    }

    fn extend(&self, deadline: Instant) {
        if let Ok(mut d) = self.deadline.lock() {
            *d = Some(deadline);
        }
    }

    fn clear(&self) {
        self.epoch.store(0, Ordering::SeqCst);
        self.lease.store(0, Ordering::SeqCst);
        if let Ok(mut d) = self.deadline.lock() {
            *d = None;
        }
    }

    /// Graceful step-down for shutdown: stops the election, forgets leadership and
    /// revokes the leader lease, which deletes the leader key so a successor is elected
    /// at once instead of after a full TTL. Returns whether a lease was revoked.
    pub async fn resign(&self, store: &dyn Store) -> bool {
        self.halt();
        let lease = self.lease.swap(0, Ordering::SeqCst);
        self.clear();
        if lease <= 0 {
            return false;
        }
        match store.revoke_lease(lease).await {
            Ok(()) => {
                info!(lease, "leader lease revoked on shutdown");
                true
            }
            Err(e) => {
                warn!(error = %e, "cannot revoke the leader lease; a successor waits for its TTL");
                false
            }
        }
    }

    fn seen_leader(&self, id: Option<String>) {
        if let Ok(mut l) = self.leader.lock() {
            *l = id.map(|i| (i, crate::clock::utc_now()));
        }
    }

    /// Test hook: the election stops at its next step without revoking its lease or
    /// touching the fence, as if the process froze or was cut off from etcd.
    pub fn halt(&self) {
        self.halted.store(true, Ordering::SeqCst);
    }

    fn is_halted(&self) -> bool {
        self.halted.load(Ordering::SeqCst)
    }

    /// The last known leader id and when it was seen.
    pub fn leader(&self) -> Option<(String, DateTime<Utc>)> {
        self.leader.lock().ok().and_then(|l| l.clone())
    }
}

/// The election status as shown by `GET /api/1.0/controller`.
#[derive(Debug, Clone, Serialize)]
pub struct LeaderStatus {
    /// This replica's id.
    pub instance_id: String,
    /// Whether this replica leads.
    pub is_leader: bool,
    /// The leader's id, if known.
    pub leader_id: Option<String>,
    /// The leader's epoch (create revision of the leader key) when this replica leads.
    pub epoch: Option<i64>,
}

/// Runs the election forever. `changes` receives `Some(epoch)` on winning and `None` on
/// stepping down.
pub async fn run_election(
    store: Arc<dyn Store>,
    fence: Arc<Fence>,
    instance_id: String,
    ttl: Duration,
    changes: watch::Sender<Option<i64>>,
) {
    let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(15).max(2);
    let tick = ttl / 3;
    loop {
        if fence.is_halted() {
            return;
        }
        let asked = Instant::now();
        match campaign(store.as_ref(), &instance_id, ttl_secs).await {
            Ok(Campaign::Won { lease, epoch }) => {
                if fence.is_halted() {
                    let _ = store.revoke_lease(lease).await;
                    return;
                }
                fence.set(epoch, lease, asked + ttl_of(ttl_secs));
                fence.seen_leader(Some(instance_id.clone()));
                info!(epoch, instance_id = %instance_id, "elected controller leader");
                let _ = changes.send(Some(epoch));
                loop {
                    tokio::time::sleep(tick).await;
                    if fence.is_halted() {
                        return;
                    }
                    let asked = Instant::now();
                    let alive = match store.keep_alive(lease).await {
                        Ok(left) if left > 0 => {
                            fence.extend(asked + ttl_of(left));
                            true
                        }
                        Ok(_) => false,
                        Err(e) => {
                            warn!(error = %e, "leader keepalive failed");
                            false
                        }
                    };
                    if !alive || fence.epoch() != Some(epoch) {
                        break;
                    }
                }
                fence.clear();
                fence.seen_leader(None);
                warn!(epoch, "stepped down as controller leader");
                let _ = changes.send(None);
                // Give the lease back if we still can, so a successor need not wait.
                let _ = store.revoke_lease(lease).await;
            }
            Ok(Campaign::Lost { leader, revision }) => {
                fence.seen_leader(leader);
                wait_for_vacancy(store.as_ref(), revision, ttl).await;
            }
            Err(e) => {
                warn!(error = %e, "election attempt failed");
                tokio::time::sleep(tick.min(Duration::from_secs(1))).await;
            }
        }
    }
}

fn ttl_of(secs: i64) -> Duration {
    Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}

enum Campaign {
    Won {
        lease: i64,
        epoch: i64,
    },
    Lost {
        leader: Option<String>,
        revision: i64,
    },
}

async fn campaign(store: &dyn Store, id: &str, ttl: i64) -> Result<Campaign, StoreError> {
    let lease = store.grant_lease(ttl).await?;
    let txn = Txn {
        compares: vec![Compare::CreateRevision(keys::LEADER.to_owned(), 0)],
        success: vec![Op::Put {
            key: keys::LEADER.to_owned(),
            value: id.as_bytes().to_vec(),
            lease: Some(lease),
        }],
        failure_gets: vec![keys::LEADER.to_owned()],
    };
    let r = store.txn(txn).await?;
    if r.succeeded {
        return Ok(Campaign::Won {
            lease,
            epoch: r.revision,
        });
    }
    let _ = store.revoke_lease(lease).await;
    let leader = r
        .fetched
        .into_iter()
        .next()
        .flatten()
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned());
    Ok(Campaign::Lost {
        leader,
        revision: r.revision,
    })
}

/// Returns when the leader key is deleted (or after `ttl`, to campaign again anyway).
async fn wait_for_vacancy(store: &dyn Store, revision: i64, ttl: Duration) {
    let Ok(mut rx) = store.watch(keys::LEADER, revision + 1).await else {
        tokio::time::sleep(Duration::from_millis(500)).await;
        return;
    };
    let wait = async {
        while let Some(item) = rx.recv().await {
            match item {
                Ok(events) => {
                    if events
                        .iter()
                        .any(|e| matches!(e, WatchEvent::Delete { key, .. } if key == keys::LEADER))
                    {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    };
    let _ = tokio::time::timeout(ttl, wait).await;
}

/// Calls `check` every `every`, forever (missed ticks are delayed, not bunched): the
/// watchdog loop of the leader-only actors.
pub async fn check_every(every: Duration, mut check: impl FnMut()) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        check();
    }
}

/// Follows election changes forever: `lead` on winning, `step_down` on losing (and when
/// the election ends).
pub async fn on_leadership(
    mut changes: watch::Receiver<Option<i64>>,
    lead: impl Fn(),
    step_down: impl Fn(),
) {
    loop {
        let current = *changes.borrow_and_update();
        match current {
            Some(_) => lead(),
            None => step_down(),
        }
        if changes.changed().await.is_err() {
            step_down();
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::memory::MemoryStore;

    /// Wins the election key directly, as `campaign` does; returns (lease, epoch).
    async fn win(store: &MemoryStore, id: &str) -> (i64, i64) {
        match campaign(store, id, 10).await {
            Ok(Campaign::Won { lease, epoch }) => (lease, epoch),
            _ => panic!("{id} did not win"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn authorize_records_the_intent_on_the_leader_lease() {
        let store = MemoryStore::new();
        let fence = Fence::default();
        let (lease, epoch) = win(&store, "a").await;
        fence.set(epoch, lease, Instant::now() + Duration::from_secs(10));

        let permit = fence
            .authorize(&store, "cloud_terminate", "i-1")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(permit.epoch, epoch);
        let kv = store
            .get("/leader-effects/cloud_terminate")
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("no intent record"));
        let rec: serde_json::Value = serde_json::from_slice(&kv.value).unwrap_or_default();
        assert_eq!(rec["epoch"], epoch);
        assert_eq!(rec["kind"], "cloud_terminate");
        assert_eq!(rec["subject"], "i-1");

        // The record lives and dies with the leadership.
        store
            .revoke_lease(lease)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(store.get("/leader-effects/cloud_terminate").await, Ok(None));
    }

    #[tokio::test(start_paused = true)]
    async fn a_deposed_leader_is_refused_and_forgets_its_epoch() {
        let store = MemoryStore::new();
        let old = Fence::default();
        let (lease, epoch) = win(&store, "a").await;
        old.set(epoch, lease, Instant::now() + Duration::from_secs(10));
        // Another replica takes the key (the old lease was lost behind our back).
        store
            .revoke_lease(lease)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let (_, new_epoch) = win(&store, "b").await;
        assert_ne!(new_epoch, epoch);
        assert_eq!(old.epoch(), Some(epoch), "the old leader still believes");

        let r = old.authorize(&store, "cloud_create", "w-1").await;
        assert_eq!(r, Err(FenceError::Deposed));
        assert_eq!(old.epoch(), None);
        assert_eq!(store.get("/leader-effects/cloud_create").await, Ok(None));
        // Once deposed, nothing is even attempted.
        let r = old.authorize(&store, "cloud_create", "w-1").await;
        assert_eq!(r, Err(FenceError::NotLeader));
    }

    #[tokio::test(start_paused = true)]
    async fn leadership_lapses_with_the_lease_deadline_even_before_etcd_says_so() {
        let store = MemoryStore::new();
        let fence = Fence::default();
        let (lease, epoch) = win(&store, "a").await;
        fence.set(epoch, lease, Instant::now() + Duration::from_secs(10));
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(fence.is_leading());
        // A process frozen past its deadline wakes up: no longer a leader, no permit.
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!fence.is_leading());
        assert_eq!(fence.compare(), None);
        let r = fence.authorize(&store, "callback", "r-1").await;
        assert_eq!(r, Err(FenceError::NotLeader));
    }

    #[tokio::test(start_paused = true)]
    async fn resign_revokes_the_lease_so_the_key_is_free_at_once() {
        let store = MemoryStore::new();
        let fence = Fence::default();
        let (lease, epoch) = win(&store, "a").await;
        fence.set(epoch, lease, Instant::now() + Duration::from_secs(10));

        assert!(fence.resign(&store).await);
        assert!(!fence.is_leading());
        assert_eq!(store.get(keys::LEADER).await, Ok(None));
        let (_, next) = win(&store, "b").await;
        assert!(next > epoch);
        // Nothing left to revoke.
        assert!(!fence.resign(&store).await);
    }
}
