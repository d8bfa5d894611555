//! The overflow topic: how a tenant's backlog stays off its partition's path.
//!
//! A tenant with its share of tasks waiting in its lane is *overflowing*: its next tasks, and all its later ones while any of them are out, are produced to
//! `actions.<service>.overflow` (same partition number as their origin, keyed by tenant, headers
//! and payload unchanged) and their offsets on the action topic are done. The partition flows
//! on: its other tenants' tasks keep joining their lanes. The overflow partition is read back
//! into the tenant's lane whenever the lane has room again, so the tenant drains at its share of
//! the executor (its lane's turn in the round robin, its weight in [`fair`](super::fair)) and
//! holds no more of the shared buffers than its share. When every task it sent out is back in its
//! lane, it stops overflowing and its tasks join the lane directly again.
//!
//! ## A tenant's share depends on who else has work
//!
//! A tenant's share is `executor.tenant_max_buffered` while another tenant of its partition has
//! work (tasks seen in the last [`CONTENDED_FOR`], or tasks out in the overflow topic), or while the
//! process holds half of `executor.max_buffered`. A tenant alone on its partition in a process
//! with room may hold more: half of `partition_max_buffered`. Overflowing costs a produce and a
//! read per task, which is worth paying only to let someone else through; a lone tenant's lane
//! is the pre-fairness buffer again, bounded so that it never takes its partition to
//! `partition_max_buffered` (which would pause it: a tenant arriving behind would not be seen)
//! and leaves the process room to take any other partition's tasks. When a second tenant of the
//! partition shows up, the lone tenant's share drops at once: its next task overflows although
//! its lane still holds more than the share, and the tasks already in its lane are called first,
//! as for any overflowing tenant (its lane is not refilled from the overflow topic until it is
//! back under the share).
//!
//! The only tenant the whole process has had work of lately (none other seen on any partition in
//! the last [`CONTENDED_FOR`], none with tasks out) does not overflow at all: there is nobody to
//! make room for, and a lone tenant flat out would otherwise pay the overflow's produce and read
//! for every task of its backlog (a quarter of its throughput, measured). It is held back as
//! before fairness: its partition pauses at `partition_max_buffered`, the process at
//! `max_buffered`. The first task of any other tenant, on any partition, ends that: the tasks
//! of the lone tenant's lane beyond its share are taken out of it and overflowed at once (its
//! latest ones, in order; its later tasks go behind them as for any overflowing tenant), which
//! frees the process's buffer and resumes its partition, so it is read on past the backlog to
//! whoever is behind it. The limit: a second tenant whose first tasks land on the lone tenant's
//! partition, *behind* its backlog, while no other partition has work, is not seen until that
//! backlog before it is called, as before fairness (a process with work from two tenants anywhere
//! never pauses a partition for one).
//!
//! ## Which process reads overflow partition p
//!
//! The process that owns action partition p: only it knows that tenant T of p overflows. The
//! overflow topic is read by a consumer of its own that never joins a group (`Source::assign`),
//! assigned exactly the action partitions the main consumer owns and following every rebalance
//! of it, committing its progress under `<prefix>weir-overflow-<service>`. The alternative, one
//! consumer subscribed to both topics with a co-partitioning (range) assignor, would move both
//! partitions in one rebalance, but it would make every part of the source (tickets, offset
//! tracking, pauses, lag, the watchdog) carry a topic, for all stages; and the assignor would have
//! to stay range forever, ruling out cooperative-sticky rebalancing. Following the assignment
//! keeps the source single-topic and needs one guard: overflow work is called only while its
//! action partition is still owned (checked with the action source's ownership, which the
//! rebalance hook updates before the partition can be assigned elsewhere).
//!
//! ## Order, and what a rebalance or restart does to it
//!
//! Within a process: a tenant's tasks reach its lane in action-topic order. Overflowed tasks are
//! enqueued to the producer one after the other as they are taken (the idempotent producer keeps
//! their order in the partition), read back in that order, and while any are out the tenant's new
//! tasks go behind them. Tasks that come back from a delay tier (retries, deferrals) join the lane
//! directly, later than tasks behind them, as before, except a deferral of a tenant that is
//! overflowing: it queues behind the tenant's tasks in the overflow topic (the evaluator defers
//! a run over its workflow's `runs_per_minute` that way, and it must not overtake earlier runs).
//!
//! A process taking over partition p (after a rebalance or a restart) does not know which tenants
//! of p were overflowing. So before it takes any task of action partition p it holds p (paused;
//! the few tasks already fetched wait in memory) and reads overflow partition p once from the
//! committed offset to its end, counting the records of each tenant (`backlog_by_key`). Those
//! tenants start out overflowing with that count, and the reader starts at exactly the offset the
//! count started from. Hence a tenant overflowing when p moved keeps its order on the new owner,
//! and partition-mates that were not overflowing flow as soon as the count is done (a pass over the
//! overflow partition: ~1 s per few hundred thousand records). What is *not* guaranteed is
//! "exactly once": as on every topic, work done but not yet committed by the old owner is done
//! again (a task already overflowed, whose action offset was not committed, is overflowed a second
//! time behind the first; an overflow task called but not committed is called again). The calls
//! carry the task id as `Idempotency-Key`, so a service drops the repeat. If a count fails (the
//! broker does not answer), it is retried every second and p stays held, which the stage's
//! watchdog reports if it lasts.
//!
//! ## Head-of-line in the overflow partition
//!
//! An overflow partition is a single log: when the tenant at its head has no room, the partition
//! is paused and the records behind it (other overflowing tenants of the same partition) wait
//! too. Only tenants over their share are ever there, and each is served at its lane's pace, so
//! the cost is that two heavy tenants of one partition drain at the slower one's pace.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{future::BoxFuture, stream::FuturesUnordered, FutureExt};

