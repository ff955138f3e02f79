//! Float GEMV/GEMM for the LM head, which BitNet keeps in bf16 (tied to the embedding) and never
//! quantizes. f32 accumulation; bf16/f16 weights are widened exactly on the fly, activations are
//! never rounded (f32 throughout).
//!
//! The LM head of 2B-4T is 128256 x 2560 bf16 = 656 MB, read once per decoded token: the GEMV is
//! bandwidth bound, so the kernels read one row at a time (one sequential stream) with several
//! independent accumulators, widening bf16 with a zero-extend + shift and f16 with `vcvtph2ps`.
//! [`gemm_rows`] (several tokens, e.g. batched decode) takes tiles of 4 rows x 4 tokens, so each
//! widened weight vector feeds 4 tokens and each activation load 4 rows, and prefetches the next
//! tile in address order so the weights are still read as one sequential stream.
//!
//! SIMD paths (runtime detection, once): AVX-512F, else AVX2 + FMA + F16C, else portable Rust.
//! Float results differ from the portable path only by summation order (not bit-identical);
//! every path accumulates in f32 with at least 8 independent partial sums.

use std::ops::Range;
use std::sync::OnceLock;

pub use crate::packed_bf16::PackedBf16;

/// A borrowed dense weight matrix `[rows][cols]`.
#[derive(Clone, Copy)]
pub enum DenseRef<'a> {
    F32(&'a [f32]),
    /// raw f16 bits
    F16(&'a [u16]),
    /// raw bf16 bits
    BF16(&'a [u16]),
    /// int8 weights with one f32 scale per row: `W[r][c] = q[r * cols + c] as f32 * scale[r]`
    /// (activations stay f32; the dot is `(sum_c q * x) * scale[r]`).
    I8 {
        q: &'a [i8],
        scale: &'a [f32],
    },
    /// bf16 values in the lossless 12-bit layout (`crate::packed_bf16`): the same products as
    /// [`DenseRef::BF16`], the same results.
    PackedBf16(&'a PackedBf16),
}

impl DenseRef<'_> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            DenseRef::F32(d) => d.len(),
            DenseRef::F16(d) | DenseRef::BF16(d) => d.len(),
            DenseRef::I8 { q, .. } => q.len(),
            DenseRef::PackedBf16(p) => p.rows() * p.cols(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Row `r` of a `[rows][cols]` matrix, widened to f32 into `out` (`cols` long).
    pub fn row_to_f32(&self, r: usize, cols: usize, out: &mut [f32]) {
        let o = r * cols;
        match *self {
            DenseRef::F32(v) => out.copy_from_slice(&v[o..o + cols]),
            DenseRef::F16(v) => out.iter_mut().zip(&v[o..o + cols]).for_each(|(x, &h)| *x = f16_to_f32(h)),
            DenseRef::BF16(v) => out.iter_mut().zip(&v[o..o + cols]).for_each(|(x, &h)| *x = bf16_to_f32(h)),
            DenseRef::I8 { q, scale } => {
                out.iter_mut().zip(&q[o..o + cols]).for_each(|(x, &h)| *x = h as f32 * scale[r])
            }
            DenseRef::PackedBf16(p) => p.row_to_f32(r, &mut out[..cols]),
        }
    }
}

/// Exact bf16 -> f32.
#[inline(always)]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// Exact f16 -> f32 without a dependency (normals, subnormals, inf/nan).
#[inline(always)]
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = if exp == 0 {
        if man == 0 {
            sign
        } else {
            // subnormal: value = man * 2^-24
            let v = man as f32 * (1.0 / 16777216.0);
            return if sign != 0 { -v } else { v };
        }
    } else if exp == 31 {
        sign | 0x7f80_0000 | (man << 13)
    } else {
        sign | ((exp + 112) << 23) | (man << 13)
    };
    f32::from_bits(bits)
}

/// Which dense implementation runs (detected once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenseLevel {
    Generic,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512F.
    Avx512,
}

impl DenseLevel {
    /// The best level this CPU supports.
    pub fn detect() -> DenseLevel {
        static L: OnceLock<DenseLevel> = OnceLock::new();
        *L.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if is_x86_feature_detected!("avx512f") {
                    return DenseLevel::Avx512;
                }
                if is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
                {
                    return DenseLevel::Avx2;
                }
            }
            DenseLevel::Generic
        })
    }
    /// Every level this CPU can run, most portable first.
    pub fn available() -> Vec<DenseLevel> {
        match DenseLevel::detect() {
            DenseLevel::Generic => vec![DenseLevel::Generic],
            DenseLevel::Avx2 => vec![DenseLevel::Generic, DenseLevel::Avx2],
            DenseLevel::Avx512 => {
                let mut v = vec![DenseLevel::Generic];
                #[cfg(target_arch = "x86_64")]
                if is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
                {
                    v.push(DenseLevel::Avx2);
                }
                v.push(DenseLevel::Avx512);
                v
            }
        }
    }
    /// Whether this CPU can run `self` (no allocation: called on every GEMV).
    pub fn is_available(self) -> bool {
        match self {
            DenseLevel::Generic => true,
            #[cfg(target_arch = "x86_64")]
            DenseLevel::Avx2 => {
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
            }
            #[allow(unreachable_patterns)]
            _ => DenseLevel::detect() == self,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DenseLevel::Generic => "generic",
            DenseLevel::Avx2 => "avx2",
            DenseLevel::Avx512 => "avx512",
        }
    }
}

