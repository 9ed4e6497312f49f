//! The `KubeExecutor` port: the Kubernetes actions the Resource Manager takes and the
//! shared watch its watchers are fed by.
//!
//! Every action does one immediate change through the API server and answers with the
//! [`Baseline`] a watcher needs to tell "our change has taken effect" from "it was
//! already like that" (see [`crate::domain::conditions`]). The action/condition pairs:
//!
//! | action                               | desired condition                          |
//! |--------------------------------------|--------------------------------------------|
//! | [`KubeExecutor::apply_deployable`]   | `DesiredCondition::Available`              |
//! | [`KubeExecutor::restart`]            | `DesiredCondition::RolloutComplete` (each) |
//! | [`KubeExecutor::load_model`]         | `DesiredCondition::PodsReadyOnNewTemplate` |
//! | [`KubeExecutor::create_job`]         | `DesiredCondition::JobComplete`            |
//!
//! A watcher is driven like this:
//! 1. for each of `baseline.watched_kinds()`: `executor.subscribe(kind, &baseline.namespace)`
//!    (subscribe *before* reading, so no change falls between the read and the stream);
//! 2. `let mut obs = executor.observe(&baseline).await?` and `evaluate(&baseline, desired, &obs.objects)`;
//! 3. on every event with `baseline.is_relevant(event.object())`: `obs.apply(&event)`
//!    and evaluate again; on `RecvError::Lagged`, go back to step 2.
//!
//! There is one watch per (kind, namespace) in the process, shared by every watcher.
//!
//! The domain types ([`ResourceKind`], [`Baseline`], [`ObjectStatus`], [`ObjectEvent`],
//! [`Observation`]) live in the pure domain and are re-exported here.

use std::collections::BTreeMap;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

pub use crate::domain::conditions::{
    Baseline, DesiredCondition, ObjectEvent, ObjectStatus, Observation, ResourceKind,
};

/// Field manager of every write (server-side apply and patches).
pub const FIELD_MANAGER: &str = "resource-plane";
/// Label every created object carries: `name=<name>`.
pub const NAME_LABEL: &str = "name";
/// Label marking objects created by the resource plane.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Pod-template annotation a restart writes (the one `kubectl rollout restart` uses).
pub const RESTARTED_AT_ANNOTATION: &str = "kubectl.kubernetes.io/restartedAt";
/// Pod-template annotation: name of the model loaded by `load_model`.
pub const MODEL_NAME_ANNOTATION: &str = "resource-plane/model-name";
/// Pod-template annotation: version of the model loaded by `load_model`.
pub const MODEL_VERSION_ANNOTATION: &str = "resource-plane/model-version";
/// Pod-template annotation: artifact location of the model loaded by `load_model`.
pub const MODEL_ARTIFACT_ANNOTATION: &str = "resource-plane/model-artifact";
/// Pod-template annotation: when the model was loaded (RFC 3339); new on every load, so
/// every load rolls the pods and pods on the new template can be told apart.
pub const MODEL_LOADED_AT_ANNOTATION: &str = "resource-plane/model-loaded-at";
/// Env var of the serving container: name of the model loaded by `load_model`.
pub const MODEL_NAME_ENV: &str = "MODEL_NAME";
/// Env var of the serving container: version of the model loaded by `load_model`.
pub const MODEL_VERSION_ENV: &str = "MODEL_VERSION";
/// Env var of the serving container: artifact location of the model loaded by
/// `load_model`.
pub const MODEL_ARTIFACT_LOCATION_ENV: &str = "MODEL_ARTIFACT_LOCATION";
/// Pod-template annotation: GPU memory request (no standard Kubernetes resource exists;
/// it is recorded for GPU-sharing schedulers and the workload).
pub const GPU_MEMORY_REQUEST_ANNOTATION: &str = "resource-plane/gpu-memory-request";
/// Pod-template annotation: GPU memory limit.
pub const GPU_MEMORY_LIMIT_ANNOTATION: &str = "resource-plane/gpu-memory-limit";
/// Extended resource name of a GPU.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// Environment variable holding a Job's payload as JSON.
pub const JOB_PAYLOAD_ENV: &str = "JOB_PAYLOAD";
/// Environment variable holding a deployable's `models_to_load` as a JSON array.
pub const MODELS_TO_LOAD_ENV: &str = "MODELS_TO_LOAD";
/// Label every created Job carries: the id of the request that created it, so a
/// repeated create of the same request can be told from a name clash.
pub const REQUEST_ID_LABEL: &str = "resource-plane/request-id";
/// Name of the single container of a created Deployment.
pub const DEPLOYABLE_CONTAINER: &str = "main";
/// Name of the single container of a created Job.
pub const JOB_CONTAINER: &str = "job";

