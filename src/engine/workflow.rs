//! Workflow definitions: the YAML format, validation at apply time, and the compiled form the
//! evaluator and the run coordinator use.
//!
//! A definition names the events that start it (`trigger.type`, optionally filtered by a CEL
//! `trigger.if`), and a graph of steps, each calling a service with an `input` made of minijinja
//! templates over the event and earlier steps' outputs. `needs` makes the graph: a step starts
//! once every step it needs has succeeded; independent branches run in parallel. Everything that
//! can be wrong with a definition is found when it is applied (CEL compiles, templates parse,
//! the graph is acyclic, services exist, a step only reads steps it needs, limits are in range),
//! never while events flow. See docs/workflows.md for the format with examples.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use anyhow::{bail, Context as _};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value as Json};

use crate::{
    config::Priority,
    engine::condition::{Condition, FieldPaths, Scope},
    engine::template::{Context, InputTemplate, TemplateError},
    engine::Bounds,
    envelope::{ActionTask, Event, TaskRetry},
};

/// Most steps a workflow may have. Every step of a run is a task, a result row and a state
/// update, and a multi-step run carries its event through each task; the cap keeps what one
/// definition costs the pipeline per event bounded (and the graph checks, quadratic in steps,
/// cheap).
pub(crate) const MAX_STEPS: usize = 50;

/// Shortest and longest `expires_after`: under a second is shorter than a task's trip through
/// the pipeline; over 30 days outlives any topic's retention, so it would never take effect.
const MIN_EXPIRY: Duration = Duration::from_secs(1);
const MAX_EXPIRY: Duration = Duration::from_secs(30 * 86_400);

/// One workflow definition, as written in YAML (and published, as JSON, on the definitions topic).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workflow {
    /// Unique per tenant (or among platform-wide workflows). Letters, digits, `.`, `_`, `-`.
    pub id: String,
    /// The tenant it belongs to; absent means every tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Must increase with every change; part of each task id, and what a run pins.
    #[serde(default = "first_version")]
    pub version: i64,
    pub trigger: Trigger,
    pub steps: Vec<Step>,
    #[serde(default)]
    pub limits: Limits,
    /// A run's tasks not called within this long of the event (its `time`, or when the evaluator
    /// read it if the event has none) are recorded `expired`, uncalled, and the run fails.
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub expires_after: Option<Duration>,
    /// How urgent its tasks are (`high`, `normal`, `low`; default normal): each priority has its
    /// own action topics, and the executor serves them by weight (`executor.priorities`).
    #[serde(default, skip_serializing_if = "is_normal")]
    pub priority: Priority,
    /// Which of a tenant's calls stay in order (`subject`, `tenant`, `none`; default subject):
    /// calls with the same order key are made one at a time in event order, the tenant's others
    /// side by side up to the service's `tenant_concurrency`. See [`OrderBy`].
    #[serde(default, skip_serializing_if = "OrderBy::is_default")]
    pub order_by: OrderBy,
}

fn is_normal(p: &Priority) -> bool {
    *p == Priority::Normal
}

/// A workflow's ordering key: which of a tenant's calls the executor keeps in order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OrderBy {
    /// The event's CloudEvents `subject` (a member, a post, an order): one subject's calls in
    /// order, the tenant's other subjects side by side. Events without a subject are ordered by
    /// tenant, among themselves.
    #[default]
    Subject,
    /// The tenant: all its calls of this workflow's service in event order, one at a time.
    Tenant,
    /// No order between runs (each run its own key); a run's steps still follow its graph.
    None,
}

impl OrderBy {
    fn is_default(&self) -> bool {
        *self == OrderBy::Subject
    }

    /// The order key of the tasks of `run_id`, started by `event` (`None`: the tenant).
    pub(crate) fn key(self, event: &Event, run_id: &str) -> Option<String> {
        match self {
            OrderBy::Subject => event.subject.as_ref().map(|s| format!("subject:{s}")),
            OrderBy::Tenant => None,
            OrderBy::None => Some(format!("run:{run_id}")),
        }
    }
}

fn first_version() -> i64 {
    1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trigger {
    /// Event type(s) that start the workflow.
    #[serde(rename = "type")]
    pub types: OneOrMany,
    /// CEL condition over `event` (attributes) and `data` (the body); the run starts if true.
    #[serde(rename = "if", default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn as_slice(&self) -> &[String] {
        match self {
            OneOrMany::One(s) => std::slice::from_ref(s),
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub id: String,
    /// A service from the config's `services`.
    pub service: String,
    /// The request for the service: templates over `event`, `data` and `steps.<id>.output`.
    /// Absent: the whole event.
    #[serde(default, skip_serializing_if = "Json::is_null")]
    pub input: Json,
    /// Steps that must succeed before this one starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub needs: Vec<String>,
    /// CEL condition over `event`, `data` and `steps`, checked when the needs are done; false
    /// skips the step and every step that needs it. Only on steps with `needs`.
    #[serde(rename = "if", default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
    /// Per-call timeout; the service's timeout when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
    /// This step's task, not called within this long of its creation, is recorded `expired`,
    /// uncalled (with the workflow's `expires_after`, whichever comes first).
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub expires_after: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retry {
    /// Attempts in all, including the first (1–20).
    pub attempts: u32,
    /// First backoff; doubles per attempt.
    #[serde(default = "default_backoff_ms")]
    pub backoff_ms: u64,
}

fn default_backoff_ms() -> u64 {
    500
}

/// Per-workflow limits, each with a default that suits most workflows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// A run not finished after this long fails with "run time limit exceeded" (1 s – 1 day).
    pub max_run_seconds: u64,
    /// Runs a tenant may start per minute (up to this many at once after a quiet minute); runs
    /// over it are deferred through a delay topic to start at the limit, in order, never dropped
    /// and never waited for.
    pub runs_per_minute: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_run_seconds: 300, runs_per_minute: 1_000 }
    }
}

/// One step of a path into a definition's document: a mapping key or a sequence index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Segment {
    Key(String),
    Index(usize),
}

/// What is wrong with a definition, and in which field (as a path into the document, so
/// [`load`] can tell the line and column). Displays as `steps[0] (fetch).if: …`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FieldError {
    pub path: Vec<Segment>,
    /// The field as shown: `steps[0] (fetch).if`.
    pub field: String,
    pub message: String,
    /// Where in the field's text (an expression, a template) the error is, (line, column) from 1.
    pub position: Option<(usize, usize)>,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for FieldError {}

