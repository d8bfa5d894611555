//! What one replayed event leads to: which tasks to send, decided with the engine's planner
//! ([`plan::next`]) from the definitions now and what PostgreSQL recorded of the event's runs.
//!
//! **Default mode: only what is missing.** Per event and matching workflow:
//! - The run to drive is the event's existing run of that workflow when there is one, *whatever
//!   its version* (the run keeps the version it started with, as live runs do), else a new run of
//!   the current version. A run's id depends on the version, so an event a buggy definition
//!   missed gets a run of the fixed version, while one it handled is not started a second time
//!   under the new version's id.
//! - The run's trigger must hold (a fixed condition is what selects the events it missed).
//! - Its steps that `succeeded` or were `skipped` count as done; a `failed` step, or none at all,
//!   is not: the planner then returns exactly the steps that are ready and not done. Task ids
//!   are deterministic (run and step), so "done" is checked by the very id that will be called.
//!
//! **Rerun mode**: every event whose trigger holds starts a new run of the current version, with
//! a run id derived from the replay's id and the original run id (new ids, yet the same on a
//! resume of the same replay, so a resume repeats none).
//!
//! Tasks a resumed replay finds it had already sent (see the module above) count as not done
//! here, so that the decision, and the tally, are those of an uninterrupted replay; they are
//! counted but not sent again.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::Arc,
};

use serde_json::Value as Json;

use super::{Selection, Tally};
use crate::{
    engine::definitions::DefinitionStore,
    engine::plan::{self, Known, Outcome, RunState},
    engine::workflow::CompiledWorkflow,
    envelope::{ActionTask, Event, Status},
};

/// One recorded step outcome of an event's run (a row of `action_results`).
#[derive(Debug, Clone)]
pub struct StepRow {
    pub task_id: String,
    pub run_id: String,
    pub workflow_id: String,
    pub workflow_version: i64,
    pub step_id: String,
    pub status: String,
    pub output: Option<Json>,
    /// The run's `run_at` (its rows' partition key): a replayed task of the run carries it, so
    /// that its result conflicts with a row already written.
    pub run_at: chrono::DateTime<chrono::Utc>,
}

/// The recorded rows of a chunk's events, by (tenant, event id).
pub type Recorded = HashMap<(String, String), Vec<StepRow>>;

/// Reads the rows of `events`' runs. The index on `event_id` (migration 0010) makes this one
/// index scan per chunk.
pub async fn recorded<'a>(
    pool: &sqlx::PgPool,
    events: impl Iterator<Item = &'a Event>,
) -> Result<Recorded, sqlx::Error> {
    let ids: Vec<&str> = events.map(|e| e.id.as_str()).collect::<BTreeSet<_>>().into_iter().collect();
    type Row =
        (String, String, String, String, String, i64, String, String, Option<Json>, chrono::DateTime<chrono::Utc>);
    let rows: Vec<Row> = sqlx::query_as(
        "select tenant, event_id, task_id, run_id, workflow_id, workflow_version, step_id, status, output, run_at
         from action_results where event_id = any($1)",
    )
    .bind(&ids)
    .fetch_all(pool)
    .await?;
    let mut recorded = Recorded::new();
    for (tenant, event_id, task_id, run_id, workflow_id, workflow_version, step_id, status, output, run_at) in rows {
        let row = StepRow { task_id, run_id, workflow_id, workflow_version, step_id, status, output, run_at };
        recorded.entry((tenant, event_id)).or_default().push(row);
    }
    Ok(recorded)
}

/// How the replay decides.
#[derive(Debug, Clone, Copy)]
pub enum Mode<'a> {
    /// Only what has no `succeeded` result.
    Missing,
    /// Everything again, as new runs named after replay `.0`.
    Rerun(&'a str),
}

/// The run id of a rerun of `run_id` by replay `replay`.
pub fn rerun_id(replay: &str, run_id: &str) -> String {
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, format!("replay/{replay}/{run_id}").as_bytes()).to_string()
}

