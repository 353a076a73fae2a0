//! Header maps as Envoy hands them over: one buffer read with one hostcall,
//! values kept as the bytes the client sent.

use std::borrow::Cow;
use std::ops::Range;

/// Every header of a map, parsed from the host's serialization: a u32 count,
/// then a u32 name length and value length per header, then each name and
/// value followed by a NUL byte (all little-endian).
#[derive(Debug, Default, Clone)]
pub struct HeaderMap {
    buf: Vec<u8>,
    entries: Vec<Entry>,
    /// Bit `len % 64` set for every name length present: most lookups are
    /// of a header the request does not have, and end here.
    lengths: u64,
}

/// The bit of [`HeaderMap::lengths`] for a name of `len` bytes.
#[inline]
fn length_bit(len: usize) -> u64 {
    1u64 << (len % 64)
}

/// Where one header's name and value are in the buffer.
pub(crate) type Entry = (Range<usize>, Range<usize>);

impl HeaderMap {
    /// Parse a serialized map. A truncated or inconsistent buffer yields the
    /// headers read before the damage (never a panic).
    #[inline]
    pub fn parse(buf: Vec<u8>) -> HeaderMap {
        HeaderMap::parse_into(buf, Vec::new())
    }

    /// The same, reusing `entries` (emptied) for the index: see
    /// [`HeaderMap::into_entries`].
    #[inline]
    pub(crate) fn parse_into(buf: Vec<u8>, mut entries: Vec<Entry>) -> HeaderMap {
        entries.clear();
        let mut lengths = 0;
        let count = buf.get(..4).and_then(|s| <[u8; 4]>::try_from(s).ok()).map_or(0, |a| u32::from_le_bytes(a) as usize);
        // Each header needs at least 10 bytes: never trust a huge count.
        let n = count.min(buf.len() / 10);
        let sizes = buf.get(4..4 + 8 * n).unwrap_or_default();
        entries.reserve_exact(n);
        let mut at = 4 + 8 * n;
        for size in sizes.chunks_exact(8) {
            let (k, v) = match <[u8; 8]>::try_from(size) {
                Ok([a, b, c, d, e, f, g, h]) => (u32::from_le_bytes([a, b, c, d]) as usize, u32::from_le_bytes([e, f, g, h]) as usize),
                Err(_) => break,
            };
            // Name, NUL, value, NUL: both inside the buffer or the map ends here.
            let key_end = at.saturating_add(k);
            let val_end = key_end.saturating_add(1).saturating_add(v);
            if val_end > buf.len() {
                break;
            }
            lengths |= length_bit(k);
            entries.push((at..key_end, key_end + 1..val_end));
            at = val_end.saturating_add(1);
        }
        HeaderMap { buf, entries, lengths }
    }

    /// The index's vector, for the next [`HeaderMap::parse_into`].
    #[inline]
    pub(crate) fn into_entries(self) -> Vec<Entry> {
        self.entries
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
        self.entries.iter().filter_map(|(k, v)| Some((self.buf.get(k.clone())?, self.buf.get(v.clone())?)))
    }

    #[inline]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// First value of `name` (lowercase); for `cookie`, every copy joined
    /// with `"; "` (HTTP/2 clients send one header per cookie).
    #[inline]
    pub fn get(&self, name: &str) -> Option<Cow<'_, [u8]>> {
        let name = name.as_bytes();
        let first = self.position(name, 0)?;
        let value = self.value_at(first);
        if name != b"cookie" {
            return Some(Cow::Borrowed(value));
        }
        let Some(second) = self.position(name, first + 1) else { return Some(Cow::Borrowed(value)) };
        let mut all = value.to_vec();
        let mut at = Some(second);
        while let Some(i) = at {
            all.extend_from_slice(b"; ");
            all.extend_from_slice(self.value_at(i));
            at = self.position(name, i + 1);
        }
        Some(Cow::Owned(all))
    }

    #[inline]
    pub fn has(&self, name: &str) -> bool {
        self.position(name.as_bytes(), 0).is_some()
    }

    /// The index of the first header named `name` from entry `from` on.
    /// Names of another length are passed over without reading their bytes:
    /// most lookups are of a header the request does not have, or has once.
    #[inline]
    fn position(&self, name: &[u8], from: usize) -> Option<usize> {
        if self.lengths & length_bit(name.len()) == 0 {
            return None;
        }
        let found = self
            .entries
            .get(from..)?
            .iter()
            .position(|(k, _)| k.end - k.start == name.len() && self.buf.get(k.clone()).is_some_and(|n| same_bytes(n, name)));
        found.map(|p| p + from)
    }

    #[inline]
    fn value_at(&self, i: usize) -> &[u8] {
        self.entries.get(i).and_then(|(_, v)| self.buf.get(v.clone())).unwrap_or_default()
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
        // Lengths 6 and 70 share a bit of the length mask (70 % 64 == 6).
        let long = "x".repeat(70);
        let m = HeaderMap::from_pairs(&[("x-user", b"u"), (long.as_str(), b"l"), (":path", b"/")]);
        assert_eq!(m.get("x-user").unwrap().as_ref(), b"u");
        assert_eq!(m.get(&long).unwrap().as_ref(), b"l");
        assert_eq!(m.get(":path").unwrap().as_ref(), b"/");
        for absent in ["x-usr", "y-user", "x-user-id", &"y".repeat(70), &"x".repeat(134), ""] {
            assert!(m.get(absent).is_none(), "{absent}");
        }
        let reused = HeaderMap::parse_into(HeaderMap::from_pairs(&[("a", b"1")]).buf.clone(), m.into_entries());
        assert_eq!((reused.len(), reused.get("a").unwrap().as_ref()), (1, &b"1"[..]));
        assert!(reused.get("x-user").is_none());
    }
}
