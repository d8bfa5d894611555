//! Connectors against a real local HTTP server (`weir::ops::receiver`): request shapes, signatures,
//! how each answer is classified, the SSRF guard, and one run through the real broker and
//! database to show the executor calls through them.

mod common;

use std::{sync::Arc, time::Duration};

use common::*;
use hmac::Mac;
use serde_json::{json, Value};
use weir::{
    config::{Config, ServiceConfig},
    connectors::{self, CallOutcome, NetworkPolicy},
    envelope::{ActionTask, Event, Format},
    ops::produce::Producer,
    ops::receiver::{Mode, Receiver},
    pipeline::Pipeline,
};

fn task(input: Value) -> ActionTask {
    ActionTask {
        task_id: unique("task-"),
        run_id: "run-1".into(),
        event_id: "e-1".into(),
        event_type: "member.created".into(),
        tenant: "site-1".into(),
        workflow_id: "wf".into(),
        workflow_version: 1,
        step_id: "notify".into(),
        service: "svc".into(),
        attempt: 1,
        created_at: "2026-11-23T10:00:00Z".into(),
        input,
        event: Value::Null,
        timeout_ms: None,
        retry: None,
        expires_at: None,
        priority: None,
        order_key: None,
        run_at: None,
    }
}

/// A service from its YAML, as in `weir.yaml`.
fn service(yaml: &str) -> ServiceConfig {
    serde_yaml_ng::from_str(yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

fn allow(cidrs: &[&str]) -> NetworkPolicy {
    NetworkPolicy { allow: cidrs.iter().map(|c| c.parse().unwrap()).collect() }
}

async fn call(service: &ServiceConfig, task: &ActionTask) -> CallOutcome {
    connectors::build("svc", service, &allow(&["127.0.0.1/32"])).unwrap().call(task).await
}

fn header<'a>(call: &'a weir::ops::receiver::Call, name: &str) -> Option<&'a str> {
    call.headers.get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn the_default_webhook_posts_the_task_as_json_with_its_identity_headers() {
    let receiver = Receiver::start().await.unwrap();
    let t = task(json!({"email": "ada@example.com"}));
    let outcome = call(&service(&format!("url: {}", receiver.url("hook"))), &t).await;
    let CallOutcome::Succeeded { http_status: Some(200), output: Some(output), cost: None } = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(output["input"]["email"], "ada@example.com", "the receiver's answer is the output");
    let calls = receiver.calls();
    assert_eq!(calls.len(), 1);
    let c = &calls[0];
    assert_eq!((c.method.as_str(), c.path.as_str()), ("POST", "/hook"));
    assert_eq!(c.body, serde_json::to_value(&t).unwrap(), "the body is the task");
    assert_eq!(header(c, "content-type"), Some("application/json"));
    assert_eq!(c.idempotency_key.as_deref(), Some(t.task_id.as_str()));
    assert_eq!(c.tenant.as_deref(), Some("site-1"));
    assert_eq!(header(c, "x-weir-signature"), None, "unsigned without a secret");
}

#[tokio::test]
async fn webhook_templates_render_method_headers_and_body_and_the_signature_verifies() {
    let receiver = Receiver::start().await.unwrap();
    let var = unique("WEIR_TEST_SECRET_").to_uppercase();
    std::env::set_var(&var, "s3cret");
    let svc = service(&format!(
        r#"
url: {}
connector:
  type: webhook
  method: put
  headers: {{X-Trace: "{{{{ task_id }}}}/{{{{ tenant }}}}", X-Static: fixed, X-Count: "{{{{ input.items | length }}}}"}}
  body: {{email: "{{{{ input.email }}}}", count: "{{{{ input.items | length }}}}", source: weir}}
  hmac_secret_env: {var}
"#,
        receiver.url("contacts")
    ));
    let t = task(json!({"email": "ada@example.com", "items": [1, 2, 3]}));
    let outcome = call(&svc, &t).await;
    assert!(matches!(outcome, CallOutcome::Succeeded { http_status: Some(200), .. }), "{outcome:?}");

    let c = &receiver.calls()[0];
    assert_eq!(c.method, "PUT");
    assert_eq!(header(c, "x-trace"), Some(format!("{}/site-1", t.task_id).as_str()));
    assert_eq!(header(c, "x-static"), Some("fixed"));
    assert_eq!(header(c, "x-count"), Some("3"), "a native value becomes its text");
    assert_eq!(c.body, json!({"email": "ada@example.com", "count": 3, "source": "weir"}));
    assert_eq!(header(c, "content-type"), Some("application/json"));
    assert_eq!(c.idempotency_key.as_deref(), Some(t.task_id.as_str()));
    assert!(header(c, "x-weir-timestamp").unwrap().parse::<u64>().unwrap() > 1_700_000_000);

    // Verified as a receiver would, with the hmac crate directly over the bytes received.
    let signature = header(c, "x-weir-signature").expect("signed");
    let hex = signature.strip_prefix("sha256=").expect("sha256= prefix");
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"s3cret").unwrap();
    mac.update(&c.raw);
    mac.verify_slice(&hex::decode(hex).unwrap()).expect("the signature matches the body");
    let mut wrong = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"other").unwrap();
    wrong.update(&c.raw);
    assert!(wrong.verify_slice(&hex::decode(hex).unwrap()).is_err(), "and only with the secret");
}

