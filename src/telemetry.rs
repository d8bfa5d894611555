//! Everything a stage reports goes through here, as in Vector's internal events: a stage emits a
//! typed [`Event`], and `emit` is the one place that both logs it and counts it. Dashboards and
//! logs therefore cannot disagree, and metric names live in one file.
//!
//! Metrics (Prometheus names):
//! - `weir_consumed_total{stage}`: records taken from Kafka
//! - `weir_produced_total{stage,topic}`: records acknowledged by the broker
//! - `weir_failed_total{stage,reason,retryable}`: errors, by short reason
//! - `weir_dead_lettered_total{stage}`: records sent to the dead-letter topic
//! - `weir_stage_latency_seconds{stage}`: from taking a record to finishing its work
//! - `weir_consumer_lag{stage,topic,partition}`: messages behind the high watermark (librdkafka
//!   stats); by topic, since one stage reads several (a service's delay tiers)
//! - `weir_sink_rows_total`, `weir_actions_total{service,status}`
//! - `weir_outbound_refused_total{service}`: resolved addresses the network policy refused
//! - `weir_throttle_wait_seconds{service,scope}`: time a call waited for rate-limit permits
//! - `weir_retries_total{service,tier}`: retryable failures sent to a delay topic
//! - `weir_deferred_total{stage,service}`: work over a limit moved to a delay topic: tasks of a
//!   tenant over its own limit (`execute`), runs over a workflow's `runs_per_minute` (`evaluate`)
//! - `weir_delay_requeued_total{service,tier}`: delay-tier records not due within the tier's delay,
//!   moved to the tail of their partition so the records behind them flow (`stages::execute::delay`)
//! - `weir_tenant_backlog{service,priority,tenant}`: a tenant's tasks waiting in the executor (its
//!   lane and the overflow topic) in one priority's reader, `weir_tenant_overflowed_total`,
//!   `weir_tenant_deferred_total` and `weir_tenant_throttled_total{service,priority,tenant}` (tasks
//!   moved to the overflow topic, deferred to a delay topic, calls that waited for the tenant's own
//!   limit), `weir_tenant_calls_total` (calls started) and `weir_tenant_share` (the class's share
//!   of its priority's call slots now, 0 to 1: what `weir status` shows). `tenant` is one of the
//!   `executor.fairness.metrics_top_tenants` most backlogged tenants of that priority, or `other`
//! - `weir_breaker_open{service}`: 1 while a service's circuit breaker is open or half-open
//! - `weir_breaker_state{service,state}`: 1 for the breaker's current state (`closed`, `open`,
//!   `half-open`), 0 for the others; set from the breaker's first change on
//! - `weir_redriven_total`: dead letters re-produced by `weir dlq redrive`
//! - `weir_completed_skipped_total{service}`: tasks not called because their call had already
//!   succeeded (a copy replayed after a crash or a rebalance; `stages::execute::completed`)
//! - `weir_sink_repaired_total`: `failed` rows that a later success replaced (a redrive, a replay)
//! - `weir_retention_partitions_created_total{table}`, `weir_retention_partitions_dropped_total{table}`:
//!   time partitions of the results and run tables made ahead and dropped past `sink.retention.keep`;
//!   `weir_retention_expired_rows_total{table,where}`: rows older than the retention, `where` =
//!   `sink` (a result that arrived for a window already dropped: not written), `default` (deleted
//!   from the default partition) or `ledger` (`run_steps_started`, `run_cancellations`); see
//!   `stages::record::retention`
//! - `weir_replay_events_total`, `weir_replay_tasks_total`, `weir_replay_refused_total`: events read,
//!   tasks re-driven, and tasks not sent because too large, by `weir replay`
//! - `weir_ingest_requests_total{route,status,class}`, `weir_ingest_bytes_total{route}`,
//!   `weir_ingest_events_total{route}` (events acknowledged), `weir_ingest_ack_seconds{route}`
//!   (from the first record handed to the producer to the last acknowledgement),
//!   `weir_ingest_backpressure` (1 while the evaluator's lag is over `ingest.max_lag`) and
//!   `weir_ingest_events_lag`: the HTTP ingest stage (`stages::ingest`)
//! - `weir_stage_stalled{stage,topic,reason}`: 1 while a stage's consumer of `topic` has work
//!   waiting and made no progress for `health.stall_after_ms` (see [`Health`])
//!
//! Health (on the same server as `/metrics`): `GET /health/live` answers 503 with the reasons
//! while any stage is stalled, 200 otherwise; `GET /health/ready` answers 503 while a stage's
//! consumer cannot reach the broker.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex, OnceLock,
    },
    time::Duration,
};

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// A pipeline stage, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    Produce,
    Ingest,
    Evaluate,
    Execute,
    Sink,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Produce => "produce",
            Stage::Ingest => "ingest",
            Stage::Evaluate => "evaluate",
            Stage::Execute => "execute",
            Stage::Sink => "sink",
        }
    }
}

