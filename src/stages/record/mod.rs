//! Stage 4: write results into PostgreSQL in batches, idempotently.
//!
//! ## Lanes: several transactions in flight
//! Each transaction waits for PostgreSQL's commit (with `synchronous_commit` on: the WAL flush,
//! which is what makes storing the offset afterwards safe) and for the broker's acknowledgements
//! of a multi-step run's next steps. One transaction at a time leaves the database and this
//! process idle for most of that wait, so the stage runs `sink.transactions` *lanes*, each with
//! its own connection, and hands every lane the results of a fixed share of the partitions
//! (partition modulo the number of lanes). A partition's batches are thus written in order, one
//! at a time, and because results are keyed by tenant (the executor produces them with the
//! tenant as key, and the coordinator produces next steps the same way) all results of a run
//! reach the same lane: two lanes never advance one run at once. (They would still be correct if
//! they did: [`crate::stages::record::runs`] locks the run's row and reads the results after the lock.)
//! While a lane commits, its queue already holds the next batch and the other lanes write theirs.
//!
//! ## A batch
//! A lane's batch is whatever is queued, topped up for at most `sink.linger`, up to
//! `sink.batch_size` rows. It is written by one `INSERT … SELECT FROM UNNEST(…)` (one round trip
//! for the whole batch) with `ON CONFLICT (task_id) DO NOTHING`, so results replayed after a crash
//! are ignored. Offsets are stored only after the transaction commits: the lane hands its tickets
//! back to the stage's task, which owns the source; the source's offset tracker accepts the
//! lanes' completions in any order and stores an offset only once everything below it is done.
//!
//! Results of multi-step runs also advance their run ([`crate::stages::record::runs`]) in the same
//! transaction: the next steps' tasks are produced and acknowledged before the commit.
//!
//! When PostgreSQL is unreachable a lane holds its batch and retries with backoff: its queue
//! fills, the stage stops taking batches (so the source pauses its partitions), no offsets are
//! stored, and the lanes pick up where they were once the database answers. A row that can never
//! be written (undecodable result) goes to the dead-letter topic instead of blocking the
//! partition.

pub mod runs;

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use rdkafka::{producer::FutureProducer, Message};
use sqlx::{
    postgres::{PgArguments, PgPoolOptions},
    Arguments as _, PgPool,
};
use tokio::sync::mpsc;

use crate::{
    config::Config,
    engine::definitions::DefinitionStore,
    envelope::{self, ActionResult, Format},
    kafka,
    kafka::dead_letter::DeadLetters,
    kafka::source::{self, Delivery, Source, Ticket},
    shutdown::CancellationToken,
    stages::record::runs::Coordinator,
    telemetry::{Event, Stage},
};

/// Opens a pool without connecting: the sink must start (and wait) while the database is down.
pub fn pool(config: &Config) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(config.sink.pool_size)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy(&config.database_url)
        .context("database_url is not a valid PostgreSQL URL")
}

/// Creates or upgrades the tables (sqlx migrations in `migrations/`, compiled in).
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::migrate!("./migrations").run(pool).await.context("running database migrations")
}

/// Rows of one batch, column by column, as UNNEST wants them.
#[derive(Default)]
pub struct Columns {
    task_id: Vec<String>,
    run_id: Vec<String>,
    event_id: Vec<String>,
    tenant: Vec<String>,
    workflow_id: Vec<String>,
    workflow_version: Vec<i64>,
    step_id: Vec<String>,
    service: Vec<String>,
    status: Vec<String>,
    attempts: Vec<i32>,
    latency_ms: Vec<f64>,
    http_status: Vec<Option<i32>>,
    cost: Vec<Option<f64>>,
    error: Vec<Option<String>>,
    output: Vec<Option<String>>,
    finished_at: Vec<DateTime<Utc>>,
}

impl Columns {
    pub fn push(&mut self, r: ActionResult, finished_at: DateTime<Utc>) {
        self.task_id.push(r.task_id);
        self.run_id.push(r.run_id);
        self.event_id.push(r.event_id);
        self.tenant.push(r.tenant);
        self.workflow_id.push(r.workflow_id);
        self.workflow_version.push(r.workflow_version);
        self.step_id.push(r.step_id);
        self.service.push(r.service);
        self.status.push(r.status.as_str().to_string());
        self.attempts.push(r.attempts);
        self.latency_ms.push(r.latency_ms);
        self.http_status.push(r.http_status);
        // A u64 count of the service's units; double precision holds it exactly up to 2^53.
        self.cost.push(r.cost.map(|c| c as f64));
        self.error.push(r.error);
        self.output.push(r.output.map(|o| o.to_string()));
        self.finished_at.push(finished_at);
    }

