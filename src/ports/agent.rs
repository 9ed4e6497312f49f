//! The `WorkerAgent` port: what a worker host really runs. The CML adapter pulls it from
//! the host's CML REST API; the simulated agent answers for the embedded mode.

use async_trait::async_trait;

pub use crate::domain::cml::{Lab, LabState};
use crate::domain::worker::Instance;

/// What an agent needs to find one worker's host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentTarget {
    /// Worker id (`{worker_id}` in `CML_URL_TEMPLATE`).
    pub worker_id: String,
    /// Cloud instance id once launched (`{instance_id}`).
    pub instance_id: Option<String>,
    /// Private IP once the cloud reports it (`{private_ip}`).
    pub private_ip: Option<String>,
}

/// Agent failures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    /// The host cannot be reached, timed out or failed on its side (5xx): count it as a
    /// missed heartbeat and try again later.
    #[error("worker agent unreachable: {0}")]
    Unreachable(String),
    /// The host refused our credentials (even after one fresh authentication).
    #[error("worker agent refused authentication: {0}")]
    Unauthorized(String),
    /// The host answered something this client cannot read, or refused the request.
    #[error("worker agent answered unexpectedly: {0}")]
    Protocol(String),
    /// The worker cannot be addressed (no private IP yet, template refused the values).
    #[error("worker agent cannot address the worker: {0}")]
    Address(String),
}

/// Reads and steers the labs on worker hosts.
#[async_trait]
pub trait WorkerAgent: Send + Sync + 'static {
    /// Whether the host's CML says it is ready (`system_information.ready`).
    async fn system_ready(&self, worker: &AgentTarget) -> Result<bool, AgentError>;
    /// Every lab on the host with its title, tags and state.
    async fn labs(&self, worker: &AgentTarget) -> Result<Vec<Lab>, AgentError>;
    /// Stops one lab; an unknown lab is `Ok` (already gone).
    async fn stop_lab(&self, worker: &AgentTarget, lab_id: &str) -> Result<(), AgentError>;
    /// Told, before each read, what the controller has placed on the worker. Real hosts
    /// learn it from their labs and ignore this; the simulated agent mirrors it.
    fn observe_placement(&self, _worker_id: &str, _instances: &[Instance]) {}
    /// Adapter name for logs and metrics.
    fn name(&self) -> &'static str;
}
