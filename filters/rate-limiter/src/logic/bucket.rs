//! Token-bucket arithmetic in integers: milli-tokens and nanoseconds.
//!
//! A bucket holds at most `capacity` milli-tokens and gains `refill`
//! milli-tokens every `unit_ns` nanoseconds; a request costs [`COST_MILLI`].
//! Integer milli-tokens let a config divide a budget across replicas
//! (`100/s` over 3 replicas is 33,333 milli-tokens per second) without
//! floating point, so wasm and native compute the same figures.
//!
//! Refill keeps its remainder: the bucket's `last_ns` only advances by the
//! time the credited milli-tokens account for, so updates arriving every few
//! microseconds still add up to the configured rate instead of rounding down
//! to nothing.

/// What one request costs, in milli-tokens.
pub const COST_MILLI: u64 = 1000;

/// A clock step backwards larger than this resets the bucket's clock (no
/// refill, no penalty); smaller ones (another worker read the clock a few
/// microseconds later and wrote first) are absorbed without refill.
pub const MAX_CLOCK_SKEW_NS: u64 = 1_000_000_000;

/// Fixed parameters of one policy's buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketParams {
    /// Most milli-tokens a bucket holds (the burst).
    pub capacity: u64,
    /// Milli-tokens gained per `unit_ns` (the rate), at least 1.
    pub refill: u64,
    /// Length of the rate's unit in nanoseconds, at least 1.
    pub unit_ns: u64,
}

/// The stored state of one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketState {
    pub tokens: u64,
    pub last_ns: u64,
}

/// The result of asking a bucket for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Take {
    pub allowed: bool,
    /// The state to store (equal to the refilled state when not allowed).
    pub state: BucketState,
    /// Whole requests left after this one.
    pub remaining: u64,
    /// Whole requests the full bucket holds.
    pub limit: u64,
    /// Seconds until the bucket is full again (rounded up).
    pub reset_secs: u64,
    /// Seconds until the next request would be allowed (rounded up, at least
    /// 1); 0 when one would be allowed now.
    pub retry_after_secs: u64,
}

/// `a * b / c` rounded down (`u64::MAX` when `c` is 0 or the quotient does
/// not fit). In 64 bits when the product fits: wasm has no 128-bit
/// arithmetic, and its emulation costs hundreds of instructions a request.
#[inline]
fn mul_div(a: u64, b: u64, c: u64) -> u64 {
    if fits_u64(a, b) && c != 0 {
        return a * b / c;
    }
    let q = (a as u128).saturating_mul(b as u128).checked_div(c as u128).unwrap_or(u128::MAX);
    u64::try_from(q).unwrap_or(u64::MAX)
}

/// Whether `a * b` surely fits in 64 bits: their bit lengths add up to at
/// most 64 (`checked_mul` would itself multiply in 128 bits on wasm).
#[inline]
fn fits_u64(a: u64, b: u64) -> bool {
    a.leading_zeros() + b.leading_zeros() >= 64
}

fn ceil_div(a: u128, b: u128) -> u128 {
    if b == 0 {
        return u128::MAX;
    }
    a.div_ceil(b)
}

impl BucketParams {
    /// Nanoseconds to gain `milli` milli-tokens, rounded up.
    #[inline]
    pub fn ns_for(&self, milli: u64) -> u64 {
        // In 64 bits when the product fits (see `mul_div`).
        if fits_u64(milli, self.unit_ns) && self.refill != 0 {
            return (milli * self.unit_ns).div_ceil(self.refill);
        }
        let ns = ceil_div(milli as u128 * self.unit_ns as u128, self.refill as u128);
        u64::try_from(ns).unwrap_or(u64::MAX)
    }

    /// Seconds (rounded up) to gain `milli` milli-tokens.
    pub fn secs_for(&self, milli: u64) -> u64 {
        let ns = self.ns_for(milli);
        ns.div_ceil(1_000_000_000)
    }

    /// The bucket at `now_ns`: a new bucket is full; an existing one gains
    /// what the elapsed time is worth, up to the capacity.
    #[inline]
    pub fn refill(&self, state: Option<BucketState>, now_ns: u64) -> BucketState {
        let Some(s) = state else {
            return BucketState { tokens: self.capacity, last_ns: now_ns };
        };
        let tokens = s.tokens.min(self.capacity);
        if now_ns <= s.last_ns {
            let behind = s.last_ns - now_ns;
            let last_ns = if behind > MAX_CLOCK_SKEW_NS { now_ns } else { s.last_ns };
            return BucketState { tokens, last_ns };
        }
        let elapsed = now_ns - s.last_ns;
        let gained = mul_div(elapsed, self.refill, self.unit_ns);
        let room = self.capacity - tokens;
        if gained >= room {
            return BucketState { tokens: self.capacity, last_ns: now_ns };
        }
        // Advance the clock only by the time the credited milli-tokens
        // account for (rounded down, never past now): the remainder counts
        // towards the next refill.
        let used_ns = mul_div(gained, self.unit_ns, self.refill).min(elapsed);
        BucketState { tokens: tokens + gained, last_ns: s.last_ns + used_ns }
    }

