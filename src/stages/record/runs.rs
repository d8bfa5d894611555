//! Multi-step runs' state in PostgreSQL: what the record stage reads and writes, in the same
//! transaction as the results, to advance a run. Which steps start is decided by the engine's
//! planner ([`crate::engine::plan`]); this module only gathers what the planner needs and stores
//! what it decided.
//!
//! ## Why PostgreSQL holds run state
//! The record stage already writes every result into PostgreSQL; keeping run state there makes
//! "store these results" and "start these steps" one transaction. A compacted Kafka state topic
//! would need its own consumer, an in-memory view rebuilt on every rebalance, and a second write
//! per result; here the state is a query away and survives any worker. Results are keyed by
//! tenant, so all results of a run reach the same writer and no two writers advance a run at once.
//!
//! ## Exactly once per step
//! Inside the record stage's transaction: results are inserted (duplicates ignored), each
//! affected run is locked, its step outcomes and started steps are read, the planner decides, and
//! for every step to start `(run_id, step_id)` is inserted into `run_steps_started`; only steps
//! whose insert succeeded are produced, *before* the commit, and the commit happens only once the
//! broker acknowledged them. A crash before the commit replays the batch and re-produces the same
//! deterministic task ids — at worst a duplicate task with the same `Idempotency-Key`, never a
//! lost step.
//!
//! A step whose `failed` row is replaced by a later success (see [`rows`]'s repair) reopens its
//! failed run in the same transaction, with a fresh time limit; the planner then starts the steps
//! that needed it, each claimed once in `run_steps_started` like any other.
//!
//! A run not finished after `limits.max_run_seconds` fails with "run time limit exceeded" (when
//! its next result arrives, or at the stage's periodic sweep, [`expire`]). A run whose event does
//! not deserialize cannot be planned: it is recorded as failed with the reason.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

use chrono::{DateTime, Utc};
use serde_json::Value as Json;
use sqlx::{PgConnection, PgPool};

use crate::{
    engine::definitions::DefinitionStore,
    engine::plan::{self, Known, Outcome, RunState},
    engine::workflow::CompiledWorkflow,
    envelope::{ActionResult, ActionTask, Event as DomainEvent, Status},
    stages::record::rows,
    telemetry::{Event, Stage},
};

/// The reason a run past its deadline fails with.
pub(crate) const TIME_LIMIT: &str = "run time limit exceeded";

/// A run's status in `workflow_runs.status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunStatus {
    Running,
    Succeeded,
    Failed,
    /// Cancelled by an operator (`weir runs cancel`): the steps it would have started next were
    /// recorded `cancelled` instead.
    Cancelled,
}

// The statuses' SQL text, in one place: `workflow_runs.status` and `action_results.status`
// (whose CHECK constraints, in migrations/, allow exactly these).
impl RunStatus {
    pub(crate) fn as_sql(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
        }
    }

    pub(crate) fn from_sql(text: &str) -> Option<RunStatus> {
        [RunStatus::Running, RunStatus::Succeeded, RunStatus::Failed, RunStatus::Cancelled]
            .into_iter()
            .find(|s| s.as_sql() == text)
    }
}

/// A step's status as `action_results.status` holds it (written by [`rows::Columns`] with
/// [`Status::as_str`]).
pub(crate) fn step_status(text: &str) -> Option<Status> {
    [Status::Succeeded, Status::Failed, Status::Skipped, Status::Expired, Status::Cancelled]
        .into_iter()
        .find(|s| s.as_str() == text)
}

/// What a batch of results sets in motion: tasks to produce and results decided without a call.
#[derive(Default)]
pub(crate) struct Advance {
    pub tasks: Vec<ActionTask>,
    pub results: Vec<ActionResult>,
}

pub(crate) struct Coordinator {
    definitions: Arc<DefinitionStore>,
}

/// A run to plan: its definition (the version it was started with) and its event.
struct Run<'a> {
    workflow: Arc<CompiledWorkflow>,
    event: DomainEvent,
    first: &'a ActionResult,
    /// When the run started (its rows' partition key): on every task and result it leads to.
    run_at: DateTime<Utc>,
}

