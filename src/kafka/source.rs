//! Reading a topic as a consumer-group member, with at-least-once offsets.
//!
//! ## Why a polling thread and batches
//! librdkafka's own benchmarks show a `BaseConsumer` polled in a tight loop far ahead of a
//! per-message async stream: every message through a stream costs a waker, a queue event and a
//! task switch. Here one OS thread per source polls the `BaseConsumer`, takes whatever is already
//! fetched (up to [`BATCH`] messages) without waiting, and hands the batch to the stage's tokio
//! task over a small bounded channel: one wake-up per batch, not per message, and the stage's
//! async work (produce acknowledgements, HTTP calls, database writes) stays on tokio.
//!
//! ## Backpressure without buffering
//! When the channel is full the stage is busy. The thread waits for room (up to [`STALL`]) while
//! librdkafka's bounded prefetch queue fills; if the stage is still behind after that, it
//! *pauses* every assigned partition and keeps polling (so the group still sees it alive and
//! rebalances still run) instead of buffering: memory stays flat whatever the backlog. It resumes
//! once the stage takes the batch.
//!
//! ## Pause state across rebalances
//! librdkafka keeps an application's pause on the partition itself, not on the assignment: a
//! partition paused, revoked and assigned again (a member joining or leaving, or the broker
//! restarting and the group re-forming) comes back *still paused*, and nothing in librdkafka
//! resumes it. So the source keeps two sets under one lock: what the stage holds ([`PauseState::held`],
//! its intent, which outlives rebalances until the stage resumes the partition), and what it has
//! actually paused in librdkafka ([`PauseState::applied`]). On every assignment the two are
//! reconciled (see [`reconcile`]): assigned partitions are paused exactly when the stage holds
//! them or the poll thread holds everything for backpressure. (Issue 11: an executor whose
//! paused partitions came back from a broker restart never read again, and said nothing.)
//!
//! ## Liveness
//! A watchdog thread per source notices a stage that has work waiting (lag, a batch it does not
//! take, messages taken and not finished) yet has neither taken nor finished anything for
//! `health.stall_after`. It logs why as far as the source can tell, sets
//! `weir_stage_stalled{stage,topic,reason}`, and reports through [`Health`] so `/health/live`
//! answers 503 until the stage moves again. A broker the consumer cannot reach is not a stall (a
//! restart would not help): it makes `/health/ready` answer 503 instead.
//!
//! ## Offsets
//! Each message comes with a [`Ticket`]. The stage calls [`Source::done`] once the work the
//! message stands for is durable; the [`OffsetTracker`] turns out-of-order completions into the
//! highest safe offset, which is *stored* for librdkafka's background commit. Rebalance hooks in
//! the [`ConsumerContext`] forget revoked partitions so late completions cannot store offsets a
//! new owner relies on.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc as std_mpsc, Arc, Condvar, Mutex, Weak,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use rdkafka::{
    consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance},
    error::{KafkaError, KafkaResult},
    message::OwnedMessage,
    types::RDKafkaErrorCode,
    ClientContext, Message, Offset, Statistics, TopicPartitionList,
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::{
    config::Config,
    kafka,
    kafka::offsets::OffsetTracker,
    telemetry::{Event, Health, Stage},
};

/// Most messages handed to a stage at once.
pub const BATCH: usize = 1_000;

/// Identifies a message for [`Source::done`].
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    pub partition: i32,
    pub offset: i64,
    generation: u64,
    received: Instant,
}

impl Ticket {
    /// Which assignment of its partition handed the message out: a partition revoked and assigned
    /// again gets a new one (what the executor reloads its memory of completed tasks on).
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }
}

/// A message and its ticket.
#[derive(Debug)]
pub struct Delivery {
    pub message: OwnedMessage,
    pub ticket: Ticket,
}

/// The partitions of the topic this member owns, and how many the topic has: what a stage needs
/// to take its share of a limit shared by the whole group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Assignment {
    pub owned: BTreeSet<i32>,
    pub partitions: i32,
    /// Counts the assignments this member received.
    pub generation: u64,
    /// Per owned partition, the `generation` that assigned it: a partition revoked and assigned
    /// again between two looks at the watch shows in `owned` both times, but here with a new
    /// generation. Per partition, because under an incremental protocol an assignment adds to
    /// what is owned and leaves the rest alone: what was kept has not moved.
    pub assigned_in: BTreeMap<i32, u64>,
}

struct Shared {
    stage: Stage,
    topic: String,
    tracker: Mutex<OffsetTracker>,
    /// Every pause and resume is made under this lock, so the stage's, the poll thread's and the
    /// rebalance hooks' cannot interleave.
    pause: Mutex<PauseState>,
    /// Whether the poll thread paused everything (the stage is behind).
    all_paused: AtomicBool,
    /// Whether the poll thread holds a batch the stage has not taken (the channel is full).
    holding: AtomicBool,
    /// Batches handed to the channel and taken from it: the difference waits for the stage.
    sent: AtomicU64,
    received: AtomicU64,
    /// When the stage last took a batch or finished a message, in ms since `started`.
    progress_ms: AtomicU64,
    started: Instant,
    /// Whether the consumer reaches a broker, from librdkafka's statistics and errors.
    reachable: AtomicBool,
    /// Counts revocations, and the partitions revoked since the poll thread last looked: messages
    /// it polled before a revocation are dropped rather than handed over (see `poll_loop`).
    revokes: AtomicU64,
    revoked: Mutex<BTreeSet<i32>>,
    health: Health,
    /// The configured static membership id, to name it when the broker refuses it.
    instance_id: Option<String>,
    /// Batches the stage has taken, and its signal: what the poll thread waits on when the
    /// channel is full (see [`wait_for_room`]).
    taken: Mutex<u64>,
    room: Condvar,
    assignment: watch::Sender<Assignment>,
    /// For a source whose partitions are assigned by the stage ([`Source::assign`]): the
    /// partitions assigned right now. A message the poll thread took from librdkafka just before
    /// its partition was unassigned is dropped rather than handed over (see `poll_loop`). Locked
    /// after `tracker`, never before. `None` for a group member, whose rebalances do this.
    manual: Option<Mutex<BTreeSet<i32>>>,
}

