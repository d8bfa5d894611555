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

/// Options for `scenarios`, each measured `secs` seconds, with `tenants` tenants, flat out, the
/// files in `out`; child processes run the built binary (this one is the test harness).
fn options(scenarios: Vec<Scenario>, secs: u64, tenants: usize, out: &std::path::Path) -> bench::Options {
    bench::Options {
        scenarios,
        duration: Duration::from_secs(secs),
        rate: RateArg::FlatOut,
        tenants,
        out: out.to_path_buf(),
        progress: false,
        backlog: options_backlog(),
        in_process: false,
    }
}

/// The backlog options of [`options`]: the defaults, with the built binary.
fn options_backlog() -> BacklogOptions {
    BacklogOptions { binary: Some(env!("CARGO_BIN_EXE_weir").into()), ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_completes_with_throughput_and_a_well_formed_report() {
    let out = tempfile::tempdir().unwrap();
    let config = bench_config();
    let options = options(Scenario::ALL.to_vec(), 5, 50, out.path());
    let report = bench::run(&config, &options).await.expect("every scenario runs");
    assert_eq!(report.scenarios.len(), Scenario::ALL.len());
    for s in &report.scenarios {
        let name = s.scenario.name();
        assert!(s.events > 0 && s.throughput > 0.0, "{name}: no events through");
        assert!(s.latency_ms.count > 0 && s.latency_ms.p50 <= s.latency_ms.p99, "{name}: {:?}", s.latency_ms);
        assert!(s.cpu_s.weir_s > 0.0 && s.peak_rss_mb > 0.0, "{name}: CPU and RSS are read");
        assert!(s.ratio_to_baseline.is_some(), "{name}: a ratio against the baseline of the same run");
        assert!(!s.series.is_empty(), "{name}: a series over time");
        if s.scenario != Scenario::Baseline {
            assert_eq!(s.extra["stages_run_in"], "weir run child", "{name}");
            assert!(s.cpu_s.bench_s > 0.0, "{name}: the generator's CPU is measured apart from the stages'");
        }
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

/// `--in-process`, for an A/B against builds that measured that way: the stages share this
/// process, whose CPU is then all counted as the stages'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stages_can_still_run_in_the_bench_process() {
    let out = tempfile::tempdir().unwrap();
    let options = bench::Options { in_process: true, ..options(vec![Scenario::Evaluate], 3, 20, out.path()) };
    let report = bench::run(&bench_config(), &options).await.expect("the evaluate scenario runs");
    let s = &report.scenarios[0];
    assert!(s.events > 0, "events through");
    assert_eq!(s.extra["stages_run_in"], "this process");
    assert_eq!(s.cpu_s.bench_s, 0.0, "nothing to tell apart: the stages' CPU is this process's");
}

/// The remote scenario: a service answering in 200 ms ± 50 ms, calls counted at the receiver,
/// and the report says what bounds them (`concurrency` calls per 200 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_remote_scenario_calls_a_slow_service_and_reports_its_bound() {
    let out = tempfile::tempdir().unwrap();
    let options = options(vec![Scenario::Remote], 3, 20, out.path());
    let report = bench::run(&bench_config(), &options).await.expect("the remote scenario runs");
    let s = &report.scenarios[0];
    assert!(s.outputs > 0, "calls made");
    assert!(s.latency_ms.p50 >= 150.0, "each call took the service's 200 ± 50 ms at least: {:?}", s.latency_ms);
    let bound = s.extra["concurrency_bound_calls_per_s"].as_f64().unwrap();
    assert!(s.extra["calls_per_s"].as_f64().unwrap() <= bound * 1.1, "{:?}", s.extra);
    // The executor alone is in the child, per-tenant caps lifted; the service saw calls overlap.
    assert_eq!(s.extra["stages_run_in"], "weir run child");
    assert_eq!(s.extra["tenant_concurrency"], s.extra["concurrency"]);
    assert!(s.extra["most_calls_at_once"].as_u64().unwrap() >= 1, "{:?}", s.extra);
}

#[tokio::test]
async fn bad_options_are_refused_with_the_reason() {
    let options = options(vec![Scenario::Baseline], 1, 0, &std::env::temp_dir());
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
            backlog: BacklogOptions { events, body_bytes: 300, stages, ..options_backlog() },
            ..options(vec![Scenario::Backlog], 1, 20, out.path())
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
        backlog: BacklogOptions { body_bytes: 5, ..options_backlog() },
        ..options(vec![Scenario::Backlog], 1, 10, &std::env::temp_dir())
    };
    let err = bench::run(&Config::default(), &options).await.unwrap_err();
    assert!(err.to_string().contains("--body-bytes"), "{err}");
}

/// The noisy scenario, a few seconds per phase: it runs its three phases and reports every
/// field — both phases' totals, the two partition groups (both non-empty), every quiet tenant's
/// figures in both phases, the noisy tenant's throughput and the one-active-tenant figure — in
/// the table and in bench.json. No figure is judged: today's main starves the quiet tenants, and
/// the report must say so rather than fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_noisy_scenario_reports_every_quiet_tenant_beside_its_uncontended_self() {
    let out = tempfile::tempdir().unwrap();
    let options = bench::Options { rate: RateArg::PerSecond(400), ..options(vec![Scenario::Noisy], 4, 4, out.path()) };
    let report = bench::run(&bench_config(), &options).await.expect("the noisy scenario runs");
    assert_eq!(report.scenarios.len(), 1);
    let s = &report.scenarios[0];
    assert_eq!(s.scenario, Scenario::Noisy);
    assert!(s.events > 0 && !s.series.is_empty(), "the contended phase's traffic is measured");
    let n = s.noisy.as_ref().expect("the noisy report");
    assert!(!n.burst && n.noisy_load.starts_with("steady"), "{}", n.noisy_load);
    assert_eq!((n.noisy_rate_per_s, n.quiet_rate_per_tenant_per_s), (360.0, 10.0));
    assert_eq!(n.receiver_latency_ms, 20);
    assert_eq!(n.partitions, 8, "the events topic of topics/");
    assert_eq!(n.drain_limit_s, 4.0);

    // Both phases: the quiet load in both, the noisy one only when contended.
    for (name, p) in [("uncontended", &n.uncontended), ("contended", &n.contended)] {
        assert_eq!(p.window_s, 4.0, "{name}");
        assert!(p.quiet_produced > 0 && p.quiet_called > 0, "{name}: {p:?}");
        assert!(p.quiet_called_in_window <= p.quiet_called && p.quiet_called <= p.quiet_produced, "{name}: {p:?}");
        assert!((0.0..=1.0).contains(&p.quiet_called_share), "{name}: {p:?}");
        assert_eq!(p.quiet_latency.produced, p.quiet_produced, "{name}");
        assert_eq!(p.drained, p.quiet_called == p.quiet_produced, "{name}: drained means every quiet event called");
        assert!(p.total_calls_per_s > 0.0, "{name}");
    }
    assert_eq!((n.uncontended.noisy_produced, n.uncontended.noisy_calls_per_s), (0, 0.0));
    assert!(n.contended.noisy_produced > 0 && n.contended.noisy_calls_per_s > 0.0, "{:?}", n.contended);

    // Every quiet tenant in both phases, on both sides of the partition split.
    assert_eq!(n.quiet_tenants.len(), 4);
    let sharing = n.quiet_tenants.iter().filter(|q| q.shares_noisy_partition).count();
    assert!((1..4).contains(&sharing), "both groups exist: {sharing} of 4 share");
    assert_eq!((n.same_partition.tenants, n.other_partitions.tenants), (sharing, 4 - sharing));
    for q in &n.quiet_tenants {
        assert_eq!(q.shares_noisy_partition, q.partition == n.noisy_partition, "{}", q.tenant);
        assert!(q.uncontended.produced > 0 && q.contended.produced > 0, "{}: load in both phases", q.tenant);
        assert_eq!(q.p99_ratio.is_some(), q.uncontended.p99_ms.is_some() && q.contended.p99_ms.is_some());
        // A p99 over the produced events exists exactly when 99 % of them were called.
        let reached = |p: &bench::noisy::TenantPhase| p.called as f64 >= (0.99 * p.produced as f64).ceil();
        assert_eq!(q.contended.p99_ms.is_some(), reached(&q.contended), "{}: {:?}", q.tenant, q.contended);
    }
    let produced: u64 = n.quiet_tenants.iter().map(|q| q.contended.produced).sum();
    assert_eq!(produced, n.contended.quiet_produced, "the tenants add up to the phase");
    assert_eq!(n.same_partition.contended_produced + n.other_partitions.contended_produced, produced);
    assert!(n.one_active_tenant.events > 0 && n.one_active_tenant.events_per_s > 0.0, "one active tenant measured");

    // The table and bench.json carry it all.
    let table = report.table();
    for q in &n.quiet_tenants {
        assert!(table.contains(&q.tenant), "{table}");
    }
    for line in ["uncontended", "contended", "same partition", "other partitions", "one active tenant"] {
        assert!(table.contains(line), "{line}: {table}");
    }
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("bench.json")).unwrap()).unwrap();
    let noisy = &json["scenarios"][0]["noisy"];
    assert_eq!(json["scenarios"][0]["scenario"], "noisy");
    for key in ["uncontended", "contended", "same_partition", "other_partitions", "quiet_tenants", "one_active_tenant"]
    {
        assert!(noisy[key].is_object() || noisy[key].is_array(), "{key} in bench.json");
    }
    let tenant = &noisy["quiet_tenants"][0];
    for key in ["p99_ms", "p50_ms", "called_share", "produced", "called", "max_ms"] {
        assert!(tenant["contended"].get(key).is_some(), "{key}: {tenant}");
    }
    assert!(noisy["contended"]["noisy_calls_per_s"].is_number());
}

