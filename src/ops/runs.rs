//! `weir runs`: what happened to a workflow run, from PostgreSQL (`action_results`,
//! `workflow_runs`, `run_cancellations`), and cancelling one.
//!
//! A run's rows are read by its id (indexed: `action_results_run`); `list` scans results by
//! `finished_at` (indexed with the tenant). Cancelling writes one row to `run_cancellations`; the
//! record stage reads it in the transaction that would start the run's next steps, and records
//! those steps `cancelled` instead (see `stages::record::runs`). It also produces the
//! cancellation to the compacted `cancellations` topic, which every executor follows
//! (`stages::execute::cancelled`): a step already on its action topic is recorded `cancelled`
//! instead of being called. Only a call already under way when the cancellation arrives runs to
//! its end.

use std::fmt::Write as _;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::{
    config::Config, engine::workflow, envelope::Format, kafka, ops::workflows,
    stages::execute::cancelled::Cancellation, stages::record,
};

/// What `weir runs list` selects.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub tenant: Option<String>,
    pub workflow: Option<String>,
    /// A run status: running, succeeded, failed or cancelled.
    pub status: Option<String>,
    /// Runs with a step that finished at or after this time.
    pub since: Option<DateTime<Utc>>,
    pub limit: i64,
}

/// One line of `weir runs list`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RunLine {
    pub run_id: String,
    pub tenant: String,
    pub workflow_id: String,
    pub status: String,
    pub steps: i64,
    pub last_finished: DateTime<Utc>,
}

/// One step of `weir runs show`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StepLine {
    pub step_id: String,
    pub status: String,
    pub attempts: i32,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub latency_ms: f64,
    pub error: Option<String>,
    /// Bytes of the stored output (JSON text); none without output.
    pub output_bytes: Option<i32>,
}

/// `weir runs show`: the run and its steps in the workflow's order.
#[derive(Debug, Clone)]
pub struct RunDetail {
    pub run_id: String,
    pub tenant: String,
    pub workflow_id: String,
    pub workflow_version: i64,
    /// The run's status: from `workflow_runs` for multi-step runs, else its one step's.
    pub status: String,
    pub error: Option<String>,
    pub steps: Vec<StepLine>,
    /// Steps of the definition with no result yet (not started, or under way).
    pub pending: Vec<String>,
}

async fn pool(config: &Config) -> anyhow::Result<PgPool> {
    let pool = record::pool(config)?;
    record::migrate(&pool).await?;
    Ok(pool)
}

/// A run's status: `workflow_runs` holds multi-step runs'; a single-step run's is its step's
/// (`skipped` and `expired` steps end a run as the run statuses say: succeeded and failed).
const RUN_STATUS: &str = "coalesce(w.status, case when bool_or(r.status in ('failed', 'expired', 'cancelled')) \
                          then 'failed' else 'succeeded' end)";

pub async fn list(config: &Config, filter: &Filter) -> anyhow::Result<Vec<RunLine>> {
    let pool = pool(config).await?;
    let sql = format!(
        "select r.run_id, min(r.tenant) as tenant, min(r.workflow_id) as workflow_id, {RUN_STATUS} as status,
                count(*) as steps, max(r.finished_at) as last_finished
         from action_results r left join workflow_runs w on w.run_id = r.run_id
         where ($1::text is null or r.tenant = $1) and ($2::text is null or r.workflow_id = $2)
           and ($3::timestamptz is null or r.finished_at >= $3)
         group by r.run_id, w.status
         having ($4::text is null or {RUN_STATUS} = $4)
         order by max(r.finished_at) desc
         limit $5"
    );
    let lines = sqlx::query_as(&sql)
        .bind(&filter.tenant)
        .bind(&filter.workflow)
        .bind(filter.since)
        .bind(&filter.status)
        .bind(filter.limit)
        .fetch_all(&pool)
        .await
        .context("listing runs")?;
    pool.close().await;
    Ok(lines)
}

pub fn render_list(lines: &[RunLine]) -> String {
    let mut out =
        format!("{:<44} {:<16} {:<24} {:<10} {:>5}  last finished\n", "run", "tenant", "workflow", "status", "steps");
    for l in lines {
        let _ = writeln!(
            out,
            "{:<44} {:<16} {:<24} {:<10} {:>5}  {}",
            l.run_id,
            l.tenant,
            l.workflow_id,
            l.status,
            l.steps,
            l.last_finished.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        );
    }
    if lines.is_empty() {
        out.push_str("no runs match\n");
    }
    out
}

