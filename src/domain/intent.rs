//! Watch intents: "tell me when this change has taken effect". An intent records the
//! change (its baselines), the condition awaited, the caller's callback and the
//! delivery's progress; it is also the callback's durable outbox entry. Pure functions
//! move it along.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::domain::callback::{AttemptOutcome, AttemptRecord, CallbackTarget};
use crate::domain::conditions::{Baseline, DesiredCondition, ResourceKind, Verdict};

/// Current schema version of stored intents.
pub const SCHEMA_VERSION: &str = "v1";

/// The operation that made the intent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Operation {
    /// `POST …/deployables`.
    CreateDeployable,
    /// `POST …/deployables/restart`.
    RestartDeployables,
    /// `POST …/models/load`.
    LoadModel,
    /// `POST …/jobs`.
    TriggerJob,
}

/// Where the intent stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum IntentStatus {
    /// Stored (with the idempotency record) before its Kubernetes action ran; the
    /// replica that stored it runs the action next, and the leader finishes (or fails)
    /// the ones left behind.
    Submitting,
    /// Waiting for the condition.
    Pending,
    /// The condition held.
    Succeeded,
    /// The condition can no longer hold.
    Failed,
    /// The deadline passed first.
    TimedOut,
}

/// The resource watched, as the caller sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchedResource {
    /// Kind.
    pub kind: ResourceKind,
    /// Namespace.
    pub namespace: String,
    /// Label selector of the objects involved.
    #[serde(alias = "labelSelector")]
    pub label_selector: Option<String>,
    /// Object name (none for "every Deployment in the namespace").
    pub name: Option<String>,
}

/// The caller's workflow coordinates, echoed in the callback.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkflowRef {
    /// Run id.
    #[serde(alias = "runId")]
    pub run_id: Option<String>,
    /// Plan.
    pub plan: Option<String>,
    /// Task id.
    #[serde(alias = "taskId")]
    pub task_id: Option<String>,
}

/// Progress of the callback delivery (the outbox entry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// `webhook-id`, stable across attempts.
    #[serde(alias = "webhookId")]
    pub webhook_id: String,
    /// Every attempt so far.
    pub attempts: Vec<AttemptRecord>,
    /// A 2xx was received.
    pub delivered: bool,
    /// No further attempt will be made.
    #[serde(alias = "gaveUp")]
    pub gave_up: bool,
    /// When the next attempt is due (none: now, once the intent is final).
    #[serde(alias = "nextAttemptAt")]
    #[serde(default, with = "crate::domain::time::option")]
    pub next_attempt_at: Option<DateTime<Utc>>,
}

/// A stored watch intent (`/watch-intents/{request_id}`). Keys are snake_case like the
/// rest of the API; the `alias`es decode records stored in camelCase by earlier releases.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchIntent {
    /// Always [`SCHEMA_VERSION`].
    #[serde(alias = "schemaVersion")]
    pub schema_version: String,
    /// Request id (also the key).
    #[serde(alias = "requestId")]
    pub request_id: String,
    /// Environment the request was made in.
    pub env: String,
    /// Operation.
    pub operation: Operation,
    /// What is watched.
    pub resource: WatchedResource,
    /// The condition awaited.
    #[serde(alias = "desiredCondition")]
    pub desired_condition: DesiredCondition,
    /// What the change left behind, so a condition true before it does not count.
    pub baselines: Vec<Baseline>,
    /// Where to call back.
    pub callback: CallbackTarget,
    /// The caller's workflow.
    pub workflow: WorkflowRef,
    /// Creation time.
    #[serde(alias = "createdAt")]
    #[serde(with = "crate::domain::time")]
    pub created_at: DateTime<Utc>,
    /// Past this the intent ends `TIMED_OUT`.
    #[serde(with = "crate::domain::time")]
    pub deadline: DateTime<Utc>,
    /// Status.
    pub status: IntentStatus,
    /// When the status became final.
    #[serde(alias = "observedAt")]
    #[serde(default, with = "crate::domain::time::option")]
    pub observed_at: Option<DateTime<Utc>>,
    /// Why it ended the way it did (or what is still missing).
    pub detail: Option<String>,
    /// Callback delivery.
    pub delivery: Delivery,
    /// While SUBMITTING: the Kubernetes action to run (idempotent by request id), in the
    /// shape the Kubernetes port defines (opaque here); dropped once it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submission: Option<serde_json::Value>,
    /// The W3C `traceparent` of the request that made the intent, stored only while
    /// traces are exported: each callback attempt continues that trace. Absent in
    /// records stored with traces off or by earlier releases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

