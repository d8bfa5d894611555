//! Retention: the results and run tables in time partitions, made ahead and dropped when old.
//!
//! `action_results` and `workflow_runs` are partitioned by RANGE on `run_at` (migration 0030):
//! when the row's run started, which is the Kafka timestamp of the event record that started it.
//! The evaluator puts it on a run's first tasks, the coordinator on every later one, the executor
//! copies it from task to result, and `weir replay` gives a run it drives the `run_at` its rows
//! already have. It is thus the same on every redelivery, retry and replay of a task, and the
//! primary keys (`(task_id, run_at)`, `(run_id, run_at)`) keep the writes idempotent across
//! partitions: a result written twice has the same key, lands in the same partition and conflicts.
//! (A result without `run_at`, from an executor older than this, falls back to its
//! `finished_at`: a result executed again then gets another key. Only results in flight across
//! the upgrade can be that.)
//!
//! ## What the maintenance does, every `sink.retention.check_every`
//! One record stage at a time (a PostgreSQL advisory lock; the others skip the round):
//! - **makes** the partitions from the one before now to `ahead` after it, each
//!   `sink.retention.partition` long and aligned on multiples of it since the epoch, skipping any
//!   range an existing partition overlaps (partitions of another size, e.g. the daily ones the
//!   migration made, stay as they are). A partition is made as a table of its own, the rows of its
//!   range are moved into it from the DEFAULT partition, and it is attached, in one transaction:
//!   ATTACH takes only a SHARE UPDATE EXCLUSIVE lock on the parent, which the sink's inserts do not
//!   wait for; only inserts into the DEFAULT partition wait, for the move.
//! - **drops** (with `keep`) every partition wholly older than `keep`: its upper bound at or before
//!   the *cutoff*, the start of the partition `keep` ago. DROP takes an ACCESS EXCLUSIVE lock on the
//!   parent for a moment (DETACH CONCURRENTLY is not allowed beside a DEFAULT partition), so every
//!   statement runs with a `lock_timeout` of 2 s: the sink waits at most that long, and a
//!   maintenance that cannot get the lock says so and tries again at the next round.
//! - **deletes** (with `keep`) the rows of the DEFAULT partition older than the cutoff, in batches,
//!   and the rows of `run_steps_started` and `run_cancellations` (kept whole, see the migration)
//!   older than it.
//!
//! ## A row whose time has no partition, and one older than the retention
//! A row whose `run_at` has no partition (a producer's clock years off, a record timestamp from a
//! backfill tool) goes to the DEFAULT partition: never refused, never a stalled sink. A partition
//! made later for its range takes it over. A *result* older than the cutoff, which can only
//! arrive when the pipeline is behind by more than `keep` (or a record's timestamp is that old),
//! is not written at all: it is counted (`weir_retention_expired_rows_total{where="sink"}`) and its
//! offset stored like any other. Writing it would bring back part of a run whose other rows and
//! started steps were dropped, and the coordinator would start those steps again.

use std::sync::Arc;

use chrono::{DateTime, TimeZone as _, Utc};
use sqlx::{PgConnection, PgPool};

use crate::{
    config::RetentionConfig,
    shutdown::CancellationToken,
    telemetry::{Event, Stage},
};

/// The tables partitioned by `run_at`.
pub const PARTITIONED: [&str; 2] = ["action_results", "workflow_runs"];

/// Tables kept whole whose old rows are deleted, and the time column they are deleted by.
const LEDGERS: [(&str, &str); 2] = [("run_steps_started", "started_at"), ("run_cancellations", "cancelled_at")];

/// Rows deleted per statement: short transactions, no long lock on the rows.
const DELETE_BATCH: i64 = 5_000;

/// How long a maintenance statement waits for a lock before it gives up (and the round is tried
/// again later): the longest it can hold the sink up.
const LOCK_TIMEOUT: &str = "2s";

/// Distinguishes the maintenance's advisory lock from any other in the database.
const ADVISORY_LOCK: i64 = 0x7765_6972_5f72_6574; // "weir_ret"

/// The partition scheme of a config: aligned partitions of `partition` seconds, and what is kept.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    partition: i64,
    keep: Option<i64>,
    ahead: i64,
}

impl Window {
    pub fn new(config: &RetentionConfig) -> Window {
        Window {
            partition: config.partition.as_secs().max(1) as i64,
            keep: config.keep.map(|k| k.as_secs().min(i64::MAX as u64 / 4) as i64),
            ahead: i64::from(config.ahead),
        }
    }

    /// The start of the partition `t` falls in.
    pub fn start_of(&self, t: DateTime<Utc>) -> DateTime<Utc> {
        let secs = t.timestamp().div_euclid(self.partition) * self.partition;
        Utc.timestamp_opt(secs, 0).single().unwrap_or(t)
    }

