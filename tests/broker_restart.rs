//! Faults of the infrastructure under a running pipeline (issue 11): a partition's pause across
//! rebalances, the liveness watchdog and health endpoints, and a broker killed with SIGKILL and
//! restarted several times under load. The last test runs its own broker on another port, so
//! killing it leaves the shared one (and every other test) alone.

mod common;

use std::{
    collections::{BTreeSet, HashSet},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use common::*;
use rdkafka::{
    admin::{AdminOptions, NewTopic, TopicReplication},
    consumer::{BaseConsumer, Consumer},
    producer::{FutureProducer, FutureRecord},
    ClientConfig, Message,
};
use serde_json::json;
use weir::{
    config::Config,
    envelope::{Event, Format},
    kafka::source::Source,
    ops::{produce::Producer, receiver::Receiver},
    pipeline::Pipeline,
    telemetry::Stage,
};

const WELCOME: &str =
    "{id: welcome, version: 1, trigger: {type: member.created}, steps: [{id: notify, service: webhook}]}";

fn member_created(n: usize, tenants: usize) -> Event {
    serde_json::from_value(json!({
        "id": format!("e-{n}"),
        "source": "/ghost/test",
        "type": "member.created",
        "tenant": format!("tenant-{}", n % tenants),
        "data": {"seq": n},
    }))
    .unwrap()
}

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

// ---------------------------------------------------------------------------------------------
// Pause state across a rebalance
// ---------------------------------------------------------------------------------------------

/// librdkafka keeps a partition's application pause across revoke and assign. The source used to
/// forget its own record of the pause on revoke, so the stage's later resume did nothing and the
/// partition never delivered again (the executor that went silent after a broker restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_partition_resumes_after_a_rebalance() {
    let config = Config { brokers: brokers(), topic_prefix: unique("t") + ".", ..Config::default() };
    let topic = config.topic("paused");
    let group = config.group("paused");
    let admin = weir::kafka::admin(&config).unwrap();
    let created = admin
        .create_topics(&[NewTopic::new(&topic, 2, TopicReplication::Fixed(1))], &AdminOptions::new())
        .await
        .unwrap();
    assert!(created.iter().all(|r| r.is_ok()), "{created:?}");
    let _cleanup = DeleteTopicOnDrop(config.clone(), topic.clone());

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
    let member = SecondMember::join(&topic, &group);
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
    fn join(topic: &str, group: &str) -> SecondMember {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("session.timeout.ms", "10000")
            .create()
            .unwrap();
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
