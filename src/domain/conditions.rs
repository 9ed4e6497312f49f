//! Readiness conditions: the normalized view of Kubernetes objects a watcher needs, and
//! the pure judgement "has the change we made taken effect?".
//!
//! Everything here is plain data and pure functions, so a watcher can be tested on
//! recorded objects. The Kubernetes adapter converts `k8s-openapi` objects into
//! [`ObjectStatus`]; the simulated cluster builds them directly.
//!
//! The central rule: a condition that was already true *before* our change must not
//! count. Every action returns a [`Baseline`] captured from the API server's answer to
//! the change (the `metadata.generation` it produced, the pod-template annotation value
//! it wrote, the object's uid), and [`evaluate`] only answers [`Verdict::Satisfied`] once
//! the controllers have observed that generation and the pods carry that annotation.
//! An object that does not exist (yet) is [`Verdict::Pending`], never an error: deadlines
//! are the watcher's business.

use std::collections::BTreeMap;
use std::fmt;

use chrono::DateTime;
use serde::{Deserialize, Serialize};

/// The Kubernetes kinds the resource plane acts on and watches.
///
/// Serialized with the Kubernetes kind name (`"Deployment"`, `"Job"`, `"Pod"`,
/// `"HorizontalPodAutoscaler"`), as stored in a watch intent's `resource.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ResourceKind {
    /// `apps/v1` Deployment.
    Deployment,
    /// `batch/v1` Job.
    Job,
    /// `v1` Pod.
    Pod,
    /// `autoscaling/v2` HorizontalPodAutoscaler.
    HorizontalPodAutoscaler,
}

impl ResourceKind {
    /// Every kind, in declaration order.
    pub const ALL: [ResourceKind; 4] = [
        ResourceKind::Deployment,
        ResourceKind::Job,
        ResourceKind::Pod,
        ResourceKind::HorizontalPodAutoscaler,
    ];

    /// The Kubernetes kind name.
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceKind::Deployment => "Deployment",
            ResourceKind::Job => "Job",
            ResourceKind::Pod => "Pod",
            ResourceKind::HorizontalPodAutoscaler => "HorizontalPodAutoscaler",
        }
    }
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a watcher needs to judge "done" against the state captured when the action was
/// taken. Returned by every `KubeExecutor` action and stored in the watch intent
/// (serialized in snake_case, the camelCase keys of older records accepted; absent
/// options are omitted).
///
/// `kind` is the kind whose objects decide the verdict:
/// - `Deployment`: the Deployment `name` (create, restart);
/// - `Pod`: the pods matching `label_selector`, which belong to the Deployment `name`
///   (model load). The Deployment is consulted too, for its replica count;
/// - `Job`: the Job `name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Baseline {
    /// Kind whose objects decide the verdict.
    pub kind: ResourceKind,
    /// Namespace of every object involved.
    pub namespace: String,
    /// The object changed by the action (for `Pod` baselines: the owning Deployment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Equality-based label selector of the pods involved (`k=v,k2=v2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(alias = "labelSelector")]
    pub label_selector: Option<String>,
    /// `metadata.generation` the API server answered our change with; the controller
    /// must have observed at least this generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    /// `metadata.uid` of the object `name`: an object recreated under the same name is
    /// a different object and does not count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// Pod-template annotation key our change wrote (e.g.
    /// `kubectl.kubernetes.io/restartedAt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(alias = "templateAnnotation")]
    pub template_annotation: Option<String>,
    /// The value written under `template_annotation`; pods carrying it (or, for
    /// RFC 3339 timestamps, a later one) run the new template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(alias = "templateHash")]
    pub template_hash: Option<String>,
}

