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
    /// Group commit of etcd transactions (`ETCD_GROUP_COMMIT`, `ETCD_MAX_TXN_OPS`,
    /// `ETCD_MAX_TXN_BYTES`).
    pub group_commit: GroupCommitSettings,
    /// Use the simulated Kubernetes cluster (`KUBE_ADAPTER=sim|kube`; default `sim` when
    /// `USE_MOCK_ADAPTERS` is true, `kube` otherwise).
    pub sim_kube: bool,
    /// Use the simulated cloud (`CLOUD_ADAPTER=sim|ec2`; default like `KUBE_ADAPTER`).
    pub sim_cloud: bool,
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
    /// Threads the entity actors not started by a request are spread over
    /// (`ACTOR_THREADS`).
    pub actor_threads: usize,
    /// How long a request waits for an entity actor's answer before it gets 503
    /// (`ACTOR_SEND_TIMEOUT_MS`).
    pub actor_send_timeout: Duration,
    /// Log format (`LOG_FORMAT`: text|json).
    pub log_format: LogFormat,
    /// Resource Controller settings.
    pub controller: ControllerSettings,
    /// Asynchronous operations (Kubernetes, watch intents, callbacks).
    pub operations: OperationsSettings,
    /// Worker agent (`WORKER_AGENT`) and CML client settings.
    pub agent: AgentSettings,
    /// The change stream (`GET /api/1.0/events`).
    pub events: EventsSettings,
    /// OpenTelemetry trace export; `None` (the default) when neither
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` nor `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set.
    pub traces: Option<TracesSettings>,
}

/// The change stream's limits (`EVENTS_HEARTBEAT_SECONDS`, `EVENTS_CLIENT_BUFFER`,
/// `EVENTS_MAX_CLIENTS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventsSettings {
    /// Period of the `: keep-alive` comment (`EVENTS_HEARTBEAT_SECONDS`, default 15).
    pub heartbeat: Duration,
    /// Store revisions queued per subscriber before it is closed with `overflow`
    /// (`EVENTS_CLIENT_BUFFER`, default 1024).
    pub client_buffer: usize,
    /// Subscribers open at once on this replica; more get 503 (`EVENTS_MAX_CLIENTS`,
    /// default 256).
    pub max_clients: usize,
}

impl Default for EventsSettings {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(15),
            client_buffer: 1024,
            max_clients: 256,
        }
    }
}

impl EventsSettings {
    fn from_map(env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let d = Self::default();
        let heartbeat: u64 = parse(env, "EVENTS_HEARTBEAT_SECONDS", d.heartbeat.as_secs())?;
        if heartbeat == 0 {
            return Err(invalid("EVENTS_HEARTBEAT_SECONDS", "must be positive"));
        }
        let client_buffer: usize = parse(env, "EVENTS_CLIENT_BUFFER", d.client_buffer)?;
        if client_buffer == 0 {
            return Err(invalid("EVENTS_CLIENT_BUFFER", "must be at least 1"));
        }
        Ok(Self {
            heartbeat: Duration::from_secs(heartbeat),
            client_buffer,
            max_clients: parse(env, "EVENTS_MAX_CLIENTS", d.max_clients)?,
        })
    }
}

/// OTLP/HTTP (protobuf) trace export (`src/otel.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TracesSettings {
    /// Full URL spans are POSTed to: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` as given, or
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` with `/v1/traces` appended (the OTLP spec's rule).
    pub endpoint: Secret,
    /// `service.name` of the exported resource (`OTEL_SERVICE_NAME`).
    pub service_name: String,
    /// Extra request headers (`OTEL_EXPORTER_OTLP_HEADERS`, `k1=v1,k2=v2`); may hold
    /// credentials, so only their names are ever shown.
    pub headers: Vec<(String, Secret)>,
    /// Delay between two batch exports (`OTEL_BSP_SCHEDULE_DELAY`, milliseconds).
    pub schedule_delay: Duration,
}

impl TracesSettings {
    fn from_map(env: &HashMap<String, String>) -> Result<Option<Self>, ConfigError> {
        let get = |k: &str| {
            env.get(k)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let endpoint = match (
            get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            get("OTEL_EXPORTER_OTLP_ENDPOINT"),
        ) {
            (Some(full), _) => ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", full),
            (None, Some(base)) => (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("{}/v1/traces", base.trim_end_matches('/')),
            ),
            (None, None) => return Ok(None),
        };
        let (var, endpoint) = endpoint;
        // The URL may carry credentials: the error names the variable, never the value.
        match url::Url::parse(&endpoint) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
            _ => return Err(invalid(var, "must be an http:// or https:// URL")),
        }
        let mut headers = Vec::new();
        for pair in get("OTEL_EXPORTER_OTLP_HEADERS")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            let Some((name, value)) = pair.split_once('=') else {
                return Err(invalid(
                    "OTEL_EXPORTER_OTLP_HEADERS",
                    "must be a comma-separated list of name=value",
                ));
            };
            let name = name.trim();
            let valid_name = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
            if !valid_name {
                return Err(invalid(
                    "OTEL_EXPORTER_OTLP_HEADERS",
                    "a header name is not a valid HTTP header name",
                ));
            }
            let value = value.trim();
            if value.bytes().any(|b| b < 0x20 || b == 0x7f) {
                return Err(invalid(
                    "OTEL_EXPORTER_OTLP_HEADERS",
                    &format!("the value of header {name:?} has control characters"),
                ));
            }
            headers.push((name.to_owned(), Secret::new(value)));
        }
        let service_name =
            get("OTEL_SERVICE_NAME").unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_owned());
        let schedule_delay = Duration::from_millis(parse(env, "OTEL_BSP_SCHEDULE_DELAY", 5_000)?);
        if schedule_delay.is_zero() {
            return Err(invalid("OTEL_BSP_SCHEDULE_DELAY", "must be positive"));
        }
        Ok(Some(Self {
            endpoint: Secret::new(endpoint),
            service_name,
            headers,
            schedule_delay,
        }))
    }
}

/// `service.name` when `OTEL_SERVICE_NAME` is unset.
pub const DEFAULT_SERVICE_NAME: &str = "resource-plane";

/// How concurrent etcd transactions share one etcd Txn (`adapters::group_commit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupCommitSettings {
    /// Whether transactions are grouped at all (`ETCD_GROUP_COMMIT`, default true).
    pub enabled: bool,
    /// Most compares, success ops or failure gets in one Txn (`ETCD_MAX_TXN_OPS`, default
    /// 128, etcd's `--max-txn-ops` default).
    pub max_ops: usize,
    /// Most estimated request bytes in one grouped Txn (`ETCD_MAX_TXN_BYTES`, default
    /// 1 MiB, below etcd's `--max-request-bytes` default of 1.5 MiB).
    pub max_bytes: usize,
}

