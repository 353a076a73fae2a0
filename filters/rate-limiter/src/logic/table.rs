//! The bucket table in shared data: fixed sets of slots, each set one
//! shared-data value, every update a compare-and-swap on a value that exists.
//!
//! Why sets: proxy-wasm shared data has compare-and-swap, but not for a key
//! that does not exist yet (the host ignores the token and writes), and no
//! delete. So (1) every shared-data key the table uses is created before any
//! traffic, when the plugin is configured ([`prepare`]), and never again on
//! the request path; and (2) a key's bucket must be found, claimed and
//! updated in one atomic step, or two workers could give one key two
//! buckets. Both hold when a set of [`WAYS`] slots is one shared-data value:
//! a request reads its key's set, decides (find its bucket by fingerprint,
//! or claim a free slot, or apply the `tableFull` policy), and writes the
//! whole set back with compare-and-swap, retrying from the new value when
//! another worker wrote first.
//!
//! A key's set and fingerprint come from one 64-bit hash seeded with a
//! random per-process value ([`SEED_KEY`]), so a client cannot choose keys
//! that land in another client's set. Two keys share a bucket only when
//! their 64-bit hashes are equal.
//!
//! A slot is free when it is unused or when its bucket is full again at the
//! time of the request: a full bucket is exactly what a new bucket is, so
//! taking it over changes nobody's budget.

use super::bucket::{BucketParams, BucketState, Take};
use meshpatterns_core::hash::{bucket as hash_bucket, salted_hash64_seeded};

/// Slots per set: one shared-data value holds up to this many buckets.
pub const WAYS: u32 = 16;
/// Set values start with this version byte; anything else reads as an empty set.
pub const SET_VERSION: u8 = 2;
/// Bytes per bucket in a set: fingerprint, milli-tokens, last refill (ns),
/// the time the bucket is full again (ns), each u64 little-endian.
pub const ENTRY_LEN: usize = 32;
/// Shared-data keys of the table: `rl2:<set in hex>`.
pub const KEY_PREFIX: &str = "rl2:";
/// The per-process seed (8 bytes), created by the first configure.
pub const SEED_KEY: &str = "rl2:seed";
/// How many sets exist (u32 LE), written once [`prepare`] created them.
pub const READY_KEY: &str = "rl2:sets";
/// Attempts at a compare-and-swap before the request is let through
/// (fail-open) and counted in `meshpatterns.rate_limiter.fail_open`.
pub const MAX_CAS_ATTEMPTS: u32 = 16;

/// Shared storage with compare-and-swap, as proxy-wasm shared data offers it:
/// CAS tokens are never 0; a write with `cas` 0 is unconditional, and so is
/// any write to a key that does not exist yet (there is no atomic create).
pub trait SlotStore {
    /// The value and its CAS token, or `None` if the key was never written.
    fn get(&mut self, key: &str) -> Result<Option<(Vec<u8>, u32)>, String>;
    /// Write `value` if the key's CAS token is still `cas`. `Ok(false)` on a
    /// mismatch (someone else wrote first).
    fn set(&mut self, key: &str, value: &[u8], cas: u32) -> Result<bool, String>;
}

/// One bucket in a set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// The key's 64-bit hash (policy and key, seeded).
    pub fp: u64,
    pub state: BucketState,
    /// When the bucket is full again (ns): from then on it is free.
    pub full_at: u64,
}

/// An entry's 32 bytes in a set: four words. A fixed-size array, so that
/// writing it into a set is four stores, not a `memory.copy` call.
#[inline]
fn encode_entry(e: &Entry) -> [u8; ENTRY_LEN] {
    let mut out = [0u8; ENTRY_LEN];
    for (dst, w) in out.as_chunks_mut::<8>().0.iter_mut().zip([e.fp, e.state.tokens, e.state.last_ns, e.full_at]) {
        *dst = w.to_le_bytes();
    }
    out
}

/// The little-endian u64 at `i` of an entry's bytes (0 past the end, which
/// the callers' `chunks_exact` rules out).
#[inline]
fn u64_at(c: &[u8], i: usize) -> u64 {
    c.get(i..i + 8).and_then(|b| <[u8; 8]>::try_from(b).ok()).map(u64::from_le_bytes).unwrap_or(0)
}

/// The entries of a set known to be valid, each its 32 bytes.
#[inline]
fn slots(set: &mut [u8]) -> std::slice::IterMut<'_, [u8; ENTRY_LEN]> {
    set.get_mut(1..).unwrap_or_default().as_chunks_mut::<ENTRY_LEN>().0.iter_mut()
}

