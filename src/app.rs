//! Wiring: builds the store, the actors and the HTTP state from a `Config`, seeds
//! shadow deployables from `config/`, and keeps the registry hydrated in the background.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use actix_web::web;
use chrono::Utc;
use dashmap::DashMap;
use serde::Deserialize;
use tracing::{info, warn};

use crate::actors::registry::Registry;
use crate::actors::shadow::{Deps, View};
use crate::adapters::etcd::EtcdStore;
use crate::adapters::instrumented::InstrumentedStore;
use crate::adapters::memory::MemoryStore;
use crate::api::AppState;
use crate::config::{valid_segment, Config, ConfigError};
use crate::domain::shadow::ShadowDeployable;
use crate::idempotency::LeasePool;
use crate::keys;
use crate::ports::store::{Compare, Op, Store, StoreError, Txn};
use crate::telemetry::Metrics;

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
    }
    Ok(seed)
}

/// Creates missing seeded records; never overwrites existing state.
pub async fn apply_seed(store: &dyn Store, seed: &Seed) -> Result<usize, StoreError> {
    let mut created = 0;
    for (env, entries) in seed {
        for e in entries {
            let rec = ShadowDeployable::new(&e.name, &e.node_pool, &e.dns, Utc::now());
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

/// A running service instance: its HTTP state and its actors.
pub struct Service {
    /// Shared HTTP state.
    pub state: web::Data<AppState>,
}

impl Service {
    /// Builds the store named by the configuration and starts the service on it.
    /// Must be called inside an actix `System`.
    pub fn start(config: Config) -> Result<Self, ConfigError> {
        let store: Arc<dyn Store> = if config.use_mock_adapters {
            Arc::new(MemoryStore::new())
        } else {
            Arc::new(EtcdStore::new(config.etcd.clone()))
        };
        Self::start_with_store(config, store)
    }

    /// Starts the service on a given store (tests share one store between instances).
    pub fn start_with_store(config: Config, store: Arc<dyn Store>) -> Result<Self, ConfigError> {
        let seed = load_seed(&config)?;
        let metrics = Metrics::new();
        let store: Arc<dyn Store> = Arc::new(InstrumentedStore::new(store, metrics.clone()));
        let deps = Arc::new(Deps {
            store: store.clone(),
            metrics: metrics.clone(),
            leases: LeasePool::new(config.idempotency_ttl),
            retry_delay: config.procure_retry_delay,
            view: View::new(),
        });
        let registry = Registry::new(deps, config.actor_threads);
        let state = web::Data::new(AppState {
            config: Arc::new(config),
            registry: registry.clone(),
            store: store.clone(),
            metrics,
            inflight: DashMap::new(),
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
            registry.run_watch().await;
        });
        Ok(Self { state })
    }

    /// Waits (bounded) until the actors are hydrated; for tests and start-up logs.
    pub async fn wait_hydrated(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.state.registry.is_hydrated() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }
}
