//! [`BlockCache`]: a global allocator that keeps large blocks for reuse.
//!
//! # Why
//! A CPU training step allocates and frees the same large tensor buffers at every step (a
//! `[256, 58 560]` f32 head chunk is 60 MB). With glibc's defaults every allocation above the
//! mmap threshold is `mmap`ed and `munmap`ed when freed, so the next step faults in and zeroes
//! every page again: on the issue-18 bench (d_model 256, 4 blocks, vocab 58 560, batch
//! 4 × 256) that doubles the step (2.18 s against 1.07 s). Keeping freed memory in glibc's
//! heap instead (`mmada_model::backend::keep_freed_memory`) is fast, but the heap fragments:
//! peak RSS 866 MB against 723 MB. mimalloc and jemalloc were measured on the same step
//! (`LD_PRELOAD`, 2026-12-06): mimalloc 865 MB at the fast speed or 749 MB at 2.0 s with
//! immediate purging; jemalloc without decay 790 MB at 1.5 s.
//!
//! # How
//! Blocks of at least [`LARGE`] bytes (rounded up to whole pages) come from `mmap`. A freed
//! block goes to a cache of free blocks instead of back to the kernel, merged with the cached
//! blocks next to it in memory. An allocation takes the smallest cached block that fits: up
//! to a quarter longer it is handed out whole, longer it is split and the rest stays cached.
//! With no block that fits, the largest smaller one grows with `mremap` (Linux), so only the
//! new pages are faulted in (a step whose tensor sizes vary a little, as with the number of
//! masked rows, reuses its blocks). Before a block grows or a fresh one is mapped, the blocks
//! freed longest ago are unmapped until the large-block total (live + cached) with the new
//! block stays within the most it has been so far. So the large blocks' resident total never
//! exceeds the most that was ever live at once (blocks handed out whole count with their
//! whole length), while a step that repeats the previous one's sizes reuses every block
//! without a page fault. Smaller allocations go to the system allocator.
//!
//! Install in a binary with
//! ```ignore
//! #[global_allocator]
//! static ALLOC: mmada_host::alloc::BlockCache = mmada_host::alloc::BlockCache::new();
//! ```

#![allow(unsafe_code)] // an allocator: raw memory, mmap and munmap

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

/// The smallest request served by the cache (1 MiB); smaller ones go to [`System`].
pub const LARGE: usize = 1 << 20;
/// Free blocks kept at most (the oldest is unmapped when a freed block finds them all taken).
const SLOTS: usize = 512;
const PAGE: usize = 4096;
/// Slots of the table of live blocks larger than their request (a power of two).
const OVERSIZE: usize = 1024;

/// Counters of a [`BlockCache`], in bytes and events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Bytes of large blocks in use.
    pub live: usize,
    /// Bytes of free large blocks kept for reuse.
    pub cached: usize,
    /// The most `live + cached` has been.
    pub peak: usize,
    /// Large allocations served from the cache.
    pub hits: u64,
    /// Large allocations that mapped a fresh block.
    pub misses: u64,
    /// Large allocations served by growing a smaller cached block in place (only the new
    /// pages are faulted in).
    pub grown: u64,
    /// Cached blocks unmapped to make room or for want of a slot.
    pub evictions: u64,
}

#[derive(Clone, Copy)]
struct Block {
    ptr: usize,
    len: usize,
}

struct State {
    /// Free blocks, oldest first.
    free: [Block; SLOTS],
    n_free: usize,
    /// Live blocks handed out whole for a smaller request (their true length), by address:
    /// open addressing, linear probing, `ptr == 0` empty.
    oversize: [Block; OVERSIZE],
    n_oversize: usize,
    stats: CacheStats,
}

impl State {
    /// Put the free block `b` in the cache as its most recent entry, merged with the cached
    /// blocks right before and after it in memory (the pieces of a split block come back
    /// together), unmapping the oldest entry when every slot is taken.
    fn cache(&mut self, mut b: Block) {
        let mut i = 0;
        while i < self.n_free {
            let f = self.free[i];
            if f.ptr + f.len == b.ptr || b.ptr + b.len == f.ptr {
                b = Block {
                    ptr: f.ptr.min(b.ptr),
                    len: f.len + b.len,
                };
                self.free.copy_within(i + 1..self.n_free, i);
                self.n_free -= 1;
                self.stats.cached -= f.len;
            } else {
                i += 1;
            }
        }
        if self.n_free == SLOTS {
            self.evict_oldest(1);
        }
        self.free[self.n_free] = b;
        self.n_free += 1;
        self.stats.cached += b.len;
    }

