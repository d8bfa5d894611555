//! Reading a stretch of a topic: the offsets a time range covers (Kafka's `offsets_for_times`),
//! and a reader that hands out the records between them in chunks, offset order per partition.
//!
//! The reader is assigned its partitions (it never joins its group, so it cannot be rebalanced
//! away from them) at the offsets it is told, and stops each partition at its end bound: a
//! replay reads exactly the records its selection named when it was created, however much the
//! topic grows while it runs.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use rdkafka::{
    consumer::{Consumer, StreamConsumer},
    message::OwnedMessage,
    Message, Offset, TopicPartitionList,
};

use crate::{config::Config, kafka};

/// Per partition, the offsets `[start, end)` of a stretch of a topic.
pub type Bounds = BTreeMap<i32, (i64, i64)>;

/// Parses a `--from`/`--to` value: an RFC 3339 time, or a duration back from now (`90s`, `30m`,
/// `2h`, `1d`). The error says which forms are accepted (clap prints it after the flag's name,
/// with the usage).
pub fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    parse_time_at(text, Utc::now())
}

fn parse_time_at(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    let forms = "expected an RFC 3339 time (2026-11-23T10:00:00Z) or a time ago such as 90s, 30m, 2h, 1d";
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: i64 = number.parse().map_err(|_| format!("{text:?} is not a time: {forms}"))?;
    let back = match unit {
        "s" => chrono::Duration::try_seconds(n),
        "m" => chrono::Duration::try_minutes(n),
        "h" => chrono::Duration::try_hours(n),
        "d" => chrono::Duration::try_days(n),
        _ => return Err(format!("{text:?}: the unit must be s, m, h or d ({forms})")),
    };
    back.and_then(|b| now.checked_sub_signed(b)).ok_or_else(|| format!("{text:?} is too far back"))
}

/// The offsets of `topic` that records timestamped in `[from, to)` occupy, per partition; `to`
/// absent means up to each partition's current end. Blocking.
pub fn bounds(config: &Config, topic: &str, from: DateTime<Utc>, to: Option<DateTime<Utc>>) -> anyhow::Result<Bounds> {
    let consumer: rdkafka::consumer::BaseConsumer = kafka::consumer_config(config, &config.names().group("replay"))
        .set("enable.auto.commit", "false")
        .create()
        .context("creating Kafka consumer")?;
    let count = kafka::partition_count(consumer.client(), topic)?;
    // The first offset at or after a time, per partition; `End` when no record is that late.
    let at = |time: DateTime<Utc>| -> anyhow::Result<BTreeMap<i32, Option<i64>>> {
        let mut tpl = TopicPartitionList::new();
        for p in 0..count {
            tpl.add_partition_offset(topic, p, Offset::Offset(time.timestamp_millis()))?;
        }
        let found = consumer
            .offsets_for_times(tpl, kafka::METADATA_TIMEOUT)
            .with_context(|| format!("looking up the offsets of {topic} at {time}"))?;
        Ok(found
            .elements()
            .iter()
            .map(|e| (e.partition(), if let Offset::Offset(o) = e.offset() { Some(o) } else { None }))
            .collect())
    };
    let starts = at(from)?;
    let ends = match to {
        Some(to) => at(to)?,
        None => BTreeMap::new(),
    };
    let mut bounds = Bounds::new();
    for p in 0..count {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, kafka::METADATA_TIMEOUT)
            .with_context(|| format!("reading the offsets of {topic} partition {p}"))?;
        let start = starts.get(&p).copied().flatten().unwrap_or(high).max(low);
        let end = ends.get(&p).copied().flatten().unwrap_or(high).min(high);
        bounds.insert(p, (start, end.max(start)));
    }
    Ok(bounds)
}

/// How long a partition may deliver nothing while its end bound is not reached.
const STALL: Duration = Duration::from_secs(60);

/// Reads the records of a topic between per-partition positions and end bounds.
pub struct Reader {
    consumer: StreamConsumer,
    topic: String,
    ends: BTreeMap<i32, i64>,
    /// Per partition, the next offset to hand out.
    positions: BTreeMap<i32, i64>,
    open: BTreeSet<i32>,
}

