//! `WorkerAgent` over Cisco Modeling Labs' REST API (`<CML_URL_TEMPLATE>/api/v0/`), with
//! reqwest and rustls.
//!
//! The subset used: `POST authenticate` (answers a bearer token as a JSON string),
//! `GET system_information` (no auth; `ready`), `GET labs` (lab ids), `GET labs/{id}`
//! (`state`, `lab_title`, `tags`), `GET labs/{id}/state`, `PUT labs/{id}/stop` and
//! `GET system_health`. One token is cached per worker and reused while it works; a 401
//! clears it and the request is retried once with a fresh token. Every request holds one
//! of `CML_CONCURRENCY` permits, so many workers never open more than that many
//! connections at once. The password and tokens never reach logs, errors or `Debug`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex as StdMutex};

use async_trait::async_trait;
use futures::stream::{self, StreamExt, TryStreamExt};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use tokio::sync::{Mutex, Semaphore};

use crate::config::{CmlSettings, Secret};
use crate::domain::cml::{expand_url_template, UrlParts};
use crate::ports::agent::{AgentError, AgentTarget, Lab, LabState, WorkerAgent};

/// Largest answer body read from CML.
const MAX_BODY: usize = 4 * 1024 * 1024;
/// Most labs read from one host in one listing.
pub const MAX_LABS: usize = 1_000;
/// Most per-worker token slots kept before the cache starts afresh.
const MAX_TOKEN_SLOTS: usize = 4_096;

type TokenSlot = Arc<Mutex<Option<Secret>>>;

/// The CML REST client behind [`WorkerAgent`].
pub struct CmlAgent {
    settings: CmlSettings,
    client: reqwest::Client,
    tokens: StdMutex<HashMap<String, TokenSlot>>,
    permits: Arc<Semaphore>,
}

impl std::fmt::Debug for CmlAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CmlAgent")
            .field("url_template", &self.settings.url_template)
            .field("username", &self.settings.username)
            .field("password", &self.settings.password)
            .field("concurrency", &self.settings.concurrency)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct SystemInformation {
    #[serde(default)]
    ready: bool,
}

#[derive(Deserialize)]
struct LabWire {
    #[serde(default)]
    id: Option<String>,
    state: String,
    #[serde(default)]
    lab_title: Option<String>,
    #[serde(default)]
    tags: Option<Vec<String>>,
}

