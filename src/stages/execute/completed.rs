//! Effectively-once calls: a task whose call already succeeded is not called again when a copy of
//! it arrives after a crash or a rebalance.
//!
//! ## Where copies come from
//! Offsets are committed after the work is durable, so a crash replays, and every replay can put a
//! task in front of the executor again, with the same deterministic task id:
//! - the executor's own partition, from its last committed offset: tasks called (and their
//!   results acknowledged) since that commit;
//! - a new copy on the action topic: the evaluator replays events whose tasks it had already
//!   produced, the record stage replays results whose next steps it had produced (before its
//!   transaction committed), the delay tiers replay what they had forwarded.
//!
//! Before this module every copy was called (measured in issue 12: about 3,000 extra calls per
//! kill, one key called 14 times in a diamond workflow). The `Idempotency-Key` makes that
//! harmless only for services that honour it.
//!
//! ## What the executor remembers
//! The results topic already says which tasks succeeded: every call's outcome is produced there
//! before the task's offset is stored. So the executor keeps a set of succeeded task ids per
//! service, fed from two places:
//! 1. **The tail of the results topic, read when a partition is assigned** (every new
//!    assignment of it, so also after a rebalance). Before a task of that assignment is called,
//!    the executor reads the succeeded results of the last `executor.completed.lookback` (10 min)
//!    from the *matching* results partitions, up to the partition's end at that moment. This
//!    covers whatever a previous owner (this process before a crash, or another member before a
//!    rebalance) finished.
//! 2. **Its own calls**: a call that succeeded is remembered when it returns, so a copy arriving
//!    later (behind it in the same tenant's lane: lanes run a tenant's tasks in order) is skipped.
//!
//! A task found in the set is not called: its offset is stored like a done one (its result is
//! already on the results topic), and `weir_completed_skipped_total{service}` counts it. What is
//! left is the calls *in flight* at the crash (called, result not yet acknowledged): those run
//! again, with the same `Idempotency-Key`. The duplicate window shrinks from "since the last
//! commit, plus every replayed copy" to "calls in flight at the crash".
//!
//! ## Which results partitions match
//! Tasks and results are both keyed by tenant with Kafka's murmur2 partitioner, so a tenant's
//! tasks are on action partition `h % A` and its results on results partition `h % R` (`h` the
//! key's hash, `A` and `R` the partition counts). The results partitions that can hold a tenant
//! of action partition `p` are exactly those `r` with `r ≡ p (mod gcd(A, R))` (Chinese remainder
//! theorem): just `p` when the counts are equal (as `topics/` declares them), a fixed subset when
//! they differ. Of what is read, only results of this service whose tenant hashes to `p` are kept.
//!
//! ## Only successes
//! A `failed` result is final too, but it is the outcome an operator sends again on purpose
//! (`weir dlq redrive`, `weir replay`), and the executor cannot tell such a resend from a replayed
//! copy without a marker every resender would have to set. A permanent failure is also the cheap
//! case to repeat: the service refused it. So only `succeeded` results skip a call.
//!
//! ## Bounded
//! Ids are kept as 128 bits (the UUID weir's task ids are; any other id by its SHA-256 prefix),
//! at most `executor.completed.max_tasks` per service (200,000, about 6 MB), the oldest forgotten
//! first. A tail read takes at most `max_tasks / R` records from each results partition, so
//! assigning every partition reads at most `max_tasks` records. Forgetting can only cost a
//! repeated call, never a skipped one: an id in the set has succeeded.
//!
//! If the tail cannot be read (the broker is unreachable), the read is retried for
//! [`LOAD_PATIENCE`], saying why each time; then the partition's tasks are called without it
//! (at-least-once, as before) rather than stalling the service.
//!
//! ## Why not Kafka transactions
//! Transactions (consume → produce → commit offsets atomically, read by `read_committed`
//! consumers) make a stage's *records* exactly-once, but a call to an external service is not a
//! Kafka write: a crash after the call and before the commit aborts the transaction and the task
//! is called again. For the executor they remove duplicate result records (which the record stage
//! already ignores) and not one duplicate call. For the evaluator and the record stage they would
//! remove duplicate task *copies*, which the set above already turns into skips. What they cost:
//! a transaction per batch per stage (`AddPartitionsToTxn`, `EndTxn`, a commit marker written to
//! every partition touched), `read_committed` consumers that see nothing past the last stable
//! offset (every record's latency grows by the interval between commits: Kafka Streams commits
//! every 100 ms under exactly-once, and each stage of the pipeline would add its own), and
//! producers fenced and re-initialised (`InitProducerId`) on every rebalance. That is paid on every record to fix what is already handled, and leaves the
//! one duplicate that matters (the call in flight at a crash) where it is; so weir does not use
//! them.

