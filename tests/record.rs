//! The record stage through the real broker and database: results in, rows out, runs advanced;
//! rows PostgreSQL refuses isolated and dead-lettered; an unreachable database named.

mod common;

use std::{sync::Arc, time::Duration};

use common::*;
use serde_json::{json, Value};
use weir::{
    envelope::{Event, Format},
    kafka::dead_letter,
    ops::produce::Producer,
    ops::receiver::Receiver,
    pipeline::{Pipeline, StageName},
    stages::record,
};

fn result(n: usize, tenants: usize, cost: Option<u64>) -> Value {
    let mut r = json!({"task_id": format!("task-{n}"), "run_id": format!("run-{n}"), "event_id": format!("e-{n}"),
        "tenant": format!("tenant-{}", n % tenants), "workflow_id": "w", "workflow_version": 1, "step_id": "s",
        "service": "webhook", "status": "succeeded", "attempts": 1, "latency_ms": 1.0,
        "finished_at": "2026-11-23T10:00:00Z"});
    if let Some(c) = cost {
        r["cost"] = json!(c);
    }
    r
}

async fn send(results: &Producer, r: &Value) {
    results
        .send_raw(r["tenant"].as_str().unwrap().as_bytes(), r.to_string().as_bytes(), "application/json")
        .await
        .unwrap();
}

async fn query<T>(url: &str, sql: &str) -> T
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
    (T,): for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
{
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let (v,): (T,) = sqlx::query_as(sql).fetch_one(&pool).await.unwrap();
    pool.close().await;
    v
}

/// A count, or `None` while the query fails (e.g. the record stage has not created its table).
async fn try_count(url: &str, sql: &str) -> Option<i64> {
    let pool = sqlx::PgPool::connect(url).await.ok()?;
    let n = sqlx::query_scalar(sql).fetch_one(&pool).await.ok();
    pool.close().await;
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_with_a_cost_keeps_it_in_its_row() {
    let receiver = Receiver::start().await.unwrap();
    let (config, _dir) = test_config(&receiver, &[]).await;
    let config = Arc::new(config);
    let pipeline = Pipeline::start(config.clone(), &[StageName::Sink]).await.unwrap();
    let results = Producer::for_topic(&config, &config.names().results()).unwrap();
    send(&results, &result(1, 1, Some(1_234))).await;
    send(&results, &result(2, 1, None)).await;
    let url = config.database_url.clone();
    assert!(
        eventually(Duration::from_secs(30), || async {
            // Before the record stage has migrated, the table is not there yet: not 2 either.
            try_count(&url, "select count(*) from action_results").await == Some(2)
        })
        .await
    );
    let cost: Option<f64> = query(&url, "select cost from action_results where task_id = 'task-1'").await;
    assert_eq!(cost, Some(1_234.0));
    let cost: Option<f64> = query(&url, "select cost from action_results where task_id = 'task-2'").await;
    assert_eq!(cost, None, "a result without a cost stores null");
    pipeline.stop().await.unwrap();
}

/// Results spread over every partition, each sent twice (a redelivery), with several
/// transactions in flight on distinct partitions: one row per result, and every partition's
/// offset reaches its end once the rows are in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_write_every_partition_once_and_store_every_offset() {
    let receiver = Receiver::start().await.unwrap();
    let (mut config, _dir) = test_config(&receiver, &[]).await;
    config.sink.transactions = 4;
    config.sink.pool_size = 4;
    config.sink.batch_size = 50;
    let config = Arc::new(config);
    let pipeline = Pipeline::start(config.clone(), &[StageName::Sink]).await.unwrap();
    let results = Producer::for_topic(&config, &config.names().results()).unwrap();
    let (distinct, tenants) = (1_000, 40);
    let mut written = Vec::new();
    for n in 0..distinct {
        send(&results, &result(n, tenants, Some(n as u64))).await;
    }
    for n in (0..distinct).step_by(3) {
        let r = result(n, tenants, Some(n as u64));
        written.push(
            results
                .send_raw(r["tenant"].as_str().unwrap().as_bytes(), r.to_string().as_bytes(), "application/json")
                .await
                .unwrap(),
        );
    }
    let partitions: std::collections::BTreeSet<i32> = written.iter().map(|w| w.partition).collect();
    assert!(partitions.len() > 4, "the results cover more partitions than writers: {partitions:?}");
    let sent = (distinct + distinct.div_ceil(3)) as i64;
    let (group, topic) = (config.names().group("sink"), config.names().results());
    assert!(eventually(Duration::from_secs(60), || async { committed_total(&group, &topic, 8) == sent }).await);
    let url = config.database_url.clone();
    assert_eq!(query::<i64>(&url, "select count(*) from action_results").await, distinct as i64);
    let total: f64 = query(&url, "select sum(cost) from action_results").await;
    assert_eq!(total, (0..distinct).sum::<usize>() as f64, "each row kept its own result's cost");
    pipeline.stop().await.unwrap();
}