/// A field of a definition, to say what is wrong with it.
struct Field {
    path: Vec<Segment>,
    name: String,
}

impl Field {
    /// A top-level field, or a dotted path of keys (`limits.max_run_seconds`).
    fn top(name: &str) -> Field {
        Field { path: name.split('.').map(|k| Segment::Key(k.into())).collect(), name: name.into() }
    }

    /// A field of step `i` (`needs`, `retry.attempts`).
    fn step(i: usize, id: &str, name: &str) -> Field {
        let mut path = vec![Segment::Key("steps".into()), Segment::Index(i)];
        path.extend(name.split('.').map(|k| Segment::Key(k.into())));
        Field { path, name: format!("steps[{i}] ({id}).{name}") }
    }

    fn error(self, message: impl fmt::Display) -> anyhow::Error {
        self.error_at(message, None)
    }

    fn error_at(self, message: impl fmt::Display, position: Option<(usize, usize)>) -> anyhow::Error {
        anyhow::Error::new(FieldError { path: self.path, field: self.name, message: message.to_string(), position })
    }

    /// A template error, pointing at its leaf inside this field.
    fn template_error(mut self, e: TemplateError) -> anyhow::Error {
        // The leaf path starts with the field's own name (`input.body.text`).
        self.path.extend(leaf_segments(e.path()).into_iter().skip(1));
        let position = e.position();
        self.error_at(e, position)
    }
}

/// The segments of a template leaf's path as [`InputTemplate`] writes it: `input.body.text`,
/// `input["a b"][1]`.
fn leaf_segments(path: &str) -> Vec<Segment> {
    let mut segments = Vec::new();
    let mut rest = path;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('[') {
            let mut de = serde_json::Deserializer::from_str(after).into_iter::<Json>();
            let (Some(Ok(value)), offset) = (de.next(), de.byte_offset()) else { break };
            match value {
                Json::String(key) => segments.push(Segment::Key(key)),
                Json::Number(n) => segments.push(Segment::Index(n.as_u64().unwrap_or(0) as usize)),
                _ => break,
            }
            rest = after[offset..].strip_prefix(']').unwrap_or("");
        } else {
            let name = rest.strip_prefix('.').unwrap_or(rest);
            let end = name.find(['.', '[']).unwrap_or(name.len());
            segments.push(Segment::Key(name[..end].to_string()));
            rest = &name[end..];
        }
    }
    segments
}

fn check_name(field: Field, value: &str) -> anyhow::Result<()> {
    if value.is_empty() || !value.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
        return Err(
            field.error(format!("{value:?} must be non-empty and hold only ASCII letters, digits, '.', '_' and '-'"))
        );
    }
    Ok(())
}

impl Workflow {
    /// Whether an event of `kind` triggers this workflow (before its condition).
    pub fn triggers_on(&self, kind: &str) -> bool {
        self.trigger.types.as_slice().iter().any(|t| t == kind)
    }
}

/// A step ready to run: its condition and templates compiled, its place in the graph resolved.
#[derive(Debug)]
pub struct CompiledStep {
    pub condition: Option<Condition>,
    pub input: Option<InputTemplate>,
    /// Indices of the steps it needs.
    pub needs: Vec<usize>,
}

/// A validated definition with everything compiled once.
#[derive(Debug)]
pub struct CompiledWorkflow {
    pub def: Workflow,
    pub trigger_if: Option<Condition>,
    pub steps: Vec<CompiledStep>,
    /// The event fields the trigger condition reads.
    pub paths: FieldPaths,
    /// The parts of the event body (paths from `data`) that deciding and starting a run reads:
    /// the trigger condition's, the first steps' inputs', or the whole body when a first step
    /// has no input (it gets the whole event) or the tasks carry the event (multi-step).
    pub start_paths: FieldPaths,
    /// Each tenant's reservations against `limits.runs_per_minute`.
    runs: RunClock,
}

impl CompiledWorkflow {
    /// Validates `def` against the configured services and compiles it, with the default
    /// [`Bounds`]. Errors name the field (a [`FieldError`]).
    pub fn compile(def: Workflow, services: &BTreeSet<&str>) -> anyhow::Result<CompiledWorkflow> {
        Self::compile_bounded(def, services, &Bounds::default())
    }

