//! What only a running process knows (its breakers, how long its calls waited for permits), read
//! from its `/metrics` endpoint in Prometheus' text format. Only the few series `weir status`
//! shows are kept; the parser reads `name{label="value",…} number` lines and skips anything else.

use std::collections::BTreeMap;

use super::{MetricsSource, TenantShare, ThrottleWait, METRICS_TIMEOUT};
use crate::config::Config;

/// One sample: its labels and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Samples by metric name, for the names `weir status` reads.
pub type Samples = BTreeMap<String, Vec<Sample>>;

/// The series read (the rest of an exposition is skipped).
const WANTED: [&str; 11] = [
    "weir_breaker_state",
    "weir_breaker_open",
    "weir_throttle_wait_seconds_sum",
    "weir_throttle_wait_seconds_count",
    "weir_consumer_lag",
    "weir_tenant_backlog",
    "weir_tenant_share",
    "weir_tenant_calls_total",
    "weir_tenant_overflowed_total",
    "weir_tenant_deferred_total",
    "weir_tenant_throttled_total",
];

/// Parses a Prometheus text exposition, keeping the samples of `wanted` names. Lines it cannot
/// read are skipped: one odd line must not hide the rest.
pub fn parse(text: &str, wanted: &[&str]) -> Samples {
    let mut samples = Samples::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let name_end = line.find(|c: char| c == '{' || c.is_whitespace()).unwrap_or(line.len());
        let name = &line[..name_end];
        if !wanted.contains(&name) {
            continue;
        }
        let Some((labels, rest)) = labels(&line[name_end..]) else { continue };
        // The value, then an optional timestamp.
        let Some(Ok(value)) = rest.split_whitespace().next().map(str::parse::<f64>) else { continue };
        samples.entry(name.to_string()).or_default().push(Sample { labels, value });
    }
    samples
}

/// `{a="x",b="y"} rest` → the labels and `rest`; no braces → no labels.
fn labels(text: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    let Some(mut s) = text.strip_prefix('{') else { return Some((labels, text)) };
    loop {
        s = s.trim_start_matches([' ', ',']);
        if let Some(rest) = s.strip_prefix('}') {
            return Some((labels, rest));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim().to_string();
        s = s[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (_, c) => value.push(c),
            }
        };
        labels.insert(key, value);
        s = &s[end + 1..];
    }
}

/// What the endpoints answered.
#[derive(Debug, Default)]
pub struct Scraped {
    /// Per URL: its samples, or why it did not answer.
    pub endpoints: Vec<(String, Result<Samples, String>)>,
}

/// Largest exposition read: a weir process's is tens of kilobytes (its series are bounded).
const MAX_BODY: usize = 16 << 20;

/// Asks every URL at once, each within [`METRICS_TIMEOUT`].
pub async fn scrape_all(urls: &[String]) -> Scraped {
    let client = match reqwest::Client::builder().timeout(METRICS_TIMEOUT).build() {
        Ok(client) => client,
        Err(e) => {
            let error = format!("creating an HTTP client: {e}");
            return Scraped { endpoints: urls.iter().map(|u| (u.clone(), Err(error.clone()))).collect() };
        }
    };
    let endpoints = futures::future::join_all(urls.iter().map(|url| {
        let client = &client;
        async move {
            let answer = async {
                let mut response = client.get(url).send().await.map_err(|e| e.to_string())?;
                if !response.status().is_success() {
                    return Err(format!("answered {}", response.status()));
                }
                // Read at most MAX_BODY: a URL that is not a weir endpoint must not fill memory.
                let mut body = Vec::new();
                while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
                    if body.len() + chunk.len() > MAX_BODY {
                        return Err(format!("answered more than {MAX_BODY} bytes: not a weir metrics endpoint?"));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(parse(&String::from_utf8_lossy(&body), &WANTED))
            };
            (url.clone(), answer.await)
        }
    }))
    .await;
    Scraped { endpoints }
}

fn with<'a>(samples: &'a Samples, name: &str, label: &str, value: &str) -> impl Iterator<Item = &'a Sample> {
    let (label, value) = (label.to_string(), value.to_string());
    samples.get(name).into_iter().flatten().filter(move |s| s.labels.get(&label) == Some(&value))
}

/// How bad a breaker state is: the worst over processes is shown.
fn severity(state: &str) -> u8 {
    match state {
        "open" => 3,
        "half-open" => 2,
        "open or half-open" => 1,
        _ => 0,
    }
}

impl Scraped {
    fn answered(&self) -> impl Iterator<Item = &Samples> {
        self.endpoints.iter().filter_map(|(_, r)| r.as_ref().ok())
    }

    pub fn sources(&self) -> Vec<MetricsSource> {
        self.endpoints
            .iter()
            .map(|(url, r)| MetricsSource { url: url.clone(), error: r.as_ref().err().cloned() })
            .collect()
    }

