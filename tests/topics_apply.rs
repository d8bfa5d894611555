//! `weir topics apply` against a real broker (scripts/kafka.sh up, or WEIR_BROKERS). Each test
//! works under its own random topic prefix, so tests run in parallel and against a broker that
//! already holds other runs' topics, and deletes its topics at the end.

mod common;

use std::{collections::HashMap, path::PathBuf, sync::Arc, time::Duration};

use rdkafka::admin::AdminOptions;
use serde_json::json;
use weir::{
    config::{Config, ServiceConfig},
    envelope::ActionTask,
    kafka::topics::{self, Change},
    kafka::{self, METADATA_TIMEOUT},
    ops::{produce::Producer, receiver::Receiver},
    pipeline::{Pipeline, StageName},
};

fn config(topics_dir: PathBuf) -> Config {
    Config {
        topic_prefix: format!("t{}.", uuid::Uuid::new_v4().simple()),
        brokers: std::env::var("WEIR_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into()),
        topics_dir,
        ..Config::default()
    }
}

fn repo_topics() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("topics")
}

/// Partition counts of the topics under this test's prefix, by physical name.
fn existing(config: &Config) -> HashMap<String, usize> {
    let admin = kafka::admin(config).unwrap();
    let md = admin.inner().fetch_metadata(None, METADATA_TIMEOUT).unwrap();
    md.topics()
        .iter()
        .filter(|t| t.name().starts_with(&config.topic_prefix) && t.error().is_none())
        .map(|t| (t.name().to_owned(), t.partitions().len()))
        .collect()
}

/// Deletes what the test created, so repeated runs do not pile topics up on the dev broker.
async fn cleanup(config: &Config) {
    let names: Vec<String> = existing(config).into_keys().collect();
    if names.is_empty() {
        return;
    }
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let admin = kafka::admin(config).unwrap();
    admin.delete_topics(&names, &AdminOptions::new()).await.unwrap();
}

fn write_topics(dir: &std::path::Path, yaml: &str) {
    std::fs::write(dir.join("topics.yaml"), yaml).unwrap();
}

#[tokio::test]
async fn apply_creates_declared_topics_and_then_has_nothing_to_do() {
    let config = config(repo_topics());
    let specs = topics::load_dir(&config.topics_dir).unwrap();

    let first = topics::apply_dir(&config, false).await.unwrap();
    assert_eq!(first.changes.len(), specs.len(), "{:?}", first.changes);
    for spec in &specs {
        let topic = config.names().topic(&spec.name);
        assert!(
            first.changes.contains(&Change::Create {
                topic: topic.clone(),
                partitions: spec.partitions,
                replication_factor: spec.replication_factor,
            }),
            "no create for {topic} in {:?}",
            first.changes
        );
    }
    let actual = existing(&config);
    for spec in &specs {
        assert_eq!(actual.get(&config.names().topic(&spec.name)), Some(&(spec.partitions as usize)), "{}", spec.name);
    }

    // Created with their declared configs, so there is no drift either.
    let second = topics::apply_dir(&config, false).await.unwrap();
    assert!(second.changes.is_empty(), "{:?}", second.changes);
    cleanup(&config).await;
}

#[tokio::test]
async fn raises_partitions_and_corrects_config_drift() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path().to_owned());
    write_topics(
        dir.path(),
        "topics:\n  - name: grow\n    partitions: 2\n    replication_factor: 1\n    config:\n      retention.ms: \"3600000\"\n",
    );
    topics::apply_dir(&config, false).await.unwrap();
    let topic = config.names().topic("grow");
    assert_eq!(existing(&config).get(&topic), Some(&2));

    write_topics(
        dir.path(),
        "topics:\n  - name: grow\n    partitions: 4\n    replication_factor: 1\n    config:\n      retention.ms: \"7200000\"\n      cleanup.policy: delete\n",
    );
    let specs = topics::load_dir(dir.path()).unwrap();
    let plan = topics::plan(&config, &specs).await.unwrap();
    assert!(
        plan.changes.contains(&Change::AddPartitions { topic: topic.clone(), from: 2, to: 4 }),
        "{:?}",
        plan.changes
    );
    assert!(
        plan.changes.contains(&Change::AlterConfig {
            topic: topic.clone(),
            key: "retention.ms".into(),
            actual: Some("3600000".into()),
            declared: "7200000".into(),
        }),
        "{:?}",
        plan.changes
    );
    // cleanup.policy=delete is the broker default: not drift, although it was never set.
    assert_eq!(plan.changes.len(), 2, "{:?}", plan.changes);

    topics::apply(&config, &plan).await.unwrap();
    assert_eq!(existing(&config).get(&topic), Some(&4));
    let after = topics::plan(&config, &specs).await.unwrap();
    assert!(after.changes.is_empty(), "{:?}", after.changes);
    cleanup(&config).await;
}

