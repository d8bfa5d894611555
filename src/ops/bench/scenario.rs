//! Setting up, driving and tearing down one scenario.

use std::{
    path::Path,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use futures::TryStreamExt as _;
use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    producer::{BaseRecord, DefaultProducerContext, Producer as _, ThreadedProducer},
    Message, Offset, TopicPartitionList,
};
use serde_json::json;

use super::{
    child::{write_child_config, ChildProcess},
    load::{self, Mix, Progress, Rate, Shape},
    measure::{self, CpuSample, Meter},
    report::ScenarioReport,
    Options, RateArg, Scenario,
};
use crate::{
    config::{Config, ServiceConfig},
    envelope::{self, ActionResult},
    kafka,
    ops::receiver::{Mode, Receiver},
    pipeline::{Pipeline, StageName},
};

/// Produced but not yet observed, at most, when flat out: enough that the stage never waits for
/// input, few enough that the backlog (and librdkafka's queues) stay small.
const FLAT_OUT_AHEAD: u64 = 50_000;
/// The same for the sink, whose progress is seen through its committed offsets: they trail what
/// it wrote by up to the auto-commit interval (1 s), so the margin must cover a second of writes
/// and more, or the generator (not the sink) sets the pace.
const FLAT_OUT_AHEAD_SINK: u64 = 300_000;
/// How long a scenario may take to show its first output (consumer groups joining, definitions
/// loading) before it counts as broken.
const WARM_UP_LIMIT: Duration = Duration::from_secs(90);
/// The service the workflows call.
pub(super) const SERVICE: &str = "webhook";
/// How the remote scenario's service answers: after 200 ms ± 50 ms (uniform), as the design
/// documents' real services do (100–500 ms).
const REMOTE_LATENCY: Duration = Duration::from_millis(200);
const REMOTE_JITTER: Duration = Duration::from_millis(50);

/// THE place where the throttled scenario sets its limit: the service's own request limit
/// (`services.<name>.limits`, a governor GCRA limit in the executor). The receiver's call times
/// measure what is reached.
fn set_throttle(_workflow: &mut serde_json::Value, config: &mut Config, per_second: u64) -> anyhow::Result<()> {
    let service = config.services.get_mut(SERVICE).context("the bench service")?;
    service.limits = serde_json::from_value(json!([{"requests": per_second, "per": "second"}]))?;
    Ok(())
}

/// The configured rate of the throttled scenario, and the rate offered to it (twice as much).
const THROTTLE_PER_SECOND: u64 = 50;

/// One scenario from set-up to clean-up.
pub async fn run(base: &Config, options: &Options, scenario: Scenario) -> anyhow::Result<ScenarioReport> {
    let mut setting = Setting::new(base, "bench", matches!(scenario, Scenario::Pipeline | Scenario::Sink)).await?;
    let outcome = async {
        crate::kafka::topics::apply_dir(&setting.config, false).await.context("creating the scenario's topics")?;
        // Ctrl-C ends the scenario here, so its topics and database are still removed below.
        tokio::select! {
            outcome = drive(&mut setting.config, options, scenario, &setting.receiver, &setting.workdir) => outcome,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        }
    }
    .await;
    setting.clean_up().await;
    outcome
}

/// What a scenario runs in: a config on a random topic prefix (and its own database when it
/// writes), the HTTP receiver its service points at, and a work directory.
pub(super) struct Setting {
    pub config: Config,
    pub receiver: Arc<Receiver>,
    pub workdir: std::path::PathBuf,
    database: Option<Database>,
}

impl Setting {
    /// `kind` starts the topic prefix (`bench`, `backlog`), so leftovers say what left them.
    pub async fn new(base: &Config, kind: &str, database: bool) -> anyhow::Result<Setting> {
        let mut config = base.clone();
        config.topic_prefix = format!("{kind}{}.", &uuid::Uuid::new_v4().simple().to_string()[..10]);
        config.metrics_addr = None;
        let receiver = Arc::new(Receiver::start().await.context("starting the HTTP receiver")?);
        // The config's own `webhook` service, if it has one (its concurrency, tenant_concurrency,
        // retry, breaker: what an A/B with `--config` varies), pointed at the receiver.
        let service = ServiceConfig {
            url: receiver.url("hook"),
            timeout: Duration::from_secs(10),
            limits: Vec::new(),
            ..base.services.get(SERVICE).cloned().unwrap_or_default()
        };
        config.services = [(SERVICE.to_string(), service)].into();
        // The receiver is on this machine, which the network policy refuses unless allowed.
        config.network.allow.push(std::net::IpAddr::from([127, 0, 0, 1]).into());
        let workdir = std::env::temp_dir().join(format!("weir-{}", config.topic_prefix.trim_end_matches('.')));
        let database = if database { Some(Database::create(&config.database_url).await?) } else { None };
        if let Some(db) = &database {
            config.database_url = db.url.clone();
        }
        Ok(Setting { config, receiver, workdir, database })
    }

