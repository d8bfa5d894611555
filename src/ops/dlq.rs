//! `weir dlq list|show|redrive`: reading the dead-letter topic and sending records back.
//!
//! The dead-letter topic is read from the beginning to its current end with a throw-away
//! consumer (no group, nothing committed), so listing never moves anything. Redrive re-produces
//! each selected record, as it was before it failed, to the topic it was read from
//! (`weir.origin.topic`): the key and payload unchanged except an action task's `attempt`, which
//! starts again at 1, and the headers without weir's error, origin and retry headers. The dead
//! letters stay where they are (the topic is a log).
//!
//! What was redriven is remembered the Kafka way, in a consumer group of its own
//! (`<prefix>weir-dlq-redrive`): per dead-letter partition, the committed offset marks "every
//! letter below was resent", and the commit's metadata lists the resent letters above it (as
//! ranges). A filter may skip letters between resent ones; moving the offset past them would hide
//! them from the next redrive, so the offset only moves over a contiguous run of resent letters
//! and the rest is kept in the metadata. The record is committed after the broker acknowledged
//! the resent records, so a crash can at worst send a letter twice (harmless: an action task's
//! `Idempotency-Key` is its task id), never skip one. A later redrive leaves marked letters alone
//! unless asked `again`.
//!
//! A dead letter too large to keep whole holds only a prefix of its payload (see
//! [`crate::kafka::dead_letter`]). Redriving it re-reads the original from its origin topic,
//! partition and offset, checks it against the SHA-256 the letter kept, and sends that; once the
//! origin topic's retention has removed it, the redrive of that letter fails saying so.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use anyhow::Context as _;
use futures::{stream::FuturesUnordered, StreamExt};
use rdkafka::{
    consumer::{BaseConsumer, CommitMode, Consumer},
    message::{Headers, OwnedMessage},
    producer::FutureProducer,
    Message, Offset, TopicPartitionList,
};

use crate::{
    config::Config,
    envelope, kafka,
    kafka::{dead_letter, limits},
    telemetry::Event,
};

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
    /// Whether a redrive has sent it (see [`Mark`]).
    pub redriven: bool,
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
        // A service's dead letters come from the action topic of any of its priorities.
        let origin = self.header(dead_letter::ORIGIN_TOPIC);
        let of_service = |s: &String| {
            crate::config::Priority::ALL.iter().any(|p| origin == Some(config.names().actions_at(s, *p).as_str()))
        };
        filter.service.as_ref().is_none_or(of_service)
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

/// How far a dead-letter partition has been redriven: the `dlq-redrive` group's committed
/// offset (`below`: every letter under it was resent) and, in that commit's metadata, the letters
/// above it that were resent too (a filter skipped some in between, which must stay visible).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Mark {
    pub below: i64,
    pub above: BTreeSet<i64>,
}

/// The broker's default `offset.metadata.max.bytes` is 4,096; keep below it.
const MAX_METADATA: usize = 4_000;

impl Mark {
    pub fn contains(&self, offset: i64) -> bool {
        offset < self.below || self.above.contains(&offset)
    }

    /// The mark after `resent` were acknowledged: the committed offset moves over every letter
    /// (`offsets`, ascending, all letters of the partition read up to `end`) now marked, and stops
    /// at the first that is not; resent letters beyond it are kept in `above`.
    pub fn advance(&self, offsets: &[i64], end: i64, resent: &BTreeSet<i64>) -> Mark {
        let mut done: BTreeSet<i64> = self.above.union(resent).copied().filter(|o| *o >= self.below).collect();
        let mut below = self.below;
        let mut stopped = false;
        for o in offsets.iter().copied().filter(|o| *o >= self.below) {
            if !done.contains(&o) {
                stopped = true;
                break;
            }
            below = o + 1;
        }
        if !stopped {
            // Every letter read is marked: the gaps up to the end (transaction markers) are too.
            below = below.max(end);
        }
        done.retain(|o| *o >= below);
        Mark { below, above: done }
    }

