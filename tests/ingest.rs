//! The HTTP ingest stage (issue 14) against the real broker, database and a real local HTTP
//! receiver: events posted in every format reach the webhook and PostgreSQL exactly once and in
//! each tenant's order; refusals carry the right status and produce nothing; backpressure
//! answers 503 and recovers; and with the broker killed under load, every request answered 202
//! is in the topic.

mod common;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use common::{broker::OwnBroker, *};
use rdkafka::{consumer::Consumer as _, Message as _};
use serde_json::{json, Value as Json};
use weir::{
    config::{Config, SourceConfig},
    envelope::Event,
    ops::{
        post::{Mode, Poster},
        receiver::Receiver,
    },
    pipeline::{Pipeline, StageName},
    shutdown::CancellationToken,
};

const WELCOME: &str =
    "{id: welcome, version: 1, trigger: {type: member.created}, steps: [{id: notify, service: webhook}]}";

fn token(tenant: usize) -> String {
    format!("token-of-tenant-{tenant:02}-0123456789")
}

fn ghost_secret(tenant: usize) -> String {
    format!("ghost-secret-of-tenant-{tenant:02}")
}

fn standard_secret(tenant: usize) -> String {
    use base64::Engine as _;
    format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(format!("standard-key-{tenant:02}")))
}

const PLATFORM_TOKEN: &str = "platform-token-0123456789";

/// Every format, with credentials per tenant for `tenants` tenants, and a platform credential
/// for the tenants `tenant-1*`.
fn sources(tenants: usize) -> BTreeMap<String, SourceConfig> {
    let per_tenant = |credential: &dyn Fn(usize) -> Json| -> Json {
        (0..tenants).map(|t| (format!("tenant-{t}"), credential(t))).collect::<serde_json::Map<_, _>>().into()
    };
    serde_json::from_value(json!({
        "ce": {"format": "cloudevents", "tenants": per_tenant(&|t| json!({"token": token(t)}))},
        "platform": {"format": "cloudevents", "platform": {"token": PLATFORM_TOKEN, "tenants": ["tenant-1*"]}},
        "ghost": {"format": "ghost", "tenants": per_tenant(&|t| json!({"secret": ghost_secret(t)}))},
        "sw": {"format": "standard_webhooks", "tenants": per_tenant(&|t| json!({"secret": standard_secret(t)}))},
        "gen": {"format": "generic", "tenants": per_tenant(&|t| json!({"secret": standard_secret(t)})),
                "generic": {"type_pointer": "/event", "id_pointer": "/id", "tenant_pointer": "/site", "data_pointer": "/payload"}},
    }))
    .unwrap()
}

/// Starts the ingest stage of `config` on a free port; it stops when the token is cancelled.
async fn start_ingest(config: &mut Config) -> (Arc<Config>, Poster, CancellationToken) {
    config.ingest.listen = ([127, 0, 0, 1], 0).into();
    config.validate().unwrap();
    let config = Arc::new(config.clone());
    let stop = CancellationToken::new();
    let (addr, _) = weir::stages::ingest::start(config.clone(), stop.clone()).await.unwrap();
    (config, Poster::new(addr), stop)
}

/// The `n`th member.created event of `tenant`, carrying `seq`.
fn member(tenant: usize, seq: usize) -> Event {
    serde_json::from_value(json!({
        "specversion": "1.0", "id": format!("e-{seq}"), "source": "/shop/test", "type": "member.created",
        "tenant": format!("tenant-{tenant}"), "datacontenttype": "application/json", "data": {"seq": seq},
    }))
    .unwrap()
}

/// The sequence number an event carried, from a receiver's call (CloudEvents put it at
/// `data.seq`, the Ghost webhooks at `data.member.current.seq`).
fn seq_of(call: &weir::ops::receiver::Call) -> u64 {
    let data = &call.body["input"]["event"]["data"];
    data["seq"].as_u64().or(data["member"]["current"]["seq"].as_u64()).expect("the task carries the event's seq")
}

