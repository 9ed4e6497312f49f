//! The shadow deployable actor: owns one record and its `mod_revision`, serializes
//! every command through its mailbox, CAS-persists the domain's decision (record, in-use
//! index and idempotency record in one transaction) and only then applies and answers.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use actix::prelude::*;
use serde_json::json;
use tracing::{debug, debug_span, info, warn, Instrument, Span};

use crate::actors::stats::ActorStats;
use crate::domain::hold_index::HoldExpiries;
use crate::domain::shadow::{
    decide, Change, Context as DomainContext, Decision, ShadowCommand, ShadowDeployable,
    ShadowError, ShadowOutcome,
};
use crate::idempotency::{IdemError, IdemRequest, LeasePool, Reply};
use crate::keys;
use crate::ports::store::{Compare, Kv, Op, Store, StoreError, Txn};
use crate::telemetry::Metrics;

/// How often a command is re-evaluated after losing a CAS before giving up.
const MAX_ATTEMPTS: usize = 16;

/// Identity of a shadow deployable.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShadowKey {
    /// Environment (lowercase).
    pub env: String,
    /// Name.
    pub name: String,
}

impl ShadowKey {
    /// A key.
    pub fn new(env: &str, name: &str) -> Self {
        Self {
            env: env.to_owned(),
            name: name.to_owned(),
        }
    }
    fn record_key(&self) -> String {
        keys::shadow(&self.env, &self.name)
    }
    fn index_key(&self) -> String {
        keys::shadow_in_use(&self.env, &self.name)
    }
}

pub use crate::actors::view::{View, ViewEntry};

/// What every shadow actor needs.
pub struct Deps {
    /// The store.
    pub store: Arc<dyn Store>,
    /// Metrics.
    pub metrics: Metrics,
    /// Leases for idempotency records.
    pub leases: LeasePool,
    /// Seconds a losing PROCURE waits.
    pub retry_delay: u64,
    /// Published records.
    pub view: View,
    /// The leased holds of `view` by lease expiry, for the lease reaper (kept equal to
    /// `view` after every change of it; see [`Deps::resync_hold`]).
    pub holds: Mutex<HoldExpiries<ShadowKey>>,
    /// How long a caller waits for the actor's answer (`ACTOR_SEND_TIMEOUT_MS`).
    pub send_timeout: std::time::Duration,
}

impl Deps {
    /// Makes the hold index agree with `view`'s current record of `key`. The view is
    /// read while the index is locked, so whichever of two concurrent changes resyncs
    /// last leaves the index equal to the view.
    pub fn resync_hold(&self, key: &ShadowKey) {
        let Ok(mut holds) = self.holds.lock() else {
            return;
        };
        let current = self.view.get(key);
        holds.sync(key, current.as_ref().map(|e| &e.record));
    }
}

/// What the actor knows of its record.
// One cell per actor, almost always `Known`: boxing the record would add an indirection to
// every command for no memory saved.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cell {
    /// Not loaded (fresh, after a restart, or after an ambiguous store failure).
    Unknown,
    /// Loaded at `mod_revision` (0 and `None` when the record does not exist).
    Known {
        /// The record, if it exists.
        record: Option<ShadowDeployable>,
        /// Its `mod_revision`.
        mod_revision: i64,
    },
}

/// Why a command produced no reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExecError {
    /// The domain refused it.
    #[error(transparent)]
    Domain(#[from] ShadowError),
    /// The store failed; nothing was applied in memory.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The idempotency key was used for another request, or its record is unreadable.
    #[error(transparent)]
    Idempotency(#[from] IdemError),
    /// Lost the CAS too many times in a row.
    #[error("too much contention on this shadow deployable; retry")]
    Contention,
    /// The stored record could not be decoded.
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
    /// The actor panicked while handling the command and was restarted.
    #[error("internal error while handling the command")]
    Panicked,
    /// The actor's mailbox is gone (it died; the next request gets a fresh actor).
    #[error("actor unavailable")]
    Mailbox,
    /// The actor did not answer within the send deadline. The command may still run
    /// later: retry with the same idempotency key to learn its outcome.
    #[error("actor busy: no answer within the deadline")]
    Busy,
    /// A leader-only write (the lease reaper's) was refused by the leader fence: this
    /// replica no longer leads. Nothing was written.
    #[error("not the leader")]
    Fenced,
}

/// Runs a command.
#[derive(Message)]
#[rtype(result = "Result<Reply, ExecError>")]
pub struct Execute {
    /// The command.
    pub cmd: ShadowCommand,
    /// Idempotency key, if the request had one.
    pub idem: Option<IdemRequest>,
    /// The request's span, so the actor's logs carry its request id.
    pub span: Span,
    /// The leader guard a leader-only command's write must also satisfy
    /// ([`crate::actors::leader::Fence::compare`]); `None` for client commands.
    pub fence: Option<Compare>,
    /// Whether a PROCURED answer names the deployable (a procure by pool, whose caller
    /// does not know which one it got; the stored idempotent reply keeps the name).
    pub answer_name: bool,
}

/// A change seen by the replica's watch (or its hydration).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Observe {
    /// The new value, or `None` when deleted.
    pub kv: Option<Kv>,
    /// Revision of the change.
    pub mod_revision: i64,
}

