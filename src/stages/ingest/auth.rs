//! Who is posting: the credential a request carries decides its tenant.
//!
//! A source's credentials are per tenant (`tenants: {site-1: …}`) or one for a platform posting
//! for several tenants (`platform: {…, tenants: ["shop-*"]}`). A bearer token names its tenant by
//! itself; a signed request cannot (the signature verifies only with the right key), so it names
//! its tenant in the route (`/ingest/<source>/<tenant>`), and the route's tenant is the one whose
//! key must verify it. Either way the tenant is never read from the body alone: a body that names
//! one is checked against it by the formats.
//!
//! Signatures (all HMAC-SHA256, compared in constant time by `hmac`'s `verify_slice`):
//! - Ghost: `X-Ghost-Signature: sha256=<hex>, t=<ms>`, the MAC of the body followed by the
//!   timestamp's decimal digits, no separator (Ghost's `webhook-trigger.js`:
//!   `createHmac('sha256', secret).update(`${reqPayload}${ts}`)`, `ts = Date.now()`).
//! - Standard Webhooks, for every other format: `webhook-signature: v1,<base64>` (several,
//!   space separated, during a key rotation) of `<webhook-id>.<webhook-timestamp>.<body>`,
//!   the timestamp in seconds. A `whsec_` secret is the base64 of the key.
//!
//! The timestamp must be within `ingest.tolerance` of the clock, so a captured request cannot
//! be replayed later; within it, the `webhook-id` cache (`dedup`) keeps a replay from being
//! produced twice. Bearer tokens are kept as their SHA-256 and compared with `subtle`.

use std::collections::HashMap;

use anyhow::Context as _;
use axum::http::HeaderMap;
use base64::Engine as _;
use hmac::Mac as _;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::refusal::Refusal;
use crate::{
    config::{Credential, SourceConfig, SourceFormat},
    connectors::signature::{ghost_mac, hmac_key, standard_mac},
};

/// A credential ready to check.
enum Secret {
    /// SHA-256 of the bearer token.
    Token([u8; 32]),
    /// The HMAC key.
    Key(Vec<u8>),
}

/// A source's credentials, resolved (environment variables read, `whsec_` keys decoded) at
/// start: a bad one stops the stage with its name, never a request.
pub(super) struct SourceAuth {
    format: SourceFormat,
    tenants: HashMap<String, Secret>,
    /// The platform credential and its tenant patterns, each split at its `*`s.
    platform: Option<(Secret, Vec<Vec<String>>)>,
}

/// How the tenant of a request is known, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Class {
    Tenant,
    Platform,
}

impl Class {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Class::Tenant => "tenant",
            Class::Platform => "platform",
        }
    }
}

/// A request whose credential verified.
#[derive(Debug, Clone)]
pub(super) struct Authenticated {
    pub tenant: String,
    pub class: Class,
    /// `webhook-id` of a request signed per Standard Webhooks.
    pub webhook_id: Option<String>,
    /// The signature's timestamp, in milliseconds since the epoch.
    pub signed_at_ms: Option<i64>,
}

fn resolve(credential: &Credential, at: &str) -> anyhow::Result<Secret> {
    let from_env = |var: &str| {
        std::env::var(var)
            .ok()
            .filter(|v| !v.is_empty())
            .with_context(|| format!("{at}: environment variable {var} is not set"))
    };
    if let Some(token) = &credential.token {
        return Ok(Secret::Token(Sha256::digest(token.as_bytes()).into()));
    }
    if let Some(var) = &credential.token_env {
        return Ok(Secret::Token(Sha256::digest(from_env(var)?.as_bytes()).into()));
    }
    let secret = match (&credential.secret, &credential.secret_env) {
        (Some(s), _) => s.clone(),
        (None, Some(var)) => from_env(var)?,
        (None, None) => anyhow::bail!("{at}: no token or secret"),
    };
    Ok(Secret::Key(hmac_key(&secret).with_context(|| at.to_string())?))
}

impl SourceAuth {
    pub(super) fn new(name: &str, source: &SourceConfig) -> anyhow::Result<SourceAuth> {
        let mut tenants = HashMap::new();
        for (tenant, credential) in &source.tenants {
            tenants.insert(tenant.clone(), resolve(credential, &format!("ingest.sources.{name}.tenants.{tenant}"))?);
        }
        let platform = match &source.platform {
            Some(p) => Some((
                resolve(p, &format!("ingest.sources.{name}.platform"))?,
                p.tenants.iter().map(|t| t.split('*').map(str::to_string).collect()).collect(),
            )),
            None => None,
        };
        Ok(SourceAuth { format: source.format, tenants, platform })
    }

