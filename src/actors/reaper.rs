//! The lease reaper: on the leader, every `LEASE_REAP_INTERVAL_MS`, releases the shadow
//! deployable holds whose lease expired (a workflow that died after PROCURE would
//! otherwise hold its deployable forever).
//!
//! Candidates come from this replica's view (no etcd scan per pass). Each is released
//! through the deployable's own actor, so a RENEW on this replica is serialized with
//! it, by the same transition as RELEASE, with a CAS on the record's revision *and* the
//! leader key: a RENEW that landed first (on any replica) makes the CAS fail, the actor
//! re-reads the record, finds it not expired and writes nothing; a deposed leader's
//! write is refused by the fence. The min pod count 0 then reaches Kubernetes through
//! the converger, as after a RELEASE.

use std::sync::Arc;
use std::time::Duration;

use tracing::warn;

use crate::actors::ops_types::OpsCtx;
use crate::actors::shadow::ExecError;

/// Runs [`reap_once`] every `every`, forever, on every replica; only the leader acts.
pub async fn reap_forever(ops: Arc<OpsCtx>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        reap_once(&ops).await;
    }
}

/// One pass: when this replica leads, releases every hold its view shows expired.
/// Returns how many it released.
pub async fn reap_once(ops: &OpsCtx) -> usize {
    let Some(fence) = ops.fence.compare() else {
        return 0;
    };
    let mut released = 0;
    for key in ops.shadows.expired_holds(crate::clock::utc_now()) {
        match ops.shadows.reap(&key, fence.clone()).await {
            Ok(true) => {
                released += 1;
                ops.converge_soon(key);
            }
            Ok(false) => {}
            Err(ExecError::Fenced) => {
                // Another replica leads now: it reaps from here on.
                ops.fence.lose();
                warn!(env = %key.env, name = %key.name, "lease reap refused: deposed");
                return released;
            }
            Err(e) => {
                warn!(env = %key.env, name = %key.name, error = %e, "cannot release an expired hold; retrying on the next pass");
            }
        }
    }
    released
}
