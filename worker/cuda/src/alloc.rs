//! Caching device allocator (the PyTorch idea, reduced to one stream): freed blocks go to size-class
//! free lists and are reused by later allocations of the same class, so the steady-state training
//! step makes no cuMemAlloc/cuMemFree calls (each is a device-wide synchronisation point).
//!
//! Stream semantics: blocks are handed out and returned in the order of the single compute stream;
//! a block freed by the host may be reused by a later kernel on the same stream safely because the
//! stream serialises them. A buffer used on another stream (NCCL) must be returned only after that
//! stream is joined back into the compute stream (the communicator does this).
//!
//! The raw allocator is a trait so the policy is unit-tested without a GPU.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::error::{CudaError, Result};

/// Small blocks round to 512 B; blocks above 1 MiB round to 2 MiB (fewer distinct classes, so
/// activations whose size varies with sequence length still hit the cache).
const SMALL_ROUND: usize = 512;
const LARGE_THRESHOLD: usize = 1 << 20;
const LARGE_ROUND: usize = 2 << 20;
/// A large request may take a cached block up to this much bigger (bounds internal fragmentation).
const LARGE_SLACK_NUM: usize = 5;
const LARGE_SLACK_DEN: usize = 4;

pub fn round_size(bytes: usize) -> usize {
    let b = bytes.max(1);
    if b <= LARGE_THRESHOLD {
        b.div_ceil(SMALL_ROUND) * SMALL_ROUND
    } else {
        b.div_ceil(LARGE_ROUND) * LARGE_ROUND
    }
}

