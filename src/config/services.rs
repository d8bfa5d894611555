//! `services:` and `network:` of `weir.yaml`: the external services the executor calls, how it
//! calls each one (its connector's settings), and which addresses it may call. This is data
//! only; `connectors` builds the clients from it, compiles its templates and checks its
//! URLs against the network policy (`connectors::validate_all`, run wherever a config is loaded
//! for use).

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use anyhow::{bail, Context};
use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use super::duration;

/// An external service the executor calls. Every field but `url` has a default; see
/// `docs/executor.md` for how throttling, retries and the breaker work together.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceConfig {
    /// The service's endpoint. The default webhook connector POSTs each task here as JSON, with
    /// the task id as `Idempotency-Key`; `connector` says otherwise.
    pub url: String,
    /// Per-call timeout. Default 10s. (`timeout_ms`, in milliseconds, is read too.)
    #[serde(with = "duration", alias = "timeout_ms")]
    pub timeout: Duration,
    /// How calls are made: `type: webhook` (the default), `slack`, `openai` or `noop`.
    #[serde(default)]
    pub connector: ConnectorConfig,
    /// Calls in flight at once for this service in one process; default `executor.concurrency`.
    /// Every call also holds its share of `executor.max_in_flight_bytes` (its request plus
    /// `max_response_bytes`), which bounds them first when answers may be big.
    pub concurrency: Option<usize>,
    /// The most of an answer's body a call reads; the rest is not read. A 2xx answer over it is
    /// still a success (the service acted), its output a `weir.truncated` marker instead of the
    /// body. Default 64 KiB, or 1 MiB for the `openai` connector (long completions).
    pub max_response_bytes: Option<usize>,
    /// How the HTTP client talks to the service: protocol version and connection pool.
    pub http: HttpConfig,
    /// Calls in flight at once for one tenant, of different order keys (default 8). A tenant's
    /// calls with the same order key (its workflow's `order_by`: by default the event's
    /// subject, else the tenant) are always made one at a time, in event order; 1 makes all of
    /// a tenant's calls wait for each other.
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
            timeout: Duration::from_secs(10),
            concurrency: None,
            max_response_bytes: None,
            http: HttpConfig::default(),
            tenant_concurrency: 8,
            limits: Vec::new(),
            retry: RetryConfig::default(),
            breaker: BreakerConfig::default(),
            connector: Default::default(),
        }
    }
}

/// `services.<name>.http`: the HTTP client of one service. Each service has a client, and so a
/// connection pool, of its own, sized here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// `auto` (default): HTTP/2 where an `https` service offers it (ALPN), else HTTP/1.1;
    /// `http2`: HTTP/2 only, also over plain `http` (prior knowledge, h2c), for services known
    /// to speak it: all calls share a few connections, each carrying many at once; `http1`:
    /// HTTP/1.1 only, one call per connection at a time.
    pub version: HttpVersion,
    /// Idle connections kept per host for the next calls. Default: every connection the
    /// service's calls opened, so at most its calls in flight (HTTP/1.1 needs a connection per
    /// call in flight; HTTP/2 carries many calls on one); set it lower to give connections back
    /// sooner after a burst.
    pub max_idle_per_host: Option<usize>,
    /// How long an idle connection is kept. Default 90s.
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    /// Connection pools the service's calls are spread over, round robin (default 8). Over
    /// HTTP/2 a pool holds one connection per host, which carries as many calls at once as the
    /// server allows (`SETTINGS_MAX_CONCURRENT_STREAMS`, usually 100 to 250) and makes the rest
    /// wait: 8 carry ~1,000 to 2,000. Over HTTP/1.1 it changes nothing but how the connections
    /// are grouped.
    pub pools: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            version: HttpVersion::Auto,
            max_idle_per_host: None,
            idle_timeout: Duration::from_secs(90),
            pools: 8,
        }
    }
}

/// The HTTP version a service is called with: see [`HttpConfig::version`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpVersion {
    #[default]
    Auto,
    Http1,
    Http2,
}

