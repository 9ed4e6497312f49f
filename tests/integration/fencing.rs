//! Side effects outside etcd are fenced: a leader frozen past its lease (its whole
//! runtime blocked, actors kept) performs no cloud or Kubernetes call once it resumes;
//! a failed STOPPING write terminates nothing; an instance launched between the cloud
//! listing and the worker read is no orphan; a young instance is never terminated;
//! cloud and record failures show in the controller status.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::test;
use async_trait::async_trait;
use resource_plane::actors::worker::WorkerCmd;
use resource_plane::adapters::etcd::{EtcdSettings, EtcdStore};
use resource_plane::adapters::memory::MemoryStore;
use resource_plane::adapters::sim_cloud::SimCloud;
use resource_plane::api;
use resource_plane::api::AppState;
use resource_plane::app::{new_sim_kube, Service};
use resource_plane::config::Config;
use resource_plane::domain::conditions::{ObjectEvent, Observation};
use resource_plane::domain::worker::{Worker, WorkerState, WorkerTemplate};
use resource_plane::keys;
use resource_plane::ports::cloud::{CloudError, CloudInstance, CloudInstanceStatus, CloudProvider};
use resource_plane::ports::kube::{
    Baseline, DeployableSpec, JobSpec, KubeError, KubeExecutor, ModelSpec, ResourceKind,
    ScaleTarget,
};
use resource_plane::ports::store::{Compare, Op, Store, StoreError, Txn, TxnResult};
use tokio::sync::broadcast;

use crate::support::{self, get, send, Etcd, Hook, Hooked};

/// One worker that must always exist, so the leader launches one by itself.
pub const ONE_MIN_WORKER: &str = "templates:
  - name: small
    instance_type: m5.xlarge
    image_id: ami-12c6146b
    capacity: { cpu: 4, memory_gb: 16 }
    min_workers: 1
    max_workers: 4
    hourly_cost: 0.2
    labels: {}
";

/// A controller-tuned configuration read from `extra` variables (so settings this test
/// needs are plain environment variables).
fn config(dir: &tempfile::TempDir, templates: &str, extra: &[(&str, &str)]) -> Config {
    let path = dir.path().join("templates.yaml");
    std::fs::write(&path, templates).unwrap_or_else(|e| panic!("{e}"));
    let mut env: HashMap<String, String> = HashMap::new();
    env.insert("SHADOW_SEED_FILE".into(), String::new());
    env.insert("ACTOR_THREADS".into(), "2".into());
    env.insert("WORKER_TEMPLATES_FILE".into(), path.display().to_string());
    env.insert("SCALE_UP_BATCH_MS".into(), "200".into());
    env.insert("CLOUD_POLL_MS".into(), "100".into());
    env.insert("RECONCILE_INTERVAL".into(), "1".into());
    env.insert("SCALE_DOWN_IDLE_SECONDS".into(), "3600".into());
    for (k, v) in extra {
        env.insert((*k).into(), (*v).into());
    }
    Config::from_map(&env).unwrap_or_else(|e| panic!("{e}"))
}

// ---------------------------------------------------------------- counting adapters

/// Every call an adapter received, in order.
#[derive(Default)]
struct Calls(Mutex<Vec<String>>);

impl Calls {
    fn push(&self, call: String) {
        if let Ok(mut c) = self.0.lock() {
            c.push(call);
        }
    }
    fn all(&self) -> Vec<String> {
        self.0.lock().map(|c| c.clone()).unwrap_or_default()
    }
    fn len(&self) -> usize {
        self.0.lock().map(|c| c.len()).unwrap_or(0)
    }
}

/// A cloud that counts every call before passing it on; the next `list_instances`
/// after `on_list` is set tells it and waits for `resume_list` before listing (once).
struct CountingCloud {
    inner: Arc<SimCloud>,
    calls: Calls,
    on_list: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    resume_list: Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
}

impl CountingCloud {
    fn new(inner: Arc<SimCloud>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            calls: Calls::default(),
            on_list: Mutex::new(None),
            resume_list: Mutex::new(None),
        })
    }

    fn terminations(&self) -> Vec<String> {
        self.calls
            .all()
            .into_iter()
            .filter(|c| c.starts_with("terminate "))
            .collect()
    }
}

