//! Stage 4, the record stage: records results in PostgreSQL and advances multi-step runs.
//!
//! Every result is written into `action_results` in batches, idempotently. A result of a
//! multi-step run also advances its run in the same transaction ([`runs`], deciding with the
//! engine's planner, [`crate::engine::plan`]): the run's state is updated, and the next steps'
//! tasks are produced to `actions.<service>` and acknowledged before the commit. So results flow
//! back into the action topics from here: the loop evaluate → execute → record → execute … runs
//! until the run finishes. (The stage was called "the sink"; its config section, consumer group
//! and metrics label still say `sink`.)
//!
//! - [`rows`]: a result as a row (decoding, the batch's columns, the INSERT, U+0000 in data).
//! - [`runs`]: run state in SQL.
//! - [`retention`]: the tables' time partitions, made ahead and dropped past `sink.retention.keep`.
//! - this module: the stage's loop, its writers, and what happens when a write fails.
//!
//! ## Writers: several transactions in flight
//! Each transaction waits for PostgreSQL's commit (with `synchronous_commit` on: the WAL flush,
//! which is what makes storing the offset afterwards safe) and for the broker's acknowledgements
//! of a multi-step run's next steps. One transaction at a time leaves the database and this
//! process idle for most of that wait, so the stage runs `sink.transactions` *writers*, each with
//! its own connection, and hands every writer the results of a fixed share of the partitions
//! (partition modulo the number of writers). A partition's batches are thus written in order, one
//! at a time, and because results are keyed by tenant (the executor produces them with the
//! tenant as key, and this stage produces next steps the same way) all results of a run reach
//! the same writer: two writers never advance one run at once. (They would still be correct if
//! they did: [`runs`] locks the run's row and reads the results after the lock.) While a writer
//! commits, its queue already holds the next batch and the other writers write theirs.
//!
//! ## A batch
//! A writer's batch is whatever is queued, topped up for at most `sink.linger`, up to
//! `sink.batch_size` rows. It is written by one `INSERT … SELECT FROM UNNEST(…)` (one round trip
//! for the whole batch) with `ON CONFLICT (task_id, run_at) DO NOTHING`, so results replayed after
//! a crash are ignored (`run_at`, the partition key, is the same on every copy of a result: see
//! [`retention`]). A later outcome that changes the task's row is the exception: a `succeeded` result
//! of a task whose row says `failed` (a dead letter redriven, a replay, after the service was
//! fixed) replaces the row (never the reverse), and reopens its run so that the steps waiting for
//! it start ([`runs`]). Offsets are stored only after the transaction commits: the writer hands its
//! tickets back to the stage's task, which owns the source; the source's offset tracker accepts
//! the writers' completions in any order and stores an offset only once everything below it is
//! done.
//!
//! ## When a write fails: outages and data errors
//! - **An outage** (the database unreachable, a connection lost, the server shutting down, a
//!   serialization failure — anything but the data errors below): the writer holds its batch and
//!   retries with backoff (100 ms → 5 s), saying why each time, naming the database's host:port
//!   and the connection's own error. Its queue fills, the stage stops taking batches (so the
//!   source pauses its partitions), no offsets are stored, and the writers pick up where they
//!   were once the database answers.
//! - **A data error** is permanent for the rows that cause it: SQLSTATE classes 22 (data
//!   exception: invalid text such as U+0000 in a key column, a value out of range), 23 (integrity
//!   constraint violation) and 54 (program limit exceeded: a key too long for its index), a value
//!   that cannot be encoded, or a next step's task the broker refuses as too large. Retrying
//!   would fail the same way forever, so the writer splits the batch in halves and writes each
//!   on its own, recursively, until the rows that fail are alone; each goes to the dead-letter
//!   topic with the reason and the SQLSTATE (header `weir.error.sqlstate`), and every other row
//!   commits. Offsets then advance past all of them.
//!
//! A record that is not a result at all (undecodable) goes to the dead-letter topic before the
//! batch is written. Body data PostgreSQL cannot store (U+0000) is rewritten rather than refused:
//! see [`rows`].

pub mod retention;
pub mod rows;
pub mod runs;

use std::{ops::Range, sync::Arc, time::Duration};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use rdkafka::{
    error::{KafkaError, RDKafkaErrorCode},
    message::OwnedMessage,
    producer::FutureProducer,
    Message,
};
use sqlx::{postgres::PgPoolOptions, Connection as _, PgPool};
use tokio::sync::mpsc;

