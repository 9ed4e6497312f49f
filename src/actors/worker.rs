//! The worker actor: owns one worker record and its `mod_revision`, serializes every
//! change through its mailbox, and CAS-persists it (with the instances it places,
//! starts or releases, and the request's idempotency record, in the same transaction;
//! fenced by the leader key for leader-only work) before it takes effect. Also the
//! registry that finds, spawns and feeds worker actors.
//!
//! Decisions that depend on the worker's instances (drains, heartbeats) are made here,
//! on the records of the instances the worker lists as read for this attempt, and the
//! transaction compares the worker's revision (which every placement changes) and those
//! instances' revisions: a placement or instance change in between fails the compare
//! and the decision is made again on fresh data.

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use actix::prelude::*;
use chrono::{DateTime, Utc};
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use serde_json::json;
use tracing::{debug, debug_span, warn, Instrument, Span};

use crate::actors::follow::Follower;
use crate::actors::leader::Fence;
use crate::actors::stats::{ActorInfo, ActorStats};
use crate::clock::Clock;
use crate::domain::schedule_index::WorkerIndex;
use crate::domain::worker::{
    instance_transition, place, plan_heartbeat, start_drain, start_idle_drain, transition, unplace,
    Instance, InstanceState, Resources, Worker, WorkerError, WorkerState,
};
use crate::idempotency::{IdemError, IdemWrite, LeasePool, Reply};
use crate::keys;
use crate::ports::store::{Compare, Kv, Op, Store, StoreError, Txn, WatchEvent};
use crate::telemetry::Metrics;

/// Kind label of worker actors.
pub const WORKER_KIND: &str = "worker";
const MAX_ATTEMPTS: usize = 16;
/// Most instance records one transaction compares or writes. etcd allows 128
/// operations in each list of a transaction; the worker, the leader fence and an
/// idempotency record take three. A heartbeat with more changes is applied in
/// consecutive transactions of at most this many instances each (see
/// [`WorkerCmd::Heartbeat`]).
pub const MAX_INSTANCE_OPS: usize = 100;
/// Most consecutive heartbeat transactions of one command.
const MAX_CHUNKS: usize = 64;

/// A change to a worker.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerCmd {
    /// Create the record (PENDING).
    Create(Worker),
    /// Move to another state, recording the cloud instance id when given.
    Transition {
        /// Target state.
        to: WorkerState,
        /// Cloud instance id learnt with this change.
        cloud_instance_id: Option<String>,
    },
    /// Record the cloud instance id.
    SetCloudId(String),
    /// Place an instance (PENDING -> SCHEDULED), both records in one transaction.
    Place {
        /// The instance as last seen.
        instance: Instance,
        /// Its `mod_revision`.
        instance_rev: i64,
    },
    /// Remove an instance, writing its new record in the same transaction when given.
    Unplace {
        /// Instance id.
        instance_id: String,
        /// Its requirements (to release the allocation).
        requirements: Resources,
        /// The instance's new record and the revision it was read at.
        instance: Option<(Instance, i64)>,
        /// Idempotency record to write with it (answer: the instance's new record).
        idem: Option<IdemWrite>,
    },
    /// Start draining. Decided in the actor against the worker's instances as read for
    /// the attempt (never a caller's list); voluntary drains respect `do_not_disrupt`.
    Drain {
        /// When the drain gives up waiting (`None`: it waits for the instances).
        deadline: Option<DateTime<Utc>>,
        /// Voluntary drains respect `do_not_disrupt`.
        voluntary: bool,
        /// Scale-down: drain only while the worker is still empty and idle since this
        /// time or earlier.
        idle_cutoff: Option<DateTime<Utc>>,
        /// Idempotency record to write with it (answer: 202 and the worker).
        idem: Option<IdemWrite>,
    },
    /// A heartbeat from the host: the heartbeat time, the SCHEDULED instances it runs
    /// (now RUNNING) and the RUNNING ones it no longer runs (now COMPLETED, released),
    /// in one transaction. When more than [`MAX_INSTANCE_OPS`] instances change, the
    /// changes go in consecutive transactions, each a consistent step (the worker and
    /// the instances it changes together); stopped half-way, the next heartbeat
    /// continues from what was written.
    Heartbeat {
        /// When it arrived.
        at: DateTime<Utc>,
        /// Instances the host runs now.
        running: Vec<String>,
        /// Instance records the caller already knows (compared, so stale ones only cost
        /// a retry).
        known: Vec<(Instance, i64)>,
        /// Idempotency record to write with the last transaction.
        idem: Option<IdemWrite>,
    },
}

/// What a successful command left behind.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerOutcome {
    /// The worker now.
    pub worker: Worker,
    /// The instance written with it, and its new revision.
    pub instance: Option<(Instance, i64)>,
    /// Every instance written, with its new revision.
    pub written: Vec<(Instance, i64)>,
    /// The answer to the request (stored with the change when it had an idempotency
    /// key; `replayed` when it is the stored answer of an earlier request).
    pub reply: Reply,
}

