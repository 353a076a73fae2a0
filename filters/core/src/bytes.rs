//! Short byte strings built on the stack: what a request path concatenates
//! (a key to hash, a shared-data key, a number to write into a header) costs
//! no allocation unless it outgrows the inline buffer. Each allocation is a
//! few hundred instructions in a module's allocator, and a request made
//! several.

use std::ops::Deref;

/// Bytes kept inline up to `N`, moved to the heap past it.
#[derive(Clone)]
pub struct StackBytes<const N: usize> {
    len: usize,
    inline: [u8; N],
    /// Every byte once the inline buffer overflowed (then `len` is unused).
    heap: Option<Vec<u8>>,
}

impl<const N: usize> Default for StackBytes<N> {
    #[inline]
    fn default() -> Self {
        StackBytes { len: 0, inline: [0; N], heap: None }
    }
}

impl<const N: usize> StackBytes<N> {
    #[inline]
    pub fn new() -> Self {
        Self::default()
    }

    #[inline]
    pub fn extend_from_slice(&mut self, more: &[u8]) {
        if let Some(h) = &mut self.heap {
            h.extend_from_slice(more);
            return;
        }
        let end = self.len.saturating_add(more.len());
        match self.inline.get_mut(self.len..end) {
            Some(dst) => {
                dst.copy_from_slice(more);
                self.len = end;
            }
            None => {
                let mut h = Vec::with_capacity(end.saturating_mul(2));
                h.extend_from_slice(self.inline.get(..self.len).unwrap_or_default());
                h.extend_from_slice(more);
                self.heap = Some(h);
            }
        }
    }

    #[inline]
    pub fn push(&mut self, b: u8) {
        self.extend_from_slice(&[b]);
    }

    #[inline]
    pub fn as_slice(&self) -> &[u8] {
        match &self.heap {
            Some(h) => h,
            None => self.inline.get(..self.len).unwrap_or_default(),
        }
    }
}

impl<const N: usize> Deref for StackBytes<N> {
    type Target = [u8];
    #[inline]
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl<const N: usize> AsRef<[u8]> for StackBytes<N> {
    #[inline]
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl<const N: usize> std::fmt::Debug for StackBytes<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(self.as_slice()))
    }
}

impl<const N: usize> PartialEq for StackBytes<N> {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl<const N: usize> Eq for StackBytes<N> {}

/// Text kept inline up to `N` bytes (see [`StackBytes`]); only ever built
/// from `&str`, so always UTF-8.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct StackStr<const N: usize>(StackBytes<N>);

impl<const N: usize> StackStr<N> {
    #[inline]
    pub fn new() -> Self {
        Self::default()
    }
    #[inline]
    pub fn push_str(&mut self, s: &str) {
        self.0.extend_from_slice(s.as_bytes());
    }
    #[inline]
    pub fn as_str(&self) -> &str {
        // SAFETY: only whole `&str`s are ever appended (`push_str`), and a
        // concatenation of UTF-8 strings is UTF-8.
        unsafe { std::str::from_utf8_unchecked(self.0.as_slice()) }
    }
}

impl<const N: usize> Deref for StackStr<N> {
    type Target = str;
    #[inline]
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl<const N: usize> AsRef<[u8]> for StackStr<N> {
    #[inline]
    fn as_ref(&self) -> &[u8] {
        self.0.as_slice()
    }
}

impl<const N: usize> std::fmt::Display for StackStr<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<const N: usize> std::fmt::Debug for StackStr<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl<const N: usize> PartialEq<&str> for StackStr<N> {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn inline_then_heap_keeps_every_byte() {
        let mut b = StackBytes::<4>::new();
        let mut want = Vec::new();
        for i in 0..40u8 {
            let piece: Vec<u8> = (0..i % 5).map(|j| i.wrapping_mul(7).wrapping_add(j)).collect();
            b.extend_from_slice(&piece);
            want.extend_from_slice(&piece);
            assert_eq!(b.as_slice(), want.as_slice(), "after {i}");
        }
        assert!(b.heap.is_some());
        let mut s = StackStr::<8>::new();
        s.push_str("rl2:");
        s.push_str("1f");
        assert_eq!(s, "rl2:1f");
        assert!(s.0.heap.is_none());
        s.push_str("-and-more-than-eight");
        assert_eq!(s.as_str(), "rl2:1f-and-more-than-eight");
        assert_eq!(StackBytes::<0>::new().as_slice(), b"");
    }
}