/// The actor.
pub struct ShadowActor {
    key: ShadowKey,
    cell: Cell,
    deps: Arc<Deps>,
    stats: Arc<ActorStats>,
}

impl ShadowActor {
    /// An actor starting from `cell`.
    pub fn new(key: ShadowKey, cell: Cell, deps: Arc<Deps>, stats: Arc<ActorStats>) -> Self {
        Self {
            key,
            cell,
            deps,
            stats,
        }
    }

    fn apply(&mut self, cell: Cell) {
        publish(&self.deps, &self.key, &cell);
        self.cell = cell;
    }
}

/// Publishes what `cell` knows of `key` to the view (and the hold index), unless the
/// view has it already.
pub fn publish(deps: &Deps, key: &ShadowKey, cell: &Cell) {
    let view = &deps.view;
    match cell {
        Cell::Known {
            record: Some(record),
            mod_revision,
        } => {
            if view.is_current(key, *mod_revision) {
                // Published already (by the watch, or the entry it was started from).
                return;
            }
            // Serialized here, once per change, so lists only concatenate.
            view.insert(key, ViewEntry::new(record.clone(), *mod_revision));
        }
        Cell::Known { record: None, .. } => {
            view.remove(key);
        }
        Cell::Unknown => return,
    }
    deps.resync_hold(key);
}

impl Actor for ShadowActor {
    type Context = Context<Self>;

    fn started(&mut self, _ctx: &mut Self::Context) {
        publish(&self.deps, &self.key, &self.cell);
    }
}

impl Supervised for ShadowActor {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        // Whatever was in memory may be inconsistent; reload from the store.
        self.cell = Cell::Unknown;
        self.stats.restarted();
        warn!(env = %self.key.env, name = %self.key.name, "shadow actor restarted");
    }
}

impl Handler<Execute> for ShadowActor {
    type Result = AtomicResponse<Self, Result<Reply, ExecError>>;

    fn handle(&mut self, msg: Execute, _ctx: &mut Self::Context) -> Self::Result {
        self.stats.dequeued();
        let work = execute(
            self.deps.clone(),
            self.key.clone(),
            self.cell.clone(),
            msg.cmd,
            msg.idem,
            msg.fence,
            msg.answer_name,
        )
        .instrument(msg.span);
        AtomicResponse::new(Box::pin(work.into_actor(self).map(
            |(result, cell), act, ctx| {
                if result == Err(ExecError::Panicked) {
                    ctx.stop();
                    return result;
                }
                if let (Ok(reply), Cell::Known { .. }) = (&result, &cell) {
                    if !reply.replayed && cell != act.cell {
                        act.stats.transitioned(crate::clock::utc_now());
                    }
                }
                act.apply(cell);
                result
            },
        )))
    }
}

impl Handler<Observe> for ShadowActor {
    type Result = ();

    fn handle(&mut self, msg: Observe, _ctx: &mut Self::Context) {
        self.stats.dequeued();
        if let Cell::Known { mod_revision, .. } = &self.cell {
            if *mod_revision >= msg.mod_revision {
                return;
            }
        }
        match decode(msg.kv.as_ref()) {
            Ok((record, _)) => self.apply(Cell::Known {
                record,
                mod_revision: msg.mod_revision,
            }),
            Err(e) => {
                warn!(env = %self.key.env, name = %self.key.name, error = %e, "ignoring undecodable record");
                self.cell = Cell::Unknown;
            }
        }
    }
}

/// Decodes a stored record.
pub fn decode(kv: Option<&Kv>) -> Result<(Option<ShadowDeployable>, i64), ExecError> {
    match kv {
        None => Ok((None, 0)),
        Some(kv) => serde_json::from_slice(&kv.value)
            .map(|r| (Some(r), kv.mod_revision))
            .map_err(|e| ExecError::Corrupt(e.to_string())),
    }
}

