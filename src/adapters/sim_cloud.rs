//! Simulated `CloudProvider`: an in-memory cloud for the simulation mode and for tests.
//!
//! Instances are `Pending` until `boot` has passed since their launch, then `Running`;
//! stopping one makes it `Stopping` for another `boot`, then `Stopped` (as slow to shut
//! down as to boot, so the controller's STOPPING step can be seen); terminating one makes
//! it `Terminated` at once. Time is `tokio::time::Instant`, so tests
//! that pause tokio's clock decide when instances come up (and launch times follow the
//! same clock). Tests can also inject faults:
//! failing launches, instances that vanish, and orphans nobody asked for.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::time::Instant;

use crate::clock::Clock;
use crate::domain::launch::{LaunchAttempt, Market};
use crate::domain::worker::WorkerTemplate;
use crate::ports::cloud::{
    launch_with_fallbacks, AttemptError, CloudError, CloudInstance, CloudInstanceStatus,
    CloudProvider, LaunchOutcome,
};

#[derive(Debug)]
struct SimInstance {
    worker_id: Option<String>,
    launched_as: Option<LaunchAttempt>,
    ready_at: Instant,
    launched_at: DateTime<Utc>,
    /// When a requested stop completes (`Stopping` until then, `Stopped` after).
    stopped_at: Option<Instant>,
    terminated: bool,
}

impl SimInstance {
    fn status(&self, now: Instant) -> CloudInstanceStatus {
        if self.terminated {
            CloudInstanceStatus::Terminated
        } else if let Some(at) = self.stopped_at {
            if now >= at {
                CloudInstanceStatus::Stopped
            } else {
                CloudInstanceStatus::Stopping
            }
        } else if now >= self.ready_at {
            CloudInstanceStatus::Running
        } else {
            CloudInstanceStatus::Pending
        }
    }
}

#[derive(Debug, Default)]
struct SimState {
    // Keyed by id; ids grow monotonically, so iteration is in launch order.
    instances: BTreeMap<String, SimInstance>,
    next_id: u64,
    failing_creates: usize,
    create_calls: usize,
    // (instance type or any, market or any) -> error code its launches answer.
    launch_errors: Vec<(Option<String>, Option<Market>, String)>,
    stop_calls: usize,
}

impl SimState {
    fn launch(
        &mut self,
        worker_id: Option<String>,
        ready_at: Instant,
        launched_at: DateTime<Utc>,
    ) -> String {
        self.next_id += 1;
        let id = format!("i-{:017x}", self.next_id);
        self.instances.insert(
            id.clone(),
            SimInstance {
                worker_id,
                launched_as: None,
                ready_at,
                launched_at,
                stopped_at: None,
                terminated: false,
            },
        );
        id
    }
}

/// The simulated cloud.
#[derive(Debug)]
pub struct SimCloud {
    boot: Duration,
    clock: Clock,
    state: Mutex<SimState>,
}

impl SimCloud {
    /// A cloud whose instances take `boot` to go from `Pending` to `Running`.
    pub fn new(boot: Duration) -> SimCloud {
        SimCloud {
            boot,
            clock: Clock::new(),
            state: Mutex::new(SimState::default()),
        }
    }

    fn state(&self) -> MutexGuard<'_, SimState> {
        // A panic elsewhere while holding the lock leaves the map consistent (every
        // mutation is a single insert or field write), so poisoning is ignored.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the next `n` calls to `create_instance` fail with `Unavailable`.
    pub fn fail_next_creates(&self, n: usize) {
        self.state().failing_creates = n;
    }

    /// Makes every launch try of `instance_type` (any type when `None`) in `market` (any
    /// market when `None`) fail with the EC2 error `code`, e.g.
    /// `InsufficientInstanceCapacity` or `SpotMaxPriceTooLow`, until
    /// [`SimCloud::clear_launch_errors`].
    pub fn fail_launches(&self, instance_type: Option<&str>, market: Option<Market>, code: &str) {
        self.state().launch_errors.push((
            instance_type.map(str::to_owned),
            market,
            code.to_owned(),
        ));
    }

    /// Removes every error set by [`SimCloud::fail_launches`].
    pub fn clear_launch_errors(&self) {
        self.state().launch_errors.clear();
    }

    /// The try (instance type and market) that launched `instance_id`; `None` for an
    /// unknown instance or an orphan.
    pub fn launched_as(&self, instance_id: &str) -> Option<LaunchAttempt> {
        self.state()
            .instances
            .get(instance_id)
            .and_then(|i| i.launched_as.clone())
    }

