//! The per-event costs of conditions and templates: `cargo bench --bench engine`.
//!
//! - `condition/evaluate`: one compiled CEL condition on a prebuilt scope;
//! - `scope/build/*`: the scope of a ~1 KB event, from the two fields the conditions read versus
//!   the whole body (what pruning saves);
//! - `template/render`: a three-leaf step input (a native value, an interpolated string, an object);
//! - `match/*`: events of the seeds' mix against 1,000 tenants' workflows plus 20 platform-wide
//!   ones (2.1 candidates per event on average): the index lookup alone, lookup + trigger
//!   conditions (issue 4's figure), the same without index and pruning (`scan_baseline`: scan
//!   every definition, convert the whole body), and the whole plan (root inputs rendered, tasks
//!   built);
//! - `decode_and_plan/*`: the same events from their bytes to their tasks' bytes, decoding the
//!   whole body versus only the parts the candidates read (the evaluator's per-event CPU).

use std::{hint::black_box, sync::Arc, time::Duration};

use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::json;
use weir::{
    engine::condition::{Condition, FieldPaths, Scope},
    engine::definitions::DefinitionStore,
    engine::plan,
    engine::template::InputTemplate,
    engine::workflow::{self, CompiledWorkflow, Workflow},
    envelope::{self, Event},
    stages::evaluate,
};

/// A member event of about 1 KB of JSON.
fn event() -> Event {
    let data = json!({
        "member": {
            "id": "6543a1b2c3d4e5f60718293a",
            "uuid": "0b5c6f3e-2f7a-4a51-9a54-7c1d2e3f4a5b",
            "email": "ada.lovelace@example.com",
            "name": "Ada Lovelace",
            "status": "paid",
            "n": 3,
            "note": "Signed up from the winter campaign landing page after reading two articles.",
            "subscribed": true,
            "comped": false,
            "email_count": 42,
            "email_opened_count": 17,
            "email_open_rate": 40.5,
            "created_at": "2026-11-23T10:00:00.000Z",
            "updated_at": "2026-11-23T10:05:00.000Z",
            "labels": [{"name": "VIP", "slug": "vip"}, {"name": "Early adopter", "slug": "early-adopter"}],
            "newsletters": [
                {"id": "n-1", "name": "Weekly digest", "status": "active"},
                {"id": "n-2", "name": "Product updates", "status": "active"}
            ],
            "tiers": [{"id": "t-1", "name": "Gold", "monthly_price": 900, "currency": "EUR"}],
            "geolocation": {"country": "United Kingdom", "country_code": "GB", "city": "London"}
        },
        "site": {"id": "site-1", "url": "https://example.com", "title": "An Example Publication"},
        "previous": {"status": "free", "updated_at": "2026-10-01T08:00:00.000Z"}
    });
    Event {
        specversion: "1.0".into(),
        id: "e-1".into(),
        source: "/ghost/site-1".into(),
        kind: "member.updated".into(),
        time: Some("2026-11-23T10:05:00Z".into()),
        tenant: "t-1".into(),
        subject: None,
        datacontenttype: Some("application/json".into()),
        data,
    }
}