impl Default for GroupCommitSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            max_ops: 128,
            max_bytes: 1 << 20,
        }
    }
}

impl GroupCommitSettings {
    fn from_map(env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let d = Self::default();
        let max_ops: usize = parse(env, "ETCD_MAX_TXN_OPS", d.max_ops)?;
        if max_ops == 0 {
            return Err(invalid("ETCD_MAX_TXN_OPS", "must be at least 1"));
        }
        let max_bytes: usize = parse(env, "ETCD_MAX_TXN_BYTES", d.max_bytes)?;
        if max_bytes < 1024 {
            return Err(invalid("ETCD_MAX_TXN_BYTES", "must be at least 1024"));
        }
        Ok(Self {
            enabled: parse_bool(env, "ETCD_GROUP_COMMIT", d.enabled)?,
            max_ops,
            max_bytes,
        })
    }
}

/// Settings of the Kubernetes-facing operations, watch intents and callbacks.
#[derive(Debug, Clone)]
pub struct OperationsSettings {
    /// How long an intent waits for its condition (`WATCH_TIMEOUT_SECONDS`).
    pub watch_timeout: Duration,
    /// How long a finished intent stays readable (`INTENT_RETENTION_SECONDS`).
    pub intent_retention: Duration,
    /// HMAC key for `webhook-signature` (`CALLBACK_SIGNING_SECRET`).
    pub callback_signing_secret: Option<Secret>,
    /// Delivery attempts in all (`CALLBACK_MAX_ATTEMPTS`).
    pub callback_max_attempts: u32,
    /// No attempt later than this after the first (`CALLBACK_MAX_AGE_SECONDS`).
    pub callback_max_age: Duration,
    /// Per-attempt timeout (`CALLBACK_TIMEOUT_MS`).
    pub callback_timeout: Duration,
    /// Hosts exempt from the address check (`CALLBACK_ALLOWED_HOSTS`).
    pub callback_allowed_hosts: Vec<String>,
    /// Allow loopback callbacks over http (`CALLBACK_ALLOW_INSECURE_LOCALHOST`).
    pub callback_allow_insecure_localhost: bool,
    /// Simulated cluster readiness delay (`SIM_KUBE_READY_DELAY_MS`).
    pub sim_kube_ready_delay: Duration,
    /// Namespace per environment (`KUBE_NAMESPACES=int=ns-int,prod=ns-prod`; default:
    /// the environment's name).
    pub kube_namespaces: std::collections::BTreeMap<String, String>,
    /// How often shadow deployables' minimum replicas are converged
    /// (`KUBE_CONVERGE_INTERVAL_MS`).
    pub converge_interval: Duration,
    /// Callback deliveries in flight at once, at most (`CALLBACK_CONCURRENCY`).
    pub callback_concurrency: usize,
    /// Timeouts of the Kubernetes client's request paths.
    pub kube_client: KubeClientSettings,
    /// How often the leader looks for expired hold leases (`LEASE_REAP_INTERVAL_MS`,
    /// default 1000).
    pub lease_reap_interval: Duration,
}

/// Timeouts of the Kubernetes client on request paths (actions and reads); the shared
/// watches keep no read timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KubeClientSettings {
    /// TCP/TLS connect (`KUBE_CONNECT_TIMEOUT_MS`, default 5000).
    pub connect_timeout: Duration,
    /// Waiting for the response (`KUBE_READ_TIMEOUT_MS`, default 30000).
    pub read_timeout: Duration,
    /// Sending the request (`KUBE_WRITE_TIMEOUT_MS`, default 30000).
    pub write_timeout: Duration,
}

impl OperationsSettings {
    /// The Kubernetes namespace of an environment.
    pub fn namespace(&self, env: &str) -> String {
        self.kube_namespaces
            .get(env)
            .cloned()
            .unwrap_or_else(|| env.to_owned())
    }
}

