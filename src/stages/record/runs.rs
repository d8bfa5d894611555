//! Multi-step runs: deciding, as results arrive, which steps start next.
//!
//! ## Why PostgreSQL holds run state
//! The sink already writes every result into PostgreSQL; keeping run state there makes "store
//! these results" and "start these steps" one transaction. A compacted Kafka state topic would
//! need its own consumer, an in-memory view rebuilt on every rebalance, and a second write per
//! result; here the state is a query away and survives any worker. Results are keyed by tenant,
//! so all results of a run reach the same sink consumer and no two sinks advance a run at once.
//!
//! ## Exactly once per step
//! Inside the sink's transaction: results are inserted (duplicates ignored), each affected run is
//! locked, and for every step whose needs are all done the coordinator renders its input and
//! inserts `(run_id, step_id)` into `run_steps_started`; only steps whose insert succeeded are
//! produced, *before* the commit, and the commit happens only once the broker acknowledged them.
//! A crash before the commit replays the batch and re-produces the same deterministic task ids —
//! at worst a duplicate task with the same `Idempotency-Key`, never a lost step.
//!
//! ## Semantics (also in docs/workflows.md)
//! - A step starts after every step it `needs` succeeded; independent branches run in parallel;
//!   a join waits for all its parents and sees all their outputs (`steps.<id>.output`).
//! - A failed step fails the run: nothing after it starts.
//! - A step whose `if` is false is `skipped`, and so is every step that needs a skipped step.
//! - A run not finished after `limits.max_run_seconds` fails with "run time limit exceeded".

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

use serde_json::{json, Value as Json};
use sqlx::{Postgres, Transaction};

use crate::{
    engine::condition::{FieldPaths, Scope},
    engine::definitions::DefinitionStore,
    engine::template::Context,
    engine::workflow::{self, CompiledWorkflow},
    envelope::{ActionResult, ActionTask, Event, Status},
};

/// What a batch of results sets in motion: tasks to produce and results decided without a call.
#[derive(Default)]
pub struct Advance {
    pub tasks: Vec<ActionTask>,
    pub results: Vec<ActionResult>,
}

pub struct Coordinator {
    definitions: Arc<DefinitionStore>,
}

struct Run<'a> {
    workflow: Arc<CompiledWorkflow>,
    event: Event,
    first: &'a ActionResult,
}

impl Coordinator {
    pub fn new(definitions: Arc<DefinitionStore>) -> Self {
        Coordinator { definitions }
    }

    fn definition(&self, r: &ActionResult) -> Option<Arc<CompiledWorkflow>> {
        self.definitions
            .version(Some(&r.tenant), &r.workflow_id, r.workflow_version)
            .or_else(|| self.definitions.version(None, &r.workflow_id, r.workflow_version))
    }