    /// Like [`Self::compile`], its templates rendering within `bounds`.
    pub(crate) fn compile_bounded(
        def: Workflow,
        services: &BTreeSet<&str>,
        bounds: &Bounds,
    ) -> anyhow::Result<CompiledWorkflow> {
        check_name(Field::top("id"), &def.id)?;
        if let Some(t) = &def.tenant {
            check_name(Field::top("tenant"), t)?;
        }
        if def.version < 1 {
            return Err(Field::top("version").error("must be at least 1"));
        }
        let types = def.trigger.types.as_slice();
        if types.is_empty() || types.iter().any(|t| t.trim().is_empty()) {
            return Err(Field::top("trigger.type").error("must name at least one event type"));
        }
        let condition = |field: Field, source: &str| {
            Condition::compile(source).map_err(|e| {
                let position = e.position();
                field.error_at(e, position)
            })
        };
        let trigger_if =
            def.trigger.condition.as_deref().map(|c| condition(Field::top("trigger.if"), c)).transpose()?;
        if def.steps.is_empty() {
            return Err(Field::top("steps").error("a workflow needs at least one step"));
        }
        if def.steps.len() > MAX_STEPS {
            return Err(
                Field::top("steps").error(format!("{} steps, more than the limit of {MAX_STEPS}", def.steps.len()))
            );
        }
        if let Some(after) = def.expires_after {
            if !(MIN_EXPIRY..=MAX_EXPIRY).contains(&after) {
                return Err(Field::top("expires_after").error(format!("{after:?} is outside 1s..=30 days")));
            }
        }
        if !(1..=86_400).contains(&def.limits.max_run_seconds) {
            return Err(Field::top("limits.max_run_seconds")
                .error(format!("{} is outside 1..=86400", def.limits.max_run_seconds)));
        }
        if !(1..=1_000_000).contains(&def.limits.runs_per_minute) {
            return Err(Field::top("limits.runs_per_minute")
                .error(format!("{} is outside 1..=1000000", def.limits.runs_per_minute)));
        }
        // First occurrence wins, so the error points at the duplicate.
        let mut index: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, s) in def.steps.iter().enumerate() {
            index.entry(s.id.as_str()).or_insert(i);
        }
        let mut steps = Vec::with_capacity(def.steps.len());
        for (i, step) in def.steps.iter().enumerate() {
            let at = |field: &str| Field::step(i, &step.id, field);
            check_name(at("id"), &step.id)?;
            if index[step.id.as_str()] != i {
                return Err(at("id").error("duplicate step id"));
            }
            if !services.contains(step.service.as_str()) {
                return Err(
                    at("service").error(format!("unknown service {:?} (configured: {:?})", step.service, services))
                );
            }
            let mut needs = Vec::new();
            for (n, need) in step.needs.iter().enumerate() {
                let at_need = || Field { path: [at("needs").path, vec![Segment::Index(n)]].concat(), ..at("needs") };
                match index.get(need.as_str()) {
                    Some(&j) if j != i => needs.push(j),
                    Some(_) => return Err(at_need().error("a step cannot need itself")),
                    None => return Err(at_need().error(format!("no step {need:?} in this workflow"))),
                }
            }
            if step.condition.is_some() && needs.is_empty() {
                return Err(
                    at("if").error("a first step has no earlier outputs to test; put the condition in trigger.if")
                );
            }
            let condition = step.condition.as_deref().map(|c| condition(at("if"), c)).transpose()?;
            let input = (!step.input.is_null())
                .then(|| InputTemplate::compile_bounded(&step.input, "input", bounds))
                .transpose()
                .map_err(|e| at("input").template_error(e))?;
            if let Some(timeout) = step.timeout_ms {
                if !(1..=600_000).contains(&timeout) {
                    return Err(at("timeout_ms").error(format!("{timeout} is outside 1..=600000")));
                }
            }
            if let Some(retry) = &step.retry {
                if !(1..=20).contains(&retry.attempts) {
                    return Err(at("retry.attempts").error(format!("{} is outside 1..=20", retry.attempts)));
                }
                if !(1..=3_600_000).contains(&retry.backoff_ms) {
                    return Err(at("retry.backoff_ms").error(format!("{} is outside 1..=3600000", retry.backoff_ms)));
                }
            }
            if let Some(after) = step.expires_after {
                if !(MIN_EXPIRY..=MAX_EXPIRY).contains(&after) {
                    return Err(at("expires_after").error(format!("{after:?} is outside 1s..=30 days")));
                }
            }
            steps.push(CompiledStep { condition, input, needs });
        }
        check_acyclic(&def, &steps)?;
        // A step may only read outputs that are certain to exist when it runs: its ancestors'.
        for (i, step) in steps.iter().enumerate() {
            let ancestors = ancestors(&steps, i);
            let allowed: BTreeSet<&str> = ancestors.iter().map(|&j| def.steps[j].id.as_str()).collect();
            let at = || Field::step(i, &def.steps[i].id, "input");
            if step.input.as_ref().is_some_and(InputTemplate::reads_steps_dynamically) {
                return Err(at().error("reads `steps` by a computed name; name the steps it reads"));
            }
            let read = step.input.as_ref().map(InputTemplate::references_steps).unwrap_or_default();
            if let Some(bad) = read.iter().find(|r| !allowed.contains(r.as_str())) {
                return Err(at().error(format!("reads steps.{bad}, which is not among the steps it needs")));
            }
        }
        let mut paths = FieldPaths::default();
        if let Some(c) = &trigger_if {
            paths.add(c);
        }
        let mut start_paths = FieldPaths::default();
        start_paths.extend(&paths);
        for step in steps.iter().filter(|s| s.needs.is_empty()) {
            match &step.input {
                Some(input) => start_paths.extend(input.data_paths()),
                None => start_paths.insert(&["data"]),
            }
        }
        if steps.len() > 1 {
            start_paths.insert(&["data"]);
        }
        let runs = RunClock::per_minute(def.limits.runs_per_minute);
        Ok(CompiledWorkflow { def, trigger_if, steps, paths, start_paths, runs })
    }

    /// More than one step: results must be coordinated to start the later ones.
    pub(crate) fn is_multi_step(&self) -> bool {
        self.steps.len() > 1
    }

    /// When `tenant`'s next run of this workflow may start (`limits.runs_per_minute`): now, or
    /// deferred to a reserved time. Never waits: see [`RunClock`].
    pub fn reserve_run(
        &self,
        tenant: &str,
        now_ms: u64,
        margin: Duration,
        cover: impl Fn(Duration) -> Duration,
    ) -> RunStart {
        self.runs.reserve(tenant, now_ms, margin, cover)
    }

    /// Whether the run starts for this event; `scope` holds at least the fields of [`Self::paths`].
    pub fn trigger_matches(&self, scope: &Scope) -> Result<bool, String> {
        match &self.trigger_if {
            None => Ok(true),
            Some(c) => c.evaluate(scope).map_err(|e| format!("trigger.if: {e}")),
        }
    }

    /// The run id of this workflow for an event: the same event always gives the same run.
    pub fn run_id(&self, event: &Event) -> String {
        let name = format!("{}/{}/{}/{}", event.tenant, event.id, self.def.id, self.def.version);
        uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, name.as_bytes()).to_string()
    }

    /// A step's task id: derived from the run and step, so repeating any decision repeats the id.
    pub fn task_id(run_id: &str, step_id: &str) -> String {
        uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, format!("{run_id}/{step_id}").as_bytes()).to_string()
    }

    /// Renders step `i`'s input. `context` is [`template_context`]'s value.
    pub(crate) fn render_input(&self, i: usize, context: &Context, event: &Event) -> Result<Json, String> {
        match &self.steps[i].input {
            Some(t) => t.render(context).map_err(|e| format!("steps.{}.input: {e}", self.def.steps[i].id)),
            None => {
                let mut attributes: serde_json::Map<String, Json> =
                    event_attributes(event).into_iter().map(|(k, v)| (k.to_string(), v)).collect();
                attributes.insert("data".into(), event.data.clone());
                Ok(json!({ "event": attributes }))
            }
        }
    }

    /// The task for step `i` of the run `run_id` started by `event`.
    pub fn task(&self, i: usize, event: &Event, run_id: &str, input: Json, created_at: &str) -> ActionTask {
        let step = &self.def.steps[i];
        ActionTask {
            task_id: Self::task_id(run_id, &step.id),
            run_id: run_id.to_string(),
            event_id: event.id.clone(),
            event_type: event.kind.clone(),
            tenant: event.tenant.clone(),
            workflow_id: self.def.id.clone(),
            workflow_version: self.def.version,
            step_id: step.id.clone(),
            service: step.service.clone(),
            attempt: 1,
            created_at: created_at.to_string(),
            timeout_ms: step.timeout_ms,
            retry: step.retry.as_ref().map(|r| TaskRetry { attempts: r.attempts, backoff_ms: r.backoff_ms }),
            expires_at: self.expires_at(step, event, created_at),
            priority: (self.def.priority != Priority::Normal).then_some(self.def.priority),
            order_key: self.def.order_by.key(event, run_id),
            // Set by whoever knows the run's start (the evaluator, the coordinator): `Plan::stamped`.
            run_at: None,
            input,
            // Later steps render their input from the event; carry it through the run.
            event: if self.is_multi_step() { serde_json::to_value(event).unwrap_or_default() } else { Json::Null },
        }
    }

    /// When step `step`'s task expires: the earlier of the workflow's `expires_after` counted
    /// from the event's time (from `created_at` when the event has none, or one that does not
    /// parse) and the step's own counted from `created_at`. Counting the workflow's from the
    /// event is what "three days late" means to a member; a step's own is about that step's wait.
    fn expires_at(&self, step: &Step, event: &Event, created_at: &str) -> Option<DateTime<Utc>> {
        let parse = |t: &str| DateTime::parse_from_rfc3339(t).ok().map(|t| t.with_timezone(&Utc));
        let created = parse(created_at).unwrap_or_else(Utc::now);
        let happened = event.time.as_deref().and_then(parse).unwrap_or(created);
        let after =
            |from: DateTime<Utc>, d: Duration| from + chrono::Duration::from_std(d).unwrap_or(chrono::TimeDelta::MAX);
        let run = self.def.expires_after.map(|d| after(happened, d));
        let own = step.expires_after.map(|d| after(created, d));
        run.into_iter().chain(own).min()
    }

    /// Indices of the steps with no needs: the ones a run starts with.
    pub fn roots(&self) -> impl Iterator<Item = usize> + '_ {
        self.steps.iter().enumerate().filter(|(_, s)| s.needs.is_empty()).map(|(i, _)| i)
    }
}

