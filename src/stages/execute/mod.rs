//! Stage 3: call an external service for each action task, and report the outcome.
//!
//! One executor per service reads that service's action topics, one per workflow priority
//! (`actions.<service>`, `.high`, `.low`), each with a reader of its own ([`main_loop`]) that
//! shares the service's connector, limits, breaker and call slots with the others (the slots go to
//! the priorities by weight: [`fair`]). A task goes through:
//!
//! 1. [`Lanes`](queues::Lanes) per tenant and order key: a tenant's tasks with the same order key
//!    (its workflow's `order_by`: the event's subject by default, else the tenant) start one at
//!    a time in event order, up to `tenant_concurrency` of its keys at once, while other tenants
//!    go on. Tasks therefore finish out of partition order; the
//!    [`OffsetTracker`](crate::kafka::offsets::OffsetTracker) commits only below the lowest unfinished.
//! 2. The tenant's own limits ([`throttle`]), *before* taking a concurrency slot: a tenant over
//!    its limit waits without holding what other tenants need. A tenant with more than
//!    `executor.tenant_max_buffered` tasks waiting is deferred to a delay topic instead
//!    ([`delay`]), spaced at its own rate, if it has limits of its own; any other tenant that far
//!    behind overflows ([`overflow`]): its tasks wait in the overflow topic and come back as its
//!    lane has room, so it cannot fill the buffer or hold back its partition-mates.
//! 3. A slot (`concurrency` calls at once per process, handed out by deficit round robin across
//!    tenants with weights: [`fair`]), the circuit [`breaker`] (while open, tasks wait), then the
//!    global limits (this process's share of them).
//! 4. The [`Connector`]'s call, with an `Idempotency-Key` derived from the task id. A task value
//!    no header can carry (a tenant holding CR or LF) fails the call permanently, naming the
//!    header: sending it again would fail the same way.
//! 5. Success: a result on the results topic. Retryable failure with attempts left: a copy on a
//!    delay topic (no result, since the coordinator would take it as the step failing). Last
//!    attempt or permanent failure: a dead letter with the reason, attempts and first failure
//!    time, and a failed result.
//!
//! Before step 2, a task whose call already succeeded (a copy replayed after a crash or a
//! rebalance) is skipped: [`completed`] remembers succeeded tasks, read back from the results
//! topic when a partition is assigned, so a crash repeats only the calls in flight.
//! A task past its `expires_after`, or of a run cancelled with `weir runs cancel` ([`cancelled`]),
//! is not called: it becomes an `expired` or `cancelled` result, checked before step 2 and again
//! just before the call.
//!
//! The tenant's lane is freed as soon as the call returns: its next call need not wait for this
//! one's result to be acknowledged. A task's offset is stored only once what step 5 produced is
//! acknowledged, so a crash repeats a call in flight, with the same `Idempotency-Key`, for the
//! service to drop.
//!
//! In-flight work is bounded: `executor.max_buffered` tasks per process until their outcome is
//! durable (past it the stage takes no batches and the source pauses every partition) and
//! `executor.partition_max_buffered` per partition until they are called (a partition over it
//! for [`PAUSE_GRACE`](in_flight::PAUSE_GRACE) is paused). Memory stays flat whatever the
//! backlog. [`in_flight`] keeps this bookkeeping; the main loop only takes batches, starts calls
//! and books what they came to.

pub mod breaker;
pub mod cancelled;
pub(crate) mod classes;
pub(crate) mod completed;
pub mod delay;
pub(crate) mod fair;
pub(crate) mod in_flight;
pub(crate) mod memory;
pub(crate) mod overflow;
pub(crate) mod queues;
pub mod throttle;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use self::{
    breaker::{Breaker, Verdict},
    cancelled::Cancelled,
    classes::{Classes, Counted},
    completed::Completed,
    fair::{FairSlots, Weights},
    in_flight::{Flow, InFlight},
    memory::CallMemory,
    overflow::{Reader, Route},
    throttle::Throttle,
};
pub use crate::connectors::{CallOutcome, Connector};
use crate::{
    config::{Config, Priority, RetryConfig, ServiceConfig},
    envelope::{self, ActionResult, ActionTask, Format, Status},
    kafka,
    kafka::dead_letter::{self, DeadLetters},
    kafka::source::{self, Delivery, Ownership, Source, Ticket},
    shutdown::CancellationToken,
    telemetry::{Event, Stage},
};
use anyhow::Context as _;
use futures::{future::BoxFuture, stream::FuturesUnordered, FutureExt, StreamExt};
use rdkafka::{error::KafkaError, message::OwnedMessage, producer::FutureProducer, Message};

/// Whether the records for a piece of work reached the broker.
type Produced = Result<(), KafkaError>;

/// Work running for the executor: calls, and records being produced.
type Running = FuturesUnordered<BoxFuture<'static, Step>>;

/// Counts of overflow partitions under way (see [`overflow`]).
use overflow::Scans;

/// A record's ticket, and which source it came from: the action topic or the overflow topic.
#[derive(Debug, Clone, Copy)]
struct Mark {
    ticket: Ticket,
    overflow: bool,
}

