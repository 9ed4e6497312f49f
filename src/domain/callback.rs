//! Callback rules, without I/O: which callback targets are acceptable (SSRF policy),
//! how a delivery is signed (Standard Webhooks), and when a failed delivery is retried.
//!
//! The sender adapter (`adapters::http_callback`) resolves hostnames and asks
//! [`ValidatedTarget::check_addresses`] about every address it found, then connects to
//! exactly those addresses; the outbox asks [`RetryPolicy`] whether and when to try again
//! and keeps one [`AttemptRecord`] per attempt.
//!
//! Policy, in order:
//! - the URL must parse, be at most [`MAX_URL_LEN`] bytes, carry no user info and name a
//!   host;
//! - the scheme is `https`; plain `http` is accepted only with
//!   `allow_insecure_localhost` and a loopback host (a loopback IP literal, `localhost`
//!   or a `*.localhost` name), and then every address it resolves to must be loopback;
//! - hosts listed in `allowed_hosts` skip the address check (not the scheme check);
//! - any other host must be, or resolve only to, addresses for which
//!   [`is_forbidden_ip`] is false (loopback is tolerated with `allow_insecure_localhost`);
//! - caller headers are plain tokens and printable ASCII values and cannot override what
//!   the sender sets itself (`host`, framing headers, `content-type`, `webhook-*`).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use url::{Host, Url};

/// Header carrying the message id, stable across retries of one delivery.
pub const HEADER_WEBHOOK_ID: &str = "webhook-id";
/// Header carrying the attempt's Unix timestamp in seconds.
pub const HEADER_WEBHOOK_TIMESTAMP: &str = "webhook-timestamp";
/// Header carrying the signature(s), `v1,<base64>` separated by spaces.
pub const HEADER_WEBHOOK_SIGNATURE: &str = "webhook-signature";
/// Prefix of a secret given in the Standard Webhooks form (`whsec_<base64>`).
pub const SECRET_PREFIX: &str = "whsec_";
/// Longest callback URL accepted.
pub const MAX_URL_LEN: usize = 2048;
/// Most caller headers accepted on one callback.
pub const MAX_HEADERS: usize = 32;
/// Longest caller header value accepted.
pub const MAX_HEADER_VALUE_LEN: usize = 4096;

const MAX_HEADER_NAME_LEN: usize = 128;

/// Headers the sender sets or that control HTTP framing; a caller may not set them.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "expect",
    "proxy-authorization",
    "proxy-connection",
];

/// Why a callback target, or the address it resolves to, is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallbackError {
    /// The URL does not parse or is too long.
    #[error("invalid callback url: {0}")]
    InvalidUrl(String),
    /// The URL's scheme is not allowed here.
    #[error("callback url scheme {scheme:?} is not allowed: {reason}")]
    SchemeNotAllowed {
        /// The scheme given.
        scheme: String,
        /// What would be accepted.
        reason: String,
    },
    /// The URL carries a user name or password.
    #[error("callback url must not contain user info")]
    UserInfo,
    /// The URL names no host.
    #[error("callback url has no host")]
    MissingHost,
    /// The host is, or resolves to, an address callbacks may not reach.
    #[error("callback host {host} is or resolves to a forbidden address ({addr})")]
    ForbiddenAddress {
        /// The host as written in the URL.
        host: String,
        /// The offending address.
        addr: IpAddr,
    },
    /// A plain-http loopback target resolved to something that is not loopback.
    #[error("callback host {host} resolves to non-loopback address {addr}, which plain http may not reach")]
    NotLoopback {
        /// The host as written in the URL.
        host: String,
        /// The offending address.
        addr: IpAddr,
    },
    /// The host name could not be resolved (which may be transient).
    #[error("callback host {host} could not be resolved: {reason}")]
    Resolve {
        /// The host as written in the URL.
        host: String,
        /// What the resolver said.
        reason: String,
    },
    /// The method is not POST, PUT or PATCH.
    #[error("callback method {0:?} is not allowed: use POST, PUT or PATCH")]
    InvalidMethod(String),
    /// A caller header is malformed.
    #[error("callback header {name:?} is invalid: {reason}")]
    InvalidHeader {
        /// The header name (never its value, which may be a credential).
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A caller header would override one the sender controls.
    #[error("callback header {0:?} is set by the sender and cannot be overridden")]
    ReservedHeader(String),
    /// Too many caller headers.
    #[error("callback has {0} headers, at most {max} are allowed", max = MAX_HEADERS)]
    TooManyHeaders(usize),
    /// A `whsec_` signing secret whose remainder is not base64.
    #[error("signing secret starts with {prefix:?} but the rest is not valid base64", prefix = SECRET_PREFIX)]
    InvalidSecret,
}

impl CallbackError {
    /// Whether the failure may go away on its own (a DNS failure), as opposed to a target
    /// that is refused by policy. Request handlers may answer 503 instead of 400 for these.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Resolve { .. })
    }
}

fn default_method() -> String {
    "POST".to_owned()
}

/// Where and how a caller wants to be called back (`callback{url,method,headers}`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallbackTarget {
    /// Absolute `https` URL.
    pub url: String,
    /// `POST` (default), `PUT` or `PATCH`, any case.
    #[serde(default = "default_method")]
    pub method: String,
    /// Extra request headers, e.g. an `authorization` the receiver expects.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

impl CallbackTarget {
    /// A `POST` target without extra headers.
    pub fn post(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            method: default_method(),
            headers: BTreeMap::new(),
        }
    }

    /// The URL to show in answers and logs: without its fragment, and its query (which
    /// may hold a token) replaced by `<redacted>`.
    pub fn redacted_url(&self) -> String {
        match Url::parse(&self.url) {
            Ok(u) => redacted_url(&u),
            Err(_) => "<unparsable>".to_owned(),
        }
    }
}

