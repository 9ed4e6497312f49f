//! Test support: a real etcd on loopback, service builders and HTTP helpers.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::body::MessageBody;
use actix_web::dev::ServiceResponse;
use actix_web::http::header::HeaderMap;
use actix_web::test::{self, TestRequest};
use resource_plane::adapters::etcd::{EtcdSettings, EtcdStore};
use resource_plane::app::Service;
use resource_plane::config::Config;
use resource_plane::keys;
use resource_plane::ports::store::{Kv, Store, StoreError, Txn, TxnResult, WatchReceiver};
use serde_json::Value;

/// The request type test services take.
pub type Req = actix_http::Request;

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("cannot find a free port: {e}"))
}

fn require(bin: &str, install: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("`{bin}` not found on PATH: install it with `{install}` (or run `make test`, which does)")
        })
}

/// A single-member etcd started for one test, on free loopback ports and a temp dir.
pub struct Etcd {
    child: Option<Child>,
    /// Client port.
    pub client_port: u16,
    peer_port: u16,
    dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts etcd and waits until it is healthy.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let mut etcd = Self {
            child: None,
            client_port: free_port(),
            peer_port: free_port(),
            dir,
        };
        // The free ports are only free when picked: another test may take one before
        // etcd binds it, and etcd then exits. Pick new ones and start again.
        for _ in 0..3 {
            match etcd.try_spawn() {
                Ok(()) => return etcd,
                Err(log) => {
                    eprintln!("etcd exited at start (port taken?); retrying:\n{log}");
                    etcd.client_port = free_port();
                    etcd.peer_port = free_port();
                }
            }
        }
        etcd.spawn();
        etcd
    }

    /// Starts etcd; `Err(log)` when it exited before becoming healthy.
    fn try_spawn(&mut self) -> Result<(), String> {
        self.start_child();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.healthy() {
            if let Some(c) = self.child.as_mut() {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    self.child = None;
                    let log = std::fs::read_to_string(self.dir.path().join("etcd.log"))
                        .unwrap_or_default();
                    // A fresh data dir for the next try.
                    let _ = std::fs::remove_dir_all(self.dir.path().join("data"));
                    return Err(log);
                }
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not become healthy in 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn spawn(&mut self) {
        self.start_child();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.healthy() {
            assert!(
                Instant::now() < deadline,
                "etcd did not become healthy in 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn start_child(&mut self) {
        let bin = require("etcd", "apt-get install etcd-server");
        let c = format!("http://127.0.0.1:{}", self.client_port);
        let p = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::File::create(self.dir.path().join("etcd.log"))
            .unwrap_or_else(|e| panic!("etcd log: {e}"));
        let err = log.try_clone().unwrap_or_else(|e| panic!("etcd log: {e}"));
        let child = Command::new(bin)
            .args(["--name", "t", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
            .args([
                "--listen-peer-urls",
                &p,
                "--initial-advertise-peer-urls",
                &p,
            ])
            .args(["--initial-cluster", &format!("t={p}")])
            .args(["--initial-cluster-state", "new", "--log-level", "warn"])
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start etcd: {e}"));
        self.child = Some(child);
    }

    fn http_get(&self, path: &str) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.client_port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    }

    fn healthy(&self) -> bool {
        self.http_get("/health")
            .is_some_and(|r| r.contains("\"health\":\"true\""))
    }

    /// etcd's own Prometheus metrics.
    pub fn metrics(&self) -> String {
        self.http_get("/metrics").unwrap_or_default()
    }

    /// How many gRPC calls of `method` (e.g. `Txn`, `Range`) etcd has handled.
    pub fn grpc_calls(&self, method: &str) -> u64 {
        let needle = format!("grpc_method=\"{method}\"");
        self.metrics()
            .lines()
            .filter(|l| l.starts_with("grpc_server_handled_total") && l.contains(&needle))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    /// `host:port` of the client endpoint.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// SIGKILLs the member.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same ports and data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// A store client on this etcd under `prefix`.
    pub fn store(&self, prefix: &str) -> Arc<dyn Store> {
        Arc::new(EtcdStore::new(self.settings(prefix)))
    }

    /// Connection settings under `prefix`.
    pub fn settings(&self, prefix: &str) -> EtcdSettings {
        EtcdSettings {
            endpoints: vec![self.endpoint()],
            prefix: prefix.to_owned(),
            auth: None,
            dial_timeout: Duration::from_millis(1_000),
            request_timeout: Duration::from_millis(1_500),
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A unique key prefix so tests sharing an etcd never collide.
/// The in-use index entry of deployable `name` in env `int`, as stored.
pub async fn in_use_index(store: &dyn Store, name: &str) -> Option<Kv> {
    store
        .get(&keys::shadow_in_use("int", name))
        .await
        .ok()
        .flatten()
}

/// The in-use index value of deployable `name` in env `int` (`None` when absent).
pub async fn in_use_index_value(store: &dyn Store, name: &str) -> Option<String> {
    in_use_index(store, name)
        .await
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
}

pub fn unique_prefix() -> String {
    format!("/test-{}", uuid::Uuid::new_v4().simple())
}

/// Test configuration (no seed file, retry delay 300).
pub fn config() -> Config {
    Config::for_tests()
}

/// Starts a service on `store` and waits until it is hydrated.
pub async fn service(config: Config, store: Arc<dyn Store>) -> Service {
    let svc = Service::start_with_store(config, store)
        .unwrap_or_else(|e| panic!("service did not start: {e}"));
    assert!(
        svc.wait_hydrated(Duration::from_secs(15)).await,
        "service did not hydrate"
    );
    svc
}

/// What a test double changes about a store: each method gets the wrapped store and, by
/// default, forwards to it, so a double overrides only the calls it interferes with and
/// holds only its own state. Wrap it around a store with [`Hooked`].
#[async_trait::async_trait]
pub trait Hook: Send + Sync + 'static {
    /// [`Store::get`].
    async fn get(&self, inner: &dyn Store, key: &str) -> Result<Option<Kv>, StoreError> {
        inner.get(key).await
    }
    /// [`Store::list`].
    async fn list(&self, inner: &dyn Store, prefix: &str) -> Result<(Vec<Kv>, i64), StoreError> {
        inner.list(prefix).await
    }
    /// [`Store::list_after`].
    async fn list_after(
        &self,
        inner: &dyn Store,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Kv>, bool), StoreError> {
        inner.list_after(prefix, after, limit).await
    }
    /// [`Store::txn`].
    async fn txn(&self, inner: &dyn Store, txn: Txn) -> Result<TxnResult, StoreError> {
        inner.txn(txn).await
    }
    /// [`Store::grant_lease`].
    async fn grant_lease(&self, inner: &dyn Store, ttl_seconds: i64) -> Result<i64, StoreError> {
        inner.grant_lease(ttl_seconds).await
    }
    /// [`Store::watch`].
    async fn watch(
        &self,
        inner: &dyn Store,
        prefix: &str,
        start_revision: i64,
    ) -> Result<WatchReceiver, StoreError> {
        inner.watch(prefix, start_revision).await
    }
    /// [`Store::name`].
    fn name(&self, inner: &dyn Store) -> &'static str {
        inner.name()
    }
}

/// A store that passes every call to `inner` through `hook`: the one delegating test
/// double, so fault injectors state only what they change.
pub struct Hooked<H> {
    /// The wrapped store.
    pub inner: Arc<dyn Store>,
    /// What this double changes; tests read its state through here.
    pub hook: H,
}

impl<H: Hook> Hooked<H> {
    /// `hook` around `inner`.
    pub fn new(inner: Arc<dyn Store>, hook: H) -> Arc<Self> {
        Arc::new(Self { inner, hook })
    }
}

#[async_trait::async_trait]
impl<H: Hook> Store for Hooked<H> {
    async fn get(&self, key: &str) -> Result<Option<Kv>, StoreError> {
        self.hook.get(self.inner.as_ref(), key).await
    }
    async fn list(&self, prefix: &str) -> Result<(Vec<Kv>, i64), StoreError> {
        self.hook.list(self.inner.as_ref(), prefix).await
    }
    async fn list_after(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Kv>, bool), StoreError> {
        let inner = self.inner.as_ref();
        self.hook.list_after(inner, prefix, after, limit).await
    }
    async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError> {
        self.hook.txn(self.inner.as_ref(), txn).await
    }
    async fn grant_lease(&self, ttl_seconds: i64) -> Result<i64, StoreError> {
        self.hook
            .grant_lease(self.inner.as_ref(), ttl_seconds)
            .await
    }
    async fn keep_alive(&self, lease: i64) -> Result<i64, StoreError> {
        self.inner.keep_alive(lease).await
    }
    async fn revoke_lease(&self, lease: i64) -> Result<(), StoreError> {
        self.inner.revoke_lease(lease).await
    }
    async fn watch(&self, prefix: &str, start_revision: i64) -> Result<WatchReceiver, StoreError> {
        let inner = self.inner.as_ref();
        self.hook.watch(inner, prefix, start_revision).await
    }
    async fn health(&self) -> Result<(), StoreError> {
        self.inner.health().await
    }
    fn name(&self) -> &'static str {
        self.hook.name(self.inner.as_ref())
    }
}

/// A store whose listing of one prefix takes `delay` longer (a large fleet, a slow
/// etcd): the replica's view of it fills long after the others and the election.
pub struct SlowListing {
    prefix: &'static str,
    delay: Duration,
}

impl SlowListing {
    /// Listings of exactly `prefix` wait `delay` first.
    pub fn new(prefix: &'static str, delay: Duration) -> Self {
        Self { prefix, delay }
    }
}

#[async_trait::async_trait]
impl Hook for SlowListing {
    async fn list(&self, inner: &dyn Store, prefix: &str) -> Result<(Vec<Kv>, i64), StoreError> {
        if prefix == self.prefix {
            tokio::time::sleep(self.delay).await;
        }
        inner.list(prefix).await
    }
}

/// An answer.
#[derive(Debug)]
pub struct Resp {
    /// Status code.
    pub status: u16,
    /// Parsed JSON body (Null if not JSON).
    pub json: Value,
    /// Raw body.
    pub raw: Vec<u8>,
    /// Headers.
    pub headers: HeaderMap,
}

impl Resp {
    /// The `error` message of an error body.
    pub fn error(&self) -> String {
        self.json["error"].as_str().unwrap_or_default().to_owned()
    }
}

/// Sends a request to an in-process app.
pub async fn send<S, B>(app: &S, req: Req) -> Resp
where
    S: actix_web::dev::Service<Req, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody,
{
    let res = match app.call(req).await {
        Ok(r) => r,
        Err(e) => panic!("service error: {e}"),
    };
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    // An event stream never ends on its own: its head is the answer (dropping the
    // response closes the stream).
    let streaming = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let raw = if streaming {
        Vec::new()
    } else {
        test::read_body(res).await.to_vec()
    };
    let json = serde_json::from_slice(&raw).unwrap_or(Value::Null);
    Resp {
        status,
        json,
        raw,
        headers,
    }
}

/// A JSON POST.
pub fn post(path: &str, body: &Value) -> TestRequest {
    TestRequest::post().uri(path).set_json(body)
}

/// Submits an instance of `cpu` CPUs and `memory_gb` GB through the API; asserts 202
/// and returns the answer.
pub async fn submit_instance(app: &impl TestApp, cpu: f64, memory_gb: f64, dnd: bool) -> Value {
    let body = serde_json::json!({
        "requirements": {"cpu": cpu, "memory_gb": memory_gb},
        "do_not_disrupt": dnd,
    });
    let r = send(app, post("/api/1.0/instances", &body).to_request()).await;
    assert_eq!(r.status, 202, "{:?}", r.json);
    r.json
}

/// The `id` of an answer (empty when it has none).
pub fn id_of(answer: &Value) -> String {
    answer["id"].as_str().unwrap_or_default().to_owned()
}

/// A JSON PUT.
pub fn put(path: &str, body: &Value) -> TestRequest {
    TestRequest::put().uri(path).set_json(body)
}

/// A GET.
pub fn get(path: &str) -> TestRequest {
    TestRequest::get().uri(path)
}

/// Polls `f` until it is true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Any in-process app built by `test::init_service`.
pub trait TestApp:
    actix_web::dev::Service<Req, Response = ServiceResponse<Self::Body>, Error = actix_web::Error>
{
    /// Its body type.
    type Body: MessageBody;
}

impl<S, B> TestApp for S
where
    S: actix_web::dev::Service<Req, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody,
{
    type Body = B;
}

/// Serves `state`'s API in-process on a free loopback port (two workers, no signal
/// handling): its base URL and the server's handle, to stop it at the end.
pub fn serve_api(
    state: actix_web::web::Data<resource_plane::api::AppState>,
) -> (String, actix_web::dev::ServerHandle) {
    let server = actix_web::HttpServer::new(move || resource_plane::api::app(state.clone()))
        .workers(2)
        .disable_signals()
        .shutdown_timeout(1)
        .bind(("127.0.0.1", 0))
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let port = server
        .addrs()
        .first()
        .map(std::net::SocketAddr::port)
        .unwrap_or_else(|| panic!("server has no address"));
    let server = server.run();
    let handle = server.handle();
    actix_web::rt::spawn(server);
    (format!("http://127.0.0.1:{port}"), handle)
}

/// Registers shadow deployable `name` (pool `p`) in `env` through the API.
pub async fn register_shadow<A: TestApp>(app: &A, env: &str, name: &str) {
    let r = send(
        app,
        put(
            &format!("/api/1.0/{env}/shadow-deployables/{name}"),
            &serde_json::json!({"node_pool": "p", "dns": format!("{name}.example")}),
        )
        .to_request(),
    )
    .await;
    assert!(r.status == 201 || r.status == 200, "register {name}: {r:?}");
}
