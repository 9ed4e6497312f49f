//! Idempotency keys: replay byte for byte, mismatch 422, concurrent 409, and the record
//! exists exactly when the transition does.

use std::sync::Arc;

use actix_web::test;
use futures::future::join_all;
use resource_plane::adapters::memory::MemoryStore;
use resource_plane::api;
use resource_plane::keys;
use resource_plane::ports::store::{Store, StoreError, Txn, TxnResult};
use serde_json::json;

use crate::support::{self, get, post, put, send, Etcd, Hook, Hooked};

const BASE: &str = "/api/1.0/int/shadow-deployables";

async fn version(
    app: &impl actix_web::dev::Service<
        support::Req,
        Response = actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>,
        Error = actix_web::Error,
    >,
    name: &str,
) -> u64 {
    let r = send(app, get(BASE).to_request()).await;
    r.json["data"]
        .as_array()
        .and_then(|a| a.iter().find(|d| d["name"] == name))
        .and_then(|d| d["version"].as_u64())
        .unwrap_or(u64::MAX)
}

async fn idempotency_suite(store: Arc<dyn Store>) {
    let svc = support::service(support::config(), store.clone()).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    for n in ["a", "b"] {
        send(
            &app,
            put(&format!("{BASE}/{n}"), &json!({"node_pool": "p", "dns": n})).to_request(),
        )
        .await;
    }
    let body =
        json!({"action": "PROCURE", "name": "a", "workflow_run_id": "r1", "workflow_plan": "plan"});

    // first call transitions and stores its answer in the same transaction
    let first = send(
        &app,
        post(BASE, &body)
            .insert_header(("X-Idempotency-Key", "k-1"))
            .to_request(),
    )
    .await;
    assert_eq!(first.json["status"], "PROCURED");
    assert!(
        store
            .get(&keys::idempotency("int", "k-1"))
            .await
            .ok()
            .flatten()
            .is_some(),
        "record stored with the transition"
    );
    assert_eq!(version(&app, "a").await, 1);

    // release without a key, then replay: stored answer, no second transition
    let r = send(
        &app,
        post(
            BASE,
            &json!({"action": "RELEASE", "name": "a", "workflow_run_id": "r1"}),
        )
        .to_request(),
    )
    .await;
    assert_eq!(r.json["status"], "RELEASED");
    let replay = send(
        &app,
        post(BASE, &body)
            .insert_header(("X-Idempotency-Key", "k-1"))
            .to_request(),
    )
    .await;
    assert_eq!(
        (replay.status, replay.raw.clone()),
        (first.status, first.raw.clone())
    );
    assert_eq!(
        replay
            .headers
            .get("idempotent-replayed")
            .and_then(|v| v.to_str().ok()),
        Some("true")
    );
    assert_eq!(version(&app, "a").await, 2, "replay did not procure again");
    let r = send(&app, get(&format!("{BASE}?in_use=true")).to_request()).await;
    assert_eq!(r.json["data"].as_array().map(Vec::len), Some(0));

    // key order does not matter; the other header name works too
    let reordered =
        json!({"workflow_plan": "plan", "workflow_run_id": "r1", "name": "a", "action": "PROCURE"});
    let r = send(
        &app,
        post(BASE, &reordered)
            .insert_header(("Idempotency-Key", "k-1"))
            .to_request(),
    )
    .await;
    assert_eq!((r.status, r.raw.clone()), (200, first.raw.clone()));

    // same key, different body -> 422, nothing changes
    let other = json!({"action": "PROCURE", "name": "b", "workflow_run_id": "r1"});
    let r = send(
        &app,
        post(BASE, &other)
            .insert_header(("X-Idempotency-Key", "k-1"))
            .to_request(),
    )
    .await;
    assert_eq!(r.status, 422);
    assert!(r.error().contains("different request"), "{}", r.error());
    assert_eq!(version(&app, "b").await, 0);

    // outcomes that change nothing are not stored
    send(
        &app,
        post(
            BASE,
            &json!({"action": "PROCURE", "name": "b", "workflow_run_id": "owner"}),
        )
        .to_request(),
    )
    .await;
    let r = send(
        &app,
        post(
            BASE,
            &json!({"action": "PROCURE", "name": "b", "workflow_run_id": "loser"}),
        )
        .insert_header(("X-Idempotency-Key", "k-failed"))
        .to_request(),
    )
    .await;
    assert_eq!(r.json["status"], "FAILED");
    assert!(store
        .get(&keys::idempotency("int", "k-failed"))
        .await
        .ok()
        .flatten()
        .is_none());
    let r = send(
        &app,
        post(
            BASE,
            &json!({"action": "RELEASE", "name": "b", "workflow_run_id": "loser"}),
        )
        .insert_header(("X-Idempotency-Key", "k-409"))
        .to_request(),
    )
    .await;
    assert_eq!(r.status, 409);
    assert!(store
        .get(&keys::idempotency("int", "k-409"))
        .await
        .ok()
        .flatten()
        .is_none());
    // ...so a later success with that key is a fresh request
    let r = send(
        &app,
        post(
            BASE,
            &json!({"action": "RELEASE", "name": "b", "workflow_run_id": "owner"}),
        )
        .insert_header(("X-Idempotency-Key", "k-409"))
        .to_request(),
    )
    .await;
    assert_eq!(
        (r.status, r.json["status"].as_str()),
        (200, Some("RELEASED")),
        "k-409 was never stored"
    );
}

