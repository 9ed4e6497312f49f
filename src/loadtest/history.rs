//! The soak's history and the checker that judges it.
//!
//! The harness writes one [`Op`] per HTTP request (JSON lines, `--history FILE`): what
//! it asked, of which replica, when it started and ended (Unix ms), and what came back.
//! The nemesis of `scripts/soak.sh` writes one [`Fault`] per injected fault. At the end
//! `resource-plane soak-check` reads both, every version of every shadow deployable,
//! worker and instance record from etcd's history ([`EtcdHistory`]) and every EC2
//! instance ever launched ([`Launch`]), and [`check`] counts what must never happen:
//!
//! - acknowledged transitions lost: an acknowledged PROCURE / RELEASE / min-pod-count
//!   change, instance submission or completion that no version in etcd reflects; a
//!   version chain that skips or repeats a version (a write made on stale state); an
//!   in-use index that disagrees with its record at the end;
//! - two holders at once: acknowledged holds of one deployable by two runs whose
//!   client-observed intervals overlap, or a PROCURED version followed by a PROCURED
//!   version of another run;
//! - instances launched twice: more than one EC2 instance tagged with one worker id
//!   (or one tagged with a worker etcd never recorded);
//! - `do_not_disrupt` violations: a worker in DRAINING/STOPPING/STOPPED/TERMINATED at a
//!   revision where a `do_not_disrupt` instance was live (SCHEDULED/RUNNING) on it;
//! - 5xx answers other than 503, and requests that hit the client's deadline.
//!
//! [`check`] is pure: the tests feed it synthetic histories.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `Op::kind` of a PROCURE.
pub const PROCURE: &str = "procure";
/// `Op::kind` of a RELEASE (also the cleanup after a PROCURE of unknown outcome).
pub const RELEASE: &str = "release";
/// `Op::kind` of a min-pod-count change.
pub const MIN_POD_COUNT: &str = "min-pod-count";
/// `Op::kind` of a deployable registration.
pub const REGISTER: &str = "register";
/// `Op::kind` of `POST /api/1.0/instances`.
pub const SUBMIT: &str = "submit-instance";
/// `Op::kind` of `POST /api/1.0/instances/{id}/complete`.
pub const COMPLETE: &str = "complete-instance";
/// `Op::kind` of a deployable list.
pub const LIST: &str = "list";

/// Evidence lines kept per check (the counts keep going).
const MAX_EVIDENCE: usize = 20;
/// How far around an event a fault counts as "near" it in the evidence.
const NEAR_MS: u64 = 3_000;

/// One request the harness made.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Op {
    /// What it was: [`PROCURE`], [`RELEASE`], [`MIN_POD_COUNT`], [`SUBMIT`], ...
    pub kind: String,
    /// Index of the replica (in `--url` order) it went to.
    pub replica: usize,
    /// When it was sent (Unix ms).
    pub start_ms: u64,
    /// When its answer was read, or it failed (Unix ms).
    pub end_ms: u64,
    /// HTTP status; 0 when no answer came.
    pub status: u16,
    /// It hit the client's deadline (no answer in `--request-timeout-ms`).
    #[serde(default)]
    pub timed_out: bool,
    /// `status` of the answer's body (`PROCURED`, `FAILED`, `RELEASED`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    /// Deployable name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Workflow run id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    /// Idempotency key sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// `min_pod_count` of the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_pod_count: Option<u64>,
    /// Instance id (of the answer to a submission, or the one completed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// Whether the submitted instance asked for `do_not_disrupt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub do_not_disrupt: Option<bool>,
}

impl Op {
    /// `200 PROCURED`, `503`, `timeout`, `no answer`: the row of the operations table.
    pub fn outcome_label(&self) -> String {
        match (self.status, self.timed_out, self.outcome.as_deref()) {
            (0, true, _) => "timeout".into(),
            (0, false, _) => "no answer".into(),
            (s, _, Some(o)) if (200..300).contains(&s) && !o.is_empty() => format!("{s} {o}"),
            (s, _, _) => s.to_string(),
        }
    }

    fn is(&self, kind: &str, status: u16, outcome: &str) -> bool {
        self.kind == kind && self.status == status && self.outcome.as_deref() == Some(outcome)
    }
}

/// A fault the nemesis injected.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Fault {
    /// `kill-replica`, `kill-etcd`, `pause-leader`, `pause-etcd`, ...
    pub kind: String,
    /// What it hit (`replica-0`, `etcd-2`, ...).
    pub target: String,
    /// When it began (Unix ms).
    pub start_ms: u64,
    /// When the target was back (restarted / continued), Unix ms.
    pub end_ms: u64,
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Appends [`Op`]s to a JSON-lines file; shared by every task of a run.
#[derive(Debug)]
pub struct HistoryLog {
    out: Mutex<BufWriter<File>>,
    failed_writes: AtomicU64,
}

impl HistoryLog {
    /// Creates (truncates) `path`.
    pub fn create(path: &Path) -> std::io::Result<Self> {
        Ok(Self {
            out: Mutex::new(BufWriter::new(File::create(path)?)),
            failed_writes: AtomicU64::new(0),
        })
    }