/// `signature: standard_webhooks`: the call carries Standard Webhooks' three headers, the id is
/// the task id (the same on a retry), and the signature covers id, timestamp and body, keyed with
/// the base64-decoded `whsec_` secret, as the specification's libraries verify it.
#[tokio::test]
async fn webhooks_can_be_signed_per_standard_webhooks_covering_id_time_and_body() {
    use base64::Engine as _;
    let receiver = Receiver::start().await.unwrap();
    let var = unique("WEIR_TEST_SW_SECRET_").to_uppercase();
    let key = b"standard-webhooks-key";
    std::env::set_var(&var, format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(key)));
    let svc = service(&format!(
        "{{url: '{}', connector: {{type: webhook, hmac_secret_env: {var}, signature: standard_webhooks}}}}",
        receiver.url("hook")
    ));
    let t = task(json!({"n": 1}));
    let outcome = call(&svc, &t).await;
    assert!(matches!(outcome, CallOutcome::Succeeded { .. }), "{outcome:?}");
    call(&svc, &t).await;

    let calls = receiver.calls();
    let c = &calls[0];
    assert_eq!(header(c, "webhook-id"), Some(t.task_id.as_str()));
    assert_eq!(header(&calls[1], "webhook-id"), Some(t.task_id.as_str()), "the same id on a retry");
    assert_eq!(header(c, "x-weir-signature"), None, "the body-only scheme is not sent as well");
    let timestamp = header(c, "webhook-timestamp").expect("webhook-timestamp");
    assert!(timestamp.parse::<i64>().unwrap() > 1_700_000_000);
    let signature = header(c, "webhook-signature").and_then(|s| s.strip_prefix("v1,")).expect("v1,<base64>");
    let signature = base64::engine::general_purpose::STANDARD.decode(signature).unwrap();
    let signed = |id: &str, body: &[u8]| {
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
        mac.update(format!("{id}.{timestamp}.").as_bytes());
        mac.update(body);
        mac
    };
    signed(&t.task_id, &c.raw).verify_slice(&signature).expect("the signature covers id, timestamp and body");
    assert!(signed("another-id", &c.raw).verify_slice(&signature).is_err(), "the id is covered");
    assert!(signed(&t.task_id, b"{}").verify_slice(&signature).is_err(), "the body is covered");
}

#[tokio::test]
async fn a_string_body_is_sent_as_text_and_a_get_sends_none() {
    let receiver = Receiver::start().await.unwrap();
    let text = service(&format!(
        "{{url: {}, connector: {{type: webhook, body: 'Hello {{{{ input.name }}}}!'}}}}",
        receiver.url("text")
    ));
    assert!(matches!(call(&text, &task(json!({"name": "Ada"}))).await, CallOutcome::Succeeded { .. }));
    let get = service(&format!("{{url: {}, connector: {{type: webhook, method: GET}}}}", receiver.url("get")));
    assert!(matches!(call(&get, &task(json!({}))).await, CallOutcome::Succeeded { .. }));
    let calls = receiver.calls();
    assert_eq!(&calls[0].raw[..], b"Hello Ada!");
    assert_eq!(header(&calls[0], "content-type"), Some("text/plain; charset=utf-8"));
    assert_eq!((calls[1].method.as_str(), calls[1].raw.len()), ("GET", 0));
    assert!(calls[1].idempotency_key.is_some());
}

