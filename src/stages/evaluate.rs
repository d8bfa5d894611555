//! Stage 2: match events against workflow definitions and emit action tasks.
//!
//! The loop reads in one screen: take a batch from the [`Source`], evaluate each event (pure CPU
//! work, no await), start producing its outputs, and mark the event done once *all* of them are
//! acknowledged by the broker. At most `max_inflight` events are between "taken" and "done";
//! past that the stage stops taking batches and the source pauses.
//!
//! Per event, in order of cost: decode its attributes, leaving the body as checked JSON text;
//! look up the candidate workflows for (tenant, type) in the definition store's cache (usually
//! none: done); parse from the body only what the candidates read ([`start_paths`]: the body is
//! most of an event's bytes, and building all of it as values was most of the evaluator's
//! allocations); build the CEL scope *once*, from only the fields the candidates' conditions
//! read; evaluate each condition; render the first steps' inputs. A malformed or oversized event
//! is dead-lettered. A condition or template that fails on this event (a missing field, a wrong
//! type) does not stop anything: it becomes a `failed` result naming the reason, which the record
//! stage stores like any other outcome. Which steps start is [`plan::start`]'s decision: the
//! same planner the record stage uses for a run's later steps.
//!
//! # A workflow's `limits.runs_per_minute`: deferred, never waited for
//!
//! Each run with a task to start reserves a start time on its workflow's clock for its tenant
//! ([`RunClock`](crate::engine::workflow::RunClock), GCRA). Within the limit (a minute's runs
//! at once after a quiet minute, then one per interval) its first steps' tasks go to
//! `actions.<service>` as always. Over it, the run is *deferred*: its tasks go to the service's
//! delay tier covering the wait (`actions.<service>.retry.<tier>`) with
//! `weir.retry.kind=deferral`, `weir.retry.due=<reserved start, epoch ms>` and
//! `weir.retry.reason` naming the workflow and its limit: the same records as the executor's
//! own deferrals ([`deferral`]). The tier's consumer sends them back to the action topic when
//! due and the executor takes them like any task, so the run starts at the limit. Its decided
//! results (steps that failed before a call) are produced at once: they call nothing. Deferred
//! runs are counted in `weir_deferred_total{stage="evaluate",service}`.
//!
//! **Order.** A (workflow, tenant)'s runs start in event order: a run is never produced directly
//! while earlier deferred runs of the same (workflow, tenant) may still be on their way back (due
//! time, plus the tier's delay, plus [`FORWARDING_MARGIN`]); it is deferred behind them, through
//! the same tier or a longer one, so that it comes back after them (the clock's docs say why that
//! holds). Runs of *different* workflows have different limits and are not ordered with each
//! other. The clock lives in memory: after a restart of the evaluator, or when a rebalance moves
//! a partition to another process, a tenant starts with a fresh clock, so runs deferred before
//! may start after later ones and the tenant may get up to one extra burst in the minute after.
//! A crash replays the events after the last stored offset, and their runs are reserved again
//! (the tasks keep their ids, so their calls keep their `Idempotency-Key`).
//!
//! A wait longer than a service's longest tier goes to the longest tier with its due time: its
//! tier's consumer holds that partition's head until then (see the executor's delay module), so
//! keep the longest tier at least as long as the backlog a tenant may build (default 10 min:
//! 10,000 runs at 1,000 a minute).
//!
//! **Shared budgets.** `evaluator.max_inflight` counts events whose records are being produced,
//! and nothing in an event's work waits for anything but the broker's acknowledgements: no
//! permit, no tenant's turn, no lock held across an await. So a tenant over its limit holds a
//! slot only as long as any other event does, and the stage goes on with every other tenant and
//! partition. A service without delay tiers is refused when the config is loaded: there would
//! be nowhere to defer to.

use std::{borrow::Cow, collections::HashMap, sync::Arc, time::Duration};

use futures::{future::BoxFuture, stream::FuturesUnordered, FutureExt, StreamExt};
use rdkafka::{message::OwnedMessage, producer::FutureProducer, Message};

use crate::{
    config::{Config, Priority},
    engine::condition::FieldPaths,
    engine::definitions::DefinitionStore,
    engine::plan,
    engine::workflow,
    engine::workflow::{CompiledWorkflow, RunStart},
    envelope::{self, ActionResult, ActionTask, Event as DomainEvent, Format, Status},
    kafka,
    kafka::dead_letter::DeadLetters,
    kafka::deferral,
    kafka::limits::{self, Limits},
    kafka::source::{Source, Ticket},
    shutdown::CancellationToken,
    telemetry::{Event, Stage},
};

