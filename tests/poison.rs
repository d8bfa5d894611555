//! The poison suite: a real pipeline (evaluate → execute against a local HTTP server → record into
//! PostgreSQL, on the real broker) receives the events of several good tenants interleaved with a
//! corpus of bad records and definitions built to be expensive. Faults are the product: whatever
//! one record or one definition does, it must not stop a stage, a partition or another tenant.
//!
//! Asserted, by counts against deadlines (never by timing):
//! - every good event reaches the receiver once and PostgreSQL once, in its tenant's order;
//! - every bad record is in the dead-letter topic with a reason header, or is a `failed` result
//!   with a reason (the expected outcome is stated per case);
//! - no stage ends: the pipeline's tasks are all still running when the good events are done;
//! - the good tenants complete while the bad records are handled.
//!
//! When it fails, the test prints a table of the corpus with each case's outcome, so the missing
//! behaviour is named rather than inferred from a count.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use common::*;
use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    message::{Header, OwnedHeaders, OwnedMessage},
    producer::{FutureProducer, FutureRecord},
    ClientConfig, Message,
};
use serde_json::{json, Value as Json};
use weir::{
    envelope::{self, Event, Format, Record},
    kafka::{dead_letter, partitioner},
    ops::receiver::Receiver,
    pipeline::Pipeline,
};

/// The good tenants' workflow. Its input reads one field, so even an event at the size limit
/// makes a small task.
const GOOD: &str = "{id: good, trigger: {type: member.created}, steps: [{id: notify, service: webhook, \
                    input: {seq: '{{ data.seq }}'}}]}";
/// A step without `input` receives the whole event: the task (and the receiver's echo, the
/// result's output) carries the body, whatever its size or content.
const ECHO: &str = "{id: echo, trigger: {type: poison.echo}, steps: [{id: s, service: webhook}]}";
/// 400 million loop iterations that render nothing: only a fuel budget stops it.
const SPIN: &str = "{id: spin, trigger: {type: poison.spin}, steps: [{id: s, service: webhook, input: {x: \
                    '{% for a in range(20000) %}{% for b in range(20000) %}{% endfor %}{% endfor %}'}}]}";
/// Renders 6 MB: over every record limit.
const RENDER: &str = "{id: render, trigger: {type: poison.render}, steps: [{id: s, service: webhook, input: {x: \
                      '{% for a in range(3000) %}{% for b in range(1000) %}xx{% endfor %}{% endfor %}'}}]}";
/// Renders 6 MB in a handful of instructions: only an output limit (or the record limit) stops it.
const REPEAT: &str = r#"{id: repeat, trigger: {type: poison.repeat}, steps: [{id: s, service: webhook,
                        input: {x: '{{ "xx" * 3000000 }}'}}]}"#;
/// The service answers with as many bytes as the event asks for: a result bigger than its task.
const LOUD: &str = "{id: loud, trigger: {type: poison.loud}, steps: [{id: s, service: webhook, \
                    input: {respond_bytes: '{{ data.bytes }}'}}]}";
/// A multi-step run: its event (stored with the run) and the first step's echoed output reach
/// PostgreSQL as `jsonb`, and the second step's input carries the body again.
const TWO_STEPS: &str = "{id: two, trigger: {type: poison.run}, steps: [{id: a, service: webhook}, \
                         {id: b, service: webhook, needs: [a], input: {note: '{{ data.note }}'}}]}";

/// `evaluator.max_event_bytes`' default.
const MAX_EVENT_BYTES: usize = 1 << 20;
/// The events topic's `max.message.bytes` (topics/core.yaml).
const EVENTS_TOPIC_BYTES: usize = 2 << 20;
/// `limits.max_record_bytes`' default: the largest record weir produces (a task, a result).
const MAX_RECORD_BYTES: usize = 900_000;
/// `limits.max_attribute_bytes`' default: the longest id, tenant, type and source.
const MAX_ATTRIBUTE_BYTES: usize = 512;

/// Good events per good tenant.
const ROUNDS: usize = 30;

/// What must become of a record.
#[derive(Debug, Clone)]
enum Expect {
    /// Called once and recorded once as succeeded (a good event at the edge of a limit).
    Good,
    /// A dead letter from the evaluator whose origin is this record, with a reason containing
    /// each of these words.
    DeadLetter(&'static [&'static str]),
    /// A `failed` result of this event with an error containing each of these words.
    Failed(&'static [&'static str]),
    /// Handled one way or another, none of them forever: recorded (called and stored, or failed
    /// with a reason) or dead-lettered by any stage. For records that are not wrong as such but
    /// hold what breaks things further on (NUL in data, a key that is not the tenant).
    Handled,
    /// Refused by the broker at produce: it never reaches weir.
    Refused,
}

