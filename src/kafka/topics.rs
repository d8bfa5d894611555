//! Topics as code: `topics/*.yaml` is the single source of truth for weir's topics, and
//! `weir topics apply` makes the cluster match it.
//!
//! Why not let producers auto-create topics? An auto-created topic gets the broker's default
//! partition count and config, so a typo silently becomes a stray one-partition topic and a
//! missing retention setting is noticed only when data vanishes (or never does). Declaring topics
//! in files puts partition counts and retention under review like any other change, and the same
//! files bring up a laptop, a test run (under a random prefix) and production.
//!
//! `apply` is a reconciliation in two steps, [`plan`] then [`apply`], so `--dry-run` shows exactly
//! what would change. What it will and will not do follows from what Kafka allows:
//! - a missing topic is created with its declared partitions, replication factor and config;
//! - partitions can only be *added*. Adding them moves keys to other partitions (ordering per key
//!   is only kept within a partition), which is why it is an explicit, visible plan line;
//! - a declared partition count below the actual one is refused: Kafka cannot remove partitions,
//!   and quietly ignoring the declaration would let files and cluster disagree forever;
//! - a different replication factor is refused too: changing it is a partition reassignment, an
//!   operation with its own throttling and monitoring, not something to do as a side effect;
//! - config drift is corrected. weir owns the config of its topics: the correction writes the
//!   topic's *full declared config* with the (non-incremental) AlterConfigs API, which resets
//!   every dynamic config not declared to the broker default. A setting made by hand with
//!   `kafka-configs.sh` is therefore undone by the next apply that corrects drift; put it in the
//!   file instead. Keys not declared are never reported as drift: the broker's defaults are fine
//!   for them, and reporting every default would drown the real differences.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Context as _};
use rdkafka::{
    admin::{
        AdminClient, AdminOptions, AlterConfig, NewPartitions, NewTopic, OwnedResourceSpecifier, ResourceSpecifier,
        TopicReplication,
    },
    client::DefaultClientContext,
};
use serde::Deserialize;

use crate::{
    config::{Config, Priority},
    kafka::{self, METADATA_TIMEOUT},
};

/// Kafka refuses longer topic names (they become directory names, with a suffix, on the broker).
const MAX_TOPIC_NAME: usize = 249;

/// How long [`apply`] waits for created or enlarged topics to have a leader on every partition.
/// A single-node broker needs well under a second; a busy cluster a few.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// One `topics/*.yaml` file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TopicFile {
    /// The topics this file declares; names must be unique across all files of the directory.
    pub topics: Vec<TopicSpec>,
}

/// The declared state of one topic.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSpec {
    /// Logical name (`events`, `actions.webhook`); the physical topic is
    /// `config.names().topic(name)`, i.e. prefixed with `topic_prefix`.
    pub name: String,
    /// Partition count: the upper bound of consumer parallelism for the topic. Can be raised by a
    /// later apply, never lowered.
    pub partitions: i32,
    /// Copies of each partition. Fixed once the topic exists (see the module docs).
    pub replication_factor: i32,
    /// Topic-level configs (`retention.ms`, `cleanup.policy`, …). Values are strings, as Kafka
    /// reports them, so that comparing declared and actual values is exact. This is the topic's
    /// whole dynamic config: keys not listed here get the broker default on the next correction.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