/// Where an entry's fingerprint and its `full_at` are in its 32 bytes
/// (the order [`encode_entry`] writes).
const FP_AT: usize = 0;
const FULL_AT: usize = 24;

#[inline]
fn decode_entry(c: &[u8]) -> Entry {
    Entry { fp: u64_at(c, FP_AT), state: BucketState { tokens: u64_at(c, 8), last_ns: u64_at(c, 16) }, full_at: u64_at(c, FULL_AT) }
}

/// Encode a set: the version byte, then each entry.
pub fn encode_set(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + ENTRY_LEN * entries.len());
    out.push(SET_VERSION);
    for e in entries {
        out.extend_from_slice(&encode_entry(e));
    }
    out
}

/// A set's entries as bytes, or `None` for a value of another version or
/// length (an older module's slot, damage), which reads as an empty set: it
/// exists, so it can still be claimed with compare-and-swap.
#[inline]
fn set_entries(bytes: &[u8]) -> Option<&[u8]> {
    match bytes.split_first() {
        Some((&SET_VERSION, rest)) if rest.len() % ENTRY_LEN == 0 => Some(rest),
        _ => None,
    }
}

/// Decode a set ([`set_entries`]: anything else reads as an empty set).
pub fn decode_set(bytes: &[u8]) -> Vec<Entry> {
    set_entries(bytes).map(|rest| rest.chunks_exact(ENTRY_LEN).map(decode_entry).collect()).unwrap_or_default()
}

/// The table's shape: `slots` slots in sets of [`WAYS`] (the last set holds
/// what is left over).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub slots: u32,
}

impl Layout {
    #[inline]
    pub fn sets(&self) -> u32 {
        self.slots.div_ceil(WAYS)
    }
    /// Slots of set `s`.
    #[inline]
    pub fn capacity(&self, s: u32) -> usize {
        self.slots.saturating_sub(s.saturating_mul(WAYS)).min(WAYS) as usize
    }
    /// Shared-data key of set `s`.
    #[inline]
    pub fn key(s: u32) -> SetKey {
        // Written in place: the prefix as one word, then the hex digits by
        // shifts (a set index has at most 8).
        let digits = (32 - s.leading_zeros()).div_ceil(4).max(1) as usize;
        let mut buf = [0u8; 12];
        if let Some(p) = buf.first_chunk_mut::<4>() {
            *p = KEY_PREFIX_BYTES;
        }
        for (i, b) in buf.iter_mut().skip(4).take(digits).enumerate() {
            let shift = 4 * (digits - 1 - i);
            *b = b"0123456789abcdef".get((s >> shift) as usize & 15).copied().unwrap_or(b'0');
        }
        SetKey { buf, len: 4 + digits as u8 }
    }
}

/// [`KEY_PREFIX`] as the four bytes a set key starts with.
const KEY_PREFIX_BYTES: [u8; 4] = match KEY_PREFIX.as_bytes().first_chunk::<4>() {
    Some(b) => *b,
    None => [0; 4],
};

/// A set's shared-data key (`rl2:<set in hex>`), on the stack.
#[derive(Clone, Copy)]
pub struct SetKey {
    buf: [u8; 12],
    len: u8,
}

impl SetKey {
    #[inline]
    pub fn as_str(&self) -> &str {
        let bytes = self.buf.get(..usize::from(self.len)).unwrap_or_default();
        // SAFETY: `Layout::key` writes only the ASCII prefix and hex digits.
        unsafe { std::str::from_utf8_unchecked(bytes) }
    }
}

