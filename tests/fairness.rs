//! Fair by default (issue 17): one tenant flooding the executor does not starve the others, on
//! its own partition or any other. Real broker, real local HTTP server answering slowly enough
//! that the noisy tenant builds a backlog; assertions are counts, not timings.

mod common;

use std::{collections::HashMap, sync::Arc, time::Duration};

use common::*;
use rdkafka::consumer::Consumer as _;
use serde_json::json;
use weir::{
    envelope::ActionTask,
    kafka::partitioner,
    ops::produce::Producer,
    ops::receiver::{Call, Mode, Receiver},
    pipeline::{Pipeline, StageName},
};

const WELCOME: &str =
    "{id: welcome, version: 1, trigger: {type: member.created}, steps: [{id: notify, service: webhook}]}";

const NOISY: &str = "noisy";
/// Quiet tenants, and how many of them must share the noisy tenant's partition.
const QUIET: usize = 8;
const QUIET_ON_NOISY_PARTITION: usize = 2;
const QUIET_TASKS: usize = 200;
/// Nine times the quiet tenants' combined number.
const NOISY_TASKS: usize = 9 * QUIET * QUIET_TASKS;
/// The noisy tenant's tasks that must still be waiting when the last quiet one is called.
const BACKLOG: usize = 10_000;
/// How often a round of tasks is produced: each quiet tenant sends 1000/75 ≈ 13 tasks a second,
/// for `QUIET_TASKS` rounds (15 s).
const TICK: Duration = Duration::from_millis(75);

fn task(n: usize, tenant: &str) -> ActionTask {
    common::webhook_task(n, tenant, json!({"seq": n}))
}

/// The task's sequence number, from the body the receiver got.
fn seq(call: &Call) -> u64 {
    call.body["input"]["seq"].as_u64().expect("the call carries the task input")
}

/// Quiet tenants: `on_noisy` of them on the noisy tenant's partition, the rest elsewhere.
fn quiet_tenants(partitions: i32, on_noisy: usize) -> Vec<String> {
    let noisy = partitioner::partition_for_key(NOISY.as_bytes(), partitions);
    let (mut mates, mut others) = (Vec::new(), Vec::new());
    for n in 0.. {
        let name = format!("quiet-{n}");
        let p = partitioner::partition_for_key(name.as_bytes(), partitions);
        if p == noisy && mates.len() < on_noisy {
            mates.push(name);
        } else if p != noisy && others.len() < QUIET - on_noisy {
            others.push(name);
        }
        if mates.len() == on_noisy && others.len() == QUIET - on_noisy {
            break;
        }
    }
    mates.into_iter().chain(others).collect()
}

/// Calls per tenant, executed (not replays).
fn per_tenant(calls: &[Call]) -> HashMap<String, Vec<u64>> {
    let mut by: HashMap<String, Vec<u64>> = HashMap::new();
    for c in calls.iter().filter(|c| c.status < 300 && !c.replayed) {
        by.entry(c.tenant.clone().unwrap_or_default()).or_default().push(seq(c));
    }
    by
}

