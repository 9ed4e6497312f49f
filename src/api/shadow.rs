//! Shadow deployable routes (and their `shadow-deploybles` typo alias): list, procure /
//! release (by name, or PROCURE by node pool), min pod count, register, delete. List
//! entries are served as the view keeps them (`actors::view`), already serialized.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;

use crate::actors::shadow::ShadowKey;
use crate::actors::view::Filter;
use crate::api::body::read_json;
use crate::api::error::ApiError;
use crate::api::paging;
use crate::api::{method_not_allowed, note_replayed, reply_response, AppState};
use crate::config::valid_segment;
use crate::domain::shadow::{
    valid_object_name, MinPodAction, ShadowCommand, MAX_LEASE_SECONDS, MAX_MIN_POD_COUNT,
};
use crate::idempotency::IdemRequest;

/// Longest accepted workflow id / plan.
const MAX_ID_LEN: usize = 256;

/// Registers the routes under both spellings.
pub fn configure(cfg: &mut web::ServiceConfig) {
    for base in ["shadow-deployables", "shadow-deploybles"] {
        cfg.service(
            web::resource(format!("/api/1.0/{{env}}/{base}"))
                .get(list)
                .post(action)
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource(format!("/api/1.0/{{env}}/{base}/min-pod-count"))
                .post(min_pod_count)
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource(format!("/api/1.0/{{env}}/{base}/{{name}}"))
                .put(register)
                .delete(delete)
                .default_service(web::to(method_not_allowed)),
        );
    }
}

/// Query of the list route.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// `true` or `false`.
    pub in_use: Option<String>,
    /// Exact node pool.
    pub node_pool: Option<String>,
    /// Page size, 1..=[`paging::MAX_LIST_PAGE`] (default and most).
    pub limit: Option<usize>,
    /// Where the previous page ended (opaque).
    #[serde(rename = "continue")]
    pub cont: Option<String>,
}

/// Token kind of the shadow deployable list.
const LIST_KIND: &str = "shadow-deployables";

/// Action of the procure/release route.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    /// Borrow.
    Procure,
    /// Give back.
    Release,
    /// Extend a leased hold.
    Renew,
}

/// Body of `POST …/shadow-deployables`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionBody {
    /// PROCURE, RELEASE or RENEW.
    pub action: Action,
    /// Deployable name (PROCURE: this or `node_pool`).
    pub name: Option<String>,
    /// PROCURE only: any FREE deployable of this node pool (instead of `name`).
    pub node_pool: Option<String>,
    /// Caller's run id.
    pub workflow_run_id: String,
    /// Caller's plan.
    pub workflow_plan: Option<String>,
    /// PROCURE: the hold's lease in seconds (none: held until RELEASE); RENEW: this
    /// renewal's length (none: the hold's original length). 1..=604800. Read as any
    /// JSON value so a wrong type gets an answer that names the field.
    pub lease_seconds: Option<serde_json::Value>,
}

/// Body of `POST …/shadow-deployables/min-pod-count`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MinPodBody {
    /// INCREASE, DECREASE or RESET_TO_0.
    pub action: MinPodAction,
    /// Amount (required except for RESET_TO_0).
    pub count: Option<i64>,
    /// Deployable name.
    pub name: String,
    /// Caller's run id.
    pub workflow_run_id: String,
    /// Caller's task id (logged).
    pub workflow_task_id: Option<String>,
    /// Caller's plan (logged).
    pub workflow_plan: Option<String>,
}

/// Body of `PUT …/shadow-deployables/{name}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterBody {
    /// Node pool.
    pub node_pool: String,
    /// DNS name.
    pub dns: String,
    /// The Deployment its minimum pod count scales (default: the deployable's name).
    pub deployment: Option<String>,
    /// The HorizontalPodAutoscaler whose `minReplicas` follows it (default: the
    /// deployable's name).
    pub hpa: Option<String>,
}

/// `deployment` and `hpa` must be Kubernetes object names.
fn check_kube_name(field: &str, value: &str) -> Result<(), ApiError> {
    if valid_object_name(value) {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "{field} {value:?} is not a Kubernetes object name (1-253 lowercase letters, \
             digits, '-' or '.', starting and ending with a letter or digit)"
        )))
    }
}

fn check_name(name: &str) -> Result<(), ApiError> {
    if valid_segment(name) {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "name {name:?} must be 1-253 characters of letters, digits, '-', '_' or '.'"
        )))
    }
}

