//! Starting and stopping the stages in one process: what `weir run`, the demo, the benchmark and
//! the integration tests share. Each stage is a tokio task with its own consumer group, so the
//! same binary scales by starting more processes (or only some stages in each, `--stage`).
//!
//! ## Draining
//! [`Pipeline::stop`] is the graceful drain of SIGTERM (a scale-in, a rolling update): every stage
//! stops taking records, finishes what it has in flight, stores the offsets of what became
//! durable, and its consumers commit them and leave their groups, so the partitions move to the
//! remaining processes at once and their new owners repeat nothing that was done. Finishing is
//! bounded by `consumer_groups.drain_timeout`: a stage still busy then (a service that stopped
//! answering, a database that does not commit) is aborted. Its sources close as they are dropped:
//! they log what they abandon (`Event::Abandoned`), commit what was stored, and leave. Kubernetes
//! kills a pod `terminationGracePeriodSeconds` after SIGTERM, so the drain must end before that.

use std::{collections::BTreeSet, sync::Arc};

use anyhow::Context as _;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::{
    config::Config,
    engine::definitions::DefinitionStore,
    kafka::{self, compacted::Table},
    stages::{evaluate, execute, ingest, record},
};

/// Which stages a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum StageName {
    /// The HTTP endpoint (`ingest:` in weir.yaml); not among the default stages.
    Ingest,
    Evaluate,
    Execute,
    Sink,
}

pub struct Pipeline {
    /// Cancels the stages' token when dropped, so an owner that returns early (an error, a
    /// panic) does not leave stages running.
    cancel: DropGuard,
    tasks: Vec<(String, JoinHandle<anyhow::Result<()>>)>,
    /// How long [`stop`](Self::stop) waits for the stages' in-flight work.
    drain_timeout: std::time::Duration,
}

/// Reads the compacted definitions topic into a new store, then keeps the store current from a
/// follower thread until `stop` is cancelled. Blocking.
pub(crate) fn follow_definitions(config: &Config, stop: CancellationToken) -> anyhow::Result<Arc<DefinitionStore>> {
    let store = Arc::new(DefinitionStore::new(config.services.keys().cloned().collect(), config.engine.clone()));
    let table = Table::open(config, &config.names().definitions(), &config.names().group("definitions"))?;
    table.read_to_end(|r| store.apply_record(r.key, r.value, r.offset))?;
    let follower = store.clone();
    table.follow(stop, move |r| follower.apply_record(r.key, r.value, r.offset))?;
    Ok(store)
}

impl Pipeline {
    /// Checks the broker and the size limits, reads the workflow definitions topic and starts the
    /// requested stages.
    pub async fn start(config: Arc<Config>, stages: &[StageName]) -> anyhow::Result<Pipeline> {
        Pipeline::start_services(config, stages, &[]).await
    }

    /// [`Pipeline::start`], with the executors of only `services` (all when empty): one
    /// Deployment per service scales each service's executor on its own lag.
    pub async fn start_services(
        config: Arc<Config>,
        stages: &[StageName],
        services: &[String],
    ) -> anyhow::Result<Pipeline> {
        if let Some(unknown) = services.iter().find(|s| !config.services.contains_key(*s)) {
            anyhow::bail!("--service {unknown}: no such service in the config's services");
        }
        crate::connectors::validate_all(&config).context("invalid config")?;
        let check = config.clone();
        tokio::task::spawn_blocking(move || kafka::check_reachable(&check)).await??;
        // Limits that cannot work refuse to start, rather than fail on the first large record.
        kafka::topics::check_limits(&config).await?;
        let cancel = CancellationToken::new();
        let definitions = tokio::task::spawn_blocking({
            let (config, stop) = (config.clone(), cancel.child_token());
            move || follow_definitions(&config, stop)
        })
        .await?
        .context("loading workflow definitions")?;
        tracing::info!(workflows = definitions.len(), "workflow definitions loaded");
        let mut tasks = Vec::new();
        for stage in stages.iter().copied().collect::<BTreeSet<_>>() {
            match stage {
                StageName::Ingest => {
                    tasks.push(("ingest".to_string(), tokio::spawn(ingest::run(config.clone(), cancel.child_token()))))
                }
                StageName::Evaluate => tasks.push((
                    "evaluate".to_string(),
                    tokio::spawn(evaluate::run(config.clone(), definitions.clone(), cancel.clone())),
                )),
                StageName::Execute => {
                    let ours: Vec<_> =
                        config.services.iter().filter(|(s, _)| services.is_empty() || services.contains(s)).collect();
                    crate::connectors::raise_open_files(&config, ours.iter().copied());
                    // Each service its share of the calls' memory: a slow one holds only its own.
                    let share = config.executor.memory_share(ours.len());
                    for (service, _) in ours {
                        let memory = execute::memory::CallMemory::new(service, share);
                        tasks.push((
                            format!("execute-{service}"),
                            tokio::spawn(execute::run(config.clone(), service.clone(), memory, cancel.clone())),
                        ));
                    }
                }
                StageName::Sink => tasks.push((
                    "sink".to_string(),
                    tokio::spawn(record::run(config.clone(), definitions.clone(), cancel.clone())),
                )),
            }
        }
        Ok(Pipeline { cancel: cancel.drop_guard(), tasks, drain_timeout: config.consumer_groups.drain_timeout })
    }

    /// All stages.
    pub const ALL: [StageName; 3] = [StageName::Evaluate, StageName::Execute, StageName::Sink];

    /// Waits until a stage ends by itself: an error while running. A stage runs until it is
    /// stopped, so one that ends without an error ended because its source did (a consumer
    /// librdkafka declared failed, which the source logged): an error too, so the process exits
    /// non-zero and its supervisor restarts it.
    pub async fn wait(&mut self) -> anyhow::Result<()> {
        let (result, index, _) = futures::future::select_all(self.tasks.iter_mut().map(|(_, t)| t)).await;
        let name = self.tasks.remove(index).0;
        match result {
            Ok(Ok(())) => {
                Err(anyhow::anyhow!("stage {name} stopped by itself: its consumer failed (see the log above)"))
            }
            Ok(Err(e)) => Err(e.context(format!("stage {name} failed"))),
            Err(e) => Err(anyhow::anyhow!("stage {name} panicked: {e}")),
        }
    }

    /// Signals every stage to finish its current work and waits for them, at most
    /// `consumer_groups.drain_timeout` in all (see the module docs).
    pub async fn stop(self) -> anyhow::Result<()> {
        let Pipeline { cancel, tasks, drain_timeout } = self;
        cancel.disarm().cancel();
        let deadline = tokio::time::Instant::now() + drain_timeout;
        let mut first_error = None;
        for (name, mut task) in tasks {
            let outcome = match tokio::time::timeout_at(deadline, &mut task).await {
                Ok(Ok(r)) => r.with_context(|| format!("stage {name}")),
                Ok(Err(e)) => Err(anyhow::anyhow!("stage {name} panicked: {e}")),
                Err(_) => {
                    tracing::warn!(
                        stage = name,
                        "consumer_groups.drain_timeout ({}s) is over: abandoning the stage's unfinished work",
                        drain_timeout.as_secs_f64()
                    );
                    // Dropping the stage closes its sources: they log what they abandon, commit
                    // what was stored and leave their groups.
                    task.abort();
                    let _ = task.await;
                    Ok(())
                }
            };
            if let Err(e) = outcome {
                tracing::error!("{e:#}");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
