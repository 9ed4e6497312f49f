//! The Resource Controller end to end, in-process, with the simulated cloud and a
//! paused clock: scale-up and batching, template choice, max_workers, scale-down, the
//! drain deadline, do_not_disrupt, vanished and orphan cloud instances.

use std::sync::Arc;
use std::time::Duration;

use actix_web::test;
use resource_plane::adapters::memory::MemoryStore;
use resource_plane::adapters::sim_cloud::SimCloud;
use resource_plane::api;
use resource_plane::app::Service;
use resource_plane::config::Config;
use resource_plane::ports::store::Store;
use serde_json::{json, Value};

use crate::support::{self, get, post, send, TestApp};

pub const TEMPLATES: &str = "templates:
  - name: small
    instance_type: m5.xlarge
    image_id: ami-12c6146b
    capacity: { cpu: 4, memory_gb: 16 }
    min_workers: 0
    max_workers: 10
    hourly_cost: 0.2
    labels: {}
  - name: big
    instance_type: m5zn.metal
    image_id: ami-12c6146b
    capacity: { cpu: 48, memory_gb: 192 }
    min_workers: 0
    max_workers: 2
    hourly_cost: 4.0
    labels: {}
";

/// A controller-tuned configuration with `templates` written to a temp file.
pub fn controller_config(dir: &tempfile::TempDir, templates: &str) -> Config {
    let path = dir.path().join("templates.yaml");
    std::fs::write(&path, templates).unwrap_or_else(|e| panic!("{e}"));
    let mut c = support::config();
    let s = &mut c.controller;
    s.templates_file = path;
    s.templates_file_explicit = true;
    s.scale_up_batch = Duration::from_millis(200);
    s.cloud_poll = Duration::from_millis(100);
    s.reconcile_interval = Duration::from_secs(1);
    s.scale_down_idle = Duration::from_secs(5);
    s.drain_deadline = Some(Duration::from_secs(3600));
    s.provision_timeout = Duration::from_secs(30);
    c
}

struct Fixture {
    svc: Service,
    cloud: Arc<SimCloud>,
    _dir: tempfile::TempDir,
}

