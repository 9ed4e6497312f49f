//! Resource Controller routes: instances, workers, heartbeats, templates and the
//! controller's status.

use std::collections::HashSet;

use actix_web::{web, HttpResponse};
use chrono::Duration as ChronoDuration;
use serde::Deserialize;
use serde_json::json;

use crate::actors::instances::{self, InstanceError};
use crate::actors::worker::{WorkerCmd, WorkerExecError};
use crate::api::body::read_json;
use crate::api::error::ApiError;
use crate::api::{method_not_allowed, AppState};
use crate::config::valid_segment;
use crate::domain::worker::{Instance, InstanceState, Resources, WorkerError};

/// Largest accepted requirement, per dimension.
const MAX_REQUIREMENT: f64 = 1.0e6;
/// Longest accepted drain deadline (30 days).
const MAX_DRAIN_SECONDS: u64 = 30 * 24 * 3600;

/// Registers the routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    let r =
        |path: &str| web::resource(path.to_owned()).default_service(web::to(method_not_allowed));
    cfg.service(r("/api/1.0/instances").post(submit))
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
    /// Seconds before the drain gives up waiting (default `DRAIN_DEADLINE_SECONDS`).
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
        WorkerExecError::Store(s) => ApiError::Unavailable {
            message: format!("state store unavailable: {s}"),
            retry_after,
        },
        WorkerExecError::Fenced
        | WorkerExecError::Contention
        | WorkerExecError::Mailbox
        | WorkerExecError::Busy => ApiError::Unavailable {
            message: e.to_string(),
            retry_after,
        },
        WorkerExecError::Corrupt(m) => ApiError::Internal(m),
    }
}

fn instance_error(e: InstanceError, retry_after: u64) -> ApiError {
    match e {
        InstanceError::NotFound => ApiError::NotFound("instance not found".into()),
        InstanceError::Refused(m) => ApiError::Conflict(m),
        InstanceError::Store(s) => ApiError::Unavailable {
            message: format!("state store unavailable: {s}"),
            retry_after,
        },
        InstanceError::Fenced | InstanceError::Contention => ApiError::Unavailable {
            message: e.to_string(),
            retry_after,
        },
        InstanceError::Corrupt(m) => ApiError::Internal(m),
    }
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
    req: actix_web::HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_json::<SubmitBody>(&req, payload).await?.value;
    check_requirement("cpu", body.requirements.cpu)?;
    check_requirement("memory_gb", body.requirements.memory_gb)?;
    let id = format!("i-{}", uuid::Uuid::new_v4().simple());
    let inst = Instance::new(
        &id,
        body.requirements,
        body.do_not_disrupt,
        state.controller.clock.now(),
    );
    let ctl = &state.controller;
    let rev = instances::create(ctl.store.as_ref(), &inst)
        .await
        .map_err(|e| instance_error(e.into(), state.config.retry_after))?
        .ok_or_else(|| ApiError::Conflict("instance id collision; retry".into()))?;
    ctl.instances.note(&id, inst.clone(), rev);
    ctl.kick();
    Ok(HttpResponse::Accepted().json(json!({"id": id, "state": inst.state})))
}

async fn load_instance(state: &AppState, id: &str) -> Result<(Instance, i64), ApiError> {
    check_id("instance", id)?;
    instances::get(state.controller.store.as_ref(), id)
        .await
        .map_err(|e| instance_error(e, state.config.retry_after))?
        .ok_or_else(|| ApiError::NotFound(format!("instance {id:?} not found")))
}

async fn instance(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let (inst, _) = load_instance(&state, &id).await?;
    Ok(HttpResponse::Ok().json(inst))
}

