//! AVX-512 VNNI kernels (`vpdpbusd zmm`) on the shared x86 layout (see `x86.rs`).
//!
//! - One token (decode, bandwidth bound): two layout tiles at a time (2 row groups each), taken
//!   from the two halves of the row range, so the weights are read as two sequential streams far
//!   apart (on the Zen 4 this was tuned on, one core reads ~19 GB/s from one stream and ~31 GB/s
//!   from two; adjacent streams do not help). The 4 activation broadcasts of a column block feed
//!   all 4 groups. The weights are unpacked by a single AND per 64 codes: `block & (3 << 2p)` is
//!   `u * 4^p`, so each shift position `p` gets its own accumulator and the four are combined
//!   exactly at the end (`a0 + a1>>2 + a2>>4 + a3>>6`; each `a_p` is an exact multiple of `4^p`).
//!   Per 64-byte block: one load, four ANDs, four `vpdpbusd` (the bound: ~16 B/cycle).
//! - 2-3 tokens (batched decode): the same two streams, shift unpack (`(block >> 2p) & 3`, shared
//!   by the tokens), software prefetch.
//! - More tokens (prefill, compute bound): tiles of 2 row groups x [`TN`] tokens; each block is
//!   unpacked once per 8 tokens, tokens taken in cache blocks of [`T_OUTER`] so their activations
//!   stay in L2 while a tile's weights (reused by every token block) stay in L1/L2.
//!
//! Overflow: a lane adds at most `kcols / 4` products of `|u * 4^p| <= 128` by `|q| <= 128`, far
//! below 2^31 for any realistic width (up to ~500k columns).

use core::arch::x86_64::*;
use std::ops::Range;

use super::x86::{lane_mask, spans, tile_span, Span, BLOCK, GROUP};
use super::{OutPtr, QuantActs, TernaryMatrix};

/// Groups per layout tile (see `x86.rs`).
pub(super) const TILE: usize = 2;

/// Tokens per tile.
const TN: usize = 8;
/// Up to this many tokens, the two-stream few-token kernel.
const TN_SMALL: usize = 3;
/// Tokens per cache block.
const T_OUTER: usize = 64;

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn bcast4(p: *const i8) -> __m512i {
    _mm512_set1_epi32((p as *const i32).read_unaligned())
}

/// Column blocks between a software prefetch and its use (few-token kernel).
const PF_DIST: usize = 16;

/// One token, two streams: `GA` groups at `wa` and `GB` groups at `wb` (group `g`, block `kb` at
/// `w + g * 64 + kb * kbstride`; `GB` may be 0). Returns `sum_c u * q` per row (not yet
/// offset-corrected).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tile1<const GA: usize, const GB: usize>(
    wa: *const u8,
    ksa: usize,
    wb: *const u8,
    ksb: usize,
    nkb: usize,
    x: *const i8,
) -> ([__m512i; GA], [__m512i; GB]) {
    let m = [_mm512_set1_epi8(0x03), _mm512_set1_epi8(0x0c), _mm512_set1_epi8(0x30), _mm512_set1_epi8(0xc0u8 as i8)];
    let mut a = [[_mm512_setzero_si512(); 4]; GA];
    let mut b = [[_mm512_setzero_si512(); 4]; GB];
    for kb in 0..nkb {
        let xo = x.add(kb * 16);
        let xb = [bcast4(xo), bcast4(xo.add(4)), bcast4(xo.add(8)), bcast4(xo.add(12))];
        for g in 0..GA {
            let v = _mm512_load_si512(wa.add(g * BLOCK + kb * ksa) as *const _);
            for p in 0..4 {
                a[g][p] = _mm512_dpbusd_epi32(a[g][p], _mm512_and_si512(v, m[p]), xb[p]);
            }
        }
        for g in 0..GB {
            let v = _mm512_load_si512(wb.add(g * BLOCK + kb * ksb) as *const _);
            for p in 0..4 {
                b[g][p] = _mm512_dpbusd_epi32(b[g][p], _mm512_and_si512(v, m[p]), xb[p]);
            }
        }
    }
    (a.map(|v| combine(v)), b.map(|v| combine(v)))
}

/// `a0 + a1/4 + a2/16 + a3/64` for accumulators of `u * 4^p` products (each exactly divisible).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn combine(a: [__m512i; 4]) -> __m512i {
    let hi = _mm512_add_epi32(_mm512_srai_epi32::<4>(a[2]), _mm512_srai_epi32::<6>(a[3]));
    let lo = _mm512_add_epi32(a[0], _mm512_srai_epi32::<2>(a[1]));
    _mm512_add_epi32(lo, hi)
}

