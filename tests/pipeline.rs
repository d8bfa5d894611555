//! End to end through the real broker and database: produce → evaluate → actions.webhook →
//! execute (a real local HTTP server) → results → sink → PostgreSQL.

mod common;

use std::{collections::HashMap, sync::Arc, time::Duration};

use common::*;
use serde_json::json;
use weir::{
    envelope::{Event, Format},
    kafka::dead_letter,
    kafka::partitioner,
    ops::produce::Producer,
    ops::receiver::Receiver,
    pipeline::{Pipeline, StageName},
};

const WELCOME: &str =
    "{id: welcome, version: 1, trigger: {type: member.created}, steps: [{id: notify, service: webhook}]}";
/// A tenant-specific workflow: only tenant-7's post.published events may trigger it.
const TENANT_7: &str =
    "{id: t7-posts, tenant: tenant-7, trigger: {type: post.published}, steps: [{id: notify, service: webhook}]}";

fn event(n: usize, tenants: usize) -> Event {
    let kinds = ["member.created", "post.published", "email.opened", "member.updated", "email.clicked"];
    serde_json::from_value(json!({
        "id": format!("e-{n}"),
        "source": "/ghost/test",
        "type": kinds[(n / tenants) % kinds.len()],
        "tenant": format!("tenant-{}", n % tenants),
        "data": {"seq": n, "member": {"email": format!("m{n}@example.com")}},
    }))
    .unwrap()
}

fn seq_of(call: &weir::ops::receiver::Call) -> u64 {
    call.body["input"]["event"]["data"]["seq"].as_u64().expect("the task carries the event")
}