impl std::ops::Deref for SetKey {
    type Target = str;
    #[inline]
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Display for SetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for SetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl PartialEq<&str> for SetKey {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// Where a key's bucket lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub set: u32,
    pub fp: u64,
}

/// `h = XXH64(le32(len(policy)) || policy || key, seed)`; the set is
/// `h mod sets` and the fingerprint is `h`.
pub fn place(seed: u64, policy: &str, key: &[u8], layout: Layout) -> Placement {
    placement(salted_hash64_seeded(policy.as_bytes(), key, seed), layout)
}

/// The placement of hash `h`: set `h mod sets`, fingerprint `h`.
#[inline]
pub fn placement(h: u64, layout: Layout) -> Placement {
    Placement { set: hash_bucket(h, u64::from(layout.sets())) as u32, fp: h }
}

fn read_u64(store: &mut dyn SlotStore, key: &str) -> Result<Option<u64>, String> {
    Ok(store.get(key)?.and_then(|(b, _)| <[u8; 8]>::try_from(b.as_slice()).ok()).map(u64::from_le_bytes))
}

/// Make the table exist before any traffic and return the process's seed.
///
/// Called from `on_configure`. Envoy configures a plugin first in a canary
/// VM on the main thread and only then in the workers, so the first call
/// creates everything before any request can write a set; later calls (each
/// worker, each config reload) find the seed and [`READY_KEY`] and only
/// create sets a larger `slots` adds. Sets that exist are never written here.
pub fn prepare(store: &mut dyn SlotStore, layout: Layout, fresh_seed: &mut dyn FnMut() -> u64) -> Result<u64, String> {
    let seed = match read_u64(store, SEED_KEY)? {
        Some(s) => s,
        None => {
            store.set(SEED_KEY, &fresh_seed().to_le_bytes(), 0)?;
            // Read back: whatever is stored is the seed every VM uses.
            read_u64(store, SEED_KEY)?.ok_or_else(|| format!("{SEED_KEY} could not be read back"))?
        }
    };
    let ready = match store.get(READY_KEY)? {
        Some((b, _)) => <[u8; 4]>::try_from(b.as_slice()).map(u32::from_le_bytes).unwrap_or(0),
        None => 0,
    };
    if ready < layout.sets() {
        for s in ready..layout.sets() {
            let key = Layout::key(s);
            if store.get(&key)?.is_none() {
                store.set(&key, &[SET_VERSION], 0)?;
            }
        }
        store.set(READY_KEY, &layout.sets().to_le_bytes(), 0)?;
    }
    Ok(seed)
}

/// What to do when a key is not in its set and every slot of the set holds
/// another key's bucket that is not full (field `tableFull`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub enum WhenFull {
    /// Take over the bucket that will be full soonest (its key later starts
    /// with a full bucket, up to the tokens it had used early).
    #[default]
    Evict,
    /// Refuse the request (limited early), as if the key's budget were spent.
    Limit,
    /// Let the request through without a bucket (counted in `fail_open`).
    Allow,
}

/// The decision within one set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetOutcome {
    /// The bucket answered; `write`: the set changed and is to be stored.
    Taken { take: Take, write: bool, table_full: bool },
    /// The set was full and the policy is [`WhenFull::Allow`].
    AllowedFull,
}

/// The time a bucket is full again.
#[inline]
pub fn full_at(params: &BucketParams, s: &BucketState) -> u64 {
    let missing = params.capacity.saturating_sub(s.tokens);
    if missing == 0 {
        return s.last_ns;
    }
    s.last_ns.saturating_add(params.ns_for(missing))
}

/// Find `fp`'s bucket in the set, or claim a slot for it, and take one
/// request. The set is updated where it lies, in its encoded bytes (what
/// [`encode_set`] writes; a value [`decode_set`] reads as empty is made an
/// empty set first), so only the entry that changes is touched.
#[inline]
pub fn decide_in_set(set: &mut Vec<u8>, capacity: usize, fp: u64, params: &BucketParams, now_ns: u64, when_full: WhenFull) -> SetOutcome {
    if set_entries(set).is_none() {
        set.clear();
        set.push(SET_VERSION);
    }
    let entry = |take: &Take| encode_entry(&Entry { fp, state: take.state, full_at: full_at(params, &take.state) });
    if let Some(c) = slots(set).find(|c| u64_at(c.as_slice(), FP_AT) == fp) {
        let e = decode_entry(c.as_slice());
        let take = params.take(Some(e.state), now_ns);
        if !take.allowed {
            return SetOutcome::Taken { take, write: false, table_full: false };
        }
        *c = entry(&take);
        return SetOutcome::Taken { take, write: true, table_full: false };
    }
    let fresh = params.take(None, now_ns);
    // A free slot: a bucket that is full again (reused first, so values
    // stay short), else one never used.
    if let Some(c) = slots(set).find(|c| u64_at(c.as_slice(), FULL_AT) <= now_ns) {
        *c = entry(&fresh);
        return SetOutcome::Taken { take: fresh, write: true, table_full: false };
    }
    if slots(set).len() < capacity {
        set.extend_from_slice(&entry(&fresh));
        return SetOutcome::Taken { take: fresh, write: true, table_full: false };
    }
    match when_full {
        WhenFull::Evict => {
            // The bucket that would be full soonest loses the least.
            match slots(set).min_by_key(|c| u64_at(c.as_slice(), FULL_AT)) {
                Some(v) => *v = entry(&fresh),
                // capacity 0 cannot happen (slots >= 1); answer without a bucket
                None => return SetOutcome::AllowedFull,
            }
            SetOutcome::Taken { take: fresh, write: true, table_full: true }
        }
        WhenFull::Limit => {
            // Retry when the first bucket of the set is full (a slot frees).
            let soonest = slots(set).map(|c| u64_at(c.as_slice(), FULL_AT)).min().unwrap_or(now_ns);
            let secs = soonest.saturating_sub(now_ns).div_ceil(1_000_000_000).max(1);
            let take = Take { allowed: false, remaining: 0, reset_secs: secs, retry_after_secs: secs, ..fresh };
            SetOutcome::Taken { take, write: false, table_full: true }
        }
        WhenFull::Allow => SetOutcome::AllowedFull,
    }
}

