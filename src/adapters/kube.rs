//! Real `KubeExecutor` on `kube::Client`: server-side apply, merge patches, the scale
//! subresource, Job creation, and one shared kube-runtime watch per (kind, namespace).
//!
//! The client is built in one place ([`KubeAdapter::connect`]: in-cluster service
//! account, else `KUBECONFIG`/`~/.kube/config`), or handed in ([`KubeAdapter::new`]) so
//! tests can put a `tower_test` mock service under it. TLS is rustls with ring.
//!
//! The conversions from `k8s-openapi` objects to the normalized
//! [`ObjectStatus`](crate::domain::conditions::ObjectStatus) live here too
//! (`ObjectStatus::from(&deployment)`), so condition evaluation can be tested on recorded
//! API objects.
//!
//! Requests issued (for the RBAC Role), all namespaced:
//! - `apps` `deployments`: `patch` (server-side apply, restart, model load), `get`
//!   (model load, watcher reads), `list`, `watch`; `deployments/scale`: `get`, `patch`;
//! - `autoscaling` `horizontalpodautoscalers`: `patch` (apply, min replicas), `get`,
//!   `list`, `watch`;
//! - `batch` `jobs`: `create`, `get`, `list`, `watch`;
//! - core `pods`: `list`, `watch`.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::sync::Mutex;

use async_trait::async_trait;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::{Job, JobSpec as K8sJobSpec};
use k8s_openapi::api::core::v1::{Container, EnvVar, Pod, PodSpec, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use serde_json::{json, Map, Value};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use crate::config::KubeClientSettings;
use crate::domain::conditions::{
    selector_from_labels, Condition, DeploymentStatus, HpaStatus, JobStatus, PodStatus,
    StatusDetail, Truth,
};
use crate::ports::kube::ScaleTarget;
use crate::ports::kube::{
    validate_pod_counts, Baseline, DeployableSpec, JobSpec, KubeError, KubeExecutor, ModelSpec,
    ObjectEvent, ObjectStatus, Observation, ResourceKind, DEPLOYABLE_CONTAINER, FIELD_MANAGER,
    GPU_MEMORY_LIMIT_ANNOTATION, GPU_MEMORY_REQUEST_ANNOTATION, GPU_RESOURCE, JOB_CONTAINER,
    JOB_PAYLOAD_ENV, MANAGED_BY_LABEL, MODELS_TO_LOAD_ENV, MODEL_ARTIFACT_ANNOTATION,
    MODEL_ARTIFACT_LOCATION_ENV, MODEL_LOADED_AT_ANNOTATION, MODEL_NAME_ANNOTATION, MODEL_NAME_ENV,
    MODEL_VERSION_ANNOTATION, MODEL_VERSION_ENV, NAME_LABEL, REQUEST_ID_LABEL,
    RESTARTED_AT_ANNOTATION, WATCH_CHANNEL_CAPACITY,
};

struct SharedWatch {
    events: broadcast::Sender<ObjectEvent>,
    task: JoinHandle<()>,
}

/// The Kubernetes adapter.
pub struct KubeAdapter {
    /// Request paths (actions, reads): explicit connect/read/write timeouts.
    client: Client,
    /// The shared watches: no read timeout (a quiet watch is not a dead one; the
    /// watcher's own idle timeout and backoff cover a dead connection).
    watch_client: Client,
    watches: Mutex<HashMap<(ResourceKind, String), SharedWatch>>,
}

impl KubeAdapter {
    /// Connects with the ambient configuration: in-cluster service account when running
    /// in a pod, else the kubeconfig (`KUBECONFIG` or `~/.kube/config`), with the
    /// request timeouts of `timeouts`.
    pub async fn connect(timeouts: &KubeClientSettings) -> Result<Self, KubeError> {
        let config = kube::Config::infer().await.map_err(|e| {
            KubeError::Unavailable(format!("cannot configure kubernetes client: {e}"))
        })?;
        Self::from_config(config, timeouts)
    }

    /// Builds the clients from an explicit configuration (cluster URL, credentials),
    /// overriding its timeouts with `timeouts` on request paths.
    pub fn from_config(
        config: kube::Config,
        timeouts: &KubeClientSettings,
    ) -> Result<Self, KubeError> {
        let mut requests = config.clone();
        requests.connect_timeout = Some(timeouts.connect_timeout);
        requests.read_timeout = Some(timeouts.read_timeout);
        requests.write_timeout = Some(timeouts.write_timeout);
        // Count the read timeout from when the request is sent, not from when a pooled
        // connection went idle.
        requests.reset_reader_on_write = true;
        let mut watches = config;
        watches.connect_timeout = Some(timeouts.connect_timeout);
        watches.write_timeout = Some(timeouts.write_timeout);
        watches.read_timeout = None;
        let build = |c: kube::Config| {
            Client::try_from(c)
                .map_err(|e| KubeError::Unavailable(format!("cannot build kubernetes client: {e}")))
        };
        Ok(Self {
            client: build(requests)?,
            watch_client: build(watches)?,
            watches: Mutex::new(HashMap::new()),
        })
    }

    /// Wraps an existing client for both requests and watches (tests hand in one over a
    /// mock service).
    pub fn new(client: Client) -> Self {
        Self {
            watch_client: client.clone(),
            client,
            watches: Mutex::new(HashMap::new()),
        }
    }

    fn api<K>(&self, namespace: &str) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), namespace)
    }

    fn watch_api<K>(&self, namespace: &str) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        Api::namespaced(self.watch_client.clone(), namespace)
    }

    /// Ensures the Deployment runs at least `min` replicas, or none when `min == 0`.
    async fn converge_replicas(
        &self,
        namespace: &str,
        name: &str,
        min: i32,
    ) -> Result<(), KubeError> {
        let deployments = self.api::<Deployment>(namespace);
        if min > 0 {
            let scale = deployments.get_scale(name).await.map_err(map_error)?;
            let current = scale.spec.and_then(|s| s.replicas).unwrap_or(0);
            if current >= min {
                return Ok(());
            }
        }
        let patch = json!({ "spec": { "replicas": min } });
        deployments
            .patch_scale(name, &patch_params(), &Patch::Merge(&patch))
            .await
            .map_err(map_error)?;
        Ok(())
    }

    async fn patch_template_annotations(
        &self,
        namespace: &str,
        name: &str,
        annotations: Map<String, Value>,
    ) -> Result<Deployment, KubeError> {
        let patch =
            json!({ "spec": { "template": { "metadata": { "annotations": annotations } } } });
        self.api::<Deployment>(namespace)
            .patch(name, &patch_params(), &Patch::Merge(&patch))
            .await
            .map_err(map_error)
    }
}

