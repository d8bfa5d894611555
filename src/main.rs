//! The `weir` command line. Each subcommand is a thin shell over the library.

use std::{io::BufReader, path::PathBuf, process::ExitCode, sync::Arc};

/// mimalloc, not glibc's malloc: profiles of the executor at ~3,000 calls/s spent a quarter of
/// its CPU in glibc's allocator (per-call buffers freed on other threads than they were
/// allocated on, consolidated over and over), and glibc's per-thread arenas inflate RSS. The
/// library leaves the choice to whoever embeds it; the binary makes it (docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use weir::{
    config::Config,
    envelope::Format,
    kafka::topics,
    ops::produce::{self, Producer},
    ops::workflows,
    pipeline::{Pipeline, StageName},
    shutdown, telemetry,
};

#[derive(Parser)]
#[command(name = "weir", version, about = "Workflow automation for multi-tenant platforms on Kafka")]
struct Cli {
    /// Config file. When it is the default and does not exist, built-in defaults are used.
    #[arg(long, short, global = true, default_value = "weir.yaml", env = "WEIR_CONFIG")]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run pipeline stages until interrupted (Ctrl-C or SIGTERM finishes in-flight work, then exits).
    Run {
        /// Stages to run in this process (repeatable); default evaluate, execute and sink. The
        /// HTTP ingest stage runs only when named (`--stage ingest`, see docs/ingest.md).
        #[arg(long = "stage", value_enum)]
        stages: Vec<StageName>,
        /// Run the executors of only this service (repeatable; needs the execute stage); default
        /// every service in the config.
        #[arg(long = "service", value_name = "NAME")]
        services: Vec<String>,
    },
    /// Topics as code (topics/*.yaml).
    Topics {
        #[command(subcommand)]
        action: TopicsAction,
    },
    /// Workflow definitions on the compacted definitions topic.
    Workflows {
        #[command(subcommand)]
        action: WorkflowsAction,
    },
    /// Produce events (newline-delimited JSON CloudEvents) keyed by tenant.
    Produce {
        /// Logical topic name (the config's topic_prefix is prepended).
        #[arg(long, default_value = "events")]
        topic: String,
        /// Read events from this file instead of stdin.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Encoding on the wire.
        #[arg(long, value_enum, default_value = "json")]
        format: Format,
    },
    /// Inspect workflow runs (`list`, `show RUN_ID`) and cancel one (`cancel RUN_ID`).
    Runs {
        #[command(subcommand)]
        action: RunsAction,
    },
    /// Inspect the dead-letter topic and send records back to where they failed.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Re-drive from the retained topics what an outage or a bug left undone (docs/recovery.md):
    /// by default only the tasks with no `succeeded` result, paced at `replay.share` of each
    /// service's limits. `weir replay list` shows replays; `weir replay results` rebuilds rows.
    #[command(subcommand_negates_reqs = true, args_conflicts_with_subcommands = true)]
    Replay {
        #[command(subcommand)]
        action: Option<ReplayAction>,
        #[command(flatten)]
        args: ReplayArgs,
    },
    /// Measure the stages beside a raw Kafka passthrough on the same broker (docs/BENCHMARKS.md).
    Bench {
        /// baseline, evaluate, pipeline, throttled, sink, backlog, noisy, noisy-burst, replay, scale,
        /// ingest, remote or all (all = every one but backlog, the noisy ones, replay, scale,
        /// ingest and remote, which run on their own: several phases of --duration, or a slow
        /// service).
        #[arg(long, default_value = "all")]
        scenario: weir::ops::bench::Selection,
        /// Measured time per scenario, after its warm-up (e.g. 60s, 500ms, 2m).
        #[arg(long, default_value = "60s", value_parser = weir::ops::bench::parse_duration)]
        duration: std::time::Duration,
        /// Events per second offered, or flat-out [default: flat-out; noisy: 4000, replay: 400 live,
        /// all tenants together].
        #[arg(long)]
        rate: Option<weir::ops::bench::RateArg>,
        /// Tenants in the load (Zipf-skewed volume), each with workflows of its own [default: 1000;
        /// noisy: 20 quiet tenants beside the noisy one; replay: 20 live tenants].
        #[arg(long)]
        tenants: Option<usize>,
        /// Where bench.json and bench.svg are written.
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
        /// backlog: events put on the topic before the stages start [default: 10,000,000]; replay:
        /// events put there and then replayed beside live traffic [default: 100,000].
        #[arg(long)]
        events: Option<u64>,
        /// backlog: size of each event's data body in bytes (the record is ~180 more).
        #[arg(long, default_value_t = 400)]
        body_bytes: usize,
        /// backlog: stages of the separate `weir run` process that drains it.
        #[arg(long, value_enum, default_value = "evaluate")]
        stages: weir::ops::bench::backlog::BacklogStages,
        /// Run the stages of evaluate, pipeline, throttled and sink in this process, beside the
        /// load generator, instead of in a `weir run` child process (as builds before 2026-12-07
        /// did; for an A/B against one).
        #[arg(long)]
        in_process: bool,
        /// The weir binary the `weir run` children run [default: this one]: the stages of another
        /// build under this bench's load and measurement, for an A/B of the stages alone.
        #[arg(long, value_name = "PATH")]
        stages_binary: Option<std::path::PathBuf>,
    },
    /// Where each stage stands: its consumer groups' members, partitions, lag and oldest
    /// unprocessed record, each service's breaker and throttle wait, the dead letters
    /// (docs/operations.md). Reads beside the groups, never joining them.
    Status {
        /// Print JSON (one document per refresh) for scripts; its schema is in docs/operations.md.
        #[arg(long)]
        json: bool,
        /// Refresh every SECS seconds until interrupted [default: 5].
        #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "5")]
        watch: Option<f64>,
        /// `/metrics` URL of a running weir process, for breaker state and throttle wait
        /// (repeatable) [default: from the config's metrics_addr].
        #[arg(long = "metrics", value_name = "URL")]
        metrics: Vec<String>,
    },
    /// Start everything in-process on sample events and show the outcome.
    Demo {
        /// Sample events to produce (Ghost-shaped, half JSON and half Avro); the member.created
        /// ones, a fifth, match the welcome workflow and are called and recorded.
        #[arg(long, default_value_t = 2_000)]
        events: usize,
        /// Tenants the sample events are spread over (round robin); at least 1.
        #[arg(long, default_value_t = 20)]
        tenants: usize,
    },
}

