//! The device layout of ternary weights, built on the host from the canonical form
//! ([`bitnet_core::weights::TernaryCodes`]). Pure Rust: packed and checked on any machine.
//!
//! # Layout ("mma tiles")
//!
//! A matrix of `rows x cols` codes is padded to `rows_p = ceil(rows/16)*16` rows and
//! `cols_p = ceil(cols/128)*128` columns and cut into tiles of 16 rows x 128 columns, 512 bytes
//! each, stored row block by row block: tile `(rb, kb)` starts at byte `(rb * ktiles + kb) * 512`.
//! Within a tile, lane `L` of a warp (`g = L / 4`, `t = L % 4`) owns the 16 bytes at `16 * L`,
//! so one warp reads a tile with one coalesced 16-byte load per lane. Word `s` (bytes `4s..4s+4`
//! of the lane's 16) is k-step `s` of the tile (`kc0 = 128 kb + 32 t + 8 s`: each lane's four
//! k-steps cover 32 consecutive columns); bits `2p..2p+1` of its byte `j` hold the offset code
//! `u = code + 1` (0, 1, 2; padding 1) of
//!
//! | p | row          | column           |
//! |---|--------------|------------------|
//! | 0 | `16 rb + g`     | `kc0 + j`     |
//! | 1 | `16 rb + g + 8` | `kc0 + j`     |
//! | 2 | `16 rb + g`     | `kc0 + 4 + j` |
//! | 3 | `16 rb + g + 8` | `kc0 + 4 + j` |
//!
//! which is the A fragment of PTX `mma.sync.m16n8k32.row.col.s32.s8.s8.s32`
//! (`a0 = A[g][4t..]`, `a1 = A[g+8][4t..]`, `a2 = A[g][16+4t..]`, `a3 = A[g+8][16+4t..]`) for
//! the k-step whose logical column `4t + j` is physical column `kc0 + j` and `16 + 4t + j` is
//! `kc0 + 4 + j`. The B fragment then follows the same relabelling: lane `(g, t)` needs the
//! activations `x[g][128 kb + 32 t ..][..32]` of its token, 32 consecutive bytes (two 16-byte
//! loads per tile), `b0` = word `2s` and `b1` = word `2s + 1` of them. A dot product does not
//! depend on how its terms are labelled, and integer sums are exact in any order.
//! `(word >> 2p) & 0x03030303` is register `a_p`, four int8 values in {0, 1, 2}, with no other
//! unpacking. The kernel multiplies offset codes with the int8 activations and subtracts the
//! per-token activation sum at the end (`sum u*x - sum x = sum code*x`), exactly, in i32.

/// Rows per tile.
pub const TILE_ROWS: usize = 16;
/// Columns per tile (and the padding of activation rows).
pub const TILE_COLS: usize = 128;
/// Bytes per tile.
pub const TILE_BYTES: usize = TILE_ROWS * TILE_COLS / 4;

/// Shape of a packed matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedShape {
    pub rows: usize,
    pub cols: usize,
    /// row blocks of 16
    pub rblocks: usize,
    /// column tiles of 128
    pub ktiles: usize,
}

impl PackedShape {
    pub fn new(rows: usize, cols: usize) -> PackedShape {
        PackedShape { rows, cols, rblocks: rows.div_ceil(TILE_ROWS), ktiles: cols.div_ceil(TILE_COLS) }
    }
    /// Padded column count (the activation row stride must be at least this).
    pub fn cols_p(&self) -> usize {
        self.ktiles * TILE_COLS
    }
    pub fn nbytes(&self) -> usize {
        self.rblocks * self.ktiles * TILE_BYTES
    }
}

/// Where code `(r, c)` lives: (byte offset, bit shift).
#[inline]
pub fn locate(shape: &PackedShape, r: usize, c: usize) -> (usize, u32) {
    let (rb, rr) = (r / TILE_ROWS, r % TILE_ROWS);
    let (kb, kc) = (c / TILE_COLS, c % TILE_COLS);
    let t = kc / 32; // the lane's column group
    let s = (kc % 32) / 8; // k-step within the tile
    let hi_k = kc % 8 >= 4; // the second 4 columns of the step: p = 2 or 3
    let j = kc % 4;
    let hi_r = rr >= 8;
    let g = rr % 8;
    let p = (hi_k as usize) * 2 + hi_r as usize;
    let lane = g * 4 + t;
    let byte = (rb * shape.ktiles + kb) * TILE_BYTES + lane * 16 + s * 4 + j;
    (byte, 2 * p as u32)
}

