//! Zero-initialised arrays for the large per-worker tables (the connection
//! table), in anonymous memory advised to use transparent huge pages, as
//! DPDK keeps its tables in huge pages: a random lookup in a table of
//! hundreds of megabytes then needs one TLB entry per 2 MiB rather than a
//! page walk per 4 KiB page. Where the kernel gives no huge pages the array
//! works the same on small ones (the advice is a hint).

use core::ptr::NonNull;

/// Types whose all-zero bit pattern is a valid value (and the empty one).
///
/// # Safety
/// Every field of an implementing type must be valid when all its bytes are
/// zero (integers, arrays of them, fieldless enums with a zero variant).
pub(crate) unsafe trait Zeroable: Copy {}

/// Huge page size on x86_64 and aarch64 (with 4 KiB base pages).
const HUGE: usize = 2 << 20;

/// A fixed-size array of `T`, all zero at first, in its own anonymous
/// mapping aligned to 2 MiB (so every huge page it spans is whole), or on
/// the heap if it is smaller than a huge page.
pub(crate) struct HugeArray<T: Zeroable> {
    /// The first element (within `map`, at a 2 MiB boundary).
    ptr: NonNull<T>,
    len: usize,
    /// The whole mapping: its start and length, for `munmap`; or, for a
    /// small array on the heap, a null start and the allocation's size.
    map: (*mut libc::c_void, usize),
}

// SAFETY: a `HugeArray` owns its elements exclusively, as a `Box<[T]>` does;
// no other handle to the mapping exists.
unsafe impl<T: Zeroable + Send> Send for HugeArray<T> {}
// SAFETY: shared access only reads, as for `Box<[T]>`.
unsafe impl<T: Zeroable + Sync> Sync for HugeArray<T> {}

impl<T: Zeroable> HugeArray<T> {
    /// `len` zeroed elements. Aborts, as any allocation does, if the
    /// memory cannot be had. Arrays under 2 MiB (tools, tests, small
    /// workers) come from the heap, aligned to a cache line: a huge page
    /// would only cost them a 2 MiB clear.
    pub(crate) fn zeroed(len: usize) -> Self {
        let bytes = len.checked_mul(core::mem::size_of::<T>()).expect("table size overflows").max(1);
        if bytes < HUGE {
            let layout = Self::heap_layout(bytes);
            // SAFETY: the layout has a non-zero size (`bytes` >= 1).
            let p = unsafe { std::alloc::alloc_zeroed(layout) };
            let Some(ptr) = NonNull::new(p.cast::<T>()) else { std::alloc::handle_alloc_error(layout) };
            return HugeArray { ptr, len, map: (core::ptr::null_mut(), bytes) };
        }
        // Room to start at a 2 MiB boundary, and whole huge pages.
        let want = bytes.div_ceil(HUGE) * HUGE + HUGE;
        // SAFETY: an anonymous private mapping at an address the kernel
        // chooses: touches no existing memory. The result is checked.
        let base = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                want,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            let layout = core::alloc::Layout::from_size_align(want, HUGE).unwrap_or(core::alloc::Layout::new::<T>());
            std::alloc::handle_alloc_error(layout);
        }
        let start = (base as usize).next_multiple_of(HUGE);
        // SAFETY: [start, start + want - HUGE) lies within the mapping just
        // made (start - base < HUGE). MADV_HUGEPAGE is advice: on failure
        // (no THP in this kernel) the memory stays usable on small pages.
        unsafe {
            libc::madvise(start as *mut libc::c_void, want - HUGE, libc::MADV_HUGEPAGE);
        }
        let ptr = NonNull::new(start as *mut T).expect("mmap returned a non-null address");
        HugeArray { ptr, len, map: (base, want) }
    }

    /// The heap layout of a small array of `bytes` (cache-line aligned).
    fn heap_layout(bytes: usize) -> core::alloc::Layout {
        core::alloc::Layout::from_size_align(bytes, 64.max(core::mem::align_of::<T>())).expect("a small layout")
    }
}

impl<T: Zeroable> core::ops::Deref for HugeArray<T> {
    type Target = [T];
    #[inline(always)]
    fn deref(&self) -> &[T] {
        // SAFETY: `ptr` is aligned (2 MiB, more than any `T` needs), points
        // to `len` elements inside the mapping, zero-initialised (valid by
        // `Zeroable`) or written since; `&self` borrows them shared.
        unsafe { core::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Zeroable> core::ops::DerefMut for HugeArray<T> {
    #[inline(always)]
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`; `&mut self` makes the borrow exclusive.
        unsafe { core::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Zeroable> Drop for HugeArray<T> {
    fn drop(&mut self) {
        if self.map.0.is_null() {
            // SAFETY: allocated by `zeroed` with this layout, freed once.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr().cast(), Self::heap_layout(self.map.1)) };
            return;
        }
        // SAFETY: the mapping was made by `zeroed` with exactly these
        // bounds and is unmapped once; no reference into it outlives `self`.
        unsafe {
            libc::munmap(self.map.0, self.map.1);
        }
    }
}

impl<T: Zeroable> Clone for HugeArray<T> {
    fn clone(&self) -> Self {
        let mut c = Self::zeroed(self.len);
        c.copy_from_slice(self);
        c
    }
}

impl<T: Zeroable> core::fmt::Debug for HugeArray<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "HugeArray({} x {} bytes)", self.len, core::mem::size_of::<T>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // SAFETY: integers.
    unsafe impl Zeroable for [u64; 7] {}

    #[test]
    fn zeroed_aligned_writable_and_cloned() {
        let mut a = HugeArray::<[u64; 7]>::zeroed(100_000);
        assert_eq!(a.len(), 100_000);
        assert_eq!(a.as_ptr() as usize % HUGE, 0, "starts on a huge page");
        assert!(a.iter().all(|e| *e == [0; 7]));
        a[99_999][6] = 7;
        a[0][0] = 1;
        let b = a.clone();
        assert_eq!((b[99_999][6], b[0][0], b.len()), (7, 1, 100_000));
        drop(a);
        assert_eq!(b[99_999][6], 7, "the clone has its own memory");
        assert_eq!(HugeArray::<[u64; 7]>::zeroed(0).len(), 0);
    }

    #[test]
    fn small_arrays_come_from_the_heap() {
        let mut a = HugeArray::<[u64; 7]>::zeroed(64);
        assert!(a.map.0.is_null(), "under 2 MiB: no mapping of its own");
        assert_eq!(a.as_ptr() as usize % 64, 0, "cache-line aligned");
        assert!(a.iter().all(|e| *e == [0; 7]));
        a[63][6] = 5;
        let b = a.clone();
        drop(a);
        assert_eq!(b[63][6], 5);
    }
}