#[tokio::test]
async fn the_noisy_scenario_refuses_what_it_cannot_measure() {
    let options = |tenants, rate| bench::Options {
        rate,
        ..options(vec![Scenario::NoisyBurst], 1, tenants, &std::env::temp_dir())
    };
    let err = bench::run(&Config::default(), &options(1, RateArg::PerSecond(400))).await.unwrap_err();
    assert!(err.to_string().contains("--tenants") && err.to_string().contains("partition"), "{err}");
    let err = bench::run(&Config::default(), &options(20, RateArg::FlatOut)).await.unwrap_err();
    assert!(err.to_string().contains("--rate"), "{err}");
}

/// The replay scenario on a small replay: both phases run, the replay sends a task for every event
/// it re-drives (none of them had one), and the live load is measured beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replay_scenario_measures_live_traffic_beside_a_replay() {
    let out = tempfile::tempdir().unwrap();
    let options = bench::Options {
        rate: RateArg::PerSecond(100),
        backlog: BacklogOptions { events: 1_500, ..options_backlog() },
        ..options(vec![Scenario::Replay], 3, 4, out.path())
    };
    let report = bench::run(&bench_config(), &options).await.expect("the replay scenario runs");
    let s = &report.scenarios[0];
    let extra = |key: &str| s.extra.get(key).unwrap_or_else(|| panic!("{key} in {:?}", s.extra));
    let replay = extra("replay");
    assert_eq!(replay["events"], 1_500, "{replay}");
    assert_eq!(replay["tasks"], 1_500, "one task per replayed event: {replay}");
    assert!(replay["error"].is_null(), "{replay}");
    for phase in ["live_alone", "live_beside_replay"] {
        let live = extra(phase);
        assert!(live["produced"].as_u64().unwrap() > 0 && live["called"].as_u64().unwrap() > 0, "{phase}: {live}");
    }
    assert!(s.extra.contains_key("live_p99_ratio"));
    assert!(report.table().contains("live_p99_ratio"), "{}", report.table());

    let options = bench::Options { rate: RateArg::FlatOut, ..options };
    let err = bench::run(&Config::default(), &options).await.unwrap_err();
    assert!(err.to_string().contains("--rate"), "{err}");
}

