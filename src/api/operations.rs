//! Kubernetes-facing operations: create a deployable, restart deployables, load a
//! model, trigger a job. Each durably stores a watch intent (SUBMITTING, with the
//! idempotency record, in one transaction), then does its Kubernetes action (idempotent
//! by request id), marks the intent PENDING and answers 202; a watcher then calls the
//! caller back when the desired condition holds.

use std::collections::BTreeMap;
use std::sync::Arc;

use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use chrono::{Duration as ChronoDuration, SecondsFormat};
use serde::Deserialize;
use serde_json::json;

use crate::actors::operations::{ActError, IdemWrite};
use crate::adapters::http_callback::check_at_request_time;
use crate::api::body::read_json;
use crate::api::error::ApiError;
use crate::api::paging;
use crate::api::{method_not_allowed, reply_response, AppState};
use crate::config::valid_segment;
use crate::domain::callback::{CallbackTarget, UrlPolicy};
use crate::domain::conditions::{DesiredCondition, ResourceKind};
use crate::domain::intent::{
    Delivery, IntentStatus, Operation, WatchIntent, WatchedResource, WorkflowRef, SCHEMA_VERSION,
};
use crate::idempotency::{IdemRequest, Reply};
use crate::keys;
use crate::ports::kube::{
    validate_pod_counts, DeployableSpec, JobSpec, KubeAction, KubeError, ModelSpec, ModelToLoad,
    ResourceSpec,
};

/// Registers the routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    let r =
        |path: &str| web::resource(path.to_owned()).default_service(web::to(method_not_allowed));
    cfg.service(r("/api/1.0/{env}/deployables/restart").post(submit::<RestartBody>))
        .service(r("/api/1.0/{env}/deployables").post(submit::<DeployableBody>))
        .service(r("/api/1.0/{env}/models/load").post(submit::<ModelLoadBody>))
        .service(r("/api/1.0/{env}/jobs").post(submit::<JobBody>))
        .service(r("/api/1.0/{env}/operations").get(list))
        .service(r("/api/1.0/{env}/operations/{request_id}").get(operation));
}

/// Token kind of the operations list.
const LIST_KIND: &str = "operations";

/// Query of `GET …/operations`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only operations in this status.
    pub status: Option<IntentStatus>,
    /// Page size, 1..=[`paging::MAX_LIST_PAGE`] (default and most).
    pub limit: Option<usize>,
    /// Where the previous page ended (opaque).
    #[serde(rename = "continue")]
    pub cont: Option<String>,
}

/// Body of `POST …/deployables`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployableBody {
    /// Deployment / HPA name.
    pub name: String,
    /// Container image.
    pub image: String,
    /// Pod node selector.
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    /// HPA minimum.
    pub min_pod_count: i32,
    /// HPA maximum.
    pub max_pod_count: i32,
    /// Container resources.
    pub resources: ResourceSpec,
    /// Models to load at start (`modelsToLoad`, the earlier spelling, is accepted too).
    #[serde(alias = "modelsToLoad", default)]
    pub models_to_load: Vec<ModelToLoad>,
    /// Caller's run id.
    pub workflow_run_id: Option<String>,
    /// Caller's plan.
    pub workflow_plan: Option<String>,
    /// Caller's task id.
    pub workflow_task_id: Option<String>,
    /// Where to call back.
    pub callback: CallbackTarget,
}

/// Body of `POST …/deployables/restart`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartBody {
    /// Namespace (must be the environment's).
    pub namespace: String,
    /// One Deployment, or all in the namespace when absent.
    pub name: Option<String>,
    /// Caller's run id.
    pub workflow_run_id: Option<String>,
    /// Caller's plan.
    pub workflow_plan: Option<String>,
    /// Caller's task id.
    pub workflow_task_id: Option<String>,
    /// Where to call back.
    pub callback: CallbackTarget,
}