impl Reader {
    /// A reader of `topic` in `group` (which it never joins or commits to), at `positions`, up
    /// to the ends of `bounds`.
    pub fn open(
        config: &Config,
        group: &str,
        topic: &str,
        bounds: &Bounds,
        positions: &BTreeMap<i32, i64>,
    ) -> anyhow::Result<Reader> {
        let consumer: StreamConsumer = kafka::consumer_config(config, group)
            .set("enable.auto.commit", "false")
            .set("statistics.interval.ms", "0")
            // A position outside the retained range is an error, not a silent jump.
            .set("auto.offset.reset", "error")
            .create()
            .context("creating Kafka consumer")?;
        let mut tpl = TopicPartitionList::new();
        let (mut ends, mut at, mut open) = (BTreeMap::new(), BTreeMap::new(), BTreeSet::new());
        for (&p, &(start, end)) in bounds {
            let position = positions.get(&p).copied().unwrap_or(start).max(start);
            ends.insert(p, end);
            at.insert(p, position);
            if position < end {
                tpl.add_partition_offset(topic, p, Offset::Offset(position))?;
                open.insert(p);
            }
        }
        if !open.is_empty() {
            consumer.assign(&tpl).with_context(|| format!("assigning {topic}"))?;
        }
        Ok(Reader { consumer, topic: topic.to_string(), ends, positions: at, open })
    }

    /// Whether every partition reached its end.
    pub fn finished(&self) -> bool {
        self.open.is_empty()
    }

    /// Per partition, the offset after the last record handed out (or the start).
    pub fn positions(&self) -> &BTreeMap<i32, i64> {
        &self.positions
    }

    /// Up to `max` records, offset order per partition; empty only once [`Self::finished`].
    pub async fn next_chunk(&mut self, max: usize) -> anyhow::Result<Vec<OwnedMessage>> {
        let mut chunk = Vec::new();
        let mut quiet_since = std::time::Instant::now();
        while !self.open.is_empty() && chunk.len() < max {
            match tokio::time::timeout(Duration::from_millis(200), self.consumer.recv()).await {
                Ok(Ok(m)) => {
                    quiet_since = std::time::Instant::now();
                    let (p, o) = (m.partition(), m.offset());
                    if !self.open.contains(&p) || o < self.positions[&p] {
                        continue;
                    }
                    if o < self.ends[&p] {
                        chunk.push(m.detach());
                        self.positions.insert(p, o + 1);
                    }
                    if o + 1 >= self.ends[&p] {
                        self.close(p)?;
                    }
                }
                Ok(Err(e)) => return Err(e).with_context(|| format!("reading {}", self.topic)),
                Err(_) if !chunk.is_empty() => break,
                Err(_) => {
                    // Nothing came: offsets up to the end may hold no record (transaction
                    // markers, compaction). The consumer's position says how far it got.
                    self.close_reached()?;
                    if !self.open.is_empty() && quiet_since.elapsed() > STALL {
                        let at: Vec<String> =
                            self.open.iter().map(|p| format!("{p}@{}<{}", self.positions[p], self.ends[p])).collect();
                        anyhow::bail!(
                            "reading {}: no record arrived for {}s with partitions short of their end ({}); \
                             is the broker up? (retryable: resume the replay)",
                            self.topic,
                            STALL.as_secs(),
                            at.join(", ")
                        );
                    }
                }
            }
        }
        Ok(chunk)
    }

    fn close(&mut self, p: i32) -> anyhow::Result<()> {
        self.open.remove(&p);
        self.positions.insert(p, self.ends[&p]);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.topic, p);
        // Stop fetching what lies past the end (a live topic keeps growing).
        self.consumer.pause(&tpl).with_context(|| format!("pausing {} partition {p}", self.topic))
    }

    fn close_reached(&mut self) -> anyhow::Result<()> {
        let position = self.consumer.position().with_context(|| format!("reading the position in {}", self.topic))?;
        let reached: Vec<i32> = position
            .elements()
            .iter()
            .filter(|e| self.open.contains(&e.partition()))
            .filter(|e| matches!(e.offset(), Offset::Offset(o) if o >= self.ends[&e.partition()]))
            .map(|e| e.partition())
            .collect();
        for p in reached {
            self.close(p)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_or_a_time_ago_and_errors_say_which_forms() {
        let now = DateTime::parse_from_rfc3339("2026-11-23T12:00:00Z").unwrap().with_timezone(&Utc);
        let at = |text| parse_time_at(text, now);
        assert_eq!(at("2026-11-23T10:00:00+01:00").unwrap().to_rfc3339(), "2026-11-23T09:00:00+00:00");
        assert_eq!(at("2h").unwrap().to_rfc3339(), "2026-11-23T10:00:00+00:00");
        assert_eq!(at("90s").unwrap().to_rfc3339(), "2026-11-23T11:58:30+00:00");
        assert_eq!(at("1d").unwrap().to_rfc3339(), "2026-11-22T12:00:00+00:00");
        let unit = at("2w").unwrap_err();
        assert!(unit.starts_with("\"2w\"") && unit.contains("unit"), "{unit}");
        let word = at("yesterday").unwrap_err();
        assert!(word.starts_with("\"yesterday\" is not a time") && word.contains("RFC 3339"), "{word}");
        assert!(at("99999999999999d").unwrap_err().contains("too far back"));
    }
}
