//! `weir.yaml`: where the broker and database are, which topics and workflows to use, and how each
//! stage behaves. Every field has a default except the services, so a minimal file is just
//!
//! ```yaml
//! services:
//!   webhook:
//!     url: http://127.0.0.1:8080/hook
//! ```
//!
//! `WEIR_BROKERS` and `DATABASE_URL` override the file, so the same file works against the
//! project's local broker and database and against your own. Unknown keys are errors (a typo
//! must not silently fall back to a default), and [`Config::validate`] checks values at load.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Kafka bootstrap servers, comma separated.
    pub brokers: String,
    /// Prepended to every topic name and consumer group, to run several weir installations (or
    /// tests) on one cluster.
    pub topic_prefix: String,
    /// PostgreSQL URL of the results sink.
    pub database_url: String,
    /// Address of the Prometheus `/metrics` endpoint; `null` turns it off.
    pub metrics_addr: Option<SocketAddr>,
    /// Directory of topic declarations (`topics/*.yaml`).
    pub topics_dir: PathBuf,
    /// Workflow definitions: a YAML file or a directory of them.
    pub workflows: PathBuf,
    pub evaluator: EvaluatorConfig,
    pub executor: ExecutorConfig,
    pub sink: SinkConfig,
    /// External services by name; a workflow step names one, and its tasks go to
    /// `actions.<name>`.
    pub services: BTreeMap<String, ServiceConfig>,
    /// Extra librdkafka properties for every client (e.g. `security.protocol`).
    pub kafka: BTreeMap<String, String>,
    /// Which internal addresses connectors may call (see `docs/connectors.md`).
    pub network: crate::connectors::NetworkPolicy,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            brokers: "127.0.0.1:9092".into(),
            topic_prefix: String::new(),
            database_url: "postgres://weir:weir@127.0.0.1:5432/weir".into(),
            metrics_addr: Some(([127, 0, 0, 1], 9898).into()),
            topics_dir: "topics".into(),
            workflows: "workflows".into(),
            evaluator: EvaluatorConfig::default(),
            executor: ExecutorConfig::default(),
            sink: SinkConfig::default(),
            services: BTreeMap::new(),
            kafka: BTreeMap::new(),
            network: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvaluatorConfig {
    /// Events whose tasks are produced but not yet acknowledged; past this the consumer pauses.
    pub max_inflight: usize,
    /// Largest event payload accepted; bigger ones go to the dead-letter topic.
    pub max_event_bytes: usize,
}

impl Default for EvaluatorConfig {
    fn default() -> Self {
        EvaluatorConfig { max_inflight: 20_000, max_event_bytes: 1 << 20 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExecutorConfig {
    /// Calls in flight at once per executor process.
    pub concurrency: usize,
    /// Tasks taken from Kafka but not finished (running or waiting behind an earlier task of the
    /// same tenant); past this the consumer pauses.
    pub max_buffered: usize,
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        ExecutorConfig { concurrency: 64, max_buffered: 2_000 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SinkConfig {
    /// Rows written in one transaction at most.
    pub batch_size: usize,
    /// How long a partial batch waits for more rows.
    pub linger_ms: u64,
    /// PostgreSQL connections.
    pub pool_size: u32,
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig { batch_size: 2_000, linger_ms: 20, pool_size: 4 }
    }
}

/// An external service the executor calls.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// The service's endpoint. The default webhook connector POSTs each task here as JSON, with
    /// the task id as `Idempotency-Key`; `connector` says otherwise.
    pub url: String,
    /// Per-call timeout.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// How calls are made: `type: webhook` (the default), `slack`, `openai` or `noop`.
    #[serde(default)]
    pub connector: crate::connectors::ConnectorConfig,
}

fn default_timeout_ms() -> u64 {
    10_000
}

impl ServiceConfig {
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

impl Config {
    /// Reads, overrides from the environment, and validates a config file.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        let mut config: Config =
            serde_yaml_ng::from_str(&text).with_context(|| format!("parsing config {}", path.display()))?;
        // Relative paths in the file are relative to the file, not to wherever weir was started.
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut config.topics_dir, &mut config.workflows] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        config.apply_env();
        config.validate().with_context(|| format!("invalid config {}", path.display()))?;
        Ok(config)
    }

    /// `WEIR_BROKERS` and `DATABASE_URL` win over the file.
    pub fn apply_env(&mut self) {
        if let Ok(b) = std::env::var("WEIR_BROKERS") {
            self.brokers = b;
        }
        if let Ok(u) = std::env::var("DATABASE_URL") {
            self.database_url = u;
        }
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.brokers.trim().is_empty() {
            bail!("brokers: must name at least one host:port");
        }
        if !self.topic_prefix.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
            bail!("topic_prefix: {:?} may only hold ASCII letters, digits, '.', '_' and '-'", self.topic_prefix);
        }
        if self.evaluator.max_inflight == 0 || self.executor.concurrency == 0 || self.executor.max_buffered == 0 {
            bail!("evaluator.max_inflight, executor.concurrency and executor.max_buffered must be at least 1");
        }
        if self.sink.batch_size == 0 || self.sink.pool_size == 0 {
            bail!("sink.batch_size and sink.pool_size must be at least 1");
        }
        for (name, service) in &self.services {
            if !name.chars().all(|c| c.is_ascii_alphanumeric() || "_-".contains(c)) {
                bail!("services.{name}: a service name may only hold ASCII letters, digits, '_' and '-'");
            }
            let url = reqwest::Url::parse(&service.url).with_context(|| format!("services.{name}.url"))?;
            if !matches!(url.scheme(), "http" | "https") {
                bail!("services.{name}.url: scheme must be http or https, not {}", url.scheme());
            }
            if service.timeout_ms == 0 {
                bail!("services.{name}.timeout_ms: must be at least 1");
            }
            crate::connectors::validate(name, service, &self.network)?;
        }
        Ok(())
    }

    /// The physical name of a logical topic (`events`, `actions.webhook`, …).
    pub fn topic(&self, logical: &str) -> String {
        format!("{}{}", self.topic_prefix, logical)
    }

    /// The consumer group of a stage.
    pub fn group(&self, stage: &str) -> String {
        format!("{}weir-{}", self.topic_prefix, stage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let err = serde_yaml_ng::from_str::<Config>("brokers: x\nbrokerz: y\n").unwrap_err();
        assert!(err.to_string().contains("brokerz"), "{err}");
        let mut c = Config::default();
        c.services.insert(
            "hook".into(),
            ServiceConfig { url: "ftp://x".into(), timeout_ms: 1, connector: Default::default() },
        );
        assert!(c.validate().unwrap_err().to_string().contains("services.hook.url"));
    }

    #[test]
    fn defaults_validate() {
        Config::default().validate().unwrap();
        assert_eq!(Config { topic_prefix: "t1.".into(), ..Config::default() }.topic("events"), "t1.events");
    }
}
