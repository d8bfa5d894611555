//! `weir bench --scenario noisy` (and `noisy-burst`): does one tenant that floods the pipeline
//! slow the others down?
//!
//! Quiet tenants send a steady trickle each (10 % of `--rate`, split evenly over `--tenants`);
//! one noisy tenant sends the other 90 %, steadily or (`noisy-burst`) in bursts of
//! [`BURST_EVERY`] / [`BURST_ON`] times its mean rate for [`BURST_ON`] every [`BURST_EVERY`]. One
//! platform-wide workflow with the default limits (so `limits.runs_per_minute` is weir.yaml's
//! default) makes one webhook call per event; the receiver answers in [`RECEIVER_LATENCY`].
//!
//! Three phases, each on fresh topics, consumer groups and database:
//!
//! 0. **one active tenant** (run first, see [`run`]): the `pipeline` scenario with a single
//!    tenant, flat out: the total throughput when nobody else competes, to set beside
//!    `--scenario pipeline` (fairness must not cost throughput);
//! 1. **uncontended**: the quiet tenants alone: each one's p99 event → call is its yardstick;
//! 2. **contended**: the same quiet load plus the noisy tenant, which starts when the window
//!    opens: each quiet tenant's p99 beside its own uncontended p99, split into the tenants on
//!    the noisy tenant's partition (by the partitioner, the same on the events and action topics,
//!    both keyed by tenant) and the others, the share of quiet events called, and the noisy
//!    tenant's own calls per second.
//!
//! A starved phase must still end: the load stops after `--duration`, the phase then waits at
//! most [`drain_limit`] for the quiet events still uncalled, and stopping the stages is capped
//! at [`STOP_LIMIT`]. What was not called by then is reported as such: a tenant's p99 is the
//! latency that 99 % of its *produced* events were called within, so it is `null` when more than
//! 1 % were never called in the phase (its true p99 is beyond the phase's end).

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use hdrhistogram::Histogram;
use rand::{rngs::SmallRng, SeedableRng as _};
use rdkafka::{
    consumer::{BaseConsumer, Consumer as _},
    message::{Header, OwnedHeaders},
    producer::{BaseRecord, DefaultProducerContext, Producer as _, ThreadedProducer},
};
use serde_json::json;

pub use super::noisy_report::{Group, Leg, NoisyReport, OneTenant, Phase, QuietTenant, Split, TenantPhase};
use super::{
    load::{self, Mix, Progress},
    measure::{self, CpuSample, Meter},
    report::ScenarioReport,
    scenario::{self, Setting, SERVICE},
    Options, RateArg, Scenario,
};
use crate::{
    config::Config,
    envelope, kafka,
    ops::receiver::{Mode, Receiver},
    pipeline::Pipeline,
};

/// The external service's answer time (the measurement).
pub const RECEIVER_LATENCY: Duration = Duration::from_millis(20);
/// The noisy tenant's share of `--rate`.
pub const NOISY_SHARE: f64 = 0.9;
/// `noisy-burst`: the noisy tenant sends for this long …
pub const BURST_ON: Duration = Duration::from_secs(1);
/// … once in every this long, at `BURST_EVERY / BURST_ON` times its mean rate, so the mean is
/// the same as the steady variant's.
pub const BURST_EVERY: Duration = Duration::from_secs(10);
/// Defaults when `--rate` and `--tenants` are not given: 20 quiet tenants at 20 events/s each
/// plus 3,600/s from the noisy one.
pub const DEFAULT_RATE: u64 = 4_000;
pub const DEFAULT_QUIET_TENANTS: usize = 20;
/// How long the consumer groups may take to show the first call.
const WARM_UP_LIMIT: Duration = Duration::from_secs(90);
/// After the first call, how long the quiet load runs before the window opens. The first call
/// comes as soon as one executor reader has its partitions; the others, the connection pool and
/// the result sink are still starting then. Opening the window at that call measured the start:
/// the window's first 150–200 ms of quiet events took 100–220 ms (p50 12 ms) in *both* phases,
/// up to two of each tenant's six slowest, i.e. its p99 (2026-12-07, `noisy-<phase>-calls.csv`).
const SETTLE: Duration = Duration::from_secs(3);
/// How long stopping the stages may take: on a build that waits inline for a tenant's run
/// permits, the evaluator's in-flight events of the noisy tenant would hold the stop for minutes.
/// Past it the phase moves on and says so (`stopped_cleanly: false`); a `weir run` child is then
/// killed, stages in this process (`--in-process`) end with it (the contended phase is the last,
/// so they take no other phase's CPU).
pub const STOP_LIMIT: Duration = Duration::from_secs(30);
/// The noisy tenant's name (the quiet ones are chosen around its partition: [`quiet_tenants`]).
pub const NOISY_TENANT: &str = "noisy";

