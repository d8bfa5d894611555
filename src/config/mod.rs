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
//! Durations are written with units (`linger: 20ms`, `timeout: 10s`); the older `*_ms` keys
//! holding milliseconds are read too (see [`duration`]).
//!
//! `Config` is `Serialize` as well: tests and benchmarks that run the `weir` binary write the
//! config they built as its `weir.yaml`, rather than a hand-kept copy of some of its keys.
//!
//! This module imports no other weir module: it is data and its checks. What needs the rest of
//! weir (connectors compiling their templates, checking URLs against the network policy) is
//! `connectors::validate_all`, which `Pipeline::start` and the CLI run on a loaded config.

pub mod duration;
mod groups;
mod ingest;
mod names;
mod priority;
mod retention;
mod services;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

pub use groups::{GroupProtocol, GroupsConfig};
pub use ingest::*;
pub use names::Names;
pub use priority::{Priority, PriorityWeights, MAX_PRIORITY_WEIGHT};
pub use retention::RetentionConfig;
pub use services::*;

#[derive(Debug, Clone, Serialize, Deserialize)]
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
    pub network: NetworkPolicy,
    /// How much work a workflow's templates may do per run.
    pub engine: EngineConfig,
    /// Sizes of what weir writes and accepts (see `kafka::limits`).
    pub limits: RecordLimits,
    /// This process's identity in its consumer groups (Kafka static membership,
    /// `group.instance.id`): a process restarted under the same id takes its partitions back at
    /// once instead of waiting for its old session to expire. Unique per live process: a second
    /// process with the same id fences the first. `WEIR_INSTANCE_ID` overrides it; `null` (the
    /// default) is dynamic membership.
    pub instance_id: Option<String>,
    /// How each stage's processes share its partitions and hand them over (see `groups`).
    pub consumer_groups: GroupsConfig,
    /// How `weir replay` paces what it re-drives.
    pub replay: ReplayConfig,
    /// The HTTP endpoint of `weir run --stage ingest` (docs/ingest.md).
    pub ingest: IngestConfig,
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
            engine: EngineConfig::default(),
            limits: RecordLimits::default(),
            instance_id: None,
            consumer_groups: GroupsConfig::default(),
            replay: ReplayConfig::default(),
            ingest: IngestConfig::default(),
        }
    }
}

/// `replay` in `weir.yaml`: how `weir replay` shares the services with live traffic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplayConfig {
    /// Share (0 to 1] of each `requests` limit of a service (global and per tenant) that a replay
    /// may use for the tasks it re-drives; live traffic keeps the rest. Default 0.2.
    pub share: f64,
    /// Tasks per second a replay sends to a service that has no `requests` limit. Default 50.
    pub unlimited_rate: u32,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        ReplayConfig { share: 0.2, unlimited_rate: 50 }
    }
}

impl ReplayConfig {
    /// Checks the values; errors name `replay.<field>`.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !(self.share > 0.0 && self.share <= 1.0) {
            bail!("replay.share: must be above 0 and at most 1, not {}", self.share);
        }
        if self.unlimited_rate == 0 {
            bail!("replay.unlimited_rate: must be at least 1 task per second");
        }
        Ok(())
    }
}

/// Default of `limits.max_record_bytes`: under librdkafka's default `message.max.bytes`
/// (1,000,000) with room for the record's framing.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 900_000;

/// `limits` in `weir.yaml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecordLimits {
    /// Largest record weir produces (key, payload and headers): tasks, results, dead letters and
    /// redriven records. Must be below the producer's `message.max.bytes` and every topic's
    /// `max.message.bytes` (checked at start). Default 900 000.
    pub max_record_bytes: usize,
    /// Payload kept by a dead letter whose whole record would exceed `max_record_bytes`, as a
    /// prefix; the size and SHA-256 of the whole are kept in headers. Default 65 536.
    pub dead_letter_prefix_bytes: usize,
    /// Longest event `id`, `tenant`, `type` and `source`, in bytes (they become Kafka keys, HTTP
    /// headers and PostgreSQL columns). Longer ones are dead-lettered. Default 512.
    pub max_attribute_bytes: usize,
}

