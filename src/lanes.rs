//! Per-key ordered queues: work for one key (a tenant) runs one item at a time and in arrival
//! order, while different keys run concurrently.
//!
//! The executor needs both: a tenant's tasks reach the service in the order of the tenant's
//! events, yet a slow tenant must not hold back the others that share its partition. Offsets are
//! not this module's concern: items finish out of partition order, and the
//! [`OffsetTracker`](crate::offsets::OffsetTracker) commits only below the lowest unfinished one.

use std::collections::{HashMap, VecDeque};

#[derive(Debug)]
pub struct Lanes<T> {
    queues: HashMap<String, VecDeque<T>>,
    /// Keys with queued work and nothing running, in the order they became ready.
    ready: VecDeque<String>,
    len: usize,
}

impl<T> Default for Lanes<T> {
    fn default() -> Self {
        Lanes { queues: HashMap::new(), ready: VecDeque::new(), len: 0 }
    }
}

impl<T> Lanes<T> {
    /// Queues `item` behind earlier items of `key`.
    pub fn push(&mut self, key: &str, item: T) {
        self.len += 1;
        match self.queues.get_mut(key) {
            // An existing queue means the key is running or already ready.
            Some(q) => q.push_back(item),
            None => {
                self.queues.insert(key.to_string(), VecDeque::from([item]));
                self.ready.push_back(key.to_string());
            }
        }
    }

    /// The next item whose key has nothing running; the key is busy until [`finish`](Self::finish).
    pub fn start_next(&mut self) -> Option<(String, T)> {
        let key = self.ready.pop_front()?;
        let item = self.queues.get_mut(&key).and_then(|q| q.pop_front()).expect("a ready key has queued work");
        Some((key, item))
    }

    /// The running item of `key` finished: its next item, if any, becomes ready.
    pub fn finish(&mut self, key: &str) {
        self.len -= 1;
        match self.queues.get(key) {
            Some(q) if q.is_empty() => {
                self.queues.remove(key);
            }
            Some(_) => self.ready.push_back(key.to_string()),
            None => {}
        }
    }

    /// Items queued or running.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_running_per_key_in_order_and_keys_interleave() {
        let mut lanes = Lanes::default();
        for (k, i) in [("a", 1), ("a", 2), ("b", 1), ("a", 3)] {
            lanes.push(k, i);
        }
        assert_eq!(lanes.start_next(), Some(("a".into(), 1)));
        assert_eq!(lanes.start_next(), Some(("b".into(), 1)));
        assert_eq!(lanes.start_next(), None, "a is busy, b has nothing more");
        lanes.finish("a");
        assert_eq!(lanes.start_next(), Some(("a".into(), 2)));
        lanes.finish("b");
        lanes.finish("a");
        assert_eq!(lanes.start_next(), Some(("a".into(), 3)));
        lanes.finish("a");
        assert!(lanes.is_empty());
        assert!(lanes.queues.is_empty() && lanes.ready.is_empty());
    }
}
