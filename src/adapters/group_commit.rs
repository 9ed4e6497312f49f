//! Group commit: a `Store` decorator that lets concurrent, independent transactions
//! share one etcd Txn, so etcd (usually the scarcest shared resource of a platform)
//! serves fewer, larger requests.
//!
//! One committer task per store takes the transactions callers hand it. While one Txn
//! is in flight the next members queue up; when it returns, the committer sends what
//! has gathered as one Txn. There is no timer: a lone member goes out at once, unchanged.
//!
//! A grouped Txn's compares are the members' compares (identical ones once), its success
//! ops all their ops, its failure branch a read of every key any member compares or
//! asks for. Members that write a key another member writes or compares never share a
//! Txn (etcd refuses duplicate keys; a write would change what the other compares).
//! When the grouped compare fails, the failure branch tells each member whether its own
//! compares held: those that did not get their answer (as the plain adapter would give
//! it), those that did go again at the front of the queue, so nobody starves and each
//! round answers at least one member. Every other call passes straight through.
//!
//! Traces: each member keeps its caller's span (the store decorator's `etcd txn` span,
//! which covers the wait). A lone member's Txn runs inside that span; a grouped Txn gets
//! its own `etcd txn (grouped)` span, a root span with a span link to each member's span,
//! since one RPC serves several callers' traces.

use std::collections::VecDeque;
use std::sync::Arc;

use async_trait::async_trait;
// The committer's key sets are rebuilt per batch; SipHash was 3 % of the service's CPU.
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug_span, Instrument, Span};

use crate::config::GroupCommitSettings;
use crate::otel;
use crate::ports::store::{Compare, Kv, Op, Store, StoreError, Txn, TxnResult, WatchReceiver};
use crate::telemetry::Metrics;

type Reply = oneshot::Sender<Result<TxnResult, StoreError>>;

/// Groups concurrent transactions of many callers into shared etcd Txns.
pub struct GroupCommitStore {
    inner: Arc<dyn Store>,
    /// `None` when there was no Tokio runtime to run the committer on: then every
    /// transaction goes straight through.
    queue: Option<mpsc::UnboundedSender<Member>>,
    metrics: Metrics,
}

impl GroupCommitStore {
    /// Wraps `inner` and starts its committer on the current Tokio runtime.
    /// `prefix_len` is the length of the key prefix `inner` adds to every key (it counts
    /// towards the request size limit).
    pub fn new(
        inner: Arc<dyn Store>,
        settings: GroupCommitSettings,
        prefix_len: usize,
        metrics: Metrics,
    ) -> Self {
        let queue = tokio::runtime::Handle::try_current().ok().map(|rt| {
            let (tx, rx) = mpsc::unbounded_channel();
            let committer = Committer {
                inner: inner.clone(),
                limits: Limits {
                    max_ops: settings.max_ops.max(1),
                    max_bytes: settings.max_bytes,
                    key_overhead: prefix_len + KEY_OVERHEAD,
                },
                metrics: metrics.clone(),
                rx,
                pending: VecDeque::new(),
            };
            rt.spawn(committer.run());
            tx
        });
        Self {
            inner,
            queue,
            metrics,
        }
    }
}

/// Bytes a key costs in a request beyond its text and the prefix (field tags, lengths,
/// revision numbers); generous, since etcd's limit is a hard refusal.
const KEY_OVERHEAD: usize = 24;

