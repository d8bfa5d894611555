//! Retention (`sink.retention`) through the real broker, database and HTTP receiver: the results
//! and run tables partitioned by their runs' start (`run_at`), partitions older than the
//! retention dropped while the record stage writes, the retained rows neither lost nor written
//! twice (results redelivered included), a row whose time has no partition kept in the default
//! one, and a database of the old, unpartitioned shape upgraded without losing a row.

mod common;

use std::{borrow::Cow, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use common::*;
use rdkafka::{
    message::{Header, OwnedHeaders},
    producer::FutureRecord,
    Message as _,
};
use weir::{
    config::{Config, RetentionConfig},
    ops::receiver::Receiver,
    pipeline::Pipeline,
    stages::record::{self, retention},
};

/// Two steps, so that every run has a `workflow_runs` row and two `action_results` rows.
const TWO_STEPS: &str = "
id: pair
trigger: {type: member.created}
steps:
  - {id: a, service: webhook}
  - {id: b, service: webhook, needs: [a]}
";
const STEPS: i64 = 2;

/// Produces `member.created` events `range` with the Kafka timestamp `at` (the record time, which
/// becomes their runs' `run_at`), and the same CloudEvents `time`.
async fn produce_at(config: &Config, range: std::ops::Range<usize>, at: DateTime<Utc>) {
    let producer = weir::kafka::producer(config).unwrap();
    let topic = config.names().events();
    for n in range {
        let mut event = member_created(n, 4);
        event.time = Some(at.to_rfc3339());
        let payload = serde_json::to_vec(&event).unwrap();
        let headers = OwnedHeaders::new().insert(Header { key: "content-type", value: Some("application/json") });
        let record = FutureRecord::to(&topic)
            .key(event.tenant.as_bytes())
            .payload(&payload)
            .headers(headers)
            .timestamp(at.timestamp_millis());
        producer.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| e).unwrap();
    }
}

/// Rows of `table` whose events are `e-{from}` … `e-{to - 1}`, and how many distinct keys they have.
async fn rows_of(url: &str, table: &str, key: &str, range: std::ops::Range<usize>) -> (i64, i64) {
    let ids: Vec<String> = range.map(|n| format!("e-{n}")).collect();
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let counts =
        sqlx::query_as(&format!("select count(*), count(distinct {key}) from {table} where event_id = any($1)"))
            .bind(&ids)
            .fetch_one(&pool)
            .await
            .unwrap();
    pool.close().await;
    counts
}

/// The partitions of `table` whose name says they start before `before` (their lower bound in
/// the name: `<table>_pYYYYMMDD_HHMMSS`), the default partition aside.
async fn partitions_before(url: &str, table: &str, before: DateTime<Utc>) -> Vec<String> {
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let names: Vec<String> = sqlx::query_scalar(
        "select c.relname::text from pg_inherits i join pg_class c on c.oid = i.inhrelid
         where i.inhparent = $1::regclass order by 1",
    )
    .bind(table)
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    let cut = retention::partition_name(table, before);
    names.into_iter().filter(|n| !n.ends_with("_default") && *n < cut).collect()
}

/// Which partition holds the rows of event `e-{n}` in `table`.
async fn partition_of(url: &str, table: &str, n: usize) -> Vec<String> {
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let names = sqlx::query_scalar(&format!(
        "select distinct tableoid::regclass::text from {table} where event_id = $1 order by 1"
    ))
    .bind(format!("e-{n}"))
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    names
}

/// Waits until every run of events `range` succeeded with both its steps recorded.
async fn wait_done(url: &str, range: std::ops::Range<usize>, what: &str) {
    let runs = range.len() as i64;
    let done = eventually(Duration::from_secs(180), || async {
        let ids: Vec<String> = range.clone().map(|n| format!("e-{n}")).collect();
        let Ok(pool) = sqlx::PgPool::connect(url).await else { return false };
        let succeeded: Result<i64, _> =
            sqlx::query_scalar("select count(*) from workflow_runs where status = 'succeeded' and event_id = any($1)")
                .bind(&ids)
                .fetch_one(&pool)
                .await;
        pool.close().await;
        succeeded.is_ok_and(|n| n == runs)
    })
    .await;
    let (rows, _) = rows_of(url, "action_results", "task_id", range.clone()).await;
    assert!(done, "{what}: every run of events {range:?} succeeds ({rows} result rows)");
}