#[async_trait]
impl CloudProvider for CountingCloud {
    async fn create_instance(
        &self,
        template: &WorkerTemplate,
        worker_id: &str,
    ) -> Result<resource_plane::ports::cloud::LaunchOutcome, CloudError> {
        self.calls.push(format!("create {worker_id}"));
        self.inner.create_instance(template, worker_id).await
    }
    async fn terminate_instance(&self, instance_id: &str) -> Result<(), CloudError> {
        self.calls.push(format!("terminate {instance_id}"));
        self.inner.terminate_instance(instance_id).await
    }
    async fn stop_instance(&self, instance_id: &str) -> Result<(), CloudError> {
        self.calls.push(format!("stop {instance_id}"));
        self.inner.stop_instance(instance_id).await
    }
    async fn get_instance_status(
        &self,
        instance_id: &str,
    ) -> Result<CloudInstanceStatus, CloudError> {
        self.calls.push(format!("status {instance_id}"));
        self.inner.get_instance_status(instance_id).await
    }
    async fn list_instances(&self) -> Result<Vec<CloudInstance>, CloudError> {
        self.calls.push("list".into());
        // Pause here (once) while the test launches something, so the listing sees it.
        let hook = self.on_list.lock().ok().and_then(|mut h| h.take());
        if let Some(tell) = hook {
            let wait = self.resume_list.lock().ok().and_then(|mut r| r.take());
            let _ = tell.send(());
            if let Some(w) = wait {
                let _ = w.await;
            }
        }
        self.inner.list_instances().await
    }
    fn name(&self) -> &'static str {
        "counting"
    }
}

/// A cluster that counts every call before passing it on.
struct CountingKube {
    inner: Arc<dyn KubeExecutor>,
    calls: Calls,
}

#[async_trait]
impl KubeExecutor for CountingKube {
    async fn apply_deployable(&self, spec: &DeployableSpec) -> Result<Baseline, KubeError> {
        self.calls.push(format!("apply {}", spec.name));
        self.inner.apply_deployable(spec).await
    }
    async fn restart(
        &self,
        namespace: &str,
        name: Option<&str>,
        stamp: &str,
    ) -> Result<Vec<Baseline>, KubeError> {
        self.calls.push(format!("restart {namespace}"));
        self.inner.restart(namespace, name, stamp).await
    }
    async fn load_model(
        &self,
        namespace: &str,
        deployable: &str,
        container: Option<&str>,
        model: &ModelSpec,
        stamp: &str,
    ) -> Result<Baseline, KubeError> {
        self.calls.push(format!("load_model {deployable}"));
        self.inner
            .load_model(namespace, deployable, container, model, stamp)
            .await
    }
    async fn create_job(&self, spec: &JobSpec) -> Result<Baseline, KubeError> {
        self.calls.push("create_job".into());
        self.inner.create_job(spec).await
    }
    async fn set_min_replicas(
        &self,
        namespace: &str,
        target: &ScaleTarget,
        min: i32,
    ) -> Result<(), KubeError> {
        self.calls
            .push(format!("set_min_replicas {} {min}", target.deployment));
        self.inner.set_min_replicas(namespace, target, min).await
    }
    async fn observed_min_replicas(
        &self,
        namespace: &str,
        target: &ScaleTarget,
    ) -> Result<Option<i32>, KubeError> {
        self.calls
            .push(format!("observed_min_replicas {}", target.deployment));
        self.inner.observed_min_replicas(namespace, target).await
    }
    async fn observe(&self, baseline: &Baseline) -> Result<Observation, KubeError> {
        self.calls.push("observe".into());
        self.inner.observe(baseline).await
    }
    fn subscribe(&self, kind: ResourceKind, namespace: &str) -> broadcast::Receiver<ObjectEvent> {
        self.calls.push(format!("subscribe {namespace}"));
        self.inner.subscribe(kind, namespace)
    }
    fn name(&self) -> &'static str {
        "counting"
    }
}

