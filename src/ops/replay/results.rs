//! `weir replay results`: rebuilding `action_results` from the results topic, e.g. after the
//! database was restored from a backup older than the topic's retention.
//!
//! Every result record between `--from` and `--to` is decoded and written with the record stage's
//! own statement ([`Columns::insert`]), in partition order, so the rows come out as the record
//! stage wrote them, and a row already there is left as it is: running it twice, or over rows
//! that survived, changes nothing.
//!
//! What it does not rebuild: the rows the record stage decides without a result record (a
//! multi-step run's skipped steps and steps that failed before their call), and the run tables
//! (`workflow_runs`, `run_steps_started`). docs/recovery.md says what to do about those.

use chrono::{DateTime, Utc};
use rdkafka::Message as _;

use super::read;
use crate::{
    config::Config,
    envelope, kafka,
    stages::record::{self, decode_row, Columns},
};

/// What a rebuild did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rebuilt {
    /// Result records read.
    pub read: u64,
    /// Records that are not results (they were dead-lettered by the record stage too).
    pub undecodable: u64,
    /// Rows PostgreSQL refused as data (as it did when the record stage dead-lettered them).
    pub refused: u64,
    /// Rows `action_results` holds now and did not before.
    pub added: u64,
}

/// Writes every result on the results topic in `[from, to)` into `action_results`.
pub async fn rebuild(config: &Config, from: DateTime<Utc>, to: Option<DateTime<Utc>>) -> anyhow::Result<Rebuilt> {
    let pool = record::pool(config)?;
    record::migrate(&pool).await?;
    let topic = config.names().results();
    let (c, t) = (config.clone(), topic.clone());
    let bounds = tokio::task::spawn_blocking(move || read::bounds(&c, &t, from, to)).await??;
    let group = config.names().group("replay-results");
    let mut reader = read::Reader::open(config, &group, &topic, &bounds, &Default::default())?;
    let count = || async {
        let (n,): (i64,) = sqlx::query_as("select count(*) from action_results")
            .fetch_one(&pool)
            .await
            .map_err(|e| anyhow::anyhow!("counting action_results: {e}"))?;
        anyhow::Ok(n)
    };
    let before = count().await?;
    let mut rebuilt = Rebuilt::default();
    loop {
        let chunk = reader.next_chunk(config.sink.batch_size).await?;
        if chunk.is_empty() && reader.finished() {
            break;
        }
        let mut columns = Columns::default();
        let mut rows = Vec::with_capacity(chunk.len());
        for m in &chunk {
            rebuilt.read += 1;
            let content_type = kafka::header(m.headers(), envelope::CONTENT_TYPE);
            match decode_row(m.payload().unwrap_or_default(), content_type) {
                Ok((result, finished_at)) => {
                    rows.push((result.clone(), finished_at));
                    columns.push(result, finished_at);
                }
                Err(_) => rebuilt.undecodable += 1,
            }
        }
        if columns.is_empty() {
            continue;
        }
        let mut db = pool.acquire().await.map_err(|e| anyhow::anyhow!("connecting to the database: {e}"))?;
        let inserted = columns.insert(&mut db).await;
        // A task failed, then succeeded (a redrive): the success replaces the failure, as the
        // record stage did.
        if inserted.as_ref().is_ok_and(|n| (*n as usize) < columns.len()) {
            columns
                .repair(&mut db)
                .await
                .map_err(|e| anyhow::anyhow!("repairing rebuilt rows (retryable: run it again): {e}"))?;
        }
        if let Err(batch) = inserted {
            // A row PostgreSQL refuses as data (the record stage dead-lettered it): one at a
            // time, so only such rows are left out; any other error stops the rebuild.
            for (result, finished_at) in rows {
                let mut one = Columns::default();
                one.push(result, finished_at);
                match one.insert(&mut db).await {
                    Ok(_) => {}
                    Err(sqlx::Error::Database(e))
                        if e.code().is_some_and(|c| matches!(c.get(..2), Some("22" | "23" | "54"))) =>
                    {
                        rebuilt.refused += 1;
                    }
                    Err(e) => anyhow::bail!("writing rebuilt rows (retryable: run it again): {e} (the batch: {batch})"),
                }
            }
        }
    }
    rebuilt.added = (count().await? - before).max(0) as u64;
    Ok(rebuilt)
}
