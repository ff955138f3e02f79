//! 256-bit VNNI kernels (`vpdpbusd ymm`) on the shared x86 layout (see `x86.rs`).
//!
//! The same source is compiled twice: with the VEX AVX-VNNI encoding (`avxvnni`: Alder Lake and
//! later, Zen 5) and with the EVEX AVX512-VNNI/VL encoding of the same instruction, so the level
//! runs, and is tested, on AVX-512 VNNI machines without AVX-VNNI too. The VEX build is limited
//! to 16 ymm registers; the tiles are sized for that.
//!
//! - One token: two groups (4 halves) per pass, from two streams far apart as in `avx2.rs`
//!   ([`stream_pairs`]; on 2 threads of the AMX Xeon, one token from DRAM, qkv / o / gate_up /
//!   down took 132 / 91-92 / 430-449 / 183-187 us with one stream, 80-83 / 61 / 306-322 / 143-144
//!   with two, `-- ternary decode avxvnni dram`, builds alternated twice). Per 32-byte half:
//!   `v & 0x03` and `(v >> 4) & 0x03` are `u` (columns of shift positions 0 and 2), `v & 0x0c`
//!   and `(v >> 4) & 0x0c` are `4u` (positions 1 and 3): one shift, four ANDs, four `vpdpbusd`
//!   into two accumulators, combined exactly at the end (`a + (b >> 2)`), and a software
//!   prefetch [`PF_DIST`] blocks ahead.
//! - Several tokens: shift unpack, tiles of one group (two halves) x [`TN`] tokens; the 1-3
//!   tokens left over (all of them in decode) take group pairs from two streams as one token
//!   does (one group's accumulators alone cannot hide `vpdpbusd`'s latency; `bitnet bench --plan
//!   int8 --kernel avxvnni --threads 2 --batch B` per sequence: 2 sequences 20.5-21.5 ->
//!   23.9-24.4 tok/s, 3 sequences 17.1-18.0 -> 21.9-23.2, 5 (4 + 1) 10.8-11.2 -> 13.1-14.4).

use core::arch::x86_64::*;
use std::ops::Range;

use super::avx2::{bcast4, one_group, store_halves, stream_pairs, Half, Job};
use super::x86::{Span, GROUP};
use super::{OutPtr, QuantActs, TernaryMatrix};

/// Groups per layout tile (see `x86.rs`): one, as AVX2 (each group a sequential stream).
pub(super) const TILE: usize = 1;
const _: () = assert!(TILE == 1, "the kernels read groups as one-group tiles (one_group)");
/// Tokens per tile.
const TN: usize = 4;
/// Column blocks between a software prefetch and its use (2 KB ahead in each stream). On the AMX
/// Xeon the one-token kernel, then one stream of two-group tiles, read 46-52% of the probe's
/// bandwidth from DRAM without software prefetch, 55-78% with the best distance (12 blocks, 1.5
/// KB; see `avx2.rs`). With two one-group streams, 12 / 24 / 32 blocks: gate_up on 2 threads
/// 337-342 / 317-325 / 310-319 us.
const PF_DIST: usize = 32;
/// Tokens per cache block.
const T_OUTER: usize = 64;

