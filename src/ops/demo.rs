//! `weir demo`: the README's walk-through of the main job on a fresh machine. It applies the
//! topics under a fresh prefix, starts a local HTTP receiver as the "customer webhook", runs the
//! whole pipeline in this process, produces sample events for a few tenants (JSON and Avro mixed,
//! plus a few malformed ones) and posts a quarter of them over HTTP to the ingest stage (as
//! CloudEvents, structured and binary, with a token per tenant: docs/ingest.md), waits until every expected call and row has arrived, and shows
//! the outcome: calls received, rows in PostgreSQL, dead letters and metrics.

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use futures::StreamExt as _;
use serde_json::json;

use crate::{
    config::{Config, ServiceConfig},
    envelope::{Event, Format},
    kafka::topics,
    ops::post::{Mode, Poster},
    ops::produce::Producer,
    ops::receiver::Receiver,
    ops::workflows,
    pipeline::Pipeline,
    shutdown::CancellationToken,
    stages::record,
    telemetry,
};

/// Event types of the sample load, after the seeds' Ghost events.
pub(crate) const EVENT_TYPES: [&str; 5] =
    ["member.created", "post.published", "email.opened", "member.updated", "email.clicked"];

/// A Ghost-shaped sample event.
pub fn sample_event(run: &str, n: usize, tenants: usize) -> Event {
    let tenant = format!("site-{}", n % tenants);
    let kind = EVENT_TYPES[n % EVENT_TYPES.len()];
    let data = match kind {
        "member.created" | "member.updated" => {
            json!({"member": {"id": format!("m-{n}"), "email": format!("reader{n}@example.com"),
            "status": if n % 3 == 0 { "paid" } else { "free" }, "seq": n}})
        }
        "post.published" => json!({"post": {"id": format!("p-{n}"), "title": format!("Post {n}"), "seq": n}}),
        _ => json!({"email": {"id": format!("em-{n}"), "member_id": format!("m-{}", n / 2), "seq": n}}),
    };
    Event {
        specversion: "1.0".into(),
        id: format!("{run}{n}"),
        source: format!("/ghost/{tenant}"),
        kind: kind.into(),
        time: Some(chrono::Utc::now().to_rfc3339()),
        tenant,
        subject: None,
        datacontenttype: Some("application/json".into()),
        data,
    }
}

