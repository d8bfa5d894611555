//! `weir status`: where each stage stands, read from the broker and, for what lives only in a
//! running process, from its `/metrics` endpoint.
//!
//! Per stage (the evaluator, each service's executor with its overflow and retry-tier readers, the
//! record stage): every consumer group's state and members with their partitions, and per
//! partition the committed offset, the end offset, the lag and the age of the oldest unprocessed
//! record; per service the breaker state and the time calls waited for rate-limit permits; and the
//! dead letters written.
//!
//! ## Why it never joins a group
//! Joining a stage's group, even for a moment, would rebalance every member of it (and with static
//! membership could fence one). Everything here is read beside the group: its state and members
//! with librdkafka's DescribeConsumerGroups (see `describe.rs` for why not `fetch_group_list`), its offsets with an OffsetFetch from a
//! consumer configured with the group's id that never subscribes (`committed_offsets`), the end
//! offsets with `fetch_watermarks`, and the oldest unprocessed record with one throw-away consumer
//! *assigned* the lagging partitions at their committed offsets, one record read from each.
//!
//! ## Stable JSON
//! `--json` prints [`Status`] as serde writes it; [`SCHEMA`] is its version, raised on any change
//! a script could notice (a field renamed, removed or retyped; adding a field is not one).
//! docs/operations.md describes every field.

mod describe;
mod groups;
pub mod metrics;
mod render;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{Config, Priority};

/// Version of the `--json` document (see the module docs).
pub const SCHEMA: u32 = 1;

/// What `weir status` shows, once.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    /// [`SCHEMA`].
    pub schema: u32,
    /// When the figures were read (RFC 3339, UTC).
    pub taken_at: chrono::DateTime<chrono::Utc>,
    pub brokers: String,
    pub topic_prefix: String,
    /// Where breaker state and throttle wait came from.
    pub metrics: Vec<MetricsSource>,
    pub stages: Vec<StageStatus>,
    pub dead_letters: DeadLetters,
}

/// One `/metrics` endpoint asked.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MetricsSource {
    pub url: String,
    /// `None` when it answered; otherwise why not.
    pub error: Option<String>,
}

/// A stage, or one service's executor.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StageStatus {
    /// `evaluate`, `execute` or `sink` (the record stage), as `weir run --stage` names them.
    pub stage: String,
    /// The service, for `execute`.
    pub service: Option<String>,
    /// The stage's groups: its main one first, then (for an executor) overflow and retry tiers.
    pub groups: Vec<GroupStatus>,
    /// Sum of the groups' lag.
    pub lag: i64,
    /// For an executor: `closed`, `open`, `half-open`, or `unknown (…)` saying why not known.
    pub breaker: Option<String>,
    /// For an executor: time its calls waited for rate-limit permits, from the metrics endpoints.
    pub throttle_wait: Option<ThrottleWait>,
    /// For an executor: its tenant classes per priority (the most backlogged tenants by name, the
    /// rest as `other`) with their backlog and share of the priority's call slots, from the
    /// metrics endpoints; by priority (high first), then the largest share first. Empty when no answering process runs the executor.
    #[serde(default)]
    pub tenants: Vec<TenantShare>,
}

/// One tenant class of an executor's priority, over the processes that run it (`weir_tenant_*`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TenantShare {
    /// The priority whose reader it is in (`high`, `normal`, `low`): each has its own lanes.
    pub priority: String,
    /// A tenant's name, or `other` for the tenants not among the most backlogged.
    pub tenant: String,
    /// Tasks waiting (in the executors' lanes and the overflow topic), summed over processes.
    pub backlog: u64,
    /// Share of its priority's call slots the class gets now, 0 to 1: per process, the weights of
    /// its tenants with work over the weights of all the priority's tenants with work; averaged
    /// over the processes that run the executor (each has the same slots). The priorities
    /// themselves share the slots by `executor.priorities`.
    pub share: f64,
    /// Calls started, tasks overflowed, deferred, and throttled (waited for the tenant's own
    /// limit): totals since the processes started.
    pub calls: u64,
    pub overflowed: u64,
    pub deferred: u64,
    pub throttled: u64,
}

