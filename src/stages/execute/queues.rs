//! Per-tenant lanes of ordered work: a tenant's items with the same order key run one at a time
//! and in arrival order; its items of different keys run side by side, up to `per_tenant` at
//! once; different tenants run concurrently.
//!
//! The executor needs all three: calls about one subject (a member's created → updated →
//! deleted) must reach the service in event order, yet one busy tenant's calls about different
//! members need not wait for each other, and a slow tenant must not hold back the others that
//! share its partition. An order key is a 64-bit hash of the task's `order_key` (a workflow's
//! `order_by`): two keys that collide are only ordered with each other, never reordered.
//! Offsets are not this module's concern: items finish out of partition order, and the
//! [`OffsetTracker`](crate::kafka::offsets::OffsetTracker) commits only below the lowest unfinished one.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    sync::Arc,
};

/// One tenant's work.
#[derive(Debug)]
struct Lane<T> {
    /// The tenant, shared with `ready` and handed out with each item: allocated once per lane,
    /// not once per item.
    key: Arc<str>,
    /// Queued items per order key, each queue in arrival order, with their arrival number.
    orders: HashMap<u64, VecDeque<(u64, T)>>,
    /// Order keys with queued items and none running, by the arrival number of their first
    /// queued item: the lane starts the oldest item whose key is free.
    free: BTreeMap<u64, u64>,
    /// Order keys with an item running.
    busy: HashSet<u64>,
    queued: usize,
    running: usize,
    /// Whether the tenant is in `ready` (at most once).
    in_ready: bool,
}

impl<T> Lane<T> {
    fn new(key: Arc<str>) -> Self {
        Lane {
            key,
            orders: HashMap::new(),
            free: BTreeMap::new(),
            busy: HashSet::new(),
            queued: 0,
            running: 0,
            in_ready: false,
        }
    }

    /// Whether the lane may start an item now.
    fn can_start(&self, per_tenant: usize) -> bool {
        !self.free.is_empty() && self.running < per_tenant
    }
}

#[derive(Debug)]
pub(crate) struct Lanes<T> {
    queues: HashMap<Arc<str>, Lane<T>>,
    /// Tenants with an item that may start, in the order they became ready.
    ready: VecDeque<Arc<str>>,
    len: usize,
    /// Items of one tenant running at once (of different order keys).
    per_tenant: usize,
    /// Arrival numbers.
    arrivals: u64,
}

impl<T> Default for Lanes<T> {
    fn default() -> Self {
        Self::with_per_tenant(1)
    }
}

impl<T> Lanes<T> {
    /// Lanes running up to `per_tenant` items of a tenant at once (at least 1), of different
    /// order keys.
    pub(crate) fn with_per_tenant(per_tenant: usize) -> Self {
        Lanes { queues: HashMap::new(), ready: VecDeque::new(), len: 0, per_tenant: per_tenant.max(1), arrivals: 0 }
    }

    /// Queues `item` of `tenant` behind earlier items of its order key `order`.
    #[cfg(test)]
    pub fn push(&mut self, tenant: &str, order: u64, item: T) {
        let lane = lane(&mut self.queues, tenant);
        enqueue(lane, item, order, &mut self.arrivals, &mut self.ready, self.per_tenant);
        self.len += 1;
    }

    /// Queues `item` behind earlier items of its order key `order`; `tenant` reads its tenant
    /// from the item (which then need not be copied out of it first).
    pub(crate) fn push_keyed(&mut self, item: T, order: u64, tenant: impl FnOnce(&T) -> &str) {
        let lane = lane(&mut self.queues, tenant(&item));
        enqueue(lane, item, order, &mut self.arrivals, &mut self.ready, self.per_tenant);
        self.len += 1;
    }

    /// The next item that may start (its tenant has a free running place, its order key none
    /// running), with its tenant and order key; it runs until [`finish`](Self::finish).
    pub(crate) fn start_next(&mut self) -> Option<(Arc<str>, u64, T)> {
        let tenant = self.ready.pop_front()?;
        let lane = self.queues.get_mut(&tenant).expect("a ready tenant has a lane");
        let (_, order) = lane.free.pop_first().expect("a ready tenant has a free order key");
        let queue = lane.orders.get_mut(&order).expect("a free order key has queued work");
        let (_, item) = queue.pop_front().expect("a free order key has queued work");
        if queue.is_empty() {
            lane.orders.remove(&order);
        }
        lane.busy.insert(order);
        lane.queued -= 1;
        lane.running += 1;
        lane.in_ready = lane.can_start(self.per_tenant);
        if lane.in_ready {
            self.ready.push_back(tenant.clone());
        }
        Some((tenant, order, item))
    }