#[derive(Subcommand)]
enum WorkflowsAction {
    /// Validate every definition in DIR and make the definitions topic equal to it: publish new
    /// and changed ones, delete (tombstone) those no longer in DIR.
    Apply {
        /// Directory of workflow YAML files (default: the config's `workflows`).
        dir: Option<PathBuf>,
        /// Validate and show what would change without publishing.
        #[arg(long)]
        dry_run: bool,
    },
    /// List the published definitions.
    List {
        /// Only this tenant's workflows (and the platform-wide ones).
        #[arg(long)]
        tenant: Option<String>,
    },
}

#[derive(Subcommand)]
enum DlqAction {
    /// List dead letters (id, time, origin, key, attempts, whether redriven, reason).
    List {
        #[command(flatten)]
        filter: DlqFilter,
    },
    /// Show one dead letter's headers and payload (payloads over 4 KB are cut unless --full).
    Show {
        /// `partition:offset`, as `list` prints it.
        id: String,
        /// Print the whole payload, however large.
        #[arg(long)]
        full: bool,
    },
    /// Re-produce the matching dead letters to their origin topics (attempts reset); prints how
    /// many. Letters an earlier redrive sent are skipped (recorded in the `dlq-redrive` group).
    Redrive {
        #[command(flatten)]
        filter: DlqFilter,
        /// Send the matching letters an earlier redrive already sent, too.
        #[arg(long)]
        again: bool,
    },
}