/// The outcome of asking the shared table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shared {
    /// The bucket answered; `conflicts` CAS mismatches were retried.
    Taken { take: Take, conflicts: u32, table_full: bool },
    /// Let through without a bucket: the set was full under
    /// [`WhenFull::Allow`] (`table_full`), or the set could not be updated
    /// (persistent conflict, host error, missing set).
    FailOpen { reason: String, conflicts: u32, table_full: bool },
}

/// Take one request from `fp`'s bucket in set `set`: read the set, decide,
/// write it back with compare-and-swap; on a conflict, decide again on the
/// new value, up to [`MAX_CAS_ATTEMPTS`] times. A limited request writes nothing.
#[inline]
pub fn take_shared(
    store: &mut dyn SlotStore,
    layout: Layout,
    at: Placement,
    params: &BucketParams,
    now_ns: u64,
    when_full: WhenFull,
) -> Shared {
    let key = Layout::key(at.set);
    let capacity = layout.capacity(at.set);
    let mut conflicts = 0;
    for _ in 0..MAX_CAS_ATTEMPTS {
        let (mut bytes, cas) = match store.get(&key) {
            Ok(Some(v)) => v,
            // Never created here: a create cannot be atomic.
            Ok(None) => return Shared::FailOpen { reason: format!("shared-data key {key} does not exist"), conflicts, table_full: false },
            Err(reason) => return Shared::FailOpen { reason, conflicts, table_full: false },
        };
        match decide_in_set(&mut bytes, capacity, at.fp, params, now_ns, when_full) {
            SetOutcome::AllowedFull => {
                return Shared::FailOpen { reason: format!("set {key} is full (tableFull: allow)"), conflicts, table_full: true }
            }
            SetOutcome::Taken { take, write: false, table_full } => return Shared::Taken { take, conflicts, table_full },
            SetOutcome::Taken { take, write: true, table_full } => match store.set(&key, &bytes, cas) {
                Ok(true) => return Shared::Taken { take, conflicts, table_full },
                Ok(false) => conflicts += 1,
                Err(reason) => return Shared::FailOpen { reason, conflicts, table_full: false },
            },
        }
    }
    Shared::FailOpen { reason: format!("{MAX_CAS_ATTEMPTS} compare-and-swap conflicts in a row"), conflicts, table_full: false }
}

/// An in-memory [`SlotStore`] that behaves like Envoy's shared data: CAS
/// tokens from a counter that skips 0, and a write to a missing key always
/// succeeds whatever token it carries. For tests (here and in the tests crate).
#[derive(Debug, Default)]
pub struct MemoryStore {
    pub data: std::collections::HashMap<String, (Vec<u8>, u32)>,
    next_cas: u32,
}

impl MemoryStore {
    fn cas(&mut self) -> u32 {
        self.next_cas = self.next_cas.wrapping_add(1).max(1);
        self.next_cas
    }
}

