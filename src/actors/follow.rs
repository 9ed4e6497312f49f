//! Keeps an in-memory copy of one key prefix fresh: list it, then follow one watch from
//! the list's revision; after any break (outage, compaction) list again and re-watch,
//! with capped exponential backoff. Shared by every registry and mirror.

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::ports::store::{Kv, Store, StoreError, WatchEvent};

/// Something that mirrors a prefix.
pub trait Follower: Send + Sync + 'static {
    /// The prefix followed.
    fn prefix(&self) -> &'static str;
    /// Replaces the copy with a full listing taken at `revision`.
    fn load(&self, kvs: Vec<Kv>, revision: i64);
    /// Applies one change.
    fn apply(&self, ev: WatchEvent);
    /// Takes a listing page by page as it arrives (see [`Loader`]). Default: gathers
    /// the pages and hands them to [`Self::load`] at the end.
    fn loader(self: Arc<Self>) -> Box<dyn Loader> {
        Box::new(Gather {
            follower: self,
            kvs: Vec::new(),
        })
    }
}

/// One listing being taken in: [`Loader::page`] for each page, off the async threads
/// (on a blocking thread, while the next page is read), then [`Loader::finish`] once,
/// on the follower's task, when the listing is complete. A listing that fails is
/// dropped without `finish`: its pages are parts of one consistent snapshot, so
/// whatever a page applied is true as of that snapshot, but only `finish` may conclude
/// from what is missing.
pub trait Loader: Send {
    /// Takes one page.
    fn page(&mut self, kvs: Vec<Kv>);
    /// The listing, taken at `revision`, is complete.
    fn finish(self: Box<Self>, revision: i64);
}

struct Gather<F: ?Sized> {
    follower: Arc<F>,
    kvs: Vec<Kv>,
}

impl<F: Follower + ?Sized> Loader for Gather<F> {
    fn page(&mut self, kvs: Vec<Kv>) {
        self.kvs.extend(kvs);
    }
    fn finish(self: Box<Self>, revision: i64) {
        self.follower.load(self.kvs, revision);
    }
}

/// Lists `f`'s prefix into its loader: each page goes to a blocking thread as soon as
/// it arrives, so taking it in overlaps reading the next one (at 100,000 records the
/// taking in is as long as the reading). Returns the listing's revision.
async fn list_into(store: &dyn Store, f: Arc<dyn Follower>) -> Result<i64, StoreError> {
    let prefix = f.prefix();
    let mut loader = f.loader();
    let (tx, rx) = std::sync::mpsc::channel::<Vec<Kv>>();
    let taking = tokio::task::spawn_blocking(move || {
        for kvs in rx {
            loader.page(kvs);
        }
        loader
    });
    let listed = store
        .list_each(prefix, &mut |kvs| {
            // The receiver lives until this sender is dropped (below).
            let _ = tx.send(kvs);
        })
        .await;
    drop(tx);
    let loader = taking
        .await
        .map_err(|e| StoreError::Other(format!("loading {prefix} failed: {e}")))?;
    let revision = listed?;
    loader.finish(revision);
    Ok(revision)
}

/// Follows `f`'s prefix forever.
pub async fn follow(store: Arc<dyn Store>, f: Arc<dyn Follower>) {
    let prefix = f.prefix();
    let mut backoff = Duration::from_millis(100);
    loop {
        match list_into(store.as_ref(), f.clone()).await {
            Ok(rev) => match store.watch(prefix, rev + 1).await {
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
            },
            Err(e) => warn!(prefix, error = %e, "cannot list"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
