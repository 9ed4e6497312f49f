//! resource-plane: an actor-based infrastructure control plane.
//!
//! The crate exposes every layer so integration tests can drive the whole service
//! in-process: `domain` (pure state machines), `ports` (traits), `adapters` (etcd,
//! memory), `actors` (one actor per entity, the registry), `api` (HTTP contract) and
//! `app` (wiring).

pub mod actors;
pub mod adapters;
pub mod api;
pub mod app;
pub mod clock;
pub mod config;
pub mod domain;
pub mod idempotency;
pub mod keys;
pub mod loadtest;
pub mod otel;
pub mod ports;
pub mod telemetry;

/// Crate-wide error for start-up and wiring; request paths use typed errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration (environment or config files) is invalid.
    #[error("invalid configuration: {0}")]
    Config(#[from] config::ConfigError),
    /// The store could not be reached or answered with an error.
    #[error("store error")]
    Store(#[source] ports::store::StoreError),
    /// An I/O error while starting the service.
    #[error("i/o error: {context}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Crate-wide result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
