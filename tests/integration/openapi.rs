//! Keeps `src/api/openapi.json` true, in both directions:
//! - every documented (method, path) is served in-process (not the router's 404 "no
//!   route" fallback, not 405), answers its example request with a documented status,
//!   and every documented path answers 405 to an undocumented method;
//! - every route registered in `src/api/*.rs` (found by reading the source) is
//!   documented;
//! - for representative routes, every documented status actually occurs.
//!
//! An operation may be specified before its handler exists by marking it
//! `"x-pending": true` and listing it in `PENDING`: it is then skipped by the "is
//! served" checks and asserted to be still unserved; remove both when it lands.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use actix_web::http::Method;
use actix_web::test::{self, TestRequest};
use resource_plane::adapters::memory::MemoryStore;
use resource_plane::api;
use resource_plane::api::openapi::document;
use resource_plane::config::Secret;
use serde_json::{json, Value};

use crate::support::{self, get, post, put, send, Resp, TestApp};

/// The operations specified ahead of their handlers; the only ones allowed `x-pending`.
/// None today: every documented operation is served.
const PENDING: [(&str, &str); 0] = [];

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// One documented operation.
#[derive(Debug, Clone)]
pub struct Op {
    /// Lowercase method, as in the document.
    pub method: String,
    /// Path template, as in the document.
    pub path: String,
    /// The operation object.
    pub op: Value,
    /// Path-level and operation-level parameters, resolved.
    pub params: Vec<Value>,
    /// `x-pending: true`.
    pub pending: bool,
}

impl Op {
    /// The documented statuses (without `default`).
    pub fn statuses(&self) -> BTreeSet<u16> {
        self.op["responses"]
            .as_object()
            .map(|r| r.keys().filter_map(|k| k.parse().ok()).collect())
            .unwrap_or_default()
    }

    /// The path with every path parameter replaced by its example.
    pub fn example_path(&self) -> String {
        let mut out = self.path.clone();
        for p in self.params.iter().filter(|p| p["in"] == "path") {
            let name = p["name"].as_str().unwrap_or_default();
            let example = p["example"]
                .as_str()
                .unwrap_or_else(|| panic!("{}: path parameter {name} has no example", self.path));
            out = out.replace(&format!("{{{name}}}"), example);
        }
        out
    }

    /// The request body example, if the operation takes a body, with `callback.url`
    /// pointed at a loopback address the SSRF policy refuses: no test resolves or calls
    /// the example's host.
    pub fn example_body(&self) -> Option<Value> {
        let body = resolve(&self.op["requestBody"]);
        if body.is_null() {
            return None;
        }
        let mut example = body["content"]["application/json"]["example"].clone();
        if let Some(url) = example.pointer_mut("/callback/url") {
            *url = json!("https://127.0.0.1:9/refused");
        }
        Some(example)
    }

    /// Its method.
    pub fn http_method(&self) -> Method {
        Method::from_bytes(self.method.to_uppercase().as_bytes())
            .unwrap_or_else(|e| panic!("{}: {e}", self.method))
    }
}

/// Follows a local `$ref` (repeatedly).
pub fn resolve(v: &Value) -> &Value {
    let mut v = v;
    while let Some(r) = v.get("$ref").and_then(Value::as_str) {
        let pointer = r
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("non-local $ref {r}"));
        v = document()
            .pointer(pointer)
            .unwrap_or_else(|| panic!("dangling $ref {r}"));
    }
    v
}

/// Every documented operation.
pub fn operations() -> Vec<Op> {
    let paths = document()["paths"].as_object().cloned().unwrap_or_default();
    let mut out = Vec::new();
    for (path, item) in &paths {
        let shared: Vec<Value> = item["parameters"]
            .as_array()
            .map(|a| a.iter().map(|p| resolve(p).clone()).collect())
            .unwrap_or_default();
        for method in METHODS {
            let Some(op) = item.get(method) else { continue };
            let mut params = shared.clone();
            if let Some(own) = op["parameters"].as_array() {
                params.extend(own.iter().map(|p| resolve(p).clone()));
            }
            out.push(Op {
                method: method.to_owned(),
                path: path.clone(),
                op: op.clone(),
                params,
                pending: op.get("x-pending") == Some(&Value::Bool(true)),
            });
        }
    }
    out
}

