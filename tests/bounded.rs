//! Every record weir writes is bounded before it is produced, and bad attributes stop at the
//! boundary (issue 11, items 1, 2 and 6): on the real broker, a 2 MB event, a step input over the
//! record limit, control characters in attributes, limits that cannot work together, and the
//! `weir produce` / `weir dlq show` commands.

mod common;

use std::{sync::Arc, time::Duration};

use common::*;
use rdkafka::{Message as _, Offset, TopicPartitionList};
use serde_json::json;
use weir::{
    config::Config,
    envelope::{ActionResult, ActionTask, Status},
    kafka::{dead_letter, limits, topics},
    ops::{dlq, produce::Producer, receiver::Receiver},
    pipeline::{Pipeline, StageName},
};

const WELCOME: &str =
    "{id: welcome, version: 1, trigger: {type: member.created}, steps: [{id: notify, service: webhook}]}";

/// A step whose input is `data.n` times 100 bytes.
const SIZED: &str = "{id: sized, version: 1, trigger: {type: sized}, steps: [{id: s, service: webhook, \
    input: {x: '{% for a in range(data.n) %}xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx{% endfor %}'}}]}";

fn event_json(id: &str, tenant: &str, kind: &str, data: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&json!({"id": id, "source": "/test", "type": kind, "tenant": tenant, "data": data})).unwrap()
}

