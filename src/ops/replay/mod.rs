//! `weir replay`: re-driving, from the retained topics, what an outage or a bug left undone.
//!
//! ```text
//!  events (from..to) ──► decide (definitions now + action_results) ──► paced ──► actions.<service> ──► executors …
//!        ▲ own consumer                                                               (the live ones)
//!        └── positions + tally checkpointed in PostgreSQL (`replays`) after the broker's acks
//! ```
//!
//! - **Selection**: the events topic between `--from` and `--to` (Kafka's `offsets_for_times`,
//!   resolved once, when the replay is created: the replay reads exactly those offsets however
//!   the topic grows), narrowed by tenant, event type, workflow and service.
//! - **Decision** ([`decide`]): per event, the tasks with no `succeeded` result (default), or
//!   every task again as new runs (`--rerun`).
//! - **Sending**: to the live action topics, where the live executors call the tasks under the
//!   services' own limits, with retries, dead letters and results as for any task, and where a
//!   multi-step run continues through the record stage. What the replay adds is paced at
//!   `replay.share` of each service's limit ([`pace`]), so live traffic keeps its latency.
//! - **Own consumer**: the replay reads with a consumer of its own group
//!   (`<prefix>weir-replay-<id>`), assigned, never joined: it neither moves nor waits for the
//!   stages' offsets.
//! - **Dry run**: the same reading and deciding, nothing sent or stored: its tally (events, runs
//!   and calls per tenant, workflow and service) is the real replay's, as long as the results
//!   and definitions it reads do not change in between.
//! - **Resumable** ([`state`]): after each chunk's tasks are acknowledged, the positions and the
//!   tally are written in one statement. A replay interrupted (Ctrl-C, `kill -9`, a lost broker)
//!   is resumed with `--resume ID`: it first reads the action topics from just before its last
//!   checkpoint for the tasks it sent after it (each carries the `weir.replay.id` header), so it
//!   sends none of them twice, then continues from the positions.
//!
//! A replay should cover a window whose live work is finished (nothing of it still in the delay
//! topics): a task still being retried has no result yet and would be sent again. A window that
//! ends more recently than the services' longest retry tier ago is warned about.

pub mod decide;
pub mod pace;
pub mod read;
pub mod results;
pub mod state;

use std::{
    collections::{BTreeMap, HashSet},
    fmt::Write as _,
};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use futures::{stream::FuturesUnordered, FutureExt as _, StreamExt as _};
use rdkafka::{message::OwnedMessage, Message as _};
use serde::{Deserialize, Serialize};

use crate::{
    config::{Config, Priority},
    engine::definitions::DefinitionStore,
    envelope::{self, ActionTask, Format},
    kafka::{self, compacted::Table, limits},
    stages::record,
    telemetry::Event,
};

/// Header on every task a replay sends: the replay's id.
pub const REPLAY_HEADER: &str = "weir.replay.id";

/// Events read and decided at a time; a checkpoint follows each chunk.
const CHUNK: usize = 500;

/// What a replay covers, as given on the command line (times resolved).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Selection {
    pub from: DateTime<Utc>,
    /// Up to the end of the topic (at creation) when absent.
    pub to: Option<DateTime<Utc>>,
    /// Only these tenants' events (any when empty); likewise below.
    pub tenants: Vec<String>,
    /// Only events of these types.
    pub types: Vec<String>,
    /// Only runs of these workflows.
    pub workflows: Vec<String>,
    /// Only tasks of these services.
    pub services: Vec<String>,
    /// Run everything selected again as new runs, instead of only what has no success.
    pub rerun: bool,
    /// Send the tasks without their `expires_after` deadline, so that a replay of old events
    /// calls even the steps of workflows that expire (`--ignore-expiry`). Only the tasks the
    /// replay sends: later steps of a multi-step run, planned by the record stage, keep theirs.
    #[serde(default)]
    pub ignore_expiry: bool,
}

impl Selection {
    fn selects(&self, event: &envelope::Event) -> bool {
        (self.tenants.is_empty() || self.tenants.contains(&event.tenant))
            && (self.types.is_empty() || self.types.contains(&event.kind))
    }