use std::{
    borrow::Cow,
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use futures::{
    future::{BoxFuture, Shared},
    FutureExt,
};
use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    Message, Offset, TopicPartitionList,
};
use serde::Deserialize;
use sha2::Digest as _;

use crate::{
    config::Config,
    envelope::{self, Status},
    kafka::{self, partitioner, source::Ticket},
    telemetry::{Event, Stage},
};

/// How long a failing tail read is retried before the partition's tasks are called without it.
pub(crate) const LOAD_PATIENCE: Duration = Duration::from_secs(30);

/// Longest one tail read may take before it counts as failed.
const READ_DEADLINE: Duration = Duration::from_secs(30);

/// A task id as the set holds it.
type Key = u128;

/// The 128 bits a task id is remembered by: the UUID itself for weir's task ids (UUID v5), else
/// the first 16 bytes of its SHA-256.
fn key(task_id: &str) -> Key {
    match uuid::Uuid::try_parse(task_id) {
        Ok(id) => id.as_u128(),
        Err(_) => {
            let digest = sha2::Sha256::digest(task_id.as_bytes());
            u128::from_be_bytes(digest[..16].try_into().expect("SHA-256 has 32 bytes"))
        }
    }
}

/// The results partitions that can hold the results of a tenant whose tasks are on action
/// partition `p`, with `actions` and `results` partitions in the two topics (see the module docs).
pub(crate) fn matching_partitions(p: i32, actions: i32, results: i32) -> Vec<i32> {
    let g = gcd(actions, results);
    (0..results).filter(|r| r % g == p % g).collect()
}

fn gcd(a: i32, b: i32) -> i32 {
    if b == 0 {
        a.max(1)
    } else {
        gcd(b, a % b)
    }
}

/// Succeeded task ids, bounded, the oldest forgotten first.
#[derive(Debug)]
struct Remembered {
    ids: HashSet<Key>,
    order: VecDeque<Key>,
    max: usize,
}

impl Remembered {
    fn new(max: usize) -> Remembered {
        Remembered { ids: HashSet::new(), order: VecDeque::new(), max: max.max(1) }
    }

    fn insert(&mut self, key: Key) {
        if self.ids.insert(key) {
            self.order.push_back(key);
            while self.order.len() > self.max {
                if let Some(old) = self.order.pop_front() {
                    self.ids.remove(&old);
                }
            }
        }
    }

    fn contains(&self, key: Key) -> bool {
        self.ids.contains(&key)
    }
}

/// A tail read under way or done, shared by every task of the assignment that waits for it.
type Load = Shared<BoxFuture<'static, ()>>;

/// What one executor (one service) knows of completed tasks: see the module docs.
pub(crate) struct Completed {
    service: String,
    /// The action topic whose partitions tickets name (one per priority: each priority's reader
    /// has its own `Completed`, as its tickets count its own assignments).
    actions_topic: String,
    config: Arc<Config>,
    state: Mutex<State>,
}

struct State {
    remembered: Remembered,
    /// Per action partition, the assignment (ticket generation) whose tail read this is.
    loads: HashMap<i32, (u64, Load)>,
}

/// The fields of a result the tail read needs; the rest (output, event) is skipped unparsed.
#[derive(Deserialize)]
struct Seen<'a> {
    #[serde(borrow)]
    task_id: Cow<'a, str>,
    #[serde(borrow)]
    service: Cow<'a, str>,
    status: Status,
}

impl Completed {
    pub(crate) fn new(config: Arc<Config>, service: &str, actions_topic: String) -> Arc<Completed> {
        let max = config.executor.completed.max_tasks;
        Arc::new(Completed {
            service: service.to_string(),
            actions_topic,
            config,
            state: Mutex::new(State { remembered: Remembered::new(max), loads: HashMap::new() }),
        })
    }

