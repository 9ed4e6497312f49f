//! `do_not_disrupt` on every drain path: the idle drain of the reconciler, a drain whose
//! compare-and-swap lost to a placement, and an API drain on a replica whose view of the
//! instances lags. Each time a `do_not_disrupt` instance lands on the worker between the
//! moment somebody looked at it and the moment the drain is written, and the drain must
//! not happen. Plus a property test over the worker actors and the memory store: no
//! interleaving of placements, completions and drains (through two replicas' actors)
//! ever leaves a DRAINING worker holding a `do_not_disrupt` instance.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::test;
use chrono::Utc;
use resource_plane::adapters::memory::MemoryStore;
use resource_plane::adapters::sim_cloud::SimCloud;
use resource_plane::api;
use resource_plane::app::Service;
use resource_plane::domain::worker::{
    instance_transition, place, Instance, InstanceState, Resources, Worker, WorkerState,
    WorkerTemplate,
};
use resource_plane::keys;
use resource_plane::ports::store::{Compare, Op, Store, StoreError, Txn, TxnResult, WatchReceiver};
use serde_json::json;

use crate::controller::{controller_config, TEMPLATES};
use crate::support::{post, send, Hook, Hooked};

/// The `small` template of [`TEMPLATES`].
pub fn small() -> WorkerTemplate {
    WorkerTemplate {
        name: "small".into(),
        instance_type: Some("m5.xlarge".into()),
        image_id: Some("ami-12c6146b".into()),
        capacity: Resources {
            cpu: 4.0,
            memory_gb: 16.0,
        },
        min_workers: 0,
        max_workers: 10,
        hourly_cost: 0.2,
        ..WorkerTemplate::default()
    }
}

/// Writes a RUNNING `small` worker idle since `idle_secs` ago.
pub async fn seed_worker(store: &dyn Store, id: &str, idle_secs: i64) -> Worker {
    let now = Utc::now();
    let mut w = Worker::new(
        id,
        &small(),
        now - chrono::Duration::seconds(idle_secs + 60),
    );
    w.state = WorkerState::Running;
    w.idle_since = Some(now - chrono::Duration::seconds(idle_secs));
    let r = store
        .txn(Txn {
            compares: vec![Compare::ModRevision(keys::worker(id), 0)],
            success: vec![Op::Put {
                key: keys::worker(id),
                value: serde_json::to_vec(&w).unwrap_or_default(),
                lease: None,
            }],
            failure_gets: vec![],
        })
        .await
        .unwrap_or_else(|e| panic!("seed worker: {e}"));
    assert!(r.succeeded, "worker {id} already exists");
    w
}

/// Places a new instance on `worker_id` the way the scheduler's transaction does (both
/// records, both revisions compared), straight against the store, as another replica
/// would. Returns the instance.
pub async fn place_directly(
    store: &dyn Store,
    worker_id: &str,
    inst_id: &str,
    cpu: f64,
    dnd: bool,
    state: InstanceState,
) -> Instance {
    let kv = store
        .get(&keys::worker(worker_id))
        .await
        .unwrap_or_else(|e| panic!("read worker: {e}"))
        .unwrap_or_else(|| panic!("worker {worker_id} missing"));
    let w: Worker = serde_json::from_slice(&kv.value).unwrap_or_else(|e| panic!("{e}"));
    let fresh = Instance::new(
        inst_id,
        Resources {
            cpu,
            memory_gb: cpu,
        },
        dnd,
        Utc::now(),
    );
    let next = place(&w, &fresh, Utc::now()).unwrap_or_else(|e| panic!("place: {e}"));
    let mut inst = instance_transition(&fresh, InstanceState::Scheduled, Some(w.id.clone()))
        .unwrap_or_else(|e| panic!("{e}"));
    if state == InstanceState::Running {
        inst = instance_transition(&inst, InstanceState::Running, None)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let r = store
        .txn(Txn {
            compares: vec![
                Compare::ModRevision(keys::worker(worker_id), kv.mod_revision),
                Compare::ModRevision(keys::instance(inst_id), 0),
            ],
            success: vec![
                Op::Put {
                    key: keys::worker(worker_id),
                    value: serde_json::to_vec(&next).unwrap_or_default(),
                    lease: None,
                },
                Op::Put {
                    key: keys::instance(inst_id),
                    value: serde_json::to_vec(&inst).unwrap_or_default(),
                    lease: None,
                },
            ],
            failure_gets: vec![],
        })
        .await
        .unwrap_or_else(|e| panic!("place txn: {e}"));
    assert!(r.succeeded, "direct placement lost its CAS");
    inst
}

/// Reads a worker record.
pub async fn stored_worker(store: &dyn Store, id: &str) -> Worker {
    let kv = store
        .get(&keys::worker(id))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("worker {id} missing"));
    serde_json::from_slice(&kv.value).unwrap_or_else(|e| panic!("{e}"))
}