impl Default for RecordLimits {
    fn default() -> Self {
        RecordLimits {
            max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
            dead_letter_prefix_bytes: 64 * 1024,
            max_attribute_bytes: 512,
        }
    }
}

/// Room a dead letter needs besides its payload prefix: weir's headers, the kept original
/// headers, the key.
const DEAD_LETTER_ROOM: usize = 32 * 1024;

impl RecordLimits {
    /// Checks the values; errors name `limits.<field>`.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.max_record_bytes < 2 * DEAD_LETTER_ROOM {
            anyhow::bail!("limits.max_record_bytes: must be at least {} bytes", 2 * DEAD_LETTER_ROOM);
        }
        if self.dead_letter_prefix_bytes + DEAD_LETTER_ROOM > self.max_record_bytes {
            anyhow::bail!(
                "limits.dead_letter_prefix_bytes: {} leaves no room for a dead letter's headers in \
                 limits.max_record_bytes ({}); keep it at most {}",
                self.dead_letter_prefix_bytes,
                self.max_record_bytes,
                self.max_record_bytes - DEAD_LETTER_ROOM
            );
        }
        if !(16..=65_536).contains(&self.max_attribute_bytes) {
            anyhow::bail!("limits.max_attribute_bytes: must be between 16 and 65536, not {}", self.max_attribute_bytes);
        }
        Ok(())
    }
}

/// How much work one template may do (the `engine:` section of weir.yaml).
///
/// Templates are evaluated inline by the stage that starts a step, so an expensive one would hold
/// up every tenant behind it: exceeding a bound fails that step's run with the reason instead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Instructions one template leaf may execute per render (minijinja's fuel). A loop over a
    /// 1,000-item list with a few expressions in its body takes about 10,000.
    pub template_fuel: u64,
    /// Bytes a step input may render to, all its leaves together (as JSON).
    pub max_render_bytes: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig { template_fuel: 1_000_000, max_render_bytes: 1 << 20 }
    }
}

impl EngineConfig {
    /// Refuses values that would disable the bounds or refuse every template.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !(1_000..=1_000_000_000).contains(&self.template_fuel) {
            anyhow::bail!("engine.template_fuel: {} is outside 1000..=1000000000", self.template_fuel);
        }
        if !(1_024..=64 << 20).contains(&self.max_render_bytes) {
            anyhow::bail!("engine.max_render_bytes: {} is outside 1024..=67108864", self.max_render_bytes);
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
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

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExecutorConfig {
    /// Calls in flight at once per service in one executor process, at most (default 1024, which
    /// at 200 ms a call is ~5,000 calls/s). What bounds them first when tasks or answers are
    /// big is `max_in_flight_bytes`. `services.<name>.concurrency` overrides it per service.
    pub concurrency: usize,
    /// Memory for calls in flight, split in equal shares between the services a process runs
    /// (so a slow service cannot take the others' room): each call holds its task record's size
    /// plus its service's `max_response_bytes` (the most of an answer it reads) from before the
    /// call until its outcome is durable, and a call waits for room in its service's share
    /// before it starts. Default 256 MiB: ~4,000 calls of small tasks with the 64 KiB answer
    /// bound, ~250 with the `openai` connector's 1 MiB.
    pub max_in_flight_bytes: usize,
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
    /// What the executor remembers of tasks already called, so that a copy replayed after a crash
    /// or a rebalance is not called again (`stages::execute::completed`).
    pub completed: CompletedConfig,
    /// How tenants share the executor (`docs/executor.md`, "Fair by default").
    pub fairness: FairnessConfig,
    /// How the priorities of workflows share a service's call slots (`docs/executor.md`,
    /// "Priorities"): default `{high: 6, normal: 3, low: 1}`.
    pub priorities: PriorityWeights,
}

impl ExecutorConfig {
    /// The part of `max_in_flight_bytes` each of `services` executors of one process may hold:
    /// an equal share, so that one slow service's calls cannot take the memory the others need.
    pub fn memory_share(&self, services: usize) -> usize {
        self.max_in_flight_bytes / services.max(1)
    }
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        ExecutorConfig {
            concurrency: 1024,
            max_in_flight_bytes: 256 << 20,
            max_buffered: 2_000,
            partition_max_buffered: 500,
            tenant_max_buffered: 100,
            completed: CompletedConfig::default(),
            fairness: FairnessConfig::default(),
            priorities: PriorityWeights::default(),
        }
    }
}

