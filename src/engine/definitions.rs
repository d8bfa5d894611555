//! The cached, hot-reloading set of compiled workflow definitions every evaluator matches
//! against. Pure: it is fed records (key, definition or tombstone) by whoever reads the
//! compacted definitions topic (see `pipeline`, which follows it with
//! `kafka::compacted::Table`), and knows nothing of Kafka.
//!
//! `weir workflows apply DIR` publishes each definition keyed by `tenant/id` (`*/id` for
//! platform-wide ones) and a tombstone for each definition no longer in the directory; compaction
//! keeps the latest record per key ([`plan_apply`] decides which). Every worker reads the topic
//! from the beginning at start (and does not evaluate anything until it has caught up), then
//! follows it: an apply reaches every running worker as fast as the broker delivers a record,
//! without a restart.
//!
//! Matching an event asks a moka cache for the compiled workflows of (tenant, event type); a miss
//! is computed from the definitions and cached, and any definition change invalidates the cache.
//!
//! Runs pin the version they started with: the store keeps every version it has read, and a
//! run's later steps are looked up by (key, version). The topic's `min.compaction.lag.ms` (one day)
//! keeps superseded versions readable for a worker that restarts while old runs finish; runs are
//! limited to far less than that (`limits.max_run_seconds`).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, RwLock,
    },
};

use crate::engine::{
    workflow::{CompiledWorkflow, Segment, Source, Workflow},
    Bounds,
};
use anyhow::{bail, Context as _};

pub use crate::engine::workflow::key;

/// Decodes one definitions record: `None` for a tombstone.
pub fn decode(payload: Option<&[u8]>) -> anyhow::Result<Option<Workflow>> {
    payload.map(|p| serde_json::from_slice(p).context("definition record is not a workflow")).transpose()
}

/// What `weir workflows apply` changes.
#[derive(Debug, Default)]
pub struct ApplyPlan {
    pub publish: Vec<Workflow>,
    pub delete: Vec<String>,
    pub unchanged: usize,
    /// What the definitions ask for that the pipeline narrows (a step's timeout or retry beyond
    /// its service's), said at apply time so that nobody relies on it.
    pub notes: Vec<String>,
}

impl ApplyPlan {
    pub fn print(&self, dry_run: bool) {
        let would = if dry_run { "would " } else { "" };
        for wf in &self.publish {
            println!("{would}publish {} version {}", key(wf.tenant.as_deref(), &wf.id), wf.version);
        }
        for k in &self.delete {
            println!("{would}delete {k}");
        }
        if self.publish.is_empty() && self.delete.is_empty() {
            println!("no changes ({} definitions up to date)", self.unchanged);
        }
        for note in &self.notes {
            println!("note: {note}");
        }
    }
}

/// What makes the published definitions (`current`, key → definition) equal to `local` (as
/// [`workflow::load`](crate::engine::workflow::load) read them): new and changed definitions are
/// published, definitions missing from `local` are deleted (tombstones). A definition whose
/// content changed without a higher `version` is refused, because running workers and in-flight
/// runs tell versions apart by that number.
pub(crate) fn plan_apply(
    local: &BTreeMap<String, (Workflow, Source)>,
    current: &BTreeMap<String, Workflow>,
) -> anyhow::Result<ApplyPlan> {
    let mut plan = ApplyPlan::default();
    for (k, (wf, source)) in local {
        match current.get(k) {
            Some(old) if old == wf => plan.unchanged += 1,
            Some(old) if wf.version <= old.version => bail!(
                "{}: workflow {k}: definition changed but version {} is not above the published version {}; bump `version`",
                source.describe(&[Segment::Key("version".into())], None),
                wf.version,
                old.version
            ),
            _ => plan.publish.push(wf.clone()),
        }
    }
    plan.delete = current.keys().filter(|k| !local.contains_key(*k)).cloned().collect();
    Ok(plan)
}

