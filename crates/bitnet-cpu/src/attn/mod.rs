//! Attention primitives over f32 rows: scores (`q . k * scale`), softmax, and the
//! probability-weighted sum of V rows, each for up to [`MAX_ROWS`] query rows at once so that
//! every K or V element loaded serves all of them. `bitnet-core`'s attention walks the paged KV
//! cache and calls these on chunks of up to [`KEY_CHUNK`] keys.
//!
//! Layouts: K comes in tiles of [`KEY_TILE`] keys, transposed (`kt[d * 16 + c]` is element `d`
//! of key `c`), so a score is one lane of a vector and needs no horizontal sum; V comes as rows
//! (one slice per key), so an output row is a vector sum of V rows.
//!
//! Contract: every level computes exactly the IEEE operations of [`generic`] in the same order
//! (fused multiply-adds for the dot and V-sum accumulations, a rounded multiply then a rounded
//! add everywhere else), so all levels give bit-identical results (tested below on random inputs
//! and odd sizes). The orders, which make a query's result independent of the batch, of the rows
//! and keys it is grouped with, and of the thread it runs on:
//! - `dot(q, k)`: one running sum over `d = 0, 1, ...` in order (`s = fma(q[d], k[d], s)`),
//!   then `* scale`;
//! - softmax sum: 16 lane sums (lane `i` takes elements `i, i + 16, ...`, plain adds), the lane
//!   tree (`l[i] += l[i + w]`, w = 8, 4, 2, 1), then any elements past the last multiple of 16
//!   in order;
//! - `pv`: each output element is a running sum over the keys in order (`o = fma(p, v, o)`);
//! - `exp`: [`generic::exp`] (Cephes' expf), the same polynomial in every level.

// `a = a + b * c` is written out: it reads as the exact operation order the contract states.
#![allow(clippy::assign_op_pattern)]

pub mod generic;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::ops::Deref;

use crate::dense::DenseLevel;
#[cfg(not(target_arch = "x86_64"))]
use no_simd::Load;
#[cfg(target_arch = "x86_64")]
use x86::Load;

/// Without x86 there are no vector loads to provide.
#[cfg(not(target_arch = "x86_64"))]
mod no_simd {
    pub trait Load {}
    impl Load for f32 {}
    impl Load for u16 {}
    impl Load for i8 {}
}
use crate::KernelLevel;

/// Constants of [`generic::exp`] (Cephes expf).
pub(crate) mod exp_consts {
    pub const EXP_HI: f32 = 88.0;
    pub const EXP_LO: f32 = -88.0;
    pub const LOG2E: f32 = std::f32::consts::LOG2_E;
    /// ln 2 in two parts: `LN2_HI` has 9 significant bits, so `n * LN2_HI` is exact for |n| <= 2^15.
    pub const LN2_HI: f32 = 0.693_359_4;
    pub const LN2_LO: f32 = -2.121_944_4e-4;
    pub const P: [f32; 6] = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5];
}

/// Element type of K/V rows: f32, f16 bits (`u16`) widened exactly in registers, or int8 codes
/// with scales (`i8`, [`KV_QBLOCK`]).
///
/// A row of `hd` values takes [`KvElem::row_len`] elements of the store; a K tile takes 16 rows'
/// worth. For the float types that is `hd` and `hd * 16`; an int8 row carries its scales after
/// its codes (below), so every primitive still gets one slice per tile or row.
pub trait KvElem: Copy + Default + sealed::Sealed + Load {
    /// Whether values are codes times a per-block scale (int8) rather than numbers (f32, f16).
    const SCALED: bool = false;
    /// The stored number widened exactly (for int8: the code, unscaled).
    fn to_f32(self) -> f32;
    /// Store elements of one row of `hd` values.
    #[inline(always)]
    fn row_len(hd: usize) -> usize {
        hd
    }
    /// Element `d` of key `c` of a K tile as attention uses it: `kt[d * 16 + c]` widened, times
    /// its scale for int8 (one rounded multiply).
    #[inline(always)]
    fn k_at(kt: &[Self], _hd: usize, d: usize, c: usize) -> f32 {
        kt[d * KEY_TILE + c].to_f32()
    }
    /// Element `d` of a V row as attention uses it (times its scale for int8).
    #[inline(always)]
    fn v_at(v: &[Self], _hd: usize, d: usize) -> f32 {
        v[d].to_f32()
    }
}