/// `T` tokens (rows of `x`, `xstride` apart), `G` groups.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tilen<const G: usize, const T: usize>(
    w: *const u8,
    kbstride: usize,
    nkb: usize,
    x: *const i8,
    xstride: usize,
) -> [[__m512i; T]; G] {
    let m = _mm512_set1_epi8(0x03);
    let mut a = [[_mm512_setzero_si512(); T]; G];
    for kb in 0..nkb {
        let mut u = [[_mm512_setzero_si512(); 4]; G];
        for g in 0..G {
            let v = _mm512_load_si512(w.add(g * BLOCK + kb * kbstride) as *const _);
            u[g][0] = _mm512_and_si512(v, m);
            u[g][1] = _mm512_and_si512(_mm512_srli_epi16::<2>(v), m);
            u[g][2] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), m);
            u[g][3] = _mm512_and_si512(_mm512_srli_epi16::<6>(v), m);
        }
        for t in 0..T {
            let xo = x.add(t * xstride + kb * 16);
            for p in 0..4 {
                let b = bcast4(xo.add(4 * p));
                for g in 0..G {
                    a[g][t] = _mm512_dpbusd_epi32(a[g][t], u[g][p], b);
                }
            }
        }
    }
    a
}

/// `T` tokens (2 or 3: batched decode), two streams as in [`tile1`]: `GA` groups at `wa`, `GB`
/// at `wb`, both prefetched [`PF_DIST`] blocks ahead (compute and memory time are close here, and
/// the hardware prefetcher alone does not run far enough ahead).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
unsafe fn tile_small<const GA: usize, const GB: usize, const T: usize>(
    wa: *const u8,
    ksa: usize,
    wb: *const u8,
    ksb: usize,
    nkb: usize,
    x: *const i8,
    xstride: usize,
) -> ([[__m512i; T]; GA], [[__m512i; T]; GB]) {
    let m = _mm512_set1_epi8(0x03);
    let unpack = |v: __m512i| {
        [
            _mm512_and_si512(v, m),
            _mm512_and_si512(_mm512_srli_epi16::<2>(v), m),
            _mm512_and_si512(_mm512_srli_epi16::<4>(v), m),
            _mm512_and_si512(_mm512_srli_epi16::<6>(v), m),
        ]
    };
    let mut a = [[_mm512_setzero_si512(); T]; GA];
    let mut b = [[_mm512_setzero_si512(); T]; GB];
    for kb in 0..nkb {
        for g in 0..GA {
            _mm_prefetch::<_MM_HINT_T0>(wa.wrapping_add(g * BLOCK + (kb + PF_DIST) * ksa) as *const i8);
        }
        for g in 0..GB {
            _mm_prefetch::<_MM_HINT_T0>(wb.wrapping_add(g * BLOCK + (kb + PF_DIST) * ksb) as *const i8);
        }
        let ua: [[__m512i; 4]; GA] =
            std::array::from_fn(|g| unpack(_mm512_load_si512(wa.add(g * BLOCK + kb * ksa) as *const _)));
        let ub: [[__m512i; 4]; GB] =
            std::array::from_fn(|g| unpack(_mm512_load_si512(wb.add(g * BLOCK + kb * ksb) as *const _)));
        for t in 0..T {
            let xo = x.add(t * xstride + kb * 16);
            for p in 0..4 {
                let bc = bcast4(xo.add(4 * p));
                for g in 0..GA {
                    a[g][t] = _mm512_dpbusd_epi32(a[g][t], ua[g][p], bc);
                }
                for g in 0..GB {
                    b[g][t] = _mm512_dpbusd_epi32(b[g][t], ub[g][p], bc);
                }
            }
        }
    }
    (a, b)
}

