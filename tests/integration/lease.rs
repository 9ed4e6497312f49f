//! Holds that cannot leak (issue 9 item 6), against a real etcd: a PROCURE with
//! `lease_seconds` is released by the leader once the lease expires (the same transition
//! as RELEASE, fenced, counted, and its min pod count 0 reaches Kubernetes); RENEW keeps
//! it; RENEW is refused (409) to anyone but the holder of a leased hold; RENEWs racing
//! the reaper across two replicas never half-apply; a new leader reaps what the old one
//! left.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::test;
use chrono::{DateTime, Utc};
use futures::future::join_all;
use resource_plane::adapters::sim_cloud::SimCloud;
use resource_plane::adapters::sim_kube::SimKube;
use resource_plane::api;
use resource_plane::app::Service;
use resource_plane::config::Config;
use resource_plane::keys;
use resource_plane::ports::kube::{DeployableSpec, ResourceSpec};
use resource_plane::ports::store::{Store, WatchEvent};
use serde_json::{json, Value};

use crate::support::{self, get, post, put, send, Etcd, Resp, TestApp};

const BASE: &str = "/api/1.0/int/shadow-deployables";

/// Test configuration with a fast reaper, converger and election.
fn lease_config(id: &str) -> Config {
    reaping_every(id, "50")
}

