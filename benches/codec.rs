//! Per-record costs around the stages: `cargo bench --bench codec`.
//!
//! - `decode/event/{json,avro}/{1k,6k}`: an event envelope from the wire, as the evaluator decodes
//!   it (`envelope::decode_event`), for a small member event and a large post event of the
//!   benchmark's load;
//! - `partitioner/partition_for_key`: Kafka's murmur2 partition of a tenant key;
//! - `sink_batch/decode_2000` and `sink_batch/encode_2000`: the sink's CPU work per batch before
//!   the round trip: decoding 2,000 results and parsing their times, then encoding the 15 column
//!   arrays as PostgreSQL bind arguments (what `INSERT … SELECT FROM UNNEST` sends).
//!   Engine costs (condition, scope, template) are in `benches/engine.rs`.

use std::{hint::black_box, time::Duration};

use chrono::{DateTime, Utc};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::SeedableRng;
use sqlx::Arguments as _;
use weir::{
    bench::load::{Mix, Shape},
    envelope::{self, ActionResult, Event, Format},
    partitioner,
};

const BATCH: usize = 2_000;

/// Events of the benchmark's load, one near each target size.
fn events() -> Vec<(&'static str, Event)> {
    let mix = Mix::new(1_000).unwrap();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(3);
    let mut picked: Vec<(&'static str, Event)> = Vec::new();
    for seq in 0.. {
        let (_, json) = mix.record(Shape::Events, seq, 1_700_000_000_000_000, &mut rng);
        let label = match json.len() {
            800..=1_200 => "1k",
            5_500..=6_500 => "6k",
            _ => continue,
        };
        if picked.iter().all(|(l, _)| *l != label) {
            picked.push((label, serde_json::from_str(&json).unwrap()));
        }
        if picked.len() == 2 {
            break;
        }
    }
    picked.sort_by_key(|(l, _)| *l);
    picked
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode/event");
    group.warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    for (label, event) in events() {
        for format in [Format::Json, Format::Avro] {
            let bytes = envelope::encode(&event, format).unwrap();
            let content_type = format.content_type().as_bytes();
            assert_eq!(envelope::decode_event(&bytes, Some(content_type), 1 << 20).unwrap(), event);
            group.throughput(Throughput::Bytes(bytes.len() as u64));
            let name = match format {
                Format::Json => "json",
                Format::Avro => "avro",
            };
            group.bench_with_input(BenchmarkId::new(name, label), &bytes, |b, bytes| {
                b.iter(|| envelope::decode_event(black_box(bytes), Some(content_type), 1 << 20).unwrap())
            });
        }
    }
    group.finish();
}

fn partitioner(c: &mut Criterion) {
    let keys: Vec<String> = (1..=1_000).map(Mix::tenant_name).collect();
    let mut group = c.benchmark_group("partitioner");
    group.warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Elements(keys.len() as u64));
    group.bench_function("partition_for_key", |b| {
        b.iter(|| keys.iter().map(|k| partitioner::partition_for_key(black_box(k.as_bytes()), 8)).sum::<i32>())
    });
    group.finish();
}

/// The sink's bind arrays (its `Columns`) for a decoded batch.
#[derive(Default)]
struct Columns {
    text: [Vec<String>; 8],
    workflow_version: Vec<i64>,
    attempts: Vec<i32>,
    latency_ms: Vec<f64>,
    http_status: Vec<Option<i32>>,
    error: Vec<Option<String>>,
    output: Vec<Option<String>>,
    finished_at: Vec<DateTime<Utc>>,
}

fn decode_batch(payloads: &[String]) -> Columns {
    let mut c = Columns::default();
    for p in payloads {
        let r: ActionResult = envelope::decode(p.as_bytes(), Some(envelope::JSON.as_bytes())).unwrap();
        let finished_at = DateTime::parse_from_rfc3339(&r.finished_at).unwrap().with_timezone(&Utc);
        for (column, value) in c.text.iter_mut().zip([
            r.task_id,
            r.run_id,
            r.event_id,
            r.tenant,
            r.workflow_id,
            r.step_id,
            r.service,
            r.status.as_str().to_string(),
        ]) {
            column.push(value);
        }
        c.workflow_version.push(r.workflow_version);
        c.attempts.push(r.attempts);
        c.latency_ms.push(r.latency_ms);
        c.http_status.push(r.http_status);
        c.error.push(r.error);
        c.output.push(r.output.map(|o| o.to_string()));
        c.finished_at.push(finished_at);
    }
    c
}

fn encode_batch(c: &Columns) -> usize {
    let mut args = sqlx::postgres::PgArguments::default();
    for column in &c.text {
        args.add(column).unwrap();
    }
    args.add(&c.workflow_version).unwrap();
    args.add(&c.attempts).unwrap();
    args.add(&c.latency_ms).unwrap();
    args.add(&c.http_status).unwrap();
    args.add(&c.error).unwrap();
    args.add(&c.output).unwrap();
    args.add(&c.finished_at).unwrap();
    args.len()
}

fn sink_batch(c: &mut Criterion) {
    let mix = Mix::new(1_000).unwrap();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
    let payloads: Vec<String> = (0..BATCH as u64)
        .map(|seq| mix.record(Shape::Results, seq, 1_700_000_000_000_000 + seq * 1_000, &mut rng).1)
        .collect();
    let columns = decode_batch(&payloads);
    assert_eq!(encode_batch(&columns), 15);
    let mut group = c.benchmark_group("sink_batch");
    group.warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("decode_2000", |b| b.iter(|| decode_batch(black_box(&payloads))));
    group.bench_function("encode_2000", |b| b.iter(|| encode_batch(black_box(&columns))));
    group.finish();
}

criterion_group!(codec, decode, partitioner, sink_batch);
criterion_main!(codec);
