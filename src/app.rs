//! Wiring: builds the store, the actors and the HTTP state from a `Config`, seeds
//! shadow deployables from `config/`, and keeps the registry hydrated in the background.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use actix_web::web;
use dashmap::DashMap;
use serde::Deserialize;
use tracing::{info, warn};

use crate::actors::cml_sync::AgentSync;
use crate::actors::controller::ControllerCtx;
use crate::actors::events::EventHub;
use crate::actors::follow::follow;
use crate::actors::leader::{run_election, Fence};
use crate::actors::mirror::Mirror;
use crate::actors::operations::OpsCtx;
use crate::actors::reaper::reap_forever;
use crate::actors::registry::Registry;
use crate::actors::shadow::{Deps, View};
use crate::actors::worker::{WorkerDeps, WorkerRegistry};
use crate::adapters::cml::CmlAgent;
use crate::adapters::ec2::{Ec2Cloud, Ec2Settings};
use crate::adapters::etcd::EtcdStore;
use crate::adapters::group_commit::GroupCommitStore;
use crate::adapters::http_callback::HttpCallbackSender;
use crate::adapters::instrumented::InstrumentedStore;
use crate::adapters::kube::KubeAdapter;
use crate::adapters::memory::MemoryStore;
use crate::adapters::sim_agent::SimAgent;
use crate::adapters::sim_cloud::SimCloud;
use crate::adapters::sim_kube::SimKube;
use crate::api::AppState;
use crate::config::{valid_segment, Config, ConfigError, WorkerAgentKind};
use crate::domain::callback::UrlPolicy;
use crate::domain::controller::validate_templates;
use crate::domain::shadow::{valid_object_name, ShadowDeployable};
use crate::domain::worker::WorkerTemplate;
use crate::idempotency::LeasePool;
use crate::keys;
use crate::ports::agent::WorkerAgent;
use crate::ports::cloud::CloudProvider;
use crate::ports::kube::{DeployableSpec, KubeExecutor, ResourceSpec};
use crate::ports::store::{Compare, Op, Store, StoreError, Txn};
use crate::telemetry::Metrics;
use tokio::sync::watch;

/// How often the leader-only actors (scheduler, autoscaler, reconciler, intent manager)
/// are checked for having died, and restarted.
const SUPERVISE_EVERY: Duration = Duration::from_millis(500);

/// One entry of the seed file.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SeedEntry {
    /// Name.
    pub name: String,
    /// Node pool.
    pub node_pool: String,
    /// DNS name.
    pub dns: String,
    /// The Deployment its minimum pod count scales (default: `name`).
    #[serde(default)]
    pub deployment: Option<String>,
    /// The HorizontalPodAutoscaler whose `minReplicas` follows it (default: `name`).
    #[serde(default)]
    pub hpa: Option<String>,
}

/// The seed file: environment -> deployables.
pub type Seed = BTreeMap<String, Vec<SeedEntry>>;

/// Reads and validates the seed file against the configured environments.
pub fn load_seed(config: &Config) -> Result<Seed, ConfigError> {
    let Some(path) = &config.seed_file else {
        return Ok(Seed::new());
    };
    let file_err = |reason: String| ConfigError::File {
        path: path.display().to_string(),
        reason,
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !config.seed_file_explicit => {
            return Ok(Seed::new())
        }
        Err(e) => return Err(file_err(e.to_string())),
    };
    let seed: Seed = serde_yaml::from_str(&text).map_err(|e| file_err(e.to_string()))?;
    for (env, entries) in &seed {
        if config.canonical_env(env).as_deref() != Some(env.as_str()) {
            return Err(file_err(format!(
                "environment {env:?} is not in RM_ENVS ({})",
                config.envs.join(",")
            )));
        }
        if let Some(bad) = entries.iter().find(|e| !valid_segment(&e.name)) {
            return Err(file_err(format!("invalid deployable name {:?}", bad.name)));
        }
        let mapped = entries
            .iter()
            .flat_map(|e| [e.deployment.as_deref(), e.hpa.as_deref()])
            .flatten();
        if let Some(bad) = mapped.into_iter().find(|n| !valid_object_name(n)) {
            return Err(file_err(format!(
                "{bad:?} is not a Kubernetes object name (deployment/hpa)"
            )));
        }
    }
    Ok(seed)
}