    /// Unmap the `k` cached blocks freed longest ago.
    fn evict_oldest(&mut self, k: usize) {
        for b in &self.free[..k] {
            unmap(b.ptr, b.len);
            self.stats.cached -= b.len;
        }
        self.free.copy_within(k..self.n_free, 0);
        self.n_free -= k;
        self.stats.evictions += k as u64;
    }

    fn slot(ptr: usize) -> usize {
        (((ptr as u64) >> 12).wrapping_mul(0x9e37_79b9_7f4a_7c15)
            >> (64 - OVERSIZE.trailing_zeros())) as usize
    }

    /// Record the live block `b` as longer than its request; false when the table is too full.
    fn note_oversize(&mut self, b: Block) -> bool {
        if 4 * (self.n_oversize + 1) > 3 * OVERSIZE {
            return false;
        }
        let mut i = Self::slot(b.ptr);
        while self.oversize[i].ptr != 0 {
            i = (i + 1) % OVERSIZE;
        }
        self.oversize[i] = b;
        self.n_oversize += 1;
        true
    }

    /// The true length of the live block at `ptr` if it was handed out whole for a smaller
    /// request (and forget it), else `len`.
    fn true_len(&mut self, ptr: usize, len: usize) -> usize {
        if self.n_oversize == 0 {
            return len;
        }
        let mut i = Self::slot(ptr);
        while self.oversize[i].ptr != 0 {
            if self.oversize[i].ptr == ptr {
                let found = self.oversize[i].len;
                // backward-shift deletion keeps every probe sequence unbroken
                let mut hole = i;
                let mut j = (i + 1) % OVERSIZE;
                while self.oversize[j].ptr != 0 {
                    let home = Self::slot(self.oversize[j].ptr);
                    // move j into the hole unless its home lies cyclically in (hole, j]
                    let between = if hole <= j {
                        hole < home && home <= j
                    } else {
                        hole < home || home <= j
                    };
                    if !between {
                        self.oversize[hole] = self.oversize[j];
                        hole = j;
                    }
                    j = (j + 1) % OVERSIZE;
                }
                self.oversize[hole] = Block { ptr: 0, len: 0 };
                self.n_oversize -= 1;
                return found;
            }
            i = (i + 1) % OVERSIZE;
        }
        len
    }
}

/// A global allocator caching large blocks for reuse (see the module docs). `const`
/// constructible; thread-safe (one mutex over the cache, taken only for large blocks).
pub struct BlockCache {
    state: Mutex<State>,
    /// Whether freed large blocks are kept ([`BlockCache::set_caching`]).
    caching: AtomicBool,
}

impl Default for BlockCache {
    fn default() -> Self {
        Self::new()
    }
}

fn pages(size: usize) -> usize {
    size.div_ceil(PAGE) * PAGE
}

fn is_large(layout: &Layout) -> bool {
    // `mmap` is Unix's: elsewhere everything goes to the system allocator
    cfg!(unix) && layout.size() >= LARGE && layout.align() <= PAGE && enabled()
}

/// 0: not yet read; 1: on; 2: off (`MMADA_BLOCK_CACHE=0`).
static ENABLED: AtomicU8 = AtomicU8::new(0);

/// Whether large blocks are ours: `MMADA_BLOCK_CACHE=0` sends every allocation to the system
/// allocator (to compare with it). Read once, at the first large request, with `getenv`
/// (which does not allocate), so the answer never changes while blocks are live.
fn enabled() -> bool {
    match ENABLED.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            // SAFETY: a NUL-terminated name; the result is read at once, before any other
            // call could change the environment in this allocation path.
            let off = unsafe {
                let v = libc::getenv(c"MMADA_BLOCK_CACHE".as_ptr());
                !v.is_null() && *v == b'0' as libc::c_char && *v.add(1) == 0
            };
            let state = if off { 2 } else { 1 };
            // the first reader decides; later readers take its answer
            match ENABLED.compare_exchange(0, state, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => state == 1,
                Err(s) => s == 1,
            }
        }
    }
}

/// Map `len` fresh (zeroed) bytes; null on failure.
#[cfg(not(unix))]
fn map(_len: usize) -> *mut u8 {
    ptr::null_mut()
}

#[cfg(not(unix))]
fn unmap(_ptr: usize, _len: usize) {}

