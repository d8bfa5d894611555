//! `type: noop`: makes no call and succeeds at once, so a benchmark measures the executor (and
//! its throttles) rather than an HTTP server.

use futures::future::BoxFuture;

pub use super::NoopConfig;
use super::{CallOutcome, Connector};
use crate::envelope::ActionTask;

pub struct Noop;

impl Connector for Noop {
    fn estimate_cost(&self, _task: &ActionTask) -> u64 {
        1
    }

    fn call<'a>(&'a self, _task: &'a ActionTask) -> BoxFuture<'a, CallOutcome> {
        Box::pin(std::future::ready(CallOutcome::Succeeded { http_status: None, output: None, cost: None }))
    }
}