#[async_trait]
impl Store for GroupCommitStore {
    async fn get(&self, key: &str) -> Result<Option<Kv>, StoreError> {
        self.inner.get(key).await
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<Kv>, i64), StoreError> {
        self.inner.list(prefix).await
    }
    async fn list_each(
        &self,
        prefix: &str,
        page: &mut (dyn FnMut(Vec<Kv>) + Send),
    ) -> Result<i64, StoreError> {
        self.inner.list_each(prefix, page).await
    }
    async fn list_after(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Kv>, bool), StoreError> {
        self.inner.list_after(prefix, after, limit).await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError> {
        let Some(queue) = &self.queue else {
            return self.inner.txn(txn).await;
        };
        let (reply, answer) = oneshot::channel();
        self.metrics.group_commit_members.inc();
        queue
            .send(Member::new(txn, reply))
            .map_err(|_| StoreError::Unavailable("group committer stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable("group committer stopped".into()))?
    }

    async fn grant_lease(&self, ttl_seconds: i64) -> Result<i64, StoreError> {
        self.inner.grant_lease(ttl_seconds).await
    }

    async fn keep_alive(&self, lease: i64) -> Result<i64, StoreError> {
        self.inner.keep_alive(lease).await
    }

    async fn revoke_lease(&self, lease: i64) -> Result<(), StoreError> {
        self.inner.revoke_lease(lease).await
    }

    async fn watch(&self, prefix: &str, start_revision: i64) -> Result<WatchReceiver, StoreError> {
        self.inner.watch(prefix, start_revision).await
    }

    async fn health(&self) -> Result<(), StoreError> {
        self.inner.health().await
    }

    fn name(&self) -> &'static str {
        self.inner.name()
    }
}

/// One caller's transaction waiting in the committer.
struct Member {
    txn: Txn,
    reply: Reply,
    /// Keys its success ops write.
    writes: Vec<String>,
    /// Estimated request bytes, without the key overhead.
    bytes: usize,
    /// Keys it costs in the request (for the overhead).
    keys: usize,
    /// Must go alone (its grouped Txn was refused as a whole).
    solo: bool,
    /// The caller's span, to run in or link to (`Span::none()` while traces are off).
    span: Span,
}

impl Member {
    fn new(txn: Txn, reply: Reply) -> Self {
        let writes: Vec<String> = txn.success.iter().map(|op| op_key(op).to_owned()).collect();
        let bytes = txn
            .compares
            .iter()
            .map(|c| compare_key(c).len())
            .sum::<usize>()
            + txn
                .success
                .iter()
                .map(|op| match op {
                    Op::Put { key, value, .. } => key.len() + value.len(),
                    Op::Delete { key } => key.len(),
                })
                .sum::<usize>()
            + txn.failure_gets.iter().map(String::len).sum::<usize>();
        let keys = txn.compares.len() + txn.success.len() + txn.failure_gets.len();
        Self {
            txn,
            reply,
            writes,
            bytes,
            keys,
            solo: false,
            span: otel::current_for_link(),
        }
    }

    /// Whether its compares hold against `state` (the failure branch's reads; a missing
    /// key has revision 0, as etcd compares it).
    fn holds(&self, state: &HashMap<&str, Option<&Kv>>) -> bool {
        self.txn.compares.iter().all(|c| {
            let kv = state.get(compare_key(c)).copied().flatten();
            match c {
                Compare::ModRevision(_, rev) => kv.map_or(0, |kv| kv.mod_revision) == *rev,
                Compare::CreateRevision(_, rev) => kv.map_or(0, |kv| kv.create_revision) == *rev,
            }
        })
    }

    fn answer(self, result: Result<TxnResult, StoreError>) {
        // The caller may have given up waiting; nobody else wants the answer.
        let _ = self.reply.send(result);
    }
}

fn op_key(op: &Op) -> &str {
    match op {
        Op::Put { key, .. } | Op::Delete { key } => key,
    }
}

fn compare_key(c: &Compare) -> &str {
    match c {
        Compare::ModRevision(k, _) | Compare::CreateRevision(k, _) => k,
    }
}

/// What one grouped Txn may hold.
#[derive(Clone, Copy)]
struct Limits {
    max_ops: usize,
    max_bytes: usize,
    key_overhead: usize,
}

/// The keys and sizes of a batch being gathered (or of the members left behind, whose
/// keys later members must not overtake).
#[derive(Default)]
struct Footprint {
    writes: HashSet<String>,
    /// Compared key -> the compares on it.
    compared: HashMap<String, Vec<Compare>>,
    compares: usize,
    ops: usize,
    reads: HashSet<String>,
    bytes: usize,
}

impl Footprint {
    /// Whether `m` may share a Txn with (or overtake) the members in here.
    fn clashes(&self, m: &Member) -> bool {
        m.writes
            .iter()
            .any(|k| self.writes.contains(k) || self.compared.contains_key(k))
            || m.txn.compares.iter().any(|c| {
                let key = compare_key(c);
                // Two different compares on one key cannot both hold: grouping them
                // would only fail the Txn.
                self.writes.contains(key)
                    || self
                        .compared
                        .get(key)
                        .is_some_and(|cs| cs.iter().any(|other| other != c))
            })
    }

    /// Would the batch stay within `limits` with `m` added?
    fn fits(&self, m: &Member, limits: Limits) -> bool {
        let new_compares = m
            .txn
            .compares
            .iter()
            .filter(|c| {
                !self
                    .compared
                    .get(compare_key(c))
                    .is_some_and(|cs| cs.contains(c))
            })
            .count();
        let new_reads = m
            .txn
            .compares
            .iter()
            .map(compare_key)
            .chain(m.txn.failure_gets.iter().map(String::as_str))
            .filter(|k| !self.reads.contains(*k))
            .collect::<HashSet<_>>()
            .len();
        let bytes = self.bytes + m.bytes + m.keys * limits.key_overhead;
        self.compares + new_compares <= limits.max_ops
            && self.ops + m.txn.success.len() <= limits.max_ops
            && self.reads.len() + new_reads <= limits.max_ops
            && bytes <= limits.max_bytes
    }

    fn add(&mut self, m: &Member, limits: Limits) {
        self.writes.extend(m.writes.iter().cloned());
        for c in &m.txn.compares {
            let cs = self.compared.entry(compare_key(c).to_owned()).or_default();
            if !cs.contains(c) {
                cs.push(c.clone());
                self.compares += 1;
            }
            self.reads.insert(compare_key(c).to_owned());
        }
        self.reads.extend(m.txn.failure_gets.iter().cloned());
        self.ops += m.txn.success.len();
        self.bytes += m.bytes + m.keys * limits.key_overhead;
    }
}

/// The task that owns the queue and sends one Txn at a time.
struct Committer {
    inner: Arc<dyn Store>,
    limits: Limits,
    metrics: Metrics,
    rx: mpsc::UnboundedReceiver<Member>,
    /// Members not yet sent, in arrival order (resubmitted ones first).
    pending: VecDeque<Member>,
}

impl Committer {
    async fn run(mut self) {
        loop {
            if self.pending.is_empty() {
                match self.rx.recv().await {
                    Some(m) => self.pending.push_back(m),
                    // Every handle to the store is gone.
                    None => return,
                }
            }
            // Whatever arrived while the last Txn was in flight joins this one; nothing
            // waits for more.
            while let Ok(m) = self.rx.try_recv() {
                self.pending.push_back(m);
            }
            let batch = self.take_batch();
            if !batch.is_empty() {
                self.commit(batch).await;
            }
        }
    }

    /// The next batch: members in arrival order that fit the limits and clash with no
    /// member taken or left behind before them. The first member always goes, alone if
    /// it alone exceeds the limits.
    fn take_batch(&mut self) -> Vec<Member> {
        let mut batch: Vec<Member> = Vec::new();
        let mut taken = Footprint::default();
        let mut left = Footprint::default();
        let mut rest = VecDeque::with_capacity(self.pending.len());
        while let Some(m) = self.pending.pop_front() {
            if m.reply.is_closed() {
                // Its caller gave up before it was sent: as if never asked.
                continue;
            }
            if batch.is_empty() {
                let solo = m.solo;
                taken.add(&m, self.limits);
                batch.push(m);
                if solo {
                    break;
                }
                continue;
            }
            if m.solo || taken.clashes(&m) || left.clashes(&m) {
                left.add(&m, self.limits);
                rest.push_back(m);
                continue;
            }
            if !taken.fits(&m, self.limits) {
                // Full: everyone after waits, in order.
                rest.push_back(m);
                break;
            }
            taken.add(&m, self.limits);
            batch.push(m);
        }
        rest.append(&mut self.pending);
        self.pending = rest;
        batch
    }

    async fn commit(&mut self, mut batch: Vec<Member>) {
        self.metrics.group_commit_txns.inc();
        self.metrics.group_commit_batch.observe(batch.len() as f64);
        if batch.len() == 1 {
            if let Some(mut m) = batch.pop() {
                let txn = std::mem::take(&mut m.txn);
                let result = self.inner.txn(txn).instrument(m.span.clone()).await;
                m.answer(result);
            }
            return;
        }
        let (txn, reads) = combine(&batch);
        let span = debug_span!(
            parent: None,
            "etcd.group_txn",
            otel.name = "etcd txn (grouped)",
            otel.kind = "client",
            db.system.name = "etcd",
            members = batch.len(),
        );
        for m in &batch {
            otel::link(&span, &m.span);
        }
        match self.inner.txn(txn).instrument(span).await {
            Ok(r) if r.succeeded => {
                for m in batch {
                    m.answer(Ok(TxnResult {
                        succeeded: true,
                        revision: r.revision,
                        fetched: Vec::new(),
                    }));
                }
            }
            Ok(r) => self.split(batch, &reads, &r),
            Err(e @ StoreError::Unavailable(_)) => {
                for m in batch {
                    m.answer(Err(e.clone()));
                }
            }
            Err(_) => {
                // Refused as a whole (a member's lease is gone, the request too large):
                // nothing was applied; each member goes alone to get its own answer.
                self.metrics
                    .group_commit_splits
                    .with_label_values(&["solo"])
                    .inc_by(batch.len() as u64);
                self.resubmit(batch, true);
            }
        }
    }

    /// The grouped compare failed: answer the members whose own compares failed and
    /// send the others again.
    fn split(&mut self, batch: Vec<Member>, reads: &[String], r: &TxnResult) {
        let state: HashMap<&str, Option<&Kv>> = reads
            .iter()
            .map(String::as_str)
            .zip(r.fetched.iter().map(Option::as_ref))
            .collect();
        let mut again = Vec::new();
        let mut conflicts = 0u64;
        for m in batch {
            if m.holds(&state) {
                again.push(m);
                continue;
            }
            conflicts += 1;
            let fetched = m
                .txn
                .failure_gets
                .iter()
                .map(|k| state.get(k.as_str()).copied().flatten().cloned())
                .collect();
            m.answer(Ok(TxnResult {
                succeeded: false,
                revision: r.revision,
                fetched,
            }));
        }
        let splits = &self.metrics.group_commit_splits;
        splits.with_label_values(&["conflict"]).inc_by(conflicts);
        splits
            .with_label_values(&["resubmitted"])
            .inc_by(again.len() as u64);
        // Every compare looked fine yet the Txn failed: the reads cannot explain it, so
        // each goes alone rather than round again.
        let solo = conflicts == 0;
        self.resubmit(again, solo);
    }

    /// Puts members back at the front of the queue, in their order.
    fn resubmit(&mut self, members: Vec<Member>, solo: bool) {
        for mut m in members.into_iter().rev() {
            m.solo |= solo;
            self.pending.push_front(m);
        }
    }
}

/// The grouped Txn of `batch`, and the keys its failure branch reads, in order.
fn combine(batch: &[Member]) -> (Txn, Vec<String>) {
    let mut compares: Vec<Compare> = Vec::new();
    let mut seen: HashSet<&Compare> = HashSet::default();
    let mut reads: Vec<String> = Vec::new();
    let mut read: HashSet<&str> = HashSet::default();
    let mut success = Vec::new();
    for m in batch {
        for c in &m.txn.compares {
            if seen.insert(c) {
                compares.push(c.clone());
            }
        }
        let keys = m
            .txn
            .compares
            .iter()
            .map(compare_key)
            .chain(m.txn.failure_gets.iter().map(String::as_str));
        for k in keys {
            if read.insert(k) {
                reads.push(k.to_owned());
            }
        }
        success.extend(m.txn.success.iter().cloned());
    }
    let txn = Txn {
        compares,
        success,
        failure_gets: reads.clone(),
    };
    (txn, reads)
}
