//! Faults of the infrastructure under a running pipeline (issue 11): a partition's pause across
//! rebalances, the liveness watchdog and health endpoints, and a broker killed with SIGKILL and
//! restarted several times under load. The last test runs its own broker on another port, so
//! killing it leaves the shared one (and every other test) alone.

mod common;

use std::{
    collections::{BTreeSet, HashSet},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use common::{broker::OwnBroker, *};
use rdkafka::{
    admin::{AdminOptions, NewTopic, TopicReplication},
    consumer::{BaseConsumer, Consumer},
    producer::{FutureProducer, FutureRecord},
    ClientConfig, Message,
};
use weir::{
    config::Config,
    envelope::Format,
    kafka::source::Source,
    ops::{produce::Producer, receiver::Receiver},
    pipeline::Pipeline,
    telemetry::Stage,
};

const WELCOME: &str =
    "{id: welcome, version: 1, trigger: {type: member.created}, steps: [{id: notify, service: webhook}]}";

async fn result_rows(database_url: &str) -> i64 {
    let Ok(pool) = sqlx::PgPool::connect(database_url).await else { return -1 };
    let n = sqlx::query_scalar("select count(*) from action_results").fetch_one(&pool).await.unwrap_or(-1);
    pool.close().await;
    n
}

/// Distinct tasks the receiver answered with success (a replay after a restart counts once).
fn called(receiver: &Receiver) -> usize {
    receiver
        .calls()
        .into_iter()
        .filter(|c| c.status == 200)
        .filter_map(|c| c.idempotency_key)
        .collect::<HashSet<_>>()
        .len()
}

async fn http_get(url: &str) -> Option<(u16, String)> {
    let response = reqwest::Client::new().get(url).timeout(Duration::from_secs(5)).send().await.ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.unwrap_or_default()))
}

/// Asks `url` every 50 ms until `want(status, body)` or `timeout`; returns whether it was met and
/// the last answer.
async fn poll_endpoint(
    url: &str,
    timeout: Duration,
    want: impl Fn(u16, &str) -> bool,
) -> (bool, Option<(u16, String)>) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let answer = http_get(url).await;
        if answer.as_ref().is_some_and(|(status, body)| want(*status, body)) {
            return (true, answer);
        }
        if tokio::time::Instant::now() > deadline {
            return (false, answer);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Pause state across a rebalance
// ---------------------------------------------------------------------------------------------

/// A topic `name` of two partitions under `config`'s prefix, deleted when the guard drops, and a
/// group named after it.
async fn two_partitions(config: &Config, name: &str) -> (String, String, DeleteTopicOnDrop) {
    let (topic, group) = (config.names().topic(name), config.names().group(name));
    let admin = weir::kafka::admin(config).unwrap();
    let created = admin
        .create_topics(&[NewTopic::new(&topic, 2, TopicReplication::Fixed(1))], &AdminOptions::new())
        .await
        .unwrap();
    assert!(created.iter().all(|r| r.is_ok()), "{created:?}");
    let cleanup = DeleteTopicOnDrop(config.clone(), topic.clone());
    (topic, group, cleanup)
}

/// librdkafka keeps a partition's application pause across revoke and assign. The source used to
/// forget its own record of the pause on revoke, so the stage's later resume did nothing and the
/// partition never delivered again (the executor that went silent after a broker restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_partition_resumes_after_a_rebalance() {
    let config = Config { brokers: brokers(), topic_prefix: unique("t") + ".", ..Config::default() };
    let (topic, group, _cleanup) = two_partitions(&config, "paused").await;

    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    let send = |partition: i32, n: usize| {
        let (producer, topic) = (producer.clone(), topic.clone());
        async move {
            for i in 0..n {
                let payload = format!("{partition}-{i}");
                let record = FutureRecord::<(), _>::to(&topic).partition(partition).payload(&payload);
                producer.send(record, Duration::from_secs(10)).await.unwrap();
            }
        }
    };
    send(0, 5).await;
    send(1, 5).await;

    let mut source = Source::subscribe(&config, Stage::Execute, &topic, &group).unwrap();
    let mut seen = [0usize; 2];
    assert!(take(&mut source, &mut seen, |s| s[0] >= 5 && s[1] >= 5).await, "first messages: {seen:?}");

    // The stage holds partition 0 (as the executor does when a partition's work piles up).
    source.pause_partition(0);

    // A second member joins and leaves: two rebalances, each revoking and assigning.
    let mut assignment = source.assignment();
    let member = SecondMember::join(&config, &topic, &group);
    assert!(
        eventually(Duration::from_secs(30), || {
            let owned = assignment.borrow_and_update().owned.clone();
            async move { owned.len() == 1 }
        })
        .await,
        "the second member never got a partition"
    );
    drop(member);
    assert!(
        eventually(Duration::from_secs(30), || {
            let owned = assignment.borrow_and_update().owned.clone();
            async move { owned == BTreeSet::from([0, 1]) }
        })
        .await,
        "the source never got both partitions back"
    );

    // Still held: partition 1 delivers, partition 0 does not. (Produced first, in the same fetch,
    // partition 0's message would arrive no later than partition 1's if it were not paused.)
    let before = seen;
    send(0, 1).await;
    send(1, 1).await;
    assert!(take(&mut source, &mut seen, |s| s[1] > before[1]).await, "partition 1 stopped: {seen:?}");
    assert_eq!(seen[0], before[0], "partition 0 delivered while the stage held it");

    // The stage's work drains: it resumes, and partition 0 delivers again.
    source.resume_partition(0);
    send(0, 3).await;
    assert!(
        take(&mut source, &mut seen, |s| s[0] >= before[0] + 4).await,
        "partition 0 never delivered again after the rebalance: {seen:?}"
    );
    source.close();
}