/// `weir_throttle_wait_seconds{service}` summed over scopes and metrics endpoints: what waiting
/// processes reported since they started.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ThrottleWait {
    /// `None` with `unknown` set when no endpoint answered.
    pub calls: Option<u64>,
    pub seconds: Option<f64>,
    pub unknown: Option<String>,
}

/// One consumer group of a stage and the topic it reads.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GroupStatus {
    /// `main`, `overflow`, or `retry <tier>`.
    pub role: String,
    pub group: String,
    pub topic: String,
    /// The broker's group state (`Stable`, `PreparingRebalance`, `CompletingRebalance`, `Empty`,
    /// `Dead` for a group that has no members and no offsets; a KIP-848 group also `Assigning`,
    /// `Reconciling`), or `unknown` when it was not read.
    pub state: String,
    /// The group's rebalance protocol: `Consumer` (KIP-848), `Classic`, or `Unknown` (no group).
    pub protocol: String,
    pub members: Vec<Member>,
    pub partitions: Vec<PartitionStatus>,
    /// Sum of the partitions' lag.
    pub lag: i64,
    /// Age in seconds of the oldest record found unprocessed (at a committed offset), over the
    /// partitions; `None` when nothing lags or no record could be read.
    pub oldest_unprocessed_age_secs: Option<f64>,
    /// What went wrong reading this group (a missing topic, a broker error); the figures above
    /// are then partial.
    pub error: Option<String>,
}

/// A member of a group, as the broker describes it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Member {
    pub member_id: String,
    pub client_id: String,
    pub host: String,
    /// Partitions of the group's topic assigned to it (none during a rebalance).
    pub partitions: Vec<i32>,
}

/// One partition of a group's topic.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PartitionStatus {
    pub partition: i32,
    /// The group's committed offset; `None` when it has committed none (it then starts at
    /// `start`, the config's `auto.offset.reset: earliest`).
    pub committed: Option<i64>,
    /// The low watermark (first offset still retained).
    pub start: i64,
    /// The high watermark (offset of the next record written).
    pub end: i64,
    /// `end - max(committed, start)`: records the group has yet to process.
    pub lag: i64,
    /// Timestamp (ms since the epoch) of the record at the committed offset, when it lags.
    pub oldest_unprocessed_ms: Option<i64>,
}

/// The dead-letter topic.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeadLetters {
    pub topic: String,
    /// Records ever written (sum of end offsets).
    pub written: i64,
    /// Records still retained (sum of end minus start offsets).
    pub retained: i64,
    pub error: Option<String>,
}

/// A stage (or one service's executor) and the groups it reads with: what `weir status` shows,
/// and what a deployment must name (its autoscaler's group and topic are the `main` one's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageGroups {
    /// `evaluate`, `execute` or `sink`, as `weir run --stage` names them.
    pub stage: String,
    pub service: Option<String>,
    /// The main group first.
    pub groups: Vec<GroupName>,
}

/// A consumer group and the topic it reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupName {
    /// `main`, `overflow`, or `retry <tier>`.
    pub role: String,
    pub group: String,
    pub topic: String,
}