/// Whether an event's records reached the broker.
type Produced = Result<(), rdkafka::error::KafkaError>;
type Outcome = (Ticket, Produced);

/// A record to produce: topic, key, JSON payload, and for a deferred task what makes it one.
struct Output {
    topic: Arc<str>,
    key: String,
    payload: Vec<u8>,
    deferred: Option<Deferred>,
}

/// A first-step task of a run over its workflow's limit, on its way through a delay tier.
struct Deferred {
    /// When it is due back on the action topic (epoch ms).
    due: u64,
    reason: Arc<str>,
    service: String,
    tier: String,
    /// The task's priority: the delay tier sends it back to that priority's action topic.
    priority: Priority,
}

/// Events evaluated between two yields to the runtime (see the main loop): about a millisecond of
/// work for events that start runs, a few microseconds' cost for the yield.
const YIELD_EVERY: usize = 64;

/// How long after a deferred run is due, and its tier's delay has passed, it is taken to be back
/// on the action topic: the tier consumer's poll, its produce and the broker's acknowledgement
/// (milliseconds, normally), with room for a slow broker. A tier consumer stopped for longer
/// (its process restarting) is not covered: see the module docs.
const FORWARDING_MARGIN: Duration = Duration::from_secs(5);

/// A service's delay tiers, ascending: their delays, and (delay, tier name, physical topic).
type Tiers = (Vec<Duration>, Vec<(Duration, String, Arc<str>)>);

/// A run about to start: its workflow, its first steps' tasks (service and record) and the
/// records of what was decided without a call (failed steps).
struct Run {
    workflow: Arc<CompiledWorkflow>,
    tasks: Vec<(String, Priority, Output)>,
    decided: Vec<Output>,
}

struct Evaluator {
    definitions: Arc<DefinitionStore>,
    producer: FutureProducer,
    dead_letters: DeadLetters,
    /// service name → its physical action topics, by [`Priority::index`] (shared, not copied, by
    /// every task's record)
    action_topics: HashMap<String, [Arc<str>; 3]>,
    /// service name → its delay tiers, where runs over their workflow's limit wait
    tiers: HashMap<String, Tiers>,
    results_topic: Arc<str>,
    max_event_bytes: usize,
    limits: Limits,
}

