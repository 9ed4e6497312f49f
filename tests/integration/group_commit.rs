//! Group commit against a real etcd: concurrent independent transactions share one etcd
//! Txn, a member whose compare fails gets its fresh record, members writing one key
//! never share a Txn, etcd's limits hold, a lone request goes out at once, and an
//! outage reaches every member with nothing half-written.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use resource_plane::adapters::group_commit::GroupCommitStore;
use resource_plane::config::GroupCommitSettings;
use resource_plane::ports::store::{
    Compare, Kv, Op, Store, StoreError, Txn, TxnResult, WatchEvent,
};
use resource_plane::telemetry::Metrics;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::support::{self, Etcd, Hook, Hooked};

/// Passes every call to etcd and records each Txn it is asked to send; can hold the
/// first Txn until the test releases it, so the next members queue up behind it.
struct Recorder {
    seen: Mutex<Vec<Txn>>,
    entered: Mutex<Option<oneshot::Sender<()>>>,
    release: Mutex<Option<oneshot::Receiver<()>>>,
}

impl Recorder {
    fn new(inner: Arc<dyn Store>) -> Arc<Hooked<Self>> {
        let rec = Self {
            seen: Mutex::new(Vec::new()),
            entered: Mutex::new(None),
            release: Mutex::new(None),
        };
        Hooked::new(inner, rec)
    }

    fn seen(&self) -> Vec<Txn> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Arms the hold: the next Txn waits for the returned sender.
    fn hold_next(&self) -> (oneshot::Receiver<()>, oneshot::Sender<()>) {
        let (entered_tx, entered_rx) = oneshot::channel();
        let (release_tx, release_rx) = oneshot::channel();
        *self.entered.lock().expect("lock") = Some(entered_tx);
        *self.release.lock().expect("lock") = Some(release_rx);
        (entered_rx, release_tx)
    }
}

#[async_trait]
impl Hook for Recorder {
    async fn txn(&self, inner: &dyn Store, txn: Txn) -> Result<TxnResult, StoreError> {
        if let Ok(mut s) = self.seen.lock() {
            s.push(txn.clone());
        }
        let tell = self.entered.lock().ok().and_then(|mut e| e.take());
        if let Some(tell) = tell {
            let wait = self.release.lock().ok().and_then(|mut r| r.take());
            let _ = tell.send(());
            if let Some(w) = wait {
                let _ = w.await;
            }
        }
        inner.txn(txn).await
    }
}

struct Rig {
    etcd: Etcd,
    raw: Arc<dyn Store>,
    rec: Arc<Hooked<Recorder>>,
    gc: Arc<dyn Store>,
    metrics: Metrics,
}

fn rig(max_ops: usize, max_bytes: usize) -> Rig {
    let etcd = Etcd::start();
    let prefix = support::unique_prefix();
    let raw = etcd.store(&prefix);
    let rec = Recorder::new(raw.clone());
    let metrics = Metrics::new();
    let settings = GroupCommitSettings {
        enabled: true,
        max_ops,
        max_bytes,
    };
    let gc: Arc<dyn Store> = Arc::new(GroupCommitStore::new(
        rec.clone(),
        settings,
        prefix.len(),
        metrics.clone(),
    ));
    Rig {
        etcd,
        raw,
        rec,
        gc,
        metrics,
    }
}

fn put(key: &str, value: &str) -> Op {
    Op::Put {
        key: key.to_owned(),
        value: value.as_bytes().to_vec(),
        lease: None,
    }
}

/// A CAS write of `value` at `key`, guarded by the key's `mod_revision`.
fn cas(key: &str, expect: i64, value: &str) -> Txn {
    Txn {
        compares: vec![Compare::ModRevision(key.to_owned(), expect)],
        success: vec![put(key, value)],
        failure_gets: vec![key.to_owned()],
    }
}

fn spawn_txn(store: &Arc<dyn Store>, txn: Txn) -> JoinHandle<Result<TxnResult, StoreError>> {
    let store = store.clone();
    tokio::spawn(async move { store.txn(txn).await })
}

async fn join(h: JoinHandle<Result<TxnResult, StoreError>>) -> Result<TxnResult, StoreError> {
    tokio::time::timeout(Duration::from_secs(20), h)
        .await
        .expect("member answered within 20 s")
        .expect("member task")
}

