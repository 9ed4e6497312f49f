//! Test support for fault tests against real processes on loopback: a three-member etcd
//! cluster (one member can be killed and restarted on its data dir), the service binary
//! as a child process, and a small HTTP client for it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use resource_plane::adapters::etcd::{EtcdSettings, EtcdStore};
use resource_plane::ports::store::Store;
use serde_json::Value;

use crate::support::free_port;

/// The service binary Cargo built for these tests.
pub const SERVICE_BIN: &str = env!("CARGO_BIN_EXE_resource-plane");

/// The worker templates shipped in `config/` (image ids that moto knows).
pub const TEMPLATES_FILE: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/config/worker-templates.yaml");

fn on_path(bin: &str, install: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("`{bin}` not found on PATH: install it with `{install}` (or `make test`)")
        })
}

/// A plain HTTP/1.0 GET on loopback (etcd's `/health` and `/metrics`).
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// One member of an [`EtcdCluster`].
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

/// A three-member etcd cluster on loopback, each member with its own data dir.
pub struct EtcdCluster {
    members: Vec<Member>,
    token: String,
    dir: tempfile::TempDir,
}

/// What `etcdctl endpoint status` reports for one member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    /// The member's id.
    pub member_id: u64,
    /// The id of the leader it knows.
    pub leader: u64,
    /// Its store revision.
    pub revision: i64,
    /// Its raft applied index.
    pub applied_index: u64,
}

impl EtcdCluster {
    /// Starts three members and waits (bounded) until all are healthy. A free port can
    /// be taken by another test's process between choosing it and etcd binding it, so a
    /// cluster that does not come up is started again on fresh ports (three tries).
    pub fn start() -> Self {
        let mut logs = String::new();
        for attempt in 1..=3 {
            let cluster = Self::start_once();
            if cluster.try_wait_healthy(&[0, 1, 2], Duration::from_secs(30)) {
                return cluster;
            }
            for m in &cluster.members {
                let log =
                    std::fs::read_to_string(cluster.dir.path().join(format!("{}.log", m.name)))
                        .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                logs.push_str(&format!("attempt {attempt}, {}: {:?}\n", m.name, tail));
            }
            // Dropping the cluster stops its members before the next try.
        }
        panic!("a 3-member etcd cluster did not become healthy in three tries:\n{logs}");
    }

