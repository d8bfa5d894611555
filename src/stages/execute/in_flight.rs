//! The executor's bookkeeping: which tasks it holds, and against which bounds they count.
//!
//! A task taken from Kafka goes into its tenant's lane ([`Lanes`]) and counts towards two
//! bounds until it is done with:
//!
//! - its partition's (`executor.partition_max_buffered`) until its call returns. This bound is
//!   about fairness between partitions (tasks waiting for a tenant's turn or a permit). Once
//!   called, a task only waits for Kafka's acknowledgement, which holds back no partition, so its
//!   partition need not be paused for it (each pause costs a refetch of what librdkafka had
//!   prefetched for the partition);
//! - the process's (`executor.max_buffered`) until its outcome is durable: past it the executor
//!   takes no batches and the source, its channel full, pauses every partition.
//!
//! A tenant with `executor.tenant_max_buffered` tasks queued is deferred if it has limits of its
//! own: its further tasks go to a delay topic, spaced at the tenant's own rate
//! ([`InFlight::deferral`]). Any other tenant that far behind overflows ([`overflow`](super::overflow)).
//! Records on their way elsewhere (overflowed, deferred, dead-lettered) count towards
//! `max_buffered` until the broker has them, so a flood moved aside cannot grow memory either.
//!
//! Nothing here touches Kafka: methods say what should happen to a partition ([`Flow`]) and the
//! executor's main loop does it, so every rule is tested without a broker.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use super::queues::Lanes;
use crate::config::ExecutorConfig;

/// How long a partition may stay over `partition_max_buffered` before it is paused.
pub(crate) const PAUSE_GRACE: Duration = Duration::from_millis(100);

/// What the bookkeeping needs to know of a task.
pub(crate) trait Task {
    fn tenant(&self) -> &str;
    fn partition(&self) -> i32;
    /// The hash of its order key ([`order_hash`](super::queues::order_hash)): a tenant's tasks
    /// with the same one are called one at a time, in order.
    fn order(&self) -> u64;
}

/// What to do with a partition after a change in what it holds.
#[must_use = "a partition to pause or resume"]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flow {
    Keep,
    Pause(i32),
    Resume(i32),
}

/// Tasks taken and not yet done with: see the module docs.
#[derive(Debug)]
pub(crate) struct InFlight<T> {
    lanes: Lanes<T>,
    max_buffered: usize,
    partition_max_buffered: usize,
    tenant_max_buffered: usize,
    /// Tasks taken and not settled: queued, waiting for a permit, being called, or being settled.
    taken: usize,
    /// Records being produced elsewhere instead (overflow, delay or dead-letter topic).
    moving: usize,
    /// Per partition with tasks not yet called.
    partitions: HashMap<i32, Uncalled>,
    /// Per tenant being deferred: when its last deferred task is due (epoch ms).
    deferred_until: HashMap<String, u64>,
}

#[derive(Debug, Default)]
struct Uncalled {
    count: usize,
    /// Since when `count` is at or over the partition's bound.
    over_since: Option<Instant>,
}

impl<T: Task> InFlight<T> {
    /// Bookkeeping with the bounds of `limits`, calling up to `per_tenant` tasks of a tenant at
    /// once (of different order keys).
    pub fn new(per_tenant: usize, limits: &ExecutorConfig) -> Self {
        InFlight {
            lanes: Lanes::with_per_tenant(per_tenant),
            max_buffered: limits.max_buffered,
            partition_max_buffered: limits.partition_max_buffered,
            tenant_max_buffered: limits.tenant_max_buffered,
            taken: 0,
            moving: 0,
            partitions: HashMap::new(),
            deferred_until: HashMap::new(),
        }
    }

    /// Whether the process is under `max_buffered`, so another batch may be taken. A batch may
    /// take it over by up to a batch: the bound is checked per batch, not per task.
    pub(crate) fn may_take_batch(&self) -> bool {
        self.taken + self.moving < self.max_buffered
    }

    /// Whether the process holds half of `max_buffered` or more: then no tenant gets more than
    /// its plain share (a lone tenant's larger one, see [`overflow`](super::overflow), must leave
    /// room for any other partition's tasks to be taken).
    pub(crate) fn crowded(&self) -> bool {
        self.taken + self.moving >= self.max_buffered / 2
    }

