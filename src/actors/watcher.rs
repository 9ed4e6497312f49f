//! One watcher actor per pending watch intent (leader only). It subscribes to the shared
//! per-kind Kubernetes watch (one watch per kind and namespace for the whole process),
//! reads the current state once, and judges the intent's condition on every relevant
//! event against the baseline captured when the change was made; when the condition
//! holds, fails, or the deadline passes, it records the final status (the callback's
//! outbox entry) and ends.
//!
//! A read runs concurrently with the event stream: events that arrive while it is in
//! flight are kept and applied again on top of the read's snapshot, so a read that
//! returns late never undoes them. A failed read is retried with backoff until the
//! deadline.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::broadcast::error::RecvError;
use tracing::{debug, info, warn};

use crate::actors::ops_types::{IntentWriteError, OpsCtx, StopWatching, WatcherDone};
use crate::domain::conditions::{evaluate_all, ObjectEvent, Observation};
use crate::domain::intent::{conclude, WatchIntent};
use crate::ports::kube::KubeError;

/// First wait before reading again after a failed read; doubles up to [`REREAD_MAX`].
const REREAD_FIRST: Duration = Duration::from_millis(200);
const REREAD_MAX: Duration = Duration::from_secs(5);

/// A Kubernetes event for this watcher.
#[derive(Message)]
#[rtype(result = "()")]
struct Event(ObjectEvent);

/// Re-read the current state (after a lagging subscription, at start, or to retry).
#[derive(Message)]
#[rtype(result = "()")]
struct Reobserve;

/// Judge the condition now (the deadline may have passed).
#[derive(Message)]
#[rtype(result = "()")]
struct Judge;

/// The watcher actor.
pub struct Watcher {
    ctx: Arc<OpsCtx>,
    intent: WatchIntent,
    rev: i64,
    obs: Observation,
    manager: Recipient<WatcherDone>,
    concluding: bool,
    /// Number of the latest read started; an older read's answer is dropped.
    read_seq: u64,
    /// Events applied since the latest read started (replayed on its snapshot).
    since_read: Option<Vec<ObjectEvent>>,
    /// Consecutive failed reads.
    read_failures: u32,
}

impl Watcher {
    /// A watcher for `intent` (read at `rev`), reporting its end to `manager`.
    pub fn new(
        ctx: Arc<OpsCtx>,
        intent: WatchIntent,
        rev: i64,
        manager: Recipient<WatcherDone>,
    ) -> Self {
        Self {
            ctx,
            intent,
            rev,
            obs: Observation::default(),
            manager,
            concluding: false,
            read_seq: 0,
            since_read: None,
            read_failures: 0,
        }
    }

    fn relevant(&self, ev: &ObjectEvent) -> bool {
        self.intent
            .baselines
            .iter()
            .any(|b| b.is_relevant(ev.object()))
    }
}

impl Actor for Watcher {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Subscribe first, then read: nothing can fall between the two.
        let mut kinds = Vec::new();
        for b in &self.intent.baselines {
            for k in b.watched_kinds() {
                if !kinds.contains(&(*k, b.namespace.clone())) {
                    kinds.push((*k, b.namespace.clone()));
                }
            }
        }
        for (kind, ns) in kinds {
            let mut rx = self.ctx.kube.subscribe(kind, &ns);
            let me = ctx.address();
            let baselines = self.intent.baselines.clone();
            ctx.spawn(
                async move {
                    loop {
                        match rx.recv().await {
                            // Filter here: the shared stream carries every object of
                            // the kind, most of them other watchers' business.
                            Ok(ev) if baselines.iter().any(|b| b.is_relevant(ev.object())) => {
                                if !me.connected() {
                                    return;
                                }
                                me.do_send(Event(ev));
                            }
                            Ok(_) => {}
                            Err(RecvError::Lagged(_)) => me.do_send(Reobserve),
                            Err(RecvError::Closed) => return,
                        }
                    }
                }
                .into_actor(self),
            );
        }
        ctx.notify(Reobserve);
        let left = (self.intent.deadline - self.ctx.clock.now())
            .to_std()
            .unwrap_or(Duration::ZERO);
        ctx.run_later(left, |_, ctx| ctx.notify(Judge));
        debug!(request_id = %self.intent.request_id, "watching");
    }
}

