//! The worker-agent sync: every `CML_SYNC_INTERVAL_MS` the leader reads the labs of each
//! RUNNING or DRAINING worker (at most `CML_CONCURRENCY` workers at once), records a
//! heartbeat for every worker that answered, and applies [`plan_sync`] through the
//! worker's fenced heartbeat command (the one the push route uses): SCHEDULED -> RUNNING
//! and RUNNING -> COMPLETED in the worker's own transaction.
//! A worker whose agent cannot be read gets no heartbeat, so the heartbeat timeout fails
//! it as before. Unknown labs are logged; started ones are stopped only with
//! `CML_STOP_UNKNOWN_LABS=true`, and only after the fenced writes of the round.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use futures::stream::{self, StreamExt};
use tracing::{info, warn};

use crate::actors::controller_ctx::ControllerCtx;
use crate::actors::worker::WorkerCmd;
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
            // Not before the views hold the whole fleet: a lab whose instance is not
            // loaded yet would look unknown (and be stopped with CML_STOP_UNKNOWN_LABS).
            if self.ctl.fence.epoch().is_some() && self.ctl.hydrated() {
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
        let insts: Vec<Instance> = w
            .instances
            .iter()
            .filter_map(|id| self.ctl.instances.get(id))
            .map(|(i, _)| i)
            .collect();
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
        let plan = plan_sync(&w.id, &insts, &labs);
        // The heartbeat command, in the worker's own fenced transaction, moves the
        // SCHEDULED instances it is told run to RUNNING and the RUNNING ones it is not told
        // run to COMPLETED: tell it exactly the instances the plan keeps or makes running.
        let moving = |id: &str, to: InstanceState| {
            plan.moves.iter().any(|m| m.instance_id == id && m.to == to)
        };
        let running: Vec<String> = insts
            .iter()
            .filter(|i| match i.state {
                InstanceState::Running => !moving(&i.id, InstanceState::Completed),
                InstanceState::Scheduled => moving(&i.id, InstanceState::Running),
                _ => false,
            })
            .map(|i| i.id.clone())
            .collect();
        let known: Vec<(Instance, i64)> = self
            .ctl
            .instances
            .all()
            .into_iter()
            .filter(|(i, _)| i.worker_id.as_deref() == Some(w.id.as_str()))
            .collect();
        let cmd = WorkerCmd::Heartbeat {
            at: self.ctl.clock.now(),
            running,
            known,
            idem: None,
        };
        match self.ctl.workers.send(&w.id, cmd, true).await {
            Ok(o) => {
                for (i, r) in o.written {
                    match i.state {
                        InstanceState::Running => out.started.push(i.id.clone()),
                        InstanceState::Completed => out.completed.push(i.id.clone()),
                        _ => {}
                    }
                    self.ctl.instances.note(&i.id.clone(), i, r);
                }
            }
            Err(e) => {
                warn!(worker = %w.id, error = %e, "agent heartbeat not recorded");
                return out;
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