/// `(alias prefix, canonical prefix)` pairs of `x-path-aliases`.
pub fn aliases() -> Vec<(String, String)> {
    document()["x-path-aliases"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| {
                    (
                        x["alias"].as_str().unwrap_or_default().to_owned(),
                        x["canonical"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `path` with its canonical prefix replaced by each alias.
fn alias_variants(path: &str) -> Vec<String> {
    aliases()
        .iter()
        .filter_map(|(alias, canonical)| {
            path.strip_prefix(canonical.as_str())
                .map(|rest| format!("{alias}{rest}"))
        })
        .collect()
}

/// `{name}` and `{name:regex}` become `{}`.
fn normalize(path: &str) -> String {
    let mut out = String::new();
    let mut depth = 0;
    for c in path.chars() {
        match c {
            '{' => {
                if depth == 0 {
                    out.push_str("{}");
                }
                depth += 1;
            }
            '}' => depth -= 1,
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

/// A request for `method path` carrying `body` as JSON (if any).
fn request(method: Method, path: &str, body: Option<&Value>) -> TestRequest {
    let req = TestRequest::default().method(method).uri(path);
    match body {
        Some(b) => req.set_json(b),
        None => req,
    }
}

/// Whether the answer is the router's fallback: no route for this path at all.
fn is_no_route(r: &Resp) -> bool {
    r.status == 404 && r.error().starts_with("no route for")
}

/// A fresh in-process service on the memory store, with the example deployable.
async fn fixture(token: Option<&str>) -> (resource_plane::app::Service, Arc<MemoryStore>) {
    let mut cfg = support::config();
    cfg.api_token = token.map(Secret::new);
    let store = Arc::new(MemoryStore::new());
    let svc = support::service(cfg, store.clone()).await;
    (svc, store)
}

fn auth(req: TestRequest, token: Option<&str>) -> TestRequest {
    match token {
        Some(t) => req.insert_header(("authorization", format!("Bearer {t}"))),
        None => req,
    }
}

#[actix_web::test]
async fn the_document_is_served_and_well_formed() {
    let (svc, _store) = fixture(None).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    let r = send(&app, get("/api/1.0/openapi.json").to_request()).await;
    assert_eq!(r.status, 200);
    assert_eq!(&r.json, document());
    assert!(r.headers.contains_key("x-request-id"));

    let doc = document();
    assert!(doc["openapi"]
        .as_str()
        .is_some_and(|v| v.starts_with("3.0.")));
    assert_eq!(
        resolve(&doc["components"]["securitySchemes"]["bearerAuth"])["scheme"],
        "bearer"
    );
    assert_eq!(doc["security"], json!([{"bearerAuth": []}]));

    // every $ref resolves
    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(r) = m.get("$ref").and_then(Value::as_str) {
                    out.push(r.to_owned());
                }
                m.values().for_each(|x| refs(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(doc, &mut all);
    assert!(all.len() > 50);
    for r in &all {
        let _ = resolve(&json!({ "$ref": r }));
    }

    // x-pending only on the operations listed in PENDING
    fn pending_at(v: &Value, at: &str, out: &mut BTreeSet<String>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    let here = format!("{at}/{}", k.replace('~', "~0").replace('/', "~1"));
                    if k == "x-pending" {
                        assert_eq!(x, &Value::Bool(true), "{here}");
                        out.insert(at.to_owned());
                    }
                    pending_at(x, &here, out);
                }
            }
            Value::Array(a) => {
                for (i, x) in a.iter().enumerate() {
                    pending_at(x, &format!("{at}/{i}"), out);
                }
            }
            _ => {}
        }
    }
    let mut found = BTreeSet::new();
    pending_at(doc, "", &mut found);
    let expected: BTreeSet<String> = PENDING
        .iter()
        .map(|(m, p)| format!("/paths/{}/{m}", p.replace('/', "~1")))
        .collect();
    // (each flag is removed when its route lands, so a subset)
    assert!(
        found.is_subset(&expected),
        "x-pending may mark only the operations specified ahead of their handlers: {found:?}"
    );

    let ops = operations();
    assert!(ops.len() >= 25, "{} operations", ops.len());
    let mut ids = BTreeSet::new();
    for op in &ops {
        let at = format!("{} {}", op.method, op.path);
        assert!(
            ids.insert(op.op["operationId"].as_str().unwrap_or_default().to_owned()),
            "{at}: missing or duplicate operationId"
        );
        // every template parameter declared, with an example
        let declared: BTreeSet<&str> = op
            .params
            .iter()
            .filter(|p| p["in"] == "path")
            .filter_map(|p| p["name"].as_str())
            .collect();
        let used: BTreeSet<&str> = op
            .path
            .split('/')
            .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
            .collect();
        assert_eq!(declared, used, "{at}: path parameters");
        let _ = op.example_path();
        assert!(
            op.params
                .iter()
                .any(|p| p["in"] == "header" && p["name"] == "X-Request-ID"),
            "{at}: X-Request-ID parameter"
        );
        // responses: X-Request-ID everywhere; errors are the Error schema
        let responses = op.op["responses"].as_object().cloned().unwrap_or_default();
        assert!(!responses.is_empty(), "{at}: no responses");
        for (code, resp) in &responses {
            let resp = resolve(resp);
            assert!(
                resp["headers"].get("X-Request-ID").is_some(),
                "{at} {code}: X-Request-ID header"
            );
            let error = code == "default" || code.starts_with('4') || code.starts_with('5');
            let readiness = op.path == "/health/ready" && code == "503";
            if error && !readiness {
                let schema = &resp["content"]["application/json"]["schema"];
                assert_eq!(
                    schema["$ref"], "#/components/schemas/Error",
                    "{at} {code}: error schema"
                );
            }
        }
        let api = op.path.starts_with("/api/");
        // /api/ routes are behind the bearer token; probes are open
        if api {
            assert!(responses.contains_key("401"), "{at}: 401");
            assert!(op.op.get("security").is_none(), "{at}: global security");
        } else {
            assert_eq!(op.op["security"], json!([]), "{at}: open");
        }
        // idempotent routes document the replay header and the mismatch
        let idempotent = op
            .params
            .iter()
            .any(|p| p["in"] == "header" && p["name"] == "X-Idempotency-Key");
        if idempotent {
            assert!(responses.contains_key("422"), "{at}: 422");
            assert!(
                op.params
                    .iter()
                    .any(|p| p["in"] == "header" && p["name"] == "Idempotency-Key"),
                "{at}: Idempotency-Key"
            );
        }
        // bodies: JSON only, size-limited, strict
        if let Some(example) = op.example_body() {
            assert!(example.is_object(), "{at}: body example");
            for code in ["400", "413", "415"] {
                assert!(responses.contains_key(code), "{at}: {code}");
            }
            let body = resolve(&op.op["requestBody"]);
            strict(&body["content"]["application/json"]["schema"], &at);
        }
    }
    // every component response used for errors exists
    for name in [
        "BadRequest",
        "Unauthorized",
        "NotFound",
        "MethodNotAllowed",
        "Conflict",
        "PayloadTooLarge",
        "UnsupportedMediaType",
        "Unprocessable",
        "Unavailable",
    ] {
        let r = &doc["components"]["responses"][name];
        assert_eq!(
            r["content"]["application/json"]["schema"]["$ref"], "#/components/schemas/Error",
            "{name}"
        );
    }
}

/// Every object of a request schema states `additionalProperties`, and `false` when it
/// lists properties (free-form maps give a schema for their values instead).
fn strict(schema: &Value, at: &str) {
    let s = resolve(schema);
    if s["type"] == "object" {
        let extra = s
            .get("additionalProperties")
            .unwrap_or_else(|| panic!("{at}: object without additionalProperties: {s}"));
        if s.get("properties").is_some() {
            assert_eq!(extra, &Value::Bool(false), "{at}: {s}");
        }
        if let Some(props) = s["properties"].as_object() {
            for (name, p) in props {
                strict(p, &format!("{at}.{name}"));
            }
        }
        if extra.is_object() {
            strict(extra, &format!("{at}.*"));
        }
    }
    if s["type"] == "array" {
        strict(&s["items"], &format!("{at}[]"));
    }
    for key in ["allOf", "oneOf", "anyOf"] {
        for x in s[key].as_array().into_iter().flatten() {
            strict(x, at);
        }
    }
}

#[actix_web::test]
async fn every_documented_route_is_served() {
    let (svc, _store) = fixture(None).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    // the example deployable exists, so examples reach the handlers' deeper branches
    let r = send(
        &app,
        put(
            "/api/1.0/int/shadow-deployables/int-predator-g2-std-16",
            &json!({"node_pool": "g2-std-16", "dns": "d.example"}),
        )
        .to_request(),
    )
    .await;
    assert_eq!(r.status, 201);

    let ops = operations();
    let mut by_path: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for op in &ops {
        by_path
            .entry(op.path.clone())
            .or_default()
            .insert(op.method.clone());
    }
    for op in &ops {
        let mut paths = vec![op.example_path()];
        paths.extend(alias_variants(&op.example_path()));
        for path in paths {
            let at = format!("{} {path}", op.method);
            let body = op.example_body();
            let r = send(
                &app,
                request(op.http_method(), &path, body.as_ref()).to_request(),
            )
            .await;
            if op.pending {
                // Specified ahead of its handler: skipped, but it must still be
                // unserved. When it lands, remove `x-pending` from the document.
                assert!(
                    is_no_route(&r) || r.status == 405,
                    "{at} is served now ({} {}): remove its x-pending flag",
                    r.status,
                    r.error()
                );
                continue;
            }
            assert!(!is_no_route(&r), "{at}: not routed: {}", r.error());
            assert_ne!(r.status, 405, "{at}: method not allowed");
            assert!(
                op.statuses().contains(&r.status),
                "{at}: example answered {} (undocumented): {}",
                r.status,
                String::from_utf8_lossy(&r.raw)
            );
        }
    }
    // every documented path answers 405 {"error"} to the methods it does not document
    for (path, methods) in &by_path {
        let op = ops
            .iter()
            .find(|o| &o.path == path)
            .unwrap_or_else(|| panic!("{path}"));
        if op.pending {
            continue;
        }
        let mut paths = vec![op.example_path()];
        paths.extend(alias_variants(&op.example_path()));
        for path in paths {
            for m in ["get", "post", "put", "delete", "patch"] {
                if methods.contains(m) {
                    continue;
                }
                let method = Method::from_bytes(m.to_uppercase().as_bytes())
                    .unwrap_or_else(|e| panic!("{e}"));
                let r = send(&app, request(method, &path, None).to_request()).await;
                assert_eq!(r.status, 405, "{m} {path}");
                assert!(r.json["error"].is_string(), "{m} {path}");
            }
        }
    }
}

/// JSON pointers of the example's objects whose schema lists properties (so
/// `additionalProperties: false`), free-form maps excluded.
fn closed_objects(example: &Value, schema: &Value, at: &str, out: &mut Vec<String>) {
    let mut schema = resolve(schema);
    if let Some(first) = schema["allOf"].as_array().and_then(|a| a.first()) {
        schema = resolve(first);
    }
    match example {
        Value::Object(fields) if schema["properties"].is_object() => {
            out.push(at.to_owned());
            for (k, v) in fields {
                let sub = &schema["properties"][k];
                if !sub.is_null() {
                    closed_objects(v, sub, &format!("{at}/{k}"), out);
                }
            }
        }
        Value::Array(items) if !schema["items"].is_null() => {
            for (i, v) in items.iter().enumerate() {
                closed_objects(v, &schema["items"], &format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

#[actix_web::test]
async fn unknown_fields_are_refused_at_every_level() {
    // `additionalProperties: false` on every request object is a promise: an unknown
    // field anywhere in a body is 400 naming it, before anything happens.
    let (svc, _store) = fixture(None).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    let mut checked = 0;
    for op in operations().iter().filter(|o| !o.pending) {
        let Some(example) = op.example_body() else {
            continue;
        };
        let schema = &resolve(&op.op["requestBody"])["content"]["application/json"]["schema"];
        let mut objects = Vec::new();
        closed_objects(&example, schema, "", &mut objects);
        assert!(!objects.is_empty(), "{} {}", op.method, op.path);
        for pointer in objects {
            let mut body = example.clone();
            if let Some(Value::Object(o)) = body.pointer_mut(&pointer) {
                o.insert("x_unknown_field".into(), json!(true));
            }
            let at = format!("{} {} at {pointer:?}", op.method, op.path);
            let r = send(
                &app,
                request(op.http_method(), &op.example_path(), Some(&body)).to_request(),
            )
            .await;
            assert_eq!(r.status, 400, "{at}: {}", r.error());
            assert!(r.error().contains("x_unknown_field"), "{at}: {}", r.error());
            checked += 1;
        }
    }
    assert!(checked >= 7, "{checked}");
}

/// One string literal of a source file and the callee it is the first argument of.
struct Literal {
    callee: String,
    text: String,
    line: usize,
}

/// String literals that are the first argument of a call, comments skipped.
fn call_literals(src: &str) -> Vec<Literal> {
    let code: String = src
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("//") {
                ""
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let chars: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '\'' && i + 2 < chars.len() && chars[i + 2] == '\'' {
            i += 3; // a char literal such as '"'
            continue;
        }
        if chars[i] != '"' {
            i += 1;
            continue;
        }
        let start = i;
        let mut text = String::new();
        i += 1;
        while i < chars.len() && chars[i] != '"' {
            if chars[i] == '\\' {
                i += 1;
            }
            if let Some(c) = chars.get(i) {
                text.push(*c);
            }
            i += 1;
        }
        i += 1;
        let before: String = chars[..start].iter().collect();
        let before = before.trim_end();
        if let Some(call) = before.strip_suffix('(') {
            let callee: String = call
                .chars()
                .rev()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '!')
                .collect::<String>()
                .chars()
                .rev()
                .collect();
            let line = code[..chars[..start].iter().map(|c| c.len_utf8()).sum::<usize>()]
                .lines()
                .count();
            out.push(Literal { callee, text, line });
        }
    }
    out
}

/// `for ident in ["a", "b"]` loops of a source file: ident -> values.
fn for_loops(src: &str) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for (i, _) in src.match_indices("for ") {
        let rest = &src[i + 4..];
        let Some((ident, tail)) = rest.split_once(" in [") else {
            continue;
        };
        if !ident.chars().all(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let Some((list, _)) = tail.split_once(']') else {
            continue;
        };
        let values: Vec<String> = list
            .split(',')
            .map(|v| v.trim().trim_matches('"').to_owned())
            .filter(|v| !v.is_empty())
            .collect();
        out.insert(ident.to_owned(), values);
    }
    out
}

/// Expands a `format!` route literal: `{{`/`}}` are braces, `{ident}` takes each value
/// of a `for ident in [...]` loop of the same file.
fn expand(text: &str, loops: &BTreeMap<String, Vec<String>>, at: &str) -> Vec<String> {
    let mut outs = vec![String::new()];
    let mut rest = text;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("{{") {
            outs.iter_mut().for_each(|o| o.push('{'));
            rest = r;
        } else if let Some(r) = rest.strip_prefix("}}") {
            outs.iter_mut().for_each(|o| o.push('}'));
            rest = r;
        } else if let Some(r) = rest.strip_prefix('{') {
            let (ident, r) = r
                .split_once('}')
                .unwrap_or_else(|| panic!("{at}: unbalanced format string {text:?}"));
            let values = loops.get(ident).unwrap_or_else(|| {
                panic!("{at}: cannot expand {{{ident}}} in {text:?}; teach tests/integration/openapi.rs")
            });
            outs = outs
                .iter()
                .flat_map(|o| values.iter().map(move |v| format!("{o}{v}")))
                .collect();
            rest = r;
        } else {
            let c = rest.chars().next().unwrap_or_default();
            outs.iter_mut().for_each(|o| o.push(c));
            rest = &rest[c.len_utf8()..];
        }
    }
    outs
}

/// Every route path registered in `src/api/*.rs`, as written (params not normalized).
pub fn registered_paths() -> BTreeSet<String> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/api");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .collect();
    files.sort();
    let mut out = BTreeSet::new();
    for file in files {
        let src = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{file:?}: {e}"));
        let loops = for_loops(&src);
        for lit in call_literals(&src) {
            let is_route = lit.text.starts_with("/api/1.0/")
                || lit.text == "/health"
                || lit.text.starts_with("/health/")
                || lit.text == "/metrics";
            if !is_route {
                continue;
            }
            let at = format!("{}:{}", file.display(), lit.line);
            if lit.callee == "format!" {
                out.extend(expand(&lit.text, &loops, &at));
            } else {
                assert!(
                    !lit.text.contains("{{"),
                    "{at}: {:?} looks like a format string",
                    lit.text
                );
                out.insert(lit.text);
            }
        }
    }
    out
}

#[test]
fn every_registered_route_is_documented() {
    let registered = registered_paths();
    // the scan must see the known routes, or it is broken
    for known in [
        "/health",
        "/metrics",
        "/api/1.0/openapi.json",
        "/api/1.0/actors/{kind}/{id:.*}",
        "/api/1.0/instances/{id}/complete",
        "/api/1.0/{env}/shadow-deployables/min-pod-count",
        "/api/1.0/{env}/shadow-deploybles/{name}",
    ] {
        assert!(
            registered.contains(known),
            "scan missed {known}: {registered:?}"
        );
    }
    let ops = operations();
    let documented: BTreeSet<String> = ops
        .iter()
        .filter(|o| !o.pending)
        .map(|o| normalize(&o.path))
        .collect();
    let pending: BTreeSet<String> = ops
        .iter()
        .filter(|o| o.pending)
        .map(|o| normalize(&o.path))
        .collect();
    let aliases: Vec<(String, String)> = aliases()
        .into_iter()
        .map(|(a, c)| (normalize(&a), normalize(&c)))
        .collect();
    assert_eq!(
        aliases,
        vec![(
            "/api/1.0/{}/shadow-deploybles".to_owned(),
            "/api/1.0/{}/shadow-deployables".to_owned()
        )]
    );
    let canonical = |p: &str| -> String {
        aliases
            .iter()
            .find_map(|(a, c)| p.strip_prefix(a.as_str()).map(|rest| format!("{c}{rest}")))
            .unwrap_or_else(|| p.to_owned())
    };
    let served: BTreeSet<String> = registered.iter().map(|p| normalize(p)).collect();
    for path in &served {
        let c = canonical(path);
        assert!(
            documented.contains(&c),
            "{path} is registered but not documented in src/api/openapi.json{}",
            if pending.contains(&c) {
                " (it is marked x-pending: remove the flag now that it is served)"
            } else {
                ""
            }
        );
    }
    for path in &documented {
        assert!(
            served.contains(path),
            "{path} is documented but not registered"
        );
        for (alias, canon) in &aliases {
            if let Some(rest) = path.strip_prefix(canon.as_str()) {
                let aliased = format!("{alias}{rest}");
                assert!(served.contains(&aliased), "alias {aliased} not registered");
            }
        }
    }
}

/// Asserts that `observed` are all documented for `method path` and that every
/// documented status was observed, except `unreachable` ones (with the reason).
fn assert_statuses(method: &str, path: &str, observed: &BTreeSet<u16>, unreachable: &[u16]) {
    let op = operations()
        .into_iter()
        .find(|o| o.method == method && o.path == path)
        .unwrap_or_else(|| panic!("{method} {path} not documented"));
    let documented = op.statuses();
    let undocumented: BTreeSet<_> = observed.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "{method} {path} answered undocumented {undocumented:?}"
    );
    let missing: BTreeSet<_> = documented
        .iter()
        .filter(|s| !observed.contains(s) && !unreachable.contains(s))
        .collect();
    assert!(
        missing.is_empty(),
        "{method} {path}: documented {missing:?} never observed"
    );
}

/// Sends and records the status; error bodies must be `{"error": string}`.
async fn note<S: TestApp>(app: &S, seen: &mut BTreeSet<u16>, req: TestRequest) -> Resp {
    let r = send(app, req.to_request()).await;
    if r.status >= 400 && !(r.status == 503 && r.json.get("hydrated").is_some()) {
        assert!(r.json["error"].is_string(), "{}: {:?}", r.status, r.json);
    }
    seen.insert(r.status);
    r
}

#[actix_web::test]
async fn documented_statuses_occur_on_representative_routes() {
    const TOKEN: &str = "t0ken";
    let (svc, store) = fixture(Some(TOKEN)).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    let a = |r: TestRequest| auth(r, Some(TOKEN));
    let base = "/api/1.0/int/shadow-deployables";
    let procure =
        |name: &str, run: &str| json!({"action": "PROCURE", "name": name, "workflow_run_id": run});
    let release =
        |name: &str, run: &str| json!({"action": "RELEASE", "name": name, "workflow_run_id": run});
    let text = |method: Method, path: &str| {
        TestRequest::default()
            .method(method)
            .uri(path)
            .insert_header(("content-type", "text/plain"))
            .set_payload("{}")
    };
    let big = |method: Method, path: &str| {
        TestRequest::default()
            .method(method)
            .uri(path)
            .insert_header(("content-type", "application/json"))
            .set_payload(format!("{{\"x\":\"{}\"}}", "x".repeat(1024 * 1024)))
    };

    // PUT …/{name}: 201, 200, 400, 401, 409, 413, 415, 422, 503
    let mut seen = BTreeSet::new();
    let reg = json!({"node_pool": "p", "dns": "d"});
    for name in ["d1", "d2", "d3", "d4"] {
        note(&app, &mut seen, a(put(&format!("{base}/{name}"), &reg))).await;
    }
    note(&app, &mut seen, a(put(&format!("{base}/d1"), &reg))).await;
    note(
        &app,
        &mut seen,
        a(put("/api/1.0/dev/shadow-deployables/d1", &reg)),
    )
    .await;
    note(&app, &mut seen, put(&format!("{base}/d1"), &reg)).await;
    note(&app, &mut seen, a(text(Method::PUT, &format!("{base}/d1")))).await;
    note(&app, &mut seen, a(big(Method::PUT, &format!("{base}/d1")))).await;
    let keyed = |r: TestRequest, k: &str| r.insert_header(("x-idempotency-key", k.to_owned()));
    note(
        &app,
        &mut seen,
        a(keyed(
            put(
                &format!("{base}/d1"),
                &json!({"node_pool": "q1", "dns": "d"}),
            ),
            "k-reg",
        )),
    )
    .await;
    // (a re-register that changes nothing stores no record: the first one changes d1)
    let other = json!({"node_pool": "q2", "dns": "d"});
    note(
        &app,
        &mut seen,
        a(keyed(put(&format!("{base}/d1"), &other), "k-reg")),
    )
    .await;
    store.set_unavailable(true);
    note(&app, &mut seen, a(put(&format!("{base}/d1"), &reg))).await;
    store.set_unavailable(false);
    // 409 here is a duplicate idempotency key in flight on this replica: a race that
    // `idempotency::concurrent_same_key` provokes; in this sequential test it is not.
    assert_statuses(
        "put",
        "/api/1.0/{env}/shadow-deployables/{name}",
        &seen,
        &[409],
    );

    // POST …/shadow-deployables: every documented status
    let mut seen = BTreeSet::new();
    note(&app, &mut seen, a(post(base, &procure("d1", "r1")))).await;
    note(
        &app,
        &mut seen,
        a(post(
            "/api/1.0/dev/shadow-deployables",
            &procure("d1", "r1"),
        )),
    )
    .await;
    note(&app, &mut seen, post(base, &procure("d1", "r1"))).await;
    note(&app, &mut seen, a(post(base, &procure("nope", "r1")))).await;
    note(&app, &mut seen, a(post(base, &release("d1", "r2")))).await;
    note(&app, &mut seen, a(big(Method::POST, base))).await;
    note(&app, &mut seen, a(text(Method::POST, base))).await;
    note(
        &app,
        &mut seen,
        a(keyed(post(base, &procure("d3", "r1")), "k-act")),
    )
    .await;
    note(
        &app,
        &mut seen,
        a(keyed(post(base, &procure("d3", "r9")), "k-act")),
    )
    .await;
    store.set_unavailable(true);
    note(&app, &mut seen, a(post(base, &release("d1", "r1")))).await;
    store.set_unavailable(false);
    assert_statuses("post", "/api/1.0/{env}/shadow-deployables", &seen, &[]);

    // DELETE …/{name}
    let mut seen = BTreeSet::new();
    let del = |name: &str| TestRequest::delete().uri(&format!("{base}/{name}"));
    note(&app, &mut seen, a(del("d1"))).await; // procured: 409
    note(&app, &mut seen, a(del("nope"))).await;
    note(
        &app,
        &mut seen,
        a(TestRequest::delete().uri("/api/1.0/dev/shadow-deployables/d1")),
    )
    .await;
    note(&app, &mut seen, del("d2")).await;
    note(&app, &mut seen, a(keyed(del("d2"), "k-del"))).await;
    note(&app, &mut seen, a(keyed(del("d4"), "k-del"))).await;
    store.set_unavailable(true);
    note(&app, &mut seen, a(del("d4"))).await;
    store.set_unavailable(false);
    assert_statuses(
        "delete",
        "/api/1.0/{env}/shadow-deployables/{name}",
        &seen,
        &[],
    );

    // POST /api/1.0/instances (409 is an id collision: not reachable from outside)
    let mut seen = BTreeSet::new();
    let inst = json!({"requirements": {"cpu": 1, "memory_gb": 1}});
    note(&app, &mut seen, a(post("/api/1.0/instances", &inst))).await;
    note(
        &app,
        &mut seen,
        a(post(
            "/api/1.0/instances",
            &json!({"requirements": {"cpu": 0, "memory_gb": 1}}),
        )),
    )
    .await;
    note(&app, &mut seen, post("/api/1.0/instances", &inst)).await;
    note(&app, &mut seen, a(big(Method::POST, "/api/1.0/instances"))).await;
    note(&app, &mut seen, a(text(Method::POST, "/api/1.0/instances"))).await;
    note(
        &app,
        &mut seen,
        a(keyed(post("/api/1.0/instances", &inst), "k-i")),
    )
    .await;
    let other = json!({"requirements": {"cpu": 2, "memory_gb": 1}});
    note(
        &app,
        &mut seen,
        a(keyed(post("/api/1.0/instances", &other), "k-i")),
    )
    .await;
    store.set_unavailable(true);
    note(&app, &mut seen, a(post("/api/1.0/instances", &inst))).await;
    store.set_unavailable(false);
    assert_statuses("post", "/api/1.0/instances", &seen, &[409]);

    // GET /health/ready: 200, and 503 while the store is down
    let mut seen = BTreeSet::new();
    note(&app, &mut seen, get("/health/ready")).await;
    store.set_unavailable(true);
    let r = note(&app, &mut seen, get("/health/ready")).await;
    store.set_unavailable(false);
    assert!(r.headers.contains_key("retry-after"));
    assert_statuses("get", "/health/ready", &seen, &[]);

    // GET /api/1.0/openapi.json: 200, 401
    let mut seen = BTreeSet::new();
    note(&app, &mut seen, a(get("/api/1.0/openapi.json"))).await;
    note(&app, &mut seen, get("/api/1.0/openapi.json")).await;
    assert_statuses("get", "/api/1.0/openapi.json", &seen, &[]);
}
