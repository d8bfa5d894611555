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
//! ## A record due beyond its tier's delay
//!
//! Not every record is: a run the evaluator deferred further ahead than the longest tier (a tenant
//! far over its `runs_per_minute`) goes to the longest tier all the same. Waiting for it at the
//! head would hold every record behind it (other tenants' retries) until it is due. So a head not
//! due within the tier's delay ([`decide`]) is *re-queued*: produced again, key, payload and
//! headers unchanged, to the tail of the same partition, with `weir.retry.requeues` counted up and
//! `weir.retry.requeued-from` naming the offset it was copied from, and the partition moves on.
//! It is only re-queued when a record behind it can move (is due within the delay, of another
//! tenant): with nothing to let through it stays at the head and the partition is read on, so two
//! far records do not chase each other round the partition; so is it when the partition holds
//! [`MAX_HELD`] records behind it, and then it waits as before (memory is bounded; a log line
//! says so).
//!
//! A tenant's records keep their order: once a record of a tenant is re-queued, the tenant's
//! later records in that partition are re-queued behind it, until the copy comes back to the
//! head (it is recognised by `weir.retry.requeued-from`). A record re-queued [`MAX_REQUEUES`]
//! times is dead-lettered with the reason: a due time that far out is a fault, not a wait.
//! Counted in `weir_delay_requeued_total{service,tier}`.
//!
//! What a delay record is (its headers, its due time, which tier a wait goes to) is shared with
//! the evaluator, which defers runs over their workflow's limit the same way: see
//! [`kafka::deferral`](crate::kafka::deferral).

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    sync::Arc,
    time::Duration,
};

use futures::{stream::FuturesUnordered, FutureExt, StreamExt};
use rdkafka::{message::OwnedMessage, producer::FutureProducer, Message};

use crate::{
    config::{Config, Priority, RetryConfig},
    kafka,
    kafka::dead_letter::DeadLetters,
    kafka::deferral,
    kafka::source::{Delivery, Source, Ticket},
    shutdown::CancellationToken,
    telemetry::{Event, Stage},
};

pub use crate::kafka::deferral::FIRST_FAILURE;
pub(crate) use crate::kafka::deferral::{epoch_ms, tier_for, ATTEMPT, DUE, KIND, LAST_ERROR};

/// How often a record was re-queued to its tier's tail (see the module docs).
pub const REQUEUES: &str = "weir.retry.requeues";
/// The offset, in the same tier partition, of the record a re-queued record is a copy of.
pub const REQUEUED_FROM: &str = "weir.retry.requeued-from";

/// Re-queues of one record before it is dead-lettered. A record comes round once per pass of the
/// records behind it, each of which waits up to the tier's delay: a thousand passes is days.
pub const MAX_REQUEUES: u32 = 1_000;

/// Records a tier partition holds in memory behind a head that is not due within the tier's
/// delay and cannot be re-queued usefully; past it the partition is paused.
pub const MAX_HELD: usize = 10 * crate::kafka::source::BATCH;

/// What the tier consumer does with the record at the head of a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Head {
    /// Due: back to the action topic.
    Send,
    /// Due within the tier's delay: the partition waits (paused) until then.
    Wait { due: u64 },
    /// To the tail of the partition: not due within the tier's delay, with a record behind it
    /// that can move, or behind a copy of its tenant's re-queued earlier.
    Requeue,
    /// Not due within the tier's delay, and nothing behind it to let through: it stays at the
    /// head and the partition is read on, until `within` (when it is due within the delay).
    Hold { within: u64 },
    /// Re-queued [`MAX_REQUEUES`] times already.
    GiveUp,
}

/// What is known of a head record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HeadRecord {
    pub due: u64,
    pub requeues: u32,
    /// Its tenant has re-queued records out in the partition and this is not one of them: it
    /// goes behind them.
    pub behind_requeued: bool,
}

/// The decision for `head` at `now` on a tier of `delay_ms`; `movable_behind` tells whether a
/// record behind it would move if it went (asked only when that matters).
pub(crate) fn decide(head: HeadRecord, now: u64, delay_ms: u64, movable_behind: impl FnOnce() -> bool) -> Head {
    let far = head.due > now.saturating_add(delay_ms);
    if (head.behind_requeued || far) && head.requeues >= MAX_REQUEUES {
        return Head::GiveUp;
    }
    if head.behind_requeued {
        return Head::Requeue;
    }
    if head.due <= now {
        return Head::Send;
    }
    if !far {
        return Head::Wait { due: head.due };
    }
    if movable_behind() {
        Head::Requeue
    } else {
        Head::Hold { within: head.due - delay_ms }
    }
}

