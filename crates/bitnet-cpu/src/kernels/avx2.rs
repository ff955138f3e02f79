//! AVX2 kernels on the shared x86 layout (see `x86.rs`), for CPUs without VNNI.
//!
//! Each 64-byte block is read as two 32-byte halves (rows 0-7 and 8-15 of the group; a "half" is
//! 8 rows, one dword lane per row). Codes are unpacked with `(v >> 2p) & 3` and multiplied by a
//! broadcast of 4 activations with `vpmaddubsw` (u8 x i8 -> pairs summed in i16): with `u <= 2`
//! and `q` in [-128, 127] a pair lies in [-512, 508], so it never saturates and the four pairs of
//! a block (one per shift position) add to [-2048, 2032] per i16 lane; [`WINDOW`] = 16 blocks
//! then fit exactly in i16 ([-32768, 32512]) before `vpmaddwd` by ones widens them to i32.
//! (`vpsignb` tricks are avoided: they are wrong for q = -128.) Every tile prefetches its weights
//! [`PF_DIST`] blocks ahead.
//!
//! One to three tokens (decode) read two streams far apart, as the AVX-512 kernels do: group `i`
//! of the first half of a thread's rows beside group `i + half` of the second ([`stream_pairs`]).
//! With one stream a core read well below its share of the bandwidth: on the AMX Xeon (`--
//! ternary decode avx2 dram`, two builds alternated twice) 2 threads took 113 / 100 / 387-442 /
//! 180 us for qkv / o / gate_up / down with one stream, 85 / 66 / 315-321 / 146 with two (49-74%
//! -> 73-96% of the probe); one thread 10-26% less time. Cache-resident, two streams are ~5%
//! slower (more accumulators than registers); decode never is. Batched decode, `bitnet bench
//! --plan int8 --kernel avx2 --threads 2 --batch B` per sequence: 2 sequences 16.7-17.0 ->
//! 18.5 tok/s, 3 sequences 12.8-13.1 -> 15.5-15.8.

use core::arch::x86_64::*;
use std::ops::Range;

use super::x86::{group_offset, lane_mask, Span, BLOCK, GROUP};
use super::{OutPtr, QuantActs, TernaryMatrix};

/// Groups per layout tile (see `x86.rs`): one group, so that each group is a sequential stream of
/// its own (the decode kernels read two at a time, [`stream_pairs`]).
pub(super) const TILE: usize = 1;
const _: () = assert!(TILE == 1, "the kernels read groups as one-group tiles (one_group)");

/// Blocks accumulated in i16 before widening, several tokens (see the module docs for the bound).
const WINDOW: usize = 16;
/// Blocks accumulated in i16 before widening, one token (see [`tile1`]).
const WINDOW1: usize = 8;
/// Tokens per tile.
const TN: usize = 4;
/// Tokens per cache block.
const T_OUTER: usize = 64;

#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn bcast4(p: *const i8) -> __m256i {
    _mm256_set1_epi32((p as *const i32).read_unaligned())
}

/// Column blocks between a software prefetch and its use (2 KB ahead in a one-group tile). On the
/// AMX Xeon (`-- ternary decode avx2 dram`) the one-token kernel, then one stream, read 36-46% of
/// the probe's bandwidth without software prefetch (compute and memory did not overlap: its time
/// was about the sum of the cache-resident time and the memory time), 57-73% / 58-79% / 53-71%
/// with 16 / 32 / 64 blocks (medians over the four shapes on 1 and 2 threads; gate_up on one
/// thread 701-714 / 632-671 / 710-814 us); 12 tokens from DRAM took 20% less time. With two
/// streams, 16 blocks was 4-12% slower than 32, 48 the same.
const PF_DIST: usize = 32;

/// A half (8 rows of a group) read by the one-token kernels: column block `kb` is 32 bytes at
/// `base + kb * kbstride`.
#[derive(Clone, Copy)]
pub(super) struct Half {
    base: *const u8,
    kbstride: usize,
}