/// Packs row-major codes in {-1, 0, 1} (`rows * cols` of them). Panics on a code out of range
/// or a length mismatch (loaders validate first). Builds each byte from its four codes (no
/// read-modify-write): about 1 ns per code.
pub fn pack(codes: &[i8], rows: usize, cols: usize) -> (PackedShape, Vec<u8>) {
    assert_eq!(codes.len(), rows * cols, "codes length");
    if let Some(bad) = bitnet_cpu::kernels::invalid_code(codes) {
        panic!("ternary code out of range: {bad}");
    }
    let shape = PackedShape::new(rows, cols);
    let mut out = vec![0u8; shape.nbytes()];
    // offset code of (r, c); padding is code 0
    let u = |r: usize, c: usize| -> u8 {
        if r < rows && c < cols {
            (codes[r * cols + c] + 1) as u8
        } else {
            1
        }
    };
    for rb in 0..shape.rblocks {
        for kb in 0..shape.ktiles {
            let tile = &mut out[(rb * shape.ktiles + kb) * TILE_BYTES..][..TILE_BYTES];
            for lane in 0..32 {
                let (g, t) = (lane / 4, lane % 4);
                let (r0, r1) = (rb * TILE_ROWS + g, rb * TILE_ROWS + g + 8);
                for s in 0..4 {
                    let k0 = kb * TILE_COLS + 32 * t + 8 * s;
                    for j in 0..4 {
                        let (c0, c1) = (k0 + j, k0 + 4 + j);
                        tile[lane * 16 + 4 * s + j] =
                            u(r0, c0) | (u(r1, c0) << 2) | (u(r0, c1) << 4) | (u(r1, c1) << 6);
                    }
                }
            }
        }
    }
    (shape, out)
}

/// Inverse of [`pack`] (tests).
pub fn unpack(shape: &PackedShape, data: &[u8]) -> Vec<i8> {
    let mut out = vec![0i8; shape.rows * shape.cols];
    for r in 0..shape.rows {
        for c in 0..shape.cols {
            let (byte, sh) = locate(shape, r, c);
            out[r * shape.cols + c] = ((data[byte] >> sh) & 3) as i8 - 1;
        }
    }
    out
}

