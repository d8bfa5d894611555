//! How big a record weir writes may be, and what happens to one that would be bigger.
//!
//! Kafka refuses a record in two places: the producer refuses one over its `message.max.bytes`
//! before it leaves the process (librdkafka's default: 1,000,000 bytes), and the broker refuses a
//! batch over the topic's `max.message.bytes` (default 1,048,588). An unbounded record is
//! therefore a crash waiting for its input: a 2 MB event dead-lettered whole, a template that
//! renders megabytes, a service that answers with a huge body. So every record weir writes is
//! measured *before* it is produced, against one number, `limits.max_record_bytes`, which
//! [`crate::kafka::topics::check_limits`] checks against the producer's and the topics' limits at
//! start and in `weir topics apply`:
//!
//! - a dead letter that would not fit keeps a prefix of the payload, its size and SHA-256, and its
//!   origin coordinates ([`crate::kafka::dead_letter`]); `weir dlq redrive` re-reads the original;
//! - a task over the limit is never produced: its run gets a `failed` result naming the limit;
//! - a result over the limit keeps its status, and its `output` is replaced by a marker
//!   ([`TRUNCATED`]) saying how big it was: the call happened (a retry would repeat it), only its
//!   answer is too big to carry. A later step that reads the output fails with a missing field;
//! - a record the producer or broker refuses anyway (a topic changed after start) is a
//!   record-level failure ([`is_record_error`]): it is failed or dead-lettered, never a reason for
//!   a stage to exit.

use rdkafka::{
    error::KafkaError,
    message::{Headers as _, OwnedHeaders},
    types::RDKafkaErrorCode,
};
use serde_json::{json, Value as Json};
use sha2::{Digest, Sha256};

use crate::envelope::{ActionResult, ActionTask, Status};

/// What librdkafka adds to key, value and headers when it checks `message.max.bytes` (the v2
/// record framing, ~40 bytes), rounded up.
pub(crate) const RECORD_OVERHEAD: usize = 128;

pub(crate) use crate::envelope::TRUNCATED;

/// Longest error text a result or dead letter carries: a reason is for a person to read, and an
/// error message can quote its input.
pub(crate) const MAX_REASON_CHARS: usize = 2_000;

/// `limits` in `weir.yaml`, defined with the rest of the configuration.
pub use crate::config::RecordLimits as Limits;
pub use crate::config::DEFAULT_MAX_RECORD_BYTES;

/// The size of a record as the producer counts it against `message.max.bytes`.
pub(crate) fn record_size(key: Option<&[u8]>, payload: &[u8], headers: Option<&OwnedHeaders>) -> usize {
    RECORD_OVERHEAD + key.map_or(0, <[u8]>::len) + payload.len() + headers.map_or(0, headers_size)
}

/// Serialized size of headers: name, value and two length varints each.
pub(crate) fn headers_size(headers: &OwnedHeaders) -> usize {
    headers.iter().map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len) + 10).sum::<usize>() + 5
}

/// Whether a produce error is about the record itself (too large, invalid), so that producing it
/// again would fail the same way: the record is failed or dead-lettered and the stage goes on.
/// Anything else (timeouts, a broker gone) is infrastructure and propagates.
pub(crate) fn is_record_error(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::MessageBatchTooLarge
                | RDKafkaErrorCode::InvalidMessage
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidRecord
        )
    )
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// At most [`MAX_REASON_CHARS`] of `reason`, marked when cut.
pub(crate) fn bound_reason(reason: &str) -> std::borrow::Cow<'_, str> {
    match reason.char_indices().nth(MAX_REASON_CHARS) {
        Some((cut, _)) => format!("{}… ({} bytes in all)", &reason[..cut], reason.len()).into(),
        None => reason.into(),
    }
}

/// Why a task cannot be produced: its record (key, JSON payload, content-type header) is over
/// `max`. What a run's `failed` result says.
pub(crate) fn task_too_large(size: usize, max: usize) -> String {
    format!(
        "the task's record would be {size} bytes, over the limit of {max} bytes (limits.max_record_bytes); \
         make the step's input smaller"
    )
}

/// The JSON payload of `task`, or why it may not be produced (see [`task_too_large`]).
pub(crate) fn task_payload(task: &ActionTask, max: usize) -> Result<Vec<u8>, String> {
    let payload = serde_json::to_vec(task).map_err(|e| format!("the task cannot be serialized: {e}"))?;
    let size = record_size(Some(task.tenant.as_bytes()), &payload, None) + CONTENT_HEADER;
    if size > max {
        return Err(task_too_large(size, max));
    }
    Ok(payload)
}

/// Room for the `content-type` header every weir record carries.
const CONTENT_HEADER: usize = 64;