/// Why a worker command failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WorkerExecError {
    /// The state machine refused it.
    #[error(transparent)]
    Domain(#[from] WorkerError),
    /// No such worker.
    #[error("worker not found")]
    NotFound,
    /// Creating a worker that exists.
    #[error("worker already exists")]
    Exists,
    /// The instance changed since it was read; here is its current value.
    #[error("instance changed concurrently")]
    InstanceChanged(Option<(Instance, i64)>),
    /// This replica is no longer the leader.
    #[error("not the leader")]
    Fenced,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored record is unreadable.
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
    /// Lost the CAS too often.
    #[error("too much contention on this worker")]
    Contention,
    /// The actor did not answer within the send deadline (the command may still run).
    #[error("worker actor busy: no answer within the deadline")]
    Busy,
    /// The actor is gone or panicked.
    #[error("worker actor unavailable")]
    Mailbox,
    /// The idempotency key answered another request (or its record is unreadable).
    #[error(transparent)]
    Idempotency(#[from] IdemError),
}

/// Runs a command.
#[derive(Message)]
#[rtype(result = "Result<WorkerOutcome, WorkerExecError>")]
pub struct WorkerMsg {
    /// The command.
    pub cmd: WorkerCmd,
    /// Leader-only: guard the write with the leader fence.
    pub fenced: bool,
    /// The sender's span, so the command's spans and logs sit under it across the
    /// mailbox hop.
    pub span: Span,
}

/// A change seen by the watch.
#[derive(Message)]
#[rtype(result = "()")]
struct ObserveWorker {
    kv: Option<Kv>,
    mod_revision: i64,
}

/// What every worker actor needs.
pub struct WorkerDeps {
    /// Store.
    pub store: Arc<dyn Store>,
    /// Metrics.
    pub metrics: Metrics,
    /// Leader fence.
    pub fence: Arc<Fence>,
    /// Published workers with their revisions.
    pub view: DashMap<String, (Worker, i64)>,
    /// Free capacity of the RUNNING workers in `view` (the scheduler's best fit) and the
    /// workers in motion (the autoscaler's cloud poll), kept equal to `view` after every
    /// change of it (see [`WorkerDeps::resync`]).
    pub index: Mutex<WorkerIndex>,
    /// Time source.
    pub clock: Clock,
    /// Lease for ended records (TERMINATED workers, ended instances), so etcd drops
    /// them after `RECORD_RETENTION_SECONDS`.
    pub retention: LeasePool,
    /// How long a caller waits for a worker actor's answer (`ACTOR_SEND_TIMEOUT_MS`).
    pub send_timeout: std::time::Duration,
}

impl WorkerDeps {
    /// Makes the capacity index agree with `view`'s current record of `id`. The view is
    /// read while the index is locked, so whichever of two concurrent changes resyncs
    /// last leaves the index equal to the view (order-independent).
    fn resync(&self, id: &str) {
        let Ok(mut ix) = self.index.lock() else {
            return;
        };
        let current = self.view.get(id);
        ix.sync(id, current.as_ref().map(|e| &e.value().0));
    }

    /// The RUNNING worker with room for `req` that best fits it (see
    /// [`crate::domain::controller::best_fit`]), from the capacity index.
    pub fn best_fit(&self, req: &Resources) -> Option<String> {
        self.index
            .lock()
            .ok()
            .and_then(|ix| ix.capacity.best_fit(req).map(str::to_owned))
    }

    /// [`crate::domain::schedule_index::CapacityIndex::room`] now.
    pub fn room(&self) -> u64 {
        self.index
            .lock()
            .map(|ix| ix.capacity.room())
            .unwrap_or_default()
    }

    /// Ids of the workers the autoscaler drives with the cloud (not RUNNING, not
    /// TERMINATED), sorted.
    pub fn moving(&self) -> Vec<String> {
        self.index.lock().map(|ix| ix.moving()).unwrap_or_default()
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Cell {
    Unknown,
    Known(Option<Worker>, i64),
}

/// The worker actor.
pub struct WorkerActor {
    id: String,
    cell: Cell,
    deps: Arc<WorkerDeps>,
    stats: Arc<ActorStats>,
}

impl WorkerActor {
    fn apply(&mut self, cell: Cell) {
        match &cell {
            Cell::Known(Some(w), rev) => {
                self.deps.view.insert(self.id.clone(), (w.clone(), *rev));
                self.deps.resync(&self.id);
            }
            Cell::Known(None, _) => {
                self.deps.view.remove(&self.id);
                self.deps.resync(&self.id);
            }
            Cell::Unknown => {}
        }
        self.cell = cell;
    }
}

impl Actor for WorkerActor {
    type Context = Context<Self>;

    fn started(&mut self, _ctx: &mut Self::Context) {
        let cell = self.cell.clone();
        self.apply(cell);
    }
}

impl Supervised for WorkerActor {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        self.cell = Cell::Unknown;
        self.stats.restarted();
        warn!(worker = %self.id, "worker actor restarted");
    }
}

impl Handler<WorkerMsg> for WorkerActor {
    type Result = AtomicResponse<Self, Result<WorkerOutcome, WorkerExecError>>;

    fn handle(&mut self, msg: WorkerMsg, _ctx: &mut Self::Context) -> Self::Result {
        self.stats.dequeued();
        let work = execute(
            self.deps.clone(),
            self.id.clone(),
            self.cell.clone(),
            msg.cmd,
            msg.fenced,
        )
        .instrument(msg.span);
        AtomicResponse::new(Box::pin(work.into_actor(self).map(
            |(result, cell), act, ctx| {
                if result == Err(WorkerExecError::Mailbox) {
                    ctx.stop();
                    return result;
                }
                if result.is_ok() && cell != act.cell {
                    act.stats.transitioned(act.deps.clock.now());
                }
                act.apply(cell);
                result
            },
        )))
    }
}

impl Handler<ObserveWorker> for WorkerActor {
    type Result = ();

    fn handle(&mut self, msg: ObserveWorker, _ctx: &mut Self::Context) {
        self.stats.dequeued();
        if let Cell::Known(_, rev) = &self.cell {
            if *rev >= msg.mod_revision {
                return;
            }
        }
        match decode_worker(msg.kv.as_ref()) {
            Ok((w, _)) => self.apply(Cell::Known(w, msg.mod_revision)),
            Err(_) => self.cell = Cell::Unknown,
        }
    }
}

fn decode_worker(kv: Option<&Kv>) -> Result<(Option<Worker>, i64), WorkerExecError> {
    match kv {
        None => Ok((None, 0)),
        Some(kv) => serde_json::from_slice(&kv.value)
            .map(|w| (Some(w), kv.mod_revision))
            .map_err(|e| WorkerExecError::Corrupt(e.to_string())),
    }
}

fn decode_instance(kv: Option<&Kv>) -> Option<(Instance, i64)> {
    let kv = kv?;
    serde_json::from_slice(&kv.value)
        .ok()
        .map(|i| (i, kv.mod_revision))
}

/// Instance records as read for one attempt: id -> (record, `mod_revision`; 0 = absent).
type Insts = HashMap<String, (Option<Instance>, i64)>;

/// A change a command leads to.
#[derive(Debug, Clone, PartialEq)]
struct Decision {
    worker: Worker,
    /// Instance records to write.
    writes: Vec<Instance>,
    /// Instance revisions the write depends on (besides the worker's).
    compares: Vec<(String, i64)>,
    /// Heartbeat: started, completed, unknown ids.
    beat: Option<(Vec<String>, Vec<String>, Vec<String>)>,
    /// Heartbeat: more changes are due after this one.
    more: bool,
}

impl Decision {
    fn of(worker: Worker) -> Self {
        Self {
            worker,
            writes: Vec::new(),
            compares: Vec::new(),
            beat: None,
            more: false,
        }
    }
}

/// The records of the instances `w` lists (absent ones skipped).
fn listed(w: &Worker, insts: &Insts) -> Vec<Instance> {
    w.instances
        .iter()
        .filter_map(|id| insts.get(id).and_then(|(i, _)| i.clone()))
        .collect()
}

/// The pure part: the change a command leads to; `None` = no change.
fn decide(
    current: Option<&Worker>,
    cmd: &WorkerCmd,
    now: DateTime<Utc>,
    insts: &Insts,
) -> Result<Option<Decision>, WorkerExecError> {
    if let WorkerCmd::Create(w) = cmd {
        return match current {
            None => Ok(Some(Decision::of(w.clone()))),
            Some(_) => Err(WorkerExecError::Exists),
        };
    }
    let w = current.ok_or(WorkerExecError::NotFound)?;
    let d = match cmd {
        WorkerCmd::Create(_) => return Err(WorkerExecError::Exists),
        WorkerCmd::Transition {
            to,
            cloud_instance_id,
        } => {
            let mut next = if w.state == *to {
                w.clone()
            } else {
                transition(w, *to, now)?
            };
            if cloud_instance_id.is_some() {
                next.cloud_instance_id.clone_from(cloud_instance_id);
            }
            Decision::of(next)
        }
        WorkerCmd::SetCloudId(id) => {
            let mut next = w.clone();
            next.cloud_instance_id = Some(id.clone());
            Decision::of(next)
        }
        WorkerCmd::Place {
            instance,
            instance_rev,
        } => {
            if w.instances.contains(&instance.id) {
                return Ok(None);
            }
            if instance.state != InstanceState::Pending {
                return Err(WorkerExecError::InstanceChanged(None));
            }
            let next = place(w, instance, now)?;
            let inst = instance_transition(instance, InstanceState::Scheduled, Some(w.id.clone()))?;
            Decision {
                writes: vec![inst],
                compares: vec![(instance.id.clone(), *instance_rev)],
                ..Decision::of(next)
            }
        }
        WorkerCmd::Unplace {
            instance_id,
            requirements,
            instance,
            ..
        } => {
            let next = unplace(w, instance_id, requirements, now);
            match instance {
                Some((i, rev)) => Decision {
                    writes: vec![i.clone()],
                    compares: vec![(i.id.clone(), *rev)],
                    ..Decision::of(next)
                },
                None => Decision::of(next),
            }
        }
        WorkerCmd::Drain {
            deadline,
            voluntary,
            idle_cutoff,
            ..
        } => {
            if w.state == WorkerState::Draining {
                return Ok(None);
            }
            let placed = listed(w, insts);
            let next = match idle_cutoff {
                Some(cutoff) => start_idle_drain(w, &placed, *deadline, *cutoff, now)?,
                None => start_drain(w, &placed, *deadline, *voluntary, now)?,
            };
            // The worker's revision already covers its assignment; comparing the
            // instances too keeps the decision tied to the records it read.
            let compares = w
                .instances
                .iter()
                .take(MAX_INSTANCE_OPS)
                .map(|id| (id.clone(), insts.get(id).map(|(_, r)| *r).unwrap_or(0)))
                .collect();
            Decision {
                compares,
                ..Decision::of(next)
            }
        }
        WorkerCmd::Heartbeat { at, running, .. } => {
            let plan = plan_heartbeat(w, &listed(w, insts), running, *at, MAX_INSTANCE_OPS);
            let compares = plan
                .changed
                .iter()
                .map(|i| (i.id.clone(), insts.get(&i.id).map(|(_, r)| *r).unwrap_or(0)))
                .collect();
            Decision {
                writes: plan.changed,
                compares,
                beat: Some((plan.started, plan.completed, plan.unknown)),
                more: plan.more,
                ..Decision::of(plan.worker)
            }
        }
    };
    if d.worker == *w && d.writes.is_empty() {
        return Ok(None);
    }
    Ok(Some(d))
}

fn cmd_idem(cmd: &WorkerCmd) -> Option<&IdemWrite> {
    match cmd {
        WorkerCmd::Unplace { idem, .. }
        | WorkerCmd::Drain { idem, .. }
        | WorkerCmd::Heartbeat { idem, .. } => idem.as_ref(),
        _ => None,
    }
}

/// The answer to a command that left `worker` (and wrote `written`).
fn render(
    cmd: &WorkerCmd,
    worker: &Worker,
    written: &[(Instance, i64)],
    beat: &(Vec<String>, Vec<String>, Vec<String>),
) -> Reply {
    let (status, body) = match cmd {
        WorkerCmd::Drain { .. } => (202, serde_json::to_string(worker)),
        WorkerCmd::Heartbeat { .. } => (
            200,
            serde_json::to_string(&json!({
                "worker_id": worker.id,
                "started": beat.0,
                "completed": beat.1,
                "unknown_instances": beat.2,
            })),
        ),
        WorkerCmd::Unplace {
            instance: Some((i, _)),
            ..
        } => (
            200,
            serde_json::to_string(written.first().map(|(w, _)| w).unwrap_or(i)),
        ),
        _ => (200, serde_json::to_string(worker)),
    };
    Reply {
        status,
        body: body.unwrap_or_default(),
        replayed: false,
    }
}

/// Reads the records of the ids `w` lists that `insts` does not hold yet.
async fn load_listed(store: &dyn Store, w: &Worker, insts: &mut Insts) -> Result<(), StoreError> {
    for id in &w.instances {
        if insts.contains_key(id) {
            continue;
        }
        let kv = store.get(&keys::instance(id)).await?;
        let rev = kv.as_ref().map(|kv| kv.mod_revision).unwrap_or(0);
        insts.insert(
            id.clone(),
            (decode_instance(kv.as_ref()).map(|(i, _)| i), rev),
        );
    }
    Ok(())
}

async fn stored_reply(
    store: &dyn Store,
    idem: Option<&IdemWrite>,
) -> Result<Option<Reply>, WorkerExecError> {
    let Some(idem) = idem else { return Ok(None) };
    match store.get(&idem.request.store_key).await? {
        Some(kv) => Ok(Some(idem.request.replay(&kv.value)?)),
        None => Ok(None),
    }
}

async fn execute(
    deps: Arc<WorkerDeps>,
    id: String,
    mut cell: Cell,
    cmd: WorkerCmd,
    fenced: bool,
) -> (Result<WorkerOutcome, WorkerExecError>, Cell) {
    let key = keys::worker(&id);
    let kind = match &cmd {
        WorkerCmd::Create(_) => "create",
        WorkerCmd::Transition { .. } => "transition",
        WorkerCmd::SetCloudId(_) => "set_cloud_id",
        WorkerCmd::Place { .. } => "place",
        WorkerCmd::Unplace { .. } => "unplace",
        WorkerCmd::Drain { .. } => "drain",
        WorkerCmd::Heartbeat { .. } => "heartbeat",
    };
    let count = |result: &str| {
        deps.metrics
            .transitions
            .with_label_values(&[WORKER_KIND, kind, result])
            .inc();
    };
    let idem = cmd_idem(&cmd);
    // Drains and heartbeats decide on the worker's instances: read them (a heartbeat
    // starts from what the caller knows; every record used is compared).
    let needs_instances = matches!(cmd, WorkerCmd::Drain { .. } | WorkerCmd::Heartbeat { .. });
    let mut insts: Insts = match &cmd {
        WorkerCmd::Heartbeat { known, .. } => known
            .iter()
            .map(|(i, r)| (i.id.clone(), (Some(i.clone()), *r)))
            .collect(),
        _ => HashMap::new(),
    };
    // Heartbeat steps already written by this command.
    let mut written: Vec<(Instance, i64)> = Vec::new();
    let mut beat = (Vec::new(), Vec::new(), Vec::new());
    let mut attempts = 0;
    for _ in 0..MAX_ATTEMPTS + MAX_CHUNKS {
        if attempts >= MAX_ATTEMPTS {
            break;
        }
        if cell == Cell::Unknown {
            cell = match deps.store.get(&key).await {
                Ok(kv) => match decode_worker(kv.as_ref()) {
                    Ok((w, rev)) => Cell::Known(w, rev),
                    Err(e) => return (Err(e), Cell::Unknown),
                },
                Err(e) => return (Err(e.into()), Cell::Unknown),
            };
        }
        let Cell::Known(current, rev) = &cell else {
            continue;
        };
        if needs_instances {
            if let Some(w) = current {
                if let Err(e) = load_listed(deps.store.as_ref(), w, &mut insts).await {
                    return (Err(e.into()), cell);
                }
            }
        }
        let decided = debug_span!("worker.decide", command = kind).in_scope(|| {
            std::panic::catch_unwind(AssertUnwindSafe(|| {
                decide(current.as_ref(), &cmd, deps.clock.now(), &insts)
            }))
        });
        let d = match decided {
            Err(_) => return (Err(WorkerExecError::Mailbox), Cell::Unknown),
            Ok(Err(e)) => {
                // A retry of a request that changed things earlier gets its answer.
                let result = match stored_reply(deps.store.as_ref(), idem).await {
                    Ok(Some(reply)) => Ok(WorkerOutcome {
                        worker: current.clone().unwrap_or_else(|| placeholder(&id)),
                        instance: None,
                        written,
                        reply,
                    }),
                    Ok(None) => Err(e),
                    Err(se) => Err(se),
                };
                count(if result.is_ok() {
                    "replayed"
                } else {
                    "rejected"
                });
                return (result, cell);
            }
            Ok(Ok(None)) => {
                let worker = match current {
                    Some(w) => w.clone(),
                    None => return (Err(WorkerExecError::NotFound), cell),
                };
                let reply = match stored_reply(deps.store.as_ref(), idem).await {
                    Ok(Some(reply)) => reply,
                    Ok(None) => render(&cmd, &worker, &written, &beat),
                    Err(e) => return (Err(e), cell),
                };
                let instance = written.first().cloned();
                return (
                    Ok(WorkerOutcome {
                        worker,
                        instance,
                        written,
                        reply,
                    }),
                    cell,
                );
            }
            Ok(Ok(Some(d))) => d,
        };
        let fence = if fenced {
            match deps.fence.compare() {
                Some(c) => Some(c),
                None => return (Err(WorkerExecError::Fenced), cell),
            }
        } else {
            None
        };
        let ends_worker = d.worker.state == WorkerState::Terminated;
        let ends_instance = d.writes.iter().any(|i| !i.is_live());
        let lease = if ends_worker || ends_instance {
            match deps.retention.lease(deps.store.as_ref()).await {
                Ok(l) => Some(l),
                Err(e) => return (Err(e.into()), cell),
            }
        } else {
            None
        };
        let mut txn = Txn {
            compares: vec![Compare::ModRevision(key.clone(), *rev)],
            success: vec![Op::Put {
                key: key.clone(),
                value: serde_json::to_vec(&d.worker).unwrap_or_default(),
                lease: lease.filter(|_| ends_worker),
            }],
            failure_gets: vec![key.clone()],
        };
        for (iid, irev) in &d.compares {
            let ikey = keys::instance(iid);
            txn.compares.push(Compare::ModRevision(ikey.clone(), *irev));
            txn.failure_gets.push(ikey);
        }
        for inst in &d.writes {
            txn.success.push(Op::Put {
                key: keys::instance(&inst.id),
                value: serde_json::to_vec(inst).unwrap_or_default(),
                lease: lease.filter(|_| !inst.is_live()),
            });
        }
        if let Some(f) = fence {
            txn.compares.push(f);
            txn.failure_gets.push(keys::LEADER.to_owned());
        }
        let mut step_beat = beat.clone();
        if let Some((s, c, u)) = &d.beat {
            step_beat.0.extend(s.iter().cloned());
            step_beat.1.extend(c.iter().cloned());
            step_beat.2.clone_from(u);
        }
        // The answer covers every step; it is stored with the last one.
        let last = !d.more;
        let reply = last.then(|| {
            let mut all = written.clone();
            all.extend(d.writes.iter().map(|i| (i.clone(), 0)));
            render(&cmd, &d.worker, &all, &step_beat)
        });
        if let (Some(w), Some(reply)) = (idem.filter(|_| last), &reply) {
            txn.compares.push(w.absent());
            txn.success.push(w.put(reply, crate::clock::utc_now()));
            txn.failure_gets.push(w.request.store_key.clone());
        }
        let commit = debug_span!("worker.commit", command = kind);
        match deps.store.txn(txn).instrument(commit).await {
            Ok(r) if r.succeeded => {
                count("applied");
                debug!(worker = %id, state = ?d.worker.state, revision = r.revision, "worker persisted");
                for i in &d.writes {
                    insts.insert(i.id.clone(), (Some(i.clone()), r.revision));
                }
                written.extend(d.writes.into_iter().map(|i| (i, r.revision)));
                cell = Cell::Known(Some(d.worker.clone()), r.revision);
                beat = step_beat;
                let Some(reply) = reply else {
                    continue;
                };
                let instance = written.first().cloned();
                return (
                    Ok(WorkerOutcome {
                        worker: d.worker,
                        instance,
                        written,
                        reply,
                    }),
                    cell,
                );
            }
            Ok(r) => {
                attempts += 1;
                let mut fetched = r.fetched.into_iter();
                let fresh = fetched.next().flatten();
                let fresh_rev = fresh.as_ref().map(|kv| kv.mod_revision).unwrap_or(0);
                let worker_moved = fresh_rev != *rev;
                cell = match decode_worker(fresh.as_ref()) {
                    Ok((w, r)) => Cell::Known(w, r),
                    Err(e) => return (Err(e), Cell::Unknown),
                };
                let mut changed_instance = None;
                for (iid, irev) in &d.compares {
                    let kv = fetched.next().flatten();
                    let now_rev = kv.as_ref().map(|kv| kv.mod_revision).unwrap_or(0);
                    let value = decode_instance(kv.as_ref());
                    insts.insert(iid.clone(), (value.clone().map(|(i, _)| i), now_rev));
                    if now_rev != *irev && changed_instance.is_none() {
                        changed_instance = Some(value);
                    }
                }
                if fenced {
                    fetched.next();
                }
                if let (Some(w), Some(Some(stored))) = (idem.filter(|_| last), fetched.next()) {
                    count("replayed");
                    let result = w.request.replay(&stored.value).map(|reply| WorkerOutcome {
                        worker: match &cell {
                            Cell::Known(Some(w), _) => w.clone(),
                            _ => placeholder(&id),
                        },
                        instance: None,
                        written,
                        reply,
                    });
                    return (result.map_err(Into::into), cell);
                }
                if worker_moved {
                    deps.metrics
                        .cas_conflicts
                        .with_label_values(&[WORKER_KIND])
                        .inc();
                    continue;
                }
                if let Some(fresh_inst) = changed_instance {
                    if needs_instances {
                        // Decide again on the instances as they are now.
                        continue;
                    }
                    count("instance_changed");
                    return (Err(WorkerExecError::InstanceChanged(fresh_inst)), cell);
                }
                count("fenced");
                deps.fence.lose();
                return (Err(WorkerExecError::Fenced), cell);
            }
            Err(StoreError::LeaseNotFound) => {
                attempts += 1;
                deps.retention.invalidate();
                if idem.is_some() {
                    // Maybe the caller's idempotency lease: it renews it and retries.
                    return (Err(StoreError::LeaseNotFound.into()), cell);
                }
            }
            Err(e) => {
                count("store_error");
                return (Err(e.into()), Cell::Unknown);
            }
        }
    }
    (Err(WorkerExecError::Contention), cell)
}

/// A stand-in worker for a replayed answer when the record is gone (the answer is what
/// matters then).
fn placeholder(id: &str) -> Worker {
    Worker {
        id: id.to_owned(),
        template: String::new(),
        cloud_instance_id: None,
        state: WorkerState::Terminated,
        capacity: Resources::default(),
        allocated: Resources::default(),
        instances: Vec::new(),
        created_at: DateTime::<Utc>::UNIX_EPOCH,
        state_changed_at: DateTime::<Utc>::UNIX_EPOCH,
        last_heartbeat_at: None,
        drain_deadline: None,
        idle_since: None,
    }
}

#[derive(Clone)]
struct Handle {
    addr: Addr<WorkerActor>,
    stats: Arc<ActorStats>,
}

/// Finds, spawns and feeds worker actors.
pub struct WorkerRegistry {
    deps: Arc<WorkerDeps>,
    actors: DashMap<String, Handle>,
    arbiter: ArbiterHandle,
    loaded: AtomicBool,
}

impl WorkerRegistry {
    /// A registry whose actors run on the current arbiter (the controller's), so that
    /// controller tests with a paused clock see every step.
    pub fn new(deps: Arc<WorkerDeps>) -> Arc<Self> {
        Arc::new(Self {
            deps,
            actors: DashMap::new(),
            arbiter: Arbiter::current(),
            loaded: AtomicBool::new(false),
        })
    }

    /// Shared dependencies.
    pub fn deps(&self) -> &Arc<WorkerDeps> {
        &self.deps
    }

    /// Whether the first listing was loaded.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::SeqCst)
    }

    fn start(&self, id: &str, cell: Cell, stats: Arc<ActorStats>) -> Addr<WorkerActor> {
        let (deps, wid) = (self.deps.clone(), id.to_owned());
        Supervisor::start_in_arbiter(&self.arbiter, move |_| WorkerActor {
            id: wid,
            cell,
            deps,
            stats,
        })
    }

    /// The actor of `id`, started from `cell` when there is none or when the one
    /// registered has died (a panic outside `decide` closes its mailbox): a dead
    /// address is never kept.
    fn spawn(&self, id: &str, cell: Cell) -> Handle {
        match self.actors.entry(id.to_owned()) {
            Entry::Occupied(mut e) => {
                if e.get().addr.connected() {
                    return e.get().clone();
                }
                let stats = e.get().stats.clone();
                stats.replaced();
                warn!(worker = %id, "worker actor died; starting a fresh one from the store");
                let h = Handle {
                    addr: self.start(id, cell, stats.clone()),
                    stats,
                };
                e.insert(h.clone());
                h
            }
            Entry::Vacant(e) => {
                let stats = Arc::new(ActorStats::default());
                let addr = self.start(id, cell, stats.clone());
                self.deps
                    .metrics
                    .actors
                    .with_label_values(&[WORKER_KIND])
                    .inc();
                e.insert(Handle { addr, stats }).clone()
            }
        }
    }

    /// The registered actor of `id` if it is alive.
    fn live(&self, id: &str) -> Option<Handle> {
        self.actors
            .get(id)
            .filter(|h| h.addr.connected())
            .map(|h| h.clone())
    }

    /// The actor of an existing worker: the live one, or one started from the record
    /// read now. An unknown id spawns nothing.
    async fn find(&self, id: &str) -> Result<Handle, WorkerExecError> {
        if let Some(h) = self.live(id) {
            return Ok(h);
        }
        let kv = self.deps.store.get(&keys::worker(id)).await?;
        let Some(kv) = kv else {
            self.actors.remove_if(id, |_, h| !h.addr.connected());
            return Err(WorkerExecError::NotFound);
        };
        let (w, rev) = decode_worker(Some(&kv))?;
        Ok(self.spawn(id, Cell::Known(w, rev)))
    }

    /// Removes the actor of a worker record deleted (or expired) at `revision`, unless
    /// it was written again since.
    fn retire(&self, id: &str, revision: i64) {
        let recreated = self
            .deps
            .view
            .get(id)
            .is_some_and(|v| v.value().1 > revision);
        if let Some(h) = self.live(id) {
            h.stats.enqueued();
            h.addr.do_send(ObserveWorker {
                kv: None,
                mod_revision: revision,
            });
        }
        if !recreated {
            // A dead actor cannot unpublish its record: do it here.
            self.deps.view.remove_if(id, |_, v| v.1 < revision);
            self.deps.resync(id);
            if self.actors.remove(id).is_some() {
                self.deps
                    .metrics
                    .actors
                    .with_label_values(&[WORKER_KIND])
                    .dec();
            }
        }
    }

    /// Sends a command to worker `id` and waits for the answer, at most the send
    /// deadline. Only `Create` starts an actor for a worker that does not exist yet;
    /// anything else for an unknown id is `NotFound` and leaves nothing behind.
    pub async fn send(
        &self,
        id: &str,
        cmd: WorkerCmd,
        fenced: bool,
    ) -> Result<WorkerOutcome, WorkerExecError> {
        let h = match (&cmd, self.live(id)) {
            (_, Some(h)) => h,
            (WorkerCmd::Create(_), None) => self.spawn(id, Cell::Unknown),
            (_, None) => self.find(id).await?,
        };
        h.stats.enqueued();
        let sent = tokio::time::timeout(
            self.deps.send_timeout,
            h.addr.send(WorkerMsg {
                cmd,
                fenced,
                span: Span::current(),
            }),
        )
        .await;
        // An actor left without a record (deleted, or a create that failed) serves
        // nothing: drop it now rather than wait for the watch.
        if !self.deps.view.contains_key(id) {
            let removed = self.actors.remove_if(id, |_, x| x.addr == h.addr).is_some();
            if removed {
                self.deps
                    .metrics
                    .actors
                    .with_label_values(&[WORKER_KIND])
                    .dec();
            }
        }
        match sent {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => {
                h.stats.dequeued();
                Err(WorkerExecError::Mailbox)
            }
            Err(_) => {
                warn!(worker = %id, timeout_ms = self.deps.send_timeout.as_millis() as u64,
                    "worker actor did not answer within the send deadline");
                Err(WorkerExecError::Busy)
            }
        }
    }

    /// Workers as this replica last saw them, sorted by id.
    pub fn list(&self) -> Vec<Worker> {
        let mut out: Vec<Worker> = self.deps.view.iter().map(|e| e.value().0.clone()).collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// The workers that list instances, each with the ids it lists (unordered; most
    /// workers of a large fleet hold nothing, so this copies far less than [`Self::list`]).
    pub fn holdings(&self) -> Vec<(String, Vec<String>)> {
        self.deps
            .view
            .iter()
            .filter(|e| !e.value().0.instances.is_empty())
            .map(|e| (e.key().clone(), e.value().0.instances.clone()))
            .collect()
    }

    /// One worker.
    pub fn get(&self, id: &str) -> Option<Worker> {
        self.deps.view.get(id).map(|e| e.value().0.clone())
    }

    /// Introspection of every live worker actor, sorted by id.
    pub fn actors(&self) -> Vec<ActorInfo> {
        let mut out: Vec<ActorInfo> = self
            .actors
            .iter()
            .filter(|e| e.value().addr.connected())
            .map(|e| self.info(e.key(), e.value()))
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Introspection of one live worker actor.
    pub fn actor(&self, id: &str) -> Option<ActorInfo> {
        self.live(id).map(|h| self.info(id, &h))
    }

    fn info(&self, id: &str, h: &Handle) -> ActorInfo {
        let view = self.deps.view.get(id).map(|v| v.value().clone());
        ActorInfo {
            kind: WORKER_KIND,
            id: id.to_owned(),
            state: view
                .as_ref()
                .map(|(w, _)| w.state.as_str().to_owned())
                .unwrap_or_else(|| "UNKNOWN".into()),
            version: None,
            mod_revision: view.as_ref().map(|(_, r)| *r),
            active: true,
            mailbox_depth: h.stats.mailbox_depth(),
            restarts: h.stats.restarts(),
            last_transition_at: h.stats.last_transition(),
        }
    }

    fn observe(&self, id: &str, kv: Option<Kv>, rev: i64) {
        let Some(kv) = kv else {
            self.retire(id, rev);
            return;
        };
        match self.live(id) {
            Some(h) => {
                h.stats.enqueued();
                h.addr.do_send(ObserveWorker {
                    kv: Some(kv),
                    mod_revision: rev,
                });
            }
            None => match decode_worker(Some(&kv)) {
                Ok((w, r)) => {
                    self.spawn(id, Cell::Known(w, r));
                }
                Err(e) => warn!(worker = %id, error = %e, "skipping undecodable worker"),
            },
        }
    }
}

impl Follower for WorkerRegistry {
    fn prefix(&self) -> &'static str {
        keys::WORKER_PREFIX
    }

    fn load(&self, kvs: Vec<Kv>, revision: i64) {
        let mut seen = HashSet::new();
        for kv in kvs {
            if let Some(id) = keys::child(keys::WORKER_PREFIX, &kv.key).map(str::to_owned) {
                let rev = kv.mod_revision;
                seen.insert(id.clone());
                self.observe(&id, Some(kv), rev);
            }
        }
        let gone: Vec<String> = self
            .actors
            .iter()
            .map(|e| e.key().clone())
            .filter(|k| !seen.contains(k))
            .collect();
        for id in gone {
            self.observe(&id, None, revision);
        }
        self.loaded.store(true, Ordering::SeqCst);
    }

    fn apply(&self, ev: WatchEvent) {
        match ev {
            WatchEvent::Put(kv) => {
                if let Some(id) = keys::child(keys::WORKER_PREFIX, &kv.key).map(str::to_owned) {
                    let rev = kv.mod_revision;
                    self.observe(&id, Some(kv), rev);
                }
            }
            WatchEvent::Delete { key, mod_revision } => {
                if let Some(id) = keys::child(keys::WORKER_PREFIX, &key) {
                    self.observe(id, None, mod_revision);
                }
            }
        }
    }
}
