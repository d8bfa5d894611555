//! The sink on its own, through the real broker and database: results in, rows out.

mod common;

use std::{sync::Arc, time::Duration};

use common::*;
use serde_json::{json, Value};
use weir::{
    ops::produce::Producer,
    ops::receiver::Receiver,
    pipeline::{Pipeline, StageName},
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
            query::<i64>(&url, "select count(*) from action_results").await == 2
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
async fn lanes_write_every_partition_once_and_store_every_offset() {
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
    assert!(partitions.len() > 4, "the results cover more partitions than lanes: {partitions:?}");
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
