//! `resource-plane loadtest`: drives a running service over HTTP (or etcd directly) with
//! simulated workflows, measures every endpoint with HDR histograms, and checks the
//! service's invariants from what it observes.
//!
//! Scenarios:
//! - `shadow` — registers `--deployables` shadow deployables (`lt-{i}`), then
//!   `--workflows` concurrent workflows each loop PROCURE (retrying another deployable
//!   after a capped `delay` on `FAILED`) -> min-pod-count INCREASE -> RELEASE, with
//!   idempotency keys.
//! - `instances` — submits lab instances at `--rate` per second (a `--dnd-ratio` share of
//!   them `do_not_disrupt`) and completes each after `--think-ms`.
//! - `raw-etcd` — the service's CAS pattern issued straight to etcd (one Txn comparing
//!   `mod_revision`, putting the record and its index key): the ceiling to compare with.
//! - `noop` — `GET /health`, the HTTP ceiling; `list` — `GET` of the deployable list.
//! - `seed` — writes deployable and worker records straight into etcd (for scale tests).
//!
//! Every loop is bounded by `--iterations` and by time (`--duration`, default 10 s; a
//! hard limit of 300 s applies when only `--iterations` is given). Only `--url` (and the
//! `--etcd-endpoints` of the etcd scenarios) is ever contacted. `--url a,b` spreads the
//! requests over several replicas (a retry goes to the next one), and `--history FILE`
//! records every request as a JSON line for `resource-plane soak-check`
//! ([`history`], [`soak_check`]). `--report FILE` writes a self-contained HTML report
//! of the run: charts over time per endpoint from the [`timeline`], the latency
//! distribution, errors, invariants, parameters and machine ([`report`]).
//!
//! The library entry point is [`run`]; the binary parses [`LoadtestArgs`] and calls
//! [`main`].

pub mod etcd;
pub mod history;
pub mod http;
pub mod invariants;
pub mod metrics;
pub mod report;
pub mod requests;
pub mod shadow;
pub mod soak_check;
pub mod stats;
pub mod svg;
pub mod timeline;

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use serde::Serialize;

use crate::config::valid_segment;
use crate::loadtest::history::{HistoryLog, Op};
use crate::loadtest::http::Reply;
use crate::loadtest::invariants::{HolderTracker, InvariantReport};
use crate::loadtest::metrics::EtcdRpcReport;
use crate::loadtest::stats::{Answer, EndpointSummary, Recorder};
use crate::loadtest::timeline::Timeline;

/// Time limit when only `--iterations` bounds the run.
pub const ITERATIONS_TIME_LIMIT: Duration = Duration::from_secs(300);
/// Longest accepted `--duration`.
pub const MAX_DURATION: Duration = Duration::from_secs(3600);
/// Most concurrent workflows / clients.
pub const MAX_CONCURRENCY: usize = 4096;

/// What the harness does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Procure -> min-pod-count -> release workflows over registered deployables.
    Shadow,
    /// Lab instances submitted at a rate and completed after a think time.
    Instances,
    /// The CAS transaction pattern straight to etcd (the ceiling).
    RawEtcd,
    /// `GET /health` (the HTTP ceiling).
    Noop,
    /// `GET /api/1.0/{env}/shadow-deployables`.
    List,
    /// Write `--deployables` and `--workers` records straight into etcd.
    Seed,
}

impl Scenario {
    /// The name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Scenario::Shadow => "shadow",
            Scenario::Instances => "instances",
            Scenario::RawEtcd => "raw-etcd",
            Scenario::Noop => "noop",
            Scenario::List => "list",
            Scenario::Seed => "seed",
        }
    }
}

/// How a workflow chooses the deployable it tries to procure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Pick {
    /// The next name of a counter shared by all workflows (no extra request).
    RoundRobin,
    /// A random FREE one from `GET …?in_use=false` (one list request per attempt).
    List,
    /// None: PROCURE names the node pool (`loadtest`) and the service picks a FREE one
    /// (one request per attempt, no list).
    Pool,
}

