//! Kafka client set-up shared by every stage: one place that says how weir talks to the broker.
//!
//! Choices and why:
//! - Producers are idempotent with `acks=all`: a retried send never duplicates or reorders a
//!   partition, and an acknowledged record survives the loss of the leader.
//! - `partitioner=murmur2_random` is the Java client's default partitioner, so a tenant's events
//!   land where a Java producer would put them (see [`crate::kafka::partitioner`]).
//! - Consumers keep `enable.auto.commit` on but `enable.auto.offset.store` off: librdkafka
//!   commits in the background only what a stage explicitly *stored*, and a stage stores an offset
//!   only after the work it stands for is durable. That is rust-rdkafka's at-least-once pattern.
//! - Every client gets a bounded `socket.connection.setup.timeout.ms` and metadata timeout, so an
//!   unreachable broker is an error within seconds rather than a silent retry loop.
//!
//! ## Rebalancing
//! How a stage's processes share its partitions is `consumer_groups.protocol` ([`member_config`]):
//! - `cooperative` (default): the classic protocol with `cooperative-sticky`, any broker.
//!   Incremental: members first give up only what moves, then it is assigned in a second round.
//! - `consumer`: KIP-848 (Kafka 4.0+). The broker computes the assignment and tells each member,
//!   by heartbeat, only what it gains or loses; nobody stops for a change that does not concern
//!   them. Session timeout and heartbeat interval are broker settings
//!   (`group.consumer.session.timeout.ms`, 45 s by default): librdkafka refuses the client ones.
//!   Not the default because a crash costs more under it ([`crate::config::GroupProtocol`]).
//! - `eager`: classic with `range,roundrobin`: every member gives up everything on every change.
//!
//! With either incremental protocol librdkafka hands the rebalance callback only the partitions
//! that change, and rust-rdkafka's default callback answers with `incremental_assign` /
//! `incremental_unassign` (it checks `rebalance_protocol()`); [`source`] keeps its assignment,
//! offsets and pause state per partition, so it is right under all three.
//!
//! ## Restarts without the dead pause
//! A member that dies without leaving (kill -9, OOM, a lost node) stays in its group until its
//! session times out (`session.timeout.ms`, 10 s): the rebalance its replacement starts waits for
//! it, and its partitions are read by nobody meanwhile. Two settings remove that pause:
//! - *Static membership* ([`member_config`]): with `instance_id` configured (or
//!   `WEIR_INSTANCE_ID`), every group member of the process joins with `group.instance.id` set to
//!   it. The broker then knows a restarted process as the member it replaces: its rejoin takes the
//!   old member's place and assignment at once, with no rebalance and no wait. Ids are scoped by
//!   group and each stage, service and delay tier has a group of its own, so one id per process
//!   is enough; two *live* processes must never share one (the broker fences the older: its
//!   consumers fail with `FENCED_INSTANCE_ID` and stop reading). A static member does not leave
//!   on close, by Kafka's design (KIP-345): a process stopped for good hands its partitions over
//!   after the session timeout, a restarted one gets them back at once.
//!
//!   Under `consumer` (KIP-848) two things differ. A static member's clean exit tells the broker
//!   it leaves *for now*: the replacement under the same id takes its partitions without any other
//!   member noticing (a rolling restart moves nothing), but a process stopped for good holds its
//!   partitions until the session times out. And a duplicate id refuses the *newcomer*
//!   (`UNRELEASED_INSTANCE_ID`, fatal for the consumer): a process killed without a clean exit
//!   cannot rejoin under its id until the broker expires the old session. The source reports it
//!   and the stage fails (see [`source`]), so the supervisor restarts the process; scaling in
//!   without replacement is best done without an instance id.
//! - *Leaving on a clean exit*: without an instance id, a stopping stage closes its consumer
//!   ([`source::Source::close`]), which sends LeaveGroup, so the rest of the group rebalances at
//!   once rather than after the session timeout.

pub mod compacted;
pub mod dead_letter;
pub mod deferral;
pub mod limits;
pub mod offsets;
pub mod partitioner;
pub mod source;
pub mod topics;

use std::time::Duration;

use anyhow::Context as _;
use rdkafka::{
    admin::AdminClient,
    client::DefaultClientContext,
    config::{ClientConfig, RDKafkaLogLevel},
    consumer::{BaseConsumer, Consumer},
    message::{Header, Headers as _, OwnedHeaders, OwnedMessage},
    producer::FutureProducer,
    Message as _,
};

