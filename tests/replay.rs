//! `weir replay` against the real broker, database and a real local HTTP receiver: re-driving
//! what a service outage dead-lettered (and nothing that had succeeded), starting the runs a
//! fixed definition now matches, dry-run counts equal to the real replay's, a replay killed with
//! `kill -9` and resumed without a call made twice, `action_results` rebuilt from the results
//! topic after a truncation, and CLI errors printed with the usage.

mod common;

use std::{collections::HashMap, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use common::*;
use serde_json::json;
use weir::{
    config::Config,
    envelope::{Event, Format},
    ops::produce::Producer,
    ops::receiver::{Call, Mode, Receiver},
    ops::replay::{self, Options, Selection, Tally},
    pipeline::{Pipeline, StageName},
};

const SIGNUP_PAID: &str = "{id: signup, version: 1, trigger: {type: member.created, if: 'data.plan == \"paid\"'},
    steps: [{id: notify, service: webhook}]}";
/// The fixed definition: trial members were meant to be welcomed too.
const SIGNUP_FIXED: &str = "{id: signup, version: 2,
    trigger: {type: member.created, if: 'data.plan == \"paid\" || data.plan == \"trial\"'},
    steps: [{id: notify, service: webhook}]}";

/// A config whose webhook service is called once per task (a 5xx dead-letters it at once) and
/// never waits behind an open breaker, so an outage leaves failed tasks behind.
async fn setup(receiver: &Receiver, workflows: &[&str], tweak: impl FnOnce(&mut Config)) -> (Arc<Config>, TestDir) {
    let (mut config, dir) = test_config(receiver, workflows).await;
    let webhook = config.services.get_mut("webhook").unwrap();
    webhook.retry.attempts = 1;
    webhook.breaker.enabled = false;
    tweak(&mut config);
    config.validate().unwrap();
    (Arc::new(config), dir)
}

fn event(id: &str, tenant: &str, plan: &str) -> Event {
    serde_json::from_value(json!({
        "id": id, "source": "/ghost/test", "type": "member.created", "tenant": tenant, "data": {"plan": plan},
    }))
    .unwrap()
}

async fn produce(config: &Config, events: &[Event]) {
    let producer = Producer::for_topic(config, &config.names().events()).unwrap();
    for e in events {
        producer.send(e, Format::Json).await.unwrap();
    }
}

/// A time strictly after every record produced so far and before any produced later.
async fn boundary() -> DateTime<Utc> {
    let t = Utc::now();
    // Record timestamps are milliseconds: let the clock leave this one.
    assert!(eventually(Duration::from_secs(1), || async { Utc::now() - t > chrono::Duration::milliseconds(2) }).await);
    t + chrono::Duration::milliseconds(1)
}

async fn rows(pool: &sqlx::PgPool, status: &str) -> i64 {
    sqlx::query_scalar("select count(*) from action_results where status = $1")
        .bind(status)
        .fetch_one(pool)
        .await
        .unwrap_or(0)
}

fn key(c: &Call) -> String {
    c.idempotency_key.clone().unwrap_or_default()
}

/// Calls per idempotency key, split into (failed, succeeded).
fn calls_per_key(receiver: &Receiver) -> HashMap<String, (usize, usize)> {
    let mut per = HashMap::<String, (usize, usize)>::new();
    for c in receiver.calls() {
        let entry = per.entry(key(&c)).or_default();
        if c.status < 300 {
            entry.1 += 1;
        } else {
            entry.0 += 1;
        }
    }
    per
}

fn event_id(c: &Call) -> String {
    c.body["event_id"].as_str().unwrap_or_default().to_string()
}

async fn replay(config: &Config, selection: Selection, dry_run: bool) -> replay::Report {
    replay::start(config, selection, Options { dry_run, progress: false }).await.unwrap()
}

