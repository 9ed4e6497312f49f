//! Incremental indexes for the scheduler, fed one record at a time (by the watch and by
//! this replica's own writes) instead of a scan of every instance and worker per pass:
//!
//! - [`PendingQueue`]: the PENDING instances in scheduling order (oldest first, then id),
//!   the order the scheduler places them in.
//! - [`WorkerIndex`]: the workers the autoscaler drives with the cloud, and
//!   [`CapacityIndex`]: the RUNNING workers' free capacity, grouped by capacity (one
//!   group per template size) and ordered by normalized free capacity, so that
//!   [`CapacityIndex::best_fit`] answers exactly what [`best_fit`] answers over all
//!   workers, by looking only at the workers whose free capacity is near the request.
//!
//! Both are pure and order-independent: `sync(id, current)` makes the index agree with
//! the record's current value whatever it held before, so applying the last value of
//! every record in any order gives the same index as a full rebuild.
//!
//! [`best_fit`]: crate::domain::controller::best_fit

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};

use super::controller::{leftover_key, quantize, waste};
use super::worker::{Instance, InstanceState, Resources, Worker, WorkerState, RESOURCE_EPSILON};

/// PENDING instances, oldest first (ties by id). The scheduler parks the ones that fit
/// no worker until room appears: they stay pending (in [`Self::ids`]) but leave the
/// ready walk ([`Self::ready_ids`]), so a pass costs what may be placed, not the backlog.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PendingQueue {
    order: BTreeSet<(DateTime<Utc>, String)>,
    /// `order` without the parked ones.
    ready: BTreeSet<(DateTime<Utc>, String)>,
    by_id: HashMap<String, DateTime<Utc>>,
    parked: HashSet<String>,
}

impl PendingQueue {
    /// The queue of the PENDING ones among `instances`.
    pub fn rebuild<'a>(instances: impl IntoIterator<Item = &'a Instance>) -> Self {
        let mut q = Self::default();
        for i in instances {
            q.sync(&i.id, Some(i));
        }
        q
    }

    /// Makes the queue agree with instance `id`'s current record (`None`: deleted).
    pub fn sync(&mut self, id: &str, current: Option<&Instance>) {
        let pending = current.filter(|i| i.state == InstanceState::Pending);
        match (self.by_id.get(id), pending) {
            (Some(at), Some(i)) if *at == i.created_at => {}
            (old, pending) => {
                let mut parked = false;
                if let Some(at) = old {
                    let entry = (*at, id.to_owned());
                    self.order.remove(&entry);
                    self.ready.remove(&entry);
                    self.by_id.remove(id);
                    parked = self.parked.remove(id);
                }
                match pending {
                    // Still pending (only its creation time was rewritten): still parked.
                    Some(i) if parked => {
                        self.parked.insert(id.to_owned());
                        self.order.insert((i.created_at, id.to_owned()));
                        self.by_id.insert(id.to_owned(), i.created_at);
                    }
                    Some(i) => {
                        self.order.insert((i.created_at, id.to_owned()));
                        self.ready.insert((i.created_at, id.to_owned()));
                        self.by_id.insert(id.to_owned(), i.created_at);
                    }
                    None => {}
                }
            }
        }
    }

    /// Takes pending instance `id` out of the ready walk until [`Self::unpark`] (or it
    /// leaves PENDING). Unknown ids are ignored.
    pub fn park(&mut self, id: &str) {
        if let Some(at) = self.by_id.get(id) {
            if self.ready.remove(&(*at, id.to_owned())) {
                self.parked.insert(id.to_owned());
            }
        }
    }

    /// Puts a parked instance back in the ready walk.
    pub fn unpark(&mut self, id: &str) {
        if self.parked.remove(id) {
            if let Some(at) = self.by_id.get(id) {
                self.ready.insert((*at, id.to_owned()));
            }
        }
    }

    /// Puts every parked instance back in the ready walk (a new scheduler knows none).
    pub fn unpark_all(&mut self) {
        for id in std::mem::take(&mut self.parked) {
            if let Some(at) = self.by_id.get(&id) {
                self.ready.insert((*at, id));
            }
        }
    }

    /// Ids of the pending instances that are not parked, in scheduling order.
    pub fn ready_ids(&self) -> Vec<String> {
        self.ready.iter().map(|(_, id)| id.clone()).collect()
    }

    /// Ids in scheduling order, parked or not.
    pub fn ids(&self) -> Vec<String> {
        self.order.iter().map(|(_, id)| id.clone()).collect()
    }

    /// How many are pending.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether none is pending.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// Exact identity of a capacity (workers of one template share it).
type CapacityKey = (u64, u64);

fn capacity_key(c: &Resources) -> CapacityKey {
    (c.cpu.to_bits(), c.memory_gb.to_bits())
}

