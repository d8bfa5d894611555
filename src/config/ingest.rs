//! `ingest` in `weir.yaml`: the HTTP endpoint of `weir run --stage ingest` (docs/ingest.md).
//!
//! ```yaml
//! ingest:
//!   listen: 0.0.0.0:8088
//!   max_lag: 100000                # events the evaluator may be behind before senders get 503
//!   tenant_rate: {per_second: 200, burst: 400}
//!   sources:
//!     ghost:                       # POST /ingest/ghost/<tenant>?event=member.added
//!       format: ghost
//!       tenants:
//!         site-1: {secret_env: GHOST_SITE_1_SECRET}
//!     platform:                    # POST /ingest/platform/<tenant>, one token for many tenants
//!       format: cloudevents
//!       platform: {token_env: PLATFORM_TOKEN, tenants: ["shop-*"]}
//! ```
//!
//! Each source has its own credentials: per tenant (`tenants`), or one for a platform that posts
//! for several tenants (`platform`, limited to the tenant names or `*` patterns it lists). The
//! tenant of an event always comes from the credential or from the route the credential is valid
//! for, never from the body alone.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use anyhow::bail;
use serde::{Deserialize, Serialize};

use super::duration;

/// `ingest` in `weir.yaml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Where `weir run --stage ingest` listens. Default 127.0.0.1:8088 (port 0 picks one).
    pub listen: SocketAddr,
    /// Largest request body accepted; a larger one is answered 413. Default 1 MiB.
    pub max_body_bytes: usize,
    /// Requests handled at once (their bodies are the stage's memory): more are answered 503
    /// with `Retry-After` before their bodies are read. Default 256.
    pub max_in_flight: usize,
    /// How long a request waits for the broker to acknowledge its events (the producer's
    /// `message.timeout.ms`); past it the answer is 503. Default 10s.
    #[serde(with = "duration")]
    pub ack_timeout: Duration,
    /// Records waiting in the producer's queue at most (`queue.buffering.max.messages`); a request
    /// finding it full is answered 503. Default 10 000.
    pub max_queued: usize,
    /// Consumer lag of the evaluator on the events topic (records) over which requests are
    /// answered 503 with `Retry-After`, so senders slow down instead of piling work up; `null`
    /// turns the check off. Default 100 000.
    pub max_lag: Option<i64>,
    /// How often that lag is read. Default 1s.
    #[serde(with = "duration")]
    pub lag_interval: Duration,
    /// `Retry-After` of a 503 (whole seconds, at least 1). Default 1s.
    #[serde(with = "duration")]
    pub retry_after: Duration,
    /// How far a signature's timestamp may be from the clock, either way; a replayed
    /// `webhook-id` within it is acknowledged without being produced again. Default 5m.
    #[serde(with = "duration")]
    pub tolerance: Duration,
    /// Events per second each tenant may post (a GCRA limit); over it the answer is 429 with
    /// `Retry-After`. `null` (the default): no limit.
    pub tenant_rate: Option<TenantRate>,
    /// The sources, by name: `POST /ingest/<name>` and `POST /ingest/<name>/<tenant>`.
    pub sources: BTreeMap<String, SourceConfig>,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            listen: ([127, 0, 0, 1], 8088).into(),
            max_body_bytes: 1 << 20,
            max_in_flight: 256,
            ack_timeout: Duration::from_secs(10),
            max_queued: 10_000,
            max_lag: Some(100_000),
            lag_interval: Duration::from_secs(1),
            retry_after: Duration::from_secs(1),
            tolerance: Duration::from_secs(300),
            tenant_rate: None,
            sources: BTreeMap::new(),
        }
    }
}

/// `ingest.tenant_rate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantRate {
    pub per_second: u32,
    /// Events a tenant may post at once after a quiet time. Default `per_second`.
    #[serde(default)]
    pub burst: Option<u32>,
}

/// What a source's requests look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceFormat {
    /// The CloudEvents HTTP binding: structured, binary (`ce-*` headers) and batch mode.
    Cloudevents,
    /// Ghost's webhooks (`X-Ghost-Signature`), the event named by the route's `?event=`.
    Ghost,
    /// Standard Webhooks (`webhook-id`, `webhook-timestamp`, `webhook-signature`), body
    /// `{"type", "timestamp", "data"}`.
    StandardWebhooks,
    /// Any JSON body, mapped by the source's `generic` section.
    Generic,
}