struct State {
    latest: HashMap<String, Arc<CompiledWorkflow>>,
    versions: HashMap<(String, i64), Arc<CompiledWorkflow>>,
}

/// The workflows matching one (tenant, event type), with the generation they were computed at.
type Matching = (u64, Arc<[Arc<CompiledWorkflow>]>);

struct Inner {
    state: RwLock<State>,
    /// (tenant, event type) → matching workflows, platform-wide first, and the [`Inner::generation`]
    /// of the definitions they were computed from.
    index: moka::sync::Cache<(String, String), Matching>,
    /// Counts definition changes. An entry computed from the definitions before a change may be
    /// inserted into `index` after the change invalidated it (the computation ran while the
    /// change was applied): its generation gives it away, and it is computed again.
    generation: AtomicU64,
    services: BTreeSet<String>,
    bounds: Bounds,
}

impl Inner {
    fn new(services: BTreeSet<String>, bounds: Bounds) -> Inner {
        Inner {
            state: RwLock::new(State { latest: HashMap::new(), versions: HashMap::new() }),
            index: moka::sync::Cache::builder().max_capacity(200_000).build(),
            generation: AtomicU64::new(0),
            services,
            bounds,
        }
    }

    fn apply(&self, key: String, wf: Option<Workflow>) {
        let services: BTreeSet<&str> = self.services.iter().map(String::as_str).collect();
        let mut state = self.state.write().expect("definitions lock");
        match wf {
            None => {
                state.latest.remove(&key);
            }
            Some(wf) => match CompiledWorkflow::compile_bounded(wf, &services, &self.bounds) {
                Ok(compiled) => {
                    let compiled = Arc::new(compiled);
                    tracing::info!(key, version = compiled.def.version, "definition loaded");
                    state.versions.insert((key.clone(), compiled.def.version), compiled.clone());
                    state.latest.insert(key, compiled);
                }
                Err(e) => tracing::error!(key, "definition refused by this worker, keeping the previous one: {e:#}"),
            },
        }
        // Still under the write lock: a reader that saw the old definitions saw the old
        // generation too.
        self.generation.fetch_add(1, Ordering::SeqCst);
        drop(state);
        self.index.invalidate_all();
    }

    /// The workflows an event of `kind` for `tenant` may trigger, computed from the definitions.
    fn compute(&self, tenant: &str, kind: &str) -> Matching {
        let state = self.state.read().expect("definitions lock");
        let generation = self.generation.load(Ordering::SeqCst);
        let mut found: Vec<Arc<CompiledWorkflow>> = state
            .latest
            .values()
            .filter(|w| w.def.triggers_on(kind) && w.def.tenant.as_deref().is_none_or(|t| t == tenant))
            .cloned()
            .collect();
        // Platform-wide first, then by id: a stable order, so task order is reproducible.
        found.sort_by(|a, b| (a.def.tenant.is_some(), &a.def.id).cmp(&(b.def.tenant.is_some(), &b.def.id)));
        (generation, found.into())
    }
}

/// The definitions a worker evaluates against, kept current by [`apply_record`](Self::apply_record).
pub struct DefinitionStore {
    inner: Arc<Inner>,
}

impl DefinitionStore {
    /// An empty store for workflows that may call `services`, rendered within `bounds`.
    pub fn new(services: BTreeSet<String>, bounds: Bounds) -> DefinitionStore {
        DefinitionStore { inner: Arc::new(Inner::new(services, bounds)) }
    }

    /// Applies one record of the definitions topic (`value` `None`: a tombstone). A record that
    /// is not a definition, or one this worker cannot compile, is logged and skipped: the
    /// previous version stays in force.
    pub(crate) fn apply_record(&self, key: Option<&[u8]>, value: Option<&[u8]>, offset: i64) {
        match (key.and_then(|k| std::str::from_utf8(k).ok()), decode(value)) {
            (Some(key), Ok(wf)) => self.inner.apply(key.to_string(), wf),
            (Some(key), Err(e)) => tracing::error!(key, offset, "skipping definition: {e:#}"),
            (None, _) => tracing::error!(offset, "skipping definition without a UTF-8 key"),
        }
    }