/// A store that lets the test act at two real moments of a drain: just before the
/// transaction that writes a worker as DRAINING (another replica's placement lands
/// first), and while the instance watch is held back (this replica's view of the
/// instances lags its view of the workers).
pub struct Interleave {
    /// Worker whose DRAINING write gets a `do_not_disrupt` placement in front of it.
    before_drain_of: Mutex<Option<String>>,
    /// How many such placements were made.
    pub placed: AtomicUsize,
    /// While set, events of the `/instances/` watch are held back (in order).
    pub hold_instances: Arc<AtomicBool>,
    /// While set, events of the `/workers/` watch are held back (in order).
    pub hold_workers: Arc<AtomicBool>,
}

impl Interleave {
    /// Nothing armed, nothing held.
    pub fn new() -> Self {
        Self {
            before_drain_of: Mutex::new(None),
            placed: AtomicUsize::new(0),
            hold_instances: Arc::new(AtomicBool::new(false)),
            hold_workers: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The next DRAINING write of `worker` is preceded by a `do_not_disrupt` placement.
    pub fn place_before_drain(&self, worker: &str) {
        if let Ok(mut g) = self.before_drain_of.lock() {
            *g = Some(worker.to_owned());
        }
    }
}

fn writes_draining(txn: &Txn, worker_key: &str) -> bool {
    txn.success.iter().any(|op| match op {
        Op::Put { key, value, .. } => {
            key == worker_key
                && serde_json::from_slice::<Worker>(value)
                    .is_ok_and(|w| w.state == WorkerState::Draining)
        }
        Op::Delete { .. } => false,
    })
}

#[async_trait::async_trait]
impl Hook for Interleave {
    async fn txn(&self, inner: &dyn Store, txn: Txn) -> Result<TxnResult, StoreError> {
        let target = self.before_drain_of.lock().ok().and_then(|g| g.clone());
        if let Some(w) = target {
            if writes_draining(&txn, &keys::worker(&w)) {
                if let Ok(mut g) = self.before_drain_of.lock() {
                    *g = None;
                }
                let n = self.placed.fetch_add(1, Ordering::SeqCst);
                place_directly(
                    inner,
                    &w,
                    &format!("i-dnd-{n}"),
                    1.0,
                    true,
                    InstanceState::Scheduled,
                )
                .await;
            }
        }
        inner.txn(txn).await
    }
    async fn watch(
        &self,
        inner: &dyn Store,
        prefix: &str,
        rev: i64,
    ) -> Result<WatchReceiver, StoreError> {
        let mut rx = inner.watch(prefix, rev).await?;
        let hold = match prefix {
            keys::INSTANCE_PREFIX => self.hold_instances.clone(),
            keys::WORKER_PREFIX => self.hold_workers.clone(),
            _ => return Ok(rx),
        };
        let (tx, out) = tokio::sync::mpsc::channel(1024);
        tokio::spawn(async move {
            while let Some(batch) = rx.recv().await {
                // bounded: a held watch is released by the test or after ~10 min
                for _ in 0..60_000 {
                    if !hold.load(Ordering::SeqCst) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                if tx.send(batch).await.is_err() {
                    return;
                }
            }
        });
        Ok(out)
    }
}

struct Fixture {
    svc: Service,
    store: Arc<Hooked<Interleave>>,
    _dir: tempfile::TempDir,
}

/// A leading single replica over an [`Interleave`] memory store, with `worker` seeded
/// idle for `idle_secs`; idle workers drain after `scale_down_idle`. With a long
/// `scale_down_idle` the reconciler stays out of the way too.
async fn start(worker: &str, idle_secs: i64, scale_down_idle: Duration) -> Fixture {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut cfg = controller_config(&dir, TEMPLATES);
    cfg.controller.scale_down_idle = scale_down_idle;
    if scale_down_idle >= Duration::from_secs(3600) {
        cfg.controller.reconcile_interval = Duration::from_secs(3600);
    }
    let inner: Arc<dyn Store> = Arc::new(MemoryStore::new());
    seed_worker(inner.as_ref(), worker, idle_secs).await;
    let store = Hooked::new(inner, Interleave::new());
    let cloud = Arc::new(SimCloud::new(Duration::from_millis(100)));
    let svc = Service::start_with(cfg, store.clone(), cloud).unwrap_or_else(|e| panic!("{e}"));
    assert!(svc.wait_hydrated(Duration::from_secs(10)).await);
    for _ in 0..200 {
        if svc.state.controller.leader_status().is_leader {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(svc.state.controller.leader_status().is_leader);
    Fixture {
        svc,
        store,
        _dir: dir,
    }
}

async fn assert_not_drained(f: &Fixture, worker: &str) {
    let w = stored_worker(f.store.as_ref(), worker).await;
    assert_eq!(
        w.state,
        WorkerState::Running,
        "a worker holding a do_not_disrupt instance was drained: {w:?}"
    );
    let dnd: Vec<String> = w
        .instances
        .iter()
        .filter(|i| i.starts_with("i-dnd"))
        .cloned()
        .collect();
    assert!(!dnd.is_empty(), "the do_not_disrupt placement is on it");
}

#[actix_web::test]
async fn the_idle_drain_never_drains_a_worker_that_just_got_a_do_not_disrupt_instance() {
    tokio::time::pause();
    // idle for an hour: the first reconcile pass selects it for an idle drain
    let f = start("w-idle", 3600, Duration::from_secs(5)).await;
    f.store.hook.place_before_drain("w-idle");
    for _ in 0..100 {
        if f.store.hook.placed.load(Ordering::SeqCst) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        f.store.hook.placed.load(Ordering::SeqCst),
        1,
        "the reconciler never tried to drain the idle worker"
    );
    // more passes: the worker is busy now, and stays RUNNING
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_not_drained(&f, "w-idle").await;
}

#[actix_web::test]
async fn an_api_drain_that_lost_its_cas_to_a_do_not_disrupt_placement_is_refused() {
    tokio::time::pause();
    let f = start("w-api", 0, Duration::from_secs(3600)).await;
    let app = test::init_service(api::app(f.svc.state.clone())).await;
    f.store.hook.place_before_drain("w-api");
    let r = send(
        &app,
        post("/api/1.0/workers/w-api/drain", &json!({})).to_request(),
    )
    .await;
    assert_eq!(f.store.hook.placed.load(Ordering::SeqCst), 1);
    assert_eq!(
        r.status, 409,
        "drain must be re-decided on the fresh worker: {:?}",
        r.json
    );
    assert!(r.error().contains("do_not_disrupt"), "{}", r.error());
    assert_not_drained(&f, "w-api").await;
}

#[actix_web::test]
async fn an_api_drain_is_decided_on_the_store_not_on_a_lagging_instance_view() {
    tokio::time::pause();
    let f = start("w-lag", 0, Duration::from_secs(3600)).await;
    let app = test::init_service(api::app(f.svc.state.clone())).await;
    // another replica places a do_not_disrupt instance; this replica's instance watch
    // lags while its worker watch has already delivered the placement
    f.store.hook.hold_instances.store(true, Ordering::SeqCst);
    place_directly(
        f.store.as_ref(),
        "w-lag",
        "i-dnd-lag",
        1.0,
        true,
        InstanceState::Running,
    )
    .await;
    let mut seen = false;
    for _ in 0..100 {
        seen = f
            .svc
            .state
            .controller
            .workers
            .get("w-lag")
            .is_some_and(|w| w.instances.iter().any(|i| i == "i-dnd-lag"));
        if seen {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(seen, "worker view never saw the placement");
    assert!(f.svc.state.controller.instances.get("i-dnd-lag").is_none());
    let r = send(
        &app,
        post("/api/1.0/workers/w-lag/drain", &json!({})).to_request(),
    )
    .await;
    f.store.hook.hold_instances.store(false, Ordering::SeqCst);
    assert_eq!(r.status, 409, "{:?}", r.json);
    assert_not_drained(&f, "w-lag").await;
}

#[actix_web::test]
async fn the_reconciler_does_not_take_an_instance_off_its_worker_on_a_lagging_view() {
    tokio::time::pause();
    let f = start("w-rec", 0, Duration::from_secs(3600)).await;
    f.store.hook.hold_instances.store(true, Ordering::SeqCst);
    place_directly(
        f.store.as_ref(),
        "w-rec",
        "i-dnd-rec",
        1.0,
        true,
        InstanceState::Running,
    )
    .await;
    let ctl = f.svc.state.controller.clone();
    let mut seen = false;
    for _ in 0..100 {
        seen = ctl
            .workers
            .get("w-rec")
            .is_some_and(|w| w.instances.iter().any(|i| i == "i-dnd-rec"));
        if seen {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(seen, "worker view never saw the placement");
    let autoscaler = ctl
        .autoscaler()
        .unwrap_or_else(|| panic!("the leader runs an autoscaler"));
    // a pass while the instance view lags, then one after it caught up
    let _ = resource_plane::actors::reconciler::reconcile_once(&ctl, &autoscaler).await;
    f.store.hook.hold_instances.store(false, Ordering::SeqCst);
    for _ in 0..100 {
        if ctl.instances.get("i-dnd-rec").is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = resource_plane::actors::reconciler::reconcile_once(&ctl, &autoscaler).await;
    let w = stored_worker(f.store.as_ref(), "w-rec").await;
    assert!(
        w.instances.iter().any(|i| i == "i-dnd-rec"),
        "the reconciler took a running instance off its worker: {w:?}"
    );
    let kv = f
        .store
        .get(&keys::instance("i-dnd-rec"))
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("instance missing"));
    let i: Instance = serde_json::from_slice(&kv.value).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (i.state, i.worker_id.as_deref()),
        (InstanceState::Running, Some("w-rec")),
        "the do_not_disrupt instance was disrupted"
    );
}

#[actix_web::test]
async fn the_reconciler_does_not_reschedule_a_running_instance_on_a_lagging_worker_view() {
    tokio::time::pause();
    let f = start("w-lagw", 0, Duration::from_secs(3600)).await;
    f.store.hook.hold_workers.store(true, Ordering::SeqCst);
    place_directly(
        f.store.as_ref(),
        "w-lagw",
        "i-dnd-lagw",
        1.0,
        true,
        InstanceState::Running,
    )
    .await;
    let ctl = f.svc.state.controller.clone();
    for _ in 0..100 {
        if ctl.instances.get("i-dnd-lagw").is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ctl.instances.get("i-dnd-lagw").is_some());
    assert!(ctl
        .workers
        .get("w-lagw")
        .is_some_and(|w| w.instances.is_empty()));
    let autoscaler = ctl
        .autoscaler()
        .unwrap_or_else(|| panic!("the leader runs an autoscaler"));
    let _ = resource_plane::actors::reconciler::reconcile_once(&ctl, &autoscaler).await;
    f.store.hook.hold_workers.store(false, Ordering::SeqCst);
    let kv = f
        .store
        .get(&keys::instance("i-dnd-lagw"))
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("instance missing"));
    let i: Instance = serde_json::from_slice(&kv.value).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (i.state, i.worker_id.as_deref()),
        (InstanceState::Running, Some("w-lagw")),
        "a running do_not_disrupt instance was rescheduled on a stale view"
    );
}

mod interleavings {
    //! Worker actors of two replicas over one memory store, fed no watch (so their
    //! cached records go stale and their transactions lose compares), driven by random
    //! groups of concurrent placements, completions and voluntary drains.

    use std::collections::HashMap;
    use std::sync::Arc;

    use futures::future::join_all;
    use proptest::prelude::*;
    use resource_plane::actors::instances;
    use resource_plane::actors::leader::Fence;
    use resource_plane::actors::worker::{WorkerCmd, WorkerDeps, WorkerRegistry};
    use resource_plane::adapters::memory::MemoryStore;
    use resource_plane::clock::Clock;
    use resource_plane::domain::worker::{Instance, InstanceState, Resources, Worker};
    use resource_plane::idempotency::LeasePool;
    use resource_plane::keys;
    use resource_plane::ports::store::Store;
    use resource_plane::telemetry::Metrics;

    use super::seed_worker;

    const WORKERS: usize = 2;

    #[derive(Debug, Clone)]
    enum Step {
        /// Submit an instance and place it on a worker through replica `via`.
        Place {
            worker: usize,
            dnd: bool,
            via: usize,
        },
        /// Complete the `nth` submitted instance (if it is still placed).
        Complete { nth: usize, via: usize },
        /// Voluntary drain through replica `via`.
        Drain { worker: usize, via: usize },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => (0..WORKERS, any::<bool>(), 0..2usize)
                .prop_map(|(worker, dnd, via)| Step::Place { worker, dnd, via }),
            1 => (0..8usize, 0..2usize).prop_map(|(nth, via)| Step::Complete { nth, via }),
            2 => (0..WORKERS, 0..2usize).prop_map(|(worker, via)| Step::Drain { worker, via }),
        ]
    }

    fn registry(store: Arc<dyn Store>) -> Arc<WorkerRegistry> {
        WorkerRegistry::new(Arc::new(WorkerDeps {
            store,
            metrics: Metrics::new(),
            fence: Arc::new(Fence::default()),
            view: Default::default(),
            index: Default::default(),
            clock: Clock::new(),
            retention: LeasePool::new(std::time::Duration::from_secs(600)),
            send_timeout: std::time::Duration::from_secs(10),
        }))
    }

    async fn all_instances(store: &dyn Store) -> Vec<(Instance, i64)> {
        let (kvs, _) = store
            .list(keys::INSTANCE_PREFIX)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        kvs.iter()
            .filter_map(|kv| {
                serde_json::from_slice::<Instance>(&kv.value)
                    .ok()
                    .map(|i| (i, kv.mod_revision))
            })
            .collect()
    }

    async fn run(groups: Vec<Vec<Step>>) -> Result<(), TestCaseError> {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let ids: Vec<String> = (0..WORKERS).map(|n| format!("w{n}")).collect();
        for id in &ids {
            seed_worker(store.as_ref(), id, 0).await;
        }
        let replicas = [registry(store.clone()), registry(store.clone())];
        let mut submitted: Vec<String> = Vec::new();
        for group in groups {
            let mut calls = Vec::new();
            for s in group {
                let store = store.clone();
                match s {
                    Step::Place { worker, dnd, via } => {
                        let id = format!("i{}", submitted.len());
                        submitted.push(id.clone());
                        let reg = replicas[via].clone();
                        let wid = ids[worker].clone();
                        calls.push(Box::pin(async move {
                            let inst = Instance::new(
                                &id,
                                Resources {
                                    cpu: 1.0,
                                    memory_gb: 1.0,
                                },
                                dnd,
                                chrono::Utc::now(),
                            );
                            let Ok(instances::Created::New(rev)) =
                                instances::create(store.as_ref(), &inst, None).await
                            else {
                                return;
                            };
                            let cmd = WorkerCmd::Place {
                                instance: inst,
                                instance_rev: rev,
                            };
                            let _ = reg.send(&wid, cmd, false).await;
                        })
                            as std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>);
                    }
                    Step::Complete { nth, via } => {
                        let Some(id) = submitted.get(nth).cloned() else {
                            continue;
                        };
                        let reg = replicas[via].clone();
                        calls.push(Box::pin(async move {
                            let Ok(Some((inst, rev))) = instances::get(store.as_ref(), &id).await
                            else {
                                return;
                            };
                            let (Some(wid), true) = (inst.worker_id.clone(), inst.is_live()) else {
                                return;
                            };
                            let mut done = inst.clone();
                            done.state = InstanceState::Completed;
                            let cmd = WorkerCmd::Unplace {
                                instance_id: id.clone(),
                                requirements: inst.requirements,
                                instance: Some((done, rev)),
                                idem: None,
                            };
                            let _ = reg.send(&wid, cmd, false).await;
                        }));
                    }
                    Step::Drain { worker, via } => {
                        // The actor decides on the instances it reads itself; callers
                        // no longer pass (possibly stale) lists.
                        let reg = replicas[via].clone();
                        let wid = ids[worker].clone();
                        calls.push(Box::pin(async move {
                            let cmd = WorkerCmd::Drain {
                                deadline: Some(chrono::Utc::now() + chrono::Duration::hours(1)),
                                voluntary: true,
                                idle_cutoff: None,
                                idem: None,
                            };
                            let _ = reg.send(&wid, cmd, false).await;
                        }));
                    }
                }
            }
            join_all(calls).await;
        }
        let insts: HashMap<String, Instance> = all_instances(store.as_ref())
            .await
            .into_iter()
            .map(|(i, _)| (i.id.clone(), i))
            .collect();
        for id in &ids {
            let kv = store.get(&keys::worker(id)).await.ok().flatten();
            let w: Worker = kv
                .and_then(|kv| serde_json::from_slice(&kv.value).ok())
                .ok_or_else(|| TestCaseError::fail("worker record missing"))?;
            for i in insts.values() {
                if i.worker_id.as_deref() == Some(id.as_str())
                    && matches!(i.state, InstanceState::Scheduled | InstanceState::Running)
                {
                    prop_assert!(
                        w.instances.contains(&i.id),
                        "{} placed on {id} but not listed: {w:?}",
                        i.id
                    );
                    prop_assert!(
                        !(i.do_not_disrupt
                            && w.state == resource_plane::domain::worker::WorkerState::Draining),
                        "worker {id} was drained while holding do_not_disrupt instance {}: {w:?}",
                        i.id
                    );
                }
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn no_interleaving_drains_a_worker_holding_a_do_not_disrupt_instance(
            groups in prop::collection::vec(prop::collection::vec(step(), 1..4), 1..8),
        ) {
            let sys = actix::System::new();
            sys.block_on(run(groups))?;
        }
    }
}
