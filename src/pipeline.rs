//! Starting and stopping the stages in one process: what `weir run`, the demo, the benchmark and
//! the integration tests share. Each stage is a tokio task with its own consumer group, so the
//! same binary scales by starting more processes (or only some stages in each, `--stage`).

use std::{collections::BTreeSet, sync::Arc};

use anyhow::Context as _;
use tokio::task::JoinHandle;

use crate::{
    config::Config, engine::definitions::DefinitionStore, kafka, shutdown, stages::evaluate, stages::execute,
    stages::record,
};

/// Which stages a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum StageName {
    Evaluate,
    Execute,
    Sink,
}

pub struct Pipeline {
    trigger: shutdown::Trigger,
    tasks: Vec<(String, JoinHandle<anyhow::Result<()>>)>,
}

impl Pipeline {
    /// Checks the broker and the size limits, reads the workflow definitions topic and starts the
    /// requested stages.
    pub async fn start(config: Arc<Config>, stages: &[StageName]) -> anyhow::Result<Pipeline> {
        let check = config.clone();
        tokio::task::spawn_blocking(move || kafka::check_reachable(&check)).await??;
        // Limits that cannot work refuse to start, rather than fail on the first large record.
        kafka::topics::check_limits(&config).await?;
        let store_config = config.clone();
        let definitions = Arc::new(
            tokio::task::spawn_blocking(move || DefinitionStore::start(&store_config))
                .await?
                .context("loading workflow definitions")?,
        );
        tracing::info!(workflows = definitions.len(), "workflow definitions loaded");
        let (trigger, _) = shutdown::channel();
        let mut tasks = Vec::new();
        for stage in stages.iter().copied().collect::<BTreeSet<_>>() {
            match stage {
                StageName::Evaluate => tasks.push((
                    "evaluate".to_string(),
                    tokio::spawn(evaluate::run(config.clone(), definitions.clone(), trigger.subscribe())),
                )),
                StageName::Execute => {
                    for service in config.services.keys() {
                        tasks.push((
                            format!("execute-{service}"),
                            tokio::spawn(execute::run(config.clone(), service.clone(), trigger.subscribe())),
                        ));
                    }
                }
                StageName::Sink => tasks.push((
                    "sink".to_string(),
                    tokio::spawn(record::run(config.clone(), definitions.clone(), trigger.subscribe())),
                )),
            }
        }
        Ok(Pipeline { trigger, tasks })
    }

    /// All stages.
    pub const ALL: [StageName; 3] = [StageName::Evaluate, StageName::Execute, StageName::Sink];

    /// Waits until a stage ends by itself (which is an error while running) or `stop` fires.
    pub async fn wait(&mut self) -> anyhow::Result<()> {
        let (result, index, _) = futures::future::select_all(self.tasks.iter_mut().map(|(_, t)| t)).await;
        let name = self.tasks.remove(index).0;
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.context(format!("stage {name} failed"))),
            Err(e) => Err(anyhow::anyhow!("stage {name} panicked: {e}")),
        }
    }

    /// Signals every stage to finish its current work and waits for them.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.trigger.fire();
        let mut first_error = None;
        for (name, task) in self.tasks {
            let outcome = match task.await {
                Ok(r) => r.with_context(|| format!("stage {name}")),
                Err(e) => Err(anyhow::anyhow!("stage {name} panicked: {e}")),
            };
            if let Err(e) = outcome {
                tracing::error!("{e:#}");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    pub fn trigger(&self) -> shutdown::Trigger {
        self.trigger.clone()
    }
}