#[derive(clap::Args)]
struct DlqFilter {
    /// Only dead letters of this service's action topic.
    #[arg(long)]
    service: Option<String>,
    /// Only this tenant's.
    #[arg(long)]
    tenant: Option<String>,
    /// Only those dead-lettered since this RFC 3339 time or this long ago (30m, 2h, 1d).
    #[arg(long)]
    since: Option<String>,
}

impl DlqFilter {
    fn parse(self) -> anyhow::Result<weir::ops::dlq::Filter> {
        let since = self.since.as_deref().map(weir::ops::dlq::parse_since).transpose()?;
        Ok(weir::ops::dlq::Filter { service: self.service, tenant: self.tenant, since })
    }
}

#[derive(clap::Args)]
struct ReplayArgs {
    /// Events produced at or after this RFC 3339 time, or this long ago (90s, 30m, 2h, 1d).
    #[arg(long, required_unless_present = "resume")]
    from: Option<String>,
    /// ... and before this one (default: up to the end of the events topic now).
    #[arg(long)]
    to: Option<String>,
    /// Only this tenant's events (repeatable).
    #[arg(long = "tenant")]
    tenants: Vec<String>,
    /// Only events of this type (repeatable).
    #[arg(long = "type")]
    types: Vec<String>,
    /// Only runs of this workflow (repeatable).
    #[arg(long = "workflow")]
    workflows: Vec<String>,
    /// Only tasks of this service (repeatable).
    #[arg(long = "service")]
    services: Vec<String>,
    /// Run the selection again as new runs with new ids (new calls to the services); needs --yes.
    #[arg(long)]
    rerun: bool,
    /// Confirms --rerun.
    #[arg(long)]
    yes: bool,
    /// Call the selected steps even past their workflow's `expires_after` (the tasks the replay
    /// sends carry no deadline).
    #[arg(long)]
    ignore_expiry: bool,
    /// Print, per tenant, workflow and service, the events, runs and calls a replay would make;
    /// send and store nothing.
    #[arg(long)]
    dry_run: bool,
    /// Continue an interrupted replay (its id, as `weir replay list` shows it).
    #[arg(long, conflicts_with_all = ["from", "to", "tenants", "types", "workflows", "services", "rerun", "dry_run", "ignore_expiry"])]
    resume: Option<String>,
}

