//! Fair shares of the executor's call slots: deficit round robin across tenants.
//!
//! A task that has its tenant's own permits waits here for one of the `concurrency` slots of its
//! process. A FIFO semaphore would hand the slots out in arrival order, so a tenant with many
//! tasks waiting (`tenant_concurrency` above 1) would take a slot for each of them ahead of a
//! tenant that has one. Here the waiting tenants form a ring; the tenant at the front gets up to
//! its weight in slots (its *quantum*, `executor.fairness.weights`, default 1) and goes to the
//! back while it still waits. That is deficit round robin with a cost of one per call: while
//! several tenants wait, each gets slots in proportion to its weight; a tenant alone gets every
//! slot (an idle tenant's share goes to the busy ones), and a free slot with nobody waiting is
//! taken at once, so with one active tenant nothing changes. Each grant and release is O(1); a
//! tenant's weight is looked up once per stretch of waiting, not per task.
//!
//! A waiter that gives up (its future is dropped: the executor stops, its partition is revoked)
//! is skipped; a slot sent to a waiter that goes away before taking it comes back when dropped.
//!
//! **Priorities** are a level above tenants: the readers of a service's three action topics
//! (high, normal, low) share one `FairSlots`, and the slots go round robin across the priorities
//! with waiters first, each getting up to its weight (`executor.priorities`, default 6:3:1) per
//! turn, then, within the priority, round robin across its tenants as above. So while all three
//! wait, high gets six slots in ten and low one: high goes first, low never starves, and a
//! priority alone takes every slot. The slots, like the service's rate limits and breaker, are
//! the service's: the priorities share them, they are not multiplied by three.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Arc, Mutex},
};

use tokio::sync::oneshot;

use crate::config::{Priority, PriorityWeights};

/// Tenant weights from `executor.fairness.weights`: exact names, then `*` patterns.
///
/// Patterns only know `*` (any run of characters, possibly empty), which is all tenant naming
/// schemes (`pro-*`, `*-trial`) need; matching them is a few lines, not worth a dependency.
#[derive(Debug, Default, Clone)]
pub(crate) struct Weights {
    exact: HashMap<String, u32>,
    /// (the pattern split at `*`, its literal length, weight), most specific (longest) first.
    patterns: Vec<(Vec<String>, usize, u32)>,
}

impl Weights {
    pub(crate) fn new(config: &BTreeMap<String, u32>) -> Weights {
        let mut w = Weights::default();
        for (pattern, weight) in config {
            if pattern.contains('*') {
                let parts: Vec<String> = pattern.split('*').map(str::to_string).collect();
                let literal = parts.iter().map(String::len).sum();
                w.patterns.push((parts, literal, *weight));
            } else {
                w.exact.insert(pattern.clone(), *weight);
            }
        }
        // Stable: among patterns of one length, the configuration's (sorted) order decides.
        w.patterns.sort_by_key(|p| std::cmp::Reverse(p.1));
        w
    }

    /// The weight of `tenant`: its own, else the longest matching pattern's, else 1.
    pub(crate) fn of(&self, tenant: &str) -> u32 {
        if let Some(w) = self.exact.get(tenant) {
            return *w;
        }
        self.patterns.iter().find(|(parts, _, _)| matches(parts, tenant)).map_or(1, |(_, _, w)| *w)
    }
}

/// Whether `name` matches a pattern split at its `*`s: the first part is a prefix, the last a
/// suffix, the ones between appear in order.
pub(crate) fn matches(parts: &[String], name: &str) -> bool {
    let (Some(first), Some(last)) = (parts.first(), parts.last()) else { return false };
    if parts.len() == 1 {
        return name == first;
    }
    if !name.starts_with(first.as_str()) || name.len() < first.len() + last.len() || !name.ends_with(last.as_str()) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle.as_str()) {
            Some(at) => rest = &rest[at + middle.len()..],
            None => return false,
        }
    }
    true
}

/// The process's call slots, granted by deficit round robin across priorities, then tenants (see
/// the module docs).
pub(crate) struct FairSlots {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    weights: Weights,
}

#[derive(Default)]
struct State {
    free: usize,
    /// Priorities with waiters, each once; the front one is being served.
    classes: VecDeque<Priority>,
    /// Per priority ([`Priority::index`]), its tenants.
    class: [Class; 3],
}

/// The waiting tenants of one priority.
#[derive(Default)]
struct Class {
    /// Tenants with waiters, each once; the front one is being served.
    ring: VecDeque<Arc<str>>,
    waiting: HashMap<Arc<str>, Waiting>,
    /// Slots the priority may still take in its current turn, and its weight.
    deficit: u32,
    weight: u32,
}

struct Waiting {
    waiters: VecDeque<oneshot::Sender<Slot>>,
    /// Slots the tenant may still take in its current turn.
    deficit: u32,
    weight: u32,
}

/// One slot, given back when dropped.
pub(crate) struct Slot {
    inner: Option<Arc<Inner>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            let mut state = inner.state.lock().expect("slots lock");
            state.free += 1;
            dispatch(&inner, &mut state);
        }
    }
}

