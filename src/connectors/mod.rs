//! Connectors: how the executor calls one kind of external service, and what the call came to.
//!
//! A service's `connector:` in `weir.yaml` picks one (see `docs/connectors.md`):
//!
//! - [`webhook`] (the default): any HTTP endpoint, with method, header and body templates and an
//!   optional HMAC-SHA256 signature;
//! - [`slack`]: a Slack-compatible incoming webhook (`{"text": …}`);
//! - [`openai`]: OpenAI-compatible chat completions, whose cost is the tokens used;
//! - [`noop`]: makes no call, for measuring the executor itself.
//!
//! Every HTTP call carries `Idempotency-Key: <task id>` and `X-Weir-Tenant`, goes only to
//! addresses the [`NetworkPolicy`] allows, and ends in a [`CallOutcome`] that tells the executor
//! whether trying again can help. Templates (minijinja, as in step inputs) are compiled when the
//! connector is built and see the task: `input`, `tenant`, `task_id`, `event`, `step_id`, …

pub mod network;
pub(crate) mod noop;
pub mod openai;
pub mod signature;
pub mod slack;
pub mod webhook;

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use bytes::Bytes;
use futures::future::BoxFuture;
use reqwest::{
    header::{HeaderMap, HeaderValue},
    StatusCode,
};
use serde_json::Value;

pub use network::Refused;
// The settings are data in `config` (which must not depend on this module); re-exported here,
// next to the connectors that use them.
pub use crate::config::{
    ConnectorConfig, HttpVersion, NetworkPolicy, NoopConfig, OpenAiConfig, SlackConfig, WebhookConfig,
};

/// Header with the task id on every call, for the service to deduplicate retries.
pub(crate) const IDEMPOTENCY_KEY: &str = "Idempotency-Key";
/// Header naming the tenant a call is made for.
pub(crate) const TENANT_HEADER: &str = "X-Weir-Tenant";

use crate::{
    config::{Config, ServiceConfig},
    engine::template::InputTemplate,
    envelope::ActionTask,
};

/// What one call came to; the executor decides retries and dead letters from it.
#[derive(Debug, Clone, PartialEq)]
pub enum CallOutcome {
    Succeeded {
        http_status: Option<u16>,
        output: Option<Value>,
        cost: Option<u64>,
    },
    /// Worth retrying: timeouts, connection errors, 429 (with Retry-After parsed: seconds or HTTP date), 5xx.
    Retryable {
        reason: String,
        http_status: Option<u16>,
        retry_after: Option<Duration>,
    },
    /// Retrying cannot help: other 4xx, input that cannot be rendered, refused URL.
    Permanent {
        reason: String,
        http_status: Option<u16>,
    },
}

pub trait Connector: Send + Sync + 'static {
    /// Cost of the task in the service's weighted unit (e.g. tokens), estimated before the
    /// call; 1 for connectors without a weighted cost. Never fails (fall back to a default).
    fn estimate_cost(&self, task: &ActionTask) -> u64;
    /// Makes the call. Must send `Idempotency-Key: <task.task_id>` and `X-Weir-Tenant`.
    /// `cost` in `Succeeded` is the usage the service reported (OpenAI: total_tokens), if any.
    fn call<'a>(&'a self, task: &'a ActionTask) -> BoxFuture<'a, CallOutcome>;
}

/// Builds the connector of a service from its config. Errors name the service and field.
pub fn build(name: &str, service: &ServiceConfig, network: &NetworkPolicy) -> anyhow::Result<Arc<dyn Connector>> {
    Ok(match &service.connector {
        ConnectorConfig::Webhook(c) => Arc::new(webhook::Webhook::new(name, service, c, network)?),
        ConnectorConfig::Slack(c) => Arc::new(slack::Slack::new(name, service, c, network)?),
        ConnectorConfig::OpenAi(c) => Arc::new(openai::OpenAi::new(name, service, c, network)?),
        ConnectorConfig::Noop(_) => Arc::new(noop::Noop),
    })
}

/// The connector checks of every service of a loaded config: run by `Pipeline::start` and by
/// the CLI right after loading, so a bad service fails before anything runs, with the error
/// naming `services.<name>.<field>`. (`Config::validate` checks the values that need no
/// connector.)
pub fn validate_all(config: &Config) -> anyhow::Result<()> {
    for (name, service) in &config.services {
        validate(name, service, &config.network)?;
    }
    Ok(())
}

/// What can be checked when the config loads, without the environment (secrets are read by
/// [`build`] when the executor starts): the URL against the network policy, templates, values.
pub fn validate(name: &str, service: &ServiceConfig, network: &NetworkPolicy) -> anyhow::Result<()> {
    match &service.connector {
        ConnectorConfig::Webhook(c) => c.validate(name, service, network).map(drop),
        ConnectorConfig::Slack(c) => c.compile(name).and(target(name, service, network)).map(drop),
        ConnectorConfig::OpenAi(c) => c.validate(name).and(target(name, service, network)).map(drop),
        ConnectorConfig::Noop(_) => Ok(()),
    }
}

