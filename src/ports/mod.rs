//! Ports: the traits actors use to reach the outside world.

pub mod agent;
pub mod callback;
pub mod cloud;
pub mod kube;
pub mod store;
