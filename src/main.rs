//! Entry point: configuration, telemetry, the service, the HTTP server; then it waits
//! for SIGINT/SIGTERM and shuts down gracefully.
//!
//! `resource-plane` (or `resource-plane serve`) runs the service;
//! `resource-plane loadtest …` runs the load-test harness against a running one;
//! `resource-plane soak-check …` judges a soak's history (`scripts/soak.sh`).

use std::process::ExitCode;

use actix_web::HttpServer;
use clap::{Parser, Subcommand};
use resource_plane::app::Service;
use resource_plane::config::Config;
use resource_plane::loadtest::soak_check::{self, SoakCheckArgs};
use resource_plane::loadtest::{self, LoadtestArgs};
use resource_plane::{api, telemetry};
use tracing::{error, info};

/// mimalloc instead of glibc's malloc: with a large fleet loaded, glibc's `_int_malloc`
/// and `malloc_consolidate` grew to the largest per-change cost that depended on fleet
/// size (profiled with `scripts/scale.sh` and `SCALE_PERF`; see README, Measured).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// EX_USAGE: the configuration is wrong.
const EX_USAGE: u8 = 64;

/// Command line: no subcommand serves.
#[derive(Debug, Parser)]
#[command(
    name = "resource-plane",
    version,
    about = "Actor-based infrastructure control plane"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service (the default); configured by environment variables.
    Serve,
    /// Drive a running service with simulated workflows and check its invariants.
    Loadtest(Box<LoadtestArgs>),
    /// Judge a soak: its history against etcd's history and the EC2 launches.
    SoakCheck(Box<SoakCheckArgs>),
}

fn main() -> ExitCode {
    match Cli::parse().command {
        None | Some(Command::Serve) => serve_main(),
        Some(Command::Loadtest(args)) => tool_main("loadtest", loadtest::main(*args)),
        Some(Command::SoakCheck(args)) => tool_main("soak-check", soak_check::main(*args)),
    }
}

/// Runs a tool subcommand on a multi-threaded runtime; its result is the exit code.
fn tool_main(name: &str, task: impl std::future::Future<Output = u8>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("resource-plane {name}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    ExitCode::from(runtime.block_on(task))
}

fn serve_main() -> ExitCode {
    let config = match Config::from_process_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("resource-plane: invalid configuration: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let traces = match telemetry::init_tracing(config.log_format, config.traces.as_ref()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("resource-plane: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let code = match actix_web::rt::System::new().block_on(serve(config)) {
        Ok(code) => code,
        Err(e) => {
            error!(error = %e, "server failed");
            ExitCode::FAILURE
        }
    };
    // Outside the runtime: export the spans still buffered.
    if let Some(t) = traces {
        t.shutdown();
    }
    code
}

async fn serve(config: Config) -> std::io::Result<ExitCode> {
    let (host, port, workers) = (config.host.clone(), config.port, config.http_workers);
    let mode = if config.use_mock_adapters {
        "memory"
    } else {
        "etcd"
    };
    let service = match Service::start(config).await {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "invalid configuration");
            return Ok(ExitCode::from(EX_USAGE));
        }
    };
    let state = service.state.clone();
    let server = HttpServer::new(move || api::app(state.clone()))
        .workers(workers)
        .shutdown_timeout(10);
    let server = match server.bind((host.as_str(), port)) {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, %host, port, "cannot listen");
            return Ok(ExitCode::from(EX_USAGE));
        }
    };
    info!(%host, port, store = mode, "resource-plane listening");
    // Signals are handled here, not by actix: the change streams must end first, or the
    // graceful stop would wait `shutdown_timeout` for subscribers that never hang up.
    let server = server.disable_signals().run();
    let handle = server.handle();
    let events = service.state.events.clone();
    actix_web::rt::spawn(async move {
        stop_signal().await;
        info!("stop signal: ending change streams, stopping the HTTP server");
        events.close_all();
        handle.stop(true).await;
    });
    server.await?;
    // Stop leader-only work at once so no half-done step races the successor.
    service.shutdown().await;
    info!("resource-plane stopped");
    Ok(ExitCode::SUCCESS)
}

/// Waits for SIGTERM or SIGINT (Ctrl-C); if the handlers cannot be installed, for
/// Ctrl-C only.
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            error!(error = %e, "cannot listen for SIGTERM; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
