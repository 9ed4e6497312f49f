//! Leader election on a real etcd: two controllers, one leads; the leader stops; the
//! other takes over within the lease TTL (+1 s) and no worker is launched twice; the old
//! leader's fenced writes are refused.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::test;
use resource_plane::adapters::sim_cloud::SimCloud;
use resource_plane::api;
use resource_plane::app::Service;
use resource_plane::domain::worker::WorkerState;
use serde_json::json;

use crate::controller::controller_config;
use crate::support::{self, post, send, Etcd};

#[actix_web::test]
async fn the_follower_takes_over_within_the_ttl_and_nothing_launches_twice() {
    let etcd = Etcd::start();
    let prefix = support::unique_prefix();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let cloud = Arc::new(SimCloud::new(Duration::from_millis(200)));
    let ttl = Duration::from_secs(3);
    let mut services = Vec::new();
    for name in ["ctl-a", "ctl-b"] {
        let mut cfg = controller_config(&dir, include_str!("../../config/worker-templates.yaml"));
        cfg.controller.instance_id = name.to_owned();
        cfg.controller.leader_lease_ttl = ttl;
        let svc = Service::start_with(cfg, etcd.store(&prefix), cloud.clone())
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(svc.wait_hydrated(Duration::from_secs(15)).await);
        services.push(svc);
    }
    let leader_of = |svcs: &Vec<Service>| {
        svcs.iter()
            .position(|s| s.state.controller.leader_status().is_leader)
    };
    assert!(
        support::eventually(Duration::from_secs(10), || async {
            leader_of(&services).is_some()
        })
        .await,
        "nobody was elected"
    );
    let first = leader_of(&services).unwrap_or(0);
    let second = 1 - first;
    assert!(
        !services[second].state.controller.leader_status().is_leader,
        "two leaders"
    );

    // demand arrives through the follower; the leader launches for it
    let app = test::init_service(api::app(services[second].state.clone())).await;
    for _ in 0..3 {
        let r = send(
            &app,
            post(
                "/api/1.0/instances",
                &json!({"requirements": {"cpu": 8, "memory_gb": 32}}),
            )
            .to_request(),
        )
        .await;
        assert_eq!(r.status, 202);
    }
    let running = || async {
        let ws = services[second].state.controller.workers.list();
        !ws.is_empty() && ws.iter().all(|w| w.state == WorkerState::Running)
    };
    assert!(
        support::eventually(Duration::from_secs(15), running).await,
        "workers did not come up"
    );

    // the leader freezes: no keepalive, no revoke
    let stopped_at = Instant::now();
    services[first].state.controller.fence.halt();
    services[first].state.controller.stop_leading();
    let took_over = support::eventually(ttl + Duration::from_secs(5), || async {
        services[second].state.controller.leader_status().is_leader
    })
    .await;
    let failover = stopped_at.elapsed();
    assert!(took_over, "follower never took over");
    println!("failover took {failover:?} with a {ttl:?} lease");
    assert!(
        failover <= ttl + Duration::from_secs(1),
        "failover took {failover:?}"
    );

    // the old leader still believes its epoch; its fenced writes are refused
    let w = services[first].state.controller.workers.list()[0].clone();
    let cmd = resource_plane::actors::worker::WorkerCmd::Transition {
        to: WorkerState::Draining,
        cloud_instance_id: None,
    };
    let r = services[first]
        .state
        .controller
        .workers
        .send(&w.id, cmd, true)
        .await;
    assert!(
        matches!(
            r,
            Err(resource_plane::actors::worker::WorkerExecError::Fenced)
        ),
        "{r:?}"
    );
    assert!(
        services[first].state.controller.fence.epoch().is_none(),
        "zombie leader did not step down"
    );

    // the new leader reconciles without launching anything again
    let launched = cloud.create_calls();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let workers = services[second].state.controller.workers.list();
    assert_eq!(cloud.create_calls(), launched, "new leader launched again");
    let mut cloud_ids: Vec<_> = workers
        .iter()
        .filter_map(|w| w.cloud_instance_id.clone())
        .collect();
    cloud_ids.sort();
    cloud_ids.dedup();
    assert_eq!(
        cloud_ids.len(),
        workers.len(),
        "one cloud instance per worker"
    );
}