/// The tasks `event` leads to, counted into `tally`. `rows` are its recorded rows; `sent` the
/// task ids this replay already sent before an interrupt.
#[allow(clippy::too_many_arguments)]
pub fn decide(
    store: &DefinitionStore,
    selection: &Selection,
    mode: Mode,
    event: &Event,
    rows: &[StepRow],
    sent: &HashSet<String>,
    now: &str,
    tally: &mut Tally,
) -> Vec<ActionTask> {
    let candidates = store.matching(&event.tenant, &event.kind);
    let mut tasks = Vec::new();
    for current in
        candidates.iter().filter(|wf| selection.workflows.is_empty() || selection.workflows.contains(&wf.def.id))
    {
        let runs: Vec<&StepRow> = rows.iter().filter(|r| r.workflow_id == current.def.id).collect();
        let (wf, run_id, known_rows) = match mode {
            Mode::Rerun(replay) => (current.clone(), rerun_id(replay, &current.run_id(event)), Vec::new()),
            Mode::Missing => match run_to_drive(store, current, event, &runs) {
                Some((wf, run_id)) => {
                    let done: Vec<&StepRow> = runs.iter().copied().filter(|r| r.run_id == run_id).collect();
                    (wf, run_id, done)
                }
                None => {
                    tally.unknown_version += 1;
                    continue;
                }
            },
        };
        match plan::triggered(event, std::slice::from_ref(&wf)).next().map(|(_, m)| m) {
            Some(Ok(true)) => {}
            Some(Ok(false)) | None => continue,
            Some(Err(_)) => {
                tally.cannot_start += 1;
                continue;
            }
        }
        let mut known = Known::default();
        for r in &known_rows {
            let status = match r.status.as_str() {
                "succeeded" => Status::Succeeded,
                "skipped" => Status::Skipped,
                _ => continue,
            };
            if sent.contains(&r.task_id) {
                continue;
            }
            known.outcomes.insert(&r.step_id, Outcome { status, output: r.output.as_ref(), error: None });
        }
        let planned = plan::next(&wf, event, &run_id, &known, now);
        if matches!(planned.state, RunState::Failed(_)) {
            tally.cannot_start += 1;
            continue;
        }
        tasks.extend(
            planned
                .tasks
                .into_iter()
                .filter(|t| selection.services.is_empty() || selection.services.contains(&t.service)),
        );
    }
    count(event, &tasks, tally);
    tasks
}

/// The run of `current`'s workflow to drive for `event`: its existing run (the current
/// version's, else the latest version's this worker still knows), or a new one of the current
/// version. `None`: the event has runs only of versions no longer known (or reruns), so it is
/// left alone rather than started again.
fn run_to_drive(
    store: &DefinitionStore,
    current: &Arc<CompiledWorkflow>,
    event: &Event,
    runs: &[&StepRow],
) -> Option<(Arc<CompiledWorkflow>, String)> {
    let current_run = current.run_id(event);
    if runs.is_empty() || runs.iter().any(|r| r.run_id == current_run) {
        return Some((current.clone(), current_run));
    }
    let versions: BTreeSet<(i64, &str)> = runs.iter().map(|r| (r.workflow_version, r.run_id.as_str())).collect();
    versions.into_iter().rev().find_map(|(version, run_id)| {
        let tenant = current.def.tenant.as_deref();
        let wf = store.version(tenant, &current.def.id, version)?;
        (wf.run_id(event) == run_id).then(|| (wf, run_id.to_string()))
    })
}

