//! 4-bit x int8 matmul with one f16 scale per 32 weights: the `int4` plan's LM head (the bf16
//! head quantized once at load and read at 4.5 bits per weight instead of 16; the LM head is
//! over half of the bytes a decoded token reads in the exact plan).
//!
//! Quantization (llama.cpp's Q4_0, with round-half-even): per row and group of [`GROUP`]
//! columns, `d = m / -8` where `m` is the group's value of largest magnitude (sign kept), stored
//! as f16; `q = round_half_even(w / d) + 8` clamped to [0, 15] (so `m` itself is exactly `-8 d`).
//!
//! Contract (every level bit for bit, tests against [`Int4Matrix::reference`]):
//! `out[t][r] = (sum over groups g, in order, of f32(isum_g) * d[r][g]) / act_scale[t]`, where
//! `isum_g = sum_{c in g} (q[r][c] - 8) * x[t][c]` is exact in i32, each product and sum is one
//! f32 operation (`acc = acc + f32(isum) * d`, never fused), and groups run over the padded width
//! (padding: `q = 8`, activations 0, `d = 0`). The kernels compute `isum_g` as
//! `sum q * x - 8 * QuantActs::group_sums` (unsigned x signed byte products, as the ternary
//! kernels do).
//!
//! Layouts (4 bits per weight plus 16 bits per 32 weights):
//! - Generic: row-major, 16 bytes per group (as ggml's Q4_0): byte `i` of group `g` holds
//!   column `32g + i` in its low nibble and `32g + 16 + i` in its high one, so unpacking is a
//!   mask and a shift of 16 consecutive bytes that line up with 16 consecutive activations;
//!   f16 scales `[rows][kcols / 32]`.
//! - x86 levels: rows in blocks of 16; each block one stream of groups, each group 4 chunks of
//!   64 bytes; in chunk `m` of group `g`, byte `4i + j` holds row `16b + i`, column
//!   `32g + 8m + j` in its low nibble and column `32g + 8m + 4 + j` in its high nibble. So
//!   `chunk & 15` and `(chunk >> 4) & 15` are vectors of 16 rows x 4 consecutive columns (one
//!   dword per row), multiplied by a broadcast of 4 activations as the ternary kernels do: the
//!   lanes are output rows. Scales: `[blocks][groups][16]` f16, a second sequential stream.

use std::ops::Range;

use super::{
    grouped_layout_level, grouped_packed_bytes, grouped_row_align, quantize_groups, row_kernel, AlignedBytes,
    KernelLevel, OutPtr, QuantActs, ACT_GROUP, K_ALIGN,
};
use crate::dense::{f16_to_f32, DenseRef};

/// f32 -> f16 bits, round half to even (the `half` crate).
fn f32_to_f16(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits()
}

/// Columns sharing one scale.
pub const GROUP: usize = ACT_GROUP;

/// 4-bit weights with an f16 scale per row and group of 32 columns, packed for one level.
#[derive(Debug, Clone)]
pub struct Int4Matrix {
    rows: usize,
    cols: usize,
    kcols: usize,
    level: KernelLevel,
    data: AlignedBytes,
    /// f16 bits, layout of the level (module docs)
    scales: Vec<u16>,
}

/// One group's scale (f16 bits) and `q`, by llama.cpp's Q4_0 rule (module docs): the value of
/// largest magnitude `m` (sign kept) maps to -8, `d = m / -8` rounded to f16 (the kernels use the
/// stored value). An all-zero group gets `d = 0` and `q = 8`. (A least-squares refit of `d`
/// and a search over a few alternative scales lowered the fixtures' mean logit error by only
/// ~3%, with no gain in top-1 agreement, at several seconds of load time for 2B-4T: not kept.)
fn quantize_group(w: &[f32], q: &mut [u8]) -> u16 {
    let m = w.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    let dh = f32_to_f16(m / -8.0);
    let d = f16_to_f32(dh);
    if d == 0.0 || !d.is_finite() {
        q.fill(8);
        return 0;
    }
    for (o, &v) in q.iter_mut().zip(w) {
        *o = (super::round_ties_even(v / d) + 8.0).clamp(0.0, 15.0) as u8;
    }
    dh
}

impl Int4Matrix {
    /// Quantizes a dense `[rows][cols]` matrix (module docs) and packs it for `level`.
    pub fn from_dense(w: DenseRef<'_>, rows: usize, cols: usize, level: KernelLevel) -> Int4Matrix {
        let (q, d) = quantize_groups(w, rows, cols, 8, quantize_group);
        Int4Matrix::from_q4(&q, &d, rows, cols, level)
    }

