//! Adapters: implementations of the ports (etcd and in-memory stores).

pub mod etcd;
pub mod instrumented;
pub mod memory;
