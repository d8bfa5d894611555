//! The dead-letter topic: where a record goes when it can never be processed (undecodable, too
//! large, invalid), so that one bad record neither stops its partition nor disappears.
//!
//! The original key, payload and headers are kept as they were; weir adds headers saying why and
//! where from, so the record can be inspected and, once the cause is fixed, redriven:
//!
//! | header | value |
//! |---|---|
//! | `weir.error.reason` | human-readable reason |
//! | `weir.error.stage` | stage that gave up (`evaluate`, `execute`, `sink`) |
//! | `weir.error.time` | RFC 3339 time of the decision |
//! | `weir.origin.topic` / `.partition` / `.offset` | where the record was read |
//! | `weir.error.attempts` / `weir.error.first-failure` | for action tasks: calls made, and when the first failed |
//!
//! A dead letter is bounded like every record weir writes ([`crate::kafka::limits`]): a record
//! too big to be a dead letter whole (a 2 MB event, say, which is *why* it is dead-lettered) keeps
//! a prefix of its payload and says so:
//!
//! | header | value |
//! |---|---|
//! | `weir.truncated.payload-size` | the whole payload's size in bytes |
//! | `weir.truncated.payload-sha256` | the whole payload's SHA-256, hex |
//! | `weir.truncated.payload-kept` | bytes of the payload kept, from its start |
//! | `weir.truncated.headers-dropped` | original headers left out for room (when any were) |
//!
//! The original stays at its origin coordinates for as long as that topic retains it, so
//! `weir dlq redrive` re-reads it from there (checking the SHA-256) instead of sending the prefix.

use rdkafka::{
    message::{Header, Headers as _, OwnedHeaders, OwnedMessage},
    producer::FutureProducer,
    Message,
};

use crate::{
    kafka::{
        self,
        limits::{self, Limits},
    },
    telemetry::{Event, Stage},
};

pub const REASON: &str = "weir.error.reason";
pub const STAGE: &str = "weir.error.stage";
pub const TIME: &str = "weir.error.time";
pub const ORIGIN_TOPIC: &str = "weir.origin.topic";
pub const ORIGIN_PARTITION: &str = "weir.origin.partition";
pub const ORIGIN_OFFSET: &str = "weir.origin.offset";
pub const ATTEMPTS: &str = "weir.error.attempts";
pub const FIRST_FAILURE: &str = "weir.error.first-failure";
pub const PAYLOAD_SIZE: &str = "weir.truncated.payload-size";
pub const PAYLOAD_SHA256: &str = "weir.truncated.payload-sha256";
pub const PAYLOAD_KEPT: &str = "weir.truncated.payload-kept";
pub const HEADERS_DROPPED: &str = "weir.truncated.headers-dropped";

/// Longest key a truncated dead letter keeps (keys are tenants, bounded far below this at the
/// boundary; a foreign record's key may be anything).
const MAX_KEY: usize = 1024;
/// Room for the original headers a truncated dead letter keeps, in order, until it is used up.
const MAX_KEPT_HEADERS: usize = 16 * 1024;

#[derive(Clone)]
pub struct DeadLetters {
    producer: FutureProducer,
    topic: String,
    stage: Stage,
    max_record_bytes: usize,
    prefix_bytes: usize,
}

impl DeadLetters {
    /// Dead letters bounded by the default [`Limits`]; [`with_limits`](Self::with_limits) sets
    /// the configured ones.
    pub fn new(producer: FutureProducer, topic: String, stage: Stage) -> Self {
        let defaults = Limits::default();
        DeadLetters {
            producer,
            topic,
            stage,
            max_record_bytes: defaults.max_record_bytes,
            prefix_bytes: defaults.dead_letter_prefix_bytes,
        }
    }

    pub fn with_limits(self, limits: &Limits) -> Self {
        DeadLetters { max_record_bytes: limits.max_record_bytes, prefix_bytes: limits.dead_letter_prefix_bytes, ..self }
    }

    /// Sends `message` with `reason`; resolves once the dead letter is acknowledged, after which
    /// the original's offset may be committed.
    pub async fn send(&self, message: &OwnedMessage, reason: &str) -> Result<(), rdkafka::error::KafkaError> {
        self.send_with(message, reason, &[]).await
    }

    /// [`send`](Self::send) with more headers (e.g. [`ATTEMPTS`], [`FIRST_FAILURE`]).
    pub async fn send_with(
        &self,
        message: &OwnedMessage,
        reason: &str,
        extra: &[(&str, &str)],
    ) -> Result<(), rdkafka::error::KafkaError> {
        let reason = limits::bound_reason(reason);
        let (partition, offset, time) =
            (message.partition().to_string(), message.offset().to_string(), chrono::Utc::now().to_rfc3339());
        let added: Vec<(&str, &str)> = [
            (REASON, &*reason),
            (STAGE, self.stage.as_str()),
            (TIME, time.as_str()),
            (ORIGIN_TOPIC, message.topic()),
            (ORIGIN_PARTITION, partition.as_str()),
            (ORIGIN_OFFSET, offset.as_str()),
        ]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
        let letter = bound(message, &added, self.max_record_bytes, self.prefix_bytes);
        let sent = kafka::send(&self.producer, &self.topic, letter.key, letter.payload, letter.headers).await;
        match sent {
            Ok(_) => {}
            // Refused anyway (the dead-letter topic's limit is below ours): the reason and the
            // origin, which is enough to find the record and redrive it, fit any topic.
            Err(e) if limits::is_record_error(&e) => {
                let bare = bound(message, &added, 0, 0);
                kafka::send(&self.producer, &self.topic, bare.key, bare.payload, bare.headers).await?;
            }
            Err(e) => return Err(e),
        }
        Event::DeadLettered {
            stage: self.stage,
            reason: &reason,
            topic: message.topic(),
            partition: message.partition(),
            offset: message.offset(),
        }
        .emit();
        Ok(())
    }
}

