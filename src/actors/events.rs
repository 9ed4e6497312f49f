//! The change stream hub behind `GET /api/1.0/events`: one store watch per replica,
//! translated into `{kind, id, state, version, revision, at}` changes and fanned out to
//! every subscriber through its own bounded channel.
//!
//! - The shared watch starts with the first subscriber and stops with the last, so a
//!   replica nobody listens to pays nothing.
//! - Fan-out is `try_send` only: a subscriber whose buffer is full is closed with a
//!   final `overflow` event, and nobody else (no actor, no other subscriber) waits.
//! - A subscriber that resumes from a revision (`Last-Event-ID`) gets its own watch
//!   from that revision, which then simply stays its source: no seam, so no gap and no
//!   duplicate. A resume point the store has compacted away gets a `reset` event, then
//!   live changes after the revision it names.
//! - All the changes of one store revision travel as one buffer entry, so a client
//!   never holds half a transaction and `Last-Event-ID` is always a clean cut.
//! - Each change is encoded once per replica: a subscriber that wants one change of a
//!   revision, or all of them, gets a shared buffer, not a copy; only a filter that
//!   keeps some of a revision's changes joins its own.
//! - A subscriber's stream writes whatever is queued when it is polled as one chunk,
//!   not one per revision: a client polled late (a busy worker, a burst) costs one
//!   write per wake-up.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::Stream;
use prometheus::{Encoder, IntCounter, IntGauge, Registry, TextEncoder};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, watch, Notify};
use tracing::{info, warn};

use crate::config::EventsSettings;
use crate::keys;
use crate::ports::store::{Store, StoreError, WatchEvent};

/// The one prefix watched: every key of the layout starts with `/`.
const ROOT: &str = "/";

/// The heartbeat comment.
const KEEP_ALIVE: &[u8] = b": keep-alive\n\n";

/// Most bytes a stream joins into one chunk; what is queued beyond follows at once in
/// the next.
const MAX_CHUNK: usize = 64 * 1024;

/// What changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A shadow deployable record.
    Shadow,
    /// A worker record.
    Worker,
    /// An instance record.
    Instance,
    /// A watch intent.
    Intent,
    /// The controller election key.
    Leader,
}

impl Kind {
    /// Every kind, in the order the API lists them.
    pub const ALL: [Kind; 5] = [
        Kind::Shadow,
        Kind::Worker,
        Kind::Instance,
        Kind::Intent,
        Kind::Leader,
    ];

    /// Its name in the API (`?kinds=` and the `kind` field).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Shadow => "shadow",
            Kind::Worker => "worker",
            Kind::Instance => "instance",
            Kind::Intent => "intent",
            Kind::Leader => "leader",
        }
    }

    /// The kind of a name, exactly as the API spells it.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// Which changes a subscriber wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Bit per [`Kind`]; 0 means every kind.
    kinds: u8,
    /// Only shadow deployables of this environment (other kinds are unaffected).
    env: Option<String>,
}

impl Filter {
    /// `kinds` (empty: all) and an optional environment for shadow deployables.
    pub fn new(kinds: &[Kind], env: Option<String>) -> Self {
        Self {
            kinds: kinds.iter().fold(0, |acc, k| acc | k.bit()),
            env,
        }
    }

    fn is_all(&self) -> bool {
        self.kinds == 0 && self.env.is_none()
    }

    fn wants(&self, c: &Change) -> bool {
        let kind = self.kinds == 0 || self.kinds & c.kind.bit() != 0;
        let env = match (&self.env, c.kind) {
            (Some(env), Kind::Shadow) => c.env.as_deref() == Some(env.as_str()),
            _ => true,
        };
        kind && env
    }
}

/// One change, as the `data` of an `event: change`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// What changed.
    pub kind: Kind,
    /// `{env}/{name}` for a shadow deployable, the record id otherwise, the holder for
    /// the leader key.
    pub id: String,
    /// The environment, for shadow deployables and watch intents.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    /// The record's state (`status` for intents; `ELECTED`/`VACANT` for the leader;
    /// `DELETED` for a deleted record).
    pub state: String,
    /// The record's own `version` field (shadow deployables); `null` for kinds whose
    /// records have none and for deletions.
    pub version: Option<u64>,
    /// The store revision of the change (also the SSE `id`).
    pub revision: i64,
    /// When this replica saw the change (RFC 3339, milliseconds).
    pub at: String,
    /// Whether the record was deleted.
    pub deleted: bool,
}