pub use self::rows::{decode_row, Columns, COLUMNS};
use crate::{
    config::Config,
    engine::definitions::DefinitionStore,
    envelope::{self, ActionResult, Format},
    kafka,
    kafka::dead_letter::DeadLetters,
    kafka::source::{self, Delivery, Source, Ticket},
    shutdown::CancellationToken,
    stages::record::{retention::Window, runs::Coordinator},
    telemetry::{Event, Stage},
};

/// Dead-letter header: the SQLSTATE PostgreSQL refused a row with.
pub const SQLSTATE: &str = "weir.error.sqlstate";

/// Opens a pool without connecting: the stage must start (and wait) while the database is down.
pub fn pool(config: &Config) -> anyhow::Result<PgPool> {
    pool_of(config, config.sink.pool_size)
}

/// [`pool`] with `connections` at most.
fn pool_of(config: &Config, connections: u32) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy(&config.database_url)
        .context("database_url is not a valid PostgreSQL URL")
}

/// Creates or upgrades the tables (sqlx migrations in `migrations/`, compiled in). An unreachable
/// database is named with its host:port and why connecting fails.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    // Connecting first, for the error: the migrator would only say the pool timed out.
    if let Err(e) = pool.acquire().await {
        anyhow::bail!("{}", describe(pool, &e).await);
    }
    sqlx::migrate!("./migrations").run(pool).await.context("running database migrations")
}

/// A database error for the log: the database's host:port and the error; when the pool only
/// says it timed out waiting for a connection (it retries refused connections until then), why a
/// connection cannot be opened.
pub(crate) async fn describe(pool: &PgPool, e: &sqlx::Error) -> String {
    let options = pool.connect_options();
    let at = format!("{}:{}", options.get_host(), options.get_port());
    if !matches!(e, sqlx::Error::PoolTimedOut) {
        return format!("database at {at}: {e}");
    }
    let why = match tokio::time::timeout(Duration::from_secs(5), sqlx::PgConnection::connect_with(&options)).await {
        Ok(Err(cause)) => cause.to_string(),
        Ok(Ok(db)) => {
            let _ = db.close().await;
            format!("{e} (a new connection succeeds: the pool's connections are all busy)")
        }
        Err(_) => "no answer to a connection attempt within 5 s".into(),
    };
    format!("database at {at} unreachable: {why}")
}

/// Why a batch could not be written.
#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error("{0}")]
    Database(#[from] sqlx::Error),
    #[error("producing next steps: {0}")]
    Kafka(#[from] KafkaError),
}

/// What a failed write means for the batch.
#[derive(Debug, PartialEq)]
enum Fault {
    /// Permanent for the rows that cause it: isolate them. The SQLSTATE when PostgreSQL gave one.
    Data(Option<String>),
    /// The database or broker is unavailable: hold the batch and retry.
    Outage,
}

impl WriteError {
    fn fault(&self) -> Fault {
        match self {
            WriteError::Database(sqlx::Error::Database(e)) => match e.code() {
                Some(code) if is_data_error(&code) => Fault::Data(Some(code.into_owned())),
                _ => Fault::Outage,
            },
            WriteError::Database(sqlx::Error::Encode(_)) => Fault::Data(None),
            WriteError::Kafka(KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge)) => {
                Fault::Data(None)
            }
            WriteError::Database(_) | WriteError::Kafka(_) => Fault::Outage,
        }
    }
}

/// SQLSTATE classes that say "this data", not "this server": 22 data exception, 23 integrity
/// constraint violation, 54 program limit exceeded.
fn is_data_error(sqlstate: &str) -> bool {
    matches!(sqlstate.get(..2), Some("22" | "23" | "54"))
}

/// What every writer shares: where it writes, and what it needs to advance runs.
struct Recorder {
    pool: PgPool,
    producer: FutureProducer,
    dead_letters: DeadLetters,
    coordinator: Coordinator,
    config: Arc<Config>,
    /// What `sink.retention` keeps: a result older than that is not written (see [`retention`]).
    window: Window,
}

/// A writer's batch: the records that decoded as results (kept to split the batch and to
/// dead-letter a row PostgreSQL refuses), and the tickets of every record taken.
struct Batch {
    records: Vec<OwnedMessage>,
    tickets: Vec<Ticket>,
}

/// Rows to write: the columns, and the results of multi-step runs whole, for the coordinator.
#[derive(Default)]
struct Rows {
    columns: Columns,
    multi_step: Vec<ActionResult>,
}