impl Rig {
    /// Sends a Txn to an unrelated key and holds it in flight; returns its handle and
    /// the release.
    async fn hold(
        &self,
    ) -> (
        JoinHandle<Result<TxnResult, StoreError>>,
        oneshot::Sender<()>,
    ) {
        let (entered, release) = self.rec.hook.hold_next();
        let h = spawn_txn(
            &self.gc,
            Txn {
                compares: vec![],
                success: vec![put("/held", "x")],
                failure_gets: vec![],
            },
        );
        tokio::time::timeout(Duration::from_secs(10), entered)
            .await
            .expect("held Txn reached etcd")
            .expect("entered");
        (h, release)
    }

    /// Waits until `n` members in all have been handed to the committer.
    async fn queued(&self, n: u64) {
        let m = self.metrics.clone();
        let ok = support::eventually(Duration::from_secs(10), || {
            let m = m.clone();
            async move { m.group_commit_members.get() >= n }
        })
        .await;
        assert!(
            ok,
            "only {} of {n} members queued",
            self.metrics.group_commit_members.get()
        );
    }

    async fn value(&self, key: &str) -> Option<Kv> {
        self.raw.get(key).await.expect("get")
    }
}

fn ops_of(t: &Txn) -> Vec<&str> {
    t.success
        .iter()
        .map(|op| match op {
            Op::Put { key, .. } | Op::Delete { key } => key.as_str(),
        })
        .collect()
}

#[tokio::test]
async fn a_lone_request_goes_out_at_once_and_queued_ones_share_the_next_txn() {
    let r = rig(128, 1 << 20);
    // Alone: sent at once, unchanged, without any other member ever arriving.
    let lone = cas("/a", 0, "1");
    let res = join(spawn_txn(&r.gc, lone.clone()))
        .await
        .expect("lone txn");
    assert!(res.succeeded);
    assert_eq!(r.rec.hook.seen(), vec![lone]);

    // While one Txn is in flight, the next members gather and go out together.
    let (held, release) = r.hold().await;
    let members: Vec<_> = ["/b", "/c", "/d"]
        .iter()
        .map(|k| spawn_txn(&r.gc, cas(k, 0, "1")))
        .collect();
    r.queued(5).await;
    release.send(()).expect("release");
    assert!(join(held).await.expect("held").succeeded);
    for m in members {
        assert!(join(m).await.expect("member").succeeded);
    }
    let seen = r.rec.hook.seen();
    assert_eq!(seen.len(), 3, "lone, held, then one shared Txn: {seen:?}");
    let mut keys = ops_of(&seen[2]);
    keys.sort();
    assert_eq!(keys, vec!["/b", "/c", "/d"]);

    // Alone again: out at once, not waiting for company.
    let again = cas("/e", 0, "1");
    assert!(
        join(spawn_txn(&r.gc, again.clone()))
            .await
            .expect("again")
            .succeeded
    );
    assert_eq!(r.rec.hook.seen().last(), Some(&again));
    assert_eq!(r.metrics.group_commit_txns.get(), 4);
    assert_eq!(r.metrics.group_commit_members.get(), 6);
}

#[tokio::test]
async fn many_concurrent_independent_members_take_far_fewer_etcd_txns() {
    let r = rig(128, 1 << 20);
    // A shared fence every member compares, as the leader key is.
    let fence = r
        .raw
        .txn(Txn {
            compares: vec![],
            success: vec![put("/leader", "me")],
            failure_gets: vec![],
        })
        .await
        .expect("fence")
        .revision;
    let etcd_txn0 = r.etcd.grpc_calls("Txn");
    let n = 200;
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let mut t = cas(&format!("/k/{i}"), 0, &format!("v{i}"));
            t.compares
                .push(Compare::CreateRevision("/leader".into(), fence));
            spawn_txn(&r.gc, t)
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let res = join(h).await.expect("member");
        assert!(res.succeeded, "member {i}");
        let kv = r.value(&format!("/k/{i}")).await.expect("applied");
        assert_eq!(kv.value, format!("v{i}").into_bytes());
        assert_eq!(kv.mod_revision, res.revision, "member {i}: its revision");
    }
    let rpcs = r.metrics.group_commit_txns.get();
    let etcd_rpcs = r.etcd.grpc_calls("Txn") - etcd_txn0;
    assert_eq!(etcd_rpcs, rpcs, "etcd saw what the committer sent");
    assert_eq!(r.metrics.group_commit_members.get(), n);
    assert!(rpcs * 4 <= n, "{rpcs} etcd Txns for {n} members");
    for t in r.rec.hook.seen() {
        let fences = t
            .compares
            .iter()
            .filter(|c| matches!(c, Compare::CreateRevision(k, _) if k == "/leader"))
            .count();
        assert_eq!(fences, 1, "the shared fence compare is sent once per Txn");
    }
    let text = r.metrics.render();
    assert!(
        text.contains("etcd_group_commit_batch_size_bucket"),
        "{text}"
    );
}

