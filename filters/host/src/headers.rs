//! Header maps as Envoy hands them over: one buffer read with one hostcall,
//! values kept as the bytes the client sent.

use std::borrow::Cow;
use std::ops::Range;

/// Every header of a map, as the host serialises it: a u32 count, then a
/// u32 name length and value length per header, then each name and value
/// followed by a NUL byte (all little-endian).
///
/// Nothing is indexed: a lookup walks the size table in place and stops at
/// the first match. Most requests are asked for one or two names, and an
/// index cost more to build (Envoy 1.40, measured: 0.5 k instructions per
/// request) than the walks it saved. Nor is a filter of the name lengths
/// kept (tried, `make profile`: noting them on the first miss cost
/// rate-limiter 130 instructions per request, with one miss, and saved
/// experiment-splitter 430, with four; on the second miss, +60 and -100).
#[derive(Debug, Default, Clone)]
pub struct HeaderMap {
    buf: Vec<u8>,
    /// Headers the size table can hold (the claimed count, bounded by the
    /// buffer's length: never trust a huge count).
    count: usize,
}

/// The headers of a map in order, as (name, value) ranges of its buffer.
/// A truncated or inconsistent buffer ends the walk at the damage.
struct Walk<'a> {
    sizes: std::slice::ChunksExact<'a, u8>,
    /// Where the next name starts.
    at: usize,
    len: usize,
}

impl Iterator for Walk<'_> {
    type Item = (Range<usize>, Range<usize>);

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        let [a, b, c, d, e, f, g, h] = *self.sizes.next()?.first_chunk::<8>()?;
        let (k, v) = (u32::from_le_bytes([a, b, c, d]) as usize, u32::from_le_bytes([e, f, g, h]) as usize);
        // Name, NUL, value, NUL: both inside the buffer or the map ends here.
        let key_end = self.at.saturating_add(k);
        let val_end = key_end.saturating_add(1).saturating_add(v);
        if val_end > self.len {
            self.sizes = [].chunks_exact(8);
            return None;
        }
        let name = self.at..key_end;
        self.at = val_end.saturating_add(1);
        Some((name, key_end + 1..val_end))
    }
}

impl HeaderMap {
    /// A serialized map. A truncated or inconsistent buffer yields the
    /// headers before the damage (never a panic).
    #[inline]
    pub fn parse(buf: Vec<u8>) -> HeaderMap {
        let claimed = buf.first_chunk::<4>().map_or(0, |a| u32::from_le_bytes(*a) as usize);
        // Each header needs at least 10 bytes.
        let count = claimed.min(buf.len() / 10);
        HeaderMap { buf, count }
    }

    #[inline]
    fn walk(&self) -> Walk<'_> {
        let sizes = self.buf.get(4..4 + 8 * self.count).unwrap_or_default();
        Walk { sizes: sizes.chunks_exact(8), at: 4 + 8 * self.count, len: self.buf.len() }
    }

    /// A map from name/value pairs (tests and tools).
    pub fn from_pairs(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut buf = Vec::new();
        buf.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
        for (k, v) in pairs {
            buf.extend_from_slice(&(k.len() as u32).to_le_bytes());
            buf.extend_from_slice(&(v.len() as u32).to_le_bytes());
        }
        for (k, v) in pairs {
            buf.extend_from_slice(k.as_bytes());
            buf.push(0);
            buf.extend_from_slice(v);
            buf.push(0);
        }
        HeaderMap::parse(buf)
    }

    /// Every (name, value) pair in order.
    #[inline]
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.walk().filter_map(|(k, v)| Some((self.buf.get(k)?, self.buf.get(v)?)))
    }

    pub fn len(&self) -> usize {
        self.walk().count()
    }

    pub fn is_empty(&self) -> bool {
        self.walk().next().is_none()
    }

    /// First value of `name` (lowercase); for `cookie`, every copy joined
    /// with `"; "` (HTTP/2 clients send one header per cookie).
    #[inline]
    pub fn get(&self, name: &str) -> Option<Cow<'_, [u8]>> {
        let name = name.as_bytes();
        let mut walk = self.walk();
        let value = self.next_value(&mut walk, name)?;
        if name != b"cookie" {
            return Some(Cow::Borrowed(value));
        }
        let Some(second) = self.next_value(&mut walk, name) else { return Some(Cow::Borrowed(value)) };
        let mut all = value.to_vec();
        let mut at = Some(second);
        while let Some(v) = at {
            all.extend_from_slice(b"; ");
            all.extend_from_slice(v);
            at = self.next_value(&mut walk, name);
        }
        Some(Cow::Owned(all))
    }

    #[inline]
    pub fn has(&self, name: &str) -> bool {
        self.next_value(&mut self.walk(), name.as_bytes()).is_some()
    }

    /// The value of the next header named `name` on the walk. Names of
    /// another length are passed over without reading their bytes.
    #[inline]
    fn next_value(&self, walk: &mut Walk<'_>, name: &[u8]) -> Option<&[u8]> {
        walk.find_map(|(k, v)| {
            if k.end - k.start != name.len() || !self.buf.get(k).is_some_and(|n| same_bytes(n, name)) {
                return None;
            }
            self.buf.get(v)
        })
    }
}

/// `a == b` for two names of the same length, eight bytes at a time: a
/// slice comparison is a call to libc's byte-by-byte `memcmp`.
#[inline]
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    let (mut a8, mut b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let words = a8
        .by_ref()
        .zip(b8.by_ref())
        .all(|(x, y)| x.first_chunk::<8>().map(|x| u64::from_ne_bytes(*x)) == y.first_chunk::<8>().map(|y| u64::from_ne_bytes(*y)));
    words && a.len() == b.len() && a8.remainder().iter().zip(b8.remainder()).all(|(x, y)| x == y)
}