    /// `above` as ranges (`5-9,12`), and how many offsets did not fit the metadata limit; those
    /// are left out of the record, so a later redrive sends them again (harmless: the
    /// `Idempotency-Key` is the task id), never hides them.
    fn encode(&self) -> (String, usize) {
        let mut text = String::new();
        let mut dropped = 0;
        let mut offsets = self.above.iter().copied().peekable();
        while let Some(first) = offsets.next() {
            let mut last = first;
            while offsets.peek() == Some(&(last + 1)) {
                last = offsets.next().unwrap_or(last);
            }
            let range = if first == last { first.to_string() } else { format!("{first}-{last}") };
            if dropped > 0 || text.len() + range.len() + 1 > MAX_METADATA {
                dropped += (last - first + 1) as usize;
                continue;
            }
            if !text.is_empty() {
                text.push(',');
            }
            text.push_str(&range);
        }
        (text, dropped)
    }

    fn decode(below: i64, text: &str) -> anyhow::Result<Mark> {
        let mut above = BTreeSet::new();
        for range in text.split(',').filter(|r| !r.is_empty()) {
            let (first, last) = range.split_once('-').unwrap_or((range, range));
            let (first, last): (i64, i64) = (first.parse()?, last.parse()?);
            anyhow::ensure!(first <= last && last - first < 10_000_000, "bad range {range:?}");
            above.extend(first..=last);
        }
        Ok(Mark { below, above })
    }
}

/// The dead-letter topic read to its current end, with the redrive record of each partition.
struct Read {
    consumer: BaseConsumer,
    /// Every letter, oldest first per partition.
    letters: Vec<DeadLetter>,
    /// Per partition read: its end then, and its mark.
    partitions: BTreeMap<i32, (i64, Mark)>,
}

/// Reads the whole dead-letter topic with a consumer of the `dlq-redrive` group that never joins
/// it (assigned, not subscribed) and commits only what [`redrive`] decides. Blocking.
fn read(config: &Config) -> anyhow::Result<Read> {
    let topic = config.names().dlq();
    let group = config.names().group("dlq-redrive");
    let consumer: BaseConsumer = kafka::consumer_config(config, &group)
        .set("enable.auto.commit", "false")
        .create()
        .context("creating Kafka consumer")?;
    let count = kafka::partition_count(consumer.client(), &topic)?;
    let mut all = TopicPartitionList::new();
    for p in 0..count {
        all.add_partition(&topic, p);
    }
    let committed = consumer
        .committed_offsets(all, kafka::METADATA_TIMEOUT)
        .with_context(|| format!("reading what group {group} has redriven"))?;
    let mut partitions = BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for e in committed.elements() {
        let p = e.partition();
        let below = match e.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        };
        let mark = Mark::decode(below, e.metadata()).with_context(|| {
            format!("group {group}'s record of {topic} partition {p} is unreadable ({:?})", e.metadata())
        })?;
        let (low, high) = consumer
            .fetch_watermarks(&topic, p, kafka::METADATA_TIMEOUT)
            .with_context(|| format!("reading the end of {topic} partition {p}"))?;
        if high > low {
            tpl.add_partition_offset(&topic, p, Offset::Offset(low)).context("assigning")?;
        }
        partitions.insert(p, (high.max(low), mark));
    }
    let mut letters = Vec::new();
    let mut remaining = tpl.count();
    if remaining > 0 {
        consumer.assign(&tpl).context("assigning the dead-letter topic")?;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut reached = std::collections::HashSet::new();
    while remaining > 0 {
        if std::time::Instant::now() > deadline {
            anyhow::bail!("reading {topic}: the end was not reached within 60 s");
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let (p, o) = (m.partition(), m.offset());
                let (end, mark) = partitions.get(&p).map(|(end, mark)| (*end, mark.contains(o))).unwrap_or((0, false));
                letters.push(DeadLetter { partition: p, offset: o, message: m.detach(), redriven: mark });
                if o + 1 >= end && reached.insert(p) {
                    remaining -= 1;
                }
            }
            Some(Err(e)) => return Err(e).context(format!("reading {topic}")),
            None => {}
        }
    }
    Ok(Read { consumer, letters, partitions })
}