/// Ends an instance: its record becomes `to` and, when it sits on a worker, the
/// worker's allocation is released in the same transaction.
async fn end_instance(state: &AppState, id: &str, to: InstanceState) -> Result<Instance, ApiError> {
    let retry_after = state.config.retry_after;
    for _ in 0..8 {
        let (inst, rev) = load_instance(state, id).await?;
        if !inst.is_live() {
            return Err(ApiError::Conflict(format!(
                "instance is already {}",
                serde_json::to_value(inst.state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            )));
        }
        let mut done = inst.clone();
        done.state = to;
        let Some(worker_id) = inst.worker_id.clone() else {
            let r = instances::update(
                state.controller.store.as_ref(),
                id,
                None,
                &state.controller.workers.deps().retention,
                |cur| {
                    if cur.state != InstanceState::Pending {
                        return Err("instance changed; retry".into());
                    }
                    let mut n = cur.clone();
                    n.state = to;
                    Ok(Some(n))
                },
            )
            .await;
            match r {
                Ok((i, r)) => {
                    state.controller.instances.note(id, i.clone(), r);
                    return Ok(i);
                }
                Err(InstanceError::Refused(_)) => continue,
                Err(e) => return Err(instance_error(e, retry_after)),
            }
        };
        let cmd = WorkerCmd::Unplace {
            instance_id: id.to_owned(),
            requirements: inst.requirements,
            instance: Some((done.clone(), rev)),
        };
        match state.controller.workers.send(&worker_id, cmd, false).await {
            Ok(out) => {
                if let Some((i, r)) = out.instance {
                    state.controller.instances.note(id, i, r);
                }
                state.controller.kick();
                return Ok(done);
            }
            Err(WorkerExecError::InstanceChanged(_)) => continue,
            Err(WorkerExecError::NotFound) => {
                // The worker record is gone: end the instance on its own.
                let r = instances::update(
                    state.controller.store.as_ref(),
                    id,
                    None,
                    &state.controller.workers.deps().retention,
                    |cur| {
                        let mut n = cur.clone();
                        n.state = to;
                        Ok(Some(n))
                    },
                )
                .await
                .map_err(|e| instance_error(e, retry_after))?;
                return Ok(r.0);
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
) -> Result<HttpResponse, ApiError> {
    let inst = end_instance(&state, &id, InstanceState::Completed).await?;
    Ok(HttpResponse::Ok().json(inst))
}

async fn workers(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(json!({"data": state.controller.workers.list()}))
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
    let secs = body
        .deadline_seconds
        .unwrap_or(state.controller.settings.drain_deadline.as_secs());
    if secs > MAX_DRAIN_SECONDS {
        return Err(ApiError::BadRequest(format!(
            "deadline_seconds must be <= {MAX_DRAIN_SECONDS}"
        )));
    }
    let placed: Vec<Instance> = state
        .controller
        .instances
        .all()
        .into_iter()
        .map(|(i, _)| i)
        .filter(|i| i.worker_id.as_deref() == Some(id.as_str()) && i.is_live())
        .collect();
    let deadline =
        state.controller.clock.now() + ChronoDuration::seconds(i64::try_from(secs).unwrap_or(0));
    let cmd = WorkerCmd::Drain {
        deadline,
        voluntary: true,
        instances: placed,
    };
    let out = state
        .controller
        .workers
        .send(&id, cmd, false)
        .await
        .map_err(|e| worker_error(e, state.config.retry_after))?;
    state
        .controller
        .decide("drain", &id, "requested through the API");
    Ok(HttpResponse::Accepted().json(out.worker))
}

async fn heartbeat(
    state: web::Data<AppState>,
    id: web::Path<String>,
    req: actix_web::HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    check_id("worker", &id)?;
    let body = read_json::<HeartbeatBody>(&req, payload).await?.value;
    if let Some(bad) = body.running_instances.iter().find(|i| !valid_segment(i)) {
        return Err(ApiError::BadRequest(format!("invalid instance id {bad:?}")));
    }
    let retry_after = state.config.retry_after;
    let ctl = &state.controller;
    let out = ctl
        .workers
        .send(
            &id,
            WorkerCmd::Heartbeat {
                at: ctl.clock.now(),
            },
            false,
        )
        .await
        .map_err(|e| worker_error(e, retry_after))?;
    let running: HashSet<&str> = body.running_instances.iter().map(String::as_str).collect();
    let placed: HashSet<&str> = out.worker.instances.iter().map(String::as_str).collect();
    let (mut started, mut completed) = (Vec::new(), Vec::new());
    for iid in &out.worker.instances {
        let Some((inst, _)) = ctl.instances.get(iid) else {
            continue;
        };
        match (inst.state, running.contains(iid.as_str())) {
            (InstanceState::Scheduled, true) => {
                let r = instances::update(
                    ctl.store.as_ref(),
                    iid,
                    None,
                    &ctl.workers.deps().retention,
                    |cur| {
                        if cur.state != InstanceState::Scheduled {
                            return Ok(None);
                        }
                        let mut n = cur.clone();
                        n.state = InstanceState::Running;
                        Ok(Some(n))
                    },
                )
                .await
                .map_err(|e| instance_error(e, retry_after))?;
                ctl.instances.note(iid, r.0, r.1);
                started.push(iid.clone());
            }
            // Only instances the host confirmed earlier can be "no longer running";
            // a SCHEDULED one may simply not have started yet.
            (InstanceState::Running, false) => {
                end_instance(&state, iid, InstanceState::Completed).await?;
                completed.push(iid.clone());
            }
            _ => {}
        }
    }
    let unknown: Vec<&str> = body
        .running_instances
        .iter()
        .map(String::as_str)
        .filter(|i| !placed.contains(i))
        .collect();
    if !unknown.is_empty() {
        tracing::warn!(worker = %id, ?unknown, "heartbeat reports instances not placed on this worker");
    }
    Ok(HttpResponse::Ok().json(json!({
        "worker_id": id.as_str(),
        "started": started,
        "completed": completed,
        "unknown_instances": unknown,
    })))
}

async fn templates(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(json!({"data": state.controller.templates}))
}

async fn status(state: web::Data<AppState>) -> HttpResponse {
    let ctl = &state.controller;
    let pending: Vec<String> = ctl.pending().into_iter().map(|(i, _)| i.id).collect();
    HttpResponse::Ok().json(json!({
        "leader": ctl.leader_status(),
        "last_reconcile": ctl.reconcile_status(),
        "pending_demand": {"instances": pending.len(), "ids": pending},
        "recent_decisions": ctl.decisions(),
    }))
}
