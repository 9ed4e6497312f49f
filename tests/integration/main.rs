//! Integration tests: the HTTP contract in-process against the memory store and a real
//! etcd, concurrency across two instances, idempotency, outages, supervision.

mod callbacks;
mod cluster;
mod cml;
mod concurrency;
mod contract;
mod controller;
mod controller_disrupt;
mod controller_idempotency;
mod ec2;
mod events;
mod faults;
mod fencing;
mod group_commit;
mod hostile;
mod idempotency;
mod kube;
mod leader;
mod lease;
mod lists;
mod loadtest;
mod manifests;
mod moto;
mod openapi;
mod operations;
mod operations_list;
mod outage;
mod soak;
mod stop_sequence;
mod supervision;
mod support;
mod timestamps;
mod traces;
mod ui;