/// `executor.completed` in `weir.yaml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompletedConfig {
    /// How far back the results topic is read when the executor is assigned a partition: the
    /// succeeded tasks found there are not called again. Default 10m.
    #[serde(with = "duration")]
    pub lookback: Duration,
    /// Task ids remembered per service, at most (16 bytes each); the oldest are forgotten first.
    /// The tail read takes at most this many divided by the results topic's partition count from
    /// each results partition. Default 200 000.
    pub max_tasks: usize,
}

impl Default for CompletedConfig {
    fn default() -> Self {
        CompletedConfig { lookback: Duration::from_secs(600), max_tasks: 200_000 }
    }
}

/// `executor.fairness` in `weir.yaml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FairnessConfig {
    /// Weight of a tenant, by name or by pattern (`*` matches any run of characters, e.g.
    /// `pro-*`), in the deficit round robin that hands out the executor's call slots: a tenant of
    /// weight 4 gets up to four slots for every one of a tenant of weight 1 while both wait. An
    /// exact name wins over patterns, a longer pattern over a shorter one. Default 1, from 1 to
    /// 1000.
    pub weights: BTreeMap<String, u32>,
    /// Move a tenant with `tenant_max_buffered` tasks waiting off its partition's path, to
    /// `actions.<service>.overflow`, and read it back at its share (default true). Off, such a
    /// tenant holds the shared buffers, as before this existed.
    pub overflow: bool,
    /// Tenants with metrics of their own (`weir_tenant_*{tenant}`): the most backlogged; the rest
    /// are counted as `other`, so the number of series stays bounded. Default 10, at most 100.
    pub metrics_top_tenants: usize,
}

impl Default for FairnessConfig {
    fn default() -> Self {
        FairnessConfig { weights: BTreeMap::new(), overflow: true, metrics_top_tenants: 10 }
    }
}

/// Largest weight a tenant may have: the deficit round robin hands a tenant up to its weight in
/// slots in a row, so a huge weight would be a tenant taking the whole executor.
pub const MAX_TENANT_WEIGHT: u32 = 1_000;

