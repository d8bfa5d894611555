//! How fast a replay sends each service's tasks: at most `replay.share` of each of the service's
//! `requests` limits (global, and per tenant for `scope: tenant`), and `replay.unlimited_rate`
//! tasks per second to a service without a global one.
//!
//! The replay puts tasks on the same action topics as live traffic and the same executors call
//! them, under the service's own limits: the provider's limit holds whatever the replay does.
//! Pacing what the replay *adds* is what keeps live traffic's latency: at a fifth of the limit,
//! the replay's tasks never queue up ahead of live ones in the executor's throttle, as a
//! backlog of a hundred thousand re-driven tasks produced at once would.
//!
//! `cost` limits (tokens) are paced the same way on each task's *estimate*, the one the executor
//! charges before the call (the service's connector makes it: for OpenAI, the prompt's length and
//! `max_tokens`, or the configured `cost_estimate`): a replay of LLM steps takes at most its share
//! of the tokens per minute too. What a call really costs is known only after it, and the
//! executor's own cost limit still holds the provider's bound whatever the estimate said.

use std::{collections::HashMap, num::NonZeroU32, sync::Arc, time::Duration};

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::{
    config::{Config, Scope},
    connectors::Connector,
    envelope::ActionTask,
};

struct Service {
    global: Vec<DefaultDirectRateLimiter>,
    tenant: Vec<DefaultKeyedRateLimiter<String>>,
    /// Cost limits, with their burst (the most one wait may take), and what estimates a task.
    cost: Option<Cost>,
}

struct Cost {
    global: Vec<(DefaultDirectRateLimiter, u32)>,
    tenant: Vec<(DefaultKeyedRateLimiter<String>, u32)>,
    estimator: Arc<dyn Connector>,
}

pub struct Pacer {
    services: HashMap<String, Service>,
}

/// One permit every `window / (amount × share)`, no burst: evenly spaced.
fn quota(amount: f64, window: Duration) -> Quota {
    quota_with_burst(amount, window, NonZeroU32::MIN)
}

fn quota_with_burst(amount: f64, window: Duration, burst: NonZeroU32) -> Quota {
    let interval = window.div_f64(amount.max(f64::MIN_POSITIVE)).max(Duration::from_micros(1));
    Quota::with_period(interval).expect("interval is positive").allow_burst(burst)
}

/// A cost limiter's burst: a tenth of its rate per window (at least 1), so that one wait covers a
/// typical task's estimate while the rate stays even; a larger estimate waits in several parts.
fn cost_burst(amount: f64) -> NonZeroU32 {
    NonZeroU32::new((amount / 10.0).ceil().min(f64::from(u32::MAX)) as u32).unwrap_or(NonZeroU32::MIN)
}

/// Per service, the replay's cost rates: (global ones, per-tenant ones), empty without limits.
pub fn cost_rates(config: &Config) -> HashMap<String, (Vec<Rate>, Vec<Rate>)> {
    let share = config.replay.share;
    config
        .services
        .iter()
        .map(|(name, service)| {
            let (mut global, mut tenant) = (Vec::new(), Vec::new());
            for l in service.limits.iter().filter(|l| l.cost.is_some()) {
                let rate = (f64::from(l.amount()) * share, l.per.duration());
                match l.scope {
                    Scope::Global => global.push(rate),
                    Scope::Tenant => tenant.push(rate),
                }
            }
            (name.clone(), (global, tenant))
        })
        .collect()
}

/// Tasks per window.
pub type Rate = (f64, Duration);

/// Per service, the replay's rates: (global ones, per-tenant ones).
pub fn rates(config: &Config) -> HashMap<String, (Vec<Rate>, Vec<Rate>)> {
    let share = config.replay.share;
    config
        .services
        .iter()
        .map(|(name, service)| {
            let requests = service.limits.iter().filter(|l| l.requests.is_some());
            let (mut global, mut tenant) = (Vec::new(), Vec::new());
            for l in requests {
                let rate = (f64::from(l.amount()) * share, l.per.duration());
                match l.scope {
                    Scope::Global => global.push(rate),
                    Scope::Tenant => tenant.push(rate),
                }
            }
            if global.is_empty() {
                global.push((f64::from(config.replay.unlimited_rate), Duration::from_secs(1)));
            }
            (name.clone(), (global, tenant))
        })
        .collect()
}

