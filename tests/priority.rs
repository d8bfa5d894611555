//! Priorities (issue 16, item 2): a workflow's `priority` picks its action topic, and the
//! executor serves the three topics of a service by weight (default 6:3:1) from the service's one
//! set of limits. Real broker, real local HTTP server; assertions are counts, not timings (the
//! high tasks' wait is printed, not asserted).

mod common;

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use common::*;
use futures::{stream::FuturesUnordered, StreamExt};
use serde_json::json;
use weir::{
    config::Priority,
    envelope::{ActionTask, Event, Format},
    ops::produce::Producer,
    ops::receiver::{Call, Mode, Receiver},
    pipeline::{Pipeline, StageName},
};

/// High priority, through the evaluator: its tasks must land on `actions.webhook.high`.
const WELCOME: &str = "
id: welcome
version: 1
priority: high
trigger: {type: member.created}
steps: [{id: notify, service: webhook, input: {seq: '{{ data.seq }}'}}]
";

const LOW_TASKS: usize = 50_000;
const LOW_TENANTS: usize = 20;
const HIGH_EVENTS: usize = 100;
const HIGH_TENANTS: usize = 10;
/// Low calls made before the high events are produced: low is flowing.
const LOW_FLOWING: usize = 2_000;
/// Low tasks that must still be uncalled when the last high one is called.
const LOW_LEFT: usize = 40_000;

fn task(n: usize, tenant: &str, workflow: &str, priority: Priority) -> ActionTask {
    serde_json::from_value(json!({
        "task_id": format!("{workflow}-{n}"), "run_id": format!("run-{workflow}-{n}"), "event_id": format!("e-{n}"),
        "event_type": "newsletter.opened", "tenant": tenant, "workflow_id": workflow, "workflow_version": 1,
        "step_id": "notify", "service": "webhook", "created_at": "2026-11-23T10:00:00Z", "input": {"seq": n},
        "priority": priority,
        // Unordered, as a workflow with `order_by: none` makes them: a tenant's calls run side by
        // side up to its tenant_concurrency, so the slots are contended.
        "order_key": format!("run:{n}"),
    }))
    .unwrap()
}

/// Produces `tasks` to `topic`, all in flight at once.
async fn produce(config: &weir::config::Config, topic: &str, tasks: &[ActionTask]) {
    let producer = Producer::for_topic(config, topic).unwrap();
    let mut inflight = FuturesUnordered::new();
    for t in tasks {
        let (producer, key, payload) = (producer.clone(), t.tenant.clone(), serde_json::to_vec(t).unwrap());
        inflight.push(async move { producer.send_raw(key.as_bytes(), &payload, "application/json").await.unwrap() });
    }
    while inflight.next().await.is_some() {}
}

fn executed(calls: &[Call]) -> impl Iterator<Item = &Call> {
    calls.iter().filter(|c| c.status < 300 && !c.replayed)
}