    /// Removes the work directory, the topics and the database, whatever happened; a failed
    /// clean-up is logged but does not hide the outcome.
    pub(crate) async fn clean_up(self) {
        let _ = std::fs::remove_dir_all(&self.workdir);
        if let Err(e) = crate::kafka::topics::delete_all(&self.config).await {
            tracing::warn!("deleting the topics of {}: {e:#}", self.config.topic_prefix);
        }
        if let Some(db) = self.database {
            if let Err(e) = db.drop().await {
                tracing::warn!("dropping database {}: {e:#}", db.name);
            }
        }
    }
}

/// What runs under test, to stop once measured.
pub(super) enum UnderTest {
    Passthrough(std::thread::JoinHandle<anyhow::Result<()>>),
    /// The stages in this process (`--in-process`).
    Stages(Pipeline),
    /// The stages in a `weir run` child, measured apart from the generator, observer and
    /// receiver (this process).
    Child(ChildProcess),
}

impl UnderTest {
    /// The process whose CPU and memory are the scenario's: the child, or this one.
    pub(super) fn pid(&self) -> Option<u32> {
        match self {
            UnderTest::Child(c) => Some(c.pid()),
            _ => None,
        }
    }

    /// Where it runs, for the report.
    fn place(&self) -> &'static str {
        match self {
            UnderTest::Child(_) => "weir run child",
            _ => "this process",
        }
    }

    /// Stops it: the stages drain (in this process or the child, SIGTERM), the passthrough ends.
    pub(super) async fn stop(self) -> anyhow::Result<()> {
        match self {
            UnderTest::Passthrough(t) => tokio::task::spawn_blocking(move || t.join())
                .await?
                .unwrap_or_else(|_| bail!("the passthrough panicked")),
            UnderTest::Stages(p) => p.stop().await,
            UnderTest::Child(c) => c.stop().await,
        }
    }
}

/// Starts `stages` as `options` say: in a `weir run` child (the default), or in this process.
pub(super) async fn start_stages(
    config: &Config,
    options: &Options,
    stages: &[StageName],
    workdir: &Path,
) -> anyhow::Result<UnderTest> {
    if options.in_process {
        return Ok(UnderTest::Stages(Pipeline::start(Arc::new(config.clone()), stages).await?));
    }
    let binary = match &options.backlog.binary {
        Some(b) => b.clone(),
        None => std::env::current_exe().context("finding the weir binary to start")?,
    };
    std::fs::create_dir_all(workdir).with_context(|| format!("creating {}", workdir.display()))?;
    let file = write_child_config(config, workdir)?;
    let args: Vec<&str> = stages
        .iter()
        .flat_map(|s| {
            let name = match s {
                StageName::Ingest => "ingest",
                StageName::Evaluate => "evaluate",
                StageName::Execute => "execute",
                StageName::Sink => "sink",
            };
            ["--stage", name]
        })
        .collect();
    Ok(UnderTest::Child(ChildProcess::start(&binary, &file, &args, &workdir.join("weir-run.log"))?))
}

/// Where output is observed.
enum Observer {
    Topic(std::thread::JoinHandle<anyhow::Result<()>>),
    Receiver(tokio::task::JoinHandle<()>),
    /// The sink's committed offsets: only progress; latency is read from the table afterwards.
    Committed(tokio::task::JoinHandle<()>),
}