/// Adds `event`'s tasks to the tally: per (tenant, workflow, service), one event, its runs, its
/// calls.
fn count(event: &Event, tasks: &[ActionTask], tally: &mut Tally) {
    let mut per: BTreeMap<(&str, &str), (BTreeSet<&str>, u64)> = BTreeMap::new();
    for t in tasks {
        let entry = per.entry((&t.workflow_id, &t.service)).or_default();
        entry.0.insert(&t.run_id);
        entry.1 += 1;
    }
    for ((workflow, service), (runs, calls)) in per {
        let c = tally.rows.entry((event.tenant.clone(), workflow.to_string(), service.to_string())).or_default();
        c.events += 1;
        c.runs += runs.len() as u64;
        c.calls += calls;
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::engine::workflow::Workflow;

    fn store(yaml: &[&str]) -> DefinitionStore {
        let defs = yaml.iter().map(|y| serde_yaml_ng::from_str::<Workflow>(y).unwrap());
        DefinitionStore::fixed(&["webhook", "slack"], defs).unwrap()
    }

    fn event(id: &str, plan: &str) -> Event {
        serde_json::from_value(
            json!({"id": id, "source": "/s", "type": "signup", "tenant": "t", "data": {"plan": plan}}),
        )
        .unwrap()
    }

    fn row(task: &ActionTask, status: &str) -> StepRow {
        StepRow {
            task_id: task.task_id.clone(),
            run_id: task.run_id.clone(),
            workflow_id: task.workflow_id.clone(),
            workflow_version: task.workflow_version,
            step_id: task.step_id.clone(),
            status: status.into(),
            output: Some(json!({"v": 1})),
            run_at: chrono::Utc::now(),
        }
    }

    const V1: &str =
        "{id: w, version: 1, trigger: {type: signup, if: 'data.plan == \"paid\"'}, steps: [{id: s, service: webhook}]}";
    const V2: &str =
        "{id: w, version: 2, trigger: {type: signup, if: 'data.plan in [\"paid\", \"trial\"]'}, steps: [{id: s, service: webhook}]}";
    const NOW: &str = "2026-11-23T10:00:00Z";

    fn decide_all(
        store: &DefinitionStore,
        mode: Mode,
        event: &Event,
        rows: &[StepRow],
        tally: &mut Tally,
    ) -> Vec<ActionTask> {
        decide(store, &Selection::default(), mode, event, rows, &HashSet::new(), NOW, tally)
    }

    #[test]
    fn only_what_has_no_success_is_driven_again() {
        let s = store(&[V1]);
        let mut tally = Tally::default();
        let paid = event("e1", "paid");
        let tasks = decide_all(&s, Mode::Missing, &paid, &[], &mut tally);
        assert_eq!(tasks.len(), 1, "a run that never happened starts");
        let failed = [row(&tasks[0], "failed")];
        let again = decide_all(&s, Mode::Missing, &paid, &failed, &mut tally);
        assert_eq!(again[0].task_id, tasks[0].task_id, "a failed task is driven again, under its own id");
        let succeeded = [row(&tasks[0], "succeeded")];
        assert!(decide_all(&s, Mode::Missing, &paid, &succeeded, &mut tally).is_empty());
        // Sent by this replay before an interrupt: decided (and counted) as if not done.
        let sent = HashSet::from([tasks[0].task_id.clone()]);
        let resumed = decide(&s, &Selection::default(), Mode::Missing, &paid, &succeeded, &sent, NOW, &mut tally);
        assert_eq!(resumed.len(), 1);
        assert!(decide_all(&s, Mode::Missing, &event("e2", "free"), &[], &mut tally).is_empty());
        let c = &tally.rows[&("t".into(), "w".into(), "webhook".into())];
        assert_eq!((c.events, c.runs, c.calls), (3, 3, 3));
    }

    #[test]
    fn a_fixed_definition_starts_the_runs_it_now_matches_and_not_those_the_old_one_ran() {
        let old = store(&[V1]);
        let ran = decide_all(&old, Mode::Missing, &event("e1", "paid"), &[], &mut Tally::default());
        let done = [row(&ran[0], "succeeded")];
        let fixed = store(&[V1, V2]);
        let mut tally = Tally::default();
        assert!(decide_all(&fixed, Mode::Missing, &event("e1", "paid"), &done, &mut tally).is_empty());
        let trial = decide_all(&fixed, Mode::Missing, &event("e3", "trial"), &[], &mut tally);
        assert_eq!((trial.len(), trial[0].workflow_version), (1, 2));
        // A v1 run that failed is driven again as the v1 run it is.
        let failed = [row(&ran[0], "failed")];
        let again = decide_all(&fixed, Mode::Missing, &event("e1", "paid"), &failed, &mut tally);
        assert_eq!((again[0].task_id.as_str(), again[0].workflow_version), (ran[0].task_id.as_str(), 1));
        // Runs only of a version nobody knows: left alone.
        let only_v2 = store(&[V2]);
        assert!(decide_all(&only_v2, Mode::Missing, &event("e1", "paid"), &done, &mut tally).is_empty());
        assert_eq!(tally.unknown_version, 1);
    }

    #[test]
    fn a_rerun_starts_new_runs_with_new_ids_the_same_on_every_resume() {
        let s = store(&[V1]);
        let paid = event("e1", "paid");
        let original = decide_all(&s, Mode::Missing, &paid, &[], &mut Tally::default());
        let done = [row(&original[0], "succeeded")];
        let rerun = decide_all(&s, Mode::Rerun("r1"), &paid, &done, &mut Tally::default());
        assert_eq!(rerun.len(), 1);
        assert_ne!(rerun[0].run_id, original[0].run_id);
        assert_eq!(rerun[0].run_id, rerun_id("r1", &original[0].run_id));
        let again = decide_all(&s, Mode::Rerun("r1"), &paid, &done, &mut Tally::default());
        assert_eq!(again[0].task_id, rerun[0].task_id);
        assert_ne!(decide_all(&s, Mode::Rerun("r2"), &paid, &done, &mut Tally::default())[0].task_id, rerun[0].task_id);
    }

    #[test]
    fn in_a_multi_step_run_the_steps_after_the_done_ones_are_driven_with_their_outputs() {
        let s = store(&["{id: m, version: 1, trigger: {type: signup}, steps: [{id: a, service: webhook},
            {id: b, service: slack, needs: [a], input: {v: '{{ steps.a.output.v }}'}}]}"]);
        let e = event("e1", "paid");
        let mut tally = Tally::default();
        let first = decide_all(&s, Mode::Missing, &e, &[], &mut tally);
        assert_eq!(first.iter().map(|t| t.step_id.as_str()).collect::<Vec<_>>(), ["a"]);
        let b = decide_all(&s, Mode::Missing, &e, &[row(&first[0], "succeeded")], &mut tally);
        assert_eq!((b[0].step_id.as_str(), &b[0].input), ("b", &json!({"v": 1})));
        let only_webhook = Selection { services: vec!["webhook".into()], ..Selection::default() };
        let none = decide(
            &s,
            &only_webhook,
            Mode::Missing,
            &e,
            &[row(&first[0], "succeeded")],
            &HashSet::new(),
            NOW,
            &mut tally,
        );
        assert!(none.is_empty(), "--service filters the tasks");
    }
}
