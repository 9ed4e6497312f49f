//! The worker-agent sync: every `CML_SYNC_INTERVAL_MS` the leader reads the labs of each
//! RUNNING or DRAINING worker (at most `CML_CONCURRENCY` workers at once), records a
//! heartbeat for every worker that answered, and applies [`plan_sync`] through the same
//! fenced writes the heartbeat route and instance completion use: SCHEDULED -> RUNNING
//! (instance CAS), RUNNING -> COMPLETED (worker `Unplace` carrying the instance record).
//! A worker whose agent cannot be read gets no heartbeat, so the heartbeat timeout fails
//! it as before. Unknown labs are logged; started ones are stopped only with
//! `CML_STOP_UNKNOWN_LABS=true`, and only after the fenced writes of the round.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use futures::stream::{self, StreamExt};
use tracing::{info, warn};

use crate::actors::controller::ControllerCtx;
use crate::actors::instances;
use crate::actors::worker::{WorkerCmd, WorkerExecError};
use crate::domain::cml::{plan_sync, UnknownLab};
use crate::domain::worker::{Instance, InstanceState, Worker, WorkerState};
use crate::ports::agent::{AgentTarget, WorkerAgent};

/// What one round did for one worker.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkerSync {
    /// Worker id.
    pub worker_id: String,
    /// Whether the agent answered (and a heartbeat was recorded).
    pub reachable: bool,
    /// Instances moved SCHEDULED -> RUNNING.
    pub started: Vec<String>,
    /// Instances moved RUNNING -> COMPLETED.
    pub completed: Vec<String>,
    /// Labs no instance on the worker claims.
    pub unknown: Vec<UnknownLab>,
    /// Unknown labs stopped (only with `CML_STOP_UNKNOWN_LABS`).
    pub stopped_unknown: Vec<String>,
}

/// The sync loop and its dependencies.
pub struct AgentSync {
    ctl: Arc<ControllerCtx>,
    agent: Arc<dyn WorkerAgent>,
    stop_unknown: bool,
    concurrency: usize,
    interval: Duration,
    /// Cloud instance id -> private IP.
    ips: DashMap<String, String>,
}

/// Most private IPs kept before the cache starts afresh.
const MAX_CACHED_IPS: usize = 4_096;