/// Counts under way; the main loop polls them.
pub(crate) type Scans = FuturesUnordered<BoxFuture<'static, Counted>>;
use rdkafka::Message;

use crate::{
    config::{Config, Priority},
    kafka::source::{self, Assignment, Delivery, Ownership, Source},
    telemetry::{Event, Stage},
};

/// Which way a task of the action topic goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// Into its tenant's lane.
    Lane,
    /// To the overflow topic; `started` when its tenant just began overflowing.
    Overflow { started: bool },
}

/// How long a tenant seen on a partition counts as having work there, for its partition-mates'
/// shares: longer than the gaps between a steady tenant's tasks, short enough that a lone tenant
/// gets its larger share back soon after the others went quiet.
pub(crate) const CONTENDED_FOR: Duration = Duration::from_secs(1);

/// Which tenants overflow and how many of their tasks are out: no Kafka, every rule testable.
#[derive(Debug, Default)]
pub(crate) struct Book {
    /// A tenant's share of the buffer while others have work (`tenant_max_buffered`).
    share: usize,
    /// A tenant's share while it is alone on its partition (see the module docs).
    alone_share: usize,
    /// Tenants overflowing: their partition, and their tasks sent out and not back in the lane.
    out: HashMap<Arc<str>, (i32, usize)>,
    /// Per action partition, the last two different tenants whose tasks were taken from it.
    seen: HashMap<i32, Seen>,
    /// The same over every partition of the process.
    seen_anywhere: Seen,
    /// The tenant last routed to its lane as the only tenant of the process, and its partition.
    lone: Option<(Arc<str>, i32)>,
}

/// The last tenant seen on a partition and the last one before it that was a different tenant,
/// with when: enough to tell any tenant whether *another* one was seen lately.
#[derive(Debug, Default)]
struct Seen {
    last: Option<(Arc<str>, Instant)>,
    other: Option<(Arc<str>, Instant)>,
}

impl Seen {
    fn saw(&mut self, tenant: &str, now: Instant) {
        if let Some((t, at)) = &mut self.last {
            if &**t == tenant {
                *at = now;
                return;
            }
        }
        self.other = self.last.replace((Arc::from(tenant), now));
    }

    /// When a tenant other than `tenant` was last seen.
    fn other_than(&self, tenant: &str) -> Option<Instant> {
        match &self.last {
            Some((t, _)) if &**t == tenant => self.other.as_ref().map(|(_, at)| *at),
            last => last.as_ref().map(|(_, at)| *at),
        }
    }
}

impl Book {
    /// Bookkeeping for tenants allowed `share` tasks in their lane while others have work, and
    /// `alone_share` (at least `share`) while alone on their partition.
    pub(crate) fn new(share: usize, alone_share: usize) -> Book {
        let share = share.max(1);
        Book {
            share,
            alone_share: alone_share.max(share),
            out: HashMap::new(),
            seen: HashMap::new(),
            seen_anywhere: Seen::default(),
            lone: None,
        }
    }