// ------------------------------------------------------------ a replica on its thread

/// A service on its own thread and actix system, so the test can freeze it whole: a
/// task that blocks the thread stops every actor, timer and keepalive of that replica
/// at once, as SIGSTOP would, and unblocking resumes them where they were.
struct Replica {
    state: actix_web::web::Data<AppState>,
    arbiter: actix_rt::ArbiterHandle,
    cloud: Arc<CountingCloud>,
    kube: Arc<CountingKube>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Replica {
    fn start(cfg: Config, etcd: EtcdSettings, cloud: Arc<SimCloud>) -> Replica {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let counting = CountingCloud::new(cloud);
        let cloud = counting.clone();
        let thread = std::thread::spawn(move || {
            actix_rt::System::new().block_on(async move {
                let kube = Arc::new(CountingKube {
                    inner: new_sim_kube(&cfg).unwrap_or_else(|e| panic!("{e}")),
                    calls: Calls::default(),
                });
                let store: Arc<dyn Store> = Arc::new(EtcdStore::new(etcd));
                let svc = Service::start_full(cfg, store, cloud, kube.clone())
                    .unwrap_or_else(|e| panic!("{e}"));
                let _ = tx.send((svc.state.clone(), actix_rt::Arbiter::current(), kube));
                let _ = stop_rx.await;
            });
        });
        let (state, arbiter, kube) = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("replica did not start: {e}"));
        Replica {
            state,
            arbiter,
            cloud: counting,
            kube,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    fn is_leader(&self) -> bool {
        self.state.controller.leader_status().is_leader
    }

    /// Blocks the replica's thread until the returned sender is dropped or used.
    fn freeze(&self) -> std::sync::mpsc::Sender<()> {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let frozen = Arc::new(AtomicBool::new(false));
        let f = frozen.clone();
        self.arbiter.spawn(async move {
            f.store(true, Ordering::SeqCst);
            // Deliberately blocking: the whole single-threaded runtime stops here.
            let _ = rx.recv();
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !frozen.load(Ordering::SeqCst) {
            assert!(
                std::time::Instant::now() < deadline,
                "replica did not freeze"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        tx
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[actix_web::test]
async fn a_frozen_leader_that_resumes_makes_no_cloud_or_kubernetes_call() {
    let etcd = Etcd::start();
    let prefix = support::unique_prefix();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let seed =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/shadow-deployables.yaml");
    let seed = seed.display().to_string();
    let cfg = |id: &str| {
        config(
            &dir,
            ONE_MIN_WORKER,
            &[
                ("CONTROLLER_INSTANCE_ID", id),
                ("LEADER_LEASE_TTL", "2"),
                ("SHADOW_SEED_FILE", &seed),
                ("KUBE_CONVERGE_INTERVAL_MS", "200"),
                ("ORPHAN_GRACE_SECONDS", "60"),
                ("SIM_CLOUD_BOOT_MS", "200"),
            ],
        )
    };
    let cloud = Arc::new(SimCloud::new(Duration::from_millis(200)));
    let a = Replica::start(cfg("ctl-a"), etcd.settings(&prefix), cloud.clone());
    assert!(
        support::eventually(Duration::from_secs(10), || async { a.is_leader() }).await,
        "the first replica was not elected"
    );
    let b = Replica::start(cfg("ctl-b"), etcd.settings(&prefix), cloud.clone());

    // The leader is busy: it launched the minimum worker, converged the cluster, and
    // has an old orphan to clean up.
    let up = support::eventually(Duration::from_secs(15), || async {
        let ws = a.state.controller.workers.list();
        !ws.is_empty() && ws.iter().all(|w| w.state == WorkerState::Running)
    })
    .await;
    assert!(up, "the leader's worker did not come up");
    let orphan = cloud.add_orphan_aged("w-ghost", Duration::from_secs(3600));
    let cleaned = support::eventually(Duration::from_secs(10), || async {
        a.cloud.terminations().iter().any(|t| t.ends_with(&orphan))
    })
    .await;
    assert!(
        cleaned,
        "the leader did not terminate the orphan: {:?}",
        a.cloud.calls.all()
    );
    assert_ne!(
        a.kube.calls.len(),
        0,
        "the leader made no Kubernetes call to count"
    );

    // Freeze the leader whole; the other replica takes over once the lease lapses.
    let thaw = a.freeze();
    let took_over = support::eventually(Duration::from_secs(15), || async { b.is_leader() }).await;
    assert!(took_over, "the follower never took over");
    // Work the old leader would want to do when it wakes: another old orphan.
    let second_orphan = cloud.add_orphan_aged("w-ghost-2", Duration::from_secs(3600));

    // Resume it; from here on it must not touch the cloud or the cluster.
    let (cloud_mark, kube_mark) = (a.cloud.calls.len(), a.kube.calls.len());
    drop(thaw);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let cloud_after: Vec<String> = a.cloud.calls.all().split_off(cloud_mark);
    let kube_after: Vec<String> = a.kube.calls.all().split_off(kube_mark);
    assert!(
        cloud_after.is_empty(),
        "the deposed leader called the cloud after resuming: {cloud_after:?}"
    );
    assert!(
        kube_after.is_empty(),
        "the deposed leader called Kubernetes after resuming: {kube_after:?}"
    );
    assert!(!a.is_leader(), "the old leader still believes it leads");
    assert!(b.is_leader(), "the new leader lost its lease");
    // The new leader does the work instead.
    let done = support::eventually(Duration::from_secs(10), || async {
        b.cloud
            .terminations()
            .iter()
            .any(|t| t.ends_with(&second_orphan))
    })
    .await;
    assert!(done, "the new leader did not terminate the orphan");
}

// ----------------------------------------------------- single replica, memory store

/// A store that refuses (as unavailable) transactions matching a predicate.
struct FailingStore {
    fail: Box<dyn Fn(&Txn) -> bool + Send + Sync>,
    failed: AtomicUsize,
}

#[async_trait]
impl Hook for FailingStore {
    async fn txn(&self, inner: &dyn Store, txn: Txn) -> Result<TxnResult, StoreError> {
        if (self.fail)(&txn) {
            self.failed.fetch_add(1, Ordering::SeqCst);
            return Err(StoreError::Unavailable("injected".into()));
        }
        inner.txn(txn).await
    }
    fn name(&self, _inner: &dyn Store) -> &'static str {
        "failing"
    }
}

/// The worker record a transaction writes, if any.
fn worker_written(txn: &Txn) -> Option<Worker> {
    txn.success.iter().find_map(|op| match op {
        Op::Put { key, value, .. } if keys::child(keys::WORKER_PREFIX, key).is_some() => {
            serde_json::from_slice(value).ok()
        }
        _ => None,
    })
}

struct Single {
    svc: Service,
    sim: Arc<SimCloud>,
    cloud: Arc<CountingCloud>,
    store: Arc<dyn Store>,
    _dir: tempfile::TempDir,
}

async fn single(
    templates: &str,
    extra: &[(&str, &str)],
    fail: impl Fn(&Txn) -> bool + Send + Sync + 'static,
) -> Single {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let cfg = config(&dir, templates, extra);
    let sim = Arc::new(SimCloud::new(Duration::from_millis(300)));
    let cloud = CountingCloud::new(sim.clone());
    let memory: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let store: Arc<dyn Store> = Hooked::new(
        memory.clone(),
        FailingStore {
            fail: Box::new(fail),
            failed: AtomicUsize::new(0),
        },
    );
    let svc = Service::start_with(cfg, store, cloud.clone()).unwrap_or_else(|e| panic!("{e}"));
    assert!(svc.wait_hydrated(Duration::from_secs(10)).await);
    let led = wait(Duration::from_secs(5), || {
        svc.state.controller.leader_status().is_leader
    })
    .await;
    assert!(led, "single replica did not become leader");
    Single {
        svc,
        sim,
        cloud,
        store: memory,
        _dir: dir,
    }
}

/// Lets (paused) time pass in small steps until `f` holds or `limit` passes.
async fn wait(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let step = Duration::from_millis(50);
    let mut spent = Duration::ZERO;
    while !f() {
        if spent >= limit {
            return false;
        }
        tokio::time::sleep(step).await;
        spent += step;
    }
    true
}

fn running_worker(s: &Single) -> Option<Worker> {
    s.svc
        .state
        .controller
        .workers
        .list()
        .into_iter()
        .find(|w| w.state == WorkerState::Running && w.cloud_instance_id.is_some())
}

#[actix_web::test]
async fn a_failed_stopping_write_terminates_nothing() {
    tokio::time::pause();
    let s = single(ONE_MIN_WORKER, &[], |txn| {
        worker_written(txn).is_some_and(|w| w.state == WorkerState::Stopping)
    })
    .await;
    assert!(wait(Duration::from_secs(10), || running_worker(&s).is_some()).await);
    let w = running_worker(&s).unwrap_or_else(|| panic!("no running worker"));
    let cloud_id = w.cloud_instance_id.clone().unwrap_or_default();
    let drain = WorkerCmd::Drain {
        deadline: Some(s.svc.state.controller.clock.now()),
        voluntary: false,
        idle_cutoff: None,
        idem: None,
    };
    let r = s
        .svc
        .state
        .controller
        .workers
        .send(&w.id, drain, true)
        .await;
    assert!(r.is_ok(), "{r:?}");
    // Drain is complete at once (no instances): the autoscaler tries to stop it, and
    // every STOPPING write fails.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        s.svc.state.controller.workers.get(&w.id).map(|w| w.state),
        Some(WorkerState::Draining)
    );
    assert!(
        s.cloud.terminations().is_empty(),
        "terminated without a recorded STOPPING: {:?}",
        s.cloud.terminations()
    );
    let stops: Vec<String> = s
        .cloud
        .calls
        .all()
        .into_iter()
        .filter(|c| c.starts_with("stop "))
        .collect();
    assert!(
        stops.is_empty(),
        "stopped without a recorded STOPPING: {stops:?}"
    );
    assert_eq!(
        s.sim.get_instance_status(&cloud_id).await,
        Ok(CloudInstanceStatus::Running)
    );
}

#[actix_web::test]
async fn an_instance_launched_between_cloud_list_and_worker_read_is_not_an_orphan() {
    tokio::time::pause();
    // No grace period: only the order of the reads protects the new instance.
    let s = single(ONE_MIN_WORKER, &[("ORPHAN_GRACE_SECONDS", "0")], |_| false).await;
    assert!(wait(Duration::from_secs(10), || running_worker(&s).is_some()).await);
    let (told_tx, told_rx) = tokio::sync::oneshot::channel();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel();
    if let Ok(mut h) = s.cloud.on_list.lock() {
        *h = Some(told_tx);
    }
    if let Ok(mut r) = s.cloud.resume_list.lock() {
        *r = Some(go_rx);
    }
    // Wait for the next reconcile pass to be inside its cloud listing...
    let listed = tokio::time::timeout(Duration::from_secs(5), told_rx).await;
    assert!(
        matches!(listed, Ok(Ok(()))),
        "no reconcile pass listed the cloud"
    );
    // ...and launch a worker the way the autoscaler does: record first, then the cloud.
    let tpl = s.svc.state.controller.templates[0].clone();
    let worker = Worker::new("w-late", &tpl, s.svc.state.controller.clock.now());
    let key = keys::worker("w-late");
    let created = s
        .store
        .txn(Txn {
            compares: vec![Compare::ModRevision(key.clone(), 0)],
            success: vec![Op::Put {
                key,
                value: serde_json::to_vec(&worker).unwrap_or_default(),
                lease: None,
            }],
            failure_gets: Vec::new(),
        })
        .await;
    assert!(created.is_ok_and(|r| r.succeeded));
    let late = s
        .sim
        .create_instance(&tpl, "w-late")
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .instance_id;
    // The listing now sees the new instance; workers read before the listing would not
    // know w-late. Let the pass go on.
    let _ = go_tx.send(());
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !s.cloud.terminations().iter().any(|t| t.ends_with(&late)),
        "the freshly launched instance was terminated as an orphan"
    );
    assert_ne!(
        s.sim.get_instance_status(&late).await,
        Ok(CloudInstanceStatus::Terminated)
    );
}

#[actix_web::test]
async fn an_instance_younger_than_the_grace_period_is_never_terminated() {
    tokio::time::pause();
    let s = single(ONE_MIN_WORKER, &[("ORPHAN_GRACE_SECONDS", "120")], |_| {
        false
    })
    .await;
    assert!(wait(Duration::from_secs(10), || running_worker(&s).is_some()).await);
    let young = s.sim.add_orphan("w-young");
    let old = s.sim.add_orphan_aged("w-old", Duration::from_secs(600));
    // Many reconcile passes, all within the young one's grace period.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(
        s.sim.get_instance_status(&young).await,
        Ok(CloudInstanceStatus::Running),
        "an instance younger than ORPHAN_GRACE_SECONDS was terminated"
    );
    assert_eq!(
        s.sim.get_instance_status(&old).await,
        Ok(CloudInstanceStatus::Terminated),
        "an old orphan was kept"
    );
    // Once it is older than the grace period, it is an orphan like any other.
    tokio::time::sleep(Duration::from_secs(70)).await;
    assert_eq!(
        s.sim.get_instance_status(&young).await,
        Ok(CloudInstanceStatus::Terminated)
    );
}

#[actix_web::test]
async fn cloud_and_record_failures_show_in_the_status_and_metrics() {
    tokio::time::pause();
    // The first SetCloudId write fails.
    let once = AtomicBool::new(false);
    let s = single(ONE_MIN_WORKER, &[], move |txn| {
        worker_written(txn).is_some_and(|w| {
            w.state == WorkerState::Provisioning
                && w.cloud_instance_id.is_some()
                && !once.swap(true, Ordering::SeqCst)
        })
    })
    .await;
    let app = test::init_service(api::app(s.svc.state.clone())).await;
    let status = || async {
        let r = send(&app, get("/api/1.0/controller").to_request()).await;
        r.json["last_reconcile"].clone()
    };
    let shown = wait(Duration::from_secs(10), || {
        s.svc
            .state
            .controller
            .reconcile_status()
            .outcome
            .is_some_and(|o| o.contains("record_cloud_id_failed"))
    })
    .await;
    assert!(shown, "{:?}", status().await);
    let st = status().await;
    assert_eq!(st["last_error"]["step"], "record_cloud_id_failed", "{st}");
    // It recovers: the next poll finds the tagged instance and records it.
    assert!(wait(Duration::from_secs(10), || running_worker(&s).is_some()).await);

    // Now the cloud refuses launches.
    s.sim.fail_next_creates(1_000);
    let w = running_worker(&s).unwrap_or_else(|| panic!("no running worker"));
    s.sim
        .vanish(w.cloud_instance_id.as_deref().unwrap_or_default());
    let shown = wait(Duration::from_secs(20), || {
        s.svc
            .state
            .controller
            .reconcile_status()
            .outcome
            .is_some_and(|o| o.contains("launch_failed"))
    })
    .await;
    let st = status().await;
    assert!(shown, "{st}");
    assert_eq!(st["last_error"]["step"], "launch_failed", "{st}");
    assert!(st["errors"].as_u64().unwrap_or(0) >= 2, "{st}");
    let metrics = send(&app, get("/metrics").to_request()).await;
    let text = String::from_utf8_lossy(&metrics.raw).into_owned();
    for step in ["record_cloud_id_failed", "launch_failed"] {
        assert!(
            text.lines()
                .any(|l| l.contains("controller_decisions_total")
                    && l.contains(&format!("action=\"{step}\""))),
            "no metric for {step}"
        );
    }
}

// ------------------------------------- a deposed leader that still believes it leads

/// A leader whose election key was taken over behind its back (its own lease and
/// keepalives still fine, so it has no reason to doubt), with counting adapters.
struct Usurped {
    svc: Service,
    sim: Arc<SimCloud>,
    cloud: Arc<CountingCloud>,
    kube: Arc<CountingKube>,
    store: Arc<dyn Store>,
    _dir: tempfile::TempDir,
}

async fn usurped_leader() -> Usurped {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let seed = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config/shadow-deployables.yaml")
        .display()
        .to_string();
    let cfg = config(
        &dir,
        ONE_MIN_WORKER,
        &[
            ("SHADOW_SEED_FILE", &seed),
            ("LEADER_LEASE_TTL", "60"),
            ("KUBE_CONVERGE_INTERVAL_MS", "100"),
            ("ORPHAN_GRACE_SECONDS", "60"),
        ],
    );
    let sim = Arc::new(SimCloud::new(Duration::from_millis(100)));
    let cloud = CountingCloud::new(sim.clone());
    let kube = Arc::new(CountingKube {
        inner: new_sim_kube(&cfg).unwrap_or_else(|e| panic!("{e}")),
        calls: Calls::default(),
    });
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let svc = Service::start_full(cfg, store.clone(), cloud.clone(), kube.clone())
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(svc.wait_hydrated(Duration::from_secs(10)).await);
    // Generous: the machine may be loaded; this waits for behaviour, it times nothing.
    let ready = support::eventually(Duration::from_secs(30), || async {
        svc.state
            .controller
            .workers
            .list()
            .iter()
            .any(|w| w.state == WorkerState::Running)
            && kube
                .calls
                .all()
                .iter()
                // The converger ran: it patches, or reads the cluster back and finds
                // nothing to patch (the simulated cluster already agrees).
                .any(|c| c.contains("min_replicas"))
    })
    .await;
    assert!(
        ready,
        "the leader did not launch and converge: workers {:?}, kube calls {:?}",
        svc.state
            .controller
            .workers
            .list()
            .iter()
            .map(|w| (w.id.clone(), w.state))
            .collect::<Vec<_>>(),
        kube.calls.all()
    );
    usurp(store.as_ref()).await;
    assert!(
        svc.state.controller.leader_status().is_leader,
        "the old leader should not have noticed yet"
    );
    Usurped {
        svc,
        sim,
        cloud,
        kube,
        store,
        _dir: dir,
    }
}

/// Another replica takes the election key over.
async fn usurp(store: &dyn Store) {
    let taken = store
        .txn(Txn {
            compares: Vec::new(),
            success: vec![
                Op::Delete {
                    key: keys::LEADER.to_owned(),
                },
                Op::Put {
                    key: keys::LEADER.to_owned(),
                    value: b"usurper".to_vec(),
                    lease: None,
                },
            ],
            failure_gets: Vec::new(),
        })
        .await;
    assert!(taken.is_ok_and(|r| r.succeeded));
}

#[actix_web::test]
async fn a_deposed_leader_that_still_believes_it_leads_terminates_no_orphan() {
    let u = usurped_leader().await;
    let mark = u.cloud.calls.len();
    let orphan = u.sim.add_orphan_aged("w-ghost", Duration::from_secs(3600));
    // Reconcile passes run every second; the first one that wants to act finds out.
    let noticed = support::eventually(Duration::from_secs(5), || async {
        !u.svc.state.controller.leader_status().is_leader
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after: Vec<String> = u.cloud.calls.all().split_off(mark);
    assert!(
        !after.iter().any(|c| c.starts_with("terminate ")
            || c.starts_with("stop ")
            || c.starts_with("create ")),
        "the deposed leader changed the cloud: {after:?}"
    );
    assert_eq!(
        u.sim.get_instance_status(&orphan).await,
        Ok(CloudInstanceStatus::Running)
    );
    assert!(noticed, "the deposed leader never noticed");
}

#[actix_web::test]
async fn a_deposed_leader_that_still_believes_it_leads_patches_no_min_replicas() {
    let u = usurped_leader().await;
    let mark = u.kube.calls.len();
    // A min pod count changes (through another replica): the sweep wants to patch it.
    let key = keys::shadow("int", "int-predator-g2-std-16");
    let kv = u
        .store
        .get(&key)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("seeded deployable missing"));
    let mut rec: serde_json::Value =
        serde_json::from_slice(&kv.value).unwrap_or_else(|e| panic!("{e}"));
    rec["min_pod_count"] = serde_json::json!(3);
    let changed = u
        .store
        .txn(Txn {
            compares: vec![Compare::ModRevision(key.clone(), kv.mod_revision)],
            success: vec![Op::Put {
                key,
                value: serde_json::to_vec(&rec).unwrap_or_default(),
                lease: None,
            }],
            failure_gets: Vec::new(),
        })
        .await;
    assert!(changed.is_ok_and(|r| r.succeeded));
    let seen = support::eventually(Duration::from_secs(5), || async {
        u.svc
            .state
            .ops
            .shadows
            .min_pod_counts()
            .iter()
            .any(|(_, _, m)| *m == 3)
    })
    .await;
    assert!(seen, "the change did not reach the old leader");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after: Vec<String> = u.kube.calls.all().split_off(mark);
    assert!(
        !after.iter().any(|c| c.starts_with("set_min_replicas")),
        "the deposed leader patched Kubernetes: {after:?}"
    );
}

/// A callback receiver on loopback that answers 503 to the first request, 204 after.
async fn receiver(hits: Arc<AtomicUsize>) -> (String, actix_web::dev::ServerHandle) {
    let server = actix_web::HttpServer::new(move || {
        let hits = hits.clone();
        actix_web::App::new().default_service(actix_web::web::to(move || {
            let n = hits.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    actix_web::HttpResponse::ServiceUnavailable().finish()
                } else {
                    actix_web::HttpResponse::NoContent().finish()
                }
            }
        }))
    })
    .workers(1)
    .bind(("127.0.0.1", 0))
    .unwrap_or_else(|e| panic!("bind: {e}"));
    let port = server.addrs()[0].port();
    let server = server.run();
    let handle = server.handle();
    actix_rt::spawn(server);
    (format!("http://127.0.0.1:{port}/callbacks"), handle)
}

#[actix_web::test]
async fn a_deposed_leader_that_still_believes_it_leads_sends_no_callback() {
    let hits = Arc::new(AtomicUsize::new(0));
    let (url, _server) = receiver(hits.clone()).await;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut cfg = config(&dir, ONE_MIN_WORKER, &[("LEADER_LEASE_TTL", "60")]);
    cfg.operations.callback_allow_insecure_localhost = true;
    cfg.operations.sim_kube_ready_delay = Duration::from_millis(100);
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let svc = Service::start_with(
        cfg,
        store.clone(),
        Arc::new(SimCloud::new(Duration::from_millis(100))),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(svc.wait_hydrated(Duration::from_secs(10)).await);
    assert!(
        support::eventually(Duration::from_secs(10), || async {
            svc.state.controller.leader_status().is_leader
        })
        .await
    );
    let app = test::init_service(api::app(svc.state.clone())).await;
    let r = send(
        &app,
        support::post(
            "/api/1.0/int/deployables",
            &serde_json::json!({
                "name": "predator", "image": "registry.local/predator:1.2",
                "min_pod_count": 1, "max_pod_count": 2,
                "resources": {"cpu": {"request": "500m", "limit": "1"},
                              "memory": {"request": "1Gi", "limit": "2Gi"}},
                "callback": {"url": url, "method": "PUT"}
            }),
        )
        .to_request(),
    )
    .await;
    assert_eq!(r.status, 202, "{:?}", r.json);
    let id = r.json["request_id"].as_str().unwrap_or_default().to_owned();
    // The first attempt fails (503) and is recorded; the retry is due about a second
    // later. Usurp the leadership in between.
    let recorded = support::eventually(Duration::from_secs(15), || async {
        svc.state
            .ops
            .intents
            .get(&id)
            .is_some_and(|(i, _)| i.delivery.attempts.len() == 1)
    })
    .await;
    assert!(recorded, "the first attempt was not recorded");
    usurp(store.as_ref()).await;
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    assert!(svc.state.controller.leader_status().is_leader);

    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "the deposed leader delivered the callback"
    );
    assert!(
        !svc.state.controller.leader_status().is_leader,
        "the deposed leader never noticed"
    );
}
