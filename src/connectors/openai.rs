//! `type: openai`: OpenAI-compatible chat completions (OpenAI, Azure OpenAI's compatible
//! endpoint, vLLM, Ollama, llama.cpp's server, …). The service's `url` is the full endpoint,
//! e.g. `https://api.openai.com/v1/chat/completions`.
//!
//! The step input is either `{"messages": [...]}` or `{"prompt": "..."}` (sent as one user
//! message); its other fields (`temperature`, `response_format`, …) are passed through, and
//! `model` and `max_tokens` come from the config unless the input sets them. The output is the
//! response JSON; the cost is the `usage.total_tokens` the service reports.
//!
//! The cost estimated before the call (what a token limit is charged up front) is the prompt's
//! characters ÷ 4, rounded up, plus `max_tokens`: about four characters per token in English, and
//! the completion may use all it is allowed. A `cost_estimate` template replaces this estimate;
//! if it fails to render or is not a number, the default estimate is used (and the failure
//! logged), since an estimate must never stop a call.
//!
//! ```yaml
//! services:
//!   openai:
//!     url: https://api.openai.com/v1/chat/completions
//!     connector:
//!       type: openai
//!       model: gpt-4o-mini
//!       api_key_env: OPENAI_API_KEY
//!       max_tokens: 512
//!       cost_estimate: "{{ (input.prompt | length) // 3 + 512 }}"   # optional
//! ```

use anyhow::bail;
use futures::{future::BoxFuture, FutureExt};
use serde_json::{json, Value};

pub use super::OpenAiConfig;
use super::{compile, context, secret, target, CallOutcome, Connector, Http, NetworkPolicy};
use crate::{
    config::ServiceConfig,
    engine::template::InputTemplate,
    envelope::ActionTask,
    telemetry::{Event, Stage},
};

impl OpenAiConfig {
    pub(super) fn validate(&self, name: &str) -> anyhow::Result<()> {
        self.compile(name).map(drop)
    }

    fn compile(&self, name: &str) -> anyhow::Result<Option<InputTemplate>> {
        let at = |field: &str| format!("services.{name}.connector.{field}");
        if self.model.trim().is_empty() {
            bail!("{}: must name a model", at("model"));
        }
        if self.max_tokens == 0 {
            bail!("{}: must be at least 1", at("max_tokens"));
        }
        self.cost_estimate.as_ref().map(|t| compile(&Value::String(t.clone()), &at("cost_estimate"))).transpose()
    }
}

pub(crate) struct OpenAi {
    service: String,
    http: Http,
    url: reqwest::Url,
    model: String,
    max_tokens: u64,
    api_key: Option<String>,
    cost_estimate: Option<InputTemplate>,
}

impl OpenAi {
    pub fn new(
        name: &str,
        service: &ServiceConfig,
        config: &OpenAiConfig,
        network: &NetworkPolicy,
    ) -> anyhow::Result<OpenAi> {
        let cost_estimate = config.compile(name)?;
        let api_key = match &config.api_key_env {
            Some(var) => Some(secret(&format!("services.{name}.connector.api_key_env"), var)?),
            None => None,
        };
        Ok(OpenAi {
            service: name.to_string(),
            url: target(name, service, network)?,
            http: Http::new(name, service, network)?,
            model: config.model.clone(),
            max_tokens: config.max_tokens,
            api_key,
            cost_estimate,
        })
    }

    /// The request body for a step input; an error says what the input lacks.
    fn request(&self, input: &Value) -> Result<Value, String> {
        let Some(fields) = input.as_object() else {
            return Err("input must be an object with `messages` or `prompt`".into());
        };
        let mut body = fields.clone();
        match (body.remove("prompt"), body.get("messages")) {
            (Some(_), Some(_)) => return Err("input has both `prompt` and `messages`; give one".into()),
            (Some(Value::String(prompt)), None) => {
                body.insert("messages".into(), json!([{"role": "user", "content": prompt}]));
            }
            (Some(_), None) => return Err("input.prompt must be a string".into()),
            (None, Some(Value::Array(messages))) if !messages.is_empty() => {}
            (None, _) => return Err("input needs `messages` (a non-empty array) or `prompt` (a string)".into()),
        }
        body.entry("model").or_insert_with(|| self.model.clone().into());
        body.entry("max_tokens").or_insert_with(|| self.max_tokens.into());
        Ok(Value::Object(body))
    }

