//! `GET /api/1.0/events`: the change stream as Server-Sent Events. Validates the
//! filters and the resume point, then hands the subscription's stream to the client.

use actix_web::http::header::{self, HeaderValue};
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;

use crate::actors::events::{Filter, Kind, SubscribeError};
use crate::api::error::ApiError;
use crate::api::{method_not_allowed, AppState};

/// Registers the route.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api/1.0/events")
            .get(events)
            .default_service(web::to(method_not_allowed)),
    );
}

/// Query of `GET /api/1.0/events`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    /// Comma-separated kinds (default: all).
    kinds: Option<String>,
    /// Only shadow deployables of this environment.
    env: Option<String>,
    /// Resume after this revision (the `Last-Event-ID` header wins).
    since: Option<String>,
}

fn parse_kinds(raw: &str) -> Result<Vec<Kind>, ApiError> {
    raw.split(',')
        .map(|k| {
            Kind::parse(k.trim()).ok_or_else(|| {
                let known: Vec<&str> = Kind::ALL.iter().map(|k| k.name()).collect();
                ApiError::BadRequest(format!(
                    "unknown kind {k:?} in kinds; expected a comma-separated list of: {}",
                    known.join(", ")
                ))
            })
        })
        .collect()
}

fn parse_revision(raw: &str, what: &str) -> Result<i64, ApiError> {
    raw.trim()
        .parse::<i64>()
        .ok()
        .filter(|r| *r >= 0)
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "{what} must be a store revision (a non-negative integer)"
            ))
        })
}

/// The change stream.
async fn events(
    state: web::Data<AppState>,
    req: HttpRequest,
    query: web::Query<EventsQuery>,
) -> Result<HttpResponse, ApiError> {
    let kinds = match query.kinds.as_deref() {
        Some(raw) => parse_kinds(raw)?,
        None => Vec::new(),
    };
    let env = query.env.as_deref().map(|e| state.env(e)).transpose()?;
    let header = req
        .headers()
        .get("last-event-id")
        .map(|v| {
            v.to_str()
                .map_err(|_| ApiError::BadRequest("Last-Event-ID must be ASCII".into()))
        })
        .transpose()?;
    let since = match (header, query.since.as_deref()) {
        (Some(h), _) => Some(parse_revision(h, "Last-Event-ID")?),
        (None, Some(q)) => Some(parse_revision(q, "since")?),
        (None, None) => None,
    };
    let sub = state
        .events
        .subscribe(Filter::new(&kinds, env), since)
        .await
        .map_err(|e| match e {
            SubscribeError::TooMany(_) => ApiError::Unavailable {
                message: e.to_string(),
                retry_after: state.config.retry_after,
            },
            SubscribeError::Store(e) => ApiError::from_store(e, state.config.retry_after),
        })?;
    let body = futures::StreamExt::map(sub.into_stream(), Ok::<_, std::convert::Infallible>);
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "text/event-stream"))
        .insert_header((header::CACHE_CONTROL, HeaderValue::from_static("no-cache")))
        // nginx and similar proxies: pass each event on at once.
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body))
}