impl Drop for KubeAdapter {
    fn drop(&mut self) {
        if let Ok(watches) = self.watches.lock() {
            for watch in watches.values() {
                watch.task.abort();
            }
        }
    }
}

fn patch_params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..PatchParams::default()
    }
}

fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

/// Maps a client error to a [`KubeError`], keeping the API server's message.
pub fn map_error(error: kube::Error) -> KubeError {
    match error {
        kube::Error::Api(status) => {
            let message = if status.message.is_empty() {
                status.reason.clone()
            } else {
                status.message.clone()
            };
            match status.code {
                404 => KubeError::NotFound(message),
                409 => KubeError::Conflict(message),
                400 | 422 => KubeError::Invalid(message),
                401 | 403 => KubeError::Forbidden(message),
                429 | 500 | 502 | 503 | 504 => KubeError::Unavailable(message),
                code => KubeError::Other {
                    status: code,
                    message: if status.reason.is_empty() {
                        message
                    } else {
                        format!("{}: {message}", status.reason)
                    },
                },
            }
        }
        e @ (kube::Error::HyperError(_) | kube::Error::Service(_)) => {
            KubeError::Unavailable(e.to_string())
        }
        other => KubeError::Other {
            status: 0,
            message: other.to_string(),
        },
    }
}

fn invalid(message: impl Into<String>) -> KubeError {
    KubeError::Invalid(message.into())
}

