//! `GET /api/1.0/{env}/operations`: an environment's watch intents, paged (`limit` and
//! an opaque `continue`) in request id order, with a `status` filter, on a real etcd;
//! and the store's bounded range read (`Store::list_after`) that serves a page without
//! reading every intent.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use actix_web::test::{self, TestRequest};
use resource_plane::adapters::memory::MemoryStore;
use resource_plane::api;
use resource_plane::config::Secret;
use resource_plane::ports::store::{Op, Store, Txn};
use serde_json::{json, Value};

use crate::support::{self, get, send, Etcd, TestApp};

/// A finished intent of `env` as the service stores it (its callback delivered, so no
/// replica acts on it), with one recorded callback attempt and secrets in its callback.
fn intent(id: &str, env: &str, status: &str) -> Value {
    let now = chrono::Utc::now();
    json!({
        "schema_version": "v1", "request_id": id, "env": env, "operation": "TRIGGER_JOB",
        "resource": {"kind": "Job", "namespace": env, "label_selector": format!("name={id}"), "name": id},
        "desired_condition": "JobComplete", "baselines": [],
        "callback": {"url": "https://hooks.example.com/cb?token=s3cr3t-query", "method": "POST",
            "headers": {"authorization": "Bearer s3cr3t-header"}},
        "workflow": {"run_id": format!("run-{id}"), "plan": null, "task_id": null},
        "created_at": now.to_rfc3339(), "deadline": (now + chrono::Duration::seconds(600)).to_rfc3339(),
        "status": status, "observed_at": now.to_rfc3339(), "detail": null,
        "delivery": {"webhook_id": format!("msg_{id}"), "delivered": true, "gave_up": false,
            "next_attempt_at": null,
            "attempts": [{"attempt": 1, "at": now.to_rfc3339(), "outcome": "delivered", "status": 204, "error": null}]},
        "submission": {"type": "CREATE_JOB", "spec": {"job_name": id, "namespace": env,
            "image": "x", "payload": {"secret": "s3cr3t-payload"}, "request_id": id}}
    })
}

/// Puts raw records, one transaction each.
async fn put_all(store: &dyn Store, records: &[(String, Vec<u8>)]) {
    for (key, value) in records {
        let r = store
            .txn(Txn {
                compares: vec![],
                success: vec![Op::Put {
                    key: key.clone(),
                    value: value.clone(),
                    lease: None,
                }],
                failure_gets: vec![],
            })
            .await;
        assert!(r.is_ok_and(|r| r.succeeded), "put {key}");
    }
}

/// Stores `n` intents of `env`, statuses taken in turn from `statuses`: id -> status.
async fn store_intents(
    store: &dyn Store,
    env: &str,
    n: usize,
    statuses: &[&str],
) -> BTreeMap<String, String> {
    let mut made = BTreeMap::new();
    let mut records = Vec::new();
    for i in 0..n {
        let id = format!("op-{}", uuid::Uuid::new_v4().simple());
        let status = statuses[i % statuses.len()];
        let value = serde_json::to_vec(&intent(&id, env, status)).unwrap_or_default();
        records.push((format!("/watch-intents/{id}"), value));
        made.insert(id, status.to_owned());
    }
    put_all(store, &records).await;
    made
}

/// Follows `continue` from the first page of `path` (a query may follow `?`): every
/// page's entries, in the order served, and how many pages there were.
async fn walk<A: TestApp>(app: &A, path: &str, limit: usize) -> (Vec<Value>, usize) {
    let sep = if path.contains('?') { '&' } else { '?' };
    let mut cont: Option<String> = None;
    let mut all = Vec::new();
    for pages in 1..=1_000 {
        let mut uri = format!("{path}{sep}limit={limit}");
        if let Some(c) = &cont {
            uri.push_str(&format!("&continue={c}"));
        }
        let r = send(app, get(&uri).to_request()).await;
        assert_eq!(r.status, 200, "{uri}: {r:?}");
        let data = r.json["data"].as_array().cloned().unwrap_or_default();
        assert!(data.len() <= limit, "{uri}: {} entries", data.len());
        all.extend(data);
        match r.json["continue"].as_str() {
            Some(c) => cont = Some(c.to_owned()),
            None => return (all, pages),
        }
    }
    panic!("{path}: no last page after 1000 pages");
}