/// Arguments of `resource-plane loadtest`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "loadtest",
    about = "Drive a running resource-plane (or etcd) with simulated workflows and check its invariants"
)]
pub struct LoadtestArgs {
    /// Scenario to run.
    #[arg(long, value_enum, default_value_t = Scenario::Shadow)]
    pub scenario: Scenario,
    /// Base URL of the service; nothing else is contacted over HTTP. Several replicas,
    /// comma-separated, share the load (a retry goes to the next one).
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:8080")]
    pub url: Vec<String>,
    /// Bearer token (the service's API_AUTH_TOKEN).
    #[arg(long)]
    pub token: Option<String>,
    /// `{env}` path segment of the shadow routes.
    #[arg(long, default_value = "int")]
    pub env: String,
    /// Concurrent workflows (or clients, or in-flight instances).
    #[arg(long, default_value_t = 64)]
    pub workflows: usize,
    /// Shadow deployables to register and use (`lt-0` … `lt-{N-1}`); default: `--workflows`.
    #[arg(long)]
    pub deployables: Option<usize>,
    /// Do not register the deployables (they exist already, e.g. seeded).
    #[arg(long)]
    pub skip_register: bool,
    /// How long to run (`10s`, `500ms`, `2m`, or seconds); default 10 s.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Stop after this many iterations (workflow cycles, requests, instances, txns).
    #[arg(long)]
    pub iterations: Option<u64>,
    /// Cap on the wait after `{"status":"FAILED","delay":d}` (d is in seconds).
    #[arg(long, default_value_t = 50)]
    pub max_retry_delay_ms: u64,
    /// How a workflow chooses a deployable to procure.
    #[arg(long, value_enum, default_value_t = Pick::RoundRobin)]
    pub pick: Pick,
    /// Page size of the `list` scenario (`?limit=N`, 1..=10000); default: no `limit`
    /// (the whole list, up to the service's maximum page).
    #[arg(long)]
    pub limit: Option<usize>,
    /// `count` of the min-pod-count INCREASE step; 0 skips the step.
    #[arg(long, default_value_t = 1)]
    pub min_pod_count: u32,
    /// Instances submitted per second (`instances`).
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    /// Milliseconds between submitting an instance and completing it (`instances`).
    #[arg(long, default_value_t = 500)]
    pub think_ms: u64,
    /// CPU each instance requires (`instances`).
    #[arg(long, default_value_t = 1.0)]
    pub cpu: f64,
    /// Memory (GB) each instance requires (`instances`).
    #[arg(long, default_value_t = 4.0)]
    pub memory_gb: f64,
    /// Share of instances submitted with `do_not_disrupt` (`instances`), 0..=1.
    #[arg(long, default_value_t = 0.0)]
    pub dnd_ratio: f64,
    /// Write every request (kind, replica, start/end, status, outcome) to this file as
    /// JSON lines, for `resource-plane soak-check`.
    #[arg(long)]
    pub history: Option<PathBuf>,
    /// etcd endpoints, `host:port`, comma-separated (`raw-etcd`, `seed`).
    #[arg(long, value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// Key prefix (the service's ETCD_PREFIX) for `seed`; `raw-etcd` writes under
    /// `{prefix}/loadtest/{run}/` and deletes it afterwards.
    #[arg(long, default_value = "")]
    pub etcd_prefix: String,
    /// `raw-etcd`: every client on one key (contention) instead of one key each.
    #[arg(long)]
    pub hot_key: bool,
    /// etcd's `/metrics` URL: count Txn and Range RPCs per operation (exact per step
    /// with `--workflows 1`, a total per transition otherwise).
    #[arg(long)]
    pub etcd_metrics_url: Option<String>,
    /// Worker records to write (`seed`).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Instance records to write (`seed`): `--pending` of them PENDING and larger than
    /// any worker (they stay pending: the scheduler's backlog), the rest COMPLETED.
    #[arg(long, default_value_t = 0)]
    pub instances: usize,
    /// How many of the seeded `--instances` are PENDING (`seed`).
    #[arg(long, default_value_t = 0)]
    pub pending: usize,
    /// Per-request deadline in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub request_timeout_ms: u64,
    /// Write a self-contained HTML report of the run (charts, distribution, errors,
    /// invariants, parameters, machine) to this file.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Print a JSON summary on stdout (the table goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// No live progress even on a terminal.
    #[arg(long)]
    pub no_progress: bool,
}

