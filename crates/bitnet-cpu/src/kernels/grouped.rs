//! What the x86 kernels of the grouped LM heads (4-bit and 2-bit, one f16 scale per 32 columns)
//! share: rows in blocks of 16 whose output rows are vector lanes, tokens in tiles of up to
//! [`TN`], and the tile's last step, `out = acc / act_scale` stored under the row range's mask.

use core::arch::x86_64::*;
use std::ops::Range;

use super::x86::lane_mask;
use super::{OutPtr, QuantActs};

/// Tokens per tile.
pub(super) const TN: usize = 4;
/// Software prefetch distance in bytes (several groups ahead). One token prefetches too: on a
/// Xeon core (~16 GB/s alone) the hardware prefetchers left the 2-bit head at 8.2 ms on one
/// thread and 4.6 on two (from DRAM, copies cycled), 6.7 and 3.3 with it; the 4-bit head 14.1 ->
/// 12.5 and 7.3 -> 6.3 ms.
pub(super) const PF_BYTES: usize = 4096;

/// Runs the kernel's `tile::<T, B>` over every 16-row block of `rows` and the tokens in tiles of
/// up to [`TN`]. One token (decode, bandwidth bound) takes block `i` of each half of the range
/// beside block `i` of the other (`B` = 2): two sequential streams far apart, which one Zen 4
/// core reads faster than one (the ternary decode kernel and the dense GEMV do the same). The
/// 4-bit head: 1.2-1.3x on one thread; the 2-bit head, bound by its unpacking, unchanged.
macro_rules! each_tile {
    ($tile:ident, $m:expr, $x:expr, $out:expr, $rows:expr) => {
        let (b0, b1) = ($rows.start / 16, $rows.end.div_ceil(16));
        if $x.n_tok == 1 {
            let h = (b1 - b0) / 2;
            for i in b0..b0 + h {
                $tile::<1, 2>($m, $x, $out, &$rows, [i, i + h], 0);
            }
            if (b1 - b0) % 2 == 1 {
                $tile::<1, 1>($m, $x, $out, &$rows, [b1 - 1], 0);
            }
        } else {
            for blk in b0..b1 {
                let mut t = 0;
                while t < $x.n_tok {
                    let n = ($x.n_tok - t).min($crate::kernels::grouped::TN);
                    match n {
                        4 => $tile::<4, 1>($m, $x, $out, &$rows, [blk], t),
                        3 => $tile::<3, 1>($m, $x, $out, &$rows, [blk], t),
                        2 => $tile::<2, 1>($m, $x, $out, &$rows, [blk], t),
                        _ => $tile::<1, 1>($m, $x, $out, &$rows, [blk], t),
                    }
                    t += n;
                }
            }
        }
    };
}
pub(super) use each_tile;

/// The 4 activations of token `t` from column `c`, in every dword lane.
#[inline(always)]
pub(super) unsafe fn bcast4(x: &QuantActs, t: usize, c: usize) -> i32 {
    (x.q.as_ptr().add(t * x.stride + c) as *const i32).read_unaligned()
}

/// Stores block `blk`'s 16 rows (those inside `rows`) for tokens `t0..t0 + T`.
///
/// # Safety
/// AVX-512F; `out` writable there.
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn store_avx512<const T: usize>(
    acc: [__m512; T],
    x: &QuantActs,
    out: OutPtr,
    rows: &Range<usize>,
    blk: usize,
    t0: usize,
) {
    let r0 = blk * 16;
    let mask = lane_mask(r0, 16, rows) as __mmask16;
    for (t, a) in acc.iter().enumerate() {
        let f = _mm512_div_ps(*a, _mm512_set1_ps(x.scale[t0 + t]));
        _mm512_mask_storeu_ps(out.at(t0 + t, r0), mask, f);
    }
}

/// [`store_avx512`] for AVX2's two halves of a block (`acc[h]`: rows `16 blk + 8h ..`).
///
/// # Safety
/// AVX2; `out` writable there.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn store_avx2<const T: usize>(
    acc: [[__m256; T]; 2],
    x: &QuantActs,
    out: OutPtr,
    rows: &Range<usize>,
    blk: usize,
    t0: usize,
) {
    let bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    for (h, acc) in acc.iter().enumerate() {
        let r0 = blk * 16 + 8 * h;
        let k = lane_mask(r0, 8, rows);
        if k == 0 {
            continue;
        }
        let mv = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(k as i32), bits), bits);
        for (t, a) in acc.iter().enumerate() {
            let f = _mm256_div_ps(*a, _mm256_set1_ps(x.scale[t0 + t]));
            _mm256_maskstore_ps(out.at(t0 + t, r0), mv, f);
        }
    }
}
