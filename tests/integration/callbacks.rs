//! The HTTP callback sender against a local receiver on 127.0.0.1: signed delivery,
//! retries driven by `RetryPolicy`, no redirects, and SSRF refusals (nothing reaches the
//! receiver). Nothing here sends traffic anywhere but loopback: refused targets are
//! refused before any connection is made.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::dev::ServerHandle;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use async_trait::async_trait;
use resource_plane::adapters::http_callback::{
    check_at_request_time, check_at_request_time_with, HostResolver, HttpCallbackSender,
};
use resource_plane::config::Secret;
use resource_plane::domain::callback::{
    verify_signature, AttemptOutcome, CallbackError, CallbackTarget, RetryPolicy, UrlPolicy,
};
use resource_plane::ports::callback::{CallbackRequest, CallbackSender};

use super::support::free_port;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const TIMESTAMP: i64 = 1_700_000_000;

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
struct Received {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    peer: Option<SocketAddr>,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// How the receiver answers a request; once the script is used up it answers 200.
#[derive(Debug, Clone)]
enum Reply {
    Status(u16),
    Redirect(String),
    Hang,
}

#[derive(Default)]
struct ReceiverState {
    script: Mutex<Vec<Reply>>,
    log: Mutex<Vec<Received>>,
}

/// An actix-web server on 127.0.0.1:0 that records every request.
struct Receiver {
    port: u16,
    state: Arc<ReceiverState>,
    handle: ServerHandle,
}

async fn record(
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<Arc<ReceiverState>>,
) -> HttpResponse {
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
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let received = Received {
        method: req.method().as_str().to_owned(),
        path,
        headers,
        body: body.to_vec(),
        peer: req.peer_addr(),
    };
    state
        .log
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(received);
    let reply = {
        let mut script = state.script.lock().unwrap_or_else(|e| e.into_inner());
        (!script.is_empty()).then(|| script.remove(0))
    };
    match reply {
        None => HttpResponse::Ok().finish(),
        Some(Reply::Status(s)) => {
            let status = actix_web::http::StatusCode::from_u16(s)
                .unwrap_or_else(|e| panic!("status {s}: {e}"));
            HttpResponse::build(status).finish()
        }
        Some(Reply::Redirect(to)) => HttpResponse::Found()
            .insert_header(("location", to))
            .finish(),
        Some(Reply::Hang) => {
            futures::future::pending::<()>().await;
            HttpResponse::Ok().finish()
        }
    }
}

impl Receiver {
    fn start(script: Vec<Reply>) -> Self {
        let state = Arc::new(ReceiverState {
            script: Mutex::new(script),
            log: Mutex::default(),
        });
        let data = web::Data::new(state.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .default_service(web::to(record))
        })
        .workers(1)
        .disable_signals()
        .shutdown_timeout(1)
        .bind(("127.0.0.1", 0))
        .unwrap_or_else(|e| panic!("bind receiver: {e}"));
        let port = server
            .addrs()
            .first()
            .map(SocketAddr::port)
            .unwrap_or_else(|| panic!("receiver has no address"));
        let server = server.run();
        let handle = server.handle();
        actix_web::rt::spawn(server);
        Self {
            port,
            state,
            handle,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn received(&self) -> Vec<Received> {
        self.state
            .log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    async fn stop(self) {
        self.handle.stop(false).await;
    }
}

fn dev_policy() -> UrlPolicy {
    UrlPolicy {
        allowed_hosts: vec![],
        allow_insecure_localhost: true,
    }
}

fn sender(policy: UrlPolicy, signed: bool) -> HttpCallbackSender {
    HttpCallbackSender::new(
        policy,
        signed.then(|| Secret::new(SECRET)),
        Duration::from_secs(5),
    )
}

fn request(url: &str) -> CallbackRequest {
    CallbackRequest {
        target: CallbackTarget::post(url),
        webhook_id: "msg_2b9f6c1e".to_owned(),
        timestamp: TIMESTAMP,
        body: br#"{"request_id":"r-1","status":"SUCCEEDED"}"#.to_vec(),
        traceparent: None,
    }
}

#[actix_web::test]
async fn delivered_callback_carries_method_headers_and_a_valid_signature() {
    let rx = Receiver::start(vec![Reply::Status(204)]);
    let mut req = request(&rx.url("/hooks/done?run=er5tdgsh"));
    req.target.method = "put".to_owned();
    req.target.headers = BTreeMap::from([
        ("Authorization".to_owned(), "Bearer tok-1".to_owned()),
        ("X-Workflow-Run".to_owned(), "er5tdgsh".to_owned()),
    ]);
    let out = sender(dev_policy(), true).send(&req).await;
    assert_eq!(out, AttemptOutcome::Delivered { status: 204 });
    let got = rx.received();
    assert_eq!(got.len(), 1, "{got:?}");
    let r = &got[0];
    assert_eq!(r.method, "PUT");
    assert_eq!(r.path, "/hooks/done?run=er5tdgsh");
    assert_eq!(r.body, req.body);
    assert_eq!(r.header("authorization"), Some("Bearer tok-1"));
    assert_eq!(r.header("x-workflow-run"), Some("er5tdgsh"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("webhook-id"), Some("msg_2b9f6c1e"));
    assert_eq!(r.header("webhook-timestamp"), Some("1700000000"));
    let sig = r.header("webhook-signature").unwrap_or_default();
    assert!(sig.starts_with("v1,"), "{sig}");
    assert!(verify_signature(
        SECRET.as_bytes(),
        "msg_2b9f6c1e",
        TIMESTAMP,
        &r.body,
        sig
    ));
    assert!(!verify_signature(
        b"whsec_b3RoZXI=",
        "msg_2b9f6c1e",
        TIMESTAMP,
        &r.body,
        sig
    ));
    rx.stop().await;
}

#[actix_web::test]
async fn unsigned_when_no_secret_is_configured() {
    let rx = Receiver::start(vec![]);
    let out = sender(dev_policy(), false)
        .send(&request(&rx.url("/cb")))
        .await;
    assert_eq!(out, AttemptOutcome::Delivered { status: 200 });
    let got = rx.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].method, "POST");
    assert_eq!(got[0].header("webhook-signature"), None);
    assert_eq!(got[0].header("webhook-id"), Some("msg_2b9f6c1e"));
    rx.stop().await;
}

#[actix_web::test]
async fn receiver_failing_twice_gets_one_delivery_with_a_stable_webhook_id() {
    let rx = Receiver::start(vec![Reply::Status(503), Reply::Status(503)]);
    let sender = sender(dev_policy(), true);
    let retry = RetryPolicy::default();
    let mut outcomes = Vec::new();
    let mut delays = Vec::new();
    // Time is simulated: the age advances by each planned delay, nothing sleeps.
    let mut age = Duration::ZERO;
    for attempt in 1..=retry.max_attempts {
        let mut req = request(&rx.url("/cb"));
        req.timestamp = TIMESTAMP + i64::try_from(age.as_secs()).unwrap_or(i64::MAX);
        let out = sender.send(&req).await;
        outcomes.push(out.clone());
        match retry.plan_next(&out, attempt, age, 0.5) {
            Some(d) => {
                delays.push(d);
                age += d;
            }
            None => break,
        }
    }
    assert_eq!(
        outcomes,
        vec![
            AttemptOutcome::HttpError { status: 503 },
            AttemptOutcome::HttpError { status: 503 },
            AttemptOutcome::Delivered { status: 200 },
        ]
    );
    assert_eq!(
        delays,
        vec![Duration::from_millis(750), Duration::from_millis(1500)]
    );
    let got = rx.received();
    assert_eq!(got.len(), 3);
    assert!(got
        .iter()
        .all(|r| r.header("webhook-id") == Some("msg_2b9f6c1e")));
    // Each attempt is signed over its own timestamp.
    for r in &got {
        let ts: i64 = r
            .header("webhook-timestamp")
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("timestamp missing: {r:?}"));
        let sig = r.header("webhook-signature").unwrap_or_default();
        assert!(verify_signature(
            SECRET.as_bytes(),
            "msg_2b9f6c1e",
            ts,
            &r.body,
            sig
        ));
    }
    rx.stop().await;
}

#[actix_web::test]
async fn client_error_stops_retries() {
    let rx = Receiver::start(vec![Reply::Status(400)]);
    let out = sender(dev_policy(), true)
        .send(&request(&rx.url("/cb")))
        .await;
    assert_eq!(out, AttemptOutcome::HttpError { status: 400 });
    let retry = RetryPolicy::default();
    assert!(!retry.should_retry(&out, 1, Duration::ZERO));
    assert_eq!(retry.plan_next(&out, 1, Duration::ZERO, 0.5), None);
    assert_eq!(rx.received().len(), 1);
    rx.stop().await;
}

#[actix_web::test]
async fn redirects_are_not_followed() {
    let rx = Receiver::start(vec![]);
    let elsewhere = rx.url("/elsewhere");
    rx.state
        .script
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Reply::Redirect(elsewhere));
    let out = sender(dev_policy(), true)
        .send(&request(&rx.url("/start")))
        .await;
    assert_eq!(out, AttemptOutcome::HttpError { status: 302 });
    assert!(!RetryPolicy::default().should_retry(&out, 1, Duration::ZERO));
    let got = rx.received();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].path, "/start");
    rx.stop().await;
}

