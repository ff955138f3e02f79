//! Transparent huge pages (2 MiB) for the big buffers every decode step streams through: packed
//! weights, the dense and quantized LM heads, the KV cache.
//!
//! Why: on 4 KiB pages a weight stream crosses a page every 4 KiB, each crossing a TLB miss
//! and a restart of the hardware prefetchers (they stop at page boundaries), so a core keeps
//! fewer reads in flight. Most distributions set THP to `madvise` (huge pages only where a
//! program asks), as the development VM does: there, decoding `random:2b-4t` with the `int2`
//! plan on one thread went from 32.8 to 39.2 tok/s, and from 34.9 to 37.0 in a second run (two
//! models interleaved in one process, one on small pages); the exact plan's bf16 head on huge
//! pages alone gave +6% / +8% at 1 / 2 threads (README, "Huge pages").
//!
//! Best effort and Linux only: where THP is `never` nothing is asked; the kernel may also refuse
//! (no contiguous memory free), and then buffers stay on small pages. Results never depend on it.
//! Only whole 2 MiB pieces can be huge pages, so [`AlignedBytes`] puts packed matrices in slabs
//! (shared mappings on huge pages) or, past [`SLAB_MAX`], starts them on a 2 MiB boundary; other
//! buffers get the 2 MiB-aligned part inside them.

/// Huge page size on x86-64 and (with 4 KiB base pages) aarch64 Linux.
pub const HUGE_PAGE: usize = 2 << 20;

/// Asks for huge pages on `len` bytes at `ptr` that have not been touched yet (a fresh
/// allocation): the page faults of the first writes then map huge pages directly.
fn advise_huge_pages(ptr: *const u8, len: usize) {
    madvise_interior(ptr, len, false);
}

/// As [`advise_huge_pages`] for memory that already holds data: also asks the kernel to move it
/// onto huge pages now (`MADV_COLLAPSE`, Linux 6.1+; older kernels leave it to the background
/// `khugepaged`). Contents are unchanged.
pub fn collapse_huge_pages(ptr: *const u8, len: usize) {
    madvise_interior(ptr, len, true);
}

/// `v`, a fresh zeroed allocation (`vec![0; n]`), with huge pages asked for: they take effect
/// as the first writes fault its pages in. (Allocations from 32 MiB up are always new mappings
/// in glibc; smaller ones may reuse memory that keeps its small pages, which costs nothing.)
pub fn advised<T>(v: Vec<T>) -> Vec<T> {
    advise_huge_pages(v.as_ptr() as *const u8, std::mem::size_of_val(v.as_slice()));
    v
}

/// Bytes for packed weights: 64-byte aligned (aligned vector loads never split a cache line)
/// and on huge pages where the OS grants them. Sizes from [`SLAB_MIN`] to [`SLAB_MAX`] (every
/// ternary matrix of 2B-4T: 1.3-7.1 MB) are placed one after another in shared slabs, mappings
/// on huge pages throughout ([`slab`]); larger ones get a mapping of their own starting on a huge
/// page boundary, every whole 2 MiB of it advised before it is written (the part after the
/// last whole 2 MiB stays on small pages: under 3% of such a buffer); smaller ones, and every
/// size where huge pages are off or not Linux, come from the global allocator.
///
/// Why slabs: a matrix under 2 MiB alone could not use a huge page at all, and one of 2-8 MiB
/// kept a third of its bytes on small pages. 2B-4T's q|k|v and o matrices (1.97 and 1.31 MB)
/// were all on small pages and read from DRAM at 12-18 GB/s on 2 threads against 22-24 in slabs
/// (per-op timers over `bitnet bench`, README "Slabs: every packed matrix on huge pages").
pub(crate) struct AlignedBytes {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    owner: Owner,
}