/// Runs the evaluator until `shutdown` is cancelled or an unrecoverable error occurs.
pub async fn run(
    config: Arc<Config>,
    definitions: Arc<DefinitionStore>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut source =
        Source::subscribe(&config, Stage::Evaluate, &config.names().events(), &config.names().group("evaluate"))?;
    // Runs over their workflow's limit wait in a delay tier of their first steps' service: one
    // without tiers would leave nowhere to defer to (config validation refuses it; this names it
    // again for a config built in code).
    if let Some((service, _)) = config.services.iter().find(|(_, s)| s.retry.tiers.is_empty()) {
        anyhow::bail!(
            "evaluator: services.{service}.retry.tiers is empty: runs over a limit need a delay tier to wait in"
        );
    }
    let tiers = config
        .services
        .iter()
        .map(|(service, settings)| {
            let tiers = settings.retry.tiers.iter().zip(settings.retry.tier_names());
            let tiers = tiers.map(|(delay, name)| (*delay, name.clone(), config.names().retry(service, &name).into()));
            (service.clone(), (settings.retry.tiers.clone(), tiers.collect()))
        })
        .collect();
    let producer = kafka::producer(&config)?;
    let evaluator = Arc::new(Evaluator {
        tiers,
        definitions,
        dead_letters: DeadLetters::new(producer.clone(), config.names().dlq(), Stage::Evaluate)
            .with_limits(&config.limits),
        producer,
        action_topics: config
            .services
            .keys()
            .map(|s| (s.clone(), Priority::ALL.map(|p| config.names().actions_at(s, p).into())))
            .collect(),
        results_topic: config.names().results().into(),
        max_event_bytes: config.evaluator.max_event_bytes,
        limits: config.limits.clone(),
    });
    let max_inflight = config.evaluator.max_inflight;
    let mut inflight: FuturesUnordered<BoxFuture<'static, Outcome>> = FuturesUnordered::new();
    let result = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            Some((ticket, r)) = inflight.next() => {
                if let Err(e) = r { break Err(e) }
                source.done(&ticket);
            }
            batch = source.recv(), if inflight.len() < max_inflight => match batch {
                Some(mut batch) => {
                    // Batches already handed over are taken with it (while in-flight room lasts),
                    // so that the order below covers them: a quiet tenant's event in the next
                    // batch need not wait for the flood in this one.
                    while batch.len() + inflight.len() < max_inflight {
                        match source.try_recv() {
                            Some(more) => batch.extend(more),
                            None => break,
                        }
                    }
                    // Most events start nothing: they are done as soon as they are evaluated, and
                    // are marked done together, one tracker lock per batch.
                    let mut finished = Vec::new();
                    let order = light_first(batch.iter().map(|d| (d.message.partition(), d.message.key())));
                    let mut batch: Vec<Option<_>> = batch.into_iter().map(Some).collect();
                    for (n, i) in order.into_iter().enumerate() {
                        // A batch is CPU work without an await: the stages share the process's
                        // few runtime threads, and a whole flood's batch (1,000 events, tens of
                        // ms) would hold one from every other stage's tasks, the executor's calls
                        // among them. So the evaluator lets them run every YIELD_EVERY events.
                        if n > 0 && n % YIELD_EVERY == 0 {
                            tokio::task::yield_now().await;
                        }
                        let Some(d) = batch[i].take() else { continue };
                        match evaluator.clone().evaluate(d.message) {
                            Some(work) => {
                                // Polled once at once: that hands the event's records to the
                                // producer now, so they leave with its next request instead of
                                // after the whole batch has been evaluated. The set polls it again
                                // (a pushed future is ready to run) with its own waker.
                                let mut work = work.map(move |r| (d.ticket, r)).boxed();
                                match (&mut work).now_or_never() {
                                    Some(outcome) => inflight.push(futures::future::ready(outcome).boxed()),
                                    None => inflight.push(work),
                                }
                            }
                            None => finished.push(d.ticket),
                        }
                    }
                    source.done_all(&finished);
                }
                None => break Ok(()),
            },
        }
    };
    // Finish what was started so its offsets are stored before the consumer leaves the group.
    while let Some((ticket, r)) = inflight.next().await {
        if r.is_ok() {
            source.done(&ticket);
        }
    }
    source.close();
    result.map_err(|e| kafka::produce_lost("evaluator: producing failed", e))
}

