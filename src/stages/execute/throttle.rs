//! A service's rate limits: several at once, requests or weighted cost, global or per tenant,
//! each a governor GCRA limiter.
//!
//! ## What a limit guarantees
//! A limit of N per window with burst b lets through, in *any* window of that length (both ends
//! included), at most N calls or cost units. GCRA with burst b and emission interval T admits
//! b + ⌊W/T⌋ in a window W, so the interval is window ÷ (N − b): the sustained rate is N − b per
//! window, plus the burst: a limit of 50/s with the default burst of 1 runs at 49/s, evenly
//! spaced. A burst of a few calls at high rates lets the limiter catch up after late timer
//! wake-ups, which at burst 1 are capacity lost for good.
//!
//! ## Sharing a global limit between processes
//! There is no shared store: each process takes limit × owned partitions ÷ topic partitions,
//! recomputed on every rebalance ([`Throttle::set_share`]). Tenants are keyed to partitions, so
//! this is exact while the load is spread over partitions and conservative when it is not: a
//! process whose partitions are idle leaves its share unused. A replaced limiter starts with its
//! burst spent, so the hand-over of a rebalance cannot add a burst on top of the calls the old
//! share just made. Tenant limits need no share: a tenant's tasks are all in one partition.
//!
//! ## Weighted cost
//! A call first takes its *estimated* cost from every `cost` limit (at most the burst, the most
//! GCRA can grant at once). After the call the reported usage corrects it: an under-estimate is
//! charged afterwards, which delays the calls that follow. GCRA cannot hand cells back, so an
//! over-estimate is not refunded: estimates should be close, and high rather than low only when
//! a brief overshoot of the service's limit is worse than some unused capacity.
//!
//! Limits are taken one after another, cost limits first: a call may then go out later than the
//! permit of an earlier limit, never earlier.

