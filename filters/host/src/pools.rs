//! The modules' allocator: small blocks from per-size free lists.
//!
//! A request allocates a few small buffers (the header snapshot Envoy copies
//! in, a header value, a shared-data value, a decision's vectors) and frees
//! them before the next. Through Rust's `System` allocator on
//! wasm32-wasip1 each allocation and free is a chain of calls into
//! wasi-libc's dlmalloc, about 650 x86 instructions per pair in wasmtime's
//! code (`make profile-functions`), a fifth of a module's own work per
//! request. Here a block of up to [`LARGEST`] bytes comes from the free list
//! of its size class (powers of two from 16 bytes) in a few instructions,
//! and goes back to it when freed; only an empty list, and larger blocks,
//! reach `System`.
//!
//! Memory stays bounded: a freed block is kept for its class, never given
//! back, so each class holds at most the most blocks of it that were live
//! at once (as dlmalloc itself keeps freed memory in the VM's linear
//! memory, which never shrinks).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::ptr;

/// Size classes: 16, 32, ... 4096 bytes.
const CLASSES: usize = 9;
const SMALLEST: usize = 16;
pub const LARGEST: usize = SMALLEST << (CLASSES - 1);
/// Blocks of a class are allocated with this alignment; a layout that asks
/// for more goes to `System`.
const ALIGN: usize = 8;

/// The class of a layout, if it has one.
#[inline]
fn class(layout: Layout) -> Option<usize> {
    if layout.align() > ALIGN || layout.size() > LARGEST {
        return None;
    }
    let size = layout.size().max(SMALLEST);
    // ceil(log2(size)) - log2(SMALLEST)
    Some((usize::BITS - (size - 1).leading_zeros()) as usize - SMALLEST.trailing_zeros() as usize)
}

#[inline]
fn class_layout(class: usize) -> Option<Layout> {
    Layout::from_size_align(SMALLEST << class, ALIGN).ok()
}

/// Free lists, one per class: each free block holds the address of the next.
pub struct Pools {
    heads: [Cell<*mut u8>; CLASSES],
}

impl Pools {
    pub const fn new() -> Pools {
        Pools { heads: [const { Cell::new(ptr::null_mut()) }; CLASSES] }
    }

    /// # Safety
    /// As [`GlobalAlloc::alloc`]; `self` is used from one thread only.
    #[inline]
    pub unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some((c, head)) = class(layout).and_then(|c| Some((c, self.heads.get(c)?))) else {
            return unsafe { System.alloc(layout) };
        };
        let block = head.get();
        if block.is_null() {
            return match class_layout(c) {
                Some(l) => unsafe { System.alloc(l) },
                None => ptr::null_mut(),
            };
        }
        // SAFETY: a block on a free list is at least 16 bytes, aligned to 8,
        // and its first word is the next free block (written by `dealloc`).
        head.set(unsafe { block.cast::<*mut u8>().read() });
        block
    }

    /// # Safety
    /// As [`GlobalAlloc::dealloc`]; `self` is used from one thread only.
    #[inline]
    pub unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        match class(layout).and_then(|c| self.heads.get(c)) {
            Some(head) => {
                // SAFETY: the block came from `alloc` for the same layout, so
                // from this class: at least 16 bytes, aligned to 8.
                unsafe { block.cast::<*mut u8>().write(head.get()) };
                head.set(block);
            }
            None => unsafe { System.dealloc(block, layout) },
        }
    }

    /// # Safety
    /// As [`GlobalAlloc::realloc`]; `self` is used from one thread only.
    #[inline]
    pub unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let Ok(new_layout) = Layout::from_size_align(new_size, layout.align()) else { return ptr::null_mut() };
        let (old, new) = (class(layout), class(new_layout));
        if old.is_some() && old == new {
            // The block already has room: a vector growing within its class.
            return block;
        }
        if old.is_none() && new.is_none() {
            return unsafe { System.realloc(block, layout, new_size) };
        }
        let moved = unsafe { self.alloc(new_layout) };
        if !moved.is_null() {
            // SAFETY: both blocks hold at least the smaller of the two sizes.
            unsafe { ptr::copy_nonoverlapping(block, moved, layout.size().min(new_size)) };
            unsafe { self.dealloc(block, layout) };
        }
        moved
    }
}