/// The answer for an outcome: HTTP status and exact JSON body. `answer_name`: a
/// PROCURED answer also names the deployable (procure by pool).
pub fn render(outcome: &ShadowOutcome, name: &str, answer_name: bool) -> Reply {
    let (status, body) = match outcome {
        ShadowOutcome::Procured if answer_name => {
            (200, json!({"status": "PROCURED", "name": name}))
        }
        ShadowOutcome::Procured => (200, json!({"status": "PROCURED"})),
        ShadowOutcome::Failed { delay } => (200, json!({"status": "FAILED", "delay": delay})),
        ShadowOutcome::Released => (200, json!({"status": "RELEASED"})),
        ShadowOutcome::Renewed {
            lease_expires_at,
            version,
        } => (
            200,
            json!({"status": "RENEWED", "lease_expires_at": crate::domain::time::format(lease_expires_at), "version": version}),
        ),
        // The reaper's answers; no HTTP client sees them.
        ShadowOutcome::Reaped {
            run_id,
            lease_expired_at,
        } => (
            200,
            json!({"status": REAPED, "workflow_run_id": run_id, "lease_expired_at": lease_expired_at}),
        ),
        ShadowOutcome::NotExpired => (200, json!({"status": "NOT_EXPIRED"})),
        ShadowOutcome::Updated { min_pod_count } => (
            200,
            json!({"status": "UPDATED", "min_pod_count": min_pod_count}),
        ),
        ShadowOutcome::Registered { created } => (
            if *created { 201 } else { 200 },
            json!({"status": if *created { "CREATED" } else { "UPDATED" }, "name": name}),
        ),
        ShadowOutcome::Deleted => (200, json!({"status": "DELETED", "name": name})),
    };
    Reply {
        status,
        body: body.to_string(),
        replayed: false,
    }
}

async fn load(store: &dyn Store, key: &ShadowKey) -> Result<Cell, ExecError> {
    let kv = store.get(&key.record_key()).await?;
    let (record, mod_revision) = decode(kv.as_ref())?;
    Ok(Cell::Known {
        record,
        mod_revision,
    })
}

/// The stored reply of `idem`'s request, if one was stored.
pub async fn replay_if_stored(
    store: &dyn Store,
    idem: Option<&IdemRequest>,
) -> Result<Option<Reply>, ExecError> {
    let Some(idem) = idem else { return Ok(None) };
    match store.get(&idem.store_key).await? {
        Some(kv) => Ok(Some(idem.replay(&kv.value)?)),
        None => Ok(None),
    }
}

/// `status` of the reaper's answer when it released an expired hold.
pub const REAPED: &str = "REAPED";

