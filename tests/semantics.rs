//! Workflow semantics (issue 16): a step's own timeout and retry, expiry, and `weir runs`,
//! through the real broker, database and a real local HTTP receiver.

mod common;

use std::{sync::Arc, time::Duration};

use common::*;
use serde_json::json;
use weir::{
    envelope::{Event, Format},
    ops::produce::Producer,
    ops::receiver::{Mode, Receiver},
    ops::replay::{Options, Selection},
    pipeline::{Pipeline, StageName},
};

async fn produce(config: &weir::config::Config, events: Vec<Event>) {
    let producer = Producer::new(config).unwrap();
    producer.send_all(events.into_iter().map(|e| (e, Format::Json)), 1_000).await.unwrap();
}

/// A step asking for 100 ms against a service allowing 5 s, and for 2 attempts where the service
/// allows 5: the receiver answering in 500 ms sees exactly 2 calls, and the task fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_times_out_at_its_own_timeout_and_retries_per_its_own_retry() {
    const SLOW: &str = "
id: slow
trigger: {type: member.created}
steps:
  - {id: call, service: webhook, timeout_ms: 100, retry: {attempts: 2, backoff_ms: 100}}
";
    let receiver = Receiver::start().await.unwrap();
    receiver.set_mode(Mode { latency: Duration::from_millis(500), ..Default::default() });
    let (config, _dir) = test_config(&receiver, &[SLOW]).await;
    assert_eq!(config.services["webhook"].retry.attempts, 5, "the service's own policy allows more attempts");
    assert!(config.services["webhook"].timeout >= Duration::from_secs(1), "and a longer timeout");
    let config = Arc::new(config);
    let pipeline = Pipeline::start(config.clone(), &Pipeline::ALL).await.unwrap();
    produce(&config, vec![member_created(1, 1)]).await;

    let url = config.database_url.clone();
    let failed = "select count(*) from action_results where status = 'failed' and attempts = 2";
    let done = eventually(Duration::from_secs(60), || async { scalar(&url, failed).await == 1 }).await;
    let rows = scalar(&url, "select count(*) from action_results").await;
    pipeline.stop().await.unwrap();
    assert!(done, "one failed result after 2 attempts ({rows} rows, {} calls arrived)", receiver.arrived());
    assert_eq!(rows, 1);
    // Every attempt reached the service, and the step's retry, not the service's 5, bounded them.
    assert_eq!(receiver.arrived(), 2, "calls that arrived at the service");
    let error: String = sqlx::query_scalar("select error from action_results")
        .fetch_one(&sqlx::PgPool::connect(&url).await.unwrap())
        .await
        .unwrap();
    assert!(error.contains("timed out after 100 ms"), "{error}");
}

const EXPIRING: &str = "
id: welcome
expires_after: 2s
trigger: {type: member.created}
steps:
  - {id: email, service: webhook, input: {kind: welcome}}
";

/// The outage: `events` member.created events (timed now) evaluated while the executor is down,
/// until their `expires_after: 2s` has passed. Returns the running evaluator and sink.
async fn evaluated_past_expiry(config: &Arc<weir::config::Config>, events: usize, receiver: &Receiver) -> Pipeline {
    let running = Pipeline::start(config.clone(), &[StageName::Evaluate, StageName::Sink]).await.unwrap();
    let now = chrono::Utc::now();
    let events: Vec<Event> = (0..events)
        .map(|n| {
            let mut e = member_created(n, 4);
            e.time = Some(now.to_rfc3339());
            e
        })
        .collect();
    let count = events.len() as i64;
    produce(config, events).await;
    let (group, topic) = (config.names().group("evaluate"), config.names().events());
    let past = eventually(Duration::from_secs(60), || async {
        committed_total(&group, &topic, 8) == count && chrono::Utc::now() > now + chrono::Duration::seconds(2)
    })
    .await;
    assert!(past, "the evaluator took every event, and their expiry passed");
    assert_eq!(receiver.arrived(), 0, "the executor is not running yet");
    running
}