impl LoadtestArgs {
    /// The defaults of every option, as `resource-plane loadtest` with no option.
    pub fn defaults() -> Self {
        Self::parse_from(["loadtest"])
    }

    /// Number of deployables used by `shadow` and written by `seed`.
    pub fn deployable_count(&self) -> usize {
        self.deployables.unwrap_or(self.workflows)
    }

    /// The time limit of the run.
    pub fn time_limit(&self) -> Duration {
        match (self.duration, self.iterations) {
            (Some(d), _) => d,
            (None, Some(_)) => ITERATIONS_TIME_LIMIT,
            (None, None) => Duration::from_secs(10),
        }
    }

    /// Checks combinations clap cannot express.
    pub fn validate(&self) -> Result<(), LoadtestError> {
        let bad = |m: String| Err(LoadtestError::Args(m));
        if self.workflows == 0 || self.workflows > MAX_CONCURRENCY {
            return bad(format!("--workflows must be 1..={MAX_CONCURRENCY}"));
        }
        if self.deployable_count() == 0 || self.deployable_count() > 1_000_000 {
            return bad("--deployables must be 1..=1000000".into());
        }
        if self.workers > 1_000_000 {
            return bad("--workers must be at most 1000000".into());
        }
        if self.instances > 1_000_000 {
            return bad("--instances must be at most 1000000".into());
        }
        if self.pending > self.instances {
            return bad("--pending must be at most --instances".into());
        }
        if let Some(d) = self.duration {
            if d.is_zero() || d > MAX_DURATION {
                return bad(format!(
                    "--duration must be positive and at most {} s",
                    MAX_DURATION.as_secs()
                ));
            }
        }
        if self.iterations == Some(0) {
            return bad("--iterations must be positive".into());
        }
        if !(0.0..=1.0).contains(&self.dnd_ratio) {
            return bad("--dnd-ratio must be in [0, 1]".into());
        }
        if !(self.rate.is_finite() && self.rate > 0.0 && self.rate <= 100_000.0) {
            return bad("--rate must be in (0, 100000]".into());
        }
        if self.request_timeout_ms == 0 || self.request_timeout_ms > 600_000 {
            return bad("--request-timeout-ms must be 1..=600000".into());
        }
        if self.think_ms > 600_000 || self.max_retry_delay_ms > 600_000 {
            return bad("--think-ms and --max-retry-delay-ms must be at most 600000".into());
        }
        if self.limit.is_some_and(|l| !(1..=10_000).contains(&l)) {
            return bad("--limit must be 1..=10000".into());
        }
        if !valid_segment(&self.env) {
            return bad(format!("--env {:?} is not a valid environment", self.env));
        }
        let uses_http = !matches!(self.scenario, Scenario::RawEtcd | Scenario::Seed);
        if uses_http {
            if self.url.is_empty() {
                return bad("--url needs at least one URL".into());
            }
            if let Some(u) = self
                .url
                .iter()
                .find(|u| !(u.starts_with("http://") || u.starts_with("https://")))
            {
                return bad(format!("--url {u:?} must start with http:// or https://"));
            }
        }
        if !uses_http && self.etcd_endpoints.is_empty() {
            return bad(format!(
                "--scenario {} needs --etcd-endpoints host:port",
                self.scenario.as_str()
            ));
        }
        if self.etcd_prefix.ends_with('/') {
            return bad("--etcd-prefix must not end with '/'".into());
        }
        Ok(())
    }