impl Baseline {
    /// A baseline for the object `name` of `kind` in `namespace`, with nothing captured.
    pub fn new(kind: ResourceKind, namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            kind,
            namespace: namespace.into(),
            name: Some(name.into()),
            label_selector: None,
            generation: None,
            uid: None,
            template_annotation: None,
            template_hash: None,
        }
    }

    /// The kinds a watcher must subscribe to (in this baseline's namespace) to see every
    /// object [`evaluate`] consults.
    pub fn watched_kinds(&self) -> &'static [ResourceKind] {
        match self.kind {
            ResourceKind::Pod => &[ResourceKind::Deployment, ResourceKind::Pod],
            ResourceKind::Deployment => &[ResourceKind::Deployment],
            ResourceKind::Job => &[ResourceKind::Job],
            ResourceKind::HorizontalPodAutoscaler => &[ResourceKind::HorizontalPodAutoscaler],
        }
    }

    /// Whether `object` is one [`evaluate`] consults for this baseline; a watcher uses
    /// it to ignore the other objects on the shared per-kind event stream.
    pub fn is_relevant(&self, object: &ObjectStatus) -> bool {
        if object.namespace != self.namespace {
            return false;
        }
        match object.kind() {
            ResourceKind::Pod => {
                self.kind == ResourceKind::Pod
                    && self
                        .label_selector
                        .as_deref()
                        .is_some_and(|s| selector_matches(s, &object.labels))
            }
            kind => {
                let kind_matches = kind == self.kind
                    || (self.kind == ResourceKind::Pod && kind == ResourceKind::Deployment);
                kind_matches && self.name.as_deref() == Some(object.name.as_str())
            }
        }
    }
}

/// The truth value of a Kubernetes condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Truth {
    /// `"True"`.
    True,
    /// `"False"`.
    False,
    /// `"Unknown"` (or anything unrecognized).
    Unknown,
}

impl Truth {
    /// Parses a condition's `status` string.
    pub fn parse(status: &str) -> Self {
        match status {
            "True" => Truth::True,
            "False" => Truth::False,
            _ => Truth::Unknown,
        }
    }
}

/// One condition of an object's status (`Available`, `Progressing`, `Complete`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Status of the condition.
    pub status: Truth,
    /// Machine-readable reason, e.g. `ProgressDeadlineExceeded`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human-readable message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl Condition {
    /// A condition with `status` and `reason` and no message.
    pub fn new(status: Truth, reason: &str) -> Self {
        Self {
            status,
            reason: Some(reason.to_string()),
            message: None,
        }
    }

    fn is_true(&self) -> bool {
        self.status == Truth::True
    }

    fn describe(&self) -> String {
        match (&self.reason, &self.message) {
            (Some(r), Some(m)) => format!("{r}: {m}"),
            (Some(r), None) => r.clone(),
            (None, Some(m)) => m.clone(),
            (None, None) => "no reason given".to_string(),
        }
    }
}

/// Normalized Deployment spec and status.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentStatus {
    /// `spec.replicas` (Kubernetes defaults it to 1).
    pub replicas: i32,
    /// `status.observedGeneration`.
    pub observed_generation: Option<i64>,
    /// `status.replicas`: pods of every revision.
    pub status_replicas: i32,
    /// `status.updatedReplicas`: pods on the current template.
    pub updated_replicas: i32,
    /// `status.readyReplicas`.
    pub ready_replicas: i32,
    /// `status.availableReplicas`.
    pub available_replicas: i32,
    /// The `Available` condition.
    pub available: Option<Condition>,
    /// The `Progressing` condition.
    pub progressing: Option<Condition>,
    /// `spec.template.metadata.annotations`.
    pub template_annotations: BTreeMap<String, String>,
    /// `spec.selector.matchLabels` rendered as an equality-based selector.
    pub selector: Option<String>,
}

/// Normalized Pod status.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    /// `status.phase` (`Pending`, `Running`, `Succeeded`, `Failed`, `Unknown`).
    pub phase: Option<String>,
    /// The `Ready` condition is `True`.
    pub ready: bool,
    /// The first container's waiting reason (e.g. `CrashLoopBackOff`), for diagnostics.
    pub waiting_reason: Option<String>,
}

