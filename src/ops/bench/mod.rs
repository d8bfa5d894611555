//! `weir bench`: measures the pipeline's stages beside a raw Kafka passthrough on the same
//! broker, in one run.
//!
//! Every scenario runs on its own random topic prefix (topics from `topics/`, deleted afterwards)
//! and, where it writes, its own fresh database (dropped afterwards):
//!
//! - `baseline`: a raw rdkafka consume → produce passthrough of the same topic shape: the ceiling;
//! - `evaluate`: the evaluator with every tenant's workflows (plus a platform-wide one);
//! - `pipeline`: evaluate + execute against an in-process [`Receiver`](crate::ops::receiver::Receiver)
//!   + the PostgreSQL sink;
//! - `throttled`: a rate limit set, measuring the call rate reached against the one configured;
//! - `sink`: results → PostgreSQL through the sink, beside a standalone `COPY` of as many rows;
//! - `backlog` (not in `all`): fills the events topic with `--events` events, then drains it with
//!   the stages in a separate `weir run` process whose RSS is sampled ([`backlog`]);
//! - `noisy` and `noisy-burst` (not in `all`: three phases each): quiet tenants beside one tenant
//!   sending 90 % of the traffic, steadily or in bursts, each quiet tenant's p99 beside its p99
//!   without the noisy one, and the throughput with one active tenant ([`noisy`]).
//! - `ingest` (not in `all`): events over HTTP/1.1 keep-alive into the ingest stage, one per
//!   request and in batches, beside `weir produce`'s producer, acknowledgement latency of each
//!   ([`ingest`]).
//! - `scale` (not in `all`): `weir run` children scaled 1 → 3 → 1 under a steady load, the
//!   longest stall of the output during each change, per rebalance protocol ([`scale`]).
//! - `remote` (not in `all`): the executor alone in the `weir run` child (its evaluator in this
//!   process) against a receiver answering after 200 ± 50 ms, per-tenant caps lifted
//!   (`tenant_concurrency` = `concurrency`): the calls per second one executor process reaches
//!   with its calls in flight bounded by `concurrency` and `executor.max_in_flight_bytes`.
//!
//! A scenario warms up until its output shows the first record, then measures for `duration`:
//! distinct input events seen at its output per second, end-to-end latency from the produce time
//! each record carries ([`load::STAMP`]) to where the output is observed, CPU seconds of this
//! process, the broker and PostgreSQL, and this process's peak RSS. [`report`] prints the table,
//! writes `bench.json` and `bench.svg`.

pub mod backlog;
mod child;
pub mod ingest;
pub mod load;
pub(crate) mod measure;
pub mod noisy;
pub mod noisy_report;
pub mod replay;
pub mod replaying;
pub mod report;
pub mod scale;
pub mod scenario;

use std::{path::PathBuf, str::FromStr, time::Duration};

use anyhow::bail;

use crate::config::Config;

/// A scenario, or all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    Baseline,
    Evaluate,
    Pipeline,
    Throttled,
    Sink,
    /// Not part of `all`: it runs on its own options ([`backlog::BacklogOptions`]).
    Backlog,
    /// Not part of `all` (three phases, long): [`noisy`].
    Noisy,
    /// The same with the noisy tenant sending in bursts.
    #[serde(rename = "noisy-burst")]
    NoisyBurst,
    /// Not part of `all` (two phases, one as long as a replay): [`replay`].
    Replay,
    /// Not part of `all` (children scaled out and in, per protocol): [`scale`].
    Scale,
    /// Not part of `all`: events over HTTP into the ingest stage beside `weir produce`: [`ingest`].
    Ingest,
    /// Not part of `all`: evaluate and execute against a service answering in 200 ms ± 50 ms,
    /// as real ones do: how many calls one executor process holds in flight.
    Remote,
}

