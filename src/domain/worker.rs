//! Resource Controller entities: worker templates, workers (cloud hosts) and the lab
//! instances placed on them. Pure data and pure transition functions only.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::launch::{IamInstanceProfile, LaunchTemplateRef, Market, RootVolume};

/// CPU and memory of a host or a request.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// vCPUs.
    pub cpu: f64,
    /// Memory in GiB.
    pub memory_gb: f64,
}

/// A kind of worker the autoscaler may launch (`config/worker-templates.yaml`).
///
/// The host is launched either from an EC2 launch template (`launch_template`, the
/// preferred way; it may then supply the image and instance type) or from `image_id`
/// plus `instance_type`/`instance_types`; the other launch fields override or add to
/// what the launch template says. See [`crate::domain::launch`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerTemplate {
    /// Unique name.
    pub name: String,
    /// Cloud instance type, e.g. `m5zn.metal` (shorthand for a one-element
    /// `instance_types`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_type: Option<String>,
    /// Instance types tried in order when the cloud has no capacity for one (the first
    /// is the primary).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_types: Option<Vec<String>>,
    /// Machine image (optional with a launch template that names one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
    /// EC2 launch template to launch from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch_template: Option<LaunchTemplateRef>,
    /// Subnet to launch in.
    #[serde(default)]
    pub subnet_id: Option<String>,
    /// Security groups.
    #[serde(default)]
    pub security_group_ids: Option<Vec<String>>,
    /// IAM instance profile of the host (`{arn}` or `{name}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iam_instance_profile: Option<IamInstanceProfile>,
    /// EC2 key pair name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_name: Option<String>,
    /// File whose content is the host's user data (read once at start-up; a relative
    /// path is relative to the templates file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data_file: Option<String>,
    /// The content of `user_data_file`, filled in at start-up. Never serialized: user
    /// data may carry secrets and is not part of any answer.
    #[serde(skip)]
    pub user_data: Option<Vec<u8>>,
    /// Root EBS volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_volume: Option<RootVolume>,
    /// Market to buy from first (`on_demand` or `spot`).
    #[serde(default)]
    pub market: Market,
    /// Whether a spot launch that finds no spot capacity goes on on-demand.
    #[serde(default = "default_true")]
    pub spot_fallback_on_demand: bool,
    /// What one worker offers.
    pub capacity: Resources,
    /// Workers kept even when idle.
    pub min_workers: u32,
    /// Hard ceiling of workers of this template.
    pub max_workers: u32,
    /// Cost per hour (ties between templates go to the cheaper).
    pub hourly_cost: f64,
    /// Labels copied to the worker (and cloud tags).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

fn default_true() -> bool {
    true
}

impl Default for WorkerTemplate {
    /// An empty on-demand template with spot fallback on (the file defaults); tests and
    /// builders fill in the rest.
    fn default() -> Self {
        WorkerTemplate {
            name: String::new(),
            instance_type: None,
            instance_types: None,
            image_id: None,
            launch_template: None,
            subnet_id: None,
            security_group_ids: None,
            iam_instance_profile: None,
            key_name: None,
            user_data_file: None,
            user_data: None,
            root_volume: None,
            market: Market::OnDemand,
            spot_fallback_on_demand: true,
            capacity: Resources::default(),
            min_workers: 0,
            max_workers: 0,
            hourly_cost: 0.0,
            labels: BTreeMap::new(),
        }
    }
}

/// Worker life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum WorkerState {
    /// Decided, not yet asked of the cloud.
    Pending,
    /// Cloud launch requested.
    Provisioning,
    /// Accepting instances.
    Running,
    /// Accepting no new instances; waiting for its instances to end.
    Draining,
    /// Terminate requested.
    Stopping,
    /// Cloud reports stopped.
    Stopped,
    /// Gone.
    Terminated,
    /// Broken (launch timeout, lost instance, missed heartbeats).
    Failed,
}

/// A cloud host running lab instances (`/workers/{id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Worker {
    /// Worker id (also the cloud client token).
    pub id: String,
    /// Template name.
    pub template: String,
    /// Cloud instance id once launched.
    pub cloud_instance_id: Option<String>,
    /// State.
    pub state: WorkerState,
    /// Capacity (from the template).
    pub capacity: Resources,
    /// Sum of the requirements of its instances.
    pub allocated: Resources,
    /// Ids of instances placed on it.
    pub instances: Vec<String>,
    /// Creation time.
    #[serde(with = "crate::domain::time")]
    pub created_at: DateTime<Utc>,
    /// Time of the last state change.
    #[serde(with = "crate::domain::time")]
    pub state_changed_at: DateTime<Utc>,
    /// Last heartbeat from the host.
    #[serde(default, with = "crate::domain::time::option")]
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    /// When a drain gives up waiting.
    #[serde(default, with = "crate::domain::time::option")]
    pub drain_deadline: Option<DateTime<Utc>>,
    /// Since when it has been RUNNING with no instances; `None` while it has instances.    #[serde(default, with = "crate::domain::time::option")]
    pub idle_since: Option<DateTime<Utc>>,
}

/// Instance life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum InstanceState {
    /// Waiting for a worker.
    Pending,
    /// Placed on a worker.
    Scheduled,
    /// Confirmed running by the worker's heartbeat.
    Running,
    /// Finished.
    Completed,
    /// Failed.
    Failed,
}

/// A lab to run (`/instances/{id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    /// Instance id.
    pub id: String,
    /// What it needs.
    pub requirements: Resources,
    /// State.
    pub state: InstanceState,
    /// Worker it is placed on.
    pub worker_id: Option<String>,
    /// Keeps its worker from a voluntary drain.
    pub do_not_disrupt: bool,
    /// Creation time.
    #[serde(with = "crate::domain::time")]
    pub created_at: DateTime<Utc>,
}

/// Absolute slack used when comparing resource amounts (sums of `f64` drift slightly).
pub const RESOURCE_EPSILON: f64 = 1e-9;