/// A request/limit pair of Kubernetes quantities (`"500m"`, `"2Gi"`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestLimit {
    /// Requested quantity.
    pub request: String,
    /// Limit quantity.
    pub limit: String,
}

/// GPU resources of a deployable.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuSpec {
    /// GPUs requested (`nvidia.com/gpu`). Kubernetes requires request == limit for
    /// extended resources; a mismatch is rejected by the API server (422).
    pub request: String,
    /// GPU limit.
    pub limit: String,
    /// GPU memory, recorded as pod-template annotations.
    pub memory: Option<RequestLimit>,
}

/// Compute resources of a deployable's container.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceSpec {
    /// CPU.
    pub cpu: RequestLimit,
    /// Memory.
    pub memory: RequestLimit,
    /// GPUs, if any.
    pub gpu: Option<GpuSpec>,
}

/// A model the deployable loads at start. Serialized in snake_case, as handed to the
/// container in [`MODELS_TO_LOAD_ENV`]; the camelCase spellings of earlier releases
/// (`batchSize`, `artifactVersion`) are accepted on input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelToLoad {
    /// Model name.
    pub name: String,
    /// Model version.
    pub version: String,
    /// Serving runtime.
    pub runtime: String,
    /// Numeric precision (`fp16`, ...).
    pub precision: String,
    /// Batch size.
    #[serde(alias = "batchSize")]
    pub batch_size: u32,
    /// Artifact version.
    #[serde(alias = "artifactVersion")]
    pub artifact_version: String,
}

/// A deployable to create or update: a Deployment and its HorizontalPodAutoscaler.
/// The API layer owns the wire contract and converts into this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployableSpec {
    /// Name of the Deployment, the HPA and the `name` label.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Container image.
    pub image: String,
    /// Pod node selector.
    pub node_selector: BTreeMap<String, String>,
    /// Minimum pods (HPA `minReplicas`; 0 scales the Deployment to zero).
    pub min_pod_count: i32,
    /// Maximum pods (HPA `maxReplicas`).
    pub max_pod_count: i32,
    /// Container resources.
    pub resources: ResourceSpec,
    /// Models to load at start.
    pub models_to_load: Vec<ModelToLoad>,
}

/// A Job to create.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Name of the Job and its `name` label.
    pub job_name: String,
    /// Namespace.
    pub namespace: String,
    /// Container image.
    pub image: String,
    /// Handed to the container as JSON in [`JOB_PAYLOAD_ENV`].
    pub payload: serde_json::Value,
    /// The request that creates it, recorded as the [`REQUEST_ID_LABEL`] label.
    pub request_id: String,
}

/// The Kubernetes objects a shadow deployable's minimum pod count acts on: the
/// Deployment that is scaled and the HorizontalPodAutoscaler whose `minReplicas` is
/// patched. Registration names them (default: the shadow deployable's own name); only
/// targets built from a registered record are ever handed to the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ScaleTarget {
    /// Deployment name.
    pub deployment: String,
    /// HorizontalPodAutoscaler name.
    pub hpa: String,
}

impl ScaleTarget {
    /// A Deployment and an HPA that share `name` (what `apply_deployable` creates).
    pub fn same(name: &str) -> Self {
        Self {
            deployment: name.to_owned(),
            hpa: name.to_owned(),
        }
    }
}

/// A model to load into a running deployable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Model name.
    pub name: String,
    /// Model version.
    pub version: String,
    /// Where the artifact is (URL or path).
    pub artifact_location: String,
}

/// One Kubernetes action of an operation, as stored in a SUBMITTING watch intent (so the
/// leader can run it again after a crash). Every action is idempotent by request: the
/// restart and model-load stamps are fixed when the request is accepted, the deployable
/// is server-side applied, and the Job carries [`REQUEST_ID_LABEL`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum KubeAction {
    /// [`KubeExecutor::apply_deployable`].
    ApplyDeployable {
        /// The deployable.
        spec: DeployableSpec,
    },
    /// [`KubeExecutor::restart`].
    Restart {
        /// Namespace.
        namespace: String,
        /// One Deployment, or all of the namespace.
        name: Option<String>,
        /// The `restartedAt` value.
        stamp: String,
    },
    /// [`KubeExecutor::load_model`].
    LoadModel {
        /// Namespace.
        namespace: String,
        /// The Deployment.
        deployable: String,
        /// The container that gets the model's env vars; `None`: the first. Absent in
        /// intents stored before containers could be named (they meant the first).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        container: Option<String>,
        /// The model.
        model: ModelSpec,
        /// The `model-loaded-at` value.
        stamp: String,
    },
    /// [`KubeExecutor::create_job`].
    CreateJob {
        /// The Job.
        spec: JobSpec,
    },
}