/// The `run_at`s the rows of a batch's runs can have, lowest and highest.
type Span = (DateTime<Utc>, DateTime<Utc>);

/// The [`Span`] of `runs`, so that the look-ups of a batch's runs by id read only the partitions
/// that can hold them (with a month of daily partitions, reading all of them made the look-up of
/// 2,000 runs 17 times slower). Every row of a run has the run's `run_at` — but for runs begun
/// before `run_at` existed, whose rows have their own `finished_at`s, all within the run's time
/// limit of each other: hence the margin of the longest time limit (and an hour for clocks), and
/// no bound at all when a result carries no `run_at`.
fn span(runs: &BTreeMap<&str, Run>) -> Span {
    if runs.values().any(|run| run.first.run_at.is_none()) {
        return ALL;
    }
    let longest = runs.values().map(|run| run.workflow.def.limits.max_run_seconds).max().unwrap_or(0);
    let margin = chrono::Duration::seconds(longest.min(i64::MAX as u64 / 2_000) as i64 + 3_600);
    let earliest = runs.values().map(|run| run.run_at).min().and_then(|t| t.checked_sub_signed(margin));
    let latest = runs.values().map(|run| run.run_at).max().and_then(|t| t.checked_add_signed(margin));
    (earliest.unwrap_or(ALL.0).max(ALL.0), latest.unwrap_or(ALL.1).min(ALL.1))
}

/// Every `run_at` PostgreSQL can hold that weir writes: 0001-01-01 to 9999-12-31 (PostgreSQL's
/// timestamps run from 4713 BC to 294276 AD, chrono's wider still).
const ALL: Span = (
    match DateTime::<Utc>::from_timestamp(-62_135_596_800, 0) {
        Some(t) => t,
        None => DateTime::<Utc>::MIN_UTC,
    },
    match DateTime::<Utc>::from_timestamp(253_402_300_799, 0) {
        Some(t) => t,
        None => DateTime::<Utc>::MAX_UTC,
    },
);

/// The run's `run_at` as `r` carries it (see [`rows::run_at`]).
fn run_at_of(r: &ActionResult) -> DateTime<Utc> {
    let finished_at = DateTime::parse_from_rfc3339(&r.finished_at).map(|t| t.with_timezone(&Utc));
    rows::run_at(r, finished_at.unwrap_or_else(|_| Utc::now()))
}

/// A stored step outcome: run id, step id, status, output, error.
type StepRow = (String, String, String, Option<Json>, Option<String>);

impl Coordinator {
    pub fn new(definitions: Arc<DefinitionStore>) -> Self {
        Coordinator { definitions }
    }

    fn definition(&self, r: &ActionResult) -> Option<Arc<CompiledWorkflow>> {
        self.definitions
            .version(Some(&r.tenant), &r.workflow_id, r.workflow_version)
            .or_else(|| self.definitions.version(None, &r.workflow_id, r.workflow_version))
    }