/// Dot of row `r` with `x` (len cols), 8 independent partial sums so the compiler vectorizes it.
#[inline]
fn dot_row(w: DenseRef<'_>, r: usize, cols: usize, x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    macro_rules! body {
        ($row:expr, $conv:expr) => {{
            let row = $row;
            let n8 = cols / 8 * 8;
            for (wc, xc) in row[..n8].chunks_exact(8).zip(x[..n8].chunks_exact(8)) {
                for k in 0..8 {
                    acc[k] += $conv(wc[k]) * xc[k];
                }
            }
            let mut tail = 0f32;
            for c in n8..cols {
                tail += $conv(row[c]) * x[c];
            }
            tail
        }};
    }
    let tail = match w {
        DenseRef::F32(d) => body!(&d[r * cols..(r + 1) * cols], |v: f32| v),
        DenseRef::F16(d) => body!(&d[r * cols..(r + 1) * cols], f16_to_f32),
        DenseRef::BF16(d) => body!(&d[r * cols..(r + 1) * cols], bf16_to_f32),
        DenseRef::I8 { q, .. } => body!(&q[r * cols..(r + 1) * cols], |v: i8| v as f32),
        DenseRef::PackedBf16(_) => unreachable!("packed bf16 rows are unpacked in strips first"),
    };
    let dot = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail;
    match w {
        DenseRef::I8 { scale, .. } => dot * scale[r],
        _ => dot,
    }
}

/// `$go!(R, T)` for a GEMM tile of `$nr` (1-4) rows and `$nt` (1-4) tokens, as const generics:
/// the tile shapes of the bf16 / f32 / int8 GEMMs and the packed bf16 one.
macro_rules! tile_shape {
    ($nr:expr, $nt:expr, $go:ident) => {
        match ($nr, $nt) {
            (4, 4) => $go!(4, 4),
            (4, 3) => $go!(4, 3),
            (4, 2) => $go!(4, 2),
            (4, _) => $go!(4, 1),
            (3, 4) => $go!(3, 4),
            (3, 3) => $go!(3, 3),
            (3, 2) => $go!(3, 2),
            (3, _) => $go!(3, 1),
            (2, 4) => $go!(2, 4),
            (2, 3) => $go!(2, 3),
            (2, 2) => $go!(2, 2),
            (2, _) => $go!(2, 1),
            (_, 4) => $go!(1, 4),
            (_, 3) => $go!(1, 3),
            (_, 2) => $go!(1, 2),
            (_, _) => $go!(1, 1),
        }
    };
}
pub(crate) use tile_shape;

