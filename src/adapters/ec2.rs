//! EC2 `CloudProvider` adapter on `aws-sdk-ec2`.
//!
//! The SDK client is built in one place ([`Ec2Cloud::new`] and
//! [`Ec2Cloud::with_static_credentials`] both go through it) from aws-config's standard
//! chain (environment, profile, web identity, ECS, IMDS), with an endpoint override for
//! local emulators such as moto (`endpoint_url`, or `AWS_ENDPOINT_URL` in the
//! environment). TLS is rustls on ring, which needs no C toolchain beyond `cc`.
//!
//! Launches are tagged so a restarted controller finds its instances again (see
//! [`crate::ports::cloud`]; volumes get the same tags) and use the worker id as
//! `ClientToken` (`<worker id>.<n>` for the n-th capacity fallback try, since a token
//! may not be reused with other parameters). Because moto ignores
//! `ClientToken`, a launch first looks for a live instance already tagged with the worker
//! id and returns it. SDK errors map to [`CloudError::Unavailable`] (transport, timeout,
//! throttling, 5xx) or [`CloudError::Rejected`] (other 4xx, with the AWS code).

use std::time::Duration;

use async_trait::async_trait;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::config::{Credentials, Region, SharedHttpClient};
use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::operation::describe_instances::builders::DescribeInstancesFluentBuilder;
use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, Filter, IamInstanceProfileSpecification, Instance,
    InstanceMarketOptionsRequest, InstanceStateName, InstanceType, LaunchTemplateSpecification,
    MarketType, ResourceType, Tag, TagSpecification, VolumeType,
};
use aws_sdk_ec2::Client;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use tracing::{info, warn};

use base64::Engine as _;

use crate::domain::launch::{LaunchAttempt, LaunchTemplateRef, Market, RootVolume};
use crate::domain::worker::WorkerTemplate;
use crate::ports::cloud::{
    instance_name, launch_with_fallbacks, AttemptError, CloudError, CloudInstance,
    CloudInstanceStatus, CloudProvider, LaunchOutcome, TAG_CLUSTER, TAG_MANAGED_BY, TAG_NAME,
    TAG_WORKER_ID,
};

/// TCP connect deadline.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Deadline of one HTTP attempt.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of one call, the SDK's own retries included.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(30);

/// The AWS error code of an unknown instance id.
const INSTANCE_NOT_FOUND: &str = "InvalidInstanceID.NotFound";
/// The AWS error code of a request the instance's current state does not allow.
const INCORRECT_STATE: &str = "IncorrectInstanceState";

/// Error codes that mean "slow down" or "no capacity right now": retry later.
const RETRYABLE_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "RequestThrottled",
    "InsufficientInstanceCapacity",
    "UnfulfillableCapacity",
    "InsufficientHostCapacity",
    "InsufficientReservedInstanceCapacity",
    "InternalError",
    "ServiceUnavailable",
    "Unavailable",
];

/// Instance states other than terminated, for DescribeInstances filters.
const LIVE_STATES: &[&str] = &["pending", "running", "shutting-down", "stopping", "stopped"];

/// Where and as whom to reach EC2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ec2Settings {
    /// AWS region, e.g. `eu-west-1` (empty: aws-config's region chain decides).
    pub region: String,
    /// Endpoint override (moto, LocalStack); `None` uses `AWS_ENDPOINT_URL` when set,
    /// else the real regional endpoint.
    pub endpoint_url: Option<String>,
    /// Id of this control plane's cluster, written to and filtered on the
    /// `resource-plane/cluster` tag so several clusters can share an account.
    pub cluster_id: String,
}

/// The EC2 cloud.
pub struct Ec2Cloud {
    client: Client,
    cluster_id: String,
}

impl std::fmt::Debug for Ec2Cloud {
    // The SDK client's Debug would print its credentials provider; keep it out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ec2Cloud")
            .field("cluster_id", &self.cluster_id)
            .finish_non_exhaustive()
    }
}

impl Ec2Cloud {
    /// Builds the adapter with credentials from aws-config's standard chain. Nothing is
    /// sent until the first call (credentials are resolved lazily).
    pub async fn new(settings: Ec2Settings) -> Ec2Cloud {
        Self::build(settings, None).await
    }