/// Resource Controller settings.
#[derive(Debug, Clone)]
pub struct ControllerSettings {
    /// This replica's id in the election (`CONTROLLER_INSTANCE_ID`, default generated).
    pub instance_id: String,
    /// Cluster id tagged on cloud instances (`CLUSTER_ID`).
    pub cluster_id: String,
    /// Leader lease TTL (`LEADER_LEASE_TTL`, seconds).
    pub leader_lease_ttl: Duration,
    /// Reconcile period (`RECONCILE_INTERVAL`, seconds).
    pub reconcile_interval: Duration,
    /// Scale-up batching window (`SCALE_UP_BATCH_MS`).
    pub scale_up_batch: Duration,
    /// Idle time before a worker drains (`SCALE_DOWN_IDLE_SECONDS`).
    pub scale_down_idle: Duration,
    /// How long a drain waits for the worker's instances before the worker is stopped
    /// anyway (`DRAIN_DEADLINE_SECONDS`); `None` (the default, also `0` or `none`): it
    /// waits until they complete, as the controller seed says.
    pub drain_deadline: Option<Duration>,
    /// Launch timeout (`PROVISION_TIMEOUT_SECONDS`).
    pub provision_timeout: Duration,
    /// Heartbeat timeout for workers that have sent one (`HEARTBEAT_TIMEOUT_SECONDS`).
    pub heartbeat_timeout: Duration,
    /// A cloud instance younger than this is never terminated as an orphan
    /// (`ORPHAN_GRACE_SECONDS`, default 300).
    pub orphan_grace: Duration,
    /// How often in-flight workers are checked with the cloud (`CLOUD_POLL_MS`).
    pub cloud_poll: Duration,
    /// Worker templates file (`WORKER_TEMPLATES_FILE`).
    pub templates_file: PathBuf,
    /// Whether `templates_file` was set explicitly.
    pub templates_file_explicit: bool,
    /// How long ended instances and terminated workers stay readable
    /// (`RECORD_RETENTION_SECONDS`).
    pub record_retention: Duration,
    /// Boot time of simulated cloud instances (`SIM_CLOUD_BOOT_MS`).
    pub sim_cloud_boot: Duration,
    /// AWS region (`AWS_REGION`, default us-east-1).
    pub aws_region: String,
    /// AWS endpoint override (`AWS_ENDPOINT_URL`).
    pub aws_endpoint_url: Option<String>,
}

/// Every environment variable the service reads (here and `RUST_LOG` in `telemetry.rs`);
/// `.env.example` lists exactly these with their defaults (a test compares both ways).
pub const VARIABLES: &[&str] = &[
    "ACTOR_SEND_TIMEOUT_MS",
    "ACTOR_THREADS",
    "API_AUTH_TOKEN",
    "APP_HOST",
    "APP_PORT",
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "CALLBACK_ALLOWED_HOSTS",
    "CALLBACK_ALLOW_INSECURE_LOCALHOST",
    "CALLBACK_CONCURRENCY",
    "CALLBACK_MAX_AGE_SECONDS",
    "CALLBACK_MAX_ATTEMPTS",
    "CALLBACK_SIGNING_SECRET",
    "CALLBACK_TIMEOUT_MS",
    "CLOUD_ADAPTER",
    "CLOUD_POLL_MS",
    "CLUSTER_ID",
    "CML_ALLOW_HTTP",
    "CML_CA_FILE",
    "CML_CONCURRENCY",
    "CML_INSECURE_SKIP_VERIFY",
    "CML_PASSWORD",
    "CML_REQUEST_TIMEOUT_MS",
    "CML_STOP_UNKNOWN_LABS",
    "CML_SYNC_INTERVAL_MS",
    "CML_URL_TEMPLATE",
    "CML_USERNAME",
    "CONTROLLER_INSTANCE_ID",
    "CONTROL_PLANE_API_URL",
    "DRAIN_DEADLINE_SECONDS",
    "ETCD_DIAL_TIMEOUT_MS",
    "ETCD_ENDPOINTS",
    "ETCD_GROUP_COMMIT",
    "ETCD_HOST",
    "ETCD_MAX_TXN_BYTES",
    "ETCD_MAX_TXN_OPS",
    "ETCD_PASSWORD",
    "ETCD_PORT",
    "ETCD_PREFIX",
    "ETCD_REQUEST_TIMEOUT_MS",
    "ETCD_USERNAME",
    "EVENTS_CLIENT_BUFFER",
    "EVENTS_HEARTBEAT_SECONDS",
    "EVENTS_MAX_CLIENTS",
    "HEARTBEAT_TIMEOUT_SECONDS",
    "HTTP_WORKERS",
    "IDEMPOTENCY_TTL_SECONDS",
    "INTENT_RETENTION_SECONDS",
    "KUBE_ADAPTER",
    "KUBE_CONNECT_TIMEOUT_MS",
    "KUBE_CONVERGE_INTERVAL_MS",
    "KUBE_NAMESPACES",
    "KUBE_READ_TIMEOUT_MS",
    "KUBE_WRITE_TIMEOUT_MS",
    "LEADER_LEASE_TTL",
    "LEASE_REAP_INTERVAL_MS",
    "LOG_FORMAT",
    "ORPHAN_GRACE_SECONDS",
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_SERVICE_NAME",
    "PROCURE_RETRY_DELAY_SECONDS",
    "PROVISION_TIMEOUT_SECONDS",
    "RECONCILE_INTERVAL",
    "RECORD_RETENTION_SECONDS",
    "RETRY_AFTER_SECONDS",
    "RM_ENVS",
    "RUST_LOG",
    "SCALE_DOWN_IDLE_SECONDS",
    "SCALE_UP_BATCH_MS",
    "SHADOW_SEED_FILE",
    "SIM_CLOUD_BOOT_MS",
    "SIM_KUBE_READY_DELAY_MS",
    "USE_MOCK_ADAPTERS",
    "WATCH_TIMEOUT_SECONDS",
    "WORKER_AGENT",
    "WORKER_TEMPLATES_FILE",
];

