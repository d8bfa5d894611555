//! The executor against the real broker and a real local HTTP server that enforces its own rate
//! limit, fails on a script and records each call's time and Idempotency-Key: throttling,
//! retries through delay topics, dead letters and redrive, fairness, shared limits, token limits.

mod common;

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use common::*;
use futures::future::BoxFuture;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::json;
use weir::{
    config::{Config, LimitConfig, Per, Scope, ServiceConfig},
    envelope::{ActionResult, ActionTask, Status},
    kafka::dead_letter,
    ops::produce::Producer,
    ops::receiver::{Call, Mode, Receiver},
    pipeline::{Pipeline, StageName},
    stages::execute::{self, CallOutcome, Connector},
};

const WELCOME: &str =
    "{id: welcome, version: 1, trigger: {type: member.created}, steps: [{id: notify, service: webhook}]}";

/// A config whose webhook service points at `receiver`, changed by `tweak`; topics applied again
/// so that any delay tiers the tweak adds exist.
async fn setup(receiver: &Receiver, tweak: impl FnOnce(&mut Config)) -> (Arc<Config>, common::TestDir) {
    let (mut config, dir) = test_config(receiver, &[WELCOME]).await;
    tweak(&mut config);
    config.validate().unwrap();
    weir::kafka::topics::apply_dir(&config, false).await.unwrap();
    (Arc::new(config), dir)
}

fn webhook(config: &mut Config) -> &mut ServiceConfig {
    config.services.get_mut("webhook").unwrap()
}

fn requests(n: u32, scope: Scope) -> LimitConfig {
    LimitConfig { requests: Some(n), cost: None, per: Per::Second, scope, burst: None }
}

use common::webhook_task as task;

async fn produce(config: &Config, tasks: &[ActionTask]) {
    let producer = Producer::for_topic(config, &config.names().actions("webhook")).unwrap();
    common::produce_tasks(&producer, tasks).await;
}

/// The most items (weighted by `weight`) whose time falls in one window `[t, t + width)`.
fn busiest_window(mut calls: Vec<(Instant, u64)>, width: Duration) -> u64 {
    calls.sort_by_key(|(t, _)| *t);
    let (mut start, mut sum, mut most) = (0, 0, 0);
    for end in 0..calls.len() {
        sum += calls[end].1;
        while calls[end].0 - calls[start].0 >= width {
            sum -= calls[start].1;
            start += 1;
        }
        most = most.max(sum);
    }
    most
}

fn key(c: &Call) -> String {
    c.idempotency_key.clone().unwrap_or_default()
}

fn results(config: &Config, want: usize) -> Vec<ActionResult> {
    read_topic(&config.names().results(), want, Duration::from_secs(30))
        .iter()
        .map(|m| serde_json::from_slice(rdkafka::Message::payload(m).unwrap()).unwrap())
        .collect()
}

/// Sum of the end offsets of `topic`'s partitions.
fn end_offsets(topic: &str, partitions: i32) -> i64 {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    (0..partitions).map(|p| consumer.fetch_watermarks(topic, p, Duration::from_secs(10)).unwrap().1).sum()
}

