//! The web console (`/ui`) in a real browser: headless Chromium (Debian `chromium`)
//! driven over WebDriver (`chromedriver`, started by each test on a free loopback port)
//! through `fantoccini`, against the service in its embedded mode (memory store,
//! simulated cloud and cluster) behind a real HTTP server on loopback.
//!
//! What is checked: every page loads with no console error (the browser's own log:
//! `console.error` calls and uncaught exceptions); a PROCURE made through the API shows in
//! the shadow table within a second, without a reload; a drain clicked in the console
//! (its confirmation accepted) changes the worker's state, and a dismissed confirmation
//! changes nothing; with `API_AUTH_TOKEN` set the page asks for the token, then shows
//! data, and the token is in no URL; the static files are public while every `/api/`
//! call needs the token; phone width does not overflow.
//!
//! With `UI_SCREENSHOTS_DIR` set (e.g. `UI_SCREENSHOTS_DIR=docs`), the same runs write
//! `ui-<page>.png` for each page and `loadtest-report.png` (1280x800) there.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::dev::ServerHandle;
use actix_web::http::header;
use actix_web::test;
use clap::Parser;
use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder, Locator};
use resource_plane::adapters::memory::MemoryStore;
use resource_plane::adapters::sim_cloud::SimCloud;
use resource_plane::api;
use resource_plane::api::ui::{ASSETS, CONTENT_SECURITY_POLICY};
use resource_plane::app::Service;
use resource_plane::config::Secret;
use resource_plane::loadtest::{self, LoadtestArgs};
use serde_json::{json, Value};

use crate::controller::{controller_config, TEMPLATES};
use crate::support::{self, get, send};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const WIDTH: u32 = 1280;
const HEIGHT: u32 = 800;

/// Every page of the console: its hash and its heading.
const PAGES: [(&str, &str); 7] = [
    ("overview", "Overview"),
    ("shadow", "Shadow deployables"),
    ("workers", "Workers"),
    ("instances", "Instances"),
    ("operations", "Operations"),
    ("decisions", "Decisions"),
    ("actors", "Actors"),
];

// ---------------------------------------------------------------------------------
// The service.

/// The embedded-mode service on a free loopback port.
struct Console {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
    handle: ServerHandle,
    svc: Service,
    _dir: tempfile::TempDir,
}

impl Console {
    async fn start(token: Option<&str>) -> Self {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let mut cfg = controller_config(&dir, TEMPLATES);
        // Workers stay until drained; a drain waits for the worker's instances.
        cfg.controller.scale_down_idle = Duration::from_secs(3600);
        cfg.controller.drain_deadline = None;
        cfg.operations.callback_allow_insecure_localhost = true;
        cfg.operations.sim_kube_ready_delay = Duration::from_millis(100);
        cfg.api_token = token.map(Secret::new);
        let cloud = Arc::new(SimCloud::new(Duration::from_millis(200)));
        let svc = Service::start_with(cfg, Arc::new(MemoryStore::new()), cloud)
            .unwrap_or_else(|e| panic!("service did not start: {e}"));
        assert!(
            svc.wait_hydrated(Duration::from_secs(15)).await,
            "not hydrated"
        );
        let (base, handle) = support::serve_api(svc.state.clone());
        Self {
            base,
            token: token.map(str::to_owned),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap_or_else(|e| panic!("http client: {e}")),
            handle,
            svc,
            _dir: dir,
        }
    }

    /// Calls the API (with the token, when there is one): status and JSON body.
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let res = req.send().await.unwrap_or_else(|e| panic!("{path}: {e}"));
        let status = res.status().as_u16();
        let bytes = res.bytes().await.unwrap_or_default();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn register(&self, env: &str, name: &str, pool: &str) {
        let (status, body) = self
            .call(
                reqwest::Method::PUT,
                &format!("/api/1.0/{env}/shadow-deployables/{name}"),
                Some(json!({"node_pool": pool, "dns": format!("{name}.{env}.example")})),
            )
            .await;
        assert_eq!(status, 201, "register {name}: {body}");
    }

