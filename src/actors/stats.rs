//! Per-actor counters shared with the introspection endpoint.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::Serialize;

/// Live counters of one actor.
#[derive(Debug, Default)]
pub struct ActorStats {
    mailbox: AtomicI64,
    restarts: AtomicU64,
    last_transition: Mutex<Option<DateTime<Utc>>>,
}

impl ActorStats {
    /// A message was sent to the actor.
    pub fn enqueued(&self) {
        self.mailbox.fetch_add(1, Ordering::Relaxed);
    }
    /// The actor picked a message up.
    pub fn dequeued(&self) {
        self.mailbox.fetch_sub(1, Ordering::Relaxed);
    }
    /// The actor was restarted by its supervisor.
    pub fn restarted(&self) {
        self.restarts.fetch_add(1, Ordering::Relaxed);
    }
    /// The actor died with messages in its mailbox and a fresh one replaced it: those
    /// messages are gone, so the depth starts again from zero.
    pub fn replaced(&self) {
        self.restarts.fetch_add(1, Ordering::Relaxed);
        self.mailbox.store(0, Ordering::Relaxed);
    }
    /// The actor persisted a transition.
    pub fn transitioned(&self, at: DateTime<Utc>) {
        if let Ok(mut t) = self.last_transition.lock() {
            *t = Some(at);
        }
    }
    /// Messages waiting in (or being handled by) the mailbox.
    pub fn mailbox_depth(&self) -> i64 {
        self.mailbox.load(Ordering::Relaxed).max(0)
    }
    /// Supervisor restarts so far.
    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }
    /// Time of the last persisted transition.
    pub fn last_transition(&self) -> Option<DateTime<Utc>> {
        self.last_transition.lock().ok().and_then(|t| *t)
    }
}

/// One actor as shown by `GET /api/1.0/actors`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ActorInfo {
    /// Entity kind, e.g. `shadow-deployable`.
    pub kind: &'static str,
    /// Entity id, e.g. `int/predator-1`.
    pub id: String,
    /// Current state (`UNKNOWN` until loaded; an actor whose record is deleted is
    /// removed, so `ABSENT` shows only in the moment between the two).
    pub state: String,
    /// Entity version.
    pub version: Option<u64>,
    /// etcd `mod_revision` of the entity's record.
    pub mod_revision: Option<i64>,
    /// Whether the actor is running. A shadow deployable's actor starts on its first
    /// command (until then the view answers reads and the watch keeps it current);
    /// a worker's runs from hydration on.
    pub active: bool,
    /// Messages waiting.
    pub mailbox_depth: i64,
    /// Supervisor restarts.
    pub restarts: u64,
    /// Last persisted transition.
    #[serde(with = "crate::domain::time::option")]
    pub last_transition_at: Option<DateTime<Utc>>,
}