impl KubeAction {
    /// Runs the action; answers the baselines its watcher needs.
    pub async fn run(&self, kube: &dyn KubeExecutor) -> Result<Vec<Baseline>, KubeError> {
        match self {
            Self::ApplyDeployable { spec } => Ok(vec![kube.apply_deployable(spec).await?]),
            Self::Restart {
                namespace,
                name,
                stamp,
            } => kube.restart(namespace, name.as_deref(), stamp).await,
            Self::LoadModel {
                namespace,
                deployable,
                container,
                model,
                stamp,
            } => Ok(vec![
                kube.load_model(namespace, deployable, container.as_deref(), model, stamp)
                    .await?,
            ]),
            Self::CreateJob { spec } => Ok(vec![kube.create_job(spec).await?]),
        }
    }
}

/// Kubernetes failures, carrying the API server's message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KubeError {
    /// 404: the object (or namespace) does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// 409: conflict or `AlreadyExists`.
    #[error("conflict: {0}")]
    Conflict(String),
    /// 422 (or 400): the object is invalid, or the request was refused before sending.
    #[error("invalid: {0}")]
    Invalid(String),
    /// 401/403: the service account may not do this.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// The API server cannot be reached, or answered 429/5xx; retrying later may help.
    #[error("kubernetes unavailable: {0}")]
    Unavailable(String),
    /// Any other answer; `status` is the HTTP status, or 0 when there was none (e.g. a
    /// response that could not be decoded).
    #[error("kubernetes error {status}: {message}")]
    Other {
        /// HTTP status, or 0.
        status: u16,
        /// The server's reason and message.
        message: String,
    },
}

impl KubeError {
    /// The HTTP status an API answering for this error should use.
    pub fn http_status(&self) -> u16 {
        match self {
            KubeError::NotFound(_) => 404,
            KubeError::Conflict(_) => 409,
            KubeError::Invalid(_) => 422,
            KubeError::Forbidden(_) => 403,
            KubeError::Unavailable(_) => 503,
            KubeError::Other { status, .. } if (400..600).contains(status) => *status,
            KubeError::Other { .. } => 502,
        }
    }

    /// Whether the same call may succeed later unchanged.
    pub fn is_retryable(&self) -> bool {
        matches!(self, KubeError::Unavailable(_))
    }
}

/// Checks pod counts before anything is sent: `min >= 0`, and when a maximum is given,
/// `max >= 1` (an HPA's `maxReplicas`) and `max >= min`.
pub fn validate_pod_counts(min: i32, max: Option<i32>) -> Result<(), KubeError> {
    if min < 0 {
        return Err(KubeError::Invalid(format!(
            "min pod count must not be negative, got {min}"
        )));
    }
    if let Some(max) = max {
        if max < 1 {
            return Err(KubeError::Invalid(format!(
                "max pod count must be at least 1, got {max}"
            )));
        }
        if max < min {
            return Err(KubeError::Invalid(format!(
                "max pod count {max} is below min pod count {min}"
            )));
        }
    }
    Ok(())
}

