//! The report of a run: a table on stdout, `bench.json`, and `bench.svg` (throughput and p99
//! latency over time, one line per scenario).

use std::{collections::BTreeMap, path::Path, time::Duration};

use anyhow::Context as _;
use plotters::prelude::*;
use serde::Serialize;

use super::{
    measure::{CpuUsed, Latency, Measured, Point},
    Options, RateArg, Scenario,
};

#[derive(Debug, Clone, Serialize)]
pub struct ScenarioReport {
    pub scenario: Scenario,
    /// Where the output (and so the latency's end) is observed.
    pub observed_at: &'static str,
    pub duration_s: f64,
    /// Distinct input events seen at the output in the window.
    pub events: u64,
    /// Output records seen (a workflow may emit several per event).
    pub outputs: u64,
    /// Events per second.
    pub throughput: f64,
    pub latency_ms: Latency,
    pub cpu_s: CpuUsed,
    /// CPU seconds per million events: this process, broker, PostgreSQL, and their sum.
    pub cpu_s_per_million: BTreeMap<&'static str, f64>,
    pub peak_rss_mb: f64,
    /// Throughput over the baseline's, when the baseline ran.
    pub ratio_to_baseline: Option<f64>,
    pub series: Vec<Point>,
    /// RSS of the process under test once a second, MB (the backlog scenario's child).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rss_series_mb: Vec<f64>,
    /// Scenario-specific figures (throttle accuracy, COPY comparison, sink latency).
    pub extra: BTreeMap<String, serde_json::Value>,
    /// The noisy scenarios' per-tenant report.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub noisy: Option<super::noisy_report::NoisyReport>,
}

impl ScenarioReport {
    pub fn new(scenario: Scenario, cpu: CpuUsed, peak_rss_mb: f64) -> ScenarioReport {
        ScenarioReport {
            scenario,
            observed_at: scenario.observed_at(),
            duration_s: 0.0,
            events: 0,
            outputs: 0,
            throughput: 0.0,
            latency_ms: Latency::default(),
            cpu_s: cpu,
            cpu_s_per_million: BTreeMap::new(),
            peak_rss_mb,
            ratio_to_baseline: None,
            series: Vec::new(),
            rss_series_mb: Vec::new(),
            extra: BTreeMap::new(),
            noisy: None,
        }
    }

    /// Takes the window's measurements.
    pub(crate) fn fill(&mut self, m: &Measured, duration: Duration) {
        self.duration_s = duration.as_secs_f64();
        self.events = m.events;
        self.outputs = m.outputs;
        self.throughput = m.events as f64 / self.duration_s;
        self.latency_ms = m.latency.clone();
        self.series = m.series.clone();
        let per_million = |s: f64| if m.events == 0 { 0.0 } else { s * 1e6 / m.events as f64 };
        let c = &self.cpu_s;
        self.cpu_s_per_million = [
            ("weir", per_million(c.weir_s)),
            ("bench", per_million(c.bench_s)),
            ("broker", per_million(c.broker_s)),
            ("postgres", per_million(c.postgres_s)),
            ("total", per_million(c.weir_s + c.bench_s + c.broker_s + c.postgres_s)),
        ]
        .into();
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub date: String,
    pub machine: BTreeMap<&'static str, String>,
    pub duration_s: f64,
    /// Events per second offered, or "flat-out".
    pub rate: String,
    pub tenants: usize,
    pub scenarios: Vec<ScenarioReport>,
}

impl Report {
    pub fn new(options: &Options, mut scenarios: Vec<ScenarioReport>) -> Report {
        let baseline = scenarios.iter().find(|s| s.scenario == Scenario::Baseline).map(|s| s.throughput);
        if let Some(b) = baseline.filter(|b| *b > 0.0) {
            for s in &mut scenarios {
                s.ratio_to_baseline = Some(s.throughput / b);
            }
        }
        Report {
            date: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            machine: machine(),
            duration_s: options.duration.as_secs_f64(),
            rate: match options.rate {
                RateArg::FlatOut => "flat-out".into(),
                RateArg::PerSecond(r) => r.to_string(),
            },
            tenants: options.tenants,
            scenarios,
        }
    }

    /// The table printed at the end of a run.
    pub fn table(&self) -> String {
        let mut t = format!(
            "{:<10} {:>10} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9} {:>8} {:>7}\n",
            "scenario",
            "events/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "p99.9 ms",
            "cpu/M",
            "cpu/M all",
            "rss MB",
            "ratio",
            "events"
        );
        for s in &self.scenarios {
            t += &format!(
                "{:<10} {:>10.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>9.1} {:>9.1} {:>9.0} {:>8} {:>7}\n",
                s.scenario.name(),
                s.throughput,
                s.latency_ms.p50,
                s.latency_ms.p90,
                s.latency_ms.p99,
                s.latency_ms.p999,
                s.cpu_s_per_million.get("weir").copied().unwrap_or(0.0),
                s.cpu_s_per_million.get("total").copied().unwrap_or(0.0),
                s.peak_rss_mb,
                s.ratio_to_baseline.map_or("-".to_string(), |r| format!("{:.0}%", r * 100.0)),
                s.events,
            );
            for (k, v) in &s.extra {
                t += &format!("{:<10}   {k}: {v}\n", "");
            }
            if let Some(noisy) = &s.noisy {
                t += &noisy.table();
            }
        }
        t
    }