/// Workers of one capacity, by quantized normalized free capacity, then id.
#[derive(Debug, Clone, Default, PartialEq)]
struct Group {
    capacity: Resources,
    by_free: BTreeSet<(i64, String)>,
}

#[derive(Debug, Clone, PartialEq)]
struct Entry {
    group: CapacityKey,
    waste: i64,
    free: Resources,
}

/// Free capacity of the workers that take instances (RUNNING), indexed for best fit.
#[derive(Debug, Clone, Default)]
pub struct CapacityIndex {
    groups: BTreeMap<CapacityKey, Group>,
    entries: HashMap<String, Entry>,
    /// Bumped whenever room appears (a worker starts taking instances, or its free
    /// capacity grows in some dimension): an instance that did not fit before may now.
    room: u64,
}

/// Two indexes are equal when they index the same workers the same way (the room
/// counter is history, not content).
impl PartialEq for CapacityIndex {
    fn eq(&self, other: &Self) -> bool {
        self.groups == other.groups && self.entries == other.entries
    }
}

/// Extra quantized units scanned past the best candidate so far: the leftover of a
/// worker is its normalized free capacity minus the request's, up to float rounding
/// (a few units of 1e-9), so nothing beyond this can beat it.
const SCAN_SLACK: i64 = 4;

impl CapacityIndex {
    /// The index of `workers`.
    pub fn rebuild<'a>(workers: impl IntoIterator<Item = &'a Worker>) -> Self {
        let mut ix = Self::default();
        for w in workers {
            ix.sync(&w.id, Some(w));
        }
        ix
    }

    /// Makes the index agree with worker `id`'s current record (`None`: deleted).
    pub fn sync(&mut self, id: &str, current: Option<&Worker>) {
        let next = current.filter(|w| w.accepts_instances()).map(|w| {
            let free = w.free();
            Entry {
                group: capacity_key(&w.capacity),
                waste: quantize(waste(&free, &w.capacity)),
                free,
            }
        });
        if self.entries.get(id) == next.as_ref() {
            return;
        }
        let grew = match (self.entries.get(id), &next) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(old), Some(new)) => {
                old.group != new.group
                    || new.free.cpu > old.free.cpu
                    || new.free.memory_gb > old.free.memory_gb
            }
        };
        if grew {
            self.room = self.room.wrapping_add(1);
        }
        if let Some(old) = self.entries.remove(id) {
            if let Some(g) = self.groups.get_mut(&old.group) {
                g.by_free.remove(&(old.waste, id.to_owned()));
                if g.by_free.is_empty() {
                    self.groups.remove(&old.group);
                }
            }
        }
        if let (Some(e), Some(w)) = (next, current) {
            self.groups
                .entry(e.group)
                .or_insert_with(|| Group {
                    capacity: w.capacity,
                    by_free: BTreeSet::new(),
                })
                .by_free
                .insert((e.waste, id.to_owned()));
            self.entries.insert(id.to_owned(), e);
        }
    }

    /// How many workers take instances.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Changes whenever room appears somewhere; while it stays the same, an instance
    /// that fit nowhere still fits nowhere.
    pub fn room(&self) -> u64 {
        self.room
    }

    /// Whether no worker takes instances.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The worker [`crate::domain::controller::best_fit`] would choose for `req` among
    /// the indexed workers: the least normalized leftover, ties to the smaller id.
    pub fn best_fit(&self, req: &Resources) -> Option<&str> {
        let mut best: Option<(i64, &str)> = None;
        // The least free capacity that can still fit `req` (fits_in allows EPSILON).
        let least = Resources {
            cpu: (req.cpu - RESOURCE_EPSILON).max(0.0),
            memory_gb: (req.memory_gb - RESOURCE_EPSILON).max(0.0),
        };
        for g in self.groups.values() {
            let cap = &g.capacity;
            // Normalized free capacity is monotone in free capacity: nothing below
            // `least`'s can fit.
            let from = quantize(waste(&least, cap)).saturating_sub(1);
            let need = quantize(waste(req, cap));
            for (w, id) in g.by_free.range((from, String::new())..) {
                if let Some((b, _)) = best {
                    // A leftover is at least free minus the request (up to rounding).
                    if w.saturating_sub(need).saturating_sub(SCAN_SLACK) > b {
                        break;
                    }
                }
                let Some(e) = self.entries.get(id) else {
                    continue;
                };
                if !req.fits_in(&e.free) {
                    continue;
                }
                let key = (leftover_key(&e.free, cap, req), id.as_str());
                if best.is_none_or(|b| key < b) {
                    best = Some(key);
                }
            }
        }
        best.map(|(_, id)| id)
    }
}

/// Whether the autoscaler drives a worker in `state` with the cloud (launch, boot,
/// drain, stop, terminate); RUNNING and TERMINATED workers need nothing from it.
pub fn in_motion(state: WorkerState) -> bool {
    !matches!(state, WorkerState::Running | WorkerState::Terminated)
}

