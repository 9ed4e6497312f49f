//! The autoscaler: batches unplaceable demand for `SCALE_UP_BATCH_MS`, plans launches
//! that subtract capacity already on its way (no over-provisioning), creates the worker
//! actors (PENDING), calls the cloud (PROVISIONING), and drives every in-flight worker
//! through its life cycle with the cloud: RUNNING, and DRAINING -> STOPPING -> STOPPED
//! -> TERMINATED.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use tracing::debug;

use crate::actors::controller_ctx::{ControllerCtx, EffectError, Schedule};
pub use crate::actors::controller_ctx::{Demand, EnsureMinimum, Stop};
use crate::actors::leader::FenceError;
use crate::actors::worker::{WorkerCmd, WorkerExecError};
use crate::domain::controller::{fits_no_template, plan_min_workers, plan_scale_up, ScalePlan};
use crate::domain::worker::{drain_complete, Worker, WorkerState};
use crate::ports::agent::AgentTarget;
use crate::ports::cloud::CloudInstanceStatus;

/// Tells the autoscaler where the scheduler is.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetScheduler(pub Recipient<Schedule>);

#[derive(Message)]
#[rtype(result = "()")]
struct ScaleUp;

#[derive(Message)]
#[rtype(result = "()")]
struct Drive;

/// The autoscaler actor (leader only).
pub struct Autoscaler {
    ctx: Arc<ControllerCtx>,
    scheduler: Option<Recipient<Schedule>>,
    batch_started: Option<Instant>,
    /// Workers whose termination has been journaled (once per stop sequence).
    asked: HashSet<String>,
}

impl Autoscaler {
    /// An autoscaler.
    pub fn new(ctx: Arc<ControllerCtx>) -> Self {
        Self {
            ctx,
            scheduler: None,
            batch_started: None,
            asked: HashSet::new(),
        }
    }
}

impl Actor for Autoscaler {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let poll = self.ctx.settings.cloud_poll;
        ctx.run_interval(poll, |_, ctx| ctx.notify(Drive));
        ctx.notify(EnsureMinimum);
    }
}

impl Handler<Stop> for Autoscaler {
    type Result = ();
    fn handle(&mut self, _msg: Stop, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

impl Handler<SetScheduler> for Autoscaler {
    type Result = ();
    fn handle(&mut self, msg: SetScheduler, _ctx: &mut Self::Context) {
        self.scheduler = Some(msg.0);
    }
}

impl Handler<Demand> for Autoscaler {
    type Result = ();

    fn handle(&mut self, msg: Demand, ctx: &mut Self::Context) {
        if msg.instances.is_empty() || self.batch_started.is_some() {
            return;
        }
        self.batch_started = Some(msg.seen_at);
        ctx.run_later(self.ctx.settings.scale_up_batch, |_, ctx| {
            ctx.notify(ScaleUp)
        });
    }
}

impl Handler<ScaleUp> for Autoscaler {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, _msg: ScaleUp, _ctx: &mut Self::Context) -> Self::Result {
        let since = self.batch_started.take().unwrap_or_else(Instant::now);
        let cctx = self.ctx.clone();
        AtomicResponse::new(Box::pin(
            async move { scale_up(&cctx, since).await }.into_actor(self),
        ))
    }
}

impl Handler<EnsureMinimum> for Autoscaler {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, _msg: EnsureMinimum, _ctx: &mut Self::Context) -> Self::Result {
        let cctx = self.ctx.clone();
        AtomicResponse::new(Box::pin(
            async move {
                let launches = plan_min_workers(&cctx.workers.list(), &cctx.templates);
                for t in launches {
                    launch(&cctx, &t, "below min_workers", None).await;
                }
            }
            .into_actor(self),
        ))
    }
}

impl Handler<Drive> for Autoscaler {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, _msg: Drive, _ctx: &mut Self::Context) -> Self::Result {
        let cctx = self.ctx.clone();
        let scheduler = self.scheduler.clone();
        let asked = std::mem::take(&mut self.asked);
        AtomicResponse::new(Box::pin(
            async move { drive(&cctx, scheduler.as_ref(), asked).await }
                .into_actor(self)
                .map(|asked, act, _| act.asked = asked),
        ))
    }
}

