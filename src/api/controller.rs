//! Resource Controller routes: instances, workers, heartbeats, templates and the
//! controller's status.

use actix_web::{web, HttpRequest, HttpResponse};
use chrono::Duration as ChronoDuration;
use serde::Deserialize;
use serde_json::json;

use crate::actors::instances::{self, Created, InstanceError};
use crate::actors::worker::{WorkerCmd, WorkerExecError, WorkerOutcome};
use crate::api::body::read_json;
use crate::api::error::ApiError;
use crate::api::paging;
use crate::api::{method_not_allowed, note_replayed, reply_response, AppState, InflightGuard};
use crate::config::valid_segment;
use crate::domain::worker::{Instance, InstanceState, Resources, WorkerError};
use crate::idempotency::{IdemError, IdemWrite, Reply};
use crate::ports::store::StoreError;

/// Scope of the controller routes' idempotency records (`/idempotency/controller/{key}`).
pub const IDEMPOTENCY_SCOPE: &str = "controller";

/// Largest accepted requirement, per dimension.
const MAX_REQUIREMENT: f64 = 1.0e6;
/// Longest accepted drain deadline (30 days).
const MAX_DRAIN_SECONDS: u64 = crate::config::MAX_DRAIN_DEADLINE.as_secs();

/// Registers the routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    let r =
        |path: &str| web::resource(path.to_owned()).default_service(web::to(method_not_allowed));
    cfg.service(r("/api/1.0/instances").get(list_instances).post(submit))
        .service(r("/api/1.0/instances/{id}").get(instance))
        .service(r("/api/1.0/instances/{id}/complete").post(complete))
        .service(r("/api/1.0/workers").get(workers))
        .service(r("/api/1.0/workers/{id}").get(worker))
        .service(r("/api/1.0/workers/{id}/drain").post(drain))
        .service(r("/api/1.0/workers/{id}/heartbeat").post(heartbeat))
        .service(r("/api/1.0/worker-templates").get(templates))
        .service(r("/api/1.0/controller").get(status));
}

/// Body of `POST /api/1.0/instances`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitBody {
    /// What the instance needs.
    pub requirements: Resources,
    /// Keeps its worker from a voluntary drain.
    #[serde(default)]
    pub do_not_disrupt: bool,
}

/// Body of `POST /api/1.0/workers/{id}/drain`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DrainBody {
    /// Seconds before the drain gives up waiting and the worker is stopped anyway
    /// (default `DRAIN_DEADLINE_SECONDS`, which is unset by default: no deadline, the
    /// drain waits for the worker's instances to complete).
    pub deadline_seconds: Option<u64>,
}

/// Body of `POST /api/1.0/workers/{id}/heartbeat`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatBody {
    /// Instances the host runs now.
    pub running_instances: Vec<String>,
}

fn worker_error(e: WorkerExecError, retry_after: u64) -> ApiError {
    match e {
        WorkerExecError::NotFound => ApiError::NotFound("worker not found".into()),
        WorkerExecError::Domain(WorkerError::DoNotDisrupt) => ApiError::Conflict(
            "worker runs do_not_disrupt instances; it cannot be drained voluntarily".into(),
        ),
        WorkerExecError::Domain(d) => ApiError::Conflict(d.to_string()),
        WorkerExecError::Exists | WorkerExecError::InstanceChanged(_) => {
            ApiError::Conflict(e.to_string())
        }
        WorkerExecError::Store(s) => ApiError::from_store(s, retry_after),
        WorkerExecError::Fenced
        | WorkerExecError::Contention
        | WorkerExecError::Mailbox
        | WorkerExecError::Busy => ApiError::Unavailable {
            message: e.to_string(),
            retry_after,
        },
        WorkerExecError::Corrupt(m) => ApiError::Internal(m),
        WorkerExecError::Idempotency(e) => idem_error(e),
    }
}

fn idem_error(e: IdemError) -> ApiError {
    match e {
        IdemError::Mismatch => ApiError::Unprocessable(e.to_string()),
        IdemError::Corrupt(m) => ApiError::Internal(m),
    }
}