/// One rate limit: `requests` or `cost` (e.g. tokens) per `per`, for the whole service or for
/// each tenant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    /// Calls allowed per `per`. Exactly one of `requests` and `cost` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<u32>,
    /// Cost units (what the connector estimates and the service reports, e.g. tokens) per `per`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

impl LimitConfig {
    /// The limit per window, whichever unit.
    pub fn amount(&self) -> u32 {
        self.requests.or(self.cost).unwrap_or(0)
    }

    pub(crate) fn is_cost(&self) -> bool {
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    #[default]
    Global,
    Tenant,
}

/// Retries of retryable failures (timeouts, connection errors, 429, 5xx) through delay topics
/// `actions.<service>.retry.<tier>`, so the main partition never waits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Calls per task at most, the first included; after the last the task is dead-lettered.
    /// Default 5; 1 turns retries off.
    pub attempts: u32,
    /// Backoff before the second attempt. Default 1s. (Also read as `initial_backoff_ms`.)
    #[serde(with = "duration", alias = "initial_backoff_ms")]
    pub initial_backoff: Duration,
    /// Each further backoff is this many times the previous one. Default 2.
    pub multiplier: f64,
    /// Longest backoff. Default 10m. (Also read as `max_backoff_ms`.)
    #[serde(with = "duration", alias = "max_backoff_ms")]
    pub max_backoff: Duration,
    /// Random share taken off each backoff (0 to 1), so tasks that failed together do not
    /// return together. Default 0.2.
    pub jitter: f64,
    /// Delays of the delay topics, ascending. A retry goes to the shortest tier whose delay covers
    /// its backoff (and the service's Retry-After). Each needs a topic
    /// `actions.<service>.retry.<tier>`, which `weir topics apply` derives from
    /// `actions.<service>` when not declared. Default 1s, 10s, 1m, 10m; at least one, even without
    /// retries, since deferred work (runs over a workflow's limit) waits there too. (Also read as
    /// `tiers_ms`, a list of milliseconds.)
    #[serde(with = "duration::list", alias = "tiers_ms")]
    pub tiers: Vec<Duration>,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            attempts: 5,
            initial_backoff: Duration::from_secs(1),
            multiplier: 2.0,
            max_backoff: Duration::from_secs(600),
            jitter: 0.2,
            tiers: [1, 10, 60, 600].map(Duration::from_secs).to_vec(),
        }
    }
}

impl RetryConfig {
    /// The delay topics' suffixes (`1s`, `10s`, `1m`, …), in the order of `tiers`.
    pub(crate) fn tier_names(&self) -> Vec<String> {
        self.tiers.iter().map(|tier| tier_name(*tier)).collect()
    }
}

/// A tier's topic suffix: its delay in the largest whole unit. (Not humantime's `1m 30s`: a
/// topic name has no spaces, and these names are fixed by topics already created.)
pub(crate) fn tier_name(delay: Duration) -> String {
    match delay.as_millis() {
        ms if ms > 0 && ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms > 0 && ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms > 0 && ms % 1_000 == 0 => format!("{}s", ms / 1_000),
        ms => format!("{ms}ms"),
    }
}

/// A circuit breaker per service and process: when too many recent calls failed, calls stop for
/// `open` (tasks wait; they neither fail nor use up attempts), then a few probes decide.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Default true.
    pub enabled: bool,
    /// Share of failed calls (retryable failures; permanent ones are the caller's fault) in the
    /// window that opens the breaker. Default 0.5.
    pub failure_ratio: f64,
    /// The window of recent calls. Default 10s. (Also read as `window_ms`.)
    #[serde(with = "duration", alias = "window_ms")]
    pub window: Duration,
    /// Calls in the window before the ratio counts. Default 20.
    pub min_calls: u32,
    /// How long the breaker stays open before probing. Default 5s. (Also read as `open_ms`.)
    #[serde(with = "duration", alias = "open_ms")]
    pub open: Duration,
    /// Probe calls at once while half-open; one success closes the breaker, one failure opens it
    /// again. Default 1.
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            enabled: true,
            failure_ratio: 0.5,
            window: Duration::from_secs(10),
            min_calls: 20,
            open: Duration::from_secs(5),
            half_open_probes: 1,
        }
    }
}