    /// One line: what `weir replay list` shows.
    fn describe(&self) -> String {
        let mut text = format!("{}..{}", self.from.to_rfc3339(), self.to.map(|t| t.to_rfc3339()).unwrap_or_default());
        for (name, values) in [
            ("tenant", &self.tenants),
            ("type", &self.types),
            ("workflow", &self.workflows),
            ("service", &self.services),
        ] {
            if !values.is_empty() {
                let _ = write!(text, " {name}={}", values.join(","));
            }
        }
        if self.rerun {
            text.push_str(" rerun");
        }
        if self.ignore_expiry {
            text.push_str(" ignore-expiry");
        }
        text
    }
}

/// Events, runs and calls of one (tenant, workflow, service).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Count {
    pub events: u64,
    pub runs: u64,
    pub calls: u64,
}

/// What a replay read, decided and sent (or, dry, would send).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    /// Records read from the events topic.
    pub read: u64,
    /// Of those, events that decode and match `--tenant` and `--type`.
    pub selected: u64,
    /// Records that are not valid events (they are in the dead-letter topic already).
    pub undecodable: u64,
    /// Runs whose trigger, condition or input fails on their event: recorded as failed when the
    /// event first came, and failing the same way now.
    pub cannot_start: u64,
    /// Events left alone because their runs are of versions no longer known.
    pub unknown_version: u64,
    /// Tasks the broker refused for what they are (too large): not sent.
    pub refused: u64,
    /// (tenant, workflow, service) → what is (to be) sent.
    #[serde(with = "tally_rows")]
    pub rows: BTreeMap<(String, String, String), Count>,
}

impl Tally {
    pub fn total(&self) -> Count {
        self.rows.values().fold(Count::default(), |a, c| Count {
            events: a.events + c.events,
            runs: a.runs + c.runs,
            calls: a.calls + c.calls,
        })
    }
}

/// The tally's rows as a JSON list (JSON object keys are strings only).
mod tally_rows {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serializer};

    use super::Count;

    type Rows = BTreeMap<(String, String, String), Count>;

    pub fn serialize<S: Serializer>(rows: &Rows, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(rows.iter().map(|((t, w, sv), c)| (t, w, sv, c)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Rows, D::Error> {
        let list = Vec::<(String, String, String, Count)>::deserialize(d)?;
        Ok(list.into_iter().map(|(t, w, s, c)| ((t, w, s), c)).collect())
    }
}

/// What `weir replay` reports at the end.
#[derive(Debug, Clone)]
pub struct Report {
    /// `None` for a dry run (nothing is stored).
    pub id: Option<String>,
    pub tally: Tally,
}

impl Report {
    /// The tally as a table, per tenant, workflow and service, with totals.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let t = &self.tally;
        let verb = if self.id.is_some() { "sent" } else { "would send (dry run)" };
        let _ = writeln!(
            out,
            "{:<24} {:<24} {:<16} {:>8} {:>8} {:>8}",
            "tenant", "workflow", "service", "events", "runs", "calls"
        );
        for ((tenant, workflow, service), c) in &t.rows {
            let _ =
                writeln!(out, "{tenant:<24} {workflow:<24} {service:<16} {:>8} {:>8} {:>8}", c.events, c.runs, c.calls);
        }
        let total = t.total();
        let _ = writeln!(out, "{:<66} {:>8} {:>8} {:>8}", "total", total.events, total.runs, total.calls);
        let _ = writeln!(out, "{} events read, {} selected; {verb} {} tasks", t.read, t.selected, total.calls);
        for (n, what) in [
            (t.undecodable, "records were not valid events (see `weir dlq list`)"),
            (t.cannot_start, "runs cannot start: their trigger, condition or input fails on the event"),
            (t.unknown_version, "events have runs only of workflow versions no longer known: left alone"),
            (t.refused, "tasks were refused by the broker as too large: not sent"),
        ] {
            if n > 0 {
                let _ = writeln!(out, "{n} {what}");
            }
        }
        if let Some(id) = &self.id {
            let _ = writeln!(out, "replay {id} finished");
        }
        out
    }
}

/// Options of a run of `weir replay`.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Decide and count only: nothing is sent or stored.
    pub dry_run: bool,
    /// Draw a progress bar on stderr (when it is a terminal).
    pub progress: bool,
}