struct Case {
    name: String,
    key: Vec<u8>,
    payload: Vec<u8>,
    content_type: Option<Vec<u8>>,
    /// The event id, where there is one to find results and dead letters by.
    event_id: Option<String>,
    expect: Expect,
    /// Where it was written: (partition, offset); `None` when the broker refused it.
    written: Option<(i32, i64)>,
}

impl Case {
    fn new(name: impl Into<String>, key: &[u8], payload: Vec<u8>, content_type: Option<&[u8]>, expect: Expect) -> Case {
        Case {
            name: name.into(),
            key: key.to_vec(),
            payload,
            content_type: content_type.map(<[u8]>::to_vec),
            event_id: None,
            expect,
            written: None,
        }
    }

    fn id(mut self, id: &str) -> Case {
        self.event_id = Some(id.to_string());
        self
    }
}

fn event_json(id: &str, tenant: &str, kind: &str, source: &str, data: Json) -> Vec<u8> {
    serde_json::to_vec(&json!({"id": id, "source": source, "type": kind, "tenant": tenant, "data": data})).unwrap()
}

fn event(id: &str, tenant: &str, kind: &str, source: &str, data: Json) -> Event {
    serde_json::from_slice(&event_json(id, tenant, kind, source, data)).unwrap()
}

/// A JSON event whose payload is exactly `size` bytes, padded in `data.pad`.
fn event_of_size(size: usize, id: &str, tenant: &str, kind: &str, mut data: Json) -> Vec<u8> {
    data["pad"] = json!("");
    let base = event_json(id, tenant, kind, "/poison", data.clone()).len();
    data["pad"] = json!("p".repeat(size - base));
    let payload = event_json(id, tenant, kind, "/poison", data);
    assert_eq!(payload.len(), size);
    payload
}

/// An Avro event whose `data` is not JSON text.
fn avro_with_data(data: &str) -> Vec<u8> {
    use apache_avro::types::Value as Avro;
    let s = |v: &str| Avro::String(v.to_string());
    let none = || Avro::Union(0, Box::new(Avro::Null));
    let record = Avro::Record(vec![
        ("specversion".into(), s("1.0")),
        ("id".into(), s("bad-avro-data")),
        ("source".into(), s("/poison")),
        ("type".into(), s("member.created")),
        ("time".into(), none()),
        ("tenant".into(), s("poison-avro")),
        ("subject".into(), none()),
        ("datacontenttype".into(), none()),
        ("data".into(), Avro::Union(1, Box::new(s(data)))),
    ]);
    let mut writer = apache_avro::GenericSingleObjectWriter::new_with_capacity(Event::schema(), 1024).unwrap();
    let mut out = Vec::new();
    writer.write_value(record, &mut out).unwrap();
    out
}

const JSON_CT: Option<&[u8]> = Some(b"application/json");
const AVRO_CT: Option<&[u8]> = Some(b"application/avro");

