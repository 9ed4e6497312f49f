//! OpenTelemetry traces, end to end: the service binary (a child process on a real etcd,
//! simulated Kubernetes) exports OTLP/HTTP protobuf to a collector this test runs on
//! loopback, which decodes every `ExportTraceServiceRequest` and keeps the spans.
//! Checked: a PROCURE sent with a `traceparent` continues that trace down to the actor's
//! decide/commit and the etcd calls; a callback's attempt span belongs to the trace of
//! the operation request that asked for it (under that request's span), and the
//! callback carries a `traceparent` naming it; with no endpoint set, nothing is
//! exported or propagated.
//! In process: a grouped etcd Txn's span links to every member's `etcd txn` span.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::dev::ServerHandle;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use prost::Message;
use serde_json::{json, Value};

use resource_plane::adapters::group_commit::GroupCommitStore;
use resource_plane::adapters::instrumented::InstrumentedStore;
use resource_plane::config::{GroupCommitSettings, Secret, TracesSettings};
use resource_plane::ports::store::{Compare, Op, Store, Txn};
use resource_plane::telemetry::Metrics;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::Layer;

use crate::cluster::{test_prefix, ServiceProc};
use crate::support::{eventually, unique_prefix, Etcd};

const BASE: &str = "/api/1.0/int/shadow-deployables";

/// One exported span, flattened.
#[derive(Debug, Clone)]
struct Exported {
    service: String,
    trace_id: String,
    span_id: String,
    parent: String,
    name: String,
    attrs: HashMap<String, String>,
    /// Span links: (trace id, span id).
    links: Vec<(String, String)>,
}

impl Exported {
    fn attr(&self, key: &str) -> Option<&str> {
        self.attrs.get(key).map(String::as_str)
    }
}

fn attr_text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attrs(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), attr_text(&kv.value)))
        .collect()
}

#[derive(Default)]
struct CollectorState {
    spans: Mutex<Vec<Exported>>,
    /// Every request that reached the collector, whatever its path.
    requests: Mutex<Vec<String>>,
    undecodable: Mutex<Vec<String>>,
}

/// A loopback OTLP/HTTP collector: POST /v1/traces with a protobuf body.
struct Collector {
    port: u16,
    state: Arc<CollectorState>,
    handle: ServerHandle,
}

async fn collect(
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<Arc<CollectorState>>,
) -> HttpResponse {
    state
        .requests
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(format!("{} {}", req.method(), req.path()));
    if req.path() != "/v1/traces" {
        return HttpResponse::NotFound().finish();
    }
    let export = match ExportTraceServiceRequest::decode(body.as_ref()) {
        Ok(e) => e,
        Err(e) => {
            state
                .undecodable
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(e.to_string());
            return HttpResponse::BadRequest().finish();
        }
    };
    let mut got = Vec::new();
    for rs in export.resource_spans {
        let resource = rs
            .resource
            .map(|r| attrs(&r.attributes))
            .unwrap_or_default();
        let service = resource.get("service.name").cloned().unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                got.push(Exported {
                    service: service.clone(),
                    trace_id: hex::encode(&s.trace_id),
                    span_id: hex::encode(&s.span_id),
                    parent: hex::encode(&s.parent_span_id),
                    name: s.name.clone(),
                    attrs: attrs(&s.attributes),
                    links: s
                        .links
                        .iter()
                        .map(|l| (hex::encode(&l.trace_id), hex::encode(&l.span_id)))
                        .collect(),
                });
            }
        }
    }
    state
        .spans
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .extend(got);
    // An empty ExportTraceServiceResponse: full success.
    HttpResponse::Ok()
        .content_type("application/x-protobuf")
        .body(Vec::<u8>::new())
}

