//! Int8 x int8 matmul with per-row weight scales: the "fast" LM head (the bf16 head quantized
//! once at load, read at 1 byte per weight instead of 2).
//!
//! Contract, as for the ternary kernels: `out[t][r] = (sum_c w[r][c] * q[t][c]) as f32 /
//! act_scale[t] * row_scale[r]` with an exact i32 sum; every level gives bit-identical output.
//! Weights are quantized per row: `row_scale = max|w_r| / 127`, `w_q = round_half_even(w /
//! row_scale)` in [-127, 127] (never -128), computed as `w * (127 / max|w_r|)`.
//!
//! Layouts:
//! - Generic: row-major `[rows][kcols]` i8, zero padded.
//! - x86 levels: rows in groups of 16, each group one contiguous stream of `kcols / 4` blocks of
//!   64 bytes; block `k`, dword `i`, byte `j` = row `16g + i`, column `4k + j` (16 rows x 4
//!   columns, one row per dword lane). The VNNI levels store `w + 128` (unsigned operand of
//!   `vpdpbusd`) and multiply it by a broadcast of 4 signed activations, then subtract
//!   `128 * sum_c q[c]` (`QuantActs::sum`) per token; AVX2 stores `w` and uses
//!   `vpmaddubsw(|q|, sign(w, q))`, exact since `|w| <= 127` (pairs stay within i16).

use std::ops::Range;

use super::{row_kernel, AlignedBytes, KernelLevel, OutPtr, QuantActs, K_ALIGN};
use crate::dense::DenseRef;

/// Int8 weights with one f32 scale per row, packed for one [`KernelLevel`].
#[derive(Debug, Clone)]
pub struct Int8Matrix {
    rows: usize,
    cols: usize,
    kcols: usize,
    level: KernelLevel,
    data: AlignedBytes,
    scales: Vec<f32>,
}

impl Int8Matrix {
    /// Quantizes a dense `[rows][cols]` matrix per row (see the module docs) and packs it.
    pub fn from_dense(w: DenseRef<'_>, rows: usize, cols: usize, level: KernelLevel) -> Int8Matrix {
        assert!(w.len() >= rows * cols, "dense matrix too short");
        let mut q = vec![0i8; rows * cols];
        let mut scales = vec![0f32; rows];
        super::par_rows(rows, (&mut q, cols), (&mut scales, 1), |r0, qc, sc| {
            let mut row = vec![0f32; cols];
            for (j, (qr, s_r)) in qc.chunks_mut(cols.max(1)).zip(sc).enumerate() {
                w.row_to_f32(r0 + j, cols, &mut row);
                let amax = super::abs_max(&row);
                if amax > 0.0 && amax.is_finite() {
                    let s = 127.0 / amax;
                    for (o, &v) in qr.iter_mut().zip(&row) {
                        *o = super::round_ties_even(v * s).clamp(-127.0, 127.0) as i8;
                    }
                    *s_r = amax / 127.0;
                }
            }
        });
        Int8Matrix::from_i8(&q, rows, cols, scales, level)
    }

    /// Packs already quantized weights (`rows * cols` values in [-127, 127]).
    pub fn from_i8(q: &[i8], rows: usize, cols: usize, scales: Vec<f32>, level: KernelLevel) -> Int8Matrix {
        assert_eq!(q.len(), rows * cols, "weights length");
        assert_eq!(scales.len(), rows, "one scale per row");
        assert!(cols <= 65536, "int8 matmul: i32 accumulators need cols <= 65536");
        assert!(q.iter().all(|&v| v != -128), "int8 weights must lie in [-127, 127]");
        assert!(level.is_available(), "kernel level {} is not supported by this CPU", level.name());
        let kcols = cols.div_ceil(K_ALIGN) * K_ALIGN;
        let ngroups = rows.div_ceil(16);
        let data = match level {
            KernelLevel::Generic => {
                let mut d = AlignedBytes::filled(rows * kcols, 0);
                let s = d.as_mut_slice();
                for r in 0..rows {
                    for c in 0..cols {
                        s[r * kcols + c] = q[r * cols + c] as u8;
                    }
                }
                d
            }
            _ => {
                let off = Self::offset(level);
                let mut d = AlignedBytes::filled(ngroups * 16 * kcols, off);
                let s = d.as_mut_slice();
                for r in 0..rows {
                    let (g, i) = (r / 16, r % 16);
                    for c in 0..cols {
                        let v = q[r * cols + c];
                        s[g * 16 * kcols + (c / 4) * 64 + 4 * i + c % 4] = (v as u8).wrapping_add(off);
                    }
                }
                d
            }
        };
        Int8Matrix { rows, cols, kcols, level, data, scales }
    }

