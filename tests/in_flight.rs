//! Calls in flight against the real broker and a real local HTTP server that answers slowly:
//! thousands at once from one executor over HTTP/2, the memory bound
//! (`executor.max_in_flight_bytes`) taking over from the count bound, and an answer longer than
//! `max_response_bytes` cut without failing the call.
//!
//! Every assertion counts (calls the receiver was answering at once, versions, results); none
//! times anything: the receiver's latency only makes calls overlap.

mod common;

use std::{sync::Arc, time::Duration};

use common::*;
use serde_json::json;
use weir::{
    config::{Config, HttpVersion},
    envelope::{ActionResult, ActionTask, Status},
    ops::{
        produce::Producer,
        receiver::{Mode, Receiver},
    },
    pipeline::{Pipeline, StageName},
};

const WELCOME: &str =
    "{id: welcome, version: 1, trigger: {type: member.created}, steps: [{id: notify, service: webhook}]}";

async fn setup(receiver: &Receiver, tweak: impl FnOnce(&mut Config)) -> (Arc<Config>, TestDir) {
    let (mut config, dir) = test_config(receiver, &[WELCOME]).await;
    tweak(&mut config);
    config.validate().unwrap();
    (Arc::new(config), dir)
}

/// `n` tasks over `tenants` tenants, each about a subject of its own, so none waits for
/// another's order key: only the executor's bounds keep them from all being called at once.
fn tasks(n: usize, tenants: usize) -> Vec<ActionTask> {
    (0..n)
        .map(|i| {
            let mut task = webhook_task(i, &format!("tenant-{}", i % tenants), json!({}));
            task.order_key = Some(format!("subject:member/{i}"));
            task
        })
        .collect()
}

async fn produce(config: &Config, tasks: &[ActionTask]) {
    let producer = Producer::for_topic(config, &config.names().actions("webhook")).unwrap();
    produce_tasks(&producer, tasks).await;
}

/// Produces `tasks`, runs an executor until the receiver has executed them all (or `within`
/// passes, failing), then stops it.
async fn call_all(config: &Arc<Config>, receiver: &Receiver, tasks: &[ActionTask], within: Duration) {
    produce(config, tasks).await;
    let pipeline = Pipeline::start(config.clone(), &[StageName::Execute]).await.unwrap();
    let n = tasks.len();
    assert!(
        eventually(within, || async { receiver.executed() >= n }).await,
        "{} of {n} calls made",
        receiver.executed()
    );
    pipeline.stop().await.unwrap();
}

fn results(config: &Config, want: usize) -> Vec<ActionResult> {
    read_topic(&config.names().results(), want, Duration::from_secs(60))
        .iter()
        .map(|m| serde_json::from_slice(rdkafka::Message::payload(m).unwrap()).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_executor_holds_a_thousand_calls_in_flight_over_http2() {
    let receiver = Receiver::start().await.unwrap();
    // Slow enough that the calls overlap however slowly this machine starts them.
    receiver.set_mode(Mode { latency: Duration::from_secs(4), ..Default::default() });
    let (config, _dir) = setup(&receiver, |c| {
        let webhook = c.services.get_mut("webhook").unwrap();
        webhook.http.version = HttpVersion::Http2;
        webhook.timeout = Duration::from_secs(30);
    })
    .await;
    // Default bounds: executor.concurrency 1024, 256 MiB for calls, 2,000 tasks buffered.
    assert_eq!(config.executor.concurrency, 1024);
    let n = 1_500;
    call_all(&config, &receiver, &tasks(n, 300), Duration::from_secs(90)).await;
    let most = receiver.most_in_flight();
    assert!((1_000..=1_024).contains(&most), "{most} calls in flight at once (bound: concurrency 1024)");
    let calls = receiver.calls();
    assert!(calls.iter().all(|c| c.version == "HTTP/2.0"), "every call over HTTP/2 (h2c)");
    assert_eq!(calls.len(), n, "each task called once");
    let results = results(&config, n);
    assert_eq!(results.len(), n);
    assert!(results.iter().all(|r| r.status == Status::Succeeded));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_bound_holds_calls_back_before_the_count_bound_does() {
    let receiver = Receiver::start().await.unwrap();
    receiver.set_mode(Mode { latency: Duration::from_millis(300), ..Default::default() });
    let (config, _dir) = setup(&receiver, |c| {
        c.limits.max_record_bytes = 100_000;
        let webhook = c.services.get_mut("webhook").unwrap();
        webhook.max_response_bytes = Some(4 << 10);
        // A call reserves its task (under 1 KiB here, rounded up to 1 KiB) + 4 KiB of answer +
        // 16 KiB of overhead = 21 KiB: room for exactly 6 calls in 126 KiB.
        c.executor.max_in_flight_bytes = 6 * (21 << 10);
    })
    .await;
    let n = 120;
    let tasks = tasks(n, 40);
    assert!(tasks.iter().all(|t| serde_json::to_vec(t).unwrap().len() <= 1024));
    call_all(&config, &receiver, &tasks, Duration::from_secs(60)).await;
    assert_eq!(receiver.most_in_flight(), 6, "calls at once: what the memory holds, not concurrency (1024)");
    assert_eq!(receiver.calls().len(), n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_over_max_response_bytes_is_cut_and_the_call_still_succeeds() {
    let receiver = Receiver::start().await.unwrap();
    let (config, _dir) =
        setup(&receiver, |c| c.services.get_mut("webhook").unwrap().max_response_bytes = Some(1_000)).await;
    // The receiver pads its answer to about `respond_bytes`.
    let tasks = vec![
        webhook_task(0, "acme", json!({"respond_bytes": 200_000})),
        webhook_task(1, "acme", json!({"respond_bytes": 10})),
    ];
    produce(&config, &tasks).await;
    let pipeline = Pipeline::start(config.clone(), &[StageName::Execute]).await.unwrap();
    let results = results(&config, 2);
    pipeline.stop().await.unwrap();
    assert_eq!(results.len(), 2);
    let big = results.iter().find(|r| r.task_id == "task-0").unwrap();
    assert_eq!(big.status, Status::Succeeded, "the service acted: the call succeeded");
    let marker = &big.output.as_ref().unwrap()["weir.truncated"];
    assert_eq!(marker["bytes_read"], 1_000);
    assert!(marker["content_length"].as_u64().unwrap() > 200_000, "{marker}");
    assert!(marker["reason"].as_str().unwrap().contains("services.webhook.max_response_bytes"), "{marker}");
    let small = results.iter().find(|r| r.task_id == "task-1").unwrap();
    assert_eq!(small.output.as_ref().unwrap()["ok"], true, "a short answer is kept whole");
    assert_eq!(receiver.calls().len(), 2, "neither call repeated");
}
