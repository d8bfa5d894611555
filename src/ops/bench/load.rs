//! Ghost-shaped load: the seeds' event mix, tenants with Zipf-skewed volume, payloads of 0.5–10 KB,
//! produced at a fixed rate or flat out from a thread of its own.
//!
//! Every record carries its sequence number and produce time as `"<seq>-<micros>"`: in the
//! [`STAMP`] header, and as the event id (or a result's `event_id`), because the stages do not
//! forward headers but do carry the event id into every task and result. Whoever observes a
//! scenario's output reads it back with [`parse_stamp`].

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use rand::{rngs::SmallRng, Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};
use rdkafka::{
    error::{KafkaError, RDKafkaErrorCode},
    message::{Header, OwnedHeaders},
    producer::{BaseRecord, DefaultProducerContext, Producer as _, ThreadedProducer},
};

use crate::{config::Config, envelope, kafka};

/// Header holding `"<seq>-<produce time in µs since the epoch>"`.
pub(crate) const STAMP: &str = "weir.bench.stamp";

/// Event types and their share of the traffic, after the seeds' Ghost webhooks: opens and clicks
/// dominate, members change often, posts are rare but large.
pub(crate) const EVENT_MIX: [(&str, u32); 8] = [
    ("email.opened", 38),
    ("email.clicked", 14),
    ("member.updated", 18),
    ("member.created", 10),
    ("order.paid", 6),
    ("comment.added", 6),
    ("member.deleted", 4),
    ("post.published", 4),
];

/// Microseconds since the Unix epoch.
pub(crate) fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

pub(crate) fn stamp(seq: u64, produced_us: u64) -> String {
    format!("{seq}-{produced_us}")
}

/// Reads `"<seq>-<micros>"` back; `None` for anything else.
pub(crate) fn parse_stamp(text: &[u8]) -> Option<(u64, u64)> {
    let text = std::str::from_utf8(text).ok()?;
    let (seq, us) = text.split_once('-')?;
    Some((seq.parse().ok()?, us.parse().ok()?))
}

/// Finds the stamp in a JSON record's `"event_id"` without parsing the record.
pub(crate) fn stamp_in_json(payload: &[u8]) -> Option<(u64, u64)> {
    const KEY: &[u8] = b"\"event_id\":\"";
    let start = payload.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let len = payload[start..].iter().position(|&b| b == b'"')?;
    parse_stamp(&payload[start..start + len])
}

/// What the generator puts on the topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// CloudEvents for the events topic.
    Events,
    /// Action results for the results topic (the sink's input).
    Results,
}

/// Pre-built payload bodies, so generating an event costs a few string copies, not a JSON
/// serialization of kilobytes.
pub struct Mix {
    tenants: Zipf<f64>,
    kinds: Vec<&'static str>,
    /// Per kind: bodies of varying size.
    bodies: Vec<Vec<String>>,
}

impl Mix {
    pub fn new(tenants: usize) -> anyhow::Result<Mix> {
        Mix::with_body_bytes(tenants, None)
    }

    /// Like [`Mix::new`], but with every `data` body `body_bytes` long (at least
    /// [`MIN_BODY_BYTES`]) instead of 0.5–10 KB: the backlog scenario's small events, so that
    /// millions of them fit on the disk.
    pub(crate) fn with_body_bytes(tenants: usize, body_bytes: Option<usize>) -> anyhow::Result<Mix> {
        let tenants = tenants.max(1);
        let mut rng = SmallRng::seed_from_u64(6);
        let mut kinds = Vec::new();
        let mut bodies = Vec::new();
        for (kind, weight) in EVENT_MIX {
            kinds.extend(std::iter::repeat_n(kind, weight as usize));
            bodies.push(
                (0..32)
                    .map(|i| match body_bytes {
                        None => body(kind, i, &mut rng),
                        Some(bytes) => small_body(i, bytes),
                    })
                    .collect(),
            );
        }
        Ok(Mix { tenants: Zipf::new(tenants as f64, 1.0).context("Zipf distribution")?, kinds, bodies })
    }

