//! The HTTP API: routes, contracts, validation, auth and error mapping. It owns no
//! state; handlers validate and send a message to an actor.

pub mod body;
pub mod controller;
pub mod error;
pub mod events;
pub mod middleware;
pub mod openapi;
pub mod operations;
pub mod ops;
pub mod paging;
pub mod shadow;
pub mod ui;

use std::sync::Arc;

use actix_web::dev::{ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::{middleware::from_fn, web, App, Error, HttpRequest, HttpResponse};
use dashmap::DashMap;

use crate::actors::controller::ControllerCtx;
use crate::actors::events::EventHub;
use crate::actors::operations::OpsCtx;
use crate::actors::registry::Registry;
use crate::api::error::ApiError;
use crate::config::Config;
use crate::idempotency::{self, IdemRequest, Reply};
use crate::ports::store::Store;
use crate::telemetry::Metrics;

/// Shared state of the HTTP layer: handles to the actor system, nothing owned.
pub struct AppState {
    /// Configuration.
    pub config: Arc<Config>,
    /// Shadow deployable actors.
    pub registry: Arc<Registry>,
    /// The store (health checks).
    pub store: Arc<dyn Store>,
    /// Metrics.
    pub metrics: Metrics,
    /// Idempotency keys being processed right now on this replica.
    pub inflight: DashMap<String, ()>,
    /// The Resource Controller.
    pub controller: Arc<ControllerCtx>,
    /// Kubernetes operations, intents and callbacks.
    pub ops: Arc<OpsCtx>,
    /// The change stream hub (`GET /api/1.0/events`).
    pub events: Arc<EventHub>,
}

/// Removes an in-flight idempotency key when the request ends.
pub struct InflightGuard<'a> {
    map: &'a DashMap<String, ()>,
    key: String,
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.map.remove(&self.key);
    }
}

impl AppState {
    /// Whether every registry and mirror has loaded its first listing.
    pub fn is_hydrated(&self) -> bool {
        self.registry.is_hydrated()
            && self.controller.workers.is_loaded()
            && self.controller.instances.is_loaded()
            && self.ops.intents.is_loaded()
    }

    /// The canonical environment for a path value, or 400.
    pub fn env(&self, raw: &str) -> Result<String, ApiError> {
        self.config.canonical_env(raw).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "unknown environment {raw:?}; expected one of: {}",
                self.config.envs.join(", ")
            ))
        })
    }

    /// Resolves the request's idempotency key (if any) and marks it in flight; a key
    /// already in flight on this replica is a 409.
    pub fn idempotency(
        &self,
        req: &HttpRequest,
        scope: &str,
        route: &str,
        canonical_body: &[u8],
    ) -> Result<Option<(IdemRequest, InflightGuard<'_>)>, ApiError> {
        let header = req
            .headers()
            .get("x-idempotency-key")
            .or_else(|| req.headers().get("idempotency-key"));
        let Some(header) = header else {
            return Ok(None);
        };
        let key = header
            .to_str()
            .map_err(|_| ApiError::BadRequest("idempotency key must be ASCII".into()))?;
        idempotency::validate_key(key).map_err(ApiError::BadRequest)?;
        let store_key = crate::keys::idempotency(scope, key);
        if self.inflight.insert(store_key.clone(), ()).is_some() {
            self.metrics
                .idempotency
                .with_label_values(&["in_flight"])
                .inc();
            return Err(ApiError::Conflict(
                "a request with this idempotency key is already in progress".into(),
            ));
        }
        let guard = InflightGuard {
            map: &self.inflight,
            key: store_key.clone(),
        };
        Ok(Some((
            IdemRequest {
                store_key,
                hash: idempotency::request_hash(route, canonical_body),
            },
            guard,
        )))
    }
}

/// Builds the whole application on `state`: middleware, routes, JSON fallbacks.
pub fn app(
    state: web::Data<AppState>,
) -> App<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl actix_web::body::MessageBody>,
        Error = Error,
        InitError = (),
    >,
> {
    // actix builds one app per worker thread, on that thread, which then takes that
    // app's requests: the shadow actors those requests start run here too, so a
    // command costs no hop to another thread and back.
    crate::actors::registry::serve_actors_here();
    App::new()
        .app_data(state)
        .app_data(
            web::PathConfig::default()
                .error_handler(|e, _| ApiError::BadRequest(format!("invalid path: {e}")).into()),
        )
        .app_data(
            web::QueryConfig::default()
                .error_handler(|e, _| ApiError::BadRequest(format!("invalid query: {e}")).into()),
        )
        .configure(configure)
        .wrap(from_fn(middleware::auth))
        .wrap(from_fn(middleware::request_context))
}

/// Registers every route. The router tries them in this order, each dynamic one a
/// pattern match, so the busiest (the shadow deployable commands) come first.
pub fn configure(cfg: &mut web::ServiceConfig) {
    shadow::configure(cfg);
    ops::configure(cfg);
    controller::configure(cfg);
    events::configure(cfg);
    operations::configure(cfg);
    ui::configure(cfg);
    cfg.default_service(web::to(not_found));
}

async fn not_found(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound(format!(
        "no route for {} {}",
        req.method(),
        req.path()
    )))
}

/// Counts a replayed idempotent reply in `idempotency_outcomes_total{outcome="replayed"}`.
pub fn note_replayed(state: &AppState, reply: &Reply) {
    if reply.replayed {
        state
            .metrics
            .idempotency
            .with_label_values(&["replayed"])
            .inc();
    }
}

/// The HTTP response of a reply (fresh or replayed for an idempotency key).
pub fn reply_response(reply: &Reply) -> HttpResponse {
    let status = actix_web::http::StatusCode::from_u16(reply.status)
        .unwrap_or(actix_web::http::StatusCode::OK);
    let mut resp = HttpResponse::build(status);
    resp.content_type("application/json");
    if reply.replayed {
        resp.insert_header(("Idempotent-Replayed", "true"));
    }
    resp.body(reply.body.clone())
}

/// 405 for a known path with the wrong method.
pub async fn method_not_allowed() -> Result<HttpResponse, ApiError> {
    Err(ApiError::MethodNotAllowed)
}
