//! bf16 matrices stored losslessly in 12 bits per value: the exact plan's LM head.
//!
//! Why: decoding one token reads the whole head (2B-4T: 128256 x 2560 bf16 = 656 MB, 61% of the
//! exact plan's bytes per token), and decode is bandwidth bound. A weight's high byte (sign and
//! the top 7 exponent bits) takes few values in a weight matrix: its magnitudes span a few
//! binades, and 16 high bytes (8 exponent pairs x 2 signs: 16 binades) cover nearly all of them.
//! So each value keeps its low byte (the lowest exponent bit and the 7 mantissa bits) and a 4-bit
//! code into a table of the matrix's 16 most frequent high bytes: 1.5 bytes instead of 2, and
//! the same value exactly. A block of 128 values with a high byte outside the table (an
//! "exception": a value 2^16 times smaller than the largest, a zero among nonzeros, an outlier)
//! keeps its 128 high bytes in a side array instead. The AVX-512 and AVX2 kernels widen the
//! values to the same f32s as the bf16 kernels of their dense level and sum each (row, token)
//! in its order (one 16- or 8-lane FMA chain in column order, the same reduction, the same
//! row blocks and tiles for several tokens), so logits equal the bf16 head's bit for bit; the
//! portable level unpacks strips of rows to bf16 and runs the bf16 kernel on them. Measured
//! (2B-4T's head, a Xeon, two threads): AVX-512 15.8-18.9 against 19.5-21.9 ms for bf16, AVX2
//! 17.1 against 19.1-22.0; 32 tokens 3-8% slower than bf16 (compute bound: each 4-token group widens
//! a block again).
//!
//! Layout, per row: `cols / 128` blocks of 192 bytes (three cache lines): 128 low bytes, then 64
//! code bytes. Half `h` of a block (its columns `64h .. 64h + 64`) has its low bytes at `64h + p`
//! and its codes in nibble `h` of code byte `p`, where position `p = 16k + 4j + i` holds column
//! `16j + 4k + i` of the half: AVX-512's in-lane unpacks (low with high bytes into words, words
//! under a zero into dwords) leave position `16k + 4j + i` in lane `4k + i` of vector `j`, so
//! vector `j` holds columns `16j .. 16j + 16` in order (`x86::widen`). Exception blocks' high
//! bytes are stored in the same positions.

use std::cell::RefCell;
use std::ops::Range;

use crate::mem::AlignedBytes;

/// Values per block.
pub const BLOCK: usize = 128;
/// Bytes per block: 128 low bytes, 64 code bytes.
const BLOCK_BYTES: usize = 192;
/// Blocks per row at most: a row's exceptions are one `u64` mask (rows up to 8192 columns).
const MAX_BLOCKS: usize = 64;

/// Column `c` (< 64) of a block half is stored at this position.
const POS: [u8; 64] = {
    let mut p = [0u8; 64];
    let mut c = 0;
    while c < 64 {
        let (j, k, i) = (c / 16, (c / 4) % 4, c % 4);
        p[c] = (16 * k + 4 * j + i) as u8;
        c += 1;
    }
    p
};

/// A `[rows][cols]` bf16 matrix in the 12-bit layout above.
#[derive(Clone)]
pub struct PackedBf16 {
    rows: usize,
    cols: usize,
    /// `rows x cols / 128` blocks of [`BLOCK_BYTES`].
    data: AlignedBytes,
    /// The 16 most frequent high bytes; code `i` stands for `table[i]`.
    table: [u8; 16],
    /// Per row: bit `b` set when block `b` is an exception.
    exc_mask: Vec<u64>,
    /// Per row: the index of its first exception block in `exc_hi` (row `rows`: the total).
    exc_start: Vec<usize>,
    /// 128 high bytes per exception block, in block position order.
    exc_hi: Vec<u8>,
}

impl std::fmt::Debug for PackedBf16 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedBf16({}x{}, {} exception blocks)", self.rows, self.cols, self.exception_blocks())
    }
}

/// Rows split among the load threads: `f(first_row, rows)` on contiguous chunks.
fn par_chunks(rows: usize, f: impl Fn(usize, usize) + Sync) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(rows.div_ceil(1024)).max(1);
    std::thread::scope(|sc| {
        for t in 0..threads {
            let r = crate::split_range(rows, threads, t, 1);
            let f = &f;
            sc.spawn(move || f(r.start, r.len()));
        }
    });
}

/// Each high byte's code in `table` (`u8::MAX`: none, an exception).
fn codes(table: &[u8; 16]) -> [u8; 256] {
    let mut code = [u8::MAX; 256];
    for (i, &b) in table.iter().enumerate() {
        code[b as usize] = i as u8;
    }
    code
}