    /// Advances the runs of `results` (already inserted in `tx`). `repaired` are the runs of
    /// rows this batch turned from `failed` to `succeeded`: a run that failed is reopened first,
    /// so the steps that needed the repaired one start. Returns the steps to start and the
    /// skipped/failed results to store; the caller inserts those, produces the tasks, and commits.
    pub async fn advance(
        &self,
        tx: &mut PgConnection,
        results: &[ActionResult],
        repaired: &[String],
    ) -> Result<Advance, sqlx::Error> {
        let mut runs: BTreeMap<&str, Run> = BTreeMap::new();
        let mut broken: BTreeMap<&str, (&ActionResult, String)> = BTreeMap::new();
        for r in results.iter().filter(|r| !r.event.is_null()) {
            if runs.contains_key(r.run_id.as_str()) || broken.contains_key(r.run_id.as_str()) {
                continue;
            }
            let Some(workflow) = self.definition(r) else {
                // Another worker may know the version already (an apply on its way here): the run
                // waits, and fails at its deadline if this worker never learns it.
                tracing::error!(
                    run = r.run_id,
                    workflow = r.workflow_id,
                    version = r.workflow_version,
                    "definition version unknown to this worker; run cannot advance"
                );
                continue;
            };
            match serde_json::from_value::<DomainEvent>(r.event.clone()) {
                Ok(event) => {
                    runs.insert(&r.run_id, Run { workflow, event, first: r, run_at: run_at_of(r) });
                }
                Err(e) => {
                    // The same bytes fail the same way on every replay: the run can never be
                    // planned, so it ends here, saying why.
                    let reason = format!("the run's event does not deserialize: {e}");
                    Event::Failed { stage: Stage::Sink, reason: "run", retryable: false, detail: &reason }.emit();
                    broken.insert(&r.run_id, (r, reason));
                }
            }
        }
        let mut advance = Advance::default();
        for (r, reason) in broken.values() {
            let deadline = self.definition(r).map_or(0, |wf| wf.def.limits.max_run_seconds);
            insert_run(tx, r, deadline, RunStatus::Failed, Some(reason), ALL).await?;
            finish(tx, &r.run_id, RunStatus::Failed, Some(reason), ALL).await?;
        }
        if runs.is_empty() {
            return Ok(advance);
        }
        let span = span(&runs);
        for run in runs.values() {
            let max_run_seconds = run.workflow.def.limits.max_run_seconds;
            insert_run(tx, run.first, max_run_seconds, RunStatus::Running, None, span).await?;
        }
        for run_id in repaired.iter().collect::<BTreeSet<_>>() {
            if let Some(run) = runs.get(run_id.as_str()) {
                reopen(tx, run_id, run.workflow.def.limits.max_run_seconds, span).await?;
            }
        }
        let ids: Vec<&str> = runs.keys().copied().collect();
        let state: Vec<(String, String, bool)> = sqlx::query_as(
            "select run_id, status, deadline < now() from workflow_runs where run_id = any($1) and run_at between $2 and $3
             for update",
        )
        .bind(&ids)
        .bind(span.0)
        .bind(span.1)
        .fetch_all(&mut *tx)
        .await?;
        let rows: Vec<StepRow> = sqlx::query_as(
            "select run_id, step_id, status, output, error from action_results where run_id = any($1) and run_at between $2 and $3",
        )
        .bind(&ids)
        .bind(span.0)
        .bind(span.1)
        .fetch_all(&mut *tx)
        .await?;
        let started: Vec<(String, String)> =
            sqlx::query_as("select run_id, step_id from run_steps_started where run_id = any($1)")
                .bind(&ids)
                .fetch_all(&mut *tx)
                .await?;
        let mut known: HashMap<&str, Known> =
            runs.iter().map(|(&id, run)| (id, Known::under_way(&run.workflow))).collect();
        for (run, step, status, output, error) in &rows {
            let Some(k) = known.get_mut(run.as_str()) else { continue };
            // The CHECK constraint allows only known statuses; anything else could not advance.
            let status = step_status(status).unwrap_or(Status::Failed);
            k.outcomes.insert(step, Outcome { status, output: output.as_ref(), error: error.as_deref() });
        }
        for (run, step) in &started {
            if let Some(k) = known.get_mut(run.as_str()) {
                k.started.insert(step);
            }
        }
        // Runs an operator cancelled (`weir runs cancel`): one indexed look-up per batch.
        let cancelled: HashMap<String, String> =
            sqlx::query_as("select run_id, reason from run_cancellations where run_id = any($1)")
                .bind(&ids)
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .collect();
        let now = chrono::Utc::now().to_rfc3339();
        let mut finished: Vec<(&str, RunStatus, Option<String>)> = Vec::new();
        for (run_id, status, expired) in &state {
            if RunStatus::from_sql(status) != Some(RunStatus::Running) {
                continue;
            }
            let run_id = run_id.as_str();
            let Some(run) = runs.get(run_id) else { continue };
            if *expired {
                finished.push((run_id, RunStatus::Failed, Some(TIME_LIMIT.into())));
                continue;
            }
            let plan = plan::next(&run.workflow, &run.event, run_id, &known[run_id], &now).stamped(Some(run.run_at));
            if let Some(reason) = cancelled.get(run_id) {
                // The steps it would start now are recorded `cancelled`, never produced; the
                // run ends here (steps after them would need them, so none can start).
                let why = format!("run cancelled: {reason}");
                advance.results.extend(plan.decided);
                advance.results.extend(plan.tasks.into_iter().map(|t| ActionResult {
                    error: Some(why.clone()),
                    attempts: 0,
                    ..ActionResult::from_task(t, Status::Cancelled, std::time::Duration::ZERO)
                }));
                finished.push((run_id, RunStatus::Cancelled, Some(why)));
                continue;
            }
            advance.tasks.extend(plan.tasks);
            advance.results.extend(plan.decided);
            match plan.state {
                RunState::Running => {}
                RunState::Succeeded => finished.push((run_id, RunStatus::Succeeded, None)),
                RunState::Failed(reason) => finished.push((run_id, RunStatus::Failed, Some(reason))),
            }
        }
        // Claim the steps to start; a step already claimed by an earlier (replayed) batch is not
        // produced again.
        if !advance.tasks.is_empty() {
            let (runs_col, steps_col): (Vec<&str>, Vec<&str>) =
                advance.tasks.iter().map(|t| (t.run_id.as_str(), t.step_id.as_str())).unzip();
            let claimed: BTreeSet<(String, String)> = sqlx::query_as(
                "insert into run_steps_started (run_id, step_id) select * from unnest($1::text[], $2::text[])
                 on conflict do nothing returning run_id, step_id",
            )
            .bind(&runs_col)
            .bind(&steps_col)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect();
            advance.tasks.retain(|t| claimed.contains(&(t.run_id.clone(), t.step_id.clone())));
        }
        for (run_id, status, error) in finished {
            finish(tx, run_id, status, error.as_deref(), span).await?;
        }
        Ok(advance)
    }
}

