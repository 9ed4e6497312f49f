//! The Resource Controller's shared context, its decision journal, and the supervisor
//! that starts the scheduler, autoscaler and reconciler when this replica becomes the
//! leader and stops them the moment it steps down.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};

use actix::prelude::*;
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::actors::autoscaler::Autoscaler;
use crate::actors::leader::on_leadership;
use crate::actors::leader::{Fence, FenceError, LeaderStatus, Permit};
use crate::actors::mirror::Mirror;
use crate::actors::reconciler::Reconciler;
use crate::actors::scheduler::{Schedule, Scheduler};
use crate::actors::worker::WorkerRegistry;
use crate::clock::Clock;
use crate::config::ControllerSettings;
use crate::domain::worker::{Instance, InstanceState, WorkerTemplate};
use crate::ports::agent::WorkerAgent;
use crate::ports::cloud::{CloudError, CloudProvider};
use crate::ports::store::Store;
use crate::telemetry::Metrics;

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
    reconcile: Mutex<ReconcileStatus>,
    unreported: Mutex<Option<String>>,
    running: Mutex<Option<Running>>,
    agent: OnceLock<Arc<dyn WorkerAgent>>,
}

#[derive(Clone)]
struct Running {
    scheduler: Addr<Scheduler>,
    autoscaler: Addr<Autoscaler>,
    reconciler: Addr<Reconciler>,
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
            reconcile: Mutex::new(ReconcileStatus::default()),
            unreported: Mutex::new(None),
            running: Mutex::new(None),
            agent: OnceLock::new(),
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

    /// PENDING instances, oldest first.
    pub fn pending(&self) -> Vec<(Instance, i64)> {
        let mut p: Vec<(Instance, i64)> = self
            .instances
            .all()
            .into_iter()
            .filter(|(i, _)| i.state == InstanceState::Pending)
            .collect();
        p.sort_by(|a, b| (a.0.created_at, &a.0.id).cmp(&(b.0.created_at, &b.0.id)));
        p
    }

    /// A template by name.
    pub fn template(&self, name: &str) -> Option<&WorkerTemplate> {
        self.templates.iter().find(|t| t.name == name)
    }

    /// Asks the scheduler (if this replica leads) to place pending instances now.
    pub fn kick(&self) {
        if let Some(r) = self.running() {
            r.scheduler.do_send(Schedule);
        }
    }

    fn running(&self) -> Option<Running> {
        self.running.lock().ok().and_then(|r| r.clone())
    }

    /// Address of the autoscaler while leading.
    pub fn autoscaler(&self) -> Option<Addr<Autoscaler>> {
        self.running().map(|r| r.autoscaler)
    }

    /// Address of the scheduler while leading.
    pub fn scheduler(&self) -> Option<Addr<Scheduler>> {
        self.running().map(|r| r.scheduler)
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

    /// Starts the leader-only actors on the current arbiter.
    pub fn start_leading(self: &Arc<Self>) {
        let mut slot = match self.running.lock() {
            Ok(s) => s,
            Err(_) => return,
        };
        if slot.is_some() {
            return;
        }
        let autoscaler = Autoscaler::new(self.clone()).start();
        let scheduler = Scheduler::new(self.clone(), autoscaler.clone()).start();
        let reconciler = Reconciler::new(self.clone(), autoscaler.clone()).start();
        autoscaler.do_send(crate::actors::autoscaler::SetScheduler(scheduler.clone()));
        *slot = Some(Running {
            scheduler,
            autoscaler,
            reconciler,
        });
        self.decide("lead", &self.settings.instance_id, "won the election");
    }

    /// Restarts the leader-only actors when one of them has died while this replica
    /// still leads: a panic in an actix handler ends that actor for good (a `Supervisor`
    /// only restarts actors that stop themselves), and a dead scheduler, autoscaler or
    /// reconciler would otherwise leave the leader doing nothing until it restarts.
    /// Returns whether it restarted them.
    pub fn revive_if_dead(self: &Arc<Self>) -> bool {
        let dead = self.running().is_some_and(|r| {
            !r.scheduler.connected() || !r.autoscaler.connected() || !r.reconciler.connected()
        });
        if !dead {
            return false;
        }
        warn!("a leader-only controller actor died; restarting them from the store");
        if let Some(r) = self.running.lock().ok().and_then(|mut s| s.take()) {
            r.scheduler.do_send(crate::actors::scheduler::Stop);
            r.autoscaler.do_send(crate::actors::autoscaler::Stop);
            r.reconciler.do_send(crate::actors::reconciler::Stop);
        }
        self.metrics
            .decisions
            .with_label_values(&["controller_actor_restarted"])
            .inc();
        self.decide(
            "restart_actors",
            &self.settings.instance_id,
            "a leader-only actor died (panic); restarted",
        );
        if self.fence.epoch().is_some() {
            self.start_leading();
        }
        true
    }

    /// Checks every `every` that the leader-only actors are alive ([`Self::revive_if_dead`]).
    /// Runs for the life of the process, on the arbiter the actors are started on.
    pub async fn supervise(self: Arc<Self>, every: std::time::Duration) {
        crate::actors::leader::check_every(every, || {
            self.revive_if_dead();
        })
        .await;
    }

    /// Stops the leader-only actors.
    pub fn stop_leading(&self) {
        let taken = self.running.lock().ok().and_then(|mut s| s.take());
        if let Some(r) = taken {
            r.scheduler.do_send(crate::actors::scheduler::Stop);
            r.autoscaler.do_send(crate::actors::autoscaler::Stop);
            r.reconciler.do_send(crate::actors::reconciler::Stop);
            self.decide("step_down", &self.settings.instance_id, "lost leadership");
        }
    }

    /// Follows election changes: leader-only work runs only while leading.
    pub async fn follow_leadership(self: Arc<Self>, changes: watch::Receiver<Option<i64>>) {
        let (a, b) = (self.clone(), self);
        on_leadership(changes, move || a.start_leading(), move || b.stop_leading()).await;
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