/// Old runs (their events stamped six days ago) fill partitions of six days ago; then the record
/// stage restarts with `keep: 3d` while a backlog of new runs waits and more arrive: the old
/// partitions are dropped, their rows with them; every new run's rows are there exactly once,
/// results produced a second time (a redelivery) included; a run stamped two days ago, a day
/// with no partition, is kept in the default one; and a run stamped six days ago arriving after
/// the drop leaves no row, without holding up the runs behind it.
///
/// (Six days, not more: the events topic keeps 7 days, and the broker refuses a record whose
/// timestamp is older than that.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_older_than_the_retention_are_dropped_while_the_sink_writes_and_no_retained_row_is_lost_or_doubled()
{
    const OLD: usize = 40;
    const BACKLOG: usize = 150;
    const LATER: usize = 100;
    let receiver = Receiver::start().await.unwrap();
    let (mut config, _dir) = test_config(&receiver, &[TWO_STEPS]).await;
    let url = config.database_url.clone();
    let now = Utc::now();
    let six_days_ago = now - chrono::Duration::days(6);

    // The partitions of six days ago, as a record stage running then would have made them.
    let pool = record::pool(&config).unwrap();
    record::migrate(&pool).await.unwrap();
    // (Made one ahead only, so that the days between then and now have none: a row of those days
    // goes to the default partition.)
    let made_then = RetentionConfig { ahead: 1, ..Default::default() };
    let then = retention::maintain(&pool, &made_then, six_days_ago).await.unwrap();
    assert!(then.ran && then.created >= 2, "partitions of six days ago made: {then:?}");

    // 1. Old runs, recorded with retention off (kept forever).
    let pipeline = Pipeline::start(Arc::new(config.clone()), &Pipeline::ALL).await.unwrap();
    produce_at(&config, 0..OLD, six_days_ago).await;
    wait_done(&url, 0..OLD, "old runs").await;
    pipeline.stop().await.unwrap();
    assert_eq!(rows_of(&url, "action_results", "task_id", 0..OLD).await, (OLD as i64 * STEPS, OLD as i64 * STEPS));
    let old_partition = retention::partition_name(
        "action_results",
        retention::Window::new(&RetentionConfig::default()).start_of(six_days_ago),
    );
    assert_eq!(
        partition_of(&url, "action_results", 0).await,
        vec![old_partition.clone()],
        "old rows in their day's partition"
    );
    // What keep: 3d drops: every partition ending at or before this.
    let keep = RetentionConfig { keep: Some(Duration::from_secs(3 * 86_400)), ..Default::default() };
    let three_days_ago = retention::Window::new(&keep).cutoff(now).unwrap();
    let old_partitions = partitions_before(&url, "action_results", three_days_ago).await;
    assert!(old_partitions.contains(&old_partition), "{old_partitions:?}");

    // 2. A backlog of new runs waits while the record stage is down; it restarts with keep: 3d.
    produce_at(&config, OLD..OLD + BACKLOG, Utc::now()).await;
    config.sink.retention = RetentionConfig {
        keep: Some(Duration::from_secs(3 * 86_400)),
        check_every: Duration::from_secs(1),
        ..Default::default()
    };
    config.validate().unwrap();
    let config = Arc::new(config);
    let pipeline = Pipeline::start(config.clone(), &Pipeline::ALL).await.unwrap();
    // More new runs while it writes, and one stamped two days ago: within the retention, on a day
    // no partition was made for.
    let gap = OLD + BACKLOG + LATER;
    produce_at(&config, OLD + BACKLOG..OLD + BACKLOG + LATER, Utc::now()).await;
    produce_at(&config, gap..gap + 1, Utc::now() - chrono::Duration::days(2)).await;
    let dropped = eventually(Duration::from_secs(120), || async {
        partitions_before(&url, "action_results", three_days_ago).await.is_empty()
            && partitions_before(&url, "workflow_runs", three_days_ago).await.is_empty()
    })
    .await;
    assert!(
        dropped,
        "partitions older than 3 days dropped: {:?}",
        partitions_before(&url, "action_results", three_days_ago).await
    );
    wait_done(&url, OLD..gap + 1, "new runs").await;

    // 3. A run of six days ago arriving now, after its partition went, then more new runs.
    let late = gap + 1;
    produce_at(&config, late..late + 1, six_days_ago).await;
    produce_at(&config, late + 1..late + 21, Utc::now()).await;
    wait_done(&url, late + 1..late + 21, "runs after a late one").await;
    // Its first step is called (the executor knows nothing of retention), its result is not
    // written, so its run never advances: step b is never called. (Were the result written, the
    // coordinator would start b.) Calls are counted by the event id in their body, which the
    // calls of a new run show to be there: two each.
    let calls_of = |n: usize| {
        let id = format!("e-{n}");
        receiver.calls().iter().filter(|c| c.body["event"]["id"].as_str() == Some(id.as_str())).count()
    };
    assert_eq!(calls_of(late + 1), 2, "a new run's two calls, found by their event id");
    assert!(
        eventually(Duration::from_secs(60), || async { calls_of(late) >= 1 }).await,
        "the late run's first step is called"
    );
    let results = config.names().results();
    let group = config.names().group("sink");
    // Every result: two per run, but one for the late run.
    let expected = 2 * (late + 21 - 1) as i64 + 1;
    let consumed = eventually(Duration::from_secs(60), || async {
        end_offsets(&results, 8) == expected && committed_total(&group, &results, 8) == expected
    })
    .await;
    assert!(consumed, "the record stage took every result: {} of {expected}", committed_total(&group, &results, 8));

    // 4. Every result produced so far, produced again (a redelivery): nothing doubles.
    let total = end_offsets(&results, 8);
    let copies = read_topic(&results, total as usize, Duration::from_secs(60));
    assert_eq!(copies.len() as i64, total, "read back every result");
    let resend = weir::ops::produce::Producer::for_topic(&config, &results).unwrap();
    for m in &copies {
        resend
            .send_raw(m.key().unwrap_or_default(), m.payload().unwrap_or_default(), "application/json")
            .await
            .unwrap();
    }
    let caught_up =
        eventually(Duration::from_secs(120), || async { committed_total(&group, &results, 8) >= 2 * total }).await;
    pipeline.stop().await.unwrap();
    assert!(caught_up, "the record stage took every result again");

    let new = (late + 21 - OLD) as i64 - 1; // the late run aside
    let (rows, distinct) = rows_of(&url, "action_results", "task_id", OLD..late + 21).await;
    assert_eq!((rows, distinct), (new * STEPS, new * STEPS), "each new step's row exactly once");
    let (runs, distinct_runs) = rows_of(&url, "workflow_runs", "run_id", OLD..late + 21).await;
    assert_eq!((runs, distinct_runs), (new, new), "each new run's row exactly once");
    assert_eq!(
        rows_of(&url, "action_results", "task_id", 0..OLD).await.0,
        0,
        "the old rows went with their partitions"
    );
    assert_eq!(rows_of(&url, "workflow_runs", "run_id", 0..OLD).await.0, 0);
    assert_eq!(
        rows_of(&url, "action_results", "task_id", late..late + 1).await.0,
        0,
        "a result for a dropped window is not written"
    );
    assert_eq!(
        partition_of(&url, "action_results", gap).await,
        vec!["action_results_default".to_string()],
        "a run of a day without a partition is kept, in the default partition"
    );
    // New runs' rows are in the partitions made ahead for them, not in the default one.
    let new_partition = partition_of(&url, "action_results", late + 1).await;
    assert!(new_partition.len() == 1 && new_partition[0].starts_with("action_results_p"), "{new_partition:?}");
}