    pub(crate) fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

/// Parses `10s`, `250ms`, `2m`, `1h` or a number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 10s, 500ms, 2m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unit must be ms, s, m or h")),
    };
    if !secs.is_finite() || !(0.0..=1.0e7).contains(&secs) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Why the harness could not run (as opposed to an invariant breaking).
#[derive(Debug, thiserror::Error)]
pub enum LoadtestError {
    /// Invalid option values.
    #[error("invalid arguments: {0}")]
    Args(String),
    /// The target could not be reached or refused the setup.
    #[error("setup failed: {0}")]
    Setup(String),
    /// etcd failed in a way the scenario cannot go on with.
    #[error("etcd: {0}")]
    Etcd(String),
}

impl LoadtestError {
    /// Process exit code: 64 (EX_USAGE) for arguments, 69 (EX_UNAVAILABLE) otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            LoadtestError::Args(_) => 64,
            LoadtestError::Setup(_) | LoadtestError::Etcd(_) => 69,
        }
    }
}

/// When to stop: a deadline and an optional iteration budget, shared by all tasks.
#[derive(Debug)]
pub struct Budget {
    origin: Instant,
    limit: Duration,
    /// Deadline, in nanoseconds after `origin` (restartable after a setup phase).
    deadline_ns: AtomicU64,
    iterations: Option<u64>,
    claimed: AtomicU64,
}

impl Budget {
    /// A budget of `limit` from now and at most `iterations` claims.
    pub fn new(limit: Duration, iterations: Option<u64>) -> Self {
        Self {
            origin: Instant::now(),
            limit,
            deadline_ns: AtomicU64::new(nanos(limit)),
            iterations,
            claimed: AtomicU64::new(0),
        }
    }

    /// Starts the time limit again from now (after a setup phase).
    pub fn restart(&self) {
        let deadline = self.origin.elapsed() + self.limit;
        self.deadline_ns.store(nanos(deadline), Ordering::Relaxed);
    }

    /// Claims one iteration: its number, or `None` when time or count is used up.
    pub fn claim(&self) -> Option<u64> {
        if self.expired() {
            return None;
        }
        let n = self.claimed.fetch_add(1, Ordering::Relaxed);
        match self.iterations {
            Some(max) if n >= max => None,
            _ => Some(n),
        }
    }

    /// Whether the deadline has passed.
    pub fn expired(&self) -> bool {
        self.remaining().is_zero()
    }

    /// Time since the current phase began (the budget's creation or last restart).
    pub fn phase_elapsed(&self) -> Duration {
        let deadline = Duration::from_nanos(self.deadline_ns.load(Ordering::Relaxed));
        let start = deadline.saturating_sub(self.limit);
        self.origin.elapsed().saturating_sub(start)
    }