impl SourceFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceFormat::Cloudevents => "cloudevents",
            SourceFormat::Ghost => "ghost",
            SourceFormat::StandardWebhooks => "standard_webhooks",
            SourceFormat::Generic => "generic",
        }
    }
}

/// `ingest.sources.<name>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub format: SourceFormat,
    /// Credentials per tenant: the tenant is the one whose credential the request carries.
    #[serde(default)]
    pub tenants: BTreeMap<String, Credential>,
    /// One credential for a platform posting for several tenants, each request naming its tenant
    /// in the route; valid only for the tenants listed (names or `*` patterns).
    #[serde(default)]
    pub platform: Option<Credential>,
    /// The events' `source` attribute when the format has none (Ghost, Standard Webhooks,
    /// generic). Default `/ingest/<name>/<tenant>`.
    #[serde(default)]
    pub event_source: Option<String>,
    /// How a generic source's body becomes an event (required for `format: generic`).
    #[serde(default)]
    pub generic: Option<GenericMapping>,
}

/// A bearer token or an HMAC secret, written in the file or (better) named by an environment
/// variable: exactly one of the four keys. A Standard Webhooks secret is `whsec_<base64>`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_env: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_env: Option<String>,
    /// Only for `platform`: the tenants it may post for (names or `*` patterns).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tenants: Vec<String>,
}

/// `generic` of a source of `format: generic`: JSON pointers (RFC 6901) into the body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenericMapping {
    /// The event type: a fixed name...
    #[serde(default)]
    pub event_type: Option<String>,
    /// ...or where the body holds it (e.g. `/event`).
    #[serde(default)]
    pub type_pointer: Option<String>,
    /// Where the body holds the event id; without it the id is the request's `webhook-id`, or
    /// generated.
    #[serde(default)]
    pub id_pointer: Option<String>,
    /// Where the body names its tenant, if it does: a body naming another tenant than the
    /// credential's is refused (403).
    #[serde(default)]
    pub tenant_pointer: Option<String>,
    /// The part of the body that becomes the event's data. Default: the whole body.
    #[serde(default)]
    pub data_pointer: Option<String>,
}

impl Credential {
    /// Checks that exactly one way of giving the token or secret is used; `at` names the field.
    fn validate(&self, at: &str, platform: bool) -> anyhow::Result<()> {
        let given =
            [&self.token, &self.token_env, &self.secret, &self.secret_env].iter().filter(|v| v.is_some()).count();
        if given != 1 {
            bail!("{at}: give exactly one of token, token_env, secret, secret_env (got {given})");
        }
        if let Some(value) = self.token.as_ref().or(self.secret.as_ref()) {
            if value.len() < 16 {
                bail!("{at}: a token or secret must be at least 16 characters");
            }
        }
        match (platform, self.tenants.is_empty()) {
            (true, true) => bail!("{at}.tenants: list the tenants (names or `*` patterns) the platform may post for"),
            (false, false) => bail!("{at}.tenants: only a platform credential lists tenants"),
            _ => Ok(()),
        }
    }

    pub fn is_token(&self) -> bool {
        self.token.is_some() || self.token_env.is_some()
    }
}