/// When a run may start, as [`RunClock::reserve`] decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStart {
    /// Within the limit, and no earlier run of the tenant is deferred ahead of it: start now.
    Now,
    /// Over the limit, or behind earlier runs that were: start at `due` (epoch ms), through a
    /// delay tier at least `floor` long, so that it cannot overtake them (see [`RunClock`]).
    Deferred { due: u64, floor: Duration },
}

/// Nanoseconds in a millisecond: the clock counts in nanoseconds (an interval at a million runs a
/// minute is 60 µs), due times cross processes in milliseconds.
const NANOS_PER_MS: u64 = 1_000_000;

/// Tenants a clock holds before it first sweeps out the idle ones.
const SWEEP_MIN: usize = 1_024;

/// Reservations against a workflow's `limits.runs_per_minute`, per tenant: GCRA (the generic
/// cell rate algorithm, as in governor) that *reserves* a start time instead of refusing, so the
/// evaluator never waits for a permit.
///
/// Each tenant has a theoretical arrival time (`tat`): a run may start once `tat − tolerance`
/// has come, and every run, started or deferred, moves `tat` one interval on. A run over the
/// limit therefore gets the time its permit would be granted, the next one an interval later, and
/// so on: deferred runs start at the limit, in the order they were reserved. (governor can say
/// when a permit would be granted, but not take it ahead of time, hence this small clock.)
///
/// Order with what is already deferred: a deferred run travels through a delay tier and may come
/// back late (a tier's consumer forwards a partition's records in order, holding the head until
/// it is due, so a record can be held behind an earlier-written one for up to the tier's delay).
/// While a tenant's last deferred run may not be back yet (its due time plus its tier's delay
/// plus `margin`), later runs are deferred behind it even when within the limit: due no earlier
/// than it, through the same tier or a longer one (`floor`). Records of one tenant in one tier
/// are in one partition, so they come back in order; a run that must go through a longer tier
/// (its wait has grown past the tier's delay) is due no earlier than the previous run could be
/// back. A run due later than its reservation moves the tenant's later reservations on by as
/// much, so they stay an interval apart.
///
/// Memory: a tenant whose `tat` has passed and whose deferred runs are back is the same as a
/// tenant never seen; such entries are swept out whenever the map has doubled since the last
/// sweep, so it holds about the tenants active within the last `runs_per_minute` runs' time.
#[derive(Debug)]
pub struct RunClock {
    /// Nanoseconds between two runs at the limit.
    interval: u64,
    /// How far ahead of its turn a run may start (GCRA's τ): `burst − 1` intervals.
    tolerance: u64,
    tenants: Mutex<Tenants>,
}

#[derive(Debug, Default)]
struct Tenants {
    slots: HashMap<String, Slot>,
    /// Sweep when `slots` reaches this many (at least [`SWEEP_MIN`]).
    sweep_at: usize,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    /// When the tenant's permits are all back (epoch ns).
    tat: u64,
    /// The tenant's last deferred run.
    chain: Option<Chain>,
}

#[derive(Debug, Clone, Copy)]
struct Chain {
    /// When it is due (epoch ns).
    due: u64,
    /// The tier delay it goes through; later runs go through at least as long a one.
    floor: Duration,
    /// By when it is surely back on the action topic: `due + floor + margin` (epoch ns).
    back_by: u64,
}

impl Tenants {
    fn sweep(&mut self, now: u64) {
        if self.slots.len() < self.sweep_at.max(SWEEP_MIN) {
            return;
        }
        self.slots.retain(|_, s| s.tat > now || s.chain.is_some_and(|c| c.back_by > now));
        self.sweep_at = self.slots.len().saturating_mul(2);
    }
}

impl RunClock {
    /// `per_minute` runs a minute per tenant, up to `per_minute` at once after a quiet minute
    /// (the burst of governor's `Quota::per_minute`, which the limit had before it reserved).
    pub fn per_minute(per_minute: u32) -> RunClock {
        let n = u64::from(per_minute.max(1));
        let interval = (60_000 * NANOS_PER_MS / n).max(1);
        RunClock { interval, tolerance: interval.saturating_mul(n - 1), tenants: Mutex::default() }
    }