fn ids(entries: &[Value]) -> Vec<String> {
    entries
        .iter()
        .map(|e| e["request_id"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[actix_web::test]
async fn operation_pages_return_every_intent_of_the_env_once_in_request_id_order() {
    let etcd = Etcd::start();
    let prefix = support::unique_prefix();
    let store = etcd.store(&prefix);
    let int = store_intents(
        store.as_ref(),
        "int",
        23,
        &["SUCCEEDED", "FAILED", "TIMED_OUT"],
    )
    .await;
    let prod = store_intents(store.as_ref(), "prod", 11, &["SUCCEEDED"]).await;
    let svc = support::service(support::config(), store).await;
    let app = test::init_service(api::app(svc.state.clone())).await;

    for limit in [1, 4, 23, 100] {
        let (entries, pages) = walk(&app, "/api/1.0/int/operations", limit).await;
        let got = ids(&entries);
        let want: Vec<String> = int.keys().cloned().collect();
        assert_eq!(
            got, want,
            "limit {limit}: every int intent once, by request id"
        );
        assert!(
            pages >= 23usize.div_ceil(limit),
            "limit {limit}: {pages} pages"
        );
    }
    let (entries, _) = walk(&app, "/api/1.0/prod/operations", 5).await;
    assert_eq!(
        ids(&entries),
        prod.keys().cloned().collect::<Vec<_>>(),
        "prod lists only its own"
    );
    // An env's name is matched as the other env routes match it.
    let (entries, _) = walk(&app, "/api/1.0/PROD/operations", 50).await;
    assert_eq!(ids(&entries).len(), prod.len());

    // Each entry is what the single GET shows: redacted, without the stored action.
    let (entries, _) = walk(&app, "/api/1.0/int/operations", 50).await;
    let first = &entries[0];
    let id = first["request_id"].as_str().unwrap_or_default();
    let one = send(
        &app,
        get(&format!("/api/1.0/int/operations/{id}")).to_request(),
    )
    .await;
    assert_eq!(&one.json, first);
    let text = Value::Array(entries.clone()).to_string();
    assert!(!text.contains("s3cr3t"), "{text}");
    assert!(first.get("submission").is_none(), "{first}");
    assert_eq!(first["delivery"]["attempts"][0]["status"], 204);
    assert_eq!(first["status"], json!(int[id]));

    // A token of one env's walk does not leak another env's intents.
    let r = send(&app, get("/api/1.0/int/operations?limit=2").to_request()).await;
    let token = r.json["continue"].as_str().unwrap_or_default().to_owned();
    let r = send(
        &app,
        get(&format!(
            "/api/1.0/prod/operations?limit=100&continue={token}"
        ))
        .to_request(),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        ids(r.json["data"].as_array().map_or(&[][..], |a| a.as_slice()))
            .iter()
            .all(|i| prod.contains_key(i)),
        "{r:?}"
    );
    svc.shutdown().await;
}

#[actix_web::test]
async fn the_status_filter_pages_only_intents_in_that_status() {
    let etcd = Etcd::start();
    let prefix = support::unique_prefix();
    let store = etcd.store(&prefix);
    let int = store_intents(
        store.as_ref(),
        "int",
        20,
        &["SUCCEEDED", "SUCCEEDED", "SUCCEEDED", "FAILED"],
    )
    .await;
    store_intents(store.as_ref(), "prod", 6, &["FAILED"]).await;
    let svc = support::service(support::config(), store).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    for status in ["FAILED", "SUCCEEDED", "TIMED_OUT"] {
        let want: Vec<String> = int
            .iter()
            .filter(|(_, s)| *s == status)
            .map(|(id, _)| id.clone())
            .collect();
        let (entries, _) = walk(&app, &format!("/api/1.0/int/operations?status={status}"), 2).await;
        assert_eq!(ids(&entries), want, "{status}");
        assert!(entries.iter().all(|e| e["status"] == status), "{status}");
    }
    svc.shutdown().await;
}

#[actix_web::test]
async fn bad_operation_list_parameters_are_400_json_and_no_token_is_401() {
    let mut cfg = support::config();
    cfg.api_token = Some(Secret::new("list-token"));
    let svc = support::service(cfg, Arc::new(MemoryStore::new())).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    let shadow_token = resource_plane::api::paging::token("shadow-deployables", "d-01");
    let authed = |uri: &str| {
        TestRequest::get()
            .uri(uri)
            .insert_header(("Authorization", "Bearer list-token"))
            .to_request()
    };
    let r = send(&app, authed("/api/1.0/int/operations")).await;
    assert_eq!(
        (r.status, r.json.clone()),
        (200, json!({"data": []})),
        "{r:?}"
    );
    for q in [
        "limit=0".to_owned(),
        "limit=10001".to_owned(),
        "limit=-1".to_owned(),
        "limit=ten".to_owned(),
        "continue=%%%".to_owned(),
        "continue=".to_owned(),
        "continue=bm90LWEtdG9rZW4".to_owned(),
        format!("continue={shadow_token}"),
        // a well-formed token whose key is no request id
        format!(
            "continue={}",
            resource_plane::api::paging::token("operations", "../x")
        ),
        "status=DONE".to_owned(),
        "status=succeeded".to_owned(),
        "status=".to_owned(),
        "stat=FAILED".to_owned(),
    ] {
        let r = send(&app, authed(&format!("/api/1.0/int/operations?{q}"))).await;
        assert_eq!(r.status, 400, "{q}: {r:?}");
        assert!(!r.error().is_empty(), "{q}: {r:?}");
    }
    let r = send(&app, authed("/api/1.0/nowhere/operations")).await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.error().contains("unknown environment"), "{}", r.error());
    let r = send(&app, get("/api/1.0/int/operations").to_request()).await;
    assert_eq!(r.status, 401, "{r:?}");
    assert!(!r.error().is_empty(), "{r:?}");
    let r = send(
        &app,
        TestRequest::get()
            .uri("/api/1.0/int/operations")
            .insert_header(("Authorization", "Bearer wrong"))
            .to_request(),
    )
    .await;
    assert_eq!(r.status, 401, "{r:?}");
    let r = send(
        &app,
        TestRequest::post()
            .uri("/api/1.0/int/operations")
            .insert_header(("Authorization", "Bearer list-token"))
            .to_request(),
    )
    .await;
    assert_eq!(r.status, 405, "{r:?}");
    svc.shutdown().await;
}

/// Keys `/k/000`..`/k/{n-1}` plus neighbours just outside the prefix.
async fn fill(store: &dyn Store, n: usize) -> Vec<String> {
    let keys: Vec<String> = (0..n).map(|i| format!("/k/{i:04}")).collect();
    let mut records: Vec<(String, Vec<u8>)> =
        keys.iter().map(|k| (k.clone(), b"v".to_vec())).collect();
    for outside in ["/j/9999", "/k", "/k0/0000", "/l/0000"] {
        records.push((outside.to_owned(), b"x".to_vec()));
    }
    put_all(store, &records).await;
    keys
}

/// Pages through `/k/` with `list_after`: every key once, in order.
async fn walk_store(store: &dyn Store, limit: usize) -> Vec<String> {
    let mut after: Option<String> = None;
    let mut seen = Vec::new();
    loop {
        let (kvs, more) = store
            .list_after("/k/", after.as_deref(), limit)
            .await
            .unwrap_or_else(|e| panic!("list_after: {e}"));
        assert!(kvs.len() <= limit);
        seen.extend(kvs.iter().map(|kv| kv.key.clone()));
        if !more {
            return seen;
        }
        after = kvs.last().map(|kv| kv.key.clone());
        assert!(after.is_some(), "more with an empty page");
    }
}

async fn range_reads_page_exactly(store: &dyn Store) {
    let keys = fill(store, 30).await;
    for limit in [1, 7, 30, 31, 500] {
        assert_eq!(walk_store(store, limit).await, keys, "limit {limit}");
    }
    let page = |after: Option<&'static str>, limit| async move {
        let (kvs, more) = store
            .list_after("/k/", after, limit)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        (kvs.into_iter().map(|kv| kv.key).collect::<Vec<_>>(), more)
    };
    assert_eq!(page(Some("/k/0027"), 5).await, (keys[28..].to_vec(), false));
    assert_eq!(
        page(Some("/k/0026"), 3).await,
        (keys[27..30].to_vec(), false)
    );
    assert_eq!(
        page(Some("/k/0025"), 3).await,
        (keys[26..29].to_vec(), true)
    );
    // not a key that exists: from the next one
    assert_eq!(page(Some("/k/0003x"), 2).await, (keys[4..6].to_vec(), true));
    // before the prefix: from its start; past it: nothing
    assert_eq!(page(Some("/a"), 2).await, (keys[0..2].to_vec(), true));
    assert_eq!(page(Some("/k/0029"), 2).await, (vec![], false));
    assert_eq!(page(Some("/z"), 2).await, (vec![], false));
    let set: BTreeSet<String> = walk_store(store, 4).await.into_iter().collect();
    assert_eq!(set.len(), 30, "no neighbour outside the prefix");
}

#[actix_web::test]
async fn store_range_reads_page_a_prefix_alike_on_etcd_and_in_memory() {
    let etcd = Etcd::start();
    range_reads_page_exactly(etcd.store(&support::unique_prefix()).as_ref()).await;
    range_reads_page_exactly(&MemoryStore::new()).await;
}

#[actix_web::test]
async fn a_page_from_etcd_is_one_bounded_range_read_whatever_the_number_of_keys() {
    let etcd = Etcd::start();
    let store = etcd.store(&support::unique_prefix());
    // More than one page of a full listing (2,000 keys per Range).
    let keys = fill(store.as_ref(), 4_500).await;
    let ranges = || etcd.grpc_calls("Range");
    let before = ranges();
    let (kvs, more) = store
        .list_after("/k/", Some(&keys[600]), 10)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ranges() - before, 1, "one Range for a page of 10");
    assert!(more);
    assert_eq!(
        kvs.iter().map(|kv| kv.key.as_str()).collect::<Vec<_>>(),
        keys[601..611]
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
    );
    let before = ranges();
    let _ = store.list("/k/").await;
    assert_eq!(
        ranges() - before,
        3,
        "a full listing reads 2,000 keys a Range"
    );
}