#[actix_web::test]
async fn loopback_targets_are_refused_without_the_development_flag() {
    let rx = Receiver::start(vec![]);
    let strict = UrlPolicy::default();
    let sender = sender(strict.clone(), true);
    let port = rx.port;
    for url in [
        format!("http://127.0.0.1:{port}/"),
        format!("https://127.0.0.1:{port}/"),
        format!("https://localhost:{port}/"),
        "https://localhost/".to_owned(),
        format!("http://localhost:{port}/"),
        format!("https://[::1]:{port}/"),
        format!("https://[::ffff:127.0.0.1]:{port}/"),
    ] {
        let out = sender.send(&request(&url)).await;
        assert!(matches!(out, AttemptOutcome::Refused(_)), "{url}: {out:?}");
        assert!(!RetryPolicy::default().should_retry(&out, 1, Duration::ZERO));
        let e = check_at_request_time(&CallbackTarget::post(&url), &strict)
            .await
            .expect_err(&url);
        assert!(!e.is_transient(), "{url}: {e}");
    }
    assert!(rx.received().is_empty(), "{:?}", rx.received());
    rx.stop().await;
}

#[actix_web::test]
async fn hostname_resolving_to_loopback_is_refused_at_request_time() {
    // `localhost` is resolved by the system resolver here, like any other name.
    let e = check_at_request_time(
        &CallbackTarget::post("https://localhost:8443/cb"),
        &UrlPolicy::default(),
    )
    .await
    .expect_err("localhost");
    match &e {
        CallbackError::ForbiddenAddress { host, addr } => {
            assert_eq!(host, "localhost");
            assert!(addr.is_loopback(), "{addr}");
        }
        other => panic!("unexpected error: {other}"),
    }
    assert!(e.to_string().contains("localhost"), "{e}");
    // The development flag accepts it, over https and plain http.
    for url in ["https://localhost:8443/cb", "http://localhost:8080/cb"] {
        check_at_request_time(&CallbackTarget::post(url), &dev_policy())
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
    }
}