/// The controller's indexes of the workers: free capacity for the scheduler, and the
/// workers in motion for the autoscaler's cloud poll.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkerIndex {
    /// Free capacity of the RUNNING workers.
    pub capacity: CapacityIndex,
    moving: BTreeSet<String>,
}

impl WorkerIndex {
    /// The index of `workers`.
    pub fn rebuild<'a>(workers: impl IntoIterator<Item = &'a Worker>) -> Self {
        let mut ix = Self::default();
        for w in workers {
            ix.sync(&w.id, Some(w));
        }
        ix
    }

    /// Makes the index agree with worker `id`'s current record (`None`: deleted).
    pub fn sync(&mut self, id: &str, current: Option<&Worker>) {
        self.capacity.sync(id, current);
        if current.is_some_and(|w| in_motion(w.state)) {
            if !self.moving.contains(id) {
                self.moving.insert(id.to_owned());
            }
        } else {
            self.moving.remove(id);
        }
    }

    /// Ids of the workers in motion ([`in_motion`]), sorted.
    pub fn moving(&self) -> Vec<String> {
        self.moving.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::controller::best_fit;
    use chrono::TimeZone;
    use proptest::prelude::*;

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + secs, 0)
            .single()
            .unwrap_or_else(|| panic!("bad time"))
    }

    fn worker(id: usize, size: usize, state: usize, used: (u8, u8)) -> Worker {
        let caps = [(8.0, 32.0), (16.0, 64.0), (4.0, 0.0)];
        let (cpu, mem) = caps[size % caps.len()];
        let states = [
            WorkerState::Running,
            WorkerState::Running,
            WorkerState::Draining,
            WorkerState::Provisioning,
        ];
        Worker {
            id: format!("w{id:02}"),
            template: format!("t{size}"),
            cloud_instance_id: None,
            state: states[state % states.len()],
            capacity: Resources {
                cpu,
                memory_gb: mem,
            },
            allocated: Resources {
                cpu: cpu * f64::from(used.0) / 8.0,
                memory_gb: mem * f64::from(used.1) / 8.0,
            },
            instances: Vec::new(),
            created_at: at(0),
            state_changed_at: at(0),
            last_heartbeat_at: None,
            drain_deadline: None,
            idle_since: None,
        }
    }

    fn instance(id: usize, state: usize, created: i64) -> Instance {
        let states = [
            InstanceState::Pending,
            InstanceState::Scheduled,
            InstanceState::Running,
            InstanceState::Completed,
            InstanceState::Failed,
        ];
        Instance {
            id: format!("i{id:02}"),
            requirements: Resources {
                cpu: 1.0,
                memory_gb: 1.0,
            },
            state: states[state % states.len()],
            worker_id: None,
            do_not_disrupt: false,
            created_at: at(created),
        }
    }

    #[test]
    fn the_pending_queue_orders_by_creation_then_id_and_forgets_what_moved_on() {
        let mut q = PendingQueue::default();
        q.sync("i02", Some(&instance(2, 0, 5)));
        q.sync("i01", Some(&instance(1, 0, 5)));
        q.sync("i03", Some(&instance(3, 0, 1)));
        assert_eq!(q.ids(), vec!["i03", "i01", "i02"]);
        q.sync("i01", Some(&instance(1, 1, 5)));
        q.sync("i03", None);
        assert_eq!(q.ids(), vec!["i02"]);
    }

    #[test]
    fn parked_instances_stay_pending_but_leave_the_ready_walk_until_unparked() {
        let mut q = PendingQueue::default();
        for (id, created) in [(1, 3), (2, 1), (3, 2)] {
            q.sync(&format!("i{id:02}"), Some(&instance(id, 0, created)));
        }
        q.park("i03");
        q.park("i99");
        assert_eq!(q.ready_ids(), vec!["i02", "i01"]);
        assert_eq!(
            q.ids(),
            vec!["i02", "i03", "i01"],
            "parked ones are still pending"
        );
        assert_eq!(q.len(), 3);
        // a parked instance that is written again while pending stays parked
        q.sync("i03", Some(&instance(3, 0, 2)));
        assert_eq!(q.ready_ids(), vec!["i02", "i01"]);
        q.unpark("i03");
        assert_eq!(q.ready_ids(), vec!["i02", "i03", "i01"]);
        // one that leaves PENDING is forgotten, parked or not, and comes back ready
        q.park("i01");
        q.sync("i01", Some(&instance(1, 1, 3)));
        q.sync("i01", Some(&instance(1, 0, 4)));
        assert_eq!(q.ready_ids(), vec!["i02", "i03", "i01"]);
        q.park("i02");
        q.park("i03");
        q.unpark_all();
        assert_eq!(q.ready_ids(), q.ids());
    }

    #[test]
    fn the_capacity_index_picks_the_tightest_running_worker() {
        let mut ix = CapacityIndex::default();
        ix.sync("w01", Some(&worker(1, 0, 0, (0, 0))));
        ix.sync("w02", Some(&worker(2, 0, 0, (6, 6))));
        ix.sync("w03", Some(&worker(3, 0, 2, (7, 7))));
        let req = Resources {
            cpu: 1.0,
            memory_gb: 2.0,
        };
        assert_eq!(ix.best_fit(&req), Some("w02"));
        ix.sync("w02", None);
        assert_eq!(ix.best_fit(&req), Some("w01"));
        let huge = Resources {
            cpu: 100.0,
            memory_gb: 1.0,
        };
        assert_eq!(ix.best_fit(&huge), None);
    }

    #[test]
    fn room_changes_only_when_capacity_appears() {
        let mut ix = CapacityIndex::default();
        let r0 = ix.room();
        ix.sync("w01", Some(&worker(1, 0, 0, (4, 4))));
        let r1 = ix.room();
        assert_ne!(r0, r1, "a new RUNNING worker is room");
        ix.sync("w01", Some(&worker(1, 0, 0, (5, 5))));
        assert_eq!(ix.room(), r1, "a placement takes room, it adds none");
        ix.sync("w01", Some(&worker(1, 0, 2, (5, 5))));
        ix.sync("w01", None);
        assert_eq!(ix.room(), r1, "draining and deletion add no room");
        ix.sync("w01", Some(&worker(1, 0, 0, (2, 2))));
        assert_ne!(ix.room(), r1);
    }

    /// A worker record's shape: template size, state, used eighths of cpu and memory.
    type Shape = (usize, usize, (u8, u8));

    /// One watch event: a record written (`Some`) or deleted (`None`).
    fn worker_event() -> impl Strategy<Value = (usize, Option<Shape>)> {
        (
            0usize..12,
            prop::option::weighted(0.85, (0usize..3, 0usize..4, ((0u8..=8), (0u8..=8)))),
        )
    }

    fn instance_event() -> impl Strategy<Value = (usize, Option<(usize, i64)>)> {
        (
            0usize..16,
            prop::option::weighted(0.85, (0usize..5, 0i64..6)),
        )
    }

    proptest! {
        #[test]
        fn the_capacity_index_answers_as_a_full_scan_after_any_watch_events(
            events in prop::collection::vec(worker_event(), 1..60),
            reqs in prop::collection::vec((0u8..=16, 0u8..=16), 1..6),
        ) {
            let mut ix = WorkerIndex::default();
            let mut view: BTreeMap<String, Worker> = BTreeMap::new();
            for (id, ev) in events {
                let name = format!("w{id:02}");
                match ev {
                    Some((size, state, used)) => {
                        let w = worker(id, size, state, used);
                        ix.sync(&name, Some(&w));
                        view.insert(name, w);
                    }
                    None => {
                        ix.sync(&name, None);
                        view.remove(&name);
                    }
                }
                let all: Vec<Worker> = view.values().cloned().collect();
                prop_assert_eq!(&ix, &WorkerIndex::rebuild(&all));
                let moving: Vec<String> = all
                    .iter()
                    .filter(|w| in_motion(w.state))
                    .map(|w| w.id.clone())
                    .collect();
                prop_assert_eq!(ix.moving(), moving);
                for (c, m) in &reqs {
                    let req = Resources { cpu: f64::from(*c) / 2.0, memory_gb: f64::from(*m) * 2.0 };
                    prop_assert_eq!(
                        ix.capacity.best_fit(&req),
                        best_fit(&all, &req).map(|w| w.id.as_str()),
                        "request {:?}", req
                    );
                }
            }
        }

        #[test]
        fn the_pending_queue_equals_a_full_recomputation_after_any_watch_events(
            events in prop::collection::vec(instance_event(), 1..80),
        ) {
            let mut q = PendingQueue::default();
            let mut view: BTreeMap<String, Instance> = BTreeMap::new();
            for (id, ev) in events {
                let name = format!("i{id:02}");
                match ev {
                    Some((state, created)) => {
                        let i = instance(id, state, created);
                        q.sync(&name, Some(&i));
                        view.insert(name, i);
                    }
                    None => {
                        q.sync(&name, None);
                        view.remove(&name);
                    }
                }
                let mut scan: Vec<&Instance> = view
                    .values()
                    .filter(|i| i.state == InstanceState::Pending)
                    .collect();
                scan.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
                let scan: Vec<String> = scan.into_iter().map(|i| i.id.clone()).collect();
                prop_assert_eq!(q.ids(), scan);
                prop_assert_eq!(&q, &PendingQueue::rebuild(view.values()));
            }
        }
    }
}