/// Default worker templates file, relative to the working directory.
pub const DEFAULT_TEMPLATES_FILE: &str = "config/worker-templates.yaml";

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
        let secs = |var: &str, default: u64| parse(env, var, default).map(Duration::from_secs);
        let millis = |var: &str, default: u64| parse(env, var, default).map(Duration::from_millis);
        let leader_lease_ttl = secs("LEADER_LEASE_TTL", 15)?;
        if leader_lease_ttl < Duration::from_secs(2) {
            return Err(invalid("LEADER_LEASE_TTL", "must be at least 2 seconds"));
        }
        let reconcile_interval = secs("RECONCILE_INTERVAL", 30)?;
        if reconcile_interval.is_zero() {
            return Err(invalid("RECONCILE_INTERVAL", "must be positive"));
        }
        let cloud_poll = millis("CLOUD_POLL_MS", 1_000)?;
        if cloud_poll.is_zero() {
            return Err(invalid("CLOUD_POLL_MS", "must be positive"));
        }
        let (templates_file, templates_file_explicit) = match get("WORKER_TEMPLATES_FILE") {
            Some(p) if !p.is_empty() => (PathBuf::from(p), true),
            _ => (PathBuf::from(DEFAULT_TEMPLATES_FILE), false),
        };
        let controller = ControllerSettings {
            instance_id: get("CONTROLLER_INSTANCE_ID")
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| format!("rp-{}", uuid::Uuid::new_v4().simple())),
            cluster_id: get("CLUSTER_ID")
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".into()),
            leader_lease_ttl,
            reconcile_interval,
            scale_up_batch: millis("SCALE_UP_BATCH_MS", 200)?,
            scale_down_idle: secs("SCALE_DOWN_IDLE_SECONDS", 600)?,
            drain_deadline: drain_deadline(get("DRAIN_DEADLINE_SECONDS"))?,
            provision_timeout: secs("PROVISION_TIMEOUT_SECONDS", 600)?,
            heartbeat_timeout: secs("HEARTBEAT_TIMEOUT_SECONDS", 120)?,
            orphan_grace: secs("ORPHAN_GRACE_SECONDS", 300)?,
            cloud_poll,
            templates_file,
            templates_file_explicit,
            record_retention: secs("RECORD_RETENTION_SECONDS", 7 * 86_400)?
                .max(Duration::from_secs(60)),
            sim_cloud_boot: millis("SIM_CLOUD_BOOT_MS", 2_000)?,
            aws_region: get("AWS_REGION")
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "us-east-1".into()),
            aws_endpoint_url: get("AWS_ENDPOINT_URL").filter(|s| !s.is_empty()),
        };
        let mut kube_namespaces = std::collections::BTreeMap::new();
        for pair in get("KUBE_NAMESPACES").unwrap_or_default().split(',') {
            let pair = pair.trim();
            if pair.is_empty() {
                continue;
            }
            let (env_name, ns) = pair
                .split_once('=')
                .ok_or_else(|| invalid("KUBE_NAMESPACES", "expected env=namespace pairs"))?;
            kube_namespaces.insert(env_name.trim().to_lowercase(), ns.trim().to_owned());
        }
        let callback_max_attempts: u32 = parse(env, "CALLBACK_MAX_ATTEMPTS", 8)?;
        if callback_max_attempts == 0 {
            return Err(invalid("CALLBACK_MAX_ATTEMPTS", "must be at least 1"));
        }
        let lease_reap_interval = millis("LEASE_REAP_INTERVAL_MS", 1_000)?;
        if lease_reap_interval.is_zero() {
            return Err(invalid("LEASE_REAP_INTERVAL_MS", "must be positive"));
        }
        let operations = OperationsSettings {
            watch_timeout: secs("WATCH_TIMEOUT_SECONDS", 1_800)?,
            intent_retention: secs("INTENT_RETENTION_SECONDS", 7 * 86_400)?
                .max(Duration::from_secs(60)),
            callback_signing_secret: env
                .get("CALLBACK_SIGNING_SECRET")
                .filter(|s| !s.is_empty())
                .map(|s| Secret::new(s.clone())),
            callback_max_attempts,
            callback_max_age: secs("CALLBACK_MAX_AGE_SECONDS", 86_400)?,
            callback_timeout: millis("CALLBACK_TIMEOUT_MS", 10_000)?,
            callback_allowed_hosts: crate::domain::callback::UrlPolicy::parse_hosts(
                &get("CALLBACK_ALLOWED_HOSTS").unwrap_or_default(),
            ),
            callback_allow_insecure_localhost: parse_bool(
                env,
                "CALLBACK_ALLOW_INSECURE_LOCALHOST",
                false,
            )?,
            sim_kube_ready_delay: millis("SIM_KUBE_READY_DELAY_MS", 1_000)?,
            kube_namespaces,
            converge_interval: millis("KUBE_CONVERGE_INTERVAL_MS", 2_000)?
                .max(Duration::from_millis(10)),
            callback_concurrency: parse(env, "CALLBACK_CONCURRENCY", 16)?.max(1),
            kube_client: KubeClientSettings {
                connect_timeout: millis("KUBE_CONNECT_TIMEOUT_MS", 5_000)?
                    .max(Duration::from_millis(1)),
                read_timeout: millis("KUBE_READ_TIMEOUT_MS", 30_000)?.max(Duration::from_millis(1)),
                write_timeout: millis("KUBE_WRITE_TIMEOUT_MS", 30_000)?
                    .max(Duration::from_millis(1)),
            },
            lease_reap_interval,
        };
        if let Some(secret) = &operations.callback_signing_secret {
            crate::domain::callback::decode_secret(secret.expose().as_bytes())
                .map_err(|e| invalid("CALLBACK_SIGNING_SECRET", &e.to_string()))?;
        }
        let use_mock_adapters = parse_bool(env, "USE_MOCK_ADAPTERS", true)?;
        let choose = |var: &str, real: &str| match get(var).as_deref() {
            None | Some("") => Ok(use_mock_adapters),
            Some("sim") => Ok(true),
            Some(v) if v == real => Ok(false),
            Some(other) => Err(invalid(var, &format!("{other:?} is not sim or {real}"))),
        };
        let sim_kube = choose("KUBE_ADAPTER", "kube")?;
        let sim_cloud = choose("CLOUD_ADAPTER", "ec2")?;
        let actor_send_timeout =
            Duration::from_millis(parse(env, "ACTOR_SEND_TIMEOUT_MS", 10_000u64)?);
        if actor_send_timeout.is_zero() {
            return Err(invalid("ACTOR_SEND_TIMEOUT_MS", "must be positive"));
        }
        let cfg = Self {
            host: get("APP_HOST").unwrap_or_else(|| "0.0.0.0".into()),
            port: parse(env, "APP_PORT", 8080)?,
            use_mock_adapters,
            sim_kube,
            sim_cloud,
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
            group_commit: GroupCommitSettings::from_map(env)?,
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
            actor_send_timeout,
            log_format,
            controller,
            operations,
            agent: AgentSettings::from_map(env, use_mock_adapters)?,
            events: EventsSettings::from_map(env)?,
            traces: TracesSettings::from_map(env)?,
        };
        Ok(cfg)
    }

    /// Defaults with the in-memory store, no seed file: the base for tests.
    pub fn for_tests() -> Self {
        let mut env = HashMap::new();
        env.insert("SHADOW_SEED_FILE".to_owned(), String::new());
        env.insert("ACTOR_THREADS".to_owned(), "2".to_owned());
        // Tests drive instance states themselves unless they opt into an agent.
        env.insert("WORKER_AGENT".to_owned(), "heartbeat".to_owned());
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

/// The longest drain deadline, configured or asked for on the drain route (30 days).
pub const MAX_DRAIN_DEADLINE: Duration = Duration::from_secs(30 * 24 * 3600);

/// `DRAIN_DEADLINE_SECONDS`: unset, empty, `0` or `none` is no deadline; otherwise whole
/// seconds up to [`MAX_DRAIN_DEADLINE`].
fn drain_deadline(value: Option<String>) -> Result<Option<Duration>, ConfigError> {
    const VAR: &str = "DRAIN_DEADLINE_SECONDS";
    let v = value.unwrap_or_default();
    let v = v.trim();
    if v.is_empty() || v.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    let secs: u64 = v.parse().map_err(|e| {
        invalid(
            VAR,
            &format!("{v:?} is not valid: {e} (whole seconds, or 0/none for no deadline)"),
        )
    })?;
    let deadline = Duration::from_secs(secs);
    if deadline > MAX_DRAIN_DEADLINE {
        return Err(invalid(
            VAR,
            &format!("must be at most {} seconds", MAX_DRAIN_DEADLINE.as_secs()),
        ));
    }
    Ok((secs > 0).then_some(deadline))
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

/// Which worker agent keeps workers and their instances in step with the hosts
/// (`WORKER_AGENT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerAgentKind {
    /// Pull each worker's labs from its CML REST API.
    Cml,
    /// Only the push route `POST /api/1.0/workers/{id}/heartbeat`.
    Heartbeat,
    /// The simulated agent of the embedded mode.
    Sim,
}

/// How the service reaches one worker's CML (`CML_*`).
#[derive(Debug, Clone)]
pub struct CmlSettings {
    /// Base URL in front of `/api/v0/` (`CML_URL_TEMPLATE`, default `https://{private_ip}`;
    /// placeholders `{private_ip}`, `{instance_id}`, `{worker_id}`).
    pub url_template: String,
    /// `CML_USERNAME`.
    pub username: String,
    /// `CML_PASSWORD` (redacted in `Debug`).
    pub password: Secret,
    /// Extra PEM CA bundle trusted for CML's certificate (`CML_CA_FILE`).
    pub ca_file: Option<PathBuf>,
    /// Accept any certificate (`CML_INSECURE_SKIP_VERIFY`, default false).
    pub insecure_skip_verify: bool,
    /// Allow `http://` bases (`CML_ALLOW_HTTP`, default false; for loopback tests).
    pub allow_http: bool,
    /// Timeout of one CML request (`CML_REQUEST_TIMEOUT_MS`, default 5000).
    pub request_timeout: Duration,
    /// CML requests in flight at once, over all workers (`CML_CONCURRENCY`, default 8).
    pub concurrency: usize,
}

/// Worker agent settings.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// `WORKER_AGENT` = `cml` | `heartbeat` | `sim` (default `sim` with
    /// `USE_MOCK_ADAPTERS`, `cml` otherwise).
    pub kind: WorkerAgentKind,
    /// How often the leader reads every RUNNING/DRAINING worker's labs
    /// (`CML_SYNC_INTERVAL_MS`, default 5000).
    pub sync_interval: Duration,
    /// Stop started labs that match no instance (`CML_STOP_UNKNOWN_LABS`, default false:
    /// they are only reported).
    pub stop_unknown_labs: bool,
    /// The CML client.
    pub cml: CmlSettings,
}

