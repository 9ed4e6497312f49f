//! Pure domain: entities, commands, transition functions. No I/O, no actix, no etcd.

pub mod shadow;
pub mod worker;
