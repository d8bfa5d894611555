//! The noisy scenarios' report (`ScenarioReport::noisy`): what `bench.json` holds and the table
//! prints. Kept apart from the scenario that fills it, so that the report knows no scenario.

use hdrhistogram::Histogram;
use serde::Serialize;

use super::measure::Latency;

/// The whole report of the scenario (`ScenarioReport::noisy`).
#[derive(Debug, Clone, Serialize)]
pub struct NoisyReport {
    pub burst: bool,
    /// How the noisy tenant sent, in words.
    pub noisy_load: String,
    pub noisy_tenant: String,
    /// Mean events per second offered by the noisy tenant, and by each quiet tenant.
    pub noisy_rate_per_s: f64,
    pub quiet_rate_per_tenant_per_s: f64,
    pub receiver_latency_ms: u64,
    /// Partitions of the events topic (the action topic's are the same by default).
    pub partitions: i32,
    pub noisy_partition: i32,
    /// Longest wait for uncalled quiet events after the load stopped, per phase.
    pub drain_limit_s: f64,
    pub uncontended: Phase,
    pub contended: Phase,
    /// Quiet tenants on the noisy tenant's partition, and on the others.
    pub same_partition: Group,
    pub other_partitions: Group,
    pub quiet_tenants: Vec<QuietTenant>,
    pub one_active_tenant: OneTenant,
}

/// One phase's totals.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Phase {
    pub window_s: f64,
    /// Quiet events produced in the window, called by the window's end and by the phase's end
    /// (after the drain), and their shares.
    pub quiet_produced: u64,
    pub quiet_called_in_window: u64,
    pub quiet_called: u64,
    pub quiet_called_share_in_window: f64,
    pub quiet_called_share: f64,
    /// Over every quiet event produced in the window (see [`TenantPhase`]).
    pub quiet_latency: TenantPhase,
    pub noisy_produced: u64,
    /// The noisy tenant's events called in the window, per second of window.
    pub noisy_calls_per_s: f64,
    /// Every tenant's events called in the window, per second.
    pub total_calls_per_s: f64,
    /// How long the phase waited after the load stopped, and whether every quiet event had
    /// been called by then.
    pub drain_s: f64,
    pub drained: bool,
    /// The stages stopped within the scenario's stop limit (30 s).
    pub stopped_cleanly: bool,
    /// Where the called quiet events' time went.
    pub quiet_split: Split,
}

/// The called quiet events' latency in two legs (see `noisy::split`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Split {
    /// Called events whose task's `created_at` was read.
    pub events: u64,
    /// Event produced → its task made by the evaluator.
    pub to_task: Leg,
    /// Task made → its call arriving at the receiver.
    pub task_to_call: Leg,
}

/// Quantiles of one leg, over the called events (ms).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Leg {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// One tenant in one phase: events produced in the window and called by the phase's end.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TenantPhase {
    pub produced: u64,
    pub called: u64,
    pub called_share: f64,
    /// The latency within which this share of the *produced* events were called (ms); `null`
    /// when fewer than that share were called at all.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Slowest call seen (ms).
    pub max_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct QuietTenant {
    pub tenant: String,
    pub partition: i32,
    pub shares_noisy_partition: bool,
    pub uncontended: TenantPhase,
    pub contended: TenantPhase,
    /// Contended p99 over uncontended p99; `null` when either is not reached.
    pub p99_ratio: Option<f64>,
}

/// Quiet tenants of one side of the partition split.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Group {
    pub tenants: usize,
    pub contended_produced: u64,
    pub contended_called: u64,
    pub contended_called_share: f64,
    /// Over the group's events together.
    pub uncontended: TenantPhase,
    pub contended: TenantPhase,
    /// The worst tenant's p99 ratio; `null` when some tenant's contended p99 is not reached.
    pub worst_p99_ratio: Option<f64>,
}

/// The third phase: the pipeline scenario with one tenant, flat out.
#[derive(Debug, Clone, Serialize)]
pub struct OneTenant {
    pub events_per_s: f64,
    pub events: u64,
    pub latency_ms: Latency,
    /// What it is and what to compare it with.
    pub note: &'static str,
}

