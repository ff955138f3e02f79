//! The packed layout shared by the x86 levels (AVX2, AVX-VNNI, AVX-512 VNNI, AVX-512 VBMI).
//!
//! Rows are taken in groups of [`GROUP`] = 16 (the last group padded with code-0 rows), and
//! groups in tiles of `tile` groups (the last tile may hold fewer): 2 (32 rows) for AVX-512, 1
//! for AVX2 and AVX-VNNI: what one pass of each level's kernels covers ([`tile_groups`]). Each
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
//! apart read faster (the one-token kernels read two tiles at a time, from the two halves of
//! their row range; the AMX Xeon's cores too read more from two streams than from one). A row range may start at any group: a thread whose range starts or ends inside a tile
//! reads just its groups of that tile. AVX2 / AVX-VNNI (ymm) read each block as two 32-byte
//! halves: rows 0-7 and rows 8-15.
//!
//! # Block packings
//!
//! The description above is the I2 packing (2 bits per code, 16 columns per block), used by
//! every level but `avx512vbmi`, which packs five codes per byte (T5, 1.6 bits per code, 20
//! columns per block; [`Packing`]): byte `4i + j` of the block of group `g`, column block `kb`
//! is `u0 + 3 u1 + 9 u2 + 27 u3 + 81 u4` where `u_p = code + 1` of row `16g + i`, column
//! `20kb + 4p + j`. Rows, groups, tiles and streams are as above. Unpacking (`avx512.rs`): the
//! low digits `r = v - 81 u4` (< 81) by byte minimums or comparisons, then `vpermi2b` on `r` with
//! [`T5_TO_I2`] gives the I2 byte of digits 0-3. A T5 matrix reads up to `20 * ceil(cols / 20)`
//! activation columns, up to 16 past the padded width ([`super::ACT_SLACK`]); its padding codes
//! are -1 (`u = 0`), which add nothing whatever those bytes hold.

use super::{AlignedBytes, KernelLevel};

