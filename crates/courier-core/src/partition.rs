//! Partition selection: the same key always maps to the same partition.

/// FNV-1a, 64 bit: stable across processes, platforms and releases (part of the
/// on-disk contract: changing it would reorder keys).
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The partition of `key` among `partitions` (which must be at least 1).
pub fn partition_for(key: &str, partitions: u32) -> u32 {
    let n = u64::from(partitions.max(1));
    (stable_hash(key.as_bytes()) % n) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_values_never_change() {
        // Pinned: these are on-disk contract.
        assert_eq!(stable_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(stable_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(partition_for("order-1", 8), partition_for("order-1", 8));
    }

    #[test]
    fn keys_spread_over_partitions() {
        let mut counts = [0u32; 8];
        for i in 0..8000 {
            counts[partition_for(&format!("key-{i}"), 8) as usize] += 1;
        }
        for c in counts {
            assert!((700..1300).contains(&c), "uneven spread: {counts:?}");
        }
    }

    proptest! {
        #[test]
        fn always_in_range_and_deterministic(key in ".*", n in 1u32..1000) {
            let p = partition_for(&key, n);
            prop_assert!(p < n);
            prop_assert_eq!(p, partition_for(&key, n));
        }
    }
}
