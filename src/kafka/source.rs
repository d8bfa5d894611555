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
//! ## Offsets
//! Each message comes with a [`Ticket`]. The stage calls [`Source::done`] once the work the
//! message stands for is durable; the [`OffsetTracker`] turns out-of-order completions into the
//! highest safe offset, which is *stored* for librdkafka's background commit. Rebalance hooks in
//! the [`ConsumerContext`] forget revoked partitions so late completions cannot store offsets a
//! new owner relies on.

use std::{
    collections::BTreeSet,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Condvar, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use rdkafka::{
    consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance},
    error::KafkaResult,
    message::OwnedMessage,
    ClientContext, Message, Statistics, TopicPartitionList,
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::{
    config::Config,
    kafka,
    kafka::offsets::OffsetTracker,
    telemetry::{Event, Stage},
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
}

struct Shared {
    stage: Stage,
    topic: String,
    tracker: Mutex<OffsetTracker>,
    /// Partitions the stage asked to pause (see [`Source::pause_partition`]). Every pause and
    /// resume is made under this lock, so the stage's and the poll thread's cannot interleave.
    held: Mutex<BTreeSet<i32>>,
    /// Whether the poll thread paused everything (the stage is behind).
    all_paused: AtomicBool,
    /// Batches the stage has taken, and its signal: what the poll thread waits on when the
    /// channel is full (see [`wait_for_room`]).
    taken: Mutex<u64>,
    room: Condvar,
    assignment: watch::Sender<Assignment>,
}

/// Rebalance hooks and statistics for a source's consumer.
pub struct SourceContext {
    shared: Arc<Shared>,
}

fn describe(tpl: &TopicPartitionList) -> String {
    tpl.elements().iter().map(|e| e.partition().to_string()).collect::<Vec<_>>().join(",")
}

impl ClientContext for SourceContext {
    fn stats(&self, stats: Statistics) {
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
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let mut tracker = self.shared.tracker.lock().expect("tracker lock");
            let mut held = self.shared.held.lock().expect("held lock");
            for e in tpl.elements() {
                tracker.forget(e.partition());
                held.remove(&e.partition());
            }
            self.shared.assignment.send_modify(|a| {
                for e in tpl.elements() {
                    a.owned.remove(&e.partition());
                }
            });
            Event::Rebalanced { stage: self.shared.stage, kind: "revoke", partitions: &describe(tpl) }.emit();
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            // Partitions may have been added since the last look; a failed lookup keeps the count.
            let partitions = kafka::partition_count(consumer.client(), &self.shared.topic).ok();
            self.shared.assignment.send_modify(|a| {
                a.owned.extend(tpl.elements().iter().map(|e| e.partition()));
                if let Some(n) = partitions {
                    a.partitions = n;
                }
            });
            Event::Rebalanced { stage: self.shared.stage, kind: "assign", partitions: &describe(tpl) }.emit();
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
    thread: Option<JoinHandle<()>>,
}

impl Source {
    /// Joins `group` on `topic` (which must exist) and starts polling.
    pub fn subscribe(config: &Config, stage: Stage, topic: &str, group: &str) -> anyhow::Result<Source> {
        let (assignment, _) = watch::channel(Assignment::default());
        let shared = Arc::new(Shared {
            stage,
            topic: topic.to_string(),
            tracker: Mutex::new(OffsetTracker::new()),
            held: Mutex::new(BTreeSet::new()),
            all_paused: AtomicBool::new(false),
            taken: Mutex::new(0),
            room: Condvar::new(),
            assignment,
        });
        let consumer: BaseConsumer<SourceContext> = kafka::consumer_config(config, group)
            .create_with_context(SourceContext { shared: shared.clone() })
            .context("creating Kafka consumer")?;
        let partitions = kafka::partition_count(consumer.client(), topic)?;
        shared.assignment.send_modify(|a| a.partitions = partitions);
        consumer.subscribe(&[topic]).with_context(|| format!("subscribing to {topic}"))?;
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
        Ok(Source { consumer, shared, rx, stop, thread: Some(thread) })
    }

    /// The next batch, in partition order; `None` once the source is closed.
    pub async fn recv(&mut self) -> Option<Vec<Delivery>> {
        let batch = self.rx.recv().await;
        if batch.is_some() {
            self.shared.wake_poll_thread();
        }
        batch
    }

    /// The work for `ticket` is durable: its offset may be committed once all before it are.
    pub fn done(&self, ticket: &Ticket) {
        self.done_all(std::slice::from_ref(ticket));
    }

    pub fn done_all(&self, tickets: &[Ticket]) {
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
    pub fn pause_partition(&self, partition: i32) {
        let mut held = self.shared.held.lock().expect("held lock");
        if held.insert(partition) {
            apply(&self.consumer, &self.shared, true, [partition]);
        }
    }

    pub fn resume_partition(&self, partition: i32) {
        let mut held = self.shared.held.lock().expect("held lock");
        // While the poll thread holds everything it resumes what is not held itself.
        if held.remove(&partition) && !self.shared.all_paused.load(Ordering::Relaxed) {
            apply(&self.consumer, &self.shared, false, [partition]);
        }
    }

    /// The owned partitions, updated on every rebalance.
    pub fn assignment(&self) -> watch::Receiver<Assignment> {
        self.shared.assignment.subscribe()
    }

    /// Answers, from any task, whether a ticket's partition is still owned by the assignment that
    /// handed it out: work for a revoked partition is left to its new owner.
    pub fn ownership(&self) -> Ownership {
        Ownership(self.shared.clone())
    }

    /// Offsets handed out and not yet done.
    pub fn pending(&self) -> usize {
        self.shared.tracker.lock().expect("tracker lock").pending()
    }

    /// Stops polling and leaves the group; librdkafka commits the stored offsets on the way out.
    pub fn close(mut self) {
        self.stop.cancel();
        self.rx.close();
        self.shared.wake_poll_thread();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// See [`Source::ownership`].
#[derive(Clone)]
pub struct Ownership(Arc<Shared>);

impl Ownership {
    pub fn owns(&self, ticket: &Ticket) -> bool {
        self.0.tracker.lock().expect("tracker lock").is_current(ticket.partition, ticket.generation)
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        self.stop.cancel();
        self.shared.wake_poll_thread();
    }
}

impl Shared {
    /// Wakes the poll thread if it waits for room: a batch was taken, or the source is closing.
    fn wake_poll_thread(&self) {
        *self.taken.lock().expect("taken lock") += 1;
        self.room.notify_one();
    }
}

fn poll_loop(
    consumer: &BaseConsumer<SourceContext>,
    shared: &Shared,
    tx: &mpsc::Sender<Vec<Delivery>>,
    stop: &CancellationToken,
) {
    let mut batch: Vec<Delivery> = Vec::new();
    let mut raw: Vec<OwnedMessage> = Vec::with_capacity(BATCH);
    let mut paused = false;
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
        while paused || batch.len() + raw.len() < BATCH {
            match consumer.poll(timeout) {
                Some(Ok(m)) => raw.push(m.detach()),
                Some(Err(e)) => {
                    Event::Failed { stage: shared.stage, reason: "consume", retryable: true, detail: &e.to_string() }
                        .emit();
                    break;
                }
                None => break,
            }
            timeout = Duration::ZERO;
        }
        if !raw.is_empty() {
            Event::Consumed { stage: shared.stage, count: raw.len() }.emit();
            let now = Instant::now();
            let mut tracker = shared.tracker.lock().expect("tracker lock");
            batch.extend(raw.drain(..).map(|message| {
                let (partition, offset) = (message.partition(), message.offset());
                let generation = tracker.begin(partition, offset);
                Delivery { message, ticket: Ticket { partition, offset, generation, received: now } }
            }));
        }
        if batch.is_empty() {
            continue;
        }
        match tx.try_send(std::mem::take(&mut batch)) {
            Ok(()) => {
                if paused {
                    set_paused(consumer, shared, false);
                    paused = false;
                }
            }
            Err(mpsc::error::TrySendError::Full(back)) if !paused => match wait_for_room(tx, shared, stop, back, STALL)
            {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(back)) => {
                    batch = back;
                    set_paused(consumer, shared, true);
                    paused = true;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => break,
            },
            Err(mpsc::error::TrySendError::Full(back)) => {
                batch = back;
                // Re-pausing every round also covers partitions assigned while paused.
                set_paused(consumer, shared, true);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => break,
        }
    }
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
    let held = shared.held.lock().expect("held lock");
    shared.all_paused.store(pause, Ordering::Relaxed);
    let partitions =
        assignment.elements().iter().map(|e| e.partition()).filter(|p| pause || !held.contains(p)).collect::<Vec<_>>();
    apply(consumer, shared, pause, partitions);
}

/// Pauses or resumes `partitions`; call with the `held` lock taken.
fn apply(
    consumer: &BaseConsumer<SourceContext>,
    shared: &Shared,
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
    if let Err(e) = result {
        let detail = format!("partitions {}: {e}", describe(&tpl));
        Event::Failed { stage: shared.stage, reason: "pause", retryable: true, detail: &detail }.emit();
    }
}
