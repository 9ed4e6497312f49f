//! The intent manager (leader only): one watcher actor per pending intent, and the
//! durable callback outbox — an intent whose status is final and whose callback is not
//! yet delivered is an outbox entry; each attempt is recorded in the intent before the
//! next is planned, so a restart or failover resumes deliveries where they stopped
//! (at least once, with a stable `webhook-id`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use rand::Rng;
use tracing::{info, warn};

use crate::actors::operations::{IntentWriteError, OpsCtx};
use crate::actors::watcher::Watcher;
use crate::domain::intent::{record_attempt, WatchIntent};
use crate::keys;
use crate::ports::callback::CallbackRequest;

/// How often the manager sweeps for due deliveries and unwatched intents.
const SWEEP: Duration = Duration::from_millis(500);

/// Look at one intent now.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Track(pub String);

/// Look at every intent now.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Sweep;

/// A watcher ended.
#[derive(Message)]
#[rtype(result = "()")]
pub struct WatcherDone(pub String);

/// Stop (leadership lost).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Stop;

/// The intent manager actor.
pub struct IntentManager {
    ctx: Arc<OpsCtx>,
    watchers: HashMap<String, Addr<Watcher>>,
    delivering: HashSet<String>,
}

impl IntentManager {
    /// A manager.
    pub fn new(ctx: Arc<OpsCtx>) -> Self {
        Self {
            ctx,
            watchers: HashMap::new(),
            delivering: HashSet::new(),
        }
    }

    fn look_at(&mut self, intent: WatchIntent, rev: i64, ctx: &mut Context<Self>) {
        let id = intent.request_id.clone();
        if intent.is_pending() {
            if !self.watchers.contains_key(&id) {
                let w = Watcher::new(self.ctx.clone(), intent, rev, ctx.address()).start();
                self.watchers.insert(id, w);
            }
            return;
        }
        if intent.delivery_due(self.ctx.clock.now()) && self.delivering.insert(id.clone()) {
            let octx = self.ctx.clone();
            ctx.spawn(
                async move { deliver(&octx, &id).await }
                    .into_actor(self)
                    .map(|id, act, _| {
                        act.delivering.remove(&id);
                    }),
            );
        }
    }
}

impl Actor for IntentManager {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let pending = self
            .ctx
            .intents
            .all()
            .iter()
            .filter(|(i, _)| i.is_pending())
            .count();
        info!(pending, "resuming watch intents");
        ctx.notify(Sweep);
        ctx.run_interval(SWEEP, |_, ctx| ctx.notify(Sweep));
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        for (_, w) in self.watchers.drain() {
            w.do_send(crate::actors::watcher::StopWatching);
        }
    }
}

impl Handler<Stop> for IntentManager {
    type Result = ();
    fn handle(&mut self, _msg: Stop, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

impl Handler<Sweep> for IntentManager {
    type Result = ();
    fn handle(&mut self, _msg: Sweep, ctx: &mut Self::Context) {
        if self.ctx.fence.epoch().is_none() {
            return;
        }
        for (intent, rev) in self.ctx.intents.all() {
            self.look_at(intent, rev, ctx);
        }
    }
}

impl Handler<Track> for IntentManager {
    type Result = ();
    fn handle(&mut self, msg: Track, ctx: &mut Self::Context) {
        if let Some((intent, rev)) = self.ctx.intents.get(&msg.0) {
            self.look_at(intent, rev, ctx);
        }
    }
}

impl Handler<WatcherDone> for IntentManager {
    type Result = ();
    fn handle(&mut self, msg: WatcherDone, ctx: &mut Self::Context) {
        self.watchers.remove(&msg.0);
        ctx.notify(Track(msg.0));
    }
}

/// One delivery attempt of `id`'s callback, recorded in the intent. Returns the id.
async fn deliver(ctx: &OpsCtx, id: &str) -> String {
    // Read fresh: another replica (a previous leader) may have delivered already.
    let (intent, rev) = match ctx.store.get(&keys::watch_intent(id)).await {
        Ok(Some(kv)) => match serde_json::from_slice::<WatchIntent>(&kv.value) {
            Ok(i) => (i, kv.mod_revision),
            Err(e) => {
                warn!(request_id = %id, error = %e, "undecodable intent");
                return id.to_owned();
            }
        },
        Ok(None) => return id.to_owned(),
        Err(e) => {
            warn!(request_id = %id, error = %e, "cannot read intent");
            return id.to_owned();
        }
    };
    let now = ctx.clock.now();
    if !intent.delivery_due(now) {
        return id.to_owned();
    }
    let req = CallbackRequest {
        target: intent.callback.clone(),
        webhook_id: intent.delivery.webhook_id.clone(),
        timestamp: now.timestamp(),
        body: intent.callback_body(),
    };
    // Fenced like every leader-only side effect: a deposed leader sends nothing.
    if let Err(e) = ctx
        .fence
        .authorize(ctx.store.as_ref(), "callback", id)
        .await
    {
        warn!(request_id = %id, error = %e, "callback not sent: not authorized");
        return id.to_owned();
    }
    let outcome = ctx.sender.send(&req).await;
    let now = ctx.clock.now();
    let attempts = u32::try_from(intent.delivery.attempts.len()).unwrap_or(u32::MAX) + 1;
    let first = intent
        .delivery
        .attempts
        .first()
        .map(|a| a.at)
        .unwrap_or(now);
    let age = (now - first).to_std().unwrap_or_default();
    let jitter: f64 = rand::thread_rng().gen();
    let next_in = ctx.policy.plan_next(&outcome, attempts, age, jitter);
    if outcome.is_delivered() {
        if let Some(at) = intent.observed_at {
            let secs = (now - at).to_std().unwrap_or_default().as_secs_f64();
            ctx.metrics
                .callback_latency
                .with_label_values::<&str>(&[])
                .observe(secs);
        }
    }
    ctx.metrics
        .callbacks
        .with_label_values(&[outcome.kind()])
        .inc();
    info!(request_id = %id, attempt = attempts, outcome = outcome.kind(), status = ?outcome.status(), "callback attempt");
    let next = record_attempt(&intent, &outcome, now, next_in);
    match ctx.write_intent(&next, rev, true).await {
        Ok(_) | Err(IntentWriteError::Fenced) => {}
        Err(e) => warn!(request_id = %id, error = %e, "cannot record callback attempt"),
    }
    id.to_owned()
}
