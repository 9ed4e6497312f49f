//! Procure by pool (one request instead of list-then-race) and paged lists (`limit` and
//! an opaque `continue` token) of shadow deployables and instances.

use std::collections::HashSet;
use std::sync::Arc;

use actix_web::test::{self, TestRequest};
use futures::future::join_all;
use resource_plane::adapters::memory::MemoryStore;
use resource_plane::api;
use resource_plane::ports::store::Store;
use serde_json::{json, Value};

use crate::support::{self, get, post, put, send, Etcd, TestApp};

const BASE: &str = "/api/1.0/int/shadow-deployables";

fn pool_procure(pool: &str, run: &str) -> Value {
    json!({"action": "PROCURE", "node_pool": pool, "workflow_run_id": run})
}

async fn register<A: TestApp>(app: &A, name: &str, pool: &str) {
    let r = send(
        app,
        put(
            &format!("{BASE}/{name}"),
            &json!({"node_pool": pool, "dns": format!("{name}.example")}),
        )
        .to_request(),
    )
    .await;
    assert!(r.status == 201 || r.status == 200, "register {name}: {r:?}");
}

async fn procure_named<A: TestApp>(app: &A, name: &str, run: &str) {
    let r = send(
        app,
        post(
            BASE,
            &json!({"action": "PROCURE", "name": name, "workflow_run_id": run}),
        )
        .to_request(),
    )
    .await;
    assert_eq!(r.json["status"], "PROCURED", "procure {name}: {r:?}");
}