async fn drive(
    config: &mut Config,
    options: &Options,
    scenario: Scenario,
    receiver: &Arc<Receiver>,
    workdir: &Path,
) -> anyhow::Result<ScenarioReport> {
    let progress = Arc::new(Progress::default());
    let meter = Arc::new(Meter::new(progress.clone()));
    let tenants = if scenario == Scenario::Throttled { 1 } else { options.tenants };
    let mix = Arc::new(Mix::new(tenants)?);
    let (mut rate, mut head_start) = match options.rate {
        RateArg::PerSecond(r) => (Rate::PerSecond(r), 0),
        RateArg::FlatOut if scenario == Scenario::Sink => (Rate::FlatOut { max_ahead: FLAT_OUT_AHEAD_SINK }, 0),
        RateArg::FlatOut => (Rate::FlatOut { max_ahead: FLAT_OUT_AHEAD }, 0),
    };
    let mut warm_until = 1;

    // Stages that feed the ones under test, run in this process (the remote scenario's evaluator).
    let mut feeder = None;
    // Set up what is measured and where its output is seen.
    let (under_test, observer, input) = match scenario {
        Scenario::Baseline => {
            let passthrough = passthrough(config, progress.clone())?;
            let observer = observe_topic(config, config.names().results(), meter.clone(), progress.clone())?;
            (UnderTest::Passthrough(passthrough), Observer::Topic(observer), (config.names().events(), Shape::Events))
        }
        Scenario::Evaluate | Scenario::Pipeline | Scenario::Throttled | Scenario::Remote => {
            let mut workflows = workflows(tenants, scenario != Scenario::Throttled);
            if scenario == Scenario::Remote {
                receiver.set_mode(Mode { latency: REMOTE_LATENCY, jitter: REMOTE_JITTER, ..Mode::default() });
                // The scenario measures what one executor process holds in flight, not the
                // per-tenant caps: with the bench's Zipf-skewed tenants the busiest would
                // otherwise be held to tenant_concurrency calls per 200 ms.
                if let Some(service) = config.services.get_mut(SERVICE) {
                    service.tenant_concurrency = service.concurrency.unwrap_or(config.executor.concurrency);
                }
            }
            if scenario == Scenario::Throttled {
                set_throttle(&mut workflows[0], config, THROTTLE_PER_SECOND)?;
                rate = Rate::PerSecond(THROTTLE_PER_SECOND * 2);
                // Start once a backlog has formed (the limiter's burst is a single call at this
                // rate), so the window sees the limit and not the offered rate.
                head_start = THROTTLE_PER_SECOND * 2;
                warm_until = head_start;
            }
            write_workflows(workdir, &workflows)?;
            crate::ops::workflows::apply_dir(config, workdir, false).await.context("publishing the workflows")?;
            let stages: &[StageName] = match scenario {
                Scenario::Evaluate => &[StageName::Evaluate],
                Scenario::Throttled => &[StageName::Evaluate, StageName::Execute],
                // The executor alone is under test, so its CPU and memory are its own; the
                // evaluator feeding it runs here, beside the generator.
                Scenario::Remote if !options.in_process => {
                    feeder = Some(Pipeline::start(Arc::new(config.clone()), &[StageName::Evaluate]).await?);
                    &[StageName::Execute]
                }
                Scenario::Remote => &[StageName::Evaluate, StageName::Execute],
                _ => &Pipeline::ALL,
            };
            let under_test = start_stages(config, options, stages, workdir).await?;
            let observer = if scenario == Scenario::Evaluate {
                Observer::Topic(observe_topic(
                    config,
                    config.names().actions(SERVICE),
                    meter.clone(),
                    progress.clone(),
                )?)
            } else {
                Observer::Receiver(observe_receiver(receiver.clone(), meter.clone(), progress.clone()))
            };
            (under_test, observer, (config.names().events(), Shape::Events))
        }
        Scenario::Backlog => bail!("the backlog scenario runs through bench::backlog"),
        Scenario::Noisy | Scenario::NoisyBurst => bail!("the noisy scenarios run through bench::noisy"),
        Scenario::Replay => bail!("the replay scenario runs through bench::replay"),
        Scenario::Scale => bail!("the scale scenario runs through bench::scale"),
        Scenario::Ingest => bail!("the ingest scenario runs through bench::ingest"),
        Scenario::Sink => {
            let under_test = start_stages(config, options, &[StageName::Sink], workdir).await?;
            let observer = observe_committed(config, progress.clone())?;
            (under_test, Observer::Committed(observer), (config.names().results(), Shape::Results))
        }
    };

    let generator = load::spawn(config, input.0, input.1, mix.clone(), rate, head_start, progress.clone())?;
    let settle = (scenario == Scenario::Throttled).then_some(THROTTLE_PER_SECOND);
    let measured = measure_window(options, scenario, &meter, &progress, warm_until, settle, under_test.pid()).await;
    progress.stop.cancel();
    let _ = tokio::task::spawn_blocking(move || generator.join()).await;
    let place = under_test.place();
    let child_log = match (&under_test, &measured) {
        (UnderTest::Child(c), Err(_)) => Some(c.log_tail()),
        _ => None,
    };
    let stopped = under_test.stop().await;
    if let Some(feeder) = feeder {
        feeder.stop().await?;
    }
    let observed = match observer {
        Observer::Topic(t) => {
            tokio::task::spawn_blocking(move || t.join()).await?.unwrap_or_else(|_| bail!("the observer panicked"))
        }
        Observer::Receiver(t) | Observer::Committed(t) => {
            t.abort();
            Ok(())
        }
    };
    let (window, mut report) = match (measured, &child_log) {
        (Err(e), Some(log)) => bail!("{e:#}\nthe weir run child's log ends:\n{log}"),
        (measured, _) => measured?,
    };
    stopped?;
    observed?;
    if let Some(e) = progress.error.lock().expect("error lock").take() {
        bail!(e);
    }

    // What the generator offered in all (warm-up included): with what was seen, tells whether
    // the scenario kept up.
    report.extra.insert("produced".into(), json!(progress.produced.load(Ordering::Relaxed)));
    report.extra.insert("stages_run_in".into(), json!(place));
    match scenario {
        Scenario::Pipeline => {
            let (rows, latency) = stored_latency(&config.database_url, &window).await?;
            report.extra.insert("sink_rows_in_window".into(), json!(rows));
            report.extra.insert("event_to_row_ms".into(), json!(latency));
        }
        Scenario::Throttled => {
            let achieved = report.throughput;
            report.extra.insert("configured_per_s".into(), json!(THROTTLE_PER_SECOND));
            report.extra.insert("offered_per_s".into(), json!(THROTTLE_PER_SECOND * 2));
            report.extra.insert("achieved_per_s".into(), json!(achieved));
            report.extra.insert("accuracy".into(), json!(achieved / THROTTLE_PER_SECOND as f64));
            report
                .extra
                .insert("limit_set_by".into(), json!("services.<name>.limits (executor, global requests per second)"));
        }
        Scenario::Remote => {
            let service = config.services.get(SERVICE);
            let concurrency = service.and_then(|s| s.concurrency).unwrap_or(config.executor.concurrency);
            report.extra.insert("service_latency_ms".into(), json!("200 ± 50 (uniform)"));
            report.extra.insert("calls_per_s".into(), json!(report.outputs as f64 / report.duration_s.max(1e-3)));
            report.extra.insert("concurrency".into(), json!(concurrency));
            report.extra.insert("tenant_concurrency".into(), json!(service.map(|s| s.tenant_concurrency)));
            report.extra.insert("max_in_flight_bytes".into(), json!(config.executor.max_in_flight_bytes));
            report.extra.insert("http_version".into(), json!(service.map(|s| s.http.version)));
            // What the service saw: the most calls it was answering at once.
            report.extra.insert("most_calls_at_once".into(), json!(receiver.most_in_flight()));
            // Calls in flight can be no more than `concurrency`: at 200 ms each, that many per
            // 0.2 s is the most one process can call.
            report.extra.insert("concurrency_bound_calls_per_s".into(), json!(concurrency as f64 / 0.2));
        }
        Scenario::Sink => {
            // The rows the sink wrote in the window are its output: read them back with their
            // recorded_at for the throughput, series and latency.
            let rows = feed_rows(&config.database_url, &window, &meter).await?;
            let m = meter.close(options.duration.as_secs_f64().ceil() as usize);
            report.fill(&m, options.duration);
            let copy = standalone_copy(&config.database_url, &mix, rows.max(1)).await?;
            report.extra.insert("copy_rows".into(), json!(rows.max(1)));
            report.extra.insert("copy_rows_per_s".into(), json!(copy));
            report.extra.insert("sink_vs_copy".into(), json!(report.throughput / copy));
        }
        _ => {}
    }
    Ok(report)
}