/// What the stage wants paused, and what is paused in librdkafka.
#[derive(Debug, Default)]
struct PauseState {
    /// Partitions the stage asked to pause (see [`Source::pause_partition`]) and has not resumed,
    /// whether or not they are assigned right now.
    held: BTreeSet<i32>,
    /// Partitions this consumer has paused in librdkafka and not resumed. librdkafka keeps that
    /// flag across revoke and assign (see the module docs), so neither is cleared by a rebalance.
    applied: BTreeSet<i32>,
}

/// Rebalance hooks and statistics for a source's consumer.
pub(crate) struct SourceContext {
    shared: Arc<Shared>,
}

fn describe(tpl: &TopicPartitionList) -> String {
    tpl.elements().iter().map(|e| e.partition().to_string()).collect::<Vec<_>>().join(",")
}

impl ClientContext for SourceContext {
    fn stats(&self, stats: Statistics) {
        // A broker connection in state UP means the consumer reaches the cluster; statistics
        // arrive every `statistics.interval.ms` whether or not it does.
        let reachable = stats.brokers.values().any(|b| b.state == "UP");
        self.shared.set_reachable(reachable);
        let Some(topic) = stats.topics.get(&self.shared.topic) else { return };
        for (partition, p) in &topic.partitions {
            if *partition >= 0 && p.consumer_lag >= 0 {
                Event::Lag {
                    stage: self.shared.stage,
                    topic: &self.shared.topic,
                    partition: *partition,
                    lag: p.consumer_lag,
                }
                .emit();
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.shared.set_reachable(false);
        }
        // What the default implementation does.
        tracing::error!("librdkafka: {error}: {reason}");
    }
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            // What the stage holds is left alone: it is the stage's intent, which it clears with
            // `resume_partition` once its work for the partition drains, assigned or not.
            let mut tracker = self.shared.tracker.lock().expect("tracker lock");
            for e in tpl.elements() {
                tracker.forget(e.partition());
            }
            self.shared.revoked.lock().expect("revoked lock").extend(tpl.elements().iter().map(|e| e.partition()));
            self.shared.revokes.fetch_add(1, Ordering::SeqCst);
            self.shared.assignment.send_modify(|a| {
                for e in tpl.elements() {
                    a.owned.remove(&e.partition());
                    a.assigned_in.remove(&e.partition());
                }
            });
            let (stage, topic) = (self.shared.stage, self.shared.topic.as_str());
            Event::Rebalanced { stage, topic, kind: "revoke", partitions: &describe(tpl) }.emit();
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            // Partitions may have been added since the last look; a failed lookup keeps the count.
            let partitions = kafka::partition_count(consumer.client(), &self.shared.topic).ok();
            self.shared.assignment.send_modify(|a| {
                a.generation += 1;
                a.owned.extend(tpl.elements().iter().map(|e| e.partition()));
                let generation = a.generation;
                a.assigned_in.extend(tpl.elements().iter().map(|e| (e.partition(), generation)));
                if let Some(n) = partitions {
                    a.partitions = n;
                }
            });
            let (stage, topic) = (self.shared.stage, self.shared.topic.as_str());
            Event::Rebalanced { stage, topic, kind: "assign", partitions: &describe(tpl) }.emit();
            // Under an incremental protocol `tpl` is only what was added; the rest of the
            // assignment kept reading and keeps its pause state.
            let fresh: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            reconcile(consumer, &self.shared, &fresh);
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _: &TopicPartitionList) {
        if let Err(e) = result {
            // "No offset stored" is the normal answer of an idle consumer's periodic commit.
            if !matches!(e.rdkafka_error_code(), Some(rdkafka::types::RDKafkaErrorCode::NoOffset)) {
                Event::Failed { stage: self.shared.stage, reason: "commit", retryable: true, detail: &e.to_string() }
                    .emit();
            }
        }
    }
}

/// A topic read by one member of a consumer group.
pub struct Source {
    consumer: Arc<BaseConsumer<SourceContext>>,
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Vec<Delivery>>,
    /// Stops the poll thread, which reads it between polls.
    stop: CancellationToken,
    /// The poll thread; it returns the batch it held when it stopped.
    thread: Option<JoinHandle<Vec<Delivery>>>,
    watchdog: Option<(std_mpsc::Sender<()>, JoinHandle<()>)>,
}

impl Source {
    /// Joins `group` on `topic` (which must exist) and starts polling.
    pub fn subscribe(config: &Config, stage: Stage, topic: &str, group: &str) -> anyhow::Result<Source> {
        Self::open(config, stage, topic, group, false)
    }

    /// Reads `topic` (which must exist) without joining a group: the stage assigns partitions
    /// with [`add_partitions`](Self::add_partitions), at offsets it chooses, and removes them with
    /// [`remove_partitions`](Self::remove_partitions). Offsets stored with [`done`](Self::done)
    /// are committed under `group`, which never has members (as `weir dlq redrive` does).
    pub fn assign(config: &Config, stage: Stage, topic: &str, group: &str) -> anyhow::Result<Source> {
        Self::open(config, stage, topic, group, true)
    }