/// What a piece of running work came to; the main loop books it.
enum Step {
    /// The call of a task returned: its tenant's next task may start. `settle` makes the outcome
    /// durable; it runs after the lane is freed, so a tenant's next call does not wait for this
    /// one's result to be acknowledged. `throttled`: it waited for its tenant's own limit.
    Called { tenant: Arc<str>, order: u64, partition: i32, throttled: bool, settle: BoxFuture<'static, Step> },
    /// A task taken into the lanes ended without a call (the executor is stopping, or its
    /// partition was revoked while it waited): its offset is not stored, the partition's next
    /// owner calls it.
    GaveUp { tenant: Arc<str>, order: u64, partition: i32 },
    /// A called task's outcome (a result, a retry, or a dead letter and a failed result).
    Settled { mark: Mark, produced: Produced },
    /// A record that never entered the lanes: dead-lettered (undecodable), deferred or overflowed.
    Moved { mark: Mark, produced: Produced },
}

struct Job {
    message: OwnedMessage,
    task: ActionTask,
    /// The hash of the task's order key (see [`queues`]).
    order: u64,
    ticket: Ticket,
    /// Read back from the overflow topic.
    overflow: bool,
}

impl in_flight::Task for Job {
    fn tenant(&self) -> &str {
        &self.task.tenant
    }

    fn partition(&self) -> i32 {
        self.ticket.partition
    }