impl Resources {
    /// Whether this request fits within `free` (each dimension, with [`RESOURCE_EPSILON`]
    /// slack). A NaN amount never fits.
    pub fn fits_in(&self, free: &Resources) -> bool {
        self.cpu <= free.cpu + RESOURCE_EPSILON
            && self.memory_gb <= free.memory_gb + RESOURCE_EPSILON
    }

    /// Component-wise sum.
    pub fn add(&self, o: &Resources) -> Resources {
        Resources {
            cpu: self.cpu + o.cpu,
            memory_gb: self.memory_gb + o.memory_gb,
        }
    }

    /// Component-wise difference, never below zero.
    pub fn sub_floor0(&self, o: &Resources) -> Resources {
        Resources {
            cpu: (self.cpu - o.cpu).max(0.0),
            memory_gb: (self.memory_gb - o.memory_gb).max(0.0),
        }
    }

    /// Component-wise minimum.
    fn min(&self, o: &Resources) -> Resources {
        Resources {
            cpu: self.cpu.min(o.cpu),
            memory_gb: self.memory_gb.min(o.memory_gb),
        }
    }
}

impl WorkerState {
    /// The wire name (`RUNNING`, ...), as serialized.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Provisioning => "PROVISIONING",
            Self::Running => "RUNNING",
            Self::Draining => "DRAINING",
            Self::Stopping => "STOPPING",
            Self::Stopped => "STOPPED",
            Self::Terminated => "TERMINATED",
            Self::Failed => "FAILED",
        }
    }
}

impl std::fmt::Display for WorkerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl InstanceState {
    /// The wire name (`PENDING`, ...), as serialized.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Scheduled => "SCHEDULED",
            Self::Running => "RUNNING",
            Self::Completed => "COMPLETED",
            Self::Failed => "FAILED",
        }
    }
}

impl std::fmt::Display for InstanceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a worker or instance change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkerError {
    /// The worker state machine has no such edge.
    #[error("illegal worker transition from {from} to {to}")]
    IllegalTransition {
        /// Current state.
        from: WorkerState,
        /// Requested state.
        to: WorkerState,
    },
    /// The worker is not RUNNING, so it takes no new instances.
    #[error("worker is {0} and accepts no instances")]
    NotAccepting(WorkerState),
    /// The request exceeds the worker's free capacity.
    #[error("instance does not fit the worker's free capacity")]
    DoesNotFit,
    /// A voluntary drain was blocked by `do_not_disrupt` instances on the worker.
    #[error("worker runs do-not-disrupt instances; voluntary drain refused")]
    DoNotDisrupt,
    /// An idle drain found the worker busy again (or idle for too short a time).
    #[error("worker is no longer idle")]
    NotIdle,
    /// No such instance.
    #[error("unknown instance {0}")]
    UnknownInstance(String),
    /// The instance state machine has no such edge (or SCHEDULED without a worker).
    #[error("illegal instance transition from {from} to {to}")]
    IllegalInstanceTransition {
        /// Current state.
        from: InstanceState,
        /// Requested state.
        to: InstanceState,
    },
}

/// Whether the worker state machine allows `from -> to`. Self-loops are not edges.
pub fn is_legal(from: WorkerState, to: WorkerState) -> bool {
    use WorkerState::*;
    matches!(
        (from, to),
        (Pending, Provisioning)
            | (Provisioning, Running)
            | (Running, Draining)
            | (Draining, Stopping)
            | (Stopping, Stopped)
            | (Stopped, Terminated)
            | (Stopping, Terminated)
            | (
                Pending | Provisioning | Running | Draining | Stopping | Stopped,
                Failed
            )
            | (Failed, Stopping)
            | (Failed, Terminated)
    )
}

impl Worker {
    /// A new PENDING worker of `template`: capacity from the template, nothing allocated.
    pub fn new(id: &str, template: &WorkerTemplate, now: DateTime<Utc>) -> Worker {
        Worker {
            id: id.to_owned(),
            template: template.name.clone(),
            cloud_instance_id: None,
            state: WorkerState::Pending,
            capacity: template.capacity,
            allocated: Resources::default(),
            instances: Vec::new(),
            created_at: now,
            state_changed_at: now,
            last_heartbeat_at: None,
            drain_deadline: None,
            idle_since: None,
        }
    }

    /// Capacity not yet allocated (never negative).
    pub fn free(&self) -> Resources {
        self.capacity.sub_floor0(&self.allocated)
    }

    /// Only a RUNNING worker takes new instances.
    pub fn accepts_instances(&self) -> bool {
        self.state == WorkerState::Running
    }

    /// Neither TERMINATED nor FAILED: counts toward the template's `max_workers`.
    pub fn is_active(&self) -> bool {
        !matches!(self.state, WorkerState::Terminated | WorkerState::Failed)
    }

    /// PENDING or PROVISIONING: capacity that is coming but cannot take instances yet.
    pub fn is_in_flight(&self) -> bool {
        matches!(self.state, WorkerState::Pending | WorkerState::Provisioning)
    }
}

/// Moves `w` to `to` if [`is_legal`], stamping `state_changed_at`. Entering RUNNING with
/// no instances starts the idle clock (`idle_since = now`).
pub fn transition(w: &Worker, to: WorkerState, now: DateTime<Utc>) -> Result<Worker, WorkerError> {
    if !is_legal(w.state, to) {
        return Err(WorkerError::IllegalTransition { from: w.state, to });
    }
    let mut next = w.clone();
    next.state = to;
    next.state_changed_at = now;
    if to == WorkerState::Running && next.instances.is_empty() {
        next.idle_since = Some(now);
    }
    Ok(next)
}