fn calls(tally: &Tally) -> u64 {
    tally.total().calls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_replayed_exactly_what_failed_and_nothing_that_succeeded_is_called_again() {
    let receiver = Receiver::start().await.unwrap();
    let (config, _dir) = setup(&receiver, &[SIGNUP_PAID], |_| {}).await;
    let pool = sqlx::PgPool::connect(&config.database_url).await.unwrap();
    let pipeline = Pipeline::start(config.clone(), &Pipeline::ALL).await.unwrap();
    let batch = |phase: &str| -> Vec<Event> {
        (0..12).map(|n| event(&format!("{phase}-{n}"), &format!("tenant-{}", n % 4), "paid")).collect()
    };

    // Before the outage: called and recorded.
    let t0 = Utc::now();
    produce(&config, &batch("before")).await;
    assert!(eventually(Duration::from_secs(30), || async { rows(&pool, "succeeded").await == 12 }).await);
    // The outage: every call answered 500, every task dead-lettered and recorded failed.
    receiver.set_mode(Mode { fail_with: Some(500), ..Default::default() });
    produce(&config, &batch("outage")).await;
    let t1 = boundary().await;
    assert!(eventually(Duration::from_secs(30), || async { rows(&pool, "failed").await == 12 }).await);
    receiver.set_mode(Mode::default());
    // After the window: not the replay's business.
    produce(&config, &batch("after")).await;
    assert!(eventually(Duration::from_secs(30), || async { rows(&pool, "succeeded").await == 24 }).await);
    let before = calls_per_key(&receiver);
    assert_eq!(before.len(), 36);

    let selection = Selection { from: t0, to: Some(t1), ..Selection::default() };
    let dry = replay(&config, selection.clone(), true).await;
    assert_eq!((dry.id, dry.tally.read, dry.tally.selected), (None, 24, 24));
    assert_eq!(dry.tally.rows.len(), 4, "one row per tenant: {:?}", dry.tally.rows);
    let total = dry.tally.total();
    assert_eq!((total.events, total.runs, total.calls), (12, 12, 12), "only the failed tasks");
    assert_eq!(calls_per_key(&receiver), before, "a dry run calls nothing");

    let real = replay(&config, selection, false).await;
    assert!(real.id.is_some());
    assert_eq!(real.tally, dry.tally, "the replay does what the dry run said");
    let outage_keys: Vec<&String> = before.iter().filter(|(_, (failed, _))| *failed == 1).map(|(k, _)| k).collect();
    assert_eq!(outage_keys.len(), 12);
    assert!(
        eventually(Duration::from_secs(30), || async {
            let now = calls_per_key(&receiver);
            outage_keys.iter().all(|k| now[*k].1 == 1)
        })
        .await,
        "every task of the outage delivered"
    );
    // The succeeded results reached the results topic: 36 first results and 12 redelivered.
    assert_eq!(read_topic(&config.names().results(), 48, Duration::from_secs(30)).len(), 48);
    let after = calls_per_key(&receiver);
    assert_eq!(after.len(), 36, "no new keys");
    for (k, (failed, succeeded)) in &after {
        let expected = if outage_keys.contains(&k) { (1, 1) } else { (0, 1) };
        assert_eq!((*failed, *succeeded), expected, "calls of {k}");
    }
    assert!(receiver.calls().iter().all(|c| !c.replayed), "no key that had succeeded was called again");
    let listed = replay::list(&config).await.unwrap();
    assert_eq!((listed.len(), listed[0].state), (1, "finished"));
    pipeline.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_definition_starts_exactly_the_runs_it_now_matches_and_results_rebuild_identical_rows() {
    let receiver = Receiver::start().await.unwrap();
    let (config, dir) = setup(&receiver, &[SIGNUP_PAID], |_| {}).await;
    let pool = sqlx::PgPool::connect(&config.database_url).await.unwrap();
    let pipeline = Pipeline::start(config.clone(), &Pipeline::ALL).await.unwrap();
    let plans = ["paid", "trial", "free"];
    let events: Vec<Event> =
        (0..18).map(|n| event(&format!("e-{n}"), &format!("tenant-{}", n % 3), plans[n / 6])).collect();
    let t0 = Utc::now();
    produce(&config, &events).await;
    assert!(eventually(Duration::from_secs(30), || async { rows(&pool, "succeeded").await == 6 }).await);

    // The bug fixed: version 2 also matches trial members.
    std::fs::write(dir.path().join("wf0.yaml"), SIGNUP_FIXED).unwrap();
    weir::ops::workflows::apply_dir(&config, dir.path(), false).await.unwrap();
    let selection = Selection { from: t0, ..Selection::default() };
    let dry = replay(&config, selection.clone(), true).await;
    assert_eq!(calls(&dry.tally), 6, "{}", dry.render());
    let rerun = Selection { rerun: true, ..selection.clone() };
    assert_eq!(calls(&replay(&config, rerun, true).await.tally), 12, "a rerun would run every match again");

    let real = replay(&config, selection, false).await;
    assert_eq!(real.tally, dry.tally);
    assert!(eventually(Duration::from_secs(30), || async { rows(&pool, "succeeded").await == 12 }).await);
    let calls = receiver.calls();
    assert_eq!(calls.len(), 12);
    let mut trial: Vec<String> = (6..12).map(|n| format!("e-{n}")).collect();
    trial.sort();
    let replayed: Vec<String> = calls[6..].iter().map(event_id).collect();
    let mut sorted = replayed.clone();
    sorted.sort();
    assert_eq!(sorted, trial, "the trial members' runs, and no others");
    assert!(calls[6..].iter().all(|c| c.body["workflow_version"] == 2), "under the fixed version");
    assert_eq!(calls_per_key(&receiver).len(), 12, "no key called twice");

    // A restore lost the rows: rebuilt from the results topic, identical, and again idempotently.
    // Every column but recorded_at (when the row was written), as JSON.
    let snapshot = || async {
        let rows: Vec<serde_json::Value> =
            sqlx::query_scalar("select to_jsonb(r) - 'recorded_at' from action_results r order by task_id")
                .fetch_all(&pool)
                .await
                .unwrap();
        rows
    };
    let original = snapshot().await;
    assert_eq!(original.len(), 12);
    pipeline.stop().await.unwrap();
    sqlx::query("truncate action_results").execute(&pool).await.unwrap();
    let rebuilt = replay::results::rebuild(&config, t0, None).await.unwrap();
    assert_eq!((rebuilt.read, rebuilt.added, rebuilt.undecodable), (12, 12, 0));
    assert_eq!(snapshot().await, original);
    let again = replay::results::rebuild(&config, t0, None).await.unwrap();
    assert_eq!((again.read, again.added), (12, 0));
    assert_eq!(snapshot().await, original);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_killed_half_way_and_resumed_makes_no_call_twice() {
    let receiver = Receiver::start().await.unwrap();
    // Five tasks a second: the replay of 40 is still under way when it is killed.
    let (config, dir) = setup(&receiver, &[SIGNUP_PAID], |c| c.replay.unlimited_rate = 5).await;
    let file = write_config_file(&config, dir.path());
    let pool = sqlx::PgPool::connect(&config.database_url).await.unwrap();
    let pipeline =
        Pipeline::start(config.clone(), &[StageName::Evaluate, StageName::Execute, StageName::Sink]).await.unwrap();
    receiver.set_mode(Mode { fail_with: Some(503), ..Default::default() });
    let t0 = Utc::now();
    let events: Vec<Event> = (0..40).map(|n| event(&format!("e-{n}"), &format!("tenant-{}", n % 5), "paid")).collect();
    produce(&config, &events).await;
    assert!(eventually(Duration::from_secs(30), || async { rows(&pool, "failed").await == 40 }).await);
    receiver.set_mode(Mode::default());
    let from = t0.to_rfc3339();

    let dry = weir_command(&file, &["replay", "--from", &from, "--dry-run"]).output().unwrap();
    let dry_out = String::from_utf8_lossy(&dry.stdout);
    assert!(dry.status.success(), "{dry_out}{}", String::from_utf8_lossy(&dry.stderr));
    assert!(dry_out.contains("would send (dry run) 40 tasks"), "{dry_out}");

    let mut first = WeirProcess::start(&file, &["replay", "--from", &from]);
    let delivered = || receiver.calls().iter().filter(|c| c.status < 300).count();
    assert!(
        eventually(Duration::from_secs(60), || async { delivered() >= 10 }).await,
        "the replay got under way: {}",
        first.output()
    );
    first.kill();
    assert!(delivered() < 40, "killed half-way ({} delivered)", delivered());
    let (id,): (String,) = sqlx::query_as("select id from replays").fetch_one(&pool).await.unwrap();
    let list = weir_command(&file, &["replay", "list"]).output().unwrap();
    let list_out = String::from_utf8_lossy(&list.stdout);
    assert!(list_out.lines().any(|l| l.starts_with(&id) && l.contains("interrupted")), "{list_out}");

    let resumed = weir_command(&file, &["replay", "--resume", &id]).output().unwrap();
    let out = String::from_utf8_lossy(&resumed.stdout);
    assert!(resumed.status.success(), "{out}{}", String::from_utf8_lossy(&resumed.stderr));
    assert!(out.contains(" sent 40 tasks") && out.contains(&format!("replay {id} finished")), "{out}");
    assert!(eventually(Duration::from_secs(60), || async { delivered() >= 40 }).await, "{} delivered", delivered());
    // Every result: 40 failures, then 40 deliveries.
    assert_eq!(read_topic(&config.names().results(), 80, Duration::from_secs(30)).len(), 80);
    let per = calls_per_key(&receiver);
    assert_eq!(per.len(), 40);
    assert!(per.values().all(|c| *c == (1, 1)), "each task failed once and was delivered once: {per:?}");
    assert!(receiver.calls().iter().all(|c| !c.replayed));
    let list = weir_command(&file, &["replay", "list"]).output().unwrap();
    assert!(String::from_utf8_lossy(&list.stdout).lines().any(|l| l.starts_with(&id) && l.contains("finished")));
    pipeline.stop().await.unwrap();
}

#[test]
fn replay_cli_errors_print_the_usage() {
    let config = std::path::Path::new("does-not-matter.yaml");
    let run = |args: &[&str]| {
        let out = weir_command(config, args).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = run(&["replay", "--from", "yesterday"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--from") && err.contains("is not a time") && err.contains("Usage: weir replay"), "{err}");
    let (code, err) = run(&["replay", "--from", "2h", "--to", "2w"]);
    assert!(code == Some(2) && err.contains("unit") && err.contains("Usage:"), "{err}");
    let (code, err) = run(&["replay"]);
    assert!(code == Some(2) && err.contains("--from") && err.contains("Usage:"), "{err}");
    let (code, err) = run(&["replay", "--from", "1h", "--rerun"]);
    assert!(code == Some(2) && err.contains("--yes") && err.contains("Usage:"), "{err}");
    let (code, err) = run(&["replay", "results", "--from", "soon"]);
    assert!(code == Some(2) && err.contains("is not a time") && err.contains("Usage: weir replay results"), "{err}");
    let (code, err) = run(&["replay", "--resume", "x", "--from", "1h"]);
    assert!(code == Some(2) && err.contains("cannot be used with"), "{err}");
}
