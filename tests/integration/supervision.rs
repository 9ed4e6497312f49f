//! Supervision and the lifetime of entity actors: a real panic in an actor's handler
//! (outside the domain's `decide`) does not leave a dead mailbox behind, a stuck actor
//! answers 503 within the send deadline instead of hanging the request, unknown ids
//! create nothing, actors of deleted records go away, and introspection pages through
//! the live actors.
//!
//! The faults are real: a store wrapper (a poisoned dependency of the actor) panics in
//! the middle of the actor's transaction, or never answers until released.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::test;
use async_trait::async_trait;
use chrono::Utc;
use resource_plane::adapters::memory::MemoryStore;
use resource_plane::api;
use resource_plane::config::Config;
use resource_plane::domain::worker::{Resources, Worker, WorkerState, WorkerTemplate};
use resource_plane::keys;
use resource_plane::ports::store::{Compare, Op, Store, StoreError, Txn, TxnResult};
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::support::{self, get, post, put, send, Etcd, Hook, Hooked, Resp, TestApp};

const BASE: &str = "/api/1.0/int/shadow-deployables";

/// A store that behaves like `inner`, except that when armed for a key the next
/// transaction comparing that key panics (once), or waits until released.
struct Hostile {
    panic_on: Mutex<Option<String>>,
    hang_on: Mutex<Option<String>>,
    fail_on: Mutex<Option<String>>,
    released: watch::Sender<bool>,
}

impl Hostile {
    fn new(inner: Arc<dyn Store>) -> Arc<Hooked<Self>> {
        let hook = Self {
            panic_on: Mutex::new(None),
            hang_on: Mutex::new(None),
            fail_on: Mutex::new(None),
            released: watch::channel(false).0,
        };
        Hooked::new(inner, hook)
    }

    fn panic_next(&self, key: &str) {
        *self.panic_on.lock().unwrap_or_else(|p| p.into_inner()) = Some(key.to_owned());
    }

    fn fail(&self, key: Option<&str>) {
        *self.fail_on.lock().unwrap_or_else(|p| p.into_inner()) = key.map(str::to_owned);
    }

    fn hang(&self, key: &str) {
        *self.hang_on.lock().unwrap_or_else(|p| p.into_inner()) = Some(key.to_owned());
    }

    fn release(&self) {
        *self.hang_on.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.released.send_replace(true);
    }
}

fn touches(txn: &Txn, key: &str) -> bool {
    txn.compares.iter().any(|c| match c {
        Compare::ModRevision(k, _) | Compare::CreateRevision(k, _) => k == key,
    })
}

#[async_trait]
impl Hook for Hostile {
    async fn txn(&self, inner: &dyn Store, txn: Txn) -> Result<TxnResult, StoreError> {
        let poisoned = {
            let mut p = self.panic_on.lock().unwrap_or_else(|p| p.into_inner());
            match p.as_deref() {
                Some(k) if touches(&txn, k) => p.take(),
                _ => None,
            }
        };
        if let Some(k) = poisoned {
            panic!("poisoned dependency: the store panicked in a transaction on {k}");
        }
        let failing = self
            .fail_on
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_deref()
            .is_some_and(|k| touches(&txn, k));
        if failing {
            return Err(StoreError::Unavailable("injected outage".into()));
        }
        let stuck = self
            .hang_on
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_deref()
            .is_some_and(|k| touches(&txn, k));
        if stuck {
            let mut rx = self.released.subscribe();
            // bounded: the test releases it long before
            let _ = tokio::time::timeout(Duration::from_secs(60), rx.wait_for(|r| *r)).await;
        }
        inner.txn(txn).await
    }
    fn name(&self, _inner: &dyn Store) -> &'static str {
        "hostile"
    }
}

