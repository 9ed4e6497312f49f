//! Resource Controller entities: worker templates, workers (cloud hosts) and the lab
//! instances placed on them. Pure data and pure transition functions only.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerTemplate {
    /// Unique name.
    pub name: String,
    /// Cloud instance type, e.g. `m5zn.metal`.
    pub instance_type: String,
    /// Machine image.
    pub image_id: String,
    /// Subnet to launch in.
    #[serde(default)]
    pub subnet_id: Option<String>,
    /// Security groups.
    #[serde(default)]
    pub security_group_ids: Option<Vec<String>>,
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
    pub created_at: DateTime<Utc>,
    /// Time of the last state change.
    pub state_changed_at: DateTime<Utc>,
    /// Last heartbeat from the host.
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    /// When a drain gives up waiting.
    pub drain_deadline: Option<DateTime<Utc>>,
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
    pub created_at: DateTime<Utc>,
}