fn insert_quantity(map: &mut Map<String, Value>, key: &str, quantity: &str) {
    if !quantity.is_empty() {
        map.insert(key.to_string(), Value::String(quantity.to_string()));
    }
}

fn object_labels(name: &str) -> Value {
    json!({ NAME_LABEL: name, MANAGED_BY_LABEL: FIELD_MANAGER })
}

/// The server-side-apply body of a deployable's Deployment. `spec.replicas` is left out:
/// the HPA and the scale subresource own it.
pub fn deployment_manifest(spec: &DeployableSpec) -> Result<Value, KubeError> {
    let r = &spec.resources;
    let mut requests = Map::new();
    let mut limits = Map::new();
    insert_quantity(&mut requests, "cpu", &r.cpu.request);
    insert_quantity(&mut limits, "cpu", &r.cpu.limit);
    insert_quantity(&mut requests, "memory", &r.memory.request);
    insert_quantity(&mut limits, "memory", &r.memory.limit);
    let mut template_annotations = Map::new();
    if let Some(gpu) = &r.gpu {
        insert_quantity(&mut requests, GPU_RESOURCE, &gpu.request);
        insert_quantity(&mut limits, GPU_RESOURCE, &gpu.limit);
        if let Some(memory) = &gpu.memory {
            insert_quantity(
                &mut template_annotations,
                GPU_MEMORY_REQUEST_ANNOTATION,
                &memory.request,
            );
            insert_quantity(
                &mut template_annotations,
                GPU_MEMORY_LIMIT_ANNOTATION,
                &memory.limit,
            );
        }
    }
    let mut container = json!({ "name": DEPLOYABLE_CONTAINER, "image": spec.image });
    let mut resources = Map::new();
    if !requests.is_empty() {
        resources.insert("requests".into(), Value::Object(requests));
    }
    if !limits.is_empty() {
        resources.insert("limits".into(), Value::Object(limits));
    }
    if !resources.is_empty() {
        container["resources"] = Value::Object(resources);
    }
    if !spec.models_to_load.is_empty() {
        let models = serde_json::to_string(&spec.models_to_load)
            .map_err(|e| invalid(format!("models to load: {e}")))?;
        container["env"] = json!([{ "name": MODELS_TO_LOAD_ENV, "value": models }]);
    }
    let mut pod_spec = json!({ "containers": [container] });
    if !spec.node_selector.is_empty() {
        pod_spec["nodeSelector"] = json!(spec.node_selector);
    }
    let mut template_meta = json!({ "labels": { NAME_LABEL: spec.name } });
    if !template_annotations.is_empty() {
        template_meta["annotations"] = Value::Object(template_annotations);
    }
    Ok(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": spec.name, "namespace": spec.namespace, "labels": object_labels(&spec.name) },
        "spec": {
            "selector": { "matchLabels": { NAME_LABEL: spec.name } },
            "template": { "metadata": template_meta, "spec": pod_spec },
        },
    }))
}

/// How many times a model load reads the Deployment and patches it when the patch meets
/// a concurrent change (409).
const MODEL_LOAD_ATTEMPTS: u32 = 5;