fn check_text(field: &str, value: &str) -> Result<(), ApiError> {
    if value.trim().is_empty() {
        return Err(ApiError::BadRequest(format!("{field} must not be empty")));
    }
    if value.len() > MAX_ID_LEN || value.chars().any(char::is_control) {
        return Err(ApiError::BadRequest(format!(
            "{field} must be at most {MAX_ID_LEN} characters without control characters"
        )));
    }
    Ok(())
}

async fn list(
    state: web::Data<AppState>,
    env: web::Path<String>,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    let env = state.env(&env)?;
    let in_use = match query.in_use.as_deref() {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "in_use must be true or false, got {other:?}"
            )))
        }
    };
    let limit = paging::limit(query.limit)?;
    let after = paging::after(LIST_KIND, query.cont.as_deref())?;
    let filter = Filter {
        in_use,
        node_pool: query.node_pool.as_deref(),
    };
    let page = state.registry.page(&env, filter, after.as_deref(), limit);
    Ok(paging::answer(
        LIST_KIND,
        &page.items,
        page.more_after.as_deref(),
    ))
}

async fn action(
    state: web::Data<AppState>,
    env: web::Path<String>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let env = state.env(&env)?;
    let body = read_json::<ActionBody>(&req, payload).await?;
    let b = body.value;
    let target = match (b.action, b.name, b.node_pool) {
        (_, Some(name), None) => {
            check_name(&name)?;
            Target::Name(name)
        }
        (Action::Procure, None, Some(pool)) => {
            check_text("node_pool", &pool)?;
            Target::Pool(pool)
        }
        (Action::Procure, _, _) => {
            return Err(ApiError::BadRequest(
                "PROCURE needs exactly one of name and node_pool".into(),
            ))
        }
        (_, _, Some(_)) => {
            return Err(ApiError::BadRequest(
                "node_pool is only for PROCURE; RELEASE and RENEW need name".into(),
            ))
        }
        (_, None, None) => return Err(ApiError::BadRequest("name is required".into())),
    };
    check_text("workflow_run_id", &b.workflow_run_id)?;
    if let Some(plan) = &b.workflow_plan {
        check_text("workflow_plan", plan)?;
    }
    let lease_seconds = match (b.action, b.lease_seconds) {
        (_, None | Some(serde_json::Value::Null)) => None,
        (Action::Release, Some(_)) => {
            return Err(ApiError::BadRequest(
                "lease_seconds is only for PROCURE and RENEW".into(),
            ))
        }
        (_, Some(s)) => Some(
            s.as_u64()
                .filter(|s| (1..=MAX_LEASE_SECONDS).contains(s))
                .ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "lease_seconds must be an integer between 1 and {MAX_LEASE_SECONDS}"
                    ))
                })?,
        ),
    };
    let cmd = match b.action {
        Action::Procure => ShadowCommand::Procure {
            run_id: b.workflow_run_id,
            plan: b.workflow_plan,
            lease_seconds,
        },
        Action::Release => ShadowCommand::Release {
            run_id: b.workflow_run_id,
        },
        Action::Renew => ShadowCommand::Renew {
            run_id: b.workflow_run_id,
            lease_seconds,
        },
    };
    let idem = state.idempotency(&req, &env, "shadow-deployables:action", &body.canonical)?;
    let idem = idem.as_ref().map(|i| &i.0);
    match target {
        Target::Name(name) => run(&state, ShadowKey::new(&env, &name), cmd, idem).await,
        Target::Pool(pool) => procure_from_pool(&state, &env, &pool, cmd, idem).await,
    }
}

/// What a POST acts on.
enum Target {
    /// One deployable.
    Name(String),
    /// Any FREE deployable of a node pool (PROCURE only).
    Pool(String),
}

async fn procure_from_pool(
    state: &AppState,
    env: &str,
    pool: &str,
    cmd: ShadowCommand,
    idem: Option<&IdemRequest>,
) -> Result<HttpResponse, ApiError> {
    let retry_after = state.config.retry_after;
    let reply = state
        .registry
        .procure_from_pool(env, pool, cmd, idem.cloned())
        .await
        .map_err(|e| ApiError::from_exec(e, retry_after))?
        .ok_or_else(|| {
            ApiError::NotFound(format!("node pool {pool:?} has no shadow deployables"))
        })?;
    note_replayed(state, &reply);
    Ok(reply_response(&reply))
}

