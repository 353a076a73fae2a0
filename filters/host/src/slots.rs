//! Live streams by context id.
//!
//! Envoy numbers a VM's contexts one after another, so the live streams are
//! mostly a window of recent ids. A table indexed by the id's low bits
//! (linear probing, at most half full) finds one in a step or two, where a
//! general hash map hashes the key and probes groups on every lookup, and a
//! request looks its stream up four times.

/// Values by `u32` id. Grows when more than half full and never shrinks (as
/// a `HashMap` keeps its capacity): its size follows the most streams a
/// worker had open at once.
pub struct Slots<V> {
    slots: Vec<Option<(u32, V)>>,
    len: usize,
}

impl<V> Default for Slots<V> {
    #[inline]
    fn default() -> Self {
        Slots::new()
    }
}

impl<V> Slots<V> {
    #[inline]
    pub const fn new() -> Slots<V> {
        Slots { slots: Vec::new(), len: 0 }
    }

    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The index of `id`'s slot, or of the empty slot where it would go.
    /// The table is never full, so the probe ends.
    #[inline]
    fn probe(&self, id: u32) -> Option<usize> {
        let mask = self.slots.len().checked_sub(1)?;
        let mut i = id as usize & mask;
        loop {
            match self.slots.get(i)? {
                Some((k, _)) if *k != id => i = (i + 1) & mask,
                _ => return Some(i),
            }
        }
    }

    #[inline]
    fn find(&self, id: u32) -> Option<usize> {
        let i = self.probe(id)?;
        self.slots.get(i)?.as_ref().map(|_| i)
    }

    #[inline]
    pub fn get(&self, id: u32) -> Option<&V> {
        self.slots.get(self.find(id)?)?.as_ref().map(|(_, v)| v)
    }

    #[inline]
    pub fn get_mut(&mut self, id: u32) -> Option<&mut V> {
        let i = self.find(id)?;
        self.slots.get_mut(i)?.as_mut().map(|(_, v)| v)
    }

    #[inline]
    pub fn contains_key(&self, id: u32) -> bool {
        self.find(id).is_some()
    }

    /// Insert or replace.
    #[inline]
    pub fn insert(&mut self, id: u32, value: V) {
        if (self.len + 1) * 2 > self.slots.len() {
            self.grow();
        }
        let Some(slot) = self.probe(id).and_then(|i| self.slots.get_mut(i)) else { return };
        if slot.is_none() {
            self.len += 1;
        }
        *slot = Some((id, value));
    }

    fn grow(&mut self) {
        let size = (self.slots.len() * 2).max(16);
        let old = std::mem::take(&mut self.slots);
        self.slots.resize_with(size, || None);
        self.len = 0;
        for (id, v) in old.into_iter().flatten() {
            self.insert(id, v);
        }
    }

    #[inline]
    pub fn remove(&mut self, id: u32) -> Option<V> {
        let mut hole = self.find(id)?;
        let (_, value) = self.slots.get_mut(hole)?.take()?;
        self.len -= 1;
        // Move back every entry after the hole that probed past it, so that
        // no lookup stops early at the hole.
        let mask = self.slots.len() - 1;
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let Some(Some((k, _))) = self.slots.get(j) else { break };
            let home = *k as usize & mask;
            // The entry at j may move to the hole when its home is not in
            // the cyclic range (hole, j].
            let stays = if hole < j { hole < home && home <= j } else { hole < home || home <= j };
            if !stays {
                let moved = self.slots.get_mut(j).and_then(Option::take);
                if let Some(h) = self.slots.get_mut(hole) {
                    *h = moved;
                }
                hole = j;
            }
        }
        Some(value)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::collections::HashMap;

    /// Random operations checked against `HashMap`: sequential ids with a
    /// few long-lived ones (as Envoy assigns them), and ids that collide.
    #[test]
    fn behaves_as_a_map() {
        let mut rand = crate::test_rand(0x2545_F491_4F6C_DD1Du64);
        for spread in [1u32, 16, 1 << 20] {
            let (mut s, mut m) = (Slots::default(), HashMap::new());
            let (mut next, mut peak) = (1u32, 0);
            for step in 0..20_000u32 {
                match rand(10) {
                    0..=3 => {
                        let id = next.wrapping_mul(spread);
                        next += 1;
                        s.insert(id, step);
                        m.insert(id, step);
                    }
                    4..=6 => {
                        let id = (next.saturating_sub(rand(40) as u32)).wrapping_mul(spread);
                        assert_eq!(s.remove(id), m.remove(&id), "remove {id}");
                    }
                    _ => {
                        let id = (next.saturating_sub(rand(60) as u32)).wrapping_mul(spread);
                        assert_eq!(s.get(id), m.get(&id), "get {id}");
                        if let Some(v) = s.get_mut(id) {
                            *v += 1;
                            *m.get_mut(&id).unwrap() += 1;
                        }
                        assert_eq!(s.contains_key(id), m.contains_key(&id));
                    }
                }
                assert_eq!(s.len(), m.len());
                peak = peak.max(m.len());
            }
            for (id, v) in &m {
                assert_eq!(s.get(*id), Some(v));
            }
            assert!(s.slots.len() <= 4 * peak.max(8), "{} slots for at most {peak} entries", s.slots.len());
        }
    }
}