/// A structured CloudEvent posted to `/ingest/<source>/<tenant>` with a bearer token.
async fn structured_to(poster: &Poster, source: &str, tenant: &str, token: &str, event: &Event) -> reqwest::Response {
    poster
        .request(source, Some(tenant), None)
        .bearer_auth(token)
        .header("content-type", "application/cloudevents+json")
        .body(serde_json::to_vec(event).unwrap())
        .send()
        .await
        .unwrap()
}

async fn status(response: reqwest::Result<reqwest::Response>) -> u16 {
    response.expect("the ingest stage answers").status().as_u16()
}

/// Ids of the events on `topic` (read with a throw-away group until `want` or `timeout`).
fn topic_ids(topic: &str, want: usize, timeout: Duration) -> Vec<String> {
    read_topic(topic, want, timeout)
        .iter()
        .map(|m| serde_json::from_slice::<Event>(m.payload().unwrap()).unwrap().id)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 10,000 events in every format
// ---------------------------------------------------------------------------------------------

/// 10,000 events for 50 tenants, each tenant posting one request after the other in CloudEvents
/// structured, binary and batch mode and as Ghost webhooks: every event is called once at the
/// receiver and recorded once in PostgreSQL, and each tenant's calls come in its posting order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_events_posted_in_every_format_are_called_and_recorded_once_in_tenant_order() {
    let receiver = Receiver::start().await.unwrap();
    let (mut config, _dir) = test_config(&receiver, &[WELCOME]).await;
    let tenants = 50;
    config.ingest.sources = sources(tenants);
    let (config, poster, stop) = start_ingest(&mut config).await;
    let pipeline = Pipeline::start(config.clone(), &Pipeline::ALL).await.unwrap();

    let per_tenant = 200;
    let posters: Vec<_> = (0..tenants)
        .map(|t| {
            let poster = poster.clone();
            tokio::spawn(async move {
                let mut requests = 0;
                // Per 20 events: 5 structured, 5 binary, 5 Ghost webhooks, a batch of 5.
                for block in 0..per_tenant / 20 {
                    let seq = |i: usize| t + tenants * (block * 20 + i);
                    for i in 0..15 {
                        let event = member(t, seq(i));
                        let answer = match i / 5 {
                            0 => poster.cloudevent("ce", &token(t), &event, Mode::Structured).await,
                            1 => poster.cloudevent("ce", &token(t), &event, Mode::Binary).await,
                            _ => {
                                let body = json!({"member": {"current": {"seq": seq(i), "email": "m@example.com"}, "previous": {}}});
                                poster.ghost("ghost", &format!("tenant-{t}"), &ghost_secret(t), "member.added", &body).await
                            }
                        };
                        assert_eq!(status(answer).await, 202, "tenant {t}, event {}", seq(i));
                        requests += 1;
                    }
                    let batch: Vec<Event> = (15..20).map(|i| member(t, seq(i))).collect();
                    assert_eq!(status(poster.batch("ce", &token(t), &batch).await).await, 202, "tenant {t} batch");
                    requests += 1;
                }
                requests
            })
        })
        .collect();
    let mut requests = 0;
    for p in posters {
        requests += p.await.unwrap();
    }
    let expected = tenants * per_tenant;
    assert_eq!(requests, tenants * per_tenant / 20 * 16);

    let url = config.database_url.clone();
    let rows = || scalar(&url, "select count(*) from action_results");
    let done = eventually(Duration::from_secs(300), || async {
        receiver.succeeded() >= expected && rows().await >= expected as i64
    })
    .await;
    assert!(done, "calls {} rows {} of {expected}", receiver.succeeded(), rows().await);
    pipeline.stop().await.unwrap();
    stop.cancel();

    let calls = receiver.calls();
    let replayed = calls.iter().filter(|c| c.replayed).count();
    let failed = calls.iter().filter(|c| c.status >= 300).count();
    assert_eq!(
        calls.len(),
        expected,
        "exactly one call per event ({replayed} repeated calls of a task already done, {failed} not 2xx)"
    );
    assert_eq!(rows().await, expected as i64, "exactly one row per event");
    let keys: HashSet<_> = calls.iter().map(|c| c.idempotency_key.clone().expect("Idempotency-Key")).collect();
    assert_eq!(keys.len(), expected, "one task per event");
    let mut last: HashMap<String, u64> = HashMap::new();
    for call in &calls {
        let (tenant, seq) = (call.tenant.clone().expect("X-Weir-Tenant"), seq_of(call));
        assert_eq!(tenant, format!("tenant-{}", seq as usize % tenants), "the event's tenant is its credential's");
        if let Some(before) = last.insert(tenant.clone(), seq) {
            assert!(before < seq, "tenant {tenant}: event {seq} was called after {before}");
        }
    }
    assert_eq!(last.len(), tenants);
}