/// After the load stops, how long a phase waits for quiet events still uncalled: as long as
/// the window, at most 30 s.
pub fn drain_limit(duration: Duration) -> Duration {
    duration.min(Duration::from_secs(30))
}

/// How the noisy tenant sends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NoisyLoad {
    /// Not at all (the uncontended phase).
    Off,
    /// At this rate, events per second.
    Steady(f64),
    /// At this mean rate, in bursts of [`BURST_ON`] every [`BURST_EVERY`].
    Burst(f64),
}

impl NoisyLoad {
    /// Events due in the first `t` seconds since the noisy tenant started.
    pub fn due(self, t: f64) -> u64 {
        match self {
            NoisyLoad::Off => 0,
            NoisyLoad::Steady(rate) => (t * rate) as u64,
            NoisyLoad::Burst(mean) => {
                let (on, every) = (BURST_ON.as_secs_f64(), BURST_EVERY.as_secs_f64());
                let per_period = mean * every;
                let periods = (t / every).floor();
                let into = t - periods * every;
                (periods * per_period + into.min(on) / on * per_period) as u64
            }
        }
    }
}

/// `count` quiet tenant names on a topic of `partitions` partitions, chosen so that every
/// partition gets its share and the first one shares the noisy tenant's partition (so with two
/// or more both groups exist): slot k goes to partition `(noisy + k) % partitions`, named by the
/// first `quiet-<i>` the partitioner puts there.
pub fn quiet_tenants(count: usize, partitions: i32) -> Vec<String> {
    let noisy = kafka::partitioner::partition_for_key(NOISY_TENANT.as_bytes(), partitions);
    let mut used = std::collections::HashSet::new();
    (0..count)
        .map(|k| {
            let target = (noisy + k as i32 % partitions) % partitions;
            let i = (1..)
                .find(|i| {
                    !used.contains(i)
                        && kafka::partitioner::partition_for_key(format!("quiet-{i}").as_bytes(), partitions) == target
                })
                .expect("murmur2 reaches every partition");
            used.insert(i);
            format!("quiet-{i}")
        })
        .collect()
}

/// Where one quiet event's time went: produced by the generator, its task made by the evaluator
/// (the task's `created_at`, taken when the evaluator starts planning the event's runs), its
/// call arrived at the receiver. Written to `noisy-<phase>-calls.csv` beside `bench.json`, and
/// summed up in [`Phase::quiet_split`].
#[derive(Debug, Clone, Copy)]
pub(super) struct Traced {
    tenant: u32,
    seq: u64,
    produced_us: u64,
    created_us: Option<u64>,
    arrived_us: u64,
}

impl Traced {
    const CSV_HEADER: &'static str = "tenant,seq,produced_us,created_us,arrived_us\n";

    fn csv_line(&self, tenants: &[String]) -> String {
        let created = self.created_us.map_or(String::new(), |c| c.to_string());
        let tenant = &tenants[self.tenant as usize];
        format!("{tenant},{},{},{created},{}\n", self.seq, self.produced_us, self.arrived_us)
    }
}

/// The quiet events' latency in two legs: event produced → task made (the generator's producer,
/// the broker, the evaluator's consumer and its batch), task made → call arrived (the rest of
/// the evaluator's batch, its producer, the broker, the executor). Clocks are the same machine's.
fn split(traced: &[Traced]) -> Split {
    let (mut to_task, mut to_call) = (measure::histogram(3), measure::histogram(3));
    for t in traced {
        if let Some(created) = t.created_us {
            to_task.saturating_record(created.saturating_sub(t.produced_us).max(1));
            to_call.saturating_record(t.arrived_us.saturating_sub(created).max(1));
        }
    }
    let leg = |h: &Histogram<u64>| Leg {
        p50_ms: h.value_at_quantile(0.5) as f64 / 1e3,
        p99_ms: h.value_at_quantile(0.99) as f64 / 1e3,
        max_ms: h.max() as f64 / 1e3,
    };
    Split { events: to_task.len(), to_task: leg(&to_task), task_to_call: leg(&to_call) }
}

/// Per tenant: latencies (µs) of its first calls, and how many came in the window.
struct TenantStats {
    latency: Histogram<u64>,
    called: u64,
    called_in_window: u64,
}

impl TenantStats {
    fn new() -> TenantStats {
        TenantStats { latency: measure::histogram(3), called: 0, called_in_window: 0 }
    }

