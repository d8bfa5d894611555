//! The dead-letter topic: where a record goes when it can never be processed (undecodable, too
//! large, invalid), so that one bad record neither stops its partition nor disappears.
//!
//! The original key, payload and headers are kept as they were; weir adds headers saying why and
//! where from, so the record can be inspected and, once the cause is fixed, redriven:
//!
//! | header | value |
//! |---|---|
//! | `weir.error.reason` | human-readable reason |
//! | `weir.error.stage` | stage that gave up (`evaluate`, `execute`, `sink`) |
//! | `weir.error.time` | RFC 3339 time of the decision |
//! | `weir.origin.topic` / `.partition` / `.offset` | where the record was read |
//! | `weir.error.attempts` / `weir.error.first-failure` | for action tasks: calls made, and when the first failed |

use rdkafka::{message::OwnedMessage, producer::FutureProducer, Message};

use crate::{
    kafka,
    telemetry::{Event, Stage},
};

pub const REASON: &str = "weir.error.reason";
pub const STAGE: &str = "weir.error.stage";
pub const TIME: &str = "weir.error.time";
pub const ORIGIN_TOPIC: &str = "weir.origin.topic";
pub const ORIGIN_PARTITION: &str = "weir.origin.partition";
pub const ORIGIN_OFFSET: &str = "weir.origin.offset";
pub const ATTEMPTS: &str = "weir.error.attempts";
pub const FIRST_FAILURE: &str = "weir.error.first-failure";

#[derive(Clone)]
pub struct DeadLetters {
    producer: FutureProducer,
    topic: String,
    stage: Stage,
}

impl DeadLetters {
    pub fn new(producer: FutureProducer, topic: String, stage: Stage) -> Self {
        DeadLetters { producer, topic, stage }
    }

    /// Sends `message` with `reason`; resolves once the dead letter is acknowledged, after which
    /// the original's offset may be committed.
    pub async fn send(&self, message: &OwnedMessage, reason: &str) -> Result<(), rdkafka::error::KafkaError> {
        self.send_with(message, reason, &[]).await
    }

    /// [`send`](Self::send) with more headers (e.g. [`ATTEMPTS`], [`FIRST_FAILURE`]).
    pub async fn send_with(
        &self,
        message: &OwnedMessage,
        reason: &str,
        extra: &[(&str, &str)],
    ) -> Result<(), rdkafka::error::KafkaError> {
        let (partition, offset, time) =
            (message.partition().to_string(), message.offset().to_string(), chrono::Utc::now().to_rfc3339());
        let added: Vec<(&str, &str)> = [
            (REASON, reason),
            (STAGE, self.stage.as_str()),
            (TIME, time.as_str()),
            (ORIGIN_TOPIC, message.topic()),
            (ORIGIN_PARTITION, partition.as_str()),
            (ORIGIN_OFFSET, offset.as_str()),
        ]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
        let headers = kafka::rewrite_headers(message, |_| false, &added);
        let payload = message.payload().unwrap_or_default();
        kafka::send(&self.producer, &self.topic, message.key(), payload, headers).await?;
        Event::DeadLettered {
            stage: self.stage,
            reason,
            topic: message.topic(),
            partition: message.partition(),
            offset: message.offset(),
        }
        .emit();
        Ok(())
    }
}
