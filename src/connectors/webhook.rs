//! `type: webhook`: any HTTP endpoint. By default the task is POSTed as JSON (weir's original
//! behaviour); `method`, `headers` and `body` change the request, and `hmac_secret_env` signs it.
//!
//! ```yaml
//! services:
//!   crm:
//!     url: "https://crm.example.com/api/contacts/{{ input.id | urlencode }}"
//!     connector:
//!       type: webhook
//!       method: PUT
//!       headers: {X-Trace: "{{ task_id }}", Content-Type: application/json}
//!       body: {email: "{{ input.email }}", source: weir}   # JSON; a string template sends text
//!       hmac_secret_env: CRM_WEBHOOK_SECRET
//! ```
//!
//! The URL may be a template too. Its host is checked when the config loads (a template cannot
//! stand for the host: the URL must parse with the template in it), and each rendered URL is
//! checked again against the network policy before the call.
//!
//! The signature is GitHub's scheme by default: `X-Weir-Signature: sha256=<hex HMAC-SHA256 of the
//! exact body bytes, keyed with the secret>`, next to `X-Weir-Timestamp` (Unix seconds of
//! sending). It covers the body only, so a captured request can be replayed; with
//! `signature: standard_webhooks` requests are signed per Standard Webhooks instead
//! (`webhook-id`: the task id, the same on every retry; `webhook-timestamp`;
//! `webhook-signature: v1,<base64>` of `id.timestamp.body`), which receivers' Standard Webhooks
//! libraries verify and use to refuse replays (see [`super::signature`]).

use anyhow::{bail, Context as _};
use futures::{future::BoxFuture, FutureExt};
use reqwest::{
    header::{HeaderName, HeaderValue, CONTENT_TYPE},
    Method,
};
use serde_json::{Map, Value};

pub use super::WebhookConfig;
use super::{
    compile, context, is_template, parse_target, secret, signature, text, CallOutcome, Connector, Http, NetworkPolicy,
    IDEMPOTENCY_KEY, TENANT_HEADER,
};
use crate::{
    config::{ServiceConfig, SignatureScheme},
    engine::template::InputTemplate,
    envelope::ActionTask,
};

/// `X-Weir-Signature: sha256=<hex>`: the HMAC-SHA256 of the body.
pub(crate) const SIGNATURE_HEADER: &str = "X-Weir-Signature";
/// When the request was signed, in Unix seconds.
pub(crate) const TIMESTAMP_HEADER: &str = "X-Weir-Timestamp";

/// The parts of a request known at build time.
#[derive(Debug)]
pub(super) struct Request {
    url: Target,
    method: Method,
    /// Header names as configured (the keys of the rendered `headers` object) and parsed.
    headers: Vec<(String, HeaderName)>,
    /// `{"headers": {…}, "body": …}`, rendered in one go per call.
    template: InputTemplate,
    has_body: bool,
    user_content_type: bool,
}

impl WebhookConfig {
    /// Checks the URL, method and header names and compiles the templates.
    pub(super) fn validate(
        &self,
        name: &str,
        service: &ServiceConfig,
        network: &NetworkPolicy,
    ) -> anyhow::Result<Request> {
        let at = |field: &str| format!("services.{name}.connector.{field}");
        let field = format!("services.{name}.url");
        let fixed = parse_target(&field, &service.url, network)?;
        let url = if is_template(&service.url) {
            Target::Template(compile(&Value::String(service.url.clone()), &field)?)
        } else {
            Target::Fixed(fixed)
        };
        let method = Method::from_bytes(self.method.to_ascii_uppercase().as_bytes())
            .ok()
            .filter(|_| !self.method.is_empty())
            .with_context(|| format!("{}: {:?} is not an HTTP method", at("method"), self.method))?;
        let mut headers = Vec::with_capacity(self.headers.len());
        for key in self.headers.keys() {
            let header = HeaderName::from_bytes(key.as_bytes())
                .with_context(|| format!("{}: {key:?} is not a valid header name", at("headers")))?;
            let reserved = [
                IDEMPOTENCY_KEY,
                TENANT_HEADER,
                SIGNATURE_HEADER,
                TIMESTAMP_HEADER,
                "webhook-id",
                "webhook-timestamp",
                "webhook-signature",
            ];
            if reserved.iter().any(|r| r.eq_ignore_ascii_case(key)) {
                bail!("{}: {key} is set by weir and cannot be overridden", at("headers"));
            }
            headers.push((key.clone(), header));
        }
        let mut template = Map::new();
        template.insert(
            "headers".into(),
            Value::Object(self.headers.iter().map(|(k, v)| (k.clone(), v.clone().into())).collect()),
        );
        if let Some(body) = &self.body {
            template.insert("body".into(), body.clone());
        }
        Ok(Request {
            url,
            method,
            user_content_type: headers.iter().any(|(_, h)| h == CONTENT_TYPE),
            headers,
            template: compile(&Value::Object(template), &format!("services.{name}.connector"))?,
            has_body: self.body.is_some(),
        })
    }
}

