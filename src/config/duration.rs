//! Durations in `weir.yaml`: human-readable (`5ms`, `10s`, `1m 30s`, `10min`, `1h`; humantime's
//! syntax), or a bare integer of milliseconds. The integer form is what the keys were before
//! durations had units (`linger_ms: 20`): each duration field keeps its old `*_ms` name as a
//! serde alias and reads it with these functions, so old files load unchanged. Giving both
//! names (`linger` and `linger_ms`) is refused by serde as a duplicate field. Written back
//! (`Config` is `Serialize`), durations are always humantime strings.
//!
//! Use as `#[serde(with = "duration", alias = "…_ms")]` on a `Duration`, or
//! `#[serde(with = "duration::list")]` on a `Vec<Duration>`.

use std::{fmt, time::Duration};

use serde::{de, Deserialize, Deserializer, Serializer};

pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    humantime_serde::serialize(duration, serializer)
}

pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    deserializer.deserialize_any(Visitor)
}

/// A list of durations (retry tiers), each read as above.
pub mod list {
    use super::*;

    pub fn serialize<S: Serializer>(durations: &[Duration], serializer: S) -> Result<S::Ok, S::Error> {
        serializer
            .collect_seq(durations.iter().map(|d| humantime_serde::re::humantime::format_duration(*d).to_string()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<Duration>, D::Error> {
        Ok(Vec::<Element>::deserialize(deserializer)?.into_iter().map(|e| e.0).collect())
    }

    /// One element, read on its own so an error names its position.
    struct Element(Duration);

    impl<'de> Deserialize<'de> for Element {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            deserializer.deserialize_any(Visitor).map(Element)
        }
    }
}

struct Visitor;

impl de::Visitor<'_> for Visitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a duration such as 250ms, 10s, 1m or 1h, or an integer of milliseconds")
    }

    fn visit_u64<E: de::Error>(self, ms: u64) -> Result<Duration, E> {
        Ok(Duration::from_millis(ms))
    }

    fn visit_i64<E: de::Error>(self, ms: i64) -> Result<Duration, E> {
        u64::try_from(ms).map(Duration::from_millis).map_err(|_| E::invalid_value(de::Unexpected::Signed(ms), &self))
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Duration, E> {
        humantime_serde::re::humantime::parse_duration(text.trim())
            .map_err(|e| E::custom(format!("{text:?} is not a duration ({e}); write e.g. 250ms, 10s, 1m or 1h")))
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        #[serde(with = "super", alias = "wait_ms")]
        wait: Duration,
        #[serde(with = "super::list", alias = "tiers_ms", default)]
        tiers: Vec<Duration>,
    }

    fn parse(yaml: &str) -> Result<Sample, String> {
        serde_yaml_ng::from_str(yaml).map_err(|e| e.to_string())
    }

    #[test]
    fn both_spellings_read_the_same_and_write_with_units() {
        let new = parse("wait: 1m 30s\ntiers: [1s, 10s, 1m, 10min]").unwrap();
        let old = parse("wait_ms: 90000\ntiers_ms: [1000, 10000, 60000, 600000]").unwrap();
        assert_eq!(new, old);
        assert_eq!(new.wait, Duration::from_secs(90));
        assert_eq!(parse("wait: 5ms").unwrap().wait, Duration::from_millis(5));
        assert_eq!(parse("wait: 20").unwrap().wait, Duration::from_millis(20), "a bare integer is milliseconds");
        let written = serde_yaml_ng::to_string(&new).unwrap();
        assert_eq!(written, "wait: 1m 30s\ntiers:\n- 1s\n- 10s\n- 1m\n- 10m\n");
        assert_eq!(parse(&written).unwrap(), new, "what is written reads back");
    }

    #[test]
    fn bad_values_and_both_keys_are_refused() {
        let err = parse("wait: soon").unwrap_err();
        assert!(err.contains("\"soon\" is not a duration"), "{err}");
        let err = parse("wait: -5").unwrap_err();
        assert!(err.contains("integer of milliseconds"), "{err}");
        let err = parse("wait: 1s\ntiers: [1s, 2 parsecs]").unwrap_err();
        assert!(err.contains("tiers") && err.contains("2 parsecs"), "{err}");
        let err = parse("wait: 1s\nwait_ms: 1000").unwrap_err();
        assert!(err.contains("duplicate field `wait`"), "{err}");
    }
}