/// The device memory underneath (cuMemAlloc / cuMemFree on a GPU).
pub trait RawAlloc: Send + Sync {
    /// Ok(None) means out of memory (retryable after releasing the cache); Err is any other failure.
    fn alloc(&self, bytes: usize) -> Result<Option<u64>>;
    /// # Safety
    /// `ptr` was returned by `alloc` of this allocator and is not used afterwards.
    unsafe fn free(&self, ptr: u64, bytes: usize) -> Result<()>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    pub ptr: u64,
    /// Rounded size actually reserved.
    pub size: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AllocStats {
    pub in_use_bytes: usize,
    pub cached_bytes: usize,
    pub peak_in_use_bytes: usize,
    pub raw_allocs: usize,
    pub cache_hits: usize,
}

#[derive(Default)]
struct State {
    free: BTreeMap<usize, Vec<u64>>,
    stats: AllocStats,
}

pub struct CachingAllocator<R: RawAlloc> {
    raw: R,
    state: Mutex<State>,
}

impl<R: RawAlloc> CachingAllocator<R> {
    pub fn new(raw: R) -> Self {
        CachingAllocator { raw, state: Mutex::new(State::default()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the lists inconsistent (every mutation is a
        // single push/pop), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn alloc(&self, bytes: usize) -> Result<Block> {
        let size = round_size(bytes);
        {
            let mut st = self.lock();
            let limit = if size > LARGE_THRESHOLD { size * LARGE_SLACK_NUM / LARGE_SLACK_DEN } else { size };
            let hit = st.free.range(size..=limit).find(|(_, v)| !v.is_empty()).map(|(s, _)| *s);
            if let Some(class) = hit {
                let ptr = st.free.get_mut(&class).and_then(|v| v.pop());
                if let Some(ptr) = ptr {
                    st.stats.cached_bytes -= class;
                    st.stats.in_use_bytes += class;
                    st.stats.peak_in_use_bytes = st.stats.peak_in_use_bytes.max(st.stats.in_use_bytes);
                    st.stats.cache_hits += 1;
                    return Ok(Block { ptr, size: class });
                }
            }
        }
        let ptr = match self.raw.alloc(size)? {
            Some(p) => p,
            None => {
                // Out of memory: give every cached block back to the driver and retry once.
                let released = self.release_cached()?;
                match self.raw.alloc(size)? {
                    Some(p) => p,
                    None => {
                        return Err(CudaError::OutOfMemory {
                            requested: size,
                            cached: released,
                            message: format!("{} bytes in use by live tensors", self.stats().in_use_bytes),
                        })
                    }
                }
            }
        };
        let mut st = self.lock();
        st.stats.raw_allocs += 1;
        st.stats.in_use_bytes += size;
        st.stats.peak_in_use_bytes = st.stats.peak_in_use_bytes.max(st.stats.in_use_bytes);
        Ok(Block { ptr, size })
    }

    /// Returns a block to the cache (never to the driver: see `release_cached`).
    pub fn free(&self, block: Block) {
        let mut st = self.lock();
        st.stats.in_use_bytes = st.stats.in_use_bytes.saturating_sub(block.size);
        st.stats.cached_bytes += block.size;
        st.free.entry(block.size).or_default().push(block.ptr);
    }

    /// Frees every cached block to the driver; returns the bytes released.
    pub fn release_cached(&self) -> Result<usize> {
        let lists = {
            let mut st = self.lock();
            st.stats.cached_bytes = 0;
            std::mem::take(&mut st.free)
        };
        let mut released = 0;
        for (size, ptrs) in lists {
            for p in ptrs {
                // SAFETY: cached blocks came from raw.alloc and no live tensor holds them.
                unsafe { self.raw.free(p, size)? };
                released += size;
            }
        }
        Ok(released)
    }

    pub fn stats(&self) -> AllocStats {
        self.lock().stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    /// A fake device with a capacity, handing out increasing addresses.
    struct Fake {
        capacity: usize,
        used: AtomicUsize,
        next: AtomicU64,
        frees: AtomicUsize,
    }
    impl Fake {
        fn new(capacity: usize) -> Self {
            Fake { capacity, used: AtomicUsize::new(0), next: AtomicU64::new(0x1000), frees: AtomicUsize::new(0) }
        }
    }
    impl RawAlloc for Fake {
        fn alloc(&self, bytes: usize) -> Result<Option<u64>> {
            if self.used.load(Ordering::SeqCst) + bytes > self.capacity {
                return Ok(None);
            }
            self.used.fetch_add(bytes, Ordering::SeqCst);
            Ok(Some(self.next.fetch_add(bytes as u64, Ordering::SeqCst)))
        }
        unsafe fn free(&self, _ptr: u64, bytes: usize) -> Result<()> {
            self.used.fetch_sub(bytes, Ordering::SeqCst);
            self.frees.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    #[test]
    fn rounds_small_and_large_sizes() {
        assert_eq!(round_size(0), 512);
        assert_eq!(round_size(1), 512);
        assert_eq!(round_size(513), 1024);
        assert_eq!(round_size(1 << 20), 1 << 20);
        assert_eq!(round_size((1 << 20) + 1), 2 << 20);
        assert_eq!(round_size((2 << 20) + 1), 4 << 20);
    }

    #[test]
    fn reuses_freed_blocks_without_new_raw_allocations() {
        let a = CachingAllocator::new(Fake::new(1 << 30));
        let b1 = a.alloc(1000).unwrap();
        a.free(b1);
        let b2 = a.alloc(900).unwrap(); // same 1024 class
        assert_eq!(b2.ptr, b1.ptr);
        let s = a.stats();
        assert_eq!((s.raw_allocs, s.cache_hits, s.in_use_bytes, s.cached_bytes), (1, 1, 1024, 0));
        // A different class is a new allocation.
        let b3 = a.alloc(5000).unwrap();
        assert_ne!(b3.ptr, b1.ptr);
        assert_eq!(a.stats().raw_allocs, 2);
    }

    #[test]
    fn large_requests_take_slightly_bigger_cached_blocks_only() {
        let a = CachingAllocator::new(Fake::new(1 << 30));
        let big = a.alloc(8 << 20).unwrap();
        a.free(big);
        // 7 MiB -> class 8 MiB: reuses.
        assert_eq!(a.alloc(7 << 20).unwrap().ptr, big.ptr);
        let huge = a.alloc(64 << 20).unwrap();
        a.free(huge);
        // 4 MiB must not take the 64 MiB block (16x waste).
        let small = a.alloc(4 << 20).unwrap();
        assert_ne!(small.ptr, huge.ptr);
    }

    #[test]
    fn out_of_memory_releases_the_cache_and_retries() {
        let a = CachingAllocator::new(Fake::new(8 << 20));
        let x = a.alloc(6 << 20).unwrap();
        a.free(x); // cached, still held from the fake device's point of view
        let y = a.alloc(4 << 20).unwrap(); // class 4 MiB, not within slack of 6 MiB: needs release + retry
        assert_eq!(y.size, 4 << 20);
        let s = a.stats();
        assert_eq!(s.cached_bytes, 0);
        assert_eq!(s.in_use_bytes, 4 << 20);
        // Now truly out of memory: typed error with the numbers.
        match a.alloc(6 << 20) {
            Err(CudaError::OutOfMemory { requested, .. }) => assert_eq!(requested, 6 << 20),
            other => panic!("expected OOM, got {other:?}"),
        }
    }
}