    /// Tenant names: `site-1` is the busiest.
    pub fn tenant_name(rank: usize) -> String {
        format!("site-{rank}")
    }

    /// One record: (key, payload).
    pub fn record(&self, shape: Shape, seq: u64, produced_us: u64, rng: &mut SmallRng) -> (String, String) {
        let tenant = Self::tenant_name(self.tenants.sample(rng) as usize);
        match shape {
            Shape::Events => {
                let payload = self.event_for(&tenant, seq, produced_us, rng);
                (tenant, payload)
            }
            Shape::Results => {
                let id = stamp(seq, produced_us);
                (tenant.clone(), result_json(seq, &id, &tenant, &rfc3339_us(produced_us)))
            }
        }
    }

    /// One event of the mix for `tenant` (the noisy scenario chooses its tenants itself).
    pub(crate) fn event_for(&self, tenant: &str, seq: u64, produced_us: u64, rng: &mut SmallRng) -> String {
        let id = stamp(seq, produced_us);
        let kind = self.kinds[rng.random_range(0..self.kinds.len())];
        let index = EVENT_MIX.iter().position(|(k, _)| *k == kind).unwrap_or(0);
        let variants = &self.bodies[index];
        let data = &variants[rng.random_range(0..variants.len())];
        // What the event is about: one of the tenant's members or posts (an order key, see
        // docs/executor.md).
        let resource = kind.split('.').next().unwrap_or("member");
        let subject = rng.random_range(0..SUBJECTS);
        format!(
            r#"{{"specversion":"1.0","id":"{id}","source":"/ghost/{tenant}","type":"{kind}","tenant":"{tenant}","subject":"{resource}/{subject}","datacontenttype":"application/json","data":{data}}}"#
        )
    }
}

/// Members (or posts) per tenant the events are about, drawn uniformly: a site's busy members
/// see a few events a minute at most.
const SUBJECTS: u64 = 10_000;