/// The corpus of bad records (and good ones at the edge of a limit).
fn corpus() -> Vec<Case> {
    let mut cases = Vec::new();
    let mut n = 0;
    let mut id = |what: &str| {
        n += 1;
        format!("bad-{n}-{what}")
    };

    // Control characters in every attribute weir uses as a key, header or column.
    for (ch, ch_name) in [('\0', "NUL"), ('\r', "CR"), ('\n', "LF"), ('\t', "tab"), ('\u{7f}', "DEL")] {
        for attr in ["tenant", "id", "type", "source"] {
            let eid = id(&format!("ctl-{attr}"));
            let with = |base: &str| format!("{base}{ch}x");
            let (tenant, event_id, kind, source) = match attr {
                "tenant" => (with("poison-ctl"), eid.clone(), "member.created".to_string(), "/poison".to_string()),
                "id" => ("poison-ctl".into(), with(&eid), "member.created".into(), "/poison".into()),
                "type" => ("poison-ctl".into(), eid.clone(), with("member.created"), "/poison".into()),
                _ => ("poison-ctl".into(), eid.clone(), "member.created".into(), with("/poison")),
            };
            let payload = event_json(&event_id, &tenant, &kind, &source, json!({"seq": 0}));
            let expect = Expect::DeadLetter(match attr {
                "tenant" => &["tenant"],
                "id" => &["id"],
                "type" => &["type"],
                _ => &["source"],
            });
            cases.push(Case::new(format!("{ch_name} in {attr} (JSON)"), tenant.as_bytes(), payload, JSON_CT, expect));
        }
    }
    // The same through Avro, which has its own decoding path.
    for (attr, value) in [("tenant", "poison-ctl\0x"), ("id", "bad-avro\nid")] {
        let e = if attr == "tenant" {
            event(&id("avro-ctl"), value, "member.created", "/poison", json!({"seq": 0}))
        } else {
            event(value, "poison-ctl", "member.created", "/poison", json!({"seq": 0}))
        };
        let expect = Expect::DeadLetter(if attr == "tenant" { &["tenant"] } else { &["id"] });
        let payload = envelope::encode(&e, Format::Avro).unwrap();
        cases.push(Case::new(
            format!("control character in {attr} (Avro)"),
            e.tenant.as_bytes(),
            payload,
            AVRO_CT,
            expect,
        ));
    }
    // Attribute lengths: just over the limit in each (just at it is a good tenant, below).
    let long = "x".repeat(MAX_ATTRIBUTE_BYTES + 1);
    for attr in ["tenant", "id", "type", "source"] {
        let eid = id(&format!("long-{attr}"));
        let payload = match attr {
            "tenant" => event_json(&eid, &long, "member.created", "/poison", json!({"seq": 0})),
            "id" => event_json(&long, "poison-long", "member.created", "/poison", json!({"seq": 0})),
            "type" => event_json(&eid, "poison-long", &long, "/poison", json!({"seq": 0})),
            _ => event_json(&eid, "poison-long", "member.created", &long, json!({"seq": 0})),
        };
        let expect = Expect::DeadLetter(match attr {
            "tenant" => &["tenant"],
            "id" => &["id"],
            "type" => &["type"],
            _ => &["source"],
        });
        let key = if attr == "tenant" { long.as_bytes() } else { b"poison-long" };
        cases.push(Case::new(format!("{attr} of {} bytes", long.len()), key, payload, JSON_CT, expect));
    }
    let huge = "h".repeat(100_000);
    let eid = id("huge-tenant");
    cases.push(Case::new(
        "tenant of 100,000 bytes",
        huge.as_bytes(),
        event_json(&eid, &huge, "member.created", "/poison", json!({"seq": 0})),
        JSON_CT,
        Expect::DeadLetter(&["tenant"]),
    ));
    let eid = id("empty-tenant");
    cases.push(Case::new(
        "empty tenant",
        b"",
        event_json(&eid, "", "member.created", "/poison", json!({"seq": 0})),
        JSON_CT,
        Expect::DeadLetter(&["tenant"]),
    ));

    // Sizes around the event limit and the events topic's limit.
    let eid = id("event-over-limit");
    let payload = event_of_size(MAX_EVENT_BYTES + 1, &eid, "poison-size", "member.created", json!({"seq": 0}));
    cases.push(
        Case::new(
            "event 1 byte over evaluator.max_event_bytes",
            b"poison-size",
            payload,
            JSON_CT,
            Expect::DeadLetter(&["limit"]),
        )
        .id(&eid),
    );
    let eid = id("event-near-topic-limit");
    let payload = event_of_size(EVENTS_TOPIC_BYTES - 1024, &eid, "poison-size", "member.created", json!({"seq": 0}));
    cases.push(
        Case::new(
            "event 1 KiB under the events topic's 2 MiB",
            b"poison-size",
            payload,
            JSON_CT,
            Expect::DeadLetter(&["limit"]),
        )
        .id(&eid),
    );
    let eid = id("event-over-topic-limit");
    let payload = event_of_size(EVENTS_TOPIC_BYTES + 1, &eid, "poison-size", "member.created", json!({"seq": 0}));
    cases.push(Case::new("event over the events topic's 2 MiB", b"poison-size", payload, JSON_CT, Expect::Refused));

    // Sizes around the record limit: the task carries the whole event (the echo workflow).
    for (name, body, expect) in [
        ("task under limits.max_record_bytes", MAX_RECORD_BYTES - 50_000, Expect::Good),
        ("task over limits.max_record_bytes", MAX_RECORD_BYTES + 20_000, Expect::Failed(&["limit"])),
        ("task over the producer's message.max.bytes", MAX_EVENT_BYTES - 8_000, Expect::Failed(&["limit"])),
    ] {
        let eid = id("task-size");
        let payload = event_json(&eid, "poison-echo", "poison.echo", "/poison", json!({"s": "s".repeat(body)}));
        assert!(payload.len() <= MAX_EVENT_BYTES, "{name}: the event itself is accepted");
        cases.push(Case::new(name, b"poison-echo", payload, JSON_CT, expect).id(&eid));
    }

    // Sizes around the record limit for a result: the service's answer is its output.
    for (name, bytes, expect) in [
        ("result under limits.max_record_bytes", MAX_RECORD_BYTES - 100_000, Expect::Good),
        ("result over limits.max_record_bytes", MAX_RECORD_BYTES + 50_000, Expect::Handled),
        ("result over the producer's message.max.bytes", 2 * MAX_EVENT_BYTES, Expect::Handled),
    ] {
        let eid = id("result-size");
        let payload = event_json(&eid, "poison-loud", "poison.loud", "/poison", json!({"bytes": bytes}));
        cases.push(Case::new(name, b"poison-loud", payload, JSON_CT, expect).id(&eid));
    }

    // Undecodable bodies.
    let mut invalid_utf8_tenant =
        br#"{"id":"bad-utf8-tenant","source":"/p","type":"member.created","tenant":"a"#.to_vec();
    invalid_utf8_tenant.extend_from_slice(b"\xff\xfe\",\"data\":{}}");
    cases.push(Case::new(
        "invalid UTF-8 in the tenant",
        b"poison-utf8",
        invalid_utf8_tenant,
        JSON_CT,
        Expect::DeadLetter(&[]),
    ));
    let mut invalid_utf8_data =
        br#"{"id":"bad-utf8-data","source":"/p","type":"member.created","tenant":"poison-utf8","data":{"seq":1,"x":""#
            .to_vec();
    invalid_utf8_data.extend_from_slice(b"\xc3\x28\"}}");
    cases.push(Case::new(
        "invalid UTF-8 in the data",
        b"poison-utf8",
        invalid_utf8_data,
        JSON_CT,
        Expect::DeadLetter(&[]),
    ));
    cases.push(Case::new("not JSON", b"poison-json", b"{not json".to_vec(), JSON_CT, Expect::DeadLetter(&["JSON"])));
    cases.push(Case::new(
        "no content-type, not JSON",
        b"poison-json",
        b"\x00\x01\x02".to_vec(),
        None,
        Expect::DeadLetter(&[]),
    ));
    cases.push(Case::new(
        "JSON without the required attributes",
        b"poison-json",
        br#"{"id":"only-an-id"}"#.to_vec(),
        JSON_CT,
        Expect::DeadLetter(&[]),
    ));
    cases.push(Case::new(
        "tenant of the wrong JSON type",
        b"poison-json",
        br#"{"id":"bad-type","source":"/p","type":"member.created","tenant":7}"#.to_vec(),
        JSON_CT,
        Expect::DeadLetter(&[]),
    ));

    // Deep nesting: read by the workflow (the whole body is parsed) and not read (skipped).
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let eid = id("deep-read");
    let payload = format!(
        r#"{{"id":"{eid}","source":"/p","type":"poison.echo","tenant":"poison-echo","data":{{"deep":{deep}}}}}"#
    );
    cases.push(
        Case::new(
            "data nested 100,000 deep, read",
            b"poison-echo",
            payload.into_bytes(),
            JSON_CT,
            Expect::DeadLetter(&[]),
        )
        .id(&eid),
    );
    let eid = id("deep-unread");
    let payload = format!(
        r#"{{"id":"{eid}","source":"/p","type":"member.created","tenant":"poison-deep","data":{{"seq":1,"deep":{deep}}}}}"#
    );
    cases.push(
        Case::new("data nested 100,000 deep, not read", b"poison-deep", payload.into_bytes(), JSON_CT, Expect::Handled)
            .id(&eid),
    );
    let eid = id("deep-data");
    let payload =
        format!(r#"{{"id":"{eid}","source":"/p","type":"member.created","tenant":"poison-deep","data":{deep}}}"#);
    cases.push(
        Case::new(
            "data that is an array nested 100,000 deep",
            b"poison-deep",
            payload.into_bytes(),
            JSON_CT,
            Expect::Handled,
        )
        .id(&eid),
    );

    // Content types.
    for ct in [&b"text/csv"[..], b"application/x-protobuf", b"\xff\xfe"] {
        let eid = id("content-type");
        let payload = event_json(&eid, "poison-ct", "member.created", "/poison", json!({"seq": 1}));
        let name = format!("content-type {:?}", String::from_utf8_lossy(ct));
        cases.push(Case::new(name, b"poison-ct", payload, Some(ct), Expect::DeadLetter(&["content-type"])));
    }

    // Avro that is not right.
    let valid =
        envelope::encode(&event(&id("avro"), "poison-avro", "member.created", "/p", json!({"seq": 1})), Format::Avro)
            .unwrap();
    cases.push(Case::new(
        "Avro garbage",
        b"poison-avro",
        b"\xc3\x01\x00\x01garbage".to_vec(),
        AVRO_CT,
        Expect::DeadLetter(&["Avro"]),
    ));
    cases.push(Case::new(
        "Avro truncated",
        b"poison-avro",
        valid[..valid.len() / 2].to_vec(),
        AVRO_CT,
        Expect::DeadLetter(&["Avro"]),
    ));
    let mut wrong_fingerprint = valid.clone();
    wrong_fingerprint[5] ^= 0xff;
    cases.push(Case::new(
        "Avro of another schema",
        b"poison-avro",
        wrong_fingerprint,
        AVRO_CT,
        Expect::DeadLetter(&["Avro"]),
    ));
    let json_as_avro = event_json(&id("json-as-avro"), "poison-avro", "member.created", "/p", json!({"seq": 1}));
    cases.push(Case::new("JSON labelled Avro", b"poison-avro", json_as_avro, AVRO_CT, Expect::DeadLetter(&["Avro"])));
    cases.push(Case::new(
        "Avro whose data is not JSON",
        b"poison-avro",
        avro_with_data("{not json"),
        AVRO_CT,
        Expect::DeadLetter(&[]),
    ));

    // Keys: weir keys its own records by tenant and ignores an event's key, which may be anything.
    let eid = id("utf8-key");
    let payload = event_json(&eid, "poison-key", "member.created", "/poison", json!({"seq": 1}));
    cases
        .push(Case::new("invalid UTF-8 key, valid event", b"\xff\xfe\xfd", payload, JSON_CT, Expect::Handled).id(&eid));
    cases.push(Case::new(
        "invalid UTF-8 key, invalid body",
        b"\xff\xfe\xfd",
        b"\xff{".to_vec(),
        JSON_CT,
        Expect::DeadLetter(&[]),
    ));
    let eid = id("huge-key");
    let payload = event_json(&eid, "poison-key", "member.created", "/poison", json!({"seq": 2}));
    cases.push(
        Case::new("key of 200,000 bytes, valid event", &vec![b'k'; 200_000], payload, JSON_CT, Expect::Handled)
            .id(&eid),
    );

    // Definitions built to be expensive, and NUL in data that reaches PostgreSQL.
    let eid = id("spin");
    let payload = event_json(&eid, "poison-spin", "poison.spin", "/poison", json!({}));
    cases.push(
        Case::new("template looping 400 million times", b"poison-spin", payload, JSON_CT, Expect::Failed(&[])).id(&eid),
    );
    let eid = id("render");
    let payload = event_json(&eid, "poison-render", "poison.render", "/poison", json!({}));
    cases.push(Case::new("template rendering 6 MB", b"poison-render", payload, JSON_CT, Expect::Failed(&[])).id(&eid));
    let eid = id("repeat");
    let payload = event_json(&eid, "poison-render", "poison.repeat", "/poison", json!({}));
    cases.push(
        Case::new("template rendering 6 MB in one expression", b"poison-render", payload, JSON_CT, Expect::Failed(&[]))
            .id(&eid),
    );
    let eid = id("nul-run");
    let payload = event_json(&eid, "poison-nul", "poison.run", "/poison", json!({"note": "a\u{0}b"}));
    cases.push(Case::new("NUL in a multi-step run's data", b"poison-nul", payload, JSON_CT, Expect::Handled).id(&eid));
    let eid = id("nul-echo");
    let payload = event_json(&eid, "poison-nul", "poison.echo", "/poison", json!({"note": "a\u{0}b"}));
    cases.push(
        Case::new("NUL in data echoed into a result's output", b"poison-nul", payload, JSON_CT, Expect::Handled)
            .id(&eid),
    );
    let eid = id("escaped-nul");
    let payload = event_json(&eid, "poison-nul", "poison.echo", "/poison", json!({"note": "\\u0000 as text"}));
    cases.push(
        Case::new("the text \\u0000 in data (not a NUL)", b"poison-nul", payload, JSON_CT, Expect::Good).id(&eid),
    );

    // Every case with an event id in its payload is found by it.
    for case in &mut cases {
        if case.event_id.is_none() {
            case.event_id =
                serde_json::from_slice::<Json>(&case.payload).ok().and_then(|v| v["id"].as_str().map(str::to_string));
        }
    }
    cases
}

/// The good tenants: one per partition of the events topic (so each sink lane and each
/// partition has good work behind any bad record), plus one whose name is exactly as long as an
/// attribute may be.
fn good_tenants() -> Vec<String> {
    let mut by_partition = BTreeMap::new();
    for i in 0.. {
        let tenant = format!("good-{i}");
        by_partition.entry(partitioner::partition_for_key(tenant.as_bytes(), 8)).or_insert(tenant);
        if by_partition.len() == 8 {
            break;
        }
    }
    let mut tenants: Vec<String> = by_partition.into_values().collect();
    tenants.push(format!("good-long-{}", "g".repeat(MAX_ATTRIBUTE_BYTES - "good-long-".len())));
    tenants
}

/// Good event `seq` of `tenant`; one of them is exactly at the event size limit.
fn good_event(tenant: &str, seq: usize) -> (Vec<u8>, &'static [u8], String) {
    // Delimited, so that no id is part of another (dead letters are found by the id in them).
    let id = format!("good.{}.{seq}.", &tenant[..tenant.len().min(12)]);
    if tenant == "good-0" && seq == ROUNDS / 2 {
        return (
            event_of_size(MAX_EVENT_BYTES, &id, tenant, "member.created", json!({"seq": seq})),
            b"application/json",
            id,
        );
    }
    let e = event(&id, tenant, "member.created", "/ghost/good", json!({"seq": seq}));
    let format = if seq % 2 == 0 { Format::Json } else { Format::Avro };
    (envelope::encode(&e, format).unwrap(), format.content_type().as_bytes(), id)
}

/// Reads the dead-letter topic in a thread of its own until stopped.
struct DeadLetterReader {
    letters: Arc<Mutex<Vec<OwnedMessage>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DeadLetterReader {
    fn start(topic: &str) -> DeadLetterReader {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("group.id", unique("poison-dlq-"))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        consumer.subscribe(&[topic]).unwrap();
        let (letters, stop) = (Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicBool::new(false)));
        let (into, stopped) = (letters.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::SeqCst) {
                if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                    into.lock().unwrap().push(m.detach());
                }
            }
        });
        DeadLetterReader { letters, stop, thread: Some(thread) }
    }

    fn letters(&self) -> Vec<OwnedMessage> {
        self.letters.lock().unwrap().clone()
    }
}