/// Start and end of the measured window, µs since the epoch.
struct Window {
    start_us: u64,
    end_us: u64,
    /// Events produced before this are not measured (0 unless paced: see `Meter::open`).
    produced_from_us: u64,
}

async fn measure_window(
    options: &Options,
    scenario: Scenario,
    meter: &Meter,
    progress: &Progress,
    warm_until: u64,
    settle_per_s: Option<u64>,
    child: Option<u32>,
) -> anyhow::Result<(Window, ScenarioReport)> {
    let warm_up = Instant::now();
    let mut last: Option<(Instant, u64)> = None;
    loop {
        let observed = progress.observed.load(Ordering::Relaxed);
        if observed >= warm_until {
            // Throttled: also wait until what queued behind the limiter's burst has drained, i.e.
            // a second's calls are within half again of the limit.
            let Some(limit) = settle_per_s else { break };
            match last {
                Some((at, seen)) if at.elapsed() >= Duration::from_secs(1) => {
                    if (observed - seen) as f64 / at.elapsed().as_secs_f64() <= limit as f64 * 1.5 {
                        break;
                    }
                    last = Some((Instant::now(), observed));
                }
                Some(_) => {}
                None => last = Some((Instant::now(), observed)),
            }
        }
        if let Some(e) = progress.error.lock().expect("error lock").clone() {
            bail!(e);
        }
        if warm_up.elapsed() > WARM_UP_LIMIT {
            bail!("no output within {}s of starting (is the stage running?)", WARM_UP_LIMIT.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let bar = if options.progress {
        indicatif::ProgressBar::new(options.duration.as_millis() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix:>10} [{bar:40}] {elapsed:>4} {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_prefix(scenario.name());
    let under_test = child.map_or_else(|| "self".to_string(), |pid| pid.to_string());
    measure::reset_peak_rss_of(&under_test);
    let cpu = CpuSample::of(child);
    let start_us = load::now_us();
    // At a paced rate (not flat out, not the throttled backlog) only events produced inside the
    // window count: see `Meter::open`.
    let paced = matches!(options.rate, RateArg::PerSecond(_)) && scenario != Scenario::Throttled;
    meter.open(start_us, paced);
    let started = Instant::now();
    while started.elapsed() < options.duration {
        tokio::time::sleep(Duration::from_millis(250).min(options.duration.saturating_sub(started.elapsed()))).await;
        let elapsed = started.elapsed().as_secs_f64().max(1e-3);
        bar.set_position(started.elapsed().as_millis() as u64);
        if scenario != Scenario::Sink {
            bar.set_message(format!("{:>9.0} events/s", meter.events() as f64 / elapsed));
        }
        if let Some(e) = progress.error.lock().expect("error lock").clone() {
            bar.abandon();
            bail!(e);
        }
    }
    let end_us = load::now_us();
    let cpu = CpuSample::of(child).since(&cpu);
    let peak_rss_mb = measure::peak_rss_mb_of(&under_test);
    bar.finish_and_clear();
    let mut report = ScenarioReport::new(scenario, cpu, peak_rss_mb);
    if scenario != Scenario::Sink {
        let m = meter.close(options.duration.as_secs_f64().ceil() as usize);
        report.fill(&m, options.duration);
    }
    Ok((Window { start_us, end_us, produced_from_us: if paced { start_us } else { 0 } }, report))
}

/// Workflows of the load: one platform-wide workflow on every event type (so every event
/// becomes one task) and, per tenant, two with conditions (a paid member's welcome, a public
/// post's announcement). No practical per-tenant run limit: the load is Zipf-skewed on purpose.
pub(super) fn workflows(tenants: usize, per_tenant: bool) -> Vec<serde_json::Value> {
    let limits = json!({"runs_per_minute": 1_000_000});
    let kinds: Vec<&str> = load::EVENT_MIX.iter().map(|(k, _)| *k).collect();
    let mut all = vec![json!({
        "id": "bench-all", "version": 1, "trigger": {"type": kinds}, "limits": limits,
        "steps": [{"id": "notify", "service": SERVICE, "input": {"type": "{{ event.type }}"}}],
    })];
    if per_tenant {
        for rank in 1..=tenants {
            let tenant = Mix::tenant_name(rank);
            all.push(json!({
                "id": "welcome-paid", "tenant": tenant, "version": 1, "limits": limits,
                "trigger": {"type": "member.created", "if": "data.member.status == \"paid\""},
                "steps": [{"id": "welcome", "service": SERVICE, "input": {"to": "{{ data.member.email }}"}}],
            }));
            all.push(json!({
                "id": "announce-post", "tenant": tenant, "version": 1, "limits": limits,
                "trigger": {"type": "post.published", "if": "data.post.visibility == \"public\""},
                "steps": [{"id": "announce", "service": SERVICE, "input": {"title": "{{ data.post.title }}"}}],
            }));
        }
    }
    all
}

pub(super) fn write_workflows(dir: &Path, workflows: &[serde_json::Value]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (i, wf) in workflows.iter().enumerate() {
        // JSON is YAML.
        std::fs::write(dir.join(format!("wf{i:05}.yaml")), serde_json::to_vec(wf)?)?;
    }
    Ok(())
}

/// The ceiling: consume the events topic and produce every record as it is (key, headers,
/// payload) to the results topic, with weir's own client settings.
fn passthrough(
    config: &Config,
    progress: Arc<Progress>,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<()>>> {
    let consumer: BaseConsumer = kafka::consumer_config(config, &config.names().group("baseline"))
        .set("enable.auto.offset.store", "true")
        .set("statistics.interval.ms", "0")
        .create()
        .context("creating the passthrough consumer")?;
    consumer.subscribe(&[&config.names().events()])?;
    let producer: ThreadedProducer<DefaultProducerContext> =
        kafka::producer_config(config).create().context("creating the passthrough producer")?;
    let out = config.names().results();
    Ok(std::thread::Builder::new().name("bench-passthrough".into()).spawn(move || {
        while !progress.stop.is_cancelled() {
            let Some(message) = consumer.poll(Duration::from_millis(100)) else { continue };
            let message = message.context("passthrough consume")?;
            let mut record = BaseRecord::to(&out).payload(message.payload().unwrap_or_default());
            if let Some(key) = message.key() {
                record = record.key(key);
            }
            if let Some(headers) = message.headers() {
                record = record.headers(headers.detach());
            }
            load::send_waiting(&producer, record).context("passthrough produce")?;
        }
        producer.flush(Duration::from_secs(10)).context("passthrough flush")?;
        Ok(())
    })?)
}

/// Consumes `topic` from the beginning with a group of its own and records every stamped record.
fn observe_topic(
    config: &Config,
    topic: String,
    meter: Arc<Meter>,
    progress: Arc<Progress>,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<()>>> {
    let consumer: BaseConsumer = kafka::consumer_config(config, &config.names().group("bench-observer"))
        .set("enable.auto.commit", "false")
        .set("statistics.interval.ms", "0")
        .create()
        .context("creating the observer")?;
    consumer.subscribe(&[&topic])?;
    Ok(std::thread::Builder::new().name("bench-observe".into()).spawn(move || {
        while !progress.stop.is_cancelled() {
            let Some(message) = consumer.poll(Duration::from_millis(100)) else { continue };
            let message = message.with_context(|| format!("observing {topic}"))?;
            let stamp = kafka::header(message.headers(), load::STAMP)
                .and_then(load::parse_stamp)
                .or_else(|| load::stamp_in_json(message.payload().unwrap_or_default()));
            if let Some((seq, produced_us)) = stamp {
                meter.record(seq, produced_us, load::now_us());
            }
        }
        Ok(())
    })?)
}

/// Takes the receiver's recorded calls every 50 ms; a call's arrival is its action start.
fn observe_receiver(
    receiver: Arc<Receiver>,
    meter: Arc<Meter>,
    progress: Arc<Progress>,
) -> tokio::task::JoinHandle<()> {
    // Receiver times are `Instant`s: anchor them to the wall clock once.
    let (anchor, anchor_us) = (Instant::now(), load::now_us());
    tokio::spawn(async move {
        while !progress.stop.is_cancelled() {
            for call in receiver.drain() {
                let Some(stamp) = call.body["event_id"].as_str().and_then(|s| load::parse_stamp(s.as_bytes())) else {
                    continue;
                };
                let at_us = if call.at >= anchor {
                    anchor_us + (call.at - anchor).as_micros() as u64
                } else {
                    anchor_us - (anchor - call.at).as_micros() as u64
                };
                meter.record(stamp.0, stamp.1, at_us);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

/// The sink's progress for the flat-out pacing: offsets it committed on the results topic.
fn observe_committed(config: &Config, progress: Arc<Progress>) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let consumer: BaseConsumer =
        kafka::consumer_config(config, &config.names().group("sink")).set("statistics.interval.ms", "0").create()?;
    let topic = config.names().results();
    let partitions = kafka::partition_count(consumer.client(), &topic)?;
    let consumer = Arc::new(consumer);
    Ok(tokio::spawn(async move {
        while !progress.stop.is_cancelled() {
            let (c, topic) = (consumer.clone(), topic.clone());
            let committed = tokio::task::spawn_blocking(move || committed_total(&c, &topic, partitions)).await;
            if let Ok(Some(n)) = committed {
                progress.observed.store(n, Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }))
}

/// Sum over `topic`'s partitions of the offsets committed by `consumer`'s group (a partition
/// without a commit counts 0); `None` when the broker does not answer.
pub(super) fn committed_total(consumer: &BaseConsumer, topic: &str, partitions: i32) -> Option<u64> {
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(tpl, Duration::from_secs(5)).ok()?;
    Some(committed.elements().iter().map(|e| if let Offset::Offset(o) = e.offset() { o as u64 } else { 0 }).sum())
}

/// Rows the pipeline stored in the window, and the event → row latency percentiles (ms).
async fn stored_latency(url: &str, window: &Window) -> anyhow::Result<(i64, serde_json::Value)> {
    let pool = sqlx::PgPool::connect(url).await?;
    let row: (i64, Option<Vec<f64>>) = sqlx::query_as(
        "select count(*), percentile_disc(array[0.5, 0.9, 0.99, 0.999]) within group (order by l)
         from (select extract(epoch from recorded_at) * 1e3 - split_part(event_id, '-', 2)::float8 / 1e3 as l
               from action_results where recorded_at between to_timestamp($1::float8 / 1e6) and to_timestamp($2::float8 / 1e6)
                 and split_part(event_id, '-', 2)::float8 >= $3) x",
    )
    .bind(window.start_us as f64)
    .bind(window.end_us as f64)
    .bind(window.produced_from_us as f64)
    .fetch_one(&pool)
    .await
    .context("reading the stored results")?;
    pool.close().await;
    let p = row.1.unwrap_or_default();
    let at = |i: usize| p.get(i).copied().map(|v| (v * 1e3).round() / 1e3);
    Ok((row.0, json!({"p50": at(0), "p90": at(1), "p99": at(2), "p999": at(3)})))
}

/// Feeds the rows the sink stored in the window to the meter; returns how many.
async fn feed_rows(url: &str, window: &Window, meter: &Meter) -> anyhow::Result<u64> {
    let pool = sqlx::PgPool::connect(url).await?;
    let mut rows = sqlx::query_as::<_, (String, f64)>(
        "select event_id, extract(epoch from recorded_at)::float8 * 1e6 from action_results
         where recorded_at between to_timestamp($1::float8 / 1e6) and to_timestamp($2::float8 / 1e6)",
    )
    .bind(window.start_us as f64)
    .bind(window.end_us as f64)
    .fetch(&pool);
    let mut n = 0;
    while let Some((event_id, recorded_us)) = rows.try_next().await.context("reading the stored results")? {
        if let Some((seq, produced_us)) = load::parse_stamp(event_id.as_bytes()) {
            meter.record(seq, produced_us, recorded_us as u64);
            n += 1;
        }
    }
    drop(rows);
    pool.close().await;
    Ok(n)
}

/// COPYs `rows` results of the same shape into a copy of the results table (same indexes) and
/// returns rows per second; the text is prepared before the clock starts.
async fn standalone_copy(url: &str, mix: &Mix, rows: u64) -> anyhow::Result<f64> {
    use rand::SeedableRng as _;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    let mut chunks = Vec::new();
    let mut chunk = Vec::with_capacity(1 << 20);
    for seq in 0..rows {
        let (_, json) = mix.record(Shape::Results, seq, load::now_us(), &mut rng);
        let r: ActionResult = envelope::decode(json.as_bytes(), None)?;
        copy_line(&r, &mut chunk);
        if chunk.len() >= 1 << 20 {
            chunks.push(std::mem::replace(&mut chunk, Vec::with_capacity(1 << 20)));
        }
    }
    chunks.push(chunk);
    let pool = sqlx::PgPool::connect(url).await?;
    let mut conn = pool.acquire().await?;
    sqlx::query("create table bench_copy (like action_results including all)").execute(&mut *conn).await?;
    // The partition key, which the record stage takes from each result: here every row's now().
    sqlx::query("alter table bench_copy alter column run_at set default now()").execute(&mut *conn).await?;
    let started = Instant::now();
    let mut copy = conn
        .copy_in_raw(
            "copy bench_copy (task_id, run_id, event_id, tenant, workflow_id, workflow_version, step_id, service,
             status, attempts, latency_ms, http_status, error, output, finished_at) from stdin (format text)",
        )
        .await?;
    for c in chunks {
        copy.send(c).await?;
    }
    let copied = copy.finish().await?;
    let elapsed = started.elapsed().as_secs_f64();
    drop(conn);
    pool.close().await;
    if copied != rows {
        bail!("COPY wrote {copied} rows of {rows}");
    }
    Ok(rows as f64 / elapsed)
}

/// One row in COPY's text format.
fn copy_line(r: &ActionResult, out: &mut Vec<u8>) {
    fn text(out: &mut Vec<u8>, value: Option<&str>) {
        match value {
            None => out.extend_from_slice(b"\\N"),
            Some(v) => {
                for b in v.bytes() {
                    match b {
                        b'\\' => out.extend_from_slice(b"\\\\"),
                        b'\t' => out.extend_from_slice(b"\\t"),
                        b'\n' => out.extend_from_slice(b"\\n"),
                        b'\r' => out.extend_from_slice(b"\\r"),
                        _ => out.push(b),
                    }
                }
            }
        }
        out.push(b'\t');
    }
    let output = r.output.as_ref().map(|o| o.to_string());
    let (version, attempts, latency) =
        (r.workflow_version.to_string(), r.attempts.to_string(), r.latency_ms.to_string());
    let http = r.http_status.map(|h| h.to_string());
    for v in [&r.task_id, &r.run_id, &r.event_id, &r.tenant, &r.workflow_id] {
        text(out, Some(v));
    }
    text(out, Some(&version));
    text(out, Some(&r.step_id));
    text(out, Some(&r.service));
    text(out, Some(r.status.as_str()));
    text(out, Some(&attempts));
    text(out, Some(&latency));
    text(out, http.as_deref());
    text(out, r.error.as_deref());
    text(out, output.as_deref());
    text(out, Some(&r.finished_at));
    out.pop();
    out.push(b'\n');
}

/// A database of its own for one scenario.
pub(super) struct Database {
    admin: String,
    pub(super) name: String,
    pub(super) url: String,
}

impl Database {
    pub(super) async fn create(admin: &str) -> anyhow::Result<Database> {
        let name = format!("weir_bench_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let pool = sqlx::PgPool::connect(admin).await.with_context(|| format!("connecting to {admin}"))?;
        sqlx::query(&format!("create database {name}")).execute(&pool).await.context("creating a database")?;
        pool.close().await;
        let (base, _) = admin.rsplit_once('/').context("database_url has no database path")?;
        Ok(Database { admin: admin.to_string(), url: format!("{base}/{name}"), name })
    }

    pub(super) async fn drop(&self) -> anyhow::Result<()> {
        let pool = sqlx::PgPool::connect(&self.admin).await?;
        // `with (force)` may not end a backend of another role that is briefly on the new
        // database (seen right after a scenario: "must be a member of the role whose process is
        // being terminated"); such a backend leaves on its own, so try again for a while rather
        // than leave the database on a shared disk.
        let deadline = Instant::now() + Duration::from_secs(30);
        let dropped = loop {
            match sqlx::query(&format!("drop database if exists {} with (force)", self.name)).execute(&pool).await {
                Ok(_) => break Ok(()),
                Err(e) if Instant::now() >= deadline => break Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        };
        pool.close().await;
        Ok(dropped?)
    }
}