/// Creates missing seeded records; never overwrites existing state.
pub async fn apply_seed(store: &dyn Store, seed: &Seed) -> Result<usize, StoreError> {
    let mut created = 0;
    for (env, entries) in seed {
        for e in entries {
            let mut rec =
                ShadowDeployable::new(&e.name, &e.node_pool, &e.dns, crate::clock::utc_now());
            rec.deployment.clone_from(&e.deployment);
            rec.hpa.clone_from(&e.hpa);
            let key = keys::shadow(env, &e.name);
            let txn = Txn {
                compares: vec![Compare::ModRevision(key.clone(), 0)],
                success: vec![
                    Op::Put {
                        key,
                        value: serde_json::to_vec(&rec).unwrap_or_default(),
                        lease: None,
                    },
                    Op::Put {
                        key: keys::shadow_in_use(env, &e.name),
                        value: b"false".to_vec(),
                        lease: None,
                    },
                ],
                failure_gets: Vec::new(),
            };
            if store.txn(txn).await?.succeeded {
                created += 1;
            }
        }
    }
    Ok(created)
}

/// Reads and validates the worker templates file (unknown keys are errors), then reads
/// each template's `user_data_file` (relative to the templates file's directory). Every
/// error names the file, and the template and field at fault.
pub fn load_templates(config: &Config) -> Result<Vec<WorkerTemplate>, ConfigError> {
    let path = &config.controller.templates_file;
    let file_err = |reason: String| ConfigError::File {
        path: path.display().to_string(),
        reason,
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                && !config.controller.templates_file_explicit =>
        {
            return Ok(Vec::new())
        }
        Err(e) => return Err(file_err(e.to_string())),
    };
    let file: TemplatesFile = serde_yaml::from_str(&text).map_err(|e| file_err(e.to_string()))?;
    // Each template is decoded on its own so an error (an unknown key, a value of the
    // wrong type) can name the template it is in.
    let mut templates = Vec::with_capacity(file.templates.len());
    for (n, raw) in file.templates.into_iter().enumerate() {
        let label = match raw.get("name").and_then(|v| v.as_str()) {
            Some(name) => format!("worker template {name:?}"),
            None => format!("worker template #{}", n + 1),
        };
        let t: WorkerTemplate =
            serde_yaml::from_value(raw).map_err(|e| file_err(format!("{label}: {e}")))?;
        templates.push(t);
    }
    validate_templates(&templates).map_err(file_err)?;
    let base = path.parent().unwrap_or_else(|| std::path::Path::new("."));
    for t in &mut templates {
        if let Some(file) = &t.user_data_file {
            let at = base.join(file);
            let data = std::fs::read(&at).map_err(|e| {
                file_err(format!(
                    "worker template {:?}: user_data_file: cannot read {}: {e}",
                    t.name,
                    at.display()
                ))
            })?;
            if data.len() > MAX_USER_DATA {
                return Err(file_err(format!(
                    "worker template {:?}: user_data_file: {} is {} bytes; EC2 takes at most {MAX_USER_DATA}",
                    t.name,
                    at.display(),
                    data.len()
                )));
            }
            t.user_data = Some(data);
        }
    }
    Ok(templates)
}

/// EC2's limit on user data, before base64 encoding.
const MAX_USER_DATA: usize = 16 * 1024;

/// `config/worker-templates.yaml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TemplatesFile {
    templates: Vec<serde_yaml::Value>,
}

/// A running service instance: its HTTP state and its actors.
pub struct Service {
    /// Shared HTTP state.
    pub state: web::Data<AppState>,
}