    /// Packs quantized weights: `q` `[rows][kcols]` in [0, 15] (8 = zero; `kcols` = `cols`
    /// padded to [`K_ALIGN`]) and f16 scales `d` `[rows][kcols / 32]`.
    pub fn from_q4(q: &[u8], d: &[u16], rows: usize, cols: usize, level: KernelLevel) -> Int4Matrix {
        let kcols = cols.div_ceil(K_ALIGN) * K_ALIGN;
        let ng = kcols / GROUP;
        assert_eq!(q.len(), rows * kcols, "weights length");
        assert_eq!(d.len(), rows * ng, "one scale per row and group");
        assert!(q.iter().all(|&v| v < 16), "4-bit weights must lie in [0, 15]");
        assert!(cols <= 65536, "int4 matmul: i32 accumulators need cols <= 65536");
        assert!(level.is_available(), "kernel level {} is not supported by this CPU", level.name());
        let level = grouped_layout_level(level);
        let (data, scales) = match level {
            KernelLevel::Generic => {
                let mut b = AlignedBytes::filled(rows * kcols / 2, 0x88);
                let s = b.as_mut_slice();
                for r in 0..rows {
                    for g in 0..ng {
                        for i in 0..16 {
                            let c = r * kcols + g * GROUP + i;
                            s[(r * kcols + g * GROUP) / 2 + i] = q[c] | (q[c + 16] << 4);
                        }
                    }
                }
                (b, d.to_vec())
            }
            _ => {
                let blocks = rows.div_ceil(16);
                let mut b = AlignedBytes::filled(blocks * 16 * kcols / 2, 0x88);
                let mut sc = vec![0u16; blocks * ng * 16];
                let s = b.as_mut_slice();
                for r in 0..rows {
                    let (blk, i) = (r / 16, r % 16);
                    for g in 0..ng {
                        sc[(blk * ng + g) * 16 + i] = d[r * ng + g];
                        for m in 0..4 {
                            let at = (blk * ng + g) * 256 + 64 * m + 4 * i;
                            for j in 0..4 {
                                let c = g * GROUP + 8 * m + j;
                                s[at + j] = q[r * kcols + c] | (q[r * kcols + c + 4] << 4);
                            }
                        }
                    }
                }
                (b, sc)
            }
        };
        Int4Matrix { rows, cols, kcols, level, data, scales }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// The level whose kernel runs (the one asked for, or generic: see `grouped_layout_level`).
    pub fn level(&self) -> KernelLevel {
        self.level
    }
    /// Bytes read per token: packed weights and scales.
    pub fn nbytes(&self) -> usize {
        self.data.len() + 2 * self.scales.len()
    }
    /// What [`Int4Matrix::nbytes`] will be for a `[rows][cols]` matrix packed for `level`.
    pub fn packed_bytes(rows: usize, cols: usize, level: KernelLevel) -> usize {
        grouped_packed_bytes(rows, cols, level, 4)
    }
    /// Row ranges handed to threads start at multiples of this.
    pub fn row_align(&self) -> usize {
        grouped_row_align(self.level)
    }

    /// The quantized weights `[rows][kcols]` (0..=15) and scales `[rows][kcols / 32]` (f16
    /// bits), read back from the packed layout (tests).
    pub fn to_q4(&self) -> (Vec<u8>, Vec<u16>) {
        let (kc, ng) = (self.kcols, self.kcols / GROUP);
        let s = self.data.as_slice();
        let mut q = vec![0u8; self.rows * kc];
        let mut d = vec![0u16; self.rows * ng];
        for r in 0..self.rows {
            for c in 0..kc {
                q[r * kc + c] = match self.level {
                    KernelLevel::Generic => {
                        (s[(r * kc + c / GROUP * GROUP) / 2 + c % 16] >> (4 * (c % GROUP / 16))) & 15
                    }
                    _ => {
                        let (blk, i, g, cg) = (r / 16, r % 16, c / GROUP, c % GROUP);
                        let (m, hi, j) = (cg / 8, (cg % 8) / 4, cg % 4);
                        (s[(blk * ng + g) * 256 + 64 * m + 4 * i + j] >> (4 * hi)) & 15
                    }
                };
            }
            for g in 0..ng {
                d[r * ng + g] = match self.level {
                    KernelLevel::Generic => self.scales[r * ng + g],
                    _ => self.scales[((r / 16) * ng + g) * 16 + r % 16],
                };
            }
        }
        (q, d)
    }

    /// The contract in plain scalar code, from unpacked weights (`to_q4`): the test oracle.
    pub fn reference(q: &[u8], d: &[u16], rows: usize, kcols: usize, x: &QuantActs) -> Vec<f32> {
        let ng = kcols / GROUP;
        let mut out = vec![0f32; x.n_tok * rows];
        for t in 0..x.n_tok {
            let xq = x.row(t);
            for r in 0..rows {
                let mut acc = 0f32;
                for g in 0..ng {
                    let mut isum = 0i32;
                    for c in g * GROUP..(g + 1) * GROUP {
                        isum += (q[r * kcols + c] as i32 - 8) * xq[c] as i32;
                    }
                    acc += isum as f32 * f16_to_f32(d[r * ng + g]);
                }
                out[t * rows + r] = acc / x.scale[t];
            }
        }
        out
    }

    fn check_acts(&self, x: &QuantActs) {
        assert!(x.stride >= self.kcols && x.cols == self.cols, "activation width mismatch");
        assert!(x.q.len() >= x.n_tok * x.stride && x.scale.len() >= x.n_tok);
        assert!(x.group_sums_ready(), "QuantActs::fill_group_sums must run before the int4 matmul");
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
            KernelLevel::Avx2 | KernelLevel::AvxVnni => x86::avx2(self, x, out, rows),
            #[cfg(target_arch = "x86_64")]
            KernelLevel::Avx512Vnni | KernelLevel::Avx512Vbmi | KernelLevel::Amx | KernelLevel::AmxVbmi => {
                x86::avx512(self, x, out, rows)
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("x86 levels are never available here"),
        }
    }

    unsafe fn generic_rows(&self, x: &QuantActs, out: OutPtr, rows: Range<usize>) {
        let (kc, ng) = (self.kcols, self.kcols / GROUP);
        let d = self.data.as_slice();
        for r in rows {
            let w = &d[r * kc / 2..(r + 1) * kc / 2];
            let sc = &self.scales[r * ng..(r + 1) * ng];
            let mut acc = [0f32; 8];
            for t0 in (0..x.n_tok).step_by(8) {
                let nt = (x.n_tok - t0).min(8);
                acc[..nt].fill(0.0);
                for g in 0..ng {
                    let wb = &w[g * GROUP / 2..(g + 1) * GROUP / 2];
                    let dg = f16_to_f32(sc[g]);
                    for (t, a) in acc[..nt].iter_mut().enumerate() {
                        let xg = &x.row(t0 + t)[g * GROUP..(g + 1) * GROUP];
                        // 16 bytes against two runs of 16 activations: a plain widening dot
                        // that LLVM vectorizes (pmaddwd on x86, smlal / sdot on ARM)
                        let (xl, xh) = xg.split_at(GROUP / 2);
                        let isum: i32 = wb
                            .iter()
                            .zip(xl.iter().zip(xh))
                            .map(|(&b, (&l, &h))| ((b & 15) as i32 - 8) * l as i32 + ((b >> 4) as i32 - 8) * h as i32)
                            .sum();
                        *a += isum as f32 * dg;
                    }
                }
                for (t, a) in acc[..nt].iter().enumerate() {
                    *out.at(t0 + t, r) = a / x.scale[t0 + t];
                }
            }
        }
    }
}

row_kernel!(head Int4Matrix);

#[cfg(target_arch = "x86_64")]
// the tile loops index several register arrays by the same token or half index
#[allow(clippy::needless_range_loop)]
mod x86 {
    use core::arch::x86_64::*;
    use std::ops::Range;