    /// Reserves `tenant`'s next run at `now_ms` (epoch ms). `cover(wait)` is the delay of the
    /// tier a run waiting `wait` would go through; `margin` covers a tier consumer's forwarding.
    pub fn reserve(
        &self,
        tenant: &str,
        now_ms: u64,
        margin: Duration,
        cover: impl Fn(Duration) -> Duration,
    ) -> RunStart {
        let now = now_ms.saturating_mul(NANOS_PER_MS);
        // Nothing in here can panic, so a poisoned lock still holds consistent slots.
        let mut tenants = self.tenants.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        tenants.sweep(now);
        if !tenants.slots.contains_key(tenant) {
            tenants.slots.insert(tenant.to_string(), Slot { tat: now, chain: None });
        }
        let slot = tenants.slots.get_mut(tenant).expect("inserted above");
        let start = now.max(slot.tat.saturating_sub(self.tolerance));
        slot.tat = slot.tat.max(now).saturating_add(self.interval);
        let chain = slot.chain.filter(|c| c.back_by > now);
        if start <= now && chain.is_none() {
            slot.chain = None;
            return RunStart::Now;
        }
        let wait = |due: u64| Duration::from_nanos(due.saturating_sub(now));
        let mut due = start.max(chain.map_or(0, |c| c.due));
        let mut floor = cover(wait(due));
        if let Some(c) = chain {
            if floor > c.floor {
                // A longer tier than the earlier runs': this one must not be back before they are.
                due = due.max(c.back_by);
                floor = cover(wait(due));
            }
            floor = floor.max(c.floor);
        }
        slot.tat = slot.tat.saturating_add(due - start);
        let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let back_by = due.saturating_add(nanos(floor)).saturating_add(nanos(margin));
        slot.chain = Some(Chain { due, floor, back_by });
        RunStart::Deferred { due: due.div_ceil(NANOS_PER_MS), floor }
    }

    /// Tenants held (for tests of the sweep).
    #[cfg(test)]
    fn held(&self) -> usize {
        self.tenants.lock().unwrap().slots.len()
    }
}

/// The value templates render against: `event` (attributes and data), `data`, and `steps`
/// (`steps.<id>.output` for every finished step).
pub fn template_context(event: &Event, steps: Json) -> Context {
    // The body is copied once and shared by `data` and `event.data`.
    let data = Context::from(event.data.clone());
    let attributes = Context::from_parts(
        event_attributes(event)
            .into_iter()
            .map(|(name, value)| (name, Context::from(value)))
            .chain([("data", data.clone())]),
    );
    Context::from_parts([("event", attributes), ("data", data), ("steps", Context::from(steps))])
}

/// The CloudEvents attributes templates see as `event.*` (besides `event.data`).
fn event_attributes(event: &Event) -> [(&'static str, Json); 6] {
    [
        ("id", json!(event.id)),
        ("type", json!(event.kind)),
        ("source", json!(event.source)),
        ("time", json!(event.time)),
        ("tenant", json!(event.tenant)),
        ("subject", json!(event.subject)),
    ]
}

fn check_acyclic(def: &Workflow, steps: &[CompiledStep]) -> anyhow::Result<()> {
    // Kahn's algorithm: whatever cannot be ordered is on (or behind) a cycle.
    let mut waiting: Vec<usize> = steps.iter().map(|s| s.needs.len()).collect();
    let mut ready: Vec<usize> = (0..steps.len()).filter(|&i| waiting[i] == 0).collect();
    let mut ordered = 0;
    while let Some(i) = ready.pop() {
        ordered += 1;
        for (j, s) in steps.iter().enumerate() {
            if s.needs.contains(&i) {
                waiting[j] -= 1;
                if waiting[j] == 0 {
                    ready.push(j);
                }
            }
        }
    }
    if ordered < steps.len() {
        let stuck: Vec<&str> = (0..steps.len()).filter(|&i| waiting[i] > 0).map(|i| def.steps[i].id.as_str()).collect();
        return Err(Field::top("steps").error(format!("the needs form a cycle through {}", stuck.join(", "))));
    }
    Ok(())
}

fn ancestors(steps: &[CompiledStep], i: usize) -> BTreeSet<usize> {
    let mut seen = BTreeSet::new();
    let mut todo = steps[i].needs.clone();
    while let Some(j) = todo.pop() {
        if seen.insert(j) {
            todo.extend(&steps[j].needs);
        }
    }
    seen
}

/// A definition file and its text, to say where in it something is.
#[derive(Debug, Clone)]
pub struct Source {
    pub file: PathBuf,
    pub text: String,
}

/// What the locator's visitor returns as an error when it reaches the node it looks for.
const FOUND: &str = "weir: found";

impl Source {
    /// (line, column), from 1, of the node at `path` in the document, or of its nearest ancestor
    /// that is there (a missing field is reported at the mapping that lacks it).
    pub(crate) fn locate(&self, path: &[Segment]) -> Option<(usize, usize)> {
        (0..=path.len()).rev().find_map(|len| {
            // The YAML deserializer gives a visitor's error the position of the node it was
            // visiting: the locator walks down `path` and fails on purpose when it arrives.
            let de = serde_yaml_ng::Deserializer::from_str(&self.text);
            let err = serde::de::DeserializeSeed::deserialize(Locate(&path[..len]), de).err()?;
            err.location().map(|l| (l.line(), l.column()))
        })
    }

    /// `file:line:column` of `path` (of its nearest ancestor that is there), and when
    /// `position` (line, column in the field's text) is given, of that place in the file if the
    /// field's text can be mapped back to it (a single-line scalar, or a `|`/`>` block).
    pub(crate) fn describe(&self, path: &[Segment], position: Option<(usize, usize)>) -> String {
        let Some((line, column)) = self.locate(path) else { return self.file.display().to_string() };
        let (line, column) = position.and_then(|p| self.inside(line, column, p)).unwrap_or((line, column));
        format!("{}:{line}:{column}", self.file.display())
    }

    /// Where `(pl, pc)` of a scalar's text, the scalar starting at `line`:`column`, is in the file.
    fn inside(&self, line: usize, column: usize, (pl, pc): (usize, usize)) -> Option<(usize, usize)> {
        let start = self.text.lines().nth(line - 1)?.chars().nth(column - 1)?;
        match start {
            // A block scalar's text starts on the next line, after its indentation.
            '|' | '>' => {
                let indent = self.text.lines().nth(line)?.chars().take_while(|c| *c == ' ').count();
                Some((line + pl, indent + pc))
            }
            '"' | '\'' if pl == 1 => Some((line, column + pc)),
            _ if pl == 1 => Some((line, column + pc - 1)),
            _ => None,
        }
    }
}

/// Walks a YAML document down a path (see [`Source::locate`]).
struct Locate<'p>(&'p [Segment]);