    /// A running item of `tenant` with order key `order` finished: the key's next item, and
    /// the tenant's, may start.
    pub fn finish(&mut self, tenant: &str, order: u64) {
        let Some(lane) = self.queues.get_mut(tenant) else { return };
        self.len -= 1;
        lane.running = lane.running.saturating_sub(1);
        lane.busy.remove(&order);
        if let Some((arrival, _)) = lane.orders.get(&order).and_then(|q| q.front()) {
            lane.free.insert(*arrival, order);
        }
        if lane.queued == 0 && lane.running == 0 {
            self.queues.remove(tenant);
        } else if !lane.in_ready && lane.can_start(self.per_tenant) {
            lane.in_ready = true;
            self.ready.push_back(lane.key.clone());
        }
    }

    /// Removes the queued items of `tenant` beyond its first `keep` (running ones count), the
    /// latest ones by arrival, and returns them in arrival order: they are to be done elsewhere,
    /// after the ones kept. Each order key keeps its earliest items, so its order holds.
    pub(crate) fn split_off(&mut self, tenant: &str, keep: usize) -> Vec<T> {
        let Some(lane) = self.queues.get_mut(tenant) else { return Vec::new() };
        let at = keep.saturating_sub(lane.running);
        if at >= lane.queued {
            return Vec::new();
        }
        let mut arrivals: Vec<u64> = lane.orders.values().flat_map(|q| q.iter().map(|(a, _)| *a)).collect();
        arrivals.sort_unstable();
        let cut = arrivals[at];
        let mut moved: Vec<(u64, T)> = Vec::with_capacity(arrivals.len() - at);
        lane.orders.retain(|_, queue| {
            let from = queue.partition_point(|(a, _)| *a < cut);
            if from == 0 {
                if let Some((head, _)) = queue.front() {
                    lane.free.remove(head);
                }
            }
            moved.extend(queue.drain(from..));
            !queue.is_empty()
        });
        moved.sort_unstable_by_key(|(a, _)| *a);
        lane.queued -= moved.len();
        self.len -= moved.len();
        if lane.in_ready && !lane.can_start(self.per_tenant) {
            lane.in_ready = false;
            self.ready.retain(|k| &**k != tenant);
        }
        if lane.queued == 0 && lane.running == 0 {
            self.queues.remove(tenant);
        }
        moved.into_iter().map(|(_, item)| item).collect()
    }

    /// Items of `tenant` queued or running.
    pub(crate) fn queued(&self, tenant: &str) -> usize {
        self.queues.get(tenant).map_or(0, |l| l.queued + l.running)
    }

    /// Every tenant with items queued or running, with their number.
    pub(crate) fn backlogs(&self) -> impl Iterator<Item = (&str, usize)> {
        self.queues.iter().map(|(k, l)| (&**k, l.queued + l.running))
    }

