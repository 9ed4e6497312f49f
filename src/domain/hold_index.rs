//! The leased holds by lease expiry, fed one record at a time, so the lease reaper finds
//! the expired ones without walking every shadow deployable each pass.
//!
//! `sync(key, current)` makes the index agree with the record's current value whatever
//! it held before (order-independent, like [`crate::domain::schedule_index`]).

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;

use chrono::{DateTime, Utc};

use super::shadow::{ShadowDeployable, ShadowState};

/// PROCURED records with a lease, by `lease_expires_at`, then key.
#[derive(Debug, Clone, PartialEq)]
pub struct HoldExpiries<K: Ord + Hash + Clone> {
    order: BTreeSet<(DateTime<Utc>, K)>,
    by_key: HashMap<K, DateTime<Utc>>,
}

impl<K: Ord + Hash + Clone> Default for HoldExpiries<K> {
    fn default() -> Self {
        Self {
            order: BTreeSet::new(),
            by_key: HashMap::new(),
        }
    }
}

/// The lease expiry the reaper watches for, if the record is a leased hold.
fn expiry(r: &ShadowDeployable) -> Option<DateTime<Utc>> {
    (r.state == ShadowState::Procured)
        .then_some(r.lease_expires_at)
        .flatten()
}

impl<K: Ord + Hash + Clone> HoldExpiries<K> {
    /// Makes the index agree with `key`'s current record (`None`: deleted).
    pub fn sync(&mut self, key: &K, current: Option<&ShadowDeployable>) {
        let next = current.and_then(expiry);
        if self.by_key.get(key) == next.as_ref() {
            return;
        }
        if let Some(at) = self.by_key.remove(key) {
            self.order.remove(&(at, key.clone()));
        }
        if let Some(at) = next {
            self.order.insert((at, key.clone()));
            self.by_key.insert(key.clone(), at);
        }
    }

    /// Keys whose lease expired before `now` (what
    /// [`ShadowDeployable::lease_expired`] says of each), sorted by key.
    pub fn expired(&self, now: DateTime<Utc>) -> Vec<K> {
        let mut out: Vec<K> = self
            .order
            .iter()
            .take_while(|(at, _)| *at < now)
            .map(|(_, k)| k.clone())
            .collect();
        out.sort();
        out
    }

    /// How many leased holds there are.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + secs, 0)
            .single()
            .unwrap_or_else(|| panic!("bad time"))
    }

    fn record(name: &str, procured: bool, lease: Option<i64>) -> ShadowDeployable {
        let mut r = ShadowDeployable::new(name, "pool", "dns", at(0));
        if procured {
            r.state = ShadowState::Procured;
        }
        r.lease_expires_at = lease.map(at);
        r
    }

    proptest! {
        #[test]
        fn the_expiry_index_answers_as_a_full_scan_after_any_watch_events(
            events in prop::collection::vec(
                (0usize..10, prop::option::weighted(0.85, (any::<bool>(), prop::option::of(0i64..8)))),
                1..60,
            ),
            nows in prop::collection::vec(0i64..10, 1..4),
        ) {
            let mut ix: HoldExpiries<String> = HoldExpiries::default();
            let mut view: BTreeMap<String, ShadowDeployable> = BTreeMap::new();
            for (k, ev) in events {
                let name = format!("d{k}");
                match ev {
                    Some((procured, lease)) => {
                        let r = record(&name, procured, lease);
                        ix.sync(&name, Some(&r));
                        view.insert(name, r);
                    }
                    None => {
                        ix.sync(&name, None);
                        view.remove(&name);
                    }
                }
                for now in &nows {
                    let scan: Vec<String> = view
                        .iter()
                        .filter(|(_, r)| r.lease_expired(at(*now)))
                        .map(|(k, _)| k.clone())
                        .collect();
                    prop_assert_eq!(ix.expired(at(*now)), scan);
                }
            }
        }
    }
}