impl FairnessConfig {
    fn validate(&self) -> anyhow::Result<()> {
        for (pattern, weight) in &self.weights {
            if pattern.is_empty() {
                bail!("executor.fairness.weights: a tenant name or pattern must not be empty");
            }
            if !(1..=MAX_TENANT_WEIGHT).contains(weight) {
                bail!("executor.fairness.weights.{pattern:?}: must be between 1 and {MAX_TENANT_WEIGHT}, not {weight}");
            }
        }
        if self.metrics_top_tenants > 100 {
            bail!("executor.fairness.metrics_top_tenants: at most 100 (got {})", self.metrics_top_tenants);
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SinkConfig {
    /// Rows written in one transaction at most.
    pub batch_size: usize,
    /// How long a partial batch waits for more rows. Default 20ms. (Also read as `linger_ms`.)
    #[serde(with = "duration", alias = "linger_ms")]
    pub linger: Duration,
    /// PostgreSQL connections.
    pub pool_size: u32,
    /// Transactions in flight at once, each on its own connection and for its own share of the
    /// results topic's partitions (partition modulo this number), so a run's results are still
    /// written one batch at a time. At most `pool_size`.
    pub transactions: usize,
    /// How long results and runs are kept, in time partitions (`{keep: 30d, partition: 1d}`);
    /// default: kept forever, in daily partitions. See docs/operations.md.
    pub retention: RetentionConfig,
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig {
            batch_size: 2_000,
            linger: Duration::from_millis(20),
            pool_size: 4,
            transactions: 4,
            retention: RetentionConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// A stage with work waiting (lag, or messages taken and not finished) that has neither taken
    /// nor finished a message for this long is *stalled*: it logs why, `weir_stage_stalled` is 1
    /// and `/health/live` answers 503 until it moves again. Default 60s. (Also read as
    /// `stall_after_ms`.)
    #[serde(with = "duration", alias = "stall_after_ms")]
    pub stall_after: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig { stall_after: Duration::from_secs(60) }
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

    /// `WEIR_BROKERS`, `DATABASE_URL` and `WEIR_INSTANCE_ID` win over the file.
    pub fn apply_env(&mut self) {
        if let Ok(b) = std::env::var("WEIR_BROKERS") {
            self.brokers = b;
        }
        if let Ok(u) = std::env::var("DATABASE_URL") {
            self.database_url = u;
        }
        if let Ok(id) = std::env::var("WEIR_INSTANCE_ID") {
            self.instance_id = Some(id).filter(|id| !id.is_empty());
        }
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.brokers.trim().is_empty() {
            bail!("brokers: must name at least one host:port");
        }
        self.consumer_groups.validate(&self.kafka)?;
        if !self.topic_prefix.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
            bail!("topic_prefix: {:?} may only hold ASCII letters, digits, '.', '_' and '-'", self.topic_prefix);
        }
        if self.evaluator.max_inflight == 0 || self.executor.concurrency == 0 || self.executor.max_buffered == 0 {
            bail!("evaluator.max_inflight, executor.concurrency and executor.max_buffered must be at least 1");
        }
        if self.executor.partition_max_buffered == 0 || self.executor.tenant_max_buffered == 0 {
            bail!("executor.partition_max_buffered and executor.tenant_max_buffered must be at least 1");
        }
        // Each service's share of the calls' memory (all of them in one process, the worst case)
        // must hold the most one of its calls can take, or that call could never start.
        let share = self.executor.memory_share(self.services.len());
        for (name, service) in &self.services {
            let most = self.limits.max_record_bytes + service.response_limit();
            if most > share {
                bail!(
                    "executor.max_in_flight_bytes: {} bytes, shared by {} services ({share} each), cannot hold one \
                     call of service {name}, which may take up to {most} bytes (limits.max_record_bytes + \
                     services.{name}.max_response_bytes)",
                    self.executor.max_in_flight_bytes,
                    self.services.len()
                );
            }
        }
        if self.executor.completed.max_tasks == 0 {
            bail!("executor.completed.max_tasks: must be at least 1");
        }
        if let Some(id) = &self.instance_id {
            // It becomes librdkafka's group.instance.id: printable, and short enough for the broker.
            if id.is_empty() || id.len() > 200 || !id.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
                bail!(
                    "instance_id (or WEIR_INSTANCE_ID): {id:?} must be 1 to 200 ASCII letters, digits, '.', '_' or '-'"
                );
            }
        }
        self.executor.fairness.validate()?;
        self.executor.priorities.validate()?;
        if self.health.stall_after < Duration::from_millis(100) {
            bail!("health.stall_after: must be at least 100ms (got {:?})", self.health.stall_after);
        }
        if self.sink.batch_size == 0 || self.sink.pool_size == 0 {
            bail!("sink.batch_size and sink.pool_size must be at least 1");
        }
        if self.sink.transactions == 0 || self.sink.transactions > self.sink.pool_size as usize {
            bail!("sink.transactions must be between 1 and sink.pool_size ({})", self.sink.pool_size);
        }
        self.sink.retention.validate()?;
        for (name, service) in &self.services {
            if !name.chars().all(|c| c.is_ascii_alphanumeric() || "_-".contains(c)) {
                bail!("services.{name}: a service name may only hold ASCII letters, digits, '_' and '-'");
            }
            service.validate(name)?;
        }
        self.engine.validate()?;
        self.limits.validate()?;
        self.replay.validate()?;
        self.ingest.validate(self.limits.max_attribute_bytes)?;
        Ok(())
    }

    /// The names of topics and consumer groups, under `topic_prefix`.
    pub fn names(&self) -> Names<'_> {
        Names::new(&self.topic_prefix)
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
        c.services.insert("hook".into(), ServiceConfig { url: "ftp://x".into(), ..Default::default() });
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
        assert!(service("url: http://x/\nretry: {tiers_ms: [5000, 1000]}").contains("services.ai.retry.tiers"));
        assert!(service("url: http://x/\nretry: {tiers: [1s, 1500us]}").contains("services.ai.retry.tiers"));
        // Deferred work waits in a tier even when failures are not retried.
        assert!(service("url: http://x/\nretry: {attempts: 1, tiers: []}").contains("at least one delay tier"));
        assert!(service("url: http://x/\ntimeout: 0s").contains("services.ai.timeout"));
        assert!(service("url: http://x/\nbreaker: {failure_ratio: 2}").contains("services.ai.breaker.failure_ratio"));
        assert!(service("url: http://x/\ntenant_concurrency: 0").contains("services.ai.tenant_concurrency"));
        assert!(service("url: http://x/\nmax_response_bytes: 0").contains("services.ai.max_response_bytes"));
        assert!(service("url: http://x/\nhttp: {pools: 0}").contains("services.ai.http.pools"));
        assert!(service("url: http://x/\nhttp: {max_idle_per_host: 0}").contains("services.ai.http.max_idle_per_host"));
        assert_eq!(service("url: http://x/\nhttp: {version: http2, pools: 2, idle_timeout: 5s}"), "");
        // One call of the service must fit in the calls' memory, or none could ever start.
        let executor = ExecutorConfig::default();
        assert_eq!(executor.memory_share(4), executor.max_in_flight_bytes / 4, "each service its equal share");
        assert_eq!(executor.memory_share(0), executor.max_in_flight_bytes);
        let too_big = service("url: http://x/\nmax_response_bytes: 300000000");
        assert!(too_big.contains("executor.max_in_flight_bytes") && too_big.contains("service ai"), "{too_big}");
        let err = serde_yaml_ng::from_str::<ServiceConfig>("url: http://x/\nhttp: {version: http3}").unwrap_err();
        assert!(err.to_string().contains("http3"), "{err}");
        let openai: ServiceConfig =
            serde_yaml_ng::from_str("url: http://x/\nconnector: {type: openai, model: m}").unwrap();
        assert_eq!(openai.response_limit(), MAX_RESPONSE_BYTES_OPENAI);
        assert_eq!(ServiceConfig::default().response_limit(), MAX_RESPONSE_BYTES);
        let err =
            serde_yaml_ng::from_str::<ServiceConfig>("url: http://x/\nlimits: [{requests: 1, per: day}]").unwrap_err();
        assert!(err.to_string().contains("day"), "{err}");
        assert_eq!(RetryConfig::default().tier_names(), ["1s", "10s", "1m", "10m"]);
        assert_eq!(tier_name(Duration::from_millis(1_500)), "1500ms");
    }

    #[test]
    fn fairness_weights_are_checked_at_load() {
        let load = |yaml: &str| {
            let c: Config = serde_yaml_ng::from_str(yaml).map_err(|e| e.to_string())?;
            c.validate().map_err(|e| e.to_string())
        };
        assert_eq!(load("executor: {fairness: {weights: {\"pro-*\": 4, acme: 1000}}}"), Ok(()));
        let zero = load("executor: {fairness: {weights: {\"pro-*\": 0}}}").unwrap_err();
        assert!(zero.contains("executor.fairness.weights.\"pro-*\"") && zero.contains("between 1 and 1000"), "{zero}");
        assert!(load("executor: {fairness: {weights: {\"\": 2}}}").unwrap_err().contains("must not be empty"));
        assert!(load("executor: {fairness: {metrics_top_tenants: 101}}").unwrap_err().contains("metrics_top_tenants"));
        assert!(load("executor: {fairness: {weight: {a: 2}}}").unwrap_err().contains("weight"), "unknown key");
    }

    #[test]
    fn the_repo_weir_yaml_loads_and_states_the_defaults() {
        let config = Config::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("weir.yaml")).unwrap();
        let webhook = &config.services["webhook"];
        let defaults = ServiceConfig::default();
        assert_eq!((&webhook.retry, &webhook.breaker), (&defaults.retry, &defaults.breaker));
        let executor = ExecutorConfig::default();
        assert_eq!(config.executor.partition_max_buffered, executor.partition_max_buffered);
        assert_eq!(
            (config.executor.concurrency, config.executor.max_in_flight_bytes),
            (executor.concurrency, executor.max_in_flight_bytes)
        );
        assert_eq!(webhook.http, HttpConfig::default());
        assert_eq!(config.executor.fairness, FairnessConfig::default());
        assert_eq!(config.ingest, IngestConfig::default(), "weir.yaml states the ingest defaults");
    }

