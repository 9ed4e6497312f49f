//! Generated hostile input (proptest) against every route of an in-process service on
//! the memory store: random JSON of random shapes, wrong types for known fields, huge
//! and negative numbers, deep nesting, long strings, invalid UTF-8, empty and oversized
//! bodies, wrong content types, odd paths (`..`, `%2F`, unicode, long segments), odd
//! methods and headers. For every case: never a 5xx, never a panic (in a handler or an
//! actor), every error body is `{"error": <string>}`, and a rejected (4xx) request
//! changes nothing: the shadow deployable lists of `int` and `prod`, the workers and the
//! instances are snapshotted before and compared after.
//!
//! The fixture is stable on purpose, so that any change seen around a 4xx is the
//! request's doing: one worker template with `min_workers = max_workers = 1` (the
//! autoscaler launches exactly one worker and never another), one `do_not_disrupt`
//! instance placed on it (so every voluntary drain is refused), long heartbeat and idle
//! timeouts. The real instance id is never sent to `…/complete` or in a heartbeat's
//! `running_instances` (either would end the instance and set the controller moving);
//! after an accepted mutating request the test waits until the snapshot settles.
//!
//! Each property runs on its own actix `System`: the proptest runner is synchronous and
//! every case is driven with `SystemRunner::block_on`, so failures shrink as usual.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::http::{Method, Uri};
use actix_web::test::{self, TestRequest};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config as RunnerConfig, TestCaseError, TestRunner};
use resource_plane::adapters::memory::MemoryStore;
use resource_plane::api;
use resource_plane::app::Service;
use resource_plane::config::Secret;
use serde_json::{json, Value};

use crate::openapi::operations;
use crate::support::{self, send, Resp, TestApp};

const CASES: u32 = 256;
const TOKEN: &str = "hostile-test-token";
const MIB: usize = 1024 * 1024;

// ---------------------------------------------------------------------------------
// Routes

/// Every documented operation, with the body a well-behaved caller would send (valid
/// against the fixture's state) as the seed of mutations. `{base}` takes both
/// spellings of the shadow deployables prefix.
const ROUTES: &[(&str, &str)] = &[
    ("get", "/api/1.0/{env}/{base}"),
    ("post", "/api/1.0/{env}/{base}"),
    ("post", "/api/1.0/{env}/{base}/min-pod-count"),
    ("put", "/api/1.0/{env}/{base}/{name}"),
    ("delete", "/api/1.0/{env}/{base}/{name}"),
    ("post", "/api/1.0/instances"),
    ("get", "/api/1.0/instances"),
    ("get", "/api/1.0/instances/{id}"),
    ("post", "/api/1.0/instances/{id}/complete"),
    ("get", "/api/1.0/workers"),
    ("get", "/api/1.0/workers/{id}"),
    ("post", "/api/1.0/workers/{id}/drain"),
    ("post", "/api/1.0/workers/{id}/heartbeat"),
    ("get", "/api/1.0/worker-templates"),
    ("get", "/api/1.0/controller"),
    ("get", "/api/1.0/actors"),
    ("get", "/api/1.0/actors/{kind}/{id}"),
    ("get", "/api/1.0/openapi.json"),
    ("get", "/api/1.0/events"),
    ("get", "/api/1.0/environments"),
    ("post", "/api/1.0/{env}/deployables"),
    ("post", "/api/1.0/{env}/deployables/restart"),
    ("post", "/api/1.0/{env}/models/load"),
    ("post", "/api/1.0/{env}/jobs"),
    ("get", "/api/1.0/{env}/operations"),
    ("get", "/api/1.0/{env}/operations/{request_id}"),
    ("get", "/health"),
    ("get", "/health/self"),
    ("get", "/health/ready"),
    ("get", "/metrics"),
];

/// Ids of the fixture's entities.
#[derive(Debug, Clone)]
struct Ids {
    worker: String,
    instance: String,
}

/// The callback of asynchronous operations: loopback, so refused by the SSRF policy
/// once those routes land (nothing leaves the machine).
fn callback() -> Value {
    json!({"url": "https://127.0.0.1:9/cb", "method": "POST", "headers": {"x-a": "b"}})
}

/// The seed body of a route, `None` when it reads none.
fn template(method: &str, path: &str) -> Option<Value> {
    let wf = |mut v: Value| {
        v["workflow_run_id"] = json!("run-h");
        v["workflow_plan"] = json!("plan-h");
        v["workflow_task_id"] = json!("task-h");
        v["callback"] = callback();
        v
    };
    Some(match (method, path) {
        ("post", "/api/1.0/{env}/{base}") => {
            json!({"action": "PROCURE", "name": "d2", "workflow_run_id": "run-h", "workflow_plan": "plan-h"})
        }
        ("post", "/api/1.0/{env}/{base}/min-pod-count") => {
            json!({"action": "INCREASE", "count": 1, "name": "d1", "workflow_run_id": "owner-run", "workflow_task_id": "t"})
        }
        ("put", "/api/1.0/{env}/{base}/{name}") => json!({"node_pool": "p", "dns": "x.example"}),
        ("post", "/api/1.0/instances") => {
            json!({"requirements": {"cpu": 1, "memory_gb": 1}, "do_not_disrupt": false})
        }
        ("post", "/api/1.0/workers/{id}/drain") => json!({"deadline_seconds": 60}),
        // never the fixture's instance: a valid heartbeat without it leaves it SCHEDULED
        ("post", "/api/1.0/workers/{id}/heartbeat") => json!({"running_instances": ["i-other"]}),
        ("post", "/api/1.0/{env}/deployables") => wf(json!({
            "name": "dep-h", "image": "registry.example/app:1", "node_selector": {"pool": "a"},
            "min_pod_count": 1, "max_pod_count": 2,
            "resources": {"cpu": {"request": "1", "limit": "2"}, "memory": {"request": "1Gi", "limit": "2Gi"},
                          "gpu": {"request": "1", "limit": "1", "memory": {"request": "1Gi", "limit": "1Gi"}}},
            "models_to_load": [{"name": "m", "version": "1", "runtime": "r", "precision": "fp16", "batch_size": 8, "artifact_version": "a"}]
        })),
        ("post", "/api/1.0/{env}/deployables/restart") => {
            wf(json!({"namespace": "int", "name": "dep-h"}))
        }
        ("post", "/api/1.0/{env}/models/load") => wf(json!({
            "deployable_name": "dep-h", "model": {"name": "m", "version": "2", "artifact_location": "s3://m/2"}
        })),
        ("post", "/api/1.0/{env}/jobs") => wf(json!({
            "job_name": "job-h", "container": {"image": "registry.example/job:1"}, "payload": {"k": [1, 2]}
        })),
        _ => return None,
    })
}