    fn unknown_reason(&self) -> String {
        if self.endpoints.is_empty() {
            "unknown (no metrics endpoint)".into()
        } else {
            "unknown (no metrics endpoint answered)".into()
        }
    }

    /// The service's breaker, worst over the processes that run its executor: `closed`, `open`,
    /// `half-open`; or `unknown (…)` with the reason.
    pub fn breaker(&self, config: &Config, service: &str) -> String {
        let topic = config.names().actions(service);
        let mut worst: Option<String> = None;
        let mut consider = |state: String| {
            if worst.as_ref().is_none_or(|w| severity(&state) > severity(w)) {
                worst = Some(state);
            }
        };
        let mut answered = false;
        for samples in self.answered() {
            answered = true;
            let current = with(samples, "weir_breaker_state", "service", service)
                .find(|s| s.value >= 1.0)
                .and_then(|s| s.labels.get("state"));
            if let Some(state) = current {
                consider(state.clone());
            } else if let Some(open) = with(samples, "weir_breaker_open", "service", service).next() {
                // A process from before `weir_breaker_state` existed.
                consider(if open.value >= 1.0 { "open or half-open" } else { "closed" }.to_string());
            } else if with(samples, "weir_tenant_backlog", "service", service).next().is_some()
                || with(samples, "weir_consumer_lag", "topic", &topic).next().is_some()
            {
                // The executor runs there (it reports its tenants' backlog from the start, its lag
                // once it has a position) and its breaker never left `closed` (the breaker's
                // gauges are set on its first change).
                consider("closed".to_string());
            }
        }
        match worst {
            Some(state) => state,
            None if answered => "unknown (no answering process runs this executor)".into(),
            None => self.unknown_reason(),
        }
    }

    /// The time the service's calls waited for permits, summed over scopes and processes.
    pub fn throttle_wait(&self, service: &str) -> ThrottleWait {
        let mut any = false;
        let (mut calls, mut seconds) = (0.0, 0.0);
        for samples in self.answered() {
            any = true;
            calls +=
                with(samples, "weir_throttle_wait_seconds_count", "service", service).map(|s| s.value).sum::<f64>();
            seconds +=
                with(samples, "weir_throttle_wait_seconds_sum", "service", service).map(|s| s.value).sum::<f64>();
        }
        if any {
            ThrottleWait { calls: Some(calls as u64), seconds: Some(seconds), unknown: None }
        } else {
            ThrottleWait { calls: None, seconds: None, unknown: Some(self.unknown_reason()) }
        }
    }
}

/// Adds a sample's value to a field of a tenant class.
type AddTo = fn(&mut TenantShare, f64);