/// The strategic merge patch of a model load on `current` (the Deployment as just read):
/// the model annotations on the pod template, and the model env vars on `container`
/// (default: the template's first container).
///
/// Why this patch type: a JSON merge patch replaces a list whole, so setting one
/// container's env would need every container and every env var repeated (and would
/// drop what others add meanwhile); a strategic merge patch merges `containers` by
/// `name` and `env` by `name`, so it touches exactly three env vars of one container.
/// Server-side apply would merge the same way, but under our field manager it would
/// fight `apply_deployable`'s apply (each apply drops the other's fields) and needs a
/// second manager. A strategic merge of a container name the Deployment lacks would add
/// a container instead of failing (a template's `image` is optional), so the container
/// is resolved on the read, and the patch carries the read's `resourceVersion`: the API
/// server refuses it (409) if the Deployment changed since, and the load reads again.
/// An existing variable of the same name fed by `valueFrom` gets `valueFrom: null`,
/// since a variable with both sources is invalid.
fn model_load_patch(
    current: &Deployment,
    deployable: &str,
    container: Option<&str>,
    model: &ModelSpec,
    stamp: &str,
) -> Result<Value, KubeError> {
    let containers = current
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .map(|s| s.containers.as_slice())
        .unwrap_or_default();
    let target = match container {
        Some(wanted) => containers
            .iter()
            .find(|c| c.name == wanted)
            .ok_or_else(|| {
                let names: Vec<&str> = containers.iter().map(|c| c.name.as_str()).collect();
                invalid(format!(
                    "deployment {deployable} has no container {wanted:?} (its containers: {})",
                    names.join(", ")
                ))
            })?,
        None => containers
            .first()
            .ok_or_else(|| invalid(format!("deployment {deployable} has no container")))?,
    };
    let env: Vec<Value> = [
        (MODEL_NAME_ENV, &model.name),
        (MODEL_VERSION_ENV, &model.version),
        (MODEL_ARTIFACT_LOCATION_ENV, &model.artifact_location),
    ]
    .into_iter()
    .map(|(name, value)| {
        let mut var = json!({ "name": name, "value": value });
        let fed_from_elsewhere = target
            .env
            .iter()
            .flatten()
            .any(|e| e.name == name && e.value_from.is_some());
        if fed_from_elsewhere {
            var["valueFrom"] = Value::Null;
        }
        var
    })
    .collect();
    let mut patch = json!({
        "spec": { "template": {
            "metadata": { "annotations": {
                MODEL_NAME_ANNOTATION: model.name,
                MODEL_VERSION_ANNOTATION: model.version,
                MODEL_ARTIFACT_ANNOTATION: model.artifact_location,
                MODEL_LOADED_AT_ANNOTATION: stamp,
            } },
            "spec": { "containers": [{ "name": target.name, "env": env }] },
        } },
    });
    if let Some(version) = &current.metadata.resource_version {
        patch["metadata"] = json!({ "resourceVersion": version });
    }
    Ok(patch)
}

/// The server-side-apply body of a deployable's HPA (`minReplicas` at least 1; see
/// [`KubeExecutor::set_min_replicas`]).
pub fn hpa_manifest(spec: &DeployableSpec) -> Value {
    json!({
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": { "name": spec.name, "namespace": spec.namespace, "labels": object_labels(&spec.name) },
        "spec": {
            "scaleTargetRef": { "apiVersion": "apps/v1", "kind": "Deployment", "name": spec.name },
            "minReplicas": spec.min_pod_count.max(1),
            "maxReplicas": spec.max_pod_count,
        },
    })
}

/// The Job created for a [`JobSpec`].
pub fn job_manifest(spec: &JobSpec) -> Result<Job, KubeError> {
    let payload =
        serde_json::to_string(&spec.payload).map_err(|e| invalid(format!("job payload: {e}")))?;
    let labels = BTreeMap::from([(NAME_LABEL.to_string(), spec.job_name.clone())]);
    let mut object_labels = labels.clone();
    object_labels.insert(MANAGED_BY_LABEL.to_string(), FIELD_MANAGER.to_string());
    object_labels.insert(REQUEST_ID_LABEL.to_string(), spec.request_id.clone());
    Ok(Job {
        metadata: ObjectMeta {
            name: Some(spec.job_name.clone()),
            namespace: Some(spec.namespace.clone()),
            labels: Some(object_labels),
            ..ObjectMeta::default()
        },
        spec: Some(K8sJobSpec {
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".to_string()),
                    containers: vec![Container {
                        name: JOB_CONTAINER.to_string(),
                        image: Some(spec.image.clone()),
                        env: Some(vec![EnvVar {
                            name: JOB_PAYLOAD_ENV.to_string(),
                            value: Some(payload),
                            ..EnvVar::default()
                        }]),
                        ..Container::default()
                    }],
                    ..PodSpec::default()
                }),
            },
            ..K8sJobSpec::default()
        }),
        ..Job::default()
    })
}

fn match_labels(deployment: &Deployment) -> Option<String> {
    deployment
        .spec
        .as_ref()
        .and_then(|s| s.selector.match_labels.as_ref())
        .filter(|l| !l.is_empty())
        .map(selector_from_labels)
}

