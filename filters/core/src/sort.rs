//! An in-place heapsort for the config-time sorts of the filters.
//!
//! Why not `slice::sort_unstable`: each element type instantiates core's
//! pattern-defeating quicksort anew, 3.4–4.2 KB of module per type after
//! wasm-opt, and a module links several. These sorts run once per config
//! (ring points, deny lists), never per request, so O(n log n) with no
//! extra memory is all they need. The order is that of `sort_unstable`
//! for every slice whose equal elements are indistinguishable (a total
//! order over the whole value, as for tuples and byte strings).

/// Sort `v` ascending.
pub fn heapsort<T: Ord>(v: &mut [T]) {
    let n = v.len();
    for start in (0..n / 2).rev() {
        sift_down(v, start, n);
    }
    for end in (1..n).rev() {
        v.swap(0, end);
        sift_down(v, 0, end);
    }
}

/// Move `v[root]` down the max-heap held in `v[..end]` to its place.
fn sift_down<T: Ord>(v: &mut [T], mut root: usize, end: usize) {
    loop {
        let mut child = 2 * root + 1;
        if child >= end {
            return;
        }
        if child + 1 < end && v.get(child) < v.get(child + 1) {
            child += 1;
        }
        if v.get(root) >= v.get(child) {
            return;
        }
        v.swap(root, child);
        root = child;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (SplitMix64), so the cases repeat.
    fn rng(seed: &mut u64) -> u64 {
        *seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    #[test]
    fn agrees_with_the_standard_sort() {
        let mut seed = 7;
        for len in (0..70).chain([255, 256, 1000, 4097]) {
            for modulus in [2, 10, u64::MAX] {
                let v: Vec<(u64, u32)> = (0..len).map(|i| (rng(&mut seed) % modulus, i as u32 % 3)).collect();
                let (mut a, mut b) = (v.clone(), v);
                heapsort(&mut a);
                b.sort_unstable();
                assert_eq!(a, b, "len {len}, modulus {modulus}");
            }
        }
    }

    #[test]
    fn sorts_byte_strings_and_sorted_or_reversed_input() {
        let mut seed = 11;
        let mut v: Vec<Vec<u8>> = (0..300).map(|_| (0..rng(&mut seed) % 6).map(|_| (rng(&mut seed) % 3) as u8).collect()).collect();
        let mut want = v.clone();
        want.sort_unstable();
        heapsort(&mut v);
        assert_eq!(v, want);
        let mut up: Vec<u32> = (0..500).collect();
        heapsort(&mut up);
        assert!(up.windows(2).all(|w| w[0] < w[1]));
        let mut down: Vec<u32> = (0..500).rev().collect();
        heapsort(&mut down);
        assert_eq!(down, up);
    }
}
