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
    envelope::{self, Event as DomainEvent, Format},
    kafka,
    kafka::dead_letter::DeadLetters,
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
        dead_letters: DeadLetters::new(producer.clone(), config.names().dlq(), Stage::Evaluate),
        producer,
        action_topics: config.services.keys().map(|s| (s.clone(), config.names().actions(s).into())).collect(),
        results_topic: config.names().results().into(),
        max_event_bytes: config.evaluator.max_event_bytes,
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
        let decoded = envelope::decode_unparsed_event(payload, content_type, self.max_event_bytes).and_then(|event| {
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
                self.produce(outputs).await
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
                let tasks = plan.tasks.into_iter().map(|task| {
                    let payload = serde_json::to_vec(&task).expect("a task always serializes");
                    (self.action_topics[&task.service].clone(), task.tenant, payload)
                });
                let decided = plan.decided.into_iter().map(|result| {
                    if let Some(detail) = result.error.as_deref() {
                        Event::Failed { stage: Stage::Evaluate, reason: "evaluate", retryable: false, detail }.emit();
                    }
                    let payload = serde_json::to_vec(&result).expect("a result always serializes");
                    (self.results_topic.clone(), result.tenant, payload)
                });
                (wf, tasks.chain(decided).collect())
            })
            .collect()
    }

    async fn produce(&self, outputs: Vec<Output>) -> Result<(), rdkafka::error::KafkaError> {
        let sends = outputs.iter().map(|(topic, key, payload)| async move {
            kafka::send(&self.producer, topic, Some(key.as_bytes()), payload, kafka::content_headers(Format::Json))
                .await
                .map(|_| Event::Produced { stage: Stage::Evaluate, topic, count: 1 }.emit())
        });
        futures::future::try_join_all(sends).await.map(|_| ())
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
