//! Kafka's default partitioner for keyed records, as the Java client computes it.
//!
//! The producer itself uses librdkafka's `murmur2_random` partitioner, which is the same
//! function; this module exists so that tests and tools can say where a tenant's events land
//! (and check that librdkafka agrees with Java) without producing anything. The hash comes from
//! the `murmur2` crate with Kafka's seed; only the sign handling is Kafka's own (`toPositive`
//! masks the sign bit rather than taking an absolute value).

/// murmur2 of `key` with Kafka's seed, as the signed 32-bit value Java's `Utils.murmur2` returns.
pub fn murmur2(key: &[u8]) -> i32 {
    murmur2::murmur2(key, murmur2::KAFKA_SEED) as i32
}

/// The partition the Java client's default partitioner picks for a non-empty key.
pub fn partition_for_key(key: &[u8], partitions: i32) -> i32 {
    assert!(partitions > 0, "a topic has at least one partition");
    (murmur2(key) & 0x7fff_ffff) % partitions
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test vectors from Kafka's `UtilsTest.testMurmur2` (clients module).
    #[test]
    fn agrees_with_java_utils_murmur2() {
        let vectors: [(&str, i32); 6] = [
            ("21", -973932308),
            ("foobar", -790332482),
            ("a-little-bit-long-string", -985981536),
            ("a-little-bit-longer-string", -1486304829),
            ("lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
            ("abc", 479470107),
        ];
        for (key, expected) in vectors {
            assert_eq!(murmur2(key.as_bytes()), expected, "key {key:?}");
        }
    }

    #[test]
    fn partition_is_masked_not_abs() {
        // -973932308 & 0x7fffffff = 1173551340; % 7 = 6 (abs() would give 3).
        assert_eq!(partition_for_key(b"21", 7), 1173551340 % 7);
    }
}