    fn phase(&self, produced: u64) -> TenantPhase {
        TenantPhase::of(&self.latency, produced)
    }
}

/// What the generator and the observer share in a phase.
pub(super) struct Shared {
    /// Tenants: the quiet ones, then the noisy one.
    tenants: Vec<String>,
    index: HashMap<String, usize>,
    /// µs since the epoch; 0 until the window opens.
    pub(super) window_start_us: AtomicU64,
    window_end_us: AtomicU64,
    /// The first event sequence number the generator produced after it saw the window open;
    /// `u64::MAX` until then. An event is in the window exactly when its sequence number is at
    /// least this: the generator alone decides, so an event is never counted as called without
    /// having been counted as produced (a timestamp test raced with the window's opening).
    window_first_seq: AtomicU64,
    /// Set when the phase ends: later calls are not counted, so every figure of the phase is
    /// of the same moment.
    closed: std::sync::atomic::AtomicBool,
    /// Per tenant: events produced in the window.
    produced: Vec<AtomicU64>,
    stats: Mutex<(Vec<u64>, Vec<TenantStats>)>,
    /// Every quiet event of the window called, with where its time went (see [`Traced`]).
    traced: Mutex<Vec<Traced>>,
    progress: Arc<Progress>,
    /// While set, the window stays open past `--duration` (a replay that has not finished).
    pub(super) hold: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn new(tenants: Vec<String>, progress: Arc<Progress>) -> Shared {
        let index = tenants.iter().enumerate().map(|(i, t)| (t.clone(), i)).collect();
        let n = tenants.len();
        Shared {
            tenants,
            index,
            window_start_us: AtomicU64::new(0),
            window_end_us: AtomicU64::new(0),
            window_first_seq: AtomicU64::new(u64::MAX),
            closed: Default::default(),
            produced: (0..n).map(|_| AtomicU64::new(0)).collect(),
            stats: Mutex::new((Vec::new(), (0..n).map(|_| TenantStats::new()).collect())),
            traced: Mutex::new(Vec::new()),
            progress,
            hold: Default::default(),
        }
    }

    /// A call for `tenant` of event `seq` produced at `produced_us` arrived at `at_us`: counted
    /// once per event (a retried call is not a second event), if produced in the window.
    /// `created_us`: when the evaluator made the call's task (its `created_at`), if it parses.
    fn record(&self, tenant: usize, seq: u64, produced_us: u64, created_us: Option<u64>, at_us: u64) {
        if seq < self.window_first_seq.load(Ordering::Acquire) {
            return;
        }
        let end = self.window_end_us.load(Ordering::Acquire);
        let mut guard = self.stats.lock().expect("stats lock");
        // Read under the lock the phase's end is set under.
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        let (seen, stats) = &mut *guard;
        let (word, bit) = ((seq / 64) as usize, 1u64 << (seq % 64));
        if seen.len() <= word {
            seen.resize(word + 1024, 0);
        }
        if seen[word] & bit != 0 {
            return;
        }
        seen[word] |= bit;
        let s = &mut stats[tenant];
        s.latency.saturating_record(at_us.saturating_sub(produced_us).max(1));
        s.called += 1;
        if end == 0 || at_us <= end {
            s.called_in_window += 1;
        }
        if tenant < self.quiet() {
            let traced = Traced { tenant: tenant as u32, seq, produced_us, created_us, arrived_us: at_us };
            self.traced.lock().expect("traced lock").push(traced);
        }
    }

    fn quiet(&self) -> usize {
        self.tenants.len() - 1
    }
}