/// One tier partition's records read and not yet moved on, and per tenant (record key) the
/// offsets of its records re-queued and not yet back at the head.
struct Waiting<T = Delivery> {
    queue: VecDeque<T>,
    requeued: HashMap<Vec<u8>, HashSet<i64>>,
    /// The queue's length and the time of the last look behind a held head that found nothing
    /// to move: what was behind it then is looked at again only a second later, so a head held
    /// in front of many records costs a scan of what arrived since, not of everything each turn.
    looked: (usize, u64),
    /// Paused with [`MAX_HELD`] records behind a held head (said once).
    full: bool,
}

impl<T> Default for Waiting<T> {
    fn default() -> Self {
        Waiting { queue: VecDeque::new(), requeued: HashMap::new(), looked: (0, 0), full: false }
    }
}

/// How long a look behind a held head stays good for the records it saw (their due times move
/// into the tier's delay as time passes).
const LOOK_AGAIN_MS: u64 = 1_000;

/// What [`Waiting`] reads of a record (tests keep bare messages).
trait Record {
    fn message(&self) -> &OwnedMessage;
}

impl Record for Delivery {
    fn message(&self) -> &OwnedMessage {
        &self.message
    }
}

impl Record for OwnedMessage {
    fn message(&self) -> &OwnedMessage {
        self
    }
}

impl<T: Record> Waiting<T> {
    /// The head as [`decide`] sees it; a copy of a record re-queued here is now back at the head.
    fn head(&mut self) -> Option<HeadRecord> {
        let head = self.queue.front()?.message();
        let key = head.key().unwrap_or_default();
        let number = |name| kafka::header_str(head, name).and_then(|v| v.parse::<u64>().ok());
        let copy_of = number(REQUEUED_FROM);
        if let (Some(offset), Some(out)) = (copy_of, self.requeued.get_mut(key)) {
            out.remove(&(offset as i64));
            if out.is_empty() {
                self.requeued.remove(key);
            }
        }
        let record = HeadRecord {
            due: number(DUE).unwrap_or(0),
            requeues: number(REQUEUES).map_or(0, |n| n.min(u32::MAX as u64) as u32),
            behind_requeued: copy_of.is_none() && self.requeued.contains_key(key),
        };
        Some(record)
    }