#[tokio::test]
async fn a_stale_member_gets_its_fresh_record_and_the_others_apply() {
    let r = rig(128, 1 << 20);
    let mut revs = BTreeMap::new();
    for k in ["/a", "/b", "/c"] {
        revs.insert(k, r.raw.txn(cas(k, 0, "0")).await.expect("seed").revision);
    }
    let (held, release) = r.hold().await;
    let a = spawn_txn(&r.gc, cas("/a", revs["/a"], "1"));
    let stale = cas("/b", revs["/b"] - 1, "1");
    let b = spawn_txn(&r.gc, stale.clone());
    let c = spawn_txn(&r.gc, cas("/c", revs["/c"], "1"));
    r.queued(4).await;
    release.send(()).expect("release");
    join(held).await.expect("held");
    let (a, b, c) = (join(a).await, join(b).await, join(c).await);
    let (a, b, c) = (a.expect("a"), b.expect("b"), c.expect("c"));
    assert!(a.succeeded && c.succeeded, "{a:?} {c:?}");
    assert!(!b.succeeded);
    let fresh = r.value("/b").await;
    assert_eq!(
        b.fetched,
        vec![fresh.clone()],
        "the stale member's fresh record"
    );
    assert_eq!(fresh.map(|kv| kv.value), Some(b"0".to_vec()));
    // Exactly what the plain adapter answers it.
    let plain = r.raw.txn(stale).await.expect("plain");
    assert_eq!((plain.succeeded, &plain.fetched), (false, &b.fetched));
    for (k, res) in [("/a", &a), ("/c", &c)] {
        let kv = r.value(k).await.expect("applied");
        assert_eq!((kv.value, kv.mod_revision), (b"1".to_vec(), res.revision));
    }
    let split = |o: &str| r.metrics.group_commit_splits.with_label_values(&[o]).get();
    assert_eq!((split("conflict"), split("resubmitted")), (1, 2));
}

#[tokio::test]
async fn members_writing_the_same_key_never_share_a_txn() {
    let r = rig(128, 1 << 20);
    let (held, release) = r.hold().await;
    // Two creates of one key (as two requests reusing one idempotency key would),
    // two blind overwrites of another, and an independent member.
    let first = spawn_txn(&r.gc, cas("/k", 0, "first"));
    r.queued(2).await;
    let second = spawn_txn(&r.gc, cas("/k", 0, "second"));
    r.queued(3).await;
    let blind = |v: &str| Txn {
        compares: vec![],
        success: vec![put("/w", v)],
        failure_gets: vec![],
    };
    let w1 = spawn_txn(&r.gc, blind("1"));
    r.queued(4).await;
    let w2 = spawn_txn(&r.gc, blind("2"));
    r.queued(5).await;
    let other = spawn_txn(&r.gc, cas("/o", 0, "1"));
    r.queued(6).await;
    release.send(()).expect("release");
    join(held).await.expect("held");
    let first = join(first).await.expect("first");
    let second = join(second).await.expect("second");
    assert!(first.succeeded, "arrival order: the first create wins");
    assert!(!second.succeeded);
    let now = r.value("/k").await;
    assert_eq!(second.fetched, vec![now.clone()]);
    assert_eq!(now.map(|kv| kv.value), Some(b"first".to_vec()));
    let (w1, w2) = (join(w1).await.expect("w1"), join(w2).await.expect("w2"));
    assert!(w1.succeeded && w2.succeeded && w1.revision < w2.revision);
    assert_eq!(r.value("/w").await.map(|kv| kv.value), Some(b"2".to_vec()));
    assert!(join(other).await.expect("other").succeeded);
    let seen = r.rec.hook.seen();
    for t in &seen {
        let keys = ops_of(t);
        let unique: HashSet<_> = keys.iter().collect();
        assert_eq!(
            unique.len(),
            keys.len(),
            "one Txn writes a key twice: {t:?}"
        );
    }
    // The independent member did share a Txn with the first of each pair.
    assert!(
        seen.iter().any(|t| ops_of(t).len() >= 2),
        "nothing was grouped: {seen:?}"
    );
}