/// The poll thread pauses every partition when the stage has no room for a batch, and resumes
/// them when it hands that batch over. A rebalance that revokes every partition the held batch
/// came from (eager rebalancing revokes all; an incremental one, the partitions that move) empties
/// it, and the partitions used to stay paused with nothing left to hand over: the executor that
/// took no record again after a scale-out. Now the stage, once it takes again, gets the records of
/// the partitions it owns after the rebalance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_held_for_backpressure_and_revoked_does_not_leave_the_source_paused() {
    let mut config = Config { brokers: brokers(), topic_prefix: unique("t") + ".", ..Config::default() };
    config.consumer_groups.protocol = weir::config::GroupProtocol::Eager;
    let (topic, group, _cleanup) = two_partitions(&config, "held").await;
    // More than the channel's two batches and the one the poll thread holds, on each partition.
    let per_partition = 4 * weir::kafka::source::BATCH;
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    let mut sends = futures::stream::FuturesUnordered::new();
    for i in 0..2 * per_partition {
        let (partition, payload) = ((i % 2) as i32, i.to_string());
        let producer = producer.clone();
        let topic = topic.clone();
        sends.push(async move {
            let record = FutureRecord::<(), _>::to(&topic).partition(partition).payload(&payload);
            producer.send(record, Duration::from_secs(10)).await.unwrap();
        });
    }
    while futures::StreamExt::next(&mut sends).await.is_some() {}

    // The stage takes nothing: the channel fills, and the poll thread pauses everything.
    let mut source = Source::subscribe(&config, Stage::Execute, &topic, &group).unwrap();
    let paused = eventually(Duration::from_secs(30), || {
        let paused = source.paused_for_backpressure();
        async move { paused }
    })
    .await;
    assert!(paused, "the source never paused for backpressure");

    // A second member joins: every partition is revoked, then one of them assigned again.
    let mut assignment = source.assignment();
    let _member = SecondMember::join(&config, &topic, &group);
    let rebalanced = eventually(Duration::from_secs(30), || {
        let owned = assignment.borrow_and_update().owned.clone();
        async move { owned.len() == 1 }
    })
    .await;
    assert!(rebalanced, "the second member never got a partition");
    let owned = *assignment.borrow().owned.iter().next().unwrap();

    // The stage takes again: what it is handed must include records of the partition it owns now
    // (the batches from before the rebalance are dropped as stale).
    let mut seen = [0usize; 2];
    assert!(
        take(&mut source, &mut seen, |s| s[owned as usize] > 0).await,
        "no record of partition {owned}, owned after the rebalance: the source stayed paused ({seen:?})"
    );
    source.close();
}