/// Body of `POST …/models/load`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelLoadBody {
    /// The deployable whose pods load the model.
    pub deployable_name: String,
    /// The serving container that gets the model's env vars (`MODEL_NAME`,
    /// `MODEL_VERSION`, `MODEL_ARTIFACT_LOCATION`); absent: the pod template's first
    /// container. One model per load: a container holds the model last loaded into it.
    #[serde(default)]
    pub container: Option<String>,
    /// The model.
    pub model: ModelSpec,
    /// Caller's run id.
    pub workflow_run_id: Option<String>,
    /// Caller's plan.
    pub workflow_plan: Option<String>,
    /// Caller's task id.
    pub workflow_task_id: Option<String>,
    /// Where to call back.
    pub callback: CallbackTarget,
}

/// `container` of a job.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerBody {
    /// Image.
    pub image: String,
}

/// Body of `POST …/jobs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobBody {
    /// Job name.
    pub job_name: String,
    /// Its container.
    pub container: ContainerBody,
    /// Handed to the container as JSON.
    #[serde(default)]
    pub payload: serde_json::Value,
    /// Caller's run id.
    pub workflow_run_id: Option<String>,
    /// Caller's plan.
    pub workflow_plan: Option<String>,
    /// Caller's task id.
    pub workflow_task_id: Option<String>,
    /// Where to call back.
    pub callback: CallbackTarget,
}

/// Kubernetes object names: RFC 1123 labels.
fn check_k8s_name(field: &str, name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "{field} {name:?} must be 1-63 lowercase letters, digits or '-', not starting or ending with '-'"
        )))
    }
}

fn check_text(field: &str, v: &str) -> Result<(), ApiError> {
    if v.trim().is_empty() || v.len() > 1024 || v.chars().any(char::is_control) {
        return Err(ApiError::BadRequest(format!(
            "{field} must be 1-1024 characters without control characters"
        )));
    }
    Ok(())
}

fn workflow(
    run: Option<String>,
    plan: Option<String>,
    task: Option<String>,
) -> Result<WorkflowRef, ApiError> {
    for (f, v) in [
        ("workflow_run_id", &run),
        ("workflow_plan", &plan),
        ("workflow_task_id", &task),
    ] {
        if let Some(v) = v {
            check_text(f, v)?;
        }
    }
    Ok(WorkflowRef {
        run_id: run,
        plan,
        task_id: task,
    })
}

/// Maps a Kubernetes failure, keeping the API server's reason.
pub fn kube_error(e: KubeError, retry_after: u64) -> ApiError {
    let msg = format!("kubernetes: {e}");
    match e {
        KubeError::NotFound(_) => ApiError::NotFound(msg),
        KubeError::Conflict(_) => ApiError::Conflict(msg),
        KubeError::Invalid(_) => ApiError::Unprocessable(msg),
        KubeError::Unavailable(_) => ApiError::Unavailable {
            message: msg,
            retry_after,
        },
        KubeError::Forbidden(_) => ApiError::Upstream(502, msg),
        other => ApiError::Upstream(other.http_status(), msg),
    }
}

async fn check_callback(state: &AppState, cb: &CallbackTarget) -> Result<(), ApiError> {
    let s = &state.ops.settings;
    let policy = UrlPolicy {
        allowed_hosts: s.callback_allowed_hosts.clone(),
        allow_insecure_localhost: s.callback_allow_insecure_localhost,
    };
    check_at_request_time(cb, &policy).await.map_err(|e| {
        if e.is_transient() {
            ApiError::Unavailable {
                message: format!("callback: {e}"),
                retry_after: state.config.retry_after,
            }
        } else {
            ApiError::BadRequest(format!("callback: {e}"))
        }
    })
}

/// What an operation will do, decided before anything is stored or sent.
struct Planned {
    name: String,
    resource: WatchedResource,
    desired: DesiredCondition,
    action: KubeAction,
    message: String,
}

/// Replays a stored answer for `idem`, if there is one.
async fn stored_reply(
    state: &AppState,
    idem: Option<&IdemRequest>,
) -> Result<Option<Reply>, ApiError> {
    let Some(i) = idem else { return Ok(None) };
    let retry_after = state.config.retry_after;
    match state.store.get(&i.store_key).await {
        Ok(Some(kv)) => i
            .replay(&kv.value)
            .map(Some)
            .map_err(|e| ApiError::from_exec(e.into(), retry_after)),
        Ok(None) => Ok(None),
        Err(e) => Err(ApiError::from_store(e, retry_after)),
    }
}