    /// Rows whose `run_at` is before this are past the retention at `now`: the start of the
    /// partition `keep` before `now`. `None`: kept forever.
    pub fn cutoff(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let keep = self.keep?;
        Some(self.start_of(now - chrono::Duration::seconds(keep)))
    }

    /// Whether a row of `run_at` is past the retention now.
    pub fn expired(&self, run_at: DateTime<Utc>) -> bool {
        self.cutoff(Utc::now()).is_some_and(|cutoff| run_at < cutoff)
    }

    /// The partitions to have at `now`: from the one before now's to `ahead` after it.
    fn wanted(&self, now: DateTime<Utc>) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
        let step = chrono::Duration::seconds(self.partition);
        let first = self.start_of(now) - step;
        (0..self.ahead + 2).map(|i| (first + step * i as i32, first + step * (i as i32 + 1))).collect()
    }
}

/// A partition of a table, as PostgreSQL describes it; `None` bounds: the DEFAULT partition.
#[derive(Debug, sqlx::FromRow)]
struct Partition {
    name: String,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
}

/// The name of `table`'s partition starting at `from`: the start in UTC, e.g.
/// `action_results_p20261207_000000`.
pub fn partition_name(table: &str, from: DateTime<Utc>) -> String {
    format!("{table}_p{}", from.format("%Y%m%d_%H%M%S"))
}

/// The partitions of `table`, with their bounds read back from the catalog (so partitions made by
/// hand, or of another size, are seen as they are).
async fn partitions(db: &mut PgConnection, table: &str) -> Result<Vec<Partition>, sqlx::Error> {
    sqlx::query_as(
        r#"select c.relname::text as name,
               (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \(''([^'']+)''\)'))[1]::timestamptz as "from",
               (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'TO \(''([^'']+)''\)'))[1]::timestamptz as "to"
          from pg_inherits i join pg_class c on c.oid = i.inhrelid
          where i.inhparent = $1::regclass"#,
    )
    .bind(table)
    .fetch_all(db)
    .await
}

/// What one round did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Round {
    pub created: usize,
    pub dropped: usize,
    /// Rows deleted from default partitions and ledgers.
    pub deleted: u64,
    /// False when another record stage holds the maintenance lock: this one did nothing.
    pub ran: bool,
}

/// One maintenance round at `now` (the clock, except in tests that place partitions in the past).
pub async fn maintain(pool: &PgPool, config: &RetentionConfig, now: DateTime<Utc>) -> Result<Round, sqlx::Error> {
    let window = Window::new(config);
    let mut db = pool.acquire().await?;
    let locked: bool =
        sqlx::query_scalar("select pg_try_advisory_lock($1)").bind(ADVISORY_LOCK).fetch_one(&mut *db).await?;
    if !locked {
        return Ok(Round::default());
    }
    sqlx::query(&format!("set lock_timeout = '{LOCK_TIMEOUT}'")).execute(&mut *db).await?;
    let round = maintain_locked(&mut db, window, now).await;
    // Always back to the pool as it came: unlocked, without the timeout.
    let reset = async {
        sqlx::query("select pg_advisory_unlock($1)").bind(ADVISORY_LOCK).execute(&mut *db).await?;
        sqlx::query("reset lock_timeout").execute(&mut *db).await
    };
    if reset.await.is_err() {
        // The connection may be broken: not returned to the pool.
        db.detach();
    }
    round
}

async fn maintain_locked(db: &mut PgConnection, window: Window, now: DateTime<Utc>) -> Result<Round, sqlx::Error> {
    let mut round = Round { ran: true, ..Round::default() };
    let cutoff = window.cutoff(now);
    for table in PARTITIONED {
        let existing = partitions(db, table).await?;
        if let Some(cutoff) = cutoff {
            for p in existing.iter().filter(|p| p.to.is_some_and(|to| to <= cutoff)) {
                sqlx::query(&format!("drop table if exists \"{}\"", p.name)).execute(&mut *db).await?;
                let to = p.to.map(|t| t.to_rfc3339()).unwrap_or_default();
                Event::PartitionDropped { table, partition: &p.name, to: &to }.emit();
                round.dropped += 1;
            }
            let default = format!("{table}_default");
            let deleted = delete_older(db, &default, "run_at", cutoff).await?;
            if deleted > 0 {
                Event::RetentionExpired { table, at: "default", rows: deleted }.emit();
                round.deleted += deleted;
            }
        }
        for (from, to) in window.wanted(now) {
            if cutoff.is_some_and(|c| to <= c) {
                continue;
            }
            let overlaps = existing.iter().any(|p| matches!((p.from, p.to), (Some(a), Some(b)) if a < to && from < b));
            if overlaps {
                continue;
            }
            create(db, table, from, to).await?;
            round.created += 1;
        }
    }
    if let Some(cutoff) = cutoff {
        for (table, column) in LEDGERS {
            let deleted = delete_older(db, table, column, cutoff).await?;
            if deleted > 0 {
                Event::RetentionExpired { table, at: "ledger", rows: deleted }.emit();
                round.deleted += deleted;
            }
        }
    }
    Ok(round)
}