    /// A task of `tenant` is about to be routed: if another tenant was the only one of the process
    /// until now, that one and its partition (its lane may hold more than its share now; see the
    /// module docs).
    pub(crate) fn newcomer(&mut self, tenant: &str) -> Option<(Arc<str>, i32)> {
        match &self.lone {
            Some((lone, _)) if &**lone != tenant => self.lone.take(),
            _ => None,
        }
    }

    /// `n` tasks of `tenant` of `partition` were taken out of its lane to the overflow topic (after
    /// [`newcomer`](Self::newcomer)): it overflows, its later tasks behind them. True when it
    /// just began.
    pub(crate) fn evicted(&mut self, tenant: &str, partition: i32, n: usize) -> bool {
        let entry = self.out.entry(Arc::from(tenant)).or_insert((partition, 0));
        entry.1 += n;
        entry.1 == n
    }

    /// Whether `tenant` is the only tenant this process has had work of lately: no other seen on
    /// any partition in the last [`CONTENDED_FOR`], none with tasks out in the overflow topic.
    pub(crate) fn alone_in_process(&self, tenant: &str, now: Instant) -> bool {
        let lately =
            self.seen_anywhere.other_than(tenant).is_some_and(|at| now.saturating_duration_since(at) < CONTENDED_FOR);
        !lately && !self.out.keys().any(|t| &**t != tenant)
    }

    /// The share of `tenant` of action partition `partition` at `now`; `crowded` when the process
    /// holds so much that no tenant may have more than the plain share.
    pub(crate) fn share_of(&self, tenant: &str, partition: i32, now: Instant, crowded: bool) -> usize {
        if crowded || self.alone_share == self.share {
            return self.share;
        }
        let lately = self
            .seen
            .get(&partition)
            .and_then(|s| s.other_than(tenant))
            .is_some_and(|at| now.saturating_duration_since(at) < CONTENDED_FOR);
        let overflowing = || self.out.iter().any(|(t, (p, _))| *p == partition && &**t != tenant);
        if lately || overflowing() {
            self.share
        } else {
            self.alone_share
        }
    }

    /// Where a task of `tenant` from action partition `partition` goes, its tenant having
    /// `queued` tasks in its lane; counts it out if it overflows. `now` and `crowded` as for
    /// [`share_of`](Self::share_of).
    pub(crate) fn route(&mut self, tenant: &str, partition: i32, queued: usize, now: Instant, crowded: bool) -> Route {
        self.seen.entry(partition).or_default().saw(tenant, now);
        self.seen_anywhere.saw(tenant, now);
        if let Some((_, out)) = self.out.get_mut(tenant) {
            *out += 1;
            return Route::Overflow { started: false };
        }
        // The only tenant of the process: nobody to make room for, so no overflow; the partition
        // and process bounds hold it back as they did before fairness (see the module docs).
        if self.alone_in_process(tenant, now) {
            if self.lone.as_ref().is_none_or(|(t, p)| &**t != tenant || *p != partition) {
                self.lone = Some((Arc::from(tenant), partition));
            }
            return Route::Lane;
        }
        if queued < self.share_of(tenant, partition, now, crowded) {
            return Route::Lane;
        }
        self.out.insert(Arc::from(tenant), (partition, 1));
        Route::Overflow { started: true }
    }

    /// Whether `tenant` has tasks out in the overflow topic.
    pub(crate) fn is_overflowing(&self, tenant: &str) -> bool {
        self.out.contains_key(tenant)
    }

    /// Whether a task of `tenant` of `partition` with `queued` tasks in its lane may come back
    /// into it (`now` and `crowded` as for [`share_of`](Self::share_of)).
    pub(crate) fn has_room(&self, tenant: &str, partition: i32, queued: usize, now: Instant, crowded: bool) -> bool {
        queued < self.share_of(tenant, partition, now, crowded)
    }

    /// A task of `tenant` came back from the overflow topic into its lane; true when that was its
    /// last one out (it stops overflowing).
    pub(crate) fn returned(&mut self, tenant: &str) -> bool {
        let Some((_, out)) = self.out.get_mut(tenant) else { return false };
        *out = out.saturating_sub(1);
        if *out == 0 {
            self.out.remove(tenant);
            return true;
        }
        false
    }