/// A request body of one of the operations.
trait OperationBody: serde::de::DeserializeOwned {
    /// Logical route, for idempotency hashing.
    const ROUTE: &'static str;
    /// The operation recorded in the intent.
    const OPERATION: Operation;
    /// Checks what the type system cannot; `ns` is the environment's namespace.
    fn validate(&self, env: &str, ns: &str) -> Result<(), ApiError>;
    /// Where to call back.
    fn callback(&self) -> &CallbackTarget;
    /// The caller's workflow fields.
    fn workflow(&self) -> (Option<String>, Option<String>, Option<String>);
    /// The Kubernetes action and what to watch, for request `request_id`; `stamp` (RFC
    /// 3339) is the request's time, written by restarts and model loads.
    fn plan(self, ns: String, request_id: &str, stamp: &str) -> Planned;
}

impl OperationBody for DeployableBody {
    const ROUTE: &'static str = "deployables:create";
    const OPERATION: Operation = Operation::CreateDeployable;

    fn validate(&self, _env: &str, _ns: &str) -> Result<(), ApiError> {
        check_k8s_name("name", &self.name)?;
        check_text("image", &self.image)?;
        validate_pod_counts(self.min_pod_count, Some(self.max_pod_count))
            .map_err(|e| ApiError::BadRequest(e.to_string()))
    }

    fn callback(&self) -> &CallbackTarget {
        &self.callback
    }

    fn workflow(&self) -> (Option<String>, Option<String>, Option<String>) {
        (
            self.workflow_run_id.clone(),
            self.workflow_plan.clone(),
            self.workflow_task_id.clone(),
        )
    }

    fn plan(self, ns: String, _request_id: &str, _stamp: &str) -> Planned {
        let spec = DeployableSpec {
            name: self.name.clone(),
            namespace: ns.clone(),
            image: self.image,
            node_selector: self.node_selector,
            min_pod_count: self.min_pod_count,
            max_pod_count: self.max_pod_count,
            resources: self.resources,
            models_to_load: self.models_to_load,
        };
        Planned {
            message: format!(
                "deployable {} submitted; waiting until it is available",
                self.name
            ),
            resource: WatchedResource {
                kind: ResourceKind::Deployment,
                namespace: ns,
                label_selector: Some(format!("name={}", self.name)),
                name: Some(self.name.clone()),
            },
            name: self.name,
            desired: DesiredCondition::Available,
            action: KubeAction::ApplyDeployable { spec },
        }
    }
}

impl OperationBody for RestartBody {
    const ROUTE: &'static str = "deployables:restart";
    const OPERATION: Operation = Operation::RestartDeployables;

    fn validate(&self, env: &str, ns: &str) -> Result<(), ApiError> {
        if self.namespace != ns {
            return Err(ApiError::BadRequest(format!(
                "namespace {:?} is not environment {env}'s namespace ({ns})",
                self.namespace
            )));
        }
        match &self.name {
            Some(n) => check_k8s_name("name", n),
            None => Ok(()),
        }
    }

    fn callback(&self) -> &CallbackTarget {
        &self.callback
    }

    fn workflow(&self) -> (Option<String>, Option<String>, Option<String>) {
        (
            self.workflow_run_id.clone(),
            self.workflow_plan.clone(),
            self.workflow_task_id.clone(),
        )
    }

    fn plan(self, ns: String, _request_id: &str, stamp: &str) -> Planned {
        let what = self
            .name
            .clone()
            .unwrap_or_else(|| format!("all deployables in {ns}"));
        Planned {
            name: self.name.clone().unwrap_or_else(|| ns.clone()),
            resource: WatchedResource {
                kind: ResourceKind::Deployment,
                namespace: ns.clone(),
                label_selector: self.name.as_ref().map(|n| format!("name={n}")),
                name: self.name.clone(),
            },
            desired: DesiredCondition::RolloutComplete,
            action: KubeAction::Restart {
                namespace: ns,
                name: self.name,
                stamp: stamp.to_owned(),
            },
            message: format!("restart of {what} submitted; waiting for the rollout to complete"),
        }
    }
}