/// The config with a producer that sends records up to 3 MB, as a client other than weir may.
fn large_producer_config(config: &Config) -> Config {
    let mut big = config.clone();
    big.kafka.insert("message.max.bytes".into(), "3000000".into());
    big
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2mb_event_is_one_bounded_dead_letter_the_stage_keeps_running_and_redrive_rereads_it() {
    let receiver = Receiver::start().await.unwrap();
    let (config, dir) = test_config(&receiver, &[WELCOME]).await;
    let config = Arc::new(config);
    let pipeline = Pipeline::start(config.clone(), &[StageName::Evaluate, StageName::Execute]).await.unwrap();
    let big_config = large_producer_config(&config);
    let producer = Producer::new(&big_config).unwrap();

    let good =
        |n: usize| event_json(&format!("e-{n}"), &format!("tenant-{}", n % 3), "member.created", json!({"n": n}));
    for n in 0..3 {
        producer.send_raw(format!("tenant-{}", n % 3).as_bytes(), &good(n), "application/json").await.unwrap();
    }
    let filler = "x".repeat(2_000_000 - 200);
    let mut big = event_json("big", "tenant-0", "member.created", json!({"blob": filler}));
    big.resize(2_000_000, b' '); // trailing whitespace is valid JSON: exactly 2,000,000 bytes
    let written = producer.send_raw(b"tenant-0", &big, "application/json").await.unwrap();
    // The stage keeps running: events after the big one, on its partition and others, flow.
    for n in 3..9 {
        producer.send_raw(format!("tenant-{}", n % 3).as_bytes(), &good(n), "application/json").await.unwrap();
    }
    assert!(
        eventually(Duration::from_secs(60), || async { receiver.succeeded() >= 9 }).await,
        "calls {}",
        receiver.succeeded()
    );
    let letters = read_topic(&config.names().topic("dlq"), 1, Duration::from_secs(30));
    assert_eq!(letters.len(), 1, "one dead letter");
    let letter = &letters[0];
    assert!(header(letter, dead_letter::REASON).unwrap().contains("exceeds the limit"));
    assert_eq!(header(letter, dead_letter::PAYLOAD_SIZE), Some("2000000"));
    assert_eq!(header(letter, dead_letter::PAYLOAD_SHA256), Some(limits::sha256_hex(&big).as_str()));
    assert_eq!(header(letter, dead_letter::PAYLOAD_KEPT), Some("65536"));
    assert_eq!(letter.payload().unwrap(), &big[..65_536]);
    assert_eq!(header(letter, dead_letter::ORIGIN_TOPIC), Some(config.names().topic("events").as_str()));
    assert_eq!(header(letter, dead_letter::ORIGIN_OFFSET), Some(written.offset.to_string().as_str()));

    // `weir dlq show` cuts the payload unless --full.
    let file = write_config_file(&config, dir.path());
    let id = format!("{}:{}", letter.partition(), letter.offset());
    let show = weir_command(&file, &["dlq", "show", &id]).output().unwrap();
    let shown = String::from_utf8_lossy(&show.stdout);
    assert!(show.status.success(), "{}", String::from_utf8_lossy(&show.stderr));
    assert!(shown.len() < 10_000 && shown.contains("--full") && shown.contains("first 65536 of 2000000"), "{shown}");
    let full = weir_command(&file, &["dlq", "show", &id, "--full"]).output().unwrap();
    assert!(full.status.success() && full.stdout.len() > 65_536);

    // Redrive re-reads the whole original from its origin: the evaluator meets it again.
    let all = dlq::Filter::default();
    let sent = dlq::redrive(&big_config, &all, false).await.unwrap();
    assert_eq!(sent.sent, 1);
    let events = read_topic(&config.names().topic("events"), 11, Duration::from_secs(30));
    let originals = events.iter().filter(|m| m.payload() == Some(&big[..])).count();
    assert_eq!(originals, 2, "the whole original was produced again");
    let letters = read_topic(&config.names().topic("dlq"), 2, Duration::from_secs(30));
    assert_eq!(letters.len(), 2, "dead-lettered again, bounded again");

    // Once the origin no longer holds it, redrive says so.
    let admin = weir::kafka::admin(&config).unwrap();
    let events_topic = config.names().topic("events");
    let mut gone = TopicPartitionList::new();
    gone.add_partition_offset(&events_topic, written.partition, Offset::End).unwrap();
    admin.delete_records(&gone, &rdkafka::admin::AdminOptions::new()).await.unwrap();
    let err = dlq::redrive(&big_config, &all, false).await.unwrap_err();
    let err = format!("{err:#}");
    assert!(err.contains("no longer retained") && err.contains("first 65536 of 2000000 bytes"), "{err}");
    // A stage that had exited (the evaluator did, on the first 2 MB event) would make stop an error.
    pipeline.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_over_the_record_limit_is_a_failed_result_naming_the_limit() {
    let receiver = Receiver::start().await.unwrap();
    let (mut config, _dir) = test_config(&receiver, &[SIZED]).await;
    config.limits.max_record_bytes = 100_000;
    let config = Arc::new(config);
    let pipeline = Pipeline::start(config.clone(), &[StageName::Evaluate]).await.unwrap();
    let producer = Producer::new(&config).unwrap();
    // 2,000 × 100 bytes renders 200 kB: over the 100 kB record limit. Then a small one.
    for (id, n) in [("over", 2_000), ("under", 3)] {
        producer
            .send_raw(b"tenant-1", &event_json(id, "tenant-1", "sized", json!({"n": n})), "application/json")
            .await
            .unwrap();
    }
    let results: Vec<ActionResult> = read_topic(&config.names().topic("results"), 1, Duration::from_secs(30))
        .iter()
        .map(|m| serde_json::from_slice(m.payload().unwrap()).unwrap())
        .collect();
    assert_eq!(results.len(), 1);
    let failed = &results[0];
    assert_eq!((failed.event_id.as_str(), failed.status), ("over", Status::Failed));
    let error = failed.error.as_deref().unwrap();
    assert!(error.contains("over the limit of 100000 bytes (limits.max_record_bytes)"), "{error}");
    let tasks: Vec<ActionTask> = read_topic(&config.names().topic("actions.webhook"), 1, Duration::from_secs(30))
        .iter()
        .map(|m| serde_json::from_slice(m.payload().unwrap()).unwrap())
        .collect();
    assert_eq!(tasks.len(), 1);
    assert_eq!(tasks[0].event_id, "under", "the stage went on");
    // A stage that had exited would make stop an error.
    pipeline.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_and_long_attributes_are_dead_lettered_with_a_reason() {
    let receiver = Receiver::start().await.unwrap();
    let (config, _dir) = test_config(&receiver, &[WELCOME]).await;
    let config = Arc::new(config);
    let pipeline = Pipeline::start(config.clone(), &[StageName::Evaluate]).await.unwrap();
    let producer = Producer::new(&config).unwrap();
    let long = "t".repeat(600);
    // Valid JSON all: `\u0000` is how JSON writes NUL.
    let bad = [
        (r#"{"id":"e-1","source":"/s","type":"member.created","tenant":"nul\u0000ten"}"#.to_string(), "'tenant'"),
        (r#"{"id":"e-2","source":"/s","type":"member.created","tenant":"cr\r\nlf"}"#.to_string(), "'tenant'"),
        (r#"{"id":"e\u00003","source":"/s","type":"member.created","tenant":"t"}"#.to_string(), "'id'"),
        (r#"{"id":"e\n4","source":"/s","type":"member.created","tenant":"t"}"#.to_string(), "'id'"),
        (format!(r#"{{"id":"e-5","source":"/s","type":"member.created","tenant":"{long}"}}"#), "'tenant' is 600 bytes"),
    ];
    for (payload, _) in &bad {
        producer.send_raw(b"t", payload.as_bytes(), "application/json").await.unwrap();
    }
    producer.send_raw(b"t", &event_json("good", "t", "member.created", json!({})), "application/json").await.unwrap();
    let tasks = read_topic(&config.names().topic("actions.webhook"), 1, Duration::from_secs(30));
    assert_eq!(tasks.len(), 1, "the good event still makes its task");
    let letters = read_topic(&config.names().topic("dlq"), bad.len(), Duration::from_secs(30));
    pipeline.stop().await.unwrap();
    assert_eq!(letters.len(), bad.len());
    for (letter, (payload, names)) in letters.iter().zip(&bad) {
        assert_eq!(letter.payload(), Some(payload.as_bytes()), "kept whole: it fits");
        let reason = header(letter, dead_letter::REASON).unwrap();
        assert!(reason.contains(names), "{reason}");
        assert!(reason.contains("control character") || reason.contains("over the limit of 512"), "{reason}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_that_cannot_work_are_refused_at_start_and_by_topics_apply_naming_both_numbers() {
    let receiver = Receiver::start().await.unwrap();
    let (config, _dir) = test_config(&receiver, &[WELCOME]).await;

    // Our record limit above the producer's.
    let mut over = config.clone();
    over.limits.max_record_bytes = 2_000_000;
    let err = Pipeline::start(Arc::new(over), &[StageName::Evaluate]).await.err().expect("refused");
    let err = format!("{err:#}");
    assert!(err.contains("2000000") && err.contains("1000000") && err.contains("message.max.bytes"), "{err}");

    // A producer that batches more than the topics on the broker accept (their default, 1048588).
    let mut batches = config.clone();
    batches.kafka.insert("message.max.bytes".into(), "2000000".into());
    let err = Pipeline::start(Arc::new(batches), &[StageName::Evaluate]).await.err().expect("refused");
    let err = format!("{err:#}");
    assert!(
        err.contains(&config.names().topic("results")) && err.contains("1048588") && err.contains("2000000"),
        "{err}"
    );

    // A declaration below the producer's limit is refused before anything is applied.
    let topics_dir = tempfile::tempdir().unwrap();
    std::fs::write(
        topics_dir.path().join("t.yaml"),
        "topics:\n  - {name: small, partitions: 1, replication_factor: 1, config: {max.message.bytes: \"500000\"}}\n",
    )
    .unwrap();
    // No services: their topics would be derived from a declared `events` topic this directory lacks.
    let declared = Config { topics_dir: topics_dir.path().into(), services: Default::default(), ..config.clone() };
    let err = format!("{:#}", topics::apply_dir(&declared, false).await.unwrap_err());
    assert!(err.contains(&config.names().topic("small")) && err.contains("500000") && err.contains("1000000"), "{err}");
    let admin = weir::kafka::admin(&config).unwrap();
    let md = admin.inner().fetch_metadata(None, Duration::from_secs(10)).unwrap();
    assert!(md.topics().iter().all(|t| t.name() != config.names().topic("small")), "nothing was created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_produce_names_the_line_the_size_and_the_limit_once() {
    let receiver = Receiver::start().await.unwrap();
    let (config, dir) = test_config(&receiver, &[WELCOME]).await;
    let file = write_config_file(&config, dir.path());
    let input = dir.path().join("events.ndjson");
    let small = String::from_utf8(event_json("ok", "t", "member.created", json!({}))).unwrap();
    let big =
        String::from_utf8(event_json("big", "t", "member.created", json!({"blob": "x".repeat(1_500_000)}))).unwrap();
    std::fs::write(&input, format!("{small}\n{big}\n")).unwrap();
    let out = weir_command(&file, &["produce", "--file", input.to_str().unwrap()]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("line 2: event \"big\" is a 1500") && stderr.contains("-byte record"), "{stderr}");
    assert!(stderr.contains("over the limit of 1000000 bytes (the producer's message.max.bytes)"), "{stderr}");
    assert_eq!(stderr.matches("line 2").count(), 1, "said once: {stderr}");
    assert!(stderr.contains("nothing was produced"), "{stderr}");
    std::fs::write(&input, format!("{small}\n")).unwrap();
    let out = weir_command(&file, &["produce", "--file", input.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        read_topic(&config.names().topic("events"), 2, Duration::from_secs(5)).len(),
        1,
        "only the second run produced"
    );
}