// Header values (often credentials) and the URL's query (sometimes a token) stay out of logs.
impl fmt::Debug for CallbackTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let url = match Url::parse(&self.url) {
            Ok(u) => redacted_url(&u),
            Err(_) => "<unparsable>".to_owned(),
        };
        f.debug_struct("CallbackTarget")
            .field("url", &url)
            .field("method", &self.method)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// The SSRF policy (`CALLBACK_ALLOWED_HOSTS`, `CALLBACK_ALLOW_INSECURE_LOCALHOST`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UrlPolicy {
    /// Exact host names (or IP literals) that skip the address check, compared without
    /// case and without a trailing dot. `https` is still required.
    pub allowed_hosts: Vec<String>,
    /// Accept loopback targets, over plain `http` too: for development and tests only.
    pub allow_insecure_localhost: bool,
}

impl UrlPolicy {
    /// Parses a comma-separated host list, as `CALLBACK_ALLOWED_HOSTS` holds it.
    pub fn parse_hosts(list: &str) -> Vec<String> {
        list.split(',')
            .map(normalize_host)
            .filter(|h| !h.is_empty())
            .collect()
    }

    /// Whether `host` (as written in a URL) is listed in `allowed_hosts`.
    pub fn is_allowed_host(&self, host: &str) -> bool {
        let host = normalize_host(host);
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        self.allowed_hosts.iter().any(|h| {
            let h = normalize_host(h);
            h == host || h.trim_start_matches('[').trim_end_matches(']') == bare
        })
    }
}

fn normalize_host(h: &str) -> String {
    let h = h.trim();
    h.strip_suffix('.').unwrap_or(h).to_ascii_lowercase()
}

/// The host of a validated target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetHost {
    /// An IP literal: no resolution needed.
    Ip(IpAddr),
    /// A name to resolve (lowercase, as the URL parser normalised it).
    Name(String),
}

/// Which resolved addresses a target may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AddressRule {
    /// The host is in `allowed_hosts`.
    Any,
    /// Only addresses that are not forbidden (loopback too when `allow_loopback`).
    Public { allow_loopback: bool },
    /// Plain http under `allow_insecure_localhost`: loopback addresses only.
    LoopbackOnly,
}

/// A callback target that passed [`validate_target`]; the only way to build one.
#[derive(Clone, PartialEq, Eq)]
pub struct ValidatedTarget {
    url: Url,
    method: String,
    headers: Vec<(String, String)>,
    host: TargetHost,
    port: u16,
    rule: AddressRule,
}

impl ValidatedTarget {
    /// The parsed URL (fragment removed).
    pub fn url(&self) -> &Url {
        &self.url
    }
    /// `POST`, `PUT` or `PATCH`.
    pub fn method(&self) -> &str {
        &self.method
    }
    /// Caller headers: lowercase names, values as given, sorted by name.
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }
    /// The host to connect to.
    pub fn host(&self) -> &TargetHost {
        &self.host
    }
    /// The host as it appears in the URL (IPv6 literals in brackets).
    pub fn host_str(&self) -> &str {
        self.url.host_str().unwrap_or_default()
    }
    /// The port, explicit or the scheme's default.
    pub fn port(&self) -> u16 {
        self.port
    }
    /// The URL without its query, for logs.
    pub fn redacted_url(&self) -> String {
        redacted_url(&self.url)
    }

    /// Checks the addresses the host resolved to: refused if any one is not allowed,
    /// since the connection may use any of them. An empty list is refused too.
    pub fn check_addresses(&self, addrs: &[IpAddr]) -> Result<(), CallbackError> {
        if addrs.is_empty() {
            return Err(CallbackError::Resolve {
                host: self.host_str().to_owned(),
                reason: "no addresses".to_owned(),
            });
        }
        for &addr in addrs {
            let ok = match self.rule {
                AddressRule::Any => true,
                AddressRule::Public { allow_loopback } => {
                    !is_forbidden_ip(addr) || (allow_loopback && is_loopback_ip(addr))
                }
                AddressRule::LoopbackOnly => {
                    if !is_loopback_ip(addr) {
                        return Err(CallbackError::NotLoopback {
                            host: self.host_str().to_owned(),
                            addr,
                        });
                    }
                    true
                }
            };
            if !ok {
                return Err(CallbackError::ForbiddenAddress {
                    host: self.host_str().to_owned(),
                    addr,
                });
            }
        }
        Ok(())
    }
}

impl fmt::Debug for ValidatedTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ValidatedTarget")
            .field("url", &self.redacted_url())
            .field("method", &self.method)
            .field(
                "headers",
                &self.headers.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .field("host", &self.host)
            .field("port", &self.port)
            .finish()
    }
}

fn redacted_url(u: &Url) -> String {
    let mut u = u.clone();
    let had_query = u.query().is_some();
    u.set_query(None);
    u.set_fragment(None);
    let mut s = u.to_string();
    if had_query {
        s.push_str("?<redacted>");
    }
    s
}

/// Checks a target's syntax, scheme, literal address and headers against `policy`.
/// Host names are not resolved here; the caller resolves them and asks
/// [`ValidatedTarget::check_addresses`].
pub fn validate_target(
    t: &CallbackTarget,
    policy: &UrlPolicy,
) -> Result<ValidatedTarget, CallbackError> {
    if t.url.len() > MAX_URL_LEN {
        return Err(CallbackError::InvalidUrl(format!(
            "longer than {MAX_URL_LEN} bytes"
        )));
    }
    let mut url = Url::parse(t.url.trim()).map_err(|e| CallbackError::InvalidUrl(e.to_string()))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(CallbackError::UserInfo);
    }
    url.set_fragment(None);
    let host = match url.host() {
        None => return Err(CallbackError::MissingHost),
        Some(Host::Ipv4(ip)) => TargetHost::Ip(IpAddr::V4(ip)),
        Some(Host::Ipv6(ip)) => TargetHost::Ip(IpAddr::V6(ip)),
        Some(Host::Domain("")) => return Err(CallbackError::MissingHost),
        Some(Host::Domain(d)) => TargetHost::Name(d.to_ascii_lowercase()),
    };
    let host_str = url.host_str().unwrap_or_default().to_owned();
    let loopback_host = match &host {
        TargetHost::Ip(ip) => is_loopback_ip(*ip),
        TargetHost::Name(n) => {
            let n = normalize_host(n);
            n == "localhost" || n.ends_with(".localhost")
        }
    };
    let rule = match url.scheme() {
        "https" if policy.is_allowed_host(&host_str) => AddressRule::Any,
        "https" => AddressRule::Public {
            allow_loopback: policy.allow_insecure_localhost,
        },
        "http" if policy.allow_insecure_localhost && loopback_host => AddressRule::LoopbackOnly,
        other => {
            let reason = if policy.allow_insecure_localhost {
                "use https (plain http only for loopback hosts)"
            } else {
                "use https"
            };
            return Err(CallbackError::SchemeNotAllowed {
                scheme: other.to_owned(),
                reason: reason.to_owned(),
            });
        }
    };
    let port = url.port_or_known_default().ok_or_else(|| {
        CallbackError::InvalidUrl("no port and no default port for the scheme".to_owned())
    })?;
    let method = validate_method(&t.method)?;
    let headers = validate_headers(&t.headers)?;
    let target = ValidatedTarget {
        url,
        method,
        headers,
        host,
        port,
        rule,
    };
    if let TargetHost::Ip(ip) = target.host {
        target.check_addresses(&[ip])?;
    }
    Ok(target)
}