fn instance_error(e: InstanceError, retry_after: u64) -> ApiError {
    match e {
        InstanceError::NotFound => ApiError::NotFound("instance not found".into()),
        InstanceError::Refused(m) => ApiError::Conflict(m),
        InstanceError::Store(s) => ApiError::from_store(s, retry_after),
        InstanceError::Fenced | InstanceError::Contention => ApiError::Unavailable {
            message: e.to_string(),
            retry_after,
        },
        InstanceError::Corrupt(m) => ApiError::Internal(m),
        InstanceError::Idempotency(e) => idem_error(e),
    }
}

/// The request's idempotency key (if any) for `route`, marked in flight, with a lease
/// for its record.
async fn idem_write<'a>(
    state: &'a AppState,
    req: &HttpRequest,
    route: &str,
    canonical: &[u8],
) -> Result<Option<(IdemWrite, InflightGuard<'a>)>, ApiError> {
    let Some((request, guard)) = state.idempotency(req, IDEMPOTENCY_SCOPE, route, canonical)?
    else {
        return Ok(None);
    };
    let lease = state
        .registry
        .deps()
        .leases
        .lease(state.store.as_ref())
        .await
        .map_err(|e| ApiError::Unavailable {
            message: format!("state store unavailable: {e}"),
            retry_after: state.config.retry_after,
        })?;
    Ok(Some((IdemWrite { request, lease }, guard)))
}

/// After a `LeaseNotFound` the idempotency lease is renewed once and the request
/// retried.
async fn renew(state: &AppState, idem: &mut Option<IdemWrite>) -> bool {
    let Some(w) = idem.as_mut() else { return false };
    let leases = &state.registry.deps().leases;
    leases.invalidate();
    match leases.lease(state.store.as_ref()).await {
        Ok(l) => {
            w.lease = l;
            true
        }
        Err(_) => false,
    }
}

/// Sends `make(idem)` to worker `id`, renewing the idempotency lease once if the store
/// no longer knows it.
async fn send_worker(
    state: &AppState,
    id: &str,
    mut idem: Option<IdemWrite>,
    make: impl Fn(Option<IdemWrite>) -> WorkerCmd,
) -> Result<WorkerOutcome, WorkerExecError> {
    let ctl = &state.controller;
    let first = ctl.workers.send(id, make(idem.clone()), false).await;
    if first == Err(WorkerExecError::Store(StoreError::LeaseNotFound))
        && renew(state, &mut idem).await
    {
        return ctl.workers.send(id, make(idem), false).await;
    }
    first
}

fn check_id(what: &str, id: &str) -> Result<(), ApiError> {
    if valid_segment(id) {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!("invalid {what} id {id:?}")))
    }
}

fn check_requirement(field: &str, v: f64) -> Result<(), ApiError> {
    if v.is_finite() && v > 0.0 && v <= MAX_REQUIREMENT {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "requirements.{field} must be a number in (0, {MAX_REQUIREMENT}]"
        )))
    }
}

async fn submit(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_json::<SubmitBody>(&req, payload).await?;
    let canonical = body.canonical;
    let body = body.value;
    check_requirement("cpu", body.requirements.cpu)?;
    check_requirement("memory_gb", body.requirements.memory_gb)?;
    let id = format!("i-{}", uuid::Uuid::new_v4().simple());
    let inst = Instance::new(
        &id,
        body.requirements,
        body.do_not_disrupt,
        state.controller.clock.now(),
    );
    let reply = Reply {
        status: 202,
        body: json!({"id": id, "state": inst.state}).to_string(),
        replayed: false,
    };
    let retry_after = state.config.retry_after;
    let ctl = &state.controller;
    let idem = idem_write(&state, &req, "instances:create", &canonical).await?;
    let mut write = idem.as_ref().map(|(w, _)| w.clone());
    let mut created = instances::create(
        ctl.store.as_ref(),
        &inst,
        write.as_ref().map(|w| (w, &reply)),
    )
    .await;
    if created == Err(InstanceError::Store(StoreError::LeaseNotFound))
        && renew(&state, &mut write).await
    {
        created = instances::create(
            ctl.store.as_ref(),
            &inst,
            write.as_ref().map(|w| (w, &reply)),
        )
        .await;
    }
    match created.map_err(|e| instance_error(e, retry_after))? {
        Created::New(rev) => {
            ctl.instances.note(&id, inst.clone(), rev);
            ctl.kick();
            Ok(reply_response(&reply))
        }
        Created::Replayed(stored) => {
            note_replayed(&state, &stored);
            Ok(reply_response(&stored))
        }
        Created::Collision => Err(ApiError::Conflict("instance id collision; retry".into())),
    }
}