    /// Appends one operation.
    pub fn record(&self, op: &Op) {
        let ok = serde_json::to_string(op).is_ok_and(|line| {
            let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
            writeln!(out, "{line}").is_ok()
        });
        if !ok {
            self.failed_writes.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Flushes to disk; an error when any write failed (the history is incomplete).
    pub fn finish(&self) -> Result<(), String> {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        out.flush().map_err(|e| format!("history: {e}"))?;
        match self.failed_writes.load(Ordering::Relaxed) {
            0 => Ok(()),
            n => Err(format!("history: {n} operations could not be written")),
        }
    }
}

/// Reads a JSON-lines file (blank lines skipped); errors name the line.
pub fn read_jsonl<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>, String> {
    let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| format!("{}: {e}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(
            serde_json::from_str(&line)
                .map_err(|e| format!("{} line {}: {e}", path.display(), i + 1))?,
        );
    }
    Ok(out)
}

/// One version of a record: the revision that wrote it, and its value (`None`: deleted).
#[derive(Debug, Clone, PartialEq)]
pub struct Version {
    /// etcd revision of the write.
    pub revision: i64,
    /// The record, `None` when the key was deleted.
    pub value: Option<Value>,
}

/// Every version etcd kept of the records the checker judges, in revision order.
#[derive(Debug, Clone, Default)]
pub struct EtcdHistory {
    /// `/shadow-deployables/{env}/{name}` by name.
    pub shadows: BTreeMap<String, Vec<Version>>,
    /// Final `/shadow-deployables-index/{env}/in-use/{name}` values by name.
    pub in_use: BTreeMap<String, String>,
    /// `/workers/{id}` by id.
    pub workers: BTreeMap<String, Vec<Version>>,
    /// `/instances/{id}` by id.
    pub instances: BTreeMap<String, Vec<Version>>,
    /// Events read.
    pub events: u64,
}

impl EtcdHistory {
    /// Files one event of `key` (relative to `ETCD_PREFIX`) at `revision`; `value` is
    /// `None` for a delete. Keys of other kinds or environments are ignored.
    pub fn add(&mut self, env: &str, key: &str, revision: i64, value: Option<&[u8]>) {
        self.events += 1;
        let parsed = || Version {
            revision,
            value: value.map(|v| serde_json::from_slice(v).unwrap_or(Value::Null)),
        };
        if let Some((e, name)) = crate::keys::parse_shadow(key) {
            if e == env {
                self.shadows
                    .entry(name.to_owned())
                    .or_default()
                    .push(parsed());
            }
        } else if let Some(name) =
            key.strip_prefix(&format!("/shadow-deployables-index/{env}/in-use/"))
        {
            match value {
                Some(v) => {
                    let v = String::from_utf8_lossy(v).trim().to_owned();
                    self.in_use.insert(name.to_owned(), v);
                }
                None => {
                    self.in_use.remove(name);
                }
            }
        } else if let Some(id) = crate::keys::child(crate::keys::WORKER_PREFIX, key) {
            self.workers
                .entry(id.to_owned())
                .or_default()
                .push(parsed());
        } else if let Some(id) = crate::keys::child(crate::keys::INSTANCE_PREFIX, key) {
            self.instances
                .entry(id.to_owned())
                .or_default()
                .push(parsed());
        }
    }
}

/// One EC2 instance, in any state (moto keeps terminated ones).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// EC2 instance id.
    pub instance_id: String,
    /// Its `resource-plane/worker-id` tag.
    pub worker_id: Option<String>,
    /// EC2 state name.
    pub state: String,
}

/// What must be zero.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Acknowledged transitions no etcd version reflects.
    pub lost_transitions: u64,
    /// Consecutive versions whose `version` does not follow (a write on stale state).
    pub version_chain_breaks: u64,
    /// In-use index values disagreeing with their record at the end.
    pub index_mismatches: u64,
    /// Pairs of acknowledged holds of one deployable by two runs that overlap in time.
    pub overlapping_holds: u64,
    /// A PROCURED version followed by a PROCURED version of another run.
    pub double_holds_in_etcd: u64,
    /// EC2 instances beyond the first for one worker id.
    pub double_launches: u64,
    /// EC2 instances whose worker id etcd never recorded.
    pub unrecorded_launches: u64,
    /// `do_not_disrupt` instances whose worker was drained or stopped while they lived.
    pub dnd_violations: u64,
    /// Answers 500..=599 other than 503.
    pub server_errors: u64,
    /// Requests that hit the client's deadline.
    pub hung_requests: u64,
}

impl Counts {
    /// `(name, count)` rows in a fixed order.
    pub fn rows(&self) -> [(&'static str, u64); 10] {
        [
            ("acknowledged transitions lost", self.lost_transitions),
            ("version chain breaks", self.version_chain_breaks),
            ("in-use index mismatches", self.index_mismatches),
            ("overlapping holds (client)", self.overlapping_holds),
            ("double holds (etcd chain)", self.double_holds_in_etcd),
            ("instances launched twice", self.double_launches),
            ("launches of unrecorded workers", self.unrecorded_launches),
            ("do_not_disrupt violations", self.dnd_violations),
            ("5xx other than 503", self.server_errors),
            ("requests past their deadline", self.hung_requests),
        ]
    }

    /// Sum of every count.
    pub fn total(&self) -> u64 {
        self.rows().iter().map(|(_, n)| n).sum()
    }
}

/// The checker's verdict and figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Verdict {
    /// Operations by kind, then outcome label.
    pub operations: BTreeMap<String, BTreeMap<String, u64>>,
    /// Faults injected by kind.
    pub faults: BTreeMap<String, u64>,
    /// Acknowledged (distinct) transitions by kind.
    pub acknowledged: BTreeMap<String, u64>,
    /// Other figures: EC2 launches, workers, instances, etcd events.
    pub figures: BTreeMap<String, u64>,
    /// What must be zero.
    pub counts: Counts,
    /// One line per violation (capped per check), with the faults near it.
    pub evidence: Vec<String>,
}

