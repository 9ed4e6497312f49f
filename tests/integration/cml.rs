//! The CML adapter against a CML emulator: a small real HTTP server on 127.0.0.1 that
//! implements exactly the REST subset the adapter uses (`authenticate`,
//! `system_information`, `labs`, `labs/{id}`, `labs/{id}/state`, `labs/{id}/stop`,
//! `system_health`), one host per first path segment (so `CML_URL_TEMPLATE` can be
//! `http://127.0.0.1:<port>/{worker_id}`), with tokens the test can expire, labs that move
//! between states and a `ready` flag.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::dev::ServerHandle;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use resource_plane::adapters::cml::CmlAgent;
use resource_plane::config::{CmlSettings, Secret};
use resource_plane::domain::cml::{plan_sync, UnknownLab};
use resource_plane::domain::worker::{Instance, InstanceState, Resources, WorkerState};
use resource_plane::ports::agent::{AgentError, AgentTarget, LabState, WorkerAgent};
use serde_json::{json, Value};

use super::support::free_port;

const USER: &str = "admin";
const PASSWORD: &str = "cml-S3cret-pw!";

#[derive(Debug, Clone)]
struct EmuLab {
    title: String,
    state: String,
    tags: Option<Vec<String>>,
}

#[derive(Debug, Default)]
struct EmuHost {
    ready: bool,
    labs: BTreeMap<String, EmuLab>,
}

#[derive(Debug, Default)]
struct Emu {
    hosts: BTreeMap<String, EmuHost>,
    /// token -> still valid
    tokens: BTreeMap<String, bool>,
    issued: usize,
    auth_calls: usize,
    password: String,
    /// (method, path after the host segment, status answered)
    log: Vec<(String, String, u16)>,
    in_flight: usize,
    max_in_flight: usize,
    slow_labs: bool,
}

struct Emulator {
    port: u16,
    state: Arc<Mutex<Emu>>,
    handle: ServerHandle,
}

fn lock(s: &Mutex<Emu>) -> std::sync::MutexGuard<'_, Emu> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

