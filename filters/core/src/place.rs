//! Consistent placement of keys onto named members (shards, backends).
//!
//! # Why a ring with virtual nodes
//!
//! We need (a) named members that can be added or removed anywhere, not only at
//! the end (this rules out jump hash, which only shrinks from the top),
//! (b) weights, (c) minimal movement: adding a member to N moves only the keys
//! the new member takes, about 1/(N+1), and removing one moves only its keys,
//! and (d) a decision that is bit-for-bit identical natively and on wasm.
//! Weighted rendezvous hashing meets (a)–(c) but needs floating-point `ln`,
//! whose last bit may differ between libm implementations, which breaks (d).
//! Maglev balances better but moves a few extra keys on every change and costs
//! a 65,537-entry table per map. A ring of integer hash points meets all four;
//! with [`VNODES_PER_WEIGHT`] points per unit of weight the share of each
//! member deviates from its weight by a few percent (see the balance test),
//! and a lookup is one hash plus a binary search.
//!
//! # The algorithm (normative: other implementations must match it)
//!
//! * Member `m` with weight `w` owns the points `XXH64(m.name || "#" || decimal(i))`
//!   for `i` in `0..w * VNODES_PER_WEIGHT`.
//! * Points are sorted by (point, member index); ties keep the member listed first.
//! * A key hash `h` belongs to the member of the first point `>= h`, wrapping to
//!   the first point of the ring.

use crate::hash::hash64;
use crate::ConfigError;

/// Ring points per unit of weight.
pub const VNODES_PER_WEIGHT: u32 = 1024;
/// Upper bound on the sum of weights, which bounds the ring to 1,048,576 points (16 MiB).
pub const MAX_TOTAL_WEIGHT: u32 = 1024;

/// A member as configured: a name (cluster or shard) and a relative weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub weight: u32,
}

/// A consistent-hash ring over named members.
#[derive(Debug, Clone)]
pub struct Ring {
    members: Vec<String>,
    points: Vec<(u64, u32)>,
}

impl Ring {
    /// Build a ring. Errors name the offending member as `[index]`.
    pub fn try_new(members: &[Member]) -> Result<Ring, ConfigError> {
        if members.is_empty() {
            return Err(ConfigError::new("", "[]", "at least one member"));
        }
        let mut total: u64 = 0;
        for (i, m) in members.iter().enumerate() {
            if m.weight == 0 || m.weight > MAX_TOTAL_WEIGHT {
                return Err(ConfigError::new(format!("[{i}].weight"), m.weight, format!("1..={MAX_TOTAL_WEIGHT}")));
            }
            if members.iter().take(i).any(|o| o.name == m.name) {
                return Err(ConfigError::new(format!("[{i}].name"), format!("{:?}", m.name), "a name not used by another member"));
            }
            total += u64::from(m.weight);
        }
        if total > u64::from(MAX_TOTAL_WEIGHT) {
            return Err(ConfigError::new("", format!("total weight {total}"), format!("a total weight of at most {MAX_TOTAL_WEIGHT}")));
        }
        let mut points = Vec::with_capacity((total * u64::from(VNODES_PER_WEIGHT)) as usize);
        let mut buf = String::new();
        for (idx, m) in members.iter().enumerate() {
            for i in 0..m.weight * VNODES_PER_WEIGHT {
                buf.clear();
                buf.push_str(&m.name);
                buf.push('#');
                buf.push_str(&i.to_string());
                points.push((hash64(buf.as_bytes()), idx as u32));
            }
        }
        crate::sort::heapsort(&mut points);
        Ok(Ring { members: members.iter().map(|m| m.name.clone()).collect(), points })
    }

    /// Index (in configuration order) of the member owning `key_hash`.
    pub fn locate(&self, key_hash: u64) -> usize {
        let pos = self.points.partition_point(|&(p, _)| p < key_hash);
        let point = self.points.get(pos).or_else(|| self.points.first());
        point.map(|&(_, idx)| idx as usize).unwrap_or(0)
    }