impl Service {
    /// Builds the store and cloud named by the configuration and starts the service.
    /// Must be called inside an actix `System`.
    pub async fn start(config: Config) -> Result<Self, ConfigError> {
        let store: Arc<dyn Store> = if config.use_mock_adapters {
            Arc::new(MemoryStore::new())
        } else {
            Arc::new(EtcdStore::new(config.etcd.clone()))
        };
        let cloud: Arc<dyn CloudProvider> = if config.sim_cloud {
            Arc::new(SimCloud::new(config.controller.sim_cloud_boot))
        } else {
            Arc::new(
                Ec2Cloud::new(Ec2Settings {
                    region: config.controller.aws_region.clone(),
                    endpoint_url: config.controller.aws_endpoint_url.clone(),
                    cluster_id: config.controller.cluster_id.clone(),
                })
                .await,
            )
        };
        let kube: Arc<dyn KubeExecutor> = if config.sim_kube {
            new_sim_kube(&config)?
        } else {
            Arc::new(
                KubeAdapter::connect(&config.operations.kube_client)
                    .await
                    .map_err(|e| ConfigError::Invalid {
                        var: "KUBE_ADAPTER".into(),
                        reason: format!(
                            "no usable Kubernetes configuration (in-cluster or kubeconfig): {e}; \
                     set KUBE_ADAPTER=sim to run without a cluster"
                        ),
                    })?,
            )
        };
        Self::start_full(config, store, cloud, kube)
    }

    /// Starts the service on a given store with a simulated cloud (tests).
    pub fn start_with_store(config: Config, store: Arc<dyn Store>) -> Result<Self, ConfigError> {
        let cloud = Arc::new(SimCloud::new(config.controller.sim_cloud_boot));
        Self::start_with(config, store, cloud)
    }

    /// Starts the service on a given store and cloud, with a simulated cluster (tests
    /// share one store between instances).
    pub fn start_with(
        config: Config,
        store: Arc<dyn Store>,
        cloud: Arc<dyn CloudProvider>,
    ) -> Result<Self, ConfigError> {
        let kube = new_sim_kube(&config)?;
        Self::start_full(config, store, cloud, kube)
    }

    /// Starts the service on the given adapters.
    pub fn start_full(
        config: Config,
        store: Arc<dyn Store>,
        cloud: Arc<dyn CloudProvider>,
        kube: Arc<dyn KubeExecutor>,
    ) -> Result<Self, ConfigError> {
        let seed = load_seed(&config)?;
        let templates = load_templates(&config)?;
        let agent = new_worker_agent(&config)?;
        let metrics = Metrics::new();
        // Group commit only pays where a transaction is a network round trip.
        let store: Arc<dyn Store> = if config.group_commit.enabled && store.name() == "etcd" {
            Arc::new(GroupCommitStore::new(
                store,
                config.group_commit,
                config.etcd.prefix.len(),
                metrics.clone(),
            ))
        } else {
            store
        };
        let store: Arc<dyn Store> = Arc::new(InstrumentedStore::new(store, metrics.clone()));
        let deps = Arc::new(Deps {
            store: store.clone(),
            metrics: metrics.clone(),
            leases: LeasePool::new(config.idempotency_ttl),
            retry_delay: config.procure_retry_delay,
            view: View::new(),
            holds: Default::default(),
            send_timeout: config.actor_send_timeout,
        });
        let registry = Registry::new(deps, config.actor_threads);
        let fence = Arc::new(Fence::default());
        let workers = WorkerRegistry::new(Arc::new(WorkerDeps {
            store: store.clone(),
            metrics: metrics.clone(),
            fence: fence.clone(),
            view: DashMap::new(),
            index: Default::default(),
            clock: crate::clock::Clock::new(),
            retention: LeasePool::new(config.controller.record_retention),
            send_timeout: config.actor_send_timeout,
        }));
        let instances = Arc::new(Mirror::new(keys::INSTANCE_PREFIX));
        let controller = ControllerCtx::new(
            store.clone(),
            cloud,
            templates,
            workers.clone(),
            instances.clone(),
            fence.clone(),
            config.controller.clone(),
            metrics.clone(),
        );
        let intents = Arc::new(Mirror::new(keys::WATCH_INTENT_PREFIX));
        let ops_settings = &config.operations;
        let sender = Arc::new(HttpCallbackSender::new(
            UrlPolicy {
                allowed_hosts: ops_settings.callback_allowed_hosts.clone(),
                allow_insecure_localhost: ops_settings.callback_allow_insecure_localhost,
            },
            ops_settings.callback_signing_secret.clone(),
            ops_settings.callback_timeout,
        ));
        let ops = OpsCtx::new(
            store.clone(),
            kube,
            sender,
            intents.clone(),
            fence.clone(),
            config.operations.clone(),
            metrics.clone(),
            controller.clock,
            registry.clone(),
        );
        let (tx, rx) = watch::channel(None);
        actix_rt::spawn(ops.clone().follow_leadership(rx.clone()));
        actix_rt::spawn(ops.clone().track_changes());
        actix_rt::spawn(ops.clone().supervise(SUPERVISE_EVERY));
        actix_rt::spawn(ops.clone().converge_forever());
        actix_rt::spawn(reap_forever(
            ops.clone(),
            config.operations.lease_reap_interval,
        ));
        actix_rt::spawn(follow(store.clone(), intents));
        actix_rt::spawn(run_election(
            store.clone(),
            fence,
            config.controller.instance_id.clone(),
            config.controller.leader_lease_ttl,
            tx,
        ));
        actix_rt::spawn(controller.clone().follow_leadership(rx));
        actix_rt::spawn(controller.clone().kick_on_changes());
        actix_rt::spawn(controller.clone().supervise(SUPERVISE_EVERY));
        actix_rt::spawn(follow(store.clone(), workers));
        actix_rt::spawn(follow(store.clone(), instances));
        if let Some(agent) = agent {
            controller.set_agent(agent.clone());
            let a = &config.agent;
            let sync = AgentSync::new(
                controller.clone(),
                agent,
                a.stop_unknown_labs,
                a.cml.concurrency,
                a.sync_interval,
            );
            actix_rt::spawn(sync.run_forever());
        }
        let events = EventHub::new(store.clone(), config.events);
        let state = web::Data::new(AppState {
            config: Arc::new(config),
            registry: registry.clone(),
            store: store.clone(),
            metrics,
            inflight: DashMap::new(),
            controller,
            ops,
            events,
        });
        actix_rt::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                match apply_seed(store.as_ref(), &seed).await {
                    Ok(n) => {
                        info!(
                            created = n,
                            store = store.name(),
                            "seeded shadow deployables"
                        );
                        break;
                    }
                    Err(e) => warn!(error = %e, "seeding failed; retrying"),
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            follow(store, registry).await;
        });
        Ok(Self { state })
    }

    /// Stops this replica's leader-only work and its election (it will not campaign
    /// again), then revokes the leader lease so a successor is elected at once rather
    /// than after a full `LEADER_LEASE_TTL`.
    pub async fn shutdown(&self) {
        let ctl = &self.state.controller;
        ctl.fence.halt();
        ctl.stop_leading();
        self.state.ops.stop_leading();
        ctl.fence.resign(ctl.store.as_ref()).await;
    }

    /// Waits (bounded) until the actors are hydrated; for tests and start-up logs.
    pub async fn wait_hydrated(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.state.is_hydrated() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }
}

