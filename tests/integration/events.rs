//! The change stream `GET /api/1.0/events` (Server-Sent Events): ordering against the
//! writes made through the API, resume with `Last-Event-ID` (no gap, no duplicate), a
//! compacted resume point (`reset`), filters and their 400s, overflow of a client that
//! does not read, the subscriber limit, auth, the heartbeat over a real socket, and the
//! shared watch starting with the first subscriber and stopping with the last.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::http::header::HeaderMap;
use actix_web::test::{self, TestRequest};
use actix_web::HttpServer;
use resource_plane::adapters::memory::MemoryStore;
use resource_plane::api;
use resource_plane::app::Service;
use resource_plane::config::{Config, Secret};
use resource_plane::keys;
use resource_plane::ports::store::Store;
use serde_json::{json, Value};

use crate::support::{self, post, send, Etcd, TestApp};

/// How long any single read waits before the test gives up.
const WAIT: Duration = Duration::from_secs(10);

/// One message of the stream.
#[derive(Debug, Clone, PartialEq)]
enum Msg {
    /// `id`, `event`, parsed `data`.
    Event {
        id: Option<i64>,
        event: String,
        data: Value,
    },
    /// A comment line (`: keep-alive`).
    Comment(String),
}

fn parse_block(block: &str) -> Msg {
    let mut id = None;
    let mut event = "message".to_owned();
    let mut data = String::new();
    for line in block.lines() {
        if let Some(c) = line.strip_prefix(':') {
            return Msg::Comment(c.trim().to_owned());
        }
        let (field, value) = line.split_once(": ").unwrap_or((line, ""));
        match field {
            "id" => {
                id = Some(
                    value
                        .parse()
                        .unwrap_or_else(|e| panic!("id {value:?}: {e}")),
                )
            }
            "event" => event = value.to_owned(),
            "data" => data.push_str(value),
            other => panic!("unexpected field {other:?} in {block:?}"),
        }
    }
    let data = serde_json::from_str(&data).unwrap_or_else(|e| panic!("data {data:?}: {e}"));
    Msg::Event { id, event, data }
}

/// Splits complete `\n\n`-terminated blocks off `buf`.
fn take_blocks(buf: &mut String) -> Vec<Msg> {
    let mut out = Vec::new();
    while let Some(at) = buf.find("\n\n") {
        let block: String = buf.drain(..at + 2).collect();
        out.push(parse_block(block.trim_end_matches('\n')));
    }
    out
}

/// An event stream read in-process.
struct Sse {
    status: u16,
    headers: HeaderMap,
    body: BoxBody,
    buf: String,
    queue: std::collections::VecDeque<Msg>,
}

impl Sse {
    async fn open<S: TestApp>(app: &S, req: TestRequest) -> Self
    where
        S::Body: 'static,
    {
        let res = match app.call(req.to_request()).await {
            Ok(r) => r,
            Err(e) => panic!("service error: {e}"),
        };
        Self {
            status: res.status().as_u16(),
            headers: res.headers().clone(),
            body: res.into_body().boxed(),
            buf: String::new(),
            queue: Default::default(),
        }
    }

    /// The next message, `None` when the stream ended; panics after [`WAIT`].
    async fn next(&mut self) -> Option<Msg> {
        match tokio::time::timeout(WAIT, self.next_inner()).await {
            Ok(m) => m,
            Err(_) => panic!("no event within {WAIT:?}"),
        }
    }

    async fn next_inner(&mut self) -> Option<Msg> {
        loop {
            if let Some(m) = self.queue.pop_front() {
                return Some(m);
            }
            let chunk =
                futures::future::poll_fn(|cx| Pin::new(&mut self.body).as_mut().poll_next(cx))
                    .await;
            match chunk {
                Some(Ok(bytes)) => {
                    self.buf
                        .push_str(std::str::from_utf8(&bytes).unwrap_or_else(|e| {
                            panic!("not UTF-8: {e}");
                        }));
                    let blocks = take_blocks(&mut self.buf);
                    self.queue.extend(blocks);
                }
                Some(Err(e)) => panic!("body error: {e}"),
                None => return None,
            }
        }
    }