impl WatchIntent {
    /// Whether the intent still waits for its condition.
    pub fn is_pending(&self) -> bool {
        self.status == IntentStatus::Pending
    }

    /// Whether the intent waits for its Kubernetes action to run.
    pub fn is_submitting(&self) -> bool {
        self.status == IntentStatus::Submitting
    }

    /// Whether the status is final (succeeded, failed or timed out).
    pub fn is_final(&self) -> bool {
        matches!(
            self.status,
            IntentStatus::Succeeded | IntentStatus::Failed | IntentStatus::TimedOut
        )
    }

    /// Whether a callback attempt is due at `now`.
    pub fn delivery_due(&self, now: DateTime<Utc>) -> bool {
        self.is_final()
            && !self.delivery.delivered
            && !self.delivery.gave_up
            && self.delivery.next_attempt_at.is_none_or(|t| t <= now)
    }

    /// The callback body: the same bytes for every attempt.
    pub fn callback_body(&self) -> Vec<u8> {
        let body = json!({
            "request_id": self.request_id,
            "operation": self.operation,
            "status": self.status,
            "resource": self.resource,
            "desired_condition": self.desired_condition,
            "workflow": self.workflow,
            "observed_at": self.observed_at.as_ref().map(crate::domain::time::format),
            "detail": self.detail,
        });
        serde_json::to_vec(&body).unwrap_or_default()
    }
}

/// The intent after a verdict: `None` while still pending (nothing to write).
pub fn conclude(
    intent: &WatchIntent,
    verdict: &Verdict,
    now: DateTime<Utc>,
) -> Option<WatchIntent> {
    if !intent.is_pending() {
        return None;
    }
    let (status, detail) = match verdict {
        Verdict::Pending { .. } if now >= intent.deadline => (
            IntentStatus::TimedOut,
            Some(format!("condition not met before {}", intent.deadline)),
        ),
        Verdict::Pending { .. } => return None,
        Verdict::Satisfied => (IntentStatus::Succeeded, None),
        Verdict::Failed { reason } => (IntentStatus::Failed, Some(reason.clone())),
    };
    let mut next = intent.clone();
    next.status = status;
    next.detail = detail;
    next.observed_at = Some(now);
    next.delivery.next_attempt_at = None;
    Some(next)
}

/// The intent once its action ran: PENDING with the action's baselines (`None` unless it
/// was SUBMITTING).
pub fn submitted(intent: &WatchIntent, baselines: Vec<Baseline>) -> Option<WatchIntent> {
    if !intent.is_submitting() {
        return None;
    }
    let mut next = intent.clone();
    next.status = IntentStatus::Pending;
    next.baselines = baselines;
    next.submission = None;
    Some(next)
}

/// The intent when its action cannot be carried out: FAILED with `reason`, its callback
/// due now (`None` unless it was SUBMITTING).
pub fn submission_failed(
    intent: &WatchIntent,
    reason: &str,
    now: DateTime<Utc>,
) -> Option<WatchIntent> {
    if !intent.is_submitting() {
        return None;
    }
    let mut next = intent.clone();
    next.status = IntentStatus::Failed;
    next.detail = Some(reason.to_owned());
    next.observed_at = Some(now);
    next.delivery.next_attempt_at = None;
    next.submission = None;
    Some(next)
}

/// The intent after one delivery attempt; `next_in` is the wait before another attempt
/// (none: the delivery is over).
pub fn record_attempt(
    intent: &WatchIntent,
    outcome: &AttemptOutcome,
    now: DateTime<Utc>,
    next_in: Option<std::time::Duration>,
) -> WatchIntent {
    let mut next = intent.clone();
    let n = u32::try_from(next.delivery.attempts.len())
        .unwrap_or(u32::MAX)
        .saturating_add(1);
    next.delivery
        .attempts
        .push(AttemptRecord::new(n, now, outcome));
    next.delivery.delivered = outcome.is_delivered();
    next.delivery.gave_up = !next.delivery.delivered && next_in.is_none();
    next.delivery.next_attempt_at = match next_in {
        Some(d) if !next.delivery.delivered => {
            Some(now + chrono::Duration::from_std(d).unwrap_or_default())
        }
        _ => None,
    };
    next
}

#[cfg(test)]
mod tests {
    use super::*;

