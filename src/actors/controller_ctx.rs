//! The Resource Controller's shared context and its decision journal, and the messages
//! the controller actors send each other. It starts none of them (the supervisor in
//! [`crate::actors::controller`] does), so the scheduler, autoscaler and reconciler
//! import this module and never each other or their supervisor: no import circle.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use actix::prelude::*;
use chrono::{DateTime, Utc};
use serde::Serialize;
use tracing::info;

use crate::actors::leader::{Fence, FenceError, LeaderStatus, Permit};
use crate::actors::mirror::{Mirror, MirrorIndex};
use crate::actors::worker::WorkerRegistry;
use crate::clock::Clock;
use crate::config::ControllerSettings;
use crate::domain::schedule_index::PendingQueue;
use crate::domain::worker::{Instance, InstanceState, WorkerTemplate};
use crate::ports::agent::WorkerAgent;
use crate::ports::cloud::{CloudError, CloudProvider};
use crate::ports::store::Store;
use crate::telemetry::Metrics;

/// Place pending instances now (to the scheduler).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Schedule;

/// Instances that could not be placed, and when that was first seen (to the
/// autoscaler).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Demand {
    /// Instance ids.
    pub instances: Vec<String>,
    /// When the scheduler gave up on them.
    pub seen_at: Instant,
}

/// Launch workers so every template has its `min_workers` (to the autoscaler).
#[derive(Message)]
#[rtype(result = "()")]
pub struct EnsureMinimum;

/// Stop (leadership lost); every leader-only actor handles it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Stop;

/// The autoscaler as the other controller actors reach it.
#[derive(Clone)]
pub struct AutoscalerHandle {
    /// Unplaceable demand.
    pub demand: Recipient<Demand>,
    /// `min_workers` check.
    pub ensure_minimum: Recipient<EnsureMinimum>,
    /// Stop.
    pub stop: Recipient<Stop>,
}

/// The leader-only actors while this replica leads.
#[derive(Clone)]
pub struct LeaderActors {
    /// The scheduler's pass.
    pub scheduler: Recipient<Schedule>,
    /// Stops the scheduler.
    pub stop_scheduler: Recipient<Stop>,
    /// The autoscaler.
    pub autoscaler: AutoscalerHandle,
    /// Stops the reconciler.
    pub stop_reconciler: Recipient<Stop>,
}

impl LeaderActors {
    /// Whether all of them are alive (a panic in a handler ends an actor for good).
    pub fn alive(&self) -> bool {
        self.scheduler.connected()
            && self.autoscaler.stop.connected()
            && self.stop_reconciler.connected()
    }

    /// Stops all of them.
    pub fn stop(&self) {
        self.stop_scheduler.do_send(Stop);
        self.autoscaler.stop.do_send(Stop);
        self.stop_reconciler.do_send(Stop);
    }
}

/// How many decisions the journal keeps.
const JOURNAL: usize = 200;

/// One controller decision, with its reason.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DecisionRecord {
    /// When.
    #[serde(with = "crate::domain::time")]
    pub at: DateTime<Utc>,
    /// What (e.g. `scale_up`, `drain`, `mark_failed`).
    pub action: String,
    /// On what (worker or instance id, template).
    pub subject: String,
    /// Why.
    pub reason: String,
}

/// Outcome of the last reconcile pass.
#[derive(Debug, Clone, Serialize, Default, PartialEq)]
pub struct ReconcileStatus {
    /// When it finished.
    #[serde(with = "crate::domain::time::option")]
    pub at: Option<DateTime<Utc>>,
    /// `ok`, or the first error of the pass or of the autoscaler since the pass before.
    pub outcome: Option<String>,
    /// Passes so far.
    pub passes: u64,
    /// The latest failed controller step (cloud call, worker record write), if any.
    pub last_error: Option<StepError>,
    /// Failed controller steps so far.
    pub errors: u64,
}