// ---------------------------------------------------------------------------------------------
// Refusals
// ---------------------------------------------------------------------------------------------

/// Every way a request is refused, with its status, and nothing of them on the events topic;
/// a replayed webhook-id is acknowledged once and produced once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_get_their_status_and_produce_nothing() {
    let receiver = Receiver::start().await.unwrap();
    let (mut config, _dir) = test_config(&receiver, &[WELCOME]).await;
    config.ingest.sources = sources(20);
    config.ingest.max_body_bytes = 4_096;
    config.ingest.max_lag = None;
    config.ingest.tenant_rate = Some(serde_json::from_value(json!({"per_second": 1, "burst": 3})).unwrap());
    let (config, poster, stop) = start_ingest(&mut config).await;
    let ghost = |tenant: usize, secret: &str, at_ms: i64| {
        let body = serde_json::to_vec(&json!({"member": {"current": {"seq": 1}}})).unwrap();
        let signature = weir::connectors::signature::ghost_header(secret, &body, at_ms);
        poster
            .request("ghost", Some(&format!("tenant-{tenant}")), Some("event=member.added"))
            .header("x-ghost-signature", signature)
            .body(body)
            .send()
    };
    let now_ms = chrono::Utc::now().timestamp_millis();
    let mut refusals: Vec<(&str, u16, u16, String)> = Vec::new();
    let mut check = async |what: &'static str, want: u16, response: reqwest::Response| {
        let got = response.status().as_u16();
        refusals.push((what, want, got, response.text().await.unwrap_or_default()));
    };

    let r = poster
        .request("ce", None, None)
        .header("content-type", "application/cloudevents+json")
        .body("{}")
        .send()
        .await
        .unwrap();
    check("no credential", 401, r).await;
    let r = ghost(1, "not-the-secret-of-tenant-1", now_ms).await.unwrap();
    check("wrong Ghost signature", 401, r).await;
    let r = ghost(1, &ghost_secret(1), now_ms - 10 * 60 * 1000).await.unwrap();
    check("stale Ghost timestamp", 401, r).await;
    let stale = json!({"type": "member.created", "data": {}}).to_string();
    let headers =
        weir::connectors::signature::standard_headers(&standard_secret(2), "msg-stale", stale.as_bytes()).unwrap();
    let mut request = poster.request("sw", Some("tenant-2"), None);
    for (name, value) in headers {
        // Ten minutes ago: the signature is right, the time is not.
        let value = if name == "webhook-timestamp" { (value.parse::<i64>().unwrap() - 600).to_string() } else { value };
        request = request.header(name, value);
    }
    check("stale Standard Webhooks timestamp", 401, request.body(stale).send().await.unwrap()).await;
    let r = poster.signed("sw", "tenant-2", &standard_secret(3), "msg-x", b"{\"type\":\"a\"}").await.unwrap();
    check("Standard Webhooks signed with another tenant's secret", 401, r).await;

    let r = structured_to(&poster, "ce", "tenant-2", &token(1), &member(2, 1)).await;
    check("another tenant's token", 403, r).await;
    let r = poster.cloudevent("ce", &token(1), &member(2, 2), Mode::Structured).await.unwrap();
    check("a structured event naming another tenant", 403, r).await;
    let r = poster.cloudevent("ce", &token(1), &member(2, 3), Mode::Binary).await.unwrap();
    check("a binary event naming another tenant (ce-tenant)", 403, r).await;
    let batch = [member(1, 4), member(2, 5)];
    let r = poster.batch("ce", &token(1), &batch).await.unwrap();
    check("a batch with one event naming another tenant", 403, r).await;
    let generic = json!({"event": "member.created", "id": "g-1", "site": "tenant-3", "payload": {}}).to_string();
    let r = poster.signed("gen", "tenant-2", &standard_secret(2), "g-1", generic.as_bytes()).await.unwrap();
    check("a generic body naming another tenant", 403, r).await;
    let r = structured_to(&poster, "platform", "tenant-2", PLATFORM_TOKEN, &member(2, 6)).await;
    check("a platform token for a tenant outside its list", 403, r).await;
    let r = poster.cloudevent("platform", PLATFORM_TOKEN, &member(12, 7), Mode::Structured).await.unwrap();
    check("a platform token without the tenant in the route", 400, r).await;

    let mut no_type = serde_json::to_value(member(1, 8)).unwrap();
    no_type.as_object_mut().unwrap().remove("type");
    let r = poster
        .request("ce", None, None)
        .bearer_auth(token(1))
        .header("content-type", "application/cloudevents+json")
        .body(no_type.to_string())
        .send()
        .await
        .unwrap();
    check("an event without a type", 400, r).await;
    let mut large = member(1, 9);
    large.data = json!({"pad": "x".repeat(8_000)});
    let r = poster.cloudevent("ce", &token(1), &large, Mode::Structured).await.unwrap();
    check("a body over ingest.max_body_bytes", 413, r).await;
    let r = poster.request("nope", None, None).bearer_auth(token(1)).body("{}").send().await.unwrap();
    check("an unknown source", 404, r).await;
    let r = poster
        .request("ce", None, None)
        .bearer_auth(token(1))
        .header("content-type", "text/csv")
        .body("a,b")
        .send()
        .await
        .unwrap();
    check("a content type that is no CloudEvents mode", 415, r).await;

    let wrong: Vec<_> = refusals.iter().filter(|(_, want, got, _)| want != got).collect();
    assert!(wrong.is_empty(), "wrong statuses (what, wanted, got): {wrong:?}");

    // What is accepted: a Standard Webhooks delivery and its replay (one event), a platform's
    // event, and a tenant's posts up to its burst of 3 (the 4th is over its rate: 429).
    let accepted = poster
        .standard("sw", "tenant-2", &standard_secret(2), "msg-1", "member.created", &json!({"n": 1}))
        .await
        .unwrap();
    assert_eq!(accepted.status(), 202);
    let replay = poster
        .standard("sw", "tenant-2", &standard_secret(2), "msg-1", "member.created", &json!({"n": 1}))
        .await
        .unwrap();
    assert_eq!(replay.status(), 202, "a replayed webhook-id is acknowledged");
    assert_eq!(replay.json::<Json>().await.unwrap()["duplicate"], true);
    let r = structured_to(&poster, "platform", "tenant-12", PLATFORM_TOKEN, &member(12, 100)).await;
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    for seq in 101..104 {
        assert_eq!(status(poster.cloudevent("ce", &token(5), &member(5, seq), Mode::Structured).await).await, 202);
    }
    let over = poster.cloudevent("ce", &token(5), &member(5, 104), Mode::Structured).await.unwrap();
    assert_eq!(over.status(), 429);
    assert!(over.headers().get("retry-after").is_some(), "a 429 says when to come back");

    let want: HashSet<String> = ["msg-1", "e-100", "e-101", "e-102", "e-103"].map(String::from).into();
    let ids = topic_ids(&config.names().events(), want.len() + 10, Duration::from_secs(15));
    assert_eq!(ids.len(), want.len(), "exactly the accepted events are on the topic: {ids:?}");
    assert_eq!(ids.into_iter().collect::<HashSet<_>>(), want);
    let _ = receiver;
    stop.cancel();
}