    /// Whether no item is queued or running.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The hash of an order key (`None`: the tenant's own order).
pub(crate) fn order_hash(key: Option<&str>) -> u64 {
    use std::hash::{Hash, Hasher};
    let Some(key) = key else { return 0 };
    // SipHash with fixed keys: the same key gives the same hash in every lane of the process.
    let mut hasher = std::hash::DefaultHasher::new();
    key.hash(&mut hasher);
    hasher.finish() | 1
}

/// Queues `item` in `lane` behind its order key's earlier items, numbered from `arrivals`; the
/// lane joins `ready` if it may now start something.
fn enqueue<T>(
    lane: &mut Lane<T>,
    item: T,
    order: u64,
    arrivals: &mut u64,
    ready: &mut VecDeque<Arc<str>>,
    per_tenant: usize,
) {
    let arrival = *arrivals;
    *arrivals += 1;
    let queue = lane.orders.entry(order).or_default();
    queue.push_back((arrival, item));
    if queue.len() == 1 && !lane.busy.contains(&order) {
        lane.free.insert(arrival, order);
    }
    lane.queued += 1;
    if !lane.in_ready && lane.can_start(per_tenant) {
        lane.in_ready = true;
        ready.push_back(lane.key.clone());
    }
}

/// The lane of `tenant`, created if there is none.
fn lane<'m, T>(queues: &'m mut HashMap<Arc<str>, Lane<T>>, tenant: &str) -> &'m mut Lane<T> {
    if !queues.contains_key(tenant) {
        let key: Arc<str> = Arc::from(tenant);
        queues.insert(key.clone(), Lane::new(key));
    }
    queues.get_mut(tenant).expect("inserted above")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(key: &str) -> Arc<str> {
        Arc::from(key)
    }

    /// Starts what may start, as (tenant, item).
    fn start_all<T>(lanes: &mut Lanes<T>) -> Vec<(Arc<str>, T)> {
        std::iter::from_fn(|| lanes.start_next().map(|(t, _, i)| (t, i))).collect()
    }

    #[test]
    fn one_running_per_tenant_in_order_and_tenants_interleave() {
        let mut lanes = Lanes::default();
        for (t, i) in [("a", 1), ("a", 2), ("b", 1)] {
            lanes.push(t, 0, i);
        }
        lanes.push_keyed(3, 0, |_| "a");
        assert_eq!(lanes.start_next(), Some((k("a"), 0, 1)));
        assert_eq!(lanes.start_next(), Some((k("b"), 0, 1)));
        assert_eq!(lanes.start_next(), None, "a is busy, b has nothing more");
        lanes.finish("a", 0);
        assert_eq!(lanes.start_next(), Some((k("a"), 0, 2)));
        lanes.finish("b", 0);
        lanes.finish("a", 0);
        assert_eq!(lanes.start_next(), Some((k("a"), 0, 3)));
        lanes.finish("a", 0);
        assert!(lanes.is_empty());
        assert!(lanes.queues.is_empty() && lanes.ready.is_empty());
    }

    #[test]
    fn a_tenants_order_keys_run_side_by_side_each_in_order() {
        let mut lanes = Lanes::with_per_tenant(2);
        // Order keys 1 and 2 interleaved, then key 3.
        for (order, i) in [(1, 10), (2, 20), (1, 11), (2, 21), (3, 30)] {
            lanes.push("a", order, i);
        }
        assert_eq!(start_all(&mut lanes), [(k("a"), 10), (k("a"), 20)], "two keys at once, up to per_tenant");
        assert_eq!(lanes.queued("a"), 5);
        lanes.finish("a", 1);
        // Key 1's next (11) arrived before key 3's first (30): the oldest free item goes first.
        assert_eq!(start_all(&mut lanes), [(k("a"), 11)]);
        lanes.finish("a", 2);
        assert_eq!(start_all(&mut lanes), [(k("a"), 21)], "21 is older than 30");
        lanes.finish("a", 1);
        assert_eq!(start_all(&mut lanes), [(k("a"), 30)]);
        lanes.finish("a", 2);
        lanes.finish("a", 3);
        assert!(lanes.is_empty() && lanes.queues.is_empty() && lanes.ready.is_empty());
    }

    #[test]
    fn a_busy_order_key_waits_while_the_tenants_other_keys_go_on() {
        let mut lanes = Lanes::with_per_tenant(8);
        for i in 0..3 {
            lanes.push("a", 7, i);
        }
        lanes.push("a", 8, 100);
        assert_eq!(start_all(&mut lanes), [(k("a"), 0), (k("a"), 100)], "key 7 one at a time, key 8 beside it");
        lanes.finish("a", 8);
        assert!(start_all(&mut lanes).is_empty(), "only key 7 has work, and it is running");
        lanes.finish("a", 7);
        assert_eq!(start_all(&mut lanes), [(k("a"), 1)]);
    }

    #[test]
    fn the_latest_items_of_a_tenant_are_split_off_in_order() {
        let mut lanes = Lanes::default();
        for i in 1..=5 {
            lanes.push("a", 0, i);
        }
        lanes.push("b", 0, 1);
        assert_eq!(lanes.start_next(), Some((k("a"), 0, 1)));
        assert_eq!(lanes.split_off("a", 3), [4, 5], "one running and two queued are kept");
        assert_eq!(lanes.queued("a"), 3);
        assert_eq!(lanes.split_off("a", 0), [2, 3], "a running item is never split off");
        assert_eq!(lanes.start_next(), Some((k("b"), 0, 1)), "a is no longer ready: nothing queued");
        assert_eq!(lanes.start_next(), None);
        lanes.finish("a", 0);
        lanes.finish("b", 0);
        assert!(lanes.is_empty() && lanes.queues.is_empty() && lanes.ready.is_empty());
        assert!(lanes.split_off("none", 0).is_empty());
    }

    #[test]
    fn a_split_takes_the_latest_arrivals_across_order_keys_and_keeps_each_keys_head() {
        let mut lanes = Lanes::with_per_tenant(4);
        for (order, i) in [(1, 1), (2, 2), (1, 3), (3, 4), (2, 5), (1, 6)] {
            lanes.push("a", order, i);
        }
        assert_eq!(lanes.split_off("a", 3), [4, 5, 6], "arrival order, whatever the key");
        assert_eq!(lanes.queued("a"), 3);
        let started: Vec<i32> = start_all(&mut lanes).into_iter().map(|(_, i)| i).collect();
        assert_eq!(started, [1, 2], "key 3 lost its only item; key 1 keeps 3 behind 1");
        lanes.finish("a", 1);
        assert_eq!(start_all(&mut lanes), [(k("a"), 3)]);
        for order in [1, 2] {
            lanes.finish("a", order);
        }
        assert!(lanes.is_empty() && lanes.queues.is_empty() && lanes.ready.is_empty());
    }

    #[test]
    fn order_hashes_are_stable_and_none_is_the_tenant() {
        assert_eq!(order_hash(None), 0);
        assert_eq!(order_hash(Some("subject:m-1")), order_hash(Some("subject:m-1")));
        assert_ne!(order_hash(Some("subject:m-1")), order_hash(Some("subject:m-2")));
        assert_ne!(order_hash(Some("")), 0, "an empty key is a key, not the tenant");
    }

    proptest::proptest! {
        /// Whatever the arrivals, splits and finishing order: no two items of one key run at
        /// once, a key's items start in arrival order, no more than `per_tenant` of a tenant
        /// run, and every item is started or split off exactly once.
        #[test]
        fn keys_stay_in_order_under_any_schedule(
            ops in proptest::collection::vec((0u8..4, 0u64..4, 0usize..3), 1..200),
            per_tenant in 1usize..4,
        ) {
            let mut lanes: Lanes<(u64, usize)> = Lanes::with_per_tenant(per_tenant);
            let tenants = ["a", "b", "c"];
            let mut next = 0usize;
            let mut running: Vec<(Arc<str>, u64)> = Vec::new();
            let mut last_started: HashMap<(String, u64), usize> = HashMap::new();
            let (mut pushed, mut done) = (0usize, 0usize);
            for (op, order, t) in ops {
                match op {
                    0 | 1 => {
                        lanes.push(tenants[t], order, (order, next));
                        next += 1;
                        pushed += 1;
                    }
                    2 => {
                        if !running.is_empty() {
                            let (tenant, order) = running.remove(t % running.len());
                            lanes.finish(&tenant, order);
                            done += 1;
                        }
                    }
                    _ => done += lanes.split_off(tenants[t], 1).len(),
                }
                while let Some((tenant, order, (o, seq))) = lanes.start_next() {
                    proptest::prop_assert_eq!(order, o);
                    proptest::prop_assert!(!running.iter().any(|(t, r)| *t == tenant && *r == order), "a key runs twice");
                    let prev = last_started.insert((tenant.to_string(), order), seq);
                    proptest::prop_assert!(prev.is_none_or(|p| p < seq), "a key's items start in order");
                    running.push((tenant.clone(), order));
                    proptest::prop_assert!(running.iter().filter(|(t, _)| *t == tenant).count() <= per_tenant);
                }
            }
            for (tenant, order) in running.drain(..) {
                lanes.finish(&tenant, order);
                done += 1;
            }
            while let Some((tenant, order, _)) = lanes.start_next() {
                lanes.finish(&tenant, order);
                done += 1;
            }
            proptest::prop_assert_eq!(done, pushed);
            proptest::prop_assert!(lanes.is_empty() && lanes.queues.is_empty() && lanes.ready.is_empty());
        }
    }
}