impl Drop for DeadLetterReader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A row of `action_results`.
#[derive(Debug, Clone, sqlx::FromRow)]
struct Row {
    task_id: String,
    event_id: String,
    tenant: String,
    status: String,
    error: Option<String>,
}

/// What the test sees at one moment.
struct Seen {
    calls: Vec<weir::ops::receiver::Call>,
    rows: Vec<Row>,
    letters: Vec<OwnedMessage>,
}

impl Seen {
    fn calls_of(&self, event_id: &str) -> usize {
        self.calls.iter().filter(|c| c.body["event_id"].as_str() == Some(event_id)).count()
    }

    fn rows_of(&self, event_id: &str) -> Vec<&Row> {
        self.rows.iter().filter(|r| r.event_id == event_id).collect()
    }

    /// Dead letters whose origin is `written` on `topic`, or (from later stages) whose payload
    /// names `event_id`.
    fn letters_of(&self, topic: &str, written: Option<(i32, i64)>, event_id: Option<&str>) -> Vec<&OwnedMessage> {
        self.letters
            .iter()
            .filter(|m| {
                let origin = (
                    header(m, dead_letter::ORIGIN_TOPIC),
                    header(m, dead_letter::ORIGIN_PARTITION).and_then(|p| p.parse().ok()),
                    header(m, dead_letter::ORIGIN_OFFSET).and_then(|o| o.parse().ok()),
                );
                let from_record = written.is_some_and(|(p, o)| origin == (Some(topic), Some(p), Some(o)));
                let names_event = event_id.is_some_and(|id| {
                    header(m, dead_letter::ORIGIN_TOPIC) != Some(topic)
                        && m.payload().is_some_and(|p| p.windows(id.len()).any(|w| w == id.as_bytes()))
                });
                from_record || names_event
            })
            .collect()
    }

