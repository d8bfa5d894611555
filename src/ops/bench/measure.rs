//! What a scenario measures: end-to-end latency (hdrhistogram, overall and per second), distinct
//! events through, and the CPU time and peak memory of this process, the broker and PostgreSQL,
//! read from `/proc`.

use std::{
    collections::HashMap,
    sync::{atomic::Ordering, Arc, Mutex},
};

use hdrhistogram::Histogram;
use serde::Serialize;

use super::load::Progress;

/// Largest latency recorded: an hour, in µs.
const MAX_LATENCY_US: u64 = 3_600_000_000;

pub(crate) fn histogram(sigfig: u8) -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, sigfig).expect("static histogram bounds are valid")
}

/// Collects observations of a scenario's output. Before [`Meter::open`] it only counts (warm-up);
/// between `open` and [`Meter::close`] it measures.
pub(crate) struct Meter {
    inner: Mutex<Inner>,
    progress: Arc<Progress>,
}

struct Inner {
    /// Bit per sequence number: seen at the output already (a workflow may emit several
    /// records for one event; throughput counts events).
    seen: Vec<u64>,
    window: Option<Window>,
}

struct Window {
    start_us: u64,
    /// Records produced before this are not measured (see [`Meter::open`]).
    produced_from_us: u64,
    latency: Histogram<u64>,
    seconds: Vec<Second>,
    events: u64,
    outputs: u64,
}

struct Second {
    events: u64,
    latency: Histogram<u64>,
}

/// One second of a scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    pub t: u64,
    pub events_per_s: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Latency percentiles, ms.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Latency {
        let ms = |us: u64| us as f64 / 1e3;
        Latency {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// What a window measured.
pub struct Measured {
    pub events: u64,
    pub outputs: u64,
    pub latency: Latency,
    pub series: Vec<Point>,
}

impl Meter {
    pub fn new(progress: Arc<Progress>) -> Meter {
        Meter { inner: Mutex::new(Inner { seen: Vec::new(), window: None }), progress }
    }

    /// Input record `seq`, produced at `produced_us`, was seen at the output at `observed_us`.
    pub fn record(&self, seq: u64, produced_us: u64, observed_us: u64) {
        let mut inner = self.inner.lock().expect("meter lock");
        let (word, bit) = ((seq / 64) as usize, 1u64 << (seq % 64));
        if inner.seen.len() <= word {
            inner.seen.resize(word + 1024, 0);
        }
        let first = inner.seen[word] & bit == 0;
        inner.seen[word] |= bit;
        if first {
            self.progress.observed.fetch_add(1, Ordering::Relaxed);
        }
        let Some(w) = inner.window.as_mut() else { return };
        if observed_us < w.start_us || produced_us < w.produced_from_us {
            return;
        }
        let latency = observed_us.saturating_sub(produced_us).max(1);
        w.latency.saturating_record(latency);
        w.outputs += 1;
        let second = ((observed_us - w.start_us) / 1_000_000) as usize;
        while w.seconds.len() <= second {
            w.seconds.push(Second { events: 0, latency: histogram(2) });
        }
        w.seconds[second].latency.saturating_record(latency);
        if first {
            w.events += 1;
            w.seconds[second].events += 1;
        }
    }

    /// Starts measuring at `start_us` (µs since the epoch). With `fresh_only`, records produced
    /// before `start_us` are left out too: at a paced rate the question is the latency in steady
    /// state, and events produced while the consumer groups were still joining would measure the
    /// start-up instead (at 2,400/s they put ~600 ms into the first second's p99).
    pub fn open(&self, start_us: u64, fresh_only: bool) {
        let produced_from_us = if fresh_only { start_us } else { 0 };
        self.inner.lock().expect("meter lock").window = Some(Window {
            start_us,
            produced_from_us,
            latency: histogram(3),
            seconds: Vec::new(),
            events: 0,
            outputs: 0,
        });
    }

    /// Events seen so far in the open window.
    pub fn events(&self) -> u64 {
        self.inner.lock().expect("meter lock").window.as_ref().map_or(0, |w| w.events)
    }

    /// Ends the window; seconds after `seconds` (late records) are dropped from the series.
    pub fn close(&self, seconds: usize) -> Measured {
        let w = self.inner.lock().expect("meter lock").window.take();
        let Some(w) = w else { return Measured { events: 0, outputs: 0, latency: Latency::default(), series: vec![] } };
        let series = w
            .seconds
            .iter()
            .take(seconds)
            .enumerate()
            .map(|(t, s)| {
                let l = Latency::of(&s.latency);
                Point { t: t as u64, events_per_s: s.events, p50_ms: l.p50, p99_ms: l.p99 }
            })
            .collect();
        Measured { events: w.events, outputs: w.outputs, latency: Latency::of(&w.latency), series }
    }
}

/// CPU seconds used so far by this process, the broker and PostgreSQL.
#[derive(Debug, Clone, Default)]
pub(crate) struct CpuSample {
    weir: f64,
    bench: f64,
    broker: HashMap<u32, f64>,
    postgres: HashMap<u32, f64>,
}

/// CPU seconds used between two samples.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CpuUsed {
    /// The process running the stages under test: the `weir run` child, or this process when
    /// they run in it (`--in-process`; it then includes the generator, observer and receiver).
    pub weir_s: f64,
    /// This process (the load generator, the observer and the HTTP receiver) when the stages run
    /// in a child; 0 otherwise (counted in `weir_s`).
    pub bench_s: f64,
    /// The Kafka broker's JVM (found by `kafka.Kafka` in its command line); 0 if not found.
    pub broker_s: f64,
    /// Every `postgres` process alive at the end of the window (backends that exited during
    /// it are missed).
    pub postgres_s: f64,
}

impl CpuSample {
    pub fn now() -> CpuSample {
        CpuSample::with_weir("self")
    }

    /// The same, with `pid` (a `weir run` child) in place of this process as `weir`.
    pub(crate) fn of_child(pid: u32) -> CpuSample {
        CpuSample::with_weir(&pid.to_string())
    }

    /// [`of_child`](Self::of_child) when there is a child, else [`now`](Self::now).
    pub(crate) fn of(child: Option<u32>) -> CpuSample {
        child.map_or_else(CpuSample::now, CpuSample::of_child)
    }

    fn with_weir(weir: &str) -> CpuSample {
        let tick = clock_ticks();
        let bench = if weir == "self" { 0.0 } else { process_cpu("self", tick).unwrap_or(0.0) };
        let mut sample = CpuSample { weir: process_cpu(weir, tick).unwrap_or(0.0), bench, ..Default::default() };
        for (pid, kind) in service_pids() {
            let Some(cpu) = process_cpu(&pid.to_string(), tick) else { continue };
            match kind {
                Service::Broker => sample.broker.insert(pid, cpu),
                Service::Postgres => sample.postgres.insert(pid, cpu),
            };
        }
        sample
    }

    pub fn since(&self, earlier: &CpuSample) -> CpuUsed {
        let delta = |now: &HashMap<u32, f64>, then: &HashMap<u32, f64>| {
            now.iter().map(|(pid, cpu)| cpu - then.get(pid).copied().unwrap_or(0.0)).filter(|d| *d > 0.0).sum()
        };
        CpuUsed {
            weir_s: self.weir - earlier.weir,
            bench_s: self.bench - earlier.bench,
            broker_s: delta(&self.broker, &earlier.broker),
            postgres_s: delta(&self.postgres, &earlier.postgres),
        }
    }
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// utime + stime of `/proc/<pid>/stat`, in seconds.
fn process_cpu(pid: &str, tick: f64) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / tick)
}