/// Starts a replay of `selection`; returns its report once it has sent everything.
pub async fn start(config: &Config, selection: Selection, options: Options) -> anyhow::Result<Report> {
    for service in &selection.services {
        anyhow::ensure!(config.services.contains_key(service), "--service {service}: no such service in the config");
    }
    warn_if_recent(config, &selection);
    let pool = record::pool(config)?;
    record::migrate(&pool).await?;
    let definitions = load_definitions(config).await?;
    let (c, from, to) = (config.clone(), selection.from, selection.to);
    let bounds = tokio::task::spawn_blocking(move || read::bounds(&c, &c.names().events(), from, to)).await??;
    if options.dry_run {
        let positions = bounds.iter().map(|(p, (s, _))| (*p, *s)).collect();
        let job = Job { config, pool: &pool, definitions: &definitions, id: None, selection: &selection };
        let tally = job.drive(&bounds, positions, Tally::default(), &HashSet::new(), options.progress).await?;
        return Ok(Report { id: None, tally });
    }
    let id = new_id();
    state::create(&pool, &id, &selection, &bounds).await?;
    let lock = state::Lock::take(&config.database_url, &id)
        .await?
        .with_context(|| format!("replay {id} was just created, yet its lock is taken"))?;
    eprintln!("replay {id}: {} events to read; `weir replay --resume {id}` continues it if interrupted", {
        bounds.values().map(|(s, e)| e - s).sum::<i64>()
    });
    let stored = state::load(&pool, &id).await?;
    run_stored(config, &pool, &definitions, stored, HashSet::new(), options.progress, lock).await
}

/// Continues replay `id` where it was interrupted.
pub async fn resume(config: &Config, id: &str, progress: bool) -> anyhow::Result<Report> {
    let pool = record::pool(config)?;
    record::migrate(&pool).await?;
    let stored = state::load(&pool, id).await?;
    anyhow::ensure!(stored.state != state::State::Finished, "replay {id} has finished; there is nothing to resume");
    let lock = state::Lock::take(&config.database_url, id).await?.with_context(|| {
        format!("replay {id} is running in another process (it holds the replay's lock); wait for it, or stop it first")
    })?;
    let definitions = load_definitions(config).await?;
    let sent = sent_since_checkpoint(config, &stored).await?;
    eprintln!("replay {id}: resuming; {} tasks found already sent after its last checkpoint", sent.len());
    run_stored(config, &pool, &definitions, stored, sent, progress, lock).await
}

async fn run_stored(
    config: &Config,
    pool: &sqlx::PgPool,
    definitions: &DefinitionStore,
    stored: state::Stored,
    sent: HashSet<String>,
    progress: bool,
    lock: state::Lock,
) -> anyhow::Result<Report> {
    let job = Job { config, pool, definitions, id: Some(&stored.id), selection: &stored.selection };
    let outcome = job.drive(&stored.bounds, stored.positions.clone(), stored.tally.clone(), &sent, progress).await;
    let result = match outcome {
        Ok(tally) => {
            state::end(pool, &stored.id, state::State::Finished, None).await?;
            Ok(Report { id: Some(stored.id.clone()), tally })
        }
        Err(e) => {
            // Left `running` (resumable), with the reason for `weir replay list`.
            let reason = format!("{e:#}");
            let _ = sqlx::query("update replays set error = $2, updated_at = now() where id = $1")
                .bind(&stored.id)
                .bind(&reason)
                .execute(pool)
                .await;
            Err(e.context(format!("replay {} stopped; `weir replay --resume {}` continues it", stored.id, stored.id)))
        }
    };
    lock.release().await;
    result
}

/// A replay at work.
struct Job<'a> {
    config: &'a Config,
    pool: &'a sqlx::PgPool,
    definitions: &'a DefinitionStore,
    /// `None`: a dry run.
    id: Option<&'a str>,
    selection: &'a Selection,
}