    /// Builds the adapter with fixed credentials instead of the standard chain (tests
    /// against moto use dummy keys this way rather than mutating the process
    /// environment).
    pub async fn with_static_credentials(
        settings: Ec2Settings,
        access_key_id: &str,
        secret_access_key: &str,
    ) -> Ec2Cloud {
        let credentials = Credentials::new(
            access_key_id,
            secret_access_key,
            None,
            None,
            "resource-plane-static",
        );
        Self::build(settings, Some(credentials)).await
    }

    /// The one place the SDK client is configured.
    async fn build(settings: Ec2Settings, credentials: Option<Credentials>) -> Ec2Cloud {
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .operation_attempt_timeout(ATTEMPT_TIMEOUT)
            .operation_timeout(OPERATION_TIMEOUT)
            .build();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(https_client())
            .timeout_config(timeouts);
        if !settings.region.is_empty() {
            loader = loader.region(Region::new(settings.region.clone()));
        }
        if let Some(url) = &settings.endpoint_url {
            loader = loader.endpoint_url(url.clone());
        }
        if let Some(credentials) = credentials {
            loader = loader.credentials_provider(credentials);
        }
        let config = loader.load().await;
        info!(
            region = ?config.region().map(|r| r.as_ref()),
            endpoint = ?config.endpoint_url(),
            cluster_id = %settings.cluster_id,
            "ec2 client configured"
        );
        Ec2Cloud {
            client: Client::new(&config),
            cluster_id: settings.cluster_id,
        }
    }

    /// The underlying SDK client (diagnostics, and tests that inspect what was launched).
    pub fn sdk_client(&self) -> &Client {
        &self.client
    }

    /// The cluster id this adapter tags and filters on.
    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// The tags put on the instance of `worker_id`: ours, then the template's labels
    /// (a label may not override one of ours).
    fn tags(&self, template: &WorkerTemplate, worker_id: &str) -> Vec<Tag> {
        let ours = [
            (TAG_MANAGED_BY.0, TAG_MANAGED_BY.1.to_owned()),
            (TAG_CLUSTER, self.cluster_id.clone()),
            (TAG_WORKER_ID, worker_id.to_owned()),
            (TAG_NAME, instance_name(worker_id)),
        ];
        let mut tags: Vec<Tag> = ours
            .iter()
            .map(|(k, v)| Tag::builder().key(*k).value(v).build())
            .collect();
        for (key, value) in &template.labels {
            if ours.iter().any(|(k, _)| k == key) {
                warn!(label = %key, template = %template.name, "label shadows a reserved tag; ignored");
                continue;
            }
            tags.push(Tag::builder().key(key).value(value).build());
        }
        tags
    }

    /// One RunInstances try of `template` for `worker_id` as `attempt` says (type and
    /// market), tagging the instance and its volumes.
    async fn run_one(
        &self,
        template: &WorkerTemplate,
        worker_id: &str,
        attempt: LaunchAttempt,
        client_token: String,
    ) -> Result<String, AttemptError> {
        let tags = self.tags(template, worker_id);
        let tagged = |kind: ResourceType| {
            TagSpecification::builder()
                .resource_type(kind)
                .set_tags(Some(tags.clone()))
                .build()
        };
        let mut request = self
            .client
            .run_instances()
            .set_image_id(template.image_id.clone())
            .set_instance_type(attempt.instance_type.as_deref().map(InstanceType::from))
            .min_count(1)
            .max_count(1)
            .client_token(client_token)
            .set_subnet_id(template.subnet_id.clone())
            .set_security_group_ids(template.security_group_ids.clone())
            .set_key_name(template.key_name.clone())
            .set_launch_template(template.launch_template.as_ref().map(launch_template_spec))
            .set_iam_instance_profile(template.iam_instance_profile.as_ref().map(|p| {
                IamInstanceProfileSpecification::builder()
                    .set_arn(p.arn.clone())
                    .set_name(p.name.clone())
                    .build()
            }))
            .set_user_data(
                template
                    .user_data
                    .as_ref()
                    .map(|d| base64::engine::general_purpose::STANDARD.encode(d)),
            )
            .tag_specifications(tagged(ResourceType::Instance))
            .tag_specifications(tagged(ResourceType::Volume));
        if let Some(v) = &template.root_volume {
            request = request.block_device_mappings(root_device(v)?);
        }
        if attempt.market == Market::Spot {
            request = request.instance_market_options(
                InstanceMarketOptionsRequest::builder()
                    .market_type(MarketType::Spot)
                    .build(),
            );
        }
        let output = request.send().await.map_err(|e| AttemptError {
            code: match &e {
                SdkError::ServiceError(_) => e.code().map(str::to_owned),
                _ => None,
            },
            error: map_err("RunInstances", e),
        })?;
        let id = output
            .instances()
            .iter()
            .find_map(|i| i.instance_id())
            .ok_or_else(|| AttemptError {
                code: None,
                error: CloudError::Unavailable("RunInstances: answer holds no instance".into()),
            })?;
        info!(instance_id = %id, attempt = %attempt, "instance launched");
        Ok(id.to_owned())
    }