impl Verdict {
    /// Whether every count is zero.
    pub fn passed(&self) -> bool {
        self.counts.total() == 0
    }

    /// The tables, the evidence and the verdict.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let total: u64 = self.operations.values().flat_map(|m| m.values()).sum();
        let faults: u64 = self.faults.values().sum();
        let _ = writeln!(
            out,
            "soak check: {total} operations, {faults} faults injected\n"
        );
        let _ = writeln!(out, "| operation | outcome | count |\n|---|---|---:|");
        for (kind, outcomes) in &self.operations {
            for (outcome, n) in outcomes {
                let _ = writeln!(out, "| {kind} | {outcome} | {n} |");
            }
        }
        let _ = writeln!(out, "\n| fault | count |\n|---|---:|");
        for (kind, n) in &self.faults {
            let _ = writeln!(out, "| {kind} | {n} |");
        }
        let _ = writeln!(out, "\n| figure | count |\n|---|---:|");
        for (kind, n) in &self.acknowledged {
            let _ = writeln!(out, "| acknowledged {kind} | {n} |");
        }
        for (kind, n) in &self.figures {
            let _ = writeln!(out, "| {kind} | {n} |");
        }
        let _ = writeln!(out, "\n| check | count |\n|---|---:|");
        for (name, n) in self.counts.rows() {
            let _ = writeln!(out, "| {name} | {n} |");
        }
        if !self.evidence.is_empty() {
            let _ = writeln!(out, "\nevidence:");
            for e in &self.evidence {
                let _ = writeln!(out, "  - {e}");
            }
        }
        let _ = writeln!(
            out,
            "\nverdict: {}",
            if self.passed() { "OK" } else { "VIOLATED" }
        );
        out
    }
}

/// Collects evidence, at most [`MAX_EVIDENCE`] lines per check.
struct Evidence<'a> {
    faults: &'a [Fault],
    lines: Vec<String>,
    per_check: BTreeMap<&'static str, usize>,
}