macro_rules! vnni256 {
    ($modname:ident, $feat:literal, $dp:ident) => {
        mod $modname {
            use super::*;

            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn tile1<const H: usize>(hs: [Half; H], nkb: usize, x: *const i8) -> [__m256i; H] {
                let m1 = _mm256_set1_epi8(0x03);
                let m4 = _mm256_set1_epi8(0x0c);
                // a[h][0] collects u * q (shift positions 0 and 2), a[h][1] collects 4u * q (1 and 3).
                let mut a = [[_mm256_setzero_si256(); 2]; H];
                for kb in 0..nkb {
                    for h in (0..H).step_by(2) {
                        hs[h].prefetch::<PF_DIST>(kb);
                    }
                    let xo = x.add(kb * 16);
                    let xb = [bcast4(xo), bcast4(xo.add(4)), bcast4(xo.add(8)), bcast4(xo.add(12))];
                    for h in 0..H {
                        let v = _mm256_load_si256(hs[h].at(kb));
                        let v4 = _mm256_srli_epi16::<4>(v);
                        a[h][0] = $dp(a[h][0], _mm256_and_si256(v, m1), xb[0]);
                        a[h][1] = $dp(a[h][1], _mm256_and_si256(v, m4), xb[1]);
                        a[h][0] = $dp(a[h][0], _mm256_and_si256(v4, m1), xb[2]);
                        a[h][1] = $dp(a[h][1], _mm256_and_si256(v4, m4), xb[3]);
                    }
                }
                let mut r = [_mm256_setzero_si256(); H];
                for h in 0..H {
                    r[h] = _mm256_add_epi32(a[h][0], _mm256_srai_epi32::<2>(a[h][1]));
                }
                r
            }

            /// Token `t0` on the group pair `a`, `b` (see [`stream_pairs`]).
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn run1(j: &Job, a: Span, b: Span, t0: usize) {
                let q = j.acts(t0);
                if b.n == 0 {
                    store_halves(j, tile1::<2>(j.halves(a, a), j.nkb, q), t0, a, a);
                } else {
                    store_halves(j, tile1::<4>(j.halves(a, b), j.nkb, q), t0, a, b);
                }
            }

            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn tilen<const H: usize, const T: usize>(
                hs: [Half; H],
                nkb: usize,
                x: *const i8,
                xstride: usize,
            ) -> [[__m256i; T]; H] {
                let m = _mm256_set1_epi8(3);
                let mut a = [[_mm256_setzero_si256(); T]; H];
                for kb in 0..nkb {
                    for h in (0..H).step_by(2) {
                        hs[h].prefetch::<PF_DIST>(kb);
                    }
                    for h in 0..H {
                        let v = _mm256_load_si256(hs[h].at(kb));
                        let u = [
                            _mm256_and_si256(v, m),
                            _mm256_and_si256(_mm256_srli_epi16::<2>(v), m),
                            _mm256_and_si256(_mm256_srli_epi16::<4>(v), m),
                            _mm256_and_si256(_mm256_srli_epi16::<6>(v), m),
                        ];
                        for t in 0..T {
                            let xo = x.add(t * xstride + kb * 16);
                            for p in 0..4 {
                                a[h][t] = $dp(a[h][t], u[p], bcast4(xo.add(4 * p)));
                            }
                        }
                    }
                }
                a
            }

            /// `T` tokens from `t0` on one group (`H` = 2, `b` unused) or the pair `a`, `b` (`H`
            /// = 4, two streams as for one token).
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn runn<const H: usize, const T: usize>(j: &Job, a: Span, b: Span, t0: usize) {
                j.store_tokens(tilen::<H, T>(j.halves(a, b), j.nkb, j.acts(t0), j.x.stride), t0, a, b);
            }

            /// # Safety
            /// See [`super::matmul_rows`]; the CPU supports the features of this module.
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn matmul_rows(w: &TernaryMatrix, x: &QuantActs, out: OutPtr, rows: Range<usize>) {
                let (g0, g1) = (rows.start / GROUP, rows.end.div_ceil(GROUP));
                let ngroups = w.rows().div_ceil(GROUP);
                let nkb = w.kcols() / 16;
                let j = Job { w, x, out, rows: &rows, nkb };
                // Tokens in blocks of T_OUTER, each in passes of TN tokens over one group at a time,
                // groups in memory order (one sequential stream). Where 1-3 tokens are left over (all
                // of them in decode), the walk is over group pairs instead (group `i` of the first
                // half of the rows beside group `i + half` of the second: two streams, which one
                // token needs to reach the bandwidth), each pair's full passes group by group, then
                // the tokens left on both groups at once: one group's accumulators for so few tokens
                // cannot hide `vpdpbusd`'s latency (gate_up on 2 threads, cache-resident: 5 tokens
                // as 4 + 1 on single groups took 733-745 us, 4 tokens 387-389, 5 now 500-518).
                let mut tb = 0;
                while tb < x.n_tok {
                    let tb_end = (tb + T_OUTER).min(x.n_tok);
                    let rest = (tb_end - tb) % TN;
                    let t_rest = tb_end - rest;
                    let full_passes = |s: Span| {
                        for t in (tb..t_rest).step_by(TN) {
                            runn::<2, TN>(&j, s, s, t);
                        }
                    };
                    if rest == 0 {
                        (g0..g1).for_each(|g| full_passes(one_group(ngroups, nkb, g)));
                    } else {
                        stream_pairs(ngroups, nkb, g0, g1, |a, b| {
                            full_passes(a);
                            if b.n > 0 {
                                full_passes(b);
                            }
                            match (rest, b.n) {
                                (1, _) => run1(&j, a, b, t_rest),
                                (2, 0) => runn::<2, 2>(&j, a, a, t_rest),
                                (2, _) => runn::<4, 2>(&j, a, b, t_rest),
                                (_, 0) => runn::<2, 3>(&j, a, a, t_rest),
                                (_, _) => runn::<4, 3>(&j, a, b, t_rest),
                            }
                        });
                    }
                    tb = tb_end;
                }
            }
        }
    };
}

vnni256!(vex, "avx2,avxvnni", _mm256_dpbusd_avx_epi32);
vnni256!(evex, "avx2,avx512f,avx512vl,avx512vnni", _mm256_dpbusd_epi32);

/// Whether the VEX (AVX-VNNI) build runs here; otherwise the EVEX build does.
pub(super) fn uses_vex() -> bool {
    is_x86_feature_detected!("avxvnni")
}

/// # Safety
/// The CPU supports AVX2 and AVX-VNNI or AVX512-VNNI/VL; `w` uses the x86 layout; `x` matches `w`
/// and `out` is writable at every `(t, r)`, `t < x.n_tok`, `r in rows`.
pub(super) unsafe fn matmul_rows(w: &TernaryMatrix, x: &QuantActs, out: OutPtr, rows: Range<usize>) {
    if uses_vex() {
        vex::matmul_rows(w, x, out, rows)
    } else {
        evex::matmul_rows(w, x, out, rows)
    }
}
