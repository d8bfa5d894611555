//! Executor benchmark (not a test): `cargo run --release --example executor_bench [-- SECONDS TASKS]`
//! (SECONDS 0 skips the throttle runs).
//!
//! Needs the local broker (scripts/kafka.sh up). Two measurements, each against a baseline taken
//! in the same run:
//!
//! 1. Throttle accuracy: the webhook service limited to 1,000 requests/s, with a backlog far
//!    above the limit, for SECONDS (default 60), twice: with a connector that only records the
//!    time of each call (the throttle inside the whole executor loop: Kafka in, results out), and
//!    with the webhook connector calling the real local receiver over HTTP. Reported: calls per
//!    second against the configured limit, and the busiest 1-second window.
//! 2. Executor overhead: TASKS (default 200,000) tasks on a fresh action topic, read once by a
//!    plain consumer loop (the baseline: poll every message, nothing else), then executed with a
//!    no-op connector that only records when it was called (lanes, throttle and breaker checks, a
//!    result produced per task and acknowledged, offsets stored). Reported: both rates and
//!    executor ÷ raw consume. BENCH_MAX_BUFFERED and BENCH_PARTITION_MAX_BUFFERED override the
//!    executor's in-flight bounds; BENCH_KAFKA (`name=value,...`) adds librdkafka properties.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{future::BoxFuture, stream::FuturesUnordered, FutureExt, StreamExt};
use rdkafka::consumer::{BaseConsumer, Consumer};
use weir::{
    config::{Config, LimitConfig, Per, Scope, ServiceConfig},
    envelope::ActionTask,
    ops::produce::Producer,
    ops::receiver::{Mode, Receiver},
    stages::execute::{self, CallOutcome, Connector},
};

fn config(receiver: &Receiver, limits: Vec<LimitConfig>) -> Config {
    let mut config = Config {
        brokers: std::env::var("WEIR_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into()),
        topic_prefix: format!("bench{}.", &uuid::Uuid::new_v4().simple().to_string()[..8]),
        metrics_addr: None,
        topics_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/topics").into(),
        ..Config::default()
    };
    let service = ServiceConfig { url: receiver.url("hook"), limits, concurrency: Some(256), ..Default::default() };
    config.services.insert("webhook".into(), service);
    config.network.allow = vec!["127.0.0.1/32".parse().expect("a CIDR")];
    // librdkafka properties to try, `name=value,name=value` (for both producer and consumer).
    for pair in std::env::var("BENCH_KAFKA").unwrap_or_default().split(',').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').expect("BENCH_KAFKA is name=value,...");
        config.kafka.insert(k.into(), v.into());
    }
    if let Ok(n) = std::env::var("BENCH_MAX_BUFFERED") {
        config.executor.max_buffered = n.parse().expect("a number");
    }
    if let Ok(n) = std::env::var("BENCH_PARTITION_MAX_BUFFERED") {
        config.executor.partition_max_buffered = n.parse().expect("a number");
    }
    config.validate().expect("bench config");
    config
}

fn task(n: usize) -> ActionTask {
    serde_json::from_value(serde_json::json!({
        "task_id": format!("task-{n}"), "run_id": format!("run-{n}"), "event_id": format!("e-{n}"),
        "event_type": "member.created", "tenant": format!("tenant-{}", n % 1_000), "workflow_id": "welcome",
        "workflow_version": 1, "step_id": "notify", "service": "webhook", "created_at": "2026-11-23T10:00:00Z",
        "input": {"email": format!("m{n}@example.com"), "name": "Ada"},
    }))
    .expect("valid task")
}

async fn produce(config: &Config, n: usize) {
    let producer = Producer::for_topic(config, &config.names().actions("webhook")).expect("producer");
    let mut inflight = FuturesUnordered::new();
    for i in 0..n {
        if inflight.len() >= 10_000 {
            inflight.next().await;
        }
        let (producer, t) = (producer.clone(), task(i));
        inflight.push(async move {
            let payload = serde_json::to_vec(&t).expect("task serializes");
            producer.send_raw(t.tenant.as_bytes(), &payload, "application/json").await.expect("produced")
        });
    }
    while inflight.next().await.is_some() {}
}

/// Records when each call was made, and succeeds.
#[derive(Default)]
struct Counting(std::sync::Mutex<Vec<Instant>>);

impl Connector for Counting {
    fn estimate_cost(&self, _: &ActionTask) -> u64 {
        1
    }

    fn call<'a>(&'a self, _: &'a ActionTask) -> BoxFuture<'a, CallOutcome> {
        self.0.lock().expect("lock").push(Instant::now());
        futures::future::ready(CallOutcome::Succeeded { http_status: None, output: None, cost: None }).boxed()
    }
}

