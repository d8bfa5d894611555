//! `weir status` against the real broker: its figures are the broker's own (issue 13's
//! acceptance), read without joining any group; and what only a running process knows comes
//! from that process's `/metrics`.

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::{eventually, test_config};
use rdkafka::{
    consumer::{BaseConsumer, CommitMode, Consumer},
    producer::{BaseRecord, DefaultProducerContext, Producer as _, ThreadedProducer},
    ClientConfig, Offset, TopicPartitionList,
};
use weir::{
    config::Config,
    ops::{
        receiver::Receiver,
        status::{self, GroupStatus, Status},
    },
};

const PARTITIONS: i32 = 8;
/// Records put on each partition of `events` and `results`.
const PER_PARTITION: i64 = 25;
/// Timestamp of the record at offset `o` of partition `p`: an hour ago plus a second per record,
/// a different one for each partition, so the oldest unprocessed record is known exactly.
fn timestamp(base: i64, p: i32, o: i64) -> i64 {
    base + (p as i64) * 100_000 + o * 1_000
}

fn produce(topic: &str, partitions: i32, per_partition: i64, base: i64) {
    let producer: ThreadedProducer<DefaultProducerContext> =
        ClientConfig::new().set("bootstrap.servers", common::brokers()).create().unwrap();
    for p in 0..partitions {
        for o in 0..per_partition {
            let payload = format!("{{\"n\":{o}}}");
            let record = BaseRecord::<[u8], [u8]>::to(topic)
                .partition(p)
                .payload(payload.as_bytes())
                .timestamp(timestamp(base, p, o));
            producer.send(record).map_err(|(e, _)| e).unwrap();
        }
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

/// Commits `offsets` (partition → offset) for `group` from outside it: an OffsetCommit of a
/// consumer that never joins.
fn commit_outside(group: &str, topic: &str, offsets: &BTreeMap<i32, i64>) {
    let consumer: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", common::brokers()).set("group.id", group).create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for (p, o) in offsets {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*o)).unwrap();
    }
    consumer.commit(&tpl, CommitMode::Sync).unwrap();
}

/// The broker's own answer: committed offsets of `group` and the high watermarks of `topic`.
fn broker_view(group: &str, topic: &str) -> (BTreeMap<i32, Option<i64>>, BTreeMap<i32, i64>) {
    let consumer: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", common::brokers()).set("group.id", group).create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    let committed = (0..PARTITIONS)
        .map(|p| {
            let offset = match committed.find_partition(topic, p).unwrap().offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            };
            (p, offset)
        })
        .collect();
    let ends =
        (0..PARTITIONS).map(|p| (p, consumer.fetch_watermarks(topic, p, Duration::from_secs(10)).unwrap().1)).collect();
    (committed, ends)
}

fn group<'a>(status: &'a Status, stage: &str, role: &str) -> &'a GroupStatus {
    let stage = status.stages.iter().find(|s| s.stage == stage).unwrap_or_else(|| panic!("no stage {stage}"));
    stage.groups.iter().find(|g| g.role == role).unwrap_or_else(|| panic!("no {role} group"))
}

/// Asserts that `g` shows exactly the broker's committed and end offsets, and the lag between.
fn assert_matches_broker(g: &GroupStatus) {
    let (committed, ends) = broker_view(&g.group, &g.topic);
    assert_eq!(g.error, None, "{}", g.group);
    assert_eq!(g.partitions.len(), PARTITIONS as usize, "{}", g.group);
    for p in &g.partitions {
        assert_eq!(p.committed, committed[&p.partition], "{} committed offset of partition {}", g.group, p.partition);
        assert_eq!(p.end, ends[&p.partition], "{} end offset of partition {}", g.group, p.partition);
        assert_eq!(p.lag, p.end - p.committed.unwrap_or(p.start), "{} lag of partition {}", g.group, p.partition);
    }
    assert_eq!(g.lag, g.partitions.iter().map(|p| p.lag).sum::<i64>());
}