fn deployment_baseline(deployment: &Deployment, namespace: &str, name: &str) -> Baseline {
    Baseline {
        generation: deployment.metadata.generation,
        uid: deployment.metadata.uid.clone(),
        label_selector: match_labels(deployment),
        ..Baseline::new(ResourceKind::Deployment, namespace, name)
    }
}

#[async_trait]
impl KubeExecutor for KubeAdapter {
    #[tracing::instrument(skip(self, spec), fields(namespace = %spec.namespace, name = %spec.name))]
    async fn apply_deployable(&self, spec: &DeployableSpec) -> Result<Baseline, KubeError> {
        validate_pod_counts(spec.min_pod_count, Some(spec.max_pod_count))?;
        let manifest = deployment_manifest(spec)?;
        let deployment = self
            .api::<Deployment>(&spec.namespace)
            .patch(&spec.name, &apply_params(), &Patch::Apply(&manifest))
            .await
            .map_err(map_error)?;
        self.api::<HorizontalPodAutoscaler>(&spec.namespace)
            .patch(
                &spec.name,
                &apply_params(),
                &Patch::Apply(&hpa_manifest(spec)),
            )
            .await
            .map_err(map_error)?;
        self.converge_replicas(&spec.namespace, &spec.name, spec.min_pod_count)
            .await?;
        tracing::info!(generation = ?deployment.metadata.generation, "deployable applied");
        Ok(deployment_baseline(
            &deployment,
            &spec.namespace,
            &spec.name,
        ))
    }

    #[tracing::instrument(skip(self))]
    async fn restart(
        &self,
        namespace: &str,
        name: Option<&str>,
        stamp: &str,
    ) -> Result<Vec<Baseline>, KubeError> {
        let names = match name {
            Some(n) => vec![n.to_string()],
            None => {
                let list = self
                    .api::<Deployment>(namespace)
                    .list(&ListParams::default())
                    .await
                    .map_err(map_error)?;
                let names: Vec<String> = list
                    .items
                    .into_iter()
                    .filter_map(|d| d.metadata.name)
                    .collect();
                if names.is_empty() {
                    return Err(KubeError::NotFound(format!(
                        "no deployments found in namespace {namespace}"
                    )));
                }
                names
            }
        };
        let stamp = stamp.to_owned();
        let mut baselines = Vec::with_capacity(names.len());
        for n in names {
            let mut annotations = Map::new();
            annotations.insert(RESTARTED_AT_ANNOTATION.into(), Value::String(stamp.clone()));
            let deployment = self
                .patch_template_annotations(namespace, &n, annotations)
                .await?;
            baselines.push(Baseline {
                template_annotation: Some(RESTARTED_AT_ANNOTATION.to_string()),
                template_hash: Some(stamp.clone()),
                ..deployment_baseline(&deployment, namespace, &n)
            });
        }
        tracing::info!(count = baselines.len(), "deployments restarted");
        Ok(baselines)
    }