/// Normalized Job status.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobStatus {
    /// The `Complete` condition.
    pub complete: Option<Condition>,
    /// The `Failed` condition.
    pub failed: Option<Condition>,
    /// `status.active`.
    pub active: i32,
    /// `status.succeeded`.
    pub succeeded: i32,
    /// `status.failed` (failed pods).
    pub failed_pods: i32,
}

/// Normalized HorizontalPodAutoscaler spec and status.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HpaStatus {
    /// `spec.minReplicas`.
    pub min_replicas: Option<i32>,
    /// `spec.maxReplicas`.
    pub max_replicas: i32,
    /// `status.currentReplicas`.
    pub current_replicas: Option<i32>,
    /// `status.desiredReplicas`.
    pub desired_replicas: i32,
}

/// The kind-specific part of an [`ObjectStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum StatusDetail {
    /// A Deployment.
    Deployment(DeploymentStatus),
    /// A Pod.
    Pod(PodStatus),
    /// A Job.
    Job(JobStatus),
    /// A HorizontalPodAutoscaler.
    HorizontalPodAutoscaler(HpaStatus),
}

/// One Kubernetes object, reduced to what conditions are judged on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectStatus {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.uid`.
    pub uid: Option<String>,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// `metadata.annotations` (for a Pod: copied from the template it was made from).
    pub annotations: BTreeMap<String, String>,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// `metadata.deletionTimestamp` is set.
    pub deleting: bool,
    /// Kind-specific spec and status.
    pub detail: StatusDetail,
}

impl ObjectStatus {
    /// The object's kind.
    pub fn kind(&self) -> ResourceKind {
        match self.detail {
            StatusDetail::Deployment(_) => ResourceKind::Deployment,
            StatusDetail::Pod(_) => ResourceKind::Pod,
            StatusDetail::Job(_) => ResourceKind::Job,
            StatusDetail::HorizontalPodAutoscaler(_) => ResourceKind::HorizontalPodAutoscaler,
        }
    }

    /// Whether this is the same object (kind, namespace, name) as `other`.
    pub fn same_object(&self, other: &ObjectStatus) -> bool {
        self.kind() == other.kind() && self.namespace == other.namespace && self.name == other.name
    }
}

/// A change seen on a shared per-kind watch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ObjectEvent {
    /// The object was created or changed (or re-listed after the watch restarted).
    Applied(ObjectStatus),
    /// The object is gone; this is its last known state.
    Deleted(ObjectStatus),
}

impl ObjectEvent {
    /// The object the event is about.
    pub fn object(&self) -> &ObjectStatus {
        match self {
            ObjectEvent::Applied(o) | ObjectEvent::Deleted(o) => o,
        }
    }

    /// The object's kind.
    pub fn kind(&self) -> ResourceKind {
        self.object().kind()
    }

    /// The object's namespace.
    pub fn namespace(&self) -> &str {
        &self.object().namespace
    }

    /// The object's name.
    pub fn name(&self) -> &str {
        &self.object().name
    }

    /// The object's labels.
    pub fn labels(&self) -> &BTreeMap<String, String> {
        &self.object().labels
    }
}

/// The current state of the objects relevant to one baseline: the result of a
/// `KubeExecutor::observe`, kept up to date by a watcher with [`Observation::apply`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observation {
    /// The objects, at most one per (kind, namespace, name).
    pub objects: Vec<ObjectStatus>,
}

impl Observation {
    /// An observation of `objects`.
    pub fn new(objects: Vec<ObjectStatus>) -> Self {
        Self { objects }
    }

    /// Folds one watch event in: upserts an applied object, drops a deleted one.
    pub fn apply(&mut self, event: &ObjectEvent) {
        let object = event.object();
        self.objects.retain(|o| !o.same_object(object));
        if let ObjectEvent::Applied(o) = event {
            self.objects.push(o.clone());
        }
    }
}