    #[test]
    fn durations_read_with_units_or_as_the_old_millisecond_keys() {
        let new = "sink: {linger: 5ms}\nservices:\n  hook:\n    url: http://x/\n    timeout: 2s\n    retry: {initial_backoff: 250ms, max_backoff: 1m, tiers: [1s, 1m 30s]}\n    breaker: {window: 30s, open: 2s}\n";
        let old = "sink: {linger_ms: 5}\nservices:\n  hook:\n    url: http://x/\n    timeout_ms: 2000\n    retry: {initial_backoff_ms: 250, max_backoff_ms: 60000, tiers_ms: [1000, 90000]}\n    breaker: {window_ms: 30000, open_ms: 2000}\n";
        let (new, old): (Config, Config) =
            (serde_yaml_ng::from_str(new).unwrap(), serde_yaml_ng::from_str(old).unwrap());
        let hook = &new.services["hook"];
        assert_eq!(new.sink.linger, Duration::from_millis(5));
        assert_eq!(hook.timeout, Duration::from_secs(2));
        assert_eq!(
            (hook.retry.initial_backoff, hook.retry.max_backoff),
            (Duration::from_millis(250), Duration::from_secs(60))
        );
        assert_eq!(hook.retry.tiers, [Duration::from_secs(1), Duration::from_secs(90)]);
        assert_eq!((hook.breaker.window, hook.breaker.open), (Duration::from_secs(30), Duration::from_secs(2)));
        assert_eq!(hook.retry.tier_names(), ["1s", "90s"]);
        let yaml = |c: &Config| serde_yaml_ng::to_string(c).unwrap();
        assert_eq!(yaml(&new), yaml(&old), "both spellings are the same config");
        let err = serde_yaml_ng::from_str::<Config>("sink: {linger: 5ms, linger_ms: 5}").unwrap_err();
        assert!(err.to_string().contains("duplicate field `linger`"), "{err}");
        let err = serde_yaml_ng::from_str::<Config>("services: {hook: {url: 'http://x/', timeout: ten seconds}}")
            .unwrap_err();
        assert!(err.to_string().contains("services.hook") && err.to_string().contains("not a duration"), "{err}");
    }