    /// DescribeInstances of this cluster's managed instances that are not terminated.
    fn describe_ours(&self) -> DescribeInstancesFluentBuilder {
        self.client
            .describe_instances()
            .filters(tag_filter(TAG_MANAGED_BY.0, TAG_MANAGED_BY.1))
            .filters(tag_filter(TAG_CLUSTER, &self.cluster_id))
            .filters(
                Filter::builder()
                    .name("instance-state-name")
                    .set_values(Some(LIVE_STATES.iter().map(|s| (*s).to_owned()).collect()))
                    .build(),
            )
    }

    /// Every instance a (possibly filtered) DescribeInstances returns, over all pages.
    async fn describe_all(
        &self,
        request: DescribeInstancesFluentBuilder,
    ) -> Result<Vec<Instance>, CloudError> {
        let mut pages = request.into_paginator().send();
        let mut instances = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| map_err("DescribeInstances", e))?;
            for reservation in page.reservations() {
                instances.extend(reservation.instances().iter().cloned());
            }
        }
        Ok(instances)
    }
}

/// The HTTPS client: rustls with ring (no aws-lc, so no cmake), also speaking plain HTTP
/// to emulators on loopback.
fn https_client() -> SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
        .build_https()
}

fn launch_template_spec(lt: &LaunchTemplateRef) -> LaunchTemplateSpecification {
    LaunchTemplateSpecification::builder()
        .set_launch_template_id(lt.id.clone())
        .set_launch_template_name(lt.name.clone())
        .version(lt.version_or_default())
        .build()
}

/// The root volume's block device mapping; deleted with the instance, since a worker's
/// disk holds nothing that outlives it.
fn root_device(v: &RootVolume) -> Result<BlockDeviceMapping, AttemptError> {
    // Validation at start-up keeps the size positive; one beyond EBS's range is the
    // cloud's to refuse, so only what cannot be sent at all is refused here.
    let size = i32::try_from(v.size_gib).map_err(|_| AttemptError {
        code: None,
        error: CloudError::Rejected(format!(
            "root volume size {} GiB is out of range",
            v.size_gib
        )),
    })?;
    Ok(BlockDeviceMapping::builder()
        .device_name(&v.device_name)
        .ebs(
            EbsBlockDevice::builder()
                .volume_size(size)
                .volume_type(VolumeType::from(v.volume_type.as_str()))
                .delete_on_termination(true)
                .build(),
        )
        .build())
}

fn tag_filter(key: &str, value: &str) -> Filter {
    Filter::builder()
        .name(format!("tag:{key}"))
        .values(value)
        .build()
}

fn tag_value<'a>(instance: &'a Instance, key: &str) -> Option<&'a str> {
    instance
        .tags()
        .iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
}

fn status_of(instance: &Instance) -> CloudInstanceStatus {
    let Some(state) = instance.state() else {
        return CloudInstanceStatus::Pending;
    };
    match state.name() {
        Some(InstanceStateName::Pending) => CloudInstanceStatus::Pending,
        Some(InstanceStateName::Running) => CloudInstanceStatus::Running,
        Some(InstanceStateName::Stopping) => CloudInstanceStatus::Stopping,
        Some(InstanceStateName::Stopped) => CloudInstanceStatus::Stopped,
        Some(InstanceStateName::ShuttingDown) => CloudInstanceStatus::ShuttingDown,
        Some(InstanceStateName::Terminated) => CloudInstanceStatus::Terminated,
        // A name this SDK does not know: fall back to the documented numeric code (the
        // low byte; the high byte is internal).
        _ => match state.code().map(|c| c & 0xff) {
            Some(16) => CloudInstanceStatus::Running,
            Some(32) => CloudInstanceStatus::ShuttingDown,
            Some(48) => CloudInstanceStatus::Terminated,
            Some(64) => CloudInstanceStatus::Stopping,
            Some(80) => CloudInstanceStatus::Stopped,
            _ => CloudInstanceStatus::Pending,
        },
    }
}