/// Plans and launches for the pending demand, and records why each pending instance
/// waits. An unplaceable instance is journaled once while it stays so (the last plan's
/// reasons say which were), so a backlog that fits nowhere does not fill the journal.
async fn scale_up(ctx: &ControllerCtx, since: Instant) {
    if ctx.fence.epoch().is_none() {
        return;
    }
    let pending: Vec<_> = ctx.pending().into_iter().map(|(i, _)| i).collect();
    let plan = plan(ctx, &pending);
    for id in &plan.unplaceable {
        if ctx.waiting_reason(id) != Some(WAIT_UNPLACEABLE) {
            ctx.decide("unplaceable", id, WAIT_UNPLACEABLE);
        }
    }
    ctx.set_waiting(waiting_reasons(ctx, &pending, &plan));
    if !plan.absorbed_by_in_flight.is_empty() {
        ctx.decide(
            "wait_in_flight",
            &plan.absorbed_by_in_flight.join(","),
            "capacity already provisioning will take these",
        );
    }
    for t in &plan.launches {
        launch(
            ctx,
            t,
            "pending demand does not fit running workers",
            Some(since),
        )
        .await;
    }
}

/// The scale-up plan for `pending`. Instances that no template holds, that no running
/// worker has room for, while no worker is on its way (which an earlier template may
/// have made larger), are unplaceable whatever the fleet: they are left out of the
/// plan, and when nothing else is pending the fleet is not even read. A backlog that
/// fits nowhere then costs a comparison per requirements shape, not a copy of every
/// worker per plan.
fn plan(ctx: &ControllerCtx, pending: &[crate::domain::worker::Instance]) -> ScalePlan {
    let deps = ctx.workers.deps();
    let settled = deps.moving().is_empty();
    let mut hopeless_shape: HashMap<(u64, u64), bool> = HashMap::new();
    let (hopeless, rest): (Vec<_>, Vec<_>) = pending.iter().partition(|i| {
        let r = &i.requirements;
        settled
            && *hopeless_shape
                .entry((r.cpu.to_bits(), r.memory_gb.to_bits()))
                .or_insert_with(|| {
                    fits_no_template(r, &ctx.templates) && deps.best_fit(r).is_none()
                })
    });
    let mut plan = if rest.is_empty() {
        ScalePlan::default()
    } else {
        let rest: Vec<_> = rest.into_iter().cloned().collect();
        plan_scale_up(&rest, &ctx.workers.list(), &ctx.templates)
    };
    if !hopeless.is_empty() {
        plan.unplaceable
            .extend(hopeless.iter().map(|i| i.id.clone()));
        plan.unplaceable.sort();
        plan.unplaceable.dedup();
    }
    plan
}

/// Why a pending instance waits: no template fits it (or each that fits is at
/// `max_workers`).
pub const WAIT_UNPLACEABLE: &str =
    "no worker template fits it, or every template that fits is at max_workers";
/// Why a pending instance waits: a worker being provisioned will take it.
pub const WAIT_IN_FLIGHT: &str = "waiting for a worker that is being provisioned";
/// Why a pending instance waits: a running worker has room now.
pub const WAIT_ROOM: &str = "a running worker has room: the scheduler places it next";
/// Why a pending instance waits: the plan launches a worker for it.
pub const WAIT_LAUNCH: &str = "waiting for a new worker the autoscaler launched for it";