impl AgentSync {
    /// A sync over `agent`.
    pub fn new(
        ctl: Arc<ControllerCtx>,
        agent: Arc<dyn WorkerAgent>,
        stop_unknown: bool,
        concurrency: usize,
        interval: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            ctl,
            agent,
            stop_unknown,
            concurrency: concurrency.max(1),
            interval,
            ips: DashMap::new(),
        })
    }

    /// Runs a round every interval while this replica leads, for the life of the service.
    pub async fn run_forever(self: Arc<Self>) {
        loop {
            tokio::time::sleep(self.interval).await;
            if self.ctl.fence.epoch().is_some() {
                let _ = self.sync_all().await;
            }
        }
    }

    /// One round over every RUNNING or DRAINING worker.
    pub async fn sync_all(&self) -> Vec<WorkerSync> {
        let workers: Vec<Worker> = self
            .ctl
            .workers
            .list()
            .into_iter()
            .filter(|w| matches!(w.state, WorkerState::Running | WorkerState::Draining))
            .collect();
        stream::iter(workers)
            .map(|w| async move { self.sync_worker(&w).await })
            .buffer_unordered(self.concurrency)
            .collect()
            .await
    }

    /// The worker's private IP, asked of the cloud once per cloud instance and kept.
    async fn private_ip(&self, w: &Worker) -> Option<String> {
        let cid = w.cloud_instance_id.as_deref()?;
        if let Some(ip) = self.ips.get(cid) {
            return Some(ip.clone());
        }
        match self.ctl.cloud.instance_private_ip(cid).await {
            Ok(Some(ip)) => {
                if self.ips.len() >= MAX_CACHED_IPS {
                    self.ips.clear();
                }
                self.ips.insert(cid.to_owned(), ip.clone());
                Some(ip)
            }
            Ok(None) => None,
            Err(e) => {
                warn!(worker = %w.id, error = %e, "private IP not known yet");
                None
            }
        }
    }

    /// Reads one worker's labs and applies the decision.
    pub async fn sync_worker(&self, w: &Worker) -> WorkerSync {
        let mut out = WorkerSync {
            worker_id: w.id.clone(),
            ..WorkerSync::default()
        };
        let placed: Vec<(Instance, i64)> = w
            .instances
            .iter()
            .filter_map(|id| self.ctl.instances.get(id))
            .collect();
        let insts: Vec<Instance> = placed.iter().map(|(i, _)| i.clone()).collect();
        self.agent.observe_placement(&w.id, &insts);
        let target = AgentTarget {
            worker_id: w.id.clone(),
            instance_id: w.cloud_instance_id.clone(),
            private_ip: self.private_ip(w).await,
        };
        let labs = match self.agent.labs(&target).await {
            Ok(l) => l,
            Err(e) => {
                warn!(worker = %w.id, agent = self.agent.name(), error = %e, "worker agent unreadable; no heartbeat recorded");
                return out;
            }
        };
        out.reachable = true;
        let at = self.ctl.clock.now();
        if let Err(e) = self
            .ctl
            .workers
            .send(&w.id, WorkerCmd::Heartbeat { at }, true)
            .await
        {
            warn!(worker = %w.id, error = %e, "agent heartbeat not recorded");
            return out;
        }
        let plan = plan_sync(&w.id, &insts, &labs);
        let retention = &self.ctl.workers.deps().retention;
        for m in &plan.moves {
            let Some((inst, rev)) = placed.iter().find(|(i, _)| i.id == m.instance_id) else {
                continue;
            };
            match m.to {
                InstanceState::Running => {
                    let r = instances::update(
                        self.ctl.store.as_ref(),
                        &inst.id,
                        Some(self.ctl.fence.as_ref()),
                        retention,
                        |cur| {
                            if cur.state != InstanceState::Scheduled
                                || cur.worker_id.as_deref() != Some(w.id.as_str())
                            {
                                return Ok(None);
                            }
                            let mut n = cur.clone();
                            n.state = InstanceState::Running;
                            Ok(Some(n))
                        },
                    )
                    .await;
                    match r {
                        Ok((i, r)) => {
                            let moved = i.state == InstanceState::Running;
                            self.ctl.instances.note(&inst.id, i, r);
                            if moved {
                                out.started.push(inst.id.clone());
                            }
                        }
                        Err(e) => {
                            warn!(instance = %inst.id, error = %e, "agent start not recorded")
                        }
                    }
                }
                InstanceState::Completed => {
                    let mut done = inst.clone();
                    done.state = InstanceState::Completed;
                    let cmd = WorkerCmd::Unplace {
                        instance_id: inst.id.clone(),
                        requirements: inst.requirements,
                        instance: Some((done, *rev)),
                    };
                    match self.ctl.workers.send(&w.id, cmd, true).await {
                        Ok(o) => {
                            if let Some((i, r)) = o.instance {
                                self.ctl.instances.note(&inst.id, i, r);
                            }
                            out.completed.push(inst.id.clone());
                        }
                        // Changed since read: the next round sees the new state.
                        Err(WorkerExecError::InstanceChanged(_)) => {}
                        Err(e) => {
                            warn!(instance = %inst.id, error = %e, "agent completion not recorded")
                        }
                    }
                }
                _ => {}
            }
        }
        if !out.completed.is_empty() {
            self.ctl.kick();
        }
        if !out.started.is_empty() || !out.completed.is_empty() {
            info!(worker = %w.id, started = ?out.started, completed = ?out.completed, "worker agent sync");
        }
        for u in &plan.unknown {
            warn!(worker = %w.id, lab = %u.lab_id, title = %u.title, started = u.started, "lab matches no instance on this worker");
            if self.stop_unknown && u.started && self.ctl.fence.epoch().is_some() {
                match self.agent.stop_lab(&target, &u.lab_id).await {
                    Ok(()) => out.stopped_unknown.push(u.lab_id.clone()),
                    Err(e) => {
                        warn!(worker = %w.id, lab = %u.lab_id, error = %e, "unknown lab not stopped")
                    }
                }
            }
        }
        out.unknown = plan.unknown;
        out
    }
}
