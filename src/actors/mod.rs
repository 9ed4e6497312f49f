//! Actors: one supervised actor per entity, and the registry that finds or spawns them.

pub mod registry;
pub mod shadow;
pub mod stats;
