//! Ordering keys (issue 15): a workflow's calls for one subject stay in order while the tenant's
//! other subjects run side by side, through the real broker and a real local HTTP receiver.

mod common;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use common::*;
use weir::{
    envelope::{Event, Format},
    ops::produce::Producer,
    ops::receiver::{Call, Mode, Receiver},
    pipeline::{Pipeline, StageName},
};

/// Orders by subject (the default): one busy tenant, ten members.
const BY_SUBJECT: &str = "
id: by-subject
tenant: busy
trigger: {type: member.updated}
steps: [{id: notify, service: webhook, input: {seq: '{{ data.seq }}', subject: '{{ event.subject }}'}}]
";

/// The same for another tenant, ordered by tenant: all its calls one at a time.
const BY_TENANT: &str = "
id: by-tenant
tenant: strict
order_by: tenant
trigger: {type: member.updated}
steps: [{id: notify, service: webhook, input: {seq: '{{ data.seq }}', subject: '{{ event.subject }}'}}]
";

const SUBJECTS: usize = 10;
const PER_SUBJECT: usize = 20;

/// Event `n` of `tenant`: about member `n % SUBJECTS`, the subjects interleaved.
fn updated(tenant: &str, n: usize) -> Event {
    serde_json::from_value(serde_json::json!({
        "id": format!("{tenant}-e-{n}"), "source": "/ghost/test", "type": "member.updated",
        "tenant": tenant, "subject": format!("member/{}", n % SUBJECTS), "data": {"seq": n},
    }))
    .unwrap()
}

/// The sequence numbers of `tenant`'s calls per subject, in the order the receiver got them.
fn by_subject<'a>(calls: impl Iterator<Item = &'a Call>) -> BTreeMap<String, Vec<u64>> {
    let mut seen: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for c in calls {
        let input = &c.body["input"];
        let seq = input["seq"].as_u64().expect("a seq");
        seen.entry(input["subject"].as_str().expect("a subject").to_string()).or_default().push(seq);
    }
    seen
}

/// One tenant's 200 events about 10 members, interleaved, with `tenant_concurrency` 8: each
/// member's calls arrive in event order, and several of the tenant's calls are in flight at
/// once (it is not serialised). A tenant whose workflow orders by tenant has every call in event
/// order and never two at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_of_one_subject_stay_in_order_while_the_tenants_other_subjects_run_side_by_side() {
    let receiver = Receiver::start().await.unwrap();
    receiver.set_mode(Mode { latency: Duration::from_millis(30), ..Default::default() });
    let (config, _dir) = test_config(&receiver, &[BY_SUBJECT, BY_TENANT]).await;
    assert_eq!(config.services["webhook"].tenant_concurrency, 8, "the default");
    let config = Arc::new(config);
    let pipeline = Pipeline::start(config.clone(), &[StageName::Evaluate, StageName::Execute]).await.unwrap();
    let n = SUBJECTS * PER_SUBJECT;
    let events: Vec<Event> = (0..n).flat_map(|i| [updated("busy", i), updated("strict", i)]).collect();
    Producer::new(&config).unwrap().send_all(events.into_iter().map(|e| (e, Format::Json)), 1_000).await.unwrap();
    let all = eventually(Duration::from_secs(120), || async { receiver.executed() >= 2 * n }).await;
    pipeline.stop().await.unwrap();
    assert!(all, "every event called: {} of {}", receiver.executed(), 2 * n);

    let calls = receiver.calls();
    let of = |tenant: &'static str| calls.iter().filter(move |c| c.tenant.as_deref() == Some(tenant) && !c.replayed);
    for (tenant, subjects) in [("busy", by_subject(of("busy"))), ("strict", by_subject(of("strict")))] {
        assert_eq!(subjects.len(), SUBJECTS, "{tenant}: every member called");
        for (subject, seqs) in &subjects {
            let mut sorted = seqs.clone();
            sorted.sort_unstable();
            assert_eq!(seqs, &sorted, "{tenant}: {subject}'s calls out of event order");
            assert_eq!(seqs.len(), PER_SUBJECT, "{tenant}: {subject} called once per event");
        }
    }
    let strict: Vec<u64> = of("strict").map(|c| c.body["input"]["seq"].as_u64().unwrap()).collect();
    assert!(strict.windows(2).all(|w| w[0] < w[1]), "order_by: tenant keeps the whole tenant in event order");
    let (busy, strict) = (receiver.most_at_once("busy"), receiver.most_at_once("strict"));
    println!("most calls at once: busy (order_by subject) {busy}, strict (order_by tenant) {strict}");
    assert_eq!(strict, 1, "order_by: tenant makes one call of the tenant at a time");
    assert!(busy > 1, "the busy tenant's subjects ran side by side (at most {busy} at once)");
    assert!(busy <= 8, "no more than tenant_concurrency at once: {busy}");
}