impl<'de> serde::de::DeserializeSeed<'de> for Locate<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        de.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Locate<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the path's next segment")
    }

    // A scalar anywhere on the way is where the path ends: the default `visit_*` of a scalar
    // fails, which locates it.

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some((Segment::Key(first), rest)) = self.0.split_first() else {
            return Err(serde::de::Error::custom(FOUND));
        };
        while let Some(key) = map.next_key::<serde_yaml_ng::Value>()? {
            if key.as_str() == Some(first) {
                return map.next_value_seed(Locate(rest));
            }
            map.next_value::<serde::de::IgnoredAny>()?;
        }
        Ok(())
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some((Segment::Index(first), rest)) = self.0.split_first() else {
            return Err(serde::de::Error::custom(FOUND));
        };
        for _ in 0..*first {
            if seq.next_element::<serde::de::IgnoredAny>()?.is_none() {
                return Ok(());
            }
        }
        seq.next_element_seed(Locate(rest)).map(|_| ())
    }
}

/// Key prefix of platform-wide workflows.
const PLATFORM: &str = "*";

/// A definition's key on the definitions topic (and in a directory's set): `tenant/id`, or
/// `*/id` for a platform-wide workflow.
pub fn key(tenant: Option<&str>, id: &str) -> String {
    format!("{}/{}", tenant.unwrap_or(PLATFORM), id)
}