/// Maps an SDK failure of `op` to the port's error.
fn map_err<E>(op: &str, err: SdkError<E, HttpResponse>) -> CloudError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match &err {
        SdkError::ServiceError(ctx) => {
            let status = ctx.raw().status().as_u16();
            let code = err.code().unwrap_or("Unknown");
            let message = err.message().unwrap_or("no message");
            let text = format!("{op}: {code}: {message} (HTTP {status})");
            if status >= 500 || status == 429 || RETRYABLE_CODES.contains(&code) {
                CloudError::Unavailable(text)
            } else {
                CloudError::Rejected(text)
            }
        }
        // The request could not even be built from our input: retrying will not help.
        SdkError::ConstructionFailure(_) => {
            CloudError::Rejected(format!("{op}: {}", DisplayErrorContext(&err)))
        }
        // Dispatch failures (connect, DNS, TLS, credentials), timeouts and responses
        // that could not be parsed.
        _ => CloudError::Unavailable(format!("{op}: {}", DisplayErrorContext(&err))),
    }
}

fn is_instance_not_found<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> bool {
    matches!(err, SdkError::ServiceError(_)) && err.code() == Some(INSTANCE_NOT_FOUND)
}

#[async_trait]
impl CloudProvider for Ec2Cloud {
    #[tracing::instrument(skip(self, template), fields(worker_id = %worker_id, template = %template.name))]
    async fn create_instance(
        &self,
        template: &WorkerTemplate,
        worker_id: &str,
    ) -> Result<LaunchOutcome, CloudError> {
        let existing = self
            .describe_all(
                self.describe_ours()
                    .filters(tag_filter(TAG_WORKER_ID, worker_id)),
            )
            .await?;
        if let Some(id) = existing.iter().find_map(|i| i.instance_id()) {
            info!(instance_id = %id, "instance for this worker already exists; reusing it");
            return Ok(LaunchOutcome::existing(id));
        }

        // A try with other parameters under the same ClientToken would be refused as
        // IdempotentParameterMismatch, so each fallback try gets its own token.
        let mut tries = 0usize;
        let outcome = launch_with_fallbacks(template, |attempt| {
            let token = match tries {
                0 => worker_id.to_owned(),
                n => format!("{worker_id}.{n}"),
            };
            tries += 1;
            self.run_one(template, worker_id, attempt, token)
        })
        .await?;
        for f in &outcome.fallbacks {
            warn!(fallback = %f, "launch fell back");
        }
        Ok(outcome)
    }

    #[tracing::instrument(skip(self), fields(instance_id = %instance_id))]
    async fn terminate_instance(&self, instance_id: &str) -> Result<(), CloudError> {
        match self
            .client
            .terminate_instances()
            .instance_ids(instance_id)
            .send()
            .await
        {
            Ok(_) => {
                info!("instance termination requested");
                Ok(())
            }
            Err(e) if is_instance_not_found(&e) => {
                info!("instance already gone");
                Ok(())
            }
            Err(e) => Err(map_err("TerminateInstances", e)),
        }
    }

    #[tracing::instrument(skip(self), fields(instance_id = %instance_id))]
    async fn stop_instance(&self, instance_id: &str) -> Result<(), CloudError> {
        // Look first: nothing to do for an instance that is gone or already stopping, and
        // some emulators (moto) would even "stop" a terminated instance back to life.
        let status = self.get_instance_status(instance_id).await?;
        if !matches!(
            status,
            CloudInstanceStatus::Pending | CloudInstanceStatus::Running
        ) {
            info!(status = ?status, "nothing to stop");
            return Ok(());
        }
        match self
            .client
            .stop_instances()
            .instance_ids(instance_id)
            .send()
            .await
        {
            Ok(_) => {
                info!("instance stop requested");
                Ok(())
            }
            Err(e) if is_instance_not_found(&e) => {
                info!("instance already gone; nothing to stop");
                Ok(())
            }
            // EC2 refuses to stop an instance that is terminated or shutting down (fine:
            // nothing to stop) and one still pending (not fine: ask again later).
            Err(e) if e.code() == Some(INCORRECT_STATE) => {
                match self.get_instance_status(instance_id).await? {
                    s @ (CloudInstanceStatus::Pending | CloudInstanceStatus::Running) => {
                        Err(CloudError::Unavailable(format!(
                            "StopInstances: refused while the instance is {s:?} ({}); retry",
                            e.message().unwrap_or("no message")
                        )))
                    }
                    other => {
                        info!(status = ?other, "instance not stoppable; nothing to stop");
                        Ok(())
                    }
                }
            }
            Err(e) => Err(map_err("StopInstances", e)),
        }
    }