    pub fn len(&self) -> usize {
        self.task_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.task_id.is_empty()
    }

    /// The batch as the bind arguments of [`INSERT`]: one array per column.
    pub fn arguments(&self) -> Result<PgArguments, sqlx::error::BoxDynError> {
        let mut args = PgArguments::default();
        args.add(&self.task_id)?;
        args.add(&self.run_id)?;
        args.add(&self.event_id)?;
        args.add(&self.tenant)?;
        args.add(&self.workflow_id)?;
        args.add(&self.workflow_version)?;
        args.add(&self.step_id)?;
        args.add(&self.service)?;
        args.add(&self.status)?;
        args.add(&self.attempts)?;
        args.add(&self.latency_ms)?;
        args.add(&self.http_status)?;
        args.add(&self.error)?;
        args.add(&self.output)?;
        args.add(&self.finished_at)?;
        args.add(&self.cost)?;
        Ok(args)
    }

    async fn insert(&self, db: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
        let args = self.arguments().map_err(sqlx::Error::Encode)?;
        sqlx::query_with(INSERT, args).execute(db).await.map(|_| ())
    }
}

/// One statement per batch: the columns unnested back into rows, duplicates (replays) ignored.
const INSERT: &str = "insert into action_results (task_id, run_id, event_id, tenant, workflow_id, workflow_version,
        step_id, service, status, attempts, latency_ms, http_status, error, output, finished_at, cost)
    select t, r, e, te, w, wv, s, sv, st, a, l, h, er, o::jsonb, f, c
    from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::text[],
        $8::text[], $9::text[], $10::int[], $11::float8[], $12::int[], $13::text[], $14::text[],
        $15::timestamptz[], $16::float8[])
        as x(t, r, e, te, w, wv, s, sv, st, a, l, h, er, o, f, c)
    on conflict (task_id) do nothing";

/// Decodes one result record into what [`Columns::push`] takes; the error is the dead-letter reason.
pub fn decode_row(payload: &[u8], content_type: Option<&[u8]>) -> Result<(ActionResult, DateTime<Utc>), String> {
    let r = envelope::decode::<ActionResult>(payload, content_type).map_err(|e| format!("undecodable result: {e}"))?;
    match DateTime::parse_from_rfc3339(&r.finished_at) {
        Ok(t) => Ok((r, t.with_timezone(&Utc))),
        Err(e) => Err(format!("finished_at {:?}: {e}", r.finished_at)),
    }
}

/// Why a batch could not be written; every cause is retried with the batch held.
#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("run coordination: {0:#}")]
    Coordinate(#[from] anyhow::Error),
    #[error("producing next steps: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
}

/// What every lane shares: where it writes, and what it needs to advance runs.
struct Writer {
    pool: PgPool,
    producer: FutureProducer,
    dead_letters: DeadLetters,
    coordinator: Coordinator,
    config: Arc<Config>,
}

impl Writer {
    /// Writes one batch: results, then (for multi-step runs) the decisions they lead to, the next
    /// steps produced and acknowledged, and only then the commit.
    async fn write_batch(&self, columns: &Columns, results: &[ActionResult]) -> Result<usize, WriteError> {
        let Writer { pool, producer, coordinator, config, .. } = self;
        let mut tx = pool.begin().await?;
        columns.insert(&mut tx).await?;
        let advance = coordinator.advance(&mut tx, results).await?;
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
            let topic = config.names().actions(&task.service);
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
        Ok(columns.len() + decided.len())
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
    let writer = Arc::new(Writer {
        pool: pool.clone(),
        dead_letters: DeadLetters::new(producer.clone(), config.names().dlq(), Stage::Sink),
        producer,
        coordinator: Coordinator::new(definitions),
        config: config.clone(),
    });
    // The lanes stop on shutdown, and also when this loop ends for a reason of its own.
    let stop = shutdown.child_token();
    let (done, mut committed) = mpsc::unbounded_channel::<Vec<Ticket>>();
    let count = config.sink.transactions;
    let queue = lane_queue(config.sink.batch_size, count);
    let (mut lanes, mut tasks) = (Vec::with_capacity(count), Vec::with_capacity(count));
    for _ in 0..count {
        let (tx, rx) = mpsc::channel(queue);
        lanes.push(tx);
        tasks.push(tokio::spawn(lane(writer.clone(), rx, done.clone(), stop.clone())));
    }
    drop(done);
    let mut sweep = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(tickets) = committed.recv() => source.done_all(&tickets),
            _ = sweep.tick() => expire_runs(&pool).await,
            batch = source.recv() => {
                let Some(batch) = batch else { break };
                // A full lane (the database is down) holds the dispatch up; shutdown must not wait.
                tokio::select! {
                    // A lane that ended early failed (dead-lettering): its error is returned below.
                    delivered = dispatch(&lanes, batch) => if !delivered { break },
                    _ = shutdown.cancelled() => break,
                }
            }
        }
    }
    // Lanes finish the transaction they are in (a retry loop gives up at once), and the offsets
    // of every transaction that committed are stored before the source closes and commits them.
    stop.cancel();
    drop(lanes);
    while let Some(tickets) = committed.recv().await {
        source.done_all(&tickets);
    }
    source.close();
    for task in tasks {
        task.await.context("sink lane panicked")??;
    }
    Ok(())
}

