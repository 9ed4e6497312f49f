//! Actors: one supervised actor per entity, and the registry that finds or spawns them.

pub mod autoscaler;
pub mod cml_sync;
pub mod controller;
pub mod controller_ctx;
pub mod events;
pub mod follow;
pub mod instances;
pub mod leader;
pub mod mirror;
pub mod operations;
pub mod ops_types;
pub mod outbox;
pub mod reaper;
pub mod reconciler;
pub mod registry;
pub mod scheduler;
pub mod shadow;
pub mod stats;
pub mod view;
pub mod watcher;
pub mod worker;
