//! 2-bit x int8 matmul with one f16 scale per 32 weights: the `int2` plan's LM head, read at 2.5
//! bits per weight (103 MB for 2B-4T's 128256 x 2560 head, against 185 MB at 4 bits). Too coarse
//! to give logits by itself; the plan uses it to rank the vocabulary and recomputes the top
//! logits from the stored head (`bitnet-core`'s `lm_head.rs`).
//!
//! Quantization: per row and group of [`GROUP`] columns, four levels `w = d (2q - 3)`, `q` in
//! [0, 3] (no zero level: it would cost a fifth value); `d` (f16) is the scale among
//! `absmax * f / 3`, `f` in [`SCALE_FRACTIONS`], with the smallest squared error (a plain absmax
//! scale lets one outlier push most weights onto the inner levels: the search lowers the head's
//! error by about a fifth on random weights), `q = clamp(round((w / d + 3) / 2), 0, 3)`.
//!
//! Contract (every level bit for bit, tests against [`Int2Matrix::reference`]):
//! `out[t][r] = (sum over groups g, in order, of f32(isum_g) * d[r][g]) / act_scale[t]`, where
//! `isum_g = sum_{c in g} (2 q[r][c] - 3) * x[t][c]` is exact in i32, each product and sum one f32
//! operation (`acc = acc + f32(isum) * d`, never fused), and groups run over the padded width
//! (padding: activations 0, `d = 0`). The kernels compute `isum_g` as
//! `2 * sum q * x - 3 * QuantActs::group_sums` (unsigned x signed byte products).
//!
//! Layouts (2 bits per weight plus 16 bits per 32 weights):
//! - Generic: row-major, 8 bytes per group: bits `2s..2s+2` of byte `i` of group `g` hold
//!   column `32g + 8s + i`, so `(b >> 2s) & 3` of 8 consecutive bytes lines up with 8
//!   consecutive activations; f16 scales `[rows][kcols / 32]`.
//! - x86 levels: rows in blocks of 16; each block one stream of groups, each group 2 chunks of
//!   64 bytes; in chunk `m` of group `g`, bits `2s..2s+2` of byte `4i + j` hold row `16b + i`,
//!   column `32g + 16m + 4s + j`. So `(chunk >> 2s) & 3` is a vector of 16 rows x 4 consecutive
//!   columns (one dword per row), multiplied by a broadcast of 4 activations as the 4-bit
//!   kernel does. Scales: `[blocks][groups][16]` f16, a second sequential stream.

use std::ops::Range;

use super::{
    grouped_layout_level, grouped_packed_bytes, grouped_row_align, quantize_groups, row_kernel, AlignedBytes,
    KernelLevel, OutPtr, QuantActs, ACT_GROUP, K_ALIGN,
};
use crate::dense::{f16_to_f32, DenseRef};

/// Columns sharing one scale.
pub const GROUP: usize = ACT_GROUP;

/// Fractions of `absmax / 3` tried as a group's scale (the first is the plain absmax scale).
pub const SCALE_FRACTIONS: [f32; 6] = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5];

/// 2-bit weights with an f16 scale per row and group of 32 columns, packed for one level.
#[derive(Debug, Clone)]
pub struct Int2Matrix {
    rows: usize,
    cols: usize,
    kcols: usize,
    level: KernelLevel,
    data: AlignedBytes,
    /// f16 bits, layout of the level (module docs)
    scales: Vec<u16>,
}

/// One group's scale (f16 bits) and `q` (module docs). An all-zero group gets `d = 0`.
fn quantize_group(w: &[f32], q: &mut [u8]) -> u16 {
    let amax = w.iter().fold(0f32, |m, &v| m.max(v.abs()));
    let mut best = (f32::INFINITY, 0u16);
    for f in SCALE_FRACTIONS {
        let dh = half::f16::from_f32(amax * f / 3.0).to_bits();
        let d = f16_to_f32(dh);
        if d == 0.0 || !d.is_finite() {
            continue;
        }
        let err: f32 = w.iter().map(|&v| (d * (2.0 * level(v, d) as f32 - 3.0) - v).powi(2)).sum();
        if err < best.0 {
            best = (err, dh);
        }
    }
    let d = f16_to_f32(best.1);
    for (o, &v) in q.iter_mut().zip(w) {
        *o = if d == 0.0 { 0 } else { level(v, d) };
    }
    best.1
}

/// Lanes of [`search_lanes`]: one per candidate scale, padded to a vector's width.
const LANES: usize = 8;
const _: () = assert!(SCALE_FRACTIONS.len() <= LANES);