    fn start_once() -> Self {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let members = (1..=3)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                child: None,
            })
            .collect();
        let mut cluster = Self {
            members,
            token: format!("t-{}", uuid::Uuid::new_v4().simple()),
            dir,
        };
        for i in 0..3 {
            cluster.spawn(i);
        }
        cluster
    }

    /// Whether every member in `which` reports healthy within `timeout`.
    fn try_wait_healthy(&self, which: &[usize], timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !which.iter().all(|i| self.healthy(*i)) {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        true
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&mut self, i: usize) {
        let bin = on_path("etcd", "apt-get install etcd-server");
        let initial = self.initial_cluster();
        let m = &self.members[i];
        let c = format!("http://127.0.0.1:{}", m.client_port);
        let p = format!("http://127.0.0.1:{}", m.peer_port);
        let log_path = self.dir.path().join(format!("{}.log", m.name));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap_or_else(|e| panic!("etcd log: {e}"));
        let err = log.try_clone().unwrap_or_else(|e| panic!("etcd log: {e}"));
        let child = Command::new(bin)
            .args(["--name", &m.name, "--data-dir"])
            .arg(self.dir.path().join(&m.name))
            .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
            .args([
                "--listen-peer-urls",
                &p,
                "--initial-advertise-peer-urls",
                &p,
            ])
            .args(["--initial-cluster", &initial])
            .args(["--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", "new", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start etcd: {e}"));
        self.members[i].child = Some(child);
    }

    /// Waits until every member in `which` reports healthy; panics after `timeout`.
    pub fn wait_healthy(&self, which: &[usize], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !which.iter().all(|i| self.healthy(*i)) {
            assert!(
                Instant::now() < deadline,
                "etcd members {which:?} not healthy within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether member `i` answers `/health` with `true` (it is up and has a leader).
    pub fn healthy(&self, i: usize) -> bool {
        http_get(self.members[i].client_port, "/health")
            .is_some_and(|r| r.contains("\"health\":\"true\""))
    }

    /// `host:port` of member `i`'s client endpoint.
    pub fn endpoint(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.members[i].client_port)
    }

    /// Every member's client endpoint.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// `etcdctl endpoint status` of member `i` (`None` when it does not answer).
    pub fn status(&self, i: usize) -> Option<MemberStatus> {
        let bin = on_path("etcdctl", "apt-get install etcd-client");
        let out = Command::new(bin)
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.endpoint(i)])
            .args(["--dial-timeout", "1s", "--command-timeout", "2s"])
            .args(["endpoint", "status", "-w", "json"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        let s = &v.as_array()?.first()?["Status"];
        Some(MemberStatus {
            member_id: s["header"]["member_id"].as_u64()?,
            leader: s["leader"].as_u64()?,
            revision: s["header"]["revision"].as_i64()?,
            applied_index: s["raftAppliedIndex"].as_u64().unwrap_or(0),
        })
    }

    /// The index of the member every live member agrees is the leader.
    pub fn leader(&self) -> Option<usize> {
        let statuses: Vec<Option<MemberStatus>> =
            (0..self.members.len()).map(|i| self.status(i)).collect();
        let leader_id = statuses.iter().flatten().next()?.leader;
        if statuses.iter().flatten().any(|s| s.leader != leader_id) {
            return None;
        }
        statuses
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| s.member_id == leader_id))
    }

    /// SIGKILLs member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its ports and data dir (it rejoins the cluster).
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
    }

    /// The log of member `i` (for failure messages).
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(
            self.dir
                .path()
                .join(format!("{}.log", self.members[i].name)),
        )
        .unwrap_or_default()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// A store client on `endpoints` under `prefix`, with the deadlines the tests use.
pub fn store_on(endpoints: Vec<String>, prefix: &str) -> Arc<dyn Store> {
    Arc::new(EtcdStore::new(EtcdSettings {
        endpoints,
        prefix: prefix.to_owned(),
        auth: None,
        dial_timeout: Duration::from_millis(1_000),
        request_timeout: Duration::from_millis(1_500),
    }))
}

/// A unique `ETCD_PREFIX`.
pub fn test_prefix() -> String {
    format!("/t-{}", uuid::Uuid::new_v4().simple())
}

/// The service binary running as a child process; SIGKILLed on drop.
pub struct ServiceProc {
    child: Option<Child>,
    /// HTTP port.
    pub port: u16,
    dir: tempfile::TempDir,
}

impl ServiceProc {
    /// Starts the service on `etcd_endpoints` under `prefix` with `extra` variables
    /// (which override the defaults) and waits (bounded) until `/health/ready` is 200.
    ///
    /// The environment is cleared first: no inherited `AWS_*`, `USE_MOCK_ADAPTERS` or
    /// credentials reach the child. Kubernetes and the cloud are simulated unless `extra`
    /// says otherwise, and EC2 points at a closed loopback port unless `extra` names
    /// another, so nothing ever leaves 127.0.0.1.
    pub async fn start(
        name: &str,
        etcd_endpoints: &[String],
        prefix: &str,
        extra: &[(&str, String)],
    ) -> Self {
        let mut last_log = String::new();
        for _ in 0..3 {
            let mut svc = Self {
                child: None,
                port: free_port(),
                dir: tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}")),
            };
            svc.spawn(etcd_endpoints, prefix, extra);
            match svc.wait_ready(Duration::from_secs(30)).await {
                Ok(()) => return svc,
                // Lost the race for the free port; try another one.
                Err(log) if log.contains("cannot listen") => last_log = log,
                Err(log) => panic!("service {name} did not become ready:\n{log}"),
            }
        }
        panic!("service {name} could not bind a port:\n{last_log}")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("service.log")
    }

    fn spawn(&mut self, etcd_endpoints: &[String], prefix: &str, extra: &[(&str, String)]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap_or_else(|e| panic!("service log: {e}"));
        let err = log
            .try_clone()
            .unwrap_or_else(|e| panic!("service log: {e}"));
        let mut cmd = Command::new(SERVICE_BIN);
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("APP_HOST", "127.0.0.1")
            .env("APP_PORT", self.port.to_string())
            .env("USE_MOCK_ADAPTERS", "false")
            .env("ETCD_ENDPOINTS", etcd_endpoints.join(","))
            .env("ETCD_PREFIX", prefix)
            .env("SHADOW_SEED_FILE", "")
            .env("WORKER_TEMPLATES_FILE", TEMPLATES_FILE)
            .env("RUST_LOG", "warn")
            .env("ETCD_REQUEST_TIMEOUT_MS", "1500")
            .env("ETCD_DIAL_TIMEOUT_MS", "1000")
            .env("HTTP_WORKERS", "2")
            .env("ACTOR_THREADS", "2")
            // No Kubernetes here; the simulated cloud unless a test asks for EC2 (moto).
            .env("KUBE_ADAPTER", "sim")
            .env("CLOUD_ADAPTER", "sim")
            // No CML here: instance states are driven through the API. (The `cml`
            // default would reach for each worker's private IP, which with moto is not
            // a loopback address.)
            .env("WORKER_AGENT", "heartbeat")
            .env("CLUSTER_ID", format!("c-{}", uuid::Uuid::new_v4().simple()))
            // Port 9 (discard) has no listener on loopback: any EC2 call fails at once.
            .env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true");
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let child = cmd
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {SERVICE_BIN}: {e}"));
        self.child = Some(child);
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let http = Http::new();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Err(format!("exited with {status}:\n{}", self.log()));
            }
            if let Ok(a) = http.get(&self.url("/health/ready")).await {
                if a.status == 200 {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(format!("not ready in {timeout:?}:\n{}", self.log()));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The exit status, once the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// SIGKILLs the process and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The process's log (stdout and stderr).
    pub fn log(&self) -> String {
        read_lossy(&self.log_path())
    }
}

impl Drop for ServiceProc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// An HTTP answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// Parsed JSON body (`Null` when not JSON).
    pub json: Value,
    /// The `Retry-After` header.
    pub retry_after: Option<String>,
    /// Whether `Idempotent-Replayed: true` was set.
    pub replayed: bool,
}

/// A reqwest client with short deadlines, for loopback only.
#[derive(Clone)]
pub struct Http {
    client: reqwest::Client,
}

impl Default for Http {
    fn default() -> Self {
        Self::new()
    }
}

impl Http {
    /// A client with a 10 s request deadline.
    pub fn new() -> Self {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(2))
            .no_proxy()
            .build()
            .unwrap_or_else(|e| panic!("http client: {e}"));
        Self { client }
    }

    async fn answer(r: reqwest::RequestBuilder) -> Result<Answer, String> {
        let resp = r.send().await.map_err(|e| format!("{e:?}"))?;
        let status = resp.status().as_u16();
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let retry_after = header("retry-after");
        let replayed = header("idempotent-replayed").as_deref() == Some("true");
        let body = resp.bytes().await.map_err(|e| format!("{e:?}"))?;
        Ok(Answer {
            status,
            json: serde_json::from_slice(&body).unwrap_or(Value::Null),
            retry_after,
            replayed,
        })
    }

    /// GET `url`.
    pub async fn get(&self, url: &str) -> Result<Answer, String> {
        Self::answer(self.client.get(url)).await
    }

    /// POST a JSON body, with an idempotency key when given.
    pub async fn post(&self, url: &str, body: &Value, key: Option<&str>) -> Result<Answer, String> {
        let mut r = self
            .client
            .post(url)
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(k) = key {
            r = r.header("X-Idempotency-Key", k);
        }
        Self::answer(r).await
    }

    /// PUT a JSON body.
    pub async fn put(&self, url: &str, body: &Value) -> Result<Answer, String> {
        Self::answer(
            self.client
                .put(url)
                .header("content-type", "application/json")
                .body(body.to_string()),
        )
        .await
    }
}
