//! Delay-topic records, as every stage writes them: the header names, the due time, which tier a
//! wait goes to, and the headers of a deferral.
//!
//! A record that must wait is produced to a service's delay topic
//! (`actions.<service>.retry.<tier>`) with the time it is due in a header; the tier's consumer
//! (the executor's delay module) sends it back to the action topic when due. Two stages write
//! such records: the executor (a retryable failure, or a tenant over its own limit) and the
//! evaluator (a run over its workflow's `limits.runs_per_minute`), so what a delay record *is*
//! lives here, below both.
//!
//! Headers (kept when the record goes back, so the executor knows the history):
//!
//! | header | value |
//! |---|---|
//! | `weir.retry.kind` | `retry` or `deferral` (a deferral does not use up an attempt) |
//! | `weir.retry.due` | milliseconds since the epoch when the task may run again |
//! | `weir.retry.reason` | why a deferral waits (the evaluator's: which limit) |
//! | `weir.retry.attempt` | the attempt the task comes back for |
//! | `weir.retry.first-failure` | RFC 3339 time of the first failed call |
//! | `weir.retry.last-error` | reason of the last failed call |
//! | `weir.priority` | the priority of the task (`high`, `normal`, `low`): which action topic it goes back to (absent: normal) |

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};

use crate::{config::Priority, envelope::Format};

pub const KIND: &str = "weir.retry.kind";
pub const DUE: &str = "weir.retry.due";
pub const REASON: &str = "weir.retry.reason";
pub const ATTEMPT: &str = "weir.retry.attempt";
pub const FIRST_FAILURE: &str = "weir.retry.first-failure";
pub const LAST_ERROR: &str = "weir.retry.last-error";
/// The priority of a delayed task, naming the action topic it goes back to (see
/// [`Names::actions_at`](crate::config::Names::actions_at)). One delay topic per tier serves every
/// priority of a service: a wait is a wait, only the way back differs.
pub const PRIORITY: &str = "weir.priority";

/// The priority a delay record goes back with: its [`PRIORITY`] header, normal without one (a
/// record written before priorities existed) or with one that names none.
pub fn priority_of(message: &OwnedMessage) -> Priority {
    super::header_str(message, PRIORITY).and_then(Priority::parse).unwrap_or_default()
}

/// `weir.retry.kind` of a record that waits for a limit, not for a failure: it uses no attempt.
pub const DEFERRAL: &str = "deferral";

/// Longest `weir.retry.reason` kept, in characters: headers are bounded like everything else.
const MAX_REASON_CHARS: usize = 500;

/// Milliseconds since the epoch: due times cross processes, so they are wall-clock times.
pub fn epoch_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// Index of the shortest tier covering `wait`, else the longest.
pub fn tier_for(tiers: &[Duration], wait: Duration) -> usize {
    tiers.iter().position(|t| t.as_millis() >= wait.as_millis()).unwrap_or(tiers.len().saturating_sub(1))
}

/// The headers of a deferral due at `due` (epoch ms): `original`'s headers with any earlier
/// deferral's replaced (a task deferred again), or, for a record that had none (a task the
/// evaluator deferred before it was ever produced), a JSON content type. `reason`, when given,
/// says why it waits; `priority` which action topic it goes back to.
pub fn deferral_headers(
    original: Option<&OwnedMessage>,
    due: u64,
    reason: Option<&str>,
    priority: Priority,
) -> OwnedHeaders {
    let due = due.to_string();
    let reason: Option<String> = reason.map(|r| r.chars().take(MAX_REASON_CHARS).collect());
    let mut add = vec![(KIND, DEFERRAL), (DUE, due.as_str()), (PRIORITY, priority.as_str())];
    if let Some(reason) = &reason {
        add.push((REASON, reason));
    }
    match original {
        Some(message) => super::rewrite_headers(
            message,
            |k| k == KIND || k == DUE || k == PRIORITY || (reason.is_some() && k == REASON),
            &add,
        ),
        None => add.into_iter().fold(super::content_headers(Format::Json), |headers, (key, value)| {
            headers.insert(Header { key, value: Some(value) })
        }),
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::{message::Headers as _, Timestamp};

    use super::*;

    #[test]
    fn the_shortest_covering_tier_is_chosen() {
        let tiers = [1, 10, 60].map(Duration::from_secs);
        assert_eq!(tier_for(&tiers, Duration::from_millis(0)), 0);
        assert_eq!(tier_for(&tiers, Duration::from_millis(1_000)), 0);
        assert_eq!(tier_for(&tiers, Duration::from_millis(1_001)), 1);
        assert_eq!(tier_for(&tiers, Duration::from_secs(3_600)), 2);
    }

    fn pairs(headers: &OwnedHeaders) -> Vec<(String, String)> {
        headers
            .iter()
            .map(|h| (h.key.to_string(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned()))
            .collect()
    }

    #[test]
    fn a_deferral_replaces_an_earlier_one_and_keeps_the_rest() {
        let fresh = deferral_headers(None, 42, Some("over the limit"), Priority::High);
        assert_eq!(
            pairs(&fresh),
            [
                ("content-type".to_string(), "application/json".to_string()),
                (KIND.into(), DEFERRAL.into()),
                (DUE.into(), "42".into()),
                (PRIORITY.into(), "high".into()),
                (REASON.into(), "over the limit".into()),
            ]
        );
        let message = OwnedMessage::new(None, None, "t".into(), Timestamp::NotAvailable, 0, 0, Some(fresh));
        assert_eq!(priority_of(&message), Priority::High);
        let again = deferral_headers(Some(&message), 43, None, Priority::High);
        let again = pairs(&again);
        assert_eq!(again.iter().filter(|(k, _)| k == DUE).collect::<Vec<_>>(), [&(DUE.to_string(), "43".into())]);
        assert_eq!(again.iter().filter(|(k, _)| k == KIND || k == PRIORITY).count(), 2);
        assert!(again.contains(&(REASON.into(), "over the limit".into())), "{again:?}");
        let long = deferral_headers(None, 1, Some(&"x".repeat(10_000)), Priority::Normal);
        assert_eq!(pairs(&long)[4].1.len(), MAX_REASON_CHARS);
        let bare = OwnedMessage::new(None, None, "t".into(), Timestamp::NotAvailable, 0, 0, None);
        assert_eq!(priority_of(&bare), Priority::Normal);
    }
}