/// The fields of a record the stream reports; everything else is skipped unread.
#[derive(Default, Deserialize)]
struct Probe {
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    version: Option<u64>,
    #[serde(default)]
    env: Option<String>,
}

/// Turns raw watch events into changes of the reported kinds. `leader` remembers the
/// last election holder this stream saw, to name it when the key is deleted.
struct Translator {
    leader: Option<String>,
}

impl Translator {
    fn new() -> Self {
        Self { leader: None }
    }

    fn change(&mut self, ev: &WatchEvent, at: &str) -> Option<Change> {
        let (key, value, revision) = match ev {
            WatchEvent::Put(kv) => (kv.key.as_str(), Some(&kv.value), kv.mod_revision),
            WatchEvent::Delete { key, mod_revision } => (key.as_str(), None, *mod_revision),
        };
        let (kind, id, env) = if let Some((env, name)) = keys::parse_shadow(key) {
            (Kind::Shadow, format!("{env}/{name}"), Some(env.to_owned()))
        } else if let Some(id) = keys::child(keys::WORKER_PREFIX, key) {
            (Kind::Worker, id.to_owned(), None)
        } else if let Some(id) = keys::child(keys::INSTANCE_PREFIX, key) {
            (Kind::Instance, id.to_owned(), None)
        } else if let Some(id) = keys::child(keys::WATCH_INTENT_PREFIX, key) {
            (Kind::Intent, id.to_owned(), None)
        } else if key == keys::LEADER {
            return Some(self.leader_change(value.map(Vec::as_slice), revision, at));
        } else {
            return None;
        };
        let mut change = Change {
            kind,
            id,
            env,
            state: "DELETED".to_owned(),
            version: None,
            revision,
            at: at.to_owned(),
            deleted: value.is_none(),
        };
        if let Some(value) = value {
            let probe: Probe = serde_json::from_slice(value).unwrap_or_default();
            change.state = probe
                .state
                .or(probe.status)
                .unwrap_or_else(|| "UNKNOWN".to_owned());
            change.version = probe.version;
            if kind == Kind::Intent {
                change.env = probe.env;
            }
        }
        Some(change)
    }

    fn leader_change(&mut self, value: Option<&[u8]>, revision: i64, at: &str) -> Change {
        let (state, deleted) = match value {
            Some(v) => {
                self.leader = Some(String::from_utf8_lossy(v).into_owned());
                ("ELECTED", false)
            }
            None => ("VACANT", true),
        };
        let id = self.leader.clone().unwrap_or_default();
        if deleted {
            self.leader = None;
        }
        Change {
            kind: Kind::Leader,
            id,
            env: None,
            state: state.to_owned(),
            version: None,
            revision,
            at: at.to_owned(),
            deleted,
        }
    }

    /// One watch batch as `(revision, changes)` groups in revision order (a group may be
    /// empty: the revision touched only keys the stream does not report).
    fn batch(&mut self, events: &[WatchEvent]) -> Vec<(i64, Vec<Change>)> {
        let at = crate::domain::time::format(&crate::clock::utc_now());
        let mut out: Vec<(i64, Vec<Change>)> = Vec::new();
        for ev in events {
            let rev = match ev {
                WatchEvent::Put(kv) => kv.mod_revision,
                WatchEvent::Delete { mod_revision, .. } => *mod_revision,
            };
            if out.last().is_none_or(|(r, _)| *r != rev) {
                out.push((rev, Vec::new()));
            }
            if let Some(c) = self.change(ev, &at) {
                if let Some((_, group)) = out.last_mut() {
                    group.push(c);
                }
            }
        }
        out
    }
}

/// `id: <revision>\nevent: change\ndata: <json>\n\n`.
fn change_frame(c: &Change) -> Bytes {
    let data = serde_json::to_string(c).unwrap_or_default();
    Bytes::from(format!(
        "id: {}\nevent: change\ndata: {data}\n\n",
        c.revision
    ))
}

fn reset_frame(revision: i64) -> Bytes {
    Bytes::from(format!(
        "id: {revision}\nevent: reset\ndata: {{\"reason\":\"compacted\",\"revision\":{revision}}}\n\n"
    ))
}

fn overflow_frame(dropped_after: i64) -> Bytes {
    Bytes::from(format!(
        "id: {dropped_after}\nevent: overflow\ndata: {{\"dropped_after\":{dropped_after}}}\n\n"
    ))
}