    /// A fixed set, without Kafka: for benchmarks and for embedding the matcher. Every workflow
    /// must compile against `services`, like at apply time.
    pub fn fixed(services: &[&str], workflows: impl IntoIterator<Item = Workflow>) -> anyhow::Result<DefinitionStore> {
        let inner = Inner::new(services.iter().map(|s| s.to_string()).collect(), Bounds::default());
        let names: BTreeSet<&str> = services.iter().copied().collect();
        for wf in workflows {
            let k = key(wf.tenant.as_deref(), &wf.id);
            CompiledWorkflow::compile(wf.clone(), &names).with_context(|| format!("workflow {k}"))?;
            inner.apply(k, Some(wf));
        }
        Ok(DefinitionStore { inner: Arc::new(inner) })
    }

    /// Workflows an event of `kind` for `tenant` may trigger: the platform-wide ones, then the
    /// tenant's own. A tenant's workflows are only ever returned for that tenant.
    pub fn matching(&self, tenant: &str, kind: &str) -> Arc<[Arc<CompiledWorkflow>]> {
        let inner = &self.inner;
        let key = (tenant.to_string(), kind.to_string());
        let (generation, found) = inner.index.get_with(key.clone(), || inner.compute(tenant, kind));
        if generation == inner.generation.load(Ordering::SeqCst) {
            return found;
        }
        // Stale: computed before a change whose invalidation it missed. Replace it, unless a
        // fresher entry is there already.
        let fresh = inner.compute(tenant, kind);
        inner.index.entry(key).and_upsert_with(|current| match current.map(|e| e.into_value()) {
            Some(current) if current.0 >= fresh.0 => current,
            _ => fresh.clone(),
        });
        fresh.1
    }

    /// A definition at the version a run pinned.
    pub fn version(&self, tenant: Option<&str>, id: &str, version: i64) -> Option<Arc<CompiledWorkflow>> {
        self.inner.state.read().expect("definitions lock").versions.get(&(key(tenant, id), version)).cloned()
    }

    /// Definitions currently live (not deleted).
    pub fn len(&self) -> usize {
        self.inner.state.read().expect("definitions lock").latest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workflow(id: &str, kind: &str) -> Workflow {
        serde_json::from_value(serde_json::json!({
            "id": id, "trigger": {"type": kind}, "steps": [{"id": "s", "service": "webhook"}]
        }))
        .unwrap()
    }

    fn ids(found: &[Arc<CompiledWorkflow>]) -> Vec<&str> {
        found.iter().map(|w| w.def.id.as_str()).collect()
    }

    /// A `matching` computed from the definitions before a change, and inserted into the cache
    /// after the change invalidated it, is not served.
    #[test]
    fn a_match_computed_before_a_change_is_not_served_after_it() {
        let store = DefinitionStore::fixed(&["webhook"], [workflow("a", "x")]).unwrap();
        let inner = &store.inner;
        let key = ("t".to_string(), "x".to_string());
        // The race, step by step: a reader computes from the old definitions…
        let stale = inner.compute("t", "x");
        assert_eq!(ids(&stale.1), ["a"]);
        // …a definition arrives, and invalidates the cache…
        inner.apply(super::key(None, "b"), Some(workflow("b", "x")));
        // …and then the reader's insert lands.
        inner.index.insert(key.clone(), stale);
        assert_eq!(ids(&store.matching("t", "x")), ["a", "b"]);
        // The stale entry was replaced, and a current one is served as is.
        assert_eq!(inner.index.get(&key).map(|(g, _)| g), Some(inner.generation.load(Ordering::SeqCst)));
        assert_eq!(ids(&store.matching("t", "x")), ["a", "b"]);
        // A deletion is seen too.
        inner.apply(super::key(None, "a"), None);
        assert_eq!(ids(&store.matching("t", "x")), ["b"]);
    }
}