    /// What the packed bytes add to the weights: 128 for the VNNI levels (unsigned operand of
    /// `vpdpbusd`), 0 otherwise.
    fn offset(level: KernelLevel) -> u8 {
        match level.simd() {
            KernelLevel::AvxVnni | KernelLevel::Avx512Vnni | KernelLevel::Avx512Vbmi => 128,
            _ => 0,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn level(&self) -> KernelLevel {
        self.level
    }
    /// Bytes of packed weights (read once per token).
    pub fn nbytes(&self) -> usize {
        self.data.len()
    }
    /// Output multiplier per row (`max|w_r| / 127`).
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }
    /// Row ranges handed to threads start at multiples of this.
    pub fn row_align(&self) -> usize {
        match self.level {
            KernelLevel::Generic => 1,
            _ => 16,
        }
    }
    /// The quantized weights, row-major (tests and debugging).
    pub fn to_i8(&self) -> Vec<i8> {
        let d = self.data.as_slice();
        let mut out = vec![0i8; self.rows * self.cols];
        for r in 0..self.rows {
            for c in 0..self.cols {
                let i = match self.level {
                    KernelLevel::Generic => r * self.kcols + c,
                    _ => (r / 16) * 16 * self.kcols + (c / 4) * 64 + 4 * (r % 16) + c % 4,
                };
                out[r * self.cols + c] = d[i].wrapping_sub(Self::offset(self.level)) as i8;
            }
        }
        out
    }

    fn check_acts(&self, x: &QuantActs) {
        assert!(x.stride >= self.kcols && x.cols == self.cols, "activation width mismatch");
        assert!(x.q.len() >= x.n_tok * x.stride && x.scale.len() >= x.n_tok && x.sum.len() >= x.n_tok);
    }

    /// # Safety
    /// `out` writable at `(t, r)` for `t < x.n_tok`, `r in rows`; acts checked.
    unsafe fn matmul_rows_raw(&self, x: &QuantActs, out: OutPtr, rows: Range<usize>) {
        if x.n_tok == 0 || rows.is_empty() {
            return;
        }
        match self.level {
            KernelLevel::Generic => self.generic_rows(x, out, rows),
            #[cfg(target_arch = "x86_64")]
            KernelLevel::Avx2 => x86::avx2(self, x, out, rows),
            #[cfg(target_arch = "x86_64")]
            KernelLevel::AvxVnni => {
                if super::avxvnni::uses_vex() {
                    x86::vnni256_vex(self, x, out, rows)
                } else {
                    x86::vnni256_evex(self, x, out, rows)
                }
            }
            #[cfg(target_arch = "x86_64")]
            KernelLevel::Avx512Vnni | KernelLevel::Avx512Vbmi => x86::avx512(self, x, out, rows),
            #[cfg(target_arch = "x86_64")]
            KernelLevel::Amx | KernelLevel::AmxVbmi => {
                if x.n_tok >= x86::AMX_MIN_TOKENS {
                    x86::amx(self, x, out, rows)
                } else {
                    x86::avx512(self, x, out, rows)
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("x86 levels are never available here"),
        }
    }

    unsafe fn generic_rows(&self, x: &QuantActs, out: OutPtr, rows: Range<usize>) {
        let d = self.data.as_slice();
        for t in 0..x.n_tok {
            let xq = &x.row(t)[..self.kcols];
            for r in rows.clone() {
                let w = &d[r * self.kcols..(r + 1) * self.kcols];
                // A plain widening dot product: LLVM turns it into pmaddwd (x86) / smlal, sdot (ARM).
                let dot: i32 = w.iter().zip(xq).map(|(&a, &b)| a as i8 as i32 * b as i32).sum();
                *out.at(t, r) = super::generic::epilogue(dot, x.scale[t], self.scales[r]);
            }
        }
    }
}

row_kernel!(head Int8Matrix);

#[cfg(target_arch = "x86_64")]
// the tile loops index several register arrays by the same token or half index
#[allow(clippy::needless_range_loop)]
mod x86 {
    use core::arch::x86_64::*;
    use std::ops::Range;

    use super::super::x86::lane_mask;
    use super::super::{OutPtr, QuantActs};
    use super::Int8Matrix;

    /// Tokens per tile.
    const TN: usize = 4;
    /// From this many tokens the AMX levels multiply on tiles ([`amx`]): there is nothing to
    /// unpack, so tiles pay from fewer tokens than for the ternary weights. 2B-4T's head on 2
    /// threads of the Xeon measured (`cargo bench -p bitnet-cpu --bench kernels -- dense avx512vbmi
    /// amxvbmi t2`, token counts edited), tiles against `vpdpbusd`: 2 tokens 10.4 against 9.0 ms,
    /// 3: 11.2 / 11.5, 4: 10.4 / 12.5, 6: 10.6 / 15.1, 8: 10.2 / 16.2, 12: 11.0 / 19.4.
    pub(super) const AMX_MIN_TOKENS: usize = 4;

    /// The epilogue of token `t`, the 16 rows from `r0` (those inside `rows`): `acc` holds
    /// `sum_c (w + 128) q`, so `(acc - 128 sum_c q) as f32 / act_scale * row_scale`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn store16(
        acc: __m512i,
        m: &Int8Matrix,
        x: &QuantActs,
        out: OutPtr,
        rows: &Range<usize>,
        t: usize,
        r0: usize,
    ) {
        let mask = lane_mask(r0, 16, rows) as __mmask16;
        let sc = _mm512_maskz_loadu_ps(mask, m.scales.as_ptr().add(r0));
        let dot = _mm512_sub_epi32(acc, _mm512_set1_epi32(128 * x.sum[t]));
        let f = _mm512_div_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(x.scale[t]));
        _mm512_mask_storeu_ps(out.at(t, r0), mask, _mm512_mul_ps(f, sc));
    }

    /// The AMX levels from [`AMX_MIN_TOKENS`] tokens: the x86 layout's 64-byte blocks (16 rows x
    /// 4 columns, `w + 128`) are AMX B-tile rows as they are, so tiles load straight from the
    /// packed weights; `tdpbsud` multiplies them by the signed activations exactly as
    /// `vpdpbusd` does, and the epilogue is [`avx512`]'s. Pairs of row groups, 32 tokens at a
    /// time (a pair's 80 KB, for 2B-4T's head, stay in L2 across the token blocks); the next
    /// pair is prefetched while one computes.
    ///
    /// # Safety
    /// AMX-INT8 granted (`amx::available`), AVX-512 F/BW/VL; as for `matmul_rows_raw`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn amx(m: &Int8Matrix, x: &QuantActs, out: OutPtr, rows: Range<usize>) {
        use super::super::amx;
        #[repr(C, align(64))]
        struct Acc([[i32; amx::TOKS]; amx::TOKS]);
        let mut acc = Acc([[0; amx::TOKS]; amx::TOKS]);
        let chunks = m.kcols / amx::KCHUNK;
        let group_bytes = 16 * m.kcols;
        let w = m.data.as_slice().as_ptr();
        let (g0, g1) = (rows.start / 16, rows.end.div_ceil(16));
        let mut g = g0;
        while g < g1 {
            let n = (g1 - g).min(2);
            // a lone last group multiplies its own tile twice (never a row past the matrix)
            let b_group = if n == 2 { group_bytes } else { 0 };
            let next = w.wrapping_add((g + 2) * group_bytes);
            let pf_lines = if g + 2 < g1 { (2 * group_bytes / 64).div_ceil(chunks) } else { 0 };
            let mut t0 = 0;
            while t0 < x.n_tok {
                let nt = (x.n_tok - t0).min(amx::TOKS);
                let pf = if t0 == 0 { (next, pf_lines) } else { (std::ptr::null(), 0) };
                amx::dot(
                    x.q.as_ptr().add(t0 * x.stride),
                    x.stride,
                    nt,
                    w.add(g * group_bytes),
                    b_group,
                    chunks,
                    acc.0.as_mut_ptr() as *mut i32,
                    pf,
                );
                for i in 0..n {
                    for (t, row) in acc.0[..nt].iter().enumerate() {
                        let a = _mm512_load_si512(row.as_ptr().add(16 * i) as *const _);
                        store16(a, m, x, out, &rows, t0 + t, (g + i) * 16);
                    }
                }
                t0 += nt;
            }
            g += n;
        }
    }
    /// Software prefetch distance in 64-byte blocks (several tokens).
    const PF_BLOCKS: usize = 64;