/// Epilogue for one group and token: `(acc - sum_q) as f32 / act_scale * row_scale`, stored for
/// the rows of the group inside `rows`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn store(acc: __m512i, t: usize, g: usize, rows: &Range<usize>, w: &TernaryMatrix, x: &QuantActs, out: OutPtr) {
    let r0 = g * GROUP;
    let k = lane_mask(r0, GROUP, rows) as __mmask16;
    let dot = _mm512_sub_epi32(acc, _mm512_set1_epi32(*x.sum.get_unchecked(t)));
    let f = _mm512_div_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(*x.scale.get_unchecked(t)));
    let rs = _mm512_maskz_loadu_ps(k, w.scales().as_ptr().add(r0));
    _mm512_mask_storeu_ps(out.at(t, r0), k, _mm512_mul_ps(f, rs));
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn run1<const GA: usize, const GB: usize>(
    w: &TernaryMatrix,
    x: &QuantActs,
    out: OutPtr,
    rows: &Range<usize>,
    sa: Span,
    sb: Span,
    nkb: usize,
) {
    let d = w.data().as_ptr();
    let (a, b) = tile1::<GA, GB>(d.add(sa.off), sa.kbstride, d.add(sb.off), sb.kbstride, nkb, x.q.as_ptr());
    for (i, &acc) in a.iter().enumerate() {
        store(acc, 0, sa.g + i, rows, w, x, out);
    }
    for (i, &acc) in b.iter().enumerate() {
        store(acc, 0, sb.g + i, rows, w, x, out);
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn runn<const G: usize, const T: usize>(
    w: &TernaryMatrix,
    x: &QuantActs,
    out: OutPtr,
    rows: &Range<usize>,
    s: Span,
    nkb: usize,
    t0: usize,
) {
    let xp = x.q.as_ptr().add(t0 * x.stride);
    let a = tilen::<G, T>(w.data().as_ptr().add(s.off), s.kbstride, nkb, xp, x.stride);
    for (i, accs) in a.iter().enumerate() {
        for (t, &acc) in accs.iter().enumerate() {
            store(acc, t0 + t, s.g + i, rows, w, x, out);
        }
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
#[allow(clippy::too_many_arguments)]
unsafe fn run_small<const GA: usize, const GB: usize, const T: usize>(
    w: &TernaryMatrix,
    x: &QuantActs,
    out: OutPtr,
    rows: &Range<usize>,
    sa: Span,
    sb: Span,
    nkb: usize,
) {
    let d = w.data().as_ptr();
    let (a, b) =
        tile_small::<GA, GB, T>(d.add(sa.off), sa.kbstride, d.add(sb.off), sb.kbstride, nkb, x.q.as_ptr(), x.stride);
    for (i, accs) in a.iter().enumerate() {
        for (t, &acc) in accs.iter().enumerate() {
            store(acc, t, sa.g + i, rows, w, x, out);
        }
    }
    for (i, accs) in b.iter().enumerate() {
        for (t, &acc) in accs.iter().enumerate() {
            store(acc, t, sb.g + i, rows, w, x, out);
        }
    }
}

/// # Safety
/// The CPU supports AVX-512 F/BW/VL/VNNI; `w` uses the x86 layout; `x` matches `w` and `out` is
/// writable at every `(t, r)`, `t < x.n_tok`, `r in rows`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn matmul_rows(w: &TernaryMatrix, x: &QuantActs, out: OutPtr, rows: Range<usize>) {
    let (g0, g1) = (rows.start / GROUP, rows.end.div_ceil(GROUP));
    let ngroups = w.rows().div_ceil(GROUP);
    let nkb = w.kcols() / 16;
    if x.n_tok == 1 {
        // Two sequential streams far apart (tile i of each half of the range): one stream does
        // not reach the memory bandwidth of a core.
        let (t0, t1) = (g0 / TILE, (g1 - 1) / TILE + 1);
        let half = (t1 - t0).div_ceil(2);
        for i in 0..half {
            let sa = tile_span(TILE, ngroups, nkb, g0, g1, t0 + i);
            if t0 + i + half < t1 {
                let sb = tile_span(TILE, ngroups, nkb, g0, g1, t0 + i + half);
                match (sa.n, sb.n) {
                    (2, 2) => run1::<2, 2>(w, x, out, &rows, sa, sb, nkb),
                    (2, _) => run1::<2, 1>(w, x, out, &rows, sa, sb, nkb),
                    (_, 2) => run1::<1, 2>(w, x, out, &rows, sa, sb, nkb),
                    (_, _) => run1::<1, 1>(w, x, out, &rows, sa, sb, nkb),
                }
            } else if sa.n == 2 {
                run1::<2, 0>(w, x, out, &rows, sa, sa, nkb);
            } else {
                run1::<1, 0>(w, x, out, &rows, sa, sa, nkb);
            }
        }
        return;
    }
    if x.n_tok <= TN_SMALL {
        // Few tokens (batched decode): tile pairs in two streams, as for one token.
        let (t0, t1) = (g0 / TILE, (g1 - 1) / TILE + 1);
        let half = (t1 - t0).div_ceil(2);
        for i in 0..half {
            let sa = tile_span(TILE, ngroups, nkb, g0, g1, t0 + i);
            let sb = if t0 + i + half < t1 {
                tile_span(TILE, ngroups, nkb, g0, g1, t0 + i + half)
            } else {
                Span { n: 0, ..sa }
            };
            macro_rules! go {
                ($($ga:literal, $gb:literal);*) => {
                    match (sa.n, sb.n, x.n_tok) {
                        $(
                            ($ga, $gb, 2) => run_small::<$ga, $gb, 2>(w, x, out, &rows, sa, sb, nkb),
                            ($ga, $gb, 3) => run_small::<$ga, $gb, 3>(w, x, out, &rows, sa, sb, nkb),
                        )*
                        _ => unreachable!(),
                    }
                };
            }
            go!(2, 2; 2, 1; 1, 2; 1, 1; 2, 0; 1, 0);
        }
        return;
    }
    let mut tb = 0;
    while tb < x.n_tok {
        let tb_end = (tb + T_OUTER).min(x.n_tok);
        for s in spans(TILE, ngroups, nkb, g0, g1) {
            let mut t = tb;
            while t < tb_end {
                let tn = (tb_end - t).min(TN);
                macro_rules! go {
                    ($($g:literal),*; $($t:literal),*) => {
                        go!(@g [$($g),*] [$($t),*])
                    };
                    (@g [$($g:literal),*] $ts:tt) => {
                        match s.n {
                            $( $g => go!(@t $g $ts), )*
                            _ => unreachable!(),
                        }
                    };
                    (@t $g:literal [$($t:literal),*]) => {
                        match tn {
                            $( $t => runn::<$g, $t>(w, x, out, &rows, s, nkb, t), )*
                            _ => unreachable!(),
                        }
                    };
                }
                go!(1, 2; 1, 2, 3, 4, 5, 6, 7, 8);
                t += tn;
            }
        }
        tb = tb_end;
    }
}