#[tokio::test]
async fn a_webhook_url_may_be_a_template_and_each_rendered_url_is_checked() {
    let receiver = Receiver::start().await.unwrap();
    let svc =
        service(&format!("url: '{}/{{{{ input.id | urlencode }}}}?tenant={{{{ tenant }}}}'", receiver.url("users")));
    let outcome = call(&svc, &task(json!({"id": "a b"}))).await;
    assert!(matches!(outcome, CallOutcome::Succeeded { .. }), "{outcome:?}");
    let calls = receiver.calls();
    assert_eq!(calls[0].path, "/users/a%20b");

    // A template cannot stand for the host, but a value can still smuggle one in (userinfo):
    // the rendered URL is checked before the call.
    let smuggle = service("url: 'http://{{ input.user }}@example.com/'");
    let outcome = call(&smuggle, &task(json!({"user": "x@169.254.169.254/#"}))).await;
    let CallOutcome::Permanent { reason, http_status: None } = outcome else { panic!("{outcome:?}") };
    assert!(reason.contains("169.254.169.254 is in 169.254.0.0/16 (link-local)"), "{reason}");
    let err = connectors::build("svc", &service("url: 'http://{{ input.host }}/'"), &NetworkPolicy::default()).err();
    assert!(format!("{:#}", err.unwrap()).contains("services.svc.url"));
    let slack = service("{url: 'http://example.com/{{ tenant }}', connector: {type: slack}}");
    let err = format!("{:#}", connectors::build("svc", &slack, &NetworkPolicy::default()).err().unwrap());
    assert!(err.contains("only the webhook connector renders templates"), "{err}");
}

#[tokio::test]
async fn a_template_that_cannot_render_is_permanent_and_calls_nothing() {
    let receiver = Receiver::start().await.unwrap();
    let svc = service(&format!(
        "{{url: {}, connector: {{type: webhook, body: {{to: '{{{{ input.missing }}}}'}}}}}}",
        receiver.url("hook")
    ));
    let outcome = call(&svc, &task(json!({}))).await;
    let CallOutcome::Permanent { reason, http_status: None } = outcome else { panic!("{outcome:?}") };
    assert!(reason.contains("services.svc.connector.body.to"), "{reason}");
    assert_eq!(receiver.arrived(), 0);
}

#[tokio::test]
async fn answers_are_classified_as_success_retryable_or_permanent() {
    let receiver = Receiver::start().await.unwrap();
    let svc = service(&format!("url: {}", receiver.url("hook")));
    let t = task(json!({}));
    let with = |fail_with: Option<u16>, retry_after: Option<u64>| Mode {
        fail_with,
        retry_after: retry_after.map(Duration::from_secs),
        ..Mode::default()
    };

    receiver.set_mode(with(Some(429), Some(2)));
    let outcome = call(&svc, &t).await;
    let CallOutcome::Retryable { reason, http_status: Some(429), retry_after } = outcome else { panic!("{outcome:?}") };
    assert_eq!(retry_after, Some(Duration::from_secs(2)));
    assert!(reason.starts_with("HTTP 429 Too Many Requests: {"), "the reason quotes the answer: {reason}");
    receiver.set_mode(with(Some(503), None));
    let outcome = call(&svc, &t).await;
    assert!(matches!(outcome, CallOutcome::Retryable { http_status: Some(503), retry_after: None, .. }), "{outcome:?}");
    for status in [400, 404, 422] {
        receiver.set_mode(with(Some(status), None));
        let outcome = call(&svc, &t).await;
        let CallOutcome::Permanent { reason, http_status } = outcome else { panic!("{status}: {outcome:?}") };
        assert_eq!(http_status, Some(status));
        assert!(reason.starts_with(&format!("HTTP {status}")), "{reason}");
    }
    receiver.set_mode(with(None, None));
    assert!(matches!(call(&svc, &t).await, CallOutcome::Succeeded { http_status: Some(200), .. }));
    assert_eq!(receiver.calls().iter().map(|c| c.status).collect::<Vec<_>>(), [429, 503, 400, 404, 422, 200]);
}

#[tokio::test]
async fn refused_connections_and_timeouts_are_retryable() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let outcome = call(&service(&format!("url: http://127.0.0.1:{port}/hook")), &task(json!({}))).await;
    let CallOutcome::Retryable { reason, http_status: None, .. } = outcome else { panic!("{outcome:?}") };
    assert!(reason.contains("Connection refused") || reason.contains("connect"), "{reason}");

    let receiver = Receiver::start().await.unwrap();
    receiver.set_mode(Mode { latency: Duration::from_secs(3), ..Mode::default() });
    let svc = service(&format!("{{url: {}, timeout_ms: 200}}", receiver.url("slow")));
    let outcome = call(&svc, &task(json!({}))).await;
    let CallOutcome::Retryable { reason, http_status: None, .. } = outcome else { panic!("{outcome:?}") };
    assert!(reason.contains("timed out"), "{reason}");
}