    /// A record is being produced elsewhere instead of taken (see the module docs).
    pub(crate) fn moving(&mut self) {
        self.moving += 1;
    }

    /// A record being produced elsewhere is acknowledged (or failed, which stops the stage).
    pub(crate) fn moved(&mut self) {
        self.moving = self.moving.saturating_sub(1);
    }

    /// Tasks of `tenant` in its lane, queued or being called.
    pub(crate) fn queued(&self, tenant: &str) -> usize {
        self.lanes.queued(tenant)
    }

    /// Every tenant with tasks in its lane, with their number.
    pub(crate) fn backlogs(&self) -> impl Iterator<Item = (&str, usize)> {
        self.lanes.backlogs()
    }

    /// Takes `task`, received at `at`, into its tenant's lane.
    pub fn take(&mut self, task: T, at: Instant) -> Flow {
        let partition = task.partition();
        let uncalled = self.partitions.entry(partition).or_default();
        uncalled.count += 1;
        self.taken += 1;
        let mut flow = Flow::Keep;
        if uncalled.count >= self.partition_max_buffered {
            // librdkafka hands over a partition's messages in runs of thousands, so a batch often
            // puts one partition over its bound for the moment it takes to call them; pausing
            // then would throw away its prefetched messages for nothing. Only a partition still
            // over its bound a while later, with more of its tasks arriving, is paused.
            if at.duration_since(*uncalled.over_since.get_or_insert(at)) >= PAUSE_GRACE {
                flow = Flow::Pause(partition);
            }
        }
        let order = task.order();
        self.lanes.push_keyed(task, order, |t| t.tenant());
        flow
    }

    /// The next task whose tenant may have another call going and whose order key has none,
    /// with its tenant. It counts as it did until [`called`](Self::called) or
    /// [`gave_up`](Self::gave_up).
    pub(crate) fn next_call(&mut self) -> Option<(Arc<str>, T)> {
        self.lanes.start_next().map(|(tenant, _, task)| (tenant, task))
    }

    /// The call of a task of `tenant` with order key `order` in `partition` returned: the
    /// tenant's and the key's next tasks may start and the partition no longer counts it. It
    /// still counts towards `max_buffered` until [`settled`](Self::settled).
    pub fn called(&mut self, tenant: &str, order: u64, partition: i32) -> Flow {
        self.lanes.finish(tenant, order);
        let bound = self.partition_max_buffered;
        let uncalled = self.partitions.entry(partition).or_default();
        uncalled.count = uncalled.count.saturating_sub(1);
        if uncalled.count < bound {
            uncalled.over_since = None;
        }
        let count = uncalled.count;
        if count == 0 {
            self.partitions.remove(&partition);
        }
        // Resume at half the bound, so a busy partition is not paused and resumed on every task.
        if count <= bound / 2 {
            Flow::Resume(partition)
        } else {
            Flow::Keep
        }
    }

    /// Takes the queued tasks of `tenant` (of `partition`) beyond its first `keep` out of its
    /// lane, the latest ones, in order, to be moved elsewhere (the overflow topic): they count as
    /// records being moved until [`moved`](Self::moved), and its partition no longer counts them.
    pub(crate) fn evict(&mut self, tenant: &str, partition: i32, keep: usize) -> (Vec<T>, Flow) {
        let moved = self.lanes.split_off(tenant, keep);
        let n = moved.len();
        if n == 0 {
            return (moved, Flow::Keep);
        }
        self.taken -= n;
        self.moving += n;
        let bound = self.partition_max_buffered;
        let uncalled = self.partitions.entry(partition).or_default();
        uncalled.count = uncalled.count.saturating_sub(n);
        if uncalled.count < bound {
            uncalled.over_since = None;
        }
        let count = uncalled.count;
        if count == 0 {
            self.partitions.remove(&partition);
        }
        (moved, if count <= bound / 2 { Flow::Resume(partition) } else { Flow::Keep })
    }

    /// The outcome of a called task is durable (or producing it failed, which stops the stage).
    pub fn settled(&mut self) {
        self.taken = self.taken.saturating_sub(1);
    }