use crate::config::{Config, GroupProtocol};

/// How long to wait for the broker to answer a metadata request before calling it unreachable.
pub const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

fn base(config: &Config) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.brokers)
        .set("socket.connection.setup.timeout.ms", "5000")
        .set("client.id", "weir")
        .set_log_level(RDKafkaLogLevel::Warning);
    for (k, v) in &config.kafka {
        c.set(k, v);
    }
    c
}

/// The producer every stage uses for its output.
pub fn producer_config(config: &Config) -> ClientConfig {
    let mut c = base(config);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        // A few ms of linger lets librdkafka fill batches at high rates without hurting latency
        // at low ones; lz4 is the cheapest codec per byte saved.
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("compression.type", "lz4")
        // A record not acknowledged within this time fails its delivery future; the stage then
        // stops without storing the offset, and the record is reprocessed.
        .set("message.timeout.ms", "60000");
    for (k, v) in &config.kafka {
        c.set(k, v);
    }
    c
}

pub fn producer(config: &Config) -> anyhow::Result<FutureProducer> {
    producer_config(config).create().context("creating Kafka producer")
}

/// A consumer in `group`, storing offsets only on request (see the module docs).
pub fn consumer_config(config: &Config, group: &str) -> ClientConfig {
    let mut c = base(config);
    c.set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        // librdkafka's prefetch queue is the only buffer ahead of a stage. It is checked against
        // the *compressed* size fetched and each message adds bookkeeping, so 32 MB of small lz4
        // events held ~120 MB; 4 MB keeps a full fetch ahead of the stage and the 10-million-event
        // backlog flat at ~160 MB (docs/BENCHMARKS.md, "backlog").
        .set("queued.max.messages.kbytes", "4096")
        // After a resume (a stage that was over its bound) librdkafka waits this long before it
        // fetches again; its 1 s default turned every pause into a second of idleness (measured in
        // the executor benchmark: 27.5k → 40.8k tasks/s with 10 ms).
        .set("fetch.queue.backoff.ms", "10")
        // Consumer lag per partition comes from librdkafka's statistics.
        .set("statistics.interval.ms", "5000");
    for (k, v) in &config.kafka {
        c.set(k, v);
    }
    c
}

/// [`consumer_config`] for a member that joins `group` (subscribes): static membership under the
/// configured `instance_id` (see the module docs). Only for members: a consumer that assigns
/// partitions itself (a tail read, `weir dlq`) must not claim the process's identity in a group.
///
/// The rebalance protocol is `consumer_groups.protocol` (see the module docs, "Rebalancing").
pub fn member_config(config: &Config, group: &str) -> ClientConfig {
    let mut c = consumer_config(config, group);
    match config.consumer_groups.protocol {
        // The broker assigns and times sessions out: librdkafka refuses the classic settings.
        GroupProtocol::Consumer => {
            c.set("group.protocol", "consumer");
        }
        classic => {
            let strategy = match classic {
                GroupProtocol::Cooperative => "cooperative-sticky",
                _ => "range,roundrobin",
            };
            c.set("group.protocol", "classic")
                .set("partition.assignment.strategy", strategy)
                .set("session.timeout.ms", "10000")
                .set("heartbeat.interval.ms", "1000");
            // `kafka:` wins over the defaults above (config validation refuses the protocol keys).
            for (k, v) in config.kafka.iter().filter(|(k, _)| k.as_str() != "group.protocol") {
                c.set(k, v);
            }
        }
    }
    if let Some(id) = &config.instance_id {
        c.set("group.instance.id", id);
    }
    c
}

pub fn admin(config: &Config) -> anyhow::Result<AdminClient<DefaultClientContext>> {
    base(config).create().context("creating Kafka admin client")
}

