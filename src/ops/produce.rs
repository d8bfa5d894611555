//! Putting domain events on the events topic: the Rust API that `weir produce`, the demo, the
//! benchmark and the tests all use.
//!
//! Events are keyed by tenant, so one tenant's events stay in one partition, in order, and land
//! in the partition a Java producer would choose (librdkafka's `murmur2_random` partitioner).
//! The producer is idempotent with `acks=all` (see [`crate::kafka`]).

use std::io::BufRead;

use anyhow::Context as _;
use futures::{stream::FuturesUnordered, StreamExt};
use rdkafka::producer::FutureProducer;

use crate::{
    config::Config,
    envelope::{self, Event, Format},
    kafka::{self, limits, topics},
    telemetry::{self, Stage},
};

/// Where an acknowledged event was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub partition: i32,
    pub offset: i64,
}

#[derive(Clone)]
pub struct Producer {
    inner: FutureProducer,
    topic: String,
}

impl Producer {
    /// A producer for the events topic of `config`.
    pub fn new(config: &Config) -> anyhow::Result<Producer> {
        Self::for_topic(config, &config.names().events())
    }

    /// A producer for any (physical) topic.
    pub fn for_topic(config: &Config, topic: &str) -> anyhow::Result<Producer> {
        Ok(Producer { inner: kafka::producer(config)?, topic: topic.to_string() })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Sends one event in `format` and waits for the acknowledgement.
    pub async fn send(&self, event: &Event, format: Format) -> anyhow::Result<Written> {
        let payload = envelope::encode(event, format).with_context(|| format!("encoding event {}", event.id))?;
        self.send_raw(event.tenant.as_bytes(), &payload, format.content_type()).await
    }

    /// Sends bytes as they are, with a content type: for tools and tests that need to put
    /// arbitrary (even malformed) payloads on the topic.
    pub async fn send_raw(&self, key: &[u8], payload: &[u8], content_type: &str) -> anyhow::Result<Written> {
        self.send_payload(key, payload, content_type).await.with_context(|| format!("producing to {}", self.topic))
    }

    async fn send_payload(
        &self,
        key: &[u8],
        payload: &[u8],
        content_type: &str,
    ) -> Result<Written, rdkafka::error::KafkaError> {
        let (partition, offset) =
            kafka::send(&self.inner, &self.topic, Some(key), payload, kafka::event_headers(content_type)).await?;
        telemetry::Event::Produced { stage: Stage::Produce, topic: &self.topic, count: 1 }.emit();
        Ok(Written { partition, offset })
    }

    /// `weir produce`: sends the events of an input file, each named by its line in errors. Every
    /// record is measured first against the largest the producer and the topic accept, and a
    /// line over it is refused before anything is sent, naming the line, the size and the limit.
    /// Returns how many were acknowledged.
    pub async fn send_lines(&self, config: &Config, lines: Vec<(usize, Event)>, format: Format) -> anyhow::Result<u64> {
        let (limit, what) = self.limit(config).await?;
        let mut records = Vec::with_capacity(lines.len());
        for (line, event) in lines {
            let payload = envelope::encode(&event, format)
                .with_context(|| format!("line {line}: encoding event {:?}", event.id))?;
            let size = limits::record_size(
                Some(event.tenant.as_bytes()),
                &payload,
                Some(&kafka::event_headers(format.content_type())),
            );
            if size > limit {
                anyhow::bail!(
                    "line {line}: event {:?} is a {size}-byte record, over the limit of {limit} bytes ({what}); nothing was produced",
                    event.id
                );
            }
            records.push((line, event.id, event.tenant, payload, size));
        }
        let mut inflight = FuturesUnordered::new();
        let mut sent = 0u64;
        let failed = |line: usize, id: String, size: usize, e: rdkafka::error::KafkaError, sent: u64| {
            anyhow::anyhow!("line {line}: event {id:?} ({size}-byte record) was not produced to {}: {e} ({sent} events before it were)", self.topic)
        };
        for (line, id, key, payload, size) in records {
            if inflight.len() >= 10_000 {
                if let Some(Err((line, id, size, e))) = inflight.next().await {
                    return Err(failed(line, id, size, e, sent));
                }
                sent += 1;
            }
            inflight.push(async move {
                self.send_payload(key.as_bytes(), &payload, format.content_type())
                    .await
                    .map_err(|e| (line, id, size, e))
            });
        }
        while let Some(r) = inflight.next().await {
            if let Err((line, id, size, e)) = r {
                return Err(failed(line, id, size, e, sent));
            }
            sent += 1;
        }
        Ok(sent)
    }

    /// The largest record this producer can put on its topic, and what sets it: the producer's
    /// `message.max.bytes`, or the topic's `max.message.bytes` when that is smaller.
    async fn limit(&self, config: &Config) -> anyhow::Result<(usize, String)> {
        let producer = topics::producer_max_bytes(config)?;
        let admin = kafka::admin(config)?;
        let opts = rdkafka::admin::AdminOptions::new().request_timeout(Some(kafka::METADATA_TIMEOUT));
        let described = admin
            .describe_configs(&[rdkafka::admin::ResourceSpecifier::Topic(&self.topic)], &opts)
            .await
            .ok()
            .and_then(|r| r.into_iter().next()?.ok())
            .and_then(|r| r.get("max.message.bytes")?.value.as_deref()?.parse::<usize>().ok());
        Ok(match described {
            Some(topic) if topic < producer => (topic, format!("max.message.bytes of topic {}", self.topic)),
            _ => (producer, "the producer's message.max.bytes".into()),
        })
    }

    /// Sends many events, each in its own format, with up to `window` in flight; returns how
    /// many were acknowledged. Order per partition is kept (the producer is idempotent).
    pub async fn send_all<I>(&self, events: I, window: usize) -> anyhow::Result<u64>
    where
        I: IntoIterator<Item = (Event, Format)>,
    {
        let mut inflight = FuturesUnordered::new();
        let mut sent = 0u64;
        for (event, format) in events {
            if inflight.len() >= window {
                inflight.next().await.expect("window is not empty")?;
                sent += 1;
            }
            inflight.push(async move { self.send(&event, format).await });
        }
        while let Some(r) = inflight.next().await {
            r?;
            sent += 1;
        }
        Ok(sent)
    }
}

/// Reads newline-delimited JSON events, each with its line number (from 1); an unparsable line
/// is an error naming its number.
pub fn read_ndjson_lines(reader: impl BufRead) -> anyhow::Result<Vec<(usize, Event)>> {
    let mut events = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("reading line {}", n + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let event: Event = serde_json::from_str(&line).with_context(|| format!("line {}: not a valid event", n + 1))?;
        event.validate().with_context(|| format!("line {}", n + 1))?;
        events.push((n + 1, event));
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ndjson_errors_name_the_line() {
        let ok = r#"{"id":"1","source":"/s","type":"member.created","tenant":"t","data":{}}"#;
        let input = format!("{ok}\n\n{{broken\n");
        let err = read_ndjson_lines(input.as_bytes()).unwrap_err();
        assert!(format!("{err:#}").contains("line 3"), "{err:#}");
        assert_eq!(read_ndjson_lines(ok.as_bytes()).unwrap().len(), 1);
    }
}
