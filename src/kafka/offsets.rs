//! Which offset of a partition may be committed, when work completes out of order.
//!
//! Stages hand a batch of messages to concurrent work (produce acknowledgements arrive per
//! destination partition, HTTP calls of different tenants finish in any order). Kafka only stores
//! one number per partition: "everything below this is done". The tracker keeps the offsets that
//! were handed out but are not done yet; the committable offset is the lowest of them, or one past
//! the highest offset seen when none is pending. Completing offset 7 while 5 is still pending
//! therefore commits nothing new, and a crash replays 5, 6 and 7 (at-least-once; the sink and the
//! idempotency keys make the replay harmless).

use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Pending offsets of one partition.
#[derive(Debug, Default)]
struct PartitionState {
    pending: BTreeSet<i64>,
    /// One past the highest offset begun.
    high: i64,
    /// The last watermark returned, so callers only store offsets that moved.
    stored: i64,
    /// Which assignment of the partition this state belongs to; see [`OffsetTracker::forget`].
    generation: u64,
}

impl PartitionState {
    fn watermark(&self) -> i64 {
        self.pending.first().copied().unwrap_or(self.high)
    }
}

/// Pending offsets of the partitions one consumer owns.
#[derive(Debug, Default)]
pub(crate) struct OffsetTracker {
    partitions: HashMap<i32, PartitionState>,
    generations: u64,
}

impl OffsetTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `offset` of `partition` was handed to a stage; returns the generation to pass
    /// back to [`complete`](Self::complete).
    pub(crate) fn begin(&mut self, partition: i32, offset: i64) -> u64 {
        let generations = &mut self.generations;
        let state = self.partitions.entry(partition).or_insert_with(|| {
            *generations += 1;
            PartitionState { pending: BTreeSet::new(), high: offset, stored: offset, generation: *generations }
        });
        state.pending.insert(offset);
        state.high = state.high.max(offset + 1);
        state.generation
    }

    /// Marks `offset` done. Returns the new committable offset (the next offset a restarted
    /// consumer should read) when it moved; `None` when it did not, or when the partition was
    /// revoked (and perhaps assigned again) since the offset was handed out.
    pub fn complete(&mut self, partition: i32, offset: i64, generation: u64) -> Option<i64> {
        let state = self.partitions.get_mut(&partition).filter(|s| s.generation == generation)?;
        if !state.pending.remove(&offset) {
            return None;
        }
        let watermark = state.watermark();
        (watermark > state.stored).then(|| {
            state.stored = watermark;
            watermark
        })
    }

    /// Forgets a partition (revoked in a rebalance): work that completes for it later must not
    /// store offsets, because another consumer now owns it and will replay from the last commit.
    /// If the partition comes back, it starts a new generation, so late completions from the old
    /// assignment cannot clear offsets handed out by the new one.
    pub fn forget(&mut self, partition: i32) {
        self.partitions.remove(&partition);
    }

    /// Whether offsets handed out under `generation` still belong to the current assignment.
    pub(crate) fn is_current(&self, partition: i32, generation: u64) -> bool {
        self.partitions.get(&partition).is_some_and(|s| s.generation == generation)
    }

    /// Offsets handed out and not yet done, per partition that has any.
    pub(crate) fn pending_by_partition(&self) -> BTreeMap<i32, usize> {
        self.partitions.iter().filter(|(_, s)| !s.pending.is_empty()).map(|(p, s)| (*p, s.pending.len())).collect()
    }

    /// Number of offsets handed out and not yet done, over all partitions.
    pub(crate) fn pending(&self) -> usize {
        self.partitions.values().map(|s| s.pending.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn out_of_order_completion_waits_for_the_lowest() {
        let mut t = OffsetTracker::new();
        let g = (10..13).map(|o| t.begin(0, o)).last().unwrap();
        assert_eq!(t.complete(0, 11, g), None);
        assert_eq!(t.complete(0, 12, g), None);
        assert_eq!(t.complete(0, 10, g), Some(13));
        assert_eq!(t.pending(), 0);
    }

    #[test]
    fn revoked_partition_stores_nothing() {
        let mut t = OffsetTracker::new();
        let old = t.begin(3, 0);
        t.forget(3);
        assert_eq!(t.complete(3, 0, old), None);
        // Assigned again: the old generation's completion must not clear the new pending offset.
        let new = t.begin(3, 0);
        assert_eq!(t.complete(3, 0, old), None);
        assert_eq!(t.pending(), 1);
        assert_eq!(t.complete(3, 0, new), Some(1));
    }

    proptest! {
        /// Whatever the completion order, the watermark never passes a pending offset and ends
        /// one past the last offset.
        #[test]
        fn watermark_never_passes_pending(order in Just((0i64..50).collect::<Vec<_>>()).prop_shuffle()) {
            let mut t = OffsetTracker::new();
            let g = (0..50).map(|o| t.begin(1, o)).last().unwrap();
            let mut done = std::collections::BTreeSet::new();
            let mut last = 0;
            for o in order {
                done.insert(o);
                if let Some(w) = t.complete(1, o, g) {
                    prop_assert!(w > last);
                    prop_assert!((0..w).all(|x| done.contains(&x)));
                    last = w;
                }
            }
            prop_assert_eq!(last, 50);
        }
    }
}