fn names(r: &Value) -> Vec<String> {
    r["data"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|d| d["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn memory() -> Arc<dyn Store> {
    Arc::new(MemoryStore::new())
}

#[actix_web::test]
async fn pool_procure_picks_a_free_one_of_the_pool_and_fails_when_none() {
    let svc = support::service(support::config(), memory()).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    for n in ["a1", "a2", "a3"] {
        register(&app, n, "a").await;
    }
    register(&app, "b1", "b").await;
    procure_named(&app, "a1", "holder").await;

    let mut got = HashSet::new();
    for i in 0..2 {
        let r = send(
            &app,
            post(BASE, &pool_procure("a", &format!("run-{i}"))).to_request(),
        )
        .await;
        assert_eq!((r.status, &r.json["status"]), (200, &json!("PROCURED")));
        let name = r.json["name"].as_str().unwrap_or_default().to_owned();
        assert!(name == "a2" || name == "a3", "picked {name:?}, never a1");
        assert!(got.insert(name), "a deployable handed out twice");
    }
    let r = send(
        &app,
        post(BASE, &pool_procure("a", "run-late")).to_request(),
    )
    .await;
    assert_eq!(
        (r.status, r.json.clone()),
        (200, json!({"status": "FAILED", "delay": 300}))
    );
    let r = send(&app, post(BASE, &pool_procure("b", "run-b")).to_request()).await;
    assert_eq!(r.json, json!({"status": "PROCURED", "name": "b1"}));
    // the holder is recorded as for a named procure
    let r = send(&app, get(&format!("{BASE}?node_pool=b")).to_request()).await;
    assert_eq!(r.json["data"][0]["owner"]["workflow_run_id"], "run-b");

    // a pool with no deployables at all is unknown
    let r = send(&app, post(BASE, &pool_procure("nope", "r")).to_request()).await;
    assert_eq!(r.status, 404, "{r:?}");
    assert!(r.error().contains("nope"), "{}", r.error());

    // exactly one of name and node_pool
    for body in [
        json!({"action": "PROCURE", "name": "a1", "node_pool": "a", "workflow_run_id": "r"}),
        json!({"action": "PROCURE", "workflow_run_id": "r"}),
        json!({"action": "RELEASE", "node_pool": "a", "workflow_run_id": "r"}),
        json!({"action": "PROCURE", "node_pool": "", "workflow_run_id": "r"}),
    ] {
        let r = send(&app, post(BASE, &body).to_request()).await;
        assert_eq!(r.status, 400, "{body}: {r:?}");
        assert!(!r.error().is_empty());
    }
}

#[actix_web::test]
async fn pool_procure_replay_with_the_same_key_returns_the_same_name() {
    let svc = support::service(support::config(), memory()).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    for n in ["p1", "p2", "p3", "p4"] {
        register(&app, n, "p").await;
    }
    let req = || {
        TestRequest::post()
            .uri(BASE)
            .insert_header(("Idempotency-Key", "pool-key-1"))
            .set_json(pool_procure("p", "run-1"))
            .to_request()
    };
    let first = send(&app, req()).await;
    assert_eq!(first.json["status"], "PROCURED");
    let name = first.json["name"].as_str().unwrap_or_default().to_owned();
    assert!(name.starts_with('p'), "{first:?}");
    // the deployable is released and others are taken meanwhile: the replay still
    // answers the stored reply, it does not pick again
    let r = send(
        &app,
        post(
            BASE,
            &json!({"action": "RELEASE", "name": name, "workflow_run_id": "run-1"}),
        )
        .to_request(),
    )
    .await;
    assert_eq!(r.json["status"], "RELEASED");
    for _ in 0..3 {
        let r = send(&app, req()).await;
        assert_eq!(r.json, first.json, "replay answers the stored reply");
        assert_eq!(
            r.headers
                .get("Idempotent-Replayed")
                .and_then(|v| v.to_str().ok()),
            Some("true")
        );
    }
    // the key with another body is refused, as for named procures
    let r = send(
        &app,
        TestRequest::post()
            .uri(BASE)
            .insert_header(("Idempotency-Key", "pool-key-1"))
            .set_json(pool_procure("p", "run-2"))
            .to_request(),
    )
    .await;
    assert_eq!(r.status, 422, "{r:?}");
}

#[actix_web::test]
async fn sixty_four_pool_procures_across_two_replicas_get_the_eight_free_ones() {
    let etcd = Etcd::start();
    let prefix = support::unique_prefix();
    let a = support::service(support::config(), etcd.store(&prefix)).await;
    let b = support::service(support::config(), etcd.store(&prefix)).await;
    let app_a = test::init_service(api::app(a.state.clone())).await;
    let app_b = test::init_service(api::app(b.state.clone())).await;
    let mut free = HashSet::new();
    for i in 0..10 {
        let name = format!("g{i:02}");
        register(&app_a, &name, "gpu").await;
        if i < 2 {
            procure_named(&app_a, &name, "early").await;
        } else {
            free.insert(name);
        }
    }
    for i in 0..4 {
        register(&app_a, &format!("c{i}"), "cpu").await;
    }
    // both replicas see the held ones as held before the race starts
    let seen = support::eventually(std::time::Duration::from_secs(10), || async {
        let r = send(
            &app_b,
            get(&format!("{BASE}?in_use=false&node_pool=gpu")).to_request(),
        )
        .await;
        names(&r.json).len() == 8
    })
    .await;
    assert!(seen, "replica B never saw the registrations");

    let calls = (0..64).map(|i| {
        let req = post(BASE, &pool_procure("gpu", &format!("run-{i}"))).to_request();
        let (app_a, app_b) = (&app_a, &app_b);
        async move {
            if i % 2 == 0 {
                send(app_a, req).await
            } else {
                send(app_b, req).await
            }
        }
    });
    let results = join_all(calls).await;
    let won: Vec<String> = results
        .iter()
        .filter(|r| r.status == 200 && r.json["status"] == "PROCURED")
        .filter_map(|r| r.json["name"].as_str().map(str::to_owned))
        .collect();
    let failed = results
        .iter()
        .filter(|r| r.status == 200 && r.json == json!({"status": "FAILED", "delay": 300}))
        .count();
    assert_eq!(won.len(), 8, "exactly the 8 free ones: {won:?}");
    assert_eq!(failed, 56, "every other call told to retry");
    let distinct: HashSet<String> = won.into_iter().collect();
    assert_eq!(
        distinct, free,
        "each free one handed out once, never a held one"
    );
}

/// Walks every page of `path` with `limit`, returning the names in the order served.
async fn walk<A: TestApp>(app: &A, path: &str, limit: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    for _ in 0..1000 {
        let sep = if path.contains('?') { '&' } else { '?' };
        let uri = match &token {
            Some(t) => format!("{path}{sep}limit={limit}&continue={t}"),
            None => format!("{path}{sep}limit={limit}"),
        };
        let r = send(app, get(&uri).to_request()).await;
        assert_eq!(r.status, 200, "{uri}: {r:?}");
        let page = names(&r.json);
        assert!(page.len() <= limit);
        out.extend(page);
        match r.json["continue"].as_str() {
            Some(t) => token = Some(t.to_owned()),
            None => return out,
        }
    }
    panic!("paging did not end");
}

#[actix_web::test]
async fn shadow_list_pages_walk_every_entry_once_in_order() {
    let svc = support::service(support::config(), memory()).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    let mut all = Vec::new();
    for i in 0..50 {
        let name = format!("d{i:02}");
        register(&app, &name, if i % 3 == 0 { "x" } else { "y" }).await;
        all.push(name);
    }
    for i in (0..50).step_by(4) {
        procure_named(&app, &format!("d{i:02}"), "r").await;
    }
    assert_eq!(walk(&app, BASE, 7).await, all);
    // the last page carries no token; a page that ends exactly at the end either
    let r = send(&app, get(&format!("{BASE}?limit=50")).to_request()).await;
    assert_eq!(names(&r.json).len(), 50);
    assert!(r.json.get("continue").is_none(), "{}", r.json);

    for (query, keep) in [
        (
            "node_pool=x",
            &(|i: usize| i.is_multiple_of(3)) as &dyn Fn(usize) -> bool,
        ),
        ("in_use=true", &|i: usize| i.is_multiple_of(4)),
        ("in_use=false", &|i: usize| !i.is_multiple_of(4)),
        ("in_use=false&node_pool=y", &|i: usize| {
            !i.is_multiple_of(4) && !i.is_multiple_of(3)
        }),
        ("in_use=true&node_pool=x", &|i: usize| {
            i.is_multiple_of(4) && i.is_multiple_of(3)
        }),
    ] {
        let want: Vec<String> = (0..50)
            .filter(|i| keep(*i))
            .map(|i| format!("d{i:02}"))
            .collect();
        assert_eq!(
            walk(&app, &format!("{BASE}?{query}"), 7).await,
            want,
            "{query}"
        );
        // unpaged, the same entries
        let r = send(&app, get(&format!("{BASE}?{query}")).to_request()).await;
        assert_eq!(names(&r.json), want, "{query}");
    }
}

#[actix_web::test]
async fn a_change_between_pages_neither_duplicates_nor_skips_the_unchanged() {
    let svc = support::service(support::config(), memory()).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    for i in 0..50 {
        register(&app, &format!("d{i:02}"), "p").await;
    }
    let r = send(&app, get(&format!("{BASE}?limit=7")).to_request()).await;
    let mut seen = names(&r.json);
    let mut token = r.json["continue"].as_str().map(str::to_owned);
    // between pages: one behind the cursor changes, one ahead of it is deleted, one is
    // added behind and one ahead
    procure_named(&app, "d03", "r").await;
    let r = send(
        &app,
        TestRequest::delete()
            .uri(&format!("{BASE}/d20"))
            .to_request(),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    register(&app, "d00a", "p").await;
    register(&app, "d30a", "p").await;
    for _ in 0..100 {
        let Some(t) = token.take() else { break };
        let r = send(
            &app,
            get(&format!("{BASE}?limit=7&continue={t}")).to_request(),
        )
        .await;
        assert_eq!(r.status, 200);
        seen.extend(names(&r.json));
        token = r.json["continue"].as_str().map(str::to_owned);
    }
    let mut want: Vec<String> = (0..50)
        .filter(|i| *i != 20)
        .map(|i| format!("d{i:02}"))
        .collect();
    want.push("d30a".into());
    want.sort();
    assert_eq!(seen, want);
}

#[actix_web::test]
async fn bad_paging_parameters_are_400() {
    let svc = support::service(support::config(), memory()).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    register(&app, "d1", "p").await;
    for q in [
        "continue=%%%",
        "continue=bm90LWEtdG9rZW4",
        "continue=",
        "limit=0",
        "limit=10001",
        "limit=-1",
        "limit=seven",
    ] {
        let r = send(&app, get(&format!("{BASE}?{q}")).to_request()).await;
        assert_eq!(r.status, 400, "{q}: {r:?}");
        assert!(!r.error().is_empty(), "{q}");
    }
    for q in ["continue=%%%", "limit=0"] {
        let r = send(&app, get(&format!("/api/1.0/instances?{q}")).to_request()).await;
        assert_eq!(r.status, 400, "instances {q}: {r:?}");
    }
}

#[actix_web::test]
async fn instances_list_filters_by_state_and_worker_and_pages() {
    use resource_plane::domain::worker::{Instance, InstanceState, Resources};
    use resource_plane::keys;
    use resource_plane::ports::store::{Op, Txn};

    let store = memory();
    let states = [
        InstanceState::Pending,
        InstanceState::Scheduled,
        InstanceState::Running,
        InstanceState::Completed,
    ];
    let mut ops = Vec::new();
    for i in 0..20usize {
        let mut inst = Instance::new(
            &format!("i-{i:02}"),
            Resources {
                cpu: 1.0,
                memory_gb: 1.0,
            },
            false,
            chrono::Utc::now(),
        );
        inst.state = states[i % 4];
        if inst.state != InstanceState::Pending {
            inst.worker_id = Some(format!("w-{}", i % 2));
        }
        ops.push(Op::Put {
            key: keys::instance(&inst.id),
            value: serde_json::to_vec(&inst).unwrap_or_default(),
            lease: None,
        });
    }
    let written = store
        .txn(Txn {
            compares: vec![],
            success: ops,
            failure_gets: vec![],
        })
        .await;
    assert!(written.is_ok_and(|r| r.succeeded));
    let svc = support::service(support::config(), store).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    const PATH: &str = "/api/1.0/instances";

    let ids = |v: &Value| -> Vec<String> {
        v["data"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|d| d["id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let r = send(&app, get(PATH).to_request()).await;
    assert_eq!(r.status, 200, "{r:?}");
    let all: Vec<String> = (0..20).map(|i| format!("i-{i:02}")).collect();
    assert_eq!(ids(&r.json), all);
    assert_eq!(r.json["data"][1]["state"], "SCHEDULED");
    assert_eq!(r.json["data"][1]["worker_id"], "w-1");

    let r = send(&app, get(&format!("{PATH}?state=RUNNING")).to_request()).await;
    let want: Vec<String> = (0..20)
        .filter(|i| i % 4 == 2)
        .map(|i| format!("i-{i:02}"))
        .collect();
    assert_eq!(ids(&r.json), want);
    let r = send(
        &app,
        get(&format!("{PATH}?worker_id=w-1&state=SCHEDULED")).to_request(),
    )
    .await;
    let want: Vec<String> = (0..20)
        .filter(|i| i % 4 == 1)
        .map(|i| format!("i-{i:02}"))
        .collect();
    assert_eq!(ids(&r.json), want);

    // pages of 3, every instance once, in order
    let mut seen = Vec::new();
    let mut uri = format!("{PATH}?limit=3");
    for _ in 0..20 {
        let r = send(&app, get(&uri).to_request()).await;
        assert_eq!(r.status, 200);
        let page = ids(&r.json);
        assert!(page.len() <= 3);
        seen.extend(page);
        match r.json["continue"].as_str() {
            Some(t) => uri = format!("{PATH}?limit=3&continue={t}"),
            None => break,
        }
    }
    assert_eq!(seen, all);

    for q in ["state=BOGUS", "colour=red", "worker_id="] {
        let r = send(&app, get(&format!("{PATH}?{q}")).to_request()).await;
        assert_eq!(r.status, 400, "{q}: {r:?}");
    }
}

#[actix_web::test]
async fn workers_list_pages_by_id() {
    use resource_plane::keys;
    use resource_plane::loadtest::etcd::seed_worker;
    use resource_plane::ports::store::{Op, Txn};

    let store = memory();
    let mut all: Vec<String> = Vec::new();
    let mut ops = Vec::new();
    for i in 0..12 {
        let w = seed_worker(i);
        ops.push(Op::Put {
            key: keys::worker(&w.id),
            value: serde_json::to_vec(&w).unwrap_or_default(),
            lease: None,
        });
        all.push(w.id);
    }
    all.sort();
    let written = store
        .txn(Txn {
            compares: vec![],
            success: ops,
            failure_gets: vec![],
        })
        .await;
    assert!(written.is_ok_and(|r| r.succeeded));
    let svc = support::service(support::config(), store).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    const PATH: &str = "/api/1.0/workers";
    let ids = |v: &Value| -> Vec<String> {
        v["data"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|d| d["id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let r = send(&app, get(PATH).to_request()).await;
    assert_eq!(ids(&r.json), all);
    assert!(r.json.get("continue").is_none());
    let mut seen = Vec::new();
    let mut uri = format!("{PATH}?limit=5");
    for _ in 0..10 {
        let r = send(&app, get(&uri).to_request()).await;
        assert_eq!(r.status, 200, "{r:?}");
        let page = ids(&r.json);
        assert!(page.len() <= 5);
        seen.extend(page);
        match r.json["continue"].as_str() {
            Some(t) => uri = format!("{PATH}?limit=5&continue={t}"),
            None => break,
        }
    }
    assert_eq!(seen, all);
    for q in ["limit=0", "continue=%%%", "colour=red"] {
        let r = send(&app, get(&format!("{PATH}?{q}")).to_request()).await;
        assert_eq!(r.status, 400, "{q}: {r:?}");
    }
    // a token of another list is refused
    let r = send(&app, get(&format!("{BASE}?limit=1")).to_request()).await;
    assert_eq!(r.status, 200);
    let r = send(&app, get("/api/1.0/instances?limit=1").to_request()).await;
    assert_eq!(r.status, 200);
    let shadow_token = resource_plane::api::paging::token("shadow-deployables", "x");
    let r = send(
        &app,
        get(&format!("{PATH}?continue={shadow_token}")).to_request(),
    )
    .await;
    assert_eq!(r.status, 400, "{r:?}");
}
