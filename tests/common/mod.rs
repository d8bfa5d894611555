//! Shared set-up for integration tests: every test gets its own topic prefix (so its own topics
//! and consumer groups) and its own PostgreSQL database, on the real broker and server that
//! `scripts/test.sh` starts. Nothing here mocks Kafka or PostgreSQL.
#![allow(dead_code)]

pub mod broker;
pub mod outcome;

use std::{
    future::Future,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    message::OwnedMessage,
    ClientConfig, Offset, TopicPartitionList,
};
use weir::{
    config::{Config, ServiceConfig},
    ops::receiver::Receiver,
};

pub fn brokers() -> String {
    std::env::var("WEIR_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

pub fn admin_database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://weir:weir@127.0.0.1:5432/weir".into())
}

/// A one-step workflow of `member.created` ([`member_created`]) calling `webhook` with the event's
/// `seq`: the runs under faults (kills, scaling) check each tenant's order on it.
pub const SINGLE_STEP: &str = "
id: notify
version: 1
trigger: {type: member.created}
steps:
  - {id: notify, service: webhook, input: {seq: '{{ data.seq }}'}}
";

/// The events of a run under faults: `var` if set (the 100,000, e.g.
/// `WEIR_RECOVERY_EVENTS`), else `default`, what fits a CI run of a debug build.
pub fn events_or(var: &str, default: usize) -> usize {
    std::env::var(var).ok().and_then(|n| n.parse().ok()).unwrap_or(default)
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// Creates an empty database for one test and returns its URL.
pub async fn fresh_database() -> String {
    let admin = admin_database_url();
    let name = unique("weir_t_");
    let pool = sqlx::PgPool::connect(&admin).await.expect("admin database reachable");
    sqlx::query(&format!("create database {name}")).execute(&pool).await.expect("create database");
    pool.close().await;
    let (base, _) = admin.rsplit_once('/').expect("URL has a database path");
    format!("{base}/{name}")
}

pub fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A config on fresh topics (applied from the repo's `topics/`) and a fresh database, with the
/// webhook service pointing at `receiver`.
pub async fn test_config(receiver: &Receiver, workflows_yaml: &[&str]) -> (Config, TestDir) {
    let dir = tempfile::tempdir().unwrap();
    for (i, yaml) in workflows_yaml.iter().enumerate() {
        std::fs::write(dir.path().join(format!("wf{i}.yaml")), yaml).unwrap();
    }
    let mut config = Config {
        brokers: brokers(),
        topic_prefix: unique("t") + ".",
        database_url: fresh_database().await,
        metrics_addr: None,
        topics_dir: repo_path("topics"),
        workflows: dir.path().to_path_buf(),
        ..Config::default()
    };
    config.services.insert(
        "webhook".into(),
        ServiceConfig { url: receiver.url("hook"), timeout: Duration::from_secs(5), ..Default::default() },
    );
    config.network.allow = vec!["127.0.0.1/32".parse().unwrap()];
    config.validate().unwrap();
    weir::kafka::topics::apply_dir(&config, false).await.expect("topics apply");
    weir::ops::workflows::apply_dir(&config, dir.path(), false).await.expect("workflows apply");
    let dir = TestDir { dir, topic_config: config.clone() };
    (config, dir)
}

/// A test's work directory (its workflow files) that, when the test ends, also deletes the test's
/// topics, so that running the suite again and again does not pile partitions up on the broker.
pub struct TestDir {
    dir: tempfile::TempDir,
    topic_config: Config,
}

impl TestDir {
    pub fn path(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        // Drop cannot await, and the test's runtime may be the one calling: delete from a thread
        // of its own. A failure only leaves topics behind; it must not fail the test.
        let config = self.topic_config.clone();
        let deleted = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(weir::kafka::topics::delete_all(&config))
        })
        .join();
        if let Ok(Err(e)) = deleted {
            eprintln!("leaving the test's topics behind: {e:#}");
        }
    }
}

/// Polls `check` every 50 ms until it returns true or `timeout` passes; returns the last answer.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `member.created` event of tenant `tenant-{n % tenants}` carrying its sequence number `n`
/// (`data.seq`), so a receiver's calls can be checked for order per tenant.
pub fn member_created(n: usize, tenants: usize) -> weir::envelope::Event {
    serde_json::from_value(serde_json::json!({
        "id": format!("e-{n}"),
        "source": "/ghost/test",
        "type": "member.created",
        "tenant": format!("tenant-{}", n % tenants),
        "data": {"seq": n},
    }))
    .unwrap()
}

/// A consumer that reads from the beginning with a throw-away group and commits nothing.
pub fn reader() -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("reader-"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap()
}

/// Reads `topic` from the beginning with a throw-away group until `want` messages arrived or
/// `timeout` passed.
pub fn read_topic(topic: &str, want: usize, timeout: Duration) -> Vec<OwnedMessage> {
    let consumer = reader();
    consumer.subscribe(&[topic]).unwrap();
    let deadline = std::time::Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < want && std::time::Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            out.push(m.detach());
        }
    }
    out
}

/// Sum over partitions of the offsets `group` has committed on `topic`.
pub fn committed_total(group: &str, topic: &str, partitions: i32) -> i64 {
    let consumer: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", brokers()).set("group.id", group).create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    committed
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        })
        .sum()
}

pub fn header<'a>(m: &'a OwnedMessage, name: &str) -> Option<&'a str> {
    weir::kafka::header_str(m, name)
}