/// Makes `table`'s partition for `[from, to)`: a table of its own, the DEFAULT partition's rows of
/// that range moved into it, then attached — one transaction, so a row is never in neither.
async fn create(db: &mut PgConnection, table: &str, from: DateTime<Utc>, to: DateTime<Utc>) -> Result<(), sqlx::Error> {
    let name = partition_name(table, from);
    let (a, b) = (from.to_rfc3339(), to.to_rfc3339());
    let mut tx = sqlx::Connection::begin(&mut *db).await?;
    // No row may reach the default partition between the move and the ATTACH (which checks that
    // the default holds none of the range, and would fail): its inserts wait for this commit (at
    // most the lock timeout). Rows of other partitions, the usual case, do not wait.
    sqlx::query(&format!("lock table {table}_default in exclusive mode")).execute(&mut *tx).await?;
    sqlx::query(&format!("create table \"{name}\" (like {table} including defaults including constraints)"))
        .execute(&mut *tx)
        .await?;
    // The bounds are ours (RFC 3339 of whole seconds), so they are written into the DDL as it
    // requires; the DELETE takes them as parameters.
    let moved = sqlx::query(&format!(
        "with moved as (delete from {table}_default where run_at >= $1 and run_at < $2 returning *)
         insert into \"{name}\" select * from moved"
    ))
    .bind(from)
    .bind(to)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    sqlx::query(&format!("alter table {table} attach partition \"{name}\" for values from ('{a}') to ('{b}')"))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Event::PartitionCreated { table, partition: &name, from: &a, to: &b, moved }.emit();
    Ok(())
}

/// Deletes the rows of `table` whose `column` is before `cutoff`, a batch per statement.
async fn delete_older(
    db: &mut PgConnection,
    table: &str,
    column: &str,
    cutoff: DateTime<Utc>,
) -> Result<u64, sqlx::Error> {
    let sql =
        format!("delete from {table} where ctid = any(array(select ctid from {table} where {column} < $1 limit $2))");
    let mut total = 0;
    loop {
        let n = sqlx::query(&sql).bind(cutoff).bind(DELETE_BATCH).execute(&mut *db).await?.rows_affected();
        total += n;
        if n < DELETE_BATCH as u64 {
            return Ok(total);
        }
    }
}

/// Runs [`maintain`] every `check_every` until `stop`; a round that fails (the database down, a
/// lock not granted within the timeout) is logged and counted, and tried again at the next.
pub async fn run(pool: PgPool, config: Arc<RetentionConfig>, stop: CancellationToken) {
    let mut every = tokio::time::interval(config.check_every);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        if let Err(e) = maintain(&pool, &config, Utc::now()).await {
            let detail = format!("retention maintenance (tried again in {:?}): {e}", config.check_every);
            Event::Failed { stage: Stage::Sink, reason: "retention", retryable: true, detail: &detail }.emit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    #[test]
    fn partitions_are_aligned_and_the_cutoff_keeps_whole_ones() {
        let config: RetentionConfig = serde_yaml_ng::from_str("{keep: 3d, partition: 1d, ahead: 2}").unwrap();
        let w = Window::new(&config);
        let now = at("2026-12-07T18:30:00Z");
        assert_eq!(w.start_of(now), at("2026-12-07T00:00:00Z"));
        // Three days back is 12-04 18:30: its partition (12-04) is kept, 12-03 and older go.
        assert_eq!(w.cutoff(now), Some(at("2026-12-04T00:00:00Z")));
        let wanted = w.wanted(now);
        assert_eq!(wanted.first(), Some(&(at("2026-12-06T00:00:00Z"), at("2026-12-07T00:00:00Z"))));
        assert_eq!(wanted.last(), Some(&(at("2026-12-09T00:00:00Z"), at("2026-12-10T00:00:00Z"))));
        assert_eq!(wanted.len(), 4);
        assert_eq!(partition_name("action_results", at("2026-12-07T00:00:00Z")), "action_results_p20261207_000000");
        // Before the epoch too: aligned downwards.
        assert_eq!(w.start_of(at("1969-12-31T12:00:00Z")), at("1969-12-31T00:00:00Z"));
        let forever = Window::new(&RetentionConfig::default());
        assert_eq!(forever.cutoff(now), None);
        assert!(!forever.expired(at("1970-01-01T00:00:00Z")));
    }
}
