//! Per-tenant metrics with bounded cardinality: the `top` most backlogged tenants under their own
//! name, every other tenant under `other`.
//!
//! A label per tenant would give Prometheus a series per tenant (thousands, most idle); a tenant
//! worth a look is one with a backlog. So every report (a few seconds apart) ranks the tenants by
//! backlog (tasks in their lane plus tasks out in the overflow topic) and reports the first `top`
//! by name and the sum of the rest as `other`. Counts (tasks overflowed, deferred, throttled) are
//! gathered per tenant between reports and reported under the tenant's class of that report. A
//! tenant that leaves the top is reported once more with a backlog of 0, so its gauge does not
//! keep its last value; its counters keep their totals. The series are therefore those of tenants
//! that were ever among the top of some report (the noisy few), not one per tenant.
//!
//! Each class also gets its **share**: the fraction of the process's call slots the deficit round
//! robin (`fair.rs`) hands it while the backlogs stay as they are, that is the weights of its
//! tenants with a backlog over the weights of every tenant with one. It is what `weir status`
//! shows beside the backlog: a noisy tenant with a backlog of 50,000 and 20 quiet tenants with a
//! few tasks each has a share of 1/21, not 50,000/50,060. No backlog anywhere: every share is 0.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::fair::Weights;

/// What happened to a tenant's tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Counted {
    Overflowed,
    Deferred,
    Throttled,
    /// A call started.
    Called,
}

/// One class's line of a report.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Line {
    pub backlog: usize,
    pub overflowed: u64,
    pub deferred: u64,
    pub throttled: u64,
    pub called: u64,
    /// The class's share of the call slots now (see the module docs), 0 to 1.
    pub share: f64,
}

/// The label of the tenants not among the top.
pub(crate) const OTHER: &str = "other";

#[derive(Debug)]
pub(crate) struct Classes {
    top: usize,
    weights: Weights,
    counts: HashMap<String, [u64; 4]>,
    /// The tenants reported by name last time.
    named: BTreeSet<String>,
}

impl Classes {
    pub(crate) fn new(top: usize, weights: Weights) -> Classes {
        Classes { top, weights, counts: HashMap::new(), named: BTreeSet::new() }
    }

    pub(crate) fn count(&mut self, tenant: &str, what: Counted) {
        let i = what as usize;
        match self.counts.get_mut(tenant) {
            Some(c) => c[i] += 1,
            None => {
                let mut c = [0; 4];
                c[i] = 1;
                self.counts.insert(tenant.to_string(), c);
            }
        }
    }

    /// The report: each class with its line, from `backlogs` (tenant, tasks waiting; a tenant may
    /// appear more than once, its numbers are added) and the counts since the last report.
    pub(crate) fn report<'a>(
        &mut self,
        backlogs: impl IntoIterator<Item = (&'a str, usize)>,
    ) -> BTreeMap<String, Line> {
        let mut by_tenant: HashMap<&str, usize> = HashMap::new();
        for (tenant, n) in backlogs {
            *by_tenant.entry(tenant).or_default() += n;
        }
        let mut ranked: Vec<(&str, usize)> = by_tenant.iter().map(|(t, n)| (*t, *n)).filter(|(_, n)| *n > 0).collect();
        // Largest first; ties by name, so a report does not flap between equals.
        ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let named: BTreeSet<String> = ranked.iter().take(self.top).map(|(t, _)| t.to_string()).collect();
        let class = |tenant: &str| if named.contains(tenant) { tenant.to_string() } else { OTHER.to_string() };
        let mut lines: BTreeMap<String, Line> = BTreeMap::new();
        lines.insert(OTHER.to_string(), Line::default());
        for gone in self.named.difference(&named) {
            lines.insert(gone.clone(), Line::default());
        }
        let total_weight: u64 = ranked.iter().map(|(t, _)| u64::from(self.weights.of(t))).sum();
        for (tenant, n) in &ranked {
            let line = lines.entry(class(tenant)).or_default();
            line.backlog += n;
            line.share += f64::from(self.weights.of(tenant)) / total_weight as f64;
        }
        for (tenant, [overflowed, deferred, throttled, called]) in self.counts.drain() {
            let line = lines.entry(class(&tenant)).or_default();
            line.overflowed += overflowed;
            line.deferred += deferred;
            line.throttled += throttled;
            line.called += called;
        }
        self.named = named;
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_top_tenants_by_backlog_are_named_and_the_rest_are_other() {
        let mut c = Classes::new(2, Weights::default());
        c.count("noisy", Counted::Overflowed);
        c.count("noisy", Counted::Overflowed);
        c.count("quiet-1", Counted::Throttled);
        c.count("quiet-9", Counted::Deferred);
        let report = c.report([("noisy", 900), ("busy", 50), ("quiet-1", 3), ("quiet-9", 1), ("noisy", 100)]);
        assert_eq!(report.keys().collect::<Vec<_>>(), ["busy", "noisy", "other"]);
        assert_eq!(report["noisy"], Line { backlog: 1_000, overflowed: 2, share: 0.25, ..Default::default() });
        assert_eq!(report["other"], Line { backlog: 4, deferred: 1, throttled: 1, share: 0.5, ..Default::default() });
        // Next time busy is idle: reported once at 0, then no more.
        let report = c.report([("noisy", 10), ("quiet-1", 1)]);
        assert_eq!(report.keys().collect::<Vec<_>>(), ["busy", "noisy", "other", "quiet-1"]);
        assert_eq!(report["busy"], Line::default());
        assert_eq!(report["noisy"].overflowed, 0, "counts are since the last report");
        let report = c.report([]);
        assert_eq!(report.keys().collect::<Vec<_>>(), ["noisy", "other", "quiet-1"]);
        assert_eq!(c.report([]).keys().collect::<Vec<_>>(), ["other"]);
    }

    #[test]
    fn a_class_share_is_its_weight_among_the_tenants_with_work_not_its_backlog() {
        let weights = Weights::new(&[("pro-*".to_string(), 4)].into_iter().collect());
        let mut c = Classes::new(1, weights);
        c.count("noisy", Counted::Called);
        c.count("noisy", Counted::Called);
        // Weights 1 (noisy), 4 (pro-a), 1 (quiet) and 0 for the idle one: 6 in all.
        let report = c.report([("noisy", 50_000), ("pro-a", 2), ("quiet", 1), ("idle", 0)]);
        let near = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(near(report["noisy"].share, 1.0 / 6.0), "{report:?}");
        assert_eq!(report["noisy"].called, 2);
        assert!(near(report["other"].share, 5.0 / 6.0), "{report:?}");
        let total: f64 = report.values().map(|l| l.share).sum();
        assert!(near(total, 1.0), "shares add up to the whole: {total}");
        // A lone tenant gets every slot; nobody with work, nobody has a share.
        assert_eq!(c.report([("noisy", 3)])["noisy"].share, 1.0);
        assert!(c.report([]).values().all(|l| l.share == 0.0));
    }
}
