//! Recovery (issue 12, items 1–3): `weir run` killed with SIGKILL again and again under load
//! repeats at most the calls in flight; a repaired failure is recorded as repaired and its run
//! goes on; a restarted process rejoins its groups without waiting for its old session.
//!
//! Real broker, database and HTTP receiver; `weir run` is the real binary, started as a child
//! process and killed like a crash (nothing flushed, nothing committed).

mod common;

use std::{sync::Arc, time::Duration};

use common::{
    outcome::{finish, Outcome},
    *,
};
use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    ClientConfig,
};
use serde_json::json;
use weir::{
    config::Config,
    envelope::{Event, Format},
    ops::{
        produce::Producer,
        receiver::{Mode, Receiver},
    },
    pipeline::Pipeline,
};

async fn produce(config: &Config, events: impl Iterator<Item = Event>) {
    let producer = Producer::new(config).unwrap();
    producer.send_all(events.map(|e| (e, Format::Json)), 1_000).await.unwrap();
}

/// The members of `group` as the broker describes it.
fn members(group: &str) -> usize {
    let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    let groups = consumer.fetch_group_list(Some(group), Duration::from_secs(10)).unwrap();
    groups.groups().iter().find(|g| g.name() == group).map_or(0, |g| g.members().len())
}

// ---------------------------------------------------------------------------------------------
// kill -9 under load
// ---------------------------------------------------------------------------------------------

/// Calls in flight at once, and tasks held until their outcome is durable, in the runs below.
/// A crash can repeat only a call whose outcome was not yet on the results topic; a call holds
/// its concurrency slot until its outcome is durable, so that is at most `CONCURRENCY` per kill.
const CONCURRENCY: usize = 32;
const MAX_BUFFERED: usize = 200;

/// Runs `n` events for `tenants` tenants through `weir run` (the binary), killing it with SIGKILL
/// `kills` times at evenly spaced points of the work and starting it again at once, then lets it
/// finish. The points are counted in calls, not on a clock: a fast machine must not finish the
/// work before the kills, and a slow one must not be killed before it has done anything.
async fn run_with_kills(
    workflow: &str,
    steps: usize,
    ordered_step: &str,
    n: usize,
    tenants: usize,
    kills: usize,
) -> (usize, Outcome) {
    let receiver = Receiver::start().await.unwrap();
    // A little latency, so that calls are in flight whenever the process dies.
    receiver.set_mode(Mode { latency: Duration::from_millis(5), ..Default::default() });
    let (mut config, dir) = test_config(&receiver, &[workflow]).await;
    config.instance_id = Some(unique("recovery-"));
    // Restarting at once under the same id after SIGKILL is the classic protocol's static
    // membership: KIP-848 (`consumer`, the default) refuses the id until the broker's session
    // timeout expires (see src/kafka/mod.rs, "Restarts without the dead pause").
    config.consumer_groups.protocol = weir::config::GroupProtocol::Cooperative;
    config.executor.concurrency = CONCURRENCY;
    config.executor.max_buffered = MAX_BUFFERED;
    let file = write_config_file(&config, dir.path());
    produce(&config, (0..n).map(|i| member_created(i, tenants))).await;

    let expected = (n * steps) as i64;
    let url = config.database_url.clone();
    let mut weir = WeirProcess::start(&file, &["run"]);
    let mut killed = 0;
    // Calls the receiver had seen when the running process started.
    let mut started_at = 0;
    while killed < kills {
        // Kills spread through the work, and each after the restarted process has made half a
        // stretch of calls of its own (the acceptance kills every 10 s, not twice in a row): when
        // this loop falls behind a fast pipeline on a loaded machine, the next threshold may
        // already be passed, and a kill right after a restart would catch the calls the previous
        // kill left in flight a second time.
        let stretch = expected as usize / (kills + 1);
        let at = ((killed + 1) * stretch).max(started_at + stretch / 2);
        let reached = eventually(Duration::from_secs(120), || async { receiver.arrived() >= at }).await;
        if !reached || scalar(&url, "select count(*) from action_results").await >= expected {
            break;
        }
        weir.kill();
        killed += 1;
        started_at = receiver.arrived();
        eprintln!("kill {killed} after {started_at} arrivals");
        weir = WeirProcess::start(&file, &["run"]);
    }
    finish(&receiver, &config, expected as usize, Duration::from_secs(300), &[&weir]).await;
    weir.kill();
    (killed, Outcome::of(&receiver, &url, Some(ordered_step)).await)
}

/// The checks of [`Outcome::check`], with at most the calls in flight at each of `kills` repeated,
/// and the figure the issue asks for: repeated calls per kill.
fn check((kills, outcome): (usize, Outcome), tasks: usize) {
    eprintln!("{kills} kills: {:.1} repeated calls per kill", outcome.repeated() as f64 / kills.max(1) as f64);
    assert!(kills >= 3, "the work outlasted several kills: {kills} kills, {outcome:?}");
    outcome.check(tasks, kills * CONCURRENCY);
}

