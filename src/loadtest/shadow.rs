//! The `shadow` scenario: simulated pre-scale-up workflows. Each of `--workflows`
//! tasks loops PROCURE -> min-pod-count INCREASE -> RELEASE over the `lt-{i}`
//! deployables, as the workflow in DESIGN.md does, with an idempotency key per step
//! (retries of a step after no answer or a 5xx reuse it, on the next replica when
//! several are given).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use reqwest::Method;
use serde_json::{json, Value};

use crate::loadtest::history;
use crate::loadtest::http::{Client, Reply};
use crate::loadtest::metrics::{EtcdRpcReport, Sampler};
use crate::loadtest::stats::Recorder;
use crate::loadtest::{LoadtestError, Measured, Pick, Shared};

/// Attempts of one request (same idempotency key) after no answer or a 5xx.
const SEND_ATTEMPTS: u32 = 4;
/// PROCURE attempts of one cycle before the workflow gives up on it.
const PROCURE_ATTEMPTS: u32 = 10_000;
/// The node pool of the load test's deployables (registered and seeded).
pub const POOL: &str = "loadtest";

/// Attempts of one registration.
const REGISTER_ATTEMPTS: usize = 6;

/// The name of deployable `i`.
pub fn deployable_name(i: usize) -> String {
    format!("lt-{i}")
}

/// The body that registers deployable `name`.
pub fn register_body(name: &str) -> Value {
    json!({"node_pool": POOL, "dns": format!("{name}.loadtest.invalid")})
}

/// One workflow's view of the run.
struct Workflow {
    id: usize,
    shared: Arc<Shared>,
    client: Client,
    names: Arc<Vec<String>>,
    next: Arc<AtomicUsize>,
    base: String,
    rec: Recorder,
    sampler: Option<Sampler>,
    rpcs: EtcdRpcReport,
    transitions: u64,
    /// Replica of the next request (requests rotate over the replicas).
    replica: usize,
}