/// Messages a lane's queue holds: about two batches' worth, so the next batch is ready when a
/// transaction commits, while the dispatcher (which hands out source batches of up to
/// [`source::BATCH`] messages, split over the lanes) seldom waits for a busy lane.
fn lane_queue(batch_size: usize, lanes: usize) -> usize {
    (2 * batch_size * lanes).div_ceil(source::BATCH).max(2)
}

/// Splits a source batch over the lanes by partition: a partition always goes to the same lane,
/// so its batches are written in order, and (results being keyed by tenant) so are a run's.
/// Returns false when a lane has ended.
async fn dispatch(lanes: &[mpsc::Sender<Vec<Delivery>>], batch: Vec<Delivery>) -> bool {
    let mut parts: Vec<Vec<Delivery>> = (0..lanes.len()).map(|_| Vec::new()).collect();
    for d in batch {
        parts[lane_of(d.ticket.partition, lanes.len())].push(d);
    }
    for (lane, part) in lanes.iter().zip(parts) {
        if !part.is_empty() && lane.send(part).await.is_err() {
            return false;
        }
    }
    true
}

fn lane_of(partition: i32, lanes: usize) -> usize {
    partition.unsigned_abs() as usize % lanes
}

/// One transaction at a time for the partitions of one lane: take what is queued (topped up for
/// `linger`), decode it, write it (retrying while the database is down), hand the tickets back.
async fn lane(
    writer: Arc<Writer>,
    mut queue: mpsc::Receiver<Vec<Delivery>>,
    done: mpsc::UnboundedSender<Vec<Ticket>>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let (batch_size, linger) = (writer.config.sink.batch_size, writer.config.sink.linger);
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
        let (columns, results, tickets) = rows(deliveries, &writer.dead_letters).await?;
        let mut backoff = Backoff::default();
        loop {
            let started = std::time::Instant::now();
            match writer.write_batch(&columns, &results).await {
                Ok(rows) => {
                    Event::SinkWrote { rows, elapsed: started.elapsed() }.emit();
                    // The receiver is gone only once the stage stopped; the batch is replayed.
                    let _ = done.send(tickets);
                    break;
                }
                Err(e) => {
                    Event::Failed { stage: Stage::Sink, reason: "database", retryable: true, detail: &e.to_string() }
                        .emit();
                    if !backoff.wait(stop.cancelled()).await {
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// Fails running runs past their deadline, so a run whose step never reports still ends.
async fn expire_runs(pool: &PgPool) {
    let outcome = sqlx::query(
        "update workflow_runs set status = 'failed', error = 'run time limit exceeded', finished_at = now()
         where status = 'running' and deadline < now()",
    )
    .execute(pool)
    .await;
    if let Err(e) = outcome {
        Event::Failed { stage: Stage::Sink, reason: "database", retryable: true, detail: &e.to_string() }.emit();
    }
}

/// Decodes a batch; records that are not results are dead-lettered (and count as done). Results
/// of multi-step runs are also returned whole, for the coordinator.
async fn rows(
    deliveries: Vec<Delivery>,
    dead_letters: &DeadLetters,
) -> anyhow::Result<(Columns, Vec<ActionResult>, Vec<Ticket>)> {
    let mut columns = Columns::default();
    let mut multi_step = Vec::new();
    let mut tickets = Vec::with_capacity(deliveries.len());
    for Delivery { message, ticket } in deliveries {
        let content_type = kafka::header(message.headers(), envelope::CONTENT_TYPE);
        match decode_row(message.payload().unwrap_or_default(), content_type) {
            Ok((result, finished_at)) => {
                if !result.event.is_null() {
                    multi_step.push(result.clone());
                }
                columns.push(result, finished_at)
            }
            Err(reason) => {
                Event::Failed { stage: Stage::Sink, reason: "decode", retryable: false, detail: &reason }.emit();
                dead_letters.send(&message, &reason).await.context("sink: dead-lettering failed")?;
            }
        }
        tickets.push(ticket);
    }
    Ok((columns, multi_step, tickets))
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