/// Creates the run's row if it has none. Its event is stored with U+0000 replaced
/// ([`rows::storable`]): `jsonb` cannot hold it. The key is (run_id, run_at), `run_at` the same for
/// every result of the run; a run looked up by its id alone as well covers results that fell back
/// to their `finished_at` (from before `run_at` existed): one row per run whatever they say.
async fn insert_run(
    tx: &mut PgConnection,
    r: &ActionResult,
    max_run_seconds: u64,
    status: RunStatus,
    error: Option<&str>,
    span: Span,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "insert into workflow_runs (run_id, tenant, workflow_id, workflow_version, event_id, event, status, error,
             deadline, run_at)
         select $1, $2, $3, $4, $5, $6, $7, $8, now() + make_interval(secs => $9), $10
         where not exists (select 1 from workflow_runs where run_id = $1 and run_at between $11 and $12)
         on conflict (run_id, run_at) do nothing",
    )
    .bind(&r.run_id)
    .bind(&r.tenant)
    .bind(&r.workflow_id)
    .bind(r.workflow_version)
    .bind(&r.event_id)
    .bind(&*rows::storable(&r.event))
    .bind(status.as_sql())
    .bind(error.map(rows::storable_text))
    .bind(max_run_seconds as f64)
    .bind(run_at_of(r))
    .bind(span.0)
    .bind(span.1)
    .execute(&mut *tx)
    .await
    .map(|_| ())
}

/// Reopens a run that failed, after one of its failed steps succeeded (a redrive or a replay):
/// the planner then sees the repaired step and starts what needed it, or fails the run again if
/// another step still failed. The repair is deliberate, so the run gets its time limit again from
/// now (it may have failed a while ago). A run that did not fail is left as it is.
async fn reopen(tx: &mut PgConnection, run_id: &str, max_run_seconds: u64, span: Span) -> Result<(), sqlx::Error> {
    sqlx::query(
        "update workflow_runs set status = $2, error = null, finished_at = null,
             deadline = greatest(deadline, now() + make_interval(secs => $3))
         where run_id = $1 and status = $4 and run_at between $5 and $6",
    )
    .bind(run_id)
    .bind(RunStatus::Running.as_sql())
    .bind(max_run_seconds as f64)
    .bind(RunStatus::Failed.as_sql())
    .bind(span.0)
    .bind(span.1)
    .execute(&mut *tx)
    .await
    .map(|_| ())
}

