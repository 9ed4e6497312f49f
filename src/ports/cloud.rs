//! The `CloudProvider` port (the Cloud Provider SPI): launch, stop, terminate, inspect and list
//! the cloud instances that back workers.
//!
//! Every instance an adapter launches is tagged `managed-by=resource-plane`,
//! `resource-plane/cluster=<cluster id>`, `resource-plane/worker-id=<worker id>` and
//! `Name=resource-plane-<worker id>`, plus the template's labels, so a restarted
//! controller can find its instances again and spot orphans.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::domain::launch::{
    classify_launch_error, first_attempt, next_attempt, LaunchAttempt, LaunchFallback,
};
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
    /// and returns it instead (moto does not deduplicate on ClientToken). When the cloud
    /// has no capacity, tries the template's other instance types and markets in order
    /// (see [`launch_with_fallbacks`]) and reports each fallback in the outcome.
    async fn create_instance(
        &self,
        template: &WorkerTemplate,
        worker_id: &str,
    ) -> Result<LaunchOutcome, CloudError>;
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

/// What [`CloudProvider::create_instance`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchOutcome {
    /// The cloud instance id.
    pub instance_id: String,
    /// The try that launched it; `None` when an instance already launched for this
    /// worker was found and returned.
    pub launched: Option<LaunchAttempt>,
    /// The tries that failed for lack of capacity before it, each with the one made next,
    /// in order.
    pub fallbacks: Vec<LaunchFallback>,
}

impl LaunchOutcome {
    /// An instance found already launched for the worker (nothing was tried).
    pub fn existing(instance_id: impl Into<String>) -> LaunchOutcome {
        LaunchOutcome {
            instance_id: instance_id.into(),
            launched: None,
            fallbacks: Vec::new(),
        }
    }
}

/// One failed launch try: the cloud's error code (`None` when the cloud gave none, e.g.
/// a transport failure) and the port's error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptError {
    /// The cloud's error code, e.g. `InsufficientInstanceCapacity`.
    pub code: Option<String>,
    /// The error reported if no further try is made.
    pub error: CloudError,
}

/// Runs `launch` for each try of `template`'s capacity fallback plan
/// ([`crate::domain::launch::next_attempt`]) until one succeeds or the plan gives up. The
/// plan tries each (type, market) pair at most once, so this ends. A final failure after
/// fallbacks names every try in its message.
pub async fn launch_with_fallbacks<F, Fut>(
    template: &WorkerTemplate,
    mut launch: F,
) -> Result<LaunchOutcome, CloudError>
where
    F: FnMut(LaunchAttempt) -> Fut,
    Fut: std::future::Future<Output = Result<String, AttemptError>>,
{
    let mut attempt = first_attempt(template);
    let mut fallbacks: Vec<LaunchFallback> = Vec::new();
    loop {
        match launch(attempt.clone()).await {
            Ok(instance_id) => {
                return Ok(LaunchOutcome {
                    instance_id,
                    launched: Some(attempt),
                    fallbacks,
                })
            }
            Err(AttemptError { code, error }) => {
                let failure = classify_launch_error(code.as_deref());
                let Some(next) = next_attempt(template, &attempt, failure) else {
                    if fallbacks.is_empty() {
                        return Err(error);
                    }
                    let tried: Vec<String> = fallbacks
                        .iter()
                        .map(|f| f.failed.to_string())
                        .chain([attempt.to_string()])
                        .collect();
                    let tried = tried.join(", ");
                    return Err(match error {
                        CloudError::Unavailable(m) => {
                            CloudError::Unavailable(format!("{m} (tried {tried})"))
                        }
                        CloudError::Rejected(m) => {
                            CloudError::Rejected(format!("{m} (tried {tried})"))
                        }
                    });
                };
                fallbacks.push(LaunchFallback {
                    failed: attempt,
                    code: code.unwrap_or_default(),
                    next: next.clone(),
                });
                attempt = next;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::domain::launch::Market;

    fn template(types: &[&str], market: Market) -> WorkerTemplate {
        WorkerTemplate {
            name: "t".into(),
            instance_types: Some(types.iter().map(|t| (*t).to_owned()).collect()),
            image_id: Some("ami-1".into()),
            market,
            ..WorkerTemplate::default()
        }
    }

    /// Runs the loop against scripted answers (`Err(code)` per try, in order) and returns
    /// its result and the tries it made.
    async fn run(
        t: &WorkerTemplate,
        answers: &[Result<&str, Option<&str>>],
    ) -> (Result<LaunchOutcome, CloudError>, Vec<LaunchAttempt>) {
        let tries = Mutex::new(Vec::new());
        let result = launch_with_fallbacks(t, |attempt| {
            let n = {
                let mut tries = tries.lock().unwrap_or_else(|e| e.into_inner());
                tries.push(attempt);
                tries.len() - 1
            };
            let answer = match answers.get(n) {
                Some(Ok(id)) => Ok((*id).to_owned()),
                Some(Err(code)) => Err(AttemptError {
                    code: code.map(str::to_owned),
                    error: CloudError::Unavailable(format!("try {n}")),
                }),
                None => panic!("try {n} was not expected"),
            };
            std::future::ready(answer)
        })
        .await;
        (result, tries.into_inner().unwrap_or_default())
    }

    fn at(t: &str, market: Market) -> LaunchAttempt {
        LaunchAttempt {
            instance_type: Some(t.into()),
            market,
        }
    }

    #[tokio::test]
    async fn the_loop_follows_the_plan_and_reports_each_fallback() {
        let t = template(&["a", "b"], Market::Spot);
        let (result, tries) = run(
            &t,
            &[
                Err(Some("InsufficientInstanceCapacity")),
                Err(Some("SpotMaxPriceTooLow")),
                Ok("i-1"),
            ],
        )
        .await;
        let out = result.unwrap();
        assert_eq!(
            tries,
            vec![
                at("a", Market::Spot),
                at("b", Market::Spot),
                at("a", Market::OnDemand)
            ]
        );
        assert_eq!(out.instance_id, "i-1");
        assert_eq!(out.launched, Some(at("a", Market::OnDemand)));
        let codes: Vec<&str> = out.fallbacks.iter().map(|f| f.code.as_str()).collect();
        assert_eq!(
            codes,
            ["InsufficientInstanceCapacity", "SpotMaxPriceTooLow"]
        );
        assert_eq!(out.fallbacks[1].next, at("a", Market::OnDemand));
    }

    #[tokio::test]
    async fn other_errors_stop_at_once_with_the_error_unchanged() {
        let t = template(&["a", "b"], Market::OnDemand);
        let (result, tries) = run(&t, &[Err(Some("InvalidAMIID.NotFound"))]).await;
        assert_eq!(result, Err(CloudError::Unavailable("try 0".into())));
        assert_eq!(tries.len(), 1);
        // No code at all (a transport failure) is not a capacity problem either.
        let (result, tries) = run(&t, &[Err(None)]).await;
        assert_eq!(result, Err(CloudError::Unavailable("try 0".into())));
        assert_eq!(tries.len(), 1);
    }

    #[tokio::test]
    async fn running_out_of_types_names_every_try() {
        let t = template(&["a", "b"], Market::OnDemand);
        let no = Err(Some("InsufficientInstanceCapacity"));
        let (result, tries) = run(&t, &[no, no]).await;
        assert_eq!(tries.len(), 2);
        assert_eq!(
            result,
            Err(CloudError::Unavailable(
                "try 1 (tried a (on_demand), b (on_demand))".into()
            ))
        );
    }
}