impl OperationBody for ModelLoadBody {
    const ROUTE: &'static str = "models:load";
    const OPERATION: Operation = Operation::LoadModel;

    fn validate(&self, _env: &str, _ns: &str) -> Result<(), ApiError> {
        check_k8s_name("deployable_name", &self.deployable_name)?;
        if let Some(container) = &self.container {
            // Container names are DNS-1123 labels, as object names are.
            check_k8s_name("container", container)?;
        }
        check_text("model.name", &self.model.name)?;
        check_text("model.version", &self.model.version)?;
        check_text("model.artifact_location", &self.model.artifact_location)
    }

    fn callback(&self) -> &CallbackTarget {
        &self.callback
    }

    fn workflow(&self) -> (Option<String>, Option<String>, Option<String>) {
        (
            self.workflow_run_id.clone(),
            self.workflow_plan.clone(),
            self.workflow_task_id.clone(),
        )
    }

    fn plan(self, ns: String, _request_id: &str, stamp: &str) -> Planned {
        Planned {
            message: format!(
                "model {} {} submitted for {}; waiting for its pods to be ready",
                self.model.name, self.model.version, self.deployable_name
            ),
            resource: WatchedResource {
                kind: ResourceKind::Pod,
                namespace: ns.clone(),
                label_selector: Some(format!("deployable_name={}", self.deployable_name)),
                name: Some(self.deployable_name.clone()),
            },
            name: self.deployable_name.clone(),
            desired: DesiredCondition::PodsReadyOnNewTemplate,
            action: KubeAction::LoadModel {
                namespace: ns,
                deployable: self.deployable_name,
                container: self.container,
                model: self.model,
                stamp: stamp.to_owned(),
            },
        }
    }
}

impl OperationBody for JobBody {
    const ROUTE: &'static str = "jobs:create";
    const OPERATION: Operation = Operation::TriggerJob;

    fn validate(&self, _env: &str, _ns: &str) -> Result<(), ApiError> {
        check_k8s_name("job_name", &self.job_name)?;
        check_text("container.image", &self.container.image)?;
        if !(self.payload.is_null() || self.payload.is_object()) {
            return Err(ApiError::BadRequest("payload must be a JSON object".into()));
        }
        Ok(())
    }

    fn callback(&self) -> &CallbackTarget {
        &self.callback
    }

    fn workflow(&self) -> (Option<String>, Option<String>, Option<String>) {
        (
            self.workflow_run_id.clone(),
            self.workflow_plan.clone(),
            self.workflow_task_id.clone(),
        )
    }

    fn plan(self, ns: String, request_id: &str, _stamp: &str) -> Planned {
        let payload = if self.payload.is_null() {
            json!({})
        } else {
            self.payload
        };
        let spec = JobSpec {
            job_name: self.job_name.clone(),
            namespace: ns.clone(),
            image: self.container.image,
            payload,
            request_id: request_id.to_owned(),
        };
        Planned {
            message: format!(
                "job {} submitted; waiting for it to complete",
                self.job_name
            ),
            resource: WatchedResource {
                kind: ResourceKind::Job,
                namespace: ns,
                label_selector: Some(format!("name={}", self.job_name)),
                name: Some(self.job_name.clone()),
            },
            name: self.job_name,
            desired: DesiredCondition::JobComplete,
            action: KubeAction::CreateJob { spec },
        }
    }
}