    /// Makes an instance disappear without a trace: its status becomes `NotFound` and it
    /// is no longer listed (a host lost outside our control).
    pub fn vanish(&self, instance_id: &str) {
        self.state().instances.remove(instance_id);
    }

    /// Adds an already running instance tagged for `worker_id` that nobody asked this
    /// cloud to launch (left over by a crashed controller, say); returns its id.
    pub fn add_orphan(&self, worker_id: &str) -> String {
        self.add_orphan_aged(worker_id, Duration::ZERO)
    }

    /// Like [`SimCloud::add_orphan`], launched `age` ago.
    pub fn add_orphan_aged(&self, worker_id: &str, age: Duration) -> String {
        let now = Instant::now();
        let launched = self.clock.now() - chrono::Duration::from_std(age).unwrap_or_default();
        self.state()
            .launch(Some(worker_id.to_owned()), now, launched)
    }

    /// How many times `create_instance` was called, failed and deduplicated calls
    /// included.
    pub fn create_calls(&self) -> usize {
        self.state().create_calls
    }

    /// How many times `stop_instance` was called, no-ops included.
    pub fn stop_calls(&self) -> usize {
        self.state().stop_calls
    }

    /// How many instances are `Running` now.
    pub fn running_count(&self) -> usize {
        let now = Instant::now();
        self.state()
            .instances
            .values()
            .filter(|i| i.status(now) == CloudInstanceStatus::Running)
            .count()
    }
}

impl SimCloud {
    /// One launch try: fails with an injected error code matching the try, else
    /// launches.
    fn launch_one(&self, worker_id: &str, attempt: LaunchAttempt) -> Result<String, AttemptError> {
        let now = Instant::now();
        let mut state = self.state();
        let injected = state.launch_errors.iter().find(|(t, m, _)| {
            t.as_ref()
                .is_none_or(|t| attempt.instance_type.as_ref() == Some(t))
                && m.is_none_or(|m| m == attempt.market)
        });
        if let Some((_, _, code)) = injected {
            return Err(AttemptError {
                code: Some(code.clone()),
                error: CloudError::Unavailable(format!(
                    "RunInstances: {code}: simulated for {attempt} (injected)"
                )),
            });
        }
        let id = state.launch(
            Some(worker_id.to_owned()),
            now + self.boot,
            self.clock.now(),
        );
        if let Some(i) = state.instances.get_mut(&id) {
            i.launched_as = Some(attempt);
        }
        Ok(id)
    }
}

#[async_trait]
impl CloudProvider for SimCloud {
    #[tracing::instrument(level = "debug", name = "sim_cloud.create_instance", skip_all)]
    async fn create_instance(
        &self,
        template: &WorkerTemplate,
        worker_id: &str,
    ) -> Result<LaunchOutcome, CloudError> {
        {
            let mut state = self.state();
            state.create_calls += 1;
            if state.failing_creates > 0 {
                state.failing_creates -= 1;
                return Err(CloudError::Unavailable(
                    "simulated cloud outage (injected)".into(),
                ));
            }
            let existing = state
                .instances
                .iter()
                .find(|(_, i)| !i.terminated && i.worker_id.as_deref() == Some(worker_id));
            if let Some((id, _)) = existing {
                return Ok(LaunchOutcome::existing(id.clone()));
            }
        }
        launch_with_fallbacks(template, |attempt| {
            std::future::ready(self.launch_one(worker_id, attempt))
        })
        .await
    }

    #[tracing::instrument(level = "debug", name = "sim_cloud.terminate_instance", skip_all)]
    async fn terminate_instance(&self, instance_id: &str) -> Result<(), CloudError> {
        if let Some(i) = self.state().instances.get_mut(instance_id) {
            i.terminated = true;
        }
        Ok(())
    }

    #[tracing::instrument(level = "debug", name = "sim_cloud.stop_instance", skip_all)]
    async fn stop_instance(&self, instance_id: &str) -> Result<(), CloudError> {
        let done_at = Instant::now() + self.boot;
        let mut state = self.state();
        state.stop_calls += 1;
        if let Some(i) = state.instances.get_mut(instance_id) {
            // A stop already under way keeps its time; a terminated instance stays so.
            if !i.terminated && i.stopped_at.is_none() {
                i.stopped_at = Some(done_at);
            }
        }
        Ok(())
    }

