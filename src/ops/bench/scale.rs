//! The scale scenario: how long does the output stall while a stage's group grows and shrinks?
//!
//! For each rebalance protocol (`consumer_groups.protocol`: eager, cooperative, consumer), on
//! fresh topics and a fresh database:
//!
//! 1. One `weir run` child (every stage) works under a steady load (`--rate`, default
//!    [`DEFAULT_RATE`] events/s) for `--duration`: the reference.
//! 2. Scale-out: two more children start; measured for `--duration` from their start.
//! 3. Scale-in: the two are stopped with SIGTERM (the graceful drain); measured for `--duration`
//!    from the signal.
//!
//! The output stream is the HTTP calls arriving at the receiver. Reported per phase: the longest
//! gap between consecutive calls (from the phase's start to its first call and from its last
//! call to its end count too), and the calls made. Under the eager protocol every member stops on
//! every change; under the incremental ones only the partitions that move do, so their longest
//! gap is what it costs to hand a partition over.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use serde_json::json;

use super::{
    backlog::{write_child_config, BacklogStages, ChildProcess},
    load::{self, Mix, Progress, Rate, Shape},
    measure::{self, CpuSample},
    report::ScenarioReport,
    scenario::{self, Setting},
    Options, RateArg, Scenario,
};
use crate::config::{Config, GroupProtocol};

/// Events per second when `--rate` is flat-out: a steady load the stages keep up with.
pub const DEFAULT_RATE: u64 = 1_000;
/// Longest wait for the first call after the first child starts (start-up, joining the groups).
const WARM_UP_LIMIT: Duration = Duration::from_secs(180);

/// What one protocol's run measured.
#[derive(Debug, Default)]
struct Phases {
    steady: Gaps,
    scale_out: Gaps,
    scale_in: Gaps,
}

/// The calls in one phase and the longest gap between them.
#[derive(Debug, Default, Clone, Copy)]
struct Gaps {
    calls: usize,
    longest: Duration,
}

impl Gaps {
    /// Over the call arrival times `at` (sorted), in the window `from..to`.
    fn of(at: &[Instant], from: Instant, to: Instant) -> Gaps {
        let inside: Vec<Instant> = at.iter().copied().filter(|t| *t >= from && *t < to).collect();
        let mut edges = vec![from];
        edges.extend(&inside);
        edges.push(to);
        let longest = edges.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
        Gaps { calls: inside.len(), longest }
    }

    fn json(&self) -> serde_json::Value {
        json!({"calls": self.calls, "longest_stall_ms": self.longest.as_millis() as u64})
    }
}

/// Runs the phases for each protocol and reports them side by side.
pub async fn run(base: &Config, options: &Options) -> anyhow::Result<ScenarioReport> {
    let binary = match &options.backlog.binary {
        Some(b) => b.clone(),
        None => std::env::current_exe().context("finding the weir binary to start")?,
    };
    let rate = match options.rate {
        RateArg::PerSecond(n) => n,
        RateArg::FlatOut => DEFAULT_RATE,
    };
    let cpu_before = CpuSample::now();
    let started = Instant::now();
    let mut report_extra = serde_json::Map::new();
    let mut total_calls = 0;
    for protocol in [GroupProtocol::Eager, GroupProtocol::Cooperative, GroupProtocol::Consumer] {
        let setting = Setting::new(base, "scale", true).await?;
        let outcome = tokio::select! {
            outcome = phases(&setting, options, protocol, rate, &binary) => outcome,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        };
        setting.clean_up().await;
        let p = outcome.with_context(|| format!("protocol {}", protocol.as_str()))?;
        tracing::info!(protocol = protocol.as_str(), ?p, "scale phases measured");
        total_calls += p.steady.calls + p.scale_out.calls + p.scale_in.calls;
        report_extra.insert(
            protocol.as_str().to_string(),
            json!({"steady": p.steady.json(), "scale_out_1_to_3": p.scale_out.json(), "scale_in_3_to_1": p.scale_in.json()}),
        );
    }
    let cpu = CpuSample::now().since(&cpu_before);
    let mut report = ScenarioReport::new(Scenario::Scale, cpu, measure::peak_rss_mb());
    report.duration_s = started.elapsed().as_secs_f64();
    report.outputs = total_calls as u64;
    report.extra.insert("rate_events_per_s".into(), json!(rate));
    report.extra.insert("phase_s".into(), json!(options.duration.as_secs_f64()));
    for (k, v) in report_extra {
        report.extra.insert(format!("protocol_{k}"), v);
    }
    Ok(report)
}

