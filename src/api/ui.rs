//! The web console: static HTML, CSS and JavaScript compiled into the binary and served
//! at `/ui`. The assets carry no data, so they are public (see
//! [`crate::api::middleware::PUBLIC_PATHS`]); the page reads everything through the
//! token-protected `/api/` routes. Also `GET /api/1.0/environments`, the configured
//! environments the console offers (protected like every `/api/` route).

use std::sync::OnceLock;

use actix_web::http::header::{self, HeaderValue};
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::api::{method_not_allowed, AppState};

/// One embedded file.
pub struct Asset {
    /// The path it is served at.
    pub path: &'static str,
    /// Its `Content-Type`.
    pub content_type: &'static str,
    /// Its bytes.
    pub body: &'static [u8],
}

const INDEX: &[u8] = include_bytes!("../ui/index.html");

/// Every file of the console, by the path it is served at. `/ui` and `/ui/` serve
/// `index.html` too (see [`PAGE_PATHS`]).
pub const ASSETS: &[Asset] = &[
    Asset {
        path: "/ui/index.html",
        content_type: "text/html; charset=utf-8",
        body: INDEX,
    },
    Asset {
        path: "/ui/app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../ui/app.js"),
    },
    Asset {
        path: "/ui/style.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../ui/style.css"),
    },
    Asset {
        path: "/ui/favicon.svg",
        content_type: "image/svg+xml",
        body: include_bytes!("../ui/favicon.svg"),
    },
];

/// The other spellings of the console's page (both serve `index.html`).
pub const PAGE_PATHS: &[&str] = &["/ui", "/ui/"];

/// The policy every console response carries: only this origin's own script, style,
/// images and connections; no inline script or style, no plugins, no framing.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
style-src 'self'; img-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; \
form-action 'self'; frame-ancestors 'none'";

/// Registers `/ui`, the assets and `GET /api/1.0/environments`. (`/` stays unrouted: an
/// unauthenticated caller learns nothing from it, see `middleware::auth`.)
pub fn configure(cfg: &mut web::ServiceConfig) {
    for path in PAGE_PATHS {
        cfg.service(
            web::resource(*path)
                .get(move |req: HttpRequest| async move { serve(&req, &ASSETS[0]) })
                .default_service(web::to(method_not_allowed)),
        );
    }
    for (n, asset) in ASSETS.iter().enumerate() {
        cfg.service(
            web::resource(asset.path)
                .get(move |req: HttpRequest| async move { serve(&req, &ASSETS[n]) })
                .default_service(web::to(method_not_allowed)),
        );
    }
    cfg.service(
        web::resource("/api/1.0/environments")
            .get(environments)
            .default_service(web::to(method_not_allowed)),
    );
}

/// The strong `ETag` of each asset (a digest of its bytes), computed once.
fn etags() -> &'static [String] {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    TAGS.get_or_init(|| {
        ASSETS
            .iter()
            .map(|a| format!("\"{}\"", &hex::encode(Sha256::digest(a.body))[..32]))
            .collect()
    })
}

fn serve(req: &HttpRequest, asset: &Asset) -> HttpResponse {
    let etag = ASSETS
        .iter()
        .position(|a| a.path == asset.path)
        .and_then(|n| etags().get(n))
        .map(String::as_str)
        .unwrap_or_default();
    let fresh = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut resp = if fresh {
        HttpResponse::NotModified()
    } else {
        HttpResponse::Ok()
    };
    // Revalidate on every load: the names carry no version, and a new binary brings
    // new files under the same names.
    resp.insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header((
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .insert_header((header::X_FRAME_OPTIONS, "DENY"));
    if !etag.is_empty() {
        resp.insert_header((header::ETAG, etag));
    }
    if fresh {
        return resp.finish();
    }
    resp.content_type(asset.content_type).body(asset.body)
}

/// `GET /api/1.0/environments`: `{"data": ["int", "prod"]}` (`RM_ENVS`, in order).
async fn environments(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(json!({ "data": state.config.envs }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_is_public_and_nothing_else_under_ui_is() {
        let public = crate::api::middleware::PUBLIC_PATHS;
        for a in ASSETS {
            assert!(public.contains(&a.path), "{} is not public", a.path);
        }
        for p in PAGE_PATHS {
            assert!(public.contains(p), "{p} is not public");
        }
        let under_ui = public.iter().filter(|p| p.starts_with("/ui")).count();
        assert_eq!(under_ui, ASSETS.len() + PAGE_PATHS.len());
    }

    #[test]
    fn the_page_loads_no_inline_script_or_style() {
        let html = std::str::from_utf8(INDEX).unwrap_or_default();
        assert!(html.contains(r#"<script type="module" src="/ui/app.js"></script>"#));
        assert_eq!(
            html.matches("<script").count(),
            1,
            "one external script only"
        );
        assert!(!html.contains("<style"), "no inline style element");
        assert!(!html.contains(" style="), "no style attribute");
        let handler = html.match_indices(" on").any(|(i, _)| {
            let rest = &html[i + 3..];
            let name: String = rest.chars().take_while(char::is_ascii_alphabetic).collect();
            !name.is_empty() && rest[name.len()..].starts_with('=')
        });
        assert!(!handler, "no inline event handler attribute");
    }
}