fn is_high(call: &Call) -> bool {
    call.tenant.as_deref().is_some_and(|t| t.starts_with("paid-"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_priority_tasks_overtake_a_low_backlog_of_50_000_and_low_keeps_flowing() {
    let receiver = Receiver::start().await.unwrap();
    receiver.set_mode(Mode { latency: Duration::from_millis(10), ..Default::default() });
    let (mut config, _dir) = test_config(&receiver, &[WELCOME]).await;
    // Several calls per tenant at once (the high events' workflow orders by subject, and they
    // have none: each high tenant's calls are in order), so the 64 slots are contended.
    config.services.get_mut("webhook").unwrap().tenant_concurrency = 8;
    let config = Arc::new(config);

    // The low backlog, queued before anything runs.
    let low: Vec<ActionTask> =
        (0..LOW_TASKS).map(|n| task(n, &format!("bulk-{}", n % LOW_TENANTS), "bulk", Priority::Low)).collect();
    produce(&config, &config.names().actions_at("webhook", Priority::Low), &low).await;
    drop(low);
    let pipeline = Pipeline::start(config.clone(), &[StageName::Evaluate, StageName::Execute]).await.unwrap();
    let flowing = eventually(Duration::from_secs(120), || {
        let n = receiver.executed();
        async move { n >= LOW_FLOWING }
    })
    .await;
    assert!(flowing, "low tasks are being called: {} so far", receiver.executed());

    // Then the high ones, as events through the evaluator.
    let events = Producer::new(&config).unwrap();
    let sent = Instant::now();
    let mut inflight = FuturesUnordered::new();
    for n in 0..HIGH_EVENTS {
        let event: Event = serde_json::from_value(json!({
            "id": format!("paid-e-{n}"), "source": "/ghost/test", "type": "member.created",
            "tenant": format!("paid-{}", n % HIGH_TENANTS), "data": {"seq": n},
        }))
        .unwrap();
        let events = events.clone();
        inflight.push(async move { events.send(&event, Format::Json).await.unwrap() });
    }
    while inflight.next().await.is_some() {}
    let high_done = eventually(Duration::from_secs(120), || {
        let n = executed(&receiver.calls()).filter(|c| is_high(c)).count();
        async move { n == HIGH_EVENTS }
    })
    .await;
    let calls = receiver.calls();
    let done: Vec<&Call> = executed(&calls).collect();
    assert!(high_done, "every high task called: {} of {HIGH_EVENTS}", done.iter().filter(|c| is_high(c)).count());
    let first_high = done.iter().position(|c| is_high(c)).unwrap();
    let last_high = done.iter().rposition(|c| is_high(c)).unwrap();
    let low_before = done[..last_high].iter().filter(|c| !is_high(c)).count();
    let low_between = done[first_high..last_high].iter().filter(|c| !is_high(c)).count();
    let waited = |i: usize| done[i].at.duration_since(sent).as_millis();
    println!(
        "high wait: first of {HIGH_EVENTS} high tasks called {} ms, last {} ms after their events were produced \
         (through the evaluator); {low_before} of {LOW_TASKS} low tasks called before the last ({low_between} of them \
         between the first and the last high call)",
        waited(first_high),
        waited(last_high)
    );
    assert!(
        low_before + LOW_LEFT <= LOW_TASKS,
        "{low_before} of {LOW_TASKS} low tasks were called before the last high one: high waited behind the low \
         backlog (at least {LOW_LEFT} should have been left)"
    );
    assert!(low_between > 0, "low got no call while high tasks waited: low starved");

    // Low keeps flowing to the end: every low task is called, once.
    let low_done = eventually(Duration::from_secs(300), || {
        let n = receiver.executed();
        async move { n >= LOW_TASKS + HIGH_EVENTS }
    })
    .await;
    let calls = receiver.calls();
    let mut per_key: HashMap<&str, usize> = HashMap::new();
    for c in executed(&calls) {
        *per_key.entry(c.idempotency_key.as_deref().unwrap_or_default()).or_default() += 1;
    }
    assert!(low_done, "every low task called after the high ones: {} of {LOW_TASKS}", per_key.len() - HIGH_EVENTS);
    assert_eq!(per_key.len(), LOW_TASKS + HIGH_EVENTS, "each task called");
    assert!(per_key.values().all(|n| *n == 1), "no task called twice");
    pipeline.stop().await.unwrap();
}

const PER_PRIORITY: usize = 2_000;
const SLOTS: usize = 8;

/// The service's limits are shared by its priorities: with `concurrency: 8` and all three topics
/// backlogged, at most 8 calls are ever in flight (not 24), and while all three wait the calls
/// split by the weights.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_priorities_share_the_service_slots_by_weight() {
    let receiver = Receiver::start().await.unwrap();
    receiver.set_mode(Mode { latency: Duration::from_millis(20), ..Default::default() });
    let (mut config, _dir) = test_config(&receiver, &[]).await;
    let webhook = config.services.get_mut("webhook").unwrap();
    webhook.concurrency = Some(SLOTS);
    webhook.tenant_concurrency = SLOTS;
    let config = Arc::new(config);
    for p in Priority::ALL {
        let tasks: Vec<ActionTask> =
            (0..PER_PRIORITY).map(|n| task(n, &format!("{p}-{}", n % 4), p.as_str(), p)).collect();
        produce(&config, &config.names().actions_at("webhook", p), &tasks).await;
    }
    let pipeline = Pipeline::start(config.clone(), &[StageName::Execute]).await.unwrap();
    let mut most = 0;
    let all = 3 * PER_PRIORITY;
    let deadline = Instant::now() + Duration::from_secs(120);
    while receiver.executed() < all && Instant::now() < deadline {
        // Calls the receiver has and has not answered yet: in flight.
        most = most.max(receiver.arrived().saturating_sub(receiver.calls().len()));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let calls = receiver.calls();
    let of = |c: &Call| Priority::parse(c.tenant.as_deref().unwrap_or_default().split('-').next().unwrap()).unwrap();
    let done: Vec<Priority> = executed(&calls).map(of).collect();
    assert_eq!(done.len(), all, "every task called once");
    println!("most calls in flight at once: {most} (concurrency {SLOTS})");
    assert!(most <= SLOTS, "{most} calls in flight with concurrency {SLOTS}: the priorities multiplied the slots");
    // From when all three priorities are being called, the next 200 calls: 6:3:1 (120, 60, 20)
    // while all three have a backlog, give or take the calls already in flight.
    let all_started = Priority::ALL.iter().map(|p| done.iter().position(|d| d == p).unwrap()).max().unwrap();
    let window = &done[all_started..(all_started + 200).min(done.len())];
    let count = |p: Priority| window.iter().filter(|d| **d == p).count();
    let (high, normal, low) = (count(Priority::High), count(Priority::Normal), count(Priority::Low));
    println!("200 calls with all three waiting: high {high}, normal {normal}, low {low}");
    assert!(high > normal && normal > low, "high {high}, normal {normal}, low {low}: not by weight");
    assert!(low >= 10, "low {low} of 200: starved");
    pipeline.stop().await.unwrap();
}