/// Waits until `tasks` calls were executed, then checks the service never had to refuse one
/// (429) and no one-second window held more than `per_second` calls.
async fn all_executed_within(receiver: &Receiver, tasks: usize, per_second: u64, timeout: Duration) {
    assert!(
        eventually(timeout, || async { receiver.executed() >= tasks }).await,
        "{} of {tasks} executed",
        receiver.executed()
    );
    let calls = receiver.calls();
    assert_eq!(calls.iter().filter(|c| c.status == 429).count(), 0, "the service never had to refuse a call");
    let busiest = busiest_window(calls.iter().map(|c| (c.at, 1)).collect(), Duration::from_secs(1));
    assert!(busiest <= per_second, "{busiest} calls in one second (limit {per_second})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_per_second_over_twenty_tenants_never_exceeds_the_services_limit() {
    let receiver = Receiver::start().await.unwrap();
    receiver.set_mode(Mode { rate_limit: Some(50), ..Default::default() });
    let (config, _dir) = setup(&receiver, |c| webhook(c).limits = vec![requests(50, Scope::Global)]).await;
    let pipeline = Pipeline::start(config.clone(), &[StageName::Execute]).await.unwrap();
    let tasks: Vec<ActionTask> = (0..500).map(|n| task(n, &format!("tenant-{}", n % 20), json!({}))).collect();
    produce(&config, &tasks).await;

    all_executed_within(&receiver, 500, 50, Duration::from_secs(40)).await;
    let results = results(&config, 500);
    assert_eq!(results.len(), 500);
    assert!(results.iter().all(|r| r.status == Status::Succeeded && r.attempts == 1));
    pipeline.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_retried_through_delay_topics_until_every_task_succeeds_once() {
    let receiver = Receiver::start().await.unwrap();
    let (config, _dir) = setup(&receiver, |c| {
        let s = webhook(c);
        s.retry.initial_backoff = Duration::from_millis(500);
        s.retry.attempts = 10;
        s.breaker.open = Duration::from_secs(1);
    })
    .await;
    let pipeline = Pipeline::start(config.clone(), &[StageName::Execute]).await.unwrap();
    let tasks: Vec<ActionTask> = (0..200).map(|n| task(n, &format!("tenant-{}", n % 10), json!({}))).collect();
    // Fails every call for 5 s, from before the first task arrives.
    receiver.fail_for(&[(429, Duration::from_millis(2_500)), (503, Duration::from_millis(2_500))]);
    produce(&config, &tasks).await;

    assert!(
        eventually(Duration::from_secs(60), || async { receiver.executed() >= 200 }).await,
        "{}",
        receiver.executed()
    );
    let calls = receiver.calls();
    assert!(calls.iter().any(|c| c.status == 429) && calls.iter().any(|c| c.status == 503), "the outage happened");
    let mut successes: HashMap<String, usize> = HashMap::new();
    for c in calls.iter().filter(|c| c.status < 300) {
        *successes.entry(key(c)).or_default() += 1;
    }
    assert_eq!(successes.len(), 200);
    assert!(successes.values().all(|n| *n == 1), "each key succeeded exactly once");
    let results = results(&config, 200);
    assert!(results.iter().all(|r| r.status == Status::Succeeded), "no failed result for a retried task");
    assert!(results.iter().any(|r| r.attempts > 1), "some tasks needed retries");
    assert!(read_topic(&config.names().dlq(), 1, Duration::from_secs(2)).is_empty(), "no dead letters");
    // No partition stalled: the committed offsets reach the end of the action topic, retried
    // copies included.
    let topic = config.names().actions("webhook");
    let end = end_offsets(&topic, 8);
    assert!(end > 200, "retries came back through the action topic");
    let group = config.names().execute_group("webhook");
    assert!(
        eventually(Duration::from_secs(20), || async { committed_total(&group, &topic, 8) == end }).await,
        "committed {} of {end}",
        committed_total(&group, &topic, 8)
    );
    pipeline.stop().await.unwrap();
}

async fn dead_letters_after_rejection(
    receiver: &Receiver,
    config: &Config,
    n: usize,
) -> Vec<rdkafka::message::OwnedMessage> {
    receiver.set_mode(Mode { fail_with: Some(400), ..Default::default() });
    let tasks: Vec<ActionTask> = (0..n).map(|i| task(i, &format!("tenant-{i}"), json!({"n": i}))).collect();
    produce(config, &tasks).await;
    read_topic(&config.names().dlq(), n, Duration::from_secs(30))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_failure_is_dead_lettered_after_one_attempt_then_redriven() {
    let receiver = Receiver::start().await.unwrap();
    let (config, _dir) = setup(&receiver, |_| {}).await;
    let pipeline = Pipeline::start(config.clone(), &[StageName::Execute]).await.unwrap();
    let letters = dead_letters_after_rejection(&receiver, &config, 3).await;
    assert_eq!(letters.len(), 3);
    for m in &letters {
        assert!(header(m, dead_letter::REASON).unwrap().contains("400"), "{:?}", header(m, dead_letter::REASON));
        assert_eq!(header(m, dead_letter::ATTEMPTS), Some("1"));
        assert!(header(m, dead_letter::FIRST_FAILURE).is_some());
        assert_eq!(header(m, dead_letter::ORIGIN_TOPIC), Some(config.names().actions("webhook").as_str()));
        assert!(header(m, dead_letter::ORIGIN_PARTITION).is_some() && header(m, dead_letter::ORIGIN_OFFSET).is_some());
    }
    assert_eq!(receiver.calls().len(), 3, "one attempt each");
    let failed = results(&config, 3);
    assert!(failed.iter().all(|r| r.status == Status::Failed && r.error.as_deref().unwrap().contains("400")));

    receiver.set_mode(Mode::default());
    let filter = weir::ops::dlq::Filter { service: Some("webhook".into()), ..Default::default() };
    let listed = list(&config, &filter).await;
    assert_eq!(listed.len(), 3);
    assert!(listed.iter().all(|d| !d.redriven));
    let other = weir::ops::dlq::Filter { tenant: Some("nobody".into()), ..Default::default() };
    assert_eq!(weir::ops::dlq::redrive(&config, &other, false).await.unwrap().sent, 0);
    assert_eq!(weir::ops::dlq::redrive(&config, &filter, false).await.unwrap().sent, 3);
    assert!(eventually(Duration::from_secs(30), || async { receiver.executed() == 3 }).await);
    let all = results(&config, 6);
    let succeeded: Vec<_> = all.iter().filter(|r| r.status == Status::Succeeded).collect();
    assert_eq!(succeeded.len(), 3);
    assert!(succeeded.iter().all(|r| r.attempts == 1), "attempts start again");

    // Remembered: a second redrive sends nothing, unless asked again.
    assert!(list(&config, &filter).await.iter().all(|d| d.redriven));
    let twice = weir::ops::dlq::redrive(&config, &filter, false).await.unwrap();
    assert_eq!((twice.sent, twice.skipped), (0, 3));
    let again = weir::ops::dlq::redrive(&config, &filter, true).await.unwrap();
    assert_eq!((again.sent, again.skipped), (3, 0));
    pipeline.stop().await.unwrap();
}

async fn list(config: &Arc<Config>, filter: &weir::ops::dlq::Filter) -> Vec<weir::ops::dlq::DeadLetter> {
    let (c, f) = (config.clone(), filter.clone());
    tokio::task::spawn_blocking(move || weir::ops::dlq::list(&c, &f)).await.unwrap().unwrap()
}

/// A filtered redrive records what it sent without hiding the letters it skipped, even those
/// below a resent one in the same dead-letter partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_redrive_marks_only_what_it_sent() {
    let receiver = Receiver::start().await.unwrap();
    let (config, _dir) = setup(&receiver, |_| {}).await;
    let pipeline = Pipeline::start(config.clone(), &[StageName::Execute]).await.unwrap();
    // Six tenants over the four dead-letter partitions: one partition holds two or more.
    assert_eq!(dead_letters_after_rejection(&receiver, &config, 6).await.len(), 6);
    pipeline.stop().await.unwrap();
    let all = weir::ops::dlq::Filter::default();
    let letters = list(&config, &all).await;
    let shared = (0..4)
        .map(|p| letters.iter().filter(|d| d.partition == p).collect::<Vec<_>>())
        .find(|in_p| in_p.len() >= 2)
        .expect("a partition with two letters");
    let (earlier, later) = (shared[0], shared[shared.len() - 1]);
    assert_ne!(earlier.key(), later.key());

    let one = weir::ops::dlq::Filter { tenant: Some(later.key()), ..Default::default() };
    assert_eq!(weir::ops::dlq::redrive(&config, &one, false).await.unwrap().sent, 1);
    let marked: Vec<String> = list(&config, &all).await.into_iter().filter(|d| d.redriven).map(|d| d.id()).collect();
    assert_eq!(marked, vec![later.id()], "only the letter sent is marked; {} below it is not", earlier.id());

    let rest = weir::ops::dlq::redrive(&config, &all, false).await.unwrap();
    assert_eq!((rest.sent, rest.skipped, rest.unrecorded), (5, 1, 0));
    assert!(list(&config, &all).await.iter().all(|d| d.redriven));
    assert_eq!(weir::ops::dlq::redrive(&config, &all, false).await.unwrap().sent, 0);
    // Every dead letter reached the action topic exactly once: 6 tasks, then 6 redriven.
    assert_eq!(read_topic(&config.names().actions("webhook"), 13, Duration::from_secs(3)).len(), 12);
}

/// A letter that cannot be resent stops the redrive with an error naming it; what was
/// acknowledged before is recorded, the failed one is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_resend_is_not_recorded_as_redriven() {
    let receiver = Receiver::start().await.unwrap();
    let (config, _dir) = setup(&receiver, |_| {}).await;
    let producer = weir::kafka::producer(&config).unwrap();
    let payload = serde_json::to_vec(&task(0, "tenant-0", json!({}))).unwrap();
    let (good, dlq) = (config.names().actions("webhook"), config.names().dlq());
    for origin in [good.as_str(), "not a valid topic name!"] {
        let headers = rdkafka::message::OwnedHeaders::new()
            .insert(rdkafka::message::Header { key: dead_letter::ORIGIN_TOPIC, value: Some(origin) });
        let record =
            rdkafka::producer::FutureRecord::to(&dlq).partition(0).key("tenant-0").payload(&payload).headers(headers);
        producer.send(record, Duration::from_secs(10)).await.unwrap();
    }
    let err = weir::ops::dlq::redrive(&config, &weir::ops::dlq::Filter::default(), false).await.unwrap_err();
    assert!(format!("{err:#}").contains("redriving 0:1 to not a valid topic name!"), "{err:#}");
    let marked: Vec<(String, bool)> =
        list(&config, &weir::ops::dlq::Filter::default()).await.iter().map(|d| (d.id(), d.redriven)).collect();
    assert_eq!(marked, vec![("0:0".to_string(), true), ("0:1".to_string(), false)]);
    assert_eq!(read_topic(&good, 2, Duration::from_secs(3)).len(), 1, "the good letter was resent once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_dlq_redrive_through_the_binary() {
    let receiver = Receiver::start().await.unwrap();
    let (config, dir) = setup(&receiver, |_| {}).await;
    let pipeline = Pipeline::start(config.clone(), &[StageName::Execute]).await.unwrap();
    assert_eq!(dead_letters_after_rejection(&receiver, &config, 1).await.len(), 1);
    let file = write_config_file(&config, dir.path());
    let weir = |args: &[&str]| {
        let out = weir_command(&file, args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let listed = weir(&["dlq", "list", "--service", "webhook", "--since", "1h"]);
    assert!(listed.contains("HTTP 400") && listed.contains("tenant-0"), "{listed}");
    let id = listed.lines().nth(1).unwrap().split_whitespace().next().unwrap().to_string();
    assert!(weir(&["dlq", "show", &id]).contains("weir.error.attempts: 1"));
    receiver.set_mode(Mode::default());
    assert!(weir(&["dlq", "redrive", "--service", "webhook"]).contains("redrove 1 dead letters"));
    assert!(eventually(Duration::from_secs(30), || async { receiver.executed() == 1 }).await);
    let listed = weir(&["dlq", "list"]);
    assert!(listed.lines().next().unwrap().contains("redriven"), "{listed}");
    assert!(listed.lines().nth(1).unwrap().contains(" yes "), "{listed}");
    let twice = weir(&["dlq", "redrive", "--service", "webhook"]);
    assert!(twice.contains("redrove 0 dead letters") && twice.contains("skipped 1 already redriven"), "{twice}");
    assert!(weir(&["dlq", "redrive", "--again"]).contains("redrove 1 dead letters"));
    pipeline.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_over_its_limit_does_not_hold_back_the_others() {
    let receiver = Receiver::start().await.unwrap();
    let (config, _dir) = setup(&receiver, |c| webhook(c).limits = vec![requests(20, Scope::Tenant)]).await;
    let pipeline = Pipeline::start(config.clone(), &[StageName::Execute]).await.unwrap();
    // Tenant A's 10,000 tasks first, so the others' tasks sit behind them in A's partition.
    let mut tasks: Vec<ActionTask> = (0..10_000).map(|n| task(n, "tenant-A", json!({}))).collect();
    let others: Vec<String> = "BCDEFGHIJK".chars().map(|c| format!("tenant-{c}")).collect();
    tasks.extend((0..1_000).map(|n| task(10_000 + n, &others[n % 10], json!({}))));
    produce(&config, &tasks).await;

    let per_tenant = |calls: &[Call]| {
        let mut n: HashMap<String, usize> = HashMap::new();
        for c in calls.iter().filter(|c| c.status < 300 && !c.replayed) {
            *n.entry(c.tenant.clone().unwrap_or_default()).or_default() += 1;
        }
        n
    };
    let others_done = eventually(Duration::from_secs(60), || {
        let done = per_tenant(&receiver.calls());
        let ok = others.iter().all(|t| done.get(t) == Some(&100));
        async move { ok }
    })
    .await;
    let done = per_tenant(&receiver.calls());
    assert!(others_done, "{done:?}");
    let a = done.get("tenant-A").copied().unwrap_or(0);
    assert!(a > 0 && a < 10_000, "A is still draining ({a} done) while B-K are finished");
    pipeline.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_executor_processes_share_one_global_limit() {
    let receiver = Receiver::start().await.unwrap();
    receiver.set_mode(Mode { rate_limit: Some(40), ..Default::default() });
    let (config, _dir) = setup(&receiver, |c| {
        webhook(c).limits = vec![requests(40, Scope::Global)];
        // The membership check below reads the classic group API (librdkafka's ListGroups and
        // DescribeGroups), which lists no members of a KIP-848 group.
        c.consumer_groups.protocol = weir::config::GroupProtocol::Cooperative;
    })
    .await;
    let first = Pipeline::start(config.clone(), &[StageName::Execute]).await.unwrap();
    let second = Pipeline::start(config.clone(), &[StageName::Execute]).await.unwrap();
    let tasks: Vec<ActionTask> = (0..400).map(|n| task(n, &format!("tenant-{}", n % 20), json!({}))).collect();
    produce(&config, &tasks).await;

    all_executed_within(&receiver, 400, 40, Duration::from_secs(50)).await;
    // Both were members of the group, each owning some of the partitions.
    let group = config.names().execute_group("webhook");
    let consumer: BaseConsumer = rdkafka::ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    let groups = consumer.fetch_group_list(Some(&group), Duration::from_secs(10)).unwrap();
    let members = groups.groups().first().map(|g| g.members().len()).unwrap_or(0);
    assert_eq!(members, 2, "two executor processes in {group}");
    first.stop().await.unwrap();
    second.stop().await.unwrap();
}

/// The webhook connector, with the cost estimate a template would give: the task's
/// `input.estimate` (the receiver reports the real `input.tokens`).
struct Estimated(Arc<dyn Connector>);

impl Connector for Estimated {
    fn estimate_cost(&self, task: &ActionTask) -> u64 {
        task.input["estimate"].as_u64().unwrap_or(1)
    }

    fn call<'a>(&'a self, task: &'a ActionTask) -> BoxFuture<'a, CallOutcome> {
        self.0.call(task)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_limit_holds_as_corrected_by_reported_usage() {
    let (rate, burst, concurrency) = (1_000u64, 200u32, 4usize);
    let receiver = Receiver::start().await.unwrap();
    let (config, _dir) = setup(&receiver, |c| {
        let s = webhook(c);
        s.limits = vec![LimitConfig {
            requests: None,
            cost: Some(rate as u32),
            per: Per::Second,
            scope: Scope::Global,
            burst: Some(burst),
        }];
        s.concurrency = Some(concurrency);
    })
    .await;
    let shutdown = weir::shutdown::CancellationToken::new();
    let connector =
        Arc::new(Estimated(weir::connectors::build("webhook", &config.services["webhook"], &config.network).unwrap()));
    let executor = tokio::spawn(execute::run_with(config.clone(), "webhook".into(), connector, shutdown.clone()));
    // Varied token counts; every other task is estimated at half what it uses.
    let tokens = |n: usize| (n * 37 % 181 + 20) as u64;
    let tasks: Vec<ActionTask> = (0..60)
        .map(|n| {
            let estimate = if n % 2 == 0 { tokens(n) } else { tokens(n) / 2 };
            task(n, &format!("tenant-{}", n % 6), json!({"tokens": tokens(n), "estimate": estimate}))
        })
        .collect();
    let total: u64 = (0..60).map(tokens).sum();
    produce(&config, &tasks).await;

    assert!(eventually(Duration::from_secs(40), || async { receiver.executed() >= 60 }).await);
    let calls = receiver.calls();
    let used: Vec<(Instant, u64)> = calls.iter().map(|c| (c.at, c.body["input"]["tokens"].as_u64().unwrap())).collect();
    assert_eq!(used.iter().map(|(_, t)| t).sum::<u64>(), total);
    // GCRA grants at most the burst plus (limit - burst) per second; under-estimates are charged
    // after their call, so at most `concurrency` calls' worth of extra can be in use ahead of it.
    let max_extra = concurrency as u64 * (0..60).map(|n| tokens(n) - tokens(n) / 2).max().unwrap();
    let span =
        (used.iter().map(|(t, _)| *t).max().unwrap() - used.iter().map(|(t, _)| *t).min().unwrap()).as_secs_f64();
    let allowed = burst as f64 + (rate - burst as u64) as f64 * span + max_extra as f64;
    assert!((total as f64) <= allowed, "{total} tokens in {span:.2}s, allowed {allowed:.0}");
    let busiest = busiest_window(used, Duration::from_secs(1));
    assert!(busiest <= rate + max_extra, "{busiest} tokens in one second");
    let results = results(&config, 60);
    let by_task: HashMap<&str, u64> = results.iter().map(|r| (r.task_id.as_str(), r.cost.unwrap())).collect();
    assert!((0..60).all(|n| by_task[format!("task-{n}").as_str()] == tokens(n)), "results carry the reported cost");
    shutdown.cancel();
    executor.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_partition_stops_while_the_others_flow_and_resumes_where_it_stopped() {
    let receiver = Receiver::start().await.unwrap();
    let (config, _dir) = setup(&receiver, |_| {}).await;
    let topic = config.names().actions("webhook");
    let mut source = weir::kafka::source::Source::subscribe(
        &config,
        weir::telemetry::Stage::Execute,
        &topic,
        &config.names().group("pause-test"),
    )
    .unwrap();
    let mut assignment = source.assignment();
    assert!(
        tokio::time::timeout(Duration::from_secs(30), assignment.wait_for(|a| a.owned.len() == 8)).await.is_ok(),
        "all 8 partitions assigned"
    );
    assert_eq!(assignment.borrow().partitions, 8);
    // Two tenants whose tasks land in different partitions.
    let tenant_in = |p: i32| {
        (0..)
            .map(|n| format!("tenant-{n}"))
            .find(|t| weir::kafka::partitioner::partition_for_key(t.as_bytes(), 8) == p)
            .unwrap()
    };
    let (held, flowing) = (tenant_in(0), tenant_in(1));
    source.pause_partition(0);
    let tasks: Vec<ActionTask> =
        (0..40).map(|n| task(n, if n % 2 == 0 { &held } else { &flowing }, json!({}))).collect();
    produce(&config, &tasks).await;

    let mut seen: HashMap<i32, usize> = HashMap::new();
    take(&mut source, &mut seen, Duration::from_secs(5)).await;
    assert_eq!(seen.get(&1), Some(&20), "the other partition flowed");
    assert_eq!(seen.get(&0), None, "the paused partition delivered nothing");
    source.resume_partition(0);
    take(&mut source, &mut seen, Duration::from_secs(5)).await;
    assert_eq!(seen.get(&0), Some(&20), "resumed from where it stopped, nothing lost or repeated");
    source.close();
}

/// Takes batches for `until`, counting messages per partition and marking them done.
async fn take(source: &mut weir::kafka::source::Source, seen: &mut HashMap<i32, usize>, until: Duration) {
    let deadline = tokio::time::Instant::now() + until;
    while let Ok(Some(batch)) = tokio::time::timeout_at(deadline, source.recv()).await {
        for d in batch {
            *seen.entry(d.ticket.partition).or_default() += 1;
            source.done(&d.ticket);
        }
    }
}

/// A tenant no HTTP header can carry (issue 11: a CR/LF in a tenant failed at the executor with
/// `builder error: failed to parse header value`, naming no header): its task fails at once as a
/// permanent error naming the header and the character, with no call and no retry, while another
/// tenant's task goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_no_header_can_carry_fails_once_naming_the_header() {
    let receiver = Receiver::start().await.unwrap();
    let (config, _dir) = setup(&receiver, |c| webhook(c).retry.attempts = 5).await;
    let pipeline = Pipeline::start(config.clone(), &[StageName::Execute]).await.unwrap();
    let bad = "tenant\r\nX-Injected: yes";
    produce(&config, &[task(0, bad, json!({})), task(1, "tenant-good", json!({}))]).await;

    let results = results(&config, 2);
    assert_eq!(results.len(), 2, "{results:?}");
    let by_tenant: HashMap<&str, &ActionResult> = results.iter().map(|r| (r.tenant.as_str(), r)).collect();
    let failed = by_tenant[bad];
    assert_eq!((failed.status, failed.attempts), (Status::Failed, 1), "failed at the first attempt, not retried");
    let error = failed.error.as_deref().unwrap();
    assert!(error.contains("header X-Weir-Tenant") && error.contains("U+000D"), "{error}");
    assert_eq!(by_tenant["tenant-good"].status, Status::Succeeded);

    let letters = read_topic(&config.names().dlq(), 1, Duration::from_secs(10));
    assert_eq!(letters.len(), 1);
    assert!(header(&letters[0], dead_letter::REASON).unwrap().contains("header X-Weir-Tenant"));
    assert_eq!(header(&letters[0], dead_letter::ATTEMPTS), Some("1"));
    let calls = receiver.calls();
    assert_eq!(calls.len(), 1, "no request was sent for the bad tenant");
    assert_eq!(calls[0].tenant.as_deref(), Some("tenant-good"));
    pipeline.stop().await.unwrap();
}

/// `weir run` stops on SIGTERM after its in-flight work, so a call that hangs holds the stop; a
/// second SIGTERM exits at once, with the status of a process ended by SIGTERM (128 + 15).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_exits_without_waiting_for_in_flight_calls() {
    let receiver = Receiver::start().await.unwrap();
    let (config, dir) = setup(&receiver, |c| webhook(c).timeout = std::time::Duration::from_secs(600)).await;
    receiver.set_mode(Mode { latency: Duration::from_secs(600), ..Default::default() });
    let file = write_config_file(&config, dir.path());
    let mut weir = WeirProcess::start(&file, &["run", "--stage", "execute"]);
    produce(&config, &[task(0, "tenant-0", json!({}))]).await;
    assert!(
        eventually(Duration::from_secs(60), || async { receiver.arrived() == 1 }).await,
        "the call is in flight; log:\n{}",
        weir.output()
    );
    let pid = weir.child.id().to_string();
    let sigterm = || assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    sigterm();
    assert!(
        eventually(Duration::from_secs(30), || {
            let stopping = weir.output().contains("SIGTERM: stopping after in-flight work");
            async move { stopping }
        })
        .await,
        "{}",
        weir.output()
    );
    assert!(weir.child.try_wait().unwrap().is_none(), "the hanging call holds the graceful stop");
    sigterm();
    let mut status = None;
    assert!(
        eventually(Duration::from_secs(30), || {
            status = status.or_else(|| weir.child.try_wait().unwrap());
            let exited = status.is_some();
            async move { exited }
        })
        .await,
        "exited after the second signal; log:\n{}",
        weir.output()
    );
    assert_eq!(status.unwrap().code(), Some(143), "{}", weir.output());
    assert!(weir.output().contains("exiting without finishing in-flight work"), "{}", weir.output());
}