impl AgentSettings {
    /// Reads the `WORKER_AGENT` and `CML_*` variables. `CONTROL_PLANE_API_URL` is refused:
    /// this service is its own control plane.
    pub fn from_map(
        env: &HashMap<String, String>,
        use_mock_adapters: bool,
    ) -> Result<Self, ConfigError> {
        let get = |k: &str| {
            env.get(k)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        if get("CONTROL_PLANE_API_URL").is_some() {
            return Err(invalid(
                "CONTROL_PLANE_API_URL",
                "not used: this service is the control plane (its own /api/1.0/instances); \
                 unset it",
            ));
        }
        let kind = match get("WORKER_AGENT").as_deref() {
            None if use_mock_adapters => WorkerAgentKind::Sim,
            None => WorkerAgentKind::Cml,
            Some("cml") => WorkerAgentKind::Cml,
            Some("heartbeat") => WorkerAgentKind::Heartbeat,
            Some("sim") => WorkerAgentKind::Sim,
            Some(other) => {
                return Err(invalid(
                    "WORKER_AGENT",
                    &format!("{other:?} is not cml, heartbeat or sim"),
                ))
            }
        };
        let allow_http = parse_bool(env, "CML_ALLOW_HTTP", false)?;
        let url_template = get("CML_URL_TEMPLATE").unwrap_or_else(|| "https://{private_ip}".into());
        crate::domain::cml::expand_url_template(
            &url_template,
            &crate::domain::cml::UrlParts {
                worker_id: "w",
                instance_id: Some("i-0"),
                private_ip: Some("10.0.0.1"),
            },
            allow_http,
        )
        .map_err(|e| invalid("CML_URL_TEMPLATE", &e))?;
        let timeout_ms: u64 = parse(env, "CML_REQUEST_TIMEOUT_MS", 5_000)?;
        if timeout_ms == 0 {
            return Err(invalid("CML_REQUEST_TIMEOUT_MS", "must be above 0"));
        }
        let interval_ms: u64 = parse(env, "CML_SYNC_INTERVAL_MS", 5_000)?;
        if interval_ms == 0 {
            return Err(invalid("CML_SYNC_INTERVAL_MS", "must be above 0"));
        }
        Ok(Self {
            kind,
            sync_interval: Duration::from_millis(interval_ms),
            stop_unknown_labs: parse_bool(env, "CML_STOP_UNKNOWN_LABS", false)?,
            cml: CmlSettings {
                url_template,
                username: get("CML_USERNAME").unwrap_or_default(),
                password: Secret::new(env.get("CML_PASSWORD").cloned().unwrap_or_default()),
                ca_file: get("CML_CA_FILE").map(PathBuf::from),
                insecure_skip_verify: parse_bool(env, "CML_INSECURE_SKIP_VERIFY", false)?,
                allow_http,
                request_timeout: Duration::from_millis(timeout_ms),
                concurrency: parse(env, "CML_CONCURRENCY", 8usize)?.max(1),
            },
        })
    }
}

#[cfg(test)]
mod agent_settings_tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_follow_the_mode() {
        let a = AgentSettings::from_map(&HashMap::new(), true).expect("defaults");
        assert_eq!(a.kind, WorkerAgentKind::Sim);
        assert_eq!(a.sync_interval, Duration::from_millis(5_000));
        assert!(!a.stop_unknown_labs && !a.cml.allow_http && !a.cml.insecure_skip_verify);
        assert_eq!(a.cml.url_template, "https://{private_ip}");
        let a = AgentSettings::from_map(&HashMap::new(), false).expect("defaults");
        assert_eq!(a.kind, WorkerAgentKind::Cml);
        let a = AgentSettings::from_map(&map(&[("WORKER_AGENT", "heartbeat")]), false)
            .expect("heartbeat");
        assert_eq!(a.kind, WorkerAgentKind::Heartbeat);
    }