impl Rows {
    fn push(&mut self, result: ActionResult, finished_at: DateTime<Utc>) {
        if !result.event.is_null() {
            self.multi_step.push(result.clone());
        }
        self.columns.push(result, finished_at);
    }

    /// The rows of records that decoded once already (so they decode again), but those past the
    /// retention (counted when they were first decoded).
    fn of(records: &[OwnedMessage], window: &Window) -> Rows {
        let mut rows = Rows::default();
        for m in records {
            if let Ok((result, finished_at)) = decode_row(m.payload().unwrap_or_default(), content_type(m)) {
                if !window.expired(rows::run_at(&result, finished_at)) {
                    rows.push(result, finished_at);
                }
            }
        }
        rows
    }
}

fn content_type(m: &OwnedMessage) -> Option<&[u8]> {
    kafka::header(m.headers(), envelope::CONTENT_TYPE)
}

impl Recorder {
    /// Writes one batch: results, then (for multi-step runs) the decisions they lead to, the next
    /// steps produced and acknowledged, and only then the commit.
    async fn write_batch(&self, rows: &Rows) -> Result<usize, WriteError> {
        let Recorder { pool, producer, coordinator, config, .. } = self;
        let mut tx = pool.begin().await?;
        let inserted = rows.columns.insert(&mut tx).await?;
        // Only a task that already had a row can be repaired: most batches skip the statement.
        let repaired =
            if (inserted as usize) < rows.columns.len() { rows.columns.repair(&mut tx).await? } else { Vec::new() };
        if !repaired.is_empty() {
            Event::Repaired { rows: repaired.len() }.emit();
        }
        let advance = coordinator.advance(&mut tx, &rows.multi_step, &repaired).await?;
        let mut decided = Columns::default();
        for r in advance.results {
            let finished_at = DateTime::parse_from_rfc3339(&r.finished_at)
                .map(|t| t.with_timezone(&Utc))
                .unwrap_or_else(|_| Utc::now());
            decided.push(r, finished_at);
        }
        // Only multi-step runs decide rows here; a batch of single-step results saves the round trip.
        if !decided.is_empty() {
            decided.insert(&mut tx).await?;
        }
        let sends = advance.tasks.iter().map(|task| {
            let topic = config.names().actions_at(&task.service, task.priority());
            let payload = serde_json::to_vec(task).expect("a task always serializes");
            async move {
                kafka::send(
                    producer,
                    &topic,
                    Some(task.tenant.as_bytes()),
                    &payload,
                    kafka::content_headers(Format::Json),
                )
                .await
            }
        });
        futures::future::try_join_all(sends).await?;
        tx.commit().await?;
        Ok(rows.columns.len() + decided.len())
    }

    /// Writes `batch` (whose rows are `rows`): every row is committed or, when PostgreSQL refuses
    /// it as data, dead-lettered. Returns false if `stop` came first (nothing more is written; the
    /// part not committed is replayed).
    async fn write(&self, batch: &Batch, rows: Rows, stop: &CancellationToken) -> anyhow::Result<bool> {
        // Ranges of `batch.records` still to write, the next on top; the whole batch's rows are
        // already decoded, a part's are decoded again (only after a data error).
        let mut pending: Vec<(Range<usize>, Option<Rows>)> = vec![(0..batch.records.len(), Some(rows))];
        while let Some((range, rows)) = pending.pop() {
            if range.is_empty() {
                continue;
            }
            let rows = rows.unwrap_or_else(|| Rows::of(&batch.records[range.clone()], &self.window));
            let mut backoff = Backoff::default();
            loop {
                let started = std::time::Instant::now();
                let e = match self.write_batch(&rows).await {
                    Ok(rows) => {
                        Event::SinkWrote { rows, elapsed: started.elapsed() }.emit();
                        break;
                    }
                    Err(e) => e,
                };
                match e.fault() {
                    Fault::Data(sqlstate) if range.len() == 1 => {
                        self.dead_letter(&batch.records[range.start], &e, sqlstate.as_deref()).await?;
                        break;
                    }
                    Fault::Data(_) => {
                        // Halves, the first on top: a partition's rows still commit in order.
                        let middle = range.start + range.len() / 2;
                        pending.push((middle..range.end, None));
                        pending.push((range.start..middle, None));
                        break;
                    }
                    Fault::Outage => {
                        let detail = match &e {
                            WriteError::Database(e) => describe(&self.pool, e).await,
                            WriteError::Kafka(_) => e.to_string(),
                        };
                        Event::Failed { stage: Stage::Sink, reason: "database", retryable: true, detail: &detail }
                            .emit();
                        if !backoff.wait(stop.cancelled()).await {
                            return Ok(false);
                        }
                    }
                }
            }
        }
        Ok(true)
    }

