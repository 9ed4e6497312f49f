//! The reconciler: every `RECONCILE_INTERVAL`, in order, (1) instances on failed,
//! terminated or unknown workers go back to PENDING, (2) workers are compared with the
//! cloud (launch timeouts, vanished instances, orphans, missed heartbeats), (3) capacity
//! (pending demand, `min_workers`, idle workers to drain). Every decision is journaled
//! with its reason and counted.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use tracing::{debug, warn};

pub use crate::actors::controller_ctx::Stop;
use crate::actors::controller_ctx::{
    AutoscalerHandle, ControllerCtx, Demand, EffectError, EnsureMinimum,
};
use crate::actors::instances;
use crate::actors::worker::{WorkerCmd, WorkerExecError};
use crate::domain::controller::idle_to_drain;
use crate::domain::worker::{InstanceState, Worker, WorkerError, WorkerState};
use crate::keys;
use crate::ports::cloud::{CloudInstance, CloudInstanceStatus};

/// Run one pass now.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Reconcile;

/// The reconciler actor (leader only).
pub struct Reconciler {
    ctx: Arc<ControllerCtx>,
    autoscaler: AutoscalerHandle,
}

impl Reconciler {
    /// A reconciler.
    pub fn new(ctx: Arc<ControllerCtx>, autoscaler: AutoscalerHandle) -> Self {
        Self { ctx, autoscaler }
    }
}

impl Actor for Reconciler {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.ctx.settings.reconcile_interval, |_, ctx| {
            ctx.notify(Reconcile)
        });
    }
}

