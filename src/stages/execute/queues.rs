//! Per-key ordered queues: work for one key (a tenant) runs one item at a time and in arrival
//! order, while different keys run concurrently.
//!
//! The executor needs both: a tenant's tasks reach the service in the order of the tenant's
//! events, yet a slow tenant must not hold back the others that share its partition. Offsets are
//! not this module's concern: items finish out of partition order, and the
//! [`OffsetTracker`](crate::kafka::offsets::OffsetTracker) commits only below the lowest unfinished one.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
};

#[derive(Debug)]
struct Lane<T> {
    /// The key, shared with `ready` and handed out with each item: allocated once per lane, not
    /// once per item.
    key: Arc<str>,
    queue: VecDeque<T>,
    running: usize,
    /// Whether the key is in `ready` (at most once).
    in_ready: bool,
}

#[derive(Debug)]
pub(crate) struct Lanes<T> {
    queues: HashMap<Arc<str>, Lane<T>>,
    /// Keys with queued work and a free running place, in the order they became ready.
    ready: VecDeque<Arc<str>>,
    len: usize,
    /// Items of one key running at once; 1 keeps a key's items in order.
    per_key: usize,
}

impl<T> Default for Lanes<T> {
    fn default() -> Self {
        Self::with_per_key(1)
    }
}

impl<T> Lanes<T> {
    /// Lanes running up to `per_key` items of a key at once (at least 1). Above 1, a key's items
    /// start in order but may finish in any order.
    pub(crate) fn with_per_key(per_key: usize) -> Self {
        Lanes { queues: HashMap::new(), ready: VecDeque::new(), len: 0, per_key: per_key.max(1) }
    }

    /// Queues `item` behind earlier items of `key`.
    #[cfg(test)]
    pub fn push(&mut self, key: &str, item: T) {
        let lane = lane(&mut self.queues, key);
        enqueue(lane, item, &mut self.ready, self.per_key);
        self.len += 1;
    }

    /// Queues `item` behind earlier items of its key, which `key` reads from the item (the key
    /// then need not be copied out of it first).
    pub(crate) fn push_keyed(&mut self, item: T, key: impl FnOnce(&T) -> &str) {
        let lane = lane(&mut self.queues, key(&item));
        enqueue(lane, item, &mut self.ready, self.per_key);
        self.len += 1;
    }

    /// The next item whose key has a free running place; it runs until [`finish`](Self::finish).
    pub(crate) fn start_next(&mut self) -> Option<(Arc<str>, T)> {
        let key = self.ready.pop_front()?;
        let lane = self.queues.get_mut(&key).expect("a ready key has a lane");
        let item = lane.queue.pop_front().expect("a ready key has queued work");
        lane.running += 1;
        lane.in_ready = !lane.queue.is_empty() && lane.running < self.per_key;
        if lane.in_ready {
            self.ready.push_back(key.clone());
        }
        Some((key, item))
    }

    /// A running item of `key` finished: the key's next item, if any, may start.
    pub fn finish(&mut self, key: &str) {
        let Some(lane) = self.queues.get_mut(key) else { return };
        self.len -= 1;
        lane.running = lane.running.saturating_sub(1);
        if lane.queue.is_empty() && lane.running == 0 {
            self.queues.remove(key);
        } else if !lane.in_ready && !lane.queue.is_empty() && lane.running < self.per_key {
            lane.in_ready = true;
            self.ready.push_back(lane.key.clone());
        }
    }

    /// Removes the queued items of `key` beyond its first `keep` (running ones count), the latest
    /// ones, and returns them in order: they are to be done elsewhere, after the ones kept.
    pub(crate) fn split_off(&mut self, key: &str, keep: usize) -> Vec<T> {
        let Some(lane) = self.queues.get_mut(key) else { return Vec::new() };
        let at = keep.saturating_sub(lane.running).min(lane.queue.len());
        let moved: Vec<T> = lane.queue.drain(at..).collect();
        self.len -= moved.len();
        if lane.queue.is_empty() {
            if lane.in_ready {
                lane.in_ready = false;
                self.ready.retain(|k| &**k != key);
            }
            if lane.running == 0 {
                self.queues.remove(key);
            }
        }
        moved
    }