    /// The next change event (heartbeats skipped); panics on anything else.
    async fn change(&mut self) -> Value {
        loop {
            match self.next().await {
                Some(Msg::Comment(_)) => continue,
                Some(Msg::Event { id, event, data }) => {
                    assert_eq!(event, "change", "{data}");
                    assert_eq!(id, data["revision"].as_i64(), "id is the revision: {data}");
                    return data;
                }
                None => panic!("the stream ended"),
            }
        }
    }

    /// Changes until one satisfies `last` (included).
    async fn changes_until(&mut self, last: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut out = Vec::new();
        for _ in 0..10_000 {
            let c = self.change().await;
            let done = last(&c);
            out.push(c);
            if done {
                return out;
            }
        }
        panic!("no end after 10000 changes: {out:?}");
    }
}

fn events_req(query: &str) -> TestRequest {
    TestRequest::get().uri(&format!("/api/1.0/events{query}"))
}

fn is(c: &Value, kind: &str, id: &str) -> bool {
    c["kind"] == kind && c["id"] == id
}

async fn register<A: TestApp>(app: &A, env: &str, name: &str) {
    support::register_shadow(app, env, name).await;
}

async fn act<A: TestApp>(app: &A, action: &str, name: &str, run: &str) {
    let r = send(
        app,
        post(
            "/api/1.0/int/shadow-deployables",
            &json!({"action": action, "name": name, "workflow_run_id": run}),
        )
        .to_request(),
    )
    .await;
    assert_eq!(r.status, 200, "{action} {name}: {r:?}");
}

async fn submit<A: TestApp>(app: &A) -> String {
    let r = send(
        app,
        post(
            "/api/1.0/instances",
            &json!({"requirements": {"cpu": 1, "memory_gb": 1}}),
        )
        .to_request(),
    )
    .await;
    assert_eq!(r.status, 202, "{r:?}");
    r.json["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{r:?}"))
        .to_owned()
}

fn memory() -> Arc<dyn Store> {
    Arc::new(MemoryStore::new())
}

fn config_with(f: impl FnOnce(&mut Config)) -> Config {
    let mut c = support::config();
    f(&mut c);
    c
}

async fn current_revision(store: &dyn Store) -> i64 {
    store
        .list("/no-such-prefix/")
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .1
}

