//! `sink.retention`: how long the results and run tables keep their rows, and the time
//! partitions they are kept in (see `stages::record::retention` for what is done with it).

use std::time::Duration;

use anyhow::bail;
use serde::{Deserialize, Serialize};

use super::duration;

/// ```yaml
/// sink:
///   retention: {keep: 30d, partition: 1d}
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// How long rows are kept, counted from their run's start (`run_at`): a partition is dropped
    /// once it is wholly older than this. Absent (the default): kept forever; partitions are still
    /// made ahead, so turning retention on later drops whole partitions rather than deleting rows.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub keep: Option<Duration>,
    /// The time span of one partition (default 1d), aligned on multiples of it since the Unix
    /// epoch (1d: UTC midnights). Rows leave in whole partitions, so rows are kept between `keep`
    /// and `keep + partition`.
    #[serde(with = "duration")]
    pub partition: Duration,
    /// Partitions made ahead of the current one (default 3), so that the partition a row needs
    /// exists before the row arrives, even across a maintenance that fails for a while.
    pub ahead: u32,
    /// How often partitions are made and dropped (default 1m).
    #[serde(with = "duration")]
    pub check_every: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            keep: None,
            partition: Duration::from_secs(86_400),
            ahead: 3,
            check_every: Duration::from_secs(60),
        }
    }
}

/// The shortest partition: finer ones would make thousands of tables for a retention of days.
pub const MIN_PARTITION: Duration = Duration::from_secs(60);

impl RetentionConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.partition < MIN_PARTITION || self.partition.subsec_nanos() != 0 {
            bail!(
                "sink.retention.partition: must be whole seconds and at least {}s, not {:?}",
                MIN_PARTITION.as_secs(),
                self.partition
            );
        }
        if self.partition > Duration::from_secs(366 * 86_400) {
            bail!("sink.retention.partition: at most 366d, not {:?}", self.partition);
        }
        if let Some(keep) = self.keep {
            if keep < 2 * self.partition {
                bail!(
                    "sink.retention.keep: {} is shorter than two partitions ({} each): rows would be kept only \
                     between keep and keep + partition; make keep longer or the partition shorter",
                    humantime_serde::re::humantime::format_duration(keep),
                    humantime_serde::re::humantime::format_duration(self.partition)
                );
            }
            if keep > Duration::from_secs(100 * 366 * 86_400) {
                bail!("sink.retention.keep: at most 100 years; leave it out to keep rows forever");
            }
        }
        if !(1..=1000).contains(&self.ahead) {
            bail!("sink.retention.ahead: must be between 1 and 1000, not {}", self.ahead);
        }
        if self.check_every < Duration::from_secs(1) || self.check_every > self.partition {
            bail!("sink.retention.check_every: must be between 1s and sink.retention.partition");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> anyhow::Result<RetentionConfig> {
        let config: RetentionConfig = serde_yaml_ng::from_str(yaml)?;
        config.validate()?;
        Ok(config)
    }

    #[test]
    fn reads_durations_with_units_and_refuses_what_cannot_work() {
        let c = parse("{keep: 30d, partition: 1d}").unwrap();
        assert_eq!(c.keep, Some(Duration::from_secs(30 * 86_400)));
        assert_eq!(c.partition, Duration::from_secs(86_400));
        assert_eq!(parse("{}").unwrap(), RetentionConfig::default());
        for (bad, says) in [
            ("{keep: 1d, partition: 1d}", "shorter than two partitions"),
            ("{partition: 10s}", "at least 60s"),
            ("{partition: 90500ms}", "whole seconds"),
            ("{ahead: 0}", "ahead"),
            ("{check_every: 2d}", "check_every"),
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let e = parse("{keep: 30d, kept: 1d}").unwrap_err().to_string();
        assert!(e.contains("unknown field"), "{e}");
        let e = parse("{keep: soon}").unwrap_err().to_string();
        assert!(e.contains("keep"), "{e}");
    }
}
