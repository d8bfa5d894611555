//! The `weir run` child processes of the scenarios that measure the stages apart from the
//! bench (backlog, scale, and the baseline-relative ones unless `--in-process`): the config file
//! they load and their lifecycle.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use crate::config::Config;

/// How long a child has to finish after SIGTERM before it is killed.
const STOP_LIMIT: Duration = Duration::from_secs(30);

/// The config file of the child: the scenario's config as it is (`Config` serializes to the
/// `weir.yaml` it would load from), with absolute paths and without a metrics endpoint.
pub(super) fn write_child_config(config: &Config, dir: &Path) -> anyhow::Result<PathBuf> {
    let mut child = config.clone();
    child.topics_dir = std::fs::canonicalize(&config.topics_dir).unwrap_or_else(|_| config.topics_dir.clone());
    child.workflows = dir.to_path_buf();
    child.metrics_addr = None;
    let yaml = serde_yaml_ng::to_string(&child)?;
    let path = dir.join("weir-run.yaml");
    std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// The `weir run` child; killed if dropped while running (an error or Ctrl-C on the way).
pub(super) struct ChildProcess {
    child: Child,
    log: PathBuf,
}

impl ChildProcess {
    /// `weir --config <config> run <args>`, its output to `log`.
    pub(super) fn start(binary: &Path, config: &Path, args: &[&str], log: &Path) -> anyhow::Result<ChildProcess> {
        Self::spawn(binary, config, args, log, Command::new(binary))
    }

    /// [`ChildProcess::start`], with the child's rebalances in its log whatever `RUST_LOG` says
    /// (the `rebalance` lines [`crate::ops::rebalances`] reads are logged at `info`).
    pub(super) fn start_logging_rebalances(
        binary: &Path,
        config: &Path,
        args: &[&str],
        log: &Path,
    ) -> anyhow::Result<ChildProcess> {
        let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info,librdkafka=warn".into());
        let mut command = Command::new(binary);
        command.env("RUST_LOG", format!("{filter},weir::telemetry=info"));
        Self::spawn(binary, config, args, log, command)
    }

    fn spawn(
        binary: &Path,
        config: &Path,
        args: &[&str],
        log: &Path,
        mut command: Command,
    ) -> anyhow::Result<ChildProcess> {
        let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = command
            .arg("--config")
            .arg(config)
            .arg("run")
            .args(args)
            // The file says where everything is (the scenario's database, for one).
            .env_remove("DATABASE_URL")
            .env_remove("WEIR_BROKERS")
            .env_remove("WEIR_CONFIG")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(ChildProcess { child, log: log.to_path_buf() })
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(super) fn exited(&mut self) -> anyhow::Result<Option<std::process::ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// The child's log so far.
    pub(super) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The end of the child's log, for errors.
    pub(super) fn log_tail(&self) -> String {
        let text = self.log();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// SIGTERM (the child finishes in-flight work and exits), then SIGKILL after [`STOP_LIMIT`].
    pub(super) async fn stop(mut self) -> anyhow::Result<()> {
        let term = Command::new("kill").arg("-TERM").arg(self.pid().to_string()).status();
        if !term.is_ok_and(|s| s.success()) {
            tracing::warn!("could not send SIGTERM to weir run ({}); killing it", self.pid());
        }
        let asked = Instant::now();
        while asked.elapsed() < STOP_LIMIT {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("weir run exited with {status} when stopped:\n{}", self.log_tail());
                }
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("weir run did not stop within {}s of SIGTERM:\n{}", STOP_LIMIT.as_secs(), self.log_tail())
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
