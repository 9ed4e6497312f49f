//! Scenarios that talk to etcd directly with `etcd-client`:
//! - `raw-etcd`: the service's CAS pattern with nothing in front of it — one Txn that
//!   compares the record's `mod_revision`, puts the record (the same JSON the service
//!   writes) and its in-use index key, and reads the record back when the compare
//!   fails. One key per client, or all on one key with `--hot-key`. This is the ceiling
//!   the service's procure/release throughput is compared with.
//! - `seed`: writes `--deployables` shadow deployables (FREE, with their index keys) and
//!   `--workers` RUNNING workers in batched transactions, for scale tests.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, KvClient, Txn, TxnOp, TxnOpResponse,
};
use tokio::task::JoinSet;

use crate::domain::shadow::{Owner, ShadowDeployable, ShadowState};
use crate::domain::worker::{
    Instance, InstanceState, Resources, Worker, WorkerState, WorkerTemplate,
};
use crate::keys;
use crate::loadtest::metrics::{EtcdRpcReport, Sampler};
use crate::loadtest::shadow::{deployable_name, register_body};
use crate::loadtest::stats::{Answer, Recorder};
use crate::loadtest::{LoadtestError, Measured, Shared};

/// etcd's default `--max-txn-ops`.
const MAX_TXN_OPS: usize = 128;

/// The template seeded workers claim to be of (as in `config/worker-templates.yaml`).
pub const SEED_TEMPLATE: &str = "m5zn-metal";

async fn connect(shared: &Shared) -> Result<Client, LoadtestError> {
    let timeout = shared.args.request_timeout();
    let opts = ConnectOptions::new()
        .with_connect_timeout(timeout.min(Duration::from_secs(5)))
        .with_timeout(timeout);
    let endpoints = shared.args.etcd_endpoints.clone();
    tokio::time::timeout(timeout, Client::connect(endpoints, Some(opts)))
        .await
        .map_err(|_| LoadtestError::Etcd("timed out connecting".into()))?
        .map_err(|e| LoadtestError::Etcd(format!("connect: {e}")))
}

/// The record a CAS flips to next: FREE -> PROCURED by `run`, or back.
fn flip(rec: &ShadowDeployable, run: &str) -> ShadowDeployable {
    let mut next = rec.clone();
    let now = Utc::now();
    if rec.state == ShadowState::Free {
        next.state = ShadowState::Procured;
        next.owner = Some(Owner {
            workflow_run_id: run.to_owned(),
            workflow_plan: Some("loadtest".into()),
            procured_at: now,
            lease_seconds: None,
        });
    } else {
        next.state = ShadowState::Free;
        next.owner = None;
    }
    next.version += 1;
    next.last_updated_at = now;
    next
}

/// One raw CAS client: its key, its view of the record and its revision.
struct CasClient {
    kv: KvClient,
    record_key: String,
    index_key: String,
    rec: ShadowDeployable,
    rev: i64,
    run: String,
}

impl CasClient {
    /// One CAS: `Ok(true)` when it won, `Ok(false)` when the compare failed (the
    /// client then holds the fresh record and revision).
    async fn step(&mut self, timeout: Duration) -> Result<bool, String> {
        let next = flip(&self.rec, &self.run);
        let value = serde_json::to_vec(&next).map_err(|e| e.to_string())?;
        let index = if next.in_use() { "true" } else { "false" };
        let txn = Txn::new()
            .when(vec![Compare::mod_revision(
                self.record_key.clone(),
                CompareOp::Equal,
                self.rev,
            )])
            .and_then(vec![
                TxnOp::put(self.record_key.clone(), value, None),
                TxnOp::put(self.index_key.clone(), index, None),
            ])
            .or_else(vec![TxnOp::get(self.record_key.clone(), None)]);
        let resp = tokio::time::timeout(timeout, self.kv.txn(txn))
            .await
            .map_err(|_| "timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        if resp.succeeded() {
            self.rev = resp.header().map(|h| h.revision()).unwrap_or(self.rev);
            self.rec = next;
            return Ok(true);
        }
        for op in resp.op_responses() {
            if let TxnOpResponse::Get(g) = op {
                if let Some(kv) = g.kvs().first() {
                    self.rev = kv.mod_revision();
                    if let Ok(rec) = serde_json::from_slice(kv.value()) {
                        self.rec = rec;
                    }
                }
            }
        }
        Ok(false)
    }
}