impl Scenario {
    pub const ALL: [Scenario; 5] =
        [Scenario::Baseline, Scenario::Evaluate, Scenario::Pipeline, Scenario::Throttled, Scenario::Sink];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Baseline => "baseline",
            Scenario::Evaluate => "evaluate",
            Scenario::Pipeline => "pipeline",
            Scenario::Throttled => "throttled",
            Scenario::Sink => "sink",
            Scenario::Backlog => "backlog",
            Scenario::Noisy => "noisy",
            Scenario::NoisyBurst => "noisy-burst",
            Scenario::Replay => "replay",
            Scenario::Scale => "scale",
            Scenario::Ingest => "ingest",
            Scenario::Remote => "remote",
        }
    }

    /// Where its output is observed (what its latency ends at).
    pub(crate) fn observed_at(self) -> &'static str {
        match self {
            Scenario::Baseline => "passthrough output topic, consumed",
            Scenario::Evaluate => "action task on actions.webhook, consumed",
            Scenario::Pipeline
            | Scenario::Throttled
            | Scenario::Noisy
            | Scenario::NoisyBurst
            | Scenario::Replay
            | Scenario::Remote => "HTTP call arriving at the receiver (action start)",
            Scenario::Sink => "row's recorded_at in PostgreSQL (transaction start of its batch)",
            Scenario::Backlog => "offsets committed by the stages' consumer groups (a separate weir run process)",
            Scenario::Scale => "HTTP calls arriving at the receiver from weir run children (gaps between them)",
            Scenario::Ingest => "the ingest stage's 202 (broker acknowledged), beside weir produce's acknowledgement",
        }
    }
}

/// `--scenario`: one scenario or `all`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    One(Scenario),
    All,
}

impl FromStr for Selection {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "all" {
            return Ok(Selection::All);
        }
        <Scenario as clap::ValueEnum>::from_str(s, true).map(Selection::One).map_err(|_| {
            format!("unknown scenario {s:?}; expected baseline, evaluate, pipeline, throttled, sink, backlog, noisy, noisy-burst, replay, scale, ingest, remote or all")
        })
    }
}

impl Selection {
    pub fn scenarios(self) -> Vec<Scenario> {
        match self {
            Selection::One(s) => vec![s],
            Selection::All => Scenario::ALL.to_vec(),
        }
    }
}

/// `--rate`: events per second, or `flat-out`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateArg {
    PerSecond(u64),
    FlatOut,
}

impl FromStr for RateArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "flat-out" | "flatout" | "max" => Ok(RateArg::FlatOut),
            n => match n.replace('_', "").parse::<u64>() {
                Ok(0) | Err(_) => {
                    Err(format!("rate {s:?}: expected a positive number of events per second or flat-out"))
                }
                Ok(n) => Ok(RateArg::PerSecond(n)),
            },
        }
    }
}

/// Parses `60s`, `500ms`, `2m` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits.parse().map_err(|_| format!("duration {s:?}: expected e.g. 60s, 500ms or 2m"))?;
    let d = match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" | "min" => Duration::from_secs(n * 60),
        _ => return Err(format!("duration {s:?}: unknown unit {unit:?} (ms, s or m)")),
    };
    if d.is_zero() {
        return Err(format!("duration {s:?}: must be more than zero"));
    }
    Ok(d)
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    pub scenarios: Vec<Scenario>,
    /// Measured time per scenario (after its warm-up).
    pub duration: Duration,
    /// Events per second offered (in the noisy scenarios: by every tenant together).
    pub rate: RateArg,
    /// Tenants in the load (Zipf-skewed) and with workflows of their own; in the noisy
    /// scenarios, the quiet tenants.
    pub tenants: usize,
    /// Where `bench.json` and `bench.svg` go.
    pub out: PathBuf,
    /// Show a progress bar (off in tests).
    pub progress: bool,
    /// What the backlog scenario fills and runs.
    pub backlog: backlog::BacklogOptions,
    /// Run the stages of the baseline-relative scenarios (evaluate, pipeline, throttled, sink)
    /// in this process, beside the generator and observer, instead of in a `weir run` child: how
    /// builds before 2026-12-07 measured, for an A/B against one.
    pub in_process: bool,
}

