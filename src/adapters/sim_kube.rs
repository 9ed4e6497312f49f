//! Simulated `KubeExecutor`: an in-memory cluster of Deployments, Pods, Jobs and HPAs for
//! the embedded mode and the end-to-end tests.
//!
//! It follows the real semantics the watchers depend on: every change to a Deployment's
//! spec bumps its `generation` at once; `ready_delay` later the controller "observes" it
//! (observedGeneration, updated/ready/available replicas), new pods carrying the
//! template's annotations come up Ready and the old ones are deleted. Jobs are active at
//! once and `Complete` (or `Failed`, see [`SimKube::fail_job`]) after `ready_delay`.
//! Every change is broadcast to [`KubeExecutor::subscribe`]rs. Delays run on
//! `tokio::time`, so tests that pause tokio's clock decide when rollouts finish.
//!
//! Failure injection: [`SimKube::fail_next`] makes the next call of an operation fail
//! with a given error.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::broadcast;

use crate::adapters::kube::deployment_manifest;
use crate::domain::conditions::{
    Condition, DeploymentStatus, HpaStatus, JobStatus, PodStatus, StatusDetail, Truth,
};
use crate::ports::kube::ScaleTarget;
use crate::ports::kube::{
    validate_pod_counts, Baseline, DeployableSpec, JobSpec, KubeError, KubeExecutor, ModelSpec,
    ObjectEvent, ObjectStatus, Observation, ResourceKind, FIELD_MANAGER,
    GPU_MEMORY_LIMIT_ANNOTATION, GPU_MEMORY_REQUEST_ANNOTATION, MANAGED_BY_LABEL,
    MODEL_ARTIFACT_ANNOTATION, MODEL_ARTIFACT_LOCATION_ENV, MODEL_LOADED_AT_ANNOTATION,
    MODEL_NAME_ANNOTATION, MODEL_NAME_ENV, MODEL_VERSION_ANNOTATION, MODEL_VERSION_ENV, NAME_LABEL,
    REQUEST_ID_LABEL, RESTARTED_AT_ANNOTATION, WATCH_CHANNEL_CAPACITY,
};

/// Operation names accepted by [`SimKube::fail_next`].
pub const OPERATIONS: [&str; 7] = [
    "apply_deployable",
    "restart",
    "load_model",
    "create_job",
    "set_min_replicas",
    "observed_min_replicas",
    "observe",
];

type Key = (String, String);

/// Env vars to set on a pod-template container: `(container, vars)`, `None` meaning the
/// first container.
type EnvChange<'a> = (Option<&'a str>, &'a [(&'a str, &'a str)]);

fn key(namespace: &str, name: &str) -> Key {
    (namespace.to_string(), name.to_string())
}

#[derive(Debug)]
struct SimDeployment {
    object: ObjectStatus,
    /// The last applied manifest, to tell a real template change from a no-op apply
    /// (and which env vars the previous apply set).
    manifest: serde_json::Value,
    /// The pod template's containers, in order.
    containers: Vec<SimContainer>,
}

/// A pod-template container: its name and env vars (other fields are not simulated).
#[derive(Debug, Clone, PartialEq, Eq)]
struct SimContainer {
    name: String,
    env: BTreeMap<String, String>,
}