/// Takes batches from `source`, counting messages per partition, until `until` holds (true) or
/// 30 s pass (false).
async fn take(source: &mut Source, seen: &mut [usize; 2], until: impl Fn(&[usize; 2]) -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !until(seen) {
        let Ok(Some(batch)) = tokio::time::timeout_at(deadline, source.recv()).await else { return false };
        for d in batch {
            seen[d.message.partition() as usize] += 1;
            source.done(&d.ticket);
        }
    }
    true
}

/// Another consumer in the group, polled on its own thread; it leaves the group when dropped.
struct SecondMember {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SecondMember {
    /// A member configured as weir's own (the same group protocol and assignor: a member whose
    /// assignor the group does not share is refused).
    fn join(config: &Config, topic: &str, group: &str) -> SecondMember {
        let consumer: BaseConsumer =
            weir::kafka::member_config(config, group).set("enable.auto.commit", "false").create().unwrap();
        consumer.subscribe(&[topic]).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let stop = stop.clone();
            move || {
                while !stop.load(Ordering::Relaxed) {
                    let _ = consumer.poll(Duration::from_millis(50));
                }
                // Dropping the consumer closes it: it leaves the group at once.
            }
        });
        SecondMember { stop, thread: Some(thread) }
    }
}

impl Drop for SecondMember {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct DeleteTopicOnDrop(Config, String);

impl Drop for DeleteTopicOnDrop {
    fn drop(&mut self) {
        let (config, topic) = (self.0.clone(), self.1.clone());
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let admin = weir::kafka::admin(&config).unwrap();
                let _ = admin.delete_topics(&[&topic], &AdminOptions::new()).await;
            })
        })
        .join();
    }
}

// ---------------------------------------------------------------------------------------------
// Liveness: a stage kept from progressing says so, and recovers
// ---------------------------------------------------------------------------------------------

/// The sink's database becomes unreachable while results keep coming: after `stall_after` the
/// sink is reported stalled (log, gauge, `/health/live` 503 naming the stage and why), and once
/// the database is back and the rows are written, live again. No stage exits meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stage_is_reported_not_live_until_it_moves_again() {
    if std::env::var_os("RUST_LOG").is_some() {
        weir::telemetry::init_logging();
    }
    let receiver = Receiver::start().await.unwrap();
    let (mut config, _dir) = test_config(&receiver, &[WELCOME]).await;
    // The sink reaches PostgreSQL through a proxy the test can cut.
    let url = reqwest::Url::parse(&config.database_url).unwrap();
    let target =
        tokio::net::lookup_host((url.host_str().unwrap(), url.port().unwrap_or(5432))).await.unwrap().next().unwrap();
    let proxy = CuttableProxy::start(target).await;
    let direct_url = config.database_url.clone();
    let mut proxied = url.clone();
    proxied.set_host(Some("127.0.0.1")).unwrap();
    proxied.set_port(Some(proxy.addr.port())).unwrap();
    config.database_url = proxied.to_string();
    config.health.stall_after = Duration::from_secs(1);
    let config = Arc::new(config);
    let stop_metrics = weir::shutdown::CancellationToken::new();
    let (metrics, _) = weir::telemetry::serve_metrics(([127, 0, 0, 1], 0).into(), stop_metrics.clone()).await.unwrap();
    let live = format!("http://{metrics}/health/live");
    let mut pipeline = Pipeline::start(config.clone(), &Pipeline::ALL).await.unwrap();
    let producer = Producer::new(&config).unwrap();
    let send = |from: usize, to: usize| {
        let producer = &producer;
        async move {
            let events = (from..to).map(|n| (member_created(n, 10), Format::Json));
            producer.send_all(events, 100).await.unwrap();
        }
    };

    send(0, 100).await;
    assert!(
        eventually(Duration::from_secs(60), || async { result_rows(&direct_url).await == 100 }).await,
        "rows {}",
        result_rows(&direct_url).await
    );

    proxy.set_up(false);
    send(100, 300).await;
    let sink_topic = config.names().topic("results");
    let sink_line = format!("stage sink topic {sink_topic}");
    let (stalled, last) =
        poll_endpoint(&live, Duration::from_secs(60), |status, body| status == 503 && body.contains(&sink_line)).await;
    assert!(stalled, "the sink was never reported stalled: {last:?}");
    let (_, body) = last.unwrap();
    assert!(
        ["backpressure", "not_taking_batches", "offsets_pending"].iter().any(|r| body.contains(r)),
        "the reason says the sink holds work: {body}"
    );
    let rendered = weir::telemetry::prometheus().render();
    assert!(
        rendered.lines().any(|l| l.starts_with("weir_stage_stalled{")
            && l.contains("stage=\"sink\"")
            && l.contains(&sink_topic)
            && l.ends_with(" 1")),
        "gauge weir_stage_stalled set for the sink"
    );
    if let Some(exit) = futures::FutureExt::now_or_never(pipeline.wait()) {
        panic!("a stage exited while the database was down: {exit:?}");
    }

    proxy.set_up(true);
    assert!(
        eventually(Duration::from_secs(60), || async { result_rows(&direct_url).await == 300 }).await,
        "rows {}",
        result_rows(&direct_url).await
    );
    let (recovered, last) = poll_endpoint(&live, Duration::from_secs(30), |status, _| status == 200).await;
    assert!(recovered, "still not live after the sink caught up: {last:?}");
    pipeline.stop().await.unwrap();
    stop_metrics.cancel();
}