/// Runs one command to completion: decide, persist, re-evaluate on a lost CAS.
/// Returns the answer and what the actor should now know. With `fence`, the write is
/// also conditional on the leader key: a refusal by the fence alone is
/// [`ExecError::Fenced`].
pub async fn execute(
    deps: Arc<Deps>,
    key: ShadowKey,
    mut cell: Cell,
    cmd: ShadowCommand,
    idem: Option<IdemRequest>,
    fence: Option<Compare>,
    answer_name: bool,
) -> (Result<Reply, ExecError>, Cell) {
    let kind = cmd.kind();
    let count = |result: &str| {
        deps.metrics
            .transitions
            .with_label_values(&["shadow-deployable", kind, result])
            .inc();
    };
    // Whether `cell` was read from the store during this command (then it is current as
    // of that read, not merely as fresh as this replica's watch).
    let mut fresh = false;
    for _ in 0..MAX_ATTEMPTS {
        if cell == Cell::Unknown {
            cell = match load(deps.store.as_ref(), &key).await {
                Ok(c) => c,
                Err(e) => return (Err(e), Cell::Unknown),
            };
            fresh = true;
        }
        let Cell::Known {
            record,
            mod_revision,
        } = &cell
        else {
            continue;
        };
        let ctx = DomainContext {
            now: crate::clock::utc_now(),
            retry_delay: deps.retry_delay,
        };
        let decided = debug_span!("shadow.decide", command = kind).in_scope(|| {
            std::panic::catch_unwind(AssertUnwindSafe(|| decide(record.as_ref(), &cmd, ctx)))
        });
        let decision = match decided {
            Err(_) => {
                count("panic");
                return (Err(ExecError::Panicked), Cell::Unknown);
            }
            Ok(Ok(d)) if d.change != Change::None => d,
            Ok(_) if !fresh => {
                // Nothing to write, decided on the cached copy, which another replica
                // may have changed since (our watch lags). A refusal or "already so"
                // must hold against the store: read it, and decide again if it moved.
                cell = match load(deps.store.as_ref(), &key).await {
                    Ok(c) => c,
                    Err(e) => return (Err(e), Cell::Unknown),
                };
                fresh = true;
                continue;
            }
            Ok(other) => {
                // Nothing to write: a retry of an earlier request must still get the
                // stored answer, so look for it before answering from current state.
                let stored = replay_if_stored(deps.store.as_ref(), idem.as_ref()).await;
                let result = match stored {
                    Ok(Some(reply)) => Ok(reply),
                    Ok(None) => other
                        .map(|d| render(&d.outcome, &key.name, answer_name))
                        .map_err(ExecError::from),
                    Err(e) => Err(e),
                };
                count(if result.is_ok() {
                    "unchanged"
                } else {
                    "rejected"
                });
                return (result, cell);
            }
        };
        let Decision { change, outcome } = decision;
        let reply = render(&outcome, &key.name, answer_name);
        let lease = match &idem {
            Some(_) => match deps.leases.lease(deps.store.as_ref()).await {
                Ok(l) => Some(l),
                Err(e) => return (Err(e.into()), cell),
            },
            None => None,
        };
        let was_in_use = record.as_ref().map(ShadowDeployable::in_use);
        let mut txn = build_txn(
            &key,
            (*mod_revision, was_in_use),
            &change,
            idem.as_ref(),
            &reply,
            lease,
        );
        txn.compares.extend(fence.clone());
        let decided_at = *mod_revision;
        let commit = debug_span!("shadow.commit", command = kind);
        match deps.store.txn(txn).instrument(commit).await {
            Ok(r) if r.succeeded => {
                count("applied");
                debug!(env = %key.env, name = %key.name, command = kind, revision = r.revision, "transition persisted");
                if let ShadowOutcome::Reaped {
                    run_id,
                    lease_expired_at,
                } = &outcome
                {
                    deps.metrics.leases_reaped.inc();
                    info!(env = %key.env, name = %key.name, workflow_run_id = %run_id, %lease_expired_at, revision = r.revision, "hold lease expired; released the shadow deployable");
                }
                let record = match change {
                    Change::Put(rec) => Some(rec),
                    _ => None,
                };
                let mod_revision = if record.is_some() { r.revision } else { 0 };
                return (
                    Ok(reply),
                    Cell::Known {
                        record,
                        mod_revision,
                    },
                );
            }
            Ok(r) => {
                deps.metrics
                    .cas_conflicts
                    .with_label_values(&["shadow-deployable"])
                    .inc();
                let mut fetched = r.fetched.into_iter();
                let current = fetched.next().flatten();
                let moved = current.as_ref().map_or(0, |kv| kv.mod_revision) != decided_at;
                if fence.is_some() && !moved && idem.is_none() {
                    // The record is as decided on: the leader guard failed.
                    count("fenced");
                    return (Err(ExecError::Fenced), cell);
                }
                fresh = true;
                cell = match decode(current.as_ref()) {
                    Ok((record, mod_revision)) => Cell::Known {
                        record,
                        mod_revision,
                    },
                    Err(e) => return (Err(e), Cell::Unknown),
                };
                if let (Some(idem), Some(Some(stored))) = (&idem, fetched.next()) {
                    count("replayed");
                    return (idem.replay(&stored.value).map_err(Into::into), cell);
                }
            }
            Err(StoreError::LeaseNotFound) => deps.leases.invalidate(),
            Err(e) => {
                count("store_error");
                // The write may or may not have landed: forget what we knew.
                return (Err(e.into()), Cell::Unknown);
            }
        }
    }
    count("contention");
    (Err(ExecError::Contention), cell)
}

/// The CAS of `change` on `key`'s record as decided at `(mod_revision, was_in_use)`
/// (`was_in_use`: the decided-on record's, `None` when there was none). The in-use index
/// is written with the record when its value changes (or may be missing), not again
/// for a change that keeps it (a min pod count, a renewal): same outcome, one op less.
fn build_txn(
    key: &ShadowKey,
    (mod_revision, was_in_use): (i64, Option<bool>),
    change: &Change,
    idem: Option<&IdemRequest>,
    reply: &Reply,
    lease: Option<i64>,
) -> Txn {
    let record_key = key.record_key();
    let mut txn = Txn {
        compares: vec![Compare::ModRevision(record_key.clone(), mod_revision)],
        success: Vec::with_capacity(3),
        failure_gets: vec![record_key.clone()],
    };
    match change {
        Change::Put(rec) => {
            txn.success.push(Op::Put {
                key: record_key,
                value: serde_json::to_vec(rec).unwrap_or_default(),
                lease: None,
            });
            if was_in_use != Some(rec.in_use()) {
                txn.success.push(Op::Put {
                    key: key.index_key(),
                    value: if rec.in_use() {
                        b"true".to_vec()
                    } else {
                        b"false".to_vec()
                    },
                    lease: None,
                });
            }
        }
        Change::Delete => {
            txn.success.push(Op::Delete { key: record_key });
            txn.success.push(Op::Delete {
                key: key.index_key(),
            });
        }
        Change::None => {}
    }
    if let Some(idem) = idem {
        txn.compares
            .push(Compare::ModRevision(idem.store_key.clone(), 0));
        txn.success.push(Op::Put {
            key: idem.store_key.clone(),
            value: idem.record(reply, crate::clock::utc_now()),
            lease,
        });
        txn.failure_gets.push(idem.store_key.clone());
    }
    txn
}
