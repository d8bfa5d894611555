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
    /// The liveness watchdog of every stage (see `/health/live`).
    pub health: HealthConfig,
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
            health: HealthConfig::default(),
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
        EvaluatorConfig { max_inflight: 2_000, max_event_bytes: 1 << 20 }
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
    /// The same bound for one partition, counting its tasks until they are called: past it (for
    /// 100 ms) only that partition is paused, so one busy partition cannot take the whole
    /// `max_buffered` and stall the others. Default 500.
    pub partition_max_buffered: usize,
    /// Tasks of one tenant held in memory while the tenant waits for its own (`scope: tenant`)
    /// limit; further tasks of that tenant are deferred to a delay topic and come back later, so
    /// a tenant far over its limit neither fills the buffer nor blocks its partition. Default 100.
    pub tenant_max_buffered: usize,
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        ExecutorConfig { concurrency: 64, max_buffered: 2_000, partition_max_buffered: 500, tenant_max_buffered: 100 }
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
    /// Transactions in flight at once, each on its own connection and for its own share of the
    /// results topic's partitions (partition modulo this number), so a run's results are still
    /// written one batch at a time. At most `pool_size`.
    pub transactions: usize,
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig { batch_size: 2_000, linger_ms: 20, pool_size: 4, transactions: 4 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// A stage with work waiting (lag, or messages taken and not finished) that has neither taken
    /// nor finished a message for this long is *stalled*: it logs why, `weir_stage_stalled` is 1
    /// and `/health/live` answers 503 until it moves again. Default 60 000.
    pub stall_after_ms: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig { stall_after_ms: 60_000 }
    }
}

impl HealthConfig {
    pub fn stall_after(&self) -> Duration {
        Duration::from_millis(self.stall_after_ms)
    }
}

/// An external service the executor calls. Every field but `url` has a default; see
/// `docs/executor.md` for how throttling, retries and the breaker work together.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceConfig {
    /// The service's endpoint. The default webhook connector POSTs each task here as JSON, with
    /// the task id as `Idempotency-Key`; `connector` says otherwise.
    pub url: String,
    /// Per-call timeout. Default 10 000.
    pub timeout_ms: u64,
    /// How calls are made: `type: webhook` (the default), `slack`, `openai` or `noop`.
    #[serde(default)]
    pub connector: crate::connectors::ConnectorConfig,
    /// Calls in flight at once for this service in one process; default `executor.concurrency`.
    pub concurrency: Option<usize>,
    /// Calls in flight at once for one tenant. 1 (the default) calls a tenant's tasks one at a
    /// time in event order; more trades that order for throughput.
    pub tenant_concurrency: usize,
    /// Rate limits, all enforced at once (e.g. 450 requests/min and 450 000 tokens/min global,
    /// plus 20 requests/min per tenant). None by default.
    pub limits: Vec<LimitConfig>,
    /// How retryable failures are retried.
    pub retry: RetryConfig,
    /// When to stop calling a failing service for a while.
    pub breaker: BreakerConfig,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            url: String::new(),
            timeout_ms: 10_000,
            concurrency: None,
            tenant_concurrency: 1,
            limits: Vec::new(),
            retry: RetryConfig::default(),
            breaker: BreakerConfig::default(),
            connector: Default::default(),
        }
    }
}

impl ServiceConfig {
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

/// One rate limit: `requests` or `cost` (e.g. tokens) per `per`, for the whole service or for
/// each tenant.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    /// Calls allowed per `per`. Exactly one of `requests` and `cost` is set.
    #[serde(default)]
    pub requests: Option<u32>,
    /// Cost units (what the connector estimates and the service reports, e.g. tokens) per `per`.
    #[serde(default)]
    pub cost: Option<u32>,
    /// The window: `second`, `minute` or `hour`.
    pub per: Per,
    /// `global` (the default): shared by all tenants and, in proportion to the partitions each
    /// owns, by all executor processes; `tenant`: the same limit for each tenant separately.
    #[serde(default)]
    pub scope: Scope,
    /// Calls (or cost units) that may go at once after an idle period. The sustained rate is the
    /// limit minus the burst (so that no window holds more than the limit; see
    /// `docs/executor.md`). Default for `requests`: 1 (calls evenly spaced) up to 200 per window,
    /// above that half a percent of the limit, which absorbs late timer wake-ups at high rates;
    /// for `cost`: a tenth of the limit. A single call's cost above the burst is charged as the
    /// burst before the call and the rest after it.
    #[serde(default)]
    pub burst: Option<u32>,
}

impl LimitConfig {
    /// The limit per window, whichever unit.
    pub fn amount(&self) -> u32 {
        self.requests.or(self.cost).unwrap_or(0)
    }

    pub fn is_cost(&self) -> bool {
        self.cost.is_some()
    }