impl TenantPhase {
    /// `latency` holds the called events (µs); `produced` counts the called and the uncalled.
    pub(crate) fn of(latency: &Histogram<u64>, produced: u64) -> TenantPhase {
        let called = latency.len();
        // The q-quantile over the produced events is within the called ones only if at least
        // ceil(q × produced) of them were called.
        let over_produced = |q: f64| {
            let rank = (q * produced as f64).ceil().max(1.0);
            (produced > 0 && called as f64 >= rank)
                .then(|| latency.value_at_quantile(rank / called as f64) as f64 / 1e3)
        };
        TenantPhase {
            produced,
            called,
            called_share: if produced == 0 { 0.0 } else { called as f64 / produced as f64 },
            p50_ms: over_produced(0.5),
            p99_ms: over_produced(0.99),
            max_ms: latency.max() as f64 / 1e3,
        }
    }
}

impl NoisyReport {
    /// The scenario's part of the table on stdout.
    pub fn table(&self) -> String {
        // A p99 that 99 % of the produced events did not reach within the phase.
        let ms = |v: Option<f64>| v.map_or("not reached".to_string(), |v| format!("{v:.1} ms"));
        let ratio = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}x"));
        let mut t = format!(
            "  noisy tenant {:?} (partition {} of {}): {}; {} quiet tenants at {:.1}/s each; receiver {} ms\n",
            self.noisy_tenant,
            self.noisy_partition,
            self.partitions,
            self.noisy_load,
            self.quiet_tenants.len(),
            self.quiet_rate_per_tenant_per_s,
            self.receiver_latency_ms
        );
        for (label, p) in [("uncontended", &self.uncontended), ("contended", &self.contended)] {
            t += &format!(
                "  {label:<11}: quiet called {:.1} % in the window, {:.1} % by +{:.0} s ({} of {}); quiet p99 {}; \
                 noisy {:.1} calls/s; all {:.1} calls/s{}\n",
                p.quiet_called_share_in_window * 100.0,
                p.quiet_called_share * 100.0,
                p.drain_s,
                p.quiet_called,
                p.quiet_produced,
                ms(p.quiet_latency.p99_ms),
                p.noisy_calls_per_s,
                p.total_calls_per_s,
                if p.stopped_cleanly { "" } else { "; stages did not stop in time" },
            );
            let (a, b) = (&p.quiet_split.to_task, &p.quiet_split.task_to_call);
            t += &format!(
                "  {:<11}  quiet legs, p50 / p99 / max: event → task {:.1} / {:.1} / {:.1} ms, task → call {:.1} / {:.1} / {:.1} ms\n",
                "", a.p50_ms, a.p99_ms, a.max_ms, b.p50_ms, b.p99_ms, b.max_ms
            );
        }
        for (label, g) in [("same partition", &self.same_partition), ("other partitions", &self.other_partitions)] {
            t += &format!(
                "  {label:<16}: {} tenants, p99 {} → {}, called {:.1} %, worst tenant {}\n",
                g.tenants,
                ms(g.uncontended.p99_ms),
                ms(g.contended.p99_ms),
                g.contended_called_share * 100.0,
                ratio(g.worst_p99_ratio),
            );
        }
        t += &format!(
            "  {:<12} {:>9} {:>14} {:>14} {:>8} {:>10}\n",
            "quiet tenant", "partition", "p99 alone", "p99 noisy", "ratio", "called"
        );
        for q in &self.quiet_tenants {
            t += &format!(
                "  {:<12} {:>8}{} {:>14} {:>14} {:>8} {:>9.1}%\n",
                q.tenant,
                q.partition,
                if q.shares_noisy_partition { "*" } else { " " },
                ms(q.uncontended.p99_ms),
                ms(q.contended.p99_ms),
                ratio(q.p99_ratio),
                q.contended.called_share * 100.0
            );
        }
        t += &format!(
            "  one active tenant (pipeline, flat out): {:.0} events/s, p99 {:.1} ms\n",
            self.one_active_tenant.events_per_s, self.one_active_tenant.latency_ms.p99
        );
        t
    }
}