pub async fn show(config: &Config, run_id: &str) -> anyhow::Result<RunDetail> {
    let pool = pool(config).await?;
    let mut steps: Vec<StepLine> = sqlx::query_as(
        "select step_id, status, attempts,
                finished_at - make_interval(secs => latency_ms / 1000) as started_at, finished_at, latency_ms,
                error, octet_length(output::text) as output_bytes
         from action_results where run_id = $1 order by finished_at, step_id",
    )
    .bind(run_id)
    .fetch_all(&pool)
    .await
    .context("reading the run's steps")?;
    let head: Option<(String, String, i64, String, Option<String>)> = sqlx::query_as(
        "select tenant, workflow_id, workflow_version, status, error from workflow_runs where run_id = $1",
    )
    .bind(run_id)
    .fetch_optional(&pool)
    .await?;
    let meta: Option<(String, String, i64)> =
        sqlx::query_as("select tenant, workflow_id, workflow_version from action_results where run_id = $1 limit 1")
            .bind(run_id)
            .fetch_optional(&pool)
            .await?;
    pool.close().await;
    let (tenant, workflow_id, workflow_version, status, error) = match (head, meta) {
        (Some(h), _) => h,
        (None, Some((t, w, v))) => {
            let failed = steps.iter().find(|s| matches!(s.status.as_str(), "failed" | "expired" | "cancelled"));
            let status = if failed.is_some() { "failed" } else { "succeeded" };
            (t, w, v, status.to_string(), failed.and_then(|s| s.error.clone()))
        }
        (None, None) => anyhow::bail!("no run {run_id:?}: no results or run state recorded under that id"),
    };
    // The workflow's order, from the published definition; a step it no longer has keeps its
    // place by finish time, after the known ones.
    let cfg = config.clone();
    let definitions = tokio::task::spawn_blocking(move || workflows::read_current(&cfg)).await??;
    let order: Vec<String> = definitions
        .get(&workflow::key(Some(&tenant), &workflow_id))
        .or_else(|| definitions.get(&workflow::key(None, &workflow_id)))
        .map(|wf| wf.steps.iter().map(|s| s.id.clone()).collect())
        .unwrap_or_default();
    let place = |id: &str| order.iter().position(|s| s == id).unwrap_or(order.len());
    steps.sort_by_key(|s| place(&s.step_id));
    let pending = order.iter().filter(|id| !steps.iter().any(|s| &s.step_id == *id)).cloned().collect();
    Ok(RunDetail { run_id: run_id.to_string(), tenant, workflow_id, workflow_version, status, error, steps, pending })
}

pub fn render_detail(d: &RunDetail) -> String {
    let mut out = format!(
        "run {}\ntenant {}  workflow {} v{}  status {}\n",
        d.run_id, d.tenant, d.workflow_id, d.workflow_version, d.status
    );
    if let Some(e) = &d.error {
        let _ = writeln!(out, "error: {e}");
    }
    let _ = writeln!(
        out,
        "{:<20} {:<10} {:>8}  {:<24} {:<24} {:>10} {:>8}  error",
        "step", "status", "attempts", "started", "finished", "latency", "output"
    );
    let time = |t: &DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    for s in &d.steps {
        let output = s.output_bytes.map(|b| format!("{b} B")).unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{:<20} {:<10} {:>8}  {:<24} {:<24} {:>8.0}ms {:>8}  {}",
            s.step_id,
            s.status,
            s.attempts,
            time(&s.started_at),
            time(&s.finished_at),
            s.latency_ms,
            output,
            s.error.as_deref().unwrap_or("")
        );
    }
    for id in &d.pending {
        let _ = writeln!(out, "{id:<20} {:<10}", "pending");
    }
    out
}

/// Cancels a run: its steps not yet started are not started. Returns false when the run had
/// already ended (nothing to stop) or was cancelled before.
pub async fn cancel(config: &Config, run_id: &str, reason: &str) -> anyhow::Result<bool> {
    let pool = pool(config).await?;
    let known: Option<String> = sqlx::query_scalar("select status from workflow_runs where run_id = $1")
        .bind(run_id)
        .fetch_optional(&pool)
        .await?;
    // A multi-step run has its row once its first step finished; before that (or for a
    // single-step run) a cancellation still applies when the record stage first sees it.
    if known.as_deref().is_some_and(|s| s != "running") {
        pool.close().await;
        return Ok(false);
    }
    let inserted =
        sqlx::query("insert into run_cancellations (run_id, reason) values ($1, $2) on conflict (run_id) do nothing")
            .bind(run_id)
            .bind(reason)
            .execute(&pool)
            .await
            .context("recording the cancellation")?
            .rows_affected();
    // Produced even when the row was there already: a cancel whose produce failed is completed
    // by running it again (a second record of the run replaces the first when compacted).
    let recorded: String = sqlx::query_scalar("select reason from run_cancellations where run_id = $1")
        .bind(run_id)
        .fetch_one(&pool)
        .await
        .context("reading the cancellation back")?;
    pool.close().await;
    let producer = kafka::producer(config)?;
    let payload = serde_json::to_vec(&Cancellation { reason: recorded }).expect("a cancellation serializes");
    let topic = config.names().cancellations();
    kafka::send(&producer, &topic, Some(run_id.as_bytes()), &payload, kafka::content_headers(Format::Json))
        .await
        .with_context(|| {
            format!("producing the cancellation to {topic} (the executors read it there); run the command again")
        })?;
    Ok(inserted == 1)
}