    #[tracing::instrument(level = "debug", name = "sim_cloud.get_instance_status", skip_all)]
    async fn get_instance_status(
        &self,
        instance_id: &str,
    ) -> Result<CloudInstanceStatus, CloudError> {
        let now = Instant::now();
        Ok(self
            .state()
            .instances
            .get(instance_id)
            .map_or(CloudInstanceStatus::NotFound, |i| i.status(now)))
    }

    /// Simulated hosts live on loopback: a simulated instance that is not terminated
    /// answers `127.0.0.1`.
    #[tracing::instrument(level = "debug", name = "sim_cloud.instance_private_ip", skip_all)]
    async fn instance_private_ip(&self, instance_id: &str) -> Result<Option<String>, CloudError> {
        Ok(self
            .state()
            .instances
            .get(instance_id)
            .filter(|i| !i.terminated)
            .map(|_| "127.0.0.1".to_owned()))
    }

    #[tracing::instrument(level = "debug", name = "sim_cloud.list_instances", skip_all)]
    async fn list_instances(&self) -> Result<Vec<CloudInstance>, CloudError> {
        let now = Instant::now();
        Ok(self
            .state()
            .instances
            .iter()
            .filter(|(_, i)| !i.terminated)
            .map(|(id, i)| CloudInstance {
                instance_id: id.clone(),
                worker_id: i.worker_id.clone(),
                status: i.status(now),
                launched_at: Some(i.launched_at),
            })
            .collect())
    }

    fn name(&self) -> &'static str {
        "sim"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::worker::Resources;

    const BOOT: Duration = Duration::from_secs(30);

