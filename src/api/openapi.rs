//! The OpenAPI 3.0 document of every route, served at `GET /api/1.0/openapi.json`.
//!
//! The document is the hand-maintained `openapi.json` beside this file, compiled in
//! with `include_str!` and parsed once. To add a route: add its path item (reuse the
//! `components`: parameters, error responses, schemas), give every path parameter and
//! request body an `example` (the contract test calls each route with them), and keep
//! `additionalProperties: false` on request objects. Operations specified before their
//! handler exists carry `"x-pending": true`; remove it when the route lands.
//! `tests/integration/openapi.rs` checks the document against the routes in both
//! directions.

use std::sync::OnceLock;

use actix_web::HttpResponse;
use serde_json::Value;

/// The document's source text.
pub const SOURCE: &str = include_str!("openapi.json");

/// The parsed document.
pub fn document() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    // The unit test below parses the same compiled-in text, so this cannot fail in a
    // build whose tests pass.
    DOC.get_or_init(|| {
        serde_json::from_str(SOURCE)
            .unwrap_or_else(|e| panic!("src/api/openapi.json is not valid JSON: {e}"))
    })
}

/// `GET /api/1.0/openapi.json`.
pub async fn serve() -> HttpResponse {
    HttpResponse::Ok().json(document())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_parses_and_is_openapi_3_0() {
        let doc = document();
        assert_eq!(
            doc["openapi"].as_str().and_then(|v| v.get(..4)),
            Some("3.0.")
        );
        assert!(doc["paths"]
            .as_object()
            .is_some_and(|p| p.contains_key("/api/1.0/openapi.json")));
    }
}