/// A controller step that failed.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StepError {
    /// When.
    #[serde(with = "crate::domain::time")]
    pub at: DateTime<Utc>,
    /// Which step (e.g. `launch_failed`, `terminate_failed`, `record_cloud_id_failed`).
    pub step: String,
    /// On what (worker or cloud instance id).
    pub subject: String,
    /// The error.
    pub error: String,
}

/// Why a fenced side effect did not happen.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EffectError {
    /// Its intent could not be recorded under this replica's leadership: nothing was
    /// done.
    #[error(transparent)]
    Fence(#[from] FenceError),
    /// The cloud call itself failed.
    #[error(transparent)]
    Cloud(#[from] CloudError),
}

/// Everything the controller actors share.
pub struct ControllerCtx {
    /// Store.
    pub store: Arc<dyn Store>,
    /// Cloud provider.
    pub cloud: Arc<dyn CloudProvider>,
    /// Worker templates.
    pub templates: Vec<WorkerTemplate>,
    /// Worker actors and view.
    pub workers: Arc<WorkerRegistry>,
    /// Instances view.
    pub instances: Arc<Mirror<Instance>>,
    /// Leader fence.
    pub fence: Arc<Fence>,
    /// Settings.
    pub settings: ControllerSettings,
    /// Metrics.
    pub metrics: Metrics,
    /// Time source (shared with the worker actors).
    pub clock: Clock,
    journal: Mutex<VecDeque<DecisionRecord>>,
    /// Why each pending instance waits, as the autoscaler's last plan found it.
    waiting: Mutex<HashMap<String, &'static str>>,
    reconcile: Mutex<ReconcileStatus>,
    unreported: Mutex<Option<String>>,
    running: Mutex<Option<LeaderActors>>,
    agent: OnceLock<Arc<dyn WorkerAgent>>,
    pending: Arc<PendingIndex>,
    /// A [`Schedule`] sent by [`Self::kick`] is waiting in the scheduler's mailbox: the
    /// changes meanwhile are seen by that pass, so no second one is queued.
    kick_queued: AtomicBool,
}

/// The PENDING instances of the instance mirror, in scheduling order, kept by the
/// mirror itself on every change (watch or own write): a pass reads the queue instead
/// of every instance.
#[derive(Default)]
struct PendingIndex(Mutex<PendingQueue>);

impl MirrorIndex<Instance> for PendingIndex {
    fn resync(&self, id: &str, read: &dyn Fn() -> Option<Instance>) {
        if let Ok(mut q) = self.0.lock() {
            let current = read();
            q.sync(id, current.as_ref());
        }
    }
}

impl ControllerCtx {
    /// A context.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<dyn Store>,
        cloud: Arc<dyn CloudProvider>,
        templates: Vec<WorkerTemplate>,
        workers: Arc<WorkerRegistry>,
        instances: Arc<Mirror<Instance>>,
        fence: Arc<Fence>,
        settings: ControllerSettings,
        metrics: Metrics,
    ) -> Arc<Self> {
        let clock = workers.deps().clock;
        let pending = Arc::new(PendingIndex::default());
        instances.set_index(pending.clone());
        Arc::new(Self {
            store,
            cloud,
            templates,
            workers,
            instances,
            fence,
            clock,
            settings,
            metrics,
            journal: Mutex::new(VecDeque::new()),
            waiting: Mutex::new(HashMap::new()),
            reconcile: Mutex::new(ReconcileStatus::default()),
            unreported: Mutex::new(None),
            running: Mutex::new(None),
            agent: OnceLock::new(),
            pending,
            kick_queued: AtomicBool::new(false),
        })
    }

    /// Sets the worker agent (CML) that must report a host ready before its worker
    /// becomes RUNNING. Without one (`WORKER_AGENT=heartbeat`) the cloud's word is enough.
    pub fn set_agent(&self, agent: Arc<dyn WorkerAgent>) {
        let _ = self.agent.set(agent);
    }

    /// The worker agent, if any.
    pub fn agent(&self) -> Option<&Arc<dyn WorkerAgent>> {
        self.agent.get()
    }

    /// Logs, counts and journals a decision.
    pub fn decide(&self, action: &str, subject: &str, reason: &str) {
        info!(action, subject, reason, "controller decision");
        self.metrics.decisions.with_label_values(&[action]).inc();
        if let Ok(mut j) = self.journal.lock() {
            j.push_back(DecisionRecord {
                at: self.clock.now(),
                action: action.to_owned(),
                subject: subject.to_owned(),
                reason: reason.to_owned(),
            });
            while j.len() > JOURNAL {
                j.pop_front();
            }
        }
    }

    /// Records why each pending instance waits, from the autoscaler's last plan
    /// (replacing the previous plan's reasons).
    pub fn set_waiting(&self, reasons: HashMap<String, &'static str>) {
        if let Ok(mut w) = self.waiting.lock() {
            *w = reasons;
        }
    }

    /// Why `id` waits, if the autoscaler's last plan saw it.
    pub fn waiting_reason(&self, id: &str) -> Option<&'static str> {
        self.waiting.lock().ok().and_then(|w| w.get(id).copied())
    }

    /// [`Self::waiting_reason`] of each of `ids` that has one (under one lock).
    pub fn waiting_reasons<'a>(&self, ids: &'a [String]) -> Vec<(&'a str, &'static str)> {
        self.waiting
            .lock()
            .map(|w| {
                ids.iter()
                    .filter_map(|id| w.get(id).map(|r| (id.as_str(), *r)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Recent decisions, newest last.
    pub fn decisions(&self) -> Vec<DecisionRecord> {
        self.journal
            .lock()
            .map(|j| j.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Records a failed step: logged, journaled, counted (`controller_decisions_total`
    /// with the step as action), shown as `last_error` in the controller status, and
    /// reported as the outcome of the next reconcile pass.
    pub fn failed(&self, step: &str, subject: &str, error: &str) {
        self.decide(step, subject, error);
        let message = format!("{step} {subject}: {error}");
        if let Ok(mut u) = self.unreported.lock() {
            u.get_or_insert(message);
        }
        if let Ok(mut r) = self.reconcile.lock() {
            r.errors += 1;
            r.last_error = Some(StepError {
                at: self.clock.now(),
                step: step.to_owned(),
                subject: subject.to_owned(),
                error: error.to_owned(),
            });
        }
    }

    /// Records a reconcile pass; a step that failed since the last pass makes an
    /// otherwise clean pass report that failure instead of `ok`.
    pub fn reconciled(&self, outcome: Result<(), String>) {
        let earlier = self.unreported.lock().ok().and_then(|mut u| u.take());
        let outcome = match (outcome, earlier) {
            (Err(e), _) => e,
            (Ok(()), Some(e)) => e,
            (Ok(()), None) => "ok".to_owned(),
        };
        if let Ok(mut r) = self.reconcile.lock() {
            r.at = Some(self.clock.now());
            r.outcome = Some(outcome);
            r.passes += 1;
        }
    }

    /// Records the intent of a side effect outside etcd with a fenced write (see
    /// [`Fence::authorize`]); act only on `Ok`.
    pub async fn authorize(&self, kind: &str, subject: &str) -> Result<Permit, FenceError> {
        self.fence
            .authorize(self.store.as_ref(), kind, subject)
            .await
    }

    /// The last reconcile pass.
    pub fn reconcile_status(&self) -> ReconcileStatus {
        self.reconcile.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Launches the cloud instance of `worker_id`, only after a fenced write recorded
    /// the intent, and journals each capacity fallback the launch made
    /// (`launch_fallback`: the try that failed, its error code, the try made next).
    pub async fn cloud_create(
        &self,
        template: &WorkerTemplate,
        worker_id: &str,
    ) -> Result<String, EffectError> {
        let _permit = self.authorize("cloud_create", worker_id).await?;
        let outcome = self.cloud.create_instance(template, worker_id).await?;
        for fallback in &outcome.fallbacks {
            self.decide(
                "launch_fallback",
                worker_id,
                &format!("template {}: {fallback}", template.name),
            );
        }
        Ok(outcome.instance_id)
    }

    /// Stops cloud instance `instance_id` (the STOPPING step of a worker), only after a
    /// fenced write recorded the intent.
    pub async fn cloud_stop(&self, instance_id: &str) -> Result<(), EffectError> {
        let _permit = self.authorize("cloud_stop", instance_id).await?;
        Ok(self.cloud.stop_instance(instance_id).await?)
    }

    /// Terminates cloud instance `instance_id`, only after a fenced write recorded the
    /// intent.
    pub async fn cloud_terminate(&self, instance_id: &str) -> Result<(), EffectError> {
        let _permit = self.authorize("cloud_terminate", instance_id).await?;
        Ok(self.cloud.terminate_instance(instance_id).await?)
    }

    /// PENDING instances, oldest first (from the pending queue: the cost follows the
    /// number pending, not the number of instances).
    pub fn pending(&self) -> Vec<(Instance, i64)> {
        self.pending_ids()
            .into_iter()
            .filter_map(|id| self.instances.get(&id))
            .filter(|(i, _)| i.state == InstanceState::Pending)
            .collect()
    }

    /// Ids of the PENDING instances, oldest first.
    pub fn pending_ids(&self) -> Vec<String> {
        self.with_pending(|q| q.ids()).unwrap_or_default()
    }

    /// How many instances are PENDING.
    pub fn pending_len(&self) -> usize {
        self.with_pending(|q| q.len()).unwrap_or_default()
    }

    /// `f` of the pending queue, under its lock (`None`: the lock is poisoned).
    pub fn with_pending<T>(&self, f: impl FnOnce(&mut PendingQueue) -> T) -> Option<T> {
        self.pending.0.lock().ok().map(|mut q| f(&mut q))
    }

    /// A template by name.
    pub fn template(&self, name: &str) -> Option<&WorkerTemplate> {
        self.templates.iter().find(|t| t.name == name)
    }

    /// Asks the scheduler (if this replica leads) to place pending instances now; at
    /// most one such request waits in its mailbox at a time.
    pub fn kick(&self) {
        if let Some(r) = self.running() {
            if !self.kick_queued.swap(true, Ordering::AcqRel) {
                r.scheduler.do_send(Schedule);
            }
        }
    }

    /// A scheduling pass starts: it reads the queue from now on, so the next change
    /// must queue a new pass (see [`Self::kick`]).
    pub fn pass_started(&self) {
        self.kick_queued.store(false, Ordering::Release);
    }

    /// The leader-only actors, while leading.
    pub fn running(&self) -> Option<LeaderActors> {
        self.running.lock().ok().and_then(|r| r.clone())
    }

    /// The slot of the leader-only actors (filled by the supervisor while leading).
    pub(crate) fn running_slot(&self) -> &Mutex<Option<LeaderActors>> {
        &self.running
    }

    /// The autoscaler while leading.
    pub fn autoscaler(&self) -> Option<AutoscalerHandle> {
        self.running().map(|r| r.autoscaler)
    }

    /// The scheduler while leading.
    pub fn scheduler(&self) -> Option<Recipient<Schedule>> {
        self.running().map(|r| r.scheduler)
    }

    /// Whether the worker and instance views hold their first listing. Until then a
    /// running worker, or an instance placed on it, looks absent: a leader deciding
    /// then would launch for `min_workers` again, scale up for demand the fleet has room
    /// for, or take a lab for unknown.
    pub fn hydrated(&self) -> bool {
        self.workers.is_loaded() && self.instances.is_loaded()
    }

    /// Election status.
    pub fn leader_status(&self) -> LeaderStatus {
        LeaderStatus {
            instance_id: self.settings.instance_id.clone(),
            is_leader: self.fence.epoch().is_some(),
            leader_id: self.fence.leader().map(|(id, _)| id),
            epoch: self.fence.epoch(),
        }
    }

    /// Watches the instance mirror and asks the scheduler to run on every change.
    pub async fn kick_on_changes(self: Arc<Self>) {
        let notify = self.instances.changes();
        loop {
            notify.notified().await;
            self.kick();
        }
    }
}
