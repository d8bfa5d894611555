//! The memory calls in flight may hold: a service's equal share of `executor.max_in_flight_bytes`
//! ([`ExecutorConfig::memory_share`](crate::config::ExecutorConfig::memory_share)), so that one
//! slow service's calls never take the room another service's calls need.
//!
//! A call holds its task (the record, and the request rendered from it) and, once the service
//! answers, up to `max_response_bytes` of the answer, until its outcome is durable. Counting
//! calls alone (`concurrency`) cannot bound that: a thousand calls of small webhooks hold a few
//! megabytes, a hundred LLM completions may hold a hundred. So before a call starts it reserves
//! what it may come to hold, `task bytes + max_response_bytes + CALL_OVERHEAD`, and waits while
//! the budget has no room; the reservation is returned when the call's outcome is durable (or
//! the call is given up). Reserving the answer's bound up front, rather than growing the
//! reservation as the body streams in, is what keeps this deadlock-free: a call that started
//! never waits for memory again, so calls in flight always finish and give their room back.
//!
//! Waiting is first come, first served (a tokio semaphore): a call reaches it after the fair
//! share of slots ([`fair`](super::fair)), so tenants are already interleaved. Validation at
//! load makes sure one call of each service fits (`Config::validate`).

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::telemetry::Event;

/// What a call holds beyond its task and its answer: the request's headers, the HTTP client's
/// buffers, the future's state. An estimate, on the high side.
pub(crate) const CALL_OVERHEAD: usize = 16 << 10;

/// The semaphore counts KiB: a reservation is at most `u32::MAX` permits, which in bytes would
/// cap one call at 4 GiB but the whole budget at 4 GiB too; in KiB neither can be reached.
const UNIT: usize = 1 << 10;

/// The budget of one service's executor; cheap to clone.
#[derive(Clone, Debug)]
pub struct CallMemory {
    /// The service whose calls these are, for the metrics.
    service: Arc<str>,
    permits: Arc<Semaphore>,
    /// Bytes reserved now, for the gauge.
    reserved: Arc<AtomicUsize>,
    budget: usize,
}

/// Room reserved for one call; given back when dropped.
#[derive(Debug)]
pub(crate) struct Reservation {
    _permit: OwnedSemaphorePermit,
    bytes: usize,
    reserved: Arc<AtomicUsize>,
    service: Arc<str>,
}

impl CallMemory {
    /// A budget of `bytes` (rounded up to whole KiB) for the calls of `service`.
    pub fn new(service: &str, bytes: usize) -> CallMemory {
        let units = bytes.div_ceil(UNIT).max(1);
        CallMemory {
            service: service.into(),
            permits: Arc::new(Semaphore::new(units)),
            reserved: Arc::default(),
            budget: units * UNIT,
        }
    }

    /// What a call of a task of `task_bytes` to a service reading answers of up to
    /// `response_limit` bytes reserves.
    pub(crate) fn call_bytes(task_bytes: usize, response_limit: usize) -> usize {
        task_bytes + response_limit + CALL_OVERHEAD
    }

    /// Waits for room for `bytes` (at most the whole budget: validation at load sees to it that
    /// every service's calls fit; a bigger ask takes the whole budget rather than wait forever).
    pub(crate) async fn reserve(&self, bytes: usize) -> Reservation {
        let units = bytes.div_ceil(UNIT).clamp(1, self.budget / UNIT);
        let units = u32::try_from(units).unwrap_or(u32::MAX);
        let permit = match self.permits.clone().try_acquire_many_owned(units) {
            Ok(permit) => permit,
            Err(_) => {
                Event::CallMemoryFull { service: &self.service, budget: self.budget }.emit();
                // The semaphore is never closed, so acquiring only fails if it were.
                self.permits.clone().acquire_many_owned(units).await.expect("the call memory semaphore is never closed")
            }
        };
        let bytes = units as usize * UNIT;
        let now = self.reserved.fetch_add(bytes, Ordering::Relaxed) + bytes;
        Event::CallMemory { service: &self.service, reserved: now }.emit();
        Reservation { _permit: permit, bytes, reserved: self.reserved.clone(), service: self.service.clone() }
    }

    /// Bytes reserved by calls now.
    pub fn reserved(&self) -> usize {
        self.reserved.load(Ordering::Relaxed)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let now = self.reserved.fetch_sub(self.bytes, Ordering::Relaxed) - self.bytes;
        Event::CallMemory { service: &self.service, reserved: now }.emit();
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt as _;

    use super::*;

    #[tokio::test]
    async fn calls_wait_for_room_and_get_it_back_when_done() {
        let memory = CallMemory::new("s", 100 * UNIT);
        let a = memory.reserve(60 * UNIT).await;
        let b = memory.reserve(30 * UNIT).await;
        assert_eq!(memory.reserved(), 90 * UNIT);
        // 20 KiB does not fit beside 90: the third call waits until one of the others is done.
        assert!(memory.reserve(20 * UNIT).now_or_never().is_none(), "a call started without room for it");
        let waiting = tokio::spawn({
            let memory = memory.clone();
            async move { memory.reserve(20 * UNIT).await }
        });
        drop(b);
        let c = waiting.await.unwrap();
        assert_eq!(memory.reserved(), 80 * UNIT);
        drop((a, c));
        assert_eq!(memory.reserved(), 0);
    }

    #[tokio::test]
    async fn sizes_round_up_to_whole_kib_and_an_oversized_ask_takes_the_whole_budget() {
        let memory = CallMemory::new("s", 10 * UNIT);
        let one = memory.reserve(1).await;
        assert_eq!(memory.reserved(), UNIT);
        drop(one);
        let all = memory.reserve(1 << 30).await;
        assert_eq!(memory.reserved(), 10 * UNIT);
        drop(all);
        assert_eq!(CallMemory::call_bytes(1000, 65536), 1000 + 65536 + CALL_OVERHEAD);
    }
}