/// Calls per second over `seconds` from the first call, and the busiest 1-second window.
fn rate(mut times: Vec<Instant>, seconds: u64) -> (usize, f64, usize) {
    times.sort();
    let Some(start) = times.first().copied() else { return (0, 0.0, 0) };
    times.retain(|t| *t < start + Duration::from_secs(seconds));
    let (mut lo, mut busiest) = (0, 0);
    for hi in 0..times.len() {
        while times[hi] - times[lo] >= Duration::from_secs(1) {
            lo += 1;
        }
        busiest = busiest.max(hi - lo + 1);
    }
    (times.len(), times.len() as f64 / seconds as f64, busiest)
}

async fn throttle_accuracy(seconds: u64, http: bool) {
    let receiver = Receiver::start().await.expect("receiver");
    receiver.set_mode(Mode::default());
    let limit = 1_000;
    let config = Arc::new(config(
        &receiver,
        vec![LimitConfig { requests: Some(limit), cost: None, per: Per::Second, scope: Scope::Global, burst: None }],
    ));
    weir::kafka::topics::apply_dir(&config, false).await.expect("topics");
    // A backlog well above what the run can call, so the limit is the only brake.
    produce(&config, (limit as u64 * (seconds + 10)) as usize).await;
    let counting = Arc::new(Counting::default());
    let connector: Arc<dyn Connector> = if http {
        weir::connectors::build("webhook", &config.services["webhook"], &config.network).expect("connector")
    } else {
        counting.clone()
    };
    let shutdown = weir::shutdown::CancellationToken::new();
    let executor = tokio::spawn(execute::run_with(config.clone(), "webhook".into(), connector, shutdown.clone()));
    let called = || if http { receiver.arrived() } else { counting.0.lock().expect("lock").len() };
    while called() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_secs(seconds) + Duration::from_millis(500)).await;
    let times =
        if http { receiver.calls().iter().map(|c| c.at).collect() } else { counting.0.lock().expect("lock").clone() };
    let (calls, rate, busiest) = rate(times, seconds);
    let refused = receiver.calls().iter().filter(|c| c.status == 429).count();
    println!(
        "throttle ({}): limit {limit}/s, {calls} calls in {seconds} s = {rate:.1}/s ({:+.2} % of the limit), busiest 1-s window {busiest}, {refused} refused",
        if http { "webhook over HTTP to the local receiver" } else { "recording connector" },
        (rate / limit as f64 - 1.0) * 100.0
    );
    shutdown.cancel();
    let _ = executor.await;
}

async fn overhead(tasks: usize) {
    let receiver = Receiver::start().await.expect("receiver");
    let config = Arc::new(config(&receiver, Vec::new()));
    weir::kafka::topics::apply_dir(&config, false).await.expect("topics");
    produce(&config, tasks).await;
    let topic = config.names().actions("webhook");

    let raw = {
        let (config, topic) = (config.clone(), topic.clone());
        tokio::task::spawn_blocking(move || {
            let consumer: BaseConsumer =
                weir::kafka::consumer_config(&config, &config.names().group("bench-raw")).create().expect("consumer");
            consumer.subscribe(&[&topic]).expect("subscribe");
            let mut seen = 0;
            let mut start = None;
            while seen < tasks {
                if let Some(Ok(_)) = consumer.poll(Duration::from_millis(100)) {
                    start.get_or_insert_with(Instant::now);
                    seen += 1;
                }
            }
            start.expect("messages arrived").elapsed()
        })
        .await
        .expect("raw consume")
    };

    // Counted at the connector: with calls that cost nothing, the rate of calls is the rate at
    // which the executor takes, schedules and settles tasks (results are produced and
    // acknowledged behind the calls, within the `max_buffered` bound).
    let counting = Arc::new(Counting::default());
    let shutdown = weir::shutdown::CancellationToken::new();
    let executor =
        tokio::spawn(execute::run_with(config.clone(), "webhook".into(), counting.clone(), shutdown.clone()));
    let calls = || counting.0.lock().expect("lock").len();
    while calls() == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let start = Instant::now();
    while calls() < tasks {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let executed = start.elapsed();
    shutdown.cancel();
    let _ = executor.await;
    let (raw_rate, exec_rate) = (tasks as f64 / raw.as_secs_f64(), tasks as f64 / executed.as_secs_f64());
    println!(
        "overhead: {tasks} tasks; raw consume {raw_rate:.0}/s ({:.2} s), executor with no-op connector {exec_rate:.0}/s ({:.2} s): {:.2} of raw consume",
        raw.as_secs_f64(),
        executed.as_secs_f64(),
        exec_rate / raw_rate
    );
}

#[tokio::main]
async fn main() {
    weir::telemetry::prometheus();
    let args: Vec<String> = std::env::args().collect();
    let seconds = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(60);
    let tasks = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(200_000);
    if seconds > 0 {
        throttle_accuracy(seconds, false).await;
        throttle_accuracy(seconds, true).await;
    }
    overhead(tasks).await;
}