    fn order(&self) -> u64 {
        self.order
    }
}

/// What one priority's reader of a service runs with. The connector, throttle, breaker, slots and
/// cancelled runs are the service's, shared by its three readers ([`Shared`]); the rest is the
/// reader's own.
struct Executor {
    service: String,
    /// The priority of the action topic this reader reads.
    priority: Priority,
    settings: ServiceConfig,
    connector: Arc<dyn Connector>,
    throttle: Arc<Throttle>,
    breaker: Arc<Breaker>,
    slots: Arc<FairSlots>,
    /// The service's share of the process's memory for calls in flight ([`memory`]).
    memory: CallMemory,
    /// Runs cancelled with `weir runs cancel`: their tasks are recorded `cancelled`, not called.
    cancelled: Arc<Cancelled>,
    producer: FutureProducer,
    results_topic: String,
    /// (delay in ms, tier name, physical topic) of each delay tier.
    tiers: Vec<(u64, String, String)>,
    dead_letters: DeadLetters,
    /// Largest record this executor produces (`limits.max_record_bytes`).
    max_record_bytes: usize,
    ownership: Ownership,
    /// Tasks whose calls already succeeded, which are not called again (see [`completed`]).
    completed: Arc<Completed>,
    /// The overflow topic and its reader's ownership, unless `executor.fairness.overflow` is off.
    overflow: Option<(String, Ownership)>,
    /// Cancelled when the executor stops, or its main loop ends for a reason of its own (a child
    /// of the stage's token): tasks still waiting for a permit give up (their offsets are not
    /// stored, so whoever owns the partition next runs them); calls already made finish.
    calls: CancellationToken,
}

/// Runs the executor of `service` with its configured connector until `shutdown`. `memory` is
/// the service's share of the process's budget for calls in flight.
pub async fn run(
    config: Arc<Config>,
    service: String,
    memory: CallMemory,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let settings = config.services.get(&service).with_context(|| format!("unknown service {service}"))?;
    let connector = crate::connectors::build(&service, settings, &config.network)?;
    run_shared(config, service, connector, memory, shutdown).await
}

/// What the readers of a service's three priorities share: its limits, one connector, one
/// throttle (rate and cost limits), one breaker and one set of call slots (`concurrency`), so a
/// service's limits are not multiplied by its priorities (the slots are handed to the priorities
/// by weight, see [`fair`]); and the cancelled runs ([`cancelled`]).
#[derive(Clone)]
struct Shared {
    connector: Arc<dyn Connector>,
    throttle: Arc<Throttle>,
    breaker: Arc<Breaker>,
    slots: Arc<FairSlots>,
    memory: CallMemory,
    cancelled: Arc<Cancelled>,
}

/// Runs the executor of `service` with `connector`, as the only service of its process (its
/// own `executor.max_in_flight_bytes`): see [`run_shared`].
pub async fn run_with(
    config: Arc<Config>,
    service: String,
    connector: Arc<dyn Connector>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let memory = CallMemory::new(&service, config.executor.max_in_flight_bytes);
    run_shared(config, service, connector, memory, shutdown).await
}

/// Runs the executor of `service` with `connector`: a reader per priority's action topic (each a
/// consumer-group member of its own, see [`main_loop`]) sharing the service's [`Shared`], and one
/// consumer per delay tier, until `shutdown` or the first error.
async fn run_shared(
    config: Arc<Config>,
    service: String,
    connector: Arc<dyn Connector>,
    memory: CallMemory,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let settings = config.services.get(&service).with_context(|| format!("unknown service {service}"))?.clone();
    let producer = kafka::producer(&config)?;
    let cancelled = tokio::task::spawn_blocking({
        let (config, stop) = (config.clone(), shutdown.child_token());
        move || Cancelled::follow(&config, stop)
    })
    .await?
    .with_context(|| format!("executor {service}: reading the cancelled runs"))?;
    let shared = Shared {
        cancelled,
        memory,
        connector,
        throttle: Arc::new(Throttle::new(&service, &settings.limits)),
        breaker: Arc::new(Breaker::new(&service, settings.breaker.clone())),
        slots: Arc::new(FairSlots::new(
            settings.concurrency.unwrap_or(config.executor.concurrency),
            Weights::new(&config.executor.fairness.weights),
            config.executor.priorities,
        )),
    };
    let mut parts: Vec<BoxFuture<'static, anyhow::Result<()>>> = Vec::new();
    for tier in settings.retry.tier_names() {
        parts.push(delay::run_tier(config.clone(), service.clone(), tier, producer.clone(), shutdown.clone()).boxed());
    }
    for priority in Priority::ALL {
        let (config, service, settings) = (config.clone(), service.clone(), settings.clone());
        let reader = main_loop(config, service, priority, settings, shared.clone(), producer.clone(), shutdown.clone());
        parts.push(reader.boxed());
    }
    futures::future::try_join_all(parts).await.map(|_| ())
}

/// The reader of the action topic of one priority: its own consumer group, lanes, in-flight
/// bounds, overflow topic and memory of completed tasks, so a backlog of one priority never holds
/// the buffers or partitions of another, and each topic's offsets are stored only once its own
/// tasks' outcomes are durable.
async fn main_loop(
    config: Arc<Config>,
    service: String,
    priority: Priority,
    settings: ServiceConfig,
    shared: Shared,
    producer: FutureProducer,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let topic = config.names().actions_at(&service, priority);
    let group = config.names().execute_group_at(&service, priority);
    let mut source = Source::subscribe(&config, Stage::Execute, &topic, &group)?;
    let mut assignment = source.assignment();
    let mut reader = match config.executor.fairness.overflow {
        true => Some(Reader::new(config.clone(), &service, priority)?),
        false => None,
    };
    if let Some(r) = &reader {
        let (ours, theirs) = (r.source().assignment().borrow().partitions, assignment.borrow().partitions);
        if ours != theirs {
            anyhow::bail!(
                "{} has {ours} partitions and {topic} {theirs}: they must be equal (an overflow partition is \
                 read by the owner of the action partition of the same number); raise them with `weir topics apply`",
                config.names().overflow_at(&service, priority)
            );
        }
    }
    let tiers = settings
        .retry
        .tiers
        .iter()
        .zip(settings.retry.tier_names())
        .map(|(delay, name)| (delay.as_millis() as u64, name.clone(), config.names().retry(&service, &name)))
        .collect();
    let Shared { connector, throttle, breaker, slots, memory, cancelled } = shared;
    let executor = Arc::new(Executor {
        priority,
        memory,
        cancelled,
        connector,
        throttle,
        breaker,
        slots,
        dead_letters: DeadLetters::new(producer.clone(), config.names().dlq(), Stage::Execute)
            .with_limits(&config.limits),
        max_record_bytes: config.limits.max_record_bytes,
        producer,
        results_topic: config.names().results(),
        tiers,
        ownership: source.ownership(),
        completed: Completed::new(config.clone(), &service, topic.clone()),
        overflow: reader.as_ref().map(|r| (config.names().overflow_at(&service, priority), r.ownership())),
        calls: shutdown.child_token(),
        service,
        settings,
    });
    let mut in_flight: InFlight<Job> = InFlight::new(executor.settings.tenant_concurrency, &config.executor);
    let mut running = Running::new();
    let mut scans = Scans::new();
    let mut classes =
        Classes::new(config.executor.fairness.metrics_top_tenants, Weights::new(&config.executor.fairness.weights));
    let mut tidy = tokio::time::interval(Duration::from_secs(30));
    let mut report = tokio::time::interval(REPORT_EVERY);
    let max_waiting = config.executor.max_buffered;
    let result = loop {
        if let Some(r) = reader.as_mut() {
            // Overflow tasks whose tenants have room again go back into their lanes first.
            let crowded = in_flight.crowded();
            while let Some(d) = r.next_back(|tenant| in_flight.queued(tenant), crowded) {
                let mut stage =
                    Taking { in_flight: &mut in_flight, running: &mut running, source: &source, reader: None };
                executor.take_one(d, true, &mut stage, &mut classes, Instant::now(), delay::epoch_ms());
            }
            r.steer();
        }
        while let Some((tenant, job)) = in_flight.next_call() {
            if executor.owns(&job.ticket, job.overflow) {
                running.push(executor.clone().execute(tenant, job));
            } else {
                steer(&source, in_flight.gave_up(&tenant, job.order, job.ticket.partition));
            }
        }
        let may_take = in_flight.may_take_batch();
        let may_read_overflow = may_take && reader.as_ref().is_some_and(|r| r.waiting() < max_waiting);
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            Some(step) = running.next() => {
                let sources = (&source, reader.as_ref().map(Reader::source));
                if let Err(e) = book(step, &mut running, &mut in_flight, sources, &mut classes) {
                    break Err(e);
                }
            }
            Ok(()) = assignment.changed() => {
                let a = assignment.borrow_and_update().clone();
                // The service's global limits are shared by its priorities: one reader sets this
                // process's share of them, from its topic's assignment (the three topics have
                // the same partitions, and their groups the same members).
                if priority == Priority::Normal {
                    executor.throttle.set_share(a.owned.len(), a.partitions.max(0) as usize);
                }
                if let Some(r) = reader.as_mut() {
                    r.follow(&a, &source, &mut scans);
                }
            }
            Some(counted) = scans.next() => {
                if let Some(r) = reader.as_mut() {
                    let held = r.counted(counted, &source, &mut scans);
                    let mut stage = Taking { in_flight: &mut in_flight, running: &mut running, source: &source, reader: Some(r) };
                    executor.take(held, &mut stage, &mut classes);
                }
            }
            batch = source.recv(), if may_take => match batch {
                Some(batch) => {
                    let mut stage = Taking { in_flight: &mut in_flight, running: &mut running, source: &source, reader: reader.as_mut() };
                    executor.take(batch, &mut stage, &mut classes);
                }
                None => break Ok(()),
            },
            batch = recv_overflow(&mut reader), if may_read_overflow => match batch {
                Some(batch) => reader.as_mut().expect("read from the reader").receive(batch),
                None => break Ok(()),
            },
            _ = tidy.tick() => {
                executor.throttle.forget_idle_tenants();
                in_flight.tidy(delay::epoch_ms());
            }
            _ = report.tick() => {
                let backlogs = in_flight.backlogs().chain(reader.iter().flat_map(|r| r.book.backlogs()));
                for (class, line) in classes.report(backlogs) {
                    Event::TenantClass {
                        service: &executor.service,
                        priority: executor.priority.as_str(),
                        class: &class,
                        backlog: line.backlog,
                        overflowed: line.overflowed,
                        deferred: line.deferred,
                        throttled: line.throttled,
                        called: line.called,
                        share: line.share,
                    }
                    .emit();
                }
            }
        }
    };
    // Calls already made finish and report; tasks queued or waiting for a permit are left for
    // whoever owns the partition next (their offsets were not stored).
    drop(in_flight);
    executor.calls.cancel();
    while let Some(step) = running.next().await {
        match step {
            Step::Called { settle, .. } => running.push(settle),
            Step::Settled { mark, produced: Ok(()) } | Step::Moved { mark, produced: Ok(()) } => {
                match (mark.overflow, reader.as_ref()) {
                    (true, Some(r)) => r.source().done(&mark.ticket),
                    _ => source.done(&mark.ticket),
                }
            }
            _ => {}
        }
    }
    if let Some(r) = reader {
        r.close();
    }
    source.close();
    result.map_err(|e| kafka::produce_lost(&format!("executor {}: producing an outcome", executor.service), e))
}