async fn serve(
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<Arc<Mutex<Emu>>>,
) -> HttpResponse {
    let method = req.method().as_str().to_owned();
    let path = req.path().trim_start_matches('/').to_owned();
    let (host, rest) = path.split_once("/api/v0/").unwrap_or(("", ""));
    let (host, rest) = (host.to_owned(), rest.to_owned());
    let slow = {
        let mut s = lock(&state);
        s.in_flight += 1;
        s.max_in_flight = s.max_in_flight.max(s.in_flight);
        s.slow_labs && rest.starts_with("labs/")
    };
    if slow {
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let bearer = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let mut s = lock(&state);
    s.in_flight -= 1;
    let resp = answer(&mut s, &method, &host, &rest, bearer.as_deref(), &body);
    s.log.push((method, rest, resp.status().as_u16()));
    resp
}

fn answer(
    s: &mut Emu,
    method: &str,
    host: &str,
    rest: &str,
    bearer: Option<&str>,
    body: &[u8],
) -> HttpResponse {
    if !s.hosts.contains_key(host) {
        return HttpResponse::NotFound().json(json!({"description": "no such host"}));
    }
    match (method, rest) {
        ("POST", "authenticate") => {
            s.auth_calls += 1;
            let creds: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            if creds["username"] == USER && creds["password"] == s.password.as_str() {
                s.issued += 1;
                let token = format!("tok-{}", s.issued);
                s.tokens.insert(token.clone(), true);
                HttpResponse::Ok().json(token)
            } else {
                HttpResponse::Forbidden().json(json!({"description": "Authentication failed!"}))
            }
        }
        ("GET", "system_information") => {
            let ready = s.hosts.get(host).is_some_and(|h| h.ready);
            HttpResponse::Ok().json(json!({"version": "2.7.0+build.3", "ready": ready}))
        }
        _ => {
            if !bearer.is_some_and(|t| s.tokens.get(t).copied().unwrap_or(false)) {
                return HttpResponse::Unauthorized()
                    .json(json!({"description": "No authorization token provided."}));
            }
            let Some(h) = s.hosts.get_mut(host) else {
                return HttpResponse::NotFound().finish();
            };
            let parts: Vec<&str> = rest.split('/').collect();
            match (method, parts.as_slice()) {
                ("GET", ["labs"]) => HttpResponse::Ok().json(h.labs.keys().collect::<Vec<_>>()),
                ("GET", ["system_health"]) => HttpResponse::Ok().json(json!({
                    "valid": true,
                    "computes": {"c1": {"hostname": "cml-controller", "is_controller": true, "valid": true}},
                })),
                ("GET", ["labs", id]) => match h.labs.get(*id) {
                    Some(l) => {
                        let mut v = json!({
                            "id": id, "state": l.state, "lab_title": l.title,
                            "lab_description": "", "owner": "00000000-0000-4000-a000-000000000000",
                            "node_count": 2, "link_count": 1,
                        });
                        if let Some(tags) = &l.tags {
                            v["tags"] = json!(tags);
                        }
                        HttpResponse::Ok().json(v)
                    }
                    None => HttpResponse::NotFound().json(json!({"description": "Lab not found"})),
                },
                ("GET", ["labs", id, "state"]) => match h.labs.get(*id) {
                    Some(l) => HttpResponse::Ok().json(&l.state),
                    None => HttpResponse::NotFound().finish(),
                },
                ("PUT", ["labs", id, "stop"]) => match h.labs.get_mut(*id) {
                    Some(l) => {
                        l.state = "STOPPED".into();
                        HttpResponse::NoContent().finish()
                    }
                    None => HttpResponse::NotFound().finish(),
                },
                _ => HttpResponse::NotFound().finish(),
            }
        }
    }
}

impl Emulator {
    fn start(hosts: &[&str]) -> Self {
        let mut emu = Emu {
            password: PASSWORD.into(),
            ..Emu::default()
        };
        for h in hosts {
            emu.hosts.insert((*h).to_owned(), EmuHost::default());
        }
        let state = Arc::new(Mutex::new(emu));
        let data = web::Data::new(state.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .default_service(web::to(serve))
        })
        .workers(2)
        .disable_signals()
        .shutdown_timeout(1)
        .bind(("127.0.0.1", 0))
        .unwrap_or_else(|e| panic!("bind emulator: {e}"));
        let port = server
            .addrs()
            .first()
            .map(SocketAddr::port)
            .unwrap_or_else(|| panic!("emulator has no address"));
        let server = server.run();
        let handle = server.handle();
        actix_web::rt::spawn(server);
        Self {
            port,
            state,
            handle,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Emu) -> T) -> T {
        f(&mut lock(&self.state))
    }

    fn set_ready(&self, host: &str, ready: bool) {
        self.with(|s| {
            if let Some(h) = s.hosts.get_mut(host) {
                h.ready = ready;
            }
        });
    }

    fn put_lab(&self, host: &str, id: &str, title: &str, state: &str, tags: Option<&[&str]>) {
        self.with(|s| {
            if let Some(h) = s.hosts.get_mut(host) {
                h.labs.insert(
                    id.to_owned(),
                    EmuLab {
                        title: title.to_owned(),
                        state: state.to_owned(),
                        tags: tags.map(|t| t.iter().map(|x| (*x).to_owned()).collect()),
                    },
                );
            }
        });
    }

    fn lab_state(&self, host: &str, id: &str) -> Option<String> {
        self.with(|s| {
            s.hosts
                .get(host)
                .and_then(|h| h.labs.get(id))
                .map(|l| l.state.clone())
        })
    }

    fn remove_lab(&self, host: &str, id: &str) {
        self.with(|s| {
            if let Some(h) = s.hosts.get_mut(host) {
                h.labs.remove(id);
            }
        });
    }

    fn expire_tokens(&self) {
        self.with(|s| s.tokens.values_mut().for_each(|v| *v = false));
    }

    fn auth_calls(&self) -> usize {
        self.with(|s| s.auth_calls)
    }

    fn log(&self) -> Vec<(String, String, u16)> {
        self.with(|s| s.log.clone())
    }

    fn template(&self) -> String {
        format!("http://127.0.0.1:{}/{{worker_id}}", self.port)
    }

    async fn stop(self) {
        self.handle.stop(false).await;
    }
}