    /// Ask for one request at `now_ns`.
    #[inline]
    pub fn take(&self, state: Option<BucketState>, now_ns: u64) -> Take {
        let mut s = self.refill(state, now_ns);
        let allowed = s.tokens >= COST_MILLI;
        if allowed {
            s.tokens -= COST_MILLI;
        }
        let retry_after_secs = if s.tokens >= COST_MILLI { 0 } else { self.secs_for(COST_MILLI - s.tokens).max(1) };
        Take {
            allowed,
            state: s,
            remaining: s.tokens / COST_MILLI,
            limit: self.capacity / COST_MILLI,
            reset_secs: self.secs_for(self.capacity - s.tokens),
            retry_after_secs,
        }
    }

    /// Seconds for an empty bucket to fill up (the window of the IETF
    /// `RateLimit-Policy` header), at least 1.
    pub fn window_secs(&self) -> u64 {
        self.secs_for(self.capacity).max(1)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn params(rate: u64, burst: u64) -> BucketParams {
        BucketParams { capacity: burst * COST_MILLI, refill: rate * COST_MILLI, unit_ns: SEC }
    }

    #[test]
    fn burst_then_limited() {
        let p = params(10, 20);
        let mut s = None;
        for i in 0..20 {
            let t = p.take(s, 1_000 * SEC);
            assert!(t.allowed, "request {i}");
            assert_eq!((t.remaining, t.limit), (19 - i, 20));
            s = Some(t.state);
        }
        let t = p.take(s, 1_000 * SEC);
        assert!(!t.allowed);
        assert_eq!((t.remaining, t.retry_after_secs, t.reset_secs), (0, 1, 2));
    }

    #[test]
    fn the_64_bit_path_agrees_with_128_bits() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            x >> (x % 64)
        };
        for _ in 0..20_000 {
            let (a, b, c) = (next(), next(), next());
            let want = u64::try_from((a as u128).saturating_mul(b as u128).checked_div(c as u128).unwrap_or(u128::MAX)).unwrap_or(u64::MAX);
            assert_eq!(mul_div(a, b, c), want, "{a} {b} {c}");
            let p = BucketParams { capacity: 1, refill: c, unit_ns: b };
            let want = if c == 0 { u64::MAX } else { u64::try_from((a as u128 * b as u128).div_ceil(c as u128)).unwrap_or(u64::MAX) };
            assert_eq!(p.ns_for(a), want, "{a} {b} {c}");
        }
    }

    #[test]
    fn refills_at_the_rate_up_to_capacity() {
        let p = params(10, 20);
        let empty = BucketState { tokens: 0, last_ns: 0 };
        assert_eq!(p.refill(Some(empty), SEC / 2).tokens, 5_000);
        assert_eq!(p.refill(Some(empty), 100 * SEC), BucketState { tokens: 20_000, last_ns: 100 * SEC });
        let t = p.take(Some(empty), SEC / 10);
        assert!(t.allowed);
        assert_eq!((t.remaining, t.retry_after_secs, t.reset_secs), (0, 1, 2));
        assert!(!p.take(Some(empty), SEC / 10 - 1).allowed);
    }

    #[test]
    fn frequent_updates_do_not_lose_refill() {
        // 3 per second = 3 milli-tokens per ms; update every 100 µs (0.3
        // milli-tokens each): without the carried remainder nothing accrues.
        let p = params(3, 100);
        let mut s = BucketState { tokens: 0, last_ns: 0 };
        let mut now = 0;
        while now < 10 * SEC {
            now += 100_000;
            s = p.refill(Some(s), now);
        }
        assert!((29_999..=30_000).contains(&s.tokens), "{s:?}");
    }

    #[test]
    fn clock_steps() {
        let p = params(1, 5);
        let s = BucketState { tokens: 1_000, last_ns: 10 * SEC };
        // another worker wrote a slightly later reading: no refill, no change
        assert_eq!(p.refill(Some(s), 10 * SEC - 500), s);
        // the wall clock jumped back an hour: restart the clock from now
        assert_eq!(p.refill(Some(s), 5), BucketState { tokens: 1_000, last_ns: 5 });
        // a stored value above capacity (config lowered the burst) is clamped
        let big = BucketState { tokens: 99_000, last_ns: 0 };
        assert_eq!(p.refill(Some(big), 0).tokens, 5_000);
    }

    #[test]
    fn divided_budgets_and_long_units() {
        // 100 per minute split across 3 replicas: 33,333 milli-tokens per minute.
        let p = BucketParams { capacity: 100_000 / 3, refill: 100_000 / 3, unit_ns: 60 * SEC };
        let t = p.take(None, 0);
        assert_eq!((t.limit, t.remaining, t.reset_secs), (33, 32, 2));
        assert_eq!(p.window_secs(), 60);
        // no overflow with huge elapsed times
        let s = p.refill(Some(BucketState { tokens: 0, last_ns: 0 }), u64::MAX);
        assert_eq!(s.tokens, p.capacity);
    }
}