#[actix_web::test]
async fn metadata_and_private_addresses_are_refused() {
    for policy in [UrlPolicy::default(), dev_policy()] {
        let sender = sender(policy.clone(), true);
        for url in [
            "http://169.254.169.254/latest/meta-data",
            "https://169.254.169.254/latest/meta-data",
            "https://[fd00:ec2::254]/latest/meta-data",
            "https://[::ffff:a9fe:a9fe]/latest/meta-data",
            "https://10.0.0.1/cb",
            "https://172.16.5.4/cb",
            "https://192.168.1.1/cb",
            "https://100.64.0.1/cb",
            "https://[fe80::1]/cb",
            "https://[fc00::1]/cb",
            "https://0.0.0.0/cb",
            "https://255.255.255.255/cb",
        ] {
            let out = sender.send(&request(url)).await;
            assert!(matches!(out, AttemptOutcome::Refused(_)), "{url}: {out:?}");
            assert!(
                check_at_request_time(&CallbackTarget::post(url), &policy)
                    .await
                    .is_err(),
                "{url}"
            );
        }
    }
}

/// Answers from a fixed table, counting lookups.
struct TableResolver {
    answers: Mutex<Vec<Vec<IpAddr>>>,
    calls: AtomicUsize,
}

impl TableResolver {
    fn new(answers: &[&[&str]]) -> Arc<Self> {
        let answers = answers
            .iter()
            .map(|ips| {
                ips.iter()
                    .map(|s| s.parse().unwrap_or_else(|e| panic!("{s}: {e}")))
                    .collect()
            })
            .collect();
        Arc::new(Self {
            answers: Mutex::new(answers),
            calls: AtomicUsize::new(0),
        })
    }
}