    /// Name of the member owning `key_hash`.
    pub fn locate_name(&self, key_hash: u64) -> &str {
        self.members.get(self.locate(key_hash)).map(String::as_str).unwrap_or("")
    }

    pub fn members(&self) -> &[String] {
        &self.members
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn members(names: &[&str]) -> Vec<Member> {
        names.iter().map(|n| Member { name: n.to_string(), weight: 1 }).collect()
    }

    fn counts(ring: &Ring, keys: u32) -> Vec<u32> {
        let mut c = vec![0u32; ring.members().len()];
        for k in 0..keys {
            c[ring.locate(hash64(format!("key-{k}").as_bytes()))] += 1;
        }
        c
    }

    /// Test vectors: key -> member for a fixed three-member ring. These must
    /// never change; a change here means every deployed proxy would disagree
    /// with the new release about where keys live.
    #[test]
    fn placement_vectors() {
        let ring = Ring::try_new(&members(&["shard-a", "shard-b", "shard-c"])).unwrap();
        let got: Vec<&str> = ["user-1", "user-2", "user-3", "user-4", "user-5", "", "ünïcode"]
            .iter()
            .map(|k| ring.locate_name(hash64(k.as_bytes())))
            .collect();
        assert_eq!(got, PLACEMENT_VECTORS.to_vec());
    }
    pub const PLACEMENT_VECTORS: &[&str] = &["shard-c", "shard-b", "shard-c", "shard-a", "shard-b", "shard-c", "shard-b"];

    #[test]
    fn balance_within_bound() {
        for n in [3usize, 5, 8] {
            let names: Vec<String> = (0..n).map(|i| format!("member-{i}")).collect();
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            let ring = Ring::try_new(&members(&refs)).unwrap();
            let c = counts(&ring, 100_000);
            let mean = 100_000.0 / n as f64;
            let max = *c.iter().max().unwrap() as f64;
            assert!(max / mean <= 1.10, "n={n} counts={c:?} max/mean={}", max / mean);
        }
    }

    #[test]
    fn weights_are_honoured() {
        let ring = Ring::try_new(&[Member { name: "big".into(), weight: 3 }, Member { name: "small".into(), weight: 1 }]).unwrap();
        let c = counts(&ring, 100_000);
        let share = c[0] as f64 / 100_000.0;
        assert!((share - 0.75).abs() < 0.03, "share of weight-3 member = {share}");
    }

    #[test]
    fn adding_a_member_moves_only_keys_it_takes() {
        let before = Ring::try_new(&members(&["a", "b", "c"])).unwrap();
        let after = Ring::try_new(&members(&["a", "b", "c", "d"])).unwrap();
        let mut moved = 0;
        for k in 0..100_000u32 {
            let h = hash64(format!("key-{k}").as_bytes());
            let (x, y) = (before.locate_name(h), after.locate_name(h));
            if x != y {
                assert_eq!(y, "d", "a key moved between old members");
                moved += 1;
            }
        }
        let frac = moved as f64 / 100_000.0;
        assert!((frac - 0.25).abs() < 0.04, "moved fraction {frac}, ideal 0.25");
    }

    #[test]
    fn removing_a_member_moves_only_its_keys() {
        let before = Ring::try_new(&members(&["a", "b", "c", "d"])).unwrap();
        let after = Ring::try_new(&members(&["a", "c", "d"])).unwrap();
        for k in 0..50_000u32 {
            let h = hash64(format!("key-{k}").as_bytes());
            let (x, y) = (before.locate_name(h), after.locate_name(h));
            if x != "b" {
                assert_eq!(x, y);
            }
        }
    }

    #[test]
    fn rejects_bad_members() {
        assert!(Ring::try_new(&[]).is_err());
        let e = Ring::try_new(&[Member { name: "a".into(), weight: 0 }]).unwrap_err();
        assert_eq!(e.field, "[0].weight");
        let e = Ring::try_new(&members(&["a", "a"])).unwrap_err();
        assert_eq!(e.field, "[1].name");
    }
}
