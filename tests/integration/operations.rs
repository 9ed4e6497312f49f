//! Asynchronous operations end to end, in-process, with the simulated cluster and a
//! real HTTP callback receiver on 127.0.0.1: each operation's signed callback, retries
//! with a stable webhook-id, durability across a restart on the same etcd, SSRF
//! refusals, Kubernetes errors, and min-replica convergence of shadow deployables.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::{test, web, App, HttpRequest, HttpResponse, HttpServer};
use resource_plane::adapters::memory::MemoryStore;
use resource_plane::adapters::sim_cloud::SimCloud;
use resource_plane::adapters::sim_kube::SimKube;
use resource_plane::api;
use resource_plane::app::Service;
use resource_plane::config::{Config, Secret};
use resource_plane::domain::callback::verify_signature;
use resource_plane::ports::kube::{DeployableSpec, ResourceSpec};
use resource_plane::ports::store::Store;
use serde_json::{json, Value};

use crate::support::{self, get, post, put, send, Etcd, TestApp};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// One callback as received.
#[derive(Debug, Clone)]
pub struct Received {
    method: String,
    webhook_id: String,
    timestamp: i64,
    signature: String,
    custom: Option<String>,
    body: Value,
    raw: Vec<u8>,
    at: Instant,
}

/// A callback receiver on a loopback port; answers 503 `fail_first` times.
pub struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<Received>>>,
    answered: Arc<Mutex<u32>>,
    _server: actix_web::dev::ServerHandle,
}

