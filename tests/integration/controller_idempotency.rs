//! Idempotency of the controller routes (create, complete, drain, heartbeat): a retry
//! with the same key and body replays the stored answer (`Idempotent-Replayed: true`)
//! and changes nothing; the same key with another request is 422; the record is written
//! by the very transaction that makes the change (same `mod_revision`). And a heartbeat
//! is one transaction: a store failure can no longer leave the worker updated and its
//! instances not.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::test;
use resource_plane::adapters::memory::MemoryStore;
use resource_plane::adapters::sim_cloud::SimCloud;
use resource_plane::api;
use resource_plane::app::Service;
use resource_plane::domain::worker::{Instance, InstanceState, WorkerState};
use resource_plane::keys;
use resource_plane::ports::store::{Kv, Op, Store, StoreError, Txn, TxnResult};
use serde_json::{json, Value};

use crate::controller::{controller_config, TEMPLATES};
use crate::controller_disrupt::{place_directly, seed_worker, stored_worker};
use crate::support::{self, post, send, Etcd, Hook, Hooked, Resp, TestApp};

async fn start(store: Arc<dyn Store>) -> (Service, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut cfg = controller_config(&dir, TEMPLATES);
    cfg.controller.reconcile_interval = Duration::from_secs(3600);
    cfg.controller.scale_down_idle = Duration::from_secs(3600);
    let cloud = Arc::new(SimCloud::new(Duration::from_millis(100)));
    let svc = Service::start_with(cfg, store, cloud).unwrap_or_else(|e| panic!("{e}"));
    assert!(svc.wait_hydrated(Duration::from_secs(15)).await);
    (svc, dir)
}

async fn kv(store: &dyn Store, key: &str) -> Kv {
    store
        .get(key)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("{key} missing"))
}

async fn instance(store: &dyn Store, id: &str) -> (Instance, i64) {
    let kv = kv(store, &keys::instance(id)).await;
    (
        serde_json::from_slice(&kv.value).unwrap_or_else(|e| panic!("{e}")),
        kv.mod_revision,
    )
}