    /// Prompt characters ÷ 4 (rounded up) + the completion's `max_tokens`.
    fn default_estimate(&self, input: &Value) -> u64 {
        let chars = |s: &str| s.chars().count() as u64;
        let content = |c: &Value| match c {
            Value::String(s) => chars(s),
            // Multi-part content: only text parts count.
            Value::Array(parts) => parts.iter().filter_map(|p| p["text"].as_str()).map(chars).sum(),
            _ => 0,
        };
        let prompt = match input.get("prompt") {
            Some(Value::String(p)) => chars(p),
            _ => input["messages"].as_array().map_or(0, |ms| ms.iter().map(|m| content(&m["content"])).sum()),
        };
        prompt.div_ceil(4) + input["max_tokens"].as_u64().unwrap_or(self.max_tokens)
    }
}

impl Connector for OpenAi {
    fn estimate_cost(&self, task: &ActionTask) -> u64 {
        let Some(template) = &self.cost_estimate else { return self.default_estimate(&task.input) };
        let estimate = template.render(&context(task)).map_err(|e| e.to_string()).and_then(|v| {
            match &v {
                Value::Number(n) => n.as_f64().filter(|f| *f >= 0.0).map(|f| f.ceil() as u64),
                Value::String(s) => s.trim().parse::<u64>().ok(),
                _ => None,
            }
            .ok_or_else(|| format!("services.{}.connector.cost_estimate: {v} is not a number of tokens", self.service))
        });
        estimate.unwrap_or_else(|detail| {
            Event::Failed { stage: Stage::Execute, reason: "cost_estimate", retryable: false, detail: &detail }.emit();
            self.default_estimate(&task.input)
        })
    }

    fn call<'a>(&'a self, task: &'a ActionTask) -> BoxFuture<'a, CallOutcome> {
        async move {
            let body = match self.request(&task.input) {
                Ok(body) => body,
                Err(reason) => return CallOutcome::Permanent { reason, http_status: None },
            };
            let mut request = self.http.client().post(self.url.clone()).json(&body);
            if let Some(key) = &self.api_key {
                request = request.bearer_auth(key);
            }
            match self.http.exchange(request, task).await {
                Ok(reply) => {
                    let output = reply.output();
                    let usage = output.as_ref().map(|o| &o["usage"]);
                    let cost = usage.and_then(|u| {
                        u["total_tokens"]
                            .as_u64()
                            .or_else(|| Some(u["prompt_tokens"].as_u64()? + u["completion_tokens"].as_u64()?))
                    });
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

    fn openai() -> OpenAi {
        let service: ServiceConfig = serde_yaml_ng::from_str(
            "{url: 'http://example.com/v1/chat/completions', connector: {type: openai, model: m1}}",
        )
        .unwrap();
        let crate::connectors::ConnectorConfig::OpenAi(config) = &service.connector else { panic!("not openai") };
        OpenAi::new("ai", &service, config, &NetworkPolicy::default()).unwrap()
    }

    #[test]
    fn prompts_become_one_user_message_and_settings_fill_the_gaps() {
        let ai = openai();
        assert_eq!(
            ai.request(&json!({"prompt": "hi", "temperature": 0})).unwrap(),
            json!({"model": "m1", "max_tokens": 256, "temperature": 0, "messages": [{"role": "user", "content": "hi"}]})
        );
        let messages = json!({"messages": [{"role": "user", "content": "x"}], "model": "m2", "max_tokens": 5});
        assert_eq!(ai.request(&messages).unwrap(), messages, "the input's model and max_tokens win");
        for (bad, want) in [
            (json!(null), "must be an object"),
            (json!({"prompt": "a", "messages": [{}]}), "both"),
            (json!({"prompt": ["a"]}), "input.prompt must be a string"),
            (json!({"messages": {}}), "non-empty array"),
            (json!({}), "needs `messages`"),
        ] {
            let err = ai.request(&bad).unwrap_err();
            assert!(err.contains(want), "{bad}: {err}");
        }
    }

    #[test]
    fn the_default_estimate_is_prompt_characters_over_four_plus_max_tokens() {
        let ai = openai();
        assert_eq!(ai.default_estimate(&json!({"prompt": "abcdefgh"})), 2 + 256);
        assert_eq!(ai.default_estimate(&json!({"prompt": "é"})), 1 + 256, "characters, not bytes, rounded up");
        let parts = json!({"messages": [{"content": "abcd"}, {"content": [{"type": "text", "text": "abcd"}, {"type": "image_url"}]}], "max_tokens": 7});
        assert_eq!(ai.default_estimate(&parts), 2 + 7);
        assert_eq!(ai.default_estimate(&json!("not an object")), 256);
    }
}
