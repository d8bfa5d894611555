//! Telling senders to slow down instead of piling work up or dropping it:
//!
//! - *Requests in flight* are bounded (`ingest.max_in_flight`): a permit is taken before the
//!   body is read, so the stage's memory is at most that many bodies (each at most
//!   `ingest.max_body_bytes`) whatever the load; a request finding none gets 503.
//! - *The evaluator's lag*: a watcher reads the evaluate group's lag on the events topic every
//!   `ingest.lag_interval`; above `ingest.max_lag` every request gets 503 with `Retry-After`
//!   until it is back under (the events would only wait in Kafka, and the sender is the one
//!   who can hold them or slow down).
//! - *A tenant over its rate* (`ingest.tenant_rate`, one governor GCRA limiter per tenant):
//!   429 with `Retry-After` saying when its events would be admitted, so one tenant's burst
//!   does not take the others' share.
//! - *The producer's queue* full (`ingest.max_queued`): 503, decided in `ack`.

use std::{
    num::NonZeroU32,
    sync::{
        atomic::{AtomicBool, AtomicI64, Ordering},
        Arc,
    },
    time::Duration,
};

use governor::{clock::Clock as _, DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::refusal::Refusal;
use crate::{config::Config, kafka, telemetry};

pub(super) struct Gate {
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
    lagging: AtomicBool,
    lag: AtomicI64,
    max_lag: Option<i64>,
    limiter: Option<DefaultKeyedRateLimiter<String>>,
    retry_after: Duration,
}

impl Gate {
    pub(super) fn new(config: &Config) -> Gate {
        let ingest = &config.ingest;
        let limiter = ingest.tenant_rate.as_ref().map(|rate| {
            let per_second = NonZeroU32::new(rate.per_second).unwrap_or(NonZeroU32::MIN);
            let burst = rate.burst.and_then(NonZeroU32::new).unwrap_or(per_second);
            RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst))
        });
        Gate {
            in_flight: Arc::new(Semaphore::new(ingest.max_in_flight)),
            max_in_flight: ingest.max_in_flight,
            lagging: AtomicBool::new(false),
            lag: AtomicI64::new(0),
            max_lag: ingest.max_lag,
            limiter,
            retry_after: ingest.retry_after,
        }
    }

    /// A place among the requests in flight, and the evaluator not too far behind.
    pub(super) fn enter(&self) -> Result<OwnedSemaphorePermit, Refusal> {
        if self.lagging.load(Ordering::Relaxed) {
            return Err(Refusal::unavailable(
                format!(
                    "the pipeline is {} events behind (over ingest.max_lag); try again later",
                    self.lag.load(Ordering::Relaxed)
                ),
                self.retry_after,
            ));
        }
        self.in_flight.clone().try_acquire_owned().map_err(|_| {
            Refusal::unavailable(
                format!("{} requests in flight (ingest.max_in_flight); try again later", self.max_in_flight),
                self.retry_after,
            )
        })
    }

    /// Admits `events` events of `tenant` under `ingest.tenant_rate`.
    pub(super) fn admit(&self, tenant: &str, events: usize) -> Result<(), Refusal> {
        let Some(limiter) = &self.limiter else { return Ok(()) };
        let n = NonZeroU32::new(events.min(u32::MAX as usize) as u32).unwrap_or(NonZeroU32::MIN);
        match limiter.check_key_n(&tenant.to_string(), n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(Refusal::too_many(
                "the tenant is over its ingest rate (ingest.tenant_rate)",
                not_until.wait_time_from(governor::clock::DefaultClock::default().now()),
            )),
            Err(_) => Err(Refusal::too_large(format!(
                "{events} events in one request are more than the tenant's burst (ingest.tenant_rate) admits"
            ))),
        }
    }

    /// Reads the evaluator's lag every `lag_interval` until `stop`, switching the 503 on and
    /// off; also lets the rate limiter forget tenants idle long enough to be back at full burst.
    pub(super) async fn watch(self: Arc<Self>, config: Arc<Config>, stop: CancellationToken) {
        let interval = config.ingest.lag_interval;
        let (group, topic) = (config.names().group("evaluate"), config.names().events());
        // Configured with the evaluator's group id, never subscribing: it reads the group's
        // committed offsets without joining it.
        let client = match kafka::consumer_config(&config, &group).create::<rdkafka::consumer::BaseConsumer>() {
            Ok(c) => Arc::new(c),
            Err(e) => {
                tracing::error!("ingest: cannot create the lag reader ({e}); ingest.max_lag is not enforced");
                return;
            }
        };
        loop {
            if let Some(limiter) = &self.limiter {
                limiter.retain_recent();
            }
            if let Some(max) = self.max_lag {
                let (client, group, topic) = (client.clone(), group.clone(), topic.clone());
                let read = tokio::task::spawn_blocking(move || kafka::group_lag(&client, &group, &topic)).await;
                match read {
                    Ok(Ok(lag)) => self.set_lag(lag, max),
                    // The last reading stands: the broker being away shows in acknowledgements.
                    Ok(Err(e)) => tracing::debug!("ingest: reading the evaluator's lag: {e:#}"),
                    Err(e) => tracing::warn!("ingest: the lag reader failed: {e}"),
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }

    fn set_lag(&self, lag: i64, max: i64) {
        self.lag.store(lag, Ordering::Relaxed);
        let over = lag > max;
        if self.lagging.swap(over, Ordering::Relaxed) != over {
            telemetry::Event::IngestBackpressure { lag, max, on: over }.emit();
        }
    }
}