/// Fails with a clear message unless the broker answers a metadata request within
/// [`METADATA_TIMEOUT`]: the one message every command gives when the broker is unreachable.
///
/// The probe runs with a [`Quiet`] context. librdkafka reports an unreachable broker by itself, as
/// `FAIL … Connection refused` log lines and repeated `BrokerTransportFailure` errors; for a
/// command that stops here those are noise around the message that matters, which names the
/// brokers and what to do.
pub fn check_reachable(config: &Config) -> anyhow::Result<()> {
    let probe: BaseConsumer<Quiet> = base(config).create_with_context(Quiet).context("creating Kafka client")?;
    probe.fetch_metadata(None, METADATA_TIMEOUT).map_err(|e| {
        anyhow::anyhow!(
            "Kafka at {} did not answer within {}s ({e}); is it running? (scripts/kafka.sh up, or set WEIR_BROKERS)",
            config.brokers,
            METADATA_TIMEOUT.as_secs()
        )
    })?;
    Ok(())
}

/// A client context that drops librdkafka's own logs and errors: see [`check_reachable`].
pub(crate) struct Quiet;

impl rdkafka::ClientContext for Quiet {
    fn log(&self, _: RDKafkaLogLevel, _: &str, _: &str) {}
    fn error(&self, _: rdkafka::error::KafkaError, _: &str) {}
}

impl rdkafka::consumer::ConsumerContext for Quiet {}

/// Partition count of `topic`, or an error naming the missing topic.
pub(crate) fn partition_count<C: rdkafka::ClientContext>(
    client: &rdkafka::client::Client<C>,
    topic: &str,
) -> anyhow::Result<i32> {
    let md = client
        .fetch_metadata(Some(topic), METADATA_TIMEOUT)
        .with_context(|| format!("fetching metadata of topic {topic}"))?;
    let t = md.topics().first().context("broker returned no topic metadata")?;
    if t.error().is_some() || t.partitions().is_empty() {
        anyhow::bail!("topic {topic} does not exist; run `weir topics apply`");
    }
    Ok(t.partitions().len() as i32)
}

/// Reads a header's value by name.
pub fn header<'a, H: rdkafka::message::Headers>(headers: Option<&'a H>, name: &str) -> Option<&'a [u8]> {
    headers?.iter().find(|h| h.key == name).and_then(|h| h.value)
}

/// A header's value as text.
pub fn header_str<'a>(message: &'a OwnedMessage, name: &str) -> Option<&'a str> {
    header(message.headers(), name).and_then(|v| std::str::from_utf8(v).ok())
}

/// When `message` was written: its Kafka timestamp (the producer's create time, or the broker's
/// append time when the topic says so); now for a record without one. The same on every
/// redelivery and replay of the record, which is why a run's `run_at` is this time of its event.
pub fn record_time(message: &OwnedMessage) -> chrono::DateTime<chrono::Utc> {
    message.timestamp().to_millis().and_then(chrono::DateTime::from_timestamp_millis).unwrap_or_else(chrono::Utc::now)
}

/// `message`'s headers without those `drop` names, plus `add`: what a record keeps when it is
/// forwarded (to a delay topic, back from one, to the dead-letter topic).
pub(crate) fn rewrite_headers(
    message: &OwnedMessage,
    drop: impl Fn(&str) -> bool,
    add: &[(&str, &str)],
) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new();
    if let Some(original) = message.headers() {
        for h in original.iter().filter(|h| !drop(h.key)) {
            headers = headers.insert(h);
        }
    }
    for (key, value) in add {
        headers = headers.insert(Header { key, value: Some(*value) });
    }
    headers
}

/// Produces one record and waits for the broker's acknowledgement. Owns its data, so many can be
/// in flight at once (a `FuturesUnordered` of them is how stages pipeline their output).
pub async fn send(
    producer: &FutureProducer,
    topic: &str,
    key: Option<&[u8]>,
    payload: &[u8],
    headers: rdkafka::message::OwnedHeaders,
) -> Result<(i32, i64), rdkafka::error::KafkaError> {
    send_to(producer, topic, None, key, payload, headers).await
}