/// The `raw-etcd` scenario.
pub async fn raw(shared: Arc<Shared>) -> Result<Measured, LoadtestError> {
    let client = connect(&shared).await?;
    let args = &shared.args;
    let root = format!("{}/loadtest/{}", args.etcd_prefix, shared.run_id);
    let keys_n = if args.hot_key { 1 } else { args.workflows };
    let timeout = args.request_timeout();
    let setup_start = Instant::now();
    let mut setup = Recorder::new();
    let mut start_revs = Vec::with_capacity(keys_n);
    for i in 0..keys_n {
        let name = deployable_name(i);
        let rec = ShadowDeployable::new(
            &name,
            "loadtest",
            &format!("{name}.loadtest.invalid"),
            Utc::now(),
        );
        let value = serde_json::to_vec(&rec).map_err(|e| LoadtestError::Etcd(e.to_string()))?;
        let txn = Txn::new().and_then(vec![
            TxnOp::put(format!("{root}/shadow-deployables/{name}"), value, None),
            TxnOp::put(format!("{root}/in-use/{name}"), "false", None),
        ]);
        let t = Instant::now();
        let resp = client
            .kv_client()
            .txn(txn)
            .await
            .map_err(|e| LoadtestError::Etcd(format!("initial put: {e}")))?;
        setup.record("etcd put (setup)", Answer::Status(200), t.elapsed());
        let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
        start_revs.push((rec, rev));
    }
    let setup_elapsed = setup_start.elapsed();
    shared.budget.restart();
    let sampler = match &args.etcd_metrics_url {
        Some(u) => Some(Sampler::new(u).map_err(LoadtestError::Setup)?),
        None => None,
    };
    let before = match &sampler {
        Some(s) => Some(s.sample().await.map_err(LoadtestError::Setup)?),
        None => None,
    };
    let start = Instant::now();
    let mut set = JoinSet::new();
    for w in 0..args.workflows {
        let i = if args.hot_key { 0 } else { w };
        let name = deployable_name(i);
        let (rec, rev) = start_revs[i].clone();
        let mut c = CasClient {
            kv: client.kv_client(),
            record_key: format!("{root}/shadow-deployables/{name}"),
            index_key: format!("{root}/in-use/{name}"),
            rec,
            rev,
            run: format!("lt-{}-{w}", shared.run_id),
        };
        let shared = shared.clone();
        set.spawn(async move {
            let mut rec = Recorder::new();
            let (mut ops, mut won) = (0u64, 0u64);
            while shared.budget.claim().is_some() {
                let t = Instant::now();
                let r = c.step(timeout).await;
                let latency = t.elapsed();
                match r {
                    Ok(true) => {
                        won += 1;
                        shared.note(&mut rec, "etcd txn", Answer::Status(200), latency)
                    }
                    Ok(false) => {
                        shared.note(&mut rec, "etcd txn (lost)", Answer::Status(200), latency)
                    }
                    Err(_) => {
                        shared.note(&mut rec, "etcd txn", Answer::Transport, latency);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                ops += 1;
            }
            (rec, ops, won)
        });
    }
    let mut out = Measured {
        setup,
        setup_elapsed,
        ..Measured::default()
    };
    while let Some(r) = set.join_next().await {
        let (rec, ops, won) = r.map_err(|e| LoadtestError::Etcd(format!("client task: {e}")))?;
        out.main.merge(&rec);
        out.cycles += ops;
        out.successes += won;
    }
    out.elapsed = start.elapsed();
    if let (Some(s), Some(before)) = (&sampler, before) {
        if let Ok(after) = s.sample().await {
            let mut r = EtcdRpcReport::new("phase total");
            r.add("cas", out.cycles, after.since(before));
            out.etcd_rpcs = Some(r);
        }
    }
    let cleanup = client
        .kv_client()
        .delete(format!("{root}/"), Some(DeleteOptions::new().with_prefix()))
        .await;
    if let Err(e) = cleanup {
        eprintln!("resource-plane loadtest: could not delete {root}/: {e}");
    }
    Ok(out)
}

/// The worker record `seed` writes: RUNNING, idle, of [`SEED_TEMPLATE`].
pub fn seed_worker(i: usize) -> Worker {
    let template = WorkerTemplate {
        name: SEED_TEMPLATE.into(),
        instance_type: Some("m5zn.metal".into()),
        image_id: Some("ami-12c6146b".into()),
        capacity: Resources {
            cpu: 48.0,
            memory_gb: 192.0,
        },
        min_workers: 0,
        max_workers: 0,
        hourly_cost: 3.96,
        ..WorkerTemplate::default()
    };
    let now = Utc::now();
    let mut w = Worker::new(&format!("lt-w-{i}"), &template, now);
    w.state = WorkerState::Running;
    w.idle_since = Some(now);
    w
}

/// Requirements of a seeded PENDING instance: more than any worker template offers, so
/// it stays pending (the scheduler's backlog) however many workers run.
pub const SEED_UNPLACEABLE: Resources = Resources {
    cpu: 100_000.0,
    memory_gb: 1_000_000.0,
};

/// The `i`-th instance record `seed` writes: PENDING and unplaceable when `pending`,
/// COMPLETED (ended, on no worker) otherwise.
pub fn seed_instance(i: usize, pending: bool) -> Instance {
    let (requirements, state) = if pending {
        (SEED_UNPLACEABLE, InstanceState::Pending)
    } else {
        (
            Resources {
                cpu: 1.0,
                memory_gb: 4.0,
            },
            InstanceState::Completed,
        )
    };
    let mut inst = Instance::new(&format!("lt-i-{i}"), requirements, false, Utc::now());
    inst.state = state;
    inst
}

/// The `seed` scenario: batched puts, `--workflows` (at most 32) transactions at once.
/// Existing records with the same keys are overwritten.
pub async fn seed(shared: Arc<Shared>) -> Result<Measured, LoadtestError> {
    let client = connect(&shared).await?;
    let args = &shared.args;
    let prefix = args.etcd_prefix.clone();
    let env = args.env.clone();
    let mut batches: Vec<Vec<(String, Vec<u8>)>> = Vec::new();
    let mut batch = Vec::new();
    let encode = |v: serde_json::Result<Vec<u8>>| v.map_err(|e| LoadtestError::Etcd(e.to_string()));
    for i in 0..args.deployable_count() {
        let name = deployable_name(i);
        let body = register_body(&name);
        let rec = ShadowDeployable::new(
            &name,
            body["node_pool"].as_str().unwrap_or("loadtest"),
            body["dns"].as_str().unwrap_or_default(),
            Utc::now(),
        );
        if batch.len() + 2 > MAX_TXN_OPS {
            batches.push(std::mem::take(&mut batch));
        }
        batch.push((
            format!("{prefix}{}", keys::shadow(&env, &name)),
            encode(serde_json::to_vec(&rec))?,
        ));
        batch.push((
            format!("{prefix}{}", keys::shadow_in_use(&env, &name)),
            b"false".to_vec(),
        ));
    }
    for i in 0..args.workers {
        let w = seed_worker(i);
        if batch.len() + 1 > MAX_TXN_OPS {
            batches.push(std::mem::take(&mut batch));
        }
        batch.push((
            format!("{prefix}{}", keys::worker(&w.id)),
            encode(serde_json::to_vec(&w))?,
        ));
    }
    for i in 0..args.instances {
        let inst = seed_instance(i, i < args.pending);
        if batch.len() + 1 > MAX_TXN_OPS {
            batches.push(std::mem::take(&mut batch));
        }
        batch.push((
            format!("{prefix}{}", keys::instance(&inst.id)),
            encode(serde_json::to_vec(&inst))?,
        ));
    }
    if !batch.is_empty() {
        batches.push(batch);
    }
    let batches = Arc::new(tokio::sync::Mutex::new(batches));
    let start = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..args.workflows.min(32) {
        let (batches, mut kv, shared) = (batches.clone(), client.kv_client(), shared.clone());
        let timeout = shared.args.request_timeout();
        set.spawn(async move {
            let mut rec = Recorder::new();
            let mut written = 0u64;
            loop {
                let Some(b) = batches.lock().await.pop() else {
                    break;
                };
                let n = b.len() as u64;
                let ops: Vec<TxnOp> = b.into_iter().map(|(k, v)| TxnOp::put(k, v, None)).collect();
                let t = Instant::now();
                let r = tokio::time::timeout(timeout, kv.txn(Txn::new().and_then(ops))).await;
                match r {
                    Ok(Ok(_)) => {
                        shared.note(&mut rec, "seed txn", Answer::Status(200), t.elapsed());
                        written += n;
                    }
                    Ok(Err(e)) => return Err(LoadtestError::Etcd(format!("seed txn: {e}"))),
                    Err(_) => return Err(LoadtestError::Etcd("seed txn timed out".into())),
                }
            }
            Ok((rec, written))
        });
    }
    let mut out = Measured::default();
    while let Some(r) = set.join_next().await {
        let (rec, written) = r.map_err(|e| LoadtestError::Etcd(format!("seed task: {e}")))??;
        out.main.merge(&rec);
        out.successes += written;
        out.cycles += rec.count("seed txn");
    }
    out.elapsed = start.elapsed();
    Ok(out)
}