/// A database with rows in the shape before partitions (migrations up to 0020) is upgraded by
/// the record stage's migrations: every row is still there, in a partition of its day, and a
/// result of an old row written again conflicts with it rather than doubling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_of_the_old_shape_upgrades_without_losing_a_row() {
    let url = fresh_database().await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let mut before = sqlx::migrate!("./migrations");
    before.migrations = Cow::Owned(before.migrations.iter().filter(|m| m.version < 30).cloned().collect());
    before.run(&pool).await.unwrap();
    let rows = 500;
    sqlx::query(
        "insert into action_results (task_id, run_id, event_id, tenant, workflow_id, workflow_version, step_id,
             service, status, attempts, latency_ms, finished_at, output)
         select 'task-' || n, 'run-' || (n / 2), 'e-' || (n / 2), 'tenant', 'w', 1, 's' || (n % 2), 'webhook',
             'succeeded', 1, 1.5, timestamptz '2026-11-01T12:00:00Z' + n * interval '1 hour', '{\"n\": 1}'
         from generate_series(0, $1 - 1) n",
    )
    .bind(rows)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "insert into workflow_runs (run_id, tenant, workflow_id, workflow_version, event_id, event, status, deadline, started_at)
         select 'run-' || n, 'tenant', 'w', 1, 'e-' || n, '{}', 'succeeded', now(),
             timestamptz '2026-11-01T12:00:00Z' + n * interval '2 hours'
         from generate_series(0, $1 / 2 - 1) n",
    )
    .bind(rows)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("insert into run_steps_started (run_id, step_id) values ('run-1', 's1')").execute(&pool).await.unwrap();

    record::migrate(&pool).await.unwrap();
    let count = |sql: &'static str| {
        let pool = pool.clone();
        async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(&pool).await.unwrap() }
    };
    assert_eq!(count("select count(*) from action_results").await, rows as i64);
    assert_eq!(
        count("select count(distinct task_id) from action_results where output = '{\"n\": 1}'").await,
        rows as i64
    );
    assert_eq!(count("select count(*) from workflow_runs").await, rows as i64 / 2);
    assert_eq!(count("select count(*) from run_steps_started").await, 1);
    assert_eq!(count("select count(*) from action_results_default").await, 0, "every old row in its day's partition");
    let covered =
        count("select count(distinct date_trunc('day', finished_at at time zone 'UTC')) from action_results").await;
    let days = count(
        "select count(*) from pg_inherits where inhparent = 'action_results'::regclass
         and inhrelid::regclass::text like 'action_results_p%'",
    )
    .await;
    assert_eq!(days, covered, "a partition per day the old rows cover");
    // An old result written again (the record stage's INSERT, `run_at` falling back to its
    // finished_at as results from before the upgrade do) conflicts with its row.
    let mut columns = record::Columns::default();
    let again: weir::envelope::ActionResult = serde_json::from_value(serde_json::json!({
        "task_id": "task-7", "run_id": "run-3", "event_id": "e-3", "tenant": "tenant", "workflow_id": "w",
        "workflow_version": 1, "step_id": "s1", "service": "webhook", "status": "succeeded", "attempts": 1,
        "latency_ms": 1.5, "finished_at": "2026-11-01T19:00:00Z"}))
    .unwrap();
    columns.push(again, "2026-11-01T19:00:00Z".parse().unwrap());
    let inserted = columns.insert(&mut pool.acquire().await.unwrap()).await.unwrap();
    assert_eq!(inserted, 0, "the same result again is a conflict, not a second row");
    assert_eq!(count("select count(*) from action_results").await, rows as i64);
    pool.close().await;
}