    fn open(config: &Config, stage: Stage, topic: &str, group: &str, manual: bool) -> anyhow::Result<Source> {
        let (assignment, _) = watch::channel(Assignment::default());
        let shared = Arc::new(Shared {
            stage,
            topic: topic.to_string(),
            tracker: Mutex::new(OffsetTracker::new()),
            pause: Mutex::new(PauseState::default()),
            all_paused: AtomicBool::new(false),
            holding: AtomicBool::new(false),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            progress_ms: AtomicU64::new(0),
            started: Instant::now(),
            reachable: AtomicBool::new(true),
            revokes: AtomicU64::new(0),
            revoked: Mutex::new(BTreeSet::new()),
            health: Health::register(stage, topic),
            instance_id: config.instance_id.clone(),
            taken: Mutex::new(0),
            room: Condvar::new(),
            assignment,
            manual: manual.then(Default::default),
        });
        let consumer: BaseConsumer<SourceContext> = kafka::member_config(config, group)
            .create_with_context(SourceContext { shared: shared.clone() })
            .context("creating Kafka consumer")?;
        let partitions = kafka::partition_count(consumer.client(), topic)?;
        shared.assignment.send_modify(|a| a.partitions = partitions);
        if !manual {
            consumer.subscribe(&[topic]).with_context(|| format!("subscribing to {topic}"))?;
        }
        let consumer = Arc::new(consumer);
        let (tx, rx) = mpsc::channel(2);
        let stop = CancellationToken::new();
        let thread = std::thread::Builder::new()
            .name(format!("weir-{}-poll", stage.as_str()))
            .spawn({
                let (consumer, shared, stop) = (consumer.clone(), shared.clone(), stop.clone());
                move || poll_loop(&consumer, &shared, &tx, &stop)
            })
            .context("spawning poll thread")?;
        // The watchdog holds the consumer weakly, so the consumer still leaves the group when the
        // source closes; it stops when `watchdog_stop` is dropped.
        let (watchdog_stop, stopped) = std_mpsc::channel::<()>();
        let watchdog = std::thread::Builder::new()
            .name(format!("weir-{}-watch", stage.as_str()))
            .spawn({
                let (consumer, shared) = (Arc::downgrade(&consumer), shared.clone());
                let stall_after = config.health.stall_after;
                move || watchdog(&consumer, &shared, &stopped, stall_after)
            })
            .context("spawning watchdog thread")?;
        Ok(Source { consumer, shared, rx, stop, thread: Some(thread), watchdog: Some((watchdog_stop, watchdog)) })
    }

    /// The next batch, in partition order; `None` once the source is closed.
    ///
    /// Messages of a partition revoked since the poll thread handed them over are left out: their
    /// offsets could not be stored, and the partition's new owner reads them again (under the
    /// eager protocol a partition revoked and assigned back is read again from its committed
    /// offset, so handing the old copies over would do them twice).
    pub async fn recv(&mut self) -> Option<Vec<Delivery>> {
        loop {
            let batch = self.rx.recv().await?;
            if let Some(batch) = self.accept(batch) {
                return Some(batch);
            }
        }
    }

    /// The next batch if one is already handed over, without waiting: `None` when none is (or
    /// the source is closed, which [`recv`](Self::recv) tells). A stage that orders its work
    /// across batches (the evaluator) takes what is waiting together.
    pub fn try_recv(&mut self) -> Option<Vec<Delivery>> {
        loop {
            let batch = self.rx.try_recv().ok()?;
            if let Some(batch) = self.accept(batch) {
                return Some(batch);
            }
        }
    }

    /// Books a batch taken from the poll thread, and keeps what is still current (see
    /// [`recv`](Self::recv)); `None` if nothing is.
    fn accept(&self, mut batch: Vec<Delivery>) -> Option<Vec<Delivery>> {
        self.shared.received.fetch_add(1, Ordering::Relaxed);
        self.shared.progressed();
        self.shared.wake_poll_thread();
        {
            let tracker = self.shared.tracker.lock().expect("tracker lock");
            batch.retain(|d| tracker.is_current(d.ticket.partition, d.ticket.generation));
        }
        (!batch.is_empty()).then_some(batch)
    }

    /// The work for `ticket` is durable: its offset may be committed once all before it are.
    pub fn done(&self, ticket: &Ticket) {
        self.done_all(std::slice::from_ref(ticket));
    }

    pub(crate) fn done_all(&self, tickets: &[Ticket]) {
        if !tickets.is_empty() {
            self.shared.progressed();
        }
        let mut store = Vec::new();
        {
            let mut tracker = self.shared.tracker.lock().expect("tracker lock");
            for t in tickets {
                if let Some(next) = tracker.complete(t.partition, t.offset, t.generation) {
                    store.push((t.partition, next));
                }
            }
        }
        for (partition, next) in store {
            // rd_kafka_offset_store stores offset + 1, i.e. the next message to read. It fails for
            // a partition revoked in the meantime, which is harmless: the new owner replays it.
            if let Err(e) = self.consumer.store_offset(&self.shared.topic, partition, next - 1) {
                tracing::debug!(stage = self.shared.stage.as_str(), partition, "offset not stored: {e}");
            }
        }
        let now = Instant::now();
        let elapsed: Vec<Duration> = tickets.iter().map(|t| now - t.received).collect();
        Event::Finished { stage: self.shared.stage, elapsed: &elapsed }.emit();
    }