impl Job<'_> {
    /// Reads from `positions` to the ends of `bounds`, deciding and (unless dry) sending and
    /// checkpointing chunk by chunk; returns the tally.
    async fn drive(
        &self,
        bounds: &read::Bounds,
        positions: BTreeMap<i32, i64>,
        mut tally: Tally,
        sent_before: &HashSet<String>,
        progress: bool,
    ) -> anyhow::Result<Tally> {
        let config = self.config;
        let group = config.names().group(&format!("replay-{}", self.id.unwrap_or("dry-run")));
        let mut reader = read::Reader::open(config, &group, &config.names().events(), bounds, &positions)?;
        let pacer = pace::Pacer::new(config)?;
        let producer = kafka::producer(config)?;
        let mode = match (self.selection.rerun, self.id) {
            (false, _) => decide::Mode::Missing,
            (true, Some(id)) => decide::Mode::Rerun(id),
            // A dry rerun has no id yet; any id gives the same counts.
            (true, None) => decide::Mode::Rerun("dry-run"),
        };
        let bar = progress_bar(progress, bounds, &positions, &tally);
        loop {
            let chunk = reader.next_chunk(CHUNK).await?;
            if chunk.is_empty() && reader.finished() {
                break;
            }
            let before = (tally.read, tally.total().calls);
            let events = self.events(&chunk, &mut tally);
            let recorded = match mode {
                decide::Mode::Missing => decide::recorded(self.pool, events.iter().map(|(e, _)| e))
                    .await
                    .map_err(|e| anyhow::anyhow!("reading what the events' runs did (retryable): {e}"))?,
                decide::Mode::Rerun(_) => decide::Recorded::new(),
            };
            let now = Utc::now().to_rfc3339();
            let mut sends = FuturesUnordered::new();
            for (event, record_time) in &events {
                let rows = recorded.get(&(event.tenant.clone(), event.id.clone())).map(Vec::as_slice).unwrap_or(&[]);
                let tasks =
                    decide::decide(self.definitions, self.selection, mode, event, rows, sent_before, &now, &mut tally);
                for mut task in tasks {
                    task.run_at = Some(run_at(mode, &task, rows, *record_time));
                    if self.selection.ignore_expiry {
                        task.expires_at = None;
                    }
                    let payload = match limits::task_payload(&task, config.limits.max_record_bytes) {
                        Ok(payload) => payload,
                        Err(reason) => {
                            self.refused(&task, &reason, &mut tally);
                            continue;
                        }
                    };
                    let Some(id) = self.id else { continue };
                    if sent_before.contains(&task.task_id) {
                        continue;
                    }
                    pacer.wait(&task).await;
                    sends.push(send(&producer, config, id, task, payload));
                    // Polled at once, so the record is on its way now rather than when the
                    // chunk's acknowledgements are awaited.
                    while let Some(Some(sent)) = sends.next().now_or_never() {
                        self.sent(sent, &mut tally)?;
                    }
                }
            }
            while let Some(sent) = sends.next().await {
                self.sent(sent, &mut tally)?;
            }
            if let Some(id) = self.id {
                state::checkpoint(self.pool, id, reader.positions(), &tally).await?;
            }
            let (read, calls) = (tally.read - before.0, tally.total().calls - before.1);
            Event::Replayed { replay: self.id.unwrap_or("dry-run"), events: read, tasks: calls }.emit();
            bar.inc(read);
            bar.set_message(format!(
                "{} tasks {}",
                tally.total().calls,
                if self.id.is_some() { "sent" } else { "to send" }
            ));
        }
        bar.finish_and_clear();
        Ok(tally)
    }

    /// The chunk's events that decode and are selected.
    /// The chunk's selected events, each with its record's time (a new run's `run_at`).
    fn events(&self, chunk: &[OwnedMessage], tally: &mut Tally) -> Vec<(envelope::Event, DateTime<Utc>)> {
        let max = self.config.evaluator.max_event_bytes;
        let mut events = Vec::with_capacity(chunk.len());
        for m in chunk {
            tally.read += 1;
            let content_type = kafka::header(m.headers(), envelope::CONTENT_TYPE);
            match envelope::decode_event(m.payload().unwrap_or_default(), content_type, max) {
                Ok(event) if self.selection.selects(&event) => {
                    tally.selected += 1;
                    events.push((event, kafka::record_time(m)));
                }
                Ok(_) => {}
                Err(_) => tally.undecodable += 1,
            }
        }
        events
    }

    fn refused(&self, task: &ActionTask, reason: &str, tally: &mut Tally) {
        tally.refused += 1;
        Event::ReplayRefused { replay: self.id.unwrap_or("dry-run"), task: &task.task_id, reason }.emit();
    }

    /// Takes a send's outcome: a record refused for what it is is counted, anything else stops.
    fn sent(
        &self,
        sent: Result<(), (ActionTask, rdkafka::error::KafkaError)>,
        tally: &mut Tally,
    ) -> anyhow::Result<()> {
        match sent {
            Ok(()) => Ok(()),
            Err((task, e)) if limits::is_record_error(&e) => {
                // Counted as a call by the decision; it was not made.
                if let Some(c) =
                    tally.rows.get_mut(&(task.tenant.clone(), task.workflow_id.clone(), task.service.clone()))
                {
                    c.calls = c.calls.saturating_sub(1);
                }
                self.refused(&task, &e.to_string(), tally);
                Ok(())
            }
            Err((task, e)) => Err(anyhow::anyhow!(
                "sending task {} to {} failed (retryable: resume the replay): {e}",
                task.task_id,
                self.config.names().actions_at(&task.service, task.priority())
            )),
        }
    }
}

