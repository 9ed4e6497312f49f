//! The worker stop sequence end to end: DRAINING -> STOPPING (cloud stop) -> STOPPED ->
//! TERMINATED (cloud terminate), through the simulated cloud and through moto with a
//! real etcd; a leader change in the middle of STOPPING and of STOPPED; and the drain
//! deadline (none by default, the seed's "wait for existing instances to complete").

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::test;
use async_trait::async_trait;
use resource_plane::adapters::memory::MemoryStore;
use resource_plane::adapters::sim_cloud::SimCloud;
use resource_plane::api;
use resource_plane::app::Service;
use resource_plane::config::Config;
use resource_plane::domain::worker::{Worker, WorkerState, WorkerTemplate};
use resource_plane::keys;
use resource_plane::ports::agent::{AgentTarget, LabState, WorkerAgent};
use resource_plane::ports::cloud::{
    CloudError, CloudInstance, CloudInstanceStatus, CloudProvider, LaunchOutcome,
};
use resource_plane::ports::store::{Store, WatchEvent};
use serde_json::json;

use crate::controller::{controller_config, TEMPLATES};
use crate::moto::Moto;
use crate::support::{self, eventually, get, post, send, Etcd, TestApp};

/// Which call of a wrapped cloud freezes the replica that makes it (as if it crashed
/// there): the call never returns, so that replica does nothing more.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Freeze {
    Never,
    /// After the stop request reached the cloud.
    AfterStop,
    /// Before the terminate request reaches the cloud.
    BeforeTerminate,
}

/// One lab whose state is read (through the worker agent) whenever a stop is asked of
/// the cloud.
type LabWatch = (Arc<dyn WorkerAgent>, AgentTarget, String);

/// A cloud that records the stop and terminate calls, in order, before passing them on.
struct Ordered {
    inner: Arc<dyn CloudProvider>,
    calls: Arc<Mutex<Vec<String>>>,
    freeze: Freeze,
    frozen: tokio::sync::watch::Sender<bool>,
    lab: std::sync::OnceLock<LabWatch>,
    labs_at_stop: Mutex<Vec<Option<LabState>>>,
}

impl Ordered {
    fn new(inner: Arc<dyn CloudProvider>, freeze: Freeze) -> Arc<Self> {
        Self::sharing(inner, Arc::new(Mutex::new(Vec::new())), freeze)
    }

    /// A wrapper that writes into `calls` (shared by the replicas of one test).
    fn sharing(
        inner: Arc<dyn CloudProvider>,
        calls: Arc<Mutex<Vec<String>>>,
        freeze: Freeze,
    ) -> Arc<Self> {
        Arc::new(Self {
            inner,
            calls,
            freeze,
            frozen: tokio::sync::watch::channel(false).0,
            lab: std::sync::OnceLock::new(),
            labs_at_stop: Mutex::new(Vec::new()),
        })
    }

    fn push(&self, call: String) {
        if let Ok(mut c) = self.calls.lock() {
            c.push(call);
        }
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    fn is_frozen(&self) -> bool {
        *self.frozen.borrow()
    }

    async fn hang(&self) {
        self.frozen.send_replace(true);
        std::future::pending::<()>().await;
    }
}

#[async_trait]
impl CloudProvider for Ordered {
    async fn create_instance(
        &self,
        template: &WorkerTemplate,
        worker_id: &str,
    ) -> Result<LaunchOutcome, CloudError> {
        self.push(format!("create {worker_id}"));
        self.inner.create_instance(template, worker_id).await
    }
    async fn terminate_instance(&self, instance_id: &str) -> Result<(), CloudError> {
        if self.freeze == Freeze::BeforeTerminate {
            self.hang().await;
        }
        self.push(format!("terminate {instance_id}"));
        self.inner.terminate_instance(instance_id).await
    }
    async fn stop_instance(&self, instance_id: &str) -> Result<(), CloudError> {
        if let Some((agent, target, lab)) = self.lab.get() {
            let labs = agent.labs(target).await.unwrap_or_default();
            let state = labs.into_iter().find(|l| &l.id == lab).map(|l| l.state);
            if let Ok(mut seen) = self.labs_at_stop.lock() {
                seen.push(state);
            }
        }
        self.push(format!("stop {instance_id}"));
        let r = self.inner.stop_instance(instance_id).await;
        if self.freeze == Freeze::AfterStop {
            self.hang().await;
        }
        r
    }
    async fn get_instance_status(
        &self,
        instance_id: &str,
    ) -> Result<CloudInstanceStatus, CloudError> {
        self.inner.get_instance_status(instance_id).await
    }
    async fn list_instances(&self) -> Result<Vec<CloudInstance>, CloudError> {
        self.inner.list_instances().await
    }
    async fn instance_private_ip(&self, instance_id: &str) -> Result<Option<String>, CloudError> {
        self.inner.instance_private_ip(instance_id).await
    }
    fn name(&self) -> &'static str {
        "ordered"
    }
}