enum Service {
    Broker,
    Postgres,
}

fn service_pids() -> Vec<(u32, Service)> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return vec![] };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            if comm.trim() == "postgres" {
                return Some((pid, Service::Postgres));
            }
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let is_broker = cmdline.split(|&b| b == 0).any(|arg| arg == b"kafka.Kafka");
            is_broker.then_some((pid, Service::Broker))
        })
        .collect()
}

/// Resets this process's peak RSS, so each scenario reports its own.
pub(crate) fn reset_peak_rss() {
    reset_peak_rss_of("self");
}

/// Peak RSS (VmHWM) of this process in MB.
pub fn peak_rss_mb() -> f64 {
    peak_rss_mb_of("self")
}

/// [`reset_peak_rss`] of `pid` (a child).
pub(crate) fn reset_peak_rss_of(pid: &str) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// [`peak_rss_mb`] of `pid` (a child).
pub(crate) fn peak_rss_mb_of(pid: &str) -> f64 {
    status_mb(pid, "VmHWM").unwrap_or(0.0)
}

/// A memory figure (`VmRSS`, `VmHWM`, ...) of `/proc/<pid>/status` in MB; `None` once the process
/// is gone.
pub(crate) fn status_mb(pid: &str, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.strip_prefix(field).is_some_and(|rest| rest.starts_with(':')))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_events_once_and_latency_per_output() {
        let progress = Arc::new(Progress::default());
        let meter = Meter::new(progress.clone());
        meter.record(0, 0, 10); // warm-up: counted as observed, not measured
        meter.open(1_000_000, false);
        meter.record(1, 1_000_000, 1_002_000);
        meter.record(1, 1_000_000, 1_004_000); // a second output of the same event
        meter.record(2, 1_500_000, 2_600_000);
        let m = meter.close(10);
        assert_eq!((m.events, m.outputs), (2, 3));
        assert_eq!(progress.observed.load(Ordering::Relaxed), 3);
        assert_eq!(m.series.len(), 2);
        assert_eq!(m.series[0].events_per_s, 1);
        assert!((m.latency.max - 1_100.0).abs() < 2.0, "{:?}", m.latency);
        assert!((m.latency.p50 - 4.0).abs() < 0.1, "{:?}", m.latency);
    }

    #[test]
    fn fresh_only_leaves_out_what_was_produced_before_the_window() {
        let meter = Meter::new(Arc::new(Progress::default()));
        meter.open(1_000_000, true);
        meter.record(0, 400_000, 1_100_000); // queued during start-up
        meter.record(1, 1_050_000, 1_060_000);
        let m = meter.close(10);
        assert_eq!((m.events, m.outputs), (1, 1));
        assert!((m.latency.max - 10.0).abs() < 0.1, "{:?}", m.latency);
    }

    #[test]
    fn reads_this_process_from_proc() {
        let before = CpuSample::now();
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(CpuSample::now().since(&before).weir_s >= 0.0);
        assert!(peak_rss_mb() > 1.0);
        let rss = status_mb("self", "VmRSS").unwrap();
        assert!(rss > 1.0 && rss <= peak_rss_mb() + 1.0, "{rss}");
        assert_eq!(status_mb("self", "NoSuchField"), None);
    }
}
