//! Strict JSON request bodies: content type, size limit, unknown fields refused, and a
//! canonical form of the body for idempotency hashing.

use actix_web::http::header;
use actix_web::{web, HttpRequest};
use futures::StreamExt;
use serde::de::DeserializeOwned;

use crate::api::error::ApiError;

/// Largest accepted body.
pub const MAX_BODY: usize = 1024 * 1024;

/// A decoded body and its canonical JSON bytes (keys sorted).
pub struct JsonBody<T> {
    /// The decoded value.
    pub value: T,
    /// Canonical bytes, for hashing.
    pub canonical: Vec<u8>,
}

/// Reads and decodes a JSON body strictly.
pub async fn read_json<T: DeserializeOwned>(
    req: &HttpRequest,
    mut payload: web::Payload,
) -> Result<JsonBody<T>, ApiError> {
    let ctype = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ctype
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if mime != "application/json" && !mime.ends_with("+json") {
        return Err(ApiError::UnsupportedMediaType(format!(
            "content type must be application/json, got {:?}",
            if ctype.is_empty() { "none" } else { ctype }
        )));
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_BODY) {
        return Err(ApiError::PayloadTooLarge(MAX_BODY));
    }
    let mut buf = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("cannot read body: {e}")))?;
        if buf.len() + chunk.len() > MAX_BODY {
            return Err(ApiError::PayloadTooLarge(MAX_BODY));
        }
        buf.extend_from_slice(&chunk);
    }
    if buf.is_empty() {
        return Err(ApiError::BadRequest("request body is empty".into()));
    }
    let raw: serde_json::Value = serde_json::from_slice(&buf)
        .map_err(|e| ApiError::BadRequest(format!("body is not valid JSON: {e}")))?;
    if !raw.is_object() {
        return Err(ApiError::BadRequest("body must be a JSON object".into()));
    }
    let canonical = serde_json::to_vec(&raw).unwrap_or_default();
    let value = serde_json::from_value(raw)
        .map_err(|e| ApiError::BadRequest(format!("invalid body: {e}")))?;
    Ok(JsonBody { value, canonical })
}
