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
//! Only whole 2 MiB pieces can be huge pages, so [`AlignedBytes`] starts big buffers on a 2 MiB
//! boundary; other buffers get the 2 MiB-aligned part inside them.

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
/// and, from 2 MiB up, starting on a huge page boundary with every whole 2 MiB of it advised
/// before it is written (and collapsed after, where malloc reused memory with small pages); the
/// part after the last whole 2 MiB stays on small pages, so the memory held is the length
/// rounded to 4 KiB, as for any allocation.
pub(crate) struct AlignedBytes {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    /// The allocation: from the global allocator, or (`mapped`) an anonymous mapping of
    /// `layout.size()` bytes.
    layout: std::alloc::Layout,
    mapped: bool,
}

// SAFETY: AlignedBytes owns its allocation (like a Vec<u8>); shared access is read-only.
unsafe impl Send for AlignedBytes {}
unsafe impl Sync for AlignedBytes {}

impl AlignedBytes {
    /// `len` bytes of value `v`.
    pub(crate) fn filled(len: usize, v: u8) -> AlignedBytes {
        let align = if len >= HUGE_PAGE { HUGE_PAGE } else { 64 };
        let layout = std::alloc::Layout::from_size_align(len.max(1).next_multiple_of(64), align)
            .expect("packed weight size overflows isize");
        // SAFETY: the layout's size is non-zero.
        let p = unsafe { std::alloc::alloc(layout) };
        let Some(ptr) = std::ptr::NonNull::new(p) else { std::alloc::handle_alloc_error(layout) };
        // Fresh pages (a new mapping) fault in as huge pages once advised; memory malloc hands
        // out again (weight-sized blocks freed earlier in the load) already has small pages
        // and is collapsed after the write.
        advise_huge_pages(p, len);
        // SAFETY: `p` is valid for `layout.size()` bytes.
        unsafe { std::ptr::write_bytes(p, v, layout.size()) };
        collapse_huge_pages(p, len);
        AlignedBytes { ptr, len, layout, mapped: false }
    }

    /// `len` zero bytes that take memory only as they are first written (a fresh anonymous
    /// mapping, on Linux from 2 MiB up, starting on a huge page boundary and advised): a buffer
    /// filled piece by piece while another is released (`release_pages`) never holds both
    /// whole. Elsewhere, [`AlignedBytes::filled`] with zeros.
    pub(crate) fn zeroed(len: usize) -> AlignedBytes {
        #[cfg(target_os = "linux")]
        if len >= HUGE_PAGE {
            let body = len.next_multiple_of(4096);
            let map_len = body + HUGE_PAGE;
            // SAFETY: a new private anonymous mapping; the slack around the aligned body is
            // unmapped at once and the body is unmapped in `drop`.
            unsafe {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    map_len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                if p != libc::MAP_FAILED {
                    let start = (p as usize).next_multiple_of(HUGE_PAGE);
                    let head = start - p as usize;
                    if head > 0 {
                        libc::munmap(p, head);
                    }
                    if map_len - head - body > 0 {
                        libc::munmap((start + body) as *mut libc::c_void, map_len - head - body);
                    }
                    advise_huge_pages(start as *const u8, len);
                    if let (Some(ptr), Ok(layout)) =
                        (std::ptr::NonNull::new(start as *mut u8), std::alloc::Layout::from_size_align(body, 4096))
                    {
                        return AlignedBytes { ptr, len, layout, mapped: true };
                    }
                }
            }
        }
        AlignedBytes::filled(len, 0)
    }
    pub(crate) fn len(&self) -> usize {
        self.len
    }
    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` holds `layout.size() >= len` initialized bytes, owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBytes {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        if self.mapped {
            // SAFETY: mapped in `zeroed` with this length.
            unsafe { libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.layout.size()) };
            return;
        }
        // SAFETY: allocated in `filled` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
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
        for len in [0, 100, HUGE_PAGE, 3 * HUGE_PAGE + 123] {
            let a = AlignedBytes::filled(len, 7);
            assert!(a.len() == len && a.as_slice().iter().all(|&b| b == 7));
            assert_eq!(a.as_slice().as_ptr() as usize % if len >= HUGE_PAGE { HUGE_PAGE } else { 64 }, 0);
            let b = a.clone();
            assert!(b.as_slice() == a.as_slice());
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