    /// The overflow partition `partition` holds `counts` records per tenant that are not in a lane
    /// (a partition just taken over); returns the tenants that start overflowing.
    pub(crate) fn counted(&mut self, partition: i32, counts: impl IntoIterator<Item = (String, usize)>) -> Vec<String> {
        let mut started = Vec::new();
        for (tenant, n) in counts.into_iter().filter(|(_, n)| *n > 0) {
            let entry = self.out.entry(Arc::from(tenant.as_str())).or_insert((partition, 0));
            if entry.1 == 0 {
                started.push(tenant);
            }
            entry.1 += n;
        }
        started
    }

    /// Forgets the tenants of a partition no longer owned; returns them.
    pub(crate) fn forget(&mut self, partition: i32) -> Vec<Arc<str>> {
        let gone: Vec<Arc<str>> =
            self.out.iter().filter(|(_, (p, _))| *p == partition).map(|(t, _)| t.clone()).collect();
        for t in &gone {
            self.out.remove(t);
        }
        self.seen.remove(&partition);
        if self.lone.as_ref().is_some_and(|(_, p)| *p == partition) {
            // Its lane's tasks of that partition are the next owner's: none to evict here.
            self.lone = None;
        }
        gone
    }

    /// Tasks of `tenant` out in the overflow topic.
    #[cfg(test)]
    pub(crate) fn out(&self, tenant: &str) -> usize {
        self.out.get(tenant).map_or(0, |(_, n)| *n)
    }

    /// Every overflowing tenant with its tasks out.
    pub(crate) fn backlogs(&self) -> impl Iterator<Item = (&str, usize)> {
        self.out.iter().map(|(t, (_, n))| (&**t, *n))
    }
}

/// What a count of an overflow partition came to: (partition, the reader generation it was started
/// for, where to read from and the records per tenant).
pub(crate) type Counted = (i32, u64, anyhow::Result<(i64, HashMap<Vec<u8>, usize>)>);

/// The overflow topic's reader, following the action source's assignment (see the module docs).
pub(crate) struct Reader {
    config: Arc<Config>,
    service: String,
    topic: String,
    group: String,
    source: Source,
    pub(crate) book: Book,
    /// The action partitions owned as last seen, and the assignment generation they came with.
    owned: BTreeSet<i32>,
    generation: u64,
    /// Action partitions whose overflow partition is counted and read: their tasks may be routed.
    ready: BTreeSet<i32>,
    /// Action partitions being counted, with the count's generation (a newer one supersedes).
    counting: HashMap<i32, u64>,
    counts: u64,
    /// Action tasks of partitions being counted, fetched before the hold took effect.
    held: BTreeMap<i32, Vec<Delivery>>,
    /// Overflow records read and not yet back in their lanes, per partition, in order.
    waiting: BTreeMap<i32, VecDeque<Delivery>>,
    waiting_len: usize,
}

impl Reader {
    /// The reader of the overflow topic of `service`'s action topic of `priority`.
    pub(crate) fn new(config: Arc<Config>, service: &str, priority: Priority) -> anyhow::Result<Reader> {
        let topic = config.names().overflow_at(service, priority);
        let group = config.names().overflow_group_at(service, priority);
        let source = Source::assign(&config, Stage::Execute, &topic, &group)?;
        Ok(Reader {
            book: Book::new(config.executor.tenant_max_buffered, config.executor.partition_max_buffered / 2),
            config,
            service: service.to_string(),
            topic,
            group,
            source,
            owned: BTreeSet::new(),
            generation: 0,
            ready: BTreeSet::new(),
            counting: HashMap::new(),
            counts: 0,
            held: BTreeMap::new(),
            waiting: BTreeMap::new(),
            waiting_len: 0,
        })
    }

    pub(crate) fn source(&self) -> &Source {
        &self.source
    }

    pub(crate) fn source_mut(&mut self) -> &mut Source {
        &mut self.source
    }

    pub(crate) fn ownership(&self) -> Ownership {
        self.source.ownership()
    }