    #[tracing::instrument(skip(self, model), fields(model = %model.name, version = %model.version))]
    async fn load_model(
        &self,
        namespace: &str,
        deployable: &str,
        container: Option<&str>,
        model: &ModelSpec,
        stamp: &str,
    ) -> Result<Baseline, KubeError> {
        // Read, then patch guarded by the read's resourceVersion (see `model_load_patch`
        // for why); a 409 means the Deployment changed in between (often only its status):
        // read again, a bounded number of times, as client-go's `RetryOnConflict` does.
        let deployments = self.api::<Deployment>(namespace);
        let mut attempt = 1;
        let deployment = loop {
            let current = deployments.get(deployable).await.map_err(map_error)?;
            let patch = model_load_patch(&current, deployable, container, model, stamp)?;
            match deployments
                .patch(deployable, &patch_params(), &Patch::Strategic(&patch))
                .await
                .map_err(map_error)
            {
                Ok(patched) => break patched,
                Err(KubeError::Conflict(message)) if attempt < MODEL_LOAD_ATTEMPTS => {
                    tracing::debug!(attempt, %message, "deployment changed under the model load; reading it again");
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        };
        let base = deployment_baseline(&deployment, namespace, deployable);
        Ok(Baseline {
            kind: ResourceKind::Pod,
            label_selector: base
                .label_selector
                .clone()
                .or_else(|| Some(format!("{NAME_LABEL}={deployable}"))),
            template_annotation: Some(MODEL_LOADED_AT_ANNOTATION.to_string()),
            template_hash: Some(stamp.to_owned()),
            ..base
        })
    }

    #[tracing::instrument(skip(self, spec), fields(namespace = %spec.namespace, job = %spec.job_name))]
    async fn create_job(&self, spec: &JobSpec) -> Result<Baseline, KubeError> {
        let job = job_manifest(spec)?;
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            ..PostParams::default()
        };
        let jobs = self.api::<Job>(&spec.namespace);
        let created = match jobs.create(&params, &job).await {
            Ok(created) => created,
            Err(e) => match map_error(e) {
                KubeError::Conflict(message) => {
                    // AlreadyExists: ours (a repeated create of this request) counts as
                    // created; anyone else's is a real conflict.
                    let existing = jobs.get_opt(&spec.job_name).await.map_err(map_error)?;
                    match existing {
                        Some(j) if job_request_id(&j) == Some(spec.request_id.as_str()) => j,
                        _ => return Err(KubeError::Conflict(message)),
                    }
                }
                other => return Err(other),
            },
        };
        Ok(Baseline {
            generation: created.metadata.generation,
            uid: created.metadata.uid,
            label_selector: Some(format!("{NAME_LABEL}={}", spec.job_name)),
            ..Baseline::new(ResourceKind::Job, &spec.namespace, &spec.job_name)
        })
    }

    #[tracing::instrument(skip(self), fields(deployment = %target.deployment, hpa = %target.hpa))]
    async fn set_min_replicas(
        &self,
        namespace: &str,
        target: &ScaleTarget,
        min: i32,
    ) -> Result<(), KubeError> {
        validate_pod_counts(min, None)?;
        let patch = json!({ "spec": { "minReplicas": min.max(1) } });
        self.api::<HorizontalPodAutoscaler>(namespace)
            .patch(&target.hpa, &patch_params(), &Patch::Merge(&patch))
            .await
            .map_err(map_error)?;
        self.converge_replicas(namespace, &target.deployment, min)
            .await
    }

    #[tracing::instrument(skip(self), fields(deployment = %target.deployment, hpa = %target.hpa))]
    async fn observed_min_replicas(
        &self,
        namespace: &str,
        target: &ScaleTarget,
    ) -> Result<Option<i32>, KubeError> {
        let hpa = self
            .api::<HorizontalPodAutoscaler>(namespace)
            .get_opt(&target.hpa)
            .await
            .map_err(map_error)?;
        let Some(hpa) = hpa else { return Ok(None) };
        let replicas = match self
            .api::<Deployment>(namespace)
            .get_scale(&target.deployment)
            .await
        {
            Ok(scale) => scale.spec.and_then(|s| s.replicas).unwrap_or(0),
            Err(e) => match map_error(e) {
                KubeError::NotFound(_) => return Ok(None),
                other => return Err(other),
            },
        };
        if replicas == 0 {
            return Ok(Some(0));
        }
        Ok(Some(hpa.spec.and_then(|s| s.min_replicas).unwrap_or(1)))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(namespace = %baseline.namespace))]
    async fn observe(&self, baseline: &Baseline) -> Result<Observation, KubeError> {
        let ns = baseline.namespace.as_str();
        let mut objects = Vec::new();
        if let Some(name) = baseline.name.as_deref() {
            let named = match baseline.kind {
                ResourceKind::Deployment | ResourceKind::Pod => {
                    get_status::<Deployment>(self.api(ns), name).await?
                }
                ResourceKind::Job => get_status::<Job>(self.api(ns), name).await?,
                ResourceKind::HorizontalPodAutoscaler => {
                    get_status::<HorizontalPodAutoscaler>(self.api(ns), name).await?
                }
            };
            objects.extend(named);
        }
        if baseline.kind == ResourceKind::Pod {
            if let Some(selector) = baseline.label_selector.as_deref() {
                let pods = self
                    .api::<Pod>(ns)
                    .list(&ListParams::default().labels(selector))
                    .await
                    .map_err(map_error)?;
                objects.extend(pods.items.iter().map(ObjectStatus::from));
            }
        }
        Ok(Observation::new(objects))
    }