/// Ends a running run.
async fn finish(
    tx: &mut PgConnection,
    run_id: &str,
    status: RunStatus,
    error: Option<&str>,
    span: Span,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "update workflow_runs set status = $2, error = $3, finished_at = now()
         where run_id = $1 and status = $4 and run_at between $5 and $6",
    )
    .bind(run_id)
    .bind(status.as_sql())
    .bind(error.map(rows::storable_text))
    .bind(RunStatus::Running.as_sql())
    .bind(span.0)
    .bind(span.1)
    .execute(&mut *tx)
    .await
    .map(|_| ())
}

/// Fails running runs past their deadline, so a run whose step never reports still ends.
pub(crate) async fn expire(pool: &PgPool) -> Result<u64, sqlx::Error> {
    sqlx::query(
        "update workflow_runs set status = $1, error = $2, finished_at = now() where status = $3 and deadline < now()",
    )
    .bind(RunStatus::Failed.as_sql())
    .bind(TIME_LIMIT)
    .bind(RunStatus::Running.as_sql())
    .execute(pool)
    .await
    .map(|r| r.rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_their_sql_text_and_back() {
        for s in [RunStatus::Running, RunStatus::Succeeded, RunStatus::Failed] {
            assert_eq!(RunStatus::from_sql(s.as_sql()), Some(s));
        }
        for s in [Status::Succeeded, Status::Failed, Status::Skipped] {
            assert_eq!(step_status(s.as_str()), Some(s));
        }
        assert_eq!(RunStatus::from_sql("Running"), None);
        assert_eq!(step_status(""), None);
    }

    #[test]
    fn a_batch_s_runs_are_looked_up_around_their_run_at_and_everywhere_without_one() {
        let yaml = "{id: w, version: 1, trigger: {type: t}, limits: {max_run_seconds: 600}, steps: [{id: s, service: webhook}]}";
        let def: crate::engine::workflow::Workflow = serde_yaml_ng::from_str(yaml).unwrap();
        let workflow = Arc::new(CompiledWorkflow::compile(def, &BTreeSet::from(["webhook"])).unwrap());
        let event: DomainEvent =
            serde_json::from_value(serde_json::json!({"id": "e", "source": "/s", "type": "t", "tenant": "x"})).unwrap();
        let result = |run_at: Option<&str>| -> ActionResult {
            let mut r = serde_json::json!({"task_id": "k", "run_id": "r", "event_id": "e", "tenant": "x",
                "workflow_id": "w", "workflow_version": 1, "step_id": "s", "service": "webhook",
                "status": "succeeded", "attempts": 1, "latency_ms": 1.0, "finished_at": "2026-12-07T12:00:00Z"});
            if let Some(t) = run_at {
                r["run_at"] = t.into();
            }
            serde_json::from_value(r).unwrap()
        };
        let (early, late, legacy) =
            (result(Some("2026-12-07T10:00:00Z")), result(Some("2026-12-07T11:00:00Z")), result(None));
        let run = |first| Run { workflow: workflow.clone(), event: event.clone(), first, run_at: run_at_of(first) };
        let runs = BTreeMap::from([("a", run(&early)), ("b", run(&late))]);
        // The earliest less (and the latest plus) the longest time limit and an hour.
        let at = |t: &str| t.parse::<DateTime<Utc>>().unwrap();
        assert_eq!(span(&runs), (at("2026-12-07T08:50:00Z"), at("2026-12-07T12:10:00Z")));
        let runs = BTreeMap::from([("a", run(&early)), ("c", run(&legacy))]);
        assert_eq!(span(&runs), ALL, "a result without run_at: its rows may be anywhere");
    }
}
