//! What a run under faults (kills, scaling) came to, as the receiver and the database saw it, and
//! the checks every such test makes: 0 lost, 0 duplicate rows, each tenant's calls in order, no key
//! called more than twice, and repeated calls within a bound the test derives from its faults.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use weir::{config::Config, ops::receiver::Receiver};

use super::{committed_total, end_offsets, eventually, scalar, tail, WeirProcess};

#[derive(Debug)]
pub struct Outcome {
    /// Distinct idempotency keys called: the tasks.
    pub tasks: usize,
    pub calls: usize,
    /// Keys called more than once, and the most calls of one key.
    pub repeated_keys: usize,
    pub most_calls: usize,
    pub rows: i64,
    pub succeeded_rows: i64,
    /// Tenants whose first calls (of `ordered_step`, when given) did not follow their events' order.
    pub order_violations: usize,
    /// Keys called more than twice (at most 5), each with its step and the positions of its calls
    /// in the receiver's arrival order, to set beside the tests' kill points (also counted in
    /// arrivals): what a failure of "no key called more than twice" needs to be explained.
    pub thrice: Vec<String>,
}

impl Outcome {
    /// Reads the receiver's calls and the database at `url`. Per tenant, the first call of each
    /// key (of `ordered_step` only, when given: a diamond's later steps may interleave) must carry
    /// rising `input.seq` numbers.
    pub async fn of(receiver: &Receiver, url: &str, ordered_step: Option<&str>) -> Outcome {
        let calls = receiver.calls();
        let mut per_key: HashMap<String, usize> = HashMap::new();
        let mut per_tenant: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        let mut positions: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, c) in calls.iter().enumerate() {
            positions.entry(c.idempotency_key.clone().unwrap_or_default()).or_default().push(i);
        }
        let thrice = positions
            .iter()
            .filter(|(_, at)| at.len() > 2)
            .take(5)
            .map(|(key, at)| format!("{key} (step {}) called at arrivals {at:?}", calls[at[0]].body["step_id"]))
            .collect();
        for c in &calls {
            let count = per_key.entry(c.idempotency_key.clone().unwrap_or_default()).or_default();
            *count += 1;
            if *count > 1 || ordered_step.is_some_and(|step| c.body["step_id"] != step) {
                continue;
            }
            let seq = &c.body["input"]["seq"];
            let seq = seq.as_u64().or_else(|| seq.as_str()?.parse().ok()).expect("seq in the input");
            per_tenant.entry(c.tenant.clone().unwrap_or_default()).or_default().push(seq);
        }
        Outcome {
            tasks: per_key.len(),
            calls: calls.len(),
            repeated_keys: per_key.values().filter(|c| **c > 1).count(),
            most_calls: per_key.values().copied().max().unwrap_or(0),
            rows: scalar(url, "select count(*) from action_results").await,
            succeeded_rows: scalar(url, "select count(*) from action_results where status = 'succeeded'").await,
            order_violations: per_tenant.values().filter(|s| s.windows(2).any(|w| w[0] > w[1])).count(),
            thrice,
        }
    }

    /// Calls beyond one per task.
    pub fn repeated(&self) -> usize {
        self.calls - self.tasks
    }

    /// 0 lost, 0 duplicate rows, per-tenant order, no key called more than twice, and at most
    /// `bound` repeated calls.
    pub fn check(&self, tasks: usize, bound: usize) {
        eprintln!("{self:?}: {} repeated calls on {} keys (bound {bound})", self.repeated(), self.repeated_keys);
        assert_eq!(self.tasks, tasks, "every task was called: {self:?}");
        assert_eq!(
            (self.rows, self.succeeded_rows),
            (tasks as i64, tasks as i64),
            "0 lost, 0 duplicate rows: {self:?}"
        );
        assert_eq!(self.order_violations, 0, "each tenant's calls in order: {self:?}");
        assert!(self.most_calls <= 2, "no key called more than twice: {self:?}");
        assert!(self.repeated() <= bound, "repeated calls within the in-flight work of the faults ({bound}): {self:?}");
    }
}

/// Waits (up to `patience`) until the database has `rows` results, then until the `webhook`
/// executors' group has committed all it read and every call the receiver got is booked: late
/// copies (a replayed evaluation after the last restart) have had their chance to arrive. Fails
/// with the logs' tails.
pub async fn finish(receiver: &Receiver, config: &Config, rows: usize, patience: Duration, logs: &[&WeirProcess]) {
    let url = &config.database_url;
    let count = || scalar(url, "select count(*) from action_results");
    let logs = || logs.iter().map(|w| tail(&w.output())).collect::<Vec<_>>().join("\n---\n");
    let done = eventually(patience, || async { count().await >= rows as i64 }).await;
    assert!(done, "{} of {rows} rows; last logs:\n{}", count().await, logs());
    let (group, topic) = (config.names().execute_group("webhook"), config.names().actions("webhook"));
    let caught_up = eventually(Duration::from_secs(60), || async {
        committed_total(&group, &topic, 8) == end_offsets(&topic, 8) && receiver.arrived() == receiver.calls().len()
    })
    .await;
    assert!(
        caught_up,
        "the executors did not commit everything they read: committed {} of {} ({} calls booked of {} arrived); last logs:\n{}",
        committed_total(&group, &topic, 8),
        end_offsets(&topic, 8),
        receiver.calls().len(),
        receiver.arrived(),
        logs()
    );
}