/// The groups of every stage under `config`, from its naming ([`crate::config::Names`]).
pub fn layout(config: &Config) -> Vec<StageGroups> {
    let n = config.names();
    let name = |role: &str, group: String, topic: String| GroupName { role: role.to_string(), group, topic };
    let mut stages = vec![StageGroups {
        stage: "evaluate".into(),
        service: None,
        groups: vec![name("main", n.group("evaluate"), n.events())],
    }];
    for (service, spec) in &config.services {
        let mut groups = vec![name("main", n.execute_group(service), n.actions(service))];
        if config.executor.fairness.overflow {
            // Never a member: the executor's overflow readers only commit under it.
            groups.push(name("overflow", n.overflow_group(service), n.overflow(service)));
        }
        // The readers of the other priorities' action topics (docs/executor.md, "Priorities").
        for p in [Priority::High, Priority::Low] {
            groups.push(name(p.as_str(), n.execute_group_at(service, p), n.actions_at(service, p)));
            if config.executor.fairness.overflow {
                let (group, topic) = (n.overflow_group_at(service, p), n.overflow_at(service, p));
                groups.push(name(&format!("overflow {p}"), group, topic));
            }
        }
        for tier in spec.retry.tier_names() {
            groups.push(name(&format!("retry {tier}"), n.retry_group(service, &tier), n.retry(service, &tier)));
        }
        stages.push(StageGroups { stage: "execute".into(), service: Some(service.clone()), groups });
    }
    stages.push(StageGroups {
        stage: "sink".into(),
        service: None,
        groups: vec![name("main", n.group("sink"), n.results())],
    });
    stages
}

/// What to read.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `/metrics` URLs of running processes; empty: the config's `metrics_addr`, if any.
    pub metrics: Vec<String>,
}

/// How long a `/metrics` endpoint may take to answer.
pub const METRICS_TIMEOUT: Duration = Duration::from_secs(3);

/// The `/metrics` URL of a process run with `config`: its `metrics_addr`, with an unspecified
/// address (`0.0.0.0`, listening everywhere) asked on loopback.
pub fn default_metrics_url(config: &Config) -> Option<String> {
    let mut addr = config.metrics_addr?;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    Some(format!("http://{addr}/metrics"))
}

/// Reads the figures once: the broker's in a blocking task, the metrics endpoints meanwhile.
pub async fn collect(config: &Config, options: &Options) -> anyhow::Result<Status> {
    let urls = if options.metrics.is_empty() {
        default_metrics_url(config).into_iter().collect()
    } else {
        options.metrics.clone()
    };
    let broker = tokio::task::spawn_blocking({
        let config = config.clone();
        move || groups::read(&config)
    });
    let scraped = metrics::scrape_all(&urls).await;
    let (mut stages, dead_letters) = broker.await??;
    for stage in &mut stages {
        if let Some(service) = stage.service.clone() {
            stage.breaker = Some(scraped.breaker(config, &service));
            stage.throttle_wait = Some(scraped.throttle_wait(&service));
            stage.tenants = scraped.tenants(&service);
        }
    }
    Ok(Status {
        schema: SCHEMA,
        taken_at: chrono::Utc::now(),
        brokers: config.brokers.clone(),
        topic_prefix: config.topic_prefix.clone(),
        metrics: scraped.sources(),
        stages,
        dead_letters,
    })
}

/// The table for people.
pub fn render(status: &Status) -> String {
    render::table(status)
}

/// `weir status [--json] [--watch SECS]`: prints once, or every `watch` until interrupted. A
/// refresh that fails (the broker went away) prints the error and keeps watching.
pub async fn run(config: &Config, options: &Options, json: bool, watch: Option<Duration>) -> anyhow::Result<()> {
    let print = |status: &Status| -> anyhow::Result<()> {
        if json {
            // One document per line, so `--watch --json` is a stream a script can read line by line.
            println!("{}", serde_json::to_string(status)?);
        } else {
            if watch.is_some() {
                // Clear the screen and home the cursor, as `watch(1)` does.
                print!("\x1b[2J\x1b[H");
            }
            print!("{}", render(status));
        }
        Ok(())
    };
    let Some(every) = watch else {
        return print(&collect(config, options).await?);
    };
    // Ctrl-C ends it the default way: nothing here needs finishing.
    loop {
        match collect(config, options).await {
            Ok(status) => print(&status)?,
            Err(e) => eprintln!("error: {e:#} (retrying every {}s)", every.as_secs_f64()),
        }
        // The refresh interval the user asked for, not a wait for a condition.
        tokio::time::sleep(every).await;
    }
}