/// Events of a workflow with `expires_after: 2s`, evaluated while the executor is down; the
/// executor starts once they are past it: each is an `expired` row and none is called, while the
/// same events' tasks of a workflow without expiry are called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_past_their_expiry_after_an_outage_are_expired_and_never_called() {
    const LASTING: &str = "
id: audit
trigger: {type: member.created}
steps:
  - {id: log, service: webhook, input: {kind: audit}}
";
    const EVENTS: usize = 20;
    let receiver = Receiver::start().await.unwrap();
    let (config, _dir) = test_config(&receiver, &[EXPIRING, LASTING]).await;
    let config = Arc::new(config);
    let running = evaluated_past_expiry(&config, EVENTS, &receiver).await;

    let executor = Pipeline::start(config.clone(), &[StageName::Execute]).await.unwrap();
    let url = config.database_url.clone();
    let expired = "select count(*) from action_results where status = 'expired' and workflow_id = 'welcome'";
    let done = eventually(Duration::from_secs(60), || async {
        scalar(&url, expired).await == EVENTS as i64 && receiver.succeeded() == EVENTS
    })
    .await;
    // Once the executor stored the offset of every task, nothing more can be called.
    let actions = config.names().actions("webhook");
    let group = config.names().execute_group("webhook");
    let settled =
        eventually(Duration::from_secs(30), || async { committed_total(&group, &actions, 8) == 2 * EVENTS as i64 })
            .await;
    executor.stop().await.unwrap();
    running.stop().await.unwrap();
    assert!(done, "expired rows {}, calls {}", scalar(&url, expired).await, receiver.succeeded());
    assert!(settled, "the executor committed every task");
    let calls = receiver.calls();
    assert_eq!(calls.len(), EVENTS, "only the lasting workflow's tasks were called");
    assert!(calls.iter().all(|c| c.body["input"]["kind"] == json!("audit")), "no expired task was called");
    let reason = "select count(*) from action_results where status = 'expired' and error like 'expired at %'";
    assert_eq!(scalar(&url, reason).await, EVENTS as i64, "each expired row says when it expired");
}

/// Tasks that expired during an outage: `weir replay` alone sends them again with their deadline,
/// so they expire again, uncalled; `weir replay --ignore-expiry` sends them without it, and each
/// is called once and its row turns from `expired` to `succeeded`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_with_ignore_expiry_calls_the_tasks_that_expired() {
    const EVENTS: usize = 6;
    let receiver = Receiver::start().await.unwrap();
    let (config, _dir) = test_config(&receiver, &[EXPIRING]).await;
    let config = Arc::new(config);
    let from = chrono::Utc::now() - chrono::Duration::seconds(1);
    let running = evaluated_past_expiry(&config, EVENTS, &receiver).await;
    let executor = Pipeline::start(config.clone(), &[StageName::Execute]).await.unwrap();
    let url = config.database_url.clone();
    let rows = |status: &str| format!("select count(*) from action_results where status = '{status}'");
    let (actions, group) = (config.names().actions("webhook"), config.names().execute_group("webhook"));
    // Every task taken and settled: the executor stored the offset of the last one sent.
    let settled = |tasks: i64| {
        let (actions, group) = (actions.clone(), group.clone());
        async move { eventually(Duration::from_secs(60), || async { committed_total(&group, &actions, 8) == tasks }).await }
    };
    let expired = eventually(Duration::from_secs(60), || async { scalar(&url, &rows("expired")).await == 6 }).await;
    assert!(expired && settled(6).await, "the outage's tasks expired: {}", scalar(&url, &rows("expired")).await);

    let replay = |ignore_expiry| {
        let selection = Selection { from, ignore_expiry, ..Selection::default() };
        weir::ops::replay::start(&config, selection, Options { dry_run: false, progress: false })
    };
    let plain = replay(false).await.unwrap();
    assert_eq!(plain.tally.total().calls, EVENTS as u64, "the expired tasks are what the replay sends");
    assert!(settled(12).await, "the executor took the replayed tasks");
    assert_eq!(receiver.arrived(), 0, "sent with their deadline, they expired again, uncalled");

    let overriding = replay(true).await.unwrap();
    assert_eq!(overriding.tally.total().calls, EVENTS as u64);
    let called = eventually(Duration::from_secs(60), || async {
        scalar(&url, &rows("succeeded")).await == EVENTS as i64 && receiver.executed() == EVENTS
    })
    .await;
    let settled = settled(18).await;
    executor.stop().await.unwrap();
    running.stop().await.unwrap();
    assert!(called, "called {}, succeeded rows {}", receiver.executed(), scalar(&url, &rows("succeeded")).await);
    assert!(settled, "the executor settled every replayed task");
    assert_eq!(receiver.arrived(), EVENTS, "each expired task called once");
    assert_eq!(scalar(&url, &rows("expired")).await, 0, "no row says expired any more");
}

