//! Putting domain events on the events topic: the Rust API that `weir produce`, the demo, the
//! benchmark and the tests all use.
//!
//! Events are keyed by tenant, so one tenant's events stay in one partition, in order, and land
//! in the partition a Java producer would choose (librdkafka's `murmur2_random` partitioner).
//! The producer is idempotent with `acks=all` (see [`crate::kafka`]).

use std::{
    io::BufRead,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use futures::{stream::FuturesUnordered, StreamExt};
use rdkafka::{
    message::{Header, OwnedHeaders},
    producer::FutureProducer,
};

use crate::{
    config::Config,
    envelope::{self, Event, Format},
    kafka,
    telemetry::{self, Stage},
};

/// Header carrying the produce time in milliseconds since the epoch, for end-to-end latency.
pub const PRODUCED_AT: &str = "weir.produced-at";

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
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis().to_string();
        let headers = OwnedHeaders::new()
            .insert(Header { key: envelope::CONTENT_TYPE, value: Some(content_type) })
            .insert(Header { key: PRODUCED_AT, value: Some(now.as_str()) });
        let (partition, offset) = kafka::send(&self.inner, &self.topic, Some(key), payload, headers)
            .await
            .with_context(|| format!("producing to {}", self.topic))?;
        telemetry::Event::Produced { stage: Stage::Produce, topic: &self.topic, count: 1 }.emit();
        Ok(Written { partition, offset })
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

/// Reads newline-delimited JSON events; an unparsable line is an error naming its number.
pub fn read_ndjson(reader: impl BufRead) -> anyhow::Result<Vec<Event>> {
    let mut events = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("reading line {}", n + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let event: Event = serde_json::from_str(&line).with_context(|| format!("line {}: not a valid event", n + 1))?;
        event.validate().with_context(|| format!("line {}", n + 1))?;
        events.push(event);
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
        let err = read_ndjson(input.as_bytes()).unwrap_err();
        assert!(format!("{err:#}").contains("line 3"), "{err:#}");
        assert_eq!(read_ndjson(ok.as_bytes()).unwrap().len(), 1);
    }
}