/// Test configuration from variables (no seed file, no worker templates).
fn config(extra: &[(&str, &str)]) -> Config {
    let mut env: HashMap<String, String> = HashMap::new();
    env.insert("SHADOW_SEED_FILE".into(), String::new());
    env.insert("ACTOR_THREADS".into(), "2".into());
    env.insert(
        "WORKER_TEMPLATES_FILE".into(),
        "/nonexistent/templates.yaml".into(),
    );
    env.insert("RECONCILE_INTERVAL".into(), "3600".into());
    for (k, v) in extra {
        env.insert((*k).to_owned(), (*v).to_owned());
    }
    let mut cfg = Config::from_map(&env).unwrap_or_else(|e| panic!("config: {e}"));
    cfg.controller.templates_file_explicit = false;
    cfg
}

fn procure(name: &str, run: &str) -> Value {
    json!({"action": "PROCURE", "name": name, "workflow_run_id": run})
}

fn release(name: &str, run: &str) -> Value {
    json!({"action": "RELEASE", "name": name, "workflow_run_id": run})
}

async fn register<S: TestApp>(app: &S, env: &str, name: &str) {
    let r = send(
        app,
        put(
            &format!("/api/1.0/{env}/shadow-deployables/{name}"),
            &json!({"node_pool": "p", "dns": format!("{name}.example")}),
        )
        .to_request(),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.error());
}

/// A RUNNING worker record, written straight to the store (as another replica would).
async fn put_worker(store: &dyn Store, id: &str) {
    let template = WorkerTemplate {
        name: "t".into(),
        instance_type: Some("m5.large".into()),
        image_id: Some("ami-1".into()),
        capacity: Resources {
            cpu: 4.0,
            memory_gb: 16.0,
        },
        min_workers: 0,
        max_workers: 1,
        hourly_cost: 1.0,
        ..WorkerTemplate::default()
    };
    let mut w = Worker::new(id, &template, Utc::now());
    w.state = WorkerState::Running;
    let key = keys::worker(id);
    let r = store
        .txn(Txn {
            compares: vec![Compare::ModRevision(key.clone(), 0)],
            success: vec![Op::Put {
                key,
                value: serde_json::to_vec(&w).unwrap_or_else(|e| panic!("{e}")),
                lease: None,
            }],
            failure_gets: Vec::new(),
        })
        .await
        .unwrap_or_else(|e| panic!("put worker: {e}"));
    assert!(r.succeeded);
}

async fn delete_keys(store: &dyn Store, keys: &[String]) {
    let r = store
        .txn(Txn {
            compares: Vec::new(),
            success: keys.iter().map(|k| Op::Delete { key: k.clone() }).collect(),
            failure_gets: Vec::new(),
        })
        .await
        .unwrap_or_else(|e| panic!("delete: {e}"));
    assert!(r.succeeded);
}

/// `(kind, id)` of every actor `GET /api/1.0/actors` lists (first page).
async fn listed<S: TestApp>(app: &S) -> BTreeSet<(String, String)> {
    let r = send(app, get("/api/1.0/actors").to_request()).await;
    assert_eq!(r.status, 200, "{}", r.error());
    ids(&r)
}

