//! A circuit breaker per service and process.
//!
//! Closed, it counts recent calls; when at least `min_calls` in the window include a failure
//! share of `failure_ratio` or more, it opens. Open, nobody calls: tasks wait (they neither fail
//! nor use up attempts, since the service, not the task, is the problem) until `open` has
//! passed; then it is half-open and lets `half_open_probes` calls through. A probe that succeeds
//! closes it, one that fails opens it again. Only retryable failures count: a 4xx says the task
//! was wrong, not that the service is down.

use std::{collections::VecDeque, sync::Mutex, time::Instant};

use tokio::sync::Notify;

use crate::{config::BreakerConfig, telemetry::Event};

pub struct Breaker {
    service: String,
    config: BreakerConfig,
    state: Mutex<State>,
    changed: Notify,
}

struct State {
    phase: Phase,
    /// Closed: (time, failed) of recent calls.
    window: VecDeque<(Instant, bool)>,
    /// Failed calls in `window`, kept up to date so a call costs O(1), not O(window).
    failures: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen { probes: u32 },
}

/// Leave to call, to be handed back to [`Breaker::record`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Normal,
    Probe,
}

/// How a call went, for the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Succeeded,
    Failed,
    /// Says nothing about the service (a permanent failure, or no call made).
    Neutral,
}

impl Breaker {
    pub fn new(service: &str, config: BreakerConfig) -> Breaker {
        Breaker {
            service: service.to_string(),
            config,
            state: Mutex::new(State { phase: Phase::Closed, window: VecDeque::new(), failures: 0 }),
            changed: Notify::new(),
        }
    }

    /// Waits until a call may be made.
    pub async fn admit(&self) -> Admission {
        if !self.config.enabled {
            return Admission::Normal;
        }
        loop {
            // Registered before looking at the state, so a change in between is not missed.
            let changed = self.changed.notified();
            let wait = {
                let mut state = self.state.lock().expect("breaker lock");
                match state.phase {
                    Phase::Closed => return Admission::Normal,
                    Phase::Open { until } if Instant::now() >= until => {
                        state.phase = Phase::HalfOpen { probes: 1 };
                        Event::Breaker { service: &self.service, state: "half-open" }.emit();
                        return Admission::Probe;
                    }
                    Phase::Open { until } => until - Instant::now(),
                    Phase::HalfOpen { probes } if probes < self.config.half_open_probes => {
                        state.phase = Phase::HalfOpen { probes: probes + 1 };
                        return Admission::Probe;
                    }
                    // A probe is out; its verdict decides. The timeout only guards against a
                    // probe whose verdict never comes back.
                    Phase::HalfOpen { .. } => self.config.open,
                }
            };
            let _ = tokio::time::timeout(wait, changed).await;
        }
    }

    pub fn record(&self, admission: Admission, verdict: Verdict) {
        if !self.config.enabled {
            return;
        }
        let now = Instant::now();
        let mut state = self.state.lock().expect("breaker lock");
        match (admission, state.phase, verdict) {
            (Admission::Probe, Phase::HalfOpen { .. }, Verdict::Succeeded) => {
                state.phase = Phase::Closed;
                state.window.clear();
                state.failures = 0;
                Event::Breaker { service: &self.service, state: "closed" }.emit();
            }
            (Admission::Probe, Phase::HalfOpen { .. }, Verdict::Failed) => self.open(&mut state, now),
            (Admission::Probe, Phase::HalfOpen { probes }, Verdict::Neutral) => {
                state.phase = Phase::HalfOpen { probes: probes.saturating_sub(1) };
            }
            (Admission::Normal, Phase::Closed, Verdict::Succeeded | Verdict::Failed) => {
                let failed = verdict == Verdict::Failed;
                state.window.push_back((now, failed));
                state.failures += usize::from(failed);
                let horizon = self.config.window;
                while let Some((_, f)) = state.window.front().copied().filter(|(t, _)| now - *t > horizon) {
                    state.window.pop_front();
                    state.failures -= usize::from(f);
                }
                let (calls, failed) = (state.window.len(), state.failures);
                if calls >= self.config.min_calls as usize && failed as f64 >= self.config.failure_ratio * calls as f64
                {
                    self.open(&mut state, now);
                }
            }
            // Calls admitted before the breaker changed state report into a phase they no
            // longer belong to; they are ignored.
            _ => return,
        }
        drop(state);
        self.changed.notify_waiters();
    }

    fn open(&self, state: &mut State, now: Instant) {
        state.phase = Phase::Open { until: now + self.config.open };
        state.window.clear();
        state.failures = 0;
        Event::Breaker { service: &self.service, state: "open" }.emit();
    }

    pub fn is_closed(&self) -> bool {
        self.state.lock().expect("breaker lock").phase == Phase::Closed
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn breaker(open_ms: u64) -> Breaker {
        Breaker::new(
            "s",
            BreakerConfig {
                enabled: true,
                failure_ratio: 0.5,
                window: Duration::from_secs(60),
                min_calls: 4,
                open: Duration::from_millis(open_ms),
                half_open_probes: 1,
            },
        )
    }

    #[tokio::test]
    async fn opens_on_the_ratio_waits_then_a_probe_closes_it() {
        let b = std::sync::Arc::new(breaker(50));
        for verdict in [Verdict::Succeeded, Verdict::Failed, Verdict::Neutral, Verdict::Succeeded] {
            b.record(b.admit().await, verdict);
        }
        assert!(b.is_closed(), "3 counted calls are below min_calls");
        b.record(Admission::Normal, Verdict::Failed);
        assert!(!b.is_closed(), "2 of 4 failed");
        // While open callers wait; the first one after open_ms is the probe.
        let probe = b.admit().await;
        assert_eq!(probe, Admission::Probe);
        let waiter = tokio::spawn({
            let b = b.clone();
            async move { b.admit().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "a second caller waits for the probe's verdict");
        b.record(probe, Verdict::Succeeded);
        assert_eq!(waiter.await.unwrap(), Admission::Normal);
        assert!(b.is_closed());
    }

    #[tokio::test]
    async fn a_failed_probe_opens_it_again() {
        let b = breaker(30);
        for _ in 0..4 {
            b.record(Admission::Normal, Verdict::Failed);
        }
        let probe = b.admit().await;
        b.record(probe, Verdict::Failed);
        assert!(!b.is_closed());
        // Late reports of calls admitted before it opened change nothing.
        b.record(Admission::Normal, Verdict::Succeeded);
        assert!(!b.is_closed());
        let probe = b.admit().await;
        assert_eq!(probe, Admission::Probe);
        b.record(probe, Verdict::Succeeded);
        assert!(b.is_closed());
    }
}