impl Collector {
    /// Starts on `port` (0: any free one); `None` when the port cannot be bound.
    fn start(port: u16) -> Option<Self> {
        let state = Arc::new(CollectorState::default());
        let data = web::Data::new(state.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .app_data(web::PayloadConfig::new(16 << 20))
                .default_service(web::to(collect))
        })
        .workers(1)
        .disable_signals()
        .shutdown_timeout(1)
        .bind(("127.0.0.1", port))
        .ok()?;
        let port = server.addrs().first().map(SocketAddr::port)?;
        let server = server.run();
        let handle = server.handle();
        actix_web::rt::spawn(server);
        Some(Self {
            port,
            state,
            handle,
        })
    }

    fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn spans(&self) -> Vec<Exported> {
        self.state
            .spans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn requests(&self) -> Vec<String> {
        self.state
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn trace(&self, trace_id: &str) -> Vec<Exported> {
        self.spans()
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect()
    }

    async fn stop(self) {
        self.handle.stop(false).await;
    }
}

/// Headers of each callback received.
type HookLog = Arc<Mutex<Vec<HashMap<String, String>>>>;

/// A callback receiver that records each request's headers.
struct Hooks {
    port: u16,
    got: HookLog,
    handle: ServerHandle,
}

async fn hook(req: HttpRequest, got: web::Data<HookLog>) -> HttpResponse {
    let headers = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    got.lock().unwrap_or_else(|e| e.into_inner()).push(headers);
    HttpResponse::Ok().finish()
}

impl Hooks {
    fn start() -> Self {
        let got: HookLog = Arc::default();
        let data = web::Data::new(got.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .default_service(web::to(hook))
        })
        .workers(1)
        .disable_signals()
        .shutdown_timeout(1)
        .bind(("127.0.0.1", 0))
        .unwrap_or_else(|e| panic!("bind callback receiver: {e}"));
        let port = server
            .addrs()
            .first()
            .map(SocketAddr::port)
            .unwrap_or_else(|| panic!("callback receiver has no address"));
        let server = server.run();
        let handle = server.handle();
        actix_web::rt::spawn(server);
        Self { port, got, handle }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hooks/done", self.port)
    }

    fn received(&self) -> Vec<HashMap<String, String>> {
        self.got.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    async fn stop(self) {
        self.handle.stop(false).await;
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .no_proxy()
        .build()
        .unwrap_or_else(|e| panic!("http client: {e}"))
}

/// Sends `body` with `method` and optional `traceparent`; the status and JSON body.
async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: &Value,
    traceparent: Option<&str>,
) -> (u16, Value) {
    let mut r = http
        .request(method, url)
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(tp) = traceparent {
        r = r.header("traceparent", tp);
    }
    let resp = r.send().await.unwrap_or_else(|e| panic!("{url}: {e:?}"));
    let status = resp.status().as_u16();
    let body = resp.bytes().await.unwrap_or_default();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// Registers `d1` and procures it, with `traceparent` on the PROCURE.
async fn register_and_procure(svc: &ServiceProc, traceparent: Option<&str>) {
    let http = client();
    let (status, body) = call(
        &http,
        reqwest::Method::PUT,
        &svc.url(&format!("{BASE}/d1")),
        &json!({"node_pool": "p1", "dns": "d1.example"}),
        None,
    )
    .await;
    assert_eq!(status, 201, "register: {body}");
    let (status, body) = call(
        &http,
        reqwest::Method::POST,
        &svc.url(BASE),
        &json!({"action": "PROCURE", "name": "d1", "workflow_run_id": "r1",
                "workflow_plan": "pre-scaleup-load-test"}),
        traceparent,
    )
    .await;
    assert_eq!((status, &body), (200, &json!({"status": "PROCURED"})));
}

/// Submits a job (with `traceparent` on the POST) whose watch intent calls `hooks`
/// back; waits (bounded) for the callback and returns its headers.
async fn job_callback(
    svc: &ServiceProc,
    hooks: &Hooks,
    traceparent: Option<&str>,
) -> HashMap<String, String> {
    let (status, body) = call(
        &client(),
        reqwest::Method::POST,
        &svc.url("/api/1.0/int/jobs"),
        &json!({"job_name": "warmup", "container": {"image": "registry.local/warmup:1"},
                "callback": {"url": hooks.url(), "method": "PUT"}}),
        traceparent,
    )
    .await;
    assert_eq!(status, 202, "job: {body}");
    let arrived = eventually(Duration::from_secs(30), || async {
        !hooks.received().is_empty()
    })
    .await;
    assert!(arrived, "no callback arrived:\n{}", svc.log());
    hooks.received().remove(0)
}

fn service_env(extra: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("CALLBACK_ALLOW_INSECURE_LOCALHOST", "true".to_owned()),
        ("SIM_KUBE_READY_DELAY_MS", "100".to_owned()),
        ("KUBE_CONVERGE_INTERVAL_MS", "50".to_owned()),
        (
            "CALLBACK_SIGNING_SECRET",
            "whsec_c2VjcmV0LXRyYWNlcw==".to_owned(),
        ),
    ];
    env.extend(extra.iter().cloned());
    env
}

/// Whether `span` descends from `ancestor` within `trace` (following parent ids).
fn descends(trace: &[Exported], span: &Exported, ancestor: &str) -> bool {
    let by_id: HashMap<&str, &Exported> = trace.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let mut cur = span;
    for _ in 0..64 {
        if cur.parent == ancestor {
            return true;
        }
        match by_id.get(cur.parent.as_str()) {
            Some(p) => cur = p,
            None => return false,
        }
    }
    false
}

#[actix_web::test]
async fn a_procure_and_a_callback_are_exported_as_connected_spans() {
    let etcd = Etcd::start();
    let collector = Collector::start(0).unwrap_or_else(|| panic!("collector did not bind"));
    let hooks = Hooks::start();
    let env = service_env(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.base_url()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
        ("OTEL_SERVICE_NAME", "rp-traces-test".to_owned()),
        // Secret-looking header: must reach the collector, never the log.
        (
            "OTEL_EXPORTER_OTLP_HEADERS",
            "x-collector-token=otlp-secret-42".to_owned(),
        ),
    ]);
    let svc = ServiceProc::start("traces", &[etcd.endpoint()], &test_prefix(), &env).await;

    // 1. A PROCURE continuing the caller's trace.
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let caller_span = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
    let traceparent = format!("00-{trace_id}-{caller_span}-01");
    register_and_procure(&svc, Some(&traceparent)).await;
    let route = "POST /api/1.0/{env}/shadow-deployables";
    let complete = eventually(Duration::from_secs(20), || async {
        let t = collector.trace(&trace_id);
        [route, "shadow.decide", "shadow.commit"]
            .iter()
            .all(|n| t.iter().any(|s| s.name == *n))
            && t.iter().any(|s| s.attr("db.system.name") == Some("etcd"))
    })
    .await;
    let trace = collector.trace(&trace_id);
    assert!(
        complete,
        "incomplete trace {trace_id}: {trace:#?}\nall requests: {:?}\nlog:\n{}",
        collector.requests(),
        svc.log()
    );
    let http = trace
        .iter()
        .find(|s| s.name == route)
        .unwrap_or_else(|| panic!("no HTTP span"));
    assert_eq!(
        http.parent, caller_span,
        "the HTTP span continues the caller's"
    );
    assert_eq!(http.attr("http.response.status_code"), Some("200"));
    assert_eq!(
        http.attr("http.route"),
        Some("/api/1.0/{env}/shadow-deployables")
    );
    assert_eq!(http.service, "rp-traces-test");
    for name in ["shadow.decide", "shadow.commit"] {
        let s = trace.iter().find(|s| s.name == name);
        let s = s.unwrap_or_else(|| panic!("no {name} span"));
        assert!(
            descends(&trace, s, &http.span_id),
            "{name} is not under the HTTP span: {trace:#?}"
        );
    }
    let commit = trace.iter().find(|s| s.name == "shadow.commit");
    let commit = commit.unwrap_or_else(|| panic!("no commit span"));
    let etcd_spans: Vec<&Exported> = trace
        .iter()
        .filter(|s| s.attr("db.system.name") == Some("etcd"))
        .collect();
    assert!(
        etcd_spans
            .iter()
            .all(|s| descends(&trace, s, &http.span_id)),
        "every etcd span of the trace is under the HTTP span: {trace:#?}"
    );
    assert!(
        etcd_spans
            .iter()
            .any(|s| s.name == "etcd txn" && descends(&trace, s, &commit.span_id)),
        "the commit's etcd txn is under shadow.commit: {trace:#?}"
    );

    // 2. The callback belongs to the trace of the request that asked for it: the
    //    attempt span descends from the job POST's span, and the callback's
    //    `traceparent` names that attempt span, in the same trace.
    let job_trace = uuid::Uuid::new_v4().simple().to_string();
    let job_caller = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
    let job_traceparent = format!("00-{job_trace}-{job_caller}-01");
    let headers = job_callback(&svc, &hooks, Some(&job_traceparent)).await;
    let tp = headers
        .get("traceparent")
        .unwrap_or_else(|| panic!("callback without traceparent: {headers:?}"));
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    let (cb_trace, cb_span) = (parts[1].to_owned(), parts[2].to_owned());
    assert_eq!(
        cb_trace, job_trace,
        "the callback's traceparent {tp} is not in the job request's trace"
    );
    let job_route = "POST /api/1.0/{env}/jobs";
    let exported = eventually(Duration::from_secs(20), || async {
        let t = collector.trace(&job_trace);
        t.iter().any(|s| s.span_id == cb_span) && t.iter().any(|s| s.name == job_route)
    })
    .await;
    let trace = collector.trace(&job_trace);
    assert!(
        exported,
        "callback span {tp} or the job request's span not exported: {trace:#?}\nlog:\n{}",
        svc.log()
    );
    let attempt = trace.iter().find(|s| s.span_id == cb_span);
    let attempt = attempt.unwrap_or_else(|| panic!("no attempt span"));
    assert_eq!(attempt.name, "callback_attempt");
    assert_eq!(attempt.attr("http.response.status_code"), Some("200"));
    let job_http = trace.iter().find(|s| s.name == job_route);
    let job_http = job_http.unwrap_or_else(|| panic!("no job request span"));
    assert_eq!(
        job_http.parent, job_caller,
        "the job span continues the caller's"
    );
    assert!(
        descends(&trace, attempt, &job_http.span_id),
        "the callback attempt is not under the job request's span: {trace:#?}"
    );

    let log = svc.log();
    assert!(
        !log.contains("otlp-secret-42"),
        "an OTLP header value was logged"
    );
    hooks.stop().await;
    collector.stop().await;
}