impl KvElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl KvElem for u16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        crate::dense::f16_to_f32(self)
    }
}

/// Values per int8 K/V scale: each row's `hd` values in blocks of 32 (the last may be shorter),
/// one f32 scale per block, as llama.cpp's `q8_0` cache (which keeps f16 scales; f32 costs 1/32
/// byte a value more and no conversion in the loops). Blocks rather than one scale per row: a
/// key's few large channels then cost precision in their own block only.
///
/// Layouts (bytes): a V row is `hd` codes then `ceil(hd / 32)` scales (little-endian f32); a K
/// tile is `[hd][16]` codes (as the float tiles) then `[ceil(hd / 32)][16]` scales, the 16 keys'
/// scales of a block side by side (one vector). A value is `code as f32 * scale`.
pub const KV_QBLOCK: usize = 32;

/// Bytes of scales after an int8 row's `hd` codes.
#[inline(always)]
fn q8_scale_bytes(hd: usize) -> usize {
    4 * hd.div_ceil(KV_QBLOCK)
}

/// The f32 at byte `at` of an int8 row or tile (its scales are stored unaligned).
#[inline(always)]
fn q8_scale(s: &[i8], at: usize) -> f32 {
    f32::from_le_bytes([s[at] as u8, s[at + 1] as u8, s[at + 2] as u8, s[at + 3] as u8])
}

impl KvElem for i8 {
    const SCALED: bool = true;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }
    #[inline(always)]
    fn row_len(hd: usize) -> usize {
        hd + q8_scale_bytes(hd)
    }
    #[inline(always)]
    fn k_at(kt: &[i8], hd: usize, d: usize, c: usize) -> f32 {
        kt[d * KEY_TILE + c] as f32 * q8_scale(kt, hd * KEY_TILE + 4 * (d / KV_QBLOCK * KEY_TILE + c))
    }
    #[inline(always)]
    fn v_at(v: &[i8], hd: usize, d: usize) -> f32 {
        v[d] as f32 * q8_scale(v, hd + 4 * (d / KV_QBLOCK))
    }
}

/// Quantizes `x` (one block, at most [`KV_QBLOCK`] values) to int8 codes in `out` and returns the
/// scale: `scale = max |x| / 127`, `code = x * (127 / max |x|)` rounded to nearest (ties to
/// even), so the largest value is exactly +-127 codes. An all-zero block has scale 0.
pub fn quantize_kv_block(x: &[f32], out: &mut [i8]) -> f32 {
    debug_assert!(x.len() <= KV_QBLOCK && out.len() >= x.len());
    let amax = x.iter().fold(0f32, |m, &v| m.max(v.abs()));
    if amax == 0.0 || !amax.is_finite() {
        // NaN / inf activations are already lost; zeros keep the cache's other rows finite
        out[..x.len()].fill(0);
        return if amax == 0.0 { 0.0 } else { f32::NAN };
    }
    let inv = 127.0 / amax;
    for (o, &v) in out.iter_mut().zip(x) {
        // round to nearest even without a libm call: exact for |y| < 2^22 (here |y| <= 127)
        const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
        let y = v * inv;
        *o = ((y + MAGIC) - MAGIC).clamp(-127.0, 127.0) as i8;
    }
    amax / 127.0
}