fn ids(r: &Resp) -> BTreeSet<(String, String)> {
    r.json["data"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|a| {
            (
                a["kind"].as_str().unwrap_or_default().to_owned(),
                a["id"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn retry_after(r: &Resp) -> Option<String> {
    r.headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Records the thread each transaction comparing `key` ran on.
struct Threads {
    key: String,
    seen: Mutex<Vec<std::thread::ThreadId>>,
}

#[async_trait]
impl Hook for Threads {
    async fn txn(&self, inner: &dyn Store, txn: Txn) -> Result<TxnResult, StoreError> {
        if touches(&txn, &self.key) {
            self.seen
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(std::thread::current().id());
        }
        inner.txn(txn).await
    }
}

#[actix_web::test]
async fn a_shadow_actor_started_by_a_request_runs_on_the_thread_that_took_it() {
    // An actor on another thread costs every command two thread hops (there and back).
    let key = keys::shadow("int", "d1");
    let store = Hooked::new(
        Arc::new(MemoryStore::new()),
        Threads {
            key: key.clone(),
            seen: Mutex::new(Vec::new()),
        },
    );
    let svc = support::service(config(&[]), store.clone()).await;
    // This thread builds the app, so it is the one taking the requests (as an HTTP
    // worker is for the app it builds).
    let app = test::init_service(api::app(svc.state.clone())).await;
    register(&app, "int", "d1").await;
    for run in ["r1", "r2"] {
        let r = send(&app, post(BASE, &procure("d1", run)).to_request()).await;
        assert_eq!(r.json, json!({"status": "PROCURED"}), "{:?}", r.json);
        let r = send(&app, post(BASE, &release("d1", run)).to_request()).await;
        assert_eq!(r.json, json!({"status": "RELEASED"}), "{:?}", r.json);
    }
    let here = std::thread::current().id();
    let seen = store
        .hook
        .seen
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    assert!(seen.len() >= 4, "transactions on {key}: {seen:?}");
    assert!(
        seen.iter().all(|t| *t == here),
        "the actor's transactions ran on {seen:?}, not on the request thread {here:?}"
    );
}

#[actix_web::test]
async fn a_panic_in_a_shadow_actor_handler_leaves_no_dead_mailbox() {
    let store = Hostile::new(Arc::new(MemoryStore::new()));
    let svc = support::service(config(&[]), store.clone()).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    register(&app, "int", "d1").await;
    let r = send(&app, post(BASE, &procure("d1", "r1")).to_request()).await;
    assert_eq!(r.json, json!({"status": "PROCURED"}));

    // the release's transaction panics inside the actor (not in `decide`)
    store.hook.panic_next(&keys::shadow("int", "d1"));
    let r = send(&app, post(BASE, &release("d1", "r1")).to_request()).await;
    assert_eq!(r.status, 503, "{:?}", r.json);
    assert!(retry_after(&r).is_some());

    // the entity answers from the store: the panicked release wrote nothing
    let r = send(&app, post(BASE, &procure("d1", "r2")).to_request()).await;
    assert_eq!(r.json["status"], "FAILED", "{:?}", r.json);
    let r = send(&app, post(BASE, &release("d1", "r1")).to_request()).await;
    assert_eq!(r.json, json!({"status": "RELEASED"}), "{:?}", r.json);
    let r = send(&app, post(BASE, &procure("d1", "r2")).to_request()).await;
    assert_eq!(r.json, json!({"status": "PROCURED"}));
    let r = send(
        &app,
        get("/api/1.0/actors/shadow-deployable/int/d1").to_request(),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    assert_eq!(r.json["state"], "PROCURED");
    assert_eq!(r.json["restarts"], 1);
    // the watch's own deliveries may be in flight; the count settles at zero
    let drained = support::eventually(Duration::from_secs(5), || async {
        let r = send(
            &app,
            get("/api/1.0/actors/shadow-deployable/int/d1").to_request(),
        )
        .await;
        r.json["mailbox_depth"] == 0
    })
    .await;
    assert!(drained, "mailbox depth does not settle at zero");
}

#[actix_web::test]
async fn a_panic_in_a_worker_actor_handler_leaves_no_dead_mailbox() {
    let store = Hostile::new(Arc::new(MemoryStore::new()));
    let svc = support::service(config(&[]), store.clone()).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    put_worker(store.as_ref(), "w-1").await;
    let seen = support::eventually(Duration::from_secs(5), || async {
        svc.state.controller.workers.get("w-1").is_some()
    })
    .await;
    assert!(seen, "the watch did not deliver the worker");
    let beat = || {
        post(
            "/api/1.0/workers/w-1/heartbeat",
            &json!({"running_instances": []}),
        )
    };
    let r = send(&app, beat().to_request()).await;
    assert_eq!(r.status, 200, "{:?}", r.json);

    store.hook.panic_next(&keys::worker("w-1"));
    let r = send(&app, beat().to_request()).await;
    assert_eq!(r.status, 503, "{:?}", r.json);
    assert!(retry_after(&r).is_some());

    let r = send(&app, beat().to_request()).await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    let kv = store
        .get(&keys::worker("w-1"))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("worker record gone"));
    let w: Worker = serde_json::from_slice(&kv.value).unwrap_or_else(|e| panic!("{e}"));
    assert!(w.last_heartbeat_at.is_some());
    let r = send(&app, get("/api/1.0/actors/worker/w-1").to_request()).await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    assert_eq!(r.json["restarts"], 1);
}

#[actix_web::test]
async fn a_stuck_actor_answers_503_within_the_send_deadline() {
    let store = Hostile::new(Arc::new(MemoryStore::new()));
    let cfg = config(&[("ACTOR_SEND_TIMEOUT_MS", "300")]);
    let svc = support::service(cfg, store.clone()).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    register(&app, "int", "d1").await;
    register(&app, "int", "d2").await;

    store.hook.hang(&keys::shadow("int", "d1"));
    let keyed = || {
        post(BASE, &procure("d1", "r1"))
            .insert_header(("x-idempotency-key", "stuck-1"))
            .to_request()
    };
    // a hang detector, not a timing assertion
    let limit = Duration::from_secs(20);
    let r = tokio::time::timeout(limit, send(&app, keyed()))
        .await
        .unwrap_or_else(|_| panic!("the request hung on a stuck actor"));
    assert_eq!(r.status, 503, "{:?}", r.json);
    assert!(retry_after(&r).is_some());
    assert!(r.json["error"].is_string());
    // queued behind the stuck one: also 503, never a hang
    let r = tokio::time::timeout(
        limit,
        send(&app, post(BASE, &procure("d1", "r2")).to_request()),
    )
    .await
    .unwrap_or_else(|_| panic!("the second request hung"));
    assert_eq!(r.status, 503, "{:?}", r.json);
    // other entities are not held up
    let r = send(&app, post(BASE, &procure("d2", "r3")).to_request()).await;
    assert_eq!(r.json, json!({"status": "PROCURED"}));

    // once the dependency answers, the first request's outcome is the stored one
    store.hook.release();
    let done = support::eventually(Duration::from_secs(10), || async {
        let r = send(&app, keyed()).await;
        r.status == 200
    })
    .await;
    assert!(done, "the actor did not recover");
    let r = send(&app, keyed()).await;
    assert_eq!(r.json, json!({"status": "PROCURED"}));
    let r = send(&app, post(BASE, &procure("d1", "r2")).to_request()).await;
    assert_eq!(r.json["status"], "FAILED");
}

#[actix_web::test]
async fn unknown_worker_ids_answer_404_and_create_nothing() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let svc = support::service(config(&[]), store.clone()).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    put_worker(store.as_ref(), "w-1").await;
    assert!(
        support::eventually(Duration::from_secs(5), || async {
            listed(&app)
                .await
                .contains(&("worker".into(), "w-1".into()))
        })
        .await
    );
    let before = listed(&app).await;
    for i in 0..20 {
        let id = format!("w-nope-{i}");
        let r = send(&app, get(&format!("/api/1.0/workers/{id}")).to_request()).await;
        assert_eq!(r.status, 404, "GET {id}");
        let r = send(
            &app,
            post(
                &format!("/api/1.0/workers/{id}/heartbeat"),
                &json!({"running_instances": []}),
            )
            .to_request(),
        )
        .await;
        assert_eq!(r.status, 404, "heartbeat {id}: {:?}", r.json);
        let r = send(
            &app,
            post(&format!("/api/1.0/workers/{id}/drain"), &json!({})).to_request(),
        )
        .await;
        assert_eq!(r.status, 404, "drain {id}: {:?}", r.json);
        let r = send(
            &app,
            get(&format!("/api/1.0/actors/worker/{id}")).to_request(),
        )
        .await;
        assert_eq!(r.status, 404, "actor {id}");
        let kv = store
            .get(&keys::worker(&id))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(kv.is_none(), "{id} was written to the store");
    }
    assert_eq!(listed(&app).await, before, "unknown ids spawned actors");
    let (kvs, _) = store
        .list(keys::WORKER_PREFIX)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(kvs.len(), 1);
}

#[actix_web::test]
async fn actors_of_deleted_records_are_stopped_and_removed() {
    let etcd = Etcd::start();
    let store = etcd.store(&support::unique_prefix());
    let svc = support::service(config(&[]), store.clone()).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    for name in ["d1", "d2", "d3"] {
        register(&app, "int", name).await;
    }
    put_worker(store.as_ref(), "w-1").await;
    let all = || {
        let mut s: BTreeSet<(String, String)> = ["d1", "d2", "d3"]
            .iter()
            .map(|n| ("shadow-deployable".to_owned(), format!("int/{n}")))
            .collect();
        s.insert(("worker".into(), "w-1".into()));
        s
    };
    assert!(
        support::eventually(Duration::from_secs(5), || async {
            listed(&app).await == all()
        })
        .await,
        "{:?}",
        listed(&app).await
    );

    // a deployable's keys deleted in etcd (by hand, or by another replica)
    delete_keys(
        store.as_ref(),
        &[keys::shadow("int", "d1"), keys::shadow_in_use("int", "d1")],
    )
    .await;
    // a deployable deleted through the API
    let r = send(
        &app,
        test::TestRequest::delete()
            .uri(&format!("{BASE}/d2"))
            .to_request(),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    // a worker record that expired or was deleted
    delete_keys(store.as_ref(), &[keys::worker("w-1")]).await;

    let left: BTreeSet<(String, String)> =
        [("shadow-deployable".to_owned(), "int/d3".to_owned())].into();
    assert!(
        support::eventually(Duration::from_secs(5), || async {
            listed(&app).await == left
        })
        .await,
        "{:?}",
        listed(&app).await
    );
    for path in [
        "/api/1.0/actors/shadow-deployable/int/d1",
        "/api/1.0/actors/shadow-deployable/int/d2",
        "/api/1.0/actors/worker/w-1",
    ] {
        let r = send(&app, get(path).to_request()).await;
        assert_eq!(r.status, 404, "{path}");
    }
    let r = send(&app, post(BASE, &procure("d1", "r1")).to_request()).await;
    assert_eq!(r.status, 404);
    assert_eq!(
        listed(&app).await,
        left,
        "a lookup of a deleted record respawned it"
    );
    // the same name registered again gets an actor again
    register(&app, "int", "d1").await;
    let r = send(&app, post(BASE, &procure("d1", "r1")).to_request()).await;
    assert_eq!(r.json, json!({"status": "PROCURED"}));
    assert!(listed(&app)
        .await
        .contains(&("shadow-deployable".into(), "int/d1".into())));
}

/// A record written straight to the store (as another replica, or a seed, would).
async fn put_shadow(store: &dyn Store, rec: &resource_plane::domain::shadow::ShadowDeployable) {
    let r = store
        .txn(Txn {
            compares: Vec::new(),
            success: vec![Op::Put {
                key: keys::shadow("int", &rec.name),
                value: serde_json::to_vec(rec).unwrap_or_else(|e| panic!("{e}")),
                lease: None,
            }],
            failure_gets: Vec::new(),
        })
        .await
        .unwrap_or_else(|e| panic!("put shadow: {e}"));
    assert!(r.succeeded);
}

/// `(id, active)` of every shadow deployable actor `GET /api/1.0/actors` lists.
async fn activity<S: TestApp>(app: &S) -> Vec<(String, bool)> {
    let r = send(app, get("/api/1.0/actors").to_request()).await;
    assert_eq!(r.status, 200, "{}", r.error());
    r.json["data"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|a| a["kind"] == "shadow-deployable")
        .map(|a| {
            (
                a["id"].as_str().unwrap_or_default().to_owned(),
                a["active"].as_bool().unwrap_or(true),
            )
        })
        .collect()
}

/// The list entry of `name` (`Null` when not listed).
async fn listed_record<S: TestApp>(app: &S, name: &str) -> Value {
    let r = send(app, get(BASE).to_request()).await;
    assert_eq!(r.status, 200, "{}", r.error());
    r.json["data"]
        .as_array()
        .and_then(|a| a.iter().find(|d| d["name"] == name).cloned())
        .unwrap_or(Value::Null)
}

#[actix_web::test]
async fn actors_start_on_their_first_command_and_the_watch_keeps_the_others_current() {
    let etcd = Etcd::start();
    let store = etcd.store(&support::unique_prefix());
    let seeded = |name: &str| {
        resource_plane::domain::shadow::ShadowDeployable::new(name, "p", "x.example", Utc::now())
    };
    for name in ["d1", "d2", "d3"] {
        put_shadow(store.as_ref(), &seeded(name)).await;
    }
    let svc = support::service(config(&[]), store.clone()).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    let idle = |names: &[&str]| -> Vec<(String, bool)> {
        ["d1", "d2", "d3"]
            .iter()
            .map(|n| (format!("int/{n}"), names.contains(n)))
            .collect()
    };
    // hydrated: every record is listed and served, none has a running actor
    assert_eq!(activity(&app).await, idle(&[]));
    let r = send(&app, get(BASE).to_request()).await;
    assert_eq!(
        r.json["data"].as_array().map(Vec::len),
        Some(3),
        "{:?}",
        r.json
    );

    // a change made elsewhere reaches the list without starting an actor
    let mut changed = seeded("d2");
    changed.min_pod_count = 7;
    put_shadow(store.as_ref(), &changed).await;
    assert!(
        support::eventually(Duration::from_secs(5), || async {
            listed_record(&app, "d2").await["min_pod_count"] == 7
        })
        .await,
        "the watch did not publish the change"
    );
    assert_eq!(activity(&app).await, idle(&[]));

    // the first command starts one actor, from the current record
    let r = send(&app, post(BASE, &procure("d2", "r1")).to_request()).await;
    assert_eq!(r.json, json!({"status": "PROCURED"}), "{:?}", r.json);
    let d2 = listed_record(&app, "d2").await;
    assert_eq!(
        (&d2["min_pod_count"], &d2["in_use"]),
        (&json!(7), &json!(true))
    );
    assert_eq!(activity(&app).await, idle(&["d2"]));
    let r = send(&app, post(BASE, &procure("d2", "r2")).to_request()).await;
    assert_eq!(r.json["status"], "FAILED", "{:?}", r.json);

    // a record deleted elsewhere leaves the list and the actors, started or not
    delete_keys(store.as_ref(), &[keys::shadow("int", "d3")]).await;
    assert!(
        support::eventually(Duration::from_secs(5), || async {
            activity(&app).await == [("int/d1".to_owned(), false), ("int/d2".to_owned(), true)]
        })
        .await,
        "{:?}",
        activity(&app).await
    );
    assert_eq!(listed_record(&app, "d3").await, Value::Null);
}

/// Walks `/api/1.0/actors` with `query` (e.g. `limit=3`) following `continue`.
async fn walk<S: TestApp>(app: &S, query: &str) -> (Vec<(String, String)>, usize) {
    let mut out = Vec::new();
    let mut pages = 0;
    let mut token: Option<String> = None;
    for _ in 0..10_000 {
        let mut uri = format!("/api/1.0/actors?{query}");
        if let Some(t) = &token {
            uri.push_str(&format!("&continue={t}"));
        }
        let r = send(app, get(&uri).to_request()).await;
        assert_eq!(r.status, 200, "{uri}: {:?}", r.json);
        pages += 1;
        for a in r.json["data"].as_array().cloned().unwrap_or_default() {
            out.push((
                a["kind"].as_str().unwrap_or_default().to_owned(),
                a["id"].as_str().unwrap_or_default().to_owned(),
            ));
        }
        match r.json["continue"].as_str() {
            Some(t) => token = Some(t.to_owned()),
            None => return (out, pages),
        }
    }
    panic!("pagination does not end");
}

#[actix_web::test]
async fn introspection_pages_through_every_live_actor_exactly_once() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let svc = support::service(config(&[]), store.clone()).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    for i in 0..7 {
        register(
            &app,
            if i % 2 == 0 { "int" } else { "prod" },
            &format!("d{i}"),
        )
        .await;
    }
    for i in 0..3 {
        put_worker(store.as_ref(), &format!("w-{i}")).await;
    }
    // an instance is a record, not an actor
    let r = send(
        &app,
        post(
            "/api/1.0/instances",
            &json!({"requirements": {"cpu": 1, "memory_gb": 1}}),
        )
        .to_request(),
    )
    .await;
    assert_eq!(r.status, 202, "{:?}", r.json);
    assert!(
        support::eventually(Duration::from_secs(5), || async {
            listed(&app).await.len() == 10
        })
        .await,
        "{:?}",
        listed(&app).await
    );
    let everything = listed(&app).await;
    assert!(everything.iter().all(|(k, _)| k != "instance"));
    for limit in [1, 3, 4, 10, 11] {
        let (seen, pages) = walk(&app, &format!("limit={limit}")).await;
        let unique: BTreeSet<_> = seen.iter().cloned().collect();
        assert_eq!(
            unique.len(),
            seen.len(),
            "limit {limit}: duplicates {seen:?}"
        );
        assert_eq!(unique, everything, "limit {limit}");
        assert_eq!(pages, 10usize.div_ceil(limit).max(1), "limit {limit}");
        let mut sorted = seen.clone();
        sorted.sort();
        assert_eq!(seen, sorted, "limit {limit}: not in a stable order");
    }
    for bad in [
        "limit=0",
        "limit=-1",
        "limit=x",
        "limit=501",
        "continue=%21%21",
        "continue=bm9wZQ",
        "colour=red",
    ] {
        let r = send(&app, get(&format!("/api/1.0/actors?{bad}")).to_request()).await;
        assert_eq!(r.status, 400, "{bad}: {:?}", r.json);
        assert!(r.json["error"].is_string());
    }
}

#[actix_web::test]
async fn introspection_without_a_limit_answers_at_most_500_with_a_continue_token() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let svc = support::service(config(&[]), store.clone()).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    for i in 0..520 {
        let key = keys::shadow("int", &format!("d{i:04}"));
        let rec = resource_plane::domain::shadow::ShadowDeployable::new(
            &format!("d{i:04}"),
            "p",
            "x.example",
            Utc::now(),
        );
        let r = store
            .txn(Txn {
                compares: Vec::new(),
                success: vec![Op::Put {
                    key,
                    value: serde_json::to_vec(&rec).unwrap_or_else(|e| panic!("{e}")),
                    lease: None,
                }],
                failure_gets: Vec::new(),
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(r.succeeded);
    }
    assert!(
        support::eventually(Duration::from_secs(10), || async {
            svc.state.registry.actors().len() == 520
        })
        .await
    );
    let r = send(&app, get("/api/1.0/actors").to_request()).await;
    assert_eq!(r.json["data"].as_array().map(Vec::len), Some(500));
    assert!(r.json["continue"].is_string(), "no continue token");
    let (seen, pages) = walk(&app, "").await;
    assert_eq!(pages, 2);
    assert_eq!(seen.len(), 520);
    assert_eq!(seen.iter().collect::<BTreeSet<_>>().len(), 520);
}

#[actix_web::test]
async fn failed_registrations_leave_no_actor_behind() {
    let store = Hostile::new(Arc::new(MemoryStore::new()));
    let svc = support::service(config(&[]), store.clone()).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    register(&app, "int", "d0").await;
    for i in 1..=5 {
        let name = format!("gone-{i}");
        store.hook.fail(Some(&keys::shadow("int", &name)));
        let r = send(
            &app,
            put(
                &format!("{BASE}/{name}"),
                &json!({"node_pool": "p", "dns": "x.example"}),
            )
            .to_request(),
        )
        .await;
        assert_eq!(r.status, 503, "{:?}", r.json);
    }
    store.hook.fail(None);
    let only: BTreeSet<(String, String)> =
        [("shadow-deployable".to_owned(), "int/d0".to_owned())].into();
    assert_eq!(listed(&app).await, only);
}

/// A cloud that behaves like the simulated one, except that, when armed, its next
/// instance listing panics (once): the reconciler lists the cloud inside its handler, so
/// this is a real panic in a leader-only actor.
struct PanickyCloud {
    inner: Arc<dyn resource_plane::ports::cloud::CloudProvider>,
    armed: std::sync::atomic::AtomicBool,
    fired: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl resource_plane::ports::cloud::CloudProvider for PanickyCloud {
    async fn create_instance(
        &self,
        template: &WorkerTemplate,
        worker_id: &str,
    ) -> Result<resource_plane::ports::cloud::LaunchOutcome, resource_plane::ports::cloud::CloudError>
    {
        self.inner.create_instance(template, worker_id).await
    }
    async fn terminate_instance(
        &self,
        instance_id: &str,
    ) -> Result<(), resource_plane::ports::cloud::CloudError> {
        self.inner.terminate_instance(instance_id).await
    }
    async fn stop_instance(
        &self,
        instance_id: &str,
    ) -> Result<(), resource_plane::ports::cloud::CloudError> {
        self.inner.stop_instance(instance_id).await
    }
    async fn get_instance_status(
        &self,
        instance_id: &str,
    ) -> Result<
        resource_plane::ports::cloud::CloudInstanceStatus,
        resource_plane::ports::cloud::CloudError,
    > {
        self.inner.get_instance_status(instance_id).await
    }
    async fn list_instances(
        &self,
    ) -> Result<
        Vec<resource_plane::ports::cloud::CloudInstance>,
        resource_plane::ports::cloud::CloudError,
    > {
        use std::sync::atomic::Ordering;
        if self.armed.swap(false, Ordering::SeqCst) {
            self.fired.store(true, Ordering::SeqCst);
            panic!("poisoned dependency: the cloud panicked while listing instances");
        }
        self.inner.list_instances().await
    }
    fn name(&self) -> &'static str {
        "panicky"
    }
}

#[actix_web::test]
async fn a_panic_in_a_leader_only_actor_does_not_stop_the_controller() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let cfg = config(&[("RECONCILE_INTERVAL", "1"), ("LEADER_LEASE_TTL", "5")]);
    let cloud = Arc::new(PanickyCloud {
        inner: Arc::new(resource_plane::adapters::sim_cloud::SimCloud::new(
            Duration::from_millis(10),
        )),
        armed: AtomicBool::new(false),
        fired: AtomicBool::new(false),
    });
    let svc =
        resource_plane::app::Service::start_with(cfg, Arc::new(MemoryStore::new()), cloud.clone())
            .unwrap_or_else(|e| panic!("service did not start: {e}"));
    assert!(svc.wait_hydrated(Duration::from_secs(15)).await);
    let ctl = svc.state.controller.clone();
    let passes = || ctl.reconcile_status().passes;
    assert!(
        support::eventually(Duration::from_secs(20), || async { passes() >= 1 }).await,
        "the reconciler never ran"
    );
    cloud.armed.store(true, Ordering::SeqCst);
    assert!(
        support::eventually(Duration::from_secs(20), || async {
            cloud.fired.load(Ordering::SeqCst)
        })
        .await,
        "the reconciler never listed the cloud"
    );
    let at_panic = passes();
    // The reconciler died in the middle of that pass; the leader's passes go on only if
    // something restarted it.
    assert!(
        support::eventually(Duration::from_secs(20), || async {
            passes() >= at_panic + 2
        })
        .await,
        "no reconcile pass after the reconciler panicked: {} then {}",
        at_panic,
        passes()
    );
    assert!(ctl.leader_status().is_leader, "the replica stopped leading");
}
