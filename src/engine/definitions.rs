//! Workflow definitions as a compacted Kafka topic, and the cached, hot-reloading set every
//! evaluator matches against.
//!
//! `weir workflows apply DIR` publishes each definition keyed by `tenant/id` (`*/id` for
//! platform-wide ones) and a tombstone for each definition no longer in the directory; compaction
//! keeps the latest record per key. Every worker reads the topic from the beginning at start
//! (and does not evaluate anything until it has caught up), then follows it: an apply reaches
//! every running worker as fast as the broker delivers a record, without a restart.
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
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, RwLock,
    },
    time::Duration,
};

use anyhow::{bail, Context as _};
use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    message::OwnedHeaders,
    Message, Offset, TopicPartitionList,
};

use crate::{
    config::Config,
    engine::{
        workflow::{CompiledWorkflow, Workflow},
        Bounds,
    },
    kafka,
};

/// Key prefix of platform-wide workflows.
pub const PLATFORM: &str = "*";

/// The record key of a definition.
pub fn key(tenant: Option<&str>, id: &str) -> String {
    format!("{}/{}", tenant.unwrap_or(PLATFORM), id)
}

fn reader(config: &Config) -> anyhow::Result<(BaseConsumer, String, TopicPartitionList)> {
    let topic = config.topic("definitions");
    // No group: the store reads everything, always; nothing is committed.
    let consumer: BaseConsumer = kafka::consumer_config(config, &config.group("definitions"))
        .set("enable.auto.commit", "false")
        // Lag statistics are for the stages' consumers (their context turns them into metrics);
        // here they would only be logged.
        .set("statistics.interval.ms", "0")
        .create()
        .context("creating definitions reader")?;
    let partitions = kafka::partition_count(consumer.client(), &topic)?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(&topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    Ok((consumer, topic, tpl))
}

/// Decodes one definitions record: `None` for a tombstone.
fn decode(payload: Option<&[u8]>) -> anyhow::Result<Option<Workflow>> {
    payload.map(|p| serde_json::from_slice(p).context("definition record is not a workflow")).transpose()
}

/// Reads the definitions topic up to its current end: key → latest definition.
pub fn read_current(config: &Config) -> anyhow::Result<BTreeMap<String, Workflow>> {
    let (consumer, topic, tpl) = reader(config)?;
    let mut current = BTreeMap::new();
    catch_up(&consumer, &topic, &tpl, |key, wf| {
        match wf {
            Some(wf) => current.insert(key, wf),
            None => current.remove(&key),
        };
    })?;
    Ok(current)
}

/// Polls until every partition reached the high watermark it had when called.
fn catch_up(
    consumer: &BaseConsumer,
    topic: &str,
    tpl: &TopicPartitionList,
    mut apply: impl FnMut(String, Option<Workflow>),
) -> anyhow::Result<()> {
    let mut remaining: HashMap<i32, i64> = HashMap::new();
    for e in tpl.elements() {
        // A just-created topic may not have a serving leader yet: that answer is transient.
        let deadline = std::time::Instant::now() + kafka::METADATA_TIMEOUT;
        let (low, high) = loop {
            match consumer.fetch_watermarks(topic, e.partition(), kafka::METADATA_TIMEOUT) {
                Ok(w) => break w,
                Err(err) if std::time::Instant::now() < deadline => {
                    tracing::debug!(topic, "watermarks not available yet: {err}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(err) => return Err(err).with_context(|| format!("reading the end offsets of {topic}")),
            }
        };
        if high > low {
            remaining.insert(e.partition(), high);
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !remaining.is_empty() {
        if std::time::Instant::now() > deadline {
            bail!("reading {topic}: did not reach the end within 60 s");
        }
        let Some(msg) = consumer.poll(Duration::from_millis(200)) else { continue };
        let msg = msg.with_context(|| format!("reading {topic}"))?;
        if let Some(key) = msg.key().and_then(|k| std::str::from_utf8(k).ok()) {
            match decode(msg.payload()) {
                Ok(wf) => apply(key.to_string(), wf),
                Err(e) => tracing::error!(key, offset = msg.offset(), "skipping definition: {e:#}"),
            }
        }
        if remaining.get(&msg.partition()).is_some_and(|high| msg.offset() + 1 >= *high) {
            remaining.remove(&msg.partition());
        }
    }
    Ok(())
}

/// What `weir workflows apply` changes.
#[derive(Debug, Default)]
pub struct ApplyPlan {
    pub publish: Vec<Workflow>,
    pub delete: Vec<String>,
    pub unchanged: usize,
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
    }
}

/// Validates every definition of `dir` and makes the definitions topic equal to it: new and
/// changed definitions are published, definitions missing from `dir` are deleted (tombstones).
/// A definition whose content changed without a higher `version` is refused, because running
/// workers and in-flight runs tell versions apart by that number.
pub async fn apply_dir(config: &Config, dir: &std::path::Path, dry_run: bool) -> anyhow::Result<ApplyPlan> {
    let services: BTreeSet<&str> = config.services.keys().map(String::as_str).collect();
    let local = crate::engine::workflow::load(dir, &services, &config.engine)?;
    let cfg = config.clone();
    let current = tokio::task::spawn_blocking(move || read_current(&cfg)).await??;
    let mut plan = ApplyPlan::default();
    for (wf, source) in local.values() {
        let k = key(wf.tenant.as_deref(), &wf.id);
        match current.get(&k) {
            Some(old) if old == wf => plan.unchanged += 1,
            Some(old) if wf.version <= old.version => bail!(
                "{}: workflow {k}: definition changed but version {} is not above the published version {}; bump `version`",
                source.describe(&[crate::engine::workflow::Segment::Key("version".into())], None),
                wf.version,
                old.version
            ),
            _ => plan.publish.push(wf.clone()),
        }
    }
    let local_keys: BTreeSet<String> = local.keys().cloned().collect();
    plan.delete = current.keys().filter(|k| !local_keys.contains(*k)).cloned().collect();
    if dry_run {
        return Ok(plan);
    }
    let producer = kafka::producer(config)?;
    let topic = config.topic("definitions");
    // All records are handed to the producer at once and acknowledged together: one partition,
    // an idempotent producer, so they still land in order, and a 1,000-workflow apply takes one
    // round trip instead of a thousand.
    let publishes = plan.publish.iter().map(|wf| {
        let (producer, topic) = (&producer, &topic);
        async move {
            let k = key(wf.tenant.as_deref(), &wf.id);
            let payload = serde_json::to_vec(wf)?;
            kafka::send(producer, topic, Some(k.as_bytes()), &payload, OwnedHeaders::new())
                .await
                .with_context(|| format!("publishing {k}"))
        }
    });
    let deletes = plan.delete.iter().map(|k| {
        let record = rdkafka::producer::FutureRecord::<[u8], [u8]>::to(&topic).key(k.as_bytes());
        let sent = producer.send(record, Duration::from_secs(30));
        async move { sent.await.map(|_| ()).map_err(|(e, _)| e).with_context(|| format!("deleting {k}")) }
    });
    futures::future::try_join_all(publishes).await?;
    futures::future::try_join_all(deletes).await?;
    Ok(plan)
}

struct State {
    latest: HashMap<String, Arc<CompiledWorkflow>>,
    versions: HashMap<(String, i64), Arc<CompiledWorkflow>>,
}

/// The workflows matching a (tenant, event type), and the generation they were computed at.
type Matched = (u64, Arc<[Arc<CompiledWorkflow>]>);

struct Inner {
    state: RwLock<State>,
    /// (tenant, event type) → matching workflows, platform-wide first, and the [`Inner::generation`]
    /// of the definitions they were computed from.
    index: moka::sync::Cache<(String, String), Matched>,
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
    fn compute(&self, tenant: &str, kind: &str) -> Matched {
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

/// The definitions a worker evaluates against, kept current by a follower thread.
pub struct DefinitionStore {
    inner: Arc<Inner>,
    stop: Arc<AtomicBool>,
}

impl DefinitionStore {
    /// Reads the definitions topic to its end, then follows it in the background.
    pub fn start(config: &Config) -> anyhow::Result<DefinitionStore> {
        let inner = Arc::new(Inner::new(config.services.keys().cloned().collect(), config.engine.clone()));
        let (consumer, topic, tpl) = reader(config)?;
        catch_up(&consumer, &topic, &tpl, |k, wf| inner.apply(k, wf))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (follower, flag) = (inner.clone(), stop.clone());
        std::thread::Builder::new().name("weir-definitions".into()).spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match consumer.poll(Duration::from_millis(100)) {
                    Some(Ok(msg)) => match (msg.key().and_then(|k| std::str::from_utf8(k).ok()), decode(msg.payload()))
                    {
                        (Some(key), Ok(wf)) => follower.apply(key.to_string(), wf),
                        (_, Err(e)) => tracing::error!(offset = msg.offset(), "skipping definition: {e:#}"),
                        (None, _) => tracing::error!(offset = msg.offset(), "skipping definition without a key"),
                    },
                    Some(Err(e)) => tracing::warn!("reading definitions: {e}"),
                    None => {}
                }
            }
        })?;
        Ok(DefinitionStore { inner, stop })
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
        Ok(DefinitionStore { inner: Arc::new(inner), stop: Arc::new(AtomicBool::new(false)) })
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

impl Drop for DefinitionStore {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
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