/// The condition a watch intent waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DesiredCondition {
    /// The Deployment is `Available` on the new generation: the controller observed it,
    /// every desired replica is updated and available.
    Available,
    /// `kubectl rollout status` semantics: as `Available`, and no old replicas remain.
    RolloutComplete,
    /// Every live pod of the deployable runs the new template and is Ready, and there
    /// are as many as the Deployment wants.
    PodsReadyOnNewTemplate,
    /// The Job has the `Complete` condition; `Failed` ends the watch as a failure.
    JobComplete,
}

/// The judgement of a condition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// Not there yet; `reason` says what is missing.
    Pending {
        /// What is still missing.
        reason: String,
    },
    /// The condition holds for the change that was made.
    Satisfied,
    /// The condition can no longer be reached (job failed, rollout stalled).
    Failed {
        /// Why.
        reason: String,
    },
}

impl Verdict {
    /// Whether the watch is over (satisfied or failed).
    pub fn is_final(&self) -> bool {
        !matches!(self, Verdict::Pending { .. })
    }

    fn pending(reason: impl Into<String>) -> Self {
        Verdict::Pending {
            reason: reason.into(),
        }
    }

    fn failed(reason: impl Into<String>) -> Self {
        Verdict::Failed {
            reason: reason.into(),
        }
    }
}

/// Judges `desired` for the change described by `baseline`, on the `observed` objects.
///
/// `observed` may hold unrelated objects; only the ones [`Baseline::is_relevant`]
/// accepts (and of the right kind) are consulted.
pub fn evaluate(
    baseline: &Baseline,
    desired: DesiredCondition,
    observed: &[ObjectStatus],
) -> Verdict {
    match desired {
        DesiredCondition::Available => deployment_verdict(baseline, observed, false),
        DesiredCondition::RolloutComplete => deployment_verdict(baseline, observed, true),
        DesiredCondition::PodsReadyOnNewTemplate => pods_verdict(baseline, observed),
        DesiredCondition::JobComplete => job_verdict(baseline, observed),
    }
}

/// Judges one condition over several baselines (a restart of every Deployment in a
/// namespace): failed if any failed, satisfied when all are, pending otherwise. An empty
/// list is satisfied.
pub fn evaluate_all(
    baselines: &[Baseline],
    desired: DesiredCondition,
    observed: &[ObjectStatus],
) -> Verdict {
    let mut pending = None;
    for baseline in baselines {
        match evaluate(baseline, desired, observed) {
            Verdict::Satisfied => {}
            failed @ Verdict::Failed { .. } => return failed,
            p @ Verdict::Pending { .. } => {
                pending.get_or_insert(p);
            }
        }
    }
    pending.unwrap_or(Verdict::Satisfied)
}

/// The object `baseline.name` of `kind`, unless it was replaced (different uid).
fn find_named<'a>(
    baseline: &Baseline,
    kind: ResourceKind,
    observed: &'a [ObjectStatus],
) -> Option<&'a ObjectStatus> {
    let name = baseline.name.as_deref()?;
    observed.iter().find(|o| {
        o.kind() == kind
            && o.namespace == baseline.namespace
            && o.name == name
            && match (&baseline.uid, &o.uid) {
                (Some(want), Some(have)) => want == have,
                _ => true,
            }
    })
}

/// Checks the deployment controller has seen our change (and anything after it).
fn generation_observed(
    baseline: &Baseline,
    object: &ObjectStatus,
    d: &DeploymentStatus,
) -> Option<Verdict> {
    let wanted = baseline.generation.max(object.generation).unwrap_or(0);
    let seen = d.observed_generation.unwrap_or(0);
    (seen < wanted).then(|| {
        Verdict::pending(format!(
            "deployment {}/{} generation {wanted} not yet observed by the controller (observed {seen})",
            object.namespace, object.name
        ))
    })
}