impl IngestConfig {
    /// Checks the values; errors name `ingest.<field>`.
    pub fn validate(&self, max_attribute_bytes: usize) -> anyhow::Result<()> {
        if self.max_body_bytes < 1_024 || self.max_in_flight == 0 || self.max_queued == 0 {
            bail!("ingest.max_body_bytes (at least 1024), ingest.max_in_flight and ingest.max_queued (at least 1)");
        }
        if self.ack_timeout < Duration::from_millis(100) || self.lag_interval < Duration::from_millis(10) {
            bail!("ingest.ack_timeout (at least 100ms) and ingest.lag_interval (at least 10ms) are too short");
        }
        if self.retry_after < Duration::from_secs(1) || self.tolerance < Duration::from_secs(1) {
            bail!("ingest.retry_after and ingest.tolerance must be at least 1s");
        }
        if self.max_lag.is_some_and(|l| l < 1) {
            bail!("ingest.max_lag: must be at least 1 (or null to turn the check off)");
        }
        if let Some(rate) = &self.tenant_rate {
            if rate.per_second == 0 || rate.burst == Some(0) {
                bail!("ingest.tenant_rate: per_second and burst must be at least 1");
            }
        }
        for (name, source) in &self.sources {
            let at = format!("ingest.sources.{name}");
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "_-".contains(c)) {
                bail!("{at}: a source name may only hold ASCII letters, digits, '_' and '-'");
            }
            if source.tenants.is_empty() && source.platform.is_none() {
                bail!("{at}: give credentials: `tenants` (per tenant) or `platform`");
            }
            for (tenant, credential) in &source.tenants {
                if tenant.trim().is_empty()
                    || tenant.len() > max_attribute_bytes
                    || tenant.chars().any(char::is_control)
                    || tenant.contains('/')
                {
                    bail!("{at}.tenants: {tenant:?} is not a valid tenant name (no '/', control characters, at most {max_attribute_bytes} bytes)");
                }
                credential.validate(&format!("{at}.tenants.{tenant}"), false)?;
            }
            if let Some(platform) = &source.platform {
                platform.validate(&format!("{at}.platform"), true)?;
            }
            let mut credentials = source.tenants.values().chain(source.platform.as_ref());
            let signed = matches!(source.format, SourceFormat::Ghost | SourceFormat::StandardWebhooks);
            if signed && credentials.any(Credential::is_token) {
                bail!(
                    "{at}: {} requests are signed: give `secret` or `secret_env`, not a token",
                    source.format.as_str()
                );
            }
            match (&source.generic, source.format) {
                (None, SourceFormat::Generic) => bail!("{at}.generic: a generic source needs its mapping"),
                (Some(_), f) if f != SourceFormat::Generic => bail!("{at}.generic: only for `format: generic`"),
                (Some(g), _) => g.validate(&format!("{at}.generic"))?,
                (None, _) => {}
            }
        }
        Ok(())
    }
}

impl GenericMapping {
    fn validate(&self, at: &str) -> anyhow::Result<()> {
        if self.event_type.is_some() == self.type_pointer.is_some() {
            bail!("{at}: give exactly one of event_type and type_pointer");
        }
        for (name, pointer) in [
            ("type_pointer", &self.type_pointer),
            ("id_pointer", &self.id_pointer),
            ("tenant_pointer", &self.tenant_pointer),
            ("data_pointer", &self.data_pointer),
        ] {
            if pointer.as_ref().is_some_and(|p| !p.is_empty() && !p.starts_with('/')) {
                bail!("{at}.{name}: a JSON pointer starts with '/' (e.g. /event/type)");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(yaml: &str) -> Result<(), String> {
        let c: IngestConfig = serde_yaml_ng::from_str(yaml).map_err(|e| e.to_string())?;
        c.validate(512).map_err(|e| format!("{e:#}"))
    }

    #[test]
    fn sources_are_checked_at_load() {
        let ok = "sources: {ghost: {format: ghost, tenants: {site-1: {secret: 0123456789abcdef}}}, \
                  ce: {format: cloudevents, platform: {token_env: T, tenants: ['shop-*']}}}";
        assert_eq!(load(ok), Ok(()));
        for (yaml, want) in [
            ("sources: {g: {format: ghost}}", "ingest.sources.g: give credentials"),
            ("sources: {g: {format: ghost, tenants: {a: {token: 0123456789abcdef}}}}", "are signed"),
            ("sources: {g: {format: cloudevents, tenants: {a: {token: short}}}}", "at least 16"),
            (
                "sources: {g: {format: cloudevents, tenants: {a: {token: 0123456789abcdef, secret_env: S}}}}",
                "exactly one",
            ),
            ("sources: {g: {format: cloudevents, platform: {token_env: T}}}", "ingest.sources.g.platform.tenants"),
            ("sources: {g: {format: generic, tenants: {a: {token_env: T}}}}", "needs its mapping"),
            (
                "sources: {g: {format: generic, tenants: {a: {token_env: T}}, generic: {type_pointer: event}}}",
                "starts with '/'",
            ),
            ("sources: {'a b': {format: cloudevents, tenants: {a: {token_env: T}}}}", "source name"),
            ("sources: {g: {format: cloudevents, tenants: {'a/b': {token_env: T}}}}", "not a valid tenant"),
            ("sources: {g: {format: webhooks, tenants: {a: {token_env: T}}}}", "unknown variant"),
            ("max_lag: 0", "ingest.max_lag"),
            ("listen: 127.0.0.1:1\nlisten_port: 3", "listen_port"),
        ] {
            let err = load(yaml).unwrap_err();
            assert!(err.contains(want), "{yaml}: {err}");
        }
    }
}