/// Reads and validates every `*.yaml`/`*.yml` file of `dir`, in file-name order (so plans and
/// error messages are the same on every machine).
pub fn load_dir(dir: &Path) -> anyhow::Result<Vec<TopicSpec>> {
    if !dir.is_dir() {
        bail!("topics directory {} does not exist or is not a directory (set topics_dir in the config)", dir.display());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading topics directory {}", dir.display()))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("reading topics directory {}", dir.display()))?;
    files.retain(|p| p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")));
    files.sort();
    // An empty directory is almost certainly the wrong directory; planning against it would
    // report "no changes" and hide the mistake.
    if files.is_empty() {
        bail!("topics directory {} holds no *.yaml or *.yml file", dir.display());
    }

    let mut specs = Vec::new();
    // Logical name -> file that declared it first, to name both files of a duplicate.
    let mut seen: HashMap<String, PathBuf> = HashMap::new();
    for file in files {
        let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        let parsed: TopicFile =
            serde_yaml_ng::from_str(&text).map_err(|e| anyhow::anyhow!("parsing {}: {e}", file.display()))?;
        for (i, spec) in parsed.topics.into_iter().enumerate() {
            // One self-contained line, so the error reads the same however it is printed.
            if let Err(e) = validate(&spec, i + 1) {
                bail!("invalid {}: {e}", file.display());
            }
            if let Some(first) = seen.get(&spec.name) {
                bail!(
                    "invalid {}: topic {:?}: name: already declared in {}",
                    file.display(),
                    spec.name,
                    first.display()
                );
            }
            seen.insert(spec.name.clone(), file.clone());
            specs.push(spec);
        }
    }
    Ok(specs)
}

/// Checks one declaration; `position` (1-based, within its file) names the topic when its name
/// is the problem.
fn validate(spec: &TopicSpec, position: usize) -> anyhow::Result<()> {
    let name = &spec.name;
    if name.is_empty() {
        bail!("topic #{position}: name: must not be empty");
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || "._-".contains(*c))) {
        bail!("topic {name:?}: name: {c:?} is not allowed; use only ASCII letters, digits, '.', '_' and '-'");
    }
    // "." and ".." are the only names of allowed characters Kafka still refuses.
    if name == "." || name == ".." {
        bail!("topic {name:?}: name: Kafka does not allow \".\" or \"..\" as a topic name");
    }
    if spec.partitions < 1 {
        bail!("topic {name:?}: partitions: must be at least 1, not {}", spec.partitions);
    }
    if spec.replication_factor < 1 {
        bail!("topic {name:?}: replication_factor: must be at least 1, not {}", spec.replication_factor);
    }
    if let Some(key) = spec.config.keys().find(|k| k.trim().is_empty()) {
        bail!("topic {name:?}: config: key {key:?} is empty");
    }
    Ok(())
}

/// One step that brings the cluster closer to the declarations. Topic names are physical
/// (prefixed), as that is what an operator looks up in the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The topic does not exist.
    Create { topic: String, partitions: i32, replication_factor: i32 },
    /// The topic has fewer partitions than declared.
    AddPartitions { topic: String, from: i32, to: i32 },
    /// A declared config key has another value (or none: `actual` is `None`).
    AlterConfig { topic: String, key: String, actual: Option<String>, declared: String },
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Create { topic, partitions, replication_factor } => {
                let s = if *partitions == 1 { "" } else { "s" };
                write!(f, "create topic {topic} ({partitions} partition{s}, rf {replication_factor})")
            }
            Change::AddPartitions { topic, from, to } => {
                write!(f, "raise partitions of {topic} from {from} to {to}")
            }
            Change::AlterConfig { topic, key, actual, declared } => match actual {
                Some(actual) => write!(f, "config drift on {topic}: {key} is {actual}, declared {declared}"),
                None => write!(f, "config drift on {topic}: {key} is unset, declared {declared}"),
            },
        }
    }
}

/// What [`apply`] will do, in order: creations, then partition raises, then config corrections.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub changes: Vec<Change>,
    /// Full declared config of every topic created or corrected, by physical name. A change line
    /// only carries the key that differs, but creating a topic or correcting its config writes
    /// the whole declared config (see the module docs).
    declared_configs: BTreeMap<String, BTreeMap<String, String>>,
}

/// What metadata says about one existing topic, copied out of librdkafka's structures so it can
/// leave the blocking thread that fetched it.
struct TopicState {
    partitions: i32,
    /// Replica count of each partition; they differ only after a half-done reassignment.
    replication_factors: Vec<i32>,
    /// Every partition has a leader, so a producer can write to any of them.
    all_led: bool,
}

type Admin = AdminClient<DefaultClientContext>;

/// Topics of the cluster by name. `fetch_metadata` blocks, so it runs on the blocking pool rather
/// than stalling the async runtime (it may take up to [`METADATA_TIMEOUT`]).
async fn cluster_topics(admin: &Arc<Admin>, brokers: &str) -> anyhow::Result<HashMap<String, TopicState>> {
    let admin = Arc::clone(admin);
    let metadata = tokio::task::spawn_blocking(move || admin.inner().fetch_metadata(None, METADATA_TIMEOUT))
        .await
        .context("metadata fetch task failed")?
        .with_context(|| format!("fetching cluster metadata from {brokers}"))?;
    Ok(metadata
        .topics()
        .iter()
        // A topic with a topic-level error (e.g. being deleted) cannot be compared; treating it
        // as missing makes the plan try to create it, and Kafka then says why it cannot.
        .filter(|t| t.error().is_none())
        .map(|t| {
            let parts = t.partitions();
            let state = TopicState {
                partitions: parts.len() as i32,
                replication_factors: parts.iter().map(|p| p.replicas().len() as i32).collect(),
                all_led: parts.iter().all(|p| p.error().is_none() && p.leader() >= 0),
            };
            (t.name().to_owned(), state)
        })
        .collect())
}

fn admin_options() -> AdminOptions {
    // operation_timeout makes the controller answer only once the operation is done (or this
    // time has passed), so a reported success means the change is committed.
    AdminOptions::new().request_timeout(Some(METADATA_TIMEOUT)).operation_timeout(Some(METADATA_TIMEOUT))
}

