//! The ingest scenario: events over HTTP into the ingest stage beside `weir produce` into the
//! same broker, in the same run.
//!
//! On fresh topics, three phases of `--duration` each, each with the same number of concurrent
//! senders ([`CONNECTIONS`]), each sender sending one event after the other and waiting for its
//! acknowledgement (a sender that keeps its order):
//!
//! 1. `produce`: the Rust producer `weir produce` uses (`ops::produce::Producer::send`, one
//!    event, acknowledged by the broker): the baseline;
//! 2. `ingest`: one structured CloudEvent per HTTP/1.1 request on keep-alive connections to the
//!    ingest stage (in this process), answered 202 once the broker acknowledged it;
//! 3. `ingest-batch`: CloudEvents batches of [`BATCH`] events per request.
//!
//! Reported: events per second and the acknowledgement latency of each (from sending to the
//! acknowledgement, or the 202), and ingest's throughput as a share of produce's. A non-202
//! answer fails the scenario.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use futures::future::BoxFuture;
use serde_json::json;

use super::{
    measure::{self, CpuSample, Latency},
    report::ScenarioReport,
    scenario::Setting,
    Options, Scenario,
};
use crate::{
    config::Config,
    envelope::{Event, Format},
    ops::{
        post::{Mode, Poster},
        produce::Producer,
    },
    shutdown::CancellationToken,
};

/// Senders at once: HTTP connections, or sends awaited at once.
pub const CONNECTIONS: usize = 64;
/// Events per request in the batch phase.
pub const BATCH: usize = 50;
/// Unmeasured time at the start of each phase (connections opened, producer warmed).
const WARM_UP: Duration = Duration::from_secs(2);
/// Tenants with a token of their own, at most.
const MAX_TENANTS: usize = 1_000;

/// One send: from a sender's number and its count, the events it acknowledged.
type Sender = Arc<dyn Fn(usize, u64) -> BoxFuture<'static, anyhow::Result<usize>> + Send + Sync>;

/// What one phase measured.
struct Phase {
    events_per_s: f64,
    events: u64,
    latency: Latency,
}

impl Phase {
    fn json(&self) -> serde_json::Value {
        json!({"events_per_s": self.events_per_s.round(), "events": self.events,
            "ack_p50_ms": self.latency.p50, "ack_p99_ms": self.latency.p99, "ack_max_ms": self.latency.max})
    }
}

fn token(tenant: usize) -> String {
    format!("bench-token-{tenant:04}-0123456789")
}

fn event(tenant: usize, seq: u64) -> Event {
    Event {
        specversion: "1.0".into(),
        id: format!("b-{tenant}-{seq}"),
        source: "/bench".into(),
        kind: "member.created".into(),
        time: None,
        tenant: format!("tenant-{tenant}"),
        subject: None,
        datacontenttype: Some("application/json".into()),
        data: json!({"seq": seq, "member": {"email": format!("m{seq}@example.com")}}),
    }
}