/// The dead letters matching `filter`, oldest first per partition, each saying whether it was
/// redriven. Blocking.
pub fn list(config: &Config, filter: &Filter) -> anyhow::Result<Vec<DeadLetter>> {
    let mut letters = read(config)?.letters;
    letters.retain(|d| d.matches(config, filter));
    Ok(letters)
}

/// The dead letter at `id` (`partition:offset`). Blocking.
pub fn show(config: &Config, id: &str) -> anyhow::Result<DeadLetter> {
    let (p, o) = id.split_once(':').context("a dead letter id is partition:offset, as `weir dlq list` prints")?;
    let (p, o): (i32, i64) = (p.parse().context("partition")?, o.parse().context("offset")?);
    list(config, &Filter::default())?
        .into_iter()
        .find(|d| d.partition == p && d.offset == o)
        .with_context(|| format!("no dead letter {id} in {}", config.names().dlq()))
}

/// What a redrive did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Redriven {
    /// Dead letters re-produced (and acknowledged).
    pub sent: usize,
    /// Matching dead letters left alone because an earlier redrive had sent them.
    pub skipped: usize,
    /// Resent letters the record could not hold (metadata limit): a later redrive sends them again.
    pub unrecorded: usize,
}

/// Re-produces every dead letter matching `filter` to its origin topic, except those an earlier
/// redrive sent (unless `again`), then records what was acknowledged in the `dlq-redrive` group.
/// On a failed send the letters acknowledged before it are still recorded.
pub async fn redrive(config: &Config, filter: &Filter, again: bool) -> anyhow::Result<Redriven> {
    let c = config.clone();
    let read = tokio::task::spawn_blocking(move || read(&c)).await??;
    let producer = kafka::producer(config)?;
    let mut outcome = Redriven::default();
    let mut resent: BTreeMap<i32, BTreeSet<i64>> = BTreeMap::new();
    let mut sends = FuturesUnordered::new();
    let mut failure = None;
    let producer_max = crate::kafka::topics::producer_max_bytes(config)?;
    for letter in read.letters.iter().filter(|d| d.matches(config, filter)) {
        if letter.redriven && !again {
            outcome.skipped += 1;
            continue;
        }
        // Sent concurrently: the idempotent producer keeps each origin partition's order.
        sends.push(resend(config, &producer, producer_max, letter));
        if sends.len() >= 1_000 {
            collect(sends.next().await, &mut resent, &mut failure);
        }
    }
    while let Some(sent) = sends.next().await {
        collect(Some(sent), &mut resent, &mut failure);
    }
    drop(sends);
    outcome.sent = resent.values().map(BTreeSet::len).sum();
    let topic = config.names().dlq();
    let mut commit = TopicPartitionList::new();
    for (p, (end, mark)) in &read.partitions {
        let Some(resent) = resent.get(p) else { continue };
        let offsets: Vec<i64> = read.letters.iter().filter(|d| d.partition == *p).map(|d| d.offset).collect();
        let next = mark.advance(&offsets, *end, resent);
        let (metadata, dropped) = next.encode();
        outcome.unrecorded += dropped;
        let mut e = commit.add_partition(&topic, *p);
        e.set_offset(Offset::Offset(next.below)).context("recording")?;
        e.set_metadata(metadata);
    }
    if commit.count() > 0 {
        let consumer = read.consumer;
        tokio::task::spawn_blocking(move || consumer.commit(&commit, CommitMode::Sync))
            .await?
            .with_context(|| format!("recording the redrive in group {}", config.names().group("dlq-redrive")))?;
    }
    Event::Redriven { count: outcome.sent }.emit();
    match failure {
        Some((e, 0)) => Err(e.context(format!("{} dead letters were redriven and recorded", outcome.sent))),
        Some((e, more)) => Err(e.context(format!(
            "{} dead letters were redriven and recorded; {more} more could not be (run again to see each)",
            outcome.sent
        ))),
        None => Ok(outcome),
    }
}

/// The first failure, and how many more there were.
type Failure = Option<(anyhow::Error, usize)>;