/// A host emulation of what one warp of the `ternary_mm` kernel computes for row block `rb`
/// and 8 tokens starting at `tok0`: it assembles the mma fragments from the packed bytes exactly
/// as the lanes do (PTX fragment layout) and returns `sum_k u[r][k] * x[n][k]` for the 16 x 8
/// tile as `[token][row]`. Used by the tests to check the layout against the reference on any
/// machine. `x` is `[n_tok][x_stride]` int8, zero padded to at least `cols_p`.
pub fn emulate_warp_tile(
    shape: &PackedShape,
    data: &[u8],
    rb: usize,
    x: &[i8],
    x_stride: usize,
    n_tok: usize,
    tok0: usize,
) -> [[i32; 16]; 8] {
    let mut d = [[0i32; 16]; 8]; // [col = token][row]
    for kb in 0..shape.ktiles {
        let tile = &data[(rb * shape.ktiles + kb) * TILE_BYTES..][..TILE_BYTES];
        for s in 0..4 {
            // A (16 x 32) and B (32 x 8) of this k-step, assembled from the lanes' registers.
            let mut a = [[0i32; 32]; 16];
            let mut bm = [[0i32; 8]; 32];
            for lane in 0..32 {
                let (g, t) = (lane / 4, lane % 4);
                let w = u32::from_le_bytes(tile[lane * 16 + 4 * s..][..4].try_into().unwrap());
                let regs: [u32; 4] = [0, 1, 2, 3].map(|p| (w >> (2 * p)) & 0x0303_0303);
                for j in 0..4 {
                    let byte = |r: u32| ((r >> (8 * j)) & 0xff) as i8 as i32;
                    a[g][4 * t + j] = byte(regs[0]);
                    a[g + 8][4 * t + j] = byte(regs[1]);
                    a[g][16 + 4 * t + j] = byte(regs[2]);
                    a[g + 8][16 + 4 * t + j] = byte(regs[3]);
                }
                // b0 = B[4t..4t+4][g], b1 = B[16+4t..][g]: words 2s and 2s+1 of the 32 bytes
                // x[tok0 + g][128 kb + 32 t..] the lane loads.
                let n = tok0 + g;
                let kc0 = kb * TILE_COLS + 32 * t + 8 * s;
                for j in 0..4 {
                    let (v0, v1) = if n < n_tok {
                        (x[n * x_stride + kc0 + j] as i32, x[n * x_stride + kc0 + 4 + j] as i32)
                    } else {
                        (0, 0)
                    };
                    bm[4 * t + j][g] = v0;
                    bm[16 + 4 * t + j][g] = v1;
                }
            }
            for (row, arow) in a.iter().enumerate() {
                for col in 0..8 {
                    let mut acc = 0i32;
                    for k in 0..32 {
                        acc += arow[k] * bm[k][col];
                    }
                    d[col][row] += acc;
                }
            }
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> u32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (*seed >> 33) as u32
    }

    #[test]
    fn locate_is_a_bijection_on_a_tile() {
        let shape = PackedShape::new(16, 128);
        let mut seen = vec![false; TILE_BYTES * 4];
        for r in 0..16 {
            for c in 0..128 {
                let (b, sh) = locate(&shape, r, c);
                let slot = b * 4 + sh as usize / 2;
                assert!(!seen[slot], "({r},{c}) collides");
                seen[slot] = true;
            }
        }
        assert!(seen.iter().all(|&s| s));
    }

    #[test]
    fn pack_roundtrip_and_padding() {
        let mut seed = 1;
        for &(rows, cols) in &[(1usize, 1usize), (16, 128), (17, 129), (40, 300), (3, 7)] {
            let codes: Vec<i8> = (0..rows * cols).map(|_| (lcg(&mut seed) % 3) as i8 - 1).collect();
            let (shape, data) = pack(&codes, rows, cols);
            assert_eq!(unpack(&shape, &data), codes);
            // every padding field holds u = 1 (code 0)
            for r in 0..shape.rblocks * 16 {
                for c in 0..shape.cols_p() {
                    if r < rows && c < cols {
                        continue;
                    }
                    let (b, sh) = locate(&shape, r, c);
                    assert_eq!((data[b] >> sh) & 3, 1);
                }
            }
        }
    }

    #[test]
    fn emulated_mma_equals_reference() {
        let mut seed = 9;
        for &(rows, cols, n_tok) in &[(16usize, 128usize, 8usize), (40, 300, 5), (33, 640, 11)] {
            let codes: Vec<i8> = (0..rows * cols).map(|_| (lcg(&mut seed) % 3) as i8 - 1).collect();
            let (shape, data) = pack(&codes, rows, cols);
            let xs = shape.cols_p();
            let mut x = vec![0i8; n_tok * xs];
            let mut sums = vec![0i32; n_tok];
            for n in 0..n_tok {
                for c in 0..cols {
                    let v = (lcg(&mut seed) % 256) as i32 - 128;
                    x[n * xs + c] = v as i8;
                    sums[n] += v;
                }
            }
            for rb in 0..shape.rblocks {
                for tok0 in (0..n_tok).step_by(8) {
                    let d = emulate_warp_tile(&shape, &data, rb, &x, xs, n_tok, tok0);
                    for (tt, col) in d.iter().enumerate() {
                        let n = tok0 + tt;
                        for (rr, &v) in col.iter().enumerate() {
                            let r = rb * 16 + rr;
                            if n >= n_tok || r >= rows {
                                continue;
                            }
                            let want: i32 = (0..cols).map(|c| codes[r * cols + c] as i32 * x[n * xs + c] as i32).sum();
                            assert_eq!(v - sums[n], want, "row {r} token {n}");
                        }
                    }
                }
            }
        }
    }
}