/// `ingest.max_in_flight` bounds the requests being handled, taken before a body is read: a
/// sender that sends its headers and holds its body back holds the only place, the next request
/// is answered 503 with `Retry-After` at once, and once the first connection goes, requests are
/// accepted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_are_bounded_before_their_bodies_are_read() {
    use tokio::io::AsyncWriteExt as _;
    let receiver = Receiver::start().await.unwrap();
    let (mut config, _dir) = test_config(&receiver, &[WELCOME]).await;
    config.ingest.sources = sources(2);
    config.ingest.max_in_flight = 1;
    config.ingest.max_lag = None;
    let (config, poster, stop) = start_ingest(&mut config).await;
    let addr = poster.request("ce", None, None).build().unwrap().url().socket_addrs(|| None).unwrap()[0];
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /ingest/ce HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/cloudevents+json\r\nContent-Length: 100000\r\n\r\n{{",
        token(0)
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    // Polled until the server has taken the slow request's headers (and its place).
    let (mut refused, mut accepted_before) = (None, false);
    for _ in 0..600 {
        let answer = poster.cloudevent("ce", &token(1), &member(1, 1), Mode::Structured).await.unwrap();
        if answer.status() == 503 {
            refused = Some(answer);
            break;
        }
        accepted_before |= answer.status() == 202;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused = refused.expect("a second request was handled while the first held the only place");
    assert!(refused.headers().get("retry-after").is_some(), "the 503 says when to come back");
    drop(slow);
    let accepted = eventually(Duration::from_secs(30), || async {
        poster.cloudevent("ce", &token(1), &member(1, 2), Mode::Structured).await.unwrap().status() == 202
    })
    .await;
    assert!(accepted, "the place was not given back when the slow sender went away");
    let mut want = vec!["e-2"];
    if accepted_before {
        want.insert(0, "e-1");
    }
    let ids = topic_ids(&config.names().events(), want.len() + 2, Duration::from_secs(10));
    assert_eq!(ids, want, "only the accepted events are on the topic");
    stop.cancel();
}

// ---------------------------------------------------------------------------------------------
// Overload: the evaluator's lag over the bound
// ---------------------------------------------------------------------------------------------

fn rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// With no evaluator reading, the events topic's lag passes `ingest.max_lag`: requests get 503
/// with `Retry-After`, memory stays flat however many are refused, and once an evaluator drains
/// the lag requests are accepted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_lag_bound_requests_get_503_until_the_lag_drains() {
    let receiver = Receiver::start().await.unwrap();
    let (mut config, _dir) = test_config(&receiver, &[WELCOME]).await;
    config.ingest.sources = sources(4);
    config.ingest.max_lag = Some(50);
    config.ingest.lag_interval = Duration::from_millis(100);
    let (config, poster, stop) = start_ingest(&mut config).await;

    let mut seq = 0;
    let mut refused = None;
    while refused.is_none() && seq < 5_000 {
        let answer = poster.cloudevent("ce", &token(seq % 4), &member(seq % 4, seq), Mode::Structured).await.unwrap();
        match answer.status().as_u16() {
            202 => seq += 1,
            503 => refused = Some(answer),
            other => panic!("unexpected status {other}"),
        }
    }
    let refused = refused.expect("never refused with the lag over its bound");
    assert!(seq > 50, "refused before the lag passed the bound: after {seq} events");
    let retry_after = refused.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    assert_eq!(retry_after, Some(1), "Retry-After: ingest.retry_after");

    // Overload: 4,000 requests of 16 KB each, 32 at once, all refused; memory stays flat.
    let before = rss_kb();
    let mut big = member(0, 0);
    big.data = json!({"pad": "y".repeat(16_000)});
    let statuses = Arc::new(Mutex::new(BTreeMap::<u16, usize>::new()));
    let workers: Vec<_> = (0..32)
        .map(|_| {
            let (poster, big, statuses) = (poster.clone(), big.clone(), statuses.clone());
            tokio::spawn(async move {
                for _ in 0..125 {
                    let status = status(poster.cloudevent("ce", &token(0), &big, Mode::Structured).await).await;
                    *statuses.lock().unwrap().entry(status).or_default() += 1;
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let grown_kb = rss_kb().saturating_sub(before);
    assert_eq!(*statuses.lock().unwrap(), BTreeMap::from([(503, 4_000)]));
    assert!(grown_kb < 32 * 1024, "RSS grew by {grown_kb} kB over 4,000 refused requests (64 MB of bodies)");

    // An evaluator drains the lag: accepted again.
    let pipeline = Pipeline::start(config.clone(), &[StageName::Evaluate]).await.unwrap();
    let accepted = eventually(Duration::from_secs(120), || async {
        let answer = poster.cloudevent("ce", &token(1), &member(1, 99_999), Mode::Structured).await.unwrap();
        answer.status() == 202
    })
    .await;
    assert!(accepted, "still refused after the evaluator started");
    pipeline.stop().await.unwrap();
    stop.cancel();
}

// ---------------------------------------------------------------------------------------------
// The broker killed under load
// ---------------------------------------------------------------------------------------------

/// Concurrent posters while the (test's own) broker is killed with SIGKILL and restarted: every
/// event answered 202 is on the topic afterwards, the others were answered 503 (or their
/// connection failed), and posting succeeds again after the restart.
#[test]
fn with_the_broker_killed_every_acknowledged_event_is_stored() {
    let broker = OwnBroker::start();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| runtime.block_on(broker_killed(&broker))));
    runtime.shutdown_timeout(Duration::from_secs(15));
    drop(broker);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn broker_killed(broker: &OwnBroker) {
    let mut config = Config {
        brokers: broker.brokers(),
        topic_prefix: unique("t") + ".",
        metrics_addr: None,
        topics_dir: repo_path("topics"),
        ..Config::default()
    };
    config.ingest.sources = sources(8);
    config.ingest.max_lag = None;
    config.ingest.ack_timeout = Duration::from_secs(5);
    weir::kafka::topics::apply_dir(&config, false).await.expect("topics apply");
    let (config, poster, stop) = start_ingest(&mut config).await;

    let accepted = Arc::new(Mutex::new(Vec::<String>::new()));
    let others = Arc::new(Mutex::new(BTreeMap::<String, usize>::new()));
    let running = Arc::new(AtomicBool::new(true));
    let sent = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let (poster, accepted, others, running, sent) =
                (poster.clone(), accepted.clone(), others.clone(), running.clone(), sent.clone());
            tokio::spawn(async move {
                let mut i = 0;
                while running.load(Ordering::SeqCst) {
                    let mut event = member(w, i);
                    event.id = format!("k-{w}-{i}");
                    i += 1;
                    sent.fetch_add(1, Ordering::SeqCst);
                    let outcome = match poster.cloudevent("ce", &token(w), &event, Mode::Structured).await {
                        Ok(r) if r.status() == 202 => {
                            accepted.lock().unwrap().push(event.id);
                            continue;
                        }
                        Ok(r) => r.status().as_u16().to_string(),
                        Err(_) => "connection error".to_string(),
                    };
                    *others.lock().unwrap().entry(outcome).or_default() += 1;
                }
            })
        })
        .collect();
    let count = |v: &Arc<Mutex<Vec<String>>>| v.lock().unwrap().len();
    let progressed = |target: usize| {
        let accepted = accepted.clone();
        async move { eventually(Duration::from_secs(120), || async { count(&accepted) >= target }).await }
    };
    assert!(progressed(300).await, "no load before the kill");
    broker.kill();
    // Posting goes on against the dead broker for longer than ingest.ack_timeout.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let during = count(&accepted);
    broker.up();
    assert!(
        progressed(during + 300).await,
        "posting never succeeded again after the restart: {:?}",
        others.lock().unwrap()
    );
    running.store(false, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    stop.cancel();

    let accepted: HashSet<String> = accepted.lock().unwrap().iter().cloned().collect();
    let others = others.lock().unwrap().clone();
    assert!(others.get("503").copied().unwrap_or(0) > 0, "the kill refused nothing: {others:?}");
    assert!(
        others.keys().all(|k| k == "503" || k == "connection error"),
        "requests not acknowledged got 503 or a connection error only: {others:?}"
    );
    // The topic from the broker that was killed: every acknowledged event is there.
    let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker.brokers())
        .set("group.id", unique("reader-"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[&config.names().events()]).unwrap();
    let mut stored = HashSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !accepted.is_subset(&stored) && std::time::Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            stored.insert(serde_json::from_slice::<Event>(m.payload().unwrap()).unwrap().id);
        }
    }
    let missing: Vec<_> = accepted.difference(&stored).take(10).collect();
    assert!(
        missing.is_empty(),
        "acknowledged but not stored ({} in all): {missing:?}",
        accepted.difference(&stored).count()
    );
    eprintln!(
        "sent {}, acknowledged {}, stored {}, others {others:?}",
        sent.load(Ordering::SeqCst),
        accepted.len(),
        stored.len()
    );
}

// ---------------------------------------------------------------------------------------------
// The binary
// ---------------------------------------------------------------------------------------------

/// `weir run --stage ingest` from a weir.yaml: a token read from the environment, an event
/// accepted over HTTP and on the topic; without the variable the process stops at start naming
/// the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_run_stage_ingest_serves_the_configured_sources() {
    let receiver = Receiver::start().await.unwrap();
    let (mut config, dir) = test_config(&receiver, &[WELCOME]).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    config.ingest.listen = ([127, 0, 0, 1], port).into();
    config.ingest.sources = serde_json::from_value(
        json!({"shop": {"format": "cloudevents", "tenants": {"tenant-1": {"token_env": "WEIR_TEST_SHOP_TOKEN"}}}}),
    )
    .unwrap();
    let path = write_config_file(&config, dir.path());

    let missing =
        weir_command(&path, &["run", "--stage", "ingest"]).env_remove("WEIR_TEST_SHOP_TOKEN").output().unwrap();
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success(), "started without its token");
    assert!(
        stderr.contains("ingest.sources.shop.tenants.tenant-1") && stderr.contains("WEIR_TEST_SHOP_TOKEN"),
        "{stderr}"
    );

    let mut command = weir_command(&path, &["run", "--stage", "ingest"]);
    command.env("WEIR_TEST_SHOP_TOKEN", token(1));
    let log = dir.path().join("weir-ingest.log");
    command
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::options().append(true).open(&log).unwrap());
    let child = command.spawn().unwrap();
    let weir = WeirProcess { child, log };
    let poster = Poster::new(format!("127.0.0.1:{port}"));
    let accepted = eventually(Duration::from_secs(60), || async {
        let answer = poster.cloudevent("shop", &token(1), &member(1, 7), Mode::Structured).await;
        answer.is_ok_and(|a| a.status() == 202)
    })
    .await;
    assert!(accepted, "never accepted: {}", tail(&weir.output()));
    assert_eq!(topic_ids(&config.names().events(), 1, Duration::from_secs(10)), ["e-7"]);
    terminate(&weir);
}