fn collect(sent: Option<anyhow::Result<(i32, i64)>>, resent: &mut BTreeMap<i32, BTreeSet<i64>>, failure: &mut Failure) {
    match sent {
        Some(Ok((p, o))) => {
            resent.entry(p).or_default().insert(o);
        }
        Some(Err(e)) => match failure {
            Some((_, more)) => *more += 1,
            None => *failure = Some((e, 0)),
        },
        None => {}
    }
}

/// Sends `letter` back to its origin topic as it was before it failed (re-read from there when
/// the letter holds only a prefix); returns its id's partition and offset once the broker has
/// acknowledged it.
async fn resend(
    config: &Config,
    producer: &FutureProducer,
    producer_max: usize,
    letter: &DeadLetter,
) -> anyhow::Result<(i32, i64)> {
    let origin = letter
        .header(dead_letter::ORIGIN_TOPIC)
        .with_context(|| format!("dead letter {} has no {} header", letter.id(), dead_letter::ORIGIN_TOPIC))?;
    let original = match letter.header(dead_letter::PAYLOAD_SHA256) {
        Some(_) => {
            let (config, letter) = (config.clone(), letter.clone());
            tokio::task::spawn_blocking(move || read_original(&config, &letter)).await??
        }
        None => letter.message.clone(),
    };
    let headers = kafka::rewrite_headers(
        &original,
        |k| {
            k.starts_with("weir.error.")
                || k.starts_with("weir.origin.")
                || k.starts_with("weir.retry.")
                || k.starts_with("weir.truncated.")
        },
        &[],
    );
    let payload = reset_attempt(&original);
    let size = limits::record_size(original.key(), &payload, Some(&headers));
    if size > producer_max {
        anyhow::bail!(
            "redriving {} to {origin}: the record is {size} bytes, over the producer's message.max.bytes of \
             {producer_max}; raise message.max.bytes under `kafka:` in the config to redrive it",
            letter.id()
        );
    }
    kafka::send(producer, origin, original.key(), &payload, headers)
        .await
        .with_context(|| format!("redriving {} to {origin}", letter.id()))?;
    Ok((letter.partition, letter.offset))
}

/// The record a truncated dead letter came from, read from its origin coordinates and checked
/// against the SHA-256 the letter kept. Blocking.
pub(crate) fn read_original(config: &Config, letter: &DeadLetter) -> anyhow::Result<OwnedMessage> {
    let id = letter.id();
    let coordinate = |name: &str| {
        letter.header(name).with_context(|| format!("dead letter {id} holds a prefix only and has no {name} header"))
    };
    let topic = coordinate(dead_letter::ORIGIN_TOPIC)?;
    let partition: i32 = coordinate(dead_letter::ORIGIN_PARTITION)?.parse().context("origin partition")?;
    let offset: i64 = coordinate(dead_letter::ORIGIN_OFFSET)?.parse().context("origin offset")?;
    let sha256 = coordinate(dead_letter::PAYLOAD_SHA256)?;
    let (kept, size) = (
        letter.header(dead_letter::PAYLOAD_KEPT).unwrap_or("?"),
        letter.header(dead_letter::PAYLOAD_SIZE).unwrap_or("?"),
    );
    let at = format!("{topic} partition {partition} offset {offset}");
    let gone = |why: String| {
        anyhow::anyhow!(
            "dead letter {id} kept only the first {kept} of {size} bytes, and the original at {at} {why}; \
             it cannot be redriven (`weir dlq show {id} --full` shows what was kept)"
        )
    };
    let consumer: BaseConsumer = kafka::consumer_config(config, &config.names().group("dlq-redrive"))
        .set("enable.auto.commit", "false")
        // Past the retained range is an error, not a silent jump to another record.
        .set("auto.offset.reset", "error")
        .create()
        .context("creating Kafka consumer")?;
    let (low, high) = consumer
        .fetch_watermarks(topic, partition, kafka::METADATA_TIMEOUT)
        .with_context(|| format!("reading the offsets of {topic} partition {partition}"))?;
    if offset < low {
        return Err(gone(format!("is no longer retained (the partition now starts at offset {low})")));
    }
    if offset >= high {
        return Err(gone(format!("is past the partition's end ({high}): was the topic deleted and created again?")));
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(offset)).context("assigning")?;
    consumer.assign(&tpl).with_context(|| format!("reading {at}"))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) if m.offset() == offset => {
                let original = m.detach();
                if limits::sha256_hex(original.payload().unwrap_or_default()) != sha256 {
                    return Err(gone("differs from the record dead-lettered (SHA-256)".into()));
                }
                return Ok(original);
            }
            // Compaction or a transaction marker removed it.
            Some(Ok(_)) => return Err(gone("is no longer retained".into())),
            Some(Err(e)) if e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::AutoOffsetReset) => {
                return Err(gone(format!("is no longer retained ({e})")));
            }
            Some(Err(e)) => return Err(e).with_context(|| format!("reading {at}")),
            None => {}
        }
    }
    anyhow::bail!("reading {at}: the record did not arrive within 30 s")
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
    println!("{:<10} {:<26} {:<28} {:<16} {:>8}  {:<8}  reason", "id", "time", "origin", "key", "attempts", "redriven");
    for d in letters {
        let origin = format!(
            "{}/{}@{}",
            d.header(dead_letter::ORIGIN_TOPIC).unwrap_or("?"),
            d.header(dead_letter::ORIGIN_PARTITION).unwrap_or("?"),
            d.header(dead_letter::ORIGIN_OFFSET).unwrap_or("?")
        );
        println!(
            "{:<10} {:<26} {:<28} {:<16} {:>8}  {:<8}  {}",
            d.id(),
            d.header(dead_letter::TIME).unwrap_or("?"),
            origin,
            d.key(),
            d.header(dead_letter::ATTEMPTS).unwrap_or("-"),
            if d.redriven { "yes" } else { "no" },
            d.header(dead_letter::REASON).unwrap_or("?")
        );
    }
}