impl SimDeployment {
    /// The container `wanted`, or the first one; a name it lacks is
    /// [`KubeError::Invalid`], worded as the real adapter words it.
    fn container_mut(
        &mut self,
        deployable: &str,
        wanted: Option<&str>,
    ) -> Result<&mut SimContainer, KubeError> {
        let names = || {
            self.containers
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let index = match wanted {
            Some(w) => self
                .containers
                .iter()
                .position(|c| c.name == w)
                .ok_or_else(|| {
                    KubeError::Invalid(format!(
                        "deployment {deployable} has no container {w:?} (its containers: {})",
                        names()
                    ))
                })?,
            None if self.containers.is_empty() => {
                return Err(KubeError::Invalid(format!(
                    "deployment {deployable} has no container"
                )))
            }
            None => 0,
        };
        Ok(&mut self.containers[index])
    }

    /// Takes the applied manifest's containers, as a server-side apply does: the env
    /// vars the apply names are set (and those it named before but no longer does are
    /// removed); containers and env vars that others added (a model load) stay.
    fn apply_containers(
        &mut self,
        manifest: &serde_json::Value,
        previous: Option<&serde_json::Value>,
    ) {
        for applied in manifest_containers(manifest) {
            let before = previous
                .map(manifest_containers)
                .unwrap_or_default()
                .into_iter()
                .find(|c| c.name == applied.name);
            let container = match self.containers.iter_mut().find(|c| c.name == applied.name) {
                Some(c) => c,
                None => {
                    self.containers.push(SimContainer {
                        name: applied.name.clone(),
                        env: BTreeMap::new(),
                    });
                    let last = self.containers.len() - 1;
                    &mut self.containers[last]
                }
            };
            if let Some(before) = before {
                for name in before.env.keys() {
                    if !applied.env.contains_key(name) {
                        container.env.remove(name);
                    }
                }
            }
            container.env.extend(applied.env);
        }
    }
}

/// The containers (name and literal env vars) of a Deployment manifest.
fn manifest_containers(manifest: &serde_json::Value) -> Vec<SimContainer> {
    manifest["spec"]["template"]["spec"]["containers"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .map(|c| SimContainer {
                    name: c["name"].as_str().unwrap_or_default().to_string(),
                    env: c["env"]
                        .as_array()
                        .map(|vars| {
                            vars.iter()
                                .filter_map(|v| {
                                    Some((
                                        v["name"].as_str()?.to_string(),
                                        v["value"].as_str()?.to_string(),
                                    ))
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                })
                .collect()
        })
        .unwrap_or_default()
}

#[derive(Debug)]
struct SimHpa {
    object: ObjectStatus,
    /// The minimum pod count asked for (0 is represented as HPA min 1 + zero replicas).
    min_pod_count: i32,
}

#[derive(Debug, Default)]
struct SimState {
    deployments: BTreeMap<Key, SimDeployment>,
    hpas: BTreeMap<Key, SimHpa>,
    pods: BTreeMap<Key, ObjectStatus>,
    jobs: BTreeMap<Key, ObjectStatus>,
    failures: HashMap<String, VecDeque<KubeError>>,
    failing_jobs: HashSet<String>,
    channels: HashMap<(ResourceKind, String), broadcast::Sender<ObjectEvent>>,
    next_uid: u64,
}

impl SimState {
    fn uid(&mut self) -> String {
        self.next_uid += 1;
        format!("00000000-0000-4000-8000-{:012x}", self.next_uid)
    }

    fn take_failure(&mut self, op: &str) -> Result<(), KubeError> {
        match self.failures.get_mut(op).and_then(VecDeque::pop_front) {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    fn emit(&self, event: ObjectEvent) {
        let object = event.object();
        if let Some(tx) = self
            .channels
            .get(&(object.kind(), object.namespace.clone()))
        {
            // Nobody listening is fine: subscribers re-observe when they start.
            let _ = tx.send(event);
        }
    }

    fn deployment_mut(
        &mut self,
        namespace: &str,
        name: &str,
    ) -> Result<&mut SimDeployment, KubeError> {
        self.deployments
            .get_mut(&key(namespace, name))
            .ok_or_else(|| KubeError::NotFound(format!("deployments.apps \"{name}\" not found")))
    }

    /// Records a spec change: bumps the generation and marks the rollout as progressing.
    /// Returns the new generation, for the completion task to check it is still current.
    fn touch_deployment(&mut self, namespace: &str, name: &str) -> Option<i64> {
        let dep = self.deployments.get_mut(&key(namespace, name))?;
        let generation = dep.object.generation.unwrap_or(0) + 1;
        dep.object.generation = Some(generation);
        if let StatusDetail::Deployment(d) = &mut dep.object.detail {
            d.updated_replicas = 0;
            d.progressing = Some(Condition::new(Truth::True, "ReplicaSetUpdated"));
        }
        let event = ObjectEvent::Applied(dep.object.clone());
        self.emit(event);
        Some(generation)
    }

    fn complete_rollout(&mut self, namespace: &str, name: &str, generation: i64) {
        let Some(dep) = self.deployments.get_mut(&key(namespace, name)) else {
            return;
        };
        if dep.object.generation != Some(generation) {
            return; // superseded: a later change has its own completion
        }
        let StatusDetail::Deployment(d) = &mut dep.object.detail else {
            return;
        };
        let replicas = d.replicas;
        d.observed_generation = Some(generation);
        d.status_replicas = replicas;
        d.updated_replicas = replicas;
        d.ready_replicas = replicas;
        d.available_replicas = replicas;
        d.available = Some(Condition::new(Truth::True, "MinimumReplicasAvailable"));
        d.progressing = Some(Condition::new(Truth::True, "NewReplicaSetAvailable"));
        let template_annotations = d.template_annotations.clone();
        let deployment = dep.object.clone();

        let template_hash = format!("{generation:x}");
        let mut labels = BTreeMap::from([(NAME_LABEL.to_string(), name.to_string())]);
        labels.insert("pod-template-hash".to_string(), template_hash.clone());
        for i in 0..replicas {
            let pod_name = format!("{name}-{template_hash}-{i}");
            let pod = ObjectStatus {
                namespace: namespace.to_string(),
                name: pod_name.clone(),
                uid: Some(self.uid()),
                labels: labels.clone(),
                annotations: template_annotations.clone(),
                generation: None,
                deleting: false,
                detail: StatusDetail::Pod(PodStatus {
                    phase: Some("Running".to_string()),
                    ready: true,
                    waiting_reason: None,
                }),
            };
            self.pods.insert(key(namespace, &pod_name), pod.clone());
            self.emit(ObjectEvent::Applied(pod));
        }
        let old: Vec<Key> = self
            .pods
            .iter()
            .filter(|((ns, _), p)| {
                ns == namespace
                    && p.labels.get(NAME_LABEL).map(String::as_str) == Some(name)
                    && p.labels.get("pod-template-hash") != Some(&template_hash)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in old {
            if let Some(pod) = self.pods.remove(&k) {
                self.emit(ObjectEvent::Deleted(pod));
            }
        }
        self.emit(ObjectEvent::Applied(deployment));
    }

    /// Server-side apply of a deployable (see `KubeExecutor::apply_deployable`); returns
    /// the generation whose rollout must be completed, if the apply changed anything.
    fn apply(&mut self, spec: &DeployableSpec) -> Result<(Option<i64>, Baseline), KubeError> {
        validate_pod_counts(spec.min_pod_count, Some(spec.max_pod_count))?;
        let manifest = deployment_manifest(spec)?;
        let (ns, name) = (spec.namespace.as_str(), spec.name.as_str());
        let mut gpu_annotations = BTreeMap::new();
        if let Some(memory) = spec.resources.gpu.as_ref().and_then(|g| g.memory.as_ref()) {
            gpu_annotations.insert(
                GPU_MEMORY_REQUEST_ANNOTATION.to_string(),
                memory.request.clone(),
            );
            gpu_annotations.insert(
                GPU_MEMORY_LIMIT_ANNOTATION.to_string(),
                memory.limit.clone(),
            );
        }
        let mut generation = None;
        if let Ok(dep) = self.deployment_mut(ns, name) {
            let template_changed = dep.manifest != manifest;
            let mut replicas_changed = false;
            if let StatusDetail::Deployment(d) = &mut dep.object.detail {
                let replicas =
                    converged_replicas(d.replicas, spec.min_pod_count, spec.max_pod_count);
                replicas_changed = replicas != d.replicas;
                d.replicas = replicas;
                if template_changed {
                    d.template_annotations.retain(|k, _| {
                        k != GPU_MEMORY_REQUEST_ANNOTATION && k != GPU_MEMORY_LIMIT_ANNOTATION
                    });
                    d.template_annotations.extend(gpu_annotations);
                }
            }
            if template_changed {
                let previous = std::mem::replace(&mut dep.manifest, manifest);
                dep.apply_containers(&dep.manifest.clone(), Some(&previous));
            }
            if template_changed || replicas_changed {
                generation = self.touch_deployment(ns, name);
            }
        } else {
            let uid = self.uid();
            let detail = StatusDetail::Deployment(DeploymentStatus {
                replicas: spec.min_pod_count,
                template_annotations: gpu_annotations,
                selector: Some(format!("{NAME_LABEL}={name}")),
                progressing: Some(Condition::new(Truth::True, "NewReplicaSetCreated")),
                ..DeploymentStatus::default()
            });
            let mut dep = SimDeployment {
                object: object(ns, name, uid, detail),
                containers: Vec::new(),
                manifest: manifest.clone(),
            };
            dep.apply_containers(&manifest, None);
            self.emit(ObjectEvent::Applied(dep.object.clone()));
            self.deployments.insert(key(ns, name), dep);
            generation = Some(1);
        }
        let hpa_uid = match self.hpas.get(&key(ns, name)) {
            Some(h) => h.object.uid.clone().unwrap_or_default(),
            None => self.uid(),
        };
        let hpa = SimHpa {
            object: object(
                ns,
                name,
                hpa_uid,
                StatusDetail::HorizontalPodAutoscaler(HpaStatus {
                    min_replicas: Some(spec.min_pod_count.max(1)),
                    max_replicas: spec.max_pod_count,
                    ..HpaStatus::default()
                }),
            ),
            min_pod_count: spec.min_pod_count,
        };
        self.emit(ObjectEvent::Applied(hpa.object.clone()));
        self.hpas.insert(key(ns, name), hpa);
        Ok((generation, baseline_of(self, ns, name)?))
    }

    fn finish_job(&mut self, namespace: &str, name: &str, uid: &str) {
        let fail = self.failing_jobs.contains(name);
        let Some(job) = self.jobs.get_mut(&key(namespace, name)) else {
            return;
        };
        if job.uid.as_deref() != Some(uid) {
            return;
        }
        if let StatusDetail::Job(j) = &mut job.detail {
            j.active = 0;
            if fail {
                j.failed_pods = 1;
                j.failed = Some(Condition {
                    status: Truth::True,
                    reason: Some("BackoffLimitExceeded".to_string()),
                    message: Some("Job has reached the specified backoff limit".to_string()),
                });
            } else {
                j.succeeded = 1;
                j.complete = Some(Condition::new(Truth::True, "Completed"));
            }
        }
        let event = ObjectEvent::Applied(job.clone());
        self.emit(event);
    }
}

fn object(namespace: &str, name: &str, uid: String, detail: StatusDetail) -> ObjectStatus {
    ObjectStatus {
        namespace: namespace.to_string(),
        name: name.to_string(),
        uid: Some(uid),
        labels: BTreeMap::from([
            (NAME_LABEL.to_string(), name.to_string()),
            (MANAGED_BY_LABEL.to_string(), FIELD_MANAGER.to_string()),
        ]),
        annotations: BTreeMap::new(),
        generation: Some(1),
        deleting: false,
        detail,
    }
}

struct Inner {
    ready_delay: Duration,
    state: Mutex<SimState>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, SimState> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The simulated cluster. Cheap to clone; clones share the cluster.
#[derive(Clone)]
pub struct SimKube {
    inner: Arc<Inner>,
}

impl SimKube {
    /// An empty cluster whose rollouts and jobs finish `ready_delay` after each change.
    pub fn new(ready_delay: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                ready_delay,
                state: Mutex::new(SimState::default()),
            }),
        }
    }

    /// The delay after which rollouts and jobs finish.
    pub fn ready_delay(&self) -> Duration {
        self.inner.ready_delay
    }

    /// Makes the next call of `op` (one of [`OPERATIONS`]) fail with `error`; several
    /// calls queue several failures.
    pub fn fail_next(&self, op: &str, error: KubeError) {
        debug_assert!(OPERATIONS.contains(&op), "unknown operation {op}");
        self.inner
            .lock()
            .failures
            .entry(op.to_string())
            .or_default()
            .push_back(error);
    }

    /// Makes the Job `job_name` (in any namespace, existing or future) end `Failed`.
    pub fn fail_job(&self, job_name: &str) {
        self.inner.lock().failing_jobs.insert(job_name.to_string());
    }

    /// The minimum pod count last set on the deployable (0 after a scale to zero), or
    /// `None` when it has no HPA.
    pub fn min_replicas(&self, namespace: &str, name: &str) -> Option<i32> {
        self.inner
            .lock()
            .hpas
            .get(&key(namespace, name))
            .map(|h| h.min_pod_count)
    }

    /// The Deployment's `spec.replicas`, if it exists.
    pub fn replicas(&self, namespace: &str, name: &str) -> Option<i32> {
        match self.deployment(namespace, name)?.detail {
            StatusDetail::Deployment(d) => Some(d.replicas),
            _ => None,
        }
    }

    /// The Deployment's current state, if it exists.
    pub fn deployment(&self, namespace: &str, name: &str) -> Option<ObjectStatus> {
        self.inner
            .lock()
            .deployments
            .get(&key(namespace, name))
            .map(|d| d.object.clone())
    }

    /// The names of the Deployment's pod-template containers, in order (empty when it
    /// does not exist).
    pub fn containers(&self, namespace: &str, name: &str) -> Vec<String> {
        self.inner
            .lock()
            .deployments
            .get(&key(namespace, name))
            .map(|d| d.containers.iter().map(|c| c.name.clone()).collect())
            .unwrap_or_default()
    }

    /// The env vars of the Deployment's pod-template container `container` (what a
    /// model load sets), if both exist.
    pub fn container_env(
        &self,
        namespace: &str,
        name: &str,
        container: &str,
    ) -> Option<BTreeMap<String, String>> {
        self.inner
            .lock()
            .deployments
            .get(&key(namespace, name))?
            .containers
            .iter()
            .find(|c| c.name == container)
            .map(|c| c.env.clone())
    }

    /// Appends a container `container` (no env vars) to an existing Deployment's pod
    /// template, as a sidecar injected or added by someone other than the resource
    /// plane; no rollout is simulated for it. Adding a name it has is a no-op.
    pub fn add_container(
        &self,
        namespace: &str,
        name: &str,
        container: &str,
    ) -> Result<(), KubeError> {
        let mut st = self.inner.lock();
        let dep = st.deployment_mut(namespace, name)?;
        if !dep.containers.iter().any(|c| c.name == container) {
            dep.containers.push(SimContainer {
                name: container.to_string(),
                env: BTreeMap::new(),
            });
        }
        Ok(())
    }

    /// The HPA's current state, if it exists.
    pub fn hpa(&self, namespace: &str, name: &str) -> Option<ObjectStatus> {
        self.inner
            .lock()
            .hpas
            .get(&key(namespace, name))
            .map(|h| h.object.clone())
    }

    /// The Job's current state, if it exists.
    pub fn job(&self, namespace: &str, name: &str) -> Option<ObjectStatus> {
        self.inner.lock().jobs.get(&key(namespace, name)).cloned()
    }

    /// Every pod in `namespace`.
    pub fn pods(&self, namespace: &str) -> Vec<ObjectStatus> {
        self.inner
            .lock()
            .pods
            .iter()
            .filter(|((ns, _), _)| ns == namespace)
            .map(|(_, p)| p.clone())
            .collect()
    }

    /// Adds (or updates) a deployable that is already rolled out: Deployment, HPA and
    /// Ready pods exist at once, as for the pre-provisioned shadow deployables of the
    /// embedded mode and of tests. Changes are broadcast as usual.
    pub fn seed_deployable(&self, spec: &DeployableSpec) -> Result<Baseline, KubeError> {
        let mut st = self.inner.lock();
        let (generation, baseline) = st.apply(spec)?;
        if let Some(g) = generation {
            st.complete_rollout(&spec.namespace, &spec.name, g);
        }
        Ok(baseline)
    }

    fn schedule_rollout(&self, namespace: &str, name: &str, generation: i64) {
        let inner = Arc::clone(&self.inner);
        let (namespace, name) = (namespace.to_string(), name.to_string());
        // The deadline is taken now, not when the task first runs.
        let deadline = tokio::time::Instant::now() + inner.ready_delay;
        tokio::spawn(async move {
            tokio::time::sleep_until(deadline).await;
            inner.lock().complete_rollout(&namespace, &name, generation);
        });
    }

    fn schedule_job(&self, namespace: &str, name: &str, uid: String) {
        let inner = Arc::clone(&self.inner);
        let (namespace, name) = (namespace.to_string(), name.to_string());
        // The deadline is taken now, not when the task first runs.
        let deadline = tokio::time::Instant::now() + inner.ready_delay;
        tokio::spawn(async move {
            tokio::time::sleep_until(deadline).await;
            inner.lock().finish_job(&namespace, &name, &uid);
        });
    }

    /// Sets `annotations` on a Deployment's pod template and starts its rollout.
    fn annotate_template(
        &self,
        namespace: &str,
        name: &str,
        annotations: &[(&str, &str)],
    ) -> Result<Baseline, KubeError> {
        self.change_template(namespace, name, annotations, None)
    }

    /// Sets `annotations` on a Deployment's pod template and, with `env = Some((container,
    /// vars))`, `vars` on that container (`None`: the first; a name it lacks is
    /// [`KubeError::Invalid`] and nothing changes), all at once as one patch does; starts
    /// a rollout if anything changed.
    fn change_template(
        &self,
        namespace: &str,
        name: &str,
        annotations: &[(&str, &str)],
        env: Option<EnvChange<'_>>,
    ) -> Result<Baseline, KubeError> {
        let mut st = self.inner.lock();
        let dep = st.deployment_mut(namespace, name)?;
        let mut changed = false;
        if let Some((container, vars)) = env {
            let container = dep.container_mut(name, container)?;
            for (k, v) in vars {
                changed |= container
                    .env
                    .insert(k.to_string(), v.to_string())
                    .as_deref()
                    != Some(*v);
            }
        }
        if let StatusDetail::Deployment(d) = &mut dep.object.detail {
            for (k, v) in annotations {
                changed |= d
                    .template_annotations
                    .insert(k.to_string(), v.to_string())
                    .as_deref()
                    != Some(*v);
            }
        }
        let generation = if changed {
            st.touch_deployment(namespace, name)
        } else {
            None
        };
        let baseline = baseline_of(&st, namespace, name);
        drop(st);
        if let Some(g) = generation {
            self.schedule_rollout(namespace, name, g);
        }
        baseline
    }
}

fn baseline_of(st: &SimState, namespace: &str, name: &str) -> Result<Baseline, KubeError> {
    let dep = st
        .deployments
        .get(&key(namespace, name))
        .ok_or_else(|| KubeError::NotFound(format!("deployments.apps \"{name}\" not found")))?;
    let selector = match &dep.object.detail {
        StatusDetail::Deployment(d) => d.selector.clone(),
        _ => None,
    };
    Ok(Baseline {
        generation: dep.object.generation,
        uid: dep.object.uid.clone(),
        label_selector: selector,
        ..Baseline::new(ResourceKind::Deployment, namespace, name)
    })
}

/// The replica count the deployable converges to for a minimum of `min` (see
/// [`KubeExecutor::set_min_replicas`]).
fn converged_replicas(current: i32, min: i32, max: i32) -> i32 {
    if min == 0 {
        0
    } else {
        current.max(min).min(max.max(min))
    }
}

#[async_trait]
impl KubeExecutor for SimKube {
    #[tracing::instrument(level = "debug", name = "sim_kube.apply_deployable", skip_all)]
    async fn apply_deployable(&self, spec: &DeployableSpec) -> Result<Baseline, KubeError> {
        let mut st = self.inner.lock();
        st.take_failure("apply_deployable")?;
        let (generation, baseline) = st.apply(spec)?;
        drop(st);
        if let Some(g) = generation {
            self.schedule_rollout(&spec.namespace, &spec.name, g);
        }
        Ok(baseline)
    }

    #[tracing::instrument(level = "debug", name = "sim_kube.restart", skip_all)]
    async fn restart(
        &self,
        namespace: &str,
        name: Option<&str>,
        stamp: &str,
    ) -> Result<Vec<Baseline>, KubeError> {
        let names = {
            let mut st = self.inner.lock();
            st.take_failure("restart")?;
            let names: Vec<String> = match name {
                Some(n) => {
                    st.deployment_mut(namespace, n)?;
                    vec![n.to_string()]
                }
                None => st
                    .deployments
                    .keys()
                    .filter(|(ns, _)| ns == namespace)
                    .map(|(_, n)| n.clone())
                    .collect(),
            };
            if names.is_empty() {
                return Err(KubeError::NotFound(format!(
                    "no deployments found in namespace {namespace}"
                )));
            }
            names
        };
        let mut baselines = Vec::with_capacity(names.len());
        for n in names {
            let baseline =
                self.annotate_template(namespace, &n, &[(RESTARTED_AT_ANNOTATION, stamp)])?;
            baselines.push(Baseline {
                template_annotation: Some(RESTARTED_AT_ANNOTATION.to_string()),
                template_hash: Some(stamp.to_owned()),
                ..baseline
            });
        }
        Ok(baselines)
    }

    #[tracing::instrument(level = "debug", name = "sim_kube.load_model", skip_all)]
    async fn load_model(
        &self,
        namespace: &str,
        deployable: &str,
        container: Option<&str>,
        model: &ModelSpec,
        stamp: &str,
    ) -> Result<Baseline, KubeError> {
        self.inner.lock().take_failure("load_model")?;
        let baseline = self.change_template(
            namespace,
            deployable,
            &[
                (MODEL_NAME_ANNOTATION, &model.name),
                (MODEL_VERSION_ANNOTATION, &model.version),
                (MODEL_ARTIFACT_ANNOTATION, &model.artifact_location),
                (MODEL_LOADED_AT_ANNOTATION, stamp),
            ],
            Some((
                container,
                &[
                    (MODEL_NAME_ENV, &model.name),
                    (MODEL_VERSION_ENV, &model.version),
                    (MODEL_ARTIFACT_LOCATION_ENV, &model.artifact_location),
                ],
            )),
        )?;
        Ok(Baseline {
            kind: ResourceKind::Pod,
            template_annotation: Some(MODEL_LOADED_AT_ANNOTATION.to_string()),
            template_hash: Some(stamp.to_owned()),
            ..baseline
        })
    }

    #[tracing::instrument(level = "debug", name = "sim_kube.create_job", skip_all)]
    async fn create_job(&self, spec: &JobSpec) -> Result<Baseline, KubeError> {
        let mut st = self.inner.lock();
        st.take_failure("create_job")?;
        let (ns, name) = (spec.namespace.as_str(), spec.job_name.as_str());
        if let Some(existing) = st.jobs.get(&key(ns, name)) {
            // A repeated create of the same request counts as created.
            if existing.labels.get(REQUEST_ID_LABEL) == Some(&spec.request_id) {
                return Ok(Baseline {
                    generation: existing.generation,
                    uid: existing.uid.clone(),
                    label_selector: Some(format!("{NAME_LABEL}={name}")),
                    ..Baseline::new(ResourceKind::Job, ns, name)
                });
            }
            return Err(KubeError::Conflict(format!(
                "jobs.batch \"{name}\" already exists"
            )));
        }
        let uid = st.uid();
        let mut job = object(
            ns,
            name,
            uid.clone(),
            StatusDetail::Job(JobStatus {
                active: 1,
                ..JobStatus::default()
            }),
        );
        job.labels
            .insert(REQUEST_ID_LABEL.to_string(), spec.request_id.clone());
        st.emit(ObjectEvent::Applied(job.clone()));
        st.jobs.insert(key(ns, name), job);
        drop(st);
        self.schedule_job(ns, name, uid.clone());
        Ok(Baseline {
            generation: Some(1),
            uid: Some(uid),
            label_selector: Some(format!("{NAME_LABEL}={name}")),
            ..Baseline::new(ResourceKind::Job, ns, name)
        })
    }

    #[tracing::instrument(level = "debug", name = "sim_kube.set_min_replicas", skip_all)]
    async fn set_min_replicas(
        &self,
        namespace: &str,
        target: &ScaleTarget,
        min: i32,
    ) -> Result<(), KubeError> {
        let (hpa_name, deployable) = (target.hpa.as_str(), target.deployment.as_str());
        let mut st = self.inner.lock();
        st.take_failure("set_min_replicas")?;
        validate_pod_counts(min, None)?;
        let hpa = st.hpas.get_mut(&key(namespace, hpa_name)).ok_or_else(|| {
            KubeError::NotFound(format!(
                "horizontalpodautoscalers.autoscaling \"{hpa_name}\" not found"
            ))
        })?;
        let max = match &mut hpa.object.detail {
            StatusDetail::HorizontalPodAutoscaler(h) => {
                if min > h.max_replicas {
                    return Err(KubeError::Invalid(format!(
                        "HorizontalPodAutoscaler.autoscaling \"{hpa_name}\" is invalid: spec.minReplicas: Invalid value: {min}: must be less than or equal to maxReplicas"
                    )));
                }
                h.min_replicas = Some(min.max(1));
                h.max_replicas
            }
            _ => i32::MAX,
        };
        hpa.min_pod_count = min;
        let event = ObjectEvent::Applied(hpa.object.clone());
        st.emit(event);
        let mut changed = false;
        if let Ok(dep) = st.deployment_mut(namespace, deployable) {
            if let StatusDetail::Deployment(d) = &mut dep.object.detail {
                let replicas = converged_replicas(d.replicas, min, max);
                changed = replicas != d.replicas;
                d.replicas = replicas;
            }
        }
        let generation = if changed {
            st.touch_deployment(namespace, deployable)
        } else {
            None
        };
        drop(st);
        if let Some(g) = generation {
            self.schedule_rollout(namespace, deployable, g);
        }
        Ok(())
    }

    #[tracing::instrument(level = "debug", name = "sim_kube.observed_min_replicas", skip_all)]
    async fn observed_min_replicas(
        &self,
        namespace: &str,
        target: &ScaleTarget,
    ) -> Result<Option<i32>, KubeError> {
        let deployable = target.deployment.as_str();
        let mut st = self.inner.lock();
        st.take_failure("observed_min_replicas")?;
        let Some(hpa) = st.hpas.get(&key(namespace, &target.hpa)) else {
            return Ok(None);
        };
        let min = match &hpa.object.detail {
            StatusDetail::HorizontalPodAutoscaler(h) => h.min_replicas.unwrap_or(1),
            _ => 1,
        };
        let replicas = match st.deployments.get(&key(namespace, deployable)) {
            Some(d) => match &d.object.detail {
                StatusDetail::Deployment(d) => d.replicas,
                _ => 0,
            },
            None => return Ok(None),
        };
        Ok(Some(if replicas == 0 { 0 } else { min }))
    }

    #[tracing::instrument(level = "debug", name = "sim_kube.observe", skip_all)]
    async fn observe(&self, baseline: &Baseline) -> Result<Observation, KubeError> {
        let mut st = self.inner.lock();
        st.take_failure("observe")?;
        let ns = baseline.namespace.as_str();
        let mut objects = Vec::new();
        if let Some(name) = baseline.name.as_deref() {
            let k = key(ns, name);
            let named = match baseline.kind {
                ResourceKind::Deployment | ResourceKind::Pod => {
                    st.deployments.get(&k).map(|d| d.object.clone())
                }
                ResourceKind::Job => st.jobs.get(&k).cloned(),
                ResourceKind::HorizontalPodAutoscaler => st.hpas.get(&k).map(|h| h.object.clone()),
            };
            objects.extend(named);
        }
        if baseline.kind == ResourceKind::Pod {
            objects.extend(
                st.pods
                    .values()
                    .filter(|p| baseline.is_relevant(p))
                    .cloned(),
            );
        }
        Ok(Observation::new(objects))
    }

    fn subscribe(&self, kind: ResourceKind, namespace: &str) -> broadcast::Receiver<ObjectEvent> {
        self.inner
            .lock()
            .channels
            .entry((kind, namespace.to_string()))
            .or_insert_with(|| broadcast::channel(WATCH_CHANNEL_CAPACITY).0)
            .subscribe()
    }

    fn name(&self) -> &'static str {
        "sim-kube"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::conditions::{evaluate, DesiredCondition, Verdict};
    use crate::ports::kube::{
        ModelToLoad, RequestLimit, ResourceSpec, DEPLOYABLE_CONTAINER, MODELS_TO_LOAD_ENV,
        MODEL_ARTIFACT_LOCATION_ENV, MODEL_NAME_ENV, MODEL_VERSION_ENV,
    };

    const DELAY: Duration = Duration::from_secs(5);

    fn spec(name: &str, min: i32) -> DeployableSpec {
        DeployableSpec {
            name: name.to_string(),
            namespace: "int".to_string(),
            image: "registry.local/predator:1.4.2".to_string(),
            node_selector: BTreeMap::from([("node_pool".to_string(), "g2-std-16".to_string())]),
            min_pod_count: min,
            max_pod_count: 8,
            resources: ResourceSpec {
                cpu: RequestLimit {
                    request: "2".into(),
                    limit: "4".into(),
                },
                memory: RequestLimit {
                    request: "4Gi".into(),
                    limit: "8Gi".into(),
                },
                gpu: None,
            },
            models_to_load: vec![],
        }
    }

    async fn verdict(sim: &SimKube, b: &Baseline, desired: DesiredCondition) -> Verdict {
        let obs = sim.observe(b).await.unwrap();
        evaluate(b, desired, &obs.objects)
    }

    /// Lets spawned completion tasks whose timers fired run.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn deployable_becomes_available_after_delay() {
        let sim = SimKube::new(DELAY);
        let mut events = sim.subscribe(ResourceKind::Deployment, "int");
        let b = sim.apply_deployable(&spec("web", 2)).await.unwrap();
        assert_eq!(b.generation, Some(1));
        assert!(matches!(
            verdict(&sim, &b, DesiredCondition::Available).await,
            Verdict::Pending { .. }
        ));
        assert!(matches!(events.recv().await.unwrap(), ObjectEvent::Applied(o) if o.name == "web"));

        tokio::time::advance(DELAY - Duration::from_millis(1)).await;
        settle().await;
        assert!(matches!(
            verdict(&sim, &b, DesiredCondition::Available).await,
            Verdict::Pending { .. }
        ));
        tokio::time::advance(Duration::from_millis(1)).await;
        settle().await;
        assert_eq!(
            verdict(&sim, &b, DesiredCondition::Available).await,
            Verdict::Satisfied
        );
        assert_eq!(sim.pods("int").len(), 2);
        assert_eq!(sim.min_replicas("int", "web"), Some(2));
        // The completion was broadcast as well.
        let mut last = None;
        while let Ok(e) = events.try_recv() {
            last = Some(e);
        }
        let Some(ObjectEvent::Applied(o)) = last else {
            panic!("no completion event")
        };
        assert_eq!(
            evaluate(&b, DesiredCondition::Available, &[o]),
            Verdict::Satisfied
        );
    }

    #[tokio::test(start_paused = true)]
    async fn restart_is_not_satisfied_by_the_previous_rollout() {
        let sim = SimKube::new(DELAY);
        sim.apply_deployable(&spec("web", 2)).await.unwrap();
        sim.apply_deployable(&spec("api", 1)).await.unwrap();
        tokio::time::advance(DELAY).await;
        settle().await;

        let baselines = sim
            .restart("int", None, "2026-01-01T00:00:00.000Z")
            .await
            .unwrap();
        assert_eq!(baselines.len(), 2);
        for b in &baselines {
            assert_eq!(b.generation, Some(2));
            assert!(matches!(
                verdict(&sim, b, DesiredCondition::RolloutComplete).await,
                Verdict::Pending { .. }
            ));
        }
        tokio::time::advance(DELAY).await;
        settle().await;
        for b in &baselines {
            assert_eq!(
                verdict(&sim, b, DesiredCondition::RolloutComplete).await,
                Verdict::Satisfied
            );
        }
        let err = sim
            .restart("prod", None, "2026-01-01T00:00:00.000Z")
            .await
            .unwrap_err();
        assert!(matches!(err, KubeError::NotFound(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn load_model_rolls_pods_onto_the_new_template() {
        let sim = SimKube::new(DELAY);
        let mut pod_events = sim.subscribe(ResourceKind::Pod, "int");
        sim.apply_deployable(&spec("web", 2)).await.unwrap();
        tokio::time::advance(DELAY).await;
        settle().await;
        let old_pods: Vec<String> = sim.pods("int").into_iter().map(|p| p.name).collect();

        let model = ModelSpec {
            name: "ranker".into(),
            version: "7".into(),
            artifact_location: "s3://models/ranker/7".into(),
        };
        let b = sim
            .load_model("int", "web", None, &model, "2026-01-01T00:00:00.000Z")
            .await
            .unwrap();
        assert_eq!(b.kind, ResourceKind::Pod);
        assert_eq!(b.label_selector.as_deref(), Some("name=web"));
        assert!(matches!(
            verdict(&sim, &b, DesiredCondition::PodsReadyOnNewTemplate).await,
            Verdict::Pending { .. }
        ));
        tokio::time::advance(DELAY).await;
        settle().await;
        assert_eq!(
            verdict(&sim, &b, DesiredCondition::PodsReadyOnNewTemplate).await,
            Verdict::Satisfied
        );
        let pods = sim.pods("int");
        assert_eq!(pods.len(), 2);
        for p in &pods {
            assert!(!old_pods.contains(&p.name));
            assert_eq!(
                p.annotations
                    .get(MODEL_VERSION_ANNOTATION)
                    .map(String::as_str),
                Some("7")
            );
        }
        // The model reached the serving container (the first one: none was named).
        let env = sim
            .container_env("int", "web", DEPLOYABLE_CONTAINER)
            .unwrap();
        assert_eq!(env.get(MODEL_NAME_ENV).map(String::as_str), Some("ranker"));
        assert_eq!(env.get(MODEL_VERSION_ENV).map(String::as_str), Some("7"));
        assert_eq!(
            env.get(MODEL_ARTIFACT_LOCATION_ENV).map(String::as_str),
            Some("s3://models/ranker/7")
        );
        let mut deleted = 0;
        while let Ok(e) = pod_events.try_recv() {
            if matches!(e, ObjectEvent::Deleted(_)) {
                deleted += 1;
            }
        }
        assert_eq!(deleted, 2);
        let missing = sim
            .load_model("int", "nope", None, &model, "2026-01-01T00:00:00.000Z")
            .await
            .unwrap_err();
        assert_eq!(
            missing,
            KubeError::NotFound("deployments.apps \"nope\" not found".into())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn load_model_sets_the_env_of_the_named_container_only() {
        let sim = SimKube::new(DELAY);
        let mut web = spec("web", 1);
        web.models_to_load = vec![ModelToLoad {
            name: "ranker".into(),
            version: "6".into(),
            runtime: "triton".into(),
            precision: "fp16".into(),
            batch_size: 8,
            artifact_version: "6".into(),
        }];
        sim.seed_deployable(&web).unwrap();
        sim.add_container("int", "web", "ranker").unwrap();
        assert_eq!(
            sim.containers("int", "web"),
            vec![DEPLOYABLE_CONTAINER.to_string(), "ranker".to_string()]
        );
        let model = ModelSpec {
            name: "ranker".into(),
            version: "7".into(),
            artifact_location: "s3://models/ranker/7".into(),
        };
        let stamp = "2026-01-01T00:00:00.000Z";
        let b = sim
            .load_model("int", "web", Some("ranker"), &model, stamp)
            .await
            .unwrap();
        let ranker = sim.container_env("int", "web", "ranker").unwrap();
        assert_eq!(ranker.get(MODEL_VERSION_ENV).map(String::as_str), Some("7"));
        let main = sim
            .container_env("int", "web", DEPLOYABLE_CONTAINER)
            .unwrap();
        assert_eq!(main.get(MODEL_VERSION_ENV), None);
        assert!(main.contains_key(MODELS_TO_LOAD_ENV));

        // A container the Deployment lacks: refused, and nothing changes.
        let generation = sim.deployment("int", "web").unwrap().generation;
        let err = sim
            .load_model(
                "int",
                "web",
                Some("gpu-server"),
                &model,
                "2026-01-01T00:01:00.000Z",
            )
            .await
            .unwrap_err();
        assert_eq!(
            err,
            KubeError::Invalid(
                "deployment web has no container \"gpu-server\" (its containers: main, ranker)"
                    .into()
            )
        );
        assert_eq!(sim.deployment("int", "web").unwrap().generation, generation);

        // Re-applying the deployable (another field manager's apply, as on a real
        // cluster) keeps the loaded model.
        tokio::time::advance(DELAY).await;
        settle().await;
        web.image = "registry.local/predator:1.5.0".into();
        sim.apply_deployable(&web).await.unwrap();
        let ranker = sim.container_env("int", "web", "ranker").unwrap();
        assert_eq!(
            ranker.get(MODEL_NAME_ENV).map(String::as_str),
            Some("ranker")
        );
        assert_eq!(b.kind, ResourceKind::Pod);
    }

    #[tokio::test(start_paused = true)]
    async fn jobs_complete_or_fail() {
        let sim = SimKube::new(DELAY);
        let job = |name: &str| JobSpec {
            job_name: name.into(),
            namespace: "int".into(),
            image: "busybox".into(),
            payload: serde_json::json!({"k": 1}),
            request_id: format!("op-{name}"),
        };
        sim.fail_job("bad");
        let ok = sim.create_job(&job("good")).await.unwrap();
        let bad = sim.create_job(&job("bad")).await.unwrap();
        let again = sim.create_job(&job("good")).await.unwrap();
        assert_eq!(again.uid, ok.uid, "the same request creates nothing new");
        let other = JobSpec {
            request_id: "op-other".into(),
            ..job("good")
        };
        assert!(matches!(
            sim.create_job(&other).await,
            Err(KubeError::Conflict(_))
        ));
        assert!(matches!(
            verdict(&sim, &ok, DesiredCondition::JobComplete).await,
            Verdict::Pending { .. }
        ));
        tokio::time::advance(DELAY).await;
        settle().await;
        assert_eq!(
            verdict(&sim, &ok, DesiredCondition::JobComplete).await,
            Verdict::Satisfied
        );
        assert!(matches!(
            verdict(&sim, &bad, DesiredCondition::JobComplete).await,
            Verdict::Failed { reason } if reason.contains("BackoffLimitExceeded")
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn min_replicas_and_scale_to_zero() {
        let sim = SimKube::new(DELAY);
        sim.apply_deployable(&spec("web", 1)).await.unwrap();
        sim.set_min_replicas("int", &ScaleTarget::same("web"), 4)
            .await
            .unwrap();
        assert_eq!(
            (sim.min_replicas("int", "web"), sim.replicas("int", "web")),
            (Some(4), Some(4))
        );
        sim.set_min_replicas("int", &ScaleTarget::same("web"), 0)
            .await
            .unwrap();
        assert_eq!(
            (sim.min_replicas("int", "web"), sim.replicas("int", "web")),
            (Some(0), Some(0))
        );
        let StatusDetail::HorizontalPodAutoscaler(h) = sim.hpa("int", "web").unwrap().detail else {
            panic!("not an hpa")
        };
        assert_eq!(h.min_replicas, Some(1));
        tokio::time::advance(DELAY).await;
        settle().await;
        assert!(sim.pods("int").is_empty());
        assert!(matches!(
            sim.set_min_replicas("int", &ScaleTarget::same("web"), 9)
                .await,
            Err(KubeError::Invalid(_))
        ));
        assert!(matches!(
            sim.set_min_replicas("int", &ScaleTarget::same("web"), -1)
                .await,
            Err(KubeError::Invalid(_))
        ));
        assert!(matches!(
            sim.set_min_replicas("int", &ScaleTarget::same("nope"), 1)
                .await,
            Err(KubeError::NotFound(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn seeded_deployables_are_ready_at_once() {
        let sim = SimKube::new(DELAY);
        let b = sim.seed_deployable(&spec("shadow", 0)).unwrap();
        assert_eq!(
            verdict(&sim, &b, DesiredCondition::Available).await,
            Verdict::Satisfied
        );
        assert_eq!(sim.min_replicas("int", "shadow"), Some(0));
        sim.set_min_replicas("int", &ScaleTarget::same("shadow"), 3)
            .await
            .unwrap();
        let b = sim.observe(&b).await.unwrap();
        let generation = b.objects[0].generation;
        let after = Baseline {
            generation,
            ..Baseline::new(ResourceKind::Deployment, "int", "shadow")
        };
        assert!(matches!(
            verdict(&sim, &after, DesiredCondition::Available).await,
            Verdict::Pending { .. }
        ));
        tokio::time::advance(DELAY).await;
        settle().await;
        assert_eq!(
            verdict(&sim, &after, DesiredCondition::Available).await,
            Verdict::Satisfied
        );
        assert_eq!(sim.pods("int").len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn injected_failures_are_returned_once() {
        let sim = SimKube::new(DELAY);
        sim.fail_next("apply_deployable", KubeError::Forbidden("denied".into()));
        sim.fail_next("observe", KubeError::Unavailable("down".into()));
        assert_eq!(
            sim.apply_deployable(&spec("web", 1)).await,
            Err(KubeError::Forbidden("denied".into()))
        );
        let b = sim.apply_deployable(&spec("web", 1)).await.unwrap();
        assert!(sim.observe(&b).await.is_err());
        assert!(sim.observe(&b).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn reapplying_an_unchanged_deployable_does_not_bump_the_generation() {
        let sim = SimKube::new(DELAY);
        let first = sim.apply_deployable(&spec("web", 2)).await.unwrap();
        let again = sim.apply_deployable(&spec("web", 2)).await.unwrap();
        assert_eq!(first.generation, again.generation);
        let mut changed = spec("web", 2);
        changed.image = "registry.local/predator:1.5.0".into();
        let third = sim.apply_deployable(&changed).await.unwrap();
        assert_eq!(third.generation, Some(2));
    }
}