/// The worker agent `WORKER_AGENT` names (`None` for `heartbeat`: only the push route).
pub fn new_worker_agent(config: &Config) -> Result<Option<Arc<dyn WorkerAgent>>, ConfigError> {
    Ok(match config.agent.kind {
        WorkerAgentKind::Heartbeat => None,
        WorkerAgentKind::Sim => Some(Arc::new(SimAgent::new())),
        WorkerAgentKind::Cml => Some(Arc::new(CmlAgent::new(config.agent.cml.clone()).map_err(
            |reason| ConfigError::Invalid {
                var: "WORKER_AGENT".into(),
                reason,
            },
        )?)),
    })
}

/// A simulated cluster holding a ready Deployment + HPA for every seeded shadow
/// deployable, so the embedded mode's min-pod-count changes land somewhere.
pub fn new_sim_kube(config: &Config) -> Result<Arc<SimKube>, ConfigError> {
    let sim = Arc::new(SimKube::new(config.operations.sim_kube_ready_delay));
    for (env, entries) in load_seed(config)? {
        for e in entries {
            let spec = DeployableSpec {
                name: e.name.clone(),
                namespace: config.operations.namespace(&env),
                image: "shadow-deployable:latest".into(),
                node_selector: Default::default(),
                min_pod_count: 0,
                max_pod_count: 100,
                resources: ResourceSpec::default(),
                models_to_load: Vec::new(),
            };
            let _ = sim.seed_deployable(&spec);
        }
    }
    Ok(sim)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "  - name: cml
    launch_template: { name: cml-host }
    iam_instance_profile: { name: cml-host }
    key_name: ops
    user_data_file: boot/cloud-init.yaml
    root_volume: { size_gib: 64, type: gp3 }
    instance_types: [m5zn.metal, m5.metal]
    market: spot
    capacity: { cpu: 48, memory_gb: 192 }
    min_workers: 0
    max_workers: 2
    hourly_cost: 3.96
";

    /// Writes `templates` (and `boot/cloud-init.yaml` when `user_data` is given) to a
    /// temp dir and loads them.
    fn load(templates: &str, user_data: Option<&[u8]>) -> Result<Vec<WorkerTemplate>, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let path = dir.path().join("templates.yaml");
        std::fs::write(&path, format!("templates:\n{templates}")).map_err(|e| e.to_string())?;
        if let Some(data) = user_data {
            std::fs::create_dir(dir.path().join("boot")).map_err(|e| e.to_string())?;
            std::fs::write(dir.path().join("boot/cloud-init.yaml"), data)
                .map_err(|e| e.to_string())?;
        }
        let mut config = Config::for_tests();
        config.controller.templates_file = path;
        config.controller.templates_file_explicit = true;
        load_templates(&config).map_err(|e| e.to_string())
    }

    #[test]
    fn a_full_template_loads_with_its_user_data_read_relative_to_the_file() {
        let loaded = load(GOOD, Some(b"#cloud-config\n")).unwrap_or_else(|e| panic!("{e}"));
        let t = &loaded[0];
        assert_eq!(t.user_data.as_deref(), Some(&b"#cloud-config\n"[..]));
        assert_eq!(
            t.root_volume.as_ref().map(|v| v.device_name.as_str()),
            Some("/dev/xvda")
        );
        assert_eq!(t.market, crate::domain::launch::Market::Spot);
        assert!(t.spot_fallback_on_demand);
        assert_eq!(t.image_id, None);
        // The content never shows in the template's JSON (the templates route).
        let json = serde_json::to_string(t).unwrap_or_default();
        assert!(!json.contains("cloud-config"), "{json}");
        assert!(json.contains("boot/cloud-init.yaml"), "{json}");
    }

    #[test]
    fn a_missing_user_data_file_names_the_template_and_field() {
        let e = load(GOOD, None).expect_err("missing user data");
        assert!(
            e.contains("worker template \"cml\": user_data_file: cannot read"),
            "{e}"
        );
        assert!(e.contains("cloud-init.yaml"), "{e}");
        let big = vec![b'x'; 16 * 1024 + 1];
        let e = load(GOOD, Some(&big)).expect_err("oversized user data");
        assert!(e.contains("\"cml\": user_data_file:"), "{e}");
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_template_and_field() {
        let cases = [
            (
                "    ami: ami-1\n",
                "worker template \"cml\": unknown field `ami`",
            ),
            (
                "    spot_fallback_on_demand: maybe\n",
                "worker template \"cml\": ",
            ),
        ];
        for (extra, needle) in cases {
            let e = load(&format!("{GOOD}{extra}"), Some(b"x")).expect_err(extra);
            assert!(e.contains(needle), "{e} should contain {needle}");
        }
        let nested = GOOD.replace("type: gp3 }", "type: gp3, iops: 3000 }");
        let e = load(&nested, Some(b"x")).expect_err("nested unknown key");
        assert!(
            e.contains("worker template \"cml\": unknown field `iops`"),
            "{e}"
        );
        let negative = GOOD.replace("size_gib: 64", "size_gib: -1");
        let e = load(&negative, Some(b"x")).expect_err("negative size");
        assert!(
            e.contains("worker template \"cml\": root_volume.size_gib: must be positive"),
            "{e}"
        );
        let both = GOOD.replace(
            "{ name: cml-host }\n    iam",
            "{ id: lt-1, name: cml-host }\n    iam",
        );
        let e = load(&both, Some(b"x")).expect_err("id and name");
        assert!(
            e.contains("worker template \"cml\": launch_template: give id or name, not both"),
            "{e}"
        );
        let unnamed = GOOD.replace("  - name: cml\n", "  - bogus: 1\n");
        let e = load(&unnamed, Some(b"x")).expect_err("unnamed");
        assert!(
            e.contains("worker template #1: unknown field `bogus`"),
            "{e}"
        );
    }
}