#[test]
fn more_transactions_than_connections_is_a_config_error_naming_both() {
    let mut config = weir::config::Config::default();
    config.sink.transactions = 5;
    let err = config.validate().unwrap_err().to_string();
    assert!(err.contains("sink.transactions") && err.contains("sink.pool_size (4)"), "{err}");
    config.sink.transactions = 0;
    assert!(config.validate().unwrap_err().to_string().contains("sink.transactions"));
    config.sink.transactions = 4;
    config.validate().unwrap();
}

/// A batch holding a row PostgreSQL refuses (U+0000 in its tenant: SQLSTATE 22021, "invalid byte
/// sequence for encoding UTF8: 0x00", which the stage used to retry every 5 s forever): that row
/// alone is dead-lettered with the SQLSTATE, every other row commits, and every offset advances.
/// U+0000 in a result's output is body data: stored, replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_postgresql_refuses_is_dead_lettered_with_its_sqlstate_and_the_rest_commit() {
    let receiver = Receiver::start().await.unwrap();
    let (mut config, _dir) = test_config(&receiver, &[]).await;
    // One writer, and every result produced before the stage starts: they arrive as one batch.
    config.sink.transactions = 1;
    let config = Arc::new(config);
    let results = Producer::for_topic(&config, &config.names().results()).unwrap();
    let (total, bad, nul_output) = (60, 17, 30);
    for n in 0..total {
        let mut r = result(n, 7, None);
        if n == bad {
            r["tenant"] = json!("nul\u{0}ten");
        }
        if n == nul_output {
            r["output"] = json!({"text": "a\u{0}b", "k\u{0}": ["\u{0}"]});
        }
        send(&results, &r).await;
    }
    let pipeline = Pipeline::start(config.clone(), &[StageName::Sink]).await.unwrap();
    let (group, topic) = (config.names().group("sink"), config.names().results());
    assert!(
        eventually(Duration::from_secs(60), || async { committed_total(&group, &topic, 8) == total as i64 }).await,
        "every offset advanced, the refused row's included"
    );
    let url = config.database_url.clone();
    assert_eq!(query::<i64>(&url, "select count(*) from action_results").await, total as i64 - 1);
    let missing: i64 = query(&url, &format!("select count(*) from action_results where task_id = 'task-{bad}'")).await;
    assert_eq!(missing, 0);
    let output: Value =
        query(&url, &format!("select output from action_results where task_id = 'task-{nul_output}'")).await;
    assert_eq!(
        output,
        json!({"text": "a\u{FFFD}b", "k\u{FFFD}": ["\u{FFFD}"]}),
        "U+0000 in body data stored as U+FFFD"
    );

    let dead = read_topic(&config.names().dlq(), 2, Duration::from_secs(10));
    assert_eq!(dead.len(), 1, "only the refused row is dead-lettered");
    let d = &dead[0];
    assert_eq!(header(d, record::SQLSTATE), Some("22021"));
    let reason = header(d, dead_letter::REASON).unwrap();
    assert!(reason.contains("SQLSTATE 22021") && reason.contains("0x00"), "{reason}");
    assert_eq!(header(d, dead_letter::STAGE), Some("sink"));
    let payload: Value = serde_json::from_slice(rdkafka::Message::payload(d).unwrap()).unwrap();
    assert_eq!(payload["task_id"], format!("task-{bad}"), "the original record, as it was");
    pipeline.stop().await.unwrap();
}