/// The JSON payload of `result`, made to fit `max`: its error text is bounded; an oversize
/// `output` is replaced by a [`TRUNCATED`] marker (size, SHA-256, limit); if the result is still
/// too big (the run's event it carries), it becomes a `failed` result without the event, naming
/// the limit. The result is changed in place, so the caller sees what was written.
pub(crate) fn result_payload(result: &mut ActionResult, max: usize) -> Vec<u8> {
    if let Some(error) = &result.error {
        if let std::borrow::Cow::Owned(bounded) = bound_reason(error) {
            result.error = Some(bounded);
        }
    }
    let fits = |result: &ActionResult| -> Option<Vec<u8>> {
        let payload = serde_json::to_vec(result).ok()?;
        (record_size(Some(result.tenant.as_bytes()), &payload, None) + CONTENT_HEADER <= max).then_some(payload)
    };
    if let Some(payload) = fits(result) {
        return payload;
    }
    if let Some(output) = result.output.take() {
        let bytes = serde_json::to_vec(&output).unwrap_or_default();
        let marker = json!({
            "reason": format!("the output was {} bytes, over the limit of {max} bytes (limits.max_record_bytes)", bytes.len()),
            "bytes": bytes.len(),
            "sha256": sha256_hex(&bytes),
        });
        result.output = Some(Json::Object([(TRUNCATED.to_string(), marker)].into_iter().collect()));
        if let Some(payload) = fits(result) {
            return payload;
        }
    }
    // Only the run's event can still be this big: without it the run cannot go on, so the step
    // fails, saying why.
    let size = serde_json::to_vec(result).map(|p| p.len()).unwrap_or(usize::MAX);
    result.event = Json::Null;
    result.output = None;
    result.status = Status::Failed;
    result.error = Some(format!(
        "the result's record would be {size} bytes, over the limit of {max} bytes (limits.max_record_bytes)"
    ));
    serde_json::to_vec(result).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(output: Json) -> ActionResult {
        ActionResult {
            task_id: "k".into(),
            run_id: "r".into(),
            event_id: "e".into(),
            tenant: "t".into(),
            workflow_id: "w".into(),
            workflow_version: 1,
            step_id: "s".into(),
            service: "webhook".into(),
            status: Status::Succeeded,
            attempts: 1,
            latency_ms: 1.0,
            http_status: Some(200),
            cost: None,
            error: None,
            finished_at: "2026-11-23T10:00:00Z".into(),
            output: Some(output),
            event: Json::Null,
            run_at: None,
        }
    }

    #[test]
    fn an_oversize_output_is_replaced_by_a_marker_and_the_status_kept() {
        let max = 10_000;
        let mut small = result(json!({"ok": true}));
        let payload = result_payload(&mut small, max);
        assert_eq!(serde_json::from_slice::<ActionResult>(&payload).unwrap(), small);
        assert_eq!(small.output, Some(json!({"ok": true})));

        let big = "x".repeat(20_000);
        let mut r = result(json!({"body": big}));
        let payload = result_payload(&mut r, max);
        assert!(payload.len() <= max);
        let back: ActionResult = serde_json::from_slice(&payload).unwrap();
        assert_eq!(back.status, Status::Succeeded);
        let marker = &back.output.unwrap()[TRUNCATED];
        assert_eq!(marker["bytes"], 20_011);
        assert!(marker["reason"].as_str().unwrap().contains("limit of 10000 bytes"), "{marker}");
        assert_eq!(marker["sha256"].as_str().unwrap().len(), 64);
    }

    #[test]
    fn a_result_too_big_without_its_output_fails_naming_the_limit() {
        let mut r = result(Json::Null);
        r.event = json!({"data": "y".repeat(20_000)});
        let payload = result_payload(&mut r, 10_000);
        assert!(payload.len() <= 10_000);
        let back: ActionResult = serde_json::from_slice(&payload).unwrap();
        assert_eq!(back.status, Status::Failed);
        assert!(back.error.unwrap().contains("limits.max_record_bytes"));
        assert!(back.event.is_null());
    }

    #[test]
    fn a_task_over_the_limit_is_refused_naming_size_and_limit() {
        let task: ActionTask = serde_json::from_value(json!({
            "task_id": "k", "run_id": "r", "event_id": "e", "event_type": "a", "tenant": "t",
            "workflow_id": "w", "workflow_version": 1, "step_id": "s", "service": "webhook",
            "created_at": "now", "input": {"x": "z".repeat(5_000)},
        }))
        .unwrap();
        assert!(task_payload(&task, 100_000).is_ok());
        let err = task_payload(&task, 4_000).unwrap_err();
        assert!(err.contains("over the limit of 4000 bytes (limits.max_record_bytes)"), "{err}");
    }

    #[test]
    fn reasons_are_bounded_and_record_errors_told_from_outages() {
        let long = "é".repeat(5_000);
        let bounded = bound_reason(&long);
        assert!(bounded.chars().count() < 2_100 && bounded.contains("10000 bytes in all"));
        assert_eq!(bound_reason("short"), "short");
        assert!(is_record_error(&KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge)));
        assert!(!is_record_error(&KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut)));
        assert!(!is_record_error(&KafkaError::MessageProduction(RDKafkaErrorCode::AllBrokersDown)));
    }

    #[test]
    fn limits_validate() {
        Limits::default().validate().unwrap();
        let err = Limits { dead_letter_prefix_bytes: 900_000, ..Limits::default() }.validate().unwrap_err();
        assert!(err.to_string().contains("limits.dead_letter_prefix_bytes"), "{err}");
        let err = Limits { max_attribute_bytes: 0, ..Limits::default() }.validate().unwrap_err();
        assert!(err.to_string().contains("limits.max_attribute_bytes"), "{err}");
    }
}
