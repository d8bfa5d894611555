//! Stage 4: write results into PostgreSQL in batches, idempotently.
//!
//! A batch is whatever the source has ready, topped up for at most `sink.linger_ms`, up to
//! `sink.batch_size` rows. It is written by one `INSERT … SELECT FROM UNNEST(…)` (one round trip
//! for the whole batch) with `ON CONFLICT (task_id) DO NOTHING`, so results replayed after a crash
//! are ignored. Offsets are stored only after the statement commits.
//!
//! Results of multi-step runs also advance their run ([`crate::coordinate`]) in the same
//! transaction: the next steps' tasks are produced and acknowledged before the commit.
//!
//! When PostgreSQL is unreachable the stage holds the batch and retries with backoff: it takes
//! no new batches (so the source pauses its partitions) and stores no offsets, and picks up where
//! it was once the database answers. A row that can never be written (undecodable result) goes
//! to the dead-letter topic instead of blocking the partition.

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use rdkafka::Message;
use sqlx::{
    postgres::{PgArguments, PgPoolOptions},
    Arguments as _, PgPool,
};

use rdkafka::producer::FutureProducer;

use crate::{
    config::Config,
    coordinate::Coordinator,
    dead_letter::DeadLetters,
    definitions::DefinitionStore,
    envelope::{self, ActionResult, Format},
    kafka,
    shutdown::Shutdown,
    source::{Delivery, Source, Ticket},
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
        Ok(args)
    }

    async fn insert(&self, db: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
        let args = self.arguments().map_err(sqlx::Error::Encode)?;
        sqlx::query_with(INSERT, args).execute(db).await.map(|_| ())
    }
}

/// One statement per batch: the columns unnested back into rows, duplicates (replays) ignored.
const INSERT: &str = "insert into action_results (task_id, run_id, event_id, tenant, workflow_id, workflow_version,
        step_id, service, status, attempts, latency_ms, http_status, error, output, finished_at)
    select t, r, e, te, w, wv, s, sv, st, a, l, h, er, o::jsonb, f
    from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::text[],
        $8::text[], $9::text[], $10::int[], $11::float8[], $12::int[], $13::text[], $14::text[],
        $15::timestamptz[])
        as x(t, r, e, te, w, wv, s, sv, st, a, l, h, er, o, f)
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

/// Writes one batch: results, then (for multi-step runs) the decisions they lead to, the next
/// steps produced and acknowledged, and only then the commit.
async fn write_batch(
    pool: &PgPool,
    columns: &Columns,
    results: &[ActionResult],
    coordinator: &Coordinator,
    producer: &FutureProducer,
    config: &Config,
) -> Result<usize, WriteError> {
    let mut tx = pool.begin().await?;
    columns.insert(&mut tx).await?;
    let advance = coordinator.advance(&mut tx, results).await?;
    let mut decided = Columns::default();
    for r in advance.results {
        let finished_at =
            DateTime::parse_from_rfc3339(&r.finished_at).map(|t| t.with_timezone(&Utc)).unwrap_or_else(|_| Utc::now());
        decided.push(r, finished_at);
    }
    // Only multi-step runs decide rows here; a batch of single-step results saves the round trip.
    if !decided.is_empty() {
        decided.insert(&mut tx).await?;
    }
    let sends = advance.tasks.iter().map(|task| {
        let topic = config.topic(&format!("actions.{}", task.service));
        let payload = serde_json::to_vec(task).expect("a task always serializes");
        async move {
            kafka::send(producer, &topic, Some(task.tenant.as_bytes()), &payload, kafka::content_headers(Format::Json))
                .await
        }
    });
    futures::future::try_join_all(sends).await?;
    tx.commit().await?;
    Ok(columns.len() + decided.len())
}

pub async fn run(config: Arc<Config>, definitions: Arc<DefinitionStore>, mut shutdown: Shutdown) -> anyhow::Result<()> {
    let pool = pool(&config)?;
    let mut backoff = Backoff::default();
    while let Err(e) = migrate(&pool).await {
        Event::Failed { stage: Stage::Sink, reason: "database", retryable: true, detail: &format!("{e:#}") }.emit();
        if !backoff.wait(&mut shutdown).await {
            return Ok(());
        }
    }
    let mut source = Source::subscribe(&config, Stage::Sink, &config.topic("results"), &config.group("sink"))?;
    let producer = kafka::producer(&config)?;
    let dead_letters = DeadLetters::new(producer.clone(), config.topic("dlq"), Stage::Sink);
    let coordinator = Coordinator::new(definitions);
    let mut sweep = tokio::time::interval(Duration::from_secs(5));
    let (batch_size, linger) = (config.sink.batch_size, Duration::from_millis(config.sink.linger_ms));
    'batches: loop {
        let mut deliveries = tokio::select! {
            _ = shutdown.recv() => break,
            _ = sweep.tick() => {
                expire_runs(&pool).await;
                continue;
            }
            batch = source.recv() => match batch { Some(b) => b, None => break },
        };
        // Top up a partial batch for a moment: fewer, larger transactions.
        let deadline = tokio::time::Instant::now() + linger;
        while deliveries.len() < batch_size {
            match tokio::time::timeout_at(deadline, source.recv()).await {
                Ok(Some(more)) => deliveries.extend(more),
                _ => break,
            }
        }
        let (columns, results, tickets) = rows(deliveries, &dead_letters).await?;
        let mut backoff = Backoff::default();
        loop {
            let started = std::time::Instant::now();
            match write_batch(&pool, &columns, &results, &coordinator, &producer, &config).await {
                Ok(rows) => {
                    Event::SinkWrote { rows, elapsed: started.elapsed() }.emit();
                    source.done_all(&tickets);
                    break;
                }
                Err(e) => {
                    Event::Failed { stage: Stage::Sink, reason: "database", retryable: true, detail: &e.to_string() }
                        .emit();
                    if !backoff.wait(&mut shutdown).await {
                        break 'batches;
                    }
                }
            }
        }
    }
    source.close();
    Ok(())
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
    /// Sleeps; returns false if shutdown fired instead.
    async fn wait(&mut self, shutdown: &mut Shutdown) -> bool {
        let delay = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
        tokio::select! {
            _ = shutdown.recv() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}