/// A TCP forwarder the test can cut: while down it refuses new connections and drops open ones,
/// as a crashed or partitioned database looks to a client.
pub struct CuttableProxy {
    pub addr: std::net::SocketAddr,
    up: Arc<AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl CuttableProxy {
    pub async fn start(target: std::net::SocketAddr) -> CuttableProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let (cut, cuts) = tokio::sync::watch::channel(0u64);
        let flag = up.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else { return };
                if !flag.load(Ordering::SeqCst) {
                    continue; // dropped: the client sees the connection closed
                }
                let mut cuts = cuts.clone();
                // Only cuts after this connection was accepted end it.
                cuts.borrow_and_update();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cuts.changed() => {}
                    }
                });
            }
        });
        CuttableProxy { addr, up, cut, task }
    }

    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        if !up {
            self.cut.send_modify(|n| *n += 1);
        }
    }
}

impl Drop for CuttableProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Writes `config` as a `weir.yaml` in `dir`, for tests that run the `weir` binary: the config
/// serialized whole, so the file is exactly what the test built.
pub fn write_config_file(config: &Config, dir: &std::path::Path) -> PathBuf {
    let path = dir.join("weir.yaml");
    std::fs::write(&path, serde_yaml_ng::to_string(config).unwrap()).unwrap();
    path
}

/// `weir --config <config> <args>`, as a user would run it against that file.
pub fn weir_command(config: &std::path::Path, args: &[&str]) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_weir"));
    command
        .arg("--config")
        .arg(config)
        .args(args)
        // The file says where everything is; the test's own environment must not override it.
        .env_remove("DATABASE_URL")
        .env_remove("WEIR_BROKERS");
    command
}

/// A `weir` process started by a test; killed (SIGKILL, no clean-up) when dropped.
pub struct WeirProcess {
    pub child: std::process::Child,
    pub log: PathBuf,
}

impl WeirProcess {
    /// Starts `weir --config <config> <args>`, logging to `<config's dir>/weir-<n>.log`.
    pub fn start(config: &std::path::Path, args: &[&str]) -> WeirProcess {
        let log = config.with_file_name(format!("{}.log", unique("weir-")));
        let child = weir_command(config, args)
            .env("RUST_LOG", std::env::var("WEIR_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::options().append(true).open(&log).unwrap())
            .spawn()
            .expect("starting the weir binary");
        WeirProcess { child, log }
    }

    /// Kills the process the way a crash or `kill -9` would: nothing is flushed or committed.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for WeirProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A single number from PostgreSQL, or -1 while the query fails (the database or a table not there
/// yet).
pub async fn scalar(url: &str, sql: &str) -> i64 {
    let Ok(pool) = sqlx::PgPool::connect(url).await else { return -1 };
    let n = sqlx::query_scalar(sql).fetch_one(&pool).await.unwrap_or(-1);
    pool.close().await;
    n
}

/// The last 30 lines of a log, for a failure message.
pub fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// The sum of `topic`'s end offsets over its `partitions`.
pub fn end_offsets(topic: &str, partitions: i32) -> i64 {
    let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    (0..partitions).map(|p| consumer.fetch_watermarks(topic, p, Duration::from_secs(10)).unwrap().1).sum()
}

/// SIGTERM to a `weir` child: the graceful drain.
pub fn terminate(weir: &WeirProcess) {
    let pid = weir.child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
}

/// A diamond workflow (a → b, c → d), each step carrying the event's `seq`.
pub const DIAMOND: &str = "
id: diamond
version: 1
trigger: {type: member.created}
steps:
  - {id: a, service: webhook, input: {seq: '{{ data.seq }}'}}
  - {id: b, service: webhook, needs: [a], input: {seq: '{{ data.seq }}'}}
  - {id: c, service: webhook, needs: [a], input: {seq: '{{ data.seq }}'}}
  - {id: d, service: webhook, needs: [b, c], input: {seq: '{{ data.seq }}'}}
";

/// Task `n` of tenant `tenant` for the `webhook` service (workflow `welcome`, step `notify`), with
/// `input` as the call's body input: what the evaluator would produce, for tests of the executor
/// that put tasks on the action topic themselves.
pub fn webhook_task(n: usize, tenant: &str, input: serde_json::Value) -> weir::envelope::ActionTask {
    serde_json::from_value(serde_json::json!({
        "task_id": format!("task-{n}"), "run_id": format!("run-{n}"), "event_id": format!("e-{n}"),
        "event_type": "member.created", "tenant": tenant, "workflow_id": "welcome", "workflow_version": 1,
        "step_id": "notify", "service": "webhook", "created_at": "2026-11-23T10:00:00Z", "input": input,
    }))
    .unwrap()
}

/// Produces `tasks` keyed by tenant through `producer`, up to 1,000 in flight at once (a tenant's
/// tasks stay in order: the producer is idempotent and a tenant is one partition).
pub async fn produce_tasks(producer: &weir::ops::produce::Producer, tasks: &[weir::envelope::ActionTask]) {
    use futures::{stream::FuturesUnordered, StreamExt};
    let mut inflight = FuturesUnordered::new();
    for t in tasks {
        if inflight.len() >= 1_000 {
            inflight.next().await.unwrap();
        }
        let (producer, key, payload) = (producer.clone(), t.tenant.clone(), serde_json::to_vec(t).unwrap());
        inflight.push(async move { producer.send_raw(key.as_bytes(), &payload, "application/json").await.unwrap() });
    }
    while inflight.next().await.is_some() {}
}
