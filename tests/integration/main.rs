//! Integration tests: the HTTP contract in-process against the memory store and a real
//! etcd, concurrency across two instances, idempotency, outages, supervision.

mod concurrency;
mod contract;
mod idempotency;
mod outage;
mod support;
