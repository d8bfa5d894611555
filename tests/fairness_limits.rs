//! A workflow's `limits.runs_per_minute` on a noisy tenant, end to end on the real broker,
//! database and HTTP receiver: its runs over the limit are deferred through the delay tiers
//! instead of waited for, so the other tenants (on its partition too) flow; nothing of the noisy
//! tenant's is lost, it starts at its limit, and every tenant's calls keep event order.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
    time::Duration,
};

use common::*;
use rdkafka::{consumer::Consumer, Message};
use serde_json::json;
use weir::{
    envelope::{Event, Format},
    kafka::{deferral, partitioner},
    ops::{produce::Producer, receiver::Receiver},
    pipeline::{Pipeline, StageName},
};

/// The noisy tenant's limit, and so its burst (a minute's runs at once after a quiet minute).
const PER_MINUTE: usize = 120;
/// One platform-wide workflow, one webhook call per event: every tenant has its own limit.
const NOTIFY: &str = "{id: notify, trigger: {type: member.created}, limits: {runs_per_minute: 120},
    steps: [{id: notify, service: webhook}]}";

const NOISY: &str = "noisy";
/// Events of the noisy tenant: 9 × the quiet tenants' together, and 7 × its limit's burst.
const NOISY_EVENTS: usize = 900;
const QUIET_TENANTS: usize = 5;
const QUIET_EVENTS: usize = 20;

fn event(tenant: &str, seq: usize) -> Event {
    serde_json::from_value(json!({
        "id": format!("{tenant}-{seq}"),
        "source": "/test",
        "type": "member.created",
        "tenant": tenant,
        "data": {"seq": seq},
    }))
    .unwrap()
}

fn seq_of(call: &weir::ops::receiver::Call) -> u64 {
    call.body["input"]["event"]["data"]["seq"].as_u64().expect("the call carries the event")
}

/// Quiet tenants, the first `sharing` of them on the noisy tenant's partition of `events`.
fn quiet_tenants(partitions: i32, sharing: usize) -> Vec<String> {
    let noisy = partitioner::partition_for_key(NOISY.as_bytes(), partitions);
    let on = |t: &String| partitioner::partition_for_key(t.as_bytes(), partitions) == noisy;
    let candidates = (0..).map(|i| format!("quiet-{i}"));
    let mut tenants: Vec<String> = candidates.clone().filter(on).take(sharing).collect();
    tenants.extend(candidates.filter(|t| !on(t)).take(QUIET_TENANTS - sharing));
    tenants
}

