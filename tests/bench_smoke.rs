//! Every `weir bench` scenario, for a few seconds each, on the real broker and database: each
//! completes, moves events, and leaves a well-formed report (JSON and SVG). No timing is asserted:
//! speed is what the benchmark itself reports.

mod common;

use std::time::Duration;

use common::*;
use rdkafka::{
    consumer::{BaseConsumer, Consumer as _},
    ClientConfig,
};
use weir::{
    config::Config,
    ops::bench::{
        self,
        backlog::{BacklogOptions, BacklogStages},
        RateArg, Scenario,
    },
};

fn bench_config() -> Config {
    Config {
        brokers: brokers(),
        database_url: admin_database_url(),
        metrics_addr: None,
        topics_dir: repo_path("topics"),
        ..Config::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_completes_with_throughput_and_a_well_formed_report() {
    let out = tempfile::tempdir().unwrap();
    let config = bench_config();
    let options = bench::Options {
        scenarios: Scenario::ALL.to_vec(),
        duration: Duration::from_secs(5),
        rate: RateArg::FlatOut,
        tenants: 50,
        out: out.path().to_path_buf(),
        progress: false,
        backlog: Default::default(),
    };
    let report = bench::run(&config, &options).await.expect("every scenario runs");
    assert_eq!(report.scenarios.len(), Scenario::ALL.len());
    for s in &report.scenarios {
        let name = s.scenario.name();
        assert!(s.events > 0 && s.throughput > 0.0, "{name}: no events through");
        assert!(s.latency_ms.count > 0 && s.latency_ms.p50 <= s.latency_ms.p99, "{name}: {:?}", s.latency_ms);
        assert!(s.cpu_s.weir_s > 0.0 && s.peak_rss_mb > 0.0, "{name}: CPU and RSS are read");
        assert!(s.ratio_to_baseline.is_some(), "{name}: a ratio against the baseline of the same run");
        assert!(!s.series.is_empty(), "{name}: a series over time");
    }
    let throttled = report.scenarios.iter().find(|s| s.scenario == Scenario::Throttled).unwrap();
    assert!(throttled.extra["configured_per_s"].as_u64().unwrap() > 0);
    let sink = report.scenarios.iter().find(|s| s.scenario == Scenario::Sink).unwrap();
    assert!(sink.extra["copy_rows_per_s"].as_f64().unwrap() > 0.0, "the COPY comparison ran");

    // The files: JSON that reads back with every scenario, an SVG with both charts.
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("bench.json")).unwrap()).expect("bench.json is JSON");
    let names: Vec<&str> =
        json["scenarios"].as_array().unwrap().iter().map(|s| s["scenario"].as_str().unwrap()).collect();
    assert_eq!(names, ["baseline", "evaluate", "pipeline", "throttled", "sink"]);
    assert!(json["scenarios"][0]["latency_ms"]["p99"].is_number());
    let svg = std::fs::read_to_string(out.path().join("bench.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "bench.svg is an SVG document");
    assert!(svg.contains("throughput") && svg.contains("latency"), "both charts are drawn");
    assert!(report.table().lines().count() > Scenario::ALL.len(), "a table row per scenario");
}

#[tokio::test]
async fn bad_options_are_refused_with_the_reason() {
    let options = bench::Options {
        scenarios: vec![Scenario::Baseline],
        duration: Duration::from_secs(1),
        rate: RateArg::FlatOut,
        tenants: 0,
        out: std::env::temp_dir(),
        progress: false,
        backlog: Default::default(),
    };
    let err = bench::run(&Config::default(), &options).await.unwrap_err();
    assert!(err.to_string().contains("--tenants"), "{err}");
    assert!("fast".parse::<RateArg>().unwrap_err().contains("flat-out"));
}

/// The backlog scenario with a few thousand events, once with the evaluator alone and once with
/// every stage: the backlog is drained by a separate `weir run` whose RSS was sampled, the report
/// says so, and the scenario's topics are gone afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backlog_is_drained_by_a_separate_process_whose_memory_is_sampled() {
    for (stages, events) in [(BacklogStages::Evaluate, 3_000), (BacklogStages::All, 1_000)] {
        let out = tempfile::tempdir().unwrap();
        let options = bench::Options {
            scenarios: vec![Scenario::Backlog],
            duration: Duration::from_secs(1),
            rate: RateArg::FlatOut,
            tenants: 20,
            out: out.path().to_path_buf(),
            progress: false,
            backlog: BacklogOptions {
                events,
                body_bytes: 300,
                stages,
                binary: Some(env!("CARGO_BIN_EXE_weir").into()),
            },
        };
        let report = bench::run(&bench_config(), &options).await.expect("the backlog scenario runs");
        let s = &report.scenarios[0];
        assert_eq!(s.scenario, Scenario::Backlog);
        assert_eq!(s.events, events, "{stages:?}: every event drained");
        assert!(s.throughput > 0.0 && !s.series.is_empty(), "{stages:?}: a drain rate and series");
        assert_eq!(s.series.iter().map(|p| p.events_per_s).sum::<u64>(), events, "{stages:?}: the series adds up");
        assert!(!s.rss_series_mb.is_empty() && s.rss_series_mb.iter().all(|r| *r > 0.0), "{stages:?}: RSS sampled");
        // VmHWM (read once, at the end) and the VmRSS samples agree: the kernel syncs per-thread
        // RSS counters lazily, so they may differ by a little, not by whole megabytes.
        let sampled_max = s.extra["rss_max_sampled_mb"].as_f64().unwrap();
        let hwm = s.extra["vm_hwm_mb"].as_f64().expect("VmHWM read");
        assert!(hwm + 1.0 >= sampled_max, "{stages:?}: VmHWM {hwm} well below a sample {sampled_max}");
        // (The extra figures are rounded to 0.01 MB, the peak is not.)
        assert!(s.peak_rss_mb + 0.01 >= hwm.max(sampled_max), "{stages:?}: peak is the larger reading");
        assert!(s.cpu_s.weir_s > 0.0, "{stages:?}: the child's CPU is read");
        assert!(s.extra["within_limit"].is_boolean());
        assert_eq!(s.extra["body_bytes"], 300);
        if stages == BacklogStages::All {
            // Every event starts the platform-wide workflow: at least one call each.
            assert!(s.outputs >= events, "{} calls for {events} events", s.outputs);
        }
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.path().join("bench.json")).unwrap()).unwrap();
        assert_eq!(json["scenarios"][0]["scenario"], "backlog");
        assert!(json["scenarios"][0]["rss_series_mb"].as_array().is_some_and(|a| !a.is_empty()));
        let svg = std::fs::read_to_string(out.path().join("bench.svg")).unwrap();
        assert!(svg.contains("RSS of the process under test"), "{stages:?}: the RSS chart is drawn");

        // Its topics were deleted (they hold the backlog).
        let prefix = s.extra["topic_prefix"].as_str().unwrap().to_string();
        let gone = eventually(Duration::from_secs(30), || {
            let prefix = prefix.clone();
            async move {
                let client: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
                let metadata = client.fetch_metadata(None, Duration::from_secs(10)).unwrap();
                !metadata.topics().iter().any(|t| t.name().starts_with(&prefix))
            }
        })
        .await;
        assert!(gone, "{stages:?}: topics of {prefix} deleted");
    }
}

#[tokio::test]
async fn bad_backlog_options_are_refused_with_the_flag() {
    let options = bench::Options {
        scenarios: vec![Scenario::Backlog],
        duration: Duration::from_secs(1),
        rate: RateArg::FlatOut,
        tenants: 10,
        out: std::env::temp_dir(),
        progress: false,
        backlog: BacklogOptions { body_bytes: 5, ..Default::default() },
    };
    let err = bench::run(&Config::default(), &options).await.unwrap_err();
    assert!(err.to_string().contains("--body-bytes"), "{err}");
}