impl Workflow {
    /// Sends a request, retrying with the same key while there is no answer or a 5xx
    /// (or, on a retry, while the first attempt is still in flight: 409). Every attempt
    /// is recorded under `label(reply)`.
    async fn send(
        &mut self,
        kind: &str,
        path: &str,
        body: &Value,
        key: &str,
        label: fn(&Reply) -> &'static str,
    ) -> Reply {
        let mut attempt = 0;
        loop {
            let before = match &self.sampler {
                Some(s) => s.sample().await.ok(),
                None => None,
            };
            let replica = self.replica;
            self.replica = self.replica.wrapping_add(1);
            let reply = self
                .client
                .call_on(replica, Method::POST, path, Some(body), Some(key))
                .await;
            self.shared.log(kind, &reply, |op| {
                // A procure by pool learns the name from the answer.
                op.name = body["name"]
                    .as_str()
                    .or(reply.body["name"].as_str())
                    .map(str::to_owned);
                op.run = body["workflow_run_id"].as_str().map(str::to_owned);
                op.key = Some(key.to_owned());
            });
            let l = label(&reply);
            if let (Some(s), Some(before)) = (&self.sampler, before) {
                if let Ok(after) = s.sample().await {
                    self.rpcs.add(l, 1, after.since(before));
                }
            }
            self.shared
                .note(&mut self.rec, l, reply.answer, reply.latency);
            attempt += 1;
            let in_flight = attempt > 1
                && reply.status() == 409
                && reply.body["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("in progress"));
            if !(reply.retryable() || in_flight) || attempt >= SEND_ATTEMPTS {
                return reply;
            }
            tokio::time::sleep(Duration::from_millis(20 << attempt)).await;
        }
    }

    async fn pick(&mut self) -> Option<String> {
        match self.shared.args.pick {
            // A procure by pool never asks (see `procure`); round robin if it did.
            Pick::RoundRobin | Pick::Pool => {
                let i = self.next.fetch_add(1, Ordering::Relaxed) % self.names.len();
                self.names.get(i).cloned()
            }
            Pick::List => {
                let replica = self.replica;
                self.replica = self.replica.wrapping_add(1);
                let reply = self
                    .client
                    .call_on(
                        replica,
                        Method::GET,
                        &format!("{}?in_use=false", self.base),
                        None,
                        None,
                    )
                    .await;
                self.shared.log(history::LIST, &reply, |_| {});
                self.shared
                    .note(&mut self.rec, "list", reply.answer, reply.latency);
                let free: Vec<&str> = reply.body["data"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|d| d["name"].as_str())
                            .filter(|n| n.starts_with("lt-"))
                            .collect()
                    })
                    .unwrap_or_default();
                if free.is_empty() {
                    // Everything is taken: fall back to round robin (and wait on FAILED).
                    let i = self.next.fetch_add(1, Ordering::Relaxed) % self.names.len();
                    return self.names.get(i).cloned();
                }
                let i = rand::thread_rng().gen_range(0..free.len());
                Some(free[i].to_owned())
            }
        }
    }

    fn backoff(&self, delay_secs: u64) -> Duration {
        Duration::from_millis(
            delay_secs
                .saturating_mul(1000)
                .min(self.shared.args.max_retry_delay_ms),
        )
    }

    /// PROCURE until one succeeds, the time is up, or attempts run out.
    async fn procure(&mut self, run: &str) -> Option<String> {
        let body_of = |name: &str| {
            json!({"action": "PROCURE", "name": name, "workflow_run_id": run,
                   "workflow_plan": "loadtest"})
        };
        for attempt in 0..PROCURE_ATTEMPTS {
            if self.shared.budget.expired() {
                return None;
            }
            let by_pool = self.shared.args.pick == Pick::Pool;
            let name = if by_pool {
                None
            } else {
                Some(self.pick().await?)
            };
            let body = match &name {
                Some(n) => body_of(n),
                None => json!({"action": "PROCURE", "node_pool": POOL, "workflow_run_id": run,
                               "workflow_plan": "loadtest"}),
            };
            let path = self.base.clone();
            let reply = self
                .send(
                    history::PROCURE,
                    &path,
                    &body,
                    &format!("{run}-p{attempt}"),
                    |r| {
                        if r.outcome() == "FAILED" {
                            "procure (busy)"
                        } else {
                            "procure"
                        }
                    },
                )
                .await;
            match (reply.status(), reply.outcome()) {
                (200, "PROCURED") => {
                    let Some(name) =
                        name.or_else(|| reply.body["name"].as_str().map(str::to_owned))
                    else {
                        // A pool answer without the name: nothing to hold or release.
                        continue;
                    };
                    self.transitions += 1;
                    self.shared.tracker.procured(&name, self.id);
                    return Some(name);
                }
                (200, "FAILED") => {
                    let delay = reply.body["delay"].as_u64().unwrap_or(0);
                    tokio::time::sleep(self.backoff(delay)).await;
                }
                _ if reply.retryable() => {
                    // The outcome is unknown: the deployable may be ours now. Give it
                    // back (a 409 means it was not) so it is not lost to the pool. A
                    // procure by pool does not know which one: its retries above reuse
                    // the idempotency key, which is all it can do.
                    if let Some(name) = &name {
                        let body =
                            json!({"action": "RELEASE", "name": name, "workflow_run_id": run});
                        self.send(
                            history::RELEASE,
                            &path,
                            &body,
                            &format!("{run}-c{attempt}"),
                            |_| "release (cleanup)",
                        )
                        .await;
                    }
                    tokio::time::sleep(self.backoff(u64::MAX)).await;
                }
                _ => tokio::time::sleep(self.backoff(u64::MAX)).await,
            }
        }
        None
    }

    /// One workflow cycle; false when the budget is used up.
    async fn cycle(&mut self) -> bool {
        let Some(iteration) = self.shared.budget.claim() else {
            return false;
        };
        let run = format!("lt-{}-{}-{iteration}", self.shared.run_id, self.id);
        let Some(name) = self.procure(&run).await else {
            return false;
        };
        let count = self.shared.args.min_pod_count;
        if count > 0 {
            let body = json!({"action": "INCREASE", "count": count, "name": name,
                              "workflow_run_id": run, "workflow_plan": "loadtest"});
            let path = format!("{}/min-pod-count", self.base);
            let reply = self
                .send(
                    history::MIN_POD_COUNT,
                    &path,
                    &body,
                    &format!("{run}-m"),
                    |_| "min-pod-count",
                )
                .await;
            match (reply.status(), reply.outcome()) {
                (200, "UPDATED") => self.transitions += 1,
                (409, _) => {
                    self.shared
                        .tracker
                        .refused_while_held(&name, self.id, "min-pod-count", 409)
                }
                _ => {}
            }
        }
        self.shared.tracker.releasing(&name, self.id);
        let body = json!({"action": "RELEASE", "name": name, "workflow_run_id": run,
                          "workflow_plan": "loadtest"});
        let path = self.base.clone();
        let reply = self
            .send(history::RELEASE, &path, &body, &format!("{run}-r"), |_| {
                "release"
            })
            .await;
        match (reply.status(), reply.outcome()) {
            (200, "RELEASED") => {
                self.transitions += 1;
                self.shared.tracker.released();
            }
            (409, _) => self
                .shared
                .tracker
                .refused_while_held(&name, self.id, "RELEASE", 409),
            _ => {}
        }
        true
    }
}