fn uppercase(method: &str) -> Method {
    Method::from_bytes(method.to_uppercase().as_bytes()).unwrap_or_else(|e| panic!("{e}"))
}

/// Percent-encodes everything but unreserved characters.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Values a path parameter may take: plausible ones first, then hostile ones.
fn param_values(path: &str, param: &str, ids: &Ids) -> (Vec<String>, Vec<String>) {
    let plausible: Vec<String> = match param {
        "env" => vec!["int", "prod", "INT", "dev"],
        "base" => vec!["shadow-deployables", "shadow-deploybles"],
        "name" => vec!["d1", "d2", "d3", "p1", "missing-x"],
        "kind" => vec!["shadow-deployable", "worker", "instance", "nope"],
        "request_id" => vec!["5f0c6f3e-8a55-4b7e-9a6b-1c8f2f6d9e10"],
        "id" if path.starts_with("/api/1.0/actors") => {
            return (
                vec![
                    "int/d1".into(),
                    ids.worker.clone(),
                    ids.instance.clone(),
                    "x/y/z".into(),
                ],
                hostile_values(),
            )
        }
        "id" if path.starts_with("/api/1.0/workers") => {
            return (
                vec![ids.worker.clone(), "w-missing".into()],
                hostile_values(),
            )
        }
        // completing the fixture's instance would change the fleet: only unknown ids
        "id" if path.ends_with("/complete") => vec!["i-missing", "i-0"],
        "id" => {
            return (
                vec![ids.instance.clone(), "i-missing".into()],
                hostile_values(),
            )
        }
        other => panic!("no values for path parameter {other} of {path}"),
    }
    .into_iter()
    .map(str::to_owned)
    .collect();
    (plausible, hostile_values())
}

fn hostile_values() -> Vec<String> {
    let mut v: Vec<String> = [
        "..",
        ".",
        "%2e%2e",
        "%2F",
        "a%2Fb",
        "..%2F..%2Fetc%2Fpasswd",
        "%00",
        "%FF",
        "%C3%28",
        "%20",
        "%",
        "%zz",
        "a;b=c",
        "*",
        "~",
        "-",
        "_",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    v.push(encode("námé"));
    v.push(encode("名前"));
    v.push(encode("💥"));
    v.push(encode("a\u{0}b"));
    v.push(encode("line\nbreak"));
    v.push("a".repeat(254));
    v.push("b".repeat(5000));
    v
}

// ---------------------------------------------------------------------------------
// JSON of any shape, rendered by hand so numbers and strings can be what serde_json
// would never write.

#[derive(Debug, Clone)]
enum J {
    Null,
    Bool(bool),
    /// A number token as written (`1e308`, `18446744073709551616`, …).
    Num(String),
    Str(String),
    /// A string token as written, escapes included (`"\ud800"`).
    RawStr(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

impl J {
    fn from_value(v: &Value) -> J {
        match v {
            Value::Null => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Number(n) => J::Num(n.to_string()),
            Value::String(s) => J::Str(s.clone()),
            Value::Array(a) => J::Arr(a.iter().map(J::from_value).collect()),
            Value::Object(o) => J::Obj(
                o.iter()
                    .map(|(k, v)| (k.clone(), J::from_value(v)))
                    .collect(),
            ),
        }
    }

    fn render(&self, out: &mut String) {
        match self {
            J::Null => out.push_str("null"),
            J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            J::Num(n) => out.push_str(n),
            J::Str(s) => out.push_str(&serde_json::to_string(s).unwrap_or_default()),
            J::RawStr(s) => out.push_str(s),
            J::Arr(a) => {
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    x.render(out);
                }
                out.push(']');
            }
            J::Obj(o) => {
                out.push('{');
                for (i, (k, v)) in o.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&serde_json::to_string(k).unwrap_or_default());
                    out.push(':');
                    v.render(out);
                }
                out.push('}');
            }
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut s = String::new();
        self.render(&mut s);
        s.into_bytes()
    }

    /// Paths (child indexes) to every node below the root.
    fn paths(&self) -> Vec<Vec<usize>> {
        let mut out = Vec::new();
        let children: Vec<&J> = match self {
            J::Arr(a) => a.iter().collect(),
            J::Obj(o) => o.iter().map(|(_, v)| v).collect(),
            _ => Vec::new(),
        };
        for (i, c) in children.into_iter().enumerate() {
            out.push(vec![i]);
            for mut p in c.paths() {
                p.insert(0, i);
                out.push(p);
            }
        }
        out
    }

    /// Replaces (`Some`) or removes (`None`) the node at `path`.
    fn set(&mut self, path: &[usize], new: Option<J>) {
        let Some((&first, rest)) = path.split_first() else {
            return;
        };
        match self {
            J::Arr(a) if first < a.len() => {
                if rest.is_empty() {
                    match new {
                        Some(n) => a[first] = n,
                        None => {
                            a.remove(first);
                        }
                    }
                } else {
                    a[first].set(rest, new);
                }
            }
            J::Obj(o) if first < o.len() => {
                if rest.is_empty() {
                    match new {
                        Some(n) => o[first].1 = n,
                        None => {
                            o.remove(first);
                        }
                    }
                } else {
                    o[first].1.set(rest, new);
                }
            }
            _ => {}
        }
    }

    /// Adds `key: value` to the object at `path` (or the root).
    fn add(&mut self, path: &[usize], key: String, value: J) {
        match (path.split_first(), self) {
            (None, J::Obj(o)) => o.push((key, value)),
            (Some((&i, rest)), J::Arr(a)) => {
                if let Some(n) = a.get_mut(i) {
                    n.add(rest, key, value);
                }
            }
            (Some((&i, rest)), J::Obj(o)) => {
                if let Some((_, n)) = o.get_mut(i) {
                    n.add(rest, key, value);
                }
            }
            _ => {}
        }
    }
}

const FIELD_NAMES: &[&str] = &[
    "action",
    "name",
    "workflow_run_id",
    "workflow_plan",
    "workflow_task_id",
    "count",
    "node_pool",
    "dns",
    "requirements",
    "cpu",
    "memory_gb",
    "do_not_disrupt",
    "deadline_seconds",
    "running_instances",
    "callback",
    "url",
    "image",
    "colour",
    "__proto__",
    "",
];

fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| format!("{f:e}")),
        prop::sample::select(vec![
            "1e308",
            "-1e308",
            "1.7976931348623157e308",
            "18446744073709551616",
            "18446744073709551615",
            "-9223372036854775809",
            "9223372036854775808",
            "4294967296",
            "4294967295",
            "2592001",
            "10001",
            "1e999",
            "-1e999",
            "1e-400",
            "-0",
            "-1",
            "0",
            "0.5",
            "1E+2",
            "123456789012345678901234567890123456789",
        ])
        .prop_map(str::to_owned),
    ]
}

