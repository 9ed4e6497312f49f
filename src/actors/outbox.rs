//! The intent manager (leader only): finishes SUBMITTING intents whose replica did not
//! (crashed between storing and acting, or Kubernetes was unavailable), runs one watcher
//! actor per pending intent, and owns the durable callback outbox — an intent whose
//! status is final and whose callback is not yet delivered is an outbox entry; each
//! attempt is recorded in the intent before the next is planned, so a restart or
//! failover resumes deliveries where they stopped (at least once, with a stable
//! `webhook-id`). At most `CALLBACK_CONCURRENCY` deliveries are in flight at once.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use rand::Rng;
use tracing::{info, warn};

use crate::actors::leader::FenceError;
use crate::actors::ops_types::{
    ActError, IntentWriteError, OpsCtx, Stop, StopWatching, Sweep, Track, WatcherDone,
};
use crate::actors::watcher::Watcher;
use crate::domain::intent::{record_attempt, submission_failed, WatchIntent};
use crate::keys;
use crate::ports::callback::CallbackRequest;

/// How often the manager sweeps for due deliveries and unwatched intents.
const SWEEP: Duration = Duration::from_millis(500);

/// A SUBMITTING intent younger than this is left to the replica that stored it (it is
/// acting right now); older ones are finished here.
pub const SUBMIT_GRACE: Duration = Duration::from_secs(5);

/// First wait before running a SUBMITTING intent's action again after Kubernetes was
/// unavailable; doubles per attempt up to [`SUBMIT_RETRY_MAX`]. The intent's deadline
/// bounds the attempts.
const SUBMIT_RETRY_FIRST: Duration = Duration::from_millis(200);
const SUBMIT_RETRY_MAX: Duration = Duration::from_secs(10);

/// The intent manager actor.
pub struct IntentManager {
    ctx: Arc<OpsCtx>,
    watchers: HashMap<String, Addr<Watcher>>,
    delivering: HashSet<String>,
    submitting: HashSet<String>,
    /// Per SUBMITTING intent: failed attempts so far, and when to try again.
    retry_at: HashMap<String, (u32, Instant)>,
}

/// How finishing a SUBMITTING intent went.
enum Finish {
    Done,
    Retry,
}

impl IntentManager {
    /// A manager.
    pub fn new(ctx: Arc<OpsCtx>) -> Self {
        Self {
            ctx,
            watchers: HashMap::new(),
            delivering: HashSet::new(),
            submitting: HashSet::new(),
            retry_at: HashMap::new(),
        }
    }

    fn look_at(&mut self, intent: WatchIntent, rev: i64, ctx: &mut Context<Self>) {
        let id = intent.request_id.clone();
        if intent.is_submitting() {
            self.finish_submission(intent, rev, ctx);
            return;
        }
        self.retry_at.remove(&id);
        if intent.is_pending() {
            if !self.watchers.contains_key(&id) {
                let w =
                    Watcher::new(self.ctx.clone(), intent, rev, ctx.address().recipient()).start();
                self.watchers.insert(id, w);
            }
            return;
        }
        if intent.delivery_due(self.ctx.clock.now()) && self.delivering.insert(id.clone()) {
            let octx = self.ctx.clone();
            ctx.spawn(
                async move {
                    // Bounded concurrency: wait for a permit, then read fresh and send.
                    let Ok(_permit) = octx.deliveries.clone().acquire_owned().await else {
                        return id;
                    };
                    deliver(&octx, &id).await
                }
                .into_actor(self)
                .map(|id, act, _| {
                    act.delivering.remove(&id);
                }),
            );
        }
    }

    fn finish_submission(&mut self, intent: WatchIntent, rev: i64, ctx: &mut Context<Self>) {
        let id = intent.request_id.clone();
        if self.submitting.contains(&id) {
            return;
        }
        let now = self.ctx.clock.now();
        let age = (now - intent.created_at).to_std().unwrap_or_default();
        if age < SUBMIT_GRACE {
            return;
        }
        if self
            .retry_at
            .get(&id)
            .is_some_and(|(_, at)| Instant::now() < *at)
        {
            return;
        }
        self.submitting.insert(id.clone());
        let octx = self.ctx.clone();
        ctx.spawn(
            async move {
                let outcome = finish(&octx, &intent, rev).await;
                (intent.request_id, outcome)
            }
            .into_actor(self)
            .map(|(id, outcome), act, ctx| {
                act.submitting.remove(&id);
                match outcome {
                    Finish::Done => {
                        act.retry_at.remove(&id);
                    }
                    Finish::Retry => {
                        let tries = act.retry_at.get(&id).map_or(0, |(n, _)| *n) + 1;
                        let wait = SUBMIT_RETRY_FIRST
                            .saturating_mul(2u32.saturating_pow(tries.min(16)))
                            .min(SUBMIT_RETRY_MAX);
                        act.retry_at
                            .insert(id.clone(), (tries, Instant::now() + wait));
                        ctx.run_later(wait, move |_, ctx| ctx.notify(Track(id)));
                    }
                }
            }),
        );
    }
}

/// Runs a SUBMITTING intent's action on the leader, or fails the intent when that
/// cannot succeed (refused, unreadable, or past its deadline); the callback then says so.
async fn finish(ctx: &OpsCtx, intent: &WatchIntent, rev: i64) -> Finish {
    let id = intent.request_id.as_str();
    let now = ctx.clock.now();
    let failed = |reason: String| submission_failed(intent, &reason, now);
    let give_up = if now >= intent.deadline {
        Some(failed(format!(
            "the action could not be carried out before {}",
            intent.deadline
        )))
    } else {
        // Fenced like every leader-only side effect: the intent to act is recorded with a
        // write conditional on the leader key first, so a deposed leader acts on nothing.
        if let Err(e) = ctx
            .fence
            .authorize(ctx.store.as_ref(), "kube_action", id)
            .await
        {
            warn!(request_id = %id, error = %e, "submitting intent not finished: not authorized");
            // A store error may pass; a deposed leader leaves the intent to the new one.
            return match e {
                FenceError::Store(_) => Finish::Retry,
                FenceError::NotLeader | FenceError::Deposed => Finish::Done,
            };
        }
        match ctx.act(intent, rev, true).await {
            Ok(()) => {
                info!(request_id = %id, "submitting intent finished by the leader");
                return Finish::Done;
            }
            Err(e @ (ActError::Retryable(_) | ActError::NotRecorded(_))) => {
                warn!(request_id = %id, error = %e, "cannot finish submitting intent yet; will retry");
                return Finish::Retry;
            }
            Err(e @ (ActError::Rejected(_) | ActError::Corrupt(_))) => Some(failed(e.to_string())),
        }
    };
    if let Some(next) = give_up.flatten() {
        match ctx.write_intent(&next, rev, true).await {
            Ok(_) => {
                warn!(request_id = %id, detail = ?next.detail, "submitting intent failed");
                ctx.track(id);
            }
            Err(IntentWriteError::Conflict | IntentWriteError::Fenced) => {}
            Err(e) => {
                warn!(request_id = %id, error = %e, "cannot record the failed submission");
                return Finish::Retry;
            }
        }
    }
    Finish::Done
}

impl Actor for IntentManager {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let pending = self
            .ctx
            .intents
            .all()
            .iter()
            .filter(|(i, _)| !i.is_final())
            .count();
        info!(pending, "resuming watch intents");
        ctx.notify(Sweep);
        ctx.run_interval(SWEEP, |_, ctx| ctx.notify(Sweep));
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        for (_, w) in self.watchers.drain() {
            w.do_send(StopWatching);
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
        traceparent: intent.traceparent.clone(),
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