fn deployment_verdict(baseline: &Baseline, observed: &[ObjectStatus], complete: bool) -> Verdict {
    let Some(name) = baseline.name.as_deref() else {
        return Verdict::failed("baseline names no deployment");
    };
    let Some(object) = find_named(baseline, ResourceKind::Deployment, observed) else {
        return Verdict::pending(format!(
            "deployment {}/{name} does not exist yet",
            baseline.namespace
        ));
    };
    let StatusDetail::Deployment(d) = &object.detail else {
        return Verdict::failed("object is not a deployment");
    };
    if object.deleting {
        return Verdict::pending(format!(
            "deployment {}/{name} is being deleted",
            baseline.namespace
        ));
    }
    if let Some(pending) = generation_observed(baseline, object, d) {
        return pending;
    }
    if let Some(p) = &d.progressing {
        if p.status == Truth::False && p.reason.as_deref() == Some("ProgressDeadlineExceeded") {
            return Verdict::failed(format!(
                "rollout of deployment {}/{name} stalled: {}",
                baseline.namespace,
                p.describe()
            ));
        }
    }
    let want = d.replicas;
    if d.updated_replicas < want {
        return Verdict::pending(format!("{} of {want} replicas updated", d.updated_replicas));
    }
    if complete && d.status_replicas > d.updated_replicas {
        return Verdict::pending(format!(
            "{} old replicas pending termination",
            d.status_replicas - d.updated_replicas
        ));
    }
    if d.available_replicas < want {
        return Verdict::pending(format!(
            "{} of {want} updated replicas available",
            d.available_replicas
        ));
    }
    if !complete {
        if let Some(a) = d.available.as_ref().filter(|a| !a.is_true()) {
            return Verdict::pending(format!("deployment not available: {}", a.describe()));
        }
    }
    Verdict::Satisfied
}

/// Whether a pod's template annotation value is the one written by our change or a
/// later one (RFC 3339 timestamps compare by time, anything else must be equal).
fn on_new_template(have: Option<&String>, want: &str) -> bool {
    let Some(have) = have else {
        return false;
    };
    if have == want {
        return true;
    }
    match (
        DateTime::parse_from_rfc3339(have),
        DateTime::parse_from_rfc3339(want),
    ) {
        (Ok(h), Ok(w)) => h >= w,
        _ => false,
    }
}

fn pods_verdict(baseline: &Baseline, observed: &[ObjectStatus]) -> Verdict {
    let (Some(key), Some(want)) = (
        baseline.template_annotation.as_deref(),
        baseline.template_hash.as_deref(),
    ) else {
        return Verdict::failed("baseline carries no pod-template annotation to compare pods with");
    };
    let mut desired = None;
    if let Some(object) = find_named(baseline, ResourceKind::Deployment, observed) {
        if let StatusDetail::Deployment(d) = &object.detail {
            if object.deleting {
                return Verdict::pending(format!(
                    "deployment {}/{} is being deleted",
                    object.namespace, object.name
                ));
            }
            if let Some(pending) = generation_observed(baseline, object, d) {
                return pending;
            }
            desired = Some(d.replicas);
        }
    }
    // Terminating pods are leaving the endpoints already, and pods that ran to an end
    // (evicted, completed) are not serving; neither is "the deployable's pods".
    let live: Vec<&ObjectStatus> = observed
        .iter()
        .filter(|o| o.kind() == ResourceKind::Pod && baseline.is_relevant(o) && !o.deleting)
        .filter(|o| match &o.detail {
            StatusDetail::Pod(p) => !matches!(p.phase.as_deref(), Some("Succeeded" | "Failed")),
            _ => false,
        })
        .collect();
    let (new, old): (Vec<&ObjectStatus>, Vec<&ObjectStatus>) = live
        .into_iter()
        .partition(|o| on_new_template(o.annotations.get(key), want));
    if !old.is_empty() {
        return Verdict::pending(format!("{} pods still on the previous template", old.len()));
    }
    let ready = |o: &ObjectStatus| matches!(&o.detail, StatusDetail::Pod(p) if p.ready);
    let ready_count = i32::try_from(new.iter().filter(|o| ready(o)).count()).unwrap_or(i32::MAX);
    let needed = desired.unwrap_or(1);
    if let Some(unready) = new.iter().find(|o| !ready(o)) {
        let why = match &unready.detail {
            StatusDetail::Pod(PodStatus {
                waiting_reason: Some(r),
                ..
            }) => format!(" (pod {}: {r})", unready.name),
            _ => String::new(),
        };
        return Verdict::pending(format!(
            "{ready_count} of {} pods on the new template ready{why}",
            new.len()
        ));
    }
    if ready_count < needed {
        return Verdict::pending(format!(
            "{ready_count} of {needed} pods ready on the new template"
        ));
    }
    Verdict::Satisfied
}