    /// Stops fetching `partition` until [`resume_partition`](Self::resume_partition), while
    /// the others go on: for a stage whose work for one partition piles up. librdkafka drops what
    /// it had prefetched for the partition and fetches again from the next undelivered offset on
    /// resume, so nothing is lost or buffered. Batches already handed over still arrive.
    ///
    /// Made directly on the caller's thread (librdkafka queues the operation), not through the
    /// poll thread, which may be blocked in a poll for a while.
    ///
    /// The hold outlives rebalances: a held partition assigned again is paused again, until the
    /// stage resumes it (see the module docs).
    pub fn pause_partition(&self, partition: i32) {
        let mut state = self.shared.pause.lock().expect("pause lock");
        if state.held.insert(partition) {
            apply(&self.consumer, &self.shared, &mut state, true, [partition]);
        }
    }

    /// Whether the poll thread has paused every assigned partition because the stage has not
    /// taken its batches (backpressure; see the module docs).
    pub fn paused_for_backpressure(&self) -> bool {
        self.shared.all_paused.load(Ordering::Relaxed)
    }

    /// Ends the hold of [`pause_partition`](Self::pause_partition). Also right for a partition
    /// revoked meanwhile: that clears librdkafka's flag, which would otherwise pause it the next
    /// time it is assigned.
    pub fn resume_partition(&self, partition: i32) {
        let mut state = self.shared.pause.lock().expect("pause lock");
        // While the poll thread holds everything it resumes what is not held itself.
        if state.held.remove(&partition) && !self.shared.all_paused.load(Ordering::Relaxed) {
            apply(&self.consumer, &self.shared, &mut state, false, [partition]);
        }
    }

    /// Starts reading `partitions` of a source made with [`assign`](Self::assign), each from the
    /// given offset.
    pub fn add_partitions(&self, partitions: &[(i32, i64)]) -> anyhow::Result<()> {
        let mut tpl = TopicPartitionList::new();
        for (p, offset) in partitions {
            tpl.add_partition_offset(&self.shared.topic, *p, Offset::Offset(*offset))?;
        }
        if let Some(manual) = &self.shared.manual {
            let _tracker = self.shared.tracker.lock().expect("tracker lock");
            manual.lock().expect("manual lock").extend(partitions.iter().map(|(p, _)| *p));
        }
        self.consumer
            .incremental_assign(&tpl)
            .with_context(|| format!("assigning partitions {} of {}", describe(&tpl), self.shared.topic))?;
        self.shared.assignment.send_modify(|a| {
            a.generation += 1;
            a.owned.extend(partitions.iter().map(|(p, _)| *p));
            let generation = a.generation;
            a.assigned_in.extend(partitions.iter().map(|(p, _)| (*p, generation)));
        });
        let fresh: Vec<i32> = partitions.iter().map(|(p, _)| *p).collect();
        reconcile(&self.consumer, &self.shared, &fresh);
        Ok(())
    }

    /// Stops reading `partitions` of a source made with [`assign`](Self::assign): their work
    /// still running stores no offset (as for a revoked partition), and messages not yet handed
    /// over are dropped.
    pub fn remove_partitions(&self, partitions: &[i32]) -> anyhow::Result<()> {
        let mut tpl = TopicPartitionList::new();
        {
            let mut tracker = self.shared.tracker.lock().expect("tracker lock");
            let mut manual = self.shared.manual.as_ref().map(|m| m.lock().expect("manual lock"));
            for p in partitions {
                tracker.forget(*p);
                if manual.as_mut().is_some_and(|m| m.remove(p)) {
                    tpl.add_partition(&self.shared.topic, *p);
                }
            }
        }
        self.shared.assignment.send_modify(|a| {
            a.owned.retain(|p| !partitions.contains(p));
            a.assigned_in.retain(|p, _| !partitions.contains(p));
        });
        if tpl.count() > 0 {
            self.consumer
                .incremental_unassign(&tpl)
                .with_context(|| format!("unassigning partitions {} of {}", describe(&tpl), self.shared.topic))?;
        }
        Ok(())
    }

    /// The owned partitions, updated on every rebalance.
    pub fn assignment(&self) -> watch::Receiver<Assignment> {
        self.shared.assignment.subscribe()
    }

    /// Answers, from any task, whether a ticket's partition is still owned by the assignment that
    /// handed it out: work for a revoked partition is left to its new owner.
    pub(crate) fn ownership(&self) -> Ownership {
        Ownership(self.shared.clone())
    }

    /// Stops polling and leaves the group; librdkafka commits the stored offsets on the way out.
    /// Work taken and not finished is logged as abandoned ([`Event::Abandoned`]).
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.cancel();
        self.rx.close();
        self.shared.wake_poll_thread();
        // What the stage never took (the poll thread's batch, the channel's) is not abandoned
        // work: only messages the stage took and did not finish are reported.
        let mut untaken: BTreeMap<i32, usize> = BTreeMap::new();
        let mut count = |batch: Vec<Delivery>| {
            for d in batch {
                *untaken.entry(d.ticket.partition).or_default() += 1;
            }
        };
        if let Some(t) = self.thread.take() {
            count(t.join().unwrap_or_default());
        }
        while let Ok(batch) = self.rx.try_recv() {
            count(batch);
        }
        let pending = self.shared.tracker.lock().expect("tracker lock").pending_by_partition();
        let abandoned: BTreeMap<i32, usize> = pending
            .into_iter()
            .map(|(p, n)| (p, n.saturating_sub(untaken.get(&p).copied().unwrap_or(0))))
            .filter(|(_, n)| *n > 0)
            .collect();
        if !abandoned.is_empty() {
            let messages = abandoned.values().sum();
            let partitions = abandoned.keys().map(i32::to_string).collect::<Vec<_>>().join(",");
            Event::Abandoned { stage: self.shared.stage, topic: &self.shared.topic, messages, partitions: &partitions }
                .emit();
        }
        // Joined, so it does not hold the consumer (and the group membership) past the close.
        if let Some((stop, t)) = self.watchdog.take() {
            drop(stop);
            let _ = t.join();
        }
    }
}