#[tokio::test]
async fn slack_posts_the_rendered_text_and_reads_ok() {
    let receiver = Receiver::start().await.unwrap();
    let url = receiver.url("slack/T000/B000/XXXX");
    let default = service(&format!("{{url: {url}, connector: {{type: slack}}}}"));
    let outcome = call(&default, &task(json!({"text": "plain"}))).await;
    assert_eq!(outcome, CallOutcome::Succeeded { http_status: Some(200), output: Some(json!("ok")), cost: None });

    let custom = service(&format!(
        "{{url: {url}, connector: {{type: slack, text: '[{{{{ tenant }}}}] {{{{ input.n }}}} new'}}}}"
    ));
    let t = task(json!({"n": 3}));
    assert!(matches!(call(&custom, &t).await, CallOutcome::Succeeded { .. }));
    let calls = receiver.calls();
    assert_eq!(calls[0].body, json!({"text": "plain"}));
    assert_eq!(calls[1].body, json!({"text": "[site-1] 3 new"}));
    assert_eq!(calls[1].idempotency_key.as_deref(), Some(t.task_id.as_str()));
    assert_eq!(header(&calls[1], "x-weir-tenant"), Some("site-1"));

    receiver.set_mode(Mode { fail_with: Some(429), retry_after: Some(Duration::from_secs(1)), ..Mode::default() });
    let outcome = call(&custom, &task(json!({"n": 4}))).await;
    assert_eq!(
        outcome,
        CallOutcome::Retryable {
            reason: "HTTP 429 Too Many Requests: rate_limited".into(),
            http_status: Some(429),
            retry_after: Some(Duration::from_secs(1)),
        }
    );
    let outcome = call(&default, &task(json!({"message": "no text"}))).await;
    assert!(matches!(outcome, CallOutcome::Permanent { http_status: None, .. }), "{outcome:?}");
}

#[tokio::test]
async fn openai_sends_chat_completions_and_reports_the_tokens_used() {
    let receiver = Receiver::start().await.unwrap();
    let var = unique("WEIR_TEST_OPENAI_KEY_").to_uppercase();
    std::env::set_var(&var, "sk-test");
    let svc = service(&format!(
        "{{url: {}, connector: {{type: openai, model: gpt-test, api_key_env: {var}, max_tokens: 100}}}}",
        receiver.url("v1/chat/completions")
    ));
    let connector = connectors::build("svc", &svc, &allow(&["127.0.0.1/32"])).unwrap();

    let prompt = task(json!({"prompt": "x".repeat(41), "temperature": 0.2}));
    assert_eq!(connector.estimate_cost(&prompt), 11 + 100, "ceil(41 / 4) + max_tokens");
    let outcome = connector.call(&prompt).await;
    let CallOutcome::Succeeded { http_status: Some(200), output: Some(output), cost } = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(cost, output["usage"]["total_tokens"].as_u64(), "the cost is the usage reported");
    assert_eq!(cost, Some(11 + 50), "the receiver reports ceil(41 / 4) prompt + max_tokens / 2 completion tokens");
    assert_eq!(output["choices"][0]["message"]["content"], format!("echo: {}", "x".repeat(41)));

    let messages = task(json!({"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hello there"}]},
    ], "max_tokens": 20}));
    assert_eq!(connector.estimate_cost(&messages), 5 + 20, "ceil((8 + 11) / 4) + the input's max_tokens");
    assert!(matches!(connector.call(&messages).await, CallOutcome::Succeeded { cost: Some(_), .. }));

    let calls = receiver.calls();
    assert_eq!(
        calls[0].body,
        json!({"model": "gpt-test", "max_tokens": 100, "temperature": 0.2,
               "messages": [{"role": "user", "content": "x".repeat(41)}]})
    );
    assert_eq!(calls[1].body["max_tokens"], 20, "the input's max_tokens wins");
    assert_eq!(header(&calls[0], "authorization"), Some("Bearer sk-test"));
    assert_eq!(calls[0].idempotency_key.as_deref(), Some(prompt.task_id.as_str()));

    for bad in
        [json!("just text"), json!({"prompt": 3}), json!({"messages": []}), json!({"prompt": "a", "messages": []})]
    {
        let outcome = connector.call(&task(bad.clone())).await;
        assert!(matches!(outcome, CallOutcome::Permanent { http_status: None, .. }), "{bad}: {outcome:?}");
        assert!(connector.estimate_cost(&task(bad)) >= 1, "an estimate never fails");
    }
    assert_eq!(receiver.arrived(), 2, "bad inputs are not sent");
}