/// One row of bf16 bits into its blocks (`out`) and exception blocks (`exc`); `mask`: which
/// blocks are exceptions.
fn pack_row(row: &[u16], code: &[u8; 256], mask: u64, out: &mut [u8], exc: &mut [u8]) {
    let mut e = 0;
    for (b, (src, blk)) in row.chunks_exact(BLOCK).zip(out.chunks_exact_mut(BLOCK_BYTES)).enumerate() {
        let (lo, codes) = blk.split_at_mut(128);
        let (src, lo): (&[u16; 128], &mut [u8; 128]) =
            (src.try_into().expect("a block"), lo.try_into().expect("a block"));
        for (c, &p) in POS.iter().enumerate() {
            let p = p as usize;
            lo[p] = src[c] as u8;
            lo[64 + p] = src[64 + c] as u8;
        }
        if mask >> b & 1 == 1 {
            let exc: &mut [u8] = &mut exc[e * BLOCK..(e + 1) * BLOCK];
            for (c, &p) in POS.iter().enumerate() {
                let p = p as usize;
                exc[p] = (src[c] >> 8) as u8;
                exc[64 + p] = (src[64 + c] >> 8) as u8;
            }
            e += 1;
        } else {
            for (c, &p) in POS.iter().enumerate() {
                codes[p as usize] = code[(src[c] >> 8) as usize] | code[(src[64 + c] >> 8) as usize] << 4;
            }
        }
    }
}

impl PackedBf16 {
    /// `data` (`rows x cols` raw bf16 bits) packed, or `None` where the layout does not apply
    /// (`cols` not a multiple of 128, or above 8192) or saves less than a fifth of the bytes
    /// (too many exception blocks).
    pub fn pack(data: &[u16], rows: usize, cols: usize) -> Option<PackedBf16> {
        let mut p = Self::plan(data, rows, cols)?;
        // SAFETY: `data` holds `rows x cols` values; nothing is released.
        unsafe { p.fill(data.as_ptr(), false) };
        Some(p)
    }

    /// As [`PackedBf16::pack`], consuming `data` (given back where it does not pack): its
    /// pages are given back to the OS as the packing passes them, so the load holds little
    /// more than the larger of the two copies (the packed one takes memory as it is written).
    pub fn pack_owned(data: Vec<u16>, rows: usize, cols: usize) -> Result<PackedBf16, Vec<u16>> {
        let Some(mut p) = Self::plan(&data, rows, cols) else { return Err(data) };
        // SAFETY: `data` holds `rows x cols` values, is not read again and is dropped after.
        unsafe { p.fill(data.as_ptr(), true) };
        drop(data);
        Ok(p)
    }

    /// The table, the exception blocks and an empty (zero, not yet touched) packed buffer.
    fn plan(data: &[u16], rows: usize, cols: usize) -> Option<PackedBf16> {
        if rows == 0
            || cols == 0
            || !cols.is_multiple_of(BLOCK)
            || cols / BLOCK > MAX_BLOCKS
            || data.len() != rows * cols
        {
            return None;
        }
        let nb = cols / BLOCK;
        // The 16 most frequent high bytes (ties: the smaller byte), from per-thread histograms.
        let hist = std::sync::Mutex::new([0u64; 256]);
        // In a large matrix every 8th row is plenty to rank them (any table is correct: it only
        // sets how many blocks are exceptions), at an eighth of the time.
        let step = if rows * cols >= 1 << 24 { 8 } else { 1 };
        par_chunks(rows, |r0, n| {
            let mut h = [[0u64; 256]; 4];
            for r in (r0..r0 + n).filter(|r| r % step == 0) {
                for (i, &v) in data[r * cols..(r + 1) * cols].iter().enumerate() {
                    h[i % 4][(v >> 8) as usize] += 1;
                }
            }
            let mut all = hist.lock().unwrap_or_else(|e| e.into_inner());
            for b in 0..256 {
                all[b] += h[0][b] + h[1][b] + h[2][b] + h[3][b];
            }
        });
        let hist = hist.into_inner().unwrap_or_else(|e| e.into_inner());
        let mut order: Vec<usize> = (0..256).collect();
        order.sort_by_key(|&b| (std::cmp::Reverse(hist[b]), b));
        let table: [u8; 16] = std::array::from_fn(|i| order[i] as u8);
        let code = codes(&table);
        // Exception blocks per row.
        let mut exc_mask = vec![0u64; rows];
        {
            let masks = crate::pool::SyncPtr::new(&mut exc_mask);
            par_chunks(rows, |r0, n| {
                // SAFETY: each chunk writes its own rows' masks.
                let m = unsafe { masks.slice(r0, n) };
                for (j, m) in m.iter_mut().enumerate() {
                    let row = &data[(r0 + j) * cols..(r0 + j + 1) * cols];
                    for (b, blk) in row.chunks_exact(BLOCK).enumerate() {
                        if blk.iter().any(|&v| code[(v >> 8) as usize] == u8::MAX) {
                            *m |= 1 << b;
                        }
                    }
                }
            });
        }
        let mut exc_start = Vec::with_capacity(rows + 1);
        let mut total = 0usize;
        for m in &exc_mask {
            exc_start.push(total);
            total += m.count_ones() as usize;
        }
        exc_start.push(total);
        let packed = rows * nb * BLOCK_BYTES + total * BLOCK + rows * 16;
        if packed * 5 > rows * cols * 2 * 4 {
            return None;
        }
        Some(PackedBf16 {
            rows,
            cols,
            data: AlignedBytes::zeroed(rows * nb * BLOCK_BYTES),
            table,
            exc_mask,
            exc_start,
            exc_hi: vec![0u8; total * BLOCK],
        })
    }