async fn load_instance(state: &AppState, id: &str) -> Result<(Instance, i64), ApiError> {
    check_id("instance", id)?;
    instances::get(state.controller.store.as_ref(), id)
        .await
        .map_err(|e| instance_error(e, state.config.retry_after))?
        .ok_or_else(|| ApiError::NotFound(format!("instance {id:?} not found")))
}

/// Token kind of the instance list.
const INSTANCES_KIND: &str = "instances";

/// Query of `GET /api/1.0/instances`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstancesQuery {
    /// Only instances in this state.
    pub state: Option<InstanceState>,
    /// Only instances placed on this worker.
    pub worker_id: Option<String>,
    /// Page size, 1..=[`paging::MAX_LIST_PAGE`] (default and most).
    pub limit: Option<usize>,
    /// Where the previous page ended (opaque).
    #[serde(rename = "continue")]
    pub cont: Option<String>,
}

/// Instances as this replica's mirror has them, ordered by id, a page at a time.
async fn list_instances(
    state: web::Data<AppState>,
    query: web::Query<InstancesQuery>,
) -> Result<HttpResponse, ApiError> {
    let q = query.into_inner();
    if let Some(w) = &q.worker_id {
        check_id("worker", w)?;
    }
    let limit = paging::limit(q.limit)?;
    let after = paging::after(INSTANCES_KIND, q.cont.as_deref())?;
    let (page, more) = state
        .controller
        .instances
        .page(after.as_deref(), limit, |i: &Instance| {
            q.state.is_none_or(|s| i.state == s)
                && q.worker_id
                    .as_ref()
                    .is_none_or(|w| i.worker_id.as_ref() == Some(w))
        });
    let mut body = json!({ "data": page.iter().map(|(_, i)| i).collect::<Vec<_>>() });
    if let Some((last, _)) = page.last().filter(|_| more) {
        body["continue"] = json!(paging::token(INSTANCES_KIND, last));
    }
    Ok(HttpResponse::Ok().json(body))
}

async fn instance(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let (inst, _) = load_instance(&state, &id).await?;
    Ok(HttpResponse::Ok().json(inst))
}

/// Ends an instance: its record becomes `to` and, when it sits on a worker, the
/// worker's allocation is released in the same transaction (with the idempotency
/// record of `idem`, when given). Answers 200 and the instance's new record.
async fn end_instance(
    state: &AppState,
    id: &str,
    to: InstanceState,
    idem: Option<IdemWrite>,
) -> Result<Reply, ApiError> {
    let retry_after = state.config.retry_after;
    let ctl = &state.controller;
    let retention = &ctl.workers.deps().retention;
    let mut idem = idem;
    for _ in 0..8 {
        let (inst, rev) = load_instance(state, id).await?;
        if !inst.is_live() {
            // A retry of the request that ended it gets that answer.
            if let Some(w) = &idem {
                if let Some(kv) = ctl
                    .store
                    .get(&w.request.store_key)
                    .await
                    .map_err(|e| instance_error(e.into(), retry_after))?
                {
                    return w.request.replay(&kv.value).map_err(idem_error);
                }
            }
            return Err(ApiError::Conflict(format!(
                "instance is already {}",
                inst.state.as_str()
            )));
        }
        let mut done = inst.clone();
        done.state = to;
        let Some(worker_id) = inst.worker_id.clone() else {
            match instances::end_pending(ctl.store.as_ref(), id, to, retention, idem.as_ref()).await
            {
                Ok((reply, written)) => {
                    if let Some((i, r)) = written {
                        ctl.instances.note(id, i, r);
                    }
                    return Ok(reply);
                }
                Err(InstanceError::Refused(_)) => continue,
                Err(InstanceError::Store(StoreError::LeaseNotFound)) => {
                    if !renew(state, &mut idem).await {
                        return Err(instance_error(
                            InstanceError::Store(StoreError::LeaseNotFound),
                            retry_after,
                        ));
                    }
                    continue;
                }
                Err(e) => return Err(instance_error(e, retry_after)),
            }
        };
        let make = |idem| WorkerCmd::Unplace {
            instance_id: id.to_owned(),
            requirements: inst.requirements,
            instance: Some((done.clone(), rev)),
            idem,
        };
        match send_worker(state, &worker_id, idem.clone(), make).await {
            Ok(out) => {
                for (i, r) in out.written {
                    ctl.instances.note(&i.id.clone(), i, r);
                }
                ctl.kick();
                return Ok(out.reply);
            }
            Err(WorkerExecError::InstanceChanged(_)) => continue,
            Err(WorkerExecError::NotFound) => {
                // The worker record is gone: end the instance on its own.
                let r = instances::update(ctl.store.as_ref(), id, None, retention, |cur| {
                    let mut n = cur.clone();
                    n.state = to;
                    Ok(Some(n))
                })
                .await
                .map_err(|e| instance_error(e, retry_after))?;
                return Ok(Reply {
                    status: 200,
                    body: serde_json::to_string(&r.0).unwrap_or_default(),
                    replayed: false,
                });
            }
            Err(e) => return Err(worker_error(e, retry_after)),
        }
    }
    Err(ApiError::Unavailable {
        message: "instance keeps changing; retry".into(),
        retry_after,
    })
}

