//! Instance records (`/instances/{id}`): creation and compare-and-swap updates. Placing
//! an instance on a worker goes through the worker actor instead (one transaction for
//! both records).

use crate::actors::leader::Fence;
use crate::domain::worker::{Instance, InstanceState};
use crate::idempotency::{IdemError, IdemWrite, LeasePool, Reply};
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
    /// The idempotency key answered another request (or its record is unreadable).
    #[error(transparent)]
    Idempotency(#[from] IdemError),
}

/// What [`create`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Created {
    /// Written at this revision.
    New(i64),
    /// The id exists already.
    Collision,
    /// The idempotency key was used before: its stored answer.
    Replayed(Reply),
}

/// Creates a new instance record, and with `idem` the idempotency record answering
/// `reply`, in one transaction that requires both to be absent.
pub async fn create(
    store: &dyn Store,
    inst: &Instance,
    idem: Option<(&IdemWrite, &Reply)>,
) -> Result<Created, InstanceError> {
    let key = keys::instance(&inst.id);
    let mut txn = Txn {
        compares: vec![Compare::ModRevision(key.clone(), 0)],
        success: vec![Op::Put {
            key,
            value: serde_json::to_vec(inst).unwrap_or_default(),
            lease: None,
        }],
        failure_gets: Vec::new(),
    };
    if let Some((w, reply)) = idem {
        txn.compares.push(w.absent());
        txn.success.push(w.put(reply, crate::clock::utc_now()));
        txn.failure_gets.push(w.request.store_key.clone());
    }
    let r = store.txn(txn).await?;
    if r.succeeded {
        return Ok(Created::New(r.revision));
    }
    match (idem, r.fetched.into_iter().next().flatten()) {
        (Some((w, _)), Some(stored)) => Ok(Created::Replayed(w.request.replay(&stored.value)?)),
        _ => Ok(Created::Collision),
    }
}

/// Ends a PENDING instance (on no worker) as `to`, with the idempotency record of
/// `idem` (answering the new record, 200) in the same transaction. Refused when it is
/// no longer PENDING (the caller then goes through its worker); a key already used
/// replays its answer.
pub async fn end_pending(
    store: &dyn Store,
    id: &str,
    to: InstanceState,
    retention: &LeasePool,
    idem: Option<&IdemWrite>,
) -> Result<(Reply, Option<(Instance, i64)>), InstanceError> {
    let key = keys::instance(id);
    for _ in 0..16 {
        let (current, rev) = get(store, id).await?.ok_or(InstanceError::NotFound)?;
        if current.state != InstanceState::Pending {
            return Err(InstanceError::Refused("instance changed; retry".into()));
        }
        let mut next = current.clone();
        next.state = to;
        let reply = Reply {
            status: 200,
            body: serde_json::to_string(&next).unwrap_or_default(),
            replayed: false,
        };
        let lease = retention.lease(store).await?;
        let mut txn = Txn {
            compares: vec![Compare::ModRevision(key.clone(), rev)],
            success: vec![Op::Put {
                key: key.clone(),
                value: serde_json::to_vec(&next).unwrap_or_default(),
                lease: Some(lease),
            }],
            failure_gets: vec![key.clone()],
        };
        if let Some(w) = idem {
            txn.compares.push(w.absent());
            txn.success.push(w.put(&reply, crate::clock::utc_now()));
            txn.failure_gets.push(w.request.store_key.clone());
        }
        let r = store.txn(txn).await.inspect_err(|e| {
            if *e == StoreError::LeaseNotFound {
                retention.invalidate();
            }
        })?;
        if r.succeeded {
            return Ok((reply, Some((next, r.revision))));
        }
        if let (Some(w), Some(Some(stored))) = (idem, r.fetched.get(1)) {
            return Ok((w.request.replay(&stored.value)?, None));
        }
    }
    Err(InstanceError::Contention)
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