    #[test]
    fn bad_agent_settings_name_the_variable() {
        for (pairs, var) in [
            (vec![("WORKER_AGENT", "ssh")], "WORKER_AGENT"),
            (
                vec![("CML_URL_TEMPLATE", "http://{private_ip}")],
                "CML_URL_TEMPLATE",
            ),
            (
                vec![("CML_URL_TEMPLATE", "https://{hostname}")],
                "CML_URL_TEMPLATE",
            ),
            (vec![("CML_URL_TEMPLATE", "ftp://x")], "CML_URL_TEMPLATE"),
            (vec![("CML_SYNC_INTERVAL_MS", "0")], "CML_SYNC_INTERVAL_MS"),
            (vec![("CML_ALLOW_HTTP", "perhaps")], "CML_ALLOW_HTTP"),
            (
                vec![("CONTROL_PLANE_API_URL", "http://cp:8080")],
                "CONTROL_PLANE_API_URL",
            ),
        ] {
            let e = Config::from_map(&map(&pairs)).expect_err("refused");
            assert!(e.to_string().starts_with(&format!("{var}:")), "{e}");
        }
        let ok = map(&[
            ("CML_URL_TEMPLATE", "http://127.0.0.1:9000/{worker_id}"),
            ("CML_ALLOW_HTTP", "true"),
        ]);
        assert!(Config::from_map(&ok).is_ok());
    }

