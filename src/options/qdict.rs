//! The order in which QEMU applies the keys of a `-machine` dictionary.
//!
//! QEMU collects `-machine`, `-m` ("memory") and `-smp` ("smp") into one QDict and sets the
//! machine's properties by iterating it. A QDict is a hash table of 512 buckets walked in bucket
//! order, each bucket newest entry first, and the hash is the one of Samba's tdb. So when two
//! properties are both wrong, the one QEMU reports is decided by their hashes, not by where they
//! stand on the command line; hostmem reproduces that order to report the same error.

/// QEMU's QDict bucket count.
const BUCKETS: u32 = 512;

/// The bucket QEMU's QDict puts `key` in: tdb's hash (the key's length times a constant, plus
/// each byte shifted left by 5 × its index modulo 24, then a linear congruential step), modulo
/// the bucket count. All arithmetic wraps at 32 bits, as unsigned C arithmetic does.
pub fn bucket(key: &str) -> u32 {
    let bytes = key.as_bytes();
    let mut value = 0x238F_13AFu32.wrapping_mul(bytes.len() as u32);
    for (i, &b) in bytes.iter().enumerate() {
        value = value.wrapping_add(u32::from(b) << ((i * 5) % 24));
    }
    value.wrapping_mul(1_103_515_243).wrapping_add(12345) % BUCKETS
}

/// `keys` (in the order they were first put into the dictionary, each once) in the order QEMU
/// iterates them: by bucket, and within a bucket the most recently inserted first.
pub fn iteration_order<'a>(keys: &[&'a str]) -> Vec<&'a str> {
    let mut indexed: Vec<(u32, usize, &str)> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (bucket(k), i, *k))
        .collect();
    indexed.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    indexed.into_iter().map(|(_, _, k)| k).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_match_the_order_qemu_reports_machine_errors_in() {
        // Observed with QEMU 10: "-M pc,bogus=1 -smp x" reports bogus, "-M pc,foo=1 -smp x"
        // reports smp, "-M pc,foo=1 -m 1G,maxmem=512M" reports the memory, and
        // "-M pc,foo=1,max-ram-below-4g=5G" reports max-ram-below-4g.
        assert!(bucket("bogus") < bucket("smp"));
        assert!(bucket("smp") < bucket("memory"));
        assert!(bucket("memory") < bucket("foo"));
        assert!(bucket("max-ram-below-4g") < bucket("foo"));
        assert_eq!(
            iteration_order(&["foo", "max-ram-below-4g", "memory", "smp", "bogus"]),
            ["bogus", "smp", "memory", "max-ram-below-4g", "foo"]
        );
    }

    #[test]
    fn within_a_bucket_the_newest_key_comes_first() {
        // Two keys of one bucket: find one by brute force over names of two letters.
        let target = bucket("a");
        let other = (b'a'..=b'z')
            .flat_map(|x| (b'a'..=b'z').map(move |y| format!("{}{}", x as char, y as char)))
            .find(|k| bucket(k) == target)
            .unwrap();
        assert_eq!(iteration_order(&["a", &other]), [other.as_str(), "a"]);
        assert_eq!(iteration_order(&[&other, "a"]), ["a", other.as_str()]);
    }

    #[test]
    fn hash_values_are_qemus() {
        // Bucket numbers computed from the algorithm by hand for short keys: "a" is one byte
        // 0x61 at shift 0 on top of 0x238F13AF.
        let v = 0x238F_13AFu32.wrapping_add(0x61);
        assert_eq!(
            bucket("a"),
            v.wrapping_mul(1_103_515_243).wrapping_add(12345) % 512
        );
        assert_eq!(bucket(""), 12345 % 512);
        assert_eq!(bucket("memory"), 172);
        assert_eq!(bucket("smp"), 153);
    }
}
