//! The shadow deployable state machine: `FREE <-> PROCURED`, owned by one workflow run.
//!
//! [`decide`] is the only way a record changes: `(record, command) -> decision`. It is
//! pure so it can be property-tested and so the actor stays a thin shell around it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Upper bound on `min_pod_count`; protects Kubernetes from a typo like `count: 1e9`.
pub const MAX_MIN_POD_COUNT: u32 = 10_000;

/// Longest hold lease a PROCURE or RENEW may ask for (7 days): a lease is a promise to
/// renew, and a week is beyond any load test, so a larger value is a mistake.
pub const MAX_LEASE_SECONDS: u64 = 7 * 86_400;

/// Whether a shadow deployable is borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ShadowState {
    /// Nobody holds it.
    Free,
    /// A workflow run holds it.
    Procured,
}

/// Who holds a procured deployable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// The workflow run that procured it.
    pub workflow_run_id: String,
    /// The workflow plan of that run, when given.
    pub workflow_plan: Option<String>,
    /// When it was procured.
    #[serde(with = "crate::domain::time")]
    pub procured_at: DateTime<Utc>,
    /// The hold's lease length in seconds, as given to PROCURE (absent: no lease, the
    /// hold lasts until RELEASE). A RENEW without a length renews by this much.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_seconds: Option<u64>,
}

/// The persisted record at `/shadow-deployables/{env}/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShadowDeployable {
    /// Unique name within its environment.
    pub name: String,
    /// Node pool the deployable runs on.
    pub node_pool: String,
    /// DNS name load tests target.
    pub dns: String,
    /// FREE or PROCURED.
    pub state: ShadowState,
    /// The holder while PROCURED.
    pub owner: Option<Owner>,
    /// Minimum pod count requested by the holder.
    #[serde(default)]
    pub min_pod_count: u32,
    /// When a leased hold expires (the leader then releases it); `None` when FREE or
    /// held without a lease.
    #[serde(default, with = "crate::domain::time::option")]
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// The Deployment `min_pod_count` scales, when registration named one other than
    /// `name` (absent: `name`; records stored before the mapping existed have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<String>,
    /// The HorizontalPodAutoscaler whose `minReplicas` follows `min_pod_count`, when
    /// registration named one other than `name` (absent: `name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hpa: Option<String>,
    /// Time of the last change.
    #[serde(with = "crate::domain::time")]
    pub last_updated_at: DateTime<Utc>,
    /// Incremented by every state change.
    pub version: u64,
}

impl ShadowDeployable {
    /// A new FREE record.
    pub fn new(name: &str, node_pool: &str, dns: &str, now: DateTime<Utc>) -> Self {
        Self {
            name: name.to_owned(),
            node_pool: node_pool.to_owned(),
            dns: dns.to_owned(),
            state: ShadowState::Free,
            owner: None,
            min_pod_count: 0,
            lease_expires_at: None,
            deployment: None,
            hpa: None,
            last_updated_at: now,
            version: 0,
        }
    }

    /// Whether this is a leased hold whose lease ran out before `now` (the reaper's
    /// test; a RENEW may still save it until the reaper acts).
    pub fn lease_expired(&self, now: DateTime<Utc>) -> bool {
        self.state == ShadowState::Procured && self.lease_expires_at.is_some_and(|t| t < now)
    }

    /// The Deployment this deployable's minimum pod count scales.
    pub fn deployment_name(&self) -> &str {
        self.deployment.as_deref().unwrap_or(&self.name)
    }

    /// The HorizontalPodAutoscaler whose `minReplicas` follows the minimum pod count.
    pub fn hpa_name(&self) -> &str {
        self.hpa.as_deref().unwrap_or(&self.name)
    }

    /// Whether the in-use index should say `true`.
    pub fn in_use(&self) -> bool {
        self.state == ShadowState::Procured
    }

    /// The owner's run id, if procured.
    pub fn owner_run(&self) -> Option<&str> {
        self.owner.as_ref().map(|o| o.workflow_run_id.as_str())
    }
}

/// Whether `s` can name a Kubernetes Deployment or HPA (an RFC 1123 subdomain: 1-253
/// lowercase letters, digits, '-' or '.', starting and ending with a letter or digit).
pub fn valid_object_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// How a min-pod-count request changes the count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MinPodAction {
    /// Add `count`.
    Increase,
    /// Subtract `count`, flooring at zero.
    Decrease,
    /// Set to zero.
    ResetTo0,
}

