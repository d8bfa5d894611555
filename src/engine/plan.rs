//! Planning a run: given a workflow, the event that started the run and what is known of its
//! steps so far, which steps start now, which are decided without a call, and how the run stands.
//!
//! One pure function ([`next`]) plans the first steps (the evaluator, when an event arrives:
//! nothing is known yet, so the steps without `needs` start) and the later ones (the record
//! stage, when results arrive: the known outcomes and the steps already started are read from
//! PostgreSQL). No I/O and no clock: the same inputs give the same plan, task ids included, which
//! is what makes replaying an event or a batch of results harmless.
//!
//! ## Semantics (also in docs/workflows.md)
//! - A step starts once every step it `needs` succeeded; independent branches run in parallel; a
//!   join waits for all its parents and sees all their outputs (`steps.<id>.output`).
//! - A step whose `if` is false is `skipped`, and so is every step that needs a skipped step.
//! - A failed step fails the run: nothing more starts. A condition or an input that cannot be
//!   evaluated fails its step (a `failed` result naming the reason, decided without a call).
//! - The run succeeds once every step succeeded or was skipped.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
};

use serde_json::{json, Value as Json};

use crate::{
    engine::condition::{FieldPaths, Scope},
    engine::template::Context,
    engine::workflow::{self, CompiledWorkflow},
    envelope::{ActionResult, ActionTask, Event, RunRef, Status},
};

/// What is known of a run's steps.
#[derive(Debug, Default)]
pub struct Known<'a> {
    /// Step id → its recorded outcome.
    pub outcomes: HashMap<&'a str, Outcome<'a>>,
    /// Steps started (their task produced) and not finished: neither started again nor a
    /// satisfied need. For a run under way this includes its first steps, which the evaluator
    /// started when the run began ([`Known::under_way`]).
    pub started: BTreeSet<&'a str>,
}

impl<'a> Known<'a> {
    /// What is known of a run that has begun: its first steps were started with it.
    pub(crate) fn under_way(wf: &'a CompiledWorkflow) -> Known<'a> {
        Known { outcomes: HashMap::new(), started: wf.roots().map(|i| wf.def.steps[i].id.as_str()).collect() }
    }
}

/// A step's recorded outcome.
#[derive(Debug, Clone, Copy)]
pub struct Outcome<'a> {
    pub status: Status,
    pub output: Option<&'a Json>,
    pub error: Option<&'a str>,
}

/// How a run stands after a plan.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum RunState {
    #[default]
    Running,
    Succeeded,
    /// The reason, naming the step.
    Failed(String),
}

/// What to do for one run.
#[derive(Debug, Default)]
pub struct Plan {
    /// Tasks to start, for `actions.<service>`. Empty when the run failed.
    pub tasks: Vec<ActionTask>,
    /// Results decided without calling a service (`skipped`, or `failed` before the call), to
    /// store like any other outcome so the reason is visible.
    pub decided: Vec<ActionResult>,
    pub state: RunState,
}

impl Plan {
    /// The plan with `run_at` (when its run started, see [`ActionTask::run_at`]) on every task
    /// and decided result: planning has no clock, so the caller says, from the run.
    pub fn stamped(mut self, run_at: Option<chrono::DateTime<chrono::Utc>>) -> Plan {
        self.tasks.iter_mut().for_each(|t| t.run_at = run_at);
        self.decided.iter_mut().for_each(|r| r.run_at = run_at);
        self
    }
}

/// The step id of the result that records a trigger condition failing on an event.
pub(crate) const TRIGGER_STEP: &str = "trigger";
/// The service of results the evaluator decides for a run that never started.
pub(crate) const EVALUATE_SERVICE: &str = "evaluate";

/// Plans run `run_id` of `wf` for `event`, given what is `known` of its steps, at `now` (RFC
/// 3339, the time decided results and new tasks carry).
pub fn next(wf: &CompiledWorkflow, event: &Event, run_id: &str, known: &Known, now: &str) -> Plan {
    plan_run(wf, event, run_id, known, now, &mut None)
}

