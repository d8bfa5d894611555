//! What the executor needs from a connector, and the plain webhook connector.
//!
//! The executor depends only on [`Connector`] and [`CallOutcome`]: a connector turns a task into
//! one call and says how the call went, in the three classes the executor acts on (done, try again
//! later, give up). Throttling, retries, the breaker and results are the executor's business.

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use futures::{future::BoxFuture, FutureExt};
use reqwest::StatusCode;

use crate::{config::ServiceConfig, envelope::ActionTask};

/// Header with the task id on every call, for the service to deduplicate retries.
pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";
pub const TENANT_HEADER: &str = "X-Weir-Tenant";

/// How one call went.
#[derive(Debug, Clone, PartialEq)]
pub enum CallOutcome {
    Succeeded {
        http_status: Option<u16>,
        output: Option<serde_json::Value>,
        cost: Option<u64>,
    },
    /// Worth trying again later: timeouts, connection errors, 429 (with the service's
    /// Retry-After), 5xx.
    Retryable {
        reason: String,
        http_status: Option<u16>,
        retry_after: Option<Duration>,
    },
    /// The same call would fail the same way: other 4xx, a task the connector cannot express.
    Permanent {
        reason: String,
        http_status: Option<u16>,
    },
}

pub trait Connector: Send + Sync + 'static {
    /// The call's cost in the unit of the service's `cost` limits (e.g. tokens), before the call;
    /// 1 for services that are not weighted.
    fn estimate_cost(&self, task: &ActionTask) -> u64;
    /// Makes the call, with an `Idempotency-Key` derived from the task id.
    fn call<'a>(&'a self, task: &'a ActionTask) -> BoxFuture<'a, CallOutcome>;
}

/// The connector of a configured service.
pub fn build(_name: &str, service: &ServiceConfig) -> anyhow::Result<Arc<dyn Connector>> {
    Ok(Arc::new(Webhook::new(service)?))
}

/// POSTs the task as JSON to the service's URL. A JSON response is the task's output; its
/// `usage.total_tokens`, when present, is the call's reported cost.
pub struct Webhook {
    url: String,
    http: reqwest::Client,
}

impl Webhook {
    pub fn new(service: &ServiceConfig) -> anyhow::Result<Webhook> {
        let http = reqwest::Client::builder().timeout(service.timeout()).build().context("building HTTP client")?;
        Ok(Webhook { url: service.url.clone(), http })
    }
}

impl Connector for Webhook {
    fn estimate_cost(&self, _: &ActionTask) -> u64 {
        1
    }

    fn call<'a>(&'a self, task: &'a ActionTask) -> BoxFuture<'a, CallOutcome> {
        async move {
            let sent = self
                .http
                .post(&self.url)
                .header(IDEMPOTENCY_KEY, &task.task_id)
                .header(TENANT_HEADER, &task.tenant)
                .json(task)
                .send()
                .await;
            match sent {
                Ok(response) => {
                    let status = response.status();
                    let retry_after = retry_after(response.headers());
                    match response.bytes().await {
                        Ok(body) => classify(status, retry_after, &body),
                        Err(e) => CallOutcome::Retryable {
                            reason: format!("reading the response: {e}"),
                            http_status: Some(status.as_u16()),
                            retry_after: None,
                        },
                    }
                }
                // A request that could not even be built will not build next time either; every
                // other transport error (connect, timeout, reset) may well pass later.
                Err(e) if e.is_builder() => {
                    CallOutcome::Permanent { reason: format!("request: {e}"), http_status: None }
                }
                Err(e) => CallOutcome::Retryable {
                    reason: format!("request failed: {e}"),
                    http_status: None,
                    retry_after: None,
                },
            }
        }
        .boxed()
    }
}

/// The response's classification: 2xx done; 408, 429 and 5xx retryable; other codes permanent.
pub fn classify(status: StatusCode, retry_after: Option<Duration>, body: &[u8]) -> CallOutcome {
    let code = Some(status.as_u16());
    if status.is_success() {
        let output: Option<serde_json::Value> = serde_json::from_slice(body).ok();
        let cost = output.as_ref().and_then(|o| o.pointer("/usage/total_tokens")).and_then(|t| t.as_u64());
        return CallOutcome::Succeeded { http_status: code, output, cost };
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(200)]);
    let reason = format!("HTTP {status}: {text}");
    if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::REQUEST_TIMEOUT || status.is_server_error() {
        CallOutcome::Retryable { reason, http_status: code, retry_after }
    } else {
        CallOutcome::Permanent { reason, http_status: code }
    }
}

/// `Retry-After` in seconds (the HTTP-date form is rare for APIs and is ignored).
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<f64>().ok().filter(|s| s.is_finite() && *s >= 0.0).map(Duration::from_secs_f64)
}

/// Succeeds at once without calling anything: for measuring the executor itself.
pub struct Noop;

impl Connector for Noop {
    fn estimate_cost(&self, _: &ActionTask) -> u64 {
        1
    }

    fn call<'a>(&'a self, _: &'a ActionTask) -> BoxFuture<'a, CallOutcome> {
        futures::future::ready(CallOutcome::Succeeded { http_status: None, output: None, cost: None }).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified() {
        let ok = classify(StatusCode::OK, None, br#"{"usage": {"total_tokens": 42}}"#);
        assert!(matches!(ok, CallOutcome::Succeeded { cost: Some(42), http_status: Some(200), .. }), "{ok:?}");
        let wait = Some(Duration::from_secs(3));
        assert!(matches!(
            classify(StatusCode::TOO_MANY_REQUESTS, wait, b""),
            CallOutcome::Retryable { retry_after: Some(d), .. } if d == Duration::from_secs(3)
        ));
        assert!(matches!(classify(StatusCode::SERVICE_UNAVAILABLE, None, b""), CallOutcome::Retryable { .. }));
        assert!(matches!(classify(StatusCode::REQUEST_TIMEOUT, None, b""), CallOutcome::Retryable { .. }));
        let bad = classify(StatusCode::BAD_REQUEST, None, b"no such channel");
        assert!(
            matches!(&bad, CallOutcome::Permanent { reason, http_status: Some(400) } if reason.contains("no such channel"))
        );
        assert!(matches!(classify(StatusCode::NOT_FOUND, None, b""), CallOutcome::Permanent { .. }));
    }

    #[test]
    fn retry_after_reads_seconds_only() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(reqwest::header::RETRY_AFTER, "2".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert(reqwest::header::RETRY_AFTER, "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }
}