impl Half {
    /// Half `h` of group run `s` (rows `8h .. 8h + 8` of the run) of the packed weights at `d`.
    #[inline(always)]
    pub(super) fn of(d: *const u8, s: Span, h: usize) -> Half {
        Half { base: d.wrapping_add(s.off + (h / 2) * BLOCK + (h % 2) * 32), kbstride: s.kbstride }
    }
    #[inline(always)]
    pub(super) unsafe fn at(self, kb: usize) -> *const __m256i {
        self.base.add(kb * self.kbstride) as *const __m256i
    }
    /// Software prefetch of this half's line `DIST` column blocks after `kb` (one per group:
    /// call it for even halves only; past the matrix's end it is harmless, prefetches never
    /// fault).
    #[inline(always)]
    pub(super) unsafe fn prefetch<const DIST: usize>(self, kb: usize) {
        _mm_prefetch::<_MM_HINT_T0>(self.base.wrapping_add((kb + DIST) * self.kbstride) as *const i8);
    }
}

/// The halves the one-token kernels read together: one group (2 halves) from each of up to two
/// runs (`b` may have `n == 0`). Two streams far apart: one stream per core reads less than the
/// core's share of the memory bandwidth (the probe on the AMX Xeon: 6-10% more with two; on the
/// Zen 4 the AVX-512 kernels were tuned on, ~19 GB/s from one, ~31 from two).
#[inline(always)]
fn pair_halves<const H: usize>(d: *const u8, a: Span, b: Span) -> [Half; H] {
    std::array::from_fn(|h| if h < 2 { Half::of(d, a, h) } else { Half::of(d, b, h - 2) })
}

/// First row of half `h` of [`pair_halves`]`(_, a, b)`.
#[inline(always)]
pub(super) fn half_row(a: Span, b: Span, h: usize) -> usize {
    (if h < 2 { a } else { b }).g * GROUP + 8 * (h % 2)
}

/// The decode kernels' walk over groups `g0..g1` (one-group tiles): group `i` of the first
/// half of the range with group `i + half` of the second, each pair as `f(a, b)` (`b.n == 0`
/// for an odd range's last group).
#[inline(always)]
pub(super) fn stream_pairs(ngroups: usize, nkb: usize, g0: usize, g1: usize, mut f: impl FnMut(Span, Span)) {
    let one = |g| one_group(ngroups, nkb, g);
    let half = (g1 - g0).div_ceil(2);
    for i in 0..half {
        let a = one(g0 + i);
        f(a, if g0 + i + half < g1 { one(g0 + i + half) } else { Span { n: 0, ..a } });
    }
}

/// Group `g` alone, in a layout of one-group tiles (AVX2, AVX-VNNI).
#[inline(always)]
pub(super) fn one_group(ngroups: usize, nkb: usize, g: usize) -> Span {
    let (off, kbstride) = group_offset(1, ngroups, nkb, g);
    Span { off, kbstride, g, n: 1 }
}