/// Compares the declarations with the cluster. Errors, rather than plan lines, for what apply
/// cannot do (shrinking, changing the replication factor): a plan must be fully appliable.
pub async fn plan(config: &Config, specs: &[TopicSpec]) -> anyhow::Result<Plan> {
    let admin = Arc::new(kafka::admin(config)?);
    let existing = cluster_topics(&admin, &config.brokers).await?;

    let mut plan = Plan::default();
    let mut creates = Vec::new();
    let mut raises = Vec::new();
    // Existing declared topics, whose configs are compared below: (physical name, spec).
    let mut compare = Vec::new();
    for spec in specs {
        let topic = config.names().topic(&spec.name);
        if topic.len() > MAX_TOPIC_NAME {
            bail!(
                "topic {topic}: the name with its prefix is {} characters, Kafka allows {MAX_TOPIC_NAME}",
                topic.len()
            );
        }
        let Some(actual) = existing.get(&topic) else {
            plan.declared_configs.insert(topic.clone(), spec.config.clone());
            creates.push(Change::Create {
                topic,
                partitions: spec.partitions,
                replication_factor: spec.replication_factor,
            });
            continue;
        };
        if spec.partitions < actual.partitions {
            bail!(
                "refusing to shrink topic {topic} from {} to {} partitions: Kafka cannot remove \
                 partitions; create a new topic and migrate",
                actual.partitions,
                spec.partitions
            );
        }
        if let Some(rf) = actual.replication_factors.iter().find(|rf| **rf != spec.replication_factor) {
            bail!(
                "topic {topic} has replication factor {rf}, declared {}: apply cannot change a \
                 replication factor; reassign the partitions (kafka-reassign-partitions.sh) and \
                 then update the declaration",
                spec.replication_factor
            );
        }
        if spec.partitions > actual.partitions {
            raises.push(Change::AddPartitions { topic: topic.clone(), from: actual.partitions, to: spec.partitions });
        }
        if !spec.config.is_empty() {
            compare.push((topic, spec));
        }
    }

    let mut drift = Vec::new();
    if !compare.is_empty() {
        let resources: Vec<ResourceSpecifier> =
            compare.iter().map(|(topic, _)| ResourceSpecifier::Topic(topic)).collect();
        let results = admin.describe_configs(&resources, &admin_options()).await.context("describing topic configs")?;
        if results.len() != compare.len() {
            bail!(
                "describing topic configs: asked for {} topics, the broker answered for {}",
                compare.len(),
                results.len()
            );
        }
        // librdkafka returns the results in request order (checked below: an error result does
        // not carry its topic name, so the order is what names it).
        for ((topic, spec), result) in compare.iter().zip(results) {
            let resource = result.map_err(|code| anyhow::anyhow!("describing the config of topic {topic}: {code}"))?;
            if resource.specifier != OwnedResourceSpecifier::Topic(topic.clone()) {
                bail!("describing the config of topic {topic}: the broker answered for {:?}", resource.specifier);
            }
            let mut drifted = false;
            for (key, declared) in &spec.config {
                let actual = resource.get(key).and_then(|e| e.value.clone());
                if actual.as_deref() != Some(declared.as_str()) {
                    drifted = true;
                    drift.push(Change::AlterConfig {
                        topic: topic.clone(),
                        key: key.clone(),
                        actual,
                        declared: declared.clone(),
                    });
                }
            }
            if drifted {
                plan.declared_configs.insert(topic.clone(), spec.config.clone());
            }
        }
    }

    plan.changes.extend(creates);
    plan.changes.extend(raises);
    plan.changes.extend(drift);
    Ok(plan)
}

/// Carries out a plan from [`plan`]. Each Kafka admin call is per topic and not transactional,
/// so every topic's result is checked; the error names each topic that failed. On success every
/// created or enlarged topic has a leader on all of its partitions, so callers can produce to it
/// at once.
pub async fn apply(config: &Config, plan: &Plan) -> anyhow::Result<()> {
    if plan.changes.is_empty() {
        return Ok(());
    }
    let admin = Arc::new(kafka::admin(config)?);
    let opts = admin_options();
    let no_config = BTreeMap::new();
    // A hand-made plan may lack a new topic's config; the topic then gets broker defaults.
    let declared = |topic: &str| plan.declared_configs.get(topic).unwrap_or(&no_config);
    // Topic -> partition count it must reach before apply returns.
    let mut wait_for: BTreeMap<&str, i32> = BTreeMap::new();

    let new_topics: Vec<NewTopic> = plan
        .changes
        .iter()
        .filter_map(|c| match c {
            Change::Create { topic, partitions, replication_factor } => {
                wait_for.insert(topic, *partitions);
                let mut t = NewTopic::new(topic, *partitions, TopicReplication::Fixed(*replication_factor));
                for (k, v) in declared(topic) {
                    t = t.set(k, v);
                }
                Some(t)
            }
            _ => None,
        })
        .collect();
    if !new_topics.is_empty() {
        let results = admin.create_topics(&new_topics, &opts).await.context("creating topics")?;
        check(results, "creating topic")?;
    }

    let new_partitions: Vec<NewPartitions> = plan
        .changes
        .iter()
        .filter_map(|c| match c {
            Change::AddPartitions { topic, to, .. } => {
                wait_for.insert(topic, *to);
                Some(NewPartitions::new(topic, *to as usize))
            }
            _ => None,
        })
        .collect();
    if !new_partitions.is_empty() {
        let results = admin.create_partitions(&new_partitions, &opts).await.context("raising partition counts")?;
        check(results, "raising the partitions of topic")?;
    }

    // One AlterConfig per drifted topic, holding its whole declared config: AlterConfigs replaces
    // the topic's dynamic config, so sending only the drifted key would reset the others.
    let drifted: BTreeSet<&str> = plan
        .changes
        .iter()
        .filter_map(|c| match c {
            Change::AlterConfig { topic, .. } => Some(topic.as_str()),
            _ => None,
        })
        .collect();
    let alters: Vec<AlterConfig> = drifted
        .iter()
        .map(|topic| {
            // Without the declared config, the request would reset every dynamic config of the
            // topic: refuse a plan that was not made by `plan`.
            let declared = plan.declared_configs.get(*topic).with_context(|| {
                format!("plan has no declared config for topic {topic}; make plans with topics::plan")
            })?;
            Ok(declared.iter().fold(AlterConfig::new(ResourceSpecifier::Topic(topic)), |a, (k, v)| a.set(k, v)))
        })
        .collect::<anyhow::Result<_>>()?;
    if !alters.is_empty() {
        let results = admin.alter_configs(&alters, &opts).await.context("altering topic configs")?;
        let failures: Vec<String> = results
            .into_iter()
            .filter_map(|r| r.err())
            .map(|(resource, code)| match resource {
                OwnedResourceSpecifier::Topic(topic) => {
                    format!("altering the config of topic {topic}: {code}")
                }
                other => format!("altering the config of {other:?}: {code}"),
            })
            .collect();
        if !failures.is_empty() {
            bail!("{}", failures.join("; "));
        }
    }

    wait_until_ready(&admin, &config.brokers, &wait_for).await
}

