//! The `CloudProvider` port (the Cloud Provider SPI): launch, stop, terminate, inspect and list
//! the cloud instances that back workers.
//!
//! Every instance an adapter launches is tagged `managed-by=resource-plane`,
//! `resource-plane/cluster=<cluster id>`, `resource-plane/worker-id=<worker id>` and
//! `Name=resource-plane-<worker id>`, plus the template's labels, so a restarted
//! controller can find its instances again and spot orphans.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::domain::worker::WorkerTemplate;

/// Tag key and value marking every instance this service launched.
pub const TAG_MANAGED_BY: (&str, &str) = ("managed-by", "resource-plane");
/// Tag key holding the cluster id of the controller that launched the instance.
pub const TAG_CLUSTER: &str = "resource-plane/cluster";
/// Tag key holding the worker id the instance backs.
pub const TAG_WORKER_ID: &str = "resource-plane/worker-id";
/// Tag key of the instance's display name.
pub const TAG_NAME: &str = "Name";

/// The display name given to the instance of `worker_id`.
pub fn instance_name(worker_id: &str) -> String {
    format!("resource-plane-{worker_id}")
}

/// Life cycle of a cloud instance as the cloud reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CloudInstanceStatus {
    /// Launched, still booting.
    Pending,
    /// Up.
    Running,
    /// Stop requested.
    Stopping,
    /// Stopped (not terminated).
    Stopped,
    /// Terminate requested.
    ShuttingDown,
    /// Gone (clouds keep reporting it for a while).
    Terminated,
    /// The cloud does not know the instance (never existed, or long gone).
    NotFound,
}

/// One instance this adapter manages, as seen by [`CloudProvider::list_instances`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudInstance {
    /// Cloud instance id (`i-...` on EC2).
    pub instance_id: String,
    /// Value of the `resource-plane/worker-id` tag, when present.
    pub worker_id: Option<String>,
    /// Current status.
    pub status: CloudInstanceStatus,
    /// When the cloud launched it (`None` if the cloud does not say; such an instance is
    /// never treated as an orphan, since its age cannot be told).
    pub launched_at: Option<DateTime<Utc>>,
}

/// Cloud failures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloudError {
    /// The cloud cannot be reached, timed out, throttled us or failed on its side; the
    /// caller may retry later.
    #[error("cloud unavailable: {0}")]
    Unavailable(String),
    /// The cloud refused the request (bad parameters, permissions, quota); retrying the
    /// same request will not help. Carries the cloud's error code and message.
    #[error("cloud rejected the request: {0}")]
    Rejected(String),
}

/// Launches and tracks the cloud hosts behind workers (EC2, or the simulated cloud).
#[async_trait]
pub trait CloudProvider: Send + Sync + 'static {
    /// Launches one instance for `worker_id` (used as ClientToken and tag). Before
    /// launching, looks for a non-terminated instance already tagged with this worker id
    /// and returns it instead (moto does not deduplicate on ClientToken).
    async fn create_instance(
        &self,
        template: &WorkerTemplate,
        worker_id: &str,
    ) -> Result<String, CloudError>;
    /// Terminates an instance; an unknown or already terminated instance is `Ok`.
    async fn terminate_instance(&self, instance_id: &str) -> Result<(), CloudError>;
    /// Stops an instance (shuts it down, keeps it and its volumes): the step before
    /// terminate in the worker's stop sequence. An unknown instance, or one already
    /// stopping, stopped, shutting down or terminated, is `Ok` (nothing to do), so a
    /// controller that resumes the sequence may ask again.
    async fn stop_instance(&self, instance_id: &str) -> Result<(), CloudError>;
    /// Status of one instance; an unknown id is `Ok(NotFound)`.
    async fn get_instance_status(
        &self,
        instance_id: &str,
    ) -> Result<CloudInstanceStatus, CloudError>;
    /// Instances tagged managed-by=resource-plane and with this adapter's cluster id
    /// (any state except terminated).
    async fn list_instances(&self) -> Result<Vec<CloudInstance>, CloudError>;
    /// Private IP address of an instance (how the CML agent reaches its host; the
    /// `{private_ip}` of `CML_URL_TEMPLATE`). `None` while the cloud has assigned none or
    /// does not know the instance. The default answers `None`.
    async fn instance_private_ip(&self, instance_id: &str) -> Result<Option<String>, CloudError> {
        let _ = instance_id;
        Ok(None)
    }
    /// Adapter name for logs and metrics.
    fn name(&self) -> &'static str;
}
