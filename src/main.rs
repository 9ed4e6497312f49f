//! Entry point: configuration, telemetry, the service, the HTTP server; then it waits
//! for SIGINT/SIGTERM and shuts down gracefully.

use std::process::ExitCode;

use actix_web::HttpServer;
use resource_plane::app::Service;
use resource_plane::config::Config;
use resource_plane::{api, telemetry};
use tracing::{error, info};

/// EX_USAGE: the configuration is wrong.
const EX_USAGE: u8 = 64;

fn main() -> ExitCode {
    let config = match Config::from_process_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("resource-plane: invalid configuration: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    telemetry::init_tracing(config.log_format);
    match actix_web::rt::System::new().block_on(serve(config)) {
        Ok(code) => code,
        Err(e) => {
            error!(error = %e, "server failed");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> std::io::Result<ExitCode> {
    let (host, port, workers) = (config.host.clone(), config.port, config.http_workers);
    let mode = if config.use_mock_adapters {
        "memory"
    } else {
        "etcd"
    };
    let service = match Service::start(config) {
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
    server.run().await?;
    info!("resource-plane stopped");
    Ok(ExitCode::SUCCESS)
}