/// Single-step workflow: 12,000 events for 200 tenants, killed 6 times through the work (what runs
/// in about two minutes of a debug build on two cores; the 100,000 is the same run, longer).
/// Measured: about 17 extra calls per kill with 32 calls in flight at most; without the skip of
/// completed tasks the same run made about 1,200 extra calls per kill, some keys three times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_six_times_repeats_at_most_the_calls_in_flight() {
    // WEIR_RECOVERY_EVENTS=100000 runs the size (docs/recovery.md has its figures).
    let n = events_or("WEIR_RECOVERY_EVENTS", 12_000);
    let outcome = run_with_kills(SINGLE_STEP, 1, "notify", n, 200, 6).await;
    check(outcome, n);
}

/// Diamond workflow (a → b, c → d): 3,000 events (12,000 tasks) for 100 tenants, killed 6 times
/// through the work. The record stage's next steps are replayed too (produced, then the transaction lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_a_diamond_workflow_calls_no_step_more_than_twice() {
    let n = events_or("WEIR_RECOVERY_EVENTS", 3_000);
    let outcome = run_with_kills(DIAMOND, 4, "a", n, 100, 6).await;
    check(outcome, 4 * n);
}

// ---------------------------------------------------------------------------------------------
// A repaired failure
// ---------------------------------------------------------------------------------------------

const TWO_STEPS: &str = "
id: two
version: 1
trigger: {type: order.paid}
steps:
  - {id: a, service: webhook, input: {n: '{{ data.n }}'}}
  - {id: b, service: webhook, needs: [a], input: {n: '{{ data.n }}'}}
";

async fn rows(url: &str, sql: &str) -> Vec<(String, String)> {
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let rows = sqlx::query_as(sql).fetch_all(&pool).await.unwrap();
    pool.close().await;
    rows
}

/// A permanent failure dead-lettered, the service fixed, `weir dlq redrive`: the step's row
/// reads `succeeded`, its run goes on, and the second step runs once. A replayed copy of the
/// old failure does not turn the row back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redriven_success_replaces_the_failed_row_and_the_run_continues_once() {
    let receiver = Receiver::start().await.unwrap();
    let (config, dir) = test_config(&receiver, &[TWO_STEPS]).await;
    let file = write_config_file(&config, dir.path());
    let config = Arc::new(config);
    let pipeline = Pipeline::start(config.clone(), &Pipeline::ALL).await.unwrap();
    let url = config.database_url.clone();

    receiver.set_mode(Mode { fail_with: Some(400), ..Default::default() });
    let runs = 3;
    let events = (0..runs).map(|i| {
        serde_json::from_value::<Event>(
            json!({"id": format!("o-{i}"), "source": "/shop", "type": "order.paid", "tenant": format!("shop-{i}"), "data": {"n": i}}),
        )
        .unwrap()
    });
    produce(&config, events).await;
    let failed = eventually(Duration::from_secs(60), || async {
        scalar(&url, "select count(*) from workflow_runs where status = 'failed'").await == runs
    })
    .await;
    assert!(failed, "the runs failed: {:?}", rows(&url, "select run_id, status from workflow_runs").await);
    assert_eq!(
        rows(&url, "select step_id, status from action_results").await,
        vec![("a".to_string(), "failed".to_string()); runs as usize]
    );

    receiver.set_mode(Mode::default());
    let redrive = weir_command(&file, &["dlq", "redrive", "--service", "webhook"]).output().unwrap();
    let said = String::from_utf8_lossy(&redrive.stdout).to_string() + &String::from_utf8_lossy(&redrive.stderr);
    assert!(redrive.status.success() && said.contains("redrove 3 dead letters"), "{said}");

    let finished = eventually(Duration::from_secs(60), || async {
        scalar(&url, "select count(*) from workflow_runs where status = 'succeeded'").await == runs
    })
    .await;
    assert!(finished, "the runs went on: {:?}", rows(&url, "select run_id, status from workflow_runs").await);
    let mut stored = rows(&url, "select step_id, status from action_results order by step_id").await;
    stored.dedup();
    assert_eq!(stored, vec![("a".into(), "succeeded".into()), ("b".into(), "succeeded".into())]);
    assert_eq!(scalar(&url, "select count(*) from action_results").await, 2 * runs, "one row per step");
    assert_eq!(scalar(&url, "select count(*) from workflow_runs where error is not null").await, 0);
    let calls = receiver.calls();
    let of = |step: &str| calls.iter().filter(|c| c.body["step_id"] == step).count() as i64;
    assert_eq!((of("a"), of("b")), (2 * runs, runs), "a failed once and succeeded once; b ran once per run");

    // The old failure replayed (its results partition read again): the row stays `succeeded`.
    let results_topic = config.names().results();
    let records =
        tokio::task::spawn_blocking(move || read_topic(&results_topic, 9, Duration::from_secs(30))).await.unwrap();
    let mut stale: serde_json::Value = records
        .iter()
        .filter_map(|m| serde_json::from_slice::<serde_json::Value>(rdkafka::Message::payload(m)?).ok())
        .find(|r| r["status"] == "failed")
        .expect("the failures are on the results topic");
    let task_id = stale["task_id"].as_str().unwrap().to_string();
    let tenant = stale["tenant"].as_str().unwrap().to_string();
    let results = Producer::for_topic(&config, &config.names().results()).unwrap();
    results.send_raw(tenant.as_bytes(), stale.to_string().as_bytes(), "application/json").await.unwrap();
    // A marker after it in the same partition (same tenant key): once the marker's row is there,
    // the stale failure was written before it.
    stale["task_id"] = json!("marker");
    stale["workflow_id"] = json!("other");
    stale.as_object_mut().unwrap().remove("event");
    results.send_raw(tenant.as_bytes(), stale.to_string().as_bytes(), "application/json").await.unwrap();
    let recorded = eventually(Duration::from_secs(30), || async {
        scalar(&url, "select count(*) from action_results where task_id = 'marker'").await == 1
    })
    .await;
    assert!(recorded, "the marker was recorded");
    let status = rows(&url, &format!("select task_id, status from action_results where task_id = '{task_id}'")).await;
    assert_eq!(status[0].1, "succeeded", "never succeeded → failed");
    pipeline.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Restarts without the dead pause
