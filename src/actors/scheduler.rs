//! The scheduler: places PENDING instances on RUNNING workers with room (best fit),
//! never on DRAINING or later; what cannot be placed goes to the autoscaler at once.

use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use tracing::debug;

use crate::actors::autoscaler::{Autoscaler, Demand};
use crate::actors::controller::ControllerCtx;
use crate::actors::worker::{WorkerCmd, WorkerExecError};
use crate::domain::controller::best_fit;
use crate::domain::worker::Worker;

/// Place pending instances now.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Schedule;

/// Stop (leadership lost).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Stop;

/// The scheduler actor (leader only).
pub struct Scheduler {
    ctx: Arc<ControllerCtx>,
    autoscaler: Addr<Autoscaler>,
}

impl Scheduler {
    /// A scheduler that reports unplaceable demand to `autoscaler`.
    pub fn new(ctx: Arc<ControllerCtx>, autoscaler: Addr<Autoscaler>) -> Self {
        Self { ctx, autoscaler }
    }
}

impl Actor for Scheduler {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.notify(Schedule);
    }
}

impl Handler<Stop> for Scheduler {
    type Result = ();

    fn handle(&mut self, _msg: Stop, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

impl Handler<Schedule> for Scheduler {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, _msg: Schedule, _ctx: &mut Self::Context) -> Self::Result {
        let (cctx, autoscaler) = (self.ctx.clone(), self.autoscaler.clone());
        AtomicResponse::new(Box::pin(
            async move { schedule_once(&cctx, &autoscaler).await }.into_actor(self),
        ))
    }
}

/// One pass: place what fits, hand the rest to the autoscaler.
pub async fn schedule_once(ctx: &ControllerCtx, autoscaler: &Addr<Autoscaler>) {
    if ctx.fence.epoch().is_none() {
        return;
    }
    let mut workers: Vec<Worker> = ctx.workers.list();
    let mut unplaced = Vec::new();
    for (inst, rev) in ctx.pending() {
        let Some(target) = best_fit(&workers, &inst.requirements).map(|w| w.id.clone()) else {
            unplaced.push(inst.id.clone());
            continue;
        };
        let cmd = WorkerCmd::Place {
            instance: inst.clone(),
            instance_rev: rev,
        };
        match ctx.workers.send(&target, cmd, true).await {
            Ok(out) => {
                debug!(instance = %inst.id, worker = %target, "instance scheduled");
                if let Some((i, r)) = out.instance {
                    ctx.instances.note(&i.id.clone(), i, r);
                }
                if let Some(w) = workers.iter_mut().find(|w| w.id == target) {
                    *w = out.worker;
                }
            }
            Err(WorkerExecError::Fenced) => return,
            Err(WorkerExecError::InstanceChanged(fresh)) => {
                if let Some((i, r)) = fresh {
                    ctx.instances.note(&i.id.clone(), i, r);
                }
            }
            Err(e) => {
                // Our view of the worker was stale (it filled up or started draining).
                debug!(instance = %inst.id, worker = %target, error = %e, "placement refused");
                if let Some(w) = ctx.workers.get(&target) {
                    if let Some(slot) = workers.iter_mut().find(|x| x.id == target) {
                        *slot = w;
                    }
                }
                unplaced.push(inst.id.clone());
            }
        }
    }
    if !unplaced.is_empty() {
        autoscaler.do_send(Demand {
            instances: unplaced,
            seen_at: Instant::now(),
        });
    }
}