/// How much of a payload (or header value) `weir dlq show` prints without `--full`.
pub(crate) const SHOW_BYTES: usize = 4096;

/// `weir dlq show` output: headers, then the payload (pretty JSON when it is JSON). Without
/// `full`, a payload or header value over [`SHOW_BYTES`] is cut there, saying how much is left.
pub fn print_one(d: &DeadLetter, full: bool) {
    print!("{}", render_one(d, full));
}

/// What [`print_one`] prints.
pub(crate) fn render_one(d: &DeadLetter, full: bool) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "id: {}\nkey: {}\nredriven: {}", d.id(), d.key(), if d.redriven { "yes" } else { "no" });
    if let Some(headers) = d.message.headers() {
        for h in headers.iter() {
            let value = String::from_utf8_lossy(h.value.unwrap_or_default());
            let _ = writeln!(out, "{}: {}", h.key, cut(&value, full));
        }
    }
    let payload = d.message.payload().unwrap_or_default();
    if let (Some(size), Some(kept)) = (d.header(dead_letter::PAYLOAD_SIZE), d.header(dead_letter::PAYLOAD_KEPT)) {
        let _ = writeln!(
            out,
            "\nthe payload below is the first {kept} of {size} bytes; `weir dlq redrive` re-reads the whole \
             from its origin while that topic retains it"
        );
    }
    let text = match serde_json::from_slice::<serde_json::Value>(payload) {
        Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_default(),
        Err(_) if std::str::from_utf8(payload).is_ok() || payload.len() > SHOW_BYTES => {
            String::from_utf8_lossy(payload).into_owned()
        }
        Err(_) => format!("<{} bytes, not text>", payload.len()),
    };
    let _ = writeln!(out, "\n{}", cut(&text, full));
    out
}