/// Something worth counting happened.
#[derive(Debug)]
pub enum Event<'a> {
    Consumed {
        stage: Stage,
        count: usize,
    },
    Produced {
        stage: Stage,
        topic: &'a str,
        count: usize,
    },
    Failed {
        stage: Stage,
        reason: &'static str,
        retryable: bool,
        detail: &'a str,
    },
    /// A produce the broker refused for a reason that may pass (a restart, a leader moving, an
    /// idempotent producer resetting its sequence) is being tried again.
    ProduceRetried {
        topic: &'a str,
        attempt: u32,
        error: &'a str,
    },
    DeadLettered {
        stage: Stage,
        reason: &'a str,
        topic: &'a str,
        partition: i32,
        offset: i64,
    },
    /// Records done, with the time each spent in the stage (one histogram lookup per batch).
    Finished {
        stage: Stage,
        elapsed: &'a [Duration],
    },
    Lag {
        stage: Stage,
        topic: &'a str,
        partition: i32,
        lag: i64,
    },
    /// A member of `stage`'s group on `topic` was assigned (`kind` "assign") or gave up
    /// ("revoke") `partitions`: with an incremental protocol only those that moved.
    Rebalanced {
        stage: Stage,
        topic: &'a str,
        kind: &'static str,
        partitions: &'a str,
    },
    /// A source closed with `messages` taken and not finished on `partitions` (a drain that ran
    /// out of time, or work a stopping stage leaves queued): their offsets are not stored, so the
    /// partitions' next owner does them again.
    Abandoned {
        stage: Stage,
        topic: &'a str,
        messages: usize,
        partitions: &'a str,
    },
    ActionDone {
        service: &'a str,
        succeeded: bool,
    },
    /// A task past its `expires_after` was recorded `expired` instead of being called.
    Expired {
        service: &'a str,
        tenant: &'a str,
    },
    /// A task of a run cancelled with `weir runs cancel` was recorded `cancelled` instead of
    /// being called.
    CancelledTask {
        service: &'a str,
        tenant: &'a str,
        run_id: &'a str,
    },
    SinkWrote {
        rows: usize,
        elapsed: Duration,
    },
    OutboundRefused {
        service: &'a str,
        host: &'a str,
        addr: std::net::IpAddr,
    },
    Throttled {
        service: &'a str,
        scope: &'static str,
        waited: Duration,
    },
    Retried {
        service: &'a str,
        tier: &'a str,
        attempt: i32,
        reason: &'a str,
    },
    /// Work over a limit moved to a delay topic, to come back when due: in the executor a task of
    /// a tenant over its own limit, in the evaluator a run over its workflow's `runs_per_minute`.
    /// Counted by stage and service (bounded); the tenant is only logged.
    Deferred {
        stage: Stage,
        service: &'a str,
        tenant: &'a str,
        tier: &'a str,
    },
    Breaker {
        service: &'a str,
        state: &'static str,
    },
    /// Bytes a service's calls in flight hold now (of its share of `executor.max_in_flight_bytes`).
    CallMemory {
        service: &'a str,
        reserved: usize,
    },
    /// A call waits for room in its service's share of `executor.max_in_flight_bytes`.
    CallMemoryFull {
        service: &'a str,
        budget: usize,
    },
    /// A delay tier's head, not due within the tier's delay, went to the tail of its partition.
    Requeued {
        service: &'a str,
        tier: &'a str,
    },
    /// A tenant of the executor started (or stopped) sending its tasks to the overflow topic.
    Overflowing {
        service: &'a str,
        tenant: &'a str,
        partition: i32,
        started: bool,
    },
    /// One tenant class of an executor (a top tenant by backlog, or `other`): its backlog now, and
    /// what happened to its tasks since the last report.
    TenantClass {
        service: &'a str,
        /// The priority whose reader counted it: each priority's reader has its own lanes.
        priority: &'a str,
        class: &'a str,
        backlog: usize,
        overflowed: u64,
        deferred: u64,
        throttled: u64,
        /// Calls started since the last report.
        called: u64,
        /// Its share of its priority's call slots in the process now (weights of its tenants with
        /// work over all that priority's tenants' with work; 0 when none has work).
        share: f64,
    },
    Redriven {
        count: usize,
    },
    /// A task was not called: its call had already succeeded.
    SkippedCompleted {
        service: &'a str,
    },
    /// An executor read the results topic's tail for a newly assigned partition.
    CompletedLoaded {
        service: &'a str,
        partition: i32,
        read: usize,
        remembered: usize,
        elapsed: Duration,
    },
    /// The record stage replaced `failed` rows by later successes of the same tasks.
    Repaired {
        rows: usize,
    },
    /// The retention made partition `partition` of `table` for `[from, to)`, moving `moved` rows
    /// of that range out of the default partition into it.
    PartitionCreated {
        table: &'a str,
        partition: &'a str,
        from: &'a str,
        to: &'a str,
        moved: u64,
    },
    /// The retention dropped partition `partition` of `table`: wholly older than `sink.retention.keep`.
    PartitionDropped {
        table: &'a str,
        partition: &'a str,
        to: &'a str,
    },
    /// `rows` rows of `table` older than the retention: results that arrived for a window already
    /// dropped, not written (`at` = "sink"), rows deleted from the default partition (`at` =
    /// "default") or from a table kept whole (`at` = "ledger").
    RetentionExpired {
        table: &'a str,
        at: &'static str,
        rows: u64,
    },
    /// `weir replay` made progress: `events` more read and `tasks` more re-driven (sent to the
    /// action topics) by replay `replay`.
    Replayed {
        replay: &'a str,
        events: u64,
        tasks: u64,
    },
    /// A task `weir replay` could not send for what it is (too large): counted, not sent.
    ReplayRefused {
        replay: &'a str,
        task: &'a str,
        reason: &'a str,
    },
    /// A stage's consumer has work waiting and made no progress for the configured time; `reason`
    /// is a short label, `detail` says what weir knows (see `kafka::source`).
    Stalled {
        stage: Stage,
        topic: &'a str,
        reason: &'static str,
        detail: &'a str,
    },
    /// The ingest stage answered a request (`stages::ingest`): `route` is the source's format,
    /// `class` how the tenant was known (`tenant`: its own credential, `platform`: a platform's,
    /// `none`: refused before), `events` how many it carried and `ack` how long the broker took to
    /// acknowledge them (202 only). A refusal's `reason` is logged, never counted by value.
    IngestAnswered {
        route: &'static str,
        status: u16,
        class: &'static str,
        bytes: usize,
        events: usize,
        ack: Option<Duration>,
        reason: Option<&'a str>,
    },
    /// The ingest stage started or stopped refusing requests because the evaluator is behind.
    IngestBackpressure {
        lag: i64,
        max: i64,
        on: bool,
    },
    /// A stalled consumer moved again.
    Progressing {
        stage: Stage,
        topic: &'a str,
        reason: &'static str,
    },
}