/// Every state worker `id` was written in, from its first version on (read back from
/// the store's history), consecutive repeats folded (heartbeats and placements write
/// versions too). Reads until the worker is TERMINATED or `limit` passes.
async fn states_written(store: &dyn Store, id: &str, limit: Duration) -> Vec<WorkerState> {
    let key = keys::worker(id);
    let mut seen: Vec<WorkerState> = Vec::new();
    let created = match store.get(&key).await {
        Ok(Some(kv)) => kv.create_revision,
        other => panic!("worker {id} not readable: {other:?}"),
    };
    let mut rx = match store.watch(&key, created).await {
        Ok(rx) => rx,
        Err(e) => panic!("watch {key}: {e}"),
    };
    let _ = tokio::time::timeout(limit, async {
        while let Some(batch) = rx.recv().await {
            let batch = batch.unwrap_or_else(|e| panic!("watch {key}: {e}"));
            for ev in batch {
                let WatchEvent::Put(kv) = ev else { continue };
                if kv.key != key {
                    continue;
                }
                let Ok(w) = serde_json::from_slice::<Worker>(&kv.value) else {
                    continue;
                };
                if seen.last() != Some(&w.state) {
                    seen.push(w.state);
                }
                if w.state == WorkerState::Terminated {
                    return;
                }
            }
        }
    })
    .await;
    seen
}

const FULL: [WorkerState; 7] = [
    WorkerState::Pending,
    WorkerState::Provisioning,
    WorkerState::Running,
    WorkerState::Draining,
    WorkerState::Stopping,
    WorkerState::Stopped,
    WorkerState::Terminated,
];

async fn submit(app: &impl TestApp) -> String {
    support::id_of(&support::submit_instance(app, 2.0, 4.0, false).await)
}

fn placed_on(svc: &Service, inst: &str) -> Option<String> {
    svc.state
        .controller
        .instances
        .get(inst)
        .and_then(|(i, _)| i.worker_id)
}

fn worker_state(svc: &Service, id: &str) -> Option<WorkerState> {
    svc.state.controller.workers.get(id).map(|w| w.state)
}