// ---------------------------------------------------------------------------------------------

/// Without an instance id, a clean exit (SIGTERM) leaves every group at once: the broker lists
/// no member afterwards, so the rest of the group need not wait for a session to expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_exit_leaves_its_groups() {
    let receiver = Receiver::start().await.unwrap();
    let (mut config, dir) = test_config(&receiver, &[SINGLE_STEP]).await;
    // `members` reads the classic group API (ListGroups, DescribeGroups), which lists no members
    // of a KIP-848 group; tests/scale.rs shows the default protocol's hand-over on a clean exit.
    config.consumer_groups.protocol = weir::config::GroupProtocol::Cooperative;
    let file = write_config_file(&config, dir.path());
    let mut weir = WeirProcess::start(&file, &["run"]);
    let groups =
        [config.names().group("evaluate"), config.names().execute_group("webhook"), config.names().group("sink")];
    let joined = eventually(Duration::from_secs(60), || async { groups.iter().all(|g| members(g) == 1) }).await;
    assert!(joined, "the stages joined their groups; log:\n{}", tail(&weir.output()));
    terminate(&weir);
    let status = weir.child.wait().unwrap();
    assert!(status.success(), "clean exit: {status:?}; log:\n{}", tail(&weir.output()));
    for g in &groups {
        assert_eq!(members(g), 0, "{g} has no member left");
    }
}

/// With an instance id, a process killed with SIGKILL and started again takes its member's
/// place at once: with a session timeout of 60 s, events produced after the restart are all
/// recorded well within it, and each group still has one member (the old one was replaced, not
/// waited for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_under_the_same_instance_id_does_not_wait_for_the_old_session() {
    let receiver = Receiver::start().await.unwrap();
    let (mut config, dir) = test_config(&receiver, &[SINGLE_STEP]).await;
    config.instance_id = Some(unique("static-"));
    // The classic protocol: under KIP-848 (`consumer`, the default) a static member killed without
    // leaving keeps its id until the broker's session timeout, and the client sets no session
    // timeout (tests/scale.rs restarts a member cleanly under it instead).
    config.consumer_groups.protocol = weir::config::GroupProtocol::Cooperative;
    // Far longer than the deadline below: a member that had to wait for its predecessor's
    // session to expire could not make it.
    config.kafka.insert("session.timeout.ms".into(), "60000".into());
    let file = write_config_file(&config, dir.path());
    let url = config.database_url.clone();
    let mut weir = WeirProcess::start(&file, &["run"]);
    produce(&config, (0..100).map(|i| member_created(i, 10))).await;
    let first = eventually(Duration::from_secs(60), || async {
        scalar(&url, "select count(*) from action_results").await == 100
    })
    .await;
    assert!(first, "the first events were recorded; log:\n{}", tail(&weir.output()));

    weir.kill();
    let _restarted = WeirProcess::start(&file, &["run"]);
    produce(&config, (100..200).map(|i| member_created(i, 10))).await;
    let second = eventually(Duration::from_secs(30), || async {
        scalar(&url, "select count(*) from action_results").await == 200
    })
    .await;
    assert!(
        second,
        "{} of 200 rows within 30 s of the restart",
        scalar(&url, "select count(*) from action_results").await
    );
    for g in [config.names().group("evaluate"), config.names().execute_group("webhook"), config.names().group("sink")] {
        assert_eq!(members(&g), 1, "{g}: the restarted member replaced the old one");
    }
}