/// A dead letter as it is produced.
pub struct Letter<'a> {
    pub key: Option<&'a [u8]>,
    pub payload: &'a [u8],
    pub headers: OwnedHeaders,
}

/// The dead letter of `message`: the original key, payload and headers plus `added`, if that fits
/// `max_record_bytes`; otherwise weir's headers, the truncation headers, as many original headers
/// as [`MAX_KEPT_HEADERS`] holds, and a prefix of the payload of at most `prefix_bytes` (and of
/// what room is left).
pub fn bound<'a>(
    message: &'a OwnedMessage,
    added: &[(&str, &str)],
    max_record_bytes: usize,
    prefix_bytes: usize,
) -> Letter<'a> {
    let (key, payload) = (message.key(), message.payload().unwrap_or_default());
    let headers = kafka::rewrite_headers(message, |_| false, added);
    if limits::record_size(key, payload, Some(&headers)) <= max_record_bytes {
        return Letter { key, payload, headers };
    }
    let key = key.map(|k| &k[..k.len().min(MAX_KEY)]);
    let mut headers = OwnedHeaders::new();
    let (mut room, mut dropped) = (MAX_KEPT_HEADERS, 0usize);
    for h in message.headers().into_iter().flat_map(|hs| hs.iter()) {
        let size = h.key.len() + h.value.map_or(0, <[u8]>::len) + 10;
        if size <= room && max_record_bytes > 0 {
            room -= size;
            headers = headers.insert(h);
        } else {
            dropped += 1;
        }
    }
    for (name, value) in added {
        headers = headers.insert(Header { key: name, value: Some(*value) });
    }
    let (size, sha) = (payload.len().to_string(), limits::sha256_hex(payload));
    headers = headers
        .insert(Header { key: PAYLOAD_SIZE, value: Some(&size) })
        .insert(Header { key: PAYLOAD_SHA256, value: Some(&sha) });
    if dropped > 0 {
        headers = headers.insert(Header { key: HEADERS_DROPPED, value: Some(&dropped.to_string()) });
    }
    // The kept-bytes header's own size is known before its value: at most 20 digits.
    let used = limits::record_size(key, &[], Some(&headers)) + PAYLOAD_KEPT.len() + 30;
    let kept = payload.len().min(prefix_bytes).min(max_record_bytes.saturating_sub(used));
    headers = headers.insert(Header { key: PAYLOAD_KEPT, value: Some(&kept.to_string()) });
    Letter { key, payload: &payload[..kept], headers }
}

#[cfg(test)]
mod tests {
    use rdkafka::Timestamp;

    use super::*;

    fn message(payload: Vec<u8>, headers: OwnedHeaders) -> OwnedMessage {
        OwnedMessage::new(
            Some(payload),
            Some(b"tenant-1".to_vec()),
            "t.events".into(),
            Timestamp::NotAvailable,
            3,
            42,
            Some(headers),
        )
    }

    fn header<'a>(l: &'a Letter, name: &str) -> Option<&'a str> {
        kafka::header(Some(&l.headers), name).and_then(|v| std::str::from_utf8(v).ok())
    }

    #[test]
    fn a_letter_that_fits_is_kept_whole() {
        let m = message(
            b"{}".to_vec(),
            OwnedHeaders::new().insert(Header { key: "content-type", value: Some("application/json") }),
        );
        let l = bound(&m, &[(REASON, "bad")], 10_000, 100);
        assert_eq!((l.payload, l.key), (&b"{}"[..], Some(&b"tenant-1"[..])));
        assert_eq!(header(&l, "content-type"), Some("application/json"));
        assert_eq!(header(&l, REASON), Some("bad"));
        assert_eq!(header(&l, PAYLOAD_SHA256), None);
    }

    #[test]
    fn an_oversize_letter_keeps_a_prefix_its_size_and_sha256() {
        let payload: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
        let big_header = "h".repeat(40_000);
        let headers = OwnedHeaders::new()
            .insert(Header { key: "content-type", value: Some("application/json") })
            .insert(Header { key: "huge", value: Some(&big_header) });
        let m = message(payload.clone(), headers);
        let l = bound(&m, &[(REASON, "too big"), (ORIGIN_OFFSET, "42")], 900_000, 65_536);
        assert_eq!(l.payload, &payload[..65_536]);
        assert!(limits::record_size(l.key, l.payload, Some(&l.headers)) <= 900_000);
        assert_eq!(header(&l, PAYLOAD_SIZE), Some("2000000"));
        assert_eq!(header(&l, PAYLOAD_KEPT), Some("65536"));
        assert_eq!(header(&l, PAYLOAD_SHA256).unwrap(), limits::sha256_hex(&payload));
        assert_eq!(header(&l, HEADERS_DROPPED), Some("1"));
        assert_eq!(header(&l, "content-type"), Some("application/json"));
        assert_eq!((header(&l, REASON), header(&l, ORIGIN_OFFSET)), (Some("too big"), Some("42")));
        // The prefix also yields to the room left under a small limit.
        let l = bound(&m, &[(REASON, "too big")], 60_000, 65_536);
        assert!(limits::record_size(l.key, l.payload, Some(&l.headers)) <= 60_000);
        assert!(l.payload.len() < 65_536 && !l.payload.is_empty());
        // The bare letter: no payload, no original headers, only weir's.
        let l = bound(&m, &[(REASON, "too big")], 0, 0);
        assert!(l.payload.is_empty() && header(&l, "content-type").is_none() && header(&l, REASON).is_some());
    }
}