    /// # Safety
    /// AVX-512 F/BW/VL/VNNI; as for `matmul_rows_raw`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn avx512(m: &Int8Matrix, x: &QuantActs, out: OutPtr, rows: Range<usize>) {
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
        unsafe fn tile<const T: usize>(
            m: &Int8Matrix,
            x: &QuantActs,
            out: OutPtr,
            rows: &Range<usize>,
            g: usize,
            t0: usize,
        ) {
            let nk = m.kcols / 4;
            let w = m.data.as_slice().as_ptr().add(g * 16 * m.kcols);
            // Two accumulators per token (even / odd blocks) to hide the vpdpbusd latency.
            let mut a = [[_mm512_setzero_si512(); 2]; T];
            let mut k = 0;
            while k < nk {
                for h in 0..2 {
                    if k + h < nk {
                        // Far ahead of the hardware prefetcher (compute and memory time are
                        // close here, and it does not run far enough ahead on its own).
                        _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add((k + h + PF_BLOCKS) * 64) as *const i8);
                        let wv = _mm512_load_si512(w.add((k + h) * 64) as *const _);
                        for t in 0..T {
                            let xp = x.q.as_ptr().add((t0 + t) * x.stride + 4 * (k + h));
                            let xb = _mm512_set1_epi32((xp as *const i32).read_unaligned());
                            a[t][h] = _mm512_dpbusd_epi32(a[t][h], wv, xb);
                        }
                    }
                }
                k += 2;
            }
            for t in 0..T {
                store16(_mm512_add_epi32(a[t][0], a[t][1]), m, x, out, rows, t0 + t, g * 16);
            }
        }
        for g in rows.start / 16..rows.end.div_ceil(16) {
            let mut t = 0;
            while t < x.n_tok {
                let n = (x.n_tok - t).min(TN);
                match n {
                    4 => tile::<4>(m, x, out, &rows, g, t),
                    3 => tile::<3>(m, x, out, &rows, g, t),
                    2 => tile::<2>(m, x, out, &rows, g, t),
                    _ => tile::<1>(m, x, out, &rows, g, t),
                }
                t += n;
            }
        }
    }

    /// Epilogue for 8 rows from `r0` (exact dots already offset-corrected).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn store8(
        dot: __m256i,
        m: &Int8Matrix,
        x: &QuantActs,
        out: OutPtr,
        rows: &Range<usize>,
        t: usize,
        r0: usize,
    ) {
        let k = lane_mask(r0, 8, rows);
        if k == 0 {
            return;
        }
        let f = _mm256_div_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(x.scale[t]));
        let bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        let mv = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(k as i32), bits), bits);
        let sc = _mm256_maskload_ps(m.scales.as_ptr().add(r0), mv);
        _mm256_maskstore_ps(out.at(t, r0), mv, _mm256_mul_ps(f, sc));
    }

    /// # Safety
    /// AVX2; as for `matmul_rows_raw`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn avx2(m: &Int8Matrix, x: &QuantActs, out: OutPtr, rows: Range<usize>) {
        #[inline]
        #[target_feature(enable = "avx2")]
        unsafe fn tile<const T: usize>(
            m: &Int8Matrix,
            x: &QuantActs,
            out: OutPtr,
            rows: &Range<usize>,
            g: usize,
            t0: usize,
        ) {
            let nk = m.kcols / 4;
            let w = m.data.as_slice().as_ptr().add(g * 16 * m.kcols);
            let ones = _mm256_set1_epi16(1);
            let mut a = [[_mm256_setzero_si256(); T]; 2];
            for k in 0..nk {
                let wv =
                    [_mm256_load_si256(w.add(k * 64) as *const _), _mm256_load_si256(w.add(k * 64 + 32) as *const _)];
                for t in 0..T {
                    let xp = x.q.as_ptr().add((t0 + t) * x.stride + 4 * k);
                    let xb = _mm256_set1_epi32((xp as *const i32).read_unaligned());
                    let xa = _mm256_abs_epi8(xb);
                    for h in 0..2 {
                        let p = _mm256_maddubs_epi16(xa, _mm256_sign_epi8(wv[h], xb));
                        a[h][t] = _mm256_add_epi32(a[h][t], _mm256_madd_epi16(p, ones));
                    }
                }
            }
            for h in 0..2 {
                for t in 0..T {
                    store8(a[h][t], m, x, out, rows, t0 + t, g * 16 + 8 * h);
                }
            }
        }
        for g in rows.start / 16..rows.end.div_ceil(16) {
            let mut t = 0;
            while t < x.n_tok {
                let n = (x.n_tok - t).min(TN);
                match n {
                    4 => tile::<4>(m, x, out, &rows, g, t),
                    3 => tile::<3>(m, x, out, &rows, g, t),
                    2 => tile::<2>(m, x, out, &rows, g, t),
                    _ => tile::<1>(m, x, out, &rows, g, t),
                }
                t += n;
            }
        }
    }

    macro_rules! vnni256 {
        ($name:ident, $feat:literal, $dp:ident) => {
            /// # Safety
            /// The features of this function; as for `matmul_rows_raw`.
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn $name(m: &Int8Matrix, x: &QuantActs, out: OutPtr, rows: Range<usize>) {
                #[inline]
                #[target_feature(enable = $feat)]
                unsafe fn tile<const T: usize>(
                    m: &Int8Matrix,
                    x: &QuantActs,
                    out: OutPtr,
                    rows: &Range<usize>,
                    g: usize,
                    t0: usize,
                ) {
                    let nk = m.kcols / 4;
                    let w = m.data.as_slice().as_ptr().add(g * 16 * m.kcols);
                    let mut a = [[_mm256_setzero_si256(); T]; 2];
                    for k in 0..nk {
                        if T > 1 {
                            _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add((k + PF_BLOCKS) * 64) as *const i8);
                        }
                        let wv = [
                            _mm256_load_si256(w.add(k * 64) as *const _),
                            _mm256_load_si256(w.add(k * 64 + 32) as *const _),
                        ];
                        for t in 0..T {
                            let xp = x.q.as_ptr().add((t0 + t) * x.stride + 4 * k);
                            let xb = _mm256_set1_epi32((xp as *const i32).read_unaligned());
                            for h in 0..2 {
                                a[h][t] = $dp(a[h][t], wv[h], xb);
                            }
                        }
                    }
                    for h in 0..2 {
                        let r0 = g * 16 + 8 * h;
                        for t in 0..T {
                            let corr = _mm256_set1_epi32(128 * x.sum[t0 + t]);
                            store8(_mm256_sub_epi32(a[h][t], corr), m, x, out, rows, t0 + t, r0);
                        }
                    }
                }
                for g in rows.start / 16..rows.end.div_ceil(16) {
                    let mut t = 0;
                    while t < x.n_tok {
                        let n = (x.n_tok - t).min(TN);
                        match n {
                            4 => tile::<4>(m, x, out, &rows, g, t),
                            3 => tile::<3>(m, x, out, &rows, g, t),
                            2 => tile::<2>(m, x, out, &rows, g, t),
                            _ => tile::<1>(m, x, out, &rows, g, t),
                        }
                        t += n;
                    }
                }
            }
        };
    }

    vnni256!(vnni256_vex, "avx2,avxvnni", _mm256_dpbusd_avx_epi32);
    vnni256!(vnni256_evex, "avx2,avx512f,avx512vl,avx512vnni", _mm256_dpbusd_epi32);
}