/// See [`Source::ownership`].
#[derive(Clone)]
pub(crate) struct Ownership(Arc<Shared>);

impl Ownership {
    pub(crate) fn owns(&self, ticket: &Ticket) -> bool {
        self.0.tracker.lock().expect("tracker lock").is_current(ticket.partition, ticket.generation)
    }

    /// Whether `partition` is assigned right now (whichever assignment handed out its work).
    pub(crate) fn owns_partition(&self, partition: i32) -> bool {
        self.0.assignment.borrow().owned.contains(&partition)
    }
}

/// A source dropped without [`Source::close`] (a stage task aborted at the drain deadline, or
/// an early return) closes the same way, so its consumer still commits what was stored and leaves.
impl Drop for Source {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shutdown();
        }
    }
}

impl Shared {
    /// Wakes the poll thread if it waits for room: a batch was taken, or the source is closing.
    fn wake_poll_thread(&self) {
        *self.taken.lock().expect("taken lock") += 1;
        self.room.notify_one();
    }

    fn progressed(&self) {
        self.progress_ms.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn since_progress(&self) -> Duration {
        self.started.elapsed().saturating_sub(Duration::from_millis(self.progress_ms.load(Ordering::Relaxed)))
    }

    fn set_reachable(&self, reachable: bool) {
        if self.reachable.swap(reachable, Ordering::Relaxed) != reachable {
            self.health.set_reachable(reachable);
            let (stage, topic) = (self.stage.as_str(), self.topic.as_str());
            if reachable {
                tracing::info!(stage, topic, "broker reachable again");
            } else {
                tracing::warn!(stage, topic, "broker unreachable; the stage resumes when it is back");
            }
        }
    }
}

/// Polls until `stop`; returns the batch it held and could not hand over.
fn poll_loop(
    consumer: &BaseConsumer<SourceContext>,
    shared: &Shared,
    tx: &mpsc::Sender<Vec<Delivery>>,
    stop: &CancellationToken,
) -> Vec<Delivery> {
    let mut batch: Vec<Delivery> = Vec::new();
    let mut raw: Vec<OwnedMessage> = Vec::with_capacity(BATCH);
    let mut paused = false;
    let mut revokes = shared.revokes.load(Ordering::SeqCst);
    while !stop.is_cancelled() {
        // Wait for the first message only when there is nothing to hand over; then take what
        // librdkafka has already fetched without waiting.
        // While paused, poll anyway (a short wait, so this thread does not spin): polling keeps
        // the group membership and serves rebalances, and returns at most the few messages that
        // were fetched before the pause took effect.
        let mut timeout = match (paused, batch.is_empty()) {
            (true, _) => Duration::from_millis(20),
            (false, true) => Duration::from_millis(100),
            (false, false) => Duration::ZERO,
        };
        let mut fatal = None;
        while paused || batch.len() + raw.len() < BATCH {
            let polled = consumer.poll(timeout);
            // A revocation is served inside `poll`: what was polled before it may belong to a
            // partition this member no longer owns. What `poll` returns after it is current
            // (librdkafka discards what it fetched for a partition it unassigns).
            if shared.revokes.load(Ordering::SeqCst) != revokes {
                revokes = shared.revokes.load(Ordering::SeqCst);
                let gone = std::mem::take(&mut *shared.revoked.lock().expect("revoked lock"));
                raw.retain(|m| !gone.contains(&m.partition()));
                let tracker = shared.tracker.lock().expect("tracker lock");
                batch.retain(|d| tracker.is_current(d.ticket.partition, d.ticket.generation));
            }
            match polled {
                Some(Ok(m)) => raw.push(m.detach()),
                Some(Err(KafkaError::MessageConsumptionFatal(code))) => {
                    fatal = Some(code);
                    break;
                }
                Some(Err(e)) => {
                    Event::Failed { stage: shared.stage, reason: "consume", retryable: true, detail: &e.to_string() }
                        .emit();
                    break;
                }
                None => break,
            }
            timeout = Duration::ZERO;
        }
        if let Some(code) = fatal {
            // The consumer cannot go on (librdkafka says so); the stage ends, and with it the
            // process, whose supervisor starts it again. Nothing is handed over or stored.
            let reason = consumer.client().fatal_error().map(|(_, reason)| reason).unwrap_or_default();
            let hint = match code {
                RDKafkaErrorCode::UnreleasedInstanceId => format!(
                    "the broker still holds a member with instance id {:?} (a process with the same \
                     id that did not exit cleanly, or is still running); it expires after the group's \
                     session timeout (group.consumer.session.timeout.ms), then a restart gets in",
                    shared.instance_id.as_deref().unwrap_or("?")
                ),
                RDKafkaErrorCode::UnsupportedVersion | RDKafkaErrorCode::UnsupportedFeature => {
                    "the broker does not support the KIP-848 consumer group protocol (Kafka 4.0 and \
                     later do); set consumer_groups.protocol: cooperative"
                        .to_string()
                }
                _ => "the consumer cannot continue".to_string(),
            };
            let detail = format!("{}: {code}: {reason}; {hint}", shared.topic);
            Event::Failed { stage: shared.stage, reason: "fatal", retryable: false, detail: &detail }.emit();
            break;
        }
        if !raw.is_empty() {
            Event::Consumed { stage: shared.stage, count: raw.len() }.emit();
            let now = Instant::now();
            let mut tracker = shared.tracker.lock().expect("tracker lock");
            if let Some(manual) = &shared.manual {
                // Polled just before the stage unassigned its partition: not ours to hand over.
                let manual = manual.lock().expect("manual lock");
                raw.retain(|m| manual.contains(&m.partition()));
            }
            batch.extend(raw.drain(..).map(|message| {
                let (partition, offset) = (message.partition(), message.offset());
                let generation = tracker.begin(partition, offset);
                Delivery { message, ticket: Ticket { partition, offset, generation, received: now } }
            }));
        }
        if batch.is_empty() {
            if paused {
                // Paused for a batch the stage had no room for, and that batch is gone: all of it
                // was of partitions revoked since. Nothing waits for room any more, so nothing
                // would resume the partitions (a successful hand-over does): resume them now, or
                // the stage would never be given another record (seen after a scale-out).
                shared.holding.store(false, Ordering::Relaxed);
                set_paused(consumer, shared, false);
                paused = false;
            }
            continue;
        }
        shared.holding.store(true, Ordering::Relaxed);
        match tx.try_send(std::mem::take(&mut batch)) {
            Ok(()) => {
                shared.sent.fetch_add(1, Ordering::Relaxed);
                shared.holding.store(false, Ordering::Relaxed);
                if paused {
                    set_paused(consumer, shared, false);
                    paused = false;
                }
            }
            Err(mpsc::error::TrySendError::Full(back)) if !paused => match wait_for_room(tx, shared, stop, back, STALL)
            {
                Ok(()) => {
                    shared.sent.fetch_add(1, Ordering::Relaxed);
                    shared.holding.store(false, Ordering::Relaxed);
                }
                Err(mpsc::error::TrySendError::Full(back)) => {
                    batch = back;
                    set_paused(consumer, shared, true);
                    paused = true;
                }
                Err(mpsc::error::TrySendError::Closed(back)) => {
                    batch = back;
                    break;
                }
            },
            Err(mpsc::error::TrySendError::Full(back)) => {
                batch = back;
                // Re-pausing every round also covers partitions assigned while paused.
                set_paused(consumer, shared, true);
            }
            Err(mpsc::error::TrySendError::Closed(back)) => {
                batch = back;
                break;
            }
        }
    }
    batch
}

/// How long a full channel is waited on before the partitions are paused.
///
/// A stage is busy for moments all the time (a transaction committing, a burst of produce
/// acknowledgements); pausing for each of them costs a whole fetch round trip, because librdkafka
/// drops what it had prefetched for a paused partition and fetches it again after the resume
/// (measured: the sink and the evaluator ran at a quarter of their speed). So the thread first
/// waits, without polling: librdkafka keeps prefetching into its own bounded queue
/// (`queued.max.messages.kbytes`), rebalances wait at most this long, and only a stage stalled
/// longer (a database down) gets its partitions paused.
const STALL: Duration = Duration::from_millis(1_000);

/// Hands `batch` over as soon as the stage has room, or gives it back after `patience`; `Closed`
/// once the source stops. Sleeps until the stage takes a batch (no polling of the channel), so the
/// hand-over follows at once.
fn wait_for_room(
    tx: &mpsc::Sender<Vec<Delivery>>,
    shared: &Shared,
    stop: &CancellationToken,
    mut batch: Vec<Delivery>,
    patience: Duration,
) -> Result<(), mpsc::error::TrySendError<Vec<Delivery>>> {
    let deadline = Instant::now() + patience;
    loop {
        if stop.is_cancelled() {
            return Err(mpsc::error::TrySendError::Closed(batch));
        }
        // Read before trying, so a batch taken between the try and the wait is not missed.
        let seen = *shared.taken.lock().expect("taken lock");
        match tx.try_send(batch) {
            Err(mpsc::error::TrySendError::Full(back)) => batch = back,
            other => return other,
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(mpsc::error::TrySendError::Full(batch));
        }
        let taken = shared.taken.lock().expect("taken lock");
        let _ = shared.room.wait_timeout_while(taken, deadline - now, |taken| *taken == seen).expect("taken lock");
    }
}

/// Pauses every assigned partition, or resumes those the stage does not hold.
fn set_paused(consumer: &BaseConsumer<SourceContext>, shared: &Shared, pause: bool) {
    let Ok(assignment) = consumer.assignment() else { return };
    let mut state = shared.pause.lock().expect("pause lock");
    shared.all_paused.store(pause, Ordering::Relaxed);
    let partitions = assignment
        .elements()
        .iter()
        .map(|e| e.partition())
        .filter(|p| pause || !state.held.contains(p))
        .collect::<Vec<_>>();
    apply(consumer, shared, &mut state, pause, partitions);
}

/// Makes librdkafka's pause state of the assigned partitions what the stage wants: paused if the
/// stage holds them or everything is paused for backpressure, fetching otherwise. Called on every
/// assignment, because librdkafka carries a pause over from the partition's previous assignment.
///
/// `fresh`, the partitions this assignment added, get the wanted state whatever `applied` says:
/// they have fetched nothing yet, so a pause or resume costs nothing, and it does not matter
/// whether librdkafka kept their old flag through the revocation (eager `assign(NULL)` and
/// incremental `incremental_unassign` are different paths). Partitions kept from before (an
/// incremental protocol leaves them alone) change only where they differ: a pause or resume
/// drops what librdkafka prefetched for them.
fn reconcile(consumer: &BaseConsumer<SourceContext>, shared: &Shared, fresh: &[i32]) {
    let Ok(assignment) = consumer.assignment() else { return };
    let mut state = shared.pause.lock().expect("pause lock");
    let everything = shared.all_paused.load(Ordering::Relaxed);
    let (pause, resume): (Vec<i32>, Vec<i32>) =
        assignment.elements().iter().map(|e| e.partition()).partition(|p| everything || state.held.contains(p));
    let pause: Vec<i32> = pause.into_iter().filter(|p| fresh.contains(p) || !state.applied.contains(p)).collect();
    let resume: Vec<i32> = resume.into_iter().filter(|p| fresh.contains(p) || state.applied.contains(p)).collect();
    let resume_logged: Vec<i32> = resume.iter().copied().filter(|p| state.applied.contains(p)).collect();
    if !resume_logged.is_empty() {
        let list = resume_logged.iter().map(i32::to_string).collect::<Vec<_>>().join(",");
        tracing::info!(
            stage = shared.stage.as_str(),
            partitions = list,
            "resuming partitions paused before the rebalance"
        );
    }
    apply(consumer, shared, &mut state, true, pause);
    apply(consumer, shared, &mut state, false, resume);
}

/// Pauses or resumes `partitions`, under the `pause` lock (`state` is its guard).
fn apply(
    consumer: &BaseConsumer<SourceContext>,
    shared: &Shared,
    state: &mut PauseState,
    pause: bool,
    partitions: impl IntoIterator<Item = i32>,
) {
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition(&shared.topic, p);
    }
    if tpl.count() == 0 {
        return;
    }
    let result = if pause { consumer.pause(&tpl) } else { consumer.resume(&tpl) };
    match result {
        Ok(()) => {
            for e in tpl.elements() {
                if pause {
                    state.applied.insert(e.partition());
                } else {
                    state.applied.remove(&e.partition());
                }
            }
        }
        Err(e) => {
            let detail = format!("partitions {}: {e}", describe(&tpl));
            Event::Failed { stage: shared.stage, reason: "pause", retryable: true, detail: &detail }.emit();
        }
    }
}