    use super::super::grouped::{bcast4, each_tile, store_avx2, store_avx512, PF_BYTES};
    use super::super::{OutPtr, QuantActs};
    use super::{Int4Matrix, GROUP};

    /// # Safety
    /// AVX-512 F/BW/VL/VNNI; as for `matmul_rows_raw`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn avx512(m: &Int4Matrix, x: &QuantActs, out: OutPtr, rows: Range<usize>) {
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
        unsafe fn tile<const T: usize, const B: usize>(
            m: &Int4Matrix,
            x: &QuantActs,
            out: OutPtr,
            rows: &Range<usize>,
            blks: [usize; B],
            t0: usize,
        ) {
            let ng = m.kcols / GROUP;
            let w = blks.map(|blk| m.data.as_slice().as_ptr().add(blk * ng * 256));
            let sc = blks.map(|blk| m.scales.as_ptr().add(blk * ng * 16));
            let nib = _mm512_set1_epi8(15);
            let mut acc = [[_mm512_setzero_ps(); T]; B];
            for g in 0..ng {
                for b in 0..B {
                    for l in 0..4 {
                        _mm_prefetch::<_MM_HINT_T0>(w[b].wrapping_add(g * 256 + 64 * l + PF_BYTES) as *const i8);
                    }
                    _mm_prefetch::<_MM_HINT_T0>(sc[b].wrapping_add(g * 16 + PF_BYTES / 16) as *const i8);
                    // two chains per token (low and high nibbles) to hide the vpdpbusd latency
                    let mut lo = [_mm512_setzero_si512(); T];
                    let mut hi = [_mm512_setzero_si512(); T];
                    for k in 0..4 {
                        let v = _mm512_load_si512(w[b].add(g * 256 + 64 * k) as *const _);
                        let wl = _mm512_and_si512(v, nib);
                        let wh = _mm512_and_si512(_mm512_srli_epi16::<4>(v), nib);
                        let c = g * GROUP + 8 * k;
                        for t in 0..T {
                            lo[t] = _mm512_dpbusd_epi32(lo[t], wl, _mm512_set1_epi32(bcast4(x, t0 + t, c)));
                            hi[t] = _mm512_dpbusd_epi32(hi[t], wh, _mm512_set1_epi32(bcast4(x, t0 + t, c + 4)));
                        }
                    }
                    let d = _mm512_cvtph_ps(_mm256_loadu_si256(sc[b].add(g * 16) as *const _));
                    for t in 0..T {
                        let corr = _mm512_set1_epi32(8 * x.group_sums(t0 + t)[g]);
                        let isum = _mm512_sub_epi32(_mm512_add_epi32(lo[t], hi[t]), corr);
                        acc[b][t] = _mm512_add_ps(acc[b][t], _mm512_mul_ps(_mm512_cvtepi32_ps(isum), d));
                    }
                }
            }
            for b in 0..B {
                store_avx512(acc[b], x, out, rows, blks[b], t0);
            }
        }
        each_tile!(tile, m, x, out, rows);
    }