fn benches(c: &mut Criterion) {
    let event = event();
    eprintln!("event data: {} bytes of JSON", serde_json::to_vec(&event.data).unwrap().len());

    let condition = Condition::compile(r#"data.member.status == "paid" && data.member.n > 2"#).unwrap();
    let mut two_fields = FieldPaths::new();
    two_fields.add(&condition);
    let scope = Scope::build(&event, None, &two_fields);
    assert!(condition.evaluate(&scope).unwrap());

    let mut group = c.benchmark_group("condition");
    group.warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    group.bench_function("evaluate", |b| b.iter(|| condition.evaluate(black_box(&scope)).unwrap()));
    group.finish();

    let all = FieldPaths::all();
    let mut group = c.benchmark_group("scope/build");
    group.warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    group.bench_function("two_fields", |b| b.iter(|| Scope::build(black_box(&event), None, &two_fields)));
    group.bench_function("full_data", |b| b.iter(|| Scope::build(black_box(&event), None, &all)));
    group.finish();

    let input = InputTemplate::compile(&json!({
        "to": "{{ data.member.email }}",
        "subject": "Welcome, {{ data.member.name }}!",
        "article": "{{ steps.fetch.output }}",
    }))
    .unwrap();
    let steps = json!({"fetch": {"output": {"title": "Hello", "words": 120, "url": "https://example.com/hello"}}});
    let ctx = workflow::template_context(&event, steps.clone());
    assert_eq!(input.render(&ctx).unwrap()["subject"], "Welcome, Ada Lovelace!");
    let mut group = c.benchmark_group("template");
    group.warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    group.bench_function("render", |b| b.iter(|| input.render(black_box(&ctx)).unwrap()));
    // What a run pays per event: the context (the body copied once) and one render.
    group.bench_function("context_and_render", |b| {
        b.iter(|| input.render(&workflow::template_context(black_box(&event), steps.clone())).unwrap())
    });
    group.finish();
}

/// The seeds' event mix (Ghost and a store builder).
const KINDS: [&str; 10] = [
    "member.created",
    "member.updated",
    "member.deleted",
    "post.published",
    "post.updated",
    "email.sent",
    "email.opened",
    "email.clicked",
    "order.paid",
    "comment.added",
];

/// One welcome workflow (on member.created) per tenant, and 20 platform-wide workflows, two per
/// event type of the mix.
fn fleet(tenants: usize) -> Vec<Workflow> {
    let own = (0..tenants).map(|i| {
        json!({"id": "welcome", "tenant": format!("tenant-{i}"), "trigger": {"type": "member.created",
               "if": format!("data.member.status == 'paid' && data.member.email_count > {}", i % 50)},
               "steps": [{"id": "mail", "service": "webhook", "input": {"to": "{{ data.member.email }}"}}]})
    });
    let platform = (0..20).map(|j| {
        json!({"id": format!("platform-{j}"), "trigger": {"type": KINDS[j % KINDS.len()], "if": format!("data.member.n > {}", j % 5)},
               "steps": [{"id": "audit", "service": "webhook", "input": {"member": "{{ data.member.id }}"}}]})
    });
    own.chain(platform).map(|v| serde_json::from_value::<Workflow>(v).unwrap()).collect()
}

fn matching(c: &mut Criterion) {
    const TENANTS: usize = 1_000;
    let workflows = fleet(TENANTS);
    let store = DefinitionStore::fixed(&["webhook"], workflows.clone()).unwrap();
    assert_eq!(store.len(), TENANTS + 20);
    let services = ["webhook"].into_iter().collect();
    let compiled: Vec<Arc<CompiledWorkflow>> =
        workflows.into_iter().map(|w| Arc::new(CompiledWorkflow::compile(w, &services).unwrap())).collect();
    // Event i is of tenant i and type i mod 10: one event in ten is a member.created that has
    // three candidates (the tenant's workflow and two platform-wide), the others have two.
    let events: Vec<Event> = (0..TENANTS)
        .map(|i| Event {
            tenant: format!("tenant-{i}"),
            kind: KINDS[i % KINDS.len()].into(),
            id: format!("e-{i}"),
            ..event()
        })
        .collect();
    let candidates = store.matching(&events[0].tenant, &events[0].kind);
    assert_eq!(candidates.len(), 3, "the tenant's workflow and two platform-wide ones");
    assert_eq!(plan::triggered(&events[0], &candidates).filter(|(_, m)| *m == Ok(true)).count(), 3);

    let mut group = c.benchmark_group("match");
    group.warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    // Events cycle through all tenants, so consecutive lookups hit different cache entries.
    let mut i = 0;
    let mut next = || {
        i = (i + 1) % TENANTS;
        &events[i]
    };
    group.bench_function("lookup", |b| {
        b.iter(|| {
            let event = next();
            store.matching(black_box(&event.tenant), &event.kind)
        })
    });
    // The baseline: no index and no pruning. Scan every definition for the event's tenant and
    // type, convert the whole body to CEL values, evaluate the candidates.
    let all = FieldPaths::all();
    group.bench_function("scan_baseline", |b| {
        b.iter(|| {
            let event = next();
            let candidates: Vec<&Arc<CompiledWorkflow>> = compiled
                .iter()
                .filter(|w| w.def.triggers_on(&event.kind) && w.def.tenant.as_deref().is_none_or(|t| t == event.tenant))
                .collect();
            let scope = Scope::build(black_box(event), None, &all);
            candidates.iter().filter(|w| w.trigger_matches(&scope) == Ok(true)).count()
        })
    });
    group.bench_function("lookup_and_conditions", |b| {
        b.iter(|| {
            let event = next();
            let candidates = store.matching(&event.tenant, &event.kind);
            plan::triggered(black_box(event), &candidates).filter(|(_, m)| *m == Ok(true)).count()
        })
    });
    group.bench_function("plan", |b| {
        b.iter(|| {
            let event = next();
            let candidates = store.matching(&event.tenant, &event.kind);
            plan::start(black_box(event), &candidates, "2026-11-23T10:05:00Z").len()
        })
    });
    group.finish();

    // From the record's bytes to the tasks' bytes, as the evaluator does per event: the whole
    // body decoded (as before), or the attributes first and only the body's parts the candidates
    // read.
    let payloads: Vec<Vec<u8>> = events.iter().map(|e| serde_json::to_vec(e).unwrap()).collect();
    let encode = |planned: Vec<(Arc<CompiledWorkflow>, plan::Plan)>| {
        let mut bytes = 0;
        for task in planned.into_iter().flat_map(|(_, p)| p.tasks) {
            bytes += serde_json::to_vec(&task).unwrap().len();
        }
        bytes
    };
    let mut group = c.benchmark_group("decode_and_plan");
    group.warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    let mut i = 0;
    let mut next = || {
        i = (i + 1) % TENANTS;
        &payloads[i]
    };
    group.bench_function("whole_body", |b| {
        b.iter(|| {
            let event = envelope::decode_event(black_box(next()), None, 1 << 20).unwrap();
            let candidates = store.matching(&event.tenant, &event.kind);
            encode(plan::start(&event, &candidates, "2026-11-23T10:05:00Z"))
        })
    });
    group.bench_function("read_paths", |b| {
        b.iter(|| {
            let event = envelope::decode_unparsed_event(black_box(next()), None, 1 << 20).unwrap();
            let candidates = store.matching(&event.tenant, &event.kind);
            let paths = evaluate::start_paths(&candidates);
            let event = event.map_data(|body| body.parse(|text| paths.parse_selected("data", text))).unwrap();
            encode(plan::start(&event, &candidates, "2026-11-23T10:05:00Z"))
        })
    });
    group.finish();
}

criterion_group!(engine, benches, matching);
criterion_main!(engine);