/// Map `len` fresh (zeroed) bytes; null on failure.
#[cfg(unix)]
fn map(len: usize) -> *mut u8 {
    // SAFETY: an anonymous private mapping at an address of the kernel's choosing touches no
    // existing memory.
    let p = unsafe {
        libc::mmap(
            ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        ptr::null_mut()
    } else {
        p.cast()
    }
}

/// Grow the block of `old` bytes at `ptr` to `new` bytes, moving it if need be (its pages
/// move with it, none is copied or faulted in again); null on failure.
#[cfg(target_os = "linux")]
fn grow(ptr: usize, old: usize, new: usize) -> *mut u8 {
    // SAFETY: `ptr..ptr + old` is a whole mapping of ours that nobody else holds.
    let p = unsafe { libc::mremap(ptr as *mut libc::c_void, old, new, libc::MREMAP_MAYMOVE) };
    if p == libc::MAP_FAILED {
        ptr::null_mut()
    } else {
        p.cast()
    }
}

#[cfg(not(target_os = "linux"))]
fn grow(_ptr: usize, _old: usize, _new: usize) -> *mut u8 {
    ptr::null_mut()
}

/// Return `len` bytes at `ptr` (page aligned, inside a block of ours) to the kernel.
#[cfg(unix)]
fn unmap(ptr: usize, len: usize) {
    if len > 0 {
        // SAFETY: callers pass whole pages of a mapping this allocator made and no longer
        // hands out.
        unsafe { libc::munmap(ptr as *mut libc::c_void, len) };
    }
}

impl BlockCache {
    /// An empty cache.
    pub const fn new() -> Self {
        BlockCache {
            state: Mutex::new(State {
                free: [Block { ptr: 0, len: 0 }; SLOTS],
                n_free: 0,
                oversize: [Block { ptr: 0, len: 0 }; OVERSIZE],
                n_oversize: 0,
                stats: CacheStats {
                    live: 0,
                    cached: 0,
                    peak: 0,
                    hits: 0,
                    misses: 0,
                    grown: 0,
                    evictions: 0,
                },
            }),
            caching: AtomicBool::new(true),
        }
    }

    /// Keep freed large blocks for reuse (`true`, the default) or unmap them at once
    /// (`false`: glibc's behaviour above its mmap threshold; what is cached is released).
    pub fn set_caching(&self, on: bool) {
        self.caching.store(on, Ordering::Relaxed);
        if !on {
            self.release_cached();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The counters now.
    pub fn stats(&self) -> CacheStats {
        self.lock().stats
    }

    /// Unmap every cached free block (e.g. after a phase whose sizes will not recur).
    pub fn release_cached(&self) {
        let mut s = self.lock();
        let n = s.n_free;
        s.evict_oldest(n);
    }

    /// A large block of exactly `len` bytes (whole pages) and how many of its leading bytes
    /// may hold old data (the rest is fresh from the kernel, zeroed); null on failure.
    fn take(&self, len: usize) -> (*mut u8, usize) {
        let mut guard = self.lock();
        let s = &mut *guard;
        // the smallest cached block that fits (best fit; the most recent on ties), else the
        // largest smaller one, which grows in place (Linux `mremap`)
        let mut fit: Option<usize> = None;
        let mut below: Option<usize> = None;
        for i in 0..s.n_free {
            let b = s.free[i].len;
            if b >= len {
                if fit.is_none_or(|j| b <= s.free[j].len) {
                    fit = Some(i);
                }
            } else if cfg!(target_os = "linux") && below.is_none_or(|j| b >= s.free[j].len) {
                below = Some(i);
            }
        }
        let chosen = fit.or(below).map(|i| {
            let b = s.free[i];
            s.free.copy_within(i + 1..s.n_free, i);
            s.n_free -= 1;
            s.stats.cached -= b.len;
            b
        });
        if let Some(b) = chosen.filter(|b| b.len >= len) {
            s.stats.hits += 1;
            if b.len == len || (b.len - len <= len / 4 && s.note_oversize(b)) {
                // up to a quarter longer: handed out whole (no system call; the next request
                // of its own size finds it again)
                s.stats.live += b.len;
            } else {
                // longer: split, the rest stays cached (its pages stay resident and reusable)
                s.stats.live += len;
                s.cache(Block {
                    ptr: b.ptr + len,
                    len: b.len - len,
                });
            }
            return (b.ptr as *mut u8, len);
        }
        // the block must grow, or a fresh one be mapped: first unmap the oldest free blocks
        // while the result would raise the peak
        let (mut evict, mut total) = (0, s.stats.live + s.stats.cached + len);
        while evict < s.n_free && total > s.stats.peak {
            total -= s.free[evict].len;
            evict += 1;
        }
        s.evict_oldest(evict);
        if chosen.is_some() {
            s.stats.grown += 1;
        } else {
            s.stats.misses += 1;
        }
        drop(guard);
        let (p, dirty) = match chosen.map(|b| (grow(b.ptr, b.len, len), b)) {
            Some((p, b)) if !p.is_null() => (p, b.len),
            Some((_, b)) => {
                unmap(b.ptr, b.len);
                (map(len), 0)
            }
            None => (map(len), 0),
        };
        if !p.is_null() {
            let mut s = self.lock();
            s.stats.live += len;
            s.stats.peak = s.stats.peak.max(s.stats.live + s.stats.cached);
        }
        (p, dirty)
    }

    /// Give back a large block of `len` bytes (whole pages).
    fn give(&self, ptr: *mut u8, len: usize) {
        let mut guard = self.lock();
        let s = &mut *guard;
        let len = s.true_len(ptr as usize, len);
        s.stats.live -= len;
        if !self.caching.load(Ordering::Relaxed) {
            unmap(ptr as usize, len);
            return;
        }
        s.cache(Block {
            ptr: ptr as usize,
            len,
        });
    }
}

// SAFETY: large blocks are whole-page anonymous mappings (page aligned, so any alignment up
// to a page is met), handed out to one owner at a time (a block is either in the free list or
// live, under the mutex) and never touched by the cache while live; everything else is the
// system allocator's.
unsafe impl GlobalAlloc for BlockCache {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !is_large(&layout) {
            // SAFETY: forwarded as received.
            return unsafe { System.alloc(layout) };
        }
        self.take(pages(layout.size())).0
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !is_large(&layout) {
            // SAFETY: forwarded as received.
            return unsafe { System.alloc_zeroed(layout) };
        }
        let (p, dirty) = self.take(pages(layout.size()));
        if !p.is_null() {
            // SAFETY: `p` is a live block of at least `layout.size()` bytes.
            unsafe { ptr::write_bytes(p, 0, dirty.min(layout.size())) };
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if !is_large(&layout) {
            // SAFETY: a small block came from the system allocator with this layout.
            return unsafe { System.dealloc(ptr, layout) };
        }
        self.give(ptr, pages(layout.size()));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees a valid layout for `new_size` with the same alignment.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        if !is_large(&layout) && !is_large(&new_layout) {
            // SAFETY: both sizes belong to the system allocator.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        if is_large(&layout) && is_large(&new_layout) && pages(new_size) == pages(layout.size()) {
            return ptr;
        }
        // SAFETY: as `GlobalAlloc::realloc`'s default: a new block, copy, free the old one.
        unsafe {
            let new = self.alloc(new_layout);
            if !new.is_null() {
                ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            new
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: usize = 1 << 20;

    fn layout(size: usize) -> Layout {
        Layout::from_size_align(size, 64).unwrap()
    }

    /// Allocate `size` bytes and write every page (as a tensor buffer would).
    fn alloc(c: &BlockCache, size: usize) -> *mut u8 {
        // SAFETY: a valid non-zero layout; the block is written within its size.
        unsafe {
            let p = c.alloc(layout(size));
            assert!(!p.is_null());
            ptr::write_bytes(p, 0xab, size);
            p
        }
    }

    /// `alloc_zeroed` of `size` bytes, checked to read zero throughout.
    fn alloc_zeroed(c: &BlockCache, size: usize) -> *mut u8 {
        // SAFETY: a valid non-zero layout; the block is read within its size.
        unsafe {
            let p = c.alloc_zeroed(layout(size));
            assert!(!p.is_null());
            let bytes = std::slice::from_raw_parts(p, size);
            assert!(bytes.iter().all(|&x| x == 0), "a zeroed block reads zero");
            p
        }
    }

    fn free(c: &BlockCache, p: *mut u8, size: usize) {
        // SAFETY: `p` came from `alloc(c, size)`.
        unsafe { c.dealloc(p, layout(size)) }
    }

    #[test]
    fn a_freed_block_is_reused_for_the_same_size_without_a_new_mapping() {
        let c = BlockCache::new();
        let a = alloc(&c, 4 * MB + 10);
        free(&c, a, 4 * MB + 10);
        let b = alloc(&c, 4 * MB + 3);
        assert_eq!(a, b);
        let s = c.stats();
        assert_eq!((s.hits, s.misses, s.evictions), (1, 1, 0));
        assert_eq!((s.live, s.cached), (pages(4 * MB + 3), 0));
        free(&c, b, 4 * MB + 3);
        c.release_cached();
        assert_eq!(c.stats().cached, 0);
    }

    #[test]
    fn a_larger_cached_block_is_split_and_zeroed_when_asked() {
        let c = BlockCache::new();
        let a = alloc(&c, 8 * MB);
        free(&c, a, 8 * MB);
        let b = alloc_zeroed(&c, 2 * MB);
        assert_eq!(a, b, "best fit takes the cached 8 MiB block");
        let s = c.stats();
        assert_eq!(
            (s.live, s.cached),
            (2 * MB, 6 * MB),
            "the 6 MiB rest stays cached"
        );
        let rest = alloc(&c, 6 * MB);
        // SAFETY: same mapping, 2 MiB further
        assert_eq!(
            rest,
            unsafe { a.add(2 * MB) },
            "and serves the next request"
        );
        assert_eq!((c.stats().hits, c.stats().misses), (2, 1));
        free(&c, rest, 6 * MB);
        free(&c, b, 2 * MB);
        c.release_cached();
    }

    #[test]
    fn misses_unmap_old_blocks_so_the_total_stays_within_the_live_peak() {
        let c = BlockCache::new();
        // the first "step" holds 3 + 5 + 7 MiB at once
        let sizes = [3 * MB, 5 * MB, 7 * MB];
        let ps: Vec<_> = sizes.iter().map(|&s| alloc(&c, s)).collect();
        let peak = c.stats().peak;
        assert_eq!(peak, 15 * MB);
        for (p, s) in ps.into_iter().zip(sizes) {
            free(&c, p, s);
        }
        // later steps ask for sizes that mostly do not fit the cached blocks
        let mut most_live = peak;
        for step in 0..20usize {
            let want = [(step % 7 + 2) * MB, 6 * MB + step * PAGE, MB];
            most_live = most_live.max(want.iter().map(|&s| pages(s)).sum());
            let ps: Vec<_> = want.iter().map(|&s| alloc(&c, s)).collect();
            // a block handed out whole may be up to a quarter longer than its request
            let s = c.stats();
            assert!(
                s.live + s.cached <= most_live + most_live / 4,
                "step {step}: live {} + cached {} over the most live so far, {most_live}",
                s.live,
                s.cached
            );
            for (p, s) in ps.into_iter().zip(want) {
                free(&c, p, s);
            }
        }
        let s = c.stats();
        assert!(
            s.hits > 0 && s.hits + s.grown > 40,
            "most requests reuse a block: {s:?}"
        );
        assert!(
            s.peak >= most_live && s.peak <= most_live + most_live / 4,
            "never above the most that was live at once (+ a quarter): {s:?}, {most_live}"
        );
        assert!(most_live > peak, "a later step needed more than the first");
        c.release_cached();
    }

    #[test]
    fn a_slightly_larger_block_is_handed_out_whole_and_comes_back_whole() {
        let c = BlockCache::new();
        let a = alloc(&c, 5 * MB);
        free(&c, a, 5 * MB);
        let b = alloc(&c, 4 * MB + 1);
        assert_eq!(a, b);
        assert_eq!(
            (c.stats().live, c.stats().cached),
            (5 * MB, 0),
            "not cut: a quarter longer at most"
        );
        free(&c, b, 4 * MB + 1);
        assert_eq!(
            (c.stats().live, c.stats().cached),
            (0, 5 * MB),
            "freed with its true length"
        );
        let d = alloc(&c, 5 * MB);
        assert_eq!((a, c.stats().hits, c.stats().misses), (d, 2, 1));
        free(&c, d, 5 * MB);
        c.release_cached();
    }

    #[test]
    fn the_oversize_table_survives_many_blocks_in_any_order() {
        let c = BlockCache::new();
        // 500 blocks of 1.25 MiB each asked for as 1 MiB + 1 page (handed out whole while the
        // table has room, cut once it has not)
        let n = 500;
        let big = MB + MB / 4;
        let ps: Vec<_> = (0..n).map(|_| alloc(&c, big)).collect();
        for p in ps {
            free(&c, p, big);
        }
        let ask = MB + PAGE;
        let qs: Vec<_> = (0..n).map(|_| alloc(&c, ask)).collect();
        assert_eq!(c.stats().hits, n as u64);
        // free in a scrambled order: every block comes back with its own length
        let mut order: Vec<usize> = (0..n).collect();
        for i in 0..n {
            order.swap(i, (i * 7919 + 13) % n);
        }
        for &i in &order {
            free(&c, qs[i], ask);
        }
        let s = c.stats();
        assert_eq!(s.live, 0, "{s:?}");
        assert!(s.cached >= n * pages(ask) && s.cached <= n * big, "{s:?}");
        c.release_cached();
    }

    #[test]
    fn the_pieces_of_a_split_block_merge_again_when_freed() {
        let c = BlockCache::new();
        let a = alloc(&c, 8 * MB);
        free(&c, a, 8 * MB);
        let x = alloc(&c, 2 * MB);
        let y = alloc(&c, 3 * MB);
        assert_eq!(c.stats().cached, 3 * MB);
        free(&c, x, 2 * MB);
        free(&c, y, 3 * MB);
        let s = c.stats();
        assert_eq!((s.live, s.cached), (0, 8 * MB));
        let z = alloc(&c, 8 * MB);
        assert_eq!(z, a, "one 8 MiB block again: no growth, no new mapping");
        let s = c.stats();
        assert_eq!((s.hits, s.misses, s.grown), (3, 1, 0));
        free(&c, z, 8 * MB);
        c.release_cached();
    }

    #[test]
    fn a_smaller_cached_block_grows_in_place_and_is_zeroed_when_asked() {
        let c = BlockCache::new();
        let a = alloc(&c, 2 * MB);
        free(&c, a, 2 * MB);
        let b = alloc_zeroed(&c, 5 * MB); // old and new pages read zero
        let s = c.stats();
        assert_eq!(
            (s.live, s.cached, s.hits, s.misses, s.grown),
            (5 * MB, 0, 0, 1, 1)
        );
        free(&c, b, 5 * MB);
        c.release_cached();
    }

    #[test]
    fn with_caching_off_a_freed_block_is_unmapped() {
        let c = BlockCache::new();
        let a = alloc(&c, 2 * MB);
        free(&c, a, 2 * MB);
        assert_eq!(c.stats().cached, 2 * MB);
        c.set_caching(false);
        assert_eq!(
            c.stats().cached,
            0,
            "turning caching off releases the cache"
        );
        let b = alloc(&c, 2 * MB);
        free(&c, b, 2 * MB);
        let s = c.stats();
        assert_eq!((s.live, s.cached, s.hits, s.misses), (0, 0, 0, 2));
    }

    #[test]
    fn small_blocks_and_realloc_across_the_threshold_keep_their_bytes() {
        let c = BlockCache::new();
        let small = alloc(&c, 100);
        assert_eq!(
            c.stats(),
            CacheStats::default(),
            "small blocks are the system's"
        );
        // SAFETY: grows a valid block; the first 100 bytes are preserved.
        let big = unsafe { c.realloc(small, layout(100), 3 * MB) };
        // SAFETY: `big` holds at least 100 initialised bytes.
        assert!(
            unsafe { std::slice::from_raw_parts(big, 100) }
                .iter()
                .all(|&x| x == 0xab)
        );
        assert_eq!(c.stats().live, 3 * MB);
        // SAFETY: shrinks it back below the threshold.
        let back = unsafe { c.realloc(big, layout(3 * MB), 50) };
        // SAFETY: `back` holds 50 bytes.
        assert!(
            unsafe { std::slice::from_raw_parts(back, 50) }
                .iter()
                .all(|&x| x == 0xab)
        );
        free(&c, back, 50);
        assert_eq!(c.stats().live, 0);
        c.release_cached();
    }

    #[test]
    fn threads_allocating_and_freeing_at_once_keep_the_books_straight() {
        let c = BlockCache::new();
        std::thread::scope(|s| {
            for t in 0..4usize {
                let c = &c;
                s.spawn(move || {
                    for i in 0..50usize {
                        let size = MB + ((t * 7 + i) % 5) * 3 * PAGE;
                        let p = alloc(c, size);
                        // SAFETY: `p` holds `size` bytes written by `alloc`.
                        assert!(unsafe { *p.add(size - 1) } == 0xab);
                        free(c, p, size);
                    }
                });
            }
        });
        let s = c.stats();
        assert_eq!(s.live, 0);
        assert_eq!(s.hits + s.misses + s.grown, 200);
        c.release_cached();
    }
}
