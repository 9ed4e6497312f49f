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
use resource_plane::ports::kube::{DeployableSpec, ResourceSpec, ScaleTarget};
use resource_plane::ports::store::Store;
use serde_json::{json, Value};

use crate::support::{self, get, post, put, send, Etcd, Hook, Hooked, TestApp};

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
            .filter(|r| r.body["request_id"] == id)
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

/// Registers shadow deployable `name` in `int`, procures it for run `r1` and raises its
/// minimum pod count by `count`; the min-pod-count answer.
async fn procured_with_min_pods(app: &impl TestApp, name: &str, count: u32) -> support::Resp {
    let base = "/api/1.0/int/shadow-deployables";
    support::register_shadow(app, "int", name).await;
    let r = send(
        app,
        post(
            base,
            &json!({"action": "PROCURE", "name": name, "workflow_run_id": "r1"}),
        )
        .to_request(),
    )
    .await;
    assert_eq!(r.json["status"], "PROCURED", "{r:?}");
    send(
        app,
        post(
            &format!("{base}/min-pod-count"),
            &json!({"action": "INCREASE", "count": count, "name": name, "workflow_run_id": "r1"}),
        )
        .to_request(),
    )
    .await
}

/// Waits until `name`'s minimum replicas in the cluster are `want`, lowers them to 1
/// behind the service's back, and says whether the service puts `want` back in `wait`.
async fn drift_corrected(kube: &SimKube, name: &str, want: i32, wait: Duration) -> bool {
    assert!(
        support::eventually(Duration::from_secs(10), || async {
            kube.min_replicas("int", name) == Some(want)
        })
        .await
    );
    kube.set_min_replicas("int", &ScaleTarget::same(name), 1)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    support::eventually(wait, || async {
        kube.min_replicas("int", name) == Some(want)
    })
    .await
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
        "models_to_load": [{"name": "ranker", "version": "7", "runtime": "triton", "precision": "fp16", "batch_size": 8, "artifact_version": "a1"}],
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
async fn a_model_load_reaches_the_serving_container_and_refuses_an_unknown_one() {
    let rx = Receiver::start(0).await;
    let kube = Arc::new(SimKube::new(Duration::from_millis(50)));
    let svc = start_with_kube(ops_config(), Arc::new(MemoryStore::new()), kube.clone());
    ready(&svc).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    let id = accepted(
        &app,
        "/api/1.0/int/deployables",
        deployable("predator", &rx.url),
    )
    .await;
    assert_eq!(delivered(&rx, &id).await.body["status"], "SUCCEEDED");
    let load = |container: Option<&str>, version: &str| {
        let mut body = json!({"deployable_name": "predator", "model": {"name": "ranker", "version": version, "artifact_location": format!("s3://models/ranker/{version}")}, "callback": callback(&rx.url)});
        if let Some(c) = container {
            body["container"] = json!(c);
        }
        body
    };

    // No container named: the first one gets the model.
    let id = accepted(&app, "/api/1.0/int/models/load", load(None, "8")).await;
    assert_eq!(delivered(&rx, &id).await.body["status"], "SUCCEEDED");
    let main = kube.container_env("int", "predator", "main").unwrap();
    assert_eq!(main.get("MODEL_NAME").map(String::as_str), Some("ranker"));
    assert_eq!(main.get("MODEL_VERSION").map(String::as_str), Some("8"));
    assert_eq!(
        main.get("MODEL_ARTIFACT_LOCATION").map(String::as_str),
        Some("s3://models/ranker/8")
    );

    // A named container gets it; the first one keeps what it had.
    kube.add_container("int", "predator", "ranker").unwrap();
    let id = accepted(&app, "/api/1.0/int/models/load", load(Some("ranker"), "9")).await;
    assert_eq!(delivered(&rx, &id).await.body["status"], "SUCCEEDED");
    let ranker = kube.container_env("int", "predator", "ranker").unwrap();
    assert_eq!(ranker.get("MODEL_VERSION").map(String::as_str), Some("9"));
    let main = kube.container_env("int", "predator", "main").unwrap();
    assert_eq!(main.get("MODEL_VERSION").map(String::as_str), Some("8"));

    // A container the Deployment lacks: 422 naming it, no intent left, nothing changed.
    let before = svc.state.ops.intents.all().len();
    let r = send(
        &app,
        post("/api/1.0/int/models/load", &load(Some("gpu-server"), "10")).to_request(),
    )
    .await;
    assert_eq!(r.status, 422, "{:?}", r.json);
    assert!(
        r.error().contains("no container \"gpu-server\""),
        "{}",
        r.error()
    );
    let withdrawn = support::eventually(Duration::from_secs(5), || async {
        svc.state.ops.intents.all().len() == before
    })
    .await;
    assert!(withdrawn, "the refused load leaves no intent behind");
    let ranker = kube.container_env("int", "predator", "ranker").unwrap();
    assert_eq!(ranker.get("MODEL_VERSION").map(String::as_str), Some("9"));

    // Not a container name at all, or not a string: 400 before anything is stored.
    for bad in [json!("Bad_Name"), json!(""), json!(7), json!(["main"])] {
        let mut body = load(None, "10");
        body["container"] = bad.clone();
        let r = send(&app, post("/api/1.0/int/models/load", &body).to_request()).await;
        assert_eq!(r.status, 400, "container {bad}: {:?}", r.json);
    }
    // One model per load: a list of models is not this route's shape.
    let mut body = load(None, "10");
    body["models"] = json!([body["model"].clone()]);
    let r = send(&app, post("/api/1.0/int/models/load", &body).to_request()).await;
    assert_eq!(r.status, 400, "{:?}", r.json);
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
    assert_eq!(r.body["desired_condition"], "Available");
    assert_eq!(r.body["workflow"]["run_id"], "er5tdgsh");
    assert!(r.body["observed_at"].is_string());
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
            r.body["desired_condition"].as_str()
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

    // a Kubernetes error is answered with the API server's reason, and the intent stored
    // before the action is withdrawn
    let before = svc.state.ops.intents.all().len();
    let r = send(&app, post("/api/1.0/int/jobs", &json!({"job_name": "warmup", "container": {"image": "x"}, "callback": callback(&rx.url)})).to_request()).await;
    assert_eq!(r.status, 409, "{:?}", r.json);
    assert!(r.error().contains("kubernetes"), "{}", r.error());
    let r = send(&app, post("/api/1.0/int/models/load", &json!({"deployable_name": "ghost", "model": {"name": "m", "version": "1", "artifact_location": "s3://x"}, "callback": callback(&rx.url)})).to_request()).await;
    assert_eq!(r.status, 404, "{:?}", r.json);
    let withdrawn = support::eventually(Duration::from_secs(5), || async {
        svc.state.ops.intents.all().len() == before
    })
    .await;
    assert!(withdrawn, "refused actions leave no intent behind");

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
                chrono::DateTime::parse_from_rfc3339(r.body["observed_at"].as_str()?).ok()?;
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
    let r = procured_with_min_pods(&app, "shadow-1", 3).await;
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

// ---------------------------------------------------------------------------------------
// Idempotency end to end (issue 8 item 7) and operations defects (item 8).

use std::sync::atomic::{AtomicUsize, Ordering};

use resource_plane::ports::kube::{
    Baseline, JobSpec, KubeError, KubeExecutor, ModelSpec, ObjectEvent, Observation, ResourceKind,
};
use resource_plane::ports::store::{Kv, StoreError, Txn, TxnResult};
use tokio::sync::{broadcast, Semaphore};

/// A store that answers the next `fail` transactions touching `/watch-intents/` with
/// `error`, as an etcd that refuses or loses the request would.
struct FailingTxns {
    fail: AtomicUsize,
    error: StoreError,
    /// When set, the next read of this key panics (once): a poisoned dependency.
    panic_get: std::sync::Mutex<Option<String>>,
    panicked: std::sync::atomic::AtomicBool,
}

impl FailingTxns {
    fn new(inner: Arc<dyn Store>, error: StoreError) -> Arc<Hooked<Self>> {
        let hook = Self {
            fail: AtomicUsize::new(0),
            error,
            panic_get: std::sync::Mutex::new(None),
            panicked: std::sync::atomic::AtomicBool::new(false),
        };
        Hooked::new(inner, hook)
    }
    fn fail_next(&self, n: usize) {
        self.fail.store(n, Ordering::SeqCst);
    }
    fn panic_on_get(&self, key: &str) {
        *self.panic_get.lock().unwrap_or_else(|p| p.into_inner()) = Some(key.to_owned());
    }
}

#[async_trait::async_trait]
impl Hook for FailingTxns {
    async fn get(&self, inner: &dyn Store, key: &str) -> Result<Option<Kv>, StoreError> {
        let armed = {
            let mut p = self.panic_get.lock().unwrap_or_else(|p| p.into_inner());
            if p.as_deref() == Some(key) {
                p.take()
            } else {
                None
            }
        };
        if armed.is_some() {
            self.panicked.store(true, Ordering::SeqCst);
            panic!("poisoned dependency: the store panicked reading {key}");
        }
        inner.get(key).await
    }
    async fn txn(&self, inner: &dyn Store, txn: Txn) -> Result<TxnResult, StoreError> {
        let touches_intents = txn.success.iter().any(|op| match op {
            resource_plane::ports::store::Op::Put { key, .. }
            | resource_plane::ports::store::Op::Delete { key } => key.contains("/watch-intents/"),
        });
        if touches_intents
            && self
                .fail
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            return Err(self.error.clone());
        }
        inner.txn(txn).await
    }
}

/// The simulated cluster behind a counter of create_job calls, an optional delay on
/// actions, and an optional gate that holds `observe` answers (the snapshot is taken
/// when `observe` is called, the answer is released when the test opens the gate).
struct Counting {
    sim: Arc<SimKube>,
    jobs: AtomicUsize,
    observes: AtomicUsize,
    delay: Duration,
    gate: Option<Arc<Semaphore>>,
    /// Every min-replica call: `set|read <namespace> <deployment> <hpa> [<min>]`.
    scaled: std::sync::Mutex<Vec<String>>,
}

impl Counting {
    fn new(sim: Arc<SimKube>, delay: Duration, gate: Option<Arc<Semaphore>>) -> Arc<Self> {
        Arc::new(Self {
            sim,
            jobs: AtomicUsize::new(0),
            observes: AtomicUsize::new(0),
            delay,
            gate,
            scaled: std::sync::Mutex::new(Vec::new()),
        })
    }

    fn scaled(&self) -> Vec<String> {
        self.scaled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[async_trait::async_trait]
impl KubeExecutor for Counting {
    async fn apply_deployable(&self, spec: &DeployableSpec) -> Result<Baseline, KubeError> {
        tokio::time::sleep(self.delay).await;
        self.sim.apply_deployable(spec).await
    }
    async fn restart(
        &self,
        namespace: &str,
        name: Option<&str>,
        stamp: &str,
    ) -> Result<Vec<Baseline>, KubeError> {
        tokio::time::sleep(self.delay).await;
        self.sim.restart(namespace, name, stamp).await
    }
    async fn load_model(
        &self,
        namespace: &str,
        deployable: &str,
        container: Option<&str>,
        model: &ModelSpec,
        stamp: &str,
    ) -> Result<Baseline, KubeError> {
        tokio::time::sleep(self.delay).await;
        self.sim
            .load_model(namespace, deployable, container, model, stamp)
            .await
    }
    async fn create_job(&self, spec: &JobSpec) -> Result<Baseline, KubeError> {
        tokio::time::sleep(self.delay).await;
        self.jobs.fetch_add(1, Ordering::SeqCst);
        self.sim.create_job(spec).await
    }
    async fn set_min_replicas(&self, ns: &str, t: &ScaleTarget, min: i32) -> Result<(), KubeError> {
        self.scaled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(format!("set {ns} {} {} {min}", t.deployment, t.hpa));
        self.sim.set_min_replicas(ns, t, min).await
    }
    async fn observed_min_replicas(
        &self,
        ns: &str,
        t: &ScaleTarget,
    ) -> Result<Option<i32>, KubeError> {
        self.scaled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(format!("read {ns} {} {}", t.deployment, t.hpa));
        self.sim.observed_min_replicas(ns, t).await
    }
    async fn observe(&self, baseline: &Baseline) -> Result<Observation, KubeError> {
        let snapshot = self.sim.observe(baseline).await;
        self.observes.fetch_add(1, Ordering::SeqCst);
        if let Some(gate) = &self.gate {
            if let Ok(p) = gate.acquire().await {
                p.forget();
            }
        }
        snapshot
    }
    fn subscribe(&self, kind: ResourceKind, namespace: &str) -> broadcast::Receiver<ObjectEvent> {
        self.sim.subscribe(kind, namespace)
    }
    fn name(&self) -> &'static str {
        "counting-sim"
    }
}

fn start_with(cfg: Config, store: Arc<dyn Store>, kube: Arc<dyn KubeExecutor>) -> Service {
    let cloud = Arc::new(SimCloud::new(Duration::from_millis(100)));
    Service::start_full(cfg, store, cloud, kube).unwrap_or_else(|e| panic!("{e}"))
}

fn job(name: &str, url: &str) -> Value {
    json!({"job_name": name, "container": {"image": "registry.local/x:1"}, "callback": callback(url)})
}

async fn operation_json(app: &impl TestApp, id: &str) -> Value {
    send(
        app,
        get(&format!("/api/1.0/int/operations/{id}")).to_request(),
    )
    .await
    .json
}

#[actix_web::test]
async fn etcd_down_at_submit_means_no_kubernetes_action() {
    let mut etcd = Etcd::start();
    let prefix = support::unique_prefix();
    let rx = Receiver::start(0).await;
    let kube = Arc::new(SimKube::new(Duration::from_millis(50)));
    let svc = start_with_kube(ops_config(), etcd.store(&prefix), kube.clone());
    ready(&svc).await;
    let app = test::init_service(api::app(svc.state.clone())).await;

    etcd.kill();
    let r = send(
        &app,
        post("/api/1.0/int/jobs", &job("outage", &rx.url)).to_request(),
    )
    .await;
    assert_eq!(r.status, 503, "{:?}", r.json);
    assert!(r.headers.contains_key("retry-after"));
    assert!(
        kube.job("int", "outage").is_none(),
        "the Job was created although its intent could not be stored"
    );

    etcd.restart();
    let mut id = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while id.is_empty() && Instant::now() < deadline {
        let r = send(
            &app,
            post("/api/1.0/int/jobs", &job("outage", &rx.url)).to_request(),
        )
        .await;
        if r.status == 202 {
            id = r.json["request_id"].as_str().unwrap_or_default().to_owned();
        } else {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let stored = !id.is_empty();
    assert!(stored, "never accepted after etcd came back");
    let cb = delivered(&rx, &id).await;
    assert_eq!(cb.body["status"], "SUCCEEDED");
}

#[actix_web::test]
async fn one_request_on_two_replicas_runs_one_action_and_one_callback() {
    let etcd = Etcd::start();
    let prefix = support::unique_prefix();
    let rx = Receiver::start(0).await;
    let sim = Arc::new(SimKube::new(Duration::from_millis(100)));
    let kube = Counting::new(sim.clone(), Duration::from_millis(300), None);
    let mut cfg = ops_config();
    cfg.controller.instance_id = "a".into();
    let a = start_with(cfg.clone(), etcd.store(&prefix), kube.clone());
    cfg.controller.instance_id = "b".into();
    let b = start_with(cfg, etcd.store(&prefix), kube.clone());
    assert!(a.wait_hydrated(Duration::from_secs(15)).await);
    assert!(b.wait_hydrated(Duration::from_secs(15)).await);
    let app_a = test::init_service(api::app(a.state.clone())).await;
    let app_b = test::init_service(api::app(b.state.clone())).await;
    let body = job("twice", &rx.url);
    let req = || {
        post("/api/1.0/int/jobs", &body)
            .insert_header(("X-Idempotency-Key", "job-twice-1"))
            .to_request()
    };
    let (ra, rb) = futures::join!(send(&app_a, req()), send(&app_b, req()));
    assert_eq!((ra.status, rb.status), (202, 202), "{ra:?} {rb:?}");
    assert_eq!(ra.json["request_id"], rb.json["request_id"]);
    let id = ra.json["request_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    // a plain retry on either replica replays too
    let rc = send(&app_b, req()).await;
    assert_eq!(
        (rc.status, &rc.json["request_id"]),
        (202, &ra.json["request_id"])
    );
    let cb = delivered(&rx, &id).await;
    assert_eq!(cb.body["status"], "SUCCEEDED");
    let done = support::eventually(Duration::from_secs(10), || async {
        operation_json(&app_a, &id).await["delivery"]["delivered"] == true
    })
    .await;
    assert!(done);
    assert_eq!(kube.jobs.load(Ordering::SeqCst), 1, "one Kubernetes action");
    assert_eq!(rx.for_request(&id).len(), 1, "one callback");
}

#[actix_web::test]
async fn a_job_retried_after_a_failed_store_write_gets_its_callback_not_409() {
    let rx = Receiver::start(0).await;
    let sim = Arc::new(SimKube::new(Duration::from_millis(50)));
    let kube = Counting::new(sim.clone(), Duration::ZERO, None);
    let store = FailingTxns::new(
        Arc::new(MemoryStore::new()),
        StoreError::Unavailable("injected".into()),
    );
    let svc = start_with(ops_config(), store.clone(), kube.clone());
    ready(&svc).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    let body = job("retried", &rx.url);
    store.hook.fail_next(1);
    let r = send(
        &app,
        post("/api/1.0/int/jobs", &body)
            .insert_header(("X-Idempotency-Key", "retried-1"))
            .to_request(),
    )
    .await;
    assert_eq!(r.status, 503, "{:?}", r.json);
    let r = send(
        &app,
        post("/api/1.0/int/jobs", &body)
            .insert_header(("X-Idempotency-Key", "retried-1"))
            .to_request(),
    )
    .await;
    assert_eq!(r.status, 202, "the retry must be accepted: {:?}", r.json);
    let id = r.json["request_id"].as_str().unwrap_or_default().to_owned();
    let cb = delivered(&rx, &id).await;
    assert_eq!(cb.body["status"], "SUCCEEDED");
    assert_eq!(kube.jobs.load(Ordering::SeqCst), 1);
}

/// A stored intent as a replica that crashed between storing and acting left it, in
/// the camelCase keys of records stored by earlier releases (they must still decode).
fn submitting_intent(id: &str, job_name: &str, url: &str) -> Value {
    let now = chrono::Utc::now();
    json!({
        "schemaVersion": "v1", "requestId": id, "env": "int", "operation": "TRIGGER_JOB",
        "resource": {"kind": "Job", "namespace": "int", "labelSelector": format!("name={job_name}"), "name": job_name},
        "desiredCondition": "JobComplete", "baselines": [],
        "callback": {"url": url, "method": "POST", "headers": {}},
        "workflow": {"runId": null, "plan": null, "taskId": null},
        "createdAt": (now - chrono::Duration::seconds(60)).to_rfc3339(),
        "deadline": (now + chrono::Duration::seconds(600)).to_rfc3339(),
        "status": "SUBMITTING", "observedAt": null, "detail": null,
        "delivery": {"webhookId": format!("msg_{id}"), "attempts": [], "delivered": false, "gaveUp": false, "nextAttemptAt": null},
        "submission": {"type": "CREATE_JOB", "spec": {"job_name": job_name, "namespace": "int", "image": "x", "payload": {}, "request_id": id}}
    })
}

async fn put_raw(store: &dyn Store, key: &str, value: &Value) {
    let r = store
        .txn(Txn {
            compares: vec![],
            success: vec![resource_plane::ports::store::Op::Put {
                key: key.to_owned(),
                value: serde_json::to_vec(value).unwrap_or_default(),
                lease: None,
            }],
            failure_gets: vec![],
        })
        .await;
    assert!(r.is_ok_and(|r| r.succeeded));
}

#[actix_web::test]
async fn a_submitting_intent_found_at_start_is_finished() {
    let rx = Receiver::start(0).await;
    let sim = Arc::new(SimKube::new(Duration::from_millis(50)));
    let kube = Counting::new(sim.clone(), Duration::ZERO, None);
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    // crashed before acting
    put_raw(
        store.as_ref(),
        "/watch-intents/op-crashed1",
        &submitting_intent("op-crashed1", "crashed-before", &rx.url),
    )
    .await;
    // crashed after acting, before marking it pending: the Job exists, labelled with
    // the request id
    sim.create_job(&JobSpec {
        job_name: "crashed-after".into(),
        namespace: "int".into(),
        image: "x".into(),
        payload: json!({}),
        request_id: "op-crashed2".into(),
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    put_raw(
        store.as_ref(),
        "/watch-intents/op-crashed2",
        &submitting_intent("op-crashed2", "crashed-after", &rx.url),
    )
    .await;
    let svc = start_with(ops_config(), store, kube.clone());
    ready(&svc).await;
    for id in ["op-crashed1", "op-crashed2"] {
        let cb = delivered(&rx, id).await;
        assert_eq!(cb.body["status"], "SUCCEEDED", "{id}: {:?}", cb.body);
    }
    assert!(sim.job("int", "crashed-before").is_some());
    assert_eq!(
        kube.jobs.load(Ordering::SeqCst),
        2,
        "one create per intent (the second answered AlreadyExists with our id)"
    );
}

#[actix_web::test]
async fn operation_reads_redact_the_callback_query_and_header_values() {
    let rx = Receiver::start(0).await;
    let kube = Arc::new(SimKube::new(Duration::from_millis(50)));
    let svc = start_with_kube(ops_config(), Arc::new(MemoryStore::new()), kube);
    ready(&svc).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    let url = format!("{}?token=s3cr3t-query&x=1", rx.url);
    let body = json!({"job_name": "redact", "container": {"image": "x"},
        "callback": {"url": url, "headers": {"authorization": "Bearer s3cr3t-header"}}});
    let id = accepted(&app, "/api/1.0/int/jobs", body).await;
    let cb = delivered(&rx, &id).await;
    assert_eq!(cb.body["status"], "SUCCEEDED", "the real URL is still used");
    let op = operation_json(&app, &id).await;
    let text = op.to_string();
    assert!(!text.contains("s3cr3t"), "{text}");
    assert_eq!(op["callback"]["headers"]["authorization"], "<redacted>");
    let shown = op["callback"]["url"].as_str().unwrap_or_default();
    assert!(
        shown.ends_with("/callbacks?<redacted>"),
        "query shown as <redacted>: {shown}"
    );
}

#[actix_web::test]
async fn a_store_that_refuses_the_request_as_invalid_answers_500_not_503() {
    let rx = Receiver::start(0).await;
    let kube = Arc::new(SimKube::new(Duration::from_millis(50)));
    let store = FailingTxns::new(
        Arc::new(MemoryStore::new()),
        StoreError::Other("etcdserver: request is too large".into()),
    );
    let svc = start_with_kube(ops_config(), store.clone(), kube.clone());
    ready(&svc).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    store.hook.fail_next(1);
    let r = send(
        &app,
        post("/api/1.0/int/jobs", &job("refused", &rx.url)).to_request(),
    )
    .await;
    assert_eq!(r.status, 500, "{:?}", r.json);
    assert!(!r.headers.contains_key("retry-after"));
    assert!(
        r.error().contains("refused") && r.error().contains("too large"),
        "clear message: {}",
        r.error()
    );
    assert!(kube.job("int", "refused").is_none());
}

#[actix_web::test]
async fn a_reread_that_returns_late_does_not_undo_events_that_arrived_meanwhile() {
    let rx = Receiver::start(0).await;
    let sim = Arc::new(SimKube::new(Duration::from_millis(300)));
    for name in ["alpha", "beta"] {
        sim.seed_deployable(&DeployableSpec {
            name: name.into(),
            namespace: "int".into(),
            image: "x".into(),
            node_selector: Default::default(),
            min_pod_count: 1,
            max_pod_count: 20,
            resources: ResourceSpec::default(),
            models_to_load: Vec::new(),
        })
        .unwrap_or_else(|e| panic!("{e}"));
    }
    let gate = Arc::new(Semaphore::new(0));
    let kube = Counting::new(sim.clone(), Duration::ZERO, Some(gate.clone()));
    let svc = start_with(ops_config(), Arc::new(MemoryStore::new()), kube.clone());
    ready(&svc).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    let id = accepted(
        &app,
        "/api/1.0/int/deployables/restart",
        json!({"namespace": "int", "callback": callback(&rx.url)}),
    )
    .await;
    // the watcher's first read took its snapshot (both rollouts in progress) and is held
    assert!(
        support::eventually(Duration::from_secs(10), || async {
            kube.observes.load(Ordering::SeqCst) >= 1
        })
        .await
    );
    // beta changes again, so its rollout ends later than alpha's
    sim.set_min_replicas("int", &ScaleTarget::same("beta"), 2)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let alpha_done = support::eventually(Duration::from_secs(10), || async {
        sim.pods("int")
            .iter()
            .filter(|p| p.labels.get("name").map(String::as_str) == Some("alpha"))
            .any(|p| {
                p.annotations
                    .contains_key("kubectl.kubernetes.io/restartedAt")
            })
    })
    .await;
    assert!(alpha_done);
    sim.set_min_replicas("int", &ScaleTarget::same("beta"), 3)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // now the stale snapshot comes back, after alpha's completion event was applied
    gate.add_permits(1000);
    let cb = delivered(&rx, &id).await;
    assert_eq!(cb.body["status"], "SUCCEEDED", "{:?}", cb.body);
}

#[actix_web::test]
async fn a_failed_reread_is_retried() {
    let rx = Receiver::start(0).await;
    let kube = Arc::new(SimKube::new(Duration::from_millis(50)));
    let base = kube
        .seed_deployable(&DeployableSpec {
            name: "steady".into(),
            namespace: "int".into(),
            image: "x".into(),
            node_selector: Default::default(),
            min_pod_count: 1,
            max_pod_count: 20,
            resources: ResourceSpec::default(),
            models_to_load: Vec::new(),
        })
        .unwrap_or_else(|e| panic!("{e}"));
    // an intent whose condition already holds (its change rolled out while no leader
    // watched); only a read can tell, and the first read fails
    let now = chrono::Utc::now();
    let intent = json!({
        "schemaVersion": "v1", "requestId": "op-steady", "env": "int", "operation": "CREATE_DEPLOYABLE",
        "resource": {"kind": "Deployment", "namespace": "int", "labelSelector": "name=steady", "name": "steady"},
        "desiredCondition": "Available", "baselines": [serde_json::to_value(&base).unwrap_or_default()],
        "callback": {"url": rx.url, "method": "POST", "headers": {}},
        "workflow": {"runId": null, "plan": null, "taskId": null},
        "createdAt": now.to_rfc3339(), "deadline": (now + chrono::Duration::seconds(600)).to_rfc3339(),
        "status": "PENDING", "observedAt": null, "detail": null,
        "delivery": {"webhookId": "msg_steady", "attempts": [], "delivered": false, "gaveUp": false, "nextAttemptAt": null}
    });
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    put_raw(store.as_ref(), "/watch-intents/op-steady", &intent).await;
    kube.fail_next("observe", KubeError::Unavailable("injected".into()));
    let svc = start_with_kube(ops_config(), store, kube);
    ready(&svc).await;
    let cb = delivered(&rx, "op-steady").await;
    assert_eq!(cb.body["status"], "SUCCEEDED");
}

fn shadow_spec(name: &str) -> DeployableSpec {
    DeployableSpec {
        name: name.into(),
        namespace: "int".into(),
        image: "x".into(),
        node_selector: Default::default(),
        min_pod_count: 0,
        max_pod_count: 20,
        resources: ResourceSpec::default(),
        models_to_load: Vec::new(),
    }
}

#[actix_web::test]
async fn min_replica_drift_in_the_cluster_is_corrected_and_reported() {
    let kube = Arc::new(SimKube::new(Duration::from_millis(50)));
    kube.seed_deployable(&shadow_spec("drifty"))
        .unwrap_or_else(|e| panic!("{e}"));
    let svc = start_with_kube(ops_config(), Arc::new(MemoryStore::new()), kube.clone());
    ready(&svc).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    for name in ["drifty", "late"] {
        let r = procured_with_min_pods(&app, name, 3).await;
        assert_eq!(r.json["min_pod_count"], 3, "{:?}", r.json);
    }
    let corrected = drift_corrected(&kube, "drifty", 3, Duration::from_secs(10)).await;
    assert!(corrected, "drift never corrected");
    let status = send(&app, get("/api/1.0/controller").to_request()).await;
    let conv = &status.json["min_replicas"];
    assert!(
        conv["drift_corrected_total"].as_u64().unwrap_or(0) >= 1,
        "{status:?}"
    );
    // "late" is not in the cluster: reported missing, and converged once it appears
    let missing = support::eventually(Duration::from_secs(10), || async {
        let s = send(&app, get("/api/1.0/controller").to_request()).await;
        s.json["min_replicas"]["missing"]
            .as_array()
            .is_some_and(|m| m.iter().any(|e| e["name"] == "late"))
    })
    .await;
    assert!(missing, "a deployable missing from the cluster is reported");
    kube.seed_deployable(&shadow_spec("late"))
        .unwrap_or_else(|e| panic!("{e}"));
    let converged = support::eventually(Duration::from_secs(10), || async {
        kube.min_replicas("int", "late") == Some(3)
    })
    .await;
    assert!(converged, "NotFound was taken as done");
    let metrics = svc.state.metrics.render();
    assert!(
        metrics.contains("controller_decisions_total{action=\"min_replicas_drift\"}"),
        "{metrics}"
    );
}

#[actix_web::test]
async fn a_drift_check_over_more_than_one_page_reads_every_deployable() {
    // The check walks the view in pieces (yielding between them): the one that drifted
    // sorts last, past the first pieces, and every deployable is counted once.
    let kube = Arc::new(SimKube::new(Duration::from_millis(50)));
    kube.seed_deployable(&shadow_spec("zz-drifty"))
        .unwrap_or_else(|e| panic!("{e}"));
    let svc = start_with_kube(ops_config(), Arc::new(MemoryStore::new()), kube.clone());
    ready(&svc).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    const FLEET: usize = 1_300;
    for i in 0..FLEET - 1 {
        support::register_shadow(&app, "int", &format!("d-{i:05}")).await;
    }
    let r = procured_with_min_pods(&app, "zz-drifty", 4).await;
    assert_eq!(r.json["min_pod_count"], 4, "{:?}", r.json);
    let corrected = drift_corrected(&kube, "zz-drifty", 4, Duration::from_secs(15)).await;
    assert!(corrected, "drift past the first page never corrected");
    let counted = support::eventually(Duration::from_secs(15), || async {
        let s = send(&app, get("/api/1.0/controller").to_request()).await;
        let m = &s.json["min_replicas"];
        m["checked"].as_u64() == Some(FLEET as u64)
            && m["missing_count"].as_u64() == Some(FLEET as u64 - 1)
    })
    .await;
    let status = send(&app, get("/api/1.0/controller").to_request()).await;
    assert!(counted, "{:?}", status.json["min_replicas"]);
}

#[actix_web::test]
async fn callback_deliveries_run_with_bounded_concurrency() {
    // a receiver that holds every request a while and records the peak in flight
    let inflight = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(AtomicUsize::new(0));
    let (i, p, s) = (inflight.clone(), peak.clone(), seen.clone());
    let server = HttpServer::new(move || {
        let (i, p, s) = (i.clone(), p.clone(), s.clone());
        App::new().default_service(web::to(move || {
            let (i, p, s) = (i.clone(), p.clone(), s.clone());
            async move {
                let now = i.fetch_add(1, Ordering::SeqCst) + 1;
                p.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(200)).await;
                i.fetch_sub(1, Ordering::SeqCst);
                s.fetch_add(1, Ordering::SeqCst);
                HttpResponse::NoContent().finish()
            }
        }))
    })
    .workers(2)
    .bind(("127.0.0.1", 0))
    .unwrap_or_else(|e| panic!("bind: {e}"));
    let port = server.addrs()[0].port();
    let server = server.run();
    let _handle = server.handle();
    actix_rt::spawn(server);
    let url = format!("http://127.0.0.1:{port}/cb");

    let kube = Arc::new(SimKube::new(Duration::from_millis(20)));
    let mut cfg = ops_config();
    cfg.operations.callback_concurrency = 4;
    let svc = start_with_kube(cfg, Arc::new(MemoryStore::new()), kube);
    ready(&svc).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    for n in 0..24 {
        accepted(&app, "/api/1.0/int/jobs", job(&format!("burst-{n}"), &url)).await;
    }
    let all = support::eventually(Duration::from_secs(60), || async {
        seen.load(Ordering::SeqCst) >= 24
    })
    .await;
    assert!(all, "only {} callbacks", seen.load(Ordering::SeqCst));
    let peak = peak.load(Ordering::SeqCst);
    println!("peak concurrent callback deliveries: {peak}");
    assert!(
        peak <= 4,
        "at most CALLBACK_CONCURRENCY at once, saw {peak}"
    );
}

#[actix_web::test]
async fn concurrent_lease_requests_share_one_grant() {
    struct SlowGrants {
        grants: AtomicUsize,
    }
    #[async_trait::async_trait]
    impl Hook for SlowGrants {
        async fn grant_lease(&self, inner: &dyn Store, ttl: i64) -> Result<i64, StoreError> {
            self.grants.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(100)).await;
            inner.grant_lease(ttl).await
        }
        fn name(&self, _inner: &dyn Store) -> &'static str {
            "slow-grants"
        }
    }
    let store = Hooked::new(
        Arc::new(MemoryStore::new()),
        SlowGrants {
            grants: AtomicUsize::new(0),
        },
    );
    let pool = resource_plane::idempotency::LeasePool::new(Duration::from_secs(600));
    let got = futures::future::join_all((0..16).map(|_| pool.lease(store.as_ref()))).await;
    let ids: std::collections::HashSet<i64> = got
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("{e}")))
        .collect();
    assert_eq!(ids.len(), 1, "every caller got the same lease");
    assert_eq!(store.hook.grants.load(Ordering::SeqCst), 1, "one grant RPC");
}

#[actix_web::test]
async fn kubernetes_unavailable_at_submit_is_finished_by_the_leader_and_refusals_replay() {
    let rx = Receiver::start(0).await;
    let sim = Arc::new(SimKube::new(Duration::from_millis(50)));
    let kube = Counting::new(sim.clone(), Duration::ZERO, None);
    let svc = start_with(ops_config(), Arc::new(MemoryStore::new()), kube.clone());
    ready(&svc).await;
    let app = test::init_service(api::app(svc.state.clone())).await;

    // unavailable: accepted all the same, and the leader runs the action again later
    sim.fail_next(
        "create_job",
        KubeError::Unavailable("apiserver down".into()),
    );
    let id = accepted(&app, "/api/1.0/int/jobs", job("flaky-api", &rx.url)).await;
    assert!(sim.job("int", "flaky-api").is_none());
    let cb = delivered(&rx, &id).await;
    assert_eq!(cb.body["status"], "SUCCEEDED", "{:?}", cb.body);
    assert_eq!(
        kube.jobs.load(Ordering::SeqCst),
        2,
        "first try failed, leader retried"
    );

    // refused: the refusal is the stored answer of the key, and nothing is left behind
    let taken = |key: &'static str| {
        post("/api/1.0/int/jobs", &job("flaky-api", &rx.url))
            .insert_header(("X-Idempotency-Key", key))
            .to_request()
    };
    let first = send(&app, taken("taken-1")).await;
    assert_eq!(first.status, 409, "{:?}", first.json);
    let again = send(&app, taken("taken-1")).await;
    assert_eq!(
        (again.status, again.json.clone()),
        (409, first.json.clone())
    );
    assert_eq!(
        again
            .headers
            .get("idempotent-replayed")
            .and_then(|v| v.to_str().ok()),
        Some("true")
    );
    assert_eq!(
        kube.jobs.load(Ordering::SeqCst),
        3,
        "the replay sent nothing"
    );
}

/// A real panic inside the intent manager (its callback delivery reads the intent from a
/// store that panics once) does not stop callbacks: the manager is restarted from the
/// store and the callback arrives.
#[actix_web::test]
async fn a_panic_in_the_intent_manager_does_not_stop_callbacks() {
    let rx = Receiver::start(0).await;
    let kube = Arc::new(SimKube::new(Duration::from_millis(300)));
    let store = FailingTxns::new(
        Arc::new(MemoryStore::new()),
        StoreError::Unavailable("unused".into()),
    );
    let svc = start_with_kube(ops_config(), store.clone(), kube);
    ready(&svc).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    let id = accepted(
        &app,
        "/api/1.0/int/deployables",
        deployable("predator", &rx.url),
    )
    .await;
    store
        .hook
        .panic_on_get(&resource_plane::keys::watch_intent(&id));
    let r = delivered(&rx, &id).await;
    assert_eq!(r.body["status"], "SUCCEEDED");
    assert!(
        store.hook.panicked.load(Ordering::SeqCst),
        "the poisoned read never happened, so nothing was tested"
    );
}

#[actix_web::test]
async fn min_pod_counts_scale_the_mapped_deployment_and_nothing_unregistered() {
    let sim = Arc::new(SimKube::new(Duration::from_millis(50)));
    for name in ["predator-v2", "predator-autoscaler"] {
        sim.seed_deployable(&DeployableSpec {
            name: name.into(),
            namespace: "int".into(),
            image: "x".into(),
            node_selector: Default::default(),
            min_pod_count: 1,
            max_pod_count: 20,
            resources: ResourceSpec::default(),
            models_to_load: Vec::new(),
        })
        .unwrap_or_else(|e| panic!("{e}"));
    }
    let kube = Counting::new(sim.clone(), Duration::ZERO, None);
    let svc = start_with(ops_config(), Arc::new(MemoryStore::new()), kube.clone());
    ready(&svc).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    let base = "/api/1.0/int/shadow-deployables";
    let bad = json!({"node_pool": "p", "dns": "x", "deployment": "Predator_V2"});
    let r = send(&app, put(&format!("{base}/mapped"), &bad).to_request()).await;
    assert_eq!(r.status, 400, "{}", r.json);
    let mapping = json!({"node_pool": "p", "dns": "x", "deployment": "predator-v2", "hpa": "predator-autoscaler"});
    let r = send(&app, put(&format!("{base}/mapped"), &mapping).to_request()).await;
    assert_eq!(r.status, 201, "{}", r.json);
    let r = send(&app, get(base).to_request()).await;
    assert_eq!(
        (&r.json["data"][0]["deployment"], &r.json["data"][0]["hpa"]),
        (&json!("predator-v2"), &json!("predator-autoscaler"))
    );
    // the leader zeroes every FREE deployable, on the objects its record maps
    let zeroed = support::eventually(Duration::from_secs(10), || async {
        kube.scaled()
            .contains(&"set int predator-v2 predator-autoscaler 0".to_owned())
    })
    .await;
    assert!(zeroed, "{:?}", kube.scaled());
    let procure = json!({"action": "PROCURE", "name": "mapped", "workflow_run_id": "r1"});
    assert_eq!(
        send(&app, post(base, &procure).to_request()).await.status,
        200
    );
    let pods = |name: &str| json!({"action": "INCREASE", "count": 3, "name": name, "workflow_run_id": "r1"});
    let r = send(
        &app,
        post(&format!("{base}/min-pod-count"), &pods("mapped")).to_request(),
    )
    .await;
    assert_eq!(r.json, json!({"status": "UPDATED", "min_pod_count": 3}));
    let scaled = support::eventually(Duration::from_secs(10), || async {
        kube.scaled()
            .contains(&"set int predator-v2 predator-autoscaler 3".to_owned())
    })
    .await;
    assert!(scaled, "{:?}", kube.scaled());
    // a name the registry does not know is refused and never reaches the cluster
    let r = send(
        &app,
        post(&format!("{base}/min-pod-count"), &pods("ghost")).to_request(),
    )
    .await;
    assert_eq!(r.status, 404);
    let r = send(
        &app,
        post(&format!("{base}/min-pod-count"), &pods("predator-v2")).to_request(),
    )
    .await;
    assert_eq!(
        r.status, 404,
        "a Deployment name is not a registered deployable"
    );
    let calls = kube.scaled();
    assert!(
        calls.iter().all(
            |c| c.starts_with("set int predator-v2 predator-autoscaler ")
                || c == "read int predator-v2 predator-autoscaler"
        ),
        "only the mapped objects are touched: {calls:?}"
    );
}

/// A store whose shadow-deployable listing answers late (a large fleet hydrating), and
/// which counts the fenced min-replica effects written.
struct SlowShadowList {
    delay: Duration,
    kube_effects: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl Hook for SlowShadowList {
    async fn list(&self, inner: &dyn Store, prefix: &str) -> Result<(Vec<Kv>, i64), StoreError> {
        if prefix.starts_with(resource_plane::keys::SHADOW_PREFIX) {
            tokio::time::sleep(self.delay).await;
        }
        inner.list(prefix).await
    }
    async fn txn(&self, inner: &dyn Store, txn: Txn) -> Result<TxnResult, StoreError> {
        let effect = txn.success.iter().any(|op| match op {
            resource_plane::ports::store::Op::Put { key, .. } => key.contains("kube_min_replicas"),
            _ => false,
        });
        let r = inner.txn(txn).await;
        if effect && r.as_ref().is_ok_and(|r| r.succeeded) {
            self.kube_effects
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        r
    }
    fn name(&self, _inner: &dyn Store) -> &'static str {
        "slow-shadow-list"
    }
}

/// A new leader compares the cluster with every record before it patches anything: a
/// sweep that ran before the records were loaded would find none in sync and patch (and
/// fence) each one again. None of these is in the cluster, so nothing is patched.
#[actix_web::test]
async fn a_new_leader_checks_the_whole_fleet_before_patching() {
    let inner: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let seed: resource_plane::app::Seed = [(
        "int".to_owned(),
        (0..20)
            .map(|i| resource_plane::app::SeedEntry {
                name: format!("d-{i}"),
                node_pool: "p".into(),
                dns: format!("d-{i}.example"),
                deployment: None,
                hpa: None,
            })
            .collect(),
    )]
    .into_iter()
    .collect();
    let created = resource_plane::app::apply_seed(inner.as_ref(), &seed)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(created, 20);
    let store = Hooked::new(
        inner,
        SlowShadowList {
            delay: Duration::from_millis(800),
            kube_effects: std::sync::atomic::AtomicUsize::new(0),
        },
    );
    let kube = Arc::new(SimKube::new(Duration::from_millis(50)));
    let svc = start_with_kube(ops_config(), store.clone(), kube);
    ready(&svc).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    let checked_all = support::eventually(Duration::from_secs(10), || async {
        let s = send(&app, get("/api/1.0/controller").to_request()).await;
        s.json["min_replicas"]["checked"] == 20 && s.json["min_replicas"]["missing_count"] == 20
    })
    .await;
    assert!(checked_all, "a check of all 20, each reported missing");
    // a few more sweeps (50 ms apart) that must leave the missing ones alone
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        store
            .hook
            .kube_effects
            .load(std::sync::atomic::Ordering::SeqCst),
        0,
        "min replicas patched (and fenced) before the cluster was compared"
    );
    svc.shutdown().await;
}

/// A store that counts the fenced min-replica effects written, and holds the first one
/// for `hold` (a slow etcd): the changes made meanwhile pile up behind it.
struct SlowFirstEffect {
    hold: Duration,
    effects: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl Hook for SlowFirstEffect {
    async fn txn(&self, inner: &dyn Store, txn: Txn) -> Result<TxnResult, StoreError> {
        let effect = txn.success.iter().any(|op| match op {
            resource_plane::ports::store::Op::Put { key, .. } => key.contains("kube_min_replicas"),
            _ => false,
        });
        if effect
            && self
                .effects
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                == 0
        {
            tokio::time::sleep(self.hold).await;
        }
        inner.txn(txn).await
    }
}

/// Min-pod changes that arrive while the converger is busy are converged together: one
/// fenced effect write covers a batch of them (not one write per deployable), and every
/// one of them reaches the cluster.
#[actix_web::test]
async fn min_pod_changes_that_pile_up_are_converged_under_one_fenced_write_per_batch() {
    const N: usize = 40;
    let kube = Arc::new(SimKube::new(Duration::from_millis(50)));
    for i in 0..N {
        kube.seed_deployable(&shadow_spec(&format!("b-{i:02}")))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let store = Hooked::new(
        Arc::new(MemoryStore::new()),
        SlowFirstEffect {
            hold: Duration::from_millis(1500),
            effects: std::sync::atomic::AtomicUsize::new(0),
        },
    );
    let svc = start_with_kube(ops_config(), store.clone(), kube.clone());
    ready(&svc).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    for i in 0..N {
        let r = procured_with_min_pods(&app, &format!("b-{i:02}"), 3).await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    let all = support::eventually(Duration::from_secs(20), || async {
        (0..N).all(|i| kube.min_replicas("int", &format!("b-{i:02}")) == Some(3))
    })
    .await;
    assert!(all, "not every deployable reached min replicas 3");
    let effects = store.hook.effects.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        effects <= 6,
        "{effects} fenced effect writes for {N} deployables changed while the first waited"
    );
    svc.shutdown().await;
}