fn validate_method(m: &str) -> Result<String, CallbackError> {
    let upper = m.trim().to_ascii_uppercase();
    match upper.as_str() {
        "" => Ok(default_method()),
        "POST" | "PUT" | "PATCH" => Ok(upper),
        _ => Err(CallbackError::InvalidMethod(m.to_owned())),
    }
}

fn is_tchar(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

fn validate_headers(h: &BTreeMap<String, String>) -> Result<Vec<(String, String)>, CallbackError> {
    if h.len() > MAX_HEADERS {
        return Err(CallbackError::TooManyHeaders(h.len()));
    }
    let mut out: Vec<(String, String)> = Vec::with_capacity(h.len());
    for (name, value) in h {
        let invalid = |reason: &str| CallbackError::InvalidHeader {
            name: name.chars().take(MAX_HEADER_NAME_LEN).collect(),
            reason: reason.to_owned(),
        };
        if name.is_empty() || name.len() > MAX_HEADER_NAME_LEN {
            return Err(invalid("name must be 1 to 128 characters"));
        }
        if name.contains(['\r', '\n']) || value.contains(['\r', '\n']) {
            return Err(invalid("must not contain cr or lf"));
        }
        if !name.chars().all(is_tchar) {
            return Err(invalid("name must be an http token"));
        }
        if value.len() > MAX_HEADER_VALUE_LEN {
            return Err(invalid("value is longer than 4096 bytes"));
        }
        if !value.chars().all(|c| c == '\t' || (' '..='~').contains(&c)) {
            return Err(invalid("value must be printable ascii"));
        }
        let lower = name.to_ascii_lowercase();
        if RESERVED_HEADERS.contains(&lower.as_str()) || lower.starts_with("webhook-") {
            return Err(CallbackError::ReservedHeader(lower));
        }
        if out.iter().any(|(n, _)| *n == lower) {
            return Err(invalid("given twice (names are case-insensitive)"));
        }
        out.push((lower, value.trim().to_owned()));
    }
    out.sort();
    Ok(out)
}

/// Whether `ip` is loopback (`127.0.0.0/8`, `::1`, or their IPv4-mapped form).
pub fn is_loopback_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Whether a callback may not reach `ip`: loopback, private (`10/8`, `172.16/12`,
/// `192.168/16`, `fc00::/7`), link-local (`169.254/16`, `fe80::/10`), unspecified and
/// `0.0.0.0/8`, carrier-grade NAT `100.64/10`, cloud metadata (`169.254.169.254`,
/// `fd00:ec2::254`, Azure's `168.63.129.16`), broadcast and the rest of `240/4`,
/// multicast, documentation and benchmarking ranges, IETF protocol assignments, the
/// deprecated site-local, IPv4-compatible and 6to4/Teredo ranges, and the IPv4-mapped
/// or NAT64 form of any forbidden IPv4 address.
pub fn is_forbidden_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_forbidden_v4(v4),
        IpAddr::V6(v6) => is_forbidden_v6(v6),
    }
}

fn in_v4(ip: Ipv4Addr, net: [u8; 4], len: u32) -> bool {
    let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
    (u32::from(ip) & mask) == (u32::from(Ipv4Addr::from(net)) & mask)
}

fn is_forbidden_v4(ip: Ipv4Addr) -> bool {
    const NETS: &[([u8; 4], u32)] = &[
        ([0, 0, 0, 0], 8),        // "this network", includes unspecified
        ([10, 0, 0, 0], 8),       // private
        ([100, 64, 0, 0], 10),    // carrier-grade NAT (also Alibaba's metadata)
        ([127, 0, 0, 0], 8),      // loopback
        ([168, 63, 129, 16], 32), // Azure platform endpoint (wireserver)
        ([169, 254, 0, 0], 16),   // link-local, includes 169.254.169.254 metadata
        ([172, 16, 0, 0], 12),    // private
        ([192, 0, 0, 0], 24),     // IETF protocol assignments
        ([192, 0, 2, 0], 24),     // TEST-NET-1
        ([192, 88, 99, 0], 24),   // 6to4 relay anycast
        ([192, 168, 0, 0], 16),   // private
        ([198, 18, 0, 0], 15),    // benchmarking
        ([198, 51, 100, 0], 24),  // TEST-NET-2
        ([203, 0, 113, 0], 24),   // TEST-NET-3
        ([224, 0, 0, 0], 4),      // multicast
        ([240, 0, 0, 0], 4),      // reserved, includes 255.255.255.255 broadcast
    ];
    NETS.iter().any(|&(net, len)| in_v4(ip, net, len))
}

fn in_v6(ip: Ipv6Addr, net: [u16; 8], len: u32) -> bool {
    let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
    (u128::from(ip) & mask) == (u128::from(Ipv6Addr::from(net)) & mask)
}