    /// # Safety
    /// AVX2 and F16C; as for `matmul_rows_raw`.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn avx2(m: &Int4Matrix, x: &QuantActs, out: OutPtr, rows: Range<usize>) {
        #[inline]
        #[target_feature(enable = "avx2,f16c")]
        unsafe fn tile<const T: usize, const B: usize>(
            m: &Int4Matrix,
            x: &QuantActs,
            out: OutPtr,
            rows: &Range<usize>,
            blks: [usize; B],
            t0: usize,
        ) {
            let ng = m.kcols / GROUP;
            let w = blks.map(|blk| m.data.as_slice().as_ptr().add(blk * ng * 256));
            let sc = blks.map(|blk| m.scales.as_ptr().add(blk * ng * 16));
            let nib = _mm256_set1_epi8(15);
            let ones = _mm256_set1_epi16(1);
            // [rows 0-7, rows 8-15][token]
            let mut acc = [[[_mm256_setzero_ps(); T]; 2]; B];
            for g in 0..ng {
                for b in 0..B {
                    if T > 1 {
                        _mm_prefetch::<_MM_HINT_T0>(w[b].wrapping_add(g * 256 + PF_BYTES) as *const i8);
                    }
                    for h in 0..2 {
                        // i16 sums over the group: each vpmaddubsw pair is at most 2 * 15 * 128 =
                        // 3840 in magnitude, 8 of them at most 30720: no overflow
                        let mut s = [_mm256_setzero_si256(); T];
                        for k in 0..4 {
                            let v = _mm256_load_si256(w[b].add(g * 256 + 64 * k + 32 * h) as *const _);
                            let wl = _mm256_and_si256(v, nib);
                            let wh = _mm256_and_si256(_mm256_srli_epi16::<4>(v), nib);
                            let c = g * GROUP + 8 * k;
                            for t in 0..T {
                                let pl = _mm256_maddubs_epi16(wl, _mm256_set1_epi32(bcast4(x, t0 + t, c)));
                                let ph = _mm256_maddubs_epi16(wh, _mm256_set1_epi32(bcast4(x, t0 + t, c + 4)));
                                s[t] = _mm256_add_epi16(s[t], _mm256_add_epi16(pl, ph));
                            }
                        }
                        let d = _mm256_cvtph_ps(_mm_loadu_si128(sc[b].add(g * 16 + 8 * h) as *const _));
                        for t in 0..T {
                            let corr = _mm256_set1_epi32(8 * x.group_sums(t0 + t)[g]);
                            let isum = _mm256_sub_epi32(_mm256_madd_epi16(s[t], ones), corr);
                            acc[b][h][t] = _mm256_add_ps(acc[b][h][t], _mm256_mul_ps(_mm256_cvtepi32_ps(isum), d));
                        }
                    }
                }
            }
            for b in 0..B {
                store_avx2(acc[b], x, out, rows, blks[b], t0);
            }
        }
        each_tile!(tile, m, x, out, rows);
    }
}