/// Who frees an [`AlignedBytes`]'s memory.
enum Owner {
    /// The global allocator, with this layout.
    Heap(std::alloc::Layout),
    /// An anonymous mapping of this many bytes at `ptr`, its own.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    Mapped(usize),
    /// A share of a slab, unmapped when its last share is dropped.
    #[cfg(target_os = "linux")]
    Slab(#[allow(dead_code)] std::sync::Arc<slab::Slab>),
}

/// From this size, packed weights go into a slab (smaller ones, the tiny test models' matrices,
/// span a few small pages at most).
pub(crate) const SLAB_MIN: usize = 64 << 10;
/// Up to this size, packed weights go into a slab; larger ones lose under 3% of their bytes to
/// small pages in a mapping of their own.
pub(crate) const SLAB_MAX: usize = 64 << 20;

// SAFETY: AlignedBytes owns its memory (like a Vec<u8>; a slab share owns its disjoint range);
// shared access is read-only.
unsafe impl Send for AlignedBytes {}
unsafe impl Sync for AlignedBytes {}

impl AlignedBytes {
    /// `len` bytes of value `v`.
    pub(crate) fn filled(len: usize, v: u8) -> AlignedBytes {
        #[cfg(target_os = "linux")]
        if (SLAB_MIN..=SLAB_MAX).contains(&len) && thp_allowed() {
            if let Some((slab, p)) = slab::alloc(len) {
                // Slab memory is fresh: zero, untouched.
                if v != 0 {
                    // SAFETY: the share is `len` bytes at `p`, this value's alone.
                    unsafe { std::ptr::write_bytes(p.as_ptr(), v, len) };
                }
                return AlignedBytes { ptr: p, len, owner: Owner::Slab(slab) };
            }
        }
        #[cfg(target_os = "linux")]
        if len > SLAB_MAX {
            if let Some(mut b) = AlignedBytes::mapped(len) {
                if v != 0 {
                    b.as_mut_slice().fill(v);
                }
                return b;
            }
        }
        AlignedBytes::heap(len, v)
    }

    /// `len` bytes of value `v` from the global allocator.
    fn heap(len: usize, v: u8) -> AlignedBytes {
        let layout = std::alloc::Layout::from_size_align(len.max(1).next_multiple_of(64), 64)
            .expect("packed weight size overflows isize");
        // SAFETY: the layout's size is non-zero.
        let p = unsafe { std::alloc::alloc(layout) };
        let Some(ptr) = std::ptr::NonNull::new(p) else { std::alloc::handle_alloc_error(layout) };
        // SAFETY: `p` is valid for `layout.size()` bytes.
        unsafe { std::ptr::write_bytes(p, v, layout.size()) };
        AlignedBytes { ptr, len, owner: Owner::Heap(layout) }
    }

    /// `len` zero bytes in a mapping of their own starting on a huge page boundary, advised.
    #[cfg(target_os = "linux")]
    fn mapped(len: usize) -> Option<AlignedBytes> {
        let body = len.next_multiple_of(4096);
        let ptr = map_aligned(body)?;
        advise_huge_pages(ptr.as_ptr(), len);
        Some(AlignedBytes { ptr, len, owner: Owner::Mapped(body) })
    }