fn settings(template: &str) -> CmlSettings {
    CmlSettings {
        url_template: template.to_owned(),
        username: USER.into(),
        password: Secret::new(PASSWORD),
        ca_file: None,
        insecure_skip_verify: false,
        allow_http: true,
        request_timeout: Duration::from_secs(5),
        concurrency: 4,
    }
}

fn agent(template: &str) -> CmlAgent {
    CmlAgent::new(settings(template)).unwrap_or_else(|e| panic!("cml agent: {e}"))
}

fn target(worker: &str) -> AgentTarget {
    AgentTarget {
        worker_id: worker.into(),
        instance_id: Some("i-0123456789abcdef0".into()),
        private_ip: Some("127.0.0.1".into()),
    }
}

fn placed(id: &str, state: InstanceState, worker: &str) -> Instance {
    let mut i = Instance::new(id, Resources::default(), false, chrono::Utc::now());
    i.state = state;
    i.worker_id = Some(worker.into());
    i
}

#[actix_web::test]
async fn cml_token_is_reused_and_renewed_once_on_401() {
    let emu = Emulator::start(&["w1"]);
    let cml = agent(&emu.template());
    let w = target("w1");
    emu.put_lab("w1", "lab1", "inst-1", "STARTED", None);

    for _ in 0..3 {
        let labs = cml.labs(&w).await.unwrap_or_else(|e| panic!("labs: {e}"));
        assert_eq!(labs.len(), 1);
    }
    assert_eq!(
        emu.auth_calls(),
        1,
        "a working token is reused: {:?}",
        emu.log()
    );

    emu.expire_tokens();
    let labs = cml
        .labs(&w)
        .await
        .unwrap_or_else(|e| panic!("labs after expiry: {e}"));
    assert_eq!(labs.len(), 1);
    assert_eq!(emu.auth_calls(), 2, "one fresh token after the 401");
    let log = emu.log();
    let refused = log
        .iter()
        .filter(|(_, p, st)| p == "labs" && *st == 401)
        .count();
    assert_eq!(refused, 1, "{log:?}");

    // Credentials no longer accepted: one re-authentication, then a clear error, no loop.
    emu.with(|s| s.password = "rotated".into());
    emu.expire_tokens();
    let before = emu.auth_calls();
    let err = cml.labs(&w).await.expect_err("refused credentials");
    assert!(matches!(err, AgentError::Unauthorized(_)), "{err:?}");
    assert_eq!(emu.auth_calls(), before + 1);
    assert!(!err.to_string().contains(PASSWORD), "{err}");
    emu.stop().await;
}

