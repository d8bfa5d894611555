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
//! `cost` limits (tokens) are not paced here (a task's cost is known only once it is called); the
//! executor still enforces them.

use std::{collections::HashMap, num::NonZeroU32, time::Duration};

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::{Config, Scope};

struct Service {
    global: Vec<DefaultDirectRateLimiter>,
    tenant: Vec<DefaultKeyedRateLimiter<String>>,
}

pub struct Pacer {
    services: HashMap<String, Service>,
}

/// One permit every `window / (amount × share)`, no burst: evenly spaced.
fn quota(amount: f64, window: Duration) -> Quota {
    let interval = window.div_f64(amount.max(f64::MIN_POSITIVE)).max(Duration::from_micros(1));
    Quota::with_period(interval).expect("interval is positive").allow_burst(NonZeroU32::MIN)
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
    pub fn new(config: &Config) -> Pacer {
        let services = rates(config)
            .into_iter()
            .map(|(name, (global, tenant))| {
                let service = Service {
                    global: global.into_iter().map(|(n, w)| RateLimiter::direct(quota(n, w))).collect(),
                    tenant: tenant.into_iter().map(|(n, w)| RateLimiter::keyed(quota(n, w))).collect(),
                };
                (name, service)
            })
            .collect();
        Pacer { services }
    }

    /// Waits until the replay may send one more task of `tenant` to `service`.
    pub async fn wait(&self, service: &str, tenant: &str) {
        let Some(s) = self.services.get(service) else { return };
        for limiter in &s.tenant {
            limiter.until_key_ready(&tenant.to_string()).await;
        }
        for limiter in &s.global {
            limiter.until_ready().await;
        }
    }
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
        assert_eq!(fifth["ai"], (vec![(90.0, minute)], vec![(4.0, minute)]), "a fifth; cost limits are not paced");
        assert_eq!(fifth["hook"], (vec![(50.0, Duration::from_secs(1))], vec![]));
        config.replay.share = 0.5;
        assert_eq!(rates(&config)["ai"].0, vec![(225.0, minute)]);
        // Evenly spaced: 90 a minute is one every 666 ms, with no burst.
        let q = quota(90.0, minute);
        assert_eq!((q.replenish_interval().as_millis(), q.burst_size().get()), (666, 1));
    }
}