fn string() -> impl Strategy<Value = J> {
    prop_oneof![
        4 => "\\PC{0,12}".prop_map(J::Str),
        1 => ".{0,4}".prop_map(J::Str),
        1 => prop::sample::select(vec![
            "PROCURE", "RELEASE", "INCREASE", "DECREASE", "RESET_TO_0", "d1", "d2", "..",
            "../x", "a/b", " ", "\u{0}", "\u{1b}[31m", "\u{feff}", "é", "名前", "💥",
        ])
        .prop_map(|s| J::Str(s.to_owned())),
        1 => prop::sample::select(vec![
            "\"\\ud800\"", "\"\\udc00\\ud800\"", "\"\\u0000\"", "\"\\x41\"", "\"\\u12\"",
            "\"unterminated",
        ])
        .prop_map(|s| J::RawStr(s.to_owned())),
        1 => (1usize..20_000).prop_map(|n| J::Str("x".repeat(n))),
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(FIELD_NAMES).prop_map(str::to_owned),
        1 => "\\PC{0,8}",
    ]
}

/// JSON values of random shapes.
fn json_value() -> impl Strategy<Value = J> {
    let leaf = prop_oneof![
        Just(J::Null),
        any::<bool>().prop_map(J::Bool),
        number().prop_map(J::Num),
        string(),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(J::Arr),
            prop::collection::vec((key(), inner), 0..6).prop_map(J::Obj),
        ]
    })
}

/// A route's seed body with one mutation: a node replaced by a random value (wrong
/// type, huge number, …), removed, an unknown field added, or nothing.
fn mutated(seed: Value) -> impl Strategy<Value = J> {
    let seed = J::from_value(&seed);
    (0usize..5, any::<Index>(), json_value(), number(), key()).prop_map(
        move |(kind, at, value, num, k)| {
            let mut j = seed.clone();
            let paths = j.paths();
            let path = if paths.is_empty() {
                Vec::new()
            } else {
                paths[at.index(paths.len())].clone()
            };
            match kind {
                0 => j.set(&path, Some(value)),
                1 => j.set(&path, Some(J::Num(num))),
                2 => j.set(&path, None),
                3 => j.add(&path[..path.len().saturating_sub(1)], k, value),
                _ => {}
            }
            j
        },
    )
}

