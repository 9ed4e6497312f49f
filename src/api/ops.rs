//! Operational routes: health probes, Prometheus metrics, actor introspection.

use std::time::Duration;

use actix_web::{web, HttpResponse};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::json;

use crate::actors::registry::SHADOW_KIND;
use crate::actors::shadow::ShadowKey;
use crate::actors::stats::ActorInfo;
use crate::actors::worker::WORKER_KIND;
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
        .body(state.metrics.render() + &state.events.metrics.render())
}

/// The largest page of `GET /api/1.0/actors`, and its size when `limit` is absent.
pub const MAX_ACTORS_PAGE: usize = 500;

/// Query of `GET /api/1.0/actors`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActorsQuery {
    /// Page size, 1..=`MAX_ACTORS_PAGE` (default `MAX_ACTORS_PAGE`).
    limit: Option<usize>,
    /// Where the previous page ended (opaque).
    #[serde(rename = "continue")]
    cont: Option<String>,
}

/// The opaque `continue` token after `a`: its place in the (kind, id) order.
fn continue_token(a: &ActorInfo) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}\n{}", a.kind, a.id))
}

fn parse_continue(token: &str) -> Result<(String, String), ApiError> {
    let bad = || ApiError::BadRequest("invalid continue token".into());
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let (kind, id) = text.split_once('\n').ok_or_else(bad)?;
    Ok((kind.to_owned(), id.to_owned()))
}

/// Entity actors (every shadow deployable's, running or not yet started, and every
/// worker's; instances are records, not actors, and are not listed), ordered by kind
/// then id, a page at a time.
async fn actors(
    state: web::Data<AppState>,
    query: web::Query<ActorsQuery>,
) -> Result<HttpResponse, ApiError> {
    let limit = query.limit.unwrap_or(MAX_ACTORS_PAGE);
    if !(1..=MAX_ACTORS_PAGE).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_ACTORS_PAGE}"
        )));
    }
    let after = query.cont.as_deref().map(parse_continue).transpose()?;
    let mut all = state.registry.actors();
    all.extend(state.controller.workers.actors());
    all.sort_by(|a, b| (a.kind, &a.id).cmp(&(b.kind, &b.id)));
    let mut page: Vec<ActorInfo> = all
        .into_iter()
        .filter(|a| match &after {
            Some((kind, id)) => (a.kind, a.id.as_str()) > (kind.as_str(), id.as_str()),
            None => true,
        })
        .take(limit + 1)
        .collect();
    let more = page.len() > limit;
    page.truncate(limit);
    let mut body = json!({ "data": page });
    if more {
        if let Some(last) = page.last() {
            body["continue"] = json!(continue_token(last));
        }
    }
    Ok(HttpResponse::Ok().json(body))
}

async fn actor(
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (kind, id) = path.into_inner();
    let not_found = || ApiError::NotFound(format!("no actor {kind}/{id}"));
    let info = match kind.as_str() {
        SHADOW_KIND => {
            let (env, name) = id.split_once('/').ok_or_else(not_found)?;
            state.registry.actor(&ShadowKey::new(env, name))
        }
        WORKER_KIND => state.controller.workers.actor(&id),
        _ => None,
    };
    info.map(|a| HttpResponse::Ok().json(a))
        .ok_or_else(not_found)
}