/// How often the per-tenant class metrics are reported.
const REPORT_EVERY: Duration = Duration::from_secs(5);

/// The next batch of the overflow reader; never, without one.
async fn recv_overflow(reader: &mut Option<Reader>) -> Option<Vec<Delivery>> {
    match reader {
        Some(r) => r.source_mut().recv().await,
        None => std::future::pending().await,
    }
}

/// What taking records needs of the main loop's state.
struct Taking<'a> {
    in_flight: &'a mut InFlight<Job>,
    running: &'a mut Running,
    source: &'a Source,
    /// The overflow reader, when action tasks may be routed to it.
    reader: Option<&'a mut Reader>,
}

/// Books `first` and every other step already finished, and stores the offsets of the tasks now
/// durable with one call per source (one tracker lock), up to a batch of them. An error is a
/// record that could not be produced, which stops the stage. `sources`: the action topic's, and
/// the overflow topic's if it is read.
fn book(
    first: Step,
    running: &mut Running,
    in_flight: &mut InFlight<Job>,
    (source, overflow): (&Source, Option<&Source>),
    classes: &mut Classes,
) -> Produced {
    let (mut durable, mut durable_overflow) = (Vec::new(), Vec::new());
    let mut outcome = Ok(());
    let mut next = Some(first);
    while let Some(step) = next.take() {
        let produced = match step {
            Step::Called { tenant, order, partition, throttled, settle } => {
                if throttled {
                    classes.count(&tenant, Counted::Throttled);
                }
                classes.count(&tenant, Counted::Called);
                steer(source, in_flight.called(&tenant, order, partition));
                running.push(settle);
                None
            }
            Step::GaveUp { tenant, order, partition } => {
                steer(source, in_flight.gave_up(&tenant, order, partition));
                None
            }
            Step::Settled { mark, produced } => {
                in_flight.settled();
                Some((mark, produced))
            }
            Step::Moved { mark, produced } => {
                in_flight.moved();
                Some((mark, produced))
            }
        };
        match produced {
            Some((mark, Ok(()))) if mark.overflow => durable_overflow.push(mark.ticket),
            Some((mark, Ok(()))) => durable.push(mark.ticket),
            Some((_, Err(e))) => {
                outcome = Err(e);
                break;
            }
            None => {}
        }
        if durable.len() + durable_overflow.len() < source::BATCH {
            next = running.next().now_or_never().flatten();
        }
    }
    if !durable.is_empty() {
        source.done_all(&durable);
    }
    if let (false, Some(overflow)) = (durable_overflow.is_empty(), overflow) {
        overflow.done_all(&durable_overflow);
    }
    outcome
}

/// A wait for the tenant's own limit at least this long counts the call as throttled.
const THROTTLED: Duration = Duration::from_millis(1);