#[tokio::test]
async fn an_openai_cost_estimate_template_overrides_the_default() {
    let svc = service(
        "{url: 'http://127.0.0.1:9/v1/chat/completions', connector: {type: openai, model: m, max_tokens: 10, cost_estimate: '{{ input.prompt | length * 2 }}'}}",
    );
    let connector = connectors::build("svc", &svc, &allow(&["127.0.0.1/32"])).unwrap();
    assert_eq!(connector.estimate_cost(&task(json!({"prompt": "abcd"}))), 8);
    // Not renderable: the default estimate, ceil(4 / 4) + 10.
    assert_eq!(connector.estimate_cost(&task(json!({"messages": [{"role": "user", "content": "abcd"}]}))), 11);
}

#[tokio::test]
async fn internal_addresses_are_refused_unless_allow_listed() {
    let none = NetworkPolicy::default();
    for url in [
        "http://10.0.0.1/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]:8080/x",
        "http://127.0.0.1:1/",
    ] {
        let err = connectors::build("svc", &service(&format!("url: '{url}'")), &none).err().expect(url);
        let text = format!("{err:#}");
        let host = url.split('/').nth(2).unwrap().trim_start_matches('[').split([']', ':']).next().unwrap();
        assert!(text.contains("services.svc.url") && text.contains(&format!("{host} is in")), "{text}");
    }
    let opened = allow(&["10.0.0.0/8", "169.254.169.254/32", "::1/128"]);
    for url in ["http://10.0.0.1/hook", "http://169.254.169.254/latest/meta-data", "http://[::1]:8080/x"] {
        connectors::build("svc", &service(&format!("url: '{url}'")), &opened).expect(url);
    }

    // A name is checked where it resolves, on every connection.
    let refusals = || {
        let text = weir::telemetry::prometheus().render();
        let line = text.lines().find(|l| l.starts_with("weir_outbound_refused_total{service=\"by-name\"}"));
        line.and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).unwrap_or(0.0)
    };
    let before = refusals();
    let receiver = Receiver::start().await.unwrap();
    let by_name = service(&format!("url: {}", receiver.url("hook").replace("127.0.0.1", "localhost")));
    let connector = connectors::build("by-name", &by_name, &none).expect("names pass the build-time check");
    let outcome = connector.call(&task(json!({}))).await;
    let CallOutcome::Permanent { reason, http_status: None } = outcome else { panic!("{outcome:?}") };
    assert!(reason.contains("refused by the network policy") && reason.contains("resolved from localhost"), "{reason}");
    assert!(reason.contains("(loopback)"), "{reason}");
    assert_eq!(receiver.arrived(), 0, "nothing reached the server");
    assert_eq!(refusals(), before + 1.0, "weir_outbound_refused_total counts the refusal");

    let connector = connectors::build("svc", &by_name, &allow(&["127.0.0.1/32"])).unwrap();
    let outcome = connector.call(&task(json!({}))).await;
    assert!(matches!(outcome, CallOutcome::Succeeded { http_status: Some(200), .. }), "{outcome:?}");
    assert_eq!(receiver.arrived(), 1);
}

