//! Runs an operator cancelled, as the executor knows them: so that a step already on its action
//! topic when its run is cancelled is recorded `cancelled`, not called.
//!
//! `weir runs cancel` records the cancellation in PostgreSQL (where the record stage, advancing
//! the run, reads it) and produces it to the compacted `cancellations` topic, keyed by run id.
//! Every executor reads that topic as a table ([`Table`]) from the beginning at start and follows
//! it, keeping the cancelled run ids in memory: the check before a call is a hash look-up, not a
//! database round trip per task, and the executor keeps depending on Kafka alone. The topic is
//! compacted (one record per run) and its records are deleted after the action topics' retention,
//! when no task of the run can still be waiting, which bounds what is held here.
//!
//! A cancellation reaches a running executor within its follower's poll (milliseconds) of being
//! produced; a step whose call has already started when it arrives runs to its end.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use serde::{Deserialize, Serialize};

use crate::{config::Config, kafka::compacted::Table, shutdown::CancellationToken};

/// The value of a record of the `cancellations` topic (its key is the run id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cancellation {
    /// Why, as the operator said (`weir runs cancel --reason`).
    pub reason: String,
}

/// The cancelled runs, by id, with their reasons.
#[derive(Debug, Default)]
pub(crate) struct Cancelled {
    runs: RwLock<HashMap<String, String>>,
}

impl Cancelled {
    /// Reads the topic to its end, then follows it from a thread of its own until `stop`.
    /// Blocking.
    pub(crate) fn follow(config: &Config, stop: CancellationToken) -> anyhow::Result<Arc<Cancelled>> {
        let cancelled = Arc::new(Cancelled::default());
        let table = Table::open(config, &config.names().cancellations(), &config.names().group("cancellations"))?;
        table.read_to_end(|r| cancelled.apply(r.key, r.value))?;
        let follower = cancelled.clone();
        table.follow(stop, move |r| follower.apply(r.key, r.value))?;
        Ok(cancelled)
    }

    /// Why run `run_id` was cancelled, if it was.
    pub(crate) fn reason(&self, run_id: &str) -> Option<String> {
        self.runs.read().expect("cancelled lock").get(run_id).cloned()
    }

    /// One record: a cancellation, or (a tombstone) one taken back. A record that is not one
    /// (no key, a value that does not parse) is skipped with a warning: the topic is weir's own.
    fn apply(&self, key: Option<&[u8]>, value: Option<&[u8]>) {
        let Some(run_id) = key.and_then(|k| std::str::from_utf8(k).ok()) else {
            tracing::warn!("cancellations: a record without a UTF-8 key (a run id) is skipped");
            return;
        };
        let mut runs = self.runs.write().expect("cancelled lock");
        match value.map(serde_json::from_slice::<Cancellation>) {
            None => {
                runs.remove(run_id);
            }
            Some(Ok(c)) => {
                runs.insert(run_id.to_string(), c.reason);
            }
            Some(Err(e)) => tracing::warn!(run_id, "cancellations: a record that does not parse is skipped: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_cancel_tombstones_take_back_and_junk_is_skipped() {
        let c = Cancelled::default();
        let value = serde_json::to_vec(&Cancellation { reason: "wrong list".into() }).unwrap();
        c.apply(Some(b"run-1"), Some(&value));
        c.apply(Some(b"run-2"), Some(b"not json"));
        c.apply(None, Some(&value));
        assert_eq!(c.reason("run-1").as_deref(), Some("wrong list"));
        assert_eq!(c.reason("run-2"), None);
        c.apply(Some(b"run-1"), None);
        assert_eq!(c.reason("run-1"), None);
    }
}