/// Each pending instance's reason to wait, by `plan`.
fn waiting_reasons(
    ctx: &ControllerCtx,
    pending: &[crate::domain::worker::Instance],
    plan: &crate::domain::controller::ScalePlan,
) -> std::collections::HashMap<String, &'static str> {
    let unplaceable: HashSet<&str> = plan.unplaceable.iter().map(String::as_str).collect();
    let absorbed: HashSet<&str> = plan
        .absorbed_by_in_flight
        .iter()
        .map(String::as_str)
        .collect();
    let deps = ctx.workers.deps();
    // One capacity lookup per requirements shape, not per instance.
    let mut fits: std::collections::HashMap<(u64, u64), bool> = Default::default();
    pending
        .iter()
        .map(|i| {
            let r = &i.requirements;
            let reason = if unplaceable.contains(i.id.as_str()) {
                WAIT_UNPLACEABLE
            } else if absorbed.contains(i.id.as_str()) {
                WAIT_IN_FLIGHT
            } else if *fits
                .entry((r.cpu.to_bits(), r.memory_gb.to_bits()))
                .or_insert_with(|| deps.best_fit(r).is_some())
            {
                WAIT_ROOM
            } else {
                WAIT_LAUNCH
            };
            (i.id.clone(), reason)
        })
        .collect()
}