async fn complete(
    state: web::Data<AppState>,
    id: web::Path<String>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    check_id("instance", &id)?;
    // The route names everything the request does; a body is ignored.
    let route = format!("instances:complete:{id}");
    let idem = idem_write(&state, &req, &route, b"").await?;
    let write = idem.as_ref().map(|(w, _)| w.clone());
    let reply = end_instance(&state, &id, InstanceState::Completed, write).await?;
    note_replayed(&state, &reply);
    Ok(reply_response(&reply))
}

/// Token kind of the worker list.
const WORKERS_KIND: &str = "workers";

/// Query of `GET /api/1.0/workers`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkersQuery {
    /// Page size, 1..=[`paging::MAX_LIST_PAGE`] (default and most).
    pub limit: Option<usize>,
    /// Where the previous page ended (opaque).
    #[serde(rename = "continue")]
    pub cont: Option<String>,
}

/// Workers as this replica last saw them, ordered by id, a page at a time.
async fn workers(
    state: web::Data<AppState>,
    query: web::Query<WorkersQuery>,
) -> Result<HttpResponse, ApiError> {
    let limit = paging::limit(query.limit)?;
    let after = paging::after(WORKERS_KIND, query.cont.as_deref())?;
    let mut page: Vec<_> = state
        .controller
        .workers
        .list()
        .into_iter()
        .filter(|w| after.as_ref().is_none_or(|a| w.id > *a))
        .take(limit + 1)
        .collect();
    let more = page.len() > limit;
    page.truncate(limit);
    let mut body = json!({ "data": page });
    if let Some(last) = page.last().filter(|_| more) {
        body["continue"] = json!(paging::token(WORKERS_KIND, &last.id));
    }
    Ok(HttpResponse::Ok().json(body))
}

async fn worker(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    check_id("worker", &id)?;
    state
        .controller
        .workers
        .get(&id)
        .map(|w| HttpResponse::Ok().json(w))
        .ok_or_else(|| ApiError::NotFound(format!("worker {:?} not found", id.as_str())))
}