    /// The burst, with its documented default.
    pub fn burst(&self) -> u32 {
        match (self.burst, self.is_cost()) {
            (Some(b), _) => b,
            (None, false) => (self.amount() / 200).max(1),
            (None, true) => (self.amount() / 10).max(1),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Per {
    Second,
    Minute,
    Hour,
}

impl Per {
    pub fn duration(self) -> Duration {
        Duration::from_secs(match self {
            Per::Second => 1,
            Per::Minute => 60,
            Per::Hour => 3_600,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    #[default]
    Global,
    Tenant,
}

/// Retries of retryable failures (timeouts, connection errors, 429, 5xx) through delay topics
/// `actions.<service>.retry.<tier>`, so the main partition never waits.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Calls per task at most, the first included; after the last the task is dead-lettered.
    /// Default 5; 1 turns retries off.
    pub attempts: u32,
    /// Backoff before the second attempt. Default 1 000.
    pub initial_backoff_ms: u64,
    /// Each further backoff is this many times the previous one. Default 2.
    pub multiplier: f64,
    /// Longest backoff. Default 600 000 (10 minutes).
    pub max_backoff_ms: u64,
    /// Random share taken off each backoff (0 to 1), so tasks that failed together do not
    /// return together. Default 0.2.
    pub jitter: f64,
    /// Delays of the delay topics, ascending. A retry goes to the shortest tier whose delay covers
    /// its backoff (and the service's Retry-After). Each needs a topic
    /// `actions.<service>.retry.<tier>`, which `weir topics apply` derives from
    /// `actions.<service>` when not declared. Default 1s, 10s, 1m, 10m.
    pub tiers_ms: Vec<u64>,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            attempts: 5,
            initial_backoff_ms: 1_000,
            multiplier: 2.0,
            max_backoff_ms: 600_000,
            jitter: 0.2,
            tiers_ms: vec![1_000, 10_000, 60_000, 600_000],
        }
    }
}

impl RetryConfig {
    /// The delay topics' suffixes (`1s`, `10s`, `1m`, …), in the order of `tiers_ms`.
    pub fn tier_names(&self) -> Vec<String> {
        self.tiers_ms.iter().map(|ms| tier_name(*ms)).collect()
    }
}

/// A tier's topic suffix: its delay in the largest whole unit.
pub fn tier_name(ms: u64) -> String {
    match ms {
        ms if ms > 0 && ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms > 0 && ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms > 0 && ms % 1_000 == 0 => format!("{}s", ms / 1_000),
        ms => format!("{ms}ms"),
    }
}

/// A circuit breaker per service and process: when too many recent calls failed, calls stop for
/// `open_ms` (tasks wait; they neither fail nor use up attempts), then a few probes decide.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Default true.
    pub enabled: bool,
    /// Share of failed calls (retryable failures; permanent ones are the caller's fault) in the
    /// window that opens the breaker. Default 0.5.
    pub failure_ratio: f64,
    /// The window of recent calls. Default 10 000.
    pub window_ms: u64,
    /// Calls in the window before the ratio counts. Default 20.
    pub min_calls: u32,
    /// How long the breaker stays open before probing. Default 5 000.
    pub open_ms: u64,
    /// Probe calls at once while half-open; one success closes the breaker, one failure opens it
    /// again. Default 1.
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            enabled: true,
            failure_ratio: 0.5,
            window_ms: 10_000,
            min_calls: 20,
            open_ms: 5_000,
            half_open_probes: 1,
        }
    }
}

