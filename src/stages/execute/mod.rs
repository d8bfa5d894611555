//! Stage 3: call an external service for each action task, and report the outcome.
//!
//! One executor per service reads that service's action topic. A task goes through:
//!
//! 1. [`Lanes`] keyed by tenant: a tenant's tasks start in event order, `tenant_concurrency` at a
//!    time, while other tenants go on. Tasks therefore finish out of partition order; the
//!    [`OffsetTracker`](crate::kafka::offsets::OffsetTracker) commits only below the lowest unfinished.
//! 2. The tenant's own limits ([`throttle`]), *before* taking a concurrency slot: a tenant over
//!    its limit waits without holding what other tenants need. A tenant with more than
//!    `executor.tenant_max_buffered` tasks waiting is deferred to a delay topic instead
//!    ([`delay`]), spaced at its own rate, so it cannot fill the buffer or block its partition.
//! 3. A slot (`concurrency` calls at once per process), the circuit [`breaker`] (while open,
//!    tasks wait), then the global limits (this process's share of them).
//! 4. The [`Connector`]'s call, with an `Idempotency-Key` derived from the task id.
//! 5. Success: a result on the results topic. Retryable failure with attempts left: a copy on a
//!    delay topic (no result, since the coordinator would take it as the step failing). Last
//!    attempt or permanent failure: a dead letter with the reason, attempts and first failure
//!    time, and a failed result.
//!
//! The tenant's lane is freed as soon as the call returns: its next call need not wait for this
//! one's result to be acknowledged. A task's offset is stored only once what step 5 produced is
//! acknowledged, so a crash repeats
//! the call, with the same `Idempotency-Key`, for the service to drop.
//!
//! In-flight work is bounded: `executor.max_buffered` tasks per process until their outcome is
//! durable (past it the stage takes no batches and the source pauses every partition) and
//! `executor.partition_max_buffered` per partition until they are called (a partition over it
//! for [`PAUSE_GRACE`] is paused). Memory stays flat whatever the backlog.

pub mod breaker;
pub mod delay;
pub mod queues;
pub mod throttle;

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use futures::{future::BoxFuture, stream::FuturesUnordered, FutureExt, StreamExt};
use rdkafka::{message::OwnedMessage, producer::FutureProducer, Message};
use tokio::sync::{Notify, Semaphore};

use self::{
    breaker::{Breaker, Verdict},
    queues::Lanes,
    throttle::Throttle,
};
pub use crate::connectors::{CallOutcome, Connector, IDEMPOTENCY_KEY, TENANT_HEADER};
use crate::{
    config::{Config, ServiceConfig},
    envelope::{self, ActionResult, ActionTask, Format, Status},
    kafka,
    kafka::dead_letter::{self, DeadLetters},
    kafka::source::{self, Delivery, Ownership, Source, Ticket},
    shutdown::{self, Shutdown},
    telemetry::{Event, Stage},
};

/// How long a partition may stay over `partition_max_buffered` before it is paused.
const PAUSE_GRACE: Duration = Duration::from_millis(100);

/// A finished piece of work.
struct Finished {
    /// The lane to free: a tenant's next task may start (its call is over).
    lane: Option<Arc<str>>,
    ticket: Ticket,
    /// More to do before the offset may be stored (making the call's outcome durable); it runs
    /// after the lane is freed, so a tenant's next call does not wait for this one's result to
    /// be acknowledged.
    then: Option<BoxFuture<'static, Finished>>,
    /// Which in-flight bounds the task no longer counts towards.
    frees: Frees,
    /// Whether the offset may be stored (`Ok(false)`: dropped, e.g. its partition was revoked).
    stored: Result<bool, rdkafka::error::KafkaError>,
}

impl Finished {
    fn done(
        lane: Option<Arc<str>>,
        frees: Frees,
        ticket: Ticket,
        stored: Result<bool, rdkafka::error::KafkaError>,
    ) -> Self {
        Finished { lane, ticket, then: None, frees, stored }
    }
}