impl Scraped {
    /// The service's tenant classes per priority over the processes that run its executor (those
    /// that report a share for it): by priority, high first, then largest share, then backlog.
    pub fn tenants(&self, service: &str) -> Vec<TenantShare> {
        let mut classes: BTreeMap<(String, String), TenantShare> = BTreeMap::new();
        let mut processes = 0;
        for samples in self.answered() {
            if with(samples, "weir_tenant_share", "service", service).next().is_none() {
                continue;
            }
            processes += 1;
            let series: [(&str, AddTo); 6] = [
                ("weir_tenant_share", |t, v| t.share += v),
                ("weir_tenant_backlog", |t, v| t.backlog += v as u64),
                ("weir_tenant_calls_total", |t, v| t.calls += v as u64),
                ("weir_tenant_overflowed_total", |t, v| t.overflowed += v as u64),
                ("weir_tenant_deferred_total", |t, v| t.deferred += v as u64),
                ("weir_tenant_throttled_total", |t, v| t.throttled += v as u64),
            ];
            for (name, add) in series {
                for sample in with(samples, name, "service", service) {
                    let Some(tenant) = sample.labels.get("tenant") else { continue };
                    // A process from before priorities reports none: its tasks were all normal.
                    let priority = sample.labels.get("priority").cloned().unwrap_or_else(|| "normal".into());
                    let class = classes.entry((priority.clone(), tenant.clone())).or_insert_with(|| TenantShare {
                        priority,
                        tenant: tenant.clone(),
                        backlog: 0,
                        share: 0.0,
                        calls: 0,
                        overflowed: 0,
                        deferred: 0,
                        throttled: 0,
                    });
                    add(class, sample.value);
                }
            }
        }
        let mut tenants: Vec<TenantShare> = classes.into_values().collect();
        for t in &mut tenants {
            t.share /= f64::from(processes.max(1));
        }
        let rank = |p: &str| match p {
            "high" => 0,
            "normal" => 1,
            "low" => 2,
            _ => 3,
        };
        tenants.sort_by(|a, b| {
            rank(&a.priority).cmp(&rank(&b.priority)).then(b.share.total_cmp(&a.share)).then(b.backlog.cmp(&a.backlog))
        });
        tenants
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# TYPE weir_breaker_state gauge
weir_breaker_state{service="hook",state="closed"} 0
weir_breaker_state{service="hook",state="open"} 1
weir_breaker_state{service="hook",state="half-open"} 0
weir_throttle_wait_seconds_sum{service="hook",scope="global"} 1.5
weir_throttle_wait_seconds_sum{service="hook",scope="tenant"} 0.5
weir_throttle_wait_seconds_count{service="hook",scope="global"} 3
weir_throttle_wait_seconds_count{service="hook",scope="tenant"} 1
weir_throttle_wait_seconds_bucket{service="hook",scope="global",le="0.5"} 1
weir_consumer_lag{stage="execute",topic="actions.quiet",partition="0"} 0
weir_tenant_share{service="hook",priority="normal",tenant="noisy"} 0.25
weir_tenant_share{service="hook",priority="normal",tenant="other"} 0.75
weir_tenant_share{service="hook",priority="high",tenant="vip"} 1
weir_tenant_backlog{service="hook",priority="normal",tenant="noisy"} 40000
weir_tenant_backlog{service="hook",priority="normal",tenant="other"} 3
weir_tenant_backlog{service="hook",priority="high",tenant="vip"} 2
weir_tenant_calls_total{service="hook",priority="normal",tenant="noisy"} 900
weir_tenant_overflowed_total{service="hook",priority="normal",tenant="noisy"} 39000
weir_other{a="b \"quoted\", and {braces}",c="d\\e"} 7 1700000000000
not a line at all {
weir_breaker_open{service="broken label} 1
"#;

    #[test]
    fn reads_the_wanted_series_and_skips_the_rest() {
        let samples = parse(TEXT, &WANTED);
        assert_eq!(samples["weir_breaker_state"].len(), 3);
        assert!(!samples.contains_key("weir_breaker_open"), "the unterminated label is skipped");
        assert!(!samples.contains_key("weir_throttle_wait_seconds_bucket"));
        let other = parse(TEXT, &["weir_other"]);
        let sample = &other["weir_other"][0];
        assert_eq!((sample.labels["a"].as_str(), sample.labels["c"].as_str()), ("b \"quoted\", and {braces}", "d\\e"));
        assert_eq!(sample.value, 7.0);
        assert_eq!(parse("up 1\n", &["up"])["up"][0].labels.len(), 0);
    }

    #[test]
    fn breaker_and_throttle_wait_from_the_endpoints() {
        let mut config = Config::default();
        for s in ["hook", "quiet", "elsewhere"] {
            config.services.insert(s.into(), Default::default());
        }
        let scraped = Scraped {
            endpoints: vec![
                ("http://a/metrics".into(), Ok(parse(TEXT, &WANTED))),
                ("http://b/metrics".into(), Err("connection refused".into())),
            ],
        };
        assert_eq!(scraped.breaker(&config, "hook"), "open");
        assert_eq!(scraped.breaker(&config, "quiet"), "closed", "runs there, never changed");
        assert!(scraped.breaker(&config, "elsewhere").starts_with("unknown"));
        let wait = scraped.throttle_wait("hook");
        assert_eq!((wait.calls, wait.seconds), (Some(4), Some(2.0)));
        // Tenant classes: one process reports noisy and other (normal) and vip (high), a second
        // only other, and without a priority label (a process from before priorities: normal).
        // noisy's share is averaged over both processes; classes come by priority, high first.
        let second = "weir_tenant_share{service=\"hook\",tenant=\"other\"} 1\nweir_tenant_backlog{service=\"hook\",tenant=\"other\"} 5\n";
        let two = Scraped {
            endpoints: vec![("a".into(), Ok(parse(TEXT, &WANTED))), ("c".into(), Ok(parse(second, &WANTED)))],
        };
        let tenants = two.tenants("hook");
        let classes: Vec<(&str, &str)> = tenants.iter().map(|t| (t.priority.as_str(), t.tenant.as_str())).collect();
        assert_eq!(classes, [("high", "vip"), ("normal", "other"), ("normal", "noisy")]);
        assert_eq!((tenants[0].share, tenants[0].backlog), (0.5, 2));
        assert_eq!((tenants[1].share, tenants[1].backlog), (0.875, 8));
        let noisy = &tenants[2];
        assert_eq!((noisy.share, noisy.backlog, noisy.calls, noisy.overflowed), (0.125, 40_000, 900, 39_000));
        assert!(two.tenants("quiet").is_empty(), "no process reports quiet's tenants");
        let none = Scraped { endpoints: vec![] };
        assert_eq!(none.breaker(&config, "hook"), "unknown (no metrics endpoint)");
        assert_eq!(none.throttle_wait("hook").unknown.as_deref(), Some("unknown (no metrics endpoint)"));
    }
}
