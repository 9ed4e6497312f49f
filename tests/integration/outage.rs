//! The store going away: 503 with Retry-After, readiness false, nothing half-written;
//! recovery without a restart of the service.

use std::sync::Arc;
use std::time::Duration;

use actix_web::test;
use resource_plane::adapters::memory::MemoryStore;
use resource_plane::api;
use resource_plane::keys;
use resource_plane::ports::store::Store;
use serde_json::json;

use crate::support::{self, get, post, put, send, Etcd};

const BASE: &str = "/api/1.0/int/shadow-deployables";

#[actix_web::test]
async fn etcd_stopped_then_restarted() {
    let mut etcd = Etcd::start();
    let prefix = support::unique_prefix();
    let raw = etcd.store(&prefix);
    let svc = support::service(support::config(), etcd.store(&prefix)).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    send(
        &app,
        put(&format!("{BASE}/d"), &json!({"node_pool": "p", "dns": "d"})).to_request(),
    )
    .await;

    etcd.kill();
    let body = json!({"action": "PROCURE", "name": "d", "workflow_run_id": "r1"});
    let r = send(
        &app,
        post(BASE, &body)
            .insert_header(("X-Idempotency-Key", "during-outage"))
            .to_request(),
    )
    .await;
    assert_eq!(r.status, 503, "{:?}", r.json);
    assert!(r.headers.get("retry-after").is_some());
    assert!(r.error().contains("unavailable"), "{}", r.error());
    let r = send(
        &app,
        put(&format!("{BASE}/e"), &json!({"node_pool": "p", "dns": "e"})).to_request(),
    )
    .await;
    assert_eq!(r.status, 503);
    let r = send(&app, get("/health/ready").to_request()).await;
    assert_eq!(r.status, 503);
    assert_eq!(
        send(&app, get("/health").to_request()).await.status,
        200,
        "liveness stays up"
    );

    etcd.restart();
    // nothing half-written: neither the record, the index nor the idempotency key moved
    let rec = raw
        .get(&keys::shadow("int", "d"))
        .await
        .ok()
        .flatten()
        .map(|kv| serde_json::from_slice::<serde_json::Value>(&kv.value).unwrap_or_default());
    assert_eq!(
        rec.as_ref().map(|r| r["state"].clone()),
        Some(json!("FREE"))
    );
    assert_eq!(
        raw.get(&keys::shadow_in_use("int", "d"))
            .await
            .ok()
            .flatten()
            .map(|kv| kv.value),
        Some(b"false".to_vec())
    );
    assert!(raw
        .get(&keys::idempotency("int", "during-outage"))
        .await
        .ok()
        .flatten()
        .is_none());
    assert!(raw
        .get(&keys::shadow("int", "e"))
        .await
        .ok()
        .flatten()
        .is_none());

    // the service recovers by itself
    let recovered = support::eventually(Duration::from_secs(30), || async {
        send(&app, post(BASE, &body).to_request()).await.status == 200
    })
    .await;
    assert!(recovered, "service did not recover after etcd came back");
    let ready = support::eventually(Duration::from_secs(10), || async {
        send(&app, get("/health/ready").to_request()).await.status == 200
    })
    .await;
    assert!(ready);
    let r = send(&app, get(BASE).to_request()).await;
    assert_eq!(r.json["data"][0]["owner"]["workflow_run_id"], "r1");
    assert_eq!(r.json["data"][0]["version"], 1);
}

#[actix_web::test]
async fn memory_store_outage_gives_503_and_recovers() {
    let store = Arc::new(MemoryStore::new());
    let svc = support::service(support::config(), store.clone() as Arc<dyn Store>).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    send(
        &app,
        put(&format!("{BASE}/d"), &json!({"node_pool": "p", "dns": "d"})).to_request(),
    )
    .await;
    store.set_unavailable(true);
    let body = json!({"action": "PROCURE", "name": "d", "workflow_run_id": "r1"});
    let r = send(&app, post(BASE, &body).to_request()).await;
    assert_eq!(r.status, 503);
    assert_eq!(
        r.headers.get("retry-after").and_then(|v| v.to_str().ok()),
        Some("2")
    );
    store.set_unavailable(false);
    let r = send(&app, post(BASE, &body).to_request()).await;
    assert_eq!(r.json["status"], "PROCURED");
}