/// The bounds a task taken into the lanes counts towards until it finishes: its partition's
/// (`partition_max_buffered`) until its call returns, the process's (`max_buffered`) until its
/// outcome is durable. A partition's bound is about fairness between partitions (tasks waiting
/// for a tenant or a call); once called, a task only waits for Kafka's acknowledgement, which
/// holds back no partition, so it counts towards the process's bound only and its partition need
/// not be paused (each pause costs a refetch of what librdkafka had prefetched for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frees {
    /// Not in the lanes (a dead letter, a deferral).
    Nothing,
    Partition,
    InFlight,
    Both,
}

struct Job {
    message: OwnedMessage,
    task: ActionTask,
    ticket: Ticket,
}

struct Executor {
    service: String,
    settings: ServiceConfig,
    connector: Arc<dyn Connector>,
    throttle: Throttle,
    breaker: Breaker,
    slots: Semaphore,
    producer: FutureProducer,
    results_topic: String,
    /// (delay in ms, tier name, physical topic) of each delay tier.
    tiers: Vec<(u64, String, String)>,
    dead_letters: DeadLetters,
    ownership: Ownership,
    tenant_max_buffered: usize,
    /// Set on shutdown: tasks still waiting for a permit give up (their offsets are not stored,
    /// so whoever owns the partition next runs them), calls already made finish.
    stopping: AtomicBool,
    stopped: Notify,
}

/// Runs the executor of `service` with its configured connector until `shutdown`.
pub async fn run(config: Arc<Config>, service: String, shutdown: Shutdown) -> anyhow::Result<()> {
    let settings = config.services.get(&service).with_context(|| format!("unknown service {service}"))?;
    let connector = crate::connectors::build(&service, settings, &config.network)?;
    run_with(config, service, connector, shutdown).await
}

/// Runs the executor of `service` with `connector`: the main consumer and one consumer per delay
/// tier, until `shutdown` or the first error.
pub async fn run_with(
    config: Arc<Config>,
    service: String,
    connector: Arc<dyn Connector>,
    mut shutdown: Shutdown,
) -> anyhow::Result<()> {
    let settings = config.services.get(&service).with_context(|| format!("unknown service {service}"))?.clone();
    let producer = kafka::producer(&config)?;
    let (stop, _) = shutdown::channel();
    let mut parts: Vec<BoxFuture<'static, anyhow::Result<()>>> = Vec::new();
    for tier in settings.retry.tier_names() {
        parts.push(delay::run_tier(config.clone(), service.clone(), tier, producer.clone(), stop.subscribe()).boxed());
    }
    parts.push(main_loop(config, service, settings, connector, producer, stop.subscribe()).boxed());
    parts.push(
        async move {
            shutdown.recv().await;
            stop.fire();
            Ok(())
        }
        .boxed(),
    );
    futures::future::try_join_all(parts).await.map(|_| ())
}