/// Bodies nobody should send.
fn nasty_bodies(seed: Option<&Value>) -> Vec<(String, Vec<u8>)> {
    let seed_text = seed.map(Value::to_string).unwrap_or_else(|| "{}".into());
    let mut out: Vec<(String, Vec<u8>)> = vec![
        ("empty".into(), Vec::new()),
        ("null".into(), b"null".to_vec()),
        ("array".into(), b"[1,2]".to_vec()),
        ("string".into(), b"\"{}\"".to_vec()),
        ("number".into(), b"1e999".to_vec()),
        (
            "truncated".into(),
            seed_text.as_bytes()[..seed_text.len() / 2].to_vec(),
        ),
        (
            "trailing garbage".into(),
            format!("{seed_text} x").into_bytes(),
        ),
        (
            "two objects".into(),
            format!("{seed_text}{seed_text}").into_bytes(),
        ),
        ("bom".into(), format!("\u{feff}{seed_text}").into_bytes()),
        ("invalid utf-8".into(), vec![b'{', 0xff, 0xfe, b'}']),
        (
            "invalid utf-8 in a string".into(),
            [
                b"{\"name\":\"".as_slice(),
                &[0xc3, 0x28, 0xa0, 0xa1],
                b"\"}",
            ]
            .concat(),
        ),
        ("nul".into(), b"{\"name\":\"a\0\"}".to_vec()),
        ("deep arrays".into(), "[".repeat(100_000).into_bytes()),
        (
            "deep objects".into(),
            format!("{}1{}", "{\"a\":".repeat(5000), "}".repeat(5000)).into_bytes(),
        ),
        (
            "duplicate keys".into(),
            format!(
                "{{\"name\":1,{}}}",
                seed_text.trim_start_matches('{').trim_end_matches('}')
            )
            .into_bytes(),
        ),
        (
            "oversized".into(),
            format!("{{\"pad\":\"{}\"}}", "x".repeat(MIB)).into_bytes(),
        ),
        (
            "oversized seed".into(),
            format!(
                "{{\"pad\":\"{}\",{}}}",
                " ".repeat(MIB),
                seed_text.trim_start_matches('{').trim_end_matches('}')
            )
            .into_bytes(),
        ),
    ];
    // every leaf of the seed: each huge, negative, fractional or wrong-typed value
    if let Some(seed) = seed {
        let j = J::from_value(seed);
        for path in j.paths() {
            for bad in [
                "1e308",
                "18446744073709551616",
                "-1",
                "-9223372036854775809",
                "0.5",
                "\"1\"",
                "true",
                "null",
                "[]",
                "{}",
            ] {
                let mut m = j.clone();
                m.set(&path, Some(J::Num(bad.to_owned())));
                out.push((format!("{bad} at {path:?}"), m.bytes()));
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------
// Cases

/// One request.
#[derive(Clone)]
struct Case {
    method: Method,
    uri: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Option<Vec<u8>>,
}

impl fmt::Debug for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let uri: String = self.uri.chars().take(300).collect();
        write!(f, "{} {uri} (uri {} bytes)", self.method, self.uri.len())?;
        for (k, v) in &self.headers {
            write!(f, "\n  {k}: {:?}", String::from_utf8_lossy(v))?;
        }
        if let Some(b) = &self.body {
            let shown = String::from_utf8_lossy(&b[..b.len().min(300)]);
            write!(f, "\n  body ({} bytes): {shown:?}", b.len())?;
        }
        Ok(())
    }
}

impl Case {
    fn request(&self) -> Option<TestRequest> {
        Uri::try_from(self.uri.as_str()).ok()?;
        let mut req = TestRequest::default()
            .method(self.method.clone())
            .uri(&self.uri);
        if let Some(b) = &self.body {
            req = req.set_payload(b.clone());
        }
        // after the payload, so a forged Content-Length wins
        for (k, v) in &self.headers {
            let name = HeaderName::from_bytes(k.as_bytes()).ok()?;
            let value = HeaderValue::from_bytes(v).ok()?;
            req = req.insert_header((name, value));
        }
        Some(req)
    }
}

fn content_type() -> impl Strategy<Value = Option<Vec<u8>>> {
    prop_oneof![
        8 => Just(Some(b"application/json".to_vec())),
        1 => prop::sample::select(vec![
            "application/json; charset=utf-8",
            "APPLICATION/JSON",
            "application/merge-patch+json",
            "application/jsonx",
            "text/plain",
            "text/json",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "",
            ";",
            "application/json;;;",
        ])
        .prop_map(|s| Some(s.as_bytes().to_vec())),
        1 => Just(None),
        1 => Just(Some(vec![b'a', 0xff, 0xfe])),
    ]
}

fn extra_headers() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
    let one = prop_oneof![
        (
            "x-idempotency-key|idempotency-key",
            prop::sample::select(vec![
                "k-1",
                "k-2",
                "a:b.c_d-e",
                "",
                "has space",
                "ü",
                "../x",
            ])
        )
            .prop_map(|(k, v)| (k, v.as_bytes().to_vec())),
        Just(("x-idempotency-key".to_owned(), "k".repeat(201).into_bytes())),
        Just(("x-idempotency-key".to_owned(), vec![0xc3, 0xa9])),
        (
            "x-request-id",
            prop::sample::select(vec!["r-1", "", "ü", "a b"])
        )
            .prop_map(|(k, v)| (k, v.as_bytes().to_vec())),
        Just(("x-request-id".to_owned(), "r".repeat(4000).into_bytes())),
        Just(("content-length".to_owned(), b"0".to_vec())),
        Just((
            "content-length".to_owned(),
            b"99999999999999999999".to_vec()
        )),
        Just(("content-length".to_owned(), b"2000000".to_vec())),
        Just(("content-length".to_owned(), b"abc".to_vec())),
        Just(("authorization".to_owned(), b"Bearer nope".to_vec())),
        Just(("transfer-encoding".to_owned(), b"chunked".to_vec())),
    ];
    prop::collection::vec(one, 0..3)
}

/// A route's path with its parameters filled: plausible values only, or (`hostile`)
/// plausible, hostile and random ones.
fn path_for(path: &'static str, ids: &Ids, hostile: bool) -> BoxedStrategy<String> {
    let params: Vec<&str> = path
        .split('/')
        .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
        .collect();
    let mut strat: BoxedStrategy<String> = Just(path.to_owned()).boxed();
    for p in params {
        let (plausible, bad) = param_values(path, p, ids);
        let values = if hostile {
            prop_oneof![
                2 => prop::sample::select(plausible),
                2 => prop::sample::select(bad),
                1 => "\\PC{0,12}".prop_map(|s| encode(&s)),
                1 => "[a-zA-Z0-9._~-]{0,40}",
            ]
            .boxed()
        } else {
            prop::sample::select(plausible).boxed()
        };
        let placeholder = format!("{{{p}}}");
        strat = (strat, values)
            .prop_map(move |(s, v)| s.replacen(&placeholder, &v, 1))
            .boxed();
    }
    strat
}

fn odd_path(path: BoxedStrategy<String>) -> impl Strategy<Value = String> {
    let query = prop_oneof![
        4 => Just(String::new()),
        1 => prop::sample::select(vec![
            "?in_use=true", "?in_use=maybe", "?in_use=true&in_use=false", "?colour=red",
            "?node_pool=%FF", "?node_pool=a%00b", "?%zz", "?=", "?in_use", "?&&&", "?#frag",
        ])
        .prop_map(str::to_owned),
        1 => "\\PC{0,16}".prop_map(|s| format!("?{}", encode(&s))),
    ];
    (path, 0usize..8, query).prop_map(|(p, shape, q)| {
        let p = match shape {
            0 => format!("{p}/"),
            1 => p.replacen("/api/", "/api//", 1),
            2 => p.replacen("/1.0/", "/1.0/../1.0/", 1),
            3 => p.replacen("/api/", "/API/", 1),
            4 => format!("{p}/%2e%2e"),
            5 => format!("{p}/{}", "s".repeat(3000)),
            _ => p,
        };
        format!("{p}{q}")
    })
}

fn method_for(method: &'static str) -> impl Strategy<Value = Method> {
    prop_oneof![
        3 => Just(uppercase(method)),
        1 => prop::sample::select(vec![
            "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "CONNECT",
            "PROPFIND", "FOO", "get", "M-SEARCH",
        ])
        .prop_map(|m| Method::from_bytes(m.as_bytes()).unwrap_or(Method::GET)),
    ]
}

fn with_content_type(
    headers: &mut Vec<(String, Vec<u8>)>,
    ctype: Option<Vec<u8>>,
    body: &Option<Vec<u8>>,
) {
    if let (Some(ct), Some(_)) = (ctype, body) {
        headers.insert(0, ("content-type".to_owned(), ct));
    }
}

/// Property 1: bodies to the routes that read one (and the pending ones): the seed
/// mutated, random JSON, nasty bytes, under mostly the right content type.
fn body_cases(ids: &Ids) -> BoxedStrategy<Case> {
    let routes: Vec<BoxedStrategy<Case>> = ROUTES
        .iter()
        .filter_map(|&(m, p)| template(m, p).map(|seed| (m, p, seed)))
        .map(|(m, p, seed)| {
            let nasty = nasty_bodies(Some(&seed));
            let body = prop_oneof![
                5 => mutated(seed).prop_map(|j| j.bytes()),
                2 => json_value().prop_map(|j| j.bytes()),
                2 => prop::sample::select(nasty).prop_map(|(_, b)| b),
                1 => prop::collection::vec(any::<u8>(), 0..64),
            ];
            (
                path_for(p, ids, false),
                body,
                content_type(),
                extra_headers(),
            )
                .prop_map(move |(uri, body, ct, mut headers)| {
                    let body = Some(body);
                    with_content_type(&mut headers, ct, &body);
                    Case {
                        method: uppercase(m),
                        uri,
                        headers,
                        body,
                    }
                })
                .boxed()
        })
        .collect();
    proptest::strategy::Union::new(routes).boxed()
}

/// Property 2: random JSON of random shapes to every route with its own method.
fn random_json_cases(ids: &Ids) -> BoxedStrategy<Case> {
    let routes: Vec<BoxedStrategy<Case>> = ROUTES
        .iter()
        .map(|&(m, p)| {
            (path_for(p, ids, false), json_value())
                .prop_map(move |(uri, j)| Case {
                    method: uppercase(m),
                    uri,
                    headers: vec![("content-type".into(), b"application/json".to_vec())],
                    body: Some(j.bytes()),
                })
                .boxed()
        })
        .collect();
    proptest::strategy::Union::new(routes).boxed()
}

/// Property 3: odd paths, methods, queries and headers on every route.
fn odd_cases(ids: &Ids) -> BoxedStrategy<Case> {
    let routes: Vec<BoxedStrategy<Case>> = ROUTES
        .iter()
        .map(|&(m, p)| {
            let seed = template(m, p);
            let body = prop_oneof![
                2 => Just(None),
                2 => Just(seed.map(|s| s.to_string().into_bytes())),
                1 => json_value().prop_map(|j| Some(j.bytes())),
            ];
            (
                odd_path(path_for(p, ids, true)),
                method_for(m),
                body,
                content_type(),
                extra_headers(),
            )
                .prop_map(|(uri, method, body, ct, mut headers)| {
                    with_content_type(&mut headers, ct, &body);
                    Case {
                        method,
                        uri,
                        headers,
                        body,
                    }
                })
                .boxed()
        })
        .collect();
    proptest::strategy::Union::new(routes).boxed()
}

// ---------------------------------------------------------------------------------
// The fixture and the checks

const TEMPLATES: &str = "templates:
  - name: solo
    instance_type: m5.xlarge
    image_id: ami-12c6146b
    capacity: { cpu: 8, memory_gb: 32 }
    min_workers: 1
    max_workers: 1
    hourly_cost: 0.2
    labels: {}
";

struct Fixture {
    svc: Service,
    ids: Ids,
    token: Option<String>,
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn authorize(&self, req: TestRequest) -> TestRequest {
        match &self.token {
            Some(t) => req.insert_header(("authorization", format!("Bearer {t}"))),
            None => req,
        }
    }
}

/// What a rejected request must leave alone.
#[derive(Debug, PartialEq)]
struct Snapshot {
    int: Value,
    prod: Value,
    workers: Value,
    instances: Vec<Value>,
}

async fn snapshot<S: TestApp>(app: &S, fx: &Fixture) -> Snapshot {
    let list = |path: &str| fx.authorize(TestRequest::get().uri(path)).to_request();
    let int = send(app, list("/api/1.0/int/shadow-deployables")).await;
    let prod = send(app, list("/api/1.0/prod/shadow-deployables")).await;
    let workers = send(app, list("/api/1.0/workers")).await;
    let mut instances: Vec<Value> = fx
        .svc
        .state
        .controller
        .instances
        .all()
        .into_iter()
        .map(|(i, rev)| json!({"instance": i, "mod_revision": rev}))
        .collect();
    instances.sort_by_key(|v| v["instance"]["id"].as_str().map(str::to_owned));
    Snapshot {
        int: int.json,
        prod: prod.json,
        workers: workers.json,
        instances,
    }
}

/// Waits until the snapshot stops changing (watches delivered, controller done).
async fn settle<S: TestApp>(app: &S, fx: &Fixture) {
    let mut last = snapshot(app, fx).await;
    let mut stable = 0;
    for _ in 0..150 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = snapshot(app, fx).await;
        if now == last {
            stable += 1;
            if stable >= 3 {
                return;
            }
        } else {
            stable = 0;
            last = now;
        }
    }
}

