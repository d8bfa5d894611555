//! The backlog scenario: does a stage's memory stay flat while it works through millions of
//! waiting events?
//!
//! 1. The events topic (fresh, random prefix, like every scenario) is filled with `--events`
//!    events of `--body-bytes` bodies while no stage runs.
//! 2. The stages under test start as a **separate process**, `weir run --stage ...` on a config
//!    file written here, so the RSS sampled from `/proc/<pid>/status` (VmRSS once a second,
//!    VmHWM at the end) is the stages' alone, not this process's (which holds the generator, the
//!    receiver and a consumer of its own).
//! 3. The scenario ends when the stages' consumer groups have committed everything (the events
//!    topic's end; with `--stages all` also the ends of `actions.webhook` and `results`), then
//!    stops the child with SIGTERM and deletes the topics (they hold gigabytes).
//!
//! Reported: the drain rate, the child's peak RSS and RSS series, a flatness figure (max − min of
//! the last half of the series), and the child's CPU seconds per million events.

use std::{
    path::{Path, PathBuf},
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::json;

use super::{
    child::{write_child_config, ChildProcess},
    load::{self, Mix, Progress, Rate, Shape, MIN_BODY_BYTES},
    measure::{self, CpuSample, Measured, Point},
    report::ScenarioReport,
    scenario::{self, Setting, SERVICE},
    Options, Scenario,
};
use crate::{config::Config, kafka};

/// The bound on a stage's memory under a backlog.
pub(crate) const RSS_LIMIT_MB: f64 = 200.0;
/// How long the committed offsets may stand still (start-up included: loading the definitions,
/// joining the group) before the child counts as stuck.
const STALL_LIMIT: Duration = Duration::from_secs(180);

/// Which stages the child runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BacklogStages {
    /// `weir run --stage evaluate`: the events topic is the backlog.
    Evaluate,
    /// Evaluate, execute (HTTP calls to this process's receiver) and the sink (a fresh database).
    All,
}

impl BacklogStages {
    pub(super) fn args(self) -> &'static [&'static str] {
        match self {
            BacklogStages::Evaluate => &["--stage", "evaluate"],
            BacklogStages::All => &["--stage", "evaluate", "--stage", "execute", "--stage", "sink"],
        }
    }
}

/// What the backlog scenario fills and runs.
#[derive(Debug, Clone)]
pub struct BacklogOptions {
    /// Events put on the topic before the stages start.
    pub events: u64,
    /// Size of each event's `data` body; the whole record is ~180 bytes more.
    pub body_bytes: usize,
    pub stages: BacklogStages,
    /// The `weir` binary of the child processes (the backlog's, and every scenario's stages
    /// unless `--in-process`); `None`: this executable (tests pass the built binary, since
    /// theirs is the test harness).
    pub binary: Option<PathBuf>,
}

impl Default for BacklogOptions {
    fn default() -> Self {
        BacklogOptions { events: 10_000_000, body_bytes: 400, stages: BacklogStages::Evaluate, binary: None }
    }
}

impl BacklogOptions {
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.events == 0 {
            bail!("--events: must be at least 1");
        }
        if !(MIN_BODY_BYTES..=1 << 20).contains(&self.body_bytes) {
            bail!("--body-bytes: {} is outside {MIN_BODY_BYTES}..=1048576", self.body_bytes);
        }
        Ok(())
    }
}