async fn start(templates: &str, boot: Duration) -> Fixture {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let cfg = controller_config(&dir, templates);
    let cloud = Arc::new(SimCloud::new(boot));
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let svc = Service::start_with(cfg, store, cloud.clone()).unwrap_or_else(|e| panic!("{e}"));
    assert!(svc.wait_hydrated(Duration::from_secs(10)).await);
    let led = wait(Duration::from_secs(5), || {
        svc.state.controller.leader_status().is_leader
    })
    .await;
    assert!(led, "single replica did not become leader");
    Fixture {
        svc,
        cloud,
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

async fn submit(app: &impl TestApp, cpu: f64, mem: f64, dnd: bool) -> String {
    let answer = support::submit_instance(app, cpu, mem, dnd).await;
    assert_eq!(answer["state"], "PENDING");
    support::id_of(&answer)
}

fn states(f: &Fixture) -> Vec<String> {
    f.svc
        .state
        .controller
        .workers
        .list()
        .iter()
        .map(|w| format!("{:?}", w.state))
        .collect()
}

fn worker_of(f: &Fixture, id: &str) -> Option<String> {
    f.svc
        .state
        .controller
        .instances
        .get(id)
        .and_then(|(i, _)| i.worker_id)
}

fn instance_state(f: &Fixture, id: &str) -> String {
    f.svc
        .state
        .controller
        .instances
        .get(id)
        .map(|(i, _)| format!("{:?}", i.state))
        .unwrap_or_default()
}

async fn heartbeat_all(app: &impl TestApp, f: &Fixture) {
    for w in f.svc.state.controller.workers.list() {
        if w.state == resource_plane::domain::worker::WorkerState::Running {
            let r = send(
                app,
                post(
                    &format!("/api/1.0/workers/{}/heartbeat", w.id),
                    &json!({"running_instances": w.instances}),
                )
                .to_request(),
            )
            .await;
            assert_eq!(r.status, 200, "{:?}", r.json);
        }
    }
}

#[actix_web::test]
async fn scale_up_batches_demand_and_picks_the_least_wasteful_template() {
    tokio::time::pause();
    let f = start(TEMPLATES, Duration::from_secs(1)).await;
    let app = test::init_service(api::app(f.svc.state.clone())).await;
    let ids = [
        submit(&app, 2.0, 4.0, false).await,
        submit(&app, 2.0, 4.0, false).await,
        submit(&app, 2.0, 4.0, false).await,
    ];
    // inside the batching window nothing is launched yet
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        f.cloud.create_calls(),
        0,
        "launched before the batch window closed"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    // 3 x (2 cpu, 4 GiB): two small workers waste less than one big one
    assert_eq!(f.cloud.create_calls(), 2);
    let workers = f.svc.state.controller.workers.list();
    assert_eq!(workers.len(), 2);
    assert!(workers.iter().all(|w| w.template == "small"), "{workers:?}");
    // no over-provisioning while they boot: more reconciles, still two
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(f.cloud.create_calls(), 2);
    // once the cloud says running, everything is placed
    assert!(
        wait(Duration::from_secs(5), || ids
            .iter()
            .all(|i| instance_state(&f, i) == "Scheduled"))
        .await,
        "{:?}",
        states(&f)
    );
    heartbeat_all(&app, &f).await;
    for id in &ids {
        let r = send(&app, get(&format!("/api/1.0/instances/{id}")).to_request()).await;
        assert_eq!(r.json["state"], "RUNNING");
    }
    // the latency from unplaceable to the cloud call was recorded per launch
    let text = f.svc.state.metrics.render();
    assert!(
        text.contains("scale_up_latency_seconds_count{template=\"small\"} 2"),
        "{text}"
    );
    let r = send(&app, get("/api/1.0/controller").to_request()).await;
    assert_eq!(r.json["leader"]["is_leader"], true);
    let decisions = r.json["recent_decisions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        decisions
            .iter()
            .filter(|d| d["action"] == "scale_up")
            .count()
            == 2,
        "{decisions:?}"
    );
}

#[actix_web::test]
async fn max_workers_is_respected_and_impossible_demand_is_reported() {
    tokio::time::pause();
    let one_small = TEMPLATES.replace("max_workers: 10", "max_workers: 1");
    let f = start(
        &one_small.replace("max_workers: 2", "max_workers: 0"),
        Duration::from_millis(300),
    )
    .await;
    let app = test::init_service(api::app(f.svc.state.clone())).await;
    for _ in 0..3 {
        submit(&app, 2.0, 4.0, false).await;
    }
    let huge = submit(&app, 500.0, 10.0, false).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(f.cloud.create_calls(), 1, "max_workers of 1 exceeded");
    assert_eq!(f.svc.state.controller.workers.list().len(), 1);
    let r = send(&app, get("/api/1.0/controller").to_request()).await;
    let unplaceable: Vec<Value> = r.json["recent_decisions"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|d| d["action"] == "unplaceable")
        .collect();
    assert!(
        unplaceable.iter().any(|d| d["subject"] == huge.as_str()),
        "{unplaceable:?}"
    );
    assert_eq!(
        r.json["pending_demand"]["instances"], 2,
        "one small slot short, one impossible"
    );
    // Each says why it waits: neither fits a template that may still launch a worker.
    let reasons = &r.json["pending_demand"]["reasons"];
    assert_eq!(
        reasons[huge.as_str()],
        resource_plane::actors::autoscaler::WAIT_UNPLACEABLE,
        "{reasons}"
    );
    assert_eq!(
        reasons.as_object().map(|o| o.len()),
        Some(2),
        "every pending instance has a reason: {reasons}"
    );
    // Later batches (more demand arrives) plan again, but the journal names the
    // impossible instance once: a backlog must not push every other decision out.
    for _ in 0..3 {
        submit(&app, 2.0, 4.0, false).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let r = send(&app, get("/api/1.0/controller").to_request()).await;
    let journaled = |d: &&Value| d["action"] == "unplaceable" && d["subject"] == huge.as_str();
    let decisions = r.json["recent_decisions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        decisions.iter().filter(journaled).count(),
        1,
        "{decisions:?}"
    );
}

#[actix_web::test]
async fn idle_workers_drain_stop_and_terminate_but_do_not_disrupt_blocks_a_drain() {
    tokio::time::pause();
    let f = start(TEMPLATES, Duration::from_millis(300)).await;
    let app = test::init_service(api::app(f.svc.state.clone())).await;
    let keep = submit(&app, 4.0, 16.0, true).await;
    assert!(
        wait(Duration::from_secs(5), || instance_state(&f, &keep)
            == "Scheduled")
        .await
    );
    let worker = worker_of(&f, &keep).unwrap_or_default();
    let r = send(
        &app,
        post(&format!("/api/1.0/workers/{worker}/drain"), &json!({})).to_request(),
    )
    .await;
    assert_eq!(
        r.status, 409,
        "do_not_disrupt must block a voluntary drain: {:?}",
        r.json
    );
    // idle scale-down does not touch a busy worker
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(states(&f), vec!["Running"]);
    // once the instance completes the worker idles, drains, stops, terminates
    let r = send(
        &app,
        post(&format!("/api/1.0/instances/{keep}/complete"), &json!({})).to_request(),
    )
    .await;
    assert_eq!(
        (r.status, r.json["state"].as_str()),
        (200, Some("COMPLETED"))
    );
    let r = send(
        &app,
        post(&format!("/api/1.0/instances/{keep}/complete"), &json!({})).to_request(),
    )
    .await;
    assert_eq!(r.status, 409, "completing twice");
    assert!(
        wait(Duration::from_secs(15), || states(&f) == vec!["Terminated"]).await,
        "{:?}",
        states(&f)
    );
    assert_eq!(f.cloud.running_count(), 0);
    let text = f.svc.state.metrics.render();
    for action in ["drain", "stop", "terminated"] {
        assert!(
            text.contains(&format!(
                "controller_decisions_total{{action=\"{action}\"}}"
            )),
            "{action} not counted"
        );
    }
}

#[actix_web::test]
async fn a_drain_deadline_stops_a_busy_worker_and_its_instance_is_rescheduled() {
    tokio::time::pause();
    let f = start(TEMPLATES, Duration::from_millis(300)).await;
    let app = test::init_service(api::app(f.svc.state.clone())).await;
    let inst = submit(&app, 4.0, 16.0, false).await;
    assert!(
        wait(Duration::from_secs(5), || instance_state(&f, &inst)
            == "Scheduled")
        .await
    );
    let first = worker_of(&f, &inst).unwrap_or_default();
    let r = send(
        &app,
        post(
            &format!("/api/1.0/workers/{first}/drain"),
            &json!({"deadline_seconds": 30}),
        )
        .to_request(),
    )
    .await;
    assert_eq!(
        (r.status, r.json["state"].as_str()),
        (202, Some("DRAINING"))
    );
    // a draining worker receives nothing new: a second instance gets its own worker
    let other = submit(&app, 1.0, 1.0, false).await;
    assert!(
        wait(Duration::from_secs(5), || instance_state(&f, &other)
            == "Scheduled")
        .await
    );
    let second = worker_of(&f, &other).unwrap_or_default();
    assert_ne!(first, second);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        f.svc
            .state
            .controller
            .workers
            .get(&first)
            .map(|w| format!("{:?}", w.state))
            .as_deref(),
        Some("Draining")
    );
    // past the deadline it stops anyway, and its instance goes back to the scheduler
    let moved = wait(Duration::from_secs(40), || {
        f.svc
            .state
            .controller
            .instances
            .get(&inst)
            .and_then(|(i, _)| i.worker_id)
            .is_some_and(|w| w != first)
    })
    .await;
    assert!(
        moved,
        "instance was not rescheduled: {:?}",
        instance_state(&f, &inst)
    );
    let w = f
        .svc
        .state
        .controller
        .workers
        .get(&first)
        .map(|w| format!("{:?}", w.state));
    assert!(
        matches!(w.as_deref(), Some("Stopping" | "Stopped" | "Terminated")),
        "{w:?}"
    );
}

#[actix_web::test]
async fn a_vanished_worker_is_replaced_and_orphans_are_terminated() {
    tokio::time::pause();
    let f = start(TEMPLATES, Duration::from_millis(300)).await;
    let app = test::init_service(api::app(f.svc.state.clone())).await;
    let inst = submit(&app, 2.0, 2.0, false).await;
    assert!(
        wait(Duration::from_secs(5), || instance_state(&f, &inst)
            == "Scheduled")
        .await
    );
    let first = f.svc.state.controller.workers.list()[0].clone();
    f.cloud
        .vanish(first.cloud_instance_id.as_deref().unwrap_or_default());
    // Launched long ago (younger ones are spared for ORPHAN_GRACE_SECONDS).
    let orphan = f
        .cloud
        .add_orphan_aged("ghost-worker", Duration::from_secs(3600));
    let replaced = wait(Duration::from_secs(10), || {
        f.svc
            .state
            .controller
            .instances
            .get(&inst)
            .is_some_and(|(i, _)| {
                i.worker_id.as_deref().is_some_and(|w| w != first.id)
                    && format!("{:?}", i.state) == "Scheduled"
            })
    })
    .await;
    assert!(
        replaced,
        "instance not rescheduled onto a new worker: {:?}",
        states(&f)
    );
    let old = f
        .svc
        .state
        .controller
        .workers
        .get(&first.id)
        .map(|w| format!("{:?}", w.state));
    assert!(
        matches!(old.as_deref(), Some("Failed" | "Terminated")),
        "{old:?}"
    );
    let status =
        resource_plane::ports::cloud::CloudProvider::get_instance_status(&*f.cloud, &orphan).await;
    assert!(
        matches!(
            status,
            Ok(
                resource_plane::ports::cloud::CloudInstanceStatus::Terminated
                    | resource_plane::ports::cloud::CloudInstanceStatus::NotFound
            )
        ),
        "{status:?}"
    );
}

#[actix_web::test]
async fn twenty_instances_scale_up_run_complete_and_scale_down() {
    tokio::time::pause();
    let f = start(TEMPLATES, Duration::from_millis(500)).await;
    let app = test::init_service(api::app(f.svc.state.clone())).await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(submit(&app, 2.0, 8.0, false).await);
    }
    assert!(
        wait(Duration::from_secs(10), || ids
            .iter()
            .all(|i| instance_state(&f, i) == "Scheduled"))
        .await,
        "{:?}",
        states(&f)
    );
    heartbeat_all(&app, &f).await;
    assert!(ids.iter().all(|i| instance_state(&f, i) == "Running"));
    let workers = f.svc.state.controller.workers.list();
    for w in &workers {
        assert!(
            w.allocated.cpu <= w.capacity.cpu && w.allocated.memory_gb <= w.capacity.memory_gb,
            "{w:?}"
        );
    }
    assert_eq!(
        f.cloud.create_calls(),
        workers.len(),
        "one launch per worker"
    );
    // the hosts report their instances finished
    for w in &workers {
        let r = send(
            &app,
            post(
                &format!("/api/1.0/workers/{}/heartbeat", w.id),
                &json!({"running_instances": []}),
            )
            .to_request(),
        )
        .await;
        assert_eq!(
            r.json["completed"].as_array().map(Vec::len),
            Some(w.instances.len())
        );
    }
    assert!(ids.iter().all(|i| instance_state(&f, i) == "Completed"));
    assert!(
        wait(Duration::from_secs(20), || states(&f)
            .iter()
            .all(|s| s == "Terminated"))
        .await,
        "{:?}",
        states(&f)
    );
    assert_eq!(f.cloud.running_count(), 0);
    // worker actors are visible through introspection; instances are records, not actors
    let r = send(&app, get("/api/1.0/actors").to_request()).await;
    let data = r.json["data"].as_array().cloned().unwrap_or_default();
    assert!(data.iter().any(|a| a["kind"] == "worker"));
    assert!(data.iter().all(|a| a["kind"] != "instance"));
}

#[actix_web::test]
async fn controller_routes_validate_input() {
    tokio::time::pause();
    let f = start(TEMPLATES, Duration::from_millis(300)).await;
    let app = test::init_service(api::app(f.svc.state.clone())).await;
    for body in [
        json!({"requirements": {"cpu": -1, "memory_gb": 1}}),
        json!({"requirements": {"cpu": 1}}),
        json!({"requirements": {"cpu": 1, "memory_gb": 1}, "colour": "red"}),
        json!({"requirements": {"cpu": 1e300, "memory_gb": 1}}),
        json!({"requirements": "lots"}),
    ] {
        let r = send(&app, post("/api/1.0/instances", &body).to_request()).await;
        assert_eq!(r.status, 400, "{body}: {:?}", r.json);
        assert!(r.json["error"].is_string());
    }
    assert_eq!(
        send(&app, get("/api/1.0/instances/nope").to_request())
            .await
            .status,
        404
    );
    assert_eq!(
        send(&app, get("/api/1.0/workers/nope").to_request())
            .await
            .status,
        404
    );
    assert_eq!(
        send(
            &app,
            post("/api/1.0/workers/nope/drain", &json!({})).to_request()
        )
        .await
        .status,
        404
    );
    let r = send(
        &app,
        post(
            "/api/1.0/workers/nope/heartbeat",
            &json!({"running_instances": "x"}),
        )
        .to_request(),
    )
    .await;
    assert_eq!(r.status, 400);
    let r = send(&app, get("/api/1.0/worker-templates").to_request()).await;
    assert_eq!(r.json["data"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        send(&app, get("/api/1.0/workers").to_request())
            .await
            .status,
        200
    );
}

/// A cloud that records when each launch was asked for.
struct Recording {
    inner: SimCloud,
    calls: std::sync::Mutex<Vec<(String, std::time::Instant)>>,
}

#[async_trait::async_trait]
impl resource_plane::ports::cloud::CloudProvider for Recording {
    async fn create_instance(
        &self,
        template: &resource_plane::domain::worker::WorkerTemplate,
        worker_id: &str,
    ) -> Result<resource_plane::ports::cloud::LaunchOutcome, resource_plane::ports::cloud::CloudError>
    {
        if let Ok(mut c) = self.calls.lock() {
            c.push((worker_id.to_owned(), std::time::Instant::now()));
        }
        self.inner.create_instance(template, worker_id).await
    }
    async fn terminate_instance(
        &self,
        id: &str,
    ) -> Result<(), resource_plane::ports::cloud::CloudError> {
        self.inner.terminate_instance(id).await
    }
    async fn stop_instance(
        &self,
        id: &str,
    ) -> Result<(), resource_plane::ports::cloud::CloudError> {
        self.inner.stop_instance(id).await
    }
    async fn get_instance_status(
        &self,
        id: &str,
    ) -> Result<
        resource_plane::ports::cloud::CloudInstanceStatus,
        resource_plane::ports::cloud::CloudError,
    > {
        self.inner.get_instance_status(id).await
    }
    async fn list_instances(
        &self,
    ) -> Result<
        Vec<resource_plane::ports::cloud::CloudInstance>,
        resource_plane::ports::cloud::CloudError,
    > {
        self.inner.list_instances().await
    }
    fn name(&self) -> &'static str {
        "recording"
    }
}

/// Real time: each instance needs a whole worker, so each submission is unplaceable;
/// measures submission -> cloud launch call (the batching window is most of it).
#[actix_web::test]
async fn time_from_unplaceable_instance_to_cloud_call() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let cfg = controller_config(
        &dir,
        &TEMPLATES.replace("max_workers: 10", "max_workers: 40"),
    );
    let cloud = Arc::new(Recording {
        inner: SimCloud::new(Duration::from_millis(100)),
        calls: std::sync::Mutex::new(Vec::new()),
    });
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let svc = Service::start_with(cfg, store, cloud.clone()).unwrap_or_else(|e| panic!("{e}"));
    assert!(svc.wait_hydrated(Duration::from_secs(10)).await);
    assert!(
        support::eventually(Duration::from_secs(5), || async {
            svc.state.controller.leader_status().is_leader
        })
        .await
    );
    let app = test::init_service(api::app(svc.state.clone())).await;
    let mut lat = Vec::new();
    for i in 0..20 {
        let before = cloud.calls.lock().map(|c| c.len()).unwrap_or(0);
        let t = std::time::Instant::now();
        submit(&app, 4.0, 16.0, false).await;
        let launched = support::eventually(Duration::from_secs(5), || async {
            cloud.calls.lock().map(|c| c.len()).unwrap_or(0) > before
        })
        .await;
        assert!(launched, "submission {i} launched nothing");
        let at = cloud.calls.lock().ok().and_then(|c| c.last().map(|x| x.1));
        lat.push(
            at.map(|a| a.duration_since(t).as_secs_f64() * 1000.0)
                .unwrap_or(f64::NAN),
        );
        // let the worker boot so the next one is a clean, separate scale-up
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(
        cloud.calls.lock().map(|c| c.len()).unwrap_or(0),
        20,
        "one launch per submission"
    );
    lat.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize];
    println!(
        "unplaceable -> cloud call over {} scale-ups (SCALE_UP_BATCH_MS=200): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        lat.len(),
        q(0.5),
        q(0.99),
        lat[lat.len() - 1]
    );
}

