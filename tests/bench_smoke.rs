//! Every `weir bench` scenario, for a few seconds each, on the real broker and database: each
//! completes, moves events, and leaves a well-formed report (JSON and SVG). No timing is asserted:
//! speed is what the benchmark itself reports.

mod common;

use std::time::Duration;

use common::*;
use weir::{
    bench::{self, RateArg, Scenario},
    config::Config,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_completes_with_throughput_and_a_well_formed_report() {
    let out = tempfile::tempdir().unwrap();
    let config = Config {
        brokers: brokers(),
        database_url: admin_database_url(),
        metrics_addr: None,
        topics_dir: repo_path("topics"),
        ..Config::default()
    };
    let options = bench::Options {
        scenarios: Scenario::ALL.to_vec(),
        duration: Duration::from_secs(5),
        rate: RateArg::FlatOut,
        tenants: 50,
        out: out.path().to_path_buf(),
        progress: false,
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
    };
    let err = bench::run(&Config::default(), &options).await.unwrap_err();
    assert!(err.to_string().contains("--tenants"), "{err}");
    assert!("fast".parse::<RateArg>().unwrap_err().contains("flat-out"));
}