#[actix_web::test]
async fn a_graceful_shutdown_hands_leadership_over_well_before_the_ttl() {
    let etcd = Etcd::start();
    let prefix = support::unique_prefix();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let cloud = Arc::new(SimCloud::new(Duration::from_millis(200)));
    // A long lease: waiting it out would take 20 s.
    let ttl = Duration::from_secs(20);
    let mut services = Vec::new();
    for name in ["ctl-a", "ctl-b"] {
        let mut cfg = controller_config(&dir, include_str!("../../config/worker-templates.yaml"));
        cfg.controller.instance_id = name.to_owned();
        cfg.controller.leader_lease_ttl = ttl;
        let svc = Service::start_with(cfg, etcd.store(&prefix), cloud.clone())
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(svc.wait_hydrated(Duration::from_secs(15)).await);
        services.push(svc);
        if services.len() == 1 {
            let first = &services[0];
            assert!(
                support::eventually(Duration::from_secs(10), || async {
                    first.state.controller.leader_status().is_leader
                })
                .await,
                "nobody was elected"
            );
        }
    }
    assert!(!services[1].state.controller.leader_status().is_leader);

    let stopped_at = Instant::now();
    services[0].shutdown().await;
    assert!(!services[0].state.controller.leader_status().is_leader);
    // Well before the TTL: the lease was revoked, so the follower need not wait for it.
    let took_over = support::eventually(ttl / 4, || async {
        services[1].state.controller.leader_status().is_leader
    })
    .await;
    println!(
        "graceful handover took {:?} with a {ttl:?} lease",
        stopped_at.elapsed()
    );
    assert!(
        took_over,
        "the follower was not leader {:?} after a graceful shutdown (lease {ttl:?})",
        ttl / 4
    );
    // The one that shut down stays out of the election.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!services[0].state.controller.leader_status().is_leader);
}

/// The service binary, end to end: SIGTERM to the leading process revokes its lease on
/// the way out, so the other process leads long before the lease would have expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_the_leader_process_hands_over_well_before_the_ttl() {
    use crate::cluster::{test_prefix, Http, ServiceProc};

    let etcd = tokio::task::block_in_place(Etcd::start);
    let prefix = test_prefix();
    let endpoints = vec![etcd.endpoint()];
    let ttl = Duration::from_secs(30);
    let env = |id: &str| {
        vec![
            ("LEADER_LEASE_TTL", ttl.as_secs().to_string()),
            ("CONTROLLER_INSTANCE_ID", id.to_owned()),
        ]
    };
    let http = Http::new();
    let leads = |url: String| {
        let http = &http;
        async move {
            http.get(&url)
                .await
                .is_ok_and(|a| a.json["leader"]["is_leader"] == true)
        }
    };
    let mut a = ServiceProc::start("a", &endpoints, &prefix, &env("a")).await;
    let a_url = a.url("/api/1.0/controller");
    assert!(
        support::eventually(Duration::from_secs(15), || leads(a_url.clone())).await,
        "a was not elected:\n{}",
        a.log()
    );
    let b = ServiceProc::start("b", &endpoints, &prefix, &env("b")).await;
    let b_url = b.url("/api/1.0/controller");
    assert!(!leads(b_url.clone()).await);

    let pid = a.pid().unwrap_or_else(|| panic!("a is not running"));
    let stopped_at = Instant::now();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    assert!(sent.is_ok_and(|s| s.success()), "cannot send SIGTERM");
    let took_over = support::eventually(ttl / 4, || leads(b_url.clone())).await;
    println!(
        "SIGTERM handover took {:?} with a {ttl:?} lease",
        stopped_at.elapsed()
    );
    assert!(
        took_over,
        "b was not leader {:?} after SIGTERM to the leader (lease {ttl:?}):\n{}",
        ttl / 4,
        a.log()
    );
    let exited = support::eventually(Duration::from_secs(15), || {
        let done = a.exited().is_some_and(|s| s.success());
        async move { done }
    })
    .await;
    assert!(exited, "a did not exit cleanly:\n{}", a.log());
}