#[actix_web::test]
async fn missed_heartbeats_fail_a_worker_and_its_instances_move() {
    tokio::time::pause();
    let f = start(TEMPLATES, Duration::from_millis(300)).await;
    let app = test::init_service(api::app(f.svc.state.clone())).await;
    let inst = submit(&app, 2.0, 2.0, false).await;
    assert!(
        wait(Duration::from_secs(5), || instance_state(&f, &inst)
            == "Scheduled")
        .await
    );
    heartbeat_all(&app, &f).await;
    assert_eq!(instance_state(&f, &inst), "Running");
    let first = worker_of(&f, &inst).unwrap_or_default();
    // no heartbeat for longer than HEARTBEAT_TIMEOUT_SECONDS (120 s)
    let moved = wait(Duration::from_secs(150), || {
        f.svc
            .state
            .controller
            .instances
            .get(&inst)
            .is_some_and(|(i, _)| i.worker_id.as_deref().is_some_and(|w| w != first))
    })
    .await;
    assert!(moved, "instance stayed on the silent worker");
    let w = f
        .svc
        .state
        .controller
        .workers
        .get(&first)
        .map(|w| format!("{:?}", w.state));
    assert!(
        matches!(w.as_deref(), Some("Failed" | "Terminated")),
        "{w:?}"
    );
    let r = send(&app, get("/api/1.0/controller").to_request()).await;
    let reasons: Vec<String> = r.json["recent_decisions"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|d| d["subject"] == first.as_str())
        .filter_map(|d| d["reason"].as_str().map(str::to_owned))
        .collect();
    assert!(
        reasons.iter().any(|r| r == "missed heartbeats"),
        "{reasons:?}"
    );
}

