//! A replay's record in PostgreSQL (table `replays`, `migrations/0010_replays.sql`): what it
//! selected, where it stands, what it sent. Why PostgreSQL and not a compacted topic: the
//! replay already asks PostgreSQL what each event's runs did, and a row updated in place
//! (positions and tally in one statement) is exactly a checkpoint; a topic would need its own
//! reader to answer `weir replay list`.
//!
//! Whether a replay is running is not a column a killed process could leave wrong: the running
//! process holds a PostgreSQL advisory lock named after the replay, which the server releases
//! when its connection ends, however the process ended. `list` and `--resume` ask for that lock.

use std::collections::BTreeMap;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{Connection as _, PgConnection, PgPool};

use super::{read::Bounds, Selection, Tally};

/// A replay as stored.
#[derive(Debug, Clone)]
pub struct Stored {
    pub id: String,
    pub created_at: DateTime<Utc>,
    pub state: State,
    pub selection: Selection,
    pub bounds: Bounds,
    /// Per events partition, the next offset to read.
    pub positions: BTreeMap<i32, i64>,
    pub tally: Tally,
    /// When `positions` and `tally` were last written.
    pub checkpoint_at: DateTime<Utc>,
    pub error: Option<String>,
}

impl Stored {
    /// Events the selection covers, and how many of them were read.
    pub fn progress(&self) -> (u64, u64) {
        let total = self.bounds.values().map(|(s, e)| (e - s) as u64).sum();
        let read = self
            .bounds
            .iter()
            .map(|(p, (s, _))| (self.positions.get(p).copied().unwrap_or(*s) - s).max(0) as u64)
            .sum();
        (total, read)
    }
}

/// `replays.state`. "Interrupted" is not stored: it is `Running` without a process holding the
/// replay's lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Running,
    Finished,
    Failed,
}

impl State {
    fn as_sql(self) -> &'static str {
        match self {
            State::Running => "running",
            State::Finished => "finished",
            State::Failed => "failed",
        }
    }

    fn from_sql(text: &str) -> anyhow::Result<State> {
        [State::Running, State::Finished, State::Failed]
            .into_iter()
            .find(|s| s.as_sql() == text)
            .with_context(|| format!("unknown replay state {text:?}"))
    }
}

/// Partitions as JSON object keys (JSON keys are strings).
#[derive(Serialize, Deserialize)]
struct Json<T>(BTreeMap<String, T>);

fn to_json<T: Serialize + Clone>(map: &BTreeMap<i32, T>) -> serde_json::Value {
    serde_json::to_value(Json(map.iter().map(|(k, v)| (k.to_string(), v.clone())).collect())).unwrap_or_default()
}

fn from_json<T: for<'de> Deserialize<'de>>(value: serde_json::Value) -> anyhow::Result<BTreeMap<i32, T>> {
    let Json(map) = serde_json::from_value::<Json<T>>(value)?;
    map.into_iter().map(|(k, v)| Ok((k.parse()?, v))).collect()
}

pub async fn create(pool: &PgPool, id: &str, selection: &Selection, bounds: &Bounds) -> anyhow::Result<()> {
    let positions: BTreeMap<i32, i64> = bounds.iter().map(|(p, (s, _))| (*p, *s)).collect();
    sqlx::query(
        "insert into replays (id, state, selection, bounds, positions, tally) values ($1, 'running', $2, $3, $4, $5)",
    )
    .bind(id)
    .bind(serde_json::to_value(selection)?)
    .bind(to_json(bounds))
    .bind(to_json(&positions))
    .bind(serde_json::to_value(Tally::default())?)
    .execute(pool)
    .await
    .with_context(|| format!("recording replay {id}"))?;
    Ok(())
}

type Row = (
    String,
    DateTime<Utc>,
    String,
    serde_json::Value,
    serde_json::Value,
    serde_json::Value,
    serde_json::Value,
    DateTime<Utc>,
    Option<String>,
);

const COLUMNS: &str = "id, created_at, state, selection, bounds, positions, tally, checkpoint_at, error";

fn decode(row: Row) -> anyhow::Result<Stored> {
    let (id, created_at, state, selection, bounds, positions, tally, checkpoint_at, error) = row;
    let context = || format!("replay {id}'s record is unreadable");
    Ok(Stored {
        state: State::from_sql(&state).with_context(context)?,
        selection: serde_json::from_value(selection).with_context(context)?,
        bounds: from_json(bounds).with_context(context)?,
        positions: from_json(positions).with_context(context)?,
        tally: serde_json::from_value(tally).with_context(context)?,
        id,
        created_at,
        checkpoint_at,
        error,
    })
}

pub async fn load(pool: &PgPool, id: &str) -> anyhow::Result<Stored> {
    let row: Option<Row> = sqlx::query_as(&format!("select {COLUMNS} from replays where id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await
        .context("reading the replays table")?;
    decode(row.with_context(|| format!("no replay {id:?}; `weir replay list` shows them"))?)
}

/// Every replay, newest first.
pub async fn all(pool: &PgPool) -> anyhow::Result<Vec<Stored>> {
    let rows: Vec<Row> = sqlx::query_as(&format!("select {COLUMNS} from replays order by created_at desc, id"))
        .fetch_all(pool)
        .await
        .context("reading the replays table")?;
    rows.into_iter().map(decode).collect()
}

/// Records that everything before `positions` was sent (and acknowledged), with the tally.
pub async fn checkpoint(pool: &PgPool, id: &str, positions: &BTreeMap<i32, i64>, tally: &Tally) -> anyhow::Result<()> {
    sqlx::query(
        "update replays set positions = $2, tally = $3, checkpoint_at = now(), updated_at = now() where id = $1",
    )
    .bind(id)
    .bind(to_json(positions))
    .bind(serde_json::to_value(tally)?)
    .execute(pool)
    .await
    .with_context(|| format!("recording replay {id}'s progress (retryable: resume it)"))?;
    Ok(())
}

pub async fn end(pool: &PgPool, id: &str, state: State, error: Option<&str>) -> anyhow::Result<()> {
    sqlx::query("update replays set state = $2, error = $3, updated_at = now() where id = $1")
        .bind(id)
        .bind(state.as_sql())
        .bind(error)
        .execute(pool)
        .await
        .with_context(|| format!("recording replay {id}'s end"))?;
    Ok(())
}

/// The replay's advisory lock, held by the connection it was taken on until that closes.
pub struct Lock(PgConnection);

impl Lock {
    /// Takes replay `id`'s lock; `None` when another session holds it (the replay is running).
    pub async fn take(database_url: &str, id: &str) -> anyhow::Result<Option<Lock>> {
        let mut db = PgConnection::connect(database_url).await.context("connecting to the database")?;
        // Two keys: a constant for "a weir replay" and the id's hash, so no other advisory lock
        // of the database is taken by accident.
        let (taken,): (bool,) = sqlx::query_as("select pg_try_advisory_lock(hashtext('weir replay'), hashtext($1))")
            .bind(id)
            .fetch_one(&mut db)
            .await
            .context("taking the replay's lock")?;
        Ok(taken.then_some(Lock(db)))
    }

    pub async fn release(self) {
        // Closing the connection releases the lock.
        let _ = self.0.close().await;
    }
}