async fn drain(
    state: web::Data<AppState>,
    id: web::Path<String>,
    req: actix_web::HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    check_id("worker", &id)?;
    let has_body = req
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v != "0");
    let body = if has_body {
        read_json::<DrainBody>(&req, payload).await?.value
    } else {
        DrainBody::default()
    };
    let secs = body.deadline_seconds.or(state
        .controller
        .settings
        .drain_deadline
        .map(|d| d.as_secs()));
    if secs.is_some_and(|s| s > MAX_DRAIN_SECONDS) {
        return Err(ApiError::BadRequest(format!(
            "deadline_seconds must be <= {MAX_DRAIN_SECONDS}"
        )));
    }
    let now = state.controller.clock.now();
    let deadline = secs.map(|s| now + ChronoDuration::seconds(i64::try_from(s).unwrap_or(0)));
    // Hash what the request means, so `{}` and no body are the same request.
    let canonical = json!({"deadline_seconds": body.deadline_seconds}).to_string();
    let route = format!("workers:drain:{id}");
    let idem = idem_write(&state, &req, &route, canonical.as_bytes()).await?;
    let write = idem.as_ref().map(|(w, _)| w.clone());
    // The decision (do_not_disrupt included) is made by the worker actor on the
    // instances as of the worker record it writes against, never on this replica's view.
    let make = |idem| WorkerCmd::Drain {
        deadline,
        voluntary: true,
        idle_cutoff: None,
        idem,
    };
    let out = send_worker(&state, &id, write, make)
        .await
        .map_err(|e| worker_error(e, state.config.retry_after))?;
    if !out.reply.replayed {
        state
            .controller
            .decide("drain", &id, "requested through the API");
    }
    note_replayed(&state, &out.reply);
    Ok(reply_response(&out.reply))
}

async fn heartbeat(
    state: web::Data<AppState>,
    id: web::Path<String>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    check_id("worker", &id)?;
    let body = read_json::<HeartbeatBody>(&req, payload).await?;
    let canonical = body.canonical;
    let body = body.value;
    if let Some(bad) = body.running_instances.iter().find(|i| !valid_segment(i)) {
        return Err(ApiError::BadRequest(format!("invalid instance id {bad:?}")));
    }
    let retry_after = state.config.retry_after;
    let ctl = &state.controller;
    let route = format!("workers:heartbeat:{id}");
    let idem = idem_write(&state, &req, &route, &canonical).await?;
    let write = idem.as_ref().map(|(w, _)| w.clone());
    // What this replica knows of the worker's instances saves reads; the actor compares
    // every record it changes, so a stale one only costs a retry.
    let known: Vec<(Instance, i64)> = ctl
        .instances
        .all()
        .into_iter()
        .filter(|(i, _)| i.worker_id.as_deref() == Some(id.as_str()))
        .collect();
    let at = ctl.clock.now();
    let make = |idem| WorkerCmd::Heartbeat {
        at,
        running: body.running_instances.clone(),
        known: known.clone(),
        idem,
    };
    let out = send_worker(&state, &id, write, make)
        .await
        .map_err(|e| worker_error(e, retry_after))?;
    let completed_any = out
        .written
        .iter()
        .any(|(i, _)| i.state == InstanceState::Completed);
    for (i, r) in out.written {
        ctl.instances.note(&i.id.clone(), i, r);
    }
    if completed_any {
        ctl.kick();
    }
    if !out.reply.replayed {
        let unknown = serde_json::from_str::<serde_json::Value>(&out.reply.body)
            .ok()
            .and_then(|v| v["unknown_instances"].as_array().cloned())
            .unwrap_or_default();
        if !unknown.is_empty() {
            tracing::warn!(worker = %id, ?unknown, "heartbeat reports instances not placed on this worker");
        }
    }
    note_replayed(&state, &out.reply);
    Ok(reply_response(&out.reply))
}

async fn templates(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(json!({"data": state.controller.templates}))
}

async fn status(state: web::Data<AppState>) -> HttpResponse {
    let ctl = &state.controller;
    let pending: Vec<String> = ctl.pending().into_iter().map(|(i, _)| i.id).collect();
    // Why each waits, as the autoscaler's last plan found it (none yet: not planned).
    let reasons: serde_json::Map<String, serde_json::Value> = ctl
        .waiting_reasons(&pending)
        .into_iter()
        .map(|(id, r)| (id.to_owned(), json!(r)))
        .collect();
    HttpResponse::Ok().json(json!({
        "leader": ctl.leader_status(),
        "last_reconcile": ctl.reconcile_status(),
        "pending_demand": {"instances": pending.len(), "ids": pending, "reasons": reasons},
        "recent_decisions": ctl.decisions(),
        "min_replicas": state.ops.convergence(),
    }))
}