async fn instance_count(store: &dyn Store) -> usize {
    store
        .list(keys::INSTANCE_PREFIX)
        .await
        .map(|(kvs, _)| kvs.len())
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The idempotency record of `key` was written by the transaction that left `changed`
/// at its current revision.
async fn recorded_with(store: &dyn Store, key: &str, changed: &str) {
    let rec = kv(store, &keys::idempotency("controller", key)).await;
    let other = kv(store, changed).await;
    assert_eq!(
        rec.mod_revision, other.mod_revision,
        "idempotency record {key} not written in the same transaction as {changed}"
    );
}

async fn call(app: &impl TestApp, path: &str, body: &Value, key: &str) -> Resp {
    send(
        app,
        post(path, body)
            .insert_header(("X-Idempotency-Key", key))
            .to_request(),
    )
    .await
}

fn assert_replay(first: &Resp, again: &Resp) {
    assert_eq!(
        (again.status, String::from_utf8_lossy(&again.raw)),
        (first.status, String::from_utf8_lossy(&first.raw)),
        "a retry gets the stored answer byte for byte"
    );
    assert_eq!(
        again
            .headers
            .get("idempotent-replayed")
            .and_then(|v| v.to_str().ok()),
        Some("true")
    );
    assert!(first.headers.get("idempotent-replayed").is_none());
}

async fn suite(store: Arc<dyn Store>) {
    seed_worker(store.as_ref(), "w-busy", 0).await;
    seed_worker(store.as_ref(), "w-free", 0).await;
    place_directly(
        store.as_ref(),
        "w-busy",
        "i-sched",
        0.5,
        false,
        InstanceState::Scheduled,
    )
    .await;
    place_directly(
        store.as_ref(),
        "w-busy",
        "i-run",
        0.5,
        false,
        InstanceState::Running,
    )
    .await;
    // busy, so its drain waits for the deadline instead of moving on to STOPPING
    place_directly(
        store.as_ref(),
        "w-free",
        "i-keep",
        0.5,
        false,
        InstanceState::Running,
    )
    .await;
    let (svc, _dir) = start(store.clone()).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    let s = store.as_ref();

    // create: one instance however often it is retried
    let body = json!({"requirements": {"cpu": 1000.0, "memory_gb": 1.0}});
    let first = call(&app, "/api/1.0/instances", &body, "k-create").await;
    assert_eq!(first.status, 202, "{:?}", first.json);
    let id = first.json["id"].as_str().unwrap_or_default().to_owned();
    let count = instance_count(s).await;
    let again = call(&app, "/api/1.0/instances", &body, "k-create").await;
    assert_replay(&first, &again);
    assert_eq!(
        instance_count(s).await,
        count,
        "a retry made no second instance"
    );
    recorded_with(s, "k-create", &keys::instance(&id)).await;
    let other = json!({"requirements": {"cpu": 999.0, "memory_gb": 1.0}});
    let r = call(&app, "/api/1.0/instances", &other, "k-create").await;
    assert_eq!(r.status, 422, "{:?}", r.json);
    assert!(r.error().contains("different request"), "{}", r.error());
    assert_eq!(instance_count(s).await, count);

    // complete: the retry replays instead of answering 409
    let path = format!("/api/1.0/instances/{id}/complete");
    let first = call(&app, &path, &json!({}), "k-complete").await;
    assert_eq!(
        (first.status, first.json["state"].as_str()),
        (200, Some("COMPLETED")),
        "{:?}",
        first.json
    );
    let again = call(&app, &path, &json!({}), "k-complete").await;
    assert_replay(&first, &again);
    recorded_with(s, "k-complete", &keys::instance(&id)).await;
    let r = call(
        &app,
        "/api/1.0/instances/i-sched/complete",
        &json!({}),
        "k-complete",
    )
    .await;
    assert_eq!(r.status, 422, "{:?}", r.json);
    assert_eq!(
        instance(s, "i-sched").await.0.state,
        InstanceState::Scheduled
    );

    // drain
    let first = call(&app, "/api/1.0/workers/w-free/drain", &json!({}), "k-drain").await;
    assert_eq!(
        (first.status, first.json["state"].as_str()),
        (202, Some("DRAINING")),
        "{:?}",
        first.json
    );
    let rev = kv(s, &keys::worker("w-free")).await.mod_revision;
    let again = call(&app, "/api/1.0/workers/w-free/drain", &json!({}), "k-drain").await;
    assert_replay(&first, &again);
    assert_eq!(kv(s, &keys::worker("w-free")).await.mod_revision, rev);
    recorded_with(s, "k-drain", &keys::worker("w-free")).await;
    let r = call(
        &app,
        "/api/1.0/workers/w-free/drain",
        &json!({"deadline_seconds": 5}),
        "k-drain",
    )
    .await;
    assert_eq!(r.status, 422, "{:?}", r.json);

    // heartbeat: i-sched starts, i-run (no longer reported) completes, in one txn
    let hb = json!({"running_instances": ["i-sched"]});
    let path = "/api/1.0/workers/w-busy/heartbeat";
    let first = call(&app, path, &hb, "k-hb").await;
    assert_eq!(first.status, 200, "{:?}", first.json);
    assert_eq!(first.json["started"], json!(["i-sched"]));
    assert_eq!(first.json["completed"], json!(["i-run"]));
    let again = call(&app, path, &hb, "k-hb").await;
    assert_replay(&first, &again);
    let w = kv(s, &keys::worker("w-busy")).await;
    let (started, srev) = instance(s, "i-sched").await;
    let (done, drev) = instance(s, "i-run").await;
    assert_eq!(started.state, InstanceState::Running);
    assert_eq!(done.state, InstanceState::Completed);
    assert_eq!(
        (srev, drev),
        (w.mod_revision, w.mod_revision),
        "one transaction"
    );
    recorded_with(s, "k-hb", &keys::worker("w-busy")).await;
    let r = call(&app, path, &json!({"running_instances": []}), "k-hb").await;
    assert_eq!(r.status, 422, "{:?}", r.json);
    assert_eq!(instance(s, "i-sched").await.0.state, InstanceState::Running);
}

#[actix_web::test]
async fn controller_routes_are_idempotent_against_memory() {
    suite(Arc::new(MemoryStore::new())).await;
}

#[actix_web::test]
async fn controller_routes_are_idempotent_against_real_etcd() {
    let etcd = Etcd::start();
    suite(etcd.store(&support::unique_prefix())).await;
}

/// Fails every worker/instance transaction after the first `allow` (when armed).
struct FailAfter {
    allow: AtomicI64,
}

fn touches_controller(txn: &Txn) -> bool {
    txn.success.iter().any(|op| {
        let key = match op {
            Op::Put { key, .. } | Op::Delete { key } => key,
        };
        key.starts_with(keys::WORKER_PREFIX) || key.starts_with(keys::INSTANCE_PREFIX)
    })
}

#[async_trait::async_trait]
impl Hook for FailAfter {
    async fn txn(&self, inner: &dyn Store, txn: Txn) -> Result<TxnResult, StoreError> {
        if touches_controller(&txn) {
            let left = self.allow.load(Ordering::SeqCst);
            if left == 0 {
                return Err(StoreError::Unavailable("injected failure".into()));
            }
            if left > 0 {
                self.allow.fetch_sub(1, Ordering::SeqCst);
            }
        }
        inner.txn(txn).await
    }
}

/// Worker and instances either all show the heartbeat, at one revision, or none does.
async fn all_or_nothing(store: &dyn Store, worker: &str, ids: &[&str]) -> bool {
    let wkv = kv(store, &keys::worker(worker)).await;
    let w = stored_worker(store, worker).await;
    let mut running = 0;
    for id in ids {
        let (i, rev) = instance(store, id).await;
        if i.state == InstanceState::Running {
            running += 1;
            assert_eq!(
                rev, wkv.mod_revision,
                "{id} started in another write than the worker's"
            );
        }
    }
    match w.last_heartbeat_at {
        Some(_) => {
            assert_eq!(
                running,
                ids.len(),
                "worker updated by the heartbeat but its instances not: {w:?}"
            );
            true
        }
        None => {
            assert_eq!(running, 0, "instances updated but the worker not");
            false
        }
    }
}

#[actix_web::test]
async fn a_heartbeat_is_one_transaction_on_real_etcd() {
    let etcd = Etcd::start();
    let inner = etcd.store(&support::unique_prefix());
    let ids = ["i-a", "i-b", "i-c"];
    seed_worker(inner.as_ref(), "w-hb", 0).await;
    for id in ids {
        place_directly(
            inner.as_ref(),
            "w-hb",
            id,
            0.5,
            false,
            InstanceState::Scheduled,
        )
        .await;
    }
    let store = Hooked::new(
        inner,
        FailAfter {
            allow: AtomicI64::new(-1),
        },
    );
    let (svc, _dir) = start(store.clone()).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    let hb = json!({"running_instances": ids});
    let path = "/api/1.0/workers/w-hb/heartbeat";

    // etcd fails right after one write: either the whole heartbeat landed or none of it
    store.hook.allow.store(1, Ordering::SeqCst);
    let r = send(&app, post(path, &hb).to_request()).await;
    store.hook.allow.store(-1, Ordering::SeqCst);
    let landed = all_or_nothing(store.as_ref(), "w-hb", &ids).await;
    assert!(landed, "one transaction fits in the one allowed write");
    assert_eq!(r.status, 200, "{:?}", r.json);

    // etcd fails at once: 503, nothing half-written, and a retry completes it
    seed_worker(store.as_ref(), "w-hb2", 0).await;
    for id in ["i-d", "i-e"] {
        place_directly(
            store.as_ref(),
            "w-hb2",
            id,
            0.5,
            false,
            InstanceState::Scheduled,
        )
        .await;
    }
    for _ in 0..100 {
        if svc
            .state
            .controller
            .workers
            .get("w-hb2")
            .is_some_and(|w| w.instances.len() == 2)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let hb2 = json!({"running_instances": ["i-d", "i-e"]});
    let path2 = "/api/1.0/workers/w-hb2/heartbeat";
    store.hook.allow.store(0, Ordering::SeqCst);
    let r = send(&app, post(path2, &hb2).to_request()).await;
    store.hook.allow.store(-1, Ordering::SeqCst);
    assert_eq!(r.status, 503, "{:?}", r.json);
    assert!(!all_or_nothing(store.as_ref(), "w-hb2", &["i-d", "i-e"]).await);
    let r = send(&app, post(path2, &hb2).to_request()).await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    assert!(all_or_nothing(store.as_ref(), "w-hb2", &["i-d", "i-e"]).await);
    assert_eq!(
        stored_worker(store.as_ref(), "w-hb2").await.state,
        WorkerState::Running
    );
}

#[actix_web::test]
async fn a_heartbeat_of_many_instances_goes_in_consistent_resumable_steps_on_real_etcd() {
    use resource_plane::actors::worker::MAX_INSTANCE_OPS;
    let etcd = Etcd::start();
    let inner = etcd.store(&support::unique_prefix());
    seed_worker(inner.as_ref(), "w-many", 0).await;
    let ids: Vec<String> = (0..MAX_INSTANCE_OPS + 30)
        .map(|n| format!("i-{n:04}"))
        .collect();
    for id in &ids {
        place_directly(
            inner.as_ref(),
            "w-many",
            id,
            0.01,
            false,
            InstanceState::Scheduled,
        )
        .await;
    }
    let store = Hooked::new(
        inner,
        FailAfter {
            allow: AtomicI64::new(-1),
        },
    );
    let (svc, _dir) = start(store.clone()).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    let hb = json!({"running_instances": ids});
    let path = "/api/1.0/workers/w-many/heartbeat";

    // etcd fails after the first step: that step is whole, the rest is still due
    store.hook.allow.store(1, Ordering::SeqCst);
    let r = send(&app, post(path, &hb).to_request()).await;
    store.hook.allow.store(-1, Ordering::SeqCst);
    assert_eq!(r.status, 503, "{:?}", r.json);
    let w = kv(store.as_ref(), &keys::worker("w-many")).await;
    let mut running = 0;
    for id in &ids {
        let (i, rev) = instance(store.as_ref(), id).await;
        if i.state == InstanceState::Running {
            running += 1;
            assert_eq!(rev, w.mod_revision, "{id} not written with the worker");
        }
    }
    assert_eq!(running, MAX_INSTANCE_OPS, "one full step landed, no more");
    assert!(stored_worker(store.as_ref(), "w-many")
        .await
        .last_heartbeat_at
        .is_some());

    // the next heartbeat continues from there (etcd never sees an oversized txn)
    let r = send(&app, post(path, &hb).to_request()).await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    assert_eq!(r.json["started"].as_array().map(Vec::len), Some(30));
    for id in &ids {
        assert_eq!(
            instance(store.as_ref(), id).await.0.state,
            InstanceState::Running
        );
    }
}

#[actix_web::test]
async fn a_retry_on_another_replica_replays_through_the_transaction_guard() {
    let etcd = Etcd::start();
    let prefix = support::unique_prefix();
    let seed = etcd.store(&prefix);
    seed_worker(seed.as_ref(), "w-x", 0).await;
    place_directly(
        seed.as_ref(),
        "w-x",
        "i-x",
        0.5,
        false,
        InstanceState::Running,
    )
    .await;
    let (a, _da) = start(etcd.store(&prefix)).await;
    let (b, _db) = start(etcd.store(&prefix)).await;
    let app_a = test::init_service(api::app(a.state.clone())).await;
    let app_b = test::init_service(api::app(b.state.clone())).await;
    let s = seed.as_ref();

    let body = json!({"requirements": {"cpu": 1000.0, "memory_gb": 1.0}, "do_not_disrupt": true});
    let first = call(&app_a, "/api/1.0/instances", &body, "x-create").await;
    assert_eq!(first.status, 202, "{:?}", first.json);
    let count = instance_count(s).await;
    // B never looks the key up first: its create transaction finds the record
    let again = call(&app_b, "/api/1.0/instances", &body, "x-create").await;
    assert_replay(&first, &again);
    assert_eq!(instance_count(s).await, count);

    let first = call(&app_a, "/api/1.0/workers/w-x/drain", &json!({}), "x-drain").await;
    assert_eq!(first.status, 202, "{:?}", first.json);
    let again = call(&app_b, "/api/1.0/workers/w-x/drain", &json!({}), "x-drain").await;
    assert_replay(&first, &again);
    let r = call(
        &app_b,
        "/api/1.0/workers/w-x/drain",
        &json!({"deadline_seconds": 60}),
        "x-drain",
    )
    .await;
    assert_eq!(r.status, 422, "{:?}", r.json);
}