/// RUNNING -> DRAINING with `drain_deadline = deadline` (`None`: the drain waits for
/// its instances however long they take). A `voluntary` drain (scale-down)
/// is refused with [`WorkerError::DoNotDisrupt`] while any of `instances` placed on this
/// worker (`worker_id == w.id`, SCHEDULED or RUNNING) has `do_not_disrupt`; an involuntary
/// drain (host retirement, spot interruption) ignores the flag.
///
/// `instances` must be the records of the ids `w` lists, read together with `w` (the
/// caller's compare-and-swap covers `w`'s revision, which every placement changes, and
/// theirs): a decision on any other list can drain a worker that a placement has made
/// busy in between.
pub fn start_drain(
    w: &Worker,
    instances: &[Instance],
    deadline: Option<DateTime<Utc>>,
    voluntary: bool,
    now: DateTime<Utc>,
) -> Result<Worker, WorkerError> {
    let mut next = transition(w, WorkerState::Draining, now)?;
    if voluntary && holds_do_not_disrupt(w, instances) {
        return Err(WorkerError::DoNotDisrupt);
    }
    next.drain_deadline = deadline;
    Ok(next)
}

/// Whether any of `instances` is a live (SCHEDULED or RUNNING) `do_not_disrupt`
/// instance placed on `w`.
pub fn holds_do_not_disrupt(w: &Worker, instances: &[Instance]) -> bool {
    instances.iter().any(|i| {
        i.do_not_disrupt
            && i.worker_id.as_deref() == Some(w.id.as_str())
            && matches!(i.state, InstanceState::Scheduled | InstanceState::Running)
    })
}

