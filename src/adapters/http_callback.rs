//! `CallbackSender` over HTTP(S) with reqwest and rustls, SSRF-safe.
//!
//! Each attempt validates the target against the [`UrlPolicy`], resolves its host once
//! and refuses if any resolved address is forbidden. One client, built once, sends every
//! attempt and keeps its connections; its resolver answers a host name only with the
//! addresses an attempt just checked for it (any other name fails to resolve), so DNS
//! rebinding between the check and the connection cannot redirect it (IP literals need
//! no resolution and were checked by the validation). Redirects are not followed and
//! proxies from the environment are ignored (a proxy would resolve the name itself).
//!
//! Headers sent: the caller's, `content-type: application/json`, `webhook-id`,
//! `webhook-timestamp` and, with a signing secret, `webhook-signature`. The secret and
//! the signature are never logged; neither are caller header values or URL queries.
//! With traces on, also `traceparent` (the attempt's `callback_attempt` span, a child of
//! the span of the request that asked for the callback when the intent stored it).
//!
//! [`check_at_request_time`] runs the same validation and resolution when a request
//! names a callback, so a bad target is answered with a 400 before anything is stored.

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use reqwest::redirect;
use tracing::field::Empty;
use tracing::Instrument;

use crate::config::Secret;
use crate::domain::callback::{
    is_forbidden_ip, is_loopback_ip, sign, validate_target, AttemptOutcome, CallbackError,
    CallbackTarget, TargetHost, UrlPolicy, ValidatedTarget, HEADER_WEBHOOK_ID,
    HEADER_WEBHOOK_SIGNATURE, HEADER_WEBHOOK_TIMESTAMP,
};
use crate::otel;
use crate::ports::callback::{CallbackRequest, CallbackSender};

/// How long request-time validation waits for DNS.
pub const REQUEST_TIME_RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

const USER_AGENT: &str = concat!("resource-plane-callbacks/", env!("CARGO_PKG_VERSION"));

/// Resolves host names; the system resolver in production, a fixed table in tests.
#[async_trait]
pub trait HostResolver: Send + Sync + 'static {
    /// The addresses of `host` (a name, never an IP literal) at `port`.
    async fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>>;
}

/// The operating system's resolver (`getaddrinfo`, through `tokio::net::lookup_host`).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

#[async_trait]
impl HostResolver for SystemResolver {
    async fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        Ok(tokio::net::lookup_host((host, port)).await?.collect())
    }
}

/// Validates `t` and resolves its host with the system resolver: `Ok` when a callback to
/// it would be attempted now. Policy refusals are client errors (400);
/// [`CallbackError::is_transient`] tells a DNS failure apart.
pub async fn check_at_request_time(
    t: &CallbackTarget,
    policy: &UrlPolicy,
) -> Result<(), CallbackError> {
    check_at_request_time_with(t, policy, &SystemResolver)
        .await
        .map(|_| ())
}

/// [`check_at_request_time`] with a given resolver; returns the validated target.
pub async fn check_at_request_time_with(
    t: &CallbackTarget,
    policy: &UrlPolicy,
    resolver: &dyn HostResolver,
) -> Result<ValidatedTarget, CallbackError> {
    let target = validate_target(t, policy)?;
    resolve_checked(&target, resolver, REQUEST_TIME_RESOLVE_TIMEOUT).await?;
    Ok(target)
}

/// Resolves the target's host and checks every address; returns the addresses to
/// connect to, each with the target's port.
async fn resolve_checked(
    target: &ValidatedTarget,
    resolver: &dyn HostResolver,
    timeout: Duration,
) -> Result<Vec<SocketAddr>, CallbackError> {
    let port = target.port();
    let addrs: Vec<SocketAddr> = match target.host() {
        TargetHost::Ip(ip) => vec![SocketAddr::new(*ip, port)],
        TargetHost::Name(name) => {
            let lookup = tokio::time::timeout(timeout, resolver.resolve(name, port)).await;
            let found = match lookup {
                Ok(Ok(found)) => found,
                Ok(Err(e)) => return Err(resolve_error(target, &e.to_string())),
                Err(_) => {
                    return Err(resolve_error(
                        target,
                        &format!("timed out after {timeout:?}"),
                    ))
                }
            };
            // Pin the port we validated, whatever port the resolver echoed back.
            let unique: BTreeSet<IpAddr> = found.iter().map(SocketAddr::ip).collect();
            unique
                .into_iter()
                .map(|ip| SocketAddr::new(ip, port))
                .collect()
        }
    };
    let ips: Vec<IpAddr> = addrs.iter().map(SocketAddr::ip).collect();
    target.check_addresses(&ips)?;
    Ok(addrs)
}