#[actix_web::test]
async fn a_launch_that_never_boots_times_out_and_is_replaced() {
    tokio::time::pause();
    // instances take 60 s to boot; PROVISION_TIMEOUT_SECONDS is 30 in this config
    let f = start(TEMPLATES, Duration::from_secs(60)).await;
    let app = test::init_service(api::app(f.svc.state.clone())).await;
    let inst = submit(&app, 2.0, 2.0, false).await;
    assert!(wait(Duration::from_secs(2), || f.cloud.create_calls() == 1).await);
    let first = f.svc.state.controller.workers.list()[0].id.clone();
    let failed =
        wait(Duration::from_secs(40), || {
            f.svc.state.controller.workers.get(&first).is_some_and(|w| {
                matches!(format!("{:?}", w.state).as_str(), "Failed" | "Terminated")
            })
        })
        .await;
    assert!(failed, "{:?}", states(&f));
    // the demand is still there, so another worker is launched for it
    assert!(wait(Duration::from_secs(5), || f.cloud.create_calls() >= 2).await);
    assert_eq!(instance_state(&f, &inst), "Pending");
}

/// Ended instances and terminated workers are kept on a retention lease in etcd, so
/// the store does not grow forever.
#[actix_web::test]
async fn ended_records_are_put_on_a_retention_lease() {
    let etcd = crate::support::Etcd::start();
    let prefix = support::unique_prefix();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut cfg = controller_config(&dir, TEMPLATES);
    cfg.controller.scale_down_idle = Duration::from_secs(1);
    let cloud = Arc::new(SimCloud::new(Duration::from_millis(100)));
    let svc =
        Service::start_with(cfg, etcd.store(&prefix), cloud).unwrap_or_else(|e| panic!("{e}"));
    assert!(svc.wait_hydrated(Duration::from_secs(10)).await);
    let app = test::init_service(api::app(svc.state.clone())).await;
    let inst = submit(&app, 2.0, 2.0, false).await;
    let placed = support::eventually(Duration::from_secs(10), || async {
        svc.state
            .controller
            .instances
            .get(&inst)
            .is_some_and(|(i, _)| i.worker_id.is_some())
    })
    .await;
    assert!(placed);
    let worker = svc
        .state
        .controller
        .instances
        .get(&inst)
        .and_then(|(i, _)| i.worker_id)
        .unwrap_or_default();
    let r = send(
        &app,
        post(&format!("/api/1.0/instances/{inst}/complete"), &json!({})).to_request(),
    )
    .await;
    assert_eq!(r.status, 200);
    let terminated = support::eventually(Duration::from_secs(20), || async {
        svc.state
            .controller
            .workers
            .get(&worker)
            .is_some_and(|w| format!("{:?}", w.state) == "Terminated")
    })
    .await;
    assert!(
        terminated,
        "worker not terminated: {:?}",
        svc.state.controller.workers.get(&worker)
    );
    let mut c = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for key in [
        format!("{prefix}/instances/{inst}"),
        format!("{prefix}/workers/{worker}"),
    ] {
        let r = c
            .get(key.clone(), None)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let lease = r.kvs().first().map(|kv| kv.lease()).unwrap_or(0);
        assert_ne!(lease, 0, "{key} has no retention lease");
    }
}