    #[tracing::instrument(skip(self), fields(instance_id = %instance_id))]
    async fn get_instance_status(
        &self,
        instance_id: &str,
    ) -> Result<CloudInstanceStatus, CloudError> {
        let request = self.client.describe_instances().instance_ids(instance_id);
        let instances = match request.send().await {
            Ok(output) => output
                .reservations()
                .iter()
                .flat_map(|r| r.instances())
                .filter(|i| i.instance_id() == Some(instance_id))
                .map(status_of)
                .collect::<Vec<_>>(),
            Err(e) if is_instance_not_found(&e) => Vec::new(),
            Err(e) => return Err(map_err("DescribeInstances", e)),
        };
        Ok(instances
            .first()
            .copied()
            .unwrap_or(CloudInstanceStatus::NotFound))
    }

    #[tracing::instrument(level = "debug", skip(self), fields(instance_id = %instance_id))]
    async fn instance_private_ip(&self, instance_id: &str) -> Result<Option<String>, CloudError> {
        let request = self.client.describe_instances().instance_ids(instance_id);
        match request.send().await {
            Ok(output) => Ok(output
                .reservations()
                .iter()
                .flat_map(|r| r.instances())
                .find(|i| i.instance_id() == Some(instance_id))
                .and_then(|i| i.private_ip_address())
                .filter(|ip| !ip.is_empty())
                .map(str::to_owned)),
            Err(e) if is_instance_not_found(&e) => Ok(None),
            Err(e) => Err(map_err("DescribeInstances", e)),
        }
    }

    #[tracing::instrument(skip(self), fields(cluster_id = %self.cluster_id))]
    async fn list_instances(&self) -> Result<Vec<CloudInstance>, CloudError> {
        let instances = self.describe_all(self.describe_ours()).await?;
        Ok(instances
            .iter()
            .filter_map(|i| {
                let status = status_of(i);
                // The filter already excludes terminated instances; this guards against
                // an emulator that ignores it.
                if status == CloudInstanceStatus::Terminated {
                    return None;
                }
                Some(CloudInstance {
                    instance_id: i.instance_id()?.to_owned(),
                    worker_id: tag_value(i, TAG_WORKER_ID).map(str::to_owned),
                    status,
                    launched_at: i
                        .launch_time()
                        .and_then(|t| chrono::DateTime::from_timestamp(t.secs(), t.subsec_nanos())),
                })
            })
            .collect())
    }

    fn name(&self) -> &'static str {
        "ec2"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_ec2::types::InstanceState;

    fn instance(name: Option<InstanceStateName>, code: Option<i32>) -> Instance {
        let mut state = InstanceState::builder();
        if let Some(name) = name {
            state = state.name(name);
        }
        if let Some(code) = code {
            state = state.code(code);
        }
        Instance::builder()
            .instance_id("i-1")
            .state(state.build())
            .tags(Tag::builder().key(TAG_WORKER_ID).value("w-1").build())
            .build()
    }

    #[test]
    fn states_map_by_name_then_by_code() {
        let by_name = instance(Some(InstanceStateName::ShuttingDown), None);
        assert_eq!(status_of(&by_name), CloudInstanceStatus::ShuttingDown);
        let by_code = instance(Some(InstanceStateName::from("hibernating")), Some(256 + 80));
        assert_eq!(status_of(&by_code), CloudInstanceStatus::Stopped);
        let nothing = instance(None, None);
        assert_eq!(status_of(&nothing), CloudInstanceStatus::Pending);
        assert_eq!(tag_value(&nothing, TAG_WORKER_ID), Some("w-1"));
        assert_eq!(tag_value(&nothing, TAG_CLUSTER), None);
    }
}