async fn main_loop(
    config: Arc<Config>,
    service: String,
    settings: ServiceConfig,
    connector: Arc<dyn Connector>,
    producer: FutureProducer,
    mut shutdown: Shutdown,
) -> anyhow::Result<()> {
    let topic = config.topic(&format!("actions.{service}"));
    let mut source = Source::subscribe(&config, Stage::Execute, &topic, &config.group(&format!("execute-{service}")))?;
    let mut assignment = source.assignment();
    let tiers = settings
        .retry
        .tiers_ms
        .iter()
        .zip(settings.retry.tier_names())
        .map(|(ms, name)| (*ms, name.clone(), config.topic(&format!("actions.{service}.retry.{name}"))))
        .collect();
    let executor = Arc::new(Executor {
        connector,
        throttle: Throttle::new(&service, &settings.limits),
        breaker: Breaker::new(&service, settings.breaker.clone()),
        slots: Semaphore::new(settings.concurrency.unwrap_or(config.executor.concurrency)),
        dead_letters: DeadLetters::new(producer.clone(), config.topic("dlq"), Stage::Execute),
        producer,
        results_topic: config.topic("results"),
        tiers,
        ownership: source.ownership(),
        tenant_max_buffered: config.executor.tenant_max_buffered,
        stopping: AtomicBool::new(false),
        stopped: Notify::new(),
        service,
        settings,
    });
    let limits = &config.executor;
    let mut lanes: Lanes<Job> = Lanes::with_per_key(executor.settings.tenant_concurrency);
    // Per partition: tasks not yet called (see `Frees`), and since when that is over the bound.
    let mut per_partition: HashMap<i32, (usize, Option<Instant>)> = HashMap::new();
    // Tasks taken and not finished: in the lanes, or settling. Per partition: not yet called
    // (see `Frees`).
    let mut in_flight = 0usize;
    // Per tenant being deferred: when its last deferred task is due.
    let mut deferred_until: HashMap<String, u64> = HashMap::new();
    let mut running: FuturesUnordered<BoxFuture<'static, Finished>> = FuturesUnordered::new();
    // Tickets of the completions handled together, stored with one call (one tracker lock).
    let mut durable: Vec<Ticket> = Vec::new();
    let mut tidy = tokio::time::interval(Duration::from_secs(30));
    let release = |source: &Source, per_partition: &mut HashMap<i32, (usize, Option<Instant>)>, partition: i32| {
        let (n, over_since) = per_partition.entry(partition).or_default();
        *n = n.saturating_sub(1);
        if *n < limits.partition_max_buffered {
            *over_since = None;
        }
        // Resume at half the bound, so a busy partition is not paused and resumed on every task.
        if *n <= limits.partition_max_buffered / 2 {
            source.resume_partition(partition);
        }
    };
    let result = loop {
        while let Some((tenant, job)) = lanes.start_next() {
            if executor.ownership.owns(&job.ticket) {
                running.push(executor.clone().execute(tenant, job));
            } else {
                lanes.finish(&tenant);
                in_flight -= 1;
                release(&source, &mut per_partition, job.ticket.partition);
            }
        }
        tokio::select! {
            _ = shutdown.recv() => break Ok(()),
            Some(f) = running.next() => {
                // Take every completion that is ready too: their offsets are stored together.
                let mut next = Some(f);
                let mut failed = None;
                while let Some(f) = next.take() {
                    if let Some(lane) = &f.lane {
                        lanes.finish(lane);
                    }
                    if matches!(f.frees, Frees::Partition | Frees::Both) {
                        release(&source, &mut per_partition, f.ticket.partition);
                    }
                    if matches!(f.frees, Frees::InFlight | Frees::Both) {
                        in_flight -= 1;
                    }
                    if let Some(then) = f.then {
                        running.push(then);
                    } else {
                        match f.stored {
                            Err(e) => {
                                failed = Some(e);
                                break;
                            }
                            Ok(true) => durable.push(f.ticket),
                            Ok(false) => {}
                        }
                    }
                    if durable.len() < source::BATCH {
                        next = running.next().now_or_never().flatten();
                    }
                }
                if !durable.is_empty() {
                    source.done_all(&durable);
                    durable.clear();
                }
                if let Some(e) = failed {
                    break Err(e);
                }
            }
            Ok(()) = assignment.changed() => {
                let a = assignment.borrow_and_update().clone();
                executor.throttle.set_share(a.owned.len(), a.partitions.max(0) as usize);
            }
            batch = source.recv(), if in_flight < limits.max_buffered => match batch {
                Some(batch) => {
                    let now = delay::epoch_ms();
                    let received = Instant::now();
                    for d in batch {
                        let task = match executor.decode(&d.message) {
                            Ok(task) => task,
                            Err(reason) => {
                                running.push(executor.clone().dead_letter(d, reason));
                                continue;
                            }
                        };
                        if let Some(due) = executor.deferral(&d.message, &task, &lanes, &mut deferred_until, now) {
                            running.push(executor.clone().defer(d, due));
                            continue;
                        }
                        let partition = d.ticket.partition;
                        let (n, over_since) = per_partition.entry(partition).or_default();
                        *n += 1;
                        in_flight += 1;
                        if *n >= limits.partition_max_buffered {
                            // librdkafka hands over a partition's messages in runs of thousands, so
                            // a batch often puts one partition over its bound for the moment it
                            // takes to call them; pausing then would throw away its prefetched
                            // messages for nothing. Only a partition still over its bound a while
                            // later, with more of its tasks arriving, is paused.
                            if received.duration_since(*over_since.get_or_insert(received)) >= PAUSE_GRACE {
                                source.pause_partition(partition);
                            }
                        }
                        lanes.push_keyed(Job { message: d.message, task, ticket: d.ticket }, |j| &j.task.tenant);
                    }
                }
                None => break Ok(()),
            },
            _ = tidy.tick() => {
                executor.throttle.forget_idle_tenants();
                let now = delay::epoch_ms();
                deferred_until.retain(|_, due| *due > now);
            }
        }
    };
    // Calls already made finish and report; queued and waiting ones are left for whoever owns the
    // partition next (their offsets were not stored).
    drop(lanes);
    executor.stopping.store(true, Ordering::SeqCst);
    executor.stopped.notify_waiters();
    while let Some(f) = running.next().await {
        if let Some(then) = f.then {
            running.push(then);
        } else if let Ok(true) = f.stored {
            source.done(&f.ticket);
        }
    }
    source.close();
    result.map_err(|e| anyhow::anyhow!("executor {}: producing a result failed: {e}", executor.service))
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

    /// When a task of a tenant over its own limit should be deferred, the time it is due. A
    /// tenant is deferred once it has `tenant_max_buffered` tasks waiting; while it is, its new
    /// tasks are deferred too (behind the earlier ones, each one limit interval later), and a
    /// deferred task that comes back due joins the lane.
    fn deferral(
        &self,
        message: &OwnedMessage,
        task: &ActionTask,
        lanes: &Lanes<Job>,
        deferred_until: &mut HashMap<String, u64>,
        now: u64,
    ) -> Option<u64> {
        if !self.throttle.has_tenant_limits() || self.tiers.is_empty() {
            return None;
        }
        let queued = lanes.queued(&task.tenant);
        let returning = kafka::header_str(message, delay::KIND) == Some("deferral");
        let horizon = deferred_until.get(&task.tenant).copied().filter(|due| *due > now);
        let limit = self.tenant_max_buffered;
        if queued < limit && (returning || horizon.is_none()) {
            return None;
        }
        let step = self.throttle.tenant_backlog_delay(1).as_millis().max(1) as u64;
        let start = horizon.unwrap_or(now + self.throttle.tenant_backlog_delay(queued).as_millis() as u64);
        let due = start + step;
        deferred_until.insert(task.tenant.clone(), due);
        Some(due)
    }

    fn dead_letter(self: Arc<Self>, d: Delivery, reason: String) -> BoxFuture<'static, Finished> {
        Event::Failed { stage: Stage::Execute, reason: "decode", retryable: false, detail: &reason }.emit();
        async move {
            let stored = self.dead_letters.send(&d.message, &reason).await.map(|_| true);
            Finished::done(None, Frees::Nothing, d.ticket, stored)
        }
        .boxed()
    }

    /// Moves a task to the delay tier covering `due`, unchanged (a deferral uses no attempt).
    fn defer(self: Arc<Self>, d: Delivery, due: u64) -> BoxFuture<'static, Finished> {
        async move {
            let wait = Duration::from_millis(due.saturating_sub(delay::epoch_ms()));
            let (_, tier, topic) = &self.tiers[delay::tier_for(&self.settings.retry.tiers_ms, wait)];
            let due = due.to_string();
            let headers = kafka::rewrite_headers(
                &d.message,
                |k| k == delay::KIND || k == delay::DUE,
                &[(delay::KIND, "deferral"), (delay::DUE, &due)],
            );
            let payload = d.message.payload().unwrap_or_default();
            let sent = kafka::send(&self.producer, topic, d.message.key(), payload, headers).await;
            if sent.is_ok() {
                let tenant = d.message.key().map(String::from_utf8_lossy).unwrap_or_default();
                Event::Deferred { service: &self.service, tenant: &tenant, tier }.emit();
            }
            Finished::done(None, Frees::Nothing, d.ticket, sent.map(|_| true))
        }
        .boxed()
    }

    /// Runs `job`, holding the lane of `tenant` until the call returns.
    fn execute(self: Arc<Self>, tenant: Arc<str>, job: Job) -> BoxFuture<'static, Finished> {
        async move {
            let Job { message, task, ticket } = job;
            let estimate = self.connector.estimate_cost(&task);
            // Registered before the flag is read, so a shutdown in between still wakes it.
            let stopped = self.stopped.notified();
            if self.stopping.load(Ordering::SeqCst) {
                return Finished::done(Some(tenant), Frees::Both, ticket, Ok(false));
            }
            let ready = async {
                self.throttle.wait_tenant(&task.tenant, estimate).await;
                let slot = self.slots.acquire().await.expect("the semaphore is never closed");
                let admission = self.breaker.admit().await;
                self.throttle.wait_global(estimate).await;
                (slot, admission)
            };
            let (slot, admission) = tokio::select! {
                ready = ready => ready,
                _ = stopped => return Finished::done(Some(tenant), Frees::Both, ticket, Ok(false)),
            };
            // Waiting may have outlasted the partition's assignment; its new owner calls instead.
            if !self.ownership.owns(&ticket) || self.stopping.load(Ordering::SeqCst) {
                self.breaker.record(admission, Verdict::Neutral);
                return Finished::done(Some(tenant), Frees::Both, ticket, Ok(false));
            }
            let started = Instant::now();
            let outcome = self.connector.call(&task).await;
            let latency = started.elapsed();
            let verdict = match &outcome {
                CallOutcome::Succeeded { .. } => Verdict::Succeeded,
                CallOutcome::Retryable { .. } => Verdict::Failed,
                CallOutcome::Permanent { .. } => Verdict::Neutral,
            };
            self.breaker.record(admission, verdict);
            drop(slot);
            let lane = Some(tenant);
            let settle = async move {
                let stored = self.settle(&message, task, outcome, latency, estimate).await.map(|_| true);
                Finished::done(None, Frees::InFlight, ticket, stored)
            };
            Finished { lane, ticket, then: Some(settle.boxed()), frees: Frees::Partition, stored: Ok(false) }
        }
        .boxed()
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
        let attempts = self.settings.retry.attempts as i32;
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
        let wait =
            delay::backoff(&self.settings.retry, task.attempt, fastrand::f64()).max(retry_after.unwrap_or_default());
        let (_, tier, topic) = &self.tiers[delay::tier_for(&self.settings.retry.tiers_ms, wait)];
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
            |k| k.starts_with("weir.retry.") || k == envelope::CONTENT_TYPE,
            &[
                (envelope::CONTENT_TYPE, Format::Json.content_type()),
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
            task_id: task.task_id,
            run_id: task.run_id,
            event_id: task.event_id,
            tenant: task.tenant,
            workflow_id: task.workflow_id,
            workflow_version: task.workflow_version,
            step_id: task.step_id,
            service: task.service,
            status,
            attempts: task.attempt,
            latency_ms: latency.as_secs_f64() * 1e3,
            http_status: http_status.map(i32::from),
            cost,
            error,
            finished_at: chrono::Utc::now().to_rfc3339(),
            output,
            event: task.event,
        };
        // Bounded before it is produced: a service's oversize answer must not stop the executor.
        let payload = kafka::limits::result_payload(&mut result, kafka::limits::DEFAULT_MAX_RECORD_BYTES);
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