/// The runs `event` starts among `candidates` (from the definition store's `matching`): per
/// workflow whose trigger holds, the plan of its first steps; per workflow whose trigger cannot
/// be evaluated on this event, a failed result naming the reason (step [`TRIGGER_STEP`]).
pub fn start(event: &Event, candidates: &[Arc<CompiledWorkflow>], now: &str) -> Vec<(Arc<CompiledWorkflow>, Plan)> {
    // Nothing is known of a new run, so every candidate renders against the same context: built
    // on the first match only (most events start nothing), then shared.
    let mut context: Option<Context> = None;
    let nothing = Known::default();
    let mut runs = Vec::new();
    for (wf, matched) in triggered(event, candidates) {
        let run_id = wf.run_id(event);
        let plan = match matched {
            Ok(false) => continue,
            Ok(true) => plan_run(wf, event, &run_id, &nothing, now, &mut context),
            Err(reason) => {
                let run = run_ref(wf, event, &run_id, now);
                let task_id = CompiledWorkflow::task_id(&run_id, TRIGGER_STEP);
                let failed = ActionResult::decided(
                    &run,
                    task_id,
                    TRIGGER_STEP,
                    EVALUATE_SERVICE,
                    Status::Failed,
                    Some(reason.clone()),
                );
                Plan { tasks: Vec::new(), decided: vec![failed], state: RunState::Failed(reason) }
            }
        };
        runs.push((wf.clone(), plan));
    }
    runs
}

/// Whether each candidate's trigger condition holds for `event`. The CEL scope is built at most
/// once, and only from the fields the candidates' conditions read: turning the whole event into
/// CEL values costs ten times more than evaluating the conditions.
pub fn triggered<'a>(
    event: &Event,
    candidates: &'a [Arc<CompiledWorkflow>],
) -> impl Iterator<Item = (&'a Arc<CompiledWorkflow>, Result<bool, String>)> {
    let scope = candidates.iter().any(|w| w.trigger_if.is_some()).then(|| {
        let mut paths = FieldPaths::default();
        for c in candidates.iter().filter_map(|w| w.trigger_if.as_ref()) {
            paths.add(c);
        }
        Scope::build(event, None, &paths)
    });
    candidates.iter().map(move |wf| {
        let matched = match &scope {
            Some(scope) => wf.trigger_matches(scope),
            None => Ok(true),
        };
        (wf, matched)
    })
}

fn run_ref<'a>(wf: &'a CompiledWorkflow, event: &'a Event, run_id: &'a str, now: &'a str) -> RunRef<'a> {
    RunRef {
        run_id,
        event_id: &event.id,
        tenant: &event.tenant,
        workflow_id: &wf.def.id,
        workflow_version: wf.def.version,
        now,
    }
}

/// [`next`], rendering inputs against `context` (built from the known outputs when `None`).
fn plan_run(
    wf: &CompiledWorkflow,
    event: &Event,
    run_id: &str,
    known: &Known,
    now: &str,
    context: &mut Option<Context>,
) -> Plan {
    let run = run_ref(wf, event, run_id, now);
    let mut plan = Plan::default();
    let mut status: HashMap<&str, Status> = HashMap::new();
    let mut outputs = serde_json::Map::new();
    // In definition order, so that of several failed steps the reason always names the same one.
    for step in &wf.def.steps {
        let Some(outcome) = known.outcomes.get(step.id.as_str()) else { continue };
        match outcome.status {
            // A step that expired or was cancelled ends the run as a failed one would: its
            // dependants cannot start, and the run's error says which step and why.
            Status::Failed | Status::Expired | Status::Cancelled => {
                let reason = outcome.error.unwrap_or(outcome.status.as_str());
                plan.state = RunState::Failed(format!("step {} failed: {reason}", step.id));
                return plan;
            }
            Status::Succeeded => {
                outputs.insert(step.id.clone(), json!({"output": outcome.output.cloned().unwrap_or(Json::Null)}));
            }
            Status::Skipped => {}
        }
        status.insert(&step.id, outcome.status);
    }
    let steps_json = Json::Object(outputs);
    let mut running: BTreeSet<&str> = known.started.clone();
    // A step decided in this pass can make another ready (a skip propagates, a start does not):
    // repeat until a pass changes nothing.
    loop {
        let mut progressed = false;
        for (i, step) in wf.steps.iter().enumerate() {
            let id = wf.def.steps[i].id.as_str();
            if status.contains_key(id) || running.contains(id) {
                continue;
            }
            let needs: Option<Vec<Status>> =
                step.needs.iter().map(|&j| status.get(wf.def.steps[j].id.as_str()).copied()).collect();
            let Some(needs) = needs else { continue };
            progressed = true;
            let skip = needs.contains(&Status::Skipped)
                || match &step.condition {
                    None => false,
                    Some(c) => {
                        let mut paths = FieldPaths::default();
                        paths.add(c);
                        match c.evaluate(&Scope::build(event, Some(&steps_json), &paths)) {
                            Ok(go) => !go,
                            Err(e) => return fail(plan, wf, &run, i, event, format!("steps.{id}.if: {e}")),
                        }
                    }
                };
            if skip {
                status.insert(id, Status::Skipped);
                plan.decided.push(decided(wf, &run, i, Status::Skipped, None));
                continue;
            }
            let context = context.get_or_insert_with(|| workflow::template_context(event, steps_json.clone()));
            match wf.render_input(i, context, event) {
                Ok(input) => {
                    plan.tasks.push(wf.task(i, event, run_id, input, now));
                    running.insert(id);
                }
                Err(reason) => return fail(plan, wf, &run, i, event, reason),
            }
        }
        if !progressed {
            break;
        }
    }
    let finished =
        wf.def.steps.iter().all(|s| matches!(status.get(s.id.as_str()), Some(Status::Succeeded | Status::Skipped)));
    if finished {
        plan.state = RunState::Succeeded;
    }
    plan
}

