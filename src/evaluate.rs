//! Stage 2: match events against workflow definitions and emit action tasks.
//!
//! The loop reads in one screen: take a batch from the [`Source`], evaluate each event (pure CPU
//! work, no await), start producing its tasks, and mark the event done once *all* its tasks are
//! acknowledged by the broker. A malformed or oversized event is dead-lettered instead, and its
//! offset is done once the dead letter is acknowledged. At most `max_inflight` events are
//! between "taken" and "done"; past that the stage stops taking batches and the source pauses.

use std::{collections::HashMap, sync::Arc};

use futures::{future::BoxFuture, stream::FuturesUnordered, FutureExt, StreamExt};
use rdkafka::{message::OwnedMessage, producer::FutureProducer, Message};

use crate::{
    config::Config,
    dead_letter::DeadLetters,
    envelope::{self, Format},
    kafka,
    shutdown::Shutdown,
    source::{Source, Ticket},
    telemetry::{Event, Stage},
    workflow::WorkflowSet,
};

type Outcome = (Ticket, Result<(), rdkafka::error::KafkaError>);

struct Evaluator {
    workflows: Arc<WorkflowSet>,
    producer: FutureProducer,
    dead_letters: DeadLetters,
    /// service name → physical action topic
    action_topics: Arc<HashMap<String, String>>,
    max_event_bytes: usize,
}

/// Runs the evaluator until `shutdown` fires or an unrecoverable error occurs.
pub async fn run(config: Arc<Config>, workflows: Arc<WorkflowSet>, mut shutdown: Shutdown) -> anyhow::Result<()> {
    let mut source = Source::subscribe(&config, Stage::Evaluate, &config.topic("events"), &config.group("evaluate"))?;
    let producer = kafka::producer(&config)?;
    let evaluator = Evaluator {
        workflows,
        dead_letters: DeadLetters::new(producer.clone(), config.topic("dlq"), Stage::Evaluate),
        producer,
        action_topics: Arc::new(
            config.services.keys().map(|s| (s.clone(), config.topic(&format!("actions.{s}")))).collect(),
        ),
        max_event_bytes: config.evaluator.max_event_bytes,
    };
    let max_inflight = config.evaluator.max_inflight;
    let mut inflight: FuturesUnordered<BoxFuture<'static, Outcome>> = FuturesUnordered::new();
    let result = loop {
        tokio::select! {
            _ = shutdown.recv() => break Ok(()),
            Some((ticket, r)) = inflight.next() => {
                if let Err(e) = r { break Err(e) }
                source.done(&ticket);
            }
            batch = source.recv(), if inflight.len() < max_inflight => match batch {
                Some(batch) => inflight.extend(batch.into_iter().map(|d| evaluator.evaluate(d.message, d.ticket))),
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
    fn evaluate(&self, message: OwnedMessage, ticket: Ticket) -> BoxFuture<'static, Outcome> {
        let payload = message.payload().unwrap_or_default();
        let content_type = kafka::header(message.headers(), envelope::CONTENT_TYPE);
        let event = match envelope::decode_event(payload, content_type, self.max_event_bytes) {
            Ok(event) => event,
            Err(e) => {
                Event::Failed { stage: Stage::Evaluate, reason: "decode", retryable: false, detail: &e.to_string() }
                    .emit();
                let dead_letters = self.dead_letters.clone();
                return async move { (ticket, dead_letters.send(&message, &e.to_string()).await) }.boxed();
            }
        };
        let now = chrono::Utc::now().to_rfc3339();
        let tasks: Vec<_> = self.workflows.matching(&event).flat_map(|wf| wf.tasks_for(&event, &now)).collect();
        if tasks.is_empty() {
            return futures::future::ready((ticket, Ok(()))).boxed();
        }
        let (producer, topics) = (self.producer.clone(), self.action_topics.clone());
        async move {
            let sends = tasks.iter().map(|task| {
                let topic = &topics[&task.service];
                let payload = serde_json::to_vec(task).expect("a task always serializes");
                let producer = &producer;
                async move {
                    kafka::send(
                        producer,
                        topic,
                        Some(task.tenant.as_bytes()),
                        &payload,
                        kafka::content_headers(Format::Json),
                    )
                    .await
                    .map(|_| Event::Produced { stage: Stage::Evaluate, topic, count: 1 }.emit())
                }
            });
            let result = futures::future::try_join_all(sends).await.map(|_| ());
            (ticket, result)
        }
        .boxed()
    }
}