#[actix_web::test]
async fn without_an_endpoint_nothing_is_exported_or_propagated() {
    let etcd = Etcd::start();
    // The OTLP/HTTP default endpoint (4318), in case anything exported by default; a
    // test run elsewhere may hold the port, and then only the other checks apply.
    let default_collector = Collector::start(4318);
    let hooks = Hooks::start();
    let env = service_env(&[
        // Empty is unset.
        ("OTEL_EXPORTER_OTLP_ENDPOINT", String::new()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
    ]);
    let svc = ServiceProc::start("no-traces", &[etcd.endpoint()], &test_prefix(), &env).await;
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let traceparent = format!("00-{trace_id}-00f067aa0ba902b7-01");
    register_and_procure(&svc, Some(&traceparent)).await;
    let headers = job_callback(&svc, &hooks, Some(&traceparent)).await;
    assert!(
        !headers.contains_key("traceparent"),
        "traceparent sent with traces off: {headers:?}"
    );
    if let Some(c) = default_collector {
        // Several batch delays.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(c.requests().is_empty(), "exported: {:?}", c.requests());
        c.stop().await;
    } else {
        println!("port 4318 is taken: the default-endpoint check was not made");
    }
    assert!(
        svc.log().lines().all(|l| !l.contains("trace exporter")),
        "{}",
        svc.log()
    );
    hooks.stop().await;
}

/// In process, with the OTel layer as this thread's subscriber (the actix test runtime
/// runs the group committer on this thread too). Note: this marks traces enabled for the
/// rest of this test process; other tests' threads have no OTel layer, so the helpers
/// find no span context there and do nothing.
#[actix_web::test]
async fn a_grouped_etcd_txn_links_to_every_member_span() {
    let etcd = Etcd::start();
    let collector = Collector::start(0).unwrap_or_else(|| panic!("collector did not bind"));
    let settings = TracesSettings {
        endpoint: Secret::new(format!("{}/v1/traces", collector.base_url())),
        service_name: "rp-group-commit".to_owned(),
        headers: Vec::new(),
        schedule_delay: Duration::from_millis(100),
    };
    let (layer, guard) =
        resource_plane::otel::layer(&settings).unwrap_or_else(|e| panic!("otel layer: {e}"));
    let subscriber =
        tracing_subscriber::registry().with(layer.with_filter(resource_plane::otel::filter()));
    let _default = tracing::subscriber::set_default(subscriber);

    let prefix = unique_prefix();
    let metrics = Metrics::new();
    let grouped: Arc<dyn Store> = Arc::new(GroupCommitStore::new(
        etcd.store(&prefix),
        GroupCommitSettings::default(),
        prefix.len(),
        metrics.clone(),
    ));
    let store = InstrumentedStore::new(grouped, metrics.clone());
    // Polled together before the committer runs: one batch of all of them.
    const MEMBERS: usize = 6;
    let txns = (0..MEMBERS).map(|i| {
        let key = format!("/traced/{i}");
        store.txn(Txn {
            compares: vec![Compare::ModRevision(key.clone(), 0)],
            success: vec![Op::Put {
                key: key.clone(),
                value: b"1".to_vec(),
                lease: None,
            }],
            failure_gets: vec![key],
        })
    });
    let results = tokio::time::timeout(Duration::from_secs(20), futures::future::join_all(txns))
        .await
        .unwrap_or_else(|_| panic!("members not answered in 20 s"));
    assert!(
        results
            .iter()
            .all(|r| r.as_ref().is_ok_and(|r| r.succeeded)),
        "{results:?}"
    );
    assert_eq!(metrics.group_commit_txns.get(), 1, "one grouped Txn");

    let exported = eventually(Duration::from_secs(20), || async {
        let spans = collector.spans();
        spans.iter().any(|s| s.name == "etcd txn (grouped)")
            && spans.iter().filter(|s| s.name == "etcd txn").count() == MEMBERS
    })
    .await;
    let spans = collector.spans();
    assert!(exported, "spans: {spans:#?}");
    let group = spans.iter().find(|s| s.name == "etcd txn (grouped)");
    let group = group.unwrap_or_else(|| panic!("no grouped span"));
    assert_eq!(group.parent, "", "the grouped Txn is a root span");
    assert_eq!(group.attr("members"), Some(MEMBERS.to_string().as_str()));
    let mut members: Vec<(String, String)> = spans
        .iter()
        .filter(|s| s.name == "etcd txn")
        .map(|s| (s.trace_id.clone(), s.span_id.clone()))
        .collect();
    let mut links = group.links.clone();
    members.sort();
    links.sort();
    assert_eq!(links, members, "one link to each member's span");
    let traces: std::collections::HashSet<&String> = members.iter().map(|(t, _)| t).collect();
    assert_eq!(traces.len(), MEMBERS, "each member is its own trace");
    assert!(!traces.contains(&group.trace_id));

    tokio::task::spawn_blocking(move || guard.shutdown())
        .await
        .unwrap_or_else(|e| panic!("shutdown: {e}"));
    collector.stop().await;
}

#[actix_web::test]
async fn spans_still_buffered_are_flushed_on_a_graceful_shutdown() {
    let etcd = Etcd::start();
    let collector = Collector::start(0).unwrap_or_else(|| panic!("collector did not bind"));
    let env = service_env(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.base_url()),
        // No scheduled export during the test: only the shutdown flush can send them.
        ("OTEL_BSP_SCHEDULE_DELAY", "600000".to_owned()),
    ]);
    let mut svc = ServiceProc::start("flush", &[etcd.endpoint()], &test_prefix(), &env).await;
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let traceparent = format!("00-{trace_id}-00f067aa0ba902b7-01");
    register_and_procure(&svc, Some(&traceparent)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        collector.trace(&trace_id).is_empty(),
        "exported before the shutdown: the flush would go untested"
    );
    let pid = svc.pid().unwrap_or_else(|| panic!("no pid"));
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap_or_else(|e| panic!("kill: {e}"));
    assert!(killed.success());
    let exited = eventually(Duration::from_secs(30), || {
        let done = svc.exited().is_some();
        async move { done }
    })
    .await;
    assert!(exited, "did not exit on SIGTERM:\n{}", svc.log());
    let flushed = eventually(Duration::from_secs(5), || async {
        collector
            .trace(&trace_id)
            .iter()
            .any(|s| s.name == "POST /api/1.0/{env}/shadow-deployables")
    })
    .await;
    assert!(
        flushed,
        "spans lost at shutdown: {:#?}\n{}",
        collector.trace(&trace_id),
        svc.log()
    );
    collector.stop().await;
}