impl Evidence<'_> {
    fn add(&mut self, check: &'static str, at_ms: Option<u64>, what: String) {
        let n = self.per_check.entry(check).or_insert(0);
        *n += 1;
        if *n > MAX_EVIDENCE {
            return;
        }
        let near = at_ms.map(|t| self.near(t)).unwrap_or_default();
        let near = if near.is_empty() {
            String::new()
        } else {
            format!(" [faults near: {near}]")
        };
        self.lines.push(format!("{check}: {what}{near}"));
    }

    fn near(&self, t: u64) -> String {
        self.faults
            .iter()
            .filter(|f| {
                f.start_ms.saturating_sub(NEAR_MS) <= t && t <= f.end_ms.saturating_add(NEAR_MS)
            })
            .map(|f| {
                format!(
                    "{} {} at {:+} ms",
                    f.kind,
                    f.target,
                    i128::from(f.start_ms) - i128::from(t)
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// What the checker reads of a shadow deployable version.
#[derive(Debug, Clone, PartialEq)]
struct Shadow {
    state: String,
    owner: Option<String>,
    owner_record: Value,
    min_pod_count: u64,
    version: u64,
    at_ms: Option<u64>,
}

fn shadow(v: &Value) -> Shadow {
    Shadow {
        state: v["state"].as_str().unwrap_or_default().to_owned(),
        owner: v["owner"]["workflow_run_id"].as_str().map(str::to_owned),
        owner_record: v["owner"].clone(),
        min_pod_count: v["min_pod_count"].as_u64().unwrap_or(0),
        version: v["version"].as_u64().unwrap_or(0),
        at_ms: time_ms(&v["last_updated_at"]),
    }
}

fn time_ms(v: &Value) -> Option<u64> {
    let t = chrono::DateTime::parse_from_rfc3339(v.as_str()?).ok()?;
    u64::try_from(t.timestamp_millis()).ok()
}

/// The runs of consecutive present versions (a delete ends one).
fn segments(versions: &[Version]) -> Vec<Vec<(i64, Shadow)>> {
    let mut out = vec![Vec::new()];
    for v in versions {
        match &v.value {
            Some(value) => {
                if let Some(last) = out.last_mut() {
                    last.push((v.revision, shadow(value)));
                }
            }
            None => out.push(Vec::new()),
        }
    }
    out.retain(|s| !s.is_empty());
    out
}

/// Judges a soak: see the module documentation for what is counted.
pub fn check(ops: &[Op], faults: &[Fault], etcd: &EtcdHistory, launches: &[Launch]) -> Verdict {
    let mut v = Verdict::default();
    for op in ops {
        *v.operations
            .entry(op.kind.clone())
            .or_default()
            .entry(op.outcome_label())
            .or_insert(0) += 1;
    }
    for f in faults {
        *v.faults.entry(f.kind.clone()).or_insert(0) += 1;
    }
    let mut ev = Evidence {
        faults,
        lines: Vec::new(),
        per_check: BTreeMap::new(),
    };
    check_answers(ops, &mut v.counts, &mut ev);
    check_acknowledged(ops, etcd, &mut v, &mut ev);
    check_chains(etcd, &mut v.counts, &mut ev);
    check_holds(ops, &mut v.counts, &mut ev);
    check_launches(etcd, launches, &mut v, &mut ev);
    check_do_not_disrupt(etcd, &mut v, &mut ev);
    v.figures.insert("etcd events read".into(), etcd.events);
    v.figures
        .insert("workers in etcd".into(), etcd.workers.len() as u64);
    v.figures
        .insert("instances in etcd".into(), etcd.instances.len() as u64);
    // Instances no 202 named: an answer lost in a fault, or a retried submission that
    // created a second instance instead of replaying the first answer.
    let answered: BTreeSet<&str> = ops
        .iter()
        .filter(|o| o.kind == SUBMIT && o.status == 202)
        .filter_map(|o| o.instance.as_deref())
        .collect();
    let unanswered = etcd
        .instances
        .keys()
        .filter(|id| !answered.contains(id.as_str()))
        .count();
    v.figures
        .insert("instances in etcd no 202 named".into(), unanswered as u64);
    v.evidence = ev.lines;
    v
}

fn check_answers(ops: &[Op], c: &mut Counts, ev: &mut Evidence<'_>) {
    for op in ops {
        if (500..600).contains(&op.status) && op.status != 503 {
            c.server_errors += 1;
            ev.add(
                "5xx",
                Some(op.start_ms),
                format!(
                    "{} {} on replica {} answered {}",
                    op.kind,
                    op.name.as_deref().or(op.instance.as_deref()).unwrap_or("-"),
                    op.replica,
                    op.status
                ),
            );
        }
        if op.timed_out {
            c.hung_requests += 1;
            ev.add(
                "hung",
                Some(op.start_ms),
                format!(
                    "{} {} on replica {} got no answer in {} ms",
                    op.kind,
                    op.name.as_deref().or(op.instance.as_deref()).unwrap_or("-"),
                    op.replica,
                    op.end_ms.saturating_sub(op.start_ms)
                ),
            );
        }
    }
}

fn check_acknowledged(ops: &[Op], etcd: &EtcdHistory, v: &mut Verdict, ev: &mut Evidence<'_>) {
    // What each deployable's chain shows, indexed once: (name, run) pairs that held it,
    // that released it (PROCURED by run -> FREE), and (name, run, min_pod_count) values.
    let mut held: BTreeSet<(&str, String)> = BTreeSet::new();
    let mut released: BTreeSet<(&str, String)> = BTreeSet::new();
    let mut min_pods: BTreeSet<(&str, String, u64)> = BTreeSet::new();
    for (name, versions) in &etcd.shadows {
        let chain: Vec<Shadow> = versions
            .iter()
            .filter_map(|v| v.value.as_ref().map(shadow))
            .collect();
        for (i, s) in chain.iter().enumerate() {
            let Some(owner) = &s.owner else { continue };
            min_pods.insert((name.as_str(), owner.clone(), s.min_pod_count));
            if s.state == "PROCURED" {
                held.insert((name.as_str(), owner.clone()));
                if chain.get(i + 1).is_some_and(|n| n.state == "FREE") {
                    released.insert((name.as_str(), owner.clone()));
                }
            }
        }
    }
    // One acknowledged transition may be answered several times (idempotent replays).
    let mut seen: BTreeSet<(String, String, String, Option<u64>)> = BTreeSet::new();
    for op in ops {
        let name = op.name.clone().unwrap_or_default();
        let run = op.run.clone().unwrap_or_default();
        let key = (name.as_str(), run.clone());
        let (kind, found) = if op.is(PROCURE, 200, "PROCURED") {
            ("PROCURE", held.contains(&key))
        } else if op.is(RELEASE, 200, "RELEASED") {
            ("RELEASE", released.contains(&key))
        } else if op.is(MIN_POD_COUNT, 200, "UPDATED") {
            let m = op.min_pod_count.unwrap_or(0);
            let found = min_pods.contains(&(name.as_str(), run.clone(), m));
            ("min-pod-count", found)
        } else if op.kind == SUBMIT && op.status == 202 {
            let id = op.instance.clone().unwrap_or_default();
            let found = etcd
                .instances
                .get(&id)
                .is_some_and(|vs| vs.iter().any(|v| v.value.is_some()));
            if !seen.insert(("submit".into(), id.clone(), String::new(), None)) {
                continue;
            }
            *v.acknowledged
                .entry("instance submissions".into())
                .or_insert(0) += 1;
            if !found {
                v.counts.lost_transitions += 1;
                ev.add(
                    "lost",
                    Some(op.end_ms),
                    format!("instance {id} acknowledged (202) but never in etcd"),
                );
            }
            continue;
        } else if op.kind == COMPLETE && op.status == 200 {
            let id = op.instance.clone().unwrap_or_default();
            let found = etcd.instances.get(&id).is_some_and(|vs| {
                vs.iter().any(|v| {
                    v.value
                        .as_ref()
                        .is_some_and(|r| r["state"].as_str() == Some("COMPLETED"))
                })
            });
            if !seen.insert(("complete".into(), id.clone(), String::new(), None)) {
                continue;
            }
            *v.acknowledged
                .entry("instance completions".into())
                .or_insert(0) += 1;
            if !found {
                v.counts.lost_transitions += 1;
                ev.add(
                    "lost",
                    Some(op.end_ms),
                    format!(
                        "completion of instance {id} acknowledged but etcd never had it COMPLETED"
                    ),
                );
            }
            continue;
        } else {
            continue;
        };
        if !seen.insert((kind.to_owned(), name.clone(), run.clone(), op.min_pod_count)) {
            continue;
        }
        *v.acknowledged.entry(kind.to_owned()).or_insert(0) += 1;
        if !found {
            v.counts.lost_transitions += 1;
            ev.add(
                "lost",
                Some(op.end_ms),
                format!(
                    "{kind} of {name} by {run} acknowledged on replica {} but no etcd version has it",
                    op.replica
                ),
            );
        }
    }
}

fn check_chains(etcd: &EtcdHistory, c: &mut Counts, ev: &mut Evidence<'_>) {
    for (name, versions) in &etcd.shadows {
        for seg in segments(versions) {
            for w in seg.windows(2) {
                let ((_, p), (rev, n)) = (&w[0], &w[1]);
                let changed = p.state != n.state
                    || p.owner_record != n.owner_record
                    || p.min_pod_count != n.min_pod_count;
                let expected = if changed { p.version + 1 } else { p.version };
                if n.version != expected {
                    c.version_chain_breaks += 1;
                    ev.add(
                        "chain",
                        n.at_ms,
                        format!(
                            "{name} at revision {rev}: version {} after {} ({} {:?} -> {} {:?})",
                            n.version, p.version, p.state, p.owner, n.state, n.owner
                        ),
                    );
                }
                if p.state == "PROCURED" && n.state == "PROCURED" && p.owner != n.owner {
                    c.double_holds_in_etcd += 1;
                    ev.add(
                        "double hold",
                        n.at_ms,
                        format!(
                            "{name} at revision {rev}: PROCURED by {:?} then by {:?} without a release",
                            p.owner, n.owner
                        ),
                    );
                }
            }
        }
        let last = versions.last().and_then(|v| v.value.as_ref()).map(shadow);
        if let Some(last) = last {
            let expected = if last.state == "PROCURED" {
                "true"
            } else {
                "false"
            };
            let index = etcd.in_use.get(name).map(String::as_str);
            if index != Some(expected) {
                c.index_mismatches += 1;
                ev.add(
                    "index",
                    last.at_ms,
                    format!("{name} is {} but its in-use index is {index:?}", last.state),
                );
            }
        }
    }
}

/// A client-observed hold: from reading `200 PROCURED` until sending the run's RELEASE.
#[derive(Debug)]
struct Hold {
    run: String,
    from: u64,
    to: u64,
    replica: usize,
}

fn check_holds(ops: &[Op], c: &mut Counts, ev: &mut Evidence<'_>) {
    // (name, run) -> earliest acknowledged PROCURE end, its replica.
    let mut acquired: BTreeMap<(String, String), (u64, usize)> = BTreeMap::new();
    for op in ops.iter().filter(|o| o.is(PROCURE, 200, "PROCURED")) {
        let (Some(name), Some(run)) = (&op.name, &op.run) else {
            continue;
        };
        let e = acquired
            .entry((name.clone(), run.clone()))
            .or_insert((op.end_ms, op.replica));
        if op.end_ms < e.0 {
            *e = (op.end_ms, op.replica);
        }
    }
    // (name, run) -> start times of its RELEASEs.
    let mut releases: BTreeMap<(&str, &str), Vec<u64>> = BTreeMap::new();
    for op in ops.iter().filter(|o| o.kind == RELEASE) {
        if let (Some(name), Some(run)) = (&op.name, &op.run) {
            releases
                .entry((name.as_str(), run.as_str()))
                .or_default()
                .push(op.start_ms);
        }
    }
    let mut holds: BTreeMap<String, Vec<Hold>> = BTreeMap::new();
    for ((name, run), (from, replica)) in acquired {
        // The first RELEASE sent after the hold began ends what the client can vouch for.
        let to = releases
            .get(&(name.as_str(), run.as_str()))
            .into_iter()
            .flatten()
            .filter(|t| **t >= from)
            .min()
            .copied()
            .unwrap_or(u64::MAX);
        holds.entry(name).or_default().push(Hold {
            run,
            from,
            to,
            replica,
        });
    }
    for (name, mut hs) in holds {
        hs.sort_by_key(|h| h.from);
        for (i, a) in hs.iter().enumerate() {
            for b in hs.iter().skip(i + 1) {
                // Sorted by start: no later hold can overlap `a` either.
                if b.from >= a.to {
                    break;
                }
                if a.run != b.run {
                    c.overlapping_holds += 1;
                    ev.add(
                        "overlap",
                        Some(b.from),
                        format!(
                            "{name}: {} (replica {}) held it from {} to {}, {} (replica {}) got PROCURED at {}",
                            a.run,
                            a.replica,
                            a.from,
                            if a.to == u64::MAX { "the end".to_owned() } else { a.to.to_string() },
                            b.run,
                            b.replica,
                            b.from
                        ),
                    );
                }
            }
        }
    }
}

fn check_launches(etcd: &EtcdHistory, launches: &[Launch], v: &mut Verdict, ev: &mut Evidence<'_>) {
    let mut by_worker: BTreeMap<Option<&str>, Vec<&Launch>> = BTreeMap::new();
    for l in launches {
        by_worker.entry(l.worker_id.as_deref()).or_default().push(l);
    }
    v.figures
        .insert("EC2 instances launched".into(), launches.len() as u64);
    for (worker, ls) in by_worker {
        let recorded = worker.is_some_and(|w| etcd.workers.contains_key(w));
        if !recorded {
            v.counts.unrecorded_launches += ls.len() as u64;
            ev.add(
                "unrecorded launch",
                None,
                format!(
                    "EC2 {:?} tagged worker {worker:?}, which etcd never recorded",
                    ls.iter()
                        .map(|l| l.instance_id.as_str())
                        .collect::<Vec<_>>()
                ),
            );
            continue;
        }
        if ls.len() > 1 {
            v.counts.double_launches += ls.len() as u64 - 1;
            ev.add(
                "double launch",
                None,
                format!(
                    "worker {}: EC2 instances {:?}",
                    worker.unwrap_or_default(),
                    ls.iter()
                        .map(|l| format!("{} ({})", l.instance_id, l.state))
                        .collect::<Vec<_>>()
                ),
            );
        }
    }
}

const DISRUPTED: [&str; 4] = ["DRAINING", "STOPPING", "STOPPED", "TERMINATED"];

fn check_do_not_disrupt(etcd: &EtcdHistory, v: &mut Verdict, ev: &mut Evidence<'_>) {
    // How much the check saw: drains happened, and do_not_disrupt instances were placed.
    let drained = etcd
        .workers
        .values()
        .filter(|vs| {
            vs.iter().any(|v| {
                v.value
                    .as_ref()
                    .is_some_and(|r| r["state"].as_str() == Some("DRAINING"))
            })
        })
        .count();
    v.figures.insert("workers drained".into(), drained as u64);
    let mut placed = 0u64;
    for (id, versions) in &etcd.instances {
        // Intervals [from, to) of revisions in which the instance lived on a worker.
        let mut lives: Vec<(String, i64, i64)> = Vec::new();
        let mut open: Option<(String, i64)> = None;
        for ver in versions {
            let on = ver.value.as_ref().and_then(|r| {
                let live = matches!(r["state"].as_str(), Some("SCHEDULED" | "RUNNING"));
                let dnd = r["do_not_disrupt"].as_bool() == Some(true);
                let w = r["worker_id"].as_str()?;
                (live && dnd).then(|| w.to_owned())
            });
            let same = matches!((&open, &on), (Some((w, _)), Some(now)) if w == now);
            if !same {
                if let Some((w, from)) = open.take() {
                    lives.push((w, from, ver.revision));
                }
                open = on.map(|w| (w, ver.revision));
            }
        }
        if let Some((w, from)) = open {
            lives.push((w, from, i64::MAX));
        }
        placed += u64::from(!lives.is_empty());
        for (worker, from, to) in lives {
            let Some(wv) = etcd.workers.get(&worker) else {
                continue;
            };
            // The worker's state when the instance landed, and every change while it lived.
            let at_start = wv.iter().rev().find(|v| v.revision <= from);
            let during = wv.iter().filter(|v| v.revision > from && v.revision < to);
            let bad = at_start.into_iter().chain(during).find_map(|v| {
                let r = v.value.as_ref()?;
                let state = r["state"].as_str()?;
                DISRUPTED.contains(&state).then(|| {
                    (
                        state.to_owned(),
                        v.revision,
                        time_ms(&r["state_changed_at"]),
                    )
                })
            });
            if let Some((state, rev, at)) = bad {
                v.counts.dnd_violations += 1;
                ev.add(
                    "do_not_disrupt",
                    at,
                    format!(
                        "instance {id} (do_not_disrupt) lived on {worker} from revision {from}; the worker was {state} at revision {rev}"
                    ),
                );
            }
        }
    }
    v.figures
        .insert("do_not_disrupt instances placed".into(), placed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn op(kind: &str, name: &str, run: &str, status: u16, outcome: &str, t: (u64, u64)) -> Op {
        Op {
            kind: kind.into(),
            replica: 0,
            start_ms: t.0,
            end_ms: t.1,
            status,
            outcome: (!outcome.is_empty()).then(|| outcome.to_owned()),
            name: Some(name.into()),
            run: Some(run.into()),
            ..Op::default()
        }
    }

    fn rec(state: &str, owner: Option<&str>, min_pods: u64, version: u64) -> Value {
        json!({
            "name": "d", "node_pool": "p", "dns": "d.invalid", "state": state,
            "owner": owner.map(|o| json!({"workflow_run_id": o, "workflow_plan": "x",
                                          "procured_at": "2026-01-01T00:00:00Z"})),
            "min_pod_count": min_pods, "last_updated_at": "2026-01-01T00:00:00Z",
            "version": version,
        })
    }

    /// An etcd history where `d` went FREE -> PROCURED(r1) -> min 1 -> FREE ->
    /// PROCURED(r2) -> FREE, with a consistent index, as a correct service leaves it.
    fn clean_etcd() -> EtcdHistory {
        let mut e = EtcdHistory::default();
        let chain = [
            rec("FREE", None, 0, 0),
            rec("PROCURED", Some("r1"), 0, 1),
            rec("PROCURED", Some("r1"), 1, 2),
            rec("FREE", None, 0, 3),
            rec("PROCURED", Some("r2"), 0, 4),
            rec("FREE", None, 0, 5),
        ];
        for (i, r) in chain.iter().enumerate() {
            let bytes = serde_json::to_vec(r).unwrap_or_default();
            e.add(
                "int",
                "/shadow-deployables/int/d",
                10 + i as i64,
                Some(&bytes),
            );
        }
        e.add(
            "int",
            "/shadow-deployables-index/int/in-use/d",
            16,
            Some(b"false"),
        );
        e
    }

    fn clean_ops() -> Vec<Op> {
        let mut min = op(MIN_POD_COUNT, "d", "r1", 200, "UPDATED", (110, 120));
        min.min_pod_count = Some(1);
        vec![
            op(PROCURE, "d", "r1", 200, "PROCURED", (100, 105)),
            min,
            op(RELEASE, "d", "r1", 200, "RELEASED", (130, 140)),
            op(PROCURE, "d", "r2", 200, "FAILED", (101, 104)),
            op(PROCURE, "d", "r2", 200, "PROCURED", (150, 155)),
            op(RELEASE, "d", "r2", 503, "", (160, 170)),
            op(RELEASE, "d", "r2", 200, "RELEASED", (171, 180)),
        ]
    }

    #[test]
    fn a_clean_history_passes() {
        let v = check(&clean_ops(), &[], &clean_etcd(), &[]);
        assert!(v.passed(), "{}", v.render());
        assert_eq!(v.acknowledged.get("PROCURE"), Some(&2));
        assert_eq!(v.acknowledged.get("RELEASE"), Some(&2));
        assert_eq!(v.acknowledged.get("min-pod-count"), Some(&1));
        assert_eq!(v.operations[PROCURE]["200 PROCURED"], 2);
        assert_eq!(v.operations[RELEASE]["503"], 1);
    }

    #[test]
    fn a_lost_write_is_counted() {
        // r3's PROCURE was acknowledged, but etcd never had r3 as the owner.
        let mut ops = clean_ops();
        ops.push(op(PROCURE, "d", "r3", 200, "PROCURED", (200, 210)));
        let v = check(&ops, &[], &clean_etcd(), &[]);
        assert_eq!(v.counts.lost_transitions, 1, "{}", v.render());
        assert!(!v.passed());
        // A replayed answer of the same transition is one transition, not two.
        ops.push(op(PROCURE, "d", "r3", 200, "PROCURED", (220, 230)));
        let v = check(&ops, &[], &clean_etcd(), &[]);
        assert_eq!(v.counts.lost_transitions, 1, "{}", v.render());
        // An acknowledged RELEASE whose FREE version was overwritten by a stale write:
        // the chain repeats version 3 (lost update) and the index says otherwise.
        let mut e = clean_etcd();
        let stale = serde_json::to_vec(&rec("PROCURED", Some("r2"), 0, 4)).unwrap_or_default();
        e.add("int", "/shadow-deployables/int/d", 17, Some(&stale));
        let v = check(&clean_ops(), &[], &e, &[]);
        assert_eq!(v.counts.version_chain_breaks, 1, "{}", v.render());
        assert_eq!(v.counts.index_mismatches, 1, "{}", v.render());
    }

    #[test]
    fn a_lost_instance_completion_is_counted() {
        let mut e = EtcdHistory::default();
        let i = json!({"id": "i1", "state": "SCHEDULED", "worker_id": "w1",
                       "do_not_disrupt": false});
        e.add(
            "int",
            "/instances/i1",
            5,
            Some(&serde_json::to_vec(&i).unwrap_or_default()),
        );
        let ops = vec![
            Op {
                kind: SUBMIT.into(),
                status: 202,
                instance: Some("i1".into()),
                ..Op::default()
            },
            Op {
                kind: COMPLETE.into(),
                status: 200,
                instance: Some("i1".into()),
                ..Op::default()
            },
            Op {
                kind: SUBMIT.into(),
                status: 202,
                instance: Some("i2".into()),
                ..Op::default()
            },
        ];
        e.add(
            "int",
            "/instances/i9",
            6,
            Some(&serde_json::to_vec(&i).unwrap_or_default()),
        );
        let v = check(&ops, &[], &e, &[]);
        assert_eq!(v.counts.lost_transitions, 2, "{}", v.render());
        assert_eq!(v.figures["instances in etcd no 202 named"], 1);
    }

    #[test]
    fn an_overlapping_hold_is_counted() {
        // r2 reads PROCURED at 125, before r1 even sent its RELEASE (130).
        let mut ops = clean_ops();
        ops.push(op(PROCURE, "d", "r9", 200, "PROCURED", (120, 125)));
        ops.push(op(RELEASE, "d", "r9", 200, "RELEASED", (128, 129)));
        let v = check(&ops, &[], &clean_etcd(), &[]);
        assert_eq!(v.counts.overlapping_holds, 1, "{}", v.render());
        // Never released at all: the hold lasts to the end.
        let ops = vec![
            op(PROCURE, "d", "r1", 200, "PROCURED", (100, 105)),
            op(PROCURE, "d", "r2", 200, "PROCURED", (5000, 5010)),
        ];
        let v = check(&ops, &[], &EtcdHistory::default(), &[]);
        assert_eq!(v.counts.overlapping_holds, 1, "{}", v.render());
        // Back to back (the second PROCURED after the first RELEASE was sent) is fine.
        let ops = vec![
            op(PROCURE, "d", "r1", 200, "PROCURED", (100, 105)),
            op(RELEASE, "d", "r1", 0, "", (110, 10_110)),
            op(PROCURE, "d", "r2", 200, "PROCURED", (112, 120)),
        ];
        let v = check(&ops, &[], &EtcdHistory::default(), &[]);
        assert_eq!(v.counts.overlapping_holds, 0, "{}", v.render());
        // In etcd: PROCURED by r1 then PROCURED by r2, no FREE between.
        let mut e = EtcdHistory::default();
        for (rev, r) in [
            (1, rec("FREE", None, 0, 0)),
            (2, rec("PROCURED", Some("r1"), 0, 1)),
            (3, rec("PROCURED", Some("r2"), 0, 2)),
        ] {
            let bytes = serde_json::to_vec(&r).unwrap_or_default();
            e.add("int", "/shadow-deployables/int/d", rev, Some(&bytes));
        }
        e.add(
            "int",
            "/shadow-deployables-index/int/in-use/d",
            3,
            Some(b"true"),
        );
        let v = check(&[], &[], &e, &[]);
        assert_eq!(v.counts.double_holds_in_etcd, 1, "{}", v.render());
        assert_eq!(v.counts.version_chain_breaks, 0, "{}", v.render());
    }

    #[test]
    fn a_double_launch_is_counted() {
        let mut e = EtcdHistory::default();
        e.add(
            "int",
            "/workers/w1",
            1,
            Some(br#"{"id":"w1","state":"PENDING"}"#),
        );
        e.add(
            "int",
            "/workers/w2",
            2,
            Some(br#"{"id":"w2","state":"PENDING"}"#),
        );
        let launch = |i: &str, w: Option<&str>| Launch {
            instance_id: i.into(),
            worker_id: w.map(str::to_owned),
            state: "running".into(),
        };
        let launches = [
            launch("i-1", Some("w1")),
            launch("i-2", Some("w1")),
            launch("i-3", Some("w2")),
        ];
        let v = check(&[], &[], &e, &launches);
        assert_eq!(v.counts.double_launches, 1, "{}", v.render());
        assert_eq!(v.counts.unrecorded_launches, 0, "{}", v.render());
        assert_eq!(v.figures["EC2 instances launched"], 3);
        let v = check(
            &[],
            &[],
            &e,
            &[launch("i-4", Some("w-ghost")), launch("i-5", None)],
        );
        assert_eq!(v.counts.unrecorded_launches, 2, "{}", v.render());
    }

    #[test]
    fn a_do_not_disrupt_violation_is_counted() {
        let put = |e: &mut EtcdHistory, key: &str, rev: i64, v: Value| {
            e.add(
                "int",
                key,
                rev,
                Some(&serde_json::to_vec(&v).unwrap_or_default()),
            );
        };
        let inst = |state: &str, dnd: bool| json!({"id": "i1", "state": state, "worker_id": "w1", "do_not_disrupt": dnd});
        let worker = |state: &str| json!({"id": "w1", "state": state});
        let history = |dnd: bool, drain_at: i64| {
            let mut e = EtcdHistory::default();
            put(&mut e, "/workers/w1", 1, worker("RUNNING"));
            put(&mut e, "/instances/i1", 2, inst("PENDING", dnd));
            put(&mut e, "/instances/i1", 3, inst("SCHEDULED", dnd));
            put(&mut e, "/instances/i1", 5, inst("COMPLETED", dnd));
            put(&mut e, "/workers/w1", drain_at, worker("DRAINING"));
            e
        };
        // Drained at revision 4 while the do_not_disrupt instance lived (3..5).
        let v = check(&[], &[], &history(true, 4), &[]);
        assert_eq!(v.counts.dnd_violations, 1, "{}", v.render());
        assert_eq!(v.figures["do_not_disrupt instances placed"], 1);
        assert_eq!(v.figures["workers drained"], 1);
        // Drained after it completed, or an instance without the flag: fine.
        assert_eq!(
            check(&[], &[], &history(true, 6), &[])
                .counts
                .dnd_violations,
            0
        );
        assert_eq!(
            check(&[], &[], &history(false, 4), &[])
                .counts
                .dnd_violations,
            0
        );
        // Placed on a worker that was already draining.
        let mut e = EtcdHistory::default();
        put(&mut e, "/workers/w1", 1, worker("DRAINING"));
        put(&mut e, "/instances/i1", 2, inst("SCHEDULED", true));
        assert_eq!(check(&[], &[], &e, &[]).counts.dnd_violations, 1);
    }

    #[test]
    fn a_500_and_a_hang_are_counted_and_503_is_not() {
        let mut ops = clean_ops();
        ops.push(op(PROCURE, "d", "r5", 500, "", (300, 310)));
        ops.push(op(PROCURE, "d", "r5", 502, "", (320, 330)));
        ops.push(Op {
            timed_out: true,
            ..op(RELEASE, "d", "r6", 0, "", (400, 10_400))
        });
        ops.push(op(RELEASE, "d", "r6", 0, "", (500, 501)));
        let faults = [Fault {
            kind: "pause-leader".into(),
            target: "replica-1".into(),
            start_ms: 390,
            end_ms: 2_000,
        }];
        let v = check(&ops, &faults, &clean_etcd(), &[]);
        assert_eq!(v.counts.server_errors, 2, "{}", v.render());
        assert_eq!(v.counts.hung_requests, 1, "{}", v.render());
        assert_eq!(v.counts.total(), 3);
        assert_eq!(v.faults["pause-leader"], 1);
        assert_eq!(v.operations[RELEASE]["timeout"], 1);
        assert_eq!(v.operations[RELEASE]["no answer"], 1);
        let text = v.render();
        assert!(text.contains("pause-leader replica-1"), "{text}");
        assert!(text.contains("verdict: VIOLATED"), "{text}");
    }

    #[test]
    fn the_history_round_trips_through_a_file() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let path = dir.path().join("h.jsonl");
        let log = HistoryLog::create(&path).unwrap_or_else(|e| panic!("create: {e}"));
        for o in clean_ops() {
            log.record(&o);
        }
        log.finish().unwrap_or_else(|e| panic!("{e}"));
        let back: Vec<Op> = read_jsonl(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, clean_ops());
        std::fs::write(&path, "{\"kind\":\"x\"}\nnot json\n").unwrap_or_else(|e| panic!("{e}"));
        let err = read_jsonl::<Op>(&path).err().unwrap_or_default();
        assert!(err.contains("line"), "{err}");
    }
}