impl Handler<Stop> for Reconciler {
    type Result = ();
    fn handle(&mut self, _msg: Stop, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

impl Handler<Reconcile> for Reconciler {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, _msg: Reconcile, _ctx: &mut Self::Context) -> Self::Result {
        let (cctx, autoscaler) = (self.ctx.clone(), self.autoscaler.clone());
        AtomicResponse::new(Box::pin(
            async move {
                let outcome = reconcile_once(&cctx, &autoscaler).await;
                cctx.reconciled(outcome);
            }
            .into_actor(self),
        ))
    }
}

/// One reconcile pass; the error is the first thing that went wrong.
pub async fn reconcile_once(
    ctx: &ControllerCtx,
    autoscaler: &AutoscalerHandle,
) -> Result<(), String> {
    if ctx.fence.epoch().is_none() {
        return Err("not the leader".into());
    }
    let mut first_error: Option<String> = None;
    let mut note = |e: String| {
        warn!(error = %e, "reconcile step failed");
        first_error.get_or_insert(e);
    };
    reconcile_instances(ctx, &mut note).await;
    tokio::task::yield_now().await;
    reconcile_workers(ctx, &mut note).await;
    tokio::task::yield_now().await;
    reconcile_capacity(ctx, autoscaler, &mut note).await;
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

async fn reconcile_instances(ctx: &ControllerCtx, note: &mut impl FnMut(String)) {
    // Only the placed ones are copied: most instances have ended (and their workers are
    // looked up one by one: most workers hold nothing).
    let placed = ctx
        .instances
        .select(|i| matches!(i.state, InstanceState::Scheduled | InstanceState::Running));
    for (n, (inst, _)) in placed.into_iter().enumerate() {
        pace(n).await;
        let worker = inst.worker_id.as_ref().and_then(|id| ctx.workers.get(id));
        let reason = match worker {
            None => "its worker is unknown",
            Some(w) if matches!(w.state, WorkerState::Failed | WorkerState::Terminated) => {
                "its worker failed or terminated"
            }
            Some(w) if !w.instances.contains(&inst.id) => "its worker does not list it",
            Some(_) => continue,
        };
        // The worker view may lag the instance view (another watch stream): confirm
        // with the store before moving an instance off its worker.
        let placed_on = inst.worker_id.clone();
        if let Some(wid) = &placed_on {
            match ctx.store.get(&crate::keys::worker(wid)).await {
                Ok(Some(kv)) => {
                    let holds = serde_json::from_slice::<Worker>(&kv.value).is_ok_and(|w| {
                        w.instances.contains(&inst.id)
                            && !matches!(w.state, WorkerState::Failed | WorkerState::Terminated)
                    });
                    if holds {
                        continue;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    note(format!("read worker {wid}: {e}"));
                    continue;
                }
            }
        }
        let back = instances::update(
            ctx.store.as_ref(),
            &inst.id,
            Some(&ctx.fence),
            &ctx.workers.deps().retention,
            |i| {
                if !matches!(i.state, InstanceState::Scheduled | InstanceState::Running)
                    || i.worker_id != placed_on
                {
                    return Ok(None);
                }
                let mut n = i.clone();
                n.state = InstanceState::Pending;
                n.worker_id = None;
                Ok(Some(n))
            },
        )
        .await;
        match back {
            Ok((i, rev)) => {
                ctx.instances.note(&i.id.clone(), i, rev);
                ctx.decide("reschedule", &inst.id, reason);
            }
            Err(e) => note(format!("reschedule {}: {e}", inst.id)),
        }
    }
    // Workers that still list instances which ended or moved elsewhere.
    for (n, (wid, listed)) in ctx.workers.holdings().into_iter().enumerate() {
        pace(n).await;
        for id in &listed {
            let stale = match ctx.instances.get(id) {
                None => true,
                Some((i, _)) => !i.is_live() || i.worker_id.as_deref() != Some(wid.as_str()),
            };
            if stale {
                // The mirror may lag the worker record (another watch stream): confirm
                // with the store before taking an instance off its worker.
                let fresh = match instances::get(ctx.store.as_ref(), id).await {
                    Ok(f) => f,
                    Err(e) => {
                        note(format!("read instance {id}: {e}"));
                        continue;
                    }
                };
                if let Some((i, rev)) = &fresh {
                    if i.is_live() && i.worker_id.as_deref() == Some(wid.as_str()) {
                        ctx.instances.note(id, i.clone(), *rev);
                        continue;
                    }
                }
                let req = fresh.map(|(i, _)| i.requirements).unwrap_or_default();
                let cmd = WorkerCmd::Unplace {
                    instance_id: id.clone(),
                    requirements: req,
                    instance: None,
                    idem: None,
                };
                match ctx.workers.send(&wid, cmd, true).await {
                    Ok(_) => ctx.decide(
                        "release_allocation",
                        &wid,
                        &format!("instance {id} is no longer on it"),
                    ),
                    Err(e) => note(format!("unplace {id} from {}: {e}", wid)),
                }
            }
        }
    }
}

/// Items a pass handles between two yields to the other tasks of its thread.
const PACE: usize = 512;

/// Yields to the other tasks of this thread (the scheduler, the watch consumers) every
/// [`PACE`]-th item of a walk over the fleet, so no pass holds the thread for long.
async fn pace(n: usize) {
    if n > 0 && n.is_multiple_of(PACE) {
        tokio::task::yield_now().await;
    }
}

/// The workers as etcd has them now (not the watch-fed view, which may lag).
async fn read_workers(ctx: &ControllerCtx) -> Result<Vec<Worker>, String> {
    let (kvs, _revision) = ctx
        .store
        .list(keys::WORKER_PREFIX)
        .await
        .map_err(|e| format!("read workers: {e}"))?;
    let mut out = Vec::with_capacity(kvs.len());
    for (n, kv) in kvs.into_iter().enumerate() {
        pace(n).await;
        if keys::child(keys::WORKER_PREFIX, &kv.key).is_none() {
            continue;
        }
        match serde_json::from_slice::<Worker>(&kv.value) {
            Ok(w) => out.push(w),
            Err(e) => return Err(format!("worker record {} is corrupt: {e}", kv.key)),
        }
    }
    Ok(out)
}

async fn reconcile_workers(ctx: &ControllerCtx, note: &mut impl FnMut(String)) {
    // The cloud first, then the workers read from etcd after it: a worker record is
    // written before its instance is launched, so every listed instance's worker is in
    // this read, and an instance launched meanwhile is never mistaken for an orphan.
    if !ctx.fence.is_leading() {
        note("lost leadership during the pass".into());
        return;
    }
    let cloud = match ctx.cloud.list_instances().await {
        Ok(c) => c,
        Err(e) => {
            note(format!("cloud list: {e}"));
            return;
        }
    };
    let workers = match read_workers(ctx).await {
        Ok(w) => w,
        Err(e) => {
            note(e);
            return;
        }
    };
    let now = ctx.clock.now();
    let live_cloud: HashSet<&str> = cloud.iter().map(|c| c.instance_id.as_str()).collect();
    let by_id: HashMap<&str, &Worker> = workers.iter().map(|w| (w.id.as_str(), w)).collect();
    let timeout = ChronoDuration::from_std(ctx.settings.provision_timeout).unwrap_or_default();
    let hb_timeout = ChronoDuration::from_std(ctx.settings.heartbeat_timeout).unwrap_or_default();
    for (n, w) in workers.iter().enumerate() {
        pace(n).await;
        if !ctx.fence.is_leading() {
            note("lost leadership during the pass".into());
            return;
        }
        let fail_reason = match w.state {
            WorkerState::Provisioning if now - w.state_changed_at > timeout => {
                Some("provisioning exceeded PROVISION_TIMEOUT_SECONDS")
            }
            WorkerState::Running | WorkerState::Draining => {
                let gone = match &w.cloud_instance_id {
                    Some(cid) if !live_cloud.contains(cid.as_str()) => {
                        // Listing may lag; confirm with a direct lookup before acting.
                        matches!(
                            ctx.cloud.get_instance_status(cid).await,
                            Ok(CloudInstanceStatus::NotFound | CloudInstanceStatus::Terminated)
                        )
                    }
                    _ => false,
                };
                if gone {
                    Some("its cloud instance is gone")
                } else if w
                    .last_heartbeat_at
                    .is_some_and(|hb| !hb_timeout.is_zero() && now - hb > hb_timeout)
                {
                    Some("missed heartbeats")
                } else {
                    None
                }
            }
            _ => None,
        };
        if let Some(reason) = fail_reason {
            let cmd = WorkerCmd::Transition {
                to: WorkerState::Failed,
                cloud_instance_id: None,
            };
            match ctx.workers.send(&w.id, cmd, true).await {
                Ok(_) => ctx.decide("mark_failed", &w.id, reason),
                Err(e) => note(format!("fail {}: {e}", w.id)),
            }
        }
    }
    let grace = ChronoDuration::from_std(ctx.settings.orphan_grace).unwrap_or_default();
    for c in orphans(&cloud, &by_id, now, grace) {
        match ctx.cloud_terminate(&c.instance_id).await {
            Ok(()) => ctx.decide(
                "terminate_orphan",
                &c.instance_id,
                "tagged as ours but no live worker owns it",
            ),
            Err(EffectError::Fence(e)) => {
                note(format!("terminate orphan {}: {e}", c.instance_id));
                return;
            }
            Err(e) => note(format!("terminate orphan {}: {e}", c.instance_id)),
        }
    }
}

/// Cloud instances no live worker owns and that are older than `grace` (an instance
/// whose launch time is unknown is never an orphan).
fn orphans<'a>(
    cloud: &'a [CloudInstance],
    workers: &HashMap<&str, &Worker>,
    now: DateTime<Utc>,
    grace: ChronoDuration,
) -> Vec<&'a CloudInstance> {
    cloud
        .iter()
        .filter(|c| {
            let known = c
                .worker_id
                .as_deref()
                .and_then(|id| workers.get(id))
                .is_some_and(|w| {
                    !matches!(w.state, WorkerState::Terminated)
                        && w.cloud_instance_id
                            .as_deref()
                            .is_none_or(|cid| cid == c.instance_id)
                });
            let old_enough = c.launched_at.is_some_and(|t| now - t >= grace);
            !known && old_enough
        })
        .collect()
}

async fn reconcile_capacity(
    ctx: &ControllerCtx,
    autoscaler: &AutoscalerHandle,
    note: &mut impl FnMut(String),
) {
    let pending: Vec<String> = ctx.pending().into_iter().map(|(i, _)| i.id).collect();
    if !pending.is_empty() {
        // Give the scheduler a chance first; what it cannot place reaches the autoscaler.
        ctx.kick();
        autoscaler.demand.do_send(Demand {
            instances: pending,
            seen_at: Instant::now(),
        });
    }
    autoscaler.ensure_minimum.do_send(EnsureMinimum);
    let idle = ChronoDuration::from_std(ctx.settings.scale_down_idle).unwrap_or_default();
    let now = ctx.clock.now();
    let deadline = ctx
        .settings
        .drain_deadline
        .map(|d| now + ChronoDuration::from_std(d).unwrap_or_default());
    for id in idle_to_drain(&ctx.workers.list(), &ctx.templates, now, idle) {
        // Picked on this replica's view; the worker actor re-checks idleness and
        // do_not_disrupt on the record it writes against, so a placement since the
        // pick cancels the drain.
        let cmd = WorkerCmd::Drain {
            deadline,
            voluntary: true,
            idle_cutoff: now.checked_sub_signed(idle),
            idem: None,
        };
        match ctx.workers.send(&id, cmd, true).await {
            Ok(_) => ctx.decide(
                "drain",
                &id,
                "idle past SCALE_DOWN_IDLE_SECONDS, above min_workers",
            ),
            Err(WorkerExecError::Domain(
                e @ (WorkerError::NotIdle | WorkerError::DoNotDisrupt),
            )) => {
                debug!(worker = %id, reason = %e, "idle drain cancelled");
            }
            Err(e) => note(format!("drain {id}: {e}")),
        }
    }
}