/// Reads a YAML file, or every `*.yaml`/`*.yml` file of a directory (one workflow per file),
/// validating each against `services`. Keyed by the definitions topic key, each with its file.
/// Every error starts with `file:line:column`.
pub fn load(
    path: &Path,
    services: &BTreeSet<&str>,
    bounds: &Bounds,
) -> anyhow::Result<BTreeMap<String, (Workflow, Source)>> {
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut files: Vec<_> = std::fs::read_dir(path)
            .with_context(|| format!("reading workflows directory {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
            .collect();
        files.sort();
        files
    } else {
        vec![path.to_path_buf()]
    };
    let mut workflows = BTreeMap::new();
    for file in files {
        let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        let source = Source { file, text };
        let wf: Workflow = serde_yaml_ng::from_str(&source.text).map_err(|e| {
            let at = match e.location() {
                Some(l) => format!("{}:{}:{}", source.file.display(), l.line(), l.column()),
                None => source.file.display().to_string(),
            };
            anyhow::anyhow!("{at}: not a valid workflow: {e}")
        })?;
        let key = key(wf.tenant.as_deref(), &wf.id);
        if let Err(e) = CompiledWorkflow::compile_bounded(wf.clone(), services, bounds) {
            let at = match e.downcast_ref::<FieldError>() {
                Some(field) => source.describe(&field.path, field.position),
                None => source.file.display().to_string(),
            };
            bail!("{at}: workflow {key}: {e:#}");
        }
        if let Some((_, first)) = workflows.get(&key) {
            let first: &Source = first;
            bail!(
                "{}: workflow {key} is defined twice (first at {})",
                source.describe(&[Segment::Key("id".into())], None),
                first.describe(&[Segment::Key("id".into())], None)
            );
        }
        workflows.insert(key, (wf, source));
    }
    Ok(workflows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wf(yaml: &str) -> Workflow {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    fn compile(yaml: &str) -> anyhow::Result<CompiledWorkflow> {
        CompiledWorkflow::compile(wf(yaml), &BTreeSet::from(["webhook", "slack"]))
    }

    #[test]
    fn validation_names_the_field() {
        let cases = [
            ("{id: w, trigger: {type: a}, steps: [{id: s, service: nope}]}", "steps[0] (s).service"),
            ("{id: w, trigger: {type: a}, steps: [{id: s, service: webhook}, {id: s, service: webhook}]}", "steps[1] (s).id"),
            ("{id: w, trigger: {type: a}, steps: [{id: s, service: webhook, needs: [x]}]}", "steps[0] (s).needs"),
            (
                "{id: w, trigger: {type: a}, steps: [{id: a, service: webhook, needs: [b]}, {id: b, service: webhook, needs: [a]}]}",
                "cycle",
            ),
            ("{id: w, trigger: {type: a, if: 'data.x >'}, steps: [{id: s, service: webhook}]}", "trigger.if"),
            ("{id: w, trigger: {type: a}, steps: [{id: s, service: webhook, if: 'true'}]}", "steps[0] (s).if"),
            ("{id: w, trigger: {type: a}, steps: [{id: s, service: webhook, input: {x: '{{ oops'}}]}", "steps[0] (s).input"),
            (
                "{id: w, trigger: {type: a}, steps: [{id: a, service: webhook}, {id: b, service: webhook, input: {x: '{{ steps.c.output }}'}}, {id: c, service: webhook}]}",
                "reads steps.c",
            ),
            ("{id: w, trigger: {type: a}, limits: {max_run_seconds: 0}, steps: [{id: s, service: webhook}]}", "limits.max_run_seconds"),
            ("{id: 'a/b', trigger: {type: a}, steps: [{id: s, service: webhook}]}", "id"),
        ];
        for (yaml, expected) in cases {
            let err = format!("{:#}", compile(yaml).unwrap_err());
            assert!(err.contains(expected), "{yaml}\n  gave: {err}\n  expected to mention: {expected}");
        }
    }

    #[test]
    fn more_than_fifty_steps_are_refused() {
        let steps: Vec<String> = (0..51).map(|i| format!("{{id: s{i}, service: webhook}}")).collect();
        let err = compile(&format!("{{id: w, trigger: {{type: a}}, steps: [{}]}}", steps.join(","))).unwrap_err();
        assert!(err.to_string().contains("limit of 50"), "{err}");
    }

    #[test]
    fn diamond_compiles_with_its_graph() {
        let c = compile(
            "{id: d, trigger: {type: a}, steps: [{id: a, service: webhook}, {id: b, service: webhook, needs: [a]},
              {id: c, service: slack, needs: [a]}, {id: d, service: webhook, needs: [b, c],
               input: {both: '{{ steps.b.output }}', c: '{{ steps.c.output }}'}}]}",
        )
        .unwrap();
        assert_eq!(c.roots().collect::<Vec<_>>(), [0]);
        assert_eq!(c.steps[3].needs, [1, 2]);
        assert!(c.is_multi_step());
    }

    #[test]
    fn ids_are_deterministic_and_versioned() {
        let e: Event = serde_json::from_value(json!({"id": "e1", "source": "/s", "type": "a", "tenant": "t"})).unwrap();
        let v1 = compile("{id: w, trigger: {type: a}, steps: [{id: s, service: webhook}]}").unwrap();
        let v2 = compile("{id: w, version: 2, trigger: {type: a}, steps: [{id: s, service: webhook}]}").unwrap();
        assert_eq!(v1.run_id(&e), v1.run_id(&e));
        assert_ne!(v1.run_id(&e), v2.run_id(&e));
    }

    #[test]
    fn order_by_gives_each_task_its_order_key() {
        let e = |subject: Option<&str>| -> Event {
            serde_json::from_value(json!({"id": "e1", "source": "/s", "type": "a", "tenant": "t", "subject": subject}))
                .unwrap()
        };
        let key = |order_by: &str, event: &Event| {
            let wf =
                compile(&format!("{{id: w, {order_by} trigger: {{type: a}}, steps: [{{id: s, service: webhook}}]}}"))
                    .unwrap();
            let run = wf.run_id(event);
            (wf.task(0, event, &run, Json::Null, "2026-12-07T00:00:00Z").order_key, run)
        };
        assert_eq!(key("", &e(Some("member/1"))).0.as_deref(), Some("subject:member/1"), "subject by default");
        assert_eq!(key("", &e(None)).0, None, "no subject: the tenant's order");
        assert_eq!(key("order_by: tenant,", &e(Some("member/1"))).0, None);
        let (none, run) = key("order_by: none,", &e(Some("member/1")));
        assert_eq!(none, Some(format!("run:{run}")), "each run its own key");
        let wrong = serde_yaml_ng::from_str::<Workflow>("{id: w, order_by: member, trigger: {type: a}, steps: []}");
        assert!(wrong.unwrap_err().to_string().contains("unknown variant `member`"));
        // The default is not written out: definitions published before order_by read the same.
        let def: Workflow = serde_yaml_ng::from_str("{id: w, trigger: {type: a}, steps: []}").unwrap();
        assert!(!serde_json::to_string(&def).unwrap().contains("order_by"));
    }

    /// `weir workflows apply` names file, line and column for every error in a definition.
    #[test]
    fn load_errors_give_file_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let services = BTreeSet::from(["webhook"]);
        let check = |text: &str, expected: &str| {
            let path = dir.path().join("w.yaml");
            std::fs::write(&path, text).unwrap();
            let err = format!("{:#}", load(&path, &services, &Bounds::default()).unwrap_err());
            let expected = format!("{}:{expected}", path.display());
            assert!(err.starts_with(&expected), "{text}\n  gave: {err}\n  expected: {expected}…");
        };
        // YAML syntax, and fields the format does not have.
        check("id: w\ntrigger: {type: a\nsteps: []\n", "3:6: not a valid workflow: ");
        check(
            "id: w\ntrigger: {type: a}\nsteps:\n  - id: s\n    service: webhook\n    retries: 3\n",
            "6:5: not a valid workflow: ",
        );
        // A CEL syntax error: the field's place plus the error's column in the expression.
        let head = "id: w\ntrigger:\n  type: a\n";
        let steps = "steps:\n  - {id: s, service: webhook}\n";
        check(&format!("{head}  if: \"data.x == \"\n{steps}"), "4:18: workflow */w: trigger.if: invalid condition");
        check(&format!("{head}  if: data.x == 1 +\n{steps}"), "4:20: workflow */w: trigger.if: invalid condition");
        check(
            &format!("{head}  if: >-\n    data.x == 1 &&\n{steps}"),
            "5:19: workflow */w: trigger.if: invalid condition",
        );
        // Checks after parsing point at the field.
        check(&format!("{head}  if: data.nope.x > 1 && event.kind == 'a'\n{steps}"), "4:7: workflow */w: trigger.if: ");
        check(&format!("{head}steps:\n  - id: s\n    service: nope\n"), "6:14: workflow */w: steps[0] (s).service: ");
        check(
            &format!("{head}steps:\n  - {{id: a, service: webhook}}\n  - {{id: b, service: webhook, needs: [a, c]}}\n"),
            "6:42: workflow */w: steps[1] (b).needs: no step \"c\"",
        );
        check(&format!("{head}limits:\n  max_run_seconds: 0\n{steps}"), "5:20: workflow */w: limits.max_run_seconds: ");
        check(&format!("{head}steps: []\n"), "4:8: workflow */w: steps: ");
        // A template error, inside the leaf of a nested input, at its place in the leaf.
        check(
            &format!("{head}steps:\n  - id: s\n    service: webhook\n    input:\n      body: {{text: 'Hi {{{{ data.name }}'}}\n"),
            "8:37: workflow */w: steps[0] (s).input: input.body.text: invalid template",
        );
        check(
            &format!("{head}steps:\n  - id: s\n    service: webhook\n    input:\n      a b: ['x', '{{{{ steps.z.output }}}}']\n"),
            "8:7: workflow */w: steps[0] (s).input: reads steps.z",
        );
        // The same workflow in two files: where each is.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), format!("{head}{steps}")).unwrap();
        std::fs::write(dir.path().join("b.yaml"), format!("# again\n{head}{steps}")).unwrap();
        let err = load(dir.path(), &services, &Bounds::default()).unwrap_err().to_string();
        let (a, b) = (dir.path().join("a.yaml"), dir.path().join("b.yaml"));
        assert_eq!(err, format!("{}:2:5: workflow */w is defined twice (first at {}:1:5)", b.display(), a.display()));
    }

    #[test]
    fn template_leaf_paths_split_into_segments() {
        use Segment::{Index, Key};
        assert_eq!(leaf_segments("input"), [Key("input".into())]);
        assert_eq!(
            leaf_segments(r#"input.body["a b"][1].x-y["q\"]"]"#),
            [
                Key("input".into()),
                Key("body".into()),
                Key("a b".into()),
                Index(1),
                Key("x-y".into()),
                Key("q\"]".into())
            ]
        );
    }

    #[test]
    fn a_failing_render_fails_the_run_with_the_reason() {
        let c = compile(
            "{id: w, trigger: {type: a}, steps: [{id: s, service: webhook, input: {x: \
             '{% for a in range(20000) %}{% for b in range(20000) %}{% endfor %}{% endfor %}'}}]}",
        )
        .unwrap();
        let e: Event = serde_json::from_value(json!({"id": "e1", "source": "/s", "type": "a", "tenant": "t"})).unwrap();
        let reason = c.render_input(0, &template_context(&e, json!({})), &e).unwrap_err();
        assert!(reason.starts_with("steps.s.input: input.x: engine ran out of fuel"), "{reason}");
    }

    /// The default tiers: a wait goes through the shortest covering one.
    fn cover(wait: Duration) -> Duration {
        [1, 10, 60, 600].map(Duration::from_secs).into_iter().find(|t| *t >= wait).unwrap_or(Duration::from_secs(600))
    }

    const MARGIN: Duration = Duration::from_secs(5);
    const T0: u64 = 1_800_000_000_000;

    fn due(start: RunStart) -> u64 {
        match start {
            RunStart::Deferred { due, .. } => due,
            RunStart::Now => panic!("expected a deferral"),
        }
    }

    #[test]
    fn runs_over_the_limit_are_reserved_one_interval_apart() {
        let clock = RunClock::per_minute(120);
        // The burst: a quiet tenant may start a minute's runs at once.
        for _ in 0..120 {
            assert_eq!(clock.reserve("t", T0, MARGIN, cover), RunStart::Now);
        }
        // Then one every 500 ms, reserved now, in order, each through a tier covering its wait.
        let mut dues = Vec::new();
        for _ in 0..40 {
            match clock.reserve("t", T0, MARGIN, cover) {
                RunStart::Deferred { due, floor } => {
                    assert!(floor >= Duration::from_millis(due - T0) || floor == Duration::from_secs(600));
                    dues.push(due);
                }
                RunStart::Now => panic!("over the limit"),
            }
        }
        assert_eq!(dues[0], T0 + 500);
        assert_eq!(dues[1], T0 + 1_000);
        assert!(dues.windows(2).all(|w| w[1] >= w[0] + 500), "{dues:?}");
        // Another tenant is not affected.
        assert_eq!(clock.reserve("other", T0, MARGIN, cover), RunStart::Now);
    }

    #[test]
    fn deferred_runs_keep_their_order_across_tiers_and_later_runs_queue_behind_them() {
        let clock = RunClock::per_minute(60);
        for _ in 0..60 {
            assert_eq!(clock.reserve("t", T0, MARGIN, cover), RunStart::Now);
        }
        let mut last: Option<(u64, Duration)> = None;
        for _ in 0..30 {
            let RunStart::Deferred { due, floor } = clock.reserve("t", T0, MARGIN, cover) else { panic!() };
            if let Some((prev_due, prev_floor)) = last {
                assert!(floor >= prev_floor, "never through a shorter tier than the run before");
                if floor > prev_floor {
                    // Through a longer tier: not back before the run ahead surely is.
                    let back_by = prev_due + prev_floor.as_millis() as u64 + MARGIN.as_millis() as u64;
                    assert!(due >= back_by, "{due} < {back_by}");
                } else {
                    assert!(due >= prev_due + 1_000);
                }
            }
            last = Some((due, floor));
        }
        let (last_due, floor) = last.unwrap();
        assert_eq!(floor, Duration::from_secs(60), "waits of up to a minute and more went up to the 1m tier");
        // Once the tenant's limit has room again, a run is still deferred behind the last one,
        // through the same tier, until that one is surely back.
        let later = last_due + 30_000;
        let RunStart::Deferred { due: behind, floor } = clock.reserve("t", later, MARGIN, cover) else { panic!() };
        assert!(behind >= last_due && floor == Duration::from_secs(60), "{behind} {floor:?}");
        let back = behind + 60_000 + MARGIN.as_millis() as u64;
        assert_eq!(clock.reserve("t", back, MARGIN, cover), RunStart::Now);
    }

    #[test]
    fn a_deferral_due_later_than_its_reservation_moves_the_later_ones() {
        let clock = RunClock::per_minute(60);
        for _ in 0..60 {
            clock.reserve("t", T0, MARGIN, cover);
        }
        let dues: Vec<u64> = (0..12).map(|_| (due(clock.reserve("t", T0, MARGIN, cover)) - T0) / 1_000).collect();
        // The first waits 1 s (the 1 s tier); the second would wait 2 s, so it goes through the
        // 10 s tier, due once the first is surely back (1 s + 1 s + the 5 s margin); the one
        // after 10 s through the 1 m tier, once the 10 s tier's last is back (10 + 10 + 5).
        // Between, a second apart, and every later reservation moved on with them.
        assert_eq!(dues, [1, 7, 8, 9, 10, 25, 26, 27, 28, 29, 30, 31]);
    }

    #[test]
    fn idle_tenants_are_swept_out() {
        let clock = RunClock::per_minute(600);
        for i in 0..SWEEP_MIN {
            assert_eq!(clock.reserve(&format!("t{i}"), T0, MARGIN, cover), RunStart::Now);
        }
        assert_eq!(clock.held(), SWEEP_MIN);
        // 100 ms later each has its permit back: all are as good as new, and go.
        assert_eq!(clock.reserve("new", T0 + 100, MARGIN, cover), RunStart::Now);
        assert_eq!(clock.held(), 1);
        // A tenant with a deferred run out is kept until the run is surely back.
        let busy = RunClock::per_minute(1);
        assert!(matches!(busy.reserve("busy", T0, MARGIN, cover), RunStart::Now));
        assert!(matches!(busy.reserve("busy", T0, MARGIN, cover), RunStart::Deferred { .. }));
        for i in 0..SWEEP_MIN - 1 {
            busy.reserve(&format!("t{i}"), T0, MARGIN, cover);
        }
        busy.reserve("x", T0 + 61_000, MARGIN, cover);
        assert_eq!(busy.held(), 2, "busy (its run due at 60 s is back by 125 s) and x");
        busy.reserve("y", T0 + 200_000, MARGIN, cover);
        assert_eq!(busy.held(), 3, "the next sweep waits until the map is large again");
    }

    #[test]
    fn huge_limits_and_far_times_do_not_overflow() {
        for per_minute in [1, 1_000_000, u32::MAX] {
            let clock = RunClock::per_minute(per_minute);
            for now in [0, T0, u64::MAX / 1_000_000, u64::MAX] {
                for _ in 0..3 {
                    let _ = clock.reserve("t", now, Duration::MAX, |_| Duration::MAX);
                }
            }
        }
        let clock = RunClock::per_minute(u32::MAX);
        for _ in 0..10_000 {
            assert_eq!(clock.reserve("t", T0, MARGIN, cover), RunStart::Now, "a burst as large as the limit");
        }
    }
}