/// The service's URL, refused if it is a literal address the policy does not allow, or a
/// template (only the webhook connector renders its URL).
fn target(name: &str, service: &ServiceConfig, network: &NetworkPolicy) -> anyhow::Result<reqwest::Url> {
    if is_template(&service.url) {
        anyhow::bail!("services.{name}.url: only the webhook connector renders templates in its URL");
    }
    parse_target(&format!("services.{name}.url"), &service.url, network)
}

/// A URL as [`target`] accepts it, whoever wrote it (config or template).
fn parse_target(field: &str, url: &str, network: &NetworkPolicy) -> anyhow::Result<reqwest::Url> {
    let parsed = reqwest::Url::parse(url).with_context(|| format!("{field}: {url:?} is not a URL"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        anyhow::bail!("{field}: scheme must be http or https, not {}", parsed.scheme());
    }
    network.check_url(&parsed).with_context(|| format!("{field}: {url} is refused"))?;
    Ok(parsed)
}

/// Whether a string holds minijinja syntax, as step inputs decide it.
fn is_template(s: &str) -> bool {
    s.contains("{{") || s.contains("{%")
}

/// A service's HTTP clients (`http.pools` of them, each with its own connection pool, used in
/// turn) and the most of an answer it reads.
#[derive(Debug)]
struct Http {
    clients: Vec<reqwest::Client>,
    /// The client the next call uses, modulo their number.
    next: std::sync::atomic::AtomicUsize,
    /// `services.<name>.max_response_bytes`, resolved.
    response_limit: usize,
    /// The field that sets it, for the marker of a cut answer.
    limit_field: String,
}

impl Http {
    /// The client of service `name`: its timeout, HTTP version and pool, the guarded resolver,
    /// no redirects (a redirect could point at a literal address the resolver never sees) and no
    /// proxy (the proxy would do the resolving).
    fn new(name: &str, service: &ServiceConfig, network: &NetworkPolicy) -> anyhow::Result<Http> {
        let build = || {
            let mut builder = reqwest::Client::builder()
                .timeout(service.timeout)
                .dns_resolver(network.resolver(name))
                .redirect(reqwest::redirect::Policy::none())
                .no_proxy()
                .pool_idle_timeout(service.http.idle_timeout);
            if let Some(idle) = service.http.max_idle_per_host {
                builder = builder.pool_max_idle_per_host(idle);
            }
            builder = match service.http.version {
                HttpVersion::Auto => builder,
                HttpVersion::Http1 => builder.http1_only(),
                // Many calls share a connection: let its windows grow with them, and notice a
                // dead connection (a service restarted behind a load balancer) without waiting
                // for the calls' timeouts.
                HttpVersion::Http2 => builder
                    .http2_prior_knowledge()
                    .http2_adaptive_window(true)
                    .http2_keep_alive_interval(Duration::from_secs(30))
                    .http2_keep_alive_while_idle(true),
            };
            builder.build().with_context(|| format!("services.{name}: building the HTTP client"))
        };
        Ok(Http {
            clients: (0..service.http.pools).map(|_| build()).collect::<anyhow::Result<_>>()?,
            next: Default::default(),
            response_limit: service.response_limit(),
            limit_field: format!("services.{name}.max_response_bytes"),
        })
    }

    /// The client of the next call: over HTTP/2, each pool's connection carries its share.
    fn client(&self) -> &reqwest::Client {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        &self.clients[n % self.clients.len()]
    }

    /// Sends `request` with the identity headers. A 2xx is a [`Reply`]; anything else is the
    /// outcome of the call: retryable for 408, 429, 5xx and network failures, permanent
    /// otherwise. At most `response_limit` bytes of the answer are read.
    async fn exchange(&self, request: reqwest::RequestBuilder, task: &ActionTask) -> Result<Reply, CallOutcome> {
        let permanent = |reason| CallOutcome::Permanent { reason, http_status: None };
        let key = header_value(IDEMPOTENCY_KEY, "the task id", &task.task_id).map_err(permanent)?;
        let tenant = header_value(TENANT_HEADER, "the tenant", &task.tenant).map_err(permanent)?;
        let response =
            request.header(IDEMPOTENCY_KEY, key).header(TENANT_HEADER, tenant).send().await.map_err(failed)?;
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let (body, cut) = read_at_most(response, self.response_limit).await.map_err(failed)?;
        if status.is_success() {
            let cut = cut.map(|length| Cut { read: body.len(), length, field: self.limit_field.clone() });
            return Ok(Reply { status, body, cut });
        }
        let (reason, http_status) = (format!("HTTP {status}: {}", snippet(&body, 200)), Some(status.as_u16()));
        Err(match status {
            StatusCode::TOO_MANY_REQUESTS | StatusCode::REQUEST_TIMEOUT => {
                CallOutcome::Retryable { reason, http_status, retry_after }
            }
            s if s.is_server_error() => CallOutcome::Retryable { reason, http_status, retry_after },
            _ => CallOutcome::Permanent { reason, http_status },
        })
    }
}

/// The body of `response`, read up to `limit` bytes; past it the rest is left unread (the
/// connection is dropped rather than drained) and the second value is `Some`, with the
/// `Content-Length` the service announced, if it did.
async fn read_at_most(mut response: reqwest::Response, limit: usize) -> reqwest::Result<(Bytes, Option<Option<u64>>)> {
    let length = response.content_length();
    let mut body = bytes::BytesMut::with_capacity(length.map_or(0, |l| l.min(limit as u64) as usize));
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > limit {
            body.extend_from_slice(&chunk[..limit - body.len()]);
            return Ok((body.freeze(), Some(length)));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body.freeze(), None))
}

