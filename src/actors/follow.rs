//! Keeps an in-memory copy of one key prefix fresh: list it, then follow one watch from
//! the list's revision; after any break (outage, compaction) list again and re-watch,
//! with capped exponential backoff. Shared by every registry and mirror.

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::ports::store::{Kv, Store, WatchEvent};

/// Something that mirrors a prefix.
pub trait Follower: Send + Sync + 'static {
    /// The prefix followed.
    fn prefix(&self) -> &'static str;
    /// Replaces the copy with a full listing taken at `revision`.
    fn load(&self, kvs: Vec<Kv>, revision: i64);
    /// Applies one change.
    fn apply(&self, ev: WatchEvent);
}

/// Follows `f`'s prefix forever.
pub async fn follow(store: Arc<dyn Store>, f: Arc<dyn Follower>) {
    let prefix = f.prefix();
    let mut backoff = Duration::from_millis(100);
    loop {
        match store.list(prefix).await {
            Ok((kvs, rev)) => {
                f.load(kvs, rev);
                match store.watch(prefix, rev + 1).await {
                    Ok(mut rx) => {
                        info!(prefix, revision = rev, "following");
                        backoff = Duration::from_millis(100);
                        while let Some(item) = rx.recv().await {
                            match item {
                                Ok(events) => events.into_iter().for_each(|e| f.apply(e)),
                                Err(e) => {
                                    warn!(prefix, error = %e, "watch broke; listing again");
                                    break;
                                }
                            }
                        }
                    }
                    Err(e) => warn!(prefix, error = %e, "cannot start watch"),
                }
            }
            Err(e) => warn!(prefix, error = %e, "cannot list"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