/// Writes through the API arrive in revision order, each with the revision etcd gave
/// the write, the record's state and version, and the `at` format of every timestamp.
#[actix_web::test]
async fn changes_arrive_in_revision_order_matching_the_writes() {
    let etcd = Etcd::start();
    let store = etcd.store(&support::unique_prefix());
    let svc = support::service(support::config(), store.clone()).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    let mut sse = Sse::open(&app, events_req("")).await;
    assert_eq!(sse.status, 200);
    assert_eq!(
        sse.headers
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("text/event-stream")
    );

    register(&app, "int", "d1").await;
    act(&app, "PROCURE", "d1", "run-1").await;
    act(&app, "RELEASE", "d1", "run-1").await;
    let instance = submit(&app).await;
    act(&app, "PROCURE", "d1", "run-2").await;

    let got = sse
        .changes_until(|c| {
            is(c, "shadow", "int/d1") && c["state"] == "PROCURED" && c["version"] == 3
        })
        .await;
    let revisions: Vec<i64> = got.iter().filter_map(|c| c["revision"].as_i64()).collect();
    assert!(
        revisions.windows(2).all(|w| w[0] <= w[1]),
        "revisions go back: {revisions:?}"
    );
    let d1: Vec<(i64, &str, i64)> = got
        .iter()
        .filter(|c| is(c, "shadow", "int/d1"))
        .map(|c| {
            (
                c["revision"].as_i64().unwrap_or_default(),
                c["state"].as_str().unwrap_or_default(),
                c["version"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    let states: Vec<(&str, i64)> = d1.iter().map(|(_, s, v)| (*s, *v)).collect();
    assert_eq!(
        states,
        vec![("FREE", 0), ("PROCURED", 1), ("FREE", 2), ("PROCURED", 3)],
        "{got:?}"
    );
    assert!(d1.windows(2).all(|w| w[0].0 < w[1].0), "{d1:?}");
    // the instance's creation lies between the release and the second procure
    let inst = got
        .iter()
        .find(|c| is(c, "instance", &instance))
        .unwrap_or_else(|| panic!("no instance event in {got:?}"));
    assert_eq!(inst["state"], "PENDING");
    assert_eq!(inst["deleted"], false);
    let at = inst["revision"].as_i64().unwrap_or_default();
    assert!(d1[2].0 < at && at < d1[3].0, "{d1:?} vs {at}");
    // the last one is exactly what etcd holds
    let kv = store
        .get(&keys::shadow("int", "d1"))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("no record"));
    assert_eq!(kv.mod_revision, d1[3].0);
    for c in &got {
        let at = c["at"].as_str().unwrap_or_default();
        assert!(
            at.len() == 24 && at.ends_with('Z') && at.as_bytes()[19] == b'.',
            "{at:?}"
        );
    }
    assert_eq!(got.last().map(|c| c["env"].clone()), Some(json!("int")));
}

/// Changes made while the second subscriber connects: the resumed stream (the
/// `Last-Event-ID` header, then `?since=`) holds exactly the changes after its point
/// that the uninterrupted one holds, in the same order.
async fn resume_has_no_gap_and_no_duplicate(store: Arc<dyn Store>) {
    let svc = support::service(support::config(), store).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    for i in 0..4 {
        register(&app, "int", &format!("r{i}")).await;
    }
    let mut whole = Sse::open(&app, events_req("?kinds=shadow")).await;
    act(&app, "PROCURE", "r0", "run").await;
    act(&app, "PROCURE", "r1", "run").await;
    let first = whole.changes_until(|c| is(c, "shadow", "int/r1")).await;
    let point = first
        .last()
        .and_then(|c| c["revision"].as_i64())
        .unwrap_or_default()
        - 1; // just before r1's procure: the resumed stream must start with it
    let writer = async {
        for i in 0..4 {
            let name = format!("r{i}");
            if i >= 2 {
                act(&app, "PROCURE", &name, "run").await;
            }
            act(&app, "RELEASE", &name, "run").await;
            actix_rt::task::yield_now().await;
        }
        register(&app, "int", "end").await;
    };
    let resume = async {
        let header = Sse::open(
            &app,
            events_req("?kinds=shadow").insert_header(("Last-Event-ID", point.to_string())),
        )
        .await;
        let query = Sse::open(&app, events_req(&format!("?kinds=shadow&since={point}"))).await;
        (header, query)
    };
    let ((mut header, mut query), ()) = futures::join!(resume, writer);
    let end = |c: &Value| is(c, "shadow", "int/end");
    let rest = whole.changes_until(end).await;
    let expected: Vec<Value> = first.into_iter().skip(1).chain(rest).collect();
    let key = |cs: &[Value]| -> Vec<(i64, String, String)> {
        cs.iter()
            .map(|c| {
                (
                    c["revision"].as_i64().unwrap_or_default(),
                    c["id"].as_str().unwrap_or_default().to_owned(),
                    c["state"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    };
    assert_eq!(expected.len(), 1 + 6 + 1, "{expected:?}");
    for (name, sse) in [("Last-Event-ID", &mut header), ("since", &mut query)] {
        assert_eq!(sse.status, 200, "{name}");
        let got = sse.changes_until(end).await;
        assert_eq!(key(&got), key(&expected), "{name}");
    }
}

#[actix_web::test]
async fn resume_with_last_event_id_on_etcd_has_no_gap_and_no_duplicate() {
    let etcd = Etcd::start();
    resume_has_no_gap_and_no_duplicate(etcd.store(&support::unique_prefix())).await;
}

#[actix_web::test]
async fn resume_with_last_event_id_in_memory_has_no_gap_and_no_duplicate() {
    resume_has_no_gap_and_no_duplicate(memory()).await;
}

/// A resume point etcd compacted away: a `reset` naming the revision from which live
/// changes follow, then those changes.
#[actix_web::test]
async fn a_compacted_resume_point_gets_reset_then_live_changes() {
    let etcd = Etcd::start();
    let store = etcd.store(&support::unique_prefix());
    let svc = support::service(support::config(), store.clone()).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    register(&app, "int", "c1").await;
    act(&app, "PROCURE", "c1", "run").await;
    let compacted_at = current_revision(store.as_ref()).await;
    let mut client = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    client
        .compact(compacted_at, None)
        .await
        .unwrap_or_else(|e| panic!("compact: {e}"));

    let mut sse = Sse::open(&app, events_req("").insert_header(("Last-Event-ID", "2"))).await;
    assert_eq!(sse.status, 200);
    let reset = loop {
        match sse.next().await {
            Some(Msg::Comment(_)) => continue,
            Some(m) => break m,
            None => panic!("ended"),
        }
    };
    let (id, event, data) = match reset {
        Msg::Event { id, event, data } => (id, event, data),
        other => panic!("{other:?}"),
    };
    assert_eq!(event, "reset", "{data}");
    assert_eq!(data["reason"], "compacted");
    let from = data["revision"].as_i64().unwrap_or_default();
    assert!(from >= compacted_at, "{from} < {compacted_at}");
    assert_eq!(id, Some(from));
    act(&app, "RELEASE", "c1", "run").await;
    let c = sse.changes_until(|c| is(c, "shadow", "int/c1")).await;
    let last = c.last().cloned().unwrap_or_default();
    assert_eq!(last["state"], "FREE");
    assert!(last["revision"].as_i64().unwrap_or_default() > from);
}

/// `kinds` and `env` select what a subscriber gets (`env` narrows shadow deployables
/// only); bad values, a bad resume point and unknown parameters are 400 `{"error"}`.
#[actix_web::test]
async fn filters_select_kinds_and_env_and_bad_values_are_400() {
    let svc = support::service(support::config(), memory()).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    for (req, needle) in [
        (events_req("?kinds=shadow,bogus"), "unknown kind \"bogus\""),
        (events_req("?kinds="), "unknown kind \"\""),
        (events_req("?kinds=Shadow"), "unknown kind"),
        (events_req("?env=nope"), "unknown environment"),
        (events_req("?since=abc"), "since must be"),
        (events_req("?since=-1"), "since must be"),
        (events_req("?x=1"), "invalid query"),
        (
            events_req("").insert_header(("Last-Event-ID", "12a")),
            "Last-Event-ID must be",
        ),
    ] {
        let r = send(&app, req.to_request()).await;
        assert_eq!(r.status, 400, "{needle}: {r:?}");
        assert!(r.error().contains(needle), "{needle}: {}", r.error());
        assert_eq!(r.json.as_object().map(|o| o.len()), Some(1), "{:?}", r.json);
    }
    assert_eq!(svc.state.events.subscribers(), 0);

    let mut prod = Sse::open(&app, events_req("?env=PROD")).await;
    let mut instances = Sse::open(&app, events_req("?kinds=instance")).await;
    let mut int_shadow = Sse::open(&app, events_req("?kinds=shadow&env=int")).await;
    let mut two = Sse::open(&app, events_req("?kinds=shadow,%20instance")).await;
    register(&app, "int", "a").await;
    register(&app, "prod", "b").await;
    let first = submit(&app).await;
    register(&app, "int", "zz").await;
    let last = submit(&app).await;

    let got = prod.changes_until(|c| is(c, "instance", &last)).await;
    assert!(got.iter().any(|c| is(c, "shadow", "prod/b")), "{got:?}");
    assert!(
        got.iter()
            .all(|c| c["kind"] != "shadow" || c["env"] == "prod"),
        "{got:?}"
    );
    assert!(got.iter().any(|c| is(c, "instance", &first)), "{got:?}");

    let got = instances.changes_until(|c| is(c, "instance", &last)).await;
    assert!(got.iter().all(|c| c["kind"] == "instance"), "{got:?}");
    assert!(got.iter().any(|c| is(c, "instance", &first)), "{got:?}");

    let got = int_shadow
        .changes_until(|c| is(c, "shadow", "int/zz"))
        .await;
    let ids: Vec<&str> = got.iter().filter_map(|c| c["id"].as_str()).collect();
    assert_eq!(ids, vec!["int/a", "int/zz"]);

    let got = two.changes_until(|c| is(c, "instance", &last)).await;
    let kinds: Vec<&str> = got.iter().filter_map(|c| c["kind"].as_str()).collect();
    assert!(
        kinds.iter().all(|k| *k == "shadow" || *k == "instance"),
        "{kinds:?}"
    );
    assert!(got.iter().any(|c| is(c, "shadow", "prod/b")), "{got:?}");
}

/// A subscriber that does not read fills its buffer: it gets the buffered changes,
/// then `overflow` naming the last revision it has, then the end; a reading subscriber
/// gets every change meanwhile.
#[actix_web::test]
async fn a_client_that_does_not_read_gets_overflow_and_others_keep_receiving() {
    let config = config_with(|c| c.events.client_buffer = 4);
    let svc = support::service(config, memory()).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    let mut slow = Sse::open(&app, events_req("?kinds=shadow")).await;
    let mut fast = Sse::open(&app, events_req("?kinds=shadow")).await;
    let mut fast_got = Vec::new();
    for i in 0..12 {
        let name = format!("o{i:02}");
        register(&app, "int", &name).await;
        fast_got.push(
            fast.changes_until(|c| is(c, "shadow", &format!("int/{name}")))
                .await,
        );
    }
    let fast_ids: Vec<String> = fast_got
        .iter()
        .flatten()
        .filter_map(|c| c["id"].as_str().map(str::to_owned))
        .collect();
    let expected: Vec<String> = (0..12).map(|i| format!("int/o{i:02}")).collect();
    assert_eq!(fast_ids, expected);

    let mut slow_got = Vec::new();
    let overflow = loop {
        match slow.next().await {
            Some(Msg::Event { event, data, id }) if event == "change" => {
                assert_eq!(id, data["revision"].as_i64());
                slow_got.push(data)
            }
            Some(Msg::Comment(_)) => continue,
            Some(Msg::Event { event, data, id }) => break (event, data, id),
            None => panic!("ended without overflow after {slow_got:?}"),
        }
    };
    let ids: Vec<&str> = slow_got.iter().filter_map(|c| c["id"].as_str()).collect();
    assert_eq!(ids, vec!["int/o00", "int/o01", "int/o02", "int/o03"]);
    let (event, data, id) = overflow;
    assert_eq!(event, "overflow", "{data}");
    let fifth = fast_got[4].last().and_then(|c| c["revision"].as_i64());
    assert_eq!(
        data["dropped_after"].as_i64(),
        fifth.map(|r| r - 1),
        "{data}"
    );
    assert_eq!(id, data["dropped_after"].as_i64());
    assert_eq!(slow.next().await, None, "the overflowed stream ends");
    // its place under EVENTS_MAX_CLIENTS was given back when it overflowed
    assert_eq!(svc.state.events.subscribers(), 1);
    drop(slow);
    // the reader is still served
    register(&app, "int", "after").await;
    fast.changes_until(|c| is(c, "shadow", "int/after")).await;
    let metrics = send(&app, TestRequest::get().uri("/metrics").to_request()).await;
    let text = String::from_utf8_lossy(&metrics.raw).into_owned();
    assert!(text.contains("events_overflow_total 1"), "{text}");
    assert!(text.contains("events_subscribers 1"), "{text}");
    let sent = text
        .lines()
        .find_map(|l| l.strip_prefix("events_sent_total "))
        .and_then(|v| v.parse::<u64>().ok());
    assert_eq!(sent, Some(4 + 13));
}

/// `EVENTS_MAX_CLIENTS` subscribers at once; the next one is 503 with `Retry-After`
/// until one leaves.
#[actix_web::test]
async fn subscribers_beyond_the_limit_get_503_until_one_leaves() {
    let config = config_with(|c| c.events.max_clients = 2);
    let svc = support::service(config, memory()).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    let a = Sse::open(&app, events_req("")).await;
    let b = Sse::open(&app, events_req("?since=1")).await;
    assert_eq!((a.status, b.status), (200, 200));
    let r = send(&app, events_req("").to_request()).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.error().contains("subscribers"), "{}", r.error());
    assert!(r.headers.contains_key("retry-after"));
    drop(b);
    assert_eq!(svc.state.events.subscribers(), 1);
    let c = Sse::open(&app, events_req("")).await;
    assert_eq!(c.status, 200);
    drop((a, c));
    assert_eq!(svc.state.events.subscribers(), 0);
}

/// Many subscribers at once each get every change, in order.
#[actix_web::test]
async fn many_subscribers_each_get_every_change_in_order() {
    let svc = support::service(support::config(), memory()).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    let mut subs = Vec::new();
    for i in 0..60 {
        let q = if i % 2 == 0 { "" } else { "?kinds=shadow" };
        subs.push(Sse::open(&app, events_req(q)).await);
    }
    for i in 0..10 {
        register(&app, "int", &format!("m{i}")).await;
    }
    for sub in &mut subs {
        let got = sub.changes_until(|c| is(c, "shadow", "int/m9")).await;
        let ids: Vec<&str> = got
            .iter()
            .filter(|c| c["kind"] == "shadow")
            .filter_map(|c| c["id"].as_str())
            .collect();
        let expected: Vec<String> = (0..10).map(|i| format!("int/m{i}")).collect();
        assert_eq!(ids, expected);
    }
}

/// No subscriber, no watch: the shared watch starts with the first subscriber and
/// stops once the last one has left (a later subscriber starts a new one).
#[actix_web::test]
async fn the_shared_watch_runs_only_while_someone_subscribes() {
    let svc = support::service(support::config(), memory()).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    let metrics = svc.state.metrics.clone();
    let watches = || metrics.store_calls("memory", "watch");
    let before = watches();
    register(&app, "int", "w0").await;
    assert_eq!(watches(), before, "a watch without subscribers");
    let mut a = Sse::open(&app, events_req("")).await;
    let mut b = Sse::open(&app, events_req("")).await;
    register(&app, "int", "w1").await;
    a.changes_until(|c| is(c, "shadow", "int/w1")).await;
    b.changes_until(|c| is(c, "shadow", "int/w1")).await;
    assert_eq!(watches(), before + 1, "one shared watch");
    assert!(svc.state.events.watching());
    drop((a, b));
    assert_eq!(svc.state.events.subscribers(), 0);
    let hub = svc.state.events.clone();
    assert!(
        support::eventually(WAIT, || {
            let hub = hub.clone();
            async move { !hub.watching() }
        })
        .await,
        "the shared watch kept running without subscribers"
    );
    register(&app, "int", "w2").await;
    let mut c = Sse::open(&app, events_req("")).await;
    register(&app, "int", "w3").await;
    let got = c.changes_until(|c| is(c, "shadow", "int/w3")).await;
    assert!(!got.iter().any(|c| is(c, "shadow", "int/w2")), "{got:?}");
    assert_eq!(watches(), before + 2, "a new watch for the new subscriber");
}

/// With `API_AUTH_TOKEN`: no token, a wrong one, or the token in the query string is
/// 401 `{"error"}`; the bearer header opens the stream.
#[actix_web::test]
async fn the_stream_needs_the_bearer_token() {
    let config = config_with(|c| c.api_token = Some(Secret::new("s3cret")));
    let svc = support::service(config, memory()).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    for req in [
        events_req(""),
        events_req("").insert_header(("authorization", "Bearer nope")),
        events_req("?token=s3cret"),
        events_req("?access_token=s3cret"),
        TestRequest::get().uri("/api/1.0/%65vents"),
        TestRequest::get().uri("/api/1.0//events"),
    ] {
        let r = send(&app, req.to_request()).await;
        assert_eq!(r.status, 401, "{r:?}");
        assert_eq!(r.json, json!({"error": "missing or invalid bearer token"}));
    }
    assert_eq!(svc.state.events.subscribers(), 0);
    let sse = Sse::open(
        &app,
        events_req("").insert_header(("authorization", "Bearer s3cret")),
    )
    .await;
    assert_eq!(sse.status, 200);
    assert_eq!(svc.state.events.subscribers(), 1);
}

/// Over a real socket with a 1 s heartbeat: the stream stays open with `: keep-alive`
/// comments between changes, each change framed on the wire as the contract says.
#[actix_web::test]
async fn heartbeats_keep_an_idle_stream_open_over_a_real_socket() {
    let config = config_with(|c| {
        c.events.heartbeat = Duration::from_secs(1);
        c.api_token = Some(Secret::new("tok"));
    });
    let svc: Service = support::service(config, memory()).await;
    let state = svc.state.clone();
    let server = HttpServer::new(move || api::app(state.clone()))
        .workers(1)
        .bind(("127.0.0.1", 0))
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let addr = server.addrs()[0];
    let server = server.run();
    let handle = server.handle();
    actix_rt::spawn(server);

    let client = reqwest::Client::new();
    let mut resp = client
        .get(format!("http://{addr}/api/1.0/events?kinds=shadow"))
        .bearer_auth("tok")
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        resp.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("text/event-stream")
    );
    let mut buf = String::new();
    let mut msgs: Vec<Msg> = Vec::new();
    let mut wrote = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut counts = BTreeMap::new();
    while counts.get("keep-alive").copied().unwrap_or(0) < 3 {
        assert!(tokio::time::Instant::now() < deadline, "{msgs:?}");
        let chunk = tokio::time::timeout(WAIT, resp.chunk())
            .await
            .unwrap_or_else(|_| panic!("silent for {WAIT:?}: {msgs:?}"))
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("stream ended: {msgs:?}"));
        buf.push_str(std::str::from_utf8(&chunk).unwrap_or_default());
        for m in take_blocks(&mut buf) {
            let label = match &m {
                Msg::Comment(c) => c.clone(),
                Msg::Event { event, .. } => event.clone(),
            };
            *counts.entry(label).or_insert(0) += 1;
            msgs.push(m);
        }
        if !wrote && counts.contains_key("keep-alive") {
            // a change between heartbeats, written through the API over the socket
            let r = client
                .put(format!("http://{addr}/api/1.0/int/shadow-deployables/hb"))
                .bearer_auth("tok")
                .header("content-type", "application/json")
                .body(json!({"node_pool": "p", "dns": "hb.example"}).to_string())
                .send()
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(r.status().as_u16(), 201);
            wrote = true;
        }
    }
    let changes: Vec<&Value> = msgs
        .iter()
        .filter_map(|m| match m {
            Msg::Event { event, data, .. } if event == "change" => Some(data),
            _ => None,
        })
        .collect();
    assert_eq!(changes.len(), 1, "{msgs:?}");
    assert_eq!(changes[0]["id"], "int/hb");
    assert_eq!(changes[0]["state"], "FREE");
    assert_eq!(counts.len(), 2, "only changes and keep-alives: {counts:?}");
    drop(resp);
    handle.stop(false).await;
}

/// A replica told to stop while a subscriber is connected ends the stream and exits at
/// once; before, the HTTP server waited its whole 10 s shutdown timeout for the stream,
/// and the leader lease was revoked only after that.
#[actix_web::test]
async fn sigterm_ends_open_streams_and_the_replica_exits_without_waiting_for_them() {
    let etcd = Etcd::start();
    let mut svc = crate::cluster::ServiceProc::start(
        "events-stop",
        &[etcd.endpoint()],
        &crate::cluster::test_prefix(),
        &[],
    )
    .await;
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap_or_else(|e| panic!("http client: {e}"));
    let mut resp = http
        .get(svc.url("/api/1.0/events"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("subscribe: {e}"));
    assert_eq!(resp.status().as_u16(), 200);
    let pid = svc.pid().unwrap_or_else(|| panic!("no pid"));
    let started = std::time::Instant::now();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap_or_else(|e| panic!("kill: {e}"));
    assert!(killed.success());
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        while let Ok(Some(_)) = resp.chunk().await {}
    })
    .await
    .is_ok();
    let exited = support::eventually(Duration::from_secs(20), || {
        let done = svc.exited().is_some();
        async move { done }
    })
    .await;
    let took = started.elapsed();
    assert!(ended, "the stream never ended:\n{}", svc.log());
    assert!(exited, "did not exit on SIGTERM:\n{}", svc.log());
    assert!(
        took < Duration::from_secs(8),
        "stopping took {took:?}: the server waited out its 10 s shutdown timeout for the stream"
    );
}
