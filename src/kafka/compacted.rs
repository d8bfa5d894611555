//! A compacted topic read as a table: every record from the beginning up to the end the topic
//! had when asked, then (optionally) followed as new records arrive.
//!
//! Kafka plumbing only: records are handed over as key and value bytes (`None` for a tombstone);
//! what they mean is the caller's business. The workflow definitions are read this way, by
//! `weir workflows apply` (to compare with the local files) and by every worker (to keep its
//! definition store current without a restart).
//!
//! No consumer group is joined and nothing is committed: every reader always reads everything,
//! which is what a table wants (compaction keeps the topic small).

use std::{collections::HashMap, thread::JoinHandle, time::Duration};

use anyhow::{bail, Context as _};
use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    Message, Offset, TopicPartitionList,
};
use tokio_util::sync::CancellationToken;

use crate::{config::Config, kafka};

/// One record of the table: its key, its value (`None`: a tombstone), where it was read.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub partition: i32,
    pub offset: i64,
}

/// A compacted topic, assigned from the beginning of every partition.
pub struct Table {
    consumer: BaseConsumer,
    topic: String,
}

impl Table {
    /// Opens `topic`; `client_id` names the reader in the broker's logs and metrics.
    pub fn open(config: &Config, topic: &str, client_id: &str) -> anyhow::Result<Table> {
        let consumer: BaseConsumer = kafka::consumer_config(config, client_id)
            .set("enable.auto.commit", "false")
            // Lag statistics are for the stages' consumers (their context turns them into
            // metrics); here they would only be logged.
            .set("statistics.interval.ms", "0")
            .create()
            .with_context(|| format!("creating a reader of {topic}"))?;
        let partitions = kafka::partition_count(consumer.client(), topic)?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
        consumer.assign(&tpl).with_context(|| format!("assigning {topic}"))?;
        Ok(Table { consumer, topic: topic.to_string() })
    }

    /// Hands every record up to the current end of each partition to `apply`, in offset order
    /// per partition. Blocking; fails if the end is not reached within a minute.
    pub fn read_to_end(&self, mut apply: impl FnMut(Record<'_>)) -> anyhow::Result<()> {
        let topic = self.topic.as_str();
        let mut remaining: HashMap<i32, i64> = HashMap::new();
        let assignment = self.consumer.assignment().with_context(|| format!("reading the assignment of {topic}"))?;
        for e in assignment.elements() {
            // A just-created topic may not have a serving leader yet: that answer is transient.
            let deadline = std::time::Instant::now() + kafka::METADATA_TIMEOUT;
            let (low, high) = loop {
                match self.consumer.fetch_watermarks(topic, e.partition(), kafka::METADATA_TIMEOUT) {
                    Ok(w) => break w,
                    Err(err) if std::time::Instant::now() < deadline => {
                        tracing::debug!(topic, "watermarks not available yet: {err}");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(err) => return Err(err).with_context(|| format!("reading the end offsets of {topic}")),
                }
            };
            if high > low {
                remaining.insert(e.partition(), high);
            }
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !remaining.is_empty() {
            if std::time::Instant::now() > deadline {
                bail!("reading {topic}: did not reach the end within 60 s");
            }
            let Some(msg) = self.consumer.poll(Duration::from_millis(200)) else { continue };
            let msg = msg.with_context(|| format!("reading {topic}"))?;
            apply(Record { key: msg.key(), value: msg.payload(), partition: msg.partition(), offset: msg.offset() });
            if remaining.get(&msg.partition()).is_some_and(|high| msg.offset() + 1 >= *high) {
                remaining.remove(&msg.partition());
            }
        }
        Ok(())
    }

    /// Hands every later record to `apply`, from a thread of its own, until `stop` is cancelled.
    pub fn follow(
        self,
        stop: CancellationToken,
        mut apply: impl FnMut(Record<'_>) + Send + 'static,
    ) -> anyhow::Result<JoinHandle<()>> {
        let name = format!("weir-follow-{}", self.topic);
        std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                while !stop.is_cancelled() {
                    match self.consumer.poll(Duration::from_millis(100)) {
                        Some(Ok(msg)) => apply(Record {
                            key: msg.key(),
                            value: msg.payload(),
                            partition: msg.partition(),
                            offset: msg.offset(),
                        }),
                        Some(Err(e)) => tracing::warn!(topic = self.topic, "reading: {e}"),
                        None => {}
                    }
                }
            })
            .context("spawning a topic follower")
    }
}
