//! Typed configuration, read once from the environment (or a map, in tests).
//! Every variable is documented in the README's configuration table.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::adapters::etcd::EtcdSettings;

/// A configuration problem, naming the variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A variable has a value that cannot be used.
    #[error("{var}: {reason}")]
    Invalid {
        /// The variable.
        var: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A config file could not be read or parsed.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// A string that never appears in logs or `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    /// The secret itself; call only where it is used.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The service configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listen address.
    pub host: String,
    /// Listen port (`APP_PORT`).
    pub port: u16,
    /// In-memory adapters (`USE_MOCK_ADAPTERS`, default true) or etcd.
    pub use_mock_adapters: bool,
    /// etcd connection (used when `use_mock_adapters` is false).
    pub etcd: EtcdSettings,
    /// Allowed `{env}` path values, lowercase (`RM_ENVS`).
    pub envs: Vec<String>,
    /// How long idempotency records are kept (`IDEMPOTENCY_TTL_SECONDS`).
    pub idempotency_ttl: Duration,
    /// Bearer token required on `/api/` when set (`API_AUTH_TOKEN`).
    pub api_token: Option<Secret>,
    /// Seconds a losing PROCURE is told to wait (`PROCURE_RETRY_DELAY_SECONDS`).
    pub procure_retry_delay: u64,
    /// Seconds sent in `Retry-After` when the store is unavailable (`RETRY_AFTER_SECONDS`).
    pub retry_after: u64,
    /// Shadow deployables seeded at start-up (`SHADOW_SEED_FILE`; empty disables).
    pub seed_file: Option<PathBuf>,
    /// Whether `seed_file` was set explicitly (a missing explicit file is an error).
    pub seed_file_explicit: bool,
    /// HTTP worker threads (`HTTP_WORKERS`).
    pub http_workers: usize,
    /// Threads the entity actors are spread over (`ACTOR_THREADS`).
    pub actor_threads: usize,
    /// Log format (`LOG_FORMAT`: text|json).
    pub log_format: LogFormat,
}

/// Default seed file, relative to the working directory.
pub const DEFAULT_SEED_FILE: &str = "config/shadow-deployables.yaml";

impl Config {
    /// Reads the process environment.
    pub fn from_process_env() -> Result<Self, ConfigError> {
        Self::from_map(&std::env::vars().collect())
    }

    /// Reads a map of variables (tests pass their own).
    pub fn from_map(env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let get = |k: &str| env.get(k).map(|v| v.trim().to_owned());
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        let endpoints = match get("ETCD_ENDPOINTS").filter(|s| !s.is_empty()) {
            Some(list) => list
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
            None => {
                let host = get("ETCD_HOST").unwrap_or_else(|| "127.0.0.1".into());
                let port: u16 = parse(env, "ETCD_PORT", 2379)?;
                vec![format!("{host}:{port}")]
            }
        };
        let user = get("ETCD_USERNAME").filter(|s| !s.is_empty());
        let password = env.get("ETCD_PASSWORD").cloned().unwrap_or_default();
        let prefix = get("ETCD_PREFIX").unwrap_or_default();
        if prefix.ends_with('/') {
            return Err(invalid("ETCD_PREFIX", "must not end with '/'"));
        }
        let envs: Vec<String> = get("RM_ENVS")
            .unwrap_or_else(|| "int,prod".into())
            .split(',')
            .map(|s| s.trim().to_lowercase())
            .filter(|s| !s.is_empty())
            .collect();
        if envs.is_empty() {
            return Err(invalid("RM_ENVS", "must list at least one environment"));
        }
        if let Some(bad) = envs.iter().find(|e| !valid_segment(e)) {
            return Err(invalid(
                "RM_ENVS",
                &format!("{bad:?} is not a valid environment name"),
            ));
        }
        let (seed_file, seed_file_explicit) = match env.get("SHADOW_SEED_FILE") {
            Some(p) if p.trim().is_empty() => (None, true),
            Some(p) => (Some(PathBuf::from(p.trim())), true),
            None => (Some(PathBuf::from(DEFAULT_SEED_FILE)), false),
        };
        let log_format = match get("LOG_FORMAT").as_deref() {
            None | Some("") | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(invalid(
                    "LOG_FORMAT",
                    &format!("{other:?} is not text or json"),
                ))
            }
        };
        let ttl: u64 = parse(env, "IDEMPOTENCY_TTL_SECONDS", 86_400)?;
        if ttl == 0 {
            return Err(invalid("IDEMPOTENCY_TTL_SECONDS", "must be positive"));
        }
        let cfg = Self {
            host: get("APP_HOST").unwrap_or_else(|| "0.0.0.0".into()),
            port: parse(env, "APP_PORT", 8080)?,
            use_mock_adapters: parse_bool(env, "USE_MOCK_ADAPTERS", true)?,
            etcd: EtcdSettings {
                endpoints,
                prefix,
                auth: user.map(|u| (u, password)),
                dial_timeout: Duration::from_millis(parse(env, "ETCD_DIAL_TIMEOUT_MS", 2_000)?),
                request_timeout: Duration::from_millis(parse(
                    env,
                    "ETCD_REQUEST_TIMEOUT_MS",
                    3_000,
                )?),
            },
            envs,
            idempotency_ttl: Duration::from_secs(ttl),
            api_token: get("API_AUTH_TOKEN")
                .filter(|s| !s.is_empty())
                .map(Secret::new),
            procure_retry_delay: parse(env, "PROCURE_RETRY_DELAY_SECONDS", 300)?,
            retry_after: parse(env, "RETRY_AFTER_SECONDS", 2)?,
            seed_file,
            seed_file_explicit,
            http_workers: parse(env, "HTTP_WORKERS", cpus)?.max(1),
            actor_threads: parse(env, "ACTOR_THREADS", cpus)?.max(1),
            log_format,
        };
        Ok(cfg)
    }

    /// Defaults with the in-memory store, no seed file: the base for tests.
    pub fn for_tests() -> Self {
        let mut env = HashMap::new();
        env.insert("SHADOW_SEED_FILE".to_owned(), String::new());
        env.insert("ACTOR_THREADS".to_owned(), "2".to_owned());
        // Only fails if the defaults themselves are invalid, which a unit test guards.
        Self::from_map(&env).unwrap_or_else(|e| panic!("default config is invalid: {e}"))
    }

    /// Whether `env` (any case) is served; returns its canonical lowercase form.
    pub fn canonical_env(&self, env: &str) -> Option<String> {
        let lower = env.to_lowercase();
        self.envs.contains(&lower).then_some(lower)
    }
}