/// Rows and tokens per tile of the SIMD GEMMs (`x86::R`, which says why) and of the packed
/// bf16 one, which keeps their order of work.
pub(crate) const TILE_ROWS: usize = 4;
pub(crate) const TILE_TOKENS: usize = 4;

/// Weight bytes per row block: the GEMM walks the rows in blocks of about this size and runs
/// every token group over a block before the next, so a batch reads the weights from DRAM once
/// (the block stays in the 1 MB L2 with the tokens' activations) instead of once per 4 tokens.
const BLOCK_BYTES: usize = 256 << 10;

/// Rows per GEMM block for rows of `row_bytes` (a multiple of the tile rows): the packed bf16
/// head unpacks strips of this many rows.
pub(crate) fn block_rows(row_bytes: usize) -> usize {
    (BLOCK_BYTES / row_bytes.max(1)).max(TILE_ROWS) / TILE_ROWS * TILE_ROWS
}

fn check(w: DenseRef<'_>, cols: usize, rows: &Range<usize>) {
    if let DenseRef::PackedBf16(p) = w {
        assert_eq!(p.cols(), cols, "dense packed bf16: columns");
    }
    assert!(rows.start <= rows.end && rows.end * cols <= w.len(), "dense rows out of range");
    if let DenseRef::I8 { scale, .. } = w {
        assert!(scale.len() >= rows.end, "dense int8: one scale per row");
    }
}

/// `out[r - rows.start] = W[r] . x` for `r in rows`.
pub fn gemv_rows(w: DenseRef<'_>, cols: usize, x: &[f32], rows: Range<usize>, out: &mut [f32]) {
    gemv_rows_with(DenseLevel::detect(), w, cols, x, rows, out)
}

/// [`gemv_rows`] with an explicit level (tests, benchmarks). Panics if the CPU lacks it.
pub fn gemv_rows_with(level: DenseLevel, w: DenseRef<'_>, cols: usize, x: &[f32], rows: Range<usize>, out: &mut [f32]) {
    check(w, cols, &rows);
    assert!(x.len() >= cols && out.len() >= rows.len(), "dense gemv buffers too short");
    assert!(level.is_available(), "dense level {} not supported", level.name());
    if let DenseRef::PackedBf16(p) = w {
        return crate::packed_bf16::gemm(level, p, x, cols, 1, rows, out, 0);
    }
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: features checked above; slices bounds checked.
        DenseLevel::Avx512 => unsafe { x86::gemv_avx512(w, cols, x, rows, out) },
        #[cfg(target_arch = "x86_64")]
        DenseLevel::Avx2 => unsafe { x86::gemv_avx2(w, cols, x, rows, out) },
        _ => {
            for (o, r) in out.iter_mut().zip(rows) {
                *o = dot_row(w, r, cols, x);
            }
        }
    }
}

/// Several tokens: `out[t * out_stride + (r - rows.start)] = W[r] . x[t * x_stride .. + cols]`
/// for `t < n_tok`, `r in rows`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_rows(
    w: DenseRef<'_>,
    cols: usize,
    x: &[f32],
    x_stride: usize,
    n_tok: usize,
    rows: Range<usize>,
    out: &mut [f32],
    out_stride: usize,
) {
    gemm_rows_with(DenseLevel::detect(), w, cols, x, x_stride, n_tok, rows, out, out_stride)
}