pub async fn run(base: &Config, options: &Options) -> anyhow::Result<ScenarioReport> {
    let setting = Setting::new(base, "ingest", false).await?;
    let outcome = tokio::select! {
        outcome = phases(&setting.config, options) => outcome,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    setting.clean_up().await;
    outcome
}

async fn phases(config: &Config, options: &Options) -> anyhow::Result<ScenarioReport> {
    crate::kafka::topics::apply_dir(config, false).await.context("creating the scenario's topics")?;
    let tenants = options.tenants.clamp(1, MAX_TENANTS);
    let mut config = config.clone();
    config.ingest.listen = ([127, 0, 0, 1], 0).into();
    config.ingest.max_lag = None;
    config.ingest.max_in_flight = CONNECTIONS * 2;
    let credentials: serde_json::Map<String, serde_json::Value> =
        (0..tenants).map(|t| (format!("tenant-{t}"), json!({"token": token(t)}))).collect();
    config.ingest.sources =
        serde_json::from_value(json!({"bench": {"format": "cloudevents", "tenants": credentials}}))?;
    config.validate()?;
    let config = Arc::new(config);
    let cpu_before = CpuSample::now();
    measure::reset_peak_rss();

    let producer = Producer::new(&config)?;
    let produce: Sender = Arc::new(move |sender, n| {
        let producer = producer.clone();
        Box::pin(async move {
            producer.send(&event(sender % tenants, n), Format::Json).await?;
            Ok(1)
        })
    });
    let produce = phase(options.duration, produce).await.context("phase produce")?;

    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let (addr, _) = crate::stages::ingest::start(config.clone(), stop).await?;
    let poster = Poster::new(addr);
    let post = |batch: bool| -> Sender {
        let poster = poster.clone();
        Arc::new(move |sender, n| {
            let poster = poster.clone();
            Box::pin(async move {
                let tenant = sender % tenants;
                let (answer, events) = if batch {
                    let events: Vec<Event> = (0..BATCH as u64).map(|i| event(tenant, n * BATCH as u64 + i)).collect();
                    (poster.batch("bench", &token(tenant), &events).await?, BATCH)
                } else {
                    (poster.cloudevent("bench", &token(tenant), &event(tenant, n), Mode::Structured).await?, 1)
                };
                if answer.status() != 202 {
                    bail!("the ingest stage answered {}: {}", answer.status(), answer.text().await.unwrap_or_default());
                }
                Ok(events)
            })
        })
    };
    let ingest = phase(options.duration, post(false)).await.context("phase ingest")?;
    let batch = phase(options.duration, post(true)).await.context("phase ingest-batch")?;

    let cpu = CpuSample::now().since(&cpu_before);
    let mut report = ScenarioReport::new(Scenario::Ingest, cpu, measure::peak_rss_mb());
    report.duration_s = options.duration.as_secs_f64();
    report.events = ingest.events;
    report.outputs = ingest.events;
    report.throughput = ingest.events_per_s;
    report.latency_ms = ingest.latency.clone();
    report.extra.insert("connections".into(), json!(CONNECTIONS));
    report.extra.insert("tenants".into(), json!(tenants));
    report.extra.insert("produce".into(), produce.json());
    report.extra.insert("ingest".into(), ingest.json());
    report.extra.insert(format!("ingest_batch_{BATCH}"), batch.json());
    let share = |p: &Phase| if produce.events_per_s > 0.0 { p.events_per_s / produce.events_per_s } else { 0.0 };
    report.extra.insert("ingest_over_produce".into(), json!((share(&ingest) * 1000.0).round() / 1000.0));
    report.extra.insert("ingest_batch_over_produce".into(), json!((share(&batch) * 1000.0).round() / 1000.0));
    Ok(report)
}

/// Runs [`CONNECTIONS`] senders for the warm-up and `duration`, measuring the latter.
async fn phase(duration: Duration, send: Sender) -> anyhow::Result<Phase> {
    let measuring = Arc::new(AtomicBool::new(false));
    let running = Arc::new(AtomicBool::new(true));
    let events = Arc::new(AtomicU64::new(0));
    let histogram = Arc::new(Mutex::new(measure::histogram(3)));
    let senders: Vec<_> = (0..CONNECTIONS)
        .map(|sender| {
            let (send, measuring, running, events, histogram) =
                (send.clone(), measuring.clone(), running.clone(), events.clone(), histogram.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while running.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let acknowledged = send(sender, n).await?;
                    n += 1;
                    if measuring.load(Ordering::Relaxed) {
                        let us = started.elapsed().as_micros().max(1) as u64;
                        let _ = histogram.lock().expect("histogram lock").record(us);
                        events.fetch_add(acknowledged as u64, Ordering::Relaxed);
                    }
                }
                anyhow::Ok(())
            })
        })
        .collect();
    tokio::time::sleep(WARM_UP).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed();
    running.store(false, Ordering::Relaxed);
    for s in senders {
        s.await.context("a sender panicked")??;
    }
    let events = events.load(Ordering::Relaxed);
    let latency = Latency::of(&histogram.lock().expect("histogram lock"));
    Ok(Phase { events_per_s: events as f64 / elapsed.as_secs_f64(), events, latency })
}
