//! What a `weir run` process's log says about the partitions it owns.
//!
//! Every assignment and revocation a group member goes through is logged once, as the `rebalance`
//! line of [`crate::telemetry::Event::Rebalanced`] (`topic="…" kind="assign"|"revoke"
//! partitions="0,3,5"`); with an incremental protocol only the partitions that moved. Replaying
//! those lines in order gives what a process owns now, without asking the broker, which describes
//! a KIP-848 group and a classic one through different APIs. The scale bench (which partitions
//! moved in a phase) and the scale tests (whether a group has settled, where a dead member's
//! partitions went) read a child's log this way.

use std::collections::BTreeSet;

/// `log` without terminal colour codes (a child logging to a terminal-less file may still emit
/// them, depending on how it was started).
pub fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A `key="value"` field of a log line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {key}=\""))? + key.len() + 3;
    let len = line[start..].find('"')?;
    Some(&line[start..start + len])
}

/// The rebalance lines of `log`, in order.
fn lines(log: &str) -> impl Iterator<Item = &str> {
    log.lines().filter(|l| l.contains(" rebalance "))
}

/// How many rebalance lines `log` holds (any topic): what a member that saw no rebalance did not
/// add to.
pub fn count(log: &str) -> usize {
    lines(&plain(log)).count()
}

/// The rebalances `log` records for `topic`, in order: whether each was an assignment (else a
/// revocation), and of which partitions.
pub fn of_topic(log: &str, topic: &str) -> Vec<(bool, BTreeSet<i32>)> {
    lines(&plain(log))
        .filter(|l| field(l, "topic") == Some(topic))
        .map(|l| {
            let partitions = field(l, "partitions").unwrap_or("").split(',').filter_map(|p| p.parse().ok()).collect();
            (field(l, "kind") == Some("assign"), partitions)
        })
        .collect()
}

/// The partitions of `topic` the process that wrote `log` owns, as of its last line.
pub fn owned(log: &str, topic: &str) -> BTreeSet<i32> {
    let mut owned = BTreeSet::new();
    for (assign, partitions) in of_topic(log, topic) {
        if assign {
            owned.extend(partitions);
        } else {
            owned.retain(|p| !partitions.contains(p));
        }
    }
    owned
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignments_and_revocations_replay_to_what_is_owned() {
        let log = "\
2026-12-07T18:00:00Z  INFO weir::telemetry: rebalance stage=\"execute\" topic=\"a\" kind=\"assign\" partitions=\"0,1,2,3\"
2026-12-07T18:00:01Z  INFO weir::telemetry: rebalance stage=\"evaluate\" topic=\"e\" kind=\"assign\" partitions=\"0\"
2026-12-07T18:00:02Z  INFO weir::telemetry: \u{1b}[3mrebalance\u{1b}[0m stage=\"execute\" topic=\"a\" kind=\"revoke\" partitions=\"1,3\"
2026-12-07T18:00:03Z  INFO weir::stages: 120 calls
";
        assert_eq!(owned(log, "a"), BTreeSet::from([0, 2]));
        assert_eq!(owned(log, "e"), BTreeSet::from([0]));
        assert!(owned(log, "x").is_empty());
        assert_eq!(count(log), 3);
        assert_eq!(of_topic(log, "a").len(), 2);
    }
}