/// The run id the evaluator gives `event`'s run of `yaml`.
fn run_id(yaml: &str, event: &Event) -> String {
    let def = serde_yaml_ng::from_str(yaml).unwrap();
    let services = std::collections::BTreeSet::from(["webhook"]);
    weir::engine::workflow::CompiledWorkflow::compile(def, &services).unwrap().run_id(event)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_show_lists_a_diamond_runs_four_steps_in_order_with_timings() {
    let receiver = Receiver::start().await.unwrap();
    let (config, dir) = test_config(&receiver, &[DIAMOND]).await;
    let config = Arc::new(config);
    let pipeline = Pipeline::start(config.clone(), &Pipeline::ALL).await.unwrap();
    let event = member_created(7, 1);
    let run = run_id(DIAMOND, &event);
    produce(&config, vec![event]).await;
    let url = config.database_url.clone();
    let sql = format!("select count(*) from workflow_runs where run_id = '{run}' and status = 'succeeded'");
    let done = eventually(Duration::from_secs(60), || async { scalar(&url, &sql).await == 1 }).await;
    pipeline.stop().await.unwrap();
    assert!(done, "the diamond run succeeded");

    let file = write_config_file(&config, dir.path());
    let out = weir_command(&file, &["runs", "show", &run]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("status succeeded"), "{text}");
    let steps: Vec<&str> = text.lines().filter(|l| l.contains(" succeeded ")).collect();
    let ids: Vec<&str> = steps.iter().map(|l| l.split_whitespace().next().unwrap()).collect();
    assert_eq!(ids, ["a", "b", "c", "d"], "the workflow's order:\n{text}");
    for line in steps {
        // status, attempts, started, finished, latency, output size
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols[2], "1", "one attempt: {line}");
        assert!(cols[3].parse::<chrono::DateTime<chrono::Utc>>().is_ok(), "started: {line}");
        assert!(cols[4].parse::<chrono::DateTime<chrono::Utc>>().is_ok(), "finished: {line}");
        assert!(cols[3] <= cols[4], "started before finished: {line}");
        assert!(cols[5].ends_with("ms"), "latency: {line}");
    }
    let list = weir_command(&file, &["runs", "list", "--workflow", "diamond", "--since", "1h"]).output().unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(list.lines().any(|l| l.starts_with(&run) && l.contains("succeeded")), "{list}");
}

/// A chain a → b → c with the receiver holding each call 2 s: cancelled while `a` is being
/// called, the run records `b` as cancelled, never calls `b` or `c`, and ends `cancelled`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_cancel_in_the_middle_of_a_slow_run_stops_the_rest() {
    const CHAIN: &str = "
id: chain
trigger: {type: member.created}
steps:
  - {id: a, service: webhook}
  - {id: b, service: webhook, needs: [a]}
  - {id: c, service: webhook, needs: [b]}