    /// Writes `bench.json` and `bench.svg` into `dir`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let json = dir.join("bench.json");
        std::fs::write(&json, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", json.display()))?;
        let svg = dir.join("bench.svg");
        self.plot(&svg).map_err(|e| anyhow::anyhow!("drawing {}: {e}", svg.display()))
    }

    fn plot(&self, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
        // A third chart, the process's RSS per second, when a scenario sampled it (backlog).
        let rss: Vec<&ScenarioReport> = self.scenarios.iter().filter(|s| !s.rss_series_mb.is_empty()).collect();
        let height = if rss.is_empty() { 720 } else { 1080 };
        let root = SVGBackend::new(path, (1000, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let (top, rest) = root.split_vertically(360);
        let (bottom, rss_area) = rest.split_vertically(360);
        let seconds = self.scenarios.iter().map(|s| s.series.len()).max().unwrap_or(1).max(2) as u64;
        let max_eps = self.scenarios.iter().flat_map(|s| &s.series).map(|p| p.events_per_s).max().unwrap_or(1).max(1);
        let max_p99 = self.scenarios.iter().flat_map(|s| &s.series).map(|p| p.p99_ms).fold(1.0, f64::max);
        let colours = [&BLUE, &RED, &GREEN, &MAGENTA, &BLACK, &CYAN];

        let mut chart = ChartBuilder::on(&top)
            .caption("throughput (events/s)", ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(70)
            .build_cartesian_2d(0..seconds, 0..max_eps + max_eps / 10)?;
        chart.configure_mesh().x_desc("second").draw()?;
        for (s, colour) in self.scenarios.iter().zip(colours.iter().cycle()) {
            let colour = (*colour).to_owned();
            chart
                .draw_series(LineSeries::new(s.series.iter().map(|p| (p.t, p.events_per_s)), colour.stroke_width(2)))?
                .label(s.scenario.name())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
        }
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;

        let mut chart = ChartBuilder::on(&bottom)
            .caption("end-to-end latency p99 per second (ms)", ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(70)
            .build_cartesian_2d(0..seconds, 0.0..max_p99 * 1.1)?;
        chart.configure_mesh().x_desc("second").draw()?;
        for (s, colour) in self.scenarios.iter().zip(colours.iter().cycle()) {
            let colour = (*colour).to_owned();
            chart
                .draw_series(LineSeries::new(s.series.iter().map(|p| (p.t, p.p99_ms)), colour.stroke_width(2)))?
                .label(s.scenario.name())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
        }
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
        if !rss.is_empty() {
            let seconds = rss.iter().map(|s| s.rss_series_mb.len()).max().unwrap_or(1).max(2) as u64;
            let max_mb = rss.iter().flat_map(|s| &s.rss_series_mb).copied().fold(1.0, f64::max);
            let mut chart = ChartBuilder::on(&rss_area)
                .caption("RSS of the process under test (MB)", ("sans-serif", 18))
                .margin(10)
                .x_label_area_size(30)
                .y_label_area_size(70)
                .build_cartesian_2d(0..seconds, 0.0..max_mb * 1.1)?;
            chart.configure_mesh().x_desc("second").draw()?;
            for (s, colour) in rss.iter().zip(colours.iter().cycle()) {
                let colour = (*colour).to_owned();
                chart
                    .draw_series(LineSeries::new(
                        s.rss_series_mb.iter().enumerate().map(|(t, mb)| (t as u64, *mb)),
                        colour.stroke_width(2),
                    ))?
                    .label(s.scenario.name())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
            }
            chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
        }
        root.present()?;
        Ok(())
    }
}

/// `nproc`, the CPU model and memory, from /proc.
fn machine() -> BTreeMap<&'static str, String> {
    let mut m = BTreeMap::new();
    m.insert("nproc", std::thread::available_parallelism().map_or("?".into(), |n| n.to_string()));
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if let Some(model) = cpuinfo.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)) {
        m.insert("cpu", model.trim().to_string());
    }
    // Load when the report is written: other work on the machine skews every figure.
    if let Ok(load) = std::fs::read_to_string("/proc/loadavg") {
        m.insert("loadavg", load.split_whitespace().take(3).collect::<Vec<_>>().join(" "));
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    if let Some(total) = meminfo.lines().find(|l| l.starts_with("MemTotal")).and_then(|l| l.split(':').nth(1)) {
        m.insert("memory", total.trim().to_string());
    }
    m
}