/// A request against one shadow deployable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShadowCommand {
    /// Borrow it for a workflow run.
    Procure {
        /// Caller's run id.
        run_id: String,
        /// Caller's plan.
        plan: Option<String>,
        /// Lease length in seconds (1..=[`MAX_LEASE_SECONDS`]); `None`: held until
        /// released.
        lease_seconds: Option<u64>,
    },
    /// Give it back.
    Release {
        /// Caller's run id.
        run_id: String,
    },
    /// Extend a leased hold (owner only) to now + `lease_seconds`, or + the hold's
    /// original length.
    Renew {
        /// Caller's run id.
        run_id: String,
        /// This renewal's length in seconds (1..=[`MAX_LEASE_SECONDS`]).
        lease_seconds: Option<u64>,
    },
    /// The leader's reaper: release the hold if its lease has expired (the same
    /// transition as RELEASE), otherwise change nothing.
    Reap,
    /// Change the minimum pod count (owner only).
    MinPodCount {
        /// Caller's run id.
        run_id: String,
        /// How to change it.
        action: MinPodAction,
        /// By how much.
        count: u32,
    },
    /// Create the record, or update its node pool, DNS name and Kubernetes mapping.
    Register {
        /// Name of the deployable.
        name: String,
        /// Node pool.
        node_pool: String,
        /// DNS name.
        dns: String,
        /// Deployment scaled by the minimum pod count (none: `name`).
        deployment: Option<String>,
        /// HPA whose `minReplicas` follows the minimum pod count (none: `name`).
        hpa: Option<String>,
    },
    /// Remove the record (only when FREE).
    Delete,
}

impl ShadowCommand {
    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Procure { .. } => "procure",
            Self::Release { .. } => "release",
            Self::Renew { .. } => "renew",
            Self::Reap => "reap",
            Self::MinPodCount { .. } => "min_pod_count",
            Self::Register { .. } => "register",
            Self::Delete => "delete",
        }
    }
}

/// What the caller is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShadowOutcome {
    /// The caller holds it (newly or already).
    Procured,
    /// Someone else holds it; retry after `delay` seconds.
    Failed {
        /// Seconds to wait before retrying.
        delay: u64,
    },
    /// Given back.
    Released,
    /// The lease was extended.
    Renewed {
        /// The new expiry.
        lease_expires_at: DateTime<Utc>,
        /// The record's version after the renewal.
        version: u64,
    },
    /// The reaper released an expired hold of `run_id`.
    Reaped {
        /// The run whose hold expired.
        run_id: String,
        /// When its lease had expired.
        lease_expired_at: DateTime<Utc>,
    },
    /// The reaper found nothing to release (renewed, released, or never leased).
    NotExpired,
    /// Minimum pod count is now `min_pod_count`.
    Updated {
        /// The new count.
        min_pod_count: u32,
    },
    /// Registered (`created`) or its fields updated.
    Registered {
        /// True when the record did not exist.
        created: bool,
    },
    /// Removed.
    Deleted,
}

/// What happens to the persisted record.
// `Put` carries the whole record (with its Kubernetes mapping, it is past clippy's size
// threshold): a decision lives for one command and is moved, never copied in bulk, so a
// box would only add an allocation per command.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Nothing is written.
    None,
    /// The record becomes this.
    Put(ShadowDeployable),
    /// The record is removed.
    Delete,
}

/// The result of [`decide`]: the change to persist and the answer to give once it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Change to persist (atomically) before answering.
    pub change: Change,
    /// Answer for the caller.
    pub outcome: ShadowOutcome,
}

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShadowError {
    /// No such record.
    #[error("shadow deployable not found")]
    NotFound,
    /// The caller does not hold it.
    #[error("shadow deployable is procured by another workflow run")]
    NotOwner,
    /// It is FREE, so there is nothing to release or scale.
    #[error("shadow deployable is not procured")]
    NotProcured,
    /// It cannot be deleted while someone holds it.
    #[error("shadow deployable is procured; release it before deleting")]
    StillProcured,
    /// The resulting count would exceed [`MAX_MIN_POD_COUNT`].
    #[error("min_pod_count would exceed the maximum of {MAX_MIN_POD_COUNT}")]
    CountTooLarge,
    /// RENEW of a hold that was procured without `lease_seconds`.
    #[error("shadow deployable is held without a lease; there is nothing to renew")]
    NoLease,
    /// RENEW of a FREE deployable: released, or its lease expired and the leader
    /// released it.
    #[error("shadow deployable is not procured (released, or its lease expired and the hold was released)")]
    HoldGone,
    /// A lease length outside 1..=[`MAX_LEASE_SECONDS`].
    #[error("lease_seconds must be between 1 and {MAX_LEASE_SECONDS}")]
    BadLease,
}