/// The one handler of every operation: validate, idempotency, then store the intent
/// (SUBMITTING, with the idempotency record, in one transaction) before anything is
/// sent to Kubernetes, run the action, mark the intent PENDING, answer 202.
///
/// - The store write fails: 503 (or 500 when etcd refused the request), nothing sent.
/// - The same request was stored first (retry, or another replica): its stored answer.
/// - Kubernetes refuses the action: its error; the intent is withdrawn and the refusal
///   becomes the stored answer.
/// - Kubernetes is unavailable, or the PENDING mark fails: 202 all the same; the leader
///   runs the (idempotent) action again until it holds or the deadline passes, and the
///   callback reports how it ended.
async fn submit<B: OperationBody>(
    state: web::Data<AppState>,
    env: web::Path<String>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let env = state.env(&env)?;
    let body = read_json::<B>(&req, payload).await?;
    let ns = state.ops.settings.namespace(&env);
    let b = body.value;
    b.validate(&env, &ns)?;
    let (run, plan, task) = b.workflow();
    let wf = workflow(run, plan, task)?;
    let callback = b.callback().clone();
    check_callback(&state, &callback).await?;
    let idem = state.idempotency(&req, &env, B::ROUTE, &body.canonical)?;
    let idem_req = idem.as_ref().map(|i| &i.0);
    if let Some(stored) = stored_reply(&state, idem_req).await? {
        return Ok(reply_response(&stored));
    }
    let retry_after = state.config.retry_after;
    let store_err = |e| ApiError::from_store(e, retry_after);
    let now = state.ops.clock.now();
    let request_id = format!("op-{}", uuid::Uuid::new_v4().simple());
    let stamp = now.to_rfc3339_opts(SecondsFormat::Millis, true);
    let planned = b.plan(ns, &request_id, &stamp);
    let submission = serde_json::to_value(&planned.action)
        .map_err(|e| ApiError::Internal(format!("cannot encode the action: {e}")))?;
    let intent = WatchIntent {
        schema_version: SCHEMA_VERSION.into(),
        request_id: request_id.clone(),
        env: env.clone(),
        operation: B::OPERATION,
        resource: planned.resource,
        desired_condition: planned.desired,
        baselines: Vec::new(),
        callback,
        workflow: wf,
        created_at: now,
        deadline: now
            + ChronoDuration::from_std(state.ops.settings.watch_timeout).unwrap_or_default(),
        status: IntentStatus::Submitting,
        observed_at: None,
        detail: None,
        delivery: Delivery {
            webhook_id: format!("msg_{}", request_id.trim_start_matches("op-")),
            attempts: Vec::new(),
            delivered: false,
            gave_up: false,
            next_attempt_at: None,
        },
        submission: Some(submission),
        // With traces on: the callback attempts continue this request's trace.
        traceparent: crate::otel::current_traceparent(),
    };
    let reply = Reply {
        status: 202,
        body: json!({
            "message": planned.message,
            "name": planned.name,
            "status": "IN_PROGRESS",
            "request_id": request_id,
        })
        .to_string(),
        replayed: false,
    };
    let lease = match idem_req {
        Some(_) => Some(
            state
                .registry
                .deps()
                .leases
                .lease(state.store.as_ref())
                .await
                .map_err(store_err)?,
        ),
        None => None,
    };
    let idem_write = |answer: &Reply| {
        idem_req.zip(lease).map(|(i, lease)| IdemWrite {
            key: &i.store_key,
            record: i.record(answer, now),
            lease,
        })
    };
    let Some(rev) = state
        .ops
        .store_submission(&intent, idem_write(&reply))
        .await
        .map_err(store_err)?
    else {
        // The same request was stored first, here or on another replica.
        return match stored_reply(&state, idem_req).await? {
            Some(stored) => Ok(reply_response(&stored)),
            None => Err(ApiError::Conflict("request collided; retry".into())),
        };
    };
    tracing::info!(request_id = %request_id, operation = ?B::OPERATION, "watch intent stored");
    match state.ops.act(&intent, rev, false).await {
        Ok(()) => {}
        Err(e @ (ActError::Retryable(_) | ActError::NotRecorded(_))) => {
            tracing::warn!(request_id = %request_id, error = %e, "action left to the leader");
        }
        Err(ActError::Rejected(e)) => {
            let err = kube_error(e, retry_after);
            let answer = Reply {
                status: err.status_code().as_u16(),
                body: json!({ "error": err.to_string() }).to_string(),
                replayed: false,
            };
            match state
                .ops
                .withdraw_submission(&intent, rev, idem_write(&answer))
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(request_id = %request_id, "refused action's intent moved on; the leader reports it")
                }
                Err(se) => {
                    tracing::warn!(request_id = %request_id, error = %se, "cannot withdraw the refused action's intent; the leader fails it")
                }
            }
            return Err(err);
        }
        Err(ActError::Corrupt(m)) => return Err(ApiError::Internal(m)),
    }
    Ok(reply_response(&reply))
}