/// Produces one task to its service's action topic, with the replay's header.
fn send(
    producer: &rdkafka::producer::FutureProducer,
    config: &Config,
    id: &str,
    task: ActionTask,
    payload: Vec<u8>,
) -> futures::future::BoxFuture<'static, Result<(), (ActionTask, rdkafka::error::KafkaError)>> {
    let (producer, topic) = (producer.clone(), config.names().actions_at(&task.service, task.priority()));
    let headers = kafka::content_headers(Format::Json)
        .insert(rdkafka::message::Header { key: REPLAY_HEADER, value: Some(id.as_bytes()) });
    async move {
        match kafka::send(&producer, &topic, Some(task.tenant.as_bytes()), &payload, headers).await {
            Ok(_) => Ok(()),
            Err(e) => Err((task, e)),
        }
    }
    .boxed()
}

/// The task ids replay `stored` sent after its last checkpoint: on the action topics of its
/// services, from a margin before the checkpoint to their current end, with its header.
async fn sent_since_checkpoint(config: &Config, stored: &state::Stored) -> anyhow::Result<HashSet<String>> {
    // Records carry their producer's clock; the margin covers its skew from PostgreSQL's.
    let since = stored.checkpoint_at - chrono::Duration::seconds(60);
    let services: Vec<String> = if stored.selection.services.is_empty() {
        config.services.keys().cloned().collect()
    } else {
        stored.selection.services.clone()
    };
    let mut sent = HashSet::new();
    let group = config.names().group(&format!("replay-{}", stored.id));
    // Each task went to its priority's action topic.
    let topics = services.iter().flat_map(|s| Priority::ALL.map(|p| config.names().actions_at(s, p)));
    for topic in topics {
        let (c, t) = (config.clone(), topic.clone());
        let bounds = tokio::task::spawn_blocking(move || read::bounds(&c, &t, since, None)).await??;
        let mut reader = read::Reader::open(config, &group, &topic, &bounds, &BTreeMap::new())?;
        loop {
            let chunk = reader.next_chunk(CHUNK).await?;
            if chunk.is_empty() && reader.finished() {
                break;
            }
            for m in chunk.iter().filter(|m| kafka::header_str(m, REPLAY_HEADER) == Some(stored.id.as_str())) {
                if let Ok(task) = serde_json::from_slice::<ActionTask>(m.payload().unwrap_or_default()) {
                    sent.insert(task.task_id);
                }
            }
        }
    }
    Ok(sent)
}

/// Every definition on the definitions topic (all versions it holds).
async fn load_definitions(config: &Config) -> anyhow::Result<DefinitionStore> {
    let config = config.clone();
    tokio::task::spawn_blocking(move || {
        let store = DefinitionStore::new(config.services.keys().cloned().collect(), config.engine.clone());
        let table = Table::open(&config, &config.names().definitions(), &config.names().group("replay-definitions"))?;
        table.read_to_end(|r| store.apply_record(r.key, r.value, r.offset))?;
        anyhow::Ok(store)
    })
    .await?
    .context("loading workflow definitions")
}

/// A new replay id: the time and a random suffix (`20261127-103000-4f2a`), readable in `list`.
fn new_id() -> String {
    format!("{}-{:04x}", Utc::now().format("%Y%m%d-%H%M%S"), fastrand::u16(..))
}