impl ServiceConfig {
    /// Checks the values; errors name `services.<name>.<field>`.
    fn validate(&self, name: &str) -> anyhow::Result<()> {
        let url = reqwest::Url::parse(&self.url).with_context(|| format!("services.{name}.url: {:?}", self.url))?;
        if !matches!(url.scheme(), "http" | "https") {
            bail!("services.{name}.url: scheme must be http or https, not {}", url.scheme());
        }
        if self.timeout_ms == 0 {
            bail!("services.{name}.timeout_ms: must be at least 1");
        }
        if self.concurrency == Some(0) {
            bail!("services.{name}.concurrency: must be at least 1");
        }
        if self.tenant_concurrency == 0 {
            bail!("services.{name}.tenant_concurrency: must be at least 1");
        }
        for (i, limit) in self.limits.iter().enumerate() {
            let at = format!("services.{name}.limits[{i}]");
            match (limit.requests, limit.cost) {
                (Some(_), Some(_)) | (None, None) => bail!("{at}: set exactly one of requests and cost"),
                _ => {}
            }
            if limit.amount() == 0 {
                bail!("{at}: the limit must be at least 1");
            }
            if limit.burst == Some(0) || limit.burst() > limit.amount() {
                bail!("{at}.burst: must be between 1 and the limit ({})", limit.amount());
            }
        }
        let r = &self.retry;
        if r.attempts == 0 {
            bail!("services.{name}.retry.attempts: must be at least 1 (1 means no retries)");
        }
        if r.initial_backoff_ms == 0 || r.max_backoff_ms < r.initial_backoff_ms {
            bail!("services.{name}.retry.initial_backoff_ms: must be at least 1 and at most max_backoff_ms");
        }
        if !(r.multiplier >= 1.0 && r.multiplier.is_finite()) {
            bail!("services.{name}.retry.multiplier: must be at least 1");
        }
        if !(0.0..=1.0).contains(&r.jitter) {
            bail!("services.{name}.retry.jitter: must be between 0 and 1");
        }
        if r.attempts > 1 && r.tiers_ms.is_empty() {
            bail!("services.{name}.retry.tiers_ms: retries need at least one delay tier");
        }
        if r.tiers_ms.contains(&0) || !r.tiers_ms.windows(2).all(|w| w[0] < w[1]) {
            bail!("services.{name}.retry.tiers_ms: delays must be above 0 and strictly ascending");
        }
        let b = &self.breaker;
        if !(b.failure_ratio > 0.0 && b.failure_ratio <= 1.0) {
            bail!("services.{name}.breaker.failure_ratio: must be above 0 and at most 1");
        }
        if b.window_ms == 0 || b.open_ms == 0 || b.min_calls == 0 || b.half_open_probes == 0 {
            bail!("services.{name}.breaker: window_ms, open_ms, min_calls and half_open_probes must be at least 1");
        }
        Ok(())
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
        if self.executor.partition_max_buffered == 0 || self.executor.tenant_max_buffered == 0 {
            bail!("executor.partition_max_buffered and executor.tenant_max_buffered must be at least 1");
        }
        if self.health.stall_after_ms < 100 {
            bail!("health.stall_after_ms: must be at least 100 (got {})", self.health.stall_after_ms);
        }
        if self.sink.batch_size == 0 || self.sink.pool_size == 0 {
            bail!("sink.batch_size and sink.pool_size must be at least 1");
        }
        if self.sink.transactions == 0 || self.sink.transactions > self.sink.pool_size as usize {
            bail!("sink.transactions must be between 1 and sink.pool_size ({})", self.sink.pool_size);
        }
        for (name, service) in &self.services {
            if !name.chars().all(|c| c.is_ascii_alphanumeric() || "_-".contains(c)) {
                bail!("services.{name}: a service name may only hold ASCII letters, digits, '_' and '-'");
            }
            service.validate(name)?;
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
        c.services.insert("hook".into(), ServiceConfig { url: "ftp://x".into(), timeout_ms: 1, ..Default::default() });
        assert!(c.validate().unwrap_err().to_string().contains("services.hook.url"));
    }

    #[test]
    fn service_errors_name_the_field() {
        let service = |yaml: &str| -> String {
            let mut c = Config::default();
            c.services.insert("ai".into(), serde_yaml_ng::from_str(yaml).unwrap());
            c.validate().map(|_| String::new()).unwrap_or_else(|e| format!("{e:#}"))
        };
        let ok = "url: http://x/\nlimits: [{requests: 450, per: minute}, {cost: 450000, per: minute}, {requests: 20, per: minute, scope: tenant}]\n";
        assert_eq!(service(ok), "");
        assert!(
            service("url: http://x/\nlimits: [{requests: 1, cost: 2, per: second}]").contains("services.ai.limits[0]")
        );
        assert!(service("url: http://x/\nlimits: [{requests: 5, per: second, burst: 9}]").contains("limits[0].burst"));
        assert!(service("url: http://x/\nretry: {attempts: 0}").contains("services.ai.retry.attempts"));
        assert!(service("url: http://x/\nretry: {tiers_ms: [5000, 1000]}").contains("services.ai.retry.tiers_ms"));
        assert!(service("url: http://x/\nbreaker: {failure_ratio: 2}").contains("services.ai.breaker.failure_ratio"));
        assert!(service("url: http://x/\ntenant_concurrency: 0").contains("services.ai.tenant_concurrency"));
        let err =
            serde_yaml_ng::from_str::<ServiceConfig>("url: http://x/\nlimits: [{requests: 1, per: day}]").unwrap_err();
        assert!(err.to_string().contains("day"), "{err}");
        assert_eq!(RetryConfig::default().tier_names(), ["1s", "10s", "1m", "10m"]);
        assert_eq!(tier_name(1_500), "1500ms");
    }

    #[test]
    fn the_repo_weir_yaml_loads_and_states_the_defaults() {
        let config = Config::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("weir.yaml")).unwrap();
        let webhook = &config.services["webhook"];
        let defaults = ServiceConfig::default();
        assert_eq!((&webhook.retry, &webhook.breaker), (&defaults.retry, &defaults.breaker));
        assert_eq!(config.executor.partition_max_buffered, ExecutorConfig::default().partition_max_buffered);
    }

    #[test]
    fn defaults_validate() {
        Config::default().validate().unwrap();
        assert_eq!(Config { topic_prefix: "t1.".into(), ..Config::default() }.topic("events"), "t1.events");
    }
}
