//! Workflow definitions and the index the evaluator matches events against.
//!
//! A definition says which events start it (`trigger.type`, one or a list) and which steps run,
//! each on a named service. A definition without `tenant` is platform-wide: it applies to every
//! tenant's events. A tenant's own workflows only ever see that tenant's events, because the index
//! is keyed by tenant.
//!
//! The index is built once per definition set, so matching an event is two hash look-ups without
//! allocation: event type → (platform-wide workflows, tenant → workflows).

use std::{
    collections::{BTreeSet, HashMap},
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{bail, Context as _};
use serde::Deserialize;
use serde_json::{json, Value as Json};

use crate::envelope::{ActionTask, Event};

/// One workflow definition, as written in YAML.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workflow {
    /// Unique per tenant (or among platform-wide workflows).
    pub id: String,
    /// The tenant it belongs to; absent means every tenant.
    #[serde(default)]
    pub tenant: Option<String>,
    /// Increases with every change; part of each task id, so a new version yields new tasks.
    #[serde(default = "first_version")]
    pub version: i64,
    pub trigger: Trigger,
    pub steps: Vec<Step>,
}

fn first_version() -> i64 {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trigger {
    /// Event type(s) that start the workflow.
    #[serde(rename = "type")]
    pub types: OneOrMany,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn as_slice(&self) -> &[String] {
        match self {
            OneOrMany::One(s) => std::slice::from_ref(s),
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub id: String,
    /// A service from the config's `services`.
    pub service: String,
    /// Passed to the service as `params` beside the event.
    #[serde(default)]
    pub input: Json,
}

impl Workflow {
    /// Checks a definition against the services that exist; errors name the field.
    pub fn validate(&self, services: &BTreeSet<&str>) -> anyhow::Result<()> {
        if self.id.trim().is_empty() {
            bail!("id: must not be empty");
        }
        if self.trigger.types.as_slice().iter().any(|t| t.trim().is_empty()) || self.trigger.types.as_slice().is_empty()
        {
            bail!("trigger.type: must name at least one event type");
        }
        if self.steps.is_empty() {
            bail!("steps: a workflow needs at least one step");
        }
        let mut ids = BTreeSet::new();
        for (i, step) in self.steps.iter().enumerate() {
            if !ids.insert(step.id.as_str()) {
                bail!("steps[{i}].id: duplicate step id {:?}", step.id);
            }
            if !services.contains(step.service.as_str()) {
                bail!("steps[{i}].service: unknown service {:?} (configured: {:?})", step.service, services);
            }
        }
        Ok(())
    }

    /// The tasks an event starts: one per step. Ids are derived from the event, workflow version
    /// and step, so evaluating the same event again yields the same tasks (and the executor's
    /// idempotency keys and the sink's primary key absorb the replay).
    pub fn tasks_for(&self, event: &Event, created_at: &str) -> Vec<ActionTask> {
        let run_name = format!("{}/{}/{}/{}", event.tenant, event.id, self.id, self.version);
        let run_id = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, run_name.as_bytes()).to_string();
        self.steps
            .iter()
            .map(|step| ActionTask {
                task_id: uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, format!("{run_name}/{}", step.id).as_bytes())
                    .to_string(),
                run_id: run_id.clone(),
                event_id: event.id.clone(),
                event_type: event.kind.clone(),
                tenant: event.tenant.clone(),
                workflow_id: self.id.clone(),
                workflow_version: self.version,
                step_id: step.id.clone(),
                service: step.service.clone(),
                attempt: 1,
                created_at: created_at.to_string(),
                input: json!({
                    "event": {"id": event.id, "type": event.kind, "source": event.source,
                              "time": event.time, "data": event.data},
                    "params": step.input,
                }),
            })
            .collect()
    }
}

#[derive(Default)]
struct ByType {
    platform: Vec<Arc<Workflow>>,
    by_tenant: HashMap<String, Vec<Arc<Workflow>>>,
}

/// All definitions, indexed by event type and tenant.
#[derive(Default)]
pub struct WorkflowSet {
    index: HashMap<String, ByType>,
    count: usize,
}

impl WorkflowSet {
    pub fn new(workflows: Vec<Workflow>) -> WorkflowSet {
        let mut set = WorkflowSet { index: HashMap::new(), count: workflows.len() };
        for wf in workflows.into_iter().map(Arc::new) {
            for kind in wf.trigger.types.as_slice() {
                let entry = set.index.entry(kind.clone()).or_default();
                match &wf.tenant {
                    None => entry.platform.push(wf.clone()),
                    Some(t) => entry.by_tenant.entry(t.clone()).or_default().push(wf.clone()),
                }
            }
        }
        set
    }

    /// Reads a YAML file, or every `*.yaml`/`*.yml` file of a directory (one workflow per file),
    /// validating each against `services`.
    pub fn load(path: &Path, services: &BTreeSet<&str>) -> anyhow::Result<WorkflowSet> {
        let files: Vec<PathBuf> = if path.is_dir() {
            let mut files: Vec<_> = std::fs::read_dir(path)
                .with_context(|| format!("reading workflows directory {}", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
                .collect();
            files.sort();
            files
        } else {
            vec![path.to_path_buf()]
        };
        let mut workflows = Vec::new();
        let mut seen = BTreeSet::new();
        for file in files {
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let wf: Workflow =
                serde_yaml_ng::from_str(&text).with_context(|| format!("{}: invalid workflow", file.display()))?;
            wf.validate(services).with_context(|| format!("{}: workflow {:?}", file.display(), wf.id))?;
            if !seen.insert((wf.tenant.clone(), wf.id.clone())) {
                bail!("{}: workflow {:?} is defined twice for the same tenant", file.display(), wf.id);
            }
            workflows.push(wf);
        }
        Ok(WorkflowSet::new(workflows))
    }

    /// Workflows that `event` triggers: the platform-wide ones, then the tenant's own.
    pub fn matching<'a>(&'a self, event: &Event) -> impl Iterator<Item = &'a Arc<Workflow>> + 'a {
        let by_type = self.index.get(&event.kind);
        let platform = by_type.map(|b| b.platform.as_slice()).unwrap_or_default();
        let tenant = by_type.and_then(|b| b.by_tenant.get(&event.tenant)).map(Vec::as_slice).unwrap_or_default();
        platform.iter().chain(tenant.iter())
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(tenant: &str, kind: &str) -> Event {
        serde_json::from_value(json!({"id": "e1", "source": "/s", "type": kind, "tenant": tenant, "data": {}})).unwrap()
    }

    fn wf(yaml: &str) -> Workflow {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn tenants_only_see_their_own_workflows() {
        let set = WorkflowSet::new(vec![
            wf("{id: all, trigger: {type: a}, steps: [{id: s, service: x}]}"),
            wf("{id: mine, tenant: t1, trigger: {type: [a, b]}, steps: [{id: s, service: x}]}"),
        ]);
        let ids = |t: &str, k: &str| set.matching(&event(t, k)).map(|w| w.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids("t1", "a"), ["all", "mine"]);
        assert_eq!(ids("t2", "a"), ["all"]);
        assert_eq!(ids("t1", "b"), ["mine"]);
        assert!(ids("t2", "b").is_empty());
    }

    #[test]
    fn task_ids_are_deterministic_and_versioned() {
        let w1 = wf("{id: w, trigger: {type: a}, steps: [{id: s, service: x}]}");
        let mut w2 = w1.clone();
        w2.version = 2;
        let e = event("t", "a");
        assert_eq!(w1.tasks_for(&e, "now")[0].task_id, w1.tasks_for(&e, "later")[0].task_id);
        assert_ne!(w1.tasks_for(&e, "now")[0].task_id, w2.tasks_for(&e, "now")[0].task_id);
    }

    #[test]
    fn validation_names_the_field() {
        let services = BTreeSet::from(["webhook"]);
        let err = wf("{id: w, trigger: {type: a}, steps: [{id: s, service: slack}]}").validate(&services).unwrap_err();
        assert!(err.to_string().starts_with("steps[0].service"), "{err}");
        let err = wf("{id: w, trigger: {type: a}, steps: [{id: s, service: webhook}, {id: s, service: webhook}]}")
            .validate(&services)
            .unwrap_err();
        assert!(err.to_string().starts_with("steps[1].id"), "{err}");
    }
}