fn assert_in_order(by: &HashMap<String, Vec<u64>>) {
    for (tenant, seqs) in by {
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{tenant}'s calls are not in event order: {seqs:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_noisy_tenant_at_nine_times_the_others_does_not_hold_back_any_of_them() {
    let receiver = Receiver::start().await.unwrap();
    // Slow enough that the noisy tenant, called one task at a time, falls far behind.
    receiver.set_mode(Mode { latency: Duration::from_millis(10), ..Default::default() });
    let (config, _dir) = test_config(&receiver, &[WELCOME]).await;
    let config = Arc::new(config);
    let partitions = 8; // topics/actions.yaml
    let quiet = quiet_tenants(partitions, QUIET_ON_NOISY_PARTITION);
    let pipeline = Pipeline::start(config.clone(), &[StageName::Execute]).await.unwrap();

    // At a steady rate, as they would arrive: each tick one task of every quiet tenant and nine
    // times as many of the noisy one, interleaved. A quiet tenant sends far below what it can be
    // called at; the noisy tenant far above.
    let producer = Producer::for_topic(&config, &config.names().actions("webhook")).unwrap();
    let mut ticks = tokio::time::interval(TICK);
    let mut next = 0;
    for _ in 0..QUIET_TASKS {
        ticks.tick().await;
        let mut tick = Vec::new();
        for q in &quiet {
            for _ in 0..9 {
                tick.push(task(next, NOISY));
                next += 1;
            }
            tick.push(task(next, q));
            next += 1;
        }
        produce_tasks(&producer, &tick).await;
    }

    let quiet_done = eventually(Duration::from_secs(60), || {
        let by = per_tenant(&receiver.calls());
        let done = quiet.iter().all(|t| by.get(t).map_or(0, Vec::len) == QUIET_TASKS);
        async move { done }
    })
    .await;
    let calls = receiver.calls();
    let by = per_tenant(&calls);
    let counts: HashMap<&String, usize> = by.iter().map(|(t, s)| (t, s.len())).collect();
    assert!(quiet_done, "every quiet tenant's tasks called: {counts:?}");
    // The moment the receiver answered the last quiet call: how far the noisy tenant had got.
    let last_quiet = calls.iter().rposition(|c| c.tenant.as_deref() != Some(NOISY)).unwrap();
    let noisy_before = calls[..last_quiet].iter().filter(|c| c.tenant.as_deref() == Some(NOISY)).count();
    assert!(
        noisy_before + BACKLOG <= NOISY_TASKS,
        "{noisy_before} of {NOISY_TASKS} noisy calls made before the last quiet one: a backlog of more than \
         {BACKLOG} was expected"
    );
    assert_in_order(&by);
    assert_eq!(calls.iter().filter(|c| c.replayed).count(), 0, "no call was repeated");
    assert!(!by[NOISY].is_empty(), "the noisy tenant is served too");

    pipeline.stop().await.unwrap();
}

/// The lone tenant's backlog: its tasks that must still be uncalled when the newcomers are done.
const LONE_TASKS: usize = 3_000;
const LONE_BACKLOG: usize = 1_000;
const NEWCOMER_TASKS: usize = 20;

/// A tenant alone in the process does not overflow (it is held back by its partition's bound, as
/// before fairness); the moment another tenant has work, it must: a newcomer on another partition,
/// then one on its own partition behind its backlog, are both called while it still has more than
/// `LONE_BACKLOG` tasks uncalled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_tenant_with_a_backlog_makes_room_as_soon_as_another_tenant_has_work() {
    let receiver = Receiver::start().await.unwrap();
    receiver.set_mode(Mode { latency: Duration::from_millis(10), ..Default::default() });
    let (config, _dir) = test_config(&receiver, &[WELCOME]).await;
    let config = Arc::new(config);
    let quiet = quiet_tenants(8, 1); // topics/actions.yaml: 8 partitions
    let (mate, elsewhere) = (&quiet[0], &quiet[1]);
    let pipeline = Pipeline::start(config.clone(), &[StageName::Execute]).await.unwrap();
    let producer = Producer::for_topic(&config, &config.names().actions("webhook")).unwrap();

    let lone: Vec<ActionTask> = (0..LONE_TASKS).map(|n| task(n, NOISY)).collect();
    produce_tasks(&producer, &lone).await;
    // Alone for a while: its lane full, its partition held at its bound.
    let started = eventually(Duration::from_secs(60), || {
        let n = per_tenant(&receiver.calls()).get(NOISY).map_or(0, Vec::len);
        async move { n >= 100 }
    })
    .await;
    assert!(started, "the lone tenant is being called");
    let (reader, overflow) = (reader(), config.names().overflow("webhook"));
    let overflowed: i64 =
        (0..8).map(|p| reader.fetch_watermarks(&overflow, p, Duration::from_secs(10)).unwrap().1).sum();
    assert_eq!(overflowed, 0, "the only tenant of the process does not overflow");

    // A newcomer elsewhere, then one behind the lone tenant's backlog on its partition.
    let mut next = LONE_TASKS;
    for tenant in [elsewhere, mate] {
        let tasks: Vec<ActionTask> = (0..NEWCOMER_TASKS).map(|i| task(next + i, tenant)).collect();
        next += NEWCOMER_TASKS;
        produce_tasks(&producer, &tasks).await;
    }
    let done = eventually(Duration::from_secs(60), || {
        let by = per_tenant(&receiver.calls());
        let done = [elsewhere, mate].iter().all(|t| by.get(*t).map_or(0, Vec::len) == NEWCOMER_TASKS);
        async move { done }
    })
    .await;
    let calls = receiver.calls();
    let by = per_tenant(&calls);
    let counts: HashMap<&String, usize> = by.iter().map(|(t, s)| (t, s.len())).collect();
    assert!(done, "both newcomers' tasks called: {counts:?}");
    let last = calls.iter().rposition(|c| c.tenant.as_deref() != Some(NOISY)).unwrap();
    let lone_before = calls[..last].iter().filter(|c| c.tenant.as_deref() == Some(NOISY)).count();
    assert!(
        lone_before + LONE_BACKLOG <= LONE_TASKS,
        "{lone_before} of the lone tenant's {LONE_TASKS} tasks called before the newcomers' last: they waited \
         behind its backlog"
    );
    assert_in_order(&by);
    pipeline.stop().await.unwrap();
}
