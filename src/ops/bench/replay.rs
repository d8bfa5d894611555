//! `weir bench --scenario replay`: does a replay of a large window slow live traffic down?
//!
//! Two phases of the noisy scenario's machinery ([`super::noisy`]), each on fresh topics,
//! consumer groups and database, with the webhook service limited to [`LIMIT_PER_S`] calls a
//! second (a replay is paced at `replay.share` of a service's limit; live traffic keeps the rest):
//!
//! 1. **live alone**: `--tenants` live tenants send `--rate` events a second together; each
//!    event's p99 from production to its call is the yardstick;
//! 2. **live beside a replay**: the same live load, and when the window opens `weir replay` (the
//!    library call the command makes) re-drives `--events` events put on the events topic before
//!    the stages started (the evaluator's group is moved past them, so only the replay sends
//!    them). The window lasts `--duration` and at least until the replay has sent everything.
//!
//! The report sets the live p99 of the second phase beside the first's (`live_p99_ratio`) and
//! says how long the replay took and at what rate it sent. Replayed events carry ids that are not
//! the load's stamps, so their calls never count as live ones.

use anyhow::{bail, Context as _};
use serde_json::json;

use super::{
    noisy::{self, NoisyLoad, PhaseOutcome},
    replaying::{Replay, LIMIT_PER_S},
    report::ScenarioReport,
    Options, RateArg, Scenario,
};
use crate::config::Config;

/// Live events per second, all live tenants together, by default.
pub const DEFAULT_RATE: u64 = 400;
/// Events replayed by default: the measurement.
pub const DEFAULT_EVENTS: u64 = 100_000;

/// The scenario: both phases, then the report.
pub async fn run(base: &Config, options: &Options) -> anyhow::Result<ScenarioReport> {
    let RateArg::PerSecond(rate) = options.rate else {
        bail!("--rate: the replay scenario needs a rate in events per second (the default is {DEFAULT_RATE})")
    };
    let live_rate = rate as f64 / options.tenants as f64;
    let events = options.backlog.events;
    let phase = |replay, name| noisy::phase(base, options, live_rate, NoisyLoad::Off, Some(replay), name);
    let alone = phase(Replay { events: 0 }, "live alone").await.context("live-alone phase")?;
    let beside = phase(Replay { events }, "live beside a replay").await.context("replay phase")?;
    let replayed = beside.replay.clone().context("the replay phase ran no replay")?;
    if let Some(e) = &replayed.error {
        bail!("the replay failed: {e}");
    }
    let p99 = |o: &PhaseOutcome| o.summary.quiet_latency.p99_ms;
    let ratio = match (p99(&alone), p99(&beside)) {
        (Some(a), Some(b)) if a > 0.0 => Some(b / a),
        _ => None,
    };
    let mut report = beside.report;
    report.scenario = Scenario::Replay;
    report.observed_at = Scenario::Replay.observed_at();
    let extra = [
        ("live_rate_per_s", json!(rate)),
        ("live_tenants", json!(options.tenants)),
        ("service_limit_per_s", json!(LIMIT_PER_S)),
        ("replay_pace_per_s", json!(f64::from(LIMIT_PER_S) * base.replay.share)),
        ("live_alone", json!(alone.summary.quiet_latency)),
        ("live_beside_replay", json!(beside.summary.quiet_latency)),
        ("live_p99_ratio", json!(ratio)),
        ("replay", json!(replayed)),
    ];
    report.extra.extend(extra.into_iter().map(|(k, v)| (k.to_string(), v)));
    Ok(report)
}
