//! Every branch of the shadow deployable HTTP contract, against memory and etcd.

use std::sync::Arc;
use std::time::Duration;

use actix_web::test::{self, TestRequest};
use resource_plane::adapters::memory::MemoryStore;
use resource_plane::api;
use resource_plane::ports::store::Store;
use serde_json::{json, Value};

use crate::support::{self, get, post, put, send, Etcd};

const BASE: &str = "/api/1.0/int/shadow-deployables";

fn procure(name: &str, run: &str) -> Value {
    json!({"action": "PROCURE", "name": name, "workflow_run_id": run, "workflow_plan": "pre-scaleup-load-test"})
}

fn release(name: &str, run: &str) -> Value {
    json!({"action": "RELEASE", "name": name, "workflow_run_id": run})
}

fn pods(action: &str, count: i64, name: &str, run: &str) -> Value {
    json!({"action": action, "count": count, "name": name, "workflow_run_id": run, "workflow_task_id": "t1"})
}

async fn index_revision(store: &dyn Store, name: &str) -> i64 {
    support::in_use_index(store, name)
        .await
        .map_or(0, |kv| kv.mod_revision)
}

/// Runs the whole contract on a fresh service over `store`.
async fn contract_suite(store: Arc<dyn Store>) {
    let svc = support::service(support::config(), store.clone()).await;
    let app = test::init_service(api::app(svc.state.clone())).await;

    // environments
    let r = send(&app, get("/api/1.0/dev/shadow-deployables").to_request()).await;
    assert_eq!(r.status, 400);
    assert!(r.error().contains("unknown environment"), "{}", r.error());

    // register (201), idempotent re-register (200), the typo alias
    let r = send(
        &app,
        put(
            &format!("{BASE}/d1"),
            &json!({"node_pool": "p1", "dns": "d1.example"}),
        )
        .to_request(),
    )
    .await;
    assert_eq!(
        (r.status, r.json["status"].as_str()),
        (201, Some("CREATED"))
    );
    let r = send(
        &app,
        put(
            &format!("{BASE}/d1"),
            &json!({"node_pool": "p1", "dns": "d1.example"}),
        )
        .to_request(),
    )
    .await;
    assert_eq!(r.status, 200);
    let r = send(
        &app,
        put(
            &format!("{BASE}/d2"),
            &json!({"node_pool": "p2", "dns": "d2.example"}),
        )
        .to_request(),
    )
    .await;
    assert_eq!(r.status, 201);
    let r = send(
        &app,
        put(
            "/api/1.0/int/shadow-deploybles/d0",
            &json!({"node_pool": "p2", "dns": "d0.example"}),
        )
        .to_request(),
    )
    .await;
    assert_eq!(r.status, 201);
    assert_eq!(
        support::in_use_index_value(store.as_ref(), "d1")
            .await
            .as_deref(),
        Some("false")
    );

    // list: sorted, exact fields
    let r = send(&app, get(BASE).to_request()).await;
    assert_eq!(r.status, 200);
    let names: Vec<&str> = r.json["data"]
        .as_array()
        .map(|a| a.iter().filter_map(|d| d["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(names, vec!["d0", "d1", "d2"]);
    let first = &r.json["data"][1];
    let mut fields: Vec<&str> = first
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    fields.sort_unstable();
    assert_eq!(
        fields,
        vec![
            "deployment",
            "dns",
            "hpa",
            "in_use",
            "lease_expires_at",
            "min_pod_count",
            "name",
            "node_pool",
            "owner",
            "pod_count",
            "state",
            "version"
        ]
    );
    assert_eq!(first["state"], "FREE");
    // no mapping registered: the Deployment and HPA carry the deployable's name
    assert_eq!(
        (&first["deployment"], &first["hpa"]),
        (&json!("d1"), &json!("d1"))
    );
    assert_eq!(first["in_use"], false);
    assert_eq!(first["owner"], Value::Null);

    // filters, case-insensitive env, bad in_use
    let r = send(
        &app,
        get("/api/1.0/INT/shadow-deployables?in_use=false&node_pool=p2").to_request(),
    )
    .await;
    assert_eq!(r.json["data"].as_array().map(Vec::len), Some(2));
    let r = send(&app, get(&format!("{BASE}?in_use=maybe")).to_request()).await;
    assert_eq!(r.status, 400);
    assert!(r.error().contains("in_use"), "{}", r.error());
    let r = send(&app, get(&format!("{BASE}?colour=red")).to_request()).await;
    assert_eq!(r.status, 400);

    // procure
    let r = send(&app, post(BASE, &procure("d1", "r1")).to_request()).await;
    assert_eq!(
        (r.status, r.raw.as_slice()),
        (200, br#"{"status":"PROCURED"}"#.as_slice())
    );
    assert_eq!(
        support::in_use_index_value(store.as_ref(), "d1")
            .await
            .as_deref(),
        Some("true")
    );
    let r = send(&app, get(&format!("{BASE}?in_use=true")).to_request()).await;
    let d1 = &r.json["data"][0];
    assert_eq!(
        (d1["name"].as_str(), d1["version"].as_u64()),
        (Some("d1"), Some(1))
    );
    assert_eq!(d1["owner"]["workflow_run_id"], "r1");
    assert_eq!(d1["owner"]["workflow_plan"], "pre-scaleup-load-test");
    assert!(d1["owner"]["procured_at"].is_string());

    // held by another run -> FAILED with delay; by the same run -> PROCURED, no change
    let r = send(&app, post(BASE, &procure("d1", "r2")).to_request()).await;
    assert_eq!(
        (r.status, r.json.clone()),
        (200, json!({"status": "FAILED", "delay": 300}))
    );
    let r = send(&app, post(BASE, &procure("d1", "r1")).to_request()).await;
    assert_eq!(r.json, json!({"status": "PROCURED"}));
    let r = send(&app, get(&format!("{BASE}?in_use=true")).to_request()).await;
    assert_eq!(r.json["data"][0]["version"], 1);

    // min pod count: owner only, floors at 0, alias path, validation; the in-use
    // index, true before and after, is not written again
    let index_rev = index_revision(store.as_ref(), "d1").await;
    let r = send(
        &app,
        post(
            &format!("{BASE}/min-pod-count"),
            &pods("INCREASE", 4, "d1", "r2"),
        )
        .to_request(),
    )
    .await;
    assert_eq!(r.status, 409);
    let r = send(
        &app,
        post(
            &format!("{BASE}/min-pod-count"),
            &pods("INCREASE", 4, "d1", "r1"),
        )
        .to_request(),
    )
    .await;
    assert_eq!(r.json, json!({"status": "UPDATED", "min_pod_count": 4}));
    let r = send(
        &app,
        post(
            &format!("{BASE}/min-pod-count"),
            &pods("DECREASE", 10, "d1", "r1"),
        )
        .to_request(),
    )
    .await;
    assert_eq!(r.json, json!({"status": "UPDATED", "min_pod_count": 0}));
    let r = send(
        &app,
        post(
            "/api/1.0/int/shadow-deploybles/min-pod-count",
            &pods("INCREASE", 3, "d1", "r1"),
        )
        .to_request(),
    )
    .await;
    assert_eq!(r.json, json!({"status": "UPDATED", "min_pod_count": 3}));
    assert_eq!(
        index_revision(store.as_ref(), "d1").await,
        index_rev,
        "a min-pod-count change rewrote the unchanged in-use index"
    );
    let r = send(&app, get(&format!("{BASE}?in_use=true")).to_request()).await;
    assert_eq!(r.json["data"][0]["min_pod_count"], 3);
    // `pod_count` is the deprecated alias, kept for one release with the same value.
    assert_eq!(r.json["data"][0]["pod_count"], 3);
    let r = send(
        &app,
        post(
            &format!("{BASE}/min-pod-count"),
            &pods("INCREASE", -1, "d1", "r1"),
        )
        .to_request(),
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(r.error().contains("count"), "{}", r.error());
    let r = send(
        &app,
        post(
            &format!("{BASE}/min-pod-count"),
            &json!({"action": "INCREASE", "name": "d1", "workflow_run_id": "r1"}),
        )
        .to_request(),
    )
    .await;
    assert_eq!(r.status, 400);
    let r = send(
        &app,
        post(
            &format!("{BASE}/min-pod-count"),
            &pods("INCREASE", 1, "d2", "r1"),
        )
        .to_request(),
    )
    .await;
    assert_eq!(r.status, 409, "d2 is FREE: {}", r.error());

    // release: owner only; delete refused while procured
    let r = send(&app, post(BASE, &release("d1", "r2")).to_request()).await;
    assert_eq!(r.status, 409);
    assert!(r.error().contains("another workflow run"), "{}", r.error());
    let r = send(
        &app,
        TestRequest::delete()
            .uri(&format!("{BASE}/d1"))
            .to_request(),
    )
    .await;
    assert_eq!(r.status, 409);
    let r = send(&app, post(BASE, &release("d1", "r1")).to_request()).await;
    assert_eq!(
        (r.status, r.json.clone()),
        (200, json!({"status": "RELEASED"}))
    );
    assert_eq!(
        support::in_use_index_value(store.as_ref(), "d1")
            .await
            .as_deref(),
        Some("false")
    );
    let r = send(&app, get(&format!("{BASE}?node_pool=p1")).to_request()).await;
    let d1 = &r.json["data"][0];
    assert_eq!(
        (
            d1["state"].as_str(),
            d1["min_pod_count"].as_u64(),
            d1["pod_count"].as_u64(),
            d1["owner"].is_null()
        ),
        (Some("FREE"), Some(0), Some(0), true)
    );
    assert!(d1["version"].as_u64().unwrap_or(0) > 1);
    let r = send(&app, post(BASE, &release("d1", "r1")).to_request()).await;
    assert_eq!(r.status, 409, "releasing a FREE deployable");

    // unknown name
    let r = send(&app, post(BASE, &procure("nope", "r1")).to_request()).await;
    assert_eq!(r.status, 404);

    // hostile bodies: each names its problem
    let mut unknown = procure("d1", "r1");
    unknown["colour"] = json!("red");
    let r = send(&app, post(BASE, &unknown).to_request()).await;
    assert_eq!(r.status, 400);
    assert!(r.error().contains("colour"), "{}", r.error());
    let r = send(
        &app,
        post(
            BASE,
            &json!({"action": "PROCURE", "name": 5, "workflow_run_id": "r"}),
        )
        .to_request(),
    )
    .await;
    assert_eq!(r.status, 400);
    let r = send(
        &app,
        post(BASE, &json!({"action": "PROCURE", "name": "d1"})).to_request(),
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(r.error().contains("workflow_run_id"), "{}", r.error());
    let r = send(
        &app,
        post(
            BASE,
            &json!({"action": "BORROW", "name": "d1", "workflow_run_id": "r"}),
        )
        .to_request(),
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(r.error().contains("BORROW"), "{}", r.error());
    let r = send(
        &app,
        post(
            BASE,
            &json!({"action": "PROCURE", "name": "../x", "workflow_run_id": "r"}),
        )
        .to_request(),
    )
    .await;
    assert_eq!(r.status, 400);
    let r = send(
        &app,
        TestRequest::post()
            .uri(BASE)
            .insert_header(("content-type", "text/plain"))
            .set_payload("{}")
            .to_request(),
    )
    .await;
    assert_eq!(r.status, 415);
    let big = format!(
        "{{\"action\":\"PROCURE\",\"name\":\"{}\",\"workflow_run_id\":\"r\"}}",
        "x".repeat(1024 * 1024)
    );
    let r = send(
        &app,
        TestRequest::post()
            .uri(BASE)
            .insert_header(("content-type", "application/json"))
            .set_payload(big)
            .to_request(),
    )
    .await;
    assert_eq!(r.status, 413);
    let r = send(
        &app,
        TestRequest::post()
            .uri(BASE)
            .insert_header(("content-type", "application/json"))
            .set_payload(vec![b'{', 0xff, 0xfe, b'}'])
            .to_request(),
    )
    .await;
    assert_eq!(r.status, 400);
    let r = send(
        &app,
        TestRequest::post()
            .uri(BASE)
            .insert_header(("content-type", "application/json"))
            .set_payload("[1,2]")
            .to_request(),
    )
    .await;
    assert_eq!(r.status, 400);
    let r = send(
        &app,
        TestRequest::post()
            .uri(BASE)
            .insert_header(("content-type", "application/json"))
            .set_payload("{\"action\":")
            .to_request(),
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(r.json["error"].is_string());
    // nothing above changed d1
    let r = send(&app, get(&format!("{BASE}?node_pool=p1")).to_request()).await;
    assert_eq!(r.json["data"][0]["state"], "FREE");

    // delete
    let r = send(
        &app,
        TestRequest::delete()
            .uri(&format!("{BASE}/d0"))
            .to_request(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        support::in_use_index_value(store.as_ref(), "d0").await,
        None
    );
    let r = send(
        &app,
        TestRequest::delete()
            .uri(&format!("{BASE}/d0"))
            .to_request(),
    )
    .await;
    assert_eq!(r.status, 404);
    let ok = support::eventually(Duration::from_secs(5), || async {
        let r = send(&app, get(BASE).to_request()).await;
        r.json["data"].as_array().map(Vec::len) == Some(2)
    })
    .await;
    assert!(ok, "deleted deployable still listed");

    // method and route fallbacks
    let r = send(&app, TestRequest::patch().uri(BASE).to_request()).await;
    assert_eq!(r.status, 405);
    assert!(r.json["error"].is_string());
    let r = send(&app, get("/api/1.0/int/nothing-here").to_request()).await;
    assert_eq!(r.status, 404);
    assert!(r.json["error"].is_string());

    // health, metrics, request ids
    assert_eq!(send(&app, get("/health").to_request()).await.status, 200);
    assert_eq!(
        send(&app, get("/health/self").to_request()).await.status,
        200
    );
    let r = send(&app, get("/health/ready").to_request()).await;
    assert_eq!((r.status, r.json["hydrated"].as_bool()), (200, Some(true)));
    let r = send(&app, get("/metrics").to_request()).await;
    let text = String::from_utf8_lossy(&r.raw).into_owned();
    assert!(text.contains("http_requests_total"), "{text}");
    assert!(text.contains("entity_transitions_total"), "{text}");
    assert!(text.contains("store_call_duration_seconds"), "{text}");
    let r = send(
        &app,
        get("/health")
            .insert_header(("x-request-id", "req-abc-1"))
            .to_request(),
    )
    .await;
    assert_eq!(
        r.headers.get("x-request-id").and_then(|v| v.to_str().ok()),
        Some("req-abc-1")
    );
    let r = send(&app, get("/health").to_request()).await;
    assert_eq!(r.headers.get("x-request-id").map(|v| v.len()), Some(36));

    // introspection
    let r = send(&app, get("/api/1.0/actors").to_request()).await;
    let actors = r.json["data"].as_array().cloned().unwrap_or_default();
    let a = actors
        .iter()
        .find(|a| a["id"] == "int/d1")
        .cloned()
        .unwrap_or_default();
    assert_eq!(a["kind"], "shadow-deployable");
    assert_eq!(a["state"], "FREE");
    assert!(a["mod_revision"].as_i64().unwrap_or(0) > 0);
    assert!(a["last_transition_at"].is_string());
    for f in ["mailbox_depth", "restarts", "version"] {
        assert!(a[f].is_u64() || a[f].is_i64(), "{f} missing in {a}");
    }
    let r = send(
        &app,
        get("/api/1.0/actors/shadow-deployable/int/d1").to_request(),
    )
    .await;
    assert_eq!((r.status, r.json["id"].as_str()), (200, Some("int/d1")));
    let r = send(
        &app,
        get("/api/1.0/actors/shadow-deployable/int/zzz").to_request(),
    )
    .await;
    assert_eq!(r.status, 404);
}

#[actix_web::test]
async fn contract_against_memory_store() {
    contract_suite(Arc::new(MemoryStore::new())).await;
}

#[actix_web::test]
async fn contract_against_real_etcd() {
    let etcd = Etcd::start();
    contract_suite(etcd.store(&support::unique_prefix())).await;
}

#[actix_web::test]
async fn auth_guards_every_api_route_but_not_probes() {
    let mut cfg = support::config();
    cfg.api_token = Some(resource_plane::config::Secret::new("s3cret-token"));
    let svc = support::service(cfg, Arc::new(MemoryStore::new())).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    for path in [
        BASE,
        "/api/1.0/actors",
        "/api/1.0/dev/shadow-deployables",
        "/api/1.0/nothing",
    ] {
        let r = send(&app, get(path).to_request()).await;
        assert_eq!(r.status, 401, "{path} without a token");
        assert!(r.json["error"].is_string());
        let r = send(
            &app,
            get(path)
                .insert_header(("authorization", "Bearer wrong"))
                .to_request(),
        )
        .await;
        assert_eq!(r.status, 401, "{path} with a wrong token");
    }
    let r = send(&app, post(BASE, &procure("d1", "r1")).to_request()).await;
    assert_eq!(r.status, 401);
    let r = send(
        &app,
        get(BASE)
            .insert_header(("authorization", "Bearer s3cret-token"))
            .to_request(),
    )
    .await;
    assert_eq!(r.status, 200);
    for path in ["/health", "/health/ready", "/health/self", "/metrics"] {
        assert_eq!(
            send(&app, get(path).to_request()).await.status,
            200,
            "{path}"
        );
    }
}

#[actix_web::test]
async fn seeding_creates_missing_records_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let seed = dir.path().join("seed.yaml");
    std::fs::write(&seed, "int:\n  - name: s1\n    node_pool: p\n    dns: s1.example\n  - name: s2\n    node_pool: p\n    dns: s2.example\n    deployment: s2-deploy\n    hpa: s2-hpa\n")
        .unwrap_or_else(|e| panic!("{e}"));
    let mut cfg = support::config();
    cfg.seed_file = Some(seed.clone());
    cfg.seed_file_explicit = true;
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let svc = support::service(cfg.clone(), store.clone()).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    let listed = || async {
        let r = send(&app, get(BASE).to_request()).await;
        r.json["data"].as_array().map(Vec::len) == Some(2)
    };
    assert!(support::eventually(Duration::from_secs(5), listed).await);
    let r = send(&app, post(BASE, &procure("s1", "r1")).to_request()).await;
    assert_eq!(r.json["status"], "PROCURED");
    // a seed entry may map its Deployment and HPA; without, they carry its name
    let r = send(&app, get(BASE).to_request()).await;
    let mapping = |i: usize| {
        let d = &r.json["data"][i];
        (d["deployment"].clone(), d["hpa"].clone())
    };
    assert_eq!(mapping(0), (json!("s1"), json!("s1")));
    assert_eq!(mapping(1), (json!("s2-deploy"), json!("s2-hpa")));

    // a second instance seeding the same store leaves s1 procured
    let svc2 = support::service(cfg.clone(), store.clone()).await;
    let app2 = test::init_service(api::app(svc2.state.clone())).await;
    let r = send(&app2, get(&format!("{BASE}?in_use=true")).to_request()).await;
    assert_eq!(r.json["data"][0]["owner"]["workflow_run_id"], "r1");

    // a seed naming an environment outside RM_ENVS is refused at start-up
    std::fs::write(
        &seed,
        "staging:\n  - name: s1\n    node_pool: p\n    dns: x\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(resource_plane::app::load_seed(&cfg).is_err());
    std::fs::write(
        &seed,
        "int:\n  - name: s1\n    node_pool: p\n    dns: x\n    extra: 1\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let e = resource_plane::app::load_seed(&cfg).expect_err("unknown key");
    assert!(e.to_string().contains("extra"), "{e}");
    std::fs::write(
        &seed,
        "int:\n  - name: s1\n    node_pool: p\n    dns: x\n    hpa: Not_A_Name\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let e = resource_plane::app::load_seed(&cfg).expect_err("bad hpa name");
    assert!(e.to_string().contains("Not_A_Name"), "{e}");
}

/// A prefix holding more than one gRPC message can carry (4 MiB by default: 100,000
/// shadow deployables are about 25 MB) still lists whole and consistent: before, the
/// service could not hydrate such a fleet ("decoded message length too large").
#[actix_web::test]
async fn a_listing_larger_than_one_grpc_message_comes_whole_from_real_etcd() {
    let etcd = Etcd::start();
    let store = etcd.store(&support::unique_prefix());
    let value = vec![b'x'; 100 * 1024];
    let n = 60; // 6 MB in all
    for i in 0..n {
        let r = store
            .txn(resource_plane::ports::store::Txn {
                compares: vec![],
                success: vec![resource_plane::ports::store::Op::Put {
                    key: format!("/big/{i:03}"),
                    value: value.clone(),
                    lease: None,
                }],
                failure_gets: vec![],
            })
            .await
            .unwrap_or_else(|e| panic!("put {i}: {e}"));
        assert!(r.succeeded);
    }
    // a neighbour prefix that must not be listed
    let r = store
        .txn(resource_plane::ports::store::Txn {
            compares: vec![],
            success: vec![resource_plane::ports::store::Op::Put {
                key: "/bigger".into(),
                value: b"no".to_vec(),
                lease: None,
            }],
            failure_gets: vec![],
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (kvs, rev) = store
        .list("/big/")
        .await
        .unwrap_or_else(|e| panic!("list: {e}"));
    assert_eq!(kvs.len(), n, "every record, once");
    let keys: Vec<String> = kvs.iter().map(|kv| kv.key.clone()).collect();
    let want: Vec<String> = (0..n).map(|i| format!("/big/{i:03}")).collect();
    assert_eq!(keys, want, "in key order, none from a neighbour prefix");
    assert!(kvs.iter().all(|kv| kv.value.len() == value.len()));
    assert_eq!(rev, r.revision, "the revision the listing was read at");

    // more keys than two pages of the listing (2,000 each), put 100 per transaction
    let m = 4_321;
    for chunk in (0..m).collect::<Vec<usize>>().chunks(100) {
        let r = store
            .txn(resource_plane::ports::store::Txn {
                compares: vec![],
                success: chunk
                    .iter()
                    .map(|i| resource_plane::ports::store::Op::Put {
                        key: format!("/many/{i:05}"),
                        value: i.to_string().into_bytes(),
                        lease: None,
                    })
                    .collect(),
                failure_gets: vec![],
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(r.succeeded);
    }
    let (kvs, _) = store
        .list("/many/")
        .await
        .unwrap_or_else(|e| panic!("list: {e}"));
    let got: Vec<String> = kvs.iter().map(|kv| kv.key.clone()).collect();
    let want: Vec<String> = (0..m).map(|i| format!("/many/{i:05}")).collect();
    assert_eq!(got, want, "every key once, in order, across pages");

    // the same listing handed over page by page as the pages arrive
    let mut pages: Vec<Vec<String>> = Vec::new();
    let each_rev = store
        .list_each("/many/", &mut |kvs| {
            pages.push(kvs.into_iter().map(|kv| kv.key).collect())
        })
        .await
        .unwrap_or_else(|e| panic!("list_each: {e}"));
    assert!(pages.len() >= 3, "{} pages for {m} keys", pages.len());
    assert!(pages.iter().all(|p| !p.is_empty() && p.len() <= 2_000));
    assert_eq!(
        pages.concat(),
        want,
        "every key once, in order, page by page"
    );
    let (_, list_rev) = store
        .list("/many/")
        .await
        .unwrap_or_else(|e| panic!("list: {e}"));
    assert_eq!(each_rev, list_rev, "both read at the current revision");
}