    /// Items of `key` queued or running.
    pub(crate) fn queued(&self, key: &str) -> usize {
        self.queues.get(key).map_or(0, |l| l.queue.len() + l.running)
    }

    /// Every key with items queued or running, with their number.
    pub(crate) fn backlogs(&self) -> impl Iterator<Item = (&str, usize)> {
        self.queues.iter().map(|(k, l)| (&**k, l.queue.len() + l.running))
    }

    /// Whether no item is queued or running.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The lane of `key`, created if there is none.
fn lane<'m, T>(queues: &'m mut HashMap<Arc<str>, Lane<T>>, key: &str) -> &'m mut Lane<T> {
    if !queues.contains_key(key) {
        let key: Arc<str> = Arc::from(key);
        queues.insert(key.clone(), Lane { key, queue: VecDeque::new(), running: 0, in_ready: false });
    }
    queues.get_mut(key).expect("inserted above")
}

fn enqueue<T>(lane: &mut Lane<T>, item: T, ready: &mut VecDeque<Arc<str>>, per_key: usize) {
    lane.queue.push_back(item);
    if !lane.in_ready && lane.running < per_key {
        lane.in_ready = true;
        ready.push_back(lane.key.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(key: &str) -> Arc<str> {
        Arc::from(key)
    }

    #[test]
    fn one_running_per_key_in_order_and_keys_interleave() {
        let mut lanes = Lanes::default();
        for (k, i) in [("a", 1), ("a", 2), ("b", 1)] {
            lanes.push(k, i);
        }
        lanes.push_keyed(3, |_| "a");
        assert_eq!(lanes.start_next(), Some((k("a"), 1)));
        assert_eq!(lanes.start_next(), Some((k("b"), 1)));
        assert_eq!(lanes.start_next(), None, "a is busy, b has nothing more");
        lanes.finish("a");
        assert_eq!(lanes.start_next(), Some((k("a"), 2)));
        lanes.finish("b");
        lanes.finish("a");
        assert_eq!(lanes.start_next(), Some((k("a"), 3)));
        lanes.finish("a");
        assert!(lanes.is_empty());
        assert!(lanes.queues.is_empty() && lanes.ready.is_empty());
    }

    #[test]
    fn the_latest_items_of_a_key_are_split_off_in_order() {
        let mut lanes = Lanes::default();
        for i in 1..=5 {
            lanes.push("a", i);
        }
        lanes.push("b", 1);
        assert_eq!(lanes.start_next(), Some((k("a"), 1)));
        assert_eq!(lanes.split_off("a", 3), [4, 5], "one running and two queued are kept");
        assert_eq!(lanes.queued("a"), 3);
        assert_eq!(lanes.split_off("a", 0), [2, 3], "a running item is never split off");
        assert_eq!(lanes.start_next(), Some((k("b"), 1)), "a is no longer ready: nothing queued");
        assert_eq!(lanes.start_next(), None);
        lanes.finish("a");
        lanes.finish("b");
        assert!(lanes.is_empty() && lanes.queues.is_empty() && lanes.ready.is_empty());
        assert!(lanes.split_off("none", 0).is_empty());
    }

    #[test]
    fn several_per_key_start_in_order() {
        let mut lanes = Lanes::with_per_key(2);
        for i in 1..=3 {
            lanes.push("a", i);
        }
        lanes.push("b", 1);
        assert_eq!(lanes.queued("a"), 3);
        assert_eq!(lanes.start_next(), Some((k("a"), 1)));
        assert_eq!(lanes.start_next(), Some((k("b"), 1)));
        assert_eq!(lanes.start_next(), Some((k("a"), 2)));
        assert_eq!(lanes.start_next(), None, "a has two running");
        lanes.finish("a");
        assert_eq!(lanes.start_next(), Some((k("a"), 3)));
        for k in ["a", "a", "b"] {
            lanes.finish(k);
        }
        assert!(lanes.is_empty() && lanes.queues.is_empty() && lanes.ready.is_empty());
    }
}