/// [`quantize_group`], the candidate scales side by side: lane `l` runs fraction `l`'s levels
/// and squared error, element by element in the scalar's order and with the scalar's operations
/// (division, the rounding trick, separate multiply and subtract), so each lane's error and
/// levels are the scalar's bits and the same scale wins (test: `search_lanes_matches_scalar`).
/// The lanes vectorize; the scalar's one scale at a time, each a chain of divisions, took 55%
/// of loading `random:2b-4t` with the `int2` plan. A group with a NaN or an infinity takes the
/// scalar path (whose NaN handling the lanes do not copy).
#[inline(always)]
fn search_lanes(w: &[f32], q: &mut [u8]) -> u16 {
    if !w.iter().all(|v| v.is_finite()) {
        return quantize_group(w, q);
    }
    let amax = w.iter().fold(0f32, |m, &v| m.max(v.abs()));
    let (mut dh, mut d, mut valid) = ([0u16; LANES], [1f32; LANES], [false; LANES]);
    for (l, f) in SCALE_FRACTIONS.into_iter().enumerate() {
        dh[l] = half::f16::from_f32(amax * f / 3.0).to_bits();
        let dl = f16_to_f32(dh[l]);
        valid[l] = dl != 0.0 && dl.is_finite();
        if valid[l] {
            d[l] = dl;
        }
    }
    let mut err = [0f32; LANES];
    for &v in w {
        for l in 0..LANES {
            let e = d[l] * (2.0 * level_f32(v, d[l]) - 3.0) - v;
            err[l] += e * e;
        }
    }
    let mut best = (f32::INFINITY, None);
    for l in 0..SCALE_FRACTIONS.len() {
        if valid[l] && err[l] < best.0 {
            best = (err[l], Some(l));
        }
    }
    match best.1 {
        Some(l) => {
            for (o, &v) in q.iter_mut().zip(w) {
                *o = level(v, d[l]);
            }
            dh[l]
        }
        None => {
            q[..w.len()].fill(0);
            0
        }
    }
}

/// [`search_lanes`] compiled for AVX2's 8-lane vectors.
///
/// # Safety
/// The CPU supports AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn search_lanes_avx2(w: &[f32], q: &mut [u8]) -> u16 {
    search_lanes(w, q)
}

/// A group quantizer: weights in, levels out, the scale's f16 bits returned.
type GroupFn = fn(&[f32], &mut [u8]) -> u16;

/// The fastest [`search_lanes`] this CPU runs (same results on every CPU).
fn quantize_group_fast() -> GroupFn {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was just detected.
        return |w, q| unsafe { search_lanes_avx2(w, q) };
    }
    |w, q| search_lanes(w, q)
}

/// The level `q` in [0, 3] nearest to `v` for scale `d` (`d (2q - 3)`; ties to even `q`).
#[inline]
fn level(v: f32, d: f32) -> u8 {
    level_f32(v, d) as u8
}

/// [`level`] as an f32 (an integer in [0, 3] for finite `v / d`), rounded by
/// [`super::round_ties_even`] (the std one is a libm call per weight here).
#[inline(always)]
fn level_f32(v: f32, d: f32) -> f32 {
    let y = ((v / d + 3.0) / 2.0).clamp(-1.0, 4.0);
    super::round_ties_even(y).clamp(0.0, 3.0)
}

impl Int2Matrix {
    /// Quantizes a dense `[rows][cols]` matrix (module docs) and packs it for `level`.
    pub fn from_dense(w: DenseRef<'_>, rows: usize, cols: usize, level: KernelLevel) -> Int2Matrix {
        let (q, d) = quantize_groups(w, rows, cols, 0, quantize_group_fast());
        Int2Matrix::from_q2(&q, &d, rows, cols, level)
    }