impl Event<'_> {
    pub(crate) fn emit(self) {
        match self {
            Event::Consumed { stage, count } => {
                counter!("weir_consumed_total", "stage" => stage.as_str()).increment(count as u64)
            }
            Event::Produced { stage, topic, count } => {
                counter!("weir_produced_total", "stage" => stage.as_str(), "topic" => topic.to_string())
                    .increment(count as u64)
            }
            Event::Failed { stage, reason, retryable, detail } => {
                // A failing dependency can fail every record: the counter counts them all, the
                // log keeps a few lines per (stage, reason) and says how many it left out.
                match failed_log().admit((stage, reason), std::time::Instant::now()) {
                    Some(0) if retryable => tracing::warn!(stage = stage.as_str(), reason, detail, "retryable failure"),
                    Some(0) => tracing::error!(stage = stage.as_str(), reason, detail, "failure"),
                    Some(suppressed) if retryable => {
                        tracing::warn!(stage = stage.as_str(), reason, detail, suppressed, "retryable failure")
                    }
                    Some(suppressed) => tracing::error!(stage = stage.as_str(), reason, detail, suppressed, "failure"),
                    None => {}
                }
                counter!("weir_failed_total", "stage" => stage.as_str(), "reason" => reason,
                    "retryable" => if retryable { "true" } else { "false" })
                .increment(1)
            }
            Event::ProduceRetried { topic, attempt, error } => {
                // One line per window, whatever the number of records caught in the same outage.
                if let Some(suppressed) = failed_log().admit((Stage::Produce, "retry"), std::time::Instant::now()) {
                    tracing::warn!(topic, attempt, error, suppressed, "producing again");
                }
                counter!("weir_produce_retries_total").increment(1)
            }
            Event::DeadLettered { stage, reason, topic, partition, offset } => {
                tracing::warn!(stage = stage.as_str(), reason, topic, partition, offset, "dead-lettered");
                counter!("weir_dead_lettered_total", "stage" => stage.as_str()).increment(1)
            }
            Event::Finished { stage, elapsed } => {
                let histogram = histogram!("weir_stage_latency_seconds", "stage" => stage.as_str());
                for e in elapsed {
                    histogram.record(e.as_secs_f64());
                }
            }
            Event::Lag { stage, topic, partition, lag } => gauge!("weir_consumer_lag", "stage" => stage.as_str(),
                "topic" => topic.to_string(), "partition" => partition.to_string())
            .set(lag as f64),
            Event::Rebalanced { stage, topic, kind, partitions } => {
                tracing::info!(stage = stage.as_str(), topic, kind, partitions, "rebalance");
                counter!("weir_rebalances_total", "stage" => stage.as_str(), "kind" => kind).increment(1)
            }
            Event::Abandoned { stage, topic, messages, partitions } => {
                tracing::warn!(
                    stage = stage.as_str(),
                    topic,
                    messages,
                    partitions,
                    "stopping with work unfinished: its offsets are not stored, the partitions' next owner does it again"
                );
                counter!("weir_abandoned_total", "stage" => stage.as_str()).increment(messages as u64)
            }
            Event::ActionDone { service, succeeded } => counter!("weir_actions_total",
                "service" => service.to_string(), "status" => if succeeded { "succeeded" } else { "failed" })
            .increment(1),
            Event::Expired { service, tenant } => {
                tracing::info!(service, tenant, "task expired before its call; recorded as expired, not called");
                counter!("weir_actions_total", "service" => service.to_string(), "status" => "expired").increment(1)
            }
            Event::CancelledTask { service, tenant, run_id } => {
                tracing::info!(service, tenant, run_id, "task of a cancelled run; recorded as cancelled, not called");
                counter!("weir_actions_total", "service" => service.to_string(), "status" => "cancelled").increment(1)
            }
            Event::SinkWrote { rows, elapsed } => {
                tracing::debug!(rows, ms = elapsed.as_millis() as u64, "sink batch committed");
                counter!("weir_sink_rows_total").increment(rows as u64)
            }
            Event::OutboundRefused { service, host, addr } => {
                tracing::warn!(service, host, %addr, "outbound address refused by the network policy");
                counter!("weir_outbound_refused_total", "service" => service.to_string()).increment(1)
            }
            Event::Throttled { service, scope, waited } => {
                histogram!("weir_throttle_wait_seconds", "service" => service.to_string(), "scope" => scope)
                    .record(waited.as_secs_f64())
            }
            Event::Retried { service, tier, attempt, reason } => {
                tracing::debug!(service, tier, attempt, reason, "retry scheduled");
                counter!("weir_retries_total", "service" => service.to_string(), "tier" => tier.to_string())
                    .increment(1)
            }
            Event::Deferred { stage, service, tenant, tier } => {
                tracing::debug!(
                    stage = stage.as_str(),
                    service,
                    tenant,
                    tier,
                    "over a limit: deferred to a delay topic"
                );
                counter!("weir_deferred_total", "stage" => stage.as_str(), "service" => service.to_string())
                    .increment(1)
            }
            Event::CallMemory { service, reserved } => {
                gauge!("weir_executor_call_memory_bytes", "service" => service.to_string()).set(reserved as f64)
            }
            Event::CallMemoryFull { service, budget } => {
                tracing::debug!(service, budget, "calls in flight hold all of the service's call memory: a call waits");
                gauge!("weir_executor_call_memory_budget_bytes", "service" => service.to_string()).set(budget as f64);
                counter!("weir_executor_call_memory_waits_total", "service" => service.to_string()).increment(1)
            }
            Event::Breaker { service, state } => {
                tracing::warn!(service, state, "circuit breaker");
                gauge!("weir_breaker_open", "service" => service.to_string()).set(if state == "closed" {
                    0.0
                } else {
                    1.0
                });
                // The state itself, as a state set: 1 for the current state, 0 for the others
                // (what `weir status` shows).
                for s in ["closed", "open", "half-open"] {
                    gauge!("weir_breaker_state", "service" => service.to_string(), "state" => s).set(if s == state {
                        1.0
                    } else {
                        0.0
                    });
                }
            }
            Event::Requeued { service, tier } => {
                tracing::debug!(service, tier, "not due within the tier's delay: re-queued to the tier's tail");
                counter!("weir_delay_requeued_total", "service" => service.to_string(), "tier" => tier.to_string())
                    .increment(1)
            }
            Event::Overflowing { service, tenant, partition, started } => {
                if started {
                    tracing::info!(
                        service,
                        tenant,
                        partition,
                        "tenant over its share: its tasks go to the overflow topic"
                    );
                } else {
                    tracing::info!(service, tenant, partition, "tenant back within its share: overflow drained");
                }
            }
            Event::TenantClass {
                service,
                priority,
                class,
                backlog,
                overflowed,
                deferred,
                throttled,
                called,
                share,
            } => {
                let labels = [
                    ("service", service.to_string()),
                    ("priority", priority.to_string()),
                    ("tenant", class.to_string()),
                ];
                gauge!("weir_tenant_backlog", &labels).set(backlog as f64);
                counter!("weir_tenant_overflowed_total", &labels).increment(overflowed);
                counter!("weir_tenant_deferred_total", &labels).increment(deferred);
                counter!("weir_tenant_throttled_total", &labels).increment(throttled);
                counter!("weir_tenant_calls_total", &labels).increment(called);
                gauge!("weir_tenant_share", &labels).set(share);
            }
            Event::Redriven { count } => {
                tracing::info!(count, "dead letters redriven");
                counter!("weir_redriven_total").increment(count as u64)
            }
            Event::SkippedCompleted { service } => {
                tracing::debug!(service, "task already succeeded: not called again");
                counter!("weir_completed_skipped_total", "service" => service.to_string()).increment(1)
            }
            Event::CompletedLoaded { service, partition, read, remembered, elapsed } => tracing::info!(
                service,
                partition,
                read,
                remembered,
                ms = elapsed.as_millis() as u64,
                "completed tasks read from the results topic"
            ),
            Event::Repaired { rows } => {
                tracing::info!(rows, "failed results replaced by later successes");
                counter!("weir_sink_repaired_total").increment(rows as u64)
            }
            Event::PartitionCreated { table, partition, from, to, moved } => {
                tracing::info!(table, partition, from, to, moved, "retention: partition created");
                counter!("weir_retention_partitions_created_total", "table" => table.to_string()).increment(1)
            }
            Event::PartitionDropped { table, partition, to } => {
                tracing::info!(table, partition, to, "retention: partition dropped (older than sink.retention.keep)");
                counter!("weir_retention_partitions_dropped_total", "table" => table.to_string()).increment(1)
            }
            Event::RetentionExpired { table, at, rows } => {
                tracing::warn!(table, at, rows, "retention: rows older than sink.retention.keep not kept");
                counter!("weir_retention_expired_rows_total", "table" => table.to_string(), "where" => at)
                    .increment(rows)
            }
            Event::Replayed { replay, events, tasks } => {
                tracing::info!(replay, events, tasks, "replay progress");
                counter!("weir_replay_events_total").increment(events);
                counter!("weir_replay_tasks_total").increment(tasks)
            }
            Event::ReplayRefused { replay, task, reason } => {
                tracing::warn!(replay, task, reason, "replay: task not sent");
                counter!("weir_replay_refused_total").increment(1)
            }
            Event::Stalled { stage, topic, reason, detail } => {
                tracing::error!(stage = stage.as_str(), topic, reason, detail, "stage stalled");
                gauge!("weir_stage_stalled", "stage" => stage.as_str(), "topic" => topic.to_string(), "reason" => reason)
                    .set(1.0)
            }
            Event::IngestAnswered { route, status, class, bytes, events, ack, reason } => {
                let status_label = status.to_string();
                counter!("weir_ingest_requests_total", "route" => route, "status" => status_label.clone(), "class" => class)
                    .increment(1);
                counter!("weir_ingest_bytes_total", "route" => route).increment(bytes as u64);
                if let Some(ack) = ack {
                    counter!("weir_ingest_events_total", "route" => route).increment(events as u64);
                    histogram!("weir_ingest_ack_seconds", "route" => route).record(ack.as_secs_f64());
                }
                if let Some(reason) = reason {
                    // A sender retrying a refused request can repeat it many times a second: the
                    // lines are limited like failures', the counter has them all.
                    let key = if status >= 500 { "ingest-unavailable" } else { "ingest-refused" };
                    if let Some(suppressed) = failed_log().admit((Stage::Ingest, key), std::time::Instant::now()) {
                        if status >= 500 {
                            tracing::warn!(route, status, reason, suppressed, "ingest: request refused");
                        } else {
                            tracing::info!(route, status, reason, suppressed, "ingest: request refused");
                        }
                    }
                }
            }
            Event::IngestBackpressure { lag, max, on } => {
                if on {
                    tracing::warn!(lag, max, "ingest: the evaluator is behind by more than ingest.max_lag; answering 503 until it catches up");
                } else {
                    tracing::info!(lag, max, "ingest: the evaluator caught up; accepting requests again");
                }
                gauge!("weir_ingest_backpressure").set(if on { 1.0 } else { 0.0 });
                gauge!("weir_ingest_events_lag").set(lag as f64)
            }
            Event::Progressing { stage, topic, reason } => {
                tracing::info!(stage = stage.as_str(), topic, reason, "stage progressing again");
                gauge!("weir_stage_stalled", "stage" => stage.as_str(), "topic" => topic.to_string(), "reason" => reason)
                    .set(0.0)
            }
        }
    }
}

