//! AVX-512 VNNI kernels (`vpdpbusd zmm`) on the shared x86 layout (see `x86.rs`).
//!
//! - One token (decode, bandwidth bound): a whole layout tile (4 row groups, 64 rows, one
//!   sequential stream) at a time; the 4 activation broadcasts of a block are shared by its 4 groups. The weights are
//!   unpacked by a single AND per 64 codes: `block & (3 << 2p)` is `u * 4^p`, so each shift
//!   position `p` gets its own accumulator and the four are combined exactly at the end
//!   (`a0 + a1>>2 + a2>>4 + a3>>6`; each `a_p` is an exact multiple of `4^p`). Per 64-byte block:
//!   one load, four ANDs, four `vpdpbusd` whose broadcast activations are shared by the tile.
//! - Several tokens (prefill, batched decode; compute bound): tiles of [`GN`] row groups x [`TN`]
//!   tokens; each block is unpacked once with shifts (`(block >> 2p) & 3`) and multiplied with
//!   every token of the tile, tokens taken in cache blocks of [`T_OUTER`] so their activations
//!   stay in L2 while the rows stream by.
//!
//! Overflow: a lane adds at most `kcols / 4` products of `|u * 4^p| <= 128` by `|q| <= 128`, far
//! below 2^31 for any realistic width (up to ~500k columns).

use core::arch::x86_64::*;
use std::ops::Range;

use super::x86::{lane_mask, spans, Span, BLOCK, GROUP};

/// Groups per layout tile (see `x86.rs`): the one-token kernel reads a whole tile per pass.
pub(super) const TILE: usize = 4;
use super::{OutPtr, QuantActs, TernaryMatrix};

/// Row groups per tile for several tokens.
const GN: usize = 2;
/// Tokens per tile.
const TN: usize = 8;
/// Up to this many tokens, a whole tile (4 groups) per pass.
const TN_SMALL: usize = 3;
/// Tokens per cache block.
const T_OUTER: usize = 64;

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn bcast4(p: *const i8) -> __m512i {
    _mm512_set1_epi32((p as *const i32).read_unaligned())
}

/// Software prefetch of a span's blocks `PF_DIST` column blocks ahead (`bytes == 0`: none).
#[derive(Clone, Copy)]
struct Prefetch {
    base: *const u8,
    bytes: usize,
}

/// Column blocks between a prefetch and its use.
const PF_DIST: usize = 16;

impl Prefetch {
    #[inline(always)]
    unsafe fn at(self, kb: usize, kbstride: usize) {
        let mut o = 0;
        while o < self.bytes {
            _mm_prefetch::<_MM_HINT_T0>(
                self.base.wrapping_add((kb + PF_DIST) * kbstride + o) as *const i8
            );
            o += 64;
        }
    }
}