    /// Whether the task `task_id` (taken under `ticket`) already succeeded, so must not be called
    /// again. Waits, the first time for each assignment of the ticket's partition, for the tail of
    /// the results topic to be read. A skip is counted here.
    ///
    /// `overflow`: the ticket is of the overflow topic, whose partition p holds tenants of action
    /// partition p but whose tickets count assignments of their own; such a task waits for the
    /// action partition's tail read, whichever assignment started it.
    pub(crate) async fn succeeded(self: &Arc<Self>, ticket: &Ticket, overflow: bool, task_id: &str) -> bool {
        if let Some(load) = self.load_for(ticket, overflow) {
            load.await;
        }
        let known = self.state.lock().expect("completed lock").remembered.contains(key(task_id));
        if known {
            Event::SkippedCompleted { service: &self.service }.emit();
        }
        known
    }

    /// Remembers that the call of `task_id` succeeded.
    pub(crate) fn called(&self, task_id: &str, succeeded: bool) {
        if succeeded {
            self.state.lock().expect("completed lock").remembered.insert(key(task_id));
        }
    }

    /// The tail read of the ticket's assignment, started if it is the first ticket of it; `None`
    /// for a ticket of an older assignment (its task is given up before its call anyway).
    fn load_for(self: &Arc<Self>, ticket: &Ticket, overflow: bool) -> Option<Load> {
        // An overflow task starts a read under generation 0, which the action partition's own
        // first ticket (generations start at 1) replaces with a read of its assignment.
        let (partition, generation) = (ticket.partition, if overflow { 0 } else { ticket.generation() });
        let mut state = self.state.lock().expect("completed lock");
        match state.loads.get(&partition) {
            Some((_, load)) if overflow => return Some(load.clone()),
            Some((g, load)) if *g == generation => return Some(load.clone()),
            Some((g, _)) if *g > generation => return None,
            _ => {}
        }
        let this = self.clone();
        let load = async move { this.load(partition).await }.boxed().shared();
        state.loads.insert(partition, (generation, load.clone()));
        Some(load)
    }

    /// Reads the tail for action partition `partition` into the set, retrying for
    /// [`LOAD_PATIENCE`]; gives up saying so.
    async fn load(self: Arc<Self>, partition: i32) {
        let started = Instant::now();
        let mut wait = Duration::from_millis(200);
        loop {
            let this = self.clone();
            let read = tokio::task::spawn_blocking(move || this.read_tail(partition)).await;
            let error = match read {
                Ok(Ok((keys, read))) => {
                    let mut state = self.state.lock().expect("completed lock");
                    let remembered = keys.len();
                    for k in keys {
                        state.remembered.insert(k);
                    }
                    drop(state);
                    Event::CompletedLoaded {
                        service: &self.service,
                        partition,
                        read,
                        remembered,
                        elapsed: started.elapsed(),
                    }
                    .emit();
                    return;
                }
                Ok(Err(e)) => format!("{e:#}"),
                Err(e) => format!("tail read panicked: {e}"),
            };
            let give_up = started.elapsed() + wait > LOAD_PATIENCE;
            let detail = format!(
                "service {}: reading the completed tasks of action partition {partition} from the results topic: \
                 {error}; {}",
                self.service,
                if give_up {
                    "giving up: its tasks are called without this check (a task completed before may be called again)"
                } else {
                    "retrying"
                }
            );
            Event::Failed { stage: Stage::Execute, reason: "completed", retryable: !give_up, detail: &detail }.emit();
            if give_up {
                return;
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(5));
        }
    }