/// One token, `H` halves (see [`Half`]). Per half and block: `v & 0x03`, `(v >> 4) & 0x03` are
/// `u` (shift positions 0 and 2), `v & 0x0c`, `(v >> 4) & 0x0c` are `4u` (positions 1 and 3);
/// the former go to `a16[h][0]` ([-1024, 1016] per block), the latter to `a16[h][1]` ([-4096,
/// 4064] per block), so [`WINDOW1`] = 8 blocks fit in i16; the `4u` sums are divided by 4
/// exactly at the end.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn tile1<const H: usize>(hs: [Half; H], nkb: usize, x: *const i8) -> [__m256i; H] {
    let m1 = _mm256_set1_epi8(0x03);
    let m4 = _mm256_set1_epi8(0x0c);
    let ones = _mm256_set1_epi16(1);
    let mut a32 = [[_mm256_setzero_si256(); 2]; H];
    let mut kb = 0;
    while kb < nkb {
        let end = (kb + WINDOW1).min(nkb);
        let mut a16 = [[_mm256_setzero_si256(); 2]; H];
        for k in kb..end {
            for h in (0..H).step_by(2) {
                hs[h].prefetch::<PF_DIST>(k);
            }
            let xo = x.add(k * 16);
            let xb = [bcast4(xo), bcast4(xo.add(4)), bcast4(xo.add(8)), bcast4(xo.add(12))];
            for h in 0..H {
                let v = _mm256_load_si256(hs[h].at(k));
                let v4 = _mm256_srli_epi16::<4>(v);
                let s0 = _mm256_maddubs_epi16(_mm256_and_si256(v, m1), xb[0]);
                let s2 = _mm256_maddubs_epi16(_mm256_and_si256(v4, m1), xb[2]);
                let s1 = _mm256_maddubs_epi16(_mm256_and_si256(v, m4), xb[1]);
                let s3 = _mm256_maddubs_epi16(_mm256_and_si256(v4, m4), xb[3]);
                a16[h][0] = _mm256_add_epi16(a16[h][0], _mm256_add_epi16(s0, s2));
                a16[h][1] = _mm256_add_epi16(a16[h][1], _mm256_add_epi16(s1, s3));
            }
        }
        for h in 0..H {
            a32[h][0] = _mm256_add_epi32(a32[h][0], _mm256_madd_epi16(a16[h][0], ones));
            a32[h][1] = _mm256_add_epi32(a32[h][1], _mm256_madd_epi16(a16[h][1], ones));
        }
        kb = end;
    }
    let mut r = [_mm256_setzero_si256(); H];
    for h in 0..H {
        r[h] = _mm256_add_epi32(a32[h][0], _mm256_srai_epi32::<2>(a32[h][1]));
    }
    r
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn tilen<const H: usize, const T: usize>(
    hs: [Half; H],
    nkb: usize,
    x: *const i8,
    xstride: usize,
) -> [[__m256i; T]; H] {
    let m = _mm256_set1_epi8(3);
    let ones = _mm256_set1_epi16(1);
    let mut a32 = [[_mm256_setzero_si256(); T]; H];
    let mut kb = 0;
    while kb < nkb {
        let end = (kb + WINDOW).min(nkb);
        let mut a16 = [[_mm256_setzero_si256(); T]; H];
        for k in kb..end {
            for h in (0..H).step_by(2) {
                hs[h].prefetch::<PF_DIST>(k);
            }
            for h in 0..H {
                let v = _mm256_load_si256(hs[h].at(k));
                let u = [
                    _mm256_and_si256(v, m),
                    _mm256_and_si256(_mm256_srli_epi16::<2>(v), m),
                    _mm256_and_si256(_mm256_srli_epi16::<4>(v), m),
                    _mm256_and_si256(_mm256_srli_epi16::<6>(v), m),
                ];
                for t in 0..T {
                    let xo = x.add(t * xstride + k * 16);
                    let s0 = _mm256_maddubs_epi16(u[0], bcast4(xo));
                    let s1 = _mm256_maddubs_epi16(u[1], bcast4(xo.add(4)));
                    let s2 = _mm256_maddubs_epi16(u[2], bcast4(xo.add(8)));
                    let s3 = _mm256_maddubs_epi16(u[3], bcast4(xo.add(12)));
                    let s = _mm256_add_epi16(_mm256_add_epi16(s0, s1), _mm256_add_epi16(s2, s3));
                    a16[h][t] = _mm256_add_epi16(a16[h][t], s);
                }
            }
        }
        for h in 0..H {
            for t in 0..T {
                a32[h][t] = _mm256_add_epi32(a32[h][t], _mm256_madd_epi16(a16[h][t], ones));
            }
        }
        kb = end;
    }
    a32
}

/// Epilogue for one half (8 rows starting at `r0`) and token `t`, stored for the rows in `rows`.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn store8(
    acc: __m256i,
    t: usize,
    r0: usize,
    rows: &Range<usize>,
    w: &TernaryMatrix,
    x: &QuantActs,
    out: OutPtr,
) {
    let k = lane_mask(r0, 8, rows);
    if k == 0 {
        return;
    }
    let dot = _mm256_sub_epi32(acc, _mm256_set1_epi32(*x.sum.get_unchecked(t)));
    let f = _mm256_div_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(*x.scale.get_unchecked(t)));
    let sp = w.scales().as_ptr().add(r0);
    let op = out.at(t, r0);
    if k == 0xff {
        _mm256_storeu_ps(op, _mm256_mul_ps(f, _mm256_loadu_ps(sp)));
    } else {
        let bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        let mv = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(k as i32), bits), bits);
        _mm256_maskstore_ps(op, mv, _mm256_mul_ps(f, _mm256_maskload_ps(sp, mv)));
    }
}

/// What the tile calls of one matmul share.
pub(super) struct Job<'a> {
    pub w: &'a TernaryMatrix,
    pub x: &'a QuantActs,
    pub out: OutPtr,
    pub rows: &'a Range<usize>,
    /// 16-column blocks per row
    pub nkb: usize,
}