/// Inputs a transition needs besides the record and the command.
#[derive(Debug, Clone, Copy)]
pub struct Context {
    /// Now.
    pub now: DateTime<Utc>,
    /// Seconds a losing PROCURE is told to wait.
    pub retry_delay: u64,
}

/// Computes the decision for `cmd` against the current record (`None` = absent).
pub fn decide(
    current: Option<&ShadowDeployable>,
    cmd: &ShadowCommand,
    ctx: Context,
) -> Result<Decision, ShadowError> {
    let unchanged = |outcome| {
        Ok(Decision {
            change: Change::None,
            outcome,
        })
    };
    let Some(rec) = current else {
        return match cmd {
            ShadowCommand::Register {
                name,
                node_pool,
                dns,
                deployment,
                hpa,
            } => {
                let mut rec = ShadowDeployable::new(name, node_pool, dns, ctx.now);
                rec.deployment.clone_from(deployment);
                rec.hpa.clone_from(hpa);
                Ok(Decision {
                    change: Change::Put(rec),
                    outcome: ShadowOutcome::Registered { created: true },
                })
            }
            _ => Err(ShadowError::NotFound),
        };
    };
    match cmd {
        ShadowCommand::Procure {
            run_id,
            plan,
            lease_seconds,
        } => match rec.owner_run() {
            // A repeated PROCURE by the holder changes nothing, its lease included:
            // extending is RENEW's job.
            Some(owner) if owner == run_id => unchanged(ShadowOutcome::Procured),
            Some(_) => unchanged(ShadowOutcome::Failed {
                delay: ctx.retry_delay,
            }),
            None => {
                let expires = lease_seconds.map(|s| expiry(ctx.now, s)).transpose()?;
                let mut next = rec.clone();
                next.state = ShadowState::Procured;
                next.owner = Some(Owner {
                    workflow_run_id: run_id.clone(),
                    workflow_plan: plan.clone(),
                    procured_at: ctx.now,
                    lease_seconds: *lease_seconds,
                });
                next.lease_expires_at = expires;
                bump(&mut next, ctx);
                Ok(Decision {
                    change: Change::Put(next),
                    outcome: ShadowOutcome::Procured,
                })
            }
        },
        ShadowCommand::Release { run_id } => {
            check_owner(rec, run_id)?;
            Ok(Decision {
                change: Change::Put(freed(rec, ctx)),
                outcome: ShadowOutcome::Released,
            })
        }
        ShadowCommand::Renew {
            run_id,
            lease_seconds,
        } => {
            check_owner(rec, run_id).map_err(|e| match e {
                ShadowError::NotProcured => ShadowError::HoldGone,
                other => other,
            })?;
            // A hold whose lease ran out but which the reaper has not taken yet is
            // still the caller's: renewing it is allowed (the reaper's CAS then fails).
            let original = rec
                .owner
                .as_ref()
                .and_then(|o| o.lease_seconds)
                .ok_or(ShadowError::NoLease)?;
            let expires = expiry(ctx.now, lease_seconds.unwrap_or(original))?;
            let mut next = rec.clone();
            next.lease_expires_at = Some(expires);
            bump(&mut next, ctx);
            let version = next.version;
            Ok(Decision {
                change: Change::Put(next),
                outcome: ShadowOutcome::Renewed {
                    lease_expires_at: expires,
                    version,
                },
            })
        }
        ShadowCommand::Reap => match (rec.lease_expires_at, rec.owner_run()) {
            (Some(at), Some(run)) if rec.lease_expired(ctx.now) => Ok(Decision {
                outcome: ShadowOutcome::Reaped {
                    run_id: run.to_owned(),
                    lease_expired_at: at,
                },
                change: Change::Put(freed(rec, ctx)),
            }),
            _ => unchanged(ShadowOutcome::NotExpired),
        },
        ShadowCommand::MinPodCount {
            run_id,
            action,
            count,
        } => {
            check_owner(rec, run_id)?;
            let target = match action {
                MinPodAction::Increase => rec
                    .min_pod_count
                    .checked_add(*count)
                    .filter(|c| *c <= MAX_MIN_POD_COUNT)
                    .ok_or(ShadowError::CountTooLarge)?,
                MinPodAction::Decrease => rec.min_pod_count.saturating_sub(*count),
                MinPodAction::ResetTo0 => 0,
            };
            if target == rec.min_pod_count {
                return unchanged(ShadowOutcome::Updated {
                    min_pod_count: target,
                });
            }
            let mut next = rec.clone();
            next.min_pod_count = target;
            bump(&mut next, ctx);
            Ok(Decision {
                change: Change::Put(next),
                outcome: ShadowOutcome::Updated {
                    min_pod_count: target,
                },
            })
        }
        ShadowCommand::Delete => {
            if rec.state == ShadowState::Procured {
                return Err(ShadowError::StillProcured);
            }
            Ok(Decision {
                change: Change::Delete,
                outcome: ShadowOutcome::Deleted,
            })
        }
        ShadowCommand::Register {
            node_pool,
            dns,
            deployment,
            hpa,
            ..
        } => {
            if rec.node_pool == *node_pool
                && rec.dns == *dns
                && rec.deployment == *deployment
                && rec.hpa == *hpa
            {
                return unchanged(ShadowOutcome::Registered { created: false });
            }
            let mut next = rec.clone();
            next.node_pool.clone_from(node_pool);
            next.dns.clone_from(dns);
            next.deployment.clone_from(deployment);
            next.hpa.clone_from(hpa);
            next.last_updated_at = ctx.now;
            Ok(Decision {
                change: Change::Put(next),
                outcome: ShadowOutcome::Registered { created: false },
            })
        }
    }
}