    async fn procure(&self, env: &str, name: &str, run: &str) {
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                &format!("/api/1.0/{env}/shadow-deployables"),
                Some(json!({"action": "PROCURE", "name": name, "workflow_run_id": run, "workflow_plan": "pre-scaleup-load-test"})),
            )
            .await;
        assert_eq!(
            (status, body["status"].as_str()),
            (200, Some("PROCURED")),
            "{body}"
        );
    }

    async fn submit(&self, cpu: f64, memory_gb: f64) -> String {
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                "/api/1.0/instances",
                Some(json!({"requirements": {"cpu": cpu, "memory_gb": memory_gb}})),
            )
            .await;
        assert_eq!(status, 202, "{body}");
        body["id"].as_str().unwrap_or_default().to_owned()
    }

    /// Triggers job `name` of run `run` in `int`, its callback sent to a path of this
    /// very server that answers 404 (so the intent records failed attempts): its
    /// request id.
    async fn job(&self, name: &str, run: &str) -> String {
        let (status, op) = self
            .call(
                reqwest::Method::POST,
                "/api/1.0/int/jobs",
                Some(
                    json!({"job_name": name, "container": {"image": "registry.local/warmup:1"},
                    "payload": {"rps": 100}, "workflow_run_id": run,
                    "callback": {"url": format!("{}/callback-sink", self.base), "method": "POST"}}),
                ),
            )
            .await;
        assert_eq!(status, 202, "{op}");
        op["request_id"].as_str().unwrap_or_default().to_owned()
    }

    /// Submits an instance that fits the small template and waits until the worker it
    /// is placed on runs: that worker's id.
    async fn running_worker(&self) -> String {
        let instance = self.submit(2.0, 8.0).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, i) = self
                .call(
                    reqwest::Method::GET,
                    &format!("/api/1.0/instances/{instance}"),
                    None,
                )
                .await;
            if let Some(w) = i["worker_id"].as_str() {
                if self.worker_state(w).await == "RUNNING" {
                    return w.to_owned();
                }
            }
            assert!(
                Instant::now() < deadline,
                "no running worker for {instance}: {i}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn worker_state(&self, id: &str) -> String {
        let (_, w) = self
            .call(
                reqwest::Method::GET,
                &format!("/api/1.0/workers/{id}"),
                None,
            )
            .await;
        w["state"].as_str().unwrap_or_default().to_owned()
    }

    async fn stop(self) {
        self.handle.stop(false).await;
        self.svc.shutdown().await;
    }
}

// ---------------------------------------------------------------------------------
// The browser.

/// chromedriver and a session (its browser).
struct Browser {
    /// Held for its `Drop`: ends chromedriver.
    _driver: Driver,
    client: Client,
}