/// `max_response_bytes` when the service does not set it.
pub const MAX_RESPONSE_BYTES: usize = 64 << 10;
/// The same for the `openai` connector, whose completions can be long.
pub const MAX_RESPONSE_BYTES_OPENAI: usize = 1 << 20;

impl ServiceConfig {
    /// The most of an answer's body a call reads (see [`ServiceConfig::max_response_bytes`]).
    pub fn response_limit(&self) -> usize {
        self.max_response_bytes.unwrap_or(match self.connector {
            ConnectorConfig::OpenAi(_) => MAX_RESPONSE_BYTES_OPENAI,
            _ => MAX_RESPONSE_BYTES,
        })
    }

    /// Checks the values; errors name `services.<name>.<field>`.
    pub(super) fn validate(&self, name: &str) -> anyhow::Result<()> {
        let url = reqwest::Url::parse(&self.url).with_context(|| format!("services.{name}.url: {:?}", self.url))?;
        if !matches!(url.scheme(), "http" | "https") {
            bail!("services.{name}.url: scheme must be http or https, not {}", url.scheme());
        }
        if self.timeout.is_zero() {
            bail!("services.{name}.timeout: must be above 0");
        }
        if self.concurrency == Some(0) {
            bail!("services.{name}.concurrency: must be at least 1");
        }
        if self.tenant_concurrency == 0 {
            bail!("services.{name}.tenant_concurrency: must be at least 1");
        }
        if self.max_response_bytes == Some(0) {
            bail!("services.{name}.max_response_bytes: must be at least 1");
        }
        if !(1..=256).contains(&self.http.pools) {
            bail!("services.{name}.http.pools: must be between 1 and 256");
        }
        if self.http.max_idle_per_host == Some(0) {
            bail!("services.{name}.http.max_idle_per_host: must be at least 1 (or absent: the concurrency)");
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
        if r.initial_backoff.is_zero() || r.max_backoff < r.initial_backoff {
            bail!("services.{name}.retry.initial_backoff: must be above 0 and at most max_backoff");
        }
        if !(r.multiplier >= 1.0 && r.multiplier.is_finite()) {
            bail!("services.{name}.retry.multiplier: must be at least 1");
        }
        if !(0.0..=1.0).contains(&r.jitter) {
            bail!("services.{name}.retry.jitter: must be between 0 and 1");
        }
        // Even without retries: work over a limit (a workflow's runs_per_minute, a tenant's own
        // limit) waits in a delay tier, never in a stage, so there must be one to wait in.
        if r.tiers.is_empty() {
            bail!(
                "services.{name}.retry.tiers: at least one delay tier is needed, even with attempts: 1: \
                 retries and deferrals (runs over a workflow's limits.runs_per_minute, tasks of a tenant over \
                 its own limit) wait there"
            );
        }
        // A tier names its delay topic, in whole milliseconds at the finest (see `tier_name`).
        if r.tiers.iter().any(|t| t.is_zero() || t.subsec_nanos() % 1_000_000 != 0)
            || !r.tiers.windows(2).all(|w| w[0] < w[1])
        {
            bail!("services.{name}.retry.tiers: delays must be whole milliseconds above 0, strictly ascending");
        }
        let b = &self.breaker;
        if !(b.failure_ratio > 0.0 && b.failure_ratio <= 1.0) {
            bail!("services.{name}.breaker.failure_ratio: must be above 0 and at most 1");
        }
        if b.window.is_zero() || b.open.is_zero() || b.min_calls == 0 || b.half_open_probes == 0 {
            bail!("services.{name}.breaker: window, open, min_calls and half_open_probes must be above 0");
        }
        Ok(())
    }
}

/// `services.<name>.connector`: which kind of service it is and how to call it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum ConnectorConfig {
    #[serde(rename = "webhook")]
    Webhook(WebhookConfig),
    #[serde(rename = "slack")]
    Slack(SlackConfig),
    #[serde(rename = "openai")]
    OpenAi(OpenAiConfig),
    #[serde(rename = "noop")]
    Noop(NoopConfig),
}