    /// Follows a new assignment of the action topic: stops reading the overflow partitions of
    /// action partitions lost, and holds those gained (`main` pauses them) until their overflow
    /// partition is counted.
    pub(crate) fn follow(&mut self, assignment: &Assignment, main: &Source, scans: &mut Scans) {
        let same = assignment.generation == self.generation;
        let lost: Vec<i32> = self.owned.iter().copied().filter(|p| !same || !assignment.owned.contains(p)).collect();
        let gained: Vec<i32> = assignment.owned.iter().copied().filter(|p| !same || !self.owned.contains(p)).collect();
        self.generation = assignment.generation;
        self.owned = assignment.owned.clone();
        if !lost.is_empty() {
            if let Err(e) = self.source.remove_partitions(&lost) {
                Event::Failed { stage: Stage::Execute, reason: "overflow", retryable: true, detail: &format!("{e:#}") }
                    .emit();
            }
        }
        for p in lost {
            self.ready.remove(&p);
            self.counting.remove(&p);
            self.held.remove(&p);
            self.waiting_len -= self.waiting.remove(&p).map_or(0, |q| q.len());
            for tenant in self.book.forget(p) {
                Event::Overflowing { service: &self.service, tenant: &tenant, partition: p, started: false }.emit();
            }
            main.resume_partition(p);
        }
        for p in gained {
            main.pause_partition(p);
            self.count(p, Duration::ZERO, scans);
        }
    }

    /// Starts counting overflow partition `p` after `delay`.
    fn count(&mut self, p: i32, delay: Duration, scans: &mut Scans) {
        self.counts += 1;
        let count = self.counts;
        self.counting.insert(p, count);
        let (config, topic, group) = (self.config.clone(), self.topic.clone(), self.group.clone());
        scans.push(
            async move {
                tokio::time::sleep(delay).await;
                let counted = tokio::task::spawn_blocking(move || {
                    source::backlog_by_key(&config, &topic, &group, p, Duration::from_secs(60))
                })
                .await
                .unwrap_or_else(|e| Err(anyhow::anyhow!("counting task failed: {e}")));
                (p, count, counted)
            }
            .boxed(),
        );
    }

    /// Books a finished count: the partition's tenants with tasks out start overflowing, the
    /// reader starts where the count started, and the action tasks held meanwhile are returned to
    /// be taken (`main` resumes the partition). A failed count is retried a second later.
    pub(crate) fn counted(&mut self, (p, count, result): Counted, main: &Source, scans: &mut Scans) -> Vec<Delivery> {
        if self.counting.get(&p) != Some(&count) {
            return Vec::new();
        }
        let (start, counts) = match result {
            Ok(counted) => counted,
            Err(e) => {
                let detail = format!("counting {}/{p}: {e:#}", self.topic);
                Event::Failed { stage: Stage::Execute, reason: "overflow", retryable: true, detail: &detail }.emit();
                self.count(p, Duration::from_secs(1), scans);
                return Vec::new();
            }
        };
        if let Err(e) = self.source.add_partitions(&[(p, start)]) {
            let detail = format!("{e:#}");
            Event::Failed { stage: Stage::Execute, reason: "overflow", retryable: true, detail: &detail }.emit();
            self.count(p, Duration::from_secs(1), scans);
            return Vec::new();
        }
        self.counting.remove(&p);
        self.ready.insert(p);
        let counts = counts.into_iter().map(|(k, n)| (String::from_utf8_lossy(&k).into_owned(), n));
        for tenant in self.book.counted(p, counts) {
            Event::Overflowing { service: &self.service, tenant: &tenant, partition: p, started: true }.emit();
        }
        main.resume_partition(p);
        self.held.remove(&p).unwrap_or_default()
    }

    /// Whether tasks of action partition `p` may be routed (its overflow partition is counted).
    pub(crate) fn is_ready(&self, p: i32) -> bool {
        self.ready.contains(&p)
    }

    /// Keeps an action task of a partition not yet counted until it is.
    pub(crate) fn hold(&mut self, d: Delivery, main: &Source) {
        let p = d.ticket.partition;
        if !self.owned.contains(&p) {
            // A partition this executor no longer owns, or not yet knows it owns: the assignment
            // arrives with the next look at the watch; until then it is held like a counted one.
            main.pause_partition(p);
        }
        self.held.entry(p).or_default().push(d);
    }

    /// Takes a batch of overflow records in (each waits for room in its tenant's lane).
    pub(crate) fn receive(&mut self, batch: Vec<Delivery>) {
        let ownership = self.source.ownership();
        for d in batch.into_iter().filter(|d| ownership.owns(&d.ticket)) {
            self.waiting_len += 1;
            self.waiting.entry(d.ticket.partition).or_default().push_back(d);
        }
    }

