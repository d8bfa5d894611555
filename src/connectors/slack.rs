//! `type: slack`: a Slack-compatible incoming webhook. Each task POSTs `{"text": <text>}`; Slack
//! answers `ok` as plain text, and 429 with `Retry-After` when a channel is over its rate limit
//! (about one message per second), which is retryable like any 429.
//!
//! ```yaml
//! services:
//!   slack:
//!     url: https://hooks.slack.com/services/T000/B000/XXXX
//!     connector:
//!       type: slack
//!       text: "New member on {{ tenant }}: {{ input.email }}"   # default: "{{ input.text }}"
//! ```

use futures::{future::BoxFuture, FutureExt};
use serde_json::{json, Value};

pub use super::SlackConfig;
use super::{compile, context, target, text, CallOutcome, Connector, Http, NetworkPolicy};
use crate::{config::ServiceConfig, engine::template::InputTemplate, envelope::ActionTask};

impl SlackConfig {
    pub(super) fn compile(&self, name: &str) -> anyhow::Result<InputTemplate> {
        compile(&Value::String(self.text.clone()), &format!("services.{name}.connector.text"))
    }
}

pub struct Slack {
    http: Http,
    url: reqwest::Url,
    text: InputTemplate,
}

impl Slack {
    pub fn new(
        name: &str,
        service: &ServiceConfig,
        config: &SlackConfig,
        network: &NetworkPolicy,
    ) -> anyhow::Result<Slack> {
        Ok(Slack {
            text: config.compile(name)?,
            url: target(name, service, network)?,
            http: Http::new(name, service, network)?,
        })
    }
}

impl Connector for Slack {
    fn estimate_cost(&self, _task: &ActionTask) -> u64 {
        1
    }

    fn call<'a>(&'a self, task: &'a ActionTask) -> BoxFuture<'a, CallOutcome> {
        async move {
            let message = match self.text.render(&context(task)) {
                Ok(message) => text(message),
                Err(e) => return CallOutcome::Permanent { reason: e.to_string(), http_status: None },
            };
            match self
                .http
                .exchange(self.http.client().post(self.url.clone()).json(&json!({"text": message})), task)
                .await
            {
                Ok(reply) => reply.succeeded(reply.output(), None),
                Err(outcome) => outcome,
            }
        }
        .boxed()
    }
}