/// Submits an instance, waits until it is placed, completes it and drains its (now
/// empty) worker through the API; returns the worker and its cloud instance id.
async fn run_and_drain(svc: &Service, limit: Duration) -> (String, String) {
    let app = test::init_service(api::app(svc.state.clone())).await;
    let inst = submit(&app).await;
    assert!(
        eventually(limit, || async { placed_on(svc, &inst).is_some() }).await,
        "instance never placed"
    );
    let worker = placed_on(svc, &inst).unwrap_or_default();
    let r = send(
        &app,
        post(&format!("/api/1.0/instances/{inst}/complete"), &json!({})).to_request(),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    let r = send(
        &app,
        post(&format!("/api/1.0/workers/{worker}/drain"), &json!({})).to_request(),
    )
    .await;
    assert_eq!(r.status, 202, "{:?}", r.json);
    let cloud_id = svc
        .state
        .controller
        .workers
        .get(&worker)
        .and_then(|w| w.cloud_instance_id)
        .unwrap_or_default();
    assert!(!cloud_id.is_empty(), "worker has no cloud instance");
    (worker, cloud_id)
}

/// Asserts the cloud calls for `cloud_id`: stopped before it was terminated, and each
/// at least once.
fn assert_stop_then_terminate(calls: &[String], cloud_id: &str) {
    let stop = calls.iter().position(|c| c == &format!("stop {cloud_id}"));
    let terminate = calls
        .iter()
        .position(|c| c == &format!("terminate {cloud_id}"));
    assert!(
        matches!((stop, terminate), (Some(s), Some(t)) if s < t),
        "StopInstances must come before TerminateInstances: {calls:?}"
    );
}

/// The decisions journaled about `subject`, oldest first.
fn decisions_about(svc: &Service, subject: &str) -> Vec<String> {
    svc.state
        .controller
        .decisions()
        .into_iter()
        .filter(|d| d.subject == subject)
        .map(|d| d.action)
        .collect()
}

fn assert_journal_in_order(actions: &[String]) {
    let mut at = 0;
    for wanted in ["drain", "stop", "stopped", "terminate", "terminated"] {
        match actions[at..].iter().position(|a| a == wanted) {
            Some(p) => at += p + 1,
            None => panic!("decision {wanted} missing or out of order: {actions:?}"),
        }
    }
}

#[actix_web::test]
async fn a_drained_worker_is_stopped_then_terminated_through_the_simulated_cloud() {
    tokio::time::pause();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let cfg = controller_config(&dir, TEMPLATES);
    let sim = Arc::new(SimCloud::new(Duration::from_millis(300)));
    let cloud = Ordered::new(sim.clone(), Freeze::Never);
    let memory = Arc::new(MemoryStore::new());
    let svc =
        Service::start_with(cfg, memory.clone(), cloud.clone()).unwrap_or_else(|e| panic!("{e}"));
    assert!(svc.wait_hydrated(Duration::from_secs(10)).await);
    let (worker, cloud_id) = run_and_drain(&svc, Duration::from_secs(10)).await;

    let states = states_written(memory.as_ref(), &worker, Duration::from_secs(30)).await;
    assert_eq!(states, FULL, "states written for {worker}");
    assert_stop_then_terminate(&cloud.calls(), &cloud_id);
    assert_eq!(
        sim.get_instance_status(&cloud_id).await,
        Ok(CloudInstanceStatus::Terminated)
    );
    assert_journal_in_order(&decisions_about(&svc, &worker));
    let text = svc.state.metrics.render();
    for action in ["stop", "stopped", "terminate", "terminated"] {
        assert!(
            text.contains(&format!(
                "controller_decisions_total{{action=\"{action}\"}}"
            )),
            "{action} not counted"
        );
    }
}

#[actix_web::test]
async fn a_drained_worker_is_stopped_then_terminated_through_moto_and_etcd() {
    let moto = Moto::start();
    let etcd = Etcd::start();
    let prefix = support::unique_prefix();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut cfg = controller_config(&dir, include_str!("../../config/worker-templates.yaml"));
    cfg.controller.cluster_id = format!("stop-{}", uuid::Uuid::new_v4().simple());
    let ec2 = Arc::new(moto.cloud(&cfg.controller.cluster_id).await);
    let cloud = Ordered::new(ec2.clone(), Freeze::Never);
    let store = etcd.store(&prefix);
    let svc =
        Service::start_with(cfg, store.clone(), cloud.clone()).unwrap_or_else(|e| panic!("{e}"));
    assert!(svc.wait_hydrated(Duration::from_secs(15)).await);
    let (worker, cloud_id) = run_and_drain(&svc, Duration::from_secs(20)).await;

    let states = states_written(store.as_ref(), &worker, Duration::from_secs(30)).await;
    assert_eq!(states, FULL, "states written for {worker}");
    assert_stop_then_terminate(&cloud.calls(), &cloud_id);
    assert!(matches!(
        ec2.get_instance_status(&cloud_id).await,
        Ok(CloudInstanceStatus::Terminated | CloudInstanceStatus::NotFound)
    ));
    assert_journal_in_order(&decisions_about(&svc, &worker));
}

/// Leader A freezes in the middle of the stop sequence (`freeze`); after it resigns,
/// leader B finds the step in etcd and finishes the sequence.
async fn leader_change_in_the_middle(freeze: Freeze, frozen_in: WorkerState) {
    let etcd = Etcd::start();
    let prefix = support::unique_prefix();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let sim = Arc::new(SimCloud::new(Duration::from_millis(300)));
    let calls = Arc::new(Mutex::new(Vec::new()));
    let a_cloud = Ordered::sharing(sim.clone(), calls.clone(), freeze);
    let b_cloud = Ordered::sharing(sim.clone(), calls.clone(), Freeze::Never);
    let mut services = Vec::new();
    for (name, cloud) in [("ctl-a", a_cloud.clone()), ("ctl-b", b_cloud)] {
        let mut cfg = controller_config(&dir, TEMPLATES);
        cfg.controller.instance_id = name.to_owned();
        let svc =
            Service::start_with(cfg, etcd.store(&prefix), cloud).unwrap_or_else(|e| panic!("{e}"));
        assert!(svc.wait_hydrated(Duration::from_secs(15)).await);
        if services.is_empty() {
            assert!(
                eventually(Duration::from_secs(10), || async {
                    svc.state.controller.leader_status().is_leader
                })
                .await,
                "a was not elected"
            );
        }
        services.push(svc);
    }
    let (a, b) = (&services[0], &services[1]);
    let (worker, cloud_id) = run_and_drain(a, Duration::from_secs(10)).await;
    assert!(
        eventually(Duration::from_secs(15), || async { a_cloud.is_frozen() }).await,
        "leader a never reached the step it freezes in"
    );
    assert_eq!(worker_state(a, &worker), Some(frozen_in));
    let launches = sim.create_calls();

    a.shutdown().await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            b.state.controller.leader_status().is_leader
        })
        .await,
        "b did not take over"
    );
    let store = etcd.store(&prefix);
    let states = states_written(store.as_ref(), &worker, Duration::from_secs(30)).await;
    assert_eq!(states, FULL, "states written for {worker}");
    let calls = calls.lock().map(|c| c.clone()).unwrap_or_default();
    assert_stop_then_terminate(&calls, &cloud_id);
    assert_eq!(
        sim.get_instance_status(&cloud_id).await,
        Ok(CloudInstanceStatus::Terminated)
    );
    assert_eq!(
        sim.create_calls(),
        launches,
        "the new leader launched again"
    );
    assert!(
        sim.list_instances()
            .await
            .unwrap_or_default()
            .iter()
            .all(|c| c.instance_id != cloud_id),
        "the stopped instance is still listed"
    );
    // The record is written before the decision is journaled.
    let finished = eventually(Duration::from_secs(5), || async {
        decisions_about(b, &worker)
            .iter()
            .any(|a| a == "terminated")
    })
    .await;
    assert!(
        finished,
        "b did not finish the sequence: {:?}",
        decisions_about(b, &worker)
    );
}