    /// Overflow records read and not yet in a lane.
    pub(crate) fn waiting(&self) -> usize {
        self.waiting_len
    }

    /// The next overflow record whose tenant has room in its lane (`queued` says how full a
    /// tenant's lane is; `crowded` whether the process is past half its bound), counted back in.
    pub(crate) fn next_back(&mut self, queued: impl Fn(&str) -> usize, crowded: bool) -> Option<Delivery> {
        let now = Instant::now();
        for (partition, queue) in self.waiting.iter_mut() {
            let Some(head) = queue.front() else { continue };
            let tenant = String::from_utf8_lossy(head.message.key().unwrap_or_default());
            if !self.book.has_room(&tenant, *partition, queued(&tenant), now, crowded) {
                continue;
            }
            if self.book.returned(&tenant) {
                let partition = head.ticket.partition;
                Event::Overflowing { service: &self.service, tenant: &tenant, partition, started: false }.emit();
            }
            self.waiting_len -= 1;
            return queue.pop_front();
        }
        None
    }

    /// Pauses the overflow partitions whose head waits for room, resumes the others.
    pub(crate) fn steer(&mut self) {
        self.waiting.retain(|p, queue| {
            if queue.is_empty() {
                self.source.resume_partition(*p);
            } else {
                self.source.pause_partition(*p);
            }
            !queue.is_empty()
        });
    }