/// The ingest scenario (issue 14): `weir produce`'s producer, one CloudEvent per HTTP request and
/// batches over HTTP, each phase moving events with an acknowledgement latency, and ingest's
/// throughput as a share of produce's from the same run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ingest_scenario_reports_http_beside_produce() {
    let out = tempfile::tempdir().unwrap();
    let options = options(vec![Scenario::Ingest], 3, 20, out.path());
    let report = bench::run(&bench_config(), &options).await.expect("the ingest scenario runs");
    let s = &report.scenarios[0];
    assert_eq!(s.scenario, Scenario::Ingest);
    assert!(s.events > 0 && s.throughput > 0.0 && s.latency_ms.count > 0, "{s:?}");
    for phase in ["produce", "ingest", "ingest_batch_50"] {
        let p = &s.extra[phase];
        assert!(p["events"].as_u64().unwrap() > 0, "{phase}: {p}");
        assert!(p["ack_p50_ms"].as_f64().unwrap() <= p["ack_p99_ms"].as_f64().unwrap(), "{phase}: {p}");
    }
    assert!(s.extra["ingest_over_produce"].as_f64().unwrap() > 0.0);
    assert!(report.table().contains("ingest_over_produce"));
}

/// The scale scenario (issue 13): for each protocol, every phase moved calls, and the split of the
/// partitions into moved and stayed comes from the children's logs. Phases are windows of time,
/// and on a loaded machine a debug child may join its groups after its window ended (nothing
/// moved then), so the split is required to have found moves under some protocol, not each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scale_scenario_splits_the_partitions_that_moved_from_those_that_stayed() {
    let out = tempfile::tempdir().unwrap();
    let options =
        bench::Options { rate: RateArg::PerSecond(200), ..options(vec![Scenario::Scale], 10, 20, out.path()) };
    let report = bench::run(&bench_config(), &options).await.expect("the scale scenario runs");
    let s = &report.scenarios[0];
    assert_eq!(s.scenario, Scenario::Scale);
    let partitions = |v: &serde_json::Value| -> Vec<u64> {
        v.as_array()
            .unwrap_or_else(|| panic!("a list of partitions: {v}"))
            .iter()
            .map(|p| p.as_u64().unwrap())
            .collect()
    };
    let mut moves_found = false;
    for protocol in ["eager", "cooperative", "consumer"] {
        let p = &s.extra[&format!("protocol_{protocol}")];
        for phase in ["steady", "scale_out_1_to_3", "scale_in_3_to_1"] {
            assert!(p[phase]["calls"].as_u64().unwrap() > 0, "{protocol} {phase}: {p}");
            assert!(p[phase]["longest_stall_ms"].is_u64(), "{protocol} {phase}: {p}");
        }
        assert!(p["steady"]["longest_stall_moved_partitions_ms"].is_null(), "nothing moves in the steady phase: {p}");
        let (either, execute) = (partitions(&p["moved_partitions"]), partitions(&p["moved_partitions_execute_group"]));
        assert!(either.iter().chain(&execute).all(|n| *n < 8), "{protocol}: partitions of 8: {p}");
        assert!(execute.iter().all(|n| either.contains(n)), "{protocol}: an executor's move is a move: {p}");
        // The first process keeps some of the executors' partitions: three members share eight.
        assert!(execute.len() < 8, "{protocol}: the added children took everything: {p}");
        if !execute.is_empty() {
            moves_found = true;
            assert!(p["scale_out_1_to_3"]["longest_stall_moved_partitions_ms"].is_u64(), "{protocol}: {p}");
        }
    }
    assert!(moves_found, "no protocol's children were found owning partitions: {:?}", s.extra);
}