async fn phases(
    setting: &Setting,
    options: &Options,
    protocol: GroupProtocol,
    rate: u64,
    binary: &std::path::Path,
) -> anyhow::Result<Phases> {
    let mut config = setting.config.clone();
    config.consumer_groups.protocol = protocol;
    crate::kafka::topics::apply_dir(&config, false).await.context("creating the scenario's topics")?;
    scenario::write_workflows(&setting.workdir, &scenario::workflows(options.tenants, true))?;
    crate::ops::workflows::apply_dir(&config, &setting.workdir, false).await.context("publishing the workflows")?;
    let file = write_child_config(&config, &setting.workdir)?;
    let log = |n: usize| setting.workdir.join(format!("weir-run-{n}.log"));

    let progress = Arc::new(Progress::default());
    let mix = Arc::new(Mix::new(options.tenants)?);
    let generator =
        load::spawn(&config, config.names().events(), Shape::Events, mix, Rate::PerSecond(rate), 0, progress.clone())?;
    let receiver = setting.receiver.clone();
    let mut arrivals: Vec<Instant> = Vec::new();
    let collect = |arrivals: &mut Vec<Instant>| arrivals.extend(receiver.drain().iter().map(|c| c.at));

    let first = ChildProcess::start(binary, &file, BacklogStages::All, &log(0))?;
    let warm = Instant::now();
    while setting.receiver.arrived() == 0 {
        if warm.elapsed() > WARM_UP_LIMIT {
            bail!("no call within {}s of starting weir run:\n{}", WARM_UP_LIMIT.as_secs(), first.log_tail());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The phases are timed windows: that is what is measured here.
    let wait = |d: Duration| tokio::time::sleep(d);
    let t0 = Instant::now();
    wait(options.duration).await;
    collect(&mut arrivals);
    let t1 = Instant::now();
    let more = [
        ChildProcess::start(binary, &file, BacklogStages::All, &log(1))?,
        ChildProcess::start(binary, &file, BacklogStages::All, &log(2))?,
    ];
    wait(options.duration).await;
    collect(&mut arrivals);
    let t2 = Instant::now();
    let stopped = futures::future::join_all(more.into_iter().map(ChildProcess::stop)).await;
    let left = Instant::now();
    if left < t2 + options.duration {
        wait(t2 + options.duration - left).await;
    }
    collect(&mut arrivals);
    let t3 = Instant::now();
    progress.stop.cancel();
    let stopped_first = first.stop().await;
    let _ = tokio::task::spawn_blocking(move || generator.join()).await;
    for s in stopped {
        s.context("stopping a scaled-out child")?;
    }
    stopped_first.context("stopping the first child")?;
    if let Some(e) = progress.error.lock().expect("error lock").take() {
        bail!(e);
    }
    arrivals.sort();
    Ok(Phases {
        steady: Gaps::of(&arrivals, t0, t1),
        scale_out: Gaps::of(&arrivals, t1, t2),
        scale_in: Gaps::of(&arrivals, t2, t3),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_gap_counts_the_window_edges() {
        let t = Instant::now();
        let ms = |n: u64| t + Duration::from_millis(n);
        let g = Gaps::of(&[ms(10), ms(20), ms(90), ms(95), ms(500)], ms(0), ms(100));
        assert_eq!((g.calls, g.longest), (4, Duration::from_millis(70)));
        let g = Gaps::of(&[ms(10)], ms(0), ms(100));
        assert_eq!(g.longest, Duration::from_millis(90), "the end of the window counts");
        assert_eq!(Gaps::of(&[], ms(0), ms(100)).longest, Duration::from_millis(100));
    }
}