/// Where a stage-assigned reader of `partition` of `topic` should start (the offset `group`
/// committed, or the earliest retained when there is none or it was deleted), and how many
/// records each key has from there to the end of the partition as of now. Blocking: it reads
/// that stretch once with a consumer of its own that commits nothing, so a stage taking over a
/// partition learns which keys have work waiting there before it decides where their new work
/// goes (the executor's overflow topic). Memory is one counter per key; fails after `patience`.
pub fn backlog_by_key(
    config: &Config,
    topic: &str,
    group: &str,
    partition: i32,
    patience: Duration,
) -> anyhow::Result<(i64, std::collections::HashMap<Vec<u8>, usize>)> {
    let consumer: BaseConsumer = kafka::consumer_config(config, group)
        .set("enable.auto.commit", "false")
        .create()
        .context("creating Kafka consumer")?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    let committed = consumer
        .committed_offsets(tpl, kafka::METADATA_TIMEOUT)
        .with_context(|| format!("reading the committed offset of {topic}/{partition} for {group}"))?;
    let (low, high) = consumer
        .fetch_watermarks(topic, partition, kafka::METADATA_TIMEOUT)
        .with_context(|| format!("reading the watermarks of {topic}/{partition}"))?;
    let start = match committed.find_partition(topic, partition).map(|e| e.offset()) {
        Some(Offset::Offset(o)) => o.max(low),
        _ => low,
    };
    let mut counts = std::collections::HashMap::new();
    if start >= high {
        return Ok((start, counts));
    }
    let mut from = TopicPartitionList::new();
    from.add_partition_offset(topic, partition, Offset::Offset(start))?;
    consumer.assign(&from).with_context(|| format!("assigning {topic}/{partition}"))?;
    let deadline = Instant::now() + patience;
    let mut next = start;
    while next < high {
        if Instant::now() > deadline {
            anyhow::bail!(
                "reading {topic}/{partition} from {start} to {high} took over {}s (at {next}); retrying",
                patience.as_secs()
            );
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                next = m.offset() + 1;
                *counts.entry(m.key().unwrap_or_default().to_vec()).or_insert(0) += 1;
            }
            Some(Err(e)) => anyhow::bail!("reading {topic}/{partition}: {e}"),
            None => {}
        }
    }
    Ok((start, counts))
}

