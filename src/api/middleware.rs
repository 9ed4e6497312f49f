//! HTTP middleware: request id (echoed or generated, on every log line of the request),
//! access log and metrics, and bearer-token auth, deny by default: every path needs the
//! token except the few in [`PUBLIC_PATHS`].

use std::time::Instant;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue, AUTHORIZATION};
use actix_web::middleware::Next;
use actix_web::{web, ResponseError};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tracing::field::Empty;
use tracing::{info, info_span, Instrument};

use crate::api::error::ApiError;
use crate::api::AppState;
use crate::otel;

/// The request id header.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

fn request_id(req: &ServiceRequest) -> String {
    req.headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.chars().all(|c| c.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// Request id, access log and metrics around every request.
pub async fn request_context(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let id = request_id(&req);
    let start = Instant::now();
    let method = req.method().to_string();
    let path = req.path().to_owned();
    let metrics = req
        .app_data::<web::Data<AppState>>()
        .map(|s| s.metrics.clone());
    // The `otel.*` and `http.*` fields are filled in only when traces are exported.
    let span = info_span!(
        "request",
        request_id = %id,
        method = %method,
        path = %path,
        otel.name = Empty,
        otel.kind = Empty,
        otel.status_code = Empty,
        http.route = Empty,
        http.response.status_code = Empty,
    );
    if otel::enabled() {
        otel::continue_trace(&span, req.headers());
        // Named by the route pattern the path matches (the resource map knows it before
        // routing), never by the raw path, which holds ids. Set before the span starts.
        let pattern = req.match_pattern();
        let route = pattern.as_deref().unwrap_or("unmatched");
        otel::rename(&span, || format!("{method} {route}"));
        span.record("otel.kind", "server");
        span.record("http.route", route);
    }
    let mut res = next
        .call(req)
        .instrument(span.clone())
        .await?
        .map_into_boxed_body();
    let status = res.status().as_u16();
    let route = res
        .request()
        .match_pattern()
        .unwrap_or_else(|| "unmatched".to_owned());
    if let Some(m) = metrics {
        m.http_requests
            .with_label_values(&[&route, &method, &status.to_string()])
            .inc();
        m.http_latency
            .with_label_values(&[&route])
            .observe(start.elapsed().as_secs_f64());
    }
    if otel::enabled() {
        span.record("http.response.status_code", status);
        if status >= 500 {
            span.record("otel.status_code", "error");
        }
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        res.headers_mut().insert(REQUEST_ID, v);
    }
    span.in_scope(|| {
        info!(
            status,
            latency_ms = start.elapsed().as_secs_f64() * 1000.0,
            "request completed"
        )
    });
    Ok(res)
}

/// The only paths served without the token when `API_AUTH_TOKEN` is set: probes,
/// metrics, and the web console's static files (they carry no data; the page reads
/// everything through `/api/`, which needs the token). Every other path, whether a route
/// matches it or not, needs the token.
pub const PUBLIC_PATHS: &[&str] = &[
    "/health",
    "/health/ready",
    "/health/self",
    "/metrics",
    "/ui",
    "/ui/",
    "/ui/index.html",
    "/ui/app.js",
    "/ui/style.css",
    "/ui/favicon.svg",
];

/// Whether `req` may be served without the token. Decided on the path the router
/// matches (`match_info().as_str()`: the request path percent-decoded exactly as the router
/// decodes it), and only by exact equality with a public route's static pattern, which
/// is how the router matches those; so no spelling of a protected route (encoded
/// letters or slashes, doubled slashes, dot segments, case) can be taken for a public one.
pub fn is_public(req: &ServiceRequest) -> bool {
    PUBLIC_PATHS.contains(&req.match_info().as_str())
}

/// Requires `Authorization: Bearer <API_AUTH_TOKEN>` on every path but [`PUBLIC_PATHS`]
/// when a token is set. Without the token, a path that routes nowhere is 401 as well,
/// so an unauthenticated caller learns nothing about which paths exist.
pub async fn auth(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let token = req
        .app_data::<web::Data<AppState>>()
        .and_then(|s| s.config.api_token.clone());
    if let Some(token) = token {
        if !is_public(&req) && !authorized(&req, token.expose()) {
            let resp = ApiError::Unauthorized.error_response();
            return Ok(req.into_response(resp));
        }
    }
    Ok(next.call(req).await?.map_into_boxed_body())
}

fn authorized(req: &ServiceRequest, token: &str) -> bool {
    let presented = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Compare digests so the comparison takes the same time whatever the lengths.
    let a = Sha256::digest(presented.as_bytes());
    let b = Sha256::digest(token.as_bytes());
    !presented.is_empty() && bool::from(a.ct_eq(&b))
}