/// Fills, drains, reports; the topics (and database) are removed whatever happens.
pub async fn run(base: &Config, options: &Options) -> anyhow::Result<ScenarioReport> {
    let backlog = &options.backlog;
    backlog.validate()?;
    let binary = match &backlog.binary {
        Some(b) => b.clone(),
        None => std::env::current_exe().context("finding the weir binary to start")?,
    };
    let setting = Setting::new(base, "backlog", backlog.stages == BacklogStages::All).await?;
    let outcome = tokio::select! {
        outcome = drive(&setting, options, &binary) => outcome,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    setting.clean_up().await;
    outcome
}

async fn drive(setting: &Setting, options: &Options, binary: &Path) -> anyhow::Result<ScenarioReport> {
    let (config, backlog) = (&setting.config, &options.backlog);
    crate::kafka::topics::apply_dir(config, false).await.context("creating the scenario's topics")?;
    scenario::write_workflows(&setting.workdir, &scenario::workflows(options.tenants, true))?;
    crate::ops::workflows::apply_dir(config, &setting.workdir, false).await.context("publishing the workflows")?;

    let mix = Arc::new(Mix::with_body_bytes(options.tenants, Some(backlog.body_bytes))?);
    let fill = fill(config, options, mix.clone()).await?;

    let config_file = write_child_config(config, &setting.workdir)?;
    let log = setting.workdir.join("weir-run.log");
    let mut child = ChildProcess::start(binary, &config_file, backlog.stages.args(), &log)?;
    let pid = child.pid();
    let cpu_before = CpuSample::of_child(pid);
    let drained = watch(config, options, &mut child, &setting.receiver).await;
    let cpu = CpuSample::of_child(pid).since(&cpu_before);
    let vm_hwm = measure::status_mb(&pid.to_string(), "VmHWM");
    let stopped = child.stop().await;
    let drained = drained?;
    stopped?;

    // The kernel folds each thread's RSS counters into the process's lazily, so VmHWM can read a
    // little below a VmRSS sampled earlier: the peak is the larger of the two.
    let sampled_max = drained.rss_mb.iter().copied().fold(0.0, f64::max);
    let peak = vm_hwm.unwrap_or(0.0).max(sampled_max);
    let mut report = ScenarioReport::new(Scenario::Backlog, cpu, peak);
    let measured = Measured {
        events: backlog.events,
        outputs: drained.outputs,
        latency: Default::default(),
        series: drained.series.clone(),
    };
    report.fill(&measured, drained.elapsed);
    report.rss_series_mb = drained.rss_mb.clone();
    let flat = Flatness::of(&drained.rss_mb);
    let mut extra = |k: &str, v: serde_json::Value| report.extra.insert(k.into(), v);
    extra("stages", json!(backlog.stages));
    extra("topic_prefix", json!(config.topic_prefix));
    extra("child", json!(format!("weir run {}", backlog.stages.args().join(" "))));
    extra("body_bytes", json!(backlog.body_bytes));
    extra("event_bytes_mean", json!(mean_event_bytes(&mix)));
    extra("fill_s", json!(round(fill.as_secs_f64())));
    extra("fill_events_per_s", json!(round(backlog.events as f64 / fill.as_secs_f64())));
    extra("startup_s", json!(round(drained.startup.as_secs_f64())));
    // The rate once the child is up (the first commit), beside `throughput` (from the child's start).
    let working = drained.elapsed.saturating_sub(drained.startup).as_secs_f64().max(1e-3);
    extra("drain_events_per_s_after_startup", json!(round(backlog.events as f64 / working)));
    extra("vm_hwm_mb", json!(vm_hwm.map(round)));
    extra("rss_samples", json!(drained.rss_mb.len()));
    extra("rss_max_sampled_mb", json!(round(sampled_max)));
    extra("rss_last_half_min_mb", json!(round(flat.min)));
    extra("rss_last_half_max_mb", json!(round(flat.max)));
    extra("rss_flatness_mb", json!(round(flat.max - flat.min)));
    extra("rss_limit_mb", json!(RSS_LIMIT_MB));
    extra("within_limit", json!(peak <= RSS_LIMIT_MB));
    Ok(report)
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Puts `--events` events on the events topic as fast as the broker takes them and checks they
/// all arrived; returns how long it took.
async fn fill(config: &Config, options: &Options, mix: Arc<Mix>) -> anyhow::Result<Duration> {
    let n = options.backlog.events;
    let topic = config.names().events();
    let progress = Arc::new(Progress::default());
    let bar = bar(options.progress, n, "fill");
    let started = Instant::now();
    let generator = load::spawn(config, topic.clone(), Shape::Events, mix, Rate::Total(n), 0, progress.clone())?;
    while !generator.is_finished() {
        bar.set_position(progress.produced.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bar.finish_and_clear();
    tokio::task::spawn_blocking(move || generator.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the load generator panicked"))?;
    let elapsed = started.elapsed();
    if let Some(e) = progress.error.lock().expect("error lock").take() {
        bail!(e);
    }
    let on_topic = {
        let offsets = Offsets::new(config, "backlog-fill")?;
        let topic = topic.clone();
        tokio::task::spawn_blocking(move || offsets.end(&topic)).await??
    };
    if on_topic != n {
        bail!("{on_topic} of {n} events reached {topic}");
    }
    Ok(elapsed)
}

/// Mean size on the wire of the events `mix` makes (payload and key).
fn mean_event_bytes(mix: &Mix) -> f64 {
    use rand::SeedableRng as _;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
    let total: usize = (0..1_000)
        .map(|seq| {
            let (key, payload) = mix.record(Shape::Events, seq, load::now_us(), &mut rng);
            key.len() + payload.len()
        })
        .sum();
    total as f64 / 1_000.0
}

/// A progress bar, hidden unless asked for.
fn bar(show: bool, len: u64, prefix: &'static str) -> indicatif::ProgressBar {
    let bar = if show { indicatif::ProgressBar::new(len) } else { indicatif::ProgressBar::hidden() };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix:>10} [{bar:40}] {pos}/{len} {elapsed:>4} {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_prefix(prefix);
    bar
}

/// What watching the child measured.
struct Drained {
    /// From the child's start to the last commit.
    elapsed: Duration,
    /// From the child's start to its first commit.
    startup: Duration,
    /// Events drained per second (from the evaluator's commits).
    series: Vec<Point>,
    rss_mb: Vec<f64>,
    /// HTTP calls the receiver got (`--stages all`).
    outputs: u64,
}

/// Samples the child once a second until its groups have committed everything.
async fn watch(
    config: &Config,
    options: &Options,
    child: &mut ChildProcess,
    receiver: &crate::ops::receiver::Receiver,
) -> anyhow::Result<Drained> {
    let n = options.backlog.events;
    let all = options.backlog.stages == BacklogStages::All;
    let offsets = Arc::new(Offsets::new(config, "backlog-watch")?);
    let groups = Arc::new(Groups::new(config, all)?);
    let bar = bar(options.progress, n, "drain");
    let pid = child.pid().to_string();
    let started = Instant::now();
    let (mut rss_mb, mut series) = (Vec::new(), Vec::new());
    let (mut last_evaluated, mut last_total, mut last_change) = (0, 0, Instant::now());
    let mut startup = None;
    let mut calls = 0u64;
    // Samples a second apart from a second after the start (not at once: the child may still be
    // starting up).
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + Duration::from_secs(1), Duration::from_secs(1));
    loop {
        tick.tick().await;
        if let Some(status) = child.exited()? {
            bail!("weir run exited ({status}) before the backlog was drained:\n{}", child.log_tail());
        }
        // A process between fork and exec reports no RSS of its own: not a sample.
        if let Some(rss) = measure::status_mb(&pid, "VmRSS").filter(|r| *r > 0.0) {
            rss_mb.push(round(rss));
        }
        calls += receiver.drain().len() as u64;
        let (o, g) = (offsets.clone(), groups.clone());
        let state = tokio::task::spawn_blocking(move || g.state(&o)).await??;
        let Some(state) = state else { continue };
        series.push(Point {
            t: series.len() as u64,
            events_per_s: state.evaluated.saturating_sub(last_evaluated),
            p50_ms: 0.0,
            p99_ms: 0.0,
        });
        last_evaluated = state.evaluated;
        bar.set_position(state.evaluated);
        bar.set_message(format!("rss {:.0} MB", rss_mb.last().copied().unwrap_or(0.0)));
        if state.total > last_total {
            startup.get_or_insert(started.elapsed());
            (last_total, last_change) = (state.total, Instant::now());
        } else if last_change.elapsed() > STALL_LIMIT {
            bail!(
                "no commit by weir run for {}s ({} of {n} events evaluated):\n{}",
                STALL_LIMIT.as_secs(),
                state.evaluated,
                child.log_tail()
            );
        }
        if state.evaluated >= n && state.rest_done {
            break;
        }
    }
    bar.finish_and_clear();
    let elapsed = started.elapsed();
    Ok(Drained { elapsed, startup: startup.unwrap_or(elapsed), series, rss_mb, outputs: calls })
}

/// Ends of topics (sum of the partitions' high watermarks).
struct Offsets {
    consumer: BaseConsumer,
}

impl Offsets {
    fn new(config: &Config, name: &str) -> anyhow::Result<Offsets> {
        let consumer = kafka::consumer_config(config, &config.names().group(name))
            .set("statistics.interval.ms", "0")
            .create()
            .context("creating the backlog's offset reader")?;
        Ok(Offsets { consumer })
    }

    fn end(&self, topic: &str) -> anyhow::Result<u64> {
        let partitions = kafka::partition_count(self.consumer.client(), topic)?;
        let mut end = 0;
        for p in 0..partitions {
            let (_, high) = self
                .consumer
                .fetch_watermarks(topic, p, kafka::METADATA_TIMEOUT)
                .with_context(|| format!("reading the end of {topic}[{p}]"))?;
            end += high.max(0) as u64;
        }
        Ok(end)
    }
}

/// The child's consumer groups, read through consumers of the same group id that never
/// subscribe (so they do not join the group and take partitions).
struct Groups {
    /// (group's consumer, its topic, partitions): the evaluator first.
    groups: Vec<(BaseConsumer, String, i32)>,
}

/// Where the child's groups stand.
struct GroupState {
    /// Events the evaluator committed.
    evaluated: u64,
    /// Commits of every group: progress of any of them.
    total: u64,
    /// Every group after the evaluator has committed up to its topic's current end.
    rest_done: bool,
}

impl Groups {
    fn new(config: &Config, all: bool) -> anyhow::Result<Groups> {
        let mut stages = vec![("evaluate".to_string(), config.names().events())];
        if all {
            stages.push((format!("execute-{SERVICE}"), config.names().actions(SERVICE)));
            stages.push(("sink".to_string(), config.names().results()));
        }
        let groups = stages
            .into_iter()
            .map(|(stage, topic)| {
                let consumer: BaseConsumer = kafka::consumer_config(config, &config.names().group(&stage))
                    .set("statistics.interval.ms", "0")
                    .create()
                    .with_context(|| format!("creating a reader of group {stage}'s offsets"))?;
                let partitions = kafka::partition_count(consumer.client(), &topic)?;
                Ok((consumer, topic, partitions))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Groups { groups })
    }

    /// `None` when the broker did not answer this time.
    fn state(&self, offsets: &Offsets) -> anyhow::Result<Option<GroupState>> {
        let mut state = GroupState { evaluated: 0, total: 0, rest_done: true };
        for (i, (consumer, topic, partitions)) in self.groups.iter().enumerate() {
            // A group's commits before its topic's end: read in this order, everything a
            // caught-up stage wrote downstream is below the end read next for the next stage.
            let Some(committed) = scenario::committed_total(consumer, topic, *partitions) else { return Ok(None) };
            state.total += committed;
            if i == 0 {
                state.evaluated = committed;
            } else {
                let end = offsets.end(topic)?;
                state.rest_done &= end > 0 && committed >= end;
            }
        }
        Ok(Some(state))
    }
}

/// Min and max of the last half of an RSS series: after start-up and the first fetches, memory
/// should neither grow nor swing.
#[derive(Debug, PartialEq)]
struct Flatness {
    min: f64,
    max: f64,
}

impl Flatness {
    fn of(series: &[f64]) -> Flatness {
        let half = &series[series.len() / 2..];
        if half.is_empty() {
            return Flatness { min: 0.0, max: 0.0 };
        }
        Flatness {
            min: half.iter().copied().fold(f64::INFINITY, f64::min),
            max: half.iter().copied().fold(0.0, f64::max),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked_with_the_flag_named() {
        assert!(BacklogOptions::default().validate().is_ok());
        let err = BacklogOptions { events: 0, ..Default::default() }.validate().unwrap_err();
        assert!(err.to_string().contains("--events"), "{err}");
        let err = BacklogOptions { body_bytes: 10, ..Default::default() }.validate().unwrap_err();
        assert!(err.to_string().contains("--body-bytes"), "{err}");
    }

    #[test]
    fn flatness_looks_at_the_last_half() {
        assert_eq!(Flatness::of(&[10.0, 80.0, 50.0, 52.0, 51.0, 55.0]), Flatness { min: 51.0, max: 55.0 });
        assert_eq!(Flatness::of(&[]), Flatness { min: 0.0, max: 0.0 });
        assert_eq!(Flatness::of(&[7.0]), Flatness { min: 7.0, max: 7.0 });
    }

    #[test]
    fn the_child_config_loads_as_a_weir_config() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config { topic_prefix: "backlogx.".into(), ..Config::default() };
        config
            .services
            .insert(SERVICE.into(), serde_json::from_value(json!({"url": "http://127.0.0.1:1/hook"})).unwrap());
        config.network.allow.push(std::net::IpAddr::from([127, 0, 0, 1]).into());
        config.evaluator.max_inflight = 1234;
        config.kafka.insert("fetch.max.bytes".into(), "1048576".into());
        config.sink.transactions = 2;
        config.sink.linger = Duration::from_millis(7);
        let loaded = Config::load(&write_child_config(&config, dir.path()).unwrap()).unwrap();
        assert_eq!((loaded.sink.transactions, loaded.sink.linger), (2, Duration::from_millis(7)));
        assert_eq!(loaded.topic_prefix, "backlogx.");
        assert_eq!(loaded.evaluator.max_inflight, 1234);
        assert_eq!(loaded.kafka["fetch.max.bytes"], "1048576");
        assert_eq!(loaded.services[SERVICE].url, "http://127.0.0.1:1/hook");
        assert_eq!(loaded.metrics_addr, None);
    }
}