/// An unreachable database is named with its host:port and the operating system's error, not
/// only "pool timed out while waiting for an open connection".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_is_named_with_its_address_and_the_os_error() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let config = weir::config::Config {
        database_url: format!("postgres://weir:weir@{closed}/weir"),
        ..weir::config::Config::default()
    };
    let pool = record::pool(&config).unwrap();
    let err = format!("{:#}", record::migrate(&pool).await.unwrap_err());
    assert!(err.contains(&closed.to_string()), "names host:port: {err}");
    assert!(err.contains("refused") && err.contains("os error"), "names the OS error: {err}");
}

const TWO_STEPS: &str = "
id: two
trigger: {type: order.paid}
steps:
  - {id: a, service: webhook, input: {s: '{{ data.s }}'}}
  - {id: b, service: webhook, needs: [a], input: {from_a: '{{ steps.a.output.input.s }}'}}
";

async fn run_status(url: &str) -> Option<(String, Option<String>)> {
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let row = sqlx::query_as("select status, error from workflow_runs").fetch_optional(&pool).await;
    pool.close().await;
    match row {
        Ok(row) => row,
        // Polled before the record stage created its tables (a loaded machine starts it late).
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => None,
        Err(e) => panic!("reading workflow_runs: {e}"),
    }
}

/// U+0000 inside a multi-step run's data (valid JSON, refused by `jsonb`): the run completes,
/// its event and outputs stored with U+FFFD; the services get the data as sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_step_run_with_nul_in_its_data_completes() {
    let receiver = Receiver::start().await.unwrap();
    let (config, _dir) = test_config(&receiver, &[TWO_STEPS]).await;
    let config = Arc::new(config);
    let pipeline = Pipeline::start(config.clone(), &Pipeline::ALL).await.unwrap();
    let event: Event = serde_json::from_value(
        json!({"id": "o-1", "source": "/shop", "type": "order.paid", "tenant": "shop-1", "data": {"s": "x\u{0}y"}}),
    )
    .unwrap();
    Producer::new(&config).unwrap().send(&event, Format::Json).await.unwrap();
    let url = config.database_url.clone();
    let finished = eventually(Duration::from_secs(60), || async {
        run_status(&url).await.is_some_and(|(status, _)| status != "running")
    })
    .await;
    assert!(finished, "the run finished; calls so far: {}", receiver.calls().len());
    assert_eq!(run_status(&url).await, Some(("succeeded".into(), None)));
    pipeline.stop().await.unwrap();

    let calls = receiver.calls();
    let input = |step: &str| calls.iter().find(|c| c.body["step_id"] == step).unwrap().body["input"].clone();
    assert_eq!(input("a"), json!({"s": "x\u{0}y"}), "the first step gets the event's data as sent");
    assert_eq!(input("b"), json!({"from_a": "x\u{FFFD}y"}), "a later step reads the stored output");
    let stored: String = query(&url, "select event->'data'->>'s' from workflow_runs").await;
    assert_eq!(stored, "x\u{FFFD}y");
    assert_eq!(query::<i64>(&url, "select count(*) from action_results where status = 'succeeded'").await, 2);
}

/// A multi-step result whose event does not deserialize cannot advance its run: the run is
/// recorded as failed, saying why, instead of being dropped without a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_event_does_not_deserialize_fails_with_the_reason() {
    let receiver = Receiver::start().await.unwrap();
    let (config, _dir) = test_config(&receiver, &[TWO_STEPS]).await;
    let config = Arc::new(config);
    let pipeline = Pipeline::start(config.clone(), &[StageName::Sink]).await.unwrap();
    let mut r = result(1, 1, None);
    r["workflow_id"] = json!("two");
    r["step_id"] = json!("a");
    r["event"] = json!({"id": "o-1", "tenant": "tenant-0"});
    send(&Producer::for_topic(&config, &config.names().results()).unwrap(), &r).await;
    let url = config.database_url.clone();
    assert!(eventually(Duration::from_secs(30), || async { run_status(&url).await.is_some() }).await);
    let (status, error) = run_status(&url).await.unwrap();
    assert_eq!(status, "failed");
    let error = error.unwrap();
    assert!(error.contains("does not deserialize") && error.contains("missing field"), "{error}");
    assert_eq!(query::<i64>(&url, "select count(*) from action_results").await, 1, "the result itself is recorded");
    pipeline.stop().await.unwrap();
}
