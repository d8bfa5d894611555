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
//! What a delay record is (its headers, its due time, which tier a wait goes to) is shared with
//! the evaluator, which defers runs over their workflow's limit the same way: see
//! [`kafka::deferral`](crate::kafka::deferral).

use std::{
    collections::{BTreeMap, VecDeque},
    sync::Arc,
    time::Duration,
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

pub use crate::kafka::deferral::FIRST_FAILURE;
pub(crate) use crate::kafka::deferral::{epoch_ms, tier_for, ATTEMPT, DUE, KIND, LAST_ERROR};

/// The backoff after failed attempt `attempt` (1-based): exponential, capped, with up to
/// `jitter` of it taken off at random (`random` in [0, 1)).
pub(crate) fn backoff(retry: &RetryConfig, attempt: i32, random: f64) -> Duration {
    let exponent = (attempt.max(1) - 1).min(64);
    let ms = (retry.initial_backoff.as_millis() as f64 * retry.multiplier.powi(exponent))
        .min(retry.max_backoff.as_millis() as f64);
    Duration::from_millis((ms * (1.0 - retry.jitter * random)) as u64)
}

/// The consumer of one tier: see the module docs.
pub(crate) async fn run_tier(
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
                Err(e) => break Err(kafka::produce_lost(&format!("retry tier {topic}: producing to {main}"), e)),
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
}