#[tokio::test]
async fn shrinking_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path().to_owned());
    write_topics(dir.path(), "topics:\n  - {name: wide, partitions: 4, replication_factor: 1}\n");
    topics::apply_dir(&config, false).await.unwrap();

    write_topics(dir.path(), "topics:\n  - {name: wide, partitions: 2, replication_factor: 1}\n");
    let err = topics::apply_dir(&config, false).await.unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("refusing to shrink") && msg.contains(&config.names().topic("wide")), "{msg}");
    assert_eq!(existing(&config).get(&config.names().topic("wide")), Some(&4));
    cleanup(&config).await;
}

#[tokio::test]
async fn dry_run_changes_nothing() {
    let config = config(repo_topics());
    let specs = topics::load_dir(&config.topics_dir).unwrap();
    let plan = topics::apply_dir(&config, true).await.unwrap();
    assert_eq!(plan.changes.len(), specs.len(), "{:?}", plan.changes);
    assert!(plan.changes.iter().all(|c| matches!(c, Change::Create { .. })), "{:?}", plan.changes);
    assert!(existing(&config).is_empty(), "{:?}", existing(&config));
}

/// A service that is only in weir.yaml (the repo's topics/ declare `webhook`, not `crm`): `weir
/// topics apply` creates its action and delay topics, a second apply has nothing to do, and its
/// executor starts and calls the service (it used to exit: "topic … retry.1s does not exist").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_only_in_the_config_gets_its_topics_and_runs() {
    let receiver = Receiver::start().await.unwrap();
    let workflows = tempfile::tempdir().unwrap();
    let mut config = Config { metrics_addr: None, workflows: workflows.path().to_owned(), ..config(repo_topics()) };
    config.services.insert("crm".into(), ServiceConfig { url: receiver.url("crm"), ..Default::default() });
    config.network.allow = vec!["127.0.0.1/32".parse().unwrap()];
    let file = common::write_config_file(&config, workflows.path());

    let apply = || {
        let out = common::weir_command(&file, &["topics", "apply"]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let first = apply();
    let names = config.names();
    let derived = [names.actions("crm")].into_iter().chain(["1s", "10s", "1m", "10m"].map(|t| names.retry("crm", t)));
    let events_partitions = existing(&config)[&names.events()];
    for topic in derived {
        assert!(
            first.lines().any(|l| l.starts_with("create topic") && l.contains(&format!("{topic} "))),
            "{topic}: {first}"
        );
        assert_eq!(existing(&config).get(&topic), Some(&events_partitions), "{topic}: partitions of events");
    }
    assert_eq!(apply().trim(), "no changes");

    let config = Arc::new(config);
    let pipeline = Pipeline::start(config.clone(), &[StageName::Execute]).await.expect("the executor of crm starts");
    let task: ActionTask = serde_json::from_value(json!({
        "task_id": "task-1", "run_id": "run-1", "event_id": "e-1", "event_type": "member.created", "tenant": "site-1",
        "workflow_id": "wf", "workflow_version": 1, "step_id": "sync", "service": "crm",
        "created_at": "2026-11-23T10:00:00Z", "input": {},
    }))
    .unwrap();
    let producer = Producer::for_topic(&config, &config.names().actions("crm")).unwrap();
    producer.send_raw(b"site-1", &serde_json::to_vec(&task).unwrap(), "application/json").await.unwrap();
    let called = common::eventually(Duration::from_secs(60), || async { receiver.arrived() == 1 }).await;
    pipeline.stop().await.unwrap();
    cleanup(&config).await;
    assert!(called, "the crm service was called through its derived topic");
}