impl Evaluator {
    /// The work an event needs before it is done (producing its tasks, or dead-lettering it);
    /// `None` when it needs none.
    fn evaluate(self: Arc<Self>, message: OwnedMessage) -> Option<BoxFuture<'static, Produced>> {
        let payload = message.payload().unwrap_or_default();
        let content_type = kafka::header(message.headers(), envelope::CONTENT_TYPE);
        // The attributes first: most events start nothing, and need none of their body.
        let max_attribute_bytes = self.limits.max_attribute_bytes;
        let decoded =
            envelope::decode_unparsed_event_within(payload, content_type, self.max_event_bytes, max_attribute_bytes);
        let decoded = decoded.and_then(|event| {
            let candidates = self.definitions.matching(&event.tenant, &event.kind);
            if candidates.is_empty() {
                return Ok(None);
            }
            let paths = start_paths(&candidates);
            let event = event.map_data(|body| body.parse(|text| paths.parse_selected("data", text)))?;
            Ok(Some((event, candidates)))
        });
        let (event, candidates) = match decoded {
            Ok(Some(decoded)) => decoded,
            Ok(None) => return None,
            Err(e) => {
                Event::Failed { stage: Stage::Evaluate, reason: "decode", retryable: false, detail: &e.to_string() }
                    .emit();
                return Some(async move { self.dead_letters.send(&message, &e.to_string()).await }.boxed());
            }
        };
        let now = deferral::epoch_ms();
        let mut outputs = Vec::new();
        let run_at = kafka::record_time(&message);
        for run in self.runs(&event, &candidates, run_at) {
            outputs.extend(run.decided);
            // A run with no task to start (every first step failed) starts nothing to limit.
            if run.tasks.is_empty() {
                continue;
            }
            let cover =
                |wait| run.tasks.iter().map(|(service, ..)| self.tier(service, wait).0).max().unwrap_or_default();
            match run.workflow.reserve_run(&event.tenant, now, FORWARDING_MARGIN, cover) {
                RunStart::Now => outputs.extend(run.tasks.into_iter().map(|(.., output)| output)),
                RunStart::Deferred { due, floor } => {
                    let wait = Duration::from_millis(due.saturating_sub(now)).max(floor);
                    let wf = &run.workflow.def;
                    let reason: Arc<str> = format!(
                        "workflow {} (version {}): tenant over limits.runs_per_minute ({}), or behind its runs \
                         deferred for it; the run starts at the limit, in event order",
                        workflow::key(wf.tenant.as_deref(), &wf.id),
                        wf.version,
                        wf.limits.runs_per_minute
                    )
                    .into();
                    for (service, priority, mut output) in run.tasks {
                        let (_, tier, topic) = self.tier(&service, wait);
                        output.topic = topic.clone();
                        let (reason, tier) = (reason.clone(), tier.to_string());
                        output.deferred = Some(Deferred { due, reason, tier, service, priority });
                        outputs.push(output);
                    }
                }
            }
        }
        if outputs.is_empty() {
            return None;
        }
        Some(async move { self.produce(&message, outputs).await }.boxed())
    }

    /// The delay tier of `service` that a task waiting `wait` goes through (see
    /// [`deferral::tier_for`]). Every service has one: checked at start.
    fn tier(&self, service: &str, wait: Duration) -> &(Duration, String, Arc<str>) {
        let (delays, tiers) = &self.tiers[service];
        &tiers[deferral::tier_for(delays, wait)]
    }

    /// The runs `event` starts: per workflow, its first steps' tasks and its decided results.
    /// `run_at` is when the runs started, for the partitioning of their rows (the event record's
    /// timestamp, [`kafka::record_time`]).
    fn runs(
        &self,
        event: &DomainEvent,
        candidates: &[Arc<CompiledWorkflow>],
        run_at: chrono::DateTime<chrono::Utc>,
    ) -> Vec<Run> {
        plan::start(event, candidates, &chrono::Utc::now().to_rfc3339())
            .into_iter()
            .map(|(workflow, plan)| {
                let plan = plan.stamped(Some(run_at));
                let mut run = Run { workflow, tasks: Vec::new(), decided: Vec::new() };
                // Bounded before it is produced: a task over the limit is its run's failure.
                for task in plan.tasks {
                    match limits::task_payload(&task, self.limits.max_record_bytes) {
                        Ok(payload) => {
                            let topic = self.action_topics[&task.service][task.priority().index()].clone();
                            let priority = task.priority();
                            let output = Output { topic, key: task.tenant, payload, deferred: None };
                            run.tasks.push((task.service, priority, output));
                        }
                        Err(reason) => run.decided.push(self.failed_output(task_failed(task, reason))),
                    }
                }
                run.decided.extend(plan.decided.into_iter().map(|result| self.failed_output(result)));
                run
            })
            .collect()
    }

    /// The record of a run that cannot start, for the results topic.
    fn failed_output(&self, mut result: ActionResult) -> Output {
        let detail = result.error.as_deref().unwrap_or_default();
        Event::Failed { stage: Stage::Evaluate, reason: "evaluate", retryable: false, detail }.emit();
        let payload = limits::result_payload(&mut result, self.limits.max_record_bytes);
        Output { topic: self.results_topic.clone(), key: result.tenant, payload, deferred: None }
    }

    /// Produces the records of `event`. A record the producer or broker refuses for what it is
    /// (too large for a topic changed since start, invalid) must not stop the stage: a task
    /// becomes its run's `failed` result, and a result that is refused dead-letters the event.
    /// Only infrastructure errors are returned.
    async fn produce(&self, event: &OwnedMessage, outputs: Vec<Output>) -> Produced {
        let sends = outputs.iter().map(|Output { topic, key, payload, deferred }| async move {
            let headers = match deferred {
                None => kafka::content_headers(Format::Json),
                Some(d) => deferral::deferral_headers(None, d.due, Some(&d.reason), d.priority),
            };
            match kafka::send(&self.producer, topic, Some(key.as_bytes()), payload, headers).await {
                Ok(_) => {
                    Event::Produced { stage: Stage::Evaluate, topic, count: 1 }.emit();
                    if let Some(d) = deferred {
                        Event::Deferred { stage: Stage::Evaluate, service: &d.service, tenant: key, tier: &d.tier }
                            .emit();
                    }
                    Ok(())
                }
                Err(e) if limits::is_record_error(&e) => self.refused(event, topic, payload, e).await,
                Err(e) => Err(e),
            }
        });
        futures::future::try_join_all(sends).await.map(|_| ())
    }

    async fn refused(
        &self,
        event: &OwnedMessage,
        topic: &str,
        payload: &[u8],
        e: rdkafka::error::KafkaError,
    ) -> Produced {
        let reason = format!("producing a {}-byte record to {topic} was refused: {e}", payload.len());
        Event::Failed { stage: Stage::Evaluate, reason: "produce", retryable: false, detail: &reason }.emit();
        let task =
            (topic != &*self.results_topic).then(|| serde_json::from_slice::<ActionTask>(payload).ok()).flatten();
        if let Some(task) = task {
            let Output { topic, key, payload, .. } = self.failed_output(task_failed(task, reason.clone()));
            let headers = kafka::content_headers(Format::Json);
            match kafka::send(&self.producer, &topic, Some(key.as_bytes()), &payload, headers).await {
                Ok(_) => {
                    Event::Produced { stage: Stage::Evaluate, topic: &topic, count: 1 }.emit();
                    return Ok(());
                }
                Err(e) if limits::is_record_error(&e) => {}
                Err(e) => return Err(e),
            }
        }
        self.dead_letters.send(event, &reason).await
    }
}