    /// Packs quantized weights: `q` `[rows][kcols]` in [0, 3] (`kcols` = `cols` padded to
    /// [`K_ALIGN`]) and f16 scales `d` `[rows][kcols / 32]`.
    pub fn from_q2(q: &[u8], d: &[u16], rows: usize, cols: usize, level: KernelLevel) -> Int2Matrix {
        let kcols = cols.div_ceil(K_ALIGN) * K_ALIGN;
        let ng = kcols / GROUP;
        assert_eq!(q.len(), rows * kcols, "weights length");
        assert_eq!(d.len(), rows * ng, "one scale per row and group");
        assert!(q.iter().all(|&v| v < 4), "2-bit weights must lie in [0, 3]");
        assert!(cols <= 65536, "int2 matmul: i32 accumulators need cols <= 65536");
        assert!(level.is_available(), "kernel level {} is not supported by this CPU", level.name());
        let level = grouped_layout_level(level);
        let (data, scales) = match level {
            KernelLevel::Generic => {
                let mut b = AlignedBytes::filled(rows * kcols / 4, 0);
                let s = b.as_mut_slice();
                for r in 0..rows {
                    for g in 0..ng {
                        for i in 0..8 {
                            let c = r * kcols + g * GROUP + i;
                            s[(r * kcols + g * GROUP) / 4 + i] =
                                q[c] | (q[c + 8] << 2) | (q[c + 16] << 4) | (q[c + 24] << 6);
                        }
                    }
                }
                (b, d.to_vec())
            }
            _ => {
                let blocks = rows.div_ceil(16);
                let mut b = AlignedBytes::filled(blocks * 16 * kcols / 4, 0);
                let mut sc = vec![0u16; blocks * ng * 16];
                let s = b.as_mut_slice();
                for r in 0..rows {
                    let (blk, i) = (r / 16, r % 16);
                    for g in 0..ng {
                        sc[(blk * ng + g) * 16 + i] = d[r * ng + g];
                        for m in 0..2 {
                            let at = (blk * ng + g) * 128 + 64 * m + 4 * i;
                            for j in 0..4 {
                                let c = r * kcols + g * GROUP + 16 * m + j;
                                s[at + j] = q[c] | (q[c + 4] << 2) | (q[c + 8] << 4) | (q[c + 12] << 6);
                            }
                        }
                    }
                }
                (b, sc)
            }
        };
        Int2Matrix { rows, cols, kcols, level, data, scales }
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
    /// What [`Int2Matrix::nbytes`] will be for a `[rows][cols]` matrix packed for `level`.
    pub fn packed_bytes(rows: usize, cols: usize, level: KernelLevel) -> usize {
        grouped_packed_bytes(rows, cols, level, 2)
    }
    /// Row ranges handed to threads start at multiples of this.
    pub fn row_align(&self) -> usize {
        grouped_row_align(self.level)
    }

    /// The quantized weights `[rows][kcols]` (0..=3) and scales `[rows][kcols / 32]` (f16
    /// bits), read back from the packed layout (tests).
    pub fn to_q2(&self) -> (Vec<u8>, Vec<u16>) {
        let (kc, ng) = (self.kcols, self.kcols / GROUP);
        let s = self.data.as_slice();
        let mut q = vec![0u8; self.rows * kc];
        let mut d = vec![0u16; self.rows * ng];
        for r in 0..self.rows {
            for c in 0..kc {
                let (g, cg) = (c / GROUP, c % GROUP);
                q[r * kc + c] = match self.level {
                    KernelLevel::Generic => (s[(r * kc + g * GROUP) / 4 + cg % 8] >> (2 * (cg / 8))) & 3,
                    _ => {
                        let (blk, i) = (r / 16, r % 16);
                        let (m, sh, j) = (cg / 16, (cg % 16) / 4, cg % 4);
                        (s[(blk * ng + g) * 128 + 64 * m + 4 * i + j] >> (2 * sh)) & 3
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

    /// The contract in plain scalar code, from unpacked weights (`to_q2`): the test oracle.
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
                        isum += (2 * q[r * kcols + c] as i32 - 3) * xq[c] as i32;
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
        assert!(x.group_sums_ready(), "QuantActs::fill_group_sums must run before the int2 matmul");
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
            let w = &d[r * kc / 4..(r + 1) * kc / 4];
            let sc = &self.scales[r * ng..(r + 1) * ng];
            for t in 0..x.n_tok {
                let mut acc = 0f32;
                for g in 0..ng {
                    let wb = &w[g * GROUP / 4..(g + 1) * GROUP / 4];
                    let xg = &x.row(t)[g * GROUP..(g + 1) * GROUP];
                    // sum q * x over the group: 8 bytes, each against 4 activations 8 apart, a
                    // plain widening loop that LLVM vectorizes 8 wide; then 2 sum - 3 sum x
                    let mut qx = 0i32;
                    let mut xs = 0i32;
                    for i in 0..8 {
                        let b = wb[i] as i32;
                        let (x0, x1, x2, x3) = (xg[i] as i32, xg[8 + i] as i32, xg[16 + i] as i32, xg[24 + i] as i32);
                        qx += (b & 3) * x0 + ((b >> 2) & 3) * x1 + ((b >> 4) & 3) * x2 + ((b >> 6) & 3) * x3;
                        xs += x0 + x1 + x2 + x3;
                    }
                    acc += (2 * qx - 3 * xs) as f32 * f16_to_f32(sc[g]);
                }
                *out.at(t, r) = acc / x.scale[t];
            }
        }
    }
}

row_kernel!(head Int2Matrix);

#[cfg(test)]
mod tests {
    /// The magic-number rounding equals `round_ties_even` then the clamp, ties and NaN included.
    #[test]
    fn level_rounds_half_to_even() {
        let want = |v: f32, d: f32| ((v / d + 3.0) / 2.0).round_ties_even().clamp(0.0, 3.0) as u8;
        let d = 0.25;
        for i in -4000..4000 {
            let v = i as f32 * 0.000_37 - 0.03;
            assert_eq!(super::level(v, d), want(v, d), "v {v}");
        }
        // exact ties: (v / d + 3) / 2 = 0.5, 1.5, 2.5 round to 0, 2, 2
        for (v, q) in [(-0.5, 0), (0.0, 2), (0.5, 2), (1e30, 3), (-1e30, 0)] {
            assert_eq!(super::level(v, d), q, "v {v}");
        }
        assert_eq!(super::level(f32::NAN, d), 0);
    }

    /// The lane-parallel scale search (plain and AVX2 builds) gives the scalar's scale and levels
    /// on groups built to hit its edges: levels on exact rounding ties, near-equal errors, scales
    /// that underflow or overflow f16 for some fractions, zeros, short groups, NaN and infinity.
    #[test]
    fn search_lanes_matches_scalar() {
        let mut seed = 0x2545_f491_u32;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        let mut searches: Vec<(&str, super::GroupFn)> = vec![("plain", |w, q| super::search_lanes(w, q))];
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 was just detected.
            searches.push(("avx2", |w, q| unsafe { super::search_lanes_avx2(w, q) }));
        }
        searches.push(("dispatched", super::quantize_group_fast()));
        for case in 0..20_000 {
            let len = if case % 7 == 0 { 1 + (next() % 32) as usize } else { 32 };
            let mag = [1e-9f32, 1e-6, 0.01, 1.0, 300.0, 1e5, 3e5][(next() % 7) as usize];
            let mut w: Vec<f32> = (0..len).map(|_| ((next() >> 8) as f32 / (1 << 24) as f32 - 0.5) * mag).collect();
            match case % 11 {
                // values on the level grid of one candidate scale and halfway between (ties)
                0 | 1 => {
                    let amax = w.iter().fold(0f32, |m, &v| m.max(v.abs())).max(1e-3);
                    let f = super::super::int2::SCALE_FRACTIONS[(next() % 6) as usize];
                    let d = half::f16::from_f32(amax * f / 3.0).to_f32();
                    for v in w.iter_mut() {
                        *v = d * ((next() % 9) as f32 - 4.0) / 2.0 * if case % 2 == 0 { 1.0 } else { 1.5 };
                    }
                }
                2 => w.fill(0.0),
                3 => w[(next() as usize) % len] = 0.0,
                4 => w[(next() as usize) % len] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][(next() % 3) as usize],
                5 => {
                    // a few levels only: errors of several scales close
                    for v in w.iter_mut() {
                        *v = [-1.0f32, 1.0, 0.5][(next() % 3) as usize] * mag;
                    }
                }
                _ => {}
            }
            let mut want = vec![0u8; len];
            let dw = super::quantize_group(&w, &mut want);
            for (name, f) in &searches {
                let mut got = vec![7u8; len];
                assert_eq!((f(&w, &mut got), &got), (dw, &want), "{name}: case {case}, group {w:?}");
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
// the tile loops index several register arrays by the same token or half index
#[allow(clippy::needless_range_loop)]
mod x86 {
    use core::arch::x86_64::*;
    use std::ops::Range;

    use super::super::grouped::{bcast4, each_tile, store_avx2, store_avx512, PF_BYTES};
    use super::super::{OutPtr, QuantActs};
    use super::{Int2Matrix, GROUP};

    /// # Safety
    /// AVX-512 F/BW/VL/VNNI; as for `matmul_rows_raw`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn avx512(m: &Int2Matrix, x: &QuantActs, out: OutPtr, rows: Range<usize>) {
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
        unsafe fn tile<const T: usize, const B: usize>(
            m: &Int2Matrix,
            x: &QuantActs,
            out: OutPtr,
            rows: &Range<usize>,
            blks: [usize; B],
            t0: usize,
        ) {
            let ng = m.kcols / GROUP;
            let w = blks.map(|blk| m.data.as_slice().as_ptr().add(blk * ng * 128));
            let sc = blks.map(|blk| m.scales.as_ptr().add(blk * ng * 16));
            let three = _mm512_set1_epi8(3);
            let mut acc = [[_mm512_setzero_ps(); T]; B];
            for g in 0..ng {
                for b in 0..B {
                    _mm_prefetch::<_MM_HINT_T0>(w[b].wrapping_add(g * 128 + PF_BYTES) as *const i8);
                    _mm_prefetch::<_MM_HINT_T0>(w[b].wrapping_add(g * 128 + 64 + PF_BYTES) as *const i8);
                    // the group's scales (32 bytes), as far ahead in groups
                    _mm_prefetch::<_MM_HINT_T0>(sc[b].wrapping_add(g * 16 + PF_BYTES / 8) as *const i8);
                    // two chains per token (one per chunk) to hide the vpdpbusd latency
                    let mut s = [[_mm512_setzero_si512(); T]; 2];
                    for k in 0..2 {
                        let v = _mm512_load_si512(w[b].add(g * 128 + 64 * k) as *const _);
                        let q = [
                            _mm512_and_si512(v, three),
                            _mm512_and_si512(_mm512_srli_epi16::<2>(v), three),
                            _mm512_and_si512(_mm512_srli_epi16::<4>(v), three),
                            _mm512_and_si512(_mm512_srli_epi16::<6>(v), three),
                        ];
                        for (sh, qs) in q.iter().enumerate() {
                            let c = g * GROUP + 16 * k + 4 * sh;
                            for t in 0..T {
                                s[k][t] = _mm512_dpbusd_epi32(s[k][t], *qs, _mm512_set1_epi32(bcast4(x, t0 + t, c)));
                            }
                        }
                    }
                    let d = _mm512_cvtph_ps(_mm256_loadu_si256(sc[b].add(g * 16) as *const _));
                    for t in 0..T {
                        let corr = _mm512_set1_epi32(3 * x.group_sums(t0 + t)[g]);
                        let qx = _mm512_add_epi32(s[0][t], s[1][t]);
                        let isum = _mm512_sub_epi32(_mm512_add_epi32(qx, qx), corr);
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
    pub(super) unsafe fn avx2(m: &Int2Matrix, x: &QuantActs, out: OutPtr, rows: Range<usize>) {
        #[inline]
        #[target_feature(enable = "avx2,f16c")]
        unsafe fn tile<const T: usize, const B: usize>(
            m: &Int2Matrix,
            x: &QuantActs,
            out: OutPtr,
            rows: &Range<usize>,
            blks: [usize; B],
            t0: usize,
        ) {
            let ng = m.kcols / GROUP;
            let w = blks.map(|blk| m.data.as_slice().as_ptr().add(blk * ng * 128));
            let sc = blks.map(|blk| m.scales.as_ptr().add(blk * ng * 16));
            let three = _mm256_set1_epi8(3);
            let ones = _mm256_set1_epi16(1);
            // [rows 0-7, rows 8-15][token]
            let mut acc = [[[_mm256_setzero_ps(); T]; 2]; B];
            for g in 0..ng {
                for b in 0..B {
                    if T > 1 {
                        _mm_prefetch::<_MM_HINT_T0>(w[b].wrapping_add(g * 128 + PF_BYTES) as *const i8);
                    }
                    for h in 0..2 {
                        // i16 sums of q * x over the group: each vpmaddubsw pair is at most
                        // 2 * 3 * 128 = 768 in magnitude, 8 of them at most 6144: no overflow
                        let mut s = [_mm256_setzero_si256(); T];
                        for k in 0..2 {
                            let v = _mm256_load_si256(w[b].add(g * 128 + 64 * k + 32 * h) as *const _);
                            let q = [
                                _mm256_and_si256(v, three),
                                _mm256_and_si256(_mm256_srli_epi16::<2>(v), three),
                                _mm256_and_si256(_mm256_srli_epi16::<4>(v), three),
                                _mm256_and_si256(_mm256_srli_epi16::<6>(v), three),
                            ];
                            for (sh, qs) in q.iter().enumerate() {
                                let c = g * GROUP + 16 * k + 4 * sh;
                                for t in 0..T {
                                    let p = _mm256_maddubs_epi16(*qs, _mm256_set1_epi32(bcast4(x, t0 + t, c)));
                                    s[t] = _mm256_add_epi16(s[t], p);
                                }
                            }
                        }
                        let d = _mm256_cvtph_ps(_mm_loadu_si128(sc[b].add(g * 16 + 8 * h) as *const _));
                        for t in 0..T {
                            let corr = _mm256_set1_epi32(3 * x.group_sums(t0 + t)[g]);
                            let qx = _mm256_madd_epi16(s[t], ones);
                            let isum = _mm256_sub_epi32(_mm256_add_epi32(qx, qx), corr);
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