/// Step `i` failed before its call: the run fails, and nothing of this plan starts.
fn fail(mut plan: Plan, wf: &CompiledWorkflow, run: &RunRef, i: usize, event: &Event, reason: String) -> Plan {
    let mut result = decided(wf, run, i, Status::Failed, Some(reason.clone()));
    // A multi-step run's results carry its event, so that the record stage records the run (as
    // failed) even when this is the first and only thing that happened to it.
    if wf.is_multi_step() {
        result.event = serde_json::to_value(event).unwrap_or_default();
    }
    plan.decided.push(result);
    plan.tasks.clear();
    plan.state = RunState::Failed(format!("step {} failed: {reason}", wf.def.steps[i].id));
    plan
}

fn decided(wf: &CompiledWorkflow, run: &RunRef, i: usize, status: Status, error: Option<String>) -> ActionResult {
    let step = &wf.def.steps[i];
    let task_id = CompiledWorkflow::task_id(run.run_id, &step.id);
    ActionResult::decided(run, task_id, &step.id, &step.service, status, error)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: &str = "2026-11-23T10:00:00Z";

    fn compile(yaml: &str) -> CompiledWorkflow {
        let def: workflow::Workflow = serde_yaml_ng::from_str(yaml).unwrap();
        CompiledWorkflow::compile(def, &BTreeSet::from(["webhook", "slack"])).unwrap()
    }

    fn event(data: Json) -> Event {
        serde_json::from_value(json!({"id": "e-1", "source": "/s", "type": "a", "tenant": "t", "data": data})).unwrap()
    }

    const DIAMOND: &str = "{id: d, trigger: {type: a}, steps: [
        {id: a, service: webhook, input: {n: '{{ data.n }}'}},
        {id: b, service: webhook, needs: [a], input: {x: '{{ steps.a.output.v }}'}},
        {id: c, service: slack, needs: [a], if: 'steps.a.output.v > 1'},
        {id: d, service: webhook, needs: [b, c]}]}";

    fn succeeded(output: &Json) -> Outcome<'_> {
        Outcome { status: Status::Succeeded, output: Some(output), error: None }
    }

    /// Tasks started and results decided, by step id.
    type Ids<'a> = (Vec<&'a str>, Vec<(&'a str, Status)>);

    fn ids(plan: &Plan) -> Ids<'_> {
        (
            plan.tasks.iter().map(|t| t.step_id.as_str()).collect(),
            plan.decided.iter().map(|r| (r.step_id.as_str(), r.status)).collect(),
        )
    }

    #[test]
    fn nothing_known_starts_the_first_steps_only() {
        let wf = compile(DIAMOND);
        let e = event(json!({"n": 3}));
        let plan = next(&wf, &e, "r", &Known::default(), NOW);
        assert_eq!(ids(&plan), (vec!["a"], vec![]));
        assert_eq!(plan.state, RunState::Running);
        assert_eq!(plan.tasks[0].input, json!({"n": 3}));
        assert_eq!(plan.tasks[0].task_id, CompiledWorkflow::task_id("r", "a"));
        assert!(!plan.tasks[0].event.is_null(), "a multi-step run's tasks carry the event");
    }

    #[test]
    fn a_run_under_way_does_not_start_its_first_steps_again() {
        let wf = compile(DIAMOND);
        let plan = next(&wf, &event(json!({})), "r", &Known::under_way(&wf), NOW);
        assert_eq!(ids(&plan), (vec![], vec![]));
        assert_eq!(plan.state, RunState::Running);
    }

    #[test]
    fn later_steps_start_when_their_needs_succeeded_and_see_the_outputs() {
        let wf = compile(DIAMOND);
        let e = event(json!({}));
        let out_a = json!({"v": 2});
        let mut known = Known::under_way(&wf);
        known.outcomes.insert("a", succeeded(&out_a));
        let plan = next(&wf, &e, "r", &known, NOW);
        assert_eq!(ids(&plan), (vec!["b", "c"], vec![]));
        assert_eq!(plan.tasks[0].input, json!({"x": 2}));
        assert_eq!(plan.tasks[1].service, "slack");

        // Started and not finished: not started again, and d waits for both.
        known.started.extend(["b", "c"]);
        let (out_b, out_c) = (json!("b"), json!("c"));
        known.outcomes.insert("b", succeeded(&out_b));
        assert_eq!(ids(&next(&wf, &e, "r", &known, NOW)), (vec![], vec![]));
        known.outcomes.insert("c", succeeded(&out_c));
        let plan = next(&wf, &e, "r", &known, NOW);
        assert_eq!(ids(&plan), (vec!["d"], vec![]));
        assert_eq!(plan.state, RunState::Running);

        known.started.insert("d");
        known.outcomes.insert("d", succeeded(&out_b));
        let plan = next(&wf, &e, "r", &known, NOW);
        assert_eq!(ids(&plan), (vec![], vec![]));
        assert_eq!(plan.state, RunState::Succeeded);
    }

    #[test]
    fn a_false_condition_skips_the_step_and_what_needs_it_and_the_run_can_still_succeed() {
        let wf = compile(DIAMOND);
        let e = event(json!({}));
        let (out_a, out_b) = (json!({"v": 1}), json!("b"));
        let mut known = Known::under_way(&wf);
        known.outcomes.insert("a", succeeded(&out_a));
        let plan = next(&wf, &e, "r", &known, NOW);
        assert_eq!(ids(&plan), (vec!["b"], vec![("c", Status::Skipped)]));
        let skipped = &plan.decided[0];
        assert_eq!((skipped.attempts, skipped.service.as_str(), skipped.finished_at.as_str()), (0, "slack", NOW));

        known.started.insert("b");
        known.outcomes.insert("b", succeeded(&out_b));
        let plan = next(&wf, &e, "r", &known, NOW);
        assert_eq!(ids(&plan), (vec![], vec![("c", Status::Skipped), ("d", Status::Skipped)]));
        assert_eq!(plan.state, RunState::Succeeded);
    }

    #[test]
    fn a_failed_step_fails_the_run_and_nothing_more_starts() {
        let wf = compile(DIAMOND);
        let e = event(json!({}));
        let out_a = json!({"v": 2});
        let mut known = Known::under_way(&wf);
        known.outcomes.insert("a", succeeded(&out_a));
        known.outcomes.insert("b", Outcome { status: Status::Failed, output: None, error: Some("503") });
        known.outcomes.insert("c", Outcome { status: Status::Failed, output: None, error: None });
        let plan = next(&wf, &e, "r", &known, NOW);
        assert_eq!(ids(&plan), (vec![], vec![]));
        assert_eq!(
            plan.state,
            RunState::Failed("step b failed: 503".into()),
            "the first failed step, in definition order"
        );
    }

    #[test]
    fn a_condition_or_input_that_cannot_be_evaluated_fails_its_step_with_the_reason() {
        let wf = compile(DIAMOND);
        let e = event(json!({}));
        let out_a = json!({"v": "not a number"});
        let mut known = Known::under_way(&wf);
        known.outcomes.insert("a", succeeded(&out_a));
        let plan = next(&wf, &e, "r", &known, NOW);
        assert!(plan.tasks.is_empty(), "b was ready, but the run failed in the same plan");
        let failed = plan.decided.last().unwrap();
        assert_eq!((failed.step_id.as_str(), failed.status), ("c", Status::Failed));
        assert!(failed.error.as_deref().unwrap().starts_with("steps.c.if: "), "{:?}", failed.error);
        assert!(
            matches!(&plan.state, RunState::Failed(r) if r.starts_with("step c failed: steps.c.if: ")),
            "{:?}",
            plan.state
        );
    }

    #[test]
    fn a_first_step_that_cannot_render_fails_the_run_and_carries_the_event() {
        let wf = compile(
            "{id: w, trigger: {type: a}, steps: [{id: a, service: webhook}, {id: b, service: webhook, input: {x: '{{ data.x.y }}'}},
              {id: c, service: webhook, needs: [a, b]}]}",
        );
        let e = event(json!({"x": 1}));
        let plan = next(&wf, &e, "r", &Known::default(), NOW);
        assert_eq!(ids(&plan), (vec![], vec![("b", Status::Failed)]));
        assert_eq!(plan.decided[0].event, serde_json::to_value(&e).unwrap());
        assert!(matches!(plan.state, RunState::Failed(_)));
    }

    #[test]
    fn start_plans_each_triggered_candidate_and_records_a_trigger_that_cannot_be_evaluated() {
        let candidates = [
            "{id: yes, trigger: {type: a, if: 'data.n > 1'}, steps: [{id: s, service: webhook}]}",
            "{id: no, trigger: {type: a, if: 'data.n > 5'}, steps: [{id: s, service: webhook}]}",
            "{id: broken, trigger: {type: a, if: 'data.missing > 1'}, steps: [{id: s, service: webhook}]}",
        ]
        .map(|y| Arc::new(compile(y)));
        let e = event(json!({"n": 3}));
        let runs = start(&e, &candidates, NOW);
        let by_id: Vec<(&str, Ids)> = runs.iter().map(|(wf, plan)| (wf.def.id.as_str(), ids(plan))).collect();
        assert_eq!(by_id, [("yes", (vec!["s"], vec![])), ("broken", (vec![], vec![(TRIGGER_STEP, Status::Failed)]))]);
        let failed = &runs[1].1.decided[0];
        assert_eq!((failed.service.as_str(), failed.run_id.clone()), (EVALUATE_SERVICE, candidates[2].run_id(&e)));
        assert!(failed.error.as_deref().unwrap().contains("trigger.if"), "{:?}", failed.error);
        assert!(runs[0].1.tasks[0].event.is_null(), "a single-step run's task does not carry the event");
    }

    proptest::proptest! {
        /// Whatever is known of a run, a plan never starts a step that is started or finished, or
        /// whose needs did not all succeed; a failed run starts nothing; every step is accounted
        /// for once the run succeeded.
        #[test]
        fn plans_respect_the_graph(outcome_of in proptest::collection::vec(0u8..5, 4)) {
            let wf = compile(DIAMOND);
            let e = event(json!({}));
            let output = json!({"v": 2});
            let mut known = Known::default();
            for (step, o) in wf.def.steps.iter().zip(&outcome_of) {
                let id = step.id.as_str();
                match o {
                    0 => {}
                    1 => { known.started.insert(id); }
                    2 => { known.outcomes.insert(id, succeeded(&output)); }
                    3 => { known.outcomes.insert(id, Outcome { status: Status::Skipped, output: None, error: None }); }
                    _ => { known.outcomes.insert(id, Outcome { status: Status::Failed, output: None, error: None }); }
                }
            }
            let plan = next(&wf, &e, "r", &known, NOW);
            for task in &plan.tasks {
                let i = wf.def.steps.iter().position(|s| s.id == task.step_id).unwrap();
                proptest::prop_assert!(!known.started.contains(task.step_id.as_str()));
                proptest::prop_assert!(!known.outcomes.contains_key(task.step_id.as_str()));
                for &j in &wf.steps[i].needs {
                    let need = known.outcomes.get(wf.def.steps[j].id.as_str()).map(|o| o.status);
                    proptest::prop_assert_eq!(need, Some(Status::Succeeded));
                }
            }
            if matches!(plan.state, RunState::Failed(_)) {
                proptest::prop_assert!(plan.tasks.is_empty());
            }
            if plan.state == RunState::Succeeded {
                for step in &wf.def.steps {
                    let known_done = known.outcomes.get(step.id.as_str()).is_some_and(|o| o.status != Status::Failed);
                    let decided = plan.decided.iter().any(|r| r.step_id == step.id);
                    proptest::prop_assert!(known_done || decided, "step {} unaccounted for", step.id);
                }
            }
        }
    }
}
