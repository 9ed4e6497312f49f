//! Paged list answers, Kubernetes style: `limit` bounds a page, an opaque `continue`
//! token says where the previous page ended (the last key it served, in the list's
//! stable key order), and an answer with more entries after it carries the token.
//! Without `limit` a list answers at most [`MAX_LIST_PAGE`] entries.

use std::sync::Arc;

use actix_web::HttpResponse;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use crate::api::error::ApiError;

/// The largest page of the shadow deployable and instance lists, and the page size
/// when `limit` is absent.
pub const MAX_LIST_PAGE: usize = 10_000;

/// The page size asked for, checked against `1..=MAX_LIST_PAGE`.
pub fn limit(asked: Option<usize>) -> Result<usize, ApiError> {
    let limit = asked.unwrap_or(MAX_LIST_PAGE);
    if (1..=MAX_LIST_PAGE).contains(&limit) {
        Ok(limit)
    } else {
        Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_LIST_PAGE}"
        )))
    }
}

/// The token after `key` in a list of `kind` (the kind keeps a token of one list from
/// being taken by another).
pub fn token(kind: &str, key: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{kind}\n{key}"))
}

/// The key a `kind` token ends at; 400 for anything that is not such a token.
pub fn after(kind: &str, token: Option<&str>) -> Result<Option<String>, ApiError> {
    let Some(token) = token else { return Ok(None) };
    let bad = || ApiError::BadRequest("invalid continue token".into());
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    match text.split_once('\n') {
        Some((k, key)) if k == kind && !key.is_empty() => Ok(Some(key.to_owned())),
        _ => Err(bad()),
    }
}

/// `{"data":[...]}` from ready-made JSON entries, with `"continue"` when `more_after`
/// names the last key served and more follow.
pub fn answer(kind: &str, items: &[Arc<str>], more_after: Option<&str>) -> HttpResponse {
    let len: usize = items.iter().map(|i| i.len() + 1).sum();
    let mut body = String::with_capacity(len + 64);
    body.push_str("{\"data\":[");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(item);
    }
    body.push(']');
    if let Some(last) = more_after {
        // Base64url: nothing to escape inside the JSON string.
        body.push_str(",\"continue\":\"");
        body.push_str(&token(kind, last));
        body.push('"');
    }
    body.push('}');
    HttpResponse::Ok()
        .content_type("application/json")
        .body(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_refuse_other_lists_and_garbage() {
        let t = token("shadow", "d-07");
        assert_eq!(
            after("shadow", Some(&t)).ok().flatten().as_deref(),
            Some("d-07")
        );
        assert!(after("instances", Some(&t)).is_err());
        for bad in [
            "",
            "%%%",
            "bm90LWEtdG9rZW4",
            &URL_SAFE_NO_PAD.encode("shadow\n"),
        ] {
            assert!(after("shadow", Some(bad)).is_err(), "{bad:?}");
        }
        assert_eq!(after("shadow", None).ok(), Some(None));
    }

    #[test]
    fn limits_outside_the_range_are_refused() {
        assert_eq!(limit(None).ok(), Some(MAX_LIST_PAGE));
        assert_eq!(limit(Some(7)).ok(), Some(7));
        assert!(limit(Some(0)).is_err());
        assert!(limit(Some(MAX_LIST_PAGE + 1)).is_err());
    }
}
