//! One timestamp format everywhere: every answer of every list/get route and every
//! record the service stores writes RFC 3339 in UTC with fixed milliseconds
//! (`2026-01-10T14:20:00.123Z`).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use resource_plane::adapters::memory::MemoryStore;
use resource_plane::adapters::sim_cloud::SimCloud;
use resource_plane::api;
use resource_plane::app::Service;
use resource_plane::ports::store::Store;
use serde_json::{json, Value};

use crate::controller::{controller_config, TEMPLATES};
use crate::support::{self, get, post, put, send};

/// `YYYY-MM-DDTHH:MM:SS.mmmZ`, nothing else.
fn is_the_format(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| r.into_iter().all(|i| b[i].is_ascii_digit());
    b.len() == 24
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && b[19] == b'.'
        && digits(20..23)
        && b[23] == b'Z'
        && chrono::DateTime::parse_from_rfc3339(s).is_ok()
}

/// Looks like a date-time: starts `YYYY-MM-DDT`.
fn looks_like_a_timestamp(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 11
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
}

/// Walks `v`; records every timestamp-looking string's key in `seen` and every one not
/// in the format in `bad`.
fn walk(v: &Value, at: &str, seen: &mut BTreeSet<String>, bad: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                walk(v, &format!("{at}.{k}"), seen, bad);
            }
        }
        Value::Array(a) => a
            .iter()
            .for_each(|v| walk(v, &format!("{at}[]"), seen, bad)),
        Value::String(s) if looks_like_a_timestamp(s) => {
            let key = at.rsplit('.').next().unwrap_or(at).trim_end_matches("[]");
            seen.insert(key.to_owned());
            if !is_the_format(s) {
                bad.push(format!("{at} = {s}"));
            }
        }
        _ => {}
    }
}

#[test]
fn the_format_checker_tells_the_format_apart() {
    assert!(is_the_format("2026-01-10T14:20:00.123Z"));
    for other in [
        "2026-01-10T14:20:00Z",
        "2026-01-10T14:20:00.123456789Z",
        "2026-01-10T14:20:00.123+00:00",
        "2026-01-10T14:20:00.12Z",
    ] {
        assert!(!is_the_format(other), "{other}");
        assert!(looks_like_a_timestamp(other), "{other}");
    }
}

#[actix_web::test]
async fn every_answer_and_record_writes_one_timestamp_format() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut cfg = controller_config(&dir, TEMPLATES);
    cfg.operations.callback_allow_insecure_localhost = true;
    cfg.operations.sim_kube_ready_delay = Duration::from_millis(50);
    cfg.operations.converge_interval = Duration::from_millis(50);
    let cloud = Arc::new(SimCloud::new(Duration::from_millis(100)));
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let svc = Service::start_with(cfg, store.clone(), cloud).unwrap_or_else(|e| panic!("{e}"));
    assert!(svc.wait_hydrated(Duration::from_secs(10)).await);
    let state = svc.state.clone();
    assert!(
        support::eventually(Duration::from_secs(10), || async {
            state.controller.leader_status().is_leader
        })
        .await
    );
    let app = actix_web::test::init_service(api::app(svc.state.clone())).await;
    let ok = |r: &support::Resp, status: u16| assert_eq!(r.status, status, "{}", r.json);

    // a procured shadow deployable
    let base = "/api/1.0/int/shadow-deployables";
    let r = send(
        &app,
        put(
            &format!("{base}/d1"),
            &json!({"node_pool": "p", "dns": "d1.example"}),
        )
        .to_request(),
    )
    .await;
    ok(&r, 201);
    let procure = json!({"action": "PROCURE", "name": "d1", "workflow_run_id": "r1"});
    ok(&send(&app, post(base, &procure).to_request()).await, 200);
    // an instance on a worker the autoscaler launched, running after a heartbeat
    let r = send(
        &app,
        post(
            "/api/1.0/instances",
            &json!({"requirements": {"cpu": 1, "memory_gb": 1}}),
        )
        .to_request(),
    )
    .await;
    ok(&r, 202);
    let instance = r.json["id"].as_str().unwrap_or_default().to_owned();
    let placed = support::eventually(Duration::from_secs(15), || async {
        state
            .controller
            .instances
            .get(&instance)
            .and_then(|(i, _)| i.worker_id)
            .is_some_and(|w| {
                state.controller.workers.list().iter().any(|x| {
                    x.id == w && x.state == resource_plane::domain::worker::WorkerState::Running
                })
            })
    })
    .await;
    assert!(placed, "instance not placed on a running worker");
    let worker = state
        .controller
        .instances
        .get(&instance)
        .and_then(|(i, _)| i.worker_id)
        .unwrap_or_default();
    let hb = json!({"running_instances": [instance]});
    ok(
        &send(
            &app,
            post(&format!("/api/1.0/workers/{worker}/heartbeat"), &hb).to_request(),
        )
        .await,
        200,
    );
    // an operation whose callback cannot be delivered: attempts and a next attempt
    let job = json!({"job_name": "j1", "container": {"image": "registry.local/x:1"},
        "callback": {"url": "http://127.0.0.1:1/cb"}});
    let r = send(&app, post("/api/1.0/int/jobs", &job).to_request()).await;
    ok(&r, 202);
    let op = r.json["request_id"].as_str().unwrap_or_default().to_owned();
    let attempted = support::eventually(Duration::from_secs(15), || async {
        let r = send(
            &app,
            get(&format!("/api/1.0/int/operations/{op}")).to_request(),
        )
        .await;
        r.json["delivery"]["attempts"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
    })
    .await;
    assert!(attempted, "no callback attempt recorded");

    let mut seen = BTreeSet::new();
    let mut bad = Vec::new();
    let routes = [
        base.to_owned(),
        "/api/1.0/actors".to_owned(),
        "/api/1.0/actors/shadow-deployable/int/d1".to_owned(),
        format!("/api/1.0/actors/worker/{worker}"),
        format!("/api/1.0/instances/{instance}"),
        "/api/1.0/workers".to_owned(),
        format!("/api/1.0/workers/{worker}"),
        "/api/1.0/worker-templates".to_owned(),
        "/api/1.0/controller".to_owned(),
        format!("/api/1.0/int/operations/{op}"),
    ];
    for route in &routes {
        let r = send(&app, get(route).to_request()).await;
        ok(&r, 200);
        walk(&r.json, route, &mut seen, &mut bad);
    }
    // every record the service stored: shadow deployables, workers, instances, intents,
    // idempotency records, the leader record
    let (records, _) = store.list("").await.unwrap_or_else(|e| panic!("{e}"));
    for kv in &records {
        if let Ok(v) = serde_json::from_slice::<Value>(&kv.value) {
            walk(&v, &kv.key, &mut seen, &mut bad);
        }
    }
    assert_eq!(
        bad,
        Vec::<String>::new(),
        "timestamps not in the one format"
    );
    for key in [
        "procured_at",
        "last_updated_at",
        "created_at",
        "state_changed_at",
        "last_heartbeat_at",
        "deadline",
        "last_transition_at",
        "at",
    ] {
        assert!(seen.contains(key), "no {key} was checked; saw {seen:?}");
    }
}