fn check_owner(rec: &ShadowDeployable, run_id: &str) -> Result<(), ShadowError> {
    match rec.owner_run() {
        None => Err(ShadowError::NotProcured),
        Some(owner) if owner != run_id => Err(ShadowError::NotOwner),
        Some(_) => Ok(()),
    }
}

/// The RELEASE transition (also the reaper's): FREE, no owner, no lease, no pods.
fn freed(rec: &ShadowDeployable, ctx: Context) -> ShadowDeployable {
    let mut next = rec.clone();
    next.state = ShadowState::Free;
    next.owner = None;
    next.min_pod_count = 0;
    next.lease_expires_at = None;
    bump(&mut next, ctx);
    next
}

/// `now + seconds`, for a length within 1..=[`MAX_LEASE_SECONDS`].
pub fn expiry(now: DateTime<Utc>, seconds: u64) -> Result<DateTime<Utc>, ShadowError> {
    if !(1..=MAX_LEASE_SECONDS).contains(&seconds) {
        return Err(ShadowError::BadLease);
    }
    i64::try_from(seconds)
        .ok()
        .and_then(chrono::TimeDelta::try_seconds)
        .and_then(|d| now.checked_add_signed(d))
        .ok_or(ShadowError::BadLease)
}

fn bump(rec: &mut ShadowDeployable, ctx: Context) {
    rec.version += 1;
    rec.last_updated_at = ctx.now;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ctx() -> Context {
        Context {
            now: DateTime::<Utc>::from_timestamp(1_700_000_000, 0).unwrap_or_default(),
            retry_delay: 300,
        }
    }

    fn free() -> ShadowDeployable {
        ShadowDeployable::new("d", "pool", "d.example", ctx().now)
    }

    fn procure(run: &str) -> ShadowCommand {
        ShadowCommand::Procure {
            run_id: run.into(),
            plan: Some("plan".into()),
            lease_seconds: None,
        }
    }

    fn apply(rec: &ShadowDeployable, cmd: &ShadowCommand) -> (ShadowDeployable, ShadowOutcome) {
        let d = decide(Some(rec), cmd, ctx()).expect("decision");
        match d.change {
            Change::Put(next) => (next, d.outcome),
            _ => (rec.clone(), d.outcome),
        }
    }

    #[test]
    fn procure_free_sets_owner_and_bumps_version() {
        let (next, out) = apply(&free(), &procure("r1"));
        assert_eq!(out, ShadowOutcome::Procured);
        assert_eq!(next.state, ShadowState::Procured);
        assert_eq!(next.owner_run(), Some("r1"));
        assert_eq!(next.version, 1);
    }

    #[test]
    fn procure_by_other_fails_with_delay_and_changes_nothing() {
        let (held, _) = apply(&free(), &procure("r1"));
        let d = decide(Some(&held), &procure("r2"), ctx()).expect("decision");
        assert_eq!(d.change, Change::None);
        assert_eq!(d.outcome, ShadowOutcome::Failed { delay: 300 });
        let again = decide(Some(&held), &procure("r1"), ctx()).expect("decision");
        assert_eq!(again.change, Change::None);
        assert_eq!(again.outcome, ShadowOutcome::Procured);
    }

    #[test]
    fn release_resets_pods_and_only_owner_may() {
        let (held, _) = apply(&free(), &procure("r1"));
        let (scaled, _) = apply(
            &held,
            &ShadowCommand::MinPodCount {
                run_id: "r1".into(),
                action: MinPodAction::Increase,
                count: 4,
            },
        );
        assert_eq!(scaled.min_pod_count, 4);
        let other = ShadowCommand::Release {
            run_id: "r2".into(),
        };
        assert_eq!(
            decide(Some(&scaled), &other, ctx()),
            Err(ShadowError::NotOwner)
        );
        let (freed, out) = apply(
            &scaled,
            &ShadowCommand::Release {
                run_id: "r1".into(),
            },
        );
        assert_eq!(out, ShadowOutcome::Released);
        assert_eq!(freed.state, ShadowState::Free);
        assert_eq!(freed.min_pod_count, 0);
        assert!(freed.owner.is_none());
        assert_eq!(
            decide(Some(&freed), &other, ctx()),
            Err(ShadowError::NotProcured)
        );
    }

    #[test]
    fn decrease_floors_at_zero_and_increase_is_capped() {
        let (held, _) = apply(&free(), &procure("r1"));
        let dec = ShadowCommand::MinPodCount {
            run_id: "r1".into(),
            action: MinPodAction::Decrease,
            count: 7,
        };
        let d = decide(Some(&held), &dec, ctx()).expect("decision");
        assert_eq!(d.outcome, ShadowOutcome::Updated { min_pod_count: 0 });
        let inc = ShadowCommand::MinPodCount {
            run_id: "r1".into(),
            action: MinPodAction::Increase,
            count: MAX_MIN_POD_COUNT + 1,
        };
        assert_eq!(
            decide(Some(&held), &inc, ctx()),
            Err(ShadowError::CountTooLarge)
        );
    }

    fn register(deployment: Option<&str>, hpa: Option<&str>) -> ShadowCommand {
        ShadowCommand::Register {
            name: "d".into(),
            node_pool: "pool".into(),
            dns: "d.example".into(),
            deployment: deployment.map(str::to_owned),
            hpa: hpa.map(str::to_owned),
        }
    }

    #[test]
    fn registration_maps_the_deployment_and_hpa_and_defaults_to_the_name() {
        let d = decide(None, &register(Some("dep-x"), Some("hpa-x")), ctx()).expect("decision");
        let Change::Put(rec) = d.change else {
            panic!("nothing written")
        };
        assert_eq!((rec.deployment_name(), rec.hpa_name()), ("dep-x", "hpa-x"));
        // Registering again without names maps the shadow name again.
        let (next, out) = apply(&rec, &register(None, None));
        assert_eq!(out, ShadowOutcome::Registered { created: false });
        assert_eq!((next.deployment_name(), next.hpa_name()), ("d", "d"));
        let (next, _) = apply(&next, &register(None, Some("hpa-y")));
        assert_eq!((next.deployment_name(), next.hpa_name()), ("d", "hpa-y"));
        // Records stored before the mapping existed decode and map their own name.
        let old: ShadowDeployable = serde_json::from_value(serde_json::json!({
            "name": "old", "node_pool": "p", "dns": "x", "state": "FREE", "owner": null,
            "last_updated_at": "2026-01-10T14:20:00Z", "version": 3
        }))
        .expect("old record decodes");
        assert_eq!((old.deployment_name(), old.hpa_name()), ("old", "old"));
    }

    #[test]
    fn register_and_delete() {
        let d = decide(
            None,
            &ShadowCommand::Register {
                name: "n".into(),
                node_pool: "p".into(),
                dns: "x".into(),
                deployment: None,
                hpa: None,
            },
            ctx(),
        )
        .expect("decision");
        assert_eq!(d.outcome, ShadowOutcome::Registered { created: true });
        let (held, _) = apply(&free(), &procure("r1"));
        assert_eq!(
            decide(Some(&held), &ShadowCommand::Delete, ctx()),
            Err(ShadowError::StillProcured)
        );
        assert_eq!(
            decide(None, &ShadowCommand::Delete, ctx()),
            Err(ShadowError::NotFound)
        );
    }

    fn at(ctx: Context, secs: i64) -> Context {
        Context {
            now: ctx.now + chrono::TimeDelta::seconds(secs),
            ..ctx
        }
    }

    fn leased(run: &str, secs: u64) -> ShadowCommand {
        ShadowCommand::Procure {
            run_id: run.into(),
            plan: None,
            lease_seconds: Some(secs),
        }
    }

    fn renew(run: &str, secs: Option<u64>) -> ShadowCommand {
        ShadowCommand::Renew {
            run_id: run.into(),
            lease_seconds: secs,
        }
    }

    fn put(d: Result<Decision, ShadowError>) -> (ShadowDeployable, ShadowOutcome) {
        match d {
            Ok(Decision {
                change: Change::Put(next),
                outcome,
            }) => (next, outcome),
            other => panic!("expected a write, got {other:?}"),
        }
    }

    #[test]
    fn a_leased_procure_records_the_length_and_the_expiry() {
        let (held, _) = put(decide(Some(&free()), &leased("r1", 60), ctx()));
        assert_eq!(
            held.lease_expires_at,
            Some(ctx().now + chrono::TimeDelta::seconds(60))
        );
        assert_eq!(held.owner.as_ref().and_then(|o| o.lease_seconds), Some(60));
        // Without a lease: held forever, as before.
        let (forever, _) = apply(&free(), &procure("r1"));
        assert_eq!(forever.lease_expires_at, None);
        assert!(!forever.lease_expired(at(ctx(), 1_000_000).now));
        // A repeated PROCURE by the holder does not touch the lease.
        let d = decide(Some(&held), &leased("r1", 5), at(ctx(), 30)).expect("decision");
        assert_eq!(
            (d.change, d.outcome),
            (Change::None, ShadowOutcome::Procured)
        );
        for bad in [0, MAX_LEASE_SECONDS + 1, u64::MAX] {
            assert_eq!(
                decide(Some(&free()), &leased("r1", bad), ctx()),
                Err(ShadowError::BadLease)
            );
        }
    }

    #[test]
    fn renew_extends_from_now_by_the_original_or_the_given_length() {
        let (held, _) = put(decide(Some(&free()), &leased("r1", 60), ctx()));
        let later = at(ctx(), 50);
        let (renewed, out) = put(decide(Some(&held), &renew("r1", None), later));
        let expected = later.now + chrono::TimeDelta::seconds(60);
        assert_eq!(renewed.lease_expires_at, Some(expected));
        assert_eq!(renewed.version, held.version + 1);
        assert_eq!(
            out,
            ShadowOutcome::Renewed {
                lease_expires_at: expected,
                version: renewed.version
            }
        );
        let (longer, _) = put(decide(Some(&renewed), &renew("r1", Some(600)), later));
        assert_eq!(
            longer.lease_expires_at,
            Some(later.now + chrono::TimeDelta::seconds(600))
        );
        // The original length stays the default.
        assert_eq!(
            longer.owner.as_ref().and_then(|o| o.lease_seconds),
            Some(60)
        );
        assert_eq!(
            decide(Some(&held), &renew("r1", Some(0)), later),
            Err(ShadowError::BadLease)
        );
    }

    #[test]
    fn renew_is_refused_to_others_without_a_lease_and_once_released() {
        let (held, _) = put(decide(Some(&free()), &leased("r1", 60), ctx()));
        assert_eq!(
            decide(Some(&held), &renew("r2", None), ctx()),
            Err(ShadowError::NotOwner)
        );
        let (forever, _) = apply(&free(), &procure("r1"));
        assert_eq!(
            decide(Some(&forever), &renew("r1", Some(60)), ctx()),
            Err(ShadowError::NoLease)
        );
        assert_eq!(
            decide(Some(&free()), &renew("r1", None), ctx()),
            Err(ShadowError::HoldGone)
        );
        assert_eq!(
            decide(None, &renew("r1", None), ctx()),
            Err(ShadowError::NotFound)
        );
    }

    #[test]
    fn reap_releases_only_an_expired_hold_exactly_as_release_does() {
        let (held, _) = put(decide(Some(&free()), &leased("r1", 60), ctx()));
        // Not yet expired (also exactly at the expiry): nothing.
        for secs in [0, 59, 60] {
            let d = decide(Some(&held), &ShadowCommand::Reap, at(ctx(), secs)).expect("d");
            assert_eq!(
                (d.change, d.outcome),
                (Change::None, ShadowOutcome::NotExpired)
            );
        }
        let late = at(ctx(), 61);
        let (reaped, out) = put(decide(Some(&held), &ShadowCommand::Reap, late));
        assert_eq!(
            out,
            ShadowOutcome::Reaped {
                run_id: "r1".into(),
                lease_expired_at: ctx().now + chrono::TimeDelta::seconds(60)
            }
        );
        let release = ShadowCommand::Release {
            run_id: "r1".into(),
        };
        let (released, _) = put(decide(Some(&held), &release, late));
        assert_eq!(reaped, released);
        assert_eq!(reaped.state, ShadowState::Free);
        assert_eq!(reaped.lease_expires_at, None);
        // Never leased, or FREE: nothing to reap.
        let (forever, _) = apply(&free(), &procure("r1"));
        for rec in [forever, free()] {
            let d = decide(Some(&rec), &ShadowCommand::Reap, late).expect("d");
            assert_eq!(d.change, Change::None);
        }
    }

    #[test]
    fn an_expired_hold_not_yet_reaped_can_still_be_renewed_and_is_then_kept() {
        let (held, _) = put(decide(Some(&free()), &leased("r1", 60), ctx()));
        let late = at(ctx(), 90);
        assert!(held.lease_expired(late.now));
        let (renewed, _) = put(decide(Some(&held), &renew("r1", None), late));
        let d = decide(Some(&renewed), &ShadowCommand::Reap, at(ctx(), 91)).expect("d");
        assert_eq!(
            (d.change, d.outcome),
            (Change::None, ShadowOutcome::NotExpired)
        );
    }

    /// A step of the leased life cycle: a command, or time passing.
    #[derive(Debug, Clone)]
    enum Step {
        Do(ShadowCommand),
        Wait(i64),
    }

    fn any_lease_step() -> impl Strategy<Value = Step> {
        let run = prop_oneof![Just("r1"), Just("r2")].prop_map(String::from);
        let lease = prop_oneof![Just(None), (1u64..5).prop_map(Some)];
        prop_oneof![
            (run.clone(), lease.clone()).prop_map(|(r, l)| Step::Do(ShadowCommand::Procure {
                run_id: r,
                plan: None,
                lease_seconds: l
            })),
            run.clone()
                .prop_map(|r| Step::Do(ShadowCommand::Release { run_id: r })),
            (run, lease).prop_map(|(r, l)| Step::Do(ShadowCommand::Renew {
                run_id: r,
                lease_seconds: l
            })),
            Just(Step::Do(ShadowCommand::Reap)),
            (0i64..4).prop_map(Step::Wait),
        ]
    }

    proptest! {
        #[test]
        fn leases_never_leave_a_half_released_or_unreapable_record(
            steps in prop::collection::vec(any_lease_step(), 0..64)
        ) {
            let mut rec = free();
            let mut now = ctx();
            for step in &steps {
                let cmd = match step {
                    Step::Wait(s) => {
                        now = at(now, *s);
                        continue;
                    }
                    Step::Do(cmd) => cmd,
                };
                let before = rec.clone();
                match decide(Some(&rec), cmd, now) {
                    Ok(Decision { change: Change::Put(next), outcome }) => {
                        prop_assert_eq!(next.version, before.version + 1);
                        match cmd {
                            // The reaper releases only an expired lease, as RELEASE would.
                            ShadowCommand::Reap => {
                                prop_assert!(before.lease_expired(now.now));
                                let owner = before.owner_run().unwrap_or_default().to_owned();
                                let release = ShadowCommand::Release { run_id: owner };
                                let as_release = decide(Some(&before), &release, now);
                                prop_assert_eq!(
                                    as_release.map(|d| d.change),
                                    Ok(Change::Put(next.clone()))
                                );
                            }
                            // Only the holder renews, only a leased hold, into the future.
                            ShadowCommand::Renew { run_id, .. } => {
                                prop_assert_eq!(before.owner_run(), Some(run_id.as_str()));
                                prop_assert!(next.lease_expires_at.is_some_and(|t| t > now.now));
                                let answered = matches!(outcome, ShadowOutcome::Renewed { version, .. } if version == next.version);
                                prop_assert!(answered, "RENEWED answers the written version");
                            }
                            _ => {}
                        }
                        rec = next;
                    }
                    Ok(_) => {
                        if matches!(cmd, ShadowCommand::Reap) {
                            prop_assert!(!before.lease_expired(now.now));
                        }
                    }
                    Err(_) => {}
                }
                // FREE <=> no owner; FREE => no lease, no pods; a lease <=> a length.
                prop_assert_eq!(rec.state == ShadowState::Free, rec.owner.is_none());
                if rec.state == ShadowState::Free {
                    prop_assert_eq!(rec.lease_expires_at, None);
                    prop_assert_eq!(rec.min_pod_count, 0);
                }
                let length = rec.owner.as_ref().and_then(|o| o.lease_seconds);
                prop_assert_eq!(length.is_some(), rec.lease_expires_at.is_some());
            }
            // Whatever happened, a reaper that runs after the lease ran out frees it.
            let late = at(now, 10);
            if rec.lease_expires_at.is_some() {
                let d = decide(Some(&rec), &ShadowCommand::Reap, late);
                let freed = matches!(d, Ok(Decision { change: Change::Put(ref n), .. }) if n.state == ShadowState::Free);
                prop_assert!(freed, "an expired lease is always reapable");
            }
        }
    }

    fn any_command() -> impl Strategy<Value = ShadowCommand> {
        let run = prop_oneof![Just("r1"), Just("r2"), Just("r3")].prop_map(String::from);
        let action = prop_oneof![
            Just(MinPodAction::Increase),
            Just(MinPodAction::Decrease),
            Just(MinPodAction::ResetTo0)
        ];
        prop_oneof![
            run.clone().prop_map(|r| ShadowCommand::Procure {
                run_id: r,
                plan: None,
                lease_seconds: None,
            }),
            run.clone()
                .prop_map(|r| ShadowCommand::Release { run_id: r }),
            (run, action, 0u32..20_000).prop_map(|(r, a, c)| ShadowCommand::MinPodCount {
                run_id: r,
                action: a,
                count: c
            }),
        ]
    }

    proptest! {
        #[test]
        fn no_sequence_reaches_an_illegal_state(cmds in prop::collection::vec(any_command(), 0..64)) {
            let mut rec = free();
            for cmd in &cmds {
                let before = rec.clone();
                match decide(Some(&rec), cmd, ctx()) {
                    Ok(Decision { change: Change::Put(next), outcome }) => {
                        // versions strictly increase on every state change
                        prop_assert!(next.version > before.version);
                        if let ShadowCommand::Release { run_id } = cmd {
                            // release only by the owner
                            prop_assert_eq!(before.owner_run(), Some(run_id.as_str()));
                            prop_assert_eq!(&outcome, &ShadowOutcome::Released);
                        }
                        rec = next;
                    }
                    Ok(Decision { change: Change::None, .. }) => {}
                    Ok(Decision { change: Change::Delete, .. }) => prop_assert!(false, "delete not issued"),
                    Err(_) => {}
                }
                // the invariant: FREE <=> no owner, and FREE => no pods requested
                prop_assert_eq!(rec.state == ShadowState::Free, rec.owner.is_none());
                if rec.state == ShadowState::Free {
                    prop_assert_eq!(rec.min_pod_count, 0);
                }
                prop_assert!(rec.min_pod_count <= MAX_MIN_POD_COUNT);
            }
        }
    }
}