use std::{
    num::NonZeroU32,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::{
    config::{LimitConfig, Scope},
    telemetry::Event,
};

/// The limits of one service in one process.
pub struct Throttle {
    service: String,
    global: Vec<Global>,
    tenant: Vec<Tenant>,
}

struct Global {
    limit: LimitConfig,
    /// Replaced whole when the share changes.
    limiter: RwLock<Option<Shared>>,
    /// Waiters take turns, first come first served. Without it every waiter sleeps until the
    /// next permit and all wake together to race for it: with hundreds waiting at 1,000/s that
    /// herd costs more CPU than the calls.
    turn: tokio::sync::Mutex<()>,
}

#[derive(Clone)]
struct Shared {
    limiter: Arc<DefaultDirectRateLimiter>,
    burst: u32,
}

struct Tenant {
    limit: LimitConfig,
    limiter: DefaultKeyedRateLimiter<String>,
}

/// GCRA quota for `amount` per `window` with burst `burst` such that no window of that length
/// holds more than `amount` (see the module docs). `amount` may be fractional (a share).
fn quota(amount: f64, window: Duration, burst: u32) -> (Quota, u32) {
    let burst = burst.min(amount.floor() as u32).max(1);
    // At or below the burst the sustained rate cannot give anything up; spacing by the full
    // amount is the closest (a share under one call per window is a documented trade-off).
    let sustained = if amount > burst as f64 { amount - burst as f64 } else { amount };
    let interval = window.div_f64(sustained).max(Duration::from_nanos(1));
    let quota = Quota::with_period(interval).expect("interval is positive");
    (quota.allow_burst(NonZeroU32::new(burst).expect("burst is at least 1")), burst)
}

/// Cells to take for `cost` from a limiter of `burst`: at least 1, at most the burst.
fn cells(cost: u64, burst: u32) -> NonZeroU32 {
    NonZeroU32::new(cost.clamp(1, burst as u64) as u32).expect("at least 1")
}

impl Throttle {
    /// Limits as configured; global ones apply in full until [`set_share`](Self::set_share).
    pub fn new(service: &str, limits: &[LimitConfig]) -> Throttle {
        let mut ordered: Vec<&LimitConfig> = limits.iter().collect();
        ordered.sort_by_key(|l| !l.is_cost());
        let mut throttle = Throttle { service: service.to_string(), global: Vec::new(), tenant: Vec::new() };
        for limit in ordered {
            match limit.scope {
                Scope::Global => throttle.global.push(Global {
                    limit: limit.clone(),
                    limiter: RwLock::new(None),
                    turn: tokio::sync::Mutex::new(()),
                }),
                Scope::Tenant => {
                    let (quota, _) = quota(limit.amount() as f64, limit.per.duration(), limit.burst());
                    throttle.tenant.push(Tenant { limit: limit.clone(), limiter: RateLimiter::keyed(quota) })
                }
            }
        }
        throttle.set_share(1, 1);
        throttle
    }

    pub(crate) fn has_tenant_limits(&self) -> bool {
        !self.tenant.is_empty()
    }

    /// Takes `owned` of `partitions` partitions' share of every global limit. No partitions, no
    /// calls: the limits are left as they are.
    pub(crate) fn set_share(&self, owned: usize, partitions: usize) {
        if owned == 0 || partitions == 0 {
            return;
        }
        let share = owned.min(partitions) as f64 / partitions as f64;
        for g in &self.global {
            let (quota, burst) = quota(g.limit.amount() as f64 * share, g.limit.per.duration(), g.limit.burst());
            let limiter = Arc::new(RateLimiter::direct(quota));
            let _ = limiter.check_n(NonZeroU32::new(burst).expect("burst is at least 1"));
            *g.limiter.write().expect("limiter lock") = Some(Shared { limiter, burst });
        }
    }

    /// Waits for `tenant`'s own limits. Call it before taking a concurrency slot: a tenant
    /// waiting for itself must not hold what other tenants need.
    pub(crate) async fn wait_tenant(&self, tenant: &str, cost: u64) {
        if self.tenant.is_empty() {
            return;
        }
        let started = Instant::now();
        let key = tenant.to_string();
        for t in &self.tenant {
            let n = if t.limit.is_cost() { cost } else { 1 };
            let _ = t.limiter.until_key_n_ready(&key, cells(n, t.limit.burst())).await;
        }
        Event::Throttled { service: &self.service, scope: "tenant", waited: started.elapsed() }.emit();
    }

    /// How long `tenant` would wait now for one call, without taking anything: to decide whether
    /// to hold its tasks or defer them.
    pub(crate) fn tenant_backlog_delay(&self, queued: usize) -> Duration {
        self.tenant
            .iter()
            .filter(|t| !t.limit.is_cost())
            .map(|t| t.limit.per.duration().mul_f64(queued as f64 / t.limit.amount() as f64))
            .max()
            .unwrap_or_default()
    }

    /// Waits for the global limits (this process's share of them).
    pub(crate) async fn wait_global(&self, cost: u64) {
        if self.global.is_empty() {
            return;
        }
        let started = Instant::now();
        for g in &self.global {
            let _turn = g.turn.lock().await;
            // Read after the turn came: the share may have changed while queued.
            let Some(shared) = g.limiter.read().expect("limiter lock").clone() else { continue };
            let n = if g.limit.is_cost() { cost } else { 1 };
            let _ = shared.limiter.until_n_ready(cells(n, shared.burst)).await;
        }
        Event::Throttled { service: &self.service, scope: "global", waited: started.elapsed() }.emit();
    }

    /// Charges what a call cost beyond what was taken before it (`taken`, the estimate clamped
    /// as [`wait_global`](Self::wait_global) clamped it, per limit); see the module docs.
    pub(crate) async fn charge_extra(&self, tenant: &str, estimated: u64, reported: u64) {
        let key = tenant.to_string();
        for t in self.tenant.iter().filter(|t| t.limit.is_cost()) {
            let burst = t.limit.burst();
            let mut extra = reported.saturating_sub(estimated.clamp(1, burst as u64));
            while extra > 0 {
                let n = cells(extra, burst);
                let _ = t.limiter.until_key_n_ready(&key, n).await;
                extra -= n.get() as u64;
            }
        }
        for g in self.global.iter().filter(|g| g.limit.is_cost()) {
            let Some(shared) = g.limiter.read().expect("limiter lock").clone() else { continue };
            let mut extra = reported.saturating_sub(estimated.clamp(1, shared.burst as u64));
            while extra > 0 {
                let n = cells(extra, shared.burst);
                let _ = shared.limiter.until_n_ready(n).await;
                extra -= n.get() as u64;
            }
        }
    }

    /// Drops the state of tenants idle long enough to be back at a full burst.
    pub(crate) fn forget_idle_tenants(&self) {
        for t in &self.tenant {
            t.limiter.retain_recent();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Per;

    fn limit(requests: u32, burst: Option<u32>) -> LimitConfig {
        LimitConfig { requests: Some(requests), cost: None, per: Per::Second, scope: Scope::Global, burst }
    }

    /// Admission times (from the start) of a limiter asked as often as it allows over `span`,
    /// on a fake clock moved exactly to each next permit.
    fn admissions(quota: Quota, span: Duration) -> Vec<Duration> {
        use governor::clock::Clock;
        let clock = governor::clock::FakeRelativeClock::default();
        let limiter = RateLimiter::direct_with_clock(quota, clock.clone());
        let mut at = Duration::ZERO;
        let mut out = Vec::new();
        while at <= span {
            match limiter.check() {
                Ok(()) => out.push(at),
                Err(not_until) => {
                    let wait = not_until.wait_time_from(clock.now()).max(Duration::from_nanos(1));
                    clock.advance(wait);
                    at += wait;
                }
            }
        }
        out
    }

    #[test]
    fn no_closed_window_holds_more_than_the_limit() {
        for (amount, burst) in [(50.0, 1), (50.0, 10), (1_000.0, 1), (25.0, 1), (12.5, 1)] {
            let (q, _) = quota(amount, Duration::from_secs(1), burst);
            let times = admissions(q, Duration::from_secs(5));
            let most = times
                .iter()
                .map(|start| times.iter().filter(|t| **t >= *start && **t <= *start + Duration::from_secs(1)).count())
                .max()
                .unwrap();
            assert!(most as f64 <= amount.floor(), "{amount}/s burst {burst}: {most} in a window");
            // And it is not far below: the sustained rate is the limit minus the burst.
            assert!(times.len() as f64 >= (amount - burst as f64) * 5.0, "{amount}/s: {}", times.len());
        }
    }

    #[test]
    fn costs_are_clamped_to_the_burst() {
        assert_eq!(cells(0, 10).get(), 1);
        assert_eq!(cells(7, 10).get(), 7);
        assert_eq!(cells(70, 10).get(), 10);
    }

    #[tokio::test]
    async fn share_is_taken_and_starts_with_the_burst_spent() {
        let t = Throttle::new("s", &[limit(100, Some(10))]);
        t.set_share(1, 4);
        let shared = t.global[0].limiter.read().unwrap().clone().unwrap();
        assert_eq!(shared.burst, 10);
        assert!(shared.limiter.check().is_err(), "a new share starts with its burst spent");
        assert!(!t.has_tenant_limits());
        assert_eq!(t.tenant_backlog_delay(10), Duration::ZERO);
    }

    #[test]
    fn tenant_backlog_delay_follows_the_tightest_request_limit() {
        let mut per_tenant = limit(20, None);
        per_tenant.scope = Scope::Tenant;
        let t = Throttle::new("s", &[per_tenant, limit(100, None)]);
        assert!(t.has_tenant_limits());
        assert_eq!(t.tenant_backlog_delay(40), Duration::from_secs(2));
    }
}