/// Lines of `Failed` logged per (stage, reason) in each [`FAILED_LOG_WINDOW`]; the rest are only
/// counted (`weir_failed_total` has them all), and the next line logged says how many were left
/// out (`suppressed`).
pub(crate) const FAILED_LOG_LINES: u32 = 10;
pub(crate) const FAILED_LOG_WINDOW: Duration = Duration::from_secs(10);

/// The process's limiter of `Failed` log lines.
fn failed_log() -> &'static LogLimiter {
    static LIMITER: OnceLock<LogLimiter> = OnceLock::new();
    LIMITER.get_or_init(|| LogLimiter::new(FAILED_LOG_LINES, FAILED_LOG_WINDOW))
}

/// Rate limit of log lines per key: `lines` per fixed `window`, counting the lines it refuses.
pub(crate) struct LogLimiter {
    lines: u32,
    window: Duration,
    keys: std::sync::Mutex<std::collections::HashMap<(Stage, &'static str), LogWindow>>,
}

struct LogWindow {
    started: std::time::Instant,
    logged: u32,
    suppressed: u64,
}

impl LogLimiter {
    pub fn new(lines: u32, window: Duration) -> LogLimiter {
        LogLimiter { lines, window, keys: Default::default() }
    }

    /// `Some(n)` if a line of `key` may be logged at `now`, `n` being the lines of `key` refused
    /// since the last one logged; `None` if this one is refused (and counted).
    pub(crate) fn admit(&self, key: (Stage, &'static str), now: std::time::Instant) -> Option<u64> {
        // Keys are (stage, static reason): a handful, so the map cannot grow with the input.
        let mut keys = self.keys.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let w = keys.entry(key).or_insert(LogWindow { started: now, logged: 0, suppressed: 0 });
        if now.saturating_duration_since(w.started) >= self.window {
            (w.started, w.logged) = (now, 0);
        }
        if w.logged < self.lines {
            w.logged += 1;
            Some(std::mem::take(&mut w.suppressed))
        } else {
            w.suppressed += 1;
            None
        }
    }
}

/// Installs the process-wide Prometheus recorder once and returns its handle (rendering the text
/// format). Later calls return the same handle, so tests and the demo can all ask for it.
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0])
                .expect("static buckets are valid")
                .build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was installed first (a host application's); then ours
            // renders nothing, which is the host's choice.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// What one stage's consumer says about itself: whether it reaches the broker, and whether (and
/// why) it is stalled.
#[derive(Debug, Clone)]
struct Report {
    stage: Stage,
    topic: String,
    reachable: bool,
    stalled: Option<(&'static str, String)>,
}

/// The process's liveness and readiness, as the consumers of its stages report them: what
/// `/health/live` and `/health/ready` answer. Each consumer registers a [`Health`] handle; the
/// answer covers every handle alive in the process (a process runs one or more stages).
pub(crate) struct Health {
    id: u64,
}

fn reports() -> &'static Mutex<BTreeMap<u64, Report>> {
    static REPORTS: OnceLock<Mutex<BTreeMap<u64, Report>>> = OnceLock::new();
    REPORTS.get_or_init(Default::default)
}

impl Health {
    /// Registers the consumer of `topic` for `stage`: reachable and not stalled until it says
    /// otherwise (stages start only after the broker answered).
    pub(crate) fn register(stage: Stage, topic: &str) -> Health {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let report = Report { stage, topic: topic.to_string(), reachable: true, stalled: None };
        reports().lock().expect("health lock").insert(id, report);
        Health { id }
    }

    pub(crate) fn set_reachable(&self, reachable: bool) {
        if let Some(r) = reports().lock().expect("health lock").get_mut(&self.id) {
            r.reachable = reachable;
        }
    }

    /// Reports the consumer stalled (with a short reason and what weir knows), or progressing
    /// (`None`). Logs and sets the gauge when the reason changes; a stall that goes on is logged
    /// again by the caller's next report with `repeat`.
    pub(crate) fn set_stalled(&self, stalled: Option<(&'static str, String)>, repeat: bool) {
        let mut reports = reports().lock().expect("health lock");
        let Some(r) = reports.get_mut(&self.id) else { return };
        let before = r.stalled.as_ref().map(|(reason, _)| *reason);
        let now = stalled.as_ref().map(|(reason, _)| *reason);
        if let Some(reason) = before.filter(|b| Some(*b) != now) {
            Event::Progressing { stage: r.stage, topic: &r.topic, reason }.emit();
        }
        if let Some((reason, detail)) = &stalled {
            if before != now || repeat {
                Event::Stalled { stage: r.stage, topic: &r.topic, reason, detail }.emit();
            }
        }
        r.stalled = stalled;
    }

    /// `Err` with one line per stalled consumer while any is stalled.
    pub fn live() -> Result<(), String> {
        let mut body = String::new();
        for r in reports().lock().expect("health lock").values() {
            if let Some((reason, detail)) = &r.stalled {
                let _ = writeln!(body, "stalled: stage {} topic {}: {reason}: {detail}", r.stage.as_str(), r.topic);
            }
        }
        if body.is_empty() {
            Ok(())
        } else {
            Err(body)
        }
    }

    /// `Err` with one line per consumer that cannot reach the broker.
    pub fn ready() -> Result<(), String> {
        let mut body = String::new();
        for r in reports().lock().expect("health lock").values().filter(|r| !r.reachable) {
            let _ = writeln!(body, "broker unreachable: stage {} topic {}", r.stage.as_str(), r.topic);
        }
        if body.is_empty() {
            Ok(())
        } else {
            Err(body)
        }
    }
}

impl Drop for Health {
    fn drop(&mut self) {
        let removed = reports().lock().expect("health lock").remove(&self.id);
        if let Some(Report { stage, topic, stalled: Some((reason, _)), .. }) = removed {
            Event::Progressing { stage, topic: &topic, reason }.emit();
        }
    }
}

fn health_answer(state: Result<(), String>) -> (axum::http::StatusCode, String) {
    match state {
        Ok(()) => (axum::http::StatusCode::OK, "ok\n".to_string()),
        Err(body) => (axum::http::StatusCode::SERVICE_UNAVAILABLE, body),
    }
}

/// Serves `GET /metrics`, `GET /health/live` and `GET /health/ready` (see the module docs) until
/// `shutdown` is cancelled. Returns the bound address (port 0 picks one).
pub async fn serve_metrics(
    addr: SocketAddr,
    shutdown: crate::shutdown::CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let handle = prometheus();
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let handle = handle.clone();
                async move { handle.render() }
            }),
        )
        .route("/health/live", axum::routing::get(|| async { health_answer(Health::live()) }))
        .route("/health/ready", axum::routing::get(|| async { health_answer(Health::ready()) }));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("metrics_addr {addr}: cannot listen: {e}"))?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await;
    });
    Ok((bound, task))
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,librdkafka=warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[test]
    fn failed_lines_are_limited_per_key_and_the_suppressed_are_counted() {
        let limiter = LogLimiter::new(2, Duration::from_secs(10));
        let (t0, commit, consume) = (Instant::now(), (Stage::Sink, "commit"), (Stage::Sink, "consume"));
        assert_eq!(limiter.admit(commit, t0), Some(0));
        assert_eq!(limiter.admit(commit, t0), Some(0));
        assert_eq!(limiter.admit(commit, t0), None);
        assert_eq!(limiter.admit(commit, t0 + Duration::from_secs(9)), None);
        assert_eq!(limiter.admit(consume, t0), Some(0), "another reason has its own budget");
        assert_eq!(limiter.admit((Stage::Execute, "commit"), t0), Some(0), "so has another stage");
        let next = t0 + Duration::from_secs(10);
        assert_eq!(
            limiter.admit(commit, next),
            Some(2),
            "the first line of the next window says how many were left out"
        );
        assert_eq!(limiter.admit(commit, next), Some(0));
        assert_eq!(limiter.admit(commit, next), None);
    }
}