#[actix_web::test]
async fn cml_tokens_are_cached_per_worker() {
    let emu = Emulator::start(&["w1", "w2"]);
    let cml = agent(&emu.template());
    emu.put_lab("w1", "a1", "i-a", "STARTED", None);
    emu.put_lab("w2", "b1", "i-b", "STOPPED", None);
    let l1 = cml
        .labs(&target("w1"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let l2 = cml
        .labs(&target("w2"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        l1.iter().map(|l| l.title.as_str()).collect::<Vec<_>>(),
        ["i-a"]
    );
    assert_eq!(
        l2.iter().map(|l| l.title.as_str()).collect::<Vec<_>>(),
        ["i-b"]
    );
    let _ = cml
        .labs(&target("w1"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(emu.auth_calls(), 2);
    emu.stop().await;
}

#[actix_web::test]
async fn cml_ready_flag_is_read_without_authenticating() {
    let emu = Emulator::start(&["w1"]);
    let cml = agent(&emu.template());
    let w = target("w1");
    assert_eq!(cml.system_ready(&w).await, Ok(false));
    emu.set_ready("w1", true);
    assert_eq!(cml.system_ready(&w).await, Ok(true));
    assert_eq!(emu.auth_calls(), 0);
    // An unknown host segment is a 404: an error, never "ready".
    let err = cml.system_ready(&target("nope")).await.expect_err("404");
    assert!(matches!(err, AgentError::Protocol(_)), "{err:?}");
    emu.stop().await;
}

#[actix_web::test]
async fn cml_labs_are_listed_mapped_and_follow_their_states() {
    let emu = Emulator::start(&["w1"]);
    let cml = agent(&emu.template());
    let w = target("w1");
    emu.put_lab("w1", "l-title", "inst-a", "STARTED", None);
    emu.put_lab(
        "w1",
        "l-tag",
        "Customer training",
        "STARTED",
        Some(&["owner=x", "resource-plane/instance=inst-b"]),
    );
    emu.put_lab("w1", "l-queued", "inst-c", "QUEUED", Some(&[]));
    emu.put_lab("w1", "l-stray", "hand made", "STARTED", None);

    let labs = cml.labs(&w).await.unwrap_or_else(|e| panic!("labs: {e}"));
    assert_eq!(labs.len(), 4);
    let tagged = labs
        .iter()
        .find(|l| l.id == "l-tag")
        .unwrap_or_else(|| panic!("{labs:?}"));
    assert_eq!(tagged.title, "Customer training");
    assert_eq!(tagged.tags, ["owner=x", "resource-plane/instance=inst-b"]);
    let queued = labs
        .iter()
        .find(|l| l.id == "l-queued")
        .unwrap_or_else(|| panic!("{labs:?}"));
    assert_eq!(queued.state, LabState::Other("QUEUED".into()));

    let mut instances = vec![
        placed("inst-a", InstanceState::Scheduled, "w1"),
        placed("inst-b", InstanceState::Scheduled, "w1"),
        placed("inst-c", InstanceState::Scheduled, "w1"),
    ];
    let plan = plan_sync("w1", &instances, &labs);
    let moved: Vec<(&str, InstanceState)> = plan
        .moves
        .iter()
        .map(|m| (m.instance_id.as_str(), m.to))
        .collect();
    assert_eq!(
        moved,
        [
            ("inst-a", InstanceState::Running),
            ("inst-b", InstanceState::Running)
        ]
    );
    assert_eq!(
        plan.unknown,
        [UnknownLab {
            lab_id: "l-stray".into(),
            title: "hand made".into(),
            started: true
        }]
    );
    // Nothing was stopped by reading: the stray lab still runs.
    assert_eq!(emu.lab_state("w1", "l-stray").as_deref(), Some("STARTED"));

    // The labs move on: one stopped, one deleted -> both instances complete.
    instances[0].state = InstanceState::Running;
    instances[1].state = InstanceState::Running;
    emu.put_lab("w1", "l-title", "inst-a", "STOPPED", None);
    emu.remove_lab("w1", "l-tag");
    let labs = cml.labs(&w).await.unwrap_or_else(|e| panic!("labs: {e}"));
    let plan = plan_sync("w1", &instances, &labs);
    let moved: Vec<(&str, InstanceState)> = plan
        .moves
        .iter()
        .map(|m| (m.instance_id.as_str(), m.to))
        .collect();
    assert_eq!(
        moved,
        [
            ("inst-a", InstanceState::Completed),
            ("inst-b", InstanceState::Completed)
        ]
    );
    emu.stop().await;
}

#[actix_web::test]
async fn cml_stop_lab_state_and_health() {
    let emu = Emulator::start(&["w1"]);
    let cml = agent(&emu.template());
    let w = target("w1");
    emu.put_lab("w1", "lab9", "inst-9", "STARTED", None);
    assert_eq!(cml.lab_state(&w, "lab9").await, Ok(Some(LabState::Started)));
    assert_eq!(cml.stop_lab(&w, "lab9").await, Ok(()));
    assert_eq!(emu.lab_state("w1", "lab9").as_deref(), Some("STOPPED"));
    assert_eq!(cml.lab_state(&w, "lab9").await, Ok(Some(LabState::Stopped)));
    assert_eq!(cml.lab_state(&w, "gone").await, Ok(None));
    assert_eq!(
        cml.stop_lab(&w, "gone").await,
        Ok(()),
        "stopping a gone lab is done"
    );
    let err = cml
        .stop_lab(&w, "../system_health")
        .await
        .expect_err("bad id");
    assert!(matches!(err, AgentError::Protocol(_)), "{err:?}");
    let health = cml
        .system_health(&w)
        .await
        .unwrap_or_else(|e| panic!("health: {e}"));
    assert_eq!(health["valid"], json!(true));
    assert!(emu
        .log()
        .iter()
        .any(|(m, p, st)| m == "PUT" && p == "labs/lab9/stop" && *st == 204));
    emu.stop().await;
}

#[actix_web::test]
async fn cml_reads_stay_within_the_concurrency_bound() {
    let emu = Emulator::start(&["w1"]);
    let mut s = settings(&emu.template());
    s.concurrency = 2;
    let cml = CmlAgent::new(s).unwrap_or_else(|e| panic!("{e}"));
    for n in 0..12 {
        emu.put_lab(
            "w1",
            &format!("lab{n:02}"),
            &format!("i-{n}"),
            "STARTED",
            None,
        );
    }
    emu.with(|s| s.slow_labs = true);
    let labs = cml
        .labs(&target("w1"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(labs.len(), 12);
    let max = emu.with(|s| s.max_in_flight);
    assert!(
        (1..=2).contains(&max),
        "at most 2 requests at once, saw {max}"
    );
    emu.stop().await;
}

#[actix_web::test]
async fn cml_unreachable_host_is_an_error() {
    let port = free_port();
    let cml = agent(&format!("http://127.0.0.1:{port}/{{worker_id}}"));
    let w = target("w1");
    let err = cml.system_ready(&w).await.expect_err("nothing listens");
    assert!(matches!(err, AgentError::Unreachable(_)), "{err:?}");
    let err = cml.labs(&w).await.expect_err("nothing listens");
    assert!(matches!(err, AgentError::Unreachable(_)), "{err:?}");
}

#[actix_web::test]
async fn cml_http_is_refused_without_allow_http() {
    let emu = Emulator::start(&["w1"]);
    let mut s = settings(&emu.template());
    s.allow_http = false;
    let cml = CmlAgent::new(s).unwrap_or_else(|e| panic!("{e}"));
    let err = cml.labs(&target("w1")).await.expect_err("http refused");
    assert!(
        matches!(err, AgentError::Address(ref m) if m.contains("CML_ALLOW_HTTP")),
        "{err:?}"
    );
    let err = cml
        .system_ready(&target("w1"))
        .await
        .expect_err("http refused");
    assert!(matches!(err, AgentError::Address(_)), "{err:?}");
    // A worker without a private IP cannot be addressed by the default template.
    let default = CmlAgent::new(CmlSettings {
        url_template: "https://{private_ip}".into(),
        ..settings("")
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let mut no_ip = target("w1");
    no_ip.private_ip = None;
    assert!(matches!(
        default.labs(&no_ip).await,
        Err(AgentError::Address(_))
    ));
    assert!(emu.log().is_empty(), "no request left: {:?}", emu.log());
    emu.stop().await;
}

#[actix_web::test]
async fn cml_ca_file_must_hold_certificates() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("ca.pem");
    std::fs::write(&path, "not a certificate").unwrap_or_else(|e| panic!("{e}"));
    let mut s = settings("https://{private_ip}");
    s.ca_file = Some(path);
    let err = CmlAgent::new(s).expect_err("no certificate");
    assert!(err.starts_with("CML_CA_FILE:"), "{err}");
    let mut s = settings("https://{private_ip}");
    s.ca_file = Some(dir.path().join("missing.pem"));
    let err = CmlAgent::new(s).expect_err("missing file");
    assert!(err.starts_with("CML_CA_FILE:"), "{err}");
}

/// A `MakeWriter` into a shared buffer, so the test can read everything that was logged.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[actix_web::test]
async fn cml_password_and_tokens_never_reach_debug_or_logs() {
    let captured = Captured::default();
    let sink = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || sink.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let emu = Emulator::start(&["w1"]);
    let cml = agent(&emu.template());
    let w = target("w1");
    emu.put_lab("w1", "lab1", "inst-1", "STARTED", None);
    let _ = cml.labs(&w).await.unwrap_or_else(|e| panic!("{e}"));
    emu.expire_tokens();
    let _ = cml.labs(&w).await.unwrap_or_else(|e| panic!("{e}"));
    emu.with(|s| s.password = "rotated".into());
    emu.expire_tokens();
    let err = cml.labs(&w).await.expect_err("refused");

    let dbg = format!("{cml:?} {:?} {err:?} {err}", settings("x"));
    assert!(!dbg.contains(PASSWORD), "{dbg}");
    assert!(!dbg.contains("tok-"), "{dbg}");
    let logged =
        String::from_utf8_lossy(&captured.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
    assert!(
        logged.contains("authenticating again"),
        "the re-auth is logged: {logged}"
    );
    assert!(!logged.contains(PASSWORD), "{logged}");
    assert!(
        !logged.contains("tok-1") && !logged.contains("tok-2"),
        "{logged}"
    );
    emu.stop().await;
}

fn add_host(emu: &Emulator, host: &str, ready: bool) {
    emu.with(|s| {
        s.hosts.entry(host.to_owned()).or_default().ready = ready;
    });
}

async fn until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while !f() {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    true
}

/// Submits an instance of 1 CPU and 2 GB; its id.
async fn submit_small_instance(app: &impl super::support::TestApp) -> String {
    super::support::id_of(&super::support::submit_instance(app, 1.0, 2.0, false).await)
}

/// The controller test configuration with `WORKER_AGENT=cml` against `emu`, synced
/// every 100 ms.
fn cml_service_config(emu: &Emulator, dir: &tempfile::TempDir) -> resource_plane::config::Config {
    let mut cfg = super::controller::controller_config(dir, super::controller::TEMPLATES);
    cfg.agent.kind = resource_plane::config::WorkerAgentKind::Cml;
    cfg.agent.cml = settings(&emu.template());
    cfg.agent.sync_interval = Duration::from_millis(100);
    cfg
}

/// The embedded service with `WORKER_AGENT=cml` against the emulator: a lab started on
/// the worker's CML makes its instance RUNNING, a stopped or deleted lab COMPLETES it, a
/// stray lab is reported and left alone, every successful read records a heartbeat, and
/// an unreachable CML records none.
#[actix_web::test]
async fn cml_sync_drives_instances_end_to_end() {
    use resource_plane::adapters::memory::MemoryStore;
    use resource_plane::adapters::sim_cloud::SimCloud;
    use resource_plane::app::Service;
    use resource_plane::ports::store::Store;

    let emu = Emulator::start(&[]);
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let cfg = cml_service_config(&emu, &dir);
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let cloud = Arc::new(SimCloud::new(Duration::from_millis(50)));
    let svc = Service::start_with(cfg, store, cloud).unwrap_or_else(|e| panic!("{e}"));
    assert!(svc.wait_hydrated(Duration::from_secs(10)).await);
    let ctl = svc.state.controller.clone();
    assert!(until(Duration::from_secs(5), || ctl.leader_status().is_leader).await);

    let app = actix_web::test::init_service(resource_plane::api::app(svc.state.clone())).await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        ids.push(submit_small_instance(&app).await);
    }
    let state = |id: &str| ctl.instances.get(id).map(|(i, _)| i.state);
    let worker_of = |id: &str| ctl.instances.get(id).and_then(|(i, _)| i.worker_id);
    let worker_state = |id: &str| ctl.workers.get(id).map(|w| w.state);

    // The cloud launches a worker and reports it running, but its CML does not answer
    // yet: the worker stays PROVISIONING and nothing is placed on it.
    assert!(
        until(Duration::from_secs(15), || ctl
            .workers
            .list()
            .iter()
            .any(|w| w.cloud_instance_id.is_some()))
        .await,
        "no worker was launched: {:?}",
        ctl.workers.list()
    );
    let wid = ctl
        .workers
        .list()
        .into_iter()
        .find(|w| w.cloud_instance_id.is_some())
        .map(|w| w.id)
        .unwrap_or_default();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(worker_state(&wid), Some(WorkerState::Provisioning));
    assert_eq!(state(&ids[0]), Some(InstanceState::Pending));

    // CML answers but is not ready: still PROVISIONING.
    add_host(&emu, &wid, false);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(worker_state(&wid), Some(WorkerState::Provisioning));
    assert_eq!(state(&ids[1]), Some(InstanceState::Pending));

    // Ready: the worker runs and both instances are placed on it, still SCHEDULED
    // (no lab started yet).
    add_host(&emu, &wid, true);
    assert!(
        until(Duration::from_secs(15), || ids
            .iter()
            .all(|i| state(i) == Some(InstanceState::Scheduled)))
        .await,
        "instances were not placed: {:?}",
        ctl.workers.list()
    );
    assert_eq!(worker_state(&wid), Some(WorkerState::Running));
    assert_eq!(worker_of(&ids[0]).as_deref(), Some(wid.as_str()));
    assert_eq!(worker_of(&ids[1]).as_deref(), Some(wid.as_str()));
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(state(&ids[0]), Some(InstanceState::Scheduled));

    // One lab by title, one by tag, one stray.
    emu.put_lab(&wid, "lab-a", &ids[0], "STARTED", None);
    let tag = format!("resource-plane/instance={}", ids[1]);
    emu.put_lab(
        &wid,
        "lab-b",
        "Customer lab",
        "STARTED",
        Some(&[tag.as_str()]),
    );
    emu.put_lab(&wid, "lab-x", "hand made", "STARTED", None);
    assert!(
        until(Duration::from_secs(10), || ids
            .iter()
            .all(|i| state(i) == Some(InstanceState::Running)))
        .await,
        "labs started but instances did not run: {:?}",
        ids.iter().map(|i| state(i)).collect::<Vec<_>>()
    );
    assert!(ctl
        .workers
        .get(&wid)
        .is_some_and(|w| w.last_heartbeat_at.is_some()));

    // One lab stopped, one deleted: both instances complete and leave the worker.
    emu.put_lab(&wid, "lab-a", &ids[0], "STOPPED", None);
    emu.remove_lab(&wid, "lab-b");
    assert!(
        until(Duration::from_secs(10), || ids
            .iter()
            .all(|i| state(i) == Some(InstanceState::Completed)))
        .await,
        "labs ended but instances did not complete"
    );
    assert!(
        until(Duration::from_secs(5), || ctl
            .workers
            .get(&wid)
            .is_some_and(|w| w.instances.is_empty()))
        .await
    );
    // The stray lab was reported, never stopped.
    assert_eq!(emu.lab_state(&wid, "lab-x").as_deref(), Some("STARTED"));
    assert!(!emu
        .log()
        .iter()
        .any(|(m, p, _)| m == "PUT" && p.ends_with("/stop")));

    // CML goes away: the heartbeat stops moving.
    emu.with(|s| {
        s.hosts.remove(&wid);
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let hb = ctl.workers.get(&wid).and_then(|w| w.last_heartbeat_at);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(ctl.workers.get(&wid).and_then(|w| w.last_heartbeat_at), hb);
    svc.shutdown().await;
    emu.stop().await;
}

/// With `CML_STOP_UNKNOWN_LABS=true`, a new leader whose instance view is still loading
/// must not take the labs of running instances for unknown ones: it syncs with CML only
/// once it holds the whole fleet.
#[actix_web::test]
async fn a_new_leader_stops_no_lab_before_it_knows_every_instance() {
    use resource_plane::adapters::memory::MemoryStore;
    use resource_plane::adapters::sim_cloud::SimCloud;
    use resource_plane::app::Service;
    use resource_plane::ports::store::Store;

    let emu = Emulator::start(&[]);
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut cfg = cml_service_config(&emu, &dir);
    cfg.agent.stop_unknown_labs = true;
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let cloud = Arc::new(SimCloud::new(Duration::from_millis(50)));
    let first = Service::start_with(cfg.clone(), store.clone(), cloud.clone())
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(first.wait_hydrated(Duration::from_secs(10)).await);
    let ctl = first.state.controller.clone();
    assert!(until(Duration::from_secs(5), || ctl.leader_status().is_leader).await);
    let app = actix_web::test::init_service(resource_plane::api::app(first.state.clone())).await;
    let id = submit_small_instance(&app).await;
    assert!(
        until(Duration::from_secs(15), || !ctl.workers.list().is_empty()).await,
        "no worker was launched"
    );
    let wid = ctl.workers.list()[0].id.clone();
    add_host(&emu, &wid, true);
    emu.put_lab(&wid, "lab-a", &id, "STARTED", None);
    assert!(
        until(Duration::from_secs(15), || ctl
            .instances
            .get(&id)
            .is_some_and(|(i, _)| i.state == InstanceState::Running))
        .await,
        "the instance did not run: {:?}",
        ctl.instances.get(&id)
    );
    first.shutdown().await;

    // The successor leads at once, sees the worker at once, and reads the instances
    // for 2 s: a sync meanwhile would find lab-a on no instance it knows.
    let slow = super::support::Hooked::new(
        store.clone(),
        super::support::SlowListing::new(
            resource_plane::keys::INSTANCE_PREFIX,
            Duration::from_secs(2),
        ),
    );
    let second = Service::start_with(cfg, slow, cloud).unwrap_or_else(|e| panic!("{e}"));
    let ctl = second.state.controller.clone();
    assert!(until(Duration::from_secs(5), || ctl.leader_status().is_leader).await);
    assert!(second.wait_hydrated(Duration::from_secs(10)).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stops: Vec<_> = emu
        .log()
        .into_iter()
        .filter(|(m, p, _)| m == "PUT" && p.ends_with("/stop"))
        .collect();
    assert!(stops.is_empty(), "a known lab was stopped: {stops:?}");
    assert_eq!(emu.lab_state(&wid, "lab-a").as_deref(), Some("STARTED"));
    assert_eq!(
        ctl.instances.get(&id).map(|(i, _)| i.state),
        Some(InstanceState::Running)
    );
    second.shutdown().await;
    emu.stop().await;
}

/// The cloud port reports the private IP the default `CML_URL_TEMPLATE`
/// (`https://{private_ip}`) needs: EC2 against moto, and the simulated cloud (loopback).
#[tokio::test]
async fn cloud_reports_the_private_ip_cml_is_reached_at() {
    use resource_plane::adapters::sim_cloud::SimCloud;
    use resource_plane::domain::worker::WorkerTemplate;
    use resource_plane::ports::cloud::CloudProvider;

    let tpl = WorkerTemplate {
        name: "metal".into(),
        instance_type: Some("m5zn.metal".into()),
        image_id: Some(super::moto::AMI.into()),
        capacity: Resources {
            cpu: 48.0,
            memory_gb: 192.0,
        },
        min_workers: 0,
        max_workers: 4,
        hourly_cost: 3.96,
        ..WorkerTemplate::default()
    };
    let moto = super::moto::Moto::start();
    let cluster = format!("cml-{}", uuid::Uuid::new_v4().simple());
    let ec2 = moto.cloud(&cluster).await;
    let id = ec2
        .create_instance(&tpl, "w-ip")
        .await
        .unwrap_or_else(|e| panic!("launch: {e}"))
        .instance_id;
    let ip = ec2
        .instance_private_ip(&id)
        .await
        .unwrap_or_else(|e| panic!("private ip: {e}"))
        .unwrap_or_else(|| panic!("moto assigned no private ip"));
    assert!(
        ip.parse::<std::net::Ipv4Addr>()
            .is_ok_and(|a| a.is_private()),
        "{ip}"
    );
    assert_eq!(
        ec2.instance_private_ip("i-00000000000000000").await,
        Ok(None)
    );

    let sim = SimCloud::new(Duration::ZERO);
    let sid = sim
        .create_instance(&tpl, "w-sim")
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .instance_id;
    assert_eq!(
        sim.instance_private_ip(&sid).await,
        Ok(Some("127.0.0.1".to_owned()))
    );
    assert_eq!(sim.instance_private_ip("i-none").await, Ok(None));
}
