//! The one place that spells weir's topic and consumer-group names. Every name is a logical name
//! (`events`, `actions.webhook.retry.1s`, `weir-sink`) behind the config's `topic_prefix`, so
//! several installations or tests share a cluster; building them anywhere else with `format!`
//! is how a stage and `weir topics apply` come to disagree about a name.

use super::Priority;

/// Names under one prefix: [`Config::names`](super::Config::names), or [`Names::logical`] for
/// the names as `topics/*.yaml` declares them.
#[derive(Debug, Clone, Copy)]
pub struct Names<'a> {
    prefix: &'a str,
}

impl<'a> Names<'a> {
    pub fn new(prefix: &'a str) -> Names<'a> {
        Names { prefix }
    }

    /// Names without a prefix: as declared in `topics/*.yaml`.
    pub(crate) fn logical() -> Names<'static> {
        Names { prefix: "" }
    }

    /// Any declared topic by its logical name.
    pub fn topic(&self, logical: &str) -> String {
        format!("{}{logical}", self.prefix)
    }

    /// Domain events, read by the evaluator.
    pub fn events(&self) -> String {
        self.topic("events")
    }

    /// Outcomes of action tasks, read by the record stage.
    pub fn results(&self) -> String {
        self.topic("results")
    }

    /// Dead letters of every stage.
    pub fn dlq(&self) -> String {
        self.topic("dlq")
    }

    /// Workflow definitions (compacted).
    pub fn definitions(&self) -> String {
        self.topic("definitions")
    }

    /// Runs cancelled with `weir runs cancel` (compacted, keyed by run id), read by every executor.
    pub fn cancellations(&self) -> String {
        self.topic("cancellations")
    }

    /// A service's action tasks (of normal priority: see [`actions_at`](Self::actions_at)).
    pub fn actions(&self, service: &str) -> String {
        self.topic(&format!("actions.{service}"))
    }

    /// A service's action tasks of one priority: `actions.<service>` for normal (the topic every
    /// deployment already has), `actions.<service>.high` and `actions.<service>.low` (service
    /// names hold no `.`, so these cannot be another service's).
    pub fn actions_at(&self, service: &str, priority: Priority) -> String {
        match priority {
            Priority::Normal => self.actions(service),
            p => self.topic(&format!("actions.{service}.{p}")),
        }
    }

    /// A service's delay topic of one retry tier (`1s`, `10m`: see
    /// [`RetryConfig::tier_names`](super::RetryConfig::tier_names)).
    pub fn retry(&self, service: &str, tier: &str) -> String {
        self.topic(&format!("actions.{service}.retry.{tier}"))
    }

    /// Where a service's tasks of tenants over their share wait (`executor.fairness.overflow`).
    pub fn overflow(&self, service: &str) -> String {
        self.topic(&format!("actions.{service}.overflow"))
    }

    /// The overflow topic of one priority's action topic: `<actions topic>.overflow`.
    pub fn overflow_at(&self, service: &str, priority: Priority) -> String {
        format!("{}.overflow", self.actions_at(service, priority))
    }

    /// The consumer group of a stage or tool (`evaluate`, `sink`, `definitions`, `dlq-redrive`).
    pub fn group(&self, stage: &str) -> String {
        format!("{}weir-{stage}", self.prefix)
    }

    /// The consumer group of a service's executor.
    pub fn execute_group(&self, service: &str) -> String {
        self.group(&format!("execute-{service}"))
    }

    /// The consumer group reading one priority's action topic: [`execute_group`](Self::execute_group)
    /// for normal, `weir-execute-<service>.high` and `.low` for the others.
    pub fn execute_group_at(&self, service: &str, priority: Priority) -> String {
        match priority {
            Priority::Normal => self.execute_group(service),
            p => format!("{}.{p}", self.execute_group(service)),
        }
    }

    /// The group under which a service's executors commit their progress in its overflow topic.
    /// It never joins (its consumers are assigned the partitions the executor owns).
    pub(crate) fn overflow_group(&self, service: &str) -> String {
        self.group(&format!("overflow-{service}"))
    }

    /// [`overflow_group`](Self::overflow_group) of one priority's overflow topic.
    pub(crate) fn overflow_group_at(&self, service: &str, priority: Priority) -> String {
        match priority {
            Priority::Normal => self.overflow_group(service),
            p => format!("{}.{p}", self.overflow_group(service)),
        }
    }

    /// The consumer group reading a service's delay topic of one tier.
    pub(crate) fn retry_group(&self, service: &str, tier: &str) -> String {
        self.group(&format!("retry-{service}-{tier}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_logical_names_behind_the_prefix() {
        let n = Names::new("t1.");
        assert_eq!(
            [n.events(), n.results(), n.dlq(), n.definitions(), n.actions("hook"), n.retry("hook", "10s")],
            ["t1.events", "t1.results", "t1.dlq", "t1.definitions", "t1.actions.hook", "t1.actions.hook.retry.10s"]
        );
        assert_eq!(
            [n.group("sink"), n.execute_group("hook"), n.retry_group("hook", "1m")],
            ["t1.weir-sink", "t1.weir-execute-hook", "t1.weir-retry-hook-1m"]
        );
        assert_eq!(Names::logical().retry("hook", "1s"), "actions.hook.retry.1s");
        assert_eq!(
            [n.overflow("hook"), n.overflow_group("hook")],
            ["t1.actions.hook.overflow", "t1.weir-overflow-hook"]
        );
        assert_eq!(
            [
                n.actions_at("hook", Priority::Normal),
                n.actions_at("hook", Priority::High),
                n.overflow_at("hook", Priority::Low)
            ],
            ["t1.actions.hook", "t1.actions.hook.high", "t1.actions.hook.low.overflow"]
        );
        assert_eq!(
            [
                n.overflow_at("hook", Priority::Normal),
                n.execute_group_at("hook", Priority::Low),
                n.overflow_group_at("hook", Priority::High)
            ],
            ["t1.actions.hook.overflow", "t1.weir-execute-hook.low", "t1.weir-overflow-hook.high"]
        );
    }
}