/// A member of `group` on `topic` (joins it with the rebalance `protocol`, `classic` or
/// `consumer`), polled until it holds every partition.
fn member(config: &Config, group: &str, topic: &str, protocol: &str) -> BaseConsumer {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .set("group.id", group)
        .set("group.protocol", protocol)
        .set("client.id", format!("status-test-{protocol}"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while consumer.assignment().unwrap().count() < PARTITIONS as usize {
        assert!(std::time::Instant::now() < deadline, "the member was never assigned all of {topic}");
        // Polling runs the join and the rebalance; the records it returns are not wanted.
        let _ = consumer.poll(Duration::from_millis(100));
    }
    consumer
}

#[tokio::test(flavor = "multi_thread")]
async fn status_figures_are_the_brokers_committed_and_end_offsets() {
    let receiver = Receiver::start().await.unwrap();
    let (config, dir) = test_config(&receiver, &[]).await;
    let names = config.names();
    let base = chrono::Utc::now().timestamp_millis() - 3_600_000;
    produce(&names.events(), PARTITIONS, PER_PARTITION, base);
    produce(&names.results(), PARTITIONS, PER_PARTITION, base);
    // topics/pipeline.yaml gives the dead-letter topic 4 partitions.
    produce(&names.dlq(), 4, 2, base);

    // The evaluator's group: nothing committed on partition 0, 3 × p records done on partition p,
    // and all of partition 7 (no lag there).
    let evaluated: BTreeMap<i32, i64> =
        (1..PARTITIONS).map(|p| (p, if p == 7 { PER_PARTITION } else { 3 * p as i64 })).collect();
    commit_outside(&names.group("evaluate"), &names.events(), &evaluated);
    // The record stage's group has a live member, which commits PER_PARTITION - p on partition p.
    // It is on the KIP-848 protocol, whose groups the classic DescribeGroups request shows as
    // `Dead` with no members; the webhook executor's group has a classic member.
    let sink = member(&config, &names.group("sink"), &names.results(), "consumer");
    let _executor = member(&config, &names.execute_group("webhook"), &names.actions("webhook"), "classic");
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(&names.results(), p, Offset::Offset(PER_PARTITION - p as i64)).unwrap();
    }
    sink.commit(&tpl, CommitMode::Sync).unwrap();

    // The library's answer, and the binary's `--json`, which must be the same document.
    let status = status::collect(&config, &status::Options::default()).await.unwrap();
    let file = common::write_config_file(&config, dir.path());
    let output = common::weir_command(&file, &["status", "--json"]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let from_binary: Status = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(from_binary.schema, status::SCHEMA);

    for status in [&status, &from_binary] {
        let evaluate = group(status, "evaluate", "main");
        assert_matches_broker(evaluate);
        let expected_lag: i64 = (0..PARTITIONS).map(|p| PER_PARTITION - evaluated.get(&p).copied().unwrap_or(0)).sum();
        assert_eq!(evaluate.lag, expected_lag);
        assert_eq!(evaluate.members.len(), 0, "offsets committed from outside make no member");
        for p in &evaluate.partitions {
            let next = p.committed.unwrap_or(0);
            // The oldest unprocessed record is the one at the committed offset: its own timestamp.
            let want = (next < PER_PARTITION).then(|| timestamp(base, p.partition, next));
            assert_eq!(p.oldest_unprocessed_ms, want, "partition {}", p.partition);
        }
        assert!(evaluate.oldest_unprocessed_age_secs.is_some_and(|a| a >= 3_600.0 - 60.0));

        let sink = group(status, "sink", "main");
        assert_matches_broker(sink);
        assert_eq!(sink.lag, (0..PARTITIONS as i64).sum::<i64>());
        assert_eq!((sink.state.as_str(), sink.protocol.as_str()), ("Stable", "Consumer"));
        assert_eq!(sink.members.len(), 1, "{:?}", sink.members);
        assert_eq!(sink.members[0].client_id, "status-test-consumer");
        assert_eq!(sink.members[0].partitions, (0..PARTITIONS).collect::<Vec<_>>());

        // The executor's groups have committed nothing: they lag by whatever their topics hold.
        let execute = group(status, "execute", "main");
        assert_matches_broker(execute);
        assert_eq!((execute.lag, execute.partitions.iter().all(|p| p.committed.is_none())), (0, true));
        assert_eq!((execute.state.as_str(), execute.protocol.as_str()), ("Stable", "Classic"));
        assert_eq!(execute.members.len(), 1, "{:?}", execute.members);
        assert_eq!(execute.members[0].client_id, "status-test-classic");
        assert_eq!(execute.members[0].partitions, (0..PARTITIONS).collect::<Vec<_>>());
        let stage = status.stages.iter().find(|s| s.service.as_deref() == Some("webhook")).unwrap();
        let tiers = config.services["webhook"].retry.tiers.len();
        assert_eq!(
            stage.groups.len(),
            1 + 1 + 2 * 2 + tiers,
            "main, overflow, high and low with their overflow, and one per retry tier"
        );
        assert_eq!(stage.breaker.as_deref(), Some("unknown (no metrics endpoint)"), "metrics_addr is null");

        assert_eq!((status.dead_letters.written, status.dead_letters.retained), (8, 8));
    }
    // Reading the groups joined none: the sink's member is still alone and kept its partitions.
    let _ = sink.poll(Duration::from_millis(100));
    assert_eq!(sink.assignment().unwrap().count(), PARTITIONS as usize);
    let again = status::collect(&config, &status::Options::default()).await.unwrap();
    assert_eq!(group(&again, "sink", "main").members.len(), 1);
    assert_eq!(group(&again, "evaluate", "main").members.len(), 0);
    // The table shows the same figures.
    let table = status::render(&status);
    assert!(table.contains(&format!("lag {expected}", expected = group(&status, "evaluate", "main").lag)), "{table}");
    assert!(table.contains("status-test-classic") && table.contains("status-test-consumer"), "{table}");
}

/// Breaker state and throttle wait come from a running executor's `/metrics`, and that endpoint
/// labels consumer lag by topic and partition.
#[tokio::test(flavor = "multi_thread")]
async fn process_figures_come_from_the_metrics_endpoint() {
    let receiver = Receiver::start().await.unwrap();
    let (config, _dir) = test_config(&receiver, &[]).await;
    let stop = weir::shutdown::CancellationToken::new();
    let (addr, _) = weir::telemetry::serve_metrics(([127, 0, 0, 1], 0).into(), stop.clone()).await.unwrap();
    let url = format!("http://{addr}/metrics");
    let config = std::sync::Arc::new(config);
    let pipeline =
        weir::pipeline::Pipeline::start(config.clone(), &[weir::pipeline::StageName::Execute]).await.unwrap();

    // Records the executor cannot read as tasks: dead-lettered, so it commits and has a position
    // on each partition, and librdkafka's statistics (every 5 s) then carry its lag, by topic and
    // partition.
    produce(&config.names().actions("webhook"), PARTITIONS, 1, chrono::Utc::now().timestamp_millis());
    let lag_line =
        format!("weir_consumer_lag{{stage=\"execute\",topic=\"{}\",partition=\"", config.names().actions("webhook"));
    let shown = eventually(Duration::from_secs(30), || async {
        reqwest::get(&url).await.unwrap().text().await.unwrap().contains(&lag_line)
    })
    .await;
    assert!(shown, "no {lag_line}… on /metrics:\n{}", reqwest::get(&url).await.unwrap().text().await.unwrap());

    let options = status::Options { metrics: vec![url.clone(), "http://127.0.0.1:9/metrics".into()] };
    let status = status::collect(&config, &options).await.unwrap();
    let stage = status.stages.iter().find(|s| s.service.as_deref() == Some("webhook")).unwrap();
    assert_eq!(stage.breaker.as_deref(), Some("closed"), "the executor runs behind {url} and never tripped");
    let wait = stage.throttle_wait.as_ref().unwrap();
    assert_eq!((wait.calls, wait.unknown.as_deref()), (Some(0), None), "no limits: no call waited");
    assert_eq!(status.metrics.len(), 2);
    assert_eq!(status.metrics[0].error, None);
    assert!(status.metrics[1].error.is_some(), "the second URL does not answer, and says so");
    // The executor is a member of its group now.
    let main = group(&status, "execute", "main");
    assert_eq!(main.members.len(), 1, "{main:?}");
    assert_eq!(main.members[0].partitions.len(), PARTITIONS as usize);

    pipeline.stop().await.unwrap();
    stop.cancel();
}

/// `weir run --stage execute --service NAME` (one Deployment per service) starts that service's
/// executor and no other's; the groups show it.
#[tokio::test(flavor = "multi_thread")]
async fn one_services_executor_runs_alone() {
    let receiver = Receiver::start().await.unwrap();
    let (mut config, _dir) = test_config(&receiver, &[]).await;
    let other = weir::config::ServiceConfig { url: receiver.url("other"), ..config.services["webhook"].clone() };
    config.services.insert("other".into(), other);
    weir::kafka::topics::apply_dir(&config, false).await.unwrap();
    let config = std::sync::Arc::new(config);
    let execute = [weir::pipeline::StageName::Execute];
    let unknown = weir::pipeline::Pipeline::start_services(config.clone(), &execute, &["nope".into()]).await;
    assert!(unknown.err().unwrap().to_string().contains("--service nope"));

    let pipeline = weir::pipeline::Pipeline::start_services(config.clone(), &execute, &["other".into()]).await.unwrap();
    let members = |status: &Status, service: &str| {
        let stage = status.stages.iter().find(|s| s.service.as_deref() == Some(service)).unwrap();
        stage.groups.iter().find(|g| g.role == "main").unwrap().members.len()
    };
    let joined = eventually(Duration::from_secs(30), || {
        let config = config.clone();
        async move { members(&status::collect(&config, &status::Options::default()).await.unwrap(), "other") == 1 }
    })
    .await;
    assert!(joined, "the executor of `other` never joined its group");
    let status = status::collect(&config, &status::Options::default()).await.unwrap();
    assert_eq!(members(&status, "other"), 1);
    assert_eq!(members(&status, "webhook"), 0, "webhook's executor was not asked for");
    pipeline.stop().await.unwrap();
}

/// Each executor's tenant classes, with their share of the call slots and their backlog, come
/// from its `/metrics` (issue 17: "each tenant's share in `weir status`"): two tenants with work,
/// one weighted 3, share the slots 3:1 whatever their backlogs; once both are drained nobody has a
/// share and the calls counted are the tasks produced.
#[tokio::test(flavor = "multi_thread")]
async fn tenant_shares_come_from_the_executors() {
    const NOISY: usize = 200;
    const STEADY: usize = 100;
    let receiver = Receiver::start().await.unwrap();
    // Slow enough that both tenants, called one task at a time, have a backlog for several reports.
    receiver.set_mode(weir::ops::receiver::Mode { latency: Duration::from_millis(100), ..Default::default() });
    let (mut config, _dir) = test_config(&receiver, &[]).await;
    config.executor.fairness.weights.insert("noisy".into(), 3);
    let stop = weir::shutdown::CancellationToken::new();
    let (addr, _) = weir::telemetry::serve_metrics(([127, 0, 0, 1], 0).into(), stop.clone()).await.unwrap();
    let options = status::Options { metrics: vec![format!("http://{addr}/metrics")] };
    let config = std::sync::Arc::new(config);
    let pipeline =
        weir::pipeline::Pipeline::start(config.clone(), &[weir::pipeline::StageName::Execute]).await.unwrap();
    let tasks: Vec<_> = (0..NOISY + STEADY)
        .map(|n| {
            let tenant = if n % 3 == 2 && n / 3 < STEADY { "steady" } else { "noisy" };
            common::webhook_task(n, tenant, serde_json::json!({"seq": n}))
        })
        .collect();
    assert_eq!(tasks.iter().filter(|t| t.tenant == "steady").count(), STEADY);
    let producer = weir::ops::produce::Producer::for_topic(&config, &config.names().actions("webhook")).unwrap();
    common::produce_tasks(&producer, &tasks).await;

    let tenants = |status: &Status| {
        status.stages.iter().find(|s| s.service.as_deref() == Some("webhook")).unwrap().tenants.clone()
    };
    let near = |a: f64, b: f64| (a - b).abs() < 1e-9;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
    let both_busy = eventually(Duration::from_secs(60), || {
        let (config, options, seen) = (config.clone(), options.clone(), seen.clone());
        async move {
            let status = status::collect(&config, &options).await.unwrap();
            let t = tenants(&status);
            let busy = |name: &str| t.iter().find(|c| c.tenant == name && c.backlog > 0).cloned();
            if let (Some(noisy), Some(steady)) = (busy("noisy"), busy("steady")) {
                *seen.lock().unwrap() = Some((noisy, steady, status::render(&status)));
            }
            seen.lock().unwrap().is_some()
        }
    })
    .await;
    assert!(
        both_busy,
        "no report showed both tenants with a backlog: {:?}",
        tenants(&status::collect(&config, &options).await.unwrap())
    );
    let (noisy, steady, table) = seen.lock().unwrap().take().unwrap();
    assert!(
        near(noisy.share, 0.75) && near(steady.share, 0.25),
        "weights 3:1 → shares 3/4 and 1/4: {noisy:?} {steady:?}"
    );
    assert!(table.contains("noisy") && table.contains("75.0%") && table.contains("25.0%"), "{table}");

    let drained = eventually(Duration::from_secs(120), || {
        let (config, options) = (config.clone(), options.clone());
        async move {
            let t = tenants(&status::collect(&config, &options).await.unwrap());
            t.iter().map(|c| c.calls).sum::<u64>() == (NOISY + STEADY) as u64
                && t.iter().all(|c| c.share == 0.0 && c.backlog == 0)
        }
    })
    .await;
    let t = tenants(&status::collect(&config, &options).await.unwrap());
    assert!(drained, "the classes' calls are not the {} tasks called, or a share is left: {t:?}", NOISY + STEADY);
    assert_eq!(receiver.executed(), NOISY + STEADY);
    pipeline.stop().await.unwrap();
    stop.cancel();
}