#[tokio::test]
async fn batches_stay_within_the_op_and_byte_limits() {
    let r = rig(128, 1 << 20);
    let (held, release) = r.hold().await;
    let n = 300;
    let handles: Vec<_> = (0..n)
        .map(|i| spawn_txn(&r.gc, cas(&format!("/k/{i}"), 0, "v")))
        .collect();
    r.queued(n + 1).await;
    release.send(()).expect("release");
    join(held).await.expect("held");
    for h in handles {
        assert!(join(h).await.expect("member").succeeded);
    }
    let seen = r.rec.hook.seen();
    for t in &seen {
        let widest = t
            .compares
            .len()
            .max(t.success.len())
            .max(t.failure_gets.len());
        assert!(widest <= 128, "a Txn of {widest} ops");
    }
    assert!(
        seen.len() >= 4,
        "the held Txn, then 300 members in Txns of at most 128: {}",
        seen.len()
    );
    assert!(seen.len() <= 5, "but still grouped: {}", seen.len());

    // Bytes: 1 KiB values under a 16 KiB limit; one member above the limit goes alone.
    let r = rig(128, 16 * 1024);
    let (held, release) = r.hold().await;
    let value = "x".repeat(1024);
    let mut handles: Vec<_> = (0..40)
        .map(|i| spawn_txn(&r.gc, cas(&format!("/b/{i}"), 0, &value)))
        .collect();
    r.queued(41).await;
    handles.push(spawn_txn(&r.gc, cas("/big", 0, &"y".repeat(40 * 1024))));
    r.queued(42).await;
    release.send(()).expect("release");
    join(held).await.expect("held");
    for h in handles {
        assert!(join(h).await.expect("member").succeeded);
    }
    let seen = r.rec.hook.seen();
    for t in &seen[1..] {
        let bytes: usize = t
            .success
            .iter()
            .map(|op| match op {
                Op::Put { key, value, .. } => key.len() + value.len(),
                Op::Delete { key } => key.len(),
            })
            .sum();
        assert!(
            bytes <= 16 * 1024 || t.success.len() == 1,
            "a grouped Txn of {bytes} bytes"
        );
    }
    assert!(
        seen.len() >= 5,
        "the held Txn, 40 KiB in Txns of 16 KiB, and the big one alone: {}",
        seen.len()
    );
    assert_eq!(
        r.value("/big").await.map(|kv| kv.value.len()),
        Some(40 * 1024)
    );
}

#[tokio::test]
async fn a_refused_lease_fails_only_its_own_member() {
    let r = rig(128, 1 << 20);
    let lease = r.raw.grant_lease(30).await.expect("lease");
    r.raw.revoke_lease(lease).await.expect("revoke");
    let (held, release) = r.hold().await;
    let good1 = spawn_txn(&r.gc, cas("/g1", 0, "1"));
    let bad = spawn_txn(
        &r.gc,
        Txn {
            compares: vec![Compare::ModRevision("/l".into(), 0)],
            success: vec![Op::Put {
                key: "/l".into(),
                value: b"1".to_vec(),
                lease: Some(lease),
            }],
            failure_gets: vec!["/l".into()],
        },
    );
    let good2 = spawn_txn(&r.gc, cas("/g2", 0, "1"));
    r.queued(4).await;
    release.send(()).expect("release");
    join(held).await.expect("held");
    assert_eq!(join(bad).await, Err(StoreError::LeaseNotFound));
    assert!(join(good1).await.expect("good1").succeeded);
    assert!(join(good2).await.expect("good2").succeeded);
    assert_eq!(r.value("/l").await, None);
}