    /// Whether a record behind the head, of another tenant with nothing re-queued, is due within
    /// `delay_ms` (only records that arrived since the last look, unless it is a second old).
    fn movable_behind(&mut self, now: u64, delay_ms: u64) -> bool {
        let (seen, at) = self.looked;
        let from = if now >= at + LOOK_AGAIN_MS || seen > self.queue.len() { 1 } else { seen.max(1) };
        self.looked = (self.queue.len(), if from == 1 { now } else { at });
        let Some(head) = self.queue.front() else { return false };
        let key = head.message().key().unwrap_or_default();
        self.queue.iter().skip(from).any(|d| {
            let k = d.message().key().unwrap_or_default();
            let due = kafka::header_str(d.message(), DUE).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            k != key && !self.requeued.contains_key(k) && due <= now.saturating_add(delay_ms)
        })
    }
}

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
    // Every priority's tasks wait in the same tiers; each goes back to its own action topic.
    let mains = Priority::ALL.map(|p| config.names().actions_at(&service, p));
    let retry = config.services.get(&service).map(|s| s.retry.clone()).unwrap_or_default();
    let delay_ms = retry
        .tier_names()
        .iter()
        .zip(&retry.tiers)
        .find(|(name, _)| **name == tier)
        .map_or(0, |(_, d)| d.as_millis() as u64);
    let dead_letters =
        DeadLetters::new(producer.clone(), config.names().dlq(), Stage::Execute).with_limits(&config.limits);
    let mut source = Source::subscribe(&config, Stage::Execute, &topic, &config.names().retry_group(&service, &tier))?;
    let ownership = source.ownership();
    let mut assignment = source.assignment();
    let mut waiting: BTreeMap<i32, Waiting> = BTreeMap::new();
    let mut sending = FuturesUnordered::new();
    let result = loop {
        let now = epoch_ms();
        let mut next_due = now + 60_000;
        let mut failed = None;
        for (partition, part) in waiting.iter_mut() {
            // Read on unless the head waits for its due time (or too much is held behind it).
            let mut read_on = true;
            while let Some(record) = part.head() {
                let decision = decide(record, now, delay_ms, || part.movable_behind(now, delay_ms));
                match decision {
                    Head::Wait { due } => {
                        next_due = next_due.min(due);
                        read_on = false;
                        break;
                    }
                    Head::Hold { within } => {
                        next_due = next_due.min(within);
                        read_on = part.queue.len() < MAX_HELD;
                        if !read_on && !part.full {
                            let detail = format!(
                                "{topic}/{partition}: {MAX_HELD} records held behind a head due at {} ms since the \
                                 epoch, none due within the tier's delay; the partition waits for it",
                                record.due
                            );
                            Event::Failed {
                                stage: Stage::Execute,
                                reason: "delay-held",
                                retryable: true,
                                detail: &detail,
                            }
                            .emit();
                        }
                        part.full = !read_on;
                        break;
                    }
                    Head::Send | Head::Requeue | Head::GiveUp => {}
                }
                let d = part.queue.pop_front().expect("head exists");
                part.looked = (0, 0);
                // A revoked partition's records are its new owner's to send.
                if !ownership.owns(&d.ticket) {
                    continue;
                }
                match decision {
                    Head::Send => {
                        let main = mains[deferral::priority_of(&d.message).index()].clone();
                        sending.push(forward(producer.clone(), main, d).boxed())
                    }
                    Head::Requeue => match requeue(&producer, &topic, d, record.requeues) {
                        Ok((key, offset, sent)) => {
                            part.requeued.entry(key).or_default().insert(offset);
                            Event::Requeued { service: &service, tier: &tier }.emit();
                            sending.push(sent.boxed());
                        }
                        Err(e) => {
                            failed = Some(anyhow::anyhow!("retry tier {topic}: re-queuing to {topic} failed: {e}"));
                            break;
                        }
                    },
                    _ => {
                        let reason = format!(
                            "re-queued {} times on delay tier {topic} (the limit; due at {} ms since the epoch, the tier's \
                             delay is {delay_ms} ms)",
                            record.requeues, record.due
                        );
                        Event::Failed { stage: Stage::Execute, reason: "requeue", retryable: false, detail: &reason }
                            .emit();
                        let dead_letters = dead_letters.clone();
                        sending.push(
                            async move {
                                let sent = dead_letters.send(&d.message, &reason).await;
                                (d.ticket, sent)
                            }
                            .boxed(),
                        );
                    }
                }
            }
            if read_on {
                source.resume_partition(*partition);
            } else {
                source.pause_partition(*partition);
            }
            if failed.is_some() {
                break;
            }
        }
        if let Some(e) = failed {
            break Err(e);
        }
        waiting.retain(|_, w| !w.queue.is_empty() || !w.requeued.is_empty());
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            Some((ticket, sent)) = sending.next() => match sent {
                Ok(()) => source.done(&ticket),
                Err(e) => break Err(kafka::produce_lost(&format!("retry tier {topic}: producing back to the action topics of {service}"), e)),
            },
            Ok(()) = assignment.changed() => {
                // A partition may have been read by another member meanwhile, which took the
                // copies re-queued here: waiting for them to come back could last for ever. So the
                // bookkeeping starts afresh; a tenant's copy still out may then be overtaken by
                // its later record (only around a rebalance).
                let owned = assignment.borrow_and_update().owned.clone();
                waiting.retain(|p, _| owned.contains(p));
                waiting.values_mut().for_each(|w| w.requeued.clear());
            }
            batch = source.recv() => match batch {
                Some(batch) => for d in batch {
                    waiting.entry(d.ticket.partition).or_default().queue.push_back(d);
                },
                None => break Ok(()),
            },
            _ = tokio::time::sleep(Duration::from_millis(next_due.saturating_sub(now))) => {}
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

/// Hands `d` to the producer for the tail of its own partition, its re-queue counted; returns
/// its key, its offset (which the copy names) and the wait for the acknowledgement. A failure that
/// may pass (a broker restart) is tried again like any send.
#[allow(clippy::type_complexity)]
fn requeue(
    producer: &FutureProducer,
    topic: &str,
    d: Delivery,
    requeues: u32,
) -> Result<
    (Vec<u8>, i64, impl std::future::Future<Output = (Ticket, Result<(), rdkafka::error::KafkaError>)>),
    rdkafka::error::KafkaError,
> {
    let (count, from) = ((requeues + 1).to_string(), d.ticket.offset.to_string());
    let headers = move |m: &OwnedMessage| {
        kafka::rewrite_headers(
            m,
            |k| k == REQUEUES || k == REQUEUED_FROM,
            &[(REQUEUES, &count), (REQUEUED_FROM, &from)],
        )
    };
    let key = d.message.key().unwrap_or_default().to_vec();
    let payload = d.message.payload().unwrap_or_default();
    let acknowledged =
        kafka::enqueue(producer, topic, d.ticket.partition, d.message.key(), payload, headers(&d.message))?;
    let (ticket, offset) = (d.ticket, d.ticket.offset);
    let (producer, topic) = (producer.clone(), topic.to_string());
    Ok((key, offset, async move {
        let sent = match acknowledged.await {
            Err(e) if kafka::may_pass(&producer, &e) => {
                let (key, payload) = (d.message.key(), d.message.payload().unwrap_or_default());
                kafka::send_to(&producer, &topic, Some(ticket.partition), key, payload, headers(&d.message))
                    .await
                    .map(drop)
            }
            sent => sent,
        };
        (ticket, sent)
    }))
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

    fn head(due: u64, requeues: u32, behind_requeued: bool) -> HeadRecord {
        HeadRecord { due, requeues, behind_requeued }
    }

    #[test]
    fn a_head_beyond_the_tiers_delay_is_requeued_only_to_let_someone_through() {
        let (now, delay) = (1_000_000, 600_000);
        let never = || panic!("only a far head asks what is behind it");
        assert_eq!(decide(head(now, 0, false), now, delay, never), Head::Send);
        assert_eq!(decide(head(0, 0, false), now, delay, never), Head::Send, "no due time: due");
        assert_eq!(decide(head(now + delay, 0, false), now, delay, never), Head::Wait { due: now + delay });
        let far = now + delay + 1;
        assert_eq!(decide(head(far, 0, false), now, delay, || true), Head::Requeue);
        assert_eq!(decide(head(far, 0, false), now, delay, || false), Head::Hold { within: now + 1 });
        // A tenant's record behind its re-queued one follows it, due or not.
        assert_eq!(decide(head(now, 0, true), now, delay, never), Head::Requeue);
        // Bounded: past MAX_REQUEUES a far record is dead-lettered, a due one still goes.
        assert_eq!(decide(head(far, MAX_REQUEUES, false), now, delay, || true), Head::GiveUp);
        assert_eq!(decide(head(far, MAX_REQUEUES - 1, false), now, delay, || true), Head::Requeue);
        assert_eq!(decide(head(now, MAX_REQUEUES, true), now, delay, never), Head::GiveUp);
        assert_eq!(decide(head(now, MAX_REQUEUES, false), now, delay, never), Head::Send);
    }

    fn delivery(key: &str, offset: i64, due: u64, requeued_from: Option<i64>) -> OwnedMessage {
        use rdkafka::message::{Header, OwnedHeaders};
        let due = due.to_string();
        let mut headers = OwnedHeaders::new().insert(Header { key: DUE, value: Some(due.as_str()) });
        let from = requeued_from.map(|o| o.to_string());
        if let Some(from) = &from {
            headers = headers.insert(Header { key: REQUEUED_FROM, value: Some(from.as_str()) });
        }
        let (payload, key) = (None, Some(key.as_bytes().to_vec()));
        OwnedMessage::new(payload, key, "t".into(), rdkafka::Timestamp::NotAvailable, 0, offset, Some(headers))
    }

    #[test]
    fn a_tenants_later_records_go_behind_its_requeued_one_until_it_is_back_at_the_head() {
        let (now, delay) = (1_000_000, 1_000);
        let mut w: Waiting<OwnedMessage> = Waiting::default();
        for d in [delivery("a", 0, now + 5_000, None), delivery("b", 1, now, None), delivery("a", 2, now, None)] {
            w.queue.push_back(d);
        }
        assert!(w.movable_behind(now, delay), "b is due");
        assert_eq!(w.head().map(|h| h.behind_requeued), Some(false));
        // a's far record is re-queued (as the loop does).
        w.queue.pop_front();
        w.requeued.entry(b"a".to_vec()).or_default().insert(0);
        assert!(!w.head().unwrap().behind_requeued, "b has nothing re-queued");
        w.queue.pop_front();
        assert!(w.head().unwrap().behind_requeued, "a's due record goes behind its re-queued one");
        assert!(!w.movable_behind(now, delay));
        w.queue.pop_front();
        w.requeued.get_mut(&b"a"[..]).unwrap().insert(2);
        // The copies come back: the first is decided on its own; a's record behind it still follows.
        w.queue.push_back(delivery("a", 3, now + 5_000, Some(0)));
        w.queue.push_back(delivery("a", 4, now, Some(2)));
        assert!(!w.head().unwrap().behind_requeued, "a copy back at the head is decided on its own");
        assert_eq!(w.requeued[&b"a"[..]].len(), 1);
        w.queue.pop_front();
        assert!(!w.head().unwrap().behind_requeued);
        assert!(w.requeued.is_empty(), "every copy back: a is no longer re-queuing");
        // A copy made by a partition's previous owner is decided on its own too.
        w.queue.pop_front();
        w.queue.push_back(delivery("c", 5, now, Some(99)));
        assert!(!w.head().unwrap().behind_requeued);
    }
}