#[actix_web::test]
async fn a_page_reads_a_bounded_range_and_continues_past_other_envs_intents() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    // 1,100 intents of prod sort before the two of int.
    let mut records = Vec::new();
    for i in 0..1_100 {
        let id = format!("op-a{i:05}");
        records.push((
            format!("/watch-intents/{id}"),
            serde_json::to_vec(&intent(&id, "prod", "SUCCEEDED")).unwrap_or_default(),
        ));
    }
    for id in ["op-z1", "op-z2"] {
        records.push((
            format!("/watch-intents/{id}"),
            serde_json::to_vec(&intent(id, "int", "FAILED")).unwrap_or_default(),
        ));
    }
    put_all(store.as_ref(), &records).await;
    let svc = support::service(support::config(), store).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    let first = send(&app, get("/api/1.0/int/operations?limit=1").to_request()).await;
    // The first page stops reading before it reaches them: it says so with `continue`.
    assert_eq!(first.json["data"], json!([]), "{:?}", first.json);
    assert!(first.json["continue"].is_string(), "{:?}", first.json);
    let (entries, pages) = walk(&app, "/api/1.0/int/operations", 1).await;
    assert_eq!(ids(&entries), ["op-z1", "op-z2"]);
    assert!(pages >= 3, "{pages} pages");
    let (entries, _) = walk(&app, "/api/1.0/prod/operations", 10_000).await;
    assert_eq!(entries.len(), 1_100);
    svc.shutdown().await;
}