    fn intent(now: DateTime<Utc>) -> WatchIntent {
        WatchIntent {
            schema_version: SCHEMA_VERSION.into(),
            request_id: "r1".into(),
            env: "int".into(),
            operation: Operation::TriggerJob,
            resource: WatchedResource {
                kind: ResourceKind::Job,
                namespace: "int".into(),
                label_selector: Some("name=j".into()),
                name: Some("j".into()),
            },
            desired_condition: DesiredCondition::JobComplete,
            baselines: vec![Baseline::new(ResourceKind::Job, "int", "j")],
            callback: CallbackTarget::post("https://example.com/cb"),
            workflow: WorkflowRef::default(),
            created_at: now,
            deadline: now + chrono::Duration::seconds(60),
            status: IntentStatus::Pending,
            observed_at: None,
            detail: None,
            delivery: Delivery {
                webhook_id: "msg_r1".into(),
                attempts: Vec::new(),
                delivered: false,
                gave_up: false,
                next_attempt_at: None,
            },
            submission: None,
            traceparent: None,
        }
    }

    /// Every object key in `v`, recursively, with its path.
    fn keys(v: &serde_json::Value, at: &str, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => m.iter().for_each(|(k, v)| {
                out.push(format!("{at}.{k}"));
                keys(v, &format!("{at}.{k}"), out);
            }),
            serde_json::Value::Array(a) => a.iter().for_each(|v| keys(v, at, out)),
            _ => {}
        }
    }

    fn camel_keys(v: &serde_json::Value) -> Vec<String> {
        let mut all = Vec::new();
        keys(v, "", &mut all);
        all.retain(|k| k.chars().any(|c| c.is_ascii_uppercase()));
        all
    }

    #[test]
    fn intents_and_callback_bodies_are_snake_case() {
        let now = crate::clock::utc_now();
        let mut i = intent(now);
        i.workflow = WorkflowRef {
            run_id: Some("r".into()),
            plan: Some("p".into()),
            task_id: Some("t".into()),
        };
        i.baselines[0].label_selector = Some("name=j".into());
        i.baselines[0].template_annotation = Some("a".into());
        i.baselines[0].template_hash = Some("h".into());
        i.delivery.next_attempt_at = Some(now);
        i.observed_at = Some(now);
        let stored = serde_json::to_value(&i).unwrap_or_default();
        assert_eq!(camel_keys(&stored), Vec::<String>::new(), "{stored}");
        assert_eq!(stored["request_id"], "r1");
        let body: serde_json::Value =
            serde_json::from_slice(&i.callback_body()).unwrap_or_default();
        assert_eq!(camel_keys(&body), Vec::<String>::new(), "{body}");
        assert_eq!(body["request_id"], "r1");
        assert_eq!(body["desired_condition"], "JobComplete");
        assert_eq!(body["workflow"]["run_id"], "r");
    }

    #[test]
    fn intents_stored_with_camel_case_keys_still_decode() {
        // The format records had before the snake_case contract; etcd still holds some.
        let old = serde_json::json!({
            "schemaVersion": "v1", "requestId": "r1", "env": "int", "operation": "TRIGGER_JOB",
            "resource": {"kind": "Job", "namespace": "int", "labelSelector": "name=j", "name": "j"},
            "desiredCondition": "JobComplete",
            "baselines": [{"kind": "Job", "namespace": "int", "name": "j",
                "labelSelector": "name=j", "templateAnnotation": "a", "templateHash": "h"}],
            "callback": {"url": "https://example.com/cb"},
            "workflow": {"runId": "r", "plan": "p", "taskId": "t"},
            "createdAt": "2026-01-10T14:20:00Z", "deadline": "2026-01-10T14:21:00Z",
            "status": "PENDING", "observedAt": "2026-01-10T14:20:30.5+00:00", "detail": null,
            "delivery": {"webhookId": "msg_r1", "attempts": [], "delivered": false,
                "gaveUp": true, "nextAttemptAt": "2026-01-10T14:20:40Z"}
        });
        let i: WatchIntent = match serde_json::from_value(old) {
            Ok(i) => i,
            Err(e) => panic!("old record does not decode: {e}"),
        };
        assert_eq!(i.request_id, "r1");
        assert_eq!(i.schema_version, "v1");
        assert_eq!(i.desired_condition, DesiredCondition::JobComplete);
        assert_eq!(i.resource.label_selector.as_deref(), Some("name=j"));
        assert_eq!(i.baselines[0].template_hash.as_deref(), Some("h"));
        assert_eq!(i.baselines[0].template_annotation.as_deref(), Some("a"));
        assert_eq!(i.baselines[0].label_selector.as_deref(), Some("name=j"));
        assert_eq!(i.workflow.run_id.as_deref(), Some("r"));
        assert_eq!(i.workflow.task_id.as_deref(), Some("t"));
        assert_eq!(i.delivery.webhook_id, "msg_r1");
        assert!(i.delivery.gave_up);
        assert!(i.delivery.next_attempt_at.is_some() && i.observed_at.is_some());
        assert_eq!(i.created_at.to_rfc3339(), "2026-01-10T14:20:00+00:00");
        assert_eq!(i.traceparent, None, "a record without one has none");
    }

    #[test]
    fn submitting_intents_become_pending_or_fail_and_only_then_call_back() {
        let now = crate::clock::utc_now();
        let mut i = intent(now);
        i.status = IntentStatus::Submitting;
        i.baselines.clear();
        i.submission = Some(json!({"type": "CREATE_JOB"}));
        assert!(!i.delivery_due(now), "no callback before the action ran");
        assert_eq!(conclude(&i, &Verdict::Satisfied, now), None);
        let b = vec![Baseline::new(ResourceKind::Job, "int", "j")];
        let p = submitted(&i, b.clone()).expect("pending");
        assert_eq!(
            (p.status, p.baselines.clone(), p.submission.clone()),
            (IntentStatus::Pending, b.clone(), None)
        );
        assert_eq!(submitted(&p, b), None, "only from SUBMITTING");
        let f = submission_failed(&i, "forbidden", now).expect("failed");
        assert_eq!(
            (f.status, f.detail.as_deref()),
            (IntentStatus::Failed, Some("forbidden"))
        );
        assert!(f.delivery_due(now));
        let text = serde_json::to_string(&i).expect("json");
        assert!(text.contains("\"status\":\"SUBMITTING\""), "{text}");
        assert!(
            !text.contains("traceparent"),
            "written only when there is one: {text}"
        );
        let back: WatchIntent = serde_json::from_str(&text).expect("decode");
        assert_eq!(back, i);
        i.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
        let text = serde_json::to_string(&i).expect("json");
        let back: WatchIntent = serde_json::from_str(&text).expect("decode");
        assert_eq!(back.traceparent, i.traceparent);
    }

    #[test]
    fn verdicts_conclude_and_deadlines_time_out() {
        let now = crate::clock::utc_now();
        let i = intent(now);
        let pending = Verdict::Pending { reason: "x".into() };
        assert_eq!(conclude(&i, &pending, now), None);
        let done = conclude(&i, &Verdict::Satisfied, now).expect("final");
        assert_eq!(done.status, IntentStatus::Succeeded);
        assert!(done.delivery_due(now));
        assert_eq!(
            conclude(&done, &Verdict::Satisfied, now),
            None,
            "final is final"
        );
        let late = conclude(&i, &pending, now + chrono::Duration::seconds(61)).expect("timeout");
        assert_eq!(late.status, IntentStatus::TimedOut);
        let failed = conclude(
            &i,
            &Verdict::Failed {
                reason: "job failed".into(),
            },
            now,
        )
        .expect("f");
        assert_eq!(
            (failed.status, failed.detail.as_deref()),
            (IntentStatus::Failed, Some("job failed"))
        );
    }

    #[test]
    fn attempts_schedule_retries_and_end_deliveries() {
        let now = crate::clock::utc_now();
        let done = conclude(&intent(now), &Verdict::Satisfied, now).expect("final");
        let failed = record_attempt(
            &done,
            &AttemptOutcome::HttpError { status: 503 },
            now,
            Some(std::time::Duration::from_secs(2)),
        );
        assert!(!failed.delivery_due(now));
        assert!(failed.delivery_due(now + chrono::Duration::seconds(2)));
        let ok = record_attempt(
            &failed,
            &AttemptOutcome::Delivered { status: 200 },
            now,
            None,
        );
        assert!(ok.delivery.delivered && !ok.delivery.gave_up && !ok.delivery_due(now));
        assert_eq!(ok.delivery.attempts.len(), 2);
        let stop = record_attempt(
            &failed,
            &AttemptOutcome::HttpError { status: 400 },
            now,
            None,
        );
        assert!(stop.delivery.gave_up && !stop.delivery_due(now));
        assert_eq!(
            done.callback_body(),
            ok.callback_body(),
            "body stable across attempts"
        );
    }
}
