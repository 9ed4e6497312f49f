//! Ports: the traits actors use to reach the outside world.

pub mod store;
