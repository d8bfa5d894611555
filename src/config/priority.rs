//! Workflow priorities and how the executor weighs them (`executor.priorities` in `weir.yaml`).
//!
//! A workflow says how urgent its tasks are (`priority: high | normal | low`, default normal).
//! Each priority of a service has an action topic of its own (`actions.<service>` for normal,
//! `actions.<service>.high`, `actions.<service>.low`; see [`Names`](super::Names)), so a backlog
//! of low tasks in Kafka never stands in front of a high one: per-partition order holds within a
//! priority, which is all a tenant's order needs (one workflow has one priority). The executor
//! reads the three topics and hands the service's call slots to them by weight, so high goes
//! first while low still gets its share (see `stages::execute::fair`).

use std::fmt;

use anyhow::bail;
use serde::{Deserialize, Serialize};

/// How urgent a workflow's tasks are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    #[default]
    Normal,
    Low,
}

impl Priority {
    /// Every priority, most urgent first.
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }

    /// The priority named `name` (as [`as_str`](Self::as_str) spells it).
    pub fn parse(name: &str) -> Option<Priority> {
        Priority::ALL.into_iter().find(|p| p.as_str() == name)
    }

    /// Its position in [`ALL`](Self::ALL), for per-priority arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Largest weight of a priority: the executor hands a priority up to its weight in call slots in
/// a row, so a huge weight would let one priority hold every slot for a long stretch.
pub const MAX_PRIORITY_WEIGHT: u32 = 1_000;

/// `executor.priorities`: call slots per turn of each priority while several wait (deficit round
/// robin across priorities, then across tenants within one). Every weight is at least 1, so low
/// never starves: with the defaults 6:3:1, low gets at least a tenth of the calls while all three
/// have work, and everything when it is alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PriorityWeights {
    /// Default 6.
    pub high: u32,
    /// Default 3.
    pub normal: u32,
    /// Default 1.
    pub low: u32,
}

impl Default for PriorityWeights {
    fn default() -> Self {
        PriorityWeights { high: 6, normal: 3, low: 1 }
    }
}

impl PriorityWeights {
    pub fn of(&self, priority: Priority) -> u32 {
        match priority {
            Priority::High => self.high,
            Priority::Normal => self.normal,
            Priority::Low => self.low,
        }
    }

    pub(super) fn validate(&self) -> anyhow::Result<()> {
        for p in Priority::ALL {
            let weight = self.of(p);
            if !(1..=MAX_PRIORITY_WEIGHT).contains(&weight) {
                bail!(
                    "executor.priorities.{p}: must be between 1 and {MAX_PRIORITY_WEIGHT}, not {weight} \
                     (0 would starve that priority)"
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_weights_are_checked() {
        for p in Priority::ALL {
            assert_eq!(Priority::parse(p.as_str()), Some(p));
            assert_eq!(serde_json::to_value(p).unwrap(), p.as_str());
            assert_eq!(Priority::ALL[p.index()], p);
        }
        assert_eq!(Priority::parse("urgent"), None);
        assert!(PriorityWeights::default().validate().is_ok());
        let err = PriorityWeights { low: 0, ..Default::default() }.validate().unwrap_err().to_string();
        assert!(err.contains("executor.priorities.low"), "{err}");
    }
}