    /// Time left before the deadline.
    pub fn remaining(&self) -> Duration {
        let deadline = Duration::from_nanos(self.deadline_ns.load(Ordering::Relaxed));
        deadline.saturating_sub(self.origin.elapsed())
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Live counters the progress display reads.
#[derive(Debug, Default)]
pub struct Progress {
    ops: AtomicU64,
    errors: AtomicU64,
}

impl Progress {
    /// Counts one request.
    pub fn note(&self, answer: Answer) {
        self.ops.fetch_add(1, Ordering::Relaxed);
        if !answer.is_ok() {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// What every scenario shares.
pub struct Shared {
    /// The arguments.
    pub args: LoadtestArgs,
    /// Invariant checks.
    pub tracker: HolderTracker,
    /// Live counters.
    pub progress: Progress,
    /// When to stop.
    pub budget: Budget,
    /// Unique id of this run (keys, run ids), so reruns never replay old answers.
    pub run_id: String,
    /// Where every request is recorded (`--history`).
    pub history: Option<HistoryLog>,
    /// The measured phase in time buckets (filled only for `--report`).
    pub timeline: Timeline,
}

impl Shared {
    /// Records an answer everywhere it counts.
    pub fn note(&self, rec: &mut Recorder, label: &str, answer: Answer, latency: Duration) {
        rec.record(label, answer, latency);
        // Time buckets cost a second histogram per request: only for a report.
        if self.args.report.is_some() {
            let since_start = self.budget.phase_elapsed();
            self.timeline
                .record(&mut rec.pending, since_start, label, answer, latency);
        }
        self.tracker.observe(answer);
        self.progress.note(answer);
    }

    /// Records `reply` to the history (when `--history` was given) as an operation of
    /// `kind`; `fill` adds what the caller knows (name, run, key, instance).
    pub fn log(&self, kind: &str, reply: &Reply, fill: impl FnOnce(&mut Op)) {
        let Some(h) = &self.history else { return };
        let mut op = Op {
            kind: kind.to_owned(),
            replica: reply.replica,
            start_ms: reply.start_ms,
            end_ms: reply.end_ms,
            status: reply.status(),
            timed_out: reply.timed_out,
            outcome: reply.body["status"].as_str().map(str::to_owned),
            min_pod_count: reply.body["min_pod_count"].as_u64(),
            ..Op::default()
        };
        fill(&mut op);
        h.record(&op);
    }
}

/// What a scenario measured.
#[derive(Debug, Default)]
pub struct Measured {
    /// Requests of the setup phase (registration, seeding).
    pub setup: Recorder,
    /// Length of the setup phase.
    pub setup_elapsed: Duration,
    /// Requests of the measured phase.
    pub main: Recorder,
    /// Length of the measured phase.
    pub elapsed: Duration,
    /// Completed cycles (workflows, instances, requests).
    pub cycles: u64,
    /// Successful operations (state transitions for `shadow` and `raw-etcd`, answered
    /// requests otherwise).
    pub successes: u64,
    /// etcd RPC counts, when `--etcd-metrics-url` was given.
    pub etcd_rpcs: Option<EtcdRpcReport>,
}

/// The result of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Scenario run.
    pub scenario: Scenario,
    /// How the `shadow` scenario chose deployables (`round-robin`, `list`, `pool`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pick: Option<&'static str>,
    /// URL or etcd endpoints.
    pub target: String,
    /// Concurrent workflows / clients.
    pub concurrency: usize,
    /// Unique id of the run.
    pub run_id: String,
    /// Length of the measured phase.
    pub elapsed_secs: f64,
    /// Completed cycles.
    pub cycles: u64,
    /// Completed cycles per second.
    pub cycles_per_sec: f64,
    /// Successful operations per second (state transitions for `shadow`/`raw-etcd`).
    pub throughput: f64,
    /// Setup requests, one row per endpoint.
    pub setup: Vec<EndpointSummary>,
    /// Measured requests, one row per endpoint.
    pub endpoints: Vec<EndpointSummary>,
    /// Invariant verdict.
    pub invariants: InvariantReport,
    /// etcd RPCs per operation, when measured.
    pub etcd_rpcs: Option<EtcdRpcReport>,
}

impl Report {
    /// Whether every invariant held.
    pub fn passed(&self) -> bool {
        self.invariants.ok
    }

    /// The row of `endpoint`, if any request of it was made.
    pub fn endpoint(&self, endpoint: &str) -> Option<&EndpointSummary> {
        self.endpoints.iter().find(|e| e.endpoint == endpoint)
    }

    /// Human-readable summary: the tables and the invariant verdict.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "scenario {}{} against {}: concurrency {}, {:.1} s, {} cycles ({:.1}/s), {:.1} successful ops/s",
            self.scenario.as_str(),
            self.pick.map(|p| format!(" (pick {p})")).unwrap_or_default(),
            self.target,
            self.concurrency,
            self.elapsed_secs,
            self.cycles,
            self.cycles_per_sec,
            self.throughput
        );
        if !self.setup.is_empty() {
            let _ = writeln!(out, "\nsetup:");
            out.push_str(&stats::table(&self.setup));
        }
        let _ = writeln!(out);
        out.push_str(&stats::table(&self.endpoints));
        if let Some(r) = &self.etcd_rpcs {
            let _ = writeln!(out, "\netcd RPCs ({}):", r.attribution);
            out.push_str(&r.table());
        }
        let inv = &self.invariants;
        let _ = writeln!(
            out,
            "\ninvariants: {} (procured {}, released {}, unreleased {}, instances {}/{} completed, 5xx {})",
            if inv.ok { "OK" } else { "VIOLATED" },
            inv.procured,
            inv.released,
            inv.unreleased,
            inv.instances_completed,
            inv.instances_submitted,
            inv.server_errors
        );
        for m in &inv.messages {
            let _ = writeln!(out, "  - {m}");
        }
        out
    }
}

/// Runs the scenario of `args` to completion and reports what it measured. Invariant
/// violations are in the report ([`Report::passed`]); `Err` means the run could not
/// happen (bad arguments, target unreachable).
pub async fn run(args: LoadtestArgs) -> Result<Report, LoadtestError> {
    args.validate()?;
    let history = match &args.history {
        Some(p) => Some(
            HistoryLog::create(p)
                .map_err(|e| LoadtestError::Setup(format!("cannot create {}: {e}", p.display())))?,
        ),
        None => None,
    };
    // Fail before the run, not after it, when the report cannot be written.
    if let Some(p) = &args.report {
        std::fs::File::create(p)
            .map_err(|e| LoadtestError::Setup(format!("cannot create {}: {e}", p.display())))?;
    }
    let shared = Arc::new(Shared {
        history,
        timeline: Timeline::new(args.time_limit()),
        budget: Budget::new(args.time_limit(), args.iterations),
        tracker: HolderTracker::new(),
        progress: Progress::default(),
        run_id: uuid::Uuid::new_v4().simple().to_string()[..12].to_owned(),
        args,
    });
    let done = Arc::new(AtomicBool::new(false));
    let bar = spawn_progress(&shared, done.clone());
    let measured = match shared.args.scenario {
        Scenario::Shadow => shadow::run(shared.clone()).await,
        Scenario::Instances => requests::instances(shared.clone()).await,
        Scenario::Noop => requests::get_loop(shared.clone(), "/health".into(), "health").await,
        Scenario::List => {
            let path = match shared.args.limit {
                Some(l) => format!("/api/1.0/{}/shadow-deployables?limit={l}", shared.args.env),
                None => format!("/api/1.0/{}/shadow-deployables", shared.args.env),
            };
            requests::get_loop(shared.clone(), path, "list").await
        }
        Scenario::RawEtcd => etcd::raw(shared.clone()).await,
        Scenario::Seed => etcd::seed(shared.clone()).await,
    };
    done.store(true, Ordering::Relaxed);
    if let Some(b) = bar {
        let _ = b.await;
    }
    if let Some(h) = &shared.history {
        h.finish().map_err(LoadtestError::Setup)?;
    }
    let m = measured?;
    let args = &shared.args;
    let secs = m.elapsed.as_secs_f64().max(1e-9);
    let target = match args.scenario {
        Scenario::RawEtcd | Scenario::Seed => args.etcd_endpoints.join(","),
        _ => args.url.join(","),
    };
    let pick = (args.scenario == Scenario::Shadow).then_some(match args.pick {
        Pick::RoundRobin => "round-robin",
        Pick::List => "list",
        Pick::Pool => "pool",
    });
    let report = Report {
        scenario: args.scenario,
        pick,
        target,
        concurrency: args.workflows,
        run_id: shared.run_id.clone(),
        elapsed_secs: m.elapsed.as_secs_f64(),
        cycles: m.cycles,
        cycles_per_sec: m.cycles as f64 / secs,
        throughput: m.successes as f64 / secs,
        setup: m.setup.summaries(m.setup_elapsed),
        endpoints: m.main.summaries(m.elapsed),
        invariants: shared.tracker.report(),
        etcd_rpcs: m.etcd_rpcs.clone(),
    };
    if let Some(path) = &args.report {
        // On the timeline's clock, just after the last request of the phase.
        let phase_end = shared.budget.phase_elapsed();
        shared.timeline.absorb(&m.main.pending);
        let html = report::html(&report::Input {
            report: &report,
            args,
            width_secs: shared.timeline.width().as_secs_f64(),
            series: shared.timeline.series(phase_end),
            distributions: m.main.distributions(report::HISTOGRAM_BINS),
            machine: report::Machine::probe(),
        });
        std::fs::write(path, html)
            .map_err(|e| LoadtestError::Setup(format!("cannot write {}: {e}", path.display())))?;
    }
    Ok(report)
}

/// Shows live progress on stderr when it is a terminal; the task ends once `done`.
fn spawn_progress(
    shared: &Arc<Shared>,
    done: Arc<AtomicBool>,
) -> Option<tokio::task::JoinHandle<()>> {
    if shared.args.no_progress || !std::io::stderr().is_terminal() {
        return None;
    }
    let shared = shared.clone();
    Some(tokio::spawn(async move {
        let bar = indicatif::ProgressBar::new_spinner();
        if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} [{elapsed}] {msg}") {
            bar.set_style(style);
        }
        let mut last = (Instant::now(), 0u64);
        while !done.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let ops = shared.progress.ops.load(Ordering::Relaxed);
            let errors = shared.progress.errors.load(Ordering::Relaxed);
            let dt = last.0.elapsed().as_secs_f64().max(1e-3);
            let rate = (ops - last.1) as f64 / dt;
            last = (Instant::now(), ops);
            bar.set_message(format!(
                "{} {ops} requests, {rate:.0}/s now, {errors} non-2xx, {} held, {:.0} s left",
                shared.args.scenario.as_str(),
                shared.tracker.held(),
                shared.budget.remaining().as_secs_f64()
            ));
            bar.tick();
        }
        bar.finish_and_clear();
    }))
}