/// A request body and its default Content-Type.
type Body = (Vec<u8>, &'static str);
type Headers = Vec<(HeaderName, HeaderValue)>;

/// Where requests go: the service's URL, or a template rendered per task.
#[derive(Debug)]
enum Target {
    Fixed(reqwest::Url),
    Template(InputTemplate),
}

pub(crate) struct Webhook {
    http: Http,
    network: NetworkPolicy,
    request: Request,
    /// The HMAC key and how to sign with it.
    secret: Option<(Vec<u8>, SignatureScheme)>,
}

impl Webhook {
    pub fn new(
        name: &str,
        service: &ServiceConfig,
        config: &WebhookConfig,
        network: &NetworkPolicy,
    ) -> anyhow::Result<Webhook> {
        let request = config.validate(name, service, network)?;
        let secret = match &config.hmac_secret_env {
            Some(var) => {
                let field = format!("services.{name}.connector.hmac_secret_env");
                let secret = secret(&field, var)?;
                // The original scheme keeps its secret's bytes as they are (whsec_ included).
                let key = match config.signature {
                    SignatureScheme::Weir => secret.into_bytes(),
                    SignatureScheme::StandardWebhooks => signature::hmac_key(&secret).with_context(|| field.clone())?,
                };
                Some((key, config.signature))
            }
            None => None,
        };
        Ok(Webhook { http: Http::new(name, service, network)?, network: network.clone(), request, secret })
    }

    /// The URL for `task`; a rendered one is checked as the config's is.
    fn url(&self, task: &ActionTask) -> Result<reqwest::Url, String> {
        match &self.request.url {
            Target::Fixed(url) => Ok(url.clone()),
            Target::Template(template) => {
                let rendered = text(template.render(&context(task)).map_err(|e| e.to_string())?);
                parse_target("rendered URL", &rendered, &self.network).map_err(|e| format!("{e:#}"))
            }
        }
    }

    /// Headers and body of the request for `task`; an error is the reason it cannot be sent.
    fn render(&self, task: &ActionTask) -> Result<(Headers, Option<Body>), String> {
        let r = &self.request;
        let rendered = if r.headers.is_empty() && !r.has_body {
            Value::Null
        } else {
            r.template.render(&context(task)).map_err(|e| e.to_string())?
        };
        let mut headers = Vec::with_capacity(r.headers.len());
        for (key, name) in &r.headers {
            let value = text(rendered["headers"][key].clone());
            let value = super::header_value(name.as_str(), "the rendered value", &value)?;
            headers.push((name.clone(), value));
        }
        let body = match rendered.get("body") {
            Some(Value::String(s)) => Some((s.clone().into_bytes(), "text/plain; charset=utf-8")),
            Some(value) => Some((serde_json::to_vec(value).unwrap_or_default(), "application/json")),
            None if matches!(r.method, Method::GET | Method::HEAD) => None,
            None => Some((serde_json::to_vec(task).unwrap_or_default(), "application/json")),
        };
        Ok((headers, body))
    }
}

impl Connector for Webhook {
    fn estimate_cost(&self, _task: &ActionTask) -> u64 {
        1
    }

    fn call<'a>(&'a self, task: &'a ActionTask) -> BoxFuture<'a, CallOutcome> {
        async move {
            let (url, headers, body) = match self.url(task).and_then(|url| Ok((url, self.render(task)?))) {
                Ok((url, (headers, body))) => (url, headers, body),
                Err(reason) => return CallOutcome::Permanent { reason, http_status: None },
            };
            let mut request = self.http.client().request(self.request.method.clone(), url);
            for (name, value) in headers {
                request = request.header(name, value);
            }
            if let (Some((_, content_type)), false) = (&body, self.request.user_content_type) {
                request = request.header(CONTENT_TYPE, *content_type);
            }
            if let Some((key, scheme)) = &self.secret {
                let now = chrono::Utc::now().timestamp();
                let bytes = body.as_ref().map_or(&[][..], |(bytes, _)| bytes);
                request = match scheme {
                    SignatureScheme::Weir => {
                        request.header(TIMESTAMP_HEADER, now).header(SIGNATURE_HEADER, signature::weir(key, bytes))
                    }
                    SignatureScheme::StandardWebhooks => request
                        .header("webhook-id", &task.task_id)
                        .header("webhook-timestamp", now)
                        .header("webhook-signature", signature::standard(key, &task.task_id, now, bytes)),
                };
            }
            if let Some((bytes, _)) = body {
                request = request.body(bytes);
            }
            match self.http.exchange(request, task).await {
                Ok(reply) => {
                    // A service that reports usage like OpenAI (`usage.total_tokens`) gets its cost
                    // limits corrected by it, whatever its connector.
                    let output = reply.output();
                    let cost = output.as_ref().and_then(|o| o["usage"]["total_tokens"].as_u64());
                    reply.succeeded(output, cost)
                }
                Err(outcome) => outcome,
            }
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn webhook(yaml: &str) -> anyhow::Result<Webhook> {
        let service: ServiceConfig =
            serde_yaml_ng::from_str(&format!("{{url: 'http://example.com/', connector: {yaml}}}"))?;
        let crate::connectors::ConnectorConfig::Webhook(config) = &service.connector else { panic!("not a webhook") };
        Webhook::new("hook", &service, config, &NetworkPolicy::default())
    }

    fn task() -> ActionTask {
        serde_json::from_value(json!({"task_id": "t-1", "run_id": "r", "event_id": "e", "event_type": "x", "tenant": "site-1",
            "workflow_id": "w", "workflow_version": 1, "step_id": "s", "service": "hook", "created_at": "2026-11-23T10:00:00Z",
            "input": {"name": "Ada", "n": 2}}))
        .unwrap()
    }

    #[test]
    fn bodies_render_as_json_text_the_task_or_nothing() {
        let (headers, body) = webhook("{type: webhook}").unwrap().render(&task()).unwrap();
        assert!(headers.is_empty());
        let (bytes, content_type) = body.unwrap();
        assert_eq!(serde_json::from_slice::<Value>(&bytes).unwrap(), serde_json::to_value(task()).unwrap());
        assert_eq!(content_type, "application/json");

        let (_, body) = webhook("{type: webhook, body: {who: '{{ input.name }}', n: '{{ input.n }}'}}")
            .unwrap()
            .render(&task())
            .unwrap();
        assert_eq!(body.unwrap(), (br#"{"n":2,"who":"Ada"}"#.to_vec(), "application/json"));
        let (_, body) = webhook("{type: webhook, body: 'Hi {{ input.name }}'}").unwrap().render(&task()).unwrap();
        assert_eq!(body.unwrap(), (b"Hi Ada".to_vec(), "text/plain; charset=utf-8"));
        let (_, body) = webhook("{type: webhook, method: get}").unwrap().render(&task()).unwrap();
        assert_eq!(body, None);

        let w = webhook("{type: webhook, headers: {X-Who: '{{ input.name }}', X-Bad: \"{{ 'a\\nb' }}\"}}").unwrap();
        let err = w.render(&task()).unwrap_err();
        assert!(err.contains("header x-bad: the rendered value \"a\\nb\"") && err.contains("U+000A"), "{err}");
    }

    #[test]
    fn bad_settings_name_the_field() {
        for (yaml, want) in [
            ("{type: webhook, method: ''}", "services.hook.connector.method"),
            ("{type: webhook, method: 'GE T'}", "services.hook.connector.method"),
            ("{type: webhook, headers: {'Bad Header': x}}", "not a valid header name"),
            ("{type: webhook, headers: {x-weir-signature: x}}", "set by weir"),
            ("{type: webhook, headers: {X-A: '{{ tenant'}}", "services.hook.connector.headers.X-A"),
            ("{type: webhook, body: {a: ['{% if %}']}}", "services.hook.connector.body.a[0]"),
            ("{type: webhook, hmac_secret_env: WEIR_UNIT_TEST_UNSET}", "WEIR_UNIT_TEST_UNSET is not set"),
        ] {
            let err = format!("{:#}", webhook(yaml).err().unwrap_or_else(|| panic!("{yaml} was accepted")));
            assert!(err.contains(want), "{yaml}: {err}");
        }
    }
}