fn is_forbidden_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_forbidden_v4(v4);
    }
    // NAT64 well-known prefix: reaches the embedded IPv4 address, so judge that.
    if in_v6(ip, [0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96) {
        let [.., a, b, c, d] = ip.octets();
        return is_forbidden_v4(Ipv4Addr::new(a, b, c, d));
    }
    const NETS: &[([u16; 8], u32)] = &[
        ([0, 0, 0, 0, 0, 0, 0, 0], 96), // ::, ::1, IPv4-compatible (deprecated)
        ([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48), // local-use NAT64
        ([0x100, 0, 0, 0, 0, 0, 0, 0], 64), // discard-only
        ([0x2001, 0, 0, 0, 0, 0, 0, 0], 23), // IETF protocol assignments, Teredo
        ([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32), // documentation
        ([0x2002, 0, 0, 0, 0, 0, 0, 0], 16), // 6to4 (tunnels to any IPv4)
        ([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20), // documentation
        ([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7), // unique local, includes fd00:ec2::254
        ([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10), // link-local
        ([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10), // site-local (deprecated)
        ([0xff00, 0, 0, 0, 0, 0, 0, 0], 8), // multicast
    ];
    NETS.iter().any(|&(net, len)| in_v6(ip, net, len))
}

const BASE64_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The HMAC key of a configured secret: the base64-decoded remainder of a
/// `whsec_<base64>` secret, or the secret's raw bytes otherwise. Errors only for a
/// `whsec_` secret whose remainder is not base64; configuration should call this at
/// start-up so such a secret is rejected rather than used as raw bytes.
pub fn decode_secret(secret: &[u8]) -> Result<Vec<u8>, CallbackError> {
    match secret.strip_prefix(SECRET_PREFIX.as_bytes()) {
        Some(b64) => BASE64_LENIENT
            .decode(b64)
            .map_err(|_| CallbackError::InvalidSecret),
        None => Ok(secret.to_vec()),
    }
}

fn signing_key(secret: &[u8]) -> Cow<'_, [u8]> {
    match decode_secret(secret) {
        Ok(k) => Cow::Owned(k),
        // Documented fallback: an undecodable `whsec_` secret is used as raw bytes.
        Err(_) => Cow::Borrowed(secret),
    }
}

fn mac(key: &[u8], msg_id: &str, timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length, so this cannot fail.
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("hmac accepts any key length");
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The Standard Webhooks signature of one delivery: `v1,` followed by the base64 of
/// HMAC-SHA256 over `{msg_id}.{timestamp}.{body}`. A secret of the form
/// `whsec_<base64>` is base64-decoded first (as the Standard Webhooks libraries do);
/// any other secret is used as raw bytes (see [`decode_secret`]).
pub fn sign(secret: &[u8], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    let tag = mac(&signing_key(secret), msg_id, timestamp, body)
        .finalize()
        .into_bytes();
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(tag)
    )
}

/// Whether a `webhook-signature` header value (space-separated `v1,<base64>` entries)
/// holds a valid signature of this delivery, compared in constant time. For receivers
/// and tests; timestamp freshness is the receiver's own check.
pub fn verify_signature(
    secret: &[u8],
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
    header: &str,
) -> bool {
    let expected = sign(secret, msg_id, timestamp, body);
    header
        .split_whitespace()
        .any(|sig| bool::from(sig.as_bytes().ct_eq(expected.as_bytes())))
}

/// The result of one delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// The receiver answered 2xx.
    Delivered {
        /// HTTP status.
        status: u16,
    },
    /// The receiver answered something else (a redirect too: they are not followed).
    /// 5xx and 429 are retried; any other status stops.
    HttpError {
        /// HTTP status.
        status: u16,
    },
    /// No answer: DNS, connect, TLS, timeout or a broken connection. Retried.
    NetworkError(String),
    /// The sender refused the target (SSRF policy) and sent nothing. Never retried.
    Refused(String),
}

impl AttemptOutcome {
    /// Whether the callback was delivered.
    pub fn is_delivered(&self) -> bool {
        matches!(self, Self::Delivered { .. })
    }

    /// Whether this outcome, by itself, warrants another attempt.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Delivered { .. } | Self::Refused(_) => false,
            Self::HttpError { status } => *status == 429 || (500..=599).contains(status),
            Self::NetworkError(_) => true,
        }
    }

    /// Short name as recorded: `delivered`, `http_error`, `network_error`, `refused`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Delivered { .. } => "delivered",
            Self::HttpError { .. } => "http_error",
            Self::NetworkError(_) => "network_error",
            Self::Refused(_) => "refused",
        }
    }

    /// The HTTP status, when the receiver answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Delivered { status } | Self::HttpError { status } => Some(*status),
            Self::NetworkError(_) | Self::Refused(_) => None,
        }
    }

    /// The error message, when there was no answer.
    pub fn error(&self) -> Option<&str> {
        match self {
            Self::NetworkError(e) | Self::Refused(e) => Some(e),
            Self::Delivered { .. } | Self::HttpError { .. } => None,
        }
    }
}

/// One attempt as stored with the watch intent and shown by `GET …/operations/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// 1 for the first attempt.
    pub attempt: u32,
    /// When the attempt ended.
    #[serde(with = "crate::domain::time")]
    pub at: DateTime<Utc>,
    /// [`AttemptOutcome::kind`].
    pub outcome: String,
    /// HTTP status, when the receiver answered.
    pub status: Option<u16>,
    /// What went wrong, when there was no answer.
    pub error: Option<String>,
}

impl AttemptRecord {
    /// Records `outcome` as attempt number `attempt`.
    pub fn new(attempt: u32, at: DateTime<Utc>, outcome: &AttemptOutcome) -> Self {
        Self {
            attempt,
            at,
            outcome: outcome.kind().to_owned(),
            status: outcome.status(),
            error: outcome.error().map(str::to_owned),
        }
    }
}