/// The `run_at` a replayed task carries: its run's, when the run has rows (so that its result
/// conflicts with a row written already, in the same partition); a new run's is its event
/// record's time, as the evaluator gives it — except a rerun's, which is a new run started now.
fn run_at(
    mode: decide::Mode,
    task: &ActionTask,
    rows: &[decide::StepRow],
    record_time: DateTime<Utc>,
) -> DateTime<Utc> {
    match mode {
        decide::Mode::Rerun(_) => Utc::now(),
        decide::Mode::Missing => rows.iter().find(|r| r.run_id == task.run_id).map_or(record_time, |r| r.run_at),
    }
}

/// Warns when the window ends so recently that some of its tasks may still be retried by the
/// live executors (their results not yet recorded): those would be sent again.
fn warn_if_recent(config: &Config, selection: &Selection) {
    let longest =
        config.services.values().filter_map(|s| s.retry.tiers.iter().max()).max().copied().unwrap_or_default();
    let settled = Utc::now() - chrono::Duration::from_std(longest).unwrap_or_default();
    if selection.to.is_none_or(|to| to > settled) {
        eprintln!(
            "warning: the window ends less than the longest retry tier ({}s) ago; tasks still being retried \
             there have no result yet and would be sent again",
            longest.as_secs()
        );
    }
}

fn progress_bar(
    progress: bool,
    bounds: &read::Bounds,
    positions: &BTreeMap<i32, i64>,
    tally: &Tally,
) -> indicatif::ProgressBar {
    if !progress {
        return indicatif::ProgressBar::hidden();
    }
    let total: i64 = bounds.values().map(|(s, e)| e - s).sum();
    let done: i64 = bounds.iter().map(|(p, (s, _))| positions.get(p).copied().unwrap_or(*s) - s).sum();
    let bar = indicatif::ProgressBar::new(total.max(0) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} events, {msg}, ETA {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position(done.max(0) as u64);
    bar.set_message(format!("{} tasks", tally.total().calls));
    bar
}

/// `weir replay list`: every replay, newest first, with its state.
pub async fn list(config: &Config) -> anyhow::Result<Vec<Listed>> {
    let pool = record::pool(config)?;
    record::migrate(&pool).await?;
    let mut listed = Vec::new();
    for stored in state::all(&pool).await? {
        let state = match stored.state {
            state::State::Finished => "finished",
            state::State::Failed => "failed",
            state::State::Running => match state::Lock::take(&config.database_url, &stored.id).await? {
                Some(lock) => {
                    lock.release().await;
                    "interrupted"
                }
                None => "running",
            },
        };
        listed.push(Listed { state, stored });
    }
    Ok(listed)
}

/// A replay as `list` shows it.
pub struct Listed {
    /// `running`, `interrupted` (no process holds it: resume it), `finished` or `failed`.
    pub state: &'static str,
    pub stored: state::Stored,
}

pub fn print_list(listed: &[Listed]) {
    println!("{:<22} {:<20} {:<12} {:>17} {:>8}  selection", "id", "created", "state", "events read", "tasks");
    for Listed { state, stored } in listed {
        let (total, read) = stored.progress();
        println!(
            "{:<22} {:<20} {:<12} {:>17} {:>8}  {}",
            stored.id,
            stored.created_at.format("%Y-%m-%d %H:%M:%S"),
            state,
            format!("{read}/{total}"),
            stored.tally.total().calls,
            stored.selection.describe()
        );
        if let Some(error) = stored.error.as_deref().filter(|_| *state != "finished") {
            println!("{:<22} last error: {error}", "");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tally_round_trips_through_json_and_renders_its_rows_and_totals() {
        let mut tally = Tally { read: 10, selected: 8, undecodable: 2, ..Tally::default() };
        tally.rows.insert(("t1".into(), "w".into(), "webhook".into()), Count { events: 3, runs: 3, calls: 4 });
        tally.rows.insert(("t2".into(), "w".into(), "webhook".into()), Count { events: 1, runs: 1, calls: 1 });
        let json = serde_json::to_value(&tally).unwrap();
        assert_eq!(serde_json::from_value::<Tally>(json).unwrap(), tally);
        let text = Report { id: None, tally }.render();
        assert!(text.contains("t1") && text.contains("would send (dry run) 5 tasks"), "{text}");
        assert!(text.contains("2 records were not valid events"), "{text}");
    }
}
