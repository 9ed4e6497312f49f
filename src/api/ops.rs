//! Operational routes: health probes, Prometheus metrics, actor introspection.

use std::time::Duration;

use actix_web::{web, HttpResponse};
use serde_json::json;

use crate::actors::registry::SHADOW_KIND;
use crate::actors::shadow::ShadowKey;
use crate::api::error::ApiError;
use crate::api::{method_not_allowed, AppState};

/// Registers the routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/health")
            .get(live)
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/health/self")
            .get(live)
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/health/ready")
            .get(ready)
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/metrics")
            .get(metrics)
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/api/1.0/actors")
            .get(actors)
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/api/1.0/actors/{kind}/{id:.*}")
            .get(actor)
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/api/1.0/openapi.json")
            .get(crate::api::openapi::serve)
            .default_service(web::to(method_not_allowed)),
    );
}

async fn live() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

async fn ready(state: web::Data<AppState>) -> HttpResponse {
    let store = tokio::time::timeout(Duration::from_secs(2), state.store.health()).await;
    let store_ok = matches!(store, Ok(Ok(())));
    let hydrated = state.is_hydrated();
    let body = json!({
        "status": if store_ok && hydrated { "ready" } else { "not ready" },
        "store": if store_ok { "ok" } else { "unavailable" },
        "hydrated": hydrated,
    });
    if store_ok && hydrated {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable()
            .insert_header(("Retry-After", state.config.retry_after.to_string()))
            .json(body)
    }
}

async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render())
}

async fn actors(state: web::Data<AppState>) -> HttpResponse {
    let mut data = state.registry.actors();
    data.extend(state.controller.workers.actors());
    data.extend(crate::api::controller::instance_infos(&state));
    HttpResponse::Ok().json(json!({ "data": data }))
}

async fn actor(
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (kind, id) = path.into_inner();
    let not_found = || ApiError::NotFound(format!("no live actor {kind}/{id}"));
    if kind != SHADOW_KIND {
        let mut all = state.controller.workers.actors();
        all.extend(crate::api::controller::instance_infos(&state));
        return all
            .into_iter()
            .find(|a| a.kind == kind && a.id == id)
            .map(|a| HttpResponse::Ok().json(a))
            .ok_or_else(not_found);
    }
    let (env, name) = id.split_once('/').ok_or_else(not_found)?;
    let info = state
        .registry
        .actor(&ShadowKey::new(env, name))
        .ok_or_else(not_found)?;
    Ok(HttpResponse::Ok().json(info))
}
