//! Pure domain: entities, commands, transition functions. No I/O, no actix, no etcd.

pub mod callback;
pub mod cml;
pub mod conditions;
pub mod controller;
pub mod hold_index;
pub mod intent;
pub mod launch;
pub mod schedule_index;
pub mod shadow;
pub mod time;
pub mod worker;