impl Options {
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.scenarios.is_empty() {
            bail!("no scenario selected");
        }
        if !(1..=100_000).contains(&self.tenants) {
            bail!("--tenants: {} is outside 1..=100000", self.tenants);
        }
        if self.scenarios.contains(&Scenario::Backlog) {
            self.backlog.validate()?;
        }
        if self.scenarios.iter().any(|s| matches!(s, Scenario::Noisy | Scenario::NoisyBurst)) {
            if self.tenants < 2 {
                bail!("--tenants: the noisy scenarios need at least 2 quiet tenants (one on the noisy tenant's partition, one not), not {}", self.tenants);
            }
            if self.rate == RateArg::FlatOut {
                bail!("--rate: the noisy scenarios need a rate in events per second (default {})", noisy::DEFAULT_RATE);
            }
        }
        if self.scenarios.contains(&Scenario::Replay) {
            if self.rate == RateArg::FlatOut {
                bail!(
                    "--rate: the replay scenario needs a rate in events per second (default {})",
                    replay::DEFAULT_RATE
                );
            }
            if self.backlog.events == 0 {
                bail!("--events: the replay scenario needs at least one event to replay");
            }
        }
        Ok(())
    }
}

/// Runs the scenarios in order (the baseline first when selected, so ratios refer to it) and
/// writes the report. Each scenario's topics and database are removed even when it fails.
pub async fn run(config: &Config, options: &Options) -> anyhow::Result<report::Report> {
    options.validate()?;
    let check = config.clone();
    tokio::task::spawn_blocking(move || crate::kafka::check_reachable(&check)).await??;
    let mut scenarios = options.scenarios.clone();
    // The backlog (not in ALL) last: it is the longest and fills the most disk.
    scenarios.sort_by_key(|s| Scenario::ALL.iter().position(|a| a == s).unwrap_or(Scenario::ALL.len()));
    scenarios.dedup();
    let mut results = Vec::new();
    for scenario in scenarios {
        let outcome = match scenario {
            Scenario::Backlog => backlog::run(config, options).await,
            Scenario::Noisy | Scenario::NoisyBurst => noisy::run(config, options, scenario).await,
            Scenario::Replay => replay::run(config, options).await,
            Scenario::Scale => scale::run(config, options).await,
            Scenario::Ingest => ingest::run(config, options).await,
            _ => scenario::run(config, options, scenario).await,
        };
        results.push(outcome.map_err(|e| e.context(format!("scenario {}", scenario.name())))?);
    }
    let report = report::Report::new(options, results);
    report.write(&options.out)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_parse_or_say_what_is_wrong() {
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("5h").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("fast").is_err());
        assert_eq!("flat-out".parse::<RateArg>(), Ok(RateArg::FlatOut));
        assert_eq!("20_000".parse::<RateArg>(), Ok(RateArg::PerSecond(20_000)));
        assert!("0".parse::<RateArg>().is_err());
        assert_eq!("all".parse::<Selection>().unwrap().scenarios().len(), 5);
        assert_eq!("sink".parse::<Selection>(), Ok(Selection::One(Scenario::Sink)));
        assert!("sinks".parse::<Selection>().unwrap_err().contains("sinks"));
        assert_eq!("backlog".parse::<Selection>(), Ok(Selection::One(Scenario::Backlog)));
        assert!(!Selection::All.scenarios().contains(&Scenario::Backlog));
        assert_eq!("noisy-burst".parse::<Selection>(), Ok(Selection::One(Scenario::NoisyBurst)));
        assert!(!Selection::All.scenarios().contains(&Scenario::Noisy));
        assert_eq!("replay".parse::<Selection>(), Ok(Selection::One(Scenario::Replay)));
        assert!(!Selection::All.scenarios().contains(&Scenario::Replay));
    }
}
