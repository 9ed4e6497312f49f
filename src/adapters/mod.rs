//! Adapters: implementations of the ports (etcd and in-memory stores).

pub mod cml;
pub mod ec2;
pub mod etcd;
pub mod group_commit;
pub mod http_callback;
pub mod instrumented;
pub mod kube;
pub mod memory;
pub mod sim_agent;
pub mod sim_cloud;
pub mod sim_kube;
