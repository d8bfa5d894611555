//! The broker's side of `weir status`: groups, members, offsets, and the oldest unprocessed
//! records. Blocking (librdkafka's admin calls); every call is bounded by
//! [`kafka::METADATA_TIMEOUT`].

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    ClientConfig, Message as _, Offset, TopicPartitionList,
};

use super::{DeadLetters, GroupStatus, Member, PartitionStatus, StageStatus};
use crate::{config::Config, kafka};

/// How long the throw-away reader waits, in all, for the records at the committed offsets.
const OLDEST_READ: Duration = Duration::from_secs(5);

/// A consumer that never subscribes: `group` only says whose offsets an OffsetFetch asks for.
/// It stores and commits nothing, and takes no instance id (that is a member's, see
/// [`kafka::member_config`]).
fn bystander(config: &Config, group: &str) -> ClientConfig {
    let mut c = kafka::consumer_config(config, group);
    c.set("enable.auto.commit", "false").set("statistics.interval.ms", "0");
    c
}

/// Reads every stage's groups and the dead-letter topic.
pub(super) fn read(config: &Config) -> anyhow::Result<(Vec<StageStatus>, DeadLetters)> {
    let client: BaseConsumer<kafka::Quiet> = bystander(config, &config.names().group("status"))
        .create_with_context(kafka::Quiet)
        .context("creating Kafka client")?;
    let mut stages: Vec<StageStatus> = super::layout(config)
        .into_iter()
        .map(|stage| {
            let groups: Vec<GroupStatus> =
                stage.groups.into_iter().map(|g| read_group(config, &client, g.role, g.group, g.topic)).collect();
            StageStatus {
                stage: stage.stage,
                service: stage.service,
                lag: groups.iter().map(|g| g.lag).sum(),
                groups,
                breaker: None,
                throttle_wait: None,
                tenants: Vec::new(),
            }
        })
        .collect();
    read_oldest(config, &mut stages);
    Ok((stages, dead_letters(&client, &config.names().dlq())))
}

fn read_group(
    config: &Config,
    client: &BaseConsumer<kafka::Quiet>,
    role: String,
    group: String,
    topic: String,
) -> GroupStatus {
    let mut status = GroupStatus {
        role,
        group,
        topic,
        state: "unknown".into(),
        protocol: "unknown".into(),
        members: Vec::new(),
        partitions: Vec::new(),
        lag: 0,
        oldest_unprocessed_age_secs: None,
        error: None,
    };
    if let Err(e) = fill_group(config, client, &mut status) {
        status.error = Some(format!("{e:#}"));
    }
    status.lag = status.partitions.iter().map(|p| p.lag).sum();
    status
}

fn fill_group(config: &Config, client: &BaseConsumer<kafka::Quiet>, status: &mut GroupStatus) -> anyhow::Result<()> {
    let (group, topic) = (status.group.clone(), status.topic.clone());
    let described = super::describe::describe(client.client(), &group, kafka::METADATA_TIMEOUT)?;
    status.state = described.state;
    status.protocol = described.protocol;
    status.members = described
        .members
        .into_iter()
        .map(|m| Member {
            member_id: m.member_id,
            client_id: m.client_id,
            host: m.host,
            partitions: m.assigned.into_iter().filter(|(t, _)| *t == topic).map(|(_, p)| p).collect(),
        })
        .collect();
    let partitions = kafka::partition_count(client.client(), &topic)?;
    let mut wanted = TopicPartitionList::new();
    for p in 0..partitions {
        wanted.add_partition(&topic, p);
    }
    let reader: BaseConsumer<kafka::Quiet> =
        bystander(config, &group).create_with_context(kafka::Quiet).context("creating Kafka client")?;
    let committed = reader
        .committed_offsets(wanted, kafka::METADATA_TIMEOUT)
        .with_context(|| format!("fetching the committed offsets of group {group}"))?;
    for p in 0..partitions {
        let (start, end) = client
            .fetch_watermarks(&topic, p, kafka::METADATA_TIMEOUT)
            .with_context(|| format!("fetching the offsets of {topic}/{p}"))?;
        let committed = match committed.find_partition(&topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => Some(o),
            _ => None,
        };
        // Under `start` (retention deleted what the group had not read) the group resumes at
        // `start` (auto.offset.reset: earliest), so that is where its lag begins.
        let next = committed.unwrap_or(start).max(start);
        status.partitions.push(PartitionStatus {
            partition: p,
            committed,
            start,
            end,
            lag: (end - next).max(0),
            oldest_unprocessed_ms: None,
        });
    }
    Ok(())
}