/// Longest a watchdog's question to the broker (watermarks, committed offsets) may take.
const WATCHDOG_QUERY: Duration = Duration::from_secs(2);

/// The watchdog thread: checks a few times per `stall_after` whether the stage is stalled (see the
/// module docs), until `stopped` disconnects or the consumer is gone.
fn watchdog(
    consumer: &Weak<BaseConsumer<SourceContext>>,
    shared: &Shared,
    stopped: &std_mpsc::Receiver<()>,
    stall_after: Duration,
) {
    let every = (stall_after / 4).clamp(Duration::from_millis(25), Duration::from_secs(5));
    // When the stall was last logged: a stall that goes on is logged again every `stall_after`.
    let mut logged: Option<Instant> = None;
    // When the broker was last asked about an idle stage's lag (see `stall_reason`).
    let mut probed: Option<Instant> = None;
    loop {
        match stopped.recv_timeout(every) {
            Err(std_mpsc::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        let Some(consumer) = consumer.upgrade() else { return };
        let idle = shared.since_progress();
        // Not a liveness problem: a restart would not bring the broker back. `/health/ready`
        // reports it, and the stage goes on once the broker is back.
        let verdict = if idle < stall_after || !shared.reachable.load(Ordering::Relaxed) {
            Some(None)
        } else {
            let may_probe = probed.is_none_or(|at| at.elapsed() >= stall_after);
            stall_reason(&consumer, shared, idle, may_probe, &mut probed)
        };
        drop(consumer);
        match verdict {
            // The broker did not answer the watchdog's questions: nothing to conclude this round.
            None => {}
            Some(None) => {
                logged = None;
                shared.health.set_stalled(None, false);
            }
            Some(Some(stalled)) => {
                let repeat = logged.is_none_or(|at| at.elapsed() >= stall_after);
                if repeat {
                    logged = Some(Instant::now());
                }
                shared.health.set_stalled(Some(stalled), repeat);
            }
        }
    }
}

/// Why a stage idle for `idle` is stalled, as far as its source can tell: `Some(None)` when it has
/// no work waiting (idle, not stalled), `None` when there is nothing to conclude (the broker did
/// not answer, or it was not asked).
///
/// Whether there is work is asked of the broker (the lag); an idle stage with no other sign of
/// work (nothing held, pending or waiting) asks only when `may_probe` (once per `stall_after`),
/// so an idle pipeline does not query its broker every few seconds per partition.
fn stall_reason(
    consumer: &BaseConsumer<SourceContext>,
    shared: &Shared,
    idle: Duration,
    may_probe: bool,
    probed: &mut Option<Instant>,
) -> Option<Option<(&'static str, String)>> {
    let assigned: Vec<i32> = consumer.assignment().ok()?.elements().iter().map(|e| e.partition()).collect();
    let held: Vec<i32> = {
        let state = shared.pause.lock().expect("pause lock");
        assigned.iter().copied().filter(|p| state.held.contains(p)).collect()
    };
    let pending = shared.tracker.lock().expect("tracker lock").pending();
    let queued = shared.sent.load(Ordering::Relaxed).saturating_sub(shared.received.load(Ordering::Relaxed));
    let holding = shared.holding.load(Ordering::Relaxed);
    let all_paused = shared.all_paused.load(Ordering::Relaxed);
    let signs = !held.is_empty() || pending > 0 || queued > 0 || holding || all_paused;
    if !signs && !may_probe {
        return None;
    }
    *probed = Some(Instant::now());
    let lag = match lag(consumer, &shared.topic, &assigned) {
        Ok(lag) => lag,
        Err(e) => {
            tracing::debug!(stage = shared.stage.as_str(), "watchdog: broker did not answer: {e}");
            return None;
        }
    };
    let behind: i64 = lag.values().sum();
    let held_behind: Vec<i32> = held.iter().copied().filter(|p| lag.get(p).is_some_and(|l| *l > 0)).collect();
    let free_behind: Vec<i32> = lag.iter().filter(|(p, l)| **l > 0 && !held.contains(p)).map(|(p, _)| *p).collect();

    let list = |ps: &[i32]| ps.iter().map(i32::to_string).collect::<Vec<_>>().join(",");
    let mut facts = vec![format!("nothing taken or finished for {}s", idle.as_secs())];
    if all_paused {
        facts.push(format!(
            "all assigned partitions ({}) paused for backpressure: the stage does not take batches",
            list(&assigned)
        ));
    }
    if queued > 0 || holding {
        facts.push(format!(
            "{} batch(es) wait for the stage to take them{}",
            queued + u64::from(holding),
            if queued > 0 { "" } else { " (the channel is full)" }
        ));
    }
    if !held.is_empty() {
        facts.push(format!("partitions {} paused by the stage (its work for them is over its bound)", list(&held)));
    }
    if pending > 0 {
        facts.push(format!("{pending} message(s) taken and not finished (their offsets wait)"));
    }
    if behind > 0 {
        facts.push(format!(
            "{behind} message(s) behind on partitions {}",
            list(&lag.iter().filter(|(_, l)| **l > 0).map(|(p, _)| *p).collect::<Vec<_>>())
        ));
    }
    if !free_behind.is_empty() && !all_paused {
        facts.push(format!("partitions {} are behind and not paused by weir, yet deliver nothing", list(&free_behind)));
    }
    let reason = if all_paused {
        "backpressure"
    } else if queued > 0 || holding {
        "not_taking_batches"
    } else if !held_behind.is_empty() {
        "paused_by_stage"
    } else if pending > 0 {
        "offsets_pending"
    } else if !free_behind.is_empty() {
        "not_fetching"
    } else {
        return Some(None);
    };
    Some(Some((reason, facts.join("; "))))
}

/// Messages not yet delivered to the stage, per assigned partition: the high watermark minus the
/// position the stage has read to (or, before it read anything in this assignment, the committed
/// offset, or the low watermark when there is none). Asked of the broker rather than taken from
/// librdkafka's statistics, whose high watermark is only refreshed by fetches, so a paused
/// partition's lag would look frozen.
fn lag(consumer: &BaseConsumer<SourceContext>, topic: &str, assigned: &[i32]) -> KafkaResult<BTreeMap<i32, i64>> {
    let offset_of = |tpl: &TopicPartitionList, p: i32| match tpl.find_partition(topic, p).map(|e| e.offset()) {
        Some(Offset::Offset(o)) => Some(o),
        _ => None,
    };
    let positions = consumer.position()?;
    let mut committed = None;
    let mut lag = BTreeMap::new();
    for &p in assigned {
        let (low, high) = consumer.fetch_watermarks(topic, p, WATCHDOG_QUERY)?;
        let read = match offset_of(&positions, p) {
            Some(o) => o,
            None => {
                if committed.is_none() {
                    committed = Some(consumer.committed(WATCHDOG_QUERY)?);
                }
                committed.as_ref().and_then(|c| offset_of(c, p)).unwrap_or(low)
            }
        };
        lag.insert(p, (high - read.max(low)).max(0));
    }
    Ok(lag)
}