async fn result_rows(database_url: &str) -> i64 {
    let pool = sqlx::PgPool::connect(database_url).await.unwrap();
    let n = sqlx::query_scalar("select count(*) from action_results").fetch_one(&pool).await.unwrap_or(0);
    pool.close().await;
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_mixed_events_reach_webhook_and_postgres_once_in_tenant_order() {
    let receiver = Receiver::start().await.unwrap();
    let (config, _dir) = test_config(&receiver, &[WELCOME, TENANT_7]).await;
    let config = Arc::new(config);
    let pipeline = Pipeline::start(config.clone(), &Pipeline::ALL).await.unwrap();

    let (count, tenants) = (10_000, 50);
    let events: Vec<Event> = (0..count).map(|n| event(n, tenants)).collect();
    // Expected tasks, computed from the definitions: every member.created, plus tenant-7's posts.
    let expected = events
        .iter()
        .filter(|e| e.kind == "member.created" || (e.kind == "post.published" && e.tenant == "tenant-7"))
        .count();
    assert!(expected > 2_000, "the load exercises both workflows");
    let formats = [Format::Json, Format::Avro].into_iter().cycle();
    Producer::new(&config).unwrap().send_all(events.into_iter().zip(formats), 2_000).await.unwrap();

    let url = config.database_url.clone();
    let done = eventually(Duration::from_secs(120), || {
        let url = url.clone();
        let calls = receiver.succeeded();
        async move { calls >= expected && result_rows(&url).await >= expected as i64 }
    })
    .await;
    assert!(done, "calls {} rows {} of {expected}", receiver.succeeded(), result_rows(&config.database_url).await);
    // Every result is stored once the sink's offsets reach the end of the results topic.
    let results = config.names().results();
    assert!(
        eventually(Duration::from_secs(30), || async {
            committed_total(&config.names().group("sink"), &results, 8) >= expected as i64
        })
        .await
    );
    pipeline.stop().await.unwrap();

    let calls = receiver.calls();
    assert_eq!(calls.len(), expected, "exactly one call per matching event");
    assert_eq!(result_rows(&config.database_url).await, expected as i64, "exactly one row per matching event");
    let mut keys: Vec<_> = calls.iter().map(|c| c.idempotency_key.clone().expect("Idempotency-Key sent")).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), expected, "one task id per call");
    let mut last_seq: HashMap<String, u64> = HashMap::new();
    for call in &calls {
        let tenant = call.tenant.clone().expect("tenant header sent");
        let seq = seq_of(call);
        assert_eq!(
            format!("tenant-{}", seq as usize % tenants),
            tenant,
            "a task reached the service under its own tenant"
        );
        if let Some(prev) = last_seq.insert(tenant.clone(), seq) {
            assert!(prev < seq, "tenant {tenant}: event {seq} arrived after {prev}");
        }
    }
    assert_eq!(last_seq.len(), tenants, "every tenant had calls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_events_go_to_the_dead_letter_topic_and_the_rest_flow() {
    let receiver = Receiver::start().await.unwrap();
    let (config, _dir) = test_config(&receiver, &[WELCOME]).await;
    let config = Arc::new(config);
    let pipeline = Pipeline::start(config.clone(), &[StageName::Evaluate, StageName::Execute]).await.unwrap();
    let producer = Producer::new(&config).unwrap();
    let bad: [(&[u8], &str); 4] = [
        (b"{not json", "application/json"),
        (b"{\"id\":\"only-an-id\"}", "application/json"),
        (b"\xc3\x01\x00\x01garbage", "application/avro"),
        (b"{}", "text/csv"),
    ];
    let mut good = 0;
    for n in 0..1_100 {
        if n % 11 == 5 {
            let (payload, ct) = bad[n % bad.len()];
            producer.send_raw(format!("tenant-{}", n % 10).as_bytes(), payload, ct).await.unwrap();
        } else {
            // All member.created, so every good event yields a call.
            let mut e = event(n, 10);
            e.kind = "member.created".into();
            producer.send(&e, if n % 2 == 0 { Format::Json } else { Format::Avro }).await.unwrap();
            good += 1;
        }
    }
    assert_eq!(good, 1_000);
    assert!(
        eventually(Duration::from_secs(60), || async { receiver.succeeded() >= good }).await,
        "calls {}",
        receiver.succeeded()
    );
    let dead = read_topic(&config.names().dlq(), 100, Duration::from_secs(30));
    pipeline.stop().await.unwrap();
    assert_eq!(receiver.calls().len(), good);
    assert_eq!(dead.len(), 100, "every malformed event is dead-lettered");
    for m in &dead {
        let reason = header(m, dead_letter::REASON).expect("reason header");
        assert!(
            ["invalid JSON", "invalid Avro", "unsupported content-type", "missing field"]
                .iter()
                .any(|r| reason.contains(r)),
            "{reason}"
        );
        assert_eq!(header(m, dead_letter::ORIGIN_TOPIC), Some(config.names().events().as_str()));
        assert!(header(m, dead_letter::ORIGIN_OFFSET).unwrap().parse::<i64>().is_ok());
        assert_eq!(header(m, dead_letter::STAGE), Some("evaluate"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn librdkafka_places_keys_where_the_java_partitioner_does() {
    let receiver = Receiver::start().await.unwrap();
    let (config, _dir) = test_config(&receiver, &[WELCOME]).await;
    let producer = Producer::new(&config).unwrap();
    for n in 0..200 {
        let tenant = format!("tenant-{n}");
        let written = producer.send_raw(tenant.as_bytes(), b"{}", "application/json").await.unwrap();
        assert_eq!(written.partition, partitioner::partition_for_key(tenant.as_bytes(), 8), "{tenant}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_is_a_clear_error_not_a_hang() {
    let receiver = Receiver::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("w.yaml"), WELCOME).unwrap();
    let mut config =
        weir::config::Config { brokers: "127.0.0.1:1".into(), workflows: dir.path().into(), ..Default::default() };
    config.services.insert(
        "webhook".into(),
        weir::config::ServiceConfig {
            url: receiver.url("hook"),
            timeout: Duration::from_secs(1),
            ..Default::default()
        },
    );
    // The timeout only guards against a hang; the error is expected well before it.
    let outcome =
        tokio::time::timeout(Duration::from_secs(60), Pipeline::start(Arc::new(config), &Pipeline::ALL)).await;
    let err = match outcome.expect("start returned instead of hanging") {
        Ok(_) => panic!("started against a closed port"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("127.0.0.1:1") && err.contains("did not answer"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sink_pauses_while_postgres_is_down_and_commits_nothing_then_resumes() {
    weir::telemetry::prometheus(); // install the recorder before the stage counts anything
    let receiver = Receiver::start().await.unwrap();
    let (mut config, _dir) = test_config(&receiver, &[WELCOME]).await;
    let proxy = CuttableProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let direct_url = config.database_url.clone();
    config.database_url = direct_url.replace("127.0.0.1:5432", &proxy.addr.to_string());
    let config = Arc::new(config);
    let pipeline = Pipeline::start(config.clone(), &[StageName::Sink]).await.unwrap();
    let results = Producer::for_topic(&config, &config.names().results()).unwrap();
    let send = |range: std::ops::Range<usize>| {
        let results = results.clone();
        async move {
            for n in range {
                let r = json!({"task_id": format!("task-{n}"), "run_id": "r", "event_id": format!("e-{n}"), "tenant": format!("tenant-{}", n % 5),
                    "workflow_id": "w", "workflow_version": 1, "step_id": "s", "service": "webhook", "status": "succeeded",
                    "attempts": 1, "latency_ms": 1.0, "finished_at": "2026-11-23T10:00:00Z"});
                results
                    .send_raw(format!("tenant-{}", n % 5).as_bytes(), r.to_string().as_bytes(), "application/json")
                    .await
                    .unwrap();
            }
        }
    };
    let (group, topic) = (config.names().group("sink"), config.names().results());

    send(0..100).await;
    assert!(eventually(Duration::from_secs(30), || async { result_rows(&direct_url).await == 100 }).await);
    assert!(eventually(Duration::from_secs(30), || async { committed_total(&group, &topic, 8) == 100 }).await);

    proxy.set_up(false);
    send(100..200).await;
    // The sink has read the new results and fails to write them, round after round of retries.
    let before = sink_database_failures();
    assert!(
        eventually(Duration::from_secs(30), || async { sink_database_failures() >= before + 3.0 }).await,
        "the sink reported the database as down"
    );
    assert_eq!(result_rows(&direct_url).await, 100);
    assert_eq!(committed_total(&group, &topic, 8), 100, "no offset committed while the database is down");

    proxy.set_up(true);
    assert!(eventually(Duration::from_secs(60), || async { result_rows(&direct_url).await == 200 }).await, "resumed");
    assert!(eventually(Duration::from_secs(30), || async { committed_total(&group, &topic, 8) == 200 }).await);
    pipeline.stop().await.unwrap();
}

/// `weir_failed_total{stage="sink",reason="database"}` as the Prometheus endpoint renders it.
fn sink_database_failures() -> f64 {
    weir::telemetry::prometheus()
        .render()
        .lines()
        .filter(|l| {
            l.starts_with("weir_failed_total") && l.contains("stage=\"sink\"") && l.contains("reason=\"database\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