/// `text`, or its first [`SHOW_BYTES`] (on a character boundary) and what was left out.
fn cut(text: &str, full: bool) -> std::borrow::Cow<'_, str> {
    if full || text.len() <= SHOW_BYTES {
        return text.into();
    }
    let end = (0..=SHOW_BYTES).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
    format!("{}\n… {} more bytes ({} in all); --full shows everything", &text[..end], text.len() - end, text.len())
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(payload: Vec<u8>) -> DeadLetter {
        let headers = rdkafka::message::OwnedHeaders::new()
            .insert(rdkafka::message::Header { key: dead_letter::REASON, value: Some("too big") });
        let message = OwnedMessage::new(
            Some(payload),
            Some(b"t".to_vec()),
            "dlq".into(),
            rdkafka::Timestamp::NotAvailable,
            0,
            7,
            Some(headers),
        );
        DeadLetter { partition: 0, offset: 7, message, redriven: false }
    }

    #[test]
    fn show_cuts_large_payloads_unless_full() {
        let big = serde_json::to_vec(&serde_json::json!({"data": "é".repeat(1_000_000)})).unwrap();
        let shown = render_one(&letter(big.clone()), false);
        assert!(shown.len() < 2 * SHOW_BYTES, "{} bytes shown", shown.len());
        assert!(shown.contains("reason: too big") && shown.contains("more bytes") && shown.contains("--full"));
        let full = render_one(&letter(big), true);
        assert!(full.len() > 2_000_000 && !full.contains("--full"));
        let small = render_one(&letter(br#"{"a":1}"#.to_vec()), false);
        assert!(small.contains("\"a\": 1") && !small.contains("more bytes"));
        assert!(render_one(&letter(vec![0xff; 10]), false).contains("<10 bytes, not text>"));
    }

    #[test]
    fn since_takes_times_and_durations() {
        assert_eq!(parse_since("2026-11-23T10:00:00Z").unwrap().to_rfc3339(), "2026-11-23T10:00:00+00:00");
        let two_hours = chrono::Utc::now() - parse_since("2h").unwrap();
        assert!((two_hours.num_minutes() - 120).abs() <= 1);
        assert!(parse_since("2w").unwrap_err().to_string().contains("unit"));
        assert!(parse_since("yesterday").unwrap_err().to_string().contains("--since"));
    }

    fn set(offsets: &[i64]) -> BTreeSet<i64> {
        offsets.iter().copied().collect()
    }

    #[test]
    fn the_offset_moves_over_resent_letters_only_and_keeps_the_rest_above() {
        let letters = [3, 4, 5, 6, 7, 9];
        // A filter took 3, 4 and 6: the offset moves to 5, 6 is kept above it.
        let first = Mark { below: 3, above: BTreeSet::new() }.advance(&letters, 10, &set(&[3, 4, 6]));
        assert_eq!(first, Mark { below: 5, above: set(&[6]) });
        assert!(first.contains(4) && first.contains(6) && !first.contains(5) && !first.contains(7));
        // The rest later: the offset moves past the end (10, after the gap at 8).
        assert_eq!(first.advance(&letters, 10, &set(&[5, 7, 9])), Mark { below: 10, above: set(&[]) });
        // Resending an already marked letter again changes nothing.
        assert_eq!(first.advance(&letters, 10, &set(&[3])), first);
    }

    #[test]
    fn marks_round_trip_as_ranges_and_bad_records_are_refused() {
        let mark = Mark { below: 2, above: set(&[5, 6, 7, 9, 11, 12]) };
        let (text, dropped) = mark.encode();
        assert_eq!((text.as_str(), dropped), ("5-7,9,11-12", 0));
        assert_eq!(Mark::decode(2, &text).unwrap(), mark);
        assert_eq!(Mark::decode(4, "").unwrap(), Mark { below: 4, above: set(&[]) });
        assert!(Mark::decode(0, "7-x").is_err() && Mark::decode(0, "9-3").is_err());
    }

    #[test]
    fn what_does_not_fit_the_metadata_is_left_out_to_be_resent() {
        let mark = Mark { below: 0, above: (0..2_000).map(|i| 1_000_000 + 2 * i).collect() };
        let (text, dropped) = mark.encode();
        assert!(text.len() <= MAX_METADATA);
        let kept = Mark::decode(0, &text).unwrap().above;
        assert_eq!(kept.len() + dropped, 2_000);
        assert!(kept.iter().all(|o| mark.above.contains(o)) && dropped > 0);
    }
}