/// The scenario: the three phases, then the report.
pub async fn run(base: &Config, options: &Options, scenario: Scenario) -> anyhow::Result<ScenarioReport> {
    let RateArg::PerSecond(rate) = options.rate else {
        bail!(
            "--rate: the {} scenario needs a rate in events per second (the default is {DEFAULT_RATE})",
            scenario.name()
        )
    };
    let noisy_rate = rate as f64 * NOISY_SHARE;
    let quiet_rate = (rate as f64 - noisy_rate) / options.tenants as f64;
    let noisy =
        if scenario == Scenario::NoisyBurst { NoisyLoad::Burst(noisy_rate) } else { NoisyLoad::Steady(noisy_rate) };

    // The one-active-tenant phase first: stages of a starved contended phase that do not stop
    // within STOP_LIMIT keep running in this process until it ends, and would take its CPU.
    let single = Options {
        scenarios: vec![Scenario::Pipeline],
        tenants: 1,
        rate: RateArg::FlatOut,
        progress: false,
        ..options.clone()
    };
    if options.progress {
        eprintln!("{}: one-active-tenant phase (the pipeline scenario with one tenant, flat out)", scenario.name());
    }
    let one = scenario::run(base, &single, Scenario::Pipeline).await.context("one-active-tenant phase")?;
    let uncontended =
        phase(base, options, quiet_rate, NoisyLoad::Off, None, "uncontended").await.context("uncontended phase")?;
    let contended = phase(base, options, quiet_rate, noisy, None, "contended").await.context("contended phase")?;
    uncontended.write_calls(&options.out, "uncontended")?;
    contended.write_calls(&options.out, "contended")?;

    let quiet = contended.tenants.len() - 1;
    let noisy_partition = kafka::partitioner::partition_for_key(NOISY_TENANT.as_bytes(), contended.partitions);
    let mut quiet_tenants = Vec::new();
    let (mut same, mut other) = (Vec::new(), Vec::new());
    for i in 0..quiet {
        let name = contended.tenants[i].clone();
        let partition = kafka::partitioner::partition_for_key(name.as_bytes(), contended.partitions);
        let u = uncontended.tenant(i);
        let c = contended.tenant(i);
        let p99_ratio = match (u.p99_ms, c.p99_ms) {
            (Some(u), Some(c)) if u > 0.0 => Some(c / u),
            _ => None,
        };
        let shares = partition == noisy_partition;
        if shares { &mut same } else { &mut other }.push(i);
        quiet_tenants.push(QuietTenant {
            tenant: name,
            partition,
            shares_noisy_partition: shares,
            uncontended: u,
            contended: c,
            p99_ratio,
        });
    }
    let group = |members: &[usize]| {
        let ratios: Vec<Option<f64>> = members.iter().map(|&i| quiet_tenants[i].p99_ratio).collect();
        let contended_phase = contended.group(members);
        Group {
            tenants: members.len(),
            contended_produced: contended_phase.produced,
            contended_called: contended_phase.called,
            contended_called_share: contended_phase.called_share,
            uncontended: uncontended.group(members),
            contended: contended_phase,
            worst_p99_ratio: if ratios.is_empty() || ratios.iter().any(Option::is_none) {
                None
            } else {
                ratios.iter().flatten().copied().reduce(f64::max)
            },
        }
    };
    let noisy_report = NoisyReport {
        burst: matches!(noisy, NoisyLoad::Burst(_)),
        noisy_load: match noisy {
            NoisyLoad::Burst(_) => format!(
                "bursts of {:.0}/s for {} s every {} s",
                noisy_rate * BURST_EVERY.as_secs_f64() / BURST_ON.as_secs_f64(),
                BURST_ON.as_secs(),
                BURST_EVERY.as_secs()
            ),
            _ => format!("steady {noisy_rate:.0}/s"),
        },
        noisy_tenant: NOISY_TENANT.into(),
        noisy_rate_per_s: noisy_rate,
        quiet_rate_per_tenant_per_s: quiet_rate,
        receiver_latency_ms: RECEIVER_LATENCY.as_millis() as u64,
        partitions: contended.partitions,
        noisy_partition,
        drain_limit_s: drain_limit(options.duration).as_secs_f64(),
        same_partition: group(&same),
        other_partitions: group(&other),
        uncontended: uncontended.summary.clone(),
        contended: contended.summary.clone(),
        quiet_tenants,
        one_active_tenant: OneTenant {
            events_per_s: one.throughput,
            events: one.events,
            latency_ms: one.latency_ms.clone(),
            note: "the pipeline scenario with one tenant, flat out (receiver answering at once, run limits lifted): \
                   compare with --scenario pipeline of the same build, and with this figure on today's main",
        },
    };
    let mut report = contended.report;
    report.scenario = scenario;
    report.observed_at = scenario.observed_at();
    report.noisy = Some(noisy_report);
    Ok(report)
}

/// What one phase measured.
pub(super) struct PhaseOutcome {
    pub tenants: Vec<String>,
    partitions: i32,
    produced: Vec<u64>,
    stats: Vec<TenantStats>,
    traced: Vec<Traced>,
    pub summary: Phase,
    /// The whole traffic's row (throughput, latency, series, CPU), for the table and the plot.
    pub report: ScenarioReport,
    /// The replay that ran beside the quiet load, if any.
    pub replay: Option<super::replaying::Replayed>,
}