/// An answer whose body was longer than the service's `max_response_bytes`.
struct Cut {
    /// Bytes read (the limit).
    read: usize,
    /// The `Content-Length` the service announced, if it did.
    length: Option<u64>,
    /// The setting that bounds it.
    field: String,
}

/// File descriptors kept for everything but the services' connections: Kafka's sockets, the
/// metrics server, logs.
const OTHER_FILES: u64 = 512;

/// Raises this process's open-files limit to its hard limit (as Go's runtime does) and warns if
/// that still cannot hold a connection for every call `services` may have in flight: over
/// HTTP/1.1 each call needs a connection of its own, and a process at its limit fails calls with
/// "too many open files" (retried, but slow). Returns the soft limit in force, if known.
pub fn raise_open_files<'a>(
    config: &Config,
    services: impl IntoIterator<Item = (&'a String, &'a ServiceConfig)>,
) -> Option<u64> {
    let limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(e) => {
            tracing::warn!(error = %e, "could not read or raise the open-files limit (RLIMIT_NOFILE)");
            return None;
        }
    };
    let connections: u64 = services
        .into_iter()
        .filter(|(_, s)| s.http.version != HttpVersion::Http2)
        .map(|(_, s)| s.concurrency.unwrap_or(config.executor.concurrency) as u64)
        .sum();
    if connections + OTHER_FILES > limit {
        tracing::warn!(
            limit,
            connections,
            "the open-files limit (ulimit -n) is below the calls the executors may have in flight, each an HTTP/1.1 \
             connection: raise the limit, lower concurrency, or call services that speak it over HTTP/2 \
             (services.<name>.http.version: http2)"
        );
    }
    Some(limit)
}

/// A secret from the environment variable a config field names.
fn secret(field: &str, var: &str) -> anyhow::Result<String> {
    match std::env::var(var) {
        Ok(value) if !value.is_empty() => Ok(value),
        _ => anyhow::bail!("{field}: environment variable {var} is not set (or empty)"),
    }
}

/// A template over the task, compiled from the config (errors name the field).
fn compile(template: &Value, field: &str) -> anyhow::Result<InputTemplate> {
    InputTemplate::compile_at(template, field).map_err(|e| anyhow::anyhow!("{e}"))
}

/// What templates see: the task's fields (`input`, `tenant`, `task_id`, `event`, …).
fn context(task: &ActionTask) -> crate::engine::template::Context {
    serde_json::to_value(task).unwrap_or_default().into()
}

/// A rendered value as text: strings as they are, anything else as JSON.
fn text(value: Value) -> String {
    match value {
        Value::String(s) => s,
        other => other.to_string(),
    }
}

/// A 2xx answer.
struct Reply {
    status: StatusCode,
    body: Bytes,
    /// Set when the body was longer than the service's limit and was not read whole.
    cut: Option<Cut>,
}

impl Reply {
    /// The body as JSON, else as text (Slack answers `ok`); nothing if empty. An answer cut at
    /// the service's limit is a `weir.truncated` marker saying so (the call still succeeded:
    /// the service acted), like a result whose output is over `limits.max_record_bytes`.
    fn output(&self) -> Option<Value> {
        if let Some(cut) = &self.cut {
            let reason =
                format!("the answer's body was longer than {} bytes ({}); the rest was not read", cut.read, cut.field);
            let marker = serde_json::json!({"reason": reason, "bytes_read": cut.read, "content_length": cut.length});
            return Some(serde_json::json!({ crate::envelope::TRUNCATED: marker }));
        }
        serde_json::from_slice(&self.body)
            .ok()
            .or_else(|| (!self.body.is_empty()).then(|| Value::String(snippet(&self.body, 4096))))
    }