/// [`gemm_rows`] with an explicit level (tests, benchmarks). Panics if the CPU lacks it.
#[allow(clippy::too_many_arguments)]
pub fn gemm_rows_with(
    level: DenseLevel,
    w: DenseRef<'_>,
    cols: usize,
    x: &[f32],
    x_stride: usize,
    n_tok: usize,
    rows: Range<usize>,
    out: &mut [f32],
    out_stride: usize,
) {
    check(w, cols, &rows);
    if n_tok == 0 || rows.is_empty() {
        return;
    }
    assert!(x.len() >= (n_tok - 1) * x_stride + cols, "dense gemm: x too short");
    assert!(out.len() >= (n_tok - 1) * out_stride + rows.len(), "dense gemm: out too short");
    assert!(level.is_available(), "dense level {} not supported", level.name());
    if let DenseRef::PackedBf16(p) = w {
        return crate::packed_bf16::gemm(level, p, x, x_stride, n_tok, rows, out, out_stride);
    }
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: features checked above; slices bounds checked.
        DenseLevel::Avx512 => unsafe { x86::gemm_avx512(w, cols, x, x_stride, n_tok, rows, out, out_stride) },
        #[cfg(target_arch = "x86_64")]
        DenseLevel::Avx2 => unsafe { x86::gemm_avx2(w, cols, x, x_stride, n_tok, rows, out, out_stride) },
        _ => {
            for t in 0..n_tok {
                let xt = &x[t * x_stride..t * x_stride + cols];
                for (i, r) in rows.clone().enumerate() {
                    out[t * out_stride + i] = dot_row(w, r, cols, xt);
                }
            }
        }
    }
}

/// A few rows of `W` against chosen tokens: `out[i] = W[id] . x[tok * x_stride .. + cols]` for
/// each pick `(tok, id)` (the LM head's rescoring, [`gemm_rows`]'s value for that row and
/// token, bit for bit: the same tile, one accumulator chain per pair), in one call: a call per
/// row paid the checks and dispatch each time (128 rows of 2B-4T's bf16 head, cached: 57-263
/// us, 57-70 in four runs of six, against 22-29) and prefetched the row after it, not the next
/// pick's. While a row is summed,
/// the next pick's row is prefetched, as the GEMV prefetches its next row. (On the Xeon VM the
/// first read of a row far from the last costs several microseconds whatever the prefetching:
/// plain loads of 128 lines on random pages of a 656 MB buffer took 1-10 ms, the VM's paging,
/// so there the 256 rows `int2` recomputes still take ~1 ms of a decode step.)
pub fn gemv_picked(w: DenseRef<'_>, cols: usize, x: &[f32], x_stride: usize, picks: &[(u32, u32)], out: &mut [f32]) {
    gemv_picked_with(DenseLevel::detect(), w, cols, x, x_stride, picks, out)
}