async fn wait_for<S: TestApp>(
    app: &S,
    fx: &Fixture,
    path: &str,
    what: &str,
    f: impl Fn(&Value) -> bool,
) -> Value {
    for _ in 0..1000 {
        let r = send(app, fx.authorize(TestRequest::get().uri(path)).to_request()).await;
        if f(&r.json) {
            return r.json;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Starts the service, seeds deployables (one procured), waits for the single worker
/// and places a `do_not_disrupt` instance on it.
async fn start(token: Option<&str>) -> Fixture {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let templates = dir.path().join("templates.yaml");
    std::fs::write(&templates, TEMPLATES).unwrap_or_else(|e| panic!("{e}"));
    let mut cfg = support::config();
    cfg.api_token = token.map(Secret::new);
    let c = &mut cfg.controller;
    c.templates_file = templates;
    c.templates_file_explicit = true;
    c.sim_cloud_boot = Duration::from_millis(50);
    c.cloud_poll = Duration::from_millis(50);
    c.scale_up_batch = Duration::from_millis(50);
    c.heartbeat_timeout = Duration::from_secs(24 * 3600);
    c.scale_down_idle = Duration::from_secs(24 * 3600);
    c.drain_deadline = Some(Duration::from_secs(24 * 3600));
    let svc = support::service(cfg, Arc::new(MemoryStore::new())).await;
    Fixture {
        svc,
        ids: Ids {
            worker: String::new(),
            instance: String::new(),
        },
        token: token.map(str::to_owned),
        _dir: dir,
    }
}

async fn seed<S: TestApp>(app: &S, fx: &mut Fixture) {
    let put = |path: String, body: Value| {
        fx.authorize(TestRequest::put().uri(&path).set_json(body))
            .to_request()
    };
    for (env, name) in [
        ("int", "d1"),
        ("int", "d2"),
        ("int", "d3"),
        ("prod", "p1"),
        ("prod", "p2"),
    ] {
        let r = send(
            app,
            put(
                format!("/api/1.0/{env}/shadow-deployables/{name}"),
                json!({"node_pool": "p", "dns": format!("{name}.example")}),
            ),
        )
        .await;
        assert_eq!(r.status, 201, "{}", r.error());
    }
    let post = |path: &str, body: Value| {
        fx.authorize(TestRequest::post().uri(path).set_json(body))
            .to_request()
    };
    let r = send(
        app,
        post(
            "/api/1.0/int/shadow-deployables",
            json!({"action": "PROCURE", "name": "d1", "workflow_run_id": "owner-run"}),
        ),
    )
    .await;
    assert_eq!(r.json, json!({"status": "PROCURED"}));
    let r = send(
        app,
        post(
            "/api/1.0/int/shadow-deployables/min-pod-count",
            json!({"action": "INCREASE", "count": 2, "name": "d1", "workflow_run_id": "owner-run"}),
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.error());
    let workers = wait_for(app, fx, "/api/1.0/workers", "a RUNNING worker", |w| {
        w["data"][0]["state"] == "RUNNING"
    })
    .await;
    let worker = workers["data"][0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let r = send(
        app,
        post(
            "/api/1.0/instances",
            json!({"requirements": {"cpu": 1, "memory_gb": 1}, "do_not_disrupt": true}),
        ),
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.error());
    let instance = r.json["id"].as_str().unwrap_or_default().to_owned();
    let path = format!("/api/1.0/instances/{instance}");
    wait_for(app, fx, &path, "the instance to be placed", |i| {
        i["state"] == "SCHEDULED" && i["worker_id"] == worker.as_str()
    })
    .await;
    fx.ids = Ids { worker, instance };
    settle(app, fx).await;
}

/// Every error body is exactly `{"error": <string>}`.
fn check_error_body(case: &Case, r: &Resp) -> Result<(), TestCaseError> {
    if case.method == Method::HEAD && r.raw.is_empty() {
        return Ok(());
    }
    let ok = r
        .json
        .as_object()
        .is_some_and(|o| o.len() == 1 && o.get("error").is_some_and(Value::is_string));
    prop_assert!(
        ok,
        "{} with a body that is not {{\"error\": string}}: {:?}",
        r.status,
        String::from_utf8_lossy(&r.raw)
    );
    let ctype = r
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    prop_assert!(
        ctype.starts_with("application/json"),
        "content type {ctype:?}"
    );
    Ok(())
}

async fn check<S: TestApp>(app: &S, fx: &Fixture, case: Case) -> Result<(), TestCaseError> {
    let Some(req) = case.request() else {
        return Err(TestCaseError::reject("not a valid request line"));
    };
    let before = snapshot(app, fx).await;
    let r = tokio::time::timeout(Duration::from_secs(20), send(app, req.to_request()))
        .await
        .map_err(|_| TestCaseError::fail("no answer within 20 s"))?;
    prop_assert!(
        r.status < 500,
        "{} {:?}",
        r.status,
        String::from_utf8_lossy(&r.raw)
    );
    prop_assert!(r.headers.contains_key("x-request-id"), "no x-request-id");
    if r.status >= 400 {
        check_error_body(&case, &r)?;
        let after = snapshot(app, fx).await;
        prop_assert!(
            before == after,
            "rejected with {} {:?} but the state changed:\nbefore {before:?}\nafter {after:?}",
            r.status,
            r.error()
        );
    } else if !matches!(case.method, Method::GET | Method::HEAD) {
        settle(app, fx).await;
    }
    Ok(())
}

/// Every actor restart is a panic that the supervisor caught.
async fn assert_no_restarts<S: TestApp>(app: &S, fx: &Fixture) {
    let r = send(
        app,
        fx.authorize(TestRequest::get().uri("/api/1.0/actors"))
            .to_request(),
    )
    .await;
    let actors = r.json["data"].as_array().cloned().unwrap_or_default();
    assert!(!actors.is_empty());
    for a in actors {
        assert_eq!(a["restarts"], 0, "an actor panicked and was restarted: {a}");
    }
}

/// Runs `cases` cases of the strategy made by `make` against a fresh fixture.
fn run_property(name: &str, token: Option<&str>, make: fn(&Ids) -> BoxedStrategy<Case>) {
    let sys = actix_rt::System::new();
    let mut fx = sys.block_on(start(token));
    let app = sys.block_on(test::init_service(api::app(fx.svc.state.clone())));
    sys.block_on(seed(&app, &mut fx));
    let strategy = make(&fx.ids);
    let mut config = RunnerConfig::with_cases(CASES);
    config.failure_persistence = None;
    config.max_shrink_iters = 512;
    let mut runner = TestRunner::new(config);
    let result = runner.run(&strategy, |case| sys.block_on(check(&app, &fx, case)));
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
    sys.block_on(assert_no_restarts(&app, &fx));
}

#[test]
fn the_route_table_covers_every_documented_operation() {
    let table: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| ((*m).to_owned(), p.replace("{base}", "shadow-deployables")))
        .collect();
    let documented: BTreeSet<(String, String)> = operations()
        .into_iter()
        .map(|o| (o.method, o.path))
        .collect();
    assert_eq!(
        table, documented,
        "update ROUTES (and template()) in hostile.rs"
    );
    for (m, p) in ROUTES {
        let op = operations()
            .into_iter()
            .find(|o| o.method == *m && o.path == p.replace("{base}", "shadow-deployables"));
        let takes_body = op.is_some_and(|o| o.example_body().is_some());
        assert_eq!(template(m, p).is_some(), takes_body, "{m} {p}: seed body");
    }
}

#[test]
fn hostile_bodies_never_5xx_and_rejections_change_nothing() {
    run_property("hostile bodies", None, body_cases);
}

#[test]
fn random_json_of_random_shapes_to_every_route() {
    run_property("random json", None, random_json_cases);
}

#[test]
fn odd_paths_methods_queries_and_headers() {
    run_property("odd requests", None, odd_cases);
}

/// Every fixed nasty body against every route that reads a body, under JSON and under
/// wrong content types: deterministic coverage of what random draws might miss.
#[test]
fn every_nasty_body_to_every_body_route() {
    let sys = actix_rt::System::new();
    let mut fx = sys.block_on(start(None));
    let app = sys.block_on(test::init_service(api::app(fx.svc.state.clone())));
    sys.block_on(seed(&app, &mut fx));
    let ids = fx.ids.clone();
    let mut ran = 0;
    for &(m, p) in ROUTES {
        let Some(seed) = template(m, p) else { continue };
        let path = p
            .replace("{env}", "int")
            .replace("{base}", "shadow-deploybles")
            .replace("{name}", "d2")
            .replace("{id}", &ids.worker);
        let mut bodies = nasty_bodies(Some(&seed));
        bodies.push(("seed".into(), seed.to_string().into_bytes()));
        for (label, body) in bodies {
            for ct in [
                Some(b"application/json".to_vec()),
                Some(b"text/plain".to_vec()),
                None,
            ] {
                // an accepted seed would change the fixture; only its rejections run
                if label == "seed" && ct.as_deref() == Some(b"application/json".as_slice()) {
                    continue;
                }
                let mut headers = Vec::new();
                let body = Some(body.clone());
                with_content_type(&mut headers, ct, &body);
                let case = Case {
                    method: uppercase(m),
                    uri: path.clone(),
                    headers,
                    body,
                };
                let shown = format!("{case:?}");
                if let Err(e) = sys.block_on(check(&app, &fx, case)) {
                    panic!("{m} {p} {label}: {e}\n{shown}");
                }
                ran += 1;
            }
        }
    }
    assert!(ran > 300, "{ran} cases");
    sys.block_on(assert_no_restarts(&app, &fx));
}

/// With `API_AUTH_TOKEN` set: every `/api/` route (introspection, openapi.json and the
/// pending routes included) without a token, with a wrong one or another scheme is 401
/// `{"error"}` with `WWW-Authenticate: Bearer`; the probes and metrics stay open.
#[test]
fn auth_guards_every_api_route_and_leaves_probes_open() {
    let sys = actix_rt::System::new();
    let mut fx = sys.block_on(start(Some(TOKEN)));
    let app = sys.block_on(test::init_service(api::app(fx.svc.state.clone())));
    sys.block_on(seed(&app, &mut fx));
    sys.block_on(async {
        for op in operations() {
            let mut paths = vec![op.example_path()];
            if op.path.contains("/shadow-deployables") {
                paths.push(
                    op.example_path()
                        .replace("shadow-deployables", "shadow-deploybles"),
                );
            }
            for path in paths {
                let at = format!("{} {path}", op.method);
                let body = op.example_body();
                let req = |auth: Option<&str>| {
                    let mut r = TestRequest::default().method(op.http_method()).uri(&path);
                    if let Some(b) = &body {
                        r = r.set_json(b);
                    }
                    if let Some(a) = auth {
                        r = r.insert_header(("authorization", a.to_owned()));
                    }
                    r.to_request()
                };
                if !path.starts_with("/api/") {
                    let r = send(&app, req(None)).await;
                    assert_eq!(r.status, 200, "{at} must stay open");
                    continue;
                }
                for auth in [
                    None,
                    Some("Bearer wrong"),
                    Some("Bearer "),
                    Some("Basic aG9zdGlsZS10ZXN0LXRva2Vu"),
                    Some(&*format!("bearer {TOKEN}")),
                    Some(&*format!("Bearer {TOKEN}x")),
                    Some(&*format!("Bearer  {TOKEN}")),
                    Some(TOKEN),
                ] {
                    let r = send(&app, req(auth)).await;
                    assert_eq!(r.status, 401, "{at} with {auth:?}");
                    assert_eq!(r.json, json!({"error": "missing or invalid bearer token"}));
                    assert_eq!(
                        r.headers
                            .get("www-authenticate")
                            .and_then(|v| v.to_str().ok()),
                        Some("Bearer"),
                        "{at}"
                    );
                }
            }
        }
        // the right token passes (read-only routes, so the fixture is unchanged)
        for path in [
            "/api/1.0/actors",
            "/api/1.0/openapi.json",
            "/api/1.0/workers",
        ] {
            let r = send(
                &app,
                fx.authorize(TestRequest::get().uri(path)).to_request(),
            )
            .await;
            assert_eq!(r.status, 200, "{path} with the token");
        }
    });
    // random credentials on random /api/ requests: always 401, nothing changes
    let strategy = (
        prop::sample::select(
            ROUTES
                .iter()
                .filter(|(_, p)| p.starts_with("/api/"))
                .copied()
                .collect::<Vec<_>>(),
        ),
        prop_oneof![
            Just(None),
            "\\PC{0,40}".prop_map(Some),
            "[ -~]{0,40}".prop_map(|s| Some(format!("Bearer {s}"))),
        ],
    );
    let mut config = RunnerConfig::with_cases(CASES);
    config.failure_persistence = None;
    let mut runner = TestRunner::new(config);
    let result = runner.run(&strategy, |((m, p), auth)| {
        if auth.as_deref() == Some(&*format!("Bearer {TOKEN}")) {
            return Ok(());
        }
        let path = p
            .replace("{env}", "int")
            .replace("{base}", "shadow-deployables")
            .replace("{name}", "d2")
            .replace("{id}", &fx.ids.worker)
            .replace("{kind}", "worker")
            .replace("{request_id}", "r-1");
        let mut headers = Vec::new();
        if let Some(a) = auth {
            headers.push(("authorization".to_owned(), a.into_bytes()));
        }
        let body = template(m, p).map(|b| b.to_string().into_bytes());
        with_content_type(&mut headers, Some(b"application/json".to_vec()), &body);
        let case = Case {
            method: uppercase(m),
            uri: path,
            headers,
            body,
        };
        sys.block_on(async {
            let Some(req) = case.request() else {
                return Err(TestCaseError::reject("invalid header value"));
            };
            let before = snapshot(&app, &fx).await;
            let r = send(&app, req.to_request()).await;
            prop_assert_eq!(r.status, 401, "{:?}", case);
            prop_assert_eq!(snapshot(&app, &fx).await, before);
            Ok(())
        })
    });
    if let Err(e) = result {
        panic!("random credentials: {e}");
    }
}

/// The spellings of `path` that a router might still take for it (or that another
/// component might read differently): percent-encoded letters, encoded slashes, double
/// slashes, dot segments (plain and encoded), mixed case, a trailing slash.
fn spellings(path: &str) -> Vec<String> {
    let rest = path.trim_start_matches('/');
    let every_letter: String = path
        .split('/')
        .map(|seg| {
            seg.bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() {
                        format!("%{b:02x}")
                    } else {
                        (b as char).to_string()
                    }
                })
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join("/");
    let first_letter = match rest.chars().next() {
        Some(c) => format!("/%{:02X}{}", c as u32, &rest[c.len_utf8()..]),
        None => path.to_owned(),
    };
    let (head, tail) = rest.split_once('/').unwrap_or((rest, ""));
    vec![
        first_letter,
        every_letter,
        format!("/{}", rest.replace('/', "%2F")),
        format!("/{head}%2F{tail}"),
        format!("/{}", rest.replace('/', "%2f")),
        path.replace('/', "//"),
        format!("/{head}//{tail}"),
        format!("/x/../{rest}"),
        format!("/x/%2e%2e/{rest}"),
        format!("/{head}/./{tail}"),
        format!("/{head}/%2E/{tail}"),
        format!("/{}", rest.to_uppercase()),
        format!(
            "/{}{}",
            head.to_uppercase(),
            path[head.len() + 1..].to_owned()
        ),
        format!("/{}{}", capitalize(head), path[head.len() + 1..].to_owned()),
        format!("{path}/"),
        format!("{path}?x=1"),
    ]
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// Deny by default: with `API_AUTH_TOKEN` set, no spelling of any route (every route of
/// the table, both spellings of the shadow prefix) reaches a handler without the token:
/// each answers 401 `{"error"}` and changes nothing. Paths that route nowhere answer 401
/// too without a token (whether a path exists is not disclosed) and 404 with it. Only
/// the probes, `/metrics` and the console's static files are open, under the exact path the
/// router matches.
#[test]
fn no_spelling_of_a_route_gets_past_auth() {
    let sys = actix_rt::System::new();
    let mut fx = sys.block_on(start(Some(TOKEN)));
    let app = sys.block_on(test::init_service(api::app(fx.svc.state.clone())));
    sys.block_on(seed(&app, &mut fx));
    sys.block_on(async {
        let public = [
            "/health",
            "/health/self",
            "/health/ready",
            "/metrics",
            "/ui",
            "/ui/",
            "/ui/app.js",
        ];
        let mut tried = 0;
        for &(m, p) in ROUTES {
            for base in ["shadow-deployables", "shadow-deploybles"] {
                if base != "shadow-deployables" && !p.contains("{base}") {
                    continue;
                }
                let path = p
                    .replace("{env}", "int")
                    .replace("{base}", base)
                    .replace("{name}", "d2")
                    .replace("{id}", &fx.ids.worker)
                    .replace("{kind}", "worker")
                    .replace("{request_id}", "r-1");
                if public.contains(&path.as_str()) {
                    continue;
                }
                let body = template(m, p).map(|b| b.to_string().into_bytes());
                for uri in spellings(&path) {
                    let mut headers = Vec::new();
                    with_content_type(&mut headers, Some(b"application/json".to_vec()), &body);
                    let case = Case {
                        method: uppercase(m),
                        uri,
                        headers,
                        body: body.clone(),
                    };
                    let Some(req) = case.request() else {
                        continue;
                    };
                    let before = snapshot(&app, &fx).await;
                    let r = send(&app, req.to_request()).await;
                    assert_eq!(
                        r.status,
                        401,
                        "{case:?}: {:?}",
                        String::from_utf8_lossy(&r.raw)
                    );
                    assert_eq!(
                        r.json,
                        json!({"error": "missing or invalid bearer token"}),
                        "{case:?}"
                    );
                    assert_eq!(
                        snapshot(&app, &fx).await,
                        before,
                        "{case:?} changed the state"
                    );
                    tried += 1;
                }
            }
        }
        assert!(tried > 300, "only {tried} spellings tried");

        // the issue's example: a PROCURE of a free deployable through an encoded letter
        let procure = json!({"action": "PROCURE", "name": "d2", "workflow_run_id": "sneaky"});
        for uri in [
            "/%61pi/1.0/int/shadow-deployables",
            "/api/1.0/int/%73hadow-deployables",
            "/api/1.0/%69nt/shadow-deployables",
        ] {
            let r = send(
                &app,
                TestRequest::post().uri(uri).set_json(&procure).to_request(),
            )
            .await;
            assert_eq!(r.status, 401, "{uri}");
        }
        let r = send(
            &app,
            fx.authorize(TestRequest::get().uri("/api/1.0/int/shadow-deployables?in_use=true"))
                .to_request(),
        )
        .await;
        let held: Vec<&str> = r.json["data"]
            .as_array()
            .map(|a| a.iter().filter_map(|d| d["name"].as_str()).collect())
            .unwrap_or_default();
        assert_eq!(held, vec!["d1"], "{:?}", r.json);

        // unmatched paths: 401 without the token, 404 with it
        for uri in [
            "/",
            "/nope",
            "/api",
            "/api/1.0/nope",
            "/health/x",
            "/metricsx",
            "/ui/nope",
            "/uix",
        ] {
            let r = send(&app, TestRequest::get().uri(uri).to_request()).await;
            assert_eq!(r.status, 401, "{uri} without a token");
            let r = send(&app, fx.authorize(TestRequest::get().uri(uri)).to_request()).await;
            assert_eq!(r.status, 404, "{uri} with the token");
        }
        // a known route with the wrong method is 401 without the token, too
        let r = send(
            &app,
            TestRequest::delete().uri("/api/1.0/workers").to_request(),
        )
        .await;
        assert_eq!(r.status, 401);
        // the open routes stay open under their exact path
        for uri in public {
            let r = send(&app, TestRequest::get().uri(uri).to_request()).await;
            assert_eq!(r.status, 200, "{uri}");
        }
    });
}