    pub(crate) fn close(self) {
        self.source.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_over_its_share_overflows_until_every_task_it_sent_out_is_back() {
        let mut b = Book::new(2, 2);
        let now = Instant::now();
        assert_eq!(b.route("z", 9, 0, now, false), Route::Lane, "another tenant in the process");
        assert_eq!(b.route("a", 3, 1, now, false), Route::Lane);
        assert_eq!(b.route("a", 3, 2, now, false), Route::Overflow { started: true }, "two in the lane: the share");
        assert_eq!(b.route("b", 3, 0, now, false), Route::Lane, "a partition-mate is not held behind it");
        let behind = b.route("a", 3, 0, now, false);
        assert_eq!(behind, Route::Overflow { started: false }, "behind its tasks out, even with room");
        assert_eq!(b.out("a"), 2);
        assert!(!b.has_room("a", 3, 2, now, false) && b.has_room("a", 3, 1, now, false));
        assert!(!b.returned("a"));
        assert!(b.returned("a"), "the last one out is back: a stops overflowing");
        assert!(!b.returned("a"), "counts never go below zero");
        assert_eq!(b.route("a", 3, 1, now, false), Route::Lane);
        assert_eq!(b.backlogs().count(), 0);
    }

    #[test]
    fn a_partition_taken_over_starts_with_its_counted_tenants_overflowing_and_a_lost_one_is_forgotten() {
        let mut b = Book::new(100, 100);
        let now = Instant::now();
        assert_eq!(b.route("z", 9, 0, now, false), Route::Lane, "another tenant in the process");
        assert_eq!(b.route("a", 1, 100, now, false), Route::Overflow { started: true });
        let started = b.counted(2, [("c".to_string(), 5), ("d".to_string(), 0)]);
        assert_eq!(started, ["c"], "a tenant with nothing out does not overflow");
        assert_eq!(b.route("c", 2, 0, now, false), Route::Overflow { started: false }, "behind its counted backlog");
        assert_eq!(b.out("c"), 6);
        assert_eq!(b.route("d", 2, 0, now, false), Route::Lane);
        assert_eq!(b.forget(2).iter().map(|t| t.to_string()).collect::<Vec<_>>(), ["c"]);
        assert_eq!((b.out("a"), b.out("c")), (1, 0), "other partitions' tenants are kept");
    }

    #[test]
    fn a_lone_tenant_holds_the_larger_share_until_a_partition_mate_has_work() {
        let mut b = Book::new(2, 5);
        let t0 = Instant::now();
        // Another tenant in the process, on another partition.
        assert_eq!(b.route("z", 1, 0, t0, false), Route::Lane);
        // Alone on partition 0: no overflow until the larger share.
        for queued in 0..5 {
            assert_eq!(b.route("a", 0, queued, t0, false), Route::Lane, "{queued} queued, alone");
        }
        assert_eq!(b.route("a", 0, 5, t0, false), Route::Overflow { started: true }, "the larger share is a bound");
        assert!(b.returned("a"));
        // The process past half its bound: the plain share, alone or not.
        assert_eq!(b.route("a", 0, 2, t0, true), Route::Overflow { started: true });
        assert!(b.returned("a"));
        assert_eq!(b.route("a", 0, 4, t0, false), Route::Lane);
        // A partition-mate shows up: a, with 4 in its lane, overflows with its very next task,
        // and its lane is not refilled from the overflow topic until it is under the plain share.
        assert_eq!(b.route("b", 0, 0, t0, false), Route::Lane, "b is not held behind a's lane");
        assert_eq!(b.route("a", 0, 4, t0, false), Route::Overflow { started: true });
        assert!(!b.has_room("a", 0, 2, t0, false) && b.has_room("a", 0, 1, t0, false));
        // b's share is the plain one too while a has tasks out, however long ago a was seen.
        let later = t0 + CONTENDED_FOR * 2;
        assert_eq!(b.route("b", 0, 2, later, false), Route::Overflow { started: true });
        assert!(b.returned("b") && b.returned("a"));
        // Nobody else seen for CONTENDED_FOR: a is alone again.
        let quiet = later + CONTENDED_FOR;
        assert_eq!(b.share_of("a", 0, later + CONTENDED_FOR / 2, false), 2, "b was seen lately");
        assert_eq!(b.share_of("a", 0, quiet, false), 5);
        assert_eq!(b.route("a", 0, 4, quiet, false), Route::Lane);
        // a seen again does not hide b: b's last sight is kept as "another tenant".
        assert_eq!(b.route("b", 0, 0, quiet, false), Route::Lane);
        assert_eq!(b.route("a", 0, 1, quiet, false), Route::Lane);
        assert_eq!(b.share_of("a", 0, quiet, false), 2);
        assert_eq!(b.share_of("b", 0, quiet, false), 2);
        b.forget(0);
        assert_eq!(b.share_of("a", 0, quiet, false), 5, "a partition given up is forgotten");
        let mut b = Book::new(2, 5);
        assert_eq!(b.route("a", 4, 10, t0, false), Route::Lane, "the only tenant");
        b.forget(4);
        assert_eq!(b.newcomer("z"), None, "a tenant of a partition given up is not evicted here");
    }

    #[test]
    fn the_only_tenant_of_the_process_never_overflows_until_another_shows_up_anywhere() {
        let mut b = Book::new(2, 5);
        let t0 = Instant::now();
        for queued in [0, 5, 1_000] {
            assert_eq!(b.route("a", 0, queued, t0, true), Route::Lane, "{queued} queued, the only tenant");
        }
        assert_eq!(b.newcomer("a"), None, "a itself is no newcomer");
        // Another tenant on another partition: a's lane beyond its share is to be evicted, and a is
        // held to its share on its own partition again.
        assert_eq!(b.newcomer("z"), Some((Arc::from("a"), 0)));
        assert_eq!(b.newcomer("z"), None, "once");
        assert_eq!(b.route("z", 1, 0, t0, false), Route::Lane);
        assert!(!b.alone_in_process("a", t0));
        assert!(b.evicted("a", 0, 995) && !b.evicted("a", 0, 1), "a overflows behind its evicted tasks");
        assert_eq!(b.route("a", 0, 0, t0, false), Route::Overflow { started: false });
        assert_eq!(b.out("a"), 997);
        for _ in 0..996 {
            assert!(!b.returned("a"));
        }
        assert!(b.returned("a"));
        assert_eq!(b.route("a", 0, 5, t0, false), Route::Overflow { started: true });
        // z gone quiet, but a's tasks are out: a overflows behind them, alone or not.
        let later = t0 + CONTENDED_FOR;
        assert!(b.alone_in_process("a", later));
        assert_eq!(b.route("a", 0, 0, later, false), Route::Overflow { started: false });
        assert!(!b.returned("a") && b.returned("a"));
        assert_eq!(b.route("a", 0, 1_000, later, false), Route::Lane, "all back: alone again");
        // A tenant with tasks out counts as having work, however long ago it was seen.
        assert_eq!(b.counted(1, [("z".to_string(), 3)]), ["z"]);
        assert!(!b.alone_in_process("a", later + CONTENDED_FOR));
    }
}