    /// Whether `case` came out as expected, and what happened to it.
    fn check(&self, case: &Case, events_topic: &str) -> (bool, String) {
        let id = case.event_id.as_deref();
        let calls = id.map_or(0, |id| self.calls_of(id));
        let rows = id.map_or(Vec::new(), |id| self.rows_of(id));
        let letters = self.letters_of(events_topic, case.written, id);
        let reasons: Vec<&str> = letters.iter().map(|m| header(m, dead_letter::REASON).unwrap_or("")).collect();
        let outcome = format!(
            "calls {calls}, rows [{}], dead letters [{}]",
            rows.iter()
                .map(|r| format!("{} {}", r.status, r.error.as_deref().unwrap_or("")))
                .collect::<Vec<_>>()
                .join("; "),
            letters
                .iter()
                .zip(&reasons)
                .map(|(m, r)| format!("{}: {r}", header(m, dead_letter::STAGE).unwrap_or("?")))
                .collect::<Vec<_>>()
                .join("; "),
        );
        let outcome: String = outcome.chars().take(400).collect();
        let ok = match &case.expect {
            Expect::Good => calls == 1 && rows.len() == 1 && rows[0].status == "succeeded" && letters.is_empty(),
            Expect::DeadLetter(words) => {
                letters.len() == 1
                    && header(letters[0], dead_letter::STAGE) == Some("evaluate")
                    && !reasons[0].is_empty()
                    && words.iter().all(|w| reasons[0].contains(w))
                    && calls == 0
                    && rows.is_empty()
            }
            Expect::Failed(words) => {
                calls == 0
                    && !rows.is_empty()
                    && rows.iter().all(|r| {
                        r.status == "failed"
                            && r.error.as_deref().is_some_and(|e| !e.is_empty() && words.iter().all(|w| e.contains(w)))
                    })
            }
            Expect::Handled => {
                let failed_with_reason =
                    rows.iter().all(|r| r.status != "failed" || r.error.as_deref().is_some_and(|e| !e.is_empty()));
                (!rows.is_empty() && failed_with_reason) || letters.iter().zip(&reasons).any(|(_, r)| !r.is_empty())
            }
            Expect::Refused => case.written.is_none(),
        };
        (ok, outcome)
    }
}

