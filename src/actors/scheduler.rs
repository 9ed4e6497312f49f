//! The scheduler: places PENDING instances on RUNNING workers with room (best fit),
//! never on DRAINING or later; what cannot be placed goes to the autoscaler at once.
//! It reads the pending queue and the workers' capacity index (both kept by the watch
//! and this replica's writes, see [`crate::domain::schedule_index`]), never every
//! instance or worker.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use tracing::debug;

use crate::actors::controller_ctx::{ControllerCtx, Demand};
pub use crate::actors::controller_ctx::{Schedule, Stop};
use crate::actors::worker::{WorkerCmd, WorkerExecError};
use crate::domain::worker::{InstanceState, Resources};

/// The scheduler actor (leader only).
pub struct Scheduler {
    ctx: Arc<ControllerCtx>,
    autoscaler: Recipient<Demand>,
    blocked: Blocked,
}

impl Scheduler {
    /// A scheduler that reports unplaceable demand to `autoscaler`.
    pub fn new(ctx: Arc<ControllerCtx>, autoscaler: Recipient<Demand>) -> Self {
        Self {
            ctx,
            autoscaler,
            blocked: Blocked::default(),
        }
    }
}

/// Pending instances that fit no worker, and the capacity index's room counter when
/// that was found: until room appears ([`crate::domain::schedule_index::CapacityIndex::room`]
/// changes) they still fit nowhere, so a pass skips them and costs what is new.
///
/// When room appears, one instance of each blocked shape (its requirements) is tried:
/// the shapes that fit now are retried, the others stay blocked, so a backlog that fits
/// nowhere costs a lookup per shape, not per instance, each time room appears.
#[derive(Debug, Default)]
pub struct Blocked {
    ids: HashSet<String>,
    /// Blocked ids by requirements (exact bits of cpu and memory).
    shapes: HashMap<(u64, u64), (Resources, Vec<String>)>,
    room: Option<u64>,
}

impl Blocked {
    fn block(&mut self, id: &str, req: &Resources) {
        if self.ids.insert(id.to_owned()) {
            self.shapes
                .entry((req.cpu.to_bits(), req.memory_gb.to_bits()))
                .or_insert_with(|| (*req, Vec::new()))
                .1
                .push(id.to_owned());
        }
    }

    /// Unblocks the shapes `fits` accepts: their ids, and one id of each shape still
    /// blocked.
    fn retry_where(&mut self, fits: impl Fn(&Resources) -> bool) -> (Vec<String>, Vec<String>) {
        let (mut freed, mut still) = (Vec::new(), Vec::new());
        let ids = &mut self.ids;
        self.shapes.retain(|_, (req, members)| {
            if fits(req) {
                for id in members.drain(..) {
                    ids.remove(&id);
                    freed.push(id);
                }
                false
            } else {
                still.extend(members.first().cloned());
                true
            }
        });
        (freed, still)
    }

    /// Keeps only the ids `keep` selects.
    fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.ids.retain(|id| keep(id));
        self.shapes.retain(|_, (_, members)| {
            members.retain(|id| keep(id));
            !members.is_empty()
        });
    }
}

impl Actor for Scheduler {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // What an earlier scheduler parked, this one has not found blocked.
        self.ctx.with_pending(|q| q.unpark_all());
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
        let blocked = std::mem::take(&mut self.blocked);
        AtomicResponse::new(Box::pin(
            async move { schedule_once(&cctx, &autoscaler, blocked).await }
                .into_actor(self)
                .map(|blocked, act, _| act.blocked = blocked),
        ))
    }
}

/// A scheduler that knows no blocked instance: none may stay parked either.
fn forget(ctx: &ControllerCtx) -> Blocked {
    ctx.with_pending(|q| q.unpark_all());
    Blocked::default()
}