/// Pauses or resumes a partition as the bookkeeping says.
fn steer(source: &Source, flow: Flow) {
    match flow {
        Flow::Keep => {}
        Flow::Pause(partition) => source.pause_partition(partition),
        Flow::Resume(partition) => source.resume_partition(partition),
    }
}

impl Executor {
    fn decode(&self, message: &OwnedMessage) -> Result<ActionTask, String> {
        let content_type = kafka::header(message.headers(), envelope::CONTENT_TYPE);
        let task: ActionTask = envelope::decode(message.payload().unwrap_or_default(), content_type)
            .map_err(|e| format!("undecodable task: {e}"))?;
        if task.service != self.service {
            return Err(format!("task for service {:?} on the topic of {:?}", task.service, self.service));
        }
        Ok(task)
    }

    /// Whether work from `ticket` (of the overflow topic if `overflow`) is still this process's
    /// to do. An overflow task is only while its action partition is owned too: the partition
    /// may already be counted out by its next owner, whose reader starts from the last commit.
    fn owns(&self, ticket: &Ticket, overflow: bool) -> bool {
        match (&self.overflow, overflow) {
            (Some((_, reader)), true) => reader.owns(ticket) && self.ownership.owns_partition(ticket.partition),
            (None, true) => false,
            (_, false) => self.ownership.owns(ticket),
        }
    }

    /// Takes a batch of the action topic (see [`take_one`](Self::take_one)).
    fn take(self: &Arc<Self>, batch: Vec<Delivery>, stage: &mut Taking<'_>, classes: &mut Classes) {
        let (received, now) = (Instant::now(), delay::epoch_ms());
        for d in batch {
            self.take_one(d, false, stage, classes, received, now);
        }
    }

    /// Takes a record into its tenant's lane, unless it is undecodable (dead-lettered), its
    /// tenant is being deferred (moved to a delay topic), or its tenant is over its share (moved to
    /// the overflow topic). A record read back from the overflow topic (`from_overflow`) joins its
    /// lane; so does a deferred task coming back due, which must not be moved again. A record of
    /// a partition whose overflow partition is not counted yet waits for the count.
    fn take_one(
        self: &Arc<Self>,
        d: Delivery,
        from_overflow: bool,
        stage: &mut Taking<'_>,
        classes: &mut Classes,
        received: Instant,
        now: u64,
    ) {
        let partition = d.ticket.partition;
        if let Some(reader) = stage.reader.as_deref_mut().filter(|r| !r.is_ready(partition)) {
            // A task of a partition revoked since it was fetched is its next owner's.
            if self.ownership.owns(&d.ticket) {
                reader.hold(d, stage.source);
            }
            return;
        }
        let mark = Mark { ticket: d.ticket, overflow: from_overflow };
        let task = match self.decode(&d.message) {
            Ok(task) => task,
            Err(reason) => {
                stage.in_flight.moving();
                stage.running.push(self.clone().dead_letter(d, mark, reason));
                return;
            }
        };
        if !from_overflow {
            let returning = kafka::header_str(&d.message, delay::KIND) == Some("deferral");
            if let Some(due) = self.deferral(&task, returning, stage.in_flight, now) {
                classes.count(&task.tenant, Counted::Deferred);
                stage.in_flight.moving();
                stage.running.push(self.clone().defer(d, due));
                return;
            }
            // A deferred task coming back due joins its lane rather than being moved again, unless
            // its tenant's earlier tasks wait in the overflow topic: it then queues behind them, or
            // it would be called before them (a run deferred by the evaluator, of a tenant that
            // overflows here).
            let reader = stage.reader.as_deref_mut().filter(|r| !returning || r.book.is_overflowing(&task.tenant));
            if let Some(reader) = reader {
                // The first task of another tenant ends a lone tenant's unbounded lane: what it
                // holds beyond its share goes to the overflow topic now (its latest tasks, in order,
                // its later ones behind them), so that neither the partition nor the process stays
                // full of it while someone else has work.
                let newcomer = reader.book.newcomer(&task.tenant).filter(|(_, p)| self.ownership.owns_partition(*p));
                if let Some((lone, p)) = newcomer {
                    let keep = reader.book.share_of(&lone, p, received, stage.in_flight.crowded());
                    let (evicted, flow) = stage.in_flight.evict(&lone, p, keep);
                    if !evicted.is_empty() && reader.book.evicted(&lone, p, evicted.len()) {
                        Event::Overflowing { service: &self.service, tenant: &lone, partition: p, started: true }
                            .emit();
                    }
                    for job in evicted {
                        classes.count(&lone, Counted::Overflowed);
                        let mark = Mark { ticket: job.ticket, overflow: job.overflow };
                        stage.running.push(self.clone().overflow_message(job.message, mark, &lone));
                    }
                    steer(stage.source, flow);
                }
                let (queued, crowded) = (stage.in_flight.queued(&task.tenant), stage.in_flight.crowded());
                let route = reader.book.route(&task.tenant, partition, queued, received, crowded);
                if let Route::Overflow { started } = route {
                    if started {
                        let tenant = &task.tenant;
                        Event::Overflowing { service: &self.service, tenant, partition, started }.emit();
                    }
                    classes.count(&task.tenant, Counted::Overflowed);
                    stage.in_flight.moving();
                    stage.running.push(self.clone().overflow(d, &task.tenant));
                    return;
                }
            }
        }
        let order = queues::order_hash(task.order_key.as_deref());
        let job = Job { message: d.message, task, order, ticket: d.ticket, overflow: from_overflow };
        steer(stage.source, stage.in_flight.take(job, received));
    }

