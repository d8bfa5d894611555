//! The producer acknowledgement behind every 202: a request's events are encoded with the
//! pipeline's own codec (`envelope::encode`, JSON), measured against the largest record weir
//! writes, handed to the producer in order (keyed by tenant, so they land in the tenant's
//! partition in that order) and answered 202 only once the broker acknowledged every one of
//! them (`acks=all`, idempotent producer: `kafka::producer_config`).
//!
//! The producer is the pipeline's, with two settings of the stage's: `message.timeout.ms` is
//! `ingest.ack_timeout` (a sender should hear 503 in seconds, not wait for a minute) and
//! `queue.buffering.max.messages` is `ingest.max_queued` (a full queue is a 503 at once, not a
//! request held). A request answered 503 may still have had some of its events written (the
//! broker took them but the acknowledgement was lost, or the queue filled after them): the
//! sender's retry carries the same ids, so the pipeline runs them once.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::future::join_all;
use rdkafka::{error::KafkaError, producer::FutureProducer, types::RDKafkaErrorCode};

use super::refusal::Refusal;
use crate::{
    config::Config,
    envelope::{self, Event, Format},
    kafka::{self, limits},
    telemetry::{self, Stage},
};

pub(super) struct Acknowledger {
    producer: FutureProducer,
    topic: String,
    max_record_bytes: usize,
    retry_after: Duration,
}

impl Acknowledger {
    pub(super) fn new(config: &Config) -> anyhow::Result<Acknowledger> {
        let producer = kafka::producer_config(config)
            .set("message.timeout.ms", config.ingest.ack_timeout.as_millis().to_string())
            .set("queue.buffering.max.messages", config.ingest.max_queued.to_string())
            .create()
            .context("creating the ingest stage's Kafka producer")?;
        Ok(Acknowledger {
            producer,
            topic: config.names().events(),
            max_record_bytes: config.limits.max_record_bytes,
            retry_after: config.ingest.retry_after,
        })
    }

    /// Produces `events` and waits for all their acknowledgements; returns how long that took.
    pub(super) async fn produce(&self, events: &[Event]) -> Result<Duration, Refusal> {
        let headers = kafka::event_headers(Format::Json.content_type());
        let mut records = Vec::with_capacity(events.len());
        for (i, event) in events.iter().enumerate() {
            let payload = envelope::encode(event, Format::Json)
                .map_err(|e| Refusal::invalid(format!("event {i} cannot be encoded: {e}")))?;
            let size = limits::record_size(Some(event.tenant.as_bytes()), &payload, Some(&headers));
            if size > self.max_record_bytes {
                return Err(Refusal::too_large(format!(
                    "event {i} is a {size}-byte record, over limits.max_record_bytes ({}); nothing was produced",
                    self.max_record_bytes
                )));
            }
            records.push((event.tenant.as_bytes(), payload));
        }
        let started = Instant::now();
        let mut waits = Vec::with_capacity(records.len());
        for (key, payload) in &records {
            match kafka::enqueue_keyed(&self.producer, &self.topic, key, payload, headers.clone()) {
                Ok(wait) => waits.push(wait),
                Err(e) => return Err(self.refusal(&e)),
            }
        }
        for outcome in join_all(waits).await {
            outcome.map_err(|e| self.refusal(&e))?;
        }
        telemetry::Event::Produced { stage: Stage::Ingest, topic: &self.topic, count: records.len() }.emit();
        Ok(started.elapsed())
    }

    fn refusal(&self, e: &KafkaError) -> Refusal {
        if limits::is_record_error(e) {
            return Refusal::too_large(format!("the broker refused the record: {e}"));
        }
        let reason = match e {
            KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => {
                "the producer's queue is full (ingest.max_queued); try again later".to_string()
            }
            e => format!("the broker did not acknowledge the events: {e}; try again later"),
        };
        Refusal::unavailable(reason, self.retry_after)
    }
}
