//! Issue 17: a deferral due further ahead than the longest delay tier does not hold back the
//! records behind it in its tier partition. Real broker and HTTP receiver; assertions are counts
//! (which calls were made, which copies the tier holds), not timings.

mod common;

use std::{sync::Arc, time::Duration};

use common::*;
use rdkafka::{
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
    util::Timeout,
};
use serde_json::json;
use weir::{
    kafka::deferral::{epoch_ms, DEFERRAL, DUE, KIND},
    ops::receiver::Receiver,
    pipeline::{Pipeline, StageName},
    stages::execute::delay::{REQUEUED_FROM, REQUEUES},
};

fn task(n: u64, tenant: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "task_id": format!("task-{n}"), "run_id": format!("run-{n}"), "event_id": format!("e-{n}"),
        "event_type": "member.created", "tenant": tenant, "workflow_id": "welcome", "workflow_version": 1,
        "step_id": "notify", "service": "webhook", "created_at": "2026-11-27T10:00:00Z", "input": {"seq": n},
    }))
    .unwrap()
}

/// Produces a deferral of `tenant` due at `due` to partition 0 of `topic`; returns its offset.
async fn defer(producer: &FutureProducer, topic: &str, n: u64, tenant: &str, due: u64) -> i64 {
    let due = due.to_string();
    let headers = OwnedHeaders::new()
        .insert(Header { key: "content-type", value: Some("application/json") })
        .insert(Header { key: KIND, value: Some(DEFERRAL) })
        .insert(Header { key: DUE, value: Some(due.as_str()) });
    let payload = task(n, tenant);
    let record = FutureRecord::to(topic).partition(0).key(tenant).payload(&payload).headers(headers);
    producer.send(record, Timeout::After(Duration::from_secs(10))).await.map_err(|(e, _)| e).unwrap().offset
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferral_due_beyond_the_longest_tier_does_not_hold_back_a_near_one_on_its_partition() {
    let receiver = Receiver::start().await.unwrap();
    let (config, _dir) = test_config(&receiver, &[]).await;
    let config = Arc::new(config);
    let longest = *config.services["webhook"].retry.tiers.last().unwrap();
    assert_eq!(longest, Duration::from_secs(600), "the default tiers: the longest is 10m");
    let tier = config.names().retry("webhook", "10m");
    let producer = weir::kafka::producer(&config).unwrap();

    // In one tier partition, in this order: a deferral of "far" due in an hour (beyond the tier's
    // 10 minutes), one of "near" due in a second, and a later one of "far" already due, which
    // must not overtake its tenant's first.
    let now = epoch_ms();
    let far = defer(&producer, &tier, 1, "far", now + 3_600_000).await;
    defer(&producer, &tier, 2, "near", now + 1_000).await;
    let far_later = defer(&producer, &tier, 3, "far", now).await;

    let pipeline = Pipeline::start(config.clone(), &[StageName::Execute]).await.unwrap();
    let near_called = eventually(Duration::from_secs(60), || {
        let calls = receiver.calls();
        async move { calls.iter().any(|c| c.tenant.as_deref() == Some("near")) }
    })
    .await;
    assert!(near_called, "the near deferral was not called: the far one ahead of it holds its partition");

    // Both of far's records went to the tail, in order, counted, each naming its origin.
    let tier_records = read_topic(&tier, 5, Duration::from_secs(30));
    let copies: Vec<(i64, &str)> = tier_records
        .iter()
        .filter_map(|m| Some((header(m, REQUEUED_FROM)?.parse().unwrap(), header(m, REQUEUES)?)))
        .collect();
    assert!(copies.len() >= 2, "far's two records re-queued: {copies:?}");
    assert_eq!(copies[..2], [(far, "1"), (far_later, "1")], "{copies:?}");
    pipeline.stop().await.unwrap();
    let calls = receiver.calls();
    assert_eq!(
        calls.iter().filter(|c| c.tenant.as_deref() == Some("far")).count(),
        0,
        "far's due record waits behind its first, which is due in an hour"
    );
}