impl PhaseOutcome {
    /// Writes every quiet call of the phase, with its legs' times, to `dir/noisy-<name>-calls.csv`.
    fn write_calls(&self, dir: &std::path::Path, name: &str) -> anyhow::Result<()> {
        let mut text = String::from(Traced::CSV_HEADER);
        for t in &self.traced {
            text += &t.csv_line(&self.tenants);
        }
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("noisy-{name}-calls.csv"));
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    }

    pub(super) fn tenant(&self, i: usize) -> TenantPhase {
        self.stats[i].phase(self.produced[i])
    }

    /// The tenants' events together.
    fn group(&self, members: &[usize]) -> TenantPhase {
        let mut h = measure::histogram(3);
        for &i in members {
            h.add(&self.stats[i].latency).expect("same bounds");
        }
        TenantPhase::of(&h, members.iter().map(|&i| self.produced[i]).sum())
    }
}

/// One phase on fresh topics and database: warm up on the quiet load, open the window (the
/// noisy tenant starts, or the replay), stop the load after `--duration` (and once the replay
/// finished), drain, stop the stages.
pub(super) async fn phase(
    base: &Config,
    options: &Options,
    quiet_rate: f64,
    noisy: NoisyLoad,
    replay: Option<super::replaying::Replay>,
    name: &str,
) -> anyhow::Result<PhaseOutcome> {
    let mut setting = Setting::new(base, "noisy", true).await?;
    let outcome = async {
        crate::kafka::topics::apply_dir(&setting.config, false).await.context("creating the scenario's topics")?;
        tokio::select! {
            outcome = drive(&mut setting.config, options, (quiet_rate, noisy, replay), &setting.receiver, &setting.workdir, name) => outcome,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        }
    }
    .await;
    setting.clean_up().await;
    outcome
}

async fn drive(
    config: &mut Config,
    options: &Options,
    (quiet_rate, noisy, replay): (f64, NoisyLoad, Option<super::replaying::Replay>),
    receiver: &Arc<Receiver>,
    workdir: &std::path::Path,
    name: &str,
) -> anyhow::Result<PhaseOutcome> {
    receiver.set_mode(Mode { latency: RECEIVER_LATENCY, ..Default::default() });
    let partitions = {
        let client: BaseConsumer = kafka::consumer_config(config, &config.names().group("bench-metadata"))
            .create()
            .context("creating a metadata client")?;
        kafka::partition_count(client.client(), &config.names().events())?
    };
    let mut tenants = quiet_tenants(options.tenants, partitions);
    tenants.push(NOISY_TENANT.into());

    // One platform-wide workflow on every event type with weir.yaml's default limits: one call
    // per event, and the default runs_per_minute applies to each tenant.
    let kinds: Vec<&str> = load::EVENT_MIX.iter().map(|(k, _)| *k).collect();
    let workflow = json!({
        "id": "noisy-all", "version": 1, "trigger": {"type": kinds},
        "steps": [{"id": "notify", "service": SERVICE, "input": {"type": "{{ event.type }}"}}],
    });
    scenario::write_workflows(workdir, &[workflow])?;
    crate::ops::workflows::apply_dir(config, workdir, false).await.context("publishing the workflow")?;
    // The events to replay go on the topic before the stages start, past their offsets.
    let backfilled = match &replay {
        Some(r) => r.prepare(config).await?,
        None => None,
    };
    // In a `weir run` child unless `--in-process`, like the other scenarios' stages: in this
    // process they would share its runtime threads with the receiver, which stands for a remote
    // service, and the observer, so a busy stage would delay the very timestamps that measure it.
    let under_test = scenario::start_stages(config, options, &Pipeline::ALL, workdir).await?;

    let progress = Arc::new(Progress::default());
    let shared = Arc::new(Shared::new(tenants, progress.clone()));
    let meter = Arc::new(Meter::new(progress.clone()));
    let observer = observe(receiver.clone(), shared.clone(), meter.clone());
    let generator = generate(config, shared.clone(), quiet_rate, noisy)?;
    let replaying = backfilled.map(|window| {
        let (opened, held) = (shared.clone(), shared.clone());
        super::replaying::spawn(
            config.clone(),
            window,
            move || opened.window_start_us.load(Ordering::Acquire) != 0,
            move |hold| held.hold.store(hold, Ordering::Release),
        )
    });

    let measured = measure(options, &shared, &meter, name, under_test.pid()).await;
    let replay = match replaying {
        Some(task) => Some(task.await.context("the replay task")?),
        None => None,
    };
    progress.stop.cancel();
    let _ = tokio::task::spawn_blocking(move || generator.join()).await;
    let stopped_cleanly = match tokio::time::timeout(STOP_LIMIT, under_test.stop()).await {
        Ok(stopped) => {
            stopped?;
            true
        }
        Err(_) => {
            tracing::warn!(
                "{name} phase: the stages did not stop within {}s (work waiting inside a stage); moving on",
                STOP_LIMIT.as_secs()
            );
            false
        }
    };
    // Aborted and awaited, so that its handle on the counters is gone.
    observer.abort();
    let _ = observer.await;
    let (mut summary, report) = measured?;
    if let Some(e) = progress.error.lock().expect("error lock").take() {
        bail!(e);
    }
    summary.stopped_cleanly = stopped_cleanly;
    let shared = Arc::into_inner(shared).context("the observer still holds the phase's counters")?;
    let produced = shared.produced.iter().map(|p| p.load(Ordering::Relaxed)).collect();
    let (_, stats) = shared.stats.into_inner().expect("stats lock");
    let traced = shared.traced.into_inner().expect("traced lock");
    Ok(PhaseOutcome { tenants: shared.tenants, partitions, produced, stats, traced, summary, report, replay })
}

