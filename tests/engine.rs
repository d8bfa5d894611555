//! The workflow engine on the real broker and database: multi-step runs, hot reload with version
//! pinning, and condition errors as results.

mod common;

use std::{sync::Arc, time::Duration};

use common::*;
use serde_json::json;
use weir::{
    envelope::{Event, Format},
    pipeline::Pipeline,
    produce::Producer,
    receiver::{Mode, Receiver},
};

const DIAMOND: &str = "
id: diamond
version: 1
trigger: {type: order.paid}
steps:
  - {id: a, service: webhook, input: {n: '{{ data.n }}'}}
  - {id: b, service: webhook, needs: [a], input: {from_a: '{{ steps.a.output.step }}'}}
  - {id: c, service: webhook, needs: [a], input: {from_a: '{{ steps.a.output.step }}'}}
  - {id: d, service: webhook, needs: [b, c], input: {b: '{{ steps.b.output }}', c: '{{ steps.c.output }}'}}
";

fn event(id: &str, kind: &str, data: serde_json::Value) -> Event {
    serde_json::from_value(json!({"id": id, "source": "/shop", "type": kind, "tenant": "shop-1", "data": data}))
        .unwrap()
}

async fn query_scalar(url: &str, sql: &str) -> i64 {
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let n = sqlx::query_scalar(sql).fetch_one(&pool).await.unwrap_or(0);
    pool.close().await;
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diamond_runs_each_step_once_and_joins_both_branches() {
    let receiver = Receiver::start().await.unwrap();
    let (config, _dir) = test_config(&receiver, &[DIAMOND]).await;
    let config = Arc::new(config);
    let pipeline = Pipeline::start(config.clone(), &Pipeline::ALL).await.unwrap();
    Producer::new(&config).unwrap().send(&event("o-1", "order.paid", json!({"n": 7})), Format::Avro).await.unwrap();

    let url = config.database_url.clone();
    let finished = eventually(Duration::from_secs(60), || async {
        query_scalar(&url, "select count(*) from workflow_runs where status = 'succeeded'").await == 1
    })
    .await;
    assert!(finished, "run succeeded; calls so far: {}", receiver.calls().len());
    pipeline.stop().await.unwrap();

    let calls = receiver.calls();
    let step = |id: &str| calls.iter().filter(|c| c.body["step_id"] == id).cloned().collect::<Vec<_>>();
    for id in ["a", "b", "c", "d"] {
        assert_eq!(step(id).len(), 1, "step {id} called exactly once");
    }
    let (b, c, d) = (&step("b")[0], &step("c")[0], &step("d")[0]);
    assert_eq!(step("a")[0].body["input"]["n"], 7, "a's input rendered natively from the event");
    assert_eq!(b.body["input"]["from_a"], "a");
    assert!(d.at > b.at && d.at > c.at, "the join starts after both branches");
    assert_eq!(d.body["input"]["b"]["step"], "b", "d sees b's output");
    assert_eq!(d.body["input"]["c"]["step"], "c", "d sees c's output");
    assert_eq!(query_scalar(&url, "select count(*) from action_results where status = 'succeeded'").await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apply_reaches_a_running_worker_and_runs_in_flight_keep_their_version() {
    let two_steps = |version: i64| {
        format!(
            "{{id: flow, version: {version}, trigger: {{type: order.paid}}, steps: [{{id: first, service: webhook, input: {{v: {version}}}}}, {{id: second, service: webhook, needs: [first], input: {{v: {version}}}}}]}}"
        )
    };
    let receiver = Receiver::start().await.unwrap();
    let (config, dir) = test_config(&receiver, &[&two_steps(1)]).await;
    let config = Arc::new(config);
    let pipeline = Pipeline::start(config.clone(), &Pipeline::ALL).await.unwrap();
    let producer = Producer::new(&config).unwrap();

    // A v1 run whose first call is slow, so the apply happens while it is in flight.
    receiver.set_mode(Mode { latency: Duration::from_millis(1_500), fail_with: None, ..Default::default() });
    producer.send(&event("before", "order.paid", json!({})), Format::Json).await.unwrap();
    assert!(
        eventually(Duration::from_secs(30), || async { receiver.arrived() > 0 }).await,
        "the v1 run's first call is in flight"
    );
    std::fs::write(dir.path().join("wf0.yaml"), two_steps(2)).unwrap();
    let plan = weir::definitions::apply_dir(&config, dir.path(), false).await.unwrap();
    assert_eq!(plan.publish.len(), 1);
    receiver.set_mode(Mode::default());

    // Events produced from now on start v2 runs, without restarting the worker. Probe until the
    // worker has seen the apply; every probe is accounted for below.
    let mut probes = 0;
    let switched = eventually(Duration::from_secs(30), || {
        probes += 1;
        let (producer, n) = (producer.clone(), probes);
        let calls = receiver.calls();
        async move {
            producer.send(&event(&format!("after-{n}"), "order.paid", json!({})), Format::Json).await.unwrap();
            calls.iter().any(|c| c.body["workflow_version"] == 2)
        }
    })
    .await;
    assert!(switched, "a v2 run started after the apply");
    let url = config.database_url.clone();
    assert!(
        eventually(Duration::from_secs(60), || async {
            query_scalar(&url, "select count(*) from workflow_runs where status <> 'running'").await
                == probes as i64 + 1
        })
        .await
    );
    pipeline.stop().await.unwrap();

    let calls = receiver.calls();
    let of = |event_id: &str| calls.iter().filter(|c| c.body["event_id"] == event_id).cloned().collect::<Vec<_>>();
    let before = of("before");
    assert_eq!(before.len(), 2, "both steps of the in-flight run ran");
    for call in &before {
        assert_eq!(call.body["workflow_version"], 1, "the in-flight run stayed on v1");
        assert_eq!(call.body["input"]["v"], 1);
    }
    // Once a run started on v2, every later event also did.
    let first_v2 =
        (1..=probes).find(|n| of(&format!("after-{n}")).iter().any(|c| c.body["workflow_version"] == 2)).unwrap();
    for n in first_v2..=probes {
        for call in of(&format!("after-{n}")) {
            assert_eq!(call.body["workflow_version"], 2, "after-{n}");
            assert_eq!(call.body["input"]["v"], 2);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_condition_that_fails_on_an_event_is_a_failed_result_not_a_crash() {
    let wf =
        "{id: big-orders, trigger: {type: order.paid, if: 'data.amount > 100'}, steps: [{id: s, service: webhook}]}";
    let receiver = Receiver::start().await.unwrap();
    let (config, _dir) = test_config(&receiver, &[wf]).await;
    let config = Arc::new(config);
    let pipeline = Pipeline::start(config.clone(), &Pipeline::ALL).await.unwrap();
    let producer = Producer::new(&config).unwrap();
    for (id, data) in [
        ("ok", json!({"amount": 500})),
        ("small", json!({"amount": 5})),
        ("missing", json!({})),
        ("wrong-type", json!({"amount": "lots"})),
        ("huge", json!({"amount": 1e300, "blob": "x".repeat(500_000)})),
    ] {
        producer.send(&event(id, "order.paid", data), Format::Json).await.unwrap();
    }
    let url = config.database_url.clone();
    assert!(
        eventually(Duration::from_secs(60), || async {
            query_scalar(&url, "select count(*) from action_results").await == 4
        })
        .await,
        "ok and huge succeed, missing and wrong-type fail with a reason, small does not match"
    );
    pipeline.stop().await.unwrap();
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let rows: Vec<(String, String, Option<String>)> =
        sqlx::query_as("select event_id, status, error from action_results order by event_id")
            .fetch_all(&pool)
            .await
            .unwrap();
    let by_id =
        |id: &str| rows.iter().find(|r| r.0 == id).cloned().unwrap_or_else(|| panic!("no row for {id}: {rows:?}"));
    assert_eq!(by_id("ok").1, "succeeded");
    assert_eq!(by_id("huge").1, "succeeded");
    for id in ["missing", "wrong-type"] {
        let (_, status, error) = by_id(id);
        assert_eq!(status, "failed");
        let error = error.unwrap();
        assert!(error.contains("trigger.if") && error.contains("data.amount > 100"), "{id}: {error}");
    }
    assert_eq!(receiver.calls().len(), 2);
}