pub async fn run(mut config: Config, events: usize, tenants: usize) -> anyhow::Result<()> {
    let run = format!(
        "demo-{}-{}.",
        chrono::Utc::now().format("%Y%m%d-%H%M%S"),
        &uuid::Uuid::new_v4().simple().to_string()[..4]
    );
    config.topic_prefix = run.clone();
    let receiver = Receiver::start().await.context("starting the local HTTP receiver")?;
    config.services.clear();
    config.services.insert(
        "webhook".into(),
        ServiceConfig { url: receiver.url("hook"), timeout: Duration::from_secs(5), ..Default::default() },
    );
    // The receiver runs on this machine, which the network policy refuses by default.
    config.network.allow.push(ipnet::IpNet::from(std::net::IpAddr::from([127, 0, 0, 1])));
    config.validate()?;
    let config = Arc::new(config);
    println!(
        "weir demo — run {run}\n  broker {}  database {}\n  webhook receiver {}",
        config.brokers,
        config.database_url,
        receiver.url("hook")
    );

    // Stops the metrics server however the demo ends.
    let stop_metrics = CancellationToken::new().drop_guard();
    let metrics_addr = config.metrics_addr.unwrap_or(([127, 0, 0, 1], 0).into());
    let (metrics_addr, _) = match telemetry::serve_metrics(metrics_addr, stop_metrics.token().clone()).await {
        Ok(bound) => bound,
        Err(_) => telemetry::serve_metrics(([127, 0, 0, 1], 0).into(), stop_metrics.token().clone()).await?,
    };
    println!("  metrics http://{metrics_addr}/metrics\n\n1. topics (topics/*.yaml, prefix {run})");
    let plan = topics::apply_dir(&config, false).await?;
    topics::print_plan(&plan, false);

    println!("\n2. workflows from {} → definitions topic", config.workflows.display());
    workflows::apply_dir(&config, &config.workflows, false).await?.print(false);
    println!("\n3. pipeline: evaluate → execute(webhook) → sink(PostgreSQL)");
    let pipeline = Pipeline::start(config.clone(), &Pipeline::ALL).await?;

    // The ingest stage, with a token per tenant: a quarter of the events arrive over HTTP.
    let mut with_ingest = (*config).clone();
    with_ingest.ingest.listen = ([127, 0, 0, 1], 0).into();
    let tokens: Vec<String> = (0..tenants).map(|_| uuid::Uuid::new_v4().simple().to_string()).collect();
    let credentials: serde_json::Map<String, serde_json::Value> =
        tokens.iter().enumerate().map(|(t, token)| (format!("site-{t}"), json!({"token": token}))).collect();
    with_ingest.ingest.sources =
        serde_json::from_value(json!({"demo": {"format": "cloudevents", "tenants": credentials}}))?;
    with_ingest.validate()?;
    let stop_ingest = CancellationToken::new();
    let _stop_ingest = stop_ingest.clone().drop_guard();
    let (ingest_addr, _) = crate::stages::ingest::start(Arc::new(with_ingest), stop_ingest).await?;
    println!("   ingest stage on http://{ingest_addr}/ingest/demo");

    let sample: Vec<Event> = (0..events).map(|n| sample_event(&run, n, tenants)).collect();
    let expected = sample.iter().filter(|e| e.kind == "member.created").count();
    let numbered: Vec<(usize, Event)> = sample.into_iter().enumerate().collect();
    let (posted, produced): (Vec<_>, Vec<_>) = numbered.into_iter().partition(|(n, _)| n % 4 == 1);
    let producer = Producer::new(&config)?;
    let formats = [Format::Json, Format::Avro].into_iter().cycle();
    producer.send_all(produced.into_iter().map(|(_, e)| e).zip(formats), 1_000).await?;
    let poster = Poster::new(ingest_addr);
    let mut answers = futures::stream::iter(posted.iter().map(|(n, event)| {
        let mode = if n % 8 == 1 { Mode::Structured } else { Mode::Binary };
        let token = &tokens[n % tenants];
        poster.cloudevent("demo", token, event, mode)
    }))
    .buffer_unordered(16);
    while let Some(answer) = answers.next().await {
        let answer = answer.context("posting to the ingest stage")?;
        if answer.status() != reqwest::StatusCode::ACCEPTED {
            anyhow::bail!("the ingest stage answered {}: {}", answer.status(), answer.text().await.unwrap_or_default());
        }
    }
    for (i, bad) in [&b"{not json"[..], b"{\"id\":\"x\"}", b"\xc3\x01\x00garbage"].into_iter().enumerate() {
        let ct = if i == 2 { "application/avro" } else { "application/json" };
        producer.send_raw(b"site-0", bad, ct).await?;
    }
    println!(
        "\n4. {events} events for {tenants} tenants: {} produced to Kafka (half JSON, half Avro), {} posted over HTTP \
         (CloudEvents structured and binary), and 3 malformed records",
        events - posted.len(),
        posted.len()
    );
    println!("   the welcome-webhook workflow matches {expected} of them (member.created)");

    let pool = record::pool(&config)?;
    let like = format!("{run}%");
    let bar = indicatif::ProgressBar::new(expected as u64 * 2).with_message("webhook calls + result rows");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let rows = loop {
        let rows: i64 = sqlx::query_scalar("select count(*) from action_results where event_id like $1")
            .bind(&like)
            .fetch_one(&pool)
            .await
            .unwrap_or(0);
        bar.set_position((receiver.succeeded() + rows as usize) as u64);
        if (receiver.succeeded() >= expected && rows as usize >= expected) || tokio::time::Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    bar.finish();

    println!(
        "\n5. outcome\n   webhook calls received: {} (expected {expected})\n   rows in action_results: {rows}",
        receiver.succeeded()
    );
    let per_tenant: Vec<(String, i64, f64)> = sqlx::query_as(
        "select tenant, count(*), avg(latency_ms) from action_results where event_id like $1 group by tenant order by tenant limit 5",
    )
    .bind(&like)
    .fetch_all(&pool)
    .await?;
    println!("   tenant      rows  avg call ms");
    for (tenant, n, ms) in per_tenant {
        println!("   {tenant:<10} {n:>5}  {ms:>10.2}");
    }
    println!("\n6. metrics (weir_* from /metrics)");
    let text = telemetry::prometheus().render();
    for line in text.lines().filter(|l| l.starts_with("weir_") && !l.contains("_bucket") && !l.contains("consumer_lag"))
    {
        println!("   {line}");
    }
    pipeline.stop().await?;
    drop(stop_metrics);
    if receiver.succeeded() < expected || (rows as usize) < expected {
        anyhow::bail!("demo incomplete: expected {expected} calls and rows within 120 s");
    }
    println!(
        "\ndone: every matching event reached the webhook once and PostgreSQL once; malformed records are in {}dlq.",
        run
    );
    Ok(())
}
