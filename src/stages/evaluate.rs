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

use std::{borrow::Cow, collections::HashMap, sync::Arc};

use futures::{future::BoxFuture, stream::FuturesUnordered, FutureExt, StreamExt};
use rdkafka::{message::OwnedMessage, producer::FutureProducer, Message};

use crate::{
    config::Config,
    engine::condition::FieldPaths,
    engine::definitions::DefinitionStore,
    engine::plan,
    engine::workflow::CompiledWorkflow,
    envelope::{self, ActionResult, ActionTask, Event as DomainEvent, Format, Status},
    kafka,
    kafka::dead_letter::DeadLetters,
    kafka::limits::{self, Limits},
    kafka::source::{Source, Ticket},
    shutdown::CancellationToken,
    telemetry::{Event, Stage},
};

/// Whether an event's records reached the broker.
type Produced = Result<(), rdkafka::error::KafkaError>;
type Outcome = (Ticket, Produced);

/// A record to produce: topic, key, JSON payload.
type Output = (Arc<str>, String, Vec<u8>);

struct Evaluator {
    definitions: Arc<DefinitionStore>,
    producer: FutureProducer,
    dead_letters: DeadLetters,
    /// service name → physical action topic (shared, not copied, by every task's record)
    action_topics: HashMap<String, Arc<str>>,
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
    let producer = kafka::producer(&config)?;
    let evaluator = Arc::new(Evaluator {
        definitions,
        dead_letters: DeadLetters::new(producer.clone(), config.names().dlq(), Stage::Evaluate)
            .with_limits(&config.limits),
        producer,
        action_topics: config.services.keys().map(|s| (s.clone(), config.names().actions(s).into())).collect(),
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
                Some(batch) => {
                    // Most events start nothing: they are done as soon as they are evaluated, and
                    // are marked done together, one tracker lock per batch.
                    let mut finished = Vec::new();
                    for d in batch {
                        match evaluator.clone().evaluate(d.message) {
                            Some(work) => inflight.push(work.map(move |r| (d.ticket, r)).boxed()),
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
    result.map_err(|e| anyhow::anyhow!("evaluator: producing failed, stopping without committing: {e}"))
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
        let runs = self.runs(&event, &candidates);
        if runs.is_empty() {
            return None;
        }
        Some(
            async move {
                let mut outputs = Vec::new();
                for (workflow, run) in runs {
                    // Over the tenant's runs-per-minute limit: wait for a permit (delay, never drop).
                    workflow.run_permit(&event.tenant).await;
                    outputs.extend(run);
                }
                self.produce(&message, outputs).await
            }
            .boxed(),
        )
    }

    /// The records of the runs `event` starts, per workflow (for its runs-per-minute permit).
    fn runs(
        &self,
        event: &DomainEvent,
        candidates: &[Arc<CompiledWorkflow>],
    ) -> Vec<(Arc<CompiledWorkflow>, Vec<Output>)> {
        plan::start(event, candidates, &chrono::Utc::now().to_rfc3339())
            .into_iter()
            .map(|(wf, plan)| {
                // Bounded before it is produced: a task over the limit is its run's failure.
                let tasks = plan.tasks.into_iter().map(|task| {
                    match limits::task_payload(&task, self.limits.max_record_bytes) {
                        Ok(payload) => (self.action_topics[&task.service].clone(), task.tenant, payload),
                        Err(reason) => self.failed_output(task_failed(task, reason)),
                    }
                });
                let decided = plan.decided.into_iter().map(|result| self.failed_output(result));
                (wf, tasks.chain(decided).collect())
            })
            .collect()
    }

    /// The record of a run that cannot start, for the results topic.
    fn failed_output(&self, mut result: ActionResult) -> Output {
        let detail = result.error.as_deref().unwrap_or_default();
        Event::Failed { stage: Stage::Evaluate, reason: "evaluate", retryable: false, detail }.emit();
        let payload = limits::result_payload(&mut result, self.limits.max_record_bytes);
        (self.results_topic.clone(), result.tenant, payload)
    }

    /// Produces the records of `event`. A record the producer or broker refuses for what it is
    /// (too large for a topic changed since start, invalid) must not stop the stage: a task
    /// becomes its run's `failed` result, and a result that is refused dead-letters the event.
    /// Only infrastructure errors are returned.
    async fn produce(&self, event: &OwnedMessage, outputs: Vec<Output>) -> Produced {
        let sends = outputs.iter().map(|(topic, key, payload)| async move {
            let headers = kafka::content_headers(Format::Json);
            match kafka::send(&self.producer, topic, Some(key.as_bytes()), payload, headers).await {
                Ok(_) => {
                    Event::Produced { stage: Stage::Evaluate, topic, count: 1 }.emit();
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
            let (topic, key, payload) = self.failed_output(task_failed(task, reason.clone()));
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