impl Handler<StopWatching> for Watcher {
    type Result = ();
    fn handle(&mut self, _msg: StopWatching, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

impl Handler<Reobserve> for Watcher {
    type Result = ();

    fn handle(&mut self, _msg: Reobserve, ctx: &mut Self::Context) {
        if self.concluding {
            return;
        }
        self.read_seq += 1;
        let seq = self.read_seq;
        self.since_read = Some(Vec::new());
        let octx = self.ctx.clone();
        let baselines = self.intent.baselines.clone();
        ctx.spawn(
            async move {
                let mut all = Observation::default();
                for b in &baselines {
                    let o = octx.kube.observe(b).await?;
                    for obj in o.objects {
                        all.apply(&ObjectEvent::Applied(obj));
                    }
                }
                Ok::<Observation, KubeError>(all)
            }
            .into_actor(self)
            .map(move |read, act, ctx| {
                if seq != act.read_seq {
                    return; // a newer read is under way; its answer counts
                }
                let since = act.since_read.take().unwrap_or_default();
                match read {
                    Ok(mut snapshot) => {
                        // Events that arrived while reading are at least as new as the
                        // snapshot for their objects: apply them again on top of it.
                        for ev in &since {
                            snapshot.apply(ev);
                        }
                        act.obs = snapshot;
                        act.read_failures = 0;
                    }
                    Err(e) => {
                        act.read_failures = act.read_failures.saturating_add(1);
                        let wait = REREAD_FIRST
                            .saturating_mul(2u32.saturating_pow(act.read_failures.min(16) - 1))
                            .min(REREAD_MAX);
                        warn!(request_id = %act.intent.request_id, error = %e, retry_in = ?wait, "cannot read the watched resource; retrying");
                        ctx.run_later(wait, |_, ctx| ctx.notify(Reobserve));
                    }
                }
                ctx.notify(Judge);
            }),
        );
    }
}

impl Handler<Event> for Watcher {
    type Result = ();

    fn handle(&mut self, msg: Event, ctx: &mut Self::Context) {
        if self.relevant(&msg.0) {
            self.obs.apply(&msg.0);
            if let Some(since) = self.since_read.as_mut() {
                since.push(msg.0);
            }
            ctx.notify(Judge);
        }
    }
}

impl Handler<Judge> for Watcher {
    type Result = ();

    fn handle(&mut self, _msg: Judge, ctx: &mut Self::Context) {
        if self.concluding {
            return;
        }
        let verdict = evaluate_all(
            &self.intent.baselines,
            self.intent.desired_condition,
            &self.obs.objects,
        );
        let now = self.ctx.clock.now();
        let Some(next) = conclude(&self.intent, &verdict, now) else {
            return;
        };
        self.concluding = true;
        let (octx, rev) = (self.ctx.clone(), self.rev);
        ctx.spawn(
            async move {
                let r = octx.write_intent(&next, rev, true).await;
                (next, r)
            }
            .into_actor(self)
            .map(|(next, r), act, ctx| match r {
                Ok(_) => {
                    info!(request_id = %next.request_id, status = ?next.status, "watch intent concluded");
                    act.ctx
                        .metrics
                        .decisions
                        .with_label_values(&["intent_concluded"])
                        .inc();
                    act.manager.do_send(WatcherDone(next.request_id.clone()));
                    ctx.stop();
                }
                Err(IntentWriteError::Fenced) => ctx.stop(),
                Err(e) => {
                    // Changed elsewhere or store trouble: let the manager look again.
                    warn!(request_id = %next.request_id, error = %e, "cannot record the verdict");
                    act.manager.do_send(WatcherDone(next.request_id.clone()));
                    ctx.stop();
                }
            }),
        );
    }
}