/// Rows per group (dwords per 64-byte block).
pub(super) const GROUP: usize = 16;
/// Bytes per (group, 16-column) block.
pub(super) const BLOCK: usize = 64;
/// Groups per tile in the layout of `level`.
pub(super) fn tile_groups(level: KernelLevel) -> usize {
    match level {
        KernelLevel::Avx512Vnni | KernelLevel::Avx512Vbmi | KernelLevel::Amx | KernelLevel::AmxVbmi => {
            super::avx512::TILE
        }
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

/// How a 64-byte block holds its 16 rows' codes (the module docs describe both).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Packing {
    /// 2 bits per code, 16 columns per block.
    I2,
    /// 5 codes per byte in base 3 (1.6 bits per code), 20 columns per block.
    T5,
}

impl Packing {
    /// Columns per 64-byte block.
    #[inline(always)]
    pub(super) const fn block_cols(self) -> usize {
        match self {
            Packing::I2 => 16,
            Packing::T5 => 20,
        }
    }
    /// Column blocks of a `cols`-wide matrix (`kcols` = `cols` padded to `K_ALIGN`). I2 covers
    /// `kcols`; T5 covers `cols` rounded up to 20, which may reach up to 16 activation bytes past
    /// `kcols` (`QuantActs` keeps that slack; the padding codes there are -1 with `u = 0`, so
    /// whatever those bytes hold adds nothing).
    #[inline(always)]
    pub(super) const fn nkb(self, cols: usize, kcols: usize) -> usize {
        match self {
            Packing::I2 => kcols / 16,
            Packing::T5 => cols.div_ceil(20),
        }
    }
    /// The byte of dword lane `i` (a row), byte `j`, column block `kb` from a row's `u = code + 1`
    /// values (`u(c)` for `c < cols`).
    fn encode(self, u: impl Fn(usize) -> Option<u8>, kb: usize, j: usize) -> u8 {
        match self {
            // Padding: u = 1 (code 0) against zero activations.
            Packing::I2 => (0..4).map(|p| u(16 * kb + 4 * p + j).unwrap_or(1) << (2 * p)).sum(),
            // Padding: u = 0, which adds nothing whatever the activation byte holds.
            Packing::T5 => T5_PLACES.iter().enumerate().map(|(p, &w)| u(20 * kb + 4 * p + j).unwrap_or(0) * w).sum(),
        }
    }
    /// [`Packing::encode`]'s four bytes (`j` = 0..4) of a column block wholly inside the row,
    /// from its codes: no padding test per code (the packing's closures and tests per code were
    /// 15-18% of loading 2B-4T).
    #[inline(always)]
    fn encode_full(self, blk: &[i8]) -> [u8; 4] {
        let mut b = [0u8; 4];
        match self {
            Packing::I2 => {
                for j in 0..4 {
                    for p in 0..4 {
                        b[j] |= ((blk[4 * p + j] + 1) as u8) << (2 * p);
                    }
                }
            }
            Packing::T5 => {
                for j in 0..4 {
                    for (p, w) in T5_PLACES.into_iter().enumerate() {
                        b[j] += (blk[4 * p + j] + 1) as u8 * w;
                    }
                }
            }
        }
        b
    }
    /// `u` of position `p` (column `block_cols * kb + 4p + j`) in an encoded byte.
    fn decode(self, byte: u8, p: usize) -> u8 {
        match self {
            Packing::I2 => (byte >> (2 * p)) & 3,
            Packing::T5 => (byte / T5_PLACES[p]) % 3,
        }
    }
}

/// Place values of a T5 byte's five base-3 digits (position `p` weighs `3^p`).
const T5_PLACES: [u8; 5] = [1, 3, 9, 27, 81];

/// The T5 byte-permute table: entry `r` (< 81, the base-3 digits `u0 + 3 u1 + 9 u2 + 27 u3`) is
/// the same four digits in the I2 encoding (`u_p` in bits `2p..2p+1`); entries 81..127 unused.
pub(super) const T5_TO_I2: [u8; 128] = {
    let mut t = [0u8; 128];
    let mut r = 0;
    while r < 81 {
        let (mut v, mut p, mut b) = (r, 0, 0u8);
        while p < 4 {
            b |= ((v % 3) as u8) << (2 * p);
            v /= 3;
            p += 1;
        }
        t[r] = b;
        r += 1;
    }
    t
};

pub(super) fn pack(
    codes: &[i8],
    rows: usize,
    cols: usize,
    kcols: usize,
    tile: usize,
    packing: Packing,
) -> AlignedBytes {
    let nkb = packing.nkb(cols, kcols);
    let ngroups = rows.div_ceil(GROUP);
    let pad_row = match packing {
        Packing::I2 => 0x55, // u = 1 (code 0)
        Packing::T5 => 0,    // u = 0 (code -1): padded rows are computed, never stored
    };
    let mut data = AlignedBytes::filled(ngroups * nkb * BLOCK, pad_row);
    let d = data.as_mut_slice();
    for r in 0..rows {
        let (g, i) = (r / GROUP, r % GROUP);
        let (goff, kbstride) = group_offset(tile, ngroups, nkb, g);
        let src = &codes[r * cols..(r + 1) * cols];
        let u = |c: usize| (c < cols).then(|| (src[c] + 1) as u8);
        let bc = packing.block_cols();
        for kb in 0..nkb {
            let o = goff + kb * kbstride + 4 * i;
            let bytes = match src.get(kb * bc..(kb + 1) * bc) {
                Some(blk) => packing.encode_full(blk),
                None => std::array::from_fn(|j| packing.encode(u, kb, j)),
            };
            d[o..o + 4].copy_from_slice(&bytes);
        }
    }
    data
}

pub(super) fn unpack(data: &[u8], rows: usize, cols: usize, kcols: usize, tile: usize, packing: Packing) -> Vec<i8> {
    let nkb = packing.nkb(cols, kcols);
    let bc = packing.block_cols();
    let ngroups = rows.div_ceil(GROUP);
    let mut out = vec![0i8; rows * cols];
    for r in 0..rows {
        let (g, i) = (r / GROUP, r % GROUP);
        let (goff, kbstride) = group_offset(tile, ngroups, nkb, g);
        for c in 0..cols {
            let (kb, p, j) = (c / bc, (c % bc) / 4, c % 4);
            let byte = data[goff + kb * kbstride + 4 * i + j];
            out[r * cols + c] = packing.decode(byte, p) as i8 - 1;
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