impl CmlAgent {
    /// Builds the client: Mozilla's and the system's roots, plus `ca_file` when set (CML
    /// ships a self-signed certificate), or no verification with `insecure_skip_verify`.
    /// The error names the variable at fault.
    pub fn new(settings: CmlSettings) -> Result<Self, String> {
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(true)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(settings.request_timeout)
            .connect_timeout(settings.request_timeout)
            .user_agent(concat!("resource-plane/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &settings.ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| format!("CML_CA_FILE: cannot read {}: {e}", path.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("CML_CA_FILE: {} is not a PEM bundle: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!(
                    "CML_CA_FILE: {} holds no certificate",
                    path.display()
                ));
            }
            for c in certs {
                b = b.add_root_certificate(c);
            }
        }
        if settings.insecure_skip_verify {
            b = b.danger_accept_invalid_certs(true);
        }
        let client = b
            .build()
            .map_err(|e| format!("CML client: {}", describe(&e)))?;
        Ok(Self {
            permits: Arc::new(Semaphore::new(settings.concurrency.max(1))),
            settings,
            client,
            tokens: StdMutex::new(HashMap::new()),
        })
    }

    /// The API base of `worker` (`.../api/v0/`).
    pub fn base_url(&self, worker: &AgentTarget) -> Result<String, AgentError> {
        expand_url_template(
            &self.settings.url_template,
            &UrlParts {
                worker_id: &worker.worker_id,
                instance_id: worker.instance_id.as_deref(),
                private_ip: worker.private_ip.as_deref(),
            },
            self.settings.allow_http,
        )
        .map_err(AgentError::Address)
    }

    /// The state of one lab (`GET labs/{id}/state`); `None` when CML does not know it.
    pub async fn lab_state(
        &self,
        worker: &AgentTarget,
        lab_id: &str,
    ) -> Result<Option<LabState>, AgentError> {
        let base = self.base_url(worker)?;
        let path = format!("labs/{}/state", checked_lab_id(lab_id)?);
        let (status, body) = self.authed(&base, Method::GET, &path).await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let s: String = parse(ok(status, &path, body)?, &path)?;
        Ok(Some(LabState::from_wire(&s)))
    }

    /// Per-compute health as CML answers it (`GET system_health`).
    pub async fn system_health(
        &self,
        worker: &AgentTarget,
    ) -> Result<serde_json::Value, AgentError> {
        let base = self.base_url(worker)?;
        let (status, body) = self.authed(&base, Method::GET, "system_health").await?;
        parse(ok(status, "system_health", body)?, "system_health")
    }

    fn slot(&self, base: &str) -> TokenSlot {
        let mut map = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_TOKEN_SLOTS && !map.contains_key(base) {
            map.clear();
        }
        map.entry(base.to_owned()).or_default().clone()
    }

    /// One HTTP exchange under a concurrency permit; the body is read (bounded) before
    /// the permit is returned. Its span (`cml.call`) names the method and the API path,
    /// never the token.
    #[tracing::instrument(
        level = "debug",
        name = "cml.call",
        skip_all,
        fields(otel.kind = "client", http.request.method = %method, path = %path)
    )]
    async fn call(
        &self,
        method: Method,
        base: &str,
        path: &str,
        token: Option<&Secret>,
        body: Option<serde_json::Value>,
    ) -> Result<(StatusCode, Vec<u8>), AgentError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| AgentError::Unreachable("client closed".into()))?;
        let mut req = self
            .client
            .request(method, format!("{base}{path}"))
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(t) = token {
            let mut v =
                reqwest::header::HeaderValue::from_str(&format!("Bearer {}", t.expose()))
                    .map_err(|_| AgentError::Protocol("CML token is not a header value".into()))?;
            v.set_sensitive(true);
            req = req.header(reqwest::header::AUTHORIZATION, v);
        }
        if let Some(b) = body {
            let bytes = serde_json::to_vec(&b)
                .map_err(|e| AgentError::Protocol(format!("{path}: body: {e}")))?;
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(bytes);
        }
        let mut resp = req
            .send()
            .await
            .map_err(|e| AgentError::Unreachable(format!("{path}: {}", describe(&e))))?;
        let status = resp.status();
        let mut out = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| AgentError::Unreachable(format!("{path}: {}", describe(&e))))?
        {
            if out.len() + chunk.len() > MAX_BODY {
                return Err(AgentError::Protocol(format!(
                    "{path}: answer larger than {MAX_BODY} bytes"
                )));
            }
            out.extend_from_slice(&chunk);
        }
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            return Err(AgentError::Unreachable(format!(
                "{path}: CML answered {status}"
            )));
        }
        Ok((status, out))
    }

    async fn authenticate(&self, base: &str) -> Result<Secret, AgentError> {
        let body = serde_json::json!({
            "username": self.settings.username,
            "password": self.settings.password.expose(),
        });
        let (status, bytes) = self
            .call(Method::POST, base, "authenticate", None, Some(body))
            .await?;
        if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            return Err(AgentError::Unauthorized(format!(
                "CML refused the credentials of user {:?} ({status})",
                self.settings.username
            )));
        }
        let token: String = parse(ok(status, "authenticate", bytes)?, "authenticate")?;
        if token.is_empty() {
            return Err(AgentError::Protocol("authenticate: empty token".into()));
        }
        Ok(Secret::new(token))
    }

    /// The cached token of `base`, authenticating (once, under the slot lock) if none.
    async fn token(&self, base: &str, slot: &TokenSlot) -> Result<Secret, AgentError> {
        let mut g = slot.lock().await;
        if let Some(t) = g.as_ref() {
            return Ok(t.clone());
        }
        let t = self.authenticate(base).await?;
        *g = Some(t.clone());
        Ok(t)
    }

    /// An authenticated exchange: the cached token, and on 401 one fresh token and one
    /// retry (unless another request already replaced the refused token).
    async fn authed(
        &self,
        base: &str,
        method: Method,
        path: &str,
    ) -> Result<(StatusCode, Vec<u8>), AgentError> {
        let slot = self.slot(base);
        let used = self.token(base, &slot).await?;
        let (status, body) = self
            .call(method.clone(), base, path, Some(&used), None)
            .await?;
        if status != StatusCode::UNAUTHORIZED {
            return Ok((status, body));
        }
        tracing::info!(path, "cml token refused; authenticating again");
        let fresh = {
            let mut g = slot.lock().await;
            match g.as_ref() {
                Some(t) if *t != used => t.clone(),
                _ => {
                    *g = None;
                    let t = self.authenticate(base).await?;
                    *g = Some(t.clone());
                    t
                }
            }
        };
        let (status, body) = self.call(method, base, path, Some(&fresh), None).await?;
        if status == StatusCode::UNAUTHORIZED {
            *slot.lock().await = None;
            return Err(AgentError::Unauthorized(format!(
                "{path}: refused a fresh token"
            )));
        }
        Ok((status, body))
    }

    async fn lab(&self, base: &str, lab_id: &str) -> Result<Option<Lab>, AgentError> {
        let path = format!("labs/{}", checked_lab_id(lab_id)?);
        let (status, body) = self.authed(base, Method::GET, &path).await?;
        if status == StatusCode::NOT_FOUND {
            // Deleted between the listing and this read: it is gone.
            return Ok(None);
        }
        let wire: LabWire = parse(ok(status, &path, body)?, &path)?;
        Ok(Some(Lab {
            id: wire.id.unwrap_or_else(|| lab_id.to_owned()),
            title: wire.lab_title.unwrap_or_default(),
            tags: wire.tags.unwrap_or_default(),
            state: LabState::from_wire(&wire.state),
        }))
    }
}