    /// A task that was taken ends without a call: the executor is stopping, or its partition was
    /// revoked while it waited. Its offset is not stored: whoever owns the partition next calls it.
    pub(crate) fn gave_up(&mut self, tenant: &str, order: u64, partition: i32) -> Flow {
        self.settled();
        self.called(tenant, order, partition)
    }

    /// When a task of `tenant` should be deferred rather than taken, the time (epoch ms) it is
    /// due back. A tenant is deferred once it has `tenant_max_buffered` tasks queued; while it is,
    /// its new tasks are deferred too (behind the earlier ones, each one limit interval later),
    /// and a deferred task coming back due (`returning`) joins the lane. `backlog_delay(n)` is how
    /// long the tenant's own limit takes to let `n` calls through.
    pub(crate) fn deferral(
        &mut self,
        tenant: &str,
        returning: bool,
        now: u64,
        backlog_delay: impl Fn(usize) -> Duration,
    ) -> Option<u64> {
        let queued = self.lanes.queued(tenant);
        let horizon = self.deferred_until.get(tenant).copied().filter(|due| *due > now);
        if queued < self.tenant_max_buffered && (returning || horizon.is_none()) {
            return None;
        }
        let step = backlog_delay(1).as_millis().max(1) as u64;
        let start = horizon.unwrap_or(now + backlog_delay(queued).as_millis() as u64);
        let due = start + step;
        self.deferred_until.insert(tenant.to_string(), due);
        Some(due)
    }