    #[test]
    fn cml_password_is_redacted_in_debug() {
        let c = Config::from_map(&map(&[
            ("CML_USERNAME", "admin"),
            ("CML_PASSWORD", "cml-pw-789"),
        ]))
        .expect("config");
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("cml-pw-789"), "{dbg}");
        assert_eq!(c.agent.cml.password.expose(), "cml-pw-789");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actor_send_timeout_defaults_to_ten_seconds_and_must_be_positive() {
        let env = HashMap::new();
        let cfg = Config::from_map(&env).map(|c| c.actor_send_timeout);
        assert_eq!(cfg.ok(), Some(Duration::from_secs(10)));
        for bad in ["0", "-1", "soon"] {
            let env = HashMap::from([("ACTOR_SEND_TIMEOUT_MS".to_owned(), bad.to_owned())]);
            let e = Config::from_map(&env).map(|_| ()).unwrap_err();
            assert!(
                e.to_string().contains("ACTOR_SEND_TIMEOUT_MS"),
                "{bad}: {e}"
            );
        }
    }

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
    fn the_seed_defaults_hold() {
        // The controller seed's table: ETCD_PORT 2379, LEADER_LEASE_TTL 15,
        // RECONCILE_INTERVAL 30, AWS_REGION us-east-1, CONTROLLER_INSTANCE_ID generated.
        let a = Config::from_map(&HashMap::new()).expect("defaults");
        let b = Config::from_map(&HashMap::new()).expect("defaults");
        assert_eq!(a.controller.leader_lease_ttl, Duration::from_secs(15));
        assert_eq!(a.controller.reconcile_interval, Duration::from_secs(30));
        assert_eq!(a.controller.aws_region, "us-east-1");
        assert!(a.etcd.endpoints[0].ends_with(":2379"));
        assert!(!a.controller.instance_id.is_empty());
        assert_ne!(a.controller.instance_id, b.controller.instance_id);
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
    fn group_commit_is_on_by_default_with_etcd_limits_and_validated() {
        let c = Config::from_map(&map(&[])).expect("config");
        assert_eq!(
            c.group_commit,
            GroupCommitSettings {
                enabled: true,
                max_ops: 128,
                max_bytes: 1 << 20
            }
        );
        let c = Config::from_map(&map(&[
            ("ETCD_GROUP_COMMIT", "false"),
            ("ETCD_MAX_TXN_OPS", "64"),
            ("ETCD_MAX_TXN_BYTES", "4096"),
        ]))
        .expect("config");
        assert!(!c.group_commit.enabled);
        assert_eq!(
            (c.group_commit.max_ops, c.group_commit.max_bytes),
            (64, 4096)
        );
        for (var, bad) in [
            ("ETCD_GROUP_COMMIT", "sometimes"),
            ("ETCD_MAX_TXN_OPS", "0"),
            ("ETCD_MAX_TXN_OPS", "-3"),
            ("ETCD_MAX_TXN_BYTES", "100"),
        ] {
            let e = Config::from_map(&map(&[(var, bad)])).expect_err("bad value");
            assert!(e.to_string().starts_with(&format!("{var}:")), "{e}");
        }
    }

    #[test]
    fn lease_reap_interval_defaults_to_a_second_and_must_be_positive() {
        let c = Config::from_map(&map(&[])).expect("config");
        assert_eq!(
            c.operations.lease_reap_interval,
            Duration::from_millis(1_000)
        );
        let c = Config::from_map(&map(&[("LEASE_REAP_INTERVAL_MS", "250")])).expect("config");
        assert_eq!(c.operations.lease_reap_interval, Duration::from_millis(250));
        for bad in ["0", "-1", "soon"] {
            let e = Config::from_map(&map(&[("LEASE_REAP_INTERVAL_MS", bad)]))
                .expect_err("bad interval");
            assert!(e.to_string().starts_with("LEASE_REAP_INTERVAL_MS:"), "{e}");
        }
    }

    #[test]
    fn drain_deadline_is_none_by_default_and_a_positive_value_sets_one() {
        let deadline = |pairs: &[(&str, &str)]| {
            Config::from_map(&map(pairs)).map(|c| c.controller.drain_deadline)
        };
        assert_eq!(deadline(&[]), Ok(None));
        for none in ["", "0", "none", "NONE", " none "] {
            assert_eq!(
                deadline(&[("DRAIN_DEADLINE_SECONDS", none)]),
                Ok(None),
                "{none:?}"
            );
        }
        assert_eq!(
            deadline(&[("DRAIN_DEADLINE_SECONDS", "3600")]),
            Ok(Some(Duration::from_secs(3600)))
        );
        for bad in ["-5", "soon", "1.5", "2592001"] {
            let e = deadline(&[("DRAIN_DEADLINE_SECONDS", bad)]).expect_err(bad);
            assert!(
                e.to_string().starts_with("DRAIN_DEADLINE_SECONDS:"),
                "{bad}: {e}"
            );
        }
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

    #[test]
    fn traces_are_off_unless_an_otlp_endpoint_is_set() {
        let off = Config::from_map(&map(&[])).expect("config");
        assert_eq!(off.traces, None);
        let empty = Config::from_map(&map(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", " "),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", ""),
            ("OTEL_SERVICE_NAME", "x"),
        ]))
        .expect("config");
        assert_eq!(empty.traces, None, "empty is unset");
    }