/// Runs the harness for the binary: prints the table (stdout, or stderr with `--json`)
/// and the JSON summary, and returns the exit code: 0 when every invariant held, 1 when
/// one broke, 64/69 when the run could not happen.
pub async fn main(args: LoadtestArgs) -> u8 {
    let json = args.json;
    match run(args).await {
        Ok(report) => {
            if json {
                eprint!("{}", report.render());
                match serde_json::to_string_pretty(&report) {
                    Ok(s) => println!("{s}"),
                    Err(e) => eprintln!("resource-plane loadtest: cannot encode the report: {e}"),
                }
            } else {
                print!("{}", report.render());
            }
            if report.passed() {
                0
            } else {
                1
            }
        }
        Err(e) => {
            eprintln!("resource-plane loadtest: {e}");
            e.exit_code()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<LoadtestArgs, clap::Error> {
        LoadtestArgs::try_parse_from(std::iter::once("loadtest").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let a = LoadtestArgs::defaults();
        assert_eq!(a.scenario, Scenario::Shadow);
        assert_eq!(a.url, vec!["http://127.0.0.1:8080"]);
        assert_eq!(a.workflows, 64);
        assert_eq!(a.deployable_count(), 64);
        assert_eq!(a.max_retry_delay_ms, 50);
        assert_eq!(a.time_limit(), Duration::from_secs(10));
        assert_eq!(a.pick, Pick::RoundRobin);
        assert_eq!(a.min_pod_count, 1);
        assert!(!a.json);
        a.validate().expect("defaults are valid");
    }

    #[test]
    fn options_parse() {
        let a = parse(&[
            "--scenario",
            "raw-etcd",
            "--etcd-endpoints",
            "127.0.0.1:1,127.0.0.1:2",
            "--workflows",
            "16",
            "--hot-key",
            "--duration",
            "1500ms",
            "--json",
        ])
        .expect("parse");
        assert_eq!(a.scenario, Scenario::RawEtcd);
        assert_eq!(a.etcd_endpoints, vec!["127.0.0.1:1", "127.0.0.1:2"]);
        assert_eq!(a.workflows, 16);
        assert!(a.hot_key && a.json);
        assert_eq!(a.time_limit(), Duration::from_millis(1500));
        a.validate().expect("valid");
        let a = parse(&[
            "--iterations",
            "300",
            "--deployables",
            "8",
            "--pick",
            "list",
        ])
        .expect("parse");
        assert_eq!(a.time_limit(), ITERATIONS_TIME_LIMIT);
        assert_eq!(a.deployable_count(), 8);
        assert_eq!(a.pick, Pick::List);
        let a = parse(&["--pick", "pool", "--scenario", "list", "--limit", "100"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((a.pick, a.limit), (Pick::Pool, Some(100)));
        assert!(a.validate().is_ok());
        let a = parse(&["--limit", "0"]).unwrap_or_else(|e| panic!("{e}"));
        assert!(a.validate().is_err());
    }

    #[test]
    fn bad_options_are_refused() {
        assert!(parse(&["--scenario", "nope"]).is_err());
        assert!(parse(&["--duration", "ten"]).is_err());
        assert!(parse(&["--workflows", "-1"]).is_err());
        let check = |args: &[&str]| parse(args).expect("parse").validate();
        assert!(matches!(
            check(&["--scenario", "raw-etcd"]),
            Err(LoadtestError::Args(_))
        ));
        assert!(check(&["--workflows", "0"]).is_err());
        assert!(check(&["--iterations", "0"]).is_err());
        assert!(check(&["--url", "ftp://x"]).is_err());
        assert!(check(&["--url", "http://a:1,ftp://x"]).is_err());
        assert!(check(&["--dnd-ratio", "1.5"]).is_err());
        assert!(check(&["--instances", "10", "--pending", "11"]).is_err());
        assert!(check(&["--instances", "10", "--pending", "10"]).is_ok());
        let a = parse(&["--url", "http://a:1,http://b:2"]).expect("parse");
        assert_eq!(a.url, vec!["http://a:1", "http://b:2"]);
        a.validate().expect("two replicas are valid");
        assert!(check(&["--env", "a/b"]).is_err());
        assert!(check(&["--rate", "0"]).is_err());
        assert!(check(&["--duration", "2h"]).is_err());
        assert_eq!(LoadtestError::Args(String::new()).exit_code(), 64);
        assert_eq!(LoadtestError::Setup(String::new()).exit_code(), 69);
    }

    #[tokio::test]
    async fn a_report_that_cannot_be_written_fails_before_the_run() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("no-such-dir").join("report.html");
        let mut args = parse(&["--url", "http://127.0.0.1:9", "--iterations", "1"]).expect("parse");
        args.report = Some(missing);
        match run(args).await {
            Err(LoadtestError::Setup(m)) => assert!(m.contains("cannot create"), "{m}"),
            other => panic!("expected a setup error, got {other:?}"),
        }
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn the_budget_stops_at_the_count_and_at_the_deadline() {
        let b = Budget::new(Duration::from_secs(60), Some(2));
        assert_eq!(b.claim(), Some(0));
        assert_eq!(b.claim(), Some(1));
        assert_eq!(b.claim(), None);
        let b = Budget::new(Duration::ZERO, None);
        assert!(b.expired());
        assert_eq!(b.claim(), None);
        let b = Budget::new(Duration::from_secs(3600), None);
        b.restart();
        assert!(b.remaining() > Duration::from_secs(3599));
    }

    #[test]
    fn seeded_pending_instances_fit_no_worker_and_the_rest_have_ended() {
        let w = etcd::seed_worker(0);
        let p = etcd::seed_instance(0, true);
        assert_eq!(p.state, crate::domain::worker::InstanceState::Pending);
        assert!(!p.requirements.fits_in(&w.capacity));
        let c = etcd::seed_instance(1, false);
        assert_eq!(c.state, crate::domain::worker::InstanceState::Completed);
        assert!(!c.is_live());
        assert_ne!(p.id, c.id);
    }
}