impl FairSlots {
    /// `slots` shared by every priority and tenant; `weights` of tenants, `priorities` of the
    /// priorities.
    pub(crate) fn new(slots: usize, weights: Weights, priorities: PriorityWeights) -> FairSlots {
        let mut state = State { free: slots, ..Default::default() };
        for p in Priority::ALL {
            state.class[p.index()].weight = priorities.of(p);
        }
        FairSlots { inner: Arc::new(Inner { state: Mutex::new(state), weights }) }
    }

    /// Waits for a slot for a call of `tenant`, of a task of `priority`.
    pub(crate) async fn acquire(&self, priority: Priority, tenant: &str) -> Slot {
        let granted = {
            let mut state = self.inner.state.lock().expect("slots lock");
            if state.free > 0 && state.classes.is_empty() {
                state.free -= 1;
                return Slot { inner: Some(self.inner.clone()) };
            }
            let (tx, rx) = oneshot::channel();
            let state = &mut *state;
            let class = &mut state.class[priority.index()];
            if class.ring.is_empty() {
                state.classes.push_back(priority);
            }
            match class.waiting.get_mut(tenant) {
                Some(w) => w.waiters.push_back(tx),
                None => {
                    let key: Arc<str> = Arc::from(tenant);
                    let weight = self.inner.weights.of(tenant);
                    class.waiting.insert(key.clone(), Waiting { waiters: VecDeque::from([tx]), deficit: 0, weight });
                    class.ring.push_back(key);
                }
            }
            dispatch(&self.inner, state);
            rx
        };
        // The sender is only dropped unsent once this receiver is gone, so this cannot fail.
        granted.await.expect("a waiter's sender is kept until it is sent a slot")
    }
}