/// Checks every replica answers at all, so a wrong URL fails fast and clearly.
pub async fn probe(client: &Client, urls: &[String]) -> Result<(), LoadtestError> {
    for (i, url) in urls.iter().enumerate().take(client.replicas()) {
        let reply = client.call_on(i, Method::GET, "/health", None, None).await;
        match reply.status() {
            0 => return Err(LoadtestError::Setup(format!("{url} does not answer"))),
            200 => {}
            s => return Err(LoadtestError::Setup(format!("{url}/health answered {s}"))),
        }
    }
    Ok(())
}

async fn register(shared: &Arc<Shared>, client: &Client) -> Result<Recorder, LoadtestError> {
    let n = shared.args.deployable_count();
    let tasks = shared.args.workflows.min(n);
    let mut set = tokio::task::JoinSet::new();
    for t in 0..tasks {
        let (shared, client) = (shared.clone(), client.clone());
        set.spawn(async move {
            let mut rec = Recorder::new();
            for i in (t..n).step_by(tasks) {
                let name = deployable_name(i);
                let path = format!("/api/1.0/{}/shadow-deployables/{name}", shared.args.env);
                let body = register_body(&name);
                let mut last = 0;
                for attempt in 0..REGISTER_ATTEMPTS {
                    let r = client
                        .call_on(i + attempt, Method::PUT, &path, Some(&body), None)
                        .await;
                    shared.log(history::REGISTER, &r, |op| op.name = Some(name.clone()));
                    rec.record("register", r.answer, r.latency);
                    last = r.status();
                    if !r.retryable() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                }
                if !matches!(last, 200 | 201) {
                    return Err(LoadtestError::Setup(format!(
                        "registering {name} answered {last}{}",
                        if last == 401 { " (pass --token)" } else { "" }
                    )));
                }
            }
            Ok(rec)
        });
    }
    let mut all = Recorder::new();
    while let Some(r) = set.join_next().await {
        let rec = r.map_err(|e| LoadtestError::Setup(format!("register task: {e}")))??;
        all.merge(&rec);
    }
    Ok(all)
}

/// Runs the scenario.
pub async fn run(shared: Arc<Shared>) -> Result<Measured, LoadtestError> {
    let args = &shared.args;
    let client = Client::new(
        &args.url,
        args.token.as_deref(),
        args.workflows + 1,
        args.request_timeout(),
    )?;
    probe(&client, &args.url).await?;
    let setup_start = Instant::now();
    let setup = if args.skip_register {
        Recorder::new()
    } else {
        register(&shared, &client).await?
    };
    let setup_elapsed = setup_start.elapsed();
    shared.budget.restart();
    let names: Arc<Vec<String>> =
        Arc::new((0..args.deployable_count()).map(deployable_name).collect());
    let sampler = match &args.etcd_metrics_url {
        Some(u) => Some(Sampler::new(u).map_err(LoadtestError::Setup)?),
        None => None,
    };
    let per_request = args.workflows == 1;
    let phase_before = match &sampler {
        Some(s) => Some(s.sample().await.map_err(LoadtestError::Setup)?),
        None => None,
    };
    let next = Arc::new(AtomicUsize::new(0));
    let base = format!("/api/1.0/{}/shadow-deployables", args.env);
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for id in 0..args.workflows {
        let mut wf = Workflow {
            id,
            shared: shared.clone(),
            client: client.clone(),
            names: names.clone(),
            next: next.clone(),
            base: base.clone(),
            rec: Recorder::new(),
            sampler: if per_request { sampler.clone() } else { None },
            rpcs: EtcdRpcReport::new("per-request"),
            transitions: 0,
            replica: id,
        };
        set.spawn(async move {
            let mut cycles = 0u64;
            while wf.cycle().await {
                cycles += 1;
            }
            (wf.rec, wf.rpcs, wf.transitions, cycles)
        });
    }
    let mut out = Measured {
        setup,
        setup_elapsed,
        ..Measured::default()
    };
    let mut rpcs = EtcdRpcReport::new(if per_request {
        "per-request, one workflow"
    } else {
        "phase total"
    });
    while let Some(r) = set.join_next().await {
        let (rec, wf_rpcs, transitions, cycles) =
            r.map_err(|e| LoadtestError::Setup(format!("workflow task: {e}")))?;
        out.main.merge(&rec);
        rpcs.merge(&wf_rpcs);
        out.successes += transitions;
        out.cycles += cycles;
    }
    out.elapsed = start.elapsed();
    if let (Some(s), Some(before)) = (&sampler, phase_before) {
        if !per_request {
            if let Ok(after) = s.sample().await {
                rpcs.add("transition", out.successes, after.since(before));
            }
        }
        out.etcd_rpcs = Some(rpcs);
    }
    Ok(out)
}