/// The Kubernetes operations of the Resource Manager (real cluster or simulated).
#[async_trait]
pub trait KubeExecutor: Send + Sync + 'static {
    /// Server-side applies (field manager [`FIELD_MANAGER`], forced) the Deployment and
    /// its `autoscaling/v2` HPA, both labelled `name=<name>`, then converges the minimum
    /// replicas as [`KubeExecutor::set_min_replicas`] does. The Deployment's
    /// `spec.replicas` is left to the HPA and the scale subresource.
    /// Baseline: `Deployment` `name`, with the generation of the applied Deployment.
    async fn apply_deployable(&self, spec: &DeployableSpec) -> Result<Baseline, KubeError>;

    /// Rolling restart: sets the pod-template annotation [`RESTARTED_AT_ANNOTATION`] to
    /// `stamp` (RFC 3339, fixed per request so a repeated call changes nothing) on the
    /// Deployment `name`, or on every Deployment in `namespace` ([`KubeError::NotFound`]
    /// when there is none). One `Deployment` baseline per Deployment restarted.
    async fn restart(
        &self,
        namespace: &str,
        name: Option<&str>,
        stamp: &str,
    ) -> Result<Vec<Baseline>, KubeError>;

    /// Loads `model` into the Deployment `deployable`: in one patch of its pod template,
    /// sets the env vars [`MODEL_NAME_ENV`], [`MODEL_VERSION_ENV`] and
    /// [`MODEL_ARTIFACT_LOCATION_ENV`] on `container` (default: the template's first
    /// container) and the annotations [`MODEL_NAME_ANNOTATION`],
    /// [`MODEL_VERSION_ANNOTATION`], [`MODEL_ARTIFACT_ANNOTATION`] and
    /// [`MODEL_LOADED_AT_ANNOTATION`] (= `stamp`, RFC 3339, fixed per request so a
    /// repeated call changes nothing), so its pods roll onto a template whose serving
    /// container sees the model. Other containers and env vars are left alone.
    /// A `container` the Deployment does not have is [`KubeError::Invalid`], and nothing
    /// is changed. Baseline: `Pod`, selecting the Deployment's pods, with
    /// `MODEL_LOADED_AT_ANNOTATION` as the template annotation.
    async fn load_model(
        &self,
        namespace: &str,
        deployable: &str,
        container: Option<&str>,
        model: &ModelSpec,
        stamp: &str,
    ) -> Result<Baseline, KubeError>;

    /// Creates a `batch/v1` Job labelled `name=<job_name>` and
    /// [`REQUEST_ID_LABEL`]`=<request_id>`, one container, restart policy `Never`, the
    /// payload as JSON in [`JOB_PAYLOAD_ENV`]. An existing Job of that name created by the
    /// same request counts as created (the call is idempotent by request id); one created
    /// by another request is [`KubeError::Conflict`]. Baseline: `Job` `job_name` with its
    /// uid.
    async fn create_job(&self, spec: &JobSpec) -> Result<Baseline, KubeError>;

    /// Makes `min` the minimum pod count of `target` (the HPA `target.hpa` and the
    /// Deployment `target.deployment` a shadow deployable's record maps). An HPA cannot have
    /// `minReplicas: 0` (without an alpha feature gate), so:
    /// - `min >= 1`: HPA `minReplicas = min`, and the Deployment is scaled up to `min`
    ///   at once if it has fewer replicas (an HPA never scales up from zero);
    /// - `min == 0`: HPA `minReplicas = 1` and the Deployment is scaled to 0, which
    ///   also pauses the HPA (it leaves a target with zero replicas alone).
    ///
    /// Negative `min` is [`KubeError::Invalid`]; a `min` above the HPA's `maxReplicas`
    /// is refused by the API server (422).
    async fn set_min_replicas(
        &self,
        namespace: &str,
        target: &ScaleTarget,
        min: i32,
    ) -> Result<(), KubeError>;

    /// `target`'s effective minimum pod count as the cluster has it now: `None`
    /// when it has no HPA, `Some(0)` when its Deployment is scaled to zero, else the
    /// HPA's `minReplicas`. [`min_replicas_hold`] compares it with a wanted minimum.
    async fn observed_min_replicas(
        &self,
        namespace: &str,
        target: &ScaleTarget,
    ) -> Result<Option<i32>, KubeError>;

    /// One authoritative read of every object the baseline's condition consults (see
    /// [`Baseline::watched_kinds`]). Objects that do not exist are simply absent.
    async fn observe(&self, baseline: &Baseline) -> Result<Observation, KubeError>;

    /// Subscribes to the shared watch of `kind` in `namespace`, starting it on first
    /// use. The stream replays nothing: subscribe, then [`KubeExecutor::observe`].
    /// After the watch restarts, every object is sent again as `Applied`, and objects
    /// that vanished meanwhile as `Deleted`. Must be called inside a Tokio runtime (the
    /// real adapter spawns the watch task there; a watch whose runtime stopped is
    /// restarted by the next subscription).
    fn subscribe(&self, kind: ResourceKind, namespace: &str) -> broadcast::Receiver<ObjectEvent>;

    /// Adapter name for logs and metrics.
    fn name(&self) -> &'static str;
}

/// Whether the cluster's effective minimum (see
/// [`KubeExecutor::observed_min_replicas`]) is what [`KubeExecutor::set_min_replicas`]
/// with `want` leaves behind.
pub fn min_replicas_hold(want: i32, observed: i32) -> bool {
    if want <= 0 {
        observed == 0
    } else {
        observed == want
    }
}

/// Capacity of each shared watch's broadcast channel; a subscriber further behind gets
/// `RecvError::Lagged` and must re-observe.
pub const WATCH_CHANNEL_CAPACITY: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_stored_model_load_without_container_means_the_first_and_round_trips() {
        // As stored by a version before containers could be named.
        let stored = json!({
            "type": "LOAD_MODEL",
            "namespace": "int",
            "deployable": "predator",
            "model": { "name": "ranker", "version": "8", "artifact_location": "s3://m/8" },
            "stamp": "2026-01-01T00:00:00.000Z",
        });
        let action: KubeAction = serde_json::from_value(stored.clone()).unwrap();
        let KubeAction::LoadModel { container, .. } = &action else {
            panic!("not a model load: {action:?}")
        };
        assert_eq!(container, &None);
        assert_eq!(serde_json::to_value(&action).unwrap(), stored);

        let mut named = stored;
        named["container"] = json!("ranker");
        let action: KubeAction = serde_json::from_value(named.clone()).unwrap();
        assert!(
            matches!(&action, KubeAction::LoadModel { container: Some(c), .. } if c == "ranker")
        );
        assert_eq!(serde_json::to_value(&action).unwrap(), named);
    }
}