    /// Forgets tenants whose deferred tasks are all due by `now`.
    pub(crate) fn tidy(&mut self, now: u64) {
        self.deferred_until.retain(|_, due| *due > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct T(&'static str, i32, u32);

    impl Task for T {
        fn tenant(&self) -> &str {
            self.0
        }
        fn partition(&self) -> i32 {
            self.1
        }

        fn order(&self) -> u64 {
            0
        }
    }

    fn in_flight(max: usize, partition_max: usize, tenant_max: usize) -> InFlight<T> {
        let limits = ExecutorConfig {
            max_buffered: max,
            partition_max_buffered: partition_max,
            tenant_max_buffered: tenant_max,
            ..Default::default()
        };
        InFlight::new(1, &limits)
    }

    #[test]
    fn a_tenants_tasks_are_called_one_at_a_time_in_order_while_others_go_on() {
        let mut f = in_flight(100, 100, 100);
        let now = Instant::now();
        for t in [T("a", 0, 1), T("a", 0, 2), T("b", 0, 1)] {
            assert_eq!(f.take(t, now), Flow::Keep);
        }
        assert_eq!(f.next_call(), Some((Arc::from("a"), T("a", 0, 1))));
        assert_eq!(f.next_call(), Some((Arc::from("b"), T("b", 0, 1))));
        assert_eq!(f.next_call(), None, "a's second task waits for its first call");
        let _ = f.called("a", 0, 0);
        assert_eq!(f.next_call(), Some((Arc::from("a"), T("a", 0, 2))));
    }

    #[test]
    fn the_process_bound_counts_tasks_until_their_outcome_is_settled() {
        let mut f = in_flight(2, 100, 100);
        let now = Instant::now();
        let _ = f.take(T("a", 0, 1), now);
        assert!(f.may_take_batch());
        let _ = f.take(T("b", 1, 1), now);
        assert!(!f.may_take_batch(), "two taken of two");
        let (tenant, task) = f.next_call().unwrap();
        let _ = f.called(&tenant, 0, task.1);
        assert!(!f.may_take_batch(), "a called task counts until its outcome is durable");
        f.settled();
        assert!(f.may_take_batch());
        let (tenant, task) = f.next_call().unwrap();
        let _ = f.gave_up(&tenant, 0, task.1);
        assert_eq!(f.taken, 0, "a task given up counts no more");
        f.moving();
        f.moving();
        assert!(!f.may_take_batch(), "records on their way to another topic count too");
        f.moved();
        assert!(f.may_take_batch());
        f.moved();
        assert!(f.partitions.is_empty() && f.lanes.is_empty());
    }

    #[test]
    fn a_partition_over_its_bound_is_paused_only_after_the_grace_and_resumed_at_half() {
        let mut f = in_flight(100, 4, 100);
        let t0 = Instant::now();
        assert_eq!(f.take(T("b", 5, 0), t0), Flow::Keep);
        assert_eq!(f.next_call(), Some((Arc::from("b"), T("b", 5, 0))));
        assert_eq!(f.called("b", 0, 5), Flow::Resume(5), "resuming a partition not paused does nothing");
        for n in 0..4 {
            assert_eq!(f.take(T("a", 3, n), t0), Flow::Keep, "at the bound, within the grace");
        }
        assert_eq!(f.take(T("a", 3, 4), t0 + PAUSE_GRACE / 2), Flow::Keep);
        assert_eq!(f.take(T("a", 3, 5), t0 + PAUSE_GRACE), Flow::Pause(3), "still over after the grace");
        // Six uncalled: calls bring it back under the bound, then to half of it.
        let mut flows = Vec::new();
        for _ in 0..4 {
            let (tenant, task) = f.next_call().unwrap();
            assert_eq!(&*tenant, "a");
            flows.push(f.called(&tenant, 0, task.1));
        }
        assert_eq!(flows, [Flow::Keep, Flow::Keep, Flow::Keep, Flow::Resume(3)]);
        assert_eq!(f.partitions[&3].over_since, None, "under the bound, the grace starts again");
        // Back over the bound: the grace is counted from now, not from the first time.
        let t1 = t0 + PAUSE_GRACE * 10;
        for n in 0..2 {
            assert_eq!(f.take(T("a", 3, 10 + n), t1), Flow::Keep);
        }
        assert_eq!(f.take(T("a", 3, 12), t1 + PAUSE_GRACE), Flow::Pause(3));
    }

    #[test]
    fn a_tenants_latest_tasks_are_evicted_in_order_and_its_partition_resumed() {
        let mut f = in_flight(100, 4, 100);
        let t0 = Instant::now();
        for n in 0..6 {
            let _ = f.take(T("a", 3, n), t0);
        }
        assert_eq!(f.take(T("a", 3, 6), t0 + PAUSE_GRACE), Flow::Pause(3));
        let (tenant, first) = f.next_call().unwrap();
        let (evicted, flow) = f.evict(&tenant, 3, 2);
        assert_eq!(evicted, [T("a", 3, 2), T("a", 3, 3), T("a", 3, 4), T("a", 3, 5), T("a", 3, 6)]);
        assert_eq!(flow, Flow::Resume(3), "two left uncalled of a bound of four");
        assert_eq!((f.taken, f.moving, f.queued("a")), (2, 5, 2));
        let _ = f.called(&tenant, 0, first.1);
        assert_eq!(f.next_call(), Some((Arc::from("a"), T("a", 3, 1))), "the earliest stay, in order");
        assert_eq!(f.evict("a", 3, 0).0, [], "a running task stays");
    }

    #[test]
    fn a_tenant_with_a_full_lane_is_deferred_at_its_rate_until_its_deferrals_are_due() {
        let mut f = in_flight(100, 100, 2);
        let per_call = |n: usize| Duration::from_millis(100 * n as u64);
        let now = 1_000_000;
        let _ = f.take(T("a", 0, 1), Instant::now());
        assert_eq!(f.deferral("a", false, now, per_call), None, "one queued of two");
        let _ = f.take(T("a", 0, 2), Instant::now());
        // Two queued: due after those two calls and one more interval.
        assert_eq!(f.deferral("a", false, now, per_call), Some(now + 300));
        assert_eq!(f.deferral("b", false, now, per_call), None, "other tenants are taken");
        // While a is deferred, its new tasks queue behind the deferred ones, even with room.
        let (tenant, task) = f.next_call().unwrap();
        let _ = f.called(&tenant, 0, task.1);
        assert_eq!(f.deferral("a", false, now, per_call), Some(now + 400));
        assert_eq!(f.deferral("a", true, now, per_call), None, "a deferred task coming back joins the lane");
        f.tidy(now + 399);
        assert!(f.deferred_until.contains_key("a"));
        f.tidy(now + 400);
        assert!(f.deferred_until.is_empty(), "all due: forgotten");
        assert_eq!(f.deferral("a", false, now + 400, per_call), None);
    }
}