    fn succeeded(&self, output: Option<Value>, cost: Option<u64>) -> CallOutcome {
        CallOutcome::Succeeded { http_status: Some(self.status.as_u16()), output, cost }
    }
}

/// `value` as the value of header `name`, or why it cannot be one: the header, `what` the value
/// is, and the character no header value may hold (CR, LF and the other control characters).
/// Values come from tasks (the tenant, the task id, rendered templates), so the caller makes this
/// a permanent failure: trying again sends the same value. Checked here rather than left to the
/// HTTP client, whose error names neither the header nor the character.
fn header_value(name: &str, what: &str, value: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(value).map_err(|_| {
        // HeaderValue refuses exactly the ASCII control characters other than tab.
        let (at, c) = value.chars().enumerate().find(|(_, c)| c.is_ascii_control() && *c != '\t').unwrap_or((0, '?'));
        format!(
            "header {name}: {what} {:?} cannot be sent, since it holds the control character U+{:04X} at \
             character {at} (header values cannot hold CR, LF or other control characters)",
            snippet(value.as_bytes(), 100),
            c as u32
        )
    })
}

/// A request that got no answer: refused by the network policy or unbuildable (permanent), or a
/// timeout or network failure (retryable).
fn failed(e: reqwest::Error) -> CallOutcome {
    let mut reason = format!("request failed: {e}");
    let mut refused = None;
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        reason.push_str(&format!(": {s}"));
        refused = refused.or_else(|| s.downcast_ref::<Refused>().cloned());
        source = s.source();
    }
    match refused {
        Some(r) => CallOutcome::Permanent { reason: format!("refused by the network policy: {r}"), http_status: None },
        None if e.is_builder() => CallOutcome::Permanent { reason, http_status: None },
        None => CallOutcome::Retryable { reason, http_status: None, retry_after: None },
    }
}

/// `Retry-After`: delay-seconds or an HTTP date (a past date means now).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(std::time::SystemTime::now()).unwrap_or_default())
}

/// At most `max` characters of a body, for messages and outputs.
fn snippet(body: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(body);
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after", "2".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        let later = std::time::SystemTime::now() + Duration::from_secs(120);
        h.insert("retry-after", httpdate::fmt_http_date(later).parse().unwrap());
        let d = retry_after(&h).unwrap();
        assert!(d > Duration::from_secs(110) && d <= Duration::from_secs(120), "{d:?}");
        h.insert("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::ZERO), "a past date means now");
        h.insert("retry-after", "soon".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn connector_config_is_tagged_by_type_and_strict() {
        let c: ConnectorConfig = serde_yaml_ng::from_str("type: slack\ntext: 'hi {{ tenant }}'").unwrap();
        assert!(matches!(c, ConnectorConfig::Slack(s) if s.text == "hi {{ tenant }}"));
        let c: ConnectorConfig = serde_yaml_ng::from_str("type: noop").unwrap();
        assert!(matches!(c, ConnectorConfig::Noop(_)));
        let err = serde_yaml_ng::from_str::<ConnectorConfig>("type: slack\ntxt: x").unwrap_err();
        assert!(err.to_string().contains("txt"), "{err}");
        let err = serde_yaml_ng::from_str::<ConnectorConfig>("type: noop\nurl: x").unwrap_err();
        assert!(err.to_string().contains("url"), "{err}");
        let err = serde_yaml_ng::from_str::<ConnectorConfig>("type: smtp").unwrap_err();
        assert!(err.to_string().contains("smtp"), "{err}");
    }

    #[test]
    fn a_header_value_with_a_control_character_names_the_header_and_the_character() {
        assert_eq!(header_value(TENANT_HEADER, "the tenant", "acme\tco ünï").unwrap(), "acme\tco ünï".as_bytes());
        let e = header_value(TENANT_HEADER, "the tenant", "acme\r\nX-Injected: 1").unwrap_err();
        assert!(e.starts_with("header X-Weir-Tenant: the tenant \"acme\\r\\nX-Injected: 1\""), "{e}");
        assert!(e.contains("U+000D at character 4"), "{e}");
        let e = header_value(IDEMPOTENCY_KEY, "the task id", &format!("{}\0", "x".repeat(500))).unwrap_err();
        assert!(e.contains("Idempotency-Key") && e.contains("U+0000 at character 500") && e.len() < 400, "{e}");
    }

    #[test]
    fn snippets_cut_on_characters() {
        assert_eq!(snippet("héllo".as_bytes(), 2), "hé…");
        assert_eq!(snippet(b"ok", 200), "ok");
    }
}