#[actix_web::test]
async fn a_leader_change_while_stopping_resumes_and_ends_terminated() {
    leader_change_in_the_middle(Freeze::AfterStop, WorkerState::Stopping).await;
}

#[actix_web::test]
async fn a_leader_change_while_stopped_resumes_and_ends_terminated() {
    leader_change_in_the_middle(Freeze::BeforeTerminate, WorkerState::Stopped).await;
}

/// The controller configuration with the drain deadline as `DRAIN_DEADLINE_SECONDS`
/// sets it (`None`: unset, the default).
fn config_with_deadline(dir: &tempfile::TempDir, deadline: Option<&str>) -> Config {
    let mut env = std::collections::HashMap::new();
    env.insert("SHADOW_SEED_FILE".to_owned(), String::new());
    env.insert("WORKER_AGENT".to_owned(), "heartbeat".to_owned());
    if let Some(d) = deadline {
        env.insert("DRAIN_DEADLINE_SECONDS".to_owned(), d.to_owned());
    }
    let defaults = Config::from_map(&env).unwrap_or_else(|e| panic!("{e}"));
    let mut cfg = controller_config(dir, TEMPLATES);
    cfg.controller.drain_deadline = defaults.controller.drain_deadline;
    // The test drives the instance with one heartbeat; silence must not fail the host.
    cfg.controller.heartbeat_timeout = Duration::ZERO;
    // Fewer passes over the long (paused) wait.
    cfg.controller.cloud_poll = Duration::from_secs(5);
    cfg.controller.reconcile_interval = Duration::from_secs(30);
    cfg
}