    /// The succeeded tasks of this service for action partition `partition` in the results
    /// topic's tail, and how many records were read. Blocking.
    fn read_tail(&self, partition: i32) -> anyhow::Result<(Vec<Key>, usize)> {
        let names = self.config.names();
        let (actions_topic, results_topic) = (&self.actions_topic, names.results());
        // Assigned, never subscribed, nothing committed: the group only names the client.
        let consumer: BaseConsumer = kafka::consumer_config(&self.config, &names.group("completed-tail"))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("statistics.interval.ms", "0")
            .create()
            .context("creating the tail consumer")?;
        let actions = kafka::partition_count(consumer.client(), actions_topic)?;
        let results = kafka::partition_count(consumer.client(), &results_topic)?;
        let per_partition = (self.config.executor.completed.max_tasks as i64 / i64::from(results)).max(1);
        let since = chrono::Utc::now().timestamp_millis() - self.config.executor.completed.lookback.as_millis() as i64;
        let mut by_time = TopicPartitionList::new();
        for r in matching_partitions(partition, actions, results) {
            by_time.add_partition_offset(&results_topic, r, Offset::Offset(since)).context("offsets by time")?;
        }
        let by_time = consumer
            .offsets_for_times(by_time, kafka::METADATA_TIMEOUT)
            .with_context(|| format!("looking up the offsets of {results_topic} since {since} ms"))?;
        let mut assign = TopicPartitionList::new();
        // Per results partition, the offset the read stops before.
        let mut ends: HashMap<i32, i64> = HashMap::new();
        for e in by_time.elements() {
            let r = e.partition();
            let (low, high) = consumer
                .fetch_watermarks(&results_topic, r, kafka::METADATA_TIMEOUT)
                .with_context(|| format!("reading the offsets of {results_topic} partition {r}"))?;
            // No record as recent as `since`: nothing to read.
            let Offset::Offset(from_time) = e.offset() else { continue };
            let from = from_time.max(low).max(high - per_partition);
            if from < high {
                assign.add_partition_offset(&results_topic, r, Offset::Offset(from)).context("assigning")?;
                ends.insert(r, high);
            }
        }
        let mut keys = Vec::new();
        let mut read = 0;
        if ends.is_empty() {
            return Ok((keys, read));
        }
        consumer.assign(&assign).with_context(|| format!("assigning {results_topic}"))?;
        let deadline = Instant::now() + READ_DEADLINE;
        while !ends.is_empty() {
            if Instant::now() > deadline {
                anyhow::bail!(
                    "{results_topic}: the tail was not read within {}s ({read} records read)",
                    READ_DEADLINE.as_secs()
                );
            }
            let Some(polled) = consumer.poll(Duration::from_millis(100)) else { continue };
            let m = match polled {
                Ok(m) => m,
                Err(rdkafka::error::KafkaError::PartitionEOF(r)) => {
                    ends.remove(&r);
                    continue;
                }
                Err(e) => return Err(e).with_context(|| format!("reading {results_topic}")),
            };
            let r = m.partition();
            if ends.get(&r).is_some_and(|end| m.offset() + 1 >= *end) {
                ends.remove(&r);
            }
            read += 1;
            if m.key().is_some_and(|k| !k.is_empty() && partitioner::partition_for_key(k, actions) != partition) {
                continue;
            }
            let json = envelope::Format::from_content_type(kafka::header(m.headers(), envelope::CONTENT_TYPE))
                .is_ok_and(|f| f == envelope::Format::Json);
            // A record that is not a JSON result is the record stage's to dead-letter; here it only
            // cannot say that a task succeeded.
            let seen = json.then(|| serde_json::from_slice::<Seen>(m.payload().unwrap_or_default()).ok()).flatten();
            if let Some(seen) = seen.filter(|s| s.status == Status::Succeeded && s.service == self.service) {
                keys.push(key(&seen.task_id));
            }
        }
        Ok((keys, read))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_s_results_partition_is_among_those_matching_its_action_partition() {
        assert_eq!(matching_partitions(3, 8, 8), vec![3]);
        assert_eq!(matching_partitions(3, 8, 16), vec![3, 11]);
        assert_eq!(matching_partitions(5, 8, 4), vec![1]);
        assert_eq!(matching_partitions(2, 3, 5), vec![0, 1, 2, 3, 4]);
        // Exhaustively for small counts, against where the partitioner puts real keys.
        for (a, r) in [(8, 8), (8, 12), (6, 4), (5, 7), (1, 3), (4, 1)] {
            for n in 0..500 {
                let tenant = format!("tenant-{n}");
                let p = partitioner::partition_for_key(tenant.as_bytes(), a);
                let q = partitioner::partition_for_key(tenant.as_bytes(), r);
                assert!(matching_partitions(p, a, r).contains(&q), "{tenant}: actions {a}, results {r}");
            }
        }
    }

    #[test]
    fn the_set_forgets_the_oldest_ids_first_and_never_holds_more_than_its_bound() {
        let mut set = Remembered::new(3);
        for id in 1..=5u128 {
            set.insert(id);
        }
        set.insert(5);
        assert!(!set.contains(1) && !set.contains(2));
        assert!(set.contains(3) && set.contains(4) && set.contains(5));
        assert_eq!((set.ids.len(), set.order.len()), (3, 3));
    }

    #[test]
    fn uuid_task_ids_are_kept_as_themselves_and_others_by_digest() {
        let id = "6f0c6c0e-93b5-5b4b-a53c-2f1f6b7e5d2a";
        assert_eq!(key(id), uuid::Uuid::parse_str(id).unwrap().as_u128());
        assert_ne!(key("task-1"), key("task-2"));
        assert_eq!(key("task-1"), key("task-1"));
    }
}