    fn template() -> WorkerTemplate {
        WorkerTemplate {
            name: "metal".into(),
            instance_type: Some("m5zn.metal".into()),
            image_id: Some("ami-12c6146b".into()),
            capacity: Resources {
                cpu: 48.0,
                memory_gb: 192.0,
            },
            max_workers: 4,
            hourly_cost: 3.96,
            ..WorkerTemplate::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn instance_is_pending_until_boot_elapses_then_running() {
        let cloud = SimCloud::new(BOOT);
        let id = cloud
            .create_instance(&template(), "w-1")
            .await
            .unwrap()
            .instance_id;
        assert_eq!(
            cloud.get_instance_status(&id).await.unwrap(),
            CloudInstanceStatus::Pending
        );
        assert_eq!(cloud.running_count(), 0);

        tokio::time::advance(BOOT - Duration::from_millis(1)).await;
        assert_eq!(
            cloud.get_instance_status(&id).await.unwrap(),
            CloudInstanceStatus::Pending
        );

        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(
            cloud.get_instance_status(&id).await.unwrap(),
            CloudInstanceStatus::Running
        );
        assert_eq!(cloud.running_count(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn terminate_makes_it_terminated_and_unlisted_and_is_idempotent() {
        let cloud = SimCloud::new(BOOT);
        let id = cloud
            .create_instance(&template(), "w-1")
            .await
            .unwrap()
            .instance_id;
        tokio::time::advance(BOOT).await;

        cloud.terminate_instance(&id).await.unwrap();
        cloud.terminate_instance(&id).await.unwrap();
        cloud.terminate_instance("i-unknown").await.unwrap();

        assert_eq!(
            cloud.get_instance_status(&id).await.unwrap(),
            CloudInstanceStatus::Terminated
        );
        assert!(cloud.list_instances().await.unwrap().is_empty());
        assert_eq!(cloud.running_count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn stop_moves_running_to_stopping_then_stopped_and_terminate_follows() {
        let cloud = SimCloud::new(BOOT);
        let id = cloud
            .create_instance(&template(), "w-1")
            .await
            .unwrap()
            .instance_id;
        tokio::time::advance(BOOT).await;

        cloud.stop_instance(&id).await.unwrap();
        assert_eq!(
            cloud.get_instance_status(&id).await.unwrap(),
            CloudInstanceStatus::Stopping
        );
        assert_eq!(cloud.stop_calls(), 1);
        // Asking again while it stops changes nothing (the clock does not restart).
        tokio::time::advance(BOOT - Duration::from_millis(1)).await;
        cloud.stop_instance(&id).await.unwrap();
        assert_eq!(
            cloud.get_instance_status(&id).await.unwrap(),
            CloudInstanceStatus::Stopping
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(
            cloud.get_instance_status(&id).await.unwrap(),
            CloudInstanceStatus::Stopped
        );
        assert_eq!(cloud.running_count(), 0);
        // A stopped instance is still listed (its worker owns it) and still has no
        // second life: a launch for the same worker finds it.
        let listed = cloud.list_instances().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].status, CloudInstanceStatus::Stopped);
        cloud.stop_instance(&id).await.unwrap();
        assert_eq!(
            cloud.get_instance_status(&id).await.unwrap(),
            CloudInstanceStatus::Stopped
        );

        cloud.terminate_instance(&id).await.unwrap();
        assert_eq!(
            cloud.get_instance_status(&id).await.unwrap(),
            CloudInstanceStatus::Terminated
        );
        // Stopping what is terminated or unknown is fine and changes nothing.
        cloud.stop_instance(&id).await.unwrap();
        cloud.stop_instance("i-unknown").await.unwrap();
        assert_eq!(
            cloud.get_instance_status(&id).await.unwrap(),
            CloudInstanceStatus::Terminated
        );
        assert_eq!(
            cloud.get_instance_status("i-unknown").await.unwrap(),
            CloudInstanceStatus::NotFound
        );
        assert_eq!(cloud.stop_calls(), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn create_for_the_same_worker_returns_the_existing_instance() {
        let cloud = SimCloud::new(BOOT);
        let first = cloud
            .create_instance(&template(), "w-1")
            .await
            .unwrap()
            .instance_id;
        let again = cloud
            .create_instance(&template(), "w-1")
            .await
            .unwrap()
            .instance_id;
        let other = cloud
            .create_instance(&template(), "w-2")
            .await
            .unwrap()
            .instance_id;

        assert_eq!(first, again);
        assert_ne!(first, other);
        assert_eq!(cloud.create_calls(), 3);
        assert_eq!(cloud.list_instances().await.unwrap().len(), 2);

        // Once terminated, the worker id may be launched afresh.
        cloud.terminate_instance(&first).await.unwrap();
        let fresh = cloud
            .create_instance(&template(), "w-1")
            .await
            .unwrap()
            .instance_id;
        assert_ne!(fresh, first);
    }

    #[tokio::test(start_paused = true)]
    async fn injected_create_failures_are_unavailable_then_launches_resume() {
        let cloud = SimCloud::new(BOOT);
        cloud.fail_next_creates(2);

        for _ in 0..2 {
            let err = cloud.create_instance(&template(), "w-1").await.unwrap_err();
            assert!(matches!(err, CloudError::Unavailable(_)), "{err:?}");
        }
        assert!(cloud.list_instances().await.unwrap().is_empty());

        let id = cloud
            .create_instance(&template(), "w-1")
            .await
            .unwrap()
            .instance_id;
        assert_eq!(cloud.create_calls(), 3);
        assert_eq!(
            cloud.get_instance_status(&id).await.unwrap(),
            CloudInstanceStatus::Pending
        );
    }

    fn listing(types: &[&str], market: Market) -> WorkerTemplate {
        WorkerTemplate {
            instance_type: None,
            instance_types: Some(types.iter().map(|t| (*t).to_owned()).collect()),
            market,
            ..template()
        }
    }

    fn tried(t: &str, market: Market) -> LaunchAttempt {
        LaunchAttempt {
            instance_type: Some(t.to_owned()),
            market,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn injected_capacity_errors_fall_back_along_the_instance_types() {
        let cloud = SimCloud::new(BOOT);
        let t = listing(&["m5zn.metal", "m5.metal", "c5.metal"], Market::OnDemand);
        cloud.fail_launches(Some("m5zn.metal"), None, "InsufficientInstanceCapacity");
        cloud.fail_launches(Some("m5.metal"), None, "InsufficientInstanceCapacity");

        let out = cloud.create_instance(&t, "w-1").await.unwrap();
        assert_eq!(out.launched, Some(tried("c5.metal", Market::OnDemand)));
        assert_eq!(
            cloud.launched_as(&out.instance_id),
            Some(tried("c5.metal", Market::OnDemand))
        );
        let steps: Vec<(LaunchAttempt, String, LaunchAttempt)> = out
            .fallbacks
            .iter()
            .map(|f| (f.failed.clone(), f.code.clone(), f.next.clone()))
            .collect();
        assert_eq!(
            steps,
            vec![
                (
                    tried("m5zn.metal", Market::OnDemand),
                    "InsufficientInstanceCapacity".to_owned(),
                    tried("m5.metal", Market::OnDemand)
                ),
                (
                    tried("m5.metal", Market::OnDemand),
                    "InsufficientInstanceCapacity".to_owned(),
                    tried("c5.metal", Market::OnDemand)
                ),
            ]
        );
        assert_eq!(cloud.list_instances().await.unwrap().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn no_capacity_anywhere_fails_naming_every_try_and_launches_nothing() {
        let cloud = SimCloud::new(BOOT);
        let t = listing(&["a", "b"], Market::OnDemand);
        cloud.fail_launches(None, None, "InsufficientInstanceCapacity");

        let err = cloud.create_instance(&t, "w-1").await.unwrap_err();
        let CloudError::Unavailable(text) = &err else {
            panic!("{err:?}")
        };
        assert!(
            text.contains("tried a (on_demand), b (on_demand)"),
            "{text}"
        );
        assert!(cloud.list_instances().await.unwrap().is_empty());

        // A code that is not about capacity ends the launch at once.
        cloud.clear_launch_errors();
        cloud.fail_launches(Some("a"), None, "InvalidAMIID.NotFound");
        let err = cloud.create_instance(&t, "w-1").await.unwrap_err();
        assert!(!err.to_string().contains("tried"), "{err}");
        assert!(cloud.list_instances().await.unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn spot_errors_fall_back_to_on_demand_unless_disabled() {
        let cloud = SimCloud::new(BOOT);
        let t = listing(&["a", "b"], Market::Spot);
        cloud.fail_launches(None, Some(Market::Spot), "SpotMaxPriceTooLow");

        let out = cloud.create_instance(&t, "w-1").await.unwrap();
        assert_eq!(out.launched, Some(tried("a", Market::OnDemand)));
        assert_eq!(out.fallbacks.len(), 1);
        assert_eq!(out.fallbacks[0].code, "SpotMaxPriceTooLow");
        assert_eq!(out.fallbacks[0].failed, tried("a", Market::Spot));

        // Spot capacity short on every type: every spot type, then on-demand.
        cloud.clear_launch_errors();
        cloud.fail_launches(None, Some(Market::Spot), "InsufficientInstanceCapacity");
        let out = cloud.create_instance(&t, "w-2").await.unwrap();
        let failed: Vec<LaunchAttempt> = out.fallbacks.iter().map(|f| f.failed.clone()).collect();
        assert_eq!(
            failed,
            vec![tried("a", Market::Spot), tried("b", Market::Spot)]
        );
        assert_eq!(out.launched, Some(tried("a", Market::OnDemand)));

        let spot_only = WorkerTemplate {
            spot_fallback_on_demand: false,
            ..t.clone()
        };
        cloud.clear_launch_errors();
        cloud.fail_launches(None, Some(Market::Spot), MAX_SPOT);
        let err = cloud.create_instance(&spot_only, "w-3").await.unwrap_err();
        assert!(err.to_string().contains(MAX_SPOT), "{err}");
        assert_eq!(cloud.list_instances().await.unwrap().len(), 2);
    }

    const MAX_SPOT: &str = "MaxSpotInstanceCountExceeded";

    #[tokio::test(start_paused = true)]
    async fn vanished_instance_is_not_found_and_unlisted() {
        let cloud = SimCloud::new(BOOT);
        let id = cloud
            .create_instance(&template(), "w-1")
            .await
            .unwrap()
            .instance_id;
        tokio::time::advance(BOOT).await;

        cloud.vanish(&id);

        assert_eq!(
            cloud.get_instance_status(&id).await.unwrap(),
            CloudInstanceStatus::NotFound
        );
        assert!(cloud.list_instances().await.unwrap().is_empty());
        assert_eq!(cloud.running_count(), 0);
        // Terminating what is gone is fine.
        cloud.terminate_instance(&id).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn orphan_is_listed_running_with_its_worker_id_and_deduplicates() {
        let cloud = SimCloud::new(BOOT);
        let orphan = cloud.add_orphan("w-ghost");

        let listed = cloud.list_instances().await.unwrap();
        assert_eq!(
            listed,
            vec![CloudInstance {
                instance_id: orphan.clone(),
                worker_id: Some("w-ghost".into()),
                status: CloudInstanceStatus::Running,
                launched_at: listed[0].launched_at,
            }]
        );
        assert!(listed[0].launched_at.is_some());
        assert_eq!(cloud.create_calls(), 0);
        assert_eq!(cloud.running_count(), 1);

        let id = cloud
            .create_instance(&template(), "w-ghost")
            .await
            .unwrap()
            .instance_id;
        assert_eq!(id, orphan);
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_instance_is_not_found() {
        let cloud = SimCloud::new(BOOT);
        assert_eq!(
            cloud.get_instance_status("i-nope").await.unwrap(),
            CloudInstanceStatus::NotFound
        );
        assert_eq!(cloud.name(), "sim");
    }
}
