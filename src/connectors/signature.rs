//! HMAC-SHA256 signatures of webhooks, both ways: the webhook connector signs what it sends, the
//! ingest stage verifies what it receives with the same functions.
//!
//! - weir's original scheme (`X-Weir-Signature: sha256=<hex>` of the body, GitHub's): the body
//!   only, so a captured request can be replayed; kept for receivers built on it.
//! - Standard Webhooks (standardwebhooks.com): `webhook-signature: v1,<base64>` of
//!   `<webhook-id>.<webhook-timestamp>.<body>`, so id and time are covered and a receiver can
//!   refuse a stale or repeated delivery. A secret written `whsec_<base64>` is the base64 of
//!   the key, as the specification's libraries read it.

use anyhow::Context as _;
use base64::Engine as _;
use hmac::{Hmac, Mac};

pub(crate) type HmacSha256 = Hmac<sha2::Sha256>;

/// The HMAC key of a configured secret: `whsec_<base64>` is the base64 of its key, any other
/// secret is its own bytes.
pub(crate) fn hmac_key(secret: &str) -> anyhow::Result<Vec<u8>> {
    match secret.strip_prefix("whsec_") {
        Some(encoded) => base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .context("a whsec_ secret must be followed by base64 (Standard Webhooks)"),
        None => Ok(secret.as_bytes().to_vec()),
    }
}

fn mac(key: &[u8]) -> HmacSha256 {
    HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length")
}

/// `sha256=<hex>` of the HMAC-SHA256 of `body` keyed with `key`, as in `X-Weir-Signature`.
pub(crate) fn weir(key: &[u8], body: &[u8]) -> String {
    let mut mac = mac(key);
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The MAC of a Standard Webhooks delivery before it is finished: to sign or to verify.
pub(crate) fn standard_mac(key: &[u8], id: &str, timestamp: &str, body: &[u8]) -> HmacSha256 {
    let mut mac = mac(key);
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// `v1,<base64>`: the Standard Webhooks signature of `body` sent as `id` at `timestamp`.
pub(crate) fn standard(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mac = standard_mac(key, id, &timestamp.to_string(), body);
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
}

/// The MAC of a Ghost webhook: the body followed by the timestamp's digits (Ghost's
/// `webhook-trigger.js`: `createHmac('sha256', secret).update(`${reqPayload}${ts}`)`).
pub(crate) fn ghost_mac(key: &[u8], body: &[u8], timestamp: &str) -> HmacSha256 {
    let mut mac = mac(key);
    mac.update(body);
    mac.update(timestamp.as_bytes());
    mac
}

/// `sha256=<hex>, t=<ms>`: a Ghost `X-Ghost-Signature` (for tests, the demo and the benchmark,
/// which play Ghost).
pub fn ghost_header(secret: &str, body: &[u8], timestamp_ms: i64) -> String {
    let t = timestamp_ms.to_string();
    let mac = ghost_mac(secret.as_bytes(), body, &t);
    format!("sha256={}, t={t}", hex::encode(mac.finalize().into_bytes()))
}

/// The three Standard Webhooks headers of a delivery signed with `secret` now: for senders
/// outside the connector (tests, the demo and the benchmark).
pub fn standard_headers(secret: &str, id: &str, body: &[u8]) -> anyhow::Result<[(&'static str, String); 3]> {
    let now = chrono::Utc::now().timestamp();
    Ok([
        ("webhook-id", id.to_string()),
        ("webhook-timestamp", now.to_string()),
        ("webhook-signature", standard(&hmac_key(secret)?, id, now, body)),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weir_signatures_are_hmac_sha256_in_hex() {
        // RFC 4231, test case 2.
        assert_eq!(
            weir(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn standard_signatures_reproduce_the_specification_vector() {
        // The vector of the Standard Webhooks reference libraries.
        let key = hmac_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            standard(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, br#"{"test": 2432232314}"#),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        assert!(hmac_key("whsec_not base64!").is_err());
        assert_eq!(hmac_key("plain").unwrap(), b"plain");
    }
}