/// Warm-up, window and drain of a phase; returns its totals and the whole traffic's row.
async fn measure(
    options: &Options,
    shared: &Shared,
    meter: &Meter,
    name: &str,
    child: Option<u32>,
) -> anyhow::Result<(Phase, ScenarioReport)> {
    let progress = &shared.progress;
    let failed = || progress.error.lock().expect("error lock").clone();
    let warm_up = Instant::now();
    while progress.observed.load(Ordering::Relaxed) == 0 {
        if let Some(e) = failed() {
            bail!(e);
        }
        if warm_up.elapsed() > WARM_UP_LIMIT {
            bail!("no call within {}s of starting (are the stages running?)", WARM_UP_LIMIT.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let settled = Instant::now();
    while settled.elapsed() < SETTLE {
        if let Some(e) = failed() {
            bail!(e);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rss_of = child.map_or_else(|| "self".to_string(), |pid| pid.to_string());
    measure::reset_peak_rss_of(&rss_of);
    let cpu = CpuSample::of(child);
    let start_us = load::now_us();
    meter.open(start_us, true);
    shared.window_start_us.store(start_us, Ordering::Release);
    let started = Instant::now();
    if options.progress {
        eprintln!("noisy: {name} phase, {} s window", options.duration.as_secs_f64());
    }
    let held = || shared.hold.load(Ordering::Acquire) && started.elapsed() < super::replaying::HOLD_LIMIT;
    // The window is `--duration` unless a replay held it open longer.
    let mut extended = false;
    while started.elapsed() < options.duration || held() {
        extended |= started.elapsed() >= options.duration;
        let left = options.duration.saturating_sub(started.elapsed()).max(Duration::from_millis(50));
        tokio::time::sleep(Duration::from_millis(250).min(left)).await;
        if let Some(e) = failed() {
            bail!(e);
        }
    }
    let window = if extended { started.elapsed() } else { options.duration };
    let end_us = load::now_us();
    shared.window_end_us.store(end_us, Ordering::Release);
    progress.stop.cancel();
    let cpu = CpuSample::of(child).since(&cpu);
    let m = meter.close(window.as_secs_f64().ceil() as usize);
    let mut report = ScenarioReport::new(Scenario::Noisy, cpu, measure::peak_rss_mb_of(&rss_of));
    report.fill(&m, window);
    let window = window.as_secs_f64();

    // Drain: until every quiet event of the window was called, or the limit.
    let quiet = shared.quiet();
    let quiet_produced = || shared.produced[..quiet].iter().map(|p| p.load(Ordering::Relaxed)).sum::<u64>();
    let quiet_called = || shared.stats.lock().expect("stats lock").1[..quiet].iter().map(|s| s.called).sum::<u64>();
    let drain = Instant::now();
    let limit = drain_limit(options.duration);
    loop {
        // The observer drains the receiver every 50 ms: give it one round before checking.
        tokio::time::sleep(Duration::from_millis(100)).await;
        if quiet_called() >= quiet_produced() || drain.elapsed() >= limit {
            break;
        }
    }
    let drain_s = drain.elapsed().as_secs_f64();

    let guard = shared.stats.lock().expect("stats lock");
    shared.closed.store(true, Ordering::Release);
    let stats = &guard.1;
    let produced: Vec<u64> = shared.produced.iter().map(|p| p.load(Ordering::Relaxed)).collect();
    let mut all_quiet = measure::histogram(3);
    for s in &stats[..quiet] {
        all_quiet.add(&s.latency).expect("same bounds");
    }
    let quiet_produced: u64 = produced[..quiet].iter().sum();
    let quiet_called_in_window: u64 = stats[..quiet].iter().map(|s| s.called_in_window).sum();
    let share = |n: u64| if quiet_produced == 0 { 0.0 } else { n as f64 / quiet_produced as f64 };
    let summary = Phase {
        window_s: window,
        quiet_produced,
        quiet_called_in_window,
        quiet_called: all_quiet.len(),
        quiet_called_share_in_window: share(quiet_called_in_window),
        quiet_called_share: share(all_quiet.len()),
        quiet_latency: TenantPhase::of(&all_quiet, quiet_produced),
        noisy_produced: produced[quiet],
        noisy_calls_per_s: stats[quiet].called_in_window as f64 / window,
        total_calls_per_s: stats.iter().map(|s| s.called_in_window).sum::<u64>() as f64 / window,
        drain_s,
        drained: all_quiet.len() == quiet_produced,
        stopped_cleanly: false,
        quiet_split: split(&shared.traced.lock().expect("traced lock")),
    };
    Ok((summary, report))
}

/// Takes the receiver's calls every 50 ms into the phase's counters and the meter.
fn observe(receiver: Arc<Receiver>, shared: Arc<Shared>, meter: Arc<Meter>) -> tokio::task::JoinHandle<()> {
    // Receiver times are `Instant`s: anchor them to the wall clock once.
    let (anchor, anchor_us) = (Instant::now(), load::now_us());
    tokio::spawn(async move {
        loop {
            for call in receiver.drain() {
                let Some((seq, produced_us)) =
                    call.body["event_id"].as_str().and_then(|s| load::parse_stamp(s.as_bytes()))
                else {
                    continue;
                };
                let Some(&tenant) = call.tenant.as_ref().and_then(|t| shared.index.get(t)) else { continue };
                let at_us = if call.at >= anchor {
                    anchor_us + (call.at - anchor).as_micros() as u64
                } else {
                    anchor_us - (anchor - call.at).as_micros() as u64
                };
                let created_us = call.body["created_at"]
                    .as_str()
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                    .and_then(|t| u64::try_from(t.timestamp_micros()).ok());
                meter.record(seq, produced_us, at_us);
                shared.record(tenant, seq, produced_us, created_us, at_us);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

/// Produces every tenant's events on its own schedule from a thread, until `progress.stop`:
/// the quiet tenants from the start (staggered, so they do not all send in the same
/// millisecond), the noisy one from when the window opens.
fn generate(
    config: &Config,
    shared: Arc<Shared>,
    quiet_rate: f64,
    noisy: NoisyLoad,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let producer: ThreadedProducer<DefaultProducerContext> =
        kafka::producer_config(config).create().context("creating the load generator's producer")?;
    let topic = config.names().events();
    let mix = Mix::new(1)?;
    Ok(std::thread::Builder::new().name("bench-noisy-gen".into()).spawn(move || {
        let progress = shared.progress.clone();
        let quiet = shared.quiet();
        let mut rng = SmallRng::seed_from_u64(42);
        let started = Instant::now();
        let mut noisy_started: Option<Instant> = None;
        let mut sent = vec![0u64; shared.tenants.len()];
        let mut seq = 0u64;
        while !progress.stop.is_cancelled() {
            let window = shared.window_start_us.load(Ordering::Acquire) != 0;
            if window && noisy_started.is_none() {
                noisy_started = Some(Instant::now());
                // Before any event of the window is sent, so before any of them can be called.
                shared.window_first_seq.store(seq, Ordering::Release);
            }
            let mut any = false;
            for (i, tenant) in shared.tenants.iter().enumerate() {
                let due = if i < quiet {
                    (started.elapsed().as_secs_f64() * quiet_rate + i as f64 / quiet as f64) as u64
                } else {
                    noisy_started.map_or(0, |s| noisy.due(s.elapsed().as_secs_f64()))
                };
                // A few hundred per tenant per pass, so a burst does not hold back the others.
                for _ in 0..due.saturating_sub(sent[i]).min(200) {
                    let produced_us = load::now_us();
                    let payload = mix.event_for(tenant, seq, produced_us, &mut rng);
                    let stamp = load::stamp(seq, produced_us);
                    let headers = OwnedHeaders::new_with_capacity(2)
                        .insert(Header { key: envelope::CONTENT_TYPE, value: Some(envelope::JSON) })
                        .insert(Header { key: load::STAMP, value: Some(stamp.as_str()) });
                    let record = BaseRecord::to(&topic).key(tenant.as_str()).payload(payload.as_str()).headers(headers);
                    if let Err(e) = load::send_waiting(&producer, record) {
                        progress.error.lock().expect("error lock").get_or_insert(format!("producing load: {e}"));
                        progress.stop.cancel();
                        return;
                    }
                    if window {
                        shared.produced[i].fetch_add(1, Ordering::Relaxed);
                    }
                    sent[i] += 1;
                    seq += 1;
                    any = true;
                }
            }
            progress.produced.store(seq, Ordering::Relaxed);
            if !any {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        if let Err(e) = producer.flush(Duration::from_secs(60)) {
            progress.error.lock().expect("error lock").get_or_insert(format!("flushing the load: {e}"));
        }
    })?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_send_the_steady_mean_in_one_second_of_ten() {
        let burst = NoisyLoad::Burst(100.0);
        assert_eq!(burst.due(0.0), 0);
        assert_eq!(burst.due(0.5), 500);
        assert_eq!(burst.due(1.0), 1_000);
        assert_eq!(burst.due(9.9), 1_000, "silent between bursts");
        assert_eq!(burst.due(10.5), 1_500);
        assert_eq!(burst.due(20.0), NoisyLoad::Steady(100.0).due(20.0), "the same mean as the steady load");
        assert_eq!(NoisyLoad::Off.due(100.0), 0);
    }

    #[test]
    fn a_call_splits_at_its_task_made_and_untimed_tasks_are_left_out() {
        let call =
            |produced_us, created_us, arrived_us| Traced { tenant: 0, seq: 0, produced_us, created_us, arrived_us };
        // 99 calls: 2 ms to the evaluator, 3 ms on to the receiver; one slow in each leg.
        let mut traced: Vec<Traced> =
            (0..98).map(|i| call(i * 1_000, Some(i * 1_000 + 2_000), i * 1_000 + 5_000)).collect();
        traced.push(call(0, Some(80_000), 81_000));
        traced.push(call(0, Some(1_000), 90_000));
        traced.push(call(0, None, 1_000_000));
        let s = split(&traced);
        assert_eq!(s.events, 100, "the call without a created_at is not in the legs");
        assert!((s.to_task.p50_ms - 2.0).abs() < 0.01 && (s.task_to_call.p50_ms - 3.0).abs() < 0.01, "{s:?}");
        assert!((s.to_task.max_ms - 80.0).abs() < 0.1 && (s.task_to_call.max_ms - 89.0).abs() < 0.1, "{s:?}");
        let line = call(1, Some(2), 3).csv_line(&["quiet-1".to_string()]);
        assert_eq!(line, "quiet-1,0,1,2,3\n");
        assert_eq!(call(1, None, 3).csv_line(&["quiet-1".to_string()]), "quiet-1,0,1,,3\n");
    }

    #[test]
    fn quiet_tenants_fill_both_groups_and_are_distinct() {
        for (count, partitions) in [(2, 8), (20, 8), (3, 1), (20, 3)] {
            let names = quiet_tenants(count, partitions);
            assert_eq!(names.len(), count);
            assert_eq!(names.iter().collect::<std::collections::HashSet<_>>().len(), count, "{names:?}");
            let noisy = kafka::partitioner::partition_for_key(NOISY_TENANT.as_bytes(), partitions);
            let same = names
                .iter()
                .filter(|n| kafka::partitioner::partition_for_key(n.as_bytes(), partitions) == noisy)
                .count();
            assert!(same >= 1, "{count} on {partitions}: one shares the noisy partition");
            if partitions > 1 {
                assert!(same < count, "{count} on {partitions}: one does not");
                assert!(same <= count.div_ceil(partitions as usize), "{count} on {partitions}: no more than its share");
            }
        }
    }

    #[test]
    fn p99_is_over_the_produced_events_and_absent_when_too_few_were_called() {
        let mut h = measure::histogram(3);
        for ms in 1..=100u64 {
            h.record(ms * 1_000).unwrap();
        }
        // All 100 called: the 99th of them.
        let all = TenantPhase::of(&h, 100);
        assert_eq!(all.called_share, 1.0);
        assert!((all.p99_ms.unwrap() - 99.0).abs() < 0.1, "{all:?}");
        // 100 of 101 called: the 100th (ceil(0.99 × 101)) is the slowest called.
        let one_missing = TenantPhase::of(&h, 101);
        assert!((one_missing.p99_ms.unwrap() - 100.0).abs() < 0.1, "{one_missing:?}");
        // 100 of 200 called: the p99 was never reached, the median was (the slowest called).
        let half = TenantPhase::of(&h, 200);
        assert_eq!((half.p99_ms, half.called_share), (None, 0.5));
        assert!((half.p50_ms.unwrap() - 100.0).abs() < 0.1, "{half:?}");
        assert_eq!(TenantPhase::of(&measure::histogram(3), 0).p99_ms, None);
    }
}