    /// Sends a row PostgreSQL refused as data (alone in its transaction) to the dead-letter topic.
    async fn dead_letter(&self, record: &OwnedMessage, e: &WriteError, sqlstate: Option<&str>) -> anyhow::Result<()> {
        let reason = match sqlstate {
            Some(code) => format!("PostgreSQL refused the row (SQLSTATE {code}): {e}"),
            None => format!("the row cannot be recorded: {e}"),
        };
        Event::Failed { stage: Stage::Sink, reason: "data", retryable: false, detail: &reason }.emit();
        let extra: &[(&str, &str)] = match sqlstate {
            Some(code) => &[(SQLSTATE, code)],
            None => &[],
        };
        self.dead_letters.send_with(record, &reason, extra).await.context("record: dead-lettering failed")
    }
}

pub async fn run(
    config: Arc<Config>,
    definitions: Arc<DefinitionStore>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let pool = pool(&config)?;
    let mut backoff = Backoff::default();
    while let Err(e) = migrate(&pool).await {
        Event::Failed { stage: Stage::Sink, reason: "database", retryable: true, detail: &format!("{e:#}") }.emit();
        if !backoff.wait(shutdown.cancelled()).await {
            return Ok(());
        }
    }
    let mut source = Source::subscribe(&config, Stage::Sink, &config.names().results(), &config.names().group("sink"))?;
    let producer = kafka::producer(&config)?;
    let recorder = Arc::new(Recorder {
        pool: pool.clone(),
        dead_letters: DeadLetters::new(producer.clone(), config.names().dlq(), Stage::Sink).with_limits(&config.limits),
        producer,
        coordinator: Coordinator::new(definitions),
        config: config.clone(),
        window: Window::new(&config.sink.retention),
    });
    // The writers stop on shutdown, and also when this loop ends for a reason of its own.
    let stop = shutdown.child_token();
    let (done, mut committed) = mpsc::unbounded_channel::<Vec<Ticket>>();
    let count = config.sink.transactions;
    let queue = writer_queue(config.sink.batch_size, count);
    let (mut writers, mut tasks) = (Vec::with_capacity(count), Vec::with_capacity(count));
    for _ in 0..count {
        let (tx, rx) = mpsc::channel(queue);
        writers.push(tx);
        tasks.push(tokio::spawn(writer(recorder.clone(), rx, done.clone(), stop.clone())));
    }
    drop(done);
    // Partitions made ahead and dropped when old, on a connection of its own (not one of the
    // writers' `pool_size`): it may wait for a lock (at most its lock timeout) while they write.
    let upkeep = pool_of(&config, 1)?;
    let maintenance = tokio::spawn(retention::run(upkeep, Arc::new(config.sink.retention.clone()), stop.clone()));
    let mut sweep = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(tickets) = committed.recv() => source.done_all(&tickets),
            _ = sweep.tick() => {
                if let Err(e) = runs::expire(&pool).await {
                    let detail = describe(&pool, &e).await;
                    Event::Failed { stage: Stage::Sink, reason: "database", retryable: true, detail: &detail }.emit();
                }
            }
            batch = source.recv() => {
                let Some(batch) = batch else { break };
                // A full writer (the database is down) holds the dispatch up; shutdown must not wait.
                tokio::select! {
                    // A writer that ended early failed (dead-lettering): its error is returned below.
                    delivered = dispatch(&writers, batch) => if !delivered { break },
                    _ = shutdown.cancelled() => break,
                }
            }
        }
    }
    // Writers finish the transaction they are in (a retry loop gives up at once), and the offsets
    // of every transaction that committed are stored before the source closes and commits them.
    stop.cancel();
    drop(writers);
    while let Some(tickets) = committed.recv().await {
        source.done_all(&tickets);
    }
    source.close();
    for task in tasks {
        task.await.context("record writer panicked")??;
    }
    maintenance.await.context("retention maintenance panicked")?;
    Ok(())
}

/// Messages a writer's queue holds: about two batches' worth, so the next batch is ready when a
/// transaction commits, while the dispatcher (which hands out source batches of up to
/// [`source::BATCH`] messages, split over the writers) seldom waits for a busy writer.
fn writer_queue(batch_size: usize, writers: usize) -> usize {
    (2 * batch_size * writers).div_ceil(source::BATCH).max(2)
}

