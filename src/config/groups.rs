//! `consumer_groups` in `weir.yaml`: how a stage's processes share its partitions, and how a
//! stopping process hands them over.

use std::time::Duration;

use anyhow::bail;
use serde::{Deserialize, Serialize};

use super::duration;

/// Which rebalance protocol a stage's consumer groups use.
///
/// - `cooperative` (the default): the classic protocol with librdkafka's `cooperative-sticky`
///   assignor: incremental (members give up only what moves, in two rounds), any broker.
/// - `consumer`: KIP-848, Kafka 4.0 and later. The broker computes assignments and
///   hands each member only what changes: a member joining or leaving moves the partitions that
///   must move, and every other partition keeps being read. The session timeout and heartbeat are
///   the broker's (`group.consumer.session.timeout.ms`, 45 s by default), not the client's.
///
///   Why it is not the default: a crash costs more under it. A crashed member's partitions move
///   only after the broker's session timeout (45 s at least, by default, against the 10 s weir
///   sets for the classic protocols), and a static member (`instance_id`) killed without a clean
///   exit is refused under its id until then (`UNRELEASED_INSTANCE_ID`), where the classic
///   protocol lets the restarted process take its place at once (docs/recovery.md). Where crashes
///   are rare and rebalances frequent, or the broker's minimum session timeout is lowered, choose
///   it.
/// - `eager`: the classic protocol with the `range,roundrobin` assignors: every change stops
///   every member of the group until it is over. Kept for comparison (`weir bench --scenario
///   scale`) and for groups that must stay on it during a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupProtocol {
    Consumer,
    Cooperative,
    Eager,
}

impl GroupProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            GroupProtocol::Consumer => "consumer",
            GroupProtocol::Cooperative => "cooperative",
            GroupProtocol::Eager => "eager",
        }
    }
}

/// `consumer_groups` in `weir.yaml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GroupsConfig {
    /// See [`GroupProtocol`]. Default `cooperative`.
    pub protocol: GroupProtocol,
    /// On SIGTERM a process stops taking records and finishes what it has in flight; whatever is
    /// still unfinished after this long is abandoned (logged; its offsets are not stored, so the
    /// partition's next owner does it again), and the process commits, leaves its groups and
    /// exits. Keep it below Kubernetes' `terminationGracePeriodSeconds`, which kills the process
    /// with SIGKILL when it runs out. Default 30s.
    #[serde(with = "duration")]
    pub drain_timeout: Duration,
}

impl Default for GroupsConfig {
    fn default() -> Self {
        GroupsConfig { protocol: GroupProtocol::Cooperative, drain_timeout: Duration::from_secs(30) }
    }
}

/// librdkafka properties the rebalance protocol decides: set in `kafka:` they would contradict
/// `consumer_groups.protocol` (and with `consumer`, librdkafka refuses to create the consumer).
const PROTOCOL_KEYS: [&str; 3] = ["group.protocol", "group.protocol.type", "partition.assignment.strategy"];

/// Client-side group timing, which the `consumer` protocol moves to the broker.
const CLASSIC_ONLY_KEYS: [&str; 2] = ["session.timeout.ms", "heartbeat.interval.ms"];

impl GroupsConfig {
    /// Checks the values against the extra librdkafka properties (`kafka:`); errors name the key.
    pub fn validate(&self, kafka: &std::collections::BTreeMap<String, String>) -> anyhow::Result<()> {
        if self.drain_timeout < Duration::from_secs(1) || self.drain_timeout > Duration::from_secs(3600) {
            bail!("consumer_groups.drain_timeout: must be between 1s and 1h, not {:?}", self.drain_timeout);
        }
        if let Some(key) = PROTOCOL_KEYS.iter().find(|k| kafka.contains_key(**k)) {
            bail!(
                "kafka.{key}: the rebalance protocol is chosen with consumer_groups.protocol \
                 (consumer, cooperative or eager); remove kafka.{key}"
            );
        }
        if self.protocol == GroupProtocol::Consumer {
            if let Some(key) = CLASSIC_ONLY_KEYS.iter().find(|k| kafka.contains_key(**k)) {
                bail!(
                    "kafka.{key}: with consumer_groups.protocol: consumer (KIP-848) the session \
                     timeout and heartbeat are the broker's (group.consumer.session.timeout.ms, \
                     group.consumer.heartbeat.interval.ms); remove kafka.{key}, or use \
                     consumer_groups.protocol: cooperative for a client-side {key}"
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<GroupsConfig, String> {
        serde_yaml_ng::from_str(yaml).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_spellings() {
        assert_eq!(parse("{}").unwrap(), GroupsConfig::default());
        let c = parse("{protocol: eager, drain_timeout: 5s}").unwrap();
        assert_eq!((c.protocol, c.drain_timeout), (GroupProtocol::Eager, Duration::from_secs(5)));
        assert!(parse("{protocol: sticky}").unwrap_err().contains("unknown variant"));
        assert!(parse("{drain: 5s}").unwrap_err().contains("unknown field"));
    }

    #[test]
    fn contradicting_kafka_properties_are_refused() {
        let kafka = |k: &str| [(k.to_string(), "1".to_string())].into_iter().collect();
        let consumer = GroupsConfig { protocol: GroupProtocol::Consumer, ..Default::default() };
        let cooperative = GroupsConfig::default();
        let err = consumer.validate(&kafka("session.timeout.ms")).unwrap_err().to_string();
        assert!(err.contains("kafka.session.timeout.ms") && err.contains("broker"), "{err}");
        assert!(cooperative.validate(&kafka("session.timeout.ms")).is_ok());
        let err = cooperative.validate(&kafka("partition.assignment.strategy")).unwrap_err().to_string();
        assert!(err.contains("consumer_groups.protocol"), "{err}");
        let short = GroupsConfig { drain_timeout: Duration::from_millis(10), ..Default::default() };
        assert!(short.validate(&Default::default()).unwrap_err().to_string().contains("drain_timeout"));
    }
}
