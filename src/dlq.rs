//! `weir dlq list|show|redrive`: reading the dead-letter topic and sending records back.
//!
//! The dead-letter topic is read from the beginning to its current end with a throw-away
//! consumer (no group, nothing committed), so listing never moves anything. Redrive re-produces
//! each selected record, as it was before it failed, to the topic it was read from
//! (`weir.origin.topic`): the key and payload unchanged except an action task's `attempt`, which
//! starts again at 1, and the headers without weir's error, origin and retry headers. The dead
//! letters stay where they are (the topic is a log); narrow a redrive with `--since` to avoid
//! sending the same ones twice. Sending an action task twice is harmless anyway: its
//! `Idempotency-Key` is the task id.

use std::time::Duration;

use anyhow::Context as _;
use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    message::{Headers, OwnedMessage},
    Message, Offset, TopicPartitionList,
};

use crate::{config::Config, dead_letter, envelope, kafka, telemetry::Event};

/// Which dead letters a command applies to; every field set must match.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Dead letters read from `actions.<service>`.
    pub service: Option<String>,
    /// Dead letters keyed by this tenant.
    pub tenant: Option<String>,
    /// Dead-lettered at or after this time.
    pub since: Option<chrono::DateTime<chrono::Utc>>,
}

/// One record of the dead-letter topic.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub partition: i32,
    pub offset: i64,
    pub message: OwnedMessage,
}

impl DeadLetter {
    /// `partition:offset` in the dead-letter topic, what `weir dlq show` takes.
    pub fn id(&self) -> String {
        format!("{}:{}", self.partition, self.offset)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        kafka::header_str(&self.message, name)
    }

    pub fn key(&self) -> String {
        self.message.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default()
    }

    fn time(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        let t = self.header(dead_letter::TIME)?;
        chrono::DateTime::parse_from_rfc3339(t).ok().map(|t| t.with_timezone(&chrono::Utc))
    }

    fn matches(&self, config: &Config, filter: &Filter) -> bool {
        let service_topic = filter.service.as_ref().map(|s| config.topic(&format!("actions.{s}")));
        service_topic.is_none_or(|t| self.header(dead_letter::ORIGIN_TOPIC) == Some(t.as_str()))
            && filter.tenant.as_ref().is_none_or(|t| self.key() == *t)
            && filter.since.is_none_or(|since| self.time().is_some_and(|t| t >= since))
    }
}

/// Parses `--since`: an RFC 3339 time, or a duration back from now (`30m`, `2h`, `1d`).
pub fn parse_since(text: &str) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&chrono::Utc));
    }
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let n: i64 =
        number.parse().with_context(|| format!("--since {text:?}: expected an RFC 3339 time or e.g. 30m, 2h, 1d"))?;
    let back = match unit {
        "s" => chrono::Duration::seconds(n),
        "m" => chrono::Duration::minutes(n),
        "h" => chrono::Duration::hours(n),
        "d" => chrono::Duration::days(n),
        _ => anyhow::bail!("--since {text:?}: unit must be s, m, h or d"),
    };
    Ok(chrono::Utc::now() - back)
}

/// The dead letters matching `filter`, oldest first per partition. Blocking.
pub fn list(config: &Config, filter: &Filter) -> anyhow::Result<Vec<DeadLetter>> {
    let topic = config.topic("dlq");
    let consumer: BaseConsumer = kafka::consumer_config(config, &format!("{}weir-dlq-reader", config.topic_prefix))
        .set("enable.auto.commit", "false")
        .create()
        .context("creating Kafka consumer")?;
    let partitions = kafka::partition_count(consumer.client(), &topic)?;
    let mut ends = Vec::new();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        let (low, high) = consumer
            .fetch_watermarks(&topic, p, kafka::METADATA_TIMEOUT)
            .with_context(|| format!("reading the end of {topic} partition {p}"))?;
        if high > low {
            tpl.add_partition_offset(&topic, p, Offset::Offset(low)).context("assigning")?;
            ends.push((p, high));
        }
    }
    let mut out = Vec::new();
    if ends.is_empty() {
        return Ok(out);
    }
    consumer.assign(&tpl).context("assigning the dead-letter topic")?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut remaining = ends.len();
    let mut reached = std::collections::HashSet::new();
    while remaining > 0 {
        if std::time::Instant::now() > deadline {
            anyhow::bail!("reading {topic}: the end was not reached within 60 s");
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let (p, o) = (m.partition(), m.offset());
                let end = ends.iter().find(|(q, _)| *q == p).map(|(_, h)| *h).unwrap_or(0);
                let letter = DeadLetter { partition: p, offset: o, message: m.detach() };
                if letter.matches(config, filter) {
                    out.push(letter);
                }
                if o + 1 >= end && reached.insert(p) {
                    remaining -= 1;
                }
            }
            Some(Err(e)) => return Err(e).context(format!("reading {topic}")),
            None => {}
        }
    }
    Ok(out)
}