    #[test]
    fn traces_endpoint_follows_the_otlp_rules() {
        let c = Config::from_map(&map(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://col:4318/")]))
            .expect("config");
        let t = c.traces.expect("on");
        assert_eq!(t.endpoint.expose(), "http://col:4318/v1/traces");
        assert_eq!(t.service_name, "resource-plane");
        assert_eq!(t.schedule_delay, Duration::from_millis(5_000));
        assert!(t.headers.is_empty());
        let c = Config::from_map(&map(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://col:4318"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "https://traces.example/custom",
            ),
            ("OTEL_SERVICE_NAME", "rp-eu"),
            ("OTEL_BSP_SCHEDULE_DELAY", "250"),
        ]))
        .expect("config");
        let t = c.traces.expect("on");
        assert_eq!(t.endpoint.expose(), "https://traces.example/custom");
        assert_eq!(t.service_name, "rp-eu");
        assert_eq!(t.schedule_delay, Duration::from_millis(250));
    }

    #[test]
    fn traces_headers_are_parsed_and_never_shown() {
        let c = Config::from_map(&map(&[
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "http://user:pw-endpoint@col:4318",
            ),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "api-key=hdr-secret-1, x-tenant = t1",
            ),
        ]))
        .expect("config");
        let t = c.traces.clone().expect("on");
        let headers: Vec<(&str, &str)> = t
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.expose()))
            .collect();
        assert_eq!(headers, [("api-key", "hdr-secret-1"), ("x-tenant", "t1")]);
        let dbg = format!("{c:?}");
        assert!(
            !dbg.contains("hdr-secret-1") && !dbg.contains("pw-endpoint"),
            "{dbg}"
        );
    }

    #[test]
    fn bad_traces_settings_are_refused_without_echoing_them() {
        for (var, value) in [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "col:4318?token=leak-1"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "ftp://leak-2/"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "leak-3"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "bad name=leak-4"),
            ("OTEL_BSP_SCHEDULE_DELAY", "0"),
        ] {
            let mut env = map(&[(var, value)]);
            env.entry("OTEL_EXPORTER_OTLP_ENDPOINT".into())
                .or_insert_with(|| "http://col:4318".into());
            let err = Config::from_map(&env).expect_err(value).to_string();
            assert!(err.contains(var), "{err}");
            assert!(!err.contains("leak"), "{err}");
        }
    }
}

#[cfg(test)]
mod variables_tests {
    use std::collections::BTreeSet;

    use super::*;

    /// Every `"UPPER_CASE"` literal in the non-test part of a source file: the variables
    /// that file reads (config.rs names nothing else in capitals).
    fn literals(source: &str) -> BTreeSet<String> {
        let code = source.split("#[cfg(test)]").next().unwrap_or_default();
        // The list itself is not a read.
        let code = match code.split_once("pub const VARIABLES") {
            Some((before, after)) => {
                format!("{before}{}", after.split_once("];").map_or("", |(_, a)| a))
            }
            None => code.to_owned(),
        };
        code.split('"')
            .skip(1)
            .step_by(2)
            .filter(|s| {
                s.len() > 2
                    && s.contains('_')
                    && s.chars()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
            })
            .map(str::to_owned)
            .collect()
    }

    /// `KEY=value` lines of `.env.example` (comments and blank lines skipped).
    fn env_example() -> HashMap<String, String> {
        include_str!("../.env.example")
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect()
    }

    fn listed() -> BTreeSet<String> {
        VARIABLES.iter().map(|v| (*v).to_owned()).collect()
    }

    #[test]
    fn variables_are_exactly_what_the_code_reads() {
        let mut read = literals(include_str!("config.rs"));
        read.extend(literals(include_str!("telemetry.rs")));
        assert_eq!(
            read,
            listed(),
            "config::VARIABLES drifted from config.rs/telemetry.rs"
        );
    }

    #[test]
    fn env_example_lists_every_variable_and_no_other() {
        let example: BTreeSet<String> = env_example().into_keys().collect();
        let missing: Vec<_> = listed().difference(&example).cloned().collect();
        let unknown: Vec<_> = example.difference(&listed()).cloned().collect();
        assert!(
            missing.is_empty() && unknown.is_empty(),
            ".env.example: missing {missing:?}, not read by the service {unknown:?}"
        );
    }

    #[test]
    fn env_example_values_are_the_defaults() {
        // The generated replica id is the one default that differs run to run.
        let pin = |mut m: HashMap<String, String>| {
            m.insert("CONTROLLER_INSTANCE_ID".into(), "rp-pinned".into());
            m
        };
        let mut from_example = Config::from_map(&pin(env_example())).expect(".env.example loads");
        let defaults = Config::from_map(&pin(HashMap::new())).expect("defaults load");
        // Named files are explicit (they must then exist); the paths are the defaults.
        assert!(from_example.seed_file_explicit && from_example.controller.templates_file_explicit);
        from_example.seed_file_explicit = false;
        from_example.controller.templates_file_explicit = false;
        assert_eq!(format!("{from_example:?}"), format!("{defaults:?}"));
    }
}