impl Default for Pools {
    fn default() -> Self {
        Pools::new()
    }
}

/// The global allocator of every module built on this crate.
#[cfg(all(target_family = "wasm", not(target_feature = "atomics")))]
mod global {
    use super::Pools;
    use std::alloc::{GlobalAlloc, Layout};

    struct Global(Pools);

    // SAFETY: wasm32 without the atomics feature has no threads: the one
    // thread of the VM is the only user.
    unsafe impl Sync for Global {}

    unsafe impl GlobalAlloc for Global {
        #[inline]
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            unsafe { self.0.alloc(layout) }
        }
        #[inline]
        unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
            unsafe { self.0.dealloc(block, layout) }
        }
        #[inline]
        unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            unsafe { self.0.realloc(block, layout, new_size) }
        }
    }

    #[global_allocator]
    static ALLOCATOR: Global = Global(Pools::new());
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn classes() {
        let c = |size, align| class(Layout::from_size_align(size, align).unwrap());
        assert_eq!([c(0, 1), c(1, 1), c(16, 8), c(17, 1), c(32, 4), c(33, 8)], [Some(0), Some(0), Some(0), Some(1), Some(1), Some(2)]);
        assert_eq!([c(4096, 8), c(4097, 1), c(8, 16)], [Some(8), None, None]);
        assert_eq!(class_layout(8).unwrap().size(), LARGEST);
    }

    /// Random allocations, frees and reallocations: every live block keeps
    /// its bytes, no two overlap, and freed blocks are reused.
    #[test]
    fn blocks_keep_their_bytes_and_are_reused() {
        let pools = Pools::new();
        let mut rand = crate::test_rand(0x9E37_79B9_7F4A_7C15u64);
        let mut live: Vec<(*mut u8, Layout, u8)> = Vec::new();
        let check = |p: *mut u8, l: Layout, fill: u8| {
            // SAFETY: p is live with l.size() bytes.
            let bytes = unsafe { std::slice::from_raw_parts(p, l.size()) };
            assert!(bytes.iter().all(|b| *b == fill), "block {p:?} of {} bytes lost its contents", l.size());
        };
        let mut seen = std::collections::HashSet::new();
        let mut reused = 0;
        for step in 0..20_000u32 {
            match rand(3) {
                0 if !live.is_empty() => {
                    let (p, l, fill) = live.swap_remove(rand(live.len() as u64) as usize);
                    check(p, l, fill);
                    unsafe { pools.dealloc(p, l) };
                }
                1 if !live.is_empty() => {
                    let i = rand(live.len() as u64) as usize;
                    let (p, l, fill) = live[i];
                    check(p, l, fill);
                    let size = rand(6000) as usize + 1;
                    let q = unsafe { pools.realloc(p, l, size) };
                    assert!(!q.is_null());
                    let nl = Layout::from_size_align(size, l.align()).unwrap();
                    check(q, Layout::from_size_align(size.min(l.size()), 1).unwrap(), fill);
                    unsafe { std::ptr::write_bytes(q, fill, size) };
                    live[i] = (q, nl, fill);
                }
                _ => {
                    let size = [rand(64), rand(600), rand(6000)][rand(3) as usize] as usize;
                    let l = Layout::from_size_align(size, [1, 4, 8, 16][rand(4) as usize]).unwrap();
                    let p = unsafe { pools.alloc(l) };
                    assert!(!p.is_null() && (p as usize).is_multiple_of(l.align()));
                    let fill = step as u8;
                    unsafe { std::ptr::write_bytes(p, fill, size) };
                    if !seen.insert(p as usize) {
                        reused += 1;
                    }
                    live.push((p, l, fill));
                }
            }
        }
        for (p, l, fill) in live.drain(..) {
            check(p, l, fill);
            unsafe { pools.dealloc(p, l) };
        }
        assert!(reused > 1000, "{reused} blocks reused");
    }
}