#[tokio::test]
async fn with_etcd_down_every_member_gets_the_error_and_nothing_is_written() {
    let mut r = rig(128, 1 << 20);
    let (held, release) = r.hold().await;
    let handles: Vec<_> = (0..20)
        .map(|i| spawn_txn(&r.gc, cas(&format!("/k/{i}"), 0, "v")))
        .collect();
    r.queued(21).await;
    r.etcd.kill();
    release.send(()).expect("release");
    assert!(matches!(join(held).await, Err(StoreError::Unavailable(_))));
    for h in handles {
        let res = join(h).await;
        assert!(matches!(res, Err(StoreError::Unavailable(_))), "{res:?}");
    }
    let seen = r.rec.hook.seen();
    assert!(
        seen.iter().any(|t| t.success.len() == 20),
        "one grouped Txn: {seen:?}"
    );
    r.etcd.restart();
    let ok = support::eventually(Duration::from_secs(10), || async {
        r.raw.health().await.is_ok()
    })
    .await;
    assert!(ok, "etcd back");
    let (kvs, _) = r.raw.list("/k/").await.expect("list");
    assert!(kvs.is_empty(), "half-written: {kvs:?}");
}

/// One member of the randomized test and what it wrote.
struct Member {
    txn: Txn,
    value: Vec<u8>,
}

/// Random members on a small key space, some with stale compares, through the
/// decorator; every answer must agree with etcd's history: a success applied exactly
/// its writes at its revision with its compares holding just before; a conflict wrote
/// nothing, was told the state at its revision, and one of its compares did not hold.
#[tokio::test]
async fn random_members_agree_with_the_history() {
    let r = rig(16, 1 << 20);
    let seed: u64 = rand::random();
    eprintln!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let keys: Vec<String> = (0..6).map(|i| format!("/r/{i}")).collect();
    let (initial, rev0) = r.raw.list("/r/").await.expect("list");
    assert!(initial.is_empty());
    let mut answers: Vec<(Member, TxnResult)> = Vec::new();
    for round in 0..6 {
        let mut current = BTreeMap::new();
        for k in &keys {
            current.insert(k.clone(), r.value(k).await.map_or(0, |kv| kv.mod_revision));
        }
        let base = r.metrics.group_commit_members.get();
        let hold = if round % 2 == 0 {
            Some(r.hold().await)
        } else {
            None
        };
        let mut handles = Vec::new();
        for i in 0..30 {
            let value = format!("r{round}m{i}").into_bytes();
            let mut chosen: Vec<&String> = keys.iter().filter(|_| rng.gen_bool(0.3)).collect();
            if chosen.is_empty() {
                chosen.push(&keys[rng.gen_range(0..keys.len())]);
            }
            let compares: Vec<Compare> = chosen
                .iter()
                .map(|k| {
                    let now = current[*k];
                    let expect = if rng.gen_bool(0.75) {
                        now
                    } else if now > 0 {
                        now - 1
                    } else {
                        1
                    };
                    Compare::ModRevision((*k).clone(), expect)
                })
                .collect();
            let mut success: Vec<Op> = chosen
                .iter()
                .map(|k| Op::Put {
                    key: (*k).clone(),
                    value: value.clone(),
                    lease: None,
                })
                .collect();
            if rng.gen_bool(0.2) {
                let extra = &keys[rng.gen_range(0..keys.len())];
                if !chosen.contains(&extra) {
                    success.push(Op::Put {
                        key: extra.clone(),
                        value: value.clone(),
                        lease: None,
                    });
                }
            }
            let txn = Txn {
                compares,
                success,
                failure_gets: chosen.iter().map(|k| (*k).clone()).collect(),
            };
            handles.push((
                Member {
                    txn: txn.clone(),
                    value,
                },
                spawn_txn(&r.gc, txn),
            ));
        }
        if let Some((held, release)) = hold {
            r.queued(base + 31).await;
            release.send(()).expect("release");
            join(held).await.expect("held");
        }
        for (m, h) in handles {
            let res = join(h).await.expect("member answered without error");
            answers.push((m, res));
        }
    }
    // etcd's history of the key space, from the watch.
    let (_, end) = r.raw.list("/").await.expect("list");
    let mut watch = r.raw.watch("/r/", rev0 + 1).await.expect("watch");
    let mut history: Vec<(i64, String, Vec<u8>)> = Vec::new();
    let last_r = answers
        .iter()
        .filter(|(_, a)| a.succeeded)
        .map(|(_, a)| a.revision)
        .max()
        .unwrap_or(0);
    assert!(last_r <= end);
    while history.last().is_none_or(|h| h.0 < last_r) {
        let batch = tokio::time::timeout(Duration::from_secs(10), watch.recv())
            .await
            .expect("history within 10 s")
            .expect("watch open")
            .expect("watch ok");
        for ev in batch {
            if let WatchEvent::Put(kv) = ev {
                history.push((kv.mod_revision, kv.key, kv.value));
            }
        }
    }
    let state_at = |key: &str, rev: i64| -> Option<(i64, Vec<u8>)> {
        history
            .iter()
            .rfind(|(r, k, _)| k == key && *r <= rev)
            .map(|(r, _, v)| (*r, v.clone()))
    };
    let holds = |c: &Compare, rev: i64| match c {
        Compare::ModRevision(k, e) => state_at(k, rev).map_or(0, |s| s.0) == *e,
        Compare::CreateRevision(..) => unreachable!("not generated"),
    };
    let mut applied = 0;
    for (m, a) in &answers {
        let mine: Vec<_> = history.iter().filter(|h| h.2 == m.value).collect();
        if a.succeeded {
            applied += 1;
            let written: HashSet<&str> = ops_of(&m.txn).into_iter().collect();
            let found: HashSet<&str> = mine.iter().map(|h| h.1.as_str()).collect();
            assert_eq!(found, written, "a success wrote exactly its keys");
            assert!(mine.iter().all(|h| h.0 == a.revision), "at its revision");
            for c in &m.txn.compares {
                assert!(
                    holds(c, a.revision - 1),
                    "success whose compare did not hold: {c:?}"
                );
            }
        } else {
            assert!(mine.is_empty(), "a conflict wrote something: {mine:?}");
            assert!(
                m.txn.compares.iter().any(|c| !holds(c, a.revision)),
                "conflict though every compare held at {}",
                a.revision
            );
            for (k, got) in m.txn.failure_gets.iter().zip(&a.fetched) {
                let want = state_at(k, a.revision);
                let got = got.as_ref().map(|kv| (kv.mod_revision, kv.value.clone()));
                assert_eq!(got, want, "fetched {k} at {}", a.revision);
            }
            assert_eq!(a.fetched.len(), m.txn.failure_gets.len());
        }
    }
    assert!(applied > 0, "nothing applied");
}

