//! The stable placement hash: XXH64 with seed 0.
//!
//! Every decision that places a key (session to replica, key to shard, user to
//! experiment arm) goes through this module, so every proxy, every worker and
//! every release of meshpatterns agrees on where a key belongs. The algorithm
//! is xxHash64 as specified in the xxHash repository (`doc/xxhash_spec.md`),
//! computed by the `xxhash-rust` crate; the vectors in this module's tests
//! were cross-checked against the reference C implementation (Python
//! `xxhash` package) and run both natively and on wasm.
//!
//! Envoy's `ring_hash` and `maglev` load balancers also hash header values with
//! XXH64 seed 0, so the value we put into a hash header is hashed by Envoy with
//! the same function we document here.
//!
//! `ahash` is deliberately not used for placement: its output changes between
//! versions and platforms. It is for in-memory maps only.

use xxhash_rust::xxh64::xxh64;

/// XXH64(bytes, seed = 0).
#[inline]
pub fn hash64(bytes: &[u8]) -> u64 {
    xxh64(bytes, 0)
}

/// XXH64 with an explicit seed.
#[inline]
pub fn hash64_seeded(bytes: &[u8], seed: u64) -> u64 {
    xxh64(bytes, seed)
}

/// Hash of a salted key: XXH64 over `le32(len(salt)) || salt || key`, seed 0.
/// The length prefix keeps ("ab", "c") and ("a", "bc") apart.
#[inline]
pub fn salted_hash64(salt: &[u8], key: &[u8]) -> u64 {
    salted_hash64_seeded(salt, key, 0)
}

/// [`salted_hash64`] with an explicit seed: XXH64 over
/// `le32(len(salt)) || salt || key`. The input is put together on the stack
/// (past 64 bytes of salt and key together it goes to the heap).
#[inline]
pub fn salted_hash64_seeded(salt: &[u8], key: &[u8], seed: u64) -> u64 {
    let mut buf = crate::bytes::StackBytes::<64>::new();
    buf.extend_from_slice(&(salt.len() as u32).to_le_bytes());
    buf.extend_from_slice(salt);
    buf.extend_from_slice(key);
    xxh64(&buf, seed)
}

/// The hash as 16 lowercase hex digits, the form written into headers.
#[inline]
pub fn hex16(h: u64) -> String {
    crate::text::hex16(h)
}

/// Map a hash onto `0..n` (`h mod n`); `n == 0` gives 0. For `n` far below
/// 2^64 (10,000 experiment buckets, say) the modulo bias is below 1e-15.
#[inline]
pub fn bucket(h: u64, n: u64) -> u64 {
    h.checked_rem(n).unwrap_or(0)
}

#[cfg(test)]
pub(crate) mod vectors {
    /// (input, seed, XXH64) — cross-checked against the reference C library.
    pub const XXH64: &[(&str, u64, u64)] = &[
        ("", 0, 0xef46db3751d8e999),
        ("a", 0, 0xd24ec4f1a98c6e5b),
        ("abc", 0, 0x44bc2cf5ad770999),
        ("message digest", 0, 0x066ed728fceeb3be),
        ("abcdefghijklmnopqrstuvwxyz", 0, 0xcfe1f278fa89835c),
        ("12345678901234567890123456789012345678901234567890123456789012345678901234567890", 0, 0xe04a477f19ee145d),
        ("user-42", 0, 0x397e9d3a76af7c81),
        ("abc", 1, 0xbea9ca8199328908),
    ];
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn xxh64_vectors() {
        for &(input, seed, want) in vectors::XXH64 {
            assert_eq!(hash64_seeded(input.as_bytes(), seed), want, "XXH64({input:?}, {seed})");
        }
    }

    #[test]
    fn salted_is_length_prefixed() {
        assert_ne!(salted_hash64(b"ab", b"c"), salted_hash64(b"a", b"bc"));
        assert_eq!(salted_hash64(b"exp", b"user-42"), 0xe4148d7607766dd5);
    }

    #[test]
    fn hex_and_bucket() {
        assert_eq!(hex16(0xab), "00000000000000ab");
        assert_eq!(bucket(12345, 10_000), 2345);
        assert_eq!(bucket(5, 0), 0);
    }
}