    /// `len` zero bytes that take memory only as they are first written (a fresh anonymous
    /// mapping, on Linux from 2 MiB up, starting on a huge page boundary and advised): a buffer
    /// filled piece by piece while another is released (`release_pages`) never holds both
    /// whole. Elsewhere, [`AlignedBytes::filled`] with zeros.
    pub(crate) fn zeroed(len: usize) -> AlignedBytes {
        #[cfg(target_os = "linux")]
        if len >= HUGE_PAGE {
            if let Some(b) = AlignedBytes::mapped(len) {
                return b;
            }
        }
        AlignedBytes::filled(len, 0)
    }
    pub(crate) fn len(&self) -> usize {
        self.len
    }
    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` holds `len` initialized bytes, owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBytes {
    fn drop(&mut self) {
        match self.owner {
            // SAFETY: allocated in `filled` with this layout.
            Owner::Heap(layout) => unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) },
            // SAFETY: mapped in `zeroed` with this length.
            #[cfg(target_os = "linux")]
            Owner::Mapped(len) => unsafe {
                libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, len);
            },
            #[cfg(not(target_os = "linux"))]
            Owner::Mapped(_) => unreachable!("mappings are made on Linux only"),
            // The slab's `Arc` goes with `self`.
            #[cfg(target_os = "linux")]
            Owner::Slab(_) => {}
        }
    }
}

/// A fresh private anonymous mapping of `len` bytes (a multiple of 4 KiB) starting on a huge
/// page boundary (the slack mapped around it to find one is unmapped at once), untouched, so
/// it takes memory only as it is written; the caller unmaps it.
#[cfg(target_os = "linux")]
fn map_aligned(len: usize) -> Option<std::ptr::NonNull<u8>> {
    let map_len = len.checked_add(HUGE_PAGE)?;
    // SAFETY: a new mapping; only the slack around the aligned body is unmapped here.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            map_len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            return None;
        }
        let start = (p as usize).next_multiple_of(HUGE_PAGE);
        let head = start - p as usize;
        if head > 0 {
            libc::munmap(p, head);
        }
        if map_len - head - len > 0 {
            libc::munmap((start + len) as *mut libc::c_void, map_len - head - len);
        }
        std::ptr::NonNull::new(start as *mut u8)
    }
}

/// Slabs: mappings of [`slab::SLAB_BYTES`] on huge pages, handed out front to back in 64-byte
/// aligned shares. Weights are loaded together and dropped together, so shares are never
/// reused: a slab is unmapped when its last share is dropped, and the next share then starts a
/// new one. What a slab wastes is the unused part of the huge page its last share ends in (the
/// rest of its range is never touched, so takes no memory): 2B-4T's 420 MB of ternary weights
/// fill four slabs.
#[cfg(target_os = "linux")]
mod slab {
    use std::ptr::NonNull;
    use std::sync::{Arc, Mutex, Weak};

    /// Virtual size of a slab (untouched parts take no memory).
    pub(super) const SLAB_BYTES: usize = 128 << 20;
    const _: () = assert!(super::SLAB_MAX <= SLAB_BYTES);

    pub(crate) struct Slab {
        base: NonNull<u8>,
    }

    // SAFETY: the mapping is plain memory; shares of it are disjoint and owned by their holders.
    unsafe impl Send for Slab {}
    unsafe impl Sync for Slab {}

    impl Drop for Slab {
        fn drop(&mut self) {
            // SAFETY: mapped in `alloc` with this length; every share is gone.
            unsafe { libc::munmap(self.base.as_ptr() as *mut libc::c_void, SLAB_BYTES) };
        }
    }

    /// The slab being filled and how far.
    static CURRENT: Mutex<(Weak<Slab>, usize)> = Mutex::new((Weak::new(), 0));

    /// A share of `len <= SLAB_BYTES` bytes, 64-byte aligned, from the current slab or a new one
    /// (None where the mapping fails: the caller falls back to the heap).
    pub(super) fn alloc(len: usize) -> Option<(Arc<Slab>, NonNull<u8>)> {
        let mut cur = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
        let (ref mut weak, ref mut used) = *cur;
        let off = used.next_multiple_of(64);
        let slab = match weak.upgrade() {
            Some(s) if off + len <= SLAB_BYTES => {
                *used = off;
                s
            }
            _ => {
                let base = super::map_aligned(SLAB_BYTES)?;
                super::advise_huge_pages(base.as_ptr(), SLAB_BYTES);
                let s = Arc::new(Slab { base });
                *weak = Arc::downgrade(&s);
                *used = 0;
                s
            }
        };
        // SAFETY: `used + len <= SLAB_BYTES`: inside the mapping.
        let p = unsafe { NonNull::new_unchecked(slab.base.as_ptr().add(*used)) };
        *used += len;
        Some((slab, p))
    }
}

/// Gives the memory of the whole pages inside `[ptr, ptr + len)` back to the OS (Linux
/// `MADV_DONTNEED`; elsewhere nothing). Reading them afterwards gives zeros.
///
/// # Safety
/// The range lies inside one live heap allocation or anonymous mapping of the caller's whose
/// contents there are never read again, and no reference to that part is live.
pub unsafe fn release_pages(ptr: *const u8, len: usize) {
    #[cfg(target_os = "linux")]
    {
        let start = (ptr as usize).next_multiple_of(4096);
        let end = (ptr as usize).saturating_add(len) / 4096 * 4096;
        if end > start {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, len);
}

impl Clone for AlignedBytes {
    fn clone(&self) -> AlignedBytes {
        let mut c = AlignedBytes::filled(self.len, 0);
        c.as_mut_slice().copy_from_slice(self.as_slice());
        c
    }
}

impl std::fmt::Debug for AlignedBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBytes({} bytes)", self.len)
    }
}

#[cfg(target_os = "linux")]
fn madvise_interior(ptr: *const u8, len: usize, collapse: bool) {
    /// From the kernel's `include/uapi/asm-generic/mman-common.h` (the `libc` crate defines it
    /// for glibc targets only).
    const MADV_COLLAPSE: libc::c_int = 25;
    if !thp_allowed() {
        return;
    }
    let start = (ptr as usize).next_multiple_of(HUGE_PAGE);
    let end = (ptr as usize).saturating_add(len) / HUGE_PAGE * HUGE_PAGE;
    if end <= start {
        return;
    }
    let (p, n) = (start as *mut libc::c_void, end - start);
    // SAFETY: [start, end) lies inside a live allocation of the caller's; both advices keep the
    // contents (they only change how the pages are mapped). Failures are deliberately ignored
    // (see the module docs).
    unsafe {
        libc::madvise(p, n, libc::MADV_HUGEPAGE);
        if collapse {
            libc::madvise(p, n, MADV_COLLAPSE);
        }
    }
}

/// False where the administrator turned transparent huge pages off (`never`): `MADV_COLLAPSE`
/// would make them anyway, as it ignores that setting.
#[cfg(target_os = "linux")]
fn thp_allowed() -> bool {
    static ALLOWED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ALLOWED.get_or_init(|| {
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").map_or(true, |s| !s.contains("[never]"))
    })
}

#[cfg(not(target_os = "linux"))]
fn madvise_interior(_ptr: *const u8, _len: usize, _collapse: bool) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advised_buffers_keep_their_contents() {
        // heap, slab (several sizes, sharing slabs), own mapping
        for len in [0, 100, SLAB_MIN, HUGE_PAGE, 3 * HUGE_PAGE + 123, SLAB_MAX + 4097] {
            let a = AlignedBytes::filled(len, 7);
            assert!(a.len() == len && a.as_slice().iter().all(|&b| b == 7));
            assert_eq!(a.as_slice().as_ptr() as usize % if len > SLAB_MAX { HUGE_PAGE } else { 64 }, 0);
            let b = a.clone();
            assert!(b.as_slice() == a.as_slice());
        }
        // Shares of slabs are disjoint and keep their contents while others come and go.
        let mut held: Vec<AlignedBytes> =
            (0..40).map(|i| AlignedBytes::filled(SLAB_MIN + i * 300_001, i as u8)).collect();
        held.retain(|b| b.as_slice()[0] % 3 != 0);
        held.extend((40..50).map(|i| AlignedBytes::filled(SLAB_MAX - i, i as u8)));
        for b in &held {
            let v = b.as_slice()[0];
            assert!(b.as_slice().iter().all(|&x| x == v));
        }
        for len in [100, HUGE_PAGE, 3 * HUGE_PAGE + 123] {
            let mut z = AlignedBytes::zeroed(len);
            assert!(z.len() == len && z.as_slice().iter().all(|&b| b == 0));
            assert_eq!(z.as_slice().as_ptr() as usize % if len >= HUGE_PAGE { HUGE_PAGE } else { 64 }, 0);
            z.as_mut_slice()[len - 1] = 9;
            assert_eq!(z.clone().as_slice()[len - 1], 9);
        }
        let mut v = vec![5u8; 5 * 4096];
        // SAFETY: inside `v`, never read again before being written below.
        unsafe { release_pages(v.as_ptr().wrapping_add(100), 3 * 4096) };
        v[..4096].fill(1);
        assert!(v[..4096].iter().all(|&b| b == 1) && v[4 * 4096..].iter().all(|&b| b == 5));
        let w: Vec<u32> = (0..(HUGE_PAGE as u32)).collect();
        collapse_huge_pages(w.as_ptr() as *const u8, w.len() * 4);
        assert!(w.iter().enumerate().all(|(i, &x)| x == i as u32));
        // Too small for a huge page, and empty: nothing to do, no error.
        collapse_huge_pages(w.as_ptr() as *const u8, 4096);
        advise_huge_pages(std::ptr::null(), 0);
    }
}
