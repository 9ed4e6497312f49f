//! The `CallbackSender` port: one delivery attempt of a signed callback to a caller's
//! URL. Retries, the outbox and attempt records live above it (see
//! `domain::callback::RetryPolicy`); an adapter makes exactly one attempt per call and
//! reports how it went, never an error type of its own.

use async_trait::async_trait;

pub use crate::domain::callback::{AttemptOutcome, CallbackTarget};

/// One delivery attempt.
#[derive(Clone, PartialEq, Eq)]
pub struct CallbackRequest {
    /// Where to send it, as the caller asked.
    pub target: CallbackTarget,
    /// `webhook-id`: the same for every attempt of one delivery, so receivers can drop
    /// duplicates.
    pub webhook_id: String,
    /// `webhook-timestamp`, Unix seconds. Set it to the time of each attempt, not of the
    /// first: receivers reject signatures with stale timestamps (Standard Webhooks
    /// suggests a five-minute tolerance).
    pub timestamp: i64,
    /// The JSON body, sent and signed byte for byte.
    pub body: Vec<u8>,
    /// The W3C `traceparent` of the request that asked for the callback: the attempt's
    /// span is its child, in its trace. `None` (traces off, or an intent stored without
    /// one): the attempt starts a trace of its own.
    pub traceparent: Option<String>,
}

// The body and the caller's headers stay out of logs.
impl std::fmt::Debug for CallbackRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallbackRequest")
            .field("target", &self.target)
            .field("webhook_id", &self.webhook_id)
            .field("timestamp", &self.timestamp)
            .field("body_len", &self.body.len())
            .field("traceparent", &self.traceparent)
            .finish()
    }
}

/// Makes one callback delivery attempt.
#[async_trait]
pub trait CallbackSender: Send + Sync + 'static {
    /// Sends `req` once. A target the SSRF policy refuses yields
    /// [`AttemptOutcome::Refused`] and nothing is sent.
    async fn send(&self, req: &CallbackRequest) -> AttemptOutcome;
}