/// The dead letter at `id` (`partition:offset`). Blocking.
pub fn show(config: &Config, id: &str) -> anyhow::Result<DeadLetter> {
    let (p, o) = id.split_once(':').context("a dead letter id is partition:offset, as `weir dlq list` prints")?;
    let (p, o): (i32, i64) = (p.parse().context("partition")?, o.parse().context("offset")?);
    list(config, &Filter::default())?
        .into_iter()
        .find(|d| d.partition == p && d.offset == o)
        .with_context(|| format!("no dead letter {id} in {}", config.topic("dlq")))
}

/// Re-produces every dead letter matching `filter` to its origin topic; returns how many.
pub async fn redrive(config: &Config, filter: &Filter) -> anyhow::Result<usize> {
    let (c, f) = (config.clone(), filter.clone());
    let letters = tokio::task::spawn_blocking(move || list(&c, &f)).await??;
    let producer = kafka::producer(config)?;
    let mut count = 0;
    for letter in &letters {
        let origin = letter
            .header(dead_letter::ORIGIN_TOPIC)
            .with_context(|| format!("dead letter {} has no {} header", letter.id(), dead_letter::ORIGIN_TOPIC))?;
        let headers = kafka::rewrite_headers(
            &letter.message,
            |k| k.starts_with("weir.error.") || k.starts_with("weir.origin.") || k.starts_with("weir.retry."),
            &[],
        );
        let payload = reset_attempt(&letter.message);
        kafka::send(&producer, origin, letter.message.key(), &payload, headers)
            .await
            .with_context(|| format!("redriving {} to {origin}", letter.id()))?;
        count += 1;
    }
    Event::Redriven { count }.emit();
    Ok(count)
}

/// The payload, with an action task's attempt back at 1 (JSON only; anything else unchanged).
fn reset_attempt(message: &OwnedMessage) -> Vec<u8> {
    let payload = message.payload().unwrap_or_default();
    let json = envelope::Format::from_content_type(kafka::header(message.headers(), envelope::CONTENT_TYPE))
        .is_ok_and(|f| f == envelope::Format::Json);
    if json {
        if let Ok(mut task) = serde_json::from_slice::<envelope::ActionTask>(payload) {
            task.attempt = 1;
            return serde_json::to_vec(&task).expect("a task always serializes");
        }
    }
    payload.to_vec()
}

/// `weir dlq list` output: one line per dead letter.
pub fn print_list(letters: &[DeadLetter]) {
    println!("{:<10} {:<26} {:<28} {:<16} {:>8}  reason", "id", "time", "origin", "key", "attempts");
    for d in letters {
        let origin = format!(
            "{}/{}@{}",
            d.header(dead_letter::ORIGIN_TOPIC).unwrap_or("?"),
            d.header(dead_letter::ORIGIN_PARTITION).unwrap_or("?"),
            d.header(dead_letter::ORIGIN_OFFSET).unwrap_or("?")
        );
        println!(
            "{:<10} {:<26} {:<28} {:<16} {:>8}  {}",
            d.id(),
            d.header(dead_letter::TIME).unwrap_or("?"),
            origin,
            d.key(),
            d.header(dead_letter::ATTEMPTS).unwrap_or("-"),
            d.header(dead_letter::REASON).unwrap_or("?")
        );
    }
}

/// `weir dlq show` output: headers, then the payload (pretty JSON when it is JSON).
pub fn print_one(d: &DeadLetter) {
    println!("id: {}\nkey: {}", d.id(), d.key());
    if let Some(headers) = d.message.headers() {
        for h in headers.iter() {
            println!("{}: {}", h.key, h.value.map(String::from_utf8_lossy).unwrap_or_default());
        }
    }
    let payload = d.message.payload().unwrap_or_default();
    match serde_json::from_slice::<serde_json::Value>(payload) {
        Ok(v) => println!("\n{}", serde_json::to_string_pretty(&v).unwrap_or_default()),
        Err(_) => println!("\n<{} bytes, not JSON>", payload.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_times_and_durations() {
        assert_eq!(parse_since("2026-11-23T10:00:00Z").unwrap().to_rfc3339(), "2026-11-23T10:00:00+00:00");
        let two_hours = chrono::Utc::now() - parse_since("2h").unwrap();
        assert!((two_hours.num_minutes() - 120).abs() <= 1);
        assert!(parse_since("2w").unwrap_err().to_string().contains("unit"));
        assert!(parse_since("yesterday").unwrap_err().to_string().contains("--since"));
    }
}