impl Job<'_> {
    /// The halves of the group pair `a`, `b` ([`pair_halves`]).
    #[inline(always)]
    pub(super) fn halves<const H: usize>(&self, a: Span, b: Span) -> [Half; H] {
        pair_halves(self.w.data().as_ptr(), a, b)
    }
    /// Token `t`'s int8 activations.
    #[inline(always)]
    pub(super) unsafe fn acts(&self, t: usize) -> *const i8 {
        self.x.q.as_ptr().add(t * self.x.stride)
    }
    /// Epilogues of tokens `t0..t0 + T` for the halves of [`Job::halves`]`(a, b)`
    /// (`acc[half][token]`).
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn store_tokens<const H: usize, const T: usize>(
        &self,
        acc: [[__m256i; T]; H],
        t0: usize,
        a: Span,
        b: Span,
    ) {
        for t in 0..T {
            store_halves(self, acc.iter().map(|h| h[t]), t0 + t, a, b);
        }
    }
}

/// Epilogues of token `t` for the halves of [`pair_halves`]`(_, a, b)`, accumulators in half
/// order.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn store_halves(j: &Job, accs: impl IntoIterator<Item = __m256i>, t: usize, a: Span, b: Span) {
    for (h, acc) in accs.into_iter().enumerate() {
        store8(acc, t, half_row(a, b, h), j.rows, j.w, j.x, j.out);
    }
}

/// One token on the group pair `a`, `b` (see [`stream_pairs`]).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn run1(j: &Job, a: Span, b: Span) {
    let q = j.acts(0);
    if b.n == 0 {
        store_halves(j, tile1::<2>(j.halves(a, a), j.nkb, q), 0, a, a);
    } else {
        store_halves(j, tile1::<4>(j.halves(a, b), j.nkb, q), 0, a, b);
    }
}

/// `T` tokens from `t0` on one group (`H` = 2, `b` unused) or the pair `a`, `b` (`H` = 4).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn runn<const H: usize, const T: usize>(j: &Job, a: Span, b: Span, t0: usize) {
    j.store_tokens(tilen::<H, T>(j.halves(a, b), j.nkb, j.acts(t0), j.x.stride), t0, a, b);
}

/// # Safety
/// The CPU supports AVX2; `w` uses the x86 layout; `x` matches `w` and `out` is writable at every
/// `(t, r)`, `t < x.n_tok`, `r in rows`.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn matmul_rows(w: &TernaryMatrix, x: &QuantActs, out: OutPtr, rows: Range<usize>) {
    let (g0, g1) = (rows.start / GROUP, rows.end.div_ceil(GROUP));
    let ngroups = w.rows().div_ceil(GROUP);
    let nkb = w.kcols() / 16;
    let j = Job { w, x, out, rows: &rows, nkb };
    if x.n_tok == 1 {
        stream_pairs(ngroups, nkb, g0, g1, |a, b| run1(&j, a, b));
        return;
    }
    if x.n_tok <= 3 {
        // Two or three tokens (batched decode): group pairs in two streams, as for one token.
        let three = x.n_tok == 3;
        stream_pairs(ngroups, nkb, g0, g1, |a, b| match (b.n, three) {
            (0, false) => runn::<2, 2>(&j, a, a, 0),
            (_, false) => runn::<4, 2>(&j, a, b, 0),
            (0, true) => runn::<2, 3>(&j, a, a, 0),
            (_, true) => runn::<4, 3>(&j, a, b, 0),
        });
        return;
    }
    let mut tb = 0;
    while tb < x.n_tok {
        let tb_end = (tb + T_OUTER).min(x.n_tok);
        for g in g0..g1 {
            let s = one_group(ngroups, nkb, g);
            let mut t = tb;
            while t < tb_end {
                let tn = (tb_end - t).min(TN);
                match tn {
                    4 => runn::<2, 4>(&j, s, s, t),
                    3 => runn::<2, 3>(&j, s, s, t),
                    2 => runn::<2, 2>(&j, s, s, t),
                    _ => runn::<2, 1>(&j, s, s, t),
                }
                t += tn;
            }
        }
        tb = tb_end;
    }
}