    fn subscribe(&self, kind: ResourceKind, namespace: &str) -> broadcast::Receiver<ObjectEvent> {
        let mut watches = match self.watches.lock() {
            Ok(w) => w,
            Err(poisoned) => poisoned.into_inner(),
        };
        let key = (kind, namespace.to_string());
        if let Some(watch) = watches.get(&key).filter(|w| !w.task.is_finished()) {
            return watch.events.subscribe();
        }
        let (events, receiver) = broadcast::channel(WATCH_CHANNEL_CAPACITY);
        let task = match kind {
            ResourceKind::Deployment => {
                spawn_watch::<Deployment>(self.watch_api(namespace), events.clone())
            }
            ResourceKind::Pod => spawn_watch::<Pod>(self.watch_api(namespace), events.clone()),
            ResourceKind::Job => spawn_watch::<Job>(self.watch_api(namespace), events.clone()),
            ResourceKind::HorizontalPodAutoscaler => {
                spawn_watch::<HorizontalPodAutoscaler>(self.watch_api(namespace), events.clone())
            }
        };
        watches.insert(key, SharedWatch { events, task });
        receiver
    }

    fn name(&self) -> &'static str {
        "kube"
    }
}

fn job_request_id(job: &Job) -> Option<&str> {
    job.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(REQUEST_ID_LABEL))
        .map(String::as_str)
}

async fn get_status<K>(api: Api<K>, name: &str) -> Result<Option<ObjectStatus>, KubeError>
where
    K: Resource + Clone + DeserializeOwned + Debug,
    for<'a> &'a K: Into<ObjectStatus>,
{
    Ok(api
        .get_opt(name)
        .await
        .map_err(map_error)?
        .as_ref()
        .map(Into::into))
}

fn spawn_watch<K>(api: Api<K>, events: broadcast::Sender<ObjectEvent>) -> JoinHandle<()>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    for<'a> &'a K: Into<ObjectStatus>,
{
    tokio::spawn(run_watch(api, events))
}

/// Runs one shared watch: keeps a cache of the objects (so a relist can tell which ones
/// vanished while disconnected) and broadcasts every change. Errors are retried with
/// kube-runtime's default backoff, forever; they are logged, not surfaced.
async fn run_watch<K>(api: Api<K>, events: broadcast::Sender<ObjectEvent>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    for<'a> &'a K: Into<ObjectStatus>,
{
    let mut cache: HashMap<String, ObjectStatus> = HashMap::new();
    let mut relisted: Option<HashMap<String, ObjectStatus>> = None;
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    let mut stream = std::pin::pin!(stream);
    // A send only fails when nobody listens right now; the watch stays up for the next.
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Apply(object)) => {
                let status: ObjectStatus = (&object).into();
                cache.insert(status.name.clone(), status.clone());
                let _ = events.send(ObjectEvent::Applied(status));
            }
            Ok(watcher::Event::Delete(object)) => {
                let status: ObjectStatus = (&object).into();
                cache.remove(&status.name);
                let _ = events.send(ObjectEvent::Deleted(status));
            }
            Ok(watcher::Event::Init) => relisted = Some(HashMap::new()),
            Ok(watcher::Event::InitApply(object)) => {
                let status: ObjectStatus = (&object).into();
                relisted
                    .get_or_insert_with(HashMap::new)
                    .insert(status.name.clone(), status.clone());
                let _ = events.send(ObjectEvent::Applied(status));
            }
            Ok(watcher::Event::InitDone) => {
                let fresh = relisted.take().unwrap_or_default();
                for (name, gone) in cache.drain() {
                    if !fresh.contains_key(&name) {
                        let _ = events.send(ObjectEvent::Deleted(gone));
                    }
                }
                cache = fresh;
            }
            Err(error) => tracing::warn!(%error, "kubernetes watch failed; retrying"),
        }
    }
}