fn job_verdict(baseline: &Baseline, observed: &[ObjectStatus]) -> Verdict {
    let Some(name) = baseline.name.as_deref() else {
        return Verdict::failed("baseline names no job");
    };
    let Some(object) = find_named(baseline, ResourceKind::Job, observed) else {
        return Verdict::pending(format!(
            "job {}/{name} does not exist yet",
            baseline.namespace
        ));
    };
    let StatusDetail::Job(j) = &object.detail else {
        return Verdict::failed("object is not a job");
    };
    if let Some(f) = j.failed.as_ref().filter(|c| c.is_true()) {
        return Verdict::failed(format!(
            "job {}/{name} failed: {}",
            baseline.namespace,
            f.describe()
        ));
    }
    if j.complete.as_ref().is_some_and(Condition::is_true) {
        return Verdict::Satisfied;
    }
    Verdict::pending(format!(
        "job {}/{name} running: {} active, {} succeeded, {} failed",
        baseline.namespace, j.active, j.succeeded, j.failed_pods
    ))
}

/// Whether `labels` satisfy a label selector. Supports the equality-based (`k=v`,
/// `k==v`, `k!=v`), existence (`k`, `!k`) and set-based (`k in (a,b)`, `k notin (a)`)
/// requirements, comma-separated; an empty selector matches everything. A requirement
/// that cannot be parsed matches nothing.
pub fn selector_matches(selector: &str, labels: &BTreeMap<String, String>) -> bool {
    split_requirements(selector)
        .iter()
        .all(|r| requirement_matches(r.trim(), labels))
}

fn split_requirements(selector: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&selector[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&selector[start..]);
    parts.into_iter().filter(|p| !p.trim().is_empty()).collect()
}

fn requirement_matches(req: &str, labels: &BTreeMap<String, String>) -> bool {
    if let Some((k, v)) = req.split_once("!=") {
        return labels.get(k.trim()).map(String::as_str) != Some(v.trim());
    }
    if let Some((k, v)) = req.split_once("==").or_else(|| req.split_once('=')) {
        return labels.get(k.trim()).map(String::as_str) == Some(v.trim());
    }
    let set = |rest: &str| -> Option<Vec<String>> {
        let inner = rest.trim().strip_prefix('(')?.strip_suffix(')')?;
        Some(inner.split(',').map(|s| s.trim().to_string()).collect())
    };
    if let Some((k, rest)) = req.split_once(" notin ") {
        return match set(rest) {
            Some(values) => labels.get(k.trim()).is_none_or(|v| !values.contains(v)),
            None => false,
        };
    }
    if let Some((k, rest)) = req.split_once(" in ") {
        return match set(rest) {
            Some(values) => labels.get(k.trim()).is_some_and(|v| values.contains(v)),
            None => false,
        };
    }
    if let Some(k) = req.strip_prefix('!') {
        return !labels.contains_key(k.trim());
    }
    !req.is_empty() && !req.contains(char::is_whitespace) && labels.contains_key(req)
}

