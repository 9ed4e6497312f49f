//! Request-loop scenarios: `noop` and `list` (closed loops of one GET), and
//! `instances` (an open loop submitting lab instances at a fixed rate, some of them
//! `do_not_disrupt`, each with an idempotency key; retries go to the next replica).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use reqwest::Method;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;

use crate::loadtest::history;
use crate::loadtest::http::Client;
use crate::loadtest::shadow::probe;
use crate::loadtest::stats::Recorder;
use crate::loadtest::{LoadtestError, Measured, Shared};

/// Attempts of a submission or a completion after no answer or a 5xx.
const ATTEMPTS: usize = 4;

fn client(shared: &Shared) -> Result<Client, LoadtestError> {
    let a = &shared.args;
    Client::new(
        &a.url,
        a.token.as_deref(),
        a.workflows + 1,
        a.request_timeout(),
    )
}

/// `--workflows` tasks each GET `path` in a loop until the budget is used up.
pub async fn get_loop(
    shared: Arc<Shared>,
    path: String,
    label: &'static str,
) -> Result<Measured, LoadtestError> {
    let client = client(&shared)?;
    probe(&client, &shared.args.url).await?;
    let path = Arc::new(path);
    let start = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..shared.args.workflows {
        let (shared, client, path) = (shared.clone(), client.clone(), path.clone());
        set.spawn(async move {
            let mut rec = Recorder::new();
            let mut n = 0u64;
            while let Some(claim) = shared.budget.claim() {
                let r = client.get_unparsed(claim as usize, &path).await;
                shared.note(&mut rec, label, r.answer, r.latency);
                n += 1;
            }
            (rec, n)
        });
    }
    let mut out = Measured::default();
    while let Some(r) = set.join_next().await {
        let (rec, n) = r.map_err(|e| LoadtestError::Setup(format!("request task: {e}")))?;
        out.main.merge(&rec);
        out.cycles += n;
    }
    out.elapsed = start.elapsed();
    out.successes = out.main.ok(label);
    Ok(out)
}

/// Submits instance `n`, waits `think`, completes it.
async fn one_instance(
    shared: Arc<Shared>,
    client: Client,
    think: Duration,
    n: u64,
) -> (Recorder, bool) {
    let mut rec = Recorder::new();
    let a = &shared.args;
    let dnd = a.dnd_ratio > 0.0 && rand::thread_rng().gen_bool(a.dnd_ratio);
    let body = json!({"requirements": {"cpu": a.cpu, "memory_gb": a.memory_gb},
                      "do_not_disrupt": dnd});
    let key = format!("lt-{}-i{n}", shared.run_id);
    let replica = n as usize;
    let mut id = None;
    for attempt in 0..ATTEMPTS {
        let r = client
            .call_on(
                replica + attempt,
                Method::POST,
                "/api/1.0/instances",
                Some(&body),
                Some(&key),
            )
            .await;
        shared.note(&mut rec, "submit instance", r.answer, r.latency);
        let accepted = r.body["id"]
            .as_str()
            .filter(|_| r.status() == 202)
            .map(str::to_owned);
        shared.log(history::SUBMIT, &r, |op| {
            op.key = Some(key.clone());
            op.instance.clone_from(&accepted);
            op.do_not_disrupt = Some(dnd);
        });
        if accepted.is_some() || !r.retryable() {
            id = accepted;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
    }
    let Some(id) = id else {
        return (rec, false);
    };
    shared.tracker.instance_submitted();
    tokio::time::sleep(think).await;
    let path = format!("/api/1.0/instances/{id}/complete");
    for attempt in 0..ATTEMPTS {
        let r = client
            .call_on(replica + attempt, Method::POST, &path, None, None)
            .await;
        shared.log(history::COMPLETE, &r, |op| op.instance = Some(id.clone()));
        shared.note(&mut rec, "complete instance", r.answer, r.latency);
        if r.status() == 200 {
            shared.tracker.instance_completed();
            return (rec, true);
        }
        if !r.retryable() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
    }
    (rec, false)
}

/// The `instances` scenario: an open loop at `--rate` per second, at most
/// `--workflows` instances in flight (the rate drops when the service is slower).
pub async fn instances(shared: Arc<Shared>) -> Result<Measured, LoadtestError> {
    let client = client(&shared)?;
    probe(&client, &shared.args.url).await?;
    let think = Duration::from_millis(shared.args.think_ms);
    let in_flight = Arc::new(Semaphore::new(shared.args.workflows));
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / shared.args.rate));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut out = Measured::default();
    let mut set = JoinSet::new();
    let absorb = |r: Result<(Recorder, bool), tokio::task::JoinError>,
                  out: &mut Measured|
     -> Result<(), LoadtestError> {
        let (rec, done) = r.map_err(|e| LoadtestError::Setup(format!("instance task: {e}")))?;
        out.main.merge(&rec);
        if done {
            out.cycles += 1;
            out.successes += 1;
        }
        Ok(())
    };
    let start = Instant::now();
    loop {
        ticker.tick().await;
        let Some(n) = shared.budget.claim() else {
            break;
        };
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let (s, c) = (shared.clone(), client.clone());
        set.spawn(async move {
            let r = one_instance(s, c, think, n).await;
            drop(permit);
            r
        });
        while let Some(r) = set.try_join_next() {
            absorb(r, &mut out)?;
        }
    }
    while let Some(r) = set.join_next().await {
        absorb(r, &mut out)?;
    }
    out.elapsed = start.elapsed();
    Ok(out)
}