fn reaping_every(id: &str, reap_ms: &str) -> Config {
    let env: std::collections::HashMap<String, String> = [
        ("SHADOW_SEED_FILE", ""),
        ("ACTOR_THREADS", "2"),
        ("WORKER_AGENT", "heartbeat"),
        ("LEASE_REAP_INTERVAL_MS", reap_ms),
        ("KUBE_CONVERGE_INTERVAL_MS", "100"),
        ("LEADER_LEASE_TTL", "3"),
        ("CONTROLLER_INSTANCE_ID", id),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    Config::from_map(&env).unwrap_or_else(|e| panic!("{e}"))
}

fn sim_kube(names: &[&str]) -> Arc<SimKube> {
    let kube = Arc::new(SimKube::new(Duration::from_millis(10)));
    for name in names {
        let spec = DeployableSpec {
            name: (*name).to_owned(),
            namespace: "int".into(),
            image: "shadow-deployable:latest".into(),
            node_selector: Default::default(),
            min_pod_count: 0,
            max_pod_count: 100,
            resources: ResourceSpec::default(),
            models_to_load: Vec::new(),
        };
        kube.seed_deployable(&spec)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    kube
}

async fn start(cfg: Config, store: Arc<dyn Store>, kube: Arc<SimKube>) -> Service {
    let cloud = Arc::new(SimCloud::new(Duration::from_millis(100)));
    let svc = Service::start_full(cfg, store, cloud, kube).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        svc.wait_hydrated(Duration::from_secs(15)).await,
        "service did not hydrate"
    );
    svc
}

async fn wait_leader(svc: &Service) {
    assert!(
        support::eventually(Duration::from_secs(10), || async {
            svc.state.controller.leader_status().is_leader
        })
        .await,
        "not elected"
    );
}

async fn register(app: &impl TestApp, name: &str) {
    let r = send(
        app,
        put(
            &format!("{BASE}/{name}"),
            &json!({"node_pool": "p", "dns": format!("{name}.example")}),
        )
        .to_request(),
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", r.json);
}

fn procure(name: &str, run: &str, lease: Option<u64>) -> Value {
    let mut b = json!({"action": "PROCURE", "name": name, "workflow_run_id": run});
    if let Some(l) = lease {
        b["lease_seconds"] = json!(l);
    }
    b
}

fn renew(name: &str, run: &str, lease: Option<u64>) -> Value {
    let mut b = json!({"action": "RENEW", "name": name, "workflow_run_id": run});
    if let Some(l) = lease {
        b["lease_seconds"] = json!(l);
    }
    b
}

async fn call(app: &impl TestApp, body: &Value) -> Resp {
    send(app, post(BASE, body).to_request()).await
}

/// The record as stored in etcd (Null when absent).
async fn record(store: &dyn Store, name: &str) -> Value {
    store
        .get(&keys::shadow("int", name))
        .await
        .ok()
        .flatten()
        .map(|kv| serde_json::from_slice(&kv.value).unwrap_or_default())
        .unwrap_or_default()
}

async fn index(store: &dyn Store, name: &str) -> Option<String> {
    support::in_use_index_value(store, name).await
}

fn time(v: &Value) -> DateTime<Utc> {
    v.as_str()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_else(|| panic!("not an RFC 3339 time: {v}"))
}

/// `leases_reaped_total` as exposed on `GET /metrics`.
async fn reaped(app: &impl TestApp) -> Option<u64> {
    let r = send(app, get("/metrics").to_request()).await;
    let text = String::from_utf8_lossy(&r.raw).into_owned();
    text.lines()
        .find(|l| l.starts_with("leases_reaped_total"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
}

/// Every version the record went through, from etcd's history (watch from revision 1).
async fn history(store: &dyn Store, name: &str) -> Vec<Value> {
    let key = keys::shadow("int", name);
    let last = store
        .get(&key)
        .await
        .ok()
        .flatten()
        .map(|kv| kv.mod_revision)
        .unwrap_or_else(|| panic!("no record {name}"));
    let mut rx = store
        .watch(&key, 1)
        .await
        .unwrap_or_else(|e| panic!("watch: {e}"));
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    'read: while Instant::now() < deadline {
        let Ok(Some(batch)) = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await else {
            break;
        };
        for ev in batch.unwrap_or_else(|e| panic!("watch: {e}")) {
            if let WatchEvent::Put(kv) = ev {
                // The watch is on a prefix: skip other records sharing it.
                if kv.key != key {
                    continue;
                }
                let rev = kv.mod_revision;
                out.push(serde_json::from_slice::<Value>(&kv.value).unwrap_or_default());
                if rev >= last {
                    break 'read;
                }
            }
        }
    }
    out
}

#[actix_web::test]
async fn an_expired_hold_is_released_by_the_leader_and_another_run_procures_it() {
    let etcd = Etcd::start();
    let prefix = support::unique_prefix();
    let raw = etcd.store(&prefix);
    let kube = sim_kube(&["d"]);
    let svc = start(lease_config("a"), etcd.store(&prefix), kube.clone()).await;
    wait_leader(&svc).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    register(&app, "d").await;

    let r = call(&app, &procure("d", "r1", Some(3))).await;
    assert_eq!((r.status, &r.json["status"]), (200, &json!("PROCURED")));
    let held = record(raw.as_ref(), "d").await;
    assert_eq!(held["owner"]["lease_seconds"], 3);
    let expires = time(&held["lease_expires_at"]);
    assert!(
        expires > Utc::now(),
        "lease_expires_at {expires} is not ahead"
    );
    let listed = send(&app, get(BASE).to_request()).await;
    assert_eq!(
        listed.json["data"][0]["lease_expires_at"],
        held["lease_expires_at"]
    );

    let r = send(
        &app,
        post(
            &format!("{BASE}/min-pod-count"),
            &json!({"action": "INCREASE", "count": 3, "name": "d", "workflow_run_id": "r1"}),
        )
        .to_request(),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    assert!(
        support::eventually(Duration::from_secs(10), || async {
            kube.min_replicas("int", "d") == Some(3)
        })
        .await,
        "min pod count 3 never reached the cluster"
    );
    assert_eq!(reaped(&app).await, Some(0));

    // Nobody renews: the leader releases it once the lease expired.
    assert!(
        support::eventually(Duration::from_secs(15), || async {
            record(raw.as_ref(), "d").await["state"] == "FREE"
        })
        .await,
        "the expired hold was never released"
    );
    let freed = record(raw.as_ref(), "d").await;
    assert!(Utc::now() >= expires);
    assert_eq!(freed["owner"], Value::Null);
    assert_eq!(freed["min_pod_count"], 0);
    assert_eq!(freed["lease_expires_at"], Value::Null);
    // procure, min pod count, reap: one version each, like a RELEASE.
    assert_eq!(freed["version"], 3);
    assert!(time(&freed["last_updated_at"]) >= expires);
    assert_eq!(index(raw.as_ref(), "d").await.as_deref(), Some("false"));
    assert!(
        support::eventually(Duration::from_secs(10), || async {
            kube.min_replicas("int", "d") == Some(0)
        })
        .await,
        "min pod count 0 never reached the cluster after the reap"
    );
    assert_eq!(reaped(&app).await, Some(1));

    // The history shows the reap as a release: PROCURED -> FREE, owner cleared.
    let versions = history(raw.as_ref(), "d").await;
    let states: Vec<(&Value, &Value)> = versions
        .iter()
        .map(|v| (&v["version"], &v["state"]))
        .collect();
    assert_eq!(
        states,
        vec![
            (&json!(0), &json!("FREE")),
            (&json!(1), &json!("PROCURED")),
            (&json!(2), &json!("PROCURED")),
            (&json!(3), &json!("FREE")),
        ]
    );

    // The old holder's renewal is refused; another run procures it.
    let r = call(&app, &renew("d", "r1", None)).await;
    assert_eq!(r.status, 409, "{:?}", r.json);
    assert!(r.error().contains("not procured"), "{}", r.error());
    let r = call(&app, &procure("d", "r2", None)).await;
    assert_eq!((r.status, &r.json["status"]), (200, &json!("PROCURED")));
    let held = record(raw.as_ref(), "d").await;
    assert_eq!(held["owner"]["workflow_run_id"], "r2");
    assert_eq!(
        held["lease_expires_at"],
        Value::Null,
        "no lease: held forever"
    );
}

#[actix_web::test]
async fn renewal_keeps_the_hold_past_its_first_expiry() {
    let etcd = Etcd::start();
    let prefix = support::unique_prefix();
    let raw = etcd.store(&prefix);
    let svc = start(lease_config("a"), etcd.store(&prefix), sim_kube(&[])).await;
    wait_leader(&svc).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    register(&app, "d").await;

    let r = call(&app, &procure("d", "r1", Some(2))).await;
    assert_eq!(r.json["status"], "PROCURED");
    let first = time(&record(raw.as_ref(), "d").await["lease_expires_at"]);
    let mut last = first;
    let mut renewed = 0;
    while Utc::now() <= first + chrono::Duration::seconds(1) {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let r = call(&app, &renew("d", "r1", None)).await;
        assert_eq!(r.status, 200, "{:?}", r.json);
        assert_eq!(r.json["status"], "RENEWED");
        let expires = time(&r.json["lease_expires_at"]);
        assert!(expires > last, "{expires} does not extend {last}");
        last = expires;
        renewed += 1;
        assert!(renewed < 50, "bounded");
    }
    // Past the first expiry and still held by r1, with the lease it was renewed to.
    let held = record(raw.as_ref(), "d").await;
    assert_eq!(held["state"], "PROCURED");
    assert_eq!(held["owner"]["workflow_run_id"], "r1");
    assert_eq!(
        held["owner"]["lease_seconds"], 2,
        "the original length is kept"
    );
    assert_eq!(time(&held["lease_expires_at"]), last);
    assert_eq!(reaped(&app).await, Some(0));

    // An explicit length applies to this renewal.
    // The service stamps whole milliseconds (`clock::utc_now`), so compare with the same.
    let before = resource_plane::clock::utc_now();
    let r = call(&app, &renew("d", "r1", Some(30))).await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    let expires = time(&r.json["lease_expires_at"]);
    assert!(expires >= before + chrono::Duration::seconds(30));
    assert_eq!(
        r.json["version"],
        record(raw.as_ref(), "d").await["version"]
    );
    // ... and the next default one goes back to the original 2 s; then it lapses.
    let r = call(&app, &renew("d", "r1", None)).await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    assert!(time(&r.json["lease_expires_at"]) < expires);
    assert!(
        support::eventually(Duration::from_secs(15), || async {
            record(raw.as_ref(), "d").await["state"] == "FREE"
        })
        .await,
        "the hold was not released once renewals stopped"
    );
    // The reaper counts the reap once its write has returned, which can be just after
    // the record reads FREE.
    support::eventually(Duration::from_secs(5), || async {
        reaped(&app).await == Some(1)
    })
    .await;
    assert_eq!(reaped(&app).await, Some(1));
}

#[actix_web::test]
async fn renew_is_refused_unless_the_caller_holds_a_leased_hold() {
    let etcd = Etcd::start();
    let prefix = support::unique_prefix();
    let raw = etcd.store(&prefix);
    let svc = start(lease_config("a"), etcd.store(&prefix), sim_kube(&[])).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    for name in ["forever", "leased", "free"] {
        register(&app, name).await;
    }
    let r = call(&app, &procure("forever", "r1", None)).await;
    assert_eq!(r.json["status"], "PROCURED");
    let r = call(&app, &procure("leased", "r1", Some(600))).await;
    assert_eq!(r.json["status"], "PROCURED");
    let forever = record(raw.as_ref(), "forever").await;
    let leased = record(raw.as_ref(), "leased").await;
    assert_eq!(forever["lease_expires_at"], Value::Null);

    // No lease to renew.
    let r = call(&app, &renew("forever", "r1", None)).await;
    assert_eq!(r.status, 409, "{:?}", r.json);
    assert!(r.error().contains("lease"), "{}", r.error());
    let r = call(&app, &renew("forever", "r1", Some(60))).await;
    assert_eq!(r.status, 409, "{:?}", r.json);
    // Not the holder.
    let r = call(&app, &renew("leased", "r2", None)).await;
    assert_eq!(r.status, 409, "{:?}", r.json);
    assert!(r.error().contains("another workflow run"), "{}", r.error());
    // Not held at all; not there at all.
    let r = call(&app, &renew("free", "r1", None)).await;
    assert_eq!(r.status, 409, "{:?}", r.json);
    let r = call(&app, &renew("nope", "r1", None)).await;
    assert_eq!(r.status, 404, "{:?}", r.json);

    // Bad lengths are 400, for PROCURE and RENEW; RELEASE takes none.
    for bad in [
        json!(0),
        json!(-5),
        json!(604_801),
        json!(1e12),
        json!(1.5),
        json!("10"),
        json!(null),
    ] {
        for action in ["PROCURE", "RENEW"] {
            let body = json!({"action": action, "name": "leased", "workflow_run_id": "r1", "lease_seconds": bad});
            let r = call(&app, &body).await;
            if bad.is_null() && action == "RENEW" {
                // null = the default length
                assert_eq!(r.status, 200, "{action} {bad}: {:?}", r.json);
                continue;
            }
            if bad.is_null() {
                assert_eq!(r.json["status"], "PROCURED", "{action} {bad}");
                continue;
            }
            assert_eq!(r.status, 400, "{action} {bad}: {:?}", r.json);
            assert!(r.error().contains("lease_seconds"), "{}", r.error());
        }
    }
    let body =
        json!({"action": "RELEASE", "name": "leased", "workflow_run_id": "r1", "lease_seconds": 5});
    let r = call(&app, &body).await;
    assert_eq!(r.status, 400, "{:?}", r.json);
    assert_eq!(record(raw.as_ref(), "forever").await, forever);
    assert_eq!(
        record(raw.as_ref(), "leased").await["owner"],
        leased["owner"]
    );

    // A retried RENEW with the same key is answered from the first, not applied twice.
    let version = record(raw.as_ref(), "leased").await["version"].clone();
    let keyed = || {
        post(BASE, &renew("leased", "r1", None))
            .insert_header(("X-Idempotency-Key", "renew-1"))
            .to_request()
    };
    let first = send(&app, keyed()).await;
    assert_eq!(first.status, 200, "{:?}", first.json);
    let again = send(&app, keyed()).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.json, first.json);
    assert!(again.headers.contains_key("idempotent-replayed"));
    assert_eq!(
        record(raw.as_ref(), "leased").await["version"],
        json!(version.as_u64().unwrap_or_default() + 1)
    );
}

/// One RENEW answer seen by the race test.
struct Renewal {
    status: u16,
    body: Value,
}

#[actix_web::test]
async fn renewals_racing_the_reaper_across_two_replicas_never_half_apply() {
    let etcd = Etcd::start();
    let prefix = support::unique_prefix();
    let raw = etcd.store(&prefix);
    let a = start(reaping_every("a", "10"), etcd.store(&prefix), sim_kube(&[])).await;
    let b = start(reaping_every("b", "10"), etcd.store(&prefix), sim_kube(&[])).await;
    assert!(
        support::eventually(Duration::from_secs(10), || async {
            a.state.controller.leader_status().is_leader
                || b.state.controller.leader_status().is_leader
        })
        .await,
        "nobody was elected"
    );
    let app_a = test::init_service(api::app(a.state.clone())).await;
    let app_b = test::init_service(api::app(b.state.clone())).await;
    register(&app_a, "hot").await;
    let r = call(&app_b, &procure("hot", "r1", Some(1))).await;
    assert_eq!(r.json["status"], "PROCURED");

    // Rounds of concurrent RENEWs through both replicas, each fired around the moment
    // the current lease runs out (a little later every round), so the reaper (polling
    // every 10 ms) competes for it: early rounds tend to renew, later ones to lose.
    let mut answers: Vec<Renewal> = Vec::new();
    for round in 0..8i64 {
        let current = record(raw.as_ref(), "hot").await;
        if current["state"] != "PROCURED" {
            break;
        }
        let expires = time(&current["lease_expires_at"]);
        let offset = chrono::Duration::milliseconds(20 * round - 40);
        let wait = (expires + offset - Utc::now()).to_std().unwrap_or_default();
        tokio::time::sleep(wait.min(Duration::from_secs(2))).await;
        let calls = (0..16).map(|i| {
            let (app_a, app_b) = (&app_a, &app_b);
            async move {
                // Spread over 80 ms from the round's offset.
                tokio::time::sleep(Duration::from_millis((i * 5) as u64)).await;
                let body = renew("hot", "r1", Some(1));
                let r = if (i + round) % 2 == 0 {
                    call(app_a, &body).await
                } else {
                    call(app_b, &body).await
                };
                Renewal {
                    status: r.status,
                    body: r.json,
                }
            }
        });
        answers.extend(join_all(calls).await);
    }

    // Right now the record is whole: held with a lease, or FREE with nothing left.
    let now = record(raw.as_ref(), "hot").await;
    match now["state"].as_str() {
        Some("PROCURED") => {
            assert_eq!(now["owner"]["workflow_run_id"], "r1");
            assert!(now["lease_expires_at"].is_string());
            assert_eq!(index(raw.as_ref(), "hot").await.as_deref(), Some("true"));
        }
        Some("FREE") => {
            assert_eq!(now["owner"], Value::Null);
            assert_eq!(now["lease_expires_at"], Value::Null);
            assert_eq!(now["min_pod_count"], 0);
            assert_eq!(index(raw.as_ref(), "hot").await.as_deref(), Some("false"));
        }
        other => panic!("unexpected state {other:?}: {now}"),
    }
    // Nobody renews any more: it is reaped in the end.
    assert!(
        support::eventually(Duration::from_secs(15), || async {
            record(raw.as_ref(), "hot").await["state"] == "FREE"
        })
        .await,
        "never reaped"
    );

    // Every answer is either RENEWED (200) or a clean 409; no 5xx.
    for r in &answers {
        assert!(
            r.status == 200 && r.body["status"] == "RENEWED" || r.status == 409,
            "{} {}",
            r.status,
            r.body
        );
    }
    let ok = answers.iter().filter(|r| r.status == 200).count();
    println!(
        "race: {ok} RENEWED, {} refused, of {}",
        answers.len() - ok,
        answers.len()
    );

    // The history: versions 0, 1, 2, ... without gaps; PROCURED by r1 until exactly one
    // FREE version, the last; each reap released a lease that had expired by then; each
    // 200 RENEW is a version of the history with the expiry it answered.
    let versions = history(raw.as_ref(), "hot").await;
    let by_version: BTreeMap<u64, &Value> = versions
        .iter()
        .map(|v| (v["version"].as_u64().unwrap_or(u64::MAX), v))
        .collect();
    assert_eq!(by_version.len(), versions.len(), "a version written twice");
    let numbers: Vec<u64> = by_version.keys().copied().collect();
    assert_eq!(numbers, (0..versions.len() as u64).collect::<Vec<_>>());
    let last = versions.len() - 1;
    for (i, v) in versions.iter().enumerate() {
        match i {
            0 => assert_eq!(v["state"], "FREE"),
            i if i == last => {
                assert_eq!(v["state"], "FREE", "{v}");
                assert_eq!(v["owner"], Value::Null);
                assert_eq!(v["lease_expires_at"], Value::Null);
                let before = time(&versions[i - 1]["lease_expires_at"]);
                assert!(
                    time(&v["last_updated_at"]) >= before,
                    "released a hold whose lease ran to {before}: {v}"
                );
            }
            _ => {
                assert_eq!(v["state"], "PROCURED", "{v}");
                assert_eq!(v["owner"]["workflow_run_id"], "r1");
                assert!(v["lease_expires_at"].is_string());
            }
        }
    }
    for r in answers.iter().filter(|r| r.status == 200) {
        let v = r.body["version"]
            .as_u64()
            .and_then(|n| by_version.get(&n))
            .unwrap_or_else(|| panic!("RENEWED version not in the history: {}", r.body));
        assert_eq!(v["state"], "PROCURED");
        assert_eq!(v["lease_expires_at"], r.body["lease_expires_at"]);
    }
    // The reap is counted a moment after etcd has the FREE record: wait for the count.
    let total = || async { reaped(&app_a).await.unwrap_or(0) + reaped(&app_b).await.unwrap_or(0) };
    support::eventually(Duration::from_secs(5), || async { total().await >= 1 }).await;
    assert_eq!(total().await, 1, "reaped once in all");
}

#[actix_web::test]
async fn a_new_leader_reaps_what_the_old_one_left() {
    let etcd = Etcd::start();
    let prefix = support::unique_prefix();
    let raw = etcd.store(&prefix);
    let services = [
        start(lease_config("a"), etcd.store(&prefix), sim_kube(&[])).await,
        start(lease_config("b"), etcd.store(&prefix), sim_kube(&[])).await,
    ];
    let leader_of = || {
        services
            .iter()
            .position(|s| s.state.controller.leader_status().is_leader)
    };
    assert!(
        support::eventually(Duration::from_secs(10), || async { leader_of().is_some() }).await,
        "nobody was elected"
    );
    let first = leader_of().unwrap_or(0);
    let second = 1 - first;
    let app_first = test::init_service(api::app(services[first].state.clone())).await;
    let app_second = test::init_service(api::app(services[second].state.clone())).await;
    register(&app_second, "d").await;
    let r = call(&app_second, &procure("d", "r1", Some(2))).await;
    assert_eq!(r.json["status"], "PROCURED");

    // The leader stops before the lease runs out.
    services[first].shutdown().await;
    assert!(!services[first].state.controller.leader_status().is_leader);
    assert!(
        support::eventually(Duration::from_secs(10), || async {
            services[second].state.controller.leader_status().is_leader
        })
        .await,
        "the follower never took over"
    );
    assert!(
        support::eventually(Duration::from_secs(15), || async {
            record(raw.as_ref(), "d").await["state"] == "FREE"
        })
        .await,
        "the new leader did not reap the expired hold"
    );
    // etcd has the FREE record a moment before the reaping actor has its answer (and
    // counts the reap): wait for the count, do not sample it once.
    assert!(
        support::eventually(Duration::from_secs(5), || async {
            reaped(&app_second).await == Some(1)
        })
        .await,
        "the new leader's reap was not counted: {:?}",
        reaped(&app_second).await
    );
    assert_eq!(
        reaped(&app_first).await,
        Some(0),
        "the stopped leader reaped"
    );
    let r = call(&app_first, &procure("d", "r2", None)).await;
    assert_eq!(r.json["status"], "PROCURED");
}

#[actix_web::test]
async fn a_reap_under_a_stale_leader_key_is_refused_and_writes_nothing() {
    use resource_plane::actors::reaper::reap_once;
    use resource_plane::actors::shadow::{ExecError, ShadowKey};
    use resource_plane::ports::store::Compare;

    let etcd = Etcd::start();
    let prefix = support::unique_prefix();
    let raw = etcd.store(&prefix);
    // The reaper loop's first pass finds nothing; the passes here are driven by hand.
    let svc = start(
        reaping_every("a", "3600000"),
        etcd.store(&prefix),
        sim_kube(&[]),
    )
    .await;
    wait_leader(&svc).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    register(&app, "d").await;
    let r = call(&app, &procure("d", "r1", Some(1))).await;
    assert_eq!(r.json["status"], "PROCURED");
    let expires = time(&record(raw.as_ref(), "d").await["lease_expires_at"]);
    let key = ShadowKey::new("int", "d");
    let ops = svc.state.ops.clone();
    assert!(
        support::eventually(Duration::from_secs(10), || async {
            Utc::now() > expires && ops.shadows.expired_holds(Utc::now()) == vec![key.clone()]
        })
        .await,
        "the view never showed the hold expired"
    );

    // A leader key created at another revision: as if this replica had been deposed.
    let epoch = svc
        .state
        .controller
        .leader_status()
        .epoch
        .unwrap_or_else(|| panic!("not leading"));
    let stale = Compare::CreateRevision(keys::LEADER.to_owned(), epoch + 1_000);
    let r = ops.shadows.reap(&key, stale).await;
    assert_eq!(r, Err(ExecError::Fenced));
    let held = record(raw.as_ref(), "d").await;
    assert_eq!(held["state"], "PROCURED");
    assert_eq!(held["version"], 1);
    assert_eq!(reaped(&app).await, Some(0));

    // Under the real leader key it goes through, once.
    assert_eq!(reap_once(&ops).await, 1);
    assert_eq!(reap_once(&ops).await, 0);
    let freed = record(raw.as_ref(), "d").await;
    assert_eq!(
        (&freed["state"], &freed["version"]),
        (&json!("FREE"), &json!(2))
    );
    assert_eq!(reaped(&app).await, Some(1));
}