    /// Advances the runs of `results` (already inserted in `tx`). Returns the steps to start and
    /// the skipped/failed results to store; the caller inserts those, produces the tasks, and
    /// commits.
    pub async fn advance(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        results: &[ActionResult],
    ) -> anyhow::Result<Advance> {
        let mut runs: BTreeMap<&str, Run> = BTreeMap::new();
        for r in results.iter().filter(|r| !r.event.is_null()) {
            if runs.contains_key(r.run_id.as_str()) {
                continue;
            }
            let Some(workflow) = self.definition(r) else {
                tracing::error!(
                    run = r.run_id,
                    workflow = r.workflow_id,
                    version = r.workflow_version,
                    "definition version unknown to this worker; run cannot advance"
                );
                continue;
            };
            let Ok(event) = serde_json::from_value::<Event>(r.event.clone()) else { continue };
            runs.insert(&r.run_id, Run { workflow, event, first: r });
        }
        let mut advance = Advance::default();
        if runs.is_empty() {
            return Ok(advance);
        }
        for run in runs.values() {
            sqlx::query(
                "insert into workflow_runs (run_id, tenant, workflow_id, workflow_version, event_id, event, status, deadline)
                 values ($1, $2, $3, $4, $5, $6, 'running', now() + make_interval(secs => $7))
                 on conflict (run_id) do nothing",
            )
            .bind(&run.first.run_id)
            .bind(&run.first.tenant)
            .bind(&run.first.workflow_id)
            .bind(run.first.workflow_version)
            .bind(&run.first.event_id)
            .bind(&run.first.event)
            .bind(run.workflow.def.limits.max_run_seconds as f64)
            .execute(&mut **tx)
            .await?;
        }
        let ids: Vec<String> = runs.keys().map(|s| s.to_string()).collect();
        let state: Vec<(String, String, bool)> = sqlx::query_as(
            "select run_id, status, deadline < now() from workflow_runs where run_id = any($1) for update",
        )
        .bind(&ids)
        .fetch_all(&mut **tx)
        .await?;
        let rows: Vec<StepRow> =
            sqlx::query_as("select run_id, step_id, status, output, error from action_results where run_id = any($1)")
                .bind(&ids)
                .fetch_all(&mut **tx)
                .await?;
        let started: Vec<(String, String)> =
            sqlx::query_as("select run_id, step_id from run_steps_started where run_id = any($1)")
                .bind(&ids)
                .fetch_all(&mut **tx)
                .await?;
        let mut steps_of: HashMap<&str, StepsDone> = HashMap::new();
        for (run, step, status, output, error) in &rows {
            steps_of.entry(run).or_default().insert(step, (status, output.as_ref(), error.as_deref()));
        }
        let mut started_of: HashMap<&str, BTreeSet<&str>> = HashMap::new();
        for (run, step) in &started {
            started_of.entry(run).or_default().insert(step);
        }
        let now = chrono::Utc::now().to_rfc3339();
        let mut finished: Vec<(String, &str, Option<String>)> = Vec::new();
        for (run_id, status, expired) in &state {
            if status != "running" {
                continue;
            }
            let run = &runs[run_id.as_str()];
            if *expired {
                finished.push((run_id.clone(), "failed", Some("run time limit exceeded".into())));
                continue;
            }
            let done = steps_of.remove(run_id.as_str()).unwrap_or_default();
            let started = started_of.remove(run_id.as_str()).unwrap_or_default();
            match self.next_steps(run, &done, &started, &now, &mut advance) {
                RunState::Running => {}
                RunState::Succeeded => finished.push((run_id.clone(), "succeeded", None)),
                RunState::Failed(reason) => finished.push((run_id.clone(), "failed", Some(reason))),
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
            .fetch_all(&mut **tx)
            .await?
            .into_iter()
            .collect();
            advance.tasks.retain(|t| claimed.contains(&(t.run_id.clone(), t.step_id.clone())));
        }
        for (run_id, status, error) in finished {
            sqlx::query("update workflow_runs set status = $2, error = $3, finished_at = now() where run_id = $1")
                .bind(run_id)
                .bind(status)
                .bind(error)
                .execute(&mut **tx)
                .await?;
        }
        Ok(advance)
    }

    /// Walks the graph of one run: starts what is ready, skips what cannot run.
    fn next_steps(
        &self,
        run: &Run,
        done: &StepsDone,
        started: &BTreeSet<&str>,
        now: &str,
        advance: &mut Advance,
    ) -> RunState {
        let wf = &run.workflow;
        let mut status: HashMap<&str, Status> = HashMap::new();
        let mut outputs = serde_json::Map::new();
        for (step, (s, output, error)) in done {
            let s = match *s {
                "succeeded" => Status::Succeeded,
                "skipped" => Status::Skipped,
                _ => return RunState::Failed(format!("step {step} failed: {}", error.unwrap_or("no reason given"))),
            };
            status.insert(step, s);
            if s == Status::Succeeded {
                outputs.insert(step.to_string(), json!({"output": output.cloned().unwrap_or(Json::Null)}));
            }
        }
        let steps_json = Json::Object(outputs);
        let mut context: Option<Context> = None;
        // Started and not finished: neither startable again nor a satisfied need.
        let mut running: BTreeSet<&str> = started.clone();
        loop {
            let mut progressed = false;
            for (i, step) in wf.steps.iter().enumerate() {
                let id = wf.def.steps[i].id.as_str();
                if step.needs.is_empty() || status.contains_key(id) || running.contains(id) {
                    continue;
                }
                let needs: Vec<Option<&Status>> =
                    step.needs.iter().map(|&j| status.get(wf.def.steps[j].id.as_str())).collect();
                if needs.iter().any(Option::is_none) {
                    continue;
                }
                progressed = true;
                let skip = needs.contains(&Some(&Status::Skipped))
                    || match &step.condition {
                        None => false,
                        Some(c) => {
                            let mut paths = FieldPaths::default();
                            paths.add(c);
                            match c.evaluate(&Scope::build(&run.event, Some(&steps_json), &paths)) {
                                Ok(go) => !go,
                                Err(e) => {
                                    let reason = format!("steps.{id}.if: {e}");
                                    advance.results.push(self.decided(
                                        run,
                                        i,
                                        Status::Failed,
                                        Some(reason.clone()),
                                        now,
                                    ));
                                    return RunState::Failed(format!("step {id} failed: {reason}"));
                                }
                            }
                        }
                    };
                if skip {
                    status.insert(id, Status::Skipped);
                    advance.results.push(self.decided(run, i, Status::Skipped, None, now));
                    continue;
                }
                let context = context.get_or_insert_with(|| workflow::template_context(&run.event, steps_json.clone()));
                match wf.render_input(i, context, &run.event) {
                    Ok(input) => {
                        advance.tasks.push(wf.task(i, &run.event, &run.first.run_id, input, now));
                        running.insert(id);
                    }
                    Err(reason) => {
                        advance.results.push(self.decided(run, i, Status::Failed, Some(reason.clone()), now));
                        return RunState::Failed(format!("step {id} failed: {reason}"));
                    }
                }
            }
            if !progressed {
                break;
            }
        }
        let all_done = wf.def.steps.iter().all(|s| {
            matches!(done.get(s.id.as_str()), Some(("succeeded" | "skipped", ..)))
                || advance
                    .results
                    .iter()
                    .any(|r| r.run_id == run.first.run_id && r.step_id == s.id && r.status == Status::Skipped)
        });
        if all_done {
            RunState::Succeeded
        } else {
            RunState::Running
        }
    }

    /// A result the coordinator decides without calling the service (skipped, or failed before
    /// the call).
    fn decided(&self, run: &Run, i: usize, status: Status, error: Option<String>, now: &str) -> ActionResult {
        let wf = &run.workflow;
        let step = &wf.def.steps[i];
        ActionResult {
            task_id: CompiledWorkflow::task_id(&run.first.run_id, &step.id),
            run_id: run.first.run_id.clone(),
            event_id: run.first.event_id.clone(),
            tenant: run.first.tenant.clone(),
            workflow_id: wf.def.id.clone(),
            workflow_version: wf.def.version,
            step_id: step.id.clone(),
            service: step.service.clone(),
            status,
            attempts: 0,
            latency_ms: 0.0,
            http_status: None,
            cost: None,
            error,
            finished_at: now.to_string(),
            output: None,
            event: Json::Null,
        }
    }
}

/// A stored step outcome: run id, step id, status, output, error.
type StepRow = (String, String, String, Option<Json>, Option<String>);

/// One run's stored step outcomes: step id → (status, output, error).
type StepsDone<'a> = HashMap<&'a str, (&'a str, Option<&'a Json>, Option<&'a str>)>;

enum RunState {
    Running,
    Succeeded,
    Failed(String),
}