async fn seen(receiver: &Receiver, pool: &sqlx::PgPool, dlq: &DeadLetterReader) -> Seen {
    // Before the sink has created the table the query fails: no rows yet.
    let rows = sqlx::query_as::<_, Row>("select task_id, event_id, tenant, status, error from action_results")
        .fetch_all(pool)
        .await
        .unwrap_or_default();
    Seen { calls: receiver.calls(), rows, letters: dlq.letters() }
}

/// Produces `payload` as it is: any key, any header bytes. Large records are allowed up to
/// beyond the events topic's limit, uncompressed, so that the broker is what refuses the one
/// over it.
async fn send(
    producer: &FutureProducer,
    topic: &str,
    key: &[u8],
    payload: &[u8],
    content_type: Option<&[u8]>,
) -> Option<(i32, i64)> {
    let mut headers = OwnedHeaders::new();
    if let Some(ct) = content_type {
        headers = headers.insert(Header { key: envelope::CONTENT_TYPE, value: Some(ct) });
    }
    let record = FutureRecord::to(topic).key(key).payload(payload).headers(headers);
    match producer.send(record, Duration::from_secs(30)).await {
        Ok(d) => Some((d.partition, d.offset)),
        Err((e, _)) => {
            eprintln!("produce refused: {e}");
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_tenants_flow_while_every_bad_record_and_definition_is_handled() {
    // Phases are printed, never asserted: they say where a slow run spent its time.
    let started = std::time::Instant::now();
    let receiver = Receiver::start().await.unwrap();
    let (config, _dir) = test_config(&receiver, &[GOOD, ECHO, SPIN, RENDER, REPEAT, TWO_STEPS, LOUD]).await;
    let config = Arc::new(config);
    let events_topic = config.names().topic("events");
    let dlq = DeadLetterReader::start(&config.names().topic("dlq"));
    let mut pipeline = Pipeline::start(config.clone(), &Pipeline::ALL).await.unwrap();
    eprintln!("pipeline started after {:.1?}", started.elapsed());
    // Not idempotent: a record the broker refuses must not fail the producer for the rest (each
    // send is awaited before the next, so order holds without it).
    let producer: FutureProducer = weir::kafka::producer_config(&config)
        .set("message.max.bytes", (EVENTS_TOPIC_BYTES * 2).to_string())
        .set("compression.type", "none")
        .set("enable.idempotence", "false")
        .create()
        .unwrap();

    // Good events of every good tenant, round by round, with bad records between the rounds.
    let tenants = good_tenants();
    let mut cases = corpus();
    let mut good: Vec<(String, String, usize, (i32, i64))> = Vec::new(); // (event id, tenant, seq, written)
    let per_round = cases.len().div_ceil(ROUNDS);
    for round in 0..ROUNDS {
        // A round's records go at once (the good tenants are on different partitions); a tenant's
        // next event waits for the round before it, which keeps each tenant's order.
        let events: Vec<_> = tenants.iter().map(|tenant| (tenant, good_event(tenant, round))).collect();
        let sends = events
            .iter()
            .map(|(tenant, (payload, ct, _))| send(&producer, &events_topic, tenant.as_bytes(), payload, Some(ct)));
        let written = futures::future::join_all(sends).await;
        for ((tenant, (_, _, id)), written) in events.into_iter().zip(written) {
            let written = written.unwrap_or_else(|| panic!("good event {id} produced"));
            good.push((id, tenant.clone(), round, written));
        }
        let bad = cases.iter_mut().skip(round * per_round).take(per_round).map(|case| {
            let (producer, topic) = (&producer, &events_topic);
            async move {
                case.written = send(producer, topic, &case.key, &case.payload, case.content_type.as_deref()).await;
            }
        });
        futures::future::join_all(bad).await;
    }

    eprintln!("produced in {:.1?}", started.elapsed());
    let pool = sqlx::PgPool::connect(&config.database_url).await.unwrap();
    let good_ids: BTreeSet<&str> = good.iter().map(|(id, ..)| id.as_str()).collect();
    let complete = |seen: &Seen| {
        let good_done = good_ids.iter().all(|id| seen.calls_of(id) >= 1 && !seen.rows_of(id).is_empty());
        good_done && cases.iter().all(|c| seen.check(c, &events_topic).0)
    };
    // Until everything is as expected, a stage ends, or the deadline passes.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let mut exited = None;
    loop {
        if complete(&seen(&receiver, &pool, &dlq).await) || tokio::time::Instant::now() > deadline {
            break;
        }
        // A zero timeout polls the stages once: ready means one has ended.
        if let Ok(outcome) = tokio::time::timeout(Duration::ZERO, pipeline.wait()).await {
            exited = Some(format!("{outcome:?}"));
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("complete (or given up) after {:.1?}", started.elapsed());
    // The stages: none ended by itself, and each stops cleanly, finishing what is in flight; what
    // is seen after that is all there is (a second call or row would show). The timeout only
    // guards against a stage stuck in work that never yields (a template without a budget).
    let still_running = exited.is_none() && tokio::time::timeout(Duration::ZERO, pipeline.wait()).await.is_err();
    let stopped = tokio::time::timeout(Duration::from_secs(60), pipeline.stop()).await;
    let settled = seen(&receiver, &pool, &dlq).await;
    eprintln!("stopped after {:.1?}", started.elapsed());

    let mut report = String::new();
    let mut failures = Vec::new();
    for case in &cases {
        let (ok, outcome) = settled.check(case, &events_topic);
        report.push_str(&format!(
            "{:<5} {:<50} {:<28} {outcome}\n",
            if ok { "ok" } else { "FAIL" },
            case.name,
            format!("{:?}", case.expect)
        ));
        if !ok {
            failures.push(case.name.clone());
        }
    }

    // The good events: each called once and stored once, each tenant's in order, none dead-lettered.
    let mut good_failures = Vec::new();
    let by_id: HashMap<&str, (&str, usize)> =
        good.iter().map(|(id, t, s, _)| (id.as_str(), (t.as_str(), *s))).collect();
    for (id, _, _, written) in &good {
        let (calls, rows) = (settled.calls_of(id), settled.rows_of(id));
        let letters = settled.letters_of(&events_topic, Some(*written), Some(id)).len();
        if calls != 1 || rows.len() != 1 || rows[0].status != "succeeded" || letters != 0 {
            good_failures.push(format!("{id}: calls {calls}, rows {:?}, dead letters {letters}", rows));
        }
    }
    let mut last_seq: HashMap<&str, usize> = HashMap::new();
    for call in &settled.calls {
        let Some((tenant, seq)) = call.body["event_id"].as_str().and_then(|id| by_id.get(id)) else { continue };
        assert_eq!(call.tenant.as_deref(), Some(*tenant), "a good task reached the service under its own tenant");
        if let Some(prev) = last_seq.insert(tenant, *seq) {
            if prev >= *seq {
                good_failures.push(format!("tenant {tenant}: event {seq} called after {prev}"));
            }
        }
    }
    let good_rows = settled.rows.iter().filter(|r| tenants.contains(&r.tenant)).count();

    eprintln!(
        "poison corpus ({} cases, {} good events of {} tenants; {} good rows):\n{report}",
        cases.len(),
        good.len(),
        tenants.len(),
        good_rows
    );
    assert!(stopped.is_ok(), "the stages did not stop: one is stuck in work that does not yield");
    let stopped = stopped.unwrap();
    let first_good_failures: Vec<_> = good_failures.iter().take(10).collect();
    assert!(exited.is_none(), "a stage ended: {}", exited.unwrap_or_default());
    assert!(still_running, "a stage ended at the last moment");
    assert!(stopped.is_ok(), "stopping: {stopped:?}");
    assert!(
        good_failures.is_empty(),
        "{} of {} good events not called and stored exactly once in order, e.g. {first_good_failures:#?}",
        good_failures.len(),
        good.len()
    );
    assert!(failures.is_empty(), "cases not handled as expected: {failures:#?}");
    let unexpected: Vec<_> = settled
        .rows
        .iter()
        .filter(|r| r.tenant.starts_with("good") && !good_ids.contains(r.event_id.as_str()))
        .map(|r| &r.task_id)
        .collect();
    assert!(unexpected.is_empty(), "rows of good tenants for no good event: {unexpected:?}");
}