/// An action result as the executor writes it, for the sink scenario and its COPY comparison.
pub(crate) fn result_json(seq: u64, event_id: &str, tenant: &str, finished_at: &str) -> String {
    let status = if seq % 20 == 0 { "failed" } else { "succeeded" };
    let (http, error) = if status == "failed" { ("503", r#""HTTP 503: unavailable""#) } else { ("200", "null") };
    format!(
        r#"{{"task_id":"task-{seq}","run_id":"run-{seq}","event_id":"{event_id}","tenant":"{tenant}","workflow_id":"welcome","workflow_version":1,"step_id":"notify","service":"webhook","status":"{status}","attempts":1,"latency_ms":{latency}.5,"http_status":{http},"error":{error},"finished_at":"{finished_at}","output":{{"ok":true,"step":"notify","input":{{"type":"member.created"}}}}}}"#,
        latency = seq % 40,
    )
}

pub(crate) fn rfc3339_us(us: u64) -> String {
    chrono::DateTime::from_timestamp_micros(us as i64)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// A Ghost-like `data` body for `kind`, padded to a size drawn log-uniformly from 0.5–10 KB
/// (post bodies from the upper half: they carry the post's HTML).
fn body(kind: &str, variant: usize, rng: &mut SmallRng) -> String {
    let (low, high): (f64, f64) = if kind == "post.published" { (4_000.0, 10_000.0) } else { (500.0, 10_000.0) };
    let target = (low.ln() + rng.random::<f64>() * (high.ln() - low.ln())).exp() as usize;
    let status = ["paid", "free", "comped"][variant % 3];
    let head = format!(
        r#"{{"member":{{"id":"m-{variant}","email":"reader{variant}@example.com","name":"Reader {variant}","status":"{status}","n":{n},"subscribed":{sub},"labels":[{{"name":"VIP","slug":"vip"}}],"newsletters":[{{"id":"n-1","name":"Weekly digest","status":"active"}}]}},"post":{{"id":"p-{variant}","title":"A post about things {variant}","visibility":"{vis}","url":"https://example.com/p-{variant}/"}},"site":{{"url":"https://example.com","title":"An Example Publication"}},"html":""#,
        n = variant % 7,
        sub = variant % 2 == 0,
        vis = if variant % 4 == 0 { "paid" } else { "public" },
    );
    let mut text = head;
    const FILLER: &str = "<p>Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.</p>";
    while text.len() + 2 < target {
        text.push_str(FILLER);
    }
    text.push_str("\"}");
    text
}

/// Shortest `data` body [`Mix::with_body_bytes`] makes: the fields the bench workflows read.
pub(crate) const MIN_BODY_BYTES: usize = 200;

/// A `data` body of `bytes` bytes holding only what the bench workflows read (member status and
/// email, post visibility and title), padded with HTML.
fn small_body(variant: usize, bytes: usize) -> String {
    let status = ["paid", "free", "comped"][variant % 3];
    let vis = if variant % 4 == 0 { "paid" } else { "public" };
    let mut text = format!(
        r#"{{"member":{{"id":"m-{variant}","email":"reader{variant}@example.com","status":"{status}"}},"post":{{"id":"p-{variant}","title":"A post {variant}","visibility":"{vis}"}},"html":""#
    );
    const FILLER: &str = "<p>Lorem ipsum dolor sit amet.</p>";
    let bytes = bytes.max(MIN_BODY_BYTES);
    while text.len() + 2 < bytes {
        let room = bytes - 2 - text.len();
        text.push_str(&FILLER[..room.min(FILLER.len())]);
    }
    text.push_str("\"}");
    text
}

/// How fast the generator produces.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    PerSecond(u64),
    /// As fast as the scenario drains, keeping at most this many records produced but not yet
    /// observed at the scenario's output (so the stage always has work and memory stays bounded).
    FlatOut {
        max_ahead: u64,
    },
    /// Exactly this many records as fast as the broker takes them, then the generator ends (the
    /// backlog scenario's fill).
    Total(u64),
}

/// Counters shared by the generator and the observer.
#[derive(Default)]
pub struct Progress {
    /// Records handed to the producer.
    pub produced: AtomicU64,
    /// Distinct input records seen at the scenario's output.
    pub observed: AtomicU64,
    /// Stops the generator and observer threads, which read it between records.
    pub stop: tokio_util::sync::CancellationToken,
    /// The generator's first unrecoverable error.
    pub error: std::sync::Mutex<Option<String>>,
}

/// Produces `shape` records to `topic` until `progress.stop`, from a thread named `bench-gen`;
/// at a fixed rate, `head_start` records are due at once.
pub fn spawn(
    config: &Config,
    topic: String,
    shape: Shape,
    mix: Arc<Mix>,
    rate: Rate,
    head_start: u64,
    progress: Arc<Progress>,
) -> anyhow::Result<JoinHandle<()>> {
    let producer: ThreadedProducer<DefaultProducerContext> =
        kafka::producer_config(config).create().context("creating the load generator's producer")?;
    let handle = std::thread::Builder::new().name("bench-gen".into()).spawn(move || {
        let mut rng = SmallRng::seed_from_u64(42);
        let started = Instant::now();
        let mut seq = 0u64;
        while !progress.stop.is_cancelled() {
            let due = match rate {
                Rate::PerSecond(r) => head_start + (started.elapsed().as_secs_f64() * r as f64) as u64,
                Rate::FlatOut { max_ahead } => progress.observed.load(Ordering::Relaxed) + max_ahead,
                Rate::Total(n) if seq >= n => break,
                Rate::Total(n) => n,
            };
            if seq >= due {
                std::thread::sleep(Duration::from_micros(500));
                continue;
            }
            // At most a few milliseconds' worth per pass, so `stop` is seen promptly.
            for _ in 0..(due - seq).min(2_000) {
                let produced_us = now_us();
                let (key, payload) = mix.record(shape, seq, produced_us, &mut rng);
                let stamp = stamp(seq, produced_us);
                let headers = OwnedHeaders::new_with_capacity(2)
                    .insert(Header { key: envelope::CONTENT_TYPE, value: Some(envelope::JSON) })
                    .insert(Header { key: STAMP, value: Some(stamp.as_str()) });
                let record = BaseRecord::to(&topic).key(key.as_str()).payload(payload.as_str()).headers(headers);
                if let Err(e) = send_waiting(&producer, record) {
                    progress.error.lock().expect("error lock").get_or_insert(format!("producing load: {e}"));
                    progress.stop.cancel();
                    return;
                }
                seq += 1;
                progress.produced.store(seq, Ordering::Relaxed);
            }
        }
        if let Err(e) = producer.flush(Duration::from_secs(60)) {
            progress.error.lock().expect("error lock").get_or_insert(format!("flushing the load: {e}"));
        }
    })?;
    Ok(handle)
}

/// Sends `record`, waiting while the producer's queue is full: load is never dropped, it slows
/// down to what the broker takes.
pub(crate) fn send_waiting<K, P>(
    producer: &ThreadedProducer<DefaultProducerContext>,
    mut record: BaseRecord<'_, K, P>,
) -> Result<(), KafkaError>
where
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
{
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_ghost_events_with_a_readable_stamp() {
        let mix = Mix::new(1_000).unwrap();
        let mut rng = SmallRng::seed_from_u64(1);
        let mut sizes = Vec::new();
        let mut tenants = std::collections::HashMap::<String, usize>::new();
        for seq in 0..2_000 {
            let (key, payload) = mix.record(Shape::Events, seq, 1_700_000_000_000_000 + seq, &mut rng);
            let event = envelope::decode_event(payload.as_bytes(), None, 1 << 20).unwrap();
            assert_eq!(event.tenant, key);
            assert_eq!(parse_stamp(event.id.as_bytes()), Some((seq, 1_700_000_000_000_000 + seq)));
            assert!(EVENT_MIX.iter().any(|(k, _)| *k == event.kind), "{}", event.kind);
            sizes.push(payload.len());
            *tenants.entry(key).or_default() += 1;
        }
        assert!(sizes.iter().all(|s| (500..=10_600).contains(s)), "{:?}", sizes.iter().max());
        // Zipf: the busiest tenant has far more than an even share (2 of 2,000).
        assert!(tenants["site-1"] > 100, "{}", tenants["site-1"]);
    }

    #[test]
    fn small_bodies_have_the_asked_size_and_what_the_workflows_read() {
        for bytes in [MIN_BODY_BYTES, 333, 500] {
            let mix = Mix::with_body_bytes(10, Some(bytes)).unwrap();
            for variants in &mix.bodies {
                for body in variants {
                    assert_eq!(body.len(), bytes, "{body}");
                    let data: serde_json::Value = serde_json::from_str(body).unwrap();
                    assert!(data["member"]["status"].is_string() && data["post"]["visibility"].is_string());
                }
            }
        }
    }

    #[test]
    fn results_decode_and_carry_the_stamp() {
        let mix = Mix::new(10).unwrap();
        let mut rng = SmallRng::seed_from_u64(1);
        let (_, payload) = mix.record(Shape::Results, 20, 1_700_000_000_123_456, &mut rng);
        let r: envelope::ActionResult = envelope::decode(payload.as_bytes(), None).unwrap();
        assert_eq!(r.status, envelope::Status::Failed);
        assert_eq!(stamp_in_json(payload.as_bytes()), Some((20, 1_700_000_000_123_456)));
        assert!(chrono::DateTime::parse_from_rfc3339(&r.finished_at).is_ok());
        assert_eq!(parse_stamp(b"garbage"), None);
        assert_eq!(stamp_in_json(b"{}"), None);
    }
}
