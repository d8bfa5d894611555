//! Stage 3: call an external service for each action task, and report the outcome.
//!
//! One executor per service reads that service's action topic. Tasks go into [`Lanes`] keyed by
//! tenant: a tenant's tasks are called one at a time in event order, different tenants
//! concurrently (up to `executor.concurrency` calls). A task is done once its result is
//! acknowledged on the results topic; only then may its offset be committed, so a crash between
//! call and result repeats the call, with the same `Idempotency-Key` (the task id) so the service
//! can drop the duplicate.
//!
//! At most `executor.max_buffered` tasks are taken and not finished; past that the stage stops
//! taking batches and the source pauses its partitions.

use std::{sync::Arc, time::Instant};

use anyhow::Context as _;
use futures::{future::BoxFuture, stream::FuturesUnordered, FutureExt, StreamExt};
use rdkafka::{message::OwnedMessage, producer::FutureProducer, Message};

use crate::{
    config::Config,
    connectors::{self, CallOutcome, Connector},
    dead_letter::DeadLetters,
    envelope::{self, ActionResult, ActionTask, Format, Status},
    kafka,
    lanes::Lanes,
    shutdown::Shutdown,
    source::{Source, Ticket},
    telemetry::{Event, Stage},
};

/// Header with the task id on every call, for the service to deduplicate retries.
pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";
pub const TENANT_HEADER: &str = "X-Weir-Tenant";

/// A finished task: its lane (none for a dead-lettered record) and whether its result is durable.
type Outcome = (Option<String>, Ticket, Result<(), rdkafka::error::KafkaError>);

struct Executor {
    service: String,
    connector: Arc<dyn Connector>,
    producer: FutureProducer,
    results_topic: String,
    dead_letters: DeadLetters,
}

pub async fn run(config: Arc<Config>, service: String, mut shutdown: Shutdown) -> anyhow::Result<()> {
    let settings = config.services.get(&service).with_context(|| format!("unknown service {service}"))?;
    let connector = connectors::build(&service, settings, &config.network)?;
    let topic = config.topic(&format!("actions.{service}"));
    let mut source = Source::subscribe(&config, Stage::Execute, &topic, &config.group(&format!("execute-{service}")))?;
    let producer = kafka::producer(&config)?;
    let executor = Arc::new(Executor {
        connector,
        dead_letters: DeadLetters::new(producer.clone(), config.topic("dlq"), Stage::Execute),
        producer,
        results_topic: config.topic("results"),
        service,
    });
    let (concurrency, max_buffered) = (config.executor.concurrency, config.executor.max_buffered);
    let mut lanes: Lanes<(ActionTask, Ticket)> = Lanes::default();
    let mut running: FuturesUnordered<BoxFuture<'static, Outcome>> = FuturesUnordered::new();
    let result = loop {
        while running.len() < concurrency {
            let Some((_, (task, ticket))) = lanes.start_next() else { break };
            running.push(executor.clone().execute(task, ticket));
        }
        tokio::select! {
            _ = shutdown.recv() => break Ok(()),
            Some((lane, ticket, r)) = running.next() => {
                if let Err(e) = r { break Err(e) }
                source.done(&ticket);
                if let Some(lane) = lane { lanes.finish(&lane) }
            }
            batch = source.recv(), if lanes.len() < max_buffered => match batch {
                Some(batch) => for d in batch {
                    match executor.decode(&d.message) {
                        Ok(task) => lanes.push(&task.tenant.clone(), (task, d.ticket)),
                        Err(reason) => running.push(executor.clone().dead_letter(d.message, d.ticket, reason)),
                    }
                },
                None => break Ok(()),
            },
        }
    };
    // Calls already made finish and report; queued ones are left for whoever owns the partition
    // next (their offsets were not stored).
    while let Some((_, ticket, r)) = running.next().await {
        if r.is_ok() {
            source.done(&ticket);
        }
    }
    source.close();
    result.map_err(|e| anyhow::anyhow!("executor {}: producing a result failed: {e}", executor.service))
}

impl Executor {
    fn decode(&self, message: &OwnedMessage) -> Result<ActionTask, String> {
        let content_type = kafka::header(message.headers(), envelope::CONTENT_TYPE);
        let task: ActionTask = envelope::decode(message.payload().unwrap_or_default(), content_type)
            .map_err(|e| format!("undecodable task: {e}"))?;
        if task.service != self.service {
            return Err(format!("task for service {:?} on the topic of {:?}", task.service, self.service));
        }
        Ok(task)
    }

    fn dead_letter(
        self: Arc<Self>,
        message: OwnedMessage,
        ticket: Ticket,
        reason: String,
    ) -> BoxFuture<'static, Outcome> {
        Event::Failed { stage: Stage::Execute, reason: "decode", retryable: false, detail: &reason }.emit();
        async move { (None, ticket, self.dead_letters.send(&message, &reason).await) }.boxed()
    }

    fn execute(self: Arc<Self>, task: ActionTask, ticket: Ticket) -> BoxFuture<'static, Outcome> {
        async move {
            let result = self.call(&task).await;
            Event::ActionDone { service: &self.service, succeeded: result.status == Status::Succeeded }.emit();
            let payload = serde_json::to_vec(&result).expect("a result always serializes");
            let sent = kafka::send(
                &self.producer,
                &self.results_topic,
                Some(task.tenant.as_bytes()),
                &payload,
                kafka::content_headers(Format::Json),
            )
            .await
            .map(|_| Event::Produced { stage: Stage::Execute, topic: &self.results_topic, count: 1 }.emit());
            (Some(task.tenant), ticket, sent)
        }
        .boxed()
    }

    /// Calls the service through its connector; any outcome becomes a result.
    async fn call(&self, task: &ActionTask) -> ActionResult {
        let started = Instant::now();
        let (status, http_status, error, output) = match self.connector.call(task).await {
            CallOutcome::Succeeded { http_status, output, .. } => (Status::Succeeded, http_status, None, output),
            CallOutcome::Retryable { reason, http_status, .. } | CallOutcome::Permanent { reason, http_status } => {
                (Status::Failed, http_status, Some(reason), None)
            }
        };
        let http_status = http_status.map(i32::from);
        ActionResult {
            task_id: task.task_id.clone(),
            run_id: task.run_id.clone(),
            event_id: task.event_id.clone(),
            tenant: task.tenant.clone(),
            workflow_id: task.workflow_id.clone(),
            workflow_version: task.workflow_version,
            step_id: task.step_id.clone(),
            service: task.service.clone(),
            status,
            attempts: task.attempt,
            latency_ms: started.elapsed().as_secs_f64() * 1e3,
            http_status,
            error,
            finished_at: chrono::Utc::now().to_rfc3339(),
            output,
            event: task.event.clone(),
        }
    }
}
