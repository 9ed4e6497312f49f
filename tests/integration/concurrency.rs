//! Two service instances sharing one etcd: exactly one of 64 concurrent PROCUREs wins,
//! and afterwards the record, the index key and both instances agree.

use std::time::Duration;

use actix_web::test;
use futures::future::join_all;
use resource_plane::api;
use resource_plane::keys;
use serde_json::json;

use crate::support::{self, get, post, put, send, Etcd};

const BASE: &str = "/api/1.0/int/shadow-deployables";

#[actix_web::test]
async fn sixty_four_procures_across_two_instances_one_winner() {
    let etcd = Etcd::start();
    let prefix = support::unique_prefix();
    let raw = etcd.store(&prefix);
    let a = support::service(support::config(), etcd.store(&prefix)).await;
    let b = support::service(support::config(), etcd.store(&prefix)).await;
    let app_a = test::init_service(api::app(a.state.clone())).await;
    let app_b = test::init_service(api::app(b.state.clone())).await;

    let r = send(
        &app_a,
        put(
            &format!("{BASE}/hot"),
            &json!({"node_pool": "p", "dns": "hot.example"}),
        )
        .to_request(),
    )
    .await;
    assert_eq!(r.status, 201);

    let calls = (0..64).map(|i| {
        let body =
            json!({"action": "PROCURE", "name": "hot", "workflow_run_id": format!("run-{i}")});
        let req = post(BASE, &body).to_request();
        let app_a = &app_a;
        let app_b = &app_b;
        async move {
            let r = if i % 2 == 0 {
                send(app_a, req).await
            } else {
                send(app_b, req).await
            };
            (i, r)
        }
    });
    let results = join_all(calls).await;
    let winners: Vec<usize> = results
        .iter()
        .filter(|(_, r)| r.status == 200 && r.json["status"] == "PROCURED")
        .map(|(i, _)| *i)
        .collect();
    let failed = results
        .iter()
        .filter(|(_, r)| r.status == 200 && r.json == json!({"status": "FAILED", "delay": 300}))
        .count();
    assert_eq!(winners.len(), 1, "exactly one PROCURED: {winners:?}");
    assert_eq!(failed, 63, "every other call told to retry");
    let winner = format!("run-{}", winners[0]);

    let record = raw
        .get(&keys::shadow("int", "hot"))
        .await
        .ok()
        .flatten()
        .map(|kv| serde_json::from_slice::<serde_json::Value>(&kv.value).unwrap_or_default())
        .unwrap_or_default();
    assert_eq!(record["owner"]["workflow_run_id"], winner.as_str());
    assert_eq!(record["version"], 1);
    let index = raw
        .get(&keys::shadow_in_use("int", "hot"))
        .await
        .ok()
        .flatten();
    assert_eq!(index.map(|kv| kv.value), Some(b"true".to_vec()));

    for app in [&app_a, &app_b] {
        let agreed = support::eventually(Duration::from_secs(10), || async {
            let r = send(app, get(BASE).to_request()).await;
            let d = &r.json["data"][0];
            d["owner"]["workflow_run_id"] == winner.as_str()
                && d["version"] == 1
                && d["in_use"] == true
        })
        .await;
        assert!(agreed, "an instance's GET disagrees with etcd");
    }

    // each replica learns the other's writes through its watch
    let r = send(
        &app_b,
        post(
            BASE,
            &json!({"action": "RELEASE", "name": "hot", "workflow_run_id": winner}),
        )
        .to_request(),
    )
    .await;
    assert_eq!(r.json["status"], "RELEASED");
    let seen = support::eventually(Duration::from_secs(10), || async {
        let r = send(&app_a, get(BASE).to_request()).await;
        r.json["data"][0]["state"] == "FREE" && r.json["data"][0]["version"] == 2
    })
    .await;
    assert!(seen, "instance A never saw B's release");
}

#[actix_web::test]
async fn one_etcd_transaction_per_procure_and_per_release() {
    let etcd = Etcd::start();
    let svc = support::service(support::config(), etcd.store(&support::unique_prefix())).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    send(
        &app,
        put(&format!("{BASE}/d"), &json!({"node_pool": "p", "dns": "d"})).to_request(),
    )
    .await;
    let m = &svc.state.metrics;
    for (action, status) in [("PROCURE", "PROCURED"), ("RELEASE", "RELEASED")] {
        let (txn0, get0) = (m.store_calls("etcd", "txn"), m.store_calls("etcd", "get"));
        let etcd_txn0 = etcd.grpc_calls("Txn");
        let r = send(
            &app,
            post(
                BASE,
                &json!({"action": action, "name": "d", "workflow_run_id": "r1"}),
            )
            .to_request(),
        )
        .await;
        assert_eq!(r.json["status"], status);
        assert_eq!(
            m.store_calls("etcd", "txn") - txn0,
            1,
            "{action}: one transaction"
        );
        assert_eq!(
            m.store_calls("etcd", "get") - get0,
            0,
            "{action}: no read before the write"
        );
        assert_eq!(
            etcd.grpc_calls("Txn") - etcd_txn0,
            1,
            "{action}: etcd saw one Txn"
        );
    }
}