    /// Checks the request's credential and returns its tenant, or why it is refused.
    pub(super) fn authenticate(
        &self,
        route_tenant: Option<&str>,
        headers: &HeaderMap,
        body: &[u8],
        now_ms: i64,
        tolerance_ms: i64,
    ) -> Result<Authenticated, Refusal> {
        let bearer = bearer(headers)?;
        let (secret, tenant, class) = match route_tenant {
            Some(tenant) => match (self.tenants.get(tenant), &self.platform) {
                (Some(secret), _) => (secret, tenant.to_string(), Class::Tenant),
                (None, Some((secret, patterns)))
                    if patterns.iter().any(|p| crate::stages::execute::fair::matches(p, tenant)) =>
                {
                    (secret, tenant.to_string(), Class::Platform)
                }
                _ => return Err(Refusal::forbidden("this source has no credential for the route's tenant")),
            },
            None => {
                let Some(token) = bearer else {
                    return Err(Refusal::unauthenticated(
                        "no bearer token; a signed request names its tenant in the route: /ingest/<source>/<tenant>",
                    ));
                };
                match self.token_owner(token) {
                    Some(tenant) => return Ok(plain(tenant.to_string(), Class::Tenant)),
                    None if self.is_platform_token(token) => {
                        return Err(Refusal::invalid(
                            "a platform credential posts for one tenant per request: /ingest/<source>/<tenant>",
                        ))
                    }
                    None => return Err(Refusal::unauthenticated("the bearer token is not valid for this source")),
                }
            }
        };
        match secret {
            Secret::Token(digest) => {
                let Some(token) = bearer else {
                    return Err(Refusal::unauthenticated("missing `Authorization: Bearer <token>`"));
                };
                if bool::from(Sha256::digest(token.as_bytes()).as_slice().ct_eq(digest)) {
                    Ok(plain(tenant, class))
                } else if self.token_owner(token).is_some() || self.is_platform_token(token) {
                    Err(Refusal::forbidden("the bearer token is another tenant's"))
                } else {
                    Err(Refusal::unauthenticated("the bearer token is not valid for this source"))
                }
            }
            Secret::Key(key) => {
                let (webhook_id, signed_at_ms) = match self.format {
                    SourceFormat::Ghost => (None, verify_ghost(key, headers, body, now_ms, tolerance_ms)?),
                    _ => {
                        let (id, at) = verify_standard(key, headers, body, now_ms, tolerance_ms)?;
                        (Some(id), at)
                    }
                };
                Ok(Authenticated { tenant, class, webhook_id, signed_at_ms: Some(signed_at_ms) })
            }
        }
    }

    /// The tenant whose token `token` is, checking every tenant's in constant time each.
    fn token_owner(&self, token: &str) -> Option<&str> {
        let digest = Sha256::digest(token.as_bytes());
        let mut owner = None;
        for (tenant, secret) in &self.tenants {
            if let Secret::Token(d) = secret {
                if bool::from(digest.as_slice().ct_eq(d)) {
                    owner = Some(tenant.as_str());
                }
            }
        }
        owner
    }

    fn is_platform_token(&self, token: &str) -> bool {
        matches!(&self.platform, Some((Secret::Token(d), _))
            if bool::from(Sha256::digest(token.as_bytes()).as_slice().ct_eq(d)))
    }
}

fn plain(tenant: String, class: Class) -> Authenticated {
    Authenticated { tenant, class, webhook_id: None, signed_at_ms: None }
}

/// The bearer token of `Authorization`, if any; a malformed header is refused.
fn bearer(headers: &HeaderMap) -> Result<Option<&str>, Refusal> {
    let Some(value) = headers.get(axum::http::header::AUTHORIZATION) else { return Ok(None) };
    let text = value.to_str().map_err(|_| Refusal::unauthenticated("Authorization is not ASCII"))?;
    match text.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() => {
            Ok(Some(token.trim()))
        }
        _ => Err(Refusal::unauthenticated("Authorization must be `Bearer <token>`")),
    }
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Result<&'h str, Refusal> {
    headers
        .get(name)
        .ok_or_else(|| Refusal::unauthenticated(format!("missing header {name}")))?
        .to_str()
        .map_err(|_| Refusal::unauthenticated(format!("header {name} is not ASCII")))
}

fn check_time(at_ms: i64, now_ms: i64, tolerance_ms: i64) -> Result<(), Refusal> {
    if (now_ms - at_ms).abs() > tolerance_ms {
        return Err(Refusal::unauthenticated(format!(
            "the signature's timestamp is {}s from now, beyond the tolerance of {}s (a replay, or a clock off)",
            (now_ms - at_ms) / 1000,
            tolerance_ms / 1000
        )));
    }
    Ok(())
}