/// The maintenance on its own, at two moments: rows that reached the default partition before
/// their partition existed are moved into it when it is made; a row older than the retention is
/// deleted from the default partition; five days later, the partitions older than `keep` are
/// dropped, their rows with them, and new ones are made ahead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_maintenance_moves_rows_out_of_the_default_partition_and_drops_whole_partitions() {
    let url = fresh_database().await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    record::migrate(&pool).await.unwrap();
    let now = Utc::now();
    let row = |n: usize, run_at: DateTime<Utc>| -> weir::envelope::ActionResult {
        serde_json::from_value(serde_json::json!({
            "task_id": format!("task-{n}"), "run_id": format!("run-{n}"), "event_id": format!("e-{n}"),
            "tenant": "tenant", "workflow_id": "w", "workflow_version": 1, "step_id": "s", "service": "webhook",
            "status": "succeeded", "attempts": 1, "latency_ms": 1.0, "finished_at": now.to_rfc3339(),
            "run_at": run_at.to_rfc3339()}))
        .unwrap()
    };
    let mut columns = record::Columns::default();
    columns.push(row(1, now), now);
    columns.push(row(2, now - chrono::Duration::days(10)), now);
    assert_eq!(columns.insert(&mut pool.acquire().await.unwrap()).await.unwrap(), 2);
    let count = |sql: String| {
        let pool = pool.clone();
        async move { sqlx::query_scalar::<_, i64>(&sql).fetch_one(&pool).await.unwrap() }
    };
    assert_eq!(count("select count(*) from action_results_default".into()).await, 2, "no partition yet");

    let config = RetentionConfig { keep: Some(Duration::from_secs(3 * 86_400)), ..Default::default() };
    let window = retention::Window::new(&config);
    let round = retention::maintain(&pool, &config, now).await.unwrap();
    // Per table: the day before, today and three ahead.
    assert_eq!((round.created, round.dropped, round.deleted), (10, 0, 1), "{round:?}");
    assert_eq!(count("select count(*) from action_results_default".into()).await, 0);
    assert_eq!(
        partition_of(&url, "action_results", 1).await,
        vec![retention::partition_name("action_results", window.start_of(now))]
    );
    assert_eq!(
        count("select count(*) from action_results where task_id = 'task-2'".into()).await,
        0,
        "older than keep"
    );

    // Five days on, the cutoff is two days after today: yesterday's, today's and tomorrow's go.
    let later = now + chrono::Duration::days(5);
    let round = retention::maintain(&pool, &config, later).await.unwrap();
    assert_eq!(round.dropped, 6, "{round:?}");
    assert_eq!(round.created, 10, "per table, the day before then and three ahead: {round:?}");
    assert_eq!(count("select count(*) from action_results".into()).await, 0, "today's row went with its partition");
    let kept = count(
        "select count(*) from pg_inherits where inhparent = 'action_results'::regclass
         and inhrelid::regclass::text like 'action_results_p%'"
            .into(),
    )
    .await;
    assert_eq!(kept, 5 - 3 + 5, "made before, less dropped, plus made now");
    pool.close().await;
}