async fn min_pod_count(
    state: web::Data<AppState>,
    env: web::Path<String>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let env = state.env(&env)?;
    let body = read_json::<MinPodBody>(&req, payload).await?;
    let b = body.value;
    check_name(&b.name)?;
    check_text("workflow_run_id", &b.workflow_run_id)?;
    for (field, v) in [
        ("workflow_task_id", &b.workflow_task_id),
        ("workflow_plan", &b.workflow_plan),
    ] {
        if let Some(v) = v {
            check_text(field, v)?;
        }
    }
    let count = match (b.action, b.count) {
        (MinPodAction::ResetTo0, c) => c.unwrap_or(0),
        (_, Some(c)) => c,
        (_, None) => {
            return Err(ApiError::BadRequest(
                "count is required for INCREASE and DECREASE".into(),
            ))
        }
    };
    if count < 0 {
        return Err(ApiError::BadRequest("count must be >= 0".into()));
    }
    let count = u32::try_from(count)
        .ok()
        .filter(|c| *c <= MAX_MIN_POD_COUNT)
        .ok_or_else(|| ApiError::BadRequest(format!("count must be <= {MAX_MIN_POD_COUNT}")))?;
    tracing::info!(
        name = %b.name,
        workflow_run_id = %b.workflow_run_id,
        workflow_task_id = b.workflow_task_id.as_deref().unwrap_or(""),
        action = ?b.action,
        count,
        "min pod count change requested"
    );
    let cmd = ShadowCommand::MinPodCount {
        run_id: b.workflow_run_id,
        action: b.action,
        count,
    };
    let idem = state.idempotency(
        &req,
        &env,
        "shadow-deployables:min-pod-count",
        &body.canonical,
    )?;
    run(
        &state,
        ShadowKey::new(&env, &b.name),
        cmd,
        idem.as_ref().map(|i| &i.0),
    )
    .await
}

async fn register(
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (env, name) = path.into_inner();
    let env = state.env(&env)?;
    check_name(&name)?;
    let body = read_json::<RegisterBody>(&req, payload).await?;
    let b = body.value;
    check_text("node_pool", &b.node_pool)?;
    check_text("dns", &b.dns)?;
    for (field, value) in [("deployment", &b.deployment), ("hpa", &b.hpa)] {
        if let Some(v) = value {
            check_kube_name(field, v)?;
        }
    }
    let cmd = ShadowCommand::Register {
        name: name.clone(),
        node_pool: b.node_pool,
        dns: b.dns,
        deployment: b.deployment,
        hpa: b.hpa,
    };
    let route = format!("shadow-deployables:register:{name}");
    let idem = state.idempotency(&req, &env, &route, &body.canonical)?;
    run(
        &state,
        ShadowKey::new(&env, &name),
        cmd,
        idem.as_ref().map(|i| &i.0),
    )
    .await
}

async fn delete(
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let (env, name) = path.into_inner();
    let env = state.env(&env)?;
    check_name(&name)?;
    let route = format!("shadow-deployables:delete:{name}");
    let idem = state.idempotency(&req, &env, &route, b"")?;
    run(
        &state,
        ShadowKey::new(&env, &name),
        ShadowCommand::Delete,
        idem.as_ref().map(|i| &i.0),
    )
    .await
}

async fn run(
    state: &AppState,
    key: ShadowKey,
    cmd: ShadowCommand,
    idem: Option<&IdemRequest>,
) -> Result<HttpResponse, ApiError> {
    let retry_after = state.config.retry_after;
    let map = |e| ApiError::from_exec(e, retry_after);
    let converge = matches!(
        cmd,
        ShadowCommand::MinPodCount { .. } | ShadowCommand::Release { .. }
    );
    let handle = match cmd {
        ShadowCommand::Register { .. } => Some(state.registry.find_or_spawn(&key)),
        _ => state.registry.find(&key).await.map_err(map)?,
    };
    let reply = match handle {
        Some(h) => state
            .registry
            .execute(&h, cmd, idem.cloned())
            .await
            .map_err(map)?,
        None => {
            // Unknown here; a retry of a DELETE that already succeeded still replays.
            let replay = match idem {
                Some(i) => state
                    .store
                    .get(&i.store_key)
                    .await
                    .map_err(|e| map(e.into()))?
                    .map(|kv| i.replay(&kv.value))
                    .transpose()
                    .map_err(|e| map(e.into()))?,
                None => None,
            };
            replay.ok_or_else(|| {
                ApiError::NotFound(format!("shadow deployable {:?} not found", key.name))
            })?
        }
    };
    if converge && !reply.replayed {
        state.ops.converge_soon(key);
    }
    note_replayed(state, &reply);
    Ok(reply_response(&reply))
}