#[tokio::test]
async fn config_errors_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let load = |yaml: &str| {
        let path = dir.path().join("weir.yaml");
        std::fs::write(&path, yaml).unwrap();
        // As the CLI and `Pipeline::start` load a config for use: its values, then its connectors.
        Config::load(&path).and_then(|c| connectors::validate_all(&c)).map_err(|e| format!("{e:#}"))
    };
    let err = load("network: {allow: [10.0.0.0/33]}\nservices: {}\n").unwrap_err();
    assert!(err.contains("network.allow: ") && err.contains("\"10.0.0.0/33\" is not a CIDR"), "{err}");
    let err = load("network: {allow: [example.com]}\n").unwrap_err();
    assert!(err.contains("\"example.com\" is not a CIDR"), "{err}");
    let err = load("services: {hook: {url: 'http://169.254.169.254/'}}\n").unwrap_err();
    assert!(
        err.contains("services.hook.url") && err.contains("169.254.169.254 is in 169.254.0.0/16 (link-local)"),
        "{err}"
    );
    load("network: {allow: [169.254.169.254]}\nservices: {hook: {url: 'http://169.254.169.254/'}}\n").unwrap();

    let err = load("services: {hook: {url: 'http://example.com/', connector: {type: webhook, method: 'GE T'}}}\n")
        .unwrap_err();
    assert!(err.contains("services.hook.connector.method"), "{err}");
    let err = load(
        "services: {hook: {url: 'http://example.com/', connector: {type: webhook, headers: {Idempotency-Key: x}}}}\n",
    )
    .unwrap_err();
    assert!(err.contains("services.hook.connector.headers") && err.contains("set by weir"), "{err}");
    let err = load("services: {hook: {url: 'http://example.com/', connector: {type: slack, text: '{{ input.text'}}}\n")
        .unwrap_err();
    assert!(err.contains("services.hook.connector.text"), "{err}");
    let err =
        load("services: {ai: {url: 'http://example.com/', connector: {type: openai, model: m, max_tokens: 0}}}\n")
            .unwrap_err();
    assert!(err.contains("services.ai.connector.max_tokens"), "{err}");
    let err = load("services: {ai: {url: 'http://example.com/', connector: {type: openai}}}\n").unwrap_err();
    assert!(err.contains("model"), "{err}");

    // Secrets are read when the connector is built, and a missing one names its variable.
    let svc =
        service("{url: 'http://example.com/', connector: {type: webhook, hmac_secret_env: WEIR_TEST_UNSET_SECRET}}");
    let err = format!("{:#}", connectors::build("hook", &svc, &NetworkPolicy::default()).err().unwrap());
    assert!(err.contains("services.hook.connector.hmac_secret_env") && err.contains("WEIR_TEST_UNSET_SECRET"), "{err}");
}

/// The executor calls through the service's connector: a Slack-shaped service on the real
/// broker and database, from event to result row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slack_service_runs_end_to_end_through_the_executor() {
    const NOTIFY: &str = "{id: notify, version: 1, trigger: {type: member.created}, steps: [{id: post, service: webhook, input: {text: 'New member {{ data.email }}'}}]}";
    let receiver = Receiver::start().await.unwrap();
    let (mut config, _dir) = test_config(&receiver, &[NOTIFY]).await;
    let hook = config.services.get_mut("webhook").unwrap();
    *hook = service(&format!(
        "{{url: {}, connector: {{type: slack, text: '[{{{{ tenant }}}}] {{{{ input.text }}}}'}}}}",
        receiver.url("slack/T0/B0/x")
    ));
    config.validate().unwrap();
    let config = Arc::new(config);
    let pipeline = Pipeline::start(config.clone(), &Pipeline::ALL).await.unwrap();

    let producer = Producer::new(&config).unwrap();
    let count = 20;
    for n in 0..count {
        let event: Event =
            serde_json::from_value(json!({"id": format!("e-{n}"), "source": "/ghost", "type": "member.created",
            "tenant": format!("site-{}", n % 4), "data": {"email": format!("m{n}@example.com")}}))
            .unwrap();
        producer.send(&event, Format::Json).await.unwrap();
    }
    let url = config.database_url.clone();
    let rows = |sql: &'static str| {
        let url = url.clone();
        async move {
            let pool = sqlx::PgPool::connect(&url).await.unwrap();
            let n: i64 = sqlx::query_scalar(sql).fetch_one(&pool).await.unwrap_or(0);
            pool.close().await;
            n
        }
    };
    let done = eventually(Duration::from_secs(60), || async {
        rows("select count(*) from action_results where status = 'succeeded' and output = '\"ok\"'::jsonb").await
            == count
    })
    .await;
    assert!(done, "calls {}, rows {}", receiver.calls().len(), rows("select count(*) from action_results").await);
    pipeline.stop().await.unwrap();

    let calls = receiver.calls();
    assert_eq!(calls.len(), count as usize);
    let mut texts: Vec<String> = calls.iter().map(|c| c.body["text"].as_str().unwrap().to_string()).collect();
    texts.sort();
    let mut expected: Vec<String> =
        (0..count).map(|n| format!("[site-{}] New member m{n}@example.com", n % 4)).collect();
    expected.sort();
    assert_eq!(texts, expected);
    assert!(calls.iter().all(|c| c.path == "/slack/T0/B0/x" && c.idempotency_key.is_some()));
}