/// The hub's own metrics (`events_subscribers`, `events_overflow_total`,
/// `events_sent_total`).
#[derive(Clone)]
pub struct EventMetrics {
    registry: Registry,
    /// Open subscriptions.
    pub subscribers: IntGauge,
    /// Subscribers closed because they fell behind.
    pub overflow: IntCounter,
    /// Change events queued to subscribers.
    pub sent: IntCounter,
}

impl EventMetrics {
    fn new() -> Self {
        let registry = Registry::new();
        let subscribers = IntGauge::new("events_subscribers", "Open change stream subscriptions")
            .unwrap_or_else(|e| panic!("metric: {e}"));
        let overflow = IntCounter::new(
            "events_overflow_total",
            "Change stream subscribers closed because they fell behind",
        )
        .unwrap_or_else(|e| panic!("metric: {e}"));
        let sent = IntCounter::new(
            "events_sent_total",
            "Change events queued to change stream subscribers",
        )
        .unwrap_or_else(|e| panic!("metric: {e}"));
        for c in [
            Box::new(subscribers.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(overflow.clone()),
            Box::new(sent.clone()),
        ] {
            let _ = registry.register(c);
        }
        Self {
            registry,
            subscribers,
            overflow,
            sent,
        }
    }

    /// The Prometheus text exposition of these metrics.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// A subscriber's place under `EVENTS_MAX_CLIENTS`, given back once: when the stream
/// is dropped, or as soon as the hub closes it (overflow), so a client that stopped
/// reading does not hold a place while its connection lingers.
struct Slot {
    released: AtomicBool,
    open: Arc<AtomicUsize>,
    gauge: IntGauge,
}

impl Slot {
    fn release(&self) {
        if !self.released.swap(true, Ordering::SeqCst) {
            self.open.fetch_sub(1, Ordering::SeqCst);
            self.gauge.dec();
        }
    }
}

/// The hub's side of one subscriber.
struct Client {
    id: u64,
    slot: Arc<Slot>,
    tx: mpsc::Sender<Bytes>,
    filter: Filter,
    /// The last event, sent after everything queued (overflow).
    end: Arc<Mutex<Option<Bytes>>>,
    /// Highest revision offered to this client.
    seen: i64,
}

impl Client {
    /// Queues one revision's changes (those the filter wants). False when the client is
    /// gone, or has just been closed for falling behind.
    fn offer(&mut self, revision: i64, frames: &Frames, metrics: &EventMetrics) -> bool {
        if revision <= self.seen {
            return true;
        }
        let Some((bytes, n)) = frames.for_filter(&self.filter) else {
            self.seen = revision;
            return !self.tx.is_closed();
        };
        match self.tx.try_send(bytes) {
            Ok(()) => {
                self.seen = revision;
                metrics.sent.inc_by(n);
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.close_with(overflow_frame(revision - 1));
                metrics.overflow.inc();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Queues a `reset`; a client too far behind for it gets `overflow` instead.
    fn reset(&mut self, revision: i64, metrics: &EventMetrics) -> bool {
        match self.tx.try_send(reset_frame(revision)) {
            Ok(()) => {
                self.seen = revision;
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.close_with(overflow_frame(self.seen));
                metrics.overflow.inc();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    fn close_with(&self, frame: Bytes) {
        if let Ok(mut end) = self.end.lock() {
            *end = Some(frame);
        }
        self.slot.release();
    }
}

/// The frames of one revision, each change encoded once for every subscriber.
struct Frames<'a> {
    changes: &'a [Change],
    encoded: Vec<Bytes>,
    /// Every frame of the revision in one buffer, joined the first time it is wanted.
    all: std::cell::OnceCell<Bytes>,
}

impl<'a> Frames<'a> {
    fn new(changes: &'a [Change]) -> Self {
        Self {
            changes,
            encoded: changes.iter().map(change_frame).collect(),
            all: std::cell::OnceCell::new(),
        }
    }

    /// The whole revision, shared.
    fn all(&self) -> Bytes {
        match self.encoded.as_slice() {
            [one] => one.clone(),
            many => self
                .all
                .get_or_init(|| {
                    let mut out = BytesMut::with_capacity(many.iter().map(Bytes::len).sum());
                    for f in many {
                        out.extend_from_slice(f);
                    }
                    out.freeze()
                })
                .clone(),
        }
    }

    /// What `filter` wants of the revision and how many changes that is; `None` when
    /// nothing. One change, or all of them, is a shared buffer.
    fn for_filter(&self, filter: &Filter) -> Option<(Bytes, u64)> {
        let total = self.encoded.len();
        let wanted = if filter.is_all() {
            total
        } else {
            self.changes.iter().filter(|c| filter.wants(c)).count()
        };
        let bytes = match wanted {
            0 => return None,
            n if n == total => self.all(),
            1 => self
                .changes
                .iter()
                .zip(&self.encoded)
                .find(|(c, _)| filter.wants(c))
                .map(|(_, f)| f.clone())?,
            _ => {
                let mut out = BytesMut::new();
                for (c, f) in self.changes.iter().zip(&self.encoded) {
                    if filter.wants(c) {
                        out.extend_from_slice(f);
                    }
                }
                out.freeze()
            }
        };
        Some((bytes, wanted as u64))
    }
}

/// Where a watch's changes go.
trait Sink {
    /// Offers one revision's changes; false when nobody is left to offer to.
    fn deliver(&mut self, revision: i64, changes: &[Change]) -> bool;
    /// The resume point was compacted: changes up to `revision` are lost.
    fn reset(&mut self, revision: i64) -> bool;
    /// Resolves once nobody is left.
    async fn gone(&self);
}

struct HubState {
    clients: Vec<Client>,
    running: bool,
}

/// One per replica: the shared watch and its subscribers.
pub struct EventHub {
    store: Arc<dyn Store>,
    settings: EventsSettings,
    state: Mutex<HubState>,
    wake: Notify,
    open: Arc<AtomicUsize>,
    next_id: AtomicU64,
    /// `true` once the replica shuts down: every stream ends.
    closing: watch::Sender<bool>,
    /// Its metrics.
    pub metrics: EventMetrics,
}

/// Why a subscription was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    /// `EVENTS_MAX_CLIENTS` subscribers are open already.
    #[error("{0} change stream subscribers are open already; retry later")]
    TooMany(usize),
    /// The store could not be read.
    #[error(transparent)]
    Store(StoreError),
}

impl EventHub {
    /// A hub over `store`; nothing runs until the first subscriber.
    pub fn new(store: Arc<dyn Store>, settings: EventsSettings) -> Arc<Self> {
        Arc::new(Self {
            store,
            settings,
            state: Mutex::new(HubState {
                clients: Vec::new(),
                running: false,
            }),
            wake: Notify::new(),
            open: Arc::new(AtomicUsize::new(0)),
            next_id: AtomicU64::new(1),
            closing: watch::channel(false).0,
            metrics: EventMetrics::new(),
        })
    }

    /// Ends every open stream (and every one opened later) so a graceful shutdown does
    /// not wait for subscribers that never hang up; clients reconnect to another replica
    /// with `Last-Event-ID`.
    pub fn close_all(&self) {
        self.closing.send_replace(true);
    }

    /// Subscribers open right now (one closed for falling behind no longer counts).
    pub fn subscribers(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Whether the shared watch runs (it does only while someone subscribes).
    pub fn watching(&self) -> bool {
        self.state.lock().map(|st| st.running).unwrap_or(false)
    }

    /// Opens a subscription: every change committed after this returns (the shared
    /// watch, started now if it is not running), or, with `since`, every change after that
    /// revision and then live ones (a watch of its own). Must be called inside an actix
    /// system.
    pub async fn subscribe(
        self: &Arc<Self>,
        filter: Filter,
        since: Option<i64>,
    ) -> Result<Subscription, SubscribeError> {
        let max = self.settings.max_clients;
        if self
            .open
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .is_err()
        {
            return Err(SubscribeError::TooMany(max));
        }
        self.metrics.subscribers.inc();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(self.settings.client_buffer.max(1));
        let end = Arc::new(Mutex::new(None));
        let slot = Arc::new(Slot {
            released: AtomicBool::new(false),
            open: self.open.clone(),
            gauge: self.metrics.subscribers.clone(),
        });
        // From here on, dropping the guard (an error, a cancelled request) gives the
        // place back.
        let guard = Guard {
            hub: self.clone(),
            id,
            slot: slot.clone(),
            shared: since.is_none(),
        };
        // A fresh subscriber's starting point, read before it joins: a watch started
        // for it begins right after, so nothing committed once it has its answer is
        // missed. One small read per subscription.
        let now = match since {
            Some(_) => None,
            None => Some(
                current_revision(self.store.as_ref())
                    .await
                    .map_err(SubscribeError::Store)?,
            ),
        };
        let client = Client {
            id,
            slot,
            tx,
            filter,
            end: end.clone(),
            seen: since.or(now).unwrap_or(0),
        };
        match since {
            Some(since) => {
                let store = self.store.clone();
                let metrics = self.metrics.clone();
                spawn(async move {
                    let mut sink = ClientSink { client, metrics };
                    pump(store.as_ref(), since + 1, &mut sink).await;
                });
            }
            None => self.join(client, now.unwrap_or(0)),
        }
        Ok(Subscription {
            rx,
            end,
            heartbeat: self.settings.heartbeat,
            closing: self.closing.subscribe(),
            _guard: guard,
        })
    }

    fn join(self: &Arc<Self>, client: Client, revision: i64) {
        let start = match self.state.lock() {
            Ok(mut st) => {
                st.clients.push(client);
                !std::mem::replace(&mut st.running, true)
            }
            Err(_) => false,
        };
        if start {
            let hub = self.clone();
            spawn(async move { hub.run(revision).await });
        }
    }

    /// The shared watch, from the revision after `start`, until the last subscriber
    /// leaves.
    async fn run(self: Arc<Self>, start: i64) {
        let mut sink = HubSink { hub: self.clone() };
        info!(revision = start, "change stream: shared watch started");
        pump(self.store.as_ref(), start + 1, &mut sink).await;
        info!("change stream: shared watch stopped (no subscribers)");
    }

    fn leave(&self, id: u64, shared: bool) {
        if !shared {
            return;
        }
        if let Ok(mut st) = self.state.lock() {
            st.clients.retain(|c| c.id != id);
            if st.clients.is_empty() {
                self.wake.notify_one();
            }
        }
    }
}

/// Runs `fut` on the system's arbiter, which lives as long as the service: not on the
/// HTTP worker that happened to take the first subscriber.
fn spawn(fut: impl std::future::Future<Output = ()> + Send + 'static) {
    if !actix_rt::System::current().arbiter().spawn(fut) {
        warn!("change stream: the system arbiter is gone; not started");
    }
}

/// The store's current revision (a read of one small key).
async fn current_revision(store: &dyn Store) -> Result<i64, StoreError> {
    store.list(keys::LEADER).await.map(|(_, rev)| rev)
}

struct HubSink {
    hub: Arc<EventHub>,
}

impl HubSink {
    /// True (and the hub marked stopped) when nobody is subscribed; under the lock, so
    /// a subscriber arriving now starts a new watch.
    fn stop_if_empty(st: &mut HubState) -> bool {
        if st.clients.is_empty() {
            st.running = false;
            return true;
        }
        false
    }
}

impl Sink for HubSink {
    fn deliver(&mut self, revision: i64, changes: &[Change]) -> bool {
        let frames = Frames::new(changes);
        let Ok(mut st) = self.hub.state.lock() else {
            return false;
        };
        let metrics = &self.hub.metrics;
        st.clients
            .retain_mut(|c| c.offer(revision, &frames, metrics));
        !Self::stop_if_empty(&mut st)
    }

    fn reset(&mut self, revision: i64) -> bool {
        let Ok(mut st) = self.hub.state.lock() else {
            return false;
        };
        let metrics = &self.hub.metrics;
        st.clients.retain_mut(|c| c.reset(revision, metrics));
        !Self::stop_if_empty(&mut st)
    }

    async fn gone(&self) {
        loop {
            // The timer only bounds a missed wake-up.
            tokio::select! {
                () = self.hub.wake.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
            if let Ok(mut st) = self.hub.state.lock() {
                if Self::stop_if_empty(&mut st) {
                    return;
                }
            }
        }
    }
}

struct ClientSink {
    client: Client,
    metrics: EventMetrics,
}

impl Sink for ClientSink {
    fn deliver(&mut self, revision: i64, changes: &[Change]) -> bool {
        let frames = Frames::new(changes);
        self.client.offer(revision, &frames, &self.metrics)
    }

    fn reset(&mut self, revision: i64) -> bool {
        self.client.reset(revision, &self.metrics)
    }

    async fn gone(&self) {
        self.client.tx.closed().await
    }
}

/// Follows the store from `next` into `sink` until the sink is gone: after a break it
/// watches again from the revision after the last one delivered (no gap); a compacted
/// resume point becomes a `reset` and a watch from the current revision.
async fn pump<S: Sink>(store: &dyn Store, mut next: i64, sink: &mut S) {
    let mut translator = Translator::new();
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut compacted = false;
        let watch = tokio::select! {
            w = store.watch(ROOT, next) => w,
            () = sink.gone() => return,
        };
        match watch {
            Ok(mut rx) => loop {
                let item = tokio::select! {
                    i = rx.recv() => i,
                    () = sink.gone() => return,
                };
                match item {
                    Some(Ok(events)) => {
                        backoff = Duration::from_millis(100);
                        for (rev, changes) in translator.batch(&events) {
                            next = next.max(rev + 1);
                            if !changes.is_empty() && !sink.deliver(rev, &changes) {
                                return;
                            }
                        }
                    }
                    Some(Err(StoreError::Compacted(_))) => {
                        compacted = true;
                        break;
                    }
                    Some(Err(e)) => {
                        warn!(error = %e, revision = next, "change stream: watch broke; watching again");
                        break;
                    }
                    None => {
                        warn!(
                            revision = next,
                            "change stream: watch ended; watching again"
                        );
                        break;
                    }
                }
            },
            Err(StoreError::Compacted(_)) => compacted = true,
            Err(e) => warn!(error = %e, revision = next, "change stream: cannot watch"),
        }
        if compacted {
            match current_revision(store).await {
                Ok(rev) => {
                    info!(
                        from = next,
                        to = rev,
                        "change stream: resume point compacted; reset"
                    );
                    if !sink.reset(rev) {
                        return;
                    }
                    next = rev + 1;
                    continue;
                }
                Err(e) => warn!(error = %e, "change stream: cannot read the store revision"),
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = sink.gone() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Leaves the hub when the subscription's stream is dropped (the client went away).
struct Guard {
    hub: Arc<EventHub>,
    id: u64,
    slot: Arc<Slot>,
    shared: bool,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.slot.release();
        self.hub.leave(self.id, self.shared);
    }
}

/// One open subscription: its buffer, its final event, its heartbeat.
pub struct Subscription {
    rx: mpsc::Receiver<Bytes>,
    end: Arc<Mutex<Option<Bytes>>>,
    heartbeat: Duration,
    closing: watch::Receiver<bool>,
    _guard: Guard,
}

impl Subscription {
    /// The `text/event-stream` body: queued events (everything queued when it is polled
    /// in one chunk, in order), a `: keep-alive` comment whenever the heartbeat period
    /// passes, and, once the hub closed the buffer, the final event (`overflow`) before
    /// the end. Dropping it unsubscribes.
    pub fn into_stream(self) -> impl Stream<Item = Bytes> {
        let start = tokio::time::Instant::now() + self.heartbeat;
        let mut tick = tokio::time::interval_at(start, self.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        futures::stream::unfold(Some((self, tick)), |state| async move {
            let (mut sub, mut tick) = state?;
            if *sub.closing.borrow_and_update() {
                return None;
            }
            tokio::select! {
                biased;
                _ = sub.closing.changed() => None,
                item = sub.rx.recv() => match item {
                    Some(first) => {
                        let (chunk, open) = sub.coalesce(first);
                        Some((chunk, open.then_some((sub, tick))))
                    }
                    None => {
                        let end = sub.end.lock().ok().and_then(|mut e| e.take());
                        end.map(|bytes| (bytes, None))
                    }
                },
                _ = tick.tick() => Some((Bytes::from_static(KEEP_ALIVE), Some((sub, tick)))),
            }
        })
    }

    /// `first` and what is queued behind it (up to [`MAX_CHUNK`]) as one chunk, and
    /// whether the buffer is still open: once the hub has closed it and it is drained,
    /// the final event (if any) ends the chunk and the stream ends after it.
    fn coalesce(&mut self, first: Bytes) -> (Bytes, bool) {
        let mut joined: Option<BytesMut> = None;
        let mut open = true;
        while open && joined.as_ref().map_or(first.len(), BytesMut::len) < MAX_CHUNK {
            let next = match self.rx.try_recv() {
                Ok(next) => next,
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    open = false;
                    match self.end.lock().ok().and_then(|mut e| e.take()) {
                        Some(end) => end,
                        None => break,
                    }
                }
            };
            joined
                .get_or_insert_with(|| {
                    let mut b = BytesMut::with_capacity(MAX_CHUNK.min(8 * first.len()));
                    b.extend_from_slice(&first);
                    b
                })
                .extend_from_slice(&next);
        }
        (joined.map_or(first, BytesMut::freeze), open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::store::Kv;

    fn put(key: &str, value: &str, rev: i64) -> WatchEvent {
        WatchEvent::Put(Kv {
            key: key.to_owned(),
            value: value.as_bytes().to_vec(),
            mod_revision: rev,
            create_revision: rev,
        })
    }

    #[test]
    fn records_translate_by_key_and_unreported_keys_are_skipped() {
        let mut t = Translator::new();
        let groups = t.batch(&[
            put(
                "/shadow-deployables/int/a",
                r#"{"state":"PROCURED","version":7,"name":"a"}"#,
                10,
            ),
            put("/shadow-deployables-index/int/in-use/a", "true", 10),
            put("/workers/w1", r#"{"id":"w1","state":"RUNNING"}"#, 11),
            put(
                "/watch-intents/r1",
                r#"{"status":"PENDING","env":"prod"}"#,
                12,
            ),
            put("/leader/controller", "rp-1", 13),
            WatchEvent::Delete {
                key: "/leader/controller".into(),
                mod_revision: 14,
            },
            WatchEvent::Delete {
                key: "/instances/i1".into(),
                mod_revision: 15,
            },
            put("/idempotency/int/k", "{}", 16),
        ]);
        let revs: Vec<i64> = groups.iter().map(|(r, _)| *r).collect();
        assert_eq!(revs, vec![10, 11, 12, 13, 14, 15, 16]);
        let all: Vec<&Change> = groups.iter().flat_map(|(_, g)| g).collect();
        let brief: Vec<(Kind, &str, &str, Option<u64>, bool)> = all
            .iter()
            .map(|c| {
                (
                    c.kind,
                    c.id.as_str(),
                    c.state.as_str(),
                    c.version,
                    c.deleted,
                )
            })
            .collect();
        assert_eq!(
            brief,
            vec![
                (Kind::Shadow, "int/a", "PROCURED", Some(7), false),
                (Kind::Worker, "w1", "RUNNING", None, false),
                (Kind::Intent, "r1", "PENDING", None, false),
                (Kind::Leader, "rp-1", "ELECTED", None, false),
                (Kind::Leader, "rp-1", "VACANT", None, true),
                (Kind::Instance, "i1", "DELETED", None, true),
            ]
        );
        assert_eq!(all[0].env.as_deref(), Some("int"));
        assert_eq!(all[2].env.as_deref(), Some("prod"));
    }

    #[test]
    fn filters_select_kinds_and_the_env_of_shadow_events_only() {
        let mut t = Translator::new();
        let groups = t.batch(&[
            put(
                "/shadow-deployables/int/a",
                r#"{"state":"FREE","version":1}"#,
                1,
            ),
            put(
                "/shadow-deployables/prod/b",
                r#"{"state":"FREE","version":1}"#,
                2,
            ),
            put("/workers/w1", r#"{"state":"PENDING"}"#, 3),
        ]);
        let changes: Vec<Change> = groups.into_iter().flat_map(|(_, g)| g).collect();
        let ids = |f: &Filter| -> Vec<String> {
            changes
                .iter()
                .filter(|c| f.wants(c))
                .map(|c| c.id.clone())
                .collect()
        };
        assert_eq!(ids(&Filter::default()).len(), 3);
        assert_eq!(
            ids(&Filter::new(&[], Some("int".into()))),
            vec!["int/a", "w1"]
        );
        assert_eq!(ids(&Filter::new(&[Kind::Worker], None)), vec!["w1"]);
        assert_eq!(
            ids(&Filter::new(&[Kind::Shadow], Some("prod".into()))),
            vec!["prod/b"]
        );
    }

    fn put_txn(key: &str, value: &str) -> crate::ports::store::Txn {
        crate::ports::store::Txn {
            compares: Vec::new(),
            success: vec![crate::ports::store::Op::Put {
                key: key.to_owned(),
                value: value.as_bytes().to_vec(),
                lease: None,
            }],
            failure_gets: Vec::new(),
        }
    }

    /// The `id` of every change event in `text`, in order.
    fn change_ids(text: &str) -> Vec<String> {
        text.split("\n\n")
            .filter(|frame| frame.contains("event: change\n"))
            .filter_map(|frame| frame.lines().find_map(|l| l.strip_prefix("data: ")))
            .filter_map(|data| serde_json::from_str::<serde_json::Value>(data).ok())
            .filter_map(|v| v["id"].as_str().map(str::to_owned))
            .collect()
    }

    #[actix_rt::test]
    async fn a_burst_reaches_a_subscriber_in_fewer_chunks_than_events_and_in_order() {
        use futures::StreamExt;
        const N: usize = 24;
        let store: Arc<dyn Store> = Arc::new(crate::adapters::memory::MemoryStore::new());
        let hub = EventHub::new(store.clone(), EventsSettings::default());
        let sub = hub
            .subscribe(Filter::default(), None)
            .await
            .unwrap_or_else(|e| panic!("subscribe: {e}"));
        for i in 0..N {
            let key = format!("/workers/w{i:02}");
            let put = store.txn(put_txn(&key, r#"{"state":"PENDING"}"#)).await;
            assert!(put.is_ok_and(|r| r.succeeded), "{key}");
        }
        // The shared watch runs on this thread: let it queue the whole burst before the
        // stream is read, as when a busy client is polled late.
        for _ in 0..100_000 {
            if hub.metrics.sent.get() == N as u64 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(hub.metrics.sent.get(), N as u64, "the burst was not queued");
        let mut stream = Box::pin(sub.into_stream());
        let mut text = String::new();
        let mut chunks = 0;
        while change_ids(&text).len() < N {
            let chunk = stream
                .next()
                .await
                .unwrap_or_else(|| panic!("ended after {chunks} chunks: {text}"));
            chunks += 1;
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
        let expected: Vec<String> = (0..N).map(|i| format!("w{i:02}")).collect();
        assert_eq!(change_ids(&text), expected);
        assert!(chunks < N, "{N} queued events took {chunks} chunks");
    }

    #[test]
    fn a_change_is_encoded_once_and_shared_by_every_filter_that_wants_it() {
        let mut t = Translator::new();
        let groups = t.batch(&[
            put("/workers/w1", r#"{"state":"RUNNING"}"#, 5),
            put("/instances/i1", r#"{"state":"PENDING"}"#, 6),
            put("/instances/i1", r#"{"state":"RUNNING"}"#, 6),
        ]);
        let (_, one) = &groups[0];
        let frames = Frames::new(one);
        let all = frames.for_filter(&Filter::default());
        let workers = frames.for_filter(&Filter::new(&[Kind::Worker], None));
        let env = frames.for_filter(&Filter::new(&[], Some("int".into())));
        let none = frames.for_filter(&Filter::new(&[Kind::Shadow], None));
        let ptr = |f: &Option<(Bytes, u64)>| f.as_ref().map(|(b, n)| (b.as_ptr(), *n));
        assert!(all.is_some() && none.is_none());
        assert_eq!(
            ptr(&workers),
            ptr(&all),
            "the worker filter copied the frame"
        );
        assert_eq!(ptr(&env), ptr(&all), "the env filter copied the frame");

        let (_, two) = &groups[1];
        let frames = Frames::new(two);
        let all = frames.for_filter(&Filter::default());
        let instances = frames.for_filter(&Filter::new(&[Kind::Instance], None));
        assert_eq!(all.as_ref().map(|(_, n)| *n), Some(2));
        assert_eq!(
            ptr(&instances),
            ptr(&all),
            "a filter that wants the whole revision copied it"
        );
        assert_eq!(
            ptr(&frames.for_filter(&Filter::default())),
            ptr(&all),
            "the revision's frames were joined twice"
        );
    }

    #[test]
    fn a_frame_carries_the_revision_as_its_id() {
        let c = Change {
            kind: Kind::Shadow,
            id: "int/a".into(),
            env: Some("int".into()),
            state: "FREE".into(),
            version: Some(2),
            revision: 42,
            at: "2026-01-10T14:20:00.123Z".into(),
            deleted: false,
        };
        assert_eq!(
            change_frame(&c),
            "id: 42\nevent: change\ndata: {\"kind\":\"shadow\",\"id\":\"int/a\",\"env\":\"int\",\
             \"state\":\"FREE\",\"version\":2,\"revision\":42,\"at\":\"2026-01-10T14:20:00.123Z\",\
             \"deleted\":false}\n\n"
        );
    }
}