impl Receiver {
    async fn start(fail_first: u32) -> Self {
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let answered: Arc<Mutex<u32>> = Arc::default();
        let (g, a) = (got.clone(), answered.clone());
        let server = HttpServer::new(move || {
            let (g, a) = (g.clone(), a.clone());
            App::new().default_service(web::to(move |req: HttpRequest, body: web::Bytes| {
                let (g, a) = (g.clone(), a.clone());
                async move {
                    let h = |n: &str| {
                        req.headers()
                            .get(n)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned)
                    };
                    let n = {
                        let mut n = a.lock().unwrap_or_else(|e| e.into_inner());
                        *n += 1;
                        *n
                    };
                    let r = Received {
                        method: req.method().to_string(),
                        webhook_id: h("webhook-id").unwrap_or_default(),
                        timestamp: h("webhook-timestamp")
                            .and_then(|t| t.parse().ok())
                            .unwrap_or(0),
                        signature: h("webhook-signature").unwrap_or_default(),
                        custom: h("x-workflow"),
                        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
                        raw: body.to_vec(),
                        at: Instant::now(),
                    };
                    g.lock().unwrap_or_else(|e| e.into_inner()).push(r);
                    if n <= fail_first {
                        HttpResponse::ServiceUnavailable().finish()
                    } else {
                        HttpResponse::NoContent().finish()
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
        Self {
            url: format!("http://127.0.0.1:{port}/callbacks"),
            got,
            answered,
            _server: handle,
        }
    }

    fn all(&self) -> Vec<Received> {
        self.got.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn for_request(&self, id: &str) -> Vec<Received> {
        self.all()
            .into_iter()
            .filter(|r| r.body["requestId"] == id)
            .collect()
    }
}

fn ops_config() -> Config {
    let mut c = support::config();
    c.operations.callback_allow_insecure_localhost = true;
    c.operations.callback_signing_secret = Some(Secret::new(SECRET));
    c.operations.sim_kube_ready_delay = Duration::from_millis(100);
    c.operations.converge_interval = Duration::from_millis(50);
    c
}

fn start_with_kube(cfg: Config, store: Arc<dyn Store>, kube: Arc<SimKube>) -> Service {
    let cloud = Arc::new(SimCloud::new(Duration::from_millis(100)));
    Service::start_full(cfg, store, cloud, kube).unwrap_or_else(|e| panic!("{e}"))
}

async fn ready(svc: &Service) {
    assert!(svc.wait_hydrated(Duration::from_secs(15)).await);
    let led = support::eventually(Duration::from_secs(15), || async {
        svc.state.controller.leader_status().is_leader
    })
    .await;
    assert!(led, "not leader");
}

fn callback(url: &str) -> Value {
    json!({"url": url, "method": "PUT", "headers": {"x-workflow": "er5tdgsh"}})
}

async fn accepted(app: &impl TestApp, path: &str, body: Value) -> String {
    let r = send(app, post(path, &body).to_request()).await;
    assert_eq!(r.status, 202, "{path}: {:?}", r.json);
    assert_eq!(r.json["status"], "IN_PROGRESS");
    assert!(r.json["message"].is_string() && r.json["name"].is_string());
    r.json["request_id"].as_str().unwrap_or_default().to_owned()
}

fn deployable(name: &str, url: &str) -> Value {
    json!({
        "name": name, "image": "registry.local/predator:1.2", "node_selector": {"pool": "g2-std-16"},
        "min_pod_count": 2, "max_pod_count": 4,
        "resources": {"cpu": {"request": "500m", "limit": "1"}, "memory": {"request": "1Gi", "limit": "2Gi"},
                      "gpu": {"request": "1", "limit": "1", "memory": {"request": "16Gi", "limit": "16Gi"}}},
        "modelsToLoad": [{"name": "ranker", "version": "7", "runtime": "triton", "precision": "fp16", "batchSize": 8, "artifactVersion": "a1"}],
        "workflow_run_id": "er5tdgsh", "workflow_plan": "pre-scaleup-load-test", "workflow_task_id": "t1",
        "callback": callback(url)
    })
}

async fn delivered(rx: &Receiver, id: &str) -> Received {
    let ok = support::eventually(Duration::from_secs(20), || async {
        !rx.for_request(id).is_empty()
    })
    .await;
    assert!(ok, "no callback for {id}");
    rx.for_request(id).remove(0)
}

fn check_signed(r: &Received) {
    assert!(
        verify_signature(
            SECRET.as_bytes(),
            &r.webhook_id,
            r.timestamp,
            &r.raw,
            &r.signature
        ),
        "signature does not verify: {r:?}"
    );
}

#[actix_web::test]
async fn every_operation_calls_back_signed_when_its_condition_holds() {
    let rx = Receiver::start(0).await;
    let kube = Arc::new(SimKube::new(Duration::from_millis(100)));
    let svc = start_with_kube(ops_config(), Arc::new(MemoryStore::new()), kube.clone());
    ready(&svc).await;
    let app = test::init_service(api::app(svc.state.clone())).await;

    let id = accepted(
        &app,
        "/api/1.0/int/deployables",
        deployable("predator", &rx.url),
    )
    .await;
    let r = delivered(&rx, &id).await;
    check_signed(&r);
    assert_eq!(r.method, "PUT");
    assert_eq!(
        r.custom.as_deref(),
        Some("er5tdgsh"),
        "caller's headers are sent"
    );
    assert_eq!(r.body["status"], "SUCCEEDED");
    assert_eq!(r.body["operation"], "CREATE_DEPLOYABLE");
    assert_eq!(r.body["desiredCondition"], "Available");
    assert_eq!(r.body["workflow"]["runId"], "er5tdgsh");
    assert!(r.body["observedAt"].is_string());
    let op = send(
        &app,
        get(&format!("/api/1.0/int/operations/{id}")).to_request(),
    )
    .await;
    assert_eq!(op.json["status"], "SUCCEEDED");
    let attempts_ok = support::eventually(Duration::from_secs(5), || async {
        let op = send(
            &app,
            get(&format!("/api/1.0/int/operations/{id}")).to_request(),
        )
        .await;
        op.json["delivery"]["delivered"] == true
    })
    .await;
    assert!(attempts_ok, "delivery not recorded");
    let op = send(
        &app,
        get(&format!("/api/1.0/int/operations/{id}")).to_request(),
    )
    .await;
    assert_eq!(
        op.json["delivery"]["attempts"].as_array().map(Vec::len),
        Some(1)
    );
    assert_eq!(op.json["callback"]["headers"]["x-workflow"], "<redacted>");
    assert_eq!(
        send(
            &app,
            get(&format!("/api/1.0/prod/operations/{id}")).to_request()
        )
        .await
        .status,
        404
    );

    let id = accepted(
        &app,
        "/api/1.0/int/deployables/restart",
        json!({"namespace": "int", "name": "predator", "callback": callback(&rx.url)}),
    )
    .await;
    let r = delivered(&rx, &id).await;
    check_signed(&r);
    assert_eq!(
        (r.body["status"].as_str(), r.body["operation"].as_str()),
        (Some("SUCCEEDED"), Some("RESTART_DEPLOYABLES"))
    );

    let id = accepted(&app, "/api/1.0/int/models/load", json!({"deployable_name": "predator", "model": {"name": "ranker", "version": "8", "artifact_location": "s3://models/ranker/8"}, "workflow_run_id": "er5tdgsh", "callback": callback(&rx.url)})).await;
    let r = delivered(&rx, &id).await;
    check_signed(&r);
    assert_eq!(
        (
            r.body["status"].as_str(),
            r.body["desiredCondition"].as_str()
        ),
        (Some("SUCCEEDED"), Some("PodsReadyOnNewTemplate"))
    );

    let id = accepted(&app, "/api/1.0/int/jobs", json!({"job_name": "warmup", "container": {"image": "registry.local/warmup:1"}, "payload": {"rps": 100}, "callback": callback(&rx.url)})).await;
    let r = delivered(&rx, &id).await;
    check_signed(&r);
    assert_eq!(r.body["status"], "SUCCEEDED");

    kube.fail_job("doomed");
    let id = accepted(&app, "/api/1.0/int/jobs", json!({"job_name": "doomed", "container": {"image": "registry.local/x:1"}, "callback": callback(&rx.url)})).await;
    let r = delivered(&rx, &id).await;
    assert_eq!(r.body["status"], "FAILED");
    assert!(r.body["detail"].is_string());

    // a Kubernetes error is answered with the API server's reason, and no intent is stored
    let before = svc.state.ops.intents.all().len();
    let r = send(&app, post("/api/1.0/int/jobs", &json!({"job_name": "warmup", "container": {"image": "x"}, "callback": callback(&rx.url)})).to_request()).await;
    assert_eq!(r.status, 409, "{:?}", r.json);
    assert!(r.error().contains("kubernetes"), "{}", r.error());
    let r = send(&app, post("/api/1.0/int/models/load", &json!({"deployable_name": "ghost", "model": {"name": "m", "version": "1", "artifact_location": "s3://x"}, "callback": callback(&rx.url)})).to_request()).await;
    assert_eq!(r.status, 404, "{:?}", r.json);
    assert_eq!(svc.state.ops.intents.all().len(), before);

    // bad input
    let mut bad = deployable("Bad_Name", &rx.url);
    let r = send(&app, post("/api/1.0/int/deployables", &bad).to_request()).await;
    assert_eq!(r.status, 400);
    bad = deployable("ok", &rx.url);
    bad["min_pod_count"] = json!(5);
    let r = send(&app, post("/api/1.0/int/deployables", &bad).to_request()).await;
    assert_eq!(r.status, 400, "min above max");
    let r = send(
        &app,
        post(
            "/api/1.0/int/deployables/restart",
            &json!({"namespace": "kube-system", "callback": callback(&rx.url)}),
        )
        .to_request(),
    )
    .await;
    assert_eq!(r.status, 400, "another namespace");

    // latency from the condition holding to the callback arriving
    let rx2 = Receiver::start(0).await;
    let mut ids = Vec::new();
    for i in 0..40 {
        ids.push(accepted(&app, "/api/1.0/int/jobs", json!({"job_name": format!("lat-{i}"), "container": {"image": "x"}, "callback": callback(&rx2.url)})).await);
    }
    let t0 = Instant::now();
    let all = support::eventually(Duration::from_secs(60), || async {
        ids.iter().all(|id| !rx2.for_request(id).is_empty())
    })
    .await;
    println!(
        "40 callbacks after {:?}; got {}",
        t0.elapsed(),
        rx2.all().len()
    );
    assert!(all, "not every callback arrived");
    let text = svc.state.metrics.render();
    let count = text
        .lines()
        .find(|l| l.starts_with("callback_delivery_seconds_count"))
        .unwrap_or_default()
        .to_owned();
    println!("callback latency histogram: {count}");
    let mut lat: Vec<f64> = rx2
        .all()
        .iter()
        .filter_map(|r| {
            let observed =
                chrono::DateTime::parse_from_rfc3339(r.body["observedAt"].as_str()?).ok()?;
            let arrived = chrono::Utc::now() - chrono::Duration::from_std(r.at.elapsed()).ok()?;
            Some(
                (arrived - observed.with_timezone(&chrono::Utc)).num_microseconds()? as f64
                    / 1000.0,
            )
        })
        .collect();
    lat.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    println!(
        "condition -> callback latency over {} callbacks: p50 {:.1} ms, p99 {:.1} ms",
        lat.len(),
        q(0.5),
        q(0.99)
    );
    assert_eq!(lat.len(), 40);
}

#[actix_web::test]
async fn a_failing_receiver_gets_exactly_one_successful_delivery_with_one_webhook_id() {
    let rx = Receiver::start(2).await;
    let kube = Arc::new(SimKube::new(Duration::from_millis(50)));
    let svc = start_with_kube(ops_config(), Arc::new(MemoryStore::new()), kube);
    ready(&svc).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    let id = accepted(
        &app,
        "/api/1.0/int/jobs",
        json!({"job_name": "retry", "container": {"image": "x"}, "callback": callback(&rx.url)}),
    )
    .await;
    let done = support::eventually(Duration::from_secs(30), || async {
        let op = send(
            &app,
            get(&format!("/api/1.0/int/operations/{id}")).to_request(),
        )
        .await;
        op.json["delivery"]["delivered"] == true
    })
    .await;
    assert!(done, "never delivered");
    let got = rx.for_request(&id);
    assert_eq!(got.len(), 3, "two 503s then one success");
    assert!(
        got.iter().all(|r| r.webhook_id == got[0].webhook_id),
        "webhook-id changed"
    );
    got.iter().for_each(check_signed);
    assert_eq!(*rx.answered.lock().unwrap_or_else(|e| e.into_inner()), 3);
    let op = send(
        &app,
        get(&format!("/api/1.0/int/operations/{id}")).to_request(),
    )
    .await;
    let attempts = op.json["delivery"]["attempts"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(attempts.len(), 3);
    assert_eq!(attempts[0]["status"], 503);
    assert_eq!(attempts[2]["status"], 204);
}

#[actix_web::test]
async fn pending_intents_and_retries_survive_a_restart_on_the_same_etcd() {
    let etcd = Etcd::start();
    let prefix = support::unique_prefix();
    let flaky = Receiver::start(1).await;
    let rx = Receiver::start(0).await;
    // The cluster outlives the service: both instances talk to the same one.
    let kube = Arc::new(SimKube::new(Duration::from_millis(1500)));
    let mut cfg = ops_config();
    cfg.controller.leader_lease_ttl = Duration::from_secs(2);
    cfg.controller.instance_id = "first".into();
    let first = start_with_kube(cfg.clone(), etcd.store(&prefix), kube.clone());
    ready(&first).await;
    let app = test::init_service(api::app(first.state.clone())).await;
    let quick = accepted(
        &app,
        "/api/1.0/int/jobs",
        json!({"job_name": "quick", "container": {"image": "x"}, "callback": callback(&flaky.url)}),
    )
    .await;
    // wait until the quick one's first attempt failed (a retry is now scheduled)
    assert!(
        support::eventually(Duration::from_secs(10), || async {
            !flaky.for_request(&quick).is_empty()
        })
        .await
    );
    // and stop while another intent still waits for its rollout
    let slow = accepted(
        &app,
        "/api/1.0/int/deployables",
        deployable("slow", &rx.url),
    )
    .await;
    first.shutdown().await;
    drop(app);
    assert!(
        rx.for_request(&slow).is_empty(),
        "slow intent must still be pending at shutdown"
    );

    cfg.controller.instance_id = "second".into();
    let second = start_with_kube(cfg, etcd.store(&prefix), kube);
    ready(&second).await;
    let both = support::eventually(Duration::from_secs(30), || async {
        flaky.for_request(&quick).len() >= 2 && !rx.for_request(&slow).is_empty()
    })
    .await;
    assert!(
        both,
        "callbacks not delivered after the restart: quick {:?}, slow {:?}",
        flaky.for_request(&quick).len(),
        rx.for_request(&slow).len()
    );
    let q = flaky.for_request(&quick);
    assert_eq!(q[0].webhook_id, q[q.len() - 1].webhook_id);
    assert_eq!(rx.for_request(&slow)[0].body["status"], "SUCCEEDED");

    // once delivered, the intent is kept on a retention lease (etcd removes it later)
    let key = format!("{prefix}/watch-intents/{slow}");
    let leased = support::eventually(Duration::from_secs(10), || async {
        let Ok(mut c) = etcd_client::Client::connect([etcd.endpoint()], None).await else {
            return false;
        };
        let Ok(r) = c.get(key.clone(), None).await else {
            return false;
        };
        r.kvs().first().is_some_and(|kv| kv.lease() != 0)
    })
    .await;
    assert!(leased, "a finished intent has no retention lease");
}

#[actix_web::test]
async fn callbacks_to_private_loopback_link_local_and_metadata_addresses_are_refused() {
    let kube = Arc::new(SimKube::new(Duration::from_millis(50)));
    let mut cfg = ops_config();
    cfg.operations.callback_allow_insecure_localhost = false;
    let svc = start_with_kube(cfg, Arc::new(MemoryStore::new()), kube.clone());
    ready(&svc).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    for url in [
        "https://10.1.2.3/cb",
        "https://192.168.0.10/cb",
        "https://127.0.0.1/cb",
        "https://[::1]/cb",
        "https://169.254.169.254/latest/meta-data",
        "https://169.254.10.10/cb",
        "https://localhost/cb",
        "http://example.com/cb",
    ] {
        let body =
            json!({"job_name": "ssrf", "container": {"image": "x"}, "callback": {"url": url}});
        let r = send(&app, post("/api/1.0/int/jobs", &body).to_request()).await;
        assert_eq!(r.status, 400, "{url} accepted: {:?}", r.json);
        assert!(r.error().contains("callback"), "{}", r.error());
    }
    assert!(
        kube.job("int", "ssrf").is_none(),
        "no Kubernetes action for a refused callback"
    );
    assert!(svc.state.ops.intents.all().is_empty());
}

#[actix_web::test]
async fn shadow_min_pod_count_converges_to_kubernetes_min_replicas() {
    let kube = Arc::new(SimKube::new(Duration::from_millis(50)));
    kube.seed_deployable(&DeployableSpec {
        name: "shadow-1".into(),
        namespace: "int".into(),
        image: "x".into(),
        node_selector: Default::default(),
        min_pod_count: 0,
        max_pod_count: 20,
        resources: ResourceSpec::default(),
        models_to_load: Vec::new(),
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let svc = start_with_kube(ops_config(), Arc::new(MemoryStore::new()), kube.clone());
    ready(&svc).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    let base = "/api/1.0/int/shadow-deployables";
    send(
        &app,
        put(
            &format!("{base}/shadow-1"),
            &json!({"node_pool": "p", "dns": "d"}),
        )
        .to_request(),
    )
    .await;
    send(
        &app,
        post(
            base,
            &json!({"action": "PROCURE", "name": "shadow-1", "workflow_run_id": "r1"}),
        )
        .to_request(),
    )
    .await;
    let r = send(
        &app,
        post(
            &format!("{base}/min-pod-count"),
            &json!({"action": "INCREASE", "count": 3, "name": "shadow-1", "workflow_run_id": "r1"}),
        )
        .to_request(),
    )
    .await;
    assert_eq!(r.json["min_pod_count"], 3);
    let up = support::eventually(Duration::from_secs(10), || async {
        kube.min_replicas("int", "shadow-1") == Some(3)
    })
    .await;
    assert!(
        up,
        "min replicas never reached 3: {:?}",
        kube.min_replicas("int", "shadow-1")
    );
    send(
        &app,
        post(
            base,
            &json!({"action": "RELEASE", "name": "shadow-1", "workflow_run_id": "r1"}),
        )
        .to_request(),
    )
    .await;
    let down = support::eventually(Duration::from_secs(10), || async {
        kube.min_replicas("int", "shadow-1") == Some(0)
    })
    .await;
    assert!(down, "release did not bring min replicas to 0");
}
