//! Delay topics: how a task waits without holding its partition.
//!
//! A task that must wait (a retryable failure, or a tenant far over its own limit) is produced to
//! `actions.<service>.retry.<tier>`, the shortest tier whose delay covers the wait, with the time
//! it is due in a header. One consumer per tier reads it and holds each partition paused until its
//! head is due, then produces the record back to the main action topic, where it is executed like
//! any task. The main partition never waits: its offset moves on as soon as the delayed copy is
//! acknowledged. Records of one tier are due at most one tier delay after they were written, so
//! a partition's head is (nearly) the first due.
//!
//! Headers (kept when the record goes back, so the executor knows the history):
//!
//! | header | value |
//! |---|---|
//! | `weir.retry.kind` | `retry` or `deferral` (a deferral does not use up an attempt) |
//! | `weir.retry.due` | milliseconds since the epoch when the task may run again |
//! | `weir.retry.attempt` | the attempt the task comes back for |
//! | `weir.retry.first-failure` | RFC 3339 time of the first failed call |
//! | `weir.retry.last-error` | reason of the last failed call |

use std::{
    collections::{BTreeMap, VecDeque},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::{stream::FuturesUnordered, StreamExt};
use rdkafka::{producer::FutureProducer, Message};

use crate::{
    config::{Config, RetryConfig},
    kafka,
    kafka::source::{Delivery, Source, Ticket},
    shutdown::CancellationToken,
    telemetry::{Event, Stage},
};

pub const KIND: &str = "weir.retry.kind";
pub const DUE: &str = "weir.retry.due";
pub const ATTEMPT: &str = "weir.retry.attempt";
pub const FIRST_FAILURE: &str = "weir.retry.first-failure";
pub const LAST_ERROR: &str = "weir.retry.last-error";

/// Milliseconds since the epoch: due times cross processes, so they are wall-clock times.
pub fn epoch_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// The backoff after failed attempt `attempt` (1-based): exponential, capped, with up to
/// `jitter` of it taken off at random (`random` in [0, 1)).
pub fn backoff(retry: &RetryConfig, attempt: i32, random: f64) -> Duration {
    let exponent = (attempt.max(1) - 1).min(64);
    let ms = (retry.initial_backoff.as_millis() as f64 * retry.multiplier.powi(exponent))
        .min(retry.max_backoff.as_millis() as f64);
    Duration::from_millis((ms * (1.0 - retry.jitter * random)) as u64)
}

/// Index of the shortest tier covering `wait`, else the longest.
pub fn tier_for(tiers: &[Duration], wait: Duration) -> usize {
    tiers.iter().position(|t| t.as_millis() >= wait.as_millis()).unwrap_or(tiers.len().saturating_sub(1))
}

/// The consumer of one tier: see the module docs.
pub async fn run_tier(
    config: Arc<Config>,
    service: String,
    tier: String,
    producer: FutureProducer,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let topic = config.names().retry(&service, &tier);
    let main = config.names().actions(&service);
    let mut source = Source::subscribe(&config, Stage::Execute, &topic, &config.names().retry_group(&service, &tier))?;
    let ownership = source.ownership();
    let mut waiting: BTreeMap<i32, VecDeque<Delivery>> = BTreeMap::new();
    let mut sending = FuturesUnordered::new();
    let result = loop {
        let now = epoch_ms();
        let mut next_due = now + 60_000;
        for (partition, queue) in waiting.iter_mut() {
            while let Some(head) = queue.front() {
                let due = kafka::header_str(&head.message, DUE).and_then(|d| d.parse::<u64>().ok()).unwrap_or(0);
                if due > now {
                    next_due = next_due.min(due);
                    break;
                }
                let d = queue.pop_front().expect("head exists");
                // A revoked partition's records are its new owner's to send.
                if ownership.owns(&d.ticket) {
                    sending.push(forward(producer.clone(), main.clone(), d));
                }
            }
            if queue.is_empty() {
                source.resume_partition(*partition);
            } else {
                source.pause_partition(*partition);
            }
        }
        waiting.retain(|_, q| !q.is_empty());
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            Some((ticket, sent)) = sending.next() => match sent {
                Ok(()) => source.done(&ticket),
                Err(e) => break Err(anyhow::anyhow!("retry tier {topic}: producing to {main} failed: {e}")),
            },
            batch = source.recv() => match batch {
                Some(batch) => for d in batch {
                    waiting.entry(d.ticket.partition).or_default().push_back(d);
                },
                None => break Ok(()),
            },
            _ = tokio::time::sleep(Duration::from_millis(next_due - now)) => {}
        }
    };
    while let Some((ticket, sent)) = sending.next().await {
        if sent.is_ok() {
            source.done(&ticket);
        }
    }
    source.close();
    result
}

async fn forward(
    producer: FutureProducer,
    main: String,
    d: Delivery,
) -> (Ticket, Result<(), rdkafka::error::KafkaError>) {
    let headers = kafka::rewrite_headers(&d.message, |_| false, &[]);
    let payload = d.message.payload().unwrap_or_default();
    let sent = kafka::send(&producer, &main, d.message.key(), payload, headers)
        .await
        .map(|_| Event::Produced { stage: Stage::Execute, topic: &main, count: 1 }.emit());
    (d.ticket, sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters_down() {
        let r = RetryConfig {
            initial_backoff: Duration::from_secs(1),
            multiplier: 2.0,
            max_backoff: Duration::from_secs(5),
            jitter: 0.5,
            ..Default::default()
        };
        assert_eq!(backoff(&r, 1, 0.0), Duration::from_secs(1));
        assert_eq!(backoff(&r, 3, 0.0), Duration::from_secs(4));
        assert_eq!(backoff(&r, 10, 0.0), Duration::from_secs(5));
        assert_eq!(backoff(&r, 2, 0.999_999), Duration::from_millis(1_000));
        assert_eq!(backoff(&r, 1_000, 0.0), Duration::from_secs(5), "no overflow");
    }

    #[test]
    fn the_shortest_covering_tier_is_chosen() {
        let tiers = [1, 10, 60].map(Duration::from_secs);
        assert_eq!(tier_for(&tiers, Duration::from_millis(0)), 0);
        assert_eq!(tier_for(&tiers, Duration::from_millis(1_000)), 0);
        assert_eq!(tier_for(&tiers, Duration::from_millis(1_001)), 1);
        assert_eq!(tier_for(&tiers, Duration::from_secs(3_600)), 2);
    }
}