/// The scale-down drain: like a voluntary [`start_drain`], but only while `w` is still
/// RUNNING with no instances and idle since `cutoff` or earlier (a worker without
/// `idle_since` counts from its last state change); otherwise
/// [`WorkerError::NotIdle`]. Re-checked on the record the drain is written against, so
/// a placement after the idle worker was picked cancels the drain.
pub fn start_idle_drain(
    w: &Worker,
    instances: &[Instance],
    deadline: Option<DateTime<Utc>>,
    cutoff: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<Worker, WorkerError> {
    let since = w.idle_since.unwrap_or(w.state_changed_at);
    if w.state == WorkerState::Running && (!w.instances.is_empty() || since > cutoff) {
        return Err(WorkerError::NotIdle);
    }
    start_drain(w, instances, deadline, true, now)
}

/// What one heartbeat changes: the worker (heartbeat time, released allocations) and
/// the instances that started or ended, decided together so they are written together.
#[derive(Debug, Clone, PartialEq)]
pub struct HeartbeatPlan {
    /// The worker afterwards.
    pub worker: Worker,
    /// New records of the instances that changed.
    pub changed: Vec<Instance>,
    /// SCHEDULED instances the host runs: now RUNNING.
    pub started: Vec<String>,
    /// RUNNING instances the host no longer runs: now COMPLETED and released.
    pub completed: Vec<String>,
    /// Ids the host reports that are not placed on this worker.
    pub unknown: Vec<String>,
    /// More changes were due than `limit`: apply this plan and plan again.
    pub more: bool,
}

/// Plans a heartbeat of `w` reporting `running`, against `instances` (the records of the
/// ids `w` lists; absent ids are skipped): SCHEDULED ones it runs become RUNNING,
/// RUNNING ones it no longer runs become COMPLETED and leave the worker (a SCHEDULED one
/// it does not run yet may simply not have started). At most `limit` instances change;
/// `more` says whether others are still due.
pub fn plan_heartbeat(
    w: &Worker,
    instances: &[Instance],
    running: &[String],
    at: DateTime<Utc>,
    limit: usize,
) -> HeartbeatPlan {
    let mut plan = HeartbeatPlan {
        worker: w.clone(),
        changed: Vec::new(),
        started: Vec::new(),
        completed: Vec::new(),
        unknown: running
            .iter()
            .filter(|r| !w.instances.contains(r))
            .cloned()
            .collect(),
        more: false,
    };
    plan.worker.last_heartbeat_at = Some(at);
    for id in &w.instances {
        let Some(inst) = instances.iter().find(|i| &i.id == id) else {
            continue;
        };
        let reported = running.contains(id);
        let to = match (inst.state, reported) {
            (InstanceState::Scheduled, true) => InstanceState::Running,
            (InstanceState::Running, false) => InstanceState::Completed,
            _ => continue,
        };
        if plan.changed.len() >= limit {
            plan.more = true;
            break;
        }
        let Ok(next) = instance_transition(inst, to, None) else {
            continue;
        };
        if to == InstanceState::Completed {
            plan.worker = unplace(&plan.worker, id, &inst.requirements, at);
            plan.completed.push(id.clone());
        } else {
            plan.started.push(id.clone());
        }
        plan.changed.push(next);
    }
    plan
}

/// Places `inst` on `w`: only when RUNNING ([`WorkerError::NotAccepting`] otherwise) and
/// when its requirements fit the free capacity ([`WorkerError::DoesNotFit`]). Adds the id
/// and the allocation (clamped to capacity, so epsilon slack never over-allocates) and
/// stops the idle clock. Placing an already placed id returns an unchanged clone.
pub fn place(w: &Worker, inst: &Instance, _now: DateTime<Utc>) -> Result<Worker, WorkerError> {
    if !w.accepts_instances() {
        return Err(WorkerError::NotAccepting(w.state));
    }
    if w.instances.contains(&inst.id) {
        return Ok(w.clone());
    }
    if !inst.requirements.fits_in(&w.free()) {
        return Err(WorkerError::DoesNotFit);
    }
    let mut next = w.clone();
    next.instances.push(inst.id.clone());
    next.allocated = next.allocated.add(&inst.requirements).min(&next.capacity);
    next.idle_since = None;
    Ok(next)
}

/// Removes `instance_id` from `w` (in any state), releasing `requirements` (floored at
/// zero). When the worker becomes empty its allocation is reset to exactly zero and the
/// idle clock starts (`idle_since = now`). Absent ids give an unchanged clone.
pub fn unplace(
    w: &Worker,
    instance_id: &str,
    requirements: &Resources,
    now: DateTime<Utc>,
) -> Worker {
    let mut next = w.clone();
    let Some(pos) = next.instances.iter().position(|id| id == instance_id) else {
        return next;
    };
    next.instances.remove(pos);
    next.allocated = next.allocated.sub_floor0(requirements);
    if next.instances.is_empty() {
        next.allocated = Resources::default();
        next.idle_since = Some(now);
    }
    next
}

/// A DRAINING worker may move on to STOPPING: it has no instances left, or its drain
/// deadline has passed (`now >= drain_deadline`).
pub fn drain_complete(w: &Worker, now: DateTime<Utc>) -> bool {
    w.state == WorkerState::Draining
        && (w.instances.is_empty() || w.drain_deadline.is_some_and(|d| now >= d))
}

impl Instance {
    /// A new PENDING instance on no worker.
    pub fn new(
        id: &str,
        requirements: Resources,
        do_not_disrupt: bool,
        now: DateTime<Utc>,
    ) -> Instance {
        Instance {
            id: id.to_owned(),
            requirements,
            state: InstanceState::Pending,
            worker_id: None,
            do_not_disrupt,
            created_at: now,
        }
    }

    /// PENDING, SCHEDULED or RUNNING: still needs (or holds) capacity.
    pub fn is_live(&self) -> bool {
        matches!(
            self.state,
            InstanceState::Pending | InstanceState::Scheduled | InstanceState::Running
        )
    }
}

/// Whether the instance state machine allows `from -> to` (ignoring the worker id
/// requirement of SCHEDULED). Self-loops are not edges.
pub fn is_legal_instance_transition(from: InstanceState, to: InstanceState) -> bool {
    use InstanceState::*;
    matches!(
        (from, to),
        (Pending, Scheduled)
            | (Scheduled, Running)
            | (Scheduled | Running, Pending)
            | (Scheduled | Running, Completed)
            | (Pending | Scheduled | Running, Failed)
            | (Pending, Completed)
    )
}

/// Moves `i` to `to`. PENDING -> SCHEDULED needs `worker_id` (refused with
/// [`WorkerError::IllegalInstanceTransition`] without one) and records it; back to
/// PENDING (rescheduling) clears it; every other edge keeps the current worker id (so a
/// COMPLETED or FAILED instance still names the worker to release) and ignores the
/// argument.
pub fn instance_transition(
    i: &Instance,
    to: InstanceState,
    worker_id: Option<String>,
) -> Result<Instance, WorkerError> {
    let illegal = WorkerError::IllegalInstanceTransition { from: i.state, to };
    if !is_legal_instance_transition(i.state, to) {
        return Err(illegal);
    }
    let mut next = i.clone();
    match to {
        InstanceState::Scheduled => match worker_id {
            Some(w) if !w.is_empty() => next.worker_id = Some(w),
            _ => return Err(illegal),
        },
        InstanceState::Pending => next.worker_id = None,
        _ => {}
    }
    next.state = to;
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const ALL_STATES: [WorkerState; 8] = [
        WorkerState::Pending,
        WorkerState::Provisioning,
        WorkerState::Running,
        WorkerState::Draining,
        WorkerState::Stopping,
        WorkerState::Stopped,
        WorkerState::Terminated,
        WorkerState::Failed,
    ];

    const ALL_INSTANCE_STATES: [InstanceState; 5] = [
        InstanceState::Pending,
        InstanceState::Scheduled,
        InstanceState::Running,
        InstanceState::Completed,
        InstanceState::Failed,
    ];

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::<Utc>::from_timestamp(1_700_000_000 + secs, 0).unwrap_or_default()
    }

    fn res(cpu: f64, memory_gb: f64) -> Resources {
        Resources { cpu, memory_gb }
    }

    fn tpl(cpu: f64, memory_gb: f64) -> WorkerTemplate {
        WorkerTemplate {
            name: "small".into(),
            instance_type: Some("m5.large".into()),
            image_id: Some("ami-1".into()),
            capacity: res(cpu, memory_gb),
            max_workers: 10,
            hourly_cost: 1.0,
            ..WorkerTemplate::default()
        }
    }

    /// A worker of capacity `cpu`/`mem` forced into `state` (test setup, not a transition).
    fn worker_in(state: WorkerState, cpu: f64, mem: f64) -> Worker {
        let mut w = Worker::new("w1", &tpl(cpu, mem), at(0));
        w.state = state;
        w
    }

    fn inst(id: &str, cpu: f64, mem: f64) -> Instance {
        Instance::new(id, res(cpu, mem), false, at(0))
    }

    fn on_worker(mut i: Instance, worker: &str, state: InstanceState) -> Instance {
        i.worker_id = Some(worker.into());
        i.state = state;
        i
    }

    #[test]
    fn resources_fit_add_and_floor() {
        let free = res(2.0, 4.0);
        assert!(res(2.0, 4.0).fits_in(&free));
        assert!(res(2.0 + 1e-12, 4.0).fits_in(&free), "epsilon slack");
        assert!(!res(2.1, 1.0).fits_in(&free));
        assert!(!res(1.0, 4.5).fits_in(&free));
        assert!(!res(f64::NAN, 1.0).fits_in(&free));
        assert_eq!(res(1.0, 2.0).add(&res(0.5, 1.5)), res(1.5, 3.5));
        assert_eq!(res(1.0, 2.0).sub_floor0(&res(0.5, 3.0)), res(0.5, 0.0));
    }

    #[test]
    fn is_legal_is_exactly_the_documented_edge_list() {
        use WorkerState::*;
        let edges = [
            (Pending, Provisioning),
            (Provisioning, Running),
            (Running, Draining),
            (Draining, Stopping),
            (Stopping, Stopped),
            (Stopped, Terminated),
            (Stopping, Terminated),
            (Pending, Failed),
            (Provisioning, Failed),
            (Running, Failed),
            (Draining, Failed),
            (Stopping, Failed),
            (Stopped, Failed),
            (Failed, Stopping),
            (Failed, Terminated),
        ];
        for from in ALL_STATES {
            for to in ALL_STATES {
                assert_eq!(
                    is_legal(from, to),
                    edges.contains(&(from, to)),
                    "{from} -> {to}"
                );
            }
        }
        assert!(ALL_STATES.iter().all(|s| !is_legal(Terminated, *s)));
    }

    #[test]
    fn transition_stamps_time_and_starts_idle_clock_on_running() {
        let w = Worker::new("w1", &tpl(4.0, 8.0), at(0));
        assert_eq!(w.state, WorkerState::Pending);
        assert_eq!(w.capacity, res(4.0, 8.0));
        assert_eq!(w.allocated, Resources::default());
        assert!(w.is_in_flight() && w.is_active() && !w.accepts_instances());
        let p = transition(&w, WorkerState::Provisioning, at(5)).expect("legal");
        assert_eq!(p.state_changed_at, at(5));
        assert_eq!(p.idle_since, None);
        let r = transition(&p, WorkerState::Running, at(9)).expect("legal");
        assert_eq!(r.idle_since, Some(at(9)));
        assert!(r.accepts_instances() && !r.is_in_flight());
        assert_eq!(
            transition(&r, WorkerState::Pending, at(10)),
            Err(WorkerError::IllegalTransition {
                from: WorkerState::Running,
                to: WorkerState::Pending
            })
        );
        let failed = transition(&r, WorkerState::Failed, at(11)).expect("legal");
        assert!(!failed.is_active());
        let gone = transition(&failed, WorkerState::Terminated, at(12)).expect("legal");
        assert!(!gone.is_active());
        assert!(transition(&gone, WorkerState::Failed, at(13)).is_err());
    }

    #[test]
    fn running_with_instances_does_not_start_idle_clock() {
        let mut w = worker_in(WorkerState::Provisioning, 4.0, 8.0);
        w.instances.push("i1".into());
        let r = transition(&w, WorkerState::Running, at(3)).expect("legal");
        assert_eq!(r.idle_since, None);
    }

    #[test]
    fn voluntary_drain_is_blocked_only_by_live_do_not_disrupt_instances_on_this_worker() {
        let w = worker_in(WorkerState::Running, 4.0, 8.0);
        let mut dnd = inst("i1", 1.0, 1.0);
        dnd.do_not_disrupt = true;
        let here = on_worker(dnd.clone(), "w1", InstanceState::Running);
        assert_eq!(
            start_drain(&w, std::slice::from_ref(&here), Some(at(100)), true, at(1)),
            Err(WorkerError::DoNotDisrupt)
        );
        let forced = start_drain(&w, &[here], Some(at(100)), false, at(1)).expect("involuntary");
        assert_eq!(forced.state, WorkerState::Draining);
        assert_eq!(forced.drain_deadline, Some(at(100)));
        assert_eq!(forced.state_changed_at, at(1));
        let elsewhere = on_worker(dnd.clone(), "w2", InstanceState::Running);
        let done = on_worker(dnd, "w1", InstanceState::Completed);
        let ok =
            start_drain(&w, &[elsewhere, done], Some(at(100)), true, at(1)).expect("not blocked");
        assert_eq!(ok.state, WorkerState::Draining);
        assert!(!ok.accepts_instances() && ok.is_active());
        let pending = worker_in(WorkerState::Pending, 4.0, 8.0);
        assert_eq!(
            start_drain(&pending, &[], Some(at(100)), false, at(1)),
            Err(WorkerError::IllegalTransition {
                from: WorkerState::Pending,
                to: WorkerState::Draining
            })
        );
    }

    #[test]
    fn place_needs_running_and_room_and_is_idempotent() {
        let mut w = worker_in(WorkerState::Running, 4.0, 8.0);
        w.idle_since = Some(at(0));
        let a = inst("a", 3.0, 2.0);
        let placed = place(&w, &a, at(1)).expect("fits");
        assert_eq!(placed.instances, vec!["a".to_string()]);
        assert_eq!(placed.allocated, res(3.0, 2.0));
        assert_eq!(placed.free(), res(1.0, 6.0));
        assert_eq!(placed.idle_since, None);
        assert_eq!(place(&placed, &a, at(2)), Ok(placed.clone()));
        assert_eq!(
            place(&placed, &inst("b", 2.0, 1.0), at(2)),
            Err(WorkerError::DoesNotFit)
        );
        let exact = place(&placed, &inst("c", 1.0, 6.0), at(2)).expect("exact fit");
        assert_eq!(exact.free(), Resources::default());
        for state in ALL_STATES
            .into_iter()
            .filter(|s| *s != WorkerState::Running)
        {
            let other = worker_in(state, 4.0, 8.0);
            assert_eq!(
                place(&other, &inst("d", 1.0, 1.0), at(3)),
                Err(WorkerError::NotAccepting(state))
            );
        }
    }

    #[test]
    fn unplace_releases_and_restarts_idle_clock_when_empty() {
        let w = worker_in(WorkerState::Running, 4.0, 8.0);
        let w = place(&w, &inst("a", 1.0, 2.0), at(1)).expect("fits");
        let w = place(&w, &inst("b", 0.1, 0.2), at(1)).expect("fits");
        let one = unplace(&w, "a", &res(1.0, 2.0), at(5));
        assert_eq!(one.instances, vec!["b".to_string()]);
        assert!((one.allocated.cpu - 0.1).abs() < 1e-9);
        assert_eq!(one.idle_since, None);
        let none = unplace(&one, "b", &res(0.1, 0.2), at(7));
        assert!(none.instances.is_empty());
        assert_eq!(none.allocated, Resources::default());
        assert_eq!(none.idle_since, Some(at(7)));
        assert_eq!(unplace(&none, "zzz", &res(9.0, 9.0), at(8)), none);
        let over = unplace(&w, "a", &res(50.0, 50.0), at(9));
        assert_eq!(over.allocated, Resources::default(), "floored at zero");
    }

    #[test]
    fn drain_completes_when_empty_or_past_deadline() {
        let running = worker_in(WorkerState::Running, 4.0, 8.0);
        let busy = place(&running, &inst("a", 1.0, 1.0), at(0)).expect("fits");
        let draining = start_drain(&busy, &[], Some(at(100)), true, at(1)).expect("drain");
        assert!(!drain_complete(&draining, at(99)));
        assert!(drain_complete(&draining, at(100)));
        let empty = unplace(&draining, "a", &res(1.0, 1.0), at(50));
        assert!(drain_complete(&empty, at(50)));
        assert!(!drain_complete(&running, at(1_000)), "not draining");
    }

    #[test]
    fn a_drain_without_deadline_waits_for_its_instances() {
        let running = worker_in(WorkerState::Running, 4.0, 8.0);
        let busy = place(&running, &inst("a", 1.0, 1.0), at(0)).expect("fits");
        let draining = start_drain(&busy, &[], None, true, at(1)).expect("drain");
        assert_eq!(draining.drain_deadline, None);
        assert!(!drain_complete(&draining, at(1)));
        assert!(!drain_complete(&draining, at(100 * 365 * 86_400)));
        let empty = unplace(&draining, "a", &res(1.0, 1.0), at(50));
        assert!(drain_complete(&empty, at(50)));
    }

    #[test]
    fn instance_new_and_liveness() {
        let i = Instance::new("i", res(1.0, 2.0), true, at(3));
        assert_eq!(i.state, InstanceState::Pending);
        assert_eq!(i.worker_id, None);
        assert!(i.do_not_disrupt && i.is_live());
        let done = instance_transition(&i, InstanceState::Completed, None).expect("cancel");
        assert!(!done.is_live());
    }

    #[test]
    fn instance_transition_table_is_exact() {
        use InstanceState::*;
        let edges = [
            (Pending, Scheduled),
            (Scheduled, Running),
            (Scheduled, Pending),
            (Running, Pending),
            (Scheduled, Completed),
            (Running, Completed),
            (Pending, Failed),
            (Scheduled, Failed),
            (Running, Failed),
            (Pending, Completed),
        ];
        for from in ALL_INSTANCE_STATES {
            for to in ALL_INSTANCE_STATES {
                let mut i = inst("i", 1.0, 1.0);
                i.state = from;
                let got = instance_transition(&i, to, Some("w1".into()));
                assert_eq!(got.is_ok(), edges.contains(&(from, to)), "{from} -> {to}");
                if got.is_err() {
                    assert_eq!(
                        got,
                        Err(WorkerError::IllegalInstanceTransition { from, to })
                    );
                }
            }
        }
    }

    #[test]
    fn scheduling_needs_a_worker_and_rescheduling_clears_it() {
        let i = inst("i", 1.0, 1.0);
        let refused = WorkerError::IllegalInstanceTransition {
            from: InstanceState::Pending,
            to: InstanceState::Scheduled,
        };
        assert_eq!(
            instance_transition(&i, InstanceState::Scheduled, None),
            Err(refused.clone())
        );
        assert_eq!(
            instance_transition(&i, InstanceState::Scheduled, Some(String::new())),
            Err(refused)
        );
        let s = instance_transition(&i, InstanceState::Scheduled, Some("w1".into())).expect("ok");
        assert_eq!(s.worker_id.as_deref(), Some("w1"));
        let r = instance_transition(&s, InstanceState::Running, Some("w9".into())).expect("ok");
        assert_eq!(r.worker_id.as_deref(), Some("w1"), "argument ignored");
        let back = instance_transition(&r, InstanceState::Pending, None).expect("ok");
        assert_eq!(back.worker_id, None);
        let f = instance_transition(&r, InstanceState::Failed, None).expect("ok");
        assert_eq!(f.worker_id.as_deref(), Some("w1"), "kept for release");
    }

    #[test]
    fn error_messages_are_lowercase_and_name_states() {
        let e = WorkerError::IllegalTransition {
            from: WorkerState::Running,
            to: WorkerState::Pending,
        };
        assert_eq!(
            e.to_string(),
            "illegal worker transition from RUNNING to PENDING"
        );
        let all = [
            e,
            WorkerError::NotAccepting(WorkerState::Draining),
            WorkerError::DoesNotFit,
            WorkerError::DoNotDisrupt,
            WorkerError::NotIdle,
            WorkerError::UnknownInstance("i".into()),
            WorkerError::IllegalInstanceTransition {
                from: InstanceState::Completed,
                to: InstanceState::Running,
            },
        ];
        for e in all {
            let msg = e.to_string();
            assert!(msg.starts_with(|c: char| c.is_ascii_lowercase()), "{msg}");
        }
    }

    #[test]
    fn worker_without_idle_since_deserializes() {
        let w = worker_in(WorkerState::Running, 1.0, 1.0);
        let mut json = serde_json::to_value(&w).expect("serialize");
        assert!(json.get("idle_since").is_some());
        if let Some(obj) = json.as_object_mut() {
            obj.remove("idle_since");
        }
        let back: Worker = serde_json::from_value(json).expect("old record");
        assert_eq!(back.idle_since, None);
        assert_eq!(back.state, WorkerState::Running);
    }

    #[test]
    fn idle_drain_is_refused_once_the_worker_is_busy_or_idle_too_briefly() {
        let mut w = worker_in(WorkerState::Running, 4.0, 8.0);
        w.idle_since = Some(at(10));
        let ok =
            start_idle_drain(&w, &[], Some(at(100)), at(10), at(20)).expect("idle long enough");
        assert_eq!(ok.state, WorkerState::Draining);
        assert_eq!(
            start_idle_drain(&w, &[], Some(at(100)), at(9), at(20)),
            Err(WorkerError::NotIdle)
        );
        let busy = place(&w, &inst("a", 1.0, 1.0), at(11)).expect("fits");
        assert_eq!(
            start_idle_drain(&busy, &[], Some(at(100)), at(50), at(20)),
            Err(WorkerError::NotIdle),
            "busy, even with a stale instance list"
        );
    }

    #[test]
    fn heartbeat_plan_starts_completes_and_releases_in_one_plan() {
        let w = worker_in(WorkerState::Running, 4.0, 8.0);
        let a = inst("a", 1.0, 1.0);
        let b = inst("b", 1.0, 2.0);
        let c = inst("c", 0.5, 0.5);
        let w = place(&w, &a, at(1)).expect("fits");
        let w = place(&w, &b, at(1)).expect("fits");
        let w = place(&w, &c, at(1)).expect("fits");
        let recs = [
            on_worker(a, "w1", InstanceState::Scheduled),
            on_worker(b, "w1", InstanceState::Running),
            on_worker(c, "w1", InstanceState::Scheduled),
        ];
        let running = vec!["a".to_string(), "zz".to_string()];
        let plan = plan_heartbeat(&w, &recs, &running, at(5), 10);
        assert_eq!(plan.started, vec!["a".to_string()]);
        assert_eq!(plan.completed, vec!["b".to_string()]);
        assert_eq!(plan.unknown, vec!["zz".to_string()]);
        assert!(!plan.more);
        assert_eq!(plan.worker.last_heartbeat_at, Some(at(5)));
        assert_eq!(
            plan.worker.instances,
            vec!["a".to_string(), "c".to_string()]
        );
        assert_eq!(plan.worker.allocated, res(1.5, 1.5));
        let states: Vec<_> = plan
            .changed
            .iter()
            .map(|i| (i.id.as_str(), i.state))
            .collect();
        assert_eq!(
            states,
            vec![
                ("a", InstanceState::Running),
                ("b", InstanceState::Completed)
            ]
        );
        let first = plan_heartbeat(&w, &recs, &running, at(5), 1);
        assert!(first.more);
        assert_eq!(first.changed.len(), 1);
    }

    fn any_state() -> impl Strategy<Value = WorkerState> {
        prop::sample::select(ALL_STATES.to_vec())
    }

    #[derive(Debug, Clone)]
    enum Op {
        To(WorkerState),
        Place(usize),
        Unplace(usize),
        Drain(bool),
    }

    fn any_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            any_state().prop_map(Op::To),
            (0usize..6).prop_map(Op::Place),
            (0usize..6).prop_map(Op::Place),
            (0usize..6).prop_map(Op::Unplace),
            any::<bool>().prop_map(Op::Drain),
        ]
    }

    proptest! {
        #[test]
        fn transition_sequences_follow_is_legal(
            start in any_state(),
            targets in prop::collection::vec(any_state(), 0..40),
        ) {
            let mut w = worker_in(start, 4.0, 8.0);
            for (n, to) in targets.into_iter().enumerate() {
                let now = at(n as i64 + 1);
                let from = w.state;
                match transition(&w, to, now) {
                    Ok(next) => {
                        prop_assert!(is_legal(from, to));
                        prop_assert_eq!(next.state, to);
                        prop_assert_eq!(next.state_changed_at, now);
                        prop_assert!(from != WorkerState::Terminated, "terminated is final");
                        w = next;
                    }
                    Err(e) => {
                        prop_assert!(!is_legal(from, to));
                        prop_assert_eq!(e, WorkerError::IllegalTransition { from, to });
                    }
                }
            }
        }

        #[test]
        fn place_only_on_running_and_never_overallocates(
            start in any_state(),
            cap in (0.5f64..16.0, 0.5f64..64.0),
            reqs in prop::collection::vec((0.0f64..6.0, 0.0f64..20.0), 6),
            ops in prop::collection::vec(any_op(), 0..60),
        ) {
            let mut w = worker_in(start, cap.0, cap.1);
            let insts: Vec<Instance> = reqs
                .iter()
                .enumerate()
                .map(|(n, (c, m))| inst(&format!("i{n}"), *c, *m))
                .collect();
            let mut model: BTreeMap<String, Resources> = BTreeMap::new();
            for (n, op) in ops.into_iter().enumerate() {
                let now = at(n as i64 + 1);
                let before = w.clone();
                match op {
                    Op::To(to) => {
                        if let Ok(next) = transition(&w, to, now) {
                            w = next;
                        }
                    }
                    Op::Drain(voluntary) => {
                        if let Ok(next) = start_drain(&w, &[], Some(at(1_000)), voluntary, now) {
                            prop_assert_eq!(before.state, WorkerState::Running);
                            w = next;
                        }
                    }
                    Op::Place(k) => match place(&w, &insts[k], now) {
                        Ok(next) => {
                            prop_assert_eq!(before.state, WorkerState::Running);
                            prop_assert!(insts[k].requirements.fits_in(&before.free())
                                || before.instances.contains(&insts[k].id));
                            model.insert(insts[k].id.clone(), insts[k].requirements);
                            w = next;
                        }
                        Err(WorkerError::NotAccepting(s)) => {
                            prop_assert_eq!(s, before.state);
                            prop_assert!(s != WorkerState::Running);
                        }
                        Err(e) => {
                            prop_assert_eq!(e, WorkerError::DoesNotFit);
                            prop_assert!(!insts[k].requirements.fits_in(&before.free()));
                        }
                    },
                    Op::Unplace(k) => {
                        w = unplace(&w, &insts[k].id, &insts[k].requirements, now);
                        model.remove(&insts[k].id);
                    }
                }
                // DRAINING or later never gains an instance
                if w.state != WorkerState::Running {
                    prop_assert!(w.instances.len() <= before.instances.len());
                }
                prop_assert!(w.allocated.cpu <= w.capacity.cpu);
                prop_assert!(w.allocated.memory_gb <= w.capacity.memory_gb);
                prop_assert!(w.allocated.cpu >= 0.0 && w.allocated.memory_gb >= 0.0);
                let mut ids = w.instances.clone();
                ids.sort();
                let expected: Vec<String> = model.keys().cloned().collect();
                prop_assert_eq!(&ids, &expected);
                let sum = model.values().fold(Resources::default(), |a, r| a.add(r));
                prop_assert!((w.allocated.cpu - sum.cpu).abs() < 1e-6);
                prop_assert!((w.allocated.memory_gb - sum.memory_gb).abs() < 1e-6);
                if !w.instances.is_empty() {
                    prop_assert_eq!(w.idle_since, None);
                }
            }
        }

        /// The actor's protocol, modelled purely: a drain is decided on the worker and
        /// the records of the instances it lists at one revision and committed only if
        /// the worker's revision (bumped by every placement) is unchanged; on a lost
        /// compare it is decided again on fresh records. Placements interleave anywhere.
        #[test]
        fn no_interleaving_of_placements_and_drains_drains_a_do_not_disrupt_worker(
            steps in prop::collection::vec((0u8..4, any::<bool>()), 1..60),
        ) {
            let mut w = worker_in(WorkerState::Running, 8.0, 8.0);
            let mut rev = 1u64;
            let mut recs: Vec<Instance> = Vec::new();
            // a drain decided but not yet committed: (decision, revision it read)
            let mut pending: Option<(Result<Worker, WorkerError>, u64)> = None;
            for (n, (op, flag)) in steps.into_iter().enumerate() {
                let now = at(n as i64 + 1);
                match op {
                    0 => {
                        let mut i = inst(&format!("i{n}"), 1.0, 1.0);
                        i.do_not_disrupt = flag;
                        if let Ok(next) = place(&w, &i, now) {
                            recs.push(on_worker(i, "w1", InstanceState::Scheduled));
                            w = next;
                            rev += 1;
                        }
                    }
                    1 => {
                        let listed: Vec<Instance> = recs
                            .iter()
                            .filter(|i| w.instances.contains(&i.id))
                            .cloned()
                            .collect();
                        let d = if flag {
                            start_idle_drain(&w, &listed, Some(at(1_000)), now, now)
                        } else {
                            start_drain(&w, &listed, Some(at(1_000)), true, now)
                        };
                        pending = Some((d, rev));
                    }
                    2 => {
                        if let Some((decision, seen)) = pending.take() {
                            let decision = if seen == rev {
                                decision
                            } else {
                                let listed: Vec<Instance> = recs
                                    .iter()
                                    .filter(|i| w.instances.contains(&i.id))
                                    .cloned()
                                    .collect();
                                start_drain(&w, &listed, Some(at(1_000)), true, now)
                            };
                            if let Ok(next) = decision {
                                w = next;
                                rev += 1;
                            }
                        }
                    }
                    _ => {
                        if let Some(pos) = recs.iter().position(|i| w.instances.contains(&i.id)) {
                            let mut done = recs[pos].clone();
                            w = unplace(&w, &done.id, &done.requirements, now);
                            done.state = InstanceState::Completed;
                            recs[pos] = done;
                            rev += 1;
                        }
                    }
                }
                if w.state == WorkerState::Draining {
                    prop_assert!(!holds_do_not_disrupt(&w, &recs), "{:?} {:?}", w, recs);
                }
            }
        }

        #[test]
        fn heartbeat_plans_in_chunks_reach_the_same_state(
            states in prop::collection::vec((any::<bool>(), any::<bool>()), 0..12),
            limit in 1usize..5,
        ) {
            let mut w = worker_in(WorkerState::Running, 100.0, 100.0);
            let mut recs = Vec::new();
            let mut running = Vec::new();
            for (n, (was_running, reported)) in states.iter().enumerate() {
                let i = inst(&format!("i{n}"), 1.0, 1.0);
                w = place(&w, &i, at(0)).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let s = if *was_running { InstanceState::Running } else { InstanceState::Scheduled };
                recs.push(on_worker(i, "w1", s));
                if *reported {
                    running.push(format!("i{n}"));
                }
            }
            let whole = plan_heartbeat(&w, &recs, &running, at(9), usize::MAX);
            let (mut cw, mut crecs) = (w.clone(), recs.clone());
            let mut started = Vec::new();
            for _ in 0..=states.len() {
                let p = plan_heartbeat(&cw, &crecs, &running, at(9), limit);
                prop_assert!(p.changed.len() <= limit);
                for c in &p.changed {
                    if let Some(slot) = crecs.iter_mut().find(|r| r.id == c.id) {
                        *slot = c.clone();
                    }
                }
                started.extend(p.started.clone());
                cw = p.worker;
                if !p.more {
                    break;
                }
            }
            prop_assert_eq!(&cw, &whole.worker);
            prop_assert_eq!(started, whole.started);
        }

        #[test]
        fn instance_sequences_keep_worker_id_consistent(
            steps in prop::collection::vec(
                (prop::sample::select(ALL_INSTANCE_STATES.to_vec()), any::<bool>()),
                0..40,
            ),
        ) {
            let mut i = inst("i", 1.0, 1.0);
            for (to, with_worker) in steps {
                let from = i.state;
                let arg = with_worker.then(|| "w1".to_string());
                match instance_transition(&i, to, arg) {
                    Ok(next) => {
                        prop_assert!(is_legal_instance_transition(from, to));
                        prop_assert!(from != InstanceState::Completed && from != InstanceState::Failed);
                        i = next;
                    }
                    Err(e) => {
                        prop_assert_eq!(e, WorkerError::IllegalInstanceTransition { from, to });
                        prop_assert!(!is_legal_instance_transition(from, to)
                            || (to == InstanceState::Scheduled && !with_worker));
                    }
                }
                match i.state {
                    InstanceState::Pending => prop_assert_eq!(i.worker_id.as_deref(), None),
                    InstanceState::Scheduled | InstanceState::Running => {
                        prop_assert_eq!(i.worker_id.as_deref(), Some("w1"));
                    }
                    _ => {}
                }
            }
        }
    }
}