/// Verifies `X-Ghost-Signature: sha256=<hex>, t=<ms>`; returns the timestamp.
fn verify_ghost(key: &[u8], headers: &HeaderMap, body: &[u8], now_ms: i64, tolerance_ms: i64) -> Result<i64, Refusal> {
    let value = header(headers, "x-ghost-signature")?;
    let (mut signature, mut timestamp) = (None, None);
    for part in value.split(',').map(str::trim) {
        if let Some(hex) = part.strip_prefix("sha256=") {
            signature = hex::decode(hex).ok();
        } else if let Some(t) = part.strip_prefix("t=") {
            timestamp = Some(t);
        }
    }
    let (Some(signature), Some(timestamp)) = (signature, timestamp) else {
        return Err(Refusal::unauthenticated("X-Ghost-Signature must be `sha256=<hex>, t=<milliseconds>`"));
    };
    let at: i64 = timestamp.parse().map_err(|_| Refusal::unauthenticated("X-Ghost-Signature: t is not a number"))?;
    check_time(at, now_ms, tolerance_ms)?;
    ghost_mac(key, body, timestamp)
        .verify_slice(&signature)
        .map_err(|_| Refusal::unauthenticated("X-Ghost-Signature does not match"))?;
    Ok(at)
}

/// Verifies Standard Webhooks' headers; returns the `webhook-id` and the timestamp (ms).
fn verify_standard(
    key: &[u8],
    headers: &HeaderMap,
    body: &[u8],
    now_ms: i64,
    tolerance_ms: i64,
) -> Result<(String, i64), Refusal> {
    let id = header(headers, "webhook-id")?;
    let timestamp = header(headers, "webhook-timestamp")?;
    let signatures = header(headers, "webhook-signature")?;
    let secs: i64 =
        timestamp.parse().map_err(|_| Refusal::unauthenticated("webhook-timestamp is not a number of seconds"))?;
    let at = secs.saturating_mul(1000);
    check_time(at, now_ms, tolerance_ms)?;
    let mac = standard_mac(key, id, timestamp, body);
    let matches = signatures.split(' ').filter_map(|s| s.strip_prefix("v1,")).any(|b64| {
        base64::engine::general_purpose::STANDARD.decode(b64).is_ok_and(|sig| mac.clone().verify_slice(&sig).is_ok())
    });
    if !matches {
        return Err(Refusal::unauthenticated("webhook-signature does not match (no v1 signature verifies)"));
    }
    Ok((id.to_string(), at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connectors::signature;

    #[test]
    fn ghost_signatures_cover_the_body_then_the_timestamp() {
        let secret = "ghost-secret-0123456789";
        let (body, t) = (br#"{"member":{"current":{}}}"#, 1_700_000_000_000i64);
        // Computed as Ghost does, on the concatenated text.
        let mut mac = <signature::HmacSha256 as hmac::Mac>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{}{t}", std::str::from_utf8(body).unwrap()).as_bytes());
        let expected = format!("sha256={}, t={t}", hex::encode(mac.finalize().into_bytes()));
        assert_eq!(signature::ghost_header(secret, body, t), expected);
        let mut headers = HeaderMap::new();
        headers.insert("x-ghost-signature", expected.parse().unwrap());
        let key = secret.as_bytes();
        assert_eq!(verify_ghost(key, &headers, body, t + 1000, 300_000), Ok(t));
        let stale = verify_ghost(key, &headers, body, t + 301_000, 300_000).unwrap_err();
        assert!(stale.reason.contains("tolerance") && stale.status == 401, "{stale:?}");
        let tampered = verify_ghost(key, &headers, b"{}", t, 300_000).unwrap_err();
        assert!(tampered.reason.contains("does not match"), "{tampered:?}");
    }

    #[test]
    fn standard_signatures_verify_with_any_of_several_and_only_untampered() {
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let key = hmac_key(secret).unwrap();
        let (body, now) = (br#"{"type":"a"}"#, 1_700_000_000i64);
        let good = signature::standard(&key, "msg_1", now, body);
        let mut headers = HeaderMap::new();
        headers.insert("webhook-id", "msg_1".parse().unwrap());
        headers.insert("webhook-timestamp", now.to_string().parse().unwrap());
        headers.insert("webhook-signature", format!("v1,bm9wZQ== {good}").parse().unwrap());
        assert_eq!(verify_standard(&key, &headers, body, now * 1000, 300_000), Ok(("msg_1".into(), now * 1000)));
        assert_eq!(verify_standard(&key, &headers, b"{}", now * 1000, 300_000).unwrap_err().status, 401);
        headers.insert("webhook-id", "msg_2".parse().unwrap());
        assert!(verify_standard(&key, &headers, body, now * 1000, 300_000).is_err(), "the id is covered");
    }
}