/// A property's bytes as text (`source.address`, `plugin_name`): `None` when
/// they are not UTF-8.
#[inline]
pub fn property_text(bytes: Vec<u8>) -> Option<String> {
    String::from_utf8(bytes).ok()
}

/// An integer property: Envoy serialises them as 8 little-endian bytes
/// (bytes past the eighth are ignored; fewer is `None`).
#[inline]
pub fn property_i64(bytes: &[u8]) -> Option<i64> {
    let arr: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
    Some(i64::from_le_bytes(arr))
}

/// A `:status` header value as a number: ASCII digits (an optional `+`
/// first, as `str::parse` takes), surrounding ASCII whitespace ignored;
/// `None` for anything else or past `u32::MAX`. Read byte by byte: this
/// runs on every response of the modules that count statuses.
#[inline]
pub fn status_code(bytes: &[u8]) -> Option<u32> {
    // What Envoy sends: three digits.
    if let [a @ b'0'..=b'9', b @ b'0'..=b'9', c @ b'0'..=b'9'] = *bytes {
        return Some(u32::from(a - b'0') * 100 + u32::from(b - b'0') * 10 + u32::from(c - b'0'));
    }
    let digits = bytes.trim_ascii();
    let digits = digits.strip_prefix(b"+").unwrap_or(digits);
    if digits.is_empty() {
        return None;
    }
    let mut n: u32 = 0;
    for &b in digits {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u32::from(b - b'0'))?;
    }
    Some(n)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn status_codes_read_as_str_parse_reads_them() {
        for t in [
            "200",
            "999",
            "000",
            "099",
            "20",
            "2000",
            " 503 ",
            "+200",
            "0",
            "007",
            "4294967295",
            "4294967296",
            "",
            "+",
            "-1",
            "2 00",
            "20x",
            "\t404\n",
            "++1",
        ] {
            assert_eq!(status_code(t.as_bytes()), t.trim().parse::<u32>().ok(), "{t:?}");
        }
        assert_eq!(status_code(b"\xff200"), None);
    }

    #[test]
    fn parses_and_survives_damage() {
        let m = HeaderMap::from_pairs(&[(":status", b"200"), ("x", b"\xe9\xff"), ("cookie", b"a=1"), ("cookie", b"b=2")]);
        assert_eq!(m.len(), 4);
        assert_eq!(m.get("x").unwrap().as_ref(), b"\xe9\xff");
        assert_eq!(m.get("cookie").unwrap().as_ref(), b"a=1; b=2");
        assert!(m.get("y").is_none());
        let mut raw = Vec::new();
        raw.extend_from_slice(&1000u32.to_le_bytes());
        assert!(HeaderMap::parse(raw).is_empty());
        let full = HeaderMap::from_pairs(&[("a", b"bc"), ("d", b"e")]).buf.clone();
        for cut in 0..full.len() {
            let m = HeaderMap::parse(full[..cut].to_vec());
            assert!(m.len() <= 2);
        }
        assert_eq!(HeaderMap::parse(full[..full.len() - 2].to_vec()).len(), 1);
    }

    #[test]
    fn same_bytes_is_slice_equality() {
        let mut r = meshpatterns_core::test_rand(0x5eed);
        for _ in 0..20_000 {
            let len = (r() % 40) as usize;
            let a: Vec<u8> = (0..len).map(|_| (r() % 3) as u8).collect();
            let mut b = a.clone();
            if r().is_multiple_of(2) && len > 0 {
                let i = (r() as usize) % len;
                b[i] ^= 1 + (r() % 2) as u8;
            }
            assert_eq!(same_bytes(&a, &b), a == b, "{a:?} {b:?}");
        }
        assert!(!same_bytes(b"abcdefgh", b"abcdefghi"));
    }

    #[test]
    fn lookups_by_length_find_every_name() {
        let long = "x".repeat(70);
        let m = HeaderMap::from_pairs(&[("x-user", b"u"), (long.as_str(), b"l"), (":path", b"/")]);
        assert_eq!(m.get("x-user").unwrap().as_ref(), b"u");
        assert_eq!(m.get(&long).unwrap().as_ref(), b"l");
        assert_eq!(m.get(":path").unwrap().as_ref(), b"/");
        for absent in ["x-usr", "y-user", "x-user-id", &"y".repeat(70), &"x".repeat(134), ""] {
            assert!(m.get(absent).is_none(), "{absent}");
        }
        // Lookups leave the map as it was; a cookie is joined.
        assert_eq!(m.get("x-user").unwrap().as_ref(), b"u");
        assert_eq!(m.get(&long).unwrap().as_ref(), b"l");
        assert!(m.has(":path") && !m.has(":paths"));
        let c = HeaderMap::from_pairs(&[("cookie", b"a=1"), ("x", b"y"), ("cookie", b"b=2")]);
        assert!(!c.has("absent"));
        assert_eq!(c.get("cookie").unwrap().as_ref(), b"a=1; b=2");
        // A damaged map holds the headers before the damage.
        let mut buf = HeaderMap::from_pairs(&[("x-a", b"1"), ("x-bb", b"2")]).buf;
        buf.truncate(buf.len() - 3);
        let d = HeaderMap::parse(buf);
        assert!(!d.has("x-bb") && d.get("x-a").is_some_and(|v| v.as_ref() == b"1"));
    }
}