/// Creates a worker (PENDING), asks the cloud for it (PROVISIONING).
async fn launch(ctx: &ControllerCtx, template: &str, reason: &str, since: Option<Instant>) {
    let Some(tpl) = ctx.template(template).cloned() else {
        return;
    };
    let id = format!("w-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let worker = Worker::new(&id, &tpl, ctx.clock.now());
    match ctx.workers.send(&id, WorkerCmd::Create(worker), true).await {
        Ok(_) => ctx.decide("scale_up", &id, &format!("{reason} (template {template})")),
        Err(WorkerExecError::Fenced) => return,
        Err(e) => {
            ctx.failed("create_worker_failed", &id, &e.to_string());
            return;
        }
    }
    let _ = provision(ctx, &id, &tpl, since).await;
}

async fn provision(
    ctx: &ControllerCtx,
    id: &str,
    tpl: &crate::domain::worker::WorkerTemplate,
    since: Option<Instant>,
) -> Result<(), WorkerExecError> {
    let to_provisioning = WorkerCmd::Transition {
        to: WorkerState::Provisioning,
        cloud_instance_id: None,
    };
    if let Err(e) = ctx.workers.send(id, to_provisioning, true).await {
        if e != WorkerExecError::Fenced {
            ctx.failed("mark_provisioning_failed", id, &e.to_string());
        }
        return Err(e);
    }
    if let Some(t) = since {
        ctx.metrics
            .scale_up_latency
            .with_label_values(&[&tpl.name])
            .observe(t.elapsed().as_secs_f64());
    }
    create_and_record(ctx, id, tpl).await
}

/// Launches the instance of worker `id` (fenced) and records its cloud id; every
/// failure is surfaced (status, journal, metric), none is swallowed.
async fn create_and_record(
    ctx: &ControllerCtx,
    id: &str,
    tpl: &crate::domain::worker::WorkerTemplate,
) -> Result<(), WorkerExecError> {
    let cloud_id = match ctx.cloud_create(tpl, id).await {
        Ok(c) => c,
        Err(EffectError::Fence(e)) => return Err(not_authorized(e)),
        Err(EffectError::Cloud(e)) => {
            ctx.failed("launch_failed", id, &e.to_string());
            return Ok(());
        }
    };
    match ctx
        .workers
        .send(id, WorkerCmd::SetCloudId(cloud_id.clone()), true)
        .await
    {
        Ok(_) => Ok(()),
        Err(WorkerExecError::Fenced) => Err(WorkerExecError::Fenced),
        Err(e) => {
            // The next poll asks the cloud again, which finds this instance by its
            // worker-id tag instead of launching another.
            ctx.failed(
                "record_cloud_id_failed",
                id,
                &format!("cloud instance {cloud_id}: {e}"),
            );
            Ok(())
        }
    }
}

/// Moves in-flight workers along with what the cloud reports.
async fn drive(
    ctx: &ControllerCtx,
    scheduler: Option<&Recipient<Schedule>>,
    mut asked: HashSet<String>,
) -> HashSet<String> {
    if ctx.fence.epoch().is_none() {
        return asked;
    }
    let now = ctx.clock.now();
    // Only the workers in motion (from the index, not a copy of every worker): RUNNING
    // and TERMINATED ones need nothing from this poll.
    let moving = ctx.workers.deps().moving();
    for w in moving.iter().filter_map(|id| ctx.workers.get(id)) {
        // Each step may have waited on etcd or the cloud: stop as soon as the lease may
        // have lapsed (a frozen leader resumes here), before any further cloud call.
        if !ctx.fence.is_leading() {
            break;
        }
        let result = match w.state {
            WorkerState::Pending => match ctx.template(&w.template).cloned() {
                Some(tpl) => provision(ctx, &w.id, &tpl, None).await,
                None => Ok(()),
            },
            WorkerState::Provisioning => advance_provisioning(ctx, &w, scheduler).await,
            WorkerState::Draining if drain_complete(&w, now) => begin_stop(ctx, &w).await,
            WorkerState::Stopping => settle_stopping(ctx, &w, &mut asked).await,
            WorkerState::Stopped | WorkerState::Failed => {
                settle_terminating(ctx, &w, &mut asked).await
            }
            _ => Ok(()),
        };
        if let Err(e) = result {
            if e == WorkerExecError::Fenced {
                break;
            }
            ctx.failed("worker_step_failed", &w.id, &e.to_string());
        }
    }
    asked
}

async fn transition(ctx: &ControllerCtx, id: &str, to: WorkerState) -> Result<(), WorkerExecError> {
    let cmd = WorkerCmd::Transition {
        to,
        cloud_instance_id: None,
    };
    ctx.workers.send(id, cmd, true).await.map(|_| ())
}

async fn advance_provisioning(
    ctx: &ControllerCtx,
    w: &Worker,
    scheduler: Option<&Recipient<Schedule>>,
) -> Result<(), WorkerExecError> {
    let Some(cloud_id) = &w.cloud_instance_id else {
        // The launch call failed or was cut off: ask again (the adapter finds an
        // instance already tagged with this worker id instead of launching twice).
        if let Some(tpl) = ctx.template(&w.template).cloned() {
            create_and_record(ctx, &w.id, &tpl).await?;
        }
        return Ok(());
    };
    match ctx.cloud.get_instance_status(cloud_id).await {
        Ok(CloudInstanceStatus::Running) => {
            // A host is ready for labs only when its CML says so; until then the worker
            // stays PROVISIONING (and the provisioning timeout still applies).
            if let Some(agent) = ctx.agent() {
                let target = AgentTarget {
                    worker_id: w.id.clone(),
                    instance_id: Some(cloud_id.clone()),
                    private_ip: ctx.cloud.instance_private_ip(cloud_id).await.ok().flatten(),
                };
                match agent.system_ready(&target).await {
                    Ok(true) => {}
                    Ok(false) => {
                        debug!(worker = %w.id, "cloud instance running; CML not ready yet");
                        return Ok(());
                    }
                    Err(e) => {
                        debug!(worker = %w.id, error = %e, "cloud instance running; CML not answering yet");
                        return Ok(());
                    }
                }
            }
            transition(ctx, &w.id, WorkerState::Running).await?;
            let why = if ctx.agent().is_some() {
                "cloud reports the instance running and its agent ready"
            } else {
                "cloud reports the instance running"
            };
            ctx.decide("running", &w.id, why);
            if let Some(s) = scheduler {
                s.do_send(Schedule);
            }
            Ok(())
        }
        Ok(CloudInstanceStatus::Terminated | CloudInstanceStatus::NotFound) => {
            ctx.decide(
                "mark_failed",
                &w.id,
                "cloud instance vanished while provisioning",
            );
            transition(ctx, &w.id, WorkerState::Failed).await
        }
        Ok(_) => Ok(()),
        Err(e) => {
            ctx.failed("cloud_status_failed", &w.id, &e.to_string());
            Ok(())
        }
    }
}

/// A side effect that could not be authorized: deposed (stop the pass) or the store
/// could not record the intent (surfaced as a failed step).
fn not_authorized(e: FenceError) -> WorkerExecError {
    match e {
        FenceError::Store(e) => WorkerExecError::Store(e),
        FenceError::NotLeader | FenceError::Deposed => WorkerExecError::Fenced,
    }
}

/// DRAINING -> STOPPING, then the STOPPING step itself ([`stop_host`]). The STOPPING
/// record is the intent of the whole step: nothing is stopped unless it was written, and
/// a leader that finds it (after a restart or a failover) does the step again.
async fn begin_stop(ctx: &ControllerCtx, w: &Worker) -> Result<(), WorkerExecError> {
    let reason = if w.instances.is_empty() {
        "drained: no instances left"
    } else {
        "drain deadline passed"
    };
    transition(ctx, &w.id, WorkerState::Stopping).await?;
    ctx.decide("stop", &w.id, reason);
    match &w.cloud_instance_id {
        Some(cloud_id) => stop_host(ctx, w, cloud_id).await,
        None => Ok(()),
    }
}

/// The STOPPING step: labs still started on a host stopped at its drain deadline are
/// stopped first (through the worker agent, each after a fenced write), then the cloud
/// is asked to stop the instance.
async fn stop_host(ctx: &ControllerCtx, w: &Worker, cloud_id: &str) -> Result<(), WorkerExecError> {
    if !w.instances.is_empty() {
        stop_labs(ctx, w).await?;
    }
    request_stop(ctx, w, cloud_id).await
}

/// Stops the labs of the worker's instances that its host still runs (the drain
/// deadline passed with instances on it), so the host shuts down with its labs stopped
/// cleanly. Labs of no known instance are left alone, as the agent sync does. An agent
/// that cannot be read does not hold the stop up: the deadline has passed, and the cloud
/// stop shuts the host down either way.
async fn stop_labs(ctx: &ControllerCtx, w: &Worker) -> Result<(), WorkerExecError> {
    let Some(agent) = ctx.agent() else {
        return Ok(());
    };
    let private_ip = match &w.cloud_instance_id {
        Some(cid) => ctx.cloud.instance_private_ip(cid).await.ok().flatten(),
        None => None,
    };
    let target = AgentTarget {
        worker_id: w.id.clone(),
        instance_id: w.cloud_instance_id.clone(),
        private_ip,
    };
    let labs = match agent.labs(&target).await {
        Ok(labs) => labs,
        Err(e) => {
            ctx.failed(
                "stop_labs_failed",
                &w.id,
                &format!("{e}; stopping the host with its labs"),
            );
            return Ok(());
        }
    };
    let ours = labs
        .iter()
        .filter(|l| l.state.is_started() && w.instances.iter().any(|i| l.belongs_to(i)));
    for lab in ours {
        let _permit = ctx
            .authorize("agent_stop_lab", &lab.id)
            .await
            .map_err(not_authorized)?;
        match agent.stop_lab(&target, &lab.id).await {
            Ok(()) => ctx.decide(
                "stop_lab",
                &w.id,
                &format!(
                    "lab {} ({}) still started at the drain deadline",
                    lab.id, lab.title
                ),
            ),
            Err(e) => ctx.failed("stop_lab_failed", &w.id, &format!("lab {}: {e}", lab.id)),
        }
    }
    Ok(())
}

/// Asks the cloud (fenced) to stop the worker's instance. Repeated while the cloud does
/// not show the stop under way (after a restart, or a request that was lost): the
/// adapters treat a repeated stop as a no-op.
async fn request_stop(
    ctx: &ControllerCtx,
    w: &Worker,
    cloud_id: &str,
) -> Result<(), WorkerExecError> {
    match ctx.cloud_stop(cloud_id).await {
        Ok(()) => Ok(()),
        Err(EffectError::Fence(e)) => Err(not_authorized(e)),
        Err(EffectError::Cloud(e)) => {
            ctx.failed(
                "stop_failed",
                &w.id,
                &format!("cloud instance {cloud_id}: {e}; will retry"),
            );
            Ok(())
        }
    }
}

/// Asks the cloud (fenced) to terminate the worker's instance; journaled once per
/// worker (`asked`), repeated (a no-op for the adapters) while the cloud does not show
/// the termination under way.
async fn request_terminate(
    ctx: &ControllerCtx,
    w: &Worker,
    cloud_id: &str,
    asked: &mut HashSet<String>,
) -> Result<(), WorkerExecError> {
    match ctx.cloud_terminate(cloud_id).await {
        Ok(()) => {
            if asked.insert(w.id.clone()) {
                let why = if w.state == WorkerState::Failed {
                    "worker failed: nothing to stop cleanly"
                } else {
                    "cloud reports the instance stopped"
                };
                ctx.decide("terminate", &w.id, why);
            }
            Ok(())
        }
        Err(EffectError::Fence(e)) => Err(not_authorized(e)),
        Err(EffectError::Cloud(e)) => {
            ctx.failed(
                "terminate_failed",
                &w.id,
                &format!("cloud instance {cloud_id}: {e}; will retry"),
            );
            Ok(())
        }
    }
}

/// The cloud's word on the worker's instance; a failed read is surfaced and `None`.
async fn cloud_status(
    ctx: &ControllerCtx,
    w: &Worker,
    cloud_id: &str,
) -> Option<CloudInstanceStatus> {
    match ctx.cloud.get_instance_status(cloud_id).await {
        Ok(s) => Some(s),
        Err(e) => {
            ctx.failed("cloud_status_failed", &w.id, &e.to_string());
            None
        }
    }
}

/// TERMINATED once the cloud reports the instance gone.
async fn mark_terminated(
    ctx: &ControllerCtx,
    w: &Worker,
    asked: &mut HashSet<String>,
    why: &str,
) -> Result<(), WorkerExecError> {
    transition(ctx, &w.id, WorkerState::Terminated).await?;
    ctx.decide("terminated", &w.id, why);
    asked.remove(&w.id);
    Ok(())
}

/// STOPPING: the stop was asked for (the record says so, whoever wrote it); STOPPED
/// once the cloud reports the instance stopped, then terminate.
async fn settle_stopping(
    ctx: &ControllerCtx,
    w: &Worker,
    asked: &mut HashSet<String>,
) -> Result<(), WorkerExecError> {
    let Some(cloud_id) = &w.cloud_instance_id else {
        return mark_terminated(ctx, w, asked, "no cloud instance was ever launched").await;
    };
    let Some(status) = cloud_status(ctx, w, cloud_id).await else {
        return Ok(());
    };
    match status {
        CloudInstanceStatus::Stopped => {
            transition(ctx, &w.id, WorkerState::Stopped).await?;
            ctx.decide("stopped", &w.id, "cloud reports the instance stopped");
            let stopped = Worker {
                state: WorkerState::Stopped,
                ..w.clone()
            };
            request_terminate(ctx, &stopped, cloud_id, asked).await
        }
        CloudInstanceStatus::Terminated | CloudInstanceStatus::NotFound => {
            mark_terminated(ctx, w, asked, "cloud reports the instance gone").await
        }
        // Under way (or terminating by someone else's hand): wait for the cloud.
        CloudInstanceStatus::Stopping | CloudInstanceStatus::ShuttingDown => Ok(()),
        CloudInstanceStatus::Pending | CloudInstanceStatus::Running => {
            stop_host(ctx, w, cloud_id).await
        }
    }
}

/// STOPPED or FAILED: terminate, and TERMINATED once the cloud reports the instance
/// gone. A FAILED worker skips the stop: its host is broken or unreachable, so a clean
/// shutdown buys nothing (its instances are rescheduled already).
async fn settle_terminating(
    ctx: &ControllerCtx,
    w: &Worker,
    asked: &mut HashSet<String>,
) -> Result<(), WorkerExecError> {
    let Some(cloud_id) = &w.cloud_instance_id else {
        if w.state == WorkerState::Failed {
            return Ok(());
        }
        return mark_terminated(ctx, w, asked, "no cloud instance was ever launched").await;
    };
    let Some(status) = cloud_status(ctx, w, cloud_id).await else {
        return Ok(());
    };
    match status {
        CloudInstanceStatus::Terminated | CloudInstanceStatus::NotFound => {
            mark_terminated(ctx, w, asked, "cloud reports the instance gone").await
        }
        CloudInstanceStatus::ShuttingDown => Ok(()),
        _ => request_terminate(ctx, w, cloud_id, asked).await,
    }
}