/// A store whose transactions take a while, so concurrent requests surely overlap.
struct SlowTxns;

#[async_trait::async_trait]
impl Hook for SlowTxns {
    async fn txn(&self, inner: &dyn Store, txn: Txn) -> Result<TxnResult, StoreError> {
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        inner.txn(txn).await
    }
}

async fn concurrent_same_key(store: Arc<dyn Store>) {
    let store: Arc<dyn Store> = Hooked::new(store, SlowTxns);
    let svc = support::service(support::config(), store.clone()).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    send(
        &app,
        put(&format!("{BASE}/c"), &json!({"node_pool": "p", "dns": "c"})).to_request(),
    )
    .await;
    let body = json!({"action": "PROCURE", "name": "c", "workflow_run_id": "r1"});
    let calls = (0..8).map(|_| {
        send(
            &app,
            post(BASE, &body)
                .insert_header(("X-Idempotency-Key", "same"))
                .to_request(),
        )
    });
    let results = join_all(calls).await;
    let ok = results.iter().filter(|r| r.status == 200).count();
    let conflicts = results.iter().filter(|r| r.status == 409).count();
    assert_eq!(ok + conflicts, 8, "{results:?}");
    assert!(conflicts >= 1, "concurrent duplicates get 409: {results:?}");
    assert!(results
        .iter()
        .filter(|r| r.status == 200)
        .all(|r| r.json["status"] == "PROCURED"));
    assert_eq!(version(&app, "c").await, 1, "one transition");
    // afterwards the key replays
    let r = send(
        &app,
        post(BASE, &body)
            .insert_header(("X-Idempotency-Key", "same"))
            .to_request(),
    )
    .await;
    assert_eq!(
        (r.status, r.json["status"].as_str()),
        (200, Some("PROCURED"))
    );
}

#[actix_web::test]
async fn idempotency_against_memory() {
    idempotency_suite(Arc::new(MemoryStore::new())).await;
    concurrent_same_key(Arc::new(MemoryStore::new())).await;
}

#[actix_web::test]
async fn idempotency_against_real_etcd() {
    let etcd = Etcd::start();
    idempotency_suite(etcd.store(&support::unique_prefix())).await;
    concurrent_same_key(etcd.store(&support::unique_prefix())).await;
}

#[actix_web::test]
async fn replay_works_across_instances_sharing_etcd() {
    let etcd = Etcd::start();
    let prefix = support::unique_prefix();
    let a = support::service(support::config(), etcd.store(&prefix)).await;
    let b = support::service(support::config(), etcd.store(&prefix)).await;
    let app_a = test::init_service(api::app(a.state.clone())).await;
    let app_b = test::init_service(api::app(b.state.clone())).await;
    send(
        &app_a,
        put(&format!("{BASE}/x"), &json!({"node_pool": "p", "dns": "x"})).to_request(),
    )
    .await;
    let body = json!({"action": "PROCURE", "name": "x", "workflow_run_id": "r1"});
    let r1 = send(
        &app_a,
        post(BASE, &body)
            .insert_header(("X-Idempotency-Key", "cross"))
            .to_request(),
    )
    .await;
    assert_eq!(r1.json["status"], "PROCURED");
    // B may not have seen A's write yet: its CAS (or its lookup) finds the record
    let r2 = send(
        &app_b,
        post(BASE, &body)
            .insert_header(("X-Idempotency-Key", "cross"))
            .to_request(),
    )
    .await;
    assert_eq!((r2.status, r2.raw.clone()), (200, r1.raw.clone()));
    let rel = json!({"action": "RELEASE", "name": "x", "workflow_run_id": "r1"});
    let r3 = send(
        &app_b,
        post(BASE, &rel)
            .insert_header(("X-Idempotency-Key", "cross"))
            .to_request(),
    )
    .await;
    assert_eq!(r3.status, 422);
}