/// The noisy tenant's first-step records: event id → where the evaluator produced it (`None`:
/// the action topic directly; `Some(tier topic)`: deferred), read until all `want` event ids are
/// there or `timeout`. A record found in two places would be a run produced twice.
fn noisy_records(
    config: &weir::config::Config,
    want: usize,
    timeout: Duration,
) -> (BTreeMap<String, Vec<Option<String>>>, Vec<rdkafka::message::OwnedMessage>) {
    let actions = config.names().actions("webhook");
    let tiers: Vec<String> =
        ["1s", "10s", "1m", "10m"].iter().map(|tier| config.names().retry("webhook", tier)).collect();
    let consumer = reader();
    let mut topics: Vec<&str> = tiers.iter().map(String::as_str).collect();
    topics.push(&actions);
    consumer.subscribe(&topics).unwrap();
    let deadline = std::time::Instant::now() + timeout;
    let (mut places, mut deferred) = (BTreeMap::<String, Vec<Option<String>>>::new(), Vec::new());
    while places.len() < want && std::time::Instant::now() < deadline {
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) else { continue };
        if m.key() != Some(NOISY.as_bytes()) {
            continue;
        }
        let m = m.detach();
        let task: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
        let event_id = task["event_id"].as_str().unwrap().to_string();
        if m.topic() == actions {
            // A deferred task forwarded back keeps its deferral headers: not a direct start.
            if header(&m, deferral::KIND).is_none() {
                places.entry(event_id).or_default().push(None);
            }
        } else {
            places.entry(event_id).or_default().push(Some(m.topic().to_string()));
            deferred.push(m);
        }
    }
    (places, deferred)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_noisy_tenant_over_its_runs_per_minute_is_deferred_and_the_others_flow() {
    let receiver = Receiver::start().await.unwrap();
    let (mut config, _dir) = test_config(&receiver, &[NOTIFY]).await;
    // Few in-flight events: when the evaluator waited for the noisy tenant's permits, these
    // slots filled with its events and no other tenant's event was taken for minutes.
    config.evaluator.max_inflight = 50;
    let config = Arc::new(config);
    let quiet = quiet_tenants(8, 2);
    let pipeline = Pipeline::start(config.clone(), &[StageName::Evaluate, StageName::Execute]).await.unwrap();

    // The noisy tenant's whole flood first. Once its burst is called the evaluator has taken its
    // events (the rest are over the limit); only then the quiet tenants' events, so they come
    // behind the flood on its partition and in the evaluator, not in the same batch.
    let producer = Producer::new(&config).unwrap();
    let noisy = (0..NOISY_EVENTS).map(|seq| (event(NOISY, seq), Format::Json));
    producer.send_all(noisy, 1_000).await.unwrap();
    let called = |tenant: &str| receiver.calls().iter().filter(|c| c.tenant.as_deref() == Some(tenant)).count();
    let burst = eventually(Duration::from_secs(30), || async { called(NOISY) >= PER_MINUTE }).await;
    assert!(burst, "the noisy tenant's burst was called: {}", called(NOISY));
    let quiet_events = quiet.iter().flat_map(|t| (0..QUIET_EVENTS).map(move |seq| (event(t, seq), Format::Json)));
    producer.send_all(quiet_events, 1_000).await.unwrap();

    let all_quiet = QUIET_TENANTS * QUIET_EVENTS;
    let quiet_done =
        eventually(Duration::from_secs(45), || async { quiet.iter().map(|t| called(t)).sum::<usize>() >= all_quiet })
            .await;
    let noisy_when_quiet_done = called(NOISY);
    assert!(
        quiet_done,
        "quiet tenants called {:?} of {QUIET_EVENTS} each; noisy {noisy_when_quiet_done}",
        quiet.iter().map(|t| called(t)).collect::<Vec<_>>()
    );
    // Its limit lets at most a burst and two a second through: most of it is still deferred.
    assert!(
        noisy_when_quiet_done < NOISY_EVENTS / 2,
        "the quiet tenants were all called while the noisy one still had {} runs outstanding",
        NOISY_EVENTS - noisy_when_quiet_done
    );

    // Nothing lost: every noisy event's run was produced exactly once, directly or deferred, and
    // every deferral says when it is due and why.
    let (places, deferred) = noisy_records(&config, NOISY_EVENTS, Duration::from_secs(30));
    assert_eq!(places.len(), NOISY_EVENTS, "every noisy event's task was produced");
    let twice: Vec<_> = places.iter().filter(|(_, p)| p.len() > 1).collect();
    assert!(twice.is_empty(), "runs produced more than once: {twice:?}");
    let direct = places.values().filter(|p| p[0].is_none()).count();
    assert!(direct >= PER_MINUTE, "the burst started directly: {direct}");
    assert!(deferred.len() >= NOISY_EVENTS - 2 * PER_MINUTE, "the rest was deferred: {}", deferred.len());
    for m in &deferred {
        assert_eq!(header(m, deferral::KIND), Some(deferral::DEFERRAL));
        assert!(header(m, deferral::DUE).and_then(|d| d.parse::<u64>().ok()).is_some());
        let reason = header(m, deferral::REASON).unwrap_or_default();
        assert!(reason.contains("runs_per_minute (120)") && reason.contains("*/notify"), "{reason}");
    }
    // The first deferred runs come back, through the 1 s and 10 s tiers and the step between.
    let back = eventually(Duration::from_secs(30), || async { called(NOISY) >= direct + 9 }).await;
    assert!(back, "deferred noisy runs called: {} (direct {direct})", called(NOISY) - direct);
    pipeline.stop().await.unwrap();

    let calls = receiver.calls();
    // Every tenant's calls in event order, exactly once.
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut keys = BTreeSet::new();
    for call in &calls {
        let tenant = call.tenant.clone().unwrap();
        let seq = seq_of(call);
        if let Some(prev) = last.insert(tenant.clone(), seq) {
            assert!(prev < seq, "{tenant}: event {seq} called after {prev}");
        }
        assert!(keys.insert(call.idempotency_key.clone().unwrap()), "{tenant}: event {seq} called twice");
    }
    // The noisy tenant at its limit: in any stretch of its calls, at most the burst plus one per
    // interval of the stretch's length. The slack covers calls forwarded a little after their due
    // time (a due time is never early, so it cannot add more).
    let noisy: Vec<_> = calls.iter().filter(|c| c.tenant.as_deref() == Some(NOISY)).map(|c| c.at).collect();
    let interval = Duration::from_secs(60) / PER_MINUTE as u32;
    let slack = 4;
    for i in 0..noisy.len() {
        for j in i..noisy.len() {
            let allowed = PER_MINUTE + (noisy[j] - noisy[i]).as_millis() as usize / interval.as_millis() as usize;
            assert!(j - i < allowed + slack, "noisy calls {i}..={j}: {} within {:?}", j - i + 1, noisy[j] - noisy[i]);
        }
    }
}
