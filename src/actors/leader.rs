//! Leader election on an etcd lease (`/leader/controller`) and the fence every
//! leader-only write carries: the create revision of the leader key this replica won.
//! A leader whose keepalive fails steps down at once.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::keys;
use crate::ports::store::{Compare, Op, Store, StoreError, Txn, WatchEvent};

/// Whether this replica leads, and the epoch (leader key create revision) it won.
#[derive(Debug, Default)]
pub struct Fence {
    epoch: AtomicI64,
    leader: Mutex<Option<(String, DateTime<Utc>)>>,
    halted: AtomicBool,
}

impl Fence {
    /// The epoch while this replica leads.
    pub fn epoch(&self) -> Option<i64> {
        let e = self.epoch.load(Ordering::SeqCst);
        (e > 0).then_some(e)
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

    fn set(&self, epoch: i64) {
        self.epoch.store(epoch, Ordering::SeqCst);
    }

    fn seen_leader(&self, id: Option<String>) {
        if let Ok(mut l) = self.leader.lock() {
            *l = id.map(|i| (i, Utc::now()));
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
        match campaign(store.as_ref(), &instance_id, ttl_secs).await {
            Ok(Campaign::Won { lease, epoch }) => {
                fence.set(epoch);
                fence.seen_leader(Some(instance_id.clone()));
                info!(epoch, instance_id = %instance_id, "elected controller leader");
                let _ = changes.send(Some(epoch));
                loop {
                    tokio::time::sleep(tick).await;
                    if fence.is_halted() {
                        return;
                    }
                    let alive = match store.keep_alive(lease).await {
                        Ok(left) => left > 0,
                        Err(e) => {
                            warn!(error = %e, "leader keepalive failed");
                            false
                        }
                    };
                    if !alive || fence.epoch() != Some(epoch) {
                        break;
                    }
                }
                fence.lose();
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
