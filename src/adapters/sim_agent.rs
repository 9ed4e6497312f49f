//! A simulated `WorkerAgent` for the embedded mode: each worker host keeps labs in
//! memory. [`SimAgent::follow`] makes a host mirror what the controller placed on it (a
//! STARTED lab titled with the instance id for every SCHEDULED or RUNNING instance; the lab
//! STOPPED once the instance has ended), so the sync moves SCHEDULED instances to RUNNING
//! and nothing else happens by itself. Hosts are ready unless a test says otherwise.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;

use crate::domain::worker::{Instance, InstanceState};
use crate::ports::agent::{AgentError, AgentTarget, Lab, LabState, WorkerAgent};

#[derive(Debug)]
struct SimHost {
    ready: bool,
    reachable: bool,
    labs: BTreeMap<String, Lab>,
}

impl Default for SimHost {
    fn default() -> Self {
        Self {
            ready: true,
            reachable: true,
            labs: BTreeMap::new(),
        }
    }
}

/// In-memory CML hosts, one per worker id.
#[derive(Debug, Default)]
pub struct SimAgent {
    hosts: Mutex<HashMap<String, SimHost>>,
}

/// The lab id the simulated host gives the lab of `instance_id`.
pub fn sim_lab_id(instance_id: &str) -> String {
    format!("sim-{instance_id}")
}

impl SimAgent {
    /// No hosts yet; every host is ready and reachable when first seen.
    pub fn new() -> Self {
        Self::default()
    }

    fn with_host<T>(&self, worker_id: &str, f: impl FnOnce(&mut SimHost) -> T) -> T {
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        f(hosts.entry(worker_id.to_owned()).or_default())
    }

    /// Sets the host's `ready` flag.
    pub fn set_ready(&self, worker_id: &str, ready: bool) {
        self.with_host(worker_id, |h| h.ready = ready);
    }

    /// Makes the host answer (or not) at all.
    pub fn set_reachable(&self, worker_id: &str, reachable: bool) {
        self.with_host(worker_id, |h| h.reachable = reachable);
    }

    /// Puts a lab on the host (replacing one with the same id).
    pub fn put_lab(&self, worker_id: &str, lab: Lab) {
        self.with_host(worker_id, |h| {
            h.labs.insert(lab.id.clone(), lab);
        });
    }

    /// Removes a lab from the host.
    pub fn remove_lab(&self, worker_id: &str, lab_id: &str) {
        self.with_host(worker_id, |h| {
            h.labs.remove(lab_id);
        });
    }

    /// Mirrors the controller's placement on `worker_id`: a STARTED lab for every
    /// SCHEDULED or RUNNING instance there that has none, and its lab STOPPED once the
    /// instance is COMPLETED or FAILED. Instances on other workers are ignored.
    pub fn follow(&self, worker_id: &str, instances: &[Instance]) {
        self.with_host(worker_id, |h| {
            for i in instances
                .iter()
                .filter(|i| i.worker_id.as_deref() == Some(worker_id))
            {
                let id = sim_lab_id(&i.id);
                match i.state {
                    InstanceState::Scheduled | InstanceState::Running => {
                        h.labs.entry(id.clone()).or_insert_with(|| Lab {
                            id,
                            title: i.id.clone(),
                            tags: Vec::new(),
                            state: LabState::Started,
                        });
                    }
                    InstanceState::Completed | InstanceState::Failed => {
                        if let Some(l) = h.labs.get_mut(&id) {
                            l.state = LabState::Stopped;
                        }
                    }
                    InstanceState::Pending => {}
                }
            }
        });
    }

    fn reachable(&self, worker_id: &str) -> Result<(), AgentError> {
        if self.with_host(worker_id, |h| h.reachable) {
            Ok(())
        } else {
            Err(AgentError::Unreachable(format!(
                "simulated host of {worker_id} is down"
            )))
        }
    }
}

#[async_trait]
impl WorkerAgent for SimAgent {
    async fn system_ready(&self, worker: &AgentTarget) -> Result<bool, AgentError> {
        self.reachable(&worker.worker_id)?;
        Ok(self.with_host(&worker.worker_id, |h| h.ready))
    }

    async fn labs(&self, worker: &AgentTarget) -> Result<Vec<Lab>, AgentError> {
        self.reachable(&worker.worker_id)?;
        Ok(self.with_host(&worker.worker_id, |h| h.labs.values().cloned().collect()))
    }

    async fn stop_lab(&self, worker: &AgentTarget, lab_id: &str) -> Result<(), AgentError> {
        self.reachable(&worker.worker_id)?;
        self.with_host(&worker.worker_id, |h| {
            if let Some(l) = h.labs.get_mut(lab_id) {
                l.state = LabState::Stopped;
            }
        });
        Ok(())
    }

    fn observe_placement(&self, worker_id: &str, instances: &[Instance]) {
        self.follow(worker_id, instances);
    }

    fn name(&self) -> &'static str {
        "sim"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::cml::plan_sync;
    use crate::domain::worker::Resources;
    use chrono::Utc;

    fn target(w: &str) -> AgentTarget {
        AgentTarget {
            worker_id: w.into(),
            instance_id: None,
            private_ip: None,
        }
    }

    fn placed(id: &str, state: InstanceState, w: &str) -> Instance {
        let mut i = Instance::new(id, Resources::default(), false, Utc::now());
        i.state = state;
        i.worker_id = Some(w.into());
        i
    }

    #[tokio::test]
    async fn labs_start_when_placed_and_stop_when_the_instance_ends() {
        let sim = SimAgent::new();
        let w = target("w1");
        assert_eq!(sim.system_ready(&w).await, Ok(true));
        assert!(sim.labs(&w).await.unwrap_or_default().is_empty());

        let mut insts = vec![
            placed("a", InstanceState::Scheduled, "w1"),
            placed("b", InstanceState::Scheduled, "w2"),
        ];
        sim.follow("w1", &insts);
        let labs = sim.labs(&w).await.unwrap_or_default();
        assert_eq!(labs.len(), 1, "{labs:?}");
        assert_eq!(labs[0].title, "a");
        assert_eq!(labs[0].state, LabState::Started);
        let plan = plan_sync("w1", &insts, &labs);
        assert_eq!(plan.moves.len(), 1);
        assert_eq!(plan.moves[0].to, InstanceState::Running);

        insts[0].state = InstanceState::Completed;
        sim.follow("w1", &insts);
        let labs = sim.labs(&w).await.unwrap_or_default();
        assert_eq!(labs[0].state, LabState::Stopped);
    }

    #[tokio::test]
    async fn ready_reachability_and_stop_are_honoured() {
        let sim = SimAgent::new();
        let w = target("w1");
        sim.set_ready("w1", false);
        assert_eq!(sim.system_ready(&w).await, Ok(false));
        sim.put_lab(
            "w1",
            Lab {
                id: "x".into(),
                title: "t".into(),
                tags: vec![],
                state: LabState::Started,
            },
        );
        assert_eq!(sim.stop_lab(&w, "x").await, Ok(()));
        assert_eq!(sim.stop_lab(&w, "absent").await, Ok(()));
        let labs = sim.labs(&w).await.unwrap_or_default();
        assert_eq!(labs[0].state, LabState::Stopped);
        sim.set_reachable("w1", false);
        assert!(matches!(
            sim.labs(&w).await,
            Err(AgentError::Unreachable(_))
        ));
    }
}