fn meta_status(meta: &ObjectMeta, detail: StatusDetail) -> ObjectStatus {
    ObjectStatus {
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
        uid: meta.uid.clone(),
        labels: meta.labels.clone().unwrap_or_default(),
        annotations: meta.annotations.clone().unwrap_or_default(),
        generation: meta.generation,
        deleting: meta.deletion_timestamp.is_some(),
        detail,
    }
}

fn condition(status: &str, reason: &Option<String>, message: &Option<String>) -> Condition {
    Condition {
        status: Truth::parse(status),
        reason: reason.clone(),
        message: message.clone(),
    }
}

impl From<&Deployment> for ObjectStatus {
    fn from(d: &Deployment) -> Self {
        let spec = d.spec.as_ref();
        let status = d.status.as_ref();
        let find = |wanted: &str| {
            status
                .and_then(|s| s.conditions.as_ref())
                .and_then(|cs| cs.iter().find(|c| c.type_ == wanted))
                .map(|c| condition(&c.status, &c.reason, &c.message))
        };
        let detail = DeploymentStatus {
            replicas: spec.and_then(|s| s.replicas).unwrap_or(1),
            observed_generation: status.and_then(|s| s.observed_generation),
            status_replicas: status.and_then(|s| s.replicas).unwrap_or(0),
            updated_replicas: status.and_then(|s| s.updated_replicas).unwrap_or(0),
            ready_replicas: status.and_then(|s| s.ready_replicas).unwrap_or(0),
            available_replicas: status.and_then(|s| s.available_replicas).unwrap_or(0),
            available: find("Available"),
            progressing: find("Progressing"),
            template_annotations: spec
                .and_then(|s| s.template.metadata.as_ref())
                .and_then(|m| m.annotations.clone())
                .unwrap_or_default(),
            selector: match_labels(d),
        };
        meta_status(&d.metadata, StatusDetail::Deployment(detail))
    }
}

impl From<&Pod> for ObjectStatus {
    fn from(p: &Pod) -> Self {
        let status = p.status.as_ref();
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
            .is_some_and(|c| c.status == "True");
        let waiting_reason = status
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|cs| {
                cs.iter()
                    .find_map(|c| c.state.as_ref()?.waiting.as_ref()?.reason.clone())
            });
        let detail = PodStatus {
            phase: status.and_then(|s| s.phase.clone()),
            ready,
            waiting_reason,
        };
        meta_status(&p.metadata, StatusDetail::Pod(detail))
    }
}

impl From<&Job> for ObjectStatus {
    fn from(j: &Job) -> Self {
        let status = j.status.as_ref();
        let find = |wanted: &str| {
            status
                .and_then(|s| s.conditions.as_ref())
                .and_then(|cs| cs.iter().find(|c| c.type_ == wanted))
                .map(|c| condition(&c.status, &c.reason, &c.message))
        };
        let detail = JobStatus {
            complete: find("Complete"),
            failed: find("Failed"),
            active: status.and_then(|s| s.active).unwrap_or(0),
            succeeded: status.and_then(|s| s.succeeded).unwrap_or(0),
            failed_pods: status.and_then(|s| s.failed).unwrap_or(0),
        };
        meta_status(&j.metadata, StatusDetail::Job(detail))
    }
}

impl From<&HorizontalPodAutoscaler> for ObjectStatus {
    fn from(h: &HorizontalPodAutoscaler) -> Self {
        let spec = h.spec.as_ref();
        let status = h.status.as_ref();
        let detail = HpaStatus {
            min_replicas: spec.and_then(|s| s.min_replicas),
            max_replicas: spec.map(|s| s.max_replicas).unwrap_or(0),
            current_replicas: status.and_then(|s| s.current_replicas),
            desired_replicas: status.map(|s| s.desired_replicas).unwrap_or(0),
        };
        meta_status(&h.metadata, StatusDetail::HorizontalPodAutoscaler(detail))
    }
}