/// Whether `s` can be one path segment of an etcd key.
pub fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && s != "."
        && s != ".."
}

fn invalid(var: &str, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        var: var.to_owned(),
        reason: reason.to_owned(),
    }
}

fn parse<T: std::str::FromStr>(
    env: &HashMap<String, String>,
    var: &str,
    default: T,
) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    match env.get(var).map(|v| v.trim()).filter(|v| !v.is_empty()) {
        None => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|e| invalid(var, &format!("{v:?} is not valid: {e}"))),
    }
}

fn parse_bool(
    env: &HashMap<String, String>,
    var: &str,
    default: bool,
) -> Result<bool, ConfigError> {
    match env
        .get(var)
        .map(|v| v.trim().to_lowercase())
        .filter(|v| !v.is_empty())
        .as_deref()
    {
        None => Ok(default),
        Some("true" | "1" | "yes") => Ok(true),
        Some("false" | "0" | "no") => Ok(false),
        Some(other) => Err(invalid(var, &format!("{other:?} is not true or false"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_are_the_embedded_mode() {
        let c = Config::from_map(&HashMap::new()).expect("defaults");
        assert!(c.use_mock_adapters);
        assert_eq!(c.port, 8080);
        assert_eq!(c.envs, vec!["int", "prod"]);
        assert_eq!(c.etcd.endpoints, vec!["127.0.0.1:2379"]);
        assert_eq!(c.idempotency_ttl, Duration::from_secs(86_400));
        let _ = Config::for_tests();
    }

    #[test]
    fn endpoints_and_envs_are_parsed() {
        let c = Config::from_map(&map(&[
            ("ETCD_ENDPOINTS", "a:1, b:2"),
            ("RM_ENVS", "INT, Stage"),
            ("USE_MOCK_ADAPTERS", "false"),
        ]))
        .expect("config");
        assert_eq!(c.etcd.endpoints, vec!["a:1", "b:2"]);
        assert_eq!(c.envs, vec!["int", "stage"]);
        assert!(!c.use_mock_adapters);
        assert_eq!(c.canonical_env("STAGE").as_deref(), Some("stage"));
        assert_eq!(c.canonical_env("dev"), None);
        let c = Config::from_map(&map(&[("ETCD_HOST", "h"), ("ETCD_PORT", "9")])).expect("cfg");
        assert_eq!(c.etcd.endpoints, vec!["h:9"]);
    }

    #[test]
    fn bad_values_name_the_variable() {
        let e = Config::from_map(&map(&[("APP_PORT", "eighty")])).expect_err("bad port");
        assert!(e.to_string().starts_with("APP_PORT:"), "{e}");
        let e = Config::from_map(&map(&[("USE_MOCK_ADAPTERS", "maybe")])).expect_err("bad bool");
        assert!(e.to_string().starts_with("USE_MOCK_ADAPTERS:"), "{e}");
        let e = Config::from_map(&map(&[("RM_ENVS", "a/b")])).expect_err("bad env");
        assert!(e.to_string().starts_with("RM_ENVS:"), "{e}");
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let c = Config::from_map(&map(&[
            ("API_AUTH_TOKEN", "tok-123"),
            ("ETCD_USERNAME", "u"),
            ("ETCD_PASSWORD", "pw-456"),
        ]))
        .expect("config");
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("tok-123") && !dbg.contains("pw-456"), "{dbg}");
    }
}