/// Hands free slots to waiters, in deficit round robin order: across priorities, then across
/// the tenants of the priority being served.
fn dispatch(inner: &Arc<Inner>, state: &mut State) {
    while state.free > 0 {
        let Some(&priority) = state.classes.front() else { return };
        let class = &mut state.class[priority.index()];
        let Some(key) = class.ring.front().cloned() else {
            // Its last waiter gave up: the priority's turn ends.
            state.classes.pop_front();
            class.deficit = 0;
            continue;
        };
        let w = class.waiting.get_mut(&key).expect("a tenant in the ring is waiting");
        while w.waiters.front().is_some_and(|tx| tx.is_closed()) {
            w.waiters.pop_front();
        }
        let Some(tx) = w.waiters.pop_front() else {
            class.ring.pop_front();
            class.waiting.remove(&key);
            continue;
        };
        if w.deficit == 0 {
            w.deficit = w.weight;
        }
        if class.deficit == 0 {
            class.deficit = class.weight;
        }
        state.free -= 1;
        match tx.send(Slot { inner: Some(inner.clone()) }) {
            Ok(()) => {
                w.deficit -= 1;
                class.deficit -= 1;
            }
            Err(mut slot) => {
                // Gone between the check and the send: not given back through `Drop`, which would
                // take the lock held here.
                slot.inner = None;
                state.free += 1;
            }
        }
        if w.waiters.is_empty() {
            class.ring.pop_front();
            class.waiting.remove(&key);
        } else if w.deficit == 0 {
            class.ring.rotate_left(1);
        }
        if class.ring.is_empty() {
            // Nobody of this priority waits: its turn ends, and an idle priority saves up nothing.
            state.classes.pop_front();
            class.deficit = 0;
        } else if class.deficit == 0 {
            state.classes.rotate_left(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NORMAL: usize = 1;

    fn weights(pairs: &[(&str, u32)]) -> Weights {
        Weights::new(&pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect())
    }

    #[test]
    fn exact_names_win_then_the_longest_pattern() {
        let w = weights(&[("pro-*", 4), ("pro-big-*", 8), ("pro-acme", 2), ("*-trial", 3), ("a*b*c", 5)]);
        assert_eq!(w.of("pro-acme"), 2);
        assert_eq!(w.of("pro-x"), 4);
        assert_eq!(w.of("pro-big-x"), 8);
        assert_eq!(w.of("pro-"), 4, "* matches nothing too");
        assert_eq!(w.of("x-trial"), 3);
        assert_eq!(w.of("axxbyyc"), 5);
        assert_eq!(w.of("acb"), 1, "parts in order");
        assert_eq!(w.of("abc"), 5);
        assert_eq!(w.of("ab"), 1);
        assert_eq!(w.of("free"), 1);
    }

    /// Starts `n` waiters of `tenant`; each yields its tenant once granted.
    fn wait_for(
        slots: &Arc<FairSlots>,
        tenant: &'static str,
        n: usize,
    ) -> Vec<tokio::task::JoinHandle<(&'static str, Slot)>> {
        (0..n)
            .map(|_| {
                let slots = slots.clone();
                tokio::spawn(async move { (tenant, slots.acquire(Priority::Normal, tenant).await) })
            })
            .collect()
    }

    #[tokio::test]
    async fn waiting_tenants_get_slots_in_proportion_to_their_weights() {
        let slots = Arc::new(FairSlots::new(1, weights(&[("heavy", 3)]), PriorityWeights::default()));
        let first = slots.acquire(Priority::Normal, "noisy").await;
        let mut handles = wait_for(&slots, "noisy", 8);
        tokio::task::yield_now().await;
        handles.extend(wait_for(&slots, "heavy", 6));
        handles.extend(wait_for(&slots, "quiet", 2));
        // Let every waiter queue before the first slot comes back.
        while slots.inner.state.lock().unwrap().class[NORMAL].waiting.values().map(|w| w.waiters.len()).sum::<usize>()
            < 16
        {
            tokio::task::yield_now().await;
        }
        drop(first);
        let mut order = Vec::new();
        let mut pending: Vec<_> = handles;
        while !pending.is_empty() {
            let (done, _, rest) = futures::future::select_all(pending).await;
            let (tenant, slot) = done.unwrap();
            order.push(tenant);
            drop(slot);
            pending = rest;
        }
        // One slot at a time: noisy 1, heavy 3, quiet 1 per round, whatever noisy queued first.
        assert_eq!(
            order[..10],
            ["noisy", "heavy", "heavy", "heavy", "quiet", "noisy", "heavy", "heavy", "heavy", "quiet"]
        );
        assert_eq!(order.iter().filter(|t| **t == "noisy").count(), 8);
        assert_eq!(slots.inner.state.lock().unwrap().free, 1);
    }

    #[tokio::test]
    async fn a_tenant_alone_takes_every_slot_and_a_waiter_that_gives_up_is_skipped() {
        let slots = Arc::new(FairSlots::new(3, Weights::default(), PriorityWeights::default()));
        let held: Vec<Slot> = vec![
            slots.acquire(Priority::Normal, "a").await,
            slots.acquire(Priority::Normal, "a").await,
            slots.acquire(Priority::Normal, "a").await,
        ];
        // A waiter that gives up before its turn: its place passes to the next.
        let gave_up = tokio::spawn({
            let slots = slots.clone();
            async move { slots.acquire(Priority::Normal, "b").await }
        });
        let next = wait_for(&slots, "c", 1);
        while slots.inner.state.lock().unwrap().class[NORMAL].ring.len() < 2 {
            tokio::task::yield_now().await;
        }
        gave_up.abort();
        let _ = gave_up.await;
        drop(held);
        let (tenant, slot) = futures::future::join_all(next).await.pop().unwrap().unwrap();
        assert_eq!(tenant, "c");
        drop(slot);
        let state = slots.inner.state.lock().unwrap();
        let normal = &state.class[NORMAL];
        assert_eq!((state.free, normal.ring.len(), normal.waiting.len(), state.classes.len()), (3, 0, 0, 0));
    }

    #[tokio::test]
    async fn priorities_share_the_slots_by_weight_and_low_is_never_starved() {
        let slots = Arc::new(FairSlots::new(1, Weights::default(), PriorityWeights::default()));
        let first = slots.acquire(Priority::Low, "bulk").await;
        let mut handles = Vec::new();
        for (priority, tenant, n) in
            [(Priority::Low, "bulk", 20), (Priority::High, "paid", 14), (Priority::Normal, "n", 5)]
        {
            for _ in 0..n {
                let slots = slots.clone();
                handles.push(tokio::spawn(async move { (priority, slots.acquire(priority, tenant).await) }));
            }
            tokio::task::yield_now().await;
        }
        let queued = |s: &Arc<FairSlots>| {
            let state = s.inner.state.lock().unwrap();
            state.class.iter().flat_map(|c| c.waiting.values()).map(|w| w.waiters.len()).sum::<usize>()
        };
        while queued(&slots) < 39 {
            tokio::task::yield_now().await;
        }
        drop(first);
        let mut order = Vec::new();
        let mut pending = handles;
        while !pending.is_empty() {
            let (done, _, rest) = futures::future::select_all(pending).await;
            let (priority, slot) = done.unwrap();
            order.push(priority);
            drop(slot);
            pending = rest;
        }
        let count = |slice: &[Priority], p| slice.iter().filter(|x| **x == p).count();
        // The first full round while all three wait: 6 high, 3 normal, 1 low, whichever queued first.
        let round = &order[..10];
        assert_eq!(
            [count(round, Priority::High), count(round, Priority::Normal), count(round, Priority::Low)],
            [6, 3, 1],
            "{order:?}"
        );
        // High (14) is done within the first three rounds, and low got a slot in each of them.
        let last_high = order.iter().rposition(|p| *p == Priority::High).unwrap();
        assert!(last_high < 30, "{order:?}");
        assert!(count(&order[..last_high], Priority::Low) >= 2, "{order:?}");
        assert_eq!(count(&order, Priority::Low), 20);
        let state = slots.inner.state.lock().unwrap();
        assert_eq!((state.free, state.classes.len()), (1, 0));
    }
}
