//! The supervisor of the Resource Controller: starts the scheduler, autoscaler and
//! reconciler when this replica becomes the leader and stops them the moment it steps
//! down. Their shared context lives in [`crate::actors::controller_ctx`] (re-exported
//! here), which imports none of them.

use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::watch;
use tracing::warn;

use crate::actors::autoscaler::{Autoscaler, SetScheduler};
pub use crate::actors::controller_ctx::{
    AutoscalerHandle, ControllerCtx, DecisionRecord, EffectError, LeaderActors, ReconcileStatus,
    StepError,
};
use crate::actors::leader::on_leadership;
use crate::actors::reconciler::Reconciler;
use crate::actors::scheduler::Scheduler;

/// How often a replica that has not yet loaded the fleet checks again before it acts as
/// the leader.
const HYDRATION_POLL: std::time::Duration = std::time::Duration::from_millis(20);

impl ControllerCtx {
    /// Starts the leader-only actors on the current arbiter.
    pub fn start_leading(self: &Arc<Self>) {
        let mut slot = match self.running_slot().lock() {
            Ok(s) => s,
            Err(_) => return,
        };
        if slot.is_some() {
            return;
        }
        let autoscaler = Autoscaler::new(self.clone()).start();
        let handle = AutoscalerHandle {
            demand: autoscaler.clone().recipient(),
            ensure_minimum: autoscaler.clone().recipient(),
            stop: autoscaler.clone().recipient(),
        };
        let scheduler = Scheduler::new(self.clone(), handle.demand.clone()).start();
        let reconciler = Reconciler::new(self.clone(), handle.clone()).start();
        autoscaler.do_send(SetScheduler(scheduler.clone().recipient()));
        *slot = Some(LeaderActors {
            scheduler: scheduler.clone().recipient(),
            stop_scheduler: scheduler.recipient(),
            autoscaler: handle,
            stop_reconciler: reconciler.recipient(),
        });
        self.decide("lead", &self.settings.instance_id, "won the election");
    }

    /// Restarts the leader-only actors when one of them has died while this replica
    /// still leads: a panic in an actix handler ends that actor for good (a `Supervisor`
    /// only restarts actors that stop themselves), and a dead scheduler, autoscaler or
    /// reconciler would otherwise leave the leader doing nothing until it restarts.
    /// Returns whether it restarted them.
    pub fn revive_if_dead(self: &Arc<Self>) -> bool {
        let dead = self.running().is_some_and(|r| !r.alive());
        if !dead {
            return false;
        }
        warn!("a leader-only controller actor died; restarting them from the store");
        if let Some(r) = self.running_slot().lock().ok().and_then(|mut s| s.take()) {
            r.stop();
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
        let taken = self.running_slot().lock().ok().and_then(|mut s| s.take());
        if let Some(r) = taken {
            r.stop();
            // The next leader plans (and journals) afresh; a follower shows no reasons.
            self.set_waiting(Default::default());
            self.decide("step_down", &self.settings.instance_id, "lost leadership");
        }
    }

    /// Follows election changes: leader-only work runs only while leading, and never
    /// before the views hold the whole fleet ([`ControllerCtx::hydrated`]).
    pub async fn follow_leadership(self: Arc<Self>, changes: watch::Receiver<Option<i64>>) {
        while !self.hydrated() {
            tokio::time::sleep(HYDRATION_POLL).await;
        }
        let (a, b) = (self.clone(), self);
        on_leadership(changes, move || a.start_leading(), move || b.stop_leading()).await;
    }
}
