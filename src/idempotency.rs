//! Idempotency records: what is stored under `/idempotency/{scope}/{key}`, how a retry
//! is matched against it, and the shared TTL leases those records hang on.
//!
//! The record of a state change is written in the same transaction as the change
//! (see `actors::shadow`), so a crash never separates them.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ports::store::{Compare, Op, Store, StoreError};

/// Longest accepted idempotency key.
pub const MAX_KEY_LEN: usize = 200;

/// An idempotency key presented with a request, resolved to its store key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdemRequest {
    /// `/idempotency/{scope}/{key}`.
    pub store_key: String,
    /// Hash of the request (route and canonical body).
    pub hash: String,
}

/// An idempotency record to write with a state change: the request and the lease the
/// record hangs on. The change's transaction also requires the record to be absent, so
/// the first writer wins and a concurrent retry finds its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdemWrite {
    /// The request.
    pub request: IdemRequest,
    /// TTL lease of the record.
    pub lease: i64,
}

impl IdemWrite {
    /// Guard: the record does not exist yet.
    pub fn absent(&self) -> Compare {
        Compare::ModRevision(self.request.store_key.clone(), 0)
    }

    /// The write of the record answering `reply`.
    pub fn put(&self, reply: &Reply, now: DateTime<Utc>) -> Op {
        Op::Put {
            key: self.request.store_key.clone(),
            value: self.request.record(reply, now),
            lease: Some(self.lease),
        }
    }
}

/// A stored answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdemRecord {
    /// HTTP status that was answered.
    pub status: u16,
    /// Exact body that was answered.
    pub body: String,
    /// Hash of the request that produced it.
    pub request_hash: String,
    /// When it was stored.
    #[serde(with = "crate::domain::time")]
    pub created_at: DateTime<Utc>,
}

/// A response, fresh or replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// JSON body.
    pub body: String,
    /// True when this is a stored answer replayed for a retry.
    pub replayed: bool,
}

/// Why a stored record cannot answer this request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdemError {
    /// Same key, different request.
    #[error("idempotency key was already used with a different request")]
    Mismatch,
    /// The stored record is unreadable.
    #[error("idempotency record is corrupt: {0}")]
    Corrupt(String),
}

impl IdemRequest {
    /// Answers from a stored record: the stored reply, or a mismatch.
    pub fn replay(&self, stored: &[u8]) -> Result<Reply, IdemError> {
        let rec: IdemRecord =
            serde_json::from_slice(stored).map_err(|e| IdemError::Corrupt(e.to_string()))?;
        if rec.request_hash != self.hash {
            return Err(IdemError::Mismatch);
        }
        Ok(Reply {
            status: rec.status,
            body: rec.body,
            replayed: true,
        })
    }

    /// The record to store with a state change answered by `reply`.
    pub fn record(&self, reply: &Reply, now: DateTime<Utc>) -> Vec<u8> {
        let rec = IdemRecord {
            status: reply.status,
            body: reply.body.clone(),
            request_hash: self.hash.clone(),
            created_at: now,
        };
        serde_json::to_vec(&rec).unwrap_or_default()
    }
}

/// Checks a client-supplied key: 1..=200 characters of `[A-Za-z0-9._:-]`.
pub fn validate_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(format!(
            "idempotency key must be 1 to {MAX_KEY_LEN} characters"
        ));
    }
    if !key
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
    {
        return Err(
            "idempotency key may contain only letters, digits, '-', '_', '.' and ':'".into(),
        );
    }
    Ok(())
}

/// Hash of a request: the logical route plus the canonical JSON body, so the typo
/// alias and key order do not matter.
pub fn request_hash(route: &str, canonical_body: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(route.as_bytes());
    h.update([0u8]);
    h.update(canonical_body);
    hex::encode(h.finalize())
}

/// Shares one lease among all records written in a window, so writing an idempotency
/// record costs no extra round trip. Records live between `ttl` and `ttl + window`.
pub struct LeasePool {
    ttl: Duration,
    window: Duration,
    current: Mutex<Option<(i64, Instant)>>,
    /// Held while a grant is in flight: concurrent callers wait for it and share the
    /// lease it returns (single flight) instead of each granting one.
    granting: tokio::sync::Mutex<()>,
}

impl LeasePool {
    /// A pool for records kept at least `ttl`.
    pub fn new(ttl: Duration) -> Self {
        let window = (ttl / 100).clamp(Duration::from_secs(1), Duration::from_secs(300));
        Self {
            ttl,
            window,
            current: Mutex::new(None),
            granting: tokio::sync::Mutex::new(()),
        }
    }

    fn fresh(&self) -> Option<i64> {
        let cur = self.current.lock().ok()?;
        cur.filter(|(_, at)| at.elapsed() < self.window)
            .map(|(id, _)| id)
    }

    /// The lease to attach a record to now (grants a new one when the window passed;
    /// concurrent callers share one grant).
    pub async fn lease(&self, store: &dyn Store) -> Result<i64, StoreError> {
        if let Some(id) = self.fresh() {
            return Ok(id);
        }
        let _one = self.granting.lock().await;
        if let Some(id) = self.fresh() {
            return Ok(id);
        }
        let ttl = i64::try_from((self.ttl + self.window).as_secs()).unwrap_or(i64::MAX);
        let id = store.grant_lease(ttl).await?;
        if let Ok(mut cur) = self.current.lock() {
            *cur = Some((id, Instant::now()));
        }
        Ok(id)
    }

    /// Forgets the current lease (it was not found by the store).
    pub fn invalidate(&self) {
        if let Ok(mut cur) = self.current.lock() {
            *cur = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_validated() {
        assert!(validate_key("abc-123_x.y:z").is_ok());
        assert!(validate_key("").is_err());
        assert!(validate_key("a/b").is_err());
        assert!(validate_key(&"k".repeat(MAX_KEY_LEN + 1)).is_err());
    }

    #[test]
    fn replay_matches_hash() {
        let req = IdemRequest {
            store_key: "/idempotency/int/k".into(),
            hash: request_hash("r", b"{}"),
        };
        let reply = Reply {
            status: 200,
            body: "{\"status\":\"PROCURED\"}".into(),
            replayed: false,
        };
        let stored = req.record(&reply, Utc::now());
        let again = req.replay(&stored).expect("replay");
        assert_eq!(
            (again.status, again.body.as_str()),
            (200, reply.body.as_str())
        );
        assert!(again.replayed);
        let other = IdemRequest {
            hash: request_hash("r", b"{\"a\":1}"),
            ..req
        };
        assert_eq!(other.replay(&stored), Err(IdemError::Mismatch));
    }
}
