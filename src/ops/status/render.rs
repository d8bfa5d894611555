//! The table `weir status` prints for people. A stage's main group lists every partition; its
//! overflow and retry-tier groups list only the partitions that lag (their topics are idle most
//! of the time, and a screen of zeros hides what matters).

use std::fmt::Write as _;

use super::{GroupStatus, Status};

/// `95s` → `1m 35s`: an age at a glance.
fn age(secs: f64) -> String {
    let s = secs.round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86_400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

fn ranges(partitions: &[i32]) -> String {
    let mut sorted = partitions.to_vec();
    sorted.sort_unstable();
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i;
        while j + 1 < sorted.len() && sorted[j + 1] == sorted[j] + 1 {
            j += 1;
        }
        out.push(if j > i { format!("{}-{}", sorted[i], sorted[j]) } else { sorted[i].to_string() });
        i = j + 1;
    }
    if out.is_empty() {
        "none".into()
    } else {
        out.join(",")
    }
}

fn group(out: &mut String, g: &GroupStatus, all_partitions: bool) {
    let oldest = g.oldest_unprocessed_age_secs.map(|a| format!(", oldest unprocessed {}", age(a))).unwrap_or_default();
    let _ = writeln!(
        out,
        "  {:<9} group {}  topic {}  {} ({})  {} member{}  lag {}{oldest}",
        g.role,
        g.group,
        g.topic,
        g.state,
        g.protocol.to_lowercase(),
        g.members.len(),
        if g.members.len() == 1 { "" } else { "s" },
        g.lag,
    );
    if let Some(e) = &g.error {
        let _ = writeln!(out, "    error: {e}");
    }
    for m in &g.members {
        let _ = writeln!(
            out,
            "    member {} at {}  partitions {}  ({})",
            m.client_id,
            m.host,
            ranges(&m.partitions),
            m.member_id
        );
    }
    let rows: Vec<_> = g.partitions.iter().filter(|p| all_partitions || p.lag > 0).collect();
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(out, "    {:>9} {:>12} {:>12} {:>10}  oldest unprocessed", "partition", "committed", "end", "lag");
    let now = chrono::Utc::now().timestamp_millis();
    for p in rows {
        let committed = p.committed.map_or("-".to_string(), |c| c.to_string());
        let oldest = p.oldest_unprocessed_ms.map(|t| age((now - t).max(0) as f64 / 1000.0)).unwrap_or_default();
        let _ = writeln!(out, "    {:>9} {:>12} {:>12} {:>10}  {oldest}", p.partition, committed, p.end, p.lag);
    }
}

pub(super) fn table(status: &Status) -> String {
    let mut out = String::new();
    let prefix =
        if status.topic_prefix.is_empty() { String::new() } else { format!(", prefix {}", status.topic_prefix) };
    let _ = writeln!(
        out,
        "weir status at {} (brokers {}{prefix})",
        status.taken_at.format("%Y-%m-%d %H:%M:%S UTC"),
        status.brokers
    );
    for m in &status.metrics {
        match &m.error {
            None => {
                let _ = writeln!(out, "metrics: {}", m.url);
            }
            Some(e) => {
                let _ = writeln!(out, "metrics: {} did not answer: {e}", m.url);
            }
        }
    }
    if status.metrics.is_empty() {
        let _ = writeln!(out, "metrics: none (metrics_addr is null and no --metrics given)");
    }
    for stage in &status.stages {
        let name = match &stage.service {
            Some(service) => format!("{} {service}", stage.stage),
            None => stage.stage.clone(),
        };
        let _ = write!(out, "\n{name}: lag {}", stage.lag);
        if let Some(breaker) = &stage.breaker {
            let _ = write!(out, "  breaker {breaker}");
        }
        if let Some(wait) = &stage.throttle_wait {
            match (wait.calls, wait.seconds, &wait.unknown) {
                (Some(calls), Some(seconds), _) => {
                    let _ = write!(out, "  throttle wait {seconds:.1}s over {calls} calls");
                }
                (_, _, unknown) => {
                    let _ = write!(out, "  throttle wait {}", unknown.as_deref().unwrap_or("unknown"));
                }
            }
        }
        out.push('\n');
        if !stage.tenants.is_empty() {
            let _ = writeln!(
                out,
                "  {:<8} {:<24} {:>6} {:>10} {:>10} {:>10} {:>9} {:>9}",
                "priority", "tenant", "share", "backlog", "calls", "overflowed", "deferred", "throttled"
            );
        }
        for t in &stage.tenants {
            let _ = writeln!(
                out,
                "  {:<8} {:<24} {:>5.1}% {:>10} {:>10} {:>10} {:>9} {:>9}",
                t.priority,
                t.tenant,
                t.share * 100.0,
                t.backlog,
                t.calls,
                t.overflowed,
                t.deferred,
                t.throttled
            );
        }
        for g in &stage.groups {
            group(&mut out, g, g.role == "main");
        }
    }
    let d = &status.dead_letters;
    let _ = write!(out, "\ndead letters: {} written to {}, {} retained", d.written, d.topic, d.retained);
    if let Some(e) = &d.error {
        let _ = write!(out, " (error: {e})");
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_and_partition_ranges_read_at_a_glance() {
        assert_eq!([age(0.4), age(95.0), age(7_260.0), age(90_000.0)], ["0s", "1m 35s", "2h 1m", "1d 1h"]);
        assert_eq!(ranges(&[5, 0, 1, 2, 7, 8]), "0-2,5,7-8");
        assert_eq!(ranges(&[]), "none");
    }
}