/// The `failed` result of a task that cannot be produced.
fn task_failed(task: ActionTask, reason: String) -> ActionResult {
    // No event: the task was too large, most likely because of it.
    ActionResult {
        attempts: 0,
        error: Some(reason),
        event: serde_json::Value::Null,
        finished_at: task.created_at.clone(),
        ..ActionResult::from_task(task, Status::Failed, std::time::Duration::ZERO)
    }
}

/// The order a batch's events are evaluated in (indices into it): the events of the (partition,
/// key) groups with the fewest events in the batch first, each group's in offset order.
///
/// A batch is evaluated in one go, and an event's tasks go out only once it is evaluated, so an
/// event waits for every event evaluated before it. A tenant that floods fills most of a batch
/// (the events topic is keyed by tenant, and librdkafka hands over a partition's fetched records
/// together): in offset order, a quiet tenant's event behind its share waits for the evaluation of
/// all of it, whatever its partition. Light groups first, a quiet event waits only for the other
/// light groups, and the flooding tenant only for them. A key's events keep their order (on the
/// events topic the key is the tenant, whose order the run limits rely on); events of different
/// keys were never ordered with each other (they are on different partitions as often as not).
pub(crate) fn light_first<'a>(keys: impl Iterator<Item = (i32, Option<&'a [u8]>)>) -> Vec<usize> {
    let keys: Vec<_> = keys.collect();
    let mut order: Vec<usize> = (0..keys.len()).collect();
    // One group (a single tenant, the flat-out case): offset order, without counting.
    if keys.windows(2).all(|w| w[0] == w[1]) {
        return order;
    }
    let mut sizes: HashMap<(i32, Option<&[u8]>), usize> = HashMap::new();
    for k in &keys {
        *sizes.entry(*k).or_default() += 1;
    }
    // Stable: within a group (and among groups of one size), offset order holds.
    order.sort_by_key(|&i| sizes[&keys[i]]);
    order
}