";
    let receiver = Receiver::start().await.unwrap();
    receiver.set_mode(Mode { latency: Duration::from_secs(2), ..Default::default() });
    let (config, dir) = test_config(&receiver, &[CHAIN]).await;
    let config = Arc::new(config);
    let pipeline = Pipeline::start(config.clone(), &Pipeline::ALL).await.unwrap();
    let event = member_created(3, 1);
    let run = run_id(CHAIN, &event);
    produce(&config, vec![event]).await;
    assert!(eventually(Duration::from_secs(60), || async { receiver.arrived() >= 1 }).await, "step a is called");

    let file = write_config_file(&config, dir.path());
    let out = weir_command(&file, &["runs", "cancel", &run]).output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success() && said.contains("cancelled"), "{said}{}", String::from_utf8_lossy(&out.stderr));

    let url = config.database_url.clone();
    let sql = format!("select count(*) from workflow_runs where run_id = '{run}' and status = 'cancelled'");
    let ended = eventually(Duration::from_secs(60), || async { scalar(&url, &sql).await == 1 }).await;
    let results = config.names().results();
    // Every result the run produced is stored once the sink's offsets reach the topic's end.
    let stored = eventually(Duration::from_secs(30), || async {
        committed_total(&config.names().group("sink"), &results, 8) >= 1
    })
    .await;
    pipeline.stop().await.unwrap();
    assert!(ended && stored, "the run ended cancelled");
    let row = |step: &str, status: &str| {
        format!(
            "select count(*) from action_results where run_id = '{run}' and step_id = '{step}' and status = '{status}'"
        )
    };
    assert_eq!(scalar(&url, &row("a", "succeeded")).await, 1, "a, under way, finished");
    assert_eq!(scalar(&url, &row("b", "cancelled")).await, 1, "b is recorded cancelled");
    assert_eq!(scalar(&url, &format!("select count(*) from action_results where run_id = '{run}'")).await, 2);
    assert_eq!(receiver.arrived(), 1, "only a was called");
    let show = weir_command(&file, &["runs", "show", &run]).output().unwrap();
    let show = String::from_utf8_lossy(&show.stdout);
    assert!(show.contains("status cancelled") && show.contains("run cancelled"), "{show}");
}

/// Steps already on the action topic when their runs are cancelled: one tenant's single-step
/// runs, called one at a time by a receiver holding each call 3 s. Cancelled while the first is
/// being called, the runs of the third and fourth events are recorded `cancelled` and never
/// called (the executor follows the cancellations topic); the first two are called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_cancel_stops_steps_already_queued_on_the_action_topic() {
    const ONE: &str = "
id: one
trigger: {type: member.created}
steps:
  - {id: only, service: webhook, input: {seq: '{{ data.seq }}'}}
";
    let receiver = Receiver::start().await.unwrap();
    receiver.set_mode(Mode { latency: Duration::from_secs(3), ..Default::default() });
    let (config, dir) = test_config(&receiver, &[ONE]).await;
    let config = Arc::new(config);
    let pipeline = Pipeline::start(config.clone(), &Pipeline::ALL).await.unwrap();
    // One tenant, events without a subject: its tasks are called one at a time, in order.
    let events: Vec<Event> = (0..4).map(|n| member_created(n, 1)).collect();
    let runs: Vec<String> = events.iter().map(|e| run_id(ONE, e)).collect();
    produce(&config, events).await;
    assert!(eventually(Duration::from_secs(60), || async { receiver.arrived() >= 1 }).await, "the first is called");

    let file = write_config_file(&config, dir.path());
    for run in &runs[2..] {
        let out = weir_command(&file, &["runs", "cancel", run, "--reason", "sent by mistake"]).output().unwrap();
        let said = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success() && said.contains("cancelled"), "{said}{}", String::from_utf8_lossy(&out.stderr));
    }
    let url = config.database_url.clone();
    let all = eventually(Duration::from_secs(60), || async {
        scalar(&url, "select count(*) from action_results").await == 4
    })
    .await;
    pipeline.stop().await.unwrap();
    assert!(all, "a row per run: {}", scalar(&url, "select count(*) from action_results").await);
    for (n, run) in runs.iter().enumerate() {
        let status = if n < 2 { "succeeded" } else { "cancelled" };
        let sql = format!("select count(*) from action_results where run_id = '{run}' and status = '{status}'");
        assert_eq!(scalar(&url, &sql).await, 1, "run {n} is {status}");
    }
    let why = "select count(*) from action_results where status = 'cancelled' and error like 'run cancelled: sent by mistake%'";
    assert_eq!(scalar(&url, why).await, 2, "each cancelled row says why");
    let seqs: Vec<u64> = receiver.calls().iter().map(|c| c.body["input"]["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [0, 1], "only the runs not cancelled were called");
}
