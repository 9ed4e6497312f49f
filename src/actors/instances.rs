//! Instance records (`/instances/{id}`): creation and compare-and-swap updates. Placing
//! an instance on a worker goes through the worker actor instead (one transaction for
//! both records).

use crate::actors::leader::Fence;
use crate::domain::worker::Instance;
use crate::idempotency::LeasePool;
use crate::keys;
use crate::ports::store::{Compare, Op, Store, StoreError, Txn};

/// Why an instance update failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InstanceError {
    /// No such instance.
    #[error("instance not found")]
    NotFound,
    /// The update function refused.
    #[error("{0}")]
    Refused(String),
    /// Fenced write and this replica is not the leader.
    #[error("not the leader")]
    Fenced,
    /// Lost the CAS too often.
    #[error("too much contention on this instance")]
    Contention,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The record is unreadable.
    #[error("stored instance is corrupt: {0}")]
    Corrupt(String),
}

/// Creates a new instance record; `false` when the id exists.
pub async fn create(store: &dyn Store, inst: &Instance) -> Result<Option<i64>, StoreError> {
    let key = keys::instance(&inst.id);
    let r = store
        .txn(Txn {
            compares: vec![Compare::ModRevision(key.clone(), 0)],
            success: vec![Op::Put {
                key,
                value: serde_json::to_vec(inst).unwrap_or_default(),
                lease: None,
            }],
            failure_gets: Vec::new(),
        })
        .await?;
    Ok(r.succeeded.then_some(r.revision))
}

/// Reads one instance with its revision.
pub async fn get(store: &dyn Store, id: &str) -> Result<Option<(Instance, i64)>, InstanceError> {
    match store.get(&keys::instance(id)).await? {
        None => Ok(None),
        Some(kv) => serde_json::from_slice(&kv.value)
            .map(|i| Some((i, kv.mod_revision)))
            .map_err(|e| InstanceError::Corrupt(e.to_string())),
    }
}

/// Read-modify-write with CAS: `f` returns the new record, `None` for no change, or a
/// refusal. Retries on conflicts. With `fence`, the write is leader-only. An instance
/// that ends (COMPLETED/FAILED) is put on the `retention` lease.
pub async fn update<F>(
    store: &dyn Store,
    id: &str,
    fence: Option<&Fence>,
    retention: &LeasePool,
    f: F,
) -> Result<(Instance, i64), InstanceError>
where
    F: Fn(&Instance) -> Result<Option<Instance>, String>,
{
    let key = keys::instance(id);
    for _ in 0..16 {
        let (current, rev) = get(store, id).await?.ok_or(InstanceError::NotFound)?;
        let next = match f(&current).map_err(InstanceError::Refused)? {
            None => return Ok((current, rev)),
            Some(n) => n,
        };
        let mut compares = vec![Compare::ModRevision(key.clone(), rev)];
        if let Some(fence) = fence {
            compares.push(fence.compare().ok_or(InstanceError::Fenced)?);
        }
        let lease = if next.is_live() {
            None
        } else {
            Some(retention.lease(store).await?)
        };
        let r = store
            .txn(Txn {
                compares,
                success: vec![Op::Put {
                    key: key.clone(),
                    value: serde_json::to_vec(&next).unwrap_or_default(),
                    lease,
                }],
                failure_gets: vec![key.clone()],
            })
            .await
            .inspect_err(|e| {
                if *e == StoreError::LeaseNotFound {
                    retention.invalidate();
                }
            })?;
        if r.succeeded {
            return Ok((next, r.revision));
        }
        let moved = r
            .fetched
            .first()
            .and_then(|kv| kv.as_ref())
            .map(|kv| kv.mod_revision)
            != Some(rev);
        if !moved {
            if let Some(fence) = fence {
                fence.lose();
            }
            return Err(InstanceError::Fenced);
        }
    }
    Err(InstanceError::Contention)
}