/// One pass over the pending queue (oldest first): place what fits on the best-fitting
/// RUNNING worker from the capacity index, hand the rest to the autoscaler. Instances
/// found to fit nowhere are skipped until room appears (`blocked`). The cost follows
/// the number of pending instances that may fit, not the number of instances or
/// workers.
pub async fn schedule_once(
    ctx: &ControllerCtx,
    autoscaler: &Recipient<Demand>,
    mut blocked: Blocked,
) -> Blocked {
    ctx.pass_started();
    if ctx.fence.epoch().is_none() {
        return forget(ctx);
    }
    let room = ctx.workers.deps().room();
    // Instances still waiting for the autoscaler (one per shape that still fits nowhere
    // when room appeared: the autoscaler plans from the whole queue).
    let mut unplaced = Vec::new();
    if blocked.room != Some(room) {
        let deps = ctx.workers.deps();
        let (freed, still) = blocked.retry_where(|req| deps.best_fit(req).is_some());
        ctx.with_pending(|q| freed.iter().for_each(|id| q.unpark(id)));
        unplaced = still;
        blocked.room = Some(room);
    }
    // The blocked ones are parked in the queue: the walk is what may be placed.
    let todo = ctx.with_pending(|q| q.ready_ids()).unwrap_or_default();
    for id in todo {
        let Some((inst, rev)) = ctx.instances.get(&id) else {
            continue;
        };
        if inst.state != InstanceState::Pending {
            continue;
        }
        // The worker actor publishes each placement (view and index) before it answers,
        // so the next lookup already sees the room this one took.
        let Some(target) = ctx.workers.deps().best_fit(&inst.requirements) else {
            blocked.block(&id, &inst.requirements);
            ctx.with_pending(|q| q.park(&id));
            unplaced.push(id);
            continue;
        };
        let cmd = WorkerCmd::Place {
            instance: inst.clone(),
            instance_rev: rev,
        };
        match ctx.workers.send(&target, cmd, true).await {
            Ok(out) => {
                debug!(instance = %inst.id, worker = %target, "instance scheduled");
                let waited = (ctx.clock.now() - inst.created_at)
                    .to_std()
                    .unwrap_or_default();
                ctx.metrics.schedule_latency.observe(waited.as_secs_f64());
                if let Some((i, r)) = out.instance {
                    ctx.instances.note(&i.id.clone(), i, r);
                }
            }
            Err(WorkerExecError::Fenced) => return forget(ctx),
            Err(WorkerExecError::InstanceChanged(fresh)) => {
                if let Some((i, r)) = fresh {
                    ctx.instances.note(&i.id.clone(), i, r);
                }
            }
            Err(e) => {
                // Our view of the worker was stale (it filled up or started draining);
                // the refusal refreshed it.
                debug!(instance = %inst.id, worker = %target, error = %e, "placement refused");
                unplaced.push(id);
            }
        }
    }
    // Forget blocked instances that are no longer pending (placed elsewhere, ended).
    let pending = ctx.pending_len();
    if blocked.ids.len() > 2 * pending + 1024 {
        let still: HashSet<String> = ctx.pending_ids().into_iter().collect();
        blocked.retain(|id| still.contains(id));
    }
    if !unplaced.is_empty() {
        autoscaler.do_send(Demand {
            instances: unplaced,
            seen_at: Instant::now(),
        });
    }
    blocked
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(cpu: f64, memory_gb: f64) -> Resources {
        Resources { cpu, memory_gb }
    }

    #[test]
    fn room_unblocks_only_the_shapes_that_fit_and_names_one_of_each_other_shape() {
        let mut b = Blocked::default();
        for i in 0..100 {
            b.block(&format!("big-{i}"), &req(64.0, 512.0));
        }
        b.block("small-1", &req(1.0, 2.0));
        b.block("small-2", &req(1.0, 2.0));
        b.block("small-1", &req(1.0, 2.0));
        assert_eq!(b.ids.len(), 102, "an id is blocked once");

        let (mut freed, still) = b.retry_where(|r| r.cpu <= 8.0);
        freed.sort();
        assert_eq!(freed, ["small-1", "small-2"], "the ids to unpark");
        assert_eq!(still.len(), 1, "one id per shape still blocked: {still:?}");
        assert!(still[0].starts_with("big-"));
        assert!(!b.ids.contains("small-1") && !b.ids.contains("small-2"));
        assert_eq!(b.ids.len(), 100);

        b.retain(|id| id != "big-0");
        assert_eq!(b.ids.len(), 99);
        let (freed, still) = b.retry_where(|_| true);
        assert_eq!((freed.len(), still.len()), (99, 0));
        assert!(b.ids.is_empty() && b.shapes.is_empty());
    }
}