/// Reads, with one throw-away consumer assigned every lagging partition at its group's next
/// offset, the first record of each: its timestamp is the oldest unprocessed one. At most one
/// record is handed over per partition (the partition is paused once it has given one), and the
/// whole read is bounded by [`OLDEST_READ`]; a partition that gave nothing by then keeps `None`.
fn read_oldest(config: &Config, stages: &mut [StageStatus]) {
    let mut wanted = TopicPartitionList::new();
    let mut missing: BTreeMap<(String, i32), Option<i64>> = BTreeMap::new();
    for g in stages.iter().flat_map(|s| &s.groups) {
        for p in g.partitions.iter().filter(|p| p.lag > 0) {
            // Two groups reading the same partition would need two positions: the first one wins.
            if missing.insert((g.topic.clone(), p.partition), None).is_none() {
                let next = p.committed.unwrap_or(p.start).max(p.start);
                let _ = wanted.add_partition_offset(&g.topic, p.partition, Offset::Offset(next));
            }
        }
    }
    if !missing.is_empty() {
        if let Err(e) = read_first_records(config, &wanted, &mut missing) {
            tracing::warn!("reading the oldest unprocessed records: {e:#}");
        }
    }
    let now = chrono::Utc::now().timestamp_millis();
    for g in stages.iter_mut().flat_map(|s| s.groups.iter_mut()) {
        for p in &mut g.partitions {
            p.oldest_unprocessed_ms = missing.get(&(g.topic.clone(), p.partition)).copied().flatten();
        }
        g.oldest_unprocessed_age_secs =
            g.partitions.iter().filter_map(|p| p.oldest_unprocessed_ms).min().map(|t| (now - t).max(0) as f64 / 1000.0);
    }
}

fn read_first_records(
    config: &Config,
    wanted: &TopicPartitionList,
    found: &mut BTreeMap<(String, i32), Option<i64>>,
) -> anyhow::Result<()> {
    let reader: BaseConsumer<kafka::Quiet> = bystander(config, &config.names().group("status"))
        // A small first fetch per partition: one record is all that is wanted.
        .set("fetch.message.max.bytes", "65536")
        .set("queued.max.messages.kbytes", "1024")
        .create_with_context(kafka::Quiet)
        .context("creating Kafka client")?;
    reader.assign(wanted).context("assigning the lagging partitions")?;
    let deadline = Instant::now() + OLDEST_READ;
    let mut left = found.len();
    while left > 0 {
        let Some(wait) = deadline.checked_duration_since(Instant::now()) else { break };
        let Some(polled) = reader.poll(wait.min(Duration::from_millis(200))) else { continue };
        let Ok(message) = polled else { continue };
        let key = (message.topic().to_string(), message.partition());
        if let Some(slot @ None) = found.get_mut(&key) {
            // A record without a timestamp (`None`) still ends the wait for its partition.
            *slot = Some(message.timestamp().to_millis().unwrap_or(i64::MIN));
            left -= 1;
            let mut done = TopicPartitionList::new();
            done.add_partition(&key.0, key.1);
            let _ = reader.pause(&done);
        }
    }
    for slot in found.values_mut() {
        if *slot == Some(i64::MIN) {
            *slot = None;
        }
    }
    Ok(())
}

fn dead_letters(client: &BaseConsumer<kafka::Quiet>, topic: &str) -> DeadLetters {
    let mut letters = DeadLetters { topic: topic.to_string(), written: 0, retained: 0, error: None };
    let read = || -> anyhow::Result<(i64, i64)> {
        let (mut written, mut retained) = (0, 0);
        for p in 0..kafka::partition_count(client.client(), topic)? {
            let (start, end) = client
                .fetch_watermarks(topic, p, kafka::METADATA_TIMEOUT)
                .with_context(|| format!("fetching the offsets of {topic}/{p}"))?;
            written += end;
            retained += end - start;
        }
        Ok((written, retained))
    };
    match read() {
        Ok((written, retained)) => (letters.written, letters.retained) = (written, retained),
        Err(e) => letters.error = Some(format!("{e:#}")),
    }
    letters
}