/// One token, `G` groups (group `g`, block `kb` at `w + g * 64 + kb * kbstride`): returns
/// `sum_c u * q` per row (not yet offset-corrected).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tile1<const G: usize>(
    w: *const u8,
    kbstride: usize,
    nkb: usize,
    x: *const i8,
) -> [__m512i; G] {
    let m = [
        _mm512_set1_epi8(0x03),
        _mm512_set1_epi8(0x0c),
        _mm512_set1_epi8(0x30),
        _mm512_set1_epi8(0xc0u8 as i8),
    ];
    let mut a = [[_mm512_setzero_si512(); 4]; G];
    for kb in 0..nkb {
        let xo = x.add(kb * 16);
        let xb = [
            bcast4(xo),
            bcast4(xo.add(4)),
            bcast4(xo.add(8)),
            bcast4(xo.add(12)),
        ];
        for g in 0..G {
            let v = _mm512_load_si512(w.add(g * BLOCK + kb * kbstride) as *const _);
            for p in 0..4 {
                a[g][p] = _mm512_dpbusd_epi32(a[g][p], _mm512_and_si512(v, m[p]), xb[p]);
            }
        }
    }
    let mut r = [_mm512_setzero_si512(); G];
    for g in 0..G {
        let hi = _mm512_add_epi32(
            _mm512_srai_epi32::<4>(a[g][2]),
            _mm512_srai_epi32::<6>(a[g][3]),
        );
        let lo = _mm512_add_epi32(a[g][0], _mm512_srai_epi32::<2>(a[g][1]));
        r[g] = _mm512_add_epi32(lo, hi);
    }
    r
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
    pf: Prefetch,
) -> [[__m512i; T]; G] {
    let m = _mm512_set1_epi8(0x03);
    let mut a = [[_mm512_setzero_si512(); T]; G];
    for kb in 0..nkb {
        pf.at(kb, kbstride);
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

/// Epilogue for one group and token: `(acc - sum_q) as f32 / act_scale * row_scale`, stored for
/// the rows of the group inside `rows`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn store(
    acc: __m512i,
    t: usize,
    g: usize,
    rows: &Range<usize>,
    w: &TernaryMatrix,
    x: &QuantActs,
    out: OutPtr,
) {
    let r0 = g * GROUP;
    let k = lane_mask(r0, GROUP, rows) as __mmask16;
    let dot = _mm512_sub_epi32(acc, _mm512_set1_epi32(*x.sum.get_unchecked(t)));
    let f = _mm512_div_ps(
        _mm512_cvtepi32_ps(dot),
        _mm512_set1_ps(*x.scale.get_unchecked(t)),
    );
    let rs = _mm512_maskz_loadu_ps(k, w.scales().as_ptr().add(r0));
    _mm512_mask_storeu_ps(out.at(t, r0), k, _mm512_mul_ps(f, rs));
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn run1<const G: usize>(
    w: &TernaryMatrix,
    x: &QuantActs,
    out: OutPtr,
    rows: &Range<usize>,
    s: Span,
    nkb: usize,
) {
    let a = tile1::<G>(w.data().as_ptr().add(s.off), s.kbstride, nkb, x.q.as_ptr());
    for (i, &acc) in a.iter().enumerate() {
        store(acc, 0, s.g + i, rows, w, x, out);
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
    pf: Prefetch,
) {
    let xp = x.q.as_ptr().add(t0 * x.stride);
    let a = tilen::<G, T>(
        w.data().as_ptr().add(s.off),
        s.kbstride,
        nkb,
        xp,
        x.stride,
        pf,
    );
    for (i, accs) in a.iter().enumerate() {
        for (t, &acc) in accs.iter().enumerate() {
            store(acc, t0 + t, s.g + i, rows, w, x, out);
        }
    }
}

/// # Safety
/// The CPU supports AVX-512 F/BW/VL/VNNI; `w` uses the x86 layout; `x` matches `w` and `out` is
/// writable at every `(t, r)`, `t < x.n_tok`, `r in rows`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn matmul_rows(
    w: &TernaryMatrix,
    x: &QuantActs,
    out: OutPtr,
    rows: Range<usize>,
) {
    let (g0, g1) = (rows.start / GROUP, rows.end.div_ceil(GROUP));
    let ngroups = w.rows().div_ceil(GROUP);
    let nkb = w.kcols() / 16;
    if x.n_tok == 1 {
        for s in spans(TILE, ngroups, nkb, g0, g1) {
            match s.n {
                4 => run1::<4>(w, x, out, &rows, s, nkb),
                3 => run1::<3>(w, x, out, &rows, s, nkb),
                2 => run1::<2>(w, x, out, &rows, s, nkb),
                _ => run1::<1>(w, x, out, &rows, s, nkb),
            }
        }
        return;
    }
    if x.n_tok <= TN_SMALL {
        // Few tokens (batched decode): whole spans in one sequential pass, like one token.
        for s in spans(TILE, ngroups, nkb, g0, g1) {
            let pf = Prefetch {
                base: w.data().as_ptr().add(s.off),
                bytes: s.n * BLOCK,
            };
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
                    match x.n_tok {
                        $( $t => runn::<$g, $t>(w, x, out, &rows, s, nkb, 0, pf), )*
                        _ => unreachable!(),
                    }
                };
            }
            go!(1, 2, 3, 4; 2, 3);
        }
        return;
    }
    let mut tb = 0;
    while tb < x.n_tok {
        let tb_end = (tb + T_OUTER).min(x.n_tok);
        for span in spans(TILE, ngroups, nkb, g0, g1) {
            let mut gi = 0;
            while gi < span.n {
                let n = (span.n - gi).min(GN);
                let s = Span {
                    off: span.off + gi * BLOCK,
                    kbstride: span.kbstride,
                    g: span.g + gi,
                    n,
                };
                let mut t = tb;
                while t < tb_end {
                    // The first pass over a span streams it from memory: prefetch all of its
                    // groups in address order (this pass reads only `GN` of them, strided).
                    let pf = if gi == 0 && t == tb && span.n > n {
                        Prefetch {
                            base: w.data().as_ptr().add(span.off),
                            bytes: span.n * BLOCK,
                        }
                    } else {
                        Prefetch {
                            base: std::ptr::null(),
                            bytes: 0,
                        }
                    };
                    let tn = (tb_end - t).min(TN);
                    macro_rules! go {
                        ($($g:literal),*; $($t:literal),*) => {
                            go!(@g [$($g),*] [$($t),*])
                        };
                        (@g [$($g:literal),*] $ts:tt) => {
                            match n {
                                $( $g => go!(@t $g $ts), )*
                                _ => unreachable!(),
                            }
                        };
                        (@t $g:literal [$($t:literal),*]) => {
                            match tn {
                                $( $t => runn::<$g, $t>(w, x, out, &rows, s, nkb, t, pf), )*
                                _ => unreachable!(),
                            }
                        };
                    }
                    go!(1, 2; 1, 2, 3, 4, 5, 6, 7, 8);
                    t += tn;
                }
                gi += n;
            }
        }
        tb = tb_end;
    }
}