/// Splits a source batch over the writers by partition: a partition always goes to the same
/// writer, so its batches are written in order, and (results being keyed by tenant) so are a
/// run's. Returns false when a writer has ended.
async fn dispatch(writers: &[mpsc::Sender<Vec<Delivery>>], batch: Vec<Delivery>) -> bool {
    let mut parts: Vec<Vec<Delivery>> = (0..writers.len()).map(|_| Vec::new()).collect();
    for d in batch {
        parts[writer_of(d.ticket.partition, writers.len())].push(d);
    }
    for (writer, part) in writers.iter().zip(parts) {
        if !part.is_empty() && writer.send(part).await.is_err() {
            return false;
        }
    }
    true
}

fn writer_of(partition: i32, writers: usize) -> usize {
    partition.unsigned_abs() as usize % writers
}

/// One transaction at a time for the partitions of one writer: take what is queued (topped up
/// for `linger`), decode it, write it (retrying while the database is down, isolating rows it
/// refuses), hand the tickets back.
async fn writer(
    recorder: Arc<Recorder>,
    mut queue: mpsc::Receiver<Vec<Delivery>>,
    done: mpsc::UnboundedSender<Vec<Ticket>>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let (batch_size, linger) = (recorder.config.sink.batch_size, recorder.config.sink.linger);
    loop {
        let mut deliveries = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            batch = queue.recv() => match batch { Some(b) => b, None => return Ok(()) },
        };
        // Top up a partial batch for a moment: fewer, larger transactions.
        let deadline = tokio::time::Instant::now() + linger;
        while deliveries.len() < batch_size {
            match tokio::time::timeout_at(deadline, queue.recv()).await {
                Ok(Some(more)) => deliveries.extend(more),
                _ => break,
            }
        }
        let (batch, rows) = decode(deliveries, &recorder.dead_letters, &recorder.window).await?;
        if !recorder.write(&batch, rows, &stop).await? {
            return Ok(());
        }
        // The receiver is gone only once the stage stopped; the batch is replayed.
        let _ = done.send(batch.tickets);
    }
}

/// Decodes a batch; records that are not results are dead-lettered, and results past the
/// retention are counted and left out (both count as done).
async fn decode(
    deliveries: Vec<Delivery>,
    dead_letters: &DeadLetters,
    window: &Window,
) -> anyhow::Result<(Batch, Rows)> {
    let mut rows = Rows::default();
    let mut expired = 0;
    let mut batch =
        Batch { records: Vec::with_capacity(deliveries.len()), tickets: Vec::with_capacity(deliveries.len()) };
    for Delivery { message, ticket } in deliveries {
        match decode_row(message.payload().unwrap_or_default(), content_type(&message)) {
            Ok((result, finished_at)) if window.expired(rows::run_at(&result, finished_at)) => expired += 1,
            Ok((result, finished_at)) => {
                rows.push(result, finished_at);
                batch.records.push(message);
            }
            Err(reason) => {
                Event::Failed { stage: Stage::Sink, reason: "decode", retryable: false, detail: &reason }.emit();
                dead_letters.send(&message, &reason).await.context("record: dead-lettering failed")?;
            }
        }
        batch.tickets.push(ticket);
    }
    if expired > 0 {
        Event::RetentionExpired { table: "action_results", at: "sink", rows: expired }.emit();
    }
    Ok((batch, rows))
}

/// Exponential backoff from 100 ms to 5 s, cut short by shutdown.
struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Backoff(Duration::from_millis(100))
    }
}

impl Backoff {
    /// Sleeps; returns false if `stop` completed first.
    async fn wait(&mut self, stop: impl std::future::Future<Output = ()>) -> bool {
        let delay = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
        tokio::select! {
            _ = stop => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_errors_are_told_from_outages_by_their_sqlstate_class() {
        for code in ["22021", "22P05", "23505", "23514", "54000", "22003"] {
            assert!(is_data_error(code), "{code}");
        }
        // Connection, resources, serialization, shutdown, undefined table: not the rows' fault.
        for code in ["08006", "53300", "40001", "40P01", "57P01", "42P01", "XX000", ""] {
            assert!(!is_data_error(code), "{code}");
        }
        let too_large = WriteError::Kafka(KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge));
        assert_eq!(too_large.fault(), Fault::Data(None));
        let down = WriteError::Kafka(KafkaError::MessageProduction(RDKafkaErrorCode::BrokerTransportFailure));
        assert_eq!(down.fault(), Fault::Outage);
        assert_eq!(WriteError::Database(sqlx::Error::PoolTimedOut).fault(), Fault::Outage);
    }
}