impl Default for ConnectorConfig {
    fn default() -> Self {
        ConnectorConfig::Webhook(WebhookConfig::default())
    }
}

/// `connector:` of `type: webhook`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// HTTP method.
    pub method: String,
    /// Extra request headers; values are minijinja templates over the task.
    pub headers: BTreeMap<String, String>,
    /// The body: a template (any YAML value whose strings may be templates, as a step input).
    /// Rendering to a string sends that text (`text/plain` unless `headers` set a Content-Type);
    /// to anything else, its JSON. Default: the task as JSON (GET and HEAD: no body).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
    /// Name of the environment variable holding the HMAC-SHA256 secret; when set, every request
    /// is signed as `signature` says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hmac_secret_env: Option<String>,
    /// How requests are signed: `weir` (default: `X-Weir-Signature` of the body, with
    /// `X-Weir-Timestamp`) or `standard_webhooks` (`webhook-id` = the task id, the same on every
    /// retry; `webhook-timestamp`; `webhook-signature` covering id, timestamp and body, so the
    /// receiver can refuse replays). A `whsec_<base64>` secret is the base64 of its key.
    pub signature: SignatureScheme,
}

/// `connector.signature` of a webhook.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SignatureScheme {
    #[default]
    Weir,
    StandardWebhooks,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            method: "POST".into(),
            headers: BTreeMap::new(),
            body: None,
            hmac_secret_env: None,
            signature: SignatureScheme::Weir,
        }
    }
}

/// `connector:` of `type: slack`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SlackConfig {
    /// The message: a minijinja template over the task.
    pub text: String,
}

impl Default for SlackConfig {
    fn default() -> Self {
        SlackConfig { text: "{{ input.text }}".into() }
    }
}

/// `connector:` of `type: openai`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiConfig {
    /// Model sent with every request, unless the input names one.
    pub model: String,
    /// Environment variable holding the API key, sent as `Authorization: Bearer <key>`; none
    /// sends no key (local servers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// `max_tokens` of requests whose input sets none; also the completion part of the estimate.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u64,
    /// A minijinja template over the task giving the estimated cost in tokens, replacing the
    /// default estimate (prompt characters ÷ 4 + max_tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_estimate: Option<String>,
}

fn default_max_tokens() -> u64 {
    256
}

/// `connector:` of `type: noop`; it takes no settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoopConfig {}

/// `network:` in `weir.yaml`: the SSRF guard's settings (the guard is
/// `connectors::network`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkPolicy {
    /// Refused ranges that connectors may call anyway, as CIDRs (`10.1.0.0/16`) or single
    /// addresses (`127.0.0.1`, meaning `/32`). Public addresses need no entry.
    #[serde(deserialize_with = "cidrs", serialize_with = "write_cidrs")]
    pub allow: Vec<IpNet>,
}

/// `allow:` entries: CIDRs or single addresses.
fn cidrs<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<IpNet>, D::Error> {
    Ok(Vec::<Entry>::deserialize(deserializer)?.into_iter().map(|e| e.0).collect())
}

fn write_cidrs<S: Serializer>(allow: &[IpNet], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(allow.iter().map(|net| net.to_string()))
}

/// One `allow:` entry, parsed as an element so the error carries its path (`network.allow`).
struct Entry(IpNet);

impl<'de> Deserialize<'de> for Entry {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let entry = String::deserialize(deserializer)?;
        let entry = entry.trim();
        entry.parse::<IpNet>().or_else(|_| entry.parse::<IpAddr>().map(IpNet::from)).map(Entry).map_err(|_| {
            serde::de::Error::custom(format!(
                "{entry:?} is not a CIDR range or an address (e.g. 10.1.0.0/16, 127.0.0.1, fd00::/8)"
            ))
        })
    }
}