impl SlotStore for MemoryStore {
    fn get(&mut self, key: &str) -> Result<Option<(Vec<u8>, u32)>, String> {
        Ok(self.data.get(key).cloned())
    }
    fn set(&mut self, key: &str, value: &[u8], cas: u32) -> Result<bool, String> {
        if let Some((_, current)) = self.data.get(key) {
            if cas != 0 && cas != *current {
                return Ok(false);
            }
        }
        let token = self.cas();
        self.data.insert(key.to_string(), (value.to_vec(), token));
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use super::super::bucket::COST_MILLI;
    use super::*;

    const SEC: u64 = 1_000_000_000;
    const DAY: u64 = 86_400 * SEC;

    /// burst requests, refilled at one request per `unit_ns`.
    fn params(burst: u64, unit_ns: u64) -> BucketParams {
        BucketParams { capacity: burst * COST_MILLI, refill: COST_MILLI, unit_ns }
    }

    fn prepared(slots: u32) -> (MemoryStore, u64, Layout) {
        let mut store = MemoryStore::default();
        let layout = Layout { slots };
        let seed = prepare(&mut store, layout, &mut || 0x5eed).unwrap();
        (store, seed, layout)
    }

    fn take(store: &mut dyn SlotStore, seed: u64, layout: Layout, key: &[u8], p: &BucketParams, now: u64, wf: WhenFull) -> Shared {
        take_shared(store, layout, place(seed, "p", key, layout), p, now, wf)
    }

    fn allowed(s: &Shared) -> bool {
        matches!(s, Shared::Taken { take, .. } if take.allowed) || matches!(s, Shared::FailOpen { .. })
    }

    #[test]
    fn memory_store_models_envoy() {
        let mut s = MemoryStore::default();
        // a missing key: any token writes
        assert!(s.set("k", b"a", 12345).unwrap());
        let (_, cas) = s.get("k").unwrap().unwrap();
        assert_ne!(cas, 0);
        assert!(!s.set("k", b"b", cas + 1).unwrap());
        assert!(s.set("k", b"c", cas).unwrap());
        assert!(!s.set("k", b"d", cas).unwrap(), "the token changed with the write");
        assert!(s.set("k", b"e", 0).unwrap(), "0 is unconditional");
    }

    #[test]
    fn set_encoding_round_trip_and_garbage() {
        let e = Entry { fp: 0x0102030405060708, state: BucketState { tokens: 5_000, last_ns: 7 }, full_at: 9 };
        let b = encode_set(&[e, e]);
        assert_eq!(b.len(), 1 + 2 * ENTRY_LEN);
        assert_eq!(&b[..9], &[2, 8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(decode_set(&b), vec![e, e]);
        assert_eq!(decode_set(&[SET_VERSION]), vec![]);
        assert_eq!(decode_set(&b[..20]), vec![], "a torn value reads as empty");
        // an older module's 17-byte slot (version 1) reads as an empty set
        let mut v1 = vec![1u8];
        v1.extend_from_slice(&[0; 16]);
        assert_eq!(decode_set(&v1), vec![]);
        assert_eq!(decode_set(&[]), vec![]);
    }

    #[test]
    fn layout_holds_exactly_slots() {
        for slots in [1, 15, 16, 17, 100, 65_536, 1_048_576] {
            let l = Layout { slots };
            let total: usize = (0..l.sets()).map(|s| l.capacity(s)).sum();
            assert_eq!(total, slots as usize, "{slots}");
            assert!((0..l.sets()).all(|s| l.capacity(s) >= 1));
        }
        assert_eq!(Layout { slots: 65_536 }.sets(), 4_096);
        assert_eq!(Layout::key(0xabc), "rl2:abc");
        for s in [0, 1, 15, 16, 255, 256, 4095, 65_535, 1 << 20, u32::MAX - 1, u32::MAX] {
            assert_eq!(Layout::key(s), format!("{KEY_PREFIX}{s:x}").as_str(), "{s}");
        }
    }

    #[test]
    fn prepare_creates_every_set_once_and_keeps_the_seed() {
        let (mut store, seed, layout) = prepared(100);
        assert_eq!(seed, 0x5eed);
        assert_eq!(store.data.len(), 7 + 2, "7 sets, the seed, the ready mark");
        for s in 0..7 {
            assert_eq!(store.get(&Layout::key(s)).unwrap().unwrap().0, vec![SET_VERSION]);
        }
        // a used set is not reset by a later configure (worker, reload)
        let p = params(1, DAY);
        assert!(allowed(&take(&mut store, seed, layout, b"k", &p, SEC, WhenFull::Evict)));
        let before = store.data.clone();
        assert_eq!(prepare(&mut store, layout, &mut || panic!("the seed exists")).unwrap(), 0x5eed);
        assert_eq!(store.data, before);
        // a larger table adds sets, keeps the others
        assert_eq!(prepare(&mut store, Layout { slots: 200 }, &mut || 1).unwrap(), 0x5eed);
        assert_eq!(store.data.len(), 13 + 2);
        let mark = store.get(READY_KEY).unwrap().unwrap().0;
        assert_eq!(mark, 13u32.to_le_bytes());
        for (k, v) in &before {
            if k != READY_KEY {
                assert_eq!(&store.data[k], v, "{k} untouched");
            }
        }
    }

    #[test]
    fn a_missing_set_fails_open_and_is_not_created() {
        let mut store = MemoryStore::default();
        let layout = Layout { slots: 64 };
        let r = take(&mut store, 0, layout, b"k", &params(1, DAY), SEC, WhenFull::Evict);
        assert!(matches!(r, Shared::FailOpen { ref reason, .. } if reason.contains("does not exist")), "{r:?}");
        assert!(store.data.is_empty());
    }

    #[test]
    fn keys_never_share_a_bucket_until_the_set_is_full() {
        // One set of 16 slots: 16 keys each get their own burst of 2.
        let (mut store, seed, layout) = prepared(16);
        let p = params(2, DAY);
        let keys: Vec<Vec<u8>> = (0..16).map(|i| format!("key-{i}").into_bytes()).collect();
        for round in 0..3 {
            for k in &keys {
                let r = take(&mut store, seed, layout, k, &p, SEC, WhenFull::Limit);
                let Shared::Taken { take: t, table_full, .. } = r else { panic!("{r:?}") };
                assert!(!table_full);
                assert_eq!(t.allowed, round < 2, "round {round}");
            }
        }
        // a 17th key finds the set full of mid-budget buckets
        let r = take(&mut store, seed, layout, b"key-16", &p, SEC, WhenFull::Limit);
        let Shared::Taken { take: t, table_full: true, .. } = r else { panic!("{r:?}") };
        assert!(!t.allowed);
        // retry when the first bucket is full: 2 tokens at one a day
        assert_eq!(t.retry_after_secs, 2 * 86_400);
        let r = take_shared(&mut store, layout, place(seed, "p", b"key-16", layout), &p, SEC, WhenFull::Allow);
        assert!(matches!(r, Shared::FailOpen { table_full: true, .. }), "{r:?}");
        let r = take(&mut store, seed, layout, b"key-16", &p, SEC, WhenFull::Evict);
        assert!(matches!(r, Shared::Taken { take: Take { allowed: true, .. }, table_full: true, .. }), "{r:?}");
        assert_eq!(decode_set(&store.get("rl2:0").unwrap().unwrap().0).len(), 16, "memory fixed by slots");
    }

    #[test]
    fn full_buckets_are_taken_over_without_loss() {
        let (mut store, seed, layout) = prepared(1);
        let p = params(3, SEC); // 3 requests, one more each second
        assert!(allowed(&take(&mut store, seed, layout, b"a", &p, 100 * SEC, WhenFull::Limit)));
        // "a" used one token: full again 1 s later; until then "b" finds the set full
        let r = take(&mut store, seed, layout, b"b", &p, 100 * SEC + SEC - 1, WhenFull::Limit);
        assert!(matches!(r, Shared::Taken { take: Take { allowed: false, retry_after_secs: 1, .. }, table_full: true, .. }), "{r:?}");
        // from then on a's bucket equals a new one: b takes the slot, not counted as full
        let r = take(&mut store, seed, layout, b"b", &p, 101 * SEC, WhenFull::Limit);
        assert!(matches!(r, Shared::Taken { take: Take { allowed: true, remaining: 2, .. }, table_full: false, .. }), "{r:?}");
        // and "a" coming back is exactly where a full bucket would be
        let r = take(&mut store, seed, layout, b"a", &p, 105 * SEC, WhenFull::Evict);
        assert!(matches!(r, Shared::Taken { take: Take { allowed: true, remaining: 2, .. }, table_full: false, .. }), "{r:?}");
    }

    #[test]
    fn evicts_the_bucket_full_soonest() {
        let e = |fp, full_at| Entry { fp, state: BucketState { tokens: 0, last_ns: 0 }, full_at };
        let mut set = encode_set(&[e(1, 50 * SEC), e(2, 20 * SEC), e(3, 90 * SEC)]);
        let p = params(1, DAY);
        let SetOutcome::Taken { take, write: true, table_full: true } = decide_in_set(&mut set, 3, 9, &p, 10 * SEC, WhenFull::Evict) else {
            panic!()
        };
        assert!(take.allowed);
        let w = decode_set(&set);
        assert_eq!(w.iter().map(|e| e.fp).collect::<Vec<_>>(), [1, 9, 3]);
        assert_eq!(w[1].full_at, 10 * SEC + DAY);
    }

    /// The in-place update against the same rules on decoded entries,
    /// over random sets (damaged values included), keys and times.
    #[test]
    fn in_place_update_matches_the_rules_on_entries() {
        fn model(mut es: Vec<Entry>, cap: usize, fp: u64, p: &BucketParams, now: u64, wf: WhenFull) -> (Option<Take>, Vec<Entry>) {
            let entry = |t: &Take| Entry { fp, state: t.state, full_at: full_at(p, &t.state) };
            if let Some(e) = es.iter_mut().find(|e| e.fp == fp) {
                let t = p.take(Some(e.state), now);
                if t.allowed {
                    *e = entry(&t);
                }
                return (Some(t), es);
            }
            let t = p.take(None, now);
            if let Some(e) = es.iter_mut().find(|e| e.full_at <= now) {
                *e = entry(&t);
            } else if es.len() < cap {
                es.push(entry(&t));
            } else {
                match wf {
                    WhenFull::Evict => *es.iter_mut().min_by_key(|e| e.full_at).unwrap() = entry(&t),
                    WhenFull::Limit => return (None, es),
                    WhenFull::Allow => return (None, es),
                }
            }
            (Some(t), es)
        }
        let mut rand = meshpatterns_core::test_rand(0x5e7);
        for round in 0..20_000 {
            let p = params(1 + rand() % 3, SEC * (1 + rand() % 5));
            let cap = 1 + (rand() % 16) as usize;
            let n = (rand() as usize) % (cap + 1);
            let entries: Vec<Entry> = (0..n)
                .map(|_| {
                    let t = p.take(None, rand() % (20 * SEC));
                    let fp = rand() % 8;
                    Entry { fp, state: t.state, full_at: full_at(&p, &t.state) }
                })
                .collect();
            let mut bytes = encode_set(&entries);
            if round % 50 == 0 {
                bytes.truncate(bytes.len() - 1); // damaged: reads as empty
            }
            let fp = rand() % 10;
            let now = rand() % (30 * SEC);
            let wf = [WhenFull::Evict, WhenFull::Limit, WhenFull::Allow][(rand() % 3) as usize];
            let (want_take, want) = model(decode_set(&bytes), cap, fp, &p, now, wf);
            let before = decode_set(&bytes);
            let got = decide_in_set(&mut bytes, cap, fp, &p, now, wf);
            match got {
                SetOutcome::Taken { take, write, .. } => {
                    if take.allowed {
                        assert_eq!(Some(take), want_take, "round {round}");
                    } else {
                        assert!(want_take.is_none_or(|t| !t.allowed), "round {round}");
                    }
                    assert_eq!(write, take.allowed, "round {round}");
                    assert_eq!(decode_set(&bytes), if write { want } else { before }, "round {round}");
                }
                SetOutcome::AllowedFull => assert!(want_take.is_none() && wf == WhenFull::Allow, "round {round}"),
            }
            assert_eq!(encode_set(&decode_set(&bytes)), bytes, "round {round}: the bytes stay a valid set");
        }
    }

    #[test]
    fn a_limited_request_writes_nothing() {
        let (mut store, seed, layout) = prepared(64);
        let p = params(1, DAY);
        assert!(allowed(&take(&mut store, seed, layout, b"k", &p, SEC, WhenFull::Evict)));
        let before = store.data.clone();
        let r = take(&mut store, seed, layout, b"k", &p, 2 * SEC, WhenFull::Evict);
        assert!(matches!(r, Shared::Taken { take: Take { allowed: false, .. }, .. }));
        assert_eq!(store.data, before);
    }

    #[test]
    fn byte_keys_stay_apart() {
        let (mut store, seed, layout) = prepared(65_536);
        let p = params(1, DAY);
        for k in [&b"caf\xE9"[..], b"caf\xFF", "caf\u{FFFD}".as_bytes(), b"\xFE", b"\xFF"] {
            assert!(allowed(&take(&mut store, seed, layout, k, &p, SEC, WhenFull::Limit)), "{k:?}");
        }
        // spending \xFF does not limit \xFE, and each is limited on its own
        for k in [&b"\xFF"[..], b"\xFE", b"caf\xE9"] {
            let r = take(&mut store, seed, layout, k, &p, SEC, WhenFull::Limit);
            assert!(matches!(r, Shared::Taken { take: Take { allowed: false, .. }, table_full: false, .. }), "{k:?}: {r:?}");
        }
    }

    #[test]
    fn the_seed_moves_keys() {
        let layout = Layout { slots: 65_536 };
        let a: Vec<Placement> = (0..64).map(|i| place(1, "p", format!("k{i}").as_bytes(), layout)).collect();
        let b: Vec<Placement> = (0..64).map(|i| place(2, "p", format!("k{i}").as_bytes(), layout)).collect();
        assert!(a.iter().zip(&b).all(|(x, y)| x.fp != y.fp));
        assert!(a.iter().zip(&b).filter(|(x, y)| x.set == y.set).count() < 4);
        // the policy is part of the key; length prefixes keep parts apart
        assert_ne!(place(1, "a", b"bc", layout).fp, place(1, "ab", b"c", layout).fp);
        // vector: XXH64(le32(1) || "p" || "k", seed 0)
        assert_eq!(place(0, "p", b"k", layout).fp, meshpatterns_core::hash::salted_hash64(b"p", b"k"));
    }

    /// A lost update on a set is detected, never absorbed.
    #[test]
    fn conflicts_retry_on_the_new_value() {
        struct Racy {
            inner: MemoryStore,
            /// Before each of our next n writes, another worker writes the set first.
            steal: u32,
            other: Vec<u8>,
        }
        impl SlotStore for Racy {
            fn get(&mut self, key: &str) -> Result<Option<(Vec<u8>, u32)>, String> {
                self.inner.get(key)
            }
            fn set(&mut self, key: &str, value: &[u8], cas: u32) -> Result<bool, String> {
                if self.steal > 0 {
                    self.steal -= 1;
                    let theirs = self.other.clone();
                    self.inner.set(key, &theirs, 0)?;
                }
                self.inner.set(key, value, cas)
            }
        }
        let (inner, seed, layout) = prepared(16);
        let p = params(2, DAY);
        let at = place(seed, "p", b"k", layout);
        // the other worker's write: k's bucket with one token spent
        let spent = p.take(None, SEC);
        let other = encode_set(&[Entry { fp: at.fp, state: spent.state, full_at: full_at(&p, &spent.state) }]);
        let mut store = Racy { inner, steal: 1, other: other.clone() };
        let r = take_shared(&mut store, layout, at, &p, SEC, WhenFull::Evict);
        // we retried on their value: the second token, not a second first one
        assert!(matches!(r, Shared::Taken { take: Take { allowed: true, remaining: 0, .. }, conflicts: 1, .. }), "{r:?}");
        store.steal = MAX_CAS_ATTEMPTS;
        let r = take_shared(&mut store, layout, place(seed, "p", b"other", layout), &p, SEC, WhenFull::Evict);
        assert!(matches!(r, Shared::FailOpen { conflicts: MAX_CAS_ATTEMPTS, .. }), "{r:?}");
    }

    /// Real threads over one store whose operations are atomic one by one
    /// (as the host's are): many workers asking for fresh keys at once with
    /// a burst of 1 never admit a key twice.
    #[test]
    fn concurrent_workers_admit_each_fresh_key_once() {
        struct Locked(Arc<Mutex<MemoryStore>>);
        impl SlotStore for Locked {
            fn get(&mut self, key: &str) -> Result<Option<(Vec<u8>, u32)>, String> {
                let r = self.0.lock().unwrap().get(key);
                std::thread::yield_now();
                r
            }
            fn set(&mut self, key: &str, value: &[u8], cas: u32) -> Result<bool, String> {
                self.0.lock().unwrap().set(key, value, cas)
            }
        }
        let (store, seed, layout) = prepared(4096);
        let store = Arc::new(Mutex::new(store));
        let p = params(1, DAY);
        let keys: Vec<Vec<u8>> = (0..500u32).map(|i| i.to_le_bytes().to_vec()).collect();
        let admitted: Vec<HashMap<Vec<u8>, u32>> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..4)
                .map(|w| {
                    let (store, keys) = (Arc::clone(&store), &keys);
                    s.spawn(move || {
                        let mut mine = Locked(store);
                        let mut seen = HashMap::new();
                        for k in keys.iter().cycle().skip(w * 7).take(keys.len()) {
                            match take(&mut mine, seed, layout, k, &p, SEC, WhenFull::Limit) {
                                Shared::Taken { take, .. } if take.allowed => *seen.entry(k.clone()).or_insert(0) += 1,
                                Shared::Taken { .. } => {}
                                other => panic!("{other:?}"),
                            }
                        }
                        seen
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        let mut total: HashMap<Vec<u8>, u32> = HashMap::new();
        for m in admitted {
            for (k, n) in m {
                *total.entry(k).or_default() += n;
            }
        }
        assert_eq!(total.len(), keys.len(), "every key admitted once");
        assert!(total.values().all(|n| *n == 1), "{:?}", total.values().max());
    }
}