#[actix_web::test]
async fn a_new_leader_plans_from_the_whole_fleet_not_from_a_view_still_loading() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let cfg = controller_config(&dir, crate::fencing::ONE_MIN_WORKER);
    let cloud = Arc::new(SimCloud::new(Duration::from_millis(300)));
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let first = Service::start_with(cfg.clone(), store.clone(), cloud.clone())
        .unwrap_or_else(|e| panic!("{e}"));
    let running = wait(Duration::from_secs(10), || {
        first
            .state
            .controller
            .workers
            .list()
            .iter()
            .any(|w| w.state == resource_plane::domain::worker::WorkerState::Running)
    })
    .await;
    assert!(running, "the first leader did not bring up min_workers");
    first.shutdown().await;
    assert_eq!(cloud.create_calls(), 1);

    // The successor wins the election at once but reads the fleet for 2 s.
    let slow = support::Hooked::new(
        store.clone(),
        support::SlowListing::new(resource_plane::keys::WORKER_PREFIX, Duration::from_secs(2)),
    );
    let second = Service::start_with(cfg, slow, cloud.clone()).unwrap_or_else(|e| panic!("{e}"));
    let led = wait(Duration::from_secs(2), || {
        second.state.controller.leader_status().is_leader
    })
    .await;
    assert!(led, "the successor did not win the election");
    assert!(second.wait_hydrated(Duration::from_secs(10)).await);
    // Time for anything the leader decided on a partial view to reach the cloud.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        cloud.create_calls(),
        1,
        "the successor launched a worker while it could not yet see the running one: {:?}",
        second.state.controller.workers.list()
    );
    assert_eq!(second.state.controller.workers.list().len(), 1);
    second.shutdown().await;
}