    /// Writes the blocks and exception blocks from `src` (`rows x cols` values), in chunks of
    /// rows, each split among the load threads; with `release`, each chunk's source pages are
    /// given back to the OS once it is done.
    ///
    /// # Safety
    /// `src` holds `rows x cols` values; with `release`, they are never read again.
    unsafe fn fill(&mut self, src: *const u16, release: bool) {
        /// Rows per chunk (~10 MB of 2B-4T's bf16 head).
        const CHUNK: usize = 2048;
        let (rows, cols, nb) = (self.rows, self.cols, self.cols / BLOCK);
        let code = codes(&self.table);
        let (dp, ep) =
            (crate::pool::SyncPtr::new(self.data.as_mut_slice()), crate::pool::SyncPtr::new(&mut self.exc_hi));
        let (masks, starts) = (&self.exc_mask, &self.exc_start);
        let mut c0 = 0;
        while c0 < rows {
            let c1 = (c0 + CHUNK).min(rows);
            // SAFETY: rows c0..c1 of `src`, live until the chunk's threads have joined.
            let data = std::slice::from_raw_parts(src.add(c0 * cols), (c1 - c0) * cols);
            par_chunks(c1 - c0, |q0, n| {
                for r in c0 + q0..c0 + q0 + n {
                    // SAFETY: row `r`'s blocks and its exception blocks are written by this thread only.
                    let (out, exc) = unsafe {
                        (
                            dp.slice(r * nb * BLOCK_BYTES, nb * BLOCK_BYTES),
                            ep.slice(starts[r] * BLOCK, (starts[r + 1] - starts[r]) * BLOCK),
                        )
                    };
                    let row = &data[(r - c0) * cols..(r - c0 + 1) * cols];
                    pack_row(row, &code, masks[r], out, exc);
                }
            });
            if release {
                // SAFETY: the caller's promise; `data` is not used after this.
                crate::mem::release_pages(src.add(c0 * cols) as *const u8, (c1 - c0) * cols * 2);
            }
            c0 = c1;
        }
    }