/// Renders `matchLabels` as an equality-based selector (`k=v,k2=v2`, sorted by key).
pub fn selector_from_labels(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn deployment(
        generation: i64,
        observed: i64,
        replicas: i32,
        updated: i32,
        available: i32,
    ) -> ObjectStatus {
        ObjectStatus {
            namespace: "int".into(),
            name: "web".into(),
            uid: Some("u-1".into()),
            labels: labels(&[("name", "web")]),
            annotations: BTreeMap::new(),
            generation: Some(generation),
            deleting: false,
            detail: StatusDetail::Deployment(DeploymentStatus {
                replicas,
                observed_generation: Some(observed),
                status_replicas: updated,
                updated_replicas: updated,
                ready_replicas: available,
                available_replicas: available,
                available: Some(Condition::new(
                    if available >= replicas {
                        Truth::True
                    } else {
                        Truth::False
                    },
                    "MinimumReplicasAvailable",
                )),
                progressing: Some(Condition::new(Truth::True, "NewReplicaSetAvailable")),
                template_annotations: BTreeMap::new(),
                selector: Some("name=web".into()),
            }),
        }
    }

    fn pod(name: &str, stamp: &str, ready: bool) -> ObjectStatus {
        ObjectStatus {
            namespace: "int".into(),
            name: name.into(),
            uid: None,
            labels: labels(&[("name", "web")]),
            annotations: labels(&[("resource-plane/model-loaded-at", stamp)]),
            generation: None,
            deleting: false,
            detail: StatusDetail::Pod(PodStatus {
                phase: Some("Running".into()),
                ready,
                waiting_reason: None,
            }),
        }
    }

    fn baseline(generation: i64) -> Baseline {
        Baseline {
            generation: Some(generation),
            uid: Some("u-1".into()),
            ..Baseline::new(ResourceKind::Deployment, "int", "web")
        }
    }

    fn pods_baseline(stamp: &str) -> Baseline {
        Baseline {
            kind: ResourceKind::Pod,
            label_selector: Some("name=web".into()),
            template_annotation: Some("resource-plane/model-loaded-at".into()),
            template_hash: Some(stamp.into()),
            ..baseline(3)
        }
    }

    #[test]
    fn already_available_before_the_change_is_pending() {
        let v = evaluate(
            &baseline(3),
            DesiredCondition::Available,
            &[deployment(3, 2, 2, 2, 2)],
        );
        assert!(
            matches!(v, Verdict::Pending { ref reason } if reason.contains("generation 3")),
            "{v:?}"
        );
    }

    #[test]
    fn available_on_new_generation_is_satisfied() {
        let v = evaluate(
            &baseline(3),
            DesiredCondition::Available,
            &[deployment(3, 3, 2, 2, 2)],
        );
        assert_eq!(v, Verdict::Satisfied);
    }

    #[test]
    fn recreated_object_with_other_uid_does_not_count() {
        let mut d = deployment(3, 3, 2, 2, 2);
        d.uid = Some("u-2".into());
        let v = evaluate(&baseline(3), DesiredCondition::Available, &[d]);
        assert!(matches!(v, Verdict::Pending { .. }));
    }

    #[test]
    fn rollout_waits_for_old_replicas() {
        let mut d = deployment(3, 3, 2, 2, 2);
        if let StatusDetail::Deployment(s) = &mut d.detail {
            s.status_replicas = 3;
        }
        let v = evaluate(
            &baseline(3),
            DesiredCondition::RolloutComplete,
            std::slice::from_ref(&d),
        );
        assert!(matches!(v, Verdict::Pending { ref reason } if reason.contains("old replicas")));
        assert_eq!(
            evaluate(&baseline(3), DesiredCondition::Available, &[d]),
            Verdict::Satisfied
        );
    }

    #[test]
    fn progress_deadline_exceeded_fails() {
        let mut d = deployment(3, 3, 2, 1, 1);
        if let StatusDetail::Deployment(s) = &mut d.detail {
            s.progressing = Some(Condition {
                status: Truth::False,
                reason: Some("ProgressDeadlineExceeded".into()),
                message: Some("ReplicaSet \"web-1\" has timed out progressing.".into()),
            });
        }
        let v = evaluate(&baseline(3), DesiredCondition::RolloutComplete, &[d]);
        assert!(matches!(v, Verdict::Failed { ref reason } if reason.contains("timed out")));
    }

    #[test]
    fn pods_need_new_template_and_readiness() {
        let t0 = "2024-05-01T10:00:00.000Z";
        let t1 = "2024-05-01T10:05:00.000Z";
        let b = pods_baseline(t1);
        let d = deployment(3, 3, 2, 2, 2);
        let cases = [
            (vec![pod("a", t0, true), pod("b", t1, true)], false),
            (vec![pod("b", t1, true)], false),
            (vec![pod("b", t1, true), pod("c", t1, false)], false),
            (vec![pod("b", t1, true), pod("c", t1, true)], true),
        ];
        for (pods, satisfied) in cases {
            let mut observed = vec![d.clone()];
            observed.extend(pods);
            let v = evaluate(&b, DesiredCondition::PodsReadyOnNewTemplate, &observed);
            assert_eq!(v == Verdict::Satisfied, satisfied, "{v:?} for {observed:?}");
        }
        // A later load superseding ours counts as ours having taken effect.
        let later = "2024-05-01T10:06:00.000Z";
        let observed = vec![d, pod("b", later, true), pod("c", later, true)];
        assert_eq!(
            evaluate(&b, DesiredCondition::PodsReadyOnNewTemplate, &observed),
            Verdict::Satisfied
        );
    }

    #[test]
    fn evaluate_all_combines() {
        let ok = baseline(1);
        let missing = Baseline::new(ResourceKind::Deployment, "int", "other");
        let observed = [deployment(1, 1, 1, 1, 1)];
        assert_eq!(
            evaluate_all(
                std::slice::from_ref(&ok),
                DesiredCondition::RolloutComplete,
                &observed
            ),
            Verdict::Satisfied
        );
        assert!(matches!(
            evaluate_all(&[ok, missing], DesiredCondition::RolloutComplete, &observed),
            Verdict::Pending { .. }
        ));
        assert_eq!(
            evaluate_all(&[], DesiredCondition::RolloutComplete, &[]),
            Verdict::Satisfied
        );
    }

    #[test]
    fn observation_folds_events() {
        let mut obs = Observation::default();
        obs.apply(&ObjectEvent::Applied(deployment(1, 0, 1, 0, 0)));
        obs.apply(&ObjectEvent::Applied(deployment(1, 1, 1, 1, 1)));
        assert_eq!(obs.objects.len(), 1);
        assert_eq!(
            evaluate(&baseline(1), DesiredCondition::Available, &obs.objects),
            Verdict::Satisfied
        );
        obs.apply(&ObjectEvent::Deleted(deployment(1, 1, 1, 1, 1)));
        assert!(obs.objects.is_empty());
    }

    #[test]
    fn selectors() {
        let l = labels(&[("name", "web"), ("tier", "gpu")]);
        assert!(selector_matches("name=web", &l));
        assert!(selector_matches("name==web,tier", &l));
        assert!(selector_matches("name=web,tier in (gpu, cpu)", &l));
        assert!(selector_matches("env notin (prod),!env", &l));
        assert!(!selector_matches("name=web,tier!=gpu", &l));
        assert!(!selector_matches("name in web", &l));
        assert!(selector_matches("", &l));
        assert_eq!(selector_from_labels(&l), "name=web,tier=gpu");
    }

    #[test]
    fn baseline_relevance_and_serde() {
        let b = pods_baseline("x");
        assert!(b.is_relevant(&pod("a", "x", true)));
        assert!(b.is_relevant(&deployment(1, 1, 1, 1, 1)));
        let mut other = pod("z", "x", true);
        other.namespace = "prod".into();
        assert!(!b.is_relevant(&other));
        assert_eq!(
            b.watched_kinds(),
            &[ResourceKind::Deployment, ResourceKind::Pod]
        );
        let json = serde_json::to_value(&b).unwrap_or_default();
        assert_eq!(json["kind"], "Pod");
        assert_eq!(
            json["template_annotation"],
            "resource-plane/model-loaded-at"
        );
        let back: Baseline = serde_json::from_value(json).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, b);
    }
}