/// [`gemv_picked`] with an explicit level (tests, benchmarks). Panics if the CPU lacks it.
pub fn gemv_picked_with(
    level: DenseLevel,
    w: DenseRef<'_>,
    cols: usize,
    x: &[f32],
    x_stride: usize,
    picks: &[(u32, u32)],
    out: &mut [f32],
) {
    let (rows, toks) =
        picks.iter().fold((0, 0), |(r, t), &(tok, id)| (r.max(id as usize + 1), t.max(tok as usize + 1)));
    check(w, cols, &(0..rows));
    assert!(toks == 0 || x.len() >= (toks - 1) * x_stride + cols, "dense picked rows: x too short");
    assert!(out.len() >= picks.len(), "dense picked rows: out too short");
    assert!(level.is_available(), "dense level {} not supported", level.name());
    if let DenseRef::PackedBf16(p) = w {
        return crate::packed_bf16::picked(level, p, x, x_stride, picks, out);
    }
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: features checked above; rows and tokens bounds checked.
        DenseLevel::Avx512 => unsafe { x86::picked_avx512(w, cols, x, x_stride, picks, out) },
        #[cfg(target_arch = "x86_64")]
        DenseLevel::Avx2 => unsafe { x86::picked_avx2(w, cols, x, x_stride, picks, out) },
        _ => {
            for (o, &(t, id)) in out.iter_mut().zip(picks) {
                *o = dot_row(w, id as usize, cols, &x[t as usize * x_stride..]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    //! AVX-512F and AVX2/FMA/F16C kernels. `simd!` instantiates one module per (instruction set,
    //! weight type); `$load` widens `$lanes` weights at a pointer to an f32 vector, `$widen` one.

    use super::{bf16_to_f32, f16_to_f32, DenseRef};
    use core::arch::x86_64::*;
    use std::ops::Range;

    /// Rows per GEMM tile. Reading 4 rows at once is 4 streams 5 KB apart, which on the Zen 4
    /// this was tuned on reads DRAM at about half the speed of one stream; so each tile also
    /// prefetches the next tile's rows (contiguous) in address order into L2, at the pace it
    /// consumes its own, and DRAM sees one sequential stream again (measured 2x for 2-4 tokens).
    /// One token (decode's GEMV) does better still with two rows from the two halves of the
    /// range side by side: two sequential streams far apart, as the ternary decode kernel reads.
    /// bf16 head (128256 x 2560), alternated in one process against the 4-row tiles, same bits:
    /// 1 thread 20.1 against 27.0 ms (32.6 / 24.3 GB/s), 2 threads 19.8 against 21.9; the f32 and
    /// int8-x-f32 heads 8% faster on one thread (46.5 -> 42.8, 13.0 -> 12.1 ms), 1-3% on two (Zen
    /// 4). Each stream also prefetches its next row (one row ahead, a line per 64 bytes): one core
    /// of a Xeon reads ~16 GB/s and its hardware prefetchers alone left the bf16 head at 49.8-52.0
    /// ms on one thread (three copies cycled, from DRAM), 41.6-42.8 with it; two threads 25.5-25.9
    /// against 23.7-25.7.
    const R: usize = super::TILE_ROWS;
    const T: usize = super::TILE_TOKENS;

    macro_rules! simd {
        ($m:ident, $feat:literal, $elem:ty, $vec:ty, $lanes:literal, $zero:path, $fma:path, $loadx:path,
         $hsum:path, $load:path, $widen:path) => {
            pub(super) mod $m {
                use super::*;

                /// `RR` rows x `TT` tokens: rows `r` (offsets in rows from `w`, scales of
                /// `scale`, if not null; outputs at offsets `o` of `out`). Every product of the
                /// GEMM, the GEMV and the picked rows runs here, so each output's sum has one
                /// order. With `PF` (adjacent rows `r = 0..RR`), the next tile's rows (contiguous)
                /// are prefetched into L2 in address order at the pace this tile is consumed, so
                /// DRAM sees one sequential stream. With `PF_ROW` (rows far apart), each row's
                /// row `nx[i]` (the GEMV: its next row), one row ahead of the column being read.
                #[inline]
                #[target_feature(enable = $feat)]
                #[allow(clippy::too_many_arguments)]
                unsafe fn tile<const RR: usize, const TT: usize, const PF: bool, const PF_ROW: bool>(
                    w: *const $elem,
                    cols: usize,
                    r: [usize; RR],
                    nx: [usize; RR],
                    x: *const f32,
                    x_stride: usize,
                    out: *mut f32,
                    out_stride: usize,
                    o: [usize; RR],
                    scale: *const f32,
                ) {
                    let mut a = [[$zero(); TT]; RR];
                    let next = w.wrapping_add(RR * cols) as *const u8;
                    let step = RR * $lanes * std::mem::size_of::<$elem>();
                    let mut c = 0;
                    while c + $lanes <= cols {
                        if PF {
                            let p = next.wrapping_add((c / $lanes) * step);
                            let mut o = 0;
                            while o < step {
                                _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(o) as *const i8);
                                o += 64;
                            }
                        }
                        if PF_ROW && (c * std::mem::size_of::<$elem>()) % 64 == 0 {
                            for i in 0..RR {
                                _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(nx[i] * cols + c) as *const i8);
                            }
                        }
                        for i in 0..RR {
                            let wv = $load(w.add(r[i] * cols + c));
                            for t in 0..TT {
                                a[i][t] = $fma(wv, $loadx(x.add(t * x_stride + c)), a[i][t]);
                            }
                        }
                        c += $lanes;
                    }
                    for i in 0..RR {
                        for t in 0..TT {
                            let mut s = $hsum(a[i][t]);
                            for cc in c..cols {
                                s += $widen(*w.add(r[i] * cols + cc)) * *x.add(t * x_stride + cc);
                            }
                            let d = out.add(t * out_stride + o[i]);
                            *d = if scale.is_null() { s } else { s * *scale.add(r[i]) };
                        }
                    }
                }

                /// # Safety
                /// CPU features of this module; `rows` within `w`; `x`, `out` long enough.
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = $feat)]
                pub(crate) unsafe fn gemm(
                    w: &[$elem],
                    cols: usize,
                    x: &[f32],
                    x_stride: usize,
                    n_tok: usize,
                    rows: Range<usize>,
                    out: &mut [f32],
                    out_stride: usize,
                    scale: Option<&[f32]>,
                ) {
                    if n_tok == 1 {
                        // GEMV: row i of each half beside row i of the other, two sequential
                        // streams far apart (see `R`); one token, so the token strides are unused
                        let (n, w0) = (rows.len(), w.as_ptr().add(rows.start * cols));
                        let sc = scale.map_or(std::ptr::null(), |s| s.as_ptr().add(rows.start));
                        let (xp, o) = (x.as_ptr(), out.as_mut_ptr());
                        let h = n / 2;
                        for i in 0..h {
                            let r = [i, h + i];
                            tile::<2, 1, false, true>(w0, cols, r, r.map(|r| r + 1), xp, 0, o, 0, r, sc);
                        }
                        if n % 2 == 1 {
                            let r = [n - 1];
                            tile::<1, 1, false, false>(w0, cols, r, r, xp, 0, o, 0, r, sc);
                        }
                        return;
                    }
                    // Rows in blocks of ~BLOCK_BYTES (a multiple of R), every token group over a
                    // block before the next: each output's sum runs in the same order whatever the
                    // grouping (bit-identical to one token at a time).
                    let block = crate::dense::block_rows(cols * std::mem::size_of::<$elem>());
                    let mut b0 = rows.start;
                    while b0 < rows.end {
                        let b1 = (b0 + block).min(rows.end);
                        let mut t0 = 0;
                        while t0 < n_tok {
                            let nt = (n_tok - t0).min(T);
                            let mut r0 = b0;
                            while r0 < b1 {
                                let nr = (b1 - r0).min(R);
                                let xp = x.as_ptr().add(t0 * x_stride);
                                let o = out.as_mut_ptr().add(t0 * out_stride + (r0 - rows.start));
                                let w0 = w.as_ptr().add(r0 * cols);
                                let sc = scale.map_or(std::ptr::null(), |s| s.as_ptr().add(r0));
                                macro_rules! go {
                                    ($r:literal, $t:literal) => {{
                                        let r: [usize; $r] = std::array::from_fn(|i| i);
                                        tile::<$r, $t, true, false>(w0, cols, r, r, xp, x_stride, o, out_stride, r, sc)
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

                /// # Safety
                /// CPU features of this module; every pick's row within `w` and token within
                /// `x`; `out` holds `picks.len()` values.
                #[target_feature(enable = $feat)]
                pub(crate) unsafe fn picked(
                    w: &[$elem],
                    cols: usize,
                    x: &[f32],
                    x_stride: usize,
                    picks: &[(u32, u32)],
                    out: &mut [f32],
                    scale: Option<&[f32]>,
                ) {
                    let sc = scale.map_or(std::ptr::null(), |s| s.as_ptr());
                    for (i, &(t, id)) in picks.iter().enumerate() {
                        let next = picks.get(i + 1).map_or(id, |p| p.1) as usize;
                        let xp = x.as_ptr().add(t as usize * x_stride);
                        tile::<1, 1, false, true>(
                            w.as_ptr(),
                            cols,
                            [id as usize],
                            [next],
                            xp,
                            0,
                            out.as_mut_ptr(),
                            0,
                            [i],
                            sc,
                        );
                    }
                }
            }
        };
    }

    #[inline(always)]
    fn id(v: f32) -> f32 {
        v
    }

    // AVX-512F helpers.
    #[inline(always)]
    unsafe fn z512() -> __m512 {
        _mm512_setzero_ps()
    }
    #[inline(always)]
    unsafe fn fma512(a: __m512, b: __m512, c: __m512) -> __m512 {
        _mm512_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn ld512(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn hsum512(v: __m512) -> f32 {
        _mm512_reduce_add_ps(v)
    }
    #[inline(always)]
    unsafe fn ld512_f16(p: *const u16) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
    #[inline(always)]
    unsafe fn ld512_bf16(p: *const u16) -> __m512 {
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i))))
    }

    // AVX2 / FMA / F16C helpers.
    #[inline(always)]
    unsafe fn z256() -> __m256 {
        _mm256_setzero_ps()
    }
    #[inline(always)]
    unsafe fn fma256(a: __m256, b: __m256, c: __m256) -> __m256 {
        _mm256_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn ld256(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
    /// The AVX2 kernels' 8-lane sum (the packed bf16 kernels reduce the same way).
    #[inline(always)]
    pub(crate) unsafe fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }
    #[inline(always)]
    unsafe fn ld256_f16(p: *const u16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
    #[inline(always)]
    unsafe fn ld256_bf16(p: *const u16) -> __m256 {
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i))))
    }

    simd!(avx512_f32, "avx512f", f32, __m512, 16, z512, fma512, ld512, hsum512, ld512, id);
    simd!(avx512_f16, "avx512f", u16, __m512, 16, z512, fma512, ld512, hsum512, ld512_f16, f16_to_f32);
    simd!(avx512_bf16, "avx512f", u16, __m512, 16, z512, fma512, ld512, hsum512, ld512_bf16, bf16_to_f32);
    #[inline(always)]
    unsafe fn ld512_i8(p: *const i8) -> __m512 {
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i)))
    }
    #[inline(always)]
    unsafe fn ld256_i8(p: *const i8) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)))
    }
    #[inline(always)]
    fn i8f(v: i8) -> f32 {
        v as f32
    }

    simd!(avx512_i8, "avx512f", i8, __m512, 16, z512, fma512, ld512, hsum512, ld512_i8, i8f);
    simd!(avx2_f32, "avx2,fma,f16c", f32, __m256, 8, z256, fma256, ld256, hsum256, ld256, id);
    simd!(avx2_f16, "avx2,fma,f16c", u16, __m256, 8, z256, fma256, ld256, hsum256, ld256_f16, f16_to_f32);
    simd!(avx2_bf16, "avx2,fma,f16c", u16, __m256, 8, z256, fma256, ld256, hsum256, ld256_bf16, bf16_to_f32);
    simd!(avx2_i8, "avx2,fma,f16c", i8, __m256, 8, z256, fma256, ld256, hsum256, ld256_i8, i8f);

    /// # Safety
    /// AVX-512F; bounds as for [`super::gemv_rows`] (checked by the caller).
    ///
    /// A GEMV is the GEMM with one token: every (row, token) value is then the same whatever the
    /// token count and tile shape (one accumulator chain per pair, same reduction), so batched
    /// logits equal single-sequence logits bit for bit (tests/gemm_invariance.rs).
    pub(super) unsafe fn gemv_avx512(w: DenseRef<'_>, cols: usize, x: &[f32], rows: Range<usize>, out: &mut [f32]) {
        let n = rows.len();
        gemm_avx512(w, cols, x, cols, 1, rows, out, n)
    }

    /// # Safety
    /// AVX2, FMA, F16C; bounds as for [`super::gemv_rows`] (checked by the caller). The GEMM with one
    /// token, as for AVX-512.
    pub(super) unsafe fn gemv_avx2(w: DenseRef<'_>, cols: usize, x: &[f32], rows: Range<usize>, out: &mut [f32]) {
        let n = rows.len();
        gemm_avx2(w, cols, x, cols, 1, rows, out, n)
    }

    /// `$fun` of the module of `$w`'s weight type at one level (modules named in the order f32,
    /// f16, bf16, i8; the int8 weights pass their row scales). The packed bf16 head has its own
    /// kernels and is dispatched before this.
    macro_rules! by_type {
        ($w:expr, [$f32:ident, $f16:ident, $bf16:ident, $i8:ident], $fun:ident($($a:expr),*)) => {
            match $w {
                DenseRef::F32(d) => $f32::$fun(d, $($a),*, None),
                DenseRef::F16(d) => $f16::$fun(d, $($a),*, None),
                DenseRef::BF16(d) => $bf16::$fun(d, $($a),*, None),
                DenseRef::I8 { q, scale } => $i8::$fun(q, $($a),*, Some(scale)),
                DenseRef::PackedBf16(_) => unreachable!("packed bf16 is dispatched by the caller"),
            }
        };
    }

    /// One level's entry points over the weight types' modules (`by_type!`).
    macro_rules! level_entries {
        ($gemm:ident, $picked:ident, $feat:literal, $mods:tt) => {
            /// # Safety
            #[doc = concat!($feat, "; bounds as for [`super::gemm_rows`] (checked by the caller).")]
            #[allow(clippy::too_many_arguments)]
            pub(super) unsafe fn $gemm(
                w: DenseRef<'_>,
                cols: usize,
                x: &[f32],
                xs: usize,
                n: usize,
                rows: Range<usize>,
                out: &mut [f32],
                os: usize,
            ) {
                by_type!(w, $mods, gemm(cols, x, xs, n, rows, out, os))
            }

            /// # Safety
            #[doc = concat!($feat, "; bounds as for [`super::gemv_picked`] (checked by the caller).")]
            pub(super) unsafe fn $picked(
                w: DenseRef<'_>,
                cols: usize,
                x: &[f32],
                xs: usize,
                picks: &[(u32, u32)],
                out: &mut [f32],
            ) {
                by_type!(w, $mods, picked(cols, x, xs, picks, out))
            }
        };
    }
    level_entries!(gemm_avx512, picked_avx512, "AVX-512F", [avx512_f32, avx512_f16, avx512_bf16, avx512_i8]);
    level_entries!(gemm_avx2, picked_avx2, "AVX2, FMA, F16C", [avx2_f32, avx2_f16, avx2_bf16, avx2_i8]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversion_matches_half_semantics() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 5.960464477539063e-8);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert!(f16_to_f32(0x7c00).is_infinite());
    }

    #[test]
    fn gemv_matches_naive() {
        let rows = 7;
        let cols = 37;
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0).collect();
        let x: Vec<f32> = (0..cols).map(|i| ((i * 13 % 17) as f32 - 8.0) / 8.0).collect();
        let mut out = vec![0f32; rows];
        gemv_rows(DenseRef::F32(&w), cols, &x, 0..rows, &mut out);
        for r in 0..rows {
            let want: f64 = (0..cols).map(|c| w[r * cols + c] as f64 * x[c] as f64).sum();
            assert!((out[r] as f64 - want).abs() < 1e-4);
        }
    }
}