// ---------------------------------------------------------------------------------------------
// The broker killed and restarted under a running pipeline
// ---------------------------------------------------------------------------------------------

/// Events per burst of load.
const BURST: usize = 300;

/// How long a count may stand still before the pipeline counts as stuck. Waits are bounded by
/// progress rather than by a total: a loaded machine is slow, a stuck pipeline does not move.
const STUCK: Duration = Duration::from_secs(60);

/// Polls `count` until it reaches `target` (true) or stops moving for [`STUCK`] (false).
async fn progresses(mut count: impl FnMut() -> usize, target: usize) -> bool {
    progresses_async(async || count(), target).await
}

async fn progresses_async(mut count: impl AsyncFnMut() -> usize, target: usize) -> bool {
    let (mut last, mut moved) = (count().await, tokio::time::Instant::now());
    while last < target {
        if moved.elapsed() > STUCK {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = count().await;
        if now != last {
            (last, moved) = (now, tokio::time::Instant::now());
        }
    }
    true
}

/// The repro, as a test: a pipeline under steady load, its broker killed with SIGKILL and
/// restarted three times (once for longer than the consumers' session timeout, so the group
/// re-forms), with the executor pausing partitions all the time (a small per-partition bound and a
/// slow service). Every task must be called and recorded, and after every restart the pipeline
/// must move again by itself: no stage exits, none is restarted.
#[test]
fn the_pipeline_completes_through_broker_kills_and_restarts() {
    if std::env::var_os("RUST_LOG").is_some() {
        weir::telemetry::init_logging();
    }
    let broker = OwnBroker::start();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let outcome =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| runtime.block_on(kills_and_restarts(&broker))));
    // A consumer leaving its group waits for the broker; if the test failed while the broker was
    // down, that would hold the runtime's shutdown (and the test) forever. So the shutdown is
    // bounded, and the broker is killed only after it.
    runtime.shutdown_timeout(Duration::from_secs(15));
    drop(broker);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn kills_and_restarts(broker: &OwnBroker) {
    let receiver = Receiver::start().await.unwrap();
    receiver.set_mode(weir::ops::receiver::Mode { latency: Duration::from_millis(5), ..Default::default() });
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("welcome.yaml"), WELCOME).unwrap();
    let mut config = Config {
        brokers: broker.brokers(),
        topic_prefix: unique("t") + ".",
        database_url: fresh_database().await,
        metrics_addr: None,
        topics_dir: repo_path("topics"),
        workflows: dir.path().to_path_buf(),
        ..Config::default()
    };
    config.services.insert(
        "webhook".into(),
        weir::config::ServiceConfig {
            url: receiver.url("hook"),
            timeout: Duration::from_secs(30),
            ..Default::default()
        },
    );
    config.network.allow = vec!["127.0.0.1/32".parse().unwrap()];
    // Partitions over this bound are paused by the executor: with a slow service, all the time.
    config.executor.partition_max_buffered = 20;
    // A record the broker has not acknowledged within `message.timeout.ms` (60 s) fails, and the
    // stage that produced it exits: the broker counts as lost. On a loaded machine a broker
    // restart alone can take about that long, so the test allows the outage more time.
    config.kafka.insert("message.timeout.ms".into(), "300000".into());
    config.validate().unwrap();
    weir::kafka::topics::apply_dir(&config, false).await.expect("topics apply");
    weir::ops::workflows::apply_dir(&config, dir.path(), false).await.expect("workflows apply");
    let config = Arc::new(config);

    let stop_metrics = weir::shutdown::CancellationToken::new();
    let (metrics, _) = weir::telemetry::serve_metrics(([127, 0, 0, 1], 0).into(), stop_metrics.clone()).await.unwrap();
    let ready = format!("http://{metrics}/health/ready");
    let mut pipeline = Pipeline::start(config.clone(), &Pipeline::ALL).await.unwrap();

    // Load: a burst of events before every kill (still being worked on when the broker dies) and
    // one after the last restart, produced in the background so producing may span an outage.
    let producer = Arc::new(Producer::new(&config).unwrap());
    let mut produced = 0;
    let mut loads = Vec::new();
    let mut burst = |loads: &mut Vec<tokio::task::JoinHandle<()>>| {
        let (producer, from) = (producer.clone(), produced);
        produced += BURST;
        loads.push(tokio::spawn(async move {
            let events = (from..from + BURST).map(|n| (member_created(n, 20), Format::Json));
            producer.send_all(events, 100).await.expect("producing events");
        }));
    };

    // Down for a moment, for longer than the session timeout (10 s, with the restart), and for a
    // moment again. A member that misses its session for that long gives its partitions up and
    // gets them back when the broker returns: the revoke and assign of the issue.
    for (round, outage) in
        [Duration::from_secs(1), Duration::from_secs(10), Duration::from_secs(1)].into_iter().enumerate()
    {
        burst(&mut loads);
        let before = called(&receiver);
        assert!(
            progresses(|| called(&receiver), before + 50).await,
            "round {round}: the pipeline did not move (calls {before} then {})",
            called(&receiver)
        );
        broker.kill();
        let (unready, last) = poll_endpoint(&ready, Duration::from_secs(30), |status, body| {
            status == 503 && body.contains("broker unreachable")
        })
        .await;
        assert!(unready, "round {round}: /health/ready never reported the broker unreachable: {last:?}");
        tokio::time::sleep(outage).await; // the outage itself, not a wait for a condition
        tokio::task::block_in_place(|| broker.up());
        if let Some(exit) = futures::FutureExt::now_or_never(pipeline.wait()) {
            panic!("round {round}: a stage exited during the outage: {exit:?}");
        }
    }
    // After the last restart, the pipeline must move again by itself too.
    burst(&mut loads);
    for load in loads {
        load.await.unwrap();
    }
    let url = config.database_url.clone();
    let all_called = progresses(|| called(&receiver), produced).await;
    assert!(all_called, "of {produced} tasks, only {} were called", called(&receiver));
    let mut rows = 0;
    let all_recorded = progresses_async(
        async || {
            rows = result_rows(&url).await.max(0) as usize;
            rows
        },
        produced,
    )
    .await;
    assert!(all_recorded, "of {produced} tasks, only {rows} were recorded");
    assert_eq!(called(&receiver), produced, "every task called, none other");
    assert_eq!(result_rows(&config.database_url).await, produced as i64, "every task recorded once");
    let (recovered, last) = poll_endpoint(&ready, Duration::from_secs(30), |status, _| status == 200).await;
    assert!(recovered, "/health/ready never recovered: {last:?}");
    if let Some(exit) = futures::FutureExt::now_or_never(pipeline.wait()) {
        panic!("a stage exited: {exit:?}");
    }
    pipeline.stop().await.unwrap();
    stop_metrics.cancel();
}