    /// Whether this CPU's dense level has packed kernels (AVX-512F + BW, or AVX2 + FMA);
    /// elsewhere a packed matrix is unpacked in strips for the bf16 kernels, slower than
    /// reading bf16.
    pub fn kernels_available() -> bool {
        #[cfg(target_arch = "x86_64")]
        return match crate::dense::DenseLevel::detect() {
            crate::dense::DenseLevel::Avx512 => x86::available(),
            crate::dense::DenseLevel::Avx2 => x86::avx2_available(),
            crate::dense::DenseLevel::Generic => false,
        };
        #[allow(unreachable_code)]
        false
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Bytes held (and read by one GEMV): blocks, exception blocks, per-row masks and starts.
    pub fn nbytes(&self) -> usize {
        self.data.len() + self.exc_hi.len() + 16 * self.rows
    }
    /// Blocks that keep their high bytes whole.
    pub fn exception_blocks(&self) -> usize {
        self.exc_start[self.rows]
    }
    /// Moves the blocks onto huge pages where the OS allows (they are streamed per token).
    pub fn collapse_huge_pages(&self) {
        crate::mem::collapse_huge_pages(self.data.as_slice().as_ptr(), self.data.len());
    }

    /// Row `r` as raw bf16 bits, block by block: `f(b, bits of block b)` (the scalar unpacking).
    fn row_blocks(&self, r: usize, mut f: impl FnMut(usize, &[u16; BLOCK])) {
        let nb = self.cols / BLOCK;
        let row = &self.data.as_slice()[r * nb * BLOCK_BYTES..(r + 1) * nb * BLOCK_BYTES];
        let mut e = self.exc_start[r];
        let mut o = [0u16; BLOCK];
        for (b, blk) in row.chunks_exact(BLOCK_BYTES).enumerate() {
            let exceptional = self.exc_mask[r] >> b & 1 == 1;
            for h in 0..2 {
                for c in 0..64 {
                    let p = POS[c] as usize;
                    let hi = if exceptional {
                        self.exc_hi[e * BLOCK + 64 * h + p]
                    } else {
                        self.table[((blk[128 + p] >> (4 * h)) & 15) as usize]
                    };
                    o[64 * h + c] = (hi as u16) << 8 | blk[64 * h + p] as u16;
                }
            }
            e += usize::from(exceptional);
            f(b, &o);
        }
    }

    /// Row `r` as raw bf16 bits into `out` (`cols` long).
    pub fn row_bf16(&self, r: usize, out: &mut [u16]) {
        self.row_blocks(r, |b, v| out[b * BLOCK..(b + 1) * BLOCK].copy_from_slice(v));
    }

    /// Row `r` widened to f32 into `out` (`cols` long): embedding lookups.
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        self.row_blocks(r, |b, v| {
            for (o, &h) in out[b * BLOCK..(b + 1) * BLOCK].iter_mut().zip(v) {
                *o = f32::from_bits((h as u32) << 16);
            }
        });
    }

    /// All of it as raw bf16 bits (a device upload, tests).
    pub fn to_bf16(&self) -> Vec<u16> {
        let mut v = vec![0u16; self.rows * self.cols];
        for (r, row) in v.chunks_exact_mut(self.cols).enumerate() {
            self.row_bf16(r, row);
        }
        v
    }
}

thread_local! {
    /// This thread's strip of rows unpacked to bf16 for the bf16 kernels (grown once).
    static STRIP: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
}

/// `out[t * out_stride + (r - rows.start)] = W[r] . x[t * x_stride ..]`: the AVX-512 or AVX2
/// kernels at those levels, else strips of rows unpacked to bf16 and
/// [`crate::dense::gemm_rows_with`] on them at `level` (the model packs its head only where its
/// dense level has kernels: [`PackedBf16::kernels_available`]). Bounds checked by the caller.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    level: crate::dense::DenseLevel,
    w: &PackedBf16,
    x: &[f32],
    x_stride: usize,
    n_tok: usize,
    rows: Range<usize>,
    out: &mut [f32],
    out_stride: usize,
) {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::dense::DenseLevel;
        // SAFETY (both): features checked; bounds checked by the caller.
        if level == DenseLevel::Avx512 && x86::available() {
            unsafe { x86::gemm::<x86::Avx512>(w, x, x_stride, n_tok, rows, out, out_stride) };
            return;
        }
        if level == DenseLevel::Avx2 && x86::avx2_available() {
            unsafe { x86::gemm::<x86::Avx2>(w, x, x_stride, n_tok, rows, out, out_stride) };
            return;
        }
    }
    let cols = w.cols;
    // Strips of the bf16 GEMM's row blocks, so a batch still reads each weight once.
    let strip = crate::dense::block_rows(cols * 2);
    STRIP.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < strip * cols {
            s.resize(strip * cols, 0);
        }
        let mut r0 = rows.start;
        while r0 < rows.end {
            let nr = (rows.end - r0).min(strip);
            unpack_rows(w, r0, &mut s[..nr * cols]);
            let o = &mut out[r0 - rows.start..];
            crate::dense::gemm_rows_with(
                level,
                crate::dense::DenseRef::BF16(&s[..nr * cols]),
                cols,
                x,
                x_stride,
                n_tok,
                0..nr,
                o,
                out_stride,
            );
            r0 += nr;
        }
    });
}

/// `out[i] = W[id] . x[tok * x_stride ..]` for each pick `(tok, id)`: as
/// [`crate::dense::gemv_picked`] (the next pick's row prefetched while one is summed), the same
/// values as [`gemm`]'s. Bounds checked by the caller.
pub(crate) fn picked(
    level: crate::dense::DenseLevel,
    w: &PackedBf16,
    x: &[f32],
    x_stride: usize,
    picks: &[(u32, u32)],
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::dense::DenseLevel;
        // SAFETY (both): features checked; bounds checked by the caller.
        if level == DenseLevel::Avx512 && x86::available() {
            unsafe { x86::picked::<x86::Avx512>(w, x, x_stride, picks, out) };
            return;
        }
        if level == DenseLevel::Avx2 && x86::avx2_available() {
            unsafe { x86::picked::<x86::Avx2>(w, x, x_stride, picks, out) };
            return;
        }
    }
    for (i, &(t, id)) in picks.iter().enumerate() {
        let (t, id) = (t as usize, id as usize);
        gemm(level, w, &x[t * x_stride..], w.cols, 1, id..id + 1, &mut out[i..i + 1], 0);
    }
}