#[async_trait]
impl HostResolver for TableResolver {
    async fn resolve(&self, _host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        let ips = if answers.len() > 1 {
            answers.remove(0)
        } else {
            answers.first().cloned().unwrap_or_default()
        };
        Ok(ips
            .into_iter()
            .map(|ip| SocketAddr::new(ip, port))
            .collect())
    }
}

#[actix_web::test]
async fn connection_goes_to_the_address_that_was_checked() {
    let rx = Receiver::start(vec![]);
    // A rebinding name: loopback first, then an address the policy refuses.
    let resolver = TableResolver::new(&[&["127.0.0.1"], &["0.0.0.0"]]);
    let sender = sender(dev_policy(), true).with_resolver(resolver.clone());
    let url = format!("http://rebind.localhost:{}/hook", rx.port);
    let out = sender.send(&request(&url)).await;
    assert_eq!(out, AttemptOutcome::Delivered { status: 200 });
    let out = sender.send(&request(&url)).await;
    assert!(matches!(out, AttemptOutcome::Refused(_)), "{out:?}");
    assert_eq!(resolver.calls.load(Ordering::SeqCst), 2);
    let got = rx.received();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        got[0].header("host").map(str::to_owned),
        Some(format!("rebind.localhost:{}", rx.port))
    );
    rx.stop().await;
}

#[actix_web::test]
async fn request_time_check_uses_resolution_and_the_allow_list() {
    let public = TableResolver::new(&[&["93.184.216.34", "2606:2800:220:1::1"]]);
    let private = TableResolver::new(&[&["10.1.2.3"]]);
    let strict = UrlPolicy::default();
    let target = CallbackTarget::post("https://hooks.example.com/cb");
    check_at_request_time_with(&target, &strict, public.as_ref())
        .await
        .unwrap_or_else(|e| panic!("public: {e}"));
    let e = check_at_request_time_with(&target, &strict, private.as_ref())
        .await
        .expect_err("private");
    assert!(matches!(e, CallbackError::ForbiddenAddress { .. }), "{e}");
    let allow = UrlPolicy {
        allowed_hosts: UrlPolicy::parse_hosts("hooks.example.com"),
        allow_insecure_localhost: false,
    };
    check_at_request_time_with(&target, &allow, private.as_ref())
        .await
        .unwrap_or_else(|e| panic!("allow-listed: {e}"));
}

#[actix_web::test]
async fn localhost_name_is_delivered_with_the_development_flag() {
    let rx = Receiver::start(vec![]);
    let url = format!("http://localhost:{}/cb", rx.port);
    let out = sender(dev_policy(), true).send(&request(&url)).await;
    assert_eq!(out, AttemptOutcome::Delivered { status: 200 });
    assert_eq!(rx.received().len(), 1);
    rx.stop().await;
}

#[actix_web::test]
async fn unreachable_and_slow_receivers_are_retryable_network_errors() {
    let retry = RetryPolicy::default();
    let closed = format!("http://127.0.0.1:{}/cb", free_port());
    let out = sender(dev_policy(), true).send(&request(&closed)).await;
    assert!(matches!(out, AttemptOutcome::NetworkError(_)), "{out:?}");
    assert!(retry.should_retry(&out, 1, Duration::ZERO));

    let rx = Receiver::start(vec![Reply::Hang]);
    let slow = HttpCallbackSender::new(dev_policy(), None, Duration::from_millis(300));
    let out = slow.send(&request(&rx.url("/slow"))).await;
    match &out {
        AttemptOutcome::NetworkError(e) => assert!(e.contains("timed out"), "{e}"),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(retry.should_retry(&out, 1, Duration::ZERO));
    assert_eq!(rx.received().len(), 1);
    rx.stop().await;
}

#[actix_web::test]
async fn sequential_deliveries_share_one_client_and_its_connections() {
    let rx = Receiver::start(vec![]);
    let s = sender(dev_policy(), true);
    for _ in 0..5 {
        let out = s.send(&request(&rx.url("/cb"))).await;
        assert!(out.is_delivered(), "{out:?}");
    }
    let peers: std::collections::HashSet<SocketAddr> =
        rx.received().iter().filter_map(|r| r.peer).collect();
    assert_eq!(rx.received().len(), 5);
    assert_eq!(
        peers.len(),
        1,
        "one shared client keeps its connection: {peers:?}"
    );
    rx.stop().await;
}
