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
//!
//! The whole stream's gap hides that: it falls only when *every* partition stops at once. So the
//! same gap is also taken per partition: a call belongs to its tenant's partition of the action
//! topic (the events topic has as many partitions and the same key, so a tenant has the same
//! partition number in both), and the partitions are split into those that *moved* in the phase
//! (the ones the two added children owned, over the events and action topics, just before they
//! were stopped: what they took at scale-out and gave back at scale-in, read from their logs'
//! `rebalance` lines, [`crate::ops::rebalances`]) and those that *stayed* with the first child.
//! Reported: the longest gap of any moved partition and of any that stayed. Under eager both
//! stall; under an incremental protocol only the moved ones should. The two groups assign
//! independently, so with moves counted in either group few partitions (none, under eager's
//! `range` assignor) may count as stayed; the same split is also given with only the executors'
//! group's moves counted (`by_execute_group_moves`), where a partition that stayed may still have
//! stalled for a move of its events partition.

use std::{
    collections::BTreeSet,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use serde_json::json;

use super::{
    backlog::BacklogStages,
    child::{write_child_config, ChildProcess},
    load::{self, Mix, Progress, Rate, Shape},
    measure::{self, CpuSample},
    report::ScenarioReport,
    scenario::{self, Setting},
    Options, RateArg, Scenario,
};
use crate::{
    config::{Config, GroupProtocol},
    ops::rebalances,
};

/// Events per second when `--rate` is flat-out: a steady load the stages keep up with.
pub const DEFAULT_RATE: u64 = 1_000;
/// Longest wait for the first call after the first child starts (start-up, joining the groups).
const WARM_UP_LIMIT: Duration = Duration::from_secs(180);

/// What one protocol's run measured.
#[derive(Debug, Default)]
struct Phases {
    steady: Phase,
    scale_out: Phase,
    scale_in: Phase,
    /// The partitions the added children owned: moved out at scale-out, back at scale-in.
    moved: Moved,
}

/// One phase: the whole stream's gaps, and the longest gap of the partitions that moved and of
/// those that stayed, counting a partition as moved if it did in either group (`either`) or in
/// the executors' group only (`execute`).
#[derive(Debug, Default)]
struct Phase {
    all: Gaps,
    either: Split,
    execute: Split,
}

/// The partitions that moved in a phase: in either group (events or actions), in the executors'.
#[derive(Debug, Default, Clone)]
struct Moved {
    either: BTreeSet<i32>,
    execute: BTreeSet<i32>,
}

impl Phase {
    /// Over the calls `at` of the whole run (sorted by time, each with its partition, if it has
    /// one), in the window `from..to`, with `moved` the partitions that changed owner in it.
    fn of(at: &[(Instant, Option<i32>)], moved: &Moved, from: Instant, to: Instant) -> Phase {
        let times: Vec<Instant> = at.iter().map(|(t, _)| *t).collect();
        Phase {
            all: Gaps::of(&times, from, to),
            either: Split::of(at, &moved.either, from, to),
            execute: Split::of(at, &moved.execute, from, to),
        }
    }

    fn json(&self) -> serde_json::Value {
        let ms = |d: Option<Duration>| d.map(|d| d.as_millis() as u64);
        json!({
            "calls": self.all.calls,
            "longest_stall_ms": self.all.longest.as_millis() as u64,
            "longest_stall_moved_partitions_ms": ms(self.either.moved),
            "longest_stall_stayed_partitions_ms": ms(self.either.stayed),
            "by_execute_group_moves": {
                "longest_stall_moved_partitions_ms": ms(self.execute.moved),
                "longest_stall_stayed_partitions_ms": ms(self.execute.stayed),
            },
        })
    }
}

/// The longest gap of any partition that moved and of any that stayed (`None`: there was none).
#[derive(Debug, Default, Clone, Copy)]
struct Split {
    moved: Option<Duration>,
    stayed: Option<Duration>,
}

impl Split {
    /// Over the calls `at` of the whole run (sorted by time, each with its partition, if it has
    /// one), in the window `from..to`, with `moved` the partitions that changed owner in it. A
    /// partition no call of the run went to (no tenant hashes to it) is left out.
    fn of(at: &[(Instant, Option<i32>)], moved: &BTreeSet<i32>, from: Instant, to: Instant) -> Split {
        let longest_of = |p: i32| {
            let times: Vec<Instant> = at.iter().filter(|(_, q)| *q == Some(p)).map(|(t, _)| *t).collect();
            Gaps::of(&times, from, to).longest
        };
        let called: BTreeSet<i32> = at.iter().filter_map(|(_, p)| *p).collect();
        let (moved_ps, stayed_ps): (Vec<i32>, Vec<i32>) = called.into_iter().partition(|p| moved.contains(p));
        Split { moved: moved_ps.into_iter().map(longest_of).max(), stayed: stayed_ps.into_iter().map(longest_of).max() }
    }
}

/// The calls in one window and the longest gap between them.
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
        total_calls += p.steady.all.calls + p.scale_out.all.calls + p.scale_in.all.calls;
        report_extra.insert(
            protocol.as_str().to_string(),
            json!({"steady": p.steady.json(), "scale_out_1_to_3": p.scale_out.json(), "scale_in_3_to_1": p.scale_in.json(),
                "moved_partitions": p.moved.either, "moved_partitions_execute_group": p.moved.execute}),
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
    let (events, actions) = (config.names().events(), config.names().actions(scenario::SERVICE));
    let admin = crate::kafka::admin(&config)?;
    let partitions = crate::kafka::partition_count(admin.inner(), &actions)?;
    // The events topic's moves count only if its partition numbers are the action topic's.
    let topics = match crate::kafka::partition_count(admin.inner(), &events)? == partitions {
        true => vec![events, actions],
        false => vec![actions],
    };
    let partition_of = |tenant: &Option<String>| {
        tenant.as_ref().map(|t| crate::kafka::partitioner::partition_for_key(t.as_bytes(), partitions))
    };
    let mut arrivals: Vec<(Instant, Option<i32>)> = Vec::new();
    let collect = |arrivals: &mut Vec<(Instant, Option<i32>)>| {
        arrivals.extend(receiver.drain().iter().map(|c| (c.at, partition_of(&c.tenant))))
    };
    let start = |n: usize| ChildProcess::start_logging_rebalances(binary, &file, BacklogStages::All.args(), &log(n));

    let first = start(0)?;
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
    let more = [start(1)?, start(2)?];
    wait(options.duration).await;
    collect(&mut arrivals);
    let t2 = Instant::now();
    let logs: Vec<String> = more.iter().map(ChildProcess::log).collect();
    let owned_by_more = |topics: &[String]| -> BTreeSet<i32> {
        logs.iter().flat_map(|log| topics.iter().flat_map(|t| rebalances::owned(log, t))).collect()
    };
    let moved = Moved { either: owned_by_more(&topics), execute: owned_by_more(&topics[topics.len() - 1..]) };
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
    arrivals.sort_by_key(|(t, _)| *t);
    let phase = |from, to, moved| Phase::of(&arrivals, moved, from, to);
    Ok(Phases {
        steady: phase(t0, t1, &Moved::default()),
        scale_out: phase(t1, t2, &moved),
        scale_in: phase(t2, t3, &moved),
        moved,
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

    #[test]
    fn partitions_that_moved_and_stayed_have_their_own_longest_gap() {
        let t = Instant::now();
        let ms = |n: u64| t + Duration::from_millis(n);
        // Partition 0 stays and calls every 10 ms; partition 1 moves and stops from 20 to 80 ms;
        // partition 2 moves and is called only after the window; a call without a tenant counts
        // only overall; partition 3 has no call at all.
        let mut at: Vec<(Instant, Option<i32>)> = (0..10).map(|i| (ms(i * 10 + 5), Some(0))).collect();
        at.extend([(ms(10), Some(1)), (ms(20), Some(1)), (ms(80), Some(1)), (ms(50), None), (ms(150), Some(2))]);
        at.sort_by_key(|(t, _)| *t);
        let p = Phase::of(
            &at,
            &Moved { either: BTreeSet::from([1, 2, 3]), execute: BTreeSet::from([1, 3]) },
            ms(0),
            ms(100),
        );
        assert_eq!(p.all.calls, 14);
        assert_eq!(p.either.stayed, Some(Duration::from_millis(10)));
        assert_eq!(p.either.moved, Some(Duration::from_millis(100)), "partition 2 stalled all along");
        assert_eq!(p.execute.moved, Some(Duration::from_millis(60)));
        assert_eq!(p.execute.stayed, Some(Duration::from_millis(100)), "partition 2 stayed, and stalled");
        assert_eq!(Phase::of(&at, &Moved::default(), ms(0), ms(100)).either.moved, None);
    }
}
