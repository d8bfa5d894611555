//! `weir topics apply` against a real broker (scripts/kafka.sh up, or WEIR_BROKERS). Each test
//! works under its own random topic prefix, so tests run in parallel and against a broker that
//! already holds other runs' topics, and deletes its topics at the end.

use std::{collections::HashMap, path::PathBuf};

use rdkafka::admin::AdminOptions;
use weir::{
    config::Config,
    kafka::topics::{self, Change},
    kafka::{self, METADATA_TIMEOUT},
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
        let topic = config.topic(&spec.name);
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
        assert_eq!(actual.get(&config.topic(&spec.name)), Some(&(spec.partitions as usize)), "{}", spec.name);
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
    let topic = config.topic("grow");
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
    assert!(msg.contains("refusing to shrink") && msg.contains(&config.topic("wide")), "{msg}");
    assert_eq!(existing(&config).get(&config.topic("wide")), Some(&4));
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
