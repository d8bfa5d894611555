//! `weir workflows`: the workflow files of a directory made the content of the compacted
//! definitions topic (`apply`), and what that topic holds (`list`).

use std::{collections::BTreeMap, path::Path, time::Duration};

use anyhow::Context as _;
use rdkafka::message::OwnedHeaders;

use crate::{
    config::Config,
    engine::{
        definitions::{self, ApplyPlan},
        workflow::{self, Workflow},
    },
    kafka::{self, compacted::Table},
};

/// Reads the definitions topic up to its current end: key → latest definition. Blocking.
pub fn read_current(config: &Config) -> anyhow::Result<BTreeMap<String, Workflow>> {
    let table = Table::open(config, &config.names().definitions(), &config.names().group("definitions"))?;
    let mut current = BTreeMap::new();
    table.read_to_end(|record| {
        let Some(key) = record.key.and_then(|k| std::str::from_utf8(k).ok()) else { return };
        match definitions::decode(record.value) {
            Ok(Some(wf)) => {
                current.insert(key.to_string(), wf);
            }
            Ok(None) => {
                current.remove(key);
            }
            Err(e) => tracing::error!(key, offset = record.offset, "skipping definition: {e:#}"),
        }
    })?;
    Ok(current)
}

/// Validates every definition of `dir` and makes the definitions topic equal to it (see
/// [`definitions::plan_apply`]); with `dry_run`, only says what would change.
pub async fn apply_dir(config: &Config, dir: &Path, dry_run: bool) -> anyhow::Result<ApplyPlan> {
    let services = config.services.keys().map(String::as_str).collect();
    let local = workflow::load(dir, &services, &config.engine)?;
    let cfg = config.clone();
    let current = tokio::task::spawn_blocking(move || read_current(&cfg)).await??;
    let mut plan = definitions::plan_apply(&local, &current)?;
    plan.notes = clamped(config, local.values().map(|(wf, source)| (wf, source.file.as_path())));
    if dry_run {
        return Ok(plan);
    }
    let producer = kafka::producer(config)?;
    let topic = config.names().definitions();
    // All records are handed to the producer at once and acknowledged together: one partition,
    // an idempotent producer, so they still land in order, and a 1,000-workflow apply takes one
    // round trip instead of a thousand.
    let publishes = plan.publish.iter().map(|wf| {
        let (producer, topic) = (&producer, &topic);
        async move {
            let k = definitions::key(wf.tenant.as_deref(), &wf.id);
            let payload = serde_json::to_vec(wf)?;
            kafka::send(producer, topic, Some(k.as_bytes()), &payload, OwnedHeaders::new())
                .await
                .with_context(|| format!("publishing {k}"))
        }
    });
    let deletes = plan.delete.iter().map(|k| {
        let record = rdkafka::producer::FutureRecord::<[u8], [u8]>::to(&topic).key(k.as_bytes());
        let sent = producer.send(record, Duration::from_secs(30));
        async move { sent.await.map(|_| ()).map_err(|(e, _)| e).with_context(|| format!("deleting {k}")) }
    });
    futures::future::try_join_all(publishes).await?;
    futures::future::try_join_all(deletes).await?;
    Ok(plan)
}

/// Where a step asks for more than its service allows: a longer `timeout_ms` than the service's
/// `timeout`, or more `retry.attempts` than its `retry.attempts`. The executor clamps both to the
/// service's (a step cannot buy itself more of a shared service than the operator allowed).
pub fn clamped<'a>(config: &Config, workflows: impl Iterator<Item = (&'a Workflow, &'a Path)>) -> Vec<String> {
    let mut notes = Vec::new();
    for (wf, file) in workflows {
        for step in &wf.steps {
            let Some(service) = config.services.get(&step.service) else { continue };
            let at = format!("{}: workflow {} step {}", file.display(), wf.id, step.id);
            if let Some(ms) = step.timeout_ms.filter(|&ms| Duration::from_millis(ms) > service.timeout) {
                notes.push(format!(
                    "{at}: timeout_ms {ms} is over service {}'s timeout ({} ms): calls time out at {} ms",
                    step.service,
                    service.timeout.as_millis(),
                    service.timeout.as_millis()
                ));
            }
            if let Some(retry) = step.retry.as_ref().filter(|r| r.attempts > service.retry.attempts) {
                notes.push(format!(
                    "{at}: retry.attempts {} is over service {}'s retry.attempts ({}): at most {} attempts",
                    retry.attempts, step.service, service.retry.attempts, service.retry.attempts
                ));
            }
        }
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ServiceConfig;

    #[test]
    fn steps_asking_more_than_their_service_allows_are_noted() {
        let mut config = Config::default();
        let service = ServiceConfig { timeout: Duration::from_secs(2), ..Default::default() };
        config.services.insert("hook".into(), service);
        let wf: Workflow = serde_yaml_ng::from_str(
            "{id: w, trigger: {type: a}, steps: [
                {id: long, service: hook, timeout_ms: 3000, retry: {attempts: 9}},
                {id: fine, service: hook, timeout_ms: 2000, retry: {attempts: 5}}]}",
        )
        .unwrap();
        let notes = clamped(&config, [(&wf, Path::new("w.yaml"))].into_iter());
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[0].starts_with("w.yaml: workflow w step long: timeout_ms 3000"), "{}", notes[0]);
        assert!(notes[1].contains("retry.attempts 9 is over service hook's retry.attempts (5)"), "{}", notes[1]);
    }
}