/// Rows `r0..` unpacked to bf16 bits into `out` (whole rows).
fn unpack_rows(w: &PackedBf16, r0: usize, out: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        for (i, row) in out.chunks_exact_mut(w.cols).enumerate() {
            // SAFETY: features checked; `row` holds `cols` values of a row of `w`.
            unsafe { x86::unpack_row(w, r0 + i, row) };
        }
        return;
    }
    for (i, row) in out.chunks_exact_mut(w.cols).enumerate() {
        w.row_bf16(r0 + i, row);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{PackedBf16, BLOCK, BLOCK_BYTES};
    use core::arch::x86_64::*;
    use std::ops::Range;

    pub(super) fn available() -> bool {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")
    }

    pub(super) fn avx2_available() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    /// One block half's 64 values as f32 vectors of 16 columns in column order, from its low
    /// bytes `lo` and high bytes `hi` (block positions; see the module's layout).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn widen(lo: __m512i, hi: __m512i) -> [__m512; 4] {
        let z = _mm512_setzero_si512();
        let (w0, w1) = (_mm512_unpacklo_epi8(lo, hi), _mm512_unpackhi_epi8(lo, hi));
        [
            _mm512_unpacklo_epi16(z, w0),
            _mm512_unpackhi_epi16(z, w0),
            _mm512_unpacklo_epi16(z, w1),
            _mm512_unpackhi_epi16(z, w1),
        ]
        .map(|v| _mm512_castsi512_ps(v))
    }

    /// A row being read block by block, with its exception blocks, and the row whose blocks it
    /// prefetches beside its own (`next`).
    struct Row {
        blk: *const u8,
        next: *const u8,
        mask: u64,
        exc: *const u8,
    }

    impl Row {
        fn new(w: &PackedBf16, r: usize, next: usize) -> Row {
            let rb = (w.cols / BLOCK) * BLOCK_BYTES;
            let base = w.data.as_slice().as_ptr();
            Row {
                blk: base.wrapping_add(r * rb),
                next: base.wrapping_add(next * rb),
                mask: w.exc_mask[r],
                exc: w.exc_hi.as_ptr().wrapping_add(w.exc_start[r] * BLOCK),
            }
        }

        /// Block `b`'s address and, for an exception block, its 128 high bytes; prefetches
        /// block `b` of the `next` row with `pf`. Blocks are taken in order (exception blocks
        /// are consumed in turn).
        #[inline]
        unsafe fn block(&mut self, b: usize, pf: bool) -> (*const u8, Option<*const u8>) {
            if pf {
                for l in 0..3 {
                    _mm_prefetch::<_MM_HINT_T0>(self.next.wrapping_add(b * BLOCK_BYTES + 64 * l) as *const i8);
                }
            }
            let exc = (self.mask >> b & 1 == 1).then(|| {
                let e = self.exc;
                self.exc = e.wrapping_add(BLOCK);
                e
            });
            (self.blk.add(b * BLOCK_BYTES), exc)
        }

        /// [`Row::block`] with the high bytes of its two halves (AVX-512: a half per vector).
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw")]
        unsafe fn high(&mut self, b: usize, tbl: __m512i, pf: bool) -> (*const u8, [__m512i; 2]) {
            match self.block(b, pf) {
                (p, None) => {
                    let codes = _mm512_loadu_si512(p.add(128) as *const _);
                    let m = _mm512_set1_epi8(15);
                    let c = [_mm512_and_si512(codes, m), _mm512_and_si512(_mm512_srli_epi16::<4>(codes), m)];
                    (p, c.map(|c| _mm512_shuffle_epi8(tbl, c)))
                }
                (p, Some(e)) => (p, [_mm512_loadu_si512(e as *const _), _mm512_loadu_si512(e.add(64) as *const _)]),
            }
        }

        /// [`Row::block`] with the high bytes of half `h`, part `q` (AVX2: positions `32q ..`).
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn high256(&mut self, b: usize, tbl: __m256i) -> (*const u8, [[__m256i; 2]; 2]) {
            match self.block(b, true) {
                (p, None) => {
                    let m = _mm256_set1_epi8(15);
                    let c = [0, 1].map(|q| _mm256_loadu_si256(p.add(128 + 32 * q) as *const _));
                    let h0 = c.map(|c| _mm256_shuffle_epi8(tbl, _mm256_and_si256(c, m)));
                    let h1 = c.map(|c| _mm256_shuffle_epi8(tbl, _mm256_and_si256(_mm256_srli_epi16::<4>(c), m)));
                    (p, [h0, h1])
                }
                (p, Some(e)) => {
                    (p, [0, 1].map(|h| [0, 1].map(|q| _mm256_loadu_si256(e.add(64 * h + 32 * q) as *const _))))
                }
            }
        }
    }

    /// The table broadcast to every 128-bit lane, for `vpshufb`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn table(w: &PackedBf16) -> __m512i {
        _mm512_broadcast_i32x4(_mm_loadu_si128(w.table.as_ptr() as *const __m128i))
    }

    /// `RR` rows x `TT` tokens: `out[t * os + o[i]] = W[r[i]] . x[t * xs ..]`, each row
    /// prefetching row `next[i]`. Each (row, token) sum is one FMA chain over 16-column vectors
    /// in column order, reduced by `_mm512_reduce_add_ps`: the bf16 kernel's order (its
    /// `fmadd(w, x, acc)` and `hsum512`), so the results are its results.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile512<const RR: usize, const TT: usize>(
        w: &PackedBf16,
        r: [usize; RR],
        next: [usize; RR],
        x: *const f32,
        xs: usize,
        out: *mut f32,
        os: usize,
        o: [usize; RR],
    ) {
        let tbl = table(w);
        let mut rows: [Row; RR] = std::array::from_fn(|i| Row::new(w, r[i], next[i]));
        let mut acc = [[_mm512_setzero_ps(); TT]; RR];
        for b in 0..w.cols / BLOCK {
            for (row, acc) in rows.iter_mut().zip(acc.iter_mut()) {
                let (p, hi) = row.high(b, tbl, true);
                for (h, hi) in hi.into_iter().enumerate() {
                    let f = widen(_mm512_loadu_si512(p.add(64 * h) as *const _), hi);
                    let xc = x.add(b * BLOCK + 64 * h);
                    for (j, f) in f.into_iter().enumerate() {
                        for (t, a) in acc.iter_mut().enumerate() {
                            *a = _mm512_fmadd_ps(f, _mm512_loadu_ps(xc.add(t * xs + 16 * j)), *a);
                        }
                    }
                }
            }
        }
        for (acc, o) in acc.iter().zip(o) {
            for (t, a) in acc.iter().enumerate() {
                *out.add(t * os + o) = _mm512_reduce_add_ps(*a);
            }
        }
    }

    /// A tile kernel: `RR` rows x `TT` tokens, `out[t * os + o[i]] = W[r[i]] . x[t * xs ..]`,
    /// each row prefetching row `next[i]`, summed in the bf16 kernel's order at its level.
    pub(super) trait Tiles {
        /// # Safety
        /// The implementation's CPU features; rows in range, `x` and `out` long enough.
        #[allow(clippy::too_many_arguments)]
        unsafe fn tile<const RR: usize, const TT: usize>(
            w: &PackedBf16,
            r: [usize; RR],
            next: [usize; RR],
            x: *const f32,
            xs: usize,
            out: *mut f32,
            os: usize,
            o: [usize; RR],
        );
    }

    /// AVX-512F + BW, as the `avx512` dense level.
    pub(super) struct Avx512;
    /// AVX2 + FMA, as the `avx2` dense level.
    pub(super) struct Avx2;

    /// `Tiles` for `$isa` by its tile function (which carries the CPU features).
    macro_rules! tiles {
        ($isa:ident, $tile:ident) => {
            impl Tiles for $isa {
                #[inline]
                unsafe fn tile<const RR: usize, const TT: usize>(
                    w: &PackedBf16,
                    r: [usize; RR],
                    next: [usize; RR],
                    x: *const f32,
                    xs: usize,
                    out: *mut f32,
                    os: usize,
                    o: [usize; RR],
                ) {
                    $tile::<RR, TT>(w, r, next, x, xs, out, os, o)
                }
            }
        };
    }
    tiles!(Avx512, tile512);
    tiles!(Avx2, tile256);

    /// The AVX2 twin of [`tile512`]: each 64-value half is two 32-byte parts, part `q` holding
    /// positions `32q ..` (the layout's 128-bit lanes `2q, 2q + 1`); widened as in [`widen`],
    /// part `q`'s vector `j` holds columns `16j + 8q .. + 8`, so the parts alternate to keep the
    /// AVX2 bf16 kernel's column order (8-lane vectors, `fmadd(w, x, acc)`, `hsum256`).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile256<const RR: usize, const TT: usize>(
        w: &PackedBf16,
        r: [usize; RR],
        next: [usize; RR],
        x: *const f32,
        xs: usize,
        out: *mut f32,
        os: usize,
        o: [usize; RR],
    ) {
        let tbl = _mm256_broadcastsi128_si256(_mm_loadu_si128(w.table.as_ptr() as *const __m128i));
        let z = _mm256_setzero_si256();
        let mut rows: [Row; RR] = std::array::from_fn(|i| Row::new(w, r[i], next[i]));
        let mut acc = [[_mm256_setzero_ps(); TT]; RR];
        for b in 0..w.cols / BLOCK {
            for (row, acc) in rows.iter_mut().zip(acc.iter_mut()) {
                let (p, hi) = row.high256(b, tbl);
                for (h, hi) in hi.into_iter().enumerate() {
                    // words of parts 0 and 1 (w[q][0]: positions 16k + 0..8, w[q][1]: + 8..16),
                    // each vector widened just before its FMAs (16 registers in all)
                    let lo0 = _mm256_loadu_si256(p.add(64 * h) as *const _);
                    let lo1 = _mm256_loadu_si256(p.add(64 * h + 32) as *const _);
                    let wq = [
                        [_mm256_unpacklo_epi8(lo0, hi[0]), _mm256_unpackhi_epi8(lo0, hi[0])],
                        [_mm256_unpacklo_epi8(lo1, hi[1]), _mm256_unpackhi_epi8(lo1, hi[1])],
                    ];
                    let xc = x.add(b * BLOCK + 64 * h);
                    for j in 0..4 {
                        for (q, wq) in wq.iter().enumerate() {
                            let wv = wq[j / 2];
                            let f = _mm256_castsi256_ps(if j % 2 == 0 {
                                _mm256_unpacklo_epi16(z, wv)
                            } else {
                                _mm256_unpackhi_epi16(z, wv)
                            });
                            for (t, a) in acc.iter_mut().enumerate() {
                                *a = _mm256_fmadd_ps(f, _mm256_loadu_ps(xc.add(t * xs + 16 * j + 8 * q)), *a);
                            }
                        }
                    }
                }
            }
        }
        for (acc, o) in acc.iter().zip(o) {
            for (t, a) in acc.iter().enumerate() {
                *out.add(t * os + o) = crate::dense::x86::hsum256(*a);
            }
        }
    }

    /// Row `r` as bf16 bits into `out` (`cols` long): per block half, the low and high bytes
    /// interleaved into words (in-lane, as [`widen`] does), then each 128-bit lane's 4-column
    /// groups put in column order (qword `k` of word vector 0 and 1 holds columns `4k..` and
    /// `16 + 4k..`; see the module's layout).
    ///
    /// # Safety
    /// AVX-512F and BW; `r < rows`, `out` at least `cols` long.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn unpack_row(w: &PackedBf16, r: usize, out: &mut [u16]) {
        assert!(r < w.rows && out.len() >= w.cols);
        let tbl = table(w);
        let mut row = Row::new(w, r, r);
        let order = _mm512_set_epi64(7, 5, 3, 1, 6, 4, 2, 0);
        let o = out.as_mut_ptr();
        for b in 0..w.cols / BLOCK {
            let (p, h) = row.high(b, tbl, false);
            for (i, hi) in h.into_iter().enumerate() {
                let lo = _mm512_loadu_si512(p.add(64 * i) as *const _);
                let (w0, w1) = (_mm512_unpacklo_epi8(lo, hi), _mm512_unpackhi_epi8(lo, hi));
                let d = o.add(b * BLOCK + 64 * i);
                _mm512_storeu_si512(d as *mut _, _mm512_permutexvar_epi64(order, w0));
                _mm512_storeu_si512(d.add(32) as *mut _, _mm512_permutexvar_epi64(order, w1));
            }
        }
    }

    /// [`super::picked`] on `K`'s tiles: one row a tile, prefetching the next pick's row.
    ///
    /// # Safety
    /// `K`'s CPU features; picks within `w` and `x`, `out` as long as `picks`.
    pub(super) unsafe fn picked<K: Tiles>(w: &PackedBf16, x: &[f32], xs: usize, picks: &[(u32, u32)], out: &mut [f32]) {
        for (i, &(t, id)) in picks.iter().enumerate() {
            let next = picks.get(i + 1).map_or(id, |p| p.1) as usize;
            K::tile::<1, 1>(w, [id as usize], [next], x.as_ptr().add(t as usize * xs), 0, out.as_mut_ptr(), 0, [i]);
        }
    }

    /// `out[t * os + (r - rows.start)] = W[r] . x[t * xs ..]`. One token: row `i` of each half
    /// of `rows` beside row `i` of the other (two sequential streams far apart, each prefetching
    /// its next row, as the bf16 GEMV reads). Several: the bf16 GEMM's order of work (rows in
    /// blocks of ~256 KB of bf16, every group of 4 tokens over a block, tiles of 4 adjacent rows
    /// prefetching the next tile's), each tile widening its blocks again (from L2 after the first
    /// token group).
    ///
    /// # Safety
    /// `K`'s CPU features; `rows` within `w`, `x` and `out` as for `crate::dense::gemm_rows`.
    pub(super) unsafe fn gemm<K: Tiles>(
        w: &PackedBf16,
        x: &[f32],
        xs: usize,
        n_tok: usize,
        rows: Range<usize>,
        out: &mut [f32],
        os: usize,
    ) {
        let (xp, op) = (x.as_ptr(), out.as_mut_ptr());
        let s = rows.start;
        if n_tok == 1 {
            let (n, h) = (rows.len(), rows.len() / 2);
            for i in 0..h {
                let r = [s + i, s + h + i];
                K::tile::<2, 1>(w, r, r.map(|r| r + 1), xp, 0, op, 0, [i, h + i]);
            }
            if n % 2 == 1 {
                K::tile::<1, 1>(w, [rows.end - 1], [rows.end], xp, 0, op, 0, [n - 1]);
            }
            return;
        }
        use crate::dense::{TILE_ROWS as R, TILE_TOKENS as T};
        let block = crate::dense::block_rows(w.cols * 2);
        let mut b0 = rows.start;
        while b0 < rows.end {
            let b1 = (b0 + block).min(rows.end);
            let mut t0 = 0;
            while t0 < n_tok {
                let nt = (n_tok - t0).min(T);
                let (x0, o0) = (xp.add(t0 * xs), op.add(t0 * os));
                let mut r0 = b0;
                while r0 < b1 {
                    let nr = (b1 - r0).min(R);
                    macro_rules! go {
                        ($r:literal, $t:literal) => {{
                            let r: [usize; $r] = std::array::from_fn(|i| r0 + i);
                            K::tile::<$r, $t>(w, r, r.map(|r| r + $r), x0, xs, o0, os, r.map(|r| r - s))
                        }};
                    }
                    crate::dense::tile_shape!(nr, nt, go);
                    r0 += nr;
                }
                t0 += nt;
            }
            b0 = b1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// bf16 bits of `v`, truncated.
    fn bf(v: f32) -> u16 {
        (v.to_bits() >> 16) as u16
    }

    #[test]
    fn positions_are_a_permutation() {
        let mut seen = [false; 64];
        for &p in &POS {
            assert!(!seen[p as usize]);
            seen[p as usize] = true;
        }
    }

    #[test]
    fn roundtrip_with_exceptions() {
        let (rows, cols) = (37, 384);
        let mut rng = 1u64;
        let mut data: Vec<u16> = (0..rows * cols)
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                bf(((rng >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1)
            })
            .collect();
        // exceptions: a tiny value, a huge one, NaN, infinities, zeros, in a few blocks
        for (i, v) in [(5, 1e-30f32), (700, 3e9), (1000, f32::NAN), (2000, f32::INFINITY), (2001, f32::NEG_INFINITY)] {
            data[i] = bf(v);
        }
        data[9000] = 0x8000;
        let p = PackedBf16::pack(&data, rows, cols).expect("packs");
        assert!(p.exception_blocks() >= 4, "{p:?}");
        assert_eq!(p.nbytes(), rows * cols * 3 / 2 + 128 * p.exception_blocks() + 16 * rows);
        assert_eq!(p.to_bf16(), data);
        let mut f = vec![0f32; cols];
        p.row_to_f32(3, &mut f);
        assert!(f.iter().zip(&data[3 * cols..4 * cols]).all(|(a, &b)| a.to_bits() == (b as u32) << 16));
    }

    #[test]
    fn refuses_what_it_cannot_pack() {
        assert!(PackedBf16::pack(&[0u16; 100], 1, 100).is_none());
        assert!(PackedBf16::pack(&vec![0u16; 128 * 65], 1, 128 * 65).is_none());
        // every block an exception: 256 distinct high bytes spread everywhere
        let data: Vec<u16> = (0..128 * 256u32).map(|i| ((i * 37 % 256) << 8) as u16).collect();
        assert!(PackedBf16::pack(&data, 256, 128).is_none());
    }
}