#[async_trait]
impl WorkerAgent for CmlAgent {
    async fn system_ready(&self, worker: &AgentTarget) -> Result<bool, AgentError> {
        let base = self.base_url(worker)?;
        let (status, body) = self
            .call(Method::GET, &base, "system_information", None, None)
            .await?;
        let info: SystemInformation = parse(
            ok(status, "system_information", body)?,
            "system_information",
        )?;
        Ok(info.ready)
    }

    async fn labs(&self, worker: &AgentTarget) -> Result<Vec<Lab>, AgentError> {
        let base = self.base_url(worker)?;
        let (status, body) = self.authed(&base, Method::GET, "labs").await?;
        let ids: Vec<String> = parse(ok(status, "labs", body)?, "labs")?;
        if ids.len() > MAX_LABS {
            return Err(AgentError::Protocol(format!(
                "labs: {} labs, more than the {MAX_LABS} this client reads",
                ids.len()
            )));
        }
        let base = base.as_str();
        let mut labs: Vec<Lab> = stream::iter(ids)
            .map(|id| async move { self.lab(base, &id).await })
            .buffer_unordered(self.settings.concurrency.max(1))
            .try_filter_map(|l| async move { Ok(l) })
            .try_collect()
            .await?;
        labs.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(labs)
    }

    async fn stop_lab(&self, worker: &AgentTarget, lab_id: &str) -> Result<(), AgentError> {
        let base = self.base_url(worker)?;
        let path = format!("labs/{}/stop", checked_lab_id(lab_id)?);
        let (status, body) = self.authed(&base, Method::PUT, &path).await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(());
        }
        ok(status, &path, body).map(|_| ())
    }

    fn name(&self) -> &'static str {
        "cml"
    }
}

/// Lab ids go into request paths: only letters, digits, `-` and `_`.
fn checked_lab_id(id: &str) -> Result<&str, AgentError> {
    if !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        Ok(id)
    } else {
        Err(AgentError::Protocol(format!("lab id {id:?} is not usable")))
    }
}

fn ok(status: StatusCode, path: &str, body: Vec<u8>) -> Result<Vec<u8>, AgentError> {
    if status.is_success() {
        Ok(body)
    } else {
        Err(AgentError::Protocol(format!(
            "{path}: CML answered {status}"
        )))
    }
}

fn parse<T: serde::de::DeserializeOwned>(body: Vec<u8>, path: &str) -> Result<T, AgentError> {
    serde_json::from_slice(&body)
        .map_err(|e| AgentError::Protocol(format!("{path}: unreadable answer: {e}")))
}

/// An error and its causes on one line.
fn describe(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    let mut depth = 0;
    while let Some(cause) = src {
        if depth >= 8 {
            break;
        }
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
        src = cause.source();
        depth += 1;
    }
    s
}