    /// When a task of a tenant over its own limit should be deferred, the time it is due (see
    /// [`InFlight::deferral`]). Only tenants with limits of their own are, and only when there is
    /// a delay tier to defer them to.
    fn deferral(&self, task: &ActionTask, returning: bool, in_flight: &mut InFlight<Job>, now: u64) -> Option<u64> {
        if !self.throttle.has_tenant_limits() || self.tiers.is_empty() {
            return None;
        }
        in_flight.deferral(&task.tenant, returning, now, |n| self.throttle.tenant_backlog_delay(n))
    }

    fn dead_letter(self: Arc<Self>, d: Delivery, mark: Mark, reason: String) -> BoxFuture<'static, Step> {
        Event::Failed { stage: Stage::Execute, reason: "decode", retryable: false, detail: &reason }.emit();
        async move {
            let produced = self.dead_letters.send(&d.message, &reason).await.map(drop);
            Step::Moved { mark, produced }
        }
        .boxed()
    }

    /// Moves a task of `tenant` to the overflow topic, to the partition of its origin, unchanged.
    /// Handed to the producer now, so a tenant's tasks keep their order there.
    fn overflow(self: Arc<Self>, d: Delivery, tenant: &str) -> BoxFuture<'static, Step> {
        self.overflow_message(d.message, Mark { ticket: d.ticket, overflow: false }, tenant)
    }

    /// [`overflow`](Self::overflow) of a record of either source (`mark` says which: a task
    /// taken out of a lane may have come from the overflow topic already).
    fn overflow_message(self: Arc<Self>, message: OwnedMessage, mark: Mark, tenant: &str) -> BoxFuture<'static, Step> {
        let (topic, _) = self.overflow.as_ref().expect("overflow is on when a task overflows");
        let headers = kafka::rewrite_headers(&message, |_| false, &[]);
        let payload = message.payload().unwrap_or_default();
        let enqueued =
            kafka::enqueue(&self.producer, topic, mark.ticket.partition, Some(tenant.as_bytes()), payload, headers);
        async move {
            let produced = match enqueued {
                Ok(acknowledged) => acknowledged.await,
                Err(e) => Err(e),
            };
            // A failure that may pass (a broker restart) is tried again like any send; the
            // tenant's later tasks, already handed over, may then precede this one in the topic.
            let produced = match produced {
                Err(e) if kafka::may_pass(&self.producer, &e) => {
                    let (topic, _) = self.overflow.as_ref().expect("overflow is on when a task overflows");
                    let (partition, key) = (Some(mark.ticket.partition), message.key());
                    let headers = kafka::rewrite_headers(&message, |_| false, &[]);
                    let payload = message.payload().unwrap_or_default();
                    kafka::send_to(&self.producer, topic, partition, key, payload, headers).await.map(drop)
                }
                produced => produced,
            };
            Step::Moved { mark, produced }
        }
        .boxed()
    }

    /// Moves a task to the delay tier covering `due`, unchanged (a deferral uses no attempt).
    fn defer(self: Arc<Self>, d: Delivery, due: u64) -> BoxFuture<'static, Step> {
        async move {
            let wait = Duration::from_millis(due.saturating_sub(delay::epoch_ms()));
            let (_, tier, topic) = &self.tiers[delay::tier_for(&self.settings.retry.tiers, wait)];
            let headers = kafka::deferral::deferral_headers(Some(&d.message), due, None, self.priority);
            let payload = d.message.payload().unwrap_or_default();
            let sent = kafka::send(&self.producer, topic, d.message.key(), payload, headers).await;
            if sent.is_ok() {
                let tenant = d.message.key().map(String::from_utf8_lossy).unwrap_or_default();
                Event::Deferred { stage: Stage::Execute, service: &self.service, tenant: &tenant, tier }.emit();
            }
            Step::Moved { mark: Mark { ticket: d.ticket, overflow: false }, produced: sent.map(drop) }
        }
        .boxed()
    }

    /// Runs `job`, holding the lane of `tenant` until the call returns.
    fn execute(self: Arc<Self>, tenant: Arc<str>, job: Job) -> BoxFuture<'static, Step> {
        async move {
            let Job { message, task, order, ticket, overflow } = job;
            let partition = ticket.partition;
            // A task whose call already succeeded (a copy replayed after a crash or a rebalance)
            // is done: its result is on the results topic, so its offset is stored without a call.
            let done = tokio::select! {
                biased;
                _ = self.calls.cancelled() => return Step::GaveUp { tenant, order, partition },
                done = self.completed.succeeded(&ticket, overflow, &task.task_id) => done,
            };
            if done {
                let settle = async move { Step::Settled { mark: Mark { ticket, overflow }, produced: Ok(()) } };
                return Step::Called { tenant, order, partition, throttled: false, settle: settle.boxed() };
            }
            // A task past its `expires_after`, or of a cancelled run, is not worth calling (nor
            // waiting for a slot): it becomes an `expired` or `cancelled` result, as it would at
            // the call below.
            if let Some(end) = self.uncalled(&task) {
                return self.end_uncalled((tenant, order), task, ticket, overflow, end);
            }
            let estimate = self.connector.estimate_cost(&task);
            let ready = async {
                let asked = Instant::now();
                self.throttle.wait_tenant(&task.tenant, estimate).await;
                let throttled = self.throttle.has_tenant_limits() && asked.elapsed() >= THROTTLED;
                let slot = self.slots.acquire(self.priority, &task.tenant).await;
                let size = message.payload().map_or(0, <[u8]>::len);
                let room = self.memory.reserve(CallMemory::call_bytes(size, self.settings.response_limit())).await;
                let admission = self.breaker.admit().await;
                self.throttle.wait_global(estimate).await;
                ((slot, room), admission, throttled)
            };
            let (slot, admission, throttled) = tokio::select! {
                // First, so that a task started after the executor began stopping does not wait.
                biased;
                _ = self.calls.cancelled() => return Step::GaveUp { tenant, order, partition },
                ready = ready => ready,
            };
            // Waiting may have outlasted the partition's assignment; its new owner calls instead.
            if !self.owns(&ticket, overflow) || self.calls.is_cancelled() {
                self.breaker.record(admission, Verdict::Neutral);
                return Step::GaveUp { tenant, order, partition };
            }
            // It may have expired, or its run been cancelled, while it waited for its limits and
            // a slot.
            if let Some(end) = self.uncalled(&task) {
                self.breaker.record(admission, Verdict::Neutral);
                drop(slot);
                return self.end_uncalled((tenant, order), task, ticket, overflow, end);
            }
            let started = Instant::now();
            let outcome = match self.step_timeout(&task) {
                // The step asked for less time than the service's client allows: the call is
                // abandoned (its request dropped) at the step's timeout, a retryable failure like
                // the client's own timeout.
                Some(timeout) => tokio::time::timeout(timeout, self.connector.call(&task)).await.unwrap_or_else(|_| {
                    CallOutcome::Retryable {
                        reason: format!("timed out after {} ms (the step's timeout_ms)", timeout.as_millis()),
                        http_status: None,
                        retry_after: None,
                    }
                }),
                None => self.connector.call(&task).await,
            };
            let latency = started.elapsed();
            self.completed.called(&task.task_id, matches!(outcome, CallOutcome::Succeeded { .. }));
            let verdict = match &outcome {
                CallOutcome::Succeeded { .. } => Verdict::Succeeded,
                CallOutcome::Retryable { .. } => Verdict::Failed,
                CallOutcome::Permanent { .. } => Verdict::Neutral,
            };
            self.breaker.record(admission, verdict);
            // The slot (and the call's memory) is held until the outcome is durable, not only while the call runs: a call
            // counts as in flight until a crash can no longer make it be called again, so
            // `concurrency` bounds the calls a crash repeats (docs/recovery.md).
            let settle = async move {
                let produced = self.settle(&message, task, outcome, latency, estimate).await;
                drop(slot);
                Step::Settled { mark: Mark { ticket, overflow }, produced }
            };
            Step::Called { tenant, order, partition, throttled, settle: settle.boxed() }
        }
        .boxed()
    }

    /// Why `task` must not be called now, if it must not: it is past its `expires_after`, or its
    /// run was cancelled. A result with the status and the reason ends it.
    fn uncalled(&self, task: &ActionTask) -> Option<(Status, String)> {
        if expired(task) {
            let at = task.expires_at.map(|t| t.to_rfc3339()).unwrap_or_default();
            Event::Expired { service: &self.service, tenant: &task.tenant }.emit();
            return Some((Status::Expired, format!("expired at {at} before it was called (expires_after)")));
        }
        let reason = self.cancelled.reason(&task.run_id)?;
        Event::CancelledTask { service: &self.service, tenant: &task.tenant, run_id: &task.run_id }.emit();
        Some((Status::Cancelled, format!("run cancelled: {reason} (before this step was called)")))
    }

    /// Ends `job` without a call, with the result [`uncalled`](Self::uncalled) decided. The
    /// result frees the lane at once.
    fn end_uncalled(
        self: Arc<Self>,
        (tenant, order): (Arc<str>, u64),
        task: ActionTask,
        ticket: Ticket,
        overflow: bool,
        (status, reason): (Status, String),
    ) -> Step {
        let partition = ticket.partition;
        let settle = async move {
            let produced = self.send_result(task, status, None, Some(reason), None, None, Duration::ZERO).await;
            Step::Settled { mark: Mark { ticket, overflow }, produced }
        };
        Step::Called { tenant, order, partition, throttled: false, settle: settle.boxed() }
    }

    /// The step's own timeout, when it is shorter than the service's (the client's timeout
    /// bounds every call already; a step cannot lengthen it).
    fn step_timeout(&self, task: &ActionTask) -> Option<Duration> {
        let own = Duration::from_millis(task.timeout_ms?);
        (own < self.settings.timeout).then_some(own)
    }

    /// The retry policy of `task`: the service's, narrowed by the step's own `retry` (no more
    /// attempts than the service allows, the first backoff within its longest).
    fn retry_policy(&self, task: &ActionTask) -> std::borrow::Cow<'_, RetryConfig> {
        match task.retry {
            None => std::borrow::Cow::Borrowed(&self.settings.retry),
            Some(own) => std::borrow::Cow::Owned(RetryConfig {
                attempts: own.attempts.clamp(1, self.settings.retry.attempts),
                initial_backoff: Duration::from_millis(own.backoff_ms).min(self.settings.retry.max_backoff),
                ..self.settings.retry.clone()
            }),
        }
    }

    /// Makes the outcome of a call durable: a result, a delayed retry, or a dead letter and a
    /// failed result.
    async fn settle(
        &self,
        message: &OwnedMessage,
        task: ActionTask,
        outcome: CallOutcome,
        latency: Duration,
        estimate: u64,
    ) -> Result<(), rdkafka::error::KafkaError> {
        let attempts = self.retry_policy(&task).attempts as i32;
        match outcome {
            CallOutcome::Succeeded { http_status, output, cost } => {
                if let Some(reported) = cost {
                    self.throttle.charge_extra(&task.tenant, estimate, reported).await;
                }
                Event::ActionDone { service: &self.service, succeeded: true }.emit();
                let cost = cost.or(Some(estimate));
                self.send_result(task, Status::Succeeded, http_status, None, output, cost, latency).await
            }
            CallOutcome::Retryable { reason, retry_after, .. } if task.attempt < attempts => {
                self.retry(message, &task, &reason, retry_after).await
            }
            CallOutcome::Retryable { reason, http_status, .. } | CallOutcome::Permanent { reason, http_status } => {
                // Retryable or not, this task is out of attempts: a final failure.
                Event::Failed { stage: Stage::Execute, reason: "call", retryable: false, detail: &reason }.emit();
                let attempt = task.attempt.to_string();
                let now = chrono::Utc::now().to_rfc3339();
                let first = kafka::header_str(message, delay::FIRST_FAILURE).unwrap_or(&now).to_string();
                self.dead_letters
                    .send_with(
                        message,
                        &reason,
                        &[(dead_letter::ATTEMPTS, &attempt), (dead_letter::FIRST_FAILURE, &first)],
                    )
                    .await?;
                Event::ActionDone { service: &self.service, succeeded: false }.emit();
                self.send_result(task, Status::Failed, http_status, Some(reason), None, None, latency).await
            }
        }
    }

    /// Sends the task, its attempt counted up, to the delay tier covering its backoff.
    async fn retry(
        &self,
        message: &OwnedMessage,
        task: &ActionTask,
        reason: &str,
        retry_after: Option<Duration>,
    ) -> Result<(), rdkafka::error::KafkaError> {
        let policy = self.retry_policy(task);
        let wait = delay::backoff(&policy, task.attempt, fastrand::f64()).max(retry_after.unwrap_or_default());
        let (_, tier, topic) = &self.tiers[delay::tier_for(&self.settings.retry.tiers, wait)];
        let next = ActionTask { attempt: task.attempt + 1, ..task.clone() };
        let payload = serde_json::to_vec(&next).expect("a task always serializes");
        let (due, attempt, now) = (
            (delay::epoch_ms() + wait.as_millis() as u64).to_string(),
            next.attempt.to_string(),
            chrono::Utc::now().to_rfc3339(),
        );
        let first = kafka::header_str(message, delay::FIRST_FAILURE).unwrap_or(&now).to_string();
        let reason: String = reason.chars().take(500).collect();
        let headers = kafka::rewrite_headers(
            message,
            |k| k.starts_with("weir.retry.") || k == envelope::CONTENT_TYPE || k == kafka::deferral::PRIORITY,
            &[
                (envelope::CONTENT_TYPE, Format::Json.content_type()),
                // Back to this reader's topic when due.
                (kafka::deferral::PRIORITY, self.priority.as_str()),
                (delay::KIND, "retry"),
                (delay::DUE, &due),
                (delay::ATTEMPT, &attempt),
                (delay::FIRST_FAILURE, &first),
                (delay::LAST_ERROR, &reason),
            ],
        );
        kafka::send(&self.producer, topic, Some(task.tenant.as_bytes()), &payload, headers).await?;
        Event::Retried { service: &self.service, tier, attempt: task.attempt, reason: &reason }.emit();
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn send_result(
        &self,
        task: ActionTask,
        status: Status,
        http_status: Option<u16>,
        error: Option<String>,
        output: Option<serde_json::Value>,
        cost: Option<u64>,
        latency: Duration,
    ) -> Result<(), rdkafka::error::KafkaError> {
        // The task is finished with: its fields move into the result rather than being copied.
        let mut result = ActionResult {
            http_status: http_status.map(i32::from),
            cost,
            error,
            output,
            ..ActionResult::from_task(task, status, latency)
        };
        // Bounded before it is produced: a service's oversize answer must not stop the executor.
        let payload = kafka::limits::result_payload(&mut result, self.max_record_bytes);
        kafka::send(
            &self.producer,
            &self.results_topic,
            Some(result.tenant.as_bytes()),
            &payload,
            kafka::content_headers(Format::Json),
        )
        .await?;
        Event::Produced { stage: Stage::Execute, topic: &self.results_topic, count: 1 }.emit();
        Ok(())
    }
}

/// Whether `task` is past its `expires_at`, now.
fn expired(task: &ActionTask) -> bool {
    task.expires_at.is_some_and(|at| at <= chrono::Utc::now())
}
