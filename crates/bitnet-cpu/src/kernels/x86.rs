//! The packed layout shared by the x86 levels (AVX2, AVX-VNNI, AVX-512 VNNI).
//!
//! Rows are taken in groups of [`GROUP`] = 16 (the last group padded with code-0 rows), and
//! groups in tiles of `tile` groups (the last tile may hold fewer): 2 (32 rows) for AVX-512 and
//! AVX-VNNI, 1 for AVX2: what one pass of each level's kernels covers ([`tile_groups`]). Each
//! tile is one contiguous, sequentially read stream: for each 16-column block `kb`, the 64-byte
//! blocks of its groups one after the other (`tile_base + (kb * n_groups_in_tile + g) * 64`).
//! In the block of group `g`, column block `kb`, byte `4i + j` holds, in bits `2p..2p+1`,
//! `code + 1` of row `16g + i`, column `16kb + 4p + j`:
//!
//! ```text
//! tile:  [kb 0: g0 g1] [kb 1: g0 g1] ...      (64 bytes each; tile = 2)
//! block: dword i = row 16g+i;  byte j, bits 2p+1:2p  ->  column 16kb + 4p + j
//! ```
//!
//! `(block >> 2p) & 3` (or `block & (3 << 2p)`, which is the same codes times `4^p`) is therefore
//! a vector of 16 rows x 4 consecutive columns, one dword per row, and `vpdpbusd` against a
//! broadcast of the four activations `q[16kb + 4p .. 16kb + 4p + 4]` adds each row's 4 products
//! into its own lane: output rows are vector lanes (no horizontal reduction), one broadcast feeds
//! the groups of a tile, and an unpacked weight vector feeds every token of a tile.
//!
//! Why tiles: concurrent streams a few KB apart (e.g. separately stored groups read side by
//! side) read DRAM much slower than one stream on the Zen 4 this was tuned on, while streams far
//! apart read faster (the AVX-512 one-token kernel reads two tiles from the two halves of its row
//! range). A row range may start at any group: a thread whose range starts or ends inside a tile
//! reads just its groups of that tile. AVX2 / AVX-VNNI (ymm) read each block as two 32-byte
//! halves: rows 0-7 and rows 8-15.

use super::{AlignedBytes, KernelLevel};

/// Rows per group (dwords per 64-byte block).
pub(super) const GROUP: usize = 16;
/// Bytes per (group, 16-column) block.
pub(super) const BLOCK: usize = 64;
/// Groups per tile in the layout of `level`.
pub(super) fn tile_groups(level: KernelLevel) -> usize {
    match level {
        KernelLevel::Avx512Vnni => super::avx512::TILE,
        KernelLevel::AvxVnni => super::avxvnni::TILE,
        _ => super::avx2::TILE,
    }
}

/// Byte offset of group `g`, column block 0, and the stride between column blocks.
#[inline(always)]
pub(super) fn group_offset(tile: usize, ngroups: usize, nkb: usize, g: usize) -> (usize, usize) {
    let t = g / tile;
    let in_tile = (ngroups - t * tile).min(tile);
    (t * tile * nkb * BLOCK + (g % tile) * BLOCK, in_tile * BLOCK)
}

/// A run of consecutive groups `g .. g + n` inside one tile: group `g + i`, column block `kb` is
/// at byte `off + i * BLOCK + kb * kbstride`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Span {
    pub off: usize,
    pub kbstride: usize,
    pub g: usize,
    pub n: usize,
}

/// The part of tile `t` inside groups `g0..g1` (which must intersect it).
#[inline]
pub(super) fn tile_span(tile: usize, ngroups: usize, nkb: usize, g0: usize, g1: usize, t: usize) -> Span {
    let ga = g0.max(t * tile);
    let gb = g1.min((t + 1) * tile);
    let (off, kbstride) = group_offset(tile, ngroups, nkb, ga);
    Span { off, kbstride, g: ga, n: gb - ga }
}

/// The spans covering groups `g0..g1`, tile by tile.
pub(super) fn spans(tile: usize, ngroups: usize, nkb: usize, g0: usize, g1: usize) -> impl Iterator<Item = Span> {
    let mut g = g0;
    std::iter::from_fn(move || {
        if g >= g1 {
            return None;
        }
        let end = ((g / tile + 1) * tile).min(g1);
        let (off, kbstride) = group_offset(tile, ngroups, nkb, g);
        let s = Span { off, kbstride, g, n: end - g };
        g = end;
        Some(s)
    })
}

pub(super) fn pack(codes: &[i8], rows: usize, cols: usize, kcols: usize, tile: usize) -> AlignedBytes {
    let nkb = kcols / 16;
    let ngroups = rows.div_ceil(GROUP);
    let mut data = AlignedBytes::filled(ngroups * nkb * BLOCK, 0x55); // u = 1 (code 0) everywhere
    let d = data.as_mut_slice();
    for r in 0..rows {
        let (g, i) = (r / GROUP, r % GROUP);
        let (goff, kbstride) = group_offset(tile, ngroups, nkb, g);
        let src = &codes[r * cols..(r + 1) * cols];
        for kb in 0..cols.div_ceil(16) {
            let mut word = 0u32;
            for j in 0..4 {
                let mut byte = 0u8;
                for p in 0..4 {
                    let c = 16 * kb + 4 * p + j;
                    let u = if c < cols { (src[c] + 1) as u8 } else { 1 };
                    byte |= u << (2 * p);
                }
                word |= (byte as u32) << (8 * j);
            }
            let o = goff + kb * kbstride + 4 * i;
            d[o..o + 4].copy_from_slice(&word.to_le_bytes());
        }
    }
    data
}

pub(super) fn unpack(data: &[u8], rows: usize, cols: usize, kcols: usize, tile: usize) -> Vec<i8> {
    let nkb = kcols / 16;
    let ngroups = rows.div_ceil(GROUP);
    let mut out = vec![0i8; rows * cols];
    for r in 0..rows {
        let (g, i) = (r / GROUP, r % GROUP);
        let (goff, kbstride) = group_offset(tile, ngroups, nkb, g);
        for c in 0..cols {
            let (kb, p, j) = (c / 16, (c % 16) / 4, c % 4);
            let byte = data[goff + kb * kbstride + 4 * i + j];
            out[r * cols + c] = ((byte >> (2 * p)) & 3) as i8 - 1;
        }
    }
    out
}

/// Bit mask of the lanes `0..lanes` of the group/half starting at row `r0` that fall in `rows`.
#[inline(always)]
pub(super) fn lane_mask(r0: usize, lanes: usize, rows: &std::ops::Range<usize>) -> u32 {
    let lo = rows.start.saturating_sub(r0).min(lanes);
    let hi = rows.end.saturating_sub(r0).min(lanes);
    if hi <= lo {
        return 0;
    }
    let full = if hi >= 32 { u32::MAX } else { (1u32 << hi) - 1 };
    full & !((1u32 << lo) - 1)
}