/// A worker with one RUNNING instance, drained through the API without a deadline of
/// its own; returns the service, the worker id and the drain answer.
async fn draining_busy_worker(
    deadline: Option<&str>,
) -> (Service, String, serde_json::Value, tempfile::TempDir) {
    tokio::time::pause();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let cfg = config_with_deadline(&dir, deadline);
    let sim = Arc::new(SimCloud::new(Duration::from_millis(300)));
    let svc = Service::start_with(cfg, Arc::new(MemoryStore::new()), sim)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(svc.wait_hydrated(Duration::from_secs(10)).await);
    let app = test::init_service(api::app(svc.state.clone())).await;
    let inst = submit(&app).await;
    let mut placed = false;
    for _ in 0..200 {
        if placed_on(&svc, &inst).is_some() {
            placed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(placed, "instance never placed");
    let worker = placed_on(&svc, &inst).unwrap_or_default();
    let r = send(
        &app,
        post(
            &format!("/api/1.0/workers/{worker}/heartbeat"),
            &json!({"running_instances": [inst]}),
        )
        .to_request(),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    let r = send(
        &app,
        post(&format!("/api/1.0/workers/{worker}/drain"), &json!({})).to_request(),
    )
    .await;
    assert_eq!(r.status, 202, "{:?}", r.json);
    (svc, worker, r.json, dir)
}

#[actix_web::test]
async fn by_default_a_draining_worker_waits_for_its_instances_past_the_old_hour() {
    let (svc, worker, drained, _dir) = draining_busy_worker(None).await;
    assert_eq!(drained["state"], "DRAINING");
    assert!(drained["drain_deadline"].is_null(), "{drained}");
    // Well past the old default of 3600 s.
    tokio::time::sleep(Duration::from_secs(2 * 3600)).await;
    assert_eq!(worker_state(&svc, &worker), Some(WorkerState::Draining));
    let app = test::init_service(api::app(svc.state.clone())).await;
    let r = send(
        &app,
        get(&format!("/api/1.0/workers/{worker}")).to_request(),
    )
    .await;
    assert_eq!(r.json["state"], "DRAINING", "{:?}", r.json);
    assert_eq!(r.json["instances"].as_array().map(Vec::len), Some(1));
}

#[actix_web::test]
async fn a_configured_drain_deadline_stops_a_busy_worker_at_the_deadline() {
    let (svc, worker, drained, _dir) = draining_busy_worker(Some("600")).await;
    assert_eq!(drained["state"], "DRAINING");
    assert!(drained["drain_deadline"].is_string(), "{drained}");
    tokio::time::sleep(Duration::from_secs(590)).await;
    assert_eq!(worker_state(&svc, &worker), Some(WorkerState::Draining));
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert!(
        matches!(
            worker_state(&svc, &worker),
            Some(WorkerState::Stopping | WorkerState::Stopped | WorkerState::Terminated)
        ),
        "{:?}",
        worker_state(&svc, &worker)
    );
    assert!(decisions_about(&svc, &worker).iter().any(|a| a == "stop"));
}

#[actix_web::test]
async fn at_the_deadline_labs_still_started_are_stopped_before_the_host() {
    use resource_plane::adapters::sim_agent::sim_lab_id;
    use resource_plane::config::WorkerAgentKind;
    use resource_plane::domain::worker::InstanceState;

    tokio::time::pause();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut cfg = config_with_deadline(&dir, Some("600"));
    cfg.agent.kind = WorkerAgentKind::Sim;
    cfg.agent.sync_interval = Duration::from_secs(1);
    let cloud = Ordered::new(
        Arc::new(SimCloud::new(Duration::from_millis(300))),
        Freeze::Never,
    );
    let svc = Service::start_with(cfg, Arc::new(MemoryStore::new()), cloud.clone())
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(svc.wait_hydrated(Duration::from_secs(10)).await);
    let app = test::init_service(api::app(svc.state.clone())).await;
    let inst = submit(&app).await;
    // The simulated host starts a lab for the placed instance; the agent sync sees it.
    let mut running = false;
    for _ in 0..300 {
        running = svc
            .state
            .controller
            .instances
            .get(&inst)
            .is_some_and(|(i, _)| i.state == InstanceState::Running);
        if running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(running, "instance never RUNNING on its host");
    let worker = placed_on(&svc, &inst).unwrap_or_default();
    let agent = svc
        .state
        .controller
        .agent()
        .cloned()
        .unwrap_or_else(|| panic!("no worker agent"));
    let target = AgentTarget {
        worker_id: worker.clone(),
        instance_id: None,
        private_ip: None,
    };
    let _ = cloud
        .lab
        .set((agent.clone(), target.clone(), sim_lab_id(&inst)));
    let lab_state = || async {
        agent
            .labs(&target)
            .await
            .unwrap_or_default()
            .into_iter()
            .find(|l| l.id == sim_lab_id(&inst))
            .map(|l| l.state)
    };
    assert_eq!(lab_state().await, Some(LabState::Started));
    let r = send(
        &app,
        post(&format!("/api/1.0/workers/{worker}/drain"), &json!({})).to_request(),
    )
    .await;
    assert_eq!(r.status, 202, "{:?}", r.json);

    tokio::time::sleep(Duration::from_secs(610)).await;
    assert!(
        matches!(
            worker_state(&svc, &worker),
            Some(WorkerState::Stopping | WorkerState::Stopped | WorkerState::Terminated)
        ),
        "{:?}",
        worker_state(&svc, &worker)
    );
    assert_eq!(lab_state().await, Some(LabState::Stopped));
    // Every stop asked of the cloud found the lab stopped already.
    let at_stop = cloud
        .labs_at_stop
        .lock()
        .map(|l| l.clone())
        .unwrap_or_default();
    assert!(
        !at_stop.is_empty() && at_stop.iter().all(|s| *s == Some(LabState::Stopped)),
        "the host was stopped with its lab still running: {at_stop:?}"
    );
    let actions = decisions_about(&svc, &worker);
    assert!(
        actions.iter().any(|a| a == "stop_lab"),
        "lab stop not journaled: {actions:?}"
    );
}
