//! The workflow engine on the real broker and database: multi-step runs, hot reload with version
//! pinning, and condition errors as results.

mod common;

use std::{sync::Arc, time::Duration};

use common::*;
use rdkafka::Message;
use serde_json::json;
use weir::{
    envelope::{Event, Format},
    ops::produce::Producer,
    ops::receiver::{Mode, Receiver},
    pipeline::{Pipeline, StageName},
};

const DIAMOND: &str = "
id: diamond
version: 1
trigger: {type: order.paid}
steps:
  - {id: a, service: webhook, input: {n: '{{ data.n }}'}}
  - {id: b, service: webhook, needs: [a], input: {from_a: '{{ steps.a.output.step }}'}}
  - {id: c, service: webhook, needs: [a], input: {from_a: '{{ steps.a.output.step }}'}}
  - {id: d, service: webhook, needs: [b, c], input: {b: '{{ steps.b.output }}', c: '{{ steps.c.output }}'}}
";

fn event(id: &str, kind: &str, data: serde_json::Value) -> Event {
    serde_json::from_value(json!({"id": id, "source": "/shop", "type": kind, "tenant": "shop-1", "data": data}))
        .unwrap()
}

async fn query_scalar(url: &str, sql: &str) -> i64 {
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let n = sqlx::query_scalar(sql).fetch_one(&pool).await.unwrap_or(0);
    pool.close().await;
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diamond_runs_each_step_once_and_joins_both_branches() {
    let receiver = Receiver::start().await.unwrap();
    let (config, _dir) = test_config(&receiver, &[DIAMOND]).await;
    let config = Arc::new(config);
    let pipeline = Pipeline::start(config.clone(), &Pipeline::ALL).await.unwrap();
    Producer::new(&config).unwrap().send(&event("o-1", "order.paid", json!({"n": 7})), Format::Avro).await.unwrap();

    let url = config.database_url.clone();
    let finished = eventually(Duration::from_secs(60), || async {
        query_scalar(&url, "select count(*) from workflow_runs where status = 'succeeded'").await == 1
    })
    .await;
    assert!(finished, "run succeeded; calls so far: {}", receiver.calls().len());
    pipeline.stop().await.unwrap();

    let calls = receiver.calls();
    let step = |id: &str| calls.iter().filter(|c| c.body["step_id"] == id).cloned().collect::<Vec<_>>();
    for id in ["a", "b", "c", "d"] {
        assert_eq!(step(id).len(), 1, "step {id} called exactly once");
    }
    let (b, c, d) = (&step("b")[0], &step("c")[0], &step("d")[0]);
    assert_eq!(step("a")[0].body["input"]["n"], 7, "a's input rendered natively from the event");
    assert_eq!(b.body["input"]["from_a"], "a");
    assert!(d.at > b.at && d.at > c.at, "the join starts after both branches");
    assert_eq!(d.body["input"]["b"]["step"], "b", "d sees b's output");
    assert_eq!(d.body["input"]["c"]["step"], "c", "d sees c's output");
    assert_eq!(query_scalar(&url, "select count(*) from action_results where status = 'succeeded'").await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apply_reaches_a_running_worker_and_runs_in_flight_keep_their_version() {
    let two_steps = |version: i64| {
        format!(
            "{{id: flow, version: {version}, trigger: {{type: order.paid}}, steps: [{{id: first, service: webhook, input: {{v: {version}}}}}, {{id: second, service: webhook, needs: [first], input: {{v: {version}}}}}]}}"
        )
    };
    let receiver = Receiver::start().await.unwrap();
    let (config, dir) = test_config(&receiver, &[&two_steps(1)]).await;
    let config = Arc::new(config);
    let pipeline = Pipeline::start(config.clone(), &Pipeline::ALL).await.unwrap();
    let producer = Producer::new(&config).unwrap();

    // A v1 run whose first call is slow, so the apply happens while it is in flight.
    receiver.set_mode(Mode { latency: Duration::from_millis(1_500), ..Mode::default() });
    producer.send(&event("before", "order.paid", json!({})), Format::Json).await.unwrap();
    assert!(
        eventually(Duration::from_secs(30), || async { receiver.arrived() > 0 }).await,
        "the v1 run's first call is in flight"
    );
    std::fs::write(dir.path().join("wf0.yaml"), two_steps(2)).unwrap();
    let plan = weir::ops::workflows::apply_dir(&config, dir.path(), false).await.unwrap();
    assert_eq!(plan.publish.len(), 1);
    receiver.set_mode(Mode::default());

    // Events produced from now on start v2 runs, without restarting the worker. Probe until the
    // worker has seen the apply; every probe is accounted for below.
    let mut probes = 0;
    let switched = eventually(Duration::from_secs(30), || {
        probes += 1;
        let (producer, n) = (producer.clone(), probes);
        let calls = receiver.calls();
        async move {
            producer.send(&event(&format!("after-{n}"), "order.paid", json!({})), Format::Json).await.unwrap();
            calls.iter().any(|c| c.body["workflow_version"] == 2)
        }
    })
    .await;
    assert!(switched, "a v2 run started after the apply");
    let url = config.database_url.clone();
    assert!(
        eventually(Duration::from_secs(60), || async {
            query_scalar(&url, "select count(*) from workflow_runs where status <> 'running'").await
                == probes as i64 + 1
        })
        .await
    );
    pipeline.stop().await.unwrap();

    let calls = receiver.calls();
    let of = |event_id: &str| calls.iter().filter(|c| c.body["event_id"] == event_id).cloned().collect::<Vec<_>>();
    let before = of("before");
    assert_eq!(before.len(), 2, "both steps of the in-flight run ran");
    for call in &before {
        assert_eq!(call.body["workflow_version"], 1, "the in-flight run stayed on v1");
        assert_eq!(call.body["input"]["v"], 1);
    }
    // Once a run started on v2, every later event also did.
    let first_v2 =
        (1..=probes).find(|n| of(&format!("after-{n}")).iter().any(|c| c.body["workflow_version"] == 2)).unwrap();
    for n in first_v2..=probes {
        for call in of(&format!("after-{n}")) {
            assert_eq!(call.body["workflow_version"], 2, "after-{n}");
            assert_eq!(call.body["input"]["v"], 2);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_condition_that_fails_on_an_event_is_a_failed_result_not_a_crash() {
    let wf =
        "{id: big-orders, trigger: {type: order.paid, if: 'data.amount > 100'}, steps: [{id: s, service: webhook}]}";
    let receiver = Receiver::start().await.unwrap();
    let (config, _dir) = test_config(&receiver, &[wf]).await;
    let config = Arc::new(config);
    let pipeline = Pipeline::start(config.clone(), &Pipeline::ALL).await.unwrap();
    let producer = Producer::new(&config).unwrap();
    for (id, data) in [
        ("ok", json!({"amount": 500})),
        ("small", json!({"amount": 5})),
        ("missing", json!({})),
        ("wrong-type", json!({"amount": "lots"})),
        ("huge", json!({"amount": 1e300, "blob": "x".repeat(500_000)})),
    ] {
        producer.send(&event(id, "order.paid", data), Format::Json).await.unwrap();
    }
    let url = config.database_url.clone();
    assert!(
        eventually(Duration::from_secs(60), || async {
            query_scalar(&url, "select count(*) from action_results").await == 4
        })
        .await,
        "ok and huge succeed, missing and wrong-type fail with a reason, small does not match"
    );
    pipeline.stop().await.unwrap();
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let rows: Vec<(String, String, Option<String>)> =
        sqlx::query_as("select event_id, status, error from action_results order by event_id")
            .fetch_all(&pool)
            .await
            .unwrap();
    let by_id =
        |id: &str| rows.iter().find(|r| r.0 == id).cloned().unwrap_or_else(|| panic!("no row for {id}: {rows:?}"));
    assert_eq!(by_id("ok").1, "succeeded");
    assert_eq!(by_id("huge").1, "succeeded");
    for id in ["missing", "wrong-type"] {
        let (_, status, error) = by_id(id);
        assert_eq!(status, "failed");
        let error = error.unwrap();
        assert!(error.contains("trigger.if") && error.contains("data.amount > 100"), "{id}: {error}");
    }
    assert_eq!(receiver.calls().len(), 2);
}

/// Event types of the fleet test: three that tenants' workflows use, one only platform-wide
/// workflows use, one nothing listens to.
const FLEET_KINDS: [&str; 5] = ["member.created", "post.published", "email.opened", "order.paid", "email.clicked"];

/// Tenant `i`'s workflow: its trigger type and condition, and the same condition as a Rust
/// predicate over (plan, n), which is how the test knows the answer without asking weir.
fn tenant_workflow(i: usize) -> (String, impl Fn(&str, u64) -> bool) {
    let kind = FLEET_KINDS[i % 3];
    let (cel, k) = match i % 3 {
        0 => (format!("data.plan == 'paid' && data.n % 4 == {}", i % 4), i as u64 % 4),
        1 => (format!("data.n > {}", 40 + i % 50), 40 + i as u64 % 50),
        _ => ("true".to_string(), 0),
    };
    let yaml = format!(
        "{{id: w, tenant: t{i:04}, trigger: {{type: {kind}, if: \"{cel}\"}}, steps: [{{id: s, service: webhook, input: {{n: '{{{{ data.n }}}}'}}}}]}}"
    );
    let predicate = move |plan: &str, n: u64| match i % 3 {
        0 => plan == "paid" && n % 4 == k,
        1 => n > k,
        _ => true,
    };
    (yaml, predicate)
}

/// Platform-wide workflow `j` (every tenant): a type among the first four, a condition on the
/// body or on the tenant attribute, and two root steps (plus a dependent one) when `j % 5 == 0`.
fn platform_workflow(j: usize) -> (String, &'static str, Vec<&'static str>) {
    let kind = FLEET_KINDS[j % 4];
    let cel = if j < 10 { format!("data.n % 10 == {j}") } else { format!("event.tenant.endsWith('{}')", j % 10) };
    let (steps, roots) = if j % 5 == 0 {
        (
            "[{id: a, service: webhook}, {id: b, service: webhook}, {id: c, service: webhook, needs: [a, b]}]",
            vec!["a", "b"],
        )
    } else {
        ("[{id: a, service: webhook}]", vec!["a"])
    };
    (format!("{{id: p{j:02}, trigger: {{type: {kind}, if: \"{cel}\"}}, steps: {steps}}}"), kind, roots)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_a_thousand_tenants_gets_exactly_the_expected_tasks() {
    const TENANTS: usize = 1_000;
    const EVENTS: usize = 100_000;
    let tenants: Vec<_> = (0..TENANTS).map(tenant_workflow).collect();
    let platform: Vec<_> = (0..20).map(platform_workflow).collect();
    let yamls: Vec<&str> =
        tenants.iter().map(|(y, _)| y.as_str()).chain(platform.iter().map(|(y, ..)| y.as_str())).collect();
    let receiver = Receiver::start().await.unwrap();
    let (config, _dir) = test_config(&receiver, &yamls).await;
    let config = Arc::new(config);

    // Event i: tenant spread by a stride, type cycling over all five, body {plan, n}.
    let events: Vec<Event> = (0..EVENTS)
        .map(|i| {
            let plan = if i % 3 == 0 { "free" } else { "paid" };
            let mut e = event(&format!("e{i}"), FLEET_KINDS[i % 5], json!({"plan": plan, "n": (i / 5) % 100}));
            e.tenant = format!("t{:04}", (i * 7_919) % TENANTS);
            e
        })
        .collect();
    // The expected tasks, computed from the definitions above: (event id, tenant, workflow, step).
    let mut expected = std::collections::BTreeSet::new();
    for e in &events {
        let (plan, n) = (e.data["plan"].as_str().unwrap(), e.data["n"].as_u64().unwrap());
        let i: usize = e.tenant[1..].parse().unwrap();
        if FLEET_KINDS[i % 3] == e.kind && (tenants[i].1)(plan, n) {
            expected.insert((e.id.clone(), e.tenant.clone(), "w".to_string(), "s".to_string()));
        }
        for (j, (_, kind, roots)) in platform.iter().enumerate() {
            let holds = if j < 10 { n % 10 == j as u64 } else { e.tenant.ends_with(&(j % 10).to_string()) };
            if *kind == e.kind && holds {
                for step in roots {
                    expected.insert((e.id.clone(), e.tenant.clone(), format!("p{j:02}"), step.to_string()));
                }
            }
        }
    }

    let pipeline = Pipeline::start(config.clone(), &[StageName::Evaluate]).await.unwrap();
    let producer = Producer::new(&config).unwrap();
    let sent = producer.send_all(events.into_iter().map(|e| (e, Format::Json)), 5_000).await.unwrap();
    assert_eq!(sent, EVENTS as u64);

    let tasks = read_topic(&config.names().actions("webhook"), expected.len(), Duration::from_secs(240));
    // Everything the evaluator will ever produce for these events is out once it has stored the
    // offset of the last event; anything beyond the expected tasks would be on the topic by then.
    let group = config.names().group("evaluate");
    let events_topic = config.names().events();
    assert!(
        eventually(Duration::from_secs(60), || async { committed_total(&group, &events_topic, 8) == EVENTS as i64 })
            .await,
        "the evaluator committed every event"
    );
    pipeline.stop().await.unwrap();
    let all = read_topic(&config.names().actions("webhook"), expected.len() + 1, Duration::from_secs(5));
    assert!(all.len() >= tasks.len());

    let mut got = std::collections::BTreeSet::new();
    for m in &all {
        let task: weir::envelope::ActionTask = serde_json::from_slice(m.payload().unwrap()).unwrap();
        assert_eq!(m.key(), Some(task.tenant.as_bytes()), "tasks are keyed by tenant");
        let fresh = got.insert((task.event_id, task.tenant, task.workflow_id, task.step_id));
        assert!(fresh, "a task was produced twice");
    }
    assert_eq!(got.len(), expected.len(), "as many tasks as expected");
    assert!(got == expected, "the tasks are exactly the expected ones (tenant isolation included)");
    assert!(expected.len() > 30_000, "the fleet test exercises many matches ({})", expected.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_run_is_replaced_and_every_step_runs_once() {
    const RUNS: usize = 5;
    let receiver = Receiver::start().await.unwrap();
    let (config, dir) = test_config(&receiver, &[DIAMOND]).await;
    let file = write_config_file(&config, dir.path());
    // Slow calls, so the kill lands while runs are between steps.
    receiver.set_mode(Mode { latency: Duration::from_millis(300), ..Mode::default() });
    let mut worker = WeirProcess::start(&file, &["run"]);
    let events = (0..RUNS).map(|i| (event(&format!("o-{i}"), "order.paid", json!({"n": i})), Format::Json));
    Producer::new(&config).unwrap().send_all(events, 100).await.unwrap();

    let branch_done = eventually(Duration::from_secs(60), || async {
        receiver.calls().iter().any(|c| c.body["step_id"] == "b" || c.body["step_id"] == "c")
    })
    .await;
    assert!(
        branch_done,
        "a run reached its branches; {} calls arrived; worker log:\n{}",
        receiver.arrived(),
        worker.output()
    );
    worker.kill();
    let joins_before_kill = receiver.calls().iter().filter(|c| c.body["step_id"] == "d").count();
    assert!(joins_before_kill < RUNS, "the kill happened mid-run");

    let replacement = WeirProcess::start(&file, &["run"]);
    let url = config.database_url.clone();
    let finished = eventually(Duration::from_secs(120), || async {
        query_scalar(&url, "select count(*) from workflow_runs where status = 'succeeded'").await == RUNS as i64
    })
    .await;
    assert!(
        finished,
        "every run completed after the restart; killed worker's log:\n{}\nreplacement's log:\n{}",
        worker.output(),
        replacement.output()
    );
    drop(replacement);

    // Each step of each run was executed by the service exactly once. A call repeated after the
    // crash carries the same Idempotency-Key and is answered from the service's record.
    let calls = receiver.calls();
    let mut executed = std::collections::BTreeMap::new();
    for c in calls.iter().filter(|c| c.status == 200 && !c.replayed) {
        *executed.entry((c.body["event_id"].to_string(), c.body["step_id"].to_string())).or_insert(0) += 1;
    }
    assert_eq!(executed.len(), RUNS * 4, "every step of every run executed: {executed:?}");
    assert!(executed.values().all(|n| *n == 1), "no step executed twice: {executed:?}");
    assert_eq!(
        query_scalar(&url, "select count(distinct task_id) from action_results where status = 'succeeded'").await,
        (RUNS * 4) as i64
    );
    for c in calls.iter().filter(|c| c.body["step_id"] == "d" && !c.replayed) {
        assert_eq!(c.body["input"]["b"]["step"], "b", "the join saw b's output after the restart");
        assert_eq!(c.body["input"]["c"]["step"], "c");
    }
}

/// A backlog of many tenants: the evaluator takes the batches waiting together and evaluates the
/// light (partition, tenant) groups first (`light_first`); every tenant's tasks still come out in
/// its events' order, each exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_many_tenants_keeps_each_tenants_order() {
    const TENANTS: usize = 24;
    const EVENTS: usize = 6_000;
    let all = "{id: all, version: 1, trigger: {type: member.created}, steps: [{id: s, service: webhook, input: {n: '{{ data.n }}'}}]}";
    let receiver = Receiver::start().await.unwrap();
    let (config, _dir) = test_config(&receiver, &[all]).await;
    let config = Arc::new(config);
    // Event i is tenant i % 24's (i / 24)th: its `n`. All of them wait in the topic before the
    // evaluator starts, so it takes them in big batches of many groups, reordered.
    let events = (0..EVENTS).map(|i| {
        let mut e = event(&format!("e{i}"), "member.created", json!({"n": i / TENANTS}));
        e.tenant = format!("t{:02}", i % TENANTS);
        (e, Format::Json)
    });
    let sent = Producer::new(&config).unwrap().send_all(events, 5_000).await.unwrap();
    assert_eq!(sent, EVENTS as u64);
    let pipeline = Pipeline::start(config.clone(), &[StageName::Evaluate]).await.unwrap();
    let tasks = read_topic(&config.names().actions("webhook"), EVENTS, Duration::from_secs(120));
    pipeline.stop().await.unwrap();
    assert_eq!(tasks.len(), EVENTS);
    let mut last: std::collections::HashMap<String, i64> = Default::default();
    for m in &tasks {
        let task: weir::envelope::ActionTask = serde_json::from_slice(m.payload().unwrap()).unwrap();
        let n = task.input["n"].as_str().map_or_else(|| task.input["n"].as_i64().unwrap(), |s| s.parse().unwrap());
        let previous = last.insert(task.tenant.clone(), n).unwrap_or(-1);
        assert_eq!(n, previous + 1, "tenant {}: task {n} after {previous}", task.tenant);
    }
    assert_eq!(last.len(), TENANTS);
    assert!(last.values().all(|n| *n == (EVENTS / TENANTS) as i64 - 1));
}
