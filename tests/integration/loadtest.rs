//! The load-test harness against the service in-process: a real HTTP server on a free
//! loopback port over the memory store, driven through the harness's library API.

use std::net::SocketAddr;
use std::sync::Arc;

use actix_web::HttpServer;
use clap::Parser;
use resource_plane::adapters::memory::MemoryStore;
use resource_plane::api;
use resource_plane::loadtest::{self, LoadtestArgs};

use crate::support;

#[actix_web::test]
async fn the_shadow_scenario_keeps_every_invariant() {
    shadow_scenario("round-robin").await;
}

/// PROCURE by node pool: one request per attempt, the service picks; the harness's
/// invariant checker (one holder at a time per name) still holds.
#[actix_web::test]
async fn the_shadow_scenario_by_pool_keeps_every_invariant() {
    let report = shadow_scenario("pool").await;
    assert!(report.endpoint("list").is_none(), "{}", report.render());
}

/// Runs the shadow scenario with `--pick pick` and checks what every pick mode promises.
async fn shadow_scenario(pick: &str) -> loadtest::Report {
    let svc = support::service(support::config(), Arc::new(MemoryStore::new())).await;
    let state = svc.state.clone();
    let server = HttpServer::new(move || api::app(state.clone()))
        .workers(2)
        .disable_signals()
        .shutdown_timeout(1)
        .bind(("127.0.0.1", 0))
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let port = server
        .addrs()
        .first()
        .map(SocketAddr::port)
        .unwrap_or_else(|| panic!("server has no address"));
    let server = server.run();
    let handle = server.handle();
    actix_web::rt::spawn(server);

    // Fewer deployables than workflows, so PROCUREs collide and get FAILED + delay.
    let url = format!("http://127.0.0.1:{port}");
    let args = LoadtestArgs::try_parse_from([
        "loadtest",
        "--url",
        url.as_str(),
        "--scenario",
        "shadow",
        "--workflows",
        "16",
        "--deployables",
        "8",
        "--iterations",
        "300",
        "--duration",
        "120s",
        "--max-retry-delay-ms",
        "5",
        "--pick",
        pick,
        "--no-progress",
    ])
    .unwrap_or_else(|e| panic!("arguments: {e}"));
    let report = loadtest::run(args)
        .await
        .unwrap_or_else(|e| panic!("the harness could not run: {e}"));
    handle.stop(true).await;

    let text = report.render();
    assert!(report.passed(), "{text}");
    assert_eq!(report.invariants.violations, 0, "{text}");
    assert_eq!(report.invariants.server_errors, 0, "{text}");
    assert_eq!(report.cycles, 300, "{text}");
    assert_eq!(report.invariants.procured, 300, "{text}");
    assert_eq!(report.invariants.released, 300, "{text}");
    assert!(report.throughput > 0.0, "{text}");
    assert!(report.cycles_per_sec > 0.0, "{text}");
    let procure = report
        .endpoint("procure")
        .unwrap_or_else(|| panic!("no procure row: {text}"));
    assert_eq!(procure.ok, 300, "{text}");
    assert!(procure.ops_per_sec > 0.0 && procure.p99_ms > 0.0, "{text}");
    for row in ["min-pod-count", "release"] {
        let r = report
            .endpoint(row)
            .unwrap_or_else(|| panic!("no {row} row: {text}"));
        assert_eq!((r.count, r.ok), (300, 300), "{text}");
        assert!(r.errors.is_empty(), "{text}");
    }
    let registered = report.setup.iter().map(|r| r.ok).sum::<u64>();
    assert_eq!(registered, 8, "{text}");
    report
}