/// How often a produce that failed for a reason that may pass is tried again, and the longest
/// wait between two tries: about half a minute in all, on top of librdkafka's own retries.
const PRODUCE_ATTEMPTS: u32 = 10;
const PRODUCE_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Produces one record (to `partition`, or where the partitioner puts its key) and waits for the
/// broker's acknowledgement.
///
/// librdkafka retries what it knows to be retriable until `message.timeout.ms`, but a broker
/// restart also fails records with errors it hands back at once: an idempotent producer whose
/// sequence no longer matches the restarted broker's resets and fails what it had in flight
/// (`OutOfOrderSequenceNumber`, `UnknownProducerId`), a partition has no leader for a moment.
/// Stopping the stage for those would turn every broker hiccup into a crash loop, so they are tried
/// again here, with backoff, a bounded number of times. What comes back is permanent: a record
/// the broker refuses (see [`limits::is_record_error`]: the caller dead-letters it), a delivery
/// that librdkafka gave up on after `message.timeout.ms` (the broker is lost), a producer in a
/// fatal state, or a transient error that outlasted the attempts.
pub async fn send_to(
    producer: &FutureProducer,
    topic: &str,
    partition: Option<i32>,
    key: Option<&[u8]>,
    payload: &[u8],
    headers: rdkafka::message::OwnedHeaders,
) -> Result<(i32, i64), rdkafka::error::KafkaError> {
    let mut attempt = 1;
    loop {
        let record = future_record(topic, partition, key, payload, headers.clone());
        let sent = producer
            .send(record, rdkafka::util::Timeout::After(Duration::from_secs(30)))
            .await
            .map(|d| (d.partition, d.offset))
            .map_err(|(e, _)| e);
        match sent {
            Err(e) if attempt < PRODUCE_ATTEMPTS && may_pass(producer, &e) => {
                crate::telemetry::Event::ProduceRetried { topic, attempt, error: &e.to_string() }.emit();
                let backoff = Duration::from_millis(100 << attempt.min(6)).min(PRODUCE_BACKOFF_MAX);
                tokio::time::sleep(backoff).await;
                attempt += 1;
            }
            sent => return sent,
        }
    }
}

/// The error a stage stops with when `what` could not be produced even by [`send_to`]: the one
/// exit a stage takes for a broker, with what it means and what to do.
pub fn produce_lost(what: &str, e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!(
        "{what}: {e}. The broker did not take the record within `message.timeout.ms` and weir's own \
         retries, so the stage stops without storing the offsets of unfinished work: once the broker \
         is reachable, restart weir and that work is done again"
    )
}

/// Whether a failed produce may succeed if tried again: see [`send_to`].
pub(crate) fn may_pass(producer: &FutureProducer, e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::{error::KafkaError, producer::Producer as _, types::RDKafkaErrorCode as Code};
    if limits::is_record_error(e) || producer.client().fatal_error().is_some() {
        return false;
    }
    match e {
        KafkaError::MessageProduction(code) => !matches!(
            code,
            Code::MessageTimedOut
                | Code::Fatal
                | Code::TopicAuthorizationFailed
                | Code::ClusterAuthorizationFailed
                | Code::UnsupportedVersion
        ),
        // The delivery future was dropped: the producer is gone.
        KafkaError::Canceled => false,
        _ => false,
    }
}

/// Hands one record for `partition` of `topic` to the producer at once and returns the wait for
/// its acknowledgement. Unlike [`send`], whose record is handed over only when the future first
/// runs, records enqueued one after the other keep that order in the partition (the producer is
/// idempotent): for a stage moving one tenant's records somewhere in order.
pub(crate) fn enqueue(
    producer: &FutureProducer,
    topic: &str,
    partition: i32,
    key: Option<&[u8]>,
    payload: &[u8],
    headers: rdkafka::message::OwnedHeaders,
) -> Result<impl std::future::Future<Output = Result<(), rdkafka::error::KafkaError>>, rdkafka::error::KafkaError> {
    enqueue_to(producer, topic, Some(partition), key, payload, headers)
}

/// [`enqueue`] to the partition the partitioner picks for `key`. It fails at once, without
/// waiting, when the producer's queue is full (`QueueFull`): the ingest stage answers that
/// with 503 instead of holding the request.
pub(crate) fn enqueue_keyed(
    producer: &FutureProducer,
    topic: &str,
    key: &[u8],
    payload: &[u8],
    headers: rdkafka::message::OwnedHeaders,
) -> Result<impl std::future::Future<Output = Result<(), rdkafka::error::KafkaError>>, rdkafka::error::KafkaError> {
    enqueue_to(producer, topic, None, Some(key), payload, headers)
}

