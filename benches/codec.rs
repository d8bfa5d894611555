//! Per-record costs around the stages: `cargo bench --bench codec`.
//!
//! - `decode/event/{json,avro}/{1k,6k}`: an event envelope from the wire, as the evaluator decodes
//!   it (`envelope::decode_event`), for a small member event and a large post event of the
//!   benchmark's load;
//! - `partitioner/partition_for_key`: Kafka's murmur2 partition of a tenant key;
//! - `sink_batch/decode_2000` and `sink_batch/encode_2000`: the sink's CPU work per batch before
//!   the round trip: decoding 2,000 results and parsing their times, then encoding the 16 column
//!   arrays as PostgreSQL bind arguments (what `INSERT … SELECT FROM UNNEST` sends).
//!   Engine costs (condition, scope, template) are in `benches/engine.rs`.

use std::{hint::black_box, time::Duration};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::SeedableRng;
use sqlx::Arguments as _;
use weir::{
    envelope::{self, Event, Format},
    kafka::partitioner,
    ops::bench::load::{Mix, Shape},
    stages::record::{self, Columns},
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

/// What the sink does per batch before its round trip: decode every result into the columns.
fn decode_batch(payloads: &[String]) -> Columns {
    let mut columns = Columns::default();
    for p in payloads {
        let (result, finished_at) = record::decode_row(p.as_bytes(), Some(envelope::JSON.as_bytes())).unwrap();
        columns.push(result, finished_at);
    }
    columns
}

/// Then encode the columns as the statement's bind arguments.
fn encode_batch(columns: &Columns) -> usize {
    columns.arguments().unwrap().len()
}

fn sink_batch(c: &mut Criterion) {
    let mix = Mix::new(1_000).unwrap();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
    let payloads: Vec<String> = (0..BATCH as u64)
        .map(|seq| mix.record(Shape::Results, seq, 1_700_000_000_000_000 + seq * 1_000, &mut rng).1)
        .collect();
    let columns = decode_batch(&payloads);
    assert_eq!(encode_batch(&columns), record::COLUMNS);
    let mut group = c.benchmark_group("sink_batch");
    group.warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("decode_2000", |b| b.iter(|| decode_batch(black_box(&payloads))));
    group.bench_function("encode_2000", |b| b.iter(|| encode_batch(black_box(&columns))));
    group.finish();
}

criterion_group!(codec, decode, partitioner, sink_batch);
criterion_main!(codec);