    /// Tests and benchmarks write configs they built as the `weir.yaml` of a `weir` process:
    /// every field must come back as it was written, whatever its kind.
    #[test]
    fn a_serialized_config_loads_back_the_same() {
        let repo = Config::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("weir.yaml")).unwrap();
        let mut config = Config { topic_prefix: "t.".into(), metrics_addr: None, ..repo };
        config.sink.linger = Duration::from_micros(1_500);
        config.network.allow.push("10.1.0.0/16".parse().unwrap());
        config.kafka.insert("fetch.max.bytes".into(), "1048576".into());
        let service = |yaml: &str| -> ServiceConfig { serde_yaml_ng::from_str(yaml).unwrap() };
        config.services.insert(
            "ai".into(),
            service("url: http://x/\nconcurrency: 3\nlimits: [{cost: 9000, per: minute, burst: 10}, {requests: 2, per: second, scope: tenant}]\nconnector: {type: openai, model: m, api_key_env: KEY, cost_estimate: '{{ 5 }}'}\nretry: {tiers: [2s, 1h]}"),
        );
        config
            .services
            .insert("chat".into(), service("url: http://x/\nconnector: {type: slack, text: 'hi {{ tenant }}'}"));
        config.services.insert("nothing".into(), service("url: http://x/\nconnector: {type: noop}"));
        config.services.insert(
            "crm".into(),
            service("url: http://x/\nconnector: {type: webhook, method: PUT, headers: {X-A: b}, body: {k: [1, null]}, hmac_secret_env: S}"),
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weir.yaml");
        let written = serde_yaml_ng::to_string(&config).unwrap();
        std::fs::write(&path, &written).unwrap();
        let loaded = Config::load(&path).unwrap();
        assert_eq!(serde_yaml_ng::to_string(&loaded).unwrap(), written);
        assert!(written.contains("linger: 1ms 500us") && written.contains("- 1h"), "{written}");
    }

    #[test]
    fn defaults_validate() {
        Config::default().validate().unwrap();
        assert_eq!(Config { topic_prefix: "t1.".into(), ..Config::default() }.names().events(), "t1.events");
    }
}
