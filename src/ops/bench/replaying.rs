//! The replay that runs beside the live load in `weir bench --scenario replay` ([`super::replay`]):
//! the events it re-drives put on the topic before the stages start, and the replay itself started
//! when the phase's window opens. Kept apart from the scenario so that the phase machinery
//! ([`super::noisy`]) can run it without knowing the scenario.
//!
//! `weir bench --scenario replay`: does a replay of a large window slow live traffic down?
//!
//! Two phases of the noisy scenario's machinery ([`super::noisy`]), each on fresh topics,
//! consumer groups and database, with the webhook service limited to [`LIMIT_PER_S`] calls a
//! second (a replay is paced at `replay.share` of a service's limit; live traffic keeps the rest):
//!
//! 1. **live alone**: `--tenants` live tenants send `--rate` events a second together; each
//!    event's p99 from production to its call is the yardstick;
//! 2. **live beside a replay**: the same live load, and when the window opens `weir replay` (the
//!    library call the command makes) re-drives `--events` events put on the events topic before
//!    the stages started (the evaluator's group is moved past them, so only the replay sends
//!    them). The window lasts `--duration` and at least until the replay has sent everything.
//!
//! The report sets the live p99 of the second phase beside the first's (`live_p99_ratio`) and
//! says how long the replay took and at what rate it sent. Replayed events carry ids that are not
//! the load's stamps, so their calls never count as live ones.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use rdkafka::{
    consumer::{BaseConsumer, CommitMode, Consumer as _},
    message::{Header, OwnedHeaders},
    producer::{BaseRecord, DefaultProducerContext, Producer as _, ThreadedProducer},
    Offset, TopicPartitionList,
};
use serde::Serialize;

use super::{load, scenario::SERVICE};
use crate::{
    config::{Config, LimitConfig, Per, Scope},
    envelope, kafka,
    ops::replay,
};

/// The webhook's global limit in both phases: at the default `replay.share` (0.2) a replay sends
/// 1,000 tasks a second, so 100,000 events take about 100 s.
pub const LIMIT_PER_S: u32 = 5_000;
/// The longest a replay may hold the window open.
pub const HOLD_LIMIT: Duration = Duration::from_secs(20 * 60);
/// Tenants the replayed events are spread over.
const REPLAY_TENANTS: u64 = 100;

/// What a phase of this scenario adds to the noisy scenario's: the service's limit, and (in the
/// second phase) the events to replay.
pub(super) struct Replay {
    /// Events put on the topic and replayed; 0 in the live-alone phase.
    pub events: u64,
}

/// The time range the replayed events were produced in.
pub(super) struct Window {
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    events: u64,
}

/// What the replay of a phase did.
#[derive(Debug, Clone, Serialize)]
pub struct Replayed {
    pub events: u64,
    /// Tasks it sent (its tally's calls).
    pub tasks: u64,
    pub seconds: f64,
    pub tasks_per_s: f64,
    pub error: Option<String>,
}

impl Replay {
    /// Limits the service (both phases alike); in the replay phase, puts the events on the
    /// topic and moves the evaluator's group past them. Before the stages start.
    pub(super) async fn prepare(&self, config: &mut Config) -> anyhow::Result<Option<Window>> {
        let service = config.services.get_mut(SERVICE).context("the scenario's service")?;
        service.limits = vec![LimitConfig {
            requests: Some(LIMIT_PER_S),
            cost: None,
            per: Per::Second,
            scope: Scope::Global,
            burst: None,
        }];
        if self.events == 0 {
            return Ok(None);
        }
        let (c, events) = (config.clone(), self.events);
        tokio::task::spawn_blocking(move || backfill(&c, events)).await?.map(Some)
    }
}

/// Produces `events` member.created events, then commits the evaluator's group at the end of
/// every partition.
fn backfill(config: &Config, events: u64) -> anyhow::Result<Window> {
    let producer: ThreadedProducer<DefaultProducerContext> =
        kafka::producer_config(config).create().context("creating the backfill producer")?;
    let topic = config.names().events();
    // Whole milliseconds: record timestamps are, and the range must include the first one.
    let from = Utc::now() - chrono::Duration::milliseconds(1);
    for n in 0..events {
        let tenant = format!("replayed-{}", n % REPLAY_TENANTS);
        let payload = format!(
            r#"{{"specversion":"1.0","id":"replayed-{n}","source":"/ghost/{tenant}","type":"member.created","tenant":"{tenant}","datacontenttype":"application/json","data":{{"n":{n}}}}}"#
        );
        let headers = OwnedHeaders::new_with_capacity(1)
            .insert(Header { key: envelope::CONTENT_TYPE, value: Some(envelope::JSON) });
        let record = BaseRecord::to(&topic).key(tenant.as_str()).payload(payload.as_str()).headers(headers);
        load::send_waiting(&producer, record).map_err(|e| anyhow::anyhow!("producing the events to replay: {e}"))?;
    }
    producer.flush(Duration::from_secs(120)).context("flushing the events to replay")?;
    let to = Utc::now() + chrono::Duration::milliseconds(1);

    let consumer: BaseConsumer =
        kafka::consumer_config(config, &config.names().group("evaluate")).create().context("creating a consumer")?;
    let partitions = kafka::partition_count(consumer.client(), &topic)?;
    let mut ends = TopicPartitionList::new();
    for p in 0..partitions {
        let (_, high) = consumer.fetch_watermarks(&topic, p, kafka::METADATA_TIMEOUT)?;
        ends.add_partition_offset(&topic, p, Offset::Offset(high))?;
    }
    consumer.commit(&ends, CommitMode::Sync).context("moving the evaluator past the events to replay")?;
    Ok(Window { from, to, events })
}

/// Starts the replay of `window` once `opened()` (the phase's window is open); `hold(true)` keeps
/// the window open until the replay has sent everything, then `hold(false)`.
pub(super) fn spawn(
    config: Config,
    window: Window,
    opened: impl Fn() -> bool + Send + 'static,
    hold: impl Fn(bool) + Send + 'static,
) -> tokio::task::JoinHandle<Replayed> {
    hold(true);
    tokio::spawn(async move {
        while !opened() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let started = Instant::now();
        let selection = replay::Selection { from: window.from, to: Some(window.to), ..Default::default() };
        let outcome = replay::start(&config, selection, replay::Options { dry_run: false, progress: false }).await;
        let seconds = started.elapsed().as_secs_f64();
        hold(false);
        let (tasks, error) = match outcome {
            Ok(report) => (report.tally.total().calls, None),
            Err(e) => (0, Some(format!("{e:#}"))),
        };
        Replayed {
            events: window.events,
            tasks,
            seconds,
            tasks_per_s: tasks as f64 / seconds.max(f64::MIN_POSITIVE),
            error,
        }
    })
}