/// The record `send_to` and `enqueue_to` hand to librdkafka: to `partition` when given, else where
/// the partitioner puts `key`.
fn future_record<'a>(
    topic: &'a str,
    partition: Option<i32>,
    key: Option<&'a [u8]>,
    payload: &'a [u8],
    headers: rdkafka::message::OwnedHeaders,
) -> rdkafka::producer::FutureRecord<'a, [u8], [u8]> {
    let mut record = rdkafka::producer::FutureRecord::to(topic).payload(payload).headers(headers);
    if let Some(partition) = partition {
        record = record.partition(partition);
    }
    if let Some(key) = key {
        record = record.key(key);
    }
    record
}

fn enqueue_to(
    producer: &FutureProducer,
    topic: &str,
    partition: Option<i32>,
    key: Option<&[u8]>,
    payload: &[u8],
    headers: rdkafka::message::OwnedHeaders,
) -> Result<impl std::future::Future<Output = Result<(), rdkafka::error::KafkaError>>, rdkafka::error::KafkaError> {
    let record = future_record(topic, partition, key, payload, headers);
    let delivery = producer.send_result(record).map_err(|(e, _)| e)?;
    Ok(async move {
        match delivery.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((e, _))) => Err(e),
            Err(_) => Err(rdkafka::error::KafkaError::Canceled),
        }
    })
}

/// Header carrying the produce time in milliseconds since the epoch, for end-to-end latency.
pub(crate) const PRODUCED_AT: &str = "weir.produced-at";

/// The headers of a produced event: its `content-type` and the produce time.
pub(crate) fn event_headers(content_type: &str) -> OwnedHeaders {
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis().to_string();
    OwnedHeaders::new()
        .insert(Header { key: crate::envelope::CONTENT_TYPE, value: Some(content_type) })
        .insert(Header { key: PRODUCED_AT, value: Some(now.as_str()) })
}

/// Records of `topic` that `group` has not committed yet, all partitions together: the lag a
/// stage is behind. `client` is a consumer configured with `group`'s id that never subscribes
/// (`consumer_config`): it asks the group's coordinator for the committed offsets without
/// joining. A partition the group never committed counts from its start.
pub(crate) fn group_lag<C: rdkafka::consumer::ConsumerContext>(
    client: &BaseConsumer<C>,
    group: &str,
    topic: &str,
) -> anyhow::Result<i64> {
    let partitions = partition_count(client.client(), topic)?;
    let mut wanted = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        wanted.add_partition(topic, p);
    }
    let committed = client
        .committed_offsets(wanted, METADATA_TIMEOUT)
        .with_context(|| format!("fetching the committed offsets of group {group}"))?;
    let mut lag = 0;
    for p in 0..partitions {
        let (start, end) = client
            .fetch_watermarks(topic, p, METADATA_TIMEOUT)
            .with_context(|| format!("fetching the offsets of {topic}/{p}"))?;
        let next = match committed.find_partition(topic, p).map(|e| e.offset()) {
            Some(rdkafka::Offset::Offset(o)) => o.max(start),
            _ => start,
        };
        lag += (end - next).max(0);
    }
    Ok(lag)
}

/// Headers for a record of the given encoding.
pub(crate) fn content_headers(format: crate::envelope::Format) -> rdkafka::message::OwnedHeaders {
    rdkafka::message::OwnedHeaders::new()
        .insert(rdkafka::message::Header { key: crate::envelope::CONTENT_TYPE, value: Some(format.content_type()) })
}

#[cfg(test)]
mod tests {
    use rdkafka::{error::KafkaError, types::RDKafkaErrorCode as Code};

    use super::*;

    #[test]
    fn what_a_broker_restart_fails_is_tried_again_and_what_is_permanent_is_not() {
        // Creating a producer connects to nothing until it is used.
        let producer: FutureProducer =
            ClientConfig::new().set("bootstrap.servers", "127.0.0.1:1").create().expect("a producer");
        let again = |code| may_pass(&producer, &KafkaError::MessageProduction(code));
        for code in [
            Code::OutOfOrderSequenceNumber,
            Code::UnknownProducerId,
            Code::NotLeaderForPartition,
            Code::BrokerTransportFailure,
            Code::QueueFull,
            Code::UnknownTopicOrPartition,
        ] {
            assert!(again(code), "{code:?} may pass");
        }
        for code in
            [Code::MessageSizeTooLarge, Code::InvalidRecord, Code::MessageTimedOut, Code::TopicAuthorizationFailed]
        {
            assert!(!again(code), "{code:?} is permanent");
        }
        assert!(!may_pass(&producer, &KafkaError::Canceled));
    }
}