fn resolve_error(target: &ValidatedTarget, reason: &str) -> CallbackError {
    CallbackError::Resolve {
        host: target.host_str().to_owned(),
        reason: reason.to_owned(),
    }
}

/// Most host names whose checked addresses are kept for the shared client.
const PINNED_HOSTS: usize = 1024;

/// Host name -> the addresses the last attempt to it resolved and checked.
type Pinned = Arc<std::sync::Mutex<std::collections::HashMap<String, Vec<IpAddr>>>>;

/// The shared client's resolver: answers only with the addresses an attempt resolved
/// and checked for that host just before sending (any other name fails to resolve), and
/// checks them once more against the policy.
struct PinnedResolver {
    pinned: Pinned,
    policy: UrlPolicy,
}

impl reqwest::dns::Resolve for PinnedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        let ips = self
            .pinned
            .lock()
            .ok()
            .and_then(|p| p.get(&host).cloned())
            .unwrap_or_default();
        let policy = self.policy.clone();
        Box::pin(async move {
            let allowed = |ip: IpAddr| {
                policy.is_allowed_host(&host)
                    || !is_forbidden_ip(ip)
                    || (policy.allow_insecure_localhost && is_loopback_ip(ip))
            };
            if ips.is_empty() || ips.iter().any(|ip| !allowed(*ip)) {
                let err: Box<dyn std::error::Error + Send + Sync> =
                    format!("refusing to resolve {host}: only checked addresses are used").into();
                return Err(err);
            }
            // The connector puts the URL's port on each address.
            let addrs: Vec<SocketAddr> = ips.into_iter().map(|ip| SocketAddr::new(ip, 0)).collect();
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Sends callbacks over HTTP(S); see the module documentation for the SSRF rules.
pub struct HttpCallbackSender {
    policy: UrlPolicy,
    signing_secret: Option<Secret>,
    timeout: Duration,
    resolver: Arc<dyn HostResolver>,
    tls: Option<Arc<rustls::ClientConfig>>,
    /// The one client every attempt uses (its resolver answers from `pinned`).
    client: Result<reqwest::Client, String>,
    pinned: Pinned,
}

/// The TLS configuration every attempt shares: Mozilla's roots plus the system's, read
/// once (loading them per attempt cost most of a delivery's latency).
fn tls_config() -> Option<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let native = rustls_native_certs::load_native_certs();
    let _ = roots.add_parsable_certificates(native.certs);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Some(Arc::new(config))
}

impl std::fmt::Debug for HttpCallbackSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpCallbackSender")
            .field("policy", &self.policy)
            .field("signed", &self.signing_secret.is_some())
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl HttpCallbackSender {
    /// A sender applying `policy`, signing with `signing_secret` when given
    /// (`CALLBACK_SIGNING_SECRET`; `whsec_<base64>` or raw bytes, see
    /// [`crate::domain::callback::sign`]), and giving each attempt (resolution, connect,
    /// request and response head) at most `timeout`.
    pub fn new(policy: UrlPolicy, signing_secret: Option<Secret>, timeout: Duration) -> Self {
        let mut s = Self {
            policy,
            signing_secret,
            timeout,
            resolver: Arc::new(SystemResolver),
            tls: tls_config(),
            client: Err("not built".into()),
            pinned: Pinned::default(),
        };
        s.client = s.build_client();
        s
    }

    /// Replaces the resolver (tests use a fixed table).
    pub fn with_resolver(mut self, resolver: Arc<dyn HostResolver>) -> Self {
        self.resolver = resolver;
        self
    }

    /// The SSRF policy in force.
    pub fn policy(&self) -> &UrlPolicy {
        &self.policy
    }

    async fn attempt(&self, req: &CallbackRequest) -> AttemptOutcome {
        let target = match validate_target(&req.target, &self.policy) {
            Ok(t) => t,
            Err(e) => return AttemptOutcome::Refused(e.to_string()),
        };
        let addrs = match resolve_checked(&target, self.resolver.as_ref(), self.timeout).await {
            Ok(a) => a,
            Err(e) if e.is_transient() => return AttemptOutcome::NetworkError(e.to_string()),
            Err(e) => return AttemptOutcome::Refused(e.to_string()),
        };
        let mut headers = match self.headers(&target, req) {
            Ok(h) => h,
            Err(reason) => return AttemptOutcome::Refused(reason),
        };
        // With traces on: `traceparent` names this attempt's span.
        otel::inject_current(&mut headers);
        let method = match reqwest::Method::from_bytes(target.method().as_bytes()) {
            Ok(m) => m,
            Err(_) => {
                return AttemptOutcome::Refused(format!("invalid method {}", target.method()))
            }
        };
        if let TargetHost::Name(host) = target.host() {
            // Pin the name to what was just checked: the connection can only use these.
            if let Ok(mut p) = self.pinned.lock() {
                if p.len() >= PINNED_HOSTS && !p.contains_key(host) {
                    p.clear();
                }
                p.insert(host.clone(), addrs.iter().map(SocketAddr::ip).collect());
            }
        }
        let client = match &self.client {
            Ok(c) => c,
            Err(e) => return AttemptOutcome::NetworkError(format!("no http client: {e}")),
        };
        let sent = client
            .request(method, target.url().clone())
            .headers(headers)
            .body(req.body.clone())
            .send()
            .await;
        match sent {
            Ok(resp) if resp.status().is_success() => AttemptOutcome::Delivered {
                status: resp.status().as_u16(),
            },
            Ok(resp) => AttemptOutcome::HttpError {
                status: resp.status().as_u16(),
            },
            Err(e) if e.is_timeout() => AttemptOutcome::NetworkError(format!(
                "timed out after {:?}: {}",
                self.timeout,
                describe(&e.without_url())
            )),
            Err(e) => AttemptOutcome::NetworkError(describe(&e.without_url())),
        }
    }

    fn headers(
        &self,
        target: &ValidatedTarget,
        req: &CallbackRequest,
    ) -> Result<HeaderMap, String> {
        let mut h = HeaderMap::new();
        for (name, value) in target.headers() {
            // Validation already guarantees both parse; a failure here is still a refusal.
            let invalid = || format!("callback header {name:?} is invalid");
            let n = HeaderName::from_bytes(name.as_bytes()).map_err(|_| invalid())?;
            let mut v = HeaderValue::from_str(value).map_err(|_| invalid())?;
            v.set_sensitive(true);
            h.append(n, v);
        }
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if req.webhook_id.is_empty() {
            return Err("webhook id is empty".to_owned());
        }
        let id = HeaderValue::from_str(&req.webhook_id)
            .map_err(|_| "webhook id is not a valid header value".to_owned())?;
        h.insert(HEADER_WEBHOOK_ID, id);
        h.insert(HEADER_WEBHOOK_TIMESTAMP, HeaderValue::from(req.timestamp));
        if let Some(secret) = &self.signing_secret {
            let sig = sign(
                secret.expose().as_bytes(),
                &req.webhook_id,
                req.timestamp,
                &req.body,
            );
            let mut v = HeaderValue::from_str(&sig)
                .map_err(|_| "signature is not a valid header value".to_owned())?;
            v.set_sensitive(true);
            h.insert(HEADER_WEBHOOK_SIGNATURE, v);
        }
        Ok(h)
    }

    fn build_client(&self) -> Result<reqwest::Client, String> {
        let mut b = reqwest::Client::builder()
            .redirect(redirect::Policy::none())
            .no_proxy()
            .timeout(self.timeout)
            .connect_timeout(self.timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            .user_agent(USER_AGENT)
            .dns_resolver(Arc::new(PinnedResolver {
                pinned: self.pinned.clone(),
                policy: self.policy.clone(),
            }));
        if let Some(tls) = &self.tls {
            b = b.use_preconfigured_tls((**tls).clone());
        }
        b.build().map_err(|e| describe(&e.without_url()))
    }
}

/// An error and its causes on one line, each cause once.
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cause = e.source();
    while let Some(c) = cause {
        let msg = c.to_string();
        if !parts.iter().any(|p| p.contains(&msg)) {
            parts.push(msg);
        }
        cause = c.source();
    }
    parts.join(": ")
}

#[async_trait]
impl CallbackSender for HttpCallbackSender {
    async fn send(&self, req: &CallbackRequest) -> AttemptOutcome {
        let span = tracing::info_span!(
            "callback_attempt",
            webhook_id = %req.webhook_id,
            otel.kind = Empty,
            otel.status_code = Empty,
            http.response.status_code = Empty,
        );
        // Before the span is entered (entering starts it): the attempt joins the trace of
        // the request that asked for the callback.
        if let Some(tp) = &req.traceparent {
            otel::continue_traceparent(&span, tp);
        }
        self.send_in_span(req).instrument(span).await
    }
}

impl HttpCallbackSender {
    /// One attempt inside its `callback_attempt` span: the outcome on the span and in
    /// the log.
    async fn send_in_span(&self, req: &CallbackRequest) -> AttemptOutcome {
        let outcome = self.attempt(req).await;
        if otel::enabled() {
            let span = tracing::Span::current();
            span.record("otel.kind", "client");
            match &outcome {
                AttemptOutcome::Delivered { status } => {
                    span.record("http.response.status_code", status);
                }
                AttemptOutcome::HttpError { status } => {
                    span.record("http.response.status_code", status);
                    span.record("otel.status_code", "error");
                }
                AttemptOutcome::NetworkError(_) | AttemptOutcome::Refused(_) => {
                    span.record("otel.status_code", "error");
                }
            }
        }
        match &outcome {
            AttemptOutcome::Delivered { status } => tracing::debug!(status, "callback delivered"),
            AttemptOutcome::HttpError { status } => {
                tracing::warn!(status, "callback answered with an error status")
            }
            AttemptOutcome::NetworkError(error) => {
                tracing::warn!(error = %error, "callback could not be delivered")
            }
            AttemptOutcome::Refused(reason) => tracing::warn!(reason = %reason, "callback refused"),
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Table(HashMap<String, Vec<IpAddr>>);

    #[async_trait]
    impl HostResolver for Table {
        async fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
            self.0
                .get(host)
                .map(|ips| {
                    ips.iter()
                        .map(|ip| SocketAddr::new(*ip, port.wrapping_add(1)))
                        .collect()
                })
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such host"))
        }
    }

    fn table(pairs: &[(&str, &[&str])]) -> Table {
        Table(
            pairs
                .iter()
                .map(|(h, ips)| {
                    let ips = ips
                        .iter()
                        .map(|s| s.parse().unwrap_or_else(|e| panic!("{s}: {e}")))
                        .collect();
                    ((*h).to_owned(), ips)
                })
                .collect(),
        )
    }

    #[tokio::test]
    async fn resolution_is_checked_and_pins_the_validated_port() {
        let r = table(&[
            (
                "public.example",
                &["93.184.216.34", "93.184.216.34", "2606:2800::1"],
            ),
            ("mixed.example", &["93.184.216.34", "10.0.0.1"]),
            ("empty.example", &[]),
        ]);
        let policy = UrlPolicy::default();
        let t = check_at_request_time_with(
            &CallbackTarget::post("https://public.example/"),
            &policy,
            &r,
        )
        .await
        .expect("public");
        let addrs = resolve_checked(&t, &r, Duration::from_secs(1))
            .await
            .expect("addrs");
        assert_eq!(addrs.len(), 2, "duplicates are dropped: {addrs:?}");
        assert!(addrs.iter().all(|a| a.port() == 443), "{addrs:?}");
        let e = check_at_request_time_with(
            &CallbackTarget::post("https://mixed.example/"),
            &policy,
            &r,
        )
        .await
        .expect_err("mixed");
        assert!(matches!(e, CallbackError::ForbiddenAddress { .. }), "{e}");
        for host in ["empty.example", "missing.example"] {
            let e = check_at_request_time_with(
                &CallbackTarget::post(format!("https://{host}/")),
                &policy,
                &r,
            )
            .await
            .expect_err(host);
            assert!(e.is_transient(), "{e}");
        }
    }

    #[tokio::test]
    async fn refusals_and_lookup_failures_map_to_outcomes() {
        let r = Arc::new(table(&[("private.example", &["192.168.1.10"])]));
        let sender = HttpCallbackSender::new(UrlPolicy::default(), None, Duration::from_secs(1))
            .with_resolver(r);
        let req = |url: &str| CallbackRequest {
            target: CallbackTarget::post(url),
            webhook_id: "msg_1".into(),
            timestamp: 1,
            body: b"{}".to_vec(),
            traceparent: None,
        };
        for url in [
            "https://private.example/",
            "http://8.8.8.8/",
            "https://10.0.0.1/",
        ] {
            let out = sender.send(&req(url)).await;
            assert!(matches!(out, AttemptOutcome::Refused(_)), "{url}: {out:?}");
        }
        let out = sender.send(&req("https://missing.example/")).await;
        assert!(matches!(out, AttemptOutcome::NetworkError(_)), "{out:?}");
    }

    #[test]
    fn debug_hides_the_secret() {
        let s = HttpCallbackSender::new(
            UrlPolicy::default(),
            Some(Secret::new("whsec_c2VjcmV0")),
            Duration::from_secs(1),
        );
        let dbg = format!("{s:?}");
        assert!(
            !dbg.contains("c2VjcmV0") && dbg.contains("signed: true"),
            "{dbg}"
        );
    }
}