const BASE: &str = "/api/1.0/int/shadow-deployables";

/// Concurrent PROCUREs of distinct deployables through the HTTP API; returns the
/// service's group-commit counters (members, Txns).
async fn procure_concurrently(group_commit: bool) -> (u64, u64) {
    use actix_web::test;
    use futures::future::join_all;
    use resource_plane::api;
    use serde_json::json;

    use crate::support::{post, put, send};

    let etcd = Etcd::start();
    let mut config = support::config();
    config.group_commit.enabled = group_commit;
    let svc = support::service(config, etcd.store(&support::unique_prefix())).await;
    let app = test::init_service(api::app(svc.state.clone())).await;
    let n = 32;
    for i in 0..n {
        let r = send(
            &app,
            put(
                &format!("{BASE}/d{i}"),
                &json!({"node_pool": "p", "dns": "d"}),
            )
            .to_request(),
        )
        .await;
        assert_eq!(r.json["status"], "CREATED", "{:?}", r.json);
    }
    let answers = join_all((0..n).map(|i| {
        let body = json!({"action": "PROCURE", "name": format!("d{i}"), "workflow_run_id": "r"});
        let app = &app;
        async move { send(app, post(BASE, &body).to_request()).await }
    }))
    .await;
    for r in answers {
        assert_eq!(r.json["status"], "PROCURED", "{:?}", r.json);
    }
    let m = &svc.state.metrics;
    let text = m.render();
    assert!(text.contains("store_call_duration_seconds"), "{text}");
    (m.group_commit_members.get(), m.group_commit_txns.get())
}

#[actix_web::test]
async fn the_service_groups_its_etcd_transactions_by_default_and_not_when_disabled() {
    let (members, txns) = procure_concurrently(true).await;
    assert!(
        members >= 64,
        "every write went through the committer: {members}"
    );
    assert!(
        txns >= 1 && txns <= members,
        "{txns} Txns for {members} members"
    );
    assert_eq!(procure_concurrently(false).await, (0, 0));
}
