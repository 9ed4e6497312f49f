//! The harness's HTTP client: one `reqwest` pool sized to the concurrency, the bearer
//! token on every request, and one call that times a request and reads its JSON answer.
//! Several replicas may be given; each call names the one it goes to.

use std::time::{Duration, Instant, SystemTime};

use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::Method;
use serde_json::Value;

use crate::loadtest::history::unix_ms;
use crate::loadtest::stats::Answer;
use crate::loadtest::LoadtestError;

/// A timed answer.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Status, or `Transport` when nothing came back.
    pub answer: Answer,
    /// Time from sending to having read the whole body.
    pub latency: Duration,
    /// The body as JSON (`Null` when empty, not JSON, or no answer).
    pub body: Value,
    /// Index of the replica it went to.
    pub replica: usize,
    /// No answer within the client's deadline.
    pub timed_out: bool,
    /// When it was sent (Unix ms).
    pub start_ms: u64,
    /// When the answer was read or the request failed (Unix ms).
    pub end_ms: u64,
}

impl Reply {
    /// The HTTP status, 0 when there was none.
    pub fn status(&self) -> u16 {
        match self.answer {
            Answer::Status(s) => s,
            Answer::Transport => 0,
        }
    }

    /// `body.status` as a string (`PROCURED`, `FAILED`, ...), or "".
    pub fn outcome(&self) -> &str {
        self.body["status"].as_str().unwrap_or_default()
    }

    /// Whether a retry with the same idempotency key may help: no answer, or 5xx.
    pub fn retryable(&self) -> bool {
        matches!(self.answer, Answer::Transport) || self.answer.is_server_error()
    }
}

/// The client of one target (or of several replicas of it).
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    bases: Vec<String>,
}

impl Client {
    /// A client for `bases` (`http://host:port`, no trailing slash needed; replica `i`
    /// is `bases[i]`) keeping up to `pool` idle connections, with `timeout` per request.
    pub fn new(
        bases: &[String],
        token: Option<&str>,
        pool: usize,
        timeout: Duration,
    ) -> Result<Self, LoadtestError> {
        let mut headers = HeaderMap::new();
        if let Some(t) = token {
            let mut v = HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| {
                LoadtestError::Args("--token has characters not allowed in a header".into())
            })?;
            v.set_sensitive(true);
            headers.insert(AUTHORIZATION, v);
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .pool_max_idle_per_host(pool)
            .pool_idle_timeout(Duration::from_secs(30))
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| LoadtestError::Setup(format!("http client: {e}")))?;
        if bases.is_empty() {
            return Err(LoadtestError::Args("no --url given".into()));
        }
        Ok(Self {
            http,
            bases: bases
                .iter()
                .map(|b| b.trim_end_matches('/').to_owned())
                .collect(),
        })
    }

    /// Number of replicas.
    pub fn replicas(&self) -> usize {
        self.bases.len()
    }

    /// Sends one request to the first replica and reads the whole answer.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        idempotency_key: Option<&str>,
    ) -> Reply {
        self.call_on(0, method, path, body, idempotency_key).await
    }

    /// Sends one request to replica `replica` (modulo their number) and reads the whole
    /// answer.
    pub async fn call_on(
        &self,
        replica: usize,
        method: Method,
        path: &str,
        body: Option<&Value>,
        idempotency_key: Option<&str>,
    ) -> Reply {
        self.exchange(replica, method, path, body, idempotency_key, true)
            .await
    }

    /// A GET on replica `replica` that reads the whole answer but does not parse it
    /// (`body` is `Null`): the closed-loop read scenarios, whose client would otherwise
    /// spend more CPU parsing a large list than the service spends answering it, on the
    /// same cores.
    pub async fn get_unparsed(&self, replica: usize, path: &str) -> Reply {
        self.exchange(replica, Method::GET, path, None, None, false)
            .await
    }

    async fn exchange(
        &self,
        replica: usize,
        method: Method,
        path: &str,
        body: Option<&Value>,
        idempotency_key: Option<&str>,
        parse: bool,
    ) -> Reply {
        let replica = replica % self.bases.len().max(1);
        let base = self
            .bases
            .get(replica)
            .map(String::as_str)
            .unwrap_or_default();
        let mut req = self.http.request(method, format!("{base}{path}"));
        if let Some(b) = body {
            req = req
                .header(CONTENT_TYPE, "application/json")
                .body(b.to_string());
        }
        if let Some(k) = idempotency_key {
            req = req.header("X-Idempotency-Key", k);
        }
        let start_ms = unix_ms(SystemTime::now());
        let start = Instant::now();
        let failed = |e: reqwest::Error, latency: Duration| Reply {
            answer: Answer::Transport,
            latency,
            body: Value::Null,
            replica,
            timed_out: e.is_timeout(),
            start_ms,
            end_ms: unix_ms(SystemTime::now()),
        };
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return failed(e, start.elapsed()),
        };
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await;
        let latency = start.elapsed();
        match bytes {
            Ok(b) => Reply {
                answer: Answer::Status(status),
                latency,
                body: if parse {
                    serde_json::from_slice(&b).unwrap_or(Value::Null)
                } else {
                    Value::Null
                },
                replica,
                timed_out: false,
                start_ms,
                end_ms: unix_ms(SystemTime::now()),
            },
            Err(e) => failed(e, latency),
        }
    }
}