/// When failed deliveries are tried again: exponential backoff with jitter, bounded by
/// a number of attempts (`CALLBACK_MAX_ATTEMPTS`) and an age since the first attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (default 8).
    pub max_attempts: u32,
    /// No attempt starts later than this after the first (default 24 h).
    pub max_age: Duration,
    /// Delay before the second attempt, before jitter (default 1 s).
    pub base: Duration,
    /// Largest delay between attempts (default 5 min).
    pub cap: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 8,
            max_age: Duration::from_secs(24 * 3600),
            base: Duration::from_secs(1),
            cap: Duration::from_secs(300),
        }
    }
}

impl RetryPolicy {
    /// The wait after `attempt` attempts have failed (0 attempts: no wait). The
    /// exponential step is `base * 2^(attempt-1)`, at most `cap`; the result lies between
    /// half that step and the step itself, placed by `jitter_unit` in `0..=1` (clamped;
    /// injected so that callers and tests decide the randomness).
    pub fn next_delay(&self, attempt: u32, jitter_unit: f64) -> Duration {
        if attempt == 0 {
            return Duration::ZERO;
        }
        let factor = 1u32.checked_shl(attempt - 1).unwrap_or(u32::MAX);
        let step = self.base.saturating_mul(factor).min(self.cap);
        let jitter = if jitter_unit.is_finite() {
            jitter_unit.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let half = step / 2;
        (half + (step - half).mul_f64(jitter)).min(step)
    }

    /// Whether to try again after `outcome`, given the attempts made so far (this one
    /// included) and the time since the first attempt.
    pub fn should_retry(
        &self,
        outcome: &AttemptOutcome,
        attempts_so_far: u32,
        age: Duration,
    ) -> bool {
        outcome.is_retryable() && attempts_so_far < self.max_attempts && age < self.max_age
    }

    /// [`Self::should_retry`] and [`Self::next_delay`] together: the wait before the next
    /// attempt, or `None` when the delivery is over (including when that wait would end
    /// past `max_age`).
    pub fn plan_next(
        &self,
        outcome: &AttemptOutcome,
        attempts_so_far: u32,
        age: Duration,
        jitter_unit: f64,
    ) -> Option<Duration> {
        if !self.should_retry(outcome, attempts_so_far, age) {
            return None;
        }
        let delay = self.next_delay(attempts_so_far, jitter_unit);
        (age.saturating_add(delay) < self.max_age).then_some(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn forbidden_addresses_by_category() {
        let forbidden = [
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "this network"),
            ("127.0.0.1", "loopback"),
            ("127.255.0.9", "loopback"),
            ("10.0.0.1", "private"),
            ("10.255.255.255", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.254", "private"),
            ("192.168.1.1", "private"),
            ("169.254.0.1", "link-local"),
            ("169.254.169.254", "metadata"),
            ("168.63.129.16", "azure platform"),
            ("100.64.0.1", "cgnat"),
            ("100.127.255.255", "cgnat"),
            ("100.100.100.200", "alibaba metadata"),
            ("255.255.255.255", "broadcast"),
            ("240.0.0.1", "reserved"),
            ("224.0.0.1", "multicast"),
            ("239.255.255.250", "multicast"),
            ("192.0.2.10", "documentation"),
            ("198.51.100.7", "documentation"),
            ("203.0.113.99", "documentation"),
            ("198.18.0.1", "benchmarking"),
            ("192.0.0.170", "ietf"),
            ("::", "unspecified v6"),
            ("::1", "loopback v6"),
            ("fc00::1", "unique local"),
            ("fd12:3456::1", "unique local"),
            ("fd00:ec2::254", "aws metadata v6"),
            ("fe80::1", "link-local v6"),
            ("febf::1", "link-local v6"),
            ("fec0::1", "site-local"),
            ("ff02::1", "multicast v6"),
            ("2001:db8::1", "documentation v6"),
            ("3fff::1", "documentation v6"),
            ("2001::1", "teredo"),
            ("2002:a00:1::1", "6to4"),
            ("100::1", "discard"),
            ("::ffff:127.0.0.1", "mapped loopback"),
            ("::ffff:10.1.2.3", "mapped private"),
            ("::ffff:169.254.169.254", "mapped metadata"),
            ("::ffff:0.0.0.0", "mapped unspecified"),
            ("::127.0.0.1", "ipv4-compatible"),
            ("64:ff9b::10.0.0.1", "nat64 of private"),
            ("64:ff9b::169.254.169.254", "nat64 of metadata"),
            ("64:ff9b:1::1", "local nat64"),
        ];
        for (a, why) in forbidden {
            assert!(is_forbidden_ip(ip(a)), "{a} ({why}) should be forbidden");
        }
        let allowed = [
            "8.8.8.8",
            "1.1.1.1",
            "93.184.216.34",
            "172.15.255.255",
            "172.32.0.1",
            "100.63.255.255",
            "100.128.0.1",
            "169.253.255.255",
            "192.169.0.1",
            "223.255.255.254",
            "2606:4700::1111",
            "2001:4860:4860::8888",
            "::ffff:8.8.8.8",
            "64:ff9b::8.8.8.8",
        ];
        for a in allowed {
            assert!(!is_forbidden_ip(ip(a)), "{a} should be allowed");
        }
    }

    #[test]
    fn loopback_detection_includes_mapped_form() {
        assert!(is_loopback_ip(ip("127.0.0.1")));
        assert!(is_loopback_ip(ip("127.9.9.9")));
        assert!(is_loopback_ip(ip("::1")));
        assert!(is_loopback_ip(ip("::ffff:127.0.0.1")));
        assert!(!is_loopback_ip(ip("10.0.0.1")));
        assert!(!is_loopback_ip(ip("0.0.0.0")));
    }

    fn strict() -> UrlPolicy {
        UrlPolicy::default()
    }

    fn dev() -> UrlPolicy {
        UrlPolicy {
            allowed_hosts: vec![],
            allow_insecure_localhost: true,
        }
    }

    fn target(url: &str) -> CallbackTarget {
        CallbackTarget::post(url)
    }

    #[test]
    fn https_public_targets_are_accepted() {
        let t = validate_target(&target("https://hooks.example.com/cb?x=1#frag"), &strict())
            .expect("valid");
        assert_eq!(t.host(), &TargetHost::Name("hooks.example.com".into()));
        assert_eq!(t.port(), 443);
        assert_eq!(t.method(), "POST");
        assert_eq!(t.url().as_str(), "https://hooks.example.com/cb?x=1");
        assert_eq!(t.redacted_url(), "https://hooks.example.com/cb?<redacted>");
        let t = validate_target(&target("https://8.8.8.8:8443/"), &strict()).expect("valid");
        assert_eq!(t.host(), &TargetHost::Ip(ip("8.8.8.8")));
        assert_eq!(t.port(), 8443);
        assert!(validate_target(&target("https://[2606:4700::1111]/"), &strict()).is_ok());
    }

    #[test]
    fn plain_http_and_other_schemes_are_refused() {
        for u in [
            "http://hooks.example.com/",
            "http://8.8.8.8/",
            "ftp://hooks.example.com/",
            "file:///etc/passwd",
            "gopher://127.0.0.1:6379/",
        ] {
            let e = validate_target(&target(u), &strict()).expect_err(u);
            assert!(
                matches!(e, CallbackError::SchemeNotAllowed { .. })
                    || matches!(e, CallbackError::MissingHost),
                "{u}: {e}"
            );
        }
        // Even the development flag allows plain http to loopback hosts only.
        let e = validate_target(&target("http://hooks.example.com/"), &dev()).expect_err("http");
        assert!(matches!(e, CallbackError::SchemeNotAllowed { .. }), "{e}");
        let e = validate_target(&target("http://169.254.169.254/latest/meta-data"), &dev())
            .expect_err("metadata");
        assert!(matches!(e, CallbackError::SchemeNotAllowed { .. }), "{e}");
        assert!(e.to_string().contains("https"), "{e}");
    }

    #[test]
    fn literal_forbidden_addresses_are_refused() {
        for u in [
            "https://127.0.0.1/",
            "https://10.1.2.3/",
            "https://192.168.0.10:8443/x",
            "https://172.20.0.1/",
            "https://169.254.169.254/latest/meta-data",
            "https://[::1]/",
            "https://[fd00:ec2::254]/",
            "https://[::ffff:169.254.169.254]/",
            "https://[fe80::1]/",
            "https://0.0.0.0/",
            // The WHATWG parser normalises these spellings of 127.0.0.1.
            "https://2130706433/",
            "https://0x7f.1/",
            "https://127.1/",
        ] {
            let e = validate_target(&target(u), &strict()).expect_err(u);
            assert!(
                matches!(e, CallbackError::ForbiddenAddress { .. }),
                "{u}: {e}"
            );
        }
        // Loopback is tolerated in development, metadata never.
        assert!(validate_target(&target("https://127.0.0.1:9/"), &dev()).is_ok());
        assert!(validate_target(&target("http://127.0.0.1:9/"), &dev()).is_ok());
        assert!(validate_target(&target("http://[::1]:9/"), &dev()).is_ok());
        let e = validate_target(&target("https://169.254.169.254/"), &dev()).expect_err("meta");
        assert!(matches!(e, CallbackError::ForbiddenAddress { .. }), "{e}");
    }

    #[test]
    fn user_info_and_malformed_urls_are_refused() {
        for u in [
            "https://user:pw@hooks.example.com/",
            "https://user@hooks.example.com/",
            "https://:pw@hooks.example.com/",
        ] {
            assert_eq!(
                validate_target(&target(u), &strict()),
                Err(CallbackError::UserInfo),
                "{u}"
            );
        }
        for u in [
            "",
            "not a url",
            "https://",
            "/relative/path",
            "https://exa mple.com/",
        ] {
            let e = validate_target(&target(u), &strict()).expect_err(u);
            assert!(
                matches!(e, CallbackError::InvalidUrl(_) | CallbackError::MissingHost),
                "{u}: {e}"
            );
        }
        let long = format!("https://hooks.example.com/{}", "a".repeat(MAX_URL_LEN));
        assert!(matches!(
            validate_target(&target(&long), &strict()),
            Err(CallbackError::InvalidUrl(_))
        ));
    }

    #[test]
    fn methods_are_checked_and_normalised() {
        let mut t = target("https://hooks.example.com/");
        for (m, want) in [
            ("", "POST"),
            ("post", "POST"),
            ("Put", "PUT"),
            ("PATCH", "PATCH"),
        ] {
            t.method = m.to_owned();
            assert_eq!(validate_target(&t, &strict()).expect(m).method(), want);
        }
        for m in ["GET", "DELETE", "CONNECT", "PO ST"] {
            t.method = m.to_owned();
            assert!(matches!(
                validate_target(&t, &strict()),
                Err(CallbackError::InvalidMethod(_))
            ));
        }
    }

    #[test]
    fn headers_are_sane_and_cannot_override_the_sender() {
        let with = |k: &str, v: &str| {
            let mut t = target("https://hooks.example.com/");
            t.headers.insert(k.to_owned(), v.to_owned());
            validate_target(&t, &strict())
        };
        let ok = with("Authorization", "Bearer abc").expect("ok");
        assert_eq!(
            ok.headers(),
            &[("authorization".to_owned(), "Bearer abc".to_owned())]
        );
        for (k, v) in [
            ("x-a", "one\r\nInjected: yes"),
            ("x-a", "line\nbreak"),
            ("x-a\r\nInjected", "v"),
        ] {
            let e = with(k, v).expect_err(k);
            assert!(e.to_string().contains("cr or lf"), "{e}");
        }
        for (k, v) in [
            ("bad name", "v"),
            ("x-a", "nul\0"),
            ("x-a", "café"),
            ("", "v"),
        ] {
            assert!(
                matches!(with(k, v), Err(CallbackError::InvalidHeader { .. })),
                "{k:?}"
            );
        }
        for k in [
            "Host",
            "content-length",
            "Content-Type",
            "Transfer-Encoding",
            "webhook-id",
            "Webhook-Signature",
            "webhook-timestamp",
            "webhook-anything",
        ] {
            assert!(
                matches!(with(k, "v"), Err(CallbackError::ReservedHeader(_))),
                "{k}"
            );
        }
        let mut t = target("https://hooks.example.com/");
        t.headers.insert("X-A".into(), "1".into());
        t.headers.insert("x-a".into(), "2".into());
        assert!(matches!(
            validate_target(&t, &strict()),
            Err(CallbackError::InvalidHeader { .. })
        ));
        let mut t = target("https://hooks.example.com/");
        for i in 0..=MAX_HEADERS {
            t.headers.insert(format!("x-{i}"), "v".into());
        }
        assert!(matches!(
            validate_target(&t, &strict()),
            Err(CallbackError::TooManyHeaders(_))
        ));
    }

    #[test]
    fn errors_never_echo_header_values() {
        let mut t = target("https://hooks.example.com/");
        t.headers
            .insert("authorization".into(), "Bearer s3cr3t\r\nx: y".into());
        let e = validate_target(&t, &strict()).expect_err("crlf");
        assert!(!e.to_string().contains("s3cr3t"), "{e}");
        assert!(!format!("{t:?}").contains("s3cr3t"));
        let t = target("https://hooks.example.com/cb?token=s3cr3t");
        assert!(!format!("{t:?}").contains("s3cr3t"));
        let v = validate_target(&t, &strict()).expect("valid");
        assert!(!format!("{v:?}").contains("s3cr3t"));
    }

    #[test]
    fn resolved_addresses_are_checked_against_the_rule() {
        let t = validate_target(&target("https://hooks.example.com/"), &strict()).expect("ok");
        assert!(t.check_addresses(&[ip("93.184.216.34")]).is_ok());
        assert!(t
            .check_addresses(&[ip("2606:4700::1111"), ip("8.8.8.8")])
            .is_ok());
        // One bad address among good ones is enough to refuse.
        let e = t
            .check_addresses(&[ip("8.8.8.8"), ip("10.0.0.5")])
            .expect_err("mixed");
        assert_eq!(
            e,
            CallbackError::ForbiddenAddress {
                host: "hooks.example.com".into(),
                addr: ip("10.0.0.5")
            }
        );
        assert!(t.check_addresses(&[ip("127.0.0.1")]).is_err());
        assert!(matches!(
            t.check_addresses(&[]),
            Err(CallbackError::Resolve { .. })
        ));
        // Development: https names may resolve to loopback; plain http must.
        let t = validate_target(&target("https://hooks.example.com/"), &dev()).expect("ok");
        assert!(t.check_addresses(&[ip("127.0.0.1"), ip("::1")]).is_ok());
        assert!(t.check_addresses(&[ip("169.254.169.254")]).is_err());
        let t = validate_target(&target("http://localhost:8080/"), &dev()).expect("ok");
        assert!(t.check_addresses(&[ip("127.0.0.1"), ip("::1")]).is_ok());
        assert!(matches!(
            t.check_addresses(&[ip("127.0.0.1"), ip("8.8.8.8")]),
            Err(CallbackError::NotLoopback { .. })
        ));
        assert!(validate_target(&target("http://cb.localhost/"), &dev()).is_ok());
        assert!(validate_target(&target("http://localhost/"), &strict()).is_err());
    }

    #[test]
    fn allowed_hosts_skip_the_address_check_but_not_https() {
        let policy = UrlPolicy {
            allowed_hosts: UrlPolicy::parse_hosts(" Hooks.Internal. , 10.0.0.9,[fd00::9]"),
            allow_insecure_localhost: false,
        };
        assert_eq!(
            policy.allowed_hosts,
            vec!["hooks.internal", "10.0.0.9", "[fd00::9]"]
        );
        let t = validate_target(&target("https://hooks.internal/cb"), &policy).expect("ok");
        assert!(t.check_addresses(&[ip("10.1.1.1")]).is_ok());
        assert!(validate_target(&target("https://HOOKS.INTERNAL./cb"), &policy).is_ok());
        assert!(validate_target(&target("https://10.0.0.9/"), &policy).is_ok());
        assert!(validate_target(&target("https://[fd00::9]/"), &policy).is_ok());
        assert!(validate_target(&target("https://10.0.0.8/"), &policy).is_err());
        assert!(validate_target(&target("https://other.internal/"), &policy)
            .and_then(|t| t.check_addresses(&[ip("10.1.1.1")]))
            .is_err());
        assert!(matches!(
            validate_target(&target("http://hooks.internal/"), &policy),
            Err(CallbackError::SchemeNotAllowed { .. })
        ));
    }

    #[test]
    fn targets_decode_strictly_with_post_by_default() {
        let t: CallbackTarget =
            serde_json::from_str(r#"{"url":"https://h.example/"}"#).expect("decode");
        assert_eq!(t, CallbackTarget::post("https://h.example/"));
        assert!(serde_json::from_str::<CallbackTarget>(r#"{"url":"u","extra":1}"#).is_err());
    }

    const SPEC_SECRET: &[u8] = b"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SPEC_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SPEC_TS: i64 = 1_614_265_330;
    const SPEC_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SPEC_SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn sign_matches_the_standard_webhooks_test_vector() {
        assert_eq!(sign(SPEC_SECRET, SPEC_ID, SPEC_TS, SPEC_BODY), SPEC_SIG);
        // The same key given as raw bytes signs the same.
        let raw = decode_secret(SPEC_SECRET).expect("base64");
        assert_eq!(raw.len(), 24);
        assert_eq!(sign(&raw, SPEC_ID, SPEC_TS, SPEC_BODY), SPEC_SIG);
    }

    #[test]
    fn signatures_verify_and_detect_tampering() {
        let header = format!("v1,bm90IGl0 {SPEC_SIG}");
        assert!(verify_signature(
            SPEC_SECRET,
            SPEC_ID,
            SPEC_TS,
            SPEC_BODY,
            &header
        ));
        assert!(!verify_signature(
            SPEC_SECRET,
            SPEC_ID,
            SPEC_TS + 1,
            SPEC_BODY,
            SPEC_SIG
        ));
        assert!(!verify_signature(
            SPEC_SECRET,
            "msg_other",
            SPEC_TS,
            SPEC_BODY,
            SPEC_SIG
        ));
        assert!(!verify_signature(
            SPEC_SECRET,
            SPEC_ID,
            SPEC_TS,
            b"{}",
            SPEC_SIG
        ));
        assert!(!verify_signature(
            b"other", SPEC_ID, SPEC_TS, SPEC_BODY, SPEC_SIG
        ));
        assert_ne!(sign(b"a", "id", 1, b"x"), sign(b"b", "id", 1, b"x"));
    }

    #[test]
    fn secrets_decode_or_fall_back_to_raw_bytes() {
        assert_eq!(decode_secret(b"plain").expect("raw"), b"plain".to_vec());
        assert_eq!(decode_secret(b"whsec_aGk=").expect("b64"), b"hi".to_vec());
        assert_eq!(
            decode_secret(b"whsec_aGk").expect("unpadded"),
            b"hi".to_vec()
        );
        assert_eq!(
            decode_secret(b"whsec_!!"),
            Err(CallbackError::InvalidSecret)
        );
        // The documented fallback: an undecodable whsec_ secret signs as raw bytes.
        assert_eq!(sign(b"whsec_!!", "i", 1, b"b"), {
            let tag = mac(b"whsec_!!", "i", 1, b"b").finalize().into_bytes();
            format!(
                "v1,{}",
                base64::engine::general_purpose::STANDARD.encode(tag)
            )
        });
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn delays_grow_exponentially_and_are_capped() {
        let p = RetryPolicy::default();
        assert_eq!(p.next_delay(0, 1.0), Duration::ZERO);
        let full: Vec<_> = (1..=12).map(|a| p.next_delay(a, 1.0)).collect();
        assert_eq!(
            full,
            [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300].map(secs)
        );
        let low: Vec<_> = (1..=4).map(|a| p.next_delay(a, 0.0)).collect();
        assert_eq!(
            low,
            vec![Duration::from_millis(500), secs(1), secs(2), secs(4)]
        );
        assert_eq!(p.next_delay(u32::MAX, 1.0), secs(300));
        assert_eq!(p.next_delay(40, 0.5), secs(225));
        // Out-of-range jitter is clamped rather than trusted.
        assert_eq!(p.next_delay(3, 7.0), secs(4));
        assert_eq!(p.next_delay(3, -1.0), secs(2));
        assert_eq!(p.next_delay(3, f64::NAN), secs(2));
    }

    #[test]
    fn retries_follow_status_attempts_and_age() {
        let p = RetryPolicy::default();
        let young = secs(10);
        for status in [500, 502, 503, 504, 429] {
            assert!(
                p.should_retry(&AttemptOutcome::HttpError { status }, 1, young),
                "{status}"
            );
        }
        assert!(p.should_retry(&AttemptOutcome::NetworkError("reset".into()), 1, young));
        for status in [400, 401, 403, 404, 410, 422, 302, 301] {
            assert!(
                !p.should_retry(&AttemptOutcome::HttpError { status }, 1, young),
                "{status}"
            );
        }
        assert!(!p.should_retry(&AttemptOutcome::Delivered { status: 200 }, 1, young));
        assert!(!p.should_retry(&AttemptOutcome::Refused("ssrf".into()), 1, young));
        let busy = AttemptOutcome::HttpError { status: 503 };
        assert!(p.should_retry(&busy, 7, young));
        assert!(!p.should_retry(&busy, 8, young));
        assert!(!p.should_retry(&busy, 1, secs(24 * 3600)));
        assert!(p.should_retry(&busy, 1, secs(24 * 3600 - 1)));
        assert_eq!(p.plan_next(&busy, 1, young, 1.0), Some(secs(1)));
        assert_eq!(p.plan_next(&busy, 3, young, 1.0), Some(secs(4)));
        assert_eq!(p.plan_next(&busy, 8, young, 1.0), None);
        // A wait that would end past the maximum age is not planned.
        assert_eq!(p.plan_next(&busy, 7, secs(24 * 3600 - 10), 1.0), None);
        assert_eq!(
            p.plan_next(&AttemptOutcome::Delivered { status: 204 }, 1, young, 0.0),
            None
        );
    }

    #[test]
    fn attempt_records_serialize_their_outcome() {
        let at = DateTime::parse_from_rfc3339("2024-01-02T03:04:05Z")
            .expect("time")
            .with_timezone(&Utc);
        let r = AttemptRecord::new(2, at, &AttemptOutcome::HttpError { status: 503 });
        let v = serde_json::to_value(&r).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"attempt":2,"at":"2024-01-02T03:04:05.000Z","outcome":"http_error","status":503,"error":null})
        );
        let back: AttemptRecord = serde_json::from_value(v).expect("decode");
        assert_eq!(back, r);
        let r = AttemptRecord::new(1, at, &AttemptOutcome::NetworkError("timed out".into()));
        assert_eq!(
            (r.outcome.as_str(), r.status, r.error.as_deref()),
            ("network_error", None, Some("timed out"))
        );
        let r = AttemptRecord::new(1, at, &AttemptOutcome::Refused("no".into()));
        assert_eq!(r.outcome, "refused");
        let r = AttemptRecord::new(3, at, &AttemptOutcome::Delivered { status: 200 });
        assert_eq!((r.outcome.as_str(), r.status), ("delivered", Some(200)));
    }

    proptest! {
        #[test]
        fn delays_stay_within_jitter_bounds(attempt in 1u32..64, j in 0.0f64..=1.0) {
            let p = RetryPolicy::default();
            let d = p.next_delay(attempt, j);
            let step = p.next_delay(attempt, 1.0);
            prop_assert!(d <= p.cap);
            prop_assert!(d <= step);
            prop_assert!(d >= step / 2);
            prop_assert!(p.next_delay(attempt + 1, j) >= d);
        }

        #[test]
        fn mapped_addresses_judge_like_their_ipv4(a: u8, b: u8, c: u8, d: u8) {
            let v4 = Ipv4Addr::new(a, b, c, d);
            prop_assert_eq!(
                is_forbidden_ip(IpAddr::V6(v4.to_ipv6_mapped())),
                is_forbidden_ip(IpAddr::V4(v4))
            );
        }
    }
}