#[derive(Subcommand)]
enum RunsAction {
    /// Runs, newest first: id, tenant, workflow, status, steps recorded, last step's finish.
    List {
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        workflow: Option<String>,
        /// running, succeeded, failed or cancelled.
        #[arg(long)]
        status: Option<String>,
        /// Runs with a step finished since this RFC 3339 time or this long ago (30m, 2h, 1d).
        #[arg(long)]
        since: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// One run's steps in the workflow's order: status, attempts, started, finished, latency,
    /// output size, error.
    Show { run_id: String },
    /// Cancel a run: its steps not yet started are recorded `cancelled` and never called.
    Cancel {
        run_id: String,
        #[arg(long, default_value = "cancelled by an operator")]
        reason: String,
    },
}

#[derive(Subcommand)]
enum ReplayAction {
    /// List replays: id, state (running, interrupted, finished), progress, selection.
    List,
    /// Rebuild `action_results` rows from the results topic (after a database restore); rows
    /// already there are left as they are, so it can run again.
    Results {
        /// Results produced at or after this RFC 3339 time, or this long ago (90s, 30m, 2h, 1d).
        #[arg(long)]
        from: String,
        /// ... and before this one (default: up to the end of the results topic now).
        #[arg(long)]
        to: Option<String>,
    },
}

#[derive(Subcommand)]
enum TopicsAction {
    /// Create missing topics, raise partition counts, correct config drift.
    Apply {
        /// Show what would change without changing anything.
        #[arg(long)]
        dry_run: bool,
    },
}

fn load_config(path: &std::path::Path) -> anyhow::Result<Config> {
    if !path.exists() && path == std::path::Path::new("weir.yaml") {
        let mut config = Config::default();
        config.apply_env();
        config.validate()?;
        weir::connectors::validate_all(&config)?;
        return Ok(config);
    }
    let config = Config::load(path)?;
    // Connector checks (templates, URLs against the network policy) belong to the connectors,
    // not to config; run them here so a bad service still fails at load.
    weir::connectors::validate_all(&config).with_context(|| format!("invalid config {}", path.display()))?;
    Ok(config)
}

async fn main_inner(cli: Cli) -> anyhow::Result<()> {
    let config = load_config(&cli.config)?;
    // Every command talks to the broker: check it first, so that an unreachable one gives the same
    // single message within the same bound whatever the command, instead of each client's own
    // retries and librdkafka's log lines.
    let check = config.clone();
    tokio::task::spawn_blocking(move || weir::kafka::check_reachable(&check)).await??;
    match cli.command {
        Command::Run { stages, services } => {
            let stages = if stages.is_empty() { Pipeline::ALL.to_vec() } else { stages };
            if !services.is_empty() && !stages.contains(&StageName::Execute) {
                anyhow::bail!("--service selects executors: run it with --stage execute");
            }
            let config = Arc::new(config);
            // Cancelled by Ctrl-C or SIGTERM, and on the way out (the metrics server stops last).
            let shutdown = shutdown::on_signal().drop_guard();
            if let Some(addr) = config.metrics_addr {
                let (bound, _) = telemetry::serve_metrics(addr, shutdown.token().clone()).await?;
                tracing::info!("metrics on http://{bound}/metrics");
            }
            // Starting waits for the broker and reads every definition: a signal meanwhile stops it.
            let mut pipeline = tokio::select! {
                started = Pipeline::start_services(config, &stages, &services) => started?,
                _ = shutdown.token().cancelled() => return Ok(()),
            };
            tracing::info!(?stages, "running; Ctrl-C or SIGTERM to stop");
            let outcome = tokio::select! {
                r = pipeline.wait() => r,
                _ = shutdown.token().cancelled() => Ok(()),
            };
            tracing::info!("stopping: finishing in-flight work");
            let stopped = pipeline.stop().await;
            outcome.and(stopped)
        }
        Command::Topics { action: TopicsAction::Apply { dry_run } } => {
            let plan = topics::apply_dir(&config, dry_run).await?;
            topics::print_plan(&plan, dry_run);
            Ok(())
        }
        Command::Workflows { action: WorkflowsAction::Apply { dir, dry_run } } => {
            let dir = dir.unwrap_or_else(|| config.workflows.clone());
            let plan = workflows::apply_dir(&config, &dir, dry_run).await?;
            plan.print(dry_run);
            Ok(())
        }
        Command::Workflows { action: WorkflowsAction::List { tenant } } => {
            let current = tokio::task::spawn_blocking(move || workflows::read_current(&config)).await??;
            println!("{:<40} {:>7}  {:<30} steps", "workflow", "version", "trigger");
            for (key, wf) in current {
                if tenant.as_deref().is_some_and(|t| wf.tenant.as_deref().is_some_and(|w| w != t)) {
                    continue;
                }
                let trigger = wf.trigger.types.as_slice().join(",");
                let steps: Vec<&str> = wf.steps.iter().map(|s| s.id.as_str()).collect();
                println!("{key:<40} {:>7}  {trigger:<30} {}", wf.version, steps.join(" "));
            }
            Ok(())
        }
        Command::Produce { topic, file, format } => {
            let events = match &file {
                Some(path) => produce::read_ndjson_lines(BufReader::new(
                    std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?,
                ))?,
                None => produce::read_ndjson_lines(std::io::stdin().lock())?,
            };
            let producer = Producer::for_topic(&config, &config.names().topic(&topic))?;
            let sent = producer.send_lines(&config, events, format).await?;
            println!("produced {sent} events to {}", producer.topic());
            Ok(())
        }
        Command::Runs { action: RunsAction::List { tenant, workflow, status, since, limit } } => {
            let since = since.map(|s| weir::ops::dlq::parse_since(&s)).transpose()?;
            let filter = weir::ops::runs::Filter { tenant, workflow, status, since, limit };
            print!("{}", weir::ops::runs::render_list(&weir::ops::runs::list(&config, &filter).await?));
            Ok(())
        }
        Command::Runs { action: RunsAction::Show { run_id } } => {
            print!("{}", weir::ops::runs::render_detail(&weir::ops::runs::show(&config, &run_id).await?));
            Ok(())
        }
        Command::Runs { action: RunsAction::Cancel { run_id, reason } } => {
            if weir::ops::runs::cancel(&config, &run_id, &reason).await? {
                println!("cancelled {run_id}: its steps not yet started will not start");
            } else {
                println!("{run_id} had already ended or been cancelled; nothing changed");
            }
            Ok(())
        }
        Command::Dlq { action: DlqAction::List { filter } } => {
            let filter = filter.parse()?;
            let letters = tokio::task::spawn_blocking(move || weir::ops::dlq::list(&config, &filter)).await??;
            weir::ops::dlq::print_list(&letters);
            Ok(())
        }
        Command::Dlq { action: DlqAction::Show { id, full } } => {
            let letter = tokio::task::spawn_blocking(move || weir::ops::dlq::show(&config, &id)).await??;
            weir::ops::dlq::print_one(&letter, full);
            Ok(())
        }
        Command::Dlq { action: DlqAction::Redrive { filter, again } } => {
            let done = weir::ops::dlq::redrive(&config, &filter.parse()?, again).await?;
            println!("redrove {} dead letters", done.sent);
            if done.skipped > 0 {
                println!("skipped {} already redriven (--again sends them too)", done.skipped);
            }
            if done.unrecorded > 0 {
                eprintln!(
                    "warning: {} redriven letters did not fit the record; a later redrive resends them",
                    done.unrecorded
                );
            }
            Ok(())
        }
        Command::Bench {
            scenario,
            duration,
            rate,
            tenants,
            out,
            events,
            body_bytes,
            stages,
            in_process,
            stages_binary,
        } => {
            use weir::ops::bench::{noisy, replay, RateArg, Scenario};
            let scenarios = scenario.scenarios();
            // The noisy and replay scenarios' defaults are the issues' measurements (20 quiet
            // tenants at 20/s beside 3,600/s; 100,000 events replayed beside 400/s), not a
            // flat-out Zipf load.
            let is_noisy = scenarios.iter().any(|s| matches!(s, Scenario::Noisy | Scenario::NoisyBurst));
            let is_replay = scenarios.contains(&Scenario::Replay);
            let default_rate = match (is_noisy, is_replay) {
                (true, _) => RateArg::PerSecond(noisy::DEFAULT_RATE),
                (_, true) => RateArg::PerSecond(replay::DEFAULT_RATE),
                _ => RateArg::FlatOut,
            };
            let events = events.unwrap_or(if is_replay { replay::DEFAULT_EVENTS } else { 10_000_000 });
            let backlog =
                weir::ops::bench::backlog::BacklogOptions { events, body_bytes, stages, binary: stages_binary };
            let options = weir::ops::bench::Options {
                scenarios,
                duration,
                rate: rate.unwrap_or(default_rate),
                tenants: tenants.unwrap_or(if is_noisy || is_replay { noisy::DEFAULT_QUIET_TENANTS } else { 1_000 }),
                out,
                progress: true,
                backlog,
                in_process,
            };
            let report = weir::ops::bench::run(&config, &options).await?;
            print!("{}", report.table());
            println!("wrote {0}/bench.json and {0}/bench.svg", options.out.display());
            Ok(())
        }
        Command::Replay { action: Some(ReplayAction::List), .. } => {
            weir::ops::replay::print_list(&weir::ops::replay::list(&config).await?);
            Ok(())
        }
        Command::Replay { action: Some(ReplayAction::Results { from, to }), .. } => {
            let (from, to) = (
                replay_time(&["replay", "results"], "--from", &from),
                replay_time_opt(&["replay", "results"], "--to", to.as_deref()),
            );
            let rebuilt = weir::ops::replay::results::rebuild(&config, from, to).await?;
            println!(
                "read {} results; {} rows added to action_results ({} were there already)",
                rebuilt.read,
                rebuilt.added,
                rebuilt.read - rebuilt.undecodable - rebuilt.refused - rebuilt.added
            );
            if rebuilt.undecodable + rebuilt.refused > 0 {
                println!(
                    "{} records were not results and {} rows were refused by PostgreSQL (both were dead-lettered when \
                     first recorded)",
                    rebuilt.undecodable, rebuilt.refused
                );
            }
            Ok(())
        }
        Command::Replay { action: None, args } => {
            let options = weir::ops::replay::Options { dry_run: args.dry_run, progress: true };
            let report = match args.resume {
                Some(id) => weir::ops::replay::resume(&config, &id, true).await?,
                None => {
                    let from = args.from.context("--from is required")?;
                    let selection = weir::ops::replay::Selection {
                        from: replay_time(&["replay"], "--from", &from),
                        to: replay_time_opt(&["replay"], "--to", args.to.as_deref()),
                        tenants: args.tenants,
                        types: args.types,
                        workflows: args.workflows,
                        services: args.services,
                        rerun: args.rerun,
                        ignore_expiry: args.ignore_expiry,
                    };
                    weir::ops::replay::start(&config, selection, options).await?
                }
            };
            print!("{}", report.render());
            Ok(())
        }
        Command::Status { json, watch, metrics } => {
            let watch = match watch {
                Some(secs) if !(secs.is_finite() && secs >= 0.1) => {
                    anyhow::bail!("--watch {secs}: give an interval of at least 0.1 seconds")
                }
                secs => secs.map(std::time::Duration::from_secs_f64),
            };
            weir::ops::status::run(&config, &weir::ops::status::Options { metrics }, json, watch).await
        }
        Command::Demo { events, tenants } => weir::ops::demo::run(config, events, tenants.max(1)).await,
    }
}

/// Prints `message` with the usage of the subcommand at `path` (`["replay", "results"]`), as
/// clap does for its own errors, and exits with clap's status (2).
fn usage_error(path: &[&str], kind: clap::error::ErrorKind, message: &str) -> ! {
    use clap::CommandFactory as _;
    let mut command = Cli::command();
    command.build();
    let mut sub = &mut command;
    for name in path {
        sub = sub.find_subcommand_mut(name).expect("a subcommand of weir");
    }
    sub.error(kind, message).exit()
}

/// A `--from`/`--to` value of `weir replay`, or the usage and exit.
fn replay_time(path: &[&str], flag: &str, text: &str) -> chrono::DateTime<chrono::Utc> {
    weir::ops::replay::read::parse_time(text).unwrap_or_else(|e| {
        usage_error(path, clap::error::ErrorKind::ValueValidation, &format!("invalid value for {flag}: {e}"))
    })
}

fn replay_time_opt(path: &[&str], flag: &str, text: Option<&str>) -> Option<chrono::DateTime<chrono::Utc>> {
    text.map(|t| replay_time(path, flag, t))
}

#[tokio::main]
async fn main() -> ExitCode {
    telemetry::init_logging();
    let cli = Cli::parse();
    if let Command::Replay { action: None, args } = &cli.command {
        // A rerun calls every selected task again: refused, with the usage, unless confirmed.
        if args.rerun && !args.yes && !args.dry_run {
            usage_error(
                &["replay"],
                clap::error::ErrorKind::MissingRequiredArgument,
                "--rerun runs every selected event again as new runs, calling the services again; add --yes to \
                 confirm (or --dry-run to see how many calls it would make)",
            );
        }
        // Checked before anything connects, so that a typo is told with the usage at once.
        replay_time_opt(&["replay"], "--from", args.from.as_deref());
        replay_time_opt(&["replay"], "--to", args.to.as_deref());
    }
    if let Command::Replay { action: Some(ReplayAction::Results { from, to }), .. } = &cli.command {
        replay_time(&["replay", "results"], "--from", from);
        replay_time_opt(&["replay", "results"], "--to", to.as_deref());
    }
    match main_inner(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