/// The environment's operations, in request id order, a page at a time, each as
/// `GET …/operations/{request_id}` shows it.
async fn list(
    state: web::Data<AppState>,
    env: web::Path<String>,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    let env = state.env(&env)?;
    let limit = paging::limit(query.limit)?;
    let after = paging::after(LIST_KIND, query.cont.as_deref())?;
    if after.as_deref().is_some_and(|a| !valid_segment(a)) {
        return Err(ApiError::BadRequest("invalid continue token".into()));
    }
    let page = state
        .ops
        .page_intents(&env, query.status, after.as_deref(), limit)
        .await
        .map_err(|e| ApiError::from_store(e, state.config.retry_after))?;
    let items: Vec<Arc<str>> = page
        .items
        .iter()
        .map(|i| Arc::from(view(i).to_string()))
        .collect();
    Ok(paging::answer(
        LIST_KIND,
        &items,
        page.more_after.as_deref(),
    ))
}

/// An intent as the API shows it: without the stored action, with the callback's
/// secrets redacted.
fn view(intent: &WatchIntent) -> serde_json::Value {
    let mut view = serde_json::to_value(intent).unwrap_or_default();
    if let Some(v) = view.as_object_mut() {
        // The stored action repeats the request (a job's payload, say): not shown.
        v.remove("submission");
    }
    if let Some(cb) = view.get_mut("callback").and_then(|c| c.as_object_mut()) {
        // Callback headers and URL queries often carry credentials: show header names
        // only, and the URL without its query.
        cb.insert("url".into(), json!(intent.callback.redacted_url()));
        if let Some(h) = cb.get_mut("headers").and_then(|h| h.as_object_mut()) {
            for v in h.values_mut() {
                *v = json!("<redacted>");
            }
        }
    }
    view
}

async fn operation(
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (env, id) = path.into_inner();
    let env = state.env(&env)?;
    if !valid_segment(&id) {
        return Err(ApiError::BadRequest(format!("invalid request id {id:?}")));
    }
    let retry_after = state.config.retry_after;
    let kv = state
        .store
        .get(&keys::watch_intent(&id))
        .await
        .map_err(|e| ApiError::from_store(e, retry_after))?;
    let intent = kv
        .and_then(|kv| serde_json::from_slice::<WatchIntent>(&kv.value).ok())
        .filter(|i| i.env == env)
        .ok_or_else(|| ApiError::NotFound(format!("operation {id:?} not found")))?;
    Ok(HttpResponse::Ok().json(view(&intent)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(models: serde_json::Value) -> serde_json::Value {
        let mut b = json!({
            "name": "d", "image": "i", "min_pod_count": 1, "max_pod_count": 2,
            "resources": {"cpu": {"request": "1", "limit": "1"}, "memory": {"request": "1Gi", "limit": "1Gi"}},
            "callback": {"url": "https://example.com/cb"}
        });
        if let (Some(o), Some(m)) = (b.as_object_mut(), models.as_object()) {
            o.extend(m.clone());
        }
        b
    }

    #[test]
    fn models_to_load_is_snake_case_and_the_camel_case_spelling_is_accepted() {
        let snake = json!({"models_to_load": [{"name": "m", "version": "1", "runtime": "r",
            "precision": "fp16", "batch_size": 8, "artifact_version": "a"}]});
        let camel = json!({"modelsToLoad": [{"name": "m", "version": "1", "runtime": "r",
            "precision": "fp16", "batchSize": 8, "artifactVersion": "a"}]});
        let decode =
            |v| serde_json::from_value::<DeployableBody>(body(v)).map(|b| b.models_to_load);
        let (snake, camel) = match (decode(snake), decode(camel)) {
            (Ok(s), Ok(c)) => (s, c),
            other => panic!("both spellings decode: {other:?}"),
        };
        assert_eq!(snake, camel);
        assert_eq!(
            (snake[0].batch_size, snake[0].artifact_version.as_str()),
            (8, "a")
        );
        let out = serde_json::to_value(&snake[0]).unwrap_or_default();
        assert_eq!(
            (&out["batch_size"], &out["artifact_version"]),
            (&json!(8), &json!("a"))
        );
    }
}