impl Pacer {
    pub fn new(config: &Config) -> anyhow::Result<Pacer> {
        let mut costs = cost_rates(config);
        let mut services = HashMap::new();
        for (name, (global, tenant)) in rates(config) {
            let cost = match costs.remove(&name) {
                Some((g, t)) if !(g.is_empty() && t.is_empty()) => {
                    let settings = &config.services[&name];
                    let limiter = |(n, w): Rate| (quota_with_burst(n, w, cost_burst(n)), cost_burst(n).get());
                    Some(Cost {
                        global: g.into_iter().map(limiter).map(|(q, b)| (RateLimiter::direct(q), b)).collect(),
                        tenant: t.into_iter().map(limiter).map(|(q, b)| (RateLimiter::keyed(q), b)).collect(),
                        estimator: crate::connectors::build(&name, settings, &config.network)?,
                    })
                }
                _ => None,
            };
            let service = Service {
                global: global.into_iter().map(|(n, w)| RateLimiter::direct(quota(n, w))).collect(),
                tenant: tenant.into_iter().map(|(n, w)| RateLimiter::keyed(quota(n, w))).collect(),
                cost,
            };
            services.insert(name, service);
        }
        Ok(Pacer { services })
    }

    /// Waits until the replay may send `task` (one more call of its tenant to its service, and
    /// its estimated cost).
    pub async fn wait(&self, task: &ActionTask) {
        let Some(s) = self.services.get(&task.service) else { return };
        let tenant = task.tenant.clone();
        for limiter in &s.tenant {
            limiter.until_key_ready(&tenant).await;
        }
        for limiter in &s.global {
            limiter.until_ready().await;
        }
        let Some(cost) = &s.cost else { return };
        let estimate = cost.estimator.estimate_cost(task);
        for (limiter, burst) in &cost.tenant {
            for part in parts(estimate, *burst) {
                // `part` ≤ the burst: never refused for capacity.
                let _ = limiter.until_key_n_ready(&tenant, part).await;
            }
        }
        for (limiter, burst) in &cost.global {
            for part in parts(estimate, *burst) {
                let _ = limiter.until_n_ready(part).await;
            }
        }
    }
}

/// `cost` in waits of at most `burst` each.
fn parts(cost: u64, burst: u32) -> impl Iterator<Item = NonZeroU32> {
    let burst = u64::from(burst.max(1));
    let (whole, rest) = (cost / burst, cost % burst);
    std::iter::repeat_n(burst, whole as usize)
        .chain((rest > 0).then_some(rest))
        .filter_map(|n| NonZeroU32::new(n as u32))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{LimitConfig, Per, ServiceConfig};

    #[test]
    fn a_replay_takes_its_share_of_each_requests_limit_and_a_set_rate_without_one() {
        let mut config = Config::default();
        let limit = |requests: Option<u32>, cost: Option<u32>, per, scope| LimitConfig {
            requests,
            cost,
            per,
            scope,
            burst: None,
        };
        config.services.insert(
            "ai".into(),
            ServiceConfig {
                limits: vec![
                    limit(Some(450), None, Per::Minute, Scope::Global),
                    limit(None, Some(450_000), Per::Minute, Scope::Global),
                    limit(Some(20), None, Per::Minute, Scope::Tenant),
                ],
                ..Default::default()
            },
        );
        config.services.insert("hook".into(), ServiceConfig::default());
        let fifth = rates(&config);
        let minute = Duration::from_secs(60);
        assert_eq!(fifth["ai"], (vec![(90.0, minute)], vec![(4.0, minute)]), "a fifth of the requests");
        assert_eq!(cost_rates(&config)["ai"], (vec![(90_000.0, minute)], vec![]), "and of the tokens");
        assert_eq!(cost_rates(&config)["hook"], (vec![], vec![]));
        // A large estimate waits in parts no larger than the burst; every token is counted.
        let burst = cost_burst(90_000.0).get();
        assert_eq!(burst, 9_000);
        let waits: Vec<u32> = parts(20_000, burst).map(NonZeroU32::get).collect();
        assert_eq!(waits, vec![9_000, 9_000, 2_000]);
        assert_eq!(parts(0, burst).count(), 0);
        assert_eq!(fifth["hook"], (vec![(50.0, Duration::from_secs(1))], vec![]));
        config.replay.share = 0.5;
        assert_eq!(rates(&config)["ai"].0, vec![(225.0, minute)]);
        // Evenly spaced: 90 a minute is one every 666 ms, with no burst.
        let q = quota(90.0, minute);
        assert_eq!((q.replenish_interval().as_millis(), q.burst_size().get()), (666, 1));
    }
}