/// The parts of an event's body that `candidates` read to decide and start their runs
/// ([`CompiledWorkflow::start_paths`]): an event parsed with only these plans exactly as the
/// whole event would.
pub fn start_paths(candidates: &[Arc<CompiledWorkflow>]) -> Cow<'_, FieldPaths> {
    static NOTHING: FieldPaths = FieldPaths::new();
    // Usually at most one candidate reads the body: its paths serve as they are.
    let mut reading = candidates.iter().filter(|wf| wf.start_paths.reads("data"));
    match (reading.next(), reading.next()) {
        (None, _) => Cow::Borrowed(&NOTHING),
        (Some(one), None) => Cow::Borrowed(&one.start_paths),
        (Some(_), Some(_)) => {
            let mut paths = FieldPaths::new();
            for wf in candidates {
                paths.extend(&wf.start_paths);
            }
            Cow::Owned(paths)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::{json, Value as Json};

    use super::*;
    use crate::engine::workflow;

    fn compile(yaml: &str) -> Arc<CompiledWorkflow> {
        let def: workflow::Workflow = serde_yaml_ng::from_str(yaml).unwrap();
        Arc::new(CompiledWorkflow::compile(def, &BTreeSet::from(["webhook"])).unwrap())
    }

    /// What `plan::start` gives, comparable (a workflow's rate limiter has no meaningful `Debug`).
    fn planned(event: &DomainEvent, candidates: &[Arc<CompiledWorkflow>]) -> Vec<(String, String)> {
        plan::start(event, candidates, "2026-11-23T10:00:00Z")
            .into_iter()
            .map(|(wf, p)| (wf.def.id.clone(), format!("{p:?}")))
            .collect()
    }

    #[test]
    fn light_groups_are_evaluated_first_and_each_key_keeps_its_order() {
        let noisy: &[u8] = b"noisy";
        let (q1, q2): (&[u8], &[u8]) = (b"quiet-1", b"quiet-2");
        // Partition 0: the noisy tenant with a quiet one among its records; partition 1: another
        // quiet tenant behind them in the batch.
        let batch = [
            (0, Some(noisy)),
            (0, Some(noisy)),
            (0, Some(q1)),
            (0, Some(noisy)),
            (1, Some(q2)),
            (0, Some(noisy)),
            (1, Some(q2)),
            (0, None),
        ];
        let order = light_first(batch.iter().copied());
        assert_eq!(order, vec![2, 7, 4, 6, 0, 1, 3, 5]);
        // Every index once, and each group's in batch order.
        let mut seen = order.clone();
        seen.sort_unstable();
        assert_eq!(seen, (0..batch.len()).collect::<Vec<_>>());
        for group in [(0, Some(noisy)), (1, Some(q2))] {
            let positions: Vec<usize> = order.iter().copied().filter(|&i| batch[i] == group).collect();
            assert!(positions.windows(2).all(|w| w[0] < w[1]), "{group:?}: {positions:?}");
        }
        // The same key on two partitions is two groups.
        assert_eq!(light_first([(0, Some(q1)), (0, Some(q1)), (1, Some(q1))].into_iter()), vec![2, 0, 1]);
    }

    #[test]
    fn a_batch_of_one_group_is_evaluated_in_offset_order() {
        let one: &[u8] = b"t";
        assert_eq!(light_first([(3, Some(one)); 5].into_iter()), vec![0, 1, 2, 3, 4]);
        assert!(light_first(std::iter::empty()).is_empty());
    }

    #[test]
    fn an_event_parsed_for_its_candidates_plans_like_the_whole_event() {
        let candidates = [
            "{id: all, trigger: {type: a}, steps: [{id: s, service: webhook, input: {t: '{{ event.type }}'}}]}",
            r#"{id: paid, trigger: {type: a, if: 'data.member.status == "paid"'},
                steps: [{id: s, service: webhook, input: {to: '{{ data.member.email }}'}}]}"#,
            "{id: missing, trigger: {type: a, if: 'data.other[0] == 1'}, steps: [{id: s, service: webhook, input: {x: '{{ data.nope.x }}'}}]}",
            "{id: whole, trigger: {type: a}, steps: [{id: s, service: webhook}]}",
            "{id: multi, trigger: {type: a}, steps: [{id: a, service: webhook}, {id: b, service: webhook, needs: [a]}]}",
        ]
        .map(compile);
        let payload = json!({"id": "e-1", "source": "/s", "type": "a", "tenant": "t",
            "data": {"member": {"status": "paid", "email": "a@example.com", "bio": "long"}, "other": [1, 2]}})
        .to_string();
        let full = envelope::decode_event(payload.as_bytes(), None, 1 << 20).unwrap();
        let parse = |candidates: &[Arc<CompiledWorkflow>]| {
            let paths = start_paths(candidates);
            envelope::decode_unparsed_event(payload.as_bytes(), None, 1 << 20)
                .unwrap()
                .map_data(|body| body.parse(|text| paths.parse_selected("data", text)))
                .unwrap()
        };
        let mut subsets: Vec<&[Arc<CompiledWorkflow>]> = candidates.chunks(1).collect();
        subsets.extend([&candidates[..2], &candidates[..3], &candidates[..]]);
        for subset in subsets {
            let expected = planned(&full, subset);
            assert!(!expected.is_empty());
            assert_eq!(planned(&parse(subset), subset), expected);
        }
        // Only what is read is parsed, unless a task carries the event or its input is the event.
        assert_eq!(parse(&candidates[..1]).data, Json::Null);
        assert_eq!(parse(&candidates[..2]).data, json!({"member": {"status": "paid", "email": "a@example.com"}}));
        assert_eq!(parse(&candidates[3..4]).data, full.data);
        assert_eq!(parse(&candidates[4..]).data, full.data);
    }
}