/// Writes `x` (`hd` values) as int8 row `out` (`KvElem::row_len(hd)` bytes: codes, then the
/// blocks' scales): a V row.
pub fn quantize_kv_row(x: &[f32], out: &mut [i8]) {
    let hd = x.len();
    assert!(out.len() >= <i8 as KvElem>::row_len(hd), "int8 K/V row: short output");
    for (b, blk) in x.chunks(KV_QBLOCK).enumerate() {
        let s = quantize_kv_block(blk, &mut out[b * KV_QBLOCK..]);
        for (o, byte) in out[hd + 4 * b..][..4].iter_mut().zip(s.to_le_bytes()) {
            *o = byte as i8;
        }
    }
}

/// Writes `x` (`hd` values) as key `lane` of int8 K tile `tile` (`16 * KvElem::row_len(hd)`
/// bytes; see [`KV_QBLOCK`]); the other lanes are left as they are.
pub fn quantize_kv_tile_lane(x: &[f32], tile: &mut [i8], lane: usize) {
    let hd = x.len();
    assert!(
        lane < KEY_TILE && tile.len() >= KEY_TILE * <i8 as KvElem>::row_len(hd),
        "int8 K tile: short tile or lane out of range"
    );
    let mut codes = [0i8; KV_QBLOCK];
    for (b, blk) in x.chunks(KV_QBLOCK).enumerate() {
        let s = quantize_kv_block(blk, &mut codes);
        for (i, &c) in codes[..blk.len()].iter().enumerate() {
            tile[(b * KV_QBLOCK + i) * KEY_TILE + lane] = c;
        }
        let at = hd * KEY_TILE + 4 * (b * KEY_TILE + lane);
        for (o, byte) in tile[at..at + 4].iter_mut().zip(s.to_le_bytes()) {
            *o = byte as i8;
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for u16 {}
    impl Sealed for i8 {}
}

/// Keys per K tile: the lanes of one score vector.
pub const KEY_TILE: usize = 16;
/// Most keys per primitive call (four K tiles; the V rows of a [`KeyRows`]).
pub const KEY_CHUNK: usize = 4 * KEY_TILE;
/// Most query rows per primitive call (each SIMD pass keeps this many rows' sums in registers).
pub const MAX_ROWS: usize = 4;

/// Up to [`KEY_CHUNK`] row slices on the stack (no allocation per chunk).
pub struct KeyRows<'a, T> {
    rows: [&'a [T]; KEY_CHUNK],
    n: usize,
}

impl<T> Default for KeyRows<'_, T> {
    fn default() -> Self {
        KeyRows { rows: [&[]; KEY_CHUNK], n: 0 }
    }
}

impl<'a, T> KeyRows<'a, T> {
    /// Appends a row; panics past [`KEY_CHUNK`] rows (a caller bug, not an input error).
    #[inline]
    pub fn push(&mut self, row: &'a [T]) {
        self.rows[self.n] = row;
        self.n += 1;
    }
}

impl<'a, T> Deref for KeyRows<'a, T> {
    type Target = [&'a [T]];
    fn deref(&self) -> &[&'a [T]] {
        &self.rows[..self.n]
    }
}

/// The attention primitives of one instruction-set level (chosen once, like the kernels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnOps(DenseLevel);

impl AttnOps {
    /// `level` if this CPU runs it, else the portable version.
    pub fn new(level: DenseLevel) -> AttnOps {
        AttnOps(if level.is_available() { level } else { DenseLevel::Generic })
    }
    /// The float level that goes with a kernel level (`--kernel generic` gives generic attention).
    pub fn for_kernel(level: KernelLevel) -> AttnOps {
        AttnOps::new(match level.simd() {
            KernelLevel::Generic => DenseLevel::Generic,
            KernelLevel::Avx2 | KernelLevel::AvxVnni => DenseLevel::Avx2,
            _ => DenseLevel::Avx512,
        })
    }
    pub fn level(self) -> DenseLevel {
        self.0
    }

    /// `out[r * stride + 16 t + c] = dot(qs[r], key c of kts[t]) * scale` for up to
    /// [`MAX_ROWS`] query rows (all `head_dim` long) and up to four K tiles (each at least
    /// `16 * T::row_len(head_dim)` long, transposed: see the module doc; `k` is
    /// [`KvElem::k_at`]). All 16 lanes of every tile are
    /// written; lanes past the keys a row may see are the caller's to ignore.
    ///
    /// `ahead`: up to one tile per tile of `kts` (as long), the tiles the caller reads next (the
    /// next chunk's), prefetched a cache line at a time while `kts[t]` is read. Results do not
    /// depend on it. Why: a 4 KB tile is one page-sized run, and the hardware prefetchers start
    /// over on every 4 KB page, so from DRAM each tile began with a full miss; these loops do
    /// too much work per line for out-of-order execution to reach the next page early.
    #[inline]
    pub fn dots<T: KvElem>(
        self,
        qs: &[&[f32]],
        kts: &[&[T]],
        ahead: &[&[T]],
        scale: f32,
        out: &mut [f32],
        stride: usize,
    ) {
        let hd = qs.first().map_or(0, |q| q.len());
        assert!(qs.len() <= MAX_ROWS && kts.len() * KEY_TILE <= KEY_CHUNK, "attention dots: too many rows or tiles");
        let tile = T::row_len(hd) * KEY_TILE;
        assert!(qs.iter().all(|q| q.len() == hd) && kts.iter().all(|k| k.len() >= tile), "attention dots: short rows");
        assert!(
            ahead.len() <= kts.len() && ahead.iter().all(|k| k.len() >= tile),
            "attention dots: too many or short tiles ahead"
        );
        if let Some(last) = qs.len().checked_sub(1) {
            assert!(
                stride >= kts.len() * KEY_TILE && out.len() >= last * stride + kts.len() * KEY_TILE,
                "attention dots: short output"
            );
        }
        match self.0 {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the level is available (checked in `new`); lengths checked above.
            DenseLevel::Avx512 => unsafe { x86::avx512::dots(qs, kts, ahead, scale, out, stride) },
            #[cfg(target_arch = "x86_64")]
            DenseLevel::Avx2 => unsafe { x86::avx2::dots(qs, kts, ahead, scale, out, stride) },
            // the portable level leaves prefetching to the hardware
            _ => generic::dots(qs, kts, scale, out, stride),
        }
    }

    /// In place: `s = exp(s - max s) / sum exp(s - max s)`.
    #[inline]
    pub fn softmax(self, s: &mut [f32]) {
        match self.0 {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the level is available (checked in `new`).
            DenseLevel::Avx512 => unsafe { x86::avx512::softmax(s) },
            #[cfg(target_arch = "x86_64")]
            DenseLevel::Avx2 => unsafe { x86::avx2::softmax(s) },
            _ => generic::softmax(s),
        }
    }

    /// `sum exp(s - max)` (the exponentials of [`AttnOps::softmax`], not kept): a log-softmax
    /// normalizer over a row of logits.
    #[inline]
    pub fn sum_exp(self, s: &[f32], max: f32) -> f32 {
        match self.0 {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the level is available (checked in `new`).
            DenseLevel::Avx512 => unsafe { x86::avx512::sum_exp(s, max) },
            #[cfg(target_arch = "x86_64")]
            DenseLevel::Avx2 => unsafe { x86::avx2::sum_exp(s, max) },
            _ => generic::sum_exp(s, max),
        }
    }

    /// `outs[r][d] += p[r * stride + c] * vs[c][d]`, keys in order, for up to [`MAX_ROWS`]
    /// output rows (all the same length `hd`, every V row at least `T::row_len(hd)` long; `vs[c][d]`
    /// is [`KvElem::v_at`]).
    ///
    /// `ahead`: up to one V row per key of `vs` (as long as those), the rows the
    /// caller reads next (a few keys on), prefetched as `vs[c]` is read; results do not depend
    /// on it. From DRAM a run of V rows otherwise stalls at every 4 KB page (see
    /// [`AttnOps::dots`]).
    #[inline]
    pub fn pv<T: KvElem>(self, outs: &mut [&mut [f32]], vs: &[&[T]], ahead: &[&[T]], p: &[f32], stride: usize) {
        let hd = outs.first().map_or(0, |o| o.len());
        assert!(outs.len() <= MAX_ROWS && vs.len() <= KEY_CHUNK, "attention pv: too many rows or keys");
        let row = T::row_len(hd);
        assert!(outs.iter().all(|o| o.len() == hd) && vs.iter().all(|v| v.len() >= row), "attention pv: short rows");
        assert!(
            ahead.len() <= vs.len() && ahead.iter().all(|v| v.len() >= row),
            "attention pv: too many or short rows ahead"
        );
        if let Some(last) = outs.len().checked_sub(1) {
            assert!(stride >= vs.len() && p.len() >= last * stride + vs.len(), "attention pv: short probabilities");
        }
        match self.0 {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the level is available (checked in `new`); lengths checked above.
            DenseLevel::Avx512 => unsafe { x86::avx512::pv(outs, vs, ahead, p, stride) },
            #[cfg(target_arch = "x86_64")]
            DenseLevel::Avx2 => unsafe { x86::avx2::pv(outs, vs, ahead, p, stride) },
            _ => generic::pv(outs, vs, p, stride),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rng(u64);
    impl Rng {
        fn f(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        }
        fn vec(&mut self, n: usize, mag: f32) -> Vec<f32> {
            (0..n).map(|_| self.f() * mag).collect()
        }
    }

    fn levels() -> Vec<AttnOps> {
        DenseLevel::available().into_iter().map(AttnOps::new).collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// `keys` K rows (each `hd` long) as transposed tiles of 16 keys, padded with `pad`.
    fn tiles<T: Copy>(k: &[Vec<T>], hd: usize, pad: T) -> Vec<Vec<T>> {
        k.chunks(KEY_TILE)
            .map(|ch| {
                let mut t = vec![pad; hd * KEY_TILE + 5];
                for (c, row) in ch.iter().enumerate() {
                    for d in 0..hd {
                        t[d * KEY_TILE + c] = row[d];
                    }
                }
                t
            })
            .collect()
    }

    #[test]
    fn dots_and_pv_match_generic_bit_for_bit() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for hd in [1usize, 7, 8, 16, 24, 33, 64, 128, 136, 200, 256] {
            for nk in [1usize, 3, 15, 16, 17, 33, 48, 64] {
                for rows in 1..=MAX_ROWS {
                    let qv: Vec<Vec<f32>> = (0..rows).map(|_| rng.vec(hd, 3.0)).collect();
                    let qs: Vec<&[f32]> = qv.iter().map(|q| &q[..]).collect();
                    let k: Vec<Vec<f32>> = (0..nk).map(|_| rng.vec(hd, 2.0)).collect();
                    // Padding lanes hold NaN: they must not leak into other lanes.
                    let kt = tiles(&k, hd, f32::NAN);
                    let kts: Vec<&[f32]> = kt.iter().map(|t| &t[..]).collect();
                    let v: Vec<Vec<f32>> = (0..nk).map(|_| rng.vec(hd + 3, 2.0)).collect();
                    let mut vs = KeyRows::default();
                    v.iter().for_each(|r| vs.push(r));
                    let stride = kts.len() * KEY_TILE + 3;
                    let p = rng.vec(rows * stride, 1.0);
                    let o0: Vec<Vec<f32>> = (0..rows).map(|_| rng.vec(hd, 0.5)).collect();
                    let mut want_s = vec![0f32; rows * stride];
                    generic::dots(&qs, &kts, 0.0884, &mut want_s, stride);
                    // The definition: one fma chain over d per (row, key).
                    for r in 0..rows {
                        for c in 0..nk {
                            let s = (0..hd).fold(0f32, |s, d| qv[r][d].mul_add(k[c][d], s));
                            assert_eq!((s * 0.0884).to_bits(), want_s[r * stride + c].to_bits());
                        }
                    }
                    let mut want_o = o0.clone();
                    generic::pv(&mut want_o.iter_mut().map(|o| &mut o[..]).collect::<Vec<_>>(), &vs, &p, stride);
                    // Memory to prefetch (it cannot change a result): some of the same tiles and
                    // rows, so the prefetching paths run.
                    let (kah, vah) = (&kts[kts.len() / 2..], &vs[nk / 3..]);
                    for ops in levels() {
                        let mut s = vec![0f32; rows * stride];
                        ops.dots(&qs, &kts, kah, 0.0884, &mut s, stride);
                        for r in 0..rows {
                            let (got, want) = (&s[r * stride..][..nk], &want_s[r * stride..][..nk]);
                            assert_eq!(bits(got), bits(want), "dots {:?} hd {hd} keys {nk} rows {rows}", ops.level());
                        }
                        let mut o = o0.clone();
                        ops.pv(&mut o.iter_mut().map(|o| &mut o[..]).collect::<Vec<_>>(), &vs, vah, &p, stride);
                        for r in 0..rows {
                            assert_eq!(
                                bits(&o[r]),
                                bits(&want_o[r]),
                                "pv {:?} hd {hd} keys {nk} rows {rows}",
                                ops.level()
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn softmax_matches_generic_bit_for_bit_and_sums_to_one() {
        let mut rng = Rng(12345);
        for n in [1usize, 2, 5, 15, 16, 17, 31, 100, 513, 4096] {
            // Wide scores too, so many exponentials underflow (as with random weights).
            for mag in [0.5f32, 8.0, 200.0] {
                let s0 = rng.vec(n, mag);
                let mut want = s0.clone();
                generic::softmax(&mut want);
                let total: f64 = want.iter().map(|&v| v as f64).sum();
                assert!((total - 1.0).abs() < 1e-5, "sum {total} n {n}");
                let mx = s0.iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
                let want_sum = generic::sum_exp(&s0, mx);
                for ops in levels() {
                    let mut s = s0.clone();
                    ops.softmax(&mut s);
                    assert_eq!(bits(&s), bits(&want), "softmax {:?} n {n} mag {mag}", ops.level());
                    assert_eq!(ops.sum_exp(&s0, mx).to_bits(), want_sum.to_bits(), "sum_exp {:?} n {n}", ops.level());
                }
            }
        }
    }

    #[test]
    fn exp_is_close_to_f64() {
        let mut x = -87.0f32;
        while x < 87.0 {
            let (got, want) = (generic::exp(x) as f64, (x as f64).exp());
            assert!(((got - want) / want).abs() < 3e-7, "exp({x}) = {got}, want {want}");
            x += 0.0137;
        }
        assert_eq!(generic::exp(-100.0), 0.0);
        assert_eq!(generic::exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(generic::exp(f32::NAN), 0.0);
        assert_eq!(generic::exp(0.0), 1.0);
    }

    #[test]
    fn f16_rows_match_generic_and_widened_rows() {
        let mut rng = Rng(77);
        // f16 bits of moderate values (|v| < 4, truncated to 10 mantissa bits).
        let to_h = |v: f32| -> u16 {
            let b = v.to_bits();
            let (sign, e, m) = ((b >> 16) & 0x8000, ((b >> 23) & 0xff) as i32 - 127, b & 0x7f_ffff);
            if e < -14 {
                return sign as u16;
            }
            (sign | (((e + 15) as u32) << 10) | (m >> 13)) as u16
        };
        for hd in [7usize, 16, 64, 128, 136] {
            for rows in 1..=MAX_ROWS {
                let qv: Vec<Vec<f32>> = (0..rows).map(|_| rng.vec(hd, 2.0)).collect();
                let qs: Vec<&[f32]> = qv.iter().map(|q| &q[..]).collect();
                let kh: Vec<Vec<u16>> = (0..48).map(|_| rng.vec(hd, 3.0).into_iter().map(to_h).collect()).collect();
                let kf: Vec<Vec<f32>> = kh.iter().map(|r| r.iter().map(|&h| h.to_f32()).collect()).collect();
                let (kth, ktf) = (tiles(&kh, hd, 0), tiles(&kf, hd, 0.0));
                let ktsh: Vec<&[u16]> = kth.iter().map(|t| &t[..]).collect();
                let ktsf: Vec<&[f32]> = ktf.iter().map(|t| &t[..]).collect();
                let (mut vsh, mut vsf) = (KeyRows::default(), KeyRows::default());
                kh.iter().for_each(|r| vsh.push(r));
                kf.iter().for_each(|r| vsf.push(r));
                let stride = 48;
                let p = rng.vec(rows * stride, 1.0);
                let mut want_s = vec![0f32; rows * stride];
                generic::dots(&qs, &ktsf, 0.125, &mut want_s, stride);
                let mut want_o = vec![vec![0f32; hd]; rows];
                generic::pv(&mut want_o.iter_mut().map(|o| &mut o[..]).collect::<Vec<_>>(), &vsf, &p, stride);
                for ops in levels() {
                    let mut s = vec![0f32; rows * stride];
                    ops.dots(&qs, &ktsh, &ktsh[1..], 0.125, &mut s, stride);
                    assert_eq!(bits(&s), bits(&want_s), "f16 dots {:?} hd {hd}", ops.level());
                    let mut o = vec![vec![0f32; hd]; rows];
                    ops.pv(&mut o.iter_mut().map(|o| &mut o[..]).collect::<Vec<_>>(), &vsh, &vsh[5..], &p, stride);
                    assert_eq!(o, want_o, "f16 pv {:?} hd {hd}", ops.level());
                }
            }
        }
    }

    /// int8 rows: every level equals `generic`, and both equal the float path on the dequantized
    /// values (`code * scale`, what `k_at` / `v_at` give) bit for bit; head sizes off the 32-value
    /// blocks and the 16-lane units included, tiles padded past the keys with other rows' bytes.
    #[test]
    fn int8_rows_match_generic_and_dequantized_rows() {
        let mut rng = Rng(0x5eed);
        for hd in [7usize, 16, 33, 48, 64, 128, 136, 200] {
            let row = <i8 as KvElem>::row_len(hd);
            for nk in [1usize, 17, 48, 64] {
                let kf: Vec<Vec<f32>> = (0..nk).map(|c| rng.vec(hd, 1.0 + c as f32)).collect();
                let mut kt = vec![vec![0x55i8; KEY_TILE * row + 3]; nk.div_ceil(KEY_TILE)];
                for (c, k) in kf.iter().enumerate() {
                    quantize_kv_tile_lane(k, &mut kt[c / KEY_TILE], c % KEY_TILE);
                }
                let vq: Vec<Vec<i8>> = kf
                    .iter()
                    .map(|v| {
                        let mut r = vec![0i8; row + 1];
                        quantize_kv_row(v, &mut r);
                        r
                    })
                    .collect();
                // the dequantized values as float tiles and rows
                let kd: Vec<Vec<f32>> = (0..nk)
                    .map(|c| (0..hd).map(|d| i8::k_at(&kt[c / KEY_TILE], hd, d, c % KEY_TILE)).collect())
                    .collect();
                let vd: Vec<Vec<f32>> = vq.iter().map(|v| (0..hd).map(|d| i8::v_at(v, hd, d)).collect()).collect();
                for (c, k) in kf.iter().enumerate() {
                    for d in 0..hd {
                        let blk = &k[d / KV_QBLOCK * KV_QBLOCK..((d / KV_QBLOCK + 1) * KV_QBLOCK).min(hd)];
                        let step = blk.iter().fold(0f32, |m, &x| m.max(x.abs())) / 127.0;
                        assert!((kd[c][d] - k[d]).abs() <= step * 0.5001, "K hd {hd} key {c} d {d}");
                        assert_eq!(kd[c][d].to_bits(), vd[c][d].to_bits(), "K and V quantize alike");
                    }
                }
                let ktf = tiles(&kd, hd, 0.0);
                let kts: Vec<&[i8]> = kt.iter().map(|t| &t[..]).collect();
                let ktsf: Vec<&[f32]> = ktf.iter().map(|t| &t[..]).collect();
                let (mut vs, mut vsf) = (KeyRows::default(), KeyRows::default());
                vq.iter().for_each(|r| vs.push(r));
                vd.iter().for_each(|r| vsf.push(r));
                for rows in 1..=MAX_ROWS {
                    let qv: Vec<Vec<f32>> = (0..rows).map(|_| rng.vec(hd, 2.0)).collect();
                    let qs: Vec<&[f32]> = qv.iter().map(|q| &q[..]).collect();
                    let stride = kts.len() * KEY_TILE;
                    let p = rng.vec(rows * stride, 1.0);
                    let (mut want_s, mut want_sf) = (vec![0f32; rows * stride], vec![0f32; rows * stride]);
                    generic::dots(&qs, &kts, 0.125, &mut want_s, stride);
                    generic::dots(&qs, &ktsf, 0.125, &mut want_sf, stride);
                    // the lanes of keys that exist (the padding holds other bytes)
                    let seen = |s: &[f32]| (0..rows).flat_map(|r| bits(&s[r * stride..][..nk])).collect::<Vec<_>>();
                    assert_eq!(seen(&want_s), seen(&want_sf), "int8 dots = float dots on dequantized keys");
                    let mut want_o = vec![vec![0.5f32; hd]; rows];
                    let mut want_of = want_o.clone();
                    generic::pv(&mut want_o.iter_mut().map(|o| &mut o[..]).collect::<Vec<_>>(), &vs, &p, stride);
                    generic::pv(&mut want_of.iter_mut().map(|o| &mut o[..]).collect::<Vec<_>>(), &vsf, &p, stride);
                    assert_eq!(want_o, want_of, "int8 pv = float pv on dequantized rows");
                    for ops in levels() {
                        let mut s = vec![0f32; rows * stride];
                        ops.dots(&qs, &kts, &kts[kts.len() / 2..], 0.125, &mut s, stride);
                        assert_eq!(seen(&s), seen(&want_s), "int8 dots {:?} hd {hd} keys {nk}", ops.level());
                        let mut o = vec![vec![0.5f32; hd]; rows];
                        ops.pv(
                            &mut o.iter_mut().map(|o| &mut o[..]).collect::<Vec<_>>(),
                            &vs,
                            &vs[nk / 2..],
                            &p,
                            stride,
                        );
                        for r in 0..rows {
                            assert_eq!(bits(&o[r]), bits(&want_o[r]), "int8 pv {:?} hd {hd} keys {nk}", ops.level());
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn int8_blocks_hit_127_and_zero_blocks_stay_zero() {
        let mut out = [9i8; KV_QBLOCK];
        let x: Vec<f32> = (0..KV_QBLOCK).map(|i| i as f32 - 10.0).collect();
        let s = quantize_kv_block(&x, &mut out);
        assert_eq!(s, 21.0 / 127.0);
        assert_eq!(out[KV_QBLOCK - 1], 127);
        assert_eq!(out[10], 0);
        assert_eq!(out[0], (-10.0f32 * 127.0 / 21.0).round() as i8);
        assert_eq!(quantize_kv_block(&[0.0; 5], &mut out), 0.0);
        assert_eq!(out[..5], [0; 5]);
    }
}
