//! Replayed `webhook-id`s: a sender that did not see our 202 (a timeout, a lost connection)
//! sends the same webhook again with the same id. Within `ingest.tolerance` of its signature's
//! time the replay verifies, so the stage remembers the ids it acknowledged and answers a
//! replay 202 without producing it again.
//!
//! The memory is bounded (`MAX_IDS`, then the least recently used are forgotten) and kept for
//! twice the tolerance: a request signed up to `tolerance` in the future verifies until
//! `tolerance` after that. It is per process: a replay that reaches another ingest process is
//! produced again, with the same event id, so the pipeline's task ids (derived from it) still
//! make the copy call nothing twice.

use std::time::Duration;

/// Ids remembered at most (about 100 bytes each).
const MAX_IDS: u64 = 200_000;

pub(super) struct Seen {
    ids: moka::sync::Cache<String, ()>,
}

impl Seen {
    pub(super) fn new(tolerance: Duration) -> Seen {
        Seen { ids: moka::sync::Cache::builder().max_capacity(MAX_IDS).time_to_live(tolerance * 2).build() }
    }

    fn key(source: &str, tenant: &str, id: &str) -> String {
        format!("{source}\n{tenant}\n{id}")
    }

    /// Whether `id` of `tenant` on `source` was acknowledged before.
    pub(super) fn contains(&self, source: &str, tenant: &str, id: &str) -> bool {
        self.ids.contains_key(&Self::key(source, tenant, id))
    }

    /// Remembers an acknowledged id.
    pub(super) fn insert(&self, source: &str, tenant: &str, id: &str) {
        self.ids.insert(Self::key(source, tenant, id), ());
    }
}