/// The chromedriver process and its session. Dropped (also when a test panics), it ends
/// the session, so chromedriver quits the browser, then kills chromedriver (by its pid).
struct Driver {
    child: Child,
    port: u16,
    session: Option<String>,
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(id) = self.session.take() {
            // A plain blocking `DELETE /session/{id}` (no runtime here), bounded in time.
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                let _ = write!(
                    s,
                    "DELETE /session/{id} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                );
                let _ = s.read(&mut [0u8; 512]);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// chromedriver's `POST /session/{id}/se/log {"type":"browser"}`: the browser log
/// entries since the last call (console messages, uncaught exceptions, network errors).
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/se/log",
            session_id.unwrap_or_default()
        ))
    }

    fn method_and_body(&self, _request_url: &url::Url) -> (http::Method, Option<String>) {
        (http::Method::POST, Some(r#"{"type":"browser"}"#.to_owned()))
    }
}

/// Fails the test when the page logged a console error.
async fn assert_no_console_errors(b: &Browser) {
    let errors = b.console_errors().await;
    assert!(errors.is_empty(), "console errors: {errors:#?}");
}

/// Ends a browser test: no console error, then the browser and the service closed.
async fn finish(b: Browser, c: Console) {
    assert_no_console_errors(&b).await;
    b.close().await;
    c.stop().await;
}

impl Browser {
    async fn start() -> Self {
        for (bin, package) in [(CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")] {
            assert!(
                Path::new(bin).is_file(),
                "{bin} is missing: install it with `apt-get install {package}` (or run `make setup`, which does)"
            );
        }
        let port = support::free_port();
        let mut driver = Driver {
            child: Command::new(CHROMEDRIVER)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {CHROMEDRIVER}: {e}")),
            port,
            session: None,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "chromedriver did not listen in 20 s"
            );
            std::thread::sleep(Duration::from_millis(25));
        }
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-dev-shm-usage",
                    "--disable-gpu",
                    "--no-first-run",
                    "--disable-extensions",
                    format!("--window-size={WIDTH},{HEIGHT}"),
                ],
            }),
        );
        caps.insert("goog:loggingPrefs".into(), json!({"browser": "ALL"}));
        let mut last = String::new();
        // A loaded machine can be slow to start the first browser: a few tries.
        for _ in 0..3 {
            match ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                .capabilities(caps.clone())
                .connect(&format!("http://127.0.0.1:{port}"))
                .await
            {
                Ok(client) => {
                    driver.session = client.session_id().await.ok().flatten();
                    let b = Self {
                        _driver: driver,
                        client,
                    };
                    b.viewport(WIDTH, HEIGHT).await;
                    return b;
                }
                Err(e) => last = e.to_string(),
            }
        }
        drop(driver);
        panic!("no WebDriver session with headless chromium: {last}");
    }

    /// Sizes the window so the page itself (what a screenshot shows) is `w` x `h`.
    async fn viewport(&self, w: u32, h: u32) {
        let chrome = self
            .js("return [window.outerWidth - window.innerWidth, window.outerHeight - window.innerHeight];")
            .await;
        let extra = |i: usize| u32::try_from(chrome[i].as_u64().unwrap_or(0)).unwrap_or(0);
        self.client
            .set_window_size(w + extra(0), h + extra(1))
            .await
            .unwrap_or_else(|e| panic!("window size: {e}"));
    }

    async fn goto(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("goto {url}: {e}"));
    }

    async fn js(&self, script: &str) -> Value {
        self.client
            .execute(script, vec![])
            .await
            .unwrap_or_else(|e| panic!("script {script}: {e}"))
    }

    /// Evaluates `expr` until it is truthy or `timeout` passes; its last value.
    async fn until(&self, timeout: Duration, expr: &str) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.js(&format!("return ({expr});")).await;
            let truthy = !(v.is_null() || v == json!(false) || v == json!("") || v == json!(0));
            if truthy {
                return Some(v);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The console errors logged since the last call: `console.error` and uncaught
    /// exceptions (network entries, such as the 401 that opens the token form or the
    /// 404 of an absent event stream, are the server's answers, not page errors).
    async fn console_errors(&self) -> Vec<String> {
        let log = self
            .client
            .issue_cmd(BrowserLog)
            .await
            .unwrap_or_else(|e| panic!("browser log: {e}"));
        log.as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["level"] == "SEVERE" && e["source"] != "network")
            .map(Value::to_string)
            .collect()
    }

    async fn screenshot(&self, name: &str) {
        let Some(dir) = std::env::var_os("UI_SCREENSHOTS_DIR") else {
            return;
        };
        let png = self
            .client
            .screenshot()
            .await
            .unwrap_or_else(|e| panic!("screenshot: {e}"));
        let path = PathBuf::from(dir).join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }

    /// Ends the session (chromedriver quits the browser), then chromedriver.
    async fn close(self) {
        let Self {
            _driver: mut driver,
            client,
        } = self;
        let closed = tokio::time::timeout(Duration::from_secs(20), client.close()).await;
        assert!(
            matches!(closed, Ok(Ok(()))),
            "the browser session did not end: {closed:?}"
        );
        driver.session = None;
        drop(driver);
    }

    /// Clicks `css`, finding it again when a redraw replaced it in between.
    async fn click(&self, css: &str) {
        let mut last = String::new();
        for _ in 0..10 {
            let found = self.client.find(Locator::Css(css)).await;
            match found {
                Ok(el) => match el.click().await {
                    Ok(()) => return,
                    Err(e) => last = e.to_string(),
                },
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("click {css}: {last}");
    }

    async fn type_into(&self, css: &str, text: &str) {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"))
            .send_keys(text)
            .await
            .unwrap_or_else(|e| panic!("type into {css}: {e}"));
    }
}

/// Opens `page` and waits until its heading shows and its data has loaded.
async fn open(b: &Browser, base: &str, page: &str, heading: &str) {
    b.goto(&format!("{base}/ui/#{page}")).await;
    let loaded = format!(
        "document.querySelector('#page h1') && document.querySelector('#page h1').textContent === {heading:?} \
         && !document.querySelector('#page-error') \
         && document.querySelectorAll('#page table, #page .card, #page .empty').length > 0"
    );
    let ok = b.until(Duration::from_secs(10), &loaded).await;
    let text = b.js("return document.body.innerText;").await;
    assert!(ok.is_some(), "page {page} did not load: {text}");
}

// ---------------------------------------------------------------------------------
// Tests.

#[actix_web::test]
async fn every_page_loads_without_console_errors_and_is_accessible_at_laptop_and_phone_width() {
    let c = Console::start(None).await;
    for (name, pool) in [
        ("int-predator-g2-std-16", "g2-std-16"),
        ("int-predator-g2-std-32", "g2-std-32"),
        ("int-triton-a100-1", "a100-1"),
    ] {
        c.register("int", name, pool).await;
    }
    c.register("prod", "prod-predator-g2-std-16", "g2-std-16")
        .await;
    c.procure("int", "int-predator-g2-std-16", "er5tdgsh").await;
    let worker = c.running_worker().await;
    // More than any template holds: waits in the pending queue with its reason.
    let waiting = c.submit(64.0, 512.0).await;
    // An operation whose callback is refused (404 from this very server): attempts.
    let request_id = c.job("warmup", "er5tdgsh").await;

    let b = Browser::start().await;
    for (page, heading) in PAGES {
        open(&b, &c.base, page, heading).await;
        // What each page is for is on it.
        let text = b
            .js("return document.querySelector('#page').innerText;")
            .await;
        let text = text.as_str().unwrap_or_default();
        let expect: &[&str] = match page {
            "overview" => &[
                "reachable",
                "Leader",
                "Last reconcile",
                "PROCURED",
                "RUNNING",
            ],
            "shadow" => &["int-predator-g2-std-16", "er5tdgsh", "PROCURED", "FREE"],
            "workers" => &[worker.as_str(), "RUNNING", "Drain"],
            "instances" => &[waiting.as_str(), "no worker template fits it", "SCHEDULED"],
            "decisions" => &["scale_up"],
            "actors" => &["shadow-deployable/", "worker/"],
            _ => &[],
        };
        for want in expect {
            assert!(text.contains(want), "{page}: no {want:?} in {text}");
        }
        for wrong in ["[object", "undefined", "NaN"] {
            assert!(!text.contains(wrong), "{page}: {wrong:?} shown in {text}");
        }
        if page == "operations" {
            // Look the operation up by its request id.
            b.type_into("#o-rid", &request_id).await;
            b.click("#page form button[type=submit]").await;
            let shown = b
                .until(
                    Duration::from_secs(10),
                    &format!(
                        "document.querySelector('#page').innerText.includes({request_id:?}) \
                         && document.querySelector('#page').innerText.includes('404')"
                    ),
                )
                .await;
            let text = b.js("return document.body.innerText;").await;
            assert!(
                shown.is_some(),
                "operation with its attempts not shown: {text}"
            );
        }
        // Accessible markup: headed tables, labelled controls, a named navigation.
        let a11y = b
            .js("const bad = [];
                 for (const t of document.querySelectorAll('table')) {
                   if (!t.querySelector('caption')) bad.push('table without caption');
                   for (const th of t.querySelectorAll('th')) if (!th.getAttribute('scope')) bad.push('th without scope');
                 }
                 for (const el of document.querySelectorAll('input, select, button')) {
                   const named = (el.labels && el.labels.length) || el.getAttribute('aria-label') || el.textContent.trim();
                   if (!named && !el.hidden && el.offsetParent) bad.push('unlabelled ' + el.outerHTML);
                 }
                 if (!document.querySelector('nav[aria-label] a[aria-current=page]')) bad.push('no current page in nav');
                 if (!document.querySelector('main')) bad.push('no main landmark');
                 return bad;")
            .await;
        assert_eq!(a11y, json!([]), "{page}");
        b.screenshot(&format!("ui-{page}")).await;
    }
    assert_no_console_errors(&b).await;

    // Phone width: nothing wider than the screen (wide tables scroll in their own box).
    b.client
        .set_window_size(390, 844)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for (page, heading) in PAGES {
        open(&b, &c.base, page, heading).await;
        let fits = b
            .js("return [document.documentElement.scrollWidth, window.innerWidth];")
            .await;
        let (scroll, inner) = (fits[0].as_f64(), fits[1].as_f64());
        assert!(
            scroll
                .zip(inner)
                .is_some_and(|(s, i)| s <= i + 1.0 && i <= 400.0),
            "{page} overflows a phone screen: {fits}"
        );
    }
    finish(b, c).await;
}

#[actix_web::test]
async fn a_procure_through_the_api_shows_in_the_table_within_a_second_without_a_reload() {
    let c = Console::start(None).await;
    c.register("int", "ui-live-1", "g2-std-16").await;
    c.register("int", "ui-live-2", "g2-std-16").await;
    let b = Browser::start().await;
    open(&b, &c.base, "shadow", "Shadow deployables").await;
    let cell = "(document.querySelector('th[data-name=\"ui-live-2\"]') \
                && document.querySelector('th[data-name=\"ui-live-2\"]').parentElement.querySelector('[data-field=state]').textContent)";
    assert_eq!(
        b.until(Duration::from_secs(5), cell).await,
        Some(json!("FREE"))
    );
    // Marks this document: a reload would lose the mark.
    b.js("window.__sameDocument = 'kept'; return null;").await;
    c.procure("int", "ui-live-2", "run-live").await;
    let answered = Instant::now();
    let seen = b
        .until(Duration::from_secs(3), &format!("{cell} === 'PROCURED'"))
        .await;
    let took = answered.elapsed();
    assert!(seen.is_some(), "the PROCURE never showed");
    eprintln!("ui: the PROCURE showed in the table {took:?} after the API answered");
    assert!(
        took <= Duration::from_secs(1),
        "the PROCURE showed after {took:?}, not within a second"
    );
    assert_eq!(
        b.js("return window.__sameDocument || null;").await,
        json!("kept"),
        "the page reloaded"
    );
    let row = b
        .js("return document.querySelector('th[data-name=\"ui-live-2\"]').parentElement.innerText;")
        .await;
    assert!(
        row.as_str().is_some_and(|r| r.contains("run-live")),
        "owner not shown: {row}"
    );
    finish(b, c).await;
}

#[actix_web::test]
async fn an_operation_submitted_through_the_api_shows_on_the_operations_page_without_a_look_up() {
    let c = Console::start(None).await;
    let first = c.job("ui-op-first", "run-first").await;
    let b = Browser::start().await;
    open(&b, &c.base, "operations", "Operations").await;
    let card = |id: &str| format!("document.querySelector('#page section[data-op={id:?}]')");
    assert!(
        b.until(Duration::from_secs(5), &card(&first))
            .await
            .is_some(),
        "an operation stored before the page opened is not listed"
    );
    // Marks this document: a reload would lose the mark.
    b.js("window.__sameDocument = 'kept'; return null;").await;
    let id = c.job("ui-op-live", "run-live").await;
    // It appears with its condition, status and workflow, then its callback attempt
    // (the sink answers 404), with nobody looking it up.
    let text = format!("({} || {{}}).innerText", card(&id));
    let shown = b
        .until(
            Duration::from_secs(10),
            &format!(
                "{text} && ['JobComplete', 'SUCCEEDED', 'run-live', '404'].every((w) => {text}.includes(w))"
            ),
        )
        .await;
    let page = b
        .js("return document.querySelector('#page').innerText;")
        .await;
    assert!(shown.is_some(), "{id} not shown with its attempts: {page}");
    assert_eq!(
        b.js("return [window.__sameDocument || null, document.querySelector('#o-rid').value];")
            .await,
        json!(["kept", ""]),
        "reloaded, or looked up"
    );

    // A page holds 25; More shows the rest.
    for i in 0..25 {
        c.job(&format!("ui-op-{i:02}"), "run-many").await;
    }
    let listed = "document.querySelectorAll('#page section[data-op]').length";
    let more = "!document.querySelector('#o-more').hidden";
    let paged = b
        .until(
            Duration::from_secs(10),
            &format!("{listed} === 25 && {more}"),
        )
        .await;
    assert!(
        paged.is_some(),
        "not one page of 25 with More: {}",
        b.js(&format!("return [{listed}, {more}];")).await
    );
    b.click("#o-more").await;
    let all = b
        .until(
            Duration::from_secs(10),
            &format!("{listed} === 27 && !({more})"),
        )
        .await;
    assert!(
        all.is_some(),
        "More did not show the rest: {}",
        b.js(&format!("return [{listed}, {more}];")).await
    );
    // Filtered by status: every job succeeds, none is still SUBMITTING.
    let pick = |status: &str| {
        format!("const s = document.querySelector('#o-status'); s.value = {status:?}; s.dispatchEvent(new Event('change')); return null;")
    };
    b.js(&pick("SUCCEEDED")).await;
    let succeeded = b
        .until(
            Duration::from_secs(10),
            &format!("{listed} === 25 && {more} && [...document.querySelectorAll('#page section[data-op] h2 .state')].every((e) => e.textContent === 'SUCCEEDED')"),
        )
        .await;
    assert!(succeeded.is_some(), "SUCCEEDED not listed alone");
    b.js(&pick("SUBMITTING")).await;
    let none = b
        .until(
            Duration::from_secs(10),
            &format!("{listed} === 0 && document.querySelector('#page').innerText.includes('No operations in int with status SUBMITTING')"),
        )
        .await;
    assert!(none.is_some(), "the status filter is not applied");
    finish(b, c).await;
}

#[actix_web::test]
async fn a_drain_clicked_in_the_console_changes_the_worker_state_only_when_confirmed() {
    let c = Console::start(None).await;
    let worker = c.running_worker().await;
    let b = Browser::start().await;
    open(&b, &c.base, "workers", "Workers").await;
    let button = format!("#page button[data-drain={worker:?}]");
    assert!(
        b.until(
            Duration::from_secs(5),
            &format!("document.querySelector({button:?})")
        )
        .await
        .is_some(),
        "no drain button for {worker}"
    );
    // Dismissed: nothing is sent.
    b.click(&button).await;
    let prompt = b
        .client
        .get_alert_text()
        .await
        .unwrap_or_else(|e| panic!("no confirmation asked: {e}"));
    assert!(prompt.contains(&worker), "{prompt}");
    b.client
        .dismiss_alert()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(c.worker_state(&worker).await, "RUNNING");
    // Accepted: the worker drains (its instance keeps it DRAINING).
    b.click(&button).await;
    b.client
        .accept_alert()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.worker_state(&worker).await != "DRAINING" {
        assert!(Instant::now() < deadline, "the worker did not drain");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let shown = b
        .until(
            Duration::from_secs(3),
            &format!(
                "document.querySelector('th[data-worker={worker:?}]').parentElement.querySelector('[data-field=state]').textContent === 'DRAINING'"
            ),
        )
        .await;
    assert!(shown.is_some(), "the table does not show DRAINING");
    finish(b, c).await;
}

#[actix_web::test]
async fn with_a_token_the_console_asks_once_then_shows_data_and_no_url_carries_the_token() {
    const TOKEN: &str = "ui-console-token-7c1d";
    let c = Console::start(Some(TOKEN)).await;
    c.register("int", "ui-guarded", "g2-std-16").await;
    // The page is public; the data behind it is not.
    for path in ["/ui", "/ui/", "/ui/app.js", "/ui/style.css"] {
        let res = c
            .http
            .get(format!("{}{path}", c.base))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(res.status().is_success(), "{path}: {}", res.status());
    }
    for path in [
        "/api/1.0/environments",
        "/api/1.0/int/shadow-deployables",
        "/api/1.0/workers",
        "/api/1.0/instances",
        "/api/1.0/controller",
        "/api/1.0/actors",
        "/api/1.0/int/operations/x",
        "/ui/nothing.js",
    ] {
        let res = c
            .http
            .get(format!("{}{path}", c.base))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(res.status().as_u16(), 401, "{path} without the token");
    }

    let b = Browser::start().await;
    b.goto(&format!("{}/ui/#shadow", c.base)).await;
    let asked = b
        .until(
            Duration::from_secs(10),
            "!document.querySelector('#token-panel').hidden",
        )
        .await;
    assert!(asked.is_some(), "the console did not ask for the token");
    // A wrong token: asked again, with a reason.
    b.type_into("#token-input", "not-the-token").await;
    b.click("#token-form button[type=submit]").await;
    let again = b
        .until(
            Duration::from_secs(10),
            "!document.querySelector('#token-panel').hidden && document.querySelector('#token-error').textContent.includes('refused')",
        )
        .await;
    assert!(again.is_some(), "a refused token was not asked again");
    b.type_into("#token-input", TOKEN).await;
    b.click("#token-form button[type=submit]").await;
    let row = "document.querySelector('th[data-name=\"ui-guarded\"]')";
    let shown = b.until(Duration::from_secs(10), row).await;
    let text = b.js("return document.body.innerText;").await;
    assert!(shown.is_some(), "no data after the token: {text}");
    // Asked once: a reload keeps it for the session.
    b.client.refresh().await.unwrap_or_else(|e| panic!("{e}"));
    assert!(
        b.until(Duration::from_secs(10), row).await.is_some(),
        "no data after a reload"
    );
    assert_eq!(
        b.js("return document.querySelector('#token-panel').hidden;")
            .await,
        json!(true),
        "asked again after a reload"
    );
    for (page, heading) in PAGES {
        open(&b, &c.base, page, heading).await;
    }
    let urls = b
        .js("return [location.href, ...performance.getEntriesByType('resource').map(e => e.name), ...performance.getEntriesByType('navigation').map(e => e.name)];")
        .await;
    let api_calls = urls
        .as_array()
        .map(|u| {
            u.iter()
                .filter(|u| u.as_str().is_some_and(|u| u.contains("/api/1.0/")))
                .count()
        })
        .unwrap_or(0);
    assert!(api_calls > 0, "no API call seen: {urls}");
    assert!(
        !urls.to_string().contains(TOKEN) && !urls.to_string().contains("not-the-token"),
        "a URL carries the token: {urls}"
    );
    assert_eq!(
        b.js(&format!(
            "return Object.values(sessionStorage).includes({TOKEN:?});"
        ))
        .await,
        json!(true)
    );
    finish(b, c).await;
}

#[actix_web::test]
async fn the_static_files_are_served_with_their_types_a_strict_policy_and_revalidation() {
    let svc = support::service(support::config(), Arc::new(MemoryStore::new())).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    for (path, asset) in ASSETS
        .iter()
        .map(|a| (a.path, a))
        .chain([("/ui", &ASSETS[0]), ("/ui/", &ASSETS[0])])
    {
        let r = send(&app, get(path).to_request()).await;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.raw, asset.body, "{path}");
        let h = |name: header::HeaderName| {
            r.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        assert_eq!(h(header::CONTENT_TYPE), asset.content_type, "{path}");
        assert_eq!(
            h(header::CONTENT_SECURITY_POLICY),
            CONTENT_SECURITY_POLICY,
            "{path}"
        );
        assert!(CONTENT_SECURITY_POLICY.contains("default-src 'self'"));
        assert!(!CONTENT_SECURITY_POLICY.contains("unsafe-"));
        assert_eq!(h(header::CACHE_CONTROL), "no-cache", "{path}");
        assert_eq!(h(header::X_CONTENT_TYPE_OPTIONS), "nosniff", "{path}");
        let etag = h(header::ETAG);
        assert!(etag.starts_with('"') && etag.len() > 10, "{path}: {etag:?}");
        let again = send(
            &app,
            get(path)
                .insert_header((header::IF_NONE_MATCH, etag.clone()))
                .to_request(),
        )
        .await;
        assert_eq!((again.status, again.raw.len()), (304, 0), "{path}");
    }
    let r = send(&app, get("/ui/nothing.js").to_request()).await;
    assert_eq!(r.status, 404);
    assert!(!r.error().is_empty(), "{:?}", r.json);
    let r = send(&app, test::TestRequest::post().uri("/ui/").to_request()).await;
    assert_eq!(r.status, 405);
    assert!(!r.error().is_empty(), "{:?}", r.json);
    let r = send(&app, get("/api/1.0/environments").to_request()).await;
    assert_eq!(
        (r.status, r.json.clone()),
        (200, json!({"data": ["int", "prod"]}))
    );

    // With a token: only the exact asset paths are public; other spellings and the
    // API behind the page are not.
    let mut cfg = support::config();
    cfg.api_token = Some(Secret::new("static-token-1"));
    let svc = support::service(cfg, Arc::new(MemoryStore::new())).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    for path in [
        "/ui",
        "/ui/",
        "/ui/index.html",
        "/ui/app.js",
        "/ui/style.css",
    ] {
        let r = send(&app, get(path).to_request()).await;
        assert_eq!(r.status, 200, "{path}");
    }
    for path in [
        "/",
        "/ui/nothing.js",
        "/UI/app.js",
        "/ui//app.js",
        "/ui/app.js/",
        "/ui/./../api/1.0/workers",
        "/api/1.0/environments",
        "/api/1.0/workers",
    ] {
        let r = send(&app, get(path).to_request()).await;
        assert_eq!(r.status, 401, "{path}");
    }
}

/// The load-test HTML report renders in the browser without errors (and is
/// screenshotted with the console's pages).
#[actix_web::test]
async fn the_loadtest_report_renders_in_the_browser() {
    let c = Console::start(None).await;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let path = dir.path().join("report.html");
    let path_arg = path.to_string_lossy().into_owned();
    let args = LoadtestArgs::try_parse_from([
        "loadtest",
        "--url",
        c.base.as_str(),
        "--workflows",
        "4",
        "--deployables",
        "2",
        "--duration",
        "3s",
        "--max-retry-delay-ms",
        "5",
        "--no-progress",
        "--report",
        path_arg.as_str(),
    ])
    .unwrap_or_else(|e| panic!("arguments: {e}"));
    let report = loadtest::run(args)
        .await
        .unwrap_or_else(|e| panic!("the harness could not run: {e}"));
    assert!(report.passed(), "{}", report.render());
    let b = Browser::start().await;
    b.goto(&format!("file://{}", path.display())).await;
    let charts = b
        .until(
            Duration::from_secs(10),
            "document.querySelectorAll('svg').length",
        )
        .await;
    assert!(
        charts.and_then(|v| v.as_u64()).is_some_and(|n| n >= 4),
        "no charts rendered"
    );
    assert_no_console_errors(&b).await;
    b.screenshot("loadtest-report").await;
    b.close().await;
    c.stop().await;
}