/// Turns per-topic admin results into one error naming every topic that failed.
fn check(results: Vec<rdkafka::admin::TopicResult>, what: &str) -> anyhow::Result<()> {
    let failures: Vec<String> =
        results.into_iter().filter_map(|r| r.err()).map(|(topic, code)| format!("{what} {topic}: {code}")).collect();
    if failures.is_empty() {
        Ok(())
    } else {
        bail!("{}", failures.join("; "))
    }
}

/// Polls metadata until every topic of `want` has its partition count and a leader on each
/// partition. The controller acknowledges a creation before every broker's metadata shows the
/// new partitions with leaders; a producer started in that window fails or waits.
async fn wait_until_ready(admin: &Arc<Admin>, brokers: &str, want: &BTreeMap<&str, i32>) -> anyhow::Result<()> {
    if want.is_empty() {
        return Ok(());
    }
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    loop {
        let topics = cluster_topics(admin, brokers).await?;
        let pending: Vec<&str> = want
            .iter()
            .filter(|(topic, partitions)| {
                !topics.get(**topic).is_some_and(|t| t.partitions >= **partitions && t.all_led)
            })
            .map(|(topic, _)| *topic)
            .collect();
        if pending.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "topics {} were changed but do not have a leader on every partition after {}s",
                pending.join(", "),
                READY_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `weir topics apply [--dry-run]`: loads `config.topics_dir`, plans, and applies unless
/// `dry_run`. Returns the plan for [`print_plan`].
pub async fn apply_dir(config: &Config, dry_run: bool) -> anyhow::Result<Plan> {
    let mut specs = load_dir(&config.topics_dir)?;
    let derived = service_topics(config, &specs)?;
    specs.extend(derived);
    let plan = plan(config, &specs).await?;
    // Before anything changes: a combination of limits that cannot work is refused, not applied.
    let admin = Arc::new(kafka::admin(config)?);
    let topic_limits = declared_limits(config, &admin, &specs, &plan).await?;
    check_combination(config, producer_max_bytes(config)?, &topic_limits)?;
    if !dry_run {
        apply(config, &plan).await?;
    }
    Ok(plan)
}

/// The producer's `message.max.bytes`: librdkafka's default (1,000,000) unless `kafka:` in the
/// config sets it. The producer refuses a larger record before it leaves the process.
pub(crate) fn producer_max_bytes(config: &Config) -> anyhow::Result<usize> {
    let native = kafka::producer_config(config).create_native_config().context("reading the producer config")?;
    let value = native.get("message.max.bytes").context("reading the producer's message.max.bytes")?;
    value.parse().with_context(|| format!("the producer's message.max.bytes {value:?} is not a number"))
}

/// The largest batch a topic accepts, and where that number comes from (for messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TopicLimit {
    /// Physical name.
    pub topic: String,
    /// Its `max.message.bytes`.
    pub bytes: usize,
    /// `declared in topics/`, `on the broker`, `the broker default`.
    pub source: &'static str,
}

/// Refuses limits that cannot work together, naming both numbers:
/// - `limits.max_record_bytes` above the producer's `message.max.bytes`: records in between are
///   refused by the producer, after weir measured them as fine;
/// - a topic weir writes whose `max.message.bytes` is below the producer's `message.max.bytes`:
///   librdkafka fills batches up to its own limit and the broker refuses any larger than the
///   topic's, so records that each fit would still be refused, in batches.
pub(crate) fn check_combination(config: &Config, producer_max: usize, topics: &[TopicLimit]) -> anyhow::Result<()> {
    let max_record = config.limits.max_record_bytes;
    if max_record > producer_max {
        bail!(
            "limits.max_record_bytes is {max_record} bytes but the producer's message.max.bytes is {producer_max}: \
             records between the two would be refused by the producer; lower limits.max_record_bytes to at most \
             {producer_max}, or raise message.max.bytes under `kafka:` in the config"
        );
    }
    let mut problems = Vec::new();
    for t in topics.iter().filter(|t| t.bytes < producer_max) {
        problems.push(format!(
            "topic {} accepts batches of at most {} bytes (max.message.bytes, {}), less than the producer's \
             message.max.bytes of {producer_max}: batches between the two would be refused",
            t.topic, t.bytes, t.source
        ));
    }
    if !problems.is_empty() {
        bail!(
            "{}; raise the topic's max.message.bytes (in topics/*.yaml, then `weir topics apply`), or lower \
             message.max.bytes under `kafka:` in the config (and limits.max_record_bytes to at most that)",
            problems.join("; ")
        );
    }
    Ok(())
}

/// The topics the pipeline's stages write: the dead-letter and results topics and every
/// configured service's action and delay topics (physical names).
pub(crate) fn written_topics(config: &Config) -> Vec<String> {
    let names = config.names();
    let mut topics = vec![names.dlq(), names.results()];
    for (name, service) in &config.services {
        for p in Priority::ALL {
            topics.push(names.actions_at(name, p));
            topics.push(names.overflow_at(name, p));
        }
        topics.extend(service.retry.tier_names().iter().map(|t| names.retry(name, t)));
    }
    topics
}

/// At start: checks `limits.max_record_bytes`, the producer's `message.max.bytes` and the
/// `max.message.bytes` of every topic the stages write, as the broker has them (see
/// [`check_combination`]). A topic that does not exist is left to the stage that needs it, which
/// says to run `weir topics apply`.
pub(crate) async fn check_limits(config: &Config) -> anyhow::Result<()> {
    let producer_max = producer_max_bytes(config)?;
    let admin = kafka::admin(config)?;
    let topics = written_topics(config);
    let described = describe_max_message_bytes(&admin, &topics).await?;
    let limits: Vec<TopicLimit> = described
        .into_iter()
        .filter_map(|(topic, bytes)| Some(TopicLimit { topic, bytes: bytes?, source: "on the broker" }))
        .collect();
    check_combination(config, producer_max, &limits)
}

/// `max.message.bytes` of each topic, `None` for one that could not be described (missing).
async fn describe_max_message_bytes(admin: &Admin, topics: &[String]) -> anyhow::Result<Vec<(String, Option<usize>)>> {
    if topics.is_empty() {
        return Ok(Vec::new());
    }
    let resources: Vec<ResourceSpecifier> = topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let results = admin.describe_configs(&resources, &admin_options()).await.context("describing topic configs")?;
    // Results come in request order (see `plan`).
    Ok(topics
        .iter()
        .zip(results)
        .map(|(topic, result)| {
            let bytes = result.ok().and_then(|r| r.get("max.message.bytes")?.value.as_deref()?.parse().ok());
            (topic.clone(), bytes)
        })
        .collect())
}

/// What `max.message.bytes` each declared topic will have after apply: the declared value, else
/// the existing topic's, else the broker's default for new topics.
async fn declared_limits(
    config: &Config,
    admin: &Arc<Admin>,
    specs: &[TopicSpec],
    plan: &Plan,
) -> anyhow::Result<Vec<TopicLimit>> {
    let mut limits = Vec::new();
    let (mut undeclared, mut missing) = (Vec::new(), Vec::new());
    let created: BTreeSet<&str> = plan
        .changes
        .iter()
        .filter_map(|c| match c {
            Change::Create { topic, .. } => Some(topic.as_str()),
            _ => None,
        })
        .collect();
    for spec in specs {
        let topic = config.names().topic(&spec.name);
        match spec.config.get("max.message.bytes") {
            Some(v) => {
                let bytes = v.parse().with_context(|| {
                    format!("topic {:?}: config: max.message.bytes {v:?} is not a number", spec.name)
                })?;
                limits.push(TopicLimit { topic, bytes, source: "declared in topics_dir" });
            }
            // Only existing topics are described: a topic about to be created gets the default.
            None if created.contains(topic.as_str()) => missing.push(topic),
            None => undeclared.push(topic),
        }
    }
    for (topic, bytes) in describe_max_message_bytes(admin, &undeclared).await? {
        match bytes {
            Some(bytes) => limits.push(TopicLimit { topic, bytes, source: "on the broker" }),
            None => missing.push(topic),
        }
    }
    if !missing.is_empty() {
        if let Some(bytes) = broker_default_max_bytes(admin).await? {
            limits.extend(missing.into_iter().map(|topic| TopicLimit { topic, bytes, source: "the broker default" }));
        }
    }
    Ok(limits)
}

/// The broker's `message.max.bytes`: what a topic created without `max.message.bytes` gets.
async fn broker_default_max_bytes(admin: &Arc<Admin>) -> anyhow::Result<Option<usize>> {
    let a = Arc::clone(admin);
    let metadata = tokio::task::spawn_blocking(move || a.inner().fetch_metadata(None, METADATA_TIMEOUT))
        .await
        .context("metadata fetch task failed")?
        .context("fetching cluster metadata")?;
    let Some(broker) = metadata.brokers().first().map(|b| b.id()) else { return Ok(None) };
    let results = admin
        .describe_configs(&[ResourceSpecifier::Broker(broker)], &admin_options())
        .await
        .context("describing the broker config")?;
    Ok(results
        .into_iter()
        .next()
        .and_then(|r| r.ok())
        .and_then(|r| r.get("message.max.bytes")?.value.as_deref()?.parse().ok()))
}

/// Deletes every topic whose name starts with `config.topic_prefix`: how tests and benchmarks,
/// each on its own random prefix, leave the broker as they found it (a broker holding thousands of
/// stale partitions runs out of file handles). Refused without a prefix, where it would delete
/// the deployment's own topics.
pub async fn delete_all(config: &Config) -> anyhow::Result<()> {
    if config.topic_prefix.is_empty() {
        bail!("refusing to delete topics without a topic_prefix");
    }
    let admin = kafka::admin(config)?;
    let metadata = admin.inner().fetch_metadata(None, METADATA_TIMEOUT).context("listing topics")?;
    let names: Vec<&str> =
        metadata.topics().iter().map(|t| t.name()).filter(|n| n.starts_with(&config.topic_prefix)).collect();
    if !names.is_empty() {
        admin.delete_topics(&names, &AdminOptions::new()).await.context("deleting topics")?;
    }
    Ok(())
}

/// Partitions and replication of a service's action topic that `topics/*.yaml` does not declare:
/// those of the declared `events` topic (tasks are keyed by tenant like the events they come
/// from, so the same parallelism fits), with [`DERIVED_ACTIONS_CONFIG`].
pub(crate) const DERIVED_ACTIONS_FROM: &str = "events";

/// Topic config of a derived action topic: 7 days' retention, as the repo's `actions.webhook`.
pub(crate) const DERIVED_ACTIONS_CONFIG: [(&str, &str); 2] =
    [("cleanup.policy", "delete"), ("retention.ms", "604800000")];

/// The topics of every configured service that the files do not declare, so that a service added
/// to `weir.yaml` gets its topics from `weir topics apply`:
/// - `actions.<service>`: partitions and replication of `events`, config
///   [`DERIVED_ACTIONS_CONFIG`] (declare it to choose otherwise);
/// - its delay topics `actions.<service>.retry.<tier>`, its priorities' action topics
///   `actions.<service>.high` and `.low`, and the overflow topic of each of the three
///   (`actions.<service>.overflow`, `actions.<service>.high.overflow`, …): the same partitions,
///   replication and config as `actions.<service>`, declared or derived. An overflow topic must
///   have exactly the partitions of its action topic (an executor reads overflow partition p only
///   while it owns action partition p), so it follows the action topic even when
///   `executor.fairness.overflow` is off.
///
/// The files stay the source of truth: a declared topic always wins. Without a declared `events`
/// topic an undeclared action topic cannot be derived, and the error names the service and what
/// to declare.
pub fn service_topics(config: &Config, declared: &[TopicSpec]) -> anyhow::Result<Vec<TopicSpec>> {
    let names = crate::config::Names::logical();
    let mut derived = Vec::new();
    for (name, service) in &config.services {
        let main = names.actions(name);
        let base = match declared.iter().find(|s| s.name == main) {
            Some(base) => base.clone(),
            None => {
                let Some(events) = declared.iter().find(|s| s.name == DERIVED_ACTIONS_FROM) else {
                    bail!(
                        "services.{name}: topic {main} is not declared in {} and cannot be derived without a \
                         declared `{DERIVED_ACTIONS_FROM}` topic; declare {main} there",
                        config.topics_dir.display()
                    );
                };
                let config = DERIVED_ACTIONS_CONFIG.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
                let spec = TopicSpec { name: main.clone(), config, ..events.clone() };
                derived.push(spec.clone());
                spec
            }
        };
        let delay_topics = service.retry.tier_names().into_iter().map(|tier| names.retry(name, &tier));
        // Each priority's action topic and its overflow topic (normal's are `main` and
        // `actions.<service>.overflow`).
        let priority_topics = Priority::ALL.into_iter().flat_map(|p| {
            let actions = (p != Priority::Normal).then(|| names.actions_at(name, p));
            actions.into_iter().chain([names.overflow_at(name, p)])
        });
        for name in delay_topics.chain(priority_topics) {
            if !declared.iter().any(|s| s.name == name) {
                derived.push(TopicSpec { name, ..base.clone() });
            }
        }
    }
    Ok(derived)
}

/// Prints one line per change to stdout, or `no changes`. Lines read as the action taken
/// (`create topic …`, `correct config drift on …`), prefixed with "would " under `--dry-run`,
/// since then nothing was done.
pub fn print_plan(plan: &Plan, dry_run: bool) {
    for line in plan_lines(plan, dry_run) {
        println!("{line}");
    }
}

fn plan_lines(plan: &Plan, dry_run: bool) -> Vec<String> {
    if plan.changes.is_empty() {
        return vec!["no changes".into()];
    }
    let would = if dry_run { "would " } else { "" };
    plan.changes
        .iter()
        .map(|change| match change {
            // A drift line describes a state, not an action; say what apply does about it.
            Change::AlterConfig { .. } => format!("{would}correct {change}"),
            _ => format!("{would}{change}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    fn load_err(files: &[(&str, &str)]) -> String {
        let dir = dir_with(files);
        // Plain Display: the message must stand on its own, without the anyhow context chain.
        load_dir(dir.path()).unwrap_err().to_string()
    }

    #[test]
    fn loads_files_in_name_order_and_ignores_other_files() {
        let dir = dir_with(&[
            (
                "b.yml",
                "topics:\n  - {name: b, partitions: 2, replication_factor: 1}\n",
            ),
            (
                "a.yaml",
                "topics:\n  - name: a\n    partitions: 1\n    replication_factor: 1\n    config: {retention.ms: \"1000\"}\n",
            ),
            ("README.md", "not yaml: ["),
        ]);
        let specs = load_dir(dir.path()).unwrap();
        let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(specs[0].config["retention.ms"], "1000");
        assert!(specs[1].config.is_empty());
    }

    /// What `service_topics` derives after a service's delay topics, in order (behind
    /// `actions.<service>.`).
    const PRIORITY_TOPICS: [&str; 5] = ["high", "high.overflow", "overflow", "low", "low.overflow"];

    #[test]
    fn delay_topics_are_derived_for_every_service_unless_declared() {
        let specs = load_dir(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("topics")).unwrap();
        let mut config = Config::default();
        config.services.insert("webhook".into(), Default::default());
        let names: Vec<String> = service_topics(&config, &specs).unwrap().into_iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            PRIORITY_TOPICS.map(|t| format!("actions.webhook.{t}")),
            "the repo declares webhook's delay topics; its priorities' and overflow topics are derived"
        );
        let mut extra = specs.clone();
        extra.push(TopicSpec { name: "actions.slack".into(), partitions: 3, ..specs[0].clone() });
        let mut slack = crate::config::ServiceConfig::default();
        slack.retry.tiers = vec![Duration::from_secs(5), Duration::from_secs(120)];
        config.services.insert("slack".into(), slack);
        let derived = service_topics(&config, &extra).unwrap();
        let names: Vec<&str> = derived.iter().map(|s| s.name.as_str()).collect();
        let mut want = vec!["actions.slack.retry.5s".to_string(), "actions.slack.retry.2m".into()];
        want.extend(PRIORITY_TOPICS.map(|t| format!("actions.slack.{t}")));
        want.extend(PRIORITY_TOPICS.map(|t| format!("actions.webhook.{t}")));
        assert_eq!(names, want);
        assert!(derived.iter().filter(|s| s.name.starts_with("actions.slack")).all(|s| s.partitions == 3));
    }

    #[test]
    fn an_undeclared_service_gets_its_action_topic_from_events() {
        let specs = load_dir(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("topics")).unwrap();
        let events = specs.iter().find(|s| s.name == "events").unwrap();
        let mut config = Config::default();
        config.services.insert("crm".into(), Default::default());
        let derived = service_topics(&config, &specs).unwrap();
        let names: Vec<&str> = derived.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "actions.crm",
                "actions.crm.retry.1s",
                "actions.crm.retry.10s",
                "actions.crm.retry.1m",
                "actions.crm.retry.10m",
                "actions.crm.high",
                "actions.crm.high.overflow",
                "actions.crm.overflow",
                "actions.crm.low",
                "actions.crm.low.overflow"
            ]
        );
        for spec in &derived {
            assert_eq!((spec.partitions, spec.replication_factor), (events.partitions, events.replication_factor));
            assert_eq!(spec.config["retention.ms"], "604800000", "{}", spec.name);
            assert!(!spec.config.contains_key("max.message.bytes"), "events' own settings are not copied");
        }
        let without_events: Vec<TopicSpec> = specs.iter().filter(|s| s.name != "events").cloned().collect();
        let err = service_topics(&config, &without_events).unwrap_err().to_string();
        assert!(err.contains("services.crm") && err.contains("declare actions.crm"), "{err}");
    }

    #[test]
    fn repo_topics_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("topics");
        let specs = load_dir(&dir).unwrap();
        assert!(specs.iter().any(|s| s.name == "events"));
    }

    #[test]
    fn bad_counts_name_file_topic_and_field() {
        let err = load_err(&[("p.yaml", "topics:\n  - {name: ev, partitions: 0, replication_factor: 1}\n")]);
        assert!(err.contains("p.yaml") && err.contains("\"ev\"") && err.contains("partitions"), "{err}");
        let err = load_err(&[("r.yaml", "topics:\n  - {name: ev, partitions: 1, replication_factor: 0}\n")]);
        assert!(err.contains("r.yaml") && err.contains("\"ev\"") && err.contains("replication_factor"), "{err}");
    }

    #[test]
    fn bad_names_are_refused() {
        let err = load_err(&[("n.yaml", "topics:\n  - {name: \"\", partitions: 1, replication_factor: 1}\n")]);
        assert!(err.contains("n.yaml") && err.contains("topic #1") && err.contains("name"), "{err}");
        let err = load_err(&[("n.yaml", "topics:\n  - {name: \"a/b\", partitions: 1, replication_factor: 1}\n")]);
        assert!(err.contains("\"a/b\"") && err.contains("'/'"), "{err}");
        let err = load_err(&[("n.yaml", "topics:\n  - {name: \"..\", partitions: 1, replication_factor: 1}\n")]);
        assert!(err.contains("\"..\""), "{err}");
    }

    #[test]
    fn duplicates_across_files_are_refused() {
        let t = "topics:\n  - {name: ev, partitions: 1, replication_factor: 1}\n";
        let err = load_err(&[("a.yaml", t), ("b.yaml", t)]);
        assert!(err.contains("b.yaml") && err.contains("a.yaml") && err.contains("already declared"), "{err}");
    }

    #[test]
    fn unknown_fields_and_wrong_types_are_refused() {
        let err =
            load_err(&[("u.yaml", "topics:\n  - {name: ev, partitions: 1, replication_factor: 1, retention: 5}\n")]);
        assert!(err.contains("u.yaml") && err.contains("retention"), "{err}");
        let err = load_err(&[("w.yaml", "topics:\n  - {name: ev, partitions: many, replication_factor: 1}\n")]);
        assert!(err.contains("w.yaml") && err.contains("partitions"), "{err}");
    }

    #[test]
    fn missing_or_empty_dir_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let err = load_dir(&missing).unwrap_err().to_string();
        assert!(err.contains("nope") && err.contains("does not exist"), "{err}");
        let err = load_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("no *.yaml"), "{err}");
    }

    #[test]
    fn limits_that_cannot_work_are_refused_naming_both_numbers() {
        let mut config = Config::default();
        let topic = |bytes| TopicLimit { topic: "t.results".into(), bytes, source: "declared in topics_dir" };
        check_combination(&config, 1_000_000, &[topic(1_048_588)]).unwrap();
        let err = check_combination(&config, 1_000_000, &[topic(500_000)]).unwrap_err().to_string();
        assert!(err.contains("t.results") && err.contains("500000") && err.contains("1000000"), "{err}");
        config.limits.max_record_bytes = 2_000_000;
        let err = check_combination(&config, 1_000_000, &[]).unwrap_err().to_string();
        assert!(
            err.contains("limits.max_record_bytes is 2000000") && err.contains("message.max.bytes is 1000000"),
            "{err}"
        );
        config.kafka.insert("message.max.bytes".into(), "3000000".into());
        assert_eq!(producer_max_bytes(&config).unwrap(), 3_000_000);
        assert_eq!(producer_max_bytes(&Config::default()).unwrap(), 1_000_000);
    }

    #[test]
    fn changes_read_as_one_line() {
        let create = Change::Create { topic: "t.events".into(), partitions: 8, replication_factor: 1 };
        assert_eq!(create.to_string(), "create topic t.events (8 partitions, rf 1)");
        let raise = Change::AddPartitions { topic: "t.events".into(), from: 4, to: 8 };
        assert_eq!(raise.to_string(), "raise partitions of t.events from 4 to 8");
        let drift = Change::AlterConfig {
            topic: "t.events".into(),
            key: "retention.ms".into(),
            actual: Some("1000".into()),
            declared: "604800000".into(),
        };
        assert_eq!(drift.to_string(), "config drift on t.events: retention.ms is 1000, declared 604800000");
        let one = Change::Create { topic: "t.dlq".into(), partitions: 1, replication_factor: 1 };
        assert_eq!(one.to_string(), "create topic t.dlq (1 partition, rf 1)");

        let plan = Plan { changes: vec![create, drift], ..Plan::default() };
        assert_eq!(
            plan_lines(&plan, true),
            [
                "would create topic t.events (8 partitions, rf 1)",
                "would correct config drift on t.events: retention.ms is 1000, declared 604800000"
            ]
        );
        assert_eq!(
            plan_lines(&plan, false)[1],
            "correct config drift on t.events: retention.ms is 1000, declared 604800000"
        );
        assert_eq!(plan_lines(&Plan::default(), true), ["no changes"]);
    }
}
